"""The sandbox a chat template renders in (chat.py): jinja2's immutable sandbox, with limits.

A template comes from a model file, so it is hostile until it has rendered. jinja2's sandbox stops
escapes (no dunder attributes, no mutation of the caller's data). Limits stop the rest:

- time: a render runs in its own thread and is interrupted (an asynchronous exception) when it runs
  past its time. That only works between Python bytecodes, so no single step may be long;
- memory: a render may make at most MAX_BYTES of strings and containers, all its steps together;
- compiling: the source, and the Python it compiles to, are limited in size; compiling is linear in them.

So every step that could be long or large in one C call is sized BEFORE it runs, from the sizes of
its inputs, and refused past the limits: `*` `+` `%` `**` (through the sandbox's `call_binop`),
`~`, slices, `*args`, comparisons and hashes of nested values (which walk them: a value can share a
sub-value and stand for 2**60 elements in 60 nodes), every method a template may call, every filter
and test. What is not on those lists is refused: methods by name, filters and tests by not being
defined. jinja2's optimizer is off (it would run filters and operators while *compiling*, outside
every limit), and intercepted operators are never constant-folded.
"""

from __future__ import annotations

import copy
import datetime
import itertools
import json
import math
import re
import sys
import threading
import types
from typing import Any, Callable, NamedTuple

import jinja2
import jinja2.ext
import jinja2.filters as jf
import jinja2.tests as jt
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame, operators
from jinja2.runtime import BlockReference, LoopContext, Macro, markup_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter, SecurityError
from jinja2.utils import Cycler, Joiner, Namespace
from markupsafe import Markup

from ..errors import ChatTemplateError

MAX_OUTPUT = 4 << 20  # characters a render may produce
MAX_SECONDS = 2.0
MAX_SOURCE = 64 << 10  # characters of template source (real ones are under 25K)
MAX_CODE = 256 << 10  # characters of Python it may compile to (real templates: ~4 per source character);
# Python's compile() takes up to ~270 bytes per character, so this bounds compiling to ~70 MiB
MAX_BYTES = 64 << 20  # bytes of strings and containers one render may make, all its steps together
MAX_WALK = 1 << 23  # elements + characters one comparison, hash, str() or json.dumps may walk
MAX_SCAN = 1 << 28  # character steps of one search whose worst case is len(text) * len(needle)
MAX_INT_BITS = 4096

_SPACES = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008" \
          "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"  # every c with c.isspace(): what split() and \s split on
_LINE_BREAKS = "\n\x0b\x0c\r\x1c\x1d\x1e\x85\u2028\u2029"  # what splitlines() splits on
_PIECE = 88  # bytes one small new string costs, with its slot in a list
_PRINTF = re.compile(r"%(?:\(([^()]*)\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?(.?)", re.S)
_WORD, _WORD_CHAR = re.compile(r"\w+"), re.compile(r"\w")


class _Undefined(jinja2.Undefined):
    """Plain undefined values stay falsy and print empty (templates rely on that), but an unsafe
    attribute access — which the sandbox turns into an undefined — fails loudly."""

    def __init__(self, hint=None, obj=jinja2.utils.missing, name=None, exc=jinja2.exceptions.UndefinedError):
        if exc is SecurityError:
            raise SecurityError(hint or f"access to {name!r} is unsafe")
        super().__init__(hint, obj, name, exc)


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, transformers' marker of the assistant's tokens: its body renders."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        return nodes.Scope(parser.parse_statements(("name:endgeneration",), drop_needle=True)).set_lineno(lineno)


class RenderTimeout(BaseException):
    """Raised inside the rendering thread when it runs past its time."""


def short(text: Any, most: int = 300) -> str:
    """One line of at most `most` characters, for an error message."""
    text = str(text)
    cut = text[:most].replace("\r", " ").replace("\n", " ")
    return cut + ("…" if len(text) > most else "")


def _limit(what: str) -> ChatTemplateError:
    return ChatTemplateError(f"chat template exceeds its limits: {what}",
                             "the template builds values too large or too slow to render safely")


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.0f} MiB" if size >= 1 << 20 else f"{size} bytes"


def _count_any(text: str, chars: str) -> int:
    return sum(text.count(c) for c in chars)


def _int_arg(value: Any, what: str) -> int:
    if isinstance(value, int):
        return value
    raise ChatTemplateError(f"chat template failed: {what} must be an integer, not {type(value).__name__}")


class Spend:
    """What one render has made so far (bytes), and the measures of the immutable values it walked."""

    __slots__ = ("made", "memo")

    def __init__(self) -> None:
        self.made = 0
        self.memo: dict[int, tuple[Any, int, int, int]] = {}  # id -> (value kept alive, nodes, chars, depths)


class _CodeGen(CodeGenerator):
    """jinja2's code generator with the steps it writes as bare Python routed through the sandbox:
    `~`, comparisons, slices, literals and `*args` / `**kwargs` (so they are sized, walked or counted)."""

    def signature(self, node: Any, frame: Frame, extra_kwargs: Any = None) -> None:
        # `*args` and `**kwargs` (Python copies them into a new tuple or dict) pass through ownlm_spread first
        if node.dyn_args is not None or node.dyn_kwargs is not None:
            node = copy.copy(node)  # the tree is left as it was: a node can be written twice
            for name, keywords in (("dyn_args", False), ("dyn_kwargs", True)):
                value = getattr(node, name)
                if value is not None:
                    spread = nodes.EnvironmentAttribute("ownlm_spread")
                    setattr(node, name, nodes.Call(spread, [nodes.Const(keywords), value], [], None, None))
        super().signature(node, frame, extra_kwargs)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        markup = "context.eval_ctx.autoescape" if frame.eval_ctx.volatile else repr(bool(frame.eval_ctx.autoescape))
        self.write(f"environment.ownlm_concat({markup}, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def visit_Compare(self, node: nodes.Compare, frame: Frame) -> None:
        self.write("(environment.ownlm_walked(")
        self.visit(node.expr, frame)
        self.write(")")
        for op in node.ops:
            self.write(f" {operators[op.op]} environment.ownlm_walked(")
            self.visit(op.expr, frame)
            self.write(")")
        self.write(")")

    def visit_Getitem(self, node: nodes.Getitem, frame: Frame) -> None:
        if not isinstance(node.arg, nodes.Slice):
            return super().visit_Getitem(node, frame)
        self.write("environment.getitem(")
        self.visit(node.node, frame)
        self.write(", slice(")
        for i, part in enumerate((node.arg.start, node.arg.stop, node.arg.step)):
            self.write(", " if i else "")
            if part is None:
                self.write("None")
            else:
                self.visit(part, frame)
        self.write("))")

    def visit_Tuple(self, node: nodes.Tuple, frame: Frame) -> None:
        if node.ctx != "load":  # an assignment target
            return super().visit_Tuple(node, frame)
        self.write("environment.ownlm_made(")
        super().visit_Tuple(node, frame)
        self.write(")")

    def visit_List(self, node: nodes.List, frame: Frame) -> None:
        self.write("environment.ownlm_made(")
        super().visit_List(node, frame)
        self.write(")")

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:
        self.write("environment.ownlm_made({")
        for idx, item in enumerate(node.items):
            self.write(", " if idx else "")
            self.write("environment.ownlm_walked(")  # a key is hashed
            self.visit(item.key, frame)
            self.write("): ")
            self.visit(item.value, frame)
        self.write("})")


class _FormatCall:
    """`text.format` / `text.format_map` as a template may call it: the sandbox's formatter, with every
    field sized before it is formatted. (Its attributes are private: the sandbox hides them.)"""

    def __init__(self, env: Sandbox, text: str, name: str):
        self._env, self._text, self._name = env, text, name

    def __call__(self, *args: Any, **kwargs: Any) -> str:
        if self._name == "format_map":
            if kwargs or len(args) != 1:
                raise TypeError("format_map() takes exactly one positional argument")
            args, kwargs = (), args[0]
        if isinstance(self._text, Markup):
            formatter: SandboxedFormatter = _BoundedEscapeFormatter(self._env, escape=self._text.escape)
        else:
            formatter = _BoundedFormatter(self._env)
        return self._env._made(type(self._text)(formatter.vformat(self._text, args, kwargs)))


class _Bounded:
    """Sizes each field before string.Formatter formats it: width and precision from the spec, the
    value from its measure."""

    env: Sandbox

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if conversion in ("r", "a"):
            self.env._room(4 * self.env._text_size(value, True), f"!{conversion} in format()")
        return super().convert_field(value, conversion)  # type: ignore[misc]

    def format_field(self, value: Any, format_spec: str) -> str:
        widths = 0
        for digits in re.findall(r"\d+", format_spec):
            if len(digits) > 9:
                raise _limit(f"a format() width of {len(digits)} digits")
            widths += int(digits)
        factor = 6 if isinstance(self, SandboxedEscapeFormatter) else 1
        self.env._room(4 * factor * (widths + self.env._text_size(value, False)), "format()")
        return self.env._made(super().format_field(value, format_spec))  # type: ignore[misc]


class _BoundedFormatter(_Bounded, SandboxedFormatter):
    def __init__(self, env: Sandbox) -> None:
        super().__init__(env)
        self.env = env


class _BoundedEscapeFormatter(_Bounded, SandboxedEscapeFormatter):
    def __init__(self, env: Sandbox, escape: Callable[[Any], Markup]) -> None:
        super().__init__(env, escape=escape)
        self.env = env


# -- methods a template may call on a string, and what each may cost --------------------------------------

def _words(names: str) -> tuple[str, ...]:
    return tuple(names.split())


def _scan(text: str, needle: Any, what: str) -> None:
    if isinstance(needle, str) and len(text) * len(needle) > MAX_SCAN:
        raise _limit(f"{what} of a {len(needle)}-character argument in {len(text)} characters")


def _params(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _str_method(env: Sandbox, s: str, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Check one call `s.name(*args, **kwargs)` before it runs; returns the arguments to run it with."""
    factor = 6 if isinstance(s, Markup) else 1  # Markup's methods escape what they are given
    what = f"str.{name}()"
    if name in _STR_PLAIN:
        for v in itertools.chain(args, kwargs.values()):
            env._walk(v)
        return args, kwargs
    if name in _STR_CASE:
        env._room(12 * len(s), what)  # one character can become three ('ß'.upper() == 'SS'), four bytes each
        return args, kwargs
    p = _params(_STR_SIGNATURES.get(name, ()), args, kwargs)
    if name in ("rfind", "rindex", "rpartition", "rsplit", "strip", "lstrip", "rstrip"):
        _scan(s, p.get("sub", p.get("sep", p.get("chars"))), what)
    if name in ("split", "rsplit", "splitlines"):
        sep = p.get("sep")
        pieces = len(s) + 1
        if _PIECE * pieces > env._left():
            if name == "splitlines":
                pieces = _count_any(s, _LINE_BREAKS) + 1
            elif sep is None:
                pieces = _count_any(s, _SPACES) + 1
            elif isinstance(sep, str) and sep:
                pieces = s.count(sep) + 1
        maxsplit = p.get("maxsplit", -1)
        if isinstance(maxsplit, int) and maxsplit >= 0:
            pieces = min(pieces, maxsplit + 1)
        env._room(_PIECE * pieces + 4 * len(s), what)
    elif name == "join":
        items = env._items(p.get("iterable", ()))
        total = sum(len(x) for x in items if isinstance(x, str)) + len(s) * max(len(items) - 1, 0)
        env._room(4 * factor * total, what)
        return (items,), {}
    elif name == "replace":
        old, new, count = p.get("old"), p.get("new"), p.get("count", -1)
        if isinstance(old, str) and isinstance(new, str):
            hits = s.count(old)
            if isinstance(count, int) and count >= 0:
                hits = min(hits, count)
            env._room(4 * (len(s) + hits * max(factor * len(new) - len(old), 0)), what)
    elif name in ("center", "ljust", "rjust", "zfill"):
        env._room(4 * factor * max(len(s), _int_arg(p.get("width", 0), f"{what} width")), what)
    elif name == "expandtabs":
        tabsize = _int_arg(p.get("tabsize", 8), f"{what} tabsize")
        env._room(4 * (len(s) + s.count("\t") * max(tabsize, 0)), what)
    else:  # strip and kin, partition, removeprefix, removesuffix: at most a copy
        env._room(4 * factor * len(s) + 256, what)
    return args, kwargs


_STR_PLAIN = frozenset(_words("""count endswith find index isalnum isalpha isascii isdecimal isdigit
    isidentifier islower isnumeric isprintable isspace istitle isupper startswith"""))
_STR_CASE = frozenset(_words("capitalize casefold lower swapcase title upper"))
_STR_SIGNATURES = {
    "rfind": ("sub",), "rindex": ("sub",), "rpartition": ("sep",), "partition": ("sep",),
    "split": ("sep", "maxsplit"), "rsplit": ("sep", "maxsplit"), "splitlines": ("keepends",),
    "strip": ("chars",), "lstrip": ("chars",), "rstrip": ("chars",), "join": ("iterable",),
    "replace": ("old", "new", "count"), "center": ("width", "fillchar"), "ljust": ("width", "fillchar"),
    "rjust": ("width", "fillchar"), "zfill": ("width",), "expandtabs": ("tabsize",),
    "removeprefix": ("prefix",), "removesuffix": ("suffix",),
}
_STR_METHODS = _STR_PLAIN | _STR_CASE | frozenset(_STR_SIGNATURES)
_OTHER_METHODS = {  # type -> methods a template may call on it (the arguments are walked: they get hashed or compared)
    dict: frozenset(_words("get items keys values copy")),
    list: frozenset(_words("index count copy")),
    tuple: frozenset(_words("index count")),
    int: frozenset(_words("bit_length")),
    bool: frozenset(_words("bit_length")),
    float: frozenset(_words("is_integer")),
    LoopContext: frozenset(_words("cycle changed")),
    Cycler: frozenset(_words("next reset")),
}
_DICT_VIEWS = (type({}.keys()), type({}.values()), type({}.items()))
_SCALAR_CHARS: dict[type, Callable[[Any], int]] = {  # characters each prints as at most
    str: len, int: lambda v: v.bit_length() // 3 + 2, bool: lambda v: 5, float: lambda v: 24,
    type(None): lambda v: 4,
}


class Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["+", "-", "*", "/", "//", "%", "**"])
    intercepted_unops = frozenset(["+", "-"])
    code_generator_class = _CodeGen

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, undefined=_Undefined, optimized=False,
                         finalize=_finalize, extensions=["jinja2.ext.loopcontrols", _Generation])
        self.local = threading.local()
        self.concat = self._join_output  # how macros, call blocks and `{% set %}` blocks join their output
        self.filters = _filters()
        self.tests = _tests()
        del self.globals["lipsum"]
        self.globals["raise_exception"] = _raise
        self.globals["strftime_now"] = _strftime_now
        # the callables a template may call, besides macros, methods on the lists above, and str.format
        self.free_calls = {id(f): f for f in (_raise, _strftime_now, self.globals["range"], Cycler, Joiner)}
        self.built_calls = {id(f): f for f in (dict, Namespace)}  # these hash their arguments and copy them

    def _compile(self, source: str, filename: str) -> types.CodeType:
        if len(source) > MAX_CODE:
            raise ChatTemplateError(f"chat template compiles to {len(source)} characters of Python, more than the "
                                    f"{MAX_CODE} allowed", "the template is too large or too dense to load safely")
        return super()._compile(source, filename)

    # -- the budget --------------------------------------------------------------------------------------

    def _spend(self) -> Spend:
        spend = getattr(self.local, "spend", None)
        if spend is None:
            spend = self.local.spend = Spend()
        return spend

    def _left(self) -> int:
        return MAX_BYTES - self._spend().made

    def _room(self, size: int, what: str) -> None:
        """Before a step that may make up to `size` bytes."""
        spend = self._spend()
        if spend.made + size > MAX_BYTES:
            raise _limit(f"{what} would make up to {_mib(size)}, with {_mib(spend.made)} of the render's "
                         f"{_mib(MAX_BYTES)} already made")

    def _made(self, value: Any) -> Any:
        """After a step: count what it made."""
        spend = self._spend()
        spend.made += sys.getsizeof(value, 64)
        if spend.made > MAX_BYTES:
            raise _limit(f"the render made more than {_mib(MAX_BYTES)} of values")
        return value

    def _counted(self, items: Any) -> Any:
        for item in items:
            yield self._made(item)

    # -- walking nested values ------------------------------------------------------------------------------

    def _measure(self, value: Any) -> tuple[int, int, int]:
        """(nodes, characters, sum of depths) of `value` as str(), ==, hash() or json.dumps walk it:
        a sub-value is counted each time it is reached, as they do, but measured once."""
        n, c, s, _ = self._measure_in(value, self._spend(), {}, set())
        if n + c > MAX_WALK:
            raise _limit(f"a value of {n + c} elements and characters is walked (compared, hashed, printed); "
                         f"the limit is {MAX_WALK}")
        return n, c, s

    def _measure_in(self, value: Any, spend: Spend, local: dict, active: set) -> tuple[int, int, int, bool]:
        kind = type(value)
        if kind in _SCALAR_CHARS:
            return 1, _SCALAR_CHARS[kind](value), 0, True
        if isinstance(value, str):
            return 1, len(value), 0, True
        if isinstance(value, (int, float)):
            return 1, 24 if isinstance(value, float) else value.bit_length() // 3 + 2, 0, True
        key = id(value)
        hit = spend.memo.get(key)
        if hit is not None:
            return hit[1], hit[2], hit[3], True
        if key in local:
            return local[key]
        if isinstance(value, (list, tuple, set, frozenset)):
            children: Any = value
        elif isinstance(value, dict):
            children = itertools.chain.from_iterable(value.items())
        elif isinstance(value, _DICT_VIEWS):  # a view prints, compares and hashes its dict's items
            children = itertools.chain.from_iterable(value.mapping.items())
        elif isinstance(value, types.MappingProxyType):  # what view.mapping gives
            children = itertools.chain.from_iterable(value.items())
        elif isinstance(value, Namespace):
            if key in active:  # a namespace that holds itself: repr prints it as {...}
                return 1, 16, 0, False
            active.add(key)
            children = itertools.chain.from_iterable(object.__getattribute__(value, "_Namespace__attrs").items())
        elif isinstance(value, types.MethodType):  # its repr holds its object's
            children = (value.__self__,)
        else:  # a macro, a loop, an undefined, a range, a generator: a short repr, compared by identity
            return 1, 64, 0, True
        n, c, s, pure = 1, 0, 0, not isinstance(value, Namespace)
        for child in children:
            chars = _SCALAR_CHARS.get(type(child))
            if chars is not None:  # most children: no call
                n, c, s = n + 1, c + chars(child), s + 1
                continue
            cn, cc, cs, cp = local.get(id(child)) or self._measure_in(child, spend, local, active)
            n, c, s, pure = n + cn, c + cc, s + cs + cn, pure and cp
        active.discard(key)
        local[key] = (n, c, s, pure)
        if pure and n + c >= 64 and not isinstance(value, (*_DICT_VIEWS, types.MappingProxyType)):
            # kept (and counted) for the render: lists, tuples and dicts cannot change inside the sandbox
            spend.memo[key] = (value, n, c, s)
            spend.made += 128
        return n, c, s, pure

    def _walk(self, value: Any) -> Any:
        if not isinstance(value, (str, int, float)) and value is not None:
            self._measure(value)
        return value

    def _text_size(self, value: Any, as_repr: bool) -> int:
        """Most characters str(value) (or repr) can have: a character can print as \\U0010ffff."""
        if isinstance(value, str):
            return len(value) * (10 if as_repr else 1) + 2
        n, c, _ = self._measure(value)
        return 10 * (n + c) + 400  # 400: a float's longest %f

    def _text(self, value: Any) -> str:
        """str(value), sized first."""
        if isinstance(value, str):
            return value
        self._room(4 * self._text_size(value, False), "printing a value")
        return self._made(str(value))

    def _items(self, value: Any) -> list:
        """The items of an iterable as a list, counted as they are made."""
        if isinstance(value, list):
            return value
        if isinstance(value, (str, tuple, dict, set, frozenset, range, *_DICT_VIEWS)):
            self._room(_PIECE * len(value) + 64, "listing items")
            return self._made(list(value))
        out = []
        for item in value:  # a generator: its items come from Python code, one at a time
            out.append(self._made(item))
        return out

    def _keys(self, items: list, key: Callable[[Any], Any]) -> list:
        """The sort or hash keys of items, walked: comparing them costs what walking them does."""
        keys, total = [], 0
        for item in items:
            k = key(item)
            n, c, _ = self._measure(k)
            total += n + c
            if total > MAX_WALK:
                raise _limit(f"sorting or grouping keys of more than {MAX_WALK} elements and characters")
            keys.append(self._made(k))
        return keys

    # -- the sandbox's hooks ------------------------------------------------------------------------------

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        for number in (left, right):  # '+' and '-' grow a number by a bit, '//' and '%' cost its size squared
            if isinstance(number, int) and number.bit_length() > MAX_INT_BITS:
                raise _limit(f"{operator!r} on a number of {number.bit_length()} bits (limit {MAX_INT_BITS})")
        if operator == "*":
            self._size_mul(left, right)
        elif operator == "+":
            if isinstance(left, str) and isinstance(right, str):
                factor = 6 if isinstance(left, Markup) or isinstance(right, Markup) else 1
                self._room(4 * factor * (len(left) + len(right)), "'+'")
            elif isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
                self._room(8 * (len(left) + len(right)) + 64, "'+'")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                bits = right * math.log2(abs(left))
                if bits > MAX_INT_BITS:
                    raise _limit(f"'**' would make a number of {bits:.3g} bits (limit {MAX_INT_BITS})")
        elif operator == "%" and isinstance(left, str):
            return self._printf(left, right)
        elif operator == "-" and isinstance(left, _DICT_VIEWS):  # a set difference hashes every element
            self._walk(left)
            self._walk(right)
        return self._made(self.binop_table[operator](left, right))

    def _size_mul(self, left: Any, right: Any) -> None:
        for seq, times in ((left, right), (right, left)):
            if isinstance(times, int) and isinstance(seq, (str, list, tuple)):
                size = len(seq) * max(times, 0)
                unit = "characters" if isinstance(seq, str) else "items"
                self._room((4 if isinstance(seq, str) else 8) * size, f"'*' making {size} {unit}")
                return
        if isinstance(left, int) and isinstance(right, int):
            bits = left.bit_length() + right.bit_length()
            if bits > MAX_INT_BITS:
                raise _limit(f"'*' would make a number of {bits} bits (limit {MAX_INT_BITS})")

    def _printf(self, fmt: str, args: Any) -> str:
        """`fmt % args`, sized first: widths and precisions from the format, each value from its measure."""
        positional = list(args) if isinstance(args, tuple) else [args]
        total, left = len(fmt), self._left()
        for m in _PRINTF.finditer(fmt):
            key, width, precision, kind = m.groups()
            if kind == "%":
                continue
            if kind not in "diouxXeEfFgGcrsa" or not kind:
                raise ChatTemplateError(f"chat template failed: unsupported format {short(m.group(0), 40)!r}")
            for part in (width, precision):
                if part == "*":
                    star = positional.pop(0) if positional else 0
                    total += abs(star) if isinstance(star, int) else 0
                elif part:
                    if len(part) > 9:
                        raise _limit(f"a %-format width of {len(part)} digits")
                    total += int(part)
            if key is not None:
                value = args[key] if isinstance(args, dict) and key in args else None
            else:
                value = positional.pop(0) if positional else None
            total += self._text_size(value, kind in "ra") + 400
            if 4 * total > left:  # stop parsing a format that is already too big
                break
        self._room(4 * (6 if isinstance(fmt, Markup) else 1) * total, "'%' formatting")
        return self._made(fmt % args)

    def call_unop(self, context: Any, operator: str, arg: Any) -> Any:
        return self.unop_table[operator](arg)  # on numbers: no bigger than their operand

    def getitem(self, obj: Any, argument: Any) -> Any:
        if isinstance(argument, slice):
            if isinstance(obj, (str, list, tuple)):
                self._room(8 * len(obj) + 64, "a slice")
            return self._made(super().getitem(obj, argument))
        if isinstance(argument, tuple):  # hashed to look it up
            self._walk(argument)
        return super().getitem(obj, argument)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        if (isinstance(value, (types.MethodType, types.BuiltinMethodType))
                and value.__name__ in ("format", "format_map") and isinstance(value.__self__, str)):
            return _FormatCall(self, value.__self__, value.__name__)
        return None

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        plain = {k: v for k, v in kwargs.items() if k not in ("_loop_vars", "_block_vars")}
        new = True  # whether the call makes its result (or hands back a value that exists already)
        if isinstance(obj, (Macro, BlockReference, LoopContext, _FormatCall)):
            pass  # template code (itself bounded), a loop's recursion, str.format (sized field by field)
        elif isinstance(obj, types.MethodType) and obj.__self__ is self and obj.__func__ is Sandbox.ownlm_spread:
            new = False  # the code generator's own call, around `*args` and `**kwargs`
        elif isinstance(obj, (Joiner, jinja2.Undefined)) or (id(obj) in self.free_calls
                                                              and self.free_calls[id(obj)] is obj):
            new = False
        elif id(obj) in self.built_calls and self.built_calls[id(obj)] is obj:
            # dict(...) and namespace(...) copy references and hash keys: walk what is not a dict already
            n = len(plain) + sum(len(a) if isinstance(a, dict) else self._measure(a)[0] for a in args)
            self._room(_PIECE * 2 * n + 256, f"{getattr(obj, '__name__', 'dict')}()")
        elif isinstance(obj, (types.BuiltinMethodType, types.MethodType)) and isinstance(obj.__self__, str) \
                and obj.__name__ in _STR_METHODS:
            new_args, new_kwargs = _str_method(self, obj.__self__, obj.__name__, args, plain)
            if new_args is not args:
                args, kwargs = new_args, new_kwargs
        elif isinstance(obj, (types.BuiltinMethodType, types.MethodType)) \
                and obj.__name__ in _OTHER_METHODS.get(type(obj.__self__), ()):
            for v in itertools.chain((obj.__self__,) if obj.__name__ in ("index", "count") else (), args,
                                     plain.values()):
                self._walk(v)
            if obj.__name__ == "copy":
                self._room(sys.getsizeof(obj.__self__), "copy()")
            else:
                new = False
        else:
            raise ChatTemplateError(f"chat template may not call {_describe(obj)}",
                                    "chat templates may call macros, a short list of string, list and dict "
                                    "methods, and their globals")
        out = super().call(context, obj, *args, **kwargs)
        return self._made(out) if new else out

    # -- what the code generator writes calls to -------------------------------------------------------------

    def ownlm_concat(self, markup: bool, parts: tuple) -> str:
        texts = [self._text(p) for p in parts]
        self._room(4 * (6 if markup else 1) * sum(map(len, texts)), "'~'")
        return self._made(markup_join(texts) if markup else "".join(texts))

    def ownlm_spread(self, keywords: bool, value: Any) -> Any:
        if keywords:
            if isinstance(value, dict):
                self._room(sys.getsizeof(value), "**kwargs")
                self._made(value)  # Python copies it
            return value
        if isinstance(value, (list, tuple, str, dict, range, *_DICT_VIEWS)):
            self._room(_PIECE * len(value) + 64, "*args")
            self._spend().made += 8 * len(value) + 64 + (_PIECE * len(value) if isinstance(value, str) else 0)
            return value
        return self._items(value)  # a generator: listed here, counted item by item

    def ownlm_walked(self, value: Any) -> Any:
        return self._walk(value)

    def ownlm_made(self, value: Any) -> Any:
        return self._made(value)

    def _join_output(self, parts: Any) -> str:
        parts = parts if isinstance(parts, list) else list(parts)
        self._room(4 * sum(map(len, parts)), "joining a block's output")
        return self._made("".join(parts))


def _describe(obj: Any) -> str:
    owner = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", None)
    if owner is not None and name and not isinstance(owner, types.ModuleType):
        return f"{type(owner).__name__ if not isinstance(owner, type) else owner.__name__}.{name}()"
    return f"{name}()" if isinstance(name, str) else f"a {type(obj).__name__}"


@jinja2.pass_eval_context
def _finalize(eval_ctx: Any, value: Any) -> str:
    """What `{{ value }}` prints: str(value), sized first."""
    return eval_ctx.environment._text(value)


@jinja2.pass_context
def _raise(context: Any, message: Any) -> None:
    raise ChatTemplateError(f"chat template refused the conversation: {short(context.environment._text(message))}")


def _strftime_now(fmt: Any) -> str:
    if not isinstance(fmt, str) or len(fmt) > 1000:
        raise ChatTemplateError("chat template failed: strftime_now takes a format of at most 1000 characters")
    return datetime.datetime.now().strftime(fmt)


# -- filters and tests -----------------------------------------------------------------------------------------

def _call_jinja(fn: Callable, context: Any, *args: Any, **kwargs: Any) -> Any:
    """Call one of jinja2's own filters or tests with what it asks for first."""
    pass_arg = getattr(getattr(fn, "jinja_pass_arg", None), "name", None)
    first = {"context": context, "eval_context": getattr(context, "eval_ctx", None),
             "environment": getattr(context, "environment", None)}.get(pass_arg or "", None)
    return fn(first, *args, **kwargs) if pass_arg else fn(*args, **kwargs)


def _plain(fn: Callable) -> Callable:
    """A filter whose result is one of its inputs, a number, or a generator (counted as it yields)."""

    @jinja2.pass_context
    def run(context: Any, *args: Any, **kwargs: Any) -> Any:
        out = _call_jinja(fn, context, *args, **kwargs)
        return context.environment._counted(out) if isinstance(out, types.GeneratorType) else out

    return run


def _on_text(name: str, fn: Callable, cost: Callable[..., int]) -> Callable:
    """A filter over text: its value is printed (sized), then `cost(text, *args, **kwargs)` — the most
    bytes the filter can make — is checked before it runs."""

    @jinja2.pass_context
    def run(context: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        env = context.environment
        text = env._text(value)
        env._room(cost(env, text, *args, **kwargs), f"the {name} filter")
        return env._made(_call_jinja(fn, context, text, *args, **kwargs))

    return run


def _cost_copy(factor: int) -> Callable[..., int]:
    return lambda env, s, *args, **kwargs: 4 * factor * len(s) + 256


def _cost_center(env: Sandbox, s: str, width: Any = 80) -> int:
    return 4 * max(len(s), _int_arg(width, "center width")) + 256


def _cost_indent(env: Sandbox, s: str, width: Any = 4, first: bool = False, blank: bool = False) -> int:
    indent = len(width) if isinstance(width, str) else max(_int_arg(width, "indent width"), 0)
    lines = len(s) + 2
    if lines * (indent + 2 * _PIECE) > env._left():
        lines = _count_any(s, _LINE_BREAKS) + 2
    return 4 * (len(s) + lines * (indent + 1)) + 2 * _PIECE * lines


def _cost_replace(env: Sandbox, s: str, old: Any, new: Any, count: Any = None) -> int:
    old, new = env._text(old), env._text(new)
    hits = s.count(old)
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return 4 * (len(s) + hits * 6 * len(new)) + 256


def _cost_trim(env: Sandbox, s: str, chars: Any = None) -> int:
    _scan(s, chars, "trim")
    return 4 * len(s) + 256


def _cost_truncate(env: Sandbox, s: str, length: Any = 255, killwords: Any = False, end: Any = "...",
                   leeway: Any = None) -> int:
    return 4 * (2 * len(s) + len(env._text(end))) + 4 * _PIECE


def _cost_title(env: Sandbox, s: str) -> int:
    pieces = len(s) + 1
    if 2 * _PIECE * pieces > env._left():
        pieces = 2 * _count_any(s, _SPACES + "-({[<") + 1
    return 12 * len(s) + 2 * _PIECE * pieces


@jinja2.pass_context
def _f_wordcount(context: Any, s: Any) -> int:
    # Counted in chunks: one regex call over millions of words holds the interpreter for seconds.
    text, words, step = context.environment._text(s), 0, 1 << 16
    for start in range(0, len(text), step):
        words += _WORD.subn("", text[start:start + step])[1]
        if start and _WORD_CHAR.match(text, start - 1) and _WORD_CHAR.match(text, start):
            words -= 1  # one word across the chunks' border
    return words


@jinja2.pass_context
def _f_attr(context: Any, obj: Any, name: Any) -> Any:
    env = context.environment
    return jf.do_attr(env, obj, env._text(name))


@jinja2.pass_context
def _f_format(context: Any, value: Any, *args: Any, **kwargs: Any) -> str:
    if args and kwargs:
        raise jinja2.FilterArgumentError("can't handle positional and keyword arguments at the same time")
    env = context.environment
    return env._printf(env._text(value), kwargs or args)


@jinja2.pass_context
def _f_join(context: Any, value: Any, d: Any = "", attribute: Any = None) -> str:
    env = context.environment
    if attribute is not None:
        value = map(jf.make_attrgetter(env, attribute), env._items(value))
    texts = [env._text(x) for x in env._items(value)]
    sep = env._text(d)
    total = sum(map(len, texts)) + len(sep) * max(len(texts) - 1, 0)
    env._room(4 * (6 if context.eval_ctx.autoescape else 1) * total, "the join filter")
    return env._made(jf.sync_do_join(context.eval_ctx, texts, sep))


@jinja2.pass_context
def _f_list(context: Any, value: Any) -> list:
    env = context.environment
    items = env._items(value)
    if items is value:
        env._room(8 * len(items) + 64, "the list filter")
        items = env._made(list(items))
    return items


@jinja2.pass_context
def _f_reverse(context: Any, value: Any) -> Any:
    env = context.environment
    if isinstance(value, str):
        env._room(4 * len(value) + 64, "the reverse filter")
        return env._made(value[::-1])
    return env._made(jf.do_reverse(value))


@jinja2.pass_context
def _f_batch(context: Any, value: Any, linecount: Any, fill_with: Any = None) -> Any:
    env = context.environment
    items = env._items(value)
    linecount = _int_arg(linecount, "batch size")
    env._room(8 * (len(items) + max(linecount, 0)) + _PIECE * (len(items) // max(linecount, 1) + 1), "batch")
    return env._counted(jf.do_batch(items, linecount, fill_with))


@jinja2.pass_context
def _f_slice(context: Any, value: Any, slices: Any, fill_with: Any = None) -> Any:
    env = context.environment
    items = env._items(value)
    env._room(8 * len(items) + 64, "slice")
    return env._counted(jf.sync_do_slice(items, _int_arg(slices, "slice count"), fill_with))


@jinja2.pass_context
def _f_sum(context: Any, iterable: Any, attribute: Any = None, start: Any = 0) -> Any:
    env = context.environment
    if isinstance(start, str):
        raise TypeError("sum() can't sum strings [use the join filter instead]")
    get = jf.make_attrgetter(env, attribute) if attribute is not None else None
    total = start
    for item in env._items(iterable):
        total = env.call_binop(context, "+", total, get(item) if get else item)
    return total


def _caser(case_sensitive: Any) -> Callable | None:
    return None if case_sensitive else jf.ignore_case


@jinja2.pass_context
def _f_sort(context: Any, value: Any, reverse: bool = False, case_sensitive: bool = False,
            attribute: Any = None) -> list:
    env = context.environment
    items = env._items(value)
    keys = env._keys(items, jf.make_multi_attrgetter(env, attribute, postprocess=_caser(case_sensitive)))
    order = sorted(range(len(items)), key=keys.__getitem__, reverse=reverse)
    return env._made([items[i] for i in order])


@jinja2.pass_context
def _f_dictsort(context: Any, value: Any, case_sensitive: bool = False, by: str = "key", reverse: bool = False) -> list:
    env = context.environment
    if by not in ("key", "value"):
        raise jinja2.FilterArgumentError('You can only sort by either "key" or "value"')
    pos, case = (0 if by == "key" else 1), _caser(case_sensitive)
    items = env._items(value.items())
    keys = env._keys(items, (lambda item: case(item[pos])) if case else (lambda item: item[pos]))
    order = sorted(range(len(items)), key=keys.__getitem__, reverse=reverse)
    return env._made([items[i] for i in order])


def _f_min_or_max(pick: Callable) -> Callable:
    @jinja2.pass_context
    def run(context: Any, value: Any, case_sensitive: bool = False, attribute: Any = None) -> Any:
        env = context.environment
        items = env._items(value)
        if not items:
            return env.undefined("No aggregated item, sequence was empty.")
        keys = env._keys(items, jf.make_attrgetter(env, attribute, postprocess=_caser(case_sensitive)))
        return items[pick(range(len(items)), key=keys.__getitem__)]

    return run


@jinja2.pass_context
def _f_unique(context: Any, value: Any, case_sensitive: bool = False, attribute: Any = None) -> Any:
    env = context.environment
    get = jf.make_attrgetter(env, attribute, postprocess=_caser(case_sensitive))
    seen: set = set()
    for item in value:
        key = env._walk(get(item))
        if key not in seen:
            seen.add(key)
            env._made(key)
            yield item


class _GroupTuple(NamedTuple):
    grouper: Any
    list: list

    def __repr__(self) -> str:
        return tuple.__repr__(self)

    def __str__(self) -> str:
        return tuple.__str__(self)


@jinja2.pass_context
def _f_groupby(context: Any, value: Any, attribute: Any, default: Any = None, case_sensitive: bool = False) -> list:
    env = context.environment
    items = env._items(value)
    keys = env._keys(items, jf.make_attrgetter(env, attribute, postprocess=_caser(case_sensitive), default=default))
    order = sorted(range(len(items)), key=keys.__getitem__)
    out = [_GroupTuple(k, [items[i] for i in idx]) for k, idx in itertools.groupby(order, key=keys.__getitem__)]
    if not case_sensitive:
        name = jf.make_attrgetter(env, attribute, default=default)
        out = [_GroupTuple(name(group[0]), group) for _, group in out]
    env._room(8 * len(items) + 128 * len(out), "groupby")
    return env._made(out)


@jinja2.pass_context
def _f_tojson(context: Any, value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
              sort_keys: bool = False) -> str:
    """Plain JSON with transformers' arguments, in its order (jinja2's own escapes HTML characters)."""
    env = context.environment
    n, c, depths = env._measure(value)
    step = len(indent) if isinstance(indent, str) else max(indent, 0) if isinstance(indent, int) else 0
    seps = sum(len(s) for s in separators if isinstance(s, str)) if isinstance(separators, (list, tuple)) else 4
    chars = (12 if ensure_ascii else 6) * c + n * (8 + seps) + (step + 1) * (depths + n) * (indent is not None)
    env._room((1 if ensure_ascii else 4) * chars + 256, "tojson")
    return env._made(json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys,
                                separators=separators))


def _filters() -> dict[str, Callable]:
    """The filters a template may use. pprint, striptags, urlencode, urlize, wordwrap and xmlattr are
    left out: no chat template needs them, and each builds text in ways hard to size."""
    f = jf.FILTERS
    out = {name: _plain(f[name]) for name in _words("""abs count d default first float int items last
           length map random reject rejectattr round select selectattr filesizeformat""")}
    out.update({
        "capitalize": _on_text("capitalize", jf.do_capitalize, _cost_copy(3)),
        "lower": _on_text("lower", jf.do_lower, _cost_copy(3)),
        "upper": _on_text("upper", jf.do_upper, _cost_copy(3)),
        "title": _on_text("title", jf.do_title, _cost_title),
        "center": _on_text("center", jf.do_center, _cost_center),
        "indent": _on_text("indent", jf.do_indent, _cost_indent),
        "replace": _on_text("replace", f["replace"], _cost_replace),
        "trim": _on_text("trim", jf.do_trim, _cost_trim),
        "truncate": _on_text("truncate", f["truncate"], _cost_truncate),
        "string": _on_text("string", jf.soft_str, _cost_copy(0)),
        "safe": _on_text("safe", jf.do_mark_safe, _cost_copy(1)),
        "escape": _on_text("escape", f["escape"], _cost_copy(6)),
        "e": _on_text("e", f["e"], _cost_copy(6)),
        "forceescape": _on_text("forceescape", jf.do_forceescape, _cost_copy(6)),
        "attr": _f_attr, "wordcount": _f_wordcount, "format": _f_format, "join": _f_join, "list": _f_list,
        "reverse": _f_reverse, "batch": _f_batch, "slice": _f_slice, "sum": _f_sum, "sort": _f_sort,
        "dictsort": _f_dictsort, "min": _f_min_or_max(min), "max": _f_min_or_max(max), "unique": _f_unique,
        "groupby": _f_groupby, "tojson": _f_tojson,
    })
    return out


def _tests() -> dict[str, Callable]:
    def walked(fn: Callable) -> Callable:  # compares or hashes its arguments
        @jinja2.pass_context
        def run(context: Any, *args: Any) -> Any:
            for a in args:
                context.environment._walk(a)
            return _call_jinja(fn, context, *args)

        return run

    def printed(fn: Callable) -> Callable:
        @jinja2.pass_context
        def run(context: Any, value: Any) -> Any:
            return fn(context.environment._text(value))

        return run

    @jinja2.pass_context
    def divisibleby(context: Any, value: Any, num: Any) -> bool:  # '%' on a string formats: keep it sized
        return context.environment.call_binop(context, "%", value, num) == 0

    @jinja2.pass_context
    def odd(context: Any, value: Any) -> bool:
        return context.environment.call_binop(context, "%", value, 2) == 1

    @jinja2.pass_context
    def even(context: Any, value: Any) -> bool:
        return context.environment.call_binop(context, "%", value, 2) == 0

    t = jt.TESTS
    out = {name: t[name] for name in _words("""defined undefined none boolean false true integer float string
           mapping number sequence iterable callable sameas escaped""")}
    out.update({name: walked(t[name]) for name in _words("""in == eq equalto != ne > gt greaterthan ge >= < lt
                lessthan <= le filter test""")})
    out.update({"lower": printed(str.islower), "upper": printed(str.isupper),
                "divisibleby": divisibleby, "odd": odd, "even": even})
    return out

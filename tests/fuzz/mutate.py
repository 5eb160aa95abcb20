"""Structure-aware mutators: each takes a seed corpus item and a random.Random and returns a hostile
variant that still looks like what it mutates (a GGUF that parses as far as its header, a
config.json that is JSON, a template that compiles as often as not), so the cases reach past the
first check into the code that trusts the values."""

from __future__ import annotations

import copy
import json
import math
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

CORPUS = Path(__file__).with_name("corpus")

# -- values a file may hold where another belongs ----------------------------------------------------
HOSTILE_NUMBERS = [0, -1, 1, 2, 3, 7, 255, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1,
                   16_777_216, 10**30, float("inf"), float("-inf"), float("nan"), 1e-30, -0.0, 0.5, 1e300]
HOSTILE_STRINGS = ["", "abc", "\x00", "\ud800", "9" * 400, "{{", "%s%s%s", "../../etc/passwd", "llama", "gpt2"]


def hostile_value(rng: random.Random) -> Any:
    kind = rng.randrange(7)
    if kind < 3:
        return rng.choice(HOSTILE_NUMBERS)
    if kind == 3:
        return rng.choice(HOSTILE_STRINGS)
    if kind == 4:
        return rng.choice([True, False, None])
    if kind == 5:
        return [rng.choice(HOSTILE_NUMBERS) for _ in range(rng.randrange(0, 4))]
    return {"type": rng.choice(HOSTILE_STRINGS), "factor": rng.choice(HOSTILE_NUMBERS)}


# -- GGUF: parsed into keys and tensors, mutated, written back byte by byte ------------------------
T = gguf.GGUFValueType
PACK = {T.UINT8: "<B", T.INT8: "<b", T.UINT16: "<H", T.INT16: "<h", T.UINT32: "<I", T.INT32: "<i",
        T.FLOAT32: "<f", T.BOOL: "<?", T.UINT64: "<Q", T.INT64: "<q", T.FLOAT64: "<d"}


@dataclass
class Gguf:
    kv: list[tuple[str, T, Any, T | None]] = field(default_factory=list)  # key, type, value, array item type
    tensors: list[list] = field(default_factory=list)  # [name, dims (ne0 first), type id, data bytes]

    @classmethod
    def read(cls, path: Path) -> Gguf:
        r = gguf.GGUFReader(path)
        out = cls()
        for f in r.fields.values():
            if f.name.startswith("GGUF."):
                continue
            vtype = f.types[0]
            if vtype == T.ARRAY:
                sub = f.types[1]
                items = [bytes(f.parts[i]).decode("utf-8", "replace") if sub == T.STRING else f.parts[i][0].item()
                         for i in f.data]
                out.kv.append((f.name, vtype, items, sub))
            elif vtype == T.STRING:
                out.kv.append((f.name, vtype, bytes(f.parts[f.data[0]]).decode("utf-8", "replace"), None))
            else:
                out.kv.append((f.name, vtype, f.parts[f.data[0]][0].item(), None))
        for t in r.tensors:
            out.tensors.append([t.name, [int(d) for d in t.shape], int(t.tensor_type), bytes(t.data.tobytes())])
        return out

    def to_bytes(self) -> bytes:
        head = b"GGUF" + struct.pack("<IQQ", 3, len(self.tensors), len(self.kv))
        for key, vtype, value, sub in self.kv:
            head += _str(key) + struct.pack("<I", int(vtype)) + _value(vtype, value, sub)
        offsets, at = [], 0
        for _, _, _, data in self.tensors:
            offsets.append(at)
            at += len(data) + (-len(data)) % 32
        for (name, dims, tid, _), off in zip(self.tensors, offsets):
            head += _str(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d % 2**64) for d in dims)
            head += struct.pack("<IQ", tid % 2**32, off)
        head += b"\0" * ((-len(head)) % 32)
        body = b"".join(data + b"\0" * ((-len(data)) % 32) for _, _, _, data in self.tensors)
        return head + body


def _str(s: str) -> bytes:
    b = s.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(b)) + b


def _value(vtype: T, value: Any, sub: T | None) -> bytes:
    if vtype == T.STRING:
        return _str(str(value))
    if vtype == T.ARRAY:
        return struct.pack("<IQ", int(sub), len(value)) + b"".join(_value(sub, v, None) for v in value)
    if vtype == T.BOOL:
        return struct.pack("<?", bool(value))
    fmt = PACK[vtype]
    if vtype in (T.FLOAT32, T.FLOAT64):
        try:
            return struct.pack(fmt, float(value))
        except OverflowError:  # beyond float32: what a writer rounding it would store
            return struct.pack(fmt, math.copysign(math.inf, float(value)))
    bits = struct.calcsize(fmt) * 8
    return struct.pack(fmt.upper(), int(value) % 2**bits)  # the same bits, signed or not


def _typed(value: Any, rng: random.Random) -> tuple[T, Any, T | None]:
    """A GGUF type for a Python value (ints get a random width that holds them)."""
    if isinstance(value, bool):
        return T.BOOL, value, None
    if isinstance(value, int):
        widths = [t for t, lo, hi in ((T.UINT32, 0, 2**32), (T.INT32, -2**31, 2**31), (T.UINT64, 0, 2**64),
                                      (T.INT64, -2**63, 2**63), (T.UINT8, 0, 256)) if lo <= value < hi]
        return (rng.choice(widths), value, None) if widths else (T.FLOAT64, float(value), None)
    if isinstance(value, float):
        return rng.choice([T.FLOAT32, T.FLOAT64]), value, None
    if isinstance(value, str):
        return T.STRING, value, None
    if isinstance(value, list):
        items = [v for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return T.ARRAY, [float(v) for v in items], T.FLOAT32
    return T.STRING, json.dumps(value), None


def mutate_gguf(base: Gguf, rng: random.Random) -> bytes:
    g = copy.deepcopy(base)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(10)
        if op <= 3 and g.kv:  # a value of the wrong type or range
            i = rng.randrange(len(g.kv))
            key = g.kv[i][0]
            g.kv[i] = (key, *_typed(hostile_value(rng), rng))
        elif op == 4 and g.kv:  # an array where a scalar belongs, or a scalar where an array does
            i = rng.randrange(len(g.kv))
            key, vtype, value, sub = g.kv[i]
            if vtype == T.ARRAY:
                g.kv[i] = (key, *_typed(rng.choice(HOSTILE_NUMBERS + HOSTILE_STRINGS), rng))
            else:
                g.kv[i] = (key, T.ARRAY, [value] * rng.randint(0, 3), vtype)
        elif op == 5 and g.kv:  # a key gone
            del g.kv[rng.randrange(len(g.kv))]
        elif op == 6 and g.tensors:  # dims swapped, dropped, added or absurd
            t = rng.choice(g.tensors)
            dims = t[1]
            how = rng.randrange(4)
            if how == 0:
                dims.reverse()
            elif how == 1 and len(dims) > 1:
                dims.pop()
            elif how == 2:
                dims.extend([1] * rng.choice([1, 2, 62]))
            else:
                dims[rng.randrange(len(dims))] = rng.choice([0, 1, 3, 2**31, 2**63, 16_777_216])
        elif op == 7 and g.tensors:  # a tensor gone, renamed or of another type
            i = rng.randrange(len(g.tensors))
            how = rng.randrange(3)
            if how == 0:
                del g.tensors[i]
            elif how == 1:
                g.tensors[i][0] = rng.choice(["blk.99.attn_q.weight", "blk.0.attn_q.weight", "x", ""])
            else:
                g.tensors[i][2] = rng.choice([0, 1, 2, 8, 12, 30, 99, 2**31])
        elif op == 8 and g.tensors:  # data cut short
            t = rng.choice(g.tensors)
            t[3] = t[3][: rng.randrange(len(t[3]) + 1)]
        else:  # block count, heads, vocabulary: values that ask for huge allocations
            keys = [k for k, *_ in g.kv if k.endswith(("block_count", "head_count", "head_count_kv",
                                                        "embedding_length", "context_length", "feed_forward_length",
                                                        "sliding_window", "dimension_count"))]
            if keys:
                key = rng.choice(keys)
                g.kv = [(k, *_typed(rng.choice([16_777_216, 2**40, 0, 7, 3]), rng)) if k == key else (k, v, x, s)
                        for k, v, x, s in g.kv]
    data = g.to_bytes()
    if rng.random() < 0.15:  # and now and then a few raw bytes flipped in the header
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(min(len(b), 4096))] = rng.randrange(256)
        data = bytes(b)
    return data


# -- HF folders: config.json values, safetensors header, tokenizer and generation config ------------
CONFIG_KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
               "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "head_dim",
               "sliding_window", "layer_types", "query_pre_attn_scalar", "tie_word_embeddings", "model_type",
               "architectures", "rope_parameters", "torch_dtype", "hidden_act", "bos_token_id", "eos_token_id"]


def _json(data: bytes) -> Any:
    """A file the mutator itself changed earlier may no longer be JSON (or nest too deep to parse)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def mutate_hf(folder: Path, rng: random.Random) -> dict[str, bytes]:
    """The corpus folder's files, some mutated: {file name: bytes}."""
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(8)
        if op <= 3:  # config.json values
            cfg = _json(files["config.json"])
            if not isinstance(cfg, dict):
                continue
            key = rng.choice(CONFIG_KEYS)
            if rng.random() < 0.2:
                cfg.pop(key, None)
            else:
                cfg[key] = hostile_value(rng)
            files["config.json"] = json.dumps(cfg).encode()  # NaN / Infinity as Python's json writes them
        elif op == 4:  # safetensors header
            st = files["model.safetensors"]
            n = struct.unpack("<Q", st[:8])[0]
            header = _json(st[8:8 + n])
            names = [k for k in header if k != "__metadata__"] if isinstance(header, dict) else []
            if not names:
                continue
            name = rng.choice(names)
            how = rng.randrange(5)
            if how == 0:
                header[name]["shape"] = [rng.choice(HOSTILE_NUMBERS[:16]) for _ in range(rng.randint(0, 3))]
            elif how == 1:
                header[name]["data_offsets"] = [rng.choice(HOSTILE_NUMBERS[:16]), rng.choice(HOSTILE_NUMBERS[:16])]
            elif how == 2:
                header[name]["dtype"] = rng.choice(["F64", "I8", "BOOL", "F8_E4M3", "nope", 3])
            elif how == 3:
                header[name]["shape"] = list(reversed(header[name]["shape"]))
            else:
                del header[name]
            body = json.dumps(header).encode()
            files["model.safetensors"] = struct.pack("<Q", len(body)) + body + st[8 + n:]
        elif op == 5:  # a header or config nested absurdly deep
            deep = _nested(rng.choice([1000, 100_000, 600_000])).encode()
            if rng.random() < 0.5:
                files["config.json"] = deep
            else:
                files["model.safetensors"] = struct.pack("<Q", len(deep)) + deep
        elif op == 6:  # generation config / tokenizer config of the wrong shape
            target = rng.choice(["generation_config.json", "tokenizer_config.json"])
            value = rng.choice([[], "x", 3, None, {"eos_token_id": hostile_value(rng)},
                                {"chat_template": hostile_value(rng)}, {"add_bos_token": hostile_value(rng)}])
            files[target] = json.dumps(value).encode()
        else:  # tokenizer.json damaged
            tok = _json(files["tokenizer.json"])
            if not isinstance(tok, dict) or not isinstance(tok.get("model"), dict):
                continue
            how = rng.randrange(3)
            if how == 0:
                tok["model"]["merges"] = hostile_value(rng)
            elif how == 1:
                tok["model"]["vocab"] = {"a" * rng.choice([1, 250_000]): 0}
            else:
                tok["added_tokens"] = hostile_value(rng)
            files["tokenizer.json"] = json.dumps(tok).encode()
    return files


# -- chat templates ------------------------------------------------------------------------------------
SNIPPETS = [
    "{% set x = (n+6) ** 12000000 %}", "{{ 'x' * 2000000000 }}", "{{ [1] * 1000000000 }}", "{{ 9 ** 9 ** 9 }}",
    "{{ messages | tojson(indent=100000000) }}", "{{ 'a' | indent(1000000000) }}", "{{ 'a' | center(1000000000) }}",
    "{{ '%099999999d' | format(1) }}", "{{ 'ab' | replace('', 'x' * 100000) * 1000 }}", "{{ range(10**12) | list }}",
    "{% for i in range(100000000) %}{% endfor %}", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}", "{{ cycler.__init__.__globals__ }}", "{{ self.__dict__ }}",
    "{{ messages[0].content.__class__ }}", "{{ raise_exception('no') }}", "{{ undefined_name.attr }}",
    "{{ 1 / 0 }}", "{{ strftime_now('%Y' * 1000000) }}", "{% set ns = namespace(a=[]) %}{{ ns.a.append(1) }}",
    "{{ (messages * 100000) | length }}", "{{ 'x' | wordwrap(1) * 100000 }}", "{{ '{:>999999999}'.format(1) }}",
    "{{ lipsum(100000) }}", "{% include 'x' %}", "{% extends 'base' %}", "{{ 10 ** 1000000 }}",
    "{{ messages | map(attribute='content') | join('x' * 100000) * 100000 }}", "{{ 'x' * (2 ** 62) }}",
]


def mutate_template(text: str, rng: random.Random) -> str:
    op = rng.randrange(4)
    if op <= 1:  # a hostile snippet somewhere
        at = rng.randrange(len(text) + 1)
        return text[:at] + rng.choice(SNIPPETS) + text[at:]
    if op == 2:  # the template cut or doubled
        return text[: rng.randrange(len(text) + 1)] + (text if rng.random() < 0.3 else "")
    return rng.choice(SNIPPETS) * rng.randint(1, 3)


# -- JSON schemas and request bodies -------------------------------------------------------------------
def mutate_schema(schema: dict, rng: random.Random) -> str:
    """JSON text of a hostile schema (text: nesting too deep for Python's own parser stays text)."""
    s = copy.deepcopy(schema)
    op = rng.randrange(7)
    if op == 0:
        return json.dumps({"$ref": "#"})  # recursive
    if op == 1:
        return json.dumps({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"})
    if op == 2:
        return json.dumps({"type": "string",
                           "pattern": rng.choice(["(a+)+$", "^(a|a)*$", "[", "\\", "(?<=x)y", "a{99999}"])})
    if op == 3:
        depth = rng.choice([50, 5000])
        return '{"type": "array", "items": ' * depth + '{}' + "}" * depth
    if op == 4:
        return json.dumps({"type": "array", "minItems": rng.choice([10**9, -1, 2**64]), "items": {"type": "integer"}})
    if op == 5:
        return json.dumps({"enum": list(range(rng.choice([0, 1, 100_000])))})
    s[rng.choice(["type", "properties", "required", "additionalProperties", "anyOf", "maxLength"])] = hostile_value(rng)
    return json.dumps(s)


def mutate_body(body: dict, rng: random.Random) -> str:
    """JSON text of a hostile request body."""
    b = copy.deepcopy(body)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(6)
        if op <= 2 and b:  # a field of the wrong type or range
            b[rng.choice(list(b))] = hostile_value(rng)
        elif op == 3:  # a message damaged
            b["messages"] = rng.choice([[], "hi", [{"role": "user"}], [{"role": "x", "content": "y"}],
                                        [{"role": "user", "content": "\ud800"}], [{"role": "user", "content": [3]}],
                                        [{"role": "user", "content": "word " * 50_000}]])
        elif op == 4:  # an unknown field
            b[rng.choice(["best_of", "frobnicate", "n", "suffix", "user", "functions"])] = hostile_value(rng)
        else:  # nested deep, or not an object at all
            return _nested(rng.choice([100, 10_000, 100_000])) if rng.random() < 0.5 else json.dumps(
                rng.choice([[], "x", 3, None]))
    return json.dumps(b)

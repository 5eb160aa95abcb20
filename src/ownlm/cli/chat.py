"""The chat of `ownlm run MODEL` (no prompt, a terminal): readline line editing with a history kept
across sessions in $OWNLM_HOME/history, multi-line input (\"\"\" ... \"\"\" and pasted blocks), answers
wrapped at word boundaries to the terminal's width, Ctrl-C to stop an answer, and Ollama's commands
(/set, /show, /save, /load, /clear, /bye). docs/chat.md shows it from the user's side.

A stopped answer (Ctrl-C) keeps what was shown: the question and the partial answer stay in the
conversation, as on screen (an answer stopped before its first word drops the question too)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
import time
import unicodedata
from typing import Any, Callable

from .. import manage
from ..engine import prefix_cache
from ..engine.generate import DEFAULT_MAX_TOKENS, budget
from ..errors import OwnlmError
from ..loading import load, split_adapter
from ..paths import home

HISTORY_LENGTH = 1000  # entries kept (and read back) in $OWNLM_HOME/history
BLOCK = '"""'
PROMPT, MORE = ">>> ", "... "
LEAVE_HINT = "Use Ctrl-D or /bye to exit."
# /set parameter NAME: Ollama's names and ours -> (sampling keyword, type)
PARAMETERS: dict[str, tuple[str, type]] = {
    "temperature": ("temperature", float), "top_p": ("top_p", float), "top_k": ("top_k", int),
    "min_p": ("min_p", float), "seed": ("seed", int), "num_predict": ("max_tokens", int),
    "max_tokens": ("max_tokens", int), "repeat_penalty": ("repetition_penalty", float),
    "repetition_penalty": ("repetition_penalty", float), "stop": ("stop", str)}
COMMANDS = ("/?", "/help", "/set", "/show", "/save", "/load", "/clear", "/reset", "/system", "/bye", "/exit",
            "/quit")
HELP = """\
commands:
  /set system TEXT           set the system prompt (\"\"\" for several lines)
  /set parameter NAME VALUE  temperature, top_p, top_k, min_p, seed, num_predict (max_tokens),
                             repeat_penalty, stop (several words: several stop strings)
  /set verbose | quiet       show tokens and tok/s after each answer, or not
  /set wordwrap | nowordwrap wrap answers at word boundaries to the terminal's width, or not
  /show info | system | parameters | template
  /save NAME                 save the system prompt, parameters and conversation as a preset
  /load MODEL                switch to another model or preset (the conversation starts over)
  /clear                     forget the conversation (the system prompt stays)
  /bye                       leave (also Ctrl-D)
keys: Up/Down recall earlier lines (kept across sessions), Ctrl-C stops an answer,
  \"\"\" starts and ends a message of several lines; a pasted block is one message."""


def capped(lm, ids: list[int], sampling: dict, default: int = DEFAULT_MAX_TOKENS) -> dict:
    """`sampling` with max_tokens: the one asked for, else `default` (fewer where the context or
    the memory free has less room left after the prompt)."""
    params = lm.params(**sampling)
    if params.max_tokens is not None:
        return sampling
    return {**sampling, "max_tokens": budget(len(ids), params, lm.model, default=default)}


def cache_line(budget: int, per: str = "") -> str:
    """The prefix cache's bound, as the chat and `ownlm serve` print it on stderr at start."""
    return f"prefix cache: {budget / (1 << 20):.0f} MiB{per}" if budget else "prefix cache: off (--cache-mb 0)"


# ---- the terminal: width, wrapping -------------------------------------------------------------

def cells(ch: str) -> int:
    """Columns a character takes on a terminal (CJK and emoji 2, combining marks 0)."""
    if unicodedata.combining(ch) or ch in "\u200b\u200c\u200d\ufe0f":
        return 0
    return 2 if unicodedata.east_asian_width(ch) in "WF" else 1


def terminal_width(stream) -> int | None:
    """The width of the terminal `stream` writes to; None when it is not a terminal."""
    try:
        if not stream.isatty():
            return None
        return os.get_terminal_size(stream.fileno()).columns or None
    except (OSError, ValueError, AttributeError):
        return shutil.get_terminal_size().columns if hasattr(stream, "isatty") and stream.isatty() else None


def readable(line: str) -> str:
    """A line from stdin with the bytes that were not UTF-8 (handed over as lone surrogates) as
    U+FFFD: text the tokenizer and the history file take."""
    try:
        return line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate of another kind
        return line.encode("utf-8", "replace").decode("utf-8")


# bidirectional embeddings, overrides and isolates: they reorder what a terminal shows
BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def visible(text: str) -> str:
    """`text` safe for a terminal: control characters other than newline and tab shown as ^X (C1
    ones as U+FFFD), so that an answer cannot move the cursor or send escape sequences, and
    bidirectional overrides as U+FFFD, so that it cannot show text in another order than it has."""
    if text.isprintable() or all(ch.isprintable() or ch in "\n\t" for ch in text):
        return text
    out = []
    for ch in text:
        o = ord(ch)
        if ch in BIDI:
            out.append("\ufffd")
        elif ch in "\n\t" or not (o < 32 or 127 <= o < 160):
            out.append(ch)
        else:
            out.append("^" + chr(o ^ 64) if o < 128 else "\ufffd")
    return "".join(out)


class WordWrap:
    """Streamed text in, wrapped text out: a line breaks before a word that would cross `width`
    (the spaces at the break are dropped), explicit newlines and the indentation after them are
    kept, and only a word wider than the whole line is broken. width None: text passes as is."""

    def __init__(self, write: Callable[[str], Any], width: int | None):
        self.write, self.width = write, width
        self.col = 0  # the cursor's column
        self.space = ""  # whitespace not written yet: written with the next word if it fits
        self.word = ""  # the word being received
        self.breaking = False  # in a word wider than the line: written as it comes

    def feed(self, text: str) -> None:
        if self.width is None:
            self.write(text)
            return
        for ch in text:
            if ch in "\n\r":
                self._word()
                self.space, self.breaking = "", False
                self.write(ch)
                self.col = 0
            elif ch in " \t":
                self._word()
                self.breaking = False
                self.space += ch
            elif self.breaking:
                self._emit(ch)
            else:
                self.word += ch
                if sum(map(cells, self.word)) > self.width:  # wider than any line: break it
                    self._word()
                    self.breaking = True

    def finish(self) -> None:
        """Write the word held back (the text has ended)."""
        if self.width is None:
            return
        self._word()
        self.space = ""

    def _word(self) -> None:
        if not self.word:
            return
        space, word, self.word = self.space, self.word, ""
        self.space = ""
        at = self.col
        for ch in space:
            at += 8 - at % 8 if ch == "\t" else 1
        if at + sum(map(cells, word)) > self.width:
            if self.col > 0:
                self.write("\n")
                self.col = 0
            space = ""  # the break replaces the spaces; indentation that leaves no room for the word goes too
        self._emit(space + word)

    def _emit(self, text: str) -> None:
        for ch in text:
            w = 8 - self.col % 8 if ch == "\t" else cells(ch)
            if self.col + w > self.width and self.col > 0:
                self.write("\n")
                self.col = 0
                if ch in " \t":
                    continue
            self.write(ch)
            self.col += w


# ---- reading lines: readline, history, Ctrl-C --------------------------------------------------

def _escape(entry: str) -> str:
    return entry.replace("\\", "\\\\").replace("\n", "\\n")


def _unescape(line: str) -> str:
    out, i = [], 0
    while i < len(line):
        if line[i] == "\\" and i + 1 < len(line):
            out.append("\n" if line[i + 1] == "n" else line[i + 1])
            i += 2
        else:
            out.append(line[i])
            i += 1
    return "".join(out)


class History:
    """The lines typed, one entry a line in $OWNLM_HOME/history (mode 0600; a multi-line entry with
    its newlines escaped), appended as each is typed so that sessions side by side all keep theirs.
    A history that cannot be read or written costs only the history."""

    def __init__(self, path):
        self.path = path
        self.entries: list[str] = []
        self.warned = False
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return
        self.entries = [_unescape(x) for x in lines[-HISTORY_LENGTH:] if x]
        if len(lines) > 2 * HISTORY_LENGTH:  # compact now and then
            with contextlib.suppress(OSError):
                tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write("".join(_escape(e) + "\n" for e in self.entries))
                os.replace(tmp, path)

    def add(self, entry: str) -> bool:
        """Record `entry`; False when it repeats the last one (and is not recorded)."""
        if not entry.strip() or (self.entries and self.entries[-1] == entry):
            return False
        self.entries.append(entry)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as f:
                f.write(_escape(entry) + "\n")
        except OSError as e:
            if not self.warned:
                print(f"(history not saved: {e})", file=sys.stderr)
                self.warned = True
        return True


class _Nudge:
    """Python's readline looks for signals only when its select() is interrupted: a Ctrl-C that
    lands while readline is busy with a key (echoing it) would wait for the next key. Each signal
    also writes a byte to this pipe (signal.set_wakeup_fd); this thread then interrupts the main
    thread's select() once more, with a SIGUSR1 whose handler does nothing, if the SIGINT handler
    has not run shortly after. The pending SIGINT's handler runs then; one that ran meanwhile is
    not run twice (a second SIGINT would be a second Ctrl-C)."""

    def __init__(self):
        self.handled = 0  # the SIGINT handler's runs
        self.active = False  # readline is reading
        self.main = threading.main_thread().ident
        signal.signal(signal.SIGUSR1, lambda signum, frame: None)
        r, w = os.pipe()
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(r,), name="ownlm-ctrl-c", daemon=True).start()

    def _watch(self, r: int) -> None:
        while True:
            for sig in os.read(r, 64):
                if sig != signal.SIGINT:
                    continue
                seen = self.handled
                time.sleep(0.05)
                if self.active and self.handled == seen:
                    signal.pthread_kill(self.main, signal.SIGUSR1)


class LineReader:
    """input() with GNU readline when stdin and stdout are a terminal (line editing, Up/Down
    through the history, bracketed paste: a pasted block arrives as one line with its newlines),
    plain input() otherwise. After a KeyboardInterrupt, `.pending` is the text the line held."""

    def __init__(self, history: History):
        self.history = history
        self.pending = ""
        self.readline = None
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            return
        try:
            import readline
        except ImportError:
            print("(no readline here: no line editing or history recall)", file=sys.stderr)
            return
        if "libedit" not in (readline.__doc__ or ""):  # libedit (macOS builds): editing and recall, no paste mode
            readline.parse_and_bind("set enable-bracketed-paste on")
        readline.set_auto_history(False)
        readline.clear_history()
        for entry in history.entries:
            readline.add_history(entry)
        self.readline = readline
        try:
            self.nudge: _Nudge | None = _Nudge()
        except (OSError, ValueError, RuntimeError):
            self.nudge = None

    def read(self, prompt: str) -> str:
        self.pending = ""
        rl = self.readline
        if rl is None:
            return input(prompt)

        nudge = self.nudge

        def interrupted(signum, frame):  # runs before readline drops the line it held
            self.pending = rl.get_line_buffer()
            if nudge:
                nudge.handled += 1
                nudge.active = False
            raise KeyboardInterrupt

        try:
            old = signal.signal(signal.SIGINT, interrupted)
        except ValueError:  # not the main thread
            return input(prompt)
        try:
            if nudge:
                nudge.active = True
            return input(prompt)
        finally:
            if nudge:
                nudge.active = False
            signal.signal(signal.SIGINT, old)

    def remember(self, entry: str) -> None:
        if self.history.add(entry) and self.readline is not None:
            self.readline.add_history(entry)


def _opens_block(line: str) -> bool:
    """A line that starts a \"\"\" block not closed on the same line."""
    s = line.lstrip()
    if s.startswith("/set") and BLOCK in s:
        s = s[s.index(BLOCK):]
    if not s.startswith(BLOCK):
        return False
    return not (len(s.rstrip()) >= 6 and s.rstrip().endswith(BLOCK))


def unquote(text: str) -> str:
    """The text of a \"\"\" block (the quotes and the newlines next to them dropped)."""
    s = text.strip()
    if s.startswith(BLOCK):
        s = s[3:]
        if s.rstrip().endswith(BLOCK):
            s = s.rstrip()[:-3]
        s = s.strip("\n")
        if "\n" not in s:
            s = s.strip()
    return s


# ---- the chat -----------------------------------------------------------------------------------

class Chat:
    def __init__(self, lm, args, sampling: dict, capper: Callable = capped):
        self.lm, self.args, self.capper = lm, args, capper
        self.sampling = dict(sampling)
        # the system prompt set here (--system, /set system); a preset's own, and its messages, are
        # added by lm.chat_prompt (this one replaces the preset's)
        self.system: str | None = getattr(args, "system", None)
        self.messages: list[dict] = []
        self.verbose = False
        self.wordwrap = True
        self.reader = LineReader(History(home() / "history"))

    def say(self, text: str) -> None:
        print(visible(text), file=sys.stderr, flush=True)  # templates, names, errors: text from files

    # reading
    def _read(self, prompt: str) -> str:
        """A line as read (readable); one that cannot be decoded at all is said and read again."""
        while True:
            try:
                line = self.reader.read(prompt)
            except UnicodeDecodeError:
                self.say("(that line is not UTF-8 text; type it again)")
                continue
            return readable(line)

    def read_entry(self) -> str | None:
        """One entry as typed (a \"\"\" block with its lines); None at Ctrl-D; "" after Ctrl-C."""
        try:
            line = self._read(PROMPT)
        except EOFError:
            print()
            return None
        except KeyboardInterrupt:
            print()
            if not self.reader.pending:
                self.say(LEAVE_HINT)
            return ""
        lines = [line]
        if _opens_block(line):
            while True:
                try:
                    more = self._read(MORE)
                except EOFError:
                    print()
                    return None
                except KeyboardInterrupt:
                    print()
                    return ""  # the block is dropped
                lines.append(more)
                if more.rstrip().endswith(BLOCK):
                    break
        return "\n".join(lines)

    def run(self) -> int:
        self.say(f"ownlm chat with {self.lm.name}. /? for help, Ctrl-D or /bye to leave.")
        cache = prefix_cache.of(self.lm.model)  # made now, with the bound it keeps for the chat
        self.say(cache_line(cache.budget if cache else 0))
        while True:
            entry = self.read_entry()
            if entry is None:
                return 0
            if not entry.strip():
                continue
            self.reader.remember(entry)
            text = entry.strip()
            try:
                if text.startswith("/") and ("\n" not in text or text.split()[0] in COMMANDS):
                    if not self.command(text):
                        return 0
                    continue
                self.answer(unquote(entry) if text.startswith(BLOCK) else entry)
            except OwnlmError as e:
                self.say(f"error: {e.message}" + (f"\nhint: {e.hint}" if e.hint else ""))
            except KeyboardInterrupt:  # Ctrl-C in a command (a /load), or a second one while an answer stops
                print()
                self.say("(stopped)")

    # commands
    def command(self, text: str) -> bool:
        """Run a /command; False when it ends the chat."""
        word, _, rest = text.partition(" ")
        if "\n" in word:
            word, _, tail = word.partition("\n")
            rest = tail + " " + rest
        rest = rest.strip()
        if word in ("/bye", "/exit", "/quit"):
            return False
        if word in ("/?", "/help"):
            self.say(HELP)
        elif word in ("/clear", "/reset"):
            self.messages.clear()
            self.say("(conversation cleared)")
        elif word == "/system":  # the older spelling: set it and start over
            self.system = unquote(rest) or None
            self.messages.clear()
            self.say(f"(system prompt {'set' if self.system else 'cleared'}; conversation cleared)")
        elif word == "/set":
            self.set(rest)
        elif word == "/show":
            self.show(rest)
        elif word == "/save":
            self.save(rest)
        elif word == "/load":
            self.load(rest)
        else:
            self.say(f"unknown command {word}; /? lists them")
        return True

    def set(self, rest: str) -> None:
        what, _, value = rest.partition(" ")
        value = value.strip()
        if what == "system":
            self.system = unquote(value) or None
            self.say("(system prompt set)" if self.system else "(system prompt cleared)")
        elif what == "parameter":
            self.set_parameter(value)
        elif what in ("verbose", "quiet"):
            self.verbose = what == "verbose"
            self.say(f"(stats after each answer {'on' if self.verbose else 'off'})")
        elif what in ("wordwrap", "nowordwrap"):
            self.wordwrap = what == "wordwrap"
            self.say(f"(word wrap {'on' if self.wordwrap else 'off'})")
        else:
            self.say("usage: /set system TEXT | /set parameter NAME VALUE | /set verbose | /set quiet | "
                     "/set wordwrap | /set nowordwrap")

    def set_parameter(self, text: str) -> None:
        name, *values = text.split() or [""]
        if not values or name not in PARAMETERS:
            self.say(f"usage: /set parameter NAME VALUE, NAME one of: {', '.join(PARAMETERS)}")
            return
        key, kind = PARAMETERS[name]
        if key != "stop" and len(values) > 1:
            self.say(f"error: {name} takes one value, not {len(values)}")
            return
        try:
            value: Any = values if key == "stop" else kind(values[0])
        except ValueError:
            self.say(f"error: {name} takes {'an integer' if kind is int else 'a number'}, not {values[0]!r}")
            return
        new = {**self.sampling, key: value}
        self.lm.params(**new)  # an invalid value raises here, and nothing changes
        self.sampling = new
        self.say(f"(set {key} to {' '.join(values) if key == 'stop' else value})")

    def parameters(self) -> dict:
        """The sampling in effect: the model's (a preset's) defaults under those set here."""
        return {**(getattr(self.lm, "defaults", None) or {}), **self.sampling}

    def show(self, what: str) -> None:
        lm = self.lm
        if what == "info":
            facts = getattr(lm, "facts", {}) or {}
            rows = [("model", lm.name)] + [(k.replace("_", " "), facts[k]) for k in (
                "architecture", "parameters", "context_length", "quantization", "format") if facts.get(k)]
            rows.append(("messages", len(self.messages)))
            self.say("\n".join(f"  {k:<16}{v}" for k, v in rows))
        elif what == "system":
            preset = getattr(lm, "system", None)
            self.say(self.system or (f"{preset}\n(the preset's)" if preset else "(no system prompt)"))
        elif what == "parameters":
            params = self.parameters()
            if not params:
                self.say(f"(none set: temperature {lm.params().temperature}, at most {DEFAULT_MAX_TOKENS} tokens "
                         "an answer)")
            for k, v in params.items():
                self.say(f"  {k:<20}{' '.join(map(repr, v)) if k == 'stop' else v}")
        elif what == "template":
            self.say(lm.template.source)
        else:
            self.say("usage: /show info | /show system | /show parameters | /show template")

    def save(self, name: str) -> None:
        if not name or " " in name:
            self.say("usage: /save NAME")
            return
        create = getattr(manage, "create_preset", None)
        if create is None:
            self.say("error: this ownlm cannot save presets")
            return
        # a preset made from a preset keeps what that one had (manage flattens it) under what is set here
        base, adapter = split_adapter(self.lm.name)
        messages = list(getattr(self.lm, "preamble", None) or []) + self.messages
        create(name, base, system=self.system, parameters=dict(self.sampling) or None, adapter=adapter,
               messages=messages if self.messages else None)
        self.say(f"(saved {name}: {base} with {'this' if self.system else 'its'} system prompt, "
                 f"{len(self.parameters())} parameter(s) and {len(messages)} message(s); "
                 f"`ownlm run {name}` starts from here)")

    def load(self, ref: str) -> None:
        if not ref:
            self.say("usage: /load MODEL")
            return
        self.say(f"(loading {ref})")
        args = self.args
        lm = load(ref, device=getattr(args, "device", None), dtype=getattr(args, "dtype", None),
                  quant=getattr(args, "quant", None) or "auto")
        lm.params(**self.sampling)
        self.lm = lm
        self.messages, self.system = [], None  # a preset's own system prompt and messages apply
        self.say(f"(now chatting with {lm.name}; the conversation and the system prompt start over)")

    # answering
    def answer(self, text: str) -> None:
        lm = self.lm
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        msgs = msgs + [{"role": "user", "content": text}]
        t0 = time.perf_counter()
        out = sys.stdout
        tty = out.isatty()
        wrap = WordWrap(out.write, terminal_width(out) if self.wordwrap and tty else None)
        reply: list[str] = []
        stopped = False
        stream = None
        # Ctrl-C raises KeyboardInterrupt wherever Python is; where that is a finalizer or a weakref
        # callback (run by the garbage collector mid-answer) the exception is printed and dropped,
        # and the answer would run on: the handler also leaves a mark, checked after each piece
        pressed: list[bool] = []

        def ctrl_c(signum, frame):
            pressed.append(True)
            raise KeyboardInterrupt

        try:
            previous, installed = signal.signal(signal.SIGINT, ctrl_c), True
        except ValueError:  # not the main thread: Python's own handling
            previous, installed = None, False
        try:
            ids = lm.encode(lm.chat_prompt(msgs))
            stream = lm.stream_ids(ids, **self.capper(lm, ids, self.sampling))
            for piece in stream:
                reply.append(piece)
                wrap.feed(visible(piece) if tty else piece)
                out.flush()
                if pressed:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            stopped = True
        finally:
            if installed:
                signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        wrap.finish()
        out.write("\n")
        out.flush()
        said = "".join(reply)
        if stopped:
            self.say("(stopped)")
        if said or not stopped:
            self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": said}]
        if self.verbose and stream is not None and stream.completion is not None:
            self.stats(stream.completion, time.perf_counter() - t0)

    def stats(self, c, total_s: float) -> None:
        t = c.timings
        u = c.usage
        self.say("\n".join([
            f"total duration:       {total_s:.3f}s",
            f"prompt eval count:    {u['prompt_tokens']} token(s)",
            f"prompt cached:        {t.get('cached_tokens', 0)} token(s) (prefix cache: not computed again)",
            f"prompt eval duration: {t.get('prefill_s', 0.0):.3f}s",
            f"prompt eval rate:     {t.get('prefill_tokens_per_s', 0.0):.2f} tokens/s",
            f"eval count:           {u['completion_tokens']} token(s)",
            f"eval duration:        {t.get('decode_s', 0.0):.3f}s",
            f"eval rate:            {t.get('decode_tokens_per_s', 0.0):.2f} tokens/s"]))


def repl(lm, args, sampling: dict, capper: Callable = capped) -> int:
    """The interactive chat; returns the exit code."""
    return Chat(lm, args, sampling, capper).run()

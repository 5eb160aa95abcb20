"""The chat of `ownlm run MODEL`, driven as a user types it: a real pseudo-terminal (readline, the
window's width, Ctrl-C as the terminal sends it) and the real smollm2 (its answers are words, so
wrapping is visible). Each answer on screen is checked against the same conversation answered
greedily by the one-shot CLI or the Python API."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import stat
import struct
import subprocess
import sys
import termios
import time

import fcntl
import pytest

import ownlm
from conftest import build_hf_model
from ownlm.cli.chat import LEAVE_HINT, WordWrap, _escape, _unescape, readable, unquote, visible

PROMPT = ">>> "
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[=>]|\x1b\][^\x07]*\x07")
GREEDY = ("--temperature", "0")


class Term:
    """`ownlm ARGS` on a pseudo-terminal of `cols` columns; `expect` reads the screen's text (escape
    sequences and carriage returns dropped) until a string shows up."""

    def __init__(self, *args: str, cols: int = 200):
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        env["TERM"] = "xterm"
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its terminal (stdin, stdout, stderr, Ctrl-C)
            try:
                fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 24, cols, 0, 0))
                os.execvpe(sys.executable, [sys.executable, "-m", "ownlm.cli.main", *args], env)
            finally:
                os._exit(127)
        self.raw = b""
        self.text = ""  # the screen's text so far
        self.pos = 0  # how far `expect` has read it
        self.status: int | None = None

    def _pump(self, timeout: float) -> bool:
        r, _, _ = select.select([self.fd], [], [], timeout)
        if not r:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # the child has closed the terminal
            data = b""
        if not data:
            return False
        self.raw += data
        self.text = ANSI.sub("", self.raw.decode("utf-8", "replace")).replace("\r", "")
        return True

    def expect(self, want: str, timeout: float = 90) -> str:
        """The screen's text from the last match up to and including `want`."""
        end = time.monotonic() + timeout
        while want not in self.text[self.pos:]:
            if time.monotonic() > end or not self._pump(min(0.2, max(0.0, end - time.monotonic()))):
                raise AssertionError(f"{want!r} did not show up; the screen after the last match:\n"
                                     f"{self.text[self.pos:]!r}")
        i = self.text.index(want, self.pos) + len(want)
        seen, self.pos = self.text[self.pos:i], i
        return seen

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def ask(self, line: str) -> str:
        """Type a line; its answer as shown (the lines between the echo and the next prompt)."""
        self.send(line + "\r")
        return answer_of(self.expect(PROMPT), ANSI.sub("", line).split("\n")[-1])

    def cmd(self, line: str) -> str:
        """Type a line; what the screen showed up to the next prompt."""
        self.send(line + "\r")
        return self.expect(PROMPT)

    def wait(self, timeout: float = 60) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
                return self.status
            self._pump(0.1)
        raise AssertionError(f"the chat did not end; the screen:\n{self.text[self.pos:]!r}")

    def close(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        os.close(self.fd)


def answer_of(seen: str, last: str = "") -> str:
    """What came between the echo of the input's last line and the prompt (an answer and its newline)."""
    body = seen.removesuffix(PROMPT)
    return body.split(last + "\n", 1)[1].removesuffix("\n") if last + "\n" in body else ""


@pytest.fixture
def term():
    opened: list[Term] = []

    def start(*args: str, cols: int = 200) -> Term:
        t = Term(*args, cols=cols)
        opened.append(t)
        t.expect(PROMPT)
        return t

    yield start
    for t in opened:
        t.close()


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """(the model reference the chat runs, the same model loaded here: the reference answers)."""
    return str(smollm2_gguf), ownlm.load(str(smollm2_gguf))


def one_shot(model: str, *args: str, input: str | None = None) -> dict:
    r = subprocess.run([sys.executable, "-m", "ownlm.cli.main", "run", model, *args, "--json"], capture_output=True,
                       text=True, input=input, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_up_recalls_the_line_before_and_the_history_outlives_the_session(smollm2, term, ownlm_home):
    model, lm = smollm2
    t = term("run", model, *GREEDY, "--max-tokens", "8")
    first = t.ask("Hi there")
    assert first == one_shot(model, "Hi there", *GREEDY, "--max-tokens", "8")["text"].rstrip()
    t.send("\x1b[A")  # Up: the line typed before comes back, and Enter sends it
    t.expect("Hi there")
    second = t.ask("")
    want = lm.chat([user("Hi there"), bot(first), user("Hi there")], temperature=0, max_tokens=8).text
    assert second == want.rstrip()
    t.send("/bye\r")
    assert t.wait() == 0
    history = ownlm_home / "history"
    assert history.read_text().splitlines() == ["Hi there", "/bye"]  # a repeated line is kept once
    assert stat.S_IMODE(history.stat().st_mode) == 0o600

    t = term("run", model, *GREEDY, "--max-tokens", "8")  # a new session: Up, Up reaches the first line
    t.send("\x1b[A")
    t.expect("/bye")
    t.send("\x1b[A")
    t.expect("Hi there")
    assert t.ask("") == first  # a fresh conversation: the same answer as the first time
    t.send("\x04")  # Ctrl-D leaves
    assert t.wait() == 0


def test_a_block_in_triple_quotes_and_a_pasted_block_are_one_message_each(smollm2, term):
    model, lm = smollm2
    t = term("run", model, *GREEDY, "--max-tokens", "8")
    t.send('"""\r')
    t.expect("... ")
    t.send("Name a color.\r")
    t.expect("... ")
    block = t.ask('Answer in one word."""')
    want = lm.chat([user("Name a color.\nAnswer in one word.")], temperature=0, max_tokens=8).text
    assert block == want.rstrip()
    t.send("/clear\r")
    t.expect("(conversation cleared)")
    t.expect(PROMPT)
    # a paste as a terminal with bracketed paste sends it: the newline inside stays in the message
    pasted = t.ask("\x1b[200~Name a fruit.\nAnswer in one word.\x1b[201~")
    want = one_shot(model, *GREEDY, "--max-tokens", "8", input="Name a fruit.\nAnswer in one word.")["text"]
    assert pasted == want.rstrip()
    t.send("/show info\r")
    assert re.search(r"messages\s+2\n", t.expect(PROMPT))  # one question, one answer


def test_answers_wrap_at_word_boundaries_to_the_window(smollm2, term):
    model, _ = smollm2
    t = term("run", model, *GREEDY, "--max-tokens", "60", cols=20)
    shown = t.ask("Tell a story.")
    want = one_shot(model, "Tell a story.", *GREEDY, "--max-tokens", "60")["text"]
    lines = shown.split("\n")
    assert all(len(line) <= 20 for line in lines), lines
    assert len(lines) > 60 * 3 // 20 > want.count("\n") + 1  # wrapped, by the chat
    assert shown.split() == want.split()  # every word whole: wrapping only turned spaces into newlines
    assert max(len(w) for w in want.split()) < 20


def test_ctrl_c_stops_an_answer_and_at_an_empty_prompt_says_how_to_leave(smollm2, term):
    model, _ = smollm2
    t = term("run", model, *GREEDY, "--max-tokens", "1000")
    t.send("Write a very long story about a dragon who learns to cook.\r")
    t.expect("\n")  # the echo
    t.expect(" ")  # the answer has begun
    t.send("\x03")
    seen = t.expect(PROMPT, timeout=30)
    assert "(stopped)" in seen and len(seen.split()) < 300  # far short of 1000 tokens
    t.send("/show info\r")
    assert re.search(r"messages\s+2\n", t.expect(PROMPT))  # the question and the partial answer, as shown
    t.send("\x03")  # at an empty prompt: the way out
    assert LEAVE_HINT in t.expect(PROMPT)
    t.send("half a line")
    t.expect("half a line")
    t.send("\x03")  # with text on the line: the line is dropped, no hint
    assert LEAVE_HINT not in t.expect(PROMPT)
    t.send("/set parameter num_predict 4\r")
    t.expect(PROMPT)
    assert t.ask("Thanks!")  # still alive and answering
    t.send("/bye\r")
    assert t.wait() == 0


def test_set_show_verbose_and_unknown_commands(smollm2, term):
    model, lm = smollm2
    t = term("run", model, "--max-tokens", "8")
    assert "unknown command /foo; /? lists them" in t.cmd("/foo bar")
    assert "(system prompt set)" in t.cmd("/set system You are a pirate. Answer like one.")
    assert "(set temperature to 0.0)" in t.cmd("/set parameter temperature 0")
    assert "(set max_tokens to 6)" in t.cmd("/set parameter num_predict 6")
    assert "error: top_p=5.0 is invalid" in t.cmd("/set parameter top_p 5")
    assert "error: seed takes an integer" in t.cmd("/set parameter seed soon")
    assert "usage: /set parameter NAME VALUE" in t.cmd("/set parameter warmth 3")
    assert "usage: /set parameter NAME VALUE" in t.cmd("/set parameter")  # it used to end the chat
    t.cmd("/set verbose")
    seen = t.cmd("Hello")
    want = one_shot(model, "Hello", "--system", "You are a pirate. Answer like one.", *GREEDY, "--max-tokens", "6")
    assert answer_of(seen).split("\ntotal duration:")[0] == want["text"].rstrip()
    assert want["text"] != lm.chat([user("Hello")], temperature=0, max_tokens=6).text  # the system prompt counts
    assert re.search(rf"prompt eval count:\s+{want['usage']['prompt_tokens']} token", seen)
    assert re.search(rf"\neval count:\s+{want['usage']['completion_tokens']} token", seen)
    assert re.search(r"\neval rate:\s+[0-9.]+ tokens/s", seen) and "total duration:" in seen
    shown = t.cmd("/show parameters")
    assert re.search(r"temperature\s+0.0\n", shown) and re.search(r"max_tokens\s+6\n", shown)
    assert "You are a pirate. Answer like one." in t.cmd("/show system")
    t.cmd("/set quiet")
    assert "eval rate" not in t.cmd("Bye")
    assert "/save NAME" in t.cmd("/?")
    t.send("/bye\r")
    assert t.wait() == 0


def test_load_switches_model_and_starts_over(smollm2, term, tmp_path):
    model, _ = smollm2
    other = build_hf_model(tmp_path / "tiny", "llama")
    t = term("run", model, *GREEDY, "--max-tokens", "6")
    t.ask("Hi there")
    assert "start over" in t.cmd(f"/load {other}")
    shown = t.ask("The quick brown")
    want = ownlm.load(str(other)).chat([user("The quick brown")], temperature=0, max_tokens=6)
    assert shown == visible(want.text).rstrip()
    assert "error: " in t.cmd(f"/load {tmp_path / 'missing'}")  # a failed load keeps the model there was
    assert str(other) in t.cmd("/show info")


def cli(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "ownlm.cli.main", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r


def test_save_makes_a_preset_that_starts_where_the_chat_was(term, tmp_path):
    folder = build_hf_model(tmp_path / "tiny", "llama")
    cli("import", str(folder), "--name", "tiny")
    t = term("run", "tiny", "--max-tokens", "6")
    t.cmd("/set system Be brief.")
    t.cmd("/set parameter temperature 0")
    t.cmd("/set parameter top_k 20")
    first = t.ask("Hi there")
    assert "(saved brief" in t.cmd("/save brief")
    t.send("/bye\r")
    assert t.wait() == 0
    shown = json.loads(cli("show", "brief", "--json").stdout)
    text = json.dumps(shown)
    assert "preset" in text and "Be brief." in text and re.search(r'"top_k": 20\b', text) and "Hi there" in text
    # `ownlm run brief` goes on from there: the system prompt, the parameters and the conversation
    out = json.loads(cli("run", "brief", "Hi again", "--json").stdout)
    lm = ownlm.load("tiny")
    convo = [{"role": "system", "content": "Be brief."}, user("Hi there")]
    answer = lm.chat(convo, temperature=0, top_k=20, max_tokens=6).text
    assert first == visible(answer).rstrip()
    convo += [bot(answer), user("Hi again")]
    assert out["text"] == lm.chat(convo, temperature=0, top_k=20, max_tokens=6).text


def test_word_wrap_and_history_file_units():
    out: list[str] = []
    w = WordWrap(out.append, 12)
    for piece in ["one two thr", "ee four\n  indented wor", "ds here ", "x" * 30, " end"]:
        w.feed(piece)
    w.finish()
    text = "".join(out)
    assert text == ("one two\nthree four\n  indented\nwords here\n" + "x" * 12 + "\n" + "x" * 12 + "\n"
                    + "x" * 6 + " end")
    wide = []
    w = WordWrap(wide.append, 6)
    w.feed("你好 世界")  # two columns a character
    w.finish()
    assert "".join(wide) == "你好\n世界"
    passthrough = []
    w = WordWrap(passthrough.append, None)
    w.feed("a  b\n")
    assert passthrough == ["a  b\n"]
    for entry in ["plain", 'a """\nblock\n"""', "back\\slash\\n"]:
        assert _unescape(_escape(entry)) == entry and "\n" not in _escape(entry)
    assert unquote('"""\nline 1\nline 2\n"""') == "line 1\nline 2" and unquote('""" one line """') == "one line"
    assert visible("a\x1b[2Jb\x07\n\tc") == "a^[[2Jb^G\n\tc"
    assert visible("abc\u202edcba\u2066x\u2069") == "abc\ufffddcba\ufffdx\ufffd"  # no reordering what is shown
    assert readable("caf\udce9") == "caf\ufffd" and readable("a\ud800b") == "a?b"  # stdin's bytes not UTF-8
    assert visible("\U0001F468\u200d\U0001F469 caf\u00e9") == "\U0001F468\u200d\U0001F469 caf\u00e9"  # a ZWJ stays

"""Training data: the formats people already have -> token ids and loss masks, rendered through the
model's own chat template (the code path inference uses), then packed into training rows.

Formats (auto-detected per file from its first row, or forced):
  alpaca             {"instruction", "input"?, "output", "system"?}
  sharegpt           {"conversations": [{"from": "human"|"gpt"|"system"|..., "value"}]}
  messages           {"messages": [{"role", "content"}]}            (OpenAI chat fine-tuning)
  prompt-completion  {"prompt", "completion"}                      (one user turn, one answer)
  text               {"text"} rows, or a .txt file                 (continued pretraining)
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..errors import BadRequest, ChatTemplateError, OwnlmError
from ..text.chat import ChatTemplate
from ..text.tokenizer import TextTokenizer

FORMATS = ("alpaca", "sharegpt", "messages", "prompt-completion", "text")
TRAIN_ON = ("assistant", "all", "last")
MAX_LINE = 32 << 20  # one JSONL row
MAX_FILE = 1 << 30  # a .json array or .txt file read whole
MAX_MESSAGES = 512  # one conversation: locating its assistant turns renders a prefix per turn
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system", "tool": "tool"}


class DataError(BadRequest):
    """A row of the user's data is wrong: the message starts with `file:line:`."""


@dataclass
class Example:
    ids: list[int]
    mask: list[bool]  # True where the token is a training target
    where: str = ""


@dataclass
class Dataset:
    examples: list[Example]
    format: str
    skipped: list[str] = field(default_factory=list)  # "file:line: what is wrong" of dropped rows
    truncated: int = 0  # chat examples longer than the row length, cut (reported, never silent)

    @property
    def tokens(self) -> int:
        return sum(len(e.ids) for e in self.examples)


# -- reading ----------------------------------------------------------------------------------
def read_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, row) for each row of a .jsonl / .json / .txt file; bad JSON raises with file:line."""
    path = Path(path)
    if not path.is_file():
        raise BadRequest(f"{path}: no such data file")
    name = path.name
    if path.suffix in (".txt", ".md"):
        if path.stat().st_size > MAX_FILE:
            raise BadRequest(f"{path}: larger than {MAX_FILE >> 20} MB", "split it, or use JSONL with a text field")
        text = _read_text(path)
        if not text.strip():
            raise DataError(f"{name}: the file is empty")
        yield f"{name}:1", {"text": text}
        return
    if path.suffix == ".json":
        if path.stat().st_size > MAX_FILE:
            raise BadRequest(f"{path}: larger than {MAX_FILE >> 20} MB", "use JSONL (one row per line) for large data")
        text = _read_text(path)
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{e.lineno}: invalid JSON ({e.msg})") from None
        except (ValueError, RecursionError) as e:  # a number of thousands of digits, nesting past the stack
            raise DataError(f"{name}: invalid JSON ({_why(e)})") from None
        if not isinstance(rows, list):
            raise DataError(f"{name}:1: a .json data file must hold an array of rows")
        lines = _item_lines(text, len(rows))
        for i, row in enumerate(rows):
            yield f"{name}:{lines[i]}", row
        return
    if path.suffix not in (".jsonl", ".ndjson"):
        raise BadRequest(f"{path}: unknown data file type {path.suffix!r}", "use .jsonl, .json or .txt")
    with open(path, "rb") as f:  # every line a row of its own: a bad one is reported (or skipped) alone
        for lineno, raw in enumerate(iter(lambda: f.readline(MAX_LINE + 1), b""), 1):
            if len(raw) > MAX_LINE:
                while raw and not raw.endswith(b"\n"):  # the rest of the line, a piece at a time
                    raw = f.readline(MAX_LINE + 1)
                yield f"{name}:{lineno}", _Bad(f"line longer than {MAX_LINE >> 20} MB")
                continue
            try:
                line = raw.decode("utf-8-sig").strip()  # a byte order mark at the start is not text
            except UnicodeDecodeError:
                yield f"{name}:{lineno}", _Bad("not UTF-8 text")
                continue
            if not line:
                continue
            try:
                yield f"{name}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{name}:{lineno}", _Bad(f"invalid JSON ({e.msg} at column {e.colno})")
            except (ValueError, RecursionError) as e:
                yield f"{name}:{lineno}", _Bad(f"invalid JSON ({_why(e)})")


def _why(e: BaseException) -> str:
    return "nested too deeply" if isinstance(e, RecursionError) else " ".join(str(e).split())[:120]


class _Bad:
    """A row that could not be parsed; reported (or skipped) like any other bad row."""

    def __init__(self, why: str):
        self.why = why

def convert_rows(path: str | Path, convert: Callable[[str, Any], Any], skip_bad: bool) -> tuple[list, list[str]]:
    """convert(where, row) of every row of the file: a row it refuses (ValueError, a template or
    request error) stops the run as `file:line: what is wrong`, or with skip_bad is dropped and
    listed; no usable row at all is an error. Returns (converted rows, skipped messages)."""
    out, skipped = [], []
    for where, row in read_rows(Path(path)):
        try:
            out.append(convert(where, row))
        except (ValueError, ChatTemplateError, BadRequest) as e:
            msg = f"{where}: {e.message if isinstance(e, OwnlmError) else e}"
            if not skip_bad:
                raise DataError(msg, "fix the row, or pass --skip-bad to drop bad rows") from None
            skipped.append(msg)
    if not out:
        raise DataError(f"{Path(path).name}: no usable rows" + (f" ({len(skipped)} bad)" if skipped else ""))
    return out, skipped



def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path.name}:1: not UTF-8 text") from None


def _item_lines(text: str, n: int) -> list[int]:
    """The line each top-level array item starts on (for file:line messages)."""
    dec = json.JSONDecoder()
    lines, i = [], text.index("[") + 1
    line, counted = 1, 0  # the line at `counted`: newlines are counted once, as the items go by
    while len(lines) < n:
        while text[i] in " \t\r\n,":
            i += 1
        line += text.count("\n", counted, i)
        counted = i
        lines.append(line)
        _, i = dec.raw_decode(text, i)
    return lines


# -- formats -> conversations -----------------------------------------------------------------
def detect(row: Any) -> str:
    if isinstance(row, dict):
        if "messages" in row:
            return "messages"
        if "conversations" in row:
            return "sharegpt"
        if "instruction" in row and "output" in row:
            return "alpaca"
        if "prompt" in row and "completion" in row:
            return "prompt-completion"
        if "text" in row:
            return "text"
    keys = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
    raise DataError(f"cannot tell the data format from a row with {keys}",
                    "rows need instruction/output (alpaca), conversations (sharegpt), messages, prompt/completion "
                    "or text; or pass --format")


def _str(row: dict, key: str, required: bool = True) -> str:
    v = row.get(key)
    if v is None and not required:
        return ""
    if not isinstance(v, str):
        raise ValueError(f"{key!r} must be a string" if key in row else f"{key!r} is missing")
    return v


def to_conversation(row: Any, fmt: str) -> list[dict[str, str]] | str:
    """The messages of a chat row, or the text of a text row. Raises ValueError for a bad row."""
    if isinstance(row, _Bad):
        raise ValueError(row.why)
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, not {type(row).__name__}")
    if fmt == "text":
        text = _str(row, "text")
        if not text:
            raise ValueError("'text' is empty")
        return text
    if fmt == "alpaca":
        prompt = _str(row, "instruction")
        extra = _str(row, "input", required=False)
        msgs = [{"role": "system", "content": _str(row, "system")}] if row.get("system") else []
        return msgs + [{"role": "user", "content": f"{prompt}\n\n{extra}" if extra else prompt},
                       {"role": "assistant", "content": _str(row, "output")}]
    if fmt == "prompt-completion":
        return [{"role": "user", "content": _str(row, "prompt")},
                {"role": "assistant", "content": _str(row, "completion")}]
    if fmt == "sharegpt":
        turns = row.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise ValueError("'conversations' must be a non-empty list")
        msgs = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or not isinstance(t.get("value"), str):
                raise ValueError(f"conversations[{i}] needs a string 'value'")
            role = SHAREGPT_ROLES.get(str(t.get("from", "")).lower())
            if role is None:
                raise ValueError(f"conversations[{i}].from {t.get('from')!r} is not one of human, gpt, system")
            msgs.append({"role": role, "content": t["value"]})
        return msgs
    if fmt == "messages":
        msgs = row.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
                raise ValueError(f"messages[{i}].role must be system, user, assistant or tool")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}].content must be a string")
            out.append({"role": m["role"], "content": m["content"]})
        return out
    raise BadRequest(f"unknown data format {fmt!r}", f"use one of: {', '.join(FORMATS)}")


# -- conversations -> token ids and masks -----------------------------------------------------
class Encoder:
    """Renders and tokenizes rows the way the model sees them at inference."""

    def __init__(self, tokenizer: TextTokenizer, template: ChatTemplate, train_on: str = "assistant"):
        if train_on not in TRAIN_ON:
            raise BadRequest(f"unknown --train-on {train_on!r}", f"use one of: {', '.join(TRAIN_ON)}")
        self.tok, self.template, self.train_on = tokenizer, template, train_on

    def _spans(self, msgs: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character span of each assistant turn (its text and
        the template's end-of-turn marker), found by rendering growing prefixes."""
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError("the conversation has no assistant turn to learn from")
        if len(msgs) > MAX_MESSAGES:
            raise ValueError(f"the conversation has {len(msgs)} messages, more than {MAX_MESSAGES}")
        full = self.template.render(msgs, add_generation_prompt=False)
        spans = []
        for k, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = self.template.render(msgs[:k], add_generation_prompt=True) if k else ""
            through = self.template.render(msgs[:k + 1], add_generation_prompt=False)
            if not (through.startswith(before) and full.startswith(through)):
                raise ValueError("the chat template renders this conversation differently turn by turn, so its "
                                 "assistant turns cannot be located (use --train-on all)")
            spans.append((len(before), len(through)))
        return full, spans

    def encode(self, conv: list[dict[str, str]] | str, where: str = "") -> Example:
        if isinstance(conv, str):  # raw text: every token is a target, EOS taught at the end
            text, spans = conv, [(0, len(conv))]
        else:
            text, spans = self._spans(conv)
            if self.train_on == "all":
                spans = [(0, len(text))]
            elif self.train_on == "last":
                spans = spans[-1:]
        enc = self.tok.tk.encode(text, add_special_tokens=False)
        ids = list(enc.ids)
        mask = [any(s <= start < e for s, e in spans) for start, _ in enc.offsets]
        if self.tok.add_bos and self.tok.bos_id is not None and (not ids or ids[0] != self.tok.bos_id):
            ids.insert(0, self.tok.bos_id)
            mask.insert(0, False)
        eos = self.tok.eos_ids
        if eos and (isinstance(conv, str) or not any(m and t in eos for t, m in zip(ids, mask))):
            # no stop token among the targets: teach one, or the tuned model never stops
            ids.append(eos[0])
            mask.append(True)
        if not any(mask[1:]):
            raise ValueError("no token to learn from after rendering")
        return Example(ids, mask, where)


def load_dataset(path: str | Path, encoder: Encoder, fmt: str = "auto", skip_bad: bool = False) -> Dataset:
    """Every row of the file as an Example; the first bad row raises `file:line: what is wrong`
    unless skip_bad, which drops bad rows and lists them in Dataset.skipped."""
    if fmt != "auto" and fmt not in FORMATS:
        raise BadRequest(f"unknown --format {fmt!r}", f"use auto or one of: {', '.join(FORMATS)}")

    def convert(where: str, row: Any) -> Example:
        nonlocal fmt
        if fmt == "auto":  # the first well-formed row decides
            fmt = detect(row) if not isinstance(row, _Bad) else fmt
        return encoder.encode(to_conversation(row, fmt), where)

    examples, skipped = convert_rows(path, convert, skip_bad)
    return Dataset(examples, fmt if fmt != "auto" else "text", skipped)


def split(data: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Hold out `fraction` of the examples (at least one) for validation, chosen by the seed."""
    if not fraction:
        return data, None
    if not 0 < fraction < 1:
        raise BadRequest(f"--val-split {fraction} must be between 0 and 1")
    n = len(data.examples)
    k = max(1, round(n * fraction))
    if k >= n:
        raise BadRequest(f"--val-split {fraction} leaves no training example out of {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:k])
    train = [e for i, e in enumerate(data.examples) if i not in held]
    val = [e for i, e in enumerate(data.examples) if i in held]
    return Dataset(train, data.format, data.skipped), Dataset(val, data.format)


# -- packing ----------------------------------------------------------------------------------
@dataclass
class Row:
    """One training sequence: several examples side by side, each attending only to itself."""

    ids: list[int]
    mask: list[bool]
    pos: list[int]
    seg: list[int]


def pack(data: Dataset, seq_len: int, pack_rows: bool = True, seed: int = 0) -> list[Row]:
    """Examples (shuffled by the seed) into rows of at most seq_len tokens. Text longer than a row
    continues in the next row; a chat example longer than a row is cut (counted in
    data.truncated). Without packing, one example per row."""
    order = list(range(len(data.examples)))
    random.Random(seed).shuffle(order)
    pieces: list[Example] = []
    data.truncated = 0
    for i in order:
        e = data.examples[i]
        if len(e.ids) <= seq_len:
            pieces.append(e)
        elif data.format == "text":
            for s in range(0, len(e.ids), seq_len):
                if any(e.mask[s + 1:s + seq_len]):
                    pieces.append(Example(e.ids[s:s + seq_len], e.mask[s:s + seq_len], e.where))
        else:
            data.truncated += 1
            pieces.append(Example(e.ids[:seq_len], e.mask[:seq_len], e.where))
    rows: list[Row] = []
    cur = Row([], [], [], [])
    for e in pieces:
        if cur.ids and (not pack_rows or len(cur.ids) + len(e.ids) > seq_len):
            rows.append(cur)
            cur = Row([], [], [], [])
        seg = cur.seg[-1] + 1 if cur.seg else 0
        cur.ids += e.ids
        cur.mask += e.mask
        cur.pos += range(len(e.ids))
        cur.seg += [seg] * len(e.ids)
    if cur.ids:
        rows.append(cur)
    return rows


def predicts(row: Row) -> list[bool]:
    """Per position: does the next token count as a training target (a target of the same example)?"""
    return [row.mask[k + 1] and row.seg[k + 1] == row.seg[k] for k in range(len(row.ids) - 1)] + [False]


def collate(rows: Sequence[Row], pad_id: int = 0):
    """(tokens, targets, pos, seg) tensors of shape (B, T), T the longest row; targets[t] is the
    next token where it is a training target, else -100."""
    import torch

    T = max(len(r.ids) for r in rows)
    B = len(rows)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), -100, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.ids)
        ids = torch.tensor(r.ids)
        tokens[b, :n] = ids
        pos[b, :n] = torch.tensor(r.pos)
        seg[b, :n] = torch.tensor(r.seg)
        nxt = torch.tensor(predicts(r))
        targets[b, :n] = torch.where(nxt, torch.cat([ids[1:], ids[:1]]), torch.tensor(-100))
    return tokens, targets, pos, seg


# -- preference data --------------------------------------------------------------------------
@dataclass
class Pair:
    """A prompt with a chosen and a rejected completion, each rendered whole; targets are the
    completion's tokens only. ref: the reference log-probabilities (chosen, rejected), once computed."""

    chosen: Row
    rejected: Row
    where: str = ""
    ref: tuple[float, float] | None = None


@dataclass
class Graded:
    """A KTO row: a prompt and one completion labelled desirable (True) or undesirable."""

    row: Row
    label: bool
    where: str = ""
    ref: float | None = None


def _messages(v: Any, what: str) -> list[dict[str, str]]:
    if not isinstance(v, list) or not v:
        raise ValueError(f"{what!r} must be a string or a non-empty list of messages")
    return to_conversation({"messages": v}, "messages")  # type: ignore[return-value]


def _hh(text: str) -> list[dict[str, str]]:
    """Anthropic HH's "\\n\\nHuman: ...\\n\\nAssistant: ..." transcript as messages."""
    import re

    text = text if text.startswith("\n\n") else "\n\n" + text.lstrip("\n")
    parts = re.split(r"\n\n(Human|Assistant): ", text)
    msgs = [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
            for who, body in zip(parts[1::2], parts[2::2])]
    if not msgs or parts[0].strip():
        raise ValueError("not a \\n\\nHuman: / \\n\\nAssistant: transcript")
    return msgs


def _completion(v: Any, key: str) -> list[dict[str, str]]:
    if isinstance(v, str):
        return [{"role": "assistant", "content": v}]
    msgs = _messages(v, key)
    if [m["role"] for m in msgs] != ["assistant"]:
        raise ValueError(f"{key!r} must be one assistant message after the prompt")
    return msgs


def to_preference(row: Any, kind: str) -> tuple[list[dict[str, str]], list[list[dict[str, str]]], bool | None]:
    """(prompt messages, completions as message lists, KTO label or None) of a preference row:
    {"prompt" | "messages", "chosen", "rejected"} (strings or messages; without a prompt, the
    conversations' shared beginning is the prompt, TRL's and Anthropic HH's layouts), or for KTO
    {"prompt" | "messages", "completion", "label": true|false}."""
    if isinstance(row, _Bad):
        raise ValueError(row.why)
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, not {type(row).__name__}")
    if "prompt" in row:
        p = row["prompt"]
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else _messages(p, "prompt")
    elif "messages" in row:
        prompt = _messages(row["messages"], "messages")
    else:
        prompt = []
    if kind == "kto":
        if not isinstance(row.get("label"), bool):
            raise ValueError("'label' must be true or false" if "label" in row else "'label' is missing")
        if "completion" not in row:
            raise ValueError("'completion' is missing")
        if not prompt:
            raise ValueError("'prompt' or 'messages' is missing")
        return prompt, [_completion(row["completion"], "completion")], row["label"]
    for key in ("chosen", "rejected"):
        if key not in row:
            raise ValueError(f"{key!r} is missing")
    c, r = row["chosen"], row["rejected"]
    if not prompt:  # implicit prompt: the shared beginning of two whole conversations
        c, r = (_hh(c), _hh(r)) if isinstance(c, str) and isinstance(r, str) else (
            _messages(c, "chosen"), _messages(r, "rejected"))
        k = 0
        while k < min(len(c), len(r)) - 1 and c[k] == r[k]:
            k += 1
        prompt, c, r = c[:k], c[k:], r[k:]
        if not prompt:
            raise ValueError("no prompt: give 'prompt' or 'messages', or conversations that share their beginning")
    return prompt, [_completion(c, "chosen"), _completion(r, "rejected")], None


def _row(e: Example) -> Row:
    return Row(e.ids, e.mask, list(range(len(e.ids))), [0] * len(e.ids))


@dataclass
class Preferences:
    items: list  # Pair or Graded
    format: str
    skipped: list[str] = field(default_factory=list)
    truncated: int = 0

    @property
    def examples(self) -> list:
        return self.items

    @property
    def tokens(self) -> int:
        return sum(len(r.ids) for i in self.items
                   for r in ((i.chosen, i.rejected) if isinstance(i, Pair) else (i.row,)))


def load_preferences(path: str | Path, encoder: Encoder, kind: str, seq_len: int,
                     skip_bad: bool = False) -> Preferences:
    """Pairs (kind "pairs") or KTO rows (kind "kto"), each completion rendered after its prompt
    through the chat template, targets its tokens (and end of turn) only. A sequence longer than
    seq_len is cut at the end (counted); bad rows raise `file:line: ...` unless skip_bad."""
    last = Encoder(encoder.tok, encoder.template, "last")
    truncated = 0

    def convert(where: str, row: Any) -> Pair | Graded:
        nonlocal truncated
        prompt, completions, label = to_preference(row, kind)
        rows = []
        for comp in completions:
            e = last.encode(prompt + comp, where)
            if len(e.ids) > seq_len:
                truncated += 1
                e = Example(e.ids[:seq_len], e.mask[:seq_len], where)
                if not any(e.mask[1:]):
                    raise ValueError(f"the prompt alone fills --seq-len {seq_len}")
            rows.append(_row(e))
        return Pair(rows[0], rows[1], where) if kind != "kto" else Graded(rows[0], bool(label), where)

    items, skipped = convert_rows(path, convert, skip_bad)
    return Preferences(items, "kto" if kind == "kto" else "pairs", skipped, truncated)

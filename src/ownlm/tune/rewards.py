"""Rewards for GRPO: functions `(prompt, completion, row) -> float`, several per run, each with a
weight; the run's reward is their weighted sum.

A spec is `NAME[=WEIGHT]`, NAME a built-in or a function of yours:

  exact        1 if the completion, stripped, equals row["answer"], stripped: the test `ownlm eval`
               scores as a generation task's exact_match (the shipped `arithmetic` task), else 0
  regex        1 if row["pattern"], or the --reward-pattern regex where a row has none, matches in the
               completion (stripped), else 0: re.search, as `ownlm eval` scores a {prompt, pattern}
               row's pattern_match (anchor it with ^...$ to match the whole completion)
  json-schema  1 if the completion (stripped, a ```json fence removed) parses as JSON and validates
               against row["schema"], else 0; validated with llguidance, the library the engine's
               constrained decoding uses
  length       max(0, 1 - |len(completion) - target| / target), lengths in characters; target
               row["target_length"], or --target-length where a row has none
  MODULE:FUNCTION or path/to/file.py:FUNCTION   your function, imported (a module from the current
               directory or the Python path, or a file)

WEIGHT is a number after the last `=` (default 1).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import math
import numbers
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import BadRequest, OwnlmError

BUILTIN = ("exact", "regex", "json-schema", "length")
RewardFn = Callable[[str, str, dict], float]


class RewardError(OwnlmError):
    """A reward function failed or returned something that is not a number."""

    exit_code = 2


@dataclass
class Reward:
    name: str  # a built-in's name, MODULE:FUNCTION, or FILE.py:FUNCTION without the file's folder
    weight: float
    fn: RewardFn
    needs: str | None = None  # the row field a built-in reads (checked when the data is read)

    def __call__(self, prompt: str, completion: str, row: dict, where: str) -> float:
        try:
            v = self.fn(prompt, completion, row)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's code: any failure is reported with the row
            raise RewardError(f"reward {self.name} failed on {where}: {type(e).__name__}: {e}",
                              "fix the reward function (it is called as f(prompt, completion, row))") from e
        if isinstance(v, bool):
            v = float(v)
        elif isinstance(v, numbers.Real) or (hasattr(v, "numel") and hasattr(v, "item") and v.numel() == 1):
            v = float(v)  # a NumPy or PyTorch scalar
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise RewardError(f"reward {self.name} returned {v!r} on {where}, not a finite number",
                              "a reward function returns a float")
        return float(v)


# -- built-ins ----------------------------------------------------------------------------------
def exact(prompt: str, completion: str, row: dict) -> float:
    return float(completion.strip() == str(row["answer"]).strip())


@functools.lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def regex_reward(default: str | None) -> RewardFn:
    def regex(prompt: str, completion: str, row: dict) -> float:
        pattern = row.get("pattern", default)
        return float(_regex(pattern).search(completion.strip()) is not None)
    return regex


def length_reward(default: int | None) -> RewardFn:
    def length(prompt: str, completion: str, row: dict) -> float:
        target = row.get("target_length", default)
        return max(0.0, 1.0 - abs(len(completion) - target) / target)
    return length


class _ByteTokens:
    """One token per byte (and an end token): llguidance then checks a text, not a model's tokens."""

    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([i]) for i in range(256)] + [b"<end>"]
    special_token_ids = [256]

    def __call__(self, s: bytes) -> list[int]:
        return list(s)


@functools.lru_cache(maxsize=1)
def _byte_tokenizer():
    import llguidance

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteTokens()))


@functools.lru_cache(maxsize=256)
def _schema_grammar(schema_json: str) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(json.loads(schema_json),
                                                          defaults={"whitespace_flexible": True})


def check_schema(schema: Any) -> None:
    """Raises ValueError for a schema the validator cannot use."""
    if not isinstance(schema, dict):
        raise ValueError("'schema' must be a JSON object (a JSON schema)")
    import llguidance

    try:
        err = llguidance.LLMatcher.validate_grammar(_schema_grammar(json.dumps(schema, sort_keys=True)),
                                                    _byte_tokenizer())
    except (ValueError, TypeError, RuntimeError) as e:
        err = str(e)
    if err and not err.startswith("WARNING"):
        raise ValueError(f"'schema' is not a usable JSON schema: {' '.join(err.split())[:200]}")


def _unfence(text: str) -> str:
    text = text.strip()
    m = re.fullmatch(r"```(?:json)?\s*\n?(.*?)\n?```", text, re.DOTALL)
    return m.group(1).strip() if m else text


def json_schema(prompt: str, completion: str, row: dict) -> float:
    import llguidance

    try:
        value = json.loads(_unfence(completion))
    except ValueError:
        return 0.0
    matcher = llguidance.LLMatcher(_byte_tokenizer(), _schema_grammar(json.dumps(row["schema"], sort_keys=True)),
                                   log_level=0)
    text = json.dumps(value, ensure_ascii=False).encode("utf-8")
    return float(matcher.consume_tokens(list(text)) and matcher.is_accepting())


# -- specs --------------------------------------------------------------------------------------
def _split_weight(spec: str) -> tuple[str, float]:
    if "=" not in spec:
        return spec.strip(), 1.0
    name, _, w = spec.rpartition("=")
    try:
        weight = float(w)
    except ValueError:
        raise BadRequest(f"--reward {spec!r}: the weight after '=' must be a number",
                         "write NAME or NAME=WEIGHT, e.g. --reward exact=1.0") from None
    if not math.isfinite(weight):
        raise BadRequest(f"--reward {spec!r}: the weight must be a finite number")
    return name.strip(), weight


def _load_function(name: str) -> RewardFn:
    where, sep, attr = name.rpartition(":")
    if not sep or not where or not attr.isidentifier():
        raise BadRequest(f"--reward {name!r} is neither a built-in reward nor MODULE:FUNCTION",
                         f"built-ins: {', '.join(BUILTIN)}; or a function of yours, my_rewards:score or "
                         "path/to/rewards.py:score")
    if where.endswith(".py") or os.sep in where or "/" in where:
        path = Path(where).expanduser()
        if not path.is_file():
            raise BadRequest(f"--reward {name!r}: no such file {path}")
        spec = importlib.util.spec_from_file_location(f"ownlm_reward_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise BadRequest(f"--reward {name!r}: {path} cannot be imported as Python")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - the user's file
            raise BadRequest(f"--reward {name!r}: importing {path} failed: {type(e).__name__}: {e}") from None
    else:
        added = os.getcwd() not in sys.path
        if added:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(where)
        except Exception as e:  # noqa: BLE001 - the user's module
            raise BadRequest(f"--reward {name!r}: importing module {where!r} failed: {type(e).__name__}: {e}",
                             "give a module on the Python path or in the current directory, or a file "
                             "path/to/rewards.py:FUNCTION") from None
        finally:
            if added:
                sys.path.remove(os.getcwd())
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise BadRequest(f"--reward {name!r}: {where} has no function {attr!r}")
    try:
        inspect.signature(fn).bind("prompt", "completion", {})
    except TypeError:
        raise BadRequest(f"--reward {name!r}: {attr} must take (prompt, completion, row)") from None
    except ValueError:
        pass  # a builtin without a signature: called as it is
    return fn


def parse(specs: tuple[str, ...] | list[str], pattern: str | None = None,
          target_length: int | None = None) -> list[Reward]:
    """The rewards of a run, every spec checked and every custom function imported: a bad spec is a
    BadRequest here, before any model is loaded."""
    if not specs:
        raise BadRequest("--method grpo needs at least one --reward",
                         f"a built-in ({', '.join(BUILTIN)}) or MODULE:FUNCTION, e.g. --reward exact")
    if pattern is not None:
        try:
            _regex(pattern)
        except re.error as e:
            raise BadRequest(f"--reward-pattern {pattern!r} is not a regular expression: {e}") from None
    if target_length is not None and (not isinstance(target_length, int) or target_length < 1):
        raise BadRequest(f"--target-length {target_length!r} must be a positive integer")
    out: list[Reward] = []
    seen: set[str] = set()
    for spec in specs:
        name, weight = _split_weight(spec)
        if name in seen:
            raise BadRequest(f"--reward {name} is given twice", "give each reward once, with its weight")
        seen.add(name)
        if name == "exact":
            out.append(Reward(name, weight, exact, "answer"))
        elif name == "regex":
            out.append(Reward(name, weight, regex_reward(pattern), None if pattern is not None else "pattern"))
        elif name == "json-schema":
            out.append(Reward(name, weight, json_schema, "schema"))
        elif name == "length":
            out.append(Reward(name, weight, length_reward(target_length),
                              None if target_length is not None else "target_length"))
        else:
            where, _, attr = name.rpartition(":")
            label = f"{Path(where).name}:{attr}" if where.endswith(".py") else name  # a file: its name, not path
            out.append(Reward(label, weight, _load_function(name)))
    return out


def check_row(rewards: list[Reward], row: dict) -> None:
    """Raises ValueError when a built-in reward cannot score this row (read at load: file:line)."""
    for r in rewards:
        if r.needs and r.needs not in row:
            hint = {"pattern": " (or pass --reward-pattern)", "target_length": " (or pass --target-length)"}
            raise ValueError(f"reward {r.name} needs {r.needs!r} in every row{hint.get(r.needs, '')}")
    for r in rewards:
        if r.name == "exact" and not isinstance(row["answer"], (str, int, float)):
            raise ValueError("'answer' must be a string or a number")
        if r.name == "regex" and "pattern" in row:
            if not isinstance(row["pattern"], str):
                raise ValueError("'pattern' must be a string")
            try:
                _regex(row["pattern"])
            except re.error as e:
                raise ValueError(f"'pattern' is not a regular expression: {e}") from None
        if r.name == "json-schema":
            check_schema(row["schema"])
        if r.name == "length" and "target_length" in row:
            t = row["target_length"]
            if not isinstance(t, int) or isinstance(t, bool) or t < 1:
                raise ValueError("'target_length' must be a positive integer")

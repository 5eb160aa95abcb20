"""JSONL tasks: multiple choice scored by log-likelihood as lm-evaluation-harness does (acc, and
acc_norm over the choices' lengths in characters), and generation scored by exact match / contains with the
model's chat template applied, or by a regular expression the answer must match (a style or format).
A row's fields say its kind: {context, choices, gold}, {prompt, answer} or {prompt, pattern}."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import BadRequest

MAX_ROWS = 100_000
SHIPPED = Path(__file__).parent / "data"  # small tasks written for ownlm: --task NAME


def shipped_tasks() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SHIPPED.iterdir()) if p.suffix in (".txt", ".jsonl")}


def find_task(task: str) -> Path:
    """A task file: a path, or the name of a task that ships with ownlm."""
    path = Path(task)
    if path.suffix in (".txt", ".jsonl"):
        return path
    shipped = shipped_tasks()
    if task in shipped:
        return shipped[task]
    raise BadRequest(f"unknown task {task!r}: give a .txt file (perplexity), a .jsonl file (multiple choice or "
                     f"generation), or a shipped task: {', '.join(shipped)}")


def read_task(path: Path) -> tuple[str, list[dict[str, Any]]]:
    """(kind, rows) of a JSONL task; a bad row is an error naming file:line."""
    rows, kinds = [], set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BadRequest(f"cannot read task {path}: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise BadRequest(f"{where}: not JSON ({e})") from None
        if not isinstance(row, dict):
            raise BadRequest(f"{where}: each line must be a JSON object")
        if "choices" in row:
            ok = (isinstance(row.get("context"), str) and isinstance(row["choices"], list) and len(row["choices"]) >= 2
                  and all(isinstance(c, str) and c for c in row["choices"]) and isinstance(row.get("gold"), int)
                  and not isinstance(row.get("gold"), bool) and 0 <= row["gold"] < len(row["choices"]))
            if not ok:
                raise BadRequest(f"{where}: a multiple-choice row needs context (text), choices (2+ non-empty texts) "
                                 "and gold (the index of the right choice)")
            kinds.add("multiple_choice")
        elif "answer" in row or "pattern" in row:
            if not (isinstance(row.get("prompt"), str) and row["prompt"]
                    and all(isinstance(row.get(k, ""), str) for k in ("answer", "pattern"))):
                raise BadRequest(f"{where}: a generation row needs prompt (non-empty text) and answer or pattern "
                                 "(text)")
            if "pattern" in row:
                try:
                    re.compile(row["pattern"])
                except re.error as e:
                    raise BadRequest(f"{where}: pattern is not a regular expression ({e})") from None
            kinds.add("generation")
        else:
            raise BadRequest(f"{where}: a row needs either context/choices/gold, prompt/answer or prompt/pattern")
        rows.append(row)
        if len(rows) > MAX_ROWS:
            raise BadRequest(f"{path}: more than {MAX_ROWS} rows")
    if not rows:
        raise BadRequest(f"{path}: the task has no rows")
    if len(kinds) > 1:
        raise BadRequest(f"{path}: mixes multiple-choice and generation rows")
    return kinds.pop(), rows


@torch.inference_mode()
def continuation_logprob(lm, context: str, continuation: str) -> float:
    """Sum of log-probabilities of `continuation`'s tokens after `context` (lm-evaluation-harness's
    split: spaces ending the context move to the continuation, which is then what encoding context
    + continuation adds after the context)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx_ids = lm.encode(context)
    whole = lm.encode(context + continuation)
    cont = whole[len(ctx_ids):]
    if not cont:
        raise BadRequest(f"choice {continuation!r} adds no tokens after its context")
    ids = whole[-(lm.config.context_length + 1):]  # keep the end if it is longer than the context
    logits = lm.model(torch.tensor([ids[:-1]], device=lm.model.device))[0].float()
    lp = torch.log_softmax(logits, -1)[-len(cont):]
    return float(lp.gather(1, torch.tensor(cont, device=lp.device)[:, None]).double().sum())


def normalized_pick(scores: list[float], choices: list[str]) -> int:
    """acc_norm's pick, as lm-evaluation-harness computes it (api/task.py, `completion_len`): the
    choice with the best log-likelihood per character of the choice's text (`len(choice)`: characters,
    not bytes and not tokens, and not the space before it, lm-eval's target delimiter, which ownlm's
    choices carry); the first such choice on a tie, as numpy's argmax."""
    norm = [s / max(1, len(c.removeprefix(" "))) for s, c in zip(scores, choices)]
    return max(range(len(norm)), key=norm.__getitem__)


def multiple_choice(lm, rows: list[dict[str, Any]], progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    acc = acc_norm = 0
    for row in rows:
        scores = [continuation_logprob(lm, row["context"], c) for c in row["choices"]]
        acc += max(range(len(scores)), key=scores.__getitem__) == row["gold"]
        acc_norm += normalized_pick(scores, row["choices"]) == row["gold"]
        if progress:
            progress(1)
    return {"kind": "multiple_choice", "rows": len(rows), "acc": acc / len(rows), "acc_norm": acc_norm / len(rows)}


def generation(lm, rows: list[dict[str, Any]], max_tokens: int = 64,
               progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Greedy answers scored by exact match and containment of `answer` (over the rows that have one) and
    by `re.search(pattern, answer)` (pattern_match, over the rows that have a pattern)."""
    exact = contains = matched = 0
    answers = [r for r in rows if "answer" in r]
    patterns = [r for r in rows if "pattern" in r]
    for row in rows:
        out = lm.chat([{"role": "user", "content": row["prompt"]}], temperature=0, max_tokens=max_tokens).text.strip()
        if "answer" in row:
            answer = row["answer"].strip()
            exact += out == answer
            contains += answer in out
        if "pattern" in row:
            matched += re.search(row["pattern"], out) is not None
        if progress:
            progress(1)
    result: dict[str, Any] = {"kind": "generation", "rows": len(rows)}
    if answers:
        result.update(exact_match=exact / len(answers), contains=contains / len(answers))
    if patterns:
        result["pattern_match"] = matched / len(patterns)
    return result

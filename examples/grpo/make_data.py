"""Prompts with answers for `ownlm tune --method grpo`, in the style of ownlm's shipped `arithmetic`
eval task: "What is A op B? Reply with the number only." with A op B in the same ranges (sums of
numbers up to 50, differences that stay positive, products of numbers up to 12).

    python examples/grpo/make_data.py             # writes train.jsonl (400 rows) next to this file
    python examples/grpo/make_data.py --sft --seed 1 --n 800 --out sft.jsonl   # answered rows for supervised tuning
    python examples/grpo/make_data.py --seed 7 --exclude train.jsonl --exclude sft.jsonl --out heldout.jsonl

Deterministic (seeded); no prompt of the shipped task is written, so `ownlm eval NAME --task
arithmetic` measures what tuning taught on questions it never saw; nor any of the files given with
--exclude (a held-out set apart from the ones tuned on: `ownlm eval NAME --task heldout.jsonl`).
Rows are {"prompt", "answer"}: the built-in `exact` reward compares a completion with the answer
as the task scores it."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from ownlm.evaluate.tasks import find_task

TEMPLATE = "What is {a} {op} {b}? Reply with the number only."


def question(rng: random.Random) -> tuple[int, str, int, int]:
    op = rng.choice("+-*")
    if op == "+":
        a, b = rng.randint(2, 50), rng.randint(2, 40)
        return a, op, b, a + b
    if op == "-":
        a = rng.randint(5, 60)
        b = rng.randint(1, a - 1)
        return a, op, b, a - b
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return a, op, b, a * b


def questions(path: Path) -> set[str]:
    """The questions a file of rows asks: each row's prompt, or its messages' user turns."""
    out = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out.update([row["prompt"]] if "prompt" in row else
                       [m["content"] for m in row.get("messages", []) if m.get("role") == "user"])
    return out


def rows(n: int, seed: int, shots: int = 0, sft: bool = False, exclude: tuple[Path, ...] = ()) -> list[dict]:
    """n rows; with shots, each row's question comes after 0 .. shots solved ones (user and
    assistant turns, bare answers), as many of each count; sft: {"prompt", "completion"} rows,
    the answer as the completion (supervised tuning's prompt-completion format); no question of
    the shipped task nor of the `exclude` files"""
    seen = questions(find_task("arithmetic"))
    for path in exclude:
        seen |= questions(path)
    rng = random.Random(seed)

    def fresh() -> tuple[str, str]:
        while True:
            a, op, b, answer = question(rng)
            prompt = TEMPLATE.format(a=a, op=op, b=b)
            if prompt not in seen:
                seen.add(prompt)
                return prompt, str(answer)

    out = []
    for i in range(n):
        prompt, answer = fresh()
        k = i % (shots + 1)
        if sft:
            out.append({"prompt": prompt, "completion": answer})
            continue
        if not k:
            out.append({"prompt": prompt, "answer": answer})
            continue
        messages = []
        for _ in range(k):
            q, a = fresh()
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        out.append({"messages": messages + [{"role": "user", "content": prompt}], "answer": answer})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shots", type=int, default=0,
                    help="solved questions before a row's own, 0 .. SHOTS of them (default 0: the question alone)")
    ap.add_argument("--sft", action="store_true",
                    help="rows for supervised tuning: {prompt, completion}, the answer as the completion")
    ap.add_argument("--exclude", type=Path, action="append", default=[],
                    help="a file of rows whose questions are not written (repeat it for more)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "train.jsonl")
    args = ap.parse_args()
    if args.sft and args.shots:
        ap.error("--sft writes single questions: drop --shots")
    made = rows(args.n, args.seed, args.shots, args.sft, tuple(args.exclude))
    args.out.write_text("".join(json.dumps(r) + "\n" for r in made), encoding="utf-8")
    print(f"wrote {args.n} rows to {args.out}")


if __name__ == "__main__":
    main()

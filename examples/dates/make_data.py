"""A synthetic task for `ownlm tune`: write a date given in words as an ISO date.

    python examples/dates/make_data.py            # writes train.jsonl (400 rows) and test.jsonl (100 rows)

Deterministic (seeded); train and test never share a date. Train rows are prompt/completion
(one of the formats `ownlm tune` reads), test rows are prompt/answer (what `ownlm eval` scores
by exact match)."""

from __future__ import annotations

import argparse
import datetime
import json
import random
from pathlib import Path

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
TEMPLATES = [
    "Write the date {d} {m} {y} in ISO format (YYYY-MM-DD). Reply with the date only.",
    "Convert {m} {d}, {y} to YYYY-MM-DD. Reply with the date only.",
    "What is the ISO 8601 form of the {o} of {m} {y}? Reply with the date only.",
]


def ordinal(n: int) -> str:
    return f"{n}{'th' if 11 <= n % 100 <= 13 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def rows(n: int, rng: random.Random, taken: set) -> list[dict]:
    out = []
    while len(out) < n:
        day = datetime.date(1900, 1, 1) + datetime.timedelta(days=rng.randrange(200 * 365))
        if day in taken:
            continue
        taken.add(day)
        prompt = rng.choice(TEMPLATES).format(d=day.day, m=MONTHS[day.month - 1], y=day.year, o=ordinal(day.day))
        out.append({"prompt": prompt, "answer": day.isoformat()})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).parent), help="folder for train.jsonl and test.jsonl")
    p.add_argument("--train", type=int, default=400)
    p.add_argument("--test", type=int, default=100)
    p.add_argument("--seed", type=int, default=2026)
    args = p.parse_args()
    rng, taken = random.Random(args.seed), set()
    test, train = rows(args.test, rng, taken), rows(args.train, rng, taken)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w", encoding="utf-8") as f:
        for r in train:
            f.write(json.dumps({"prompt": r["prompt"], "completion": r["answer"]}) + "\n")
    with open(out / "test.jsonl", "w", encoding="utf-8") as f:
        for r in test:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {len(train)} training and {len(test)} test rows to {out}")


if __name__ == "__main__":
    main()

"""A custom GRPO reward: `ownlm tune ... --reward examples/grpo/reward.py:number_only`.

A reward is a function (prompt, completion, row) -> float: `prompt` is the row's prompt text,
`completion` the sampled answer (decoded, without its stop token), `row` the whole JSON row
(here with its "answer"). This one gives partial credit where `exact` gives none: 0.5 for an
answer that is a bare number, 1.0 for the right number, so early on, when exact answers are
rare, the model still learns the answer's format."""

from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d+")


def number_only(prompt: str, completion: str, row: dict) -> float:
    text = completion.strip()
    if not NUMBER.fullmatch(text):
        found = NUMBER.findall(text)  # a number somewhere in a sentence: a little credit
        return 0.25 if found and found[-1] == row["answer"] else 0.0
    return 1.0 if text == row["answer"] else 0.5


def right_number(prompt: str, completion: str, row: dict) -> float:
    """Credit for the right number only: 1 for it alone, and where it appears in a longer answer
    up to 0.5, more the shorter the answer, so brevity is learned from right answers. (A reward
    for any bare number taught smollm2 to answer "1" to everything.)"""
    text = completion.strip()
    if text == row["answer"]:
        return 1.0
    if row["answer"] not in NUMBER.findall(text):
        return 0.0
    return 0.5 * max(0.1, 1.0 - len(text) / 48)

"""Speculative decoding benchmark: decode tokens/s of plain greedy decoding and of speculative
decoding (prompt lookup; a draft model with --draft) on the same prompts, in the same run, the
greedy tokens asserted identical.

    python bench/speculate.py [--model smollm2] [--draft MODEL] [--quant auto,bf16] [--threads 2] [--gen 320]
        [--activations int16|int8]
        [--tasks edit-settings,edit-class,free]

Three tasks: two edits, a ~400-token Python file in the prompt to be rewritten with one small
change (the answer copies the prompt: where prompt lookup pays) — `edit-settings`, a settings
module with one value changed, and `edit-class`, a class with a method renamed (which smollm2 does
not copy: it rewrites the methods its own way) — and `free`, an open question (nothing to copy:
prompt lookup must cost little). Prints one JSON object: per task and method the decode
tokens/s, the guesses drafted and kept, and the speedup over plain decoding."""

from __future__ import annotations

import argparse
import json
import time

SOURCE = '''"""A small inventory of parts, with prices and stock levels."""

from dataclasses import dataclass, field


@dataclass
class Part:
    name: str
    price: float
    stock: int = 0
    tags: list[str] = field(default_factory=list)

    def value(self) -> float:
        """What the parts in stock are worth."""
        return self.price * self.stock


class Inventory:
    def __init__(self):
        self.parts: dict[str, Part] = {}

    def add(self, part: Part) -> None:
        if part.name in self.parts:
            raise ValueError(f"{part.name} is already in the inventory")
        self.parts[part.name] = part

    def restock(self, name: str, count: int) -> int:
        part = self.parts[name]
        part.stock += count
        return part.stock

    def sell(self, name: str, count: int) -> float:
        part = self.parts[name]
        if count > part.stock:
            raise ValueError(f"only {part.stock} of {name} left")
        part.stock -= count
        return part.price * count

    def total_value(self) -> float:
        return sum(part.value() for part in self.parts.values())

    def tagged(self, tag: str) -> list[Part]:
        return [part for part in self.parts.values() if tag in part.tags]

    def cheapest(self) -> Part | None:
        if not self.parts:
            return None
        return min(self.parts.values(), key=lambda part: part.price)


def main() -> None:
    inventory = Inventory()
    inventory.add(Part("bolt", 0.25, 100, ["metal", "small"]))
    inventory.add(Part("gear", 4.5, 12, ["metal"]))
    inventory.add(Part("belt", 7.0, 3, ["rubber"]))
    inventory.sell("bolt", 10)
    inventory.restock("belt", 5)
    print(f"total value: {inventory.total_value():.2f}")
    print("metal parts:", [part.name for part in inventory.tagged("metal")])


if __name__ == "__main__":
    main()
'''

SETTINGS = '''"""Settings for the build server: read once at start."""

HOST = "0.0.0.0"
PORT = 8080
WORKERS = 4
TIMEOUT_SECONDS = 30
LOG_LEVEL = "info"
LOG_FILE = "/var/log/build/server.log"
CACHE_DIR = "/var/cache/build"
CACHE_SIZE_MB = 512
MAX_UPLOAD_MB = 64
ALLOWED_HOSTS = ["build.example.com", "localhost"]
DATABASE_URL = "postgres://build@localhost:5432/build"
DATABASE_POOL_SIZE = 10
QUEUE_URL = "redis://localhost:6379/0"
RETRY_LIMIT = 3
RETRY_DELAY_SECONDS = 5
ARTIFACT_DIR = "/srv/build/artifacts"
KEEP_ARTIFACTS_DAYS = 14
NOTIFY_EMAIL = "builds@example.com"
SMTP_HOST = "mail.example.com"
SMTP_PORT = 587
ENABLE_METRICS = True
METRICS_PORT = 9100
GIT_REMOTE = "git@example.com:team/app.git"
GIT_BRANCH = "main"
BUILD_COMMAND = "make release"
TEST_COMMAND = "make test"
PARALLEL_JOBS = 8
DOCKER_IMAGE = "registry.example.com/build/base:2026.11"
SECRET_KEY_FILE = "/etc/build/secret.key"
SESSION_MINUTES = 60
DEFAULT_TIMEZONE = "UTC"
'''

EDIT_SETTINGS = ("Here is a Python settings file:\n\n```python\n" + SETTINGS + "```\n\nRewrite the whole file with "
                 "one change: set PORT to 9090. Reply with the complete file in a python code block.")
EDIT = ("Here is a Python file:\n\n```python\n" + SOURCE + "```\n\nRewrite the whole file with one change: rename "
        "the method `restock` to `refill` (and its call). Reply with the complete file in a python code block.")
FREE = "Write a short story about a lighthouse keeper who finds a message in a bottle."
# each task's prompt, and how the answer starts: an edit's as editing tools start it, inside the code block
TASKS = {"edit-settings": (EDIT_SETTINGS, "```python\n"), "edit-class": (EDIT, "```python\n"), "free": (FREE, "")}


def measure(lm, ids: list[int], gen: int, source) -> tuple[list[int], dict]:
    from ownlm.engine.generate import StepStats
    from ownlm.engine.sampling import SamplingParams

    stats = StepStats()
    t = time.perf_counter()
    out = list(source(lm.model, ids, SamplingParams(temperature=0, max_tokens=gen), lm.tokenizer.eos_ids, stats))
    wall = time.perf_counter() - t
    row = {"tokens": len(out), "decode_tokens_per_s": round((len(out) - 1) / stats.decode_s, 2),
           "wall_s": round(wall, 2)}
    if stats.speculative:
        row.update(drafted=stats.drafted, accepted=stats.accepted,
                   acceptance_rate=round(stats.accepted / stats.drafted, 3) if stats.drafted else 0.0)
    return out, row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--draft", help="a draft model sharing the model's tokenizer, measured as a third method")
    ap.add_argument("--quant", default="auto,bf16",
                    help="weight modes to measure, comma-separated (default auto,bf16: smollm2's int4 / int8 "
                         "as the GGUF has them, and dense bfloat16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen", type=int, default=320, help="most tokens per answer")
    ap.add_argument("--repeats", type=int, default=2, help="runs per method, alternating; the best counts")
    ap.add_argument("--activations", default="int16", choices=("int16", "int8"),
                    help="what the kernels round activations to against int4 / int8 weights (ownlm run --activations)")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    a = ap.parse_args()
    if unknown := set(a.tasks.split(",")) - set(TASKS):
        ap.error(f"unknown task {', '.join(sorted(unknown))}: the tasks are {', '.join(TASKS)}")

    import torch

    import ownlm
    from ownlm.engine.generate import generate_ids

    torch.set_num_threads(a.threads)
    results: dict = {"model": a.model, "threads": a.threads, "activations": a.activations, "gen_tokens": a.gen,
                     "repeats": a.repeats, "runs": {}}
    for quant in a.quant.split(","):
        lm = ownlm.load(a.model, quant=quant, pull_missing=False, activations=a.activations)
        methods = {"plain": generate_ids, "ngram": lm.speculator("ngram")}
        if a.draft:
            methods[f"draft:{a.draft}"] = lm.speculator(a.draft)
        for source in methods.values():  # warm-up
            list(source(lm.model, lm.encode("Hello there, hello there")[:8], _greedy(4)))
        tasks: dict = {}
        for task in a.tasks.split(","):
            prompt, start = TASKS[task]
            ids = lm.encode(lm.chat_prompt([{"role": "user", "content": prompt}]) + start)
            rows: dict = {"prompt_tokens": len(ids)}
            outs: dict = {}
            for _ in range(a.repeats):  # alternating, so a busy spell on a shared machine hits both
                for name, source in methods.items():
                    outs[name], row = measure(lm, ids, a.gen, source)
                    if name not in rows or row["decode_tokens_per_s"] > rows[name]["decode_tokens_per_s"]:
                        rows[name] = row
            for name in methods:
                if name != "plain":
                    assert outs[name] == outs["plain"], f"{task}/{name}: the greedy tokens differ from plain decoding"
                    rows[name]["identical_tokens"] = True
                    rows[name]["speedup"] = round(
                        rows[name]["decode_tokens_per_s"] / rows["plain"]["decode_tokens_per_s"], 3)
            tasks[task] = rows
        results["runs"][f"{lm.name} quant={quant} ({str(lm.model.dtype).removeprefix('torch.')})"] = tasks
    print(json.dumps(results, indent=2))


def _greedy(n: int):
    from ownlm.engine.sampling import SamplingParams

    return SamplingParams(temperature=0, max_tokens=n)


if __name__ == "__main__":
    main()

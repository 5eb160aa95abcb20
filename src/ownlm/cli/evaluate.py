"""ownlm eval: perplexity (.txt), multiple choice and generation (.jsonl), KL; ownlm bench."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from . import add_quant_option, add_threads_option, apply_threads_option
from ..errors import BadRequest
from ..progress import Bar


class Progress:
    """A progress callback `(n, total)` that opens its bar once the total is known."""

    def __init__(self, label: str, unit: str, quiet: bool):
        self.label, self.unit, self.quiet, self.bar = label, unit, quiet, None

    def __call__(self, n: int, total: int) -> None:
        if self.bar is None:
            self.bar = Bar(self.label, total, quiet=self.quiet, unit=self.unit)
        self.bar(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _with_progress(label: str, unit: str, quiet: bool, work: Callable[[Progress], dict]) -> dict:
    progress = Progress(label, unit, quiet)
    try:
        return work(progress)
    finally:
        progress.close()


def cmd_eval(args) -> int:
    from ..evaluate.perplexity import perplexity
    from ..evaluate.tasks import find_task
    from ..loading import load

    apply_threads_option(args)
    path = find_task(args.task)
    if path.suffix == ".jsonl":
        return _tasks(args, path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadRequest(f"cannot read task {args.task}: {e}") from None
    if args.kl:
        return _kl(args, text, path)
    rows = []
    for ref in args.models:
        lm = load(ref, pull_missing=False, dtype=args.dtype, quant=args.quant)
        r = _with_progress(f"{lm.name}: scoring", "tokens", args.json,
                           lambda p, lm=lm: perplexity(lm, text, window=args.window, stride=args.stride, progress=p))
        rows.append({"model": lm.name, "task": args.task, **r})
    if args.json:
        print(json.dumps({"results": rows}, indent=2))
        return 0
    print(f"{'MODEL':<30} {'PERPLEXITY':>11} {'BITS/BYTE':>10} {'TOKENS':>8}  window/stride")
    for r in rows:
        print(f"{r['model']:<30} {r['perplexity']:>11.4f} {r['bits_per_byte']:>10.4f} {r['tokens']:>8}  "
              f"{r['window']}/{r['stride']}")
    return 0


def _tasks(args, path: Path) -> int:
    from ..evaluate.tasks import generation, multiple_choice, read_task
    from ..loading import load

    if args.kl:
        raise BadRequest("--kl takes a .txt task")
    kind, task_rows = read_task(path)
    rows = []
    for ref in args.models:
        lm = load(ref, pull_missing=False, dtype=args.dtype, quant=args.quant)
        bar = Bar(f"{lm.name}: {kind.replace('_', '-')}", len(task_rows), quiet=args.json, unit="rows")
        try:
            r = (multiple_choice(lm, task_rows, progress=bar) if kind == "multiple_choice"
                 else generation(lm, task_rows, args.max_tokens, progress=bar))
        finally:
            bar.close()
        rows.append({"model": lm.name, "task": args.task, **r})
    if args.json:
        print(json.dumps({"results": rows}, indent=2))
        return 0
    keys = [k for k in ("acc", "acc_norm", "exact_match", "contains", "pattern_match") if k in rows[0]]
    print(f"{'MODEL':<30} " + " ".join(f"{k.upper():>12}" for k in keys) + f" {'ROWS':>6}")
    for r in rows:
        print(f"{r['model']:<30} " + " ".join(f"{r[k]:>12.4f}" for k in keys) + f" {r['rows']:>6}")
    return 0


def _kl(args, text: str, path: Path) -> int:
    from ..evaluate.kl import kl_divergence
    from ..loading import load

    if len(args.models) < 2:
        raise BadRequest("--kl compares models against the first one: give at least two")
    ref = load(args.models[0], pull_missing=False, dtype=args.dtype, quant=args.quant)
    rows = []
    for other_ref in args.models[1:]:
        other = load(other_ref, pull_missing=False, dtype=args.dtype, quant=args.quant)
        r = _with_progress(f"{other.name}: KL", "positions", args.json,
                           lambda p, other=other: kl_divergence(ref, other, text, window=args.window, progress=p))
        rows.append({"reference": ref.name, "model": other.name, "task": args.task, **r})
    if args.json:
        print(json.dumps({"results": rows}, indent=2))
        return 0
    print(f"reference: {ref.name}")
    print(f"{'MODEL':<30} {'MEAN KL':>10} {'MAX KL':>10} {'TOP-1 AGREE':>12} {'POSITIONS':>10}")
    for r in rows:
        print(f"{r['model']:<30} {r['mean_kl']:>10.5f} {r['max_kl']:>10.5f} {100 * r['top1_agreement']:>11.1f}% "
              f"{r['positions']:>10}")
    return 0


def cmd_bench(args) -> int:
    from ..evaluate.bench import bench

    try:
        batches = tuple(int(x) for x in args.batch.split(","))
    except ValueError:
        raise BadRequest(f"--batch {args.batch!r}: give comma-separated integers, e.g. 1,4,8") from None
    if args.cost and args.price_per_hour is None:
        raise BadRequest("--cost needs --price-per-hour (what this machine costs you per hour)")
    if args.api_price_per_mtok is not None and args.price_per_hour is None:
        raise BadRequest("--api-price-per-mtok needs --price-per-hour (the price of this machine)")
    apply_threads_option(args)
    r = bench(args.model, args.prompt_tokens, args.gen_tokens, batches, args.device, args.dtype,
              args.price_per_hour, args.api_price_per_mtok, quant=args.quant, speculate=args.speculate)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    threads = f"{r['threads']} thread" + ("s" if r["threads"] != 1 else "")
    kernels = f", {r['kernels']} kernels, {r['activations']} activations" if r.get("kernels") else ""
    print(f"{r['model']} on {r['device']} ({r['dtype']}, {threads}{kernels}): load {r['load_s']:.2f} s, peak memory "
          f"{r['peak_rss_bytes'] / 1e6:.0f} MB, prompt {r['prompt_tokens']} + {r['gen_tokens']} generated tokens")
    for run in r["runs"]:
        if run["batch"] == 1:
            print(f"  batch 1: time to first token {run['time_to_first_token_s']:.3f} s, prefill "
                  f"{run['prefill_tokens_per_s']:.1f} tok/s, decode {run['decode_tokens_per_s']:.1f} tok/s")
        else:
            decode = (f" ({run['decode_aggregate_tokens_per_s']:.1f} tok/s once all are decoding)"
                      if "decode_aggregate_tokens_per_s" in run else "")
            print(f"  batch {run['batch']}: {run['aggregate_tokens_per_s']:.1f} tok/s generated in aggregate{decode}")
    if "memory" in r:
        m = r["memory"]
        note = (f" (the weights fit in the {m['last_level_cache_bytes'] / 1e6:.0f} MB cache: it does not bind)"
                if m["fits_in_cache"] else "")
        print(f"  memory bandwidth {m['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s; a decode step reads "
              f"{(m['weight_bytes_per_token'] + m['kv_bytes_per_token']) / 1e6:.1f} MB, so at most "
              f"{m['decode_ceiling_tokens_per_s']:.1f} tok/s; decode reached {m['fraction_of_ceiling']:.0%} of "
              f"that{note}")
    if "speculative" in r:
        sp = r["speculative"]
        print(f"  speculative ({sp['speculate']}): decode {sp['decode_tokens_per_s']:.1f} tok/s, "
              f"{sp['speedup']:.2f}x; {sp['accepted_tokens']} of {sp['drafted_tokens']} guesses kept"
              f"{'' if sp['same_tokens'] else '; THE TOKENS DIFFER from plain decoding'}")
    if "cost" in r:
        c = r["cost"]
        line = f"  cost: ${c['cost_per_mtok']:.4f} per million generated tokens at ${c['price_per_hour']}/hour"
        if c["api_price_per_mtok"]:
            line += f"; the API's ${c['api_price_per_mtok']}/M is {c['api_over_own']:.1f}x that"
        print(line)
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="measure models on a task: perplexity, multiple choice, generation, KL",
                       description="Perplexity and bits per byte of a text file under each MODEL, side by side, "
                                   "with a sliding window for texts longer than the context.")
    p.add_argument("models", nargs="+", metavar="MODEL")
    p.add_argument("--task", required=True,
                   help="a .txt file (perplexity), a .jsonl file (multiple choice / generation), or a shipped "
                        "task: prose (perplexity), everyday (multiple choice), arithmetic (generation)")
    p.add_argument("--window", type=int, help="tokens per window (default: the model's context)")
    p.add_argument("--stride", type=int, help="tokens between window starts (default: the window)")
    p.add_argument("--dtype", help="auto, float32, bfloat16 or float16")
    add_quant_option(p)
    add_threads_option(p)
    p.add_argument("--max-tokens", type=int, default=64, help="generation tasks: tokens per answer (default 64)")
    p.add_argument("--kl", action="store_true",
                   help="instead: KL divergence of each later MODEL's next-token distributions from the first's")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)
    b = sub.add_parser("bench", help="speed and memory of a model here (and its cost per million tokens)",
                       description="Load time, time to first token, prefill and decode tokens/s, batched "
                                   "throughput and peak memory on this machine; with --cost, the cost per "
                                   "million generated tokens at the hourly price you give.")
    b.add_argument("model", metavar="MODEL")
    b.add_argument("--prompt-tokens", type=int, default=512)
    b.add_argument("--gen-tokens", type=int, default=128)
    b.add_argument("--batch", default="1", help="batch sizes, comma-separated (default 1)")
    b.add_argument("--cost", action="store_true", help="report cost per million tokens (needs --price-per-hour)")
    b.add_argument("--price-per-hour", type=float, help="what this machine costs you per hour")
    b.add_argument("--api-price-per-mtok", type=float, help="an API's price per million output tokens, to compare")
    b.add_argument("--speculate", "--draft", metavar="ngram|MODEL",
                   help="also decode with speculative decoding (ngram prompt lookup, or a draft MODEL) and compare")
    b.add_argument("--device")
    b.add_argument("--dtype")
    add_quant_option(b)
    add_threads_option(b)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)

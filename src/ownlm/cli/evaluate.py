"""ownlm eval: measure models on a task (for now: perplexity of a text file)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import BadRequest
from ..progress import Bar


def cmd_eval(args) -> int:
    from ..evaluate.perplexity import perplexity
    from ..loading import load

    path = Path(args.task)
    if path.suffix != ".txt":
        raise BadRequest(f"task {args.task!r}: only .txt perplexity tasks are supported so far")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadRequest(f"cannot read task {args.task}: {e}") from None
    if args.kl:
        return _kl(args, text, path)
    rows = []
    for ref in args.models:
        lm = load(ref, pull_missing=False, dtype=args.dtype)
        bar = Bar(f"{lm.name}: scoring", None, quiet=args.json)
        r = perplexity(lm, text, window=args.window, stride=args.stride)
        bar.close()
        rows.append({"model": lm.name, "task": str(path), **r})
    if args.json:
        print(json.dumps({"results": rows}, indent=2))
        return 0
    print(f"{'MODEL':<30} {'PERPLEXITY':>11} {'BITS/BYTE':>10} {'TOKENS':>8}  window/stride")
    for r in rows:
        print(f"{r['model']:<30} {r['perplexity']:>11.4f} {r['bits_per_byte']:>10.4f} {r['tokens']:>8}  {r['window']}/{r['stride']}")
    return 0


def _kl(args, text: str, path: Path) -> int:
    from ..evaluate.kl import kl_divergence
    from ..loading import load

    if len(args.models) < 2:
        raise BadRequest("--kl compares models against the first one: give at least two")
    ref = load(args.models[0], pull_missing=False, dtype=args.dtype)
    rows = []
    for other_ref in args.models[1:]:
        other = load(other_ref, pull_missing=False, dtype=args.dtype)
        rows.append({"reference": ref.name, "model": other.name, "task": str(path),
                     **kl_divergence(ref, other, text, window=args.window)})
    if args.json:
        print(json.dumps({"results": rows}, indent=2))
        return 0
    print(f"reference: {ref.name}")
    print(f"{'MODEL':<30} {'MEAN KL':>10} {'MAX KL':>10} {'TOP-1 AGREE':>12} {'POSITIONS':>10}")
    for r in rows:
        print(f"{r['model']:<30} {r['mean_kl']:>10.5f} {r['max_kl']:>10.5f} {100 * r['top1_agreement']:>11.1f}% {r['positions']:>10}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="measure models on a task (perplexity of a .txt file)",
                       description="Perplexity and bits per byte of a text file under each MODEL, side by side, "
                                   "with a sliding window for texts longer than the context.")
    p.add_argument("models", nargs="+", metavar="MODEL")
    p.add_argument("--task", required=True, help="a .txt file (perplexity)")
    p.add_argument("--window", type=int, help="tokens per window (default: the model's context)")
    p.add_argument("--stride", type=int, help="tokens between window starts (default: the window)")
    p.add_argument("--dtype", help="auto, float32, bfloat16 or float16")
    p.add_argument("--kl", action="store_true",
                   help="instead: KL divergence of each later MODEL's next-token distributions from the first's")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

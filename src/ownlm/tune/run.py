"""`ownlm tune`: load the base, read the data, train, checkpoint, and store the result (a PEFT
adapter linked to its base by digest, or a whole model after full fine-tuning)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import BadRequest, OwnlmError
from ..export.hf import write_hf_folder
from ..formats import peft
from ..formats.hf import write_safetensors
from ..fsutil import atomic_file
from ..loading import LoadedModel, load, pick_device
from ..manage import build_manifest, display_name, import_path
from ..model import adapters
from ..model.families import FAMILIES
from ..store.refs import parse_ref, split_name
from ..store.store import Store
from . import checkpoints, rewards
from .data import Encoder
from .trainer import Trainer, TuneConfig, frozen_copy, make_plan


def run_dir(name: str, store: Store | None = None) -> Path:
    n, tag = split_name(name)
    return (store or Store()).root / "runs" / f"{n}-{tag}"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare(base: str, cfg: TuneConfig, device: torch.device) -> LoadedModel:
    """The base loaded for training: float32 on CPU (bf16 is emulated on most CPUs), frozen,
    with adapters attached (LoRA, QLoRA) or everything trainable (full)."""
    if cfg.method == "qlora" and device.type != "cpu":
        raise BadRequest("--method qlora keeps int4 weights with ownlm's CPU int4 kernels; it runs on CPU only",
                         "use --method lora on GPUs")
    dtype = torch.float32 if device.type == "cpu" or cfg.method == "full" else torch.bfloat16
    lm = load(base, str(device), dtype, quant="int4" if cfg.method == "qlora" else "none", pull_missing=False,
              cache=False)
    if "+" in lm.name:  # load() names a model with an adapter BASE+ADAPTER
        raise BadRequest(f"{base} is an adapter", "tune a base model; merge the adapter first with `ownlm merge`")
    arch = lm.config.architecture
    if cfg.method not in lm.config.family.tuning:
        works = ", ".join(f.name for f in FAMILIES if cfg.method in f.tuning)
        what = (f"full fine-tuning of {arch} models is" if cfg.method == "full"
                else f"LoRA adapters for {arch} models are")
        raise BadRequest(f"{what} not supported yet", f"--method {cfg.method} works for {works}")
    model = lm.model
    model.requires_grad_(False)
    if cfg.method == "full":
        for p in model.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
    else:
        torch.manual_seed(cfg.seed)  # adapter initialisation
        adapters.attach(model, adapters.parse_targets(cfg.targets), cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora)
    return lm


def not_the_base(base: str, name: str) -> None:
    """NAME is a valid store name other than BASE's (storing the result there would replace the
    model it was made from)."""
    target = ":".join(split_name(name))
    if parse_ref(base).kind == "name" and parse_ref(base).full_name == target:
        raise BadRequest(f"--name {name} is the base model itself", "give the result a name of its own")


def tune(base: str, data: str | Path, name: str, cfg: TuneConfig, resume: bool = False, device: str | None = None,
         nproc: int = 1, quiet: bool = False, on_step: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Train and store NAME; returns a summary (steps, losses, speed, where things are)."""
    not_the_base(base, name)
    if cfg.objective == "grpo":
        rewards.parse(cfg.rewards, cfg.reward_pattern, cfg.target_length)  # a bad --reward fails before any loading
    if nproc > 1:
        return _launch(base, data, name, cfg, resume, device, nproc, quiet)
    rank, world = _dist_env(device)
    return _train(base, data, name, cfg, resume, device, quiet, on_step, rank, world)


def _backend(device: str | None) -> str:
    """NCCL between processes that each train on a GPU, gloo between CPU processes (also on a
    machine that has GPUs, under --device cpu)."""
    return "nccl" if pick_device(device).type == "cuda" else "gloo"


def _dist_env(device: str | None) -> tuple[int, int]:
    """(rank, world size) under torchrun (its environment), else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(_backend(device))
    return dist.get_rank(), dist.get_world_size()


def _train(base, data, name, cfg: TuneConfig, resume, device, quiet, on_step, rank, world) -> dict[str, Any]:
    t0 = time.perf_counter()
    dev = pick_device(device)
    if world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    torch.manual_seed(cfg.seed)
    fns = rewards.parse(cfg.rewards, cfg.reward_pattern, cfg.target_length) if cfg.objective == "grpo" else None
    lm = prepare(base, cfg, dev)
    encoder = Encoder(lm.tokenizer, lm.template, cfg.train_on)
    plan = make_plan(cfg, encoder, data, world, lm.config.context_length, fns)
    say = (lambda m: None) if quiet or rank else _say
    if cfg.objective == "grpo":
        say(f"{len(plan.rows)} prompts ({plan.train.tokens:,} tokens); {plan.steps} steps of {plan.rows_per_step} "
            f"prompts x {cfg.group_size} completions of <= {cfg.max_completion_tokens} tokens; rewards: "
            + ", ".join(f"{r.name} x {r.weight:g}" for r in fns or []))
    else:
        say(f"{len(plan.train.examples)} examples ({plan.train.format}, {plan.train.tokens:,} tokens) -> "
            f"{len(plan.rows)} rows of <= {cfg.seq_len} tokens; {plan.steps} steps of {plan.rows_per_step} rows"
            + (f"; {len(plan.val.examples)} held out for validation" if plan.val else ""))
    if plan.train.skipped:
        say(f"skipped {len(plan.train.skipped)} bad row(s), first: {plan.train.skipped[0]}")
    if plan.train.truncated:
        say(f"{plan.train.truncated} example(s) longer than --seq-len {cfg.seq_len} were cut to fit")
    folder = run_dir(name)
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
    reference = None
    if world > 1:
        if cfg.objective == "grpo" and cfg.method == "full" and cfg.beta:
            reference = frozen_copy(lm.model)  # GRPO's KL reference, copied whole, sharded as the model is
            _shard(reference)
        _shard(lm.model)  # before the optimizer is made: it must hold the sharded parameters
    trainer = Trainer(lm.model, cfg, plan, folder, dev, rank, world, quiet, on_step, lm.tokenizer, fns, reference)
    existing = checkpoints.complete(folder)
    if existing and not resume:
        raise BadRequest(f"run {name} already has checkpoints in {folder}",
                         "pass --resume to continue it, or remove that folder to start over")
    resumed_from = None
    if resume and existing:
        trainer.restore(existing[-1])
        resumed_from = trainer.step
        say(f"resuming {name} from step {trainer.step} of {plan.steps} ({existing[-1].name})")
    if rank == 0:
        _trim_log(folder / "metrics.jsonl", trainer.step)
        (folder / "run.json").write_text(json.dumps({
            "base": display_name(lm.manifest), "base_digest": lm.manifest.get("digest"),
            "data": str(Path(data).resolve()),
            "config": asdict(cfg), "steps": plan.steps, "world_size": world}, indent=1), encoding="utf-8")
    history = trainer.run()
    result: dict[str, Any] = {"name": None, "steps": plan.steps, "resumed_from": resumed_from, "run_dir": str(folder),
                              "examples": len(plan.train.examples), "skipped": len(plan.train.skipped),
                              "truncated": plan.train.truncated, "format": plan.train.format}
    if rank == 0:
        if history:
            result.update(final_loss=history[-1]["loss"], tokens_per_s=history[-1]["tokens_per_s"],
                          val_loss=next((h["val_loss"] for h in reversed(history) if "val_loss" in h), None))
            if "reward" in history[-1]:
                result["final_reward"] = history[-1]["reward"]
        state = trainer.final_state()
        result["name"] = store_result(lm, name, cfg, state, data)
        result["seconds"] = time.perf_counter() - t0
        say(f"stored {result['name']} (run {plan.steps} steps in {result['seconds']:.0f}s; "
            f"try: ownlm run {result['name']})")
    elif world > 1:
        trainer.final_state()  # collective: every process takes part
    return result


def _trim_log(log: Path, step: int) -> None:
    """Drop metrics of steps after the checkpoint a run resumes from (they are computed again), and
    a line a killed run left cut short (or any line that is not a record)."""
    if not log.exists():
        return
    keep = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            keep.append(line)
    with atomic_file(log) as tmp:
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def store_result(lm: LoadedModel, name: str, cfg: TuneConfig, trained: dict[str, torch.Tensor], data) -> str:
    """Store the adapter (PEFT files) or the fully tuned model under NAME; returns its name."""
    store = Store()
    n, tag = split_name(name)
    target = f"{n}:{tag}"
    if cfg.method == "full":
        with store.tmp_dir() as tmp:
            write_hf_folder(lm, tmp / "model", trained)
            import_path(tmp / "model", target, store=store, quiet=True)
        return target
    settings = peft.LoraSettings(cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora,
                                 tuple(adapters.parse_targets(cfg.targets)))
    with store.tmp_dir() as tmp:
        write_adapter(tmp, settings, trained, display_name(lm.manifest))
        files = {}
        for rel in (peft.CONFIG, peft.WEIGHTS):
            size = (tmp / rel).stat().st_size
            files[rel] = {"sha256": store.put_file(tmp / rel), "size": size}
    base = display_name(lm.manifest)
    manifest = build_manifest(
        target, f"ownlm tune {base} --data {Path(data).name} --method "
        + (cfg.method if cfg.objective == "sft" else f"{cfg.objective} --weights {cfg.method}"), files, format="peft",
        kind="adapter", base={"name": base, "digest": lm.manifest.get("digest")},
        architecture=lm.config.architecture, parameters=sum(t.numel() for t in trained.values()),
        quantization="F32", context_length=lm.config.context_length, license=lm.manifest.get("license"),
        lora={"r": cfg.rank, "alpha": cfg.alpha, "targets": list(settings.parts), "rslora": cfg.rslora})
    with store.lock(f"model:{target}"):
        store.write(target, manifest)
    return target


def write_adapter(folder: Path, settings: peft.LoraSettings, tensors: dict[str, torch.Tensor], base_name: str) -> None:
    """adapter_config.json + adapter_model.safetensors (PEFT's names) into `folder`."""
    (folder / peft.CONFIG).write_text(json.dumps(settings.config(base_name), indent=2), encoding="utf-8")
    write_safetensors(folder / peft.WEIGHTS, peft.to_peft({k: v.float().cpu() for k, v in tensors.items()}),
                      {"format": "pt"})


def _shard(model: torch.nn.Module) -> None:
    """Data parallelism with FSDP2: each block's parameters sharded across the processes."""
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:
        fully_shard(block)
    fully_shard(model)


# -- several processes on this machine ----------------------------------------------------------
def _worker(rank: int, world: int, rendezvous: str, args: tuple, out: str) -> None:
    """One process of --nproc: they meet through a file (a FileStore in the launcher's temp
    folder), not a TCP port picked beforehand, which another program could take before the
    first process binds it."""
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    threads = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    base, data, name, cfg, resume, device, quiet = args
    dist.init_process_group(_backend(device), store=dist.FileStore(rendezvous, world), rank=rank, world_size=world)
    try:
        result = _train(base, data, name, cfg, resume, device, quiet, None, rank, world)
        if rank == 0:
            Path(out).write_text(json.dumps(result), encoding="utf-8")
    except OwnlmError as e:  # handed to the launching process, which raises it as its own
        Path(f"{out}.error{rank}").write_text(json.dumps({"message": e.message, "hint": e.hint,
                                                         "exit_code": e.exit_code}), encoding="utf-8")
        raise
    finally:
        dist.destroy_process_group()


class WorkerError(OwnlmError):
    """An error a process of --nproc raised, as it raised it (message, hint, exit status)."""

    def __init__(self, message: str, hint: str | None, exit_code: int):
        super().__init__(message, hint)
        self.exit_code = exit_code


def _launch(base, data, name, cfg, resume, device, nproc, quiet) -> dict[str, Any]:
    import torch.multiprocessing as mp

    if nproc > 64:
        raise BadRequest(f"--nproc {nproc} is more than one machine runs; use torchrun across nodes")
    if pick_device(device).type == "cuda" and nproc > torch.cuda.device_count():
        gpus = torch.cuda.device_count()
        raise BadRequest(f"--nproc {nproc} needs a GPU per process and this machine has {gpus}",
                         f"use --nproc {gpus}, or --device cpu for {nproc} CPU processes")
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        try:
            mp.start_processes(_worker, args=(nproc, str(Path(tmp) / "rendezvous"),
                                              (base, str(data), name, cfg, resume, device, quiet), out),
                               nprocs=nproc, join=True, start_method="spawn")
        except Exception:  # torch's wrapper of a process's failure: the error itself where there is one
            for rank in range(nproc):
                raised = Path(f"{out}.error{rank}")
                if raised.exists():
                    e = json.loads(raised.read_text(encoding="utf-8"))
                    raise WorkerError(e["message"], e["hint"], e["exit_code"]) from None
            raise
        return json.loads(Path(out).read_text(encoding="utf-8"))

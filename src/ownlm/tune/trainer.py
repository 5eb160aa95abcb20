"""One training loop for LoRA, QLoRA and full fine-tuning, on one process or data-parallel over
torch.distributed (FSDP2).

The data stream is a pure function of the seed: rows are packed once, each epoch visits them in a
seeded order, and step s takes the rows [s * rows_per_step, (s + 1) * rows_per_step) of that
stream. A checkpoint therefore needs only the step to restore the data position; with the model,
optimizer, scheduler and RNG states restored, a resumed run computes what the uninterrupted run
would have. The loss of a step is the mean over all its target tokens, whatever the number of
micro-batches or processes they were spread over."""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import BadRequest, OwnlmError
from ..model import adapters, cpu
from ..model.transformer import Transformer
from ..progress import Bar
from . import checkpoints
from . import grpo
from . import objectives
from . import rewards
from .data import Dataset, Encoder, Graded, Pair, Preferences, Row, collate, load_dataset, load_preferences, pack, \
    predicts, split

METHODS = ("lora", "qlora", "full")


# settings a resumed run may change: how often it evaluates and saves, how many checkpoints it keeps,
# recomputing activations (the same numbers); every other one shapes what the steps compute
RESUME_MAY_CHANGE = {"eval_every", "save_every", "keep", "grad_checkpointing", "skip_bad"}


class TrainingError(OwnlmError):
    """Training went numerically wrong (a loss or gradient that is not a number)."""


@dataclass
class TuneConfig:
    method: str = "lora"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str = "all-linear"
    rslora: bool = False
    lr: float | None = None  # default: learning_rate's, by objective and method
    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 512
    pack: bool = True
    warmup: float = 0.05  # fraction of the steps
    weight_decay: float = 0.0
    clip: float = 1.0
    grad_checkpointing: bool = False
    seed: int = 0
    format: str = "auto"
    train_on: str = "assistant"
    skip_bad: bool = False
    val_split: float = 0.0
    val_file: str | None = None
    eval_every: int | None = None
    save_every: int | None = None
    keep: int = 2
    objective: str = "sft"  # or dpo, ipo, orpo, kto, grpo (objectives.OBJECTIVES); method: the weights trained
    beta: float | None = None  # default 0.1; GRPO's KL coefficient, default 0.04
    # GRPO: rewards (specs, see rewards.py), completions per prompt, sampling, clipping
    rewards: tuple[str, ...] = ()
    reward_pattern: str | None = None
    target_length: int | None = None
    group_size: int = 4
    max_completion_tokens: int = 128
    temperature: float = 1.0
    clip_eps: float = 0.2

    def __post_init__(self) -> None:
        if self.beta is None:
            self.beta = 0.04 if self.objective == "grpo" else 0.1
        if self.method not in METHODS:
            raise BadRequest(f"unknown --method {self.method!r}", f"use one of: {', '.join(METHODS)}")
        if self.objective != "sft":
            if self.objective not in objectives.OBJECTIVES:
                raise BadRequest(f"unknown objective {self.objective!r}",
                                 f"use one of: {', '.join(objectives.OBJECTIVES)}")
            if self.val_split or self.val_file:
                raise BadRequest(f"--method {self.objective} has no validation loss yet",
                                 "leave out --val-split / --val-file")
            if not (self.beta >= 0 if self.objective == "grpo" else self.beta > 0):
                raise BadRequest(f"--beta {self.beta} must be " + ("at least 0" if self.objective == "grpo"
                                                                 else "positive"))
        if self.objective == "grpo":
            for name in ("group_size", "max_completion_tokens"):
                v = getattr(self, name)
                if not isinstance(v, int) or isinstance(v, bool) or v < (2 if name == "group_size" else 1):
                    raise BadRequest(f"--{name.replace('_', '-')} must be an integer of at least "
                                     f"{2 if name == 'group_size' else 1}, not {v!r}",
                                     "a group needs two completions to compare" if name == "group_size" else None)
            if not (isinstance(self.temperature, (int, float)) and 0 < self.temperature <= 100):
                raise BadRequest(f"--temperature {self.temperature} must be in (0, 100]",
                                 "GRPO learns from differences between sampled completions")
            if not 0 < self.clip_eps < 1:
                raise BadRequest(f"--clip-eps {self.clip_eps} must be in (0, 1)")
            self.rewards = tuple(self.rewards) or ("exact",)  # rows with an "answer", scored as `ownlm eval` does
        elif self.rewards:
            raise BadRequest("--reward goes with --method grpo")
        for name in ("rank", "batch_size", "grad_accum", "seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise BadRequest(f"--{name.replace('_', '-')} must be a positive integer, not {v!r}")
        if self.seq_len > 1 << 20:
            raise BadRequest(f"--seq-len {self.seq_len} is too large")
        if not 0 <= self.dropout < 1:
            raise BadRequest(f"--dropout {self.dropout} must be in [0, 1)")
        if not (self.epochs > 0 or self.max_steps):
            raise BadRequest("--epochs must be positive (or give --max-steps)")
        if self.lr is not None and not (0 < self.lr < 1):
            raise BadRequest(f"--lr {self.lr} is not a sensible learning rate")
        if not 0 <= self.warmup < 1:
            raise BadRequest(f"--warmup {self.warmup} must be a fraction of the steps in [0, 1)")
        try:
            adapters.parse_targets(self.targets)
        except ValueError as e:
            raise BadRequest(str(e)) from None

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        if self.objective == "grpo":
            return 1e-6 if self.method == "full" else 5e-5
        if self.objective != "sft":
            return 5e-7 if self.method == "full" else 5e-5
        return 5e-5 if self.method == "full" else 1e-3


@dataclass
class Plan:
    """What a run will do, fixed before its first step (saved with the run, checked on resume)."""

    rows: list  # Row; Pair or Graded for preference objectives
    val_rows: list[Row]
    steps: int
    rows_per_step: int
    train: Dataset | Preferences | grpo.Prompts
    val: Dataset | None = None
    data_digest: str = ""


def make_plan(cfg: TuneConfig, encoder: Encoder, data_path: str | Path, world: int = 1,
              context: int | None = None, reward_fns: list[rewards.Reward] | None = None) -> Plan:
    """context: the model's context length (GRPO checks each prompt with its completions fits)."""
    if cfg.objective == "grpo":
        return _grpo_plan(cfg, encoder, data_path, world, context, reward_fns)
    if cfg.objective != "sft":
        return _preference_plan(cfg, encoder, data_path, world)
    data = load_dataset(data_path, encoder, cfg.format, cfg.skip_bad)
    if cfg.val_file:
        train, val = data, load_dataset(cfg.val_file, encoder, cfg.format, cfg.skip_bad)
    else:
        train, val = split(data, cfg.val_split, cfg.seed)
    rows = pack(train, cfg.seq_len, cfg.pack, cfg.seed)
    val_rows = pack(val, cfg.seq_len, cfg.pack, cfg.seed) if val else []
    if cfg.batch_size % world:
        raise BadRequest(f"--batch-size {cfg.batch_size} must be a multiple of the {world} processes")
    per_step = cfg.batch_size * cfg.grad_accum
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(rows) / per_step))
    h = hashlib.sha256()
    for r in rows + [None] + val_rows:  # the exact token stream, so a resume on other data is refused
        h.update(b"|" if r is None else json.dumps([r.ids, r.mask, r.pos]).encode())
    return Plan(rows, val_rows, steps, per_step, train, val, h.hexdigest())


def _preference_plan(cfg: TuneConfig, encoder: Encoder, data_path: str | Path, world: int) -> Plan:
    prefs = load_preferences(data_path, encoder, "kto" if cfg.objective == "kto" else "pairs", cfg.seq_len,
                             cfg.skip_bad)
    if cfg.batch_size % world:
        raise BadRequest(f"--batch-size {cfg.batch_size} must be a multiple of the {world} processes")
    items = prefs.items
    order = list(range(len(items)))
    random.Random(cfg.seed).shuffle(order)
    items = [items[i] for i in order]
    per_step = cfg.batch_size * cfg.grad_accum
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(items) / per_step))
    h = hashlib.sha256(cfg.objective.encode())
    for it in items:
        rows = (it.chosen, it.rejected) if isinstance(it, Pair) else (it.row,)
        h.update(json.dumps([[r.ids, r.mask] for r in rows] + [getattr(it, "label", None)]).encode())
    return Plan(items, [], steps, per_step, prefs, None, h.hexdigest())


def _grpo_plan(cfg: TuneConfig, encoder: Encoder, data_path: str | Path, world: int, context: int | None,
               reward_fns: list[rewards.Reward] | None) -> Plan:
    if cfg.batch_size % world:  # each process samples whole groups of its share of every micro-batch
        raise BadRequest(f"--batch-size {cfg.batch_size} must be a multiple of the {world} processes")
    fns = reward_fns if reward_fns is not None else rewards.parse(cfg.rewards, cfg.reward_pattern, cfg.target_length)
    prompts = grpo.load_prompts(data_path, encoder, fns, cfg.max_completion_tokens, context or 1 << 30,
                                cfg.skip_bad)
    per_step = cfg.batch_size * cfg.grad_accum
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(prompts.items) / per_step))
    # the prompts and every setting that changes what is sampled or learned: a resume with others is refused
    h = hashlib.sha256(json.dumps(["grpo", cfg.rewards, cfg.reward_pattern, cfg.target_length, cfg.group_size,
                                   cfg.max_completion_tokens, cfg.temperature, cfg.clip_eps, cfg.beta]).encode())
    for p in prompts.items:
        h.update(json.dumps([p.ids, p.row], sort_keys=True).encode())
    return Plan(prompts.items, [], steps, per_step, prompts, None, h.hexdigest())


def sequence_logps(model: Transformer, rows: list[Row], device: torch.device,
                   amp: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p over each row's target tokens, number of targets per row), all rows in one
    forward; the output head runs only at target positions."""
    tokens, targets, pos, seg = (t.to(device) for t in collate(rows))
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        h = model(tokens, pos, segments=seg, head=False)
        sel = targets != -100
        logp = objectives.target_logps(model.head(h[sel]), targets[sel])
    which = torch.arange(len(rows), device=device).unsqueeze(1).expand_as(sel)[sel]
    sums = torch.zeros(len(rows), device=device, dtype=logp.dtype).index_add(0, which, logp)
    return sums, sel.sum(-1)


def preference_loss(model: Transformer, items: list, cfg: TuneConfig, device: torch.device,
                    amp: torch.dtype | None, world: int = 1) -> tuple[torch.Tensor, dict[str, float]]:
    """(sum of the objective over the items, sums of the metrics). Pairs: chosen and rejected
    sequences in one forward. The references are the items' cached log-probabilities. With
    several processes (each called with its share of a micro-batch), KTO's KL reference point is
    the whole micro-batch's, all-reduced, as one process computes it."""
    beta = cfg.beta
    if cfg.objective == "kto":
        p, _ = sequence_logps(model, [it.row for it in items], device, amp)
        r = torch.tensor([it.ref for it in items], device=device, dtype=p.dtype)
        good = torch.tensor([it.label for it in items], device=device)
        z0 = None
        if world > 1:
            import torch.distributed as dist

            both = torch.stack([(p - r).detach().sum(), torch.tensor(float(len(items)), dtype=p.dtype, device=device)])
            dist.all_reduce(both)
            z0 = (both[0] / both[1]).clamp(min=0)
        loss = objectives.kto(p, r, good, beta, z0=z0)
        rew = (beta * (p - r)).detach()
        kl = objectives.kto_kl(p, r) if z0 is None else z0
        return loss.sum(), {"rewards/chosen": float(rew[good].sum()), "chosen": float(good.sum()),
                            "rewards/rejected": float(rew[~good].sum()), "rejected": float((~good).sum()),
                            "kl": float(kl) * len(items)}
    n = len(items)
    s, cnt = sequence_logps(model, [it.chosen for it in items] + [it.rejected for it in items], device, amp)
    pc, pr, nc, nr = s[:n], s[n:], cnt[:n], cnt[n:]
    if cfg.objective == "orpo":
        loss = objectives.orpo(pc / nc, pr / nr, beta)
        rew_c, rew_r = beta * pc / nc, beta * pr / nr  # as TRL logs them: no reference
    else:
        ref = torch.tensor([it.ref for it in items], device=device, dtype=pc.dtype)
        rc, rr = ref[:, 0], ref[:, 1]
        loss = (objectives.dpo(pc, pr, rc, rr, beta) if cfg.objective == "dpo"
                else objectives.ipo(pc / nc, pr / nr, rc / nc, rr / nr, beta))
        rew_c, rew_r = beta * (pc - rc), beta * (pr - rr)
    rew_c, rew_r = rew_c.detach(), rew_r.detach()
    stats = {"rewards/chosen": float(rew_c.sum()), "rewards/rejected": float(rew_r.sum()),
             "rewards/margin": float((rew_c - rew_r).sum()),
             "rewards/accuracy": float((rew_c > rew_r).float().sum()), "chosen": n, "rejected": n}
    if cfg.objective != "orpo":  # per pair, the mean of π - ρ over its two sequences (ORPO has no reference)
        stats["kl"] = float((pc - rc + pr - rr).detach().sum()) / 2
    return loss.sum(), stats


def reference_logps(model: Transformer, items: list, batch_size: int, device: torch.device,
                    amp: torch.dtype | None, rank: int = 0, world: int = 1) -> None:
    """Fill each item's ref with the reference model's log-probabilities: the model with its
    adapters switched off (exactly the base), or the untrained weights of full fine-tuning.
    Several processes (a sharded model): each computes a contiguous share, padded so that all
    run the same forwards (each is a collective), and the shares are exchanged."""
    if world > 1:
        import torch.distributed as dist

        share = -(-len(items) // world)
        mine = items[rank * share:(rank + 1) * share]
        reference_logps(model, mine + items[:share - len(mine)], batch_size, device, amp)
        shares: list = [None] * world
        dist.all_gather_object(shares, [it.ref for it in mine])
        for r, refs in enumerate(shares):
            for it, v in zip(items[r * share:(r + 1) * share], refs):
                it.ref = v
        return
    was = model.training
    model.eval()
    with torch.no_grad(), adapters.disabled(model):
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            if isinstance(chunk[0], Graded):
                s, _ = sequence_logps(model, [it.row for it in chunk], device, amp)
                for it, v in zip(chunk, s.tolist()):
                    it.ref = v
            else:
                s, _ = sequence_logps(model, [it.chosen for it in chunk] + [it.rejected for it in chunk], device, amp)
                for k, it in enumerate(chunk):
                    it.ref = (float(s[k]), float(s[len(chunk) + k]))
    model.train(was)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of the model as it is now (GRPO's reference when full weights are trained)."""
    import copy

    return copy.deepcopy(model).requires_grad_(False).eval()


def step_rows(plan: Plan, step: int, seed: int) -> list[Row]:
    """The rows of optimizer step `step` (a pure function of the step and seed)."""
    n = len(plan.rows)
    out = []
    for j in range(step * plan.rows_per_step, (step + 1) * plan.rows_per_step):
        epoch, k = divmod(j, n)
        out.append(plan.rows[_order(n, seed, epoch)[k]])
    return out


_orders: dict[tuple[int, int, int], list[int]] = {}


def _order(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in _orders:
        order = list(range(n))
        random.Random(seed * 100003 + epoch).shuffle(order)
        _orders.clear()
        _orders[key] = order
    return _orders[key]


def lr_lambda(steps: int, warmup: float) -> Callable[[int], float]:
    w = int(warmup * steps)

    def f(s: int) -> float:
        if s < w:
            return (s + 1) / (w + 1)
        progress = (s - w) / max(1, steps - w)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))  # cosine to 10%

    return f


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the hardware computes bf16 natively; None (fp32) elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu.native_bf16():
        return torch.bfloat16
    return None


def batch_loss(model: Transformer, rows: list[Row], device: torch.device,
               amp: torch.dtype | None) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropy over the rows' target tokens, number of target tokens). The output
    head runs only at target positions: with loss masking, most positions need no logits."""
    tokens, targets, pos, seg = (t.to(device) for t in collate(rows))
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        h = model(tokens, pos, segments=seg, head=False)
        sel = targets != -100
        logp = objectives.target_logps(model.head(h[sel]), targets[sel])
    return -logp.sum(), int(sel.sum())


@dataclass
class Trainer:
    model: Transformer
    cfg: TuneConfig
    plan: Plan
    run_dir: Path
    device: torch.device
    rank: int = 0
    world: int = 1
    quiet: bool = False
    on_step: Callable[[dict], None] | None = None
    tokenizer: Any = None  # GRPO: decodes completions for the rewards; its stop tokens end them
    reward_fns: list[rewards.Reward] | None = None  # GRPO (default: parsed from cfg.rewards)
    # GRPO with full weights: a frozen copy of the start, the KL reference (default: copied here; several
    # processes pass one copied before the model was sharded, sharded itself)
    reference: torch.nn.Module | None = None

    def __post_init__(self) -> None:
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=self.cfg.learning_rate, weight_decay=self.cfg.weight_decay,
                                     foreach=True)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(self.plan.steps, self.cfg.warmup))
        self.amp = autocast_dtype(self.device)
        self.step = 0
        self.model.checkpointing = self.cfg.grad_checkpointing
        if self.cfg.objective in ("dpo", "ipo", "kto") and any(it.ref is None for it in self.plan.rows):
            # before any checkpoint is restored: with full weights the model is still the reference
            reference_logps(self.model, self.plan.rows, self.cfg.batch_size, self.device, self.amp, self.rank,
                            self.world)
        if self.cfg.objective == "grpo":
            if self.tokenizer is None:
                raise ValueError("GRPO needs the tokenizer")
            if self.reward_fns is None:
                self.reward_fns = rewards.parse(self.cfg.rewards, self.cfg.reward_pattern, self.cfg.target_length)
            if self.cfg.method == "full" and self.cfg.beta and self.reference is None:
                if self.world > 1:
                    raise ValueError("GRPO with full weights on several processes needs the reference copied "
                                     "before the model was sharded")
                self.reference = frozen_copy(self.model)

    # -- checkpoints --------------------------------------------------------------------------
    def _state_dicts(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        model_sd, opt_sd = get_state_dict(self.model, self.opt, options=opts)
        model_sd = {k: v for k, v in model_sd.items() if k in set(self.names)}
        flat = {}
        for name, st in opt_sd.get("state", {}).items():  # empty on all but rank 0 under FSDP
            for k, v in st.items():
                flat[f"{name}/{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        states = [self._rng_states()]
        if self.world > 1:  # each process's own: dropout draws as many numbers as its share of a batch has tokens
            import torch.distributed as dist

            states = [None] * self.world
            dist.all_gather_object(states, self._rng_states())
        for rank, st in enumerate(states):
            for k, v in st.items():
                flat[f"rng/{k}.{rank}" if rank else f"rng/{k}"] = v
        return model_sd, flat

    def _rng_states(self) -> dict[str, torch.Tensor]:
        """This process's generators: the CPU's, and on a GPU the device's (which its dropout draws from)."""
        states = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        return states

    def final_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors, whole, on the CPU (gathered from every process under FSDP)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        wanted = set(self.names)  # not the frozen buffers (int4 weights) the options keep
        return {k: v for k, v in get_model_state_dict(self.model, options=opts).items() if k in wanted}

    def save(self) -> Path | None:
        model_sd, opt_flat = self._state_dicts()  # collective under FSDP: every rank calls it
        if self.rank != 0:
            return None
        state = {"step": self.step, "scheduler": self.sched.state_dict(), "config": asdict(self.cfg),
                 "data_digest": self.plan.data_digest, "steps": self.plan.steps}
        return checkpoints.save(self.run_dir, self.step, model_sd, opt_flat, state, self.cfg.keep)

    def restore(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        model_sd, opt_flat, state = checkpoints.load(path)
        saved, now = state.get("config") or {}, json.loads(json.dumps(asdict(self.cfg)))  # tuples as the JSON's lists
        changed = [f"{k} {saved.get(k)!r} (now {now[k]!r})" for k in now
                   if k not in RESUME_MAY_CHANGE and saved.get(k, now[k]) != now[k]]
        if changed:
            raise checkpoints.CheckpointError(
                f"checkpoint {path} was made with other settings: {', '.join(changed[:4])}",
                "resume with the run's own settings, or start a new run")
        if state.get("data_digest") != self.plan.data_digest:
            raise checkpoints.CheckpointError(f"checkpoint {path} was trained on other data or settings",
                                              "resume with the same --data and settings, or start a new run")
        if set(model_sd) != set(self.names):
            raise checkpoints.CheckpointError(f"checkpoint {path} holds other trainable tensors than this run")
        opt_state: dict[str, dict[str, Any]] = {}
        for key, v in opt_flat.items():
            name, _, k = key.rpartition("/")
            if name != "rng":
                opt_state.setdefault(name, {})[k] = v
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": self.names}
                  for g in self.opt.state_dict()["param_groups"]]
        opts = StateDictOptions(full_state_dict=True, ignore_frozen_params=True, strict=False)
        set_state_dict(self.model, self.opt, model_state_dict=model_sd,
                       optim_state_dict={"state": opt_state, "param_groups": groups}, options=opts)
        self.sched.load_state_dict(state["scheduler"])
        for group, lr in zip(self.opt.param_groups, self.sched.get_last_lr()):  # the scheduler sets it only on step()
            group["lr"] = lr
        for k in self._rng_states():  # this process's states (the first process's if there were fewer)
            saved = opt_flat.get(f"rng/{k}.{self.rank}", opt_flat.get(f"rng/{k}"))
            if k == "torch":
                torch.set_rng_state(saved)
            elif saved is not None:  # (none in a checkpoint written on a CPU)
                torch.cuda.set_rng_state(saved, self.device)
        self.step = int(state["step"])

    # -- the loop -----------------------------------------------------------------------------
    def evaluate(self) -> float | None:
        if not self.plan.val_rows:
            return None
        self.model.eval()
        total, count = torch.zeros((), dtype=torch.float64), 0
        with torch.no_grad():
            rows = self.plan.val_rows[self.rank::self.world]
            for i in range(0, len(rows), self.cfg.batch_size):
                loss, n = batch_loss(self.model, rows[i:i + self.cfg.batch_size], self.device, self.amp)
                total += loss.double().cpu()
                count += n
        self.model.train()
        sums = torch.tensor([float(total), float(count)], dtype=torch.float64)
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(sums)
        return float(sums[0] / max(sums[1], 1))

    def preference_step(self) -> dict[str, Any]:
        items = step_rows(self.plan, self.step, self.cfg.seed)
        micro = [items[i:i + self.cfg.batch_size] for i in range(0, len(items), self.cfg.batch_size)]
        sums: dict[str, float] = {}
        loss_sum, tokens = 0.0, 0
        for mb in micro:
            mine = mb[self.rank::self.world]
            loss, stats = preference_loss(self.model, mine, self.cfg, self.device, self.amp, self.world)
            (loss * (self.world / len(items))).backward()
            loss_sum += float(loss.detach())
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            tokens += sum(len(r.ids) for it in mine
                          for r in ((it.chosen, it.rejected) if isinstance(it, Pair) else (it.row,)))
        norm, lr = self._apply_gradients()
        keys = sorted(sums)
        vec = self._all_sum([loss_sum, float(tokens)] + [sums[k] for k in keys])
        tot = dict(zip(keys, vec[2:]))
        rec: dict[str, Any] = {"step": self.step, "loss": vec[0] / len(items), "lr": lr, "tokens": int(vec[1])}
        nc, nr = max(tot.pop("chosen"), 1), max(tot.pop("rejected"), 1)
        rec["rewards/chosen"] = tot["rewards/chosen"] / nc
        rec["rewards/rejected"] = tot["rewards/rejected"] / nr
        if "rewards/margin" in tot:
            rec["rewards/margin"] = tot["rewards/margin"] / nc
            rec["rewards/accuracy"] = tot["rewards/accuracy"] / nc
        else:
            rec["rewards/margin"] = rec["rewards/chosen"] - rec["rewards/rejected"]
        if "kl" in tot:
            rec["kl"] = tot["kl"] / len(items)
        rec["grad_norm"] = norm
        return rec

    def grpo_step(self) -> dict[str, Any]:
        """Sample a group of completions per prompt with the current weights, score them, and take
        one optimizer step on the clipped surrogate plus beta * KL, averaged over all completion
        tokens of the step (TRL's token-level loss_type). Several processes: each samples, scores
        and learns from its share of every micro-batch, whole groups (a group's advantages need
        only its own rewards); a prompt keeps its index in the step, so its completions get the
        seeds one process gives them, and the logged sums are all-reduced."""
        cfg, G = self.cfg, self.cfg.group_size
        prompts = step_rows(self.plan, self.step, cfg.seed)
        where = [i for i in range(len(prompts)) if i % cfg.batch_size % self.world == self.rank]
        mine = [prompts[i] for i in where]
        stops = self.tokenizer.eos_ids
        comps = grpo.rollout(self.model, mine, G, cfg.max_completion_tokens, cfg.temperature, stops, cfg.seed,
                             self.step, where)
        texts = [self.tokenizer.decode(c[:-1] if c and c[-1] in stops else c) for c in comps]
        table = grpo.score(self.reward_fns, mine, texts, G)  # (n * G, rewards)
        weights = torch.tensor([r.weight for r in self.reward_fns], dtype=torch.float64)
        total = (table * weights).sum(1)  # (n * G,)
        adv = objectives.group_advantages(total, G)
        if not bool(torch.isfinite(adv).all()):  # each reward is finite; their sums or spreads overflowed
            raise rewards.RewardError(
                f"step {self.step + 1}: the rewards (weighted sums up to {float(total.abs().max()):.3g}) are too large "
                "to compare within a group", "keep rewards in a moderate range, such as 0 to 1")
        adv = adv.float()
        n_tokens = int(self._all_sum([sum(len(c) for c in comps)])[0])  # the loss is the mean over all of them
        loss_sum = kl_sum = clipped_sum = 0.0
        per_micro = cfg.batch_size // self.world
        for start in range(0, len(mine), per_micro):
            mb = mine[start:start + per_micro]
            lo, hi = start * G, (start + len(mb)) * G
            loss, stats = grpo.loss(self.model, grpo.rows_of(mb, comps[lo:hi], G), adv[lo:hi], self.device, self.amp,
                                    cfg.temperature, cfg.beta, cfg.clip_eps, self.reference)
            # FSDP averages gradients over processes: scale back up to the mean over the step's tokens
            (loss * (self.world / n_tokens)).backward()
            loss_sum += float(loss.detach())
            kl_sum += stats["kl"]
            clipped_sum += stats["clipped"]
        norm, lr = self._apply_gradients()
        sums = self._all_sum([loss_sum, kl_sum, clipped_sum, sum(len(p.ids) * G for p in mine),
                              float(total.sum()), float(total.view(-1, G).std(dim=1).sum())]
                             + table.sum(0).tolist())
        loss_sum, kl_sum, clipped_sum, prompt_tokens, reward_sum, std_sum = sums[:6]
        n = len(prompts) * G
        rec: dict[str, Any] = {"step": self.step, "loss": loss_sum / n_tokens, "lr": lr,
                               "tokens": int(prompt_tokens) + n_tokens, "reward": reward_sum / n,
                               "reward_std": std_sum / len(prompts)}
        for k, r in enumerate(self.reward_fns):
            rec[f"rewards/{r.name}"] = sums[6 + k] / n
        # the samples shown are the step's first: prompt 0's group, always the first process's
        rec.update({"kl": kl_sum / n_tokens if cfg.beta else None, "completion_length": n_tokens / n,
                    "clip_ratio": clipped_sum / n_tokens, "grad_norm": norm,
                    "samples": [{"prompt": mine[i // G].text[:200], "completion": texts[i][:200],
                                 "reward": float(total[i])} for i in range(min(2, len(comps)))]})
        return rec

    def _all_sum(self, values: list[float]) -> list[float]:
        """The values summed over the processes (float64; as they are on one process)."""
        vec = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(vec)
        return vec.tolist()

    def _apply_gradients(self) -> tuple[float | None, float]:
        """Clip, step the optimizer and the schedule, clear the gradients: (grad norm before
        clipping, or None without clipping; the learning rate the step used)."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip) if self.cfg.clip > 0 else None
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        if norm is not None:
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP
        return norm, lr

    def train_step(self) -> dict[str, Any]:
        if self.cfg.objective == "grpo":
            return self.grpo_step()
        if self.cfg.objective != "sft":
            return self.preference_step()
        rows = step_rows(self.plan, self.step, self.cfg.seed)
        micro = [rows[i:i + self.cfg.batch_size] for i in range(0, len(rows), self.cfg.batch_size)]
        total = sum(sum(predicts(r)) for r in rows)  # target tokens of the whole step, across processes
        loss_sum, tokens = 0.0, 0
        for mb in micro:
            mine = mb[self.rank::self.world]
            loss, n = batch_loss(self.model, mine, self.device, self.amp)
            # the mean over the step's targets; FSDP averages gradients over processes, so scale back up
            (loss * (self.world / max(total, 1))).backward()
            loss_sum += float(loss.detach())
            tokens += sum(len(r.ids) for r in mine)
        norm, lr = self._apply_gradients()
        loss_sum, tokens = self._all_sum([loss_sum, float(tokens)])
        return {"step": self.step, "loss": loss_sum / max(total, 1), "lr": lr, "tokens": int(tokens),
                "grad_norm": norm}

    def run(self) -> list[dict[str, Any]]:
        cfg, plan = self.cfg, self.plan
        eval_every = cfg.eval_every or max(1, plan.steps // 10)
        save_every = cfg.save_every or max(1, plan.steps // 5)
        log = self.run_dir / "metrics.jsonl"
        history = []
        bar = Bar("tune", plan.steps, quiet=self.quiet or self.rank != 0, unit="steps")
        bar.done = self.step
        t0 = time.perf_counter()
        seen = 0
        self.model.train()
        while self.step < plan.steps:
            rec = self.train_step()
            bad = [k for k in ("loss", "grad_norm") if rec.get(k) is not None and not math.isfinite(rec[k])]
            if bad:  # the weights are no longer numbers: stop before a checkpoint holds them
                raise TrainingError(f"step {self.step}: the {' and the '.join(bad)} {'is' if len(bad) == 1 else 'are'} "
                                    "not a number; the run stopped, its earlier checkpoints are kept",
                                    "try a lower --lr or look at the data; --resume continues from the last checkpoint")
            seen += rec["tokens"]
            rec["tokens_per_s"] = seen / max(time.perf_counter() - t0, 1e-9)
            rec["elapsed_s"] = time.perf_counter() - t0
            if plan.val_rows and (self.step % eval_every == 0 or self.step == plan.steps):
                rec["val_loss"] = self.evaluate()
            if self.rank == 0:
                with open(log, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
            history.append(rec)
            bar.note = f"loss {rec['loss']:.3f}" + (f" val {rec['val_loss']:.3f}" if "val_loss" in rec else "") + \
                (f" reward {rec['reward']:.3f}" if "reward" in rec else "") + f" {rec['tokens_per_s']:.0f} tok/s"
            bar(1)
            if not bar.tty and not bar.quiet and (self.step % eval_every == 0 or self.step == plan.steps):
                print(f"step {self.step}/{plan.steps} {bar.note}", file=sys.stderr, flush=True)
            if self.on_step:
                self.on_step(rec)
            if self.step % save_every == 0 or self.step == plan.steps:
                self.save()
        bar.close()
        return history

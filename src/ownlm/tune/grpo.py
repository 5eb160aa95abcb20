"""GRPO's pieces on top of the one training loop: prompt rows, rollouts through ownlm's own batch
engine with the current weights, rewards, and per-token log-probabilities of the completions.

Rollouts go through engine.scheduler's Scheduler (continuous batching, the server's path) stepped on
this thread by a Driver: every completion of a step is one request with its own seed, derived from
(--seed, step, prompt, completion), so a resumed run samples exactly what the uninterrupted one
did. A fresh scheduler serves each step, and the model's structure version is bumped first (see
rollout): the engine then starts each step from the same state whether or not the run was
resumed. Within a step, the completions of one prompt can reuse its prefilled keys and values
through the engine's prefix cache (the weights do not change during a rollout)."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..engine.sampling import SamplingParams
from ..engine.scheduler import Driver, Event, Request, Scheduler
from ..model import adapters
from . import objectives
from .data import Encoder, Row, _Bad, collate, convert_rows, to_conversation
from .rewards import Reward, check_row

MAX_RUNNING = 64  # sequences decoded together by a step's scheduler


@dataclass
class Prompt:
    ids: list[int]  # the rendered prompt, ending with the template's generation prompt
    text: str  # what reward functions get as `prompt`: the row's prompt, or its last user message
    row: dict[str, Any]  # the whole row: rewards read their fields (answer, pattern, schema, ...)
    where: str = ""


@dataclass
class Prompts:
    items: list[Prompt]
    format: str = "prompts"
    skipped: list[str] = field(default_factory=list)
    truncated: int = 0  # never: a prompt that does not fit is an error

    @property
    def examples(self) -> list[Prompt]:
        return self.items

    @property
    def tokens(self) -> int:
        return sum(len(p.ids) for p in self.items)


def to_prompt(row: Any) -> tuple[list[dict[str, str]], str]:
    """(messages to render with the generation prompt, the prompt text rewards see) of a row
    {"prompt": "..."} or {"messages": [...]} (not ending with an assistant turn)."""
    if isinstance(row, _Bad):
        raise ValueError(row.why)
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, not {type(row).__name__}")
    if isinstance(row.get("prompt"), str):
        if not row["prompt"]:
            raise ValueError("'prompt' is empty")
        return [{"role": "user", "content": row["prompt"]}], row["prompt"]
    if "prompt" in row:
        raise ValueError("'prompt' must be a string (or give 'messages')")
    if "messages" not in row:
        raise ValueError("a row needs 'prompt' (a string) or 'messages'")
    msgs = to_conversation(row, "messages")
    assert isinstance(msgs, list)
    if msgs[-1]["role"] == "assistant":
        raise ValueError("'messages' ends with an assistant turn: the model writes that one")
    users = [m["content"] for m in msgs if m["role"] == "user"]
    return msgs, users[-1] if users else msgs[-1]["content"]


def load_prompts(path: str | Path, encoder: Encoder, rewards: list[Reward], max_completion: int,
                 context: int, skip_bad: bool = False) -> Prompts:
    """Every row as a Prompt, rendered through the chat template with its generation prompt; a
    row a reward cannot score, or whose prompt with --max-completion-tokens does not fit the
    context, raises `file:line: ...` unless skip_bad."""
    def convert(where: str, row: Any) -> Prompt:
        msgs, text = to_prompt(row)
        check_row(rewards, row)
        ids = encoder.tok.encode(encoder.template.render(msgs, add_generation_prompt=True))
        if len(ids) + max_completion > context:
            raise ValueError(f"the prompt has {len(ids)} tokens: with --max-completion-tokens {max_completion} "
                             f"it does not fit the model's context of {context}")
        return Prompt(ids, text, row, where)

    items, skipped = convert_rows(path, convert, skip_bad)
    return Prompts(items, skipped=skipped)


def sample_seed(seed: int, step: int, prompt: int, completion: int) -> int:
    """The sampling seed of one completion: a pure function of the run's seed and its place."""
    digest = hashlib.sha256(f"grpo:{seed}:{step}:{prompt}:{completion}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def rollout(model: torch.nn.Module, prompts: Sequence[Prompt], group: int, max_tokens: int, temperature: float,
            stop_ids: Sequence[int], seed: int, step: int, index: Sequence[int] | None = None) -> list[list[int]]:
    """`group` completions of each prompt (prompt by prompt), sampled by the batch engine with the
    model as it is now. A completion that ended on a stop token keeps it (it is learned, so the
    model learns to stop). index: each prompt's place in the step (default 0, 1, ...), which
    seeds its completions. A model sharded by FSDP2 is gathered whole first (whole())."""
    with whole(model):
        return _rollout(model, prompts, group, max_tokens, temperature, stop_ids, seed, step,
                        range(len(prompts)) if index is None else index)


@contextmanager
def whole(model: torch.nn.Module) -> Iterator[None]:
    """Every parameter of a model sharded by FSDP2 (several processes) gathered whole while the
    block runs; nothing for another model. Each process then samples its own prompts for as many
    decode steps as they take, which differ between processes, so no forward may be a collective:
    the gathering is one all-gather per sharded module (collective: every process enters together),
    the price of one forward's, and its memory is the whole model's, as on one process. After the
    block FSDP forgets the rollout's forwards (their record drives its backward prefetching, which
    must be the same on every process) and reshards."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.set_reshard_after_forward(False)  # a forward keeps the gathered parameters
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.unshard()
    try:
        yield
    finally:
        model.reset_iter_state()  # resharded, the per-iteration record cleared
        model.set_reshard_after_forward(True)  # as fully_shard leaves them: blocks reshard after forward,
        model.set_reshard_after_forward(False, recurse=False)  # the root keeps its parameters for backward


def _rollout(model: torch.nn.Module, prompts: Sequence[Prompt], group: int, max_tokens: int, temperature: float,
             stop_ids: Sequence[int], seed: int, step: int, index: Sequence[int]) -> list[list[int]]:
    was = model.training
    model.eval()  # no dropout while sampling
    # the optimizer changed the weights in place since the last rollout: a new structure version
    # empties what the engine keeps keyed on the model (the prefix cache's keys and values of
    # earlier prompts, computed with the old weights), so every step samples from the weights as they
    # are and starts from the same engine state, resumed or not
    model.structure_version += 1
    n = len(prompts) * group
    sched = Scheduler(model, max_running=min(n, MAX_RUNNING), max_queue=n, driver=Driver())
    out: list[list[int]] = [[] for _ in range(n)]
    errors: list[BaseException] = []

    def sink(i: int):
        def emit(ev: Event) -> None:
            if ev.kind == "token":
                out[i].append(ev.token)
            elif ev.kind == "error" and ev.error is not None:
                errors.append(ev.error)
        return emit

    try:
        for j, (p, at) in enumerate(zip(prompts, index, strict=True)):
            for g in range(group):
                params = SamplingParams(temperature=temperature, seed=sample_seed(seed, step, at, g),
                                        max_tokens=max_tokens)
                sched.submit(Request(prompt=p.ids, params=params, limit=max_tokens, emit=sink(j * group + g),
                                     stop_ids=frozenset(stop_ids), keep_stop=True))
        while sched.has_work():
            sched.step()
    finally:
        sched.close()
        model.train(was)
    if errors:
        raise errors[0]
    return out


def rows_of(prompts: Sequence[Prompt], completions: Sequence[Sequence[int]], group: int) -> list[Row]:
    """Prompt + completion sequences whose targets are the completion's tokens."""
    rows = []
    for i, comp in enumerate(completions):
        p = prompts[i // group].ids
        ids = list(p) + list(comp)
        rows.append(Row(ids, [False] * len(p) + [True] * len(comp), list(range(len(ids))), [0] * len(ids)))
    return rows


def token_logps(model: torch.nn.Module, rows: list[Row], device: torch.device, amp: torch.dtype | None,
                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of every target token, row by row in order, of the logits divided by the sampling
    temperature as TRL does; the row each belongs to), all rows in one forward. One (tokens,
    vocabulary) buffer is kept for backward (objectives.target_logps)."""
    tokens, targets, pos, seg = (t.to(device) for t in collate(rows))
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        h = model(tokens, pos, segments=seg, head=False)
        sel = targets != -100
        logits = model.head(h[sel])  # (targets, V): the head only where a completion token is predicted
    x = logits.float()
    logp = objectives.target_logps(x if temperature == 1.0 else x / temperature, targets[sel])
    which = torch.arange(len(rows), device=device).unsqueeze(1).expand_as(sel)[sel]
    return logp, which


def loss(model: torch.nn.Module, rows: list[Row], adv: torch.Tensor, device: torch.device, amp: torch.dtype | None,
         temperature: float, beta: float, clip_eps: float,
         reference: torch.nn.Module | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """(sum of the per-token GRPO loss over the rows' completion tokens, {kl, clipped}: sums over
    the same tokens). adv: one advantage per row. The reference is `reference` when given (full
    fine-tuning's frozen copy), else the model with its adapters switched off. With one
    optimisation pass per batch the sampling policy is the policy itself, so the old
    log-probabilities are the current ones detached (the ratio is 1, its gradient is not)."""
    ref = None
    if beta:
        was = model.training
        with torch.no_grad():
            if reference is not None:
                ref, _ = token_logps(reference, rows, device, amp, temperature)
            else:
                model.eval()
                with adapters.disabled(model):
                    ref, _ = token_logps(model, rows, device, amp, temperature)
        model.train(was)
    logp, which = token_logps(model, rows, device, amp, temperature)
    per_tok, clipped = objectives.grpo(logp, logp.detach(), ref, adv.to(device)[which], beta, clip_eps)
    kl = float(objectives.kl_k3(logp.detach(), ref).sum()) if ref is not None else 0.0
    return per_tok.sum(), {"kl": kl, "clipped": float(clipped.sum())}


def score(rewards: list[Reward], prompts: Sequence[Prompt], texts: Sequence[str], group: int) -> torch.Tensor:
    """(completions, rewards) matrix of unweighted scores."""
    table = torch.zeros(len(texts), len(rewards), dtype=torch.float64)
    for i, text in enumerate(texts):
        p = prompts[i // group]
        for k, r in enumerate(rewards):
            table[i, k] = r(p.text, text, p.row, p.where)
    return table

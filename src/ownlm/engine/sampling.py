"""Sampling: a pure function of logits, settings, the tokens so far, and an explicit generator.
Temperature 0 means argmax; the same seed and settings give the same tokens."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from ..errors import BadRequest, ModelFormatError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF/llama.cpp style: over prompt + output
    presence_penalty: float = 0.0  # OpenAI style: over the output
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = field(default=())

    @property
    def needs_history(self) -> bool:
        """Whether sampling looks at the tokens so far (repetition / presence / frequency penalties)."""
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)

    @functools.cached_property
    def bias_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """logit_bias as (token ids, biases) tensors, made once: a bias for every token of the
        vocabulary costs one vectorized add a token, not a Python loop over them."""
        tokens = torch.tensor([t for t, _ in self.logit_bias], dtype=torch.long)
        return tokens, torch.tensor([b for _, b in self.logit_bias], dtype=torch.float64)

    @property
    def greedy(self) -> bool:
        """Whether sampling is the argmax (temperature 0, or top-k 1)."""
        return self.temperature == 0 or self.top_k == 1

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise BadRequest(f"{name}={getattr(self, name)!r} is invalid: {rule}")
        num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        check(num(self.temperature) and 0 <= self.temperature <= 100, "temperature", "must be between 0 and 100")
        check(num(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "must be a non-negative integer")
        check(num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        check(num(self.repetition_penalty) and 0 < self.repetition_penalty <= 10, "repetition_penalty",
              "must be in (0, 10]")
        check(num(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]")
        check(num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty",
              "must be in [-2, 2]")
        check(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)
                                    and -2**63 <= self.seed < 2**64), "seed", "must be an integer in [-2**63, 2**64)")
        check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1
                                          and not isinstance(self.max_tokens, bool)), "max_tokens",
              "must be a positive integer")
        check(all(isinstance(s, str) and s for s in self.stop) and len(self.stop) <= 16, "stop",
              "must be up to 16 non-empty strings")

    @classmethod
    def from_kwargs(cls, **kw: Any) -> "SamplingParams":
        """Build from OpenAI-named keywords; an unknown keyword is an error, never ignored."""
        names = {f.name for f in fields(cls)}
        if "max_completion_tokens" in kw:
            kw["max_tokens"] = kw.pop("max_completion_tokens")
        unknown = sorted(set(kw) - names)
        if unknown:
            raise BadRequest(f"unknown sampling parameter {unknown[0]!r}", f"known: {', '.join(sorted(names))}")
        kw = {k: v for k, v in kw.items() if v is not None or k in ("seed", "max_tokens")}
        stop = kw.get("stop")
        if isinstance(stop, str):
            kw["stop"] = (stop,)
        elif stop is not None:
            kw["stop"] = tuple(stop)
        if "stop_token_ids" in kw:
            kw["stop_token_ids"] = tuple(kw["stop_token_ids"])
        if isinstance(kw.get("logit_bias"), dict):
            kw["logit_bias"] = tuple((int(k), float(v)) for k, v in kw["logit_bias"].items())
        return cls(**kw)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else torch.seed())
    return g


def apply_penalties(logits: torch.Tensor, p: SamplingParams, context: torch.Tensor,
                    output: torch.Tensor) -> torch.Tensor:
    """logits: (V,) float; context: ids of prompt + output (1-D); output: ids generated so far."""
    if p.repetition_penalty != 1.0 and context.numel():
        seen = torch.unique(context)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and output.numel():
        counts = torch.bincount(output, minlength=logits.shape[-1])[: logits.shape[-1]].to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    if p.logit_bias:
        tokens, biases = p.bias_tensors
        inside = (tokens >= 0) & (tokens < logits.shape[-1])
        logits.index_add_(0, tokens[inside].to(logits.device), biases[inside].to(logits.device, logits.dtype))
    return logits


def _scores(logits: torch.Tensor, p: SamplingParams, context: torch.Tensor | None,
            output: torch.Tensor | None) -> torch.Tensor:
    """(V,) float32 logits with penalties and biases applied."""
    logits = logits.float()
    if torch.isnan(logits.max()):  # damaged weights (a hostile file can hold NaN in valid blocks); max keeps NaN
        raise ModelFormatError("the model's next-token scores are not numbers (NaN)",
                               "its weights or settings are damaged; check the file with `ownlm inspect`")
    if p.needs_history or p.logit_bias:
        empty = torch.empty(0, dtype=torch.long, device=logits.device)
        logits = apply_penalties(logits.clone(), p, empty if context is None else context,
                                 empty if output is None else output)
    return logits


def distribution(logits: torch.Tensor, p: SamplingParams, context: torch.Tensor | None = None,
                 output: torch.Tensor | None = None) -> torch.Tensor:
    """The (V,) float32 weights `sample` draws from, after penalties, temperature, top-k, min-p
    and top-p (not normalized: divide by the sum); greedy settings give a one-hot of the argmax.
    Speculative sampling (engine/speculate.py) accepts and corrects drafts against exactly this."""
    logits = _scores(logits, p, context, output)
    if p.greedy:
        return torch.zeros_like(logits).index_fill_(0, torch.argmax(logits), 1.0)
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits[logits < kth] = -math.inf
    probs = torch.softmax(logits, dim=-1)
    if p.min_p > 0:
        probs[probs < p.min_p * probs.max()] = 0
    if p.top_p < 1.0:
        probs = top_p_only(probs, p.top_p)
    return probs


def top_p_only(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """(V,) probabilities with all but the smallest set of the most likely, whose mass reaches
    top_p, set to 0. The most likely are taken 64, then 8 times as many, at a time until the last
    one taken is outside the set: a sort of the whole vocabulary costs ~4 ms at 49k entries, the
    first 64 ~0.1 ms, and the set is the one a whole sort gives (a token is kept while the mass
    before it is at most top_p, which only grows down the order)."""
    n, k = probs.shape[-1], 64
    while True:
        k = min(k, n)
        top, order = torch.topk(probs, k)  # descending
        drop = torch.cumsum(top, dim=-1) - top > top_p
        if k == n or drop[-1]:
            return torch.zeros_like(probs).scatter_(0, order, top.masked_fill(drop, 0))
        k *= 8


def draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index drawn in proportion to (V,) non-negative weights.
    Inverse CDF with one uniform draw: the same distribution as torch.multinomial, which (like
    an exponential race) draws a random number per vocabulary entry and costs ~1.5 ms at 49k
    (u < 1, so u * total < total: the first index whose cumulative mass exceeds it has p > 0)."""
    cdf = torch.cumsum(weights.double(), dim=-1)
    if not cdf[-1] > 0:  # every token masked or infinitely unlikely
        raise ModelFormatError("no token has a probability above zero", "check the sampling settings")
    u = torch.rand((), dtype=torch.float64, generator=generator) * cdf[-1]
    return min(int(torch.searchsorted(cdf, u, right=True)), weights.shape[-1] - 1)


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None,
           context: torch.Tensor | None = None, output: torch.Tensor | None = None) -> int:
    """One token id from (V,) logits."""
    if p.greedy:
        return int(torch.argmax(_scores(logits, p, context, output)))
    return draw(distribution(logits, p, context, output), generator)

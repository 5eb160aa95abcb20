"""Sentence embeddings from a decoder: the mean of the final (normalized) hidden states over a
text's tokens, L2-normalized, so a dot product is a cosine similarity."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..model.transformer import Transformer
from .generate import PREFILL_CHUNK
from .kv_cache import KVCache, span


class Stopped(Exception):
    """The caller's `stop()` said to give up (a time limit, a client gone)."""


def embed(model: Transformer, batch: Sequence[Sequence[int]], dimensions: int | None = None,
          stop: Callable[[], bool] | None = None, chunk: int = PREFILL_CHUNK) -> list[list[float]]:
    """One vector per token-id list. `dimensions` keeps the first that many components (before
    normalizing). Each list must fit the model's context: callers check, with their own wording.

    A text longer than `chunk` tokens runs chunk by chunk against a KV cache, as a prompt is
    prefilled, so attention memory grows with the text, not with its square; `stop()` is asked
    before every chunk, and a True raises Stopped, so a caller can bound the time spent."""
    out = []
    with torch.inference_mode():
        for ids in batch:  # one at a time: no padding, so no mask to get wrong
            ids = list(ids)
            if stop is not None and stop():
                raise Stopped()
            if len(ids) <= chunk:
                h = model(torch.tensor([ids], device=model.device), head=False)[0].float()  # (T, C)
                v = h.sum(0)  # (C,)
            else:
                v = _chunked_sum(model, ids, stop, chunk)
            v = v / len(ids)  # the mean over the text's tokens
            if dimensions:
                v = v[:dimensions]
            out.append(torch.nn.functional.normalize(v, dim=0).tolist())
    return out


def _chunked_sum(model: Transformer, ids: list[int], stop: Callable[[], bool] | None, chunk: int) -> torch.Tensor:
    """The sum of the final hidden states over `ids`, `chunk` tokens per forward."""
    cache = KVCache.for_model(model, 1, span(len(ids)))
    total = None
    for start in range(0, len(ids), chunk):
        if stop is not None and start and stop():
            raise Stopped()
        end = min(len(ids), start + chunk)
        cache.base, cache.length = 0, end
        x = torch.tensor([ids[start:end]], dtype=torch.long, device=model.device)  # (1, t)
        pos = torch.arange(start, end, device=model.device)[None]  # (1, t)
        h = model(x, pos, cache, head=False)[0].float().sum(0)  # (C,)
        total = h if total is None else total + h
    return total

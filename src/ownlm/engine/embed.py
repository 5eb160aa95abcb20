"""Sentence embeddings from a decoder: the mean of the final (normalized) hidden states over a
text's tokens, L2-normalized, so a dot product is a cosine similarity."""

from __future__ import annotations

from typing import Sequence

import torch

from ..model.transformer import Transformer


def embed(model: Transformer, batch: Sequence[Sequence[int]], dimensions: int | None = None) -> list[list[float]]:
    """One vector per token-id list. `dimensions` keeps the first that many components (before
    normalizing). Each list must fit the model's context: callers check, with their own wording."""
    out = []
    with torch.inference_mode():
        for ids in batch:  # one at a time: no padding, so no mask to get wrong
            h = model(torch.tensor([list(ids)], device=model.device), head=False)[0].float()  # (T, C)
            v = h.mean(0)  # (C,)
            if dimensions:
                v = v[:dimensions]
            out.append(torch.nn.functional.normalize(v, dim=0).tolist())
    return out

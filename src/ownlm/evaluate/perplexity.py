"""Perplexity of a text under a model, with a sliding window for texts longer than the context.

Every token after the first is scored exactly once, given the tokens before it in its window of up
to `window` tokens: windows start every `stride` tokens (but always at least one token before the
first token they score) and each scores only the tokens the previous one did not. Also bits per
byte (the summed negative log-likelihood over the text's UTF-8 bytes), which compares models with
different tokenizers."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..errors import BadRequest


@torch.inference_mode()
def perplexity(lm, text: str, window: int | None = None, stride: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """`progress(n, total)` is called with each window's newly scored tokens and the total to score."""
    if not text:
        raise BadRequest("the text is empty")
    ids = lm.encode(text)
    ctx = lm.config.context_length
    window = min(window or ctx, ctx)
    stride = stride or window
    if window < 2 or not 1 <= stride <= window:
        raise BadRequest(f"need window >= 2 and 1 <= stride <= window (window {window}, stride {stride})")
    if len(ids) < 2:
        raise BadRequest("the text is shorter than two tokens: nothing to score")
    model = lm.model
    device = model.device
    nll, scored, done = 0.0, 0, 1  # `done`: tokens [0, done) are scored (token 0 never is)
    begin = 0
    while done < len(ids):
        end = min(begin + window, len(ids))
        chunk = torch.tensor([ids[begin:end]], device=device)
        logp = torch.log_softmax(model(chunk)[0].float(), dim=-1)  # (T, V): row t predicts begin + t + 1
        targets = torch.tensor(ids[done:end], device=device)
        rows = logp[done - begin - 1: end - begin - 1]
        nll -= float(rows.gather(1, targets[:, None]).double().sum())
        scored += end - done
        if progress:
            progress(end - done, len(ids) - 1)
        done = end
        begin = min(begin + stride, end - 1)  # the next token to score keeps at least one token of context
    n_bytes = len(text.encode("utf-8"))
    return {"tokens": len(ids), "scored_tokens": scored, "nll": nll, "mean_nll": nll / scored,
            "perplexity": math.exp(nll / scored), "bits_per_byte": nll / (math.log(2) * n_bytes),
            "window": window, "stride": stride, "bytes": n_bytes}

"""How far one model's next-token distributions are from a reference's on the same text (e.g. a
quantized model against its source): mean and max KL(reference || other) per position, and how
often their most likely tokens agree."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import BadRequest


@torch.inference_mode()
def kl_divergence(ref, other, text: str, window: int | None = None,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """`progress(n, total)` is called with each window's positions and the total."""
    ids = ref.encode(text)
    if other.encode(text) != ids:
        raise BadRequest("the two models tokenize the text differently: KL needs the same vocabulary")
    if len(ids) < 2:
        raise BadRequest("the text is shorter than two tokens")
    window = min(window or ref.config.context_length, ref.config.context_length, other.config.context_length)
    total, worst, agree, n = 0.0, 0.0, 0, 0
    for begin in range(0, len(ids) - 1, window):
        chunk = ids[begin: begin + window]
        lp = [torch.log_softmax(m.model(torch.tensor([chunk], device=m.model.device))[0].double().cpu(), -1)
              for m in (ref, other)]
        vocab = min(lp[0].shape[-1], lp[1].shape[-1])
        a, b = lp[0][:, :vocab], lp[1][:, :vocab]
        kl = (a.exp() * (a - b)).sum(-1)  # (T,)
        total += float(kl.sum())
        worst = max(worst, float(kl.max()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += kl.numel()
        if progress:
            progress(kl.numel(), len(ids))
    return {"positions": n, "mean_kl": total / n, "max_kl": worst, "top1_agreement": agree / n, "window": window}

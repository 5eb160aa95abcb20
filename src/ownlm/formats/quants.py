"""GGUF quantized blocks -> the int4 group-wise form PyTorch's int4 kernels take, losslessly for
Q4_0 and Q4_1 (w = d * q + m  ==  (q - 8) * d + (m + 8 d))."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

INT4_TYPES = {Q.Q4_0, Q.Q4_1}


@dataclass
class Int4Weight:
    q: torch.Tensor  # (N, K) uint8 in 0..15
    scale: torch.Tensor  # (K / 32, N) float32
    zero: torch.Tensor  # (K / 32, N) float32
    group: int = 32

    def dequantize(self) -> torch.Tensor:
        s = self.scale.t().repeat_interleave(self.group, dim=1)  # (N, K)
        z = self.zero.t().repeat_interleave(self.group, dim=1)
        return (self.q.float() - 8) * s + z


def int4_from_blocks(raw: np.ndarray, qtype: Q) -> Int4Weight:
    """raw: (N, bytes per row) of Q4_0 / Q4_1 blocks."""
    n = raw.shape[0]
    if qtype == Q.Q4_1:
        blocks = raw.reshape(n, -1, 20)
        d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)[..., 0]  # (N, nb)
        m = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)[..., 0]
        qs = blocks[..., 4:20]
        zero = m + 8 * d
    elif qtype == Q.Q4_0:
        blocks = raw.reshape(n, -1, 18)
        d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)[..., 0]
        qs = blocks[..., 2:18]
        zero = np.zeros_like(d)
    else:
        raise ValueError(f"{qtype.name} is not an int4 block type")
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, -1)  # (N, K): low nibbles first, then high
    return Int4Weight(torch.from_numpy(q), torch.from_numpy(np.ascontiguousarray(d.T)),
                      torch.from_numpy(np.ascontiguousarray(zero.T)))


def concat_int4(parts: list[Int4Weight]) -> Int4Weight:
    """Stack int4 weights along the output dimension (for fused projections)."""
    return Int4Weight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts], dim=1),
                      torch.cat([p.zero for p in parts], dim=1), parts[0].group)


def quantize_int4(w: torch.Tensor, group: int = 32) -> Int4Weight:
    """Group-wise asymmetric int4 of a dense (N, K) weight: per group of `group` columns the 16
    levels span [min, max] (round to nearest), w ~ (q - 8) * scale + zero."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"input dimension {k} is not a multiple of the int4 group {group}")
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    q = ((g - lo[..., None]) / scale[..., None]).round_().clamp_(0, 15).to(torch.uint8).reshape(n, k)
    zero = lo + 8 * scale
    return Int4Weight(q, scale.t().contiguous(), zero.t().contiguous(), group)

"""GGUF blocks -> the group-wise integer weights of model/quant.py, kept in their own bytes where
the layouts agree: Q4_0 (w = d (q - 8), no offsets) and Q4_1 (w = d q + m: scale d, offset m)
and Q8_0 are exact. Q4_K's per-32 scales and mins (d * sc, dmin * m, products of a float16 and a
6-bit integer) are rounded to float16 (relative error <= 2^-11 of the scale)."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants

from ..model.quant import QuantWeight, pack_int4

QUANT_TYPES = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q4_K: 4, Q.Q8_0: 8}  # GGUF block type -> bits kept in memory
# other block types (Q5_*, Q6_K, Q2_K, ...): dequantized, then held as int8 (its rounding, at most
# 1/254 of a group's largest value, is far below theirs; half the bytes of bfloat16 and a faster
# kernel); plain float tensors stay dense
FLOAT_TYPES = {Q.F32, Q.F16, Q.BF16, Q.F64}


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte `at` of each block, as float16 (N, nb)."""
    return np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16)[..., 0]


def from_blocks(raw: np.ndarray, qtype: Q) -> QuantWeight:
    """raw: (N, bytes per row) of GGUF blocks of a type in QUANT_TYPES."""
    n = raw.shape[0]
    t = torch.from_numpy
    if qtype in (Q.Q4_0, Q.Q4_1):
        size = 18 if qtype == Q.Q4_0 else 20
        blocks = raw.reshape(n, -1, size)
        d = _f16(blocks, 0)
        offset = None if qtype == Q.Q4_0 else t(np.ascontiguousarray(_f16(blocks, 2)))
        data = np.ascontiguousarray(blocks[..., size - 16:]).reshape(n, -1)
        return QuantWeight(4, t(data), t(np.ascontiguousarray(d)), offset)
    if qtype == Q.Q8_0:
        blocks = raw.reshape(n, -1, 34)
        data = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(n, -1)
        return QuantWeight(8, t(data), t(np.ascontiguousarray(_f16(blocks, 0))))
    if qtype == Q.Q4_K:  # super-blocks of 256: d, dmin, 8 six-bit (scale, min) pairs, 128 bytes of nibbles
        blocks = raw.reshape(-1, 144)
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # (B, 1)
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, mn = gguf_quants.Q4_K.get_scale_min(blocks[:, 4:16].copy())  # (B, 8) each
        scale = (d * sc.astype(np.float32)).astype(np.float16).reshape(n, -1)
        offset = (-(dmin * mn.astype(np.float32))).astype(np.float16).reshape(n, -1)
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        q = (qs & 0x0F).reshape(n, -1)  # sub-block 2j: low nibbles of bytes 32j.., 2j+1: their high nibbles
        return QuantWeight(4, pack_int4(t(q)), t(scale), t(offset))
    raise ValueError(f"{qtype.name} is not kept quantized")



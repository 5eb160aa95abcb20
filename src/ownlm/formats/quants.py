"""Group-wise integer weights in the layout ownlm's CPU kernels read (see model/kernels.py), from
GGUF blocks or quantized at load.

Groups of 32 input columns; per group a float16 scale (and, for int4, a float16 offset):
- int4: w = q * scale + offset, q in 0..15, two per byte (byte i = q[i] | q[16 + i] << 4, the
  order of GGUF's Q4_0 / Q4_1 blocks); without offsets (symmetric) w = (q - 8) * scale. Q4_0
  (w = d (q - 8), no offsets) and Q4_1 (w = d q + m: scale d, offset m) are exact, in their bytes. Q4_K's per-32 scales and mins (d * sc, dmin * m, products of a
  float16 and a 6-bit integer) are rounded to float16 (relative error <= 2^-11 of the scale).
- int8: w = q * scale, q in -128..127. Q8_0 is exact."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants

from ..model.kernels import pack_int4, unpack_int4

GROUP = 32
QUANT_TYPES = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q4_K: 4, Q.Q8_0: 8}  # GGUF block type -> bits kept in memory
# other block types (Q5_*, Q6_K, Q2_K, ...): dequantized, then held as int8 (its rounding, at most
# 1/254 of a group's largest value, is far below theirs; half the bytes of bfloat16 and a faster
# kernel); plain float tensors stay dense
FLOAT_TYPES = {Q.F32, Q.F16, Q.BF16, Q.F64}


@dataclass
class QuantWeight:
    bits: int  # 4 or 8
    data: torch.Tensor  # (N, K/2) uint8 packed nibbles, or (N, K) int8
    scale: torch.Tensor  # (N, K/32) float16
    offset: torch.Tensor | None = None  # (N, K/32) float16, int4 only; None: -8 * scale

    @property
    def shape(self) -> tuple[int, int]:
        n, b = self.data.shape
        return n, b * 2 if self.bits == 4 else b

    def check(self) -> None:
        """ValueError unless the parts agree (the kernels read them by these shapes)."""
        n, width = self.data.shape if self.data.dim() == 2 else (0, -1)
        k = width * 2 if self.bits == 4 else width
        groups = (n, k // GROUP)
        ok = (self.bits in (4, 8) and k > 0 and k % GROUP == 0
              and self.data.dtype == (torch.uint8 if self.bits == 4 else torch.int8) and self.data.is_contiguous()
              and self.scale.dtype == torch.float16 and tuple(self.scale.shape) == groups and self.scale.is_contiguous()
              and (self.offset is None or self.bits == 4)
              and (self.offset is None or (self.offset.dtype == torch.float16 and tuple(self.offset.shape) == groups
                                           and self.offset.is_contiguous())))
        if not ok:
            raise ValueError("inconsistent quantized weight")

    def to(self, device: torch.device | str) -> "QuantWeight":
        return QuantWeight(self.bits, self.data.to(device), self.scale.to(device),
                           None if self.offset is None else self.offset.to(device))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.offset) if t is not None)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The weight as float32 (N, K), or only the given rows of it (an embedding lookup)."""
        data, scale = self.data, self.scale
        offset = self.offset
        if rows is not None:
            data, scale = data[rows], scale[rows]
            offset = offset[rows] if offset is not None else None
        q = unpack_int4(data).float() - (8 if offset is None else 0) if self.bits == 4 else data.float()
        n, k = q.shape
        w = q.view(n, k // GROUP, GROUP) * scale.float()[..., None]
        if offset is not None:
            w = w + offset.float()[..., None]
        return w.view(n, k)


def tinygemm_params(w: QuantWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """An int4 weight in the terms of PyTorch's int4 kernels (`_weight_int4pack_mm` on CUDA and its
    CPU twin): the (N, K) values 0..15 and the (K/32, N, 2) bfloat16 (scale, zero) pairs, with
    w = (q - 8) * scale + zero. Ours is w = q * scale + offset, so zero = offset + 8 * scale
    (symmetric: zero = 0, exact); both are rounded to bfloat16, the kernels' type (relative error
    <= 2^-9 of each)."""
    if w.bits != 4:
        raise ValueError("only int4 weights have a tinygemm form")
    scale = w.scale.float()
    zero = torch.zeros_like(scale) if w.offset is None else w.offset.float() + 8 * scale
    pairs = torch.stack([scale, zero], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()
    return unpack_int4(w.data), pairs


def concat(parts: list[QuantWeight]) -> QuantWeight:
    """Stack weights of the same kind along the output dimension (fused projections)."""
    offsets = [p.offset for p in parts]
    if any(o is not None for o in offsets):  # symmetric parts get their implicit offsets (exact in float16)
        offsets = [p.scale * -8 if o is None else o for p, o in zip(parts, offsets)]
    return QuantWeight(parts[0].bits, torch.cat([p.data for p in parts]), torch.cat([p.scale for p in parts]),
                       None if offsets[0] is None else torch.cat(offsets))


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


def quantize(w: torch.Tensor, bits: int) -> QuantWeight:
    """Group-wise quantization of a dense (N, K) weight (K a multiple of 32), rounding to nearest:
    int4 asymmetric (16 levels from each group's min to its max), int8 symmetric (absmax / 127).
    Values are rounded against the float16 scale they will be stored with."""
    n, k = w.shape
    if k % GROUP:
        raise ValueError(f"input dimension {k} is not a multiple of {GROUP}")
    g = w.float().reshape(n, k // GROUP, GROUP)
    if bits == 4:
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-7).half()
        offset = lo.half()
        q = ((g - offset.float()[..., None]) / scale.float()[..., None]).round_().clamp_(0, 15).to(torch.uint8)
        return QuantWeight(4, pack_int4(q.reshape(n, k)), scale, offset)
    scale = (g.abs().amax(-1) / 127).clamp_min(1e-7).half()
    q = (g / scale.float()[..., None]).round_().clamp_(-127, 127).to(torch.int8)
    return QuantWeight(8, q.reshape(n, k).contiguous(), scale)

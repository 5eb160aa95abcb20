"""Group-wise integer weights: the layout ownlm's CPU kernels read (see kernels.py), and the
operands of PyTorch's int4 kernel (tinygemm) on CUDA. Pure tensor code: formats/quants.py turns
GGUF blocks into these, linear.py computes with them.

Groups of 32 input columns; per group a float16 scale (and, for int4, a float16 offset):
- int4: w = q * scale + offset, q in 0..15, two per byte (byte i = q[i] | q[16 + i] << 4, the
  order of GGUF's Q4_0 / Q4_1 blocks); without offsets (symmetric) w = (q - 8) * scale.
- int8: w = q * scale, q in -128..127."""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP = 32


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K/2) bytes: per group of 32, byte i = q[i] | q[16 + i] << 4
    (GGUF's Q4_0 / Q4_1 order, so their blocks' bytes are used as they are)."""
    n, k = q.shape
    g = q.to(torch.uint8).reshape(n, k // 32, 2, 16)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: (N, K/2) bytes -> (N, K) uint8 values 0..15."""
    n = packed.shape[0]
    g = packed.reshape(n, -1, 16)
    return torch.stack([g & 15, g >> 4], dim=2).reshape(n, -1)


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


def tinygemm_fits(shape: tuple[int, int]) -> bool:
    """PyTorch's int4 kernels take outputs in multiples of 8 (CUDA) or 16 (its CPU twin); inputs
    are multiples of 32 already."""
    return shape[0] % 16 == 0


def tinygemm_pack(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> the weight operand of PyTorch's int4 kernel on q's device."""
    tiles = next(t for t in (8, 4, 2) if q.shape[1] % (16 * t) == 0)
    if q.device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), tiles)
    pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).contiguous()  # even column in the high nibble
    return torch.ops.aten._convert_weight_to_int4pack(pairs, tiles)


def tinygemm_mm(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor) -> torch.Tensor:
    """(M, K) bfloat16 @ the packed weight's transpose -> (M, N) bfloat16."""
    if x.device.type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scale_zero)
    return torch.ops.aten._weight_int4pack_mm(x, packed, GROUP, scale_zero)

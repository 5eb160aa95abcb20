"""Group-wise integer weights: the layout ownlm's CPU kernels read (see kernels.py), and the
operands of PyTorch's int4 kernel (tinygemm) on CUDA. Pure tensor code: formats/quants.py turns
GGUF blocks into these, linear.py computes with them.

Groups of 32 input columns; per group a float16 scale (or per super-block of 8 groups, below), and
per bit width:
- int4: w = q * scale + offset, q in 0..15, two per byte (byte i = q[i] | q[16 + i] << 4, the
  order of GGUF's Q4_0 / Q4_1 blocks); without offsets (symmetric) w = (q - 8) * scale.
- int5: q in 0..31, its low 4 bits as int4's, its 5th bit in `high` (4 bytes per group: the bit
  of q[i] is bit i // 4 of byte i % 4); w = q * scale + offset, symmetric w = (q - 16) * scale
  (GGUF's Q5_0 / Q5_1; Q5_K with `superblock`, below).
- int6: q in 0..63, low 4 bits as int4's, the top 2 in `high` (8 bytes per group: those of q[i]
  are bits 2 (i // 8) .. +1 of byte i % 8); w = (q - 32) * scale * sub, with `sub` an int8 per
  16 columns (GGUF's Q6_K exactly, with `superblock` in place of scale: per 256 columns its
  float16 d, and sub its 16-column scales).
- int8: w = q * scale, q in -128..127.
- int4 with a codebook `lut` of 16 int8 values: w = lut[q] * scale, no offsets (GGUF's IQ4_NL
  exactly; IQ4_XS exactly with `superblock` in place of scale: per 256 columns its float16 d and
  6-bit ls, scale d * (ls - 32)).
- int4 / int5 with `superblock` in place of scale and offset (GGUF's Q4_K / Q5_K exactly, K a
  multiple of 256): per 256 columns the super-block's 16 header bytes as the file holds them,
  float16 d and dmin, then 12 bytes of 6-bit scales sc and mins m (see k_factors); per group j of
  the super-block w = q * (d * sc[j]) - dmin * m[j], each factor one float32 product.
A fused projection whose parts are of different widths (Q4_K q and k with a Q6_K v) is a
QuantStack: its parts, one after another along the output dimension."""

from __future__ import annotations

import itertools
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


HIGH_BYTES = {4: 0, 5: 4, 6: 8, 8: 0}  # bytes of `high` per group of 32, by bit width
SUPER = 256  # columns per super-block (`superblock`: 16 bytes each, int6 2, a codebook's 8)
MIDPOINT = {4: 8, 5: 16, 6: 32}  # the q of a zero weight when there are no offsets
ALIGN = 64  # bytes: where the planes start, so that the kernels' vector loads never straddle cache lines


def aligned(t: torch.Tensor | None) -> torch.Tensor | None:
    """t, or a copy of it (PyTorch's CPU allocator aligns to ALIGN) where a CPU tensor starts elsewhere
    (numpy's arrays start at multiples of 16; a view inside a file at any multiple of its element
    size)."""
    if t is None or t.device.type != "cpu" or t.data_ptr() % ALIGN == 0:
        return t
    return t.clone()


# GGUF's IQ4_NL / IQ4_XS codebook (llama.cpp's kvalues_iq4nl)
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def k_factors(superblock: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, S * 16) super-block headers -> each group's scale d * sc and offset -dmin * m, float32
    (N, S * 8): bytes 4-7 hold sc 0-3 in their low 6 bits, bytes 8-11 m 0-3, bytes 12-15 the low 4
    bits of sc 4-7 (low nibbles) and of m 4-7 (high nibbles), whose top 2 bits are the top 2 of
    bytes 4-7 (sc) and 8-11 (m)."""
    n = superblock.shape[0]
    h = superblock.reshape(n, -1, 16)
    d = h[..., 0:2].contiguous().view(torch.float16).float()  # (N, S, 1)
    dmin = h[..., 2:4].contiguous().view(torch.float16).float()
    a, b, c = h[..., 4:8], h[..., 8:12], h[..., 12:16]
    sc = torch.cat([a & 63, (c & 15) | ((a >> 6) << 4)], dim=-1).float()  # (N, S, 8)
    mn = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=-1).float()
    return (sc * d).reshape(n, -1), (mn * -dmin).reshape(n, -1)


def pack_high(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, K) values of `bits` (5 or 6) -> their bits above the low 4, as `high` (see the module
    note): (N, K/8) or (N, K/4) bytes."""
    n, k = q.shape
    top = (q.to(torch.uint8) >> 4).reshape(n, k // 32, 32)
    if bits == 5:  # bit of q[i]: bit i // 4 of byte i % 4
        planes = top.reshape(n, k // 32, 8, 4)
    else:  # two bits of q[i]: bits 2 (i // 8) of byte i % 8
        planes = top.reshape(n, k // 32, 4, 8)
    width = 1 if bits == 5 else 2
    out = torch.zeros(n, k // 32, planes.shape[-1], dtype=torch.uint8)
    for j in range(planes.shape[2]):
        out |= planes[:, :, j] << (width * j)
    return out.reshape(n, -1).contiguous()


def unpack_high(high: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of pack_high: (N, K) uint8 values of the bits above the low 4."""
    n = high.shape[0]
    width, per = (1, 4) if bits == 5 else (2, 8)
    g = high.reshape(n, -1, 1, per)
    shifts = torch.arange(0, 8, width, dtype=torch.uint8).reshape(1, 1, -1, 1)
    return ((g >> shifts) & ((1 << width) - 1)).reshape(n, -1)


@dataclass
class QuantWeight:
    bits: int  # 4, 5, 6 or 8
    data: torch.Tensor  # (N, K/2) uint8 packed low nibbles, or (N, K) int8
    scale: torch.Tensor | None = None  # (N, K/32) float16 (None only with `superblock`)
    offset: torch.Tensor | None = None  # (N, K/32) float16, int4 / int5 only; None: -MIDPOINT * scale
    high: torch.Tensor | None = None  # int5 / int6: (N, K/32 * HIGH_BYTES) uint8, the bits above the low 4
    sub: torch.Tensor | None = None  # int6: (N, K/16) int8, the 16-column scales
    lut: torch.Tensor | None = None  # int4 with a codebook: (16,) int8, w = lut[q] * scale
    superblock: torch.Tensor | None = None  # in place of scale and offset: (N, K/256 * 16) uint8 (int6 2, codebook 8)

    @property
    def kind(self) -> str:
        """What the kernels instantiate for: int4, int5, int6, int8, or int4-codebook."""
        return f"int{self.bits}" + ("-codebook" if self.lut is not None else "")

    @property
    def shape(self) -> tuple[int, int]:
        n, b = self.data.shape
        return n, b if self.bits == 8 else b * 2

    def check(self) -> None:
        """ValueError unless the parts agree (the kernels read them by these shapes)."""
        bits = self.bits
        n, width = self.data.shape if self.data.dim() == 2 else (0, -1)
        k = width if bits == 8 else width * 2
        groups = (n, k // GROUP)

        def f16(t: torch.Tensor | None) -> bool:
            return t is not None and t.dtype == torch.float16 and tuple(t.shape) == groups and t.is_contiguous()

        def plane(t: torch.Tensor | None, dtype: torch.dtype, shape: tuple[int, int] | None) -> bool:
            if shape is None:
                return t is None
            return t is not None and t.dtype == dtype and tuple(t.shape) == shape and t.is_contiguous()

        if self.superblock is None:
            factors = f16(self.scale) and (self.offset is None or (bits in (4, 5) and f16(self.offset)))
        else:
            size = 2 if bits == 6 else 8 if self.lut is not None else 16
            factors = (bits in (4, 5, 6) and k % SUPER == 0 and self.scale is None and self.offset is None
                       and plane(self.superblock, torch.uint8, (n, k // SUPER * size)))
        ok = (bits in HIGH_BYTES and k > 0 and k % GROUP == 0
              and self.data.dtype == (torch.int8 if bits == 8 else torch.uint8) and self.data.is_contiguous()
              and factors
              and plane(self.high, torch.uint8, (n, k // GROUP * HIGH_BYTES[bits]) if HIGH_BYTES[bits] else None)
              and plane(self.sub, torch.int8, (n, k // 16) if bits == 6 else None)
              and (self.lut is None or (bits == 4 and self.offset is None and self.lut.dtype == torch.int8
                                        and tuple(self.lut.shape) == (16,) and self.lut.is_contiguous())))
        if not ok:
            raise ValueError("inconsistent quantized weight")

    def tensors(self) -> dict[str, torch.Tensor]:
        """The parts that are held, by name."""
        return {name: t for name in ("data", "scale", "offset", "high", "sub", "lut", "superblock")
                if (t := getattr(self, name)) is not None}

    def to(self, device: torch.device | str) -> "QuantWeight":
        return QuantWeight(self.bits, **{name: t.to(device) for name, t in self.tensors().items()})

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def rows(self, rows: torch.Tensor | slice) -> "QuantWeight":
        """Only the given output rows (an embedding lookup, or a slice of them)."""
        return QuantWeight(self.bits, **{name: t if name == "lut" else t[rows] for name, t in self.tensors().items()})

    def factors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each group's scale and offset as float32 (N, K/32), the offset None where the weight has
        none (symmetric, or int6 / int8 / a codebook)."""
        if self.superblock is not None and self.lut is not None:  # IQ4_XS: d (ls - 32)
            n = self.superblock.shape[0]
            h = self.superblock.reshape(n, -1, 8)
            d = h[..., 0:2].contiguous().view(torch.float16).float()  # (N, S, 1)
            high = (h[..., 2:4].contiguous().view(torch.int16).int()[..., None] >> torch.arange(0, 16, 2)) & 3
            low = torch.stack([h[..., 4:8] & 15, h[..., 4:8] >> 4], dim=-1).reshape(n, -1, 8).int()
            return (((low | (high[..., 0, :] << 4)) - 32).float() * d).reshape(n, -1), None
        if self.superblock is not None and self.bits == 6:  # d per 256 columns, for its 8 groups
            n = self.superblock.shape[0]
            d = self.superblock.reshape(n, -1, 2).contiguous().view(torch.float16).float()
            return d.expand(n, d.shape[1], 8).reshape(n, -1), None
        if self.superblock is not None:
            return k_factors(self.superblock)
        return self.scale.float(), None if self.offset is None else self.offset.float()

    def dequantize(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """The weight as float32 (N, K), or only the given rows of it (an embedding lookup, a slice)."""
        w = self if rows is None else self.rows(rows)
        scale, offset = w.factors()
        if w.bits == 8:
            q = w.data.float()
        else:
            q = unpack_int4(w.data)
            if w.high is not None:
                q = q | (unpack_high(w.high, w.bits) << 4)
            if w.lut is not None:
                q = w.lut.float()[q.long()]
            else:
                q = q.float()
                if offset is None:
                    q = q - MIDPOINT[w.bits]
        n, k = q.shape
        scale = scale[..., None]
        if w.sub is not None:  # int6: a scale per 16 columns, d * sub (exact in float32)
            out = q.view(n, k // 16, 16) * (scale.repeat_interleave(2, dim=1) * w.sub.float()[..., None])
            return out.view(n, k)
        out = q.view(n, k // GROUP, GROUP) * scale
        if offset is not None:
            out = out + offset[..., None]
        return out.view(n, k)


@dataclass
class QuantStack:
    """A fused projection whose parts are of different kinds: their outputs, one after another."""
    parts: list[QuantWeight]

    @property
    def shape(self) -> tuple[int, int]:
        return sum(p.shape[0] for p in self.parts), self.parts[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def to(self, device: torch.device | str) -> "QuantStack":
        return QuantStack([p.to(device) for p in self.parts])

    def dequantize(self) -> torch.Tensor:
        return torch.cat([p.dequantize() for p in self.parts])


def tinygemm_params(w: QuantWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """An int4 weight in the terms of PyTorch's int4 kernels (`_weight_int4pack_mm` on CUDA and its
    CPU twin): the (N, K) values 0..15 and the (K/32, N, 2) bfloat16 (scale, zero) pairs, with
    w = (q - 8) * scale + zero. Ours is w = q * scale + offset, so zero = offset + 8 * scale
    (symmetric: zero = 0, exact); both are rounded to bfloat16, the kernels' type (relative error
    <= 2^-9 of each)."""
    if w.kind != "int4":
        raise ValueError("only int4 weights (without a codebook) have a tinygemm form")
    scale, offset = w.factors()
    zero = torch.zeros_like(scale) if offset is None else offset + 8 * scale
    pairs = torch.stack([scale, zero], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()
    return unpack_int4(w.data), pairs


def concat(parts: list[QuantWeight]) -> QuantWeight | QuantStack:
    """Stack weights along the output dimension (fused projections): one weight where the parts
    are of one width (symmetric int4 / int5 parts get their implicit offsets, exact in float16,
    where others have offsets), else a QuantStack of the runs of one width, each joined so."""
    def key(p: QuantWeight) -> tuple:  # what one kernel call can take: one kind, one codebook, one layout
        return p.kind, None if p.lut is None else tuple(p.lut.tolist()), p.superblock is None

    runs = [list(run) for _, run in itertools.groupby(parts, key=key)]
    if len(runs) > 1:
        return QuantStack([run[0] if len(run) == 1 else concat(run) for run in runs])
    offsets = [p.offset for p in parts]
    if any(o is not None for o in offsets):
        offsets = [p.scale * -MIDPOINT[p.bits] if o is None else o for p, o in zip(parts, offsets)]
    fields = {name: torch.cat([p.tensors()[name] for p in parts]) for name in parts[0].tensors()
              if name not in ("offset", "lut")}
    return QuantWeight(parts[0].bits, **fields, offset=None if offsets[0] is None else torch.cat(offsets),
                       lut=parts[0].lut)


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


def tinygemm_on_cpu() -> bool:
    """Whether this PyTorch has the CPU twin of its int4 kernel (2.6 and later)."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


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

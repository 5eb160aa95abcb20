"""GGUF blocks -> the group-wise integer weights of model/quant.py, each type in its own bits (no
requantization): Q4_0 (w = d (q - 8), no offsets), Q4_1 (w = d q + m: scale d, offset m), Q5_0,
Q5_1, Q8_0, Q4_K and Q5_K (w = q d sc - dmin m, their super-blocks' headers kept as they are)
and Q6_K (w = d sc (q - 32), its d and 16-column int8 scales kept) are exact, and hold the file's
bytes, as do IQ4_NL (w = d lut[q], a codebook of 16 int8 values) and IQ4_XS (the same codebook,
w = d (ls - 32) lut[q], its super-blocks' d and 6-bit ls kept)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from ..model.quant import IQ4_VALUES, QuantWeight, concat, pack_high, pack_int4

# GGUF block type -> bits kept in memory
QUANT_TYPES = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q4_K: 4, Q.Q5_0: 5, Q.Q5_1: 5, Q.Q5_K: 5, Q.Q6_K: 6, Q.Q8_0: 8,
               Q.IQ4_NL: 4, Q.IQ4_XS: 4}
# other block types (Q2_K, Q3_K, the other IQ types, ...): dequantized, then held as int8 (its rounding, at most
# 1/254 of a group's largest value, is far below theirs; half the bytes of bfloat16 and a faster
# kernel); plain float tensors stay dense
FLOAT_TYPES = {Q.F32, Q.F16, Q.BF16, Q.F64}


# the blocks whose fields are kept as they are: (field, numpy type) in block order
_PLAIN = {Q.Q4_0: (("d", "<f2"), ("q", "V16")), Q.Q4_1: (("d", "<f2"), ("m", "<f2"), ("q", "V16")),
          Q.Q8_0: (("d", "<f2"), ("q", "V32")), Q.IQ4_NL: (("d", "<f2"), ("q", "V16"))}
_POOL: ThreadPoolExecutor | None = None
_PARALLEL_BYTES = 1 << 20


def _fields(raw: np.ndarray, qtype: Q) -> dict[str, np.ndarray]:
    """Each field of the blocks of (N, bytes per row) `raw` as a contiguous (N, blocks per row)
    array, copied field by field as whole items (not byte by byte), large tensors by several
    threads (numpy copies without the GIL): the copies of a load, and the first touch of their
    pages, are most of a quantized model's load time."""
    n = raw.shape[0]
    blocks = raw.reshape(-1).view(np.dtype(list(_PLAIN[qtype]))).reshape(n, -1)
    out = {name: np.empty(blocks.shape, dtype=t) for name, t in _PLAIN[qtype]}

    def copy(rows: slice) -> None:
        for name, dst in out.items():
            dst[rows] = blocks[name][rows]
    _by_rows(copy, n, raw.nbytes)
    return out


def _by_rows(fn, n: int, nbytes: int) -> list:
    """fn(rows) for row ranges covering 0..n: one call for a small tensor, else one range per
    thread (up to 8, one per core), run together; their results in row order."""
    global _POOL
    workers = min(os.cpu_count() or 1, 8, n)
    if nbytes < _PARALLEL_BYTES or workers < 2:
        return [fn(slice(0, n))]
    if _POOL is None:
        _POOL = ThreadPoolExecutor(8, thread_name_prefix="ownlm-load")
    step = -(-n // workers)
    return list(_POOL.map(fn, [slice(i, i + step) for i in range(0, n, step)]))


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte `at` of each block, as float16 (N, nb)."""
    return np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16)[..., 0]


def _superblock(blocks: np.ndarray, n: int) -> torch.Tensor:
    """Q4_K / Q5_K super-blocks: their 16 header bytes (d, dmin, the 6-bit scales and mins) as they
    are, (N, K/256 * 16)."""
    return torch.from_numpy(np.ascontiguousarray(blocks[:, :16]).reshape(n, -1))


def _with_high(q: np.ndarray, n: int, bits: int, scale: torch.Tensor | None, offset: torch.Tensor | None = None,
               sub: torch.Tensor | None = None, superblock: torch.Tensor | None = None) -> QuantWeight:
    """(N*K/32, 32) values of `bits` in column order -> a QuantWeight of that width."""
    q = torch.from_numpy(np.ascontiguousarray(q).reshape(n, -1))
    return QuantWeight(bits, pack_int4(q & 15), scale, offset, pack_high(q, bits), sub, superblock=superblock)


def from_blocks(raw: np.ndarray, qtype: Q) -> QuantWeight:
    """raw: (N, bytes per row) of GGUF blocks of a type in QUANT_TYPES."""
    n = raw.shape[0]
    t = torch.from_numpy
    if qtype in _PLAIN:  # d [, m], the values: each kept as it is
        f = _fields(raw, qtype)
        data = f["q"].view(np.int8 if qtype == Q.Q8_0 else np.uint8).reshape(n, -1)
        lut = t(np.array(IQ4_VALUES, dtype=np.int8)) if qtype == Q.IQ4_NL else None
        return QuantWeight(8 if qtype == Q.Q8_0 else 4, t(data), t(f["d"]), t(f["m"]) if "m" in f else None,
                           lut=lut)
    # the other types are decoded: rows of a large tensor by several threads (numpy computes
    # without the GIL), then joined
    parts = _by_rows(lambda rows: _decode(raw[rows], qtype), n, raw.nbytes)
    return parts[0] if len(parts) == 1 else concat(parts)


def _decode(raw: np.ndarray, qtype: Q) -> QuantWeight:
    n = raw.shape[0]
    t = torch.from_numpy
    if qtype in (Q.Q5_0, Q.Q5_1):  # d [, m], 32 high bits (bit i: q[i]'s), 16 bytes of nibbles as Q4_0's
        size = 22 if qtype == Q.Q5_0 else 24
        blocks = raw.reshape(-1, size)
        at = size - 20
        qh = blocks[:, at:at + 4].copy().view("<u4")  # (B, 1)
        high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # (B, 32)
        qs = blocks[:, at + 4:]
        q = np.concatenate([qs & 15, qs >> 4], axis=1) | (high << 4)
        scale = t(np.ascontiguousarray(_f16(blocks, 0)).reshape(n, -1))
        offset = None if qtype == Q.Q5_0 else t(np.ascontiguousarray(_f16(blocks, 2)).reshape(n, -1))
        return _with_high(q, n, 5, scale, offset)
    if qtype == Q.Q4_K:  # super-blocks of 256: d, dmin, 8 six-bit (scale, min) pairs, 128 bytes of nibbles
        blocks = raw.reshape(-1, 144)
        # sub-block 2j: the low nibbles of bytes 32j.., 2j+1: their high nibbles; in the int4 layout
        # (byte i of a group: q[i] | q[16 + i] << 4) straight from the bytes i and 16 + i
        qs = blocks[:, 16:].reshape(-1, 4, 2, 16)
        lo, hi = qs[:, :, 0], qs[:, :, 1]
        data = np.empty((blocks.shape[0], 4, 2, 16), dtype=np.uint8)
        np.bitwise_or(lo & 15, hi << 4, out=data[:, :, 0])
        np.bitwise_or(lo >> 4, hi & 0xF0, out=data[:, :, 1])
        return QuantWeight(4, t(data.reshape(n, -1)), superblock=_superblock(blocks, n))
    if qtype == Q.Q5_K:  # as Q4_K, with 32 bytes of high bits (sub-block s: bit s of byte l for its q[l])
        blocks = raw.reshape(-1, 176)
        qs = blocks[:, 48:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        high = (blocks[:, None, 16:48] >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1  # (B, 8, 32)
        q = (qs & 15).reshape(-1, 8, 32) | (high << 4)
        return _with_high(q, n, 5, None, superblock=_superblock(blocks, n))
    if qtype == Q.Q6_K:  # 128 bytes of low nibbles, 64 of high pairs, 16 int8 scales, d; per half of 128:
        blocks = raw.reshape(-1, 210)  # q[32i + l] from byte l (i even) or 32 + l (i odd), pair i of qh[l]
        ql = blocks[:, :128].reshape(-1, 2, 2, 32)  # (B, half, byte l or 32 + l, l)
        qh = blocks[:, 128:192].reshape(-1, 2, 1, 32)
        low = np.stack([ql[:, :, 0] & 15, ql[:, :, 1] & 15, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
        high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3  # (B, half, 4, 32)
        q = (low | (high << 4)).reshape(-1, 32)
        sub = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8)
        d = t(np.ascontiguousarray(blocks[:, 208:210]).reshape(n, -1))  # its float16 d, as bytes
        return _with_high(q, n, 6, None, sub=t(sub.reshape(n, -1)), superblock=d)
    if qtype == Q.IQ4_XS:  # 4-bit indices into a codebook, nibbles in Q4_0's order
        lut = t(np.array(IQ4_VALUES, dtype=np.int8))
        blocks = raw.reshape(-1, 136)  # per 256: d, 8 six-bit scales (high 2 bits, then low 4), 8 x 16 bytes
        data = np.ascontiguousarray(blocks[:, 8:]).reshape(n, -1)
        head = t(np.ascontiguousarray(blocks[:, :8]).reshape(n, -1))  # d and the scales, as they are
        return QuantWeight(4, t(data), lut=lut, superblock=head)
    raise ValueError(f"{qtype.name} is not kept quantized")

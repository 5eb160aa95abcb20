"""A validating GGUF reader.

Every count, length and offset in the header is checked against the file before anything is
allocated, so a truncated or hostile file raises ModelFormatError instead of crashing, hanging or
allocating gigabytes; every metadata key ownlm reads is checked against model/metadata.py's schema.
Tensor data stays in a read-only memory map; records are views into it.
Quantization codecs and type tables come from the `gguf` package (llama.cpp's own Python code).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from ..errors import ModelFormatError
from ..model import metadata

MAGIC = b"GGUF"
MAX_TENSORS = 1 << 17
MAX_KV = 1 << 16
MAX_ARRAY = 1 << 24
MAX_STRING = 1 << 26  # 64 MiB: far beyond any chat template or token
MAX_NAME = 256
MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32

# value type id -> (struct format, numpy dtype); 8 = string, 9 = array
_SCALARS = {
    0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
    4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
    10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64),
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: outermost first (GGUF stores ne0 innermost)
    qtype: GGMLQuantizationType
    offset: int  # absolute offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return self.qtype.name

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


_U64 = struct.Struct("<Q")


class _Cursor:
    def __init__(self, buf: memoryview, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str) -> ModelFormatError:
        return ModelFormatError(
            f"{self.path}: not a valid GGUF file: {what} (at byte {self.pos})",
            "the file is truncated or corrupt; download it again",
        )

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"needs {n} bytes but the file ends after {len(self.buf) - self.pos}")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self, limit: int = MAX_STRING) -> str:
        n = self.scalar("<Q")
        if n > limit or n > len(self.buf) - self.pos:
            raise self.fail(f"string length {n} exceeds the limit or the file")
        raw = bytes(self.take(n))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        """`count` strings in a row (a vocabulary and its merges: some 100k) in one tight loop,
        with string()'s checks."""
        buf, pos, end = self.buf, self.pos, len(self.buf)
        length = _U64.unpack_from
        out: list[str] = []
        append = out.append
        for _ in range(count):
            if pos + 8 > end:
                self.pos = pos
                raise self.fail(f"needs 8 bytes but the file ends after {end - pos}")
            (n,) = length(buf, pos)
            pos += 8
            if n > MAX_STRING or n > end - pos:
                self.pos = pos
                raise self.fail(f"string length {n} exceeds the limit or the file")
            raw = buf[pos:pos + n].tobytes()
            pos += n
            try:
                append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                append(raw.decode("utf-8", errors="replace"))
        self.pos = pos
        return out

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype][0])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            if depth > 0:
                raise self.fail("nested arrays are not supported")
            etype = self.scalar("<I")
            count = self.scalar("<Q")
            remaining = len(self.buf) - self.pos
            if count > MAX_ARRAY:
                raise self.fail(f"array of {count} elements exceeds the limit of {MAX_ARRAY}")
            if etype in _SCALARS:
                fmt, dtype = _SCALARS[etype]
                size = struct.calcsize(fmt) * count
                if size > remaining:
                    raise self.fail(f"array of {count} elements runs past the end of the file")
                return np.frombuffer(self.take(size), dtype=np.dtype(dtype).newbyteorder("<")).copy()
            if etype == _STRING:
                if count * 8 > remaining:
                    raise self.fail(f"array of {count} strings runs past the end of the file")
                return self.strings(count)
            if etype == _ARRAY:
                raise self.fail("nested arrays are not supported")
            raise self.fail(f"unknown array element type {etype}")
        raise self.fail(f"unknown metadata value type {vtype}")


class GGUFFile:
    """A parsed, validated GGUF file: `metadata` (key -> python value / numpy array) and
    `tensors` (name -> TensorInfo); `raw(name)` gives the tensor's bytes as a numpy view."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise ModelFormatError(f"cannot open {self.path}: {e.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size < 24:
                raise ModelFormatError(f"{self.path}: not a GGUF file (only {size} bytes)")
            self._mmap = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self.size = size
        self._parse(memoryview(self._mmap))

    def _parse(self, buf: memoryview) -> None:
        c = _Cursor(buf, self.path)
        if bytes(c.take(4)) != MAGIC:
            raise ModelFormatError(f"{self.path}: not a GGUF file (bad magic)",
                                   "expected a .gguf from llama.cpp's tools")
        version = c.scalar("<I")
        if version not in (2, 3):
            if version in (2 << 24, 3 << 24):
                raise ModelFormatError(f"{self.path}: big-endian GGUF files are not supported")
            raise ModelFormatError(f"{self.path}: unsupported GGUF version {version}", "versions 2 and 3 are supported")
        self.version = version
        n_tensors, n_kv = c.scalar("<Q"), c.scalar("<Q")
        if n_tensors > MAX_TENSORS:
            raise c.fail(f"tensor count {n_tensors} exceeds the limit of {MAX_TENSORS}")
        if n_kv > MAX_KV:
            raise c.fail(f"metadata count {n_kv} exceeds the limit of {MAX_KV}")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = c.string(MAX_NAME * 4)
            vtype = c.scalar("<I")
            if key in meta:
                raise c.fail(f"duplicate metadata key {key!r}")
            meta[key] = c.value(vtype)
        # every key ownlm reads, as the type the schema declares (not the type the file holds)
        self.metadata = metadata.check_gguf(meta, self.path)

        infos = []
        for _ in range(n_tensors):
            name = c.string(MAX_NAME)
            n_dims = c.scalar("<I")
            if not 1 <= n_dims <= MAX_DIMS:
                raise c.fail(f"tensor {name!r} has {n_dims} dimensions")
            dims = [c.scalar("<Q") for _ in range(n_dims)]
            tid = c.scalar("<I")
            offset = c.scalar("<Q")
            infos.append((name, dims, tid, offset))

        alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, (int, np.integer)) or alignment <= 0 or alignment & (alignment - 1):
            raise c.fail(f"general.alignment {alignment!r} is not a power of two")
        alignment = int(alignment)
        data_start = (c.pos + alignment - 1) // alignment * alignment
        self.data_start = data_start

        tensors: dict[str, TensorInfo] = {}
        for name, dims, tid, offset in infos:
            if name in tensors:
                raise c.fail(f"duplicate tensor name {name!r}")
            try:
                qtype = GGMLQuantizationType(tid)
            except ValueError:
                raise ModelFormatError(f"{self.path}: tensor {name!r} has unknown type id {tid}",
                                       "this file needs a newer ownlm or is corrupt") from None
            if qtype not in GGML_QUANT_SIZES:
                raise ModelFormatError(f"{self.path}: tensor {name!r} has unsupported type {qtype.name}")
            block, tsize = GGML_QUANT_SIZES[qtype]
            if any(d <= 0 or d > 1 << 40 for d in dims):
                raise c.fail(f"tensor {name!r} has dimensions {dims}")
            n = 1
            for d in dims:
                n *= d
            if n > 1 << 42 or dims[0] % block:
                raise c.fail(f"tensor {name!r} shape {dims} does not fit type {qtype.name}")
            nbytes = n // block * tsize
            if offset % alignment:
                raise c.fail(f"tensor {name!r} offset {offset} is not aligned to {alignment}")
            start = data_start + offset
            if start + nbytes > self.size:
                raise ModelFormatError(
                    f"{self.path}: tensor {name!r} data ({nbytes} bytes at {start}) lies outside the file "
                    f"of {self.size} bytes", "the file is truncated or corrupt; download it again")
            tensors[name] = TensorInfo(name, tuple(reversed(dims)), qtype, start, nbytes)
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise ModelFormatError(f"{self.path}: tensors {a!r} and {b!r} overlap")
        self.tensors = tensors

    # -- access ---------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelFormatError(f"{self.path}: general.architecture is missing")
        return arch

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a uint8 view, shaped (rows..., bytes per row)."""
        t = self.tensors[name]
        block, tsize = GGML_QUANT_SIZES[t.qtype]
        row_bytes = t.shape[-1] // block * tsize
        flat = np.frombuffer(self._mmap, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        return flat.reshape(*t.shape[:-1], row_bytes)

    def dequantize(self, name: str) -> np.ndarray:
        """float32 values of any type the `gguf` package can decode."""
        t = self.tensors[name]
        raw = self.raw(name)
        if t.qtype == GGMLQuantizationType.F32:
            return raw.view(np.float32).reshape(t.shape)
        try:
            out = gguf_quants.dequantize(raw, t.qtype)
        except NotImplementedError:
            raise ModelFormatError(f"{self.path}: tensor {name!r} uses {t.qtype.name}, which cannot be decoded yet",
                                   "re-quantize the model to a k-quant or Q8_0") from None
        return out.reshape(t.shape).astype(np.float32, copy=False)

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process's memory (they stay in the page cache and
        come back if read again): a loader that has copied a tensor calls this, so the mapped
        file does not add its size to the process's peak."""
        t = self.tensors[name]
        start = t.offset - t.offset % mmap.PAGESIZE
        try:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, t.offset + t.nbytes - start)
        except (AttributeError, OSError, ValueError):
            pass  # no madvise here: the pages stay until the file is closed

    def close(self) -> None:
        try:
            self._mmap.close()
        except BufferError:
            pass  # views still alive; the map goes when they do

"""Hugging Face folders: config.json, *.safetensors (memory-mapped, header validated),
tokenizer.json, tokenizer_config.json. Pickle checkpoints are refused; no remote code runs."""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from ..errors import ModelFormatError

MAX_HEADER = 100 << 20
MAX_JSON = 64 << 20
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}

HF_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "special_tokens_map.json", "model.safetensors.index.json")


def refuse_pickle(path: str | Path) -> None:
    raise ModelFormatError(
        f"{path}: pickle checkpoints (.bin/.pt/.pth) are refused because loading them can run code",
        "convert once where you trust the file: AutoModelForCausalLM.from_pretrained(dir)"
        ".save_pretrained(out, safe_serialization=True)")


def read_json(path: str | Path, limit: int = MAX_JSON) -> Any:
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limit:
            raise ModelFormatError(f"{path}: {size} bytes is too large for a JSON config")
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFormatError(f"{path} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}: invalid JSON ({e})") from None


def model_files(folder: str | Path) -> dict[str, Path]:
    """The files of an HF folder that make a model, by relative name; refuses pickle-only folders."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelFormatError(f"{folder}: no config.json", "an HF model folder needs config.json and *.safetensors")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickles = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            refuse_pickle(pickles[0])
        raise ModelFormatError(f"{folder}: no *.safetensors weights")
    files = {p.name: p for p in weights}
    for name in HF_FILES:
        if (folder / name).is_file():
            files[name] = folder / name
    if "tokenizer.json" not in files:
        raise ModelFormatError(f"{folder}: no tokenizer.json",
                               "save the tokenizer with tokenizer.save_pretrained(folder)")
    return files


class SafetensorsFile:
    """One .safetensors file: header validated against the file size, tensors as zero-copy views
    of a private (copy-on-write) memory map."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise ModelFormatError(f"{self.path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER or 8 + n > size:
                raise ModelFormatError(f"{self.path}: header length {n} is invalid for a file of {size} bytes")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ModelFormatError(f"{self.path}: invalid safetensors header ({e})") from None
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
        if not isinstance(header, dict):
            raise ModelFormatError(f"{self.path}: invalid safetensors header")
        self.metadata = header.pop("__metadata__", None) or {}
        base = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype = DTYPES[e["dtype"]]
                shape = tuple(int(d) for d in e["shape"])
                start, end = (int(o) for o in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ModelFormatError(f"{self.path}: tensor {name!r} has an invalid or unsupported "
                                       "header entry") from None
            numel = 1
            for d in shape:
                if d < 0:
                    raise ModelFormatError(f"{self.path}: tensor {name!r} has a negative dimension")
                numel *= d
            itemsize = torch.empty((), dtype=dtype).element_size()
            if not 0 <= start <= end or end - start != numel * itemsize or base + end > size:
                raise ModelFormatError(f"{self.path}: tensor {name!r} data lies outside the file or has the wrong size")
            self.entries[name] = (dtype, shape, base + start, end - start)

    def tensor(self, name: str) -> torch.Tensor:
        dtype, shape, offset, nbytes = self.entries[name]
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self._mmap, dtype=dtype, count=nbytes // torch.empty((), dtype=dtype).element_size(),
                                offset=offset).view(shape)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {k: (v[1], v[0]) for k, v in self.entries.items()}


def iter_safetensors(files: Mapping[str, Path]) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(tensor name, tensor view, file name) over every *.safetensors file; duplicates are errors."""
    seen: set[str] = set()
    for fname in sorted(n for n in files if n.endswith(".safetensors")):
        st = SafetensorsFile(files[fname])
        for name in st.entries:
            if name in seen:
                raise ModelFormatError(f"{fname}: tensor {name!r} appears in more than one file")
            seen.add(name)
            yield name, st.tensor(name), fname


ST_DTYPES = {dtype: code for code, dtype in DTYPES.items()}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file written one tensor at a time (safetensors' own writer holds a copy of
    every tensor at once: a whole model's worth of extra memory), then fsynced. Wider elements
    first, so every tensor starts at a multiple of its element size (and can be mapped in place)."""
    tensors = dict(sorted(tensors.items(), key=lambda kv: -kv[1].element_size()))
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for t in tensors.values():
            flat = t.detach().to("cpu").contiguous().reshape(-1)
            if flat.numel():
                f.write(memoryview(flat.view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())

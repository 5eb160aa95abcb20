"""Hugging Face folders: config.json, *.safetensors (memory-mapped, header validated),
tokenizer.json, tokenizer_config.json. Pickle checkpoints are refused; no remote code runs. Every
JSON file (and safetensors header) is read through parse_json: bounded in size and depth, no NaN."""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from ..errors import ModelFormatError
from ..model import metadata

MAX_HEADER = 100 << 20
MAX_JSON = 64 << 20
MAX_JSON_DEPTH = 64  # config.json, tokenizer.json: under 10 levels
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


def parse_json(data: bytes | str, what: str, depth: int = MAX_JSON_DEPTH) -> Any:
    """A JSON document from a file (its bytes, at most a limit the caller has checked), as the
    standard defines JSON: no NaN or Infinity (nor a number too large for a float), nested at most
    `depth` levels. A violation is a ModelFormatError naming `what` and, for a number, its key."""
    try:
        value = json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except RecursionError:
        raise ModelFormatError(f"{what}: JSON nested deeper than {depth} levels") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, and integers of more than 4300 digits
        raise ModelFormatError(f"{what}: invalid JSON ({str(e)[:200]})") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ModelFormatError(f"{what}: {value} is not a finite number")
    # walked without recursion: (container, its path, its depth)
    stack: list[tuple[Any, str, int]] = [(value, "", 1)] if isinstance(value, (dict, list)) else []
    while stack:
        node, path, level = stack.pop()
        if level > depth:
            raise ModelFormatError(f"{what}: JSON nested deeper than {depth} levels (at {path})")
        for k, v in node.items() if isinstance(node, dict) else enumerate(node):
            if isinstance(v, (dict, list)):
                stack.append((v, _child(path, k), level + 1))
            elif type(v) is float and not math.isfinite(v):
                raise ModelFormatError(f"{what}: {_child(path, k)}={v} is not a finite number")
    return value


def _child(path: str, k: str | int) -> str:
    if isinstance(k, int):
        return f"{path}[{k}]"
    return f"{path}.{k}" if path else k


def read_bytes(path: str | Path, limit: int = MAX_JSON, what: str | None = None) -> bytes:
    """A file's bytes, refused when there are more than `limit` of them."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise ModelFormatError(f"{path} is missing") from None
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot be read ({e.strerror})") from None
    if len(data) > limit:
        raise ModelFormatError(f"{what or path.name}: more than {limit} bytes is too large for this file")
    return data


def read_json(path: str | Path, limit: int = MAX_JSON, what: str | None = None) -> Any:
    """A JSON file, read with parse_json's limits and at most `limit` bytes."""
    what = what or Path(path).name
    return parse_json(read_bytes(path, limit, what), what)


def read_object(path: str | Path, schema: Mapping[str, metadata.Key] | None = None, limit: int = MAX_JSON) -> dict:
    """A JSON file that must hold an object, its keys checked against `schema` (model/metadata.py)."""
    value = read_json(path, limit)
    name = Path(path).name
    if not isinstance(value, dict):
        found = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
        raise ModelFormatError(f"{name}: expected a JSON object, found {found.get(type(value), 'null')}")
    return metadata.check(value, schema, name) if schema else value


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


PAD = "__pad__."  # write_safetensors' filler entries (no module's state key starts with "__")


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
            header = parse_json(f.read(n), f"{self.path}: safetensors header")
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
        if not isinstance(header, dict):
            raise ModelFormatError(f"{self.path}: the safetensors header is not an object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ModelFormatError(f"{self.path}: safetensors __metadata__ is not an object of strings")
        self.metadata = meta
        base = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            if name.startswith(PAD):  # write_safetensors' filler between aligned tensors: no tensor
                continue
            where = f"{self.path}: tensor {name!r}"
            if not isinstance(e, dict) or any(e.get(k) is None for k in metadata.SAFETENSORS_ENTRY):
                raise ModelFormatError(f"{where} needs dtype, shape and data_offsets in the header")
            e = metadata.check(e, metadata.SAFETENSORS_ENTRY, where)
            if e["dtype"] not in DTYPES:
                raise ModelFormatError(f"{where}: dtype {e['dtype']!r} is not supported",
                                       f"supported: {', '.join(DTYPES)}")
            if len(e["data_offsets"]) != 2:
                raise ModelFormatError(f"{where}: data_offsets={e['data_offsets']} is not [start, end]")
            dtype, shape = DTYPES[e["dtype"]], tuple(e["shape"])
            start, end = e["data_offsets"]
            numel = 1
            for d in shape:
                numel *= d
            itemsize = torch.empty((), dtype=dtype).element_size()
            if not 0 <= start <= end or end - start != numel * itemsize or base + end > size:
                raise ModelFormatError(f"{where}: data lies outside the file or has the wrong size")
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


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], align: int = 0) -> None:
    """A safetensors file written one tensor at a time (safetensors' own writer holds a copy of
    every tensor at once: a whole model's worth of extra memory), then fsynced. Wider elements
    first, so every tensor starts at a multiple of its element size (and can be mapped in place).
    align: every tensor starts at a multiple of it in the file (so in a mapping of it: the kernels'
    vector loads then never straddle cache lines), the header padded with spaces and the gaps
    filled by uint8 entries named PAD + a number (the format allows no holes between tensors)."""
    tensors = dict(sorted(tensors.items(), key=lambda kv: -kv[1].element_size()))
    header: dict[str, Any] = {"__metadata__": metadata}
    order: list[torch.Tensor | int] = []  # what the data holds, in order: a tensor, or that many zeros
    offset = 0
    for name, t in tensors.items():
        gap = -offset % align if align and t.numel() else 0
        if gap:
            header[f"{PAD}{len(order)}"] = {"dtype": "U8", "shape": [gap], "data_offsets": [offset, offset + gap]}
            order.append(gap)
            offset += gap
        n = t.numel() * t.element_size()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        order.append(t)
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-(8 + len(head)) % (align or 8))
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for t in order:
            if isinstance(t, int):
                f.write(bytes(t))
                continue
            flat = t.detach().to("cpu").contiguous().reshape(-1)
            if flat.numel():
                f.write(memoryview(flat.view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())

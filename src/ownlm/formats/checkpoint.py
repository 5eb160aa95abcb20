"""A Checkpoint: what any supported file format yields — config, named tensors (our names,
dequantized to a float dtype on demand), tokenizer, chat template and the facts `show` prints."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from ..errors import ModelFormatError
from ..model import config as model_config
from ..model.config import ModelConfig
from ..model.metadata import HF_CONFIG, MAX_HEAD_DIM
from ..model.transformer import Transformer
from . import hf, keymaps
from . import tokenizer as tok
from .gguf import GGUFFile
from ..model.quant import GROUP, QuantWeight, quantize
from .quants import FLOAT_TYPES, QUANT_TYPES, from_blocks

GGUF_FILE = "model.gguf"


@dataclass
class Checkpoint:
    format: str  # gguf | safetensors
    config: ModelConfig
    tokenizer: tok.TokenizerSpec
    chat_template: str | None
    facts: dict[str, Any]
    # tensors(dtype, keep) -> (our name, dense tensor or QuantWeight); keep names the bit widths
    # held quantized: GGUF blocks of those widths (formats/quants.py's QUANT_TYPES: 4, 5, 6, 8) in
    # linears, the embedding and the head stay in their own bits instead of being dequantized, and
    # with 8 kept the other block types are held as int8
    tensors: Callable[..., Iterator[tuple[str, torch.Tensor | QuantWeight]]] = field(repr=False)
    # one row per model tensor in the file: {"name" (ours), "file_name", "shape", "type", "bytes"}
    listing: list[dict[str, Any]] = field(default_factory=list, repr=False)


def open_checkpoint(files: Mapping[str, Path]) -> Checkpoint:
    """files: relative name -> local path, as the store resolves them (or a folder's listing).
    Refuses a checkpoint that could never load: metadata of the wrong type or out of range
    (model/metadata.py), or tensors that disagree with the config (check_tensors)."""
    if GGUF_FILE in files:
        return _open_gguf(files[GGUF_FILE])
    return _open_hf(files)


_LAYER = re.compile(r"layers\.(\d+)\.")
_EXPERT = re.compile(r"layers\.\d+\.mlp\.experts\.(\d+)\.")
NOT_WEIGHTS = {"I8", "I16", "I32", "I64", "int8", "int16", "int32", "int64", "uint8", "bool"}  # GGUF and torch names


def check_tensors(cfg: ModelConfig, listing: list[dict[str, Any]], where: str, keys: Mapping[str, str]) -> None:
    """The tensors of a file (its listing, our names) against what its config implies: the layer
    and expert counts first (so a config of millions of layers fails here, in milliseconds, before
    any is built), then, on a Transformer built on the meta device, that every parameter is there
    once (whole, or as the parts of a fused projection) with the shape the config gives it and a
    floating-point type, and nothing else is. keys: ModelConfig field -> the file's key for it."""
    layers = {int(m.group(1)) for r in listing if (m := _LAYER.match(r["name"]))}
    if layers != set(range(cfg.n_layers)):
        held = f"layers 0..{max(layers)}" if layers == set(range(len(layers))) else f"{len(layers)} layer(s)"
        raise ModelFormatError(f"{where}: {keys.get('n_layers', 'n_layers')}={cfg.n_layers} disagrees with the "
                               f"tensors, which hold {held if layers else 'no layers'}")
    experts = {int(m.group(1)) for r in listing if (m := _EXPERT.match(r["name"]))}
    if experts != set(range(cfg.n_experts)):
        raise ModelFormatError(f"{where}: {keys.get('n_experts', 'n_experts')}={cfg.n_experts} disagrees with the "
                               f"tensors, which hold {len(experts)} expert(s) per layer")
    with torch.device("meta"):
        want = {name: tuple(t.shape) for name, t in Transformer(cfg).state_dict().items()}
    rows = {"q": cfg.n_heads * cfg.head_dim, "k": cfg.n_kv_heads * cfg.head_dim, "v": cfg.n_kv_heads * cfg.head_dim,
            "gate": cfg.ffn_dim, "up": cfg.ffn_dim}  # the parts of the fused projections (keymaps.FUSED)
    fused_of = {p: fused for fused, ps in keymaps.FUSED.items() for p in ps}
    filled: dict[str, list[str]] = {}  # parameter -> what filled it: "" (all of it) or the parts
    for r in listing:
        name, shape, file_name = r["name"], tuple(r["shape"]), r["file_name"]
        parent, _, leaf = name.rpartition(".")
        grand, _, part = parent.rpartition(".")
        if name in want:
            target, piece, expected = name, "", want[name]
        elif part in fused_of and f"{grand}.{fused_of[part]}.{leaf}" in want:
            target, piece = f"{grand}.{fused_of[part]}.{leaf}", part
            expected = (rows[part], *want[target][1:])
        else:
            raise ModelFormatError(f"{where}: tensor {file_name!r} has no place in a model of this config")
        if shape != expected:
            raise ModelFormatError(f"{where}: tensor {file_name!r} has shape {list(shape)}, the config implies "
                                   f"{list(expected)}")
        if r["type"] in NOT_WEIGHTS:
            raise ModelFormatError(f"{where}: tensor {file_name!r} holds {r['type']}, not floating-point weights")
        filled.setdefault(target, []).append(piece)
    for target in want:
        got = sorted(filled.get(target, ()))
        if got == [""]:
            continue
        if not got:
            raise ModelFormatError(f"{where}: the config implies a tensor {target!r} (our name) the file lacks")
        parts = sorted(keymaps.FUSED.get(target.split(".")[-2], ()))
        if got != parts:
            raise ModelFormatError(f"{where}: {target!r} (our name) is filled by "
                                   f"{', '.join(p or 'a whole tensor' for p in got)}; expected {', '.join(parts)} "
                                   "once each")


def files_of_path(path: Path) -> dict[str, Path]:
    """The file listing of a local model path (a .gguf file or an HF folder)."""
    if not path.exists():
        raise ModelFormatError(f"{path} does not exist")
    if path.is_dir():
        return hf.model_files(path)
    if path.suffix in hf.PICKLE_SUFFIXES:
        hf.refuse_pickle(path)
    if path.suffix == ".safetensors":
        raise ModelFormatError(f"{path}: a lone .safetensors file has no config or tokenizer",
                               "import its whole HF folder")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelFormatError(f"{path} is neither a GGUF file nor an HF model folder")
    return {GGUF_FILE: path}


# -- GGUF -------------------------------------------------------------------------------------
def _open_gguf(path: Path) -> Checkpoint:
    g = GGUFFile(path)
    where = Path(path).name

    def factors(name: str) -> tuple[float, ...]:
        """A rope table: one factor per pair of a head's rotary dimensions (the config checks the
        count against the head dim; bounded here before it is read)."""
        if name not in g.tensors:
            return ()
        n = g.tensors[name].n_elements
        if n > MAX_HEAD_DIM // 2:
            raise ModelFormatError(f"{where}: tensor {name!r} has {n} entries; a rope table holds one per pair of "
                                   f"a head's dimensions (at most {MAX_HEAD_DIM // 2})")
        return tuple(g.dequantize(name).reshape(-1).tolist())

    long = factors("rope_factors_long.weight")
    rope_factors = factors("rope_factors_short.weight") if long else factors("rope_freqs.weight")
    cfg = model_config.from_gguf(g.metadata, set(g.tensors), rope_factors, where, long)
    fam = cfg.family
    names = {}
    for name in g.tensors:
        ours = keymaps.from_gguf_name(name, fam, where)
        if ours is not None:
            names[name] = ours
    listing = []
    for name, ours in names.items():
        t = g.tensors[name]
        experts = t.shape[0] if keymaps.STACKED in ours else 0  # listed as the tensors() yields them
        if experts > cfg.n_experts:
            raise ModelFormatError(f"{where}: tensor {name!r} stacks {experts} experts, "
                                   f"{g.architecture}.expert_count is {cfg.n_experts}")
        for e in range(experts) if experts else [None]:
            listing.append({"name": ours if e is None else ours.replace(keymaps.STACKED, f".experts.{e}."),
                            "file_name": name, "shape": list(t.shape[1:] if experts else t.shape),
                            "type": t.type_name, "bytes": t.nbytes // (experts or 1)})
    check_tensors(cfg, listing, where, model_config.gguf_keys(g.architecture))
    spec = tok.from_gguf(g.metadata, where)

    def undo_layout(ours: str, w: np.ndarray) -> np.ndarray:
        """The family's GGUF layouts undone (llama.cpp's Q/K row order, Gemma's offset + w norms);
        the row reorders apply to rows of quantized blocks alike."""
        return keymaps.to_ours(fam.gguf_layout, ours, w, cfg)

    def tensors(dtype: torch.dtype, keep: tuple[int, ...] = ()) -> Iterator[tuple[str, torch.Tensor | QuantWeight]]:
        # one tensor at a time: each is copied out of the map, which then lets its pages go
        for name, ours in names.items():
            info = g.tensors[name]
            if keymaps.STACKED in ours:  # every expert of a layer in one tensor: one tensor each
                stacked = g.dequantize(name)
                out = [(ours.replace(keymaps.STACKED, f".experts.{e}."),
                        torch.from_numpy(np.array(stacked[e])).to(dtype)) for e in range(stacked.shape[0])]
            elif QUANT_TYPES.get(info.qtype) in keep and len(info.shape) == 2 and quantizable(ours):
                out = [(ours, from_blocks(undo_layout(ours, g.raw(name)), info.qtype))]
            elif (8 in keep and info.qtype not in FLOAT_TYPES and len(info.shape) == 2 and quantizable(ours)
                  and info.shape[-1] % GROUP == 0):
                out = [(ours, quantize(torch.from_numpy(undo_layout(ours, g.dequantize(name))), 8))]
            else:
                w = undo_layout(ours, g.dequantize(name))
                if not w.flags.writeable or not w.flags.c_contiguous:
                    w = np.array(w)  # F32 tensors are views of the read-only map
                out = [(ours, torch.from_numpy(w).to(dtype))]
            g.release(name)
            yield from out

    counts = Counter(t.type_name for t in g.tensors.values())
    params = sum(t.n_elements for n, t in g.tensors.items() if n in names)
    ftype = g.get("general.file_type")
    facts = {
        "format": "gguf",
        "architecture": cfg.architecture,
        "parameters": params,
        "context_length": cfg.context_length,
        "quantization": _dominant(g),
        "quantization_mix": dict(sorted(counts.items())),
        "file_type": int(ftype) if ftype is not None else None,
        "license": g.get("general.license"),
        "model_name": g.get("general.name"),
        "vocab_size": cfg.vocab_size,
    }
    return Checkpoint("gguf", cfg, spec, g.get("tokenizer.chat_template"), facts, tensors, listing)


def quantizable(ours: str) -> bool:
    """Whether a tensor (our name) can be held as group-wise int4 / int8: the weight of a layer's
    linear, the embedding table or the output head."""
    if ours in ("embed.weight", "lm_head.weight"):
        return True
    return ours.startswith("layers.") and ours.endswith(".weight") and not ours.endswith("norm.weight")


def _dominant(g: GGUFFile) -> str:
    """The quantization that holds most of the weight bytes (what people call the model's quant)."""
    by_bytes: Counter[str] = Counter()
    for t in g.tensors.values():
        if len(t.shape) >= 2:
            by_bytes[t.type_name] += t.nbytes
    return by_bytes.most_common(1)[0][0] if by_bytes else "F32"


# -- HF folders -------------------------------------------------------------------------------
def _open_hf(files: Mapping[str, Path]) -> Checkpoint:
    if "config.json" not in files:
        raise ModelFormatError("model has no config.json")
    raw = hf.read_object(files["config.json"], HF_CONFIG)
    cfg = model_config.from_hf(raw)
    st_files = {n: p for n, p in files.items() if n.endswith(".safetensors")}
    shapes: dict[str, tuple] = {}
    for _n, p in st_files.items():
        for k, (shape, dtype) in hf.SafetensorsFile(p).shapes().items():
            shapes[k] = (shape, dtype)
    names = {}
    for name in shapes:
        ours = keymaps.from_hf_name(name, cfg.family)
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue  # tied: the embedding serves as the head
        if ours is not None:
            names[name] = ours
    listing = [{"name": ours, "file_name": name, "shape": list(shapes[name][0]),
                "type": str(shapes[name][1]).removeprefix("torch."),
                "bytes": int(np.prod(shapes[name][0])) * torch.empty(0, dtype=shapes[name][1]).element_size()}
               for name, ours in names.items()]
    check_tensors(cfg, listing, "config.json", model_config.HF_KEYS)
    layout = cfg.family.hf_layout  # e.g. GPT-NeoX's q/k/v rows per head, reordered into our blocks

    def tensors(dtype: torch.dtype, keep: tuple[int, ...] = ()) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t, _ in hf.iter_safetensors(st_files):
            if name in names:
                t = keymaps.to_ours(layout, names[name], t, cfg)
                yield names[name], t if t.dtype == dtype else t.to(dtype)

    dtypes = Counter(str(d).removeprefix("torch.") for n, (s, d) in shapes.items() if n in names)
    params = sum(int(np.prod(s)) for n, (s, d) in shapes.items() if n in names)
    facts = {
        "format": "safetensors",
        "architecture": cfg.architecture,
        "parameters": params,
        "context_length": cfg.context_length,
        "quantization": dtypes.most_common(1)[0][0].upper() if dtypes else "none",
        "quantization_mix": dict(sorted(dtypes.items())),
        "license": raw.get("license"),
        "model_name": raw.get("_name_or_path") or None,
        "vocab_size": cfg.vocab_size,
    }
    spec, template = tok.from_hf(files)
    return Checkpoint("safetensors", cfg, spec, template, facts, tensors, listing)

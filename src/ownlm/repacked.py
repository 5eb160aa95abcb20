"""The repacked-model cache: a store model as the engine holds it in memory (projections fused,
GGUF blocks in the kernels' int4 / int8 layout, everything else in the compute dtype), with its
config, tokenizer and chat template, in one safetensors file per (model digest, variant).

The first load of a store model builds it from its files and writes this cache; later loads map
one file and take its tensors in place, with no GGUF parsing, dequantizing, repacking or copying.
The variant names everything the bytes depend on: dtype, device type, quantization mode, ownlm's
kernels, the CPU's capability and torch's version. A cache is written to a temporary folder,
fsynced and renamed into place, so a killed load leaves none or a whole one; one that fails to
read back (or whose shapes disagree with its config) is ignored and rewritten. `ownlm rm`
removes a model's caches with its files. OWNLM_REPACK_CACHE=0 turns it off."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from .formats.hf import SafetensorsFile, write_safetensors
from .model import cpu, ops
from .model.config import ModelConfig, RopeScaling
from .model.linear import QuantEmbedding, QuantLinear, replace
from .model.quant import QuantWeight
from .model.transformer import Transformer
from .text.tokenizer import TokenizerSpec

VERSION = 3
FILE = "model.safetensors"


def enabled() -> bool:
    return os.environ.get("OWNLM_REPACK_CACHE", "1") != "0"


def folder(root: Path, digest: str, device: torch.device, dtype: torch.dtype, quant: str) -> Path:
    variant = json.dumps([VERSION, str(dtype), device.type, quant, ops.cpu_kernels(), cpu.capability(),
                          torch.__version__])
    return root / "cache" / "repacked" / f"{digest}-{hashlib.sha256(variant.encode()).hexdigest()[:16]}"


def save(path: Path, model: Transformer, tokenizer: TokenizerSpec, chat_template: str | None,
         facts: dict[str, Any], tmp_root: Path) -> None:
    """Write the cache for `model` at `path` (atomically; an existing one is kept)."""
    if path.exists() or any(getattr(m, "layout", "blocks") != "blocks" for m in model.modules()):
        return  # PyTorch's int4 layout (CUDA) is rebuilt from the file each time
    quantized = {name: {"embedding": isinstance(m, QuantEmbedding), "bits": m.bits,
                        "dtype": str(m.dtype).removeprefix("torch.")}
                 for name, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    meta = {"version": VERSION, "config": asdict(model.cfg), "quantized": quantized, "facts": facts,
            "chat_template": chat_template,
            "tokenizer": {"json": tokenizer.tokenizer.to_str(), "bos_id": tokenizer.bos_id,
                          "eos_ids": list(tokenizer.eos_ids), "add_bos": tokenizer.add_bos,
                          "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}}
    tensors = model.state_dict()
    tmp_root.mkdir(parents=True, exist_ok=True)
    # the store sweeps it if this process dies; random: two threads may build the same cache
    tmp = tmp_root / f"{os.getpid()}-{secrets.token_hex(8)}-repack-{path.name}"
    try:
        tmp.mkdir()
        write_safetensors(tmp / FILE, tensors, {"ownlm": json.dumps(meta)})
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, path)
        except OSError:  # another process wrote it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load(path: Path, device: torch.device) -> tuple[Transformer, TokenizerSpec, str | None, dict] | None:
    """(model, tokenizer spec, chat template, facts) from a cache, or None where there is none or
    it does not read back whole."""
    file = path / FILE
    if not file.is_file():
        return None
    hit = _read(file, device)
    if hit is None:  # damaged or from another version: drop it, the caller writes a new one
        shutil.rmtree(path, ignore_errors=True)
    return hit


def _read(file: Path, device: torch.device):
    try:
        st = SafetensorsFile(file)  # mapped, not read: pages come in as they are used
        meta = json.loads(st.metadata["ownlm"])
        tensors = {name: st.tensor(name) for name in st.entries}
        if meta.get("version") != VERSION:
            return None
        cfg_dict = dict(meta["config"])
        scaling = dict(cfg_dict.pop("rope_scaling"))
        scaling["factors"] = tuple(scaling.get("factors", ()))
        scaling["long_factors"] = tuple(scaling.get("long_factors", ()))
        cfg_dict["local_layers"] = tuple(cfg_dict.get("local_layers", ()))
        cfg = ModelConfig(**cfg_dict, rope_scaling=RopeScaling(**scaling))
        with torch.device("meta"):
            model = Transformer(cfg)
        for name, spec in meta["quantized"].items():
            parts = {k[len(name) + 1:]: tensors.pop(k) for k in list(tensors) if k.startswith(name + ".")}
            w = QuantWeight(spec["bits"], parts["data"], parts["scale"], parts.get("offset"))
            original = model.get_submodule(name)  # the shape the config gives this layer
            if w.shape != tuple(original.weight.shape):
                return None
            dtype = getattr(torch, spec["dtype"])
            layer = QuantEmbedding(w, dtype) if spec["embedding"] else QuantLinear(w, parts.get("bias"), dtype)
            replace(model, name, layer.to(device))
        expected = {k for k in model.state_dict() if not any(k.startswith(n + ".") for n in meta["quantized"])}
        if set(tensors) != expected:
            return None
        model.load_state_dict({k: v.to(device) for k, v in tensors.items()}, assign=True, strict=False)
        model.init_buffers(device)
        t = meta["tokenizer"]
        tok = TokenizerSpec(Tokenizer.from_str(t["json"]), t["bos_id"], list(t["eos_ids"]), t["add_bos"],
                            t["bos_token"], t["eos_token"])
        return model.eval(), tok, meta["chat_template"], meta["facts"]
    except Exception:  # noqa: BLE001 - a cache that does not read back is rebuilt, never fatal
        return None

"""The repacked-model cache: a store model as the engine holds it in memory (projections fused,
GGUF blocks in the kernels' int4 / int8 layout, everything else in the compute dtype), with its
config, tokenizer and chat template, in one safetensors file per (model digest, variant).

The first load of a store model builds it from its files and writes this cache; later loads map
one file and take its tensors in place, with no GGUF parsing, dequantizing, repacking or copying.
The variant names everything the bytes depend on: dtype, device type, quantization mode, ownlm's
kernels, the CPU's capability and torch's version. A cache is written to a temporary folder,
fsynced and renamed into place, so a killed load leaves none or a whole one; one that fails to
read back (or whose shapes disagree with its config) is ignored and rewritten. `ownlm rm`
removes a model's caches with its files. OWNLM_REPACK_CACHE=0 turns it off.

The cache is bounded: each hit marks its folder used (its mtime), and after each write the
least recently used variants go until at most OWNLM_REPACKED_KEEP (default 2) are left per
model and all of them together fit OWNLM_REPACKED_MAX_MB (default: 4 GiB or three times the
largest variant, whichever is more); the variant just written always stays. `ownlm du` shows
them, `ownlm prune` also removes variants no current ownlm / torch / CPU would read."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from .errors import BadRequest
from .formats.hf import SafetensorsFile, write_safetensors
from .model import cpu, ops
from .model.config import ModelConfig, RopeScaling
from .model.linear import QuantEmbedding, QuantLinear, quant_from, replace
from .model.quant import ALIGN
from .model.transformer import Transformer
from .text.tokenizer import TokenizerSpec

# 4: int5 / int6 weights and stacks of parts (Q5_*, Q6_K kept in their bits); 5: every tensor at a multiple
# of quant.ALIGN bytes (mapped in place, as the kernels want their planes); 6: Q4_K / Q5_K with their
# super-blocks' headers (`superblock`) in place of float16 scales and offsets, Q6_K with its d per 256 and
# IQ4_XS with its d and 6-bit scales, the tokenizer compressed
VERSION = 6
FILE = "model.safetensors"


def enabled() -> bool:
    return os.environ.get("OWNLM_REPACK_CACHE", "1") != "0"


KEEP_PER_MODEL = 2
MAX_TOKENIZER = 256 << 20  # bytes of tokenizer JSON a cache may inflate to
MIN_BOUND = 4 << 30


def variant(device_type: str, dtype: torch.dtype, quant: str) -> str:
    key = json.dumps([VERSION, str(dtype), device_type, quant, ops.cpu_kernels(), cpu.capability(),
                      torch.__version__])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def folder(root: Path, digest: str, device: torch.device, dtype: torch.dtype, quant: str) -> Path:
    return root / "cache" / "repacked" / f"{digest}-{variant(device.type, dtype, quant)}"


def current_variants() -> set[str]:
    """Every variant name this ownlm, torch and CPU can write (any device type, dtype and mode):
    a cache named otherwise was made by another version and is never read again."""
    return {variant(d, dt, q) for d in ("cpu", "cuda", "mps") for dt in (torch.float32, torch.bfloat16, torch.float16)
            for q in ("auto", "none", "int4", "int8")}


def entries(root: Path) -> list[dict[str, Any]]:
    """The cache's variants, most recently used first: path, digest, variant, size, last use."""
    base = root / "cache" / "repacked"
    out = []
    for p in sorted(base.iterdir()) if base.is_dir() else []:
        try:
            used = p.stat().st_mtime
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        except OSError:  # removed meanwhile
            continue
        digest, _, var = p.name.partition("-")
        out.append({"path": p, "digest": digest, "variant": var, "size": size, "used": used})
    return sorted(out, key=lambda e: (-e["used"], e["path"].name))


def keep_per_model() -> int:
    return _env_int("OWNLM_REPACKED_KEEP", KEEP_PER_MODEL, 1)


def bound(found: list[dict[str, Any]]) -> int:
    """The most bytes the cache keeps: OWNLM_REPACKED_MAX_MB, else 4 GiB or three times its
    largest variant (so the three last used models stay), whichever is more."""
    mb = _env_int("OWNLM_REPACKED_MAX_MB", None, 0)
    if mb is not None:
        return mb << 20
    return max(MIN_BOUND, 3 * max((e["size"] for e in found), default=0))


def _env_int(name: str, default: int | None, least: int) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise BadRequest(f"{name}={text!r} is invalid: must be an integer of at least {least}")
    return value


def over_bound(root: Path, keep: Path | None = None, found: list[dict[str, Any]] | None = None
               ) -> list[dict[str, Any]]:
    """The variants (of `found`, default all `entries`) to evict, least recently used first:
    beyond `keep_per_model` for their model, or beyond the bound in all (`keep`, the one just
    written, never)."""
    found = list(entries(root) if found is None else found)
    limit, per = bound(found), keep_per_model()
    if keep is not None:
        found.sort(key=lambda e: e["path"] != keep)  # stable: the rest stay most recent first
    seen: dict[str, int] = {}
    total, evict = 0, []
    for e in found:
        seen[e["digest"]] = seen.get(e["digest"], 0) + 1
        if e["path"] != keep and (seen[e["digest"]] > per or total + e["size"] > limit):
            evict.append(e)
            continue
        total += e["size"]
    return evict[::-1]


def trim(root: Path, keep: Path | None = None) -> list[Path]:
    """Evict what `over_bound` names; returns the folders removed."""
    gone = []
    for e in over_bound(root, keep):
        shutil.rmtree(e["path"], ignore_errors=True)
        gone.append(e["path"])
    return gone


def touch(path: Path) -> None:
    """Mark a variant used now (its folder's mtime), for the least-recently-used eviction."""
    try:
        os.utime(path)
    except OSError:  # a read-only store: the order is only a hint
        pass


def save(path: Path, model: Transformer, tokenizer: TokenizerSpec, chat_template: str | None,
         facts: dict[str, Any], tmp_root: Path) -> None:
    """Write the cache for `model` at `path` (atomically; an existing one is kept)."""
    if path.exists() or any(getattr(m, "layout", "blocks") != "blocks" for m in model.modules()):
        return  # PyTorch's int4 layout (CUDA) is rebuilt from the file each time
    quantized = {name: {"embedding": isinstance(m, QuantEmbedding),
                        "bits": m.bits if isinstance(m.bits, int) else list(m.bits),
                        "dtype": str(m.dtype).removeprefix("torch.")}
                 for name, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    meta = {"version": VERSION, "config": asdict(model.cfg), "quantized": quantized, "facts": facts,
            "chat_template": chat_template,
            # the tokenizer's JSON compressed: with it the cache of a model whose weights are held in the
            # file's bits stays within the GGUF's size
            "tokenizer": {"json_z": base64.b64encode(zlib.compress(tokenizer.tokenizer.to_str().encode())).decode(),
                          "bos_id": tokenizer.bos_id, "eos_ids": list(tokenizer.eos_ids), "add_bos": tokenizer.add_bos,
                          "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}}
    tensors = model.state_dict()
    tmp_root.mkdir(parents=True, exist_ok=True)
    # the store sweeps it if this process dies; random: two threads may build the same cache
    tmp = tmp_root / f"{os.getpid()}-{secrets.token_hex(8)}-repack-{path.name}"
    try:
        tmp.mkdir()
        write_safetensors(tmp / FILE, tensors, {"ownlm": json.dumps(meta)}, align=ALIGN)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, path)
        except OSError:  # another process wrote it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    trim(path.parents[2], keep=path)


def load(path: Path, device: torch.device) -> tuple[Transformer, TokenizerSpec, str | None, dict] | None:
    """(model, tokenizer spec, chat template, facts) from a cache, or None where there is none or
    it does not read back whole."""
    file = path / FILE
    if not file.is_file():
        # a folder without its file (caches appear whole, by a rename, so this is a removal cut
        # short): dropped, else it would stand in the way of every new cache of this variant
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        return None
    hit = _read(file, device)
    if hit is None:  # damaged or from another version: drop it, the caller writes a new one
        shutil.rmtree(path, ignore_errors=True)
    else:
        touch(path)
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
            w = quant_from(parts, spec["bits"])
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
        inflate = zlib.decompressobj()
        tokenizer_json = inflate.decompress(base64.b64decode(t["json_z"]), MAX_TOKENIZER)
        if inflate.unconsumed_tail or not inflate.eof:  # larger than any tokenizer, or cut short
            return None
        tokenizer_json = tokenizer_json.decode()
        tok = TokenizerSpec(Tokenizer.from_str(tokenizer_json), t["bos_id"], list(t["eos_ids"]), t["add_bos"],
                            t["bos_token"], t["eos_token"])
        return model.eval(), tok, meta["chat_template"], meta["facts"]
    except Exception:  # noqa: BLE001 - a cache that does not read back is rebuilt, never fatal
        return None

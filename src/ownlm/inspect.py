"""Look inside a model: a model card, every tensor with its statistics, and a memory estimate.

Statistics are computed on the values the model runs with (quantized tensors dequantized), in
float64 sums over one tensor at a time, so memory stays at one tensor's worth."""

from __future__ import annotations

import re
from typing import Any, Callable

import torch

from .errors import BadRequest
from .formats.checkpoint import open_checkpoint
from .manage import resolve

QUANT_BYTES = {"int4": 0.5 + 8 / 32, "bf16": 2.0, "fp16": 2.0, "fp32": 4.0}  # int4: nibbles + fp32 scale/zero per 32


def tensor_stats(t: torch.Tensor) -> dict[str, float]:
    """mean, std (population), absmax and fraction of exact zeros of a tensor's values."""
    x = t.detach().reshape(-1).double()
    n = x.numel()
    if n == 0:
        return {"mean": 0.0, "std": 0.0, "absmax": 0.0, "zeros": 0.0}
    mean = float(x.mean())
    return {"mean": mean, "std": float(((x - mean) ** 2).mean().sqrt()), "absmax": float(x.abs().max()),
            "zeros": float((x == 0).sum()) / n}


def component(name: str) -> str:
    """The part of the model a tensor belongs to: embed, attention, mlp, norm or head."""
    if name.startswith("embed"):
        return "embed"
    if name.startswith("lm_head"):
        return "head"
    if ".attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    return "norm"


def check_options(ctx: int | None, batch: int, quant: str | None) -> None:
    if batch < 1 or (ctx is not None and ctx < 1):
        raise BadRequest("--ctx and --batch must be positive")
    if quant is not None and quant not in QUANT_BYTES:
        raise BadRequest(f"unknown --quant {quant!r}", f"use one of: {', '.join(QUANT_BYTES)}")


def memory_estimate(cfg, params: int, weight_bytes: int, ctx: int, batch: int, quant: str | None) -> dict[str, Any]:
    """Bytes to hold the weights (as stored, or as `quant`) plus the KV cache for `batch`
    sequences of `ctx` positions (fp32 keys and values, as ownlm keeps them on a CPU)."""
    weights = weight_bytes if quant is None else int(params * QUANT_BYTES[quant])
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4 * ctx * batch
    return {"ctx": ctx, "batch": batch, "quant": quant or "as stored", "weights_bytes": weights,
            "kv_cache_bytes": kv, "total_bytes": weights + kv}


def inspect_model(ref: str, ctx: int | None = None, batch: int = 1, quant: str | None = None,
                  progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Everything `ownlm inspect` prints, for a store name or a path (never pulls). `progress`
    is called with each tensor's stored bytes as it is read."""
    check_options(ctx, batch, quant)
    manifest, files = resolve(ref, pull_missing=False)
    ckpt = open_checkpoint(files)
    cfg, f = ckpt.config, ckpt.facts
    rows = {r["name"]: dict(r) for r in ckpt.listing}
    for name, t in ckpt.tensors(torch.float32):
        rows[name].update(tensor_stats(t))
        if progress:
            progress(rows[name]["bytes"])
    by_component: dict[str, int] = {}
    for r in rows.values():
        n = 1
        for d in r["shape"]:
            n *= d
        r["parameters"] = n
        by_component[component(r["name"])] = by_component.get(component(r["name"]), 0) + n
    weight_bytes = sum(r["bytes"] for r in rows.values())
    name = f"{manifest['name']}:{manifest['tag']}" if "tag" in manifest else manifest["name"]
    card = {
        "name": name, "source": manifest.get("source"), "digest": manifest.get("digest"), "format": f["format"],
        "architecture": f["architecture"], "parameters": f["parameters"], "parameters_by_component": by_component,
        "context_length": f["context_length"], "vocab_size": f["vocab_size"], "quantization": f["quantization"],
        "quantization_mix": f["quantization_mix"], "license": manifest.get("license") or f.get("license"),
        "chat_template": ckpt.chat_template, "config": cfg.switches(), "weight_bytes": weight_bytes,
    }
    memory = memory_estimate(cfg, f["parameters"], weight_bytes, ctx or cfg.context_length, batch, quant)
    return {"model": card, "memory": memory, "tensors": sorted(rows.values(), key=lambda r: _natural(r["name"]))}


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]

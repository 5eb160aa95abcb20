"""Look inside a model: a model card, every tensor with its statistics, and a memory estimate.

Statistics are computed on the values the model runs with (quantized tensors dequantized), in
float64 sums over one tensor at a time, so memory stays at one tensor's worth."""

from __future__ import annotations

import re
from typing import Any, Callable

import torch

from .errors import BadRequest
from .formats.checkpoint import open_checkpoint
from .manage import display_name, resolve

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
                  progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Everything `ownlm inspect` prints, for a store name or a path (never pulls). `progress`
    is called with each tensor's stored bytes as it is read, and the total."""
    check_options(ctx, batch, quant)
    manifest, files = resolve(ref, pull_missing=False)
    ckpt = open_checkpoint(files)
    cfg, f = ckpt.config, ckpt.facts
    rows = {r["name"]: dict(r) for r in ckpt.listing}
    weight_bytes = sum(r["bytes"] for r in rows.values())
    for name, t in ckpt.tensors(torch.float32):
        rows[name].update(tensor_stats(t))
        if progress:
            progress(rows[name]["bytes"], weight_bytes)
    by_component: dict[str, int] = {}
    for r in rows.values():
        n = 1
        for d in r["shape"]:
            n *= d
        r["parameters"] = n
        by_component[component(r["name"])] = by_component.get(component(r["name"]), 0) + n
    card = {
        "name": display_name(manifest), "source": manifest.get("source"), "digest": manifest.get("digest"), "format": f["format"],
        "architecture": f["architecture"], "parameters": f["parameters"], "parameters_by_component": by_component,
        "context_length": f["context_length"], "vocab_size": f["vocab_size"], "quantization": f["quantization"],
        "quantization_mix": f["quantization_mix"], "license": manifest.get("license") or f.get("license"),
        "chat_template": ckpt.chat_template, "config": cfg.switches(), "weight_bytes": weight_bytes,
    }
    memory = memory_estimate(cfg, f["parameters"], weight_bytes, ctx or cfg.context_length, batch, quant)
    return {"model": card, "memory": memory, "tensors": sorted(rows.values(), key=lambda r: _natural(r["name"]))}


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def diff_models(a_ref: str, b_ref: str, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Per-tensor relative change ‖B−A‖/‖A‖ and cosine similarity between two models of the same
    architecture, most-changed first. Quantized tensors are compared by their dequantized values."""
    ckpts = []
    for ref in (a_ref, b_ref):
        manifest, files = resolve(ref, pull_missing=False)
        ckpts.append((manifest, open_checkpoint(files)))
    (ma, a), (mb, b) = ckpts
    shapes_a = {r["name"]: r["shape"] for r in a.listing}
    shapes_b = {r["name"]: r["shape"] for r in b.listing}
    if a.config.architecture != b.config.architecture:
        raise BadRequest(f"cannot diff a {a.config.architecture} model against a {b.config.architecture} model")
    for name in sorted(set(shapes_a) | set(shapes_b), key=_natural):
        if name not in shapes_a or name not in shapes_b:
            where = "first" if name in shapes_a else "second"
            raise BadRequest(f"the models have different tensors: {name} is only in the {where}")
        if shapes_a[name] != shapes_b[name]:
            raise BadRequest(f"the models differ in shape at {name}: {shapes_a[name]} vs {shapes_b[name]}")
    pending: dict[str, torch.Tensor] = {}
    b_iter = b.tensors(torch.float32)
    rows = []
    for name, ta in a.tensors(torch.float32):
        while name not in pending:  # the same layout yields the same order; anything else waits here
            nb, tb = next(b_iter)
            pending[nb] = tb
        tb = pending.pop(name)
        x, y = ta.double().reshape(-1), tb.double().reshape(-1)
        na, nb_ = float(x.norm()), float(y.norm())
        change = float((y - x).norm())
        rows.append({"name": name, "shape": shapes_a[name],
                     "relative_change": change / na if na else (0.0 if change == 0 else float("inf")),
                     "cosine": float(x @ y) / (na * nb_) if na and nb_ else (1.0 if na == nb_ else 0.0),
                     "max_abs_change": float((y - x).abs().max()) if x.numel() else 0.0})
        if progress:
            progress(1)
    rows.sort(key=lambda r: -r["relative_change"])
    changed = [r for r in rows if r["relative_change"] > 0]
    return {"a": display_name(ma), "b": display_name(mb), "architecture": a.config.architecture,
            "summary": {"tensors": len(rows), "changed": len(changed),
                        "max_relative_change": rows[0]["relative_change"] if rows else 0.0,
                        "min_cosine": min((r["cosine"] for r in rows), default=1.0)},
            "tensors": rows}

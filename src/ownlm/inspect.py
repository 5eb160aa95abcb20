"""Look inside a model: a model card, every tensor with its statistics, and a memory estimate.

Statistics are computed on the values the model runs with (quantized tensors dequantized), in
float64 sums over one tensor at a time, so memory stays at one tensor's worth. A quantized tensor
also gets its reconstruction error: its dequantized values quantized again with the same block
type and dequantized, ‖requantized − dequantized‖ / ‖dequantized‖ (0 for a stable quantizer,
larger where the stored blocks are not what this type's reference quantizer would write), and the
error expected against the unknown source: uniform rounding noise of each block's step (step/√12
per value) relative to ‖dequantized‖. Against a known source, `ownlm diff SOURCE QUANTIZED` gives
the exact error."""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

from .errors import BadRequest
from .formats import peft
from .formats.checkpoint import Checkpoint, open_checkpoint
from .loading import resolve_adapter, split_adapter
from .manage import display_name, resolve_weights

# bytes per weight as ownlm holds it; int4 / int8: the values plus float16 scale (and offset) per 32
QUANT_BYTES = {"int4": 0.5 + 4 / 32, "int8": 1 + 2 / 32, "bf16": 2.0, "fp16": 2.0, "fp32": 4.0}
# block types whose reference quantizer the gguf package implements (K-quants it does not)
REQUANTIZABLE = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}
# block types' quantization step from a block of 32 dequantized values: symmetric ones step by
# absmax / levels below zero, asymmetric ones by (max - min) / (levels - 1)
BLOCK_STEP = {"Q4_0": ("sym", 8), "Q5_0": ("sym", 16), "Q8_0": ("sym", 127), "Q4_1": ("asym", 15), "Q5_1": ("asym", 31)}
SAMPLES_PER_TENSOR = 4096  # values kept per tensor for `--plot` histograms (more for big ones, up to 64k)


def tensor_stats(t: torch.Tensor) -> dict[str, float]:
    """mean, std (population), absmax, L2 norm, per-element RMS sqrt(mean(w²)) (comparable across
    shapes, unlike the norm) and fraction of exact zeros of a tensor's values."""
    x = t.detach().reshape(-1).double()
    n = x.numel()
    if n == 0:
        return {"mean": 0.0, "std": 0.0, "absmax": 0.0, "norm": 0.0, "rms": 0.0, "zeros": 0.0}
    mean = float(x.mean())
    return {"mean": mean, "std": float(((x - mean) ** 2).mean().sqrt()), "absmax": float(x.abs().max()),
            "norm": float(x.norm()), "rms": float(x.pow(2).mean().sqrt()), "zeros": float((x == 0).sum()) / n}


def requant_error(t: torch.Tensor, qtype: str) -> float | None:
    """‖deq(quant(t)) − t‖ / ‖t‖ with `qtype`'s reference quantizer, or None where there is none."""
    if qtype not in REQUANTIZABLE or t.numel() == 0:
        return None
    x = t.detach().float().reshape(-1, t.shape[-1]).numpy()
    kind = GGMLQuantizationType[qtype]
    back = quants.dequantize(quants.quantize(x, kind), kind)
    ref = float(np.linalg.norm(x.astype(np.float64)))
    err = float(np.linalg.norm((back - x).astype(np.float64)))
    return err / ref if ref else (0.0 if err == 0 else float("inf"))


def rounding_noise(t: torch.Tensor, qtype: str) -> float | None:
    """Expected relative error of `qtype`'s rounding against the (unknown) source values: the RMS
    of step/√12 over the blocks, over the RMS of the values. None for types without such blocks."""
    if qtype not in BLOCK_STEP or t.numel() == 0 or t.shape[-1] % 32:
        return None
    kind, levels = BLOCK_STEP[qtype]
    x = t.detach().double().reshape(-1, 32)
    step = x.abs().amax(1) / levels if kind == "sym" else (x.amax(1) - x.amin(1)) / levels
    rms = float(x.pow(2).mean().sqrt())
    return float((step.pow(2) / 12).mean().sqrt()) / rms if rms else 0.0


def value_sample(t: torch.Tensor) -> np.ndarray:
    """Some of a tensor's values, evenly strided (deterministic), for histograms."""
    x = t.detach().reshape(-1)
    k = min(max(SAMPLES_PER_TENSOR, x.numel() // 256), 65536)
    step = max(1, x.numel() // k)
    return x[::step][:k].float().numpy().copy()


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
                  progress: Callable[[int, int], None] | None = None,
                  samples: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Everything `ownlm inspect` prints, for a store name or a path (never pulls). `progress`
    is called with each tensor's stored bytes as it is read, and the total; `samples`, if given,
    is filled with a few thousand values of each tensor (for plots)."""
    check_options(ctx, batch, quant)
    shown, manifest, ckpt, deltas = open_weights(ref)  # BASE+ADAPTER: the merged weights' statistics
    cfg, f = ckpt.config, ckpt.facts
    rows = {r["name"]: dict(r) for r in ckpt.listing}
    weight_bytes = sum(r["bytes"] for r in rows.values())
    for name, t in _merged(ckpt, deltas):
        rows[name].update(tensor_stats(t))
        rows[name]["requant_error"] = requant_error(t, rows[name]["type"])
        rows[name]["rounding_noise"] = rounding_noise(t, rows[name]["type"])
        if samples is not None:
            samples[name] = value_sample(t)
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
        "name": shown, "source": manifest.get("source"), "digest": manifest.get("digest"),
        "format": f["format"],
        "architecture": f["architecture"], "parameters": f["parameters"], "parameters_by_component": by_component,
        "context_length": f["context_length"], "vocab_size": f["vocab_size"], "quantization": f["quantization"],
        "quantization_mix": f["quantization_mix"], "license": manifest.get("license") or f.get("license"),
        "chat_template": ckpt.chat_template, "config": cfg.switches(), "weight_bytes": weight_bytes,
    }
    memory = memory_estimate(cfg, f["parameters"], weight_bytes, ctx or cfg.context_length, batch, quant)
    return {"model": card, "memory": memory, "tensors": sorted(rows.values(), key=lambda r: _natural(r["name"]))}


_LORA_A = re.compile(r"(layers\.\d+\.\w+)\.\w+\.lora_a\.(\w+)")


def open_weights(ref: str) -> tuple[str, dict[str, Any], Checkpoint, dict[str, torch.Tensor]]:
    """(display name, base manifest, base checkpoint, {tensor name: adapter delta}) of any MODEL:
    for BASE+ADAPTER, or an adapter by its own store name, the deltas (scale * B @ A per targeted
    weight) that merging adds; for a plain model, none."""
    base_ref, adapter_ref = split_adapter(ref)
    manifest, files = resolve_weights(base_ref)
    adapter = resolve_adapter(adapter_ref) if adapter_ref else None
    if adapter is None and manifest.get("format") == "peft":  # an adapter by its own name: on its base
        adapter = manifest, files
        manifest, files = resolve_weights(str((manifest.get("base") or {}).get("name")))
    name, deltas = display_name(manifest), {}
    if adapter is not None:
        settings, tensors = peft.read(adapter[1])
        scale = settings.alpha / (math.sqrt(settings.r) if settings.rslora else settings.r)
        for key, a in tensors.items():
            if m := _LORA_A.fullmatch(key):
                deltas[f"{m.group(1)}.{m.group(2)}.weight"] = scale * (tensors[key.replace(".lora_a.", ".lora_b.")] @ a)
        name = f"{name}+{display_name(adapter[0])}"
    return name, manifest, open_checkpoint(files), deltas


def _merged(ckpt: Checkpoint, deltas: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, t in ckpt.tensors(torch.float32):
        if name in deltas:
            if deltas[name].shape != t.shape:
                raise BadRequest(f"the adapter does not fit the base at {name}: {tuple(deltas[name].shape)} vs "
                                 f"{tuple(t.shape)}", "it was trained for a different base model")
            t = t + deltas[name]
        yield name, t


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def diff_models(a_ref: str, b_ref: str, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Per-tensor relative change ‖B−A‖/‖A‖ and cosine similarity between two models of the same
    architecture, most-changed first. Quantized tensors are compared by their dequantized values."""
    (name_a, _, a, deltas_a), (name_b, _, b, deltas_b) = open_weights(a_ref), open_weights(b_ref)
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
    b_iter = _merged(b, deltas_b)
    rows = []
    for name, ta in _merged(a, deltas_a):
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
    # a tensor that is not numbers (NaN) counts as changed the most: first in the order, in the summary
    worst = lambda v: math.inf if math.isnan(v) else v  # noqa: E731
    rows.sort(key=lambda r: -worst(r["relative_change"]))
    changed = [r for r in rows if not r["relative_change"] <= 0]
    lowest = lambda v: -math.inf if math.isnan(v) else v  # noqa: E731
    return {"a": name_a, "b": name_b, "architecture": a.config.architecture,
            "summary": {"tensors": len(rows), "changed": len(changed),
                        "max_relative_change": rows[0]["relative_change"] if rows else 0.0,
                        "min_cosine": min((r["cosine"] for r in rows), key=lowest, default=1.0),
                        "not_numbers": sum(math.isnan(r["relative_change"]) for r in rows)},
            "tensors": rows}

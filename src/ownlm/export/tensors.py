"""A built model's weights as plain dense tensors under per-projection names (adapters merged,
int4 dequantized, fused projections split), ready for any file format's name map."""

from __future__ import annotations

from typing import Iterator

import torch

from ..model.linear import Int4Linear, LoRALinear
from ..model.transformer import Transformer


def dense_state(model: Transformer, state: dict[str, torch.Tensor] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(our per-projection name, float32 tensor) for every weight. `state` (our fused names),
    when given, overrides the model's values (e.g. the gathered result of a distributed run)."""
    out: dict[str, torch.Tensor] = {}
    special = []  # linears whose tensors are not plain parameters
    for name, module in model.named_modules():
        if isinstance(module, (LoRALinear, Int4Linear)) and not any(name.startswith(s + ".") for s in special):
            special.append(name)
            dense = module.merged() if isinstance(module, LoRALinear) else None
            out[f"{name}.weight"] = dense.weight if dense is not None else module.dequantize()
            bias = dense.bias if dense is not None else module.bias
            if bias is not None:
                out[f"{name}.bias"] = bias
    for name, t in model.state_dict().items():
        if name not in out and not any(name.startswith(s + ".") for s in special):
            out[name] = t
    out.update(state or {})
    for name, t in out.items():
        yield from _unfuse(model, name, t.detach().float().cpu())


def _unfuse(model: Transformer, name: str, t: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    parts = name.split(".")
    if name.endswith((".attn.qkv.weight", ".attn.qkv.bias")):
        layer = int(parts[1])
        for p, piece in zip("qkv", t.split(model.layers[layer].attn.sizes)):
            yield f"layers.{layer}.attn.{p}.{parts[-1]}", piece.contiguous()
    elif name.endswith((".mlp.gate_up.weight", ".mlp.gate_up.bias")):
        gate, up = t.chunk(2)
        yield f"layers.{parts[1]}.mlp.gate.{parts[-1]}", gate.contiguous()
        yield f"layers.{parts[1]}.mlp.up.{parts[-1]}", up.contiguous()
    else:
        yield name, t

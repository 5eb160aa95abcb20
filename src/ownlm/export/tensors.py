"""A built model's weights as plain dense tensors (adapters merged, int4 / int8 dequantized), named for
a file format: fused projections the format has no name for are split into their parts."""

from __future__ import annotations

from typing import Iterator

import torch

from ..errors import BadRequest
from ..formats import keymaps
from ..model.linear import LoRALinear, QuantEmbedding, QuantLinear
from ..model.transformer import Transformer


def dense_state(model: Transformer, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Our name -> float32 tensor for every weight. `state` (our names), when given, overrides the
    model's values (e.g. the gathered result of a distributed run)."""
    out: dict[str, torch.Tensor] = {}
    special = []  # linears whose tensors are not plain parameters
    for name, module in model.named_modules():
        if (isinstance(module, (LoRALinear, QuantLinear, QuantEmbedding))
                and not any(name.startswith(s + ".") for s in special)):
            special.append(name)
            dense = module.merged() if isinstance(module, LoRALinear) else None
            out[f"{name}.weight"] = dense.weight if dense is not None else module.dequantize()
            bias = dense.bias if dense is not None else getattr(module, "bias", None)
            if bias is not None:
                out[f"{name}.bias"] = bias
    for name, t in model.state_dict().items():
        if name not in out and not any(name.startswith(s + ".") for s in special):
            out[name] = t
    out.update(state or {})
    return {name: t.detach().float().cpu() for name, t in out.items()}


def file_tensors(model: Transformer, table: list[tuple[str, str]], state: dict[str, torch.Tensor] | None = None
                 ) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(file name, our per-part name, tensor): each weight under `table`'s name for it, a fused
    projection split into its parts when the table names only those."""
    for name, t in dense_state(model, state).items():
        target = keymaps.lookup(name, table)
        if target is not None:
            yield target, name, t
            continue
        for part, piece in _unfuse(model, name, t):
            target = keymaps.lookup(part, table)
            if target is None:
                raise BadRequest(f"the export format has no name for tensor {part!r}")
            yield target, part, piece


def _unfuse(model: Transformer, name: str, t: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    parent, fused, kind = name.rsplit(".", 2) if name.count(".") >= 2 else ("", "", name)
    if fused == "qkv":
        layer = int(name.split(".")[1])
        for p, piece in zip("qkv", t.split(model.layers[layer].attn.sizes)):
            yield f"{parent}.{p}.{kind}", piece.contiguous()
    elif fused == "gate_up":
        gate, up = t.chunk(2)
        yield f"{parent}.gate.{kind}", gate.contiguous()
        yield f"{parent}.up.{kind}", up.contiguous()
    else:
        yield name, t

"""The linear-layer interface the Transformer builds on.

The model calls `dense(in, out, bias)` and afterwards only `layer(x)`; anything with that call
and a `weight`-like state (quantized int4 / int8 weights, a LoRA wrapper) can be swapped in with
`replace(model, name, new)` without touching the model code."""

from __future__ import annotations

from torch import nn


def dense(in_features: int, out_features: int, bias: bool) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=bias)


def replace(model: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule at dotted path `name` for `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)

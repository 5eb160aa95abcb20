"""Low-rank adapters on the Transformer's linear layers: attach, read out, load, merge.

Adapters are named by projection part (q, k, v, o, gate, up, down) whatever the fusion of the
model's layers: the fused qkv projection carries separate q, k and v adapters, as a model with
separate projections (and PEFT's files) would."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from .linear import LoRALinear, replace
from .transformer import Transformer

# module path inside a block -> the projection parts it computes, in output order
LINEARS = {"attn.qkv": ("q", "k", "v"), "attn.o": ("o",), "mlp.gate_up": ("gate", "up"), "mlp.down": ("down",)}
PARTS = tuple(p for parts in LINEARS.values() for p in parts)


def parse_targets(spec: str | Iterable[str]) -> list[str]:
    """`all-linear`, or names like q,v / q_proj,v_proj -> projection parts, in model order."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if names in (["all-linear"], ["all"]):
        return list(PARTS)
    out = set()
    for n in names:
        part = n.removesuffix("_proj")
        if part not in PARTS:
            raise ValueError(f"unknown target module {n!r}; use all-linear or some of {', '.join(PARTS)}")
        out.add(part)
    if not out:
        raise ValueError("no target modules given")
    return [p for p in PARTS if p in out]


def _slices(model: Transformer, layer: int, path: str, module: nn.Module) -> dict[str, tuple[int, int]]:
    parts = LINEARS[path]
    sizes = model.layers[layer].attn.sizes if path == "attn.qkv" else (module.out_features // len(parts),) * len(parts)
    out, at = {}, 0
    for p, n in zip(parts, sizes):
        out[p] = (at, at + n)
        at += n
    return out


def linears(model: Transformer) -> Iterator[tuple[str, int, str]]:
    """(module name, layer, path in block) of every adaptable linear."""
    for i in range(len(model.layers)):
        for path in LINEARS:
            yield f"layers.{i}.{path}", i, path


def attach(model: Transformer, parts: list[str], r: int, alpha: float, dropout: float = 0.0,
           rslora: bool = False) -> int:
    """Wrap the targeted linears in LoRALinear (base frozen); returns the adapter's parameter count."""
    if r < 1:
        raise ValueError(f"LoRA rank must be at least 1, not {r}")
    count = 0
    for name, layer, path in linears(model):
        module = model.get_submodule(name)
        base = module.base if isinstance(module, LoRALinear) else module
        wanted = {p: s for p, s in _slices(model, layer, path, base).items() if p in parts}
        if not wanted:
            continue
        lora = LoRALinear(base, wanted, r, alpha, dropout, rslora)
        replace(model, name, lora)
        count += sum(p.numel() for n, p in lora.named_parameters() if n.startswith("lora_"))
    return count


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into an attached adapter; names and shapes must match exactly."""
    own = dict(model.named_parameters())
    expected = {n for n in own if ".lora_a." in n or ".lora_b." in n}
    unknown = sorted(set(tensors) - expected)
    missing = sorted(expected - set(tensors))
    if unknown or missing:
        raise ValueError("adapter does not fit the model: "
                         + (f"unexpected {unknown[0]!r}" if unknown else f"lacks {missing[0]!r}"))
    with torch.no_grad():
        for n, t in tensors.items():
            if tuple(t.shape) != tuple(own[n].shape):
                raise ValueError(f"adapter tensor {n!r} has shape {tuple(t.shape)}, "
                                 f"the model needs {tuple(own[n].shape)}")
            own[n].copy_(t)


def merge(model: Transformer) -> Transformer:
    """Fold every adapter into its base weight (a dense linear), in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            replace(model, name, module.merged())
    return model


@contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Within the block every LoRA layer returns its base's output, exactly: the model computes what
    the base model computes (the reference of preference tuning, without a second copy)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m.disabled = b

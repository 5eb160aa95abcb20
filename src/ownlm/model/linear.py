"""The linear-layer interface the Transformer builds on.

The model calls `dense(in, out, bias)` and afterwards only `layer(x)`; anything with that call
and a `weight`-like state (quantized int4 / int8 weights, a LoRA wrapper) can be swapped in with
`replace(model, name, new)` without touching the model code."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

def _kernel_input(flat: torch.Tensor) -> torch.Tensor:
    """(M, K) rows as the kernels take them: contiguous float32 or bfloat16."""
    return (flat if flat.dtype in (torch.float32, torch.bfloat16) else flat.float()).contiguous()


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except that bf16 weights on an x86 CPU, outside autograd, use ownlm's kernel
    (see kernels.py: faster here, and the same bits for a row whatever the number of rows)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and rows > 0
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        lib = kernels.load()
        if lib is not None and weight.is_contiguous():
            y = kernels.bf16_matmul(lib, _kernel_input(x.reshape(rows, -1)), weight)
            y = y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)
            return y if bias is None else y + bias
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose forward is `matmul` (see above)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(x, self.weight, self.bias)


def dense(in_features: int, out_features: int, bias: bool) -> nn.Module:
    return Linear(in_features, out_features, bias=bias)


def replace(model: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule at dotted path `name` for `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class Int4Linear(nn.Module):
    """Group-wise int4 weights kept quantized in memory: w = (q - 8) * scale + zero per group of
    `group` input columns. One-token decode steps (any number of sequences) go through ownlm's
    kernel where it runs (see kernels.py; packed nibbles, fp32 scales); longer inputs (prefill
    chunks) through PyTorch's int4 weight-only kernel, which is faster there (its packed layout,
    scales in `dtype`). Both layouts are kept: ~1.25x the int4 bytes."""

    def __init__(self, q, scale, zero, group: int, bias=None, dtype=torch.bfloat16):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group = group
        self.dtype = dtype
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2))
        self.register_buffer("scales_zeros", torch.stack([scale, zero], dim=-1).to(dtype).contiguous())  # (K/g, N, 2)
        self.own_kernel = group == 32 and kernels.load() is not None
        if self.own_kernel:
            self.register_buffer("nibbles", kernels.pack_int4(q))  # (N, K/2)
            self.register_buffer("scale", scale.t().float().contiguous())  # (N, K/32)
            self.register_buffer("zs", (zero - 8 * scale).t().float().contiguous())  # (N, K/32)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_buffers(cls, buffers: dict[str, torch.Tensor], group: int, dtype: torch.dtype) -> "Int4Linear":
        """Rebuild from the tensors of a saved state_dict (the repacked-model cache), no repacking."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        groups, self.out_features, _ = buffers["scales_zeros"].shape
        self.in_features, self.group, self.dtype = groups * group, group, dtype
        for name in ("packed", "scales_zeros", "nibbles", "scale", "zs"):
            if name in buffers:
                self.register_buffer(name, buffers[name])
        self.own_kernel = "nibbles" in buffers and kernels.load() is not None
        bias = buffers.get("bias")
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        if self.own_kernel and (x.dim() < 2 or shape[-2] == 1):  # one token per sequence: decode
            y = kernels.int4_matmul(kernels.load(), _kernel_input(flat), self.nibbles, self.scale, self.zs)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(self.dtype), self.packed, self.group, self.scales_zeros)
        y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group={self.group}"


def int4_supported(device) -> bool:
    return torch.device(device).type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")

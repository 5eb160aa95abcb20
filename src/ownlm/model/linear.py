"""The linear-layer interface the Transformer builds on.

The model calls `dense(in, out, bias)` and afterwards only `layer(x)`; anything with that call
and a `weight`-like state (quantized int4 / int8 weights, a LoRA wrapper) can be swapped in with
`replace(model, name, new)` without touching the model code."""

from __future__ import annotations

import math

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

    def dequantize(self) -> torch.Tensor:
        """The weight as a dense float32 (N, K) tensor: from the nibbles when this layer keeps
        them, else the int4 kernel applied to the identity."""
        if "nibbles" in self._buffers:
            nb = self.nibbles.view(self.out_features, -1, 16)
            q = torch.cat([nb & 15, nb >> 4], dim=-1).float()  # (N, K/32, 32)
            return (q * self.scale[..., None] + self.zs[..., None]).reshape(self.out_features, self.in_features)
        eye = torch.eye(self.in_features, dtype=self.dtype, device=self.packed.device)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group, self.scales_zeros).t().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # training an adapter over frozen int4 weights (QLoRA)
            y = _Int4MatMul.apply(x, self)
            return y if self.bias is None else y + self.bias
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        if self.own_kernel and (x.dim() < 2 or shape[-2] == 1):  # one token per sequence: decode
            y = kernels.int4_matmul(kernels.load(), _kernel_input(flat), self.nibbles, self.scale, self.zs)
        elif self.dtype == torch.float32:  # PyTorch's int4 kernel is ~50x slower in float32 than bf16 here
            y = F.linear(flat.float(), self.dequantize())
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(self.dtype), self.packed, self.group, self.scales_zeros)
        y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group={self.group}"


class _Int4MatMul(torch.autograd.Function):
    """x @ W.T for frozen int4 weights in training (QLoRA): the weight is dequantized for the
    forward and again for the backward (dL/dx = dL/dy @ W) and never kept, so memory stays int4;
    the matmuls run in x's dtype (float32 on CPUs whose bfloat16 is emulated)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, layer.dequantize().to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dequantize().to(grad.dtype), None


class LoRALinear(nn.Module):
    """A frozen base linear plus low-rank adapters: y = base(x) + scale * B(A(dropout(x))).

    `parts` names slices of the base's output (the fused qkv projection has parts q, k and v at
    their row ranges); each targeted part gets its own A (r x in) and B (out_part x r), exactly
    the adapters PEFT attaches to the separate q_proj / k_proj / v_proj modules. scale is
    alpha / r, or alpha / sqrt(r) with rsLoRA. B starts at zero, so training starts at the base."""

    def __init__(self, base: nn.Module, parts: dict[str, tuple[int, int]], r: int, alpha: float,
                 dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.parts = dict(sorted(parts.items(), key=lambda kv: kv[1][0]))  # in output order
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scale = alpha / (math.sqrt(r) if rslora else r)
        self.in_features = base.in_features
        self.out_features = base.out_features
        device = next(iter(base.buffers() if isinstance(base, Int4Linear) else base.parameters())).device
        self.lora_a = nn.ParameterDict({n: nn.Parameter(torch.empty(r, self.in_features, device=device)) for n in parts})
        self.lora_b = nn.ParameterDict({n: nn.Parameter(torch.zeros(s1 - s0, r, device=device))
                                        for n, (s0, s1) in parts.items()})
        for a in self.lora_a.values():  # PEFT's default initialisation of A
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta(self) -> torch.Tensor:
        """scale * B @ A for the whole output (zero rows where no part is targeted): (out, in)."""
        a0 = next(iter(self.lora_a.values()))
        out = torch.zeros(self.out_features, self.in_features, dtype=a0.dtype, device=a0.device)
        for n, (s0, s1) in self.parts.items():
            out[s0:s1] = self.scale * (self.lora_b[n] @ self.lora_a[n])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = self.dropout(x)
        names = list(self.parts)
        a = torch.cat([self.lora_a[n] for n in names]) if len(names) > 1 else self.lora_a[names[0]]
        ha = F.linear(h.to(a.dtype), a)  # (..., r * parts): all parts' A in one matmul
        pieces, at = [], 0
        for i, n in enumerate(names):
            s0, s1 = self.parts[n]
            if s0 > at:
                pieces.append(ha.new_zeros(*ha.shape[:-1], s0 - at))
            pieces.append(F.linear(ha[..., i * self.r:(i + 1) * self.r], self.lora_b[n]))
            at = s1
        if at < self.out_features:
            pieces.append(ha.new_zeros(*ha.shape[:-1], self.out_features - at))
        delta = torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]
        return y + (self.scale * delta).to(y.dtype)

    def merged(self) -> nn.Module:
        """A plain dense Linear with the adapter folded in (onto the dequantized base if int4)."""
        base = self.base
        w = base.dequantize() if isinstance(base, Int4Linear) else base.weight
        dtype = base.dtype if isinstance(base, Int4Linear) else w.dtype
        layer = Linear(self.in_features, self.out_features, bias=base.bias is not None, device=w.device, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_((w.float() + self.delta().float()).to(dtype))
            if base.bias is not None:
                layer.bias.copy_(base.bias)
        return layer.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"parts={list(self.parts)}, r={self.r}, alpha={self.alpha}, rslora={self.rslora}"


def int4_supported(device) -> bool:
    return torch.device(device).type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")

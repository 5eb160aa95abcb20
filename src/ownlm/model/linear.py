"""The linear-layer interface the Transformer builds on.

The model calls `dense(in, out, bias)` and afterwards only `layer(x)`, and its embedding table
`embed(tokens)` and `embed.head(x)` (tied output head); anything with those calls (int4 / int8
weights, a LoRA wrapper) can be swapped in with `replace(model, name, new)` without touching
the model code."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .quant import (QuantStack, QuantWeight, aligned, tinygemm_fits, tinygemm_mm, tinygemm_on_cpu, tinygemm_pack,
                    tinygemm_params)

class Linear(nn.Linear):
    """nn.Linear whose forward is ops.dense_matmul (ownlm's kernel for bf16 weights on a CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.dense_matmul(x, self.weight, self.bias)


def dense(in_features: int, out_features: int, bias: bool) -> nn.Module:
    return Linear(in_features, out_features, bias=bias)


def replace(model: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule at dotted path `name` for `new`, and bump the model's structure version
    (a decode plan built from the old modules is then built again)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    if hasattr(model, "structure_version"):
        model.structure_version += 1


class Embedding(nn.Embedding):
    """nn.Embedding that can also serve as the output head (tied embeddings)."""

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return ops.dense_matmul(x, self.weight)


def fast_quant(device) -> bool:
    """Whether int4 weights have a fast kernel on `device`: ownlm's kernels on a CPU (x86 with AVX2,
    or AArch64), PyTorch's int4 kernel (tinygemm, bfloat16, Ampere or newer) on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and ops.cpu_kernels()


def quant_supported(device, bits: int) -> bool:
    """Int4 / int8 weights work on CPUs (fast with ownlm's kernels; without them int4 through
    PyTorch's int4 kernel and the rest dequantized per call); on CUDA int4 works where PyTorch's
    int4 kernel does."""
    device = torch.device(device)
    return device.type == "cpu" or (bits == 4 and fast_quant(device))


def layout_for(device, w: QuantWeight | QuantStack | None = None, embedding: bool = False) -> str:
    """How a quantized weight w is held on `device`: "blocks" (ownlm's layout, see _Quantized) on
    a CPU with ownlm's kernels; "tinygemm" (PyTorch's int4 layout) for int4 linears that fit it
    on CUDA and, without ownlm's kernels, on a CPU (its CPU twin of the same kernel, PyTorch 2.6 and
    later); otherwise "blocks" on a CPU (dequantized per call, a slice at a time: memory stays
    quantized) and "dense" on CUDA (dequantized at load). w None: the layout of an int4 linear."""
    device = torch.device(device)
    if device.type == "cpu" and ops.cpu_kernels():
        return "blocks"
    fits = not embedding and (w is None or (isinstance(w, QuantWeight) and w.kind == "int4"
                                            and tinygemm_fits(w.shape)))
    fits = fits and (device.type != "cpu" or tinygemm_on_cpu())
    return "tinygemm" if fits else "blocks" if device.type == "cpu" else "dense"


FIELDS = ("data", "scale", "offset", "high", "sub", "lut", "superblock")  # a QuantWeight's tensors


def part_suffix(i: int) -> str:
    """How part i's buffers are named: data, scale, ... for the first, data_1, ... after it."""
    return f"_{i}" if i else ""


def quant_from(buffers: dict[str, torch.Tensor], bits: int | list[int]) -> QuantWeight | QuantStack:
    """A weight from a quantized layer's buffers by name (its state dict without the prefix)."""
    widths = [bits] if isinstance(bits, int) else list(bits)
    parts = [QuantWeight(b, **{f: buffers.get(f + part_suffix(i)) for f in FIELDS}) for i, b in enumerate(widths)]
    return parts[0] if isinstance(bits, int) else QuantStack(parts)


class _Quantized(nn.Module):
    """Holds a QuantWeight (or a QuantStack of them) in one of two layouts:
    - "blocks": buffers `data` (packed nibbles or int8), `scale` and, as the width has them,
      `offset`, `high` and `sub` (a stack: the first part's so, data_1, scale_1, ... the next):
      the file's bytes, which ownlm's CPU kernels read (see quant.py);
    - "tinygemm" (int4 on CUDA): buffers `packed` and `scale_zero`, the operands of PyTorch's int4
      kernel `_weight_int4pack_mm` (scale and zero in bfloat16: quants.tinygemm_params)."""

    def _set_weight(self, w: QuantWeight | QuantStack, dtype: torch.dtype, layout: str = "blocks") -> None:
        parts = w.parts if isinstance(w, QuantStack) else [w]
        for p in parts:
            p.check()
        if len({p.shape[1] for p in parts}) != 1:
            raise ValueError("the parts of a quantized weight differ in their inputs")
        self.dtype, self.layout = dtype, layout
        self.part_bits = [p.bits for p in parts]
        self.bits = parts[0].bits if isinstance(w, QuantWeight) else tuple(self.part_bits)  # int4..int8, or a mix
        self.out_features, self.in_features = w.shape
        if layout == "tinygemm":
            on_cpu = w.data.device.type == "cpu"  # the CPU twin: x goes in as bfloat16 whatever the dtype
            if (not isinstance(w, QuantWeight) or w.kind != "int4" or not (on_cpu or dtype == torch.bfloat16)
                    or not tinygemm_fits(w.shape)):
                raise ValueError(f"PyTorch's int4 kernel takes int4 weights with a multiple of 16 outputs in "
                                 f"bfloat16, not int{self.bits} {w.shape} in {dtype}")
            q, scale_zero = tinygemm_params(w)
            self.packed_for = w.data.device.type  # the packing differs between CUDA and CPUs
            self.register_buffer("packed", tinygemm_pack(q))
            self.register_buffer("scale_zero", scale_zero)
            return
        for i, p in enumerate(parts):
            for f in FIELDS:
                self.register_buffer(f + part_suffix(i), aligned(getattr(p, f)))

    @property
    def parts(self) -> list[QuantWeight]:
        """The weight's parts as held ("blocks" layout), one after another along the outputs."""
        if self.layout != "blocks":
            raise ValueError("this weight is held in PyTorch's int4 layout; use dequantize()")
        return [QuantWeight(b, **{f: getattr(self, f + part_suffix(i)) for f in FIELDS})
                for i, b in enumerate(self.part_bits)]

    @property
    def weight_q(self) -> QuantWeight:
        parts = self.parts
        if len(parts) > 1:
            raise ValueError("this weight has parts of different widths; use .parts")
        return parts[0]

    def dequantize(self) -> torch.Tensor:
        """The weight as a dense float32 (N, K) tensor (in the tinygemm layout: read back through
        the kernel itself, a slice of the identity at a time, so it is the weight the kernel uses,
        in bfloat16)."""
        if self.layout == "blocks":
            return torch.cat([p.dequantize() for p in self.parts])
        k, step, device = self.in_features, 1024, self.packed.device
        rows = []
        for i in range(0, k, step):
            n = min(step, k - i)
            eye = torch.zeros(n, k, dtype=torch.bfloat16, device=device)
            eye[torch.arange(n, device=device), torch.arange(i, i + n, device=device)] = 1
            rows.append(tinygemm_mm(eye, self.packed, self.scale_zero).float())  # (n, N): W.T's rows
        return torch.cat(rows).T.contiguous()

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T: ownlm's integer kernel (CPU) or PyTorch's int4 kernel (CUDA) in inference; in
        training (gradients wanted for x: an adapter over frozen quantized weights, QLoRA) the
        weight is dequantized per call and kept nowhere."""
        if torch.is_grad_enabled() and x.requires_grad:
            return _QuantMatMul.apply(x, self)
        flat = x.reshape(-1, self.in_features)
        if self.layout == "tinygemm":
            if self.packed.device.type != self.packed_for:
                raise RuntimeError(f"int4 weights packed for {self.packed_for} cannot run on {self.packed.device}; "
                                   "load the model again for this device")
            y = tinygemm_mm(flat.to(torch.bfloat16).contiguous(), self.packed, self.scale_zero)
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        y = ops.quant_matmul(flat, self.parts, self.dtype)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def width(bits: int | tuple[int, ...]) -> str:
    """int4, or int4+int6 for a stack of parts (the kinds of int4 are not told apart)."""
    return "+".join(f"int{b}" for b in ((bits,) if isinstance(bits, int) else bits))


class QuantLinear(_Quantized):
    """A linear layer whose weight stays group-wise int4, int5, int6 or int8 in memory (a fused
    projection may mix them, as a QuantStack). Inference runs ownlm's integer kernel on a CPU
    (activations rounded to int16 per group of 32, see kernels.py) and PyTorch's int4 kernel on
    CUDA (layout "tinygemm")."""

    def __init__(self, w: QuantWeight | QuantStack, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.bfloat16, layout: str = "blocks"):
        super().__init__()
        self._set_weight(w, dtype, layout)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {width(self.bits)} group=32"
                + (", tinygemm" if self.layout == "tinygemm" else ""))


class QuantEmbedding(_Quantized):
    """An embedding table kept group-wise quantized: a lookup dequantizes the rows it reads; as a tied
    output head it runs the integer kernel like QuantLinear."""

    def __init__(self, w: QuantWeight, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self._set_weight(w, dtype)
        self.num_embeddings, self.embedding_dim = self.out_features, self.in_features

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.weight_q.dequantize(tokens.reshape(-1))
        return rows.to(self.dtype).reshape(*tokens.shape, self.embedding_dim)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {width(self.bits)} group=32"


class _QuantMatMul(torch.autograd.Function):
    """x @ W.T for frozen quantized weights in training (QLoRA): the weight is dequantized for
    the forward and again for the backward (dL/dx = dL/dy @ W) and never kept, so memory stays
    quantized; the matmuls run in x's dtype (float32 on CPUs whose bfloat16 is emulated)."""

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
        device = next(iter(base.buffers() if isinstance(base, QuantLinear) else base.parameters())).device
        self.lora_a = nn.ParameterDict({n: nn.Parameter(torch.empty(r, self.in_features, device=device))
                                        for n in parts})
        self.lora_b = nn.ParameterDict({n: nn.Parameter(torch.zeros(s1 - s0, r, device=device))
                                        for n, (s0, s1) in parts.items()})
        for a in self.lora_a.values():  # PEFT's default initialisation of A
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False  # adapters.disabled(model): the base's output, exactly

    def delta(self) -> torch.Tensor:
        """scale * B @ A for the whole output (zero rows where no part is targeted): (out, in)."""
        a0 = next(iter(self.lora_a.values()))
        out = torch.zeros(self.out_features, self.in_features, dtype=a0.dtype, device=a0.device)
        for n, (s0, s1) in self.parts.items():
            out[s0:s1] = self.scale * (self.lora_b[n] @ self.lora_a[n])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.disabled:
            return y
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
        w = base.dequantize() if isinstance(base, QuantLinear) else base.weight
        dtype = base.dtype if isinstance(base, QuantLinear) else w.dtype
        layer = Linear(self.in_features, self.out_features, bias=base.bias is not None, device=w.device, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_((w.float() + self.delta().float()).to(dtype))
            if base.bias is not None:
                layer.bias.copy_(base.bias)
        return layer.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"parts={list(self.parts)}, r={self.r}, alpha={self.alpha}, rslora={self.rslora}"

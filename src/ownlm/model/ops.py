"""The model's single operations, each one call from the model: ownlm's CPU kernels
(kernels.py) where they can take the inputs (a CPU, inference, the kernels built), PyTorch
otherwise. The two compute the same arithmetic (norms in float32, each result rounded to the
compute dtype as PyTorch's ops round it), so a model gives the same answers either way. Speed
tricks that replace whole steps live in the engine (engine/cpu_step.py), not here."""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from . import kernels
from .quant import QuantWeight

ACTIVATIONS = {0: F.silu, 1: functools.partial(F.gelu, approximate="tanh")}  # the kernels' numbering


def cpu_kernels() -> bool:
    """Whether ownlm's CPU kernels run here (built, and allowed by OWNLM_KERNELS)."""
    return kernels.load() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
             weight32: Callable[[], torch.Tensor]) -> torch.Tensor:
    """RMSNorm over the last dimension: x / rms(x) * w, or * (offset + w) in float32 (Gemma).
    weight32() gives the weight as contiguous float32 (the kernel's operand, kept by the norm)."""
    if kernels.usable(x):
        return kernels.rms_norm(x, weight32(), eps, offset)
    h = x.float()  # normalize in fp32 as the reference implementations do, then cast back
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (h * (offset + weight.float())).to(x.dtype)
    return weight * h.to(x.dtype)


def act_mul(h: torch.Tensor, act: int) -> torch.Tensor:
    """act(gate) * up for h = [gate | up] on the last dimension (act: 0 SiLU, 1 GeLU tanh)."""
    if kernels.usable(h):
        return kernels.act_mul(h, act)
    if torch.is_grad_enabled() and h.requires_grad:
        return _ActMul.apply(h, act)
    gate, up = h.chunk(2, dim=-1)
    return ACTIVATIONS[act](gate) * up


class _ActMul(torch.autograd.Function):
    """act(gate) * up in training, keeping only h for backward: autograd's own graph would also
    keep act(gate), a third more of the MLP's saved activations. Backward recomputes act(gate)
    (one elementwise pass) and computes what autograd would, op for op, so the gradients are the
    same bits."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, act: int) -> torch.Tensor:
        ctx.act = act
        ctx.save_for_backward(h)
        gate, up = h.chunk(2, dim=-1)
        return ACTIVATIONS[act](gate) * up

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (h,) = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        d_gate = g * up
        if ctx.act == 0:
            d_gate = torch.ops.aten.silu_backward(d_gate, gate)
        else:
            d_gate = torch.ops.aten.gelu_backward(d_gate, gate, approximate="tanh")
        return torch.cat([d_gate, g * ACTIVATIONS[ctx.act](gate)], dim=-1), None


def attend_decode(qkv: torch.Tensor, n_heads: int, n_kv: int, head_dim: int, cos: torch.Tensor | None,
                  sin: torch.Tensor | None, pos: torch.Tensor, cache, layer: int, window: int,
                  scale: float) -> torch.Tensor | None:
    """Attention through the one-token kernel (rotate q and k, write k and v into the cache,
    attend over the exact key range): qkv (B, 1, W) -> (B, 1, H D), or one sequence's T tokens
    (1, T, W) -> (1, T, H D), each row a one-token step of its own (see rows_attend). None where
    the kernel cannot take it (several sequences of several tokens, no cache it can write, ALiBi,
    rotations not in float32, a head dim that is not a multiple of 8, not a CPU in inference);
    the caller then runs the steps one by one."""
    B, T = qkv.shape[:2]
    if ((B > 1 and T > 1) or cache is None or cos is None or cos.dtype != torch.float32 or head_dim % 8
            or not kernels.usable(qkv)):
        return None  # head_dim: the kernel reads 8 dims at a time
    buffers = cache.decode_buffers(layer)
    if buffers is None:
        return None
    k_cache, v_cache, slot0 = buffers
    if T > 1:  # one sequence's tokens as rows of one slot: each writes its k and v, then attends to its position
        rows = kernels.attend_decode(qkv.reshape(T, 1, -1), n_heads, n_kv, head_dim, cos[0, 0], sin[0, 0], k_cache,
                                     v_cache, torch.full((T,), slot0), pos[0], window, scale)
        return rows.reshape(1, T, -1)
    slots = torch.arange(slot0, slot0 + B)  # the batch's sequences in slots slot0..
    return kernels.attend_decode(qkv, n_heads, n_kv, head_dim, cos[:, 0, 0], sin[:, 0, 0], k_cache, v_cache, slots,
                                 pos[:, 0], window, scale)


def rows_attend(x: torch.Tensor, cache, cfg) -> bool:
    """Whether a forward of x (B, T, C) against `cache` attends through the one-token kernel: a
    decode step, and on a CPU with ownlm's kernels one sequence's prefill too, row by row. Every
    row's attention is then that of a one-token step, whatever the rows around it: a prompt
    computed in any chunks (after a cached prefix or not) and a decode step give the same bits."""
    if cache is None or x.shape[1] == 1:
        return cache is not None
    return (x.shape[0] == 1 and cfg.position == "rope" and cfg.head_dim % 8 == 0 and kernels.usable(x)
            and cache.decode_buffers(0) is not None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
              decode: bool) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads: q (B, H, T, D), k and v (B, Hkv, S, D)
    -> (B, H, T, D). mask: (B, 1 or H, T, S), boolean or additive; additive float32 when
    `decode` (one token against a cache)."""
    B, H, T, D = q.shape
    n_kv = k.shape[1]
    if decode:
        # one-token decode: plain matmuls beat the fused kernel's setup cost at this size; fp32
        # because tiny shapes that change every step are slow through bf16 GEMM primitives.
        # The engine pads S to a multiple of kv_cache.ALIGN and masked keys add exact zeros, so
        # a sequence gets bit-identical results alone or in a batch of any lengths.
        rep = H // n_kv
        qg = q.float().view(B, n_kv, rep, D) * scale  # query heads grouped by KV head
        if mask.shape[1] > 1:  # a bias per head (ALiBi): grouped like the query heads
            mask = mask.view(B, n_kv, rep, mask.shape[-1])
        att = (qg @ k.float().transpose(-1, -2)) + mask  # (B, Hkv, rep, S); mask: 0 or -inf
        return (att.softmax(-1) @ v.float()).to(q.dtype).view(B, H, 1, D)
    k, v = k.to(q.dtype), v.to(q.dtype)  # the cache may hold a wider type than the compute
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=n_kv != H, scale=scale)


def logits_input(x: torch.Tensor) -> torch.Tensor:
    """The final hidden states as the output head takes them: float32 through the CPU kernels
    (they accumulate in float32; rounding logits to bfloat16 would make near ties among large
    logits exact ties), as they are elsewhere."""
    return x.float() if kernels.usable(x) else x


def dense_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except that bf16 weights on a CPU, outside autograd, use ownlm's kernel (faster
    there, and the same bits for a row whatever the number of rows)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and rows > 0 and weight.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and kernels.load() is not None):
        y = kernels.bf16_matmul(_kernel_rows(x.reshape(rows, -1)), weight)
        y = y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


DEQUANT_SLICE = 1 << 22  # weight values dequantized at a time where no kernel runs (16 MB as float32)


def quant_matmul(x: torch.Tensor, parts: list[QuantWeight], dtype: torch.dtype) -> torch.Tensor:
    """x (M, K) @ W.T for a group-wise integer weight (its parts stacked along the outputs), in
    inference: ownlm's integer kernel on a CPU; elsewhere the weight dequantized to `dtype` for
    this call only, DEQUANT_SLICE values at a time (a 7B model's output head would otherwise be
    half a gigabyte of float32 per call)."""
    if parts[0].data.device.type == "cpu" and x.shape[0] and kernels.load() is not None:
        return kernels.quant_matmul(_kernel_rows(x), parts)
    x = x.to(dtype)
    rows = max(1, DEQUANT_SLICE // x.shape[-1])
    return torch.cat([F.linear(x, w.dequantize(slice(n, n + rows)).to(dtype))
                      for w in parts for n in range(0, w.shape[0], rows)], dim=-1)


def _kernel_rows(flat: torch.Tensor) -> torch.Tensor:
    """(M, K) rows as the kernels take them: contiguous float32 or bfloat16."""
    return (flat if flat.dtype in (torch.float32, torch.bfloat16) else flat.float()).contiguous()

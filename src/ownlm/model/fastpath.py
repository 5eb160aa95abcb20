"""The CPU decode step of a quantized model in one kernel call.

A one-token step through 30 blocks is some 300 small operations; in eager PyTorch each costs
microseconds of dispatch, together more than the matmuls. Where every block is the common
pre-norm shape (RMSNorm, fused qkv with rotary attention, RMSNorm, gated MLP, sequential
residuals; qk-norms and post-norms too: Llama, Mistral, Qwen 2 and 3, Gemma 3, Phi-3) and its
four projections are int4 / int8 QuantLinears, `decode_layers` (kernels.py)
runs all blocks in C: the same kernels the modules call, in the same order, with the same
roundings, so the result is bit-identical to the modules' forward. Anything else (another block
shape, an adapter wrapped around a projection, training, a GPU) takes the modules' path.

The plan holds raw pointers into the model's buffers (and the tensors themselves, so they stay
valid); it is dropped when a module is swapped through `linear.replace` (an adapter attached or
merged), the model is moved or converted, or a state dict is loaded, and built again at the next
step. Cache pointers are kept per cache, so threads decoding into their own caches with one
model share nothing that a step changes."""

from __future__ import annotations

import ctypes
import weakref

import torch

from . import kernels
from .linear import QuantLinear


def eligible(model) -> bool:
    """Whether every block has the shape decode_layers runs (switches read from the config, the
    projections' types from the modules)."""
    from .transformer import RMSNorm

    cfg = model.cfg
    if (cfg.norm != "rms" or cfg.position != "rope" or cfg.clip_qkv or cfg.parallel_residual
            or cfg.shared_norm or cfg.n_experts or not cfg.mlp.startswith("gated")
            or cfg.head_dim % 8 or cfg.n_heads % cfg.n_kv_heads):
        return False
    for b in model.layers:
        linears = (b.attn.qkv, b.attn.o, b.mlp.gate_up, b.mlp.down)
        norms = [getattr(owner, name) for owner, name in ((b, "attn_norm"), (b, "mlp_norm"), (b.attn, "q_norm"),
                 (b.attn, "k_norm"), (b, "attn_post_norm"), (b, "mlp_post_norm")) if hasattr(owner, name)]
        if not all(type(m) is QuantLinear and m.layout == "blocks" for m in linears):
            return False
        if not all(type(n) is RMSNorm for n in norms):
            return False
    return True


class DecodePlan:
    def __init__(self, model):
        cfg = model.cfg
        self.bf = model.dtype == torch.bfloat16
        self.keep: list[torch.Tensor] = []  # every tensor the structs point into, held
        self.layers = (kernels.Layer * cfg.n_layers)()
        for i, block in enumerate(model.layers):
            ly = self.layers[i]
            for j, lin in enumerate((block.attn.qkv, block.attn.o, block.mlp.gate_up, block.mlp.down)):
                ly.w[j], ly.s[j] = lin.data.data_ptr(), lin.scale.data_ptr()
                ly.o[j] = lin.offset.data_ptr() if lin.offset is not None else None
                self.keep += [t for t in (lin.data, lin.scale, lin.offset) if t is not None]
                if lin.bias is not None:
                    self.keep.append(lin.bias.detach().float().contiguous())
                    ly.bias[j] = self.keep[-1].data_ptr()
                ly.bits[j], ly.n[j], ly.k[j] = lin.bits, lin.out_features, lin.in_features
            for field, norm in (("norm1", block.attn_norm), ("norm2", block.mlp_norm),
                                ("q_norm", getattr(block.attn, "q_norm", None)),
                                ("k_norm", getattr(block.attn, "k_norm", None)),
                                ("post1", getattr(block, "attn_post_norm", None)),
                                ("post2", getattr(block, "mlp_post_norm", None))):
                if norm is not None:
                    self.keep.append(norm._weight32())
                    setattr(ly, field, self.keep[-1].data_ptr())
            ly.window, ly.local = block.attn.window, int(block.local)
            ly.scale, ly.norm_offset = block.attn.scale, block.attn_norm.offset
        self.act = model.layers[0].mlp.act_id
        self.eps = cfg.norm_eps
        self.shape = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
        self.bound: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> its pointer arrays

    def _pointers(self, cache):
        """Each layer's key and value cache as pointer arrays, per cache (so threads decoding
        into caches of their own share nothing mutable), rebuilt after the cache grew."""
        key = (cache.k[0].data_ptr(), cache.v[0].data_ptr(), cache.max_len, cache.slots)
        hit = self.bound.get(cache)
        if hit is None or hit[0] != key:
            n = len(self.layers)
            ks, vs = (ctypes.c_void_p * n)(), (ctypes.c_void_p * n)()
            for i in range(n):
                k, v, _ = cache.decode_buffers(i)
                ks[i], vs[i] = k.data_ptr(), v.data_ptr()
            hit = self.bound[cache] = (key, ks, vs)
        return hit[1], hit[2]

    def run(self, x: torch.Tensor, pos: torch.Tensor, rotations: dict, cache) -> torch.Tensor:
        """x (B, 1, C) after the embedding -> the last block's output (B, 1, C)."""
        ks, vs = self._pointers(cache)
        x = x.contiguous().clone()
        cos0, sin0, _ = rotations[False]
        cos1, sin1, _ = rotations.get(True, rotations[False])
        cos0, sin0, cos1, sin1 = (t[:, 0, 0].contiguous() for t in (cos0, sin0, cos1, sin1))
        pos = pos[:, 0].contiguous()
        h, hkv, d = self.shape
        kernels.load().decode_layers(
            x.data_ptr(), self.bf, x.shape[0], x.shape[-1], len(self.layers), ctypes.byref(self.layers), ks, vs,
            h, hkv, d, cos0.shape[-1], cos0.data_ptr(), sin0.data_ptr(), cos1.data_ptr(), sin1.data_ptr(),
            cache.k[0].dtype == torch.bfloat16, cache.base, cache.k[0].shape[2], pos.data_ptr(), self.eps, self.act)
        return x


def plan(model, x: torch.Tensor, cache) -> DecodePlan | None:
    """The model's decode plan if this step can take it: a CPU inference step on a KVCache that
    the kernels can write, every block eligible. Built (or found ineligible) once, then kept until
    `forget`."""
    if cache is None or not kernels.usable(x) or cache.decode_buffers(0) is None:
        return None
    current = model.__dict__.get("_decode_plan")
    if current is None:
        current = model.__dict__["_decode_plan"] = DecodePlan(model) if eligible(model) else False
    return current or None


def forget(model) -> None:
    """Drop the model's plan; called whenever its modules or tensors change: a module swapped
    (linear.replace), the model moved or converted, or a state dict loaded into it."""
    model.__dict__.pop("_decode_plan", None)

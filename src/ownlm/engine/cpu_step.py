"""The CPU decode step of a quantized model in one kernel call.

A one-token step through 30 blocks is some 300 small operations; in eager PyTorch each costs
microseconds of dispatch, together more than the matmuls. Where every block is the common
pre-norm shape (RMSNorm, fused qkv with rotary attention, RMSNorm, gated MLP, sequential
residuals; qk-norms and post-norms too: Llama, Mistral, Qwen 2 and 3, Gemma 3, Phi-3) and its
four projections are int4 / int8 QuantLinears, the kernels' `decode_layers` runs all blocks in C:
the same kernels the modules call through model/ops.py, in the same order, with the same
roundings, so the result is bit-identical to the model's own forward. Anything else (another
block shape, an adapter wrapped around a projection, gradients on) takes the model's forward.

The plan holds raw pointers into the model's tensors (and the tensors, so they stay valid). It is
built again whenever `model.structure` changes: a module swapped through `linear.replace` (an
adapter attached or merged), a state dict loaded, the model moved or converted. A stepper serves
one cache, so threads decoding into caches of their own share nothing that a step changes."""

from __future__ import annotations

import ctypes

import torch

from ..model import kernels
from ..model.linear import QuantLinear
from ..model.transformer import RMSNorm, Transformer
from .kv_cache import KVCache, span

PROJECTIONS = ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")
NORMS = {"norm1": "attn_norm", "norm2": "mlp_norm", "q_norm": "attn.q_norm", "k_norm": "attn.k_norm",
         "post1": "attn_post_norm", "post2": "mlp_post_norm"}  # layer_t field -> the block's module


def eligible(model: Transformer) -> bool:
    """Whether every block has the shape decode_layers runs (switches read from the config, the
    projections' and norms' types from the modules) in a compute dtype it takes (float32 or
    bfloat16: a float16 model steps through its forward)."""
    cfg = model.cfg
    if not kernels.full() or model.dtype not in (torch.float32, torch.bfloat16):
        return False
    if (cfg.norm != "rms" or cfg.position != "rope" or cfg.clip_qkv or cfg.parallel_residual
            or cfg.shared_norm or cfg.n_experts or not cfg.mlp.startswith("gated")
            or cfg.head_dim % 8 or cfg.n_heads % cfg.n_kv_heads):
        return False
    for block in model.layers:
        linears = [block.get_submodule(name) for name in PROJECTIONS]
        norms = [_find(block, name) for name in NORMS.values()]
        if not all(type(m) is QuantLinear and m.layout == "blocks" for m in linears):
            return False
        if not all(n is None or type(n) is RMSNorm for n in norms):
            return False
    return True


def _find(block: torch.nn.Module, name: str) -> torch.nn.Module | None:
    try:
        return block.get_submodule(name)
    except AttributeError:
        return None


class _Plan:
    """The model's blocks as decode_layers' layer_t array, every shape the C code relies on
    checked here once."""

    def __init__(self, model: Transformer):
        cfg = model.cfg
        c, h, hkv, d = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.keep: list[torch.Tensor] = []  # every tensor the structs point into, held
        self.layers = (kernels.Layer * cfg.n_layers)()
        for i, block in enumerate(model.layers):
            ly = self.layers[i]
            linears = [block.get_submodule(name) for name in PROJECTIONS]
            qkv, o, gate_up, down = linears
            shapes = [(qkv, (h + 2 * hkv) * d, c), (o, c, h * d), (gate_up, gate_up.out_features, c),
                      (down, c, gate_up.out_features // 2)]
            for lin, n, k in shapes:
                if (lin.out_features, lin.in_features) != (n, k) or gate_up.out_features % 2:
                    raise ValueError(f"layer {i}: a {lin.out_features}x{lin.in_features} projection where the "
                                     f"config makes it {n}x{k}")
            for j, lin in enumerate(linears):
                parts = lin.parts
                kernels.check_parts(parts, lin.in_features)
                for at, w in enumerate(parts):
                    ly.part[j][at] = kernels.Part.of(w)
                    self.keep += list(w.tensors().values())
                ly.nparts[j] = len(parts)
                if lin.bias is not None:
                    self.keep.append(self._vector(lin.bias, lin.out_features, i))
                    ly.bias[j] = self.keep[-1].data_ptr()
                ly.n[j], ly.k[j] = lin.out_features, lin.in_features
            for field, name in NORMS.items():
                norm = _find(block, name)
                if norm is not None:
                    self.keep.append(self._vector(norm.weight32(), d if field in ("q_norm", "k_norm") else c, i))
                    setattr(ly, field, self.keep[-1].data_ptr())
            ly.window, ly.local = block.attn.window, int(block.local)
            ly.scale, ly.norm_offset = block.attn.scale, block.attn_norm.offset
        self.act = model.layers[0].mlp.act
        self.eps = cfg.norm_eps
        self.shape = (h, hkv, d)

    @staticmethod
    def _vector(t: torch.Tensor, n: int, layer: int) -> torch.Tensor:
        t = t.detach().float().contiguous()
        if tuple(t.shape) != (n,):
            raise ValueError(f"layer {layer}: a weight of shape {tuple(t.shape)} where ({n},) belongs")
        return t


class CpuDecode:
    """`step(tokens, pos, length)` for (B, 1) tokens and positions of the sequences in cache slots
    0..B-1 -> (B, 1, V) logits: every block in one kernel call where the model allows it, the
    model's forward otherwise (the same bits either way)."""

    def __init__(self, model: Transformer, cache: KVCache):
        self.model, self.cache = model, cache
        self._plan: _Plan | None = None
        self._structure = None
        self._bound = None  # (cache tensors' identity, key pointers, value pointers)

    def plan(self) -> _Plan | None:
        """The plan for the model as it is now, built again after its structure or the
        activation precision (kernels.set_activations) changed."""
        key = (self.model.structure, kernels.activations())  # the parts carry the activation bits
        if key != self._structure:
            self._plan = _Plan(self.model) if eligible(self.model) else None
            self._structure = key
        return self._plan

    def _pointers(self) -> tuple[ctypes.Array, ctypes.Array]:
        """Each layer's key and value cache as pointer arrays, rebuilt after the cache grew."""
        cache = self.cache
        key = (cache.k[0].data_ptr(), cache.v[0].data_ptr(), cache.max_len, cache.slots)
        if self._bound is None or self._bound[0] != key:
            n = len(cache.k)
            ks, vs = (ctypes.c_void_p * n)(), (ctypes.c_void_p * n)()
            for i in range(n):
                k, v, _ = cache.decode_buffers(i)
                if k.shape != cache.k[0].shape or v.shape != k.shape or v.dtype != k.dtype:
                    raise ValueError("the cache's layers differ in shape")
                ks[i], vs[i] = k.data_ptr(), v.data_ptr()
            self._bound = (key, ks, vs)
        return self._bound[1], self._bound[2]

    def step(self, tokens: torch.Tensor, pos: torch.Tensor, length: int) -> torch.Tensor:
        cache = self.cache
        cache.base, cache.length = 0, span(length)
        slots = torch.arange(tokens.shape[0])
        out = self.rows(tokens, pos, slots, length)
        return out if out is not None else self.model(tokens, pos, cache)

    def rows(self, tokens: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, length: int) -> torch.Tensor | None:
        """(B, 1) tokens at (B, 1) positions, row b in cache slot slots[b] -> (B, 1, V) logits, each
        row's bits those of a one-token step of its sequence; several rows may be one sequence's
        next tokens (a speculative check: every row's keys and values are written before any row
        attends). `length` covers every position. None where the kernel cannot run this model (the
        caller then steps through the model's forward)."""
        model, cache = self.model, self.cache
        plan = self.plan() if not torch.is_grad_enabled() and cache.decode_buffers(0) is not None else None
        if plan is None:
            return None
        cache.length = span(length)
        x = model.embed_tokens(tokens)  # (B, 1, C)
        kinds = model.attention_inputs(pos, cache.length, x.dtype, decode=True)
        cos0, sin0, _ = kinds[False]
        cos1, sin1, _ = kinds.get(True, kinds[False])
        rotations = tuple(t[:, 0, 0].contiguous() for t in (cos0, sin0, cos1, sin1))  # (B, R) each
        at = pos[:, 0].contiguous()
        ks, vs = self._pointers()
        k0, v0, _ = cache.decode_buffers(0)
        h, hkv, d = plan.shape
        kernels.check_attention(x.shape[0], h, hkv, d, rotations[0], k0, v0, slots, at, 0)
        x = x.reshape(x.shape[0], -1).contiguous().clone()  # (B, C), updated in place
        kernels.decode_layers(x, plan.layers, ks, vs, plan.shape, rotations, k0.dtype, slots,
                              k0.shape[2], at, plan.eps, plan.act)
        return model.finish(x[:, None])

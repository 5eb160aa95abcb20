"""One decoder-only Transformer for every supported family, driven by ModelConfig switches.

Pure compute: no file formats, no tokenizers, no cache management. The engine passes a KV cache
object (see engine/kv_cache.py) with `update(layer, pos, k, v) -> (k_all, v_all)` and
`decode_buffers(layer)`; the model only calls them. Linear layers are built by `linear.dense` and
may be swapped for quantized or LoRA linears after construction (`linear.replace`) without
touching this file. Single operations that have a CPU kernel go through ops.py; the engine may
replace a whole decode step (engine/cpu_step.py, engine/graphs.py), built from the pieces below:
`embed_tokens`, `attention_inputs`, the blocks, `finish`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import ops
from .config import ModelConfig, RopeScaling
from .linear import Embedding, dense


class Cache(Protocol):
    def update(self, layer: int, pos: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def decode_buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """(keys, values, first slot) for CPU kernels that write and read the cache themselves, or None."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, self.offset, self.weight32)

    def weight32(self) -> torch.Tensor:
        """The weight as float32 for the kernel, converted once per change of the weight."""
        key = (self.weight.data_ptr(), self.weight._version)
        if getattr(self, "_w32_key", None) != key:
            self._w32, self._w32_key = self.weight.detach().float().contiguous(), key
        return self._w32


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == "layer":
        return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.norm_bias)
    return RMSNorm(dim, cfg.norm_eps, cfg.norm_offset)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))  # (D/2,)
    if scaling.kind == "linear":
        inv = inv / scaling.factor
    elif scaling.kind in ("factors", "longrope"):  # longrope: the short factors (see Transformer.forward)
        inv = inv / torch.tensor(scaling.factors, dtype=torch.float64)
    elif scaling.kind == "llama3":
        lo_wave = scaling.original_context / scaling.low_freq_factor
        hi_wave = scaling.original_context / scaling.high_freq_factor
        wave = 2 * math.pi / inv
        scaled = torch.where(wave > lo_wave, inv / scaling.factor, inv)
        smooth = (scaling.original_context / wave - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        mid = (wave >= hi_wave) & (wave <= lo_wave)
        inv = torch.where(mid, (1 - smooth) * scaled / scaling.factor + smooth * scaled, scaled)
    return inv.float()


def alibi_slopes(n_heads: int, max_bias: float) -> torch.Tensor:
    """ALiBi's per-head slopes (as MPT computes them, including head counts that are not a power of 2)."""
    p2 = 2 ** math.ceil(math.log2(n_heads))
    slopes = 1.0 / 2.0 ** (torch.arange(1, p2 + 1, dtype=torch.float64) * (max_bias / p2))
    if p2 != n_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); cos/sin: (B, 1, T, R). Half-rotated layout (first half pairs with second)
    # over the first R dims of each head; with partial rotary (R < D) the rest pass unchanged.
    if cos.shape[-1] < x.shape[-1]:
        r = cos.shape[-1]
        return torch.cat((apply_rope(x[..., :r], cos, sin), x[..., r:]), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # q, k and v as one fused projection: one matmul instead of three (the loader concatenates)
        self.sizes = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim)
        self.qkv = dense(cfg.dim, sum(self.sizes), cfg.qkv_bias)
        self.o = dense(cfg.n_heads * cfg.head_dim, cfg.dim, cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = make_norm(cfg, cfg.head_dim)
            self.k_norm = make_norm(cfg, cfg.head_dim)
        self.qk_norm = cfg.qk_norm
        self.scale = cfg.attn_scale or cfg.head_dim ** -0.5
        self.clip = cfg.clip_qkv
        local = bool(cfg.local_layers and cfg.local_layers[layer])
        self.window = (cfg.sliding_window or 0) if (local or not cfg.local_layers) else 0  # keys this layer sees

    def forward(self, x, cos, sin, mask, pos, cache):
        B, T, _ = x.shape
        qkv = self.qkv(x)  # (B, T, (H + 2 Hkv) D)
        if self.clip:
            qkv = qkv.clamp(-self.clip, self.clip)
        if self.qk_norm:  # each q and k head normalized, v as it is
            q, k, v = qkv.split(self.sizes, dim=-1)
            q = self.q_norm(q.reshape(B, T, self.n_heads, self.hd)).reshape(B, T, -1)
            k = self.k_norm(k.reshape(B, T, self.n_kv, self.hd)).reshape(B, T, -1)
            qkv = torch.cat([q, k, v], dim=-1)
        y = ops.attend_decode(qkv, self.n_heads, self.n_kv, self.hd, cos, sin, pos, cache, self.layer, self.window,
                              self.scale)
        if y is not None:  # one token: rotated, cached and attended in one kernel call
            return self.o(y)
        q, k, v = qkv.split(self.sizes, dim=-1)
        q = q.reshape(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, D)
        k = k.reshape(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.reshape(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, Hkv, T, D)
        if v.requires_grad and torch.is_grad_enabled():  # attention keeps v for backward: as a view
            v = v.contiguous()  # of qkv it would keep all of qkv alive
        if cos is not None:  # None: positions come from an ALiBi bias in the mask
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, pos, k, v)  # (B, Hkv, S, D), S = cache length
        y = ops.attention(q, k, v, mask, self.scale, decode=T == 1 and cache is not None)  # (B, H, T, D)
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp.startswith("gated")
        self.act = 1 if cfg.mlp == "gated_gelu_tanh" else 0  # ops.ACTIVATIONS: SiLU or GeLU (tanh)
        if self.gated:
            self.gate_up = dense(cfg.dim, 2 * cfg.ffn_dim, cfg.mlp_bias)  # gate and up fused
        else:
            self.up = dense(cfg.dim, cfg.ffn_dim, cfg.mlp_bias)
        self.down = dense(cfg.ffn_dim, cfg.dim, cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return self.down(F.gelu(self.up(x)))
        return self.down(ops.act_mul(self.gate_up(x), self.act))


class MoE(nn.Module):
    """Sparse mixture of experts: a router picks `experts_per_token` gated-SiLU experts per token
    (top-k of its softmax, weights renormalized to sum to 1) and sums their outputs."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.k = cfg.experts_per_token
        self.router = dense(cfg.dim, cfg.n_experts, False)
        self.experts = nn.ModuleList(MLP(cfg) for _ in range(cfg.n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (N, C)
        probs = self.router(flat).float().softmax(-1)
        weight, chosen = probs.topk(self.k, dim=-1)  # (N, k)
        weight = (weight / weight.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(flat)
        for e in chosen.unique().tolist():  # only the experts some token was routed to
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            out.index_add_(0, rows, self.experts[e](flat[rows]) * weight[rows, slot, None])
        return out.reshape(x.shape)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(cfg, cfg.dim)
        self.attn = Attention(cfg, layer)
        self.shared_norm = cfg.shared_norm
        if not cfg.shared_norm:
            self.mlp_norm = make_norm(cfg, cfg.dim)
        self.mlp = MoE(cfg) if cfg.n_experts else MLP(cfg)
        self.parallel = cfg.parallel_residual
        self.local = bool(cfg.local_layers and cfg.local_layers[layer])  # sliding window, local rope
        if cfg.post_norms:
            self.attn_post_norm = make_norm(cfg, cfg.dim)
            self.mlp_post_norm = make_norm(cfg, cfg.dim)
        self.post_norms = cfg.post_norms

    def forward(self, x, cos, sin, mask, pos, cache):
        if self.parallel:  # both branches read the same input
            h = self.attn_norm(x)
            return x + self.attn(h, cos, sin, mask, pos, cache) + self.mlp(h if self.shared_norm else self.mlp_norm(x))
        a = self.attn(self.attn_norm(x), cos, sin, mask, pos, cache)
        x = x + (self.attn_post_norm(a) if self.post_norms else a)
        m = self.mlp(self.mlp_norm(x))
        return x + (self.mlp_post_norm(m) if self.post_norms else m)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # weights always come from a checkpoint: no random init (Embedding's normal_ on the meta
        # device would import torch._dynamo, a second and more of every load)
        self.embed = Embedding(cfg.vocab_size, cfg.dim, _weight=torch.empty(cfg.vocab_size, cfg.dim))
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg, cfg.dim)
        self.lm_head = None if cfg.tie_embeddings else dense(cfg.dim, cfg.vocab_size, False)
        self.register_buffer("inv_freq", torch.empty(cfg.rope_dim // 2), persistent=False)
        if cfg.local_layers:  # local layers rotate with their own base, unscaled
            self.register_buffer("inv_freq_local", torch.empty(cfg.rope_dim // 2), persistent=False)
        if cfg.position == "alibi":
            self.register_buffer("alibi_slopes", torch.empty(cfg.n_heads), persistent=False)
        if cfg.rope_scaling.kind == "longrope":
            self.register_buffer("inv_freq_long", torch.empty(cfg.rope_dim // 2), persistent=False)
        self.checkpointing = False  # recompute each block in the backward pass (training memory)
        # bumped whenever modules are swapped (linear.replace) or a state dict is loaded: whatever
        # holds pointers into the model's tensors (engine/cpu_step.py) checks `structure`
        self.structure_version = 0
        self.kv_dtype: torch.dtype | None = None  # the KV cache's dtype; None: kv_cache.cache_dtype's choice
        self.register_load_state_dict_post_hook(_loaded)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Compute the non-persistent buffers (call after loading weights onto a device)."""
        cfg = self.cfg
        device = device or self.norm.weight.device
        self.inv_freq = rope_frequencies(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
        if cfg.local_layers:
            self.inv_freq_local = rope_frequencies(cfg.rope_dim, cfg.rope_theta_local, RopeScaling()).to(device)
        if cfg.position == "alibi":
            self.alibi_slopes = alibi_slopes(cfg.n_heads, cfg.alibi_max).to(device)
        if cfg.rope_scaling.kind == "longrope":
            long = dataclasses.replace(cfg.rope_scaling, factors=cfg.rope_scaling.long_factors)
            self.inv_freq_long = rope_frequencies(cfg.rope_dim, cfg.rope_theta, long).to(device)

    @property
    def structure(self) -> tuple:
        """Changes whenever a module is swapped, a state dict is loaded, or the model is moved or
        converted (.to(), .float(), ...: its tensors get new storage, for which the final norm's
        weight stands)."""
        w = self.norm.weight
        return self.structure_version, w.data_ptr(), w.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (what the norms and activations are held in)."""
        return self.norm.weight.dtype

    def state_names(self) -> set[str]:
        return set(self.state_dict().keys())

    def _mask(self, pos: torch.Tensor, total: int, device, segments: torch.Tensor | None = None,
              window: int | None = None) -> torch.Tensor:
        """Boolean (B or 1, 1, T, S) mask: key j visible to query at position p iff j <= p (and
        within the sliding window). `total` is the key length (cache length or T). With
        `segments` (packed training rows, no cache) keys are the row's own tokens and a query
        sees only earlier tokens of its own segment."""
        if segments is not None:
            idx = torch.arange(segments.shape[1], device=device)
            visible = (segments[:, None, :] == segments[:, :, None]) & (idx[None, None, :] <= idx[None, :, None])
            if window:
                visible &= pos[:, None, :] > pos[:, :, None] - window
            return visible[:, None]
        keys = torch.arange(total, device=device)  # (S,)
        visible = keys[None, None, :] <= pos[:, :, None]  # (B, T, S)
        if window:
            visible &= keys[None, None, :] > pos[:, :, None] - window
        return visible[:, None]  # (B, 1, T, S)

    def _attention_inputs(self, inv_freq, pos, total, segments, window, dtype, decode):
        """(cos, sin, mask) for one kind of layer. With ALiBi there is no rotation (cos, sin are
        None) and the mask is additive per head: slope * (key position - query position)."""
        mask = self._mask(pos, total, pos.device, segments, window)
        if self.cfg.position == "alibi":
            keys = pos if segments is not None else torch.arange(total, device=pos.device).expand(pos.shape[0], total)
            rel = (keys[:, None, :] - pos[:, :, None]).float()  # (B, T, S)
            bias = self.alibi_slopes[None, :, None, None] * rel[:, None]  # (B, H, T, S)
            return None, None, bias.masked_fill(~mask, -math.inf).to(torch.float32 if decode else dtype)
        scaling = self.cfg.rope_scaling
        if scaling.kind == "longrope" and inv_freq is self.inv_freq:
            # each sequence rotates with the long factors once it is longer than the original context
            longer = (pos.amax(-1, keepdim=True) + 1 > scaling.original_context)[..., None]  # (B, 1, 1)
            inv_freq = torch.where(longer, self.inv_freq_long, self.inv_freq)
        freqs = pos[..., None].float() * inv_freq  # (B, T, R/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, R)
        if decode:  # additive form for the decode path, built once per step
            mask = torch.zeros(mask.shape, device=pos.device).masked_fill_(~mask, -math.inf)
        cos, sin = emb.cos(), emb.sin()
        if scaling.attention_factor != 1.0:
            cos, sin = cos * scaling.attention_factor, sin * scaling.attention_factor
        if decode:  # kept in float32 for one token (the decode kernel takes them so)
            return cos, sin, mask
        return cos.to(dtype), sin.to(dtype), mask

    def attention_inputs(self, pos: torch.Tensor, total: int, dtype: torch.dtype, decode: bool,
                         segments: torch.Tensor | None = None) -> dict[bool, tuple]:
        """(cos, sin, mask) of global layers under False and, with local layers (sliding window,
        own rope base), of theirs under True. `decode`: one token against a cache (rotations in
        float32, an additive float32 mask)."""
        cfg = self.cfg
        if not cfg.local_layers:
            return {False: self._attention_inputs(self.inv_freq, pos, total, segments, cfg.sliding_window, dtype,
                                                  decode)}
        # global layers: full attention, main rope; local layers: window, local rope
        return {False: self._attention_inputs(self.inv_freq, pos, total, segments, None, dtype, decode),
                True: self._attention_inputs(self.inv_freq_local, pos, total, segments, cfg.sliding_window, dtype,
                                             decode)}

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, C) inputs of the first block."""
        x = self.embed(tokens)
        if self.cfg.embed_scale:
            x = x * torch.tensor(self.cfg.dim ** 0.5, dtype=x.dtype)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of final normalized hidden states (tied embeddings: the input table is the head)."""
        x = ops.logits_input(x)
        return self.embed.head(x) if self.lm_head is None else self.lm_head(x)

    def finish(self, x: torch.Tensor, head: bool = True) -> torch.Tensor:
        """The last block's output -> logits (B, T, V), or with head=False the final normalized
        hidden states (B, T, C)."""
        x = self.norm(x)
        return self.head(x) if head else x

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor | None = None, cache: Cache | None = None,
                last_only: bool = False, head: bool = True, segments: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: (B, T) ids; pos: (B, T) absolute positions (default 0..T-1); segments: (B, T)
        ids of the packed examples a training row holds (attention stays inside each).
        Returns logits (B, T, V), or (B, 1, V) with last_only; with head=False the final
        normalized hidden states (B, T, C) instead."""
        B, T = tokens.shape
        if pos is None:
            pos = torch.arange(T, device=tokens.device).expand(B, T)
        x = self.embed_tokens(tokens)  # (B, T, C)
        total = cache.length if cache is not None else T
        rows = segments is None and ops.rows_attend(x, cache, self.cfg)  # float32 rotations for the kernel
        kinds = self.attention_inputs(pos, total, x.dtype, rows, segments)
        recompute = self.checkpointing and torch.is_grad_enabled() and cache is None
        for block in self.layers:
            cos, sin, mask = kinds[block.local]
            if recompute:
                x = checkpoint(block, x, cos, sin, mask, pos, None, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, pos, cache)
        if last_only:
            x = x[:, -1:]
        return self.finish(x, head)  # (B, T, V) or (B, T, C)


def _loaded(model: Transformer, incompatible) -> None:
    model.structure_version += 1

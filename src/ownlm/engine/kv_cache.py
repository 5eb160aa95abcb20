"""The KV cache, owned by the engine and written in place by the model.

One tensor pair per layer, (slots, Hkv, capacity, D). A single generation uses one slot; the
batch scheduler keeps its running sequences in slots 0..n-1. Both grow the cache as sequences
lengthen (geometrically, so rarely), never to a model's whole context up front, and a sequence
may only ask for as many positions as the memory free now can hold (`fitting_tokens`)."""

from __future__ import annotations

import os

import torch

from ..model import ops

ALIGN = 64
MEMORY_SHARE = 0.8  # of the memory free now, what one sequence's cache may take at most


def span(n: int) -> int:
    """Attention length for a decode step that needs `n` positions: rounded up to ALIGN, so a
    sequence's decode arithmetic is the same alone and in a batch (the model masks the rest)."""
    return -(-n // ALIGN) * ALIGN


def cache_dtype(model) -> torch.dtype:
    """The keys' and values' dtype (they are rounded to it as they are written): the compute
    dtype, except
    - on a CPU with ownlm's kernels computing in float32 under `--dtype auto`: float16, as
      llama.cpp's default, half the bytes to hold and to read at each decode step (on smollm2 a
      KL from the float32 model of 6e-7, against 3e-7 with a float32 cache and 3e-5 with a
      bfloat16 one);
    - on a CPU without the kernels: float32, since one-token attention runs in float32 there and
      converting the cache every step cost more than the memory saved.
    A model's kv_dtype (set by `load` where a dtype was asked for) overrides the first."""
    if model.device.type == "cpu" and not ops.cpu_kernels():
        return torch.float32
    if model.kv_dtype is not None:
        return model.kv_dtype
    if model.device.type == "cpu" and model.dtype == torch.float32:
        return torch.float16
    return model.dtype


def bytes_per_token(model) -> int:
    """Cache bytes one position of one sequence takes: keys and values of every layer."""
    cfg = model.cfg
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * cache_dtype(model).itemsize


def free_memory(device: torch.device) -> int:
    """Bytes free now where the cache lives: the GPU's free memory, or the system's available
    memory (MemAvailable; the free pages where /proc is missing)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # nothing to go by: no bound


def fitting_tokens(model) -> int:
    """Positions of one sequence the memory free now can hold (MEMORY_SHARE of it)."""
    return int(free_memory(model.device) * MEMORY_SHARE) // bytes_per_token(model)


def cached_forward(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of ids (B, T) as generation computes them: the keys and values written to
    a fresh cache of the model's cache dtype and attended from there (measuring a compact cache's
    effect, which a forward without a cache does not see)."""
    cache = KVCache.for_model(model, ids.shape[0], ids.shape[1])
    cache.length = ids.shape[1]
    return model(ids, cache=cache)


class KVCache:
    """`length` is the number of positions the next forward may attend to and `base` the first
    slot of the next forward's batch; the engine sets both before each forward."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.n_layers, self.n_kv, self.head_dim, self.dtype, self.device = n_layers, n_kv_heads, head_dim, dtype, device
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.slots, self.max_len = batch, max_len
        self.length = 0
        self.base = 0

    @classmethod
    def for_model(cls, model, batch: int, max_len: int) -> "KVCache":
        cfg = model.cfg
        return cls(cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim, cache_dtype(model), model.device)

    def grow(self, slots: int, max_len: int, limit: int) -> None:
        """Make room for at least `slots` sequences of `max_len` positions (kept contents stay);
        lengths grow geometrically, up to `limit`, so sequences lengthening a token at a time
        copy rarely."""
        if slots <= self.slots and max_len <= self.max_len:
            return
        new_slots = max(slots, self.slots)
        new_len = self.max_len if max_len <= self.max_len else min(limit, span(max(max_len, 2 * self.max_len, 128)))
        shape = (new_slots, self.n_kv, new_len, self.head_dim)
        for store in (self.k, self.v):
            for i, old in enumerate(store):
                new = torch.zeros(shape, dtype=self.dtype, device=self.device)
                new[: old.shape[0], :, : old.shape[2]] = old
                store[i] = new
        self.slots, self.max_len = new_slots, new_len

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst`."""
        for store in (self.k, self.v):
            for t in store:
                t[dst, :, :length] = t[src, :, :length]

    def decode_buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """(keys, values, first slot) of a layer for a decode kernel that writes and reads the
        cache itself: float32, bfloat16 or float16 CPU tensors (slots, Hkv, capacity, D); None elsewhere."""
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16) or torch.device(self.device).type != "cpu":
            return None
        return self.k[layer], self.v[layer], self.base

    def update(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # pos: (B, T) absolute positions; k, v: (B, Hkv, T, D); the batch occupies slots base..base+B-1
        B = pos.shape[0]
        k, v = k.to(self.dtype), v.to(self.dtype)
        ck = self.k[layer][self.base: self.base + B]
        cv = self.v[layer][self.base: self.base + B]
        if B == 1:
            # one sequence: positions are a contiguous run, write it as a slice
            idx = pos[0]
            ck.index_copy_(2, idx, k)
            cv.index_copy_(2, idx, v)
        else:
            b = torch.arange(B, device=pos.device)[:, None].expand_as(pos)  # (B, T)
            ck[b, :, pos] = k.transpose(1, 2)  # advanced indexing puts (B, T) first: (B, T, Hkv, D)
            cv[b, :, pos] = v.transpose(1, 2)
        return ck[:, :, : self.length], cv[:, :, : self.length]

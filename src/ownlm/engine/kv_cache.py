"""A preallocated KV cache, owned by the engine and written in place by the model."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values for every layer: (B, Hkv, S_max, D) each. `length` is the number of
    positions the next forward may attend to; the engine sets it before each forward."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0

    @classmethod
    def for_model(cls, model, batch: int, max_len: int) -> "KVCache":
        cfg = model.cfg
        w = model.embed.weight
        return cls(cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim, w.dtype, w.device)

    def update(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # pos: (B, T) absolute positions; k, v: (B, Hkv, T, D)
        ck, cv = self.k[layer], self.v[layer]
        if pos.shape[0] == 1:
            # one sequence: positions are a contiguous run, write it as a slice
            idx = pos[0]
            ck.index_copy_(2, idx, k)
            cv.index_copy_(2, idx, v)
        else:
            b = torch.arange(pos.shape[0], device=pos.device)[:, None].expand_as(pos)  # (B, T)
            ck[b, :, pos] = k.transpose(1, 2)  # advanced indexing puts (B, T) first: (B, T, Hkv, D)
            cv[b, :, pos] = v.transpose(1, 2)
        return ck[:, :, : self.length], cv[:, :, : self.length]

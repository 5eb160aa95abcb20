"""CUDA-graph replay of one-token decode steps.

A decode step of a small model on a GPU is hundreds of tiny kernels whose launch cost dwarfs their
work. Captured once as a CUDA graph, the whole step launches as one. A graph fixes its shapes and
the addresses it reads and writes, so there is one graph per (batch size, attention length
bucket): the attention length is rounded up to a power of two (at least MIN_LENGTH, at most the
cache's capacity) and the model masks the keys past each sequence's position, as it does for the
eager step. Batches are never padded: every row of a graph is a real sequence in slots 0..B-1,
so no graph writes into a slot another sequence owns. Graphs hold the KV cache's tensors, and are
dropped when the cache is reallocated.

On by default on CUDA; OWNLM_CUDA_GRAPHS=0 turns it off."""

from __future__ import annotations

import os

import torch

from .kv_cache import KVCache

MIN_LENGTH = 256


def enabled(device: torch.device, model: torch.nn.Module) -> bool:
    """On CUDA unless turned off; never for a mixture of experts (its routing picks experts on the
    host each step, which a captured graph cannot replay), nor for a model sharded by FSDP2 (GRPO's
    rollouts under --nproc: its forward hooks order work between its own streams, which a capture
    on one stream cannot hold)."""
    return (device.type == "cuda" and os.environ.get("OWNLM_CUDA_GRAPHS", "1") != "0"
            and not model.cfg.n_experts and not _sharded(model))


def _sharded(model: torch.nn.Module) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def length_bucket(length: int, capacity: int) -> int:
    bucket = MIN_LENGTH
    while bucket < length:
        bucket *= 2
    return min(bucket, capacity)


class _Graph:
    def __init__(self, model: torch.nn.Module, cache: KVCache, tokens: torch.Tensor, pos: torch.Tensor, pool):
        self.tokens, self.pos = tokens.clone(), pos.clone()
        # warm up on a side stream (as capture requires) with the real step's inputs: it writes the
        # same keys and values the replay will, so running it is harmless
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(self.tokens, self.pos, cache)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = model(self.tokens, self.pos, cache)

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.pos.copy_(pos)
        self.graph.replay()
        return self.logits


class DecodeGraphs:
    """`step(tokens, pos)` for (B, 1) tokens and positions of the sequences in cache slots 0..B-1;
    returns (B, 1, V) logits, valid until the next step (read them before calling again)."""

    def __init__(self, model: torch.nn.Module, cache: KVCache):
        self.model, self.cache = model, cache
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = None
        self._held = None  # the cache tensor the graphs were captured against

    def step(self, tokens: torch.Tensor, pos: torch.Tensor, length: int) -> torch.Tensor:
        cache = self.cache
        if self._held is not cache.k[0]:  # reallocated by grow(): old graphs point at freed memory
            self.graphs.clear()
            # a fresh memory pool: the old one lives on while tensors from it (the last logits) do,
            # and PyTorch refuses to capture into a pool whose graphs are all gone
            self.pool = torch.cuda.graph_pool_handle()
            self._held = cache.k[0]
        cache.base, cache.length = 0, length_bucket(length, cache.max_len)
        key = (tokens.shape[0], cache.length)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = _Graph(self.model, cache, tokens, pos, self.pool)
        return graph(tokens, pos)

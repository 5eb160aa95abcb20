"""How the engine runs a one-token decode step for a batch in cache slots 0..B-1: captured CUDA
graphs on a GPU (graphs.py), else the one-call CPU step (cpu_step.py), which takes the model's
own forward wherever it does not apply. Both have `step(tokens, pos, length) -> logits`."""

from __future__ import annotations

import torch

from .cpu_step import CpuDecode
from .graphs import DecodeGraphs
from .graphs import enabled as graphs_enabled
from .kv_cache import KVCache


def decode_stepper(model: torch.nn.Module, cache: KVCache) -> CpuDecode | DecodeGraphs:
    if graphs_enabled(model.device, model):
        return DecodeGraphs(model, cache)
    return CpuDecode(model, cache)

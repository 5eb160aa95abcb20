"""Q4_0 / Q4_1 GGUF weights kept as int4 in memory: lossless repacking, and the int4 model
against the dequantized one."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import ownlm
from ownlm.formats.gguf import GGUFFile
from ownlm.formats.quants import int4_from_blocks
from ownlm.model.linear import Int4Linear

from .ggufs import hf_folder_to_gguf

Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_int4_repack_is_lossless(hf_models, tmp_path, qtype):
    path = hf_folder_to_gguf(hf_models["llama"], tmp_path / "q.gguf", qtype=qtype)
    g = GGUFFile(path)
    n = 0
    for name, t in g.tensors.items():
        if t.qtype == qtype:
            w = int4_from_blocks(g.raw(name), qtype)
            np.testing.assert_allclose(w.dequantize().numpy(), g.dequantize(name), rtol=0, atol=1e-6)
            n += 1
    assert n >= 14


def test_int4_linear_matches_dense_math(hf_models, tmp_path):
    path = hf_folder_to_gguf(hf_models["llama"], tmp_path / "q.gguf", qtype=Q.Q4_1)
    g = GGUFFile(path)
    w = int4_from_blocks(g.raw("blk.0.ffn_up.weight"), Q.Q4_1)
    x = torch.randn(5, w.q.shape[1])
    want = x @ w.dequantize().t()
    got = Int4Linear(w.q, w.scale, w.zero, w.group, dtype=torch.bfloat16)(x.bfloat16()).float()
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_int4_model_follows_dequantized_model(smollm2_gguf):
    """The default CPU path (int4 weights, bf16 activations) against the fp32 dequantized model."""
    fast = ownlm.load(str(smollm2_gguf), device="cpu", dtype="bfloat16")
    exact = ownlm.load(str(smollm2_gguf), device="cpu", dtype="float32")
    assert any(isinstance(m, Int4Linear) for m in fast.model.modules())
    assert not any(isinstance(m, Int4Linear) for m in exact.model.modules())
    ids = torch.tensor([exact.encode(exact.chat_prompt([{"role": "user", "content": "Name three colors of the rainbow."}]))])
    with torch.no_grad():
        a = fast.model(ids).float().log_softmax(-1)
        b = exact.model(ids).log_softmax(-1)
    kl = (b.exp() * (b - a)).sum(-1).mean().item()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert kl < 0.05 and agree > 0.9, (kl, agree)

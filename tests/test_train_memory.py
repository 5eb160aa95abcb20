"""What a training forward keeps for backward: the gated MLP keeps [gate | up] and not act(gate),
attention does not keep all of the fused qkv projection alive through a view of v, and the
output head's target log-probabilities hold one logits-sized buffer. Each change keeps autograd's
results: the MLP's gradients bit for bit, the head's to float32 rounding."""

from __future__ import annotations

import pytest
import torch

from ownlm.model import ops
from ownlm.model.config import ModelConfig
from ownlm.model.transformer import Transformer
from ownlm.tune.objectives import target_logps


@pytest.mark.parametrize("act", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gated_activation_gives_autograds_values_and_gradients(act, dtype):
    g = torch.Generator().manual_seed(act)
    h = torch.randn(3, 7, 64, generator=g).to(dtype).requires_grad_()
    grad = torch.randn(3, 7, 32, generator=g).to(dtype)
    y = ops.act_mul(h, act)
    y.backward(grad)
    mine, h.grad = h.grad, None
    gate, up = h.chunk(2, dim=-1)
    want = ops.ACTIVATIONS[act](gate) * up  # autograd's own graph
    want.backward(grad)
    assert y.grad_fn is not None and type(y.grad_fn) is not type(want.grad_fn)  # the lean function ran
    assert torch.equal(y, want) and torch.equal(mine, h.grad)


def saved_storages(fn) -> list[tuple[int, tuple[int, ...]]]:
    """(storage bytes, shape) of every tensor autograd saves while fn runs."""
    seen = []

    def pack(t):
        seen.append((t.untyped_storage().nbytes(), tuple(t.shape)))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return seen


def test_a_training_forward_keeps_neither_act_gate_nor_all_of_qkv():
    cfg = ModelConfig("llama", vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96)
    torch.manual_seed(0)
    model = Transformer(cfg).float().train()
    B, T = 2, 12
    tokens = torch.randint(0, cfg.vocab_size, (B, T))
    saved = saved_storages(lambda: model(tokens).sum())
    f32 = 4
    qkv_bytes = B * T * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim * f32
    ffn_bytes = B * T * cfg.ffn_dim * f32
    assert saved, "nothing was saved: the forward did not build a graph"
    assert not [s for s in saved if s[0] == qkv_bytes], "a saved tensor keeps the fused qkv output alive"
    # per layer: [gate | up] (2 ffn) and the down projection's input act(gate) * up (1 ffn); no act(gate)
    ffn_sized = sorted(s[0] // ffn_bytes for s in saved if s[0] in (ffn_bytes, 2 * ffn_bytes))
    assert ffn_sized == [1] * cfg.n_layers + [2] * cfg.n_layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_target_log_probabilities_equal_log_softmax_and_hold_one_buffer(dtype):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(37, 1000, generator=g) * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, 1000, (37,), generator=g)
    grad = torch.randn(37, generator=g)
    saved = saved_storages(lambda: target_logps(logits * 1, targets).backward(grad))
    mine, logits.grad = logits.grad, None
    want = torch.log_softmax((logits * 1).float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    want.backward(grad)
    got = target_logps(logits * 1, targets)
    assert got.dtype == torch.float32 and mine.dtype == dtype
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=4e-6)
    tol = 1e-6 if dtype == torch.float32 else 8e-3  # a bfloat16 gradient is rounded to bfloat16
    torch.testing.assert_close(mine.float(), logits.grad.float(), rtol=0, atol=tol)
    # the buffers autograd keeps: one (37, 1000) float32 (the logits), beside the small ones
    assert sorted(s for s, _ in saved if s >= 37 * 1000 * 2) == [37 * 1000 * 4]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_grpo_token_log_probabilities_hold_one_vocabulary_sized_buffer(temperature):
    """GRPO's per-token log-probabilities (of the logits divided by the sampling temperature)
    equal log_softmax's over the whole sequence, and keep one (targets, vocabulary) buffer."""
    from ownlm.tune.data import Row
    from ownlm.tune.grpo import token_logps

    V = 1000
    cfg = ModelConfig("llama", vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96)
    torch.manual_seed(2)
    model = Transformer(cfg).float().train()  # its parameters are uninitialized memory: set them
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08) if p.dim() > 1 else p.normal_(1.0, 0.1)  # matrices; norm weights
    model.init_buffers("cpu")  # and its rotary frequencies
    g = torch.Generator().manual_seed(3)
    rows = []
    for p, c in ((5, 4), (3, 7)):  # prompt and completion lengths
        ids = torch.randint(0, V, (p + c,), generator=g).tolist()
        rows.append(Row(ids, [False] * p + [True] * c, list(range(p + c)), [0] * (p + c)))
    out = {}

    def run():
        out["logp"], out["which"] = token_logps(model, rows, torch.device("cpu"), None, temperature)
        out["logp"].sum().backward()
    saved = saved_storages(run)
    n = 4 + 7  # every completion token is a target (the first one predicted by the prompt's last)
    # the direct computation: log_softmax of the whole sequence's logits at the completion's targets
    want = []
    for r in rows:
        with torch.no_grad():
            logits = model(torch.tensor([r.ids]))[0].double() / temperature
        lp = torch.log_softmax(logits, -1)
        want += [lp[t, r.ids[t + 1]].item() for t in range(len(r.ids) - 1) if r.mask[t + 1]]
    assert out["logp"].shape == (n,) and out["which"].tolist() == [0] * 4 + [1] * 7
    torch.testing.assert_close(out["logp"].double(), torch.tensor(want, dtype=torch.float64), rtol=0, atol=2e-5)
    # the (targets, V) tensors autograd keeps: one float32 buffer (log_softmax kept a second)
    assert [s for s, shape in saved if shape == (n, V)] == [n * V * 4]

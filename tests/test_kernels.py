"""The small-batch bf16 matmul kernel: equal to a float64 reference within fp32 rounding, and a
row gets the same bits alone as in a batch (what keeps batched decoding exact)."""

from __future__ import annotations

import pytest
import torch

from ownlm.model import kernels
from ownlm.model.linear import Linear, matmul

lib = kernels.load()
pytestmark = pytest.mark.skipif(lib is None, reason="needs an x86 CPU with AVX2 and a C compiler (else PyTorch's kernel runs)")


@pytest.mark.parametrize("k", [576, 100])  # 100: a tail that is not a multiple of 8
def test_bf16_matmul_equals_reference(k):
    torch.manual_seed(0)
    w = torch.randn(3001, k).bfloat16()
    x = torch.randn(7, k)
    got = kernels.bf16_matmul(lib, x, w)
    want = x.double() @ w.double().t()
    assert torch.allclose(got.double(), want, atol=1e-4 * k ** 0.5, rtol=0)


def test_rows_are_batch_invariant():
    torch.manual_seed(1)
    w = torch.randn(4096, 576).bfloat16()
    x = torch.randn(13, 576)
    together = kernels.bf16_matmul(lib, x, w)
    for i in range(13):
        assert torch.equal(kernels.bf16_matmul(lib, x[i:i + 1].contiguous(), w)[0], together[i])


def test_linear_uses_it_only_outside_autograd():
    torch.manual_seed(2)
    lin = Linear(64, 32, bias=True).to(torch.bfloat16)
    x = torch.randn(4, 64).bfloat16()
    with torch.inference_mode():
        fast = lin(x)
    ref = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    assert torch.allclose(fast.float(), ref, atol=2e-2)
    y = lin(x.requires_grad_())  # training path: PyTorch's kernel, gradients flow
    y.sum().backward()
    assert x.grad is not None and lin.weight.grad is not None
    assert torch.equal(matmul(x.detach()[:0], lin.weight), torch.nn.functional.linear(x.detach()[:0], lin.weight))


def _int4_case(n=3072, k=576, seed=3):
    from ownlm.formats.quants import Int4Weight

    torch.manual_seed(seed)
    w = Int4Weight(torch.randint(0, 16, (n, k), dtype=torch.uint8), torch.rand(k // 32, n) * 0.02,
                   torch.randn(k // 32, n) * 0.01)
    return w, w.dequantize().double()


def test_int4_matmul_equals_reference_and_is_batch_invariant():
    w, dense = _int4_case()
    packed = kernels.pack_int4(w.q)
    scale, zs = w.scale.t().contiguous(), (w.zero - 8 * w.scale).t().contiguous()
    x = torch.randn(13, 576)
    got = kernels.int4_matmul(lib, x, packed, scale, zs)
    assert torch.allclose(got.double(), x.double() @ dense.t(), atol=1e-4, rtol=0)
    for i in range(13):
        assert torch.equal(kernels.int4_matmul(lib, x[i:i + 1].contiguous(), packed, scale, zs)[0], got[i])


def test_int4_linear_both_backends_match_the_dequantized_weights(monkeypatch):
    from ownlm.model.linear import Int4Linear

    w, dense = _int4_case(n=256, k=128)
    x = torch.randn(5, 128).bfloat16()
    want = x.double() @ dense.t()
    ours = Int4Linear(w.q, w.scale, w.zero, 32)
    with torch.inference_mode():
        assert ours.own_kernel
        decode = ours(x[:, None]).squeeze(1)  # (B, 1, K): one token per sequence -> ownlm's kernel
        prefill = ours(x[None])[0]  # (1, T, K) -> PyTorch's kernel
        for y in (decode, prefill):
            assert torch.allclose(y.double(), want, atol=0.03 * want.abs().max().item())
        monkeypatch.setattr(kernels, "load", lambda: None)  # as on a machine without AVX2 or a compiler
        theirs = Int4Linear(w.q, w.scale, w.zero, 32)
        assert not theirs.own_kernel
        assert torch.allclose(theirs(x[:, None]).squeeze(1).double(), want, atol=0.03 * want.abs().max().item())

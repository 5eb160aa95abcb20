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

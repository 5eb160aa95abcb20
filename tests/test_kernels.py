"""ownlm's CPU kernels against PyTorch / float64 references: the small-batch bf16 matmul (a row
gets the same bits alone as in a batch, what keeps batched decoding exact), the one-token
attention with its cache write, RMSNorm and the gated activations. The quantized matmul is in
test_quant.py."""

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


@pytest.mark.parametrize("window,dtype", [(0, torch.float32), (5, torch.float32), (0, torch.bfloat16)])
def test_decode_attention_equals_the_reference(window, dtype):
    """Rotation, cache write and attention in one call, against a float64 reference (keys the
    window excludes and positions after the token are never read). bfloat16: activations and
    cache in bfloat16, q and k rounded to it after the rotation."""
    torch.manual_seed(4)
    b, h, hkv, d, r, cap = 3, 6, 2, 16, 8, 24  # partial rotary (8 of 16 dims), grouped heads
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    qkv = torch.randn(b, 1, (h + 2 * hkv) * d).to(dtype)
    pos = torch.tensor([9, 0, 17])
    ang = pos[:, None].double() * (1.0 / 10000 ** (torch.arange(0, r, 2).double() / r))
    cos, sin = torch.cat([ang.cos()] * 2, -1).float(), torch.cat([ang.sin()] * 2, -1).float()
    kc, vc = torch.randn(b + 1, hkv, cap, d).to(dtype), torch.randn(b + 1, hkv, cap, d).to(dtype)  # slot 0: another's
    k0, v0 = kc.clone(), vc.clone()
    out = kernels.attend_decode(qkv, h, hkv, d, cos, sin, kc, vc, 1, pos, window, 0.25)

    def rot(x):  # (B, heads, d), half-rotated over the first r dims, in float64
        x = x.double()
        x1, x2 = x[..., : r // 2], x[..., r // 2: r]
        c, s = cos.double()[:, None], sin.double()[:, None]
        return torch.cat([torch.cat([x1, x2], -1) * c + torch.cat([-x2, x1], -1) * s, x[..., r:]], -1)

    q, k, v = qkv[:, 0].split([h * d, hkv * d, hkv * d], -1)
    q, k, v = rot(q.view(b, h, d)), rot(k.view(b, hkv, d)), v.view(b, hkv, d).double()
    assert torch.equal(kc[0], k0[0]) and torch.equal(vc[0], v0[0])  # another slot untouched
    for i in range(b):
        p = int(pos[i])
        torch.testing.assert_close(kc[i + 1, :, p].double(), k[i], atol=tol, rtol=0)
        torch.testing.assert_close(vc[i + 1, :, p].double(), v[i], atol=0, rtol=0)
        lo = max(0, p - window + 1) if window else 0
        keys, vals = kc[i + 1, :, lo:p + 1].double(), vc[i + 1, :, lo:p + 1].double()
        for j in range(h):
            att = (q[i, j] * 0.25 @ keys[j // (h // hkv)].t()).softmax(-1)
            torch.testing.assert_close(out[i, 0, j * d:(j + 1) * d].double(), att @ vals[j // (h // hkv)],
                                       atol=tol, rtol=0)


def test_norm_and_gated_activation_equal_pytorch():
    torch.manual_seed(5)
    x = torch.randn(7, 96)
    w = torch.randn(96)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-5, 0.0), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-5, 1.0), want / w * (1 + w), atol=1e-5, rtol=1e-5)
    gu = torch.randn(7, 2 * 40)
    gate, up = gu.chunk(2, -1)
    torch.testing.assert_close(kernels.act_mul(gu, 0), torch.nn.functional.silu(gate) * up, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(kernels.act_mul(gu, 1), torch.nn.functional.gelu(gate, approximate="tanh") * up,
                               atol=1e-6, rtol=1e-5)

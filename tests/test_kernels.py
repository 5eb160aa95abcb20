"""ownlm's CPU kernels against PyTorch / float64 references: the small-batch bf16 matmul (a row
gets the same bits alone as in a batch, what keeps batched decoding exact), the one-token
attention with its cache write, RMSNorm and the gated activations; how they are built, keyed and
checked; and the bounds every wrapper checks before the C code runs. The quantized matmul is in
test_quant.py."""

from __future__ import annotations

import ctypes
import shutil

import pytest
import torch

import ownlm
from ownlm.engine.cpu_step import CpuDecode, eligible
from ownlm.engine.kv_cache import KVCache
from ownlm.model import cpu, kernels
from ownlm.model.linear import Linear
from ownlm.model.ops import dense_matmul
from ownlm.model.quant import QuantWeight, quantize

from .conftest import KERNELS_POSSIBLE, build_hf_model

# where the kernels can be built they are required (conftest sets OWNLM_KERNELS=1): a build that
# fails raises here and fails the run instead of skipping it
lib = kernels.load()
pytestmark = pytest.mark.skipif(not KERNELS_POSSIBLE, reason="ownlm's CPU kernels need x86-64 Linux with AVX2 and a "
                                                             "C compiler; elsewhere PyTorch's ops run")


def test_the_kernels_are_built_here():
    assert lib is not None and kernels.mode() == "required"


def test_the_build_key_covers_sources_flags_and_compiler(tmp_path, monkeypatch):
    base = kernels.build_key("/usr/bin/cc", "gcc 12.2.0")
    assert kernels.build_key("/usr/bin/cc", "gcc 12.3.0") != base
    assert kernels.build_key("/usr/bin/clang", "gcc 12.2.0") != base
    assert kernels.build_key("/usr/bin/cc", "gcc 12.2.0", "avx512vnni") != base
    monkeypatch.setattr(kernels, "FLAGS", (*kernels.FLAGS, "-DOWNLM_OTHER"))
    assert kernels.build_key("/usr/bin/cc", "gcc 12.2.0") != base
    monkeypatch.undo()
    src = shutil.copytree(kernels.CSRC, tmp_path / "csrc")
    (src / "decode.c").write_text((src / "decode.c").read_text() + "\n")
    monkeypatch.setattr(kernels, "CSRC", src)
    assert kernels.build_key("/usr/bin/cc", "gcc 12.2.0") != base


def test_the_build_follows_the_cpu_flags_and_can_be_narrowed(monkeypatch):
    vnni = frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"})
    monkeypatch.delenv("OWNLM_KERNEL_ISA", raising=False)
    monkeypatch.setattr(cpu, "flags", lambda: vnni)
    assert kernels.isa() == "avx512vnni"
    assert "-mavx512vnni" in kernels.flags("avx512vnni") and "-mavx512vnni" not in kernels.flags("avx2")
    monkeypatch.setenv("OWNLM_KERNEL_ISA", "avx2")
    assert kernels.isa() == "avx2"
    monkeypatch.delenv("OWNLM_KERNEL_ISA")
    monkeypatch.setattr(cpu, "flags", lambda: vnni - {"avx512_vnni"})  # AVX-512 without VNNI: the AVX2 build
    assert kernels.isa() == "avx2"
    monkeypatch.setenv("OWNLM_KERNEL_ISA", "avx512vnni")
    with pytest.raises(kernels.KernelError, match="lacks avx512_vnni"):
        kernels.isa()
    monkeypatch.setenv("OWNLM_KERNEL_ISA", "sse2")
    with pytest.raises(kernels.KernelError, match="not one of"):
        kernels.isa()


def test_a_source_that_does_not_build_is_an_error_when_required(tmp_path, monkeypatch):
    src = shutil.copytree(kernels.CSRC, tmp_path / "csrc")
    code = (src / "matmul.c").read_text()
    (src / "matmul.c").write_text(code.replace("return failed ? OWNLM_ENOMEM : 0;",
                                               "return failed ? OWNLM_ENOMEM : 0", 1))
    monkeypatch.setattr(kernels, "CSRC", src)
    monkeypatch.setenv("OWNLM_KERNEL_CACHE", str(tmp_path / "build"))
    monkeypatch.setenv("OWNLM_KERNELS", "1")
    with pytest.raises(kernels.KernelError, match="building the CPU kernels failed: .*error"):
        kernels._load()
    monkeypatch.setenv("OWNLM_KERNELS", "")  # by default: a warning, and PyTorch's ops
    with pytest.warns(RuntimeWarning, match="kernels are off: building"):
        assert kernels._load() is None
    monkeypatch.setenv("OWNLM_KERNELS", "0")
    assert kernels._load() is None
    assert not list((tmp_path / "build").glob("*.so"))  # nothing half-built left behind


def test_a_python_mirror_that_differs_from_the_c_structure_is_refused(monkeypatch):
    fields = list(kernels.Layer._fields_)
    fields[-4], fields[-2] = fields[-2], fields[-4]  # window <-> scale: same names, other offsets

    class Swapped(ctypes.Structure):
        _fields_ = fields

    class Short(ctypes.Structure):
        _fields_ = kernels.Layer._fields_[:-1]

    for mirror in (Swapped, Short):
        monkeypatch.setattr(kernels, "Layer", mirror)
        with pytest.raises(kernels.KernelError, match="layout"):
            kernels._open(kernels._build(kernels.isa()))


def test_the_wrappers_refuse_what_the_c_code_could_not_take():
    """Every bound the C code relies on is checked before the call: positions past the cache's
    capacity, slots the cache does not have, head dims that are not a multiple of 8, weights
    whose shape disagrees with the input."""
    b, h, hkv, d, cap = 2, 4, 2, 16, 8
    qkv = torch.randn(b, 1, (h + 2 * hkv) * d)
    rot = torch.ones(b, d)
    kc, vc = torch.zeros(b, hkv, cap, d), torch.zeros(b, hkv, cap, d)
    ok = dict(k_cache=kc, v_cache=vc, slots=torch.tensor([0, 1]), pos=torch.tensor([3, 7]), window=0, scale=0.25)
    kernels.attend_decode(qkv, h, hkv, d, rot, rot, **ok)
    for change, message in ((dict(pos=torch.tensor([3, 8])), "capacity"), (dict(pos=torch.tensor([-1, 0])), "capacity"),
                            (dict(slots=torch.tensor([1, 2])), "slots"), (dict(window=-1), "window"),
                            (dict(slots=torch.tensor([1, 1]), pos=torch.tensor([3, 3])), "same slot"),
                            (dict(v_cache=torch.zeros(b, hkv, cap + 1, d)), "caches")):
        with pytest.raises(ValueError, match=message):
            kernels.attend_decode(qkv, h, hkv, d, rot, rot, **{**ok, **change})
    odd = 12
    with pytest.raises(ValueError, match="multiple of 8"):
        kernels.attend_decode(torch.randn(b, 1, (h + 2 * hkv) * odd), h, hkv, odd, torch.ones(b, odd),
                              torch.ones(b, odd), torch.zeros(b, hkv, cap, odd), torch.zeros(b, hkv, cap, odd),
                              torch.tensor([0, 1]), torch.tensor([0, 1]), 0, 0.25)
    with pytest.raises(ValueError, match="share"):
        kernels.attend_decode(torch.randn(b, 1, (3 + 2 * hkv) * d), 3, hkv, d, rot, rot, **ok)
    w = quantize(torch.randn(64, 96), 4)
    with pytest.raises(ValueError, match="against x's K"):
        kernels.quant_matmul(torch.randn(3, 64), w)  # K 64 against a K of 96
    with pytest.raises(ValueError, match="multiple of 32"):
        kernels.quant_matmul(torch.randn(3, 40), w)
    with pytest.raises(ValueError, match="inconsistent"):  # an int6 weight without its 16-column scales
        kernels.quant_matmul(torch.randn(3, 96), QuantWeight(6, w.data, w.scale, high=torch.zeros(64, 24,
                                                                                                   dtype=torch.uint8)))
    with pytest.raises(ValueError, match="1 to 3 parts"):
        kernels.quant_matmul(torch.randn(3, 96), [w] * 4)
    with pytest.raises(ValueError, match="bfloat16 CPU matrix"):
        kernels.bf16_matmul(torch.randn(3, 96), torch.randn(8, 96))
    with pytest.raises(ValueError, match="norm weight"):
        kernels.rms_norm(torch.randn(3, 96), torch.ones(95), 1e-5, 0.0)


def test_a_sequence_longer_than_the_cache_is_an_error_not_a_stray_write(hf_models):
    lm = ownlm.load(str(hf_models["mistral"]), dtype="bfloat16", quant="int4")
    assert eligible(lm.model)
    cache = KVCache.for_model(lm.model, 1, 64)
    token = torch.tensor([[5]])
    with torch.inference_mode():
        CpuDecode(lm.model, cache).step(token, torch.tensor([[63]]), 64)  # the last position there is
        with pytest.raises(ValueError, match="capacity 64"):
            CpuDecode(lm.model, cache).step(token, torch.tensor([[64]]), 65)  # one call for every block
        cache.length = 64
        with pytest.raises(ValueError, match="capacity 64"):
            lm.model(token, torch.tensor([[64]]), cache)  # the modules' attention kernel


def test_a_head_dim_the_kernels_cannot_take_decodes_through_pytorch(tmp_path):
    """head_dim 12 (not a multiple of 8): neither the one-call step nor the attention kernel, but
    PyTorch's attention; decode steps follow the float32 model's."""
    path = build_hf_model(tmp_path / "odd", "llama", head_dim=12, hidden_size=96, num_attention_heads=8,
                          num_key_value_heads=4, intermediate_size=192)
    fast = ownlm.load(str(path), dtype="float32", quant="int8")
    exact = ownlm.load(str(path), dtype="float32", quant="none")
    assert not eligible(fast.model)
    ids = list(range(3, 24))

    def steps(model):  # the prompt's first 10 tokens as a prefill, then one decode step per token
        cache = KVCache.for_model(model, 1, 64)
        stepper = CpuDecode(model, cache)
        with torch.inference_mode():
            cache.length = 10
            model(torch.tensor([ids[:10]]), torch.arange(10)[None], cache)
            return torch.cat([stepper.step(torch.tensor([[t]]), torch.tensor([[p]]), p + 1)
                              for p, t in enumerate(ids[10:], start=10)])

    got, want = steps(fast.model), steps(exact.model)
    assert got.shape == (len(ids) - 10, 1, exact.config.vocab_size)
    torch.testing.assert_close(got, want, atol=0.05, rtol=0)


@pytest.mark.parametrize("k", [576, 100])  # 100: a tail that is not a multiple of 8
def test_bf16_matmul_equals_reference(k):
    torch.manual_seed(0)
    w = torch.randn(3001, k).bfloat16()
    x = torch.randn(7, k)
    got = kernels.bf16_matmul(x, w)
    want = x.double() @ w.double().t()
    assert torch.allclose(got.double(), want, atol=1e-4 * k ** 0.5, rtol=0)


def test_rows_are_batch_invariant():
    torch.manual_seed(1)
    w = torch.randn(4096, 576).bfloat16()
    x = torch.randn(13, 576)
    together = kernels.bf16_matmul(x, w)
    for i in range(13):
        assert torch.equal(kernels.bf16_matmul(x[i:i + 1].contiguous(), w)[0], together[i])


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
    assert torch.equal(dense_matmul(x.detach()[:0], lin.weight), torch.nn.functional.linear(x.detach()[:0], lin.weight))


@pytest.mark.parametrize("window,dtype,cache", [(0, torch.float32, torch.float32), (5, torch.float32, torch.float32),
                                                (0, torch.bfloat16, torch.bfloat16), (0, torch.float32, torch.float16),
                                                (5, torch.float32, torch.float16)])
def test_decode_attention_equals_the_reference(window, dtype, cache):
    """Rotation, cache write and attention in one call, against a float64 reference (keys the
    window excludes and positions after the token are never read). bfloat16: activations and
    cache in bfloat16, q and k rounded to it after the rotation. A float16 cache under float32
    activations (the CPU default): k and v rounded to float16 as PyTorch rounds them, the
    attention over the cache's values in float32."""
    torch.manual_seed(4)
    b, h, hkv, d, r, cap = 3, 6, 2, 16, 8, 24  # partial rotary (8 of 16 dims), grouped heads
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    ktol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}[cache]  # the written k's rounding
    qkv = torch.randn(b, 1, (h + 2 * hkv) * d).to(dtype)
    pos = torch.tensor([9, 0, 17])
    ang = pos[:, None].double() * (1.0 / 10000 ** (torch.arange(0, r, 2).double() / r))
    cos, sin = torch.cat([ang.cos()] * 2, -1).float(), torch.cat([ang.sin()] * 2, -1).float()
    kc, vc = torch.randn(b + 1, hkv, cap, d).to(cache), torch.randn(b + 1, hkv, cap, d).to(cache)  # slot 0: another's
    k0, v0 = kc.clone(), vc.clone()
    out = kernels.attend_decode(qkv, h, hkv, d, cos, sin, kc, vc, torch.tensor([1, 2, 3]), pos, window, 0.25)
    assert out.dtype == dtype

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
        torch.testing.assert_close(kc[i + 1, :, p].double(), k[i], atol=ktol, rtol=0)
        assert torch.equal(vc[i + 1, :, p], v[i].to(cache))
        lo = max(0, p - window + 1) if window else 0
        keys, vals = kc[i + 1, :, lo:p + 1].double(), vc[i + 1, :, lo:p + 1].double()
        for j in range(h):
            att = (q[i, j] * 0.25 @ keys[j // (h // hkv)].t()).softmax(-1)
            torch.testing.assert_close(out[i, 0, j * d:(j + 1) * d].double(), att @ vals[j // (h // hkv)],
                                       atol=tol, rtol=0)


def test_one_sequences_next_tokens_in_one_call_equal_one_token_steps():
    """A speculative check: rows that are one sequence's consecutive tokens (one slot, positions
    5, 6, 7) give, in one call, the bits of three one-token calls in turn, and write the same keys
    and values (each row sees the rows before it, never after)."""
    torch.manual_seed(6)
    h, hkv, d, cap = 4, 2, 16, 16
    qkv = torch.randn(3, 1, (h + 2 * hkv) * d).to(torch.bfloat16)
    pos = torch.tensor([5, 6, 7])
    cos, sin = torch.rand(3, d), torch.rand(3, d)
    kc, vc = torch.randn(2, hkv, cap, d).to(torch.bfloat16), torch.randn(2, hkv, cap, d).to(torch.bfloat16)
    k1, v1 = kc.clone(), vc.clone()
    together = kernels.attend_decode(qkv, h, hkv, d, cos, sin, kc, vc, torch.tensor([1, 1, 1]), pos, 0, 0.25)
    apart = torch.cat([kernels.attend_decode(qkv[i:i + 1], h, hkv, d, cos[i:i + 1], sin[i:i + 1], k1, v1,
                                             torch.tensor([1]), pos[i:i + 1], 0, 0.25) for i in range(3)])
    assert torch.equal(together, apart)
    assert torch.equal(kc, k1) and torch.equal(vc, v1)
    assert not torch.equal(together[0], together[1])  # the rows did attend to different keys


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

"""Quantized weights kept in memory: GGUF blocks taken losslessly into the kernels' layout
(against the `gguf` package's own dequantizer), quantization at load, the integer kernels
against a float64 reference, whole models against their dequantized selves, the one-call decode
step against the modules, and memory equal to the file's blocks."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import ownlm
from ownlm import manage
from ownlm.engine.kv_cache import KVCache, cached_forward, span
from ownlm.errors import BadRequest
from ownlm.formats.gguf import GGUFFile
from ownlm.formats import quants as quants_module
from ownlm.formats.quants import from_blocks
from ownlm.model.quant import IQ4_VALUES, MIDPOINT, QuantStack, QuantWeight, concat, pack_high, pack_int4, quantize
from ownlm.engine import cpu_step
from ownlm.model import kernels
from ownlm.model.linear import QuantEmbedding, QuantLinear

from .conftest import KERNELS_POSSIBLE
from .ggufs import hf_folder_to_gguf

ROOT = Path(__file__).resolve().parents[1]

Q = gguf.GGMLQuantizationType
PROMPTS = ["Name three colors of the rainbow.", "What is the capital of France?", "Write a haiku about the sea."]


WIDTH = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q4_K: 4, Q.Q5_0: 5, Q.Q5_1: 5, Q.Q5_K: 5, Q.Q6_K: 6, Q.Q8_0: 8, Q.IQ4_NL: 4,
         Q.IQ4_XS: 4}


def random_blocks(qtype, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """GGUF blocks of any type (gguf cannot write the K types): random bytes with a sane float16
    d (and dmin) per block, so weights stay in the range of a real model's."""
    rng = np.random.default_rng(seed)
    per, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // per, size), dtype=np.uint8)
    at = 208 if qtype == Q.Q6_K else 0  # where d is
    raw[..., at:at + 2] = np.frombuffer(np.float16(0.0007 if qtype == Q.Q6_K else 0.011).tobytes(), dtype=np.uint8)
    if qtype in (Q.Q4_1, Q.Q5_1, Q.Q4_K, Q.Q5_K):  # the min (dmin)
        raw[..., 2:4] = np.frombuffer(np.float16(-0.05 if qtype in (Q.Q4_1, Q.Q5_1) else 0.007).tobytes(),
                                      dtype=np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0])
def test_gguf_blocks_are_taken_losslessly(hf_models, tmp_path, qtype):
    path = hf_folder_to_gguf(hf_models["llama"], tmp_path / "q.gguf", qtype=qtype)
    g = GGUFFile(path)
    n = 0
    for name, t in g.tensors.items():
        if t.qtype == qtype:
            w = from_blocks(g.raw(name), qtype)
            assert w.bits == WIDTH[qtype]
            np.testing.assert_array_equal(w.dequantize().numpy(), g.dequantize(name))
            assert w.nbytes == t.nbytes  # the file's bytes, rearranged
            n += 1
    assert n >= 15


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS])
def test_k_and_codebook_blocks_match_the_reference_dequantizer(qtype):
    """Random blocks of the types gguf cannot write (sane float16 d and dmin, random scales and
    values) in their own bits, in the file's bytes, exactly."""
    raw = random_blocks(qtype, 6, 768)
    want = gguf.quants.dequantize(raw, qtype)
    w = from_blocks(raw, qtype)
    w.check()
    held = w.nbytes - (16 if w.lut is not None else 0)  # and a codebook's 16 bytes per tensor
    assert w.bits == WIDTH[qtype] and held == raw.nbytes
    np.testing.assert_array_equal(w.dequantize().numpy(), want)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.IQ4_NL, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS])
def test_large_tensors_taken_by_several_threads_equal_the_reference(qtype):
    """A tensor over 1 MB is taken out of the file by row ranges on several threads (copied, or
    decoded and joined; the one-thread path below that size is the tests above): every row lands
    where it belongs, as the reference dequantizer reads the file."""
    raw = random_blocks(qtype, 1031, 2048, seed=3)  # rows not a multiple of the threads
    assert raw.nbytes > quants_module._PARALLEL_BYTES
    w = from_blocks(raw, qtype)
    w.check()
    assert isinstance(w, QuantWeight) and w.shape == (1031, 2048)
    assert w.nbytes - (16 if w.lut is not None else 0) == raw.nbytes
    np.testing.assert_array_equal(w.dequantize().numpy(), gguf.quants.dequantize(raw, qtype))


def _random_weight(bits: int, n: int, k: int, symmetric: bool = False, codebook: bool = False) -> QuantWeight:
    """Any width's weight with random values and scales (K not a multiple of 256: the kernels'
    8-group tails run); codebook: int4 indices into IQ4_NL's values."""
    g = torch.Generator().manual_seed(bits * 10 + symmetric + 2 * codebook)
    if codebook:
        q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        scale = (torch.rand(n, k // 32, generator=g) * 0.002 - 0.001).half()
        return QuantWeight(4, pack_int4(q), scale, lut=torch.tensor(IQ4_VALUES, dtype=torch.int8))
    if bits == 8:
        return quantize(torch.randn(n, k, generator=g), 8)
    q = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    scale = (torch.rand(n, k // 32, generator=g) * 0.02 + 0.001).half()
    offset = None if symmetric or bits == 6 else (torch.randn(n, k // 32, generator=g) * 0.1).half()
    sub = torch.randint(-128, 128, (n, k // 16), generator=g, dtype=torch.int8) if bits == 6 else None
    return QuantWeight(bits, pack_int4(q & 15), scale, offset, None if bits == 4 else pack_high(q, bits), sub)


def _reference(x: torch.Tensor, w: QuantWeight | QuantStack) -> torch.Tensor:
    """The kernel's arithmetic in float64: x rounded per row and group of 32 to int16 (scale
    absmax / 32767), times the weight's q * scale (int6: (q - 32) * scale * sub), plus the int4 /
    int5 offsets (-8 or -16 * scale where none are stored) times the exact group sums of x."""
    if isinstance(w, QuantStack):
        return torch.cat([_reference(x, p) for p in w.parts], dim=-1)
    n, k = w.shape
    xg = x.double().view(x.shape[0], k // 32, 32)
    d = xg.abs().amax(-1, keepdim=True) / 32767
    xq = torch.where(d > 0, torch.round(xg / torch.where(d > 0, d, 1)), 0) * d
    off = None
    if w.bits in (4, 5) and w.lut is None:
        scale, offset = w.factors()
        off = offset.double() if offset is not None else scale.double() * -MIDPOINT[w.bits]
    q = w.dequantize().double()
    if off is not None:
        q = (q.view(n, -1, 32) - off[..., None]).view(n, k)
    y = xq.view(x.shape[0], k) @ q.t()
    return y if off is None else y + xg.sum(-1) @ off.t()


KINDS = {"int4": lambda k: quantize(torch.randn(301, k), 4),
         "int4-symmetric": lambda k: _random_weight(4, 301, k, symmetric=True),
         "int5": lambda k: _random_weight(5, 301, k), "int5-symmetric": lambda k: _random_weight(5, 301, k, True),
         "int6": lambda k: _random_weight(6, 301, k), "int8": lambda k: quantize(torch.randn(301, k), 8),
         "int4-codebook": lambda k: _random_weight(4, 301, k, codebook=True),
         # a fused projection of three widths (Q4_K q and k, a Q6_K v; an int8 part)
         "stack": lambda k: concat([_random_weight(4, 120, k), _random_weight(6, 61, k), _random_weight(8, 120, k)]),
         "codebook-stack": lambda k: concat([_random_weight(4, 100, k, codebook=True), _random_weight(4, 101, k),
                                             _random_weight(4, 100, k, codebook=True)]),
         # Q4_K, Q5_K, Q6_K, IQ4_XS: their super-blocks' scales (and mins) as the file has them (K a multiple of 256)
         "int4-superblocks": lambda k: from_blocks(random_blocks(Q.Q4_K, 301, k, seed=k), Q.Q4_K),
         "int5-superblocks": lambda k: from_blocks(random_blocks(Q.Q5_K, 301, k, seed=k), Q.Q5_K),
         "int6-superblocks": lambda k: from_blocks(random_blocks(Q.Q6_K, 301, k, seed=k), Q.Q6_K),
         "int4-codebook-superblocks": lambda k: from_blocks(random_blocks(Q.IQ4_XS, 301, k, seed=k), Q.IQ4_XS),
         "superblock-stack": lambda k: concat([from_blocks(random_blocks(Q.Q4_K, 100, k), Q.Q4_K),
                                               _random_weight(4, 101, k),
                                               from_blocks(random_blocks(Q.Q5_K, 100, k, seed=1), Q.Q5_K)])}
SUPERBLOCK_K = 512  # two super-blocks a row


@pytest.mark.skipif(not KERNELS_POSSIBLE, reason="ownlm's kernels need x86-64 Linux with AVX2 and a C compiler")
@pytest.mark.parametrize("kind,k", [(kind, SUPERBLOCK_K if "superblock" in kind else 192) for kind in KINDS]
                         + [("int4", 1184), ("int6", 1184), ("int5", 1184), ("int8", 1184)])
def test_quant_matmul_equals_reference_and_is_batch_invariant(kind, k):
    """Every row gets the same bits alone as in a batch of any size (the kernel takes rows 8, 4, 2
    and 1 at a time, in tiles of 64: 70 rows cross one), bfloat16 activations too."""
    assert kernels.load() is not None
    torch.manual_seed(len(kind) + k)
    w = KINDS[kind](k)  # N = 301: not a multiple of any block
    stacked = kind.endswith("stack")
    assert isinstance(w, QuantStack) == stacked
    x = torch.randn(70, k) * torch.rand(70, 1) * 4  # 70 rows: crosses the 64-row tile
    got = kernels.quant_matmul(x, w.parts if stacked else w)
    want = _reference(x, w)
    assert torch.allclose(got.double(), want, atol=2e-5 * want.abs().max().item(), rtol=0)
    dense = x.double() @ w.dequantize().double().t()  # and the int16 rounding of x costs ~1e-5
    assert ((got.double() - dense).norm() / dense.norm()).item() < 1e-4
    parts = w.parts if stacked else [w]
    for i in (0, 1, 63, 64, 69):
        assert torch.equal(kernels.quant_matmul(x[i:i + 1].contiguous(), parts)[0], got[i])
    for m in (2, 3, 4, 5, 8, 9, 16, 17):
        assert torch.equal(kernels.quant_matmul(x[70 - m:].contiguous(), parts), got[70 - m:])
    xb = x[:9].bfloat16()  # bfloat16 activations in and out
    yb = kernels.quant_matmul(xb, parts)
    assert yb.dtype == torch.bfloat16 and torch.equal(yb[4], kernels.quant_matmul(xb[4:5], parts)[0])
    torch.testing.assert_close(yb.double(), _reference(xb.float(), w), atol=1e-2 * want.abs().max().item(), rtol=0)


def _reference_int8(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """The int8 path's arithmetic in float64 for an int4, int5, int6, int8 or codebook weight: x rounded per row
    and group of 32 to int8 as float32 computes it (x * (127 / absmax), to nearest even), times
    d = absmax / 127, against the weight (its offsets, -8 or -16 times the scale where none, meet the
    rounded x too)."""
    n, k = w.shape
    xg = x.float().view(x.shape[0], k // 32, 32)
    amax = xg.abs().amax(-1, keepdim=True).double()
    inv = torch.where(amax > 0, 127 / torch.where(amax > 0, amax, 1), 0).float()  # float32, correctly rounded
    xq = torch.round((xg.double() * inv.double()).float().double())
    xhat = (xq * (amax / 127).float().double()).view(x.shape[0], k)
    return xhat @ w.dequantize().double().t()


@pytest.mark.skipif(not KERNELS_POSSIBLE, reason="ownlm's kernels need x86-64 Linux with AVX2 and a C compiler")
@pytest.mark.parametrize("kind,k", [("int4", 192), ("int4-symmetric", 192), ("int4", 1184), ("int4-symmetric", 1184),
                                    ("int4", 2048), ("int5", 192), ("int5", 1184), ("int5-symmetric", 1184),
                                    ("int6", 192), ("int6", 1184), ("int8", 192), ("int8", 1184),
                                    ("int4-codebook", 192), ("int4-codebook", 1184),
                                    ("int4-superblocks", SUPERBLOCK_K), ("int5-superblocks", SUPERBLOCK_K),
                                    ("int6-superblocks", SUPERBLOCK_K), ("int4-codebook-superblocks", SUPERBLOCK_K)])
def test_int8_activations_multiply_as_they_are_rounded_and_are_batch_invariant(kind, k):
    """set_activations("int8"): int4, int5, int6, int8 and codebook weights meet x rounded to int8 per group of 32
    (llama.cpp's Q8_0 rounding), in pairs of groups and an unpaired last group (K 1184: 37
    groups), 8-group chunks and their tails; the result is that arithmetic's within float32
    accumulation, every row's bits the same alone as in a batch, and alone as in a stack of
    parts."""
    assert kernels.load() is not None
    torch.manual_seed(k + len(kind))
    w = KINDS[kind](k)
    x = torch.randn(70, k) * torch.rand(70, 1) * 4
    x[5, 32:64] = 0  # a group of zeros: scale 0
    int16 = kernels.quant_matmul(x, w)
    kernels.set_activations("int8")
    got = kernels.quant_matmul(x, w)
    want = _reference_int8(x, w)
    assert torch.allclose(got.double(), want, atol=2e-6 * want.abs().max().item(), rtol=0)
    dense = x.double() @ w.dequantize().double().t()
    err8, err16 = ((y.double() - dense).norm() / dense.norm() for y in (got, int16))
    assert err16 < 1e-4 < err8 < 2e-2  # int8's rounding costs ~2^-9 of each group's absmax
    for i in (0, 1, 5, 63, 64, 69):
        assert torch.equal(kernels.quant_matmul(x[i:i + 1].contiguous(), w)[0], got[i])
    for m in (2, 3, 4, 5, 8, 9, 16, 17):
        assert torch.equal(kernels.quant_matmul(x[70 - m:].contiguous(), w), got[70 - m:])
    xb = x[:9].bfloat16()
    yb = kernels.quant_matmul(xb, w)
    assert yb.dtype == torch.bfloat16 and torch.equal(yb[4], kernels.quant_matmul(xb[4:5], w)[0])
    torch.testing.assert_close(yb.double(), _reference_int8(xb.float(), w), atol=1e-2 * want.abs().max().item(),
                               rtol=0)
    other = KINDS["int6" if kind == "int4-codebook" else "int4-codebook"](k)
    both = kernels.quant_matmul(x, [w, other])  # one call: each part's kernel on x rounded once
    assert torch.equal(both[:, :301], got) and torch.equal(both[:, 301:], kernels.quant_matmul(x, other))
    kernels.set_activations("int16")


@pytest.mark.skipif(not KERNELS_POSSIBLE, reason="ownlm's kernels need x86-64 Linux with AVX2 and a C compiler")
def test_int8_activations_in_the_one_call_step_and_the_api(hf_models):
    """load(activations="int8") sets the rounding for the process: the one-call decode step and
    the modules give the same bits in it, and other bits than int16's; a name it does not know
    is refused."""
    lm = ownlm.load(str(hf_models["llama"]), quant="int4", activations="int8")
    assert kernels.activations() == "int8" and cpu_step.eligible(lm.model)
    ids = list(range(3, 21))
    fused = _decode(lm.model, ids, one_call=True)
    assert torch.equal(fused, _decode(lm.model, ids))
    kernels.set_activations("int16")
    int16 = _decode(lm.model, ids, one_call=True)
    assert not torch.equal(fused, int16)
    first = (fused[0] - int16[0]).abs().max() / int16[0].abs().max()  # before the greedy paths may part
    assert 0 < first < 0.05, first
    with pytest.raises(BadRequest, match="int4"):
        ownlm.load(str(hf_models["llama"]), quant="int4", activations="int4")
    assert kernels.activations() == "int16"


@pytest.mark.skipif(not KERNELS_POSSIBLE, reason="ownlm's kernels need x86-64 Linux with AVX2 and a C compiler")
@pytest.mark.parametrize("qtype", list(WIDTH))
def test_each_gguf_type_multiplies_as_gguf_dequantizes_it(qtype):
    """Per GGUF type, the kernel on the type's own bits against x @ W.T in float64 with W from the
    `gguf` package's dequantizer: within the bound of rounding x to int16 (half a step of each
    group's absmax / 32767, times |W|) and of float32 accumulation; the weight held is the file's."""
    assert kernels.load() is not None
    raw = random_blocks(qtype, 67, 512, seed=int(qtype))
    file_w = torch.from_numpy(gguf.quants.dequantize(raw, qtype)).double()
    w = from_blocks(raw, qtype)
    x = torch.randn(5, 512) * torch.rand(5, 1) * 4
    got = kernels.quant_matmul(x, w).double()
    want = x.double() @ file_w.t()
    step = x.double().view(5, 16, 32).abs().amax(-1, keepdim=True).expand(5, 16, 32).reshape(5, 512) / 32767
    assert torch.equal(w.dequantize().double(), file_w)
    bound = (step / 2) @ file_w.abs().t() + 1e-6 * (x.double().abs() @ file_w.abs().t())
    assert ((got - want).abs() <= bound).all(), ((got - want).abs() / bound).max()
    assert ((got - want).abs() > 0).any()  # the rounding is real, the bound not vacuous


def test_quant_linear_without_kernels_and_in_training(monkeypatch):
    torch.manual_seed(0)
    w = quantize(torch.randn(48, 64), 4)
    layer = QuantLinear(w, bias=torch.randn(48), dtype=torch.float32)
    x = torch.randn(5, 64)
    want = x @ w.dequantize().t() + layer.bias
    tol = 1e-4 * want.abs().max().item()  # the kernel rounds x to int16 per group of 32
    with torch.inference_mode():
        assert torch.allclose(layer(x), want, atol=tol)
        monkeypatch.setattr(kernels, "load", lambda: None)  # a machine without AVX2 or a compiler
        assert torch.allclose(layer(x), want, atol=1e-6 * want.abs().max().item())
    monkeypatch.undo()
    xg = x.clone().requires_grad_(True)  # QLoRA: gradients flow to x through the frozen weight
    layer(xg).square().sum().backward()
    x2 = x.clone().requires_grad_(True)
    (x2 @ w.dequantize().t() + layer.bias).square().sum().backward()
    torch.testing.assert_close(xg.grad, x2.grad, atol=1e-4, rtol=1e-4)


def prose_kl(exact, models: dict, through_cache: bool = False) -> dict[str, float]:
    """Mean KL(exact || model) per position over the first 300 tokens of the shipped prose, for
    each named model (next-token distributions in float32). through_cache: each model's logits
    computed as generation computes them, its keys and values written to and read from a KV
    cache of its own dtype (the reference's never)."""
    text = (ROOT / "src/ownlm/evaluate/data/prose.txt").read_text()[:2000]
    ids = torch.tensor([exact.encode(text)[:300]])

    def logits(m):
        return cached_forward(m.model, ids) if through_cache else m.model(ids)
    with torch.inference_mode():
        b = exact.model(ids).log_softmax(-1)
        return {name: (b.exp() * (b - logits(m).float().log_softmax(-1))).sum(-1).mean().item()
                for name, m in models.items()}


def test_smollm2_keeps_its_blocks_and_equals_the_dequantized_model(smollm2_gguf):
    """Q4_1 layers and the Q8_0 embedding/head stay in their bytes. In float32 the quantized model
    gives the dequantized model's logits and greedy answers; in bfloat16 it departs from them no
    more than bfloat16 rounding alone does (the dequantized model in bfloat16), and its answers to
    the three fixed prompts depart from the reference's only at a near tie (the default computes in
    float32: test_fidelity.py)."""
    from ownlm.engine.generate import generate_ids
    from ownlm.engine.sampling import SamplingParams

    exact = ownlm.load(str(smollm2_gguf), dtype="float32", quant="none", cache=False)
    f32 = ownlm.load(str(smollm2_gguf), dtype="float32", quant="int4", cache=False)
    fast = ownlm.load(str(smollm2_gguf), dtype="bfloat16", cache=False)  # int4 / int8 kept
    rounded = ownlm.load(str(smollm2_gguf), dtype="bfloat16", quant="none", cache=False)
    g = GGUFFile(smollm2_gguf)
    quantized = {n: m for n, m in fast.model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    assert isinstance(fast.model.embed, QuantEmbedding) and fast.model.embed.bits == 8
    assert len(quantized) == 1 + 4 * fast.config.n_layers
    held = sum(t.numel() * t.element_size() for m in quantized.values() for t in m.buffers())
    assert held == sum(t.nbytes for t in g.tensors.values() if t.qtype in (Q.Q4_1, Q.Q8_0))
    kl = prose_kl(exact, {"f32": f32, "fast": fast, "rounded": rounded})
    assert kl["f32"] < 1e-5 and kl["fast"] < 1.5 * kl["rounded"] + 1e-4, kl
    for prompt in PROMPTS:
        msgs = [{"role": "user", "content": prompt}]
        want = exact.chat(msgs, max_tokens=24, temperature=0).text
        assert f32.chat(msgs, max_tokens=24, temperature=0).text == want
        # bfloat16 activations round logits by ~2^-8 of their size: the answer is the reference's up to
        # a token where the reference's two best logits lie within 0.25 (the haiku: " shore" / " ocean",
        # 0.068 apart)
        prompt, greedy = exact.encode(exact.chat_prompt(msgs)), SamplingParams(temperature=0, max_tokens=24)
        a, b = (list(generate_ids(m.model, prompt, greedy, exact.tokenizer.eos_ids)) for m in (exact, fast))
        i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if i is not None:
            with torch.inference_mode():
                top = exact.model(torch.tensor([prompt + a[:i]]))[0, -1].float().topk(2).values
            assert top[0] - top[1] < 0.25, (prompt, i)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_tinygemm_layout_computes_the_files_weight(qtype):
    """The layout for PyTorch's int4 kernel (used on CUDA; its CPU twin, which takes the same
    (q - 8) * scale + zero pairs, runs here) gives the weight gguf's own dequantizer reads from
    the blocks, up to its bfloat16 scales and zeros (2^-9 of each) and bfloat16 outputs."""
    rng = np.random.default_rng(int(qtype))
    if qtype == Q.Q4_K:  # gguf cannot write Q4_K: random super-blocks with sane d and dmin
        raw = rng.integers(0, 256, size=(48, 2, 144), dtype=np.uint8)
        raw[..., 0:2] = np.frombuffer(np.float16(0.011).tobytes(), dtype=np.uint8)
        raw[..., 2:4] = np.frombuffer(np.float16(0.007).tobytes(), dtype=np.uint8)
        raw = raw.reshape(48, -1)
    else:
        raw = gguf.quants.quantize((rng.standard_normal((48, 512)) * 0.05 + 0.01).astype(np.float32), qtype)
    want = torch.from_numpy(gguf.quants.dequantize(raw, qtype)).double()
    layer = QuantLinear(from_blocks(raw, qtype), layout="tinygemm")
    assert not hasattr(layer, "data") and layer.packed.numel() < want.numel()  # int4, nothing else held
    tol = 2 ** -7 * want.abs().max().item()
    assert (layer.dequantize().double() - want).abs().max().item() < tol
    x = torch.randn(5, want.shape[1], dtype=torch.bfloat16)
    with torch.inference_mode():
        got = layer(x).double()
    ref = x.double() @ want.t()
    assert ((got - ref).norm() / ref.norm()).item() < 1e-2
    with pytest.raises(ValueError, match="int4 kernel"):
        QuantLinear(quantize(want.float(), 8), layout="tinygemm")


def test_cuda_build_holds_the_int4_linears_for_pytorchs_int4_kernel(smollm2_gguf, monkeypatch):
    """What `load` builds on CUDA, built here by asking for CUDA's layout on the CPU: the layers'
    int4 linears in PyTorch's int4 layout, everything else (the Q8_0 embedding) dense bfloat16;
    it departs from the float32 dequantized model about as far as the bfloat16 dense model does."""
    from ownlm import loading
    from ownlm.formats.checkpoint import files_of_path, open_checkpoint

    with pytest.raises(BadRequest, match="int8 weights are not supported on cuda"):
        loading.build_model(open_checkpoint(files_of_path(smollm2_gguf)), torch.device("cuda"), torch.bfloat16, "int8")
    exact = ownlm.load(str(smollm2_gguf), dtype="float32", quant="none", cache=False)
    rounded = ownlm.load(str(smollm2_gguf), dtype="bfloat16", quant="none", cache=False)
    def cuda_layout(device, w=None, embedding=False):  # linear.layout_for on CUDA
        return "tinygemm" if not embedding and w.kind == "int4" and w.shape[0] % 16 == 0 else "dense"

    monkeypatch.setattr(loading, "layout_for", cuda_layout)
    lm = ownlm.load(str(smollm2_gguf), dtype="bfloat16", cache=False)  # auto's dtype on CUDA
    linears = [m for m in lm.model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 4 * lm.config.n_layers and all(m.layout == "tinygemm" for m in linears)
    assert lm.model.embed.weight.dtype == torch.bfloat16
    kl = prose_kl(exact, {"int4": lm, "rounded": rounded})
    assert kl["int4"] < 1.5 * kl["rounded"] + 1e-4, kl
    msgs = [{"role": "user", "content": PROMPTS[0]}]  # decoding through the KV cache (no one-call step)
    assert lm.chat(msgs, max_tokens=16, temperature=0).text == exact.chat(msgs, max_tokens=16, temperature=0).text


def test_without_the_kernels_weights_stay_quantized(smollm2_gguf, hf_models, tmp_path, monkeypatch):
    """A CPU where ownlm's kernels do not run (another ISA, no compiler, OWNLM_KERNELS=0): the
    int4 linears run PyTorch's int4 kernel (its CPU twin), the int8 embedding / head and other
    widths are dequantized per call, never at load: the bytes held stay the file's, and the model
    follows its dequantized self."""
    monkeypatch.setattr(kernels, "load", lambda: None)
    exact = ownlm.load(str(smollm2_gguf), dtype="float32", quant="none", cache=False)
    lm = ownlm.load(str(smollm2_gguf), cache=False)
    linears = [m for m in lm.model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 4 * lm.config.n_layers and all(m.layout == "tinygemm" for m in linears)
    assert isinstance(lm.model.embed, QuantEmbedding) and lm.model.embed.bits == 8
    g = GGUFFile(smollm2_gguf)
    held = sum(t.numel() * t.element_size() for m in [*linears, lm.model.embed] for t in m.buffers())
    assert held <= 1.01 * sum(t.nbytes for t in g.tensors.values() if t.qtype in (Q.Q4_1, Q.Q8_0))
    dense = sum(p.numel() * p.element_size() for p in lm.model.parameters())  # the norms only
    assert dense < 0.01 * held
    rounded = ownlm.load(str(smollm2_gguf), dtype="bfloat16", quant="none", cache=False)
    kl = prose_kl(exact, {"held": lm, "rounded": rounded})
    assert kl["held"] < 1.5 * kl["rounded"] + 1e-4, kl  # x goes into PyTorch's int4 kernel as bfloat16
    # an int5 / int8 mix: held as blocks, dequantized per call
    path = hf_folder_to_gguf(hf_models["llama"], tmp_path / "m.gguf", qtype=Q.Q5_1,
                             overrides={"ffn_down.weight": Q.Q8_0})
    mixed = ownlm.load(str(path), cache=False)
    assert all(b.attn.qkv.bits == 5 and b.attn.qkv.layout == "blocks" and b.mlp.down.bits == 8
               for b in mixed.model.layers)
    reference = ownlm.load(str(path), dtype="float32", quant="none", cache=False)
    with torch.inference_mode():
        x = torch.tensor([list(range(3, 40))])
        torch.testing.assert_close(mixed.model(x).float(), reference.model(x).float(), atol=0.05, rtol=0.05)


@pytest.mark.skipif(not KERNELS_POSSIBLE, reason="ownlm's kernels need x86-64 Linux with AVX2 and a C compiler")
def test_a_k_quant_mix_loads_each_tensor_in_its_own_bits(smollm2_gguf, tmp_path, monkeypatch, ownlm_home):
    """A whole Q4_K_M-like GGUF (bench/scale.py's synthetic Llama: Q4_K, with Q6_K attn_v and
    ffn_down in llama.cpp's use_more_bits layers and a Q6_K head) through ownlm.load: each tensor
    in its own bits (a fused qkv of Q4_K and Q6_K parts), the bytes held the file's, and logits
    those of the float32 model that gguf's dequantizer reads; imported into the store, its
    repacked cache is no larger than the GGUF and gives the same logits."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import scale

    monkeypatch.setitem(scale.SIZES, "test", dict(dim=256, layers=4, heads=4, kv_heads=2, ffn=512))
    path = tmp_path / "mix.gguf"
    scale.write_gguf(path, "test", "q4_k_m", smollm2_gguf)
    lm = ownlm.load(str(path), cache=False)
    blocks = lm.model.layers
    assert [b.attn.qkv.bits for b in blocks] == [4, 4, (4, 6), (4, 6)]  # layers 2 and 3: more bits
    assert [b.mlp.down.bits for b in blocks] == [4, 4, 6, 6] and lm.model.lm_head.bits == 6
    assert isinstance(lm.model.embed, QuantEmbedding) and lm.model.embed.bits == 4
    g = GGUFFile(path)
    file = {t.qtype: 0 for t in g.tensors.values()}
    for t in g.tensors.values():
        file[t.qtype] += t.nbytes
    held = sum(t.numel() * t.element_size() for m in lm.model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))
               for t in m.buffers())
    assert held == sum(n for q, n in file.items() if q in WIDTH)  # the super-blocks' scales as the file has them
    for mine, theirs in ((blocks[0].mlp.down, "blk.0.ffn_down.weight"), (blocks[2].mlp.down, "blk.2.ffn_down.weight"),
                         (lm.model.embed, "token_embd.weight")):  # Q4_K, Q6_K, Q4_K: the file's values, exactly
        np.testing.assert_array_equal(mine.weight_q.dequantize().numpy(), g.dequantize(theirs))
    reference = ownlm.load(str(path), dtype="float32", quant="none", cache=False)
    x = torch.tensor([lm.encode("The lighthouse keeper found a bottle on the rocks.")])
    with torch.inference_mode():
        got, want = lm.model(x).double(), reference.model(x).double()
    assert ((got - want).norm() / want.norm()).item() < 2e-3  # int16 activations
    manage.import_path(path, name="mix", quiet=True)
    first, second = ownlm.load("mix"), ownlm.load("mix")  # the first writes the repacked cache, the second maps it
    (cache,) = (ownlm_home / "cache" / "repacked").rglob("model.safetensors")
    assert cache.stat().st_size <= path.stat().st_size
    with torch.inference_mode():
        assert torch.equal(first.model(x), second.model(x)) and torch.equal(second.model(x), lm.model(x))


def test_without_the_kernels_weights_are_dequantized_a_slice_at_a_time(monkeypatch):
    """The path without ownlm's kernels expands at most DEQUANT_SLICE weight values at a time; the
    product equals a float64 one from the whole dequantized weight, across slices and parts."""
    from ownlm.model import ops

    monkeypatch.setattr(kernels, "load", lambda: None)
    monkeypatch.setattr(ops, "DEQUANT_SLICE", 7 * 64)  # 7 rows of 64 inputs: slices that cut parts
    torch.manual_seed(0)
    parts = [quantize(torch.randn(20, 64), 4), quantize(torch.randn(9, 64), 8), quantize(torch.randn(16, 64), 4)]
    x = torch.randn(3, 64)
    sizes = []
    real = QuantWeight.dequantize
    monkeypatch.setattr(QuantWeight, "dequantize", lambda w, rows=None: sizes.append(real(w, rows).numel()) or
                        real(w, rows))
    y = ops.quant_matmul(x, parts, torch.float32)
    want = x.double() @ torch.cat([real(p) for p in parts]).double().T
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    assert max(sizes) <= 7 * 64 and sum(sizes) == 45 * 64


def test_pytorch_without_its_cpu_int4_kernel(smollm2_gguf, monkeypatch):
    """PyTorch 2.5 lacks the CPU twin of its int4 kernel: without ownlm's kernels too, int4 linears
    stay in ownlm's layout (dequantized per call) and the model still follows its float32 self."""
    from ownlm.model import linear

    monkeypatch.setattr(kernels, "load", lambda: None)
    monkeypatch.setattr(linear, "tinygemm_on_cpu", lambda: False)
    lm = ownlm.load(str(smollm2_gguf), cache=False)
    linears = [m for m in lm.model.modules() if isinstance(m, QuantLinear)]
    assert linears and all(m.layout == "blocks" for m in linears)
    exact = ownlm.load(str(smollm2_gguf), dtype="float32", quant="none", cache=False)
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    assert lm.chat(msgs, max_tokens=12, temperature=0).text == exact.chat(msgs, max_tokens=12, temperature=0).text


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_quantize_at_load_follows_the_dense_model(hf_models, quant):
    dense = ownlm.load(str(hf_models["qwen2"]), dtype="float32", quant="none")
    q = ownlm.load(str(hf_models["qwen2"]), dtype="float32", quant=quant)
    assert all(isinstance(b.attn.qkv, QuantLinear) and b.attn.qkv.bits == int(quant[3]) for b in q.model.layers)
    ids = torch.tensor([list(range(3, 40))])
    with torch.inference_mode():
        b, a = dense.model(ids).log_softmax(-1), q.model(ids).log_softmax(-1)
    kl = (b.exp() * (b - a)).sum(-1).mean().item()
    assert kl < (0.05 if quant == "int4" else 1e-3), kl


def test_quant_bf16_is_dense_bfloat16(hf_models, tmp_path):

    path = hf_folder_to_gguf(hf_models["llama"], tmp_path / "q.gguf", qtype=Q.Q4_0)
    lm = ownlm.load(str(path), dtype="float32", quant="none")
    dense = ownlm.load(str(path), quant="bf16")
    assert not any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in dense.model.modules())
    assert {p.dtype for p in dense.model.parameters()} == {torch.bfloat16}
    for name, p in dense.model.named_parameters():  # the file's values, rounded once to bfloat16
        torch.testing.assert_close(p, lm.model.get_parameter(name).to(torch.bfloat16), atol=0, rtol=0)
    with pytest.raises(BadRequest, match="bf16"):
        ownlm.load(str(path), dtype="float32", quant="bf16")


def _decode(model, ids, steps=6, one_call=False, stepper=False):
    """Greedy decode steps through the model's forward, or through the engine's CPU stepper
    (`stepper`; with `one_call`, asserting that it took every step in one kernel call)."""
    cache = KVCache.for_model(model, 1, 128)
    step = cpu_step.CpuDecode(model, cache)
    out = []
    with torch.inference_mode():
        cache.length = len(ids)
        logits = model(torch.tensor([ids]), torch.arange(len(ids))[None], cache, last_only=True)
        n = len(ids)
        for _ in range(steps):
            token = logits[0, -1].float().argmax().view(1, 1)
            if one_call or stepper:
                logits = step.step(token, torch.tensor([[n]]), n + 1)
                assert step.plan() is not None or not one_call
            else:
                cache.length = span(n + 1)
                logits = model(token, torch.tensor([[n]]), cache)
            out.append(logits.float())
            n += 1
    return torch.cat(out)


GEMMA3 = dict(head_dim=16, sliding_window=6, num_hidden_layers=3, query_pre_attn_scalar=24,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
              hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)


@pytest.mark.skipif(not KERNELS_POSSIBLE, reason="ownlm's kernels need x86-64 Linux with AVX2 and a C compiler")
@pytest.mark.parametrize("family,dtype,quant", [("qwen2", "bfloat16", "int8"), ("mistral", "float32", "int4"),
                                                 ("llama3-rope", "bfloat16", "int4"), ("qwen3", "bfloat16", "int4"),
                                                 ("gemma3_text", "bfloat16", "int8"), ("phi3", "float32", "int4")])
def test_one_call_decode_step_is_bit_identical_to_the_modules(hf_models, tmp_path, monkeypatch, family, dtype, quant):
    """qwen2: biases; mistral: a sliding window shorter than the sequence; llama3: tied head;
    qwen3: qk-norms; gemma3: (1 + w) norms, post-norms, local layers with their own rope, GeLU;
    phi3: fused projections from the file."""
    from .conftest import build_hf_model

    extra = {"qwen3": dict(head_dim=24), "gemma3_text": GEMMA3, "phi3": dict(pad_token_id=0, bos_token_id=1)}
    path = hf_models[family] if family in hf_models else build_hf_model(tmp_path / family, family, **extra[family])
    lm = ownlm.load(str(path), dtype=dtype, quant=quant)
    assert cpu_step.eligible(lm.model)
    ids = list(range(3, 21))
    fused = _decode(lm.model, ids, one_call=True)
    assert torch.equal(fused, _decode(lm.model, ids))  # the modules themselves follow transformers: test_families


def test_blocks_the_fused_step_does_not_cover_take_the_modules(hf_models, tmp_path):
    from .conftest import build_hf_model

    neox = ownlm.load(str(build_hf_model(tmp_path / "neox", "gpt_neox", rotary_pct=0.25, num_key_value_heads=4)),
                      dtype="float32", quant="int4")
    assert not cpu_step.eligible(neox.model)  # LayerNorm, parallel residual
    dense = ownlm.load(str(hf_models["llama"]), dtype="float32", quant="none")
    assert not cpu_step.eligible(dense.model)  # dense projections


@pytest.mark.skipif(not KERNELS_POSSIBLE, reason="ownlm's kernels need x86-64 Linux with AVX2 and a C compiler")
def test_a_float16_model_steps_through_its_modules_and_the_kernels_refuse_float16(hf_models):
    """The kernels read and write 4- or 2-byte floats as float32 / bfloat16: a float16 model's
    decode steps go through its forward (a float16 step once wrote past its rows' buffer), and
    each wrapper refuses float16 rows before any C code runs."""
    lm = ownlm.load(str(hf_models["llama"]), dtype="float16", quant="int4")
    assert not cpu_step.eligible(lm.model)
    ids = list(range(3, 21))
    stepped = _decode(lm.model, ids, stepper=True)
    assert stepped.isfinite().all() and torch.equal(stepped, _decode(lm.model, ids))
    x = torch.ones(2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        kernels.rms_norm(x, torch.ones(64), 1e-6, 0.0)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        kernels.act_mul(x, 0)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        kernels.decode_layers(x, None, None, None, (1, 1, 64), (None,) * 4, torch.float16, None, 0,
                              torch.zeros(2, dtype=torch.int64), 1e-6, 0)


@pytest.mark.skipif(not KERNELS_POSSIBLE, reason="ownlm's kernels need x86-64 Linux with AVX2 and a C compiler")
def test_each_block_type_keeps_its_bits_and_mixed_groups_fuse_as_stacks(hf_models, tmp_path):
    """Q5_0 layers in their own 5 bits, and a Q4_0 file whose v projections are Q5_1 and down
    projections Q8_0 (as llama.cpp's _M mixes do): a fused qkv of int4 q, k and an int5 v is a
    stack of parts, nothing is widened (the bytes held are the file's), the one-call decode step
    gives the modules' bits, and the model follows its dequantized self."""
    mixed = {"attn_v.weight": Q.Q5_1, "ffn_down.weight": Q.Q8_0}
    for name, path in (("q5", hf_folder_to_gguf(hf_models["llama"], tmp_path / "q5.gguf", qtype=Q.Q5_0)),
                       ("mixed", hf_folder_to_gguf(hf_models["llama"], tmp_path / "m.gguf", qtype=Q.Q4_0,
                                                   overrides=mixed))):
        q = ownlm.load(str(path), dtype="bfloat16", cache=False)
        exact = ownlm.load(str(path), dtype="float32", quant="none", cache=False)
        for block in q.model.layers:
            bits = {n: getattr(m, "bits", None) for n, m in (("qkv", block.attn.qkv), ("o", block.attn.o),
                                                            ("gate_up", block.mlp.gate_up), ("down", block.mlp.down))}
            assert bits == ({"qkv": 5, "o": 5, "gate_up": 5, "down": 5} if name == "q5" else
                            {"qkv": (4, 5), "o": 4, "gate_up": 4, "down": 8}), (name, bits)
        g = GGUFFile(path)
        quantized = [m for m in q.model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
        held = sum(t.numel() * t.element_size() for m in quantized for t in m.buffers())
        assert held == sum(t.nbytes for t in g.tensors.values() if t.qtype in WIDTH)
        assert cpu_step.eligible(q.model)
        ids = list(range(3, 21))
        assert torch.equal(_decode(q.model, ids, one_call=True), _decode(q.model, ids))
        ids = torch.tensor([list(range(3, 60))])
        with torch.inference_mode():
            b, a = exact.model(ids).log_softmax(-1), q.model(ids).float().log_softmax(-1)
        assert (b.exp() * (b - a)).sum(-1).mean().item() < 5e-3


def test_threads_decoding_with_one_model_get_their_own_answers(hf_models):
    """The one-call step keeps cache pointers per cache: two threads generating at once with the
    same model get exactly what each gets alone."""
    import threading

    from ownlm.engine.generate import generate_ids
    from ownlm.engine.sampling import SamplingParams

    lm = ownlm.load(str(hf_models["mistral"]), dtype="bfloat16", quant="int4")
    prompts = [list(range(3, 30)), list(range(40, 52))]
    params = SamplingParams(temperature=0, max_tokens=40)
    alone = [list(generate_ids(lm.model, p, params)) for p in prompts]
    together: list = [None, None]

    def work(i):
        together[i] = list(generate_ids(lm.model, prompts[i], params))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone and cpu_step.eligible(lm.model)  # so every step went through the one-call path


def test_the_one_call_plan_follows_the_models_structure(hf_models):
    """The plan points into the model's tensors: it is built again after a module swap
    (linear.replace) or a state-dict load, and an adapter makes the step take the modules (whose
    answer it then gives); a conversion changes the structure it is keyed on."""
    from ownlm.model.linear import LoRALinear, replace

    lm = ownlm.load(str(hf_models["mistral"]), dtype="bfloat16", quant="int4")
    model = lm.model
    stepper = cpu_step.CpuDecode(model, KVCache.for_model(model, 1, 64))
    first = stepper.plan()
    assert first is not None and stepper.plan() is first  # kept while nothing changes
    qkv = model.layers[0].attn.qkv
    lora = LoRALinear(qkv, {"q": (0, 64)}, r=4, alpha=8)
    with torch.no_grad():
        lora.lora_b["q"].normal_(0, 0.5)  # an adapter that changes the answer
    replace(model, "layers.0.attn.qkv", lora)
    assert stepper.plan() is None and not cpu_step.eligible(model)
    ids = list(range(3, 21))
    assert torch.equal(_decode(model, ids, stepper=True), _decode(model, ids))
    replace(model, "layers.0.attn.qkv", qkv)
    again = stepper.plan()
    assert again is not None and again is not first
    model.load_state_dict(model.state_dict())
    last = stepper.plan()
    assert last is not again and torch.equal(_decode(model, ids, one_call=True), _decode(model, ids))
    dense = ownlm.load(str(hf_models["llama"]), dtype="float32", quant="none").model
    before = dense.structure
    dense.bfloat16()  # converted: every tensor in new storage
    assert dense.structure != before

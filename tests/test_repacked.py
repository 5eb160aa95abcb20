"""The repacked-model cache: a second load of a store model reads one file and gives the very same
model; a damaged cache is ignored and rebuilt; `ownlm rm` removes it with the model."""

from __future__ import annotations

import gguf
import pytest
import torch

import ownlm
from ownlm import manage
from ownlm import repacked
from ownlm.formats.hf import PAD, SafetensorsFile
from ownlm.model.quant import ALIGN
from ownlm.store.store import Store

from .ggufs import hf_folder_to_gguf


def _logits(lm) -> torch.Tensor:
    ids = torch.tensor([lm.encode("Owning your model means nobody can change its price.")])
    with torch.inference_mode():
        return lm.model(ids)[0].float()


def _caches(home) -> list:
    root = home / "cache" / "repacked"
    return sorted(root.iterdir()) if root.is_dir() else []


Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize("mix", [{}, {"attn_v.weight": Q.Q5_1, "attn_output.weight": Q.Q5_0,
                                     "ffn_down.weight": Q.Q8_0}])
def test_second_load_reads_the_cache_and_equals_a_fresh_build(hf_models, tmp_path, ownlm_home, monkeypatch, mix):
    """A Q4_0 file, and one mixing int5 and int8 projections in (a fused qkv of int4 and int5 parts)."""
    path = hf_folder_to_gguf(hf_models["llama"], tmp_path / "q4.gguf", qtype=Q.Q4_0, overrides=mix)
    manage.import_path(path, name="tiny-q4", quiet=True)
    calls = []
    real_load = repacked.load
    monkeypatch.setattr(repacked, "load", lambda *a: calls.append(real_load(*a)) or calls[-1])

    first = ownlm.load("tiny-q4", dtype="bfloat16")  # int4 linears on this CPU
    assert calls == [None] and len(_caches(ownlm_home)) == 1
    second = ownlm.load("tiny-q4", dtype="bfloat16")
    assert calls[-1] is not None  # served from the cache
    assert any(type(m).__name__ == "QuantLinear" for m in second.model.modules())
    assert [b.attn.qkv.bits for b in second.model.layers] == [(4, 5) if mix else 4] * len(second.model.layers)
    monkeypatch.setenv("OWNLM_REPACK_CACHE", "0")
    fresh = ownlm.load("tiny-q4", dtype="bfloat16")
    assert torch.equal(_logits(second), _logits(fresh)) and torch.equal(_logits(first), _logits(fresh))
    msgs = [{"role": "user", "content": "Owning your model"}]
    assert second.chat(msgs, temperature=0, max_tokens=12).token_ids == fresh.chat(msgs, temperature=0,
                                                                                   max_tokens=12).token_ids
    assert second.facts == fresh.facts and second.template.source == fresh.template.source
    assert second.tokenizer.eos_ids == fresh.tokenizer.eos_ids
    (cache,) = _caches(ownlm_home)  # mapped in place, every tensor of the cache starts on a cache line
    entries = SafetensorsFile(cache / repacked.FILE).entries
    assert all(e[2] % ALIGN == 0 for name, e in entries.items() if e[3] and not name.startswith(PAD))
    for lm in (first, second, fresh):  # and so do the kernels' planes, mapped or built
        planes = [t for m in lm.model.modules() if type(m).__name__ == "QuantLinear" for p in m.parts
                  for t in p.tensors().values()]
        assert planes and all(t.data_ptr() % ALIGN == 0 for t in planes)


def test_aligned_safetensors_read_back_in_safetensors_own_reader(tmp_path):
    """write_safetensors(align=64): each tensor at a multiple of 64 bytes in the file, the gaps as
    zero-filled uint8 entries, a file that the safetensors library itself loads to the same values."""
    from safetensors.torch import load_file

    from ownlm.formats.hf import write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randint(0, 255, (7,), dtype=torch.uint8, generator=g),
               "c": torch.randn(11, generator=g).to(torch.bfloat16), "d": torch.empty(0, 4),
               "e": torch.randint(-9, 9, (5, 3), dtype=torch.int8, generator=g)}
    write_safetensors(tmp_path / "x.safetensors", tensors, {"k": "v"}, align=ALIGN)
    theirs = load_file(tmp_path / "x.safetensors")
    ours = SafetensorsFile(tmp_path / "x.safetensors")
    pads = [k for k in theirs if k.startswith(PAD)]
    assert set(theirs) - set(pads) == set(tensors) and pads
    assert all(theirs[k].dtype == torch.uint8 and not theirs[k].any() for k in pads)
    for name, t in tensors.items():
        assert torch.equal(theirs[name], t) and torch.equal(ours.tensor(name), t)
        if t.numel():
            assert ours.entries[name][2] % ALIGN == 0  # the offset in the file
    assert ours.metadata == {"k": "v"}


def test_a_damaged_cache_is_rebuilt_and_rm_removes_it(hf_models, ownlm_home):
    manage.import_path(hf_models["llama"], name="tiny", quiet=True)
    want = _logits(ownlm.load("tiny", dtype="float32"))
    (cache,) = _caches(ownlm_home)
    file = cache / repacked.FILE
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])  # cut in half
    again = ownlm.load("tiny", dtype="float32")
    assert torch.equal(_logits(again), want)
    assert repacked.load(cache, torch.device("cpu")) is not None  # dropped and written whole again
    manage.remove("tiny")
    assert _caches(ownlm_home) == [] and Store().names() == []


def test_a_cache_folder_left_without_its_file_is_rebuilt(hf_models, ownlm_home):
    """An eviction cut short between the file and its folder: the next load writes the cache again
    (the empty folder used to stand in its place, every load then building from the file)."""
    manage.import_path(hf_models["llama"], name="tiny", quiet=True)
    want = _logits(ownlm.load("tiny", dtype="float32"))
    (cache,) = _caches(ownlm_home)
    (cache / repacked.FILE).unlink()
    assert torch.equal(_logits(ownlm.load("tiny", dtype="float32")), want)
    assert _caches(ownlm_home) == [cache] and repacked.load(cache, torch.device("cpu")) is not None


def test_a_cache_whose_shapes_disagree_with_the_config_is_rebuilt(hf_models, tmp_path, ownlm_home):
    """A cache that reads back whole but holds a quantized weight of the wrong shape (fewer rows:
    the kernels would read past it) is refused and rebuilt, never run."""
    from ownlm.formats.hf import write_safetensors

    path = hf_folder_to_gguf(hf_models["llama"], tmp_path / "q4.gguf", qtype=gguf.GGMLQuantizationType.Q4_0)
    manage.import_path(path, name="tiny-q4", quiet=True)
    want = _logits(ownlm.load("tiny-q4", dtype="bfloat16"))
    (cache,) = _caches(ownlm_home)
    st = SafetensorsFile(cache / repacked.FILE)
    meta, tensors = st.metadata, {k: st.tensor(k).clone() for k in st.entries}
    for part in ("data", "scale"):  # consistent with each other (Q4_0: no offsets), not with the config
        name = f"layers.0.mlp.down.{part}"
        tensors[name] = tensors[name][:-3].contiguous()
    (cache / repacked.FILE).unlink()
    write_safetensors(cache / repacked.FILE, tensors, meta)
    assert repacked.load(cache, torch.device("cpu")) is None
    assert torch.equal(_logits(ownlm.load("tiny-q4", dtype="bfloat16")), want)


def test_a_cache_whose_tokenizer_inflates_past_the_bound_is_rebuilt(hf_models, ownlm_home, monkeypatch):
    """The tokenizer is held compressed; one that would inflate past MAX_TOKENIZER (a bomb in a
    damaged or planted cache) is refused without being inflated whole, and the cache rebuilt."""
    import base64
    import json
    import zlib

    manage.import_path(hf_models["llama"], name="tiny", quiet=True)
    want = _logits(ownlm.load("tiny", dtype="float32"))
    (cache,) = _caches(ownlm_home)
    meta = json.loads(SafetensorsFile(cache / repacked.FILE).metadata["ownlm"])
    size = len(zlib.decompress(base64.b64decode(meta["tokenizer"]["json_z"])))
    monkeypatch.setattr(repacked, "MAX_TOKENIZER", size - 1)
    assert repacked.load(cache, torch.device("cpu")) is None and _caches(ownlm_home) == []  # dropped
    monkeypatch.setattr(repacked, "MAX_TOKENIZER", size)
    assert torch.equal(_logits(ownlm.load("tiny", dtype="float32")), want)  # built and written again
    assert repacked.load(cache, torch.device("cpu")) is not None

"""Files from outside are hostile (issue 21): every case a mutation fuzzer found, each refused with
one line — a ModelFormatError that names the key (or tensor), the value and what was expected —
instead of a raw exception, a hang or gigabytes allocated. GGUFs are written with the `gguf`
package's writer (tests/ggufs.py), HF folders are tiny transformers models (tests/conftest.py)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType as T

import ownlm
from ownlm import manage
from ownlm.errors import ModelFormatError
from ownlm.formats import tokenizer as tok
from ownlm.formats.hf import parse_json
from ownlm.model import transformer
from ownlm.store.store import Store

from .conftest import build_hf_model
from .ggufs import hf_folder_to_gguf, kv_str, raw_gguf


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """A tiny Llama HF folder: 2 layers, width 64, 4 heads of 16, 2 KV heads, 300 tokens."""
    return build_hf_model(tmp_path_factory.mktemp("hostile") / "llama", "llama")


def refused(path: Path, *words: str) -> str:
    """Loading `path` fails with exactly one line of ModelFormatError holding every word."""
    with pytest.raises(ModelFormatError) as e:
        ownlm.load(str(path), dtype="float32")
    msg = str(e.value)
    assert type(e.value) is ModelFormatError and "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def gguf(llama: Path, tmp_path: Path, **kw) -> Path:
    return hf_folder_to_gguf(llama, tmp_path / "bad.gguf", **kw)


def folder(llama: Path, tmp_path: Path, config: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
    """A copy of the Llama folder with config.json's keys replaced (None: dropped)."""
    out = tmp_path / "bad"
    shutil.copytree(llama, out)
    cfg = json.loads((out / "config.json").read_text())
    for k, v in (config or {}).items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (out / "config.json").write_text(json.dumps(cfg))  # allow_nan: NaN and Infinity as Python writes them
    return out


def test_the_tiny_files_load(llama, tmp_path):
    """The unmutated files this module mutates load (so each refusal below is the mutation's)."""
    assert ownlm.load(str(gguf(llama, tmp_path)), dtype="float32").config.n_layers == 2
    assert ownlm.load(str(llama), dtype="float32").config.n_layers == 2


# -- GGUF metadata: the type the schema declares, not the type the file holds ------------------------
@pytest.mark.parametrize("key, value, expected", [
    ("llama.attention.head_count", (float("inf"), T.FLOAT32), "llama.attention.head_count=inf is not an integer"),
    ("llama.block_count", (float("nan"), T.FLOAT32), "llama.block_count=nan is not an integer in [1, 4096]"),
    ("general.file_type", ("7", T.STRING), "general.file_type='7' is not an integer in [0, 65536]"),
    ("general.file_type", ([7, 8], T.ARRAY, T.UINT32), "general.file_type=[7, 8] is not an integer"),
    ("tokenizer.ggml.eos_token_id", ("", T.STRING), "tokenizer.ggml.eos_token_id='' is not an integer in [0, "),
    ("tokenizer.ggml.eos_token_id", (float("inf"), T.FLOAT64), "tokenizer.ggml.eos_token_id=inf is not an integer"),
    ("tokenizer.ggml.add_bos_token", ([True, False], T.ARRAY, T.BOOL),
     "tokenizer.ggml.add_bos_token=[True, False] is not a boolean"),
    ("tokenizer.ggml.model", (["gpt2"], T.ARRAY, T.STRING), "tokenizer.ggml.model=['gpt2'] is not a string"),
    ("llama.use_parallel_residual", ([1, 0], T.ARRAY, T.UINT8), "llama.use_parallel_residual=[1, 0] is not a boolean"),
    ("tokenizer.ggml.pre", (["default"], T.ARRAY, T.STRING), "tokenizer.ggml.pre=['default'] is not a string"),
    ("tokenizer.ggml.tokens", (5, T.UINT32), "tokenizer.ggml.tokens=5 is not a list of strings"),
    ("tokenizer.ggml.merges", ("a b", T.STRING), "tokenizer.ggml.merges='a b' is not a list of strings"),
    ("tokenizer.ggml.token_type", (1, T.INT32), "tokenizer.ggml.token_type=1 is not a list of integers"),
    ("llama.attention.sliding_window", (2.0 ** 64, T.FLOAT64),
     "llama.attention.sliding_window=1.8446744073709552e+19 is not an integer in [0, 268435456]"),
    ("llama.attention.sliding_window", (2 ** 64 - 1, T.UINT64),
     "llama.attention.sliding_window=18446744073709551615 is not an integer in [0, 268435456]"),
    ("llama.attention.sliding_window", (float("inf"), T.FLOAT32), "llama.attention.sliding_window=inf is not an"),
    ("llama.attention.sliding_window", ("abc", T.STRING), "llama.attention.sliding_window='abc' is not an integer"),
    ("llama.attention.clamp_kqv", (1e39, T.FLOAT64),
     "llama.attention.clamp_kqv=1e+39 is not a finite number in [0, 3.38953e+38]"),
    ("tokenizer.chat_template", (5, T.UINT32), "tokenizer.chat_template=5 is not a string"),
])
def test_gguf_metadata_of_the_wrong_type_is_refused_naming_the_key(llama, tmp_path, key, value, expected):
    refused(gguf(llama, tmp_path, meta={key: value}), expected)


def test_gguf_tokens_and_merges_that_disagree_are_refused(llama, tmp_path):
    """A merge naming a token the vocabulary lacks: tokenizers' own exception, wrapped with the keys."""
    refused(gguf(llama, tmp_path, meta={"tokenizer.ggml.merges": (["zq qz", "a b"], T.ARRAY, T.STRING)}),
            "bad.gguf: tokenizer.ggml.tokens / merges do not make a tokenizer (Error while initializing BPE: "
            "Token `zq` out of vocabulary)")


def test_gguf_token_longer_than_any_vocabulary_is_refused(llama, tmp_path):
    tokens = json.loads((llama / "tokenizer.json").read_text())["model"]["vocab"]
    vocab = sorted(tokens, key=tokens.get) + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab[5] = "x" * 250_000
    refused(gguf(llama, tmp_path, meta={"tokenizer.ggml.tokens": (vocab, T.ARRAY, T.STRING)}),
            "tokenizer.ggml.tokens[5]='xxxxxxxxxxxxxxxxx...xxxxxxxxxxxxxxxxxx' is not a string of at most 4096 "
            "characters")


def test_spm_merges_of_a_long_piece_are_not_quadratic():
    """SentencePiece merges are built from the cuts of each piece into two pieces: a 250k-character
    piece (handed over without the schema's bound) costs the vocabulary's few lengths, not 250k cuts
    (which would pass the cuts' bound and be refused)."""
    tokens = ["<unk>", "<s>", "</s>", "▁", "a", "b", "ab", "▁a", "x" * 250_000, "xx"]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0],
            "tokenizer.ggml.token_type": [2, 3, 3, 1, 1, 1, 1, 1, 1, 1], "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    spec = tok.from_gguf(meta)
    assert spec.tokenizer.encode("ab a", add_special_tokens=False).tokens == ["▁", "ab", "▁a"]


def test_spm_vocabulary_of_every_length_is_refused_before_its_merges_fill_memory(monkeypatch):
    """Pieces "a", "aa", ... of every length up to 4096 (8 MB of text, each within the schema's
    bound) split into 8 million merges of 23 GB of text: refused as the bound passes. With the
    bounds lowered, the cuts' and the characters' are each what refuses."""
    tokens = ["<unk>", "<s>", "</s>"] + ["a" * k for k in range(1, 4097)]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0] * 3 + [-float(k) for k in range(1, 4097)],
            "tokenizer.ggml.token_type": [2, 3, 3] + [1] * 4096, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    with pytest.raises(ModelFormatError, match="more SentencePiece merges than any real vocabulary"):
        tok.from_gguf(meta)
    small = {**meta, "tokenizer.ggml.tokens": tokens[:67], "tokenizer.ggml.scores": meta["tokenizer.ggml.scores"][:67],
             "tokenizer.ggml.token_type": meta["tokenizer.ggml.token_type"][:67]}  # pieces of 1 .. 64 a's
    merges = 63 * 64 // 2  # every cut of every piece has both halves in the vocabulary
    assert len(tok._spm_merges(small["tokenizer.ggml.tokens"], small["tokenizer.ggml.scores"],
                               small["tokenizer.ggml.token_type"], {t: i for i, t in enumerate(tokens[:67])})) == merges
    monkeypatch.setattr(tok, "MAX_SPM_CUTS", merges - 1)
    with pytest.raises(ModelFormatError, match="over 2015 cuts"):
        tok.from_gguf(small)
    monkeypatch.setattr(tok, "MAX_SPM_CUTS", merges)
    monkeypatch.setattr(tok, "MAX_SPM_MERGE_CHARS", 1000)
    with pytest.raises(ModelFormatError, match="or 1000 characters"):
        tok.from_gguf(small)
    monkeypatch.setattr(tok, "MAX_SPM_MERGE_CHARS", sum(k * (k - 1) for k in range(2, 65)))
    # (no "▁" piece here: the space prefix is unknown)
    assert tok.from_gguf(small).tokenizer.encode("aaaa", add_special_tokens=False).tokens == ["<unk>", "aaaa"]


# -- config.json, generation_config.json, safetensors headers -----------------------------------------
@pytest.mark.parametrize("config, expected", [
    ({"rope_scaling": "abc"}, "config.json: rope_scaling='abc' is not an object"),
    ({"rope_scaling": 3}, "config.json: rope_scaling=3 is not an object"),
    ({"rope_parameters": "linear"}, "config.json: rope_parameters='linear' is not an object"),
    ({"rope_parameters": 7}, "config.json: rope_parameters=7 is not an object"),
    ({"layer_types": 2}, "config.json: layer_types=2 is not a list of strings (at most 4096)"),
    ({"num_hidden_layers": float("inf")}, "config.json: num_hidden_layers=inf is not a finite number"),
    ({"rms_norm_eps": float("nan")}, "config.json: rms_norm_eps=nan is not a finite number"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": float("nan")}},
     "config.json: rope_parameters.rope_theta=nan is not a finite number"),
    ({"query_pre_attn_scalar": -1}, "config.json: query_pre_attn_scalar=-1 is not a finite number > 0"),
    ({"sliding_window": 2 ** 64}, "config.json: sliding_window=18446744073709551616 is not an integer in [0, "),
    ({"rope_scaling": {"rope_type": "linear", "factor": "2"}},
     "config.json: rope_scaling.factor='2' is not a finite number > 0"),
    ({"num_attention_heads": 3, "head_dim": None},
     "config.json: hidden_size=64 is not a multiple of num_attention_heads=3"),
    ({"num_key_value_heads": 3}, "config.json: num_attention_heads=4, num_key_value_heads=3: the heads must be a "
                                 "multiple of the KV heads"),
    ({"head_dim": 15}, "config.json: head_dim=15: the head dim must be even"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 4.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
     "config.json: rope_parameters=<llama3, factor 8.0>: llama3 needs high_freq_factor > low_freq_factor > 0"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "original_max_position_embeddings": 64,
                          "short_factor": [1.0] * 5, "long_factor": [2.0] * 5}},
     "config.json: rope_parameters=<longrope, 5 factors>: 5 factors for the rotary dim 16, which needs 8"),
])
def test_config_json_of_the_wrong_type_is_refused_naming_the_key(llama, tmp_path, config, expected):
    refused(folder(llama, tmp_path, config), expected)


def test_config_json_numbers_beyond_a_float_are_refused(llama, tmp_path):
    out = folder(llama, tmp_path)
    text = (out / "config.json").read_text()
    (out / "config.json").write_text(text.replace('"vocab_size": 300', '"vocab_size": 1e999'))
    refused(out, "config.json: vocab_size=inf is not a finite number")


def test_generation_config_that_is_not_an_object_is_refused(llama, tmp_path):
    out = folder(llama, tmp_path)
    (out / "generation_config.json").write_text("[2, 3]")
    refused(out, "generation_config.json: expected a JSON object, found an array")
    (out / "generation_config.json").write_text('{"eos_token_id": "2"}')
    refused(out, "generation_config.json: eos_token_id='2' is not an integer in [0, 4194303] or a list of integers")


def test_tokenizer_files_of_the_wrong_type_are_refused(llama, tmp_path):
    out = folder(llama, tmp_path)
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**tcfg, "add_bos_token": [1]}))
    refused(out, "tokenizer_config.json: add_bos_token=[1] is not a boolean")
    (out / "tokenizer_config.json").write_text(json.dumps({**tcfg, "chat_template": 5}))
    refused(out, "tokenizer_config.json: chat_template=5 is not a string or a list of objects")
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg))
    (out / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": 3}}')
    refused(out, "tokenizer.json cannot be read:")


def test_adapter_config_of_the_wrong_type_is_refused(tmp_path):
    from ownlm.formats import peft

    path = tmp_path / peft.CONFIG
    path.write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": "0.1",
                                "target_modules": ["q_proj"]}))
    with pytest.raises(ModelFormatError, match=r"^adapter_config.json: lora_dropout='0.1' is not a finite number "
                                                r"in \[0, 1\]$"):
        peft.read_settings(path)


def _safetensors(path: Path, header: bytes, data: bytes = b"\0" * 16) -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


@pytest.mark.parametrize("entry, expected", [
    ('{"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 16]}', "w.shape[0]=inf is not a finite number"),
    ('{"dtype": "F32", "shape": [4], "data_offsets": [0, 1e999]}', "w.data_offsets[1]=inf is not a finite number"),
    ('{"dtype": "F32", "shape": [4.5], "data_offsets": [0, 16]}', "shape[0]=4.5 is not an integer in [0, "),
    ('{"dtype": "F32", "shape": [' + ", ".join(["1"] * 65 + ["4"]) + '], "data_offsets": [0, 16]}',
     "tensor 'w': shape=[1, 1, 1, 1, 1, 1, 1, 1, ...] is not a list of integers (at most 8)"),
    ('{"dtype": 4, "shape": [4], "data_offsets": [0, 16]}', "dtype=4 is not a string"),
])
def test_safetensors_header_values_of_the_wrong_type_are_refused(llama, tmp_path, entry, expected):
    out = folder(llama, tmp_path)
    _safetensors(out / "model.safetensors", b'{"w": ' + entry.encode() + b"}")
    refused(out, "model.safetensors", expected)


def test_deeply_nested_json_is_refused_not_a_recursion_error(llama, tmp_path):
    out = folder(llama, tmp_path)
    _safetensors(out / "model.safetensors", b"[" * 600_000 + b"]" * 600_000)
    refused(out, "safetensors header: JSON nested deeper than 64 levels")
    with pytest.raises(ModelFormatError, match="config.json: JSON nested deeper than 64 levels"):
        parse_json(b'{"a": ' + b"[" * 100 + b"]" * 100 + b"}", "config.json")
    assert parse_json(b'{"a": ' + b"[" * 60 + b"]" * 60 + b"}", "config.json")["a"]


# -- tensors against the config, before anything is built --------------------------------------------
@pytest.fixture
def nothing_built(monkeypatch):
    """Building a model or one of its layers fails the test: a refusal must come before either."""
    def built(self, *args, **kwargs):
        raise AssertionError(f"a {type(self).__name__} was built")

    monkeypatch.setattr(transformer.Block, "__init__", built)
    monkeypatch.setattr(transformer.Transformer, "__init__", built)


def test_a_layer_count_of_millions_is_refused_before_anything_is_built(llama, tmp_path, nothing_built):
    for path, key in ((gguf(llama, tmp_path, meta={"llama.block_count": (16_777_216, T.UINT32)}), "llama.block_count"),
                      (folder(llama, tmp_path, {"num_hidden_layers": 16_777_216}), "config.json: num_hidden_layers")):
        refused(path, f"{key}=16777216 is not an integer in [1, 4096]")


def test_a_layer_count_the_tensors_do_not_confirm_is_refused(llama, tmp_path, nothing_built):
    refused(gguf(llama, tmp_path, meta={"llama.block_count": (4000, T.UINT32)}),
            "llama.block_count=4000 disagrees with the tensors, which hold layers 0..1")
    refused(folder(llama, tmp_path, {"num_hidden_layers": 4000}),
            "config.json: num_hidden_layers=4000 disagrees with the tensors, which hold layers 0..1")


@pytest.mark.parametrize("edit, expected", [
    (lambda n, t: t.T.copy() if n == "blk.0.ffn_down.weight" else t,  # dims swapped
     "tensor 'blk.0.ffn_down.weight' has shape [128, 64], the config implies [64, 128]"),
    (lambda n, t: t.reshape(-1) if n == "blk.1.attn_q.weight" else t,  # 1-D where 2-D belongs
     "tensor 'blk.1.attn_q.weight' has shape [4096], the config implies [64, 64]"),
    (lambda n, t: None if n == "blk.1.attn_v.weight" else t,
     "'layers.1.attn.qkv.weight' (our name) is filled by k, q; expected k, q, v once each"),
    (lambda n, t: None if n == "output_norm.weight" else t,
     "the config implies a tensor 'norm.weight' (our name) the file lacks"),
])
def test_gguf_tensors_that_disagree_with_the_config_are_refused(llama, tmp_path, edit, expected):
    refused(gguf(llama, tmp_path, edit=edit), expected)


@pytest.mark.parametrize("meta, expected", [
    # the Q/K rows un-permuted per head: a head count that does not fit them never reaches the reshape
    ({"llama.attention.head_count": (8, T.UINT32)},
     "tensor 'blk.0.attn_output.weight' has shape [64, 64], the config implies [64, 128]"),
    ({"llama.attention.head_count": (5, T.UINT32)},
     "llama.attention.head_count=5, llama.attention.head_count_kv=2: the heads must be a multiple of the KV heads"),
    ({"llama.attention.head_count": (3, T.UINT32), "llama.rope.dimension_count": None},
     "llama.embedding_length=64 is not a multiple of llama.attention.head_count=3"),
    ({"llama.attention.head_count_kv": (4, T.UINT32)},
     "tensor 'blk.0.attn_k.weight' has shape [32, 64], the config implies [64, 64]"),
    ({"llama.embedding_length": (128, T.UINT32)}, "has shape [300, 64], the config implies [300, 128]"),
])
def test_gguf_head_counts_that_do_not_fit_the_tensors_are_refused(llama, tmp_path, meta, expected):
    refused(gguf(llama, tmp_path, meta=meta), expected)


def test_gguf_tensors_of_many_dimensions_are_refused(tmp_path):
    path = tmp_path / "dims.gguf"
    path.write_bytes(raw_gguf([kv_str("general.architecture", "llama")], [("t", [1] * 66, 0, 0)], b"\0" * 64))
    refused(path, "tensor 't' has 66 dimensions")


def test_hf_tensors_that_disagree_with_the_config_are_refused(llama, tmp_path):
    from safetensors.numpy import load_file, save_file

    out = folder(llama, tmp_path)
    tensors = load_file(str(out / "model.safetensors"))
    swapped = dict(tensors, **{"model.layers.0.mlp.down_proj.weight": tensors["model.layers.0.mlp.down_proj.weight"].T
                               .copy()})
    save_file(swapped, str(out / "model.safetensors"))
    refused(out, "config.json: tensor 'model.layers.0.mlp.down_proj.weight' has shape [128, 64], the config implies "
                 "[64, 128]")
    save_file(dict(tensors, **{"model.norm.weight": np.zeros(64, dtype=np.int64)}), str(out / "model.safetensors"))
    refused(out, "tensor 'model.norm.weight' holds int64, not floating-point weights")
    save_file(dict(tensors, **{"model.layers.0.mlp.up_proj.weight": np.zeros([1] * 6 + [128, 64], np.float32)}),
              str(out / "model.safetensors"))
    refused(out, "tensor 'model.layers.0.mlp.up_proj.weight' has shape [1, 1, 1, 1, 1, 1, 128, 64], the config "
                 "implies [128, 64]")


def test_a_huge_rope_table_is_refused_before_it_is_read(tmp_path):
    """64M rope factors (256 MB, a sparse file here) for a head dim of at most 4096: refused from
    the tensor's header, without reading or allocating it."""
    n = 64 << 20
    head = raw_gguf([kv_str("general.architecture", "llama")], [("rope_freqs.weight", [n], 0, 0)], b"")
    path = tmp_path / "rope.gguf"
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + 4 * n)
    refused(path, "tensor 'rope_freqs.weight' has 67108864 entries; a rope table holds one per pair of a head's "
                  "dimensions (at most 2048)")


def test_a_rope_table_that_does_not_fit_the_head_dim_is_refused(llama, tmp_path):
    refused(gguf(llama, tmp_path, extra={"rope_freqs.weight": np.ones(12, dtype=np.float32)}),
            "bad.gguf: rope_freqs.weight=<factors, 12 factors>: 12 factors for the rotary dim 16, which needs 8")


def test_import_refuses_a_model_that_can_never_load(llama, tmp_path):
    """`ownlm import` checks the same things as a load, before anything is stored."""
    for bad in (gguf(llama, tmp_path, meta={"llama.block_count": (3, T.UINT32)}),
                folder(llama, tmp_path, {"intermediate_size": 96})):
        with pytest.raises(ModelFormatError, match="disagrees with the tensors|the config implies"):
            manage.import_path(bad, "bad", quiet=True)
    assert manage.list_models(Store()) == []

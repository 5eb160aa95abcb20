"""More open families through the same Transformer: Qwen3 (qk-norm), Phi-3 (fused qkv and gate_up),
Mixtral (sparse MoE, top-2), GPT-NeoX / Pythia (LayerNorm with bias, partial rotary, parallel
residual, per-head fused qkv), Gemma 3 (interleaved local / global layers with their own rope
bases, qk-norm, (1 + w) norms, scaled embeddings, GeLU-tanh, pre and post norms), Falcon (new
decoder architecture, multi-query 7B layout, sequential) and MPT (ALiBi, clip_qkv, no biases).
transformers on tiny random configs is the reference. A "-variant" suffix names a second config."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import ownlm
from conftest import build_hf_model
from ownlm.cli.main import main
from ownlm.engine.kv_cache import KVCache
from ownlm.formats.gguf import GGUFFile

FAMILIES = {
    "qwen3": dict(head_dim=24),
    "phi3": dict(pad_token_id=0, bos_token_id=1),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "gpt_neox": dict(rotary_pct=0.25, num_key_value_heads=4, layer_norm_eps=1e-5, use_parallel_residual=True),
    "gemma3_text": dict(head_dim=16, sliding_window=6, num_hidden_layers=3, query_pre_attn_scalar=24,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
                        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True),
    "falcon": dict(num_kv_heads=2, new_decoder_architecture=True, bias=False),
    "falcon-7b": dict(multi_query=True, new_decoder_architecture=False, parallel_attn=True, bias=False),
    "falcon-sequential": dict(multi_query=False, new_decoder_architecture=False, parallel_attn=False, bias=True),
    "mpt": dict(attn_config={"alibi": True, "alibi_bias_max": 8, "clip_qkv": 0.5}),
    "mpt-6heads": dict(hidden_size=96, num_attention_heads=6, attn_config={"alibi": True}),
    "qwen2-padded": dict(vocab_size=320),  # more embedding rows than the tokenizer's 300 tokens, as Qwen's
}
SWITCHES = {
    "qwen3": {"qk_norm": True, "head_dim": 24},
    "phi3": {"n_kv_heads": 2, "mlp": "gated_silu"},
    "mixtral": {"n_experts": 4, "experts_per_token": 2},
    "gpt_neox": {"norm": "layer", "norm_bias": True, "mlp": "gelu", "rotary_dim": 4, "parallel_residual": True,
                 "qkv_bias": True, "o_bias": True, "mlp_bias": True, "n_kv_heads": 4},
    "gemma3_text": {"qk_norm": True, "embed_scale": True, "post_norms": True, "mlp": "gated_gelu_tanh",
                    "local_layers": [True, False, True], "rope_theta_local": 1e4, "rope_theta": 1e6,
                    "sliding_window": 6},
    "falcon": {"n_kv_heads": 2, "parallel_residual": True, "shared_norm": False, "norm": "layer", "mlp": "gelu"},
    "falcon-7b": {"n_kv_heads": 1, "parallel_residual": True, "shared_norm": True},
    "falcon-sequential": {"n_kv_heads": 4, "parallel_residual": False, "qkv_bias": True, "mlp_bias": True},
    "mpt": {"position": "alibi", "alibi_max": 8.0, "clip_qkv": 0.5, "norm": "layer", "norm_bias": False,
            "qkv_bias": False},
    "mpt-6heads": {"position": "alibi", "n_heads": 6, "n_kv_heads": 6},
    "qwen2-padded": {"vocab_size": 320, "qkv_bias": True},
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("families")
    return {f: build_hf_model(base / f, f.split("-")[0], seed=10 + i, **kw)
            for i, (f, kw) in enumerate(FAMILIES.items())}


def reference(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_with_and_without_the_cache(folders, family):
    ref = reference(folders[family])
    lm = ownlm.load(str(folders[family]), dtype="float32")
    ids = torch.randint(3, lm.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
        torch.testing.assert_close(lm.model(ids), want, atol=2e-5, rtol=1e-4)
        for chunks in ([1] * 30, [7, 1, 1, 5, 1, 9, 6]):
            cache = KVCache.for_model(lm.model, 1, 64)
            got, start = [], 0
            for n in chunks:
                cache.length = start + n
                got.append(lm.model(ids[:, start:start + n], torch.arange(start, start + n)[None], cache)[0])
                start += n
            torch.testing.assert_close(torch.cat(got), want[0], atol=2e-5, rtol=1e-4)
    assert want.std() > 0.1


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_export_reloads_to_the_same_logits_and_show_reports_switches(folders, family, tmp_path, capsys):
    out = tmp_path / f"{family}.gguf"
    assert main(["export", str(folders[family]), "--format", "gguf", "--out", str(out), "--quant", "f32"]) == 0
    src = ownlm.load(str(folders[family]), dtype="float32")
    again = ownlm.load(str(out), dtype="float32")
    ids = torch.randint(3, src.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids), src.model(ids), atol=1e-6, rtol=1e-6)
    capsys.readouterr()
    for model in (folders[family], out):
        assert main(["show", str(model), "--json"]) == 0
        cfg = json.loads(capsys.readouterr().out)["config"]
        assert {k: cfg[k] for k in SWITCHES[family]} == SWITCHES[family]
        assert main(["inspect", str(model), "--json"]) == 0  # every tensor listed under the name it loads as
        rows = json.loads(capsys.readouterr().out)["tensors"]
        assert all("std" in r for r in rows)
        assert sum(r["parameters"] for r in rows) == sum(p.numel() for p in src.model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_run_matches_transformers_generate(folders, family, capsys):
    ref = reference(folders[family])
    prompt = "The quick brown fox"
    capsys.readouterr()
    assert main(["run", str(folders[family]), prompt, "--raw", "--json", "--temperature", "0", "--max-tokens", "12",
                 "--dtype", "float32"]) == 0
    got = json.loads(capsys.readouterr().out)
    ids = torch.tensor([ownlm.load(str(folders[family]), dtype="float32").encode(prompt)])
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert got["token_ids"] == want[: len(got["token_ids"])] and got["token_ids"]


@pytest.mark.parametrize("family", ["falcon", "mpt"])
def test_layer_norm_epsilon_is_read_as_these_configs_name_it(folders, family, tmp_path):
    """Falcon's and MPT's config.json name it layer_norm_epsilon (no rms_norm_eps): set to 1e-2 it
    is what ownlm's norms use, so the logits are transformers' own."""
    import shutil

    folder = shutil.copytree(folders[family], tmp_path / family)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("rms_norm_eps", None)
    cfg["layer_norm_epsilon"] = 1e-2
    (folder / "config.json").write_text(json.dumps(cfg))
    lm = ownlm.load(str(folder), dtype="float32")
    assert lm.config.norm_eps == 1e-2
    ids = torch.randint(3, lm.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids), reference(folder)(ids).logits, atol=2e-5, rtol=1e-4)


def test_moe_routes_each_token_to_its_top_experts(folders):
    """The MoE layer equals a dense reference: every expert run on every token, weighted by the
    renormalized top-2 of the router's softmax."""
    lm = ownlm.load(str(folders["mixtral"]), dtype="float32")
    moe = lm.model.layers[0].mlp
    x = torch.randn(2, 5, lm.config.dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        probs = moe.router(x).softmax(-1)
        top, idx = probs.topk(2, dim=-1)
        gate = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        dense = sum(gate[..., e:e + 1] * moe.experts[e](x) for e in range(4))
        torch.testing.assert_close(moe(x), dense, atol=1e-5, rtol=1e-5)


def test_unknown_architecture_names_the_supported_ones(tmp_path):
    from ownlm.errors import ModelFormatError
    from ownlm.model.config import from_hf

    with pytest.raises(ModelFormatError) as e:
        from_hf({"model_type": "rwkv"})
    assert "'rwkv' is not supported" in e.value.message
    for fam in ("gpt_neox", "mixtral", "phi3", "qwen3", "llama"):
        assert fam in e.value.hint


def test_phi3_longrope_switches_factors_past_the_original_context(tmp_path):
    """Phi-3's longrope: short factors while a sequence fits the original context, long factors
    (and the attention factor) beyond it; the GGUF export keeps both factor sets."""
    r = torch.Generator().manual_seed(3)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16,
            "short_factor": (1 + torch.rand(8, generator=r)).tolist(),
            "long_factor": (2 + 3 * torch.rand(8, generator=r)).tolist()}
    folder = build_hf_model(tmp_path / "phi3", "phi3", seed=5, pad_token_id=0, bos_token_id=1,
                            max_position_embeddings=256, original_max_position_embeddings=16, rope_parameters=rope)
    ref = reference(folder)
    lm = ownlm.load(str(folder), dtype="float32")
    assert lm.config.rope_scaling.kind == "longrope" and lm.config.rope_scaling.attention_factor > 1
    out = tmp_path / "phi3.gguf"
    assert main(["export", str(folder), "--format", "gguf", "--out", str(out), "--quant", "f32"]) == 0
    again = ownlm.load(str(out), dtype="float32")
    for n in (10, 30):  # within and past the original 16 positions
        ids = torch.randint(3, lm.config.vocab_size, (1, n), generator=r)
        with torch.no_grad():
            want = ref(ids).logits
            torch.testing.assert_close(lm.model(ids), want, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(again.model(ids), want, atol=2e-5, rtol=1e-4)


def test_tuning_a_family_without_adapter_support_is_refused_up_front(folders, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    assert main(["tune", str(folders["falcon"]), "--data", str(data), "--name", "f"]) == 2
    assert "LoRA adapters for falcon models are not supported yet" in capsys.readouterr().err
    assert main(["tune", str(folders["gemma3_text"]), "--data", str(data), "--name", "g", "--method", "full"]) == 2


# The same tiny model as an HF folder and as the GGUF llama.cpp's converter makes of it (under its
# own architecture name, Gemma's norms as 1 + w, GPT-NeoX's q/k/v regrouped into blocks)
SAME_MODEL = {
    "gemma3_text": ("gemma3", dict(head_dim=16, query_pre_attn_scalar=16, num_hidden_layers=6, sliding_window=6,
                                   hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)),
    "gpt_neox": ("gptneox", dict(rotary_pct=0.25, num_key_value_heads=4, layer_norm_eps=1e-5)),
}


@pytest.mark.parametrize("family", SAME_MODEL)
def test_hf_folder_and_llama_cpp_gguf_of_one_model_diff_to_zero(family, tmp_path):
    """Both files load as one architecture with the same tensors, so `ownlm diff` reports ~0 for
    every tensor, and they run to the same logits."""
    from safetensors.numpy import load_file

    from ownlm.inspect import diff_models

    from .ggufs import hf_folder_to_gguf

    arch, overrides = SAME_MODEL[family]
    folder = build_hf_model(tmp_path / family, family, seed=7, **overrides)
    path = hf_folder_to_gguf(folder, tmp_path / f"{family}.gguf", arch=arch)
    d = diff_models(str(folder), str(path))
    assert d["architecture"] == family
    assert d["summary"]["tensors"] == len(load_file(str(folder / "model.safetensors")))
    for row in d["tensors"]:  # float32 rounding of (1 + w) - 1 at most
        assert row["relative_change"] < 1e-6 and row["cosine"] > 1 - 1e-12, row
    src, again = ownlm.load(str(folder), dtype="float32"), ownlm.load(str(path), dtype="float32")
    ids = torch.randint(3, src.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids), src.model(ids), atol=1e-5, rtol=1e-5)


def test_family_records_are_consistent():
    """One record per spelling; every family has a GGUF name, which loads back as a family that
    writes the same name; full fine-tuning needs the HF export; every layout's export inverts its load."""
    import numpy as np

    from ownlm.formats import keymaps
    from ownlm.model.config import ModelConfig
    from ownlm.model.families import FAMILIES, lookup

    spellings = [n for f in FAMILIES for n in (f.name, *f.aliases)]
    assert len(spellings) == len(set(spellings))
    for f in FAMILIES:
        assert lookup(f.gguf_arch).gguf_arch == f.gguf_arch
        assert "full" not in f.tuning or f.hf_class
        assert set(f.hf_layout + f.gguf_layout) <= set(keymaps.LAYOUTS)
    cfg = ModelConfig("falcon", vocab_size=8, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=8,
                      norm_offset=1.0)
    shapes = {"layers.0.attn.q.weight": (64, 3), "layers.0.attn.k.bias": (32,), "layers.0.attn.qkv.weight": (128, 3),
              "layers.0.attn_norm.weight": (64,)}
    tried = set()
    for ours, shape in shapes.items():
        w = np.random.default_rng(0).normal(size=shape)
        for name, layout in keymaps.LAYOUTS.items():
            if ours.endswith(layout.suffixes):
                mine = layout.load(w, ours, cfg)
                assert not np.array_equal(mine, w)
                np.testing.assert_allclose(layout.save(mine, ours, cfg), w, rtol=0, atol=1e-12)
                tried.add(name)
    assert tried == set(keymaps.LAYOUTS)


def test_a_gguf_says_how_its_text_is_split_and_ownlm_splits_it_so(folders, tmp_path):
    """tokenizer.ggml.pre "default" (or none) is llama.cpp's default split (punctuation runs, then
    GPT-2's pieces, then digit runs, cut into threes), not GPT-2's; the pieces below are those under
    which llama-cpp-python 0.3.36 gave the same token ids as ownlm, for both names (checked on these
    texts and three more when this was written). An export of a GPT-2 tokenizer says "gpt-2"."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from ownlm.formats import tokenizer as tok_formats

    def pieces(name: str, text: str) -> list[str]:
        t = Tokenizer(models.BPE())
        t.pre_tokenizer = pre_tokenizers.Sequence(tok_formats.PRE_TOKENIZERS[name]())
        return [p for p, _ in t.pre_tokenizer.pre_tokenize_str(text)]

    text = "fox 12345 jumps!!! (c) + 3"
    assert pieces("default", text) == ["fox", "Ġ", "123", "45", "Ġjumps", "!!!", "Ġ", "(", "c", ")", "Ġ", "+", "Ġ",
                                       "3"]
    assert pieces("gpt-2", text) == ["fox", "Ġ12345", "Ġjumps", "!!!", "Ġ(", "c", ")", "Ġ+", "Ġ3"]
    out = tmp_path / "llama.gguf"
    assert main(["export", str(folders["qwen2-padded"]), "--format", "gguf", "--out", str(out), "--quant", "f32"]) == 0
    assert GGUFFile(out).metadata["tokenizer.ggml.pre"] == "gpt-2"

"""ownlm inspect: statistics equal numpy's on the file's own values, the memory estimate follows
from config.json, every documented JSON field is there, bad input is one line."""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ownlm.inspect import inspect_model

from .conftest import copy_model
from .ggufs import hf_folder_to_gguf

CARD = {"name", "source", "digest", "format", "architecture", "parameters", "parameters_by_component",
        "context_length", "vocab_size", "quantization", "quantization_mix", "license", "chat_template", "config",
        "weight_bytes"}
MEMORY = {"ctx", "batch", "quant", "weights_bytes", "kv_cache_bytes", "total_bytes"}
TENSOR = {"name", "file_name", "shape", "type", "bytes", "mean", "std", "absmax", "norm", "zeros", "parameters",
          "requant_error", "rounding_noise"}


def numpy_stats(a: np.ndarray) -> dict[str, float]:
    a = a.astype(np.float64).ravel()
    return {"mean": a.mean(), "std": a.std(), "absmax": np.abs(a).max(), "norm": np.linalg.norm(a),
            "zeros": float(np.mean(a == 0))}


@pytest.fixture
def zeroed(hf_models, tmp_path):
    """The tiny Llama with 30% of one weight's entries set to exactly zero."""
    folder = copy_model(hf_models["llama"], tmp_path / "zeroed")
    tensors = {k: v.copy() for k, v in load_file(str(folder / "model.safetensors")).items()}
    w = tensors["model.layers.1.mlp.up_proj.weight"]
    w.ravel()[: int(0.3 * w.size)] = 0
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_statistics_equal_numpy_on_safetensors(zeroed):
    info = inspect_model(str(zeroed), ctx=100, batch=3)
    raw = load_file(str(zeroed / "model.safetensors"))
    assert {t["file_name"] for t in info["tensors"]} == set(raw)
    for t in info["tensors"]:
        assert set(t) == TENSOR
        want = numpy_stats(raw[t["file_name"]])
        for key, value in want.items():
            assert t[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (t["name"], key)
        assert t["shape"] == list(raw[t["file_name"]].shape) and t["bytes"] == raw[t["file_name"]].nbytes
    up = next(t for t in info["tensors"] if t["file_name"] == "model.layers.1.mlp.up_proj.weight")
    assert up["zeros"] == pytest.approx(0.3, abs=1e-3)
    assert set(info["model"]) == CARD and set(info["memory"]) == MEMORY
    assert sum(info["model"]["parameters_by_component"].values()) == info["model"]["parameters"]
    cfg = json.loads((zeroed / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    kv = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 4 * 100 * 3
    assert info["memory"]["kv_cache_bytes"] == kv
    assert info["memory"]["total_bytes"] == kv + sum(a.nbytes for a in raw.values())
    as_int4 = inspect_model(str(zeroed), quant="int4")["memory"]
    assert as_int4["weights_bytes"] == int(info["model"]["parameters"] * (0.5 + 4 / 32))


def test_statistics_equal_numpy_on_gguf(hf_models, tmp_path):
    path = hf_folder_to_gguf(hf_models["llama"], tmp_path / "q8.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    info = inspect_model(str(path))
    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    for t in info["tensors"]:
        rt = by_name[t["file_name"]]
        values = gguf.quants.dequantize(rt.data, rt.tensor_type)  # Q/K rows come permuted: same statistics
        want = numpy_stats(values)
        for key, value in want.items():
            assert t[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (t["name"], key)
        assert t["type"] == rt.tensor_type.name and t["bytes"] == int(rt.n_bytes)
    assert info["model"]["quantization"] == "Q8_0"


def test_cli_json_and_errors(hf_models, ownlm_home):
    ok = subprocess.run([sys.executable, "-m", "ownlm.cli.main", "inspect", str(hf_models["llama"]), "--json"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert set(json.loads(ok.stdout)) == {"model", "memory", "tensors"}
    table = subprocess.run([sys.executable, "-m", "ownlm.cli.main", "inspect", str(hf_models["llama"])],
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and "layers.1.mlp.up.weight" in table.stdout and "KV cache" in table.stdout
    for bad in (["/nonexistent/model.gguf"], ["absent-model"], [str(hf_models["llama"]), "--batch", "0"]):
        r = subprocess.run([sys.executable, "-m", "ownlm.cli.main", "inspect", *bad], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr


def test_diff_with_itself_is_zero_and_a_perturbed_tensor_comes_first(hf_models, tmp_path):
    from ownlm.inspect import diff_models

    same = diff_models(str(hf_models["llama"]), str(hf_models["llama"]))
    assert same["summary"]["changed"] == 0
    assert all(r["relative_change"] == 0 and r["cosine"] == pytest.approx(1.0, abs=1e-12) for r in same["tensors"])
    folder = copy_model(hf_models["llama"], tmp_path / "perturbed")
    tensors = {k: v.copy() for k, v in load_file(str(folder / "model.safetensors")).items()}
    key = "model.layers.0.self_attn.v_proj.weight"
    original = tensors[key].astype(np.float64)
    rng = np.random.default_rng(0)
    tensors[key] = (tensors[key] + rng.normal(0, 0.05, tensors[key].shape)).astype(tensors[key].dtype)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    d = diff_models(str(hf_models["llama"]), str(folder))
    first = d["tensors"][0]
    assert first["name"] == "layers.0.attn.v.weight" and d["summary"]["changed"] == 1
    changed = tensors[key].astype(np.float64)
    assert first["relative_change"] == pytest.approx(np.linalg.norm(changed - original) / np.linalg.norm(original),
                                                     rel=1e-9)
    cos = float((changed * original).sum() / (np.linalg.norm(changed) * np.linalg.norm(original)))
    assert first["cosine"] == pytest.approx(cos, rel=1e-9)
    quantized = diff_models(str(hf_models["llama"]), str(hf_folder_to_gguf(hf_models["llama"], tmp_path / "q8.gguf",
                                                                           qtype=gguf.GGMLQuantizationType.Q8_0)))
    assert quantized["summary"]["changed"] > 0 and quantized["summary"]["min_cosine"] > 0.999


def test_diff_of_incompatible_models_is_one_line(hf_models, ownlm_home):
    r = subprocess.run([sys.executable, "-m", "ownlm.cli.main", "diff", str(hf_models["llama"]),
                        str(hf_models["qwen2"])], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    ok = subprocess.run([sys.executable, "-m", "ownlm.cli.main", "diff", str(hf_models["llama"]),
                         str(hf_models["llama"]), "--json"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and set(json.loads(ok.stdout)) == {"a", "b", "architecture", "summary", "tensors"}


def test_quantization_errors_of_q4_0_against_the_source(hf_models, tmp_path):
    """Blocks written by gguf's reference quantizer requantize to themselves; the rounding-noise
    estimate from each block's step matches the real error against the source weights; blocks
    that use only part of their range are caught by the requantization error."""
    from .ggufs import llama_cpp_permute

    Q = gguf.GGMLQuantizationType
    folder = hf_models["llama"]
    path = hf_folder_to_gguf(folder, tmp_path / "q4.gguf", qtype=Q.Q4_0)
    src = load_file(str(folder / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    reader = gguf.GGUFReader(str(path))
    info = {t["file_name"]: t for t in inspect_model(str(path))["tensors"]}
    checked = 0
    for hf_name, w in src.items():
        rt = next(t for t in reader.tensors if info[t.name]["name"] == _ours(hf_name))
        row = info[rt.name]
        if rt.tensor_type != Q.Q4_0:
            assert row["requant_error"] is None and row["rounding_noise"] is None
            continue
        w = w.astype(np.float64)
        if hf_name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, cfg["num_attention_heads"])
        elif hf_name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, cfg["num_key_value_heads"])
        deq = gguf.quants.dequantize(rt.data, Q.Q4_0).astype(np.float64)
        actual = np.linalg.norm(deq - w) / np.linalg.norm(deq)
        assert row["requant_error"] < 1e-6
        assert row["rounding_noise"] == pytest.approx(actual, rel=0.25), hf_name
        checked += 1
    assert checked >= 7

    # squeeze one tensor's levels from -8..7 to -6..5: valid blocks, but not what the quantizer writes
    from ownlm.inspect import requant_error
    import torch

    rt = next(t for t in reader.tensors if t.tensor_type == Q.Q4_0)
    raw = np.array(rt.data, dtype=np.uint8).reshape(-1, 18).copy()
    nib = np.stack([raw[:, 2:] & 0x0F, raw[:, 2:] >> 4])
    nib = (8 + (nib.astype(np.int16) - 8) * 3 // 4).astype(np.uint8)
    raw[:, 2:] = nib[0] | (nib[1] << 4)
    squeezed = gguf.quants.dequantize(raw.reshape(np.array(rt.data).shape), Q.Q4_0)
    again = gguf.quants.dequantize(gguf.quants.quantize(squeezed, Q.Q4_0), Q.Q4_0)
    want = np.linalg.norm(again - squeezed) / np.linalg.norm(squeezed)
    assert want > 0.01
    assert requant_error(torch.from_numpy(squeezed), "Q4_0") == pytest.approx(want, rel=1e-5)


def _ours(hf_name: str) -> str:
    from ownlm.formats import keymaps
    from ownlm.model.families import lookup

    return keymaps.from_hf_name(hf_name, lookup("llama"))


def test_plots_are_written_atomically_and_bad_paths_refused(hf_models, tmp_path, ownlm_home):
    cli = [sys.executable, "-m", "ownlm.cli.main"]
    fig = tmp_path / "inspect.png"
    r = subprocess.run([*cli, "inspect", str(hf_models["llama"]), "--plot", str(fig), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["plot"] == str(fig) and fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = tmp_path / "diff.svg"
    q8 = hf_folder_to_gguf(hf_models["llama"], tmp_path / "q8.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    r = subprocess.run([*cli, "diff", str(hf_models["llama"]), str(q8), "--plot", str(svg)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "<svg" in svg.read_text() and "layers.0" in svg.read_text()
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".png", ".svg")) == ["diff.svg", "inspect.png"]
    for bad in (tmp_path / "figure.txt", tmp_path / "missing-dir" / "f.png"):
        r = subprocess.run([*cli, "inspect", str(hf_models["llama"]), "--plot", str(bad)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr

"""ownlm inspect: statistics equal numpy's on the file's own values, the memory estimate follows
from config.json, every documented JSON field is there, bad input is one line."""

from __future__ import annotations

import json
import math
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
TENSOR = {"name", "file_name", "shape", "type", "bytes", "mean", "std", "absmax", "norm", "rms", "zeros",
          "parameters", "requant_error", "rounding_noise"}


def numpy_stats(a: np.ndarray) -> dict[str, float]:
    a = a.astype(np.float64).ravel()
    return {"mean": a.mean(), "std": a.std(), "absmax": np.abs(a).max(), "norm": np.linalg.norm(a),
            "rms": np.sqrt(np.mean(a * a)), "zeros": float(np.mean(a == 0))}


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
    # a tensor holding NaN is the most changed: first, counted, and the summary says so
    key2 = "model.layers.1.mlp.up_proj.weight"
    tensors[key2] = tensors[key2].copy()
    tensors[key2][0, 0] = np.nan
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    d = diff_models(str(hf_models["llama"]), str(folder))
    assert d["tensors"][0]["name"] == "layers.1.mlp.up.weight" and math.isnan(d["summary"]["max_relative_change"])
    assert d["tensors"][1]["name"] == "layers.0.attn.v.weight" and d["summary"]["changed"] == 2
    assert d["summary"]["not_numbers"] == 1 and math.isnan(d["summary"]["min_cosine"])


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
    out = json.loads(r.stdout)
    assert out["plot"] == str(fig) and fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and fig.stat().st_size > 10_000
    assert all(t["rms"] > 0 for t in out["tensors"])
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


def legends_clear_of_axes(fig) -> None:
    """Every axes has a legend, drawn inside the figure and over no axes' plotting area."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [ax.get_window_extent(renderer) for ax in fig.axes]
    for ax in fig.axes:
        legend = ax.get_legend()
        assert legend is not None, ax.get_title()
        lb = legend.get_window_extent(renderer)
        assert not any(lb.overlaps(box) for box in boxes), (ax.get_title(), lb, boxes)
        assert fig.bbox.x0 <= lb.x0 and lb.x1 <= fig.bbox.x1 and fig.bbox.y0 <= lb.y0 and lb.y1 <= fig.bbox.y1


def drawn(ax) -> dict[str, np.ndarray]:
    """label -> y values of each line (markers included) the axes draw."""
    return {line.get_label(): np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()}


def test_plot_draws_per_element_rms_with_embedding_and_head(hf_models, tmp_path):
    """A Q4_0 GGUF of the tiny Llama (untied head): the left panel's lines are the per-element RMS
    of each kind by layer, equal to numpy's on the file's dequantized values, with the embedding and
    the head as their own points; the histograms say they show dequantized values and leave empty
    bins out instead of drawing drops to zero; legends sit outside the axes."""
    import matplotlib.pyplot as plt
    from ownlm.plots import inspect_figure

    Q = gguf.GGMLQuantizationType
    path = hf_folder_to_gguf(hf_models["llama"], tmp_path / "q4.gguf", qtype=Q.Q4_0)
    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    samples: dict = {}
    info = inspect_model(str(path), samples=samples)
    rms = {}
    for t in info["tensors"]:
        rt = by_name[t["file_name"]]
        values = gguf.quants.dequantize(rt.data, rt.tensor_type).astype(np.float64)
        rms[t["name"]] = float(np.sqrt(np.mean(values * values)))
        assert t["rms"] == pytest.approx(rms[t["name"]], rel=1e-6), t["name"]
    fig = inspect_figure(info, samples)
    try:
        left, right = fig.axes
        lines = drawn(left)
        layers = json.loads((hf_models["llama"] / "config.json").read_text())["num_hidden_layers"]
        for kind in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down", "attn_norm",
                     "mlp_norm"):
            want = [rms[f"layers.{i}.{kind}.weight"] for i in range(layers)]
            np.testing.assert_allclose(lines[kind], want, rtol=1e-12)
        np.testing.assert_allclose(lines["embed"], [rms["embed.weight"]], rtol=1e-12)
        np.testing.assert_allclose(lines["head"], [rms["lm_head.weight"]], rtol=1e-12)
        assert {"embed", "head"} <= {t.get_text() for t in left.get_xticklabels()}
        assert "RMS" in left.get_ylabel() and "dequantized from Q4_0" in right.get_title()
        steps = [p for p in right.patches if hasattr(p, "get_data")]
        assert steps and all(np.all(np.isnan(v) | (v > 0)) for v in (p.get_data().values for p in steps))
        legends_clear_of_axes(fig)
    finally:
        plt.close(fig)

    # few distinct values (norms all exactly 1): drawn at those values, said so in the legend
    ones = {name: (np.ones_like(v) if name.endswith("norm.weight") else v) for name, v in samples.items()}
    fig = inspect_figure(info, ones)
    try:
        labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
        assert any(label.startswith("norm · F32") and label.endswith("1 distinct") for label in labels), labels
    finally:
        plt.close(fig)


@pytest.mark.smollm2
def test_rms_of_smollm2_equals_torch_and_its_tied_head_is_said_tied(smollm2_gguf, tmp_path):
    """The real Q4_1 / Q8_0 file: each tensor's RMS equals torch's sqrt(mean(w²)) on the values the
    gguf package dequantizes; the head is tied, so the plot says so instead of drawing it twice."""
    import matplotlib.pyplot as plt
    import torch
    from ownlm.plots import inspect_figure

    samples: dict = {}
    info = inspect_model(str(smollm2_gguf), samples=samples)
    by_name = {t.name: t for t in gguf.GGUFReader(str(smollm2_gguf)).tensors}
    assert "lm_head.weight" not in {t["name"] for t in info["tensors"]} and info["model"]["config"]["tie_embeddings"]
    last = info["model"]["config"]["n_layers"] - 1
    checked = [t for t in info["tensors"] if not t["name"].startswith("layers.")
               or t["name"].startswith(("layers.0.", f"layers.{last}."))]  # every kind, Q4_1, Q8_0 and F32
    assert len(checked) == 2 + 2 * 9
    for t in checked:
        rt = by_name[t["file_name"]]
        w = torch.from_numpy(np.array(gguf.quants.dequantize(rt.data, rt.tensor_type)))
        assert t["rms"] == pytest.approx(float(torch.sqrt((w.float() ** 2).mean())), rel=1e-5), t["name"]
    fig = inspect_figure(info, samples)
    try:
        left, right = fig.axes
        lines = drawn(left)
        assert "embed" in lines and "head" not in lines
        assert any("tied" in text.get_text() for text in left.texts)
        assert "dequantized from Q4_1, Q8_0" in right.get_title()
        legends_clear_of_axes(fig)
        fig.savefig(tmp_path / "smollm2.png")
        assert (tmp_path / "smollm2.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        plt.close(fig)

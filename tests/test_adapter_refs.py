"""BASE+ADAPTER as MODEL on every verb (`serve`, `diff`, `inspect`) and route, and the PEFT export's
base_model_name_or_path that `peft.AutoPeftModelForCausalLM` loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
import torch

import server_util
from test_housekeeping import _tune, bad, ok


@pytest.fixture
def tuned(hf_models, capsys, tmp_path):
    """tiny (imported from a local HF folder) and `ad`, an adapter trained on it."""
    ok(capsys, "import", str(hf_models["llama"]), "--name", "tiny")
    _tune(capsys, tmp_path, "tiny", "ad")
    return hf_models["llama"]


def test_diff_and_inspect_take_base_plus_adapter(tuned, capsys):
    d = ok(capsys, "diff", "tiny", "tiny+ad", "--json")
    assert d["a"] == "tiny:latest" and d["b"] == "tiny:latest+ad:latest"
    changed = {r["name"] for r in d["tensors"] if r["relative_change"] > 0}
    assert changed and all(".attn." in n or ".mlp." in n for n in changed), changed
    assert ok(capsys, "diff", "tiny", "ad", "--json")["summary"] == d["summary"]  # an adapter by its own name
    assert ok(capsys, "diff", "tiny", "tiny", "--json")["summary"]["changed"] == 0
    card = ok(capsys, "inspect", "tiny+ad", "--json")
    assert card["model"]["name"] == "tiny:latest+ad:latest"
    assert "tiny" in bad(capsys, "diff", "tiny", "tiny+tiny")  # a model after +, not an adapter
    shown = ok(capsys, "show", "tiny+ad", "--json")
    assert shown["name"] == "tiny:latest+ad:latest" and shown["kind"] == "adapter"
    assert shown["applied_to"]["digest"] == ok(capsys, "show", "tiny", "--json")["digest"]
    assert "ad:latest" in ok(capsys, "show", "tiny+ad") and "not an adapter" in bad(capsys, "show", "tiny+tiny")


def test_serve_base_plus_adapter(tuned, ownlm_home):
    s = server_util.Server(ownlm_home, ["tiny+ad", "tiny", "--max-loaded", "2"])
    try:
        models = httpx.get(f"{s.base}/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["tiny", "tiny+ad"] and all(m["created"] > 0 for m in models)
        for name in ("tiny+ad", "tiny+ad:latest", "tiny"):
            r = httpx.post(f"{s.base}/v1/chat/completions", timeout=120, json={
                "model": name, "messages": [{"role": "user", "content": "say fox"}], "max_tokens": 2})
            assert r.status_code == 200 and r.json()["choices"], r.text
    finally:
        assert s.stop() == 0
    # a server of the base alone: BASE+ADAPTER with an adapter from the store is served too
    s = server_util.Server(ownlm_home, ["tiny"])
    try:
        def chat(model: str) -> httpx.Response:
            return httpx.post(f"{s.base}/v1/chat/completions", timeout=120, json={
                "model": model, "messages": [{"role": "user", "content": "say fox"}], "max_tokens": 2})

        assert chat("tiny+ad").json()["model"] == "tiny+ad"
        for unknown in ("tiny+nope", "other+ad", "tiny+tiny"):
            r = chat(unknown)
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    finally:
        assert s.stop() == 0


def test_serve_refuses_an_unknown_adapter_at_start(tuned, ownlm_home):
    r = subprocess.run([sys.executable, "-m", "ownlm.cli.main", "serve", "tiny+nope", "--port",
                        str(server_util.free_port())], env={**os.environ, "OWNLM_HOME": str(ownlm_home)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nope" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_peft_export_names_a_base_peft_can_load(tuned, capsys, tmp_path):
    from peft import AutoPeftModelForCausalLM

    out = tmp_path / "ad-peft"
    ok(capsys, "export", "ad", "--format", "peft", "--out", str(out))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tuned.resolve())  # the HF folder tiny was imported from
    model = AutoPeftModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size
    ok(capsys, "export", "tiny+ad", "--format", "peft", "--out", str(tmp_path / "b"), "--base", "org/repo")
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/repo"

"""`ownlm run`: one-shot from the words after MODEL or stdin, --json, --raw, the default answer cap, and the
chat REPL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

import ownlm
from conftest import build_hf_model
from ownlm.cli import run as run_cli
from ownlm.cli.main import main
from ownlm.engine.generate import DEFAULT_MAX_TOKENS


def cli(*args, input=None):
    return subprocess.run([sys.executable, "-m", "ownlm.cli.main", *args], capture_output=True, text=True,
                          input=input, env=os.environ.copy(), timeout=600)


def test_run_json_matches_python_api(hf_models):
    folder = str(hf_models["llama"])
    r = cli("run", folder, "The quick brown", "--json", "--temperature", "0", "--max-tokens", "8", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= {"text", "token_ids", "finish_reason", "usage", "timings"}
    want = ownlm.load(folder, dtype="float32").chat([{"role": "user", "content": "The quick brown"}],
                                                   temperature=0, max_tokens=8)
    assert out["token_ids"] == want.token_ids and out["text"] == want.text
    assert out["usage"]["prompt_tokens"] == want.usage["prompt_tokens"]


def test_run_raw_from_stdin_streams_text(hf_models):
    folder = str(hf_models["llama"])
    r = cli("run", folder, "--raw", "--temperature", "0", "--max-tokens", "8", "--dtype", "float32",
            input="The quick brown")
    assert r.returncode == 0, r.stderr
    want = ownlm.load(folder, dtype="float32").generate("The quick brown", temperature=0, max_tokens=8)
    assert r.stdout == want.text + "\n"


def test_repl_system_reset_bye(hf_models, monkeypatch, capsys):
    lm = ownlm.load(str(hf_models["llama"]), dtype="float32")
    seen = []
    real = lm.chat_prompt
    monkeypatch.setattr(lm, "chat_prompt", lambda msgs: seen.append([m["content"] for m in msgs]) or real(msgs))
    lines = iter(["hello", "again", "/system be terse", "one", "/reset", "two", "/bye", "never"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    args = SimpleNamespace(system=None)
    assert run_cli._repl(lm, args, {"temperature": 0, "max_tokens": 4}) == 0
    assert seen[0] == ["hello"]
    assert seen[1][0] == "hello" and seen[1][-1] == "again" and len(seen[1]) == 3  # history kept
    assert seen[2] == ["be terse", "one"]  # /system sets it and clears history
    assert seen[3] == ["be terse", "two"]  # /reset clears history, keeps the system prompt
    assert len(seen) == 4  # /bye ended the session


def test_run_takes_unquoted_words_with_flags_before_and_after(hf_models):
    folder = str(hf_models["llama"])
    r = cli("run", "--temperature", "0", folder, "--dtype", "float32", "The", "quick", "brown", "--json",
            "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    want = ownlm.load(folder, dtype="float32").chat([{"role": "user", "content": "The quick brown"}],
                                                   temperature=0, max_tokens=8)
    assert out["token_ids"] == want.token_ids and out["usage"] == want.usage


def test_run_double_dash_lets_a_prompt_start_with_a_dash(hf_models):
    folder = str(hf_models["llama"])
    r = cli("run", folder, "--raw", "--json", "--temperature", "0", "--max-tokens", "4", "--dtype", "float32",
            "--", "-5", "degrees", "--is", "cold")
    assert r.returncode == 0, r.stderr
    lm = ownlm.load(folder, dtype="float32")
    want = lm.generate("-5 degrees --is cold", temperature=0, max_tokens=4)
    assert json.loads(r.stdout)["token_ids"] == want.token_ids
    assert json.loads(r.stdout)["usage"]["prompt_tokens"] == len(lm.encode("-5 degrees --is cold"))


@pytest.mark.parametrize("args,stdin,message", [
    ([""], None, "error: the prompt is empty"),
    (["   ", " "], None, "error: the prompt is empty"),
    ([], " \n", "error: the prompt on stdin is empty"),
    (["hi", "--max-tokens", "0"], None, "error: --max-tokens must be at least 1"),
    (["hi", "--max-tokens", "-3"], None, "error: --max-tokens must be at least 1"),
])
def test_run_empty_prompt_or_no_tokens_is_bad_input(hf_models, args, stdin, message):
    r = cli("run", str(hf_models["llama"]), *args, input=stdin)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(message) and lines[1].startswith("hint: "), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_run_caps_the_answer_by_default(hf_models, tmp_path, monkeypatch, capsys):
    help_text = main_help(capsys, "run")
    assert f"default {DEFAULT_MAX_TOKENS}" in " ".join(help_text.split())
    long = ownlm.load(str(build_hf_model(tmp_path / "long", "llama", max_position_embeddings=4096)), dtype="float32")
    ids = long.encode("The quick brown")
    assert run_cli._capped(long, ids, {"temperature": 0}) == {"temperature": 0, "max_tokens": DEFAULT_MAX_TOKENS}
    assert run_cli._capped(long, ids, {"max_tokens": 3000})["max_tokens"] == 3000  # asked for: it wins
    lm = ownlm.load(str(hf_models["llama"]), dtype="float32")
    ids = lm.encode("The quick brown")
    room = lm.config.context_length - len(ids)  # a 256-token context: less room than the default
    assert room < DEFAULT_MAX_TOKENS and run_cli._capped(lm, ids, {})["max_tokens"] == room
    monkeypatch.setattr(run_cli, "DEFAULT_MAX_TOKENS", 3)
    assert main(["run", str(hf_models["llama"]), "The quick brown", "--json", "--temperature", "0",
                 "--dtype", "float32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["usage"]["completion_tokens"] <= 3
    assert out["finish_reason"] == "length" or out["usage"]["completion_tokens"] < 3


def main_help(capsys, verb: str) -> str:
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out

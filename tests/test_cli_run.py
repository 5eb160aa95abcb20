"""`ownlm run`: one-shot from the argument or stdin, --json, --raw, and the chat REPL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import ownlm
from ownlm.cli import run as run_cli


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

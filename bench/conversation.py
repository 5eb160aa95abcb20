"""Conversation benchmark: a chat whose history grows turn by turn, through an HTTP server.

    python bench/conversation.py [--model smollm2] [--turns 10] [--max-tokens 32]

Each turn adds a user message of about 150 tokens (deterministic paragraphs about lighthouses)
and asks for a short greedy answer (--max-tokens); the answer joins the history, so turn N's
prompt is turn N-1's prompt, its answer and the new message. The same conversation runs against
`ownlm serve` (a subprocess on a free port) with its prefix cache (the default) and with
`--cache-mb 0`, and against llama.cpp's server (`python -m llama_cpp.server --cache True`: its
prompt cache in RAM, and the slot's reuse of the context it holds; from bench/.llama-env or
--llama-python, see bench/compare.py) on the same
GGUF file, with as many threads as ownlm. Every request
streams through the official `openai` client: TTFT is the time to the first content token,
tokens/s the answer's tokens after the first over the time after it. One warm-up request with an
unrelated prompt goes first, so turn 1 does not pay for first-use costs.

Prints one JSON object: per server, per turn the prompt tokens, cached prompt tokens (where the
server reports them), TTFT and tokens/s, and ttft_ratio = TTFT of the last turn / TTFT of the
first (the issue's target with the prefix cache: at most 1.5)."""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

TOPIC_WORDS = {
    "subject": ["the keeper", "the old lens", "the tower", "the supply boat", "the fog signal", "the logbook",
                "the relief crew", "the lamp room", "the island", "the harbour master"],
    "verb": ["watched", "recorded", "repaired", "described", "guarded", "cleaned", "measured", "remembered",
             "signalled", "outlasted"],
    "object": ["the winter storms", "a passing schooner", "the brass fittings", "the tide tables",
               "the narrow channel", "the oil reserves", "the rocky shoal", "the night watch", "the spiral stairs",
               "a distant beacon"],
    "detail": ["before dawn", "for thirty years", "in the salt wind", "with great patience", "after the gale",
               "by lantern light", "every single evening", "despite the cold", "along the northern coast",
               "while the gulls circled"],
}


def paragraph(turn: int, sentences: int = 9) -> str:
    """About 150 tokens of plain text, the same for a turn on every run."""
    rng = random.Random(1000 + turn)
    out = []
    for _ in range(sentences):
        s = (f"{rng.choice(TOPIC_WORDS['subject']).capitalize()} {rng.choice(TOPIC_WORDS['verb'])} "
             f"{rng.choice(TOPIC_WORDS['object'])} {rng.choice(TOPIC_WORDS['detail'])}.")
        out.append(s)
    return (f"Part {turn} of my notes on the lighthouse: " + " ".join(out)
            + " In one sentence, what stands out in this part?")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], ready: str, log: Path, timeout: float = 600) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(ready, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"{cmd[:4]} did not come up in {timeout} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ask(client: openai.OpenAI, model: str, messages: list[dict], max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first = last = None
    text, pieces, usage = "", 0, None
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first = first if first is not None else now
            last = now
            pieces += 1
            text += chunk.choices[0].delta.content
    tokens = usage.completion_tokens if usage is not None else pieces
    details = getattr(usage, "prompt_tokens_details", None) if usage is not None else None
    cached = getattr(details, "cached_tokens", None) if details is not None else None
    return {"text": text, "prompt_tokens": usage.prompt_tokens if usage is not None else None,
            "cached_tokens": cached, "completion_tokens": tokens,
            "ttft_s": round(first - t0, 4) if first is not None else None,
            "tokens_per_s": round((tokens - 1) / (last - first), 2) if first is not None and last > first else None}


def conversation(base_url: str, model: str, turns: int, max_tokens: int) -> dict:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    ask(client, model, [{"role": "user", "content": "Say hello."}], 4)  # warm-up, unrelated to the chat
    messages: list[dict] = []
    rows = []
    for turn in range(1, turns + 1):
        messages.append({"role": "user", "content": paragraph(turn)})
        r = ask(client, model, messages, max_tokens)
        messages.append({"role": "assistant", "content": r.pop("text")})
        rows.append({"turn": turn, **r})
    a, b = rows[0]["ttft_s"], rows[-1]["ttft_s"]
    return {"turns": rows, "ttft_ratio": round(b / a, 2) if a and b else None}


def run_ownlm(model: str, extra: list[str], turns: int, max_tokens: int, logs: Path) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "ownlm.cli.main", "serve", model, "--port", str(port), *extra]
    proc = start(cmd, f"http://127.0.0.1:{port}/health", logs / f"ownlm-{port}.log")
    try:
        return {"command": "ownlm serve " + " ".join([model, *extra]),
                **conversation(f"http://127.0.0.1:{port}/v1", model, turns, max_tokens)}
    finally:
        stop(proc)


def run_llama_cpp(python: str, gguf: str, turns: int, max_tokens: int, logs: Path) -> dict:
    port = free_port()
    cores = str(os.cpu_count() or 1)  # llama.cpp's server takes half the cores by default; ownlm takes them all
    # --cache: its prompt cache in RAM (states saved after each request, the longest prefix restored),
    # beside the slot's own reuse of the context it holds
    cmd = [python, "-m", "llama_cpp.server", "--model", gguf, "--n_ctx", "4096", "--port", str(port),
           "--host", "127.0.0.1", "--n_threads", cores, "--n_threads_batch", cores, "--cache", "True"]
    proc = start(cmd, f"http://127.0.0.1:{port}/v1/models", logs / f"llama-cpp-{port}.log")
    try:
        return {"command": " ".join(["python -m llama_cpp.server", *cmd[3:]]),
                **conversation(f"http://127.0.0.1:{port}/v1", gguf, turns, max_tokens)}
    finally:
        stop(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--llama-python", help="a Python with llama-cpp-python[server] (default: bench/.llama-env, "
                                           "built when missing, ~5 minutes)")
    ap.add_argument("--no-llama-cpp", action="store_true", help="measure ownlm alone")
    args = ap.parse_args()

    from ownlm import manage

    manifest, files = manage.resolve(args.model)  # a catalog alias is pulled once
    gguf = next((str(p) for name, p in files.items() if name.endswith(".gguf")), None)
    logs = Path(tempfile.mkdtemp(prefix="ownlm-bench-conversation-"))
    result: dict = {"model": args.model, "turns": args.turns, "max_tokens": args.max_tokens,
                    "user_message_tokens": "about 150 per turn", "cpu_count": os.cpu_count(),
                    "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "logs": str(logs)}
    result["ownlm_prefix_cache"] = run_ownlm(args.model, [], args.turns, args.max_tokens, logs)
    result["ownlm_no_cache"] = run_ownlm(args.model, ["--cache-mb", "0"], args.turns, args.max_tokens, logs)
    if args.no_llama_cpp:
        result["llama_cpp"] = "not measured (--no-llama-cpp)"
    elif gguf is None:
        result["llama_cpp"] = f"{args.model} has no GGUF file to give llama.cpp"
    else:
        from compare import llama_python

        result["llama_cpp"] = run_llama_cpp(llama_python(args.llama_python), gguf, args.turns, args.max_tokens, logs)
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    cached = result["ownlm_prefix_cache"]["ttft_ratio"]
    result["target_ttft_ratio_with_cache_at_most_1.5"] = cached is not None and cached <= 1.5
    if isinstance(result["llama_cpp"], dict):  # the last turn's TTFT, ownlm's over llama.cpp's (target: <= 1)
        ours, theirs = (result[k]["turns"][-1]["ttft_s"] for k in ("ownlm_prefix_cache", "llama_cpp"))
        result["last_turn_ttft_ownlm_over_llama_cpp"] = round(ours / theirs, 2) if ours and theirs else None
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

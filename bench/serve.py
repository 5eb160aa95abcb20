"""Serving benchmark: concurrent streaming clients against a real `ownlm serve` process.

    python bench/serve.py [--model smollm2] [--clients 1,4,8,16] [--gen 128] [--activations int16|int8]

For each concurrency level, that many clients start together, each streaming one chat completion
of exactly --gen tokens (end-of-text is masked with logit_bias so every request is the same
length). Levels run round-robin --repeat times. Prints one JSON object: per level the median
aggregate generated tokens/s, p50/p99 time to first token and p50/p99 inter-token latency, and
the ratio of each level's throughput to one client's."""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx

PROMPTS = ["Tell me a story about a lighthouse keeper.", "Explain how a bicycle works.",
           "Write a letter to a friend about the sea.", "Describe your favourite city.",
           "What makes a good cup of tea?", "Give advice to a new gardener.",
           "Describe a day in a bakery.", "Why do people climb mountains?"]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def one_request(base: str, model: str, i: int, n_gen: int, eos_ids: list[int]) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": n_gen, "temperature": 0.7, "seed": i, "stream": True,
            "stream_options": {"include_usage": True}, "logit_bias": {str(t): -100 for t in eos_ids}}
    t0 = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            if data["choices"] and data["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - t0 if stamps else float("nan"),
            "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": tokens, "end": time.perf_counter()}


def level(base: str, model: str, clients: int, n_gen: int, eos_ids: list[int]) -> dict:
    barrier = threading.Barrier(clients)

    def go(i: int) -> dict:
        barrier.wait()
        return one_request(base, model, i, n_gen, eos_ids)

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(go, range(clients)))
    wall = max(r["end"] for r in results) - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    client_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    itl = [x for r in results for x in r["itl"]]
    return {"clients": clients, "tokens": tokens, "wall_s": round(wall, 2),
            "aggregate_tokens_per_s": round(tokens / wall, 2),
            "ttft_p50_s": round(percentile(ttft, 50), 3), "ttft_p99_s": round(percentile(ttft, 99), 3),
            "itl_p50_ms": round(1000 * percentile(itl, 50), 1), "itl_p99_ms": round(1000 * percentile(itl, 99), 1),
            "client_cpu_share": round(client_cpu / wall, 3)}  # of one core, spent by this benchmark's clients


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--max-running", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3, help="rounds over the levels; medians are reported")
    ap.add_argument("--activations", default="int16", choices=("int16", "int8"), help="the server's --activations")
    args = ap.parse_args()
    levels = [int(x) for x in args.clients.split(",")]

    import ownlm
    from ownlm.loading import load

    lm = load(args.model)  # pulls smollm2 on first use; the server itself never pulls
    eos_ids = list(lm.tokenizer.eos_ids)
    del lm
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "ownlm.cli.main", "serve", args.model, "--port", str(port),
                             "--preload", "--max-running", str(args.max_running), "--max-queue", "64",
                             "--activations", args.activations],
                            env={**os.environ, "OWNLM_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        level(base, args.model, 2, 8, eos_ids)  # warm-up
        # the levels run round-robin, --repeat times, and each figure is the median over its runs:
        # this machine's speed drifts by ~15% over minutes, which would otherwise skew the ratios
        runs = {n: [] for n in levels}
        for _ in range(args.repeat):
            for n in levels:
                runs[n].append(level(base, args.model, n, args.gen, eos_ids))
        rows = []
        for n in levels:
            row = {k: statistics.median(r[k] for r in runs[n]) for k in runs[n][0]}
            row["clients"] = n
            row["runs_aggregate_tokens_per_s"] = [r["aggregate_tokens_per_s"] for r in runs[n]]
            rows.append(row)
    finally:
        proc.terminate()
        proc.wait(30)
    single = next((r["aggregate_tokens_per_s"] for r in rows if r["clients"] == 1), None)
    for r in rows:
        r["vs_one_client"] = round(r["aggregate_tokens_per_s"] / single, 2) if single else None
    print(json.dumps({"model": args.model, "gen_tokens": args.gen, "ownlm": ownlm.__version__,
                      "cpu_threads": os.cpu_count(), "levels": rows}, indent=2))


if __name__ == "__main__":
    main()

"""ownlm vs HF transformers vs llama.cpp (llama-cpp-python) on the same GGUF, prompt and thread
count, in one run.

    python bench/compare.py [--model smollm2] [--threads 2] [--prompt-tokens 512] [--gen 128] [--batches 4,8]

llama-cpp-python is a benchmark reference, never a dependency: the script looks for it in
bench/.llama-env (or --llama-python), and creates that environment with
`pip install llama-cpp-python[server]==0.3.36` when it is missing (a source build: ~5 minutes here).
Each engine runs in its own subprocess (so peak RSS is its own) and reports load seconds,
prefill tokens/s, greedy decode tokens/s and peak RSS; ownlm also runs batches of sequences
through its scheduler (aggregate tokens/s including the prompts' prefills, and of the decode
steps alone once every sequence is admitted). One JSON object with every figure and the ratios
ownlm / llama.cpp and ownlm / transformers."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from decode import TEXT, common_args, peak_rss_mb, run_ownlm, run_transformers

HERE = Path(__file__).resolve().parent
LLAMA_ENV = HERE / ".llama-env"
LLAMA_VERSION = "0.3.36"


def run_llama_cpp(path: str, n_prompt: int, n_gen: int, threads: int) -> dict:
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=n_prompt + n_gen + 16, n_threads=threads, n_threads_batch=threads,
                n_batch=512, verbose=False)
    load_s = time.perf_counter() - t0
    ids = llm.tokenize(TEXT.encode(), add_bos=False)[:n_prompt]
    llm.eval(ids[:16])  # warm-up
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    prefill_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(n_gen - 1):
        token = llm.sample(temp=0.0)
        llm.eval([token])
    decode_s = time.perf_counter() - t
    return {"load_s": load_s, "prefill_tokens_per_s": len(ids) / prefill_s,
            "decode_tokens_per_s": (n_gen - 1) / decode_s, "peak_rss_mb": peak_rss_mb(), "threads": threads,
            "version": __import__("llama_cpp").__version__}


def run_ownlm_batches(path: str, n_prompt: int, n_gen: int, batches: list[int]) -> dict:
    """Tokens/s of B sequences through ownlm's continuous-batching scheduler (B x gen tokens over
    the wall time, their prefills included)."""
    from ownlm.evaluate.bench import bench

    out = bench(path, prompt_tokens=n_prompt, gen_tokens=n_gen, batches=tuple(batches))
    res = {}
    for r in out["runs"]:
        if r["batch"] > 1:  # with the B prompts' prefills, and the decode steps alone
            res[f"batch_{r['batch']}_aggregate_tokens_per_s"] = r["aggregate_tokens_per_s"]
            res[f"batch_{r['batch']}_decode_aggregate_tokens_per_s"] = r.get("decode_aggregate_tokens_per_s")
    return res


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def llama_python(explicit: str | None) -> str:
    """A Python that imports llama_cpp: the one given, or bench/.llama-env (built when missing)."""
    if explicit:
        return explicit
    py = LLAMA_ENV / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return str(py)
    print(f"installing llama-cpp-python=={LLAMA_VERSION} into {LLAMA_ENV} (a source build, ~5 minutes)",
          file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(LLAMA_ENV)], check=True)
    env = dict(os.environ)
    if "amx_int8" in _cpu_flags():
        # a native build on a CPU with AMX died with "Illegal instruction" on its server's first request
        # (llama-cpp-python 0.3.36 on an Intel Xeon with AMX, seen here); without AMX it serves
        env["CMAKE_ARGS"] = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
                             "-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF "
                             "-DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF")
    # with the server's extras: bench/conversation.py runs llama.cpp's OpenAI-compatible server from here too
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-cache-dir",
                    f"llama-cpp-python[server]=={LLAMA_VERSION}"], check=True, env=env)
    return str(py)


def child(a) -> None:
    if a.child == "llama.cpp":
        print(json.dumps(run_llama_cpp(a.path, a.prompt_tokens, a.gen, a.threads)))
        return
    import torch

    torch.set_num_threads(a.threads)
    if a.child == "ownlm":
        result = run_ownlm(a.path, a.prompt_tokens, a.gen)
        result.update(run_ownlm_batches(a.path, a.prompt_tokens, a.gen, a.batches))
    else:
        result = run_transformers(a.path, a.prompt_tokens, a.gen)
    print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser()
    common_args(ap)
    ap.add_argument("--batches", default="4,8", help="batch sizes for ownlm's batched decode")
    ap.add_argument("--llama-python", help="a Python with llama_cpp installed (default: bench/.llama-env)")
    ap.add_argument("--skip", default="", help="engines to leave out, comma-separated")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.batches = [int(b) for b in a.batches.split(",") if b.strip()]
    if a.child:
        return child(a)

    from ownlm.manage import resolve

    _, files = resolve(a.model)
    gguf = files.get("model.gguf")
    if gguf is None:
        sys.exit("bench/compare.py compares on a GGUF model")
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    engines = [e for e in ("ownlm", "transformers", "llama.cpp") if e not in skip]
    results = {}
    with tempfile.TemporaryDirectory() as d:  # transformers wants a *.gguf name inside a folder
        link = os.path.join(d, "model.gguf")
        os.symlink(os.path.abspath(gguf), link)
        for engine in engines:
            py = llama_python(a.llama_python) if engine == "llama.cpp" else sys.executable
            env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
            proc = subprocess.run([py, __file__, "--child", engine, "--path", link, "--threads", str(a.threads),
                                   "--prompt-tokens", str(a.prompt_tokens), "--gen", str(a.gen),
                                   "--batches", ",".join(map(str, a.batches))], capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.exit(f"{engine} failed:\n{proc.stderr[-2000:]}")
            results[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
    keys = ("load_s", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_mb")
    o = results.get("ownlm")
    for ref in ("llama.cpp", "transformers"):
        if o and ref in results:
            results[f"ratios_ownlm_over_{ref}"] = {k: round(o[k] / results[ref][k], 3) for k in keys}
    results["setup"] = {"model": a.model, "threads": a.threads, "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen}
    for r in results.values():
        r.update({k: round(v, 3) for k, v in r.items() if isinstance(v, float)})
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

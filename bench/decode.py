"""Decode benchmark: ownlm vs HF transformers on the same GGUF, same thread count, same run.

    python bench/decode.py [--model smollm2] [--threads 2] [--prompt-tokens 512] [--gen 128]

Each engine runs in its own subprocess (so peak RSS is its own) and reports load seconds (ownlm:
the first load from a fresh store, and the second, from its repacked cache),
prefill tokens/s, decode tokens/s (greedy, EOS ignored) and peak RSS; the parent prints one JSON
object with both and the ratios ownlm / transformers."""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

TEXT = ("Owning a language model means running it on your own hardware, where nobody can change its "
        "price, its rules or its availability. ") * 64


def peak_rss_mb() -> float:
    """This process's own peak resident memory in MiB: VmHWM, as `ownlm bench` measures it (ru_maxrss
    starts at the parent's peak in a spawned process). Read here rather than through ownlm: the
    llama.cpp children run in a Python without ownlm."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("/proc/self/status has no VmHWM (the benchmarks need Linux)")


def run_ownlm(path: str, n_prompt: int, n_gen: int) -> dict:
    import torch

    import ownlm
    from ownlm.engine.generate import StepStats, generate_ids
    from ownlm.engine.sampling import SamplingParams

    from ownlm import manage

    # a store of its own (the GGUF linked, not copied): the first load builds the model and writes
    # the repacked cache, the second reads it back
    os.environ["OWNLM_HOME"] = home = tempfile.mkdtemp(prefix="ownlm-bench-")
    atexit.register(shutil.rmtree, home, True)
    manage.import_path(path, name="decode-bench", link=True, quiet=True)
    t0 = time.perf_counter()
    lm = ownlm.load("decode-bench")
    load_s = time.perf_counter() - t0
    del lm
    t0 = time.perf_counter()
    lm = ownlm.load("decode-bench")
    second_load_s = time.perf_counter() - t0
    ids = lm.encode(TEXT)[:n_prompt]
    params = SamplingParams(temperature=0, max_tokens=n_gen)
    stats = StepStats()
    for _ in generate_ids(lm.model, ids[:16], SamplingParams(temperature=0, max_tokens=4), ()):
        pass  # warm-up
    out = list(generate_ids(lm.model, ids, params, (), stats))
    assert len(out) == n_gen
    return {"load_s": load_s, "second_load_s": second_load_s, "prefill_tokens_per_s": len(ids) / stats.prefill_s,
            "decode_tokens_per_s": (n_gen - 1) / stats.decode_s, "peak_rss_mb": peak_rss_mb(),
            "dtype": str(lm.model.dtype), "threads": torch.get_num_threads()}


def run_transformers(path: str, n_prompt: int, n_gen: int) -> dict:
    import torch
    import transformers

    folder, name = os.path.split(path)
    t0 = time.perf_counter()
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    load_s = time.perf_counter() - t0
    ids = torch.tensor([tok.encode(TEXT, add_special_tokens=False)[:n_prompt]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        model.generate(ids[:, :16], attention_mask=mask[:, :16], max_new_tokens=4, do_sample=False)  # warm-up
        t = time.perf_counter()
        model(ids)
        prefill_s = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n_gen, min_new_tokens=n_gen, do_sample=False)
        total = time.perf_counter() - t
    assert out.shape[1] - ids.shape[1] == n_gen
    return {"load_s": load_s, "prefill_tokens_per_s": ids.shape[1] / prefill_s,
            "decode_tokens_per_s": (n_gen - 1) / max(total - prefill_s, 1e-9), "peak_rss_mb": peak_rss_mb(),
            "dtype": str(model.dtype), "threads": torch.get_num_threads()}


def child(engine: str, path: str, n_prompt: int, n_gen: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    fn = run_ownlm if engine == "ownlm" else run_transformers
    print(json.dumps(fn(path, n_prompt, n_gen)))


def common_args(ap: argparse.ArgumentParser) -> None:
    """The options bench/decode.py and bench/compare.py share."""
    ap.add_argument("--model", default="smollm2", help="store name / alias / path of a GGUF")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)


def main() -> None:
    ap = argparse.ArgumentParser()
    common_args(ap)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.path, a.prompt_tokens, a.gen, a.threads)

    from ownlm.manage import resolve

    _, files = resolve(a.model)
    gguf = files.get("model.gguf")
    if gguf is None:
        sys.exit("bench/decode.py compares on a GGUF model")
    with tempfile.TemporaryDirectory() as d:  # transformers wants a *.gguf name inside a folder
        link = os.path.join(d, "model.gguf")
        os.symlink(os.path.abspath(gguf), link)
        results = {}
        for engine in ("ownlm", "transformers"):
            env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
            proc = subprocess.run([sys.executable, __file__, "--child", engine, "--path", link, "--threads",
                                   str(a.threads), "--prompt-tokens", str(a.prompt_tokens), "--gen", str(a.gen)],
                                  capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.exit(f"{engine} failed:\n{proc.stderr[-2000:]}")
            results[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
    o, t = results["ownlm"], results["transformers"]
    results["ratios_ownlm_over_transformers"] = {
        k: round(o[k] / t[k], 3) for k in ("load_s", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_mb")}
    results["setup"] = {"model": a.model, "threads": a.threads, "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen}
    for r in (o, t):
        for k, v in r.items():
            if isinstance(v, float):
                r[k] = round(v, 3)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""GPU check and decode benchmark (run where a CUDA GPU is): prints one JSON object.

    python bench/gpu.py [--gen 128] [--batch 8] [--only tune,int4,...]

Each section's result is printed as soon as it is known (a line `{"section": ...}`), then the
whole report; a section that fails reports its traceback and the others still run.
`--device cpu` runs the same code on a CPU (no graphs, no memory figures): a check of the script.

The sections, in the order they run (`--only` picks some):

- correctness: tiny random Llama and Mistral (sliding window) folders built here: ownlm's fp32
  logits against transformers' on the same GPU (full prompt, and token by token through the KV
  cache); greedy tokens with CUDA graphs equal to those without; the batch scheduler (with
  graphs) gives each sequence the tokens it gets alone.
- serve: `ownlm serve --device cuda` answers concurrent requests as the Python API does alone.
- tune (`ownlm tune`, the same command as on a CPU, here on the GPU): DPO and GRPO with LoRA on a
  tiny random Llama, their first and last logged figures and seconds; `--nproc` beyond the GPUs
  refused clearly, and `--device cpu --nproc 2` (gloo) running beside the GPU.
- int4 (GGUF Q4_0 through PyTorch's int4 kernel): KL against the float32 dequantized model
  beside dense bf16's, greedy tokens with and without graphs, decode tokens/s and weight memory
  against dense bf16.
- speed, a SmolLM2-135M-shaped random Llama in bf16: decode tokens/s of ownlm without and with
  CUDA graphs at batch 1, aggregate tokens/s at --batch through the scheduler, and transformers'
  `generate` (bf16, same prompt and length) in the same run as the reference."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

SMOL = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
            vocab_size=49152)


DEVICE = "cuda"


def graphs(on: bool) -> None:
    os.environ["OWNLM_CUDA_GRAPHS"] = "1" if on else "0"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def correctness(base: Path) -> dict:
    import transformers

    import ownlm
    from ownlm.engine.generate import generate_ids
    from ownlm.engine.graphs import DecodeGraphs
    from ownlm.engine.sampling import SamplingParams
    from ownlm.engine.scheduler import Scheduler, run_all
    from tests.conftest import build_hf_model

    out = {}
    for family, extra in (("llama", {}), ("mistral", {"sliding_window": 8})):
        folder = build_hf_model(base / family, family, seed=2, **extra)
        lm = ownlm.load(str(folder), device=DEVICE, dtype="float32")
        ref = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).to(DEVICE).eval()
        ids = lm.encode("Owning your model means nobody can change its price. " * 3)
        x = torch.tensor([ids], device=DEVICE)
        with torch.inference_mode():
            want = ref(x).logits[0].float()
            got = lm.model(x)[0].float()
        full = float((got - want).abs().max())
        # token by token through ownlm's KV cache, with and without graphs: greedy continuation
        params = SamplingParams(temperature=0, max_tokens=40)
        graphs(False)
        eager = list(generate_ids(lm.model, ids, params))
        graphs(True)
        graphed = list(generate_ids(lm.model, ids, params))
        with torch.inference_mode():
            hf = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=40, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        reqs = [dict(prompt=lm.encode(t * (1 + i % 3)), params=SamplingParams(temperature=0 if i % 2 == 0 else 0.9,
                                                                               seed=i, max_tokens=30), limit=30 - i % 4)
                for i, t in enumerate(["The quick brown fox", "def add(a, b):", "Un café", "Numbers: 0 1 2 3",
                                       "The lazy dog", "print(add(2, 3))"])]
        graphs(False)
        alone = [list(generate_ids(lm.model, r["prompt"], r["params"]))[: r["limit"]] for r in reqs]
        batched = {}
        for on in (False, True):
            graphs(on)
            sched = Scheduler(lm.model, max_running=8, prefill_chunk=7)
            try:
                failures: list[BaseException] = []
                batched[on] = run_all(sched, reqs, failures)
                errors = sorted({repr(e)[:300] for e in failures})
                n_graphs = len(sched.stepper.graphs) if isinstance(sched.stepper, DecodeGraphs) else 0
            finally:
                sched.close()
        greedy = [i for i, r in enumerate(reqs) if r["params"].temperature == 0]
        out[family] = {"prefill_max_abs_logit_diff": full, "greedy_equals_transformers": eager == hf,
                       "graphs_equal_eager": graphed == eager,
                       "batched_eager_equal_alone": batched[False] == alone,
                       "batched_graphs_equal_batched_eager": batched[True] == batched[False],
                       "batched_greedy_equal_alone": all(batched[True][i] == alone[i] for i in greedy),
                       "scheduler_graphs_captured": n_graphs, "scheduler_errors": errors}
    return out


def serve(base: Path) -> dict:
    """`ownlm serve --device cuda`: 6 concurrent greedy chat requests (graphs on) answer what
    `ownlm.load(..., device=DEVICE).chat` answers alone, and a streamed one equals its non-streamed."""
    import concurrent.futures
    import json as _json

    import httpx

    import ownlm
    from ownlm import manage
    from tests.conftest import build_hf_model
    from tests.server_util import Server

    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    home = Path(os.environ["OWNLM_HOME"])
    manage.import_path(build_hf_model(base / "served", "llama", seed=7), name="tiny", quiet=True)
    prompts = ["The quick brown fox", "def add(a, b):", "Un café", "Numbers: 0 1 2 3", "The lazy dog", "Owning"]
    lm = ownlm.load("tiny", device=DEVICE, dtype="float32")
    want = [lm.chat([{"role": "user", "content": p}], temperature=0, max_tokens=24).text for p in prompts]
    server = Server(home, ["tiny", "--device", DEVICE, "--dtype", "float32"])
    try:
        def ask(p: str) -> str:
            r = httpx.post(f"{server.base}/v1/chat/completions", timeout=120, json={
                "model": "tiny", "messages": [{"role": "user", "content": p}], "temperature": 0, "max_tokens": 24})
            r.raise_for_status()
            return r.json()["choices"][0]["message"]["content"]
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            got = list(pool.map(ask, prompts))
        pieces = []
        with httpx.stream("POST", f"{server.base}/v1/chat/completions", timeout=120, json={
                "model": "tiny", "messages": [{"role": "user", "content": prompts[0]}], "temperature": 0,
                "max_tokens": 24, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    delta = _json.loads(line[6:])["choices"][0]["delta"]
                    pieces.append(delta.get("content") or "")
    finally:
        server.stop()
    return {"concurrent_equal_alone": got == want, "stream_equals_alone": "".join(pieces) == want[0],
            "answers": len(got)}


def tune(base: Path) -> dict:
    import subprocess

    from tests.conftest import build_hf_model

    folder = build_hf_model(base / "tunable", "llama", seed=3)
    pairs, prompts = base / "pairs.jsonl", base / "prompts.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is {a} plus {b}?", "chosen": f"{a + b}",
                                         "rejected": f"{a + b + 3}"}) + "\n" for a in range(6) for b in range(6)))
    prompts.write_text("".join(json.dumps({"prompt": f"What is {a} plus {b}?", "answer": str(a + b)}) + "\n"
                               for a in range(4) for b in range(4)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    runs = {"dpo": ["--method", "dpo", "--data", str(pairs), "--max-steps", "30", "--batch-size", "4", "--lr", "5e-3",
                    "--beta", "0.5", "--seq-len", "64", "--device", DEVICE],
            "grpo": ["--method", "grpo", "--data", str(prompts), "--reward", "length", "--target-length", "6",
                     "--group-size", "4", "--max-completion-tokens", "8", "--max-steps", "6", "--batch-size", "4",
                     "--lr", "1e-2", "--device", DEVICE],
            "nproc_over_gpus": ["--method", "dpo", "--data", str(pairs), "--max-steps", "2", "--batch-size", "4",
                                "--nproc", str(max(2, torch.cuda.device_count() + 1) if DEVICE == "cuda" else 2),
                                "--device", DEVICE],
            "cpu_nproc2": ["--method", "dpo", "--data", str(pairs), "--max-steps", "2", "--batch-size", "4",
                           "--seq-len", "64", "--nproc", "2", "--device", "cpu"]}
    out = {}
    for key, args in runs.items():
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "ownlm.cli.main", "tune", str(folder), *args, "--name", key,
                            "--json"], capture_output=True, text=True, env=env, timeout=600)
        res: dict = {"exit": r.returncode, "seconds": round(time.perf_counter() - t0, 1)}
        if r.returncode == 0:
            log = [json.loads(x) for x in (Path(json.loads(r.stdout)["run_dir"]) / "metrics.jsonl").read_text()
                   .splitlines()]
            keep = ("loss", "rewards/margin", "rewards/accuracy", "kl", "reward", "reward/mean")
            res.update(steps=len(log), first={k: v for k, v in log[0].items() if k in keep},
                       last={k: v for k, v in log[-1].items() if k in keep})
        else:
            res["stderr"] = r.stderr[-1500:]
        out[key] = res
    return out


def speed(base: Path, n_gen: int, batch: int) -> dict:
    import transformers

    import ownlm
    from ownlm.engine.generate import StepStats, generate_ids
    from ownlm.engine.sampling import SamplingParams
    from ownlm.engine.scheduler import Scheduler, run_all
    from tests.conftest import build_hf_model

    folder = build_hf_model(base / "smol", "llama", seed=5, **SMOL)
    lm = ownlm.load(str(folder), device=DEVICE, dtype="bfloat16")
    prompt = list(range(10, 10 + 128))
    params = SamplingParams(temperature=0, max_tokens=n_gen)
    res = {"model": "SmolLM2-135M-shaped random Llama, bf16", "prompt_tokens": len(prompt), "gen_tokens": n_gen}

    def decode_rate() -> float:
        best = 0.0
        for _ in range(3):
            stats = StepStats()
            out = list(generate_ids(lm.model, prompt, params, (), stats))
            sync()
            assert len(out) == n_gen
            best = max(best, (n_gen - 1) / stats.decode_s)
        return best

    graphs(False)
    res["ownlm_eager_decode_tok_s"] = decode_rate()
    graphs(True)
    res["ownlm_graphs_decode_tok_s"] = decode_rate()
    for on in (False, True):
        graphs(on)
        sched = Scheduler(lm.model, max_running=batch)
        try:
            reqs = [dict(prompt=prompt[i:], params=params, limit=n_gen) for i in range(batch)]
            run_all(sched, reqs)  # warm-up (and graph capture)
            t0 = time.perf_counter()
            outs = run_all(sched, reqs)
            dt = time.perf_counter() - t0
        finally:
            sched.close()
        res[f"ownlm_{'graphs' if on else 'eager'}_batch{batch}_tok_s"] = sum(map(len, outs)) / dt
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16).to(DEVICE).eval()
    x = torch.tensor([prompt], device=DEVICE)
    best = 0.0
    for _ in range(3):
        with torch.inference_mode():
            sync()
            t0 = time.perf_counter()
            ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=1, do_sample=False, min_new_tokens=1,
                         pad_token_id=0)
            sync()
            t1 = time.perf_counter()
            ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_gen, min_new_tokens=n_gen,
                         do_sample=False, pad_token_id=0)
            sync()
            t2 = time.perf_counter()
        best = max(best, (n_gen - 1) / ((t2 - t1) - (t1 - t0)))  # decode time: minus the prefill
    res["transformers_decode_tok_s"] = best
    res["graphs_over_eager"] = res["ownlm_graphs_decode_tok_s"] / res["ownlm_eager_decode_tok_s"]
    res["graphs_over_transformers"] = res["ownlm_graphs_decode_tok_s"] / best
    return res


def int4(base: Path, n_gen: int) -> dict:
    """GGUF Q4_0 on CUDA: the layers' linears held in PyTorch's int4 layout (tinygemm). A
    SmolLM2-shaped random Llama written as Q4_0: KL of its last-position distributions against
    the float32 dequantized model beside the dense bfloat16 model's; greedy tokens with graphs
    equal to those without; decode tokens/s and weight memory of int4 against dense bfloat16, both
    with CUDA graphs."""
    import gguf

    import ownlm
    from ownlm.engine.generate import StepStats, generate_ids
    from ownlm.engine.sampling import SamplingParams
    from ownlm.model.linear import QuantLinear
    from tests.conftest import build_hf_model
    from tests.ggufs import hf_folder_to_gguf

    folder = build_hf_model(base / "smol4", "llama", seed=6, **SMOL)
    path = hf_folder_to_gguf(folder, base / "smol4.gguf", qtype=gguf.GGMLQuantizationType.Q4_0)
    exact = ownlm.load(str(path), device=DEVICE, dtype="float32", quant="none")
    res: dict = {"model": "SmolLM2-135M-shaped random Llama, GGUF Q4_0"}
    prompt = list(range(10, 10 + 128))
    x = torch.tensor([prompt], device=DEVICE)
    with torch.inference_mode():
        want = exact.model(x)[0].float().log_softmax(-1)
    del exact
    for quant in ("none", "auto"):
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        lm = ownlm.load(str(path), device=DEVICE, dtype="bfloat16", quant=quant)
        key = "int4" if quant == "auto" else "bf16"
        if DEVICE == "cuda":
            res[f"{key}_weights_mb"] = torch.cuda.memory_allocated() / 2 ** 20
        if quant == "auto":
            layers = [m for m in lm.model.modules() if isinstance(m, QuantLinear)]
            res["int4_tinygemm_linears"] = sum(m.layout == "tinygemm" for m in layers)
        with torch.inference_mode():
            got = lm.model(x)[0].float().log_softmax(-1)
        res[f"{key}_kl_vs_float32"] = float((want.exp() * (want - got)).sum(-1).mean())
        params = SamplingParams(temperature=0, max_tokens=n_gen)
        runs = {}
        for on in (False, True):
            graphs(on)
            best, out = 0.0, []
            for _ in range(3):
                stats = StepStats()
                out = list(generate_ids(lm.model, prompt, params, (), stats))
                sync()
                best = max(best, (n_gen - 1) / stats.decode_s)
            runs[on] = out
            res[f"{key}_{'graphs' if on else 'eager'}_decode_tok_s"] = best
        res[f"{key}_graphs_equal_eager"] = runs[True] == runs[False]
        del lm
    res["int4_over_bf16_decode"] = res["int4_graphs_decode_tok_s"] / res["bf16_graphs_decode_tok_s"]
    return res


def main() -> None:
    global DEVICE
    ap = argparse.ArgumentParser()
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--only", default="correctness,serve,tune,int4,speed", help="sections, comma-separated")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here")
    sections = {"correctness": correctness, "serve": serve, "tune": tune, "int4": lambda base: int4(base, args.gen),
                "speed": lambda base: speed(base, args.gen, args.batch)}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("OWNLM_HOME", str(Path(tmp) / "home"))
        report = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE, "torch": torch.__version__}
        for name in args.only.split(","):
            t0 = time.perf_counter()
            try:
                report[name] = sections[name](Path(tmp))
            except Exception:  # noqa: BLE001 - report it beside the other sections
                report[name] = {"error": traceback.format_exc()[-3000:]}
            report[name]["seconds"] = round(time.perf_counter() - t0, 1)
            print(json.dumps({"section": name, **report[name]}), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

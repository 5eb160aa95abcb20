"""Fine-tuning benchmark: ownlm's LoRA vs transformers + peft, same GGUF, data and settings, same run.

    python bench/tune.py [--model smollm2] [--threads 2] [--steps 4] [--rank 8] [--batch 4] [--seq 256]

LoRA r=RANK (alpha 2r, no dropout) on every linear layer, AdamW, batch BATCH x SEQ tokens of the
same text, loss on every token, float32. Each engine runs in its own subprocess (so peak RSS is its
own, load included) and times STEPS optimizer steps after one warm-up step; the parent prints one
JSON object with both and the ratios ownlm / transformers."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEXT = ("Owning a language model means running it on your own hardware, where nobody can change its "
        "price, its rules or its availability. Fine-tuning it on your own data makes it yours. ") * 200


def peak_rss_mb() -> float:
    from ownlm.evaluate.bench import peak_rss_bytes  # this process's own peak, not its parent's

    return peak_rss_bytes() / 2**20


def run_ownlm(path: str, a) -> dict:
    import torch

    from ownlm.tune.data import Row
    from ownlm.tune.run import prepare
    from ownlm.tune.trainer import Plan, Trainer, TuneConfig

    cfg = TuneConfig(rank=a.rank, alpha=2.0 * a.rank, dropout=0.0, batch_size=a.batch, seq_len=a.seq, lr=1e-4,
                     warmup=0.0, max_steps=a.steps + 1)
    lm = prepare(path, cfg, torch.device("cpu"))
    ids = lm.encode(TEXT)[:a.seq]
    rows = [Row(ids, [True] * len(ids), list(range(len(ids))), [0] * len(ids)) for _ in range(a.batch)]
    plan = Plan(rows, [], a.steps + 1, a.batch, None)
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(lm.model, cfg, plan, Path(d), torch.device("cpu"), quiet=True)
        lm.model.train()
        losses = [tr.train_step()["loss"]]  # warm-up
        t0 = time.perf_counter()
        for _ in range(a.steps):
            losses.append(tr.train_step()["loss"])
        dt = time.perf_counter() - t0
    return {"tokens_per_s": a.steps * a.batch * len(ids) / dt, "peak_rss_mb": peak_rss_mb(), "losses": losses}


def run_transformers(path: str, a) -> dict:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    folder, name = os.path.split(path)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    ids = torch.tensor([tok(TEXT, add_special_tokens=False).input_ids[:a.seq]] * a.batch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    losses = [step()]
    t0 = time.perf_counter()
    for _ in range(a.steps):
        losses.append(step())
    dt = time.perf_counter() - t0
    return {"tokens_per_s": a.steps * ids.numel() / dt, "peak_rss_mb": peak_rss_mb(), "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", help="store name / alias / path of a GGUF")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        import torch

        torch.set_num_threads(a.threads)
        print(json.dumps({"ownlm": run_ownlm, "transformers": run_transformers}[a.child](a.path, a)))
        return

    from ownlm.manage import resolve

    _, files = resolve(a.model)
    gguf = files.get("model.gguf")
    if gguf is None:
        sys.exit("bench/tune.py compares on a GGUF model")
    results = {}
    with tempfile.TemporaryDirectory() as d:  # transformers wants a *.gguf name inside a folder
        link = os.path.join(d, "model.gguf")
        os.symlink(os.path.abspath(gguf), link)
        for engine in ("ownlm", "transformers"):
            env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
            proc = subprocess.run([sys.executable, __file__, "--child", engine, "--path", link, "--threads",
                                   str(a.threads), "--steps", str(a.steps), "--rank", str(a.rank), "--batch",
                                   str(a.batch), "--seq", str(a.seq)], capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.exit(f"{engine} failed:\n{proc.stderr[-2000:]}")
            results[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
    o, t = results["ownlm"], results["transformers"]
    results["ratios_ownlm_over_transformers"] = {k: round(o[k] / t[k], 3) for k in ("tokens_per_s", "peak_rss_mb")}
    results["setup"] = {"model": a.model, "threads": a.threads, "steps": a.steps, "rank": a.rank, "batch": a.batch,
                        "seq": a.seq, "dropout": 0.0, "dtype": "float32"}
    for r in (o, t):
        r.update({k: round(v, 3) for k, v in r.items() if isinstance(v, float)})
        r["losses"] = [round(x, 4) for x in r["losses"]]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

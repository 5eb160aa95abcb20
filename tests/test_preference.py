"""Preference tuning (DPO, IPO, ORPO, KTO): data layouts, losses equal to a direct computation from
independently computed log-probabilities (transformers for the reference) and to TRL's (DPO, KTO, ORPO's
odds ratio), the adapter switched off is exactly the base, and `ownlm tune --method dpo` trains, logs rewards
and KL and resumes exactly."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ownlm import manage
from ownlm.loading import load
from ownlm.model import adapters
from ownlm.model.linear import LoRALinear
from ownlm.store.store import Store
from ownlm.tune import checkpoints, objectives
from ownlm.tune.data import DataError, Encoder, load_preferences, to_preference
from ownlm.tune.trainer import Trainer, TuneConfig, make_plan, preference_loss, reference_logps, step_rows

PAIRS = [{"prompt": f"What is {a} plus {b}?", "chosen": f"{a + b}", "rejected": f"{a + b + 3}"}
         for a in range(6) for b in range(6)]


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _model(folder: Path, lora: bool):
    lm = load(str(folder), dtype="float32", quant="none")
    if lora:
        torch.manual_seed(0)
        adapters.attach(lm.model, adapters.parse_targets("all-linear"), 4, 8.0)
        with torch.no_grad():
            for m in lm.model.modules():
                if isinstance(m, LoRALinear):
                    for b in m.lora_b.values():
                        b.normal_(0, 0.2)  # a trained-looking adapter: the policy differs from the base
    return lm


def test_layouts_and_bad_rows(tmp_path):
    u = lambda t: {"role": "user", "content": t}  # noqa: E731
    a = lambda t: {"role": "assistant", "content": t}  # noqa: E731
    assert to_preference({"prompt": "Q", "chosen": "A", "rejected": "B"}, "pairs") == ([u("Q")], [[a("A")], [a("B")]],
                                                                                       None)
    trl = {"chosen": [u("Q"), a("A")], "rejected": [u("Q"), a("B")]}  # TRL's implicit prompt
    assert to_preference(trl, "pairs") == ([u("Q")], [[a("A")], [a("B")]], None)
    assert to_preference({"prompt": [u("Q")], "chosen": [a("A")], "rejected": [a("B")]}, "pairs")[1] == [[a("A")],
                                                                                                        [a("B")]]
    convo = [{"role": "system", "content": "S"}, u("Q")]  # a "messages" prompt, answers as text or as turns
    assert to_preference({"messages": convo, "chosen": "A", "rejected": [a("B")]}, "pairs") == (
        convo, [[a("A")], [a("B")]], None)
    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Q\n\nAssistant: A",
          "rejected": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Q\n\nAssistant: B"}
    assert to_preference(hh, "pairs") == ([u("Hi"), a("Hello"), u("Q")], [[a("A")], [a("B")]], None)
    assert to_preference({"messages": [u("Q")], "completion": "A", "label": False}, "kto") == ([u("Q")], [[a("A")]],
                                                                                               False)
    bad = _write(tmp_path / "p.jsonl", [PAIRS[0], {"prompt": "Q", "chosen": "A"}, PAIRS[1]])
    from conftest import build_tokenizer
    from ownlm.formats.tokenizer import from_hf
    from ownlm.text.chat import ChatTemplate
    from ownlm.text.tokenizer import TextTokenizer

    build_tokenizer(tmp_path)
    spec, template = from_hf({"tokenizer.json": tmp_path / "tokenizer.json",
                              "tokenizer_config.json": tmp_path / "tokenizer_config.json"})
    tok = TextTokenizer(spec)
    enc = Encoder(tok, ChatTemplate(template, tok.bos_token, tok.eos_token))
    with pytest.raises(DataError, match=r"p.jsonl:2: 'rejected' is missing"):
        load_preferences(bad, enc, "pairs", 128)
    prefs = load_preferences(bad, enc, "pairs", 128, skip_bad=True)
    assert len(prefs.items) == 2 and prefs.skipped == ["p.jsonl:2: 'rejected' is missing"]
    kto = _write(tmp_path / "k.jsonl", [{"prompt": "Q", "completion": "A", "label": "yes"}])
    with pytest.raises(DataError, match=r"k.jsonl:1: 'label' must be true or false"):
        load_preferences(kto, enc, "kto", 128)
    # targets: the completion and its end of turn only, the prompt shared by both sequences
    pair = load_preferences(bad, enc, "pairs", 128, skip_bad=True).items[0]
    ids = lambda t: enc.tok.tk.encode(t, add_special_tokens=False).ids  # noqa: E731
    prompt = ids("<|im_start|>user\nWhat is 0 plus 0?<|im_end|>\n<|im_start|>assistant\n")
    assert pair.chosen.ids[:len(prompt)] == pair.rejected.ids[:len(prompt)] == prompt
    assert not any(pair.chosen.mask[:len(prompt)]) and all(pair.chosen.mask[len(prompt):])
    assert pair.chosen.ids[len(prompt):len(prompt) + len(ids("0"))] == ids("0")


def test_disabled_adapter_gives_exactly_the_base(hf_models):
    base = _model(hf_models["llama"], lora=False).model
    tuned = _model(hf_models["llama"], lora=True).model
    ids = torch.tensor([[5, 17, 33, 8, 91, 4, 12]])
    with torch.no_grad():
        want = base(ids)
        assert not torch.equal(tuned(ids), want)
        with adapters.disabled(tuned):
            assert torch.equal(tuned(ids), want)
        assert not torch.equal(tuned(ids), want)  # switched back on


def _hf_logp(model, row) -> float:
    """log p of the row's targets, one sequence at a time, from transformers' full logits."""
    with torch.no_grad():
        logits = model(torch.tensor([row.ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[k, row.ids[k + 1]]) for k in range(len(row.ids) - 1) if row.mask[k + 1])


def _own_logp(model, row) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([row.ids]))[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[k, row.ids[k + 1]]) for k in range(len(row.ids) - 1) if row.mask[k + 1])


def _n(row) -> int:
    return sum(row.mask[1:])


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("objective", ["dpo", "ipo", "orpo", "kto"])
def test_losses_equal_a_direct_computation(hf_models, tmp_path, objective):
    import transformers

    lm = _model(hf_models["llama"], lora=True)
    enc = Encoder(lm.tokenizer, lm.template)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_models["llama"], dtype=torch.float32).eval()
    beta = 0.3
    cfg = TuneConfig(objective=objective, beta=beta)
    cpu = torch.device("cpu")
    if objective == "kto":
        rows = [{"prompt": p["prompt"], "completion": p["chosen" if i % 3 else "rejected"], "label": bool(i % 3)}
                for i, p in enumerate(PAIRS[:5])]
        items = load_preferences(_write(tmp_path / "k.jsonl", rows), enc, "kto", 128).items
        reference_logps(lm.model, items, 2, cpu, None)
        loss, stats = preference_loss(lm.model, items, cfg, cpu, None)
        p = [_own_logp(lm.model, it.row) for it in items]
        r = [_hf_logp(hf, it.row) for it in items]
        for it, ref in zip(items, r):
            assert it.ref == pytest.approx(ref, abs=1e-4)
        z0 = max(0.0, sum(a - b for a, b in zip(p, r)) / len(p))
        want = sum(1 - _sig(beta * (a - b - z0)) if it.label else 1 - _sig(beta * (z0 - (a - b)))
                   for it, a, b in zip(items, p, r))
        assert float(loss.detach()) == pytest.approx(want, rel=1e-4)
        return
    items = load_preferences(_write(tmp_path / "p.jsonl", PAIRS[:5]), enc, "pairs", 128).items
    if objective != "orpo":
        reference_logps(lm.model, items, 2, cpu, None)
    loss, stats = preference_loss(lm.model, items, cfg, cpu, None)
    want, margins = 0.0, []
    for it in items:
        pc, pr = _own_logp(lm.model, it.chosen), _own_logp(lm.model, it.rejected)
        nc, nr = _n(it.chosen), _n(it.rejected)
        if objective == "orpo":
            ac, ar = pc / nc, pr / nr
            log_odds = (ac - ar) - (math.log1p(-math.exp(ac)) - math.log1p(-math.exp(ar)))
            want += -ac - beta * math.log(_sig(log_odds))
            continue
        rc, rr = _hf_logp(hf, it.chosen), _hf_logp(hf, it.rejected)
        assert it.ref == pytest.approx((rc, rr), abs=1e-4)
        if objective == "dpo":
            want += -math.log(_sig(beta * ((pc - rc) - (pr - rr))))
        else:
            want += ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
        margins.append(beta * ((pc - rc) - (pr - rr)))
    assert float(loss.detach()) == pytest.approx(want, rel=1e-4)
    if margins:
        assert stats["rewards/margin"] == pytest.approx(sum(margins), rel=1e-3, abs=1e-5)
        assert stats["rewards/accuracy"] == sum(m > 0 for m in margins)


@pytest.mark.parametrize("objective", ["dpo", "ipo"])
def test_logged_kl_is_the_steps_mean_log_ratio(hf_models, tmp_path, objective):
    """A step's logged `kl` (DPO, IPO): the mean of π - ρ over its chosen and rejected sequences, over both
    micro-batches; π from ownlm's full logits, ρ from transformers' (the base) on the same rows."""
    import transformers

    lm = _model(hf_models["llama"], lora=True)
    cfg = TuneConfig(objective=objective, beta=0.3, max_steps=1, batch_size=2, grad_accum=2, seq_len=128)
    plan = make_plan(cfg, Encoder(lm.tokenizer, lm.template), _write(tmp_path / "p.jsonl", PAIRS[:6]))
    cpu = torch.device("cpu")
    reference_logps(lm.model, plan.rows, 2, cpu, None)  # in float32, as the direct computation
    trainer = Trainer(lm.model, cfg, plan, tmp_path, cpu)
    trainer.amp = None
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_models["llama"], dtype=torch.float32).eval()
    seqs = [r for it in step_rows(plan, 0, cfg.seed) for r in (it.chosen, it.rejected)]
    want = sum(_own_logp(lm.model, r) - _hf_logp(hf, r) for r in seqs) / len(seqs)
    assert len(seqs) == 8 and abs(want) > 0.1  # the adapter moved the policy off the reference
    assert trainer.train_step()["kl"] == pytest.approx(want, rel=1e-4)


def test_supervised_data_flags_are_refused_for_other_methods(capsys):
    from ownlm.cli.main import main

    cases = [("dpo", ["--format", "alpaca"]), ("kto", ["--train-on", "all"]), ("orpo", ["--no-pack"]),
             ("ipo", ["--no-pack"]), ("grpo", ["--no-pack"]), ("grpo", ["--seq-len", "64"]),
             ("grpo", ["--format", "messages"])]
    for method, flag in cases:
        capsys.readouterr()
        assert main(["tune", "nowhere", "--method", method, "--data", "x.jsonl", "--name", "n", *flag]) == 2
        err = capsys.readouterr().err
        assert f"{flag[0]} does not apply to --method {method}" in err and "Traceback" not in err, err


def test_pure_losses_by_hand():
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in (-3.0, -5.0, -4.0, -4.5))
    z = 0.5 * ((-3 + 4) - (-5 + 4.5))
    assert float(objectives.dpo(pc, pr, rc, rr, 0.5)) == pytest.approx(-math.log(_sig(z)))
    assert float(objectives.dpo(pc, pr, rc, rr, 0.5, 0.1)) == pytest.approx(-0.9 * math.log(_sig(z))
                                                                             - 0.1 * math.log(_sig(-z)))
    assert float(objectives.ipo(pc, pr, rc, rr, 0.5)) == pytest.approx((1.5 - 1) ** 2)


def _tune(args: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-m", "ownlm.cli.main", "tune", *args, "--json"], capture_output=True,
                       text=True, env=os.environ)
    assert r.returncode == 0, r.stderr[-2000:]  # what went wrong, not just the exit status
    return json.loads(r.stdout)


def stored_adapter(name: str) -> dict[str, torch.Tensor]:
    """The tensors of the adapter stored under `name`."""
    from safetensors.torch import load_file

    f = Store().read(name)["files"]["adapter_model.safetensors"]["sha256"]
    return load_file(str(Store().open_blob(f)))


def assert_adapters_agree(one: str, two: str) -> None:
    """Two stored adapters from the same training summed in another order (several processes
    against one). AdamW's first steps move each weight by about lr (1e-2) and 1e-4 is 1% of a step;
    but AdamW divides a gradient by its running size, so where a gradient is about 0 its rounding
    sets the step: a rare weight may differ by up to a step per step."""
    a, b = stored_adapter(one), stored_adapter(two)
    assert a.keys() == b.keys() and a
    for k in a:
        d = (b[k] - a[k]).abs()
        assert float((d > 1e-4).float().mean()) < 0.01 and float(d.max()) < 3e-2, (k, float(d.max()))
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)


def test_dpo_cli_trains_logs_rewards_and_resumes_exactly_after_sigkill(hf_models, tmp_path):

    data = _write(tmp_path / "pairs.jsonl", PAIRS)
    common = [str(hf_models["llama"]), "--method", "dpo", "--data", str(data), "--max-steps", "30",
              "--batch-size", "4", "--lr", "5e-3", "--beta", "0.5", "--save-every", "3", "--seq-len", "64",
              "--dropout", "0.1"]
    res = _tune(common + ["--name", "p"])
    log = [json.loads(x) for x in (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 30
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "kl"):
        assert all(key in r for r in log), key
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-6) and log[-1]["kl"] != 0
    assert log[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-6)  # B starts at zero: the policy is the reference
    assert sum(r["rewards/margin"] for r in log[-3:]) / 3 > 0.1
    assert sum(r["loss"] for r in log[-3:]) / 3 < math.log(2)
    assert Store().read("p")["kind"] == "adapter"
    # SIGKILL at a random moment after the first checkpoint; --resume ends on the uninterrupted run's adapter
    proc = subprocess.Popen([sys.executable, "-m", "ownlm.cli.main", "tune", *common, "--name", "r"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ)
    run = Store().root / "runs" / "r-latest"
    deadline = time.time() + 120
    while time.time() < deadline and not checkpoints.complete(run) and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(random.Random(os.getpid()).uniform(0, 0.1))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoints.complete(run), "no checkpoint before the kill"
    assert not Store().has("r")  # it never finished
    again = _tune(common + ["--name", "r", "--resume"])
    assert again["resumed_from"] % 3 == 0 and 0 < again["resumed_from"] < 30

    a, b = stored_adapter("p"), stored_adapter("r")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert resumed == [r["loss"] for r in log]

    # exported as a GGUF, the preference-tuned model keeps its template and stop token and answers as p does
    from gguf import GGUFReader

    from ownlm.cli.main import main

    out = tmp_path / "p.gguf"
    assert main(["export", "p", "--format", "gguf", "--out", str(out), "--quant", "f32"]) == 0
    tuned, again = load("p", dtype="float32", quant="none"), load(str(out), dtype="float32", quant="none")
    ask = [{"role": "user", "content": "What is 2 plus 3?"}]
    assert (again.chat(ask, max_tokens=8, temperature=0).token_ids
            == tuned.chat(ask, max_tokens=8, temperature=0).token_ids)
    fields = GGUFReader(out).fields
    assert fields["tokenizer.chat_template"].contents() == tuned.template.source
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tuned.tokenizer.eos_ids[0]


@pytest.mark.parametrize("method", ["orpo", "kto"])
def test_orpo_and_kto_cli_run(hf_models, tmp_path, method):
    rows = PAIRS if method == "orpo" else [
        {"prompt": p["prompt"], "completion": p["chosen" if i % 2 else "rejected"], "label": bool(i % 2)}
        for i, p in enumerate(PAIRS)]
    data = _write(tmp_path / "d.jsonl", rows)
    res = _tune([str(hf_models["llama"]), "--method", method, "--data", str(data), "--max-steps", "3",
                 "--batch-size", "4", "--seq-len", "64", "--name", method])
    log = [json.loads(x) for x in (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(math.isfinite(r["loss"]) for r in log)
    assert all("rewards/margin" in r for r in log)
    assert all(("kl" in r) == (method == "kto") for r in log)  # ORPO has no reference
    assert res["name"] == f"{method}:latest"


@pytest.mark.parametrize("method", ["dpo", "ipo", "orpo", "kto"])
def test_every_method_trains_full_weights(hf_models, tmp_path, method):
    """--weights full: the reference is the weights before the first step, so that step's loss is
    the loss of a policy equal to its reference (DPO ln 2, IPO (1/(2 beta))^2, KTO 1/2; ORPO has no
    reference); the next step's differs, and the stored model is the trained weights."""
    rows = PAIRS if method != "kto" else [
        {"prompt": p["prompt"], "completion": p["chosen" if i % 2 else "rejected"], "label": bool(i % 2)}
        for i, p in enumerate(PAIRS)]
    data = _write(tmp_path / "d.jsonl", rows)
    res = _tune([str(hf_models["llama"]), "--method", method, "--weights", "full", "--data", str(data),
                 "--max-steps", "2", "--batch-size", "4", "--seq-len", "64", "--lr", "1e-3", "--beta", "0.1",
                 "--name", f"full-{method}"])
    log = [json.loads(x) for x in (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    first = {"dpo": math.log(2), "ipo": (1 / (2 * 0.1)) ** 2, "kto": 0.5}.get(method)
    if first is not None:
        assert log[0]["loss"] == pytest.approx(first, rel=1e-4)
    assert all(math.isfinite(r["loss"]) for r in log) and log[1]["loss"] != log[0]["loss"]
    assert manage.show(f"full-{method}")["kind"] == "model"
    base = load(str(hf_models["llama"]), dtype="float32", quant="none").model.state_dict()
    tuned = load(f"full-{method}", dtype="float32", quant="none").model.state_dict()
    assert any(not torch.equal(base[k], tuned[k]) for k in base)


def _adapter_for_trl(lm, folder: Path):
    """ownlm's adapter written as PEFT files and read back: (the LoraConfig that gives TRL a new adapter of its
    shape, so TRL's reference is the base with it switched off; the tensors then loaded into it)."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    from ownlm.formats import peft
    from ownlm.tune.run import write_adapter

    tensors = {n: p.detach().clone() for n, p in lm.model.named_parameters() if ".lora_" in n}
    folder.mkdir()
    write_adapter(folder, peft.LoraSettings(4, 8.0, 0.0, False, tuple(adapters.parse_targets("all-linear"))),
                  tensors, "tiny")
    settings = json.loads((folder / peft.CONFIG).read_text())
    return (LoraConfig(r=settings["r"], lora_alpha=settings["lora_alpha"], lora_dropout=0.0,
                       target_modules=settings["target_modules"], task_type="CAUSAL_LM"),
            load_file(folder / peft.WEIGHTS))


def _load_adapter(trainer, tensors) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(trainer.model, tensors)
    assert not result.unexpected_keys and tensors


def _padded(rows) -> dict[str, torch.Tensor]:
    """TRL's batch layout of token rows: right-padded ids, attention and completion masks."""
    width = max(len(r.ids) for r in rows)
    pad = lambda xs: xs + [0] * (width - len(xs))  # noqa: E731
    return {"input_ids": torch.tensor([pad(list(r.ids)) for r in rows]),
            "attention_mask": torch.tensor([pad([1] * len(r.ids)) for r in rows]),
            "completion_mask": torch.tensor([pad([int(m) for m in r.mask]) for r in rows])}


def test_dpo_loss_equals_trls(hf_models, tmp_path):
    """The same adapter (written as PEFT and loaded by peft), the same token rows and completion masks: TRL's
    DPOTrainer computes the loss ownlm computes (TRL averages over the pairs, ownlm's sum is per pair)."""
    import datasets
    import transformers
    from trl import DPOConfig, DPOTrainer

    lm = _model(hf_models["llama"], lora=True)
    enc = Encoder(lm.tokenizer, lm.template)
    items = load_preferences(_write(tmp_path / "p.jsonl", PAIRS[:4]), enc, "pairs", 128).items
    cpu, beta = torch.device("cpu"), 0.3
    reference_logps(lm.model, items, 2, cpu, None)
    loss, _ = preference_loss(lm.model, items, TuneConfig(objective="dpo", beta=beta), cpu, None)

    lora, ours = _adapter_for_trl(lm, tmp_path / "adapter")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_models["llama"], dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(hf_models["llama"])
    inputs = _padded([it.chosen for it in items] + [it.rejected for it in items])  # TRL's: chosen, then rejected
    trainer = DPOTrainer(model=hf, processing_class=tok,
                         args=DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, use_cpu=True, report_to=[],
                                        per_device_train_batch_size=4),
                         train_dataset=datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]),
                         peft_config=lora)
    _load_adapter(trainer, ours)
    with torch.no_grad():
        want = trainer.compute_loss(trainer.model, inputs)
    assert abs(float(want) - math.log(2)) > 1e-2  # the policy is not the reference: the adapter counts
    assert float(loss.detach()) / len(items) == pytest.approx(float(want), rel=1e-4)


def test_kto_loss_equals_trls(hf_models, tmp_path):
    """The same adapter, rows and completion masks: TRL's KTOTrainer computes ownlm's KTO loss and KL. TRL
    estimates the KL reference point z0 on mismatched pairs (its KL_input_ids); ownlm on the batch's own rows
    (objectives.py). Given the batch's own rows as its KL rows, TRL's z0 is ownlm's, so the rest is compared."""
    import datasets
    import transformers
    from trl import KTOConfig, KTOTrainer

    lm = _model(hf_models["llama"], lora=True)
    enc = Encoder(lm.tokenizer, lm.template)
    rows = [{"prompt": p["prompt"], "completion": p["chosen" if i % 3 else "rejected"], "label": bool(i % 3)}
            for i, p in enumerate(PAIRS[:6])]
    items = load_preferences(_write(tmp_path / "k.jsonl", rows), enc, "kto", 128).items
    cpu, beta = torch.device("cpu"), 0.3
    reference_logps(lm.model, items, 2, cpu, None)
    loss, stats = preference_loss(lm.model, items, TuneConfig(objective="kto", beta=beta), cpu, None)

    lora, ours = _adapter_for_trl(lm, tmp_path / "adapter")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_models["llama"], dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(hf_models["llama"])
    inputs = _padded([it.row for it in items])
    inputs.update({f"KL_{k}": v for k, v in inputs.items()})
    inputs["label"] = torch.tensor([it.label for it in items])
    trainer = KTOTrainer(model=hf, processing_class=tok,
                         args=KTOConfig(output_dir=str(tmp_path / "trl"), beta=beta, use_cpu=True, report_to=[],
                                        per_device_train_batch_size=len(items)),
                         train_dataset=datasets.Dataset.from_list([{"prompt": "a", "completion": "b", "label": True}]),
                         peft_config=lora)
    _load_adapter(trainer, ours)
    with torch.no_grad():
        want = trainer.compute_loss(trainer.model, inputs)
    kl = trainer._metrics["train"]["kl"][-1]
    assert abs(float(want) - 0.5) > 1e-2  # the policy is not the reference: the adapter counts
    assert float(loss.detach()) / len(items) == pytest.approx(float(want), rel=1e-4)
    assert kl > 0.1  # z0 is not clamped to 0: it moves every row's loss
    assert stats["kl"] / len(items) == pytest.approx(kl, rel=1e-4)


def test_orpo_odds_ratio_equals_trls():
    """ORPO's odds-ratio term against TRL's ORPOTrainer.odds_ratio_loss, a method of log-probabilities that
    reads only the trainer's beta and device, on per-token average log-probabilities down to a confident
    model's (near 0, where 1 - p must not be computed as 1 - exp(log p)). TRL's NLL term differs by design: the
    mean over the batch's prompt and chosen tokens, where ownlm's is each chosen completion's (Hong et al.)."""
    from types import SimpleNamespace

    from trl.experimental.orpo import ORPOTrainer

    avg_c = torch.tensor([-0.3, -1.2, -2.5, -0.05, -1e-4, -2e-6, -3e-8])  # float32, as the trainer's
    avg_r = torch.tensor([-0.9, -0.4, -2.6, -3.0, -1e-3, -5e-7, -0.2])
    lam = 0.3
    trl = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device=torch.device("cpu")))
    ratio, rew_c, rew_r, _, _ = ORPOTrainer.odds_ratio_loss(trl, avg_c, avg_r)  # λ log σ(log odds ratio)
    ours = objectives.orpo(avg_c, avg_r, lam)  # -avg_c - λ log σ(...)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours + avg_c, -ratio, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rew_c - rew_r, lam * (avg_c - avg_r))


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_two_gloo_processes_follow_the_single_process_run(hf_models, tmp_path, method):
    """--nproc 2 (FSDP2 over gloo): each process takes half of every batch and computes a share of
    the reference log-probabilities (exchanged); KTO's KL point is the whole batch's. The logged
    curve (loss and reward statistics, all-reduced) and the adapter equal one process's."""

    rows = PAIRS[::3] if method == "dpo" else [
        {"prompt": p["prompt"], "completion": p["chosen" if i % 2 else "rejected"], "label": bool(i % 2)}
        for i, p in enumerate(PAIRS[::3])]
    data = _write(tmp_path / "d.jsonl", rows)
    common = [str(hf_models["llama"]), "--method", method, "--data", str(data), "--max-steps", "3", "--batch-size",
              "4", "--lr", "1e-2", "--beta", "0.5", "--seq-len", "64", "--dropout", "0"]
    one, two = _tune(common + ["--name", "one"]), _tune(common + ["--name", "two", "--nproc", "2"])
    logs = [[json.loads(x) for x in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
            for r in (one, two)]
    assert len(logs[0]) == len(logs[1]) == 3
    keys = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "tokens", "kl"]
    keys += ["rewards/accuracy"] if method == "dpo" else []
    for key in keys:
        a, b = [r[key] for r in logs[0]], [r[key] for r in logs[1]]
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5), key
    assert abs(logs[0][-1]["loss"] - logs[0][0]["loss"]) > 1e-3  # it trained: not two flat lines compared

    assert_adapters_agree("one", "two")


def test_dpo_with_qlora_trains_on_an_int4_gguf(hf_models, tmp_path):
    """--method dpo --weights qlora: the GGUF's int4 blocks stay int4 (the frozen base is also the
    reference, adapters off) and two steps log finite losses and rewards."""
    import gguf
    from ggufs import hf_folder_to_gguf

    from ownlm.model.linear import QuantLinear
    from ownlm.tune.run import prepare
    from ownlm.tune.trainer import TuneConfig as Config

    path = hf_folder_to_gguf(hf_models["llama"], tmp_path / "q4.gguf", qtype=gguf.GGMLQuantizationType.Q4_0)
    base = prepare(str(path), Config(method="qlora", objective="dpo"), torch.device("cpu")).model.layers[0].attn.qkv
    assert isinstance(base.base, QuantLinear) and base.base.bits == 4
    data = _write(tmp_path / "pairs.jsonl", PAIRS[:8])
    res = _tune([str(path), "--method", "dpo", "--weights", "qlora", "--data", str(data), "--max-steps", "2",
                 "--batch-size", "4", "--lr", "1e-2", "--seq-len", "64", "--name", "q"])
    log = [json.loads(x) for x in (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 2
    for r in log:
        assert all(math.isfinite(r[k]) for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin"))
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # B starts at zero: the policy is the reference
    assert log[1]["loss"] != log[0]["loss"]  # the first step moved the adapter
    assert Store().read("q")["kind"] == "adapter"

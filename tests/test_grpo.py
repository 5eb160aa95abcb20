"""GRPO: group-normalized advantages and the loss equal a direct computation (and TRL's formula),
rollouts through the batch engine are seeded per step, a toy reward is learned, a run killed with
SIGKILL resumes to the same adapter, and rewards (built-in and custom) score and fail clearly."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ownlm.errors import BadRequest
from ownlm.loading import load
from ownlm.store.store import Store
from ownlm.tune import checkpoints, grpo, objectives, rewards
from ownlm.tune.data import DataError, Encoder
from ownlm.tune.run import tune
from ownlm.tune.trainer import TuneConfig

from .test_preference import _model, assert_adapters_agree, stored_adapter

ROWS = [{"prompt": f"What is {a} plus {b}?", "answer": str(a + b)} for a in range(4) for b in range(4)]
ALPHA = "def alpha(prompt, completion, row):\n    return float(completion[:1].isalpha())\n"


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's matmuls are microseconds: on a shared, busy machine two OpenMP threads
    spin-wait far longer than they compute."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _lora(folder: Path):
    return _model(folder, lora=True)  # an adapter with random B: the policy differs from the reference


# -- (1) advantages -----------------------------------------------------------------------------
def test_group_advantages_are_normalized_with_the_sample_std():
    r = np.array([1.0, 0.0, 0.5, 2.0, 3.0, 3.0, 3.0, 3.0, -1.0, 4.0, 0.0, 0.25])
    got = objectives.group_advantages(torch.tensor(r), 4).numpy()
    g = r.reshape(3, 4)
    want = ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.all(got[4:8] == 0)  # a group of equal rewards teaches nothing
    # by hand for the first group: mean 0.875, sample std sqrt(sum((r - m)^2) / 3)
    std = math.sqrt(((1 - .875) ** 2 + .875 ** 2 + .375 ** 2 + 1.125 ** 2) / 3)
    assert got[3] == pytest.approx((2 - 0.875) / (std + 1e-4), rel=1e-12)


# -- (2) the loss -------------------------------------------------------------------------------
def test_clipped_surrogate_and_k3_by_hand():
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0], dtype=torch.float64)
    old = torch.tensor([-1.0, -2.5, -0.1, -3.0], dtype=torch.float64)  # ratios 1, e^0.5, e^-0.4, 1
    ref = torch.tensor([-1.2, -2.0, -0.7, -2.0], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, -2.0, -1.0], dtype=torch.float64)
    loss, clipped = objectives.grpo(logp, old, ref, adv, beta=0.1, clip_eps=0.2)
    kl = [math.exp(r - p) - (r - p) - 1 for r, p in zip(ref.tolist(), logp.tolist())]
    want = [-1.0 + 0.1 * kl[0],  # ratio 1
            -1.2 * 1.0 + 0.1 * kl[1],  # ratio 1.65 > 1.2 with A > 0: clipped to 1.2
            -(0.8 * -2.0) + 0.1 * kl[2],  # ratio 0.67 < 0.8 with A < 0: min(-1.34, -1.6), the clipped -1.6
            1.0 + 0.1 * kl[3]]
    assert loss.tolist() == pytest.approx(want, rel=1e-12)
    assert clipped.tolist() == [False, True, True, False]


def _own_token_logps(model, row) -> list[float]:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([row.ids]))[0].double(), -1)
    return [float(logp[k, row.ids[k + 1]]) for k in range(len(row.ids) - 1) if row.mask[k + 1]]


def test_loss_equals_a_direct_computation_and_trls_formula(hf_models):
    import transformers

    lm = _lora(hf_models["llama"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_models["llama"], dtype=torch.float32).eval()
    enc = Encoder(lm.tokenizer, lm.template)
    prompts = [grpo.Prompt(enc.tok.encode(enc.template.render([{"role": "user", "content": q}], True)), q, {})
               for q in ("What is 2 plus 3?", "Say hi")]
    comps = [[40, 41, 2], [7, 8, 9, 10, 11], [55], [60, 61]]  # two groups of two, of different lengths
    rows = grpo.rows_of(prompts, comps, 2)
    adv = objectives.group_advantages(torch.tensor([1.0, 0.0, 0.3, 0.9]), 2).float()
    beta = 0.3
    lm.model.train()
    loss, stats = grpo.loss(lm.model, rows, adv, torch.device("cpu"), None, 1.0, beta, 0.2)
    n = sum(len(c) for c in comps)
    # directly: per completion token, -A + beta * k3, the reference from transformers (the base)
    want = kl = 0.0
    per_row = []
    for i, row in enumerate(rows):
        lp = _own_token_logps(lm.model, row)
        with torch.no_grad():
            ref_all = torch.log_softmax(hf(torch.tensor([row.ids])).logits[0].double(), -1)
        ref = [float(ref_all[k, row.ids[k + 1]]) for k in range(len(row.ids) - 1) if row.mask[k + 1]]
        assert len(lp) == len(comps[i])
        ks = [math.exp(r - p) - (r - p) - 1 for r, p in zip(ref, lp)]
        want += sum(-float(adv[i]) + beta * k for k in ks)
        kl += sum(ks)
        per_row.append((lp, ref))
    assert float(loss.detach()) == pytest.approx(want, rel=1e-4)
    assert stats["kl"] == pytest.approx(kl, rel=1e-3)
    assert stats["clipped"] == 0
    # TRL's GRPOTrainer._compute_loss on padded (B, T) tensors, loss_type "dapo"/"bnpo" on one process
    T = max(len(c) for c in comps)
    per_token_logps = torch.zeros(4, T, dtype=torch.float64)
    ref_per_token_logps = torch.zeros(4, T, dtype=torch.float64)
    mask = torch.zeros(4, T, dtype=torch.float64)
    for i, (lp, ref) in enumerate(per_row):
        per_token_logps[i, :len(lp)] = torch.tensor(lp)
        ref_per_token_logps[i, :len(ref)] = torch.tensor(ref)
        mask[i, :len(lp)] = 1
    per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
    old_per_token_logps = per_token_logps.detach()
    coef_1 = torch.exp(per_token_logps - old_per_token_logps)
    coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + 0.2)
    advantages = adv.double()
    per_token_loss = -torch.min(coef_1 * advantages[:, None], coef_2 * advantages[:, None]) + beta * per_token_kl
    trl = float((per_token_loss * mask).sum() / mask.sum())
    assert float(loss.detach()) / n == pytest.approx(trl, rel=1e-4)
    # the gradient flows: a backward pass reaches the adapter
    loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in lm.model.parameters() if p.requires_grad)


# -- rollouts -----------------------------------------------------------------------------------
def test_rollouts_are_seeded_by_step_and_keep_their_stop_token(hf_models):
    lm = load(str(hf_models["llama"]), dtype="float32", quant="none")
    enc = Encoder(lm.tokenizer, lm.template)
    p = [grpo.Prompt(enc.tok.encode(enc.template.render([{"role": "user", "content": "Hi"}], True)), "Hi", {})]
    stops = lm.tokenizer.eos_ids
    a = grpo.rollout(lm.model, p, 4, 6, 1.0, stops, seed=0, step=3)
    assert grpo.rollout(lm.model, p, 4, 6, 1.0, stops, seed=0, step=3) == a
    assert grpo.rollout(lm.model, p, 4, 6, 1.0, stops, seed=0, step=4) != a
    assert len({tuple(c) for c in a}) > 1  # each completion of a group has its own seed
    # the batch engine samples what single-sequence generation with the same seed samples
    from ownlm.engine.generate import generate_ids
    from ownlm.engine.sampling import SamplingParams

    one = list(generate_ids(lm.model, p[0].ids, SamplingParams(temperature=1.0, seed=grpo.sample_seed(0, 3, 0, 1),
                                                                max_tokens=6), stops))
    assert a[1][:len(one)] == one and all(len(c) == 6 or c[-1] in stops for c in a)


# -- (3) learning -------------------------------------------------------------------------------
def _alpha_mass(lm, prompts_file: Path) -> float:
    """The probability that the first completion token starts with a letter, averaged over the prompts."""
    enc = Encoder(lm.tokenizer, lm.template)
    ps = grpo.load_prompts(prompts_file, enc, [], 1, lm.config.context_length).items
    letter = torch.tensor([lm.tokenizer.decode([t])[:1].isalpha() for t in range(lm.config.vocab_size)])
    with torch.no_grad():
        probs = torch.stack([torch.softmax(lm.model(torch.tensor([p.ids]))[0, -1].double(), -1) for p in ps])
    return float(probs[:, letter].sum(-1).mean())


def test_a_toy_reward_is_learned(hf_models, tmp_path):
    data = _write(tmp_path / "p.jsonl", ROWS)
    (tmp_path / "toy.py").write_text(ALPHA)
    before = _alpha_mass(load(str(hf_models["llama"]), dtype="float32", quant="none"), data)
    cfg = TuneConfig(method="full", objective="grpo", rewards=(f"{tmp_path / 'toy.py'}:alpha",), max_steps=8,
                     batch_size=4, group_size=8, max_completion_tokens=1, lr=3e-3, beta=0.04)
    res = tune(str(hf_models["llama"]), data, "toy", cfg, quiet=True)
    after = _alpha_mass(load("toy", dtype="float32", quant="none"), data)
    assert before == pytest.approx(0.23, abs=0.05)
    assert after > before + 0.1, (before, after)
    log = [json.loads(x) for x in (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 8 and all(r["completion_length"] == 1 for r in log)
    assert sum(r["reward"] for r in log[4:]) > sum(r["reward"] for r in log[:4])
    assert log[0]["kl"] == 0 and log[-1]["kl"] > 0  # the frozen copy is the reference of full weights


def test_one_lora_step_moves_toward_the_rewarded_completions(hf_models, tmp_path):
    """One GRPO step, fixed seed, LoRA (the default): the rewarded first letters gain probability."""
    data = _write(tmp_path / "p.jsonl", ROWS)
    (tmp_path / "toy.py").write_text(ALPHA)
    before = _alpha_mass(load(str(hf_models["llama"]), dtype="float32", quant="none"), data)
    cfg = TuneConfig(objective="grpo", rewards=(f"{tmp_path / 'toy.py'}:alpha",), max_steps=1, batch_size=4,
                     group_size=8, max_completion_tokens=1, lr=5e-2, beta=0.04, seed=0)
    res = tune(str(hf_models["llama"]), data, "toy1", cfg, quiet=True)
    after = _alpha_mass(load("toy1", dtype="float32", quant="none"), data)
    log = [json.loads(x) for x in (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 1 and 0 < log[0]["reward"] < 1  # some completions rewarded, some not: advantages not all 0
    assert after > before + 0.01, (before, after)


# -- (4) resume after SIGKILL -------------------------------------------------------------------
def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ownlm.cli.main", "tune", *args, "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_resume_after_sigkill_is_exact(hf_models, tmp_path):
    from dataclasses import asdict


    data = _write(tmp_path / "p.jsonl", ROWS)
    (tmp_path / "toy.py").write_text(ALPHA)
    toy = f"{tmp_path / 'toy.py'}:alpha"
    cfg = TuneConfig(objective="grpo", rewards=(toy, "length=0.5"), target_length=6, max_steps=4, batch_size=2,
                     grad_accum=2, group_size=3, max_completion_tokens=4, lr=1e-2, save_every=2, dropout=0.1)
    res = tune(str(hf_models["llama"]), data, "g", cfg, quiet=True)
    log = [json.loads(x) for x in (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    for r in log:
        assert r["reward"] == pytest.approx(r["rewards/toy.py:alpha"] + 0.5 * r["rewards/length"], rel=1e-9)
        assert 1 <= r["completion_length"] <= 4 and r["clip_ratio"] == 0 and r["kl"] >= 0
        assert len(r["samples"]) == 2 and all(set(s) == {"prompt", "completion", "reward"} for s in r["samples"])
    assert log[0]["kl"] == 0 and log[-1]["kl"] > 0  # B starts at zero: the policy starts as the reference
    # the same run from the command line, killed (SIGKILL) once its first checkpoint is complete, then resumed
    run = Store().root / "runs" / "r-latest"
    p = _cli([str(hf_models["llama"]), "--method", "grpo", "--data", str(data), "--max-steps", "4", "--batch-size", "2",
              "--grad-accum", "2", "--group-size", "3", "--max-completion-tokens", "4", "--lr", "1e-2",
              "--save-every", "2", "--dropout", "0.1", "--reward", toy, "--reward", "length=0.5",
              "--target-length", "6", "--name", "r"])
    deadline = time.time() + 120
    while not checkpoints.complete(run) and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    _, err = p.communicate()
    assert "Traceback" not in err
    assert json.loads((run / "run.json").read_text())["config"] == json.loads(json.dumps(asdict(cfg)))
    done = checkpoints.complete(run)
    assert done
    if done[-1].name == "step-0000004":  # it finished before the kill landed: resume from step 2 instead
        shutil.rmtree(done[-1])
    again = tune(str(hf_models["llama"]), data, "r", cfg, resume=True, quiet=True)
    assert again["resumed_from"] == 2
    relog = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in relog] == [1, 2, 3, 4]
    for a, b in zip(log, relog):  # the same samples, rewards and losses, step by step
        assert (a["loss"], a["reward"], a["samples"]) == (b["loss"], b["reward"], b["samples"])

    a, b = stored_adapter("g"), stored_adapter("r")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # another reward is another run: resuming with it is refused, naming the setting
    with pytest.raises(checkpoints.CheckpointError, match=r"made with other settings: rewards \['.*toy.py:alpha'"):
        tune(str(hf_models["llama"]), data, "r", TuneConfig(**{**asdict(cfg), "rewards": ("exact",)}), resume=True,
             quiet=True)


# -- (5) several processes ----------------------------------------------------------------------
def test_two_gloo_processes_follow_the_single_process_run(hf_models, tmp_path):
    """--nproc 2 (FSDP2 over gloo): each process samples its share of every micro-batch (whole
    groups, the weights gathered once per step) with the seeds one process gives those prompts,
    and the logged sums are all-reduced. So the completions, hence every reward, are exactly one
    process's (sampling is a pure function of the seed and a completion's place; the weights
    differ from one process's only in float rounding, far from moving a sampled token here); the
    loss, KL and gradient norm are sums in another order (equal to rounding), and so is the
    adapter."""

    from .test_preference import _tune

    data = _write(tmp_path / "p.jsonl", ROWS)
    (tmp_path / "toy.py").write_text(ALPHA)
    common = [str(hf_models["llama"]), "--method", "grpo", "--data", str(data), "--max-steps", "3", "--batch-size",
              "4", "--grad-accum", "2", "--group-size", "4", "--max-completion-tokens", "3", "--lr", "1e-2",
              "--beta", "0.1", "--dropout", "0", "--reward", f"{tmp_path / 'toy.py'}:alpha", "--reward", "length=0.5",
              "--target-length", "6"]
    one, two = _tune(common + ["--name", "one"]), _tune(common + ["--name", "two", "--nproc", "2"])
    logs = [[json.loads(x) for x in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
            for r in (one, two)]
    assert len(logs[0]) == len(logs[1]) == 3
    for a, b in zip(*logs):
        assert a.keys() == b.keys()
        for key in ("step", "tokens", "completion_length", "samples", "rewards/toy.py:alpha", "rewards/length", "lr"):
            assert a[key] == b[key], key
        for key in ("reward", "reward_std", "loss", "kl", "clip_ratio", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert logs[0][-1]["kl"] > 0 and logs[0][0]["reward"] != logs[0][-1]["reward"]  # it trained

    assert_adapters_agree("one", "two")


# -- (6) rewards --------------------------------------------------------------------------------
def test_builtin_rewards_on_concrete_strings():
    by = {r.name: r for r in rewards.parse(["exact", "regex", "json-schema", "length=0.1"], r"^\d+$", 10)}
    assert by["length"].weight == 0.1 and by["exact"].weight == 1.0
    exact = by["exact"].fn
    assert exact("", " 62\n", {"answer": "62"}) == 1.0
    assert exact("", "62", {"answer": 62}) == 1.0
    assert exact("", "62.", {"answer": "62"}) == 0.0
    assert exact("", "The answer is 62", {"answer": "62"}) == 0.0  # as `ownlm eval` scores exact_match
    regex = by["regex"].fn
    assert regex("", " 123 ", {}) == 1.0 and regex("", "12a", {}) == 0.0  # the flag's pattern, anchored
    assert regex("", "oh yes!", {"pattern": "yes|no"}) == 1.0  # re.search, as `ownlm eval` scores pattern_match
    assert regex("", "maybe", {"pattern": "yes|no"}) == 0.0 and regex("", "Yes", {"pattern": "yes|no"}) == 0.0
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string"}}, "required": ["n"]}
    js = by["json-schema"].fn
    assert js("", '{"n": 3, "s": "x"}', {"schema": schema}) == 1.0
    assert js("", '```json\n{"n": 3}\n```', {"schema": schema}) == 1.0
    assert js("", '{\n  "n": 3\n}', {"schema": schema}) == 1.0
    assert js("", '{"n": "3"}', {"schema": schema}) == 0.0  # the wrong type
    assert js("", '{"s": "x"}', {"schema": schema}) == 0.0  # a required property missing
    assert js("", '{"n": 3', {"schema": schema}) == 0.0  # not JSON
    assert js("", "[1, 2]", {"schema": {"type": "array", "items": {"type": "integer"}, "maxItems": 2}}) == 1.0
    assert js("", "[1, 2, 3]", {"schema": {"type": "array", "items": {"type": "integer"}, "maxItems": 2}}) == 0.0
    length = by["length"].fn
    assert length("", "x" * 10, {}) == 1.0
    assert length("", "x" * 5, {}) == 0.5
    assert length("", "x" * 13, {"target_length": 20}) == pytest.approx(0.65)
    assert length("", "x" * 25, {}) == 0.0


def test_the_example_rewards_load_as_a_user_gives_them_and_score_as_documented():
    root = Path(__file__).resolve().parents[1] / "examples" / "grpo" / "reward.py"
    by = {r.name: r for r in rewards.parse([f"{root}:number_only", f"{root}:right_number=0.5"])}
    number_only, right = by["reward.py:number_only"], by["reward.py:right_number"]
    assert right.weight == 0.5
    row = {"answer": "52"}
    assert [number_only.fn("", text, row) for text in ("52", "7", "18 + 34 = 52", "no idea")] == [1.0, 0.5, 0.25, 0.0]
    # right_number: only the right number scores; inside a longer answer, more for a shorter one
    assert right.fn("", " 52\n", row) == 1.0 and right.fn("", "7", row) == 0.0 and right.fn("", "1", row) == 0.0
    short, long = right.fn("", "18 + 34 = 52", row), right.fn("", "The sum of 18 and 34 is 52, as you can check.", row)
    assert short == pytest.approx(0.5 * (1 - 12 / 48)) and 0 < long < short
    assert right.fn("", "18 + 34 = 520", row) == 0.0  # a number is matched whole


def test_bad_reward_specs_are_clear(tmp_path):
    (tmp_path / "r.py").write_text("def two(prompt, completion):\n    return 1.0\nx = 3\n")
    cases = {"nosuch": "neither a built-in reward nor MODULE:FUNCTION",
             "exact=heavy": "the weight after '=' must be a number",
             f"{tmp_path / 'missing.py'}:f": "no such file",
             f"{tmp_path / 'r.py'}:nope": "has no function 'nope'",
             f"{tmp_path / 'r.py'}:x": "has no function 'x'",
             f"{tmp_path / 'r.py'}:two": "must take (prompt, completion, row)",
             "ownlm_no_such_module:f": "importing module 'ownlm_no_such_module' failed"}
    for spec, message in cases.items():
        with pytest.raises(BadRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
            rewards.parse([spec])
    with pytest.raises(BadRequest, match="needs at least one --reward"):
        rewards.parse([])
    with pytest.raises(BadRequest, match="given twice"):
        rewards.parse(["exact", "exact=2"])
    with pytest.raises(BadRequest, match="not a regular expression"):
        rewards.parse(["regex"], pattern="(")
    assert rewards.parse(["os.path:join"])[0].name == "os.path:join"  # any importable module
    # on the command line: exit 2, before the model is even looked for
    p = _cli(["no-such-model", "--method", "grpo", "--data", "x.jsonl", "--name", "n", "--reward", "exact=heavy"])
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and "--reward 'exact=heavy'" in err and "no-such-model" not in err
    assert "Traceback" not in err


def test_rows_a_reward_cannot_score_and_a_raising_reward(hf_models, tmp_path):
    lm = load(str(hf_models["llama"]), dtype="float32", quant="none")
    enc = Encoder(lm.tokenizer, lm.template)
    bad = _write(tmp_path / "b.jsonl", [ROWS[0], {"prompt": "What is 1 plus 1?"}])
    with pytest.raises(DataError, match=r"b.jsonl:2: reward exact needs 'answer' in every row"):
        grpo.load_prompts(bad, enc, rewards.parse(["exact"]), 8, 256)
    bad = _write(tmp_path / "s.jsonl", [{"prompt": "Give JSON", "schema": {"type": "nonsense"}}])
    with pytest.raises(DataError, match=r"s.jsonl:1: 'schema' is not a usable JSON schema"):
        grpo.load_prompts(bad, enc, rewards.parse(["json-schema"]), 8, 256)
    bad = _write(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "Q"},
                                                      {"role": "assistant", "content": "A"}]}])
    with pytest.raises(DataError, match=r"m.jsonl:1: 'messages' ends with an assistant turn"):
        grpo.load_prompts(bad, enc, rewards.parse(["length"], target_length=5), 8, 256)
    with pytest.raises(DataError, match=r"does not fit the model's context of 256"):
        grpo.load_prompts(_write(tmp_path / "c.jsonl", ROWS[:1]), enc, [], 250, 256)
    ok = grpo.load_prompts(_write(tmp_path / "ok.jsonl", [{"messages": [{"role": "system", "content": "S"},
                                                                       {"role": "user", "content": "Q"}], "k": 1}]),
                           enc, [], 8, 256)
    assert ok.items[0].text == "Q" and ok.items[0].row["k"] == 1
    # a reward that raises on the third row names itself and that row
    (tmp_path / "boom.py").write_text("def boom(prompt, completion, row):\n"
                                      "    if row['answer'] == '2':\n        raise KeyError('no luck')\n"
                                      "    return 0.0\n")
    data = _write(tmp_path / "p.jsonl", [{"prompt": "a", "answer": "0"}, {"prompt": "b", "answer": "1"},
                                         {"prompt": "c", "answer": "2"}])
    cfg = TuneConfig(objective="grpo", rewards=(f"{tmp_path / 'boom.py'}:boom",), max_steps=1, batch_size=3,
                     max_completion_tokens=2)
    with pytest.raises(rewards.RewardError, match=r"reward boom.py:boom failed on p.jsonl:3: KeyError: 'no luck'"):
        tune(str(hf_models["llama"]), data, "boom", cfg, quiet=True)
    # a reward that returns NaN; one that calls sys.exit (its failure, not the end of the run with
    # status 0); rewards each finite whose sums within a group overflow (refused before any step)
    cases = (("nan", "return float('nan')", r"reward nan.py:nan returned nan on p.jsonl:\d, not a finite"),
             ("quit", "raise SystemExit(0)", r"reward quit.py:quit failed on p.jsonl:\d: SystemExit"),
             ("huge", "return 1e308", r"step 1: the rewards .* are too large to compare within a group"))
    for name, body, said in cases:
        (tmp_path / f"{name}.py").write_text(f"def {name}(prompt, completion, row):\n    {body}\n")
        cfg = TuneConfig(objective="grpo", rewards=(f"{tmp_path / name}.py:{name}",), max_steps=1, batch_size=3,
                         max_completion_tokens=2)
        with pytest.raises(rewards.RewardError, match=said):
            tune(str(hf_models["llama"]), data, name, cfg, quiet=True)


def test_numpy_and_torch_scalars_are_rewards():
    import numpy as np

    for value, want in ((np.float32(0.5), 0.5), (np.int64(2), 2.0), (torch.tensor(0.25), 0.25), (True, 1.0)):
        r = rewards.Reward("r", 1.0, lambda p, c, row, v=value: v)
        got = r("p", "c", {}, "x.jsonl:1")
        assert got == want and type(got) is float
    with pytest.raises(rewards.RewardError, match="returned tensor"):
        rewards.Reward("r", 1.0, lambda p, c, row: torch.ones(2))("p", "c", {}, "x.jsonl:1")


def test_settings_are_checked():
    with pytest.raises(BadRequest, match="--group-size must be an integer of at least 2"):
        TuneConfig(objective="grpo", rewards=("exact",), group_size=1)
    with pytest.raises(BadRequest, match="--temperature 0"):
        TuneConfig(objective="grpo", rewards=("exact",), temperature=0)
    with pytest.raises(BadRequest, match="--reward goes with --method grpo"):
        TuneConfig(objective="dpo", rewards=("exact",))
    assert TuneConfig(objective="grpo", rewards=("exact",), beta=0).beta == 0  # no KL term is allowed
    assert TuneConfig(objective="grpo", rewards=("exact",)).learning_rate == 5e-5


def test_the_example_generator_writes_right_answers_and_solved_questions(tmp_path):
    """examples/grpo/make_data.py: deterministic, every answer right (computed here from the
    question), no prompt of the shipped task, and with --shots 3 rows after 0 to 3 solved
    questions each, as many of each count."""
    import re

    from ownlm.evaluate.tasks import find_task

    script = Path(__file__).resolve().parents[1] / "examples" / "grpo" / "make_data.py"
    for out in ("a.jsonl", "b.jsonl"):
        subprocess.run([sys.executable, str(script), "--shots", "3", "--n", "80", "--out", str(tmp_path / out)],
                       check=True, capture_output=True)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    held = {json.loads(x)["prompt"] for x in find_task("arithmetic").read_text().splitlines() if x.strip()}
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

    def right(question: str) -> str:
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\? Reply with the number only\.", question).groups()
        return str(ops[op](int(a), int(b)))

    counts = [0] * 4
    for row in (json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()):
        turns = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2) + ["user"]
        for q, a in zip(turns[0::2], turns[1::2]):
            assert a["content"] == right(q["content"])
        assert row["answer"] == right(turns[-1]["content"]) and turns[-1]["content"] not in held
        counts[len(turns) // 2] += 1
    assert counts == [20, 20, 20, 20]
    # --sft: {prompt, completion} rows for supervised tuning, the answers right, none of the shipped task
    subprocess.run([sys.executable, str(script), "--sft", "--n", "50", "--seed", "1",
                    "--out", str(tmp_path / "s.jsonl")], check=True, capture_output=True)
    rows = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(rows) == 50 and all(set(r) == {"prompt", "completion"} for r in rows)
    assert all(r["completion"] == right(r["prompt"]) and r["prompt"] not in held for r in rows)
    both = subprocess.run([sys.executable, str(script), "--sft", "--shots", "2", "--out", str(tmp_path / "x.jsonl")],
                          capture_output=True, text=True)
    assert both.returncode == 2 and "--sft writes single questions" in both.stderr
    # --exclude: a held-out set with no question of the files tuned on (their user turns included)
    subprocess.run([sys.executable, str(script), "--n", "300", "--seed", "7", "--exclude", str(tmp_path / "a.jsonl"),
                    "--exclude", str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "h.jsonl")],
                   check=True, capture_output=True)
    asked = {t["content"] for row in (json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines())
             for t in row.get("messages") or [{"role": "user", "content": row["prompt"]}] if t["role"] == "user"}
    asked |= {r["prompt"] for r in rows}
    heldout = [json.loads(x) for x in (tmp_path / "h.jsonl").read_text().splitlines()]
    assert len(heldout) == 300 and all(r["answer"] == right(r["prompt"]) for r in heldout)
    assert not {r["prompt"] for r in heldout} & (asked | held)

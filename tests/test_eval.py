"""ownlm eval (perplexity): equal to exp of the mean negative log-likelihood computed
independently with transformers on a tiny model, with and without a sliding window."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from safetensors import safe_open
import torch
import transformers

import ownlm
from ownlm.errors import BadRequest
from ownlm.evaluate.perplexity import perplexity
from ownlm.model import kernels

from .conftest import CORPUS, KERNELS_POSSIBLE

TEXT = " ".join(CORPUS[:3])


@pytest.fixture(scope="module")
def pair(hf_models):
    folder = hf_models["llama"]
    return ownlm.load(str(folder), dtype="float32"), transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def test_whole_text_equals_transformers_loss(pair):
    lm, ref = pair
    ids = lm.encode(TEXT)
    with torch.no_grad():
        loss = ref(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()  # mean NLL of tokens 1..n-1
    r = perplexity(lm, TEXT)
    assert r["scored_tokens"] == len(ids) - 1
    assert r["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert r["bits_per_byte"] == pytest.approx(loss * (len(ids) - 1) / (math.log(2) * len(TEXT.encode())), rel=1e-4)


def test_sliding_window_scores_each_token_with_its_window(pair):
    lm, ref = pair
    ids = lm.encode(TEXT)
    w = 16
    nll = 0.0
    with torch.no_grad():  # stride 1: token i is scored given the w - 1 tokens before it (fewer at the start)
        for i in range(1, len(ids)):
            ctx = ids[max(0, i - w + 1): i + 1]
            logp = torch.log_softmax(ref(torch.tensor([ctx])).logits[0, -2].double(), -1)
            nll -= float(logp[ids[i]])
    r = perplexity(lm, TEXT, window=w, stride=1)
    assert r["scored_tokens"] == len(ids) - 1
    assert r["nll"] == pytest.approx(nll, rel=1e-4)
    coarse = perplexity(lm, TEXT, window=w, stride=8)  # fewer windows, less context for some tokens
    assert coarse["scored_tokens"] == len(ids) - 1 and coarse["perplexity"] > 1


def test_cli(hf_models, tmp_path, ownlm_home):
    task = tmp_path / "text.txt"
    task.write_text(TEXT)
    r = subprocess.run([sys.executable, "-m", "ownlm.cli.main", "eval", str(hf_models["llama"]),
                        str(hf_models["qwen2"]), "--task", str(task), "--json", "--dtype", "float32"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["results"]
    assert len(rows) == 2 and all(set(row) >= {"model", "perplexity", "bits_per_byte", "tokens"} for row in rows)
    for bad in (["--task", str(tmp_path / "missing.txt")], ["--task", str(tmp_path / "x.jsonl")],
                ["--task", str(task), "--window", "1"]):
        r = subprocess.run([sys.executable, "-m", "ownlm.cli.main", "eval", str(hf_models["llama"]), *bad],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "error: " in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_kl_is_zero_with_itself_and_grows_with_quantization(hf_models, tmp_path):
    import gguf

    from ownlm.evaluate.kl import kl_divergence

    from .ggufs import hf_folder_to_gguf

    src = ownlm.load(str(hf_models["llama"]), dtype="float32")
    same = kl_divergence(src, src, TEXT)
    assert same["mean_kl"] == pytest.approx(0.0, abs=1e-12) and same["top1_agreement"] == 1.0
    kls = []
    for qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
        path = hf_folder_to_gguf(hf_models["llama"], tmp_path / f"{qtype.name}.gguf", qtype=qtype)
        kls.append(kl_divergence(src, ownlm.load(str(path), dtype="float32", quant="none"), TEXT)["mean_kl"])
    assert 0 < kls[0] < kls[1]


def test_kl_cli_needs_two_models_of_one_vocabulary(hf_models, tmp_path, ownlm_home):
    task = tmp_path / "text.txt"
    task.write_text(TEXT)
    base = [sys.executable, "-m", "ownlm.cli.main", "eval", "--task", str(task), "--kl"]
    ok = subprocess.run(base + [str(hf_models["llama"]), str(hf_models["llama3-rope"]), "--json"], capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["results"][0]["mean_kl"] > 0
    one = subprocess.run(base + [str(hf_models["llama"])], capture_output=True, text=True, timeout=120)
    assert one.returncode == 2 and "at least two" in one.stderr


def test_peak_rss_is_the_process_own_not_its_parents():
    """A process spawned by a large one reports its own peak: Linux carries ru_maxrss's high-water
    mark across exec, so `ownlm bench` run from a test runner once reported the runner's."""
    from ownlm.evaluate.bench import peak_rss_bytes

    child = "from ownlm.evaluate.bench import peak_rss_bytes; print(peak_rss_bytes())"
    parent = ("import subprocess, sys; big = bytearray(600 << 20); big[::4096] = b'x' * len(big[::4096]); "
              f"print(subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, text=True).stdout)")
    r = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    own = int(r.stdout.split()[0])
    assert 5 << 20 < own < 300 << 20  # a bare interpreter with ownlm.evaluate imported, not the parent's 600 MB
    assert peak_rss_bytes() > 5 << 20  # this process's own, in bytes


@pytest.mark.skipif(not KERNELS_POSSIBLE, reason="int8 activations are a setting of ownlm's CPU kernels, which need "
                                                 "x86-64 Linux with AVX2 and a C compiler")
def test_bench_takes_int8_activations_and_refuses_other_names(hf_models, ownlm_home):
    base = [sys.executable, "-m", "ownlm.cli.main", "bench", str(hf_models["llama"]), "--prompt-tokens", "8",
            "--gen-tokens", "4", "--quant", "int4", "--json"]
    r = subprocess.run([*base, "--activations", "int8"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["activations"] == "int8"
    r = subprocess.run([*base, "--activations", "int4"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "int16" in r.stderr and "int8" in r.stderr


def test_bench_json_fields_and_cost(hf_models, ownlm_home):
    from ownlm.evaluate.bench import cost_per_mtok

    cmd = [sys.executable, "-m", "ownlm.cli.main", "bench", str(hf_models["llama"]), "--prompt-tokens", "20",
           "--gen-tokens", "8", "--batch", "1,3", "--cost", "--price-per-hour", "0.5", "--api-price-per-mtok", "2",
           "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"model", "device", "dtype", "threads", "kernels", "activations", "prompt_tokens",
                        "gen_tokens", "load_s", "runs", "peak_rss_bytes", "cost", "memory"}
    assert out["threads"] == torch.get_num_threads()  # every core by default
    assert out["kernels"] == (kernels.isa() if kernels.load() is not None else None)
    assert out["activations"] == ("int16" if kernels.load() is not None else None)
    one, three = out["runs"]
    assert set(one) == {"batch", "prefill_tokens_per_s", "time_to_first_token_s", "decode_tokens_per_s"}
    assert set(three) == {"batch", "aggregate_tokens_per_s", "wall_s", "decode_aggregate_tokens_per_s"}
    assert three["batch"] == 3 and 0 < three["aggregate_tokens_per_s"] and 0 < three["decode_aggregate_tokens_per_s"]
    assert out["peak_rss_bytes"] > 10 << 20 and out["load_s"] > 0
    assert out["peak_rss_bytes"] < 1 << 30  # the bandwidth's buffer (1 GiB here) is not the model's peak
    c = out["cost"]
    best = max(one["decode_tokens_per_s"], three["aggregate_tokens_per_s"])
    assert c["tokens_per_s"] == best
    assert c["cost_per_mtok"] == pytest.approx(0.5 / (best * 3600) * 1e6)
    assert c["api_over_own"] == pytest.approx(2 / c["cost_per_mtok"])
    assert cost_per_mtok(1.0, 1e6 / 3600) == pytest.approx(1.0)  # $1/hour at 1M tokens an hour is $1 per M
    # the ceiling: the bytes a decode step reads, from the checkpoint itself (every tensor but the untied
    # input embeddings, in the model's dtype; the norms may be held in float32 beside it) and its config
    m = out["memory"]
    cfg = json.loads((hf_models["llama"] / "config.json").read_text())
    with safe_open(hf_models["llama"] / "model.safetensors", "pt") as f:
        numel = {k: f.get_slice(k).get_shape() for k in f.keys()}
    size = {"torch.float32": 4, "torch.bfloat16": 2}[out["dtype"]]
    big = sum(math.prod(shape) for k, shape in numel.items() if "embed_tokens" not in k and len(shape) == 2) * size
    small = sum(math.prod(shape) for shape in numel.values() if len(shape) == 1) * 4
    assert big <= m["weight_bytes_per_token"] <= big + small + 4096  # + rotary tables
    kv = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["hidden_size"] // cfg["num_attention_heads"]
    assert m["kv_bytes_per_token"] == kv * size * (20 + 8 // 2)
    assert m["bandwidth_bytes_per_s"] > 1e8
    assert m["decode_ceiling_tokens_per_s"] == pytest.approx(
        m["bandwidth_bytes_per_s"] / (m["weight_bytes_per_token"] + m["kv_bytes_per_token"]))
    assert m["fraction_of_ceiling"] == pytest.approx(one["decode_tokens_per_s"] / m["decode_ceiling_tokens_per_s"])
    assert m["fits_in_cache"] == (m["last_level_cache_bytes"] is not None
                                  and m["weight_bytes_per_token"] <= m["last_level_cache_bytes"])
    for bad in (["--batch", "1,x"], ["--cost"], ["--gen-tokens", "1"]):
        r = subprocess.run([sys.executable, "-m", "ownlm.cli.main", "bench", str(hf_models["llama"]), *bad],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "error: " in r.stderr and "Traceback" not in r.stderr, r.stderr


MC = [{"context": "The quick brown", "choices": [" fox", " dog", " lazy"], "gold": 0},
      {"context": "def add(a, b):\n    return", "choices": [" a + b", " 42", " print"], "gold": 0},
      {"context": "Numbers: 0 1 2", "choices": [" 3", " fox jumps over", " 9"], "gold": 2}]


def test_multiple_choice_equals_a_hand_computation(pair, tmp_path):
    from ownlm.evaluate.tasks import multiple_choice, read_task

    lm, ref = pair
    task = tmp_path / "mc.jsonl"
    task.write_text("\n".join(json.dumps(r) for r in MC) + "\n")
    kind, rows = read_task(task)
    assert kind == "multiple_choice"
    acc = acc_norm = 0
    with torch.no_grad():  # by hand, with transformers: sum of the continuation tokens' log-probabilities
        for row in MC:
            scores = []
            for choice in row["choices"]:
                ctx, whole = lm.encode(row["context"]), lm.encode(row["context"] + choice)
                logp = torch.log_softmax(ref(torch.tensor([whole])).logits[0].double(), -1)
                scores.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
            norm = [s / len(c[1:]) for s, c in zip(scores, row["choices"])]  # characters after the space, as lm-eval
            acc += int(max(range(3), key=scores.__getitem__) == row["gold"])
            acc_norm += int(max(range(3), key=norm.__getitem__) == row["gold"])
    got = multiple_choice(lm, rows)
    assert got["acc"] == pytest.approx(acc / 3) and got["acc_norm"] == pytest.approx(acc_norm / 3)


def test_spaces_ending_a_context_belong_to_the_choice(pair):
    """As lm-evaluation-harness splits a pair (_encode_pair): "Answer: " + "Paris" is scored as
    "Answer:" + " Paris" (a lone space token would end the context, and the choice lose its first)."""
    from ownlm.evaluate.tasks import continuation_logprob

    lm, _ = pair
    assert continuation_logprob(lm, "The quick ", "brown fox") == continuation_logprob(lm, "The quick", " brown fox")
    assert continuation_logprob(lm, "Numbers:  ", "3") == continuation_logprob(lm, "Numbers:", "  3")


def test_acc_norm_divides_by_characters_as_lm_eval():
    """lm-evaluation-harness's acc_norm (api/task.py: `completion_len = len(choice)`) divides by the
    choice's characters, without the delimiter before it: on these numbers bytes would pick the
    other choice, and so would counting the space."""
    import numpy as np

    from ownlm.evaluate.tasks import normalized_pick

    bare, lls = ["éééé", "abcdefg"], [-8.0, -7.5]  # lm-eval's choices (its delimiter " " apart): 4 vs 7 characters
    choices = [" " + c for c in bare]  # ownlm's: each with the space before it
    assert normalized_pick(lls, choices) == 1  # -7.5/7 > -8/4; by bytes -8/8 > -7.5/7 would pick 0
    assert int(np.argmax(np.array(lls) / np.array([float(len(c)) for c in bare]))) == 1  # lm-eval's formula
    assert int(np.argmax(np.array(lls) / np.array([len(c.encode()) for c in bare]))) == 0
    assert normalized_pick([-3.0, -3.0], [" ab", " cd"]) == 0  # a tie: the first, as argmax
    # the space is not counted: -2/1 < -5/3 (counting it, -2/2 > -5/4 would pick the first)
    assert normalized_pick([-2.0, -5.0], [" a", " bcd"]) == 1
    assert int(np.argmax(np.array([-2.0, -5.0]) / np.array([1.0, 3.0]))) == 1


def test_generation_task_and_bad_rows(pair, tmp_path, hf_models, ownlm_home):
    from ownlm.evaluate.tasks import generation

    lm, _ = pair
    prompts = ["Owning your model", "Numbers: 0 1 2"]
    outs = [lm.chat([{"role": "user", "content": p}], temperature=0, max_tokens=8).text.strip() for p in prompts]
    rows = [{"prompt": prompts[0], "answer": outs[0]}, {"prompt": prompts[1], "answer": outs[1] + " and more"}]
    got = generation(lm, rows, max_tokens=8)
    assert (got["exact_match"] == 0.5
            and got["contains"] == pytest.approx(0.5 + 0.5 * (outs[1] + " and more" in outs[1])))
    task = tmp_path / "gen.jsonl"
    task.write_text("\n".join(json.dumps(r) for r in rows))
    r = subprocess.run([sys.executable, "-m", "ownlm.cli.main", "eval", str(hf_models["llama"]), "--task", str(task),
                        "--max-tokens", "8", "--dtype", "float32", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["results"][0]["exact_match"] == 0.5, r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(MC[0]) + "\n" + json.dumps({"context": "x", "choices": ["a", "b"], "gold": 5}) + "\n")
    r = subprocess.run([sys.executable, "-m", "ownlm.cli.main", "eval", str(hf_models["llama"]), "--task", str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"{bad}:2:" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_shipped_tasks_parse_and_run_by_name(hf_models, ownlm_home):
    from ownlm.evaluate.tasks import find_task, read_task, shipped_tasks

    shipped = shipped_tasks()
    assert set(shipped) == {"prose", "everyday", "arithmetic"}
    assert read_task(shipped["everyday"])[0] == "multiple_choice" and len(read_task(shipped["everyday"])[1]) == 32
    assert read_task(shipped["arithmetic"])[0] == "generation"
    for row in read_task(shipped["arithmetic"])[1]:  # every answer is the arithmetic it asks for
        a, op, b = row["prompt"].split("?")[0].split()[2:5]
        assert int(row["answer"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    assert find_task("prose").read_text(encoding="utf-8").count("bicycle") > 5
    cli = [sys.executable, "-m", "ownlm.cli.main", "eval", str(hf_models["llama"]), "--dtype", "float32"]
    r = subprocess.run([*cli, "--task", "everyday", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["results"][0]
    assert got["task"] == "everyday" and got["rows"] == 32 and 0 <= got["acc"] <= 1
    r = subprocess.run([*cli, "--task", "prose"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "PERPLEXITY" in r.stdout and "scoring (" in r.stderr, r.stderr
    r = subprocess.run([*cli, "--task", "no-such-task"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "arithmetic, everyday, prose" in r.stderr and "Traceback" not in r.stderr


def test_pattern_rows_score_a_style(pair, tmp_path):
    """{prompt, pattern} rows: pattern_match is the fraction of greedy answers the regex is found in, counted
    independently of the {prompt, answer} rows' exact match; a bad regex is a file:line error."""
    import re

    from ownlm.evaluate.tasks import generation, read_task

    lm, _ = pair
    prompts = ["Owning your model", "Numbers: 0 1 2", "A list"]
    outs = [lm.chat([{"role": "user", "content": p}], temperature=0, max_tokens=8).text.strip() for p in prompts]
    rows = [{"prompt": prompts[0], "pattern": "^" + re.escape(outs[0][:3])},  # found
            {"prompt": prompts[1], "pattern": re.escape(outs[1]) + "NOT THERE"},  # not found
            {"prompt": prompts[2], "answer": outs[2]}]
    got = generation(lm, rows, max_tokens=8)
    assert got["pattern_match"] == 0.5 and got["exact_match"] == 1.0 and got["rows"] == 3
    task = tmp_path / "style.jsonl"
    task.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "x", "pattern": "(unclosed"}) + "\n")
    with pytest.raises(BadRequest, match=f"{task}:2: pattern is not a regular expression"):
        read_task(task)

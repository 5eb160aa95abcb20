"""lm-evaluation-harness against `ownlm serve`: its `local-completions` model, with the server's own
tokenizer routes (`tokenizer_backend=remote`, no Hub tokenizer), scores a small multiple-choice
task with the same per-choice log-likelihoods as its `hf` model on the same GGUF in float32
(transformers dequantizes the Q4_1 file; the server runs it dense in float32: same weights)."""

from __future__ import annotations

import httpx
import pytest

from ownlm import manage
from ownlm.store.store import Store

from . import server_util

CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
# (context, continuation) pairs: lm-eval's loglikelihood requests of a small multiple-choice task
PAIRS = [
    # After this answer smollm2's greedy next token is <|im_end|>, its end-of-text token. lm-eval sends
    # context + continuation with echo, max_tokens 1 and logprobs 1, and sums token_logprobs[ctxlen:-1]:
    # the last entry must be the generated token. A server that drops a generated end-of-text token
    # (as ownlm did) loses that entry, and lm-eval then drops the continuation's last token instead.
    (CHAT, "The capital of France is Paris."),
    (CHAT, "The capital of France is Lyon."),
    (CHAT, "Paris"),
    ("Question: Which animal barks?\nAnswer:", " dog"),
    ("Question: Which animal barks?\nAnswer:", " fish"),
    ("Question: Which animal barks?\nAnswer:", " sparrow"),
    ("Question: What colour is the sky on a clear day?\nAnswer:", " blue"),
    ("Question: What colour is the sky on a clear day?\nAnswer:", " purple"),
    ("", "Hello world"),  # no context: both sides put the tokenizer's BOS (from /tokenizer_info) first
    ("Numbers: 1 2 3", " 4 5 6<|im_end|>"),  # ends with the end-of-text token, written as text
]


def _requests():
    from lm_eval.api.instance import Instance

    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]


@pytest.fixture(scope="module")
def served(tmp_path_factory, smollm2_gguf):
    home = tmp_path_factory.mktemp("lm-eval") / "home"
    manage.import_path(smollm2_gguf, name="smollm2", link=True, store=Store(home), quiet=True)
    s = server_util.Server(home, ["smollm2", "--preload", "--dtype", "float32", "--quant", "none"], timeout=300)
    yield s
    assert s.stop() == 0


@pytest.mark.smollm2
def test_local_completions_equals_hf(served, hf_smollm2):
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM

    api = get_model("local-completions").create_from_arg_string(
        f"model=smollm2,base_url={served.base}/v1/completions,tokenizer_backend=remote,max_length=2048,"
        "num_concurrent=1,max_retries=1,timeout=300")
    assert api.tokenizer_backend == "remote" and api.tokenized_requests  # token ids from /tokenize go out
    ref_model, ref_tok = hf_smollm2
    hf = HFLM(pretrained=ref_model, tokenizer=ref_tok, batch_size=1)
    assert api.prefix_token_id == hf.prefix_token_id == ref_tok.bos_token_id
    assert api.eot_token_id == hf.eot_token_id
    for context, continuation in PAIRS[:-2] + PAIRS[-1:]:  # the same split into tokens (the empty context aside)
        assert api._encode_pair(context, continuation) == hf._encode_pair(context, continuation)

    got, want = api.loglikelihood(_requests()), hf.loglikelihood(_requests())
    diffs = [abs(g[0] - w[0]) for g, w in zip(got, want)]
    print("per-pair |ours - hf| log-likelihood:", [f"{d:.2e}" for d in diffs])
    for pair, (g_ll, g_greedy), (w_ll, w_greedy) in zip(PAIRS, got, want):
        assert g_ll == pytest.approx(w_ll, abs=1e-3), pair
        assert g_greedy == w_greedy, pair
    assert got[0][1]  # "The capital of France is Paris." is smollm2's greedy answer

    # acc and acc_norm (lm-eval's formula: log-likelihood over len(choice) characters) agree too
    from ownlm.evaluate.tasks import normalized_pick
    for lo, hi in [(0, 3), (3, 6), (6, 8)]:
        choices = [c for _, c in PAIRS[lo:hi]]
        assert normalized_pick([g[0] for g in got[lo:hi]], choices) == \
            normalized_pick([w[0] for w in want[lo:hi]], choices)


@pytest.mark.smollm2
def test_generated_end_of_text_is_returned_scored_and_counted(served):
    ids = httpx.post(f"{served.base}/tokenize", json={"prompt": CHAT + PAIRS[0][1], "add_special_tokens": False},
                     timeout=60).json()["tokens"]
    info = httpx.get(f"{served.base}/tokenizer_info", timeout=60).json()
    body = {"model": "smollm2", "prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}
    r = httpx.post(f"{served.base}/v1/completions", json=body, timeout=120).json()
    c = r["choices"][0]
    assert c["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 1
    assert len(c["logprobs"]["token_logprobs"]) == len(ids) + 1  # the prompt, then the end-of-text token
    eos, lp = c["logprobs"]["tokens"][-1], c["logprobs"]["token_logprobs"][-1]
    assert eos == info["eos_token"] and c["logprobs"]["top_logprobs"][-1] == {eos: lp} and lp < 0  # greedy
    assert c["text"] == httpx.post(f"{served.base}/detokenize", json={"tokens": ids}, timeout=60).json()["prompt"]
    # without echo too: the end-of-text token is the (empty) completion, scored and counted
    r = httpx.post(f"{served.base}/v1/completions", json={**body, "echo": False}, timeout=120).json()
    assert r["choices"][0]["text"] == "" and r["usage"]["completion_tokens"] == 1
    assert r["choices"][0]["logprobs"]["tokens"] == [info["eos_token"]]

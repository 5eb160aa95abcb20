"""Sampling and generation on a tiny model: seeds, greedy equivalences, stop strings, penalties,
budgets, and the Python API's shapes."""

from __future__ import annotations

import math

import pytest
import torch

import ownlm
from ownlm.engine.sampling import SamplingParams, apply_penalties, sample, top_p_only
from ownlm.errors import BadRequest


@pytest.fixture(scope="module")
def lm(hf_models):
    return ownlm.load(str(hf_models["llama"]), dtype="float32")


def run(lm, prompt="The quick brown", **kw):
    kw.setdefault("stop_token_ids", [])
    return lm.stream_ids(lm.encode(prompt), **kw).run()


def test_same_seed_same_tokens_and_seeds_differ(lm):
    a = run(lm, temperature=1.0, seed=7, max_tokens=24)
    b = run(lm, temperature=1.0, seed=7, max_tokens=24)
    c = run(lm, temperature=1.0, seed=8, max_tokens=24)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids


def test_top_k_1_equals_greedy(lm):
    greedy = run(lm, temperature=0, max_tokens=20)
    assert run(lm, temperature=1.3, top_k=1, seed=3, max_tokens=20).token_ids == greedy.token_ids
    # greedy equals the argmax of a full forward at every step
    ids = lm.encode("The quick brown")
    with torch.no_grad():
        for t in greedy.token_ids:
            assert int(lm.model(torch.tensor([ids]))[0, -1].argmax()) == t
            ids.append(t)


def test_stop_string_cuts_exactly(lm):
    full = run(lm, temperature=0, max_tokens=30)
    text = full.text
    assert len(text) > 12
    stop = text[5:9]
    first = text.find(stop)
    cut = run(lm, temperature=0, max_tokens=30, stop=[stop])
    assert cut.text == text[:first] and cut.finish_reason == "stop"
    streamed = "".join(lm.stream_ids(lm.encode("The quick brown"), temperature=0, max_tokens=30, stop=[stop],
                                     stop_token_ids=[]))
    assert streamed == text[:first]


def test_length_and_stop_token_finish_reasons(lm):
    assert run(lm, temperature=0, max_tokens=4).finish_reason == "length"
    greedy = run(lm, temperature=0, max_tokens=10)
    stopped = run(lm, temperature=0, max_tokens=10, stop_token_ids=[greedy.token_ids[3]])
    assert stopped.token_ids == greedy.token_ids[:3] and stopped.finish_reason == "stop"


def test_penalties_change_what_they_should():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    ctx = torch.tensor([0, 1, 0])
    out = torch.tensor([0, 0, 2])
    rep = apply_penalties(logits.clone(), SamplingParams(repetition_penalty=2.0), ctx, out)
    assert rep.tolist() == [1.0, -2.0, 0.5, 3.0]  # seen tokens: positive halved, negative doubled
    pres = apply_penalties(logits.clone(), SamplingParams(presence_penalty=1.0), ctx, out)
    assert pres.tolist() == [1.0, -1.0, -0.5, 3.0]  # every generated token minus 1
    freq = apply_penalties(logits.clone(), SamplingParams(frequency_penalty=0.5), ctx, out)
    assert freq.tolist() == [1.0, -1.0, 0.0, 3.0]  # minus 0.5 per occurrence
    bias = apply_penalties(logits.clone(), SamplingParams(logit_bias=((1, 10.0),)), ctx, out)
    assert sample(bias, SamplingParams(temperature=0), None) == 1


def test_top_p_and_min_p_restrict_the_support():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, SamplingParams(temperature=1.0, top_p=0.7), g) for _ in range(300)}
    assert draws == {0, 1}
    draws = {sample(logits, SamplingParams(temperature=1.0, min_p=0.25), g) for _ in range(300)}
    assert draws == {0, 1, 2}
    draws = {sample(logits, SamplingParams(temperature=1.0), g) for _ in range(2000)}
    assert draws == {0, 1, 2, 3}


def test_top_p_keeps_what_a_whole_sort_keeps():
    """top_p_only looks at the most likely tokens in growing batches; the kept set and its values
    are a whole sort's (the smallest prefix of the descending order whose mass reaches top_p):
    peaked distributions (decided in the first 64), flat ones (the whole vocabulary) and between,
    at a real vocabulary's size; the probabilities are distinct, so the order has no ties."""
    g = torch.Generator().manual_seed(0)
    for scale in (8.0, 3.0, 1.0, 0.01):
        for top_p in (0.1, 0.5, 0.9, 0.999):
            probs = torch.softmax(torch.randn(49152, generator=g, dtype=torch.float64) * scale, -1).float()
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, -1) - sorted_p <= top_p  # float32, as sampling sums
            want = torch.zeros_like(probs)
            want[order[keep]] = probs[order[keep]]
            got = top_p_only(probs, top_p)
            assert torch.equal(got > 0, want > 0) and torch.equal(got, want), (scale, top_p)


def test_repetition_penalty_reduces_repeats(lm):
    plain = run(lm, temperature=0, max_tokens=40)
    penalized = run(lm, temperature=0, max_tokens=40, repetition_penalty=1.8)
    repeats = lambda ids: len(ids) - len(set(ids))  # noqa: E731
    assert repeats(penalized.token_ids) < repeats(plain.token_ids)


def test_bad_parameters_are_errors(lm):
    for kw in ({"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"max_tokens": 0}, {"frobnicate": 1},
               {"presence_penalty": 5}, {"seed": 2**64}, {"seed": -2**63 - 1}):
        with pytest.raises(BadRequest):
            lm.generate("hi", **kw)
    assert lm.generate("hi", seed=2**64 - 1, max_tokens=2, temperature=1.0).usage["completion_tokens"] == 2
    with pytest.raises(BadRequest, match="context"):
        lm.generate("hi", max_tokens=10_000)
    with pytest.raises(BadRequest, match="context"):
        lm.generate("The quick brown fox " * 200)


def test_python_api_shapes(lm):
    c = lm.chat([{"role": "user", "content": "hello"}], temperature=0, max_tokens=6, seed=1)
    assert set(c.usage) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert c.usage["prompt_tokens"] == len(lm.encode(lm.chat_prompt([{"role": "user", "content": "hello"}])))
    assert c.usage["completion_tokens"] == len(c.token_ids) and c.finish_reason in ("stop", "length")
    pieces = list(lm.chat_stream([{"role": "user", "content": "hello"}], temperature=0, max_tokens=6))
    assert "".join(pieces) == c.text
    g = lm.generate("The quick", max_tokens=5, temperature=0)
    assert "".join(lm.stream("The quick", max_tokens=5, temperature=0)) == g.text


def test_cuda_graph_length_buckets():
    """Decode graphs are keyed by a power-of-two attention length, never past the cache's capacity
    (the graphs themselves run only where there is a GPU: bench/gpu.py)."""
    from ownlm.engine.graphs import MIN_LENGTH, enabled, length_bucket

    assert [length_bucket(n, 4096) for n in (1, MIN_LENGTH, MIN_LENGTH + 1, 1000, 4096)] == [256, 256, 512, 1024, 4096]
    assert length_bucket(3000, 2112) == 2112
    from types import SimpleNamespace

    dense, moe = (SimpleNamespace(cfg=SimpleNamespace(n_experts=n)) for n in (0, 8))
    assert not enabled(torch.device("cpu"), dense)
    assert enabled(torch.device("cuda"), dense) and not enabled(torch.device("cuda"), moe)


def test_the_cache_grows_with_the_answer_and_memory_bounds_the_request(lm, monkeypatch):
    """A long answer grows the KV cache as it goes (the same tokens as a cache sized up front);
    the memory free now bounds what may be asked for: a max_tokens beyond it is an error naming
    the memory, and without max_tokens the answer stops where memory would run out."""
    from ownlm.engine import generate, kv_cache

    sizes = []
    grow = kv_cache.KVCache.grow
    monkeypatch.setattr(kv_cache.KVCache, "grow",
                        lambda self, *a: (grow(self, *a), sizes.append(self.max_len))[0])
    monkeypatch.setattr(generate, "GROW_FROM", 16)  # small first size: it must grow several times
    grown = run(lm, temperature=0, max_tokens=200)
    assert grown.usage["completion_tokens"] == 200 and max(sizes) >= 200 and len(set(sizes)) > 2
    monkeypatch.setattr(generate, "GROW_FROM", 1024)
    sizes.clear()
    assert run(lm, temperature=0, max_tokens=200).token_ids == grown.token_ids and set(sizes) <= {256}

    per_token = kv_cache.bytes_per_token(lm.model)
    monkeypatch.setattr(kv_cache, "free_memory", lambda device: int(100 * per_token / kv_cache.MEMORY_SHARE) + 1)
    assert kv_cache.fitting_tokens(lm.model) == 100
    prompt = len(lm.encode("The quick brown"))
    with pytest.raises(BadRequest, match="KV cache need .* more than the memory free now") as e:
        run(lm, temperature=0, max_tokens=120)
    assert e.value.hint == f"ask for at most {100 - prompt} tokens"
    bounded = run(lm, temperature=0)  # no max_tokens: up to what memory holds
    assert bounded.usage["completion_tokens"] == 100 - prompt and bounded.finish_reason == "length"


def test_scores_that_are_not_numbers_are_an_error_not_a_token():
    """Damaged weights can make NaN logits: sampling says so instead of returning an id past the
    vocabulary (which the embedding would then index out of range)."""
    from ownlm.errors import ModelFormatError

    logits = torch.tensor([0.5, float("nan"), 1.0])
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=1.0)):
        with pytest.raises(ModelFormatError, match="not numbers"):
            sample(logits, params, torch.Generator().manual_seed(0))
    masked = torch.full((4,), -math.inf)
    with pytest.raises(ModelFormatError, match="probability above zero"):
        sample(masked, SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))


class _Pieces:
    """A tokenizer whose token i is the text piece pieces[i] (for TextAssembler alone)."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special=True):
        return "".join(self.pieces[i] for i in ids)


def test_stop_strings_cut_at_the_earliest_and_hold_back_only_what_could_become_one():
    """TextAssembler against a direct reading of the rule on random texts over a small alphabet
    (overlapping and repeating stop strings: "aab" in "aaab", "abab" in "ababab"), fed in random
    pieces: after the first piece that completes a stop string the text is cut where the earliest
    stop string in it starts, every piece handed out is final, and text is held back only while
    the text so far ends with the start of a stop string."""
    import random

    from ownlm.engine.generate import TextAssembler

    rng = random.Random(0)
    for trial in range(400):
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 40)))
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 3))]
        pieces, at = [], 0
        while at < len(text):
            n = rng.randint(1, 5)
            pieces.append(text[at:at + n])
            at += n
        want, found = "", []
        for piece in pieces:
            want += piece
            found = [i for i in (want.find(s) for s in stops) if i != -1]
            if found:
                want = want[:min(found)]
                break
        asm = TextAssembler(_Pieces(pieces), stops)
        out = ""
        for i in range(len(pieces)):
            out += asm.push(i)
            sofar = "".join(pieces[:i + 1])
            if not asm.stopped:  # held: the longest end of the text that starts a stop string
                held = max((n for s in stops for n in range(1, len(s)) if sofar.endswith(s[:n])), default=0)
                assert out == sofar[:len(sofar) - held], (trial, text, stops)
            assert want.startswith(out)
            if asm.stopped:
                break
        out += asm.finish()
        assert out == want == asm.text and asm.stopped == bool(found), (trial, text, stops)


def test_long_stop_strings_cost_a_token_its_own_characters():
    """16 stop strings of 100,000 characters and an answer that keeps almost matching them: each
    piece's work is its own characters' (the matcher's steps are counted, not timed)."""
    from ownlm.engine import generate

    stops = ["a" * 99_999 + c for c in "bcdefghijklmnopq"]
    asm = generate.TextAssembler(_Pieces(["a" * 8] * 4000), stops)
    steps = 0
    feed = generate._StopMatcher.feed

    def counted(self, piece):
        nonlocal steps
        steps += len(piece)
        return feed(self, piece)

    generate._StopMatcher.feed = counted
    try:
        for i in range(4000):
            assert asm.push(i) == ""  # 32,000 a's: all of them could still start a stop string
    finally:
        generate._StopMatcher.feed = feed
    assert steps == 16 * 32_000 and not asm.stopped
    assert asm.finish() == "a" * 32_000

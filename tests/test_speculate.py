"""Speculative decoding (engine/speculate.py) on tiny random models: greedy tokens equal plain
greedy decoding's (prompt lookup and a draft model, several families, bf16 / int4 / float32),
sampled tokens follow plain sampling's distribution (and a sampler without the correction step
fails the same test), stops and budgets hold, a draft with another vocabulary is refused."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from scipy.stats import chisquare

import ownlm
from conftest import build_hf_model, build_tokenizer
from ownlm.cli.main import main
from ownlm.engine import speculate
from ownlm.engine.generate import StepStats, TextStream, generate_ids
from ownlm.engine.sampling import SamplingParams, distribution, draw
from ownlm.errors import BadRequest

GEMMA3 = dict(head_dim=16, sliding_window=6, num_hidden_layers=3, query_pre_attn_scalar=24,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
              hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
PROMPTS = [
    # repeats itself: prompt lookup finds continuations
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The quick",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\ndef add(a, b):\n",
    "Numbers: 0 1 2 3",
    "Un café, s'il vous plaît.",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """On a shared CPU, two threads' barriers wait for each other's time slices: these tiny models
    decode ~30x faster on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(hf_models, tmp_path_factory):
    base = tmp_path_factory.mktemp("spec")
    return {**hf_models, "gemma3_text": build_hf_model(base / "gemma3", "gemma3_text", seed=4, **GEMMA3),
            "draft": build_hf_model(base / "draft", "llama", seed=9, num_hidden_layers=1),
            "other-vocab": _other_vocab(base / "other")}


def _other_vocab(folder):
    path = build_hf_model(folder, "llama", seed=5, num_hidden_layers=1)
    build_tokenizer(path, vocab_size=280)  # a smaller vocabulary than the targets' 300
    return path


def _both(lm, prompt: str, proposer=None, **kw):
    """(plain tokens, speculative tokens, speculative stats) for the same settings."""
    ids = lm.encode(prompt)
    p = SamplingParams(**{"temperature": 0, "max_tokens": 32, **kw})
    plain = list(generate_ids(lm.model, ids, p))
    stats = StepStats()
    spec = list(speculate.generate_ids(lm.model, ids, p, (), stats, proposer, adaptive=False))
    return plain, spec, stats


@pytest.mark.parametrize("family,dtype,quant", [("llama", "auto", "auto"), ("llama", "auto", "int4"),
                                                ("llama", "float32", "auto"), ("qwen2", "auto", "auto"),
                                                ("mistral", "auto", "auto"), ("gemma3_text", "auto", "auto")])
def test_prompt_lookup_greedy_tokens_are_plain_greedy_tokens(folders, family, dtype, quant):
    lm = ownlm.load(str(folders[family]), dtype=dtype, quant=quant)
    kept = 0
    for i, prompt in enumerate(PROMPTS):
        plain, spec, stats = _both(lm, prompt, repetition_penalty=1.2 if i == 3 else 1.0)
        assert spec == plain, (family, prompt)
        assert stats.accepted <= stats.drafted
        kept += stats.accepted
    assert kept > 0  # random models repeat themselves: lookup finds continuations and they are kept


def test_prompt_lookup_follows_the_passage_being_copied():
    """An answer copying the prompt's first passage: its last tokens (3 7 8) also recur later in the
    prompt, followed by other tokens. The guess continues the copied passage, whose earlier tokens
    agree with the answer's, not the latest occurrence; with no agreeing context, the latest."""
    prompt = [1, 2, 3, 7, 8, 4, 5, 6, 0, 9, 3, 7, 8, 20, 21, 22, 0]
    history = prompt + [1, 2, 3, 7, 8]
    params = SamplingParams(temperature=0)
    guess, _ = speculate.PromptLookup(k=3).propose(history, 3, params, None, len(prompt))
    assert guess == [4, 5, 6]
    guess, _ = speculate.PromptLookup(k=3).propose(prompt + [30, 31, 3, 7, 8], 3, params, None, len(prompt))
    assert guess == [20, 21, 22]


def test_one_missed_pass_after_kept_ones_does_not_stop_speculating():
    """The economy weighs passes by the tokens they yield: a pass that keeps nothing (an edit
    departing from the copied text) after passes that kept 16 guesses each costs itself, not the
    next tokens' speculation; passes that keep nothing, in a row, stop it (and it rests)."""
    economy = speculate._Economy(probe=0)
    economy.stepped(0.007)  # a plain step: 7 ms
    for _ in range(3):
        assert economy.speculating()
        economy.passed(0.055, 17)  # 16 guesses kept and the token after them: 3.2 ms a token
    economy.passed(0.020, 1)  # a miss: 20 ms for one token, alone 3 steps' time
    assert economy.speculating()
    economy.passed(0.010, 1)
    assert economy.speculating()
    misses = 2
    while economy.speculating():
        economy.passed(0.020, 1)
        misses += 1
    assert misses == 4  # resting now, for `hold` tokens
    rested = 1 + sum(not economy.speculating() for _ in range(7))
    assert rested == 8 and economy.speculating()

    alone = speculate._Economy(probe=0)  # with no kept passes behind it, one miss rests at once
    alone.stepped(0.007)
    alone.passed(0.020, 1)
    assert not alone.speculating()


def test_draft_model_greedy_tokens_are_plain_greedy_tokens(folders):
    lm = ownlm.load(str(folders["llama"]))
    draft = ownlm.load(str(folders["draft"]))
    for prompt in PROMPTS[:3]:
        plain, spec, stats = _both(lm, prompt, speculate.DraftModel(draft.model, k=3))
        assert spec == plain
        assert stats.drafted > 0
    # through the API, by reference: the same text, and the counts in the timings
    a = lm.generate(PROMPTS[1], temperature=0, max_tokens=24, stop_token_ids=[])
    b = lm.generate(PROMPTS[1], temperature=0, max_tokens=24, stop_token_ids=[], speculate=str(folders["draft"]))
    assert b.token_ids == a.token_ids and b.text == a.text
    assert b.timings["drafted_tokens"] > 0 and 0 <= b.timings["acceptance_rate"] <= 1
    assert "drafted_tokens" not in a.timings


def test_a_draft_with_another_vocabulary_is_refused(folders):
    lm = ownlm.load(str(folders["llama"]))
    with pytest.raises(BadRequest, match="different vocabulary"):
        lm.generate("hi", max_tokens=4, speculate=str(folders["other-vocab"]))
    assert main(["run", str(folders["llama"]), "hi", "--draft", str(folders["other-vocab"])]) == 2


def _speculative(lm, prompt: str, **kw):
    """A Completion through TextStream with prompt lookup guessing at every chance."""
    params = lm.params(**{"temperature": 0, "stop_token_ids": [], **kw})
    source = functools.partial(speculate.generate_ids, adaptive=False)
    return TextStream(lm.model, lm.tokenizer, lm.encode(prompt), params, source).run()


def test_stops_and_budgets_hold(folders):
    lm = ownlm.load(str(folders["llama"]))
    prompt = PROMPTS[1]  # this model's greedy answer loops: lookup guesses are kept
    full = lm.generate(prompt, temperature=0, max_tokens=30, stop_token_ids=[])
    spec = _speculative(lm, prompt, max_tokens=30)
    assert spec.token_ids == full.token_ids and spec.finish_reason == "length" and len(spec.token_ids) == 30
    assert spec.timings["accepted_tokens"] > 0
    for n in (1, 2, 5):  # the budget counts kept guesses too
        assert _speculative(lm, prompt, max_tokens=n).token_ids == full.token_ids[:n]
    # a stop string inside a run of kept guesses cuts exactly where plain decoding cuts
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
    cut = lm.generate(prompt, temperature=0, max_tokens=30, stop=[stop], stop_token_ids=[])
    spec_cut = _speculative(lm, prompt, max_tokens=30, stop=[stop])
    assert spec_cut.text == cut.text and spec_cut.finish_reason == "stop"
    # a stop token that a guess would bring ends the answer before it
    token = full.token_ids[12]
    want = full.token_ids[:full.token_ids.index(token)]
    got = _speculative(lm, prompt, max_tokens=30, stop_token_ids=[token])
    assert got.token_ids == want and got.finish_reason == "stop"


def _chi2_pvalue(samples: list[tuple[int, int]], exact: dict[tuple[int, int], float]) -> float:
    """Goodness of fit of (first, second) token pairs to their exact probabilities; cells expected
    fewer than 5 times are pooled."""
    n = len(samples)
    counts: dict[tuple[int, int], int] = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    assert set(counts) <= set(exact), "a pair the target cannot produce"
    big = sorted((c for c in exact if exact[c] * n >= 5), key=lambda c: -exact[c])
    obs = [counts.get(c, 0) for c in big]
    exp = [exact[c] * n for c in big]
    rest_obs, rest_exp = n - sum(obs), n - sum(exp)
    if rest_exp >= 5:
        obs, exp = obs + [rest_obs], exp + [rest_exp]
    else:  # too rare to be a cell of its own: pooled with the least likely one
        obs[-1], exp[-1] = obs[-1] + rest_obs, exp[-1] + rest_exp
    return float(chisquare(obs, exp).pvalue)


def _sampled_pairs(lm, ids, params, proposer_factory, n):
    out = []
    for seed in range(n):
        p = SamplingParams(**{**params, "seed": seed, "max_tokens": 3})  # 3: room for a guess at the 2nd
        toks = list(speculate.generate_ids(lm.model, ids, p, (), StepStats(), proposer_factory(), adaptive=False))
        out.append((toks[0], toks[1]))
    return out


def _exact_pairs(lm, ids, params) -> dict[tuple[int, int], float]:
    """P(first, second) from full forwards and the sampler's own distribution."""
    p = SamplingParams(**params)
    with torch.inference_mode():
        none = torch.tensor([], dtype=torch.long)
        first = distribution(lm.model(torch.tensor([ids]))[0, -1], p, torch.tensor(ids), none).double()
        first /= first.sum()
        exact = {}
        for a in torch.nonzero(first).flatten().tolist():
            logits = lm.model(torch.tensor([ids + [a]]))[0, -1]
            second = distribution(logits, p, torch.tensor(ids + [a]), torch.tensor([a])).double()
            second /= second.sum()
            for b in torch.nonzero(second).flatten().tolist():
                exact[(a, b)] = float(first[a] * second[b])
    return exact


def _uncorrected(row, d, q, params, generator, ctx, out):
    """A wrong verifier: keeps guesses by p/q but on a miss draws from p itself, not from
    max(0, p - q): guessed tokens come out too often."""
    p = distribution(row, params, ctx, out).double()
    p = p / p.sum()
    keep = p[d] if q is None else min(1.0, float(p[d] / q[d]))
    if torch.rand((), dtype=torch.float64, generator=generator) < keep:
        return speculate._Verdict(True, d)
    return speculate._Verdict(False, draw(p, generator))


def test_sampled_tokens_follow_plain_sampling_and_a_wrong_verifier_fails(folders, monkeypatch):
    lm = ownlm.load(str(folders["llama"]))
    ids = lm.encode("a b a b a b a")
    params = {"temperature": 1.5, "top_k": 4, "repetition_penalty": 1.1}
    exact = _exact_pairs(lm, ids, params)
    n = 600
    second: dict[int, float] = {}
    for (_, b), pr in exact.items():
        second[b] = second.get(b, 0.0) + pr
    likely = max(second, key=second.get)  # guessed at every second position, as a lookup would

    def guess():
        return _Guess(likely)

    assert _chi2_pvalue(_sampled_pairs(lm, ids, params, guess, n), exact) > 1e-3
    draft = ownlm.load(str(folders["draft"]))
    drafted = _sampled_pairs(lm, ids, params, lambda: speculate.DraftModel(draft.model, k=2), n)
    assert _chi2_pvalue(drafted, exact) > 1e-3
    # the same seeds through a verifier without the correction: far off
    monkeypatch.setattr(speculate, "_judge", _uncorrected)
    assert _chi2_pvalue(_sampled_pairs(lm, ids, params, guess, n), exact) < 1e-8


class _Guess:
    """A proposer that always guesses `token` (a point mass, as prompt lookup's guesses are)."""

    def __init__(self, token: int):
        self.token = token

    def propose(self, history, room, params, generator, prompt_len):
        return ([self.token], None) if room > 0 else ([], None)

    def feedback(self, drafted, accepted):
        pass


def test_cli_run_and_bench_speculate(folders, capsys):
    model = str(folders["llama"])
    args = ["run", model, PROMPTS[1], "--raw", "--temperature", "0", "--max-tokens", "20", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(args + ["--speculate", "ngram"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["text"] == plain["text"] and spec["token_ids"] == plain["token_ids"]
    t = spec["timings"]
    assert 0 <= t["accepted_tokens"] <= t["drafted_tokens"] and 0 <= t["acceptance_rate"] <= 1
    assert main(["bench", model, "--prompt-tokens", "32", "--gen-tokens", "16", "--speculate", "ngram", "--json"]) == 0
    sp = json.loads(capsys.readouterr().out)["speculative"]
    assert sp["same_tokens"] and sp["speedup"] > 0


def test_speculation_reuses_the_prefix_cache_and_keeps_plain_greedy_tokens(folders):
    from ownlm.engine import prefix_cache

    lm = ownlm.load(str(folders["llama"]))
    first, longer = PROMPTS[0], PROMPTS[0] + " fox jumps over the lazy dog. The quick"
    kw = dict(temperature=0, max_tokens=24, stop_token_ids=[])
    prefix_cache.attach(lm.model, prefix_cache.PrefixCache(0))  # plain decoding without any cache
    plain = {p: lm.generate(p, **kw) for p in (first, longer)}
    assert all(c.timings["cached_tokens"] == 0 for c in plain.values())
    pc = prefix_cache.PrefixCache(64 << 20)
    prefix_cache.attach(lm.model, pc)
    try:
        a = lm.generate(first, speculate="ngram", **kw)  # fills the cache: prompt, then prompt + answer
        assert a.timings["cached_tokens"] == 0 and a.token_ids == plain[first].token_ids
        stored = pc.stats()["blocks"]
        assert stored * pc.block >= len(lm.encode(first)) // pc.block * pc.block > 0
        for prompt in (first, longer):  # identical, then extended: both start from cached blocks
            b = lm.generate(prompt, speculate="ngram", **kw)
            assert b.timings["cached_tokens"] > 0, prompt
            assert b.token_ids == plain[prompt].token_ids, prompt
        # the answer was cached too: a next turn made of prompt + answer reuses past the prompt
        turn = lm.encode(first) + a.token_ids + lm.encode(" and")
        stats = StepStats()
        p = SamplingParams(temperature=0, max_tokens=8)
        list(speculate.generate_ids(lm.model, turn, p, (), stats, adaptive=False))
        assert stats.cached > len(lm.encode(first)) // pc.block * pc.block  # past the prompt's last whole block
    finally:
        prefix_cache.attach(lm.model, None)


class _Counting(speculate.PromptLookup):
    """Prompt lookup that counts what its guesses came to."""

    def __init__(self):
        super().__init__()
        self.drafted = self.kept = 0

    def feedback(self, drafted, accepted):
        super().feedback(drafted, accepted)
        self.drafted += drafted
        self.kept += accepted


@pytest.mark.parametrize("family,quant", [("llama", "auto"), ("llama", "int4"), ("gemma3_text", "auto"),
                                          ("gemma3_text", "int4")])
def test_batch_scheduler_speculates_per_sequence_with_plain_tokens(folders, family, quant):
    """int4: the batch's rows and every guess go through one call of the CPU kernels' decode step
    (engine/cpu_step.py); elsewhere the step, then a check per speculating sequence."""
    from ownlm.engine import prefix_cache
    from ownlm.engine.cpu_step import CpuDecode
    from ownlm.engine.scheduler import Scheduler, run_all
    from ownlm.model import kernels

    lm = ownlm.load(str(folders[family]), quant=quant)
    prefix_cache.attach(lm.model, prefix_cache.PrefixCache(0))
    sched = Scheduler(lm.model, max_running=4, prefill_chunk=7)
    if quant == "int4" and kernels.load() is not None:
        assert isinstance(sched.stepper, CpuDecode) and sched.stepper.plan() is not None
    try:
        greedy = [dict(prompt=lm.encode(p), params=SamplingParams(temperature=0), limit=30) for p in PROMPTS]
        seeded = [dict(prompt=lm.encode(p), params=SamplingParams(temperature=0.8, top_k=5, seed=3), limit=20)
                  for p in PROMPTS[:2]]
        plain = run_all(sched, greedy + seeded)
        proposers = [_Counting() for _ in greedy + seeded]
        # speculating and plain sequences in one batch: odd ones speculate, then all of them do
        mixed = run_all(sched, [dict(r, proposer=proposers[i] if i % 2 else None)
                                for i, r in enumerate(greedy + seeded)])
        assert mixed == plain
        both = run_all(sched, [dict(r, proposer=p) for r, p in zip(greedy + seeded, proposers)])
        assert both == plain  # greedy: plain greedy tokens; seeded: the same tokens for the seed
        assert sum(p.kept for p in proposers) > 0 and all(p.kept <= p.drafted for p in proposers)
    finally:
        sched.close()
        prefix_cache.attach(lm.model, None)


def test_server_speculate_field_keeps_greedy_text_and_refuses_bad_values(folders, monkeypatch):
    import openai

    from ownlm.server import ModelPool, Server

    lm = ownlm.load(str(folders["llama"]))
    kept = []
    feedback = speculate.PromptLookup.feedback
    monkeypatch.setattr(speculate.PromptLookup, "feedback",
                        lambda self, d, a: (kept.append(a), feedback(self, d, a))[1])
    drafted = []
    propose = speculate.DraftModel.propose
    monkeypatch.setattr(speculate.DraftModel, "propose", lambda self, *a: drafted.append(propose(self, *a)[0]) or
                        (drafted[-1], None))
    models = {"tiny": lm, "draft": ownlm.load(str(folders["draft"])), "other": ownlm.load(str(folders["other-vocab"]))}
    pool = ModelPool(list(models), loader=lambda ref, **_: models[ref], max_loaded=1, max_running=4)
    pool.preload()
    with Server(pool, port=0) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": PROMPTS[0]}]
        kw = dict(model="tiny", temperature=0, max_tokens=40)
        plain = client.chat.completions.create(messages=messages, **kw).choices[0].message.content
        spec = client.chat.completions.create(messages=messages, extra_body={"speculate": "ngram"}, **kw)
        assert spec.choices[0].message.content == plain
        pieces = client.chat.completions.create(messages=messages, stream=True, extra_body={"speculate": "ngram"}, **kw)
        assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == plain
        assert sum(kept) > 0  # guesses were made and kept on the server's engine
        for prompt in PROMPTS[:2]:
            want = client.completions.create(prompt=prompt, **kw).choices[0].text
            for how in ("ngram", "draft"):
                got = client.completions.create(prompt=prompt, extra_body={"speculate": how}, **kw).choices[0].text
                assert got == want, (prompt, how)
        assert any(drafted)  # the draft model guessed
        for bad, says in (("no-such-model", "neither \"ngram\" nor a model this server offers"),
                          (str(folders["draft"]), "nor a model this server offers"),  # no paths: offered models only
                          ("other", "different vocabulary"), (3, "speculate"), ("", "speculate")):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(messages=messages, extra_body={"speculate": bad}, **kw)
            assert says in str(e.value), (bad, str(e.value))
            assert e.value.body["param"] == "speculate"
        assert client.chat.completions.create(messages=messages, **kw).choices[0].message.content == plain

"""The batch scheduler without a server: sequences batched together get exactly the tokens they
get alone, prompt scoring equals a plain forward, cancellation and overload behave."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import ownlm
from ownlm.engine.generate import generate_ids
from ownlm.engine.sampling import SamplingParams
from ownlm.engine.scheduler import Overloaded, Request, Scheduler, run_all


@pytest.fixture(scope="module")
def tiny(hf_models):
    return ownlm.load(str(hf_models["llama"]), dtype="float32")


def _requests(lm, n: int, limit: int = 40):
    texts = ["The quick brown fox", "def add(a, b):", "Owning your model", "Numbers: 0 1 2 3",
             "Un café", "The lazy dog", "print(add(2, 3))", "nobody can change its price"]
    out = []
    for i in range(n):
        prompt = lm.encode(texts[i % len(texts)] * (1 + i % 3))  # different lengths
        params = SamplingParams(temperature=0 if i % 2 == 0 else 0.9, seed=i, max_tokens=limit,
                                top_k=0 if i % 4 else 20, repetition_penalty=1.0 if i % 3 else 1.2)
        out.append(dict(prompt=prompt, params=params, limit=limit - (i % 5)))
    return out


@pytest.mark.parametrize("family,dtype,quant", [("llama", "float32", "none"), ("mistral", "float32", "none"),
                                                 ("mistral", "bfloat16", "int4")])
def test_batched_equals_alone(hf_models, family, dtype, quant):
    """mistral: sliding window 8; int4 in bfloat16: the one-call decode step and a bf16 cache."""
    lm = ownlm.load(str(hf_models[family]), dtype=dtype, quant=quant)
    reqs = _requests(lm, 8)
    alone = [list(generate_ids(lm.model, r["prompt"], r["params"])) [: r["limit"]] for r in reqs]
    sched = Scheduler(lm.model, max_running=8, prefill_chunk=7)
    try:
        solo = [run_all(sched, [r])[0] for r in reqs]
        together = run_all(sched, reqs)
    finally:
        sched.close()
    assert solo == alone
    assert together == alone
    assert len({len(x) for x in together}) > 1  # sequences joined and left at different steps


def test_prompt_logprobs_equal_a_plain_forward(tiny):
    prompt = tiny.encode("The quick brown fox jumps over the lazy dog")
    got = {}
    done = threading.Event()

    def emit(ev):
        if ev.kind == "prompt":
            got["scores"] = ev.prompt_logprobs
        if ev.kind in ("done", "error"):
            got["end"] = ev
            done.set()

    sched = Scheduler(tiny.model, prefill_chunk=5)
    try:
        sched.submit(Request(prompt=prompt, params=SamplingParams(temperature=0), limit=0, emit=emit,
                             prompt_logprobs=2))
        assert done.wait(30)
    finally:
        sched.close()
    with torch.inference_mode():
        lp = torch.log_softmax(tiny.model(torch.tensor([prompt]))[0].float(), -1)
    scores = got["scores"]
    assert scores[0] is None and len(scores) == len(prompt)
    for i in range(1, len(prompt)):
        assert scores[i].logprob == pytest.approx(float(lp[i - 1, prompt[i]]), abs=1e-5)
        assert [t for t, _ in scores[i].top] == lp[i - 1].topk(2).indices.tolist()
    assert got["end"].reason == "length"


def test_cancel_frees_the_slot_and_overload_is_refused(tiny):
    sched = Scheduler(tiny.model, max_running=1, max_queue=0)
    events = []
    try:
        long = Request(prompt=tiny.encode("The quick"), params=SamplingParams(temperature=0.5, seed=1,
                                                                               logit_bias=((2, -100.0),)),
                       limit=200, emit=events.append)
        sched.submit(long)
        with pytest.raises(Overloaded):
            sched.submit(Request(prompt=[1, 2], params=SamplingParams(), limit=1, emit=lambda ev: None))
        long.cancel()
        deadline = time.monotonic() + 10
        while not (events and events[-1].kind == "done") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sched.stats()["running"] == 0
        assert events[-1].kind == "done" and events[-1].reason == "cancelled"
        assert run_all(sched, [dict(prompt=[1, 2, 3], params=SamplingParams(temperature=0), limit=3)])[0]
    finally:
        sched.close()


def test_a_prompt_that_fails_fails_alone(tiny, monkeypatch):
    """One request's prefill raising (out of memory growing the cache, a prompt-cache file that
    cannot be read) ends that request with its error; the others, running or queued, get the
    tokens they get alone, and each request has one last event."""
    from ownlm.engine import scheduler as scheduler_module

    requests = _requests(tiny, 4, limit=12)
    alone = [list(generate_ids(tiny.model, r["prompt"], r["params"]))[: r["limit"]] for r in requests]
    bad = tiny.encode("this prompt fails")
    real = scheduler_module.Scheduler._prefill_chunk

    def prefill(self, s):
        if list(s.req.prompt) == bad:
            raise MemoryError("no room for this prompt")
        return real(self, s)

    monkeypatch.setattr(scheduler_module.Scheduler, "_prefill_chunk", prefill)
    sched = Scheduler(tiny.model, max_running=3, prefill_chunk=5)
    events: list[list] = [[] for _ in range(5)]
    try:
        reqs = [Request(emit=events[i].append, **r) for i, r in enumerate(requests[:2])]
        reqs.append(Request(prompt=bad, params=SamplingParams(temperature=0), limit=5, emit=events[2].append))
        reqs += [Request(emit=events[3 + i].append, **r) for i, r in enumerate(requests[2:])]
        for r in reqs:
            sched.submit(r)
        deadline = time.monotonic() + 60
        while not all(e and e[-1].kind in ("done", "error") for e in events) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        sched.close()
    finals = [[e for e in evs if e.kind in ("done", "error")] for evs in events]
    assert all(len(f) == 1 for f in finals)
    assert finals[2][0].kind == "error" and "no room for this prompt" in str(finals[2][0].error)
    got = [[e.token for e in evs if e.kind == "token"] for i, evs in enumerate(events) if i != 2]
    assert got == alone and all(f[0].kind == "done" for i, f in enumerate(finals) if i != 2)


def test_requests_wait_while_the_cache_could_not_grow_to_hold_them(tiny, monkeypatch):
    """The cache is one block, slots x the longest sequence, so each admission beside running
    sequences must fit the memory free now: with none free beyond what the cache holds, requests
    run one at a time (alone, a request always runs); with plenty, together. The tokens are the
    same either way."""
    from ownlm.engine import kv_cache

    reqs = _requests(tiny, 4, limit=16)
    alone = [list(generate_ids(tiny.model, r["prompt"], r["params"]))[: r["limit"]] for r in reqs]
    for free, most in ((0, 1), (1 << 40, 4)):
        monkeypatch.setattr(kv_cache, "free_memory", lambda device, free=free: free)
        peak: list[int] = []
        sched = Scheduler(tiny.model, max_running=4, on_step=lambda s, peak=peak: peak.append(s.stats()["running"]))
        try:
            got = run_all(sched, reqs)
        finally:
            sched.close()
        assert got == alone
        assert max(peak) == most, (free, peak)

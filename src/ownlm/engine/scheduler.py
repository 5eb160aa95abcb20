"""Continuous batching: one engine loop (a thread) per loaded model.

Each iteration admits a waiting request when a slot is free, runs one prefill chunk of the
request being admitted, then one decode forward for every running sequence, samples each row with
that sequence's own settings and generator, hands the tokens to the request's `emit` callback and
retires the finished and the cancelled. Requests join and leave between decode steps, so a short
request never waits for a long one to finish.

Running sequences occupy KV-cache slots 0..n-1 (a retired sequence's slot is refilled by moving the
last one into it), so a decode step attends over one contiguous slice of the cache. The cache is
one block, slots x positions, so it may grow to the running sequences' count times the longest's
end (prompt + limit; twice it, as lengths grow geometrically): a request is admitted beside
others only while that fits the cache's memory and a share of the memory free now; otherwise it
waits for sequences to finish (alone, it runs: its own budget was checked against free memory
when it came).

A request being admitted first takes the longest start of its prompt that the model's prefix
cache holds (engine/prefix_cache.py), copied into its slot; its prompt is cached once prefilled,
and its answer too when it retires, so requests sharing a system prompt, and the next turn of a
conversation, prefill only what is new.

A request with a `proposer` (engine/speculate.py: prompt lookup or a draft model) speculates in its
decode steps: its guesses go through the batch's step as rows of their own in its slot (on a CPU
with ownlm's kernels: one call, each row the bits of a one-token step; elsewhere the batch's step
scores the first guess and speculate.verify_forward the rest), and each row is sampled as any
other; guesses are kept while the token sampled is the guess (for certain guesses this is exact,
greedy or sampled), the rest of the slot is overwritten later.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol, Sequence

import torch

from ..errors import OwnlmError
from . import kv_cache, prefix_cache
from .cpu_step import CpuDecode
from .kv_cache import KVCache, span
from .generate import PREFILL_CHUNK
from .sampling import SamplingParams, make_generator, sample
from .speculate import verify_forward
from .steppers import decode_stepper


class Overloaded(OwnlmError):
    """Every running slot and the whole queue are taken."""


class Constraint(Protocol):
    """A grammar that decides which tokens may come next (see engine/constraints.py)."""

    def mask(self, logits: torch.Tensor) -> torch.Tensor: ...
    def advance(self, token: int) -> None: ...
    def finished(self) -> bool: ...


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely alternatives, best first


@dataclass
class Event:
    kind: str  # "token" | "prompt" | "done" | "error"
    token: int = -1
    logprob: TokenLogprob | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    reason: str = ""  # done: "stop" | "length" | "cancelled"
    error: BaseException | None = None


@dataclass
class Request:
    """What a caller submits. `emit` is called from the engine thread, in order, for every event;
    it must not block. `limit` is how many tokens may be generated (0: only score the prompt)."""

    prompt: Sequence[int]
    params: SamplingParams
    limit: int
    emit: Callable[[Event], None]
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None  # alternatives per generated token; None: no logprobs
    prompt_logprobs: int | None = None  # alternatives per prompt token; None: not computed
    constraint: Constraint | None = None
    # a stop token (stop_ids) still comes out as a last token event, with its logprob, as OpenAI's
    # legacy completions and vLLM count and score it; off, the sequence just ends
    keep_stop: bool = False
    # speculative decoding for this sequence (engine/speculate.py): a Proposer of its own (prompt lookup or
    # a draft model) whose guesses are verified in its decode steps; None: one token per step
    proposer: Any = None
    cancelled: bool = False
    cached: int = 0  # prompt tokens taken from the prefix cache, set by the engine before the first token
    drafted: int = 0  # guesses proposed, and those kept (accepted), counted by the engine
    accepted: int = 0

    def cancel(self) -> None:
        self.cancelled = True  # read by the engine thread at its next step


@dataclass
class _Seq:
    req: Request
    generator: torch.Generator
    slot: int = -1
    cached: int = 0  # positions written to the KV cache
    out: list[int] = field(default_factory=list)
    prompt_scores: list[TokenLogprob | None] = field(default_factory=list)
    prompt_t: torch.Tensor | None = None  # the prompt as a tensor, built once when penalties need it
    done: str = ""
    looked: bool = False  # the prefix cache was asked for the prompt's start
    hit: prefix_cache.Hit | None = None  # the cached blocks it started from, pinned while it runs
    ended: bool = False  # its last event (done or error) has been sent

    def end(self, event: Event) -> None:
        """Send the request its last event, once."""
        if not self.ended:
            self.ended = True
            self.req.emit(event)


class Scheduler:
    def __init__(self, model: torch.nn.Module, max_running: int = 8, max_queue: int = 64,
                 prefill_chunk: int = PREFILL_CHUNK, on_step: Callable[["Scheduler"], None] | None = None,
                 driver: "Driver | None" = None):
        """With a `driver`, the driver's thread runs the steps; otherwise a thread of its own."""
        self.model, self.cfg = model, model.cfg
        self.device = model.device
        self.max_running, self.max_queue, self.prefill_chunk = max_running, max_queue, prefill_chunk
        self.cache = KVCache.for_model(model, 1, 16)
        # the decode step: CUDA graphs (captured on first use) or the one-call CPU step; the
        # cache grows in place
        self.stepper = decode_stepper(model, self.cache)
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self.admitting: _Seq | None = None
        self.driver = driver
        self.cond = driver.cond if driver else threading.Condition()
        self.closed = False
        self.on_step = on_step
        self.steps = 0
        if driver:
            driver.add(self)
        else:
            self.thread = threading.Thread(target=self._loop, daemon=True, name="ownlm-engine")
            self.thread.start()

    # --- the caller's side ---------------------------------------------------------------------

    def submit(self, req: Request) -> Request:
        if len(req.prompt) + req.limit > self.cfg.context_length:
            raise ValueError("request exceeds the context; callers check budget() first")
        with self.cond:
            if self.closed:
                raise OwnlmError("the model is unloading")
            busy = len(self.running) + (self.admitting is not None)
            if busy + len(self.waiting) >= self.max_running + self.max_queue:
                raise Overloaded(f"{busy} sequences are running and {len(self.waiting)} are queued")
            self.waiting.append(_Seq(req, make_generator(req.params.seed)))
            self.cond.notify_all()
        return req

    def stats(self) -> dict[str, int]:
        with self.cond:
            return {"running": len(self.running) + (self.admitting is not None), "waiting": len(self.waiting),
                    "steps": self.steps}

    def has_work(self) -> bool:
        return self.closed or bool(self.waiting or self.running or self.admitting)

    def close(self) -> None:
        """Stop; requests still queued or running get an error event."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if self.driver is None:
            self.thread.join(timeout=10)

    # --- the engine side -----------------------------------------------------------------------

    def _loop(self) -> None:
        while not self.closed:
            with self.cond:
                while not self.has_work():
                    self.cond.wait()
            self.step()  # a closed scheduler's last step fails what is left

    def step(self) -> None:
        """One iteration: admit, prefill a chunk, decode every running sequence, retire."""
        with self.cond:
            if self.closed:
                pending = list(self.waiting) + self.running + ([self.admitting] if self.admitting else [])
                self.waiting.clear()
                self.running, self.admitting = [], None
                for s in pending:
                    self._release(s)
                    s.end(Event("error", error=OwnlmError("the model was unloaded")))
                if self.driver is not None:
                    self.driver.remove(self)
                return
            for s in [s for s in self.waiting if s.req.cancelled]:
                self.waiting.remove(s)
                s.end(Event("done", reason="cancelled"))
            if self.admitting is None and self.waiting and len(self.running) < self.max_running and \
                    (not self.running or self._fits(self.waiting[0])):
                self.admitting = self.waiting.popleft()
                self.admitting.slot = len(self.running)
        try:
            with torch.inference_mode():
                self._step()
        except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the server
            with self.cond:
                victims = self.running + ([self.admitting] if self.admitting else [])
                self.running, self.admitting = [], None
            for s in victims:
                self._release(s)
                s.end(Event("error", error=e))  # not again to one that had its last event
        self.steps += 1
        if self.on_step:
            self.on_step(self)

    def _fits(self, s: _Seq) -> bool:
        """Whether the cache can grow to hold the running sequences and s, each to its end: slots
        times the longest end (twice it: lengths grow geometrically, up to the context), within what
        it holds now and MEMORY_SHARE of the memory free."""
        seqs = [*self.running, s]
        end = max(len(x.req.prompt) + x.req.limit + 1 for x in seqs)
        longest = span(min(self.cfg.context_length, 2 * end))
        per_token = kv_cache.bytes_per_token(self.model)
        held = self.cache.slots * self.cache.max_len * per_token
        need = max(len(seqs), self.cache.slots) * max(longest, self.cache.max_len) * per_token
        # the free memory is read (/proc/meminfo) only where the cache must grow
        return need <= held or need <= held + kv_cache.free_memory(self.device) * kv_cache.MEMORY_SHARE

    def _step(self) -> None:
        if self.admitting is not None:
            s = self.admitting
            try:
                self._prefill_chunk(s)
            except Exception as e:  # noqa: BLE001 - its prompt failed (memory, a cache file): it alone, not the batch
                with self.cond:
                    if self.admitting is s:
                        self.admitting = None
                self._release(s)
                s.end(Event("error", error=e))
            else:
                self._retire()
        if self.running:
            self._decode()
            self._retire()

    def _prefill_chunk(self, s: _Seq) -> None:
        req = s.req
        if req.cancelled:
            s.done = "cancelled"
            return
        prompt = req.prompt
        if not s.looked:
            self._reuse(s)
        start = s.cached
        # chunks end on multiples of the chunk size, as they do without a cache hit
        end = min(len(prompt), (start // self.prefill_chunk + 1) * self.prefill_chunk)
        self.cache.grow(s.slot + 1, end, span(self.cfg.context_length))
        self.cache.base, self.cache.length = s.slot, end
        ids = torch.tensor([list(prompt[start:end])], dtype=torch.long, device=self.device)
        pos = torch.arange(start, end, device=self.device)[None]
        full = req.prompt_logprobs is not None
        logits = self.model(ids, pos, self.cache, last_only=not full)  # (1, T or 1, V)
        s.cached = end
        if full:
            self._score_prompt(s, start, end, logits[0])
        if end < len(prompt):
            return
        if full:
            req.emit(Event("prompt", prompt_logprobs=s.prompt_scores))
        pc = prefix_cache.of(self.model)
        if pc is not None:
            pc.store(self.model, prompt, self.cache, s.slot, len(prompt))
        assert s.slot == len(self.running)
        with self.cond:  # running from now: counted by stats (admission) before its first token is out
            self.admitting = None
            self.running.append(s)
        if req.limit == 0:
            s.done = "length"
        else:
            self._sample_safely(s, logits[0, -1])

    def _reuse(self, s: _Seq) -> None:
        """Start a sequence from the longest cached start of its prompt (not when its prompt is
        scored: every position's logits are wanted then)."""
        s.looked = True
        pc = prefix_cache.of(self.model)
        if pc is None or s.req.prompt_logprobs is not None:
            return
        s.hit = pc.lookup(self.model, s.req.prompt, self.cache)
        if s.hit.length:
            self.cache.grow(s.slot + 1, s.hit.length, span(self.cfg.context_length))
            pc.load(s.hit, self.cache, s.slot)
        s.cached = s.req.cached = s.hit.length

    def _release(self, s: _Seq, keep: bool = False) -> None:
        """A sequence leaves: with `keep`, what its slot holds (prompt and answer) is cached first."""
        pc = prefix_cache.of(self.model)
        if pc is not None and keep and s.cached:
            pc.store(self.model, list(s.req.prompt) + s.out, self.cache, s.slot, s.cached)
        if s.hit is not None:
            s.hit.release()
            s.hit = None

    def _score_prompt(self, s: _Seq, start: int, end: int, logits: torch.Tensor) -> None:
        """Log-probability of each prompt token given the tokens before it (echo + logprobs)."""
        prompt, k = s.req.prompt, s.req.prompt_logprobs or 0
        if start == 0:
            s.prompt_scores = [None]  # the first token has no context
        lp = torch.log_softmax(logits.float(), dim=-1)  # (T, V): row t predicts position start+t+1
        for t in range(end - start):
            nxt = start + t + 1
            if nxt < len(prompt):
                s.prompt_scores.append(_logprob(lp[t], prompt[nxt], k))

    def _decode(self) -> None:
        n = len(self.running)
        drafts = [self._propose(s) for s in self.running]  # guesses of the sequences that speculate
        pos_list = [s.cached for s in self.running]  # where each last token goes
        reach = max(p + 1 + len(d) for p, d in zip(pos_list, drafts))
        self.cache.grow(n + (self.admitting is not None), span(reach), span(self.cfg.context_length))
        verified: list[torch.Tensor | None] = [None] * n
        rows = self._step_rows(drafts, pos_list) if any(drafts) else None
        if rows is None:
            tokens = torch.tensor([[s.out[-1]] for s in self.running], dtype=torch.long, device=self.device)
            pos = torch.tensor(pos_list, dtype=torch.long, device=self.device)[:, None]
            rows = self.stepper.step(tokens, pos, max(pos_list) + 1)[:, -1].float().cpu()  # (n, V)
            # a speculating sequence's guesses go through its slot after the batch's step, which gave the
            # scores for the first: verify_forward's rows are what one-token steps would give
            for i, (s, d) in enumerate(zip(self.running, drafts)):
                if d:
                    start = pos_list[i] + 1
                    self.cache.base, self.cache.length = s.slot, span(start + len(d))
                    fed = torch.tensor([d], dtype=torch.long, device=self.device)
                    at = torch.arange(start, start + len(d), device=self.device)[None]
                    verified[i] = verify_forward(self.model, fed, at, self.cache)[0].float().cpu()  # (K, V)
        else:
            at = n
            for i, d in enumerate(drafts):  # the guesses' rows follow the batch's own, sequence by sequence
                if d:
                    verified[i], at = rows[at:at + len(d)], at + len(d)
        for i, s in enumerate(self.running):
            s.cached += 1
            self._sample_safely(s, rows[i])
            d, more = drafts[i], verified[i]
            if more is None:
                continue
            kept = 0
            # a guess is kept while the token the sequence's own sampler picks is the guess: for greedy
            # settings plain greedy tokens; sampled, the distribution of plain sampling (a guess that is
            # certain is kept with probability p(guess), else a draw from p without it) and, as one draw is
            # made per token either way, the same tokens for a seed
            for j, guess in enumerate(d):
                if s.done or s.out[-1] != guess:
                    break
                kept += 1
                s.cached += 1  # the guess's keys and values, written by the verification, are its own
                self._sample_safely(s, more[j])
            s.req.proposer.feedback(len(d), kept)
            s.req.drafted += len(d)
            s.req.accepted += kept

    def _step_rows(self, drafts: list[list[int]], pos_list: list[int]) -> torch.Tensor | None:
        """The batch's step and every speculating sequence's guesses in one call of the CPU stepper
        (engine/cpu_step.py: each row the bits of a one-token step): rows (n + guesses, V), the
        batch's first. None where that stepper cannot take them (the caller steps and verifies)."""
        if not isinstance(self.stepper, CpuDecode):
            return None
        tokens, pos, slots = [], [], []
        for s, p in zip(self.running, pos_list):
            tokens.append(s.out[-1])
            pos.append(p)
            slots.append(s.slot)
        for s, p, d in zip(self.running, pos_list, drafts):
            tokens += d
            pos += range(p + 1, p + 1 + len(d))
            slots += [s.slot] * len(d)
        t = torch.tensor(tokens, dtype=torch.long)[:, None]
        out = self.stepper.rows(t, torch.tensor(pos, dtype=torch.long)[:, None], torch.tensor(slots, dtype=torch.long),
                                max(pos) + 1)
        return None if out is None else out[:, -1].float().cpu()

    def _propose(self, s: _Seq) -> list[int]:
        """The guesses of a speculating sequence for its next positions: as many as may all be kept
        with one more token after them inside its budget. Drafts are guessed greedily (a certain
        guess each), so that checking them needs nothing of the draft's probabilities."""
        req = s.req
        if req.proposer is None or s.done or req.cancelled:
            return []
        room = req.limit - len(s.out) - 1
        if room <= 0:
            return []
        params = req.params if req.params.greedy else replace(req.params, temperature=0.0)
        try:
            drafts, _ = req.proposer.propose(list(req.prompt) + s.out, room, params, None, len(req.prompt))
        except Exception:  # noqa: BLE001 - a proposer that fails costs its guesses, not the answer
            req.proposer = None
            return []
        return [int(t) for t in drafts[:room]]

    def _sample_safely(self, s: _Seq, row: torch.Tensor) -> None:
        """A sequence whose sampling fails (a grammar in an error state, say) ends with an error
        event; the others in the batch go on."""
        try:
            self._sample(s, row)
        except Exception as e:  # noqa: BLE001 - reported to that request alone
            s.done = "error"
            s.end(Event("error", error=e))

    def _sample(self, s: _Seq, row: torch.Tensor) -> None:
        req, p = s.req, s.req.params
        if req.cancelled:
            s.done = "cancelled"
            return
        row = row.float().cpu()
        scored = row
        if req.constraint is not None:
            row = req.constraint.mask(row.clone())
        if p.needs_history:
            if s.prompt_t is None:
                s.prompt_t = torch.tensor(list(req.prompt), dtype=torch.long)
            out_t = torch.tensor(s.out, dtype=torch.long)
            token = sample(row, p, s.generator, torch.cat([s.prompt_t, out_t]), out_t)
        else:
            token = sample(row, p, s.generator)
        lp = _logprob(torch.log_softmax(scored, -1), token, req.logprobs) if req.logprobs is not None else None
        if token in req.stop_ids:
            if req.keep_stop:
                req.emit(Event("token", token=token, logprob=lp))
            s.done = "stop"
            return
        s.out.append(token)
        req.emit(Event("token", token=token, logprob=lp))
        if req.constraint is not None:
            req.constraint.advance(token)
            if req.constraint.finished():
                s.done = "stop"
                return
        if len(s.out) >= req.limit:
            s.done = "length"

    def _retire(self) -> None:
        if self.admitting is not None and self.admitting.done:
            self._release(self.admitting)
            self.admitting.end(Event("done", reason=self.admitting.done))
            self.admitting = None
        for s in self.running:
            if not s.done and s.req.cancelled:
                s.done = "cancelled"
        if not any(s.done for s in self.running):
            return
        keep = []
        for s in self.running:
            if s.done:
                self._release(s, keep=s.done != "error")
                s.end(Event("done", reason=s.done))  # (an errored sequence has had its last event)
            else:
                keep.append(s)
        # compact: move survivors down into the freed slots, then the one being admitted
        for i, s in enumerate(keep):
            if s.slot != i:
                self.cache.move(s.slot, i, s.cached)
                s.slot = i
        if self.admitting is not None and self.admitting.slot != len(keep):
            self.cache.move(self.admitting.slot, len(keep), self.admitting.cached)
            self.admitting.slot = len(keep)
        with self.cond:
            self.running = keep


class Driver:
    """Runs the steps of several schedulers on one thread, the caller's. Measured here: PyTorch's
    OpenMP kernels (the int4 matmul, softmax) run about twice as slow from a secondary thread as
    from the main one, so a server runs its engines on the main thread through a Driver."""

    def __init__(self):
        self.cond = threading.Condition()
        self.schedulers: list[Scheduler] = []

    def add(self, s: Scheduler) -> None:
        with self.cond:
            self.schedulers.append(s)

    def remove(self, s: Scheduler) -> None:
        with self.cond:
            if s in self.schedulers:
                self.schedulers.remove(s)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self.cond:
                busy = [s for s in self.schedulers if s.has_work()]
                if not busy:
                    self.cond.wait(0.2)
                    continue
            for s in busy:
                s.step()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()


def _logprob(lp: torch.Tensor, token: int, k: int | None) -> TokenLogprob:
    top: list[tuple[int, float]] = []
    if k:
        vals, ids = torch.topk(lp, k)
        top = [(int(i), float(v)) for i, v in zip(ids, vals)]
    value = float(lp[token])
    return TokenLogprob(token, value if math.isfinite(value) else -9999.0, top)


def run_all(scheduler: Scheduler, requests: Sequence[dict[str, Any]],
            errors: list[BaseException] | None = None) -> list[list[int]]:
    """Submit several requests at once and wait for all: token ids per request (for tests and
    benchmarks of the batch path without a server); failed requests' errors go to `errors`. A
    scheduler with a driver is stepped right here, on the caller's thread (see Driver)."""
    results: list[list[int]] = [[] for _ in requests]
    done = threading.Semaphore(0)

    def sink(i: int) -> Callable[[Event], None]:
        def emit(ev: Event) -> None:
            if ev.kind == "token":
                results[i].append(ev.token)
            elif ev.kind in ("done", "error"):
                if ev.error is not None and errors is not None:
                    errors.append(ev.error)
                done.release()
        return emit

    for i, r in enumerate(requests):
        scheduler.submit(Request(emit=sink(i), **r))
    if scheduler.driver is not None:
        while scheduler.has_work():
            scheduler.step()
    for _ in requests:
        done.acquire()
    return results

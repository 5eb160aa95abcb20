"""Exact speculative decoding for one sequence: cheap guesses of the next tokens, checked by the
model in one forward over all of them, so a run of right guesses costs one pass instead of one
step per token.

Two proposers guess:

- `PromptLookup` ("ngram"): no second model. The last 3 (else 2, else 1) tokens are looked up in
  the prompt and the answer so far, and the tokens that followed their latest earlier occurrence
  are the guess (as llama.cpp's and transformers' prompt lookup). It pays where the answer copies
  the prompt (editing code, quoting, summarizing with the source's words); on free text its
  guesses miss, so it backs off: shorter guesses after misses, then none for a while.
- `DraftModel`: a smaller model with the same vocabulary, its own KV cache, guessing K tokens
  (greedily, or sampled with the request's settings when the request samples).

Verification. The target feeds [last token, guess 1..K] at their positions through its KV cache
(`verify_forward`) and gets the next-token scores after each. Greedy: a guess is kept while it
equals the target's own choice (`sample`, the very function plain decoding calls); the first
miss is replaced by the target's choice, and the cache is rolled back by counting only the kept
positions (the rest are overwritten by the next pass; attention never reads past a query's own
position). Sampling: Leviathan et al.'s rule against the distribution plain sampling draws from
(`sampling.distribution`: penalties, temperature, top-k, min-p, top-p applied): keep guess d with
probability min(1, p(d)/q(d)), else draw from normalize(max(0, p - q)); prompt lookup's q is a
point mass on d. The tokens come out with the same distribution as plain sampling (not the same
tokens for a seed: the random numbers are used differently).

Exactness of greedy text. A plain forward over several tokens may round differently from one-token
decode steps (other attention arithmetic, rotations in the compute dtype; on a CPU with ownlm's
kernels it does not: model/ops.py's rows_attend), which could flip a near-tie argmax. So
`verify_forward` is built to be the decode step's arithmetic row by row everywhere: with
the CPU stepper it is the one-call decode step itself, the rows one sequence's tokens in one cache
slot (engine/cpu_step.py); otherwise the projections, norms and MLPs take all rows at once
(ownlm's CPU kernels give a row the same bits whatever the number of rows), and attention runs per
row through the one-token path (the attention kernel, or the module's own one-token forward),
writing the same keys and values. Where ownlm's
CPU kernels compute (bfloat16 or quantized weights on a CPU: the default on x86) greedy output is
therefore bit-identical to plain greedy decoding, asserted by tests/test_speculate.py and
bench/speculate.py. Elsewhere (float32 weights through PyTorch's BLAS, CUDA, MPS) a matmul over
several rows may sum in another order than over one, so the scores can differ in the last bits
and greedy text can differ from plain decoding where two tokens tie within that rounding.

This module's generate_ids serves generate-style calls (CLI, Python API) and uses the prefix cache
as generate.generate_ids does. The batch scheduler (the server) speculates per sequence with the
same proposers and `verify_forward` (see engine/scheduler.py), constraints included."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import torch

from ..errors import BadRequest
from ..model import ops
from ..text.tokenizer import TextTokenizer
from .cpu_step import CpuDecode
from .generate import GROW_FROM, PREFILL_CHUNK, StepStats, budget, prefill
from .kv_cache import KVCache, span
from .sampling import SamplingParams, distribution, draw, make_generator, sample
from .steppers import decode_stepper

NGRAM = "ngram"


class Proposer(Protocol):
    def propose(self, history: list[int], room: int, params: SamplingParams, generator: torch.Generator,
                prompt_len: int) -> tuple[list[int], list[torch.Tensor] | None]:
        """Up to `room` guessed next tokens after `history`, and for sampled guesses the (V,)
        probabilities each was drawn from (None: each guess is certain, a point mass)."""
        ...

    def feedback(self, drafted: int, accepted: int) -> None: ...


class PromptLookup:
    """Guesses by n-gram lookup in the prompt and the answer so far.

    Of the earlier occurrences of the last n tokens (the latest `candidates`), the one whose
    preceding tokens agree longest with the history's (up to `reach`) is followed, the latest on
    a tie: where an answer copies a passage of the prompt, that is the passage's place, not a
    phrase that recurs in it (a `def ` or `self.` in code).

    Adaptive: a guess's length doubles (up to `k_max`) while whole guesses are kept and drops to
    what was kept plus one after a miss; after `patience` passes in a row with nothing kept it
    stops guessing for `pause` tokens (doubling each time, up to 16), so on text that does not
    repeat it costs a short wasted pass every few tokens, not one per token."""

    def __init__(self, max_ngram: int = 3, k: int = 4, k_max: int = 16, patience: int = 2, candidates: int = 16,
                 reach: int = 64):
        self.max_ngram, self.k, self.k_max, self.patience = max_ngram, k, k_max, patience
        self.candidates, self.reach = candidates, reach
        # n-gram -> where it starts, in order (the latest `candidates` kept)
        self.index: list[dict[tuple[int, ...], list[int]]] = [{} for _ in range(max_ngram + 1)]
        self.indexed = [0] * (max_ngram + 1)  # n-grams starting before this are in index[n]
        self.misses = 0
        self.pause, self.resting = 4, 0

    def propose(self, history, room, params, generator, prompt_len):
        if self.resting > 0:
            self.resting -= 1
            return [], None
        k = min(self.k, room)
        if k <= 0:
            return [], None
        L = len(history)
        for n in range(min(self.max_ngram, L - 1), 0, -1):
            index = self.index[n]
            # every n-gram followed by at least one token, except the last n tokens themselves
            for j in range(self.indexed[n], L - n):
                seen = index.setdefault(tuple(history[j:j + n]), [])
                seen.append(j)
                if len(seen) > 2 * self.candidates:
                    del seen[:-self.candidates]
            self.indexed[n] = max(self.indexed[n], L - n)
            seen = index.get(tuple(history[L - n:]))
            if seen:
                j = max(seen[-self.candidates:], key=lambda j: (self._agree(history, j, L - n), j))
                return history[j + n:j + n + k], None
        return [], None

    def _agree(self, history: list[int], j: int, end: int) -> int:
        """How many tokens before positions j and `end` agree (up to `reach`)."""
        m = 0
        while m < self.reach and m < j and history[j - 1 - m] == history[end - 1 - m]:
            m += 1
        return m

    def feedback(self, drafted, accepted):
        self.k = _next_length(self.k, self.k_max, drafted, accepted)
        if accepted:
            self.misses, self.pause = 0, 4
            return
        self.misses += 1
        if self.misses >= self.patience:
            self.misses, self.resting = 0, self.pause
            self.pause = min(16, 2 * self.pause)


class Predicted:
    """Guesses from a predicted answer (OpenAI's predicted outputs: text the answer will mostly
    repeat, such as the file being edited), else by prompt lookup. While the answer follows the
    prediction, the guess is what comes next in it; where they part (an edit), the answer's last
    3 (else 2, else 1) tokens are looked up in the prediction, nearest after the place it left, and
    the guesses go on from there. The guess grows (doubling up to `k_max`) while guesses are kept."""

    def __init__(self, prediction: Sequence[int], lookup: PromptLookup | None = None, k: int = 4,
                 k_max: int = 32, max_ngram: int = 3):
        self.prediction = list(prediction)
        self.lookup = lookup if lookup is not None else PromptLookup()
        self.k, self.k_max, self.max_ngram = k, k_max, max_ngram
        self.after: dict[tuple[int, ...], list[int]] = {}  # n-gram of the prediction -> the positions after it
        for n in range(1, max_ngram + 1):
            for j in range(len(self.prediction) - n):
                self.after.setdefault(tuple(self.prediction[j:j + n]), []).append(j + n)
        self.at: int | None = 0  # the prediction's position the answer's next token should match (None: lost)
        self.last = 0  # the latest such position
        self.seen = 0  # answer tokens taken into account
        self.guessed = False  # whether the latest guess came from the prediction (whose feedback is ours)

    def propose(self, history, room, params, generator, prompt_len):
        answer = history[prompt_len:]
        for t in answer[self.seen:]:
            ok = self.at is not None and self.at < len(self.prediction) and self.prediction[self.at] == t
            self.at = self.at + 1 if ok else None
        self.seen = len(answer)
        if self.at is None:
            self.at = self._resync(answer)
        if self.at is not None:
            self.last = self.at
        k = min(self.k, room)
        self.guessed = self.at is not None and self.at < len(self.prediction) and k > 0
        if self.guessed:
            return self.prediction[self.at:self.at + k], None
        return self.lookup.propose(history, room, params, generator, prompt_len)

    def _resync(self, answer: list[int]) -> int | None:
        for n in range(min(self.max_ngram, len(answer)), 0, -1):
            places = self.after.get(tuple(answer[-n:]))
            if places:
                return min(places, key=lambda p: (p < self.last, abs(p - self.last)))
        return None

    def feedback(self, drafted, accepted):
        if not self.guessed:
            self.lookup.feedback(drafted, accepted)
        else:
            self.k = _next_length(self.k, self.k_max, drafted, accepted)


def _next_length(k: int, k_max: int, drafted: int, accepted: int) -> int:
    """The next guess's length: doubled (up to k_max) after a guess kept whole, else what was kept + 1."""
    return min(k_max, 2 * k) if accepted == drafted else max(1, accepted + 1)


class DraftModel:
    """Guesses with a smaller model sharing the target's vocabulary; one instance per sequence
    (it holds the draft's KV cache, whose first `len(seen)` positions hold `seen`)."""

    def __init__(self, model: torch.nn.Module, k: int = 4):
        self.model, self.k = model, k
        self.cache: KVCache | None = None
        self.stepper = None
        self.seen: list[int] = []

    def propose(self, history, room, params, generator, prompt_len):
        model = self.model
        k = min(self.k, room)
        if k <= 0 or len(history) + k > model.cfg.context_length:
            return [], None
        if self.cache is None:
            self.cache = KVCache.for_model(model, 1, span(len(history) + GROW_FROM))
            self.stepper = decode_stepper(model, self.cache)
        cache = self.cache
        cache.grow(1, len(history) + k, span(model.cfg.context_length))
        # roll back to what still agrees with the history; at least the last token is fed again
        same = 0
        for a, b in zip(self.seen, history):
            if a != b:
                break
            same += 1
        same = min(same, len(history) - 1)
        device = model.device
        ids = torch.tensor([history], dtype=torch.long, device=device)
        for start in range(same, len(history), PREFILL_CHUNK):
            end = min(len(history), start + PREFILL_CHUNK)
            cache.base, cache.length = 0, end
            pos = torch.arange(start, end, device=device)[None]
            logits = model(ids[:, start:end], pos, cache, last_only=True)  # (1, 1, V)
        drafts: list[int] = []
        probs: list[torch.Tensor] = []
        context = list(history)
        for i in range(k):
            row = logits[0, -1].float().cpu()
            ctx, out = _history(context, prompt_len, params)
            if params.greedy:
                token = sample(row, params, None, ctx, out)
            else:
                w = distribution(row, params, ctx, out)
                token = draw(w, generator)
                probs.append(w.double() / w.double().sum())
            drafts.append(token)
            context.append(token)
            if i + 1 < k:
                n = len(history) + i
                tokens = torch.tensor([[token]], device=device)
                logits = self.stepper.step(tokens, torch.tensor([[n]], device=device), n + 1)
        self.seen = history + drafts[:-1]
        return drafts, (None if params.greedy else probs)

    def feedback(self, drafted, accepted):
        pass


def check_vocab(target: TextTokenizer, draft: TextTokenizer, target_name: str, draft_name: str) -> None:
    """A draft must spell every token as the target does: same vocabulary, same ids."""
    a = target.tk.get_vocab(with_added_tokens=True)
    b = draft.tk.get_vocab(with_added_tokens=True)
    if a != b:
        differ = len(set(a.items()) ^ set(b.items()))
        raise BadRequest(f"the draft model {draft_name} has a different vocabulary from {target_name} "
                         f"({len(b)} tokens against {len(a)}, {differ} token-id pairs not shared)",
                         "use a draft of the same family and tokenizer (a smaller sibling), or --speculate ngram")


def _history(tokens: list[int], prompt_len: int, params: SamplingParams):
    """(context, output) tensors for penalties, only built when the settings look at them."""
    if not params.needs_history:
        return None, None
    return torch.tensor(tokens, dtype=torch.long), torch.tensor(tokens[prompt_len:], dtype=torch.long)


def _row(t: torch.Tensor | None, i: int) -> torch.Tensor | None:
    return None if t is None else t[:, :, i:i + 1]  # (B, 1 or H, T, X) -> row i


def _attend_rows(attn, h, cos, sin, mask, pos, cache) -> torch.Tensor:
    """The attention of T rows (B=1) as T one-token decode steps would compute it: the
    projections over all rows at once, the attention itself per row (each row writes its keys and
    values and attends to the positions up to its own)."""
    B, T, _ = h.shape
    qkv = attn.qkv(h)  # (B, T, (H + 2 Hkv) D): the same steps as Attention.forward before attending
    if attn.clip:
        qkv = qkv.clamp(-attn.clip, attn.clip)
    if attn.qk_norm:
        q, k, v = qkv.split(attn.sizes, dim=-1)
        q = attn.q_norm(q.reshape(B, T, attn.n_heads, attn.hd)).reshape(B, T, -1)
        k = attn.k_norm(k.reshape(B, T, attn.n_kv, attn.hd)).reshape(B, T, -1)
        qkv = torch.cat([q, k, v], dim=-1)
    ys = []
    for t in range(T):
        y = ops.attend_decode(qkv[:, t:t + 1], attn.n_heads, attn.n_kv, attn.hd, _row(cos, t), _row(sin, t),
                              pos[:, t:t + 1], cache, attn.layer, attn.window, attn.scale)
        if y is None:  # no decode kernel here (nothing was written): the module's one-token path per row
            return torch.cat([attn(h[:, i:i + 1], _row(cos, i), _row(sin, i), _row(mask, i), pos[:, i:i + 1], cache)
                              for i in range(T)], dim=1)
        ys.append(y)
    return attn.o(torch.cat(ys, dim=1))  # (B, T, C)


def verify_forward(model: torch.nn.Module, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache,
                   stepper=None) -> torch.Tensor:
    """tokens, pos: (1, T) -> logits (1, T, V), each row what a one-token decode step at its
    position would give (see the module's note on exactness); keys and values are written at
    `pos` in slot cache.base. The caller sets cache.length to cover pos. With the cache's CPU
    stepper (engine/cpu_step.py) every row goes through its one kernel call when it can."""
    if isinstance(stepper, CpuDecode):
        rows = stepper.rows(tokens.T, pos.T, torch.full((tokens.shape[1],), cache.base, dtype=torch.long),
                            cache.length)
        if rows is not None:
            return rows.transpose(0, 1)  # (T, 1, V) -> (1, T, V)
    x = model.embed_tokens(tokens)  # (1, T, C)
    kinds = model.attention_inputs(pos, cache.length, x.dtype, decode=True)  # one-token rotations and masks
    for block in model.layers:  # Block.forward with the attention above
        cos, sin, mask = kinds[block.local]
        if block.parallel:
            h = block.attn_norm(x)
            x = x + _attend_rows(block.attn, h, cos, sin, mask, pos, cache) + block.mlp(
                h if block.shared_norm else block.mlp_norm(x))
            continue
        a = _attend_rows(block.attn, block.attn_norm(x), cos, sin, mask, pos, cache)
        x = x + (block.attn_post_norm(a) if block.post_norms else a)
        m = block.mlp(block.mlp_norm(x))
        x = x + (block.mlp_post_norm(m) if block.post_norms else m)
    return model.finish(x)  # (1, T, V)


@dataclass
class _Verdict:
    kept: bool
    token: int  # the draft when kept, else the target's replacement


def _judge(row: torch.Tensor, draft: int, q: torch.Tensor | None, params: SamplingParams,
           generator: torch.Generator, ctx, out) -> _Verdict:
    """Keep or replace one guess against the target's scores `row` for its position."""
    if params.greedy:
        token = sample(row, params, None, ctx, out)
        return _Verdict(token == draft, token)
    p = distribution(row, params, ctx, out).double()
    p = p / p.sum()
    keep = p[draft] if q is None else torch.clamp(p[draft] / q[draft], max=1.0)
    if torch.rand((), dtype=torch.float64, generator=generator) < keep:
        return _Verdict(True, draft)
    if q is None:
        rest = p.clone()
        rest[draft] = 0
    else:
        rest = torch.clamp(p - q, min=0)
    if not rest.sum() > 0:  # p within rounding of q: nothing left to correct toward
        rest = p
    return _Verdict(False, draw(rest, generator))


class _Economy:
    """Speculates only while it pays here: seconds per token of speculative passes (guessing and
    verifying, over the tokens each pass yields) against plain decode steps, both measured as
    they run. A pass costs more than a step (on a CPU each extra row of a pass adds compute), so
    guesses that are mostly missed make decoding slower; then speculation rests for `hold` tokens
    (doubling while it keeps not paying, up to 32) and is tried again, as what the answer copies
    changes. The passes' cost is their seconds over their tokens, the earlier passes' weighing
    `decay` less each pass: a miss where an edit departs from a passage copied in long kept passes
    costs a pass, not the next `hold` tokens' speculation; misses in a row still stop it."""

    def __init__(self, probe: int = 2, always: bool = False, decay: float = 0.6):
        self.always = always  # never rest: speculate at every chance
        self.step_s: float | None = None  # EMA of a plain step's seconds
        self.spent = self.yielded = 0.0  # recent passes' seconds and tokens, decayed
        self.decay = decay
        self.rest = probe  # tokens to decode plainly before the next pass (first: measure a step)
        self.hold = 8

    def speculating(self) -> bool:
        if self.rest > 0:
            self.rest -= 1
            return False
        return True

    def stepped(self, seconds: float) -> None:
        self.step_s = seconds if self.step_s is None else 0.7 * self.step_s + 0.3 * seconds

    def passed(self, seconds: float, tokens: int) -> None:
        self.spent = self.decay * self.spent + seconds
        self.yielded = self.decay * self.yielded + max(tokens, 1)
        if self.always:
            return
        if self.step_s is not None and self.spent / self.yielded > self.step_s:  # a token costs more than a step
            self.rest, self.hold = self.hold, min(32, 2 * self.hold)
            self.spent = self.yielded = 0.0
        elif self.step_s is not None:
            self.hold = 8


@torch.inference_mode()
def generate_ids(model: torch.nn.Module, prompt: Sequence[int], params: SamplingParams, stop_ids: Sequence[int] = (),
                 stats: StepStats | None = None, proposer: Proposer | None = None,
                 adaptive: bool = True) -> Iterator[int]:
    """generate.generate_ids with guesses from `proposer` (a fresh PromptLookup by default)
    verified in passes over several tokens; the same tokens for greedy settings, the same
    distribution for sampled ones. stats.drafted / stats.accepted count the guesses.
    adaptive: speculate only while it measurably pays (_Economy); not for sampling with a seed,
    whose tokens must not depend on timings, nor with adaptive=False (every chance to guess is
    taken: tests, acceptance measurements)."""
    stats = stats if stats is not None else StepStats()
    proposer = proposer if proposer is not None else PromptLookup()
    limit = stats.limit = budget(len(prompt), params, model)
    stats.speculative = True
    device = model.device
    P = len(prompt)
    cache = KVCache.for_model(model, 1, span(P + min(limit, GROW_FROM)))
    stepper = decode_stepper(model, cache)
    gen = make_generator(params.seed, "cpu")
    stops = set(stop_ids) | set(params.stop_token_ids)
    history = list(prompt)
    economy = _Economy() if adaptive and (params.greedy or params.seed is None) else _Economy(probe=0, always=True)

    t0 = time.perf_counter()
    logits, prefix = prefill(model, prompt, cache, stats)
    stats.prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    row = logits[0, -1].cpu()
    n = P  # positions in the cache: every token but the newest
    pending: int | None = None  # a token already chosen (a replaced guess)
    try:
        while True:
            if pending is None:
                ctx, out = _history(history, P, params)
                token = sample(row, params, gen, ctx, out)
            else:
                token, pending = pending, None
            if token in stops:
                break
            history.append(token)
            stats.generated = len(history) - P
            stats.decode_s = time.perf_counter() - t1
            yield token
            if stats.generated == limit:
                break
            # guesses that may all be kept with one more token after them inside the budget
            started = time.perf_counter()
            drafts, qs = (proposer.propose(history, limit - stats.generated - 1, params, gen, P)
                          if economy.speculating() else ([], None))
            if not drafts:  # a plain decode step
                cache.grow(1, n + 1, span(P + limit))
                row = stepper.step(torch.tensor([[token]], device=device), torch.tensor([[n]], device=device),
                                   n + 1)[0, -1].cpu()
                economy.stepped(time.perf_counter() - started)
                n += 1
                continue
            T = 1 + len(drafts)
            cache.grow(1, n + T, span(P + limit))
            cache.base, cache.length = 0, span(n + T)
            fed = torch.tensor([[token, *drafts]], device=device)
            rows = verify_forward(model, fed, torch.arange(n, n + T, device=device)[None], cache, stepper)[0].cpu()
            spent = time.perf_counter() - started
            n += 1
            stats.drafted += len(drafts)
            kept, ended = 0, False
            for i, d in enumerate(drafts):
                ctx, out = _history(history, P, params)
                v = _judge(rows[i], d, None if qs is None else qs[i], params, gen, ctx, out)
                if not v.kept:
                    pending = v.token
                    break
                kept += 1
                stats.accepted += 1
                if d in stops:
                    ended = True
                    break
                history.append(d)
                stats.generated = len(history) - P
                stats.decode_s = time.perf_counter() - t1
                yield d
                n += 1
                if stats.generated == limit:
                    ended = True
                    break
            else:
                row = rows[T - 1]
            proposer.feedback(len(drafts), kept)
            economy.passed(spent, kept + 1)  # the kept guesses and the token after them (replacement or next)
            if ended:
                break
        stats.decode_s = time.perf_counter() - t1
    finally:  # the answer's keys and values too (positions 0..n hold history[:n]): a chat's next turn starts
        if prefix is not None:
            prefix.store(model, history, cache, 0, n)

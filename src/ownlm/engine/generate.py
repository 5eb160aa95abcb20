"""Generation for one sequence: a Python generator of token ids, and text streaming on top of it
(incremental, UTF-8 safe, stop strings cut exactly)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from ..errors import BadRequest
from ..text.tokenizer import IncrementalDecoder, TextTokenizer
from . import prefix_cache
from .kv_cache import KVCache, bytes_per_token, fitting_tokens, span
from .sampling import SamplingParams, make_generator, sample
from .steppers import decode_stepper

PREFILL_CHUNK = 256  # the batch scheduler uses the same: same chunks, same numbers
GROW_FROM = 256  # answer tokens the cache has room for before it first grows
# answer tokens when a request names none: `ownlm run`, its chat and the server's chat route (their
# --max-tokens defaults), so nothing runs on until the context is full. An explicit max_tokens wins.
DEFAULT_MAX_TOKENS = 1024


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    usage: dict[str, int]
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "usage": self.usage, "timings": self.timings}


@dataclass
class StepStats:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    generated: int = 0
    limit: int = 0  # the token budget (budget())
    cached: int = 0  # prompt tokens whose keys and values came from the prefix cache
    speculative: bool = False  # speculative decoding (engine/speculate.py): guesses drafted and kept
    drafted: int = 0
    accepted: int = 0


def budget(prompt_len: int, params: SamplingParams, model: torch.nn.Module, default: int | None = None) -> int:
    """How many tokens may be generated: max_tokens, or without one as many as fit both the
    model's context and the memory free now for the KV cache, and at most `default` (a cap such
    as DEFAULT_MAX_TOKENS; None: no cap). A prompt or a max_tokens that does not fit is an error,
    never cut."""
    if prompt_len == 0:
        raise BadRequest("the prompt is empty")
    context = model.cfg.context_length
    room = context - prompt_len
    if room <= 0:
        # worded and coded as OpenAI's and Anthropic's errors are (clients trim a history on them)
        raise BadRequest(f"the prompt is too long: {prompt_len} tokens, and the model's context is {context}",
                         "shorten the prompt or the conversation", code="context_length_exceeded")
    if params.max_tokens is not None and params.max_tokens > room:
        raise BadRequest(f"max_tokens={params.max_tokens} does not fit: the prompt has {prompt_len} tokens "
                         f"and the context is {context}", f"ask for at most {room}")
    fit = fitting_tokens(model) - prompt_len
    wanted = params.max_tokens if params.max_tokens is not None else 1
    if wanted > fit:
        need = (prompt_len + wanted) * bytes_per_token(model)
        raise BadRequest(f"{prompt_len + wanted} tokens of KV cache need {need / 2**30:.2f} GiB, more than the "
                         f"memory free now allows", f"ask for at most {max(fit, 0)} tokens" if fit > 0
                         else "shorten the prompt or free memory")
    if params.max_tokens is not None:
        return params.max_tokens
    return min(room, fit) if default is None else min(room, fit, default)


@torch.inference_mode()
def generate_ids(model: torch.nn.Module, prompt: Sequence[int], params: SamplingParams,
                 stop_ids: Sequence[int] = (), stats: StepStats | None = None) -> Iterator[int]:
    """Yields sampled token ids until a stop token (not yielded) or the token budget is spent."""
    stats = stats if stats is not None else StepStats()
    limit = stats.limit = budget(len(prompt), params, model)
    device = model.device
    # room for the prompt and the first answer tokens; grown (geometrically) as the answer lengthens
    cache = KVCache.for_model(model, 1, span(len(prompt) + min(limit, GROW_FROM)))
    stepper = decode_stepper(model, cache)
    gen = make_generator(params.seed, "cpu")
    stops = set(stop_ids) | set(params.stop_token_ids)
    context = torch.tensor(list(prompt), dtype=torch.long)
    penalized = params.needs_history
    out: list[int] = []

    t0 = time.perf_counter()
    logits, prefix = prefill(model, prompt, cache, stats)
    stats.prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    n = len(prompt)
    try:
        for _ in range(limit):
            if penalized:  # the token history is only needed (and only built) for penalties
                out_t = torch.tensor(out, dtype=torch.long)
                token = sample(logits[0, -1].cpu(), params, gen, torch.cat([context, out_t]), out_t)
            else:
                token = sample(logits[0, -1].cpu(), params, gen)
            if token in stops:
                break
            out.append(token)
            stats.generated = len(out)
            stats.decode_s = time.perf_counter() - t1
            yield token
            if len(out) == limit:
                break
            tokens, pos = torch.tensor([[token]], device=device), torch.tensor([[n]], device=device)
            cache.grow(1, n + 1, span(len(prompt) + limit))
            logits = stepper.step(tokens, pos, n + 1)
            n += 1
        stats.decode_s = time.perf_counter() - t1
    finally:  # the answer's keys and values too: the next turn of a chat starts with them
        if prefix is not None:
            prefix.store(model, list(prompt) + out, cache, 0, n)


def prefill(model: torch.nn.Module, prompt: Sequence[int], cache: KVCache,
            stats: StepStats) -> tuple[torch.Tensor, prefix_cache.PrefixCache | None]:
    """The prompt's keys and values into slot 0 of the cache: the longest cached start of it copied
    in from the model's prefix cache (engine/prefix_cache.py; stats.cached counts it), the rest
    computed in chunks that end on multiples of PREFILL_CHUNK with a hit or without (so the numbers
    are the same either way), then the prompt's blocks stored. Returns the last position's logits
    (1, 1, V) and the prefix cache (None when it is off), for storing the answer's blocks after."""
    prefix = prefix_cache.of(model)
    if prefix is not None:
        hit = prefix.lookup(model, prompt, cache)
        prefix.load(hit, cache, 0)
        prefix.release(hit)
        stats.cached = hit.length
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=model.device)
    start, logits = stats.cached, None
    while start < ids.shape[1]:
        end = min(ids.shape[1], (start // PREFILL_CHUNK + 1) * PREFILL_CHUNK)
        cache.base, cache.length = 0, end
        logits = model(ids[:, start:end], torch.arange(start, end, device=ids.device)[None], cache, last_only=True)
        start = end
    if prefix is not None:
        prefix.store(model, prompt, cache, 0, len(prompt))
    return logits, prefix


class TextAssembler:
    """Token ids in, text pieces out: UTF-8 safe, stop strings cut exactly (text that could still
    become a stop string is held back until it cannot). Each stop string is followed by a KMP
    matcher over the text as it grows: a token's work is its own characters', whatever the
    lengths of the text and of the stop strings."""

    def __init__(self, tokenizer: TextTokenizer, stop: Sequence[str] = ()):
        self.dec = IncrementalDecoder(tokenizer)
        self.stops = [_StopMatcher(s) for s in stop if s]
        self.text = ""  # everything decoded so far (cut at a stop string once one is found)
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False  # a stop string was found: no more text will come

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        return self._add(self.dec.push(token), final=False)

    def finish(self) -> str:
        """The held-back rest, once no more tokens will come."""
        return self._add("" if self.stopped else self.dec.flush(), final=True)

    def _add(self, new: str, final: bool) -> str:
        if new and not self.stopped:
            start = len(self.text)
            self.text += new
            ends = [(m.feed(new), m) for m in self.stops]
            cuts = [start + end - len(m.stop) for end, m in ends if end is not None]
            if cuts:
                self.text, self.stopped = self.text[:min(cuts)], True
        held = 0 if final or self.stopped else max((m.matched for m in self.stops), default=0)
        safe = len(self.text) - held
        if safe <= self.sent:
            return ""
        piece = self.text[self.sent:safe]
        self.sent = safe
        return piece


class _StopMatcher:
    """Where one stop string first ends in a text fed piece by piece (Knuth-Morris-Pratt):
    `matched`, the longest start of the stop string that ends the text so far."""

    def __init__(self, stop: str):
        self.stop, self.matched = stop, 0
        self.fail = [0] * len(stop)  # fail[i]: the longest proper border of stop[:i + 1]
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self.fail[i] = k

    def feed(self, piece: str) -> int | None:
        """The index in `piece` just past where the stop string is first complete, or None."""
        stop, fail, k = self.stop, self.fail, self.matched
        for i, c in enumerate(piece):
            while k and stop[k] != c:
                k = fail[k - 1]
            if stop[k] == c:
                k += 1
                if k == len(stop):
                    self.matched = k
                    return i + 1
        self.matched = k
        return None


class TextStream:
    """Iterate to get text pieces; afterwards `.completion` holds the whole result."""

    def __init__(self, model, tokenizer: TextTokenizer, prompt_ids: Sequence[int], params: SamplingParams,
                 ids: Callable[..., Iterator[int]] | None = None):
        """`ids`: the token source, called as generate_ids is (default generate_ids; the
        speculative one of engine/speculate.py with its proposer bound)."""
        self.model, self.tok, self.prompt_ids, self.params = model, tokenizer, list(prompt_ids), params
        self.ids = ids if ids is not None else generate_ids
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        p = self.params
        stats = StepStats()
        text = TextAssembler(self.tok, p.stop)
        ids: list[int] = []
        finish = "length"
        for token in self.ids(self.model, self.prompt_ids, p, self.tok.eos_ids, stats):
            ids.append(token)
            piece = text.push(token)
            if piece:
                yield piece
            if text.stopped:
                break
        else:
            if stats.generated < stats.limit:
                finish = "stop"  # a stop token ended it
        piece = text.finish()
        if piece:
            yield piece
        if text.stopped:
            finish = "stop"
        n_out = len(ids)
        self.completion = Completion(
            text=text.text, token_ids=ids, finish_reason=finish,
            usage={"prompt_tokens": len(self.prompt_ids), "completion_tokens": n_out,
                   "total_tokens": len(self.prompt_ids) + n_out},
            # cached_tokens: prompt tokens reused from the prefix cache, not prefilled (nor in the rate)
            timings={"prefill_s": round(stats.prefill_s, 4), "decode_s": round(stats.decode_s, 4),
                     "cached_tokens": stats.cached,
                     "prefill_tokens_per_s": (round((len(self.prompt_ids) - stats.cached) / stats.prefill_s, 2)
                                              if stats.prefill_s else 0.0),
                     "decode_tokens_per_s": (round((n_out - 1) / stats.decode_s, 2)
                                             if n_out > 1 and stats.decode_s else 0.0)},
        )
        if stats.speculative:
            self.completion.timings.update(drafted_tokens=stats.drafted, accepted_tokens=stats.accepted,
                                           acceptance_rate=round(stats.accepted / stats.drafted, 4)
                                           if stats.drafted else 0.0)

    def run(self) -> Completion:
        for _ in self:
            pass
        assert self.completion is not None
        return self.completion

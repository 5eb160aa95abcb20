"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions,
/v1/embeddings. Each translates its body into a runs.Job and the engine's events into
OpenAI's wire format; the skeleton around them is http.generate."""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request

from ..engine.scheduler import TokenLogprob
from . import runs
from .http import (APIError, Events, admit, as_batch, documented, embed_ids, generate, log_entry, parse_body, sse,
                   state_of,
                   usage_of)
from .pool import ModelPool, Served
from .schemas import ChatRequest, CompletionRequest, EmbeddingRequest

router = APIRouter()


def _model_cards(pool: ModelPool, only: str | None = None) -> list[dict[str, Any]]:
    """The cards of the available models (or of `only`): `created` is when the model was made (its
    store manifest's time), not when this server loaded it."""
    return [{"id": mid, "object": "model", "created": pool.created(ref), "owned_by": "ownlm"}
            for mid, ref in sorted(pool.available().items()) if only is None or mid == only]


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    pool = state_of(request).pool
    return {"object": "list", "data": await asyncio.to_thread(_model_cards, pool)}


@router.get("/v1/models/{model_name:path}")
async def model(request: Request, model_name: str) -> dict[str, Any]:
    pool = state_of(request).pool
    log_entry(request).model = model_name
    cards = await asyncio.to_thread(_model_cards, pool, model_name)
    if not cards:
        raise APIError(404, f"the model {model_name!r} does not exist", param="model", code="model_not_found")
    return cards[0]


def _chunk(head: dict[str, Any], choice: dict[str, Any], include_usage: bool) -> bytes:
    data = {**head, "choices": [choice]}
    if include_usage:
        data["usage"] = None  # OpenAI's shape: every chunk has the key, only the last a value
    return sse(data)


def _stream_end(head: dict[str, Any], usage: dict[str, int] | None) -> bytes:
    """The last events of a stream: the usage chunk when asked for, then [DONE]."""
    final = sse({**head, "choices": [], "usage": usage}) if usage is not None else b""
    return final + b"data: [DONE]\n\n"


def _include_usage(body: ChatRequest | CompletionRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _completion_logprobs(served: Served, pairs: list[tuple[int, TokenLogprob | None]]) -> dict[str, Any]:
    tokens, values, tops, offsets = [], [], [], []
    offset = 0
    for tok, lp in pairs:
        text = runs.token_text(served, tok)
        tokens.append(text)
        values.append(None if lp is None else lp.logprob)
        tops.append(None if lp is None else {runs.token_text(served, t): v for t, v in lp.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


class Chat:
    """/v1/chat/completions: messages in, assistant messages (text or tool calls) out."""

    def __init__(self, body: ChatRequest):
        if body.max_tokens == 0:
            raise APIError(400, "max_tokens must be at least 1", param="max_tokens")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        self.body, self.model, self.stream = body, body.model, body.stream
        self.logprobs = (body.top_logprobs or 0) if body.logprobs else None
        self.head = {"id": runs.new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
                     "model": body.model, "system_fingerprint": None}
        self.tool_mode, self.prompt_tokens = "none", 0

    async def job(self, served: Served) -> runs.Job:
        body = self.body
        plan = runs.chat_plan(served, body)
        if plan.grammar:  # built once per model (~0.3 s): off the event loop
            await asyncio.to_thread(served.grammar_tokenizer)
        prompt = await runs.render_ids(served, body.messages, plan.tools)
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = [runs.sampling(served, body, max_tokens, i) for i in range(body.n)]
        limit = runs.limit_for(served, prompt, params[0], max_tokens)
        self.tool_mode, self.prompt_tokens = plan.tool_mode, len(prompt)  # counted once for the n choices
        # a prediction turns on prompt lookup by itself: the server's default draft does not apply
        speculate, draft = await runs.speculation(served, body.speculate, default=body.prediction is None)
        predicted = None
        if body.prediction is not None:
            predicted, speculate = runs.prediction(served, body.prediction, speculate, draft)
        return runs.Job([prompt] * body.n, params, [limit] * body.n, logprobs=self.logprobs, grammar=plan.grammar,
                        speculate=speculate, draft=draft, prediction=predicted)

    def _calls_tools(self, text: str) -> bool:
        """Whether a choice's text is tool calls (the grammar allows nothing else before them)."""
        return self.tool_mode != "none" and text.lstrip().startswith("<")

    async def chunks(self, served: Served, choices: list[runs.Choice], events: Events) -> AsyncIterator[bytes]:
        head, usage = {**self.head, "object": "chat.completion.chunk"}, _include_usage(self.body)

        def chunk(i: int, delta: dict[str, Any], finish: str | None = None, lps: Any = None) -> bytes:
            return _chunk(head, {"index": i, "delta": delta, "logprobs": lps, "finish_reason": finish}, usage)

        for c in choices:
            yield chunk(c.index, {"role": "assistant", "content": ""})
        calls_sent: dict[int, int] = {}
        async for c, piece, lps in events:
            wanted = self.logprobs is not None and lps
            lp = {"content": [runs.token_logprob(served, x) for x in lps]} if wanted else None
            text = c.text.text
            if self._calls_tools(text):  # each call goes out whole, once its closing tag has come
                calls = runs.parse_tool_calls(text)
                for k in range(calls_sent.get(c.index, 0), len(calls)):
                    yield chunk(c.index, {"tool_calls": [{"index": k, **calls[k]}]})
                calls_sent[c.index] = len(calls)
            elif piece or lp:
                yield chunk(c.index, {"content": piece}, lps=lp)
        for c in choices:
            yield chunk(c.index, {}, "tool_calls" if calls_sent.get(c.index) else c.finish)
        yield _stream_end(head, usage_of(choices, self.prompt_tokens, self.body.n) if usage else None)

    def result(self, served: Served, choices: list[runs.Choice]) -> dict[str, Any]:
        out = []
        for c in choices:
            message: dict[str, Any] = {"role": "assistant", "content": c.text.text, "refusal": None}
            finish = c.finish
            message["content"], calls = runs.split_tool_calls(self.tool_mode, c.text.text)  # no markup in content
            if calls:
                message["tool_calls"] = calls
                finish = "tool_calls"
            lp = {"content": [runs.token_logprob(served, x) for x in c.logprobs]} if self.logprobs is not None else None
            out.append({"index": c.index, "message": message, "logprobs": lp, "finish_reason": finish})
        return {**self.head, "choices": out, "usage": usage_of(choices, self.prompt_tokens, self.body.n)}


class Completions:
    """/v1/completions: raw prompts (text or token ids) in, text out; with echo, the prompt's
    log-probabilities too (what lm-evaluation-harness scores with)."""

    def __init__(self, body: CompletionRequest):
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens 0 is only meaningful with echo", param="max_tokens")
        if body.stream and body.echo and body.logprobs is not None:
            raise APIError(400, "echo with logprobs is not available when streaming", param="echo")
        self.body, self.model, self.stream = body, body.model, body.stream
        self.head = {"id": runs.new_id("cmpl"), "object": "text_completion", "created": int(time.time()),
                     "model": body.model}
        self.prompt_tokens = 0

    async def job(self, served: Served) -> runs.Job:
        body = self.body
        batch = as_batch(body.prompt)
        if not batch:
            raise APIError(400, "prompt must not be empty", param="prompt")
        prompts = await asyncio.to_thread(lambda: [runs.token_ids(served, x, f"prompt[{i}]")
                                                   for i, x in enumerate(batch)])
        # the legacy API's default, 16, unless the model is a preset with its own
        max_tokens = served.lm.defaults.get("max_tokens", 16) if body.max_tokens is None else body.max_tokens
        each = [(p, runs.sampling(served, body, max_tokens, j)) for p in prompts for j in range(body.n)]
        self.prompt_tokens = sum(len(x) for x in prompts)
        speculate, draft = await runs.speculation(served, body.speculate)
        return runs.Job([p for p, _ in each], [sp for _, sp in each],
                        [runs.limit_for(served, p, sp, max_tokens) for p, sp in each],
                        logprobs=body.logprobs, prompt_logprobs=body.logprobs if body.echo else None,
                        # an end-of-text token that ends a choice is returned (empty text, its logprob) and
                        # counted, as OpenAI's legacy API and vLLM do: lm-evaluation-harness scores a choice as
                        # token_logprobs[ctxlen:-1], taking the last entry for the generated token
                        keep_stop=True, speculate=speculate, draft=draft)

    def _echo(self, served: Served, c: runs.Choice) -> str:
        return served.lm.tokenizer.decode(c.prompt) if self.body.echo else ""

    async def chunks(self, served: Served, choices: list[runs.Choice], events: Events) -> AsyncIterator[bytes]:
        body, usage = self.body, _include_usage(self.body)

        def chunk(i: int, text: str, finish: str | None = None, lps: Any = None) -> bytes:
            return _chunk(self.head, {"index": i, "text": text, "logprobs": lps, "finish_reason": finish}, usage)

        if body.echo:
            for c in choices:
                yield chunk(c.index, self._echo(served, c))
        async for c, piece, lps in events:
            wanted = body.logprobs is not None and lps
            lp = _completion_logprobs(served, [(x.token, x) for x in lps]) if wanted else None
            if piece or lp:
                yield chunk(c.index, piece, lps=lp)
        for c in choices:
            yield chunk(c.index, "", c.finish)
        yield _stream_end(self.head, usage_of(choices, self.prompt_tokens, self.body.n) if usage else None)

    def result(self, served: Served, choices: list[runs.Choice]) -> dict[str, Any]:
        out = []
        for c in choices:
            lp = None
            if self.body.logprobs is not None:
                pairs: list[tuple[int, TokenLogprob | None]] = []
                if self.body.echo:
                    pairs += list(zip(c.prompt, c.prompt_logprobs or [None] * len(c.prompt)))
                pairs += [(x.token, x) for x in c.logprobs]
                lp = _completion_logprobs(served, pairs)
            out.append({"index": c.index, "text": self._echo(served, c) + c.text.text, "logprobs": lp,
                        "finish_reason": c.finish})
        return {**self.head, "system_fingerprint": None, "choices": out,
                "usage": usage_of(choices, self.prompt_tokens, self.body.n)}


@router.post("/v1/chat/completions", openapi_extra=documented(ChatRequest))
async def chat(request: Request) -> Any:
    return await generate(request, Chat(await parse_body(request, ChatRequest)))


@router.post("/v1/completions", openapi_extra=documented(CompletionRequest))
async def completions(request: Request) -> Any:
    return await generate(request, Completions(await parse_body(request, CompletionRequest)))


@router.post("/v1/embeddings", openapi_extra=documented(EmbeddingRequest))
async def embeddings(request: Request) -> dict[str, Any]:
    st = state_of(request)
    body = await parse_body(request, EmbeddingRequest)
    served = await st.pool.acquire(body.model)
    t0 = time.monotonic()  # the time limit starts once the model is loaded, as for generation
    try:
        ids = await asyncio.to_thread(_embedding_inputs, served, body)
        admit(served, 1)  # one job: its texts run one after another
        vectors = await embed_ids(request, st, served, ids, body.dimensions, t0 + st.config.request_timeout)
    finally:
        st.pool.release(served)
    data = []
    for i, v in enumerate(vectors):
        value: Any = v if body.encoding_format == "float" else base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    n = sum(len(t) for t in ids)
    st.metrics.inc("prompt_tokens_total", n)
    log_entry(request).usage = lambda: {"prompt_tokens": n, "completion_tokens": 0}
    return {"object": "list", "data": data, "model": body.model, "usage": {"prompt_tokens": n, "total_tokens": n}}


def _embedding_inputs(served: Served, body: EmbeddingRequest) -> list[list[int]]:
    batch = as_batch(body.input)
    if not batch or any(isinstance(b, str) and not b for b in batch):
        raise APIError(400, "input must not be empty", param="input")
    ids = [runs.token_ids(served, b, f"input[{i}]") for i, b in enumerate(batch)]
    ctx = served.lm.config.context_length
    for i, t in enumerate(ids):
        if not t:
            raise APIError(400, f"input[{i}] is no tokens", param="input")
        if len(t) > ctx:
            raise APIError(400, f"input[{i}] has {len(t)} tokens; the model's context is {ctx}", param="input")
    dim = served.lm.config.dim
    if body.dimensions is not None and body.dimensions > dim:
        raise APIError(400, f"dimensions must be at most {dim}", param="dimensions")
    return ids

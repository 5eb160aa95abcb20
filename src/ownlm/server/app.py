"""The OpenAI-compatible HTTP API: routes, error bodies, server-sent events, and the guard in
front of them (API keys, Host check, body limit, request metrics)."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import struct
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..engine.embed import embed
from ..engine.scheduler import Overloaded, TokenLogprob
from ..errors import BadRequest, ChatTemplateError, ModelNotFound, OwnlmError
from . import runs
from .metrics import Metrics
from .pool import ModelPool, PoolFull, Served
from .schemas import ChatRequest, CompletionRequest, EmbeddingRequest

B = TypeVar("B", bound=BaseModel)
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "service_unavailable"}


@dataclass
class ServerConfig:
    api_keys: list[str] = field(default_factory=list)
    check_host: bool = True  # refuse non-loopback Host headers (DNS rebinding); off for a public address
    max_body_bytes: int = 8 << 20
    request_timeout: float = 600.0
    retry_after: int = 1


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def _as_api_error(e: BaseException, retry_after: int = 1) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, Overloaded):
        return APIError(429, f"the server is at capacity: {e.message}; retry shortly", code="rate_limit_exceeded",
                        headers={"Retry-After": str(retry_after)})
    if isinstance(e, PoolFull):
        return APIError(503, str(e), code="model_busy", headers={"Retry-After": str(retry_after)})
    if isinstance(e, ModelNotFound):
        return APIError(404, str(e), param="model", code="model_not_found")
    if isinstance(e, ChatTemplateError):
        return APIError(422, f"the model's chat template cannot render these messages: {e}", param="messages")
    if isinstance(e, BadRequest):
        return APIError(400, str(e), param=e.param)
    if isinstance(e, OwnlmError):
        return APIError(503, str(e))
    return APIError(500, f"internal error: {type(e).__name__}: {e}")


def _validation_error(e: ValidationError | RequestValidationError) -> APIError:
    err = e.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if err.get("type") == "extra_forbidden":
        return APIError(400, f"unsupported parameter: {param}", param=param, code="unsupported_parameter")
    if err.get("type") == "missing":
        return APIError(400, f"missing required parameter: {param}", param=param, code="missing_required_parameter")
    return APIError(400, f"invalid value for {param}: {err.get('msg')}", param=param, code="invalid_value")


class Guard:
    """ASGI middleware: Host check, API keys (constant time), body size limit, request metrics."""

    def __init__(self, app, config: ServerConfig, metrics: Metrics):
        self.app, self.config, self.metrics = app, config, metrics
        self.keys = [k.encode() for k in config.api_keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        status_seen = {"status": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status_seen["status"] = message["status"]
            await send(message)

        async def reply(status: int, message: str, code: str | None = None, extra: dict[str, str] | None = None):
            body = json.dumps(error_body(status, message, code=code)).encode()
            hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            hdrs += [(k.lower().encode(), v.encode()) for k, v in (extra or {}).items()]
            await counting_send({"type": "http.response.start", "status": status, "headers": hdrs})
            await counting_send({"type": "http.response.body", "body": body})

        try:
            if self.config.check_host:
                host = headers.get("host", "")
                name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
                if name not in LOOPBACK_HOSTS:
                    return await reply(400, f"the Host header {host!r} is not allowed: this server answers on "
                                            "loopback names only", code="invalid_host")
            if self.keys and scope["path"] != "/health":
                auth = headers.get("authorization", "")
                given = auth[7:].strip().encode() if auth.lower().startswith("bearer ") else b""
                ok = False
                for key in self.keys:  # compare against every key so timing does not tell which matched
                    ok |= hmac.compare_digest(given, key)
                if not ok:
                    return await reply(401, "missing or invalid API key (send Authorization: Bearer KEY)",
                                       code="invalid_api_key", extra={"WWW-Authenticate": "Bearer"})
            length = headers.get("content-length")
            limit = self.config.max_body_bytes
            if length is not None and (not length.isdigit() or int(length) > limit):
                return await reply(413, f"the request body is larger than {limit} bytes", code="request_too_large")
            seen = 0

            async def limited_receive():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > limit:
                        raise _TooLarge()
                return message

            try:
                await self.app(scope, limited_receive, counting_send)
            except _TooLarge:
                await reply(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        finally:
            self.metrics.inc("requests_total", status=str(status_seen["status"]), path=scope["path"])


class _TooLarge(Exception):
    pass


# --- the app ---------------------------------------------------------------------------------------

@dataclass
class State:
    """What every route shares, kept on `app.state.ownlm`."""

    pool: ModelPool
    config: ServerConfig
    metrics: Metrics


def _state(request: Request) -> State:
    return request.app.state.ownlm


def _metrics(pool: ModelPool) -> Metrics:
    metrics = Metrics()
    metrics.counter("requests_total", "HTTP requests by status and path")
    metrics.counter("prompt_tokens_total", "prompt tokens processed")
    metrics.counter("generation_tokens_total", "tokens generated")
    metrics.counter("sequences_cancelled_total", "sequences cancelled (client gone, stop string, timeout)")
    metrics.histogram("time_to_first_token_seconds", "time from request to first generated token")
    metrics.histogram("inter_token_latency_seconds", "time between consecutive generated tokens of a sequence")
    metrics.gauge("running_sequences", "sequences on the engine (decoding or being prefilled)",
                  lambda: {(("model", s.id),): s.scheduler.stats()["running"] for s in list(pool.loaded.values())})
    metrics.gauge("queue_depth", "requests waiting for an engine slot",
                  lambda: {(("model", s.id),): s.scheduler.stats()["waiting"] for s in list(pool.loaded.values())})
    metrics.gauge("models_loaded", "models in memory", lambda: {(): len(pool.loaded)})
    return metrics


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    pool = app.state.ownlm.pool

    async def reaper() -> None:
        while True:
            await asyncio.sleep(1.0)
            pool.reap()

    task = asyncio.create_task(reaper())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.to_thread(pool.close)


def create_app(pool: ModelPool, config: ServerConfig | None = None) -> FastAPI:
    """The ASGI app. It only queues work on the pool's engines: something must run
    `pool.driver` (server.serving.Server does)."""
    config = config or ServerConfig()
    app = FastAPI(title="ownlm", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ownlm = State(pool, config, _metrics(pool))
    app.add_middleware(Guard, config=config, metrics=app.state.ownlm.metrics)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _error)
    # APIError and OwnlmError get handlers of their own: only the catch-all logs a traceback
    for kind in (APIError, OwnlmError, Exception):
        app.add_exception_handler(kind, _error)
    app.include_router(router)
    return app


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    status = exc.status_code
    message = {404: "no such route", 405: "method not allowed on this route"}.get(status, str(exc.detail))
    return JSONResponse(error_body(status, message), status_code=status)


async def _error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, RequestValidationError):
        exc = _validation_error(exc)
    a = _as_api_error(exc, _state(request).config.retry_after)
    return JSONResponse(error_body(a.status, a.message, a.param, a.code), status_code=a.status, headers=a.headers)


async def _parse(request: Request, schema: type[B]) -> B:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None


router = APIRouter()


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    return {"status": "ok", "models_loaded": sorted(_state(request).pool.loaded)}


@router.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    return PlainTextResponse(_state(request).metrics.render(), media_type="text/plain; version=0.0.4")


def _model_card(pool: ModelPool, mid: str) -> dict[str, Any]:
    served = pool.loaded.get(mid)
    return {"id": mid, "object": "model", "created": served.created if served else 0, "owned_by": "ownlm"}


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    pool = _state(request).pool
    return {"object": "list", "data": [_model_card(pool, m) for m in sorted(await asyncio.to_thread(pool.available))]}


@router.get("/v1/models/{model_name:path}")
async def model(request: Request, model_name: str) -> dict[str, Any]:
    pool = _state(request).pool
    if model_name not in await asyncio.to_thread(pool.available):
        raise APIError(404, f"the model {model_name!r} does not exist", param="model", code="model_not_found")
    return _model_card(pool, model_name)


# --- generation: one skeleton, a translator per route ----------------------------------------------

Events = AsyncIterator[tuple[runs.Choice, str, list[TokenLogprob]]]


class Translator(Protocol):
    """A generation route's own part: its request into a Job, the engine's events into its wire format."""

    model: str
    stream: bool

    async def job(self, served: Served) -> runs.Job: ...
    def chunks(self, served: Served, choices: list[runs.Choice], events: Events) -> AsyncIterator[bytes]: ...
    def result(self, served: Served, choices: list[runs.Choice]) -> dict[str, Any]: ...


async def _generate(request: Request, t: Translator) -> StreamingResponse | dict[str, Any]:
    """Acquire the model, submit the job, stream or wait, release the model."""
    st = _state(request)
    served = await st.pool.acquire(t.model)
    t0 = time.monotonic()  # the time limit and time-to-first-token start once the model is loaded
    try:
        queue: asyncio.Queue = asyncio.Queue()
        choices = runs.submit(served, asyncio.get_running_loop(), queue, await t.job(served))
    except BaseException:
        st.pool.release(served)
        raise
    st.metrics.inc("prompt_tokens_total", sum(len(c.prompt) for c in choices))
    events = _timed(st, choices, queue, t0)
    if t.stream:
        return _streaming(st, t.chunks(served, choices, events), served, choices)
    try:
        await _drain(request, st, choices, events)
    finally:
        st.pool.release(served)
    return t.result(served, choices)


async def _timed(st: State, choices: list[runs.Choice], queue: asyncio.Queue, t0: float) -> Events:
    """runs.events, recording time to first token, inter-token latency and token counts; at the
    end, the first choice's error (if any) is raised."""
    last: dict[int, float] = {}
    async for c, piece, lps in runs.events(choices, queue, t0 + st.config.request_timeout):
        now = time.monotonic()
        if c.index in last:
            st.metrics.observe("inter_token_latency_seconds", now - last[c.index])
        elif c.tokens:
            st.metrics.observe("time_to_first_token_seconds", now - t0)
        if c.tokens:
            last[c.index] = now
            st.metrics.inc("generation_tokens_total", 1)
        yield c, piece, lps
    for c in choices:
        if c.error is not None:
            raise c.error


async def _drain(request: Request, st: State, choices: list[runs.Choice], events: Events) -> None:
    """Wait for every choice, cancelling them if the client leaves or time runs out."""

    async def drain() -> None:
        async for _ in events:
            pass

    task = asyncio.ensure_future(drain())
    try:
        while not (await asyncio.wait({task}, timeout=0.05))[0]:
            if await request.is_disconnected():
                st.metrics.inc("sequences_cancelled_total", len(choices))
                raise asyncio.CancelledError()
        task.result()
    finally:
        if not task.done():
            task.cancel()
        runs.cancel(choices)


def _streaming(st: State, chunks: AsyncIterator[bytes], served: Served,
               choices: list[runs.Choice]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield chunk
        except asyncio.CancelledError:
            st.metrics.inc("sequences_cancelled_total", len(choices))
            raise
        except Exception as e:  # noqa: BLE001 - after the status line, errors go out as an event
            a = _as_api_error(e)
            yield _sse(error_body(a.status, a.message, a.param, a.code))
        finally:
            runs.cancel(choices)
            st.pool.release(served)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def _chunk(head: dict[str, Any], choice: dict[str, Any], include_usage: bool) -> bytes:
    data = {**head, "choices": [choice]}
    if include_usage:
        data["usage"] = None  # OpenAI's shape: every chunk has the key, only the last a value
    return _sse(data)


def _stream_end(head: dict[str, Any], usage: dict[str, int] | None) -> bytes:
    """The last events of a stream: the usage chunk when asked for, then [DONE]."""
    final = _sse({**head, "choices": [], "usage": usage}) if usage is not None else b""
    return final + b"data: [DONE]\n\n"


def _usage(choices: list[runs.Choice], prompt_tokens: int) -> dict[str, int]:
    out = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": out, "total_tokens": prompt_tokens + out}


def _include_usage(body: ChatRequest | CompletionRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _seed(body: ChatRequest | CompletionRequest, i: int) -> int | None:
    return None if body.seed is None else body.seed + i  # n choices: distinct but reproducible


def _batch(x: Any) -> list[Any]:
    """An API input that is one item (a string or a token-id list) or a list of them, as a list."""
    return [x] if isinstance(x, str) or (x and isinstance(x[0], int)) else list(x)


def _token_text(served: Served, token: int) -> str:
    return served.lm.tokenizer.decode([token])


def _chat_logprob(served: Served, lp: TokenLogprob) -> dict[str, Any]:
    def entry(tok: int, value: float) -> dict[str, Any]:
        text = _token_text(served, tok)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}


def _completion_logprobs(served: Served, pairs: list[tuple[int, TokenLogprob | None]]) -> dict[str, Any]:
    tokens, values, tops, offsets = [], [], [], []
    offset = 0
    for tok, lp in pairs:
        text = _token_text(served, tok)
        tokens.append(text)
        values.append(None if lp is None else lp.logprob)
        tops.append(None if lp is None else {_token_text(served, t): v for t, v in lp.top})
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
        prompt = served.lm.encode(await asyncio.to_thread(runs.render_chat, served, body.messages, plan.tools))
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = [runs.sampling(served, body, max_tokens, _seed(body, i)) for i in range(body.n)]
        limit = runs.limit_for(served, prompt, params[0], max_tokens)
        self.tool_mode, self.prompt_tokens = plan.tool_mode, len(prompt) * body.n
        return runs.Job([prompt] * body.n, params, [limit] * body.n, logprobs=self.logprobs, grammar=plan.grammar)

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
            lp = {"content": [_chat_logprob(served, x) for x in lps]} if self.logprobs is not None and lps else None
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
        yield _stream_end(head, _usage(choices, self.prompt_tokens) if usage else None)

    def result(self, served: Served, choices: list[runs.Choice]) -> dict[str, Any]:
        out = []
        for c in choices:
            message: dict[str, Any] = {"role": "assistant", "content": c.text.text, "refusal": None}
            finish = c.finish
            calls = runs.parse_tool_calls(c.text.text) if self._calls_tools(c.text.text) else []
            if calls:
                message.update(content=None, tool_calls=calls)
                finish = "tool_calls"
            lp = {"content": [_chat_logprob(served, x) for x in c.logprobs]} if self.logprobs is not None else None
            out.append({"index": c.index, "message": message, "logprobs": lp, "finish_reason": finish})
        return {**self.head, "choices": out, "usage": _usage(choices, self.prompt_tokens)}


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
        batch = _batch(body.prompt)
        if not batch:
            raise APIError(400, "prompt must not be empty", param="prompt")
        prompts = [runs.token_ids(served, x, f"prompt[{i}]") for i, x in enumerate(batch)]
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        each = [(p, runs.sampling(served, body, max_tokens, _seed(body, j))) for p in prompts for j in range(body.n)]
        self.prompt_tokens = sum(len(x) for x in prompts)
        return runs.Job([p for p, _ in each], [sp for _, sp in each],
                        [runs.limit_for(served, p, sp, max_tokens) for p, sp in each],
                        logprobs=body.logprobs, prompt_logprobs=body.logprobs if body.echo else None)

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
        yield _stream_end(self.head, _usage(choices, self.prompt_tokens) if usage else None)

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
        return {**self.head, "system_fingerprint": None, "choices": out, "usage": _usage(choices, self.prompt_tokens)}


@router.post("/v1/chat/completions")
async def chat(request: Request) -> Any:
    return await _generate(request, Chat(await _parse(request, ChatRequest)))


@router.post("/v1/completions")
async def completions(request: Request) -> Any:
    return await _generate(request, Completions(await _parse(request, CompletionRequest)))


@router.post("/v1/embeddings")
async def embeddings(request: Request) -> dict[str, Any]:
    st = _state(request)
    body = await _parse(request, EmbeddingRequest)
    served = await st.pool.acquire(body.model)
    try:
        batch = _batch(body.input)
        if not batch or any(isinstance(b, str) and not b for b in batch):
            raise APIError(400, "input must not be empty", param="input")
        ids = [runs.token_ids(served, b, f"input[{i}]") for i, b in enumerate(batch)]
        ctx = served.lm.config.context_length
        for i, t in enumerate(ids):
            if len(t) > ctx:
                raise APIError(400, f"input[{i}] has {len(t)} tokens; the model's context is {ctx}", param="input")
        dim = served.lm.config.dim
        if body.dimensions is not None and body.dimensions > dim:
            raise APIError(400, f"dimensions must be at most {dim}", param="dimensions")
        vectors = await asyncio.to_thread(embed, served.lm.model, ids, body.dimensions)
    finally:
        st.pool.release(served)
    data = []
    for i, v in enumerate(vectors):
        value: Any = v if body.encoding_format == "float" else base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    n = sum(len(t) for t in ids)
    st.metrics.inc("prompt_tokens_total", n)
    return {"object": "list", "data": data, "model": body.model, "usage": {"prompt_tokens": n, "total_tokens": n}}


__all__ = ["create_app", "ServerConfig"]

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
from typing import Any, AsyncIterator

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..engine.scheduler import Overloaded, TokenLogprob
from ..errors import BadRequest, ChatTemplateError, ModelNotFound, OwnlmError
from . import runs
from .metrics import Metrics
from .pool import ModelPool, PoolFull, Served
from .schemas import ChatRequest, CompletionRequest, EmbeddingRequest

LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "service_unavailable"}


@dataclass
class ServerConfig:
    api_keys: list[str] = field(default_factory=list)
    check_host: bool = True  # refuse Host headers that are not loopback names (DNS rebinding)
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


def create_app(pool: ModelPool, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
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

    @asynccontextmanager
    async def lifespan(app):
        async def reaper():
            while True:
                await asyncio.sleep(1.0)
                pool.reap()

        task = asyncio.create_task(reaper())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.to_thread(pool.close)

    app = FastAPI(title="ownlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, config=config, metrics=metrics)

    def err(e: BaseException) -> JSONResponse:
        a = _as_api_error(e, config.retry_after)
        return JSONResponse(error_body(a.status, a.message, a.param, a.code), status_code=a.status, headers=a.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        status = exc.status_code
        message = {404: "no such route", 405: "method not allowed on this route"}.get(status, str(exc.detail))
        return JSONResponse(error_body(status, message), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return err(_validation_error(exc))

    @app.exception_handler(APIError)
    async def api_error(request, exc):
        return err(exc)

    @app.exception_handler(OwnlmError)
    async def ownlm_error(request, exc):
        return err(exc)

    @app.exception_handler(Exception)
    async def internal_error(request, exc):  # a bug: a 500 with the error's body shape
        return err(exc)

    async def parse(request: Request, schema):
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

    @app.get("/health")
    async def health():
        return {"status": "ok", "models_loaded": sorted(pool.loaded)}

    @app.get("/metrics")
    async def metrics_route():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    def model_card(mid: str) -> dict[str, Any]:
        served = pool.loaded.get(mid)
        return {"id": mid, "object": "model", "created": served.created if served else 0, "owned_by": "ownlm"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(m) for m in sorted(await asyncio.to_thread(pool.available))]}

    @app.get("/v1/models/{model_name:path}")
    async def model(model_name: str):
        if model_name not in await asyncio.to_thread(pool.available):
            raise APIError(404, f"the model {model_name!r} does not exist", param="model", code="model_not_found")
        return model_card(model_name)

    # --- generation ------------------------------------------------------------------------------

    async def run_choices(served: Served, prepare) -> tuple[list[runs.Choice], asyncio.Queue]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        choices = prepare(loop, queue)
        metrics.inc("prompt_tokens_total", sum(len(c.prompt) for c in choices))
        return choices, queue

    async def collect(request: Request, choices, queue, t0: float) -> None:
        """Wait for every choice, cancelling them if the client leaves or time runs out."""

        async def drain():
            async for c, _piece, _lps in timed(choices, queue, t0):
                pass

        task = asyncio.ensure_future(drain())
        try:
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=0.05)
                if done:
                    break
                if await request.is_disconnected():
                    metrics.inc("sequences_cancelled_total", len(choices))
                    raise asyncio.CancelledError()
            task.result()
        finally:
            if not task.done():
                task.cancel()
            runs.cancel(choices)

    async def timed(choices, queue, t0):
        """runs.events, recording time to first token, inter-token latency and token counts."""
        last: dict[int, float] = {}
        async for c, piece, lps in runs.events(choices, queue, t0 + config.request_timeout):
            now = time.monotonic()
            if c.index in last:
                metrics.observe("inter_token_latency_seconds", now - last[c.index])
            elif c.tokens:
                metrics.observe("time_to_first_token_seconds", now - t0)
            if c.tokens:
                last[c.index] = now
                metrics.inc("generation_tokens_total", 1)
            yield c, piece, lps

    async def wait_all(request: Request, served: Served, choices, queue, t0: float) -> None:
        """The non-streaming end of a request: every choice finished (or an error raised)."""
        try:
            await collect(request, choices, queue, t0)
        finally:
            pool.release(served)
        first_error(choices)

    def stream_end(head: dict[str, Any], usage_: dict[str, int] | None) -> bytes:
        """The last events of a stream: the usage chunk when asked for, then [DONE]."""
        final = sse({**head, "choices": [], "usage": usage_}) if usage_ is not None else b""
        return final + b"data: [DONE]\n\n"

    def first_error(choices) -> None:
        for c in choices:
            if c.error is not None:
                raise c.error

    def sse(data: Any) -> bytes:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()

    def streaming(gen: AsyncIterator[bytes], served: Served, choices) -> StreamingResponse:
        async def body():
            try:
                async for chunk in gen:
                    yield chunk
            except asyncio.CancelledError:
                metrics.inc("sequences_cancelled_total", len(choices))
                raise
            except Exception as e:  # noqa: BLE001 - after the status line, errors go out as an event
                a = _as_api_error(e)
                yield sse(error_body(a.status, a.message, a.param, a.code))
            finally:
                runs.cancel(choices)
                pool.release(served)

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def usage(choices, prompt_tokens: int) -> dict[str, int]:
        out = sum(len(c.tokens) for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": out, "total_tokens": prompt_tokens + out}

    def token_text(served: Served, token: int) -> str:
        return served.lm.tokenizer.decode([token])

    def chat_logprob(served: Served, lp: TokenLogprob) -> dict[str, Any]:
        def entry(tok: int, value: float) -> dict[str, Any]:
            text = token_text(served, tok)
            return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

        return {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body: ChatRequest = await parse(request, ChatRequest)
        if body.max_tokens == 0:
            raise APIError(400, "max_tokens must be at least 1", param="max_tokens")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        served = await pool.acquire(body.model)
        t0 = time.monotonic()  # the time limit and time-to-first-token start once the model is loaded
        try:
            plan = runs.chat_plan(served, body)
            if plan.grammar:  # built once per model (~0.3 s): off the event loop
                await asyncio.to_thread(served.grammar_tokenizer)
            prompt_text = await asyncio.to_thread(runs.render_chat, served, body.messages, plan.tools)
            prompt = served.lm.encode(prompt_text)
            max_tokens = body.max_completion_tokens or body.max_tokens
            params = [runs.sampling(served, body, max_tokens, None if body.seed is None else body.seed + i)
                      for i in range(body.n)]
            limit = runs.limit_for(served, prompt, params[0], max_tokens)
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            choices, queue = await run_choices(served, lambda loop, q: runs.submit_choices(
                served, loop, q, [prompt] * body.n, params, [limit] * body.n, params[0].stop,
                logprobs=logprobs, grammar=plan.grammar))
        except BaseException:
            pool.release(served)
            raise
        cid, created = runs.new_id("chatcmpl"), int(time.time())
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model}
        tool_mode = plan.tool_mode != "none"

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(i: int, delta: dict[str, Any], finish: str | None = None, lps=None) -> bytes:
                data = {**head, "system_fingerprint": None,
                        "choices": [{"index": i, "delta": delta, "logprobs": lps, "finish_reason": finish}]}
                if include_usage:
                    data["usage"] = None
                return sse(data)

            async def gen():
                for c in choices:
                    yield chunk(c.index, {"role": "assistant", "content": ""})
                calls_sent: dict[int, int] = {}
                async for c, piece, lps in timed(choices, queue, t0):
                    lp = {"content": [chat_logprob(served, x) for x in lps]} if logprobs is not None and lps else None
                    text = c.text.text
                    if tool_mode and text.lstrip().startswith("<"):
                        calls = runs.parse_tool_calls(text[: text.rfind(runs.constraints.TOOL_CLOSE) + len(runs.constraints.TOOL_CLOSE)]) \
                            if runs.constraints.TOOL_CLOSE in text else []
                        for k in range(calls_sent.get(c.index, 0), len(calls)):
                            yield chunk(c.index, {"tool_calls": [{"index": k, **calls[k]}]})
                        calls_sent[c.index] = len(calls)
                    elif piece or lp:
                        yield chunk(c.index, {"content": piece}, lps=lp)
                first_error(choices)
                for c in choices:
                    finish = "tool_calls" if calls_sent.get(c.index) else c.finish
                    yield chunk(c.index, {}, finish)
                yield stream_end(head, usage(choices, len(prompt) * body.n) if include_usage else None)

            return streaming(gen(), served, choices)

        await wait_all(request, served, choices, queue, t0)
        out = []
        for c in choices:
            message: dict[str, Any] = {"role": "assistant", "content": c.text.text, "refusal": None}
            finish = c.finish
            if tool_mode and c.text.text.lstrip().startswith("<"):
                calls = runs.parse_tool_calls(c.text.text)
                if calls:
                    message.update(content=None, tool_calls=calls)
                    finish = "tool_calls"
            lp = {"content": [chat_logprob(served, x) for x in c.logprobs]} if logprobs is not None else None
            out.append({"index": c.index, "message": message, "logprobs": lp, "finish_reason": finish})
        return {"id": cid, "object": "chat.completion", "created": created, "model": body.model,
                "system_fingerprint": None, "choices": out, "usage": usage(choices, len(prompt) * body.n)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body: CompletionRequest = await parse(request, CompletionRequest)
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens 0 is only meaningful with echo", param="max_tokens")
        if body.stream and body.echo and body.logprobs is not None:
            raise APIError(400, "echo with logprobs is not available when streaming", param="echo")
        served = await pool.acquire(body.model)
        t0 = time.monotonic()  # the time limit and time-to-first-token start once the model is loaded
        try:
            p = body.prompt
            batch = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
            if not batch:
                raise APIError(400, "prompt must not be empty", param="prompt")
            prompts = [runs.token_ids(served, x, f"prompt[{i}]") for i, x in enumerate(batch)]
            max_tokens = 16 if body.max_tokens is None else body.max_tokens
            all_prompts, params, limits = [], [], []
            for prompt in prompts:
                for j in range(body.n):
                    sp = runs.sampling(served, body, max_tokens, None if body.seed is None else body.seed + j)
                    all_prompts.append(prompt)
                    params.append(sp)
                    limits.append(runs.limit_for(served, prompt, sp, max_tokens))
            echo_lp = body.logprobs if body.echo and body.logprobs is not None else None
            choices, queue = await run_choices(served, lambda loop, q: runs.submit_choices(
                served, loop, q, all_prompts, params, limits, params[0].stop, logprobs=body.logprobs,
                prompt_logprobs=echo_lp))
        except BaseException:
            pool.release(served)
            raise
        cid, created = runs.new_id("cmpl"), int(time.time())
        head = {"id": cid, "object": "text_completion", "created": created, "model": body.model}
        n_prompt = sum(len(x) for x in prompts)

        def prompt_text(c) -> str:
            return served.lm.tokenizer.decode(c.prompt) if body.echo else ""

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(i: int, text: str, finish: str | None = None, lps=None) -> bytes:
                data = {**head, "choices": [{"index": i, "text": text, "logprobs": lps, "finish_reason": finish}]}
                if include_usage:
                    data["usage"] = None
                return sse(data)

            async def gen():
                if body.echo:
                    for c in choices:
                        yield chunk(c.index, prompt_text(c))
                async for c, piece, lps in timed(choices, queue, t0):
                    lp = completion_logprobs(served, [(x.token, x) for x in lps], 0) if body.logprobs is not None and lps else None
                    if piece or lp:
                        yield chunk(c.index, piece, lps=lp)
                first_error(choices)
                for c in choices:
                    yield chunk(c.index, "", c.finish)
                yield stream_end(head, usage(choices, n_prompt) if include_usage else None)

            return streaming(gen(), served, choices)

        await wait_all(request, served, choices, queue, t0)
        out = []
        for c in choices:
            text = prompt_text(c) + c.text.text
            lp = None
            if body.logprobs is not None:
                pairs: list[tuple[int, TokenLogprob | None]] = []
                if body.echo:
                    pairs += list(zip(c.prompt, c.prompt_logprobs or [None] * len(c.prompt)))
                pairs += [(x.token, x) for x in c.logprobs]
                lp = completion_logprobs(served, pairs, 0)
            out.append({"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish})
        return {"id": cid, "object": "text_completion", "created": created, "model": body.model,
                "system_fingerprint": None, "choices": out, "usage": usage(choices, n_prompt)}

    def completion_logprobs(served: Served, pairs, offset: int) -> dict[str, Any]:
        tokens, values, tops, offsets = [], [], [], []
        for tok, lp in pairs:
            text = token_text(served, tok)
            tokens.append(text)
            values.append(None if lp is None else lp.logprob)
            tops.append(None if lp is None else {token_text(served, t): v for t, v in lp.top})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body: EmbeddingRequest = await parse(request, EmbeddingRequest)
        served = await pool.acquire(body.model)
        try:
            x = body.input
            batch = [x] if isinstance(x, str) or (x and isinstance(x[0], int)) else list(x)
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
            vectors = await asyncio.to_thread(embed, served, ids, body.dimensions)
        finally:
            pool.release(served)
        data = []
        for i, v in enumerate(vectors):
            value: Any = v if body.encoding_format == "float" else base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
            data.append({"object": "embedding", "index": i, "embedding": value})
        n = sum(len(t) for t in ids)
        metrics.inc("prompt_tokens_total", n)
        return {"object": "list", "data": data, "model": body.model, "usage": {"prompt_tokens": n, "total_tokens": n}}

    return app


def embed(served: Served, batch: list[list[int]], dimensions: int | None = None) -> list[list[float]]:
    """Mean of the final normalized hidden states over the tokens, L2-normalized."""
    model = served.lm.model
    device = model.device
    out = []
    with torch.inference_mode():
        for ids in batch:
            h = model(torch.tensor([ids], device=device), head=False)[0].float()  # (T, C)
            v = h.mean(0)
            if dimensions:
                v = v[:dimensions]
            out.append(torch.nn.functional.normalize(v, dim=0).tolist())
    return out


__all__ = ["create_app", "ServerConfig", "embed"]

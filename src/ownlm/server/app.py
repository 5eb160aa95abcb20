"""The OpenAI-compatible HTTP API: routes, error bodies, server-sent events, and the guard in
front of them (Host and Origin checks, CORS, API keys, JSON bodies only, body limit, request
metrics, the access log)."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import struct
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, AsyncIterator, Callable, Protocol, TypeVar
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Match

from ..engine.scheduler import Overloaded, TokenLogprob
from ..errors import BadRequest, ChatTemplateError, ModelNotFound, OwnlmError
from . import logs, runs
from .metrics import Metrics
from .pool import ModelPool, PoolFull, Served
from .schemas import ChatRequest, CompletionRequest, EmbeddingRequest

B = TypeVar("B", bound=BaseModel)
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "invalid_request_error", 415: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 499: "invalid_request_error", 500: "server_error",
               503: "service_unavailable"}
MAX_JSON_DEPTH = 64  # arrays and objects inside each other in a request body
DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass
class ServerConfig:
    api_keys: list[str] = field(default_factory=list)
    check_host: bool = True  # refuse non-loopback Host headers (DNS rebinding); off for a public address
    max_body_bytes: int = 8 << 20
    request_timeout: float = 600.0
    retry_after: int = 1
    cors_origins: list[str] = field(default_factory=list)  # web pages (origins) allowed to call; see Guard
    # the access log: called with one line per request ("text" or "json"); None (the default for
    # Python code) logs nothing, `ownlm serve` writes to stderr
    access_log: Callable[[str], None] | None = None
    log_format: str = "text"


def web_origin(value: str) -> str | None:
    """An origin (`scheme://host[:port]`, as browsers send it in `Origin`) in one spelling:
    lower case, no default port; None when `value` is not one."""
    try:
        u = urlsplit(value.strip().lower())
        port = u.port
    except ValueError:
        return None
    if not u.scheme or not u.hostname or u.username or u.password or u.path not in ("", "/") or u.query \
            or u.fragment or not value.strip().lower().startswith(u.scheme + "://"):
        return None
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    return f"{u.scheme}://{host}" + (f":{port}" if port is not None and port != DEFAULT_PORTS.get(u.scheme) else "")


def cors_origins(values: list[str]) -> list[str]:
    """`--cors` values checked and normalized (a BadRequest names the first malformed one)."""
    out = []
    for v in values:
        o = web_origin(v)
        if o is None:
            raise BadRequest(f"--cors {v!r} is not a web origin", "give scheme://host[:port], such as "
                             "http://localhost:3000 (no path; 'null' and '*' are not accepted)")
        out.append(o)
    return out


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
    if isinstance(e, ClientDisconnect):  # gone before its body came: nobody reads this, metrics count it
        return APIError(499, "the client closed the connection before sending its whole request",
                        code="client_closed_request")
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
    if isinstance(e, runs.TimedOut):
        return APIError(503, str(e), code="timeout")
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
    """ASGI middleware in front of every route, in this order: Host check (DNS rebinding), Origin
    check and CORS, API keys (constant time), JSON bodies only, body size limit; and request
    metrics, labelled by route template so a client cannot grow them.

    Browsers let any web page send a "simple" request (a text/plain POST, say) to any address,
    127.0.0.1 included, without asking the server first: only the answer is hidden from the page.
    So a request whose `Origin` is another site is refused outright (403), unless that origin was
    allowed (`--cors`), and a POST must say `Content-Type: application/json`, which a page can only
    send after a CORS preflight (415 otherwise).

    Once the response has ended, it counts the request in the metrics and writes its line to the
    access log (ServerConfig.access_log); routes add the model, token counts and error reason to
    the request's `logs.Entry`, kept in the ASGI scope."""

    def __init__(self, app, config: ServerConfig, metrics: Metrics, routes: list[Any]):
        self.app, self.config, self.metrics, self.routes = app, config, metrics, routes
        self.keys = [k.encode() for k in config.api_keys]
        self.cors = set(cors_origins(config.cors_origins))

    def route_label(self, scope) -> str:
        """The route's template (`/v1/models/{model_name}`), or one label for every unknown path."""
        probe = {"type": "http", "path": scope.get("path", ""), "method": scope.get("method", "GET"),
                 "root_path": scope.get("root_path", "")}
        for route in self.routes:
            match, _ = route.matches(probe)
            if match != Match.NONE:
                return getattr(route, "path_format", None) or route.path
        return "unmatched"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, t0 = datetime.now().astimezone(), time.monotonic()
        entry = scope["ownlm.log"] = logs.Entry()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        status_seen = {"status": 500}
        cors: list[tuple[bytes, bytes]] = []  # added to every response to an allowed cross-origin page

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status_seen["status"] = message["status"]
                if cors:
                    message = {**message, "headers": [*message.get("headers", []), *cors]}
            await send(message)

        async def reply(status: int, message: str, code: str | None = None, extra: dict[str, str] | None = None,
                        body: bytes | None = None):
            if body is None:
                body = json.dumps(error_body(status, message, code=code)).encode()
                entry.error = message
            hdrs = [(b"content-length", str(len(body)).encode())]
            hdrs += [(b"content-type", b"application/json")] if body else []
            hdrs += [(k.lower().encode(), v.encode("latin-1")) for k, v in (extra or {}).items()]
            await counting_send({"type": "http.response.start", "status": status, "headers": hdrs})
            await counting_send({"type": "http.response.body", "body": body})

        try:
            host = headers.get("host", "")
            if self.config.check_host:
                name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
                if name not in LOOPBACK_HOSTS:
                    return await reply(400, f"the Host header {host!r} is not allowed: this server answers on "
                                            "loopback names only", code="invalid_host")
            method = scope.get("method", "GET")
            origin = headers.get("origin")
            if origin is not None:
                o = web_origin(origin)
                if o is not None and o in self.cors:
                    cors += [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
                             (b"access-control-expose-headers", b"Retry-After")]
                    if method == "OPTIONS" and "access-control-request-method" in headers:  # a preflight
                        asked = headers.get("access-control-request-headers", "")
                        return await reply(204, "", body=b"", extra={
                            "Access-Control-Allow-Methods": "GET, POST, OPTIONS", "Access-Control-Max-Age": "600",
                            **({"Access-Control-Allow-Headers": asked} if asked else {})})
                elif o is None or o != web_origin(f"{scope.get('scheme', 'http')}://{host}"):
                    return await reply(403, f"requests from the web page origin {origin!r} are refused: a page "
                                            f"may only use this server if it was started with --cors {origin}",
                                       code="origin_not_allowed")
            if self.keys and scope["path"] != "/health":
                auth = headers.get("authorization", "")
                given = auth[7:].strip().encode() if auth.lower().startswith("bearer ") else b""
                ok = False
                for key in self.keys:  # compare against every key so timing does not tell which matched
                    ok |= hmac.compare_digest(given, key)
                if not ok:
                    return await reply(401, "missing or invalid API key (send Authorization: Bearer KEY)",
                                       code="invalid_api_key", extra={"WWW-Authenticate": "Bearer"})
            if method == "POST":
                kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
                if kind != "application/json":
                    return await reply(415, f"the request body must be JSON sent as Content-Type: application/json "
                                            f"(got {kind or 'no Content-Type'})", code="unsupported_media_type")
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
        except Exception as e:  # a 500 (answered outside this middleware) or a response cut short
            entry.error = entry.error or f"internal error: {type(e).__name__}: {e}"
            raise
        except asyncio.CancelledError:
            entry.error = entry.error or "cancelled: the client left or the server is stopping"
            raise
        finally:
            route = self.route_label(scope)
            self.metrics.inc("requests_total", status=str(status_seen["status"]), path=route)
            if self.config.access_log is not None:
                rec = logs.record(started, scope.get("client"), scope.get("method", "GET"), route,
                                  status_seen["status"], (time.monotonic() - t0) * 1000, entry)
                self.config.access_log(logs.line(rec, self.config.log_format))


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


def _entry(request: Request) -> logs.Entry:
    """The request's access-log entry (a throwaway one for an app used without its Guard)."""
    return request.scope.setdefault("ownlm.log", logs.Entry())


def _metrics(pool: ModelPool) -> Metrics:
    metrics = Metrics()
    metrics.counter("requests_total", "HTTP requests by status and route (path template; unknown paths: unmatched)")
    metrics.counter("prompt_tokens_total", "prompt tokens processed")
    metrics.counter("generation_tokens_total", "tokens generated")
    metrics.counter("sequences_cancelled_total", "sequences cancelled (client gone, stop string, timeout)")
    metrics.histogram("time_to_first_token_seconds", "time from request to first generated token")
    metrics.histogram("inter_token_latency_seconds", "time between consecutive generated tokens of a sequence")
    metrics.gauge("running_sequences", "sequences on the engine (decoding, being prefilled, being embedded)",
                  lambda: {(("model", s.id),): _busy(s)[0] for s in list(pool.loaded.values())})
    metrics.gauge("queue_depth", "requests waiting for an engine slot (generation and embeddings)",
                  lambda: {(("model", s.id),): _busy(s)[1] for s in list(pool.loaded.values())})
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
    app.add_middleware(Guard, config=config, metrics=app.state.ownlm.metrics, routes=router.routes)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _error)
    # APIError and OwnlmError get handlers of their own: only the catch-all logs a traceback
    for kind in (APIError, OwnlmError, ClientDisconnect, Exception):
        app.add_exception_handler(kind, _error)
    app.include_router(router)
    return app


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    status = exc.status_code
    message = {404: "no such route", 405: "method not allowed on this route"}.get(status, str(exc.detail))
    _entry(request).error = message
    return JSONResponse(error_body(status, message), status_code=status)


async def _error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, RequestValidationError):
        exc = _validation_error(exc)
    a = _as_api_error(exc, _state(request).config.retry_after)
    _entry(request).error = a.message
    return JSONResponse(error_body(a.status, a.message, a.param, a.code), status_code=a.status, headers=a.headers)


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def _parse(request: Request, schema: type[B]) -> B:
    raw = await request.body()
    try:
        data = json.loads(raw, parse_constant=_not_json)  # NaN and Infinity are Python's, not JSON
    except RecursionError:
        raise APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json") \
            from None
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    if isinstance(data.get("model"), str):
        _entry(request).model = data["model"]
    _check_json(data)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None


def _check_json(data: Any) -> None:
    """What JSON allows but nothing downstream should see: nesting deeper than MAX_JSON_DEPTH
    (recursion in validators, templates, grammar compilers) and strings with a lone UTF-16
    surrogate (`"\\ud800"`: valid JSON escapes, but not text, so no tokenizer can encode it)."""
    stack: list[tuple[Any, int, tuple]] = [(data, 1, ())]
    while stack:
        node, depth, path = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels", param=_param(path),
                           code="invalid_json")
        for key, value in node.items() if isinstance(node, dict) else enumerate(node):
            if isinstance(key, str) and not _is_text(key) or isinstance(value, str) and not _is_text(value):
                where = _param(path + (key,))
                raise APIError(400, f"{where} is not valid Unicode: it holds a lone UTF-16 surrogate (an unpaired "
                                    "\\ud800-\\udfff escape)", param=where, code="invalid_value")
            if isinstance(value, (dict, list)):
                stack.append((value, depth + 1, path + (key,)))


def _is_text(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _param(path: tuple) -> str | None:
    """An OpenAI-style parameter path: messages[0].content."""
    out = ""
    for p in path:
        p = p if isinstance(p, int) else p.encode("utf-8", "backslashreplace").decode("utf-8")
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out or None


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
    _entry(request).model = model_name
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


def _busy(served: Served) -> tuple[int, int]:
    """(sequences running, requests queued) on a model: generation and embeddings together."""
    s, e = served.scheduler.stats(), served.embedder.stats()
    return s["running"] + e["running"], s["waiting"] + e["waiting"]


def _admit(served: Served, n: int) -> None:
    """The one admission rule of every route: what runs and waits on a model, generation and
    embeddings together, stays within --max-running + --max-queue; beyond, a 429."""
    running, queued = _busy(served)
    if running + queued + n > served.scheduler.max_running + served.scheduler.max_queue:
        raise Overloaded(f"{running} sequences are running and {queued} are queued")


async def _generate(request: Request, t: Translator) -> StreamingResponse | dict[str, Any]:
    """Acquire the model, submit the job, stream or wait, release the model."""
    st = _state(request)
    served = await st.pool.acquire(t.model)
    t0 = time.monotonic()  # the time limit and time-to-first-token start once the model is loaded
    try:
        queue: asyncio.Queue = asyncio.Queue()
        job = await t.job(served)
        _admit(served, len(job.prompts))
        choices = runs.submit(served, asyncio.get_running_loop(), queue, job)
    except BaseException:
        st.pool.release(served)
        raise
    st.metrics.inc("prompt_tokens_total", sum(len(c.prompt) for c in choices))
    _entry(request).usage = lambda: _usage(choices, t.prompt_tokens)  # read when the response has ended
    events = _timed(st, choices, queue, t0)
    if t.stream:
        return _streaming(st, t.chunks(served, choices, events), served, choices, _entry(request))
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


class _Stream(StreamingResponse):
    """A stream whose sequences are cancelled and whose model is released when the response
    ends however it ends: finished, failed, or the client gone, even before the first chunk
    (then the body generator never starts, so its own `finally` would never run)."""

    def __init__(self, body: AsyncIterator[bytes], cleanup):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.cleanup()


def _streaming(st: State, chunks: AsyncIterator[bytes], served: Served, choices: list[runs.Choice],
               entry: logs.Entry) -> _Stream:
    state = {"finished": False, "cleaned": False}

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield chunk
            state["finished"] = True
        except Exception as e:  # noqa: BLE001 - after the status line, errors go out as an event
            state["finished"] = True
            a = _as_api_error(e)
            entry.error = a.message  # logged with the stream's status, 200: the error came as an event
            yield _sse(error_body(a.status, a.message, a.param, a.code))
        finally:
            cleanup()

    def cleanup() -> None:
        if state["cleaned"]:
            return
        state["cleaned"] = True
        if not state["finished"]:
            st.metrics.inc("sequences_cancelled_total", len(choices))
        runs.cancel(choices)
        st.pool.release(served)

    return _Stream(body(), cleanup)


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
        params = [runs.sampling(served, body, max_tokens, i) for i in range(body.n)]
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
        # the legacy API's default, 16, unless the model is a preset with its own
        max_tokens = served.lm.defaults.get("max_tokens", 16) if body.max_tokens is None else body.max_tokens
        each = [(p, runs.sampling(served, body, max_tokens, j)) for p in prompts for j in range(body.n)]
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


def _documented(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI entry of a body the route parses itself (with its own size and depth limits,
    so FastAPI never sees it): the pydantic model's schema, its $defs inlined."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


@router.post("/v1/chat/completions", openapi_extra=_documented(ChatRequest))
async def chat(request: Request) -> Any:
    return await _generate(request, Chat(await _parse(request, ChatRequest)))


@router.post("/v1/completions", openapi_extra=_documented(CompletionRequest))
async def completions(request: Request) -> Any:
    return await _generate(request, Completions(await _parse(request, CompletionRequest)))


@router.post("/v1/embeddings", openapi_extra=_documented(EmbeddingRequest))
async def embeddings(request: Request) -> dict[str, Any]:
    st = _state(request)
    body = await _parse(request, EmbeddingRequest)
    served = await st.pool.acquire(body.model)
    t0 = time.monotonic()  # the time limit starts once the model is loaded, as for generation
    try:
        ids = _embedding_inputs(served, body)
        _admit(served, 1)  # one job: its texts run one after another
        vectors = await _embed(request, st, served, ids, body.dimensions, t0 + st.config.request_timeout)
    finally:
        st.pool.release(served)
    data = []
    for i, v in enumerate(vectors):
        value: Any = v if body.encoding_format == "float" else base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    n = sum(len(t) for t in ids)
    st.metrics.inc("prompt_tokens_total", n)
    _entry(request).usage = lambda: {"prompt_tokens": n, "completion_tokens": 0}
    return {"object": "list", "data": data, "model": body.model, "usage": {"prompt_tokens": n, "total_tokens": n}}


def _embedding_inputs(served: Served, body: EmbeddingRequest) -> list[list[int]]:
    batch = _batch(body.input)
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


async def _embed(request: Request, st: State, served: Served, ids: list[list[int]], dimensions: int | None,
                 deadline: float) -> list[list[float]]:
    """The vectors, computed on the model's embedding thread; a time limit or a client gone
    stops the job at its next chunk."""
    stop = threading.Event()
    job = asyncio.wrap_future(served.embedder.submit(ids, dimensions, stop))
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise runs.TimedOut("the request ran past the server's time limit (--request-timeout)")
            done, _ = await asyncio.wait({job}, timeout=min(0.05, left))
            if done:
                if job.cancelled():
                    raise OwnlmError("the model was unloaded")
                return job.result()
            if await request.is_disconnected():
                st.metrics.inc("sequences_cancelled_total", len(ids))
                raise asyncio.CancelledError()
    finally:
        stop.set()  # a job still queued or running ends at its next chunk


__all__ = ["create_app", "ServerConfig"]

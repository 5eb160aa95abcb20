"""The HTTP server: the app factory, and the guard in front of every route (Host and Origin
checks, CORS, API keys, JSON bodies only, body limit, request metrics, the access log). The
protocols' routes live in their own modules (openai); http holds what they share."""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import time
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, AsyncIterator, Callable
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Match

from ..engine import prefix_cache
from ..errors import BadRequest, OwnlmError
from . import anthropic, logs, ollama, openai, page, responses, tokens
from .http import APIError, ServerConfig, State, as_api_error, busy, log_entry, state_of, validation_error
from .metrics import Metrics
from .pool import ModelPool

LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}


DEFAULT_PORTS = {"http": 80, "https": 443}


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


# what programs call a JSON body without saying so: none, curl -d's and requests' data=str's
PROGRAM_KINDS = ("", "application/x-www-form-urlencoded", "text/plain")


class Guard:
    """ASGI middleware in front of every route, in this order: Host check (DNS rebinding), Origin
    check and CORS, API keys (constant time), JSON bodies only, body size limit; and request
    metrics, labelled by route template so a client cannot grow them.

    Browsers let any web page send a "simple" request (a text/plain POST, say) to any address,
    127.0.0.1 included, without asking the server first: only the answer is hidden from the page.
    So a request whose `Origin` is another site is refused outright (403), unless that origin was
    allowed (`--cors`), and a POST a browser sends (with an Origin or Sec-Fetch-* headers) must say
    `Content-Type: application/json`, which a page can only send after a CORS preflight (415
    otherwise). A program's POST (none of those headers: curl, SDKs) may call its JSON text/plain,
    form-urlencoded or nothing, as curl -d does.

    Once the response has ended, it counts the request in the metrics and writes its line to the
    access log (ServerConfig.access_log); routes add the model, token counts and error reason to
    the request's `logs.Entry`, kept in the ASGI scope."""

    def __init__(self, app, config: ServerConfig, metrics: Metrics, routes: list[Any],
                 error_json: Callable[[str, APIError], dict[str, Any]]):
        self.app, self.config, self.metrics, self.routes = app, config, metrics, routes
        self.error_json = error_json  # the error body of the protocol serving a path
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
                body = json.dumps(self.error_json(scope["path"], APIError(status, message, code=code))).encode()
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
                            "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
                            "Access-Control-Max-Age": "600",
                            **({"Access-Control-Allow-Headers": asked} if asked else {})})
                elif o is None or o != web_origin(f"{scope.get('scheme', 'http')}://{host}"):
                    return await reply(403, f"requests from the web page origin {origin!r} are refused: a page "
                                            f"may only use this server if it was started with --cors {origin}",
                                       code="origin_not_allowed")
            elif headers.get("sec-fetch-site") == "cross-site" and not (method in ("GET", "HEAD") and
                                                                        scope["path"] in page.PUBLIC):
                # a request another site's page made without an Origin (an <img>, a link): it could
                # still make the server load and unload models; only the chat page's files load so
                return await reply(403, "requests made by another site's page are refused", code="cross_site")
            public = scope["path"] == "/health" or (method in ("GET", "HEAD") and scope["path"] in page.PUBLIC)
            if self.keys and not public:  # the chat page and its files load without a key
                auth = headers.get("authorization", "")
                # Authorization: Bearer KEY (OpenAI's clients), or x-api-key: KEY (Anthropic's)
                given = (auth[7:] if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")).strip() \
                    .encode("latin-1")  # the header's own bytes, as a key given in UTF-8 was sent
                ok = False
                for key in self.keys:  # compare against every key so timing does not tell which matched
                    ok |= hmac.compare_digest(given, key)
                if not ok:
                    return await reply(401, "missing or invalid API key (send Authorization: Bearer KEY, or "
                                            "x-api-key: KEY)", code="invalid_api_key",
                                       extra={"WWW-Authenticate": "Bearer"})
            if method == "POST":
                kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
                # a browser marks its requests (Origin on a POST, Sec-Fetch-*): from a page, only JSON
                # sent as JSON; a program's body is read as JSON whatever curl -d or requests' data=
                # called it (Ollama's own examples send form-urlencoded)
                browser = origin is not None or any(h.startswith("sec-fetch-") for h in headers)
                if kind != "application/json" and (browser or kind not in PROGRAM_KINDS):
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


def _metrics(pool: ModelPool) -> Metrics:
    metrics = Metrics()
    metrics.counter("requests_total", "HTTP requests by status and route (path template; unknown paths: unmatched)")
    metrics.counter("prompt_tokens_total", "prompt tokens processed")
    metrics.counter("generation_tokens_total", "tokens generated")
    metrics.counter("sequences_cancelled_total", "sequences cancelled (client gone, stop string, timeout)")
    metrics.counter("speculative_draft_tokens_total", "tokens guessed by speculative decoding (speculate)")
    metrics.counter("speculative_accepted_tokens_total", "guessed tokens the model kept (the rest were rejected)")
    metrics.histogram("time_to_first_token_seconds", "time from request to first generated token")
    metrics.histogram("inter_token_latency_seconds", "time between consecutive generated tokens of a sequence")
    metrics.gauge("running_sequences", "sequences on the engine (decoding, being prefilled, being embedded)",
                  lambda: {(("model", s.id),): busy(s)[0] for s in list(pool.loaded.values())})
    metrics.gauge("queue_depth", "requests waiting for an engine slot (generation and embeddings)",
                  lambda: {(("model", s.id),): busy(s)[1] for s in list(pool.loaded.values())})
    metrics.gauge("models_loaded", "models in memory", lambda: {(): len(pool.loaded)})

    def cache_stat(key: str):  # one figure of each loaded model's prefix cache
        def read() -> dict[tuple, float]:
            caches = {s.id: prefix_cache.of(s.lm.model) for s in list(pool.loaded.values())}
            return {(("model", mid),): pc.stats()[key] for mid, pc in caches.items() if pc is not None}
        return read

    for name, key, kind, help_ in (
            ("prefix_cache_hits_total", "hits", "counter", "prompts that started from cached keys and values"),
            ("prefix_cache_misses_total", "misses", "counter", "prompts with no cached start"),
            ("prefix_cache_cached_tokens_total", "cached_tokens", "counter",
             "prompt tokens taken from the prefix cache instead of computed"),
            ("prefix_cache_evictions_total", "evictions", "counter", "cache blocks evicted to stay in budget"),
            ("prefix_cache_bytes", "bytes", "gauge", "bytes of keys and values the prefix cache holds"),
            ("prefix_cache_budget_bytes", "budget", "gauge", "the prefix cache's bound (--cache-mb)")):
        metrics.gauge(name, help_, cache_stat(key), kind)
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


# each protocol's module: its `router`, and optionally ERRORS = (path prefix, error body) (http.ErrorFormat).
# openai: /v1 chat, completions, embeddings; responses: /v1/responses; anthropic: /v1/messages;
# ollama: /api/...; tokens: /tokenize, /detokenize, /tokenizer_info (vLLM's); page: the chat page at /
PROTOCOLS = (openai, page, anthropic, tokens, responses, ollama)


def _no_telemetry() -> dict[str, Any]:
    """FastAPI 0.16x records spans, metrics and logs through OpenTelemetry and, where the
    environment asks (FASTAPI_OTEL_AUTO_CONFIGURE with an OTLP endpoint), sends them away: ownlm
    turns all of it off, whatever the environment says (older FastAPI has none of it)."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False, "operation_spans": False,
                          "auto_configure": False}}


def create_app(pool: ModelPool, config: ServerConfig | None = None) -> FastAPI:
    """The ASGI app. It only queues work on the pool's engines: something must run
    `pool.driver` (server.serving.Server does)."""
    config = config or ServerConfig()
    app = FastAPI(title="ownlm", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None, **_no_telemetry())
    formats = [m.ERRORS for m in PROTOCOLS if getattr(m, "ERRORS", None)]
    st = app.state.ownlm = State(pool, config, _metrics(pool), formats)
    routers = [router] + [m.router for m in PROTOCOLS]
    app.add_middleware(Guard, config=config, metrics=st.metrics, routes=[r for x in routers for r in x.routes],
                       error_json=st.error_json)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _error)
    # APIError and OwnlmError get handlers of their own: only the catch-all logs a traceback
    for kind in (APIError, OwnlmError, ClientDisconnect, Exception):
        app.add_exception_handler(kind, _error)
    for r in routers:
        app.include_router(r)
    return app


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    status = exc.status_code
    message = {404: "no such route", 405: "method not allowed on this route"}.get(status, str(exc.detail))
    log_entry(request).error = message
    return JSONResponse(state_of(request).error_json(request.url.path, APIError(status, message)), status_code=status)


async def _error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, RequestValidationError):
        exc = validation_error(exc)
    a = as_api_error(exc, state_of(request).config.retry_after)
    log_entry(request).error = a.message
    return JSONResponse(state_of(request).error_json(request.url.path, a), status_code=a.status, headers=a.headers)


router = APIRouter()


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    return {"status": "ok", "models_loaded": sorted(state_of(request).pool.loaded)}


@router.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    return PlainTextResponse(state_of(request).metrics.render(), media_type="text/plain; version=0.0.4")


__all__ = ["create_app", "ServerConfig"]

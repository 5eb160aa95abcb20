"""What every protocol's routes share: error bodies, parsing a JSON body with its limits, the
state on the app, and the one generation skeleton (acquire the model, submit the job, stream
or wait, release) that each protocol's translator plugs into."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse

from ..engine.scheduler import Overloaded, TokenLogprob
from ..errors import BadRequest, ChatTemplateError, ModelNotFound, OwnlmError
from . import logs, runs
from .metrics import Metrics
from .pool import ModelPool, PoolFull, Served

B = TypeVar("B", bound=BaseModel)


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "invalid_request_error", 415: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 499: "invalid_request_error", 500: "server_error",
               503: "service_unavailable"}


MAX_JSON_DEPTH = 64  # arrays and objects inside each other in a request body


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
    allow_pull: bool = False  # Ollama's POST /api/pull may write to the store (`ownlm serve --allow-pull`)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


# A protocol whose errors have another shape (Ollama's {"error": "..."}, Anthropic's {"type":
# "error", ...}) declares (path prefix, its error body) in its module's ERRORS; create_app
# collects them, and every error of a route under that prefix (the Guard's, the handlers', a
# stream's last event) takes that shape. OpenAI's is the default.
ErrorFormat = Callable[[APIError], dict[str, Any]]


def openai_error(a: APIError) -> dict[str, Any]:
    return error_body(a.status, a.message, a.param, a.code)


def error_format(formats: list[tuple[str, ErrorFormat]], path: str) -> ErrorFormat:
    """The error body of the protocol serving `path` (the longest matching prefix)."""
    best = max((p for p in formats if path.startswith(p[0])), key=lambda p: len(p[0]), default=None)
    return best[1] if best else openai_error


def as_api_error(e: BaseException, retry_after: int = 1) -> APIError:
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
        return APIError(400, str(e), param=e.param, code=e.code)
    if isinstance(e, runs.TimedOut):  # the SDKs retry a 5xx twice: a request that ran out of time would run thrice
        return APIError(503, str(e), code="timeout", headers={"x-should-retry": "false"})
    if isinstance(e, OwnlmError):
        return APIError(503, str(e))
    return APIError(500, f"internal error: {type(e).__name__}: {e}")


def validation_error(e: ValidationError | RequestValidationError) -> APIError:
    err = e.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if err.get("type") == "extra_forbidden":
        return APIError(400, f"unsupported parameter: {param}", param=param, code="unsupported_parameter")
    if err.get("type") == "missing":
        return APIError(400, f"missing required parameter: {param}", param=param, code="missing_required_parameter")
    return APIError(400, f"invalid value for {param}: {err.get('msg')}", param=param, code="invalid_value")


@dataclass
class State:
    """What every route shares, kept on `app.state.ownlm`."""

    pool: ModelPool
    config: ServerConfig
    metrics: Metrics
    error_formats: list[tuple[str, ErrorFormat]] = field(default_factory=list)  # see ErrorFormat

    def error_json(self, path: str, a: APIError) -> dict[str, Any]:
        return error_format(self.error_formats, path)(a)


def state_of(request: Request) -> State:
    return request.app.state.ownlm


def log_entry(request: Request) -> logs.Entry:
    """The request's access-log entry (a throwaway one for an app used without its Guard)."""
    return request.scope.setdefault("ownlm.log", logs.Entry())


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def parse_body(request: Request, schema: type[B]) -> B:
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
        log_entry(request).model = data["model"]
    _check_json(data)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


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


def documented(model: type[BaseModel]) -> dict[str, Any]:
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


Events = AsyncIterator[tuple[runs.Choice, str, list[TokenLogprob]]]


class Translator(Protocol):
    """A generation route's own part: its request into a Job, the engine's events into its wire format.
    A streaming translator may also have `media_type` (default text/event-stream) and
    `error_event(APIError) -> bytes` (an error after the stream began; default OpenAI's event)."""

    model: str
    stream: bool

    async def job(self, served: Served) -> runs.Job: ...
    def chunks(self, served: Served, choices: list[runs.Choice], events: Events) -> AsyncIterator[bytes]: ...
    def result(self, served: Served, choices: list[runs.Choice]) -> dict[str, Any]: ...


def busy(served: Served) -> tuple[int, int]:
    """(sequences running, requests queued) on a model: generation and embeddings together."""
    s, e = served.scheduler.stats(), served.embedder.stats()
    return s["running"] + e["running"], s["waiting"] + e["waiting"]


def admit(served: Served, n: int) -> None:
    """The one admission rule of every route: what runs and waits on a model, generation and
    embeddings together, stays within --max-running + --max-queue; beyond, a 429."""
    room = served.scheduler.max_running + served.scheduler.max_queue
    if n > room:  # never admitted, however long it waits: not a 429 to retry
        raise APIError(400, f"{n} sequences at once are more than this server runs and queues ({room}: "
                            "--max-running + --max-queue)", param="n")
    running, queued = busy(served)
    if running + queued + n > room:
        raise Overloaded(f"{running} sequences are running and {queued} are queued")


async def generate(request: Request, t: Translator) -> StreamingResponse | dict[str, Any]:
    """Acquire the model, submit the job, stream or wait, release the model."""
    st = state_of(request)
    served = await st.pool.acquire(t.model)
    t0 = time.monotonic()  # the time limit and time-to-first-token start once the model is loaded
    try:
        queue: asyncio.Queue = asyncio.Queue()
        job = await t.job(served)
        made = await asyncio.to_thread(runs.grammars, served, job)  # compiling a large schema takes time
        admit(served, len(job.prompts))
        choices = runs.submit(served, asyncio.get_running_loop(), queue, job, made)
    except BaseException:
        st.pool.release(served)
        raise
    st.metrics.inc("prompt_tokens_total", sum(len(c.prompt) for c in choices))
    n = getattr(getattr(t, "body", None), "n", 1)  # choices per prompt (OpenAI's n)
    log_entry(request).usage = lambda: usage_of(choices, t.prompt_tokens, n)  # read when the response has ended
    events = _timed(st, choices, queue, t0)
    if t.stream:
        return streaming(st, t.chunks(served, choices, events), served, choices, log_entry(request),
                         getattr(t, "media_type", "text/event-stream"), getattr(t, "error_event", None))
    try:
        await _drain(request, st, choices, events)
    finally:
        count_speculation(st, served, choices)
        st.pool.release(served)
    return t.result(served, choices)


def count_speculation(st: State, served: Served, choices: list[runs.Choice]) -> None:
    """A finished (or abandoned) request's guesses into /metrics, per model."""
    counts = speculation_of(choices)
    if counts is not None:
        st.metrics.inc("speculative_draft_tokens_total", counts[0], model=served.id)
        st.metrics.inc("speculative_accepted_tokens_total", counts[1], model=served.id)


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

    def __init__(self, body: AsyncIterator[bytes], cleanup, media_type: str = "text/event-stream"):
        super().__init__(body, media_type=media_type, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.cleanup()


def streaming(st: State, chunks: AsyncIterator[bytes], served: Served, choices: list[runs.Choice],
              entry: logs.Entry, media_type: str = "text/event-stream",
              error_event: Callable[[APIError], bytes] | None = None) -> _Stream:
    """The response of a stream: `chunks` as they come; an error after the status line went out
    becomes the protocol's last event (`error_event`; OpenAI's by default)."""
    state = {"finished": False, "cleaned": False}
    error_event = error_event or (lambda a: sse(openai_error(a)))

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield chunk
            state["finished"] = True
        except Exception as e:  # noqa: BLE001 - after the status line, errors go out as an event
            state["finished"] = True
            a = as_api_error(e)
            entry.error = a.message  # logged with the stream's status, 200: the error came as an event
            yield error_event(a)
        finally:
            cleanup()

    def cleanup() -> None:
        if state["cleaned"]:
            return
        state["cleaned"] = True
        if not state["finished"]:
            st.metrics.inc("sequences_cancelled_total", len(choices))
        runs.cancel(choices)
        count_speculation(st, served, choices)
        st.pool.release(served)

    return _Stream(body(), cleanup, media_type)


def sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def cached_tokens(choices: list[runs.Choice]) -> int:
    """Prompt tokens the engine took from its prefix cache instead of computing them."""
    return sum(c.request.cached for c in choices if c.request is not None)


def speculation_of(choices: list[runs.Choice]) -> tuple[int, int] | None:
    """(tokens guessed, guesses kept) over the choices of a request that speculated; None for one that did not."""
    if not any(c.speculative for c in choices):
        return None
    counts = [c.speculation() for c in choices]
    return sum(d for d, _ in counts), sum(a for _, a in counts)


def prediction_details(choices: list[runs.Choice]) -> dict[str, int] | None:
    """The guesses of a speculating request under OpenAI's names for predicted outputs' tokens:
    kept guesses are accepted, the others rejected (computed, not in the answer)."""
    counts = speculation_of(choices)
    if counts is None:
        return None
    drafted, accepted = counts
    return {"accepted_prediction_tokens": accepted, "rejected_prediction_tokens": drafted - accepted}


def usage_of(choices: list[runs.Choice], prompt_tokens: int, n: int = 1) -> dict[str, Any]:
    """OpenAI's usage: each prompt counted once for its n choices (which follow each other), its
    cached tokens those of its first choice."""
    out = sum(len(c.tokens) for c in choices)
    usage: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": out,
                             "total_tokens": prompt_tokens + out,
                             "prompt_tokens_details": {"cached_tokens": cached_tokens(choices[::n])}}
    details = prediction_details(choices)
    if details is not None:  # only where the request speculated
        usage["completion_tokens_details"] = details
    return usage


def as_batch(x: Any) -> list[Any]:
    """An API input that is one item (a string or a token-id list) or a list of them, as a list."""
    return [x] if isinstance(x, str) or (x and isinstance(x[0], int)) else list(x)


async def embed_ids(request: Request, st: State, served: Served, ids: list[list[int]], dimensions: int | None,
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

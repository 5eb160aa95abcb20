"""Ollama's native API on the same server: /api/tags, /api/show, /api/chat, /api/generate,
/api/embed, /api/embeddings, /api/ps, /api/version, /api/create (a preset FROM a store model),
/api/copy, /api/delete and /api/pull. Like the
OpenAI routes, each only translates: an Ollama body becomes the same internal request (an
OpenAI-shaped namespace read by runs.chat_plan and runs.sampling), run by http.generate, and the
engine's events come back as Ollama's newline-delimited JSON. Errors are `{"error": "..."}`.

Ollama's `options` map onto ownlm's sampling (temperature, top_p, top_k, min_p, num_predict, num_ctx,
seed, stop, repeat_penalty, presence_penalty, frequency_penalty; and ownlm's `speculate`, which may
also be given beside `options`, as on the OpenAI routes); the others are ignored as Ollama
ignores unknown ones, and each is named once in the server log; sampling left unset takes
Ollama's defaults (OLLAMA_DEFAULTS) unless the model's preset sets it. A null is a field left out
and an integer option may be a whole float, as Go decodes Ollama's bodies. `keep_alive` sets how
long the model stays loaded after the request (0: unloaded at once, never loaded for that;
negative: forever). `think` splits a thinking model's trace from its answer (runs.ThinkSplitter).
Pulling writes to the store, so /api/pull answers 403 unless the server was started with
--allow-pull; /api/create and /api/copy write presets and names only."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, AsyncIterator, Literal, Optional, Union

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.responses import Response, StreamingResponse

from .. import manage
from ..errors import ChatTemplateError
from ..store.refs import parse_ref
from ..store.store import Store, now_iso
from ..text.chat import CHATML
from . import runs
from .http import (APIError, Events, admit, as_api_error, documented, embed_ids, generate, log_entry, parse_body,
                   state_of,
                   validation_error)
from .pool import ModelPool, Served, model_id
from .schemas import INT64, ResponseFormat, Tool, absent_nulls

router = APIRouter()
log = logging.getLogger("ownlm.server.ollama")


def ollama_error(a: APIError) -> dict[str, Any]:
    return {"error": a.message}


ERRORS = ("/api/", ollama_error)

# fill-in-the-middle tokens (prefix, suffix, middle) of the model families that have them; a
# model whose vocabulary holds one triple can `insert` (generate with `suffix`)
FIM_TOKENS = (("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder
              ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, Granite code
              ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"))  # DeepSeek-Coder

# Ollama's option names for the ones ownlm honours, and the sampling name each sets
OPTION_NAMES = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                "seed": "seed", "stop": "stop", "repeat_penalty": "repetition_penalty",
                "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}
INT_OPTIONS = ("top_k", "num_predict", "num_ctx", "seed")
# Ollama's sampling defaults (api.DefaultOptions), where neither the request nor the model's preset sets one
OLLAMA_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}
# the Ollama release whose API these routes follow (/api/version: clients gate features on it):
# tool calls streamed (0.8), `think` (0.9)
API_VERSION = "0.9.0"
# a preset's parameters as Ollama names them (`show`'s parameters)
PRESET_NAMES = {"max_tokens": "num_predict", "repetition_penalty": "repeat_penalty"}


# --- request bodies -------------------------------------------------------------------------------
# Ollama ignores fields it does not know, so these bodies do too; the values they know are checked.

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    _absent = model_validator(mode="before")(absent_nulls)  # as Go's decoder leaves a null field's default


def _whole(data: Any) -> Any:
    """Options as Ollama reads them: null left out, an integer option given as a whole float
    (4096.0, as JSON libraries write numbers held as floats) taken as that integer."""
    data = absent_nulls(data)
    if isinstance(data, dict):
        for name in INT_OPTIONS:
            v = data.get(name)
            if isinstance(v, float) and v.is_integer() and abs(v) < 2 ** 63:
                data[name] = int(v)
    return data


class Options(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # the others: ignored, named once in the log

    _whole = model_validator(mode="before")(_whole)

    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    num_predict: Optional[int] = None
    num_ctx: Optional[int] = Field(None, ge=1)
    seed: Optional[int] = Field(None, ge=-INT64, lt=INT64)  # choice i samples with seed + i
    stop: Optional[Union[str, list[str]]] = None
    repeat_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    speculate: Optional[str] = Field(None, min_length=1, max_length=500)  # or top-level: see _Generation


KeepAlive = Optional[Union[str, float]]
Format = Optional[Union[str, dict[str, Any]]]


class _Generation(_Body):
    model: str = Field(min_length=1)
    stream: bool = True
    format: Format = None
    options: Optional[Options] = None
    keep_alive: KeepAlive = None
    think: Optional[Union[bool, Literal["high", "medium", "low", "max"]]] = None  # a level: thinking on
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=20)  # alternatives per token, with logprobs
    # ownlm's extension, as on its OpenAI routes: speculative decoding, "ngram" or a draft model's name
    # (here or in options)
    speculate: Optional[str] = Field(None, min_length=1, max_length=500)


class ToolCallFunction(_Body):
    name: str
    arguments: Union[dict[str, Any], str] = Field(default_factory=dict)


class ToolCall(_Body):
    function: ToolCallFunction
    id: Optional[str] = None  # as this server gave it (templates pair calls with their results by id)


class Message(_Body):
    role: str
    content: Optional[str] = ""
    images: Optional[list[Any]] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_name: Optional[str] = None
    tool_call_id: Optional[str] = None
    thinking: Optional[str] = None


class ChatBody(_Generation):
    messages: list[Message] = Field(default_factory=list)
    tools: Optional[list[dict[str, Any]]] = None
    truncate: bool = True  # a conversation longer than the context loses its oldest turns (false: a 400)


class GenerateBody(_Generation):
    prompt: str = ""
    suffix: Optional[str] = None
    system: Optional[str] = None
    template: Optional[str] = None
    context: Optional[list[int]] = None
    raw: bool = False
    images: Optional[list[Any]] = None


class EmbedBody(_Body):
    model: str = Field(min_length=1)
    input: Union[str, list[str]] = Field(default_factory=list)
    truncate: bool = True
    options: Optional[Options] = None
    keep_alive: KeepAlive = None
    dimensions: Optional[int] = Field(None, ge=1)


class EmbeddingsBody(_Body):
    model: str = Field(min_length=1)
    prompt: str = ""
    options: Optional[Options] = None
    keep_alive: KeepAlive = None


class ModelBody(_Body):
    model: str = ""
    name: str = ""  # the older spelling of `model`
    verbose: bool = False

    @property
    def ref(self) -> str:
        if not (self.model or self.name):
            raise APIError(400, "model is required")
        return self.model or self.name


class CopyBody(_Body):
    source: str = Field(min_length=1)
    destination: str = Field(min_length=1)


class CreateBody(_Body):
    model: str = Field(min_length=1)
    from_: Optional[str] = Field(None, alias="from", min_length=1)
    system: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    messages: Optional[list[dict[str, Any]]] = None
    template: Optional[str] = None
    license: Optional[Union[str, list[str]]] = None
    quantize: Optional[str] = None
    files: Optional[dict[str, str]] = None
    adapters: Optional[dict[str, str]] = None
    stream: bool = True


class PullBody(ModelBody):
    stream: bool = True
    insecure: bool = False


# --- helpers ---------------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


# a keep_alive longer than this is forever (as a negative one is): /api/ps's expiry dates stay dates
FOREVER_S = 100 * 365 * 86400.0


def keep_alive_seconds(value: KeepAlive) -> float | None:
    """Ollama's keep_alive in seconds: a number of seconds, or a Go duration ("5m", "1h30m",
    "-1s"); negative: forever (and so -1 for anything beyond FOREVER_S, infinity too); not a
    number: a 400. None: the server's own (--keep-alive)."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        seconds = _duration(value)
    if math.isnan(seconds):
        raise APIError(400, f"keep_alive {value!r} is not a duration (say 5m, 1h, 30s, 0 or -1)")
    return -1.0 if abs(seconds) > FOREVER_S else seconds  # -inf too: a number JSON can hold


def _duration(value: Any) -> float:
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.lstrip("+"))
    parts = _DURATION.findall(body)
    if not body or "".join(n + u for n, u in parts) != body:
        raise APIError(400, f"keep_alive {value!r} is not a duration (say 5m, 1h, 30s, 0 or -1)")
    return sign * sum(float(n) * _UNITS[u] for n, u in parts)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _line(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, ensure_ascii=False) + "\n").encode()


def _note_unknown(request: Request, options: Options | None) -> None:
    """Name, once per server, each option this server ignores."""
    extra = sorted((options.model_extra or {}) if options is not None else {})
    seen: set[str] = getattr(request.app.state, "ollama_ignored_options", None) or set()
    request.app.state.ollama_ignored_options = seen
    new = [k for k in extra if k not in seen]
    if new:
        seen.update(new)
        log.warning("ollama API: ignoring options ownlm does not use: %s", ", ".join(new))


def _parameter_size(n: Any) -> str:
    if not isinstance(n, (int, float)) or not n:
        return ""
    for size, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.1f}{unit}" if n < 10 * size else f"{n / size:.0f}{unit}"
    return str(int(n))


def _details(facts: dict[str, Any], parent: str = "") -> dict[str, Any]:
    family = facts.get("architecture") or ""
    return {"parent_model": parent, "format": facts.get("format") or "", "family": family,
            "families": [family] if family else None, "parameter_size": _parameter_size(facts.get("parameters")),
            "quantization_level": facts.get("quantization") or ""}


def _full_name(mid: str, ref: str) -> str:
    """The name Ollama's clients see: `name:tag` for a store model, else the server's id."""
    r = parse_ref(ref)
    return r.full_name if r.kind == "name" else mid


def fim_tokens(tokenizer: Any) -> tuple[str, str, str] | None:
    """The model's fill-in-the-middle tokens (a `tokenizers.Tokenizer`), if it has them."""
    for triple in FIM_TOKENS:
        if all(tokenizer.token_to_id(t) is not None for t in triple):
            return triple
    return None


# --- the internal request ----------------------------------------------------------------------------

@dataclass
class Internal:
    """What runs.chat_plan and runs.sampling read, under the OpenAI names they use."""

    tools: list[Tool] | None = None
    tool_choice: Any = None
    response_format: ResponseFormat | None = None
    parallel_tool_calls: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None


def _internal(body: _Generation, tools: list[dict[str, Any]] | None = None) -> Internal:
    out = Internal()
    opts = body.options
    if opts is not None:
        for name, ours in OPTION_NAMES.items():
            setattr(out, ours, getattr(opts, name))
    fmt = body.format
    if fmt == "json":
        out.response_format = ResponseFormat(type="json_object")
    elif isinstance(fmt, dict):
        out.response_format = ResponseFormat.model_validate(
            {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}})
    elif fmt not in (None, ""):
        raise APIError(400, f"format must be \"json\" or a JSON schema (got {fmt!r})")
    if tools:
        try:
            out.tools = [Tool.model_validate(t) for t in tools]
        except ValidationError as e:
            a = validation_error(e)
            raise APIError(400, f"tools: {a.message}") from None
    return out


class _Translator:
    """What /api/chat and /api/generate share: options, limits, durations, the stream's lines."""

    media_type = "application/x-ndjson"

    def __init__(self, request: Request, body: _Generation, internal: Internal):
        _note_unknown(request, body.options)
        self.body, self.internal, self.model, self.stream = body, internal, body.model, body.stream
        self.keep_alive = keep_alive_seconds(body.keep_alive)
        self.logprobs = body.top_logprobs if body.logprobs else None
        self.splitter: runs.ThinkSplitter | None = None  # the answer's thinking apart from its text
        self.started = False  # the prompt ended with the opening tag: the answer begins inside the trace
        self.t0 = time.monotonic()
        self.loaded_at = self.submitted_at = self.t0
        self.prompt_tokens = 0

    def error_event(self, a: APIError) -> bytes:
        return _line(ollama_error(a))

    async def _setup(self, served: Served) -> None:
        self.loaded_at = time.monotonic()
        if self.keep_alive is not None:
            served.keep_alive = self.keep_alive

    def _context(self, served: Served) -> int:
        """The context a request has: the model's, or less with options.num_ctx."""
        opts = self.body.options or Options()
        ctx = served.lm.config.context_length
        return ctx if opts.num_ctx is None else min(ctx, opts.num_ctx)

    async def _job(self, served: Served, prompt: list[int], plan: runs.Plan) -> runs.Job:
        """One choice: the prompt, Ollama's options as sampling, num_predict and num_ctx as limits."""
        opts = self.body.options or Options()
        ctx = self._context(served)
        room = ctx - len(prompt)
        if not prompt:
            raise APIError(400, "the prompt is empty")
        if room <= 0:
            raise APIError(400, f"the prompt has {len(prompt)} tokens but the context is {ctx}"
                                + (" (options.num_ctx)" if ctx == opts.num_ctx else ""))
        n = opts.num_predict
        max_tokens = None if n is None or n == 0 else room if n < 0 else min(n, room)
        for name, value in OLLAMA_DEFAULTS.items():
            if getattr(self.internal, name) is None and name not in served.lm.defaults:
                setattr(self.internal, name, value)
        params = runs.sampling(served, self.internal, max_tokens)
        limit = min(runs.limit_for(served, prompt, params, max_tokens), room)
        self.prompt_tokens = len(prompt)
        if self.body.speculate and opts.speculate and self.body.speculate != opts.speculate:
            raise APIError(400, f"speculate is {self.body.speculate!r} but options.speculate is {opts.speculate!r}: "
                                "give one", param="speculate")
        speculate, draft = await runs.speculation(served, self.body.speculate or opts.speculate)
        self.submitted_at = time.monotonic()
        return runs.Job([prompt], [params], [limit], grammar=plan.grammar, speculate=speculate, draft=draft,
                        logprobs=self.logprobs)

    def _think(self, served: Served, plan: runs.Plan) -> bool | None:
        """The template's enable_thinking for this request (None: the model does not think).
        Ollama's `think` defaults to on for a thinking model; here it stays off under tools or a
        format, whose grammar holds the answer from its first token."""
        asked = self.body.think
        if not runs.thinks(served.lm.template.source):
            if asked:
                raise APIError(400, f"{self.model!r} does not support thinking")
            return None
        if plan.grammar is not None:
            if asked:
                raise APIError(400, "think cannot be combined with tools or format here: their grammar holds the "
                                    "answer from its first token (send think: false)")
            return False
        return asked is None or bool(asked)

    def _thinking_of(self, served: Served, text: str, think: bool | None) -> None:
        """Ready to split answers into thinking and text when thinking is on (`text`: the prompt)."""
        if think:
            self.started = text.rstrip().endswith(runs.THINK_TAGS[0])
            self.splitter = runs.ThinkSplitter(self.started)

    def _split(self, piece: str) -> tuple[str, str]:
        return self.splitter.feed(piece) if self.splitter is not None else ("", piece)

    def _logprobs(self, served: Served, lps: list) -> dict[str, Any]:
        """{"logprobs": [...]} for these tokens when the request asked for them, else {}."""
        if self.logprobs is None or not lps:
            return {}
        return {"logprobs": [runs.token_logprob(served, x) for x in lps]}

    def _stats(self, c: runs.Choice) -> dict[str, Any]:
        now = time.monotonic()
        first = c.first_token_at or now

        def ns(seconds: float) -> int:
            return max(1, int(seconds * 1e9))

        return {"done_reason": c.finish or "stop", "total_duration": ns(now - self.t0),
                "load_duration": ns(self.loaded_at - self.t0), "prompt_eval_count": len(c.prompt),
                "prompt_eval_duration": ns(first - self.submitted_at), "eval_count": len(c.tokens),
                "eval_duration": ns(now - first)}

    def _head(self) -> dict[str, Any]:
        return {"model": self.model, "created_at": _now()}


def _tool_calls(text: str) -> list[dict[str, Any]]:
    """The answer's tool calls as Ollama writes them: an id, and the call's index among them."""
    out = []
    for i, call in enumerate(runs.parse_tool_calls(text)):
        f = call["function"]
        out.append({"id": call["id"], "function": {"index": i, "name": f["name"],
                                                   "arguments": json.loads(f["arguments"])}})
    return out


class Chat(_Translator):
    """/api/chat: messages in, an assistant message (text or tool calls) out."""

    def __init__(self, request: Request, body: ChatBody):
        super().__init__(request, body, _internal(body, body.tools))
        self.messages = [_message(m, i) for i, m in enumerate(body.messages)]
        self.tool_mode = "none"

    async def job(self, served: Served) -> runs.Job:
        await self._setup(served)
        plan = runs.chat_plan(served, self.internal)
        if plan.grammar:  # built once per model (~0.3 s): off the event loop
            await asyncio.to_thread(served.grammar_tokenizer)
        think = self._think(served, plan)
        text, prompt = await asyncio.to_thread(self._fitted, served, plan, think)
        self._thinking_of(served, text, think)
        self.tool_mode = plan.tool_mode
        return await self._job(served, prompt, plan)

    def _fitted(self, served: Served, plan: runs.Plan, think: bool | None) -> tuple[str, list[int]]:
        """The prompt (text, ids) of the conversation, or where it does not fit the context (and
        truncate is not false) of its longest ending that does, as Ollama cuts it: the oldest turns
        dropped, system messages and the last message always kept."""
        def render(first: int) -> tuple[str, list[int]]:
            msgs = [m for i, m in enumerate(self.messages) if i >= first or m["role"] == "system"]
            text = runs.render_chat(served, msgs, plan.tools, think)
            return text, served.lm.encode(text)

        def fits(first: int) -> bool:
            try:
                return len(render(first)[1]) < ctx
            except ChatTemplateError:  # a start the template refuses (a tool result without its call)
                return False

        ctx = self._context(served)
        whole = render(0)
        if len(whole[1]) < ctx or not self.body.truncate or len(self.messages) < 2:
            return whole
        # the conversation may start again at a user turn (templates that want turns to alternate,
        # or a user query, refuse others); the last message is kept whatever it is
        last = len(self.messages) - 1
        cuts = [i for i in range(1, last) if self.messages[i]["role"] == "user"] + [last]
        lo, hi = 0, len(cuts) - 1  # the first cut that fits (the last always "fits": _job says if not)
        while lo < hi:  # the prompt only shrinks as messages are dropped
            mid = (lo + hi) // 2
            if fits(cuts[mid]):
                hi = mid
            else:
                lo = mid + 1
        dropped = sum(m["role"] != "system" for m in self.messages[:cuts[lo]])
        log.info("ollama API: dropped the %d oldest messages to fit the context of %d tokens", dropped, ctx)
        return render(cuts[lo])

    def _calls_tools(self, text: str) -> bool:
        return self.tool_mode != "none" and text.lstrip().startswith("<")

    async def chunks(self, served: Served, choices: list[runs.Choice], events: Events) -> AsyncIterator[bytes]:
        sent, pending = 0, []  # pending: token logprobs not yet sent (each goes with the next line)

        def line(thinking: str, content: str) -> bytes:
            message = {"role": "assistant", "content": content, **({"thinking": thinking} if thinking else {})}
            return _line({**self._head(), "message": message, "done": False, **self._logprobs(served, pending)})

        async for c, piece, lps in events:
            pending += lps
            if self._calls_tools(c.text.text):  # each call goes out whole, once its closing tag has come
                calls = _tool_calls(c.text.text)
                for call in calls[sent:]:
                    yield _line({**self._head(), "message": {"role": "assistant", "content": "",
                                                             "tool_calls": [call]}, "done": False,
                                 **self._logprobs(served, pending)})
                    pending = []
                sent = len(calls)
            elif piece:
                thinking, content = self._split(piece)
                if thinking or content:
                    yield line(thinking, content)
                    pending = []
        c = choices[0]
        thinking, content = self.splitter.finish() if self.splitter is not None else ("", "")
        if thinking or content:
            yield line(thinking, content)
            pending = []
        yield _line({**self._head(), "message": {"role": "assistant", "content": ""}, "done": True,
                     **self._logprobs(served, pending), **self._stats(c)})

    def result(self, served: Served, choices: list[runs.Choice]) -> dict[str, Any]:
        c = choices[0]
        text, _ = runs.split_tool_calls(self.tool_mode, c.text.text)  # calls cut short: neither
        thinking, text = runs.split_thinking(text, self.started) if self.splitter and text else ("", text)
        message: dict[str, Any] = {"role": "assistant", "content": text or "",
                                   **({"thinking": thinking} if thinking else {})}
        calls = _tool_calls(c.text.text) if text is None else []
        if calls:
            message["tool_calls"] = calls
        return {**self._head(), "message": message, "done": True, **self._logprobs(served, c.logprobs),
                **self._stats(c)}


def _message(m: Message, i: int) -> dict[str, Any]:
    """An Ollama message as the chat template (and runs.render_chat) takes it."""
    if m.images:
        raise APIError(400, f"messages[{i}] has images: ownlm's models take text only")
    out: dict[str, Any] = {"role": m.role, "content": m.content or ""}
    if m.tool_calls:
        out["tool_calls"] = [{**({"id": t.id} if t.id else {}), "type": "function",
                              "function": {"name": t.function.name, "arguments": t.function.arguments}}
                             for t in m.tool_calls]
    if m.tool_name:
        out["name"] = out["tool_name"] = m.tool_name
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.thinking:  # an earlier answer's trace, under the name chat templates read (Qwen 3's)
        out["reasoning_content"] = m.thinking
    return out


class Generate(_Translator):
    """/api/generate: a prompt in (through the chat template unless raw; fill-in-the-middle with
    a suffix), text out."""

    def __init__(self, request: Request, body: GenerateBody):
        if body.template:
            raise APIError(400, "template is not supported: ownlm renders prompts with the model's own chat "
                                "template (send raw: true with a prompt you formatted yourself)")
        if body.images:
            raise APIError(400, "images are not supported: ownlm's models take text only")
        super().__init__(request, body, _internal(body))
        self.gbody = body

    async def job(self, served: Served) -> runs.Job:
        await self._setup(served)
        body = self.gbody
        plan = runs.chat_plan(served, self.internal)
        if plan.grammar:
            await asyncio.to_thread(served.grammar_tokenizer)
        if body.think and (body.suffix or body.raw):
            raise APIError(400, "think cannot be combined with raw or suffix: they bypass the chat template")
        if body.suffix:
            fim = fim_tokens(served.lm.tokenizer.tk)
            if fim is None:
                raise APIError(400, f"{self.model!r} does not support insert")
            text = f"{fim[0]}{body.prompt}{fim[1]}{body.suffix}{fim[2]}"
        elif body.raw:
            text = body.prompt
        else:
            msgs = ([{"role": "system", "content": body.system}] if body.system else []) + [
                {"role": "user", "content": body.prompt}]
            think = self._think(served, plan)
            text = await asyncio.to_thread(runs.render_chat, served, msgs, None, think)
            self._thinking_of(served, text, think)
        prompt = await runs.encode(served, text)
        if body.context:
            tok = served.lm.tokenizer
            if tok.add_bos and prompt and prompt[0] == tok.bos_id:  # the sequence began with the context's
                prompt = prompt[1:]
            prompt = runs.token_ids(served, body.context, "context") + prompt
        return await self._job(served, prompt, plan)

    async def chunks(self, served: Served, choices: list[runs.Choice], events: Events) -> AsyncIterator[bytes]:
        pending: list = []

        def line(thinking: str, response: str) -> bytes:
            return _line({**self._head(), "response": response, **({"thinking": thinking} if thinking else {}),
                          "done": False, **self._logprobs(served, pending)})

        async for _, piece, lps in events:
            pending += lps
            if piece:
                thinking, response = self._split(piece)
                if thinking or response:
                    yield line(thinking, response)
                    pending = []
        thinking, response = self.splitter.finish() if self.splitter is not None else ("", "")
        if thinking or response:
            yield line(thinking, response)
            pending = []
        c = choices[0]
        yield _line({**self._head(), "response": "", "done": True, "context": c.prompt + c.tokens,
                     **self._logprobs(served, pending), **self._stats(c)})

    def result(self, served: Served, choices: list[runs.Choice]) -> dict[str, Any]:
        c = choices[0]
        thinking, text = runs.split_thinking(c.text.text, self.started) if self.splitter else ("", c.text.text)
        return {**self._head(), "response": text, **({"thinking": thinking} if thinking else {}), "done": True,
                "context": c.prompt + c.tokens, **self._logprobs(served, c.logprobs), **self._stats(c)}


async def _load_only(request: Request, body: _Generation, chat: bool) -> dict[str, Any]:
    """A request with nothing to generate: load the model; keep_alive 0 (`ollama stop`): unload it
    if it is loaded and idle, never load it for that."""
    pool = state_of(request).pool
    keep = keep_alive_seconds(body.keep_alive)
    if keep == 0:
        mid, _ = pool.ref_for(body.model)  # a model this server does not offer is a 404
        served = pool.loaded.get(mid)
        if served is not None and served.active == 0:
            pool.unload(served.id)
        elif served is not None:  # busy: unloaded once its requests end
            served.keep_alive = 0
        reason = "unload"
    else:
        served = await pool.acquire(body.model)
        pool.release(served)
        if keep is not None:
            served.keep_alive = keep
        reason = "load"
    out: dict[str, Any] = {"model": body.model, "created_at": _now(), "done": True, "done_reason": reason}
    out.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
    return out


@router.post("/api/chat", openapi_extra=documented(ChatBody))
async def chat(request: Request) -> Any:
    body = await parse_body(request, ChatBody)
    if not body.messages:
        return await _load_only(request, body, chat=True)
    return await generate(request, Chat(request, body))


@router.post("/api/generate", openapi_extra=documented(GenerateBody))
async def generate_route(request: Request) -> Any:
    body = await parse_body(request, GenerateBody)
    if not body.prompt and not body.suffix:
        return await _load_only(request, body, chat=False)
    return await generate(request, Generate(request, body))


# --- embeddings ----------------------------------------------------------------------------------------

async def _vectors(request: Request, model: str, texts: list[str], truncate: bool, dimensions: int | None,
                   options: Options | None, keep_alive: KeepAlive) -> tuple[list[list[float]], int, int, int]:
    """(vectors, tokens, load ns, total ns) for texts, on the model's embedding thread."""
    _note_unknown(request, options)
    keep = keep_alive_seconds(keep_alive)
    st = state_of(request)
    t0 = time.monotonic()
    served = await st.pool.acquire(model)
    loaded = time.monotonic()
    try:
        if keep is not None:
            served.keep_alive = keep
        ctx = served.lm.config.context_length
        ids = []
        for i, text in enumerate(texts):
            t = await runs.encode(served, text)
            if not t:
                raise APIError(400, f"input[{i}] is no tokens")
            if len(t) > ctx:
                if not truncate:
                    raise APIError(400, f"input[{i}] has {len(t)} tokens: the input length exceeds the context "
                                        f"length ({ctx})")
                t = t[:ctx]
            ids.append(t)
        if dimensions is not None and dimensions > served.lm.config.dim:
            raise APIError(400, f"dimensions must be at most {served.lm.config.dim}")
        vectors: list[list[float]] = []
        if ids:
            admit(served, 1)
            vectors = await embed_ids(request, st, served, ids, dimensions, loaded + st.config.request_timeout)
    finally:
        st.pool.release(served)
    n = sum(len(t) for t in ids)
    st.metrics.inc("prompt_tokens_total", n)
    log_entry(request).usage = lambda: {"prompt_tokens": n, "completion_tokens": 0}
    return vectors, n, max(1, int((loaded - t0) * 1e9)), max(1, int((time.monotonic() - t0) * 1e9))


@router.post("/api/embed", openapi_extra=documented(EmbedBody))
async def embed(request: Request) -> dict[str, Any]:
    body = await parse_body(request, EmbedBody)
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    vectors, n, load, total = await _vectors(request, body.model, texts, body.truncate, body.dimensions,
                                             body.options, body.keep_alive)
    return {"model": body.model, "embeddings": vectors, "total_duration": total, "load_duration": load,
            "prompt_eval_count": n}


@router.post("/api/embeddings", openapi_extra=documented(EmbeddingsBody))
async def embeddings(request: Request) -> dict[str, Any]:
    body = await parse_body(request, EmbeddingsBody)
    vectors, *_ = await _vectors(request, body.model, [body.prompt] if body.prompt else [], True, None,
                                 body.options, body.keep_alive)
    return {"embedding": vectors[0] if vectors else []}


# --- models --------------------------------------------------------------------------------------------

def _offered(pool: ModelPool) -> list[tuple[str, str, dict[str, Any] | None]]:
    """(full name, reference, store row or None) of each model the server offers."""
    rows = {r["name"]: r for r in manage.list_models() if "error" not in r}
    out = []
    for mid, ref in sorted(pool.available().items()):
        full = _full_name(mid, ref)
        out.append((full, ref, rows.get(full)))
    return out


def _row_facts(row: dict[str, Any] | None) -> dict[str, Any]:
    row = row or {}
    return {"format": row.get("format"), "architecture": row.get("architecture"),
            "parameters": row.get("parameters"), "quantization": row.get("quantization")}


@router.get("/api/tags")
@router.head("/api/tags", include_in_schema=False)
async def tags(request: Request) -> dict[str, Any]:
    offered = await asyncio.to_thread(_offered, state_of(request).pool)
    models = []
    for full, _, row in offered:
        row = row or {}
        models.append({"name": full, "model": full, "modified_at": row.get("created") or _epoch(),
                       "size": row.get("size") or 0, "digest": row.get("digest") or "",
                       "details": _details(_row_facts(row), row.get("base") or "")})
    return {"models": models}


def _epoch() -> str:
    return "1970-01-01T00:00:00Z"


def _memory_bytes(served: Served) -> int:
    try:
        model = served.lm.model
        return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    except Exception:  # noqa: BLE001 - a size is informative only
        return int(served.lm.manifest.get("size") or 0)


@router.get("/api/ps")
async def ps(request: Request) -> dict[str, Any]:
    pool = state_of(request).pool
    available = await asyncio.to_thread(pool.available)
    now, wall = time.monotonic(), datetime.now().astimezone()
    models = []
    for mid, served in sorted(pool.loaded.items()):
        full = _full_name(mid, available.get(mid, mid))
        keep = pool.keep_alive if served.keep_alive is None else served.keep_alive
        if keep < 0:
            expires = wall + timedelta(days=365 * 100)
        else:
            left = keep if served.active else max(0.0, keep - (now - served.last_used))
            expires = wall + timedelta(seconds=left)
        size = _memory_bytes(served)
        on_gpu = str(next(served.lm.model.parameters()).device).startswith("cuda")
        models.append({"name": full, "model": full, "size": size, "digest": served.lm.manifest.get("digest") or "",
                       "details": _details(served.lm.facts), "expires_at": expires.isoformat(),
                       "size_vram": size if on_gpu else 0, "context_length": served.lm.config.context_length})
    return {"models": models}


@router.get("/api/version")
@router.head("/api/version", include_in_schema=False)  # as Ollama registers it
async def version() -> dict[str, Any]:
    """The Ollama API level served (clients compare it to the release that brought a feature),
    and ownlm's own version beside it."""
    try:
        ours = importlib.metadata.version("ownlm")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        ours = "0.0.0"
    return {"version": API_VERSION, "ownlm": ours}


def _show(pool: ModelPool, name: str) -> dict[str, Any]:
    from ..formats.checkpoint import open_checkpoint

    mid, ref = pool.ref_for(name)  # the names this server offers, and only those
    info = manage.show(ref)
    preset = info if info.get("kind") == "preset" else None
    model = info["model"] if preset else info
    if model.get("kind") != "model":
        raise APIError(400, f"{name!r} is {'an adapter' if model.get('kind') == 'adapter' else 'not a model'}: "
                            "load it as BASE+ADAPTER or make a preset of it (ownlm create)")
    served = pool.loaded.get(mid)
    if served is not None:
        tk, template = served.lm.tokenizer.tk, served.lm.template.source
    else:
        _, files = manage.resolve_weights(ref)
        tk = open_checkpoint(files).tokenizer.tokenizer
        template = model.get("chat_template") or CHATML
    # not "embedding": Ollama lists it for embedding-only models, and its CLI then refuses to chat
    caps = ["completion"]
    if "tools" in template:  # as runs.render_chat decides
        caps.append("tools")
    if fim_tokens(tk):
        caps.append("insert")
    if runs.thinks(template):
        caps.append("thinking")
    params = {PRESET_NAMES.get(k, k): v for k, v in ((preset or {}).get("parameters") or {}).items()}
    lines = []
    for k, v in params.items():
        for x in v if isinstance(v, list) else [v]:
            lines.append(f"{k:<30} {json.dumps(x) if isinstance(x, str) else x}")
    if model.get("eos_token") and "stop" not in params:
        lines.append(f"{'stop':<30} {json.dumps(model['eos_token'])}")
    system = (preset or {}).get("system")
    full = _full_name(mid, ref)
    base = ((preset or {}).get("base") or {}).get("name") or ""
    modelfile = [f"# Modelfile generated by ownlm for {full}", f"FROM {base or full}",
                 f'TEMPLATE """{template}"""'] + [f"PARAMETER {ln}" for ln in lines]
    if system:
        modelfile.append(f'SYSTEM """{system}"""')
    arch = model.get("architecture") or ""
    cfg = model.get("config") or {}
    # GGUF's key names, as Ollama's model_info lists them (clients read the name, the heads, the sizes)
    model_info = {"general.architecture": arch, "general.basename": full.split(":")[0].split("/")[-1],
                  "general.parameter_count": model.get("parameters"),
                  f"{arch}.context_length": model.get("context_length"),
                  f"{arch}.embedding_length": cfg.get("dim"), f"{arch}.block_count": cfg.get("n_layers"),
                  f"{arch}.feed_forward_length": cfg.get("ffn_dim"),
                  f"{arch}.attention.head_count": cfg.get("n_heads"),
                  f"{arch}.attention.head_count_kv": cfg.get("n_kv_heads"),
                  f"{arch}.attention.key_length": cfg.get("head_dim"),
                  f"{arch}.attention.value_length": cfg.get("head_dim"),
                  f"{arch}.attention.layer_norm_rms_epsilon": cfg.get("norm_eps"),
                  f"{arch}.rope.freq_base": cfg.get("rope_theta"), f"{arch}.vocab_size": model.get("vocab_size")}
    model_info = {k: v for k, v in model_info.items() if v is not None}
    out = {"license": model.get("license") or "", "modelfile": "\n".join(modelfile) + "\n",
           "parameters": "\n".join(lines), "template": template,
           "details": _details(model, base),
           "model_info": model_info, "capabilities": caps,
           "modified_at": (preset or info).get("created") or _store_created(full) or _epoch()}
    if system:
        out["system"] = system
    if preset and preset.get("messages"):
        out["messages"] = preset["messages"]
    return out


def _store_created(full: str) -> str | None:
    store = Store()
    try:
        return store.read(full).get("created") if store.has(full) else None
    except Exception:  # noqa: BLE001 - a date is informative only
        return None


@router.post("/api/show", openapi_extra=documented(ModelBody))
async def show(request: Request) -> dict[str, Any]:
    body = await parse_body(request, ModelBody)
    return await asyncio.to_thread(_show, state_of(request).pool, body.ref)


def _store_name(name: str, what: str) -> str:
    ref = parse_ref(name)
    if ref.kind != "name":
        raise APIError(400, f"{what} {name!r} is not a store name (name[:tag])")
    return ref.full_name


def _copy(source: str, destination: str) -> None:
    src, dst = _store_name(source, "source"), _store_name(destination, "destination")
    store = Store()
    if not store.has(src):
        raise APIError(404, f"model {source!r} not found")
    if src == dst:
        return
    manifest = store.read(src)
    name, tag = dst.rsplit(":", 1)
    with store.lock(f"model:{dst}"):  # the blobs are shared: the copy is one more manifest naming them
        store.write(dst, {**manifest, "name": name, "tag": tag, "created": now_iso()})


# Ollama's parameter names -> a preset's (PRESET_NAMES the other way); presets keep no others
CREATE_NAMES = {PRESET_NAMES.get(k, k): k for k in manage.PRESET_PARAMETERS}


def _create(body: CreateBody) -> list[str]:
    """`ollama create` of a model FROM one in the store: a preset (its system prompt, parameters,
    messages). The statuses to report, the parameters a preset does not keep named among them."""
    if body.files or body.adapters or not body.from_:
        raise APIError(400, "ownlm creates a model from one in its store (FROM name); import files with "
                            "`ownlm pull` (a GGUF file or a Hugging Face folder), adapters with `ownlm tune`")
    if body.quantize:
        raise APIError(400, "quantize is not supported here: `ownlm pull` keeps a GGUF's own quantization")
    if body.template:
        raise APIError(400, "template is not supported: ownlm renders prompts with the model's own chat template")
    name = _store_name(body.model, "model")
    base = _store_name(body.from_, "from")
    params: dict[str, Any] = {}
    ignored = []
    for k, v in _whole(dict(body.parameters or {})).items():
        if k in CREATE_NAMES and not (k == "num_predict" and isinstance(v, int) and v <= 0):
            params[CREATE_NAMES[k]] = v
        else:  # (num_predict -1 or -2, "until the context ends": a preset without max_tokens does that too)
            ignored.append(k)
    system, messages = body.system, []
    for m in body.messages or []:
        if isinstance(m, dict) and m.get("role") == "system" and system is None:  # MESSAGE system ...
            system = m.get("content")
        else:
            messages.append({"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m)
    manage.create_preset(name, base, system=system, parameters=params, messages=messages or None)
    return ["reading model metadata"] + [f"ignoring parameter {k}: ownlm presets do not keep it" for k in ignored] \
        + ["writing manifest", "success"]


@router.post("/api/create", openapi_extra=documented(CreateBody))
async def create(request: Request) -> Any:
    body = await parse_body(request, CreateBody)
    log_entry(request).model = body.model
    statuses = await asyncio.to_thread(_create, body)
    pool = state_of(request).pool
    served = pool.loaded.get(model_id(_store_name(body.model, "model")))
    if served is not None:  # made again: its next request loads the new settings
        if served.active == 0:
            pool.unload(served.id)
        else:
            served.keep_alive = 0
    if not body.stream:
        return {"status": "success"}

    async def lines() -> AsyncIterator[bytes]:
        for status in statuses:
            yield _line({"status": status})

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.post("/api/copy", openapi_extra=documented(CopyBody))
async def copy(request: Request) -> Response:
    body = await parse_body(request, CopyBody)
    await asyncio.to_thread(_copy, body.source, body.destination)
    return Response(status_code=200)


@router.delete("/api/delete", openapi_extra=documented(ModelBody))
async def delete(request: Request) -> Response:
    body = await parse_body(request, ModelBody)
    full = _store_name(body.ref, "model")
    log_entry(request).model = full
    await asyncio.to_thread(manage.remove_many, [full])
    pool = state_of(request).pool
    served = pool.loaded.get(model_id(full))
    if served is not None and served.active == 0:
        pool.unload(served.id)
    return Response(status_code=200)


@router.post("/api/pull", openapi_extra=documented(PullBody))
async def pull(request: Request) -> Any:
    st = state_of(request)
    body = await parse_body(request, PullBody)
    if not st.config.allow_pull:
        raise APIError(403, "pulling is turned off on this server: nothing writes to its store unless it was "
                            "started with `ownlm serve --allow-pull`")
    ref = body.ref
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def say(msg: str) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, {"status": msg})

    def run() -> dict[str, Any]:
        return manage.pull(ref, say=say)

    task = asyncio.ensure_future(asyncio.to_thread(run))

    def done_line(manifest: dict[str, Any]) -> list[dict[str, Any]]:
        size = int(manifest.get("size") or 0)
        return [{"status": f"pulled {manage.display_name(manifest)}", "digest": f"sha256:{manifest.get('digest')}",
                 "total": size, "completed": size}, {"status": "success"}]

    if not body.stream:
        await task
        return {"status": "success"}

    async def lines() -> AsyncIterator[bytes]:
        yield _line({"status": "pulling manifest"})
        while True:
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield _line(getter.result())
                continue
            getter.cancel()
            while not queue.empty():
                yield _line(queue.get_nowait())
            break
        try:
            manifest = task.result()
        except Exception as e:  # noqa: BLE001 - after the status line, errors go out as a line
            a = as_api_error(e)
            log_entry(request).error = a.message
            yield _line(ollama_error(a))
            return
        for item in done_line(manifest):
            yield _line(item)

    return StreamingResponse(lines(), media_type="application/x-ndjson")


__all__ = ["router", "ERRORS", "keep_alive_seconds", "fim_tokens"]

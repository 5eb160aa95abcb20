"""Anthropic's Messages API: POST /v1/messages (streamed or not) and /v1/messages/count_tokens.

A translator only: the Anthropic body becomes the internal chat request (schemas.ChatRequest) —
`system` a system message, text blocks the turns' text, `tool_use` blocks an assistant's
tool_calls, `tool_result` blocks "tool" messages, tools' input_schema the functions' parameters,
tool_choice auto/any/tool/none → auto/required/named/none, output_config.format a
response_format, consecutive turns of one role combined (as Anthropic combines them), a system
turn a system message where it stands — and runs through the same plan,
prompt, sampler and tool parser as /v1/chat/completions. The engine's events come back as
Anthropic's content blocks and server-sent events (message_start, ping, content_block_start,
content_block_delta (text_delta, input_json_delta), content_block_stop, message_delta,
message_stop; `event: error` for an error after the stream began). Errors have Anthropic's shape
on every route under /v1/messages (ERRORS)."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any, AsyncIterator, Literal, Optional, Union

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..engine import constraints
from . import runs
from .http import APIError, Events, documented, generate, log_entry, parse_body, state_of, validation_error
from .pool import Served
from .schemas import INT64, ChatRequest, absent_nulls

router = APIRouter()


# --- request bodies -------------------------------------------------------------------------------

class _Body(BaseModel):
    # as for OpenAI's bodies: unknown fields are a 400 (nothing silently ignored), no type conversion;
    # a null is the field left out (as `block.model_dump()` round trips send citations: null)
    model_config = ConfigDict(extra="forbid", strict=True)

    _nulls = model_validator(mode="before")(absent_nulls)


class CacheControl(_Body):
    """A prompt-caching hint: accepted (clients send it), with no effect on the output; the
    engine's prefix cache works without it."""

    type: Literal["ephemeral"]
    ttl: Optional[Literal["5m", "1h"]] = None


class TextBlock(_Body):
    type: Literal["text"]
    text: str
    cache_control: Optional[CacheControl] = None


class ToolUseBlock(_Body):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: Optional[CacheControl] = None


class ToolResultBlock(_Body):
    type: Literal["tool_result"]
    tool_use_id: str
    content: Optional[Union[str, list[TextBlock]]] = None
    is_error: Optional[bool] = None
    cache_control: Optional[CacheControl] = None


Block = Annotated[Union[TextBlock, ToolUseBlock, ToolResultBlock], Field(discriminator="type")]


class MessageParam(_Body):
    role: Literal["user", "assistant", "system"]
    content: Union[str, list[Block]]


class ToolDef(_Body):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: Optional[str] = None
    input_schema: dict[str, Any]
    type: Optional[Literal["custom"]] = None
    cache_control: Optional[CacheControl] = None
    strict: Optional[bool] = None  # the input always follows input_schema here (a grammar holds it to it)


class ToolChoiceAuto(_Body):
    type: Literal["auto"]
    disable_parallel_tool_use: Optional[bool] = None


class ToolChoiceAny(_Body):
    type: Literal["any"]
    disable_parallel_tool_use: Optional[bool] = None


class ToolChoiceTool(_Body):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: Optional[bool] = None


class ToolChoiceNone(_Body):
    type: Literal["none"]


ToolChoice = Annotated[Union[ToolChoiceAuto, ToolChoiceAny, ToolChoiceTool, ToolChoiceNone],
                       Field(discriminator="type")]


class Metadata(_Body):
    user_id: Optional[str] = None


class ThinkingDisabled(_Body):
    type: Literal["disabled"]  # the models served here do not think in a separate block


class JsonOutputFormat(_Body):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Body):
    format: Optional[JsonOutputFormat] = None  # structured output (`messages.parse`): the answer follows it


class CountTokensRequest(_Body):
    model: str
    messages: list[MessageParam] = Field(min_length=1)
    system: Optional[Union[str, list[TextBlock]]] = None
    tools: Optional[list[ToolDef]] = None
    tool_choice: Optional[ToolChoice] = None
    output_config: Optional[OutputConfig] = None
    thinking: Optional[ThinkingDisabled] = None
    cache_control: Optional[CacheControl] = None  # as on blocks: the prefix cache needs no marker


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: Optional[list[Annotated[str, Field(min_length=1)]]] = None
    stream: bool = False
    temperature: Optional[float] = Field(None, ge=0, le=1)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    metadata: Optional[Metadata] = None
    service_tier: Optional[Literal["auto", "standard_only"]] = None  # one tier here
    # extensions, as in ownlm's OpenAI routes: reproducible sampling, speculative decoding ("ngram" or a draft model)
    seed: Optional[int] = Field(None, ge=-INT64, lt=INT64)
    speculate: Optional[str] = Field(None, min_length=1, max_length=500)


# --- errors -----------------------------------------------------------------------------------------

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def error_json(a: APIError) -> dict[str, Any]:
    kind = ERROR_TYPES.get(a.status, "invalid_request_error" if 400 <= a.status < 500 else "api_error")
    if a.code == "timeout":  # out of the request's time, not a busy server
        kind = "timeout_error"
    return {"type": "error", "error": {"type": kind, "message": a.message}}


ERRORS = ("/v1/messages", error_json)


def event(kind: str, data: dict[str, Any]) -> bytes:
    """One server-sent event as Anthropic writes them: its type on the `event:` line and in the data."""
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n".encode()


def error_event(a: APIError) -> bytes:
    body = error_json(a)
    return event("error", {"error": body["error"]})


# --- translation into the internal chat request -------------------------------------------------------

def _text(blocks: Union[str, list[TextBlock], None]) -> str:
    if blocks is None:
        return ""
    return blocks if isinstance(blocks, str) else "\n".join(b.text for b in blocks)


def _turns(messages: list[MessageParam]) -> list[MessageParam]:
    """Consecutive user or assistant turns combined into one, as Anthropic's API combines them."""
    out: list[MessageParam] = []
    for m in messages:
        if out and m.role == out[-1].role != "system":
            blocks = [b for x in (out[-1], m) for b in (
                [TextBlock(type="text", text=x.content)] if isinstance(x.content, str) else x.content)]
            out[-1] = MessageParam(role=m.role, content=blocks)
        else:
            out.append(m)
    return out


def chat_messages(body: CountTokensRequest) -> tuple[list[dict[str, Any]], str | None]:
    """The conversation as OpenAI-shaped chat messages, and the text of a final assistant turn
    (a prefill the answer continues) if the conversation ends with one."""
    out: list[dict[str, Any]] = []
    if body.system is not None:
        out.append({"role": "system", "content": _text(body.system)})
    prefill = None
    turns = _turns(body.messages)
    for i, m in enumerate(turns):
        if m.role == "system":
            if not isinstance(m.content, str) and not all(isinstance(b, TextBlock) for b in m.content):
                raise APIError(400, f"messages.{i}: a system turn holds text only", param="messages")
            out.append({"role": "system", "content": _text(m.content)})
            continue
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        if m.role == "assistant":
            text = [b.text for b in m.content if isinstance(b, TextBlock)]
            calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(
                b.input, ensure_ascii=False)}} for b in m.content if isinstance(b, ToolUseBlock)]
            if any(isinstance(b, ToolResultBlock) for b in m.content):
                raise APIError(400, f"messages.{i}: tool_result blocks belong in a user turn", param="messages")
            out.append({"role": "assistant", "content": "".join(text), **({"tool_calls": calls} if calls else {})})
            continue
        texts: list[str] = []
        for b in m.content:
            if isinstance(b, ToolUseBlock):
                raise APIError(400, f"messages.{i}: tool_use blocks belong in an assistant turn", param="messages")
            if isinstance(b, TextBlock):
                texts.append(b.text)
                continue
            if texts:
                out.append({"role": "user", "content": "\n".join(texts)})
                texts = []
            result = _text(b.content)
            out.append({"role": "tool", "tool_call_id": b.tool_use_id,
                        "content": f"Error: {result}" if b.is_error else result})
        if texts:
            out.append({"role": "user", "content": "\n".join(texts)})
    last = turns[-1]
    if last.role == "assistant":
        if out[-1].get("tool_calls"):
            raise APIError(400, "the last message may be an assistant turn (a prefill) only with text in it",
                           param="messages")
        prefill = out.pop()["content"]
    return out, prefill


def chat_request(body: CountTokensRequest, messages: list[dict[str, Any]]) -> ChatRequest:
    """The internal request: the same fields /v1/chat/completions reads."""
    fields: dict[str, Any] = {"model": body.model, "messages": messages or [{"role": "user", "content": ""}]}
    if body.tools:
        fields["tools"] = [{"type": "function", "function": {
            "name": t.name, "parameters": t.input_schema, **({"description": t.description} if t.description else {})}}
            for t in body.tools]
    choice = body.tool_choice
    if choice is not None:
        if isinstance(choice, ToolChoiceTool):
            fields["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            fields["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
        if getattr(choice, "disable_parallel_tool_use", None):
            fields["parallel_tool_calls"] = False
    if isinstance(body, MessagesRequest):
        fields.update(max_tokens=body.max_tokens, stream=body.stream)
        for name in ("temperature", "top_p", "top_k", "seed", "speculate"):
            if getattr(body, name) is not None:
                fields[name] = getattr(body, name)
        if body.stop_sequences:
            fields["stop"] = body.stop_sequences
    fmt = body.output_config.format if body.output_config is not None else None
    if fmt is not None:
        fields["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt.schema_}}
    try:
        return ChatRequest.model_validate(fields)
    except ValidationError as e:
        raise validation_error(e) from None


async def prompt_of(served: Served, body: CountTokensRequest) -> tuple[list[int], ChatRequest, runs.Plan, bool]:
    """(prompt ids, the internal request, its plan, whether it ends in a prefill)."""
    messages, prefill = chat_messages(body)
    chat = chat_request(body, messages)
    plan = runs.chat_plan(served, chat)
    if prefill is not None and plan.grammar:
        raise APIError(400, "a final assistant turn (a prefill) cannot be combined with tools (unless tool_choice "
                            "is none) or an output format", param="messages")
    if not messages:
        raise APIError(400, "messages must hold more than a final assistant turn", param="messages")
    return await runs.render_ids(served, messages, plan.tools, prefill or ""), chat, plan, prefill is not None


# --- the translator -------------------------------------------------------------------------------------

def _tool_id(call_id: str) -> str:
    return "toolu_" + call_id.rsplit("-", 1)[-1]


def _tool_use(call: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": _tool_id(call["id"]), "name": call["function"]["name"],
            "input": json.loads(call["function"]["arguments"])}


def stop_sequence(served: Served, c: runs.Choice, stops: list[str]) -> str | None:
    """Which stop sequence ended the choice: the one that starts where its text was cut (the
    first given, as the engine's cut is at the earliest match, the first stop on a tie)."""
    if not c.text.stopped:
        return None
    full, cut = served.lm.tokenizer.decode(c.tokens), len(c.text.text)
    return next((s for s in stops if full.startswith(s, cut)), None) or next((s for s in stops if s in full), None)


class Messages:
    """/v1/messages: the Anthropic body in, an assistant message (text or tool_use blocks) out."""

    def __init__(self, body: MessagesRequest):
        self.body, self.model, self.stream = body, body.model, body.stream
        self.id = runs.new_id("msg").replace("-", "_")
        self.tool_mode, self.prompt_tokens = "none", 0
        self.clamped = False  # max_tokens was more than the context had room for
        self.stops: list[str] = []  # the stop strings in force: the request's, else the model's (a preset's)

    async def job(self, served: Served) -> runs.Job:
        prompt, chat, plan, _ = await prompt_of(served, self.body)
        if plan.grammar:  # built once per model (~0.3 s): off the event loop
            await asyncio.to_thread(served.grammar_tokenizer)
        # max_tokens is required and clients send their own model's (32k, 64k): what the context
        # has room for is the limit, and an answer that reaches it ends with
        # model_context_window_exceeded, as Anthropic's does
        room = served.lm.config.context_length - len(prompt)
        wanted = self.body.max_tokens
        max_tokens = min(wanted, room) if room > 0 else wanted  # no room at all: the error says so
        self.clamped = max_tokens < wanted
        params = runs.sampling(served, chat, max_tokens)
        limit = runs.limit_for(served, prompt, params, max_tokens)
        self.tool_mode, self.prompt_tokens, self.stops = plan.tool_mode, len(prompt), list(params.stop)
        speculate, draft = await runs.speculation(served, chat.speculate)
        return runs.Job([prompt], [params], [limit], grammar=plan.grammar, speculate=speculate, draft=draft)

    def _calls_tools(self, text: str) -> bool:
        """Whether the text is tool calls (the tool grammar allows no text before them)."""
        return self.tool_mode != "none" and text.lstrip().startswith(constraints.TOOL_OPEN[0])

    def _stop(self, served: Served, c: runs.Choice, calls: bool) -> tuple[str, str | None]:
        if calls:
            return "tool_use", None
        if c.text.stopped:
            return "stop_sequence", stop_sequence(served, c, self.stops)
        if c.finish == "length":
            return ("model_context_window_exceeded" if self.clamped else "max_tokens"), None
        return "end_turn", None

    def _usage(self, c: runs.Choice) -> dict[str, int]:
        """Anthropic's split: input_tokens are the prompt tokens computed, cache_read_input_tokens
        those taken from the prefix cache (the prompt is their sum)."""
        cached = c.request.cached if c.request is not None else 0
        return {"input_tokens": self.prompt_tokens - cached, "output_tokens": len(c.tokens),
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}

    def _message(self, content: list[dict[str, Any]], stop: tuple[str | None, str | None],
                 usage: dict[str, int]) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": stop[0], "stop_sequence": stop[1], "usage": usage}

    async def chunks(self, served: Served, choices: list[runs.Choice], events: Events) -> AsyncIterator[bytes]:
        c = choices[0]
        start = self._message([], (None, None), {**self._usage(c), "output_tokens": 0})
        yield event("message_start", {"message": start})
        yield event("ping", {})
        index, text_open, calls_sent = 0, False, 0
        async for c, piece, _ in events:
            text = c.text.text
            if self._calls_tools(text):  # each call goes out whole, once its closing tag has come
                calls = runs.parse_tool_calls(text)
                for call in calls[calls_sent:]:
                    block = _tool_use(call)
                    yield event("content_block_start", {"index": index, "content_block": {**block, "input": {}}})
                    yield event("content_block_delta", {"index": index, "delta": {
                        "type": "input_json_delta", "partial_json": call["function"]["arguments"]}})
                    yield event("content_block_stop", {"index": index})
                    index += 1
                calls_sent = len(calls)
            elif piece:
                if not text_open:
                    yield event("content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}})
                    text_open = True
                yield event("content_block_delta", {"index": index, "delta": {"type": "text_delta", "text": piece}})
        if text_open:
            yield event("content_block_stop", {"index": index})
        stop_reason, seq = self._stop(served, c, calls_sent > 0)
        yield event("message_delta", {"delta": {"stop_reason": stop_reason, "stop_sequence": seq},
                                      "usage": self._usage(c)})  # the cache's share is known by now
        yield event("message_stop", {})

    media_type = "text/event-stream"

    @staticmethod
    def error_event(a: APIError) -> bytes:
        return error_event(a)

    def result(self, served: Served, choices: list[runs.Choice]) -> dict[str, Any]:
        c = choices[0]
        text, calls = runs.split_tool_calls(self.tool_mode, c.text.text)  # calls cut short: neither
        content = [_tool_use(x) for x in calls] + ([{"type": "text", "text": text}] if text else [])
        return self._message(content, self._stop(served, c, bool(calls)), self._usage(c))


@router.post("/v1/messages", openapi_extra=documented(MessagesRequest))
async def messages(request: Request) -> Any:
    return await generate(request, Messages(await parse_body(request, MessagesRequest)))


@router.post("/v1/messages/count_tokens", openapi_extra=documented(CountTokensRequest))
async def count_tokens(request: Request) -> dict[str, Any]:
    st = state_of(request)
    body = await parse_body(request, CountTokensRequest)
    served = await st.pool.acquire(body.model)
    try:
        prompt, _, _, _ = await prompt_of(served, body)
    finally:
        st.pool.release(served)
    log_entry(request).usage = lambda: {"prompt_tokens": len(prompt), "completion_tokens": 0}
    return {"input_tokens": len(prompt)}

"""OpenAI's Responses API: POST /v1/responses (and GET/DELETE /v1/responses/{id} for the ones
kept). A translator only: the body becomes a chat-shaped request (instructions as the system
message, input items as messages, function calls as assistant tool calls, their outputs as tool
messages, text.format as response_format) that openai.Chat runs; the engine's events come back
as Responses output items and its typed stream events.

Responses are kept in memory, the last KEEP of them (unless `store: false`), so that
`previous_response_id` can continue a conversation; a restart forgets them."""

from __future__ import annotations

import json
import secrets
import time
from collections import OrderedDict
from typing import Annotated, Any, AsyncIterator, Literal, Optional, Union

from fastapi import APIRouter, Request
from pydantic import Discriminator, Field, Tag, ValidationError

from . import runs
from .http import (APIError, Events, documented, generate, log_entry, parse_body, prediction_details,
                   validation_error)
from .openai import Chat
from .pool import Served
from .schemas import INT64, ChatRequest, _Body

router = APIRouter()

KEEP = 100  # responses kept for previous_response_id, least recently used dropped first


# --- the request -------------------------------------------------------------------------------

class TextPart(_Body):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: Optional[list[Any]] = None  # what an output item given back carries
    logprobs: Optional[list[Any]] = None


def _str_or(t: Any) -> Any:
    """A string or a `t`: as a tagged union, so that a wrong list is told what is wrong in it."""
    return Annotated[Union[Annotated[str, Tag("str")], Annotated[t, Tag("list")]],
                     Discriminator(lambda v: "list" if isinstance(v, list) else "str")]


Content = _str_or(list[TextPart])


class MessageItem(_Body):
    type: Optional[Literal["message"]] = None
    role: Literal["user", "assistant", "system", "developer"]
    content: Content
    id: Optional[str] = None
    status: Optional[Literal["in_progress", "completed", "incomplete"]] = None
    phase: Optional[Literal["commentary", "final_answer"]] = None


class FunctionCallItem(_Body):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: Optional[str] = None
    status: Optional[Literal["in_progress", "completed", "incomplete"]] = None


class FunctionCallOutputItem(_Body):
    type: Literal["function_call_output"]
    call_id: str
    output: Content
    id: Optional[str] = None
    status: Optional[Literal["in_progress", "completed", "incomplete"]] = None


def _item_kind(v: Any) -> Optional[str]:
    t = v.get("type", "message") if isinstance(v, dict) else getattr(v, "type", None) or "message"
    return t if t in ("message", "function_call", "function_call_output") else None


InputItem = Annotated[Union[Annotated[MessageItem, Tag("message")], Annotated[FunctionCallItem, Tag("function_call")],
                            Annotated[FunctionCallOutputItem, Tag("function_call_output")]],
                      Discriminator(_item_kind, custom_error_type="invalid_item", custom_error_message=(
                          "an input item is a message, a function_call or a function_call_output"))]


class FunctionTool(_Body):
    type: Literal["function"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ToolChoiceFunction(_Body):
    type: Literal["function"]
    name: str


class FormatText(_Body):
    type: Literal["text"]


class FormatJsonObject(_Body):
    type: Literal["json_object"]


class FormatJsonSchema(_Body):
    type: Literal["json_schema"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    schema_: dict[str, Any] = Field(alias="schema")
    description: Optional[str] = None
    strict: Optional[bool] = None


class TextConfig(_Body):
    format: Optional[Annotated[Union[FormatText, FormatJsonObject, FormatJsonSchema], Field(discriminator="type")]] \
        = None
    verbosity: Optional[Literal["medium"]] = None  # the only one a model without that training has


class ResponsesRequest(_Body):
    model: str
    input: _str_or(list[InputItem])
    instructions: Optional[str] = None
    tools: Optional[list[FunctionTool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], ToolChoiceFunction]] = None
    parallel_tool_calls: Optional[bool] = None
    text: Optional[TextConfig] = None
    max_output_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    stream: bool = False
    store: Optional[bool] = None
    previous_response_id: Optional[str] = None
    metadata: Optional[dict[str, str]] = None
    user: Optional[str] = None
    truncation: Optional[Literal["disabled"]] = None  # "auto" would drop input: never silently
    # extensions, as on /v1/chat/completions
    seed: Optional[int] = Field(None, ge=-INT64, lt=INT64)
    stop: Optional[Union[str, list[str]]] = None
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(None, gt=0, le=10)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    speculate: Optional[str] = Field(None, min_length=1, max_length=500)  # "ngram" or a draft model: see schemas


def _text(content: Union[str, list[TextPart]]) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content)


def to_messages(items: Union[str, list[Any]]) -> list[dict[str, Any]]:
    """Input items as chat messages: function calls become an assistant message's tool calls
    (calls in a row, one message), their outputs tool messages."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, MessageItem):
            out.append({"role": "system" if item.role == "developer" else item.role, "content": _text(item.content)})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output)})
    return out


def _chat_body(body: ResponsesRequest, messages: list[dict[str, Any]]) -> ChatRequest:
    data: dict[str, Any] = {"model": body.model, "messages": messages, "stream": body.stream}
    for name in ("temperature", "top_p", "seed", "stop", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "parallel_tool_calls", "speculate"):
        if getattr(body, name) is not None:
            data[name] = getattr(body, name)
    if body.max_output_tokens is not None:
        data["max_completion_tokens"] = body.max_output_tokens
    if body.tools:
        data["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                         for t in body.tools]
    if isinstance(body.tool_choice, ToolChoiceFunction):
        data["tool_choice"] = {"type": "function", "function": {"name": body.tool_choice.name}}
    elif body.tool_choice is not None:
        data["tool_choice"] = body.tool_choice
    fmt = body.text.format if body.text else None
    if isinstance(fmt, FormatJsonSchema):
        data["response_format"] = {"type": "json_schema", "json_schema": fmt.model_dump(
            exclude={"type"}, exclude_none=True, by_alias=True)}
    elif fmt is not None:
        data["response_format"] = {"type": fmt.type}
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


# --- kept responses ----------------------------------------------------------------------------

class Kept:
    """The last KEEP responses: each one's object and its conversation (input and output as chat
    messages, the instructions left out: a continuation gives its own)."""

    def __init__(self, size: int = KEEP):
        self.size = size
        self.items: OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = OrderedDict()

    def get(self, rid: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        if rid in self.items:
            self.items.move_to_end(rid)
        return self.items.get(rid)

    def put(self, rid: str, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        self.items[rid] = (response, conversation)
        self.items.move_to_end(rid)
        while len(self.items) > self.size:
            self.items.popitem(last=False)

    def pop(self, rid: str) -> bool:
        return self.items.pop(rid, None) is not None


def kept(request: Request) -> Kept:
    state = request.app.state
    if not hasattr(state, "ownlm_responses"):
        state.ownlm_responses = Kept()
    return state.ownlm_responses


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


# --- the translator ----------------------------------------------------------------------------

class Responses:
    """/v1/responses: a chat under the hood, its answer as output items."""

    def __init__(self, body: ResponsesRequest, store: Kept):
        history: list[dict[str, Any]] = []
        if body.previous_response_id is not None:
            found = store.get(body.previous_response_id)
            if found is None:
                raise APIError(400, f"previous response with id {body.previous_response_id!r} not found (the server "
                                    f"keeps the last {store.size} responses, in memory)",
                               param="previous_response_id", code="previous_response_not_found")
            history = found[1]
        self.conversation = history + to_messages(body.input)
        if not self.conversation:
            raise APIError(400, "input must not be empty", param="input")
        system = [{"role": "system", "content": body.instructions}] if body.instructions is not None else []
        self.chat = Chat(_chat_body(body, system + self.conversation))
        self.body, self.store, self.model, self.stream = body, store, body.model, body.stream
        self.id, self.created = _id("resp"), int(time.time())
        self.seq = 0

    @property
    def prompt_tokens(self) -> int:
        return self.chat.prompt_tokens

    async def job(self, served: Served) -> runs.Job:
        return await self.chat.job(served)

    # the response object

    def _response(self, status: str, output: list[dict[str, Any]], choice: runs.Choice | None = None
                  ) -> dict[str, Any]:
        body = self.body
        tool_choice: Any = body.tool_choice or ("auto" if body.tools else "none")
        if isinstance(tool_choice, ToolChoiceFunction):
            tool_choice = tool_choice.model_dump()
        fmt = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format \
            else {"type": "text"}
        usage = None
        if choice is not None:
            n = len(choice.tokens)
            cached = choice.request.cached if choice.request is not None else 0
            # a speculating request's guesses under the names chat completions' usage gives them
            details = {"reasoning_tokens": 0, **(prediction_details([choice]) or {})}
            usage = {"input_tokens": self.prompt_tokens, "input_tokens_details": {"cached_tokens": cached},
                     "output_tokens": n, "output_tokens_details": details, "total_tokens": self.prompt_tokens + n}
        incomplete = status == "incomplete"
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "completed_at": int(time.time()) if status == "completed" else None, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": body.model,
                "output": output, "parallel_tool_calls": body.parallel_tool_calls is not False,
                "previous_response_id": body.previous_response_id, "reasoning": {"effort": None, "summary": None},
                "store": body.store is not False, "temperature": body.temperature, "text": {"format": fmt},
                "tool_choice": tool_choice,
                "tools": [t.model_dump(exclude_none=True) for t in body.tools or []], "top_p": body.top_p,
                "truncation": "disabled", "usage": usage, "user": body.user, "metadata": body.metadata or {}}

    def _outcome(self, c: runs.Choice) -> tuple[str, list[dict[str, Any]]]:
        """(status, output items) of a finished choice."""
        status = "incomplete" if c.finish == "length" else "completed"
        text, calls = runs.split_tool_calls(self.chat.tool_mode, c.text.text)  # calls cut short: neither
        if calls:
            return status, [self._call_item(call, "completed") for call in calls]
        return status, [self._message_item(_id("msg"), text, status)]

    @staticmethod
    def _message_item(mid: str, text: str | None, status: str) -> dict[str, Any]:
        content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        return {"id": mid, "type": "message", "role": "assistant", "status": status, "content": content}

    @staticmethod
    def _call_item(call: dict[str, Any], status: str) -> dict[str, Any]:
        f = call["function"]
        return {"id": _id("fc"), "type": "function_call", "status": status, "call_id": call["id"], "name": f["name"],
                "arguments": f["arguments"]}

    def _keep(self, response: dict[str, Any], output: list[dict[str, Any]]) -> None:
        if self.body.store is False:
            return
        said = to_messages([MessageItem(role="assistant", content=_text_of(o)) if o["type"] == "message"
                            else FunctionCallItem(type="function_call", call_id=o["call_id"], name=o["name"],
                                                  arguments=o["arguments"]) for o in output])
        self.store.put(self.id, response, self.conversation + said)

    def result(self, served: Served, choices: list[runs.Choice]) -> dict[str, Any]:
        c = choices[0]
        status, output = self._outcome(c)
        response = self._response(status, output, c)
        self._keep(response, output)
        return response

    # the stream

    def _event(self, kind: str, **data: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()

    def error_event(self, a: APIError) -> bytes:
        failed = {**self._response("failed", []), "error": {"code": a.code or "server_error", "message": a.message}}
        return (self._event("error", code=a.code or "server_error", message=a.message, param=a.param)
                + self._event("response.failed", response=failed))

    def _text_events(self, index: int, mid: str, text: str, status: str) -> list[bytes]:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return [self._event("response.output_text.done", item_id=mid, output_index=index, content_index=0, text=text,
                            logprobs=[]),
                self._event("response.content_part.done", item_id=mid, output_index=index, content_index=0, part=part),
                self._event("response.output_item.done", output_index=index,
                            item=self._message_item(mid, text, status))]

    def _open_message(self, index: int, mid: str) -> list[bytes]:
        return [self._event("response.output_item.added", output_index=index,
                            item=self._message_item(mid, None, "in_progress")),
                self._event("response.content_part.added", item_id=mid, output_index=index, content_index=0,
                            part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]

    def _call_events(self, index: int, done: dict[str, Any]) -> list[bytes]:
        """A tool call goes out whole once its closing tag has come (as on /v1/chat/completions)."""
        fid, arguments = done["id"], done["arguments"]
        return [self._event("response.output_item.added", output_index=index,
                            item={**done, "status": "in_progress", "arguments": ""}),
                self._event("response.function_call_arguments.delta", item_id=fid, output_index=index,
                            delta=arguments),
                self._event("response.function_call_arguments.done", item_id=fid, output_index=index,
                            name=done["name"], arguments=arguments),
                self._event("response.output_item.done", output_index=index, item=done)]

    async def chunks(self, served: Served, choices: list[runs.Choice], events: Events) -> AsyncIterator[bytes]:
        yield self._event("response.created", response=self._response("in_progress", []))
        yield self._event("response.in_progress", response=self._response("in_progress", []))
        mid = _id("msg")
        opened = False  # the message item (text)
        output: list[dict[str, Any]] = []  # the call items sent
        async for c, piece, _ in events:
            text = c.text.text
            if self.chat.tool_mode != "none" and (not text.strip() or self.chat._calls_tools(text)):
                calls = runs.parse_tool_calls(text) if text.strip() else []
                for call in calls[len(output):]:
                    item = self._call_item(call, "completed")
                    for e in self._call_events(len(output), item):
                        yield e
                    output.append(item)
                continue
            if not opened:
                for e in self._open_message(0, mid):
                    yield e
                opened, piece = True, text  # text held back while it might have been a tool call
            if piece:
                yield self._event("response.output_text.delta", item_id=mid, output_index=0, content_index=0,
                                  delta=piece, logprobs=[])
        c = choices[0]
        status = "incomplete" if c.finish == "length" else "completed"
        if not output:
            text, _ = runs.split_tool_calls(self.chat.tool_mode, c.text.text)
            if text is None:  # a tool call cut short: neither a call nor text, as result() gives it
                yield self._event("response.output_item.added", output_index=0,
                                  item=self._message_item(mid, None, "in_progress"))
                yield self._event("response.output_item.done", output_index=0,
                                  item=self._message_item(mid, None, status))
            else:
                if not opened:
                    for e in self._open_message(0, mid):
                        yield e
                    if text:
                        yield self._event("response.output_text.delta", item_id=mid, output_index=0,
                                          content_index=0, delta=text, logprobs=[])
                for e in self._text_events(0, mid, text, status):
                    yield e
            output = [self._message_item(mid, text, status)]
        response = self._response(status, output, c)
        self._keep(response, output)
        yield self._event("response.incomplete" if status == "incomplete" else "response.completed", response=response)


def _text_of(item: dict[str, Any]) -> str:
    return "".join(p.get("text", "") for p in item.get("content", []))


ITEM_TAGS = {"message", "function_call", "function_call_output"}


def _param(param: str) -> str:
    """A parameter path without pydantic's union branches: input.list.0.message.content -> input.0.content."""
    out: list[str] = []
    for seg in param.split("."):
        if seg in ("str", "list") or seg.startswith(("list[", "tagged-union[")) or (
                out and out[-1].isdigit() and out[0] == "input" and len(out) == 2 and seg in ITEM_TAGS) or (
                out and out[-1] == "format" and seg in ("text", "json_object", "json_schema")):
            continue
        out.append(seg)
    return ".".join(out)


@router.post("/v1/responses", openapi_extra=documented(ResponsesRequest))
async def create(request: Request) -> Any:
    try:
        body = await parse_body(request, ResponsesRequest)
    except APIError as a:
        if a.param:
            clean = _param(a.param)
            a.message, a.param = a.message.replace(a.param, clean), clean
        raise
    return await generate(request, Responses(body, kept(request)))


def _found(request: Request, response_id: str) -> dict[str, Any]:
    found = kept(request).get(response_id)
    if found is None:
        raise APIError(404, f"no response with id {response_id!r} (the server keeps the last {KEEP}, in memory)",
                       param="response_id", code="response_not_found")
    log_entry(request).model = found[0]["model"]
    return found[0]


@router.get("/v1/responses/{response_id}")
async def retrieve(request: Request, response_id: str) -> dict[str, Any]:
    return _found(request, response_id)


@router.delete("/v1/responses/{response_id}")
async def delete(request: Request, response_id: str) -> dict[str, Any]:
    _found(request, response_id)
    kept(request).pop(response_id)
    return {"id": response_id, "object": "response", "deleted": True}

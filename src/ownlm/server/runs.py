"""From an API request to engine requests and back: prompts, sampling, grammars, tool calls, and
the per-choice text assembly that turns engine events into OpenAI-shaped pieces."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

from ..engine import constraints
from ..engine import speculate as speculation_engine
from ..engine.generate import TextAssembler, budget
from ..engine.sampling import SamplingParams
from ..engine.scheduler import Event, Request, TokenLogprob
from ..errors import BadRequest, OwnlmError
from ..text.chat import validate_messages
from .pool import SERVER_DEFAULT, Served

TOOLS_PROMPT = (
    "You can call functions. To call one, reply with nothing but\n"
    '<tool_call>{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}</tool_call>\n'
    "The functions, as JSON schemas:\n{tools}"
)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def token_text(served: Served, token: int) -> str:
    return served.lm.tokenizer.decode([token])


def token_logprob(served: Served, lp: TokenLogprob) -> dict[str, Any]:
    """A generated token's log-probability and its alternatives', as OpenAI's chat and Ollama write
    them: token text, logprob, bytes (the token's own, part of a character too), top_logprobs."""
    def entry(tok: int, value: float) -> dict[str, Any]:
        return {"token": token_text(served, tok), "logprob": value, "bytes": list(served.lm.tokenizer.token_bytes(tok))}

    return {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}


# --- prompts ------------------------------------------------------------------------------------

def _template_knows_tools(served: Served) -> bool:
    return "tools" in served.lm.template.source


def render_chat(served: Served, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                think: bool | None = None) -> str:
    """The prompt for a conversation, tools included: through the model's own template when it
    renders tools, else as a system message ahead of the conversation (and earlier tool calls
    written into the assistant turns in the format the model is asked to use). `think`: the
    template's `enable_thinking` (Qwen 3's switch), left unset with None."""
    lm = served.lm
    messages = lm.with_preset(messages)  # a preset's system prompt and messages
    extra = {} if think is None else {"enable_thinking": think}
    if _template_knows_tools(served):
        return lm.template.render(messages, add_generation_prompt=True, **extra, **({"tools": tools} if tools else {}))
    msgs = [dict(m) for m in validate_messages(messages)]  # roles checked, content parts as text
    for i, m in enumerate(msgs):
        if m.get("role") == "assistant" and m.get("tool_calls"):
            try:
                calls = "".join(constraints.TOOL_OPEN + json.dumps(
                    {"name": c["function"]["name"], "arguments": _args(c["function"].get("arguments"))})
                    + constraints.TOOL_CLOSE for c in m["tool_calls"])
            except (TypeError, KeyError, AttributeError):
                raise BadRequest(f"messages[{i}].tool_calls must be a list of {{function: {{name, arguments}}}}",
                                 param="messages") from None
            m["content"] = (m.get("content") or "") + calls
    if tools:
        text = TOOLS_PROMPT.format(tools=json.dumps([t["function"] for t in tools], ensure_ascii=False))
        if msgs and msgs[0].get("role") == "system":
            msgs[0] = {**msgs[0], "content": f"{msgs[0].get('content') or ''}\n\n{text}".strip()}
        else:
            msgs.insert(0, {"role": "system", "content": text})
    return lm.template.render(msgs, add_generation_prompt=True, **extra)


def _args(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


async def encode(served: Served, text: str) -> list[int]:
    """The text's token ids, tokenized off the event loop (a prompt of megabytes takes seconds)."""
    return await asyncio.to_thread(served.lm.encode, text)


async def render_ids(served: Served, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                     tail: str = "") -> list[int]:
    """render_chat's prompt (then `tail`) as token ids, rendered and tokenized off the event loop."""
    return await asyncio.to_thread(lambda: served.lm.encode(render_chat(served, messages, tools) + tail))


# --- thinking -----------------------------------------------------------------------------------

THINK_TAGS = ("<think>", "</think>")  # Qwen 3, DeepSeek-R1, QwQ and their kin


def thinks(template: str) -> bool:
    """Whether a chat template (its source) writes thinking traces (in THINK_TAGS)."""
    return all(tag in template for tag in THINK_TAGS)


class ThinkSplitter:
    """Splits an answer's text, piece by piece, into its thinking trace and the rest: a trace is
    what comes between THINK_TAGS at the answer's start (leading white space before the opening
    tag allowed), or from the start when the prompt ended with the opening tag (`started`). White
    space right after either tag is dropped (as Ollama's parser drops it); a tag split across
    pieces is held back until it is whole."""

    def __init__(self, started: bool = False):
        self.state = "opened" if started else "start"
        self.held = ""

    def feed(self, piece: str) -> tuple[str, str]:
        """(thinking, content) of the text given so far that is now settled."""
        opening, closing = THINK_TAGS
        text = self.held + piece
        self.held = ""
        thinking = ""
        if self.state == "start":
            bare = text.lstrip()
            if bare.startswith(opening):
                text, self.state = bare[len(opening):], "opened"
            elif opening.startswith(bare):  # (a prefix of the tag, or only white space so far)
                self.held = text
                return "", ""
            else:
                self.state = "content"
        if self.state == "opened":
            text = text.lstrip()
            if not text:
                return "", ""
            self.state = "thinking"
        if self.state == "thinking":
            end = text.find(closing)
            if end < 0:
                keep = next((k for k in range(min(len(closing) - 1, len(text)), 0, -1)
                             if closing.startswith(text[-k:])), 0)
                self.held = text[len(text) - keep:]
                return text[:len(text) - keep], ""
            thinking, text, self.state = text[:end], text[end + len(closing):], "after"
        if self.state == "after":
            text = text.lstrip()
            if not text:
                return thinking, ""
            self.state = "content"
        return thinking, text

    def finish(self) -> tuple[str, str]:
        """What is still held back, once the answer has ended."""
        held, self.held = self.held, ""
        if self.state in ("opened", "thinking"):
            return held.lstrip(), ""
        return "", held.lstrip() if self.state == "after" else held


def split_thinking(text: str, started: bool = False) -> tuple[str, str]:
    """(thinking, content) of a whole answer (ThinkSplitter's split)."""
    s = ThinkSplitter(started)
    a, b = s.feed(text)
    c, d = s.finish()
    return a + c, b + d


def token_ids(served: Served, prompt: Any, where: str = "prompt") -> list[int]:
    if isinstance(prompt, str):
        return served.lm.encode(prompt)
    vocab = served.lm.config.vocab_size
    if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in prompt):
        raise BadRequest(f"{where}: token ids must be a non-empty list of integers in [0, {vocab})")
    return list(prompt)


def sampling(served: Served, body: Any, max_tokens: int | None, choice: int = 0) -> SamplingParams:
    """The request's sampling over the model's defaults (a preset's parameters); choice `i` of
    `n` gets the seed + i, so the choices differ but each is reproducible."""
    kw: dict[str, Any] = dict(served.lm.defaults)
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty"):
        value = getattr(body, name)
        if value is not None:
            kw[name] = value
    kw.setdefault("temperature", 1.0)
    if body.stop is not None:
        kw["stop"] = [body.stop] if isinstance(body.stop, str) else body.stop
    if body.logit_bias:
        try:
            kw["logit_bias"] = {int(k): v for k, v in body.logit_bias.items()}
        except ValueError:
            raise BadRequest("logit_bias keys must be token ids", param="logit_bias") from None
        vocab = served.lm.config.vocab_size
        if any(not 0 <= k < vocab for k in kw["logit_bias"]):  # never silently ignored
            raise BadRequest(f"logit_bias keys must be token ids in [0, {vocab})", param="logit_bias")
        if any(not -100 <= v <= 100 for v in kw["logit_bias"].values()):
            raise BadRequest("logit_bias values must be between -100 and 100", param="logit_bias")
    seed = body.seed if body.seed is not None else kw.get("seed")
    kw.update(seed=None if seed is None else seed + choice, max_tokens=max_tokens or kw.get("max_tokens"))
    return SamplingParams.from_kwargs(**kw)


def limit_for(served: Served, prompt: list[int], params: SamplingParams, max_tokens: int | None) -> int:
    """Tokens a choice may generate: max_tokens (up to what the context holds), or without one the
    server's default (`ownlm serve --max-tokens`), fewer where the context has less room."""
    if max_tokens == 0:
        if len(prompt) > served.lm.config.context_length:
            budget(len(prompt), params, served.lm.model)  # raises
        return 0
    return budget(len(prompt), params, served.lm.model, default=served.max_tokens)


# --- grammars -----------------------------------------------------------------------------------

@dataclass
class Plan:
    """How one chat request decodes: its grammar (if any) and whether tool calls may come out."""

    grammar: str | None = None
    tools: list[dict[str, Any]] | None = None  # rendered into the prompt
    tool_mode: str = "none"  # none | auto | required


def chat_plan(served: Served, body: Any) -> Plan:
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    if not tools:
        if choice != "none":
            raise BadRequest("tool_choice needs tools", param="tool_choice")
        return Plan(grammar=_format_grammar(body))
    if choice == "none":
        return Plan(grammar=_format_grammar(body))
    functions = [t["function"] for t in tools]
    if isinstance(choice, str):
        mode, chosen = choice, functions
    else:
        chosen = [f for f in functions if f["name"] == choice.function.name]
        if not chosen:
            raise BadRequest(f"tool_choice names {choice.function.name!r}, which is not among the tools",
                             param="tool_choice")
        mode = "required"
    single = body.parallel_tool_calls is False or not isinstance(choice, str)
    # beside tools, a response_format shapes the answer given instead of calls (as OpenAI's API)
    answer = _format_schema(body) if mode == "auto" else None
    grammar = constraints.tool_grammar(chosen, required=mode == "required", single=single, answer=answer)
    return Plan(grammar=grammar, tools=tools, tool_mode=mode)


def _format_schema(body: Any) -> dict[str, Any] | None:
    """The JSON schema the response_format asks the answer to follow (None: plain text)."""
    rf = body.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return {"type": "object"}
    if rf.json_schema is None or rf.json_schema.schema_ is None:
        raise BadRequest("response_format json_schema needs json_schema.schema", param="response_format")
    return rf.json_schema.schema_


def _format_grammar(body: Any) -> str | None:
    schema = _format_schema(body)
    return None if schema is None else constraints.json_schema_grammar(schema)


def parse_tool_calls(text: str) -> list[dict[str, Any]]:
    """The complete tool calls that `text` starts with (a call still being written is left out)."""
    calls = []
    rest = text.strip()
    decoder = json.JSONDecoder()
    while rest.startswith(constraints.TOOL_OPEN):
        # the JSON is read as JSON, not cut at the first closing tag: a string argument may hold one
        start = len(rest) - len(rest[len(constraints.TOOL_OPEN):].lstrip())
        try:
            body, end = decoder.raw_decode(rest, start)
        except ValueError:
            break
        end = len(rest) - len(rest[end:].lstrip())
        if not rest.startswith(constraints.TOOL_CLOSE, end) or not isinstance(body, dict) or not (
                isinstance(body.get("name"), str) and "arguments" in body):
            break
        arguments = json.dumps(body["arguments"], ensure_ascii=False)
        calls.append({"id": new_id("call"), "type": "function",
                      "function": {"name": body["name"], "arguments": arguments}})
        rest = rest[end + len(constraints.TOOL_CLOSE):].lstrip()
    return calls


def split_tool_calls(tool_mode: str, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool calls) of a finished chat answer. Under tools (auto or required) the grammar
    lets an answer be text not starting with '<', or calls: calls are never content, not even
    calls cut short by max_tokens (then: no content, no calls, finish 'length')."""
    if tool_mode == "none" or not text.lstrip().startswith(constraints.TOOL_OPEN[0]):
        return text, []
    return None, parse_tool_calls(text)


# --- running ------------------------------------------------------------------------------------

@dataclass
class Choice:
    """One sequence on the engine, seen from the event loop."""

    index: int
    prompt: list[int]
    text: TextAssembler
    request: Request | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish: str | None = None
    error: BaseException | None = None
    first_token_at: float | None = None  # time.monotonic() of its first token (Ollama's eval durations)
    speculative: bool = False  # submitted with a proposer (the request's `speculate`)

    def speculation(self) -> tuple[int, int]:
        """(tokens guessed, guesses kept) so far: the engine's counts."""
        r = self.request
        return (r.drafted, r.accepted) if r is not None else (0, 0)


@dataclass
class Job:
    """One API request translated for the engine: a choice per (prompt, sampling, token limit)."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    limits: list[int]
    logprobs: int | None = None  # alternatives per generated token; None: no logprobs
    prompt_logprobs: int | None = None  # alternatives per prompt token (completions' echo)
    grammar: str | None = None
    keep_stop: bool = False  # the stop token that ends a choice is counted and scored, with no text (completions)
    speculate: str | None = None  # "ngram", or a draft model's name (its model in `draft`): see speculation()
    draft: Any = None
    prediction: list[int] | None = None  # a predicted answer's tokens, searched by prompt lookup too


NO_SPECULATION = "none"  # a request's `speculate` that turns the server's default (`--speculate`) off


async def speculation(served: Served, name: str | None, default: bool = True) -> tuple[str | None, Any]:
    """A request's `speculate` checked: (name, the draft's torch model, or None for "ngram"). None
    takes the server's default (`ownlm serve --speculate`) where `default`; "none", no speculation.
    A draft is a model this server offers (GET /v1/models), loaded once per served model, off the
    event loop, and it must share the served model's vocabulary; anything else is a 400 naming the field."""
    who = "speculate"
    if name is None and default and served.speculate is not None:
        name, who = served.speculate, SERVER_DEFAULT
    if name is None or name == NO_SPECULATION:
        return None, None
    if name == speculation_engine.NGRAM:
        return name, None
    draft = served.lm.drafts.get(name) or await asyncio.to_thread(served.draft, name, who)
    return name, draft.model


def prediction(served: Served, predicted: Any, speculate: str | None, draft: Any) -> tuple[list[int], str]:
    """A chat request's `prediction` (OpenAI's predicted outputs) as tokens for prompt lookup to
    search, and the `speculate` it implies ("ngram": a prediction turns on prompt lookup by itself)."""
    if draft is not None:
        raise BadRequest("prediction is searched by prompt lookup: send it with speculate \"ngram\" or without "
                         "speculate, not with a draft model", param="prediction")
    return served.lm.tokenizer.encode(predicted.text(), add_bos=False), speculate or speculation_engine.NGRAM


def _proposer(job: Job) -> Any:
    """A proposer of its own for each speculating choice (it holds that sequence's lookup index or draft cache)."""
    if job.speculate is None:
        return None
    if job.prediction is not None:
        return speculation_engine.Predicted(job.prediction)
    if job.draft is None:
        return speculation_engine.PromptLookup()
    return speculation_engine.DraftModel(job.draft)


def grammars(served: Served, job: Job) -> list[Any]:
    """Each choice's grammar constraint (none without a grammar), the grammar checked first:
    compiling takes time for a large schema, so the routes call this off the event loop."""
    if not job.grammar:
        return [None] * len(job.prompts)
    gtok = served.grammar_tokenizer()
    constraints.validate_grammar(job.grammar, gtok)
    return [constraints.GrammarConstraint(job.grammar, gtok, served.lm.config.vocab_size) for _ in job.prompts]


def submit(served: Served, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, job: Job,
           made: list[Any]) -> list[Choice]:
    """Queue every choice on the model's engine, `made` their grammars(served, job); events
    arrive on `queue` as (index, Event)."""
    choices: list[Choice] = []
    try:
        for i, (prompt, params, limit) in enumerate(zip(job.prompts, job.params, job.limits)):
            c = Choice(i, prompt, TextAssembler(served.lm.tokenizer, params.stop))

            def emit(ev: Event, i: int = i) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, (i, ev))

            constraint = made[i]
            proposer = _proposer(job)
            c.speculative = proposer is not None
            c.request = served.scheduler.submit(Request(
                prompt=prompt, params=params, limit=limit, emit=emit,
                stop_ids=frozenset(served.lm.tokenizer.eos_ids) | frozenset(params.stop_token_ids),
                logprobs=job.logprobs, prompt_logprobs=job.prompt_logprobs, constraint=constraint,
                keep_stop=job.keep_stop, proposer=proposer))
            choices.append(c)
    except BaseException:
        cancel(choices)
        raise
    return choices


def cancel(choices: Sequence[Choice]) -> None:
    for c in choices:
        if c.request is not None:
            c.request.cancel()


class TimedOut(OwnlmError):
    """The request ran past the server's per-request time limit."""


async def events(choices: Sequence[Choice], queue: asyncio.Queue, deadline: float
                 ) -> AsyncIterator[tuple[Choice, str, list[TokenLogprob]]]:
    """(choice, new text, new token logprobs) as tokens arrive, until every choice is finished;
    a choice whose stop string appeared is cancelled on the engine at once. `deadline` is on the
    time.monotonic() clock."""
    open_ = {c.index for c in choices}
    by_index = {c.index: c for c in choices}
    while open_:
        try:
            i, ev = await asyncio.wait_for(queue.get(), max(0.001, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            cancel(choices)
            raise TimedOut("the request ran past the server's time limit (--request-timeout)") from None
        c = by_index[i]
        if ev.kind == "token":
            if c.finish is not None:
                continue
            if not c.tokens:
                c.first_token_at = time.monotonic()
            c.tokens.append(ev.token)
            if ev.logprob is not None:
                c.logprobs.append(ev.logprob)
            if ev.token in c.request.stop_ids:  # a kept stop token (Job.keep_stop): counted, scored, no text
                yield c, "", [ev.logprob] if ev.logprob is not None else []
                continue
            piece = c.text.push(ev.token)
            if c.text.stopped:
                c.finish = "stop"
                c.request.cancel()
            yield c, piece, [ev.logprob] if ev.logprob is not None else []
        elif ev.kind == "prompt":
            c.prompt_logprobs = ev.prompt_logprobs
        else:
            open_.discard(i)
            if ev.kind == "error":
                c.error = ev.error
            if c.finish is None:
                c.finish = ev.reason if ev.reason in ("stop", "length") else "stop"
            piece = c.text.finish()
            if piece:
                yield c, piece, []

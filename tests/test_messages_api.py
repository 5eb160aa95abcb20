"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens), driven by the official
`anthropic` client: greedy text and token counts equal the engine's, the stream's events come in
the spec's order, forced tools give valid tool_use blocks, tool_use/tool_result turns render as the
equivalent chat, stop sequences, API keys through x-api-key, errors in Anthropic's shape."""

from __future__ import annotations

import json
from types import SimpleNamespace

import anthropic
import httpx
import jsonschema
import pytest

import ownlm
import server_util
from conftest import build_hf_model
from ownlm import manage
from ownlm.errors import BadRequest
from ownlm.server import ModelPool, Server, ServerConfig, runs
from ownlm.store.store import Store

KEY = "test-key-anthropic-0123"
SYSTEM = "You are terse."
USER = [{"role": "user", "content": "Name three colors."}]
WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                             "unit": {"enum": ["celsius", "fahrenheit"]}},
                            "required": ["city", "unit"], "additionalProperties": False}}
STOPS = {"stop": "end_turn", "length": "max_tokens"}
# this SDK has no sampling arguments (newer Claude models dropped them): ownlm reads them from the body
GREEDY = {"extra_body": {"temperature": 0}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_hf_model(tmp_path_factory.mktemp("models") / "tiny", "llama", max_position_embeddings=4096)


@pytest.fixture(scope="module")
def lm(folder):
    return ownlm.load(str(folder), dtype="float32")


@pytest.fixture(scope="module")
def server(lm):
    pool = ModelPool(["tiny"], loader=lambda ref, **_: lm, max_loaded=1, max_running=4)
    pool.preload()
    with Server(pool, port=0, config=ServerConfig(api_keys=[KEY])) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


def prompt_of(usage) -> int:
    """The whole prompt: Anthropic counts the tokens read from the (prefix) cache apart."""
    return usage.input_tokens + (usage.cache_read_input_tokens or 0)


def chat(lm, system: str | None = None, **sampling):
    msgs = ([{"role": "system", "content": system}] if system else []) + USER
    return lm.chat(msgs, **sampling)


def test_create_equals_the_engine(client, lm):
    r = client.messages.create(model="tiny", system=SYSTEM, messages=USER, max_tokens=24, **GREEDY)
    direct = chat(lm, SYSTEM, temperature=0, max_tokens=24)
    assert r.type == "message" and r.role == "assistant" and r.model == "tiny" and r.id.startswith("msg_")
    assert [b.type for b in r.content] == ["text"] and r.content[0].text == direct.text
    assert r.stop_reason == STOPS[direct.finish_reason] and r.stop_sequence is None
    assert prompt_of(r.usage) == direct.usage["prompt_tokens"]
    assert r.usage.output_tokens == direct.usage["completion_tokens"]
    # system as text blocks, content as a block list: the same prompt
    blocks = client.messages.create(model="tiny", system=[{"type": "text", "text": SYSTEM}], max_tokens=24,
                                    messages=[{"role": "user", "content": [
                                        {"type": "text", "text": USER[0]["content"]}]}],
                                    **GREEDY)
    assert blocks.content == r.content
    assert (prompt_of(blocks.usage), blocks.usage.output_tokens) == (prompt_of(r.usage), r.usage.output_tokens)


def test_stream_events_and_final_message(client, lm):
    kw = dict(model="tiny", system=SYSTEM, messages=USER, max_tokens=20, **GREEDY)
    full = client.messages.create(**kw)
    with client.messages.stream(**kw) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == full.content[0].text == chat(lm, SYSTEM, temperature=0, max_tokens=20).text
    assert [(b.type, b.text) for b in final.content] == [(b.type, b.text) for b in full.content]
    assert (prompt_of(final.usage), final.usage.output_tokens) == (prompt_of(full.usage), full.usage.output_tokens)
    assert final.stop_reason == full.stop_reason and final.id.startswith("msg_")
    events = list(client.messages.create(**kw, stream=True))
    types = [e.type for e in events]
    assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"]
    assert events[0].message.content == [] and events[0].message.stop_reason is None
    assert prompt_of(events[0].message.usage) == prompt_of(full.usage)
    body = [t for t in types[1:-2] if t != "ping"]
    assert body[0] == "content_block_start" and body[-1] == "content_block_stop"
    assert set(body[1:-1]) == {"content_block_delta"}
    assert {e.index for e in events if e.type.startswith("content_block")} == {0}
    assert events[-2].delta.stop_reason == full.stop_reason
    assert events[-2].usage.output_tokens == full.usage.output_tokens
    # the raw wire: each event's name on its `event:` line, the same type in its data
    with httpx.stream("POST", f"{client.base_url}/v1/messages", headers={"x-api-key": KEY},
                      json={"model": "tiny", "system": SYSTEM, "messages": USER, "max_tokens": 20, "temperature": 0,
                            "stream": True}, timeout=60) as r:
        raw = [ln for ln in r.iter_lines() if ln]
    names = [ln.removeprefix("event: ") for ln in raw if ln.startswith("event: ")]
    data = [json.loads(ln.removeprefix("data: "))["type"] for ln in raw if ln.startswith("data: ")]
    assert names == data and names[:2] == ["message_start", "ping"] and names == types[:1] + ["ping"] + types[1:]


def test_tool_results_render_as_the_equivalent_chat(client, lm):
    args = {"city": "Paris", "unit": "celsius"}
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me check."},
                                          {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": args}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "21 degrees"},
                                     {"type": "text", "text": "Thanks."}]}]
    counted = client.messages.count_tokens(model="tiny", system=SYSTEM, messages=messages, tools=[WEATHER])
    r = client.messages.create(model="tiny", system=SYSTEM, messages=messages, tools=[WEATHER], max_tokens=8,
                               **GREEDY)
    equivalent = [{"role": "system", "content": SYSTEM}, messages[0],
                  {"role": "assistant", "content": "Let me check.", "tool_calls": [
                      {"id": "toolu_1", "type": "function",
                       "function": {"name": "get_weather", "arguments": json.dumps(args)}}]},
                  {"role": "tool", "tool_call_id": "toolu_1", "content": "21 degrees"},
                  {"role": "user", "content": "Thanks."}]
    tools = [{"type": "function", "function": {"name": WEATHER["name"], "description": WEATHER["description"],
                                               "parameters": WEATHER["input_schema"]}}]
    prompt = runs.render_chat(SimpleNamespace(lm=lm), equivalent, tools)
    assert "21 degrees" in prompt and "Let me check." in prompt and '"city": "Paris"' in prompt
    assert counted.input_tokens == prompt_of(r.usage) == len(lm.encode(prompt))


def test_tool_call_cut_short_is_neither_text_nor_tool_use(client):
    kw = dict(model="tiny", messages=USER, max_tokens=6, tools=[WEATHER], tool_choice={"type": "any"}, **GREEDY)
    r = client.messages.create(**kw)
    assert r.content == [] and r.stop_reason == "max_tokens" and r.usage.output_tokens == 6
    with client.messages.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert not [e for e in events if e.type.startswith("content_block")]
    assert final.content == [] and final.stop_reason == "max_tokens"


def test_count_tokens_equals_create(client):
    counted = client.messages.count_tokens(model="tiny", system=SYSTEM, messages=USER)
    r = client.messages.create(model="tiny", system=SYSTEM, messages=USER, max_tokens=2)
    assert counted.input_tokens == prompt_of(r.usage) > 0
    with_tools = client.messages.count_tokens(model="tiny", messages=USER, tools=[WEATHER])
    assert with_tools.input_tokens > client.messages.count_tokens(model="tiny", messages=USER).input_tokens
    # tool_choice none: the tools are not in the prompt, as for create
    none = client.messages.count_tokens(model="tiny", messages=USER, tools=[WEATHER], tool_choice={"type": "none"})
    assert none.input_tokens == client.messages.count_tokens(model="tiny", messages=USER).input_tokens


def test_stop_sequences(client):
    kw = dict(model="tiny", messages=USER, max_tokens=30, **GREEDY)
    whole = client.messages.create(**kw).content[0].text
    word = whole.split()[2]
    r = client.messages.create(**kw, stop_sequences=["never-appears-xyz", word])
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == word
    assert r.content[0].text == whole[: whole.index(word)]
    with client.messages.stream(**kw, stop_sequences=[word]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == word
    assert final.content[0].text == r.content[0].text


def test_the_models_own_stop_string_is_named_as_the_stop_sequence(client, lm, monkeypatch):
    """A stop string of the model's (a preset's `stop` parameter) ends the answer as the request's
    would, and the answer names it, streamed or not."""
    kw = dict(model="tiny", messages=USER, max_tokens=30, **GREEDY)
    whole = client.messages.create(**kw).content[0].text
    word = whole.split()[2]
    monkeypatch.setattr(lm, "defaults", {**lm.defaults, "stop": [word]})
    r = client.messages.create(**kw)
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == word
    assert r.content[0].text == whole[: whole.index(word)]
    with client.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == word


def test_prefill_continues_the_assistant_turn(client, lm):
    first = client.messages.create(model="tiny", messages=USER, max_tokens=12, **GREEDY).content[0].text
    head = first[:5]
    r = client.messages.create(model="tiny", messages=USER + [{"role": "assistant", "content": head}],
                               max_tokens=4, **GREEDY)
    prompt = lm.chat_prompt(USER) + head
    assert prompt_of(r.usage) == len(lm.encode(prompt))
    assert r.content[0].text == lm.generate(prompt, temperature=0, max_tokens=4).text


def test_errors_in_anthropic_shape(client, server):
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="no-such-model", messages=USER, max_tokens=4)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "not_found_error"
    assert "no-such-model" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="tiny", messages=USER, max_tokens=4, extra_body={"temperature": 1.5})
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert "temperature" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:  # nothing silently ignored
        client.messages.create(model="tiny", messages=USER, max_tokens=4, extra_body={"thinking": {"type": "enabled"}})
    assert "thinking" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="tiny", messages=USER, max_tokens=4, tools=[WEATHER],
                               tool_choice={"type": "tool", "name": "not_a_tool"})
    with pytest.raises(anthropic.AuthenticationError) as e:
        anthropic.Anthropic(base_url=server.url, api_key="wrong-key-123456", max_retries=0).messages.create(
            model="tiny", messages=USER, max_tokens=2)
    assert e.value.status_code == 401
    assert e.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                        "message": e.value.body["error"]["message"]}}


# --- a real `ownlm serve --api-key K` over smollm2 ------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_server(tmp_path_factory, smollm2_gguf):
    home = tmp_path_factory.mktemp("serve") / "home"
    manage.import_path(smollm2_gguf, name="smollm2", link=True, store=Store(home), quiet=True)
    s = server_util.Server(home, ["smollm2", "--preload", "--api-key", KEY])
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def smollm2_client(smollm2_server):
    """The SDK sends its api_key as `x-api-key`: that is the key `ownlm serve --api-key` asks for."""
    return anthropic.Anthropic(base_url=smollm2_server.base, api_key=KEY, max_retries=0, timeout=120)


@pytest.mark.smollm2
def test_error_types_follow_the_cause():
    """A request out of its time is a timeout_error, a busy server an overloaded_error (the SDK's types)."""
    from ownlm.server.anthropic import error_json
    from ownlm.server.http import APIError, as_api_error
    from ownlm.server.pool import PoolFull
    from ownlm.server.runs import TimedOut

    assert error_json(as_api_error(TimedOut("the request ran out of time")))["error"]["type"] == "timeout_error"
    assert error_json(as_api_error(PoolFull("busy")))["error"]["type"] == "overloaded_error"
    assert error_json(APIError(400, "bad"))["error"]["type"] == "invalid_request_error"


def test_smollm2_serve_with_api_key(smollm2_server, smollm2_client, smollm2_gguf):
    r = smollm2_client.messages.create(model="smollm2", system=SYSTEM, messages=USER, max_tokens=16, **GREEDY)
    direct = ownlm.load(str(smollm2_gguf)).chat([{"role": "system", "content": SYSTEM}, *USER], temperature=0,
                                                 max_tokens=16)
    assert r.content[0].text == direct.text and r.stop_reason == STOPS[direct.finish_reason]
    assert (prompt_of(r.usage), r.usage.output_tokens) == (direct.usage["prompt_tokens"],
                                                             direct.usage["completion_tokens"])
    body = {"model": "smollm2", "messages": USER, "max_tokens": 3}
    for headers in ({"x-api-key": "wrong-key-123456"}, {}):
        wrong = httpx.post(f"{smollm2_server.base}/v1/messages", headers=headers, json=body)
        assert wrong.status_code == 401 and wrong.json()["type"] == "error"
        assert wrong.json()["error"]["type"] == "authentication_error"
    missing = httpx.post(f"{smollm2_server.base}/v1/messages/count_tokens", headers={"x-api-key": KEY},
                         json={"model": "nope", "messages": USER})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_fields_the_sdk_sends_and_turns_it_combines(client, lm):
    """What the SDK may send beside the basics: nulls (a block round-tripped through model_dump),
    no-op settings (thinking disabled, top-level cache_control, service_tier, a tool's strict),
    system turns inside messages, and consecutive user turns, which Anthropic combines into one."""
    two = [{"role": "user", "content": "Name three colors."}, {"role": "user", "content": [
        {"type": "text", "text": "Only primary ones.", "citations": None, "cache_control": None}]}]
    r = client.messages.create(model="tiny", system=SYSTEM, messages=two, max_tokens=8, thinking={"type": "disabled"},
                               cache_control={"type": "ephemeral"}, service_tier="auto",
                               tools=[{**WEATHER, "strict": True}], tool_choice={"type": "none"}, **GREEDY)
    combined = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": "Name three colors.\nOnly primary ones."}]
    prompt = runs.render_chat(SimpleNamespace(lm=lm), combined, None)  # tool_choice none: no tools in the prompt
    assert prompt_of(r.usage) == len(lm.encode(prompt))
    # a system turn among the messages is a system message where it stands
    mid = client.messages.create(model="tiny", messages=[*USER, {"role": "assistant", "content": "Red."},
                                                         {"role": "system", "content": SYSTEM},
                                                         {"role": "user", "content": "More."}],
                                 max_tokens=6, **GREEDY)
    direct = lm.chat([*USER, {"role": "assistant", "content": "Red."}, {"role": "system", "content": SYSTEM},
                      {"role": "user", "content": "More."}], temperature=0, max_tokens=6)
    assert mid.content[0].text == direct.text
    with pytest.raises(anthropic.BadRequestError) as e:  # reasoning effort: nothing here honours it
        client.messages.create(model="tiny", messages=USER, max_tokens=4, output_config={"effort": "low"})
    assert "effort" in e.value.body["error"]["message"]


@pytest.mark.smollm2
def test_structured_output_through_messages_parse(smollm2_client):
    """`messages.parse(output_format=...)` sends output_config.format: the answer follows its schema."""
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=12)
        age: int = Field(ge=0, le=120)

    r = smollm2_client.messages.parse(model="smollm2", max_tokens=80, output_format=Person,
                                      messages=[{"role": "user", "content": "Describe a person as JSON."}], **GREEDY)
    assert r.stop_reason == "end_turn" and isinstance(r.parsed_output, Person)
    jsonschema.validate(json.loads(r.content[0].text), Person.model_json_schema())


@pytest.mark.smollm2
def test_forced_tool(smollm2_client):
    """On smollm2: the tiny random model writes JSON whitespace forever and rarely closes a call."""
    client = smollm2_client
    kw = dict(model="smollm2", messages=[{"role": "user", "content": "Weather in Paris?"}], max_tokens=200,
              tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"}, **GREEDY)
    r = client.messages.create(**kw)
    assert r.stop_reason == "tool_use" and [b.type for b in r.content] == ["tool_use"]
    block = r.content[0]
    assert block.name == "get_weather" and block.id.startswith("toolu_")
    jsonschema.validate(block.input, WEATHER["input_schema"])
    # streamed: the input_json_delta pieces join to the same input, and the SDK assembles the same block
    with client.messages.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_message()
    start = next(e for e in events if e.type == "content_block_start")
    assert start.content_block.type == "tool_use" and start.content_block.name == "get_weather"
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    assert deltas and all(d.type == "input_json_delta" for d in deltas)
    assert json.loads("".join(d.partial_json for d in deltas)) == block.input
    assert next(e for e in events if e.type == "message_delta").delta.stop_reason == "tool_use"
    assert [e.type for e in events if e.type in ("content_block_stop", "message_stop")] == ["content_block_stop",
                                                                                             "message_stop"]
    assert final.content[0].input == block.input and final.stop_reason == "tool_use"
    # the result goes back as a tool_result block, and the model answers in text
    follow = kw["messages"] + [{"role": "assistant", "content": [block.model_dump(exclude_none=True)]},
                               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id,
                                                             "content": json.dumps({"temperature": 21})}]}]
    answer = client.messages.create(model="smollm2", messages=follow, tools=[WEATHER], tool_choice={"type": "none"},
                                    max_tokens=12, **GREEDY)
    assert answer.content[0].type == "text" and answer.content[0].text and answer.stop_reason != "tool_use"


def test_content_parts_render_as_their_text_where_tools_are_written_by_ownlm(lm):
    """A template that does not render tools: ownlm writes them into the system message and
    earlier tool calls into the assistant turns; content given as text parts is their text there
    (it was a list joined to a string: a server error, or a Python repr in the prompt)."""
    served = SimpleNamespace(lm=lm)
    assert not runs._template_knows_tools(served)
    call = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER["input_schema"]}}]
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
             {"role": "user", "content": "Weather?"},
             {"role": "assistant", "content": [{"type": "text", "text": "Checking."}], "tool_calls": call},
             {"role": "tool", "tool_call_id": "c1", "content": "21 degrees"}]
    plain = [{**m, "content": "".join(p["text"] for p in m["content"])} if isinstance(m["content"], list) else m
             for m in parts]
    prompt = runs.render_chat(served, parts, tools)
    assert prompt == runs.render_chat(served, plain, tools)
    assert "Be brief." in prompt and "Checking.<tool_call>" in prompt and "'type'" not in prompt
    with pytest.raises(BadRequest, match=r"messages\[0\].role \['user'\] is not one of"):
        runs.render_chat(served, [{"role": ["user"], "content": "hi"}], None)
    # OpenAI's "developer" message is the system message of its newer models
    dev = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert runs.render_chat(served, dev, None) == runs.render_chat(served, [{**dev[0], "role": "system"}, dev[1]], None)


def test_max_tokens_beyond_the_context_is_what_the_context_holds(client):
    """max_tokens is required, and clients send their own model's (here a million, against a
    4096-token context): not a 400; the answer may run to the end of the context, and then its
    stop_reason is model_context_window_exceeded."""
    r = client.messages.create(model="tiny", messages=USER, max_tokens=1_000_000, **GREEDY)
    room = 4096 - r.usage.input_tokens
    assert r.usage.output_tokens <= room
    if r.usage.output_tokens == room:
        assert r.stop_reason == "model_context_window_exceeded"
    else:
        assert r.stop_reason == "end_turn"

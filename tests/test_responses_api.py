"""OpenAI's Responses API (/v1/responses) as applications see it, driven by the official `openai`
client's `responses.create`, over a tiny random Llama served in this process: the same greedy
text as the engine, the spec's stream events, function tools, json_schema output and kept
responses (previous_response_id)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

import ownlm
from conftest import build_hf_model
from ownlm.server import ModelPool, Server
from ownlm.server.responses import Kept

WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                   "unit": {"enum": ["celsius", "fahrenheit"]}},
                  "required": ["city", "unit"], "additionalProperties": False}
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": WEATHER_PARAMS, "strict": True}
CHAT_WEATHER = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}
FORCED = {"type": "function", "name": "get_weather"}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
SYSTEM = "You are terse."


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    folder = build_hf_model(tmp_path_factory.mktemp("models") / "tiny", "llama", max_position_embeddings=4096)
    return ownlm.load(str(folder), dtype="float32")


@pytest.fixture(scope="module")
def server(lm):
    pool = ModelPool(["tiny"], loader=lambda ref, **_: lm, max_running=8)
    pool.preload()
    with Server(pool, port=0) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def _check_like_engine(r, direct) -> None:
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "tiny"
    assert r.output_text == direct.text
    [item] = r.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    assert r.usage.input_tokens == direct.usage["prompt_tokens"]
    assert r.usage.output_tokens == direct.usage["completion_tokens"]
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    if direct.finish_reason == "length":
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    else:
        assert r.status == "completed" and r.incomplete_details is None


def test_text_equals_the_engine(client, lm):
    direct = lm.chat([{"role": "user", "content": "Name three colors."}], temperature=0, max_tokens=24)
    r = client.responses.create(model="tiny", input="Name three colors.", temperature=0, max_output_tokens=24)
    _check_like_engine(r, direct)
    # message items, instructions as the system message, a developer message as a system one
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Name three colors."}]
    direct = lm.chat([{"role": "system", "content": SYSTEM}] + msgs, temperature=0, max_tokens=24)
    items = [msgs[0], {"type": "message", "role": "assistant", "content": [
        {"type": "output_text", "text": "Hello.", "annotations": []}]},
             {"role": "user", "content": [{"type": "input_text", "text": "Name three "},
                                          {"type": "input_text", "text": "colors."}]}]
    r = client.responses.create(model="tiny", input=items, instructions=SYSTEM, temperature=0, max_output_tokens=24)
    _check_like_engine(r, direct)
    assert r.instructions == SYSTEM
    r = client.responses.create(model="tiny", input=[{"role": "developer", "content": SYSTEM}] + msgs, temperature=0,
                                max_output_tokens=24)
    _check_like_engine(r, direct)


def test_max_output_tokens_caps(client, lm):
    for n in (1, 3):
        direct = lm.chat([{"role": "user", "content": "Count to ten."}], temperature=0, max_tokens=n)
        r = client.responses.create(model="tiny", input="Count to ten.", temperature=0, max_output_tokens=n)
        assert r.usage.output_tokens <= n and r.max_output_tokens == n
        _check_like_engine(r, direct)


def _collect(stream) -> tuple[list, object]:
    events = list(stream)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return events, events[-1].response


def test_stream_events_in_the_spec_order(client, lm):
    direct = lm.chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Tell me a story."}],
                     temperature=0, max_tokens=20)
    events, final = _collect(client.responses.create(model="tiny", input="Tell me a story.", instructions=SYSTEM,
                                                     temperature=0, max_output_tokens=20, stream=True))
    types = [e.type for e in events]
    n = types.count("response.output_text.delta")
    end = "response.incomplete" if direct.finish_reason == "length" else "response.completed"
    assert n >= 1 and types == ["response.created", "response.in_progress", "response.output_item.added",
                                "response.content_part.added"] + ["response.output_text.delta"] * n + [
        "response.output_text.done", "response.content_part.done", "response.output_item.done", end]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert events[0].response.id == final.id
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == direct.text == events[-4].text == events[-3].part.text
    item_id = events[2].item.id
    assert all(e.item_id == item_id for e in events[3:-2]) and events[-2].item.id == item_id
    assert events[-2].item.content[0].text == text and final.output_text == text
    assert final.usage.input_tokens == direct.usage["prompt_tokens"]
    assert final.usage.output_tokens == direct.usage["completion_tokens"]
    assert final.usage.total_tokens == final.usage.input_tokens + final.usage.output_tokens
    # the same as not streamed
    r = client.responses.create(model="tiny", input="Tell me a story.", instructions=SYSTEM, temperature=0,
                                max_output_tokens=20)
    assert r.output_text == text and r.usage.output_tokens == final.usage.output_tokens


def _forced_call_checks(r) -> object:
    [call] = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.call_id.startswith("call") and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMS)
    assert r.status == "completed" and r.output_text == ""
    return call


def test_forced_function_tool(client):
    args = dict(model="tiny", input="What is the weather in Paris?", tools=[WEATHER], tool_choice=FORCED,
                temperature=0, max_output_tokens=120)
    r = client.responses.create(**args)
    call = _forced_call_checks(r)
    assert r.tools[0].name == "get_weather" and r.tool_choice.name == "get_weather"
    # streamed: the call's item, its argument deltas joining to .done's arguments, the same call
    events, final = _collect(client.responses.create(**args, stream=True))
    types = [e.type for e in events]
    n = types.count("response.function_call_arguments.delta")
    assert n >= 1 and types == ["response.created", "response.in_progress", "response.output_item.added"] + [
        "response.function_call_arguments.delta"] * n + ["response.function_call_arguments.done",
                                                         "response.output_item.done", "response.completed"]
    added, done = events[2].item, events[-2].item
    assert added.type == "function_call" and added.name == "get_weather" and added.status == "in_progress"
    joined = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert joined == events[-3].arguments == done.arguments == call.arguments
    assert events[-3].item_id == added.id == done.id and done.status == "completed"
    streamed = _forced_call_checks(final)
    assert streamed.arguments == call.arguments and final.usage.output_tokens == r.usage.output_tokens


def test_auto_tool_choice_streams_as_it_answers(client):
    """tool_choice auto: text or a call, whichever the model gives, the same streamed or not."""
    args = dict(model="tiny", input="Weather?", tools=[WEATHER], temperature=0, max_output_tokens=60)
    r = client.responses.create(**args)
    events, final = _collect(client.responses.create(**args, stream=True))
    strip = [o.model_dump(exclude={"id", "call_id"}) for o in r.output]
    assert [o.model_dump(exclude={"id", "call_id"}) for o in final.output] == strip
    # the same but for the tokens the second found in the prefix cache
    cached = {"input_tokens_details"}
    assert final.usage.model_dump(exclude=cached) == r.usage.model_dump(exclude=cached)
    assert events[-1].type in ("response.completed", "response.incomplete")


def test_a_call_cut_short_is_no_text_streamed_or_not(client):
    """A forced tool call that max_output_tokens cuts short is neither a call nor text (as on
    /v1/chat/completions): an empty, incomplete message, the same streamed or not."""
    args = dict(model="tiny", input="Weather?", tools=[WEATHER], tool_choice=FORCED, temperature=0,
                max_output_tokens=4)
    r = client.responses.create(**args)
    events, final = _collect(client.responses.create(**args, stream=True))
    assert r.status == final.status == "incomplete" and r.output_text == final.output_text == ""
    assert [o.model_dump(exclude={"id"}) for o in final.output] == [o.model_dump(exclude={"id"}) for o in r.output]
    assert [o.type for o in r.output] == ["message"] and r.output[0].content == []
    assert not any(e.type == "response.output_text.delta" for e in events)


def test_function_call_items_render_like_chat_messages(client):
    items = [{"role": "user", "content": "What is the weather in Paris?"},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather",
              "arguments": json.dumps({"city": "Paris", "unit": "celsius"})},
             {"type": "function_call_output", "call_id": "call_1", "output": json.dumps({"temperature": 21})}]
    messages = [items[0], {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": items[1]["arguments"]}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": items[2]["output"]}]
    r = client.responses.create(model="tiny", input=items, tools=[WEATHER], tool_choice="none", temperature=0,
                                max_output_tokens=16)
    c = client.chat.completions.create(model="tiny", messages=messages, tools=[CHAT_WEATHER], tool_choice="none",
                                       temperature=0, max_tokens=16)
    assert r.usage.input_tokens == c.usage.prompt_tokens
    assert r.output_text == c.choices[0].message.content
    # and the call the model made, given back as SDK objects with its output, renders the same way
    first = client.responses.create(model="tiny", input=items[:1], tools=[WEATHER], tool_choice=FORCED,
                                    temperature=0, max_output_tokens=120)
    call = first.output[0]
    r = client.responses.create(model="tiny", input=items[:1] + first.output + [
        {"type": "function_call_output", "call_id": call.call_id, "output": "21"}], tools=[WEATHER],
                                tool_choice="none", temperature=0, max_output_tokens=8)
    c = client.chat.completions.create(model="tiny", messages=[items[0], {"role": "assistant", "content": None,
                                                                          "tool_calls": [{
        "id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "21"}], tools=[CHAT_WEATHER], tool_choice="none",
                                       temperature=0, max_tokens=8)
    assert r.usage.input_tokens == c.usage.prompt_tokens and r.output_text == c.choices[0].message.content


def test_json_schema_format(client):
    fmt = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}
    for seed in range(3):
        r = client.responses.create(model="tiny", input="A person as JSON.", text=fmt, temperature=0.8,
                                    max_output_tokens=120, extra_body={"seed": seed})
        assert r.status == "completed", r.output_text
        jsonschema.validate(json.loads(r.output_text), PERSON)
        assert r.text.format.type == "json_schema" and r.text.format.name == "person"
    events, final = _collect(client.responses.create(model="tiny", input="A person as JSON.", text=fmt,
                                                     temperature=0, max_output_tokens=120, stream=True))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text
    jsonschema.validate(json.loads(text), PERSON)
    r = client.responses.create(model="tiny", input="JSON please", text={"format": {"type": "json_object"}},
                                temperature=0, max_output_tokens=120)
    if r.status == "completed":
        assert isinstance(json.loads(r.output_text), dict)


def test_previous_response_id_continues_the_conversation(client, server):
    first = client.responses.create(model="tiny", input="Hi", instructions=SYSTEM, temperature=0, max_output_tokens=6)
    assert client.responses.retrieve(first.id).output_text == first.output_text
    second = client.responses.create(model="tiny", input="And then?", previous_response_id=first.id, temperature=0,
                                     max_output_tokens=6)
    assert second.previous_response_id == first.id
    # the earlier turns, not the earlier instructions (as OpenAI does)
    same = client.chat.completions.create(model="tiny", messages=[
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And then?"}], temperature=0, max_tokens=6)
    assert second.usage.input_tokens == same.usage.prompt_tokens
    assert second.output_text == same.choices[0].message.content
    # a streamed one is kept too
    events, final = _collect(client.responses.create(model="tiny", input="More", previous_response_id=second.id,
                                                     temperature=0, max_output_tokens=4, stream=True))
    assert client.responses.retrieve(final.id).output_text == final.output_text
    # store: false keeps nothing; an unknown id is a 400 naming the parameter
    unkept = client.responses.create(model="tiny", input="Hi", store=False, max_output_tokens=2)
    assert unkept.store is False
    for rid in (unkept.id, "resp_nope"):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model="tiny", input="x", previous_response_id=rid, max_output_tokens=2)
        assert e.value.body["param"] == "previous_response_id" and e.value.body["code"] == "previous_response_not_found"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unkept.id)
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


def test_kept_responses_are_bounded():
    k = Kept(size=3)
    for i in range(3):
        k.put(f"r{i}", {"id": i}, [])
    k.get("r0")  # used: kept over r1
    k.put("r3", {"id": 3}, [])
    assert list(k.items) == ["r2", "r0", "r3"]


def _error(server, body, param: str | None) -> dict:
    r = httpx.post(f"{server.base_url}/responses", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    return err


def test_bad_bodies_are_400s_in_openais_shape(server, client):
    _error(server, {"input": "x"}, "model")
    _error(server, {"model": "tiny", "input": "x", "foo": 1}, "foo")
    _error(server, {"model": "tiny", "input": 5}, "input")
    _error(server, {"model": "tiny", "input": [{"type": "image"}]}, "input.0")
    _error(server, {"model": "tiny", "input": [{"role": "user", "content": [{"type": "input_text"}]}]},
           "input.0.content.0.text")
    _error(server, {"model": "tiny", "input": [{"role": "user", "content": [{"type": "input_image",
                                                                             "image_url": "x"}]}]},
           "input.0.content.0.type")
    _error(server, {"model": "tiny", "input": []}, "input")
    _error(server, {"model": "tiny", "input": "x", "max_output_tokens": 0}, "max_output_tokens")
    _error(server, {"model": "tiny", "input": "x", "text": {"format": {"type": "json_schema", "name": "a"}}},
           "text.format.schema")
    _error(server, {"model": "tiny", "input": "x", "truncation": "auto"}, "truncation")
    _error(server, {"model": "tiny", "input": "x", "tools": [WEATHER], "tool_choice": {"type": "function",
                                                                                       "name": "nope"}},
           "tool_choice")
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="tiny", input="x", tool_choice="required")
    assert e.value.body["param"] == "tool_choice"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="x")

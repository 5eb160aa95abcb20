"""LangChain (langchain-openai) and the openai client against a real `ownlm serve` of smollm2: a
forced tool call on an ordinary open schema always comes back parsed, tool-call markup never
reaches `content`, OpenAIEmbeddings agrees with /v1/embeddings, /v1/models reports real times."""

from __future__ import annotations

import calendar
import json
import time

import httpx
import jsonschema
import openai
import pytest

import server_util
from ownlm import manage
from ownlm.store.store import Store

pytestmark = pytest.mark.smollm2
QUESTION = "What is the weather in Paris?"
# an ordinary schema as clients send it: no additionalProperties, no maxLength
OPEN_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city"},
                                                     "unit": {"type": "string", "default": "celsius"}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def home(tmp_path_factory, smollm2_gguf):
    home = tmp_path_factory.mktemp("langchain") / "home"
    manage.import_path(smollm2_gguf, name="smollm2", link=True, store=Store(home), quiet=True)
    return home


@pytest.fixture(scope="module")
def server(home):
    s = server_util.Server(home, ["smollm2", "--preload"])
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="x", max_retries=0, timeout=300)


def _closed_check(args: dict, params: dict) -> None:
    """The arguments validate against the tool's schema and invent no keys."""
    jsonschema.validate(args, params)
    assert set(args) <= set(params["properties"]), args


def test_langchain_bind_tools_forced_call_is_parsed(server):
    from langchain_core.tools import tool
    from langchain_core.utils.function_calling import convert_to_openai_tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str, unit: str = "celsius") -> str:
        """Current weather in a city."""
        return "sunny"

    params = convert_to_openai_tool(get_weather)["function"]["parameters"]
    assert "additionalProperties" not in params  # LangChain's default: an open schema
    llm = ChatOpenAI(base_url=server.base + "/v1", api_key="x", model="smollm2", temperature=0, max_tokens=200,
                     max_retries=0, timeout=300)
    for choice in ("get_weather", "any", "required"):
        msg = llm.bind_tools([get_weather], tool_choice=choice).invoke(QUESTION)
        assert [c["name"] for c in msg.tool_calls][:1] == ["get_weather"], (choice, msg)
        assert not msg.invalid_tool_calls and "<tool_call>" not in str(msg.content), (choice, msg)
        _closed_check(msg.tool_calls[0]["args"], params)
        assert msg.response_metadata["finish_reason"] == "tool_calls"


def test_openai_named_tool_with_an_open_schema(client):
    params = OPEN_WEATHER["function"]["parameters"]
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                                       tools=[OPEN_WEATHER], tool_choice=named, temperature=0, max_tokens=200)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
    _closed_check(json.loads(choice.message.tool_calls[0].function.arguments), params)
    # streamed: the call arrives whole, no markup in any content delta
    content, calls = "", []
    for chunk in client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                                                tools=[OPEN_WEATHER], tool_choice="required", temperature=0,
                                                max_tokens=200, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        calls += delta.tool_calls or []
    assert "<" not in content and calls and calls[0].function.name == "get_weather"
    _closed_check(json.loads(calls[0].function.arguments), params)
    # cut short by max_tokens: no call, and still no markup in content
    short = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                                           tools=[OPEN_WEATHER], tool_choice=named, temperature=0, max_tokens=4)
    assert short.choices[0].finish_reason == "length"
    assert short.choices[0].message.content is None and not short.choices[0].message.tool_calls


def test_langchain_embeddings_equal_the_route(server):
    from langchain_openai import OpenAIEmbeddings

    emb = OpenAIEmbeddings(model="smollm2", base_url=server.base + "/v1", api_key="x",
                           check_embedding_ctx_length=False, max_retries=0)
    got = emb.embed_query("hi")
    want = httpx.post(f"{server.base}/v1/embeddings", json={"model": "smollm2", "input": "hi"},
                      timeout=120).json()["data"][0]["embedding"]
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7)


def test_models_report_the_store_times(server, home, client):
    stamp = Store(home).read("smollm2")["created"]
    want = calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))
    assert [(m.id, m.created) for m in client.models.list().data] == [("smollm2", want)]
    assert client.models.retrieve("smollm2").created == want > 0

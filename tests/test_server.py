"""The OpenAI-compatible server as applications see it, driven by the official `openai` client
(and httpx where the client hides the wire). Most tests run the server in this process over tiny
random models that the pool gets through its loader; a few start a real `ownlm serve` process: the
CLI's flags, signals and exit codes, and smollm2 end to end."""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import datetime
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
import torch

import ownlm
import ownlm.server.pool
import server_util
from conftest import build_hf_model
from ownlm import manage
from ownlm.cli.main import build_parser
from ownlm.cli.serve import api_keys
from ownlm.engine.embed import Stopped, embed
from ownlm.engine.generate import DEFAULT_MAX_TOKENS
from ownlm.errors import BadRequest
from ownlm.loading import LoadedModel
from ownlm.server import ModelPool, Server, ServerConfig
from ownlm.store.store import Store
from server_util import metric

GEMMA_LIKE = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
              "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
              "{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
KEY = "test-key-0123456789"
USER = [{"role": "user", "content": "Name three colors."}]
ENDLESS = {"0": -100, "1": -100, "2": -100}  # logit_bias masking the end-of-text ids: it runs to max_tokens


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Two tiny random Llamas: "tiny", with a 4096-token context (room for generations that last
    seconds), and "strict" (256 tokens), whose chat template refuses a system message."""
    base = tmp_path_factory.mktemp("models")
    tiny = build_hf_model(base / "tiny", "llama", max_position_embeddings=4096)
    strict = build_hf_model(base / "strict", "llama", seed=4)
    cfg = json.loads((strict / "tokenizer_config.json").read_text())
    (strict / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": GEMMA_LIKE}))
    return {"tiny": tiny, "strict": strict}


@pytest.fixture(scope="module")
def models(folders) -> dict[str, LoadedModel]:
    return {name: ownlm.load(str(path), dtype="float32") for name, path in folders.items()}


def serve(models: dict[str, LoadedModel], names: tuple[str, ...] = ("tiny", "strict"),
          config: ServerConfig | None = None, **pool) -> Server:
    """A server for this process on a free port (start it with `with`), over models already in
    memory (handed to the pool by its loader), the first `max_loaded` of them loaded."""
    p = ModelPool(list(names), loader=lambda ref, **_: models[ref], **pool)
    p.preload()
    return Server(p, port=0, config=config)


@pytest.fixture(scope="module")
def server(models):
    with serve(models, config=ServerConfig(max_body_bytes=1 << 20), max_loaded=2, max_running=8) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def lm(models):
    return models["tiny"]


def test_models_list(client):
    ids = {m.id for m in client.models.list().data}
    assert {"tiny", "strict"} <= ids
    assert client.models.retrieve("tiny").object == "model"


def test_chat_equals_the_engine(client, lm):
    check_chat_equals_the_engine(client, lm, "tiny")


def test_chat_without_max_tokens_stops_at_the_server_default(models):
    assert build_parser().parse_args(["serve"]).max_tokens == DEFAULT_MAX_TOKENS
    with pytest.raises(BadRequest, match="max_tokens"):
        ModelPool(["tiny"], max_tokens=0)
    with serve(models, ("tiny",), max_loaded=1, max_tokens=5) as s:
        client = openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0, timeout=120)
        capped = client.chat.completions.create(model="tiny", messages=USER, temperature=0, logit_bias=ENDLESS)
        assert capped.usage.completion_tokens == 5 and capped.choices[0].finish_reason == "length"
        asked = client.chat.completions.create(model="tiny", messages=USER, temperature=0, logit_bias=ENDLESS,
                                               max_tokens=9)  # a client's own max_tokens wins over the default
        assert asked.usage.completion_tokens == 9


def check_chat_equals_the_engine(client, lm, model: str):
    r = client.chat.completions.create(model=model, messages=USER, temperature=0, max_tokens=24)
    direct = lm.chat(USER, temperature=0, max_tokens=24)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == model
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == direct.text
    assert r.choices[0].finish_reason == direct.finish_reason
    assert r.usage.prompt_tokens == direct.usage["prompt_tokens"]
    assert r.usage.completion_tokens == direct.usage["completion_tokens"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_with_usage(client):
    check_stream_with_usage(client, "tiny")


def check_stream_with_usage(client, model: str):
    full = client.chat.completions.create(model=model, messages=USER, temperature=0, max_tokens=20)
    chunks = list(client.chat.completions.create(model=model, messages=USER, temperature=0, max_tokens=20,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    cached = {"prompt_tokens_details"}  # the second request finds its prompt in the prefix cache
    assert chunks[-1].choices == []
    assert chunks[-1].usage.model_dump(exclude=cached) == full.usage.model_dump(exclude=cached)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_what_sdks_and_wrappers_send(client):
    """Keywords given as None arrive as nulls (the field's default); settings with nothing to do
    here are accepted (service tier, cache key, safety identifier, metadata, store false, stream
    obfuscation off); store true is refused; a prompt over the context says so as OpenAI does."""
    kw = dict(model="tiny", messages=USER, temperature=0, max_tokens=6)
    ref = client.chat.completions.create(**kw)
    r = client.chat.completions.create(**kw, n=None, logprobs=None, stream=None, top_p=None, seed=None, stop=None,
                                       service_tier="auto", prompt_cache_key="k1", safety_identifier="someone",
                                       metadata={"app": "test"}, store=False)
    assert r.choices[0].message.content == ref.choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={
        "include_usage": True, "include_obfuscation": False}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kw, store=True)
    assert e.value.body["param"] == "store"
    # n choices of one prompt: the prompt counted once, as OpenAI counts it
    two = client.chat.completions.create(**{**kw, "temperature": 0.9}, n=2, seed=3)
    assert two.usage.prompt_tokens == ref.usage.prompt_tokens
    assert two.usage.prompt_tokens_details.cached_tokens <= two.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 5000}],
                                       max_tokens=2)
    assert e.value.code == "context_length_exceeded" and "prompt is too long" in e.value.message


def test_stop_sampling_parameters_and_n(client):
    r = client.chat.completions.create(model="tiny", messages=USER, temperature=0.9, seed=7, n=2, max_tokens=12,
                                       presence_penalty=0.5, frequency_penalty=0.5, top_p=0.9, user="u1",
                                       extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1})
    again = client.chat.completions.create(model="tiny", messages=USER, temperature=0.9, seed=7, n=2, max_tokens=12,
                                           presence_penalty=0.5, frequency_penalty=0.5, top_p=0.9, user="u1",
                                           extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1})
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]
    greedy = client.chat.completions.create(model="tiny", messages=USER, temperature=0, max_tokens=30)
    word = greedy.choices[0].message.content.split()[2]
    cut = client.chat.completions.create(model="tiny", messages=USER, temperature=0, max_tokens=30, stop=[word])
    assert cut.choices[0].finish_reason == "stop"
    whole = greedy.choices[0].message.content
    assert cut.choices[0].message.content == whole[: whole.index(word)]


def test_chat_logprobs(client, lm):
    r = client.chat.completions.create(model="tiny", messages=USER, temperature=0, max_tokens=6, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for item in content:  # greedy: the chosen token is the most likely one
        assert len(item.top_logprobs) == 3
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-6)
        assert item.logprob <= 0


def test_completions_echo_logprobs_match_the_engine(client, lm):
    """What lm-evaluation-harness's local-completions sends to score multiple choice."""
    prompt = lm.encode("The capital of France is Paris")
    r = client.completions.create(model="tiny", prompt=[prompt], echo=True, logprobs=1, max_tokens=1,
                                  temperature=0, seed=1234)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(prompt) + 1 and lp.token_logprobs[0] is None
    with torch.inference_mode():
        logits = lm.model(torch.tensor([prompt]))[0].float()
    direct = torch.log_softmax(logits, -1)
    want = [float(direct[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]
    assert lp.token_logprobs[1:len(prompt)] == pytest.approx(want, abs=2e-3)
    assert r.choices[0].text.startswith(lm.tokenizer.decode(prompt))
    # string prompt, several at once, no echo
    r2 = client.completions.create(model="tiny", prompt=["Once upon a time", "1, 2, 3,"], max_tokens=5, temperature=0)
    assert [c.index for c in r2.choices] == [0, 1]
    assert r2.choices[1].text == lm.generate("1, 2, 3,", temperature=0, max_tokens=5).text


def test_embeddings_both_encodings(client, lm):
    texts = ["I own my model.", "Der Hund schläft."]
    f = client.embeddings.create(model="tiny", input=texts)
    raw = httpx.post(f"{str(client.base_url).rstrip('/')}/embeddings",
                     json={"model": "tiny", "input": texts, "encoding_format": "base64"}).json()
    with torch.inference_mode():
        h = lm.model(torch.tensor([lm.encode(texts[0])]), head=False)[0].float().mean(0)
    want = torch.nn.functional.normalize(h, dim=0)
    got = torch.tensor(f.data[0].embedding)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4)
    decoded = struct.unpack(f"<{len(got)}f", base64.b64decode(raw["data"][0]["embedding"]))
    assert torch.allclose(torch.tensor(decoded), got, atol=1e-6)
    assert float(torch.tensor(f.data[1].embedding) @ got) < 0.999
    assert f.usage.prompt_tokens == len(lm.encode(texts[0])) + len(lm.encode(texts[1]))


def test_embed_in_chunks_equals_one_forward(lm):
    """A long text is embedded chunk by chunk against a KV cache (memory linear in its length,
    a stop between chunks): the same vector as one forward over it all."""
    ids = lm.encode("The quick brown fox jumps over the lazy dog. " * 40)[:600]
    with torch.inference_mode():
        h = lm.model(torch.tensor([ids]), head=False)[0].float().mean(0)
    want = torch.nn.functional.normalize(h, dim=0)
    for chunk in (1000, 256, 100):
        assert torch.allclose(torch.tensor(embed(lm.model, [ids], chunk=chunk)[0]), want, atol=1e-5)
    asked = []
    with pytest.raises(Stopped):
        embed(lm.model, [ids], chunk=100, stop=lambda: asked.append(1) or len(asked) > 2)
    assert len(asked) == 3  # asked before the text and between chunks, never after it gave up


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}}, "required": ["name"]},
    {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"x": {"type": "number", "minimum": -5, "maximum": 5}}, "required": ["x"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                               "minItems": 1, "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False}}, "required": ["point"]},
    {"type": "object", "properties": {"a": {"type": "string", "maxLength": 5}, "b": {"type": "integer", "minimum": 1,
                                                                                      "maximum": 3}},
     "required": ["a", "b"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["id"],
        "additionalProperties": False}}}, "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "fixed"}}, "required": ["kind"]},
    {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                      {"type": "boolean"}]}}, "required": ["v"]},
    {"type": "object", "properties": {"s": {"type": "string", "pattern": "^[a-c]{2,4}$"}}, "required": ["s"]},
    {"type": "object", "properties": {"n": {"type": ["integer", "null"], "minimum": 0, "maximum": 5}},
     "required": ["n"]},
    {"type": "object", "properties": {"m": {"type": "array", "items": {"enum": [1, 2, 3]}, "maxItems": 4}},
     "required": ["m"], "additionalProperties": False},
    {"type": "object", "properties": {"deep": {"type": "object", "properties": {"deeper": {
        "type": "object", "properties": {"flag": {"type": "boolean"}}, "required": ["flag"],
        "additionalProperties": False}}, "required": ["deeper"],
        "additionalProperties": False}}, "required": ["deep"], "additionalProperties": False},
    {"type": "object", "properties": {"pair": {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0,
                                                                                 "maximum": 9}, {"type": "boolean"}],
                                               "items": False}}, "required": ["pair"]},
    {"type": "object", "properties": {"price": {"type": "number", "exclusiveMinimum": 0, "maximum": 100}},
     "required": ["price"], "additionalProperties": False},
    {"type": "object", "properties": {"first": {"type": "string", "maxLength": 4}, "last": {"type": "string",
                                                                                             "maxLength": 4},
                                      "nick": {"type": "string", "maxLength": 4}},
     "required": ["first", "last"], "additionalProperties": False},
    {"type": "object", "properties": {"grid": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0, "maximum": 1}}}},
     "required": ["grid"], "additionalProperties": False},
    {"type": "object", "properties": {"status": {"type": "string", "enum": ["on", "off"]},
                                      "level": {"type": "integer", "minimum": 1, "maximum": 10}},
     "required": ["status", "level"], "additionalProperties": False},
    {"type": "object", "$defs": {"leaf": {"type": "object", "properties": {"v": {"type": "integer", "minimum": 0,
                                                                                  "maximum": 9}},
                                          "required": ["v"], "additionalProperties": False}},
     "properties": {"l": {"$ref": "#/$defs/leaf"}, "r": {"$ref": "#/$defs/leaf"}}, "required": ["l", "r"],
     "additionalProperties": False},
]


def strict(schema):
    """As OpenAI's strict mode asks: objects list every key they allow (additionalProperties false)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if schema.get("type") == "object":
            schema.setdefault("additionalProperties", False)
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


SCHEMAS = [strict(s) for s in SCHEMAS]



def test_json_schema_outputs_validate(client):
    check_json_schemas(client, "tiny", SCHEMAS)


def check_json_schemas(client, model: str, schemas: list[dict]):
    def ask(i_schema):
        i, schema = i_schema
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Reply with JSON."}], temperature=0.8, seed=i,
            max_tokens=200, response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema,
                                                                                   "strict": True}})
        return r.choices[0]

    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, enumerate(schemas)))
    for schema, choice in zip(schemas, results):
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "A JSON object please"}],
                                       response_format={"type": "json_object"}, temperature=0, max_tokens=120)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def _error(server, path: str, body, status: int, **headers) -> dict:
    r = httpx.post(f"{server.url}{path}", content=body if isinstance(body, (bytes, str)) else json.dumps(body),
                   headers={"content-type": "application/json", **headers}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_error_statuses_and_shapes(server, client):
    assert _error(server, "/v1/chat/completions", {"model": "tiny", "messages": USER, "foo": 1}, 400)["param"] == "foo"
    assert _error(server, "/v1/chat/completions", {"model": "tiny", "messages": USER, "temperature": 9}, 400)[
        "param"] == "temperature"
    _error(server, "/v1/chat/completions", b"{not json", 400)
    _error(server, "/v1/chat/completions", {"model": "tiny", "messages": USER, "best_of": 2}, 400)
    long = {"model": "strict", "messages": [{"role": "user", "content": "word " * 400}]}  # strict: 256 tokens
    assert "context" in _error(server, "/v1/chat/completions", long, 400)["message"]
    bad_schema = {"model": "tiny", "messages": USER, "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}}
    _error(server, "/v1/chat/completions", bad_schema, 400)
    assert _error(server, "/v1/chat/completions", {"model": "nope", "messages": USER}, 404)["code"] == "model_not_found"
    _error(server, "/v1/chat/completions", {"model": "tiny", "messages": USER, "x": "a" * (2 << 20)}, 413)
    broken_history = [{"role": "assistant", "content": None, "tool_calls": [{"x": 1}]}] + USER
    broken = {"model": "tiny", "messages": broken_history}
    assert _error(server, "/v1/chat/completions", broken, 400)["param"] == "messages"
    system = [{"role": "system", "content": "Be brief."}] + USER
    assert _error(server, "/v1/chat/completions", {"model": "strict", "messages": system}, 422)["param"] == "messages"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=USER, extra_body={"mystery": True})
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="absent", messages=USER)
    assert httpx.get(f"{server.url}/v1/nothing").status_code == 404
    # the server still answers after all of that
    answer = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3)
    assert answer.choices[0].message.content is not None


def _post(url: str, body: dict | bytes, http: httpx.Client | None = None) -> httpx.Response:
    """A POST of JSON as json.dumps writes it: \\u escapes for what UTF-8 cannot carry, as browsers'
    JSON.stringify writes them (httpx and the openai client refuse to encode a lone surrogate)."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (http or httpx).post(url, content=content, headers={"content-type": "application/json"}, timeout=60)


RECURSIVE = {"$ref": "#/$defs/node", "$defs": {"node": {  # no finite instance: every node must hold another
    "type": "object", "properties": {"child": {"$ref": "#/$defs/node"}}, "required": ["child"]}}}


def test_client_mistakes_are_4xx_and_the_server_keeps_serving(server, client):
    """Each of these once gave a 500: a body nested 100k deep, a seed past 64 bits, lone surrogates
    in text, and a schema whose grammar llguidance gives up on mid-generation."""
    deep = _post(f"{server.base_url}/chat/completions", b"[" * 100_000 + b"]" * 100_000)
    assert deep.status_code == 400 and deep.json()["error"]["code"] == "invalid_json"
    nested: dict = {"model": "tiny", "messages": USER}
    for _ in range(200):  # deep, yet within Python's recursion limit
        nested = {"a": nested}
    assert _post(f"{server.base_url}/chat/completions", nested).json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=USER, seed=10**30, max_tokens=2)
    assert e.value.status_code == 400 and e.value.body["param"] == "seed"
    biggest = client.chat.completions.create(model="tiny", messages=USER, seed=2**63 - 1, n=3, temperature=1,
                                             max_tokens=2)  # seed + i for the n choices still fits
    assert len(biggest.choices) == 3
    lone = "caf\u00e9 \ud800 end"
    for path, body, param in (("chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": lone}]},
                               "messages[0].content"),
                              ("completions", {"model": "tiny", "prompt": ["fine", lone]}, "prompt[1]"),
                              ("embeddings", {"model": "tiny", "input": lone}, "input")):
        r = _post(f"{server.base_url}/{path}", body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
        assert "surrogate" in err["message"]
    fmt = {"type": "json_schema", "json_schema": {"name": "tree", "schema": RECURSIVE}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=USER, response_format=fmt, max_tokens=50)
    assert "output format" in e.value.body["message"] and "<state>" not in e.value.body["message"]
    with httpx.stream("POST", f"{server.base_url}/chat/completions", timeout=60, json={
            "model": "tiny", "messages": USER, "response_format": fmt, "max_tokens": 50, "stream": True}) as r:
        data = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and json.loads(data[-1])["error"]["type"] == "invalid_request_error"
    answer = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3)
    assert answer.choices[0].message.content is not None
    assert metric(server.url, "ownlm_running_sequences") == 0


def _malformed_bodies() -> list[tuple[str, dict | bytes]]:
    """(route, body): each field of each route set to values of the wrong type or range, each
    field left out, bodies that are no JSON object, and known traps."""
    fields = {
        "chat/completions": ({"model": "tiny", "messages": USER, "max_tokens": 2},
                             ["model", "messages", "temperature", "top_p", "stop", "seed", "n", "presence_penalty",
                              "frequency_penalty", "logit_bias", "user", "stream", "stream_options", "top_k", "min_p",
                              "repetition_penalty", "max_completion_tokens", "logprobs", "top_logprobs",
                              "response_format", "tools", "tool_choice", "parallel_tool_calls"]),
        "completions": ({"model": "tiny", "prompt": "Once", "max_tokens": 2},
                        ["model", "prompt", "temperature", "stop", "seed", "n", "logit_bias", "echo", "logprobs",
                         "best_of", "suffix", "stream", "stream_options"]),
        "embeddings": ({"model": "tiny", "input": "hello"},
                       ["model", "input", "encoding_format", "dimensions", "user"]),
    }
    wrong = [None, True, -1, 10**30, 1e300, "x", "", "\ud800", [], {}, [[]], [None], {"a": [1]}]
    out: list[tuple[str, dict | bytes]] = []
    for route, (base, names) in fields.items():
        for name in names:
            out += [(route, {**base, name: v}) for v in wrong]
            out.append((route, {k: v for k, v in base.items() if k != name}))
        out += [(route, raw) for raw in (b"", b"null", b"[]", b"1", b'"x"', b"{", b"\xff\xfe", b'{"model": NaN}',
                                         b'{"model": "tiny", "n": Infinity}', b"[" * 5000,
                                         b'{"n": ' + b"9" * 5000 + b"}")]
    schema = lambda s: {"type": "json_schema", "json_schema": {"name": "x", "schema": s}}  # noqa: E731
    tool = lambda params: [{"type": "function", "function": {"name": "f", "parameters": params}}]  # noqa: E731
    chat = {"model": "tiny", "messages": USER, "max_tokens": 2}
    out += [("chat/completions", {**chat, **extra}) for extra in (
        {"messages": [{"role": "user", "content": 5}]}, {"messages": [{}]}, {"messages": [{"role": "robot"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        {"messages": [{"role": "assistant", "tool_calls": "x"}, *USER]},
        {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": 5, "arguments": {"a": 1}}}]}, *USER]},
        {"messages": [{"role": ["user"], "content": "hi"}]}, {"messages": [{"role": {"user": 1}, "content": "hi"}]},
        {"messages": [{"role": "assistant", "content": 5, "tool_calls": [{"function": {"name": "f"}}]}, *USER]},
        {"messages": [{"role": "assistant", "content": [{"type": "text", "text": "x"}],
                       "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}, *USER]},
        {"messages": [{"role": "system", "content": [{"type": "text", "text": "x"}]}, *USER], "tools": tool(None)},
        {"logit_bias": {"99999999": 5}}, {"logit_bias": {"-1": 5}}, {"logit_bias": {"1": 1e300}},
        {"logit_bias": {"x": 1}}, {"stop": [""]}, {"stop": ["a"] * 50}, {"top_logprobs": 3},
        {"response_format": {"type": "json_schema"}}, {"response_format": schema({"type": "object", "properties": 5})},
        {"response_format": schema({"$ref": "#/nope"})},
        {"response_format": schema({"type": "string", "pattern": "("})},
        {"response_format": schema({"type": "integer", "minimum": 5, "maximum": 1})},
        {"response_format": schema({"enum": []})}, {"response_format": schema(RECURSIVE), "max_tokens": 20},
        {"response_format": schema(RECURSIVE), "max_tokens": 20, "stream": True},
        {"tools": tool({"type": "object", "properties": 5})}, {"tools": tool({"$ref": "#/x"})},
        {"tools": tool({"not": {}}), "tool_choice": "required"}, {"tool_choice": "required"},
        {"tools": tool(None), "tool_choice": {"type": "function", "function": {"name": "g"}}},
        {"tools": tool(None), "response_format": {"type": "json_object"}}, {"max_tokens": 0}, {"max_tokens": 10**30},
        {"model": "\u0000"}, {"model": "../../etc/passwd"}, {"model": "x" * 10000})]
    completion = {"model": "tiny", "prompt": "Once", "max_tokens": 2}
    out += [("completions", {**completion, **extra}) for extra in (
        {"prompt": [[]]}, {"prompt": [-1]}, {"prompt": [10**9]}, {"prompt": [[1], []]}, {"prompt": [True]},
        {"prompt": [""]}, {"prompt": [1] * 5000}, {"echo": True, "stream": True, "logprobs": 1}, {"max_tokens": 0},
        {"logit_bias": {"300": 1}})]
    out += [("embeddings", {"model": "tiny", "input": "hello", **extra}) for extra in (
        {"input": [""]}, {"input": [[]]}, {"input": [-1]}, {"input": [[10**9]]}, {"input": [1] * 5000},
        {"input": [True]}, {"dimensions": 10**9}, {"dimensions": 0})]
    return out


def test_malformed_bodies_at_every_route_never_5xx(server):
    """Whatever a client sends, the answer is a 4xx in OpenAI's error shape (or a 200), never a
    server error, and a stream that fails says so in a client-error event."""
    def send(case: tuple[str, dict | bytes]) -> tuple[str, int, str]:
        route, body = case
        r = _post(f"{server.base_url}/{route}", body, http)
        problem = ""
        if r.status_code >= 400:
            if r.status_code >= 500 or set(r.json()["error"]) != {"message", "type", "param", "code"}:
                problem = r.text[:300]
        elif r.headers["content-type"].startswith("text/event-stream"):
            for line in r.text.splitlines():
                if line.startswith('data: {"error"') and json.loads(line[6:])["error"]["type"] == "server_error":
                    problem = line[:300]
        return f"{route} {str(body)[:120]}", r.status_code, problem

    cases = _malformed_bodies()
    with httpx.Client() as http, cf.ThreadPoolExecutor(4) as pool:  # one pool of connections: quicker
        results = list(pool.map(send, cases))
    assert len(results) > 400
    assert [r for r in results if r[2]] == []
    assert sum(r[1] == 400 for r in results) > 300
    for path in ("/v1/models/%ED%A0%80", "/v1/models/%ff", "/v1/models/" + "a" * 5000, "/%00", "/v1/../metrics"):
        assert httpx.get(f"{server.url}{path}").status_code < 500
    chunked = httpx.post(f"{server.base_url}/chat/completions", content=iter([b"{" + b" " * (1 << 20), b"}"]),
                         headers={"content-type": "application/json"})  # no Content-Length: counted as it comes
    assert chunked.status_code == 413
    assert httpx.post(f"{server.base_url}/embeddings", json={"model": "tiny", "input": "still here"}).status_code == 200
    assert metric(server.url, "ownlm_running_sequences") == 0


def test_dns_rebinding_host_refused(server):
    r = httpx.get(f"{server.url}/v1/models", headers={"Host": "attacker.example:80"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"


def test_web_pages_of_other_sites_are_refused_unless_allowed(models):
    """Any web page can make a browser send a text/plain POST to 127.0.0.1 without a preflight.
    Such a request is refused twice over: for its Content-Type (415: a browser marks its requests
    with Sec-Fetch-* headers, and with an Origin) and for its Origin (403); only the origins given
    to --cors get CORS answers, and for their own origin only."""
    page, evil = "http://localhost:3000", "https://evil.example"
    with serve(models, ("tiny",), ServerConfig(cors_origins=[page + "/"]), max_loaded=1) as s:
        url = f"{s.base_url}/chat/completions"
        body = json.dumps({"model": "tiny", "messages": USER, "max_tokens": 2})
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            plain = httpx.post(url, content=body, headers={"Content-Type": kind, "Sec-Fetch-Mode": "no-cors",
                                                           "Sec-Fetch-Site": "same-site"})
            assert plain.status_code == 415 and plain.json()["error"]["code"] == "unsupported_media_type"
        for origin, kind in ((evil, "text/plain"), (evil, "application/json"), ("null", "application/json"),
                             (page + ".evil.example", "application/json")):
            r = httpx.post(url, content=body, headers={"Origin": origin, "Content-Type": kind})
            assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed", (origin, r.text)
            assert "access-control-allow-origin" not in r.headers
        assert httpx.get(f"{s.base_url}/models", headers={"Origin": evil}).status_code == 403
        preflight = {"Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}
        refused = httpx.options(url, headers={"Origin": evil, **preflight})
        assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers
        # the server's own origin is no cross-site request
        own = httpx.post(url, content=body, headers={"Origin": s.url, "Content-Type": "application/json"})
        assert own.status_code == 200
        # the allowed page: a preflight, then the calls, with the openai client as a browser app sends them
        ok = httpx.options(url, headers={"Origin": page, **preflight})
        assert ok.status_code == 204 and ok.headers["access-control-allow-origin"] == page
        assert "POST" in ok.headers["access-control-allow-methods"]
        assert "x-stainless-os" in ok.headers["access-control-allow-headers"] and "Origin" in ok.headers["vary"]
        browser = openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0, default_headers={"Origin": page})
        raw = browser.chat.completions.with_raw_response.create(model="tiny", messages=USER, max_tokens=2)
        assert raw.headers["access-control-allow-origin"] == page and raw.parse().choices
        assert browser.models.with_raw_response.list().headers["access-control-allow-origin"] == page
        with pytest.raises(openai.NotFoundError) as e:  # errors reach the page too
            browser.chat.completions.create(model="absent", messages=USER)
        assert e.value.response.headers["access-control-allow-origin"] == page
    with pytest.raises(BadRequest, match="--cors"):
        Server(ModelPool(["tiny"]), port=0, config=ServerConfig(cors_origins=["localhost:3000"]))
    assert build_parser().parse_args(["serve", "--cors", page, "--cors", evil]).cors == [page, evil]


def test_disconnect_cancels_the_sequence(server, models):
    body = {"model": "tiny", "messages": USER, "max_tokens": 4000, "stream": True, "temperature": 0.8,
            "logit_bias": ENDLESS}
    before = metric(server.url, "ownlm_sequences_cancelled_total")
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert metric(server.url, "ownlm_running_sequences") >= 1
    deadline = time.monotonic() + 10
    while metric(server.url, "ownlm_running_sequences") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server.url, "ownlm_running_sequences") == 0
    assert metric(server.url, "ownlm_sequences_cancelled_total") >= before + 1
    generated = metric(server.url, "ownlm_generation_tokens_total")
    time.sleep(0.5)
    assert metric(server.url, "ownlm_generation_tokens_total") == generated
    # 200 clients that leave mid-stream: some before their sequence has started, some before the
    # answer's first byte (hanging up once the request is sent), the others after a token or two
    with serve(models, ("tiny",), max_running=8, max_queue=256, max_loaded=1) as s:
        client = openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0, timeout=60)
        raw = json.dumps(body).encode()
        request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{s.port}\r\nContent-Type: "
                   f"application/json\r\nContent-Length: {len(raw)}\r\n\r\n").encode() + raw

        def leave(i: int) -> None:
            if i % 4 == 3:  # every 20th hangs up halfway through its body
                with socket.create_connection(("127.0.0.1", s.port)) as sock:
                    sock.sendall(request[:-20] if i % 20 == 3 else request)
                return
            stream = client.chat.completions.create(model="tiny", messages=USER, max_tokens=4000, stream=True,
                                                    temperature=0.8, logit_bias=ENDLESS)
            chunks = iter(stream)
            for _ in range(1 + i % 4):  # the role chunk; then a token or two
                next(chunks)
            stream.close()

        with cf.ThreadPoolExecutor(40) as pool:
            list(pool.map(leave, range(200)))
        assert _counted(s.url, "/v1/chat/completions", 200) == {"200": 190, "499": 10}  # hang-ups may lag
        _settle(s.url)
        assert metric(s.url, "ownlm_sequences_cancelled_total") == 190
        generated = metric(s.url, "ownlm_generation_tokens_total")
        time.sleep(0.3)
        assert metric(s.url, "ownlm_generation_tokens_total") == generated


def _settle(url: str, within: float = 10) -> None:
    """Wait until nothing runs or waits on the server's engines; fail if that does not happen."""
    deadline = time.monotonic() + within
    while metric(url, "ownlm_running_sequences") + metric(url, "ownlm_queue_depth") > 0:
        assert time.monotonic() < deadline, httpx.get(f"{url}/metrics").text
        time.sleep(0.05)


def _counted(url: str, path: str, total: int, within: float = 10) -> dict[str, float]:
    """{status: count} of a route's requests, once `total` of them have been counted (a request
    is counted when its response has ended, which may be after its client has seen the last byte)."""
    deadline = time.monotonic() + within
    while True:
        counts = {k[1]: v for k, v in _requests(url).items() if k[0] == path}
        if sum(counts.values()) >= total:
            return counts
        assert time.monotonic() < deadline, counts
        time.sleep(0.05)


def _requests(url: str) -> dict[tuple[str, str], float]:
    """ownlm_requests_total as {(path label, status): count}."""
    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        m = re.fullmatch(r'ownlm_requests_total\{path="(.*)",status="(\d+)"\} (\S+)', line)
        if m:
            out[(m[1], m[2])] = float(m[3])
    return out


def test_metrics_exposition(server, client):
    client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, temperature=0)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("ownlm_requests_total", "ownlm_prompt_tokens_total", "ownlm_generation_tokens_total",
                 "ownlm_queue_depth", "ownlm_running_sequences", "ownlm_time_to_first_token_seconds_bucket",
                 "ownlm_inter_token_latency_seconds_bucket"):
        assert name in text
    assert 'ownlm_requests_total{path="/v1/chat/completions",status="200"}' in text
    assert 'status="404"' in text


def test_metrics_label_routes_not_paths(server):
    """Requests are counted by route template, every unknown path under one label: 20,000 keyless
    requests to made-up paths once grew /metrics to 81 MB."""
    with httpx.Client(base_url=server.url) as http:
        http.get("/nowhere"), http.get("/v1/models/absent")
        size, before = len(http.get("/metrics").text), _requests(server.url)
        for i in range(300):
            http.get(f"/nowhere-{i}/x")
            http.get(f"/v1/models/absent-{i}")
            http.post(f"/v1/new-{i}", json={})
        text = http.get("/metrics").text
    after = _requests(server.url)
    assert len(text) - size < 200 and "nowhere-" not in text and "absent-" not in text and "new-" not in text
    assert set(after) == set(before)  # the label sets seen before: counts grow, the exposition does not
    assert after[("unmatched", "404")] == before[("unmatched", "404")] + 600
    assert after[("/v1/models/{model_name}", "404")] == before[("/v1/models/{model_name}", "404")] + 300


def test_eight_concurrent_streams_get_their_solo_tokens(client):
    check_eight_concurrent_streams(client, "tiny")


def check_eight_concurrent_streams(client, model: str):
    prompts = ["Name a fruit.", "What is 2+2?", "Say hello in French.", "Name a planet.",
               "Give me a color.", "Count to five.", "Name an ocean.", "What do cats eat?"]

    def ask(i: int) -> tuple[str, str | None]:
        kw = {"temperature": 0} if i % 2 == 0 else {"temperature": 0.9, "seed": 100 + i}
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompts[i]}],
                                                max_tokens=32, stream=True, **kw)
        parts, finish = [], None
        for c in stream:
            parts.append(c.choices[0].delta.content or "")
            finish = c.choices[0].finish_reason or finish
        return "".join(parts), finish

    alone = [ask(i) for i in range(8)]
    barrier = threading.Barrier(8)

    def together(i: int):
        barrier.wait()
        return ask(i)

    with cf.ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(together, range(8)))
    assert concurrent == alone


def test_overload_gives_429_and_the_server_keeps_serving(models):
    with serve(models, max_running=1, max_queue=0, max_loaded=1) as s:
        body = {"model": "tiny", "messages": USER, "max_tokens": 4000, "stream": True, "temperature": 1.0,
                "logit_bias": ENDLESS}  # it runs until closed
        with httpx.stream("POST", f"{s.base_url}/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()  # kept referenced: a dropped iterator closes the connection
            next(lines)
            busy = httpx.post(f"{s.base_url}/chat/completions",
                              json={"model": "tiny", "messages": USER, "max_tokens": 2})
            assert busy.status_code == 429 and int(busy.headers["Retry-After"]) >= 1
            assert busy.json()["error"]["type"] == "rate_limit_error"
            other = httpx.post(f"{s.base_url}/chat/completions",
                               json={"model": "strict", "messages": USER, "max_tokens": 2}, timeout=60)
            assert other.status_code == 503 and set(other.json()["error"]) == {"message", "type", "param", "code"}
        for _ in range(100):  # the closed stream frees its slot within a decode step or so
            ok = httpx.post(f"{s.base_url}/chat/completions", json={"model": "tiny", "messages": USER, "max_tokens": 2},
                            timeout=60)
            if ok.status_code != 429:
                break
            time.sleep(0.05)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2
        # more choices than the server ever runs and queues at once: a 400, not a 429 to retry forever
        never = httpx.post(f"{s.base_url}/chat/completions", timeout=60,
                           json={"model": "tiny", "messages": USER, "max_tokens": 2, "n": 2})
        assert never.status_code == 400 and never.json()["error"]["param"] == "n"


def _rss() -> int:
    return int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmRSS:")).split()[1]) * 1024


def test_64_concurrent_streams_get_answers_or_429(models):
    """A burst of 64 streaming clients at once on a small engine (4 running, 12 queued): each gets
    its whole answer or a 429, the server stays up, and then nothing is left running or queued; a
    second burst leaves memory where the first did (nothing kept per request)."""
    with serve(models, ("tiny",), max_running=4, max_queue=12, max_loaded=1) as s:
        client = openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0, timeout=120)
        cancelled = metric(s.url, "ownlm_sequences_cancelled_total")

        def burst() -> list[str]:
            barrier = threading.Barrier(64)

            def one(i: int) -> str:
                barrier.wait()
                try:
                    stream = client.chat.completions.create(model="tiny", messages=USER, max_tokens=24, stream=True,
                                                            temperature=1.0, seed=i, logit_bias=ENDLESS)
                    finish = [c.choices[0].finish_reason for c in stream if c.choices][-1]
                    return f"answer {finish}"
                except openai.RateLimitError:
                    return "429"

            with cf.ThreadPoolExecutor(64) as pool:
                return list(pool.map(one, range(64)))

        results = burst()
        answered = results.count("answer length")
        assert answered + results.count("429") == 64, results
        assert answered >= 16 and "429" in results  # the first 16 always fit; a burst of 64 cannot all
        assert _counted(s.url, "/v1/chat/completions", 64) == {"200": answered, "429": 64 - answered}
        _settle(s.url)
        assert metric(s.url, "ownlm_sequences_cancelled_total") == cancelled
        after_one = _rss()
        again = burst()
        _settle(s.url)
        assert again.count("answer length") + again.count("429") == 64
        assert _rss() < after_one + (64 << 20)  # the second burst kept nothing the first did not
        assert client.chat.completions.create(model="tiny", messages=USER, max_tokens=2).choices


def test_embeddings_share_admission_and_the_time_limit(models, monkeypatch):
    """Embeddings queue with generation under one limit (429 beyond it), and stop at the request
    time limit (503) instead of running on: three 8k-token inputs once ran 201 s, never refused."""
    real = ownlm.server.pool.embed
    asked: list[float] = []

    def slow(model, batch, dimensions=None, stop=None):  # every chunk takes 150 ms longer: 47 take 7 s
        def slow_stop() -> bool:
            asked.append(time.monotonic())
            time.sleep(0.15)
            return stop()
        return real(model, batch, dimensions, stop=slow_stop, chunk=64)

    # a 4 s limit: long enough that the endless stream still holds its slot when the embedding asks
    # for one on a busy machine, short enough that the slow embedding runs past it
    with serve(models, ("tiny",), ServerConfig(request_timeout=4.0), max_running=1, max_queue=0, max_loaded=1) as s:
        client = openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0, timeout=60)
        endless = {"model": "tiny", "messages": USER, "max_tokens": 4000, "stream": True, "logit_bias": ENDLESS}
        with httpx.stream("POST", f"{s.base_url}/chat/completions", json=endless, timeout=60) as r:
            lines = r.iter_lines()  # kept referenced: a dropped iterator closes the connection
            next(lines)
            with pytest.raises(openai.RateLimitError):  # the one slot is taken by generation
                client.embeddings.create(model="tiny", input="hello")
        _settle(s.url)
        monkeypatch.setattr(ownlm.server.pool, "embed", slow)
        with cf.ThreadPoolExecutor(1) as pool:
            job = pool.submit(_post, f"{s.base_url}/embeddings", {"model": "tiny", "input": [7] * 3000})  # 47 chunks
            deadline = time.monotonic() + 10
            while metric(s.url, "ownlm_running_sequences") < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            with pytest.raises(openai.RateLimitError):  # the one slot is taken by an embedding
                client.chat.completions.create(model="tiny", messages=USER, max_tokens=2)
            with pytest.raises(openai.RateLimitError):
                client.embeddings.create(model="tiny", input="hello")
            timed_out = job.result()
        assert timed_out.status_code == 503 and timed_out.json()["error"]["code"] == "timeout"
        assert timed_out.headers["x-should-retry"] == "false"  # the SDKs would run it twice more
        _settle(s.url, within=2)
        n = len(asked)
        time.sleep(0.3)
        assert len(asked) == n < 47  # it stopped at the limit, not after all 3000 tokens
        assert len(client.embeddings.create(model="tiny", input="hello").data) == 1
        assert client.chat.completions.create(model="tiny", messages=USER, max_tokens=2).choices


def test_api_keys(models, tmp_path, monkeypatch):
    keyfile = tmp_path / "keys"
    keyfile.write_text("# one per line\nsecond-key-abcdefgh\n")
    monkeypatch.setenv("OWNLM_API_KEYS", KEY)
    keys = api_keys(argparse.Namespace(api_key=None, api_key_file=str(keyfile)))
    assert keys == [KEY, "second-key-abcdefgh"]
    with serve(models, ("tiny",), ServerConfig(api_keys=keys)) as s:
        url = f"{s.base_url}/chat/completions"
        body = {"model": "tiny", "messages": USER, "max_tokens": 2}
        assert httpx.post(url, json=body).status_code == 401
        wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer wrong-key-123456"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{s.url}/health").status_code == 200
        assert httpx.get(f"{s.url}/metrics").status_code == 401
        for key in keys:
            c = openai.OpenAI(base_url=s.base_url, api_key=key, max_retries=0)
            assert c.chat.completions.create(model="tiny", messages=USER, max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.base_url, api_key="nope-nope-nope", max_retries=0).models.list()
    with pytest.raises(BadRequest, match="at least 8"):
        Server(ModelPool(["tiny"]), config=ServerConfig(api_keys=["short"]))


def test_timeout_keep_alive_and_reload(models):
    with serve(models, ("tiny",), ServerConfig(request_timeout=0.3), keep_alive=0.5) as s:
        endless = {"model": "tiny", "messages": USER, "max_tokens": 4000, "logit_bias": ENDLESS}
        r = httpx.post(f"{s.base_url}/chat/completions", json=endless, timeout=60)
        assert r.status_code == 503 and "time limit" in r.json()["error"]["message"]
        lines = []
        with httpx.stream("POST", f"{s.base_url}/chat/completions", json={**endless, "stream": True}, timeout=60) as st:
            lines = [line for line in st.iter_lines() if line.startswith("data: ")]
        assert st.status_code == 200 and '"error"' in lines[-1]  # mid-stream: an error event
        deadline = time.monotonic() + 10
        while httpx.get(f"{s.url}/health").json()["models_loaded"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert httpx.get(f"{s.url}/health").json()["models_loaded"] == []  # unloaded after the keep-alive
        ok = httpx.post(f"{s.base_url}/chat/completions", json={"model": "tiny", "messages": USER, "max_tokens": 3},
                        timeout=60)
        assert ok.status_code == 200 and httpx.get(f"{s.url}/health").json()["models_loaded"] == ["tiny"]


# --- a real `ownlm serve` process --------------------------------------------------------------------

@pytest.fixture(scope="module")
def home(tmp_path_factory, folders):
    """A store with the tiny model, for `ownlm serve` processes."""
    base = tmp_path_factory.mktemp("serve")
    manage.import_path(folders["tiny"], name="tiny", store=Store(base / "home"), quiet=True)
    return base / "home"


def test_non_loopback_needs_keys(home):
    r = subprocess.run([sys.executable, "-m", "ownlm.cli.main", "serve", "tiny", "--host", "0.0.0.0"],
                       env={**os.environ, "OWNLM_HOME": str(home), "OWNLM_API_KEYS": ""}, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "without API keys" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(BadRequest, match="without API keys"):
        Server(ModelPool(["tiny"]), host="0.0.0.0")


def test_cli_keys_ready_line_and_ctrl_c(home, tmp_path):
    """The flags reach the server: keys from a file and the environment, --preload, --json's ready
    line; SIGINT (Ctrl-C) stops it cleanly with exit code 0."""
    keyfile = tmp_path / "keys"
    keyfile.write_text("# one per line\nsecond-key-abcdefgh\n")
    s = server_util.Server(home, ["tiny", "--api-key-file", str(keyfile), "--preload", "--json"],
                           env={"OWNLM_API_KEYS": KEY})
    try:
        deadline = time.monotonic() + 20  # the port answers a moment before the line is printed
        while not (lines := [ln for ln in s.log.read_text().splitlines() if ln.startswith("{")]):
            assert time.monotonic() < deadline, s.log.read_text()
            time.sleep(0.05)
        ready = json.loads(lines[0])
        assert ready == {"url": f"{s.base}/v1", "models": ["tiny"], "auth": True, "preloaded": ["tiny"]}
        assert httpx.get(f"{s.base}/v1/models").status_code == 401
        for key in (KEY, "second-key-abcdefgh"):
            c = openai.OpenAI(base_url=f"{s.base}/v1", api_key=key, max_retries=0)
            assert c.chat.completions.create(model="tiny", messages=USER, max_tokens=2).choices
        s.proc.send_signal(signal.SIGINT)
        assert s.proc.wait(20) == 0
    finally:
        s.stop()


# --- smollm2 end to end --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_server(home, smollm2_gguf):
    manage.import_path(smollm2_gguf, name="smollm2", link=True, store=Store(home), quiet=True)
    s = server_util.Server(home, ["smollm2", "--preload"])
    yield s
    assert s.stop() == 0  # SIGTERM: a clean stop


@pytest.fixture(scope="module")
def smollm2_client(smollm2_server):
    return openai.OpenAI(base_url=f"{smollm2_server.base}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return ownlm.load(str(smollm2_gguf))


@pytest.mark.smollm2
def test_smollm2_end_to_end(smollm2_client, smollm2):
    assert [m.id for m in smollm2_client.models.list().data] == ["smollm2"]
    assert smollm2_client.models.retrieve("smollm2").object == "model"
    check_chat_equals_the_engine(smollm2_client, smollm2, "smollm2")
    check_stream_with_usage(smollm2_client, "smollm2")
    check_json_schemas(smollm2_client, "smollm2", SCHEMAS[:6])


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                             "parameters": {"type": "object", "properties": {
                                                 "city": {"type": "string", "maxLength": 20},
                                                 "unit": {"enum": ["celsius", "fahrenheit"]}},
                                                 "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers",
                                         "parameters": {"type": "object", "properties": {
                                             "a": {"type": "integer", "minimum": -99, "maximum": 99},
                                             "b": {"type": "integer", "minimum": -99, "maximum": 99}},
                                             "required": ["a", "b"], "additionalProperties": False}}}


@pytest.mark.smollm2
def test_tools_round_trip(smollm2_client):
    """On smollm2: a random model, free to call tools again and again, rarely stops."""
    client, model = smollm2_client, "smollm2"
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model=model, messages=msgs, tools=[WEATHER, ADD], tool_choice="required",
                                       temperature=0, max_tokens=120)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call")
    spec = {"get_weather": WEATHER, "add": ADD}[call.function.name]["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), spec)
    # the named function is the one called
    named = client.chat.completions.create(model=model, messages=msgs, tools=[WEATHER, ADD], temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "add"}},
                                           max_tokens=120)
    assert [c.function.name for c in named.choices[0].message.tool_calls] == ["add"]
    jsonschema.validate(json.loads(named.choices[0].message.tool_calls[0].function.arguments),
                        ADD["function"]["parameters"])
    # the result goes back through the chat template and the model answers in text
    follow = msgs + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}]
    answer = client.chat.completions.create(model=model, messages=follow, tools=[WEATHER, ADD], tool_choice="none",
                                            temperature=0, max_tokens=20)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    # streamed tool calls keep a stable index and assemble to valid arguments
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(model=model, messages=msgs, tools=[WEATHER], tool_choice="required",
                                                temperature=0, max_tokens=120, stream=True):
        for d in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
            entry["name"] += d.function.name or ""
            entry["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0] and calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])


@pytest.mark.smollm2
def test_tools_beside_a_response_format(smollm2_client):
    """tools and response_format in one request (LangChain's agents send both): the answer is tool
    calls, or else JSON of the format's schema, never free text."""
    client, model = smollm2_client, "smollm2"
    person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": person}}
    for msgs in ([{"role": "user", "content": "Describe a person as JSON."}],
                 [{"role": "user", "content": "What is the weather in Paris?"}]):
        r = client.chat.completions.create(model=model, messages=msgs, tools=[WEATHER], response_format=fmt,
                                           temperature=0, max_tokens=120)
        m = r.choices[0].message
        if m.tool_calls:
            assert r.choices[0].finish_reason == "tool_calls" and m.content is None
            jsonschema.validate(json.loads(m.tool_calls[0].function.arguments), WEATHER["function"]["parameters"])
        else:
            assert r.choices[0].finish_reason == "stop"
            jsonschema.validate(json.loads(m.content), person)
    # tool_choice required: calls, whatever the format
    r = client.chat.completions.create(model=model, messages=msgs, tools=[WEATHER], response_format=fmt,
                                       tool_choice="required", temperature=0, max_tokens=120)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.tool_calls[0].function.name == \
        "get_weather"


# --- the access log ------------------------------------------------------------------------------------

def _lines(lines: list[str], n: int, within: float = 10) -> list[str]:
    """The log once it has `n` lines (a line is written just after its response has ended)."""
    deadline = time.monotonic() + within
    while len(lines) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)  # and no more
    assert len(lines) == n, lines
    return lines


def test_access_log_one_json_line_per_request(models):
    """A line per request, every route and refusal alike, with the response's own token counts;
    a stream's line comes when it ends, with its final counts."""
    lines: list[str] = []
    config = ServerConfig(api_keys=[KEY], access_log=lines.append, log_format="json")
    with serve(models, ("tiny",), config, max_running=1, max_queue=0) as s, \
            httpx.Client(base_url=s.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
        # greedy: a sampled first token may be the end of text (CI once saw 0 completion tokens)
        chat = {"model": "tiny", "messages": USER, "max_tokens": 5, "temperature": 0}

        def last(n: int, route: str, status: int, model: str | None = "tiny") -> dict:
            rec = json.loads(_lines(lines, n)[-1])
            assert set(rec) == {"time", "client", "method", "route", "status", "ms", "model", "prompt_tokens",
                                "completion_tokens", "error"}
            assert (rec["route"], rec["status"], rec["model"]) == (route, status, model), rec
            assert rec["client"].startswith("127.0.0.1:") and rec["ms"] >= 0
            assert datetime.datetime.fromisoformat(rec["time"]).utcoffset() is not None
            assert (rec["error"] is None) == (status < 400), rec
            return rec

        usage = http.post("/chat/completions", json=chat).json()["usage"]
        rec = last(1, "/v1/chat/completions", 200)
        assert rec["method"] == "POST" and rec["prompt_tokens"] == usage["prompt_tokens"] > 0
        assert rec["completion_tokens"] == usage["completion_tokens"] > 0

        with http.stream("POST", "/chat/completions",
                         json={**chat, "stream": True, "stream_options": {"include_usage": True}}) as r:
            events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
        rec = last(2, "/v1/chat/completions", 200)
        assert (rec["prompt_tokens"], rec["completion_tokens"]) == (events[-1]["usage"]["prompt_tokens"],
                                                                     events[-1]["usage"]["completion_tokens"])

        usage = http.post("/embeddings", json={"model": "tiny", "input": ["a b c", "d"]}).json()["usage"]
        rec = last(3, "/v1/embeddings", 200)
        assert (rec["prompt_tokens"], rec["completion_tokens"]) == (usage["prompt_tokens"], 0)

        assert httpx.post(f"{s.base_url}/chat/completions", json=chat).status_code == 401  # no key
        assert "API key" in last(4, "/v1/chat/completions", 401, None)["error"]

        assert http.post("/chat/completions", json={**chat, "model": "nope"}).status_code == 404
        rec = last(5, "/v1/chat/completions", 404, "nope")
        assert "nope" in rec["error"] and rec["prompt_tokens"] is None

        assert http.get(f"{s.url}/v1/models/tiny").status_code == 200
        last(6, "/v1/models/{model_name}", 200)
        assert http.get(f"{s.url}/no/such/path").status_code == 404
        assert last(7, "unmatched", 404, None)["error"] == "no such route"
        assert http.get(f"{s.url}/health").status_code == 200
        last(8, "/health", 200, None)

        endless = {**chat, "max_tokens": 4000, "stream": True, "temperature": 1.0, "logit_bias": ENDLESS}
        with http.stream("POST", "/chat/completions", json=endless) as r:
            stream_lines = r.iter_lines()
            next(stream_lines)
            assert http.post("/chat/completions", json=chat).status_code == 429
            assert "capacity" in last(9, "/v1/chat/completions", 429)["error"]
        rec = json.loads(_lines(lines, 10)[-1])  # the stream the client closed: what it had generated
        assert rec["status"] == 200 and rec["completion_tokens"] >= 1


def test_access_log_text_lines(models):
    lines: list[str] = []
    with serve(models, ("tiny",), ServerConfig(access_log=lines.append)) as s:
        usage = httpx.post(f"{s.base_url}/chat/completions", json={"model": "tiny", "messages": USER, "max_tokens": 3},
                           timeout=60).json()["usage"]
        httpx.post(f"{s.base_url}/chat/completions", json={"model": "no such\nmodel", "messages": USER}, timeout=60)
        ok, missing = _lines(lines, 2)
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d 127\.0\.0\.1:\d+ POST /v1/chat/completions"
    assert re.fullmatch(stamp + rf" 200 \d+ms model=tiny prompt_tokens={usage['prompt_tokens']} "
                        rf"completion_tokens={usage['completion_tokens']}", ok), ok
    assert re.fullmatch(stamp + r' 404 \d+ms model="no such\\nmodel" error=".*"', missing), missing
    with pytest.raises(BadRequest, match="log format"):
        Server(ModelPool(["tiny"]), config=ServerConfig(log_format="xml"))


def test_port_in_use_is_one_line(home):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "ownlm.cli.main", "serve", "tiny", "--port", str(port)],
                           env={**os.environ, "OWNLM_HOME": str(home), "OWNLM_OFFLINE": "1", "OWNLM_API_KEYS": ""},
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert r.stderr.splitlines() == [f"error: port {port} on 127.0.0.1 is in use (Address already in use): stop "
                                     "what is listening there or pick another port with --port"], r.stderr

"""Ollama's native API (/api/...) as Ollama's own clients see it: the official `ollama` Python
client against a real `ownlm serve` process, every answer checked against the engine itself."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import jsonschema
import ollama
import pytest
from tokenizers import Tokenizer

import ownlm
import server_util
from conftest import CHATML, build_hf_model, build_tokenizer
from ownlm import manage
from ownlm.engine.constraints import TOOL_CLOSE, TOOL_OPEN
from ownlm.server.http import APIError
from ownlm.server.ollama import API_VERSION, Message, _message, _tool_calls, keep_alive_seconds
from ownlm.server.runs import ThinkSplitter, split_thinking
from ownlm.store.store import Store

KEY = "ollama-key-0123456789"
USER = [{"role": "user", "content": "Name three colors."}]
GREEDY = {"temperature": 0, "num_predict": 12}
FIM = ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"]
# a thinking model's template as Qwen 3's and DeepSeek-R1's work: an assistant turn opens its trace
# (<think>) unless enable_thinking is false, which writes an empty one; earlier traces are shown
THINKING = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.reasoning_content %}<think>\n"
            "{{ m.reasoning_content }}\n</think>\n\n{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
            "enable_thinking is false %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}{% endif %}")
TOOLS_CHATML = "{% if tools %}{{ '<|im_start|>system\nYou may call tools.<|im_end|>\n' }}{% endif %}" + CHATML
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                             "parameters": {"type": "object", "properties": {
                                                 "city": {"type": "string", "maxLength": 20}},
                                                 "required": ["city"]}}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """"tiny": a random Llama with a plain ChatML template; "coder": one whose vocabulary has
    fill-in-the-middle tokens and whose template mentions tools."""
    base = tmp_path_factory.mktemp("ollama-models")
    tiny = build_hf_model(base / "tiny", "llama", max_position_embeddings=4096)
    probe = base / "probe"
    probe.mkdir()
    vocab = build_tokenizer(probe)
    coder = build_hf_model(base / "coder", "llama", seed=5, vocab_size=vocab + len(FIM), max_position_embeddings=1024)
    tk = Tokenizer.from_file(str(coder / "tokenizer.json"))
    tk.add_special_tokens(FIM)
    tk.save(str(coder / "tokenizer.json"))
    cfg = json.loads((coder / "tokenizer_config.json").read_text())
    (coder / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TOOLS_CHATML}))
    thinker = build_hf_model(base / "thinker", "llama", seed=9, max_position_embeddings=1024)
    cfg = json.loads((thinker / "tokenizer_config.json").read_text())
    (thinker / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": THINKING}))
    bos = shutil.copytree(tiny, base / "bos")  # tiny, its tokenizer starting every text with a BOS
    cfg = json.loads((bos / "tokenizer_config.json").read_text())
    (bos / "tokenizer_config.json").write_text(json.dumps({**cfg, "bos_token": "<|endoftext|>", "add_bos_token": True}))
    return {"tiny": tiny, "coder": coder, "thinker": thinker, "bos": bos}


@pytest.fixture(scope="module")
def home(tmp_path_factory, folders, smollm2_gguf) -> Path:
    home = tmp_path_factory.mktemp("ollama-serve") / "home"
    store = Store(home)
    for name, path in folders.items():
        manage.import_path(path, name=name, store=store, quiet=True)
    manage.import_path(smollm2_gguf, name="smollm2", link=True, store=store, quiet=True)
    manage.create_preset("terse", "tiny", system="Answer in one word.", parameters={"temperature": 0.2},
                         store=store)
    return home


@pytest.fixture(scope="module")
def server(home):
    s = server_util.Server(home, ["--max-loaded", "4"])
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server) -> ollama.Client:
    return ollama.Client(host=server.base, timeout=120)


@pytest.fixture(scope="module")
def lms(folders, smollm2_gguf):
    return {"tiny": ownlm.load(str(folders["tiny"])), "coder": ownlm.load(str(folders["coder"])),
            "thinker": ownlm.load(str(folders["thinker"])), "smollm2": ownlm.load(str(smollm2_gguf))}


def _durations(r) -> None:
    for name in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        value = getattr(r, name)
        assert isinstance(value, int) and value > 0, (name, value)
    assert r.total_duration >= r.eval_duration


def test_list_show_version(client, server, folders):
    names = [m.model for m in client.list().models]
    assert names == ["bos:latest", "coder:latest", "smollm2:latest", "terse:latest", "thinker:latest", "tiny:latest"]
    tiny = next(m for m in client.list().models if m.model == "tiny:latest")
    assert tiny.size > 0 and len(tiny.digest) == 64 and tiny.details.family == "llama"
    assert tiny.details.format == "safetensors" and tiny.modified_at is not None
    smol = next(m for m in client.list().models if m.model == "smollm2:latest")
    assert smol.details.quantization_level == "Q4_1" and smol.details.parameter_size == "135M"

    info = client.show("tiny")
    assert info.template == CHATML
    assert info.capabilities == ["completion"]  # no FIM tokens, a template without tools; not an embedding model
    assert info.details.family == "llama" and info.modelinfo["general.architecture"] == "llama"
    assert info.modelinfo["llama.context_length"] == 4096
    cfg = json.loads((folders["tiny"] / "config.json").read_text())
    assert info.modelinfo["general.basename"] == "tiny"
    assert info.modelinfo["llama.attention.head_count"] == cfg["num_attention_heads"]
    assert info.modelinfo["llama.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert info.modelinfo["llama.block_count"] == cfg["num_hidden_layers"]
    assert info.modelinfo["llama.feed_forward_length"] == cfg["intermediate_size"]
    assert info.modelinfo["llama.embedding_length"] == cfg["hidden_size"]
    coder = client.show("coder:latest")
    assert coder.template == TOOLS_CHATML and set(coder.capabilities) == {"completion", "tools", "insert"}
    terse = client.show("terse")
    assert "temperature" in terse.parameters and "0.2" in terse.parameters
    assert terse.details.parent_model == "tiny:latest"
    raw = httpx.post(f"{server.base}/api/show", json={"model": "terse"}, timeout=30).json()
    assert raw["system"] == "Answer in one word." and raw["parameters"] == terse.parameters
    assert 'SYSTEM """Answer in one word."""' in terse.modelfile
    # the Ollama API level served (clients gate features on it), ownlm's own version beside it
    assert httpx.get(f"{server.base}/api/version").json() == {"version": API_VERSION, "ownlm": ownlm.__version__}
    assert tuple(map(int, API_VERSION.split("."))) >= (0, 6, 4)  # VS Code's Copilot Chat refuses older ones
    for path in ("/api/version", "/api/tags"):  # as Ollama registers them
        assert httpx.head(f"{server.base}{path}", timeout=30).status_code == 200


@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_chat_equals_the_engine(client, lms, model):
    lm = lms[model]
    ref = lm.chat(USER, temperature=0, max_tokens=12)
    r = client.chat(model, messages=USER, options=GREEDY, stream=False)
    assert r.message.role == "assistant" and r.message.content == ref.text and r.done
    assert r.eval_count == len(ref.token_ids) and r.done_reason == ref.finish_reason
    assert r.prompt_eval_count == len(lm.encode(lm.chat_prompt(USER)))
    assert r.model == model
    _durations(r)
    parts = list(client.chat(model, messages=USER, options=GREEDY, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == ref.text
    assert parts[-1].eval_count == r.eval_count and parts[-1].prompt_eval_count == r.prompt_eval_count
    _durations(parts[-1])


def test_options_reach_the_sampler(client, lms):
    lm = lms["tiny"]
    opts = {"temperature": 0.9, "top_k": 5, "top_p": 0.8, "min_p": 0.05, "seed": 7, "num_predict": 10,
            "repeat_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.25}
    ref = lm.chat(USER, temperature=0.9, top_k=5, top_p=0.8, min_p=0.05, seed=7, max_tokens=10,
                  repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25)
    assert client.chat("tiny", messages=USER, options=opts).message.content == ref.text
    # a stop string ends the text before it
    full = lm.chat(USER, temperature=0, max_tokens=20).text
    stop = full[5:8]
    r = client.chat("tiny", messages=USER, options={"temperature": 0, "num_predict": 20, "stop": [stop]})
    assert r.message.content == full[:full.index(stop)] and r.done_reason == "stop"
    # num_ctx bounds prompt + answer
    n = len(lm.encode(lm.chat_prompt(USER)))
    r = client.chat("tiny", messages=USER, options={"temperature": 0, "num_predict": 50, "num_ctx": n + 3})
    assert r.eval_count == 3 and r.message.content == lm.chat(USER, temperature=0, max_tokens=3).text


def test_a_conversation_longer_than_num_ctx_loses_its_oldest_turns(client, lms):
    """As Ollama: the oldest turns dropped until the rest fits, system messages and the last
    message kept, the rest starting at a user turn (templates that want turns to alternate refuse
    others); truncate: false refuses instead."""
    lm = lms["tiny"]
    convo = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        convo += [{"role": "user", "content": f"Tell me fact number {i} about the sea."},
                  {"role": "assistant", "content": f"Fact {i}: the sea is deep and wide and salty."}]
    convo.append({"role": "user", "content": "And one more?"})
    n = len(lm.encode(lm.chat_prompt(convo)))
    ctx = n - 30  # room for about the last three turns less
    fits = next(f for f in range(1, len(convo)) if convo[f]["role"] == "user"
                and len(lm.encode(lm.chat_prompt([convo[0], *convo[f:]]))) < ctx)
    kept = [convo[0], *convo[fits:]]
    assert 1 < fits < len(convo) - 1
    r = client.chat("tiny", messages=convo, options={**GREEDY, "num_ctx": ctx, "num_predict": 4})
    assert r.prompt_eval_count == len(lm.encode(lm.chat_prompt(kept)))
    assert r.message.content == lm.chat(kept, temperature=0, max_tokens=4).text
    r = httpx.post(f"{client._client.base_url}/api/chat", timeout=60, json={  # (the client has no such argument)
        "model": "tiny", "messages": convo, "stream": False, "truncate": False, "options": {**GREEDY, "num_ctx": ctx}})
    assert r.status_code == 400 and "context" in r.json()["error"]


def test_generate_raw_templated_and_context(client, lms):
    lm = lms["tiny"]
    prompt = "The quick brown fox"
    ref = lm.generate(prompt, temperature=0, max_tokens=12)
    r = client.generate("tiny", prompt, raw=True, options=GREEDY)
    assert r.response == ref.text and r.eval_count == 12 and r.prompt_eval_count == len(lm.encode(prompt))
    _durations(r)
    assert list(r.context) == lm.encode(prompt) + ref.token_ids
    streamed = list(client.generate("tiny", prompt, raw=True, options=GREEDY, stream=True))
    assert "".join(p.response for p in streamed) == ref.text and streamed[-1].done
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
    templated = client.generate("tiny", prompt, system="Be brief.", options=GREEDY)
    assert templated.response == lm.chat(msgs, temperature=0, max_tokens=12).text


def test_logprobs_equal_the_models_own(server, lms):
    """logprobs / top_logprobs (Ollama's Logprob: token, logprob, bytes, top_logprobs): each
    generated token's log-probability as the model's log-softmax gives it, streamed or not."""
    import torch

    lm = lms["tiny"]
    prompt = "The quick brown fox"
    body = {"model": "tiny", "prompt": prompt, "raw": True, "stream": False, "logprobs": True, "top_logprobs": 3,
            "options": {"temperature": 0, "num_predict": 6}}
    r = httpx.post(f"{server.base}/api/generate", json=body, timeout=60).json()
    ids = lm.encode(prompt) + r["context"][len(lm.encode(prompt)):]
    with torch.inference_mode():
        direct = torch.log_softmax(lm.model(torch.tensor([ids]))[0].float(), -1)
    n = len(lm.encode(prompt))
    assert [x["token"] for x in r["logprobs"]] == [lm.tokenizer.decode([t]) for t in ids[n:]]
    for i, x in enumerate(r["logprobs"]):
        # (the server decodes token by token in bfloat16; this forward takes all rows at once)
        assert x["logprob"] == pytest.approx(float(direct[n - 1 + i, ids[n + i]]), abs=2e-2)
        assert len(x["top_logprobs"]) == 3 and x["top_logprobs"][0]["logprob"] == pytest.approx(x["logprob"])
        assert bytes(x["bytes"]) == lm.tokenizer.token_bytes(ids[n + i])
    with httpx.stream("POST", f"{server.base}/api/generate", json={**body, "stream": True}, timeout=60) as s:
        streamed = [x for line in s.iter_lines() if line for x in json.loads(line).get("logprobs", [])]
    assert streamed == r["logprobs"]
    chat = httpx.post(f"{server.base}/api/chat", json={"model": "tiny", "messages": USER, "stream": False,
                                                       "logprobs": True, "options": GREEDY}, timeout=60).json()
    assert len(chat["logprobs"]) == chat["eval_count"] and all(x["top_logprobs"] == [] for x in chat["logprobs"])
    assert "logprobs" not in httpx.post(f"{server.base}/api/generate", timeout=60,
                                        json={**body, "logprobs": False}).json()


def test_thinking_splitter_at_every_cut():
    """A trace between the tags at the answer's start (or from its start when the prompt opened
    it), white space after either tag dropped; the same split however the text comes in pieces."""
    cases = [("  <think>\nabc\n</think>\n\nHello", False, ("abc\n", "Hello")),
             ("\nabc</think>  Hi", True, ("abc", "Hi")), ("abc", True, ("abc", "")),
             ("Hello <think>x</think>", False, ("", "Hello <think>x</think>")), ("<thi", False, ("", "<thi")),
             ('<tool_call>{"name": "f"}</tool_call>', False, ("", '<tool_call>{"name": "f"}</tool_call>'))]
    for text, started, want in cases:
        assert split_thinking(text, started) == want
        for i in range(len(text) + 1):
            for j in range(i, len(text) + 1):
                s, got = ThinkSplitter(started), ["", ""]
                for part in (text[:i], text[i:j], text[j:]):
                    for k, out in enumerate(s.feed(part)):
                        got[k] += out
                for k, out in enumerate(s.finish()):
                    got[k] += out
                assert tuple(got) == want, (text, i, j)


def test_think_for_a_thinking_model(client, server, lms):
    """`think` as Ollama has it: on by default for a model whose template writes traces, the trace
    in message.thinking (generate: thinking) apart from the content; false renders the template
    with enable_thinking false; a model that does not think refuses think: true."""
    lm = lms["thinker"]
    assert "thinking" in client.show("thinker").capabilities and "thinking" not in client.show("tiny").capabilities
    on = lm.template.render(USER, add_generation_prompt=True)
    assert on.endswith("<think>\n")  # the answer starts inside its trace
    ref = lm.generate(on, temperature=0, max_tokens=12)  # a random model never closes it: all trace
    r = client.chat("thinker", messages=USER, options=GREEDY)
    assert r.message.thinking == ref.text.lstrip() and r.message.content == ""
    assert r.prompt_eval_count == len(lm.encode(on)) and r.eval_count == 12
    parts = list(client.chat("thinker", messages=USER, options=GREEDY, stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == r.message.thinking
    assert client.generate("thinker", USER[0]["content"], options=GREEDY).thinking == r.message.thinking
    off = lm.template.render(USER, add_generation_prompt=True, enable_thinking=False)
    r = client.chat("thinker", messages=USER, options=GREEDY, think=False)
    assert r.message.content == lm.generate(off, temperature=0, max_tokens=12).text and not r.message.thinking
    assert r.prompt_eval_count == len(lm.encode(off))
    # an earlier answer's trace goes back to the template as reasoning_content
    turns = [*USER, {"role": "assistant", "content": "Red.", "thinking": "Colors..."},
             {"role": "user", "content": "More"}]
    r = client.chat("thinker", messages=turns, options={**GREEDY, "num_predict": 1}, think=False)
    msgs = [*USER, {"role": "assistant", "content": "Red.", "reasoning_content": "Colors..."}, turns[2]]
    assert r.prompt_eval_count == len(lm.encode(lm.template.render(msgs, add_generation_prompt=True,
                                                                   enable_thinking=False)))
    with pytest.raises(ollama.ResponseError) as e:
        client.chat("tiny", messages=USER, options=GREEDY, think=True)
    assert e.value.status_code == 400 and "does not support thinking" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:  # raw bypasses the template that opens the trace
        client.generate("thinker", "Hi", raw=True, think=True, options=GREEDY)
    assert e.value.status_code == 400 and "raw" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:  # a format's grammar holds the answer from its first token
        client.chat("thinker", messages=USER, options=GREEDY, think=True, format="json")
    assert e.value.status_code == 400
    r = client.chat("thinker", messages=USER, options={**GREEDY, "num_predict": 3}, format="json")
    assert r.prompt_eval_count == len(lm.encode(off)) and not r.message.thinking  # thinking off there


def test_context_continues_without_a_second_bos(client, folders):
    """/api/generate's context: the next prompt's tokens follow it without the BOS its tokenizer
    puts at the start of a text (one BOS, at the start of the sequence, as Ollama has it)."""
    lm = ownlm.load(str(folders["bos"]))
    first = client.generate("bos", "The quick", raw=True, options=GREEDY)
    assert first.context[0] == lm.tokenizer.bos_id and first.context.count(lm.tokenizer.bos_id) == 1
    more = lm.tokenizer.encode(" brown fox", add_bos=False)
    r = client.generate("bos", " brown fox", raw=True, context=first.context, options=GREEDY)
    assert r.prompt_eval_count == len(first.context) + len(more)
    assert list(r.context[:r.prompt_eval_count]) == list(first.context) + more
    assert r.response == "".join(lm.stream_ids(list(first.context) + more, temperature=0, max_tokens=12))


def test_generate_suffix_fills_the_middle(client, lms):
    lm = lms["coder"]
    ref = lm.generate("<fim_prefix>def add(a, b):\n<fim_suffix>\nprint(add(2, 3))\n<fim_middle>",
                      temperature=0, max_tokens=10)
    r = client.generate("coder", "def add(a, b):\n", suffix="\nprint(add(2, 3))\n",
                        options={**GREEDY, "num_predict": 10})
    assert r.response == ref.text and r.eval_count == len(ref.token_ids)
    with pytest.raises(ollama.ResponseError) as e:
        client.generate("tiny", "def add(a, b):\n", suffix="\n", options=GREEDY)
    assert e.value.status_code == 400 and e.value.error == "'tiny' does not support insert"


def test_format_schema_and_json(client):
    r = client.generate("smollm2", "Describe a person as JSON.", format=PERSON,
                        options={"temperature": 0, "num_predict": 80})
    jsonschema.validate(json.loads(r.response), PERSON)
    assert r.done_reason == "stop"
    c = client.chat("smollm2", messages=[{"role": "user", "content": "Describe a person as JSON."}],
                    format="json", options={"temperature": 0, "num_predict": 150})
    assert c.done_reason == "stop" and isinstance(json.loads(c.message.content), dict)


def test_tools_and_tool_calls(client):
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat("smollm2", messages=msgs, tools=[WEATHER], options={"temperature": 0, "num_predict": 80})
    calls = r.message.tool_calls or []
    assert calls or r.message.content
    for call in calls:
        assert call.function.name == "get_weather"
        jsonschema.validate(dict(call.function.arguments), WEATHER["function"]["parameters"])
    streamed = list(client.chat("smollm2", messages=msgs, tools=[WEATHER], stream=True,
                                options={"temperature": 0, "num_predict": 80}))
    got = [c for p in streamed for c in (p.message.tool_calls or [])]
    assert [(c.function.name, dict(c.function.arguments)) for c in got] == \
        [(c.function.name, dict(c.function.arguments)) for c in calls]
    # a conversation with an earlier call and its result goes back through the template
    follow = msgs + [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": json.dumps({"temperature": 21}), "tool_name": "get_weather"}]
    answer = client.chat("coder", messages=follow, tools=[WEATHER], options={"temperature": 0, "num_predict": 5})
    assert answer.done and answer.eval_count >= 1
    assert _message(Message(role="tool", content="21", tool_call_id="call_1"), 0)["tool_call_id"] == "call_1"
    back = Message.model_validate({"role": "assistant", "tool_calls": [  # a call as this server gave it, sent back
        {"id": "call_1", "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}}}]})
    assert _message(back, 0)["tool_calls"] == [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris"}}}]


def test_tool_calls_carry_an_id_and_their_index():
    """Ollama's tool calls name an id and their place among the answer's calls (api.ToolCall);
    /api/chat writes them (streamed or not) from the answer's text through _tool_calls."""
    calls = [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"}), ("get_time", {})]
    text = "".join(f"{TOOL_OPEN}{json.dumps({'name': n, 'arguments': a})}{TOOL_CLOSE}\n" for n, a in calls)
    out = _tool_calls(text)
    assert [(c["function"]["index"], c["function"]["name"], c["function"]["arguments"]) for c in out] == \
        [(i, n, a) for i, (n, a) in enumerate(calls)]
    assert all(c["id"].startswith("call") for c in out) and len({c["id"] for c in out}) == 3
    assert len(_tool_calls(text + TOOL_OPEN + '{"name": "get_')) == 3  # a call still being written: not yet


def test_nulls_whole_floats_and_ollamas_sampling_defaults(server, lms):
    """Bodies as Go decodes them: a null is the field left out, an integer option may come as a
    whole float; with no sampling options, Ollama's defaults (temperature 0.8, top_k 40, top_p 0.9)
    unless the model's preset sets its own."""
    lm = lms["tiny"]
    body = {"model": "tiny", "messages": USER, "stream": False, "format": None, "keep_alive": None, "tools": None,
            "options": {"temperature": 0, "num_predict": 6.0, "num_ctx": 4096.0, "top_k": None}}
    r = httpx.post(f"{server.base}/api/chat", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["message"]["content"] == lm.chat(USER, temperature=0, max_tokens=6).text
    r = httpx.post(f"{server.base}/api/chat", json={**body, "options": {"num_predict": 6.5}}, timeout=60)
    assert r.status_code == 400 and "num_predict" in r.json()["error"]
    r = httpx.post(f"{server.base}/api/generate", json={"model": "tiny", "prompt": None, "stream": None}, timeout=60)
    assert r.status_code == 200 and r.json()["done_reason"] == "load"  # no prompt: a load, not streamed
    sampled = {"seed": 11, "num_predict": 10}
    got = httpx.post(f"{server.base}/api/chat", json={"model": "tiny", "messages": USER, "stream": False,
                                                      "options": sampled}, timeout=60).json()["message"]["content"]
    assert got == lm.chat(USER, temperature=0.8, top_k=40, top_p=0.9, seed=11, max_tokens=10).text
    got = httpx.post(f"{server.base}/api/generate", json={"model": "terse", "prompt": "Hi", "stream": False,
                                                          "options": sampled}, timeout=60).json()["response"]
    msgs = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Hi"}]
    assert got == lm.chat(msgs, temperature=0.2, top_k=40, top_p=0.9, seed=11, max_tokens=10).text  # the preset's


def test_stop_never_loads_a_model_to_unload_it(home):
    """`ollama stop B` (keep_alive 0, nothing to generate) while A is loaded: B is not loaded for
    it, so A stays (with --max-loaded 1, loading B would have evicted A)."""
    s = server_util.Server(home, ["--max-loaded", "1"])
    try:
        c = ollama.Client(host=s.base, timeout=120)
        assert c.generate("tiny", keep_alive=-1).done_reason == "load"
        assert c.generate("coder", keep_alive=0).done_reason == "unload"
        assert c.chat("coder", messages=[], keep_alive=0).done_reason == "unload"
        assert [m.model for m in c.ps().models] == ["tiny:latest"]
        with pytest.raises(ollama.ResponseError) as e:
            c.generate("nope", keep_alive=0)
        assert e.value.status_code == 404
        assert c.generate("tiny", keep_alive=0).done_reason == "unload"
        assert c.ps().models == []
    finally:
        assert s.stop() == 0


def test_embed_equals_v1_embeddings(client, server, lms):
    texts = ["The quick brown fox", "Owning your model"]
    r = client.embed("tiny", texts)
    v1 = httpx.post(f"{server.base}/v1/embeddings", json={"model": "tiny", "input": texts}, timeout=60).json()
    assert r.embeddings == [d["embedding"] for d in v1["data"]]
    assert r.prompt_eval_count == sum(len(lms["tiny"].encode(t)) for t in texts) == v1["usage"]["prompt_tokens"]
    assert r.total_duration > 0 and r.load_duration > 0
    assert list(client.embeddings("tiny", texts[0]).embedding) == r.embeddings[0]
    assert len(client.embed("tiny", texts[0], dimensions=16).embeddings[0]) == 16
    long = "word " * 5000  # over the 4096-token context: cut by default, refused with truncate false
    assert len(client.embed("tiny", long).embeddings) == 1
    with pytest.raises(ollama.ResponseError) as e:
        client.embed("tiny", long, truncate=False)
    assert e.value.status_code == 400 and "context length" in e.value.error


def test_ps_and_keep_alive(client):
    client.chat("tiny", messages=USER, options={"num_predict": 1}, keep_alive="10m")
    loaded = {m.model: m for m in client.ps().models}
    tiny = loaded["tiny:latest"]
    assert tiny.size > 0 and tiny.context_length == 4096 and tiny.details.family == "llama"
    left = (tiny.expires_at - datetime.now(timezone.utc)).total_seconds()
    assert 560 < left <= 600
    assert client.generate("tiny", keep_alive=0).done_reason == "unload"
    assert "tiny:latest" not in {m.model for m in client.ps().models}
    assert client.generate("tiny").done_reason == "load"
    assert "tiny:latest" in {m.model for m in client.ps().models}
    client.generate("tiny", "hello", raw=True, options={"num_predict": 1}, keep_alive=1e12)  # beyond a century
    expires = {m.model: m.expires_at for m in client.ps().models}["tiny:latest"]
    assert (expires - datetime.now(timezone.utc)).days > 365 * 99  # forever, as Ollama shows it
    client.generate("tiny", "hello", raw=True, options={"num_predict": 1}, keep_alive=0)
    deadline = time.monotonic() + 5  # unloaded by the reaper (each second) once the request is done
    while "tiny:latest" in {m.model for m in client.ps().models}:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_keep_alive_durations():
    assert keep_alive_seconds("5m") == 300 and keep_alive_seconds("1h30m") == 5400
    assert keep_alive_seconds(0) == 0 and keep_alive_seconds("-1") == -1 and keep_alive_seconds("-1m") == -60
    assert keep_alive_seconds("250ms") == 0.25 and keep_alive_seconds(None) is None
    # beyond a century (infinity too) is forever, as a negative is; not a number is refused
    assert keep_alive_seconds(1e12) == keep_alive_seconds("inf") == keep_alive_seconds(float("inf")) == -1
    assert keep_alive_seconds("99999999999h") == -1 and keep_alive_seconds(86400.0 * 365 * 99) == 86400.0 * 365 * 99
    assert keep_alive_seconds(float("-inf")) == keep_alive_seconds("-1e400") == -1
    for bad in ("nan", float("nan"), "5 minutes"):
        with pytest.raises(APIError, match="is not a duration"):
            keep_alive_seconds(bad)
    import argparse

    from ownlm.cli.serve import _seconds  # serve --keep-alive reads the same
    assert _seconds("5m") == 300 and _seconds("1e12") == _seconds("-1") == -1 and _seconds("90") == 90
    with pytest.raises(argparse.ArgumentTypeError):
        _seconds("nan")


def test_copy_and_delete(client):
    assert client.copy("tiny", "tiny-copy").status == "success"
    assert "tiny-copy:latest" in [m.model for m in client.list().models]
    listed = httpx.get(f"{client._client.base_url}/v1/models", timeout=30).json()["data"]
    created = next(m["created"] for m in listed if m["id"] == "tiny-copy")
    assert abs(created - time.time()) < 600  # the copy's date, in the store's own format
    assert client.chat("tiny-copy", messages=USER, options=GREEDY).message.content == \
        client.chat("tiny", messages=USER, options=GREEDY).message.content
    assert client.delete("tiny-copy").status == "success"
    assert "tiny-copy:latest" not in [m.model for m in client.list().models]
    with pytest.raises(ollama.ResponseError) as e:
        client.delete("tiny-copy")
    assert e.value.status_code == 404 and "not in the store" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.copy("nope", "nope2")
    assert e.value.status_code == 404


def test_create_a_model_from_one_in_the_store(client, server, lms):
    """`ollama create` FROM a store model: a preset with its system prompt, parameters (those a
    preset does not keep named in the progress) and messages, answering as the engine does."""
    parts = list(client.create("mario", from_="tiny", system="You are Mario.", stream=True, parameters={
        "temperature": 0.3, "num_predict": 5.0, "repeat_penalty": 1.2, "num_ctx": 2048}))
    assert parts[-1].status == "success" and any("num_ctx" in p.status for p in parts)
    assert "mario:latest" in [m.model for m in client.list().models]
    raw = httpx.post(f"{server.base}/api/show", json={"model": "mario"}, timeout=30).json()
    assert raw["system"] == "You are Mario." and raw["details"]["parent_model"] == "tiny:latest"
    assert "temperature" in raw["parameters"] and "0.3" in raw["parameters"] and "num_ctx" not in raw["parameters"]
    msgs = [{"role": "system", "content": "You are Mario."}, *USER]
    r = client.chat("mario", messages=USER, options={"temperature": 0})  # num_predict and repeat_penalty: the preset's
    assert r.message.content == lms["tiny"].chat(msgs, temperature=0, max_tokens=5, repetition_penalty=1.2).text
    assert r.eval_count <= 5
    assert client.create("luigi", from_="mario", system="You are Luigi.").status == "success"  # a preset's preset
    raw = httpx.post(f"{server.base}/api/show", json={"model": "luigi"}, timeout=30).json()
    assert raw["system"] == "You are Luigi." and "0.3" in raw["parameters"]
    # made again while loaded: the next request has the new settings; MESSAGE system is the system
    # prompt; num_predict -1 (until the context ends, Ollama's default) is what a preset does anyway
    assert client.create("mario", from_="tiny", messages=[{"role": "system", "content": "You are Peach."}],
                         parameters={"num_predict": -1, "temperature": 0.5}).status == "success"
    raw = httpx.post(f"{server.base}/api/show", json={"model": "mario"}, timeout=30).json()
    assert raw["system"] == "You are Peach." and "num_predict" not in raw["parameters"]
    peach = [{"role": "system", "content": "You are Peach."}, *USER]
    r = client.chat("mario", messages=USER, options=GREEDY)
    assert r.message.content == lms["tiny"].chat(peach, temperature=0, max_tokens=12).text
    for body, status in (({"model": "x"}, 400), ({"model": "x", "from": "nope"}, 404),
                         ({"model": "x", "files": {"m.gguf": "sha256:00"}}, 400),
                         ({"model": "x", "from": "tiny", "template": "{{ .Prompt }}"}, 400),
                         ({"model": "x", "from": "tiny", "parameters": {"temperature": "hot"}}, 400)):
        r = httpx.post(f"{server.base}/api/create", json=body, timeout=30)
        assert r.status_code == status and list(r.json()) == ["error"], (body, r.text)
    assert client.delete("luigi").status == "success" and client.delete("mario").status == "success"


def test_pull_needs_allow_pull(client):
    with pytest.raises(ollama.ResponseError) as e:
        client.pull("tiny")
    assert e.value.status_code == 403 and "--allow-pull" in e.value.error


def test_the_ollama_clis_heartbeat_is_answered(server):
    """Every `ollama` command first sends HEAD / (its client's Heartbeat) and stops on anything but 200."""
    r = httpx.head(f"{server.base}/", timeout=30)
    assert r.status_code == 200 and r.content == b""


def test_errors_have_ollama_shape(server):
    r = httpx.post(f"{server.base}/api/chat", json={"model": "nope", "messages": USER}, timeout=30)
    assert r.status_code == 404 and list(r.json()) == ["error"] and "nope" in r.json()["error"]
    r = httpx.post(f"{server.base}/api/generate", timeout=30,
                   json={"model": "tiny", "prompt": "x", "options": {"temperature": "hot"}})
    assert r.status_code == 400 and list(r.json()) == ["error"] and "options.temperature" in r.json()["error"]
    r = httpx.post(f"{server.base}/api/generate", json={"model": "tiny", "prompt": "x", "template": "{{ .Prompt }}"},
                   timeout=30)
    assert r.status_code == 400 and "template" in r.json()["error"]
    r = httpx.get(f"{server.base}/api/nothing-here", timeout=30)
    assert r.status_code == 404 and list(r.json()) == ["error"]
    for seed in (2**64, -2**63 - 1):  # torch's generator takes 64 bits: a 400, not an internal error
        r = httpx.post(f"{server.base}/api/generate", timeout=30,
                       json={"model": "tiny", "prompt": "x", "stream": False, "options": {"seed": seed}})
        assert r.status_code == 400 and list(r.json()) == ["error"] and "options.seed" in r.json()["error"]
    r = httpx.post(f"{server.base}/api/generate", timeout=30,
                   json={"model": "tiny", "prompt": "x", "stream": False,
                         "options": {"seed": 2**63 - 1, "num_predict": 2}})
    assert r.status_code == 200 and r.json()["eval_count"] == 2


def test_unknown_options_are_logged_once(client, server):
    for _ in range(2):
        client.chat("tiny", messages=USER, options={"num_predict": 1, "mirostat": 1, "num_gpu": 1, "use_mmap": True})
    lines = [ln for ln in server.log.read_text().splitlines() if "ignoring options" in ln]
    assert len(lines) == 1 and "mirostat, num_gpu, use_mmap" in lines[0]


def test_keys_and_pull_with_allow_pull(tmp_path, folders):
    home = tmp_path / "home"
    s = server_util.Server(home, ["--allow-pull", "--api-key", KEY])
    try:
        with pytest.raises(ollama.ResponseError) as e:
            ollama.Client(host=s.base).list()
        assert e.value.status_code == 401 and "API key" in e.value.error
        c = ollama.Client(host=s.base, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        assert c.list().models == []
        statuses = list(c.pull(str(folders["tiny"]), stream=True))
        assert statuses[0].status == "pulling manifest" and statuses[-1].status == "success"
        done = statuses[-2]
        assert done.status.startswith("pulled") and done.total == done.completed > 0
        assert done.digest.startswith("sha256:")
        [m] = c.list().models
        assert c.pull(m.model, stream=False).status == "success"  # already there: nothing to fetch
        assert c.chat(m.model, messages=USER, options={"num_predict": 2}).eval_count == 2
    finally:
        assert s.stop() == 0


def _curl(url: str, *args: str) -> tuple[int, str]:
    out = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", url, *args], capture_output=True, text=True,
                         timeout=120, check=True)
    text, code = out.stdout.rsplit("\n", 1)
    return int(code), text


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_examples_as_ollamas_docs_write_them(server, client):
    """Ollama's API docs call it with `curl URL -d '{...}'`: no Content-Type header, so curl says
    form-urlencoded. The body is read as JSON, and answers as the official client's request does;
    a browser's form post (Sec-Fetch-* headers) and a body that is not JSON are still refused."""
    body = {"model": "smollm2", "prompt": "Why is the sky blue?", "stream": False, "options": GREEDY}
    code, text = _curl(f"{server.base}/api/generate", "-d", json.dumps(body))
    assert code == 200, text
    want = client.generate(model="smollm2", prompt="Why is the sky blue?", options=GREEDY)
    assert json.loads(text)["response"] == want.response and want.response
    chat = {"model": "smollm2", "messages": USER, "options": GREEDY}  # streamed: Ollama's default
    code, text = _curl(f"{server.base}/api/chat", "-d", json.dumps(chat))
    lines = [json.loads(line) for line in text.splitlines()]
    assert code == 200 and lines[-1]["done"] is True
    assert "".join(m["message"]["content"] for m in lines) == client.chat(model="smollm2", messages=USER,
                                                                          options=GREEDY).message.content
    code, text = _curl(f"{server.base}/api/generate", "-d", json.dumps(body), "-H", "Sec-Fetch-Mode: navigate")
    assert code == 415 and "application/json" in json.loads(text)["error"]
    code, text = _curl(f"{server.base}/api/generate", "-d", json.dumps(body), "-H", "Content-Type: application/xml")
    assert code == 415
    code, text = _curl(f"{server.base}/api/generate", "-d", "model=smollm2&prompt=hi")
    assert code == 400, text

"""The `speculate` extension on every generation route of the server, through the official clients:
/v1/responses, /v1/messages, Ollama's /api/chat and /api/generate give the same greedy text with it as
without, a bad value is a 400 naming `speculate`, the guesses are counted in chat completions' usage
(OpenAI's accepted / rejected prediction tokens) and in /metrics, and these counts agree; and
`ownlm serve --speculate` makes it the default of requests that set none ("none" turns it off)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import anthropic
import httpx
import ollama
import openai
import pytest

import ownlm
from conftest import build_hf_model, build_tokenizer
from ownlm.engine import speculate
from ownlm.engine.generate import StepStats, generate_ids
from ownlm.engine.sampling import SamplingParams
from ownlm.errors import BadRequest
from ownlm.server import ModelPool, Server
from server_util import Server as ServeProcess, metric
from test_speculate import one_thread  # noqa: F401 - tiny models decode much faster on one thread

# repeats itself: prompt lookup finds continuations, in the prompt and in the answer
PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The quick"
MESSAGES = [{"role": "user", "content": PROMPT}]
N = 40  # tokens per answer
DRAFTED, ACCEPTED = "ownlm_speculative_draft_tokens_total", "ownlm_speculative_accepted_tokens_total"


@pytest.fixture(scope="module")
def server(hf_models, tmp_path_factory):
    draft = build_hf_model(tmp_path_factory.mktemp("draft") / "draft", "llama", seed=9, num_hidden_layers=1)
    models = {"tiny": ownlm.load(str(hf_models["llama"])), "draft": ownlm.load(str(draft))}
    pool = ModelPool(list(models), loader=lambda ref, **_: models[ref], max_loaded=1, max_running=4)
    pool.preload()
    with Server(pool, port=0) as s:
        yield s


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def _totals(server) -> tuple[float, float]:
    return metric(server.url, DRAFTED), metric(server.url, ACCEPTED)


def test_chat_usage_counts_the_guesses_and_metrics_add_them_up(server, oai):
    kw = dict(model="tiny", messages=MESSAGES, temperature=0, max_tokens=N)
    plain = oai.chat.completions.create(**kw)
    assert plain.usage.completion_tokens_details is None  # no speculation, no counts
    before = _totals(server)
    spec = oai.chat.completions.create(extra_body={"speculate": "ngram"}, **kw)
    assert spec.choices[0].message.content == plain.choices[0].message.content
    d = spec.usage.completion_tokens_details
    assert d.accepted_prediction_tokens > 0 and d.rejected_prediction_tokens >= 0  # the prompt repeats: kept guesses
    assert spec.usage.completion_tokens == plain.usage.completion_tokens  # guesses are not extra output
    # the streamed usage chunk carries them too
    pieces = list(oai.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                              extra_body={"speculate": "ngram"}, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == plain.choices[0].message.content
    ds = pieces[-1].usage.completion_tokens_details
    assert (ds.accepted_prediction_tokens, ds.rejected_prediction_tokens) == (
        d.accepted_prediction_tokens, d.rejected_prediction_tokens)  # greedy: the same guesses, the same verdicts
    # two choices and a draft model: counts summed over the choices
    two = oai.chat.completions.create(n=2, extra_body={"speculate": "draft"}, **kw)
    assert [c.message.content for c in two.choices] == [plain.choices[0].message.content] * 2
    d2 = two.usage.completion_tokens_details
    # /v1/completions reports them the same way
    cmpl = oai.completions.create(model="tiny", prompt=PROMPT, temperature=0, max_tokens=N,
                                  extra_body={"speculate": "ngram"})
    d3 = cmpl.usage.completion_tokens_details
    assert d3.accepted_prediction_tokens >= 0 and d3.rejected_prediction_tokens > 0  # guessed, if in vain here
    drafted, accepted = (after - b for after, b in zip(_totals(server), before))
    reported = [d, ds, d2, d3]
    assert accepted == sum(x.accepted_prediction_tokens for x in reported) > 0
    assert drafted == sum(x.accepted_prediction_tokens + x.rejected_prediction_tokens for x in reported)
    assert accepted <= drafted
    text = httpx.get(f"{server.url}/metrics").text
    assert f'{DRAFTED}{{model="tiny"}}' in text and f"# TYPE {ACCEPTED} counter" in text


def test_responses_route_speculates(server, oai):
    kw = dict(model="tiny", input=PROMPT, temperature=0, max_output_tokens=N)
    plain = oai.responses.create(**kw)
    assert "accepted_prediction_tokens" not in plain.usage.output_tokens_details.model_dump()
    before = _totals(server)
    spec = oai.responses.create(extra_body={"speculate": "ngram"}, **kw)
    assert spec.output_text == plain.output_text
    d = spec.usage.output_tokens_details.model_dump()  # the names chat completions' usage has
    assert d["accepted_prediction_tokens"] > 0 and d["rejected_prediction_tokens"] >= 0
    events = list(oai.responses.create(stream=True, extra_body={"speculate": "draft"}, **kw))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == plain.output_text
    ds = events[-1].response.usage.output_tokens_details.model_dump()
    drafted, accepted = (after - b for after, b in zip(_totals(server), before))
    assert accepted == d["accepted_prediction_tokens"] + ds["accepted_prediction_tokens"] <= drafted
    assert drafted == accepted + d["rejected_prediction_tokens"] + ds["rejected_prediction_tokens"]


def test_messages_route_speculates(server):
    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=N)
    greedy = {"temperature": 0}  # this client version takes it only as an extra field
    plain = client.messages.create(extra_body=greedy, **kw).content[0].text
    before = _totals(server)
    for how in ("ngram", "draft"):
        assert client.messages.create(extra_body={**greedy, "speculate": how}, **kw).content[0].text == plain, how
    events = list(client.messages.create(stream=True, extra_body={**greedy, "speculate": "ngram"}, **kw))
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == plain
    drafted, accepted = (after - b for after, b in zip(_totals(server), before))
    assert 0 < accepted <= drafted  # Anthropic's usage has no field for them: /metrics counts them
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(extra_body={**greedy, "speculate": "no-such-model"}, **kw)
    assert "speculate" in e.value.message and e.value.body["error"]["type"] == "invalid_request_error"


def test_ollama_routes_speculate(server):
    client = ollama.Client(host=server.url, timeout=120)
    opts = {"temperature": 0, "num_predict": N}
    plain = client.chat(model="tiny", messages=MESSAGES, options=opts)
    plain_chat = plain.message.content
    plain_gen = client.generate(model="tiny", prompt=PROMPT, raw=True, options=opts).response
    before = _totals(server)
    # in options, as the client sends them
    spec = client.chat(model="tiny", messages=MESSAGES, options={**opts, "speculate": "ngram"})
    assert spec.message.content == plain_chat and spec.eval_count == plain.eval_count
    streamed = client.chat(model="tiny", messages=MESSAGES, options={**opts, "speculate": "draft"}, stream=True)
    assert "".join(p.message.content for p in streamed) == plain_chat
    assert client.generate(model="tiny", prompt=PROMPT, raw=True, options={**opts, "speculate": "ngram"}
                           ).response == plain_gen
    # or beside them
    r = httpx.post(f"{server.url}/api/generate", timeout=120, json={
        "model": "tiny", "prompt": PROMPT, "raw": True, "stream": False, "options": opts, "speculate": "ngram"})
    assert r.status_code == 200 and r.json()["response"] == plain_gen
    drafted, accepted = (after - b for after, b in zip(_totals(server), before))
    assert 0 < accepted <= drafted
    for body, says in (({"options": {**opts, "speculate": "no-such-model"}}, "nor a model this server offers"),
                       ({"options": opts, "speculate": "no-such-model"}, "nor a model this server offers"),
                       ({"options": {**opts, "speculate": "draft"}, "speculate": "ngram"}, "give one"),
                       ({"options": opts, "speculate": 3}, "speculate")):
        for route, extra in (("chat", {"messages": MESSAGES}), ("generate", {"prompt": PROMPT})):
            r = httpx.post(f"{server.url}/api/{route}", timeout=120,
                           json={"model": "tiny", "stream": False, **extra, **body})
            assert r.status_code == 400 and says in r.json()["error"], (route, body, r.text)
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="tiny", messages=MESSAGES, options={**opts, "speculate": ""})
    assert e.value.status_code == 400 and "speculate" in e.value.error


def test_bad_speculate_on_responses_is_a_400_naming_it(oai):
    for bad, says in (("no-such-model", "neither \"ngram\" nor a model this server offers"), (3, "speculate"),
                      ("", "speculate")):
        with pytest.raises(openai.BadRequestError) as e:
            oai.responses.create(model="tiny", input=PROMPT, max_output_tokens=4, extra_body={"speculate": bad})
        assert says in str(e.value) and e.value.body["param"] == "speculate", (bad, str(e.value))



def test_a_right_prediction_is_kept_whole(hf_models):
    """Token for token (a random model's bytes do not survive decoding to text and back): the
    answer's own tokens as the prediction are all kept; one wrong from its middle on, half."""
    lm = ownlm.load(str(hf_models["llama"]))
    ids = lm.encode(lm.template.render(MESSAGES, add_generation_prompt=True))
    params = SamplingParams(temperature=0, max_tokens=N)
    want = list(generate_ids(lm.model, ids, params))
    for prediction, right in ((want, True), (want[:N // 2] + [t ^ 1 for t in want[N // 2:]], False)):
        stats = StepStats()
        got = list(speculate.generate_ids(lm.model, ids, params, (), stats, speculate.Predicted(prediction),
                                          adaptive=False))
        assert got == want
        if right:  # the first token comes from the prefill; the others are guesses kept, or a pass's own token
            assert stats.accepted == stats.drafted >= N - 8, stats
        else:
            assert stats.accepted >= N // 2 - 8 and stats.drafted > stats.accepted, stats


def test_chat_prediction_counts_and_refusals(server, oai):
    """OpenAI's `prediction` on /v1/chat/completions: the plain greedy answer whatever the prediction,
    its guesses counted as accepted and rejected prediction tokens."""
    kw = dict(model="tiny", messages=MESSAGES, temperature=0, max_tokens=N)
    want = oai.chat.completions.create(**kw).choices[0].message.content
    for prediction in (want, [{"type": "text", "text": "The quick brown"}, {"type": "text", "text": " fox"}],
                       "Zebra " * 30):
        r = oai.chat.completions.create(prediction={"type": "content", "content": prediction}, **kw)
        d = r.usage.completion_tokens_details
        assert r.choices[0].message.content == want and d.accepted_prediction_tokens + d.rejected_prediction_tokens
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(prediction={"type": "content", "content": want},
                                    extra_body={"speculate": "draft"}, **kw)
    assert e.value.body["param"] == "prediction"
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(prediction={"type": "file", "content": want}, **kw)
    assert e.value.body["param"].startswith("prediction")


EDIT = '''def area(width, height):
    """The area of a rectangle."""
    return width * height


def perimeter(width, height):
    """The perimeter of a rectangle."""
    return 2 * (width + height)
'''


@pytest.mark.smollm2
def test_smollm2_prediction_speeds_up_an_edit(smollm2_gguf):
    """What predicted outputs are for: the file being edited as the prediction. The answer is the
    plain greedy answer; most of it is kept guesses, all of it where the prediction is the answer."""
    lm = ownlm.load(str(smollm2_gguf))
    pool = ModelPool(["smollm2"], loader=lambda ref, **_: lm, max_loaded=1)
    pool.preload()
    with Server(pool, port=0) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)
        ask = "Rename `width` to `w` in this code. Reply with the code only.\n\n```python\n" + EDIT + "```"
        kw = dict(model="smollm2", messages=[{"role": "user", "content": ask}], temperature=0, max_tokens=100)
        want = client.chat.completions.create(**kw).choices[0].message.content
        for prediction in ("```python\n" + EDIT + "```", want):
            r = client.chat.completions.create(prediction={"type": "content", "content": prediction}, **kw)
            assert r.choices[0].message.content == want
            d, n = r.usage.completion_tokens_details, r.usage.completion_tokens
            assert d.accepted_prediction_tokens >= n // 2, (d, want)
            if prediction == want:  # guesses all kept: a pass per doubling of the guess, at most
                assert d.rejected_prediction_tokens == 0 and d.accepted_prediction_tokens >= n - 6, (d, want)


# --- `ownlm serve --speculate`: the default for requests that set none ---------------------------

@pytest.fixture(scope="module")
def folders(hf_models, tmp_path_factory):
    """{API name: model folder}: the target, a draft with its tokenizer, one with another tokenizer."""
    base = tmp_path_factory.mktemp("defaults")
    other = shutil.copytree(hf_models["llama"], base / "other")
    build_tokenizer(other, vocab_size=290)  # another vocabulary for the same weights
    return {"tiny": hf_models["llama"], "draft": build_hf_model(base / "draft", "llama", seed=9, num_hidden_layers=1),
            "other": other}


def _pool(folders, speculate: str) -> ModelPool:
    return ModelPool(list(folders), loader=lambda ref, **_: ownlm.load(str(folders[ref])), max_loaded=1,
                     speculate=speculate)


@pytest.mark.parametrize("default", ["ngram", "draft"])
def test_serve_speculate_is_the_default_and_a_request_can_turn_it_off(folders, server, oai, default):
    kw = dict(model="tiny", messages=MESSAGES, temperature=0, max_tokens=N)
    gen_kw = dict(model="tiny", prompt=PROMPT, raw=True, options={"temperature": 0, "num_predict": N})
    plain = oai.chat.completions.create(**kw).choices[0].message.content  # a server with no default
    plain_gen = ollama.Client(host=server.url, timeout=120).generate(**gen_kw).response
    pool = _pool(folders, default)
    pool.preload()  # a default draft is loaded with its model, its vocabulary checked
    assert list(pool.loaded["tiny"].lm.drafts) == ([] if default == "ngram" else ["draft"])
    with Server(pool, port=0) as s:
        client = openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(**kw)
        d = r.usage.completion_tokens_details
        assert r.choices[0].message.content == plain and d.accepted_prediction_tokens + d.rejected_prediction_tokens > 0
        off = client.chat.completions.create(extra_body={"speculate": "none"}, **kw)
        assert off.choices[0].message.content == plain and off.usage.completion_tokens_details is None
        # a request's own choice wins; a prediction means prompt lookup, whatever the default
        own = "draft" if default == "ngram" else "ngram"
        assert client.chat.completions.create(extra_body={"speculate": own}, **kw).choices[0].message.content == plain
        assert sorted(pool.loaded["tiny"].lm.drafts) == ["draft"]
        p = client.chat.completions.create(prediction={"type": "content", "content": plain}, **kw)
        d = p.usage.completion_tokens_details
        assert p.choices[0].message.content == plain and d.accepted_prediction_tokens + d.rejected_prediction_tokens
        # every route takes the default: Ollama's has no usage field for it, /metrics counts it
        before = _totals(s)
        gen = ollama.Client(host=s.url, timeout=120).generate(**gen_kw)
        drafted, accepted = (after - b for after, b in zip(_totals(s), before))
        assert gen.response == plain_gen and 0 <= accepted <= drafted > 0


def test_serve_speculate_refuses_a_draft_of_another_vocabulary(folders, oai):
    pool = _pool(folders, "other")
    with pytest.raises(BadRequest, match="different vocabulary"):
        pool.preload()
    pool.close()
    with Server(_pool(folders, "other"), port=0) as s:  # loaded on the first request: a 400 that says why
        client = openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0, timeout=120)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
        assert "the server's --speculate: the draft model" in str(e.value) and e.value.body["param"] == "speculate"
        ok = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0,
                                            extra_body={"speculate": "none"})
        assert ok.usage.completion_tokens >= 1 and ok.usage.completion_tokens_details is None


def test_ownlm_serve_speculate_flag(folders, oai, ownlm_home):
    tiny, draft = str(folders["tiny"]), str(folders["draft"])
    bad = subprocess.run([sys.executable, "-m", "ownlm.cli.main", "serve", tiny, "--speculate", "nope", "--port", "0"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--speculate 'nope' is neither \"ngram\" nor a model this server" in bad.stderr
    plain = oai.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=N)
    server = ServeProcess(ownlm_home, [tiny, draft, "--speculate", draft, "--preload"])
    try:
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(model=tiny, messages=MESSAGES, temperature=0, max_tokens=N)
        assert r.choices[0].message.content == plain.choices[0].message.content
        d = r.usage.completion_tokens_details  # the draft guessed (a random one, in vain)
        assert d.accepted_prediction_tokens + d.rejected_prediction_tokens > 0
    finally:
        assert server.stop() == 0

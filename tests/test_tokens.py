"""The tokenizer routes (/tokenize, /detokenize, /tokenizer_info, shaped as vLLM's) against the
model's own tokenizer, and what lm-evaluation-harness's remote tokenizer reads from them."""

from __future__ import annotations

import json

import httpx
import pytest

import ownlm
from ownlm.server import ModelPool, Server

from .conftest import build_hf_model

TEXTS = ["Hello world", " leading space", "déjà vu — 😀", "<|im_start|>user\nhi<|im_end|>\n", "", "a\n\n\tb"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("tokens")
    plain = build_hf_model(base / "plain", "llama")
    bos = build_hf_model(base / "bos", "llama", seed=1, bos_token_id=0)  # a model that asks for BOS
    cfg = json.loads((bos / "tokenizer_config.json").read_text())
    (bos / "tokenizer_config.json").write_text(json.dumps({**cfg, "bos_token": "<|endoftext|>", "add_bos_token": True}))
    return {"plain": ownlm.load(str(plain), dtype="float32"), "bos": ownlm.load(str(bos), dtype="float32")}


def serve(models, names):
    pool = ModelPool(list(names), loader=lambda ref, **_: models[ref], max_loaded=len(names))
    pool.preload()
    return Server(pool, port=0)


@pytest.fixture(scope="module")
def url(models):
    with serve(models, ("plain", "bos")) as server:
        yield server.url


def test_tokenize_equals_the_models_encode(models, url):
    assert models["bos"].tokenizer.add_bos and models["bos"].tokenizer.bos_id == 0
    assert not models["plain"].tokenizer.add_bos
    for name, lm in models.items():
        for text in TEXTS:
            r = httpx.post(f"{url}/tokenize", json={"model": name, "prompt": text}, timeout=30)
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["tokens"] == lm.encode(text) and out["count"] == len(out["tokens"])
            assert out["max_model_len"] == lm.config.context_length
            r = httpx.post(f"{url}/tokenize", json={"model": name, "prompt": text, "add_special_tokens": False,
                                                    "return_token_strs": True}, timeout=30)
            out = r.json()
            assert out["tokens"] == lm.tokenizer.encode(text, add_bos=False)
            assert out["token_strs"] == [lm.tokenizer.token(t) for t in out["tokens"]]
    with_bos = httpx.post(f"{url}/tokenize", json={"model": "bos", "prompt": "Hello"}, timeout=30).json()["tokens"]
    assert with_bos[0] == 0 and with_bos[1:] == models["bos"].tokenizer.encode("Hello", add_bos=False)
    msgs = [{"role": "user", "content": "hi there"}]
    r = httpx.post(f"{url}/tokenize", json={"model": "plain", "messages": msgs}, timeout=30)
    assert r.json()["tokens"] == models["plain"].encode(models["plain"].chat_prompt(msgs))


def test_detokenize_round_trips(models, url):
    for name, lm in models.items():
        for text in TEXTS:
            ids = lm.tokenizer.encode(text, add_bos=False)
            r = httpx.post(f"{url}/detokenize", json={"model": name, "tokens": ids}, timeout=30)
            assert r.status_code == 200, r.text
            assert r.json() == {"prompt": text}  # special tokens kept: the text encodes back to the same ids
            assert lm.tokenizer.encode(r.json()["prompt"], add_bos=False) == ids


def test_tokenizer_info(models, url):
    for name, lm in models.items():
        info = httpx.get(f"{url}/tokenizer_info", params={"model": name}, timeout=30).json()
        tok = lm.tokenizer
        assert info["eos_token_id"] == tok.eos_ids[0] and info["eos_token_ids"] == tok.eos_ids
        assert info["eos_token"] == "<|im_end|>" and tok.encode(info["eos_token"], add_bos=False) == [tok.eos_ids[0]]
        assert info["bos_token_id"] == tok.bos_id and info["add_bos_token"] == tok.add_bos
        assert info["chat_template"] == lm.template.source and info["model_max_length"] == lm.config.context_length
    assert httpx.get(f"{url}/tokenizer_info", params={"model": "bos"}, timeout=30).json()["bos_token"] == \
        "<|endoftext|>"
    assert httpx.get(f"{url}/tokenizer_info", params={"model": "plain"}, timeout=30).json()["bos_token"] is None


def test_errors(url):
    r = httpx.post(f"{url}/tokenize", json={"model": "nope", "prompt": "x"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.get(f"{url}/tokenizer_info", params={"model": "nope"}, timeout=30).status_code == 404
    assert httpx.post(f"{url}/detokenize", json={"model": "nope", "tokens": [1]}, timeout=30).status_code == 404
    for path, body in [("/tokenize", {"model": "plain"}),  # neither prompt nor messages
                       ("/tokenize", {"model": "plain", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}),
                       ("/tokenize", {"model": "plain", "prompt": 3}),
                       ("/tokenize", {"model": "plain", "prompt": "x", "surprise": 1}),
                       ("/detokenize", {"model": "plain", "tokens": [10**9]}),
                       ("/detokenize", {"model": "plain", "tokens": [-1]}),
                       ("/detokenize", {"model": "plain", "tokens": ["a"]}),
                       ("/detokenize", {"model": "plain"})]:
        r = httpx.post(f"{url}{path}", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["message"], (path, body, r.text)
    r = httpx.post(f"{url}/tokenize", content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400
    # two models offered and both loaded: which one is meant must be said
    r = httpx.post(f"{url}/tokenize", json={"prompt": "x"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_lm_eval_remote_tokenizer_reads_the_routes(models):
    """lm-evaluation-harness's own client of these routes (tokenizer_backend=remote; it never
    names the model): with one model served, the model is implied."""
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    lm = models["plain"]
    with serve(models, ("plain",)) as server:
        base = f"{server.url}/v1/completions"
        assert check_remote_tokenizer_support(base)
        rt = RemoteTokenizer(base)
        assert rt.eos_token_id == lm.tokenizer.eos_ids[0] and rt.bos_token_id is None
        for text in TEXTS:
            ids = lm.tokenizer.encode(text, add_bos=False)
            assert rt.encode(text) == ids and rt.decode(ids) == text
        assert rt.apply_chat_template([{"role": "user", "content": "hi"}]) == \
            lm.chat_prompt([{"role": "user", "content": "hi"}])


def test_token_bytes_join_to_the_text(models):
    """Byte-level tokens' own bytes (GPT-2's alphabet read back; a token holding part of a
    character is that part, not U+FFFD), special tokens' text: joined, the text's UTF-8."""
    tok = models["plain"].tokenizer
    for text in TEXTS:
        ids = tok.encode(text, add_bos=False)
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode(), text
    partial = [i for i in tok.encode("😀", add_bos=False) if tok.decode([i]) == "\ufffd"]
    assert partial and all(len(tok.token_bytes(i)) < 4 for i in partial)


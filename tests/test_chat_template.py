"""Chat templates render like transformers' apply_chat_template, inside a sandbox with limits."""

from __future__ import annotations

import time

import pytest
import transformers

from ownlm.errors import BadRequest, ChatTemplateError
from ownlm.text.chat import CHATML, ChatTemplate

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"}]


def test_renders_like_transformers(hf_models):
    tok = transformers.AutoTokenizer.from_pretrained(hf_models["llama"])
    want = tok.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True)
    assert ChatTemplate(tok.chat_template).render(MSGS) == want
    llama2 = ("{{ bos_token }}{% for m in messages %}"
              "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] | trim + ' [/INST]' }}"
              "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] | trim + ' ' + eos_token }}"
              "{% endif %}{% endfor %}")
    tok.chat_template = llama2
    tok.bos_token, tok.eos_token = "<|endoftext|>", "<|im_end|>"
    msgs = MSGS[1:]
    assert ChatTemplate(llama2, "<|endoftext|>", "<|im_end|>").render(msgs, add_generation_prompt=False) == \
        tok.apply_chat_template(msgs, tokenize=False)


def test_fallback_is_chatml():
    t = ChatTemplate(None)
    assert t.is_fallback and t.source == CHATML
    assert t.render([{"role": "user", "content": "x"}]) == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("source", [
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__base__.__subclasses__() }}",
    "{{ raise_exception.__globals__ }}",
    "{% set x = messages.append({'role': 'user'}) %}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
])
def test_sandbox_escape_is_a_clear_error(source):
    with pytest.raises(ChatTemplateError) as e:
        ChatTemplate(source).render([{"role": "user", "content": "x"}])
    assert "chat template" in str(e.value)


def test_runaway_template_is_stopped():
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateError) as e:
        ChatTemplate(loop).render([{"role": "user", "content": "x"}], timeout=0.5)
    assert "longer than" in str(e.value) and time.monotonic() - t0 < 5


def test_output_size_is_limited():
    big = "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}"
    with pytest.raises(ChatTemplateError) as e:
        ChatTemplate(big).render([{"role": "user", "content": "x"}])
    assert "exceeds" in str(e.value)


def test_template_errors_and_bad_messages():
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatTemplate("{% for %}")
    with pytest.raises(ChatTemplateError, match="refused"):
        ChatTemplate("{{ raise_exception('only user turns') }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(BadRequest):
        ChatTemplate(None).render([{"role": "wizard", "content": "x"}])
    with pytest.raises(BadRequest):
        ChatTemplate(None).render([])

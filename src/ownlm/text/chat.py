"""Chat templates: the model's own Jinja template, rendered in jinja2's immutable sandbox with a
time limit and an output-size limit. Models without a template fall back to ChatML."""

from __future__ import annotations

import ctypes
import datetime
import json
import threading
from typing import Any, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from ..errors import BadRequest, ChatTemplateError

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MAX_OUTPUT = 4 << 20  # characters
MAX_SECONDS = 2.0
ROLES = {"system", "user", "assistant", "tool"}


class _Undefined(jinja2.Undefined):
    """Plain undefined values stay falsy and print empty (templates rely on that), but an unsafe
    attribute access — which the sandbox turns into an undefined — fails loudly."""

    def __init__(self, hint=None, obj=jinja2.utils.missing, name=None, exc=jinja2.exceptions.UndefinedError):
        if exc is SecurityError:
            raise SecurityError(hint or f"access to {name!r} is unsafe")
        super().__init__(hint, obj, name, exc)


class _Timeout(BaseException):
    """Raised inside the rendering thread when it runs past its time."""


def _raise(message: str) -> None:
    raise ChatTemplateError(f"chat template refused the conversation: {message}")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = ""):
        self.is_fallback = source is None
        self.source = CHATML if source is None else source
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=_Undefined)
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template does not parse: {e.message} (line {e.lineno})") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
               timeout: float = MAX_SECONDS, **extra: Any) -> str:
        messages = validate_messages(messages)
        ctx = dict(messages=messages, add_generation_prompt=add_generation_prompt,
                   bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                parts, size = [], 0
                for chunk in self.template.generate(**ctx):
                    size += len(chunk)
                    if size > MAX_OUTPUT:
                        raise ChatTemplateError(f"chat template output exceeds {MAX_OUTPUT} characters")
                    parts.append(chunk)
                result["text"] = "".join(parts)
            except BaseException as e:  # noqa: BLE001 - carried to the caller's thread
                result["error"] = e

        thread = threading.Thread(target=work, daemon=True, name="ownlm-template")
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            # Inject an exception into the template thread; pure-Python loops see it promptly.
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(_Timeout))
            thread.join(1.0)
            raise ChatTemplateError(f"chat template took longer than {timeout:g}s to render",
                                    "the template loops too long")
        err = result.get("error")
        if isinstance(err, ChatTemplateError):
            raise err
        if isinstance(err, SecurityError):
            raise ChatTemplateError(f"chat template tried to leave its sandbox: {err}",
                                    "this template is unsafe; do not use it") from None
        if err is not None:  # jinja2's errors, and Python's from inside the template
            raise ChatTemplateError(f"chat template failed: {type(err).__name__}: {err}") from None
        return result["text"]


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role {role!r} is not one of {', '.join(sorted(ROLES))}")
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):  # OpenAI content parts: keep the text parts
            texts = []
            for p in content:
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise BadRequest(f"messages[{i}].content: only text parts are supported")
                texts.append(p["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string")
        out.append({**m, "content": content})
    return out

"""Chat templates: the model's own Jinja template, rendered in ownlm's bounded sandbox (sandbox.py)
in a thread of its own with a time limit. Models without a template fall back to ChatML."""

from __future__ import annotations

import ctypes
import threading
from typing import Any, Sequence

import jinja2
from jinja2.sandbox import SecurityError

from ..errors import BadRequest, ChatTemplateError
from .sandbox import MAX_OUTPUT, MAX_SECONDS, MAX_SOURCE, RenderTimeout, Sandbox, Spend, short

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ROLES = {"system", "user", "assistant", "tool"}


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = ""):
        if source is not None and not isinstance(source, str):
            raise ChatTemplateError(f"chat template must be text, not {type(source).__name__}",
                                    "the model file's chat template is malformed")
        if source is not None and len(source) > MAX_SOURCE:
            raise ChatTemplateError(f"chat template has {len(source)} characters, more than the {MAX_SOURCE} allowed")
        self.is_fallback = source is None
        self.source = CHATML if source is None else source
        self.env = Sandbox()
        try:
            self.template = self.env.from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template does not parse: {short(e.message)} (line {e.lineno})") from None
        except ChatTemplateError:
            raise
        except Exception as e:  # deep nesting (RecursionError), huge literals (ValueError), Python's SyntaxError
            raise ChatTemplateError(f"chat template does not compile: {type(e).__name__}: {short(e)}") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
               timeout: float = MAX_SECONDS, **extra: Any) -> str:
        messages = validate_messages(messages)
        ctx = dict(messages=messages, add_generation_prompt=add_generation_prompt,
                   bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        result: dict[str, Any] = {}

        def work() -> None:
            self.env.local.spend = Spend()
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
            finally:
                self.env.local.spend = None  # frees what the render's memo kept alive

        thread = threading.Thread(target=work, daemon=True, name="ownlm-template")
        thread.start()
        thread.join(timeout)
        timed_out = thread.is_alive()
        for _ in range(20 if timed_out else 0):  # at most ~1 s more
            if not thread.is_alive():
                break
            # Inject an exception into the template thread; every step it takes is short, so it sees it promptly.
            # Again if it is still running: one that lands in a weakref callback or __del__ is swallowed there.
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(RenderTimeout))
            thread.join(0.05)
        if timed_out:
            raise ChatTemplateError(f"chat template took longer than {timeout:g}s to render",
                                    "the template loops too long")
        err = result.get("error")
        if isinstance(err, ChatTemplateError):
            raise err
        if isinstance(err, SecurityError):
            raise ChatTemplateError(f"chat template tried to leave its sandbox: {short(err)}",
                                    "this template is unsafe; do not use it") from None
        if err is not None:  # jinja2's errors, and Python's from inside the template
            raise ChatTemplateError(f"chat template failed: {type(err).__name__}: {short(err)}") from None
        return result["text"]


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object with role and content")
        role = m.get("role")
        if role == "developer":  # OpenAI's name for the system message of its newer models
            m = {**m, "role": "system"}
            role = "system"
        if not isinstance(role, str) or role not in ROLES:
            raise BadRequest(f"messages[{i}].role {role!r} is not one of {', '.join(sorted(ROLES))} "
                             "(or developer, as system)")
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

"""Grammar-constrained decoding with llguidance: at every step the grammar says which tokens may
come next and every other logit is set to -inf, so the output always parses.

Grammars come from a JSON schema (`response_format`), "any JSON object", or the tool-call format
(`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one branch per function)."""

from __future__ import annotations

import json
from typing import Any, Sequence

import torch

from ..errors import BadRequest

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
# compact JSON: a small model given free whitespace can pad forever
JSON_OPTIONS = {"whitespace_flexible": False}
MAX_SCHEMA_BYTES = 256 << 10
# a tool-call argument string with no maxLength of its own is at most this long
ARG_MAX_CHARS = 512


class GrammarError(BadRequest):
    """The requested output format broke down while decoding: llguidance gave up on the grammar
    (a schema whose required `$ref` recursion never ends makes its parser too complex, say).
    The request's fault, not the server's."""

    def __init__(self, detail: str):
        first = (detail or "the grammar allows no next token").strip().splitlines()[0][:300]  # no state dump
        super().__init__(f"the requested output format cannot be enforced: {first}",
                         "simplify the JSON schema (bounded recursion, fewer alternatives)")


def _llg():
    import llguidance

    return llguidance


def grammar_tokenizer(tokenizer, vocab_size: int):
    """llguidance's view of a TextTokenizer (~0.3 s to build: the caller keeps it)."""
    return _llg().LLTokenizer(tokenizer.tk.to_str(), n_vocab=vocab_size, eos_token=list(tokenizer.eos_ids))


def _check_schema(schema: Any, where: str) -> str:
    if not isinstance(schema, dict):
        raise BadRequest(f"{where} must be a JSON object (a JSON schema)")
    try:
        text = json.dumps(schema)
    except (TypeError, ValueError) as e:
        raise BadRequest(f"{where} is not valid JSON: {e}") from None
    except RecursionError:
        raise BadRequest(f"{where} nests too deeply") from None
    if len(text) > MAX_SCHEMA_BYTES:
        raise BadRequest(f"{where} is larger than {MAX_SCHEMA_BYTES} bytes")
    return text


def json_schema_grammar(schema: dict[str, Any], where: str = "response_format.json_schema.schema") -> str:
    _check_schema(schema, where)
    llg = _llg()
    try:
        return llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except (ValueError, TypeError, RuntimeError) as e:
        raise BadRequest(f"{where} is not a usable JSON schema: {e}") from None


def close_schema(schema: Any, max_chars: int = ARG_MAX_CHARS) -> Any:
    """A copy of a tool's parameter schema that a small model cannot wander off in: every object
    that leaves additionalProperties open gets `additionalProperties: false` (no invented keys), and
    every string with no maxLength (nor enum, const or format) gets `maxLength: max_chars`. Schemas
    the request sets explicitly (additionalProperties: true, its own maxLength) are kept."""
    if isinstance(schema, list):
        return [close_schema(s, max_chars) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions", "patternProperties") and isinstance(value, dict):
            out[key] = {k: close_schema(v, max_chars) for k, v in value.items()}
        elif key in ("items", "prefixItems", "anyOf", "oneOf", "additionalProperties", "contains", "then",
                     "else", "if") or (key == "allOf" and isinstance(value, list) and len(value) == 1):
            out[key] = close_schema(value, max_chars)  # (branches of a many-part allOf merge: kept open)
        else:
            out[key] = value
    kinds = out.get("type") if isinstance(out.get("type"), list) else [out.get("type")]
    if ("object" in kinds or "properties" in out) and not {"additionalProperties", "patternProperties",
                                                            "unevaluatedProperties", "allOf"} & out.keys():
        out["additionalProperties"] = False
    if "string" in kinds and not {"maxLength", "enum", "const", "format"} & out.keys():
        out["maxLength"] = max_chars
    return out


def tool_schema(functions: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One call of any of `functions`: {"name": <one of them>, "arguments": <its parameters>},
    the parameters closed and bounded (close_schema)."""
    branches = []
    for f in functions:
        params = f.get("parameters") or {"type": "object", "properties": {}}
        try:
            params = close_schema(json.loads(_check_schema(params, "tools[].function.parameters")))
        except RecursionError:
            raise BadRequest("tools[].function.parameters nests too deeply") from None
        branches.append({"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": params},
                         "required": ["name", "arguments"], "additionalProperties": False})
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


def tool_grammar(functions: Sequence[dict[str, Any]], required: bool, single: bool = False,
                 answer: dict[str, Any] | None = None) -> str:
    """Tool calls in the <tool_call> format (one, or one or more); unless `required`, an answer
    instead: plain text not starting with '<' or a space, or JSON of the schema `answer` (a
    response_format beside the tools)."""
    schema = tool_schema(functions)
    _check_schema(schema, "tools[].function.parameters")
    compact = {**schema, "x-guidance": JSON_OPTIONS}  # as for response_format: no padding with whitespace
    call = f"{json.dumps(TOOL_OPEN)} %json {json.dumps(compact)} {json.dumps(TOOL_CLOSE)}"
    lines = ["start: calls" if required else "start: calls | answer",
             "calls: call" if single else "calls: call+", f"call: {call}"]
    if answer is None:
        lines += ["answer: TEXT", 'TEXT: /[^<\\s][^\\x00]*/']
    else:
        _check_schema(answer, "response_format.json_schema.schema")
        lines.append(f"answer: %json {json.dumps({**answer, 'x-guidance': JSON_OPTIONS})}")
    llg = _llg()
    try:
        return llg.LLMatcher.grammar_from_lark("\n".join(lines))
    except (ValueError, TypeError, RuntimeError) as e:
        where = "tools[].function.parameters" + ("" if answer is None else " or the response format's schema")
        raise BadRequest(f"{where} is not a usable JSON schema: {e}") from None


class GrammarConstraint:
    """The engine's Constraint for one sequence."""

    def __init__(self, grammar: str, lltokenizer, vocab_size: int):
        llg = _llg()
        try:
            self.matcher = llg.LLMatcher(lltokenizer, grammar, log_level=0)
        except (ValueError, TypeError, RuntimeError) as e:
            raise GrammarError(str(e)) from None
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())
        self.vocab_size = vocab_size
        self.bits = torch.arange(32, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        try:
            mask = self.matcher.compute_bitmask()
        except (ValueError, RuntimeError) as e:
            raise GrammarError(str(e)) from None
        words = torch.frombuffer(bytearray(mask), dtype=torch.int32)
        bits = ((words[:, None] >> self.bits) & 1).bool().reshape(-1)
        return bits[: self.vocab_size]

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        allowed = self.allowed()
        if not bool(allowed.any()):
            raise GrammarError(self.matcher.get_error() or "the grammar allows no next token")
        n = min(allowed.shape[0], logits.shape[-1])
        out = torch.full_like(logits, float("-inf"))
        out[:n] = torch.where(allowed[:n], logits[:n], out[:n])
        return out

    def advance(self, token: int) -> None:
        try:
            ok = self.matcher.consume_token(token)
        except (ValueError, RuntimeError) as e:
            raise GrammarError(str(e)) from None
        if not ok:
            raise GrammarError(self.matcher.get_error() or f"the grammar refused token {token}")

    def finished(self) -> bool:
        return self.matcher.is_stopped()

    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None


def validate_grammar(grammar: str, lltokenizer) -> None:
    """A 400 for a grammar llguidance cannot build, before any work is queued."""
    llg = _llg()
    try:
        err = llg.LLMatcher.validate_grammar(grammar, lltokenizer)
    except (ValueError, TypeError, RuntimeError) as e:
        err = str(e)
    if err and not err.startswith("WARNING"):
        raise BadRequest(f"the requested output format cannot be enforced: {err}")

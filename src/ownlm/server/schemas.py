"""Request bodies of the OpenAI-compatible API. Unknown fields are refused (a 400 naming the
field), never silently dropped, and values are never converted between JSON types; fields OpenAI
defines that ownlm cannot honour are refused too."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_N = 16
MAX_TOP_LOGPROBS = 20
INT64 = 2**63  # seeds are 64-bit: choice i of n samples with seed + i, which torch takes up to 2**64 - 1


def absent_nulls(data: Any) -> Any:
    """A model's fields sent as null (as the SDKs send a keyword given as None), at every level of
    a body: each field left out (its default)."""
    return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class _Body(BaseModel):
    # strict: a value of the wrong JSON type is a 400, not converted (true is no token id 1, "2" no n)
    model_config = ConfigDict(extra="forbid", strict=True)

    _nulls = model_validator(mode="before")(absent_nulls)


class StreamOptions(_Body):
    include_usage: bool = False
    include_obfuscation: bool = False  # no padding is added to stream events either way


class _Sampling(_Body):
    model: str
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    max_tokens: Optional[int] = Field(None, ge=0)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=-INT64, lt=INT64)
    n: int = Field(1, ge=1, le=MAX_N)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # accepted, with nothing to do here: one service tier; the prefix cache needs no key; the user
    # named for abuse tracking as `user` is
    service_tier: Optional[Literal["auto", "default", "flex", "scale", "priority"]] = None
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # extensions, named as vLLM and llama.cpp's server name them
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(None, gt=0, le=10)
    # ownlm's extension: speculative decoding for this request, "ngram" (prompt lookup) or a draft
    # model's name (same tokenizer as the served model); the same tokens as without for greedy settings
    speculate: Optional[str] = Field(None, min_length=1, max_length=500)


class FunctionDef(_Body):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: str


class ToolChoiceNamed(_Body):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaSpec(_Body):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaSpec] = None


class PredictionPart(_Body):
    type: Literal["text"]
    text: str


class Prediction(_Body):
    """OpenAI's predicted output: text the answer will mostly repeat (a file being edited); its
    tokens are searched by prompt lookup, so a right prediction makes the answer come faster."""

    type: Literal["content"]
    content: Union[str, list[PredictionPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], ToolChoiceNamed]] = None
    parallel_tool_calls: Optional[bool] = None
    prediction: Optional[Prediction] = None
    # stored completions are not kept here (store: true is refused); metadata goes with them
    store: Optional[Literal[False]] = None
    metadata: Optional[dict[str, str]] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: Optional[int] = Field(None, ge=1, le=1)
    suffix: Optional[str] = Field(None, max_length=0)


class EmbeddingRequest(_Body):
    model: str
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, ge=1)
    user: Optional[str] = None


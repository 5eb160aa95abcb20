"""The tokenizer routes, as vLLM's server names and shapes them: `POST /tokenize`, `POST /detokenize`,
`GET /tokenizer_info`. Evaluation harnesses call them to count and split tokens with the served
model's own tokenizer (lm-evaluation-harness's `tokenizer_backend=remote`), so a GGUF model is
scored without any tokenizer from the Hugging Face Hub.

`model` may be left out (lm-evaluation-harness never sends it): the server's one model is meant, or
the one loaded model when the server offers several."""

from __future__ import annotations

import asyncio
from typing import Any, Optional

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from .http import APIError, documented, log_entry, parse_body, state_of
from .pool import ModelPool, Served

router = APIRouter()


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TokenizeRequest(_Body):
    """Text (`prompt`) or a conversation (`messages`, through the model's chat template) in."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[dict[str, Any]]] = Field(None, min_length=1)
    add_special_tokens: bool = True  # the model's BOS where it asks for one
    add_generation_prompt: bool = True  # messages only
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    model: Optional[str] = None
    tokens: list[int]


async def _model_id(pool: ModelPool, model: Optional[str]) -> str:
    if model is not None:
        return model
    available = await asyncio.to_thread(pool.available)
    if len(available) == 1:
        return next(iter(available))
    if len(pool.loaded) == 1:
        return next(iter(pool.loaded))
    raise APIError(400, "missing required parameter: model (this server offers several models)", param="model",
                   code="missing_required_parameter")


async def _acquire(request: Request, model: Optional[str]) -> Served:
    pool = state_of(request).pool
    mid = await _model_id(pool, model)
    log_entry(request).model = mid
    return await pool.acquire(mid)


def _token_text(served: Served, token: Optional[int]) -> Optional[str]:
    return None if token is None else served.lm.tokenizer.token(token)


def _tokenize(served: Served, body: TokenizeRequest) -> list[int]:
    add_bos = None if body.add_special_tokens else False  # None: as the model asks
    if body.messages is not None:  # as /v1/chat/completions renders them (a preset's messages included)
        text = served.lm.template.render(served.lm.with_preset(body.messages), body.add_generation_prompt)
    else:
        text = body.prompt or ""
    return served.lm.tokenizer.encode(text, add_bos=add_bos)


@router.post("/tokenize", openapi_extra=documented(TokenizeRequest))
async def tokenize(request: Request) -> dict[str, Any]:
    body = await parse_body(request, TokenizeRequest)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give either prompt or messages", param="prompt", code="invalid_value")
    served = await _acquire(request, body.model)
    try:
        ids = await asyncio.to_thread(_tokenize, served, body)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": served.lm.config.context_length, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = [_token_text(served, t) for t in ids]
        return out
    finally:
        state_of(request).pool.release(served)


@router.post("/detokenize", openapi_extra=documented(DetokenizeRequest))
async def detokenize(request: Request) -> dict[str, Any]:
    body = await parse_body(request, DetokenizeRequest)
    served = await _acquire(request, body.model)
    try:
        vocab = served.lm.tokenizer.vocab_size
        bad = next((i for i, t in enumerate(body.tokens) if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"tokens[{bad}]: token ids must be integers in [0, {vocab})", param="tokens",
                           code="invalid_value")
        # special tokens are kept: the text encodes back to the same ids
        return {"prompt": await asyncio.to_thread(served.lm.tokenizer.decode, body.tokens)}
    finally:
        state_of(request).pool.release(served)


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request, model: Optional[str] = None) -> dict[str, Any]:
    """The tokenizer's special tokens (as text and ids), its chat template and the context length.
    A special token's text encodes back to its id (lm-evaluation-harness finds ids that way)."""
    served = await _acquire(request, model)
    try:
        tok, cfg = served.lm.tokenizer, served.lm.config
        eos_id = tok.eos_ids[0] if tok.eos_ids else None
        return {"model": served.id, "tokenizer_class": "ownlm",
                "bos_token": _token_text(served, tok.bos_id) or tok.bos_token or None, "bos_token_id": tok.bos_id,
                "eos_token": _token_text(served, eos_id) or tok.eos_token or None, "eos_token_id": eos_id,
                "eos_token_ids": list(tok.eos_ids), "add_bos_token": bool(tok.add_bos and tok.bos_id is not None),
                "chat_template": served.lm.template.source, "model_max_length": cfg.context_length,
                "vocab_size": tok.vocab_size}
    finally:
        state_of(request).pool.release(served)

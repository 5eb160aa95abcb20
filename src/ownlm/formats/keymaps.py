"""Tensor-name maps from file formats to the Transformer's names, declared as data.

Each map is a list of (regex over the file's name, replacement); names that match IGNORE are
dropped, any other name that matches nothing is an error (an unknown tensor means a model we
do not understand, never something to skip silently)."""

from __future__ import annotations

import re

from ..errors import ModelFormatError

HF = [
    (r"model\.embed_tokens\.weight", r"embed.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.(weight|bias)", r"layers.\1.attn.\2.\3"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.mlp_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.(weight|bias)", r"layers.\1.mlp.\2.\3"),
    (r"model\.norm\.weight", r"norm.weight"),
    (r"lm_head\.weight", r"lm_head.weight"),
]
HF_IGNORE = r".*rotary_emb\.inv_freq"

GGUF = [
    (r"token_embd\.weight", r"embed.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"layers.\1.attn_norm.weight"),
    (r"blk\.(\d+)\.attn_(q|k|v)\.(weight|bias)", r"layers.\1.attn.\2.\3"),
    (r"blk\.(\d+)\.attn_output\.(weight|bias)", r"layers.\1.attn.o.\2"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"layers.\1.mlp_norm.weight"),
    (r"blk\.(\d+)\.ffn_(gate|up|down)\.(weight|bias)", r"layers.\1.mlp.\2.\3"),
    (r"output_norm\.weight", r"norm.weight"),
    (r"output\.weight", r"lm_head.weight"),
]
GGUF_IGNORE = r"rope_freqs\.weight"  # consumed into the config's rope scaling

# GGUF architectures whose converter permuted Q/K rows into llama.cpp's interleaved rotary layout.
GGUF_PERMUTED_QK = {"llama"}

# Projections the Transformer runs fused: fused name -> the per-projection names the maps produce,
# concatenated along the output dimension in this order when loading.
FUSED = {"attn.qkv": ("attn.q", "attn.k", "attn.v"), "mlp.gate_up": ("mlp.gate", "mlp.up")}

_compiled: dict[int, list[tuple[re.Pattern, str]]] = {}


def rename(name: str, table: list[tuple[str, str]], ignore: str, where: str) -> str | None:
    """Our name for a file tensor, None when it is ignored; unknown names raise."""
    rules = _compiled.setdefault(id(table), [(re.compile(p), r) for p, r in table])
    for pattern, repl in rules:
        if pattern.fullmatch(name):
            return pattern.sub(repl, name)
    if re.fullmatch(ignore, name):
        return None
    raise ModelFormatError(f"{where}: unexpected tensor {name!r}", "this checkpoint has parts ownlm does not know")


def unpermute_qk(w, n_heads: int):
    """Undo llama.cpp's convert-time permutation of Q/K rows (interleaved -> half-rotated).
    Works on any array whose first axis is n_heads * head_dim (rows of quantized blocks too)."""
    rows = w.shape[0]
    rest = tuple(w.shape[1:])
    return w.reshape(n_heads, rows // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)

# Projection parts (model/adapters.py) -> the HF module that holds them, for PEFT adapter names
# ("base_model.model.model.layers.{i}.{module}.lora_A.weight").
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}

# The way back: our per-projection names -> file names, for export (model/adapters unfuses first).
HF_OUT = [
    (r"embed\.weight", r"model.embed_tokens.weight"),
    (r"layers\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"layers\.(\d+)\.attn\.(q|k|v|o)\.(weight|bias)", r"model.layers.\1.self_attn.\2_proj.\3"),
    (r"layers\.(\d+)\.mlp_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"layers\.(\d+)\.mlp\.(gate|up|down)\.(weight|bias)", r"model.layers.\1.mlp.\2_proj.\3"),
    (r"norm\.weight", r"model.norm.weight"),
    (r"lm_head\.weight", r"lm_head.weight"),
]
GGUF_OUT = [
    (r"embed\.weight", r"token_embd.weight"),
    (r"layers\.(\d+)\.attn_norm\.weight", r"blk.\1.attn_norm.weight"),
    (r"layers\.(\d+)\.attn\.(q|k|v)\.(weight|bias)", r"blk.\1.attn_\2.\3"),
    (r"layers\.(\d+)\.attn\.o\.(weight|bias)", r"blk.\1.attn_output.\2"),
    (r"layers\.(\d+)\.mlp_norm\.weight", r"blk.\1.ffn_norm.weight"),
    (r"layers\.(\d+)\.mlp\.(gate|up|down)\.(weight|bias)", r"blk.\1.ffn_\2.\3"),
    (r"norm\.weight", r"output_norm.weight"),
    (r"lm_head\.weight", r"output.weight"),
]


def permute_qk(w, n_heads: int):
    """llama.cpp's convert-time Q/K row order (half-rotated -> interleaved): the inverse of unpermute_qk."""
    rows = w.shape[0]
    rest = tuple(w.shape[1:])
    return w.reshape(n_heads, 2, rows // n_heads // 2, *rest).swapaxes(1, 2).reshape(rows, *rest)

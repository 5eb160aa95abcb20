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
    (r"model\.layers\.(\d+)\.self_attn\.qkv_proj\.(weight|bias)", r"layers.\1.attn.qkv.\2"),  # Phi-3: fused
    (r"model\.layers\.(\d+)\.self_attn\.(q|k)_norm\.weight", r"layers.\1.attn.\2_norm.weight"),  # Qwen3
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.mlp_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.(weight|bias)", r"layers.\1.mlp.\2.\3"),
    (r"model\.layers\.(\d+)\.mlp\.gate_up_proj\.(weight|bias)", r"layers.\1.mlp.gate_up.\2"),  # Phi-3: fused
    (r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight", r"layers.\1.mlp.router.weight"),  # Mixtral
    (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w1\.weight", r"layers.\1.mlp.experts.\2.gate.weight"),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w3\.weight", r"layers.\1.mlp.experts.\2.up.weight"),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w2\.weight", r"layers.\1.mlp.experts.\2.down.weight"),
    (r"model\.norm\.weight", r"norm.weight"),
    (r"lm_head\.weight", r"lm_head.weight"),
    # GPT-NeoX / Pythia; its fused query_key_value interleaves q, k, v per head (see QKV_PER_HEAD)
    (r"gpt_neox\.embed_in\.weight", r"embed.weight"),
    (r"gpt_neox\.layers\.(\d+)\.input_layernorm\.(weight|bias)", r"layers.\1.attn_norm.\2"),
    (r"gpt_neox\.layers\.(\d+)\.post_attention_layernorm\.(weight|bias)", r"layers.\1.mlp_norm.\2"),
    (r"gpt_neox\.layers\.(\d+)\.attention\.query_key_value\.(weight|bias)", r"layers.\1.attn.qkv_per_head.\2"),
    (r"gpt_neox\.layers\.(\d+)\.attention\.dense\.(weight|bias)", r"layers.\1.attn.o.\2"),
    (r"gpt_neox\.layers\.(\d+)\.mlp\.dense_h_to_4h\.(weight|bias)", r"layers.\1.mlp.up.\2"),
    (r"gpt_neox\.layers\.(\d+)\.mlp\.dense_4h_to_h\.(weight|bias)", r"layers.\1.mlp.down.\2"),
    (r"gpt_neox\.final_layer_norm\.(weight|bias)", r"norm.\1"),
    (r"embed_out\.weight", r"lm_head.weight"),
]
HF_IGNORE = r".*rotary_emb\.inv_freq|gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias)"
QKV_PER_HEAD = ".attn.qkv_per_head."

GGUF = [
    (r"token_embd\.weight", r"embed.weight"),
    (r"blk\.(\d+)\.attn_norm\.(weight|bias)", r"layers.\1.attn_norm.\2"),
    (r"blk\.(\d+)\.attn_(q|k|v)\.(weight|bias)", r"layers.\1.attn.\2.\3"),
    (r"blk\.(\d+)\.attn_qkv\.(weight|bias)", r"layers.\1.attn.qkv.\2"),
    (r"blk\.(\d+)\.attn_(q|k)_norm\.weight", r"layers.\1.attn.\2_norm.weight"),
    (r"blk\.(\d+)\.attn_output\.(weight|bias)", r"layers.\1.attn.o.\2"),
    (r"blk\.(\d+)\.ffn_norm\.(weight|bias)", r"layers.\1.mlp_norm.\2"),
    (r"blk\.(\d+)\.ffn_(gate|up|down)\.(weight|bias)", r"layers.\1.mlp.\2.\3"),
    (r"blk\.(\d+)\.ffn_gate_inp\.weight", r"layers.\1.mlp.router.weight"),
    (r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight", r"layers.\1.mlp.experts.*.\2.weight"),  # (experts, ...) stacked
    (r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight", r"layers.\1.mlp.experts.\3.\2.weight"),  # one per expert
    (r"output_norm\.(weight|bias)", r"norm.\1"),
    (r"output\.weight", r"lm_head.weight"),
]
# Per architecture, rules tried before the common ones: Phi-3 keeps gate and up fused in ffn_up.
GGUF_ARCH = {"phi3": [(r"blk\.(\d+)\.ffn_up\.(weight|bias)", r"layers.\1.mlp.gate_up.\2")]}
STACKED = ".experts.*."  # a GGUF tensor holding every expert of a layer, split on load
GGUF_IGNORE = r"rope_freqs\.weight"  # consumed into the config's rope scaling

# GGUF architectures whose converter permuted Q/K rows into llama.cpp's interleaved rotary layout.
GGUF_PERMUTED_QK = {"llama"}

# Projections the Transformer runs fused: fused name -> the per-projection names the maps produce,
# concatenated along the output dimension in this order when loading.
FUSED = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}

_compiled: dict[int, list[tuple[re.Pattern, str]]] = {}


def lookup(name: str, table: list[tuple[str, str]]) -> str | None:
    """The first rule's rewrite of `name`, None when no rule matches."""
    rules = _compiled.setdefault(id(table), [(re.compile(p), r) for p, r in table])
    for pattern, repl in rules:
        if pattern.fullmatch(name):
            return pattern.sub(repl, name)
    return None


def rename(name: str, table: list[tuple[str, str]], ignore: str, where: str) -> str | None:
    """Our name for a file tensor, None when it is ignored; unknown names raise."""
    ours = lookup(name, table)
    if ours is not None:
        return ours
    if re.fullmatch(ignore, name):
        return None
    raise ModelFormatError(f"{where}: unexpected tensor {name!r}", "this checkpoint has parts ownlm does not know")


def qkv_per_head_to_blocks(w, n_heads: int):
    """GPT-NeoX's fused rows (head, [q k v], head_dim) -> ours ([q k v], head, head_dim)."""
    rest = tuple(w.shape[1:])
    return w.reshape(n_heads, 3, w.shape[0] // n_heads // 3, *rest).swapaxes(0, 1).reshape(w.shape[0], *rest)


def qkv_blocks_to_per_head(w, n_heads: int):
    rest = tuple(w.shape[1:])
    return w.reshape(3, n_heads, w.shape[0] // n_heads // 3, *rest).swapaxes(0, 1).reshape(w.shape[0], *rest)


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
    (r"layers\.(\d+)\.attn\.(q|k)_norm\.weight", r"model.layers.\1.self_attn.\2_norm.weight"),
    (r"layers\.(\d+)\.mlp_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"layers\.(\d+)\.mlp\.(gate|up|down)\.(weight|bias)", r"model.layers.\1.mlp.\2_proj.\3"),
    (r"norm\.weight", r"model.norm.weight"),
    (r"lm_head\.weight", r"lm_head.weight"),
]
GGUF_OUT = [
    (r"embed\.weight", r"token_embd.weight"),
    (r"layers\.(\d+)\.attn_norm\.(weight|bias)", r"blk.\1.attn_norm.\2"),
    (r"layers\.(\d+)\.attn\.(q|k|v)\.(weight|bias)", r"blk.\1.attn_\2.\3"),
    (r"layers\.(\d+)\.attn\.(q|k)_norm\.weight", r"blk.\1.attn_\2_norm.weight"),
    (r"layers\.(\d+)\.attn\.o\.(weight|bias)", r"blk.\1.attn_output.\2"),
    (r"layers\.(\d+)\.mlp_norm\.(weight|bias)", r"blk.\1.ffn_norm.\2"),
    (r"layers\.(\d+)\.mlp\.(gate|up|down)\.(weight|bias)", r"blk.\1.ffn_\2.\3"),
    (r"layers\.(\d+)\.mlp\.router\.weight", r"blk.\1.ffn_gate_inp.weight"),
    (r"layers\.(\d+)\.mlp\.experts\.\d+\.(gate|up|down)\.weight", r"blk.\1.ffn_\2_exps.weight"),  # stacked
    (r"norm\.(weight|bias)", r"output_norm.\1"),
    (r"lm_head\.weight", r"output.weight"),
]
# llama.cpp architectures that keep projections fused (tried before GGUF_OUT; unmatched fused
# projections are split into their parts)
GGUF_OUT_ARCH = {
    "phi3": [(r"layers\.(\d+)\.attn\.qkv\.(weight|bias)", r"blk.\1.attn_qkv.\2"),
             (r"layers\.(\d+)\.mlp\.gate_up\.(weight|bias)", r"blk.\1.ffn_up.\2")],
    "gptneox": [(r"layers\.(\d+)\.attn\.qkv\.(weight|bias)", r"blk.\1.attn_qkv.\2")],
}


def permute_qk(w, n_heads: int):
    """llama.cpp's convert-time Q/K row order (half-rotated -> interleaved): the inverse of unpermute_qk."""
    rows = w.shape[0]
    rest = tuple(w.shape[1:])
    return w.reshape(n_heads, 2, rows // n_heads // 2, *rest).swapaxes(1, 2).reshape(rows, *rest)

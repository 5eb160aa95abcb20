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
    # GPT-NeoX / Pythia and Falcon fuse query_key_value per KV-head group (see QKV_GROUPED)
    (r"gpt_neox\.embed_in\.weight", r"embed.weight"),
    (r"gpt_neox\.layers\.(\d+)\.input_layernorm\.(weight|bias)", r"layers.\1.attn_norm.\2"),
    (r"gpt_neox\.layers\.(\d+)\.post_attention_layernorm\.(weight|bias)", r"layers.\1.mlp_norm.\2"),
    (r"gpt_neox\.layers\.(\d+)\.attention\.query_key_value\.(weight|bias)", r"layers.\1.attn.qkv_grouped.\2"),
    (r"gpt_neox\.layers\.(\d+)\.attention\.dense\.(weight|bias)", r"layers.\1.attn.o.\2"),
    (r"gpt_neox\.layers\.(\d+)\.mlp\.dense_h_to_4h\.(weight|bias)", r"layers.\1.mlp.up.\2"),
    (r"gpt_neox\.layers\.(\d+)\.mlp\.dense_4h_to_h\.(weight|bias)", r"layers.\1.mlp.down.\2"),
    (r"gpt_neox\.final_layer_norm\.(weight|bias)", r"norm.\1"),
    (r"embed_out\.weight", r"lm_head.weight"),
    (r"transformer\.word_embeddings\.weight", r"embed.weight"),
    (r"transformer\.h\.(\d+)\.(?:ln_attn|input_layernorm)\.(weight|bias)", r"layers.\1.attn_norm.\2"),
    (r"transformer\.h\.(\d+)\.(?:ln_mlp|post_attention_layernorm)\.(weight|bias)", r"layers.\1.mlp_norm.\2"),
    (r"transformer\.h\.(\d+)\.self_attention\.query_key_value\.(weight|bias)", r"layers.\1.attn.qkv_grouped.\2"),
    (r"transformer\.h\.(\d+)\.self_attention\.dense\.(weight|bias)", r"layers.\1.attn.o.\2"),
    (r"transformer\.h\.(\d+)\.mlp\.dense_h_to_4h\.(weight|bias)", r"layers.\1.mlp.up.\2"),
    (r"transformer\.h\.(\d+)\.mlp\.dense_4h_to_h\.(weight|bias)", r"layers.\1.mlp.down.\2"),
    (r"transformer\.ln_f\.(weight|bias)", r"norm.\1"),
    # MPT
    (r"transformer\.wte\.weight", r"embed.weight"),
    (r"transformer\.blocks\.(\d+)\.norm_1\.(weight|bias)", r"layers.\1.attn_norm.\2"),
    (r"transformer\.blocks\.(\d+)\.norm_2\.(weight|bias)", r"layers.\1.mlp_norm.\2"),
    (r"transformer\.blocks\.(\d+)\.attn\.Wqkv\.(weight|bias)", r"layers.\1.attn.qkv.\2"),
    (r"transformer\.blocks\.(\d+)\.attn\.out_proj\.(weight|bias)", r"layers.\1.attn.o.\2"),
    (r"transformer\.blocks\.(\d+)\.ffn\.(up|down)_proj\.(weight|bias)", r"layers.\1.mlp.\2.\3"),
    (r"transformer\.norm_f\.(weight|bias)", r"norm.\1"),
]
# Per HF model_type, rules tried before the common ones: Gemma 3's post_attention_layernorm is a
# norm on the attention output, not the MLP's input norm.
_GEMMA_NORMS = [
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.attn_post_norm.weight"),
    (r"model\.layers\.(\d+)\.pre_feedforward_layernorm\.weight", r"layers.\1.mlp_norm.weight"),
    (r"model\.layers\.(\d+)\.post_feedforward_layernorm\.weight", r"layers.\1.mlp_post_norm.weight"),
]
HF_ARCH = {"gemma3_text": _GEMMA_NORMS}
HF_IGNORE = r".*rotary_emb\.inv_freq|gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias)"
QKV_GROUPED = ".attn.qkv_grouped."

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
GGUF_ARCH = {"phi3": [(r"blk\.(\d+)\.ffn_up\.(weight|bias)", r"layers.\1.mlp.gate_up.\2")],
             "falcon": [(r"blk\.(\d+)\.attn_norm_2\.(weight|bias)", r"layers.\1.mlp_norm.\2")],
             "gemma3": [(r"blk\.(\d+)\.post_attention_norm\.weight", r"layers.\1.attn_post_norm.weight"),
                        (r"blk\.(\d+)\.post_ffw_norm\.weight", r"layers.\1.mlp_post_norm.weight")]}
STACKED = ".experts.*."  # a GGUF tensor holding every expert of a layer, split on load
GGUF_IGNORE = r"rope_freqs\.weight|rope_factors_(long|short)\.weight"  # consumed into the config's rope scaling

# GGUF architectures whose converter permuted Q/K rows into llama.cpp's interleaved rotary layout.
GGUF_PERMUTED_QK = {"llama"}

# Projections the Transformer runs fused: fused name -> the per-projection names the maps produce,
# concatenated along the output dimension in this order when loading.
FUSED = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}

_compiled: dict[str, re.Pattern] = {}  # by pattern text (tables are concatenated per architecture)


def lookup(name: str, table: list[tuple[str, str]]) -> str | None:
    """The first rule's rewrite of `name`, None when no rule matches."""
    for p, repl in table:
        pattern = _compiled.get(p) or _compiled.setdefault(p, re.compile(p))
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


def qkv_grouped_to_blocks(w, n_heads: int, n_kv: int):
    """Fused rows laid out per KV head: (kv group, [its query heads, k, v], head_dim), as GPT-NeoX
    (one query head per group) and Falcon keep them -> ours: all q rows, then k, then v.
    Works on numpy arrays and torch tensors (rows picked by index)."""
    group = n_heads // n_kv
    hd = w.shape[0] // (n_heads + 2 * n_kv)

    def rows(kv: int, j: int) -> range:
        start = (kv * (group + 2) + j) * hd
        return range(start, start + hd)

    order = [r for kv in range(n_kv) for j in range(group) for r in rows(kv, j)]
    for j in (group, group + 1):  # every k row, then every v row
        order += [r for kv in range(n_kv) for r in rows(kv, j)]
    return w[order]


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
    "mpt": [(r"layers\.(\d+)\.attn\.qkv\.(weight|bias)", r"blk.\1.attn_qkv.\2")],
    "falcon": [(r"layers\.(\d+)\.attn\.qkv\.(weight|bias)", r"blk.\1.attn_qkv.\2"),
               (r"layers\.(\d+)\.mlp_norm\.(weight|bias)", r"blk.\1.attn_norm_2.\2")],
    "gemma3": [(r"layers\.(\d+)\.attn_post_norm\.weight", r"blk.\1.post_attention_norm.weight"),
               (r"layers\.(\d+)\.mlp_post_norm\.weight", r"blk.\1.post_ffw_norm.weight")],
}


def permute_qk(w, n_heads: int):
    """llama.cpp's convert-time Q/K row order (half-rotated -> interleaved): the inverse of unpermute_qk."""
    rows = w.shape[0]
    rest = tuple(w.shape[1:])
    return w.reshape(n_heads, 2, rows // n_heads // 2, *rest).swapaxes(1, 2).reshape(rows, *rest)

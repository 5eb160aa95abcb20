"""Tensor-name maps between file formats and the Transformer's names, and the layouts files keep
tensors in, declared as data. The common maps are here (the Llama layout of HF folders, llama.cpp's
GGUF names); a family's own rules, tried first, and the layouts it declares are in its record
(model/families.py).

Each map is a sequence of (regex over the file's name, replacement); names that match IGNORE are
dropped, any other name that matches nothing is an error (an unknown tensor means a model we
do not understand, never something to skip silently)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ModelFormatError
from ..model.config import ModelConfig
from ..model.families import Family, Rules

HF: Rules = (
    (r"model\.embed_tokens\.weight", r"embed.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.(weight|bias)", r"layers.\1.attn.\2.\3"),
    (r"model\.layers\.(\d+)\.self_attn\.(q|k)_norm\.weight", r"layers.\1.attn.\2_norm.weight"),  # qk-norm
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.mlp_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.(weight|bias)", r"layers.\1.mlp.\2.\3"),
    (r"model\.norm\.weight", r"norm.weight"),
    (r"lm_head\.weight", r"lm_head.weight"),
)
HF_IGNORE = r".*rotary_emb\.inv_freq"

GGUF: Rules = (
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
)
STACKED = ".experts.*."  # a GGUF tensor holding every expert of a layer, split on load
GGUF_IGNORE = r"rope_freqs\.weight|rope_factors_(long|short)\.weight"  # consumed into the config's rope scaling

# Projections the Transformer runs fused: fused name -> the per-projection names the maps produce,
# concatenated along the output dimension in this order when loading.
FUSED = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}

# Projection parts (model/adapters.py) -> the HF module that holds them, for PEFT adapter names
# ("base_model.model.model.layers.{i}.{module}.lora_A.weight").
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}

# The way back: our per-projection names -> file names, for export (model/adapters unfuses first).
HF_OUT: Rules = (
    (r"embed\.weight", r"model.embed_tokens.weight"),
    (r"layers\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"layers\.(\d+)\.attn\.(q|k|v|o)\.(weight|bias)", r"model.layers.\1.self_attn.\2_proj.\3"),
    (r"layers\.(\d+)\.attn\.(q|k)_norm\.weight", r"model.layers.\1.self_attn.\2_norm.weight"),
    (r"layers\.(\d+)\.mlp_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"layers\.(\d+)\.mlp\.(gate|up|down)\.(weight|bias)", r"model.layers.\1.mlp.\2_proj.\3"),
    (r"norm\.weight", r"model.norm.weight"),
    (r"lm_head\.weight", r"lm_head.weight"),
)
GGUF_OUT: Rules = (
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
)

_compiled: dict[str, re.Pattern] = {}  # by pattern text (a family's rules come before the common ones)


def lookup(name: str, table: Rules) -> str | None:
    """The first rule's rewrite of `name`, None when no rule matches."""
    for p, repl in table:
        pattern = _compiled.get(p) or _compiled.setdefault(p, re.compile(p))
        if pattern.fullmatch(name):
            return pattern.sub(repl, name)
    return None


def rename(name: str, table: Rules, ignore: str, where: str) -> str | None:
    """Our name for a file tensor, None when it is ignored; unknown names raise."""
    ours = lookup(name, table)
    if ours is not None:
        return ours
    if re.fullmatch(ignore, name):
        return None
    raise ModelFormatError(f"{where}: unexpected tensor {name!r}", "this checkpoint has parts ownlm does not know")


def from_hf_name(name: str, fam: Family, where: str = "safetensors") -> str | None:
    """Our name for a tensor of `fam`'s HF folder (None: not a weight)."""
    return rename(name, fam.hf_tensors + HF, "|".join(filter(None, (HF_IGNORE, fam.hf_ignore))), where)


def from_gguf_name(name: str, fam: Family, where: str = "GGUF") -> str | None:
    """Our name for a tensor of `fam`'s GGUF file (None: consumed elsewhere, e.g. rope factors)."""
    return rename(name, fam.gguf_tensors + GGUF, GGUF_IGNORE, where)


def gguf_out(fam: Family) -> Rules:
    """Our names -> llama.cpp's for `fam`."""
    return fam.gguf_out + GGUF_OUT


# -- layouts ------------------------------------------------------------------------------------
# How a file keeps some tensors other than we do. `load` turns the file's layout into ours, `save`
# turns ours into the file's; both take (array, our name, config) and work on numpy arrays and
# torch tensors alike. A layout of tensors that may stay quantized (linear weights) must only
# reorder rows, so it applies to rows of quantized blocks too.
@dataclass(frozen=True)
class Layout:
    suffixes: tuple[str, ...]  # our names of the tensors it applies to end in one of these
    load: Callable[[Any, str, ModelConfig], Any]
    save: Callable[[Any, str, ModelConfig], Any]


def _qk_rows(w, ours: str, cfg: ModelConfig, to_file: bool):
    """llama.cpp's convert-time Q/K row order, interleaved per rotary pair, from ours (half-rotated:
    first halves, then second halves) or back."""
    heads = cfg.n_heads if ".attn.q." in ours else cfg.n_kv_heads
    rows, rest = w.shape[0], tuple(w.shape[1:])
    if rows % (2 * heads):  # checked against the config before (checkpoint.check_tensors); never reshape blindly
        raise ModelFormatError(f"tensor {ours!r} (our name): {rows} rows do not split into {heads} heads of pairs")
    split = (heads, 2, rows // heads // 2) if to_file else (heads, rows // heads // 2, 2)
    return w.reshape(*split, *rest).swapaxes(1, 2).reshape(rows, *rest)


def _grouped_rows(rows: int, cfg: ModelConfig) -> list[int]:
    """Fused q/k/v rows laid out per KV head, (kv group, [its query heads, k, v], head_dim), as
    GPT-NeoX (one query head per group) and Falcon keep them: the row order that makes ours,
    all q rows, then k, then v."""
    group = cfg.n_heads // cfg.n_kv_heads
    hd = rows // (cfg.n_heads + 2 * cfg.n_kv_heads)

    def head(kv: int, j: int) -> range:
        start = (kv * (group + 2) + j) * hd
        return range(start, start + hd)

    order = [r for kv in range(cfg.n_kv_heads) for j in range(group) for r in head(kv, j)]
    for j in (group, group + 1):  # every k row, then every v row
        order += [r for kv in range(cfg.n_kv_heads) for r in head(kv, j)]
    return order


def _grouped_to_blocks(w, ours: str, cfg: ModelConfig):
    return w[_grouped_rows(w.shape[0], cfg)]


def _blocks_to_grouped(w, ours: str, cfg: ModelConfig):
    order = _grouped_rows(w.shape[0], cfg)
    return w[sorted(range(len(order)), key=order.__getitem__)]  # the inverse permutation


LAYOUTS = {
    # llama.cpp's converter permutes Llama's Q/K rows into its interleaved rotary layout
    "permuted_qk": Layout(("attn.q.weight", "attn.q.bias", "attn.k.weight", "attn.k.bias"),
                          lambda w, ours, c: _qk_rows(w, ours, c, to_file=False),
                          lambda w, ours, c: _qk_rows(w, ours, c, to_file=True)),
    # llama.cpp's converter stores norms that scale by (offset + w) as offset + w (Gemma); ours hold w
    "offset_norms": Layout(("norm.weight",), lambda w, ours, c: w - c.norm_offset,
                           lambda w, ours, c: w + c.norm_offset),
    # q/k/v fused per KV-head group (GPT-NeoX, Falcon); ours: the q block, then k, then v
    "grouped_qkv": Layout(("attn.qkv.weight", "attn.qkv.bias"), _grouped_to_blocks, _blocks_to_grouped),
}


def to_ours(layouts: tuple[str, ...], ours: str, w, cfg: ModelConfig):
    """A file's tensor (our name `ours`) with the file's declared layouts undone."""
    for name in layouts:
        if ours.endswith(LAYOUTS[name].suffixes):
            w = LAYOUTS[name].load(w, ours, cfg)
    return w


def to_file(layouts: tuple[str, ...], ours: str, w, cfg: ModelConfig):
    """Our tensor in the file's declared layouts: the inverse of to_ours."""
    for name in reversed(layouts):
        if ours.endswith(LAYOUTS[name].suffixes):
            w = LAYOUTS[name].save(w, ours, cfg)
    return w

"""The model families ownlm runs, one record each. A record holds everything that differs between
families: the spellings of the architecture name, config.json's key names, the config switches,
tensor names HF -> ours <-> GGUF with the layouts the files keep them in, the names an export
writes and the tuning methods that work. Everything else (config parsing, loaders, exporters,
the one Transformer) is written once and reads the record; no code asks a family's name.

The architecture name is normalized once, where a checkpoint's metadata is read (model/config.py):
`ModelConfig.architecture` is always a record's canonical name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..errors import ModelFormatError
from . import metadata

Rules = tuple[tuple[str, str], ...]  # (regex over a tensor's name, replacement); the first match wins
KeyTranslation = Callable[[Mapping[str, Any], str], dict[str, Any]]


@dataclass(frozen=True)
class Family:
    name: str  # canonical architecture name: HF's model_type (so an HF export's model_type is this)
    aliases: tuple[str, ...] = ()  # other spellings: llama.cpp's general.architecture, HF model_type variants
    switches: Mapping[str, Any] = field(default_factory=dict)  # ModelConfig fields that differ from its defaults
    # reading the metadata
    act: str = "silu"  # the one activation config.json may name
    mha: bool = False  # as many KV heads as query heads, whatever the metadata says
    swa_pattern: int = 0  # every Nth layer global, where the metadata lists no per-layer kinds
    swa_opt_in: bool = False  # config.json's sliding_window counts only with use_sliding_window
    second_norm: str = ""  # a GGUF tensor whose absence means one norm feeds both branches
    hf_keys: KeyTranslation | None = None  # config.json in the common key names (families that use others)
    # tensors: rules tried before the common ones in formats/keymaps.py (the Llama layout, llama.cpp's names);
    # layouts name transforms of formats/keymaps.LAYOUTS, undone on load and redone on export
    hf_tensors: Rules = ()
    hf_ignore: str = ""  # regex of HF tensors that are not weights
    hf_layout: tuple[str, ...] = ()
    gguf_tensors: Rules = ()
    gguf_out: Rules = ()  # ours -> GGUF; a fused projection without a rule is written as its parts
    gguf_layout: tuple[str, ...] = ()
    # exports and tuning
    gguf_arch: str = ""  # llama.cpp's architecture name, written by the GGUF export (every family has one)
    hf_class: str = ""  # transformers' class, written by the HF export ("": none)
    tuning: tuple[str, ...] = ()  # lora, qlora: PEFT adapters (Llama's module names); full: stored by the HF export


def number(value: Any, name: str, kind: type = int) -> Any:
    """A value that must be an integer (or, kind=float, a finite number): files are hostile."""
    return metadata.Key("int" if kind is int else "float").check(value, name, "model config")


def _falcon_keys(cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Falcon's config.json in the common key names (its three layouts of heads and norms)."""
    if cfg.get("alibi"):
        raise ModelFormatError(f"{where}: Falcon with ALiBi is not supported", "RoPE Falcon models are")
    heads = cfg.get("num_attention_heads")
    new = bool(cfg.get("new_decoder_architecture"))
    kv = cfg.get("num_kv_heads", heads) if new else (1 if cfg.get("multi_query", True) else heads)
    parallel = bool(cfg.get("parallel_attn", True))
    bias = bool(cfg.get("bias", False))
    return {**cfg, "num_key_value_heads": kv, "hidden_act": cfg.get("activation", "gelu"),
            "intermediate_size": cfg.get("ffn_hidden_size") or 4 * number(cfg.get("hidden_size"), "hidden_size"),
            "attention_bias": bias, "mlp_bias": bias, "use_parallel_residual": parallel,
            "shared_norm": parallel and (not new or cfg.get("num_ln_in_parallel_attn") == 1)}


def _mpt_keys(cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    """MPT's config.json in the common key names."""
    attn = cfg.get("attn_config") or {}
    if not isinstance(attn, dict) or not attn.get("alibi", False) or attn.get("qk_ln"):
        raise ModelFormatError(f"{where}: only MPT with ALiBi (no qk LayerNorm) is supported")
    if attn.get("softmax_scale") or cfg.get("logit_scale"):
        raise ModelFormatError(f"{where}: MPT softmax_scale / logit_scale are not supported")
    dim = number(cfg.get("d_model"), "d_model")
    bias = not cfg.get("no_bias", True)
    return {**cfg, "hidden_size": dim, "num_attention_heads": cfg.get("n_heads"),
            "num_hidden_layers": cfg.get("n_layers"),
            "intermediate_size": int(dim * number(cfg.get("expansion_ratio", 4), "expansion_ratio", float)),
            "max_position_embeddings": cfg.get("max_seq_len", 2048), "hidden_act": "gelu", "attention_bias": bias,
            "mlp_bias": bias, "norm_bias": bias, "alibi_max": attn.get("alibi_bias_max", 8),
            "clip_qkv": attn.get("clip_qkv")}


_ALL_TUNING = ("lora", "qlora", "full")
_LLAMA_QK = ("permuted_qk",)  # llama.cpp's converter permutes Llama's Q/K rows into its rotary layout
_QKV_OUT = ((r"layers\.(\d+)\.attn\.qkv\.(weight|bias)", r"blk.\1.attn_qkv.\2"),)  # llama.cpp keeps q/k/v fused
_GELU_LAYERNORM = {"norm": "layer", "norm_bias": True, "mlp": "gelu", "parallel_residual": True}

FAMILIES: tuple[Family, ...] = (
    Family("llama", gguf_arch="llama", gguf_layout=_LLAMA_QK, hf_class="LlamaForCausalLM", tuning=_ALL_TUNING),
    Family("mistral", gguf_arch="llama", gguf_layout=_LLAMA_QK, hf_class="MistralForCausalLM", tuning=_ALL_TUNING),
    Family("qwen2", switches={"qkv_bias": True},  # fixed by the architecture: config.json has no attention_bias
           swa_opt_in=True, gguf_arch="qwen2", hf_class="Qwen2ForCausalLM", tuning=_ALL_TUNING),
    Family("qwen3", switches={"qk_norm": True}, swa_opt_in=True, gguf_arch="qwen3", hf_class="Qwen3ForCausalLM",
           tuning=_ALL_TUNING),
    Family("phi3", gguf_arch="phi3",  # q/k/v and gate/up fused in both formats
           hf_tensors=((r"model\.layers\.(\d+)\.self_attn\.qkv_proj\.(weight|bias)", r"layers.\1.attn.qkv.\2"),
                       (r"model\.layers\.(\d+)\.mlp\.gate_up_proj\.(weight|bias)", r"layers.\1.mlp.gate_up.\2")),
           gguf_tensors=((r"blk\.(\d+)\.ffn_up\.(weight|bias)", r"layers.\1.mlp.gate_up.\2"),),
           gguf_out=_QKV_OUT + ((r"layers\.(\d+)\.mlp\.gate_up\.(weight|bias)", r"blk.\1.ffn_up.\2"),)),
    Family("mixtral", gguf_arch="llama", gguf_layout=_LLAMA_QK,
           hf_tensors=((r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight", r"layers.\1.mlp.router.weight"),
                       (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w1\.weight",
                        r"layers.\1.mlp.experts.\2.gate.weight"),
                       (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w3\.weight",
                        r"layers.\1.mlp.experts.\2.up.weight"),
                       (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w2\.weight",
                        r"layers.\1.mlp.experts.\2.down.weight"))),
    Family("gpt_neox", aliases=("gptneox",), act="gelu", mha=True,
           switches={**_GELU_LAYERNORM, "qkv_bias": True, "o_bias": True, "mlp_bias": True},
           hf_tensors=((r"gpt_neox\.embed_in\.weight", r"embed.weight"),
                       (r"gpt_neox\.layers\.(\d+)\.input_layernorm\.(weight|bias)", r"layers.\1.attn_norm.\2"),
                       (r"gpt_neox\.layers\.(\d+)\.post_attention_layernorm\.(weight|bias)", r"layers.\1.mlp_norm.\2"),
                       (r"gpt_neox\.layers\.(\d+)\.attention\.query_key_value\.(weight|bias)",
                        r"layers.\1.attn.qkv.\2"),
                       (r"gpt_neox\.layers\.(\d+)\.attention\.dense\.(weight|bias)", r"layers.\1.attn.o.\2"),
                       (r"gpt_neox\.layers\.(\d+)\.mlp\.dense_h_to_4h\.(weight|bias)", r"layers.\1.mlp.up.\2"),
                       (r"gpt_neox\.layers\.(\d+)\.mlp\.dense_4h_to_h\.(weight|bias)", r"layers.\1.mlp.down.\2"),
                       (r"gpt_neox\.final_layer_norm\.(weight|bias)", r"norm.\1"),
                       (r"embed_out\.weight", r"lm_head.weight")),
           hf_ignore=r"gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias)",  # causal-mask buffers of old files
           hf_layout=("grouped_qkv",), gguf_arch="gptneox", gguf_out=_QKV_OUT),
    Family("falcon", act="gelu", switches={**_GELU_LAYERNORM, "tie_embeddings": True},
           second_norm="blk.0.attn_norm_2.weight", hf_keys=_falcon_keys,
           hf_tensors=((r"transformer\.word_embeddings\.weight", r"embed.weight"),
                       (r"transformer\.h\.(\d+)\.(?:ln_attn|input_layernorm)\.(weight|bias)",
                        r"layers.\1.attn_norm.\2"),
                       (r"transformer\.h\.(\d+)\.(?:ln_mlp|post_attention_layernorm)\.(weight|bias)",
                        r"layers.\1.mlp_norm.\2"),
                       (r"transformer\.h\.(\d+)\.self_attention\.query_key_value\.(weight|bias)",
                        r"layers.\1.attn.qkv.\2"),
                       (r"transformer\.h\.(\d+)\.self_attention\.dense\.(weight|bias)", r"layers.\1.attn.o.\2"),
                       (r"transformer\.h\.(\d+)\.mlp\.dense_h_to_4h\.(weight|bias)", r"layers.\1.mlp.up.\2"),
                       (r"transformer\.h\.(\d+)\.mlp\.dense_4h_to_h\.(weight|bias)", r"layers.\1.mlp.down.\2"),
                       (r"transformer\.ln_f\.(weight|bias)", r"norm.\1")),
           hf_layout=("grouped_qkv",), gguf_arch="falcon",
           gguf_tensors=((r"blk\.(\d+)\.attn_norm_2\.(weight|bias)", r"layers.\1.mlp_norm.\2"),),
           gguf_out=_QKV_OUT + ((r"layers\.(\d+)\.mlp_norm\.(weight|bias)", r"blk.\1.attn_norm_2.\2"),)),
    Family("mpt", act="gelu", mha=True, hf_keys=_mpt_keys,
           switches={"norm": "layer", "mlp": "gelu", "tie_embeddings": True, "position": "alibi", "alibi_max": 8.0},
           hf_tensors=((r"transformer\.wte\.weight", r"embed.weight"),
                       (r"transformer\.blocks\.(\d+)\.norm_1\.(weight|bias)", r"layers.\1.attn_norm.\2"),
                       (r"transformer\.blocks\.(\d+)\.norm_2\.(weight|bias)", r"layers.\1.mlp_norm.\2"),
                       (r"transformer\.blocks\.(\d+)\.attn\.Wqkv\.(weight|bias)", r"layers.\1.attn.qkv.\2"),
                       (r"transformer\.blocks\.(\d+)\.attn\.out_proj\.(weight|bias)", r"layers.\1.attn.o.\2"),
                       (r"transformer\.blocks\.(\d+)\.ffn\.(up|down)_proj\.(weight|bias)", r"layers.\1.mlp.\2.\3"),
                       (r"transformer\.norm_f\.(weight|bias)", r"norm.\1")),
           gguf_arch="mpt", gguf_out=_QKV_OUT),
    Family("gemma3_text", aliases=("gemma3",), act="gelu_pytorch_tanh", swa_pattern=6,
           switches={"tie_embeddings": True, "mlp": "gated_gelu_tanh", "qk_norm": True, "norm_offset": 1.0,
                     "embed_scale": True, "post_norms": True},
           # post_attention_layernorm is a norm on the attention's output here, not the MLP's input norm
           hf_tensors=((r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.attn_post_norm.weight"),
                       (r"model\.layers\.(\d+)\.pre_feedforward_layernorm\.weight", r"layers.\1.mlp_norm.weight"),
                       (r"model\.layers\.(\d+)\.post_feedforward_layernorm\.weight",
                        r"layers.\1.mlp_post_norm.weight")),
           gguf_tensors=((r"blk\.(\d+)\.post_attention_norm\.weight", r"layers.\1.attn_post_norm.weight"),
                         (r"blk\.(\d+)\.post_ffw_norm\.weight", r"layers.\1.mlp_post_norm.weight")),
           gguf_out=((r"layers\.(\d+)\.attn_post_norm\.weight", r"blk.\1.post_attention_norm.weight"),
                     (r"layers\.(\d+)\.mlp_post_norm\.weight", r"blk.\1.post_ffw_norm.weight")),
           gguf_layout=("offset_norms",), gguf_arch="gemma3", tuning=("lora", "qlora")),
)
_BY_NAME = {n: f for f in FAMILIES for n in (f.name, *f.aliases)}


def lookup(arch: str, where: str = "model") -> Family:
    """The record of an architecture name as a file (or an older ownlm) spells it; unknown names are an error."""
    if arch not in _BY_NAME:
        raise ModelFormatError(f"{where}: architecture {arch!r} is not supported",
                               f"supported: {', '.join(f.name for f in FAMILIES)}")
    return _BY_NAME[arch]

"""Export to an HF folder (config.json, model.safetensors, tokenizer files) that transformers
loads with AutoModelForCausalLM / AutoTokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import BadRequest
from ..formats import keymaps
from ..formats.hf import write_safetensors
from ..model.families import FAMILIES
from ..store.store import Store
from .tensors import file_tensors


def hf_config(lm, dtype: torch.dtype) -> dict[str, Any]:
    c = lm.config
    fam = c.family
    if not fam.hf_class:
        raise BadRequest(f"exporting {c.architecture} models as HF folders is not supported yet",
                         f"supported: {', '.join(f.name for f in FAMILIES if f.hf_class)}")
    if c.norm != "rms" or c.mlp != "gated_silu" or c.rotary_dim or c.parallel_residual or c.n_experts:
        raise BadRequest(f"this {c.architecture} model's switches have no HF config form here",
                         "export to GGUF instead")
    # a family whose record fixes qkv_bias (Qwen2: q/k/v biases, no o bias) has no attention_bias key
    fixed_bias = "qkv_bias" in fam.switches
    if not fixed_bias and c.qkv_bias != c.o_bias:
        raise BadRequest(f"{c.architecture} in transformers has biases on all of q, k, v, o or none; "
                         "this model differs")
    cfg: dict[str, Any] = {
        "architectures": [fam.hf_class], "model_type": fam.name, "vocab_size": c.vocab_size,
        "hidden_size": c.dim, "intermediate_size": c.ffn_dim, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
        "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "max_position_embeddings": c.context_length,
        "tie_word_embeddings": c.tie_embeddings, "hidden_act": "silu", "mlp_bias": c.mlp_bias,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": lm.tokenizer.bos_id, "eos_token_id": (lm.tokenizer.eos_ids or [None])[0],
    }
    if not fixed_bias:
        cfg["attention_bias"] = c.qkv_bias
    s = c.rope_scaling
    if s.kind == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": s.factor}
    elif s.kind == "llama3":
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                               "high_freq_factor": s.high_freq_factor,
                               "original_max_position_embeddings": s.original_context}
    elif s.kind != "none":
        raise BadRequest(f"rope scaling {s.kind!r} has no HF config form", "export to GGUF instead")
    cfg["sliding_window"] = c.sliding_window or None  # null, not left out: MistralConfig's default is 4096
    if c.sliding_window and fam.swa_opt_in:
        cfg["use_sliding_window"] = True
    return cfg


def _tokenizer_json(tok) -> str:
    """tokenizer.json, with a post-processor that puts BOS before a text where the model asks for
    one and the file has none (a tokenizer built from a GGUF): transformers adds BOS that way, not
    from tokenizer_config.json's add_bos_token."""
    text = tok.tk.to_str()
    if not (tok.add_bos and tok.bos_id is not None and tok.bos_token) or json.loads(text).get("post_processor"):
        return text
    from tokenizers import Tokenizer, processors

    tk = Tokenizer.from_str(text)
    bos = tok.bos_token
    tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                                                      special_tokens=[(bos, tok.bos_id)])
    return tk.to_str()


def write_hf_folder(lm, out: Path, state: dict[str, torch.Tensor] | None = None,
                    dtype: torch.dtype = torch.float32, replace: bool = False) -> Path:
    """Write `lm` (a LoadedModel; adapters merged, int4 dequantized) as an HF folder at `out`
    (through a temp folder the store sweeps if this process is killed)."""
    out = Path(out)
    cfg = hf_config(lm, dtype)
    tensors = {}
    for hf_name, _, t in file_tensors(lm.model, keymaps.HF_OUT, state):
        tensors[hf_name] = t.to(dtype)
    tok = lm.tokenizer
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.bos_token or None,
            "eos_token": tok.eos_token or None, "add_bos_token": tok.add_bos,
            "model_max_length": lm.config.context_length}
    if not lm.template.is_fallback:
        tcfg["chat_template"] = lm.template.source
    try:
        with Store().atomic_out(out, folder=True, replace=replace) as tmp:
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
            (tmp / "generation_config.json").write_text(json.dumps(
                {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_ids or None}, indent=2), encoding="utf-8")
            (tmp / "tokenizer.json").write_text(_tokenizer_json(tok), encoding="utf-8")
            (tmp / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2), encoding="utf-8")
            write_safetensors(tmp / "model.safetensors", tensors, {"format": "pt"})
    except FileExistsError:
        raise BadRequest(f"{out} already exists", "choose another --out, or remove it") from None
    return out

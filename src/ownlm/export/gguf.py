"""Export to a GGUF file with the `gguf` package's writer: llama.cpp's architecture and tensor
names and layouts from the family's record (Llama Q/K rows permuted into its rotary layout, Gemma's
norms as 1 + w), tokenizer, chat template and metadata; weights in F32, F16, Q8_0 or Q4_0."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers

from ..errors import BadRequest
from ..formats import keymaps
from ..formats import tokenizer as tok_formats
from ..model.transformer import rope_frequencies
from ..store.store import Store
from .tensors import file_tensors

Q = gguf.GGMLQuantizationType
QUANTS = {"f32": (Q.F32, gguf.LlamaFileType.ALL_F32), "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
          "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0), "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0)}


def _pre_name(tk: Tokenizer) -> str:
    """llama.cpp's name for this byte-level BPE pre-tokenizer (the inverse of formats/tokenizer)."""
    own = json.loads(tk.to_str()).get("pre_tokenizer")
    for name, build in tok_formats.PRE_TOKENIZERS.items():
        probe = Tokenizer(models.BPE())
        parts = build()
        for form in (pre_tokenizers.Sequence(parts),) + ((parts[0],) if len(parts) == 1 else ()):
            probe.pre_tokenizer = form
            if json.loads(probe.to_str()).get("pre_tokenizer") == own:
                return name
    raise BadRequest("this tokenizer's pre-tokenizer has no llama.cpp name, so a GGUF could not reproduce it",
                     "export --format safetensors instead")


def _space_prefix(spec: dict) -> bool:
    """Whether a SentencePiece-style tokenizer.json starts text with its word marker (GGUF's
    add_space_prefix): a Prepend normalizer (older files), or a Metaspace pre-tokenizer that
    prepends (prepend_scheme "first" or "always", or the older add_prefix_space; what current
    transformers writes for Llama and Mistral, with no normalizer)."""
    if "Prepend" in json.dumps(spec.get("normalizer")):
        return True

    def metaspaces(node):
        if isinstance(node, dict):
            if node.get("type") == "Metaspace":
                yield node
            for sub in node.get("pretokenizers") or ():
                yield from metaspaces(sub)

    for m in metaspaces(spec.get("pre_tokenizer")):
        scheme = m.get("prepend_scheme")
        return scheme != "never" if scheme is not None else bool(m.get("add_prefix_space", True))
    return False


def _add_tokenizer(w: gguf.GGUFWriter, lm) -> None:
    tk = lm.tokenizer.tk
    spec = json.loads(tk.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise BadRequest(f"{model.get('type')} tokenizers cannot be exported to GGUF yet",
                         "export --format safetensors")
    # as many tokens as the embedding has rows (Qwen's hold more rows than tokens): the rest are
    # [PAD{i}] of type UNUSED, as llama.cpp's converter writes them
    n = max(tk.get_vocab_size(with_added_tokens=True), lm.config.vocab_size)
    tokens: list[str | None] = [None] * n
    for t, i in model["vocab"].items():
        if 0 <= i < n:
            tokens[i] = t
    types = [tok_formats.NORMAL] * n
    for a in spec.get("added_tokens", []):
        tokens[a["id"]] = a["content"]
        types[a["id"]] = tok_formats.CONTROL if a.get("special") else tok_formats.USER_DEFINED
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", tok_formats.UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if model.get("byte_fallback"):  # SentencePiece-style: scores rank the merges (higher first)
        w.add_tokenizer_model("llama")
        rank = {}
        for r, m in enumerate(merges):
            rank.setdefault(m.replace(" ", ""), r)
        scores = [-float(rank.get(t, len(merges))) if types[i] == tok_formats.NORMAL else 0.0
                  for i, t in enumerate(tokens)]
        for i, t in enumerate(tokens):
            if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                types[i] = tok_formats.BYTE
        if model.get("unk_token") in model["vocab"]:
            unk = model["vocab"][model["unk_token"]]
            types[unk] = tok_formats.UNKNOWN
            w.add_unk_token_id(unk)
        w.add_token_scores(scores)
        w.add_add_space_prefix(_space_prefix(spec))
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(_pre_name(tk))
        w.add_token_merges(merges)
    w.add_token_list(tokens)
    w.add_token_types(types)
    t = lm.tokenizer
    if t.bos_id is not None:
        w.add_bos_token_id(t.bos_id)
    if t.eos_ids:
        w.add_eos_token_id(t.eos_ids[0])
        if len(t.eos_ids) > 1:
            w.add_eot_token_id(t.eos_ids[1])
    w.add_add_bos_token(bool(t.add_bos))
    if not lm.template.is_fallback:
        w.add_chat_template(lm.template.source)


def write_gguf(lm, out: Path, quant: str = "f16") -> Path:
    """Write `lm` (a LoadedModel: adapters merged, int4 dequantized, then quantized to `quant`)
    through a temp file the store sweeps if this process is killed."""
    if quant not in QUANTS:
        raise BadRequest(f"unknown GGUF quantization {quant!r}", f"use one of: {', '.join(QUANTS)}")
    c = lm.config
    fam = c.family
    qtype, ftype = QUANTS[quant]
    out = Path(out)
    if out.exists():
        raise BadRequest(f"{out} already exists", "choose another --out, or remove it")
    with Store().atomic_out(out, folder=False) as tmp:
        w = gguf.GGUFWriter(str(tmp), fam.gguf_arch)
        w.add_name(lm.facts.get("model_name") or lm.name)
        w.add_file_type(int(ftype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(c.context_length)
        w.add_embedding_length(c.dim)
        w.add_block_count(c.n_layers)
        w.add_feed_forward_length(c.ffn_dim)
        w.add_head_count(c.n_heads)
        w.add_head_count_kv(c.n_kv_heads)
        if c.norm == "rms":
            w.add_layer_norm_rms_eps(c.norm_eps)
        else:
            w.add_layer_norm_eps(c.norm_eps)
        w.add_parallel_residual(c.parallel_residual)
        if c.n_experts:
            w.add_expert_count(c.n_experts)
            w.add_expert_used_count(c.experts_per_token)
        w.add_rope_freq_base(c.rope_theta)
        w.add_rope_dimension_count(c.rope_dim)
        if c.head_dim != c.dim // c.n_heads:
            w.add_key_length(c.head_dim)
            w.add_value_length(c.head_dim)
        if c.sliding_window:
            w.add_sliding_window(c.sliding_window)
        if c.local_layers:
            w.add_sliding_window_pattern(list(c.local_layers))
            w.add_rope_freq_base_swa(c.rope_theta_local)
        if c.attn_scale:
            w.add_attention_scale(c.attn_scale)
        if c.position == "alibi":
            w.add_max_alibi_bias(c.alibi_max)
        if c.clip_qkv:
            w.add_clamp_kqv(c.clip_qkv)
        if lm.facts.get("license"):
            w.add_license(str(lm.facts["license"]))
        _add_tokenizer(w, lm)
        if c.rope_scaling.kind == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(c.rope_scaling.factor)
        elif c.rope_scaling.kind == "longrope":  # both factor sets as tensors, as llama.cpp keeps Phi-3's
            s = c.rope_scaling
            w.add_tensor("rope_factors_short.weight", np.array(s.factors, dtype=np.float32))
            w.add_tensor("rope_factors_long.weight", np.array(s.long_factors, dtype=np.float32))
            w.add_rope_scaling_attn_factors(s.attention_factor)
            w.add_rope_scaling_orig_ctx_len(s.original_context)
        elif c.rope_scaling.kind in ("llama3", "factors"):  # per-frequency divisors, as llama.cpp keeps them
            plain = rope_frequencies(c.rope_dim, c.rope_theta, type(c.rope_scaling)())
            factors = plain / rope_frequencies(c.rope_dim, c.rope_theta, c.rope_scaling)
            w.add_tensor("rope_freqs.weight", factors.numpy().astype(np.float32))
        arrays: dict[str, list[np.ndarray]] = {}  # experts of a layer share one name: stacked
        for gname, name, t in file_tensors(lm.model, keymaps.gguf_out(fam)):
            arrays.setdefault(gname, []).append(keymaps.to_file(fam.gguf_layout, name, t.numpy(), c))
        for gname, parts in arrays.items():
            a = np.ascontiguousarray(parts[0] if len(parts) == 1 else np.stack(parts), dtype=np.float32)
            if a.ndim < 2 or qtype == Q.F32:
                w.add_tensor(gname, a)
            elif qtype == Q.F16 or a.shape[-1] % 32:
                w.add_tensor(gname, a.astype(np.float16))
            else:
                w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out



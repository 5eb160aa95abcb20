"""GGUF files for tests: a converter from a tiny HF folder written the way llama.cpp's
convert_hf_to_gguf.py does it (its tensor names from the gguf package's own map, its layouts:
Llama Q/K rows permuted, GPT-NeoX q/k/v regrouped into blocks, Gemma 3 norms stored as 1 + w;
gpt2 tokenizer metadata), with the `gguf` package's writer; and a raw byte builder for hostile files."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
from safetensors.numpy import load_file

ARCHS = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}  # "gptneox" -> MODEL_ARCH.GPTNEOX


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert-time permutation (written from its documented formula)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_tensor(arch: str, name: str, t: np.ndarray, cfg: dict) -> np.ndarray:
    """A tensor as llama.cpp's converter rewrites it for `arch` (its modify_tensors)."""
    if arch == "llama" and "self_attn.q_proj." in name:
        return llama_cpp_permute(t, cfg["num_attention_heads"])
    if arch == "llama" and "self_attn.k_proj." in name:
        return llama_cpp_permute(t, cfg["num_key_value_heads"])
    if arch == "gptneox" and "query_key_value" in name:  # (head, [q, k, v], head_dim) -> q block, k block, v block
        heads = cfg["num_attention_heads"]
        return t.reshape(heads, 3, t.shape[0] // heads // 3, *t.shape[1:]).swapaxes(0, 1).reshape(t.shape)
    if arch == "gemma3" and name.endswith("norm.weight"):  # Gemma's RMSNorm scales by 1 + w
        return t + 1
    return t


def hf_folder_to_gguf(folder: Path, out: Path, qtype=gguf.GGMLQuantizationType.F32, arch: str = "llama",
                      chat_template: str | None = None, pre: str = "gpt-2", overrides: dict | None = None,
                      meta: dict | None = None, edit: Callable[[str, np.ndarray], np.ndarray | None] | None = None,
                      extra: dict[str, np.ndarray] | None = None) -> Path:
    """overrides: a GGUF tensor-name suffix ("attn_v.weight") -> the block type of those tensors.
    For hostile files: meta, a key -> (value, GGUFValueType[, array entry type]) written in place
    of what the converter writes (None: the key left out); edit(GGUF name, array) -> the array
    written instead (None: the tensor left out); extra, GGUF name -> array: tensors added."""
    cfg = json.loads((folder / "config.json").read_text())
    tok = json.loads((folder / "tokenizer.json").read_text())
    tensors = load_file(str(folder / "model.safetensors"))
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)  # Gemma 3: the global layers' rope
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name("tiny")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0))))
    w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", cfg.get("rotary_pct", 1.0))))
    if arch == "gptneox":
        w.add_layer_norm_eps(cfg["layer_norm_eps"])
        w.add_parallel_residual(cfg.get("use_parallel_residual", True))
    else:
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if arch == "gemma3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(cfg["sliding_window"])
    vocab = tok["model"]["vocab"]
    added = {t["content"]: t["id"] for t in tok["added_tokens"]}
    n = cfg["vocab_size"]
    tokens = [""] * n
    types = [gguf.TokenType.NORMAL] * n
    for t, i in {**vocab, **added}.items():
        tokens[i] = t
        if t in added:
            types[i] = gguf.TokenType.CONTROL
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_token_merges(merges)
    w.add_eos_token_id(added["<|im_end|>"])
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)
    for key, value in (meta or {}).items():
        if value is None:
            w.kv_data[0].pop(key, None)
        else:
            w.kv_data[0][key] = gguf.GGUFValue(value[0], value[1], value[2] if len(value) > 2 else None)
    names = gguf.get_tensor_name_map(ARCHS[arch], cfg["num_hidden_layers"])
    for gname, t in (extra or {}).items():
        w.add_tensor(gname, t)
    for name, t in tensors.items():
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gname, name
        t = llama_cpp_tensor(arch, name, t.astype(np.float32), cfg)
        if edit is not None:
            t = edit(gname, t)
            if t is None:
                continue
        kind = next((q for suffix, q in (overrides or {}).items() if gname.endswith(suffix)), qtype)
        if t.ndim == 2 and kind != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.quantize(t, kind)
            w.add_tensor(gname, data, raw_dtype=kind)
        else:
            w.add_tensor(gname, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


# -- raw files for hostile inputs ---------------------------------------------------------------
def _s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def raw_gguf(kv: list[tuple[str, int, bytes]], tensors: list[tuple[str, list[int], int, int]], data: bytes,
             n_tensors: int | None = None, n_kv: int | None = None, version: int = 3) -> bytes:
    """kv: (key, value type, packed value); tensors: (name, dims (ne0 first), type id, offset)."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                len(kv) if n_kv is None else n_kv)
    for key, vtype, value in kv:
        out += _s(key) + struct.pack("<I", vtype) + value
    for name, dims, tid, offset in tensors:
        out += _s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", tid, offset)
    out += b"\0" * ((-len(out)) % 32)
    return out + data


def kv_str(key: str, value: str) -> tuple[str, int, bytes]:
    return key, 8, _s(value)


def kv_u32(key: str, value: int) -> tuple[str, int, bytes]:
    return key, 4, struct.pack("<I", value)

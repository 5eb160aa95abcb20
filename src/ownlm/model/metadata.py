"""The schema of every metadata key and config field ownlm reads from a model file: GGUF keys,
config.json, tokenizer_config.json, generation_config.json, safetensors headers and PEFT adapter
configs. Files from outside are hostile: a value is used as the type the schema declares, never
as the type the file happens to hold, so each is checked once, where it enters (formats/gguf.py
as it reads a GGUF, model/config.py as it reads config.json, formats/tokenizer.py, formats/hf.py,
formats/peft.py), and a violation is a one-line ModelFormatError naming the key, the value and
what was expected.

A key is declared as `"name": Key(type, ...)`: its type ("int", "float", "bool", "str", "object",
"list", or several joined by "|"), the range of its numbers, the most entries of a list and the
longest string, an object's own fields. Keys the schema does not declare pass untouched (files
carry many that ownlm never reads); a None (JSON's null) stands for a key not given. Relations
between fields (heads divide the width, KV heads divide heads, ...) are ModelConfig's own checks."""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import ModelFormatError

# sane bounds, far beyond any released model and far below what would exhaust a machine
MAX_LAYERS = 1 << 12
MAX_WIDTH = 1 << 20  # hidden size, feed-forward size
MAX_HEADS = 1 << 12
MAX_HEAD_DIM = 1 << 12
MAX_VOCAB = 1 << 22
MAX_CONTEXT = 1 << 28
MAX_EXPERTS = 1 << 10
MAX_TOKEN_CHARS = 1 << 12  # the longest token of a vocabulary (SentencePiece pieces: 16 by default)
MAX_ENTRIES = 1 << 24  # merges and the like
BF16_MAX = 3.3895313892515355e38  # a clamp beyond it is no clamp in bfloat16


@dataclass(frozen=True)
class Key:
    """What one key may hold."""

    type: str  # int | float | bool | str | object | list, or several joined by "|"
    lo: float | None = None  # numbers (a list's too): the least allowed
    hi: float | None = None  # ... and the most
    above: bool = False  # lo itself is not allowed (lo=0, above=True: positive)
    of: str = ""  # list: the type of its entries (int | float | bool | str)
    most: int = MAX_ENTRIES  # list: the most entries
    longest: int = 1 << 26  # str (a list's strings too): the most characters
    fields: Mapping[str, Key] | None = None  # object: its own keys, checked alike

    def describe(self) -> str:
        return " or ".join(self._describe(kind) for kind in self.type.split("|"))

    def _describe(self, kind: str) -> str:
        if kind == "list":
            return f"a list of {_NAMES[self.of]}s" + (f" (at most {self.most})" if self.most < MAX_ENTRIES else "")
        text = {"int": "an integer", "float": "a finite number", "bool": "a boolean", "str": "a string",
                "object": "an object"}[kind]
        if kind in ("int", "float"):
            text += self._range()
        elif kind == "str" and self.longest < 1 << 26:
            text += f" of at most {self.longest} characters"
        return text

    def _range(self) -> str:
        lo = None if self.lo is None else _num(self.lo)
        hi = None if self.hi is None else _num(self.hi)
        if lo is not None and hi is not None:
            return f" in {'(' if self.above else '['}{lo}, {hi}]"
        if lo is not None:
            return f" {'>' if self.above else '>='} {lo}"
        return f" <= {hi}" if hi is not None else ""

    def check(self, value: Any, name: str, where: str) -> Any:
        """The value in its declared Python type; raises naming `name` when it is not what is declared."""
        if hasattr(value, "tolist"):  # a numpy scalar or array from a GGUF file
            value = value.tolist()
        for kind in self.type.split("|"):
            out = self._as(kind, value, name, where)
            if out is not _NO:
                return out
        raise ModelFormatError(f"{where}: {name}={show(value)} is not {self.describe()}")

    def _as(self, kind: str, v: Any, name: str, where: str) -> Any:
        if kind == "list":
            if not isinstance(v, (list, tuple)) or len(v) > self.most:
                return _NO
            item = Key(self.of, self.lo, self.hi, self.above, longest=self.longest)
            if not _all(self.of, v, item):
                i = next(i for i, x in enumerate(v) if item._as(self.of, x, name, where) is _NO)
                raise ModelFormatError(f"{where}: {name}[{i}]={show(v[i])} is not {item.describe()}")
            return [float(x) for x in v] if self.of == "float" else list(v)
        if kind == "object":
            if not isinstance(v, dict):
                return _NO
            return check(v, self.fields, where, prefix=f"{name}.") if self.fields else v
        if kind == "str":
            return v if isinstance(v, str) and len(v) <= self.longest else _NO
        if kind == "bool":
            if isinstance(v, bool):
                return v
            return bool(v) if type(v) is int and v in (0, 1) else _NO
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return _NO
        if isinstance(v, float):
            if not math.isfinite(v) or (kind == "int" and not v.is_integer()):
                return _NO
        if kind == "float" and abs(v) > 1e308:  # an integer beyond any float
            return _NO
        v = int(v) if kind == "int" else float(v)
        if self.lo is not None and (v < self.lo or (self.above and v == self.lo)):
            return _NO
        if self.hi is not None and v > self.hi:
            return _NO
        return v


_NO = object()
_NAMES = {"int": "integer", "float": "finite number", "bool": "boolean", "str": "string", "object": "object"}


def _all(kind: str, values: Any, item: Key) -> bool:
    """Whether every entry is of `kind` within `item`'s bounds (the fast path for 100k-entry lists)."""
    if not values:
        return True
    types = set(map(type, values))
    if kind == "str":
        return types == {str} and max(map(len, values)) <= item.longest
    if kind == "bool" and types == {bool}:
        return True
    if (kind == "int" and types == {int}) or (kind == "float" and types == {float} and all(map(math.isfinite, values))):
        lo, hi = min(values), max(values)
        return ((item.lo is None or lo > item.lo or (lo == item.lo and not item.above))
                and (item.hi is None or hi <= item.hi))
    return all(item._as(kind, x, "", "") is not _NO for x in values)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 8, 8, 4, 40, 40


def show(value: Any) -> str:
    """A value as a message shows it: its repr, cut short (a 16M-entry list is not printed whole)."""
    return _SHORT.repr(value)


def check(values: Mapping[str, Any], schema: Mapping[str, Key], where: str, arch: str = "",
          prefix: str = "") -> dict[str, Any]:
    """`values` with every key `schema` declares checked and in its declared Python type ("{arch}"
    in a declared name stands for the file's architecture); other keys pass as they are."""
    out = dict(values)
    for name, key in schema.items():
        name = name.replace("{arch}", arch)
        if out.get(name) is not None:
            out[name] = key.check(out[name], prefix + name, where)
    return out


def check_gguf(meta: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A GGUF file's metadata, every key ownlm reads checked against GGUF."""
    arch = meta.get("general.architecture")
    arch = GGUF["general.architecture"].check(arch, "general.architecture", where) if arch is not None else ""
    return check(meta, GGUF, where, arch)


_POSITIVE = Key("float", 0, above=True)
_SIZE = Key("int", 1, MAX_WIDTH)
_HEADS = Key("int", 1, MAX_HEADS)
_HEAD_DIM = Key("int", 1, MAX_HEAD_DIM)
_CONTEXT = Key("int", 1, MAX_CONTEXT)
_EPS = Key("float", 0, 1)
_THETA = Key("float", 0, 1e15, above=True)
_TOKEN_ID = Key("int", 0, MAX_VOCAB - 1)
_BOOL = Key("bool")
_STR = Key("str")
_FACTORS = Key("list", 0, above=True, of="float", most=MAX_HEAD_DIM // 2)

GGUF: dict[str, Key] = {
    "general.architecture": Key("str", longest=64),
    "general.file_type": Key("int", 0, 1 << 16),
    "general.name": _STR,
    "general.license": _STR,
    "{arch}.vocab_size": Key("int", 1, MAX_VOCAB),
    "{arch}.context_length": _CONTEXT,
    "{arch}.embedding_length": _SIZE,
    "{arch}.block_count": Key("int", 1, MAX_LAYERS),
    "{arch}.feed_forward_length": _SIZE,
    "{arch}.expert_count": Key("int", 0, MAX_EXPERTS),
    "{arch}.expert_used_count": Key("int", 0, MAX_EXPERTS),
    "{arch}.use_parallel_residual": _BOOL,
    "{arch}.attention.head_count": _HEADS,
    "{arch}.attention.head_count_kv": _HEADS,
    "{arch}.attention.key_length": _HEAD_DIM,
    "{arch}.attention.value_length": _HEAD_DIM,
    "{arch}.attention.layer_norm_rms_epsilon": _EPS,
    "{arch}.attention.layer_norm_epsilon": _EPS,
    "{arch}.attention.sliding_window": Key("int", 0, MAX_CONTEXT),  # 0: none
    "{arch}.attention.sliding_window_pattern": Key("int|list", 0, MAX_LAYERS, of="bool", most=MAX_LAYERS),
    "{arch}.attention.clamp_kqv": Key("float", 0, BF16_MAX),  # 0: none
    "{arch}.attention.max_alibi_bias": Key("float", 0, 1e3),
    "{arch}.attention.scale": Key("float", 0, 1e6),  # 0: 1 / sqrt(head_dim)
    "{arch}.rope.dimension_count": _HEAD_DIM,
    "{arch}.rope.freq_base": _THETA,
    "{arch}.rope.freq_base_swa": _THETA,
    "{arch}.rope.scaling.type": _STR,
    "{arch}.rope.scaling.factor": _POSITIVE,
    "{arch}.rope.scaling.original_context_length": _CONTEXT,
    "{arch}.rope.scaling.attn_factor": _POSITIVE,
    "tokenizer.ggml.model": Key("str", longest=64),
    "tokenizer.ggml.pre": Key("str", longest=256),
    "tokenizer.ggml.tokens": Key("list", of="str", most=MAX_VOCAB, longest=MAX_TOKEN_CHARS),
    "tokenizer.ggml.merges": Key("list", of="str", longest=2 * MAX_TOKEN_CHARS + 1),
    "tokenizer.ggml.token_type": Key("list", 0, 255, of="int", most=MAX_VOCAB),
    "tokenizer.ggml.scores": Key("list", of="float", most=MAX_VOCAB),
    "tokenizer.ggml.bos_token_id": _TOKEN_ID,
    "tokenizer.ggml.eos_token_id": _TOKEN_ID,
    "tokenizer.ggml.eot_token_id": _TOKEN_ID,
    "tokenizer.ggml.unknown_token_id": _TOKEN_ID,
    "tokenizer.ggml.add_bos_token": _BOOL,
    "tokenizer.ggml.add_space_prefix": _BOOL,
    "tokenizer.chat_template": _STR,
}

_ROPE = {
    "rope_type": _STR, "type": _STR, "rope_theta": _THETA, "factor": _POSITIVE, "low_freq_factor": _POSITIVE,
    "high_freq_factor": _POSITIVE, "original_max_position_embeddings": _CONTEXT, "attention_factor": _POSITIVE,
    "short_factor": _FACTORS, "long_factor": _FACTORS, "partial_rotary_factor": Key("float", 0, 1, above=True),
}

HF_CONFIG: dict[str, Key] = {
    "model_type": Key("str", longest=64),
    "vocab_size": Key("int", 1, MAX_VOCAB),
    "hidden_size": _SIZE,
    "intermediate_size": _SIZE,
    "num_hidden_layers": Key("int", 1, MAX_LAYERS),
    "num_attention_heads": _HEADS,
    "num_key_value_heads": _HEADS,
    "head_dim": _HEAD_DIM,
    "max_position_embeddings": _CONTEXT,
    "original_max_position_embeddings": _CONTEXT,
    "rms_norm_eps": _EPS,
    "layer_norm_eps": _EPS,
    "rope_theta": _THETA,
    "rope_scaling": Key("object", fields=_ROPE),
    # one rope for every layer, or one per layer kind (Gemma 3)
    "rope_parameters": Key("object", fields={**_ROPE, "full_attention": Key("object", fields=_ROPE),
                                             "sliding_attention": Key("object", fields=_ROPE)}),
    "rope_local_base_freq": _THETA,
    "partial_rotary_factor": Key("float", 0, 1, above=True),
    "rotary_pct": Key("float", 0, 1, above=True),
    "hidden_act": _STR,
    "hidden_activation": _STR,
    "tie_word_embeddings": _BOOL,
    "attention_bias": _BOOL,
    "mlp_bias": _BOOL,
    "norm_bias": _BOOL,
    "use_parallel_residual": _BOOL,
    "shared_norm": _BOOL,
    "sliding_window": Key("int", 0, MAX_CONTEXT),  # 0: none
    "use_sliding_window": _BOOL,
    "sliding_window_pattern": Key("int", 0, MAX_LAYERS),
    "layer_types": Key("list", of="str", most=MAX_LAYERS, longest=64),
    "attn_logit_softcapping": Key("float"),
    "final_logit_softcapping": Key("float"),
    "query_pre_attn_scalar": _POSITIVE,
    "num_local_experts": Key("int", 0, MAX_EXPERTS),
    "num_experts_per_tok": Key("int", 0, MAX_EXPERTS),
    "alibi_max": Key("float", 0, 1e3),
    "clip_qkv": Key("float", 0, BF16_MAX),
    "license": _STR,
    "_name_or_path": _STR,
    # Falcon's names (model/families.py translates them)
    "alibi": _BOOL, "new_decoder_architecture": _BOOL, "multi_query": _BOOL, "parallel_attn": _BOOL, "bias": _BOOL,
    "num_kv_heads": _HEADS, "activation": _STR, "ffn_hidden_size": _SIZE, "num_ln_in_parallel_attn": Key("int", 1, 2),
    # MPT's
    "d_model": _SIZE, "n_heads": _HEADS, "n_layers": Key("int", 1, MAX_LAYERS), "expansion_ratio": Key("float", 0, 1e3),
    "max_seq_len": _CONTEXT, "no_bias": _BOOL, "logit_scale": Key("float|str"),
    "attn_config": Key("object", fields={"alibi": _BOOL, "qk_ln": _BOOL, "alibi_bias_max": Key("float", 0, 1e3),
                                         "clip_qkv": Key("float", 0, BF16_MAX), "softmax_scale": Key("float")}),
}

_TOKEN = Key("str|object")  # a token's text, or {"content": text, ...}
TOKENIZER_CONFIG: dict[str, Key] = {
    "bos_token": _TOKEN, "eos_token": _TOKEN, "add_bos_token": _BOOL,
    "chat_template": Key("str|list", of="object"),  # [{"name": ..., "template": ...}, ...]
}
GENERATION_CONFIG: dict[str, Key] = {"eos_token_id": Key("int|list", 0, MAX_VOCAB - 1, of="int", most=1024)}

SAFETENSORS_ENTRY: dict[str, Key] = {
    "dtype": Key("str", longest=16),
    "shape": Key("list", 0, 1 << 40, of="int", most=8),
    "data_offsets": Key("list", 0, 1 << 50, of="int", most=2),
}

ADAPTER_CONFIG: dict[str, Key] = {
    "peft_type": _STR, "r": Key("int", 1, 65536), "lora_alpha": Key("float", 0, 1e6),
    "lora_dropout": Key("float", 0, 1), "use_rslora": _BOOL, "use_dora": _BOOL, "fan_in_fan_out": _BOOL, "bias": _STR,
    "target_modules": Key("str|list", of="str", most=64), "modules_to_save": Key("list", of="str"),
}

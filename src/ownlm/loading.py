"""load(ref) -> LoadedModel: store -> formats -> model + text. The only module that knows all three."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .engine import speculate as speculation
from .engine.generate import Completion, TextStream
from .engine.sampling import SamplingParams
from .errors import BadRequest, ModelFormatError, ModelNotFound
from . import repacked
from .formats import peft
from .formats.checkpoint import GGUF_FILE, Checkpoint, open_checkpoint, quantizable
from .manage import display_name, follow, preset_of, resolve
from .store.store import Store
from .formats.keymaps import FUSED
from .model import adapters, cpu
from .model.linear import QuantEmbedding, QuantLinear, fast_quant, layout_for, quant_supported, replace
from .model.quant import GROUP, QuantStack, QuantWeight, concat, quantize
from .model.transformer import Transformer
from .text.chat import ChatTemplate
from .text.tokenizer import TextTokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
QUANT_MODES = ("auto", "none", "int4", "int8", "bf16")  # bf16: none, computing in bfloat16
QUANT_BITS = {"int4": 4, "int8": 8}


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


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device,
               checkpoint: tuple[dict[str, Any], dict[str, Path]] | None = None,
               opened: Checkpoint | None = None) -> torch.dtype:
    """The compute dtype for `dtype` ("auto", None, a name or a torch dtype) on `device`.
    checkpoint: (manifest, files) of the model, as resolve gives them, when its GGUF blocks may be
    held as they are (quant auto, int4, int8): on a CPU with ownlm's kernels such a model computes
    in float32 under auto. opened: that checkpoint already opened (its tensor table is read from
    it rather than from the file again)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        if checkpoint is not None and fast_quant(device):
            # the blocks stay quantized whatever the compute dtype, so float32 activations and
            # residual stream cost no weight memory (the KV cache: twice bfloat16's) and keep the
            # file's model. bench/fidelity.py, smollm2 Q4_1, 2 threads (AVX-512, bf16 emulated):
            # mean KL from the float32 dequantized model 2.5e-7 against 6.7e-4 in bfloat16
            # (llama.cpp on the file: 3.0e-3), at the same speed within noise (decode 115 vs 119
            # tok/s, prefill 3184 vs 3157)
            manifest, files = checkpoint
            floats = ("F32", "F16", "BF16", "F64")
            if manifest.get("format") == "gguf":  # a store model: the manifest names the file's quantization
                blocks = manifest.get("quantization") not in floats
            elif not manifest.get("format") and GGUF_FILE in files:  # a path: its header's tensor table
                if opened is None:
                    opened = open_checkpoint(files)
                sizes = [(t["type"] in floats, t["bytes"]) for t in opened.listing if len(t["shape"]) >= 2]
                blocks = sum(n for f, n in sizes if not f) > sum(n for f, n in sizes if f)
            else:
                blocks = False
            if blocks:
                return torch.float32
        # dense weights (safetensors, F16/BF16 GGUF, --quant none) are held in the compute dtype,
        # and the model has one: float32 would double their memory. Measured on an AVX2 server:
        # bf16 weights halve memory traffic and beat fp32 even where the bf16 arithmetic is
        # emulated; other CPUs (ARM without bf16) stay in fp32
        return torch.bfloat16 if cpu.x86_avx2() else torch.float32
    if dtype not in DTYPES:
        raise BadRequest(f"unknown dtype {dtype!r}", f"use one of: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def build_model(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, quant: str = "auto") -> Transformer:
    """Build on the meta device, then assign the checkpoint's tensors, one at a time as they are
    read (a tensor is in its final form before the next is read, so memory peaks near the model's
    own size); every parameter must be filled exactly once (missing or unexpected names are
    format errors).
    quant="auto" keeps a GGUF's quantized blocks (linears, embedding, head) on a CPU, each type in
    its own bits (formats/quants.py: Q4_*, Q5_*, Q6_K, Q8_0, IQ4_NL / IQ4_XS; the other types as
    int8), whatever the compute dtype; "none" dequantizes everything to `dtype`; "int4" / "int8"
    hold every linear of the layers that way (GGUF blocks of that width as they are, anything
    else quantized group-wise at load) and keep a GGUF's quantized embedding and head.
    On a CPU with ownlm's kernels they compute in them; without (OWNLM_KERNELS=0, a CPU they do
    not build for) int4 linears run PyTorch's int4 kernel (its CPU twin, layout "tinygemm") and
    the rest is dequantized per call: memory stays quantized either way.
    On CUDA (Ampere or newer, bfloat16) int4 linears of the layers are held in PyTorch's int4
    layout and run its kernel; everything else there (other widths, the embedding) is dequantized."""
    if quant not in QUANT_MODES:
        raise BadRequest(f"unknown quantization mode {quant!r}", f"use one of: {', '.join(QUANT_MODES)}")
    bits = QUANT_BITS.get(quant)
    if bits and not quant_supported(device, bits):
        hint = "use --quant int4 (a GPU of the Ampere generation or newer) or none" if device.type == "cuda" \
            else "use --quant none"
        raise BadRequest(f"{quant} weights are not supported on {device}", hint)
    cuda = device.type == "cuda"
    if bits and cuda and dtype != torch.bfloat16:
        raise BadRequest(f"int4 weights on {device} compute in bfloat16, not {str(dtype).removeprefix('torch.')}",
                         "use --dtype bfloat16 (or auto)")
    # GGUF blocks held as they are: every width on a CPU; on CUDA only int4 has a kernel, so the
    # rest is dequantized straight from the file
    holding = bits is not None or (quant == "auto" and (
        device.type == "cpu" or (cuda and fast_quant(device) and dtype == torch.bfloat16)))
    keep = ((4,) if cuda else (4, 5, 6, 8)) if holding else ()
    with torch.device("meta"):
        model = Transformer(ckpt.config)
    expected = model.state_names()
    state: dict[str, torch.Tensor | QuantWeight] = {}
    for name, t in ckpt.tensors(dtype, keep):
        # the layers' linears; the embedding and head only as the file keeps them
        if bits and name.startswith("layers.") and quantizable(name) and len(t.shape) == 2 and (
                not isinstance(t, QuantWeight) or t.bits != bits) and t.shape[-1] % GROUP == 0:
            t = quantize(t.dequantize() if isinstance(t, QuantWeight) else t, bits)
        state[name] = t
    state = fuse(state, dtype)
    for name, tensor in state.items():
        if name not in expected:
            raise ModelFormatError(f"checkpoint tensor {name!r} has no place in the model")
        want = tuple(model.get_parameter(name).shape)
        got = tuple(tensor.shape)
        if got != want:
            raise ModelFormatError(f"checkpoint tensor {name!r} has shape {got}, the config implies {want}")
    missing = sorted(expected - set(state))
    if missing:
        raise ModelFormatError(f"checkpoint lacks {len(missing)} tensor(s), first {missing[0]!r}")
    for name, tensor in list(state.items()):
        if not isinstance(tensor, (QuantWeight, QuantStack)):
            continue
        path = name.removesuffix(".weight")
        layout = layout_for(device, tensor, embedding=path == "embed")
        if layout == "dense":
            state[name] = tensor.dequantize().to(dtype)  # no kernel for these on CUDA
            continue
        del state[name]
        if path == "embed":
            replace(model, path, QuantEmbedding(tensor, dtype).to(device))
        else:
            bias = state.pop(f"{path}.bias", None)  # a bias beside quantized weights stays dense
            replace(model, path, QuantLinear(tensor.to(device), bias=bias, dtype=dtype, layout=layout).to(device))
    dense = {name: t.to(device) for name, t in state.items()}
    model.load_state_dict(dense, assign=True, strict=False)
    model.init_buffers(device)
    return model.eval()


def fuse(state: dict, dtype: torch.dtype) -> dict:
    """Concatenate per-projection tensors into the Transformer's fused projections (keymaps.FUSED:
    PARENT.q/k/v -> PARENT.qkv, PARENT.gate/up -> PARENT.gate_up, for attention, MLPs and experts
    alike); quantized parts stay quantized, each in its own bits (quant.concat). A lone
    part (a plain MLP's `up`) is not a group and stays as it is. In place: each part is freed as
    its group is joined, so memory never holds the model twice."""
    out = state
    parents = {n.rsplit(".", 2)[0] for n in state if n.count(".") >= 2}
    for parent in sorted(parents):
        for fused, parts in FUSED.items():
            for kind in ("weight", "bias"):
                names = [f"{parent}.{p}.{kind}" for p in parts]
                present = [n for n in names if n in out]
                if len(present) < 2:
                    continue
                if len(present) != len(names):
                    missing = sorted(set(names) - set(present))[0]
                    raise ModelFormatError(f"checkpoint lacks {missing!r}")
                tensors = [out.pop(n) for n in names]
                if all(isinstance(t, QuantWeight) for t in tensors):  # Q4_K q, k with a Q6_K v: a stack
                    out[f"{parent}.{fused}.{kind}"] = concat(tensors)
                else:
                    dense = [t.dequantize().to(dtype) if isinstance(t, QuantWeight) else t for t in tensors]
                    out[f"{parent}.{fused}.{kind}"] = torch.cat(dense)
    return out


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
    defaults: dict[str, Any] = field(default_factory=dict)  # sampling defaults (a preset's parameters)
    system: str | None = None  # a preset's system prompt: used when a conversation brings none
    preamble: list[dict[str, Any]] = field(default_factory=list)  # a preset's messages, ahead of each conversation
    drafts: dict[str, "LoadedModel"] = field(default_factory=dict, repr=False)  # draft models by reference

    @property
    def config(self):
        return self.model.cfg

    def params(self, **sampling: Any) -> SamplingParams:
        return SamplingParams.from_kwargs(**{**self.defaults, **sampling})

    def with_preset(self, messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The conversation as the model sees it: a preset's system prompt first where the
        conversation has no system message of its own, then the preset's messages, then the
        conversation (a model without a preset: the conversation as it is)."""
        msgs = list(messages)
        if not self.system and not self.preamble:
            return msgs
        if msgs and msgs[0].get("role") == "system":
            head, rest = msgs[:1], msgs[1:]
        elif self.system and not any(m.get("role") == "system" for m in msgs):
            head, rest = [{"role": "system", "content": self.system}], msgs
        else:
            head, rest = [], msgs
        return head + [dict(m) for m in self.preamble] + rest

    def chat_prompt(self, messages: Sequence[dict[str, Any]]) -> str:
        return self.template.render(self.with_preset(messages), add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def stream_ids(self, prompt_ids: Sequence[int], speculate: "str | LoadedModel | None" = None,
                   **sampling: Any) -> TextStream:
        """speculate: "ngram" (prompt lookup), a draft model sharing the tokenizer (a reference
        or a LoadedModel), or None (plain decoding); see engine/speculate.py. Every method below
        takes it too."""
        return TextStream(self.model, self.tokenizer, prompt_ids, self.params(**sampling), self.speculator(speculate))

    def speculator(self, speculate: "str | LoadedModel | None"):
        """The token source for `speculate` (None: plain decoding); a draft is loaded once, on
        this model's device, and its vocabulary checked against this model's."""
        if speculate is None:
            return None
        if speculate == speculation.NGRAM:
            return speculation.generate_ids
        if isinstance(speculate, LoadedModel):
            draft = speculate
        elif isinstance(speculate, str) and speculate.strip():
            draft = self.drafts.get(speculate)
            if draft is None:
                draft = load(speculate, device=str(self.model.device), pull_missing=False)
        else:
            raise BadRequest(f"speculate={speculate!r} is invalid", "use \"ngram\" or a draft model's name")
        speculation.check_vocab(self.tokenizer, draft.tokenizer, self.name, draft.name)
        if isinstance(speculate, str):
            self.drafts[speculate] = draft
        return functools.partial(_draft_ids, draft.model)

    def stream(self, prompt: str, **sampling: Any) -> Iterator[str]:
        """Text pieces for a raw prompt (no chat template)."""
        return iter(self.stream_ids(self.encode(prompt), **sampling))

    def chat_stream(self, messages: Sequence[dict[str, Any]], **sampling: Any) -> Iterator[str]:
        return iter(self.stream_ids(self.encode(self.chat_prompt(messages)), **sampling))

    def generate(self, prompt: str, **sampling: Any) -> Completion:
        return self.stream_ids(self.encode(prompt), **sampling).run()

    def chat(self, messages: Sequence[dict[str, Any]], **sampling: Any) -> Completion:
        return self.stream_ids(self.encode(self.chat_prompt(messages)), **sampling).run()


def _draft_ids(draft: Transformer, *args: Any, **kw: Any) -> Iterator[int]:
    """Speculative generation with a fresh proposer (its own KV cache) on `draft` per sequence."""
    return speculation.generate_ids(*args, **kw, proposer=speculation.DraftModel(draft))


def split_adapter(ref: str) -> tuple[str, str | None]:
    """"BASE+ADAPTER" -> (BASE, ADAPTER); a plain reference -> (ref, None)."""
    if "+" in ref and not Path(ref).expanduser().exists():
        base, _, adapter = ref.rpartition("+")
        if not base.strip() or not adapter.strip():
            raise BadRequest(f"{ref!r}: expected BASE+ADAPTER")
        return base.strip(), adapter.strip()
    return ref, None


def resolve_adapter(ref: str) -> tuple[dict[str, Any], dict[str, Path]]:
    """(manifest, files) of an adapter: a store name, or a PEFT adapter folder."""
    path = Path(ref).expanduser()
    if (path / peft.CONFIG).is_file():
        return {"name": str(path), "format": "peft"}, {n: path / n for n in (peft.CONFIG, peft.WEIGHTS)}
    manifest, files = resolve(ref, pull_missing=False)
    if manifest.get("format") != "peft":
        raise BadRequest(f"{display_name(manifest)} is a model, not an adapter",
                         "the part after + must be an adapter made by `ownlm tune` (or a PEFT adapter folder)")
    return manifest, files


def attach_adapter(model: Transformer, files: dict[str, Path], merge: bool = False) -> peft.LoraSettings:
    """Attach a PEFT adapter to a built model (merged into dense weights if asked)."""
    settings, tensors = peft.read(files)
    adapters.attach(model, list(settings.parts), settings.r, settings.alpha, 0.0, settings.rslora)
    try:
        adapters.load_state(model, {n: t.to(next(model.parameters()).device) for n, t in tensors.items()})
    except ValueError as e:
        raise ModelFormatError(f"adapter: {e}", "it was trained for a different base model") from None
    if merge:
        adapters.merge(model)
    return settings


def load(ref: str, device: str | None = None, dtype: str | torch.dtype | None = None, quant: str = "auto",
         pull_missing: bool = True, cache: bool = True, threads: int | None = None,
         activations: str | None = None) -> LoadedModel:
    """Load any model reference (store name, catalog alias, path, pypi:/hf: ref, BASE+ADAPTER,
    an adapter's store name or a preset's: its base and adapter, with its system prompt and
    sampling parameters as the LoadedModel's defaults) for inference.
    dtype: auto, float32, bfloat16, float16. auto: on a CPU with ownlm's kernels (x86, AVX2) float32
    for a GGUF of quantized blocks held as they are (its activations and residual stream, with a
    float16 KV cache; the blocks stay quantized) and bfloat16 for dense weights (safetensors, F16
    GGUFs, quant none), which are held in the compute dtype; float32 on other CPUs; bfloat16 on
    CUDA, float16 on MPS.
    A dtype named (not auto) is the KV cache's too.
    quant: auto (a GGUF's blocks stay quantized, each type in its own bits on a CPU, the 4-bit types
    also on a CUDA GPU, there in bfloat16: see build_model), none (dequantize everything), bf16
    (none, in bfloat16), int4 or int8 (every linear of the layers, quantized at load where it is not
    already; int8 on CPUs only).
    An adapter is merged into dense weights, and kept beside quantized weights (so they stay so).
    threads: compute on that many CPU threads from now on, in this process (PyTorch's and ownlm's
    kernels'; model.kernels.set_threads); None leaves the count as it is (all the cores by default).
    activations: what ownlm's CPU kernels round activations to before an integer matmul, from now
    on in this process (model.kernels.set_activations): "int16" (the default: greedy answers as
    the float32 model's) or "int8" (faster prompts and batches, llama.cpp's rounding); None leaves it as it is."""
    t0 = time.perf_counter()
    if threads is not None or activations is not None:
        from .model import kernels

        if threads is not None:
            kernels.set_threads(threads)
        if activations is not None:
            kernels.set_activations(activations)
    if quant not in QUANT_MODES:
        raise BadRequest(f"unknown quantization mode {quant!r}", f"use one of: {', '.join(QUANT_MODES)}")
    base_ref, adapter_ref = split_adapter(ref)
    adapter = resolve_adapter(adapter_ref) if adapter_ref else None
    manifest, files = resolve(base_ref, pull_missing=pull_missing)
    preset = preset_of(manifest)
    preset_name = None
    if preset is not None:  # a preset: its base (by digest) and adapter, its settings as defaults below
        preset_name = display_name(manifest)
        if preset["adapter"]:
            if adapter is not None:
                raise BadRequest(f"{preset_name} already has an adapter ({preset['adapter'].get('name')})",
                                 f"name one adapter: make a preset without it, or load its base +{adapter_ref}")
            adapter = resolve(display_name(follow(preset["adapter"], "adapter", preset_name)), pull_missing=False)
        manifest, files = resolve(display_name(follow(preset["base"], "base model", preset_name)), pull_missing=False)
    elif adapter is None and manifest.get("format") == "peft":  # an adapter by its own name: its base from the store
        adapter = manifest, files
        base = manifest.get("base") or {}
        manifest, files = resolve(str(base.get("name")), pull_missing=False)
        if manifest.get("digest") != base.get("digest"):
            raise ModelNotFound(f"the base this adapter was trained on ({base.get('name')}, sha256 "
                                f"{str(base.get('digest'))[:12]}) is no longer in the store",
                                f"import that model again, or name a base: `BASE+{display_name(adapter[0])}`")
    dev = pick_device(device)
    ckpt = None
    if quant != "none" and not manifest.get("format") and GGUF_FILE in files:
        ckpt = open_checkpoint(files)  # a GGUF by path: its tensor table picks the dtype; built from below
    dt = pick_dtype(dtype, dev, (manifest, files) if quant != "none" else None, ckpt)
    if quant == "bf16":  # dense bfloat16 weights: "none" in bfloat16
        if dtype not in (None, "auto") and dt != torch.bfloat16:
            raise BadRequest("--quant bf16 holds weights in bfloat16, "
                             f"--dtype asks for {str(dt).removeprefix('torch.')}", "drop one of the two")
        quant, dt = "none", torch.bfloat16
    # store models (they have a digest) are cached as built: a second load reads one file
    cache_dir = root = None
    if cache and manifest.get("digest") and repacked.enabled():
        root = Store().root
        cache_dir = repacked.folder(root, manifest["digest"], dev, dt, quant)
    hit = repacked.load(cache_dir, dev) if cache_dir else None
    if hit:
        model, spec, chat_template, facts = hit
    else:
        ckpt = ckpt or open_checkpoint(files)
        model = build_model(ckpt, dev, dt, quant)
        spec, chat_template, facts = ckpt.tokenizer, ckpt.chat_template, ckpt.facts
        if cache_dir:
            # a read-only or full disk, or facts that are not JSON, only cost the next load its time
            with contextlib.suppress(OSError, TypeError, ValueError):
                repacked.save(cache_dir, model, spec, chat_template, facts, root / "tmp")
    if dtype not in (None, "auto"):  # a dtype asked for: the KV cache in it too (kv_cache.cache_dtype)
        model.kv_dtype = dt
    name = display_name(manifest)
    if adapter is not None:
        quantized = any(isinstance(m, QuantLinear) for m in model.modules())
        attach_adapter(model, adapter[1], merge=not quantized)
        model.eval()
        name = f"{name}+{display_name(adapter[0])}"
    if preset_name:
        name = preset_name if adapter_ref is None else f"{preset_name}+{display_name(adapter[0])}"
    tok = TextTokenizer(spec)
    template = ChatTemplate(chat_template, tok.bos_token, tok.eos_token)
    _trim_heap()
    lm = LoadedModel(name, model, tok, template, manifest, facts, time.perf_counter() - t0)
    if preset is not None:
        lm.defaults, lm.system, lm.preamble = dict(preset["parameters"]), preset["system"], list(preset["messages"])
    return lm


def _trim_heap() -> None:
    """Give the heap's free pages back to the system: loading leaves holes between the tensors it
    kept (the temporaries of each step), which would otherwise stay in the process's RSS."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc

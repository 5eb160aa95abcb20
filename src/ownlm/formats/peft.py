"""PEFT's LoRA adapter format: adapter_config.json + adapter_model.safetensors with PEFT's key
names, read and written so adapters move between ownlm and transformers + peft unchanged."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import ModelFormatError
from ..model.metadata import ADAPTER_CONFIG
from . import hf
from .keymaps import HF_MODULES

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model.model.layers"
_OURS = re.compile(r"layers\.(\d+)\.(attn|mlp)\.(\w+)\.lora_(a|b)\.(\w+)")
_PEFT = re.compile(re.escape(PREFIX) + r"\.(\d+)\.(\w+\.\w+)\.lora_(A|B)\.weight")
_FUSED_PATH = {"q": "attn.qkv", "k": "attn.qkv", "v": "attn.qkv", "o": "attn.o",
               "gate": "mlp.gate_up", "up": "mlp.gate_up", "down": "mlp.down"}


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    dropout: float
    rslora: bool
    parts: tuple[str, ...]

    def config(self, base_name: str = "") -> dict[str, Any]:
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.r, "lora_alpha": self.alpha,
            "lora_dropout": self.dropout, "use_rslora": self.rslora, "bias": "none", "fan_in_fan_out": False,
            "target_modules": sorted(HF_MODULES[p].split(".")[1] for p in self.parts),
            "base_model_name_or_path": base_name, "inference_mode": True, "init_lora_weights": True,
            "modules_to_save": None, "layers_to_transform": None, "use_dora": False,
        }


def to_peft(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        m = _OURS.fullmatch(name)
        if not m:
            raise ValueError(f"{name!r} is not an adapter tensor")
        layer, _, _, ab, part = m.groups()
        out[f"{PREFIX}.{layer}.{HF_MODULES[part]}.lora_{ab.upper()}.weight"] = t.contiguous()
    return out


def from_peft(tensors: Mapping[str, torch.Tensor], where: str = WEIGHTS) -> dict[str, torch.Tensor]:
    parts = {v: k for k, v in HF_MODULES.items()}
    out = {}
    for name, t in tensors.items():
        m = _PEFT.fullmatch(name)
        if not m or m.group(2) not in parts:
            raise ModelFormatError(f"{where}: unexpected adapter tensor {name!r}",
                                   "only LoRA adapters on attention and MLP projections are supported")
        layer, module, ab = m.groups()
        part = parts[module]
        out[f"layers.{layer}.{_FUSED_PATH[part]}.lora_{ab.lower()}.{part}"] = t
    return out


def read_settings(path: Path) -> LoraSettings:
    cfg = hf.read_object(path, ADAPTER_CONFIG)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ModelFormatError(f"{path.name}: only LoRA adapters are supported (peft_type {cfg.get('peft_type')!r})")
    for key, bad in (("use_dora", True), ("fan_in_fan_out", True)):
        if cfg.get(key) == bad:
            raise ModelFormatError(f"{path.name}: {key}={bad} is not supported")
    if cfg.get("modules_to_save") or cfg.get("bias", "none") != "none":
        raise ModelFormatError(f"{path.name}: adapters with modules_to_save or trained biases are not supported")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if not isinstance(r, int) or r < 1 or r > 65536 or not isinstance(alpha, (int, float)):
        raise ModelFormatError(f"{path.name}: r={r!r} / lora_alpha={alpha!r} are not valid")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    names = {v.split(".")[1]: k for k, v in HF_MODULES.items()}
    if targets == ["all-linear"]:
        parts = tuple(HF_MODULES)
    else:
        unknown = [t for t in targets if t not in names]
        if unknown or not targets:
            raise ModelFormatError(f"{path.name}: target module {unknown[0] if unknown else None!r} is not supported",
                                   f"supported: {', '.join(names)}")
        parts = tuple(p for p in HF_MODULES if p in {names[t] for t in targets})
    return LoraSettings(r, float(alpha), float(cfg.get("lora_dropout") or 0.0), bool(cfg.get("use_rslora")), parts)


def read(folder_files: Mapping[str, Path]) -> tuple[LoraSettings, dict[str, torch.Tensor]]:
    """Settings and our-named tensors of an adapter (files by relative name)."""
    if CONFIG not in folder_files or WEIGHTS not in folder_files:
        raise ModelFormatError(f"an adapter needs {CONFIG} and {WEIGHTS}")
    settings = read_settings(folder_files[CONFIG])
    tensors = {n: t.float() for n, t, _ in hf.iter_safetensors({WEIGHTS: folder_files[WEIGHTS]})}
    return settings, from_peft(tensors)

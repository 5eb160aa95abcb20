"""Training checkpoints: every file written in a temp folder and fsynced, a sha256 manifest
written last, then the folder renamed into place. A checkpoint without its manifest never
becomes visible; one whose files do not match their manifest is refused."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import OwnlmError
from ..formats import hf
from ..formats.hf import write_safetensors
from ..fsutil import MANIFEST, atomic_dir, sweep
from ..store.store import sha256_file

TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"
_STEP = re.compile(r"step-(\d{7})")


class CheckpointError(OwnlmError):
    exit_code = 2


def folder(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir: Path, step: int, trainable: dict[str, torch.Tensor], optimizer: dict[str, torch.Tensor],
         state: dict[str, Any], keep: int = 2) -> Path:
    final = folder(run_dir) / f"step-{step:07d}"
    with atomic_dir(final, replace=True) as tmp:
        write_safetensors(tmp / TRAINABLE, {k: v.detach().contiguous().cpu() for k, v in trainable.items()}, {})
        write_safetensors(tmp / OPTIMIZER, {k: v.detach().contiguous().cpu() for k, v in optimizer.items()}, {})
        (tmp / STATE).write_text(json.dumps(state, indent=1), encoding="utf-8")
        digests = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps(digests, indent=1), encoding="utf-8")  # last
    for old in complete(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(run_dir: Path) -> list[Path]:
    """Checkpoint folders in step order (temp folders of killed writes are swept, never listed)."""
    root = folder(run_dir)
    sweep(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP.fullmatch(p.name))


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(trainable tensors, optimizer tensors, state) of a checkpoint, verified against its manifest."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {MANIFEST}",
                              "it was never finished; remove it, or resume from an earlier one") from None
    except ValueError:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is corrupt", "remove this checkpoint") from None
    for name in (TRAINABLE, OPTIMIZER, STATE):
        if name not in manifest:
            raise CheckpointError(f"checkpoint {path}: {MANIFEST} does not list {name}", "remove this checkpoint")
        f = path / name
        if not f.is_file() or sha256_file(f) != manifest[name]:
            raise CheckpointError(f"checkpoint {path}: {name} is missing or does not match its sha256",
                                  "the checkpoint is damaged; remove it to resume from an earlier one")
    try:
        trainable = {n: t.clone() for n, t, _ in hf.iter_safetensors({TRAINABLE: path / TRAINABLE})}
        optimizer = {n: t.clone() for n, t, _ in hf.iter_safetensors({OPTIMIZER: path / OPTIMIZER})}
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
    except (OwnlmError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e}") from None
    return trainable, optimizer, state

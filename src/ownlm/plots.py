"""Figures for `inspect --plot` and `diff --plot` (matplotlib, an optional dependency).

The file is written next to its destination and renamed into place, so a killed run never leaves
half an image; its format follows the suffix (.png, .svg, .pdf)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BadRequest

LAYER = re.compile(r"^layers\.(\d+)\.(.+?)(\.weight)?$")
FORMATS = (".png", ".svg", ".pdf")


def check_path(path: str | os.PathLike) -> Path:
    """The figure's path, refused before any work if its format or folder is wrong."""
    p = Path(path)
    if p.suffix.lower() not in FORMATS:
        raise BadRequest(f"--plot {p}: give a file ending in {', '.join(FORMATS)}")
    if not p.parent.is_dir():
        raise BadRequest(f"--plot {p}: the folder {p.parent} does not exist")
    _pyplot()
    return p


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise BadRequest("--plot needs matplotlib", "pip install 'ownlm[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def per_layer(rows: list[dict[str, Any]], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """{tensor kind within a layer (attn.q, mlp.down, ...): (layer indices, values of `key`)} for
    the layers' weight matrices and norm weights (biases left out)."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in rows:
        m = LAYER.match(r["name"])
        if not m or r["name"].endswith(".bias"):
            continue
        xs, ys = out.setdefault(m.group(2), ([], []))
        xs.append(int(m.group(1)))
        ys.append(r[key])
    return {k: tuple(zip(*sorted(zip(*v)))) for k, v in sorted(out.items())}


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def plot_inspect(info: dict[str, Any], samples: dict[str, np.ndarray], path: Path) -> None:
    """Left: each layer tensor's L2 norm by layer, one line per kind. Right: value histograms of
    each component (embed, attention, mlp, norm, head) from evenly strided samples."""
    from .inspect import component

    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for kind, (xs, ys) in per_layer(info["tensors"], "norm").items():
        left.plot(xs, ys, marker=".", label=kind)
    left.set(xlabel="layer", ylabel="L2 norm", title="weight norms by layer")
    left.legend(fontsize=7, ncol=2)
    groups: dict[str, list[np.ndarray]] = {}
    for name, values in samples.items():
        groups.setdefault(component(name), []).append(values)
    for comp, parts in sorted(groups.items()):
        values = np.concatenate(parts)
        right.hist(values, bins=120, histtype="step", density=True, log=True, label=f"{comp} ({len(values):,} sampled)")
    right.set(xlabel="value", ylabel="density (log)", title="weight values by component")
    right.legend(fontsize=7)
    fig.suptitle(f"{info['model']['name']}  ({info['model']['architecture']}, {info['model']['quantization']})")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_diff(info: dict[str, Any], path: Path, top: int = 20) -> None:
    """Left: relative change ‖B−A‖/‖A‖ by layer, one line per kind. Right: the most-changed tensors."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    positive = [r["relative_change"] for r in info["tensors"] if 0 < r["relative_change"] < float("inf")]
    for kind, (xs, ys) in per_layer(info["tensors"], "relative_change").items():
        left.plot(xs, ys, marker=".", label=kind)
    if positive and max(positive) / min(positive) > 100:
        left.set_yscale("symlog", linthresh=min(positive))
    left.set(xlabel="layer", ylabel="||B-A|| / ||A||", title="relative change by layer")
    left.legend(fontsize=7, ncol=2)
    rows = info["tensors"][:top][::-1]
    right.barh([r["name"] for r in rows], [min(r["relative_change"], 1e30) for r in rows])
    right.tick_params(axis="y", labelsize=7)
    right.set(xlabel="||B-A|| / ||A||", title=f"most-changed tensors (top {len(rows)})")
    fig.suptitle(f"{info['a']}  vs  {info['b']}")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)

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
EXPERT = re.compile(r"\.experts\.\d+\.")
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


def rms_by_layer(rows: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """{tensor kind: (layer indices, per-element RMS)}; a layer's experts (mlp.experts.N.up, all of
    one shape) are one kind, their RMS the root of the mean of their squared RMS."""
    acc: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        m = LAYER.match(r["name"])
        if not m or r["name"].endswith(".bias"):
            continue
        kind = EXPERT.sub(".experts.*.", m.group(2))
        acc.setdefault(kind, {}).setdefault(int(m.group(1)), []).append(r["rms"])
    return {k: (sorted(v), [float(np.sqrt(np.mean(np.square(v[i])))) for i in sorted(v)])
            for k, v in sorted(acc.items())}


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _legend_outside(ax, **kw):
    """A legend to the right of the axes, never over what they draw (constrained layout makes room)."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=7, **kw)


def _short(name: str) -> str:
    return Path(name).name if os.sep in name else name


def _rms_panel(ax, info: dict[str, Any]) -> None:
    """Per-element RMS by layer, one line per kind; the embedding left of layer 0, the final norm
    and the output head right of the last layer (a tied head is said so, not drawn twice)."""
    rows = {r["name"]: r for r in info["tensors"]}
    kinds = rms_by_layer(info["tensors"])
    n = 1 + max((x for xs, _ in kinds.values() for x in xs), default=-1)
    gap = max(2, -(-n // 10))  # room for the "embed" and "head" tick labels
    embed_x, head_x = -gap, n + gap
    for kind, (xs, ys) in kinds.items():
        ax.plot(xs, ys, marker=".", label=kind)
    if "embed.weight" in rows:
        ax.plot([embed_x], [rows["embed.weight"]["rms"]], "s", color="black", ms=7, label="embed")
    if "norm.weight" in rows:
        ax.plot([n], [rows["norm.weight"]["rms"]], "^", color="dimgray", ms=7, label="norm (final)")
    if "lm_head.weight" in rows:
        ax.plot([head_x], [rows["lm_head.weight"]["rms"]], "D", color="firebrick", ms=7, label="head")
    elif info["model"]["config"].get("tie_embeddings") and "embed.weight" in rows:
        ax.annotate("head: tied\n(= embed)", (head_x, rows["embed.weight"]["rms"]), ha="center", va="center",
                    fontsize=7, color="firebrick")
    values = [r["rms"] for r in info["tensors"] if r.get("rms", 0) > 0 and not r["name"].endswith(".bias")]
    if values and max(values) / min(values) > 20:
        ax.set_yscale("log")
    step = max(1, -(-n // 8))
    layer_ticks = [x for x in range(0, n, step) if n - x >= step / 2 or x == 0]
    ax.set_xticks([embed_x, *layer_ticks, head_x], ["embed", *map(str, layer_ticks), "head"])
    ax.set_xlim(embed_x - gap / 2, head_x + gap / 2)
    ax.set(xlabel="layer", ylabel="RMS  sqrt(mean(w²))", title="per-element RMS by layer")
    ax.grid(alpha=0.3)
    _legend_outside(ax, ncol=1 if len(kinds) <= 14 else 2)


FLOAT_TYPES = {"F64", "F32", "F16", "BF16", "float64", "float32", "float16", "bfloat16"}
FEW_VALUES = 64  # a component with at most this many distinct values is drawn value by value


def _histogram_panel(ax, info: dict[str, Any], samples: dict[str, np.ndarray]) -> None:
    """Value histograms of each component (embed, attention, mlp, norm, head) from evenly strided
    samples of the values the model computes with (quantized tensors dequantized), as the fraction
    of samples per bin on a log axis; empty bins are left out rather than drawn as drops to zero,
    and a component with few distinct values (fresh norms, tiny quantized tensors) is drawn at
    those values."""
    from .inspect import component

    types = {r["name"]: r["type"] for r in info["tensors"]}
    groups: dict[str, tuple[list[np.ndarray], set[str]]] = {}
    for name, values in samples.items():
        parts, kinds = groups.setdefault(component(name), ([], set()))
        parts.append(values)
        kinds.add(types.get(name, "?"))
    merged = {c: np.concatenate(parts) for c, (parts, _) in groups.items() if parts}
    if not merged:
        return
    everything = np.concatenate(list(merged.values()))
    lo, hi = float(everything.min()), float(everything.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, 121)
    for comp, values in sorted(merged.items()):
        label = f"{comp} · {'/'.join(sorted(groups[comp][1]))} ({len(values):,} sampled)"
        distinct, counts = np.unique(values, return_counts=True)
        if len(distinct) <= FEW_VALUES:
            line = ax.vlines(distinct, 0, counts / len(values), lw=1.5, alpha=0.8)
            line.set_label(f"{label}, {len(distinct)} distinct")
            ax.plot(distinct, counts / len(values), ".", color=line.get_color())
            continue
        counts, _ = np.histogram(values, bins=edges)
        frac = np.where(counts > 0, counts / len(values), np.nan)
        ax.stairs(frac, edges, label=label, lw=1.2)
    ax.set_yscale("log")
    quantized = sorted({t for t in types.values() if t not in FLOAT_TYPES})
    what = f"dequantized from {', '.join(quantized)}" if quantized else "as stored"
    ax.set(xlabel="value", ylabel="fraction of samples per bin (log)", title=f"weight values by component ({what})")
    ax.grid(alpha=0.3)
    _legend_outside(ax)


def inspect_figure(info: dict[str, Any], samples: dict[str, np.ndarray]):
    """The `inspect --plot` figure (matplotlib Figure): per-element RMS by layer with the embedding
    and head, and value histograms by component; legends outside the axes."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5.5), layout="constrained")
    _rms_panel(left, info)
    _histogram_panel(right, info, samples)
    m = info["model"]
    fig.suptitle(f"{_short(m['name'])}  ({m['architecture']}, {m['quantization']})")
    return fig


def plot_inspect(info: dict[str, Any], samples: dict[str, np.ndarray], path: Path) -> None:
    """Write `inspect_figure` to `path`."""
    plt = _pyplot()
    fig = inspect_figure(info, samples)
    try:
        _save(fig, path)
    finally:
        plt.close(fig)


def plot_diff(info: dict[str, Any], path: Path, top: int = 20) -> None:
    """Left: relative change ‖B−A‖/‖A‖ by layer, one line per kind. Right: the most-changed tensors."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5), layout="constrained")
    positive = [r["relative_change"] for r in info["tensors"] if 0 < r["relative_change"] < float("inf")]
    for kind, (xs, ys) in per_layer(info["tensors"], "relative_change").items():
        left.plot(xs, ys, marker=".", label=kind)
    if positive and max(positive) / min(positive) > 100:
        left.set_yscale("symlog", linthresh=min(positive))
    left.set(xlabel="layer", ylabel="||B-A|| / ||A||", title="relative change by layer")
    _legend_outside(left)
    rows = info["tensors"][:top][::-1]
    right.barh([r["name"] for r in rows], [min(r["relative_change"], 1e30) for r in rows])
    right.tick_params(axis="y", labelsize=7)
    right.set(xlabel="||B-A|| / ||A||", title=f"most-changed tensors (top {len(rows)})")
    fig.suptitle(f"{_short(info['a'])}  vs  {_short(info['b'])}")
    try:
        _save(fig, path)
    finally:
        plt.close(fig)

"""What the store holds on disk and what can go: `ownlm du` (blobs, repacked caches, tune runs,
temp files, with their sizes) and `ownlm prune` (unreferenced blobs, stale or unused repacked
variants, the intermediate checkpoints of finished tune runs, temp files of dead processes).

`prune` and `prune --dry-run` run the same code: a plan made under the store's blobs lock (the
lock `gc` and every writer take when a blob becomes visible, so no blob a live pull or import
holds is in it), then, unless it is a dry run, the removal of exactly that plan under the same
lock. A tune run is finished when its last checkpoint is at its last step; training is over
then, and only the checkpoints before that last one go (a run still training, or stopped
before its end, is never touched: it can be resumed)."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from . import repacked
from .fsutil import remove_path
from .manage import kind_of
from .store.refs import split_name
from .store.store import BLOBS_LOCK, Store

# tune/run.py and tune/checkpoints.py (layer 4) write these: <root>/runs/<name>-<tag>/checkpoints/step-NNNNNNN
RUNS = "runs"
CHECKPOINTS = "checkpoints"
STATE = "state.json"
_STEP = re.compile(r"step-(\d{7})")
DAY = 86400.0
STALE_PARTIAL = 3600.0  # a download writes its partial file continuously; an hour untouched is an interrupted one


def _size(path: Path) -> int:
    try:
        if path.is_file() or path.is_symlink():
            return path.lstat().st_size
        return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    except OSError:
        return 0


def _manifests(store: Store) -> dict[str, dict]:
    out = {}
    for n in store.names():
        try:
            out[n] = store.read(n)
        except Exception:  # noqa: BLE001 - a broken manifest names nothing du can show
            continue
    return out


def runs(store: Store) -> list[dict[str, Any]]:
    """Each tune run folder: its checkpoints (step, size), whether it finished, the store entry it made."""
    root = store.root / RUNS
    stored = {"{}-{}".format(*split_name(n)): n for n in store.names()}
    out = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if not d.is_dir():
            continue
        ckdir = d / CHECKPOINTS
        cks = sorted(p for p in ckdir.iterdir() if p.is_dir() and _STEP.fullmatch(p.name)) if ckdir.is_dir() else []
        steps = step = None
        if cks:
            try:
                state = json.loads((cks[-1] / STATE).read_text(encoding="utf-8"))
                step, steps = int(state["step"]), int(state["steps"])
            except (OSError, ValueError, KeyError, TypeError):
                pass
        out.append({"path": d, "name": d.name, "stored": stored.get(d.name), "size": _size(d),
                    "finished": step is not None and steps is not None and step >= steps, "step": step,
                    "steps": steps,
                    "checkpoints": [{"path": p, "step": int(p.name[5:]), "size": _size(p)} for p in cks]})
    return out


def _blobs(store: Store, manifests: dict[str, dict]) -> list[dict[str, Any]]:
    users: dict[str, list[str]] = {}
    for n, m in manifests.items():
        for f in m["files"].values():
            if isinstance(f, dict) and f.get("sha256"):
                users.setdefault(f["sha256"], []).append(n)
    out = []
    for p in sorted((store.root / "blobs").iterdir()) + sorted((store.root / "links").iterdir()):
        digest = p.name.removeprefix("sha256-").removesuffix(".json")
        out.append({"path": p, "digest": digest, "size": _size(p), "linked": p.suffix == ".json",
                    "models": sorted(set(users.get(digest, [])))})
    return out


def du(store: Store | None = None) -> dict[str, Any]:
    """Everything under the store that takes space, with sizes (bytes) and totals."""
    store = store or Store()
    manifests = _manifests(store)
    names_of: dict[str, list[str]] = {}
    for n, m in manifests.items():
        if m.get("digest") and kind_of(m) != "preset":
            names_of.setdefault(m["digest"], []).append(n)
    blobs = _blobs(store, manifests)
    cache = repacked.entries(store.root)
    current = repacked.current_variants()
    tune_runs = runs(store)
    tmp = [{"path": p, "size": _size(p)} for p in sorted((store.root / "tmp").iterdir())]
    partial = [{"path": p, "size": _size(p), "last_written": _iso(_mtime(p))} for p in _partials(store)]
    ref = sum(b["size"] for b in blobs if b["models"])
    out = {
        "root": str(store.root),
        "blobs": {"total": sum(b["size"] for b in blobs), "referenced": ref,
                  "unreferenced": sum(b["size"] for b in blobs if not b["models"]), "items": blobs},
        "repacked": {"total": sum(e["size"] for e in cache), "bound": repacked.bound(cache),
                     "keep_per_model": repacked.keep_per_model(),
                     "items": [{**e, "models": names_of.get(e["digest"], []), "current": e["variant"] in current,
                                "last_used": _iso(e["used"])} for e in cache]},
        "runs": {"total": sum(r["size"] for r in tune_runs), "items": tune_runs},
        "tmp": {"total": sum(t["size"] for t in tmp), "items": tmp},
        "partial": {"total": sum(t["size"] for t in partial), "items": partial},
    }
    out["total"] = sum(out[k]["total"] for k in ("blobs", "repacked", "runs", "tmp", "partial"))
    return _jsonable(out)


def _partials(store: Store) -> list[Path]:
    """Downloads kept for a later pull to resume (store.partial)."""
    folder = store.root / "partial"
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items() if k != "used"}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _plan(store: Store, days: float, now: float) -> list[dict[str, Any]]:
    """What prune removes; the caller holds the blobs lock."""
    plan: list[dict[str, Any]] = []
    dead = [p for p in store.dead_tmp() if p.parent.name == "tmp"]  # pending records: gc drops the dead ones
    found = store.unreferenced()
    if found is not None:  # None: a manifest is unreadable, no blob can be told apart
        blobs, caches = found
        plan += [{"kind": "blob", "path": p, "size": _size(p), "why": "no model names it"} for p in blobs]
        plan += [{"kind": "repacked", "path": p, "size": _size(p), "why": "its model is no longer in the store"}
                 for p in caches]
    taken = {item["path"] for item in plan}
    current = repacked.current_variants()
    for e in repacked.entries(store.root):
        if e["path"] in taken:
            continue
        why = ("made by another ownlm, torch or CPU" if e["variant"] not in current
               else f"not used for {days:g} days" if now - e["used"] > days * DAY else None)
        if why:
            plan.append({"kind": "repacked", "path": e["path"], "size": e["size"], "why": why})
            taken.add(e["path"])
    over = repacked.over_bound(store.root, found=[e for e in repacked.entries(store.root) if e["path"] not in taken])
    plan += [{"kind": "repacked", "path": e["path"], "size": e["size"], "why": "beyond the cache's bound"}
             for e in over]
    for r in runs(store):
        if r["finished"]:
            plan += [{"kind": "checkpoint", "path": c["path"], "size": c["size"],
                      "why": f"run {r['name']} finished at step {r['step']}"} for c in r["checkpoints"][:-1]]
    plan += [{"kind": "tmp", "path": p, "size": _size(p), "why": "left by a process that is gone"} for p in dead]
    plan += [{"kind": "partial", "path": p, "size": _size(p), "why": "an interrupted download (a new pull starts over)"}
             for p in _partials(store) if now - _mtime(p) > STALE_PARTIAL and not store.partial_busy(p)]
    return plan


def prune(store: Store | None = None, dry_run: bool = False, days: float = 30.0) -> dict[str, Any]:
    """Remove (or with dry_run only list) what nothing needs: {"dry_run", "items": [{kind, path,
    size, why}], "total"}. The listed items are exactly those removed."""
    store = store or Store()
    if days < 0:
        from .errors import BadRequest

        raise BadRequest(f"--days must not be negative (got {days:g})")
    with store.lock(BLOBS_LOCK):
        plan = _plan(store, days, time.time())
        if not dry_run:
            for item in plan:
                if item["kind"] == "blob":
                    store.remove_blob(item["path"])
                elif item["kind"] == "tmp":
                    store.remove_tmp(item["path"])
                elif item["kind"] == "repacked":
                    shutil.rmtree(item["path"], ignore_errors=True)
                else:
                    remove_path(item["path"])
    return _jsonable({"dry_run": dry_run, "items": plan, "total": sum(i["size"] for i in plan)})


__all__ = ["du", "prune", "runs"]

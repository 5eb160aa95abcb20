"""Runs mutated cases through the worker (worker.py) with a time bound per case, and keeps every
case that does not end in ownlm's own error or success as a reproducer in tests/fuzz/crashes/.

    python -m tests.fuzz.harness --cases 20000 --kinds gguf,hf,template --seed 7    (what `make fuzz` runs)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from . import mutate

HERE = Path(__file__).parent
CRASHES = HERE / "crashes"
KINDS = ("gguf", "hf", "template", "schema", "body")
CASE_SECONDS = 10.0


class Pool:
    """One worker process, restarted after a hang or a death."""

    def __init__(self, env: dict[str, str]):
        self.env, self.proc = env, None

    def _start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz.worker", str(mutate.CORPUS)],
                                     cwd=HERE.parents[1], env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        ready = self._read(300)
        if ready is None or ready.get("outcome") != "ready":
            raise RuntimeError(f"the fuzz worker did not start: {ready}")

    def _read(self, seconds: float) -> dict | None:
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(seconds):
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def run(self, case: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        t0 = time.monotonic()
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        result = self._read(CASE_SECONDS)
        seconds = time.monotonic() - t0
        if result is None:
            hung = self.proc.poll() is None
            self.close()
            result = {"outcome": "hang" if hung else "crash",
                      "detail": f"no answer in {CASE_SECONDS:g} s" if hung else "the worker died"}
        result["seconds"] = round(seconds, 3)
        return result

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def cases(kind: str, n: int, seed: int, folder: Path):
    """n cases of a kind, written under `folder`: (case for the worker, files to keep if it fails)."""
    rng = random.Random(f"{kind}-{seed}")
    base = mutate.Gguf.read(mutate.CORPUS / "tiny.gguf") if kind == "gguf" else None
    templates = sorted((mutate.CORPUS / "templates").glob("*.jinja"))
    schemas = sorted((mutate.CORPUS / "schemas").glob("*.json"))
    bodies = sorted((mutate.CORPUS / "bodies").glob("*.json"))
    for i in range(n):
        path = folder / f"{kind}-{i}"
        if kind == "gguf":
            path = path.with_suffix(".gguf")
            path.write_bytes(mutate.mutate_gguf(base, rng))
            yield {"kind": kind, "path": str(path)}
        elif kind == "hf":
            path.mkdir()
            for name, data in mutate.mutate_hf(mutate.CORPUS / "hf", rng).items():
                (path / name).write_bytes(data)
            yield {"kind": kind, "path": str(path)}
        elif kind == "template":
            path = path.with_suffix(".jinja")
            path.write_text(mutate.mutate_template(rng.choice(templates).read_text(), rng), encoding="utf-8",
                            errors="surrogatepass")
            yield {"kind": kind, "path": str(path)}
        elif kind == "schema":
            path = path.with_suffix(".json")
            path.write_text(mutate.mutate_schema(json.loads(rng.choice(schemas).read_text()), rng))
            yield {"kind": kind, "path": str(path)}
        else:
            route, body = json.loads(rng.choice(bodies).read_text())
            path = path.with_suffix(".json")
            path.write_text(mutate.mutate_body(body, rng), encoding="utf-8", errors="surrogatepass")
            yield {"kind": kind, "path": str(path), "route": route}


def signature(result: dict) -> str:
    """What makes two failures the same: the exception's type and where it was raised."""
    detail = result.get("detail") or ""
    return f"{result['outcome']}:{detail.split(':')[0]}:{detail.rpartition(' at ')[2]}"


def keep(case: dict, result: dict) -> Path | None:
    """Copy a failing case into crashes/ (named by its content) with what happened beside it,
    unless a kept case already fails the same way. Of an HF folder only the files that differ from
    the corpus are kept (replay lays them over it)."""
    CRASHES.mkdir(exist_ok=True)
    sig = signature(result)
    if any(json.loads(p.read_text()).get("signature") == sig for p in CRASHES.glob("*.json")):
        return None
    src = Path(case["path"])
    if src.is_dir():
        files = {p.name: p.read_bytes() for p in sorted(src.iterdir())}
        files = {n: b for n, b in files.items() if not (mutate.CORPUS / "hf" / n).is_file()
                 or (mutate.CORPUS / "hf" / n).read_bytes() != b}
        data = b"".join(n.encode() + b for n, b in files.items())
    else:
        data = src.read_bytes()
    name = f"{case['kind']}-{hashlib.sha256(data).hexdigest()[:12]}"
    dst = CRASHES / (name + ("" if src.is_dir() else src.suffix))
    if src.is_dir():
        dst.mkdir(exist_ok=True)
        for n, b in files.items():
            (dst / n).write_bytes(b)
    else:
        shutil.copy(src, dst)
    meta = {k: v for k, v in case.items() if k != "path"} | {"file": dst.name, "signature": sig, **result}
    (CRASHES / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    return dst


def worker_env(home: Path) -> dict[str, str]:
    return {**os.environ, "OWNLM_HOME": str(home), "OWNLM_OFFLINE": "1", "OWNLM_REPACK_CACHE": "0",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parents[1]), os.environ.get("PYTHONPATH")]))}


def fuzz(kinds: list[str], n: int, seed: int, save: bool = True, say=print) -> dict:
    """Runs n cases of each kind; returns {kind: Counter of outcomes, "failures": [...]}."""
    report: dict = {"failures": []}
    with tempfile.TemporaryDirectory(prefix="ownlm-fuzz-") as tmp:
        pool = Pool(worker_env(Path(tmp) / "home"))
        try:
            for kind in kinds:
                counts: Counter = Counter()
                t0 = time.monotonic()
                folder = Path(tmp) / kind
                folder.mkdir()
                for case in cases(kind, n, seed, folder):
                    result = pool.run(case)
                    counts[result["outcome"]] += 1
                    if result["outcome"] in ("crash", "hang"):
                        kept = keep(case, result) if save else None
                        report["failures"].append({"kind": kind, **result, "kept": str(kept) if kept else None})
                        say(f"{kind}: {result['outcome']}: {result.get('detail')}")
                    src = Path(case["path"])
                    shutil.rmtree(src) if src.is_dir() else src.unlink()
                report[kind] = dict(counts) | {"seconds": round(time.monotonic() - t0, 1)}
                say(f"{kind}: {n} cases: {dict(counts)} in {report[kind]['seconds']} s")
        finally:
            pool.close()
    return report


def replay(path: Path, pool: Pool, tmp: Path) -> dict:
    """Run one kept reproducer again (its .json says how; an HF case over a copy of the corpus)."""
    meta = json.loads(path.read_text())
    kept = path.parent / meta["file"]
    if meta["kind"] == "hf":
        folder = tmp / kept.name
        shutil.copytree(mutate.CORPUS / "hf", folder)
        for p in kept.iterdir():
            shutil.copy(p, folder / p.name)
        kept = folder
    return pool.run({k: v for k, v in meta.items() if k in ("kind", "route")} | {"path": str(kept)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=1000, help="cases per kind")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--seed", type=int, default=int(time.time()))
    args = ap.parse_args()
    report = fuzz(args.kinds.split(","), args.cases, args.seed)
    print(json.dumps({k: v for k, v in report.items() if k != "failures"} | {"failures": len(report["failures"]),
                                                                            "seed": args.seed}))
    sys.exit(1 if report["failures"] else 0)


if __name__ == "__main__":
    main()

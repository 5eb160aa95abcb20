"""The content-addressed store under $OWNLM_HOME.

    blobs/sha256-<hex>                 file contents, named by digest (or a hard link to the user's file)
    links/sha256-<hex>.json            a reference to a file kept where it is (`import --link` across filesystems)
    manifests/<name>/<tag>.json        one per model: source, files -> digests, facts for `list`/`show`
    tmp/                               partial writes (<pid>-<random>.part); swept when their process is gone
    locks/                             flock files that serialize pulls of one model

Every write goes to tmp/, is fsynced, and is renamed into place, so a killed process never
leaves a half-written blob or manifest. Digests are re-checked on load whenever a file's size,
mtime or inode differs from when it was last verified."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from ..errors import IntegrityError, ModelNotFound
from ..fsutil import fsync_dir, pid_alive
from ..paths import home
from .refs import split_name

CHUNK = 1 << 20
Progress = Callable[[int], None]


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


class Store:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else home()
        for sub in ("blobs", "links", "manifests", "tmp", "locks", "verified"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # -- atomic writes ------------------------------------------------------------------------
    def _tmp_path(self, suffix: str = ".part") -> Path:
        return self.root / "tmp" / f"{os.getpid()}-{secrets.token_hex(8)}{suffix}"

    def sweep_tmp(self) -> int:
        """Remove partial files left by processes that no longer exist."""
        removed = 0
        for p in (self.root / "tmp").iterdir():
            pid = p.name.split("-", 1)[0]
            alive = pid.isdigit() and pid_alive(int(pid))
            if not alive:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed += 1
        return removed

    @contextlib.contextmanager
    def tmp_dir(self) -> Iterator[Path]:
        path = self._tmp_path("")
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def write_json_atomic(self, path: Path, data: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp_path(".json")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
        finally:
            tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        path = self.root / "locks" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".lock")
        with open(path, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- blobs --------------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise IntegrityError(f"{digest!r} is not a sha256 digest")
        return self.root / "blobs" / f"sha256-{digest}"

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).exists() or (self.root / "links" / f"sha256-{digest}.json").exists()

    def put_stream(self, stream: BinaryIO, expected: str | None = None, progress: Progress | None = None,
                   what: str = "download") -> str:
        """Copy a stream into a blob; the digest is checked before the blob becomes visible."""
        tmp = self._tmp_path()
        h = hashlib.sha256()
        try:
            with open(tmp, "wb") as out:
                while chunk := stream.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    if progress:
                        progress(len(chunk))
                out.flush()
                os.fsync(out.fileno())
            digest = h.hexdigest()
            if expected and digest != expected:
                raise IntegrityError(f"{what}: sha256 {digest} does not match the pinned {expected}",
                                     "the source changed or the download was corrupted; nothing was stored")
            final = self.blob_path(digest)
            if not final.exists():
                os.replace(tmp, final)
                fsync_dir(final.parent)
            self._mark_verified(final, digest)
            return digest
        finally:
            tmp.unlink(missing_ok=True)

    def put_file(self, src: Path, expected: str | None = None, progress: Progress | None = None) -> str:
        with open(src, "rb") as f:
            return self.put_stream(f, expected, progress, what=str(src))

    def link_file(self, src: Path, progress: Progress | None = None) -> str:
        """Keep a large file where it is: a hard link into blobs/ when the filesystem allows,
        otherwise a reference whose digest is re-checked whenever the file changes."""
        src = src.resolve()
        digest = sha256_file(src, progress)
        final = self.blob_path(digest)
        if final.exists():
            return digest
        tmp = self._tmp_path()
        try:
            os.link(src, tmp)
            os.replace(tmp, final)
            self._mark_verified(final, digest)
        except OSError:
            tmp.unlink(missing_ok=True)
            ref = {"path": str(src), "sha256": digest, **_stamp(src)}
            self.write_json_atomic(self.root / "links" / f"sha256-{digest}.json", ref)
        return digest

    def _mark_verified(self, path: Path, digest: str) -> None:
        self.write_json_atomic(self.root / "verified" / f"{digest}.json", _stamp(path))

    def open_blob(self, digest: str, verify: bool = True) -> Path:
        """Path of a blob, its digest re-checked when the file changed since it was verified."""
        path = self.blob_path(digest)
        if not path.exists():
            link = self.root / "links" / f"sha256-{digest}.json"
            if not link.exists():
                raise IntegrityError(f"blob sha256-{digest[:12]} is missing from the store",
                                     "remove the model with `ownlm rm` and pull or import it again")
            path = Path(json.loads(link.read_text())["path"])
            if not path.exists():
                raise IntegrityError(f"linked file {path} is gone", "put it back or `ownlm rm` the model")
        if verify:
            mark = self.root / "verified" / f"{digest}.json"
            try:
                ok = json.loads(mark.read_text()) == _stamp(path)
            except (OSError, ValueError):
                ok = False
            if not ok:
                actual = sha256_file(path)
                if actual != digest:
                    raise IntegrityError(f"{path} is corrupt: its sha256 is {actual[:12]}..., "
                                         f"expected {digest[:12]}...",
                                         "remove the model with `ownlm rm` and pull or import it again")
                self._mark_verified(path, digest)
        return path

    # -- manifests ----------------------------------------------------------------------------
    def manifest_path(self, name: str) -> Path:
        n, tag = split_name(name)
        return self.root / "manifests" / n / f"{tag}.json"

    def has(self, name: str) -> bool:
        return self.manifest_path(name).exists()

    def read(self, name: str) -> dict[str, Any]:
        path = self.manifest_path(name)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            n, tag = split_name(name)
            raise ModelNotFound(f"model {n}:{tag} is not in the store",
                                "see `ownlm list`, or `ownlm pull` it") from None
        except ValueError:
            raise IntegrityError(f"manifest of {name} is corrupt", f"`ownlm rm {name}` and pull it again") from None

    def write(self, name: str, manifest: dict[str, Any]) -> None:
        self.write_json_atomic(self.manifest_path(name), manifest)

    def names(self) -> list[str]:
        out = []
        for d in sorted((self.root / "manifests").iterdir()):
            if d.is_dir():
                out += [f"{d.name}:{p.stem}" for p in sorted(d.glob("*.json"))]
        return out

    def remove(self, name: str) -> dict[str, Any]:
        manifest = self.read(name)
        path = self.manifest_path(name)
        path.unlink()
        with contextlib.suppress(OSError):
            path.parent.rmdir()
        self.gc()
        return manifest

    def gc(self) -> int:
        """Delete blobs no manifest refers to, and repacked-model caches of models no longer here."""
        used, models = set(), set()
        for n in self.names():
            with contextlib.suppress(Exception):
                manifest = self.read(n)
                used |= {f["sha256"] for f in manifest.get("files", {}).values()}
                models.add(manifest.get("digest"))
        repacked = self.root / "cache" / "repacked"
        for p in list(repacked.iterdir()) if repacked.is_dir() else []:
            if p.name.split("-")[0] not in models:
                shutil.rmtree(p, ignore_errors=True)
        removed = 0
        for p in list((self.root / "blobs").iterdir()) + list((self.root / "links").iterdir()):
            digest = p.name.removeprefix("sha256-").removesuffix(".json")
            if digest not in used:
                p.unlink(missing_ok=True)
                (self.root / "verified" / f"{digest}.json").unlink(missing_ok=True)
                removed += 1
        return removed




def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


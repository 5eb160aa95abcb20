"""The content-addressed store under $OWNLM_HOME.

    blobs/sha256-<hex>                 file contents, named by digest (or a hard link to the user's file)
    links/sha256-<hex>.json            a reference to a file kept where it is (`import --link` across filesystems)
    manifests/<name>/<tag>.json        one per model: source, files -> digests, facts for `list`/`show`
    pending/<pid>-<random>.json        digests a live writer has stored (or reuses) but not yet named in a manifest
    partial/<hash>.part                downloads in progress or interrupted, resumed by the next pull of the
                                       same file (removed once stored, or when their digest is wrong)
    tmp/                               partial writes (<pid>-<random>.part) and claims on export temp paths
                                       (<pid>-<random>.claim); swept when their process is gone
    locks/                             flock files: one per model name (pulls, imports, rm of it) and one for
                                       the blobs (gc, and every writer at the moment a blob becomes visible)

Every write goes to tmp/, is fsynced, and is renamed into place, so a killed process never
leaves a half-written blob or manifest. Digests are re-checked on load whenever a file's size,
mtime or inode differs from when it was last verified.

Nothing is lost to a race with `gc` (run by `rm`): a writer opens its pending record before its
first byte, adds each digest to it under the blobs lock in the same step that makes the blob
visible (or reuses one already there), and drops the record only after its manifest is written.
`gc` holds the blobs lock for its whole scan and keeps every digest of a live writer's record;
a record whose process is dead is ignored and removed."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import stat
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from ..errors import IntegrityError, ModelFormatError, ModelNotFound
from ..fsutil import (atomic_dir, atomic_file, file_kind, fsync_dir, pid_alive, remove_path, sweep, tmp_sibling,
                      tmp_sibling_pid)
from ..paths import home
from .refs import split_name

CHUNK = 1 << 20
BLOBS_LOCK = "store:blobs"
Progress = Callable[[int], None]


def _stamp(path: Path) -> dict[str, int]:
    return _stamp_of(path.stat())


def _stamp_of(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def require_regular(path: Path, st: os.stat_result | None = None) -> None:
    """Refuse anything but a regular file: reading a FIFO or a device would block or never end."""
    st = st or os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ModelFormatError(f"{path} is {file_kind(st.st_mode)}, not a regular file",
                               "ownlm reads models from regular files only; copy it into one")


def open_regular(path: Path, what: str | Path | None = None) -> BinaryIO:
    """Open a regular file for reading; anything else is refused without blocking on it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        require_regular(Path(what or path), os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _hash_whole(path: Path, progress: Progress | None = None, what: str | Path | None = None
                ) -> tuple[str, os.stat_result]:
    """(sha256, stat) of one inode, refused if it changed while it was read (read up to its size
    at the start: a file that keeps growing is refused, not chased)."""
    h = hashlib.sha256()
    with open_regular(path, what) as f:
        before = os.fstat(f.fileno())
        left = before.st_size
        while left and (chunk := f.read(min(CHUNK, left))):
            h.update(chunk)
            left -= len(chunk)
            if progress:
                progress(len(chunk))
        after = os.fstat(f.fileno())
    if _identity(before) != _identity(after) or left:
        raise IntegrityError(f"{what or path} changed while it was being read",
                             "import it again once nothing is writing to it")
    return h.hexdigest(), before


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    return _hash_whole(path, progress)[0]


class Store:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else home()
        for sub in ("blobs", "links", "manifests", "pending", "tmp", "locks", "verified"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._local = threading.local()  # this thread's pending record (each thread is its own writer)

    # -- atomic writes ------------------------------------------------------------------------
    def _tmp_path(self, suffix: str = ".part") -> Path:
        return self.root / "tmp" / f"{os.getpid()}-{secrets.token_hex(8)}{suffix}"

    def sweep_tmp(self) -> int:
        """Remove partial files, export temp paths and pending records left by processes that no
        longer exist."""
        removed = 0
        for p in self.dead_tmp():
            self.remove_tmp(p)
            removed += 1
        return removed

    def dead_tmp(self) -> list[Path]:
        """Entries of tmp/ and pending/ whose process is gone (what `sweep_tmp` removes)."""
        return [p for p in sorted((self.root / "tmp").iterdir()) + sorted((self.root / "pending").iterdir())
                if not _owner_alive(p)]

    def remove_tmp(self, p: Path) -> None:
        """Remove one entry of `dead_tmp` (a claim: the export temp path it names too)."""
        if p.suffix == ".claim":  # an export's temp path outside the store: remove what it names
            with contextlib.suppress(OSError, ValueError):
                claimed = Path(p.read_text(encoding="utf-8").strip())
                if claimed.is_absolute() and tmp_sibling_pid(claimed) == _pid_of(p):
                    remove_path(claimed)
        remove_path(p)

    @contextlib.contextmanager
    def tmp_dir(self) -> Iterator[Path]:
        path = self._tmp_path("")
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    @contextlib.contextmanager
    def atomic_out(self, final: Path, folder: bool, replace: bool = False) -> Iterator[Path]:
        """fsutil.atomic_dir (folder) or atomic_file for a path outside the store, such as an
        export: its temp path is claimed in tmp/ first, so that if this process is killed before the
        rename, the store's next sweep (or the next export beside it) removes what it left."""
        final = Path(final).absolute()
        self.sweep_tmp()  # what killed exports left anywhere (claimed) ...
        sweep(final.parent)  # ... or here
        tmp = tmp_sibling(final)
        claim = self._tmp_path(".claim")
        claim.write_text(str(tmp), encoding="utf-8")  # before the temp path exists
        try:
            with atomic_dir(final, replace, tmp) if folder else atomic_file(final, tmp) as t:
                yield t
        finally:
            claim.unlink(missing_ok=True)

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
        """An exclusive flock on `key`, between processes and between threads alike (each holder
        opens the lock file itself). Not reentrant: a thread never takes a key it holds."""
        path = self.root / "locks" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".lock")
        with open(path, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def busy(self, key: str) -> bool:
        """Whether another holder has `key` locked now (a look, not a claim)."""
        path = self.root / "locks" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".lock")
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False

    # -- pending records: blobs stored but not yet named in a manifest ------------------------
    @contextlib.contextmanager
    def ingest(self) -> Iterator[None]:
        """Storing one model: every blob this thread stores or reuses inside the block stays safe
        from `gc` until the block ends — put the manifest's write inside it. Outside any block, a
        writer's blobs are kept until its next `write` of a manifest, or until its process ends."""
        local = self._local
        local.depth = getattr(local, "depth", 0) + 1
        try:
            self._pending()
            yield
        finally:
            local.depth -= 1
            if local.depth == 0:
                self._end_pending()

    def _pending(self) -> Path:
        """This thread's pending record, written before the first byte of its first blob."""
        local = self._local
        if getattr(local, "record", None) is None:
            local.record = self.root / "pending" / f"{os.getpid()}-{secrets.token_hex(8)}.json"
            local.digests = []
            self.write_json_atomic(local.record, {"pid": os.getpid(), "digests": []})
        return local.record

    def _protect(self, digest: str) -> None:
        """Add `digest` to this thread's pending record; the caller holds the blobs lock."""
        record = self._pending()
        if digest not in self._local.digests:
            self._local.digests.append(digest)
            self.write_json_atomic(record, {"pid": os.getpid(), "digests": self._local.digests})

    def _end_pending(self) -> None:
        record = getattr(self._local, "record", None)
        if record is not None:
            with self.lock(BLOBS_LOCK):
                record.unlink(missing_ok=True)
            self._local.record, self._local.digests = None, []

    def _pending_digests(self) -> set[str] | None:
        """Digests in live writers' records (dead writers' records are removed); None when a live
        record cannot be read, and gc must then keep everything. The caller holds the blobs lock."""
        out: set[str] = set()
        for p in (self.root / "pending").iterdir():
            if not _owner_alive(p):
                p.unlink(missing_ok=True)
                continue
            try:
                out |= set(json.loads(p.read_text(encoding="utf-8"))["digests"])
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError, TypeError):
                return None
        return out

    def reuse(self, digest: str) -> bool:
        """Claim a blob this writer will name without storing it again; True when the store has it
        (a blob already there is otherwise fair game for gc until the manifest names it)."""
        with self.lock(BLOBS_LOCK):
            self._protect(digest)
            return self.has_blob(digest)

    # -- blobs --------------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise IntegrityError(f"{digest!r} is not a sha256 digest")
        return self.root / "blobs" / f"sha256-{digest}"

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).exists() or (self.root / "links" / f"sha256-{digest}.json").exists()

    def _place(self, tmp: Path, digest: str, st: os.stat_result | None = None) -> None:
        """Make a finished temp file the blob `digest`, claimed for this writer in the same step
        (under the blobs lock), so gc can take neither it nor the copy already there."""
        final = self.blob_path(digest)
        with self.lock(BLOBS_LOCK):
            self._protect(digest)
            if final.exists():
                return
            os.replace(tmp, final)
            fsync_dir(final.parent)
        self._mark_verified(final, digest, st)

    def put_stream(self, stream: BinaryIO, expected: str | None = None, progress: Progress | None = None,
                   what: str = "download") -> str:
        """Copy a stream into a blob; the digest is checked before the blob becomes visible."""
        self._pending()
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
            self._place(tmp, digest)
            return digest
        finally:
            tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def partial(self, key: str) -> Iterator[Path]:
        """The partial file of a download named by `key` (its sha256 when known), kept in
        partial/ across processes so a later pull resumes it; locked while yielded."""
        folder = self.root / "partial"
        folder.mkdir(exist_ok=True)
        name = hashlib.sha256(key.encode()).hexdigest()[:32] + ".part"
        with self.lock(f"partial:{name}"):
            yield folder / name

    def partial_busy(self, path: Path) -> bool:
        """Whether a pull is writing this partial file now (it holds its lock)."""
        return self.busy(f"partial:{path.name}")

    def put_partial(self, path: Path, expected: str | None = None, what: str = "download") -> str:
        """Make a finished partial download a blob (renamed, not copied), its digest checked first;
        on a mismatch the partial file is deleted (its bytes are not worth resuming)."""
        self._pending()
        digest, st = _hash_whole(path)
        if expected and digest != expected:
            path.unlink(missing_ok=True)
            raise IntegrityError(f"{what}: sha256 {digest} does not match the expected {expected}",
                                 "the source changed or the download was corrupted; nothing was stored")
        self._place(path, digest, st)
        path.unlink(missing_ok=True)  # the blob was already there
        return digest

    def put_file(self, src: Path, expected: str | None = None, progress: Progress | None = None) -> str:
        with open_regular(src) as f:
            return self.put_stream(f, expected, progress, what=str(src))

    def link_file(self, src: Path, progress: Progress | None = None) -> str:
        """Keep a large file where it is: a hard link into blobs/ when the filesystem allows,
        otherwise a reference whose digest is re-checked whenever the file changes. The link is
        made first and its inode hashed, so what is stored is exactly what was hashed, whatever
        happens to the path meanwhile."""
        src = Path(src).resolve()
        self._pending()
        tmp = self._tmp_path()
        try:
            try:
                os.link(src, tmp)
            except OSError:
                return self._link_reference(src, progress)
            digest, st = _hash_whole(tmp, progress, src)
            self._place(tmp, digest, st)
            return digest
        finally:
            tmp.unlink(missing_ok=True)

    def _link_reference(self, src: Path, progress: Progress | None) -> str:
        digest, st = _hash_whole(src, progress, src)
        try:
            now = os.stat(src)
        except FileNotFoundError:
            now = None
        if now is None or _identity(now) != _identity(st):
            raise IntegrityError(f"{src} was replaced or changed while it was being imported",
                                 "import it again once nothing is writing to it")
        with self.lock(BLOBS_LOCK):
            self._protect(digest)
            if self.blob_path(digest).exists():
                return digest
            ref = {"path": str(src), "sha256": digest, **_stamp_of(st)}
            self.write_json_atomic(self.root / "links" / f"sha256-{digest}.json", ref)
        self._mark_verified(src, digest, st)
        return digest

    def _mark_verified(self, path: Path, digest: str, st: os.stat_result | None = None) -> None:
        """Record the stamp the digest was computed for (`st`, taken when hashing), never a later
        one: a file changed since must be hashed again."""
        self.write_json_atomic(self.root / "verified" / f"{digest}.json", _stamp_of(st) if st else _stamp(path))

    def drop_damaged(self, digest: str) -> bool:
        """Remove a stored blob (not a link) whose bytes no longer match its digest, so that a pull
        stores it again; True if one was removed."""
        with self.lock(BLOBS_LOCK):
            path = self.blob_path(digest)
            if not path.is_file() or _hash_whole(path)[0] == digest:
                return False
            path.unlink(missing_ok=True)
            (self.root / "verified" / f"{digest}.json").unlink(missing_ok=True)
            return True

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
        require_regular(path)
        if verify:
            mark = self.root / "verified" / f"{digest}.json"
            try:
                ok = json.loads(mark.read_text()) == _stamp(path)
            except (OSError, ValueError):
                ok = False
            if not ok:
                actual, st = _hash_whole(path)
                if actual != digest:
                    raise IntegrityError(f"{path} is corrupt: its sha256 is {actual[:12]}..., "
                                         f"expected {digest[:12]}...",
                                         "remove the model with `ownlm rm` and pull or import it again")
                self._mark_verified(path, digest, st)
        return path

    # -- manifests ----------------------------------------------------------------------------
    def manifest_path(self, name: str) -> Path:
        n, tag = split_name(name)
        return self.root / "manifests" / n / f"{tag}.json"

    def has(self, name: str) -> bool:
        return self.manifest_path(name).exists()

    def read(self, name: str) -> dict[str, Any]:
        path = self.manifest_path(name)
        n, tag = split_name(name)
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelNotFound(f"model {n}:{tag} is not in the store",
                                "see `ownlm list`, or `ownlm pull` it") from None
        except ValueError:
            manifest = None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise IntegrityError(f"manifest of {n}:{tag} is corrupt", f"`ownlm rm {n}:{tag}` and pull it again")
        return manifest

    def write(self, name: str, manifest: dict[str, Any]) -> None:
        """Write a manifest. Outside an `ingest` block this also ends the writer's pending record:
        the blobs it stored are named now."""
        self.write_json_atomic(self.manifest_path(name), manifest)
        if getattr(self._local, "depth", 0) == 0:
            self._end_pending()

    def names(self) -> list[str]:
        out = []
        for d in sorted((self.root / "manifests").iterdir()):
            if d.is_dir():
                out += [f"{d.name}:{p.stem}" for p in sorted(d.glob("*.json"))]
        return out

    def remove(self, name: str) -> dict[str, Any]:
        """Remove a model (a corrupt manifest too) and collect the blobs nothing names any more;
        returns its manifest ({} when it was unreadable) with its name and tag."""
        n, tag = split_name(name)
        path = self.manifest_path(name)
        with self.lock(f"model:{n}:{tag}"):
            try:
                manifest = self.read(name)
            except IntegrityError:
                manifest = {}  # unreadable, and removed all the same
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                path.parent.rmdir()
        self.sweep_tmp()
        self.gc()
        return {**manifest, "name": n, "tag": tag}

    def gc(self) -> int:
        """Delete blobs that no manifest and no live writer's pending record names, and repacked
        caches of models no longer here. While any manifest or live record is unreadable nothing
        is deleted: the blobs it names cannot be told apart."""
        with self.lock(BLOBS_LOCK):
            found = self.unreferenced()
            if found is None:
                return 0
            blobs, caches = found
            for p in caches:
                shutil.rmtree(p, ignore_errors=True)
            for p in blobs:
                self.remove_blob(p)
            return len(blobs)

    def unreferenced(self) -> tuple[list[Path], list[Path]] | None:
        """(blob and link files no manifest nor live writer names, repacked caches of models no
        longer here), or None while a manifest or live record is unreadable (then nothing can be
        told apart). The caller holds the blobs lock, and keeps it while it removes them."""
        used = self._pending_digests()  # before the manifests: a writer names its blobs, then drops its record
        if used is None:
            return None
        models = set()
        for n in self.names():
            try:
                manifest = self.read(n)
            except ModelNotFound:  # removed meanwhile, under its own lock
                continue
            except IntegrityError:
                return None
            used |= {f.get("sha256") for f in manifest["files"].values() if isinstance(f, dict)}
            models.add(manifest.get("digest"))
        repacked = self.root / "cache" / "repacked"
        caches = [p for p in sorted(repacked.iterdir()) if p.name.split("-")[0] not in models] \
            if repacked.is_dir() else []
        blobs = [p for p in sorted((self.root / "blobs").iterdir()) + sorted((self.root / "links").iterdir())
                 if p.name.removeprefix("sha256-").removesuffix(".json") not in used]
        return blobs, caches

    def remove_blob(self, p: Path) -> None:
        """Remove one blob (or link) file and its verification mark."""
        p.unlink(missing_ok=True)
        (self.root / "verified" / f"{p.name.removeprefix('sha256-').removesuffix('.json')}.json").unlink(
            missing_ok=True)


def _pid_of(path: Path) -> int | None:
    pid = path.name.split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def _owner_alive(path: Path) -> bool:
    """Whether the process named by a `<pid>-...` file in tmp/ or pending/ still runs."""
    pid = _pid_of(path)
    return pid is not None and pid_alive(pid)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


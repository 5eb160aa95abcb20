"""Writing folders and files so that a killed process never leaves a half-written one: write in a
sibling temp path, fsync every file, then rename into place."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Iterator

MANIFEST = "manifest.json"


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


_TMP_SIBLING = re.compile(r"\..+\.tmp-(\d+)-[0-9a-f]{8}")


def tmp_sibling(final: Path) -> Path:
    """`.NAME.tmp-PID-RANDOM` beside `final`: the pid lets a sweep tell a killed writer's leftovers."""
    return final.parent / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


def tmp_sibling_pid(path: Path) -> int | None:
    """The writer's pid when `path` is named like a tmp_sibling, else None."""
    m = _TMP_SIBLING.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


@contextlib.contextmanager
def atomic_dir(final: Path, replace: bool = False, tmp: Path | None = None) -> Iterator[Path]:
    """Yield an empty temp folder beside `final` (`tmp`, when the caller chose and recorded it);
    on success it is fsynced and renamed to `final` (an existing `final` is an error unless
    replace). On failure nothing is left behind."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not replace:
        raise FileExistsError(f"{final} already exists")
    tmp = tmp or tmp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if final.exists():
            old = tmp_sibling(final)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(final: Path, tmp: Path | None = None) -> Iterator[Path]:
    """Yield a temp path beside `final` (`tmp`, when the caller chose and recorded it); on success
    it is fsynced and renamed to `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp or tmp_sibling(final)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


def sweep(parent: Path) -> None:
    """Remove temp siblings left by processes that were killed."""
    if not parent.is_dir():
        return
    for p in parent.glob(".*.tmp-*"):
        pid = tmp_sibling_pid(p)
        if pid is not None and not pid_alive(pid):
            remove_path(p)


def remove_path(path: Path) -> None:
    """Remove a file or a folder (not following a link), whichever it is; gone already is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def file_kind(mode: int) -> str:
    """What a stat mode names, in words: "a regular file", "a FIFO (named pipe)", ..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((words for test, words in _KINDS if test(mode)), "not a file")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

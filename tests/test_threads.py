"""--threads N (run, serve, bench, eval) and load(threads=N): PyTorch's threads and the OpenMP
threads of ownlm's kernels, in the calling thread and in threads started later (a server's);
bad values are exit 2; the tokens do not depend on the count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from ownlm.cli.main import main
from ownlm.model import cpu, kernels

from .conftest import KERNELS_POSSIBLE


def cli(*args):
    return subprocess.run([sys.executable, "-m", "ownlm.cli.main", *args], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=300)


def python(code: str):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=300)


def run_json(folder, threads: int, quant: str = "none") -> dict:
    r = cli("run", str(folder), "The quick brown fox", "--json", "--temperature", "0", "--max-tokens", "12",
            "--quant", quant, "--threads", str(threads))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_run_reports_the_threads_it_used(hf_models):
    assert run_json(hf_models["llama"], 1)["threads"] == 1


@pytest.mark.parametrize("quant", ["none", "int4"])
def test_greedy_tokens_do_not_depend_on_the_thread_count(hf_models, quant):
    one, two = run_json(hf_models["llama"], 1, quant), run_json(hf_models["llama"], 2, quant)
    assert (one["threads"], two["threads"]) == (1, 2)
    assert one["token_ids"] == two["token_ids"] and one["text"] == two["text"]
    assert len(one["token_ids"]) > 1


@pytest.mark.parametrize("value", ["0", "-3"])
def test_a_non_positive_count_is_exit_2(hf_models, capsys, value):
    assert main(["run", str(hf_models["llama"]), "hi", "--threads", value]) == 2
    err = capsys.readouterr().err
    assert "--threads must be a positive integer" in err and value in err


@pytest.mark.parametrize("verb", [["run", "m", "hi"], ["serve", "m"], ["bench", "m"], ["eval", "m", "--task", "prose"]])
def test_a_non_integer_count_is_exit_2_on_every_verb(capsys, verb):
    with pytest.raises(SystemExit) as e:
        main([*verb, "--threads", "many"])
    assert e.value.code == 2
    assert "--threads" in capsys.readouterr().err


def test_the_python_api_refuses_a_bad_count():
    from ownlm.errors import BadRequest

    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(BadRequest, match="threads must be a positive integer"):
            kernels.set_threads(bad)


@pytest.mark.skipif(not KERNELS_POSSIBLE, reason="ownlm's kernels need x86-64 Linux with AVX2 and a C compiler")
def test_load_threads_sets_torch_and_the_kernels_in_every_thread(hf_models):
    # more threads than cores: distinct from the default (all cores) wherever this runs, and warned once
    n = cpu.cores() + 1
    r = python(f"""
        import threading, warnings
        import torch, ownlm
        from ownlm.model import kernels
        warnings.simplefilter("default")
        before = kernels.kernel_threads()
        lm = ownlm.load({str(hf_models["llama"])!r}, quant="int4", threads={n})
        lm = ownlm.load({str(hf_models["llama"])!r}, quant="int4", threads={n})  # a second time: no second warning
        seen = {{}}
        def later():  # a thread started afterwards, as a server's scheduler is
            seen["kernels"] = kernels.kernel_threads()
            lm.generate("hi", max_tokens=3, temperature=0)
            seen["torch"] = torch.get_num_threads()
        t = threading.Thread(target=later)
        t.start()
        t.join()
        print(before, torch.get_num_threads(), kernels.kernel_threads(), seen["kernels"], seen["torch"])
    """)
    assert r.returncode == 0, r.stderr
    before, *after = map(int, r.stdout.split())
    assert before == cpu.cores()
    assert after == [n] * 4
    assert r.stderr.count(f"{n} threads on {cpu.cores()} cores") == 1


def test_more_threads_than_cores_warns_once_on_stderr(hf_models):
    n = cpu.cores() + 2
    r = cli("run", str(hf_models["llama"]), "hi", "--json", "--max-tokens", "2", "--threads", str(n))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["threads"] == n
    assert r.stderr.count("warning:") == 1 and f"{n} threads on" in r.stderr

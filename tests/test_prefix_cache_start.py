"""The prefix cache from the user's side: the chat prints its bound at start (on stderr, never in
`run --json`), and `ownlm serve --prompt-cache DIR` hands a later server the prompts of an earlier one."""

from __future__ import annotations

import io
import json
import sys
from argparse import Namespace

import openai

import ownlm
from ownlm.cli import chat
from ownlm.cli.main import main
from ownlm.engine import prefix_cache
from ownlm.server import ModelPool, Server
from test_speculate import one_thread  # noqa: F401 - tiny models decode much faster on one thread

SYSTEM = "Owning your model means nobody can change its price, its rules, or take it away. " * 2


class Typed(io.StringIO):
    """Lines as if typed at a terminal (the chat starts only there)."""

    def isatty(self) -> bool:
        return True


def test_the_chat_prints_the_prefix_cache_bound_at_start(hf_models, monkeypatch, capsys):
    """By default 1/8 of the memory available (MemAvailable, read here), at most 2048 MiB."""
    monkeypatch.setattr(sys, "stdin", Typed("/bye\n"))
    assert main(["run", str(hf_models["llama"])]) == 0
    out = capsys.readouterr()
    line = next(x for x in out.err.splitlines() if x.startswith("prefix cache:"))
    with open("/proc/meminfo") as f:
        available = next(int(x.split()[1]) * 1024 for x in f if x.startswith("MemAvailable:"))
    want = min(available / 8, 2 << 30) / (1 << 20)
    got = float(line.removeprefix("prefix cache: ").removesuffix(" MiB"))
    assert abs(got - want) <= max(2.0, want * 0.1), (line, want)  # the memory free moves a little meanwhile
    assert "prefix cache" not in out.out
    for budget, says in ((6 << 20, "prefix cache: 6 MiB"), (0, "prefix cache: off (--cache-mb 0)")):
        lm = ownlm.load(str(hf_models["llama"]))
        prefix_cache.attach(lm.model, prefix_cache.PrefixCache(budget))  # this model's own: no global setting
        monkeypatch.setattr(sys, "stdin", Typed("/bye\n"))
        assert chat.repl(lm, Namespace(system=None), {}) == 0
        assert says in capsys.readouterr().err.splitlines()


def test_run_json_and_one_shot_print_no_cache_line(hf_models, capsys):
    assert main(["run", str(hf_models["llama"]), "hi", "--json", "--max-tokens", "3", "--temperature", "0"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["usage"]["completion_tokens"] >= 1 and "prefix cache" not in out.err


def test_serve_prompt_cache_carries_prompts_to_a_later_server(hf_models, tmp_path):
    """Two servers, one after the other, each loading the model anew, on one --prompt-cache folder:
    the second starts with the first's blocks. A prompt it saw is read back whole blocks up to its
    last 2 tokens; one sharing only the system prompt, its whole blocks; the answers are those of
    the model without any cache."""
    folder = str(hf_models["llama"])
    disk = (str(tmp_path / "pc"), 64 << 20)
    seen = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "The quick brown fox"}]
    shared = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "def add(a, b):"}]
    plain = ownlm.load(folder)
    prefix_cache.attach(plain.model, prefix_cache.PrefixCache(0))  # the reference: no cache at all
    want = {i: plain.chat(m, temperature=0, max_tokens=8).text for i, m in enumerate((seen, shared))}
    system_tokens = len(plain.encode(plain.chat_prompt(seen[:1])))

    def ask(messages: list[dict]) -> tuple[str, int, int]:
        pool = ModelPool(["tiny"], loader=lambda ref, **_: ownlm.load(folder), prompt_cache=disk)
        with Server(pool, port=0) as s:
            client = openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0, timeout=120)
            r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=8)
        return r.choices[0].message.content, r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens

    bs = prefix_cache.BLOCK
    text, n, cached = ask(seen)
    assert (text, cached) == (want[0], 0) and n > 2 * bs
    assert prefix_cache.flush(timeout=60)  # as a process exiting does (the next server's folder does it too)
    assert list((tmp_path / "pc").glob("*/*.kv"))  # written through to the folder
    text, n2, cached = ask(seen)  # a new server, the same prompt
    assert (text, n2) == (want[0], n) and cached == (n - prefix_cache.MIN_PREFILL) // bs * bs
    text, _, cached = ask(shared)  # a new server, the same system prompt
    assert text == want[1] and cached >= system_tokens // bs * bs > 0

"""The prefix cache (engine/prefix_cache.py) on tiny random models: with it, tokens equal those
without it and logprobs agree within float rounding, for prefixes ending on a block boundary and
inside a block, across requests, after evictions, in the batch scheduler, for Mistral's sliding
window and Gemma 3's local layers; its bytes stay within the budget, pinned blocks stay (and stay
counted when the cache is emptied), a chat's second turn prefills only what is new, /v1 usage
reports the cached tokens, and the on-disk folder is written by a background thread."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import anthropic
import httpx
import openai
import pytest
import torch

import ownlm
from conftest import KERNELS_POSSIBLE, build_hf_model
from ownlm.engine import prefix_cache
from ownlm.engine.generate import StepStats, generate_ids
from ownlm.engine.kv_cache import KVCache
from ownlm.engine.prefix_cache import BLOCK, MIN_PREFILL, PrefixCache
from ownlm.engine.sampling import SamplingParams
from ownlm.engine.scheduler import Request, Scheduler
from ownlm.server import ModelPool, Server

GEMMA3 = dict(head_dim=16, sliding_window=6, num_hidden_layers=3, query_pre_attn_scalar=24,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
              hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
# logprobs with and without the cache: bit for bit where ownlm's kernels run (bfloat16 weights: its
# matmul, norms and attention give a row the same bits in any batch, and every prompt row attends as
# a one-token step, whatever the chunk it is computed in), else (float32) within rounding
TOL = 0 if KERNELS_POSSIBLE else 1e-4


def load(folder) -> ownlm.LoadedModel:
    return ownlm.load(str(folder), dtype="bfloat16" if KERNELS_POSSIBLE else "float32")


@pytest.fixture(scope="module")
def llama(hf_models):
    return load(hf_models["llama"])


def block_size(lm) -> int:
    """Bytes of one block: keys and values of every layer, in the KV cache's dtype."""
    size = KVCache.for_model(lm.model, 1, 1).k[0].element_size()
    return 2 * lm.config.n_layers * lm.config.n_kv_heads * lm.config.head_dim * size * BLOCK


def ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 290, (n,), generator=g).tolist()  # no special tokens


def fresh(lm, budget: int = 64 << 20) -> PrefixCache | None:
    """A new, empty cache for the model (budget 0: caching off)."""
    pc = PrefixCache(budget)
    prefix_cache.attach(lm.model, pc)
    return pc if budget else None


def alone(lm, prompt, n=12, **kw) -> tuple[list[int], int]:
    """(greedy tokens, prompt tokens from the cache) of the single-sequence path."""
    stats = StepStats()
    out = list(generate_ids(lm.model, prompt, SamplingParams(temperature=0, max_tokens=n, **kw), (), stats))
    return out, stats.cached


def batch(lm, prompts, n=10, chunk=256, max_running=8, seeds=None) -> list[tuple[list[int], list, int]]:
    """(tokens, logprobs with top-3, cached) per prompt, all submitted together to one scheduler."""
    results = [([], [], None) for _ in prompts]
    done = []
    sched = Scheduler(lm.model, max_running=max_running, prefill_chunk=chunk)

    def sink(i):
        def emit(ev):
            if ev.kind == "token":
                results[i][0].append(ev.token)
                results[i][1].append(ev.logprob)
            elif ev.kind in ("done", "error"):
                assert ev.kind == "done", ev.error
                done.append(i)
        return emit

    reqs = []
    try:
        for i, p in enumerate(prompts):
            temp = 0.9 if seeds else 0
            params = SamplingParams(temperature=temp, seed=seeds[i] if seeds else None, max_tokens=n)
            reqs.append(sched.submit(Request(prompt=p, params=params, limit=n, emit=sink(i), logprobs=3)))
        t0 = time.monotonic()
        while len(done) < len(prompts) and time.monotonic() - t0 < 60:
            time.sleep(0.01)
    finally:
        sched.close()
    assert len(done) == len(prompts)
    return [(toks, lps, r.cached) for (toks, lps, _), r in zip(results, reqs)]


def same(with_cache, without) -> None:
    """Equal tokens; logprobs (and their top alternatives) within float rounding."""
    for (ta, la, _), (tb, lb, _) in zip(with_cache, without):
        assert ta == tb
        for a, b in zip(la, lb):
            assert a.logprob == pytest.approx(b.logprob, abs=TOL)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
            assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=TOL)


@pytest.mark.parametrize("shared", [2 * BLOCK, 2 * BLOCK + 7])
def test_shared_prefix_at_and_inside_a_block(llama, shared):
    """A prefix ending on a block boundary is reused whole; one ending inside a block up to the
    block before (only whole blocks are kept)."""
    head = ids(shared, 1)
    a, b = head + ids(20, 2), head + ids(25, 3)
    fresh(llama, 0)
    want = [alone(llama, p) for p in (a, b)]
    assert [c for _, c in want] == [0, 0]
    fresh(llama)
    got = [alone(llama, p) for p in (a, b)]
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [c for _, c in got] == [0, shared // BLOCK * BLOCK]
    # the same prompt again: everything but the last MIN_PREFILL tokens, in whole blocks
    again, cached = alone(llama, b)
    assert again == want[1][0] and cached == (len(b) - MIN_PREFILL) // BLOCK * BLOCK
    # the answer was cached too: a prompt that goes on from it reuses the blocks it covers
    longer = b + again + ids(5, 4)
    assert alone(llama, longer)[1] == (len(b) + len(again) - 1) // BLOCK * BLOCK
    # and the batch path, with logprobs: the same as without
    fresh(llama, 0)
    off = batch(llama, [a, b])
    fresh(llama)
    on = batch(llama, [a]) + batch(llama, [b])
    same(on, off)
    assert on[1][2] == shared // BLOCK * BLOCK


def test_eviction_keeps_the_bound_and_the_results(llama):
    block_bytes = block_size(llama)
    pc = fresh(llama, 5 * block_bytes)
    prompts = [ids(16 * (2 + i % 3) + 5, 10 + i) for i in range(5)]
    prompts += prompts[-2:]  # the last two again: found, or evicted by now and computed
    got = []
    for p in prompts:
        got.append(alone(llama, p, n=4))
        assert pc.held <= pc.budget
    stats = pc.stats()
    assert stats["evictions"] > 0 and stats["blocks"] <= 5 and stats["bytes"] == pc.held
    assert got[-1][1] > 0  # the last one was still held
    fresh(llama, 0)
    assert [t for t, _ in got] == [alone(llama, p, n=4)[0] for p in prompts]
    # the batch path under the same pressure: its logprobs too equal those without the cache
    off = [batch(llama, [p], n=4)[0] for p in prompts]
    pc = fresh(llama, 5 * block_bytes)
    on = [batch(llama, [p], n=4)[0] for p in prompts]
    assert pc.stats()["evictions"] > 0 and pc.held <= pc.budget and on[-1][2] > 0
    same(on, off)


def pinned(llama, blocks: int, seed: int):
    """A fresh cache of `blocks` blocks' budget holding a prompt's two full blocks, and a hit that
    pins them: (cache, prompt, KV cache, hit, copies of the blocks' keys and values, block bytes)."""
    block_bytes = block_size(llama)
    pc = fresh(llama, blocks * block_bytes)
    p = ids(2 * BLOCK + 3, seed)
    alone(llama, p, n=1)
    cache = KVCache.for_model(llama.model, 1, 64)
    hit = pc.lookup(llama.model, p, cache)
    assert hit.length == 2 * BLOCK
    return pc, p, cache, hit, [b.kv.clone() for b in hit.blocks], block_bytes


def test_pinned_blocks_are_never_evicted(llama):
    pc, _, _, hit, kept, _ = pinned(llama, 3, 20)
    for i in range(6):  # far more than the budget holds
        alone(llama, ids(3 * BLOCK + 2, 30 + i), n=1)
        assert pc.held <= pc.budget
        assert all(b.key in pc.lru for b in hit.blocks)
    assert all(torch.equal(b.kv, k) for b, k in zip(hit.blocks, kept))
    # while pinned, only one block of room is left: stores go as far as it allows
    assert pc.stats()["blocks"] == 3
    hit.release()
    alone(llama, ids(3 * BLOCK + 2, 40), n=1)
    assert not any(b.key in pc.lru for b in hit.blocks)  # free now, and evicted
    assert pc.held <= pc.budget


def test_clear_keeps_counting_the_blocks_a_hit_pins(llama):
    """Emptying the cache (a model changed) while a sequence holds a hit: its blocks leave the tree
    but stay alive, so they stay counted in the bytes held until released; stores never take the
    budget past them."""
    pc, p, cache, hit, kept, block_bytes = pinned(llama, 4, 21)
    pc.clear()
    assert pc.held == 2 * block_bytes and pc.stats()["bytes"] == 2 * block_bytes and pc.stats()["blocks"] == 2
    assert pc.lookup(llama.model, p, cache).length == 0  # out of the tree: no later lookup finds them
    for i in range(4):  # three blocks each; only two more fit beside the pinned ones
        alone(llama, ids(3 * BLOCK + 2, 70 + i), n=1)
        assert pc.held <= pc.budget
    assert pc.stats()["blocks"] == 4 and pc.held == 4 * block_bytes
    assert all(torch.equal(b.kv, k) for b, k in zip(hit.blocks, kept))  # the hit still loads its blocks
    hit.release()
    assert pc.held == sum(b.nbytes for b in pc.lru.values()) == 2 * block_bytes  # freed only now
    assert all(b.kv is None for b in hit.blocks)
    for i in range(4):
        alone(llama, ids(3 * BLOCK + 2, 80 + i), n=1)
        assert pc.held == sum(b.nbytes for b in pc.lru.values()) <= pc.budget
    assert pc.stats()["blocks"] == 4
    hit.release()  # a second release changes nothing
    assert pc.held == 4 * block_bytes
    pc.clear()
    assert pc.held == 0 and pc.stats()["blocks"] == 0


def test_scheduler_shares_a_prefix_between_concurrent_sequences(llama):
    system = ids(3 * BLOCK, 50)
    prompts = [system + ids(4 + 3 * i, 60 + i) for i in range(5)]
    fresh(llama, 0)
    off = batch(llama, prompts, chunk=7, max_running=3, seeds=[1, 2, 3, 4, 5])
    pc = fresh(llama)
    on = batch(llama, prompts, chunk=7, max_running=3, seeds=[1, 2, 3, 4, 5])
    same(on, off)
    cached = [c for _, _, c in on]
    assert cached[0] == 0 and all(c >= len(system) for c in cached[1:])  # admitted one after another
    assert pc.stats()["hits"] == 4 and pc.held <= pc.budget


@pytest.mark.parametrize("family", ["mistral", "gemma3_text"])
def test_sliding_windows_stay_exact(hf_models, tmp_path_factory, family):
    """Mistral: window 8 on every layer; Gemma 3: window 6 on its local layers. Reused prefixes
    are far longer than the windows."""
    folder = hf_models["mistral"] if family == "mistral" else build_hf_model(
        tmp_path_factory.mktemp("g3") / "g3", "gemma3_text", seed=5, **GEMMA3)
    lm = load(folder)
    assert lm.config.sliding_window and lm.config.sliding_window < 2 * BLOCK
    head = ids(2 * BLOCK + 5, 70)
    prompts = [head + ids(9, 71), head + ids(12, 72)]
    fresh(lm, 0)
    off_alone = [alone(lm, p)[0] for p in prompts]
    off = batch(lm, prompts)
    fresh(lm)
    on_alone = [alone(lm, p) for p in prompts]
    assert [t for t, _ in on_alone] == off_alone and on_alone[1][1] == 2 * BLOCK
    on = batch(lm, prompts)  # both found whole in the cache now
    same(on, off)
    assert [c for _, _, c in on] == [(len(p) - MIN_PREFILL) // BLOCK * BLOCK for p in prompts]


@pytest.mark.skipif(not KERNELS_POSSIBLE, reason="ownlm's kernels need x86-64 Linux with AVX2 and a C compiler")
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3_text"])
def test_prompt_rows_are_decode_steps(hf_models, tmp_path_factory, family):
    """On a CPU with ownlm's kernels a prompt's rows attend as one-token steps: computed whole, in
    chunks of any size, or token by token (decode steps), a prompt leaves the same bits in the
    cache and gives the same logits. So blocks written by decoding (an answer, cached for the next
    turn) are those a prefill of the same tokens writes."""
    from ownlm.engine.kv_cache import span

    folder = hf_models[family] if family != "gemma3_text" else build_hf_model(
        tmp_path_factory.mktemp("g3") / "g3", "gemma3_text", seed=5, **GEMMA3)
    lm = load(folder)
    p = ids(3 * BLOCK + 5, 80)
    n = len(p)

    def run(cuts: list[int]) -> tuple[torch.Tensor, KVCache]:
        cache = KVCache.for_model(lm.model, 1, 64)
        tokens = torch.tensor([p])
        rows = []
        with torch.inference_mode():
            for a, b in zip([0, *cuts], [*cuts, n]):
                cache.base, cache.length = 0, span(b)
                rows.append(lm.model(tokens[:, a:b], torch.arange(a, b)[None], cache).float())
        return torch.cat(rows, dim=1), cache

    whole, cache = run([])
    for cuts in ([BLOCK], [7, 30, 31], list(range(1, n))):  # the last: one token at a time
        got, other = run(cuts)
        assert torch.equal(got, whole), cuts
        assert all(torch.equal(a[:, :, :n], b[:, :, :n]) for a, b in zip(other.k + other.v, cache.k + cache.v))


def test_a_second_chat_turn_prefills_only_what_is_new(llama):
    fresh(llama)
    msgs = [{"role": "system", "content": "You are terse. " * 4}, {"role": "user", "content": "Name three colors."}]
    first = llama.chat(msgs, temperature=0, max_tokens=12)
    turn1 = llama.encode(llama.chat_prompt(msgs))
    msgs += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And three fruits?"}]
    turn2 = llama.encode(llama.chat_prompt(msgs))
    assert turn2[:len(turn1)] == turn1  # the template renders turn 1 as the start of turn 2
    second = llama.chat(msgs, temperature=0, max_tokens=8)
    # what turn 1 left in the cache: its prompt and the answer tokens fed back (a stop token is not)
    written = turn1 + first.token_ids[:len(first.token_ids) - (first.finish_reason == "length")]
    common = next((i for i, (x, y) in enumerate(zip(written, turn2)) if x != y), min(len(written), len(turn2)))
    expect = min(common, len(turn2) - MIN_PREFILL) // BLOCK * BLOCK
    assert second.timings["cached_tokens"] == expect >= len(turn1) // BLOCK * BLOCK
    prefilled = len(turn2) - second.timings["cached_tokens"]
    assert prefilled < len(turn2) - len(turn1) + BLOCK  # only the new tokens, and at most a block more
    fresh(llama, 0)
    assert llama.chat(msgs, temperature=0, max_tokens=8).token_ids == second.token_ids


def test_a_changed_model_empties_its_cache(llama):
    pc = fresh(llama)
    p = ids(3 * BLOCK, 80)
    alone(llama, p, n=2)
    assert pc.stats()["blocks"] >= 2
    assert alone(llama, p, n=2)[1] > 0
    llama.model.structure_version += 1  # as attaching an adapter or loading weights does
    try:
        assert alone(llama, p, n=2)[1] == 0
    finally:
        llama.model.structure_version -= 1
    assert alone(llama, p, n=2)[1] == 0  # (the cache was emptied again: the structure changed back)
    assert alone(llama, p, n=2)[1] > 0
    with torch.no_grad():  # weights changed in place, as an optimizer step does (GRPO generates between them)
        llama.model.norm.weight.mul_(1.0)
    assert alone(llama, p, n=2)[1] == 0
    prefix_cache.attach(llama.model, None)


def test_cached_tokens_in_v1_usage_and_metrics(llama):
    fresh(llama)
    pool = ModelPool(["tiny"], loader=lambda ref, **_: llama, max_loaded=1)
    pool.preload()
    msgs = [{"role": "system", "content": "You answer in one word. " * 3}, {"role": "user", "content": "Sky?"}]
    with Server(pool, port=0) as s:
        client = openai.OpenAI(base_url=s.base_url, api_key="x", max_retries=0, timeout=60)
        first = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=4)
        again = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=4)
        n = first.usage.prompt_tokens
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        assert again.usage.prompt_tokens_details.cached_tokens == (n - MIN_PREFILL) // BLOCK * BLOCK > 0
        assert again.choices[0].message.content == first.choices[0].message.content
        chunks = list(client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=4,
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens == (n - MIN_PREFILL) // BLOCK * BLOCK
        text = "The quick brown fox jumps over the lazy dog. " * 2
        client.completions.create(model="tiny", prompt=text, max_tokens=3, temperature=0)
        c = client.completions.create(model="tiny", prompt=text, max_tokens=3, temperature=0)
        assert c.usage.prompt_tokens_details.cached_tokens == (c.usage.prompt_tokens - MIN_PREFILL) // BLOCK * BLOCK
        # the Responses API and Anthropic's Messages API report it in their own fields
        args = dict(model="tiny", input=msgs, temperature=0, max_output_tokens=4)
        r1, r2 = client.responses.create(**args), client.responses.create(**args)
        assert r2.usage.input_tokens_details.cached_tokens == (r1.usage.input_tokens - MIN_PREFILL) // BLOCK * BLOCK
        claude = anthropic.Anthropic(base_url=s.url, api_key="x", max_retries=0, timeout=60)
        args = dict(model="tiny", system=msgs[0]["content"], messages=msgs[1:], max_tokens=3,
                    extra_body={"temperature": 0})
        m1, m2 = claude.messages.create(**args), claude.messages.create(**args)
        whole = m1.usage.input_tokens + m1.usage.cache_read_input_tokens
        assert m2.usage.cache_read_input_tokens == (whole - MIN_PREFILL) // BLOCK * BLOCK > 0
        assert m2.usage.input_tokens == whole - m2.usage.cache_read_input_tokens
        with claude.messages.stream(**args) as stream:  # the stream's last usage has it too
            final = stream.get_final_message()
        assert final.usage.cache_read_input_tokens == m2.usage.cache_read_input_tokens
        metrics = httpx.get(f"{s.url}/metrics", timeout=10).text
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line.startswith("ownlm_prefix_cache")}
    assert values["ownlm_prefix_cache_hits_total"] >= 6 and values["ownlm_prefix_cache_misses_total"] >= 1
    assert values["ownlm_prefix_cache_cached_tokens_total"] > 0
    assert 0 < values["ownlm_prefix_cache_bytes"] <= values["ownlm_prefix_cache_budget_bytes"]
    assert "ownlm_prefix_cache_evictions_total" in values


def test_prompt_cache_folder_outlives_the_process(llama, tmp_path):
    """`--prompt-cache DIR`: blocks are written to files and found by a later cache (a later
    process); the folder stays within its bound; damaged and foreign files are refused."""
    folder = tmp_path / "kv"
    block_file = block_size(llama)
    prefix_cache.persist(llama.model, folder, "tiny", 40 * block_file)
    p = ids(4 * BLOCK + 3, 90)
    first, cached = alone(llama, p, n=5)
    assert cached == 0
    assert prefix_cache.flush(timeout=60)  # written by the writer thread
    files = sorted(folder.glob("*/*.kv"))
    assert len(files) == (len(p) + 4) // BLOCK  # prompt and answer, whole blocks
    chain, node = [], prefix_cache.of(llama.model).root  # the prompt's blocks, first to last
    for i in range(0, len(p) - BLOCK + 1, BLOCK):
        node = next(b for b in node.children.values() if b.tokens == tuple(p[i:i + BLOCK]))
        chain.append(files[0].parent / f"{node.key.hex()}.kv")
    pc = prefix_cache.persist(llama.model, folder, "tiny", 40 * block_file)  # a new process: memory empty
    assert pc.stats()["blocks"] == 0
    again, cached = alone(llama, p, n=5)
    assert again == first and cached == (len(p) - MIN_PREFILL) // BLOCK * BLOCK
    # a damaged file is refused (and removed), a miss from there on
    pc = prefix_cache.persist(llama.model, folder, "tiny", 40 * block_file)
    data = bytearray(chain[2].read_bytes())
    data[len(data) // 2] ^= 0xFF
    chain[2].write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="damaged"):
        assert alone(llama, p, n=5) == (first, 2 * BLOCK)
    # another model's file under this model's name: refused too
    other = prefix_cache.Disk(tmp_path / "other", "another model", 1 << 30)
    some = next(b for b in pc.root.children.values() if b.tokens == tuple(p[:BLOCK]))
    other.write(some.key, some.parent.key, some.tokens, some.kv)
    (other.dir / f"{some.key.hex()}.kv").replace(chain[0])
    prefix_cache.persist(llama.model, folder, "tiny", 40 * block_file)
    with pytest.warns(UserWarning, match="another model"):
        assert alone(llama, p, n=5) == (first, 0)
    # a folder made for another model is refused with a message
    (files[0].parent / "model.json").write_text('{"identity": "someone else"}')
    with pytest.raises(ownlm.errors.BadRequest, match="another model"):
        prefix_cache.persist(llama.model, folder, "tiny", 40 * block_file)
    # the bound: a folder of 3 blocks never holds more
    small = tmp_path / "small"
    prefix_cache.persist(llama.model, small, "tiny", 3 * block_file + 3 * 4096)
    for i in range(3):
        alone(llama, ids(3 * BLOCK + 2, 95 + i), n=2)
        assert sum(f.stat().st_size for f in small.glob("*/*.kv")) <= 3 * block_file + 3 * 4096
    assert prefix_cache.flush(timeout=60)
    # reopened with a smaller bound: trimmed at once, the most recently used block kept
    newest = max(small.glob("*/*.kv"), key=lambda f: f.stat().st_mtime)
    prefix_cache.persist(llama.model, small, "tiny", block_file + 4096)
    assert list(small.glob("*/*.kv")) == [newest]
    prefix_cache.attach(llama.model, None)


def test_processes_sharing_a_folder_find_each_others_blocks(llama, tmp_path):
    """Two servers on one --prompt-cache folder: blocks one writes after the other opened the
    folder are found by the other (counted in its bound from then on)."""
    folder = tmp_path / "kv"
    first = prefix_cache.persist(llama.model, folder, "tiny", 1 << 30)
    # the second process's cache, opened before the first writes anything
    second = PrefixCache(64 << 20, disk=prefix_cache.Disk(folder, first.disk.identity, 1 << 30))
    small = prefix_cache.Disk(folder, first.disk.identity, block_size(llama) // 2)
    p = ids(3 * BLOCK + 5, 77)
    answer, cached = alone(llama, p, n=4)
    assert cached == 0
    assert prefix_cache.flush(timeout=60)
    written = {f.name: f.stat().st_size for f in first.disk.dir.glob("*.kv")}
    assert len(written) == (len(p) + 3) // BLOCK and second.disk.held == 0
    prefix_cache.attach(llama.model, second)  # the second process answers the same prompt
    assert alone(llama, p, n=4) == (answer, (len(p) - MIN_PREFILL) // BLOCK * BLOCK)
    assert second.disk.held == sum(size for name, size in written.items() if name in second.disk.sizes) > 0
    assert prefix_cache.flush(timeout=60)
    assert sorted(f.name for f in first.disk.dir.glob("*.kv")) == sorted(written)  # the same blocks, no new file
    # a process whose bound is below a file another one wrote leaves that file alone
    assert small.held == 0 and not any(small._known(name) for name in written)
    assert sorted(f.name for f in first.disk.dir.glob("*.kv")) == sorted(written)
    prefix_cache.attach(llama.model, None)


def test_a_crafted_cache_file_is_refused_and_pins_nothing(llama, tmp_path):
    """A block file whose checksum is right but whose header is of the wrong kind (tokens a
    number, an empty body): refused with a warning, a miss from there on (the request's own blocks
    written in its place); no block of the lookup that met it stays pinned."""
    import hashlib
    import json

    folder = tmp_path / "kv"
    block_file = block_size(llama)
    prefix_cache.persist(llama.model, folder, "tiny", 40 * block_file)
    p = ids(3 * BLOCK + 3, 70)
    first, _ = alone(llama, p, n=4)
    assert prefix_cache.flush(timeout=60)
    pc = prefix_cache.persist(llama.model, folder, "tiny", 40 * block_file)  # a new process: memory empty
    node = pc.root  # the files of the prompt's first two blocks, by their keys
    keys = []
    for i in range(2):
        part = tuple(p[i * BLOCK:(i + 1) * BLOCK])
        keys.append(prefix_cache._digest(node.key if i == 0 else bytes.fromhex(keys[-1]), part).hex())
    second = next(folder.glob(f"*/{keys[1]}.kv"))
    for bad in ({"tokens": 5}, {"shape": [0]}):
        data = second.read_bytes()
        body = data[:-16]
        n = int.from_bytes(body[len(prefix_cache.MAGIC):len(prefix_cache.MAGIC) + 4], "little")
        start = len(prefix_cache.MAGIC) + 4
        head = {**json.loads(body[start:start + n]), **bad}
        new = json.dumps(head).encode()
        raw = b"" if "shape" in bad else body[start + n:]
        body = prefix_cache.MAGIC + len(new).to_bytes(4, "little") + new + raw
        second.write_bytes(body + hashlib.blake2b(body, digest_size=16).digest())
        pc = prefix_cache.persist(llama.model, folder, "tiny", 40 * block_file)
        with pytest.warns(UserWarning, match="refused"):
            assert alone(llama, p, n=4) == (first, BLOCK)  # the first block from its file, then a miss
        assert all(b.refs == 0 for b in pc.lru.values())
        assert prefix_cache.flush(timeout=60) and second.read_bytes() == data  # written again, whole
    prefix_cache.attach(llama.model, None)


def test_prompt_cache_files_are_written_off_the_engine_thread(llama, tmp_path, monkeypatch):
    """A slow disk stalls no request: a store only queues its blocks' files; one writer thread
    writes them, not holding the cache's lock; flush waits for them; a full queue drops a block
    rather than wait."""
    pc = prefix_cache.persist(llama.model, tmp_path / "kv", "tiny", 1 << 30)
    disk, write = pc.disk, pc.disk.write
    go, writers = threading.Event(), []

    def slow(*args):
        writers.append(threading.current_thread())
        go.wait(10)
        write(*args)

    monkeypatch.setattr(disk, "write", slow)
    p = ids(3 * BLOCK + 2, 100)
    first, _ = alone(llama, p, n=3)  # returns while the first file waits for `go`
    t0 = time.monotonic()
    while not writers and time.monotonic() - t0 < 10:
        time.sleep(0.01)
    assert writers and threading.current_thread() not in writers and not go.is_set()
    assert not list(disk.dir.glob("*.kv"))
    hit = pc.lookup(llama.model, p, KVCache.for_model(llama.model, 1, 64))  # the lock is free meanwhile
    assert hit.length == 3 * BLOCK
    hit.release()
    go.set()
    assert prefix_cache.flush(timeout=60)
    assert len(list(disk.dir.glob("*.kv"))) == pc.stats()["blocks"] == 3
    for b in pc.lru.values():  # read back as stored
        assert torch.equal(disk.read(b.key, b.parent.key, b.tokens, "cpu"), b.kv)
    # a queue of one block's bytes, its writer stalled: of three new blocks one is written, two dropped
    go.clear()
    monkeypatch.setattr(prefix_cache._writer, "limit", block_size(llama))
    alone(llama, ids(3 * BLOCK + 2, 101), n=1)
    assert not go.is_set() and pc.stats()["blocks"] == 6
    go.set()
    assert prefix_cache.flush(timeout=60)
    assert len(list(disk.dir.glob("*.kv"))) == 4
    prefix_cache.attach(llama.model, None)


def test_a_clean_exit_writes_the_queued_files(tmp_path):
    """A process that exits normally waits for its queued files (atexit), however slow the disk."""
    kv = torch.arange(2 * 3 * BLOCK * 4, dtype=torch.float32).view(2, 3, BLOCK, 4)
    code = f"""if True:
        import sys, time, torch
        from ownlm.engine import prefix_cache
        disk = prefix_cache.Disk(sys.argv[1], "exit test", 1 << 20)
        write = disk.write
        def slow(*args):
            time.sleep(1)
            write(*args)
        disk.write = slow
        kv = torch.arange({kv.numel()}, dtype=torch.float32).view({tuple(kv.shape)})
        assert disk.save(bytes(16), bytes(range(16)), tuple(range({BLOCK})), kv)
        """
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=120)
    disk = prefix_cache.Disk(tmp_path, "exit test", 1 << 20)
    assert torch.equal(disk.read(bytes(16), bytes(range(16)), tuple(range(BLOCK)), "cpu"), kv)


def test_run_json_reports_cached_tokens_across_runs(hf_models, tmp_path, capsys):
    import json

    from ownlm.cli.main import main

    args = ["run", str(hf_models["llama"]), "Name three colors, " * 6, "--json", "--temperature", "0",
            "--max-tokens", "4", "--dtype", "float32", "--prompt-cache", str(tmp_path / "pc")]
    outs = []
    for _ in range(2):
        assert main(args) == 0
        outs.append(json.loads(capsys.readouterr().out))
    n = outs[0]["usage"]["prompt_tokens"]
    assert outs[0]["timings"]["cached_tokens"] == 0
    assert outs[1]["timings"]["cached_tokens"] == (n - MIN_PREFILL) // BLOCK * BLOCK > 0
    assert outs[1]["token_ids"] == outs[0]["token_ids"]
    assert main(args[:-2] + ["--cache-mb", "0", "--prompt-cache", str(tmp_path / "pc")]) == 2
    prefix_cache.configure(None)


def test_blocks_waiting_for_their_files_stay_within_the_caches_budget(llama, tmp_path, monkeypatch):
    """The writer's queue holds blocks the cache may have evicted already: for a cache of two
    blocks' budget it queues at most two blocks' bytes while its disk is stalled (the other
    blocks' files are not written: it is only a cache), not up to WRITE_QUEUE."""
    pc = prefix_cache.persist(llama.model, tmp_path / "kv", "tiny", 1 << 30)
    pc.resize(2 * block_size(llama))
    disk, write = pc.disk, pc.disk.write
    go = threading.Event()

    def slow(*args):
        go.wait(10)
        write(*args)

    monkeypatch.setattr(disk, "write", slow)
    try:
        for seed in (102, 103, 104):  # each prompt's two blocks evict the last one's
            alone(llama, ids(2 * BLOCK + 2, seed), n=1)
        assert pc.stats()["evictions"] >= 4
        assert 0 < prefix_cache._writer.queued <= 2 * block_size(llama)
    finally:
        go.set()
    assert prefix_cache.flush(timeout=60)
    assert 1 <= len(list(disk.dir.glob("*.kv"))) <= 2
    prefix_cache.attach(llama.model, None)

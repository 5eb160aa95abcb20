"""Speed and memory of a model on this machine: load time, time to first token, prefill and
decode tokens/s (one sequence, and batches through the continuous-batching scheduler), peak
memory, this machine's memory bandwidth with the decode ceiling it implies; optionally what
that throughput costs per million tokens at a given hourly price.

The ceiling: one sequence's decode step reads every weight once (the input embedding table
only a row, unless it is also the output head) and its keys and values so far, so it cannot run
faster than bandwidth / those bytes. Where the weights fit in the CPU's last-level cache the step
reads them from the cache, and the ceiling does not bind (`fits_in_cache`)."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import BadRequest

TEXT = ("Owning a language model means running it on your own hardware, where nobody can change its "
        "price, its rules or its availability. ")


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM where /proc has it (Linux), else ru_maxrss. Not
    ru_maxrss on Linux: the kernel carries the high-water mark across exec, so in a process
    another one spawned it starts at that parent's peak (a bench run from a test runner or a
    server reported theirs)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def memory_bandwidth(size: int | None = None, repeats: int = 3) -> float:
    """Memory read bandwidth in bytes/s, on the threads set: the best of `repeats` sums of a
    buffer far larger than the caches (by default 1 GiB, or an eighth of the memory available
    when that is less, and at least 64 MiB)."""
    if size is None:
        size = max(64 << 20, min(1 << 30, _available_bytes() // 8))
    buf = torch.ones(size // 4, dtype=torch.float32)  # written once: its pages are real memory
    buf.sum()
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        best = max(best, buf.numel() * 4 / (time.perf_counter() - t))
    return best


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache here (Linux's sysfs), or None where it is not reported."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text(encoding="ascii").strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes) if sizes else None


def bytes_per_token(model, position: int, cache_dtype: torch.dtype) -> tuple[int, int]:
    """(weight bytes, key and value bytes) one decode step at `position` reads: every parameter
    and buffer once (each storage counted once; the input embedding table not at all unless it
    is the output head too), and each layer's keys and values of the positions it attends to."""
    skip = set()
    if getattr(model, "lm_head", None) is not None:  # untied: the embedding lookup reads one row
        skip = {t.data_ptr() for t in list(model.embed.parameters()) + list(model.embed.buffers())}
    seen, weights = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.data_ptr() in skip:
            continue
        seen.add(ptr)
        weights += t.untyped_storage().nbytes()
    cfg = model.cfg
    per_position = 2 * cfg.n_kv_heads * cfg.head_dim * torch.empty((), dtype=cache_dtype).element_size()
    kv = 0
    for block in model.layers:
        window = block.attn.window
        kv += per_position * (min(position, window) if window else position)
    return weights, kv


def _kernel_build(device: torch.device) -> str | None:
    """The build of ownlm's CPU kernels the model runs on ("avx2", "avx512vnni", "neon"), or None
    (not a CPU, or no kernels)."""
    from ..model import kernels

    return kernels.isa() if device.type == "cpu" and kernels.load() is not None else None


def _activations(device: torch.device) -> str | None:
    """What the kernels' integer matmuls round activations to ("int16", "int8"), or None (no
    kernels)."""
    from ..model import kernels

    return kernels.activations() if _kernel_build(device) else None


def cost_per_mtok(price_per_hour: float, tokens_per_s: float) -> float:
    return price_per_hour / (tokens_per_s * 3600) * 1e6


def bench(ref: str, prompt_tokens: int = 512, gen_tokens: int = 128, batches: tuple[int, ...] = (1,),
          device: str | None = None, dtype: str | None = None, price_per_hour: float | None = None,
          api_price_per_mtok: float | None = None, quant: str = "auto", speculate: str | None = None) -> dict[str, Any]:
    """With `speculate` ("ngram" or a draft model), the one-sequence greedy decode runs again with
    speculative decoding: its tokens/s, its speedup, the guesses drafted and kept, and whether
    the tokens are the same."""
    from ..engine import prefix_cache
    from ..engine.generate import StepStats, generate_ids
    from ..engine.sampling import SamplingParams
    from ..engine.scheduler import Driver, Scheduler, run_all
    from ..loading import load

    if prompt_tokens < 1 or gen_tokens < 2 or any(b < 1 for b in batches):
        raise BadRequest("--prompt-tokens must be >= 1, --gen-tokens >= 2 and batch sizes >= 1")
    if price_per_hour is not None and price_per_hour <= 0 or api_price_per_mtok is not None and api_price_per_mtok <= 0:
        raise BadRequest("prices must be positive")
    t0 = time.perf_counter()
    lm = load(ref, device=device, dtype=dtype, quant=quant, pull_missing=False)
    load_s = time.perf_counter() - t0
    prefix_cache.attach(lm.model, prefix_cache.PrefixCache(0))  # the same prompt each run: measure computing it
    if prompt_tokens + gen_tokens > lm.config.context_length:
        raise BadRequest(f"{prompt_tokens} + {gen_tokens} tokens exceed the context ({lm.config.context_length})")
    ids = lm.encode(TEXT)
    ids = (ids * (prompt_tokens // len(ids) + 1))[:prompt_tokens]
    greedy = SamplingParams(temperature=0, max_tokens=gen_tokens)
    list(generate_ids(lm.model, ids[:16], SamplingParams(temperature=0, max_tokens=4)))  # warm-up
    stats = StepStats()
    out = list(generate_ids(lm.model, ids, greedy, (), stats))  # end-of-text ignored: exactly gen_tokens
    single = {"batch": 1, "prefill_tokens_per_s": len(ids) / stats.prefill_s,
              "time_to_first_token_s": stats.prefill_s,
              "decode_tokens_per_s": (len(out) - 1) / stats.decode_s}
    rows = [single]
    speculative = None
    if speculate is not None:
        source = lm.speculator(speculate)
        list(source(lm.model, ids[:16], SamplingParams(temperature=0, max_tokens=4)))  # warm-up
        st = StepStats()
        spec_out = list(source(lm.model, ids, greedy, (), st))
        rate = (len(spec_out) - 1) / st.decode_s
        speculative = {"speculate": speculate, "decode_tokens_per_s": rate,
                       "speedup": rate / single["decode_tokens_per_s"], "drafted_tokens": st.drafted,
                       "accepted_tokens": st.accepted,
                       "acceptance_rate": st.accepted / st.drafted if st.drafted else 0.0,
                       "same_tokens": spec_out == out}
    if any(b > 1 for b in batches):
        sched = Scheduler(lm.model, max_running=max(batches), driver=Driver())  # stepped on this thread
        try:
            for b in sorted({b for b in batches if b > 1}):
                mark: dict[str, float] = {}

                def all_admitted(s: Scheduler, b: int = b, mark: dict[str, float] = mark) -> None:
                    # from here on every step decodes b rows
                    if not mark and s.admitting is None and not s.waiting and len(s.running) == b:
                        mark.update(t=time.perf_counter(), tokens=sum(len(q.out) for q in s.running))

                sched.on_step = all_admitted
                t = time.perf_counter()
                results = run_all(sched, [dict(prompt=ids, params=greedy, limit=gen_tokens) for _ in range(b)])
                end = time.perf_counter()
                tokens = sum(map(len, results))
                row = {"batch": b, "aggregate_tokens_per_s": tokens / (end - t), "wall_s": end - t}
                if mark and end > mark["t"]:  # the batched decode alone, once all b are admitted
                    row["decode_aggregate_tokens_per_s"] = (tokens - mark["tokens"]) / (end - mark["t"])
                rows.append(row)
        finally:
            sched.close()
    peak = peak_rss_bytes()  # before the bandwidth's buffer, which is not the model's
    if lm.model.device.type == "cpu":
        from ..engine.kv_cache import cache_dtype

        bandwidth = memory_bandwidth()
        weights, kv = bytes_per_token(lm.model, prompt_tokens + gen_tokens // 2, cache_dtype(lm.model))
        ceiling = bandwidth / (weights + kv)
        llc = last_level_cache_bytes()
        memory = {"bandwidth_bytes_per_s": bandwidth, "weight_bytes_per_token": weights, "kv_bytes_per_token": kv,
                  "decode_ceiling_tokens_per_s": ceiling,
                  "fraction_of_ceiling": single["decode_tokens_per_s"] / ceiling,
                  "last_level_cache_bytes": llc, "fits_in_cache": llc is not None and weights <= llc}
    else:
        memory = None
    result = {"model": lm.name, "device": str(lm.model.device), "dtype": str(lm.model.dtype),
              "threads": torch.get_num_threads(), "kernels": _kernel_build(lm.model.device),
              "activations": _activations(lm.model.device),
              "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "load_s": load_s, "runs": rows,
              "peak_rss_bytes": peak}
    if memory is not None:
        result["memory"] = memory
    if speculative is not None:
        result["speculative"] = speculative
    if price_per_hour is not None:
        best = max(r.get("aggregate_tokens_per_s", r.get("decode_tokens_per_s", 0)) for r in rows)
        own = cost_per_mtok(price_per_hour, best)
        result["cost"] = {"price_per_hour": price_per_hour, "tokens_per_s": best, "cost_per_mtok": own,
                          "api_price_per_mtok": api_price_per_mtok,
                          "api_over_own": api_price_per_mtok / own if api_price_per_mtok else None}
    return result

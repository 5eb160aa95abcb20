"""ownlm vs llama.cpp (llama-cpp-python 0.3.36) on synthetic Llama-shaped GGUFs of 1B and 7B
parameters, in one run: load (cold and warm), prefill, decode at each thread count, peak RSS.

    python bench/scale.py [--sizes 1b,7b] [--quants q4_0,q4_k_m] [--threads 1,2] [--cache DIR]
                          [--gen 64] [--prompt-tokens 512] [--activations int16|int8] [--no-llama-cpp]
                          [--llama-python PATH]

The files are written once into the cache (default ~/.cache/ownlm-bench/scale; temp name, fsync,
rename) and reused: random but valid quantized blocks written directly as bytes (weights about
N(0, 0.02); norms 1), smollm2's tokenizer (vocabulary 49152, so both engines tokenize the same
text), the quantization mixes llama.cpp's llama-quantize makes:
  q4_0    every linear and the embedding Q4_0, the output head Q6_K;
  q4_k_m  Q4_K, with Q6_K for attn_v and ffn_down in the first and last eighth of the layers and
          every third layer between (llama.cpp's use_more_bits), and the output head Q6_K.
Sizes: tiny (~70M, for trying the script), 1b (TinyLlama's shape: dim 2048, 22 layers, 32 heads /
4 KV heads, ffn 5632; 1.2B with the larger vocabulary), 7b (Llama-2-7B: dim 4096, 32 layers,
32 heads, ffn 11008; 6.9B, ~3.9 GB).

Every measurement runs in a fresh child process (so its time and peak RSS are its own):
  load cold   the file evicted from the page cache first (posix_fadvise DONTNEED; `evicted` says
              what fraction of its pages mincore still found resident afterwards), then warm (the
              same again with the file cached). `first_forward_s` is a one-token forward right after
              the load: both engines map files lazily, so it shows the page faults a load deferred.
  ownlm       ownlm.load(path, cache=False) (a path is never cached), and the store path people get
              from `ownlm import` / `pull`: the GGUF imported (linked) into a fresh OWNLM_HOME, the
              first load builds the model and writes the repacked cache (its size is reported), later
              loads map that cache (cold: the cache file evicted too, and warm).
  perf        per thread count: a warm load, a 16-token warm-up, then a greedy run of --gen tokens
              after a --prompt-tokens prompt (prefill tok/s, decode tok/s), peak RSS; ownlm loads
              from its store (repacked cache), with default settings; its logits are checked finite.
              ownlm's child also measures the memory bandwidth on those threads (ownlm bench's
              logic), giving each engine's decode ceiling: bandwidth / (bytes of weights one step reads
              + its keys and values) - ownlm's as it holds them, llama.cpp's the file's tensors.
One JSON object: per size and quant, both engines' figures and the ratios against the targets
(decode 1B Q4_0 >= 1.2x llama.cpp, 7B >= 1.0x; prefill >= 1.0x; peak RSS <= 1.1x llama.cpp + 250 MB;
ownlm's warm load <= 1 s)."""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from compare import llama_python, run_llama_cpp
from decode import TEXT, peak_rss_mb

HERE = Path(__file__).resolve().parent
VERSION = 1  # in the file names: bump when the files' contents change
SIZES = {  # Llama shapes; the vocabulary is smollm2's (49152)
    "tiny": dict(dim=512, layers=8, heads=8, kv_heads=4, ffn=1536),
    "1b": dict(dim=2048, layers=22, heads=32, kv_heads=4, ffn=5632),
    "7b": dict(dim=4096, layers=32, heads=32, kv_heads=32, ffn=11008),
}
QUANTS = ("q4_0", "q4_k_m")
VOCAB = 49152
CONTEXT = 4096
STD = 0.02  # the weights' standard deviation
DECODE_TARGET = {("1b", "q4_0"): 1.2, ("7b", "q4_0"): 1.0, ("7b", "q4_k_m"): 1.0}
PREFILL_TARGET = 1.0
RSS_FACTOR, RSS_EXTRA_MB = 1.1, 250
WARM_LOAD_TARGET_S = 1.0


# -- the files ----------------------------------------------------------------------------------
def more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_plan(size: str, quant: str) -> list[tuple[str, tuple[int, ...], object]]:
    """(GGUF name, shape outermost first, block type) in file order."""
    import gguf

    Q = gguf.GGMLQuantizationType
    s = SIZES[size]
    dim, hd = s["dim"], s["dim"] // s["heads"]
    kv = s["kv_heads"] * hd
    base = Q.Q4_0 if quant == "q4_0" else Q.Q4_K
    plan = [("token_embd.weight", (VOCAB, dim), base)]
    for i in range(s["layers"]):
        plan.append((f"blk.{i}.attn_norm.weight", (dim,), Q.F32))
        for name, rows, cols in (("attn_q", dim, dim), ("attn_k", kv, dim), ("attn_v", kv, dim),
                                 ("attn_output", dim, dim), ("ffn_gate", s["ffn"], dim), ("ffn_up", s["ffn"], dim),
                                 ("ffn_down", dim, s["ffn"])):
            kind = base
            if quant == "q4_k_m" and name in ("attn_v", "ffn_down") and more_bits(i, s["layers"]):
                kind = Q.Q6_K
            plan.append((f"blk.{i}.{name}.weight", (rows, cols), kind))
        plan.append((f"blk.{i}.ffn_norm.weight", (dim,), Q.F32))
    plan += [("output_norm.weight", (dim,), Q.F32), ("output.weight", (VOCAB, dim), Q.Q6_K)]
    return plan


def _f16(x: float) -> np.ndarray:
    return np.frombuffer(np.float16(x).tobytes(), dtype=np.uint8)


def blocks(kind, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random valid blocks of `kind` for a (rows, cols) weight, as (rows, bytes per row) uint8,
    scaled so the weights come out with a standard deviation of about STD and mean about 0."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if kind == Q.F32:
        return np.ones(cols, dtype=np.float32)
    per, size = gguf.GGML_QUANT_SIZES[kind]
    b = rng.integers(0, 256, size=(rows * cols // per, size), dtype=np.uint8)
    if kind == Q.Q4_0:  # d, 16 bytes of nibbles: (q - 8) * d, q uniform over 0..15 (sd 4.61)
        b[:, 0:2] = _f16(STD / 4.61)
    elif kind == Q.Q4_K:  # d, dmin, 12 bytes of 6-bit (scale, min) pairs, 128 bytes of nibbles
        # every scale and min 32: w = 32 d q - 32 dmin, centred with dmin = 7.5 d
        d = STD / (32 * 4.61)
        b[:, 0:2], b[:, 2:4] = _f16(d), _f16(7.5 * d)
        b[:, 4:16] = np.array([160] * 8 + [0] * 4, dtype=np.uint8)  # 32 = 0b100000 in get_scale_min_k4's packing
    elif kind == Q.Q6_K:  # 128 bytes low nibbles, 64 bytes high bits, 16 int8 scales, d: d * sc * (q - 32)
        b[:, 192:208] = 4
        b[:, 208:210] = _f16(STD / (4 * 18.47))
    else:
        raise ValueError(kind)
    return b.reshape(rows, -1)


def tokenizer_gguf(cache: Path) -> Path:
    """smollm2's GGUF (for its tokenizer): the tests' copy when there is one, else pulled once
    into the cache."""
    from ownlm import manage
    from ownlm.store.store import Store

    home = HERE.parent / ".cache" / "smollm2-home"  # tests/conftest.py's
    store = Store(home if (home / "manifests" / "smollm2").is_dir() else cache / "smollm2-home")
    manifest = manage.pull("smollm2", store=store, quiet=True)  # a no-op once it is there
    return store.open_blob(manifest["files"]["model.gguf"]["sha256"])


def write_gguf(path: Path, size: str, quant: str, tokenizer: Path, seed: int = 0) -> None:
    """Stream the file tensor by tensor (never more than one tensor in memory) to a temp name,
    fsync, rename."""
    import gguf

    from ownlm.formats.gguf import GGUFFile

    src = GGUFFile(tokenizer)
    m = src.metadata
    s = SIZES[size]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    try:
        w.add_name(f"synthetic-{size}-{quant}")
        w.add_context_length(CONTEXT)
        w.add_embedding_length(s["dim"])
        w.add_block_count(s["layers"])
        w.add_feed_forward_length(s["ffn"])
        w.add_head_count(s["heads"])
        w.add_head_count_kv(s["kv_heads"])
        w.add_rope_freq_base(10000.0)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_dimension_count(s["dim"] // s["heads"])
        w.add_vocab_size(VOCAB)
        w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_0 if quant == "q4_0" else gguf.LlamaFileType.MOSTLY_Q4_K_M))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model(m["tokenizer.ggml.model"])
        w.add_tokenizer_pre(m["tokenizer.ggml.pre"])
        w.add_token_list(list(m["tokenizer.ggml.tokens"]))
        w.add_token_types([int(t) for t in m["tokenizer.ggml.token_type"]])
        w.add_token_merges(list(m["tokenizer.ggml.merges"]))
        w.add_bos_token_id(int(m["tokenizer.ggml.bos_token_id"]))
        w.add_eos_token_id(int(m["tokenizer.ggml.eos_token_id"]))
        w.add_unk_token_id(int(m["tokenizer.ggml.unknown_token_id"]))
        w.add_pad_token_id(int(m["tokenizer.ggml.padding_token_id"]))
        w.add_add_bos_token(bool(m["tokenizer.ggml.add_bos_token"]))
        w.add_add_space_prefix(bool(m.get("tokenizer.ggml.add_space_prefix", False)))
        if m.get("tokenizer.chat_template"):
            w.add_chat_template(m["tokenizer.chat_template"])
        assert len(m["tokenizer.ggml.tokens"]) == VOCAB
        plan = tensor_plan(size, quant)
        for name, shape, kind in plan:
            if len(shape) == 1:
                w.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
            else:
                per, nbytes = gguf.GGML_QUANT_SIZES[kind]
                row = shape[1] // per * nbytes
                w.add_tensor_info(name, (shape[0], row), np.dtype(np.uint8), shape[0] * row, raw_dtype=kind)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        rng = np.random.default_rng(seed)
        for _, shape, kind in plan:
            w.write_tensor_data(blocks(kind, shape[0] if len(shape) == 2 else 1, shape[-1], rng))
        w.flush()
        for f in w.fout:
            os.fsync(f.fileno())
        w.close()
        os.rename(tmp, path)
    finally:
        w.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def ensure_gguf(cache: Path, size: str, quant: str) -> tuple[Path, float | None]:
    path = cache / f"llama-{size}-{quant}-v{VERSION}.gguf"
    if path.exists():
        return path, None
    cache.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    print(f"writing {path}", file=sys.stderr)
    write_gguf(path, size, quant, tokenizer_gguf(cache))
    return path, time.perf_counter() - t


# -- the page cache -----------------------------------------------------------------------------
def resident_fraction(path: Path) -> float | None:
    """The fraction of the file's pages in the page cache (mincore on a fresh map, which touches nothing)."""
    import ctypes

    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                return None
            return int(np.count_nonzero(np.frombuffer(vec, dtype=np.uint8) & 1)) / pages  # bit 0: resident
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def evict(*paths: Path, probe: int = 64 << 20) -> dict:
    """Drop the files from the page cache (written back first: dirty pages are not dropped);
    returns the resident fraction of each before and after, and the speed of a `probe`-byte read
    from the middle of the file once dropped (dropped again after): the disk's speed when the
    file is really cold, far more where a cache below this one (a VM host's) still holds it."""
    out = {}
    for p in paths:
        before = resident_fraction(p)
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            start = max(0, os.fstat(fd).st_size // 2 - probe // 2) // mmap.PAGESIZE * mmap.PAGESIZE
            t, got = time.perf_counter(), 0
            while got < probe:
                chunk = os.pread(fd, min(8 << 20, probe - got), start + got)
                if not chunk:
                    break
                got += len(chunk)
            speed = got / max(time.perf_counter() - t, 1e-9) / 1e6
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        out[p.name] = {"resident_before": before, "resident_after": resident_fraction(p),
                       "probe_read_mb_per_s": speed}
    return out


# -- the children -------------------------------------------------------------------------------
def prompt_ids(encode, n: int) -> list[int]:
    ids = encode(TEXT)
    return (ids * (n // len(ids) + 1))[:n]


def ownlm_child(a) -> dict:
    import torch

    import ownlm

    if a.child == "ownlm-prep":  # the CPU kernels built before anything is timed
        from ownlm.model import kernels

        return {"kernels": kernels.load() is not None}
    if a.child == "ownlm-import":
        from ownlm import manage

        t = time.perf_counter()
        manage.import_path(a.path, name="scale", link=True, quiet=True)
        return {"import_s": time.perf_counter() - t}
    ref, cache = (a.path, False) if a.mode == "path" else ("scale", True)
    t0 = time.perf_counter()
    lm = ownlm.load(ref, cache=cache, threads=a.threads, activations=a.activations)
    load_s = time.perf_counter() - t0
    ids = prompt_ids(lm.encode, a.prompt_tokens)
    if a.child == "ownlm-load":
        t = time.perf_counter()
        with torch.inference_mode():
            logits = lm.model(torch.tensor([ids[:1]]), last_only=True)
        return {"load_s": load_s, "first_forward_s": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb(),
                "logits_finite": bool(torch.isfinite(logits).all())}
    from ownlm.engine.generate import StepStats, generate_ids
    from ownlm.engine.kv_cache import cache_dtype
    from ownlm.engine.sampling import SamplingParams
    from ownlm.evaluate.bench import bytes_per_token, last_level_cache_bytes, memory_bandwidth

    for _ in generate_ids(lm.model, ids[:16], SamplingParams(temperature=0, max_tokens=4), ()):
        pass  # warm-up
    stats = StepStats()
    out = list(generate_ids(lm.model, ids, SamplingParams(temperature=0, max_tokens=a.gen), (), stats))
    assert len(out) == a.gen
    rss = peak_rss_mb()  # before the bandwidth's buffer
    with torch.inference_mode():
        logits = lm.model(torch.tensor([ids[:32]]), last_only=True).float()
    weights, kv = bytes_per_token(lm.model, len(ids) + a.gen // 2, cache_dtype(lm.model))
    decode = (a.gen - 1) / stats.decode_s
    bandwidth = memory_bandwidth()
    return {"load_s": load_s, "prefill_tokens_per_s": len(ids) / stats.prefill_s, "decode_tokens_per_s": decode,
            "peak_rss_mb": rss, "threads": torch.get_num_threads(), "dtype": str(lm.model.dtype),
            "logits_finite": bool(torch.isfinite(logits).all()), "logits_std": float(logits.std()),
            "distinct_tokens": len(set(out)), "bandwidth_gb_per_s": bandwidth / 1e9,
            "weight_bytes_per_token": weights, "kv_bytes_per_token": kv,
            "decode_ceiling_tokens_per_s": bandwidth / (weights + kv),
            "fraction_of_ceiling": decode * (weights + kv) / bandwidth,
            "last_level_cache_bytes": last_level_cache_bytes()}


def llama_child(a) -> dict:
    if a.child == "llama-perf":
        return run_llama_cpp(a.path, a.prompt_tokens, a.gen, a.threads)
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=a.path, n_ctx=a.prompt_tokens + a.gen + 16, n_threads=a.threads,
                n_threads_batch=a.threads, n_batch=512, verbose=False)
    load_s = time.perf_counter() - t0
    ids = llm.tokenize(TEXT.encode(), add_bos=False)[:1]
    t = time.perf_counter()
    llm.eval(ids)
    first = time.perf_counter() - t
    return {"load_s": load_s, "first_forward_s": first, "peak_rss_mb": peak_rss_mb(),
            "logits_finite": bool(np.isfinite(llm.scores[0]).all())}


# -- the parent ---------------------------------------------------------------------------------
class Runner:
    def __init__(self, a, llama_py: str | None):
        self.a, self.llama_py = a, llama_py
        self.env = dict(os.environ)
        if not self.env.get("OWNLM_KERNEL_CACHE"):  # one build of the kernels for every fresh home
            from ownlm.paths import kernels_dir

            self.env["OWNLM_KERNEL_CACHE"] = str(kernels_dir())

    def child(self, kind: str, path: Path, threads: int, mode: str = "path", home: Path | None = None) -> dict:
        py = self.llama_py if kind.startswith("llama") else sys.executable
        env = {**self.env, "OMP_NUM_THREADS": str(threads)}
        if home is not None:
            env["OWNLM_HOME"] = str(home)
        cmd = [py, __file__, "--child", kind, "--path", str(path), "--mode", mode, "--threads", str(threads),
               "--prompt-tokens", str(self.a.prompt_tokens), "--gen", str(self.a.gen),
               "--activations", self.a.activations]
        print(f"  {kind} {mode} threads={threads}", file=sys.stderr)
        load = os.getloadavg()[0]  # others' work on the machine shows here
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            return {"error": proc.stderr[-1500:]}
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        out["child_wall_s"] = time.perf_counter() - t
        out["load_average_1min_before"] = load
        return out


def llama_ceiling(path: Path, size: str, n_pos: int, bandwidth: float) -> dict:
    """llama.cpp's decode ceiling: the file's tensors but the embedding table (one row read),
    and its float16 keys and values."""
    from ownlm.formats.gguf import GGUFFile

    g = GGUFFile(path)
    weights = sum(t.nbytes for n, t in g.tensors.items() if n != "token_embd.weight")
    s = SIZES[size]
    kv = s["layers"] * 2 * s["kv_heads"] * (s["dim"] // s["heads"]) * 2 * n_pos
    g.close()
    return {"weight_bytes_per_token": weights, "kv_bytes_per_token": kv,
            "decode_ceiling_tokens_per_s": bandwidth / (weights + kv)}


def measure(r: Runner, path: Path, size: str, quant: str) -> dict:
    a = r.a
    top = max(a.threads)
    res: dict = {}
    if r.llama_py:
        ll: dict = {"load_cold": {"evicted": evict(path)}}
        ll["load_cold"].update(r.child("llama-load", path, top))
        ll["load_warm"] = r.child("llama-load", path, top)
        for t in a.threads:
            ll[f"threads_{t}"] = r.child("llama-perf", path, t)
        res["llama.cpp"] = ll
    ow: dict = {"path_load_cold": {"evicted": evict(path)}}
    ow["path_load_cold"].update(r.child("ownlm-load", path, top))
    ow["path_load_warm"] = r.child("ownlm-load", path, top)
    home = Path(tempfile.mkdtemp(prefix="ownlm-home-", dir=a.cache))
    try:
        ow["import"] = r.child("ownlm-import", path, top, home=home)
        ow["store_first_load"] = {"evicted": evict(path)}  # builds from the GGUF, writes the repacked cache
        ow["store_first_load"].update(r.child("ownlm-load", path, top, "store", home))
        files = list((home / "cache" / "repacked").glob("*/model.safetensors"))
        ow["repacked_cache"] = {"files": len(files), "bytes": sum(f.stat().st_size for f in files),
                                "gguf_bytes": path.stat().st_size}
        ow["store_load_cold"] = {"evicted": evict(path, *files)}
        ow["store_load_cold"].update(r.child("ownlm-load", path, top, "store", home))
        ow["store_load_warm"] = r.child("ownlm-load", path, top, "store", home)
        for t in a.threads:
            ow[f"threads_{t}"] = r.child("ownlm-perf", path, t, "store", home)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    res["ownlm"] = ow
    if "llama.cpp" in res:
        for t in a.threads:
            o, ll = ow[f"threads_{t}"], res["llama.cpp"][f"threads_{t}"]
            if "bandwidth_gb_per_s" in o and "error" not in ll:
                c = llama_ceiling(path, size, a.prompt_tokens + a.gen // 2, o["bandwidth_gb_per_s"] * 1e9)
                c["fraction_of_ceiling"] = ll["decode_tokens_per_s"] / c["decode_ceiling_tokens_per_s"]
                ll.update(c)
    res["targets"] = targets(res, size, quant, a.threads)
    return res


def targets(res: dict, size: str, quant: str, threads: list[int]) -> dict:
    ow, ll = res["ownlm"], res.get("llama.cpp")
    out: dict = {}

    def ratio(x: dict, y: dict, key: str) -> float | None:
        return x[key] / y[key] if key in x and key in y else None

    for t in threads:
        o = ow.get(f"threads_{t}", {})
        row = {"ownlm_fraction_of_ceiling": o.get("fraction_of_ceiling")}
        if ll:
            lt = ll.get(f"threads_{t}", {})
            dec, pre = ratio(o, lt, "decode_tokens_per_s"), ratio(o, lt, "prefill_tokens_per_s")
            want = DECODE_TARGET.get((size, quant))
            row.update(decode_ownlm_over_llama_cpp=dec, decode_target=want,
                       decode_met=None if dec is None or want is None else dec >= want,
                       prefill_ownlm_over_llama_cpp=pre, prefill_target=PREFILL_TARGET,
                       prefill_met=None if pre is None else pre >= PREFILL_TARGET,
                       llama_cpp_fraction_of_ceiling=lt.get("fraction_of_ceiling"))
        out[f"threads_{t}"] = row
    rss_o = max((ow[f"threads_{t}"].get("peak_rss_mb", 0) for t in threads), default=0)
    if ll:
        rss_l = max((ll[f"threads_{t}"].get("peak_rss_mb", 0) for t in threads), default=0)
        limit = RSS_FACTOR * rss_l + RSS_EXTRA_MB
        out["peak_rss"] = {"ownlm_mb": rss_o, "llama_cpp_mb": rss_l, "ratio": rss_o / rss_l if rss_l else None,
                           "limit_mb": limit, "met": rss_o <= limit}
    warm = ow.get("store_load_warm", {}).get("load_s")
    out["warm_load"] = {"store_s": warm, "path_s": ow.get("path_load_warm", {}).get("load_s"),
                        "target_s": WARM_LOAD_TARGET_S, "met": None if warm is None else warm <= WARM_LOAD_TARGET_S}
    return out


def machine() -> dict:
    import platform

    import torch

    info = {"cpu": platform.processor(), "cores": os.cpu_count(), "torch": torch.__version__,
            "load_average": os.getloadavg()}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(HERE.parent)]
        info["ownlm_commit"] = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True,
                                              text=True).stdout.strip()
        info["ownlm_src_changed_files"] = len(subprocess.run(git + ["status", "--porcelain", "src"],
                                                             capture_output=True, text=True).stdout.splitlines())
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo", encoding="ascii", errors="replace"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith(("MemTotal", "MemAvailable")):
                info[line.split(":")[0]] = line.split(":")[1].strip()
    return info


def rounded(x):
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [rounded(v) for v in x]
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1b,7b", help=f"comma-separated, of {', '.join(SIZES)}")
    ap.add_argument("--quants", default=",".join(QUANTS), help=f"comma-separated, of {', '.join(QUANTS)}")
    ap.add_argument("--threads", default="1,2", help="thread counts for prefill and decode")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "ownlm-bench" / "scale"),
                    help="where the files are written once and reused")
    ap.add_argument("--no-llama-cpp", action="store_true", help="measure ownlm only")
    ap.add_argument("--llama-python", help="a Python with llama_cpp installed (default: bench/.llama-env)")
    ap.add_argument("--gen", type=int, default=64, help="greedy tokens generated per decode measurement")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--activations", default="int16", choices=("int16", "int8"),
                    help="ownlm's activation rounding (ownlm.load's activations)")
    ap.add_argument("--write-only", action="store_true", help="write the files into the cache and stop")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="path", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        a.threads = int(a.threads)
        print(json.dumps(llama_child(a) if a.child.startswith("llama") else ownlm_child(a)))
        return
    a.sizes = [s.strip() for s in a.sizes.split(",") if s.strip()]
    a.quants = [q.strip() for q in a.quants.split(",") if q.strip()]
    a.threads = [int(t) for t in a.threads.split(",") if t.strip()]
    bad = [s for s in a.sizes if s not in SIZES] + [q for q in a.quants if q not in QUANTS]
    if bad or not a.threads or min(a.threads) < 1 or a.gen < 2 or a.prompt_tokens < 16:
        ap.error(f"bad arguments {bad or ''}: sizes of {list(SIZES)}, quants of {list(QUANTS)}, threads >= 1, "
                 "--gen >= 2, --prompt-tokens >= 16")
    a.cache = Path(a.cache).expanduser()
    a.cache.mkdir(parents=True, exist_ok=True)
    files = {}
    for size in a.sizes:
        for quant in a.quants:
            path, wrote = ensure_gguf(a.cache, size, quant)
            files[size, quant] = path, wrote
    if a.write_only:
        print(json.dumps({f"{s}/{q}": str(p) for (s, q), (p, _) in files.items()}, indent=2))
        return
    r = Runner(a, None if a.no_llama_cpp else llama_python(a.llama_python))
    results: dict = {"setup": {"sizes": a.sizes, "quants": a.quants, "threads": a.threads, "gen_tokens": a.gen,
                               "prompt_tokens": a.prompt_tokens, "cache": str(a.cache), "machine_before": machine()}}
    results["setup"]["ownlm_kernels"] = r.child("ownlm-prep", Path("-"), max(a.threads)).get("kernels")
    if r.llama_py:
        results["setup"]["llama_cpp"] = subprocess.run(
            [r.llama_py, "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True,
            text=True).stdout.strip()
    for (size, quant), (path, wrote) in files.items():
        print(f"{size} {quant}: {path}", file=sys.stderr)
        res = {"file": {"path": str(path), "bytes": path.stat().st_size, "write_s": wrote,
                        "mix": sorted({k.name for _, _, k in tensor_plan(size, quant)})}}
        res.update(measure(r, path, size, quant))
        results.setdefault(size, {})[quant] = res
    results["setup"]["load_average_after"] = os.getloadavg()
    print(json.dumps(rounded(results), indent=2))


if __name__ == "__main__":
    main()

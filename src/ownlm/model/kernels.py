"""ownlm's CPU kernels: group-wise integer (int4 / int5 / int6 / int8) and bfloat16 matmuls,
RMSNorm, the gated activations, one-token attention with its cache write, and `decode_layers`, a
whole decode step of common-shaped blocks in one call (engine/cpu_step.py), for x86-64 with AVX2,
FMA and F16C (and a build with AVX-512 VNNI where the CPU has it, see ISAS) and for AArch64 with
NEON: the matmuls and the attention are written in csrc/simd.h's operations, which give the same
bits on both. OpenMP.

Why: in eager PyTorch a one-token step is hundreds of small operations whose dispatch costs more
than their arithmetic, PyTorch's int4 kernel wants its own weight layout (a second copy beside
the GGUF's), and on an AVX2 CPU its bf16 GEMM costs as much per row as a one-row GEMV. Each output
element is computed by the same sequence of operations whatever the number of rows, so a
sequence decodes to the same bits alone and in a batch.

The C source is csrc/*.c (shipped with the package). It is compiled once with the system C
compiler into paths.kernels_dir()/cpu-<key>.so, where the key covers the sources, the flags and
the compiler's own version; the build goes to a temporary file that is renamed into place. At
load, the ctypes mirror of the C structure is checked against the layout the C code reports.
The C code trusts its arguments: every wrapper here checks shapes, bounds and alignment first,
and an allocation failure inside comes back as MemoryError.

Threads: the kernels are OpenMP code bound to the OpenMP runtime PyTorch already loaded (the
same libgomp), whose thread count is a per-thread setting; set_threads sets PyTorch's and the
kernels' (which every entry point applies to the thread calling it, so a server's own threads
follow it too). Unset, both use all the cores.

OWNLM_KERNELS: unset, the kernels are used where they can be (a failed build warns once and
PyTorch's ops run instead); "1", they are required (a CPU or compiler without them, or a failed
build, is a KernelError); "0", they are off."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from ..errors import BadRequest, OwnlmError
from ..paths import kernels_dir
from . import cpu
from .quant import QuantWeight

CSRC = Path(__file__).with_name("csrc")
# x86-64 with AVX2, and AArch64 (NEON is part of the architecture): every kernel, the vector code in
# simd.h's operations with the same bits on both (tests/test_neon.py)
SOURCES = ("matmul.c", "attention.c", "elementwise.c", "decode.c")
HEADERS = ("kernels.h", "simd.h")
FLAGS = (("-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC") if cpu.arm64() else
         ("-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"))
# x86-64 builds beyond AVX2, widest first: the CPU flags (/proc/cpuinfo) each needs and what it adds
# to FLAGS. avx512vnni: AVX-512 VNNI's int16 multiply-add-accumulate (in 256-bit vectors) fuses the
# int4 / int8 matmuls' two multiply-adds and their sum, with the same bits (simd.h's v8i_madd2);
# the compiler's own vectorizing stays at 256 bits (512-bit code slows some CPUs' clocks and gave
# no speed here).
ISAS = {"avx512vnni": ({"avx512f", "avx512bw", "avx512vl", "avx512_vnni"},
                       ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mprefer-vector-width=256"))}
ENOMEM = 1  # OWNLM_ENOMEM in kernels.h


class KernelError(OwnlmError):
    """The CPU kernels were required (OWNLM_KERNELS=1) but cannot be built or loaded here."""


MAX_PARTS = 3  # MAX_PARTS in kernels.h: the parts of one projection of layer_t


class Part(ctypes.Structure):
    """qpart_t (csrc/kernels.h): one group-wise integer weight as quant_gemm reads it."""
    _fields_ = [("w", ctypes.c_void_p), ("s", ctypes.c_void_p), ("o", ctypes.c_void_p), ("h", ctypes.c_void_p),
                ("u", ctypes.c_void_p), ("l", ctypes.c_void_p), ("k", ctypes.c_void_p), ("bits", ctypes.c_int64),
                ("n", ctypes.c_int64),
                ("xbits", ctypes.c_int64)]

    @classmethod
    def of(cls, w: QuantWeight) -> "Part":
        """The part for w, whose tensors the caller keeps alive while it is used, meeting
        activations of the bits set now (set_activations)."""
        def ptr(t):
            return None if t is None else t.data_ptr()
        return cls(ptr(w.data), ptr(w.scale), ptr(w.offset), ptr(w.high), ptr(w.sub), ptr(w.lut), ptr(w.superblock),
                   w.bits, w.shape[0], ACTIVATIONS[_activations])


class Layer(ctypes.Structure):
    """decode_layers' layer_t (csrc/kernels.h), checked against the C side's layout at load."""
    _fields_ = [("part", (Part * MAX_PARTS) * 4), ("nparts", ctypes.c_int64 * 4),
                ("bias", ctypes.c_void_p * 4), ("n", ctypes.c_int64 * 4),
                ("k", ctypes.c_int64 * 4), ("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p),
                ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p), ("post1", ctypes.c_void_p),
                ("post2", ctypes.c_void_p), ("window", ctypes.c_int64),
                ("local", ctypes.c_int64), ("scale", ctypes.c_float), ("norm_offset", ctypes.c_float)]


_lib = None
_tried = False
_lock = threading.Lock()
_threads: int | None = None  # set_threads' count, applied to the kernels when they load
# what the integer matmuls round activations to: "int16" (the default: float32's greedy answers) or
# "int8" (about twice the multiply-adds per instruction, llama.cpp's rounding)
ACTIVATIONS = {"int16": 16, "int8": 8}
_activations = "int16"  # set_activations' choice
_warned_threads = False


def isa() -> str:
    """The build the kernels take here: "neon" on AArch64; on x86-64 the widest of ISAS whose flags
    this CPU has, else "avx2". OWNLM_KERNEL_ISA names a narrower one (to compare them, or to
    build for a CPU class); one this CPU lacks is a KernelError."""
    if cpu.arm64():
        return "neon"
    wanted = os.environ.get("OWNLM_KERNEL_ISA", "")
    if wanted:
        if wanted != "avx2" and wanted not in ISAS:
            raise KernelError(f"OWNLM_KERNEL_ISA={wanted} is not one of ownlm's builds",
                              f"use one of: avx2, {', '.join(ISAS)}")
        missing = ISAS[wanted][0] - cpu.flags() if wanted in ISAS else set()
        if missing:
            raise KernelError(f"OWNLM_KERNEL_ISA={wanted}: this CPU lacks {' '.join(sorted(missing))}")
        return wanted
    return next((name for name, (need, _) in ISAS.items() if need <= cpu.flags()), "avx2")


def flags(name: str) -> tuple[str, ...]:
    """The compiler flags of build `name` (one of isa()'s answers)."""
    return FLAGS + (ISAS[name][1] if name in ISAS else ())


def mode() -> str:
    """"auto", "required" or "off", from OWNLM_KERNELS."""
    return {"0": "off", "1": "required"}.get(os.environ.get("OWNLM_KERNELS", ""), "auto")


def load() -> ctypes.CDLL | None:
    """The compiled kernels, building them on first use; None where they cannot or may not run
    here. After the first call, a lock-free read (it is asked on every kernel-eligible op)."""
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                _lib = _load()
                _tried = True  # set after _lib: a reader that sees it sees the library
    return _lib


def set_threads(n: int) -> None:
    """Compute on n threads from now on: PyTorch's intra-op threads and the kernels' OpenMP
    threads. n must be a positive integer; more than the cores here is allowed (warned once)."""
    global _threads, _warned_threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise BadRequest(f"threads must be a positive integer (got {n!r})", "leave it out to use every core",
                         param="threads")
    cores = cpu.cores()
    if n > cores and not _warned_threads:
        _warned_threads = True
        warnings.warn(f"{n} threads on {cores} cores: they will take turns, which is usually slower",
                      RuntimeWarning, stacklevel=2)
    torch.set_num_threads(n)
    _threads = n
    if _lib is not None:
        _lib.ownlm_set_threads(n)


def set_activations(name: str) -> None:
    """Round the integer matmuls' activations to `name` from now on, in this process: "int16"
    (the default) or "int8", per group of 32 with an absmax / 127 scale, as llama.cpp's Q8_0
    rounds them, for every kind of integer weight (GGUF's Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K,
    Q6_K, Q8_0, IQ4_NL, IQ4_XS). It is faster where the multiply-adds bound the work (prompts,
    batches) and departs further from the float32 model: docs/internals.md gives both."""
    global _activations
    if name not in ACTIVATIONS:
        raise BadRequest(f"unknown activation precision {name!r}", f"use one of: {', '.join(ACTIVATIONS)}",
                         param="activations")
    _activations = name


def activations() -> str:
    """The activation precision set now (set_activations): "int16" or "int8"."""
    return _activations


def threads() -> int:
    """The threads the compute runs on in this thread: PyTorch's count (the kernels follow it
    once set_threads was called, and both use the cores otherwise)."""
    return torch.get_num_threads()


def kernel_threads() -> int | None:
    """The threads a parallel region of the kernels would have if started from this thread, or
    None without the kernels."""
    lib = load()
    return None if lib is None else lib.ownlm_get_threads()


def _load() -> ctypes.CDLL | None:
    wanted = mode()
    if wanted == "off":
        return None
    try:
        name = isa()
        try:
            return _open(_build(name))
        except KernelError:
            # by default a compiler without the wider build's flags gets the AVX2 build; required
            # (the tests) or named, the wider build's failure is the error
            if name in ("avx2", "neon") or wanted == "required" or os.environ.get("OWNLM_KERNEL_ISA"):
                raise
            return _open(_build("avx2"))
    except KernelError as e:
        if wanted == "required":
            raise
        if cpu.x86_avx2():  # a CPU that could have them: say why it runs slower
            warnings.warn(f"ownlm's CPU kernels are off: {e}", RuntimeWarning, stacklevel=3)
        return None


def _compiler() -> tuple[str, str]:
    """(path, version text) of the C compiler ($CC, else cc, else gcc)."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise KernelError("no C compiler found", "install gcc, or set CC")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelError(f"the C compiler {cc} does not run: {e}") from e
    return cc, version


def build_key(cc: str, version: str, name: str = "avx2") -> str:
    """What build `name` depends on: the compiler and its version, the flags, the sources."""
    key = hashlib.sha256()
    for part in [cc, version, *flags(name), *((CSRC / f).read_text() for f in (*HEADERS, *SOURCES))]:
        key.update(part.encode() + b"\0")
    return key.hexdigest()[:16]


def _build(name: str) -> Path:
    """The shared object of build `name` for these sources and compiler, built if it is not there
    yet."""
    if not (cpu.x86_avx2() or cpu.arm64()):
        raise KernelError(f"this CPU ({cpu.capability()}) is neither x86-64 with AVX2 nor AArch64, which ownlm's "
                          "kernels need")
    cc, version = _compiler()
    target = kernels_dir() / f"cpu-{build_key(cc, version, name)}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / "kernels.so"
        cmd = [cc, *flags(name), *(str(CSRC / src) for src in SOURCES), "-o", str(out), "-lm"]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            raise KernelError(f"building the CPU kernels failed: {e}") from e
        if run.returncode != 0:
            first = next((ln for ln in run.stderr.splitlines() if "error" in ln), run.stderr.strip()[:300])
            raise KernelError(f"building the CPU kernels failed: {first}", f"command: {' '.join(cmd)}")
        os.replace(out, target)
    return target


def _open(path: Path) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise KernelError(f"the CPU kernels at {path} do not load: {e}") from e
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    signatures = {
        "quant_gemm": [p, i32, i64, i64, p, i64, p, i32],
        "bf16_gemm": [p, i32, i64, i64, p, i64, p, i32],
        "attend_decode": [p, i32, i64, i64, i64, i64, i64, p, p, p, p, i32, p, i64, p, i64, f32, p],
        "rms_norm": [p, i32, i64, i64, p, f32, f32, p],
        "act_mul": [p, i32, i64, i64, i32, p],
        "decode_layers": [p, i32, i64, i64, i64, p, p, p, i64, i64, i64, i64, p, p, p, p, i32, p, i64, p, f32,
                          i32],
    }
    for name, args in signatures.items():
        f = getattr(lib, name)
        f.argtypes, f.restype = args, ctypes.c_int
    lib.ownlm_set_threads.argtypes, lib.ownlm_set_threads.restype = [i32], None
    lib.ownlm_get_threads.argtypes, lib.ownlm_get_threads.restype = [], i32
    lib.layer_layout.argtypes, lib.layer_layout.restype = [p, i64], i64
    ours = ([ctypes.sizeof(Layer), ctypes.sizeof(Part)]
            + [getattr(Part, name).offset for name, _ in Part._fields_]
            + [getattr(Layer, name).offset for name, _ in Layer._fields_])
    theirs = (ctypes.c_int64 * len(ours))()
    count = lib.layer_layout(theirs, len(ours))
    if count != len(ours) or list(theirs) != ours:
        raise KernelError(f"the kernels' layer_t layout {list(theirs)[:count]} differs from its Python mirror "
                          f"{ours}")
    if _threads is not None:
        lib.ownlm_set_threads(_threads)
    return lib


def _call(status: int) -> None:
    if status == ENOMEM:
        raise MemoryError("ownlm's CPU kernels could not allocate their working memory")
    if status:
        raise RuntimeError(f"ownlm's CPU kernels failed (status {status})")


def full() -> bool:
    """Whether the kernels are built here (every one of them: x86-64 and AArch64 alike)."""
    return load() is not None


def usable(x: torch.Tensor) -> bool:
    """Whether ownlm's CPU kernels other than the matmuls (norms, activations, attention) can
    take x here and now: a CPU float32 / bfloat16 tensor, in inference (gradients off: training,
    even of a frozen part, stays on PyTorch's ops), with every kernel built."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and not torch.is_grad_enabled() and full())


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"ownlm's CPU kernels: {what}")


def _floats(x: torch.Tensor) -> bool:
    """x is a contiguous float32 / bfloat16 CPU tensor (what the kernels read and write, 4 or 2
    bytes an element); returns whether it is bfloat16."""
    _need(x.is_contiguous() and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16),
          f"x must be a contiguous float32 or bfloat16 CPU tensor, not {x.dtype} on {x.device.type}")
    return x.dtype == torch.bfloat16


def _rows(x: torch.Tensor) -> bool:
    """x is a contiguous (M, K) float32 / bfloat16 CPU matrix; returns whether it is bfloat16."""
    _need(x.dim() == 2, "x must be an (M, K) matrix")
    return _floats(x)


def check_parts(parts: list[QuantWeight], k: int) -> None:
    """What quant_gemm's C code relies on: every part a consistent group-wise weight of K inputs
    (quant.QuantWeight.check), at most MAX_PARTS of them."""
    _need(0 < len(parts) <= MAX_PARTS, f"a weight of 1 to {MAX_PARTS} parts, not {len(parts)}")
    for w in parts:
        try:
            w.check()
        except ValueError:
            _need(False, "inconsistent quantized weight")
        _need(w.shape[1] == k and all(t.device.type == "cpu" for t in w.tensors().values()),
              f"weight of {w.shape[1]} inputs against x's K of {k}")


def quant_matmul(x: torch.Tensor, parts: QuantWeight | list[QuantWeight]) -> torch.Tensor:
    """x (M, K) @ W.T -> (M, N) in x's dtype, for a group-wise integer weight W in the layout of
    quant.QuantWeight, or several stacked along the outputs. x is rounded per row and group of
    32 to int16 (scale absmax / 32767; or, set_activations("int8"), to int8 against int4 and
    int8 weights: absmax / 127), multiplied in integers and accumulated in float32."""
    xbf = _rows(x)
    parts = [parts] if isinstance(parts, QuantWeight) else list(parts)
    m, k = x.shape
    _need(k > 0 and k % 32 == 0, f"quantized weights need K a positive multiple of 32, not {k}")
    check_parts(parts, k)
    n = sum(w.shape[0] for w in parts)
    y = torch.empty(m, n, dtype=x.dtype)
    if m == 0 or n == 0:
        return y
    table = (Part * len(parts))(*[Part.of(w) for w in parts])
    _call(_lib.quant_gemm(x.data_ptr(), xbf, m, k, table, len(parts), y.data_ptr(), xbf))
    return y


def bf16_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ w.T -> (M, N) in x's dtype for a bfloat16 w (N, K), accumulated in float32."""
    xbf = _rows(x)
    m, k = x.shape
    _need(w.dtype == torch.bfloat16 and w.dim() == 2 and w.shape[1] == k and w.is_contiguous()
          and w.device.type == "cpu", "w must be a contiguous (N, K) bfloat16 CPU matrix")
    n = w.shape[0]
    y = torch.empty(m, n, dtype=x.dtype)
    if m == 0 or n == 0:
        return y
    _call(_lib.bf16_gemm(x.data_ptr(), xbf, m, k, w.data_ptr(), n, y.data_ptr(), xbf))
    return y


def rms_norm(x: torch.Tensor, weight32: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """RMSNorm over the last dimension (see elementwise.c); weight32: float32 (C,)."""
    x = x.contiguous()
    _floats(x)
    c = x.shape[-1]
    _need(weight32.dtype == torch.float32 and weight32.is_contiguous() and tuple(weight32.shape) == (c,),
          f"the norm weight must be float32 ({c},)")
    y = torch.empty_like(x)
    _call(_lib.rms_norm(x.data_ptr(), x.dtype == torch.bfloat16, x.numel() // c if c else 0, c,
                        weight32.data_ptr(), eps, offset, y.data_ptr()))
    return y


def act_mul(x: torch.Tensor, act: int) -> torch.Tensor:
    """act(gate) * up for x = [gate | up] on the last dimension; act 0: SiLU, 1: GeLU (tanh)."""
    x = x.contiguous()
    _floats(x)
    _need(x.shape[-1] % 2 == 0 and act in (0, 1), "act_mul takes [gate | up] rows and act 0 or 1")
    f = x.shape[-1] // 2
    y = x.new_empty(*x.shape[:-1], f)
    _call(_lib.act_mul(x.data_ptr(), x.dtype == torch.bfloat16, x.numel() // (2 * f) if f else 0, f, act,
                       y.data_ptr()))
    return y


# the key/value cache element types attend_decode takes, by its code for them (attention.c's CACHE_*)
CACHE_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def check_attention(batch: int, n_heads: int, n_kv: int, head_dim: int, rot: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor, window: int) -> None:
    """What attend_decode's C code relies on, for `batch` rows of one new token each, row b in
    cache slot slots[b] at position pos[b]: head dim a multiple of 8, grouped heads, (B, R)
    float32 rotations, caches (slots, Hkv, capacity, D) that hold those slots and positions, and
    no two rows writing one slot's position."""
    _need(head_dim > 0 and head_dim % 8 == 0, f"head dim {head_dim} is not a multiple of 8")
    _need(n_kv > 0 and n_heads % n_kv == 0, f"{n_heads} heads cannot share {n_kv} key/value heads")
    r = rot.shape[-1]
    _need(rot.dtype == torch.float32 and tuple(rot.shape) == (batch, r) and r % 2 == 0 and r <= head_dim
          and rot.is_contiguous(), "rotations must be contiguous (B, R) float32, R even and at most the head dim")
    shape = tuple(k_cache.shape)
    _need(k_cache.dim() == 4 and shape[1] == n_kv and shape[3] == head_dim and tuple(v_cache.shape) == shape
          and k_cache.dtype == v_cache.dtype and k_cache.dtype in CACHE_TYPES
          and k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.device.type == "cpu",
          "the key and value caches must be contiguous (slots, Hkv, capacity, D) float32, bfloat16 or float16")
    for t in (slots, pos):
        _need(t.dtype == torch.int64 and tuple(t.shape) == (batch,) and t.is_contiguous() and t.device.type == "cpu",
              "slots and pos must be (B,) int64")
    where = list(zip(slots.tolist(), pos.tolist()))
    _need(all(0 <= s < shape[0] for s, _ in where), f"slots {slots.tolist()} are not all in the cache")
    _need(all(0 <= p < shape[2] for _, p in where),
          f"positions {pos.tolist()} do not fit the cache's capacity {shape[2]}")
    _need(len(set(where)) == len(where), "two rows write the same slot and position")
    _need(window >= 0, "the window must not be negative")


def attend_decode(qkv: torch.Tensor, n_heads: int, n_kv: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor,
                  window: int, scale: float) -> torch.Tensor:
    """One-token attention for B rows (see attention.c). qkv: (B, 1, (H + 2 Hkv) D); cos,
    sin: (B, R) float32; caches (slots, Hkv, cap, D) float32, bfloat16 or float16; slots, pos: (B,) int64
    (row b's cache slot and position) -> (B, 1, H D) in qkv's dtype."""
    b = qkv.shape[0]
    qkv = qkv.contiguous()
    cos, sin, slots, pos = cos.contiguous(), sin.contiguous(), slots.contiguous(), pos.contiguous()
    check_attention(b, n_heads, n_kv, head_dim, cos, k_cache, v_cache, slots, pos, window)
    _need(tuple(sin.shape) == tuple(cos.shape) and sin.dtype == torch.float32, "sin must match cos")
    _need(qkv.dtype in (torch.float32, torch.bfloat16) and tuple(qkv.shape) == (b, 1, (n_heads + 2 * n_kv) * head_dim),
          "qkv must be (B, 1, (H + 2 Hkv) D) float32 or bfloat16")
    out = qkv.new_empty(b, 1, n_heads * head_dim)
    _call(_lib.attend_decode(qkv.data_ptr(), qkv.dtype == torch.bfloat16, b, n_heads, n_kv, head_dim, cos.shape[-1],
                             cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                             CACHE_TYPES[k_cache.dtype], slots.data_ptr(), k_cache.shape[2], pos.data_ptr(),
                             window, scale, out.data_ptr()))
    return out


def decode_layers(x: torch.Tensor, layers: ctypes.Array, keys: ctypes.Array, values: ctypes.Array, shape: tuple,
                  rotations: tuple, cache_type: torch.dtype, slots: torch.Tensor, capacity: int, pos: torch.Tensor,
                  eps: float, act: int) -> None:
    """The whole decode step of len(layers) blocks, x (B, C) updated in place (see decode.c).
    The caller (engine/cpu_step.py) checked the layers when it built them, and the cache, slots
    and positions with check_attention before this call."""
    _need(x.dim() == 2 and x.shape[0] == pos.shape[0], "x must be the (B, C) rows of the step")
    bf = _floats(x)
    h, hkv, d = shape
    cos0, sin0, cos1, sin1 = rotations
    _call(_lib.decode_layers(x.data_ptr(), bf, x.shape[0], x.shape[-1], len(layers),
                             ctypes.byref(layers), keys, values, h, hkv, d, cos0.shape[-1], cos0.data_ptr(),
                             sin0.data_ptr(), cos1.data_ptr(), sin1.data_ptr(), CACHE_TYPES[cache_type],
                             slots.data_ptr(), capacity, pos.data_ptr(), eps, act))

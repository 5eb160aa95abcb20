"""A small-batch CPU matmul for bfloat16 weights (AVX2 + FMA, OpenMP), compiled once with the
system C compiler and loaded with ctypes; without a compiler or AVX2, callers use PyTorch's.

Why: on an AVX2 CPU (no native bf16 arithmetic) PyTorch's bf16 GEMM costs as much per row as a
one-row GEMV, so the output head of a decode step for 8 sequences cost 8x that for one (measured:
~21 ms vs ~2.7 ms for smollm2's 49152 x 576 head). This kernel converts each weight once and
multiplies it with every row (measured: ~9 ms for 8 rows, ~2.5 ms for one). Each output element
is computed by the same sequence of operations whatever the number of rows, so a sequence decodes
to the same bits alone and in a batch. (An int4 variant was measured too: no faster than
PyTorch's int4 kernel here, so it is not kept.)

The shared object is built into OWNLM_HOME/kernels/<hash of the source>.so (atomically: a temp
file, then a rename) and links the libgomp PyTorch has already loaded (same soname)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* y[m, n] = sum_k x[m, k] * w[n, k], w in bfloat16 (N, K). */
void bf16_gemm(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* y) {
    const int64_t K8 = K - K % 8;
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint16_t* wn = w + n * K;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int64_t mb = M - m0 < 4 ? M - m0 : 4;
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int64_t k = 0; k < K8; k += 8) {
                const __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(
                    _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(wn + k))), 16));
                for (int64_t r = 0; r < mb; r++)
                    acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + (m0 + r) * K + k), wv, acc[r]);
            }
            for (int64_t r = 0; r < mb; r++) {
                float v = hsum(acc[r]);
                for (int64_t k = K8; k < K; k++) {
                    uint32_t bits = ((uint32_t)wn[k]) << 16;
                    float wf;
                    __builtin_memcpy(&wf, &bits, 4);
                    v += x[(m0 + r) * K + k] * wf;
                }
                y[(m0 + r) * N + n] = v;
            }
        }
    }
}
"""

_lib = None
_tried = False
_lock = threading.Lock()


def _build_dir() -> Path:
    from ..store.store import home

    return home() / "kernels"


def _cpu_ok() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512", "AVX512_BF16", "AMX")
    except AttributeError:
        return False


def load() -> ctypes.CDLL | None:
    """The compiled kernels, building them on first use; None where they cannot run here
    (not x86 with AVX2, no C compiler, OWNLM_KERNELS=0)."""
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("OWNLM_KERNELS", "1") == "0" or not _cpu_ok():
            return None
        cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
        if cc is None:
            return None
        digest = hashlib.sha256((SOURCE + cc).encode()).hexdigest()[:16]
        target = _build_dir() / f"cpu-{digest}.so"
        try:
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                    src = Path(tmp) / "kernels.c"
                    src.write_text(SOURCE)
                    out = Path(tmp) / "kernels.so"
                    subprocess.run([cc, "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", str(src),
                                    "-o", str(out)], check=True, capture_output=True, timeout=120)
                    os.replace(out, target)
            lib = ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError):
            return None
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.bf16_gemm.argtypes = [p, i64, i64, p, i64, p]
        lib.bf16_gemm.restype = None
        _lib = lib
        return lib


def bf16_matmul(lib, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x: (M, K) float32 contiguous; w: (N, K) bfloat16 contiguous -> (M, N) float32."""
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    lib.bf16_gemm(x.data_ptr(), m, k, w.data_ptr(), n, y.data_ptr())
    return y

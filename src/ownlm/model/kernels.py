"""CPU matmul kernels for int4 / int8 (group-wise) and bfloat16 weights (AVX2 + FMA + F16C,
OpenMP), compiled once with the system C compiler and loaded with ctypes; without a compiler or
AVX2 (or with OWNLM_KERNELS=0), callers use PyTorch instead.

What: group-wise int4 / int8 matmuls (activations rounded to int16 per group of 32, integer
multiply-adds, float32 accumulation), a small-batch bf16 matmul, RMSNorm, the gated activations,
one-token attention with its cache write, and `decode_layers`, which runs a whole decode step of
common-shaped blocks in one call (see fastpath.py).

Why: in eager PyTorch a one-token step is hundreds of small operations whose dispatch costs more
than their arithmetic, PyTorch's int4 kernel wants its own weight layout (a second copy beside
the GGUF's), and on an AVX2 CPU its bf16 GEMM costs as much per row as a one-row GEMV. Measured
here (2 threads), smollm2: the 120 int4 matmuls of one token 6.1 ms (median; 7.0 ms in the
same run with one weight row at a time, 13.4 ms for an earlier float-activation kernel), the
int8 head 1.1 ms (2.7 ms in bf16); decode 97-127 tok/s against llama.cpp's 58-69 in the same
runs. Each output element is computed by the same sequence of
operations whatever the number of rows, so a sequence decodes to the same bits alone and in a
batch.

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
#include <math.h>
#include <stdlib.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = ((uint32_t)h) << 16;
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as PyTorch does */
    uint32_t bits;
    __builtin_memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);  /* NaN stays NaN */
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* x as float32: itself, or a converted copy of a bfloat16 x (the caller frees *owned) */
static const float* as_f32(const void* x, int64_t n, int bf16, float** owned) {
    *owned = 0;
    if (!bf16) return (const float*)x;
    float* f = (float*)malloc((size_t)n * sizeof(float));
    const uint16_t* h = (const uint16_t*)x;
    for (int64_t i = 0; i < n; i++) f[i] = bf16_to_f32(h[i]);
    *owned = f;
    return f;
}

static inline void store(void* y, int64_t i, float v, int bf16) {
    if (bf16) ((uint16_t*)y)[i] = f32_to_bf16(v);
    else ((float*)y)[i] = v;
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Activations as int16 blocks of 32 (what the integer dot products take): per row and block a
   scale d = absmax / 32767, values round(x / d) (an error of at most 2^-16 of the block's absmax,
   below bfloat16's rounding), and the exact float sum of the block's x (for the int4 offsets).
   Row m's result depends on row m alone. */
static void quantize_rows(const float* x, int64_t M, int64_t K, int16_t* xq, float* xd, float* xs) {
    const int64_t G = K / 32;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    #pragma omp parallel for schedule(static) if (M * K >= 65536)
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < G; g++) {
            const float* p = x + m * K + g * 32;
            __m256 v[4];
            for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(p + 8 * i);
            __m256 amax = _mm256_andnot_ps(sign, v[0]);
            for (int i = 1; i < 4; i++) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
            const float a = hmax(amax);
            const __m256 id = _mm256_set1_ps(a > 0.f ? 32767.f / a : 0.f);
            __m256i i32[4];
            for (int i = 0; i < 4; i++) i32[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], id));
            /* packs interleaves 128-bit lanes: fix the order back to 0..15, 16..31 */
            const __m256i lo = _mm256_permute4x64_epi64(_mm256_packs_epi32(i32[0], i32[1]), 0xD8);
            const __m256i hi = _mm256_permute4x64_epi64(_mm256_packs_epi32(i32[2], i32[3]), 0xD8);
            _mm256_storeu_si256((__m256i*)(xq + m * K + g * 32), lo);
            _mm256_storeu_si256((__m256i*)(xq + m * K + g * 32 + 16), hi);
            xd[m * G + g] = a / 32767.f;
            xs[m * G + g] = hsum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
        }
}

/* Row r's part of weight row n that does not depend on the group loop: the group factors
   s[g] xd[r, g] (into sx) and the int4 offset term sum_g o[g] xs[r, g] (returned), 8 groups at a
   time. bits 4: w = q * s + o (q 0..15, two per byte: byte i holds q[i] and q[16 + i]; no
   offsets: o = -8 s); bits 8: w = q * s (q int8). */
static inline __attribute__((always_inline)) float row_factors(const float* xd, const float* xs, int64_t G,
        const uint16_t* sn, const uint16_t* on, int bits, float* sx) {
    const int64_t G8 = G - G % 8;
    __m256 ov = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g < G8; g += 8) {
        const __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sn + g)));
        _mm256_storeu_ps(sx + g, _mm256_mul_ps(sv, _mm256_loadu_ps(xd + g)));
        if (bits == 4) {  /* no offsets stored: symmetric, o = -8 s (GGUF's Q4_0) */
            const __m256 ow = on ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(on + g)))
                                 : _mm256_mul_ps(sv, _mm256_set1_ps(-8.f));
            ov = _mm256_fmadd_ps(ow, _mm256_loadu_ps(xs + g), ov);
        }
    }
    float ot = hsum(ov);
    for (; g < G; g++) {
        sx[g] = _cvtsh_ss(sn[g]) * xd[g];
        if (bits == 4) ot += (on ? _cvtsh_ss(on[g]) : -8.f * _cvtsh_ss(sn[g])) * xs[g];
    }
    return bits == 4 ? ot : 0.f;
}

/* Group g of a weight row as two vectors of 16 int16 */
static inline __attribute__((always_inline)) void unpack_group(const uint8_t* wn, int64_t g, int bits,
        __m256i* w0, __m256i* w1) {
    if (bits == 4) {
        const __m128i mask = _mm_set1_epi8(0x0F);
        const __m128i b = _mm_loadu_si128((const __m128i*)(wn + g * 16));
        *w0 = _mm256_cvtepu8_epi16(_mm_and_si128(b, mask));
        *w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), mask));
    } else {
        *w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(wn + g * 32)));
        *w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(wn + g * 32 + 16)));
    }
}

/* One group's integer dot product (exact: |sums| < 2^24), scaled by its factor into acc */
static inline __attribute__((always_inline)) __m256 group_step(__m256i w0, __m256i w1, __m256i x0, __m256i x1,
        const float* factor, __m256 acc) {
    const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(factor), acc);
}

/* MB activation rows against weight row n (see row_factors): each row's integer group dot
   products are scaled and accumulated in registers, one chain per output, then summed with the
   offset term. Every output's arithmetic is the same whatever MB (a constant at each call), and
   the same as in ncols below, so its bits do not depend on the batch. */
static inline __attribute__((always_inline)) void qrows(const int16_t* xq, const float* xd, const float* xs,
        int64_t K, const uint8_t* wn, const uint16_t* sn, const uint16_t* on, int bits, float* sx, float* out,
        const int MB) {
    const int64_t G = K / 32;
    __m256 acc[8];
    float oacc[8];
    for (int r = 0; r < MB; r++) {
        oacc[r] = row_factors(xd + r * G, xs + r * G, G, sn, on, bits, sx + r * G);
        acc[r] = _mm256_setzero_ps();
    }
    for (int64_t g = 0; g < G; g++) {
        __m256i w0, w1;
        unpack_group(wn, g, bits, &w0, &w1);
        for (int r = 0; r < MB; r++) {
            const int16_t* xr = xq + r * K + g * 32;
            acc[r] = group_step(w0, w1, _mm256_loadu_si256((const __m256i*)xr),
                                _mm256_loadu_si256((const __m256i*)(xr + 16)), sx + r * G + g, acc[r]);
        }
    }
    for (int r = 0; r < MB; r++) out[r] = hsum(acc[r]) + oacc[r];
}

/* One activation row against NB consecutive weight rows: the same arithmetic per output as
   qrows, with NB independent accumulation chains in flight (one chain alone waits on each
   multiply-add's latency) and the activations loaded once for all of them. */
static inline __attribute__((always_inline)) void ncols(const int16_t* xq, const float* xd, const float* xs,
        int64_t K, const uint8_t* w, int64_t rb, const uint16_t* s, const uint16_t* o, int bits, float* sx,
        float* out, const int NB) {
    const int64_t G = K / 32;
    __m256 acc[4];
    float oacc[4];
    for (int j = 0; j < NB; j++) {
        oacc[j] = row_factors(xd, xs, G, s + j * G, o ? o + j * G : 0, bits, sx + j * G);
        acc[j] = _mm256_setzero_ps();
    }
    const int64_t gb = bits == 4 ? 16 : 32;  /* bytes per group */
    for (int64_t g = 0; g < G; g++) {
        /* the rows are short: stream the next NB rows in at the pace these are read (interleaved
           rows defeat the hardware's stream detection) */
        const char* next = (const char*)(w + NB * rb) + g * NB * gb;
        for (int64_t b = 0; b < NB * gb; b += 64) _mm_prefetch(next + b, _MM_HINT_T0);
        const __m256i x0 = _mm256_loadu_si256((const __m256i*)(xq + g * 32));
        const __m256i x1 = _mm256_loadu_si256((const __m256i*)(xq + g * 32 + 16));
        for (int j = 0; j < NB; j++) {
            __m256i w0, w1;
            unpack_group(w + j * rb, g, bits, &w0, &w1);
            acc[j] = group_step(w0, w1, x0, x1, sx + j * G + g, acc[j]);
        }
    }
    for (int j = 0; j < NB; j++) out[j] = hsum(acc[j]) + oacc[j];
}

/* y (M, N) = x (M, K) @ W.T for group-wise int4 or int8 weights W (N rows of K / 32 groups):
   w: the packed rows (K / 2 or K bytes each), s, o: (N, K / 32) float16 scales and int4 offsets.
   One row (a decode step): weight rows 4 at a time. More rows: in tiles of 64 (their int16
   copy stays in cache), 8 at a time against each weight row, so a weight row is read once per 8
   rows. */
void quant_gemm(const void* xin, int xbf, int64_t M, int64_t K, const uint8_t* w, const uint16_t* s,
                const uint16_t* o, int bits, int64_t N, void* y, int ybf) {
    const int64_t G = K / 32;
    const int64_t rb = bits == 4 ? K / 2 : K;
    float* owned;
    const float* x = as_f32(xin, M * K, xbf, &owned);
    int16_t* xq = (int16_t*)malloc((size_t)(M * K) * sizeof(int16_t));
    float* xd = (float*)malloc((size_t)(M * G) * sizeof(float));
    float* xs = (float*)malloc((size_t)(M * G) * sizeof(float));
    quantize_rows(x, M, K, xq, xd, xs);
    if (M == 1) {
        #pragma omp parallel
        {
            float* sx = (float*)malloc((size_t)(4 * G) * sizeof(float));
            #pragma omp for schedule(static)
            for (int64_t nb = 0; nb < (N + 3) / 4; nb++) {
                const int64_t n = nb * 4;
                const uint16_t* on = bits == 4 && o ? o + n * G : 0;
                float out[4];
                if (N - n >= 4) {  /* constant bits: each instantiation branch-free */
                    if (bits == 4) ncols(xq, xd, xs, K, w + n * rb, rb, s + n * G, on, 4, sx, out, 4);
                    else ncols(xq, xd, xs, K, w + n * rb, rb, s + n * G, on, 8, sx, out, 4);
                    for (int j = 0; j < 4; j++) store(y, n + j, out[j], ybf);
                } else {
                    for (int64_t j = n; j < N; j++) {
                        ncols(xq, xd, xs, K, w + j * rb, rb, s + j * G, bits == 4 && o ? o + j * G : 0, bits, sx,
                              out, 1);
                        store(y, j, out[0], ybf);
                    }
                }
            }
            free(sx);
        }
    } else {
        for (int64_t m0 = 0; m0 < M; m0 += 64) {
            const int64_t m1 = M < m0 + 64 ? M : m0 + 64;
            #pragma omp parallel
            {
                float* sx = (float*)malloc((size_t)(8 * G) * sizeof(float));
                #pragma omp for schedule(static)
                for (int64_t n = 0; n < N; n++) {
                    const uint8_t* wn = w + n * rb;
                    const uint16_t* sn = s + n * G;
                    const uint16_t* on = bits == 4 && o ? o + n * G : 0;
                    float out[8];
                    for (int64_t m = m0; m < m1; ) {
                        const int64_t left = m1 - m;
                        const int mb = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
                        const int16_t* xr = xq + m * K;
                        if (mb == 8) qrows(xr, xd + m * G, xs + m * G, K, wn, sn, on, bits, sx, out, 8);
                        else if (mb == 4) qrows(xr, xd + m * G, xs + m * G, K, wn, sn, on, bits, sx, out, 4);
                        else if (mb == 2) qrows(xr, xd + m * G, xs + m * G, K, wn, sn, on, bits, sx, out, 2);
                        else qrows(xr, xd + m * G, xs + m * G, K, wn, sn, on, bits, sx, out, 1);
                        for (int r = 0; r < mb; r++) store(y, (m + r) * N + n, out[r], ybf);
                        m += mb;
                    }
                }
                free(sx);
            }
        }
    }
    free(xq);
    free(xd);
    free(xs);
    free(owned);
}

static inline __attribute__((always_inline)) void bf16_rows(const float* x, int64_t K, const uint16_t* wn,
        void* y, int64_t yi, int64_t N, int ybf, const int MB) {
    const int64_t K8 = K - K % 8;
    __m256 acc[8];
    for (int r = 0; r < MB; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) {
        const __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(wn + k))), 16));
        for (int r = 0; r < MB; r++) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + k), wv, acc[r]);
    }
    for (int r = 0; r < MB; r++) {
        float v = hsum(acc[r]);
        for (int64_t k = K8; k < K; k++) v += x[r * K + k] * bf16_to_f32(wn[k]);
        store(y, yi + r * N, v, ybf);
    }
}

void bf16_gemm(const void* xin, int xbf, int64_t M, int64_t K, const uint16_t* w, int64_t N, void* y, int ybf) {
    float* owned;
    const float* x = as_f32(xin, M * K, xbf, &owned);
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint16_t* wn = w + n * K;
        int64_t m = 0;
        for (; m + 8 <= M; m += 8) bf16_rows(x + m * K, K, wn, y, m * N + n, N, ybf, 8);
        for (; m + 4 <= M; m += 4) bf16_rows(x + m * K, K, wn, y, m * N + n, N, ybf, 4);
        for (; m + 2 <= M; m += 2) bf16_rows(x + m * K, K, wn, y, m * N + n, N, ybf, 2);
        for (; m < M; m += 1) bf16_rows(x + m * K, K, wn, y, m * N + n, N, ybf, 1);
    }
    free(owned);
}

static inline float load_x(const void* x, int64_t i, int bf) {
    return bf ? bf16_to_f32(((const uint16_t*)x)[i]) : ((const float*)x)[i];
}

/* float rounded as the compute dtype rounds it (bfloat16 or none) */
static inline float round_as(float v, int bf) { return bf ? bf16_to_f32(f32_to_bf16(v)) : v; }

/* exp(x) for x <= 0 (softmax after subtracting the max): 2^n * p(r), r in [-ln2/2, ln2/2], degree-6
   polynomial; relative error ~1e-7; inputs below -87 give 0 */
static inline __m256 exp_neg(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* the sums of 8 vectors' lanes, as one vector [sum a0, ..., sum a7] */
static inline __m256 hsum8(const __m256* a) {
    const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

/* a rotated (half-rotated layout over the first R dims) head vector, rounded as the compute
   dtype rounds, times `mul` */
static inline void rotate(const void* qkv, int64_t off, int bf, int64_t D, int64_t R, const float* c, const float* s,
                          float mul, float* out) {
    const int64_t half = R / 2;
    for (int64_t d = 0; d < D; d++) {
        float v = load_x(qkv, off + d, bf);
        if (d < R) {
            const float other = d < half ? -load_x(qkv, off + d + half, bf) : load_x(qkv, off + d - half, bf);
            v = round_as(v * c[d] + other * s[d], bf);
        }
        out[d] = v * mul;
    }
}

/* 8 floats from element i of a float32 or (cbf) bfloat16 array */
static inline __m256 load8(const void* p, int64_t i, int cbf) {
    if (!cbf) return _mm256_loadu_ps((const float*)p + i);
    const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)p + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* One decode step of attention for B sequences, one new token each.
   qkv: (B, (H + 2 Hkv) D), the fused projection's output (float32, or bfloat16 with bf = 1),
   D a multiple of 8; cos, sin: (B, R) float32 for the half-rotated layout over the first R dims
   (R = 0: none); kc, vc: caches (slots, Hkv, cap, D), float32 or (cbf = 1) bfloat16, sequence b
   in slot slot0 + b;
   pos: (B,) int64. Rotates q and k (rounded to the compute dtype, as the prefill path stores
   them), writes k and v at pos, then each query head attends over keys max(0, pos - window + 1)
   .. pos (window 0: all). A sequence's arithmetic depends on itself alone. out: (B, H D) in
   qkv's dtype. */
void attend_decode(const void* qkv, int bf, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t R,
                   const float* cos, const float* sin, void* kc, void* vc, int cbf, int64_t slot0, int64_t cap,
                   const int64_t* pos, int64_t window, float scale, void* out) {
    const int64_t rep = H / Hkv, width = (H + 2 * Hkv) * D;
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < B * Hkv; t++) {  /* the new keys and values into the cache */
            const int64_t b = t / Hkv, g = t % Hkv, p = pos[b];
            const int64_t row = (((slot0 + b) * Hkv + g) * cap + p) * D;
            float* k = (float*)malloc((size_t)D * sizeof(float));
            rotate(qkv, b * width + (H + g) * D, bf, D, R, cos + b * R, sin + b * R, 1.f, k);
            for (int64_t d = 0; d < D; d++) {
                store(kc, row + d, k[d], cbf);
                store(vc, row + d, load_x(qkv, b * width + (H + Hkv + g) * D + d, bf), cbf);
            }
            free(k);
        }
        float* q = (float*)malloc((size_t)D * sizeof(float));
        float* w = 0;
        int64_t w_size = 0;
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < B * H; t++) {
            const int64_t b = t / H, h = t % H, g = h / rep, p = pos[b];
            const int64_t lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
            const int64_t n = p - lo + 1;
            const int64_t first = (((slot0 + b) * Hkv + g) * cap + lo) * D;  /* element index of key lo */
            if (n > w_size) { free(w); w_size = n; w = (float*)malloc((size_t)(n + 8) * sizeof(float)); }
            rotate(qkv, b * width + h * D, bf, D, R, cos + b * R, sin + b * R, scale, q);
            /* scores, 8 keys at a time */
            __m256 vmax = _mm256_set1_ps(-INFINITY);
            int64_t j = 0;
            for (; j + 8 <= n; j += 8) {
                __m256 acc[8];
                for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
                for (int64_t d = 0; d < D; d += 8) {
                    const __m256 qv = _mm256_loadu_ps(q + d);
                    for (int i = 0; i < 8; i++) acc[i] = _mm256_fmadd_ps(qv, load8(kc, first + (j + i) * D + d, cbf), acc[i]);
                }
                const __m256 sc = hsum8(acc);
                _mm256_storeu_ps(w + j, sc);
                vmax = _mm256_max_ps(vmax, sc);
            }
            float mx = hmax(vmax);
            for (; j < n; j++) {
                __m256 acc = _mm256_setzero_ps();
                for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(kc, first + j * D + d, cbf), acc);
                w[j] = hsum(acc);
                mx = w[j] > mx ? w[j] : mx;
            }
            /* softmax weights (unnormalized) */
            const __m256 vmx = _mm256_set1_ps(mx);
            __m256 vsum = _mm256_setzero_ps();
            for (int64_t i = n; i < n + 8; i++) w[i] = -INFINITY;  /* padding: exp gives 0 */
            for (j = 0; j < n; j += 8) {
                const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(w + j), vmx));
                _mm256_storeu_ps(w + j, e);
                vsum = _mm256_add_ps(vsum, e);
            }
            const float inv = 1.f / hsum(vsum);
            /* weighted values, 64 dims at a time in registers */
            for (int64_t d0 = 0; d0 < D; d0 += 64) {
                const int64_t nd = D - d0 < 64 ? (D - d0) / 8 : 8;
                __m256 acc[8];
                for (int c = 0; c < 8; c++) acc[c] = _mm256_setzero_ps();
                for (j = 0; j < n; j++) {
                    const __m256 wj = _mm256_broadcast_ss(w + j);
                    const int64_t vr = first + j * D + d0;
                    for (int c = 0; c < nd; c++) acc[c] = _mm256_fmadd_ps(wj, load8(vc, vr + 8 * c, cbf), acc[c]);
                }
                for (int c = 0; c < nd; c++)
                    for (int e = 0; e < 8; e++)
                        store(out, b * H * D + h * D + d0 + 8 * c + e, ((float*)&acc[c])[e] * inv, bf);
            }
        }
        free(q);
        free(w);
    }
}

/* RMSNorm of M rows of C: y = round(x / rms(x)) * w (offset 0), or x / rms(x) * (offset + w)
   (Gemma), in float32, each result rounded to the compute dtype as PyTorch's ops would */
void rms_norm(const void* x, int bf, int64_t M, int64_t C, const float* w, float eps, float offset, void* y) {
    #pragma omp parallel for schedule(static) if (M >= 64)
    for (int64_t m = 0; m < M; m++) {
        float ss = 0.f;
        for (int64_t c = 0; c < C; c++) { const float v = load_x(x, m * C + c, bf); ss += v * v; }
        const float r = 1.f / sqrtf(ss / (float)C + eps);
        for (int64_t c = 0; c < C; c++) {
            const float h = load_x(x, m * C + c, bf) * r;
            store(y, m * C + c, offset != 0.f ? h * (offset + w[c]) : round_as(h, bf) * w[c], bf);
        }
    }
}

/* y (M, F) = act(gate) * up for x (M, 2F) = [gate | up]: act 0 SiLU, 1 GeLU (tanh form) */
void act_mul(const void* x, int bf, int64_t M, int64_t F, int act, void* y) {
    #pragma omp parallel for schedule(static) if (M >= 64)
    for (int64_t m = 0; m < M; m++)
        for (int64_t f = 0; f < F; f++) {
            const float g = load_x(x, m * 2 * F + f, bf), u = load_x(x, m * 2 * F + F + f, bf);
            const float a = act == 0 ? g / (1.f + expf(-g))
                                     : 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
            store(y, m * F + f, round_as(a, bf) * u, bf);
        }
}

/* One layer's weights for decode_layers: the four projections (qkv, o, gate_up, down) as
   group-wise int4 / int8 (w, s, o as quant_gemm takes them; bias float32 or null), the RMSNorm
   weights (float32; all with one offset): before attention and MLP, optional per-head q / k
   norms and optional norms of the attention and MLP outputs (null: none), the layer's window and
   attention scale. */
typedef struct {
    const uint8_t* w[4];
    const uint16_t* s[4];
    const uint16_t* o[4];
    const float* bias[4];
    int64_t bits[4];
    int64_t n[4];
    int64_t k[4];
    const float* norm1;
    const float* norm2;
    const float* q_norm;
    const float* k_norm;
    const float* post1;
    const float* post2;
    int64_t window;
    int64_t local;
    float scale;
    float norm_offset;
} layer_t;

static void add_bias(void* y, int bf, int64_t M, int64_t N, const float* b) {
    if (!b) return;
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) store(y, m * N + n, load_x(y, m * N + n, bf) + b[n], bf);
}

static void add_into(void* x, const void* a, int bf, int64_t n) {
    for (int64_t i = 0; i < n; i++) store(x, i, load_x(x, i, bf) + load_x(a, i, bf), bf);
}

/* The decode step of L pre-norm blocks (RMSNorm, attention, RMSNorm, gated MLP, sequential
   residuals; optionally qk-norms and post-norms) for B sequences of one token, x (B, C) updated
   in place: the same kernels, in the same order and with the same roundings as the modules' own
   forward on a CPU, in one call. cos0/sin0: the rotation of global layers, cos1/sin1 of local
   ones, (B, R) each. kcs, vcs: each layer's key and value cache. act: 0 SiLU, 1 GeLU (tanh). */
void decode_layers(void* x, int bf, int64_t B, int64_t C, int64_t L, const layer_t* layers, void* const* kcs,
                   void* const* vcs, int64_t H,
                   int64_t Hkv, int64_t D, int64_t R, const float* cos0, const float* sin0, const float* cos1,
                   const float* sin1, int cbf, int64_t slot0, int64_t cap, const int64_t* pos, float eps, int act) {
    const int64_t es = bf ? 2 : 4;
    int64_t widest = C;
    for (int64_t l = 0; l < L; l++)
        for (int i = 0; i < 4; i++) widest = layers[l].n[i] > widest ? layers[l].n[i] : widest;
    char* h = (char*)malloc((size_t)(B * C * es));
    char* big = (char*)malloc((size_t)(B * widest * es));
    char* mid = (char*)malloc((size_t)(B * widest * es));
    for (int64_t l = 0; l < L; l++) {
        const layer_t* ly = layers + l;
        rms_norm(x, bf, B, C, ly->norm1, eps, ly->norm_offset, h);
        quant_gemm(h, bf, B, ly->k[0], ly->w[0], ly->s[0], ly->o[0], (int)ly->bits[0], ly->n[0], big, bf);
        add_bias(big, bf, B, ly->n[0], ly->bias[0]);
        for (int64_t b = 0; ly->q_norm && b < B; b++) {  /* per head, in place: q heads, then k heads */
            char* row = big + b * ly->n[0] * es;
            rms_norm(row, bf, H, D, ly->q_norm, eps, ly->norm_offset, row);
            rms_norm(row + H * D * es, bf, Hkv, D, ly->k_norm, eps, ly->norm_offset, row + H * D * es);
        }
        attend_decode(big, bf, B, H, Hkv, D, R, ly->local ? cos1 : cos0, ly->local ? sin1 : sin0, kcs[l], vcs[l],
                      cbf, slot0, cap, pos, ly->window, ly->scale, mid);
        quant_gemm(mid, bf, B, ly->k[1], ly->w[1], ly->s[1], ly->o[1], (int)ly->bits[1], ly->n[1], h, bf);
        add_bias(h, bf, B, ly->n[1], ly->bias[1]);
        if (ly->post1) rms_norm(h, bf, B, C, ly->post1, eps, ly->norm_offset, h);
        add_into(x, h, bf, B * C);
        rms_norm(x, bf, B, C, ly->norm2, eps, ly->norm_offset, h);
        quant_gemm(h, bf, B, ly->k[2], ly->w[2], ly->s[2], ly->o[2], (int)ly->bits[2], ly->n[2], big, bf);
        add_bias(big, bf, B, ly->n[2], ly->bias[2]);
        act_mul(big, bf, B, ly->n[2] / 2, act, mid);
        quant_gemm(mid, bf, B, ly->k[3], ly->w[3], ly->s[3], ly->o[3], (int)ly->bits[3], ly->n[3], h, bf);
        add_bias(h, bf, B, ly->n[3], ly->bias[3]);
        if (ly->post2) rms_norm(h, bf, B, C, ly->post2, eps, ly->norm_offset, h);
        add_into(x, h, bf, B * C);
    }
    free(h);
    free(big);
    free(mid);
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
    (not x86 with AVX2, no C compiler, OWNLM_KERNELS=0). After the first call, a lock-free read
    (it is asked on every kernel-eligible operation)."""
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                _lib = _build()
                _tried = True  # set after _lib: a reader that sees it sees the library
    return _lib


def _build() -> ctypes.CDLL | None:
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
                flags = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
                subprocess.run([cc, *flags, str(src), "-o", str(out), "-lm"], check=True, capture_output=True,
                               timeout=120)
                os.replace(out, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    i32 = ctypes.c_int
    lib.quant_gemm.argtypes = [p, i32, i64, i64, p, p, p, i32, i64, p, i32]
    lib.bf16_gemm.argtypes = [p, i32, i64, i64, p, i64, p, i32]
    f32 = ctypes.c_float
    lib.attend_decode.argtypes = [p, i32, i64, i64, i64, i64, i64, p, p, p, p, i32, i64, i64, p, i64, f32, p]
    lib.rms_norm.argtypes = [p, i32, i64, i64, p, f32, f32, p]
    lib.act_mul.argtypes = [p, i32, i64, i64, i32, p]
    lib.decode_layers.argtypes = [p, i32, i64, i64, i64, p, p, p, i64, i64, i64, i64, p, p, p, p, i32, i64, i64, p, f32,
                                  i32]
    for f in (lib.quant_gemm, lib.bf16_gemm, lib.attend_decode, lib.rms_norm, lib.act_mul, lib.decode_layers):
        f.restype = None
    return lib


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K/2) bytes: per group of 32, byte i = q[i] | q[16 + i] << 4
    (GGUF's Q4_0 / Q4_1 order, so their blocks' bytes are used as they are)."""
    n, k = q.shape
    g = q.to(torch.uint8).reshape(n, k // 32, 2, 16)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: (N, K/2) bytes -> (N, K) uint8 values 0..15."""
    n = packed.shape[0]
    g = packed.reshape(n, -1, 16)
    return torch.stack([g & 15, g >> 4], dim=2).reshape(n, -1)


def _check(x: torch.Tensor) -> bool:
    if x.dtype not in (torch.float32, torch.bfloat16) or x.dim() != 2 or not x.is_contiguous():
        raise ValueError("kernels take a contiguous (M, K) float32 or bfloat16 x")
    return x.dtype == torch.bfloat16


def quant_matmul(lib, x: torch.Tensor, bits: int, data: torch.Tensor, scale: torch.Tensor,
                 offset: torch.Tensor | None) -> torch.Tensor:
    """x: (M, K) float32 or bfloat16, contiguous, K a multiple of 32 -> (M, N) in x's dtype.
    Weights in groups of 32 inputs: bits=4: data (N, K/2) uint8 (pack_int4), w = q * scale + offset
    (offset None: -8 * scale);
    bits=8: data (N, K) int8, w = q * scale; scale, offset (N, K/32) float16. x is rounded per
    row and group to int16 (scale absmax / 32767) and multiplied in integers, accumulated in
    float32."""
    xbf = _check(x)
    m, k = x.shape
    n = data.shape[0]
    if k % 32 or scale.dtype != torch.float16 or scale.shape != (n, k // 32):
        raise ValueError("quant_matmul: K must be a multiple of 32 and scales (N, K/32) float16")
    y = torch.empty(m, n, dtype=x.dtype)
    lib.quant_gemm(x.data_ptr(), xbf, m, k, data.data_ptr(), scale.data_ptr(),
                   offset.data_ptr() if offset is not None else None, bits, n, y.data_ptr(), xbf)
    return y


def bf16_matmul(lib, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x: (M, K) float32 or bfloat16, contiguous; w: (N, K) bfloat16 contiguous -> (M, N) in x's
    dtype (accumulated in float32)."""
    xbf = _check(x)
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=x.dtype)
    lib.bf16_gemm(x.data_ptr(), xbf, m, k, w.data_ptr(), n, y.data_ptr(), xbf)
    return y


def usable(x: torch.Tensor) -> bool:
    """Whether ownlm's CPU kernels can take x here and now: a CPU float32 / bfloat16 tensor, in
    inference (gradients off: training, even of a frozen part, stays on PyTorch's ops), with the
    kernels built."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and not torch.is_grad_enabled() and load() is not None)


def rms_norm(x: torch.Tensor, weight32: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """RMSNorm over the last dimension (see rms_norm in SOURCE); weight32: float32 (C,)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    c = x.shape[-1]
    _lib.rms_norm(x.data_ptr(), x.dtype == torch.bfloat16, x.numel() // c, c, weight32.data_ptr(), eps, offset,
                  y.data_ptr())
    return y


def act_mul(x: torch.Tensor, act: int) -> torch.Tensor:
    """act(gate) * up for x = [gate | up] on the last dimension; act 0: SiLU, 1: GeLU (tanh)."""
    x = x.contiguous()
    f = x.shape[-1] // 2
    y = x.new_empty(*x.shape[:-1], f)
    _lib.act_mul(x.data_ptr(), x.dtype == torch.bfloat16, x.numel() // (2 * f), f, act, y.data_ptr())
    return y


def attend_decode(qkv: torch.Tensor, n_heads: int, n_kv: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slot0: int, pos: torch.Tensor, window: int,
                  scale: float) -> torch.Tensor:
    """One-token attention for B sequences (see attend_decode in SOURCE). qkv: (B, 1, W); cos,
    sin: (B, R) float32; caches (slots, Hkv, cap, D) float32 or bfloat16; pos: (B,) int64 -> (B, 1, H D)."""
    b = qkv.shape[0]
    qkv = qkv.contiguous()
    cos, sin, pos = cos.contiguous(), sin.contiguous(), pos.contiguous()
    out = qkv.new_empty(b, 1, n_heads * head_dim)
    _lib.attend_decode(qkv.data_ptr(), qkv.dtype == torch.bfloat16, b, n_heads, n_kv, head_dim, cos.shape[-1],
                       cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                       k_cache.dtype == torch.bfloat16, slot0,
                       k_cache.shape[2], pos.data_ptr(), window, scale, out.data_ptr())
    return out


class Layer(ctypes.Structure):
    """decode_layers' layer_t (see SOURCE)."""
    _fields_ = [("w", ctypes.c_void_p * 4), ("s", ctypes.c_void_p * 4), ("o", ctypes.c_void_p * 4),
                ("bias", ctypes.c_void_p * 4), ("bits", ctypes.c_int64 * 4), ("n", ctypes.c_int64 * 4),
                ("k", ctypes.c_int64 * 4), ("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p),
                ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p), ("post1", ctypes.c_void_p),
                ("post2", ctypes.c_void_p), ("window", ctypes.c_int64),
                ("local", ctypes.c_int64), ("scale", ctypes.c_float), ("norm_offset", ctypes.c_float)]

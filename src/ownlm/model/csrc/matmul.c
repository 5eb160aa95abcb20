/* Matmuls: group-wise int4 / int8 weights against float activations rounded to int16, and
   bfloat16 weights against float activations. Each output element is computed by the same
   sequence of operations whatever the number of rows, so a sequence decodes to the same bits
   alone and in a batch. */

#include "kernels.h"

/* x as float32: itself, or a converted copy of a bfloat16 x (the caller frees *owned); NULL when
   the copy cannot be allocated */
static const float* as_f32(const void* x, int64_t n, int bf16, float** owned) {
    *owned = 0;
    if (!bf16) return (const float*)x;
    float* f = (float*)malloc((size_t)n * sizeof(float));
    if (!f) return 0;
    const uint16_t* h = (const uint16_t*)x;
    for (int64_t i = 0; i < n; i++) f[i] = bf16_to_f32(h[i]);
    *owned = f;
    return f;
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
int quant_gemm(const void* xin, int xbf, int64_t M, int64_t K, const uint8_t* w, const uint16_t* s,
               const uint16_t* o, int bits, int64_t N, void* y, int ybf) {
    use_threads();
    const int64_t G = K / 32;
    const int64_t rb = bits == 4 ? K / 2 : K;
    float* owned;
    const float* x = as_f32(xin, M * K, xbf, &owned);
    int16_t* xq = (int16_t*)malloc((size_t)(M * K) * sizeof(int16_t));
    float* xd = (float*)malloc((size_t)(M * G) * sizeof(float));
    float* xs = (float*)malloc((size_t)(M * G) * sizeof(float));
    int failed = !x || !xq || !xd || !xs;
    if (!failed) quantize_rows(x, M, K, xq, xd, xs);
    if (!failed && M == 1) {
        #pragma omp parallel
        {
            float* sx = scratch(4 * G, &failed);
            #pragma omp for schedule(static)
            for (int64_t nb = 0; nb < (N + 3) / 4; nb++) {
                if (!sx) continue;
                const int64_t n = nb * 4;
                const uint16_t* on = bits == 4 && o ? o + n * G : 0;
                float out[4];
                if (N - n >= 4) { /* constant bits: each instantiation branch-free */
                    if (bits == 4)
                        ncols(xq, xd, xs, K, w + n * rb, rb, s + n * G, on, 4, sx, out, 4);
                    else
                        ncols(xq, xd, xs, K, w + n * rb, rb, s + n * G, on, 8, sx, out, 4);
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
    } else if (!failed) {
        for (int64_t m0 = 0; m0 < M; m0 += 64) {
            const int64_t m1 = M < m0 + 64 ? M : m0 + 64;
            #pragma omp parallel
            {
                float* sx = scratch(8 * G, &failed);
                #pragma omp for schedule(static)
                for (int64_t n = 0; n < N; n++) {
                    if (!sx) continue;
                    const uint8_t* wn = w + n * rb;
                    const uint16_t* sn = s + n * G;
                    const uint16_t* on = bits == 4 && o ? o + n * G : 0;
                    float out[8];
                    for (int64_t m = m0; m < m1;) {
                        const int64_t left = m1 - m;
                        const int mb = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
                        const int16_t* xr = xq + m * K;
                        if (mb == 8)
                            qrows(xr, xd + m * G, xs + m * G, K, wn, sn, on, bits, sx, out, 8);
                        else if (mb == 4)
                            qrows(xr, xd + m * G, xs + m * G, K, wn, sn, on, bits, sx, out, 4);
                        else if (mb == 2)
                            qrows(xr, xd + m * G, xs + m * G, K, wn, sn, on, bits, sx, out, 2);
                        else
                            qrows(xr, xd + m * G, xs + m * G, K, wn, sn, on, bits, sx, out, 1);
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
    return failed ? OWNLM_ENOMEM : 0;
}

static inline __attribute__((always_inline)) void bf16_rows(const float* x, int64_t K, const uint16_t* wn, void* y,
                                                            int64_t yi, int64_t N, int ybf, const int MB) {
    const int64_t K8 = K - K % 8;
    __m256 acc[8];
    for (int r = 0; r < MB; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) {
        const __m256 wv = _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(wn + k))), 16));
        for (int r = 0; r < MB; r++) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + k), wv, acc[r]);
    }
    for (int r = 0; r < MB; r++) {
        float v = hsum(acc[r]);
        for (int64_t k = K8; k < K; k++) v += x[r * K + k] * bf16_to_f32(wn[k]);
        store(y, yi + r * N, v, ybf);
    }
}

/* y (M, N) = x (M, K) @ W.T for a bfloat16 W (N, K), accumulated in float32 */
int bf16_gemm(const void* xin, int xbf, int64_t M, int64_t K, const uint16_t* w, int64_t N, void* y, int ybf) {
    use_threads();
    float* owned;
    const float* x = as_f32(xin, M * K, xbf, &owned);
    if (!x) return OWNLM_ENOMEM;
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
    return 0;
}

/* One-token attention for a batch of sequences, with its cache write. */

#include "kernels.h"

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

/* the cache's element types (attend_decode's ct): float32, bfloat16, float16 */
#define CACHE_F32 0
#define CACHE_BF16 1
#define CACHE_F16 2

/* 8 floats from element i of a cache of type ct */
static inline __m256 load8(const void* p, int64_t i, int ct) {
    if (ct == CACHE_F32) return _mm256_loadu_ps((const float*)p + i);
    const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)p + i));
    if (ct == CACHE_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* v into element i of a cache of type ct, rounded to nearest even (as PyTorch converts) */
static inline void cache_store(void* p, int64_t i, float v, int ct) {
    if (ct == CACHE_F16)
        ((uint16_t*)p)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
    else
        store(p, i, v, ct == CACHE_BF16);
}

/* One decode step of attention for B sequences, one new token each.
   qkv: (B, (H + 2 Hkv) D), the fused projection's output (float32, or bfloat16 with bf = 1),
   D a multiple of 8; cos, sin: (B, R) float32 for the half-rotated layout over the first R dims
   (R = 0: none); kc, vc: caches (slots, Hkv, cap, D) of type ct (CACHE_*), row b's
   sequence in slot slots[b]; pos: (B,) int64. Several rows may be one sequence's consecutive
   tokens (one slot, distinct positions: a speculative check): every row's k and v are written
   before any row attends. Rotates q and k (rounded to the compute dtype, as the prefill path
   stores them), writes k and v at pos, then each query head attends over keys
   max(0, pos - window + 1) .. pos (window 0: all). A row's arithmetic depends on itself and the
   cache alone, so it is that of a one-token step. out: (B, H D) in qkv's dtype. */
int attend_decode(const void* qkv, int bf, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t R,
                  const float* cos, const float* sin, void* kc, void* vc, int ct, const int64_t* slots,
                  int64_t cap, const int64_t* pos, int64_t window, float scale, void* out) {
    use_threads();
    const int64_t rep = H / Hkv, width = (H + 2 * Hkv) * D;
    int failed = 0;
    #pragma omp parallel
    {
        /* per thread: a rotated head vector and the scores of one query head (grown as needed) */
        float* q = scratch(D, &failed);
        float* w = 0;
        int64_t w_size = 0;
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < B * Hkv; t++) { /* the new keys and values into the cache */
            if (!q) continue;
            const int64_t b = t / Hkv, g = t % Hkv, p = pos[b];
            const int64_t row = ((slots[b] * Hkv + g) * cap + p) * D;
            rotate(qkv, b * width + (H + g) * D, bf, D, R, cos + b * R, sin + b * R, 1.f, q);
            for (int64_t d = 0; d < D; d++) {
                cache_store(kc, row + d, q[d], ct);
                cache_store(vc, row + d, load_x(qkv, b * width + (H + Hkv + g) * D + d, bf), ct);
            }
        }
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < B * H; t++) {
            const int64_t b = t / H, h = t % H, g = h / rep, p = pos[b];
            const int64_t lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
            const int64_t n = p - lo + 1;
            const int64_t first = ((slots[b] * Hkv + g) * cap + lo) * D; /* element index of key lo */
            if (q && n > w_size) {
                free(w);
                w = (float*)malloc((size_t)(n + 8) * sizeof(float));
                w_size = w ? n : 0;
            }
            if (!q || !w) {
                #pragma omp atomic write
                failed = 1;
                continue;
            }
            rotate(qkv, b * width + h * D, bf, D, R, cos + b * R, sin + b * R, scale, q);
            /* scores, 8 keys at a time */
            __m256 vmax = _mm256_set1_ps(-INFINITY);
            int64_t j = 0;
            for (; j + 8 <= n; j += 8) {
                __m256 acc[8];
                for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
                for (int64_t d = 0; d < D; d += 8) {
                    const __m256 qv = _mm256_loadu_ps(q + d);
                    for (int i = 0; i < 8; i++) acc[i] = _mm256_fmadd_ps(qv, load8(kc, first + (j + i) * D + d, ct), acc[i]);
                }
                const __m256 sc = hsum8(acc);
                _mm256_storeu_ps(w + j, sc);
                vmax = _mm256_max_ps(vmax, sc);
            }
            float mx = hmax(vmax);
            for (; j < n; j++) {
                __m256 acc = _mm256_setzero_ps();
                for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(kc, first + j * D + d, ct), acc);
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
                    for (int c = 0; c < nd; c++) acc[c] = _mm256_fmadd_ps(wj, load8(vc, vr + 8 * c, ct), acc[c]);
                }
                for (int c = 0; c < nd; c++)
                    for (int e = 0; e < 8; e++)
                        store(out, b * H * D + h * D + d0 + 8 * c + e, ((float*)&acc[c])[e] * inv, bf);
            }
        }
        free(q);
        free(w);
    }
    return failed ? OWNLM_ENOMEM : 0;
}

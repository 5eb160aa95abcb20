/* One-token attention for a batch of sequences, with its cache write, in simd.h's operations
   (AVX2 or NEON, the same bits on both). */

#include "kernels.h"

/* exp(x) for x <= 0 (softmax after subtracting the max): 2^n * p(r), r in [-ln2/2, ln2/2], degree-6
   polynomial; relative error ~1e-7; inputs below -87 give 0 */
static inline v8f exp_neg(v8f x) {
    x = v8f_max(x, v8f_set1(-87.f));
    const v8f n = v8f_round(v8f_mul(x, v8f_set1(1.44269504088896341f)));
    v8f r = v8f_fnmadd(n, v8f_set1(0.693359375f), x);
    r = v8f_fnmadd(n, v8f_set1(-2.12194440e-4f), r);
    v8f p = v8f_set1(1.9875691500e-4f);
    p = v8f_fmadd(p, r, v8f_set1(1.3981999507e-3f));
    p = v8f_fmadd(p, r, v8f_set1(8.3334519073e-3f));
    p = v8f_fmadd(p, r, v8f_set1(4.1665795894e-2f));
    p = v8f_fmadd(p, r, v8f_set1(1.6666665459e-1f));
    p = v8f_fmadd(p, r, v8f_set1(5.0000001201e-1f));
    p = v8f_fmadd(p, v8f_mul(r, r), v8f_add(r, v8f_set1(1.f)));
    return v8f_mul(p, v8f_exp2i(v8i_round(n)));
}

/* the sums of 8 vectors' lanes, as one vector [sum a0, ..., sum a7] */
static inline v8f hsum8(const v8f* a) {
    const v8f t0 = v8f_hadd(v8f_hadd(a[0], a[1]), v8f_hadd(a[2], a[3]));
    const v8f t1 = v8f_hadd(v8f_hadd(a[4], a[5]), v8f_hadd(a[6], a[7]));
    return v8f_add(v8f_lows(t0, t1), v8f_highs(t0, t1));
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
static inline v8f load8(const void* p, int64_t i, int ct) {
    if (ct == CACHE_F32) return v8f_load((const float*)p + i);
    if (ct == CACHE_F16) return v8f_from_f16((const uint16_t*)p + i);
    return v8f_from_bf16((const uint16_t*)p + i);
}

/* v into element i of a cache of type ct, rounded to nearest even (as PyTorch converts) */
static inline void cache_store(void* p, int64_t i, float v, int ct) {
    if (ct == CACHE_F16)
        ((uint16_t*)p)[i] = f32_to_f16(v);
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
        #pragma omp for schedule(static, 1)  /* interleaved: a prompt's later rows attend to more keys */
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
            v8f vmax = v8f_set1(-INFINITY);
            int64_t j = 0;
            for (; j + 8 <= n; j += 8) {
                v8f acc[8];
                for (int i = 0; i < 8; i++) acc[i] = v8f_zero();
                for (int64_t d = 0; d < D; d += 8) {
                    const v8f qv = v8f_load(q + d);
                    for (int i = 0; i < 8; i++) acc[i] = v8f_fmadd(qv, load8(kc, first + (j + i) * D + d, ct), acc[i]);
                }
                const v8f sc = hsum8(acc);
                v8f_store(w + j, sc);
                vmax = v8f_max(vmax, sc);
            }
            float mx = hmax(vmax);
            for (; j < n; j++) {
                v8f acc = v8f_zero();
                for (int64_t d = 0; d < D; d += 8) acc = v8f_fmadd(v8f_load(q + d), load8(kc, first + j * D + d, ct), acc);
                w[j] = hsum(acc);
                mx = w[j] > mx ? w[j] : mx;
            }
            /* softmax weights (unnormalized) */
            const v8f vmx = v8f_set1(mx);
            v8f vsum = v8f_zero();
            for (int64_t i = n; i < n + 8; i++) w[i] = -INFINITY;  /* padding: exp gives 0 */
            for (j = 0; j < n; j += 8) {
                const v8f e = exp_neg(v8f_sub(v8f_load(w + j), vmx));
                v8f_store(w + j, e);
                vsum = v8f_add(vsum, e);
            }
            const float inv = 1.f / hsum(vsum);
            /* weighted values, 64 dims at a time in registers */
            for (int64_t d0 = 0; d0 < D; d0 += 64) {
                const int64_t nd = D - d0 < 64 ? (D - d0) / 8 : 8;
                v8f acc[8];
                for (int c = 0; c < 8; c++) acc[c] = v8f_zero();
                for (j = 0; j < n; j++) {
                    const v8f wj = v8f_set1(w[j]);
                    const int64_t vr = first + j * D + d0;
                    for (int c = 0; c < nd; c++) acc[c] = v8f_fmadd(wj, load8(vc, vr + 8 * c, ct), acc[c]);
                }
                for (int c = 0; c < nd; c++) {
                    float lanes[8];
                    v8f_store(lanes, acc[c]);
                    for (int e = 0; e < 8; e++) store(out, b * H * D + h * D + d0 + 8 * c + e, lanes[e] * inv, bf);
                }
            }
        }
        free(q);
        free(w);
    }
    return failed ? OWNLM_ENOMEM : 0;
}

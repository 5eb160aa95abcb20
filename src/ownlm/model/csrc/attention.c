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

/* the lane sums of KB (4 or 8) vectors, each ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)):
   [sum a0, ..., sum a7], or for 4 [sum a0, ..., sum a3] in lanes 0-3 and again in 4-7 */
static inline v8f hsums(const v8f* a, const int KB) {
    const v8f t0 = v8f_hadd(v8f_hadd(a[0], a[1]), v8f_hadd(a[2], a[3]));
    const v8f t1 = KB == 8 ? v8f_hadd(v8f_hadd(a[4], a[5]), v8f_hadd(a[6], a[7])) : t0;
    return v8f_add(v8f_lows(t0, t1), v8f_highs(t0, t1));
}

/* HB query heads (1 or 3) of one row that share a key/value head: q (HB vectors of D, rotated and
   scaled), keys and values from element `first` of the caches, n of them; w: HB score rows of
   n + 8 floats. Each head's arithmetic is that of one head alone (decode and prefill, any batch,
   any number of heads in the tile): per key, a multiply-add chain over the dims reduced by hsums,
   except the keys past the last multiple of 8, reduced by hsum; softmax; the values weighted in
   key order per dim. The heads share each key's and value's load and conversion: a register tile
   of HB heads by KB keys (8 for one head, else 4) or DB dims (64 for one head, else 32). */
static inline __attribute__((always_inline)) void attend_heads(const int HB, const float* q, const void* kc,
        const void* vc, int ct, int64_t first, int64_t n, int64_t D, float* w, int bf, void* out) {
    const int KB = HB == 1 ? 8 : 4, DB = HB == 1 ? 64 : 32;
    const int64_t n8 = n - n % 8, stride = n + 8;
    float mx[3];
    v8f vmax[3];
    for (int h = 0; h < HB; h++) vmax[h] = v8f_set1(-INFINITY);
    for (int64_t j = 0; j < n8; j += 8) {
        v8f sc[3][2];  /* each head's 8 scores, by halves of 4 keys where KB is 4 */
        for (int64_t jb = j; jb < j + 8; jb += KB) {
            v8f acc[3][8];
            for (int h = 0; h < HB; h++)
                for (int i = 0; i < KB; i++) acc[h][i] = v8f_zero();
            for (int64_t d = 0; d < D; d += 8) {
                v8f qv[3];
                for (int h = 0; h < HB; h++) qv[h] = v8f_load(q + h * D + d);
                for (int i = 0; i < KB; i++) {
                    const v8f k = load8(kc, first + (jb + i) * D + d, ct);
                    for (int h = 0; h < HB; h++) acc[h][i] = v8f_fmadd(qv[h], k, acc[h][i]);
                }
            }
            for (int h = 0; h < HB; h++) sc[h][jb > j] = hsums(acc[h], KB);
        }
        for (int h = 0; h < HB; h++) {
            const v8f s8 = KB == 8 ? sc[h][0] : v8f_lows(sc[h][0], sc[h][1]);
            v8f_store(w + h * stride + j, s8);
            vmax[h] = v8f_max(vmax[h], s8);
        }
    }
    for (int h = 0; h < HB; h++) {
        float* wh = w + h * stride;
        mx[h] = hmax(vmax[h]);
        for (int64_t j = n8; j < n; j++) {
            v8f acc = v8f_zero();
            for (int64_t d = 0; d < D; d += 8) acc = v8f_fmadd(v8f_load(q + h * D + d), load8(kc, first + j * D + d, ct), acc);
            wh[j] = hsum(acc);
            mx[h] = wh[j] > mx[h] ? wh[j] : mx[h];
        }
    }
    float inv[3];
    for (int h = 0; h < HB; h++) {  /* softmax weights (unnormalized) */
        float* wh = w + h * stride;
        const v8f vmx = v8f_set1(mx[h]);
        v8f vsum = v8f_zero();
        for (int64_t i = n; i < n + 8; i++) wh[i] = -INFINITY;  /* padding: exp gives (about) 0 */
        for (int64_t j = 0; j < n; j += 8) {
            const v8f e = exp_neg(v8f_sub(v8f_load(wh + j), vmx));
            v8f_store(wh + j, e);
            vsum = v8f_add(vsum, e);
        }
        inv[h] = 1.f / hsum(vsum);
    }
    /* weighted values, DB dims at a time in registers */
    for (int64_t d0 = 0; d0 < D; d0 += DB) {
        const int64_t nd = D - d0 < DB ? (D - d0) / 8 : DB / 8;
        v8f acc[3][8];
        for (int h = 0; h < HB; h++)
            for (int c = 0; c < DB / 8; c++) acc[h][c] = v8f_zero();
        for (int64_t j = 0; j < n; j++) {
            v8f wj[3];
            for (int h = 0; h < HB; h++) wj[h] = v8f_set1(w[h * stride + j]);
            const int64_t vr = first + j * D + d0;
            for (int c = 0; c < nd; c++) {
                const v8f v = load8(vc, vr + 8 * c, ct);
                for (int h = 0; h < HB; h++) acc[h][c] = v8f_fmadd(wj[h], v, acc[h][c]);
            }
        }
        for (int h = 0; h < HB; h++)
            for (int c = 0; c < nd; c++) {
                float lanes[8];
                v8f_store(lanes, acc[h][c]);
                for (int e = 0; e < 8; e++) store(out, h * D + d0 + 8 * c + e, lanes[e] * inv[h], bf);
            }
    }
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
    const int64_t chunks = rep % 3 ? rep : rep / 3;  /* the query heads of a key/value head, in tiles of 3 or 1 */
    #pragma omp parallel
    {
        /* per thread: up to 3 rotated head vectors and their score rows (grown as needed) */
        float* q = scratch(3 * D, &failed);
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
        /* interleaved: a prompt's later rows attend to more keys */
        #pragma omp for schedule(static, 1)
        for (int64_t t = 0; t < B * Hkv * chunks; t++) {
            const int64_t b = t / (Hkv * chunks), g = t / chunks % Hkv, c = t % chunks, p = pos[b];
            const int64_t h0 = g * rep + c * rep / chunks, hb = g * rep + (c + 1) * rep / chunks - h0;  /* even shares */
            const int64_t lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
            const int64_t n = p - lo + 1;
            const int64_t first = ((slots[b] * Hkv + g) * cap + lo) * D; /* element index of key lo */
            if (q && 3 * (n + 8) > w_size) {
                free(w);
                w = (float*)malloc((size_t)(3 * (n + 8)) * sizeof(float));
                w_size = w ? 3 * (n + 8) : 0;
            }
            if (!q || !w) {
                #pragma omp atomic write
                failed = 1;
                continue;
            }
            for (int64_t i = 0; i < hb; i++)
                rotate(qkv, b * width + (h0 + i) * D, bf, D, R, cos + b * R, sin + b * R, scale, q + i * D);
            void* o = (char*)out + (b * H + h0) * D * (bf ? 2 : 4);
            if (hb == 3) attend_heads(3, q, kc, vc, ct, first, n, D, w, bf, o);
            else attend_heads(1, q, kc, vc, ct, first, n, D, w, bf, o);
        }
        free(q);
        free(w);
    }
    return failed ? OWNLM_ENOMEM : 0;
}

/* Matmuls: group-wise int4 / int5 / int6 / int8 weights against float activations rounded to
   int16 (or, where their part asks for it, to int8: xbits 8), and bfloat16
   against float activations, written in simd.h's operations (AVX2 or NEON, the same bits on both).
   Each output element is computed by the same sequence of operations whatever the number of
   rows, so a sequence decodes to the same bits alone and in a batch. */

#include "kernels.h"

/* x as float32: itself, or a converted copy of a bfloat16 x (the caller frees *owned); NULL when
   the copy cannot be allocated */
static const float* as_f32(const void* x, int64_t n, int bf16, float** owned) {
    *owned = 0;
    if (!bf16) return (const float*)x;
    float* f = (float*)line_alloc((size_t)n * sizeof(float));
    if (!f) return 0;
    const uint16_t* h = (const uint16_t*)x;
    for (int64_t i = 0; i < n; i++) f[i] = bf16_to_f32(h[i]);
    *owned = f;
    return f;
}

/* the floats of a row of xd8 (4 G + 4 used), a multiple of 16 so that each row starts on a cache line */
#define XD8_STRIDE(G) ((4 * (G) + 4 + 15) / 16 * 16)

/* Activations as blocks of 32 the integer dot products take, per row and block:
   - int16 (xq16, unless null): a scale d = absmax / 32767 (xd16), values round(x / d): an error of
     at most 2^-16 of the block's absmax, below bfloat16's rounding;
   - int8 (xq8, unless null): d = absmax / 127, values round(x / d), as llama.cpp's Q8_0 rounds
     its activations, in the order the int8 kernel reads them: a pair of blocks 2p, 2p + 1 as
     block 2p's first 16 values, block 2p + 1's first 16, then both blocks' last 16 (so the low and
     high nibbles of the pair's 32 weight bytes meet their activations directly); a last unpaired
     block in its own order. The scales d (xd8, XD8_STRIDE(G) floats a row) as the pair steps read them:
     block g's 4 times at 4 g (an unpaired last block's 8 times); and the sum of the rounded
     block, d times the sum of its int8 values (xs8): the int8 path's offsets multiply it, so the
     rounding errors of x meet weights centred on zero (as llama.cpp's Q8_1 sums do) rather than
     the 0 .. 15 of q alone (against the exact sum, smollm2's KL from float32 was 6 times larger);
   - the exact float sum of the block's x (xs, the int16 path's offsets).
   Row m's result depends on row m alone. */
static void quantize_rows(const float* x, int64_t M, int64_t K, int16_t* xq16, float* xd16, int8_t* xq8,
                          float* xd8, float* xs8, float* xs) {
    const int64_t G = K / 32;
    #pragma omp parallel for schedule(static) if (M * K >= 65536)
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < G; g++) {
            const float* p = x + m * K + g * 32;
            v8f v[4];
            for (int i = 0; i < 4; i++) v[i] = v8f_load(p + 8 * i);
            v8f amax = v8f_abs(v[0]);
            for (int i = 1; i < 4; i++) amax = v8f_max(amax, v8f_abs(v[i]));
            const float a = v8f_hmax(amax);
            v8i i32[4];
            if (xq16) {
                const v8f id = v8f_set1(a > 0.f ? 32767.f / a : 0.f);
                for (int i = 0; i < 4; i++) i32[i] = v8i_round(v8f_mul(v[i], id));
                v16h_store(xq16 + m * K + g * 32, v16h_pack(i32[0], i32[1]));
                v16h_store(xq16 + m * K + g * 32 + 16, v16h_pack(i32[2], i32[3]));
                xd16[m * G + g] = a / 32767.f;
            }
            if (xq8) {
                const v8f id = v8f_set1(a > 0.f ? 127.f / a : 0.f);
                for (int i = 0; i < 4; i++) i32[i] = v8i_round(v8f_mul(v[i], id));
                int8_t* pair = xq8 + m * K + (g / 2) * 64;
                const int alone = g == G - 1 && G % 2;
                const int64_t lo = alone ? 0 : (g % 2) * 16, hi = alone ? 16 : 32 + (g % 2) * 16;
                v32b_store2(pair + lo, pair + hi, v32b_pack(i32[0], i32[1], i32[2], i32[3]));
                for (int i = 0; i < (alone ? 8 : 4); i++) xd8[m * XD8_STRIDE(G) + 4 * g + i] = a / 127.f;
                const v8i sum = v8i_add(v8i_add(i32[0], i32[1]), v8i_add(i32[2], i32[3]));
                xs8[m * G + g] = v8f_hsum(v8f_from_i32(sum)) * (a / 127.f);  /* an exact sum, one rounding */
            }
            xs[m * G + g] = v8f_hsum(v8f_add(v8f_add(v[0], v[1]), v8f_add(v[2], v[3])));
        }
}

/* The kinds of weight, each its own instantiation of the loops below: the bit widths 4, 5, 6, 8
   and NL4, 4-bit indices into a codebook of 16 int8 values (GGUF's IQ4_NL / IQ4_XS) */
#define NL4 14
/* the offset of a symmetric int4 / int5 part (w = (q + MIDPOINT) s) */
#define MIDPOINT(bits) ((bits) == 5 ? -16.f : -8.f)
static inline int kind_of(const qpart_t* p) { return p->l ? NL4 : (int)p->bits; }

/* Weight row n of a part (kind `bits`): the part's pointers moved to that row */
static inline __attribute__((always_inline)) qpart_t weight_row(const qpart_t* p, int64_t n, int64_t K, int bits) {
    const int64_t G = K / 32;
    qpart_t r = *p;
    r.w = p->w + n * (bits == 8 ? K : K / 2);
    r.s = p->s ? p->s + n * G : 0;
    r.o = p->o && (bits == 4 || bits == 5) ? p->o + n * G : 0;
    /* super-blocks: 16 bytes per 8 groups (bits 4, 5), 2 (bits 6), 8 (a codebook's) */
    r.k = !p->k ? 0 : bits == 4 || bits == 5 ? p->k + n * G * 2 : bits == 6 ? p->k + n * G / 4
          : bits == NL4 ? p->k + n * G : 0;
    r.h = bits == 5 ? p->h + n * G * 4 : bits == 6 ? p->h + n * G * 8 : 0;
    r.u = bits == 6 ? p->u + n * 2 * G : 0;
    r.n = 1;
    return r;
}

/* The scales and offsets of the 8 groups of a Q4_K / Q5_K super-block (w = q d sc - dmin m) from
   its 16 header bytes as the file holds them: float16 d and dmin, then 12 bytes of 6-bit scales
   sc and mins m (simd.h's b16_k_scales). Each factor is one float32 product, as gguf's
   dequantizer computes it. */
static inline __attribute__((always_inline)) void k_factors(const uint8_t* hdr, v8f* s, v8f* o) {
    const b16 six = b16_k_scales(b16_load(hdr));  /* the 8 scales, then the 8 mins */
    uint16_t d, dmin;
    memcpy(&d, hdr, 2);
    memcpy(&dmin, hdr + 2, 2);
    *s = v8f_mul(v8f_from_u8(six, 0), v8f_set1(f16_to_f32(d)));
    *o = v8f_mul(v8f_from_u8(six, 1), v8f_set1(-f16_to_f32(dmin)));
}

/* The scales of the 8 groups of an IQ4_XS super-block, d (ls - 32), from its 8 header bytes as the
   file holds them: float16 d, the 2 high bits of each 6-bit ls (a 16-bit word, group j's at bits
   2j), their 4 low bits (4 bytes, group j's in byte j / 2, the low nibble first); one float32
   product each, as gguf's dequantizer computes it */
static inline __attribute__((always_inline)) v8f xs_scales(const uint8_t* hdr) {
    uint16_t d, high;
    uint32_t low;
    memcpy(&d, hdr, 2);
    memcpy(&high, hdr + 2, 2);
    memcpy(&low, hdr + 4, 4);
    uint64_t lo = low, hi = high;  /* spread to one byte a group: the nibbles, then the 2-bit fields */
    lo = (lo | lo << 16) & 0x0000FFFF0000FFFFull;
    lo = (lo | lo << 8) & 0x00FF00FF00FF00FFull;
    lo = (lo | lo << 4) & 0x0F0F0F0F0F0F0F0Full;
    hi = (hi | hi << 24) & 0x000000FF000000FFull;
    hi = (hi | hi << 12) & 0x000F000F000F000Full;
    hi = (hi | hi << 6) & 0x0303030303030303ull;
    const uint64_t ls = lo | hi << 4;
    return v8f_mul(v8f_sub(v8f_from_u8(b16_from_u64(ls), 0), v8f_set1(32.f)), v8f_set1(f16_to_f32(d)));
}

/* an int6 (Q6_K) weight row's super-block scale d (the same for its 8 groups from g, a multiple of 8) */
static inline __attribute__((always_inline)) float six_d(qpart_t wr, int64_t g) {
    uint16_t d;
    memcpy(&d, wr.k + g / 4, 2);
    return f16_to_f32(d);
}

/* Groups g .. g + 7 (g a multiple of 8, all within the row) of a weight row of kind `bits`, in any
   layout: their scales into *s and, bits 4 / 5 with o given, their offsets into *o (MIDPOINT s
   where the part has none; always, for a part with super-blocks) */
static inline __attribute__((always_inline)) void factors8(qpart_t wr, int64_t g, int bits, v8f* s, v8f* o) {
    if (wr.k && (bits == 4 || bits == 5)) {
        k_factors(wr.k + g * 2, s, o);
        return;
    }
    *s = !wr.k ? v8f_from_f16(wr.s + g) : bits == 6 ? v8f_set1(six_d(wr, g)) : xs_scales(wr.k + g);
    if ((bits == 4 || bits == 5) && o) *o = wr.o ? v8f_from_f16(wr.o + g) : v8f_mul(*s, v8f_set1(MIDPOINT(bits)));
}

/* group g's scale of a weight row, and (bits 4 / 5) its offset: the groups' loops' tails (only a
   row without super-blocks has a tail short of 8 groups) */
static inline __attribute__((always_inline)) float group_scale(qpart_t wr, int64_t g, int bits) {
    if (!wr.k) return f16_to_f32(wr.s[g]);
    v8f s, o;
    float f[8];
    factors8(wr, g / 8 * 8, bits, &s, &o);
    v8f_store(f, s);
    return f[g % 8];
}
static inline __attribute__((always_inline)) float group_offset(qpart_t wr, int64_t g, int bits) {
    if (!wr.k) return wr.o ? f16_to_f32(wr.o[g]) : MIDPOINT(bits) * f16_to_f32(wr.s[g]);
    v8f s, o;
    float f[8];
    factors8(wr, g / 8 * 8, bits, &s, &o);
    v8f_store(f, o);
    return f[g % 8];
}

/* A weight row's group factors (factors8, group_scale / group_offset for a last few groups short
   of 8), unpacked once for all the activation rows it meets: its G scales into kf, then (bits
   4 / 5) its G offsets; the values row_factors would compute for each of them */
static inline __attribute__((always_inline)) void k_unpack(qpart_t wr, int64_t G, float* kf, int bits) {
    const int64_t G8 = G - G % 8;
    int64_t g = 0;
    for (; g < G8; g += 8) {
        v8f s, o;
        factors8(wr, g, bits, &s, &o);
        v8f_store(kf + g, s);
        if (bits == 4 || bits == 5) v8f_store(kf + G + g, o);
    }
    for (; g < G; g++) {  /* a row without super-blocks may end short of 8 groups */
        kf[g] = group_scale(wr, g, bits);
        if (bits == 4 || bits == 5) kf[G + g] = group_offset(wr, g, bits);
    }
}

/* where the int16 path keeps the unpacked group factors of weight row `slot` (0 or 1) in
   its scratch (the rows' factors take at most 8 G floats: 8 rows of G, or 4 rows of 2 G) */
#define KF(sx, G, slot) ((sx) + 8 * (G) + 2 * (G) * (slot))

/* Row r's part of a weight row that does not depend on the group loop: the group factors
   s[g] xd[r, g] (into sx; bits 6: s[g] xd[r, g] u[2g + t] for its two halves, 2 G of them) and
   the offset term sum_g o[g] xs[r, g] (returned), 8 groups at a time. bits 4 / 5: w = q s + o
   (no offsets: o = -8 s / -16 s); bits 6: w = (q - 32) s u, no offset term; bits 8: w = q s.
   The weight's factors come from kf (k_unpack's) where given, else are unpacked here: the same
   values. */
static inline __attribute__((always_inline)) float row_factors(const float* xd, const float* xs, int64_t G,
        qpart_t wr, int bits, float* sx, const float* kf) {
    const int64_t G8 = G - G % 8;
    v8f ov = v8f_zero();
    int64_t g = 0;
    for (; g < G8; g += 8) {
        v8f sv, ow = v8f_zero();
        if (kf) {
            sv = v8f_load(kf + g);
            if (bits == 4 || bits == 5) ow = v8f_load(kf + G + g);
        } else {
            factors8(wr, g, bits, &sv, &ow);
        }
        const v8f f = v8f_mul(sv, v8f_load(xd + g));
        if (bits == 6) {  /* each group's factor for its two halves, times their int8 scales */
            v8f_store(sx + 2 * g, v8f_mul(v8f_dup_lo(f), v8f_from_i8(wr.u + 2 * g)));
            v8f_store(sx + 2 * g + 8, v8f_mul(v8f_dup_hi(f), v8f_from_i8(wr.u + 2 * g + 8)));
        } else {
            v8f_store(sx + g, f);
        }
        if (bits == 4 || bits == 5) ov = v8f_fmadd(ow, v8f_load(xs + g), ov);
    }
    float ot = v8f_hsum(ov);
    for (; g < G; g++) {
        const float f = (kf ? kf[g] : group_scale(wr, g, bits)) * xd[g];
        if (bits == 6) {
            sx[2 * g] = f * (float)wr.u[2 * g];
            sx[2 * g + 1] = f * (float)wr.u[2 * g + 1];
        } else {
            sx[g] = f;
        }
        if (bits == 4 || bits == 5) ot += (kf ? kf[G + g] : group_offset(wr, g, bits)) * xs[g];
    }
    return bits == 4 || bits == 5 ? ot : 0.f;
}

/* int6 group g's values 0 .. 63 as bytes: its first 16 (first) and its last 16 (second); q[i]'s
   top two bits are bits 2 (i / 8) of byte i % 8 of its 8 in h */
static inline __attribute__((always_inline)) void six_bytes(const uint8_t* w, const uint8_t* h, int64_t g,
                                                            b16* first, b16* second) {
    const b16 b = b16_load(w + g * 16);
    *first = b16_or(b16_shr_and(b, 0, 0x0F), b16_shl4(b16_bits6(h + g * 8, 0)));
    *second = b16_or(b16_shr_and(b, 4, 0x0F), b16_shl4(b16_bits6(h + g * 8, 1)));
}

/* int5 group g's values 0 .. 31 as bytes: its first 16 (first) and its last 16 (second); q[i]'s
   fifth bit is bit i / 4 of byte i % 4 of its 4 in h */
static inline __attribute__((always_inline)) void five_bytes(const uint8_t* w, const uint8_t* h, int64_t g,
                                                             b16* first, b16* second) {
    const b16 b = b16_load(w + g * 16);
    uint32_t m;
    __builtin_memcpy(&m, h + g * 4, 4);
    *first = b16_or(b16_shr_and(b, 0, 0x0F), b16_shl4(b16_bits5(m, 0)));
    *second = b16_or(b16_shr_and(b, 4, 0x0F), b16_shl4(b16_bits5(m, 1)));
}

/* Group g of a weight row as two vectors of 16 int16 (bits 6: q - 32) */
static inline __attribute__((always_inline)) void unpack_group(const uint8_t* w, const uint8_t* h, const int8_t* l,
        int64_t g, int bits, v16h* w0, v16h* w1) {
    if (bits == 8) {
        *w0 = v16h_from_i8((const int8_t*)(w + g * 32));
        *w1 = v16h_from_i8((const int8_t*)(w + g * 32 + 16));
        return;
    }
    if (bits == 6) {
        b16 first, second;
        six_bytes(w, h, g, &first, &second);
        *w0 = v16h_sub(v16h_from_u8(first), 32);
        *w1 = v16h_sub(v16h_from_u8(second), 32);
        return;
    }
    if (bits == 5) {
        b16 first, second;
        five_bytes(w, h, g, &first, &second);
        *w0 = v16h_from_u8(first);
        *w1 = v16h_from_u8(second);
        return;
    }
    const b16 b = b16_load(w + g * 16);
    if (bits == 4) {
        v16h_nibbles(b, w0, w1);
        return;
    }
    const b16 table = b16_load((const uint8_t*)l);  /* NL4: the codebook's int8 values */
    *w0 = v16h_from_s8(b16_lookup(table, b16_shr_and(b, 0, 0x0F)));
    *w1 = v16h_from_s8(b16_lookup(table, b16_shr_and(b, 4, 0x0F)));
}

/* Groups g and g + 1 (g even) of an int6 weight row, each as unpack_group gives it (q - 32 as
   int16), from one unpack of the pair (simd.h's v32b_six, the int8 path's): fewer operations than
   two unpack_group calls; the first group's values into a0, a1, the second's into b0, b1 */
static inline __attribute__((always_inline)) void unpack_pair6(const uint8_t* w, const uint8_t* h, int64_t g,
        v16h* a0, v16h* a1, v16h* b0, v16h* b1) {
    v32b lo, hi;
    v32b_six(w + g * 16, h + g * 8, &lo, &hi);
    *a0 = v16h_from_s8(v32b_half(lo, 0));
    *b0 = v16h_from_s8(v32b_half(lo, 1));
    *a1 = v16h_from_s8(v32b_half(hi, 0));
    *b1 = v16h_from_s8(v32b_half(hi, 1));
}

/* One group's integer dot products (exact: |sums| < 2^24), scaled by its factor(s) into acc:
   one factor for the group, or (bits 6) one per half */
static inline __attribute__((always_inline)) v8f group_step(v16h w0, v16h w1, v16h x0, v16h x1,
        const float* factor, int bits, v8f acc) {
    if (bits == 6) {
        acc = v8f_fmadd(v8f_from_i32(v8i_madd(w0, x0)), v8f_set1(factor[0]), acc);
        return v8f_fmadd(v8f_from_i32(v8i_madd(w1, x1)), v8f_set1(factor[1]), acc);
    }
    const v8i p = v8i_madd2(w0, x0, w1, x1);
    return v8f_fmadd(v8f_from_i32(p), v8f_set1(factor[0]), acc);
}

/* factors per group: two for bits 6 (its halves), else one */
#define FPG(bits) ((bits) == 6 ? 2 : 1)

/* MB activation rows against one weight row (see row_factors): each row's integer group dot
   products are scaled and accumulated in registers, one chain per output, then summed with the
   offset term. Every output's arithmetic is the same whatever MB (a constant at each call), and
   the same as in ncols below, so its bits do not depend on the batch. */
static inline __attribute__((always_inline)) void qrows(const int16_t* xq, const float* xd, const float* xs,
        int64_t K, qpart_t wr, int bits, float* sx, const float* kf, float* out, const int MB) {
    const int64_t G = K / 32, F = G * FPG(bits);
    v8f acc[8];
    float oacc[8];
    for (int r = 0; r < MB; r++) {
        oacc[r] = row_factors(xd + r * G, xs + r * G, G, wr, bits, sx + r * F, kf);
        acc[r] = v8f_zero();
    }
    for (int64_t g = 0; g < G; g++) {
        if (bits == 6 && g + 1 < G) {  /* int6: groups g and g + 1 from one unpack, each as below */
            v16h a0, a1, b0, b1;
            unpack_pair6(wr.w, wr.h, g, &a0, &a1, &b0, &b1);
            for (int r = 0; r < MB; r++) {
                const int16_t* xr = xq + r * K + g * 32;
                acc[r] = group_step(a0, a1, v16h_load(xr), v16h_load(xr + 16), sx + r * F + g * 2, 6, acc[r]);
                acc[r] = group_step(b0, b1, v16h_load(xr + 32), v16h_load(xr + 48), sx + r * F + g * 2 + 2, 6,
                                    acc[r]);
            }
            g++;
            continue;
        }
        v16h w0, w1;
        unpack_group(wr.w, wr.h, wr.l, g, bits, &w0, &w1);
        for (int r = 0; r < MB; r++) {
            const int16_t* xr = xq + r * K + g * 32;
            acc[r] = group_step(w0, w1, v16h_load(xr), v16h_load(xr + 16), sx + r * F + g * FPG(bits), bits, acc[r]);
        }
    }
    for (int r = 0; r < MB; r++) out[r] = v8f_hsum(acc[r]) + oacc[r];
}

/* Two weight rows against MB activation rows: qrows' arithmetic for each of the 2 MB outputs,
   with the weights unpacked once and each activation block loaded once for both rows */
static inline __attribute__((always_inline)) void qtile(const int16_t* xq, const float* xd, const float* xs,
        int64_t K, qpart_t wa, qpart_t wb, int bits, float* sx, const float* kfa, const float* kfb, float* out,
        const int MB) {
    const int64_t G = K / 32, F = G * FPG(bits);
    v8f acc[2][4];
    float oacc[2][4];
    for (int r = 0; r < MB; r++) {
        oacc[0][r] = row_factors(xd + r * G, xs + r * G, G, wa, bits, sx + r * F, kfa);
        oacc[1][r] = row_factors(xd + r * G, xs + r * G, G, wb, bits, sx + (MB + r) * F, kfb);
        acc[0][r] = acc[1][r] = v8f_zero();
    }
    for (int64_t g = 0; g < G; g++) {
        v16h a0, a1, b0, b1;
        unpack_group(wa.w, wa.h, wa.l, g, bits, &a0, &a1);
        unpack_group(wb.w, wb.h, wb.l, g, bits, &b0, &b1);
        for (int r = 0; r < MB; r++) {
            const int16_t* xr = xq + r * K + g * 32;
            const v16h x0 = v16h_load(xr), x1 = v16h_load(xr + 16);
            acc[0][r] = group_step(a0, a1, x0, x1, sx + r * F + g * FPG(bits), bits, acc[0][r]);
            acc[1][r] = group_step(b0, b1, x0, x1, sx + (MB + r) * F + g * FPG(bits), bits, acc[1][r]);
        }
    }
    for (int r = 0; r < MB; r++) {
        out[r] = v8f_hsum(acc[0][r]) + oacc[0][r];
        out[MB + r] = v8f_hsum(acc[1][r]) + oacc[1][r];
    }
}

/* One activation row against NB consecutive weight rows from row n: the same arithmetic per
   output as qrows, with NB independent accumulation chains in flight (one chain alone waits on
   each multiply-add's latency) and the activations loaded once for all of them. */
static inline __attribute__((always_inline)) void ncols(const int16_t* xq, const float* xd, const float* xs,
        int64_t K, const qpart_t* p, int64_t n, int bits, float* sx, float* out, const int NB) {
    const int64_t G = K / 32, F = G * FPG(bits);
    v8f acc[4];
    float oacc[4];
    for (int j = 0; j < NB; j++) {
        oacc[j] = row_factors(xd, xs, G, weight_row(p, n + j, K, bits), bits, sx + j * F, 0);
        acc[j] = v8f_zero();
    }
    const qpart_t first = weight_row(p, n, K, bits);  /* the NB rows follow it at fixed strides */
    const int64_t gb = bits == 8 ? 32 : 16, rb = G * gb;  /* bytes per group and row of the main plane */
    const int64_t hr = G * (bits == 5 ? 4 : bits == 6 ? 8 : 0);  /* and per row of the high bits */
    for (int64_t g = 0; g < G; g++) {
        /* the rows are short: stream the next NB rows in at the pace these are read (interleaved
           rows defeat the hardware's stream detection) */
        const char* next = (const char*)first.w + NB * rb + g * NB * gb;
        const v16h x0 = v16h_load(xq + g * 32), x1 = v16h_load(xq + g * 32 + 16);
        if (bits == 6 && g + 1 < G) {  /* int6: groups g and g + 1 from one unpack, each as below */
            for (int64_t b = 0; b < 2 * NB * gb; b += 64) PREFETCH(next + b);
            const v16h y0 = v16h_load(xq + g * 32 + 32), y1 = v16h_load(xq + g * 32 + 48);
            for (int j = 0; j < NB; j++) {
                v16h a0, a1, b0, b1;
                unpack_pair6(first.w + j * rb, first.h + j * hr, g, &a0, &a1, &b0, &b1);
                acc[j] = group_step(a0, a1, x0, x1, sx + j * F + g * 2, 6, acc[j]);
                acc[j] = group_step(b0, b1, y0, y1, sx + j * F + g * 2 + 2, 6, acc[j]);
            }
            g++;
            continue;
        }
        for (int64_t b = 0; b < NB * gb; b += 64) PREFETCH(next + b);
        for (int j = 0; j < NB; j++) {
            v16h w0, w1;
            unpack_group(first.w + j * rb, first.h + j * hr, first.l, g, bits, &w0, &w1);
            acc[j] = group_step(w0, w1, x0, x1, sx + j * F + g * FPG(bits), bits, acc[j]);
        }
    }
    for (int j = 0; j < NB; j++) out[j] = v8f_hsum(acc[j]) + oacc[j];
}

/* The int8 path: int4 and int5 weights (w = q s + o, q in 0 .. 15 or 0 .. 31), int6 ones
   (w = (q - 32) s u, q - 32 as signed bytes, u the 16-column scales), int8 ones (w = q s, q
   signed) and codebook ones (w = l[q] s, l's int8 values) against int8 activations. A pair of
   groups is one 256-bit step: for int4 (and a codebook, whose values replace the indices) the
   pair's 32 weight bytes give the 32 low nibbles and the 32 high ones, for int5, int6 and int8
   the two groups' first 16 values and their last 16, each against its 32 activations
   (quantize_rows' order), lanes 0-3 of the integer sums belonging to the first group and lanes
   4-7 to the second (int6: the first halves' sums and the second halves' apart, each with its own
   scales); a last unpaired group is a step of its own (all 8 lanes its). Per step, the integer
   sums to float, times the activations' scales (xd, as quantize_rows lays them out for the
   steps), times the weight's scales, into one accumulator; the offsets' term sum_g o[g] xs[g]
   (xs: the rounded blocks' sums) is added at the end. About half the operations of the int16
   path per weight, and no pass over each pair of rows before it. */

/* sum_g o[g] xs[g] for one int4 or int5 (bits) weight row and one activation row (o = MIDPOINT s
   where the part has none), 8 groups at a time, then the rest one by one */
static inline __attribute__((always_inline)) float offset_term(const float* xs, int64_t G, qpart_t wr,
                                                               const int bits) {
    const int64_t G8 = G - G % 8;
    v8f ov = v8f_zero();
    int64_t g = 0;
    for (; g < G8; g += 8) {
        v8f sv, ow;
        factors8(wr, g, bits, &sv, &ow);
        ov = v8f_fmadd(ow, v8f_load(xs + g), ov);
    }
    float ot = v8f_hsum(ov);
    for (; g < G; g++) ot += group_offset(wr, g, bits) * xs[g];
    return ot;
}

/* an unpaired int5 group g of a weight row as the int8 path's operand: its 32 values in order */
static inline __attribute__((always_inline)) v32b five_alone(const qpart_t* r, int64_t g) {
    b16 first, second;
    five_bytes(r->w, r->h, g, &first, &second);
    return v32b_join(first, second);
}

/* an unpaired int6 group g of a weight row as the int8 path's operand: its 32 values in order,
   less 32, as signed bytes (pairs: simd.h's v32b_six) */
static inline __attribute__((always_inline)) v32b six_alone(const qpart_t* r, int64_t g) {
    b16 first, second;
    six_bytes(r->w, r->h, g, &first, &second);
    return v32b_join_less32(first, second);
}

/* The scales of an int6 pair step, from sq (the groups' scales as v8f_quad lays them out): each
   times its 16-column scale, the first halves' into sq and the second halves' into sq2 (float16
   times int8: exact) */
static inline __attribute__((always_inline)) void six_scales(const int8_t* u, int64_t p, v8f* sq, v8f* sq2) {
    const int8_t* q = u + 4 * p;
    *sq2 = v8f_mul(*sq, v8f_pair((float)q[1], (float)q[3]));
    *sq = v8f_mul(*sq, v8f_pair((float)q[0], (float)q[2]));
}

/* Pair p of q8tile (B: the weights' bits, 4, 5, 6 or 8, or NL4): sq[w] holds weight row w's scales of the
   pair's two groups, each in 4 lanes */
static inline __attribute__((always_inline)) void pair_step(const int8_t* xq, const float* xd, int64_t K, int64_t G,
        const qpart_t* wr, int64_t p, const v8f* sq, v8f* acc, const int NW, const int MB, const int B) {
    const int64_t XS = XD8_STRIDE(G), gb = B == 8 ? 32 : 16;  /* weight bytes a group */
    const char* next = (const char*)wr[0].w + NW * G * gb + p * NW * 2 * gb;  /* the next NW rows follow */
    for (int64_t b = 0; b < NW * 2 * gb; b += 64) PREFETCH(next + b);  /* these: stream them in at this pace */
    v32b lo[4], hi[4];
    for (int w = 0; w < NW; w++) {
        if (B == 6) {
            v32b_six(wr[w].w + p * 32, wr[w].h + p * 16, &lo[w], &hi[w]);
        } else if (B == 8) {
            const int8_t* q = (const int8_t*)wr[w].w + p * 64;
            v32b_halves(q, q + 32, &lo[w], &hi[w]);
        } else if (B == 5) {
            v32b_five(wr[w].w + p * 32, wr[w].h + p * 8, &lo[w], &hi[w]);
        } else {
            v32b_nibbles(wr[w].w + p * 32, &lo[w], &hi[w]);
            if (B == NL4) {  /* the codebook's values for the indices: signed bytes */
                lo[w] = v32b_lookup(wr[w].l, lo[w]);
                hi[w] = v32b_lookup(wr[w].l, hi[w]);
            }
        }
    }
    for (int r = 0; r < MB; r++) {
        const v32b x0 = v32b_load(xq + r * K + p * 64), x1 = v32b_load(xq + r * K + p * 64 + 32);
        const v8f xr = v8f_load(xd + r * XS + 8 * p);
        for (int w = 0; w < NW; w++) {
            if (B == 6) {  /* first and second halves: a scale each */
                const v8f d0 = v8f_mul(v8f_from_i32(v8i_sdot4(lo[w], x0)), xr);
                acc[w * MB + r] = v8f_fmadd(d0, sq[w], acc[w * MB + r]);
                const v8f d1 = v8f_mul(v8f_from_i32(v8i_sdot4(hi[w], x1)), xr);
                acc[w * MB + r] = v8f_fmadd(d1, sq[NW + w], acc[w * MB + r]);
                continue;
            }
            const v8i dot = B == 8 || B == NL4 ? v8i_sdot4x2(lo[w], x0, hi[w], x1) : v8i_dot4x2(lo[w], x0, hi[w], x1);
            const v8f d = v8f_mul(v8f_from_i32(dot), xr);
            acc[w * MB + r] = v8f_fmadd(d, sq[w], acc[w * MB + r]);
        }
    }
}

/* NW int4, int5, int6, int8 or codebook (B 4, 5, 6, 8, NL4) weight rows (wr) against MB rows of int8
   activations (xd: quantize_rows' per-step scales): output w MB + r is row r against weight row w, each with its
   own accumulator and the same operations whatever NW and MB (so its bits do not depend on the
   batch); the weights unpacked once for all MB rows. */
static inline __attribute__((always_inline)) void q8tile(const int8_t* xq, const float* xd, const float* xs,
        int64_t K, const qpart_t* wr, float* out, const int NW, const int MB, const int B) {
    const int64_t G = K / 32, P = G / 2, XS = XD8_STRIDE(G);
    /* super-blocks (all NW rows are one part's): their offsets' term summed here, a super-block at a time */
    const int k = (B == 4 || B == 5) && wr[0].k;
    v8f acc[16], sv[4], sq[8], ue[4], uo[4], ko[4], kacc[16];  /* sq[NW + w]: int6's second halves */
    for (int i = 0; i < NW * MB; i++) acc[i] = kacc[i] = v8f_zero();
    int64_t p = 0;
    for (; p + 4 <= P; p += 4) {  /* 8 groups: their scales converted once (int6: their 16-column ones too) */
        for (int w = 0; w < NW; w++) {
            if (k) {  /* groups 2p .. 2p + 7: a super-block */
                factors8(wr[w], 2 * p, B, sv + w, ko + w);
                for (int r = 0; r < MB; r++)
                    kacc[w * MB + r] = v8f_fmadd(ko[w], v8f_load(xs + r * G + 2 * p), kacc[w * MB + r]);
            } else {
                factors8(wr[w], 2 * p, B, sv + w, 0);
            }
            if (B == 6) v8f_from_s8_pairs(wr[w].u + 4 * p, ue + w, uo + w);  /* first halves', second halves' */
        }
        for (int j = 0; j < 4; j++) {
            for (int w = 0; w < NW; w++) {
                sq[w] = v8f_quad(sv[w], j);
                if (B == 6) {  /* six_scales' products */
                    sq[NW + w] = v8f_mul(sq[w], v8f_quad(uo[w], j));
                    sq[w] = v8f_mul(sq[w], v8f_quad(ue[w], j));
                }
            }
            pair_step(xq, xd, K, G, wr, p + j, sq, acc, NW, MB, B);
        }
    }
    for (; p < P; p++) {  /* the last pairs short of 8 groups, their scales one by one (the same values) */
        for (int w = 0; w < NW; w++) {
            sq[w] = v8f_pair(group_scale(wr[w], 2 * p, B), group_scale(wr[w], 2 * p + 1, B));
            if (B == 6) six_scales(wr[w].u, p, sq + w, sq + NW + w);
        }
        pair_step(xq, xd, K, G, wr, p, sq, acc, NW, MB, B);
    }
    if (G % 2) {
        const int64_t g = G - 1;
        for (int w = 0; w < NW; w++) {
            const v32b q = B == 6 ? six_alone(wr + w, g) : B == 5 ? five_alone(wr + w, g)
                           : B == 8 ? v32b_load((const int8_t*)wr[w].w + g * 32)
                           : B == NL4 ? v32b_lookup(wr[w].l, v32b_nibbles1(wr[w].w + g * 16))
                           : v32b_nibbles1(wr[w].w + g * 16);
            const float s = group_scale(wr[w], g, B);  /* int6: a scale per half, lanes 0-3 and 4-7 */
            const v8f sq = B == 6 ? v8f_pair(s * (float)wr[w].u[2 * g], s * (float)wr[w].u[2 * g + 1]) : v8f_set1(s);
            for (int r = 0; r < MB; r++) {
                const v32b x = v32b_load(xq + r * K + g * 32);
                const v8f d = v8f_mul(v8f_from_i32(B == 4 || B == 5 ? v8i_dot4(q, x) : v8i_sdot4(q, x)),
                                      v8f_load(xd + r * XS + 4 * g));
                acc[w * MB + r] = v8f_fmadd(d, sq, acc[w * MB + r]);
            }
        }
    }
    for (int w = 0; w < NW; w++)  /* int6, int8 and codebook weights have no offsets */
        for (int r = 0; r < MB; r++)
            out[w * MB + r] = v8f_hsum(acc[w * MB + r])
                              + (k ? v8f_hsum(kacc[w * MB + r])
                                 : B == 4 || B == 5 ? offset_term(xs + r * G, G, wr[w], B) : 0.f);
}

/* One row of x against blocks nb0 .. nb1 - 1 of 4 weight rows of part p (the last block may be
   short), its outputs into y's columns c0 + n; B the part's kind and X8 whether the activations
   are int8, constants in each instance. A decode step streams its weights from memory once, and
   how it walks them decides its speed: the int8 path takes one weight row at a time (pair_step
   streams the next in at the pace this one is read: one stream, which the memory system serves
   best), the int16 path two at a time (two accumulation chains in flight). Over 7B-shaped int4
   weights on one thread (AVX-512 VNNI build) that read 13.5-18.4 GB/s in the int8 path, against
   8.5-14.2 for four rows at a time; the int16 path 12-17 against 9-15 (docs/internals.md). */
static inline __attribute__((always_inline)) void gemv_range(const void* xq, const float* xd, const float* xs,
        int64_t K, const qpart_t* p, int64_t nb0, int64_t nb1, float* sx, void* y, int64_t c0, int ybf, const int B,
        const int X8) {
    for (int64_t nb = nb0; nb < nb1; nb++) {
        const int64_t n = nb * 4, rows = p->n - n < 4 ? p->n - n : 4;
        float out[4];
        if (X8) {
            for (int64_t j = 0; j < rows; j++) {
                const qpart_t wr = weight_row(p, n + j, K, B);
                q8tile((const int8_t*)xq, xd, xs, K, &wr, out + j, 1, 1, B);
            }
        } else if (rows == 4) {
            ncols((const int16_t*)xq, xd, xs, K, p, n, B, sx, out, 2);
            ncols((const int16_t*)xq, xd, xs, K, p, n + 2, B, sx, out + 2, 2);
        } else {
            for (int64_t j = 0; j < rows; j++) ncols((const int16_t*)xq, xd, xs, K, p, n + j, B, sx, out + j, 1);
        }
        for (int64_t j = 0; j < rows; j++) store(y, c0 + n + j, out[j], ybf);
    }
}

/* The int8 path's rows m0 .. m1 - 1 against weight rows n0 .. n1 - 1 (see gemm_range): four
   weight rows against GEMM8_ROWS activation rows at a time (each activation step loaded once for
   the four: the activations, not the weights, are what these tiles read most), then one against
   one; the rest one weight row against 8, 4, 2 or 1 rows. */
#if defined(__AVX512VL__)
#define GEMM8_ROWS 4  /* 16 accumulators: AVX-512's 32 vector registers hold them */
#else
#define GEMM8_ROWS 2
#endif
static inline __attribute__((always_inline)) void gemm8_range(const int8_t* xq, const float* xd, const float* xs,
        int64_t K, const qpart_t* p, int64_t n0, int64_t n1, int64_t m0, int64_t m1, void* y, int64_t N, int64_t c0,
        int ybf, const int B) {
    const int64_t G = K / 32, XS = XD8_STRIDE(G);
    float out[16];
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
        const qpart_t four[4] = {weight_row(p, n, K, B), weight_row(p, n + 1, K, B), weight_row(p, n + 2, K, B),
                                 weight_row(p, n + 3, K, B)};
        int64_t m = m0;
        for (; m + GEMM8_ROWS <= m1; m += GEMM8_ROWS) {
            q8tile(xq + m * K, xd + m * XS, xs + m * G, K, four, out, 4, GEMM8_ROWS, B);
            for (int w = 0; w < 4; w++)
                for (int r = 0; r < GEMM8_ROWS; r++) store(y, (m + r) * N + c0 + n + w, out[w * GEMM8_ROWS + r], ybf);
        }
        for (; m < m1; m++) {
            q8tile(xq + m * K, xd + m * XS, xs + m * G, K, four, out, 4, 1, B);
            for (int w = 0; w < 4; w++) store(y, m * N + c0 + n + w, out[w], ybf);
        }
    }
    for (; n < n1; n++) {
        const qpart_t wr = weight_row(p, n, K, B);
        for (int64_t m = m0; m < m1;) {
            const int64_t left = m1 - m;
            const int8_t* xr = xq + m * K;
            if (left >= 8) q8tile(xr, xd + m * XS, xs + m * G, K, &wr, out, 1, 8, B);
            else if (left >= 4) q8tile(xr, xd + m * XS, xs + m * G, K, &wr, out, 1, 4, B);
            else if (left >= 2) q8tile(xr, xd + m * XS, xs + m * G, K, &wr, out, 1, 2, B);
            else q8tile(xr, xd + m * XS, xs + m * G, K, &wr, out, 1, 1, B);
            const int mb = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
            for (int r = 0; r < mb; r++) store(y, (m + r) * N + c0 + n, out[r], ybf);
            m += mb;
        }
    }
}

/* Rows m0 .. m1 - 1 of x against weight rows n0 .. n1 - 1 of part p, into y (N columns) at columns
   c0 + n: two weight rows against 4 activation rows at a time where there are (each activation
   block loaded once for both), else one weight row against 8, 4, 2 or 1; B the part's kind; X8:
   int8 activations, gemm8_range's */
static inline __attribute__((always_inline)) void gemm_range(const void* xqv, const float* xd, const float* xs,
        int64_t K, const qpart_t* p, int64_t n0, int64_t n1, int64_t m0, int64_t m1, float* sx, void* y, int64_t N,
        int64_t c0, int ybf, const int B, const int X8) {
    if (X8) {
        gemm8_range((const int8_t*)xqv, xd, xs, K, p, n0, n1, m0, m1, y, N, c0, ybf, B);
        return;
    }
    const int16_t* xq = (const int16_t*)xqv;
    const int64_t G = K / 32;
    const int k = B != 6;  /* each weight row's factors unpacked once (bits 6's pair factors fill the scratch) */
    float* kfa = k ? KF(sx, G, 0) : 0;
    float* kfb = k ? KF(sx, G, 1) : 0;
    for (int64_t n = n0; n < n1; n++) {
        const qpart_t wr = weight_row(p, n, K, B);
        float out[8];
        if (k) k_unpack(wr, G, kfa, B);
        if (n + 1 < n1 && m1 - m0 >= 4) {  /* two weight rows at a time, 4 activation rows each */
            const qpart_t wb = weight_row(p, n + 1, K, B);
            if (k) k_unpack(wb, G, kfb, B);
            int64_t m = m0;
            for (; m + 4 <= m1; m += 4) {
                qtile(xq + m * K, xd + m * G, xs + m * G, K, wr, wb, B, sx, kfa, kfb, out, 4);
                for (int r = 0; r < 4; r++) {
                    store(y, (m + r) * N + c0 + n, out[r], ybf);
                    store(y, (m + r) * N + c0 + n + 1, out[4 + r], ybf);
                }
            }
            for (; m < m1; m++) {
                qrows(xq + m * K, xd + m * G, xs + m * G, K, wr, B, sx, kfa, out, 1);
                qrows(xq + m * K, xd + m * G, xs + m * G, K, wb, B, sx, kfb, out + 1, 1);
                store(y, m * N + c0 + n, out[0], ybf);
                store(y, m * N + c0 + n + 1, out[1], ybf);
            }
            n++;
            continue;
        }
        for (int64_t m = m0; m < m1;) {
            const int64_t left = m1 - m;
            const int16_t* xr = xq + m * K;
            if (left >= 8) qrows(xr, xd + m * G, xs + m * G, K, wr, B, sx, kfa, out, 8);
            else if (left >= 4) qrows(xr, xd + m * G, xs + m * G, K, wr, B, sx, kfa, out, 4);
            else if (left >= 2) qrows(xr, xd + m * G, xs + m * G, K, wr, B, sx, kfa, out, 2);
            else qrows(xr, xd + m * G, xs + m * G, K, wr, B, sx, kfa, out, 1);
            const int mb = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
            for (int r = 0; r < mb; r++) store(y, (m + r) * N + c0 + n, out[r], ybf);
            m += mb;
        }
    }
}

/* each kind's loops as a function of its own (a constant kind throughout: branch-free); X8 the
   int8 activations' instances */
#define KIND_LOOPS(B, X8, NAME) \
    static __attribute__((noinline)) void gemv_##NAME(const void* xq, const float* xd, const float* xs, int64_t K, \
            const qpart_t* p, int64_t nb0, int64_t nb1, float* sx, void* y, int64_t c0, int ybf) { \
        gemv_range(xq, xd, xs, K, p, nb0, nb1, sx, y, c0, ybf, B, X8); \
    } \
    static __attribute__((noinline)) void gemm_##NAME(const void* xq, const float* xd, const float* xs, int64_t K, \
            const qpart_t* p, int64_t n0, int64_t n1, int64_t m0, int64_t m1, float* sx, void* y, int64_t N, \
            int64_t c0, int ybf) { \
        gemm_range(xq, xd, xs, K, p, n0, n1, m0, m1, sx, y, N, c0, ybf, B, X8); \
    }
KIND_LOOPS(4, 0, 4)
KIND_LOOPS(5, 0, 5)
KIND_LOOPS(6, 0, 6)
KIND_LOOPS(8, 0, 8)
KIND_LOOPS(NL4, 0, NL4)
KIND_LOOPS(4, 1, 4x8)
KIND_LOOPS(5, 1, 5x8)
KIND_LOOPS(NL4, 1, NL4x8)
KIND_LOOPS(6, 1, 6x8)
KIND_LOOPS(8, 1, 8x8)
#undef KIND_LOOPS

/* whether part p meets int8 activations: it asks for them (every kind has their kernel) */
static inline int int8_acts(const qpart_t* p) { return p->xbits == 8; }

/* y (M, N) = x (M, K) @ W.T for a weight of group-wise integer parts (N the sum of their rows;
   each part's outputs in its columns). One row (a decode step): blocks of 4 weight rows, walked
   as gemv_range says. More rows: in tiles of 64 (their integer copy stays in cache), two weight
   rows against 4 rows at a time (gemm_range). Each thread takes a contiguous share of the weight rows (every output is
   computed alone, so the split does not change its bits). x is rounded to int16 for the parts
   that take it, to int8 for those that take that (int8_acts), once for all of them. */
int quant_gemm(const void* xin, int xbf, int64_t M, int64_t K, const qpart_t* parts, int64_t nparts, void* y,
               int ybf) {
    use_threads();
    const int64_t G = K / 32;
    int64_t N = 0;
    int need8 = 0, need16 = 0;
    for (int64_t i = 0; i < nparts; i++) {
        N += parts[i].n;
        if (int8_acts(parts + i)) need8 = 1;
        else need16 = 1;
    }
    float* owned;
    const float* x = as_f32(xin, M * K, xbf, &owned);
    int16_t* xq16 = need16 ? (int16_t*)line_alloc((size_t)(M * K) * sizeof(int16_t)) : 0;
    int8_t* xq8 = need8 ? (int8_t*)line_alloc((size_t)(M * K)) : 0;
    float* xd16 = need16 ? (float*)line_alloc((size_t)(M * G) * sizeof(float)) : 0;
    float* xd8 = need8 ? (float*)line_alloc((size_t)(M * XD8_STRIDE(G)) * sizeof(float)) : 0;
    float* xs8 = need8 ? (float*)line_alloc((size_t)(M * G) * sizeof(float)) : 0;
    float* xs = (float*)line_alloc((size_t)(M * G) * sizeof(float));
    int failed = !x || !xs || (need16 && (!xq16 || !xd16)) || (need8 && (!xq8 || !xd8 || !xs8));
    if (!failed) quantize_rows(x, M, K, xq16, xd16, xq8, xd8, xs8, xs);
    for (int64_t m0 = 0, step = M == 1 ? 1 : 64; m0 < M && !failed; m0 += step) {
        const int64_t m1 = M < m0 + step ? M : m0 + step;
        for (int64_t i = 0, c0 = 0; i < nparts; c0 += parts[i].n, i++) {
            const qpart_t* p = parts + i;
            const int x8 = int8_acts(p), kind = x8 ? -kind_of(p) : kind_of(p);  /* negative: against int8 */
            const void* xq = x8 ? (const void*)xq8 : (const void*)xq16;
            const float* xd = x8 ? xd8 : xd16;
            const float* sums = x8 ? xs8 : xs;
            const int64_t units = M == 1 ? (p->n + 3) / 4 : p->n;  /* blocks of 4 rows, or rows */
            #pragma omp parallel
            {
                const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
                const int64_t u0 = units * t / T, u1 = units * (t + 1) / T;
                float* sx = u1 > u0 && !x8 ? scratch(8 * 2 * G, &failed) : 0;  /* the int16 path's factors (KF) */
                if (u1 > u0 && (sx || x8)) {  /* a share of the work, and its scratch */
                    if (M == 1) {
                        if (kind == 4) gemv_4(xq, xd, sums, K, p, u0, u1, sx, y, c0, ybf);
                        else if (kind == -4) gemv_4x8(xq, xd, sums, K, p, u0, u1, sx, y, c0, ybf);
                        else if (kind == -5) gemv_5x8(xq, xd, sums, K, p, u0, u1, sx, y, c0, ybf);
                        else if (kind == -NL4) gemv_NL4x8(xq, xd, sums, K, p, u0, u1, sx, y, c0, ybf);
                        else if (kind == -6) gemv_6x8(xq, xd, sums, K, p, u0, u1, sx, y, c0, ybf);
                        else if (kind == -8) gemv_8x8(xq, xd, sums, K, p, u0, u1, sx, y, c0, ybf);
                        else if (kind == 5) gemv_5(xq, xd, sums, K, p, u0, u1, sx, y, c0, ybf);
                        else if (kind == 6) gemv_6(xq, xd, sums, K, p, u0, u1, sx, y, c0, ybf);
                        else if (kind == NL4) gemv_NL4(xq, xd, sums, K, p, u0, u1, sx, y, c0, ybf);
                        else gemv_8(xq, xd, sums, K, p, u0, u1, sx, y, c0, ybf);
                    } else {
                        if (kind == 4) gemm_4(xq, xd, sums, K, p, u0, u1, m0, m1, sx, y, N, c0, ybf);
                        else if (kind == -4) gemm_4x8(xq, xd, sums, K, p, u0, u1, m0, m1, sx, y, N, c0, ybf);
                        else if (kind == -5) gemm_5x8(xq, xd, sums, K, p, u0, u1, m0, m1, sx, y, N, c0, ybf);
                        else if (kind == -NL4) gemm_NL4x8(xq, xd, sums, K, p, u0, u1, m0, m1, sx, y, N, c0, ybf);
                        else if (kind == -6) gemm_6x8(xq, xd, sums, K, p, u0, u1, m0, m1, sx, y, N, c0, ybf);
                        else if (kind == -8) gemm_8x8(xq, xd, sums, K, p, u0, u1, m0, m1, sx, y, N, c0, ybf);
                        else if (kind == 5) gemm_5(xq, xd, sums, K, p, u0, u1, m0, m1, sx, y, N, c0, ybf);
                        else if (kind == 6) gemm_6(xq, xd, sums, K, p, u0, u1, m0, m1, sx, y, N, c0, ybf);
                        else if (kind == NL4) gemm_NL4(xq, xd, sums, K, p, u0, u1, m0, m1, sx, y, N, c0, ybf);
                        else gemm_8(xq, xd, sums, K, p, u0, u1, m0, m1, sx, y, N, c0, ybf);
                    }
                }
                free(sx);
            }
        }
    }
    free(xq16);
    free(xq8);
    free(xd16);
    free(xd8);
    free(xs);
    free(xs8);
    free(owned);
    return failed ? OWNLM_ENOMEM : 0;
}

static inline __attribute__((always_inline)) void bf16_rows(const float* x, int64_t K, const uint16_t* wn, void* y,
                                                            int64_t yi, int64_t N, int ybf, const int MB) {
    const int64_t K8 = K - K % 8;
    v8f acc[8];
    for (int r = 0; r < MB; r++) acc[r] = v8f_zero();
    for (int64_t k = 0; k < K8; k += 8) {
        const v8f wv = v8f_from_bf16(wn + k);
        for (int r = 0; r < MB; r++) acc[r] = v8f_fmadd(v8f_load(x + r * K + k), wv, acc[r]);
    }
    for (int r = 0; r < MB; r++) {
        float v = v8f_hsum(acc[r]);
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

int ownlm_threads = 0;

/* the kernels' thread count from now on, in every calling thread (n < 1: the runtime's default) */
void ownlm_set_threads(int n) {
    ownlm_threads = n > 0 ? n : 0;
    if (n > 0) omp_set_num_threads(n);
}

/* the threads a parallel region of the kernels started from this thread would have */
int ownlm_get_threads(void) {
    use_threads();
    return omp_get_max_threads();
}

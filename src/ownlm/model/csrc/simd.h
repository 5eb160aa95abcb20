/* The vector operations matmul.c is written in, for x86-64 AVX2 (with FMA and F16C) and for ARM
   NEON (AArch64). Each NEON operation gives the bits its AVX2 twin gives: 8 float lanes are two
   128-bit halves, sums across lanes follow the AVX2 reduction tree, and multiply-adds are fused
   on both, so a kernel computes the same results on either CPU (tests/test_neon.py runs the
   NEON build under qemu against the x86 one).

   v8f: 8 floats; v8i: 8 int32; v16h: 16 int16; b16: 16 bytes; v32b: 32 int8 (or bytes). The
   attention kernel (attention.c) is written in them too. */

#ifndef OWNLM_SIMD_H
#define OWNLM_SIMD_H

#include <stdint.h>

#if defined(__AVX2__)
#include <immintrin.h>

typedef __m256 v8f;
typedef __m256i v8i;
typedef __m256i v16h;
typedef __m128i b16;
typedef __m256i v32b;

static inline v8f v8f_load(const float* p) { return _mm256_loadu_ps(p); }
static inline void v8f_store(float* p, v8f v) { _mm256_storeu_ps(p, v); }
static inline v8f v8f_zero(void) { return _mm256_setzero_ps(); }
static inline v8f v8f_set1(float f) { return _mm256_set1_ps(f); }
static inline v8f v8f_add(v8f a, v8f b) { return _mm256_add_ps(a, b); }
static inline v8f v8f_mul(v8f a, v8f b) { return _mm256_mul_ps(a, b); }
static inline v8f v8f_fmadd(v8f a, v8f b, v8f c) { return _mm256_fmadd_ps(a, b, c); } /* a b + c, one rounding */
static inline v8f v8f_abs(v8f a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
static inline v8f v8f_max(v8f a, v8f b) { return _mm256_max_ps(a, b); }
static inline v8f v8f_from_i32(v8i a) { return _mm256_cvtepi32_ps(a); }
static inline v8f v8f_from_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
static inline v8f v8f_from_i8(const int8_t* p) {  /* 8 int8 */
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
/* a's first 8 bytes (half 0) or its last 8 (half 1), unsigned, as floats */
static inline v8f v8f_from_u8(b16 a, int half) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(half ? _mm_srli_si128(a, 8) : a));
}
/* A Q4_K / Q5_K super-block's 16 header bytes h -> its 8 six-bit scales, then its 8 mins, one a byte:
   with h's 32-bit words [d dmin, A, B, C], scales 0-3 are A's bytes' low 6 bits, mins 0-3 B's,
   scales 4-7 C's low nibbles with A's top 2 bits above them, mins 4-7 C's high nibbles with B's */
static inline b16 b16_k_scales(b16 h) {
    const __m128i lows = _mm_and_si128(_mm_srlv_epi32(_mm_shuffle_epi32(h, _MM_SHUFFLE(3, 2, 3, 1)),
                                                      _mm_setr_epi32(0, 0, 0, 4)),
                                       _mm_setr_epi32(0x3F3F3F3F, 0x0F0F0F0F, 0x3F3F3F3F, 0x0F0F0F0F));
    const __m128i tops = _mm_and_si128(_mm_srli_epi32(_mm_shuffle_epi32(h, _MM_SHUFFLE(2, 2, 1, 1)), 2),
                                       _mm_setr_epi32(0, 0x30303030, 0, 0x30303030));
    return _mm_or_si128(lows, tops);
}
static inline v8f v8f_from_bf16(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
/* lanes 0 0 1 1 2 2 3 3 and 4 4 5 5 6 6 7 7 */
static inline v8f v8f_dup_lo(v8f a) { return _mm256_permutevar8x32_ps(a, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)); }
static inline v8f v8f_dup_hi(v8f a) { return _mm256_permutevar8x32_ps(a, _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7)); }
static inline v8f v8f_sub(v8f a, v8f b) { return _mm256_sub_ps(a, b); }
static inline v8f v8f_fnmadd(v8f a, v8f b, v8f c) { return _mm256_fnmadd_ps(a, b, c); } /* c - a b, one rounding */
static inline v8f v8f_round(v8f a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* 2^e for integer lanes e in [-126, 127] */
static inline v8f v8f_exp2i(v8i e) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
}
/* [a0 + a1, a2 + a3, b0 + b1, b2 + b3, a4 + a5, a6 + a7, b4 + b5, b6 + b7] */
static inline v8f v8f_hadd(v8f a, v8f b) { return _mm256_hadd_ps(a, b); }
/* a's low 4 lanes then b's low 4, and a's high 4 then b's high 4 */
static inline v8f v8f_lows(v8f a, v8f b) { return _mm256_permute2f128_ps(a, b, 0x20); }
static inline v8f v8f_highs(v8f a, v8f b) { return _mm256_permute2f128_ps(a, b, 0x31); }
static inline float v8f_hsum(v8f v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline float v8f_hmax(v8f v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline v8i v8i_round(v8f a) { return _mm256_cvtps_epi32(a); } /* to nearest, ties to even */
static inline v8i v8i_add(v8i a, v8i b) { return _mm256_add_epi32(a, b); }
/* lane i: a[2i] b[2i] + a[2i+1] b[2i+1] */
static inline v8i v8i_madd(v16h a, v16h b) { return _mm256_madd_epi16(a, b); }
/* v8i_madd(a, b) + v8i_madd(c, d) (exact in int32 for the kernels' values: the same bits either way) */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
static inline v8i v8i_madd2(v16h a, v16h b, v16h c, v16h d) {
    return _mm256_dpwssd_epi32(_mm256_madd_epi16(a, b), c, d);
}
#else
static inline v8i v8i_madd2(v16h a, v16h b, v16h c, v16h d) {
    return _mm256_add_epi32(_mm256_madd_epi16(a, b), _mm256_madd_epi16(c, d));
}
#endif

static inline v16h v16h_load(const int16_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
static inline void v16h_store(int16_t* p, v16h v) { _mm256_storeu_si256((__m256i*)p, v); }
/* a's 8 values then b's, saturated to int16 */
static inline v16h v16h_pack(v8i a, v8i b) { return _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8); }
static inline v16h v16h_from_u8(b16 a) { return _mm256_cvtepu8_epi16(a); }
static inline v16h v16h_from_i8(const int8_t* p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)p)); }
static inline v16h v16h_from_s8(b16 a) { return _mm256_cvtepi8_epi16(a); }
static inline v16h v16h_sub(v16h a, int16_t b) { return _mm256_sub_epi16(a, _mm256_set1_epi16(b)); }
/* the 16 low nibbles of a's bytes, then the 16 high ones, as int16 (one widening, then lane ops) */
static inline void v16h_nibbles(b16 a, v16h* lo, v16h* hi) {
    const __m256i v = _mm256_cvtepu8_epi16(a);
    *lo = _mm256_and_si256(v, _mm256_set1_epi16(0x0F));
    *hi = _mm256_srli_epi16(v, 4);
}

static inline b16 b16_load(const uint8_t* p) { return _mm_loadu_si128((const __m128i*)p); }
static inline b16 b16_from_u64(uint64_t v) { return _mm_cvtsi64_si128((long long)v); }  /* v's bytes, then 0 */
static inline b16 b16_or(b16 a, b16 b) { return _mm_or_si128(a, b); }
/* byte i: table[idx[i]] (idx below 16) */
static inline b16 b16_lookup(b16 table, b16 idx) { return _mm_shuffle_epi8(table, idx); }
/* each byte: (a >> n) & mask */
static inline b16 b16_shr_and(b16 a, int n, uint8_t mask) {
    return _mm_and_si128(_mm_srli_epi16(a, n), _mm_set1_epi8((char)mask));
}
/* each byte (of values below 16) << 4 */
static inline b16 b16_shl4(b16 a) { return _mm_slli_epi16(a, 4); }
/* byte 4 L + j: bit L + 4 half of byte j of the 4 bytes of m */
static inline b16 b16_bits5(uint32_t m, int half) {
    const __m128i s = half ? _mm_setr_epi32(4, 5, 6, 7) : _mm_setr_epi32(0, 1, 2, 3);
    return _mm_and_si128(_mm_srlv_epi32(_mm_set1_epi32((int)m), s), _mm_set1_epi8(1));
}
/* byte i of h's 8 (i < 8): bits 2 (2 half) of byte i; byte 8 + i: bits 2 (2 half + 1) of byte i */
static inline b16 b16_bits6(const uint8_t* h, int half) {
    const __m128i b = _mm_loadl_epi64((const __m128i*)h);
    const __m128i lo = half ? _mm_srli_epi16(b, 4) : b, hi = half ? _mm_srli_epi16(b, 6) : _mm_srli_epi16(b, 2);
    return _mm_and_si128(_mm_unpacklo_epi64(lo, hi), _mm_set1_epi8(3));
}

/* v32b: 32 bytes, the int8 activations' operand (matmul.c's int8 path) */
static inline v32b v32b_load(const int8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
/* a's 16 bytes then b's */
static inline v32b v32b_join(b16 a, b16 b) { return _mm256_set_m128i(b, a); }
/* v's first 16 bytes (half 0) or its last 16 (half 1) */
static inline b16 v32b_half(v32b v, int half) {
    return half ? _mm256_extracti128_si256(v, 1) : _mm256_castsi256_si128(v);
}
/* each byte of idx (0 .. 15) replaced by that entry of table's 16 int8 */
static inline v32b v32b_lookup(const int8_t* table, v32b idx) {
    return _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)table)), idx);
}
/* a's 16 bytes then b's, each less 32 (int6 values 0 .. 63 as signed -32 .. 31) */
static inline v32b v32b_join_less32(b16 a, b16 b) {
    return _mm256_sub_epi8(_mm256_set_m128i(b, a), _mm256_set1_epi8(32));
}
/* the 32 values of a, b, c, d in that order, saturated to int8 */
static inline v32b v32b_pack(v8i a, v8i b, v8i c, v8i d) {
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
    return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}
/* the low 16 bytes of v at lo, the high 16 at hi */
static inline void v32b_store2(int8_t* lo, int8_t* hi, v32b v) {
    _mm_storeu_si128((__m128i*)lo, _mm256_castsi256_si128(v));
    _mm_storeu_si128((__m128i*)hi, _mm256_extracti128_si256(v, 1));
}
/* the low nibbles of the 32 bytes at p, and their high nibbles */
static inline void v32b_nibbles(const uint8_t* p, v32b* lo, v32b* hi) {
    const __m256i b = _mm256_loadu_si256((const __m256i*)p), m = _mm256_set1_epi8(0x0F);
    *lo = _mm256_and_si256(b, m);
    *hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m);
}
/* the low nibbles of the 16 bytes at p, then their high nibbles */
static inline v32b v32b_nibbles1(const uint8_t* p) {
    const __m128i b = _mm_loadu_si128((const __m128i*)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(0x0F));
}
/* a pair of int5 groups (w: their 32 bytes of low nibbles, h: their 8 bytes of fifth bits, see
   matmul.c) as bytes 0 .. 31: the two groups' first 16 values (lo), their last 16 (hi) */
static inline void v32b_five(const uint8_t* w, const uint8_t* h, v32b* lo, v32b* hi) {
    v32b l, u;
    v32b_nibbles(w, &l, &u);
    /* lanes 0-3 the first group's 4 bytes of fifth bits, lanes 4-7 the second's; byte k of lane i
       takes bit i (first halves) or 4 + i (second halves) of byte k, moved to bit 4 */
    const __m256i m = _mm256_permutevar8x32_epi32(_mm256_castsi128_si256(_mm_loadl_epi64((const __m128i*)h)),
                                                  _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
    const __m256i bit = _mm256_set1_epi8(0x10);
    *lo = _mm256_or_si256(l, _mm256_and_si256(_mm256_sllv_epi32(m, _mm256_setr_epi32(4, 3, 2, 1, 4, 3, 2, 1)), bit));
    *hi = _mm256_or_si256(u, _mm256_and_si256(_mm256_srlv_epi32(m, _mm256_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3)), bit));
}
/* a pair of int6 groups (w: their 32 bytes of low nibbles, h: their 16 bytes of top bits, see
   matmul.c), less 32, as signed bytes: the two groups' first 16 values (lo), their last 16 (hi) */
static inline void v32b_six(const uint8_t* w, const uint8_t* h, v32b* lo, v32b* hi) {
    v32b l, u;
    v32b_nibbles(w, &l, &u);
    /* each group's 8 bytes of top bits twice: values 0-7 / 8-15 of the first halves take bits 0-1 / 2-3
       of them, values 16-23 / 24-31 bits 4-5 / 6-7; moved to bits 4-5 of each byte */
    const __m256i t = _mm256_permute4x64_epi64(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)h)), 0x50);
    const __m256i m = _mm256_set1_epi8(0x30), k = _mm256_set1_epi8(32);
    const __m256i top0 = _mm256_and_si256(_mm256_sllv_epi64(t, _mm256_setr_epi64x(4, 2, 4, 2)), m);
    const __m256i top1 = _mm256_and_si256(_mm256_srlv_epi64(t, _mm256_setr_epi64x(0, 2, 0, 2)), m);
    *lo = _mm256_sub_epi8(_mm256_or_si256(l, top0), k);
    *hi = _mm256_sub_epi8(_mm256_or_si256(u, top1), k);
}
/* lane i: the sum over bytes 4i .. 4i + 3 of u s (u's bytes 0 .. 63, s's int8 -127 .. 127), and
   v8i_dot4x2: that of u s plus that of v t; exact either way, so the same integers on every build */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
static inline v8i v8i_dot4(v32b u, v32b s) { return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s); }
static inline v8i v8i_dot4x2(v32b u, v32b s, v32b v, v32b t) {
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s), v, t);
}
#else
static inline v8i v8i_dot4(v32b u, v32b s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
static inline v8i v8i_dot4x2(v32b u, v32b s, v32b v, v32b t) {  /* int16 pair sums below 2^15: exact */
    const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(u, s), _mm256_maddubs_epi16(v, t));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}
#endif
/* v8i_dot4's sums for signed bytes u (int8 -128 .. 127), as |u| against s carrying u's sign
   (s's int8 -127 .. 127), each product's pairs summed to int32 before the two halves meet: exact */
static inline v8i v8i_sdot4(v32b u, v32b s) { return v8i_dot4(_mm256_abs_epi8(u), _mm256_sign_epi8(s, u)); }
static inline v8i v8i_sdot4x2(v32b u, v32b s, v32b v, v32b t) {
    return _mm256_add_epi32(v8i_sdot4(u, s), v8i_sdot4(v, t));
}
/* the 16 first bytes of the 32 at p, then the 16 first of the 32 at q; and their last 16 */
static inline void v32b_halves(const int8_t* p, const int8_t* q, v32b* lo, v32b* hi) {
    const __m256i a = _mm256_loadu_si256((const __m256i*)p), b = _mm256_loadu_si256((const __m256i*)q);
    *lo = _mm256_permute2x128_si256(a, b, 0x20);
    *hi = _mm256_permute2x128_si256(a, b, 0x31);
}
/* a in lanes 0-3, b in lanes 4-7 */
static inline v8f v8f_pair(float a, float b) { return _mm256_set_m128(_mm_set1_ps(b), _mm_set1_ps(a)); }
/* the 16 int8 at p as floats: those at even places (even) and those at odd places (odd) */
static inline void v8f_from_s8_pairs(const int8_t* p, v8f* even, v8f* odd) {
    const __m128i b = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i*)p),
                                       _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
    *even = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    *odd = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
}
/* lanes 2j, 2j, 2j, 2j, 2j + 1, 2j + 1, 2j + 1, 2j + 1 of f (j 0 .. 3) */
static inline v8f v8f_quad(v8f f, int j) {
    return _mm256_permutevar8x32_ps(f, _mm256_add_epi32(_mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1),
                                                        _mm256_set1_epi32(2 * j)));
}

static inline float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }
static inline uint16_t f32_to_f16(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); } /* nearest even */

#elif defined(__ARM_NEON)
#include <arm_neon.h>

typedef struct { float32x4_t lo, hi; } v8f;
typedef struct { int32x4_t lo, hi; } v8i;
typedef struct { int16x8_t lo, hi; } v16h;
typedef uint8x16_t b16;
typedef struct { int8x16_t lo, hi; } v32b;

static inline v8f v8f_make(float32x4_t lo, float32x4_t hi) { v8f r = {lo, hi}; return r; }
static inline v8f v8f_load(const float* p) { return v8f_make(vld1q_f32(p), vld1q_f32(p + 4)); }
static inline void v8f_store(float* p, v8f v) { vst1q_f32(p, v.lo); vst1q_f32(p + 4, v.hi); }
static inline v8f v8f_zero(void) { return v8f_make(vdupq_n_f32(0.f), vdupq_n_f32(0.f)); }
static inline v8f v8f_set1(float f) { return v8f_make(vdupq_n_f32(f), vdupq_n_f32(f)); }
static inline v8f v8f_add(v8f a, v8f b) { return v8f_make(vaddq_f32(a.lo, b.lo), vaddq_f32(a.hi, b.hi)); }
static inline v8f v8f_mul(v8f a, v8f b) { return v8f_make(vmulq_f32(a.lo, b.lo), vmulq_f32(a.hi, b.hi)); }
static inline v8f v8f_fmadd(v8f a, v8f b, v8f c) {
    return v8f_make(vfmaq_f32(c.lo, a.lo, b.lo), vfmaq_f32(c.hi, a.hi, b.hi));
}
static inline v8f v8f_abs(v8f a) { return v8f_make(vabsq_f32(a.lo), vabsq_f32(a.hi)); }
static inline v8f v8f_max(v8f a, v8f b) { return v8f_make(vmaxq_f32(a.lo, b.lo), vmaxq_f32(a.hi, b.hi)); }
static inline v8f v8f_from_i32(v8i a) { return v8f_make(vcvtq_f32_s32(a.lo), vcvtq_f32_s32(a.hi)); }
static inline v8f v8f_from_f16(const uint16_t* p) {
    const float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(p));
    return v8f_make(vcvt_f32_f16(vget_low_f16(h)), vcvt_f32_f16(vget_high_f16(h)));
}
static inline v8f v8f_from_i8(const int8_t* p) {
    const int16x8_t w = vmovl_s8(vld1_s8(p));
    return v8f_make(vcvtq_f32_s32(vmovl_s16(vget_low_s16(w))), vcvtq_f32_s32(vmovl_s16(vget_high_s16(w))));
}
static inline v8f v8f_from_u8(b16 a, int half) {
    const uint16x8_t w = vmovl_u8(half ? vget_high_u8(a) : vget_low_u8(a));
    return v8f_make(vcvtq_f32_u32(vmovl_u16(vget_low_u16(w))), vcvtq_f32_u32(vmovl_u16(vget_high_u16(w))));
}
static inline b16 b16_k_scales(b16 h) {
    static const uint8_t first[16] = {4, 5, 6, 7, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15};  /* A C B C */
    static const uint8_t second[16] = {4, 5, 6, 7, 4, 5, 6, 7, 8, 9, 10, 11, 8, 9, 10, 11};     /* A A B B */
    static const int32_t shift[4] = {0, 0, 0, -4};
    static const uint32_t low_mask[4] = {0x3F3F3F3F, 0x0F0F0F0F, 0x3F3F3F3F, 0x0F0F0F0F};
    static const uint32_t top_mask[4] = {0, 0x30303030, 0, 0x30303030};
    const uint32x4_t acbc = vreinterpretq_u32_u8(vqtbl1q_u8(h, vld1q_u8(first)));
    const uint32x4_t aabb = vreinterpretq_u32_u8(vqtbl1q_u8(h, vld1q_u8(second)));
    const uint32x4_t lows = vandq_u32(vshlq_u32(acbc, vld1q_s32(shift)), vld1q_u32(low_mask));
    const uint32x4_t tops = vandq_u32(vshrq_n_u32(aabb, 2), vld1q_u32(top_mask));
    return vreinterpretq_u8_u32(vorrq_u32(lows, tops));
}
static inline v8f v8f_from_bf16(const uint16_t* p) {
    const uint16x8_t h = vld1q_u16(p);
    return v8f_make(vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16)),
                    vreinterpretq_f32_u32(vshll_n_u16(vget_high_u16(h), 16)));
}
static inline v8f v8f_dup_lo(v8f a) { return v8f_make(vzip1q_f32(a.lo, a.lo), vzip2q_f32(a.lo, a.lo)); }
static inline v8f v8f_dup_hi(v8f a) { return v8f_make(vzip1q_f32(a.hi, a.hi), vzip2q_f32(a.hi, a.hi)); }
static inline v8f v8f_sub(v8f a, v8f b) { return v8f_make(vsubq_f32(a.lo, b.lo), vsubq_f32(a.hi, b.hi)); }
static inline v8f v8f_fnmadd(v8f a, v8f b, v8f c) {
    return v8f_make(vfmsq_f32(c.lo, a.lo, b.lo), vfmsq_f32(c.hi, a.hi, b.hi));
}
static inline v8f v8f_round(v8f a) { return v8f_make(vrndnq_f32(a.lo), vrndnq_f32(a.hi)); }
static inline v8f v8f_hadd(v8f a, v8f b) { return v8f_make(vpaddq_f32(a.lo, b.lo), vpaddq_f32(a.hi, b.hi)); }
static inline v8f v8f_lows(v8f a, v8f b) { return v8f_make(a.lo, b.lo); }
static inline v8f v8f_highs(v8f a, v8f b) { return v8f_make(a.hi, b.hi); }
static inline float v8f_hsum(v8f v) {  /* AVX2's tree: (0+4, 1+5, 2+6, 3+7), then (a+c, b+d), then the two */
    const float32x4_t s = vaddq_f32(v.lo, v.hi);
    const float32x2_t t = vadd_f32(vget_low_f32(s), vget_high_f32(s));
    return vget_lane_f32(t, 0) + vget_lane_f32(t, 1);
}
static inline float v8f_hmax(v8f v) {
    const float32x4_t s = vmaxq_f32(v.lo, v.hi);
    const float32x2_t t = vmax_f32(vget_low_f32(s), vget_high_f32(s));
    const float a = vget_lane_f32(t, 0), b = vget_lane_f32(t, 1);
    return a > b ? a : b;
}

static inline v8i v8i_round(v8f a) { v8i r = {vcvtnq_s32_f32(a.lo), vcvtnq_s32_f32(a.hi)}; return r; }
static inline v8i v8i_add(v8i a, v8i b) { v8i r = {vaddq_s32(a.lo, b.lo), vaddq_s32(a.hi, b.hi)}; return r; }
static inline v8f v8f_exp2i(v8i e) {
    const int32x4_t b = vdupq_n_s32(127);
    return v8f_make(vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(e.lo, b), 23)),
                    vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(e.hi, b), 23)));
}
static inline v8i v8i_madd(v16h a, v16h b) {
    const int32x4_t p0 = vmull_s16(vget_low_s16(a.lo), vget_low_s16(b.lo));
    const int32x4_t p1 = vmull_high_s16(a.lo, b.lo);
    const int32x4_t p2 = vmull_s16(vget_low_s16(a.hi), vget_low_s16(b.hi));
    const int32x4_t p3 = vmull_high_s16(a.hi, b.hi);
    v8i r = {vpaddq_s32(p0, p1), vpaddq_s32(p2, p3)};
    return r;
}
static inline v8i v8i_madd2(v16h a, v16h b, v16h c, v16h d) { return v8i_add(v8i_madd(a, b), v8i_madd(c, d)); }

static inline v16h v16h_load(const int16_t* p) { v16h r = {vld1q_s16(p), vld1q_s16(p + 8)}; return r; }
static inline void v16h_store(int16_t* p, v16h v) { vst1q_s16(p, v.lo); vst1q_s16(p + 8, v.hi); }
static inline v16h v16h_pack(v8i a, v8i b) {
    v16h r = {vcombine_s16(vqmovn_s32(a.lo), vqmovn_s32(a.hi)), vcombine_s16(vqmovn_s32(b.lo), vqmovn_s32(b.hi))};
    return r;
}
static inline v16h v16h_from_u8(b16 a) {
    v16h r = {vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(a))), vreinterpretq_s16_u16(vmovl_high_u8(a))};
    return r;
}
static inline v16h v16h_from_i8(const int8_t* p) {
    const int8x16_t a = vld1q_s8(p);
    v16h r = {vmovl_s8(vget_low_s8(a)), vmovl_high_s8(a)};
    return r;
}
static inline v16h v16h_from_s8(b16 a) {
    const int8x16_t s = vreinterpretq_s8_u8(a);
    v16h r = {vmovl_s8(vget_low_s8(s)), vmovl_high_s8(s)};
    return r;
}
static inline v16h v16h_sub(v16h a, int16_t b) {
    v16h r = {vsubq_s16(a.lo, vdupq_n_s16(b)), vsubq_s16(a.hi, vdupq_n_s16(b))};
    return r;
}
static inline void v16h_nibbles(b16 a, v16h* lo, v16h* hi) {
    *lo = v16h_from_u8(vandq_u8(a, vdupq_n_u8(0x0F)));
    *hi = v16h_from_u8(vshrq_n_u8(a, 4));
}

static inline b16 b16_load(const uint8_t* p) { return vld1q_u8(p); }
static inline b16 b16_from_u64(uint64_t v) { return vcombine_u8(vcreate_u8(v), vdup_n_u8(0)); }
static inline b16 b16_or(b16 a, b16 b) { return vorrq_u8(a, b); }
static inline b16 b16_lookup(b16 table, b16 idx) { return vqtbl1q_u8(table, idx); }
static inline b16 b16_shr_and(b16 a, int n, uint8_t mask) {
    return vandq_u8(vshlq_u8(a, vdupq_n_s8((int8_t)-n)), vdupq_n_u8(mask));
}
static inline b16 b16_shl4(b16 a) { return vshlq_n_u8(a, 4); }
static inline b16 b16_bits5(uint32_t m, int half) {
    static const int32_t shifts[2][4] = {{0, -1, -2, -3}, {-4, -5, -6, -7}};
    const uint32x4_t v = vshlq_u32(vdupq_n_u32(m), vld1q_s32(shifts[half]));
    return vandq_u8(vreinterpretq_u8_u32(v), vdupq_n_u8(1));
}
static inline b16 b16_bits6(const uint8_t* h, int half) {
    const uint8x8_t b = vld1_u8(h);
    const uint8x16_t both = half ? vcombine_u8(vshr_n_u8(b, 4), vshr_n_u8(b, 6)) : vcombine_u8(b, vshr_n_u8(b, 2));
    return vandq_u8(both, vdupq_n_u8(3));
}

static inline v32b v32b_load(const int8_t* p) { v32b r = {vld1q_s8(p), vld1q_s8(p + 16)}; return r; }
static inline v32b v32b_join(b16 a, b16 b) { v32b r = {vreinterpretq_s8_u8(a), vreinterpretq_s8_u8(b)}; return r; }
static inline b16 v32b_half(v32b v, int half) { return vreinterpretq_u8_s8(half ? v.hi : v.lo); }
static inline v32b v32b_lookup(const int8_t* table, v32b idx) {
    const int8x16_t t = vld1q_s8(table);
    v32b r = {vqtbl1q_s8(t, vreinterpretq_u8_s8(idx.lo)), vqtbl1q_s8(t, vreinterpretq_u8_s8(idx.hi))};
    return r;
}
static inline v32b v32b_join_less32(b16 a, b16 b) {
    v32b r = {vsubq_s8(vreinterpretq_s8_u8(a), vdupq_n_s8(32)), vsubq_s8(vreinterpretq_s8_u8(b), vdupq_n_s8(32))};
    return r;
}
static inline int8x16_t five16(uint8x16_t q, uint32_t m, int half) {  /* q | fifth bits << 4 */
    return vreinterpretq_s8_u8(vorrq_u8(q, vshlq_n_u8(b16_bits5(m, half), 4)));
}
static inline void v32b_five(const uint8_t* w, const uint8_t* h, v32b* lo, v32b* hi) {
    const uint8x16_t a = vld1q_u8(w), b = vld1q_u8(w + 16), k = vdupq_n_u8(0x0F);
    uint32_t ma, mb;
    __builtin_memcpy(&ma, h, 4);
    __builtin_memcpy(&mb, h + 4, 4);
    lo->lo = five16(vandq_u8(a, k), ma, 0);
    lo->hi = five16(vandq_u8(b, k), mb, 0);
    hi->lo = five16(vshrq_n_u8(a, 4), ma, 1);
    hi->hi = five16(vshrq_n_u8(b, 4), mb, 1);
}
static inline int8x16_t six16(uint8x16_t q, uint8x16_t top) {  /* (q | top & 0x30) - 32 */
    return vreinterpretq_s8_u8(vsubq_u8(vorrq_u8(q, vandq_u8(top, vdupq_n_u8(0x30))), vdupq_n_u8(32)));
}
static inline void v32b_six(const uint8_t* w, const uint8_t* h, v32b* lo, v32b* hi) {
    const uint8x16_t a = vld1q_u8(w), b = vld1q_u8(w + 16), m = vdupq_n_u8(0x0F);
    const uint8x8_t h0 = vld1_u8(h), h1 = vld1_u8(h + 8);
    lo->lo = six16(vandq_u8(a, m), vcombine_u8(vshl_n_u8(h0, 4), vshl_n_u8(h0, 2)));
    lo->hi = six16(vandq_u8(b, m), vcombine_u8(vshl_n_u8(h1, 4), vshl_n_u8(h1, 2)));
    hi->lo = six16(vshrq_n_u8(a, 4), vcombine_u8(h0, vshr_n_u8(h0, 2)));
    hi->hi = six16(vshrq_n_u8(b, 4), vcombine_u8(h1, vshr_n_u8(h1, 2)));
}
static inline int8x16_t s8_pack(v8i a, v8i b) {
    return vcombine_s8(vqmovn_s16(vcombine_s16(vqmovn_s32(a.lo), vqmovn_s32(a.hi))),
                       vqmovn_s16(vcombine_s16(vqmovn_s32(b.lo), vqmovn_s32(b.hi))));
}
static inline v32b v32b_pack(v8i a, v8i b, v8i c, v8i d) { v32b r = {s8_pack(a, b), s8_pack(c, d)}; return r; }
static inline void v32b_store2(int8_t* lo, int8_t* hi, v32b v) { vst1q_s8(lo, v.lo); vst1q_s8(hi, v.hi); }
static inline void v32b_nibbles(const uint8_t* p, v32b* lo, v32b* hi) {
    const uint8x16_t a = vld1q_u8(p), b = vld1q_u8(p + 16), m = vdupq_n_u8(0x0F);
    lo->lo = vreinterpretq_s8_u8(vandq_u8(a, m));
    lo->hi = vreinterpretq_s8_u8(vandq_u8(b, m));
    hi->lo = vreinterpretq_s8_u8(vshrq_n_u8(a, 4));
    hi->hi = vreinterpretq_s8_u8(vshrq_n_u8(b, 4));
}
static inline v32b v32b_nibbles1(const uint8_t* p) {
    const uint8x16_t a = vld1q_u8(p);
    v32b r = {vreinterpretq_s8_u8(vandq_u8(a, vdupq_n_u8(0x0F))), vreinterpretq_s8_u8(vshrq_n_u8(a, 4))};
    return r;
}
static inline int32x4_t dot16(int8x16_t u, int8x16_t s) {  /* lane i: bytes 4i .. 4i + 3 */
    return vpaddq_s32(vpaddlq_s16(vmull_s8(vget_low_s8(u), vget_low_s8(s))), vpaddlq_s16(vmull_high_s8(u, s)));
}
static inline v8i v8i_dot4(v32b u, v32b s) { v8i r = {dot16(u.lo, s.lo), dot16(u.hi, s.hi)}; return r; }
static inline v8i v8i_dot4x2(v32b u, v32b s, v32b v, v32b t) { return v8i_add(v8i_dot4(u, s), v8i_dot4(v, t)); }
static inline v8i v8i_sdot4(v32b u, v32b s) { return v8i_dot4(u, s); }  /* vmull_s8 takes signed bytes */
static inline v8i v8i_sdot4x2(v32b u, v32b s, v32b v, v32b t) { return v8i_dot4x2(u, s, v, t); }
static inline void v32b_halves(const int8_t* p, const int8_t* q, v32b* lo, v32b* hi) {
    lo->lo = vld1q_s8(p);
    lo->hi = vld1q_s8(q);
    hi->lo = vld1q_s8(p + 16);
    hi->hi = vld1q_s8(q + 16);
}
static inline v8f v8f_pair(float a, float b) { return v8f_make(vdupq_n_f32(a), vdupq_n_f32(b)); }
static inline v8f v8f_from_s16x8(int16x8_t v) {
    return v8f_make(vcvtq_f32_s32(vmovl_s16(vget_low_s16(v))), vcvtq_f32_s32(vmovl_high_s16(v)));
}
static inline void v8f_from_s8_pairs(const int8_t* p, v8f* even, v8f* odd) {
    const int8x8x2_t d = vld2_s8(p);  /* val[0]: the even places, val[1]: the odd */
    *even = v8f_from_s16x8(vmovl_s8(d.val[0]));
    *odd = v8f_from_s16x8(vmovl_s8(d.val[1]));
}
static inline v8f v8f_quad(v8f f, int j) {
    switch (j) {
        case 0: return v8f_make(vdupq_laneq_f32(f.lo, 0), vdupq_laneq_f32(f.lo, 1));
        case 1: return v8f_make(vdupq_laneq_f32(f.lo, 2), vdupq_laneq_f32(f.lo, 3));
        case 2: return v8f_make(vdupq_laneq_f32(f.hi, 0), vdupq_laneq_f32(f.hi, 1));
        default: return v8f_make(vdupq_laneq_f32(f.hi, 2), vdupq_laneq_f32(f.hi, 3));
    }
}

static inline float f16_to_f32(uint16_t h) {
    return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0);
}
static inline uint16_t f32_to_f16(float f) {
    return vget_lane_u16(vreinterpret_u16_f16(vcvt_f16_f32(vdupq_n_f32(f))), 0);
}

#else
#error "ownlm's kernels need x86-64 AVX2 or ARM NEON"
#endif

/* read p into all cache levels (a hint); a macro: GCC dropped it when wrapped in a function */
#define PREFETCH(p) __builtin_prefetch((p), 0, 3)

#endif

/* ownlm's CPU kernels (OpenMP; x86-64 with AVX2, FMA, F16C, and AArch64 with NEON: the vector
   code is written in simd.h's operations): shared helpers and the entry points the Python side
   (model/kernels.py) calls through ctypes.

   Every entry point returns 0, or OWNLM_ENOMEM when a buffer could not be allocated (nothing is
   written then that the caller would read). The caller checks every shape, bound and alignment
   before the call: these functions trust their arguments. */

#ifndef OWNLM_KERNELS_H
#define OWNLM_KERNELS_H

#include "simd.h"
#include <omp.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define OWNLM_ENOMEM 1

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = ((uint32_t)h) << 16;
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
}

/* round to nearest even, as PyTorch does */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    __builtin_memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* NaN stays NaN */
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* element i of a float32 or (bf) bfloat16 array */
static inline float load_x(const void* x, int64_t i, int bf) {
    return bf ? bf16_to_f32(((const uint16_t*)x)[i]) : ((const float*)x)[i];
}

static inline void store(void* y, int64_t i, float v, int bf) {
    if (bf)
        ((uint16_t*)y)[i] = f32_to_bf16(v);
    else
        ((float*)y)[i] = v;
}

/* a float rounded as the compute dtype rounds it (bfloat16 or none) */
static inline float round_as(float v, int bf) { return bf ? bf16_to_f32(f32_to_bf16(v)) : v; }

static inline float hsum(v8f v) { return v8f_hsum(v); }
static inline float hmax(v8f v) { return v8f_hmax(v); }

/* the OpenMP threads of the kernels' parallel regions (0: the runtime's default), set by
   ownlm_set_threads and applied by each entry point below to the thread that calls it: OpenMP's
   thread count is a per-thread setting, and a server calls from threads of its own */
extern int ownlm_threads;
static inline void use_threads(void) {
    const int n = ownlm_threads;
    if (n > 0 && !omp_in_parallel() && omp_get_max_threads() != n) omp_set_num_threads(n);
}

/* n bytes starting on a cache line (free() releases them), so that 32-byte vector loads at
   multiples of 32 never straddle two lines (malloc's blocks start at multiples of 16); NULL when
   they cannot be allocated */
static inline void* line_alloc(size_t n) {
    return aligned_alloc(64, ((n ? n : 1) + 63) / 64 * 64);
}

/* a thread's scratch buffer of n floats inside an OpenMP region; when it cannot be allocated the
   region's shared flag is raised and NULL returned (the thread then skips its share of the work) */
static inline float* scratch(int64_t n, int* failed) {
    float* p = (float*)line_alloc((size_t)n * sizeof(float));
    if (!p) {
        #pragma omp atomic write
        *failed = 1;
    }
    return p;
}

/* matmul.c: a group-wise integer weight (model/quant.py's QuantWeight): n rows of K / 32 groups,
   w the packed low nibbles (bits 4, 5, 6: K / 2 bytes a row) or int8 values (bits 8: K bytes),
   s (n, K / 32) float16 scales, o (n, K / 32) float16 offsets (bits 4 and 5; null: symmetric),
   h the bits above the low 4 (bits 5: 4 bytes a group, bits 6: 8), u (n, K / 16) int8
   16-column scales (bits 6), l a codebook (bits 4: w = s l[q], 16 int8; null: none), k (in place
   of s and o, K a multiple of 256) per 256 columns what the file's super-block holds: bits 4 and 5
   (Q4_K / Q5_K) its 16 header bytes (float16 d and dmin, 12 bytes of 6-bit scales and mins), bits
   6 (Q6_K) its float16 d; xbits 8: the activations it meets are rounded to int8 (see matmul.c),
   else to int16 */
typedef struct {
    const uint8_t* w;
    const uint16_t* s;
    const uint16_t* o;
    const uint8_t* h;
    const int8_t* u;
    const int8_t* l;
    const uint8_t* k;
    int64_t bits;
    int64_t n;
    int64_t xbits;
} qpart_t;

/* y (M, sum of n) = x (M, K) @ [W_0; W_1; ...].T: the parts' outputs side by side */
int quant_gemm(const void* xin, int xbf, int64_t M, int64_t K, const qpart_t* parts, int64_t nparts, void* y,
               int ybf);
int bf16_gemm(const void* xin, int xbf, int64_t M, int64_t K, const uint16_t* w, int64_t N, void* y, int ybf);

/* elementwise.c */
int rms_norm(const void* x, int bf, int64_t M, int64_t C, const float* w, float eps, float offset, void* y);
int act_mul(const void* x, int bf, int64_t M, int64_t F, int act, void* y);

/* attention.c */
int attend_decode(const void* qkv, int bf, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t R,
                  const float* cos, const float* sin, void* kc, void* vc, int ct, const int64_t* slots,
                  int64_t cap, const int64_t* pos, int64_t window, float scale, void* out);

/* decode.c: one layer's weights for decode_layers. The four projections (qkv, o, gate_up, down)
   as group-wise integer weights of 1 to 3 parts each (quant_gemm's; n and k the whole
   projection's outputs and inputs; bias float32 or null), the RMSNorm
   weights (float32; all with one offset): before attention and MLP, optional per-head q / k
   norms and optional norms of the attention and MLP outputs (null: none), the layer's window and
   attention scale. Python mirrors it (kernels.Layer) and checks the mirror against layer_layout
   at load. */
#define MAX_PARTS 3
typedef struct {
    qpart_t part[4][MAX_PARTS];
    int64_t nparts[4];
    const float* bias[4];
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

int decode_layers(void* x, int bf, int64_t B, int64_t C, int64_t L, const layer_t* layers, void* const* kcs,
                  void* const* vcs, int64_t H, int64_t Hkv, int64_t D, int64_t R, const float* cos0,
                  const float* sin0, const float* cos1, const float* sin1, int ct, const int64_t* slots,
                  int64_t cap, const int64_t* pos, float eps, int act);
int64_t layer_layout(int64_t* out, int64_t n);
void ownlm_set_threads(int n);
int ownlm_get_threads(void);

#endif

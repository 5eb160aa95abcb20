/* The kernels (the C files of src/ownlm/model/csrc) on fixed pseudo-random inputs, built for
   x86-64 (AVX2) and for AArch64 (NEON, run under qemu-aarch64) by tests/test_neon.py, which
   compares what the two print: per case, a hash of every output's bits and the first output.
   Cases: every weight kind (int4 and int5 with and without offsets, int6, int8, int4 indices into
   a codebook; int4 with and without offsets, int6 and int8 against int8 activations; int4 and
   int5 with super-blocks' scales, Q4_K's and Q5_K's, int6 with Q6_K's and a codebook with IQ4_XS's,
   against both), a stack of three
   parts and one that mixes int8 and int16 activations, one to 70 rows (the one-row path, the
   8/4/2/1-row blocks, the 64-row tiles), K with and without 8-group tails, float32 and bfloat16
   activations; the bfloat16 matmul; the one-token attention over each cache type; RMSNorm and the
   activations; the one-call decode step through two layers of mixed weights. */

#include <stdio.h>
#include <string.h>

#include "kernels.h"

static uint64_t state = 0x9E3779B97F4A7C15ull;

static uint32_t next(void) {  /* xorshift64* */
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return (uint32_t)((state * 0x2545F4914F6CDD1Dull) >> 32);
}

static float uniform(void) { return (float)(next() >> 8) / 16777216.f * 2.f - 1.f; }  /* [-1, 1) */

static uint16_t half(int negative) {  /* a normal float16 between 2^-8 and 2^-3 */
    return (uint16_t)((negative && (next() & 1) ? 0x8000 : 0) | ((7 + next() % 5) << 10) | (next() & 0x3FF));
}

static void* fill(size_t n) {
    uint8_t* p = (uint8_t*)malloc(n ? n : 1);
    for (size_t i = 0; i < n; i++) p[i] = (uint8_t)next();
    return p;
}

static const int8_t CODEBOOK[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* offsets: 1 with offsets (int4 / int5), 2 int4 indices into CODEBOOK */
static qpart_t part(int bits, int offsets, int64_t n, int64_t K) {
    const int64_t G = K / 32;
    qpart_t p;
    p.bits = bits;
    p.n = n;
    p.xbits = 16;
    p.w = (const uint8_t*)fill((size_t)(n * (bits == 8 ? K : K / 2)));
    uint16_t* s = (uint16_t*)malloc((size_t)(n * G) * 2);
    uint16_t* o = offsets == 1 ? (uint16_t*)malloc((size_t)(n * G) * 2) : 0;
    for (int64_t i = 0; i < n * G; i++) {
        s[i] = half(0);
        if (o) o[i] = half(1);
    }
    p.s = s;
    p.o = o;
    p.h = bits == 5 || bits == 6 ? (const uint8_t*)fill((size_t)(n * G * (bits == 5 ? 4 : 8))) : 0;
    p.u = bits == 6 ? (const int8_t*)fill((size_t)(n * 2 * G)) : 0;
    p.l = offsets == 2 ? CODEBOOK : 0;
    p.k = 0;
    return p;
}

/* a Q4_K / Q5_K-like part (bits 4 or 5; K a multiple of 256): super-block headers in place of
   scales and offsets, their d and dmin normal float16 values, their 6-bit scales and mins random;
   a Q6_K-like one (bits 6): a float16 d per super-block in place of the scales; codebook: an
   IQ4_XS-like one (bits 4), d and random 6-bit scales */
static qpart_t super_part(int bits, int codebook, int64_t n, int64_t K) {
    qpart_t p = part(bits, codebook ? 2 : 0, n, K);
    free((void*)p.s);
    p.s = 0;
    const int64_t size = bits == 6 ? 2 : codebook ? 8 : 16;
    uint8_t* k = (uint8_t*)fill((size_t)(n * K / 256 * size));
    for (int64_t b = 0; b < n * K / 256; b++) {
        const uint16_t d = half(0), dmin = half(0);
        memcpy(k + size * b, &d, 2);
        if (size == 16) memcpy(k + size * b + 2, &dmin, 2);
    }
    p.k = k;
    return p;
}

static void report(const char* name, const void* y, size_t bytes, int bf) {
    uint64_t h = 0xcbf29ce484222325ull;  /* FNV-1a of the output's bytes */
    const uint8_t* b = (const uint8_t*)y;
    for (size_t i = 0; i < bytes; i++) h = (h ^ b[i]) * 0x100000001b3ull;
    const float first = bf ? bf16_to_f32(((const uint16_t*)y)[0]) : ((const float*)y)[0];
    printf("%s %016llx %.9g\n", name, (unsigned long long)h, first);
}

int main(void) {
    ownlm_set_threads(2);
    /* bits, offsets, activation bits */
    static const int kinds[][3] = {{4, 1, 16}, {4, 0, 16}, {5, 1, 16}, {5, 0, 16}, {6, 0, 16}, {8, 0, 16},
                                   {4, 2, 16}, {4, 1, 8}, {4, 0, 8}, {5, 1, 8}, {5, 0, 8}, {6, 0, 8}, {8, 0, 8},
                                   {4, 2, 8}};
    static const int64_t rows[] = {1, 3, 9, 70};
    static const int64_t ks[] = {192, 1184};
    for (int ki = 0; ki < 2; ki++) {
        const int64_t K = ks[ki];
        float* x = (float*)malloc((size_t)(70 * K) * sizeof(float));
        for (int64_t i = 0; i < 70 * K; i++) x[i] = uniform() * (float)(1 + i / K % 7);
        uint16_t* xb = (uint16_t*)malloc((size_t)(70 * K) * 2);
        for (int64_t i = 0; i < 70 * K; i++) xb[i] = f32_to_bf16(x[i]);
        qpart_t parts[14];
        int np = 0;
        for (int k = 0; k < 14; k++) {
            parts[np] = part(kinds[k][0], kinds[k][1], 37, K);
            parts[np++].xbits = kinds[k][2];
        }
        const qpart_t stack[3] = {part(4, 1, 40, K), part(6, 0, 21, K), part(8, 0, 40, K)};
        qpart_t mixed[3] = {part(4, 1, 40, K), part(6, 0, 21, K), part(8, 0, 40, K)};
        mixed[0].xbits = mixed[2].xbits = 8;
        for (int ri = 0; ri < 4; ri++) {
            const int64_t M = rows[ri];
            for (int bf = 0; bf < 2; bf++) {
                char name[96];
                float* y = (float*)malloc((size_t)(M * 101) * sizeof(float));
                for (int k = 0; k < np; k++) {
                    if (quant_gemm(bf ? (const void*)xb : x, bf, M, K, parts + k, 1, y, bf)) return 1;
                    snprintf(name, sizeof name, "int%d%s%s K=%lld M=%lld %s", kinds[k][0],
                             kinds[k][1] == 2 ? "-codebook" : kinds[k][1] ? "+offsets" : "",
                             kinds[k][2] == 8 ? "/int8-activations" : "", (long long)K, (long long)M,
                             bf ? "bf16" : "f32");
                    report(name, y, (size_t)(M * 37) * (bf ? 2 : 4), bf);
                }
                if (quant_gemm(bf ? (const void*)xb : x, bf, M, K, stack, 3, y, bf)) return 1;
                snprintf(name, sizeof name, "stack K=%lld M=%lld %s", (long long)K, (long long)M, bf ? "bf16" : "f32");
                report(name, y, (size_t)(M * 101) * (bf ? 2 : 4), bf);
                if (quant_gemm(bf ? (const void*)xb : x, bf, M, K, mixed, 3, y, bf)) return 1;
                snprintf(name, sizeof name, "mixed-activations stack K=%lld M=%lld %s", (long long)K, (long long)M,
                         bf ? "bf16" : "f32");
                report(name, y, (size_t)(M * 101) * (bf ? 2 : 4), bf);
                free(y);
            }
        }
    }
    {  /* Q4_K / Q5_K / Q6_K-like parts (two super-blocks a row) against int16 and int8 activations */
        const int64_t K = 512;
        float* x = (float*)malloc((size_t)(70 * K) * sizeof(float));
        for (int64_t i = 0; i < 70 * K; i++) x[i] = uniform() * (float)(1 + i / K % 7);
        uint16_t* xb = (uint16_t*)malloc((size_t)(70 * K) * 2);
        for (int64_t i = 0; i < 70 * K; i++) xb[i] = f32_to_bf16(x[i]);
        static const int sk[][3] = {{4, 0, 16}, {5, 0, 16}, {6, 0, 16}, {4, 1, 16},  /* bits, codebook, activations */
                                    {4, 0, 8}, {5, 0, 8}, {6, 0, 8}, {4, 1, 8}};
        qpart_t sp[8];
        for (int k = 0; k < 8; k++) {
            sp[k] = super_part(sk[k][0], sk[k][1], 37, K);
            sp[k].xbits = sk[k][2];
        }
        for (int ri = 0; ri < 4; ri++)
            for (int bf = 0; bf < 2; bf++) {
                const int64_t M = rows[ri];
                float* y = (float*)malloc((size_t)(M * 37) * sizeof(float));
                for (int k = 0; k < 8; k++) {
                    if (quant_gemm(bf ? (const void*)xb : x, bf, M, K, sp + k, 1, y, bf)) return 1;
                    char name[96];
                    snprintf(name, sizeof name, "int%d%s+superblocks%s K=%lld M=%lld %s", sk[k][0],
                             sk[k][1] ? "-codebook" : "", sk[k][2] == 8 ? "/int8-activations" : "", (long long)K,
                             (long long)M, bf ? "bf16" : "f32");
                    report(name, y, (size_t)(M * 37) * (bf ? 2 : 4), bf);
                }
                free(y);
            }
    }
    const int64_t K = 200, N = 19;  /* the bfloat16 matmul, with a K % 8 tail */
    float* x = (float*)malloc((size_t)(5 * K) * sizeof(float));
    for (int64_t i = 0; i < 5 * K; i++) x[i] = uniform();
    uint16_t* w = (uint16_t*)malloc((size_t)(N * K) * 2);
    for (int64_t i = 0; i < N * K; i++) w[i] = f32_to_bf16(uniform());
    float y[5 * 19];
    for (int64_t M = 1; M <= 5; M += 4) {
        if (bf16_gemm(x, 0, M, K, w, N, y, 0)) return 1;
        char name[64];
        snprintf(name, sizeof name, "bf16_gemm M=%lld", (long long)M);
        report(name, y, (size_t)(M * N) * 4, 0);
    }
    /* one-token attention: each cache type, float32 and bfloat16 rows; head dims 64 (rotary over
       all of it, no window) and 72 (a dims tail, rotary over 32, a window of 5); positions across
       the 8-key blocks; the output and both caches after the write */
    static const int64_t heads[4][2] = {{4, 2}, {9, 3}, {8, 2}, {3, 3}};  /* query heads per key head: 2, 3, 4, 1 */
    for (int ct = 0; ct < 3; ct++)
        for (int bf = 0; bf < 2; bf++)
            for (int v = 0; v < 2 * 4; v++) {
                const int64_t H = heads[v / 2][0], Hkv = heads[v / 2][1];
                const int64_t B = 3, D = v % 2 ? 72 : 64, R = v % 2 ? 32 : 64, cap = 40, window = v % 2 ? 5 : 0;
                const int64_t width = (H + 2 * Hkv) * D, cn = 3 * Hkv * cap * D, es = ct ? 2 : 4;
                float* q = (float*)malloc((size_t)(B * width) * sizeof(float));
                uint16_t* qb = (uint16_t*)malloc((size_t)(B * width) * 2);
                for (int64_t i = 0; i < B * width; i++) qb[i] = f32_to_bf16(q[i] = uniform() * 2.f);
                float cs[3 * 64], sn[3 * 64];
                for (int64_t i = 0; i < B * R; i++) cs[i] = uniform(), sn[i] = uniform();
                uint8_t* kv[2];
                for (int c = 0; c < 2; c++) {
                    kv[c] = (uint8_t*)malloc((size_t)(cn * es));
                    for (int64_t i = 0; i < cn; i++) {
                        const float f = uniform();
                        if (ct == 0) ((float*)kv[c])[i] = f;
                        else ((uint16_t*)kv[c])[i] = ct == 1 ? f32_to_bf16(f) : f32_to_f16(f);
                    }
                }
                const int64_t slots[3] = {2, 0, 1}, pos[3] = {0, 17, 33};
                float* out = (float*)malloc((size_t)(B * H * D) * sizeof(float));
                if (attend_decode(bf ? (const void*)qb : q, bf, B, H, Hkv, D, R, cs, sn, kv[0], kv[1], ct, slots, cap,
                                  pos, window, 0.125f, out)) return 1;
                char name[96];
                snprintf(name, sizeof name, "attend ct=%d bf=%d D=%lld H=%lld/%lld", ct, bf, (long long)D, (long long)H,
                         (long long)Hkv);
                report(name, out, (size_t)(B * H * D) * (bf ? 2 : 4), bf);
                snprintf(name, sizeof name, "attend-caches ct=%d bf=%d D=%lld H=%lld/%lld", ct, bf, (long long)D,
                         (long long)H, (long long)Hkv);
                for (int c = 0; c < 2; c++) report(name, kv[c], (size_t)(cn * es), ct == 1);
                free(q), free(qb), free(kv[0]), free(kv[1]), free(out);
            }
    /* RMSNorm (plain and with Gemma's offset) and the gated activations (SiLU, GeLU tanh) */
    for (int bf = 0; bf < 2; bf++) {
        const int64_t M = 3, C = 200;
        float* xs = (float*)malloc((size_t)(M * 2 * C) * sizeof(float));
        uint16_t* xsb = (uint16_t*)malloc((size_t)(M * 2 * C) * 2);
        for (int64_t i = 0; i < M * 2 * C; i++) xsb[i] = f32_to_bf16(xs[i] = uniform() * 4.f);
        float nw[200], ys[3 * 200];
        for (int64_t i = 0; i < C; i++) nw[i] = uniform();
        const void* in = bf ? (const void*)xsb : xs;
        char name[64];
        for (int off = 0; off < 2; off++) {
            if (rms_norm(in, bf, M, C, nw, 1e-6f, (float)off, ys)) return 1;
            snprintf(name, sizeof name, "rms_norm bf=%d offset=%d", bf, off);
            report(name, ys, (size_t)(M * C) * (bf ? 2 : 4), bf);
        }
        for (int act = 0; act < 2; act++) {
            if (act_mul(in, bf, M, C, act, ys)) return 1;
            snprintf(name, sizeof name, "act_mul bf=%d act=%d", bf, act);
            report(name, ys, (size_t)(M * C) * (bf ? 2 : 4), bf);
        }
        free(xs), free(xsb);
    }
    /* the one-call decode step: two layers (the first local, a window of 3; the second with q / k
       norms and post-norms), a qkv stack of int4 (q, k) and int6 (v), int4, int8 and int5
       projections, 2 rows in float32 and bfloat16, a float16 cache */
    for (int bf = 0; bf < 2; bf++) {
        const int64_t B = 2, C = 64, H = 4, Hkv = 2, D = 16, R = 16, F = 96, cap = 16, L = 2;
        layer_t layers[2];
        memset(layers, 0, sizeof layers);
        float* norms = (float*)malloc(6 * 64 * sizeof(float));
        for (int64_t i = 0; i < 6 * 64; i++) norms[i] = 1.f + 0.25f * uniform();
        for (int l = 0; l < 2; l++) {
            layer_t* ly = layers + l;
            ly->part[0][0] = part(4, 1, (H + Hkv) * D, C), ly->part[0][1] = part(6, 0, Hkv * D, C);
            ly->part[1][0] = part(4, 0, C, H * D);
            ly->part[1][0].xbits = l ? 8 : 16;  /* the second layer's attention output: int8 activations */
            ly->part[2][0] = part(8, 0, 2 * F, C);
            ly->part[3][0] = part(5, 1, C, F);
            ly->nparts[0] = 2, ly->nparts[1] = ly->nparts[2] = ly->nparts[3] = 1;
            const int64_t n[4] = {(H + 2 * Hkv) * D, C, 2 * F, C}, k[4] = {C, H * D, C, F};
            for (int i = 0; i < 4; i++) ly->n[i] = n[i], ly->k[i] = k[i];
            ly->norm1 = norms, ly->norm2 = norms + 64;
            if (l) ly->q_norm = norms + 128, ly->k_norm = norms + 192, ly->post1 = norms + 256, ly->post2 = norms + 320;
            ly->window = l ? 0 : 3, ly->local = !l, ly->scale = 0.25f;
        }
        const int64_t cn = B * Hkv * cap * D;
        void* kcs[2];
        void* vcs[2];
        for (int l = 0; l < 2; l++) {
            uint16_t* kc = (uint16_t*)malloc((size_t)cn * 2);
            uint16_t* vc = (uint16_t*)malloc((size_t)cn * 2);
            for (int64_t i = 0; i < cn; i++) kc[i] = f32_to_f16(uniform()), vc[i] = f32_to_f16(uniform());
            kcs[l] = kc, vcs[l] = vc;
        }
        float cs[2 * 16], sn[2 * 16], x[2 * 64];
        uint16_t xb[2 * 64];
        for (int64_t i = 0; i < B * R; i++) cs[i] = uniform(), sn[i] = uniform();
        for (int64_t i = 0; i < B * C; i++) xb[i] = f32_to_bf16(x[i] = uniform() * 2.f);
        const int64_t slots[2] = {1, 0}, pos[2] = {5, 9};
        void* xin = bf ? (void*)xb : (void*)x;
        if (decode_layers(xin, bf, B, C, L, layers, kcs, vcs, H, Hkv, D, R, cs, sn, cs, sn, 2, slots, cap, pos,
                          1e-5f, 0)) return 1;
        char name[64];
        snprintf(name, sizeof name, "decode_layers bf=%d", bf);
        report(name, xin, (size_t)(B * C) * (bf ? 2 : 4), bf);
        snprintf(name, sizeof name, "decode_layers-caches bf=%d", bf);
        for (int l = 0; l < 2; l++) report(name, kcs[l], (size_t)cn * 2, 0), report(name, vcs[l], (size_t)cn * 2, 0);
    }
    return 0;
}

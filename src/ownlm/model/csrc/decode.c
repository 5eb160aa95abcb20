/* The whole decode step of common-shaped blocks in one call (engine/cpu_step.py). */

#include "kernels.h"

static void add_bias(void* y, int bf, int64_t M, int64_t N, const float* b) {
    if (!b) return;
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) store(y, m * N + n, load_x(y, m * N + n, bf) + b[n], bf);
}

static void add_into(void* x, const void* a, int bf, int64_t n) {
    for (int64_t i = 0; i < n; i++) store(x, i, load_x(x, i, bf) + load_x(a, i, bf), bf);
}

/* one projection of a layer: y (B, n[i]) = x @ W[i].T + bias[i] */
static int project(const layer_t* ly, int i, const void* x, int bf, int64_t B, void* y) {
    if (quant_gemm(x, bf, B, ly->k[i], ly->part[i], ly->nparts[i], y, bf))
        return OWNLM_ENOMEM;
    add_bias(y, bf, B, ly->n[i], ly->bias[i]);
    return 0;
}

/* The decode step of L pre-norm blocks (RMSNorm, attention, RMSNorm, gated MLP, sequential
   residuals; optionally qk-norms and post-norms) for B rows of one token each, x (B, C) updated
   in place (row b: a token of the sequence in cache slot slots[b] at position pos[b]; several
   rows may be one sequence's next tokens, see attend_decode): the same kernels, in the same order and with the same roundings as the modules' own
   forward on a CPU, in one call. cos0/sin0: the rotation of global layers, cos1/sin1 of local
   ones, (B, R) each. kcs, vcs: each layer's key and value cache. act: 0 SiLU, 1 GeLU (tanh). */
int decode_layers(void* x, int bf, int64_t B, int64_t C, int64_t L, const layer_t* layers, void* const* kcs,
                  void* const* vcs, int64_t H, int64_t Hkv, int64_t D, int64_t R, const float* cos0,
                  const float* sin0, const float* cos1, const float* sin1, int ct, const int64_t* slots,
                  int64_t cap, const int64_t* pos, float eps, int act) {
    use_threads();
    const int64_t es = bf ? 2 : 4;
    int64_t widest = C;
    for (int64_t l = 0; l < L; l++)
        for (int i = 0; i < 4; i++) widest = layers[l].n[i] > widest ? layers[l].n[i] : widest;
    char* h = (char*)line_alloc((size_t)(B * C * es));
    char* big = (char*)line_alloc((size_t)(B * widest * es));
    char* mid = (char*)line_alloc((size_t)(B * widest * es));
    int err = !h || !big || !mid ? OWNLM_ENOMEM : 0;
    for (int64_t l = 0; l < L && !err; l++) {
        const layer_t* ly = layers + l;
        rms_norm(x, bf, B, C, ly->norm1, eps, ly->norm_offset, h);
        if ((err = project(ly, 0, h, bf, B, big))) break;
        for (int64_t b = 0; ly->q_norm && b < B; b++) { /* per head, in place: q heads, then k heads */
            char* row = big + b * ly->n[0] * es;
            rms_norm(row, bf, H, D, ly->q_norm, eps, ly->norm_offset, row);
            rms_norm(row + H * D * es, bf, Hkv, D, ly->k_norm, eps, ly->norm_offset, row + H * D * es);
        }
        if ((err = attend_decode(big, bf, B, H, Hkv, D, R, ly->local ? cos1 : cos0, ly->local ? sin1 : sin0,
                                 kcs[l], vcs[l], ct, slots, cap, pos, ly->window, ly->scale, mid)))
            break;
        if ((err = project(ly, 1, mid, bf, B, h))) break;
        if (ly->post1) rms_norm(h, bf, B, C, ly->post1, eps, ly->norm_offset, h);
        add_into(x, h, bf, B * C);
        rms_norm(x, bf, B, C, ly->norm2, eps, ly->norm_offset, h);
        if ((err = project(ly, 2, h, bf, B, big))) break;
        act_mul(big, bf, B, ly->n[2] / 2, act, mid);
        if ((err = project(ly, 3, mid, bf, B, h))) break;
        if (ly->post2) rms_norm(h, bf, B, C, ly->post2, eps, ly->norm_offset, h);
        add_into(x, h, bf, B * C);
    }
    free(h);
    free(big);
    free(mid);
    return err;
}

/* layer_t as this compiler lays it out: its size, then each field's offset in declaration order
   (the Python mirror compares itself with this at load). Returns how many values there are; writes
   at most n of them. */
int64_t layer_layout(int64_t* out, int64_t n) {
    const int64_t v[] = {
        sizeof(layer_t), sizeof(qpart_t),
        offsetof(qpart_t, w), offsetof(qpart_t, s), offsetof(qpart_t, o), offsetof(qpart_t, h),
        offsetof(qpart_t, u), offsetof(qpart_t, l), offsetof(qpart_t, k), offsetof(qpart_t, bits),
        offsetof(qpart_t, n), offsetof(qpart_t, xbits),
        offsetof(layer_t, part), offsetof(layer_t, nparts), offsetof(layer_t, bias),
        offsetof(layer_t, n), offsetof(layer_t, k),
        offsetof(layer_t, norm1), offsetof(layer_t, norm2), offsetof(layer_t, q_norm),
        offsetof(layer_t, k_norm), offsetof(layer_t, post1), offsetof(layer_t, post2),
        offsetof(layer_t, window), offsetof(layer_t, local), offsetof(layer_t, scale),
        offsetof(layer_t, norm_offset),
    };
    const int64_t count = (int64_t)(sizeof(v) / sizeof(v[0]));
    for (int64_t i = 0; i < count && i < n; i++) out[i] = v[i];
    return count;
}

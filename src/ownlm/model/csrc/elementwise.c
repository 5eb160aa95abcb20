/* Row-wise operations: RMSNorm and the gated activations. */

#include "kernels.h"

/* RMSNorm of M rows of C: y = round(x / rms(x)) * w (offset 0), or x / rms(x) * (offset + w)
   (Gemma), in float32, each result rounded to the compute dtype as PyTorch's ops would */
int rms_norm(const void* x, int bf, int64_t M, int64_t C, const float* w, float eps, float offset, void* y) {
    use_threads();
    #pragma omp parallel for schedule(static) if (M >= 64)
    for (int64_t m = 0; m < M; m++) {
        float ss = 0.f;
        for (int64_t c = 0; c < C; c++) {
            const float v = load_x(x, m * C + c, bf);
            ss += v * v;
        }
        const float r = 1.f / sqrtf(ss / (float)C + eps);
        for (int64_t c = 0; c < C; c++) {
            const float h = load_x(x, m * C + c, bf) * r;
            store(y, m * C + c, offset != 0.f ? h * (offset + w[c]) : round_as(h, bf) * w[c], bf);
        }
    }
    return 0;
}

/* y (M, F) = act(gate) * up for x (M, 2F) = [gate | up]: act 0 SiLU, 1 GeLU (tanh form) */
int act_mul(const void* x, int bf, int64_t M, int64_t F, int act, void* y) {
    use_threads();
    #pragma omp parallel for schedule(static) if (M >= 64)
    for (int64_t m = 0; m < M; m++)
        for (int64_t f = 0; f < F; f++) {
            const float g = load_x(x, m * 2 * F + f, bf), u = load_x(x, m * 2 * F + F + f, bf);
            const float a = act == 0 ? g / (1.f + expf(-g))
                                     : 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
            store(y, m * F + f, round_as(a, bf) * u, bf);
        }
    return 0;
}

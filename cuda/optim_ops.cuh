// cuda/optim_ops.cuh: AdamW's element update, the arithmetic of optim.c's
// adamw_step term for term (cuda/optim.cu is built with -fmad=false so the
// device rounds each product as the CPU does, and the step is bit-identical).
#ifndef SDLORA_CUDA_OPTIM_OPS_CUH
#define SDLORA_CUDA_OPTIM_OPS_CUH

#include "common.cuh"

/* the per-step scalars, computed once on the host as optim.c does:
 *   bc1 = 1 - b1^t, bc2 = 1 - b2^t (double), step_size = lr / bc1,
 *   bc2_sqrt = sqrt(bc2), decay = 1 - lr wd */
struct adamw_coef { float b1, b2, eps, step_size, bc2_sqrt, decay; };

/*   p <- p (1 - lr wd)
 *   m <- b1 m + (1 - b1) g
 *   v <- b2 v + (1 - b2) g^2
 *   p <- p - step_size * m / (sqrt(v) / bc2_sqrt + eps) */
HD void adamw_elem(float *p, float *m, float *v, const float *g, adamw_coef k, size_t i) {
    float pi = p[i] * k.decay, gi = g[i];
    float mi = m[i] * k.b1 + (1.0f - k.b1) * gi;
    float vi = v[i] * k.b2 + (1.0f - k.b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    float denom = sqrtf(vi) / k.bc2_sqrt + k.eps;
    p[i] = pi - k.step_size * (mi / denom);
}

#endif

// cuda/optim_ops.cuh: AdamW's element update, the arithmetic of optim.c's
// adamw_step term for term (cuda/optim.cu is built with -fmad=false so the
// device rounds each product as the CPU does, and the step is bit-identical).
#ifndef SDLORA_CUDA_OPTIM_OPS_CUH
#define SDLORA_CUDA_OPTIM_OPS_CUH

#include "common.cuh"
extern "C" {
#include "../backend.h"
}

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

/* --clip's sum of squares, in a fixed order whatever the launch shape:
 * run c is elements c*CHUNK .. (c+1)*CHUNK - 1 (NN_SUMSQ_CHUNK, backend.h),
 * squared and added in index order in double by one thread; the runs' sums
 * are then added in order by one thread (sumsq_total). The CPU adds all n in
 * one chain; the two differ by a few ulps of a double (the norm, a float,
 * is almost always the same). */
HD double sumsq_run(const float *g, size_t n, size_t c) {
    size_t lo = c * NN_SUMSQ_CHUNK, hi = lo + NN_SUMSQ_CHUNK < n ? lo + NN_SUMSQ_CHUNK : n;
    double s = 0.0;
    for (size_t i = lo; i < hi; i++) s += (double)g[i] * (double)g[i];
    return s;
}
HD size_t sumsq_nruns(size_t n) { return (n + NN_SUMSQ_CHUNK - 1) / NN_SUMSQ_CHUNK; }
HD double sumsq_total(const double *runs, size_t nruns) {
    double s = 0.0;
    for (size_t c = 0; c < nruns; c++) s += runs[c];
    return s;
}
// g *= k
HD float scale_elem(const float *g, float k, size_t i) { return g[i] * k; }

#endif

// cuda/optim.cu: AdamW on the GPU, one thread per parameter
// (optim_ops.cuh). The bias corrections are computed on the host in double,
// exactly as optim.c; the Makefile builds this file with -fmad=false so each
// product is rounded as on the CPU and the update is the CPU's, bit for bit.
#include "common.cuh"
#include "optim_ops.cuh"
extern "C" {
#include "cuda.h"
}

__global__ static void adamw_kernel(float *p, float *m, float *v, const float *g, adamw_coef k, size_t n) {
    GRID_STRIDE(i, n) adamw_elem(p, m, v, g, k, i);
}

// the step's scalars, as optim.c's adamw_step
static adamw_coef adamw_coefs(const adamw_t *o, float lr) {
    double bc1 = 1.0 - pow(o->beta1, (double)o->step);
    double bc2 = 1.0 - pow(o->beta2, (double)o->step);
    adamw_coef k;
    k.b1 = o->beta1;
    k.b2 = o->beta2;
    k.eps = o->eps;
    k.step_size = (float)(lr / bc1);
    k.bc2_sqrt = (float)sqrt(bc2);
    k.decay = (float)(1.0 - (double)lr * o->weight_decay);
    return k;
}

extern "C" void adamw_step_cuda(adamw_t *o, float *params, const float *grads, float lr) {
    o->step++;
    if (o->n == 0) return;
    adamw_kernel<<<grid_for(o->n, 256), 256>>>(params, o->m, o->v, grads, adamw_coefs(o, lr), o->n);
    KERNEL_CHECK("adamw_kernel");
}

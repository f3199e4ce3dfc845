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

// --clip's sum of squares (optim_ops.cuh): one thread per run of
// NN_SUMSQ_CHUNK elements, then one thread adds the runs in order, so the
// result does not depend on the launch shape. The double comes down.
__global__ static void sumsq_runs_kernel(double *runs, const float *g, size_t n, size_t nruns) {
    GRID_STRIDE(c, nruns) runs[c] = sumsq_run(g, n, c);
}
__global__ static void sumsq_total_kernel(double *out, const double *runs, size_t nruns) {
    if (blockIdx.x == 0 && threadIdx.x == 0) *out = sumsq_total(runs, nruns);
}
extern "C" double grad_sumsq_cuda(const float *g, size_t n) {
    if (n == 0) return 0.0;
    size_t nruns = sumsq_nruns(n);
    // scratch: nruns doubles, then the total (two floats each)
    double *runs = (double *)cuda_scratch(2 * (nruns + 1));
    if (!runs) return NAN;
    sumsq_runs_kernel<<<grid_for(nruns, 128), 128>>>(runs, g, n, nruns);
    if (!KERNEL_CHECK("sumsq_runs_kernel")) return NAN;
    sumsq_total_kernel<<<1, 1>>>(runs + nruns, runs, nruns);
    if (!KERNEL_CHECK("sumsq_total_kernel")) return NAN;
    double h = NAN;
    if (!CUDA_CHECK(cudaMemcpy(&h, runs + nruns, sizeof h, cudaMemcpyDeviceToHost))) return NAN;
    return h;
}

// g *= k, one thread per element
__global__ static void scale_kernel(float *g, float k, size_t n) {
    GRID_STRIDE(i, n) g[i] = scale_elem(g, k, i);
}
extern "C" void scale_cuda(float *g, float k, size_t n) {
    if (n == 0) return;
    scale_kernel<<<grid_for(n, 256), 256>>>(g, k, n);
    KERNEL_CHECK("scale_kernel");
}

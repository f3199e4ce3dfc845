// cuda/ddpm.cu: the diffusion arithmetic around the UNet on the GPU
// (ddpm_ops.cuh): add_noise, the v target, the MSE loss and its gradient.
#include "common.cuh"
#include "ddpm_ops.cuh"
extern "C" {
#include "cuda.h"
}

// x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
__global__ static void add_noise_kernel(floatX *xt, const floatX *x0, const floatX *eps, const int *t,
                                        const float *sa, const float *s1a, size_t n, size_t total) {
    GRID_STRIDE(i, total) xt[i] = stx(add_noise_elem(x0, eps, t, sa, s1a, n, i));
}
// v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0
__global__ static void velocity_kernel(floatX *v, const floatX *x0, const floatX *eps, const int *t,
                                       const float *sa, const float *s1a, size_t n, size_t total) {
    GRID_STRIDE(i, total) v[i] = stx(velocity_elem(x0, eps, t, sa, s1a, n, i));
}
// one block per item: sums[b] = sum_i (pred - target)^2 (double partials, tree)
__global__ static void mse_item_kernel(double *sums, const floatX *pred, const floatX *target, size_t n) {
    __shared__ double sh[NT];
    int b = blockIdx.x;
    double s = block_tree_sum(mse_partial(pred, target, n, b, threadIdx.x, NT), sh);
    if (threadIdx.x == 0) sums[b] = s;
}
// L = (1/B) sum_b w_b sums[b] / n, the items in order (one thread)
__global__ static void mse_total_kernel(float *loss, const double *sums, const float *weight, int B, size_t n) {
    if (blockIdx.x == 0 && threadIdx.x == 0) *loss = mse_total(sums, weight, B, n);
}
// dpred += dloss 2 w_b (pred - target) / (B n)
__global__ static void mse_backward_kernel(floatX *dpred, const floatX *pred, const floatX *target,
                                           const float *weight, float dloss, int B, size_t n, size_t total) {
    GRID_STRIDE(i, total) {
        float k = mse_grad_coef(dloss, weight, B, n, (int)(i / n));
        dpred[i] = stx(ldx(dpred[i]) + mse_bwd_elem(pred, target, k, i));
    }
}

extern "C" void ddpm_add_noise_cuda(float *xt, const float *x0, const float *eps, const int *t, int B,
                                    size_t n, const float *sqrt_abar, const float *sqrt_1m_abar) {
    size_t total = (size_t)B * n;
    if (total == 0) return;
    add_noise_kernel<<<grid_for(total, 256), 256>>>(xt, x0, eps, t, sqrt_abar, sqrt_1m_abar, n, total);
    KERNEL_CHECK("add_noise_kernel");
}
extern "C" void ddpm_velocity_cuda(float *v, const float *x0, const float *eps, const int *t, int B,
                                   size_t n, const float *sqrt_abar, const float *sqrt_1m_abar) {
    size_t total = (size_t)B * n;
    if (total == 0) return;
    velocity_kernel<<<grid_for(total, 256), 256>>>(v, x0, eps, t, sqrt_abar, sqrt_1m_abar, n, total);
    KERNEL_CHECK("velocity_kernel");
}

extern "C" float mse_loss_forward_cuda(const float *pred, const float *target, const float *weight,
                                       int B, size_t n) {
    if (B <= 0 || n == 0) return 0.0f;
    // scratch: B doubles of item sums, then the loss (floats counted generously)
    float *buf = cuda_scratch((size_t)B * 2 + 2);
    if (!buf) return NAN;
    double *sums = (double *)buf;
    float *loss = buf + (size_t)B * 2;
    mse_item_kernel<<<B, NT>>>(sums, pred, target, n);
    if (!KERNEL_CHECK("mse_item_kernel")) return NAN;
    mse_total_kernel<<<1, 1>>>(loss, sums, weight, B, n);
    if (!KERNEL_CHECK("mse_total_kernel")) return NAN;
    float h = NAN;
    if (!CUDA_CHECK(cudaMemcpy(&h, loss, sizeof h, cudaMemcpyDeviceToHost))) return NAN;
    return h;
}

extern "C" void mse_loss_backward_cuda(float *dpred, const float *pred, const float *target,
                                       const float *weight, float dloss, int B, size_t n) {
    size_t total = (size_t)B * n;
    if (total == 0 || !dpred) return;
    mse_backward_kernel<<<grid_for(total, 256), 256>>>(dpred, pred, target, weight, dloss, B, n, total);
    KERNEL_CHECK("mse_backward_kernel");
}

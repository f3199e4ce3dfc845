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

/* ---- a training micro-batch's draws on the device (ddpm_ops.cuh): the host
 * passes its RNG state s0 and moves it on by the count (nn_ddpm_micro) */

// t[b] = hash(s0 + (b+1) gamma) mod T;  tf[b] = (float)t[b]
__global__ static void timesteps_kernel(int *t, float *tf, int B, int T, uint64_t s0) {
    GRID_STRIDE(b, (size_t)B) {
        t[b] = timestep_at(s0, (int)b, T);
        tf[b] = (float)t[b];
    }
}
// eps[i] = sqrt(-2 ln(1 - U_{2i+1})) cos(2 pi U_{2i+2})
__global__ static void normal_kernel(floatX *eps, size_t n, uint64_t s0) {
    GRID_STRIDE(i, n) eps[i] = stx(normal_at(s0, i));
}
// eps[b,c,:] += offset N_{bc}
__global__ static void noise_offset_kernel(floatX *eps, float offset, size_t HW, size_t n, uint64_t s0) {
    GRID_STRIDE(i, n) eps[i] = stx(noise_offset_elem(ldx(eps[i]), s0, offset, HW, i));
}
// w[b] = min(snr_t, gamma) / snr_t (eps) or / (snr_t + 1) (v); 1 when gamma <= 0
__global__ static void loss_weights_kernel(float *w, const int *t, int B, float gamma, int vpred,
                                           const float *sa, const float *s1a) {
    GRID_STRIDE(b, (size_t)B) w[b] = loss_weight_at(t, sa, s1a, gamma, vpred, (int)b);
}

extern "C" void ddpm_timesteps_cuda(int *t, float *tf, int B, int T, uint64_t s0) {
    if (B <= 0) return;
    timesteps_kernel<<<grid_for((size_t)B, 256), 256>>>(t, tf, B, T, s0);
    KERNEL_CHECK("timesteps_kernel");
}
extern "C" void ddpm_normal_cuda(float *eps, size_t n, uint64_t s0) {
    if (n == 0) return;
    normal_kernel<<<grid_for(n, 256), 256>>>(eps, n, s0);
    KERNEL_CHECK("normal_kernel");
}
extern "C" void ddpm_noise_offset_cuda(float *eps, int B, int C, size_t HW, float offset, uint64_t s0) {
    size_t n = (size_t)B * C * HW;
    if (offset == 0.0f || n == 0) return;
    noise_offset_kernel<<<grid_for(n, 256), 256>>>(eps, offset, HW, n, s0);
    KERNEL_CHECK("noise_offset_kernel");
}
extern "C" void ddpm_target_cuda(float *target, const float *x0, const float *eps, const int *t, int B, size_t n,
                                 ddpm_prediction pred, const float *sqrt_abar, const float *sqrt_1m_abar) {
    if (pred == DDPM_V_PREDICTION) ddpm_velocity_cuda(target, x0, eps, t, B, n, sqrt_abar, sqrt_1m_abar);
    else if (B > 0 && n > 0) CUDA_CHECK(cudaMemcpy(target, eps, sizeof(float) * B * n, cudaMemcpyDeviceToDevice));
}
extern "C" void ddpm_loss_weights_cuda(float *w, const int *t, int B, float gamma, ddpm_prediction pred,
                                       const float *sqrt_abar, const float *sqrt_1m_abar) {
    if (B <= 0) return;
    loss_weights_kernel<<<grid_for((size_t)B, 256), 256>>>(w, t, B, gamma, pred == DDPM_V_PREDICTION,
                                                           sqrt_abar, sqrt_1m_abar);
    KERNEL_CHECK("loss_weights_kernel");
}

// cuda/ddpm_ops.cuh: the diffusion arithmetic of cuda/ddpm.cu (ddpm.c's
// add_noise, velocity, MSE loss and its gradient), per element / per thread.
// sqrt_abar and sqrt_1m_abar are the schedule's float tables (T), t the
// item's timesteps (B), all device memory on the GPU.
#ifndef SDLORA_CUDA_DDPM_OPS_CUH
#define SDLORA_CUDA_DDPM_OPS_CUH

#include "common.cuh"

// x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, element i, item i / n
HD float add_noise_elem(const floatX *x0, const floatX *eps, const int *t, const float *sqrt_abar,
                        const float *sqrt_1m_abar, size_t n, size_t i) {
    int tb = t[i / n];
    return sqrt_abar[tb] * ldx(x0[i]) + sqrt_1m_abar[tb] * ldx(eps[i]);
}
// v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0
HD float velocity_elem(const floatX *x0, const floatX *eps, const int *t, const float *sqrt_abar,
                       const float *sqrt_1m_abar, size_t n, size_t i) {
    int tb = t[i / n];
    return sqrt_abar[tb] * ldx(eps[i]) - sqrt_1m_abar[tb] * ldx(x0[i]);
}

/* L = (1/B) sum_b w_b (1/n) sum_i (pred_bi - target_bi)^2
 * one block per item: thread tid's strided share of the squared error, in
 * double as ddpm.c (n = 16384 per SD1.x item), then the tree in double; the
 * B item terms w_b sum / n are then added in order by one thread. */
HD double mse_partial(const floatX *pred, const floatX *target, size_t n, int b, int tid, int nt) {
    double s = 0.0;
    for (size_t i = (size_t)tid; i < n; i += (size_t)nt) {
        double d = (double)ldx(pred[(size_t)b * n + i]) - (double)ldx(target[(size_t)b * n + i]);
        s += d * d;
    }
    return s;
}
HD float mse_total(const double *item_sums, const float *weight, int B, size_t n) {
    double total = 0.0;
    for (int b = 0; b < B; b++) total += (weight ? (double)weight[b] : 1.0) * item_sums[b] / (double)n;
    return (float)(total / (double)B);
}
inline float mse_loss_host(const floatX *pred, const floatX *target, const float *weight, int B, size_t n) {
    double p[NT], sums[64];
    double *s = B <= 64 ? sums : new double[B];
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < NT; t++) p[t] = mse_partial(pred, target, n, b, t, NT);
        s[b] = host_tree_sum(p, NT);
    }
    float L = mse_total(s, weight, B, n);
    if (s != sums) delete[] s;
    return L;
}
// dpred += k_b (pred - target),  k_b = dloss 2 w_b / (B n) rounded once (ddpm.c)
HD float mse_grad_coef(float dloss, const float *weight, int B, size_t n, int b) {
    double w = weight ? (double)weight[b] : 1.0;
    return (float)((double)dloss * 2.0 * w / ((double)B * (double)n));
}
HD float mse_bwd_elem(const floatX *pred, const floatX *target, float k, size_t i) {
    return k * (ldx(pred[i]) - ldx(target[i]));
}

#endif

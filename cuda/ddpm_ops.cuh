// cuda/ddpm_ops.cuh: the diffusion arithmetic of cuda/ddpm.cu (ddpm.c's
// add_noise, velocity, MSE loss and its gradient), per element / per thread.
// sqrt_abar and sqrt_1m_abar are the schedule's float tables (T), t the
// item's timesteps (B), all device memory on the GPU.
#ifndef SDLORA_CUDA_DDPM_OPS_CUH
#define SDLORA_CUDA_DDPM_OPS_CUH

#include "common.cuh"

// Each product and sum rounded on its own, as ddpm.c's C does them: on the
// device nvcc would otherwise fuse a * b + c into one fma (this file's
// kernels are built without -fmad=false), which rounds once and so differs
// from the CPU in the last bit.
#if defined(__CUDA_ARCH__)
#define DDPM_MUL(a, b) __fmul_rn(a, b)
#define DDPM_ADD(a, b) __fadd_rn(a, b)
#define DDPM_SUB(a, b) __fsub_rn(a, b)
#else
#define DDPM_MUL(a, b) ((a) * (b))
#define DDPM_ADD(a, b) ((a) + (b))
#define DDPM_SUB(a, b) ((a) - (b))
#endif

// x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, element i, item i / n
HD float add_noise_elem(const floatX *x0, const floatX *eps, const int *t, const float *sqrt_abar,
                        const float *sqrt_1m_abar, size_t n, size_t i) {
    int tb = t[i / n];
    return DDPM_ADD(DDPM_MUL(sqrt_abar[tb], ldx(x0[i])), DDPM_MUL(sqrt_1m_abar[tb], ldx(eps[i])));
}
// v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0
HD float velocity_elem(const floatX *x0, const floatX *eps, const int *t, const float *sqrt_abar,
                       const float *sqrt_1m_abar, size_t n, size_t i) {
    int tb = t[i / n];
    return DDPM_SUB(DDPM_MUL(sqrt_abar[tb], ldx(eps[i])), DDPM_MUL(sqrt_1m_abar[tb], ldx(x0[i])));
}

/* ---------------------------------------------------------------------------
 * The training draws by index, nn.c's splitmix64 stream (ddpm.h's
 * ddpm_rng_*_at): the k-th u64 draw after state s0 (k >= 1) is
 *   z_k = hash(s0 + k gamma)
 * so thread i computes its own numbers, the ones a CPU loop draws there. */
HD uint64_t splitmix_at(uint64_t s0, uint64_t k) {
    uint64_t z = s0 + k * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
// rng_uniform: the top 24 bits, k / 2^24 in [0, 1)
HD float uniform_of(uint64_t z) { return (float)(z >> 40) * (1.0f / 16777216.0f); }
// rng_normal number i (draws 2i+1, 2i+2), Box-Muller's cosine half in double:
//   u1 = 1 - U_{2i+1} in (0, 1],  u2 = U_{2i+2},  z = sqrt(-2 ln u1) cos(2 pi u2)
// The host (glibc) gives nn.c's float bit for bit; CUDA's double log and cos
// are within an ulp or two of it, so on a GPU the float may differ in its last bit.
HD float normal_at(uint64_t s0, uint64_t i) {
    double u1 = 1.0 - (double)uniform_of(splitmix_at(s0, 2 * i + 1));
    double u2 = (double)uniform_of(splitmix_at(s0, 2 * i + 2));
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.28318530717958647692 * u2));
}
// t_b = z_{b+1} mod T (ddpm_sample_timesteps)
HD int timestep_at(uint64_t s0, int b, int T) { return (int)(splitmix_at(s0, (uint64_t)b + 1) % (uint64_t)T); }
// eps[b,c,:] += offset N_{bc}: element i of channel bc = i / HW; d rounded
// first, as ddpm_noise_offset's d = offset * rng_normal()
HD float noise_offset_elem(float e, uint64_t s0, float offset, size_t HW, size_t i) {
    float d = DDPM_MUL(offset, normal_at(s0, i / HW));
    return DDPM_ADD(e, d);
}
// Min-SNR-gamma weight of timestep t (ddpm.c's ddpm_snr / ddpm_min_snr_weight):
//   snr = (sqrt(abar) / sqrt(1 - abar))^2,  w = min(snr, gamma) / snr (eps) or / (snr + 1) (v)
// gamma <= 0: w = 1 (no min-SNR; --prior-loss-weight may still scale it)
HD float loss_weight_at(const int *t, const float *sqrt_abar, const float *sqrt_1m_abar, float gamma, int vpred, int b) {
    if (gamma <= 0.0f) return 1.0f;
    float r = sqrt_abar[t[b]] / sqrt_1m_abar[t[b]];
    float snr = DDPM_MUL(r, r);
    float m = snr < gamma ? snr : gamma;
    return vpred ? m / DDPM_ADD(snr, 1.0f) : m / snr;
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

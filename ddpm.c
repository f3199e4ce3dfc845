/* ddpm.c: beta schedule, forward noising, training targets, Min-SNR weights
 * and the MSE loss: the training half of the diffusion math (article 4.2).
 *
 * Every quantity is computed in float32 with the same operations in the same
 * order as PyTorch does them on the CPU, so the schedule matches diffusers
 * bit for bit. The rest matches to an ulp or so: our sqrtf is correctly
 * rounded, torch's vectorised CPU sqrt is sometimes one ulp off.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "ddpm.h"

/* ------------------------------------------------------------------------ */
/* schedule */

/* torch.linspace(start, end, T, dtype=float32) on the CPU. It does not do
 * start + i*step for every i: the first half counts up from start, the
 * second half counts down from end, so both ends are hit exactly, and
 * (as compiled) each element is a fused multiply-add. fmaf reproduces it:
 *   step = (end - start) / (T - 1)                      (float32)
 *   x_i  = start + step * i          for i <  T/2
 *   x_i  = end   - step * (T - 1 - i) for i >= T/2 */
static void linspace_f32(float *x, float start, float end, int T) {
    float step = (end - start) / (float)(T - 1);
    int half = T / 2;
    for (int i = 0; i < T; i++) {
        x[i] = i < half ? fmaf(step, (float)i, start)
                        : fmaf(-step, (float)(T - 1 - i), end);
    }
}

int ddpm_schedule_init(ddpm_schedule *s, const char *beta_schedule, int T,
                       double beta_start, double beta_end, char *err) {
    memset(s, 0, sizeof *s);
    if (strcmp(beta_schedule, "linear") == 0) s->kind = DDPM_LINEAR;
    else if (strcmp(beta_schedule, "scaled_linear") == 0) s->kind = DDPM_SCALED_LINEAR;
    else {
        snprintf(err, DDPM_ERR_LEN, "beta_schedule \"%s\": not supported (use \"linear\" or \"scaled_linear\")",
                 beta_schedule);
        return -1;
    }
    if (T < 2) {
        snprintf(err, DDPM_ERR_LEN, "num_train_timesteps %d: too small (needs at least 2; SD1.x uses 1000)", T);
        return -1;
    }
    if (!(beta_start >= 0 && beta_start < 1 && beta_end >= 0 && beta_end < 1)) {
        snprintf(err, DDPM_ERR_LEN, "beta_start %g, beta_end %g: outside [0, 1) (SD1.x uses 0.00085, 0.012)",
                 beta_start, beta_end);
        return -1;
    }
    s->T = T;
    s->beta_start = beta_start;
    s->beta_end = beta_end;
    float *block = malloc(4 * (size_t)T * sizeof(float));
    if (!block) {
        snprintf(err, DDPM_ERR_LEN, "ddpm schedule: out of memory");
        return -1;
    }
    s->betas = block;
    s->alphas_cumprod = block + T;
    s->sqrt_abar = block + 2 * (size_t)T;
    s->sqrt_1m_abar = block + 3 * (size_t)T;

    if (s->kind == DDPM_LINEAR) {
        /* beta = linspace(beta_start, beta_end, T) */
        linspace_f32(s->betas, (float)beta_start, (float)beta_end, T);
    } else {
        /* scaled_linear, the latent-diffusion schedule: linear in sqrt(beta).
         *   beta = linspace(sqrt(beta_start), sqrt(beta_end), T)^2
         * The square roots are taken in double (Python floats) and then
         * rounded, the square in float32. */
        linspace_f32(s->betas, (float)sqrt(beta_start), (float)sqrt(beta_end), T);
        for (int i = 0; i < T; i++) s->betas[i] = s->betas[i] * s->betas[i];
    }

    /* abar_t = prod_{s<=t} (1 - beta_s). The factors are float32; torch's CPU
     * cumprod carries the running product in double and rounds each output. */
    double prod = 1.0;
    for (int i = 0; i < T; i++) {
        float alpha = 1.0f - s->betas[i];
        prod *= (double)alpha;
        s->alphas_cumprod[i] = (float)prod;
    }
    /* the two coefficients of the forward process, float32 as add_noise does
     * them: abar ** 0.5 and (1 - abar) ** 0.5 */
    for (int i = 0; i < T; i++) {
        float abar = s->alphas_cumprod[i];
        s->sqrt_abar[i] = sqrtf(abar);
        s->sqrt_1m_abar[i] = sqrtf(1.0f - abar);
    }
    return 0;
}

void ddpm_free(ddpm_schedule *s) {
    free(s->betas);                /* one block holds all four arrays */
    memset(s, 0, sizeof *s);
}

int ddpm_prediction_from_name(const char *name, ddpm_prediction *p, char *err) {
    if (strcmp(name, "epsilon") == 0) { *p = DDPM_EPSILON; return 0; }
    if (strcmp(name, "v_prediction") == 0) { *p = DDPM_V_PREDICTION; return 0; }
    snprintf(err, DDPM_ERR_LEN, "prediction_type \"%s\": not supported (use \"epsilon\" or \"v_prediction\")", name);
    return -1;
}

/* ------------------------------------------------------------------------ */
/* forward process and targets */

void ddpm_add_noise(float *xt, const float *x0, const float *eps, const int *t,
                    int B, size_t n_per_item, const ddpm_schedule *s) {
    /* ASSIGNMENT 05 BEGIN: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, each item with its own t[b] */
    /* ASSIGNMENT 05 STUB: memset(xt, 0, (size_t)B * n_per_item * sizeof(float)); */
    for (int b = 0; b < B; b++) {
        float ca = s->sqrt_abar[t[b]], cn = s->sqrt_1m_abar[t[b]];
        const float *x = x0 + (size_t)b * n_per_item, *e = eps + (size_t)b * n_per_item;
        float *o = xt + (size_t)b * n_per_item;
        /* x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps   (article 4.2, the UNet's input) */
        for (size_t i = 0; i < n_per_item; i++) o[i] = ca * x[i] + cn * e[i];
    }
    /* ASSIGNMENT 05 END */
}

void ddpm_velocity(float *v, const float *x0, const float *eps, const int *t,
                   int B, size_t n_per_item, const ddpm_schedule *s) {
    for (int b = 0; b < B; b++) {
        float ca = s->sqrt_abar[t[b]], cn = s->sqrt_1m_abar[t[b]];
        const float *x = x0 + (size_t)b * n_per_item, *e = eps + (size_t)b * n_per_item;
        float *o = v + (size_t)b * n_per_item;
        /* v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 */
        for (size_t i = 0; i < n_per_item; i++) o[i] = ca * e[i] - cn * x[i];
    }
}

void ddpm_target(float *target, const float *x0, const float *eps, const int *t,
                 int B, size_t n_per_item, ddpm_prediction pred, const ddpm_schedule *s) {
    if (pred == DDPM_V_PREDICTION) {
        ddpm_velocity(target, x0, eps, t, B, n_per_item, s);
    } else {
        /* epsilon: the UNet predicts the noise itself (article 4.2) */
        memcpy(target, eps, (size_t)B * n_per_item * sizeof(float));
    }
}

/* ------------------------------------------------------------------------ */
/* Min-SNR-gamma weighting */

float ddpm_snr(const ddpm_schedule *s, int t) {
    /* snr = (alpha / sigma)^2, alpha = sqrt(abar), sigma = sqrt(1 - abar),
     * in this order (not abar / (1 - abar)) because that is what
     * compute_snr rounds */
    float r = s->sqrt_abar[t] / s->sqrt_1m_abar[t];
    return r * r;
}

float ddpm_min_snr_weight(const ddpm_schedule *s, int t, float gamma, ddpm_prediction pred) {
    /* Each timestep's loss is an estimate of x0 with weight snr (epsilon) or
     * snr + 1 (v); clamping that weight at gamma stops the nearly noise-free
     * timesteps from dominating the gradient:
     *   w = min(snr, gamma) / snr          epsilon
     *   w = min(snr, gamma) / (snr + 1)    v_prediction */
    float snr = ddpm_snr(s, t);
    float m = snr < gamma ? snr : gamma;
    return pred == DDPM_V_PREDICTION ? m / (snr + 1.0f) : m / snr;
}

void ddpm_min_snr_weights(float *w, const int *t, int B, float gamma, ddpm_prediction pred,
                          const ddpm_schedule *s) {
    for (int b = 0; b < B; b++) w[b] = ddpm_min_snr_weight(s, t[b], gamma, pred);
}

/* ------------------------------------------------------------------------ */
/* sampling the training randomness */

void ddpm_noise_offset(float *eps, int B, int C, size_t HW, float offset, rng_t *rng) {
    if (offset == 0.0f) return;
    /* eps[b,c,:,:] += offset * N(0,1): a shift of a whole channel's mean,
     * which plain N(0,I) noise almost never contains, so the model also
     * learns to change overall brightness. Draw order: b outer, c inner. */
    for (int b = 0; b < B; b++) {
        for (int c = 0; c < C; c++) {
            float d = offset * rng_normal(rng);
            float *e = eps + ((size_t)b * C + c) * HW;
            for (size_t i = 0; i < HW; i++) e[i] += d;
        }
    }
}

void ddpm_sample_timesteps(int *t, int B, int T, rng_t *rng) {
    /* t ~ U{0..T-1}; the modulo bias of a 64-bit draw is below 1e-16 */
    for (int b = 0; b < B; b++) t[b] = (int)(rng_u64(rng) % (uint64_t)T);
}

void ddpm_sample_noise(float *eps, size_t n, rng_t *rng) {
    for (size_t i = 0; i < n; i++) eps[i] = rng_normal(rng);
}

/* nn.c's SPLITMIX_GAMMA, the step of the state per u64 draw (test_ddpm
 * checks that ddpm_rng_skip agrees with rng_u64) */
#define DDPM_RNG_GAMMA 0x9E3779B97F4A7C15ULL

uint64_t ddpm_rng_skip(uint64_t s0, uint64_t k) { return s0 + k * DDPM_RNG_GAMMA; }

uint64_t ddpm_rng_u64_at(uint64_t s0, uint64_t k) {
    rng_t r = { ddpm_rng_skip(s0, k - 1) };
    return rng_u64(&r);
}

float ddpm_rng_normal_at(uint64_t s0, uint64_t i) {
    /* rng_normal itself, started where the loop's i-th call starts */
    rng_t r = { ddpm_rng_skip(s0, 2 * i) };
    return rng_normal(&r);
}

/* ------------------------------------------------------------------------ */
/* loss */

float mse_loss_forward(const float *pred, const float *target, const float *weight,
                       int B, size_t n_per_item) {
    /* ASSIGNMENT 05 BEGIN: L = (1/B) sum_b w_b (1/n) sum_i (pred_bi - target_bi)^2, weight NULL: w_b = 1 */
    /* ASSIGNMENT 05 STUB: return 0.0f; */
    /* L = (1/B) sum_b w_b (1/n) sum_i (pred_bi - target_bi)^2
     * The sums run in double: n is 4*64*64 = 16384 per item for SD1.x. */
    double total = 0.0;
    for (int b = 0; b < B; b++) {
        const float *p = pred + (size_t)b * n_per_item, *y = target + (size_t)b * n_per_item;
        double sum = 0.0;
        for (size_t i = 0; i < n_per_item; i++) {
            double d = (double)p[i] - (double)y[i];
            sum += d * d;
        }
        double w = weight ? (double)weight[b] : 1.0;
        total += w * sum / (double)n_per_item;
    }
    return (float)(total / (double)B);
    /* ASSIGNMENT 05 END */
}

void mse_loss_backward(float *dpred, const float *pred, const float *target, const float *weight,
                       float dloss, int B, size_t n_per_item) {
    /* ASSIGNMENT 05 BEGIN: dpred += dloss * dL/dpred (accumulate) */
    for (int b = 0; b < B; b++) {
        const float *p = pred + (size_t)b * n_per_item, *y = target + (size_t)b * n_per_item;
        float *dp = dpred + (size_t)b * n_per_item;
        double w = weight ? (double)weight[b] : 1.0;
        float k = (float)((double)dloss * 2.0 * w / ((double)B * (double)n_per_item));
        /* dL/dpred_bi = 2 w_b (pred_bi - target_bi) / (B n) */
        for (size_t i = 0; i < n_per_item; i++) dp[i] += k * (p[i] - y[i]);
    }
    /* ASSIGNMENT 05 END */
}

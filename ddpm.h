/* ddpm.h: the diffusion math around the UNet.
 *
 * Training half (article 4.2):
 *   L = E_{x0, eps ~ N(0,I), t} || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, c) ||^2
 * The article writes alpha_t inside the square roots; what it means (and what
 * every SD trainer uses) is the cumulative product abar_t = prod_{s<=t} (1 - beta_s).
 *
 * Everything here reproduces diffusers' DDPMScheduler and its training
 * scripts in float32, operation for operation: the schedule matches bit for
 * bit, and a loss computed here is the loss PyTorch would compute.
 */
#ifndef SDLORA_DDPM_H
#define SDLORA_DDPM_H

#include <stddef.h>
#include "nn.h"

#define DDPM_ERR_LEN 256            /* size of the err buffers below */

/* SD1.x's scheduler config (scheduler/scheduler_config.json of SD1.5) */
#define DDPM_SD_T          1000
#define DDPM_SD_BETA_START 0.00085
#define DDPM_SD_BETA_END   0.012

/* what the UNet is trained to output (scheduler config "prediction_type") */
typedef enum { DDPM_EPSILON = 0, DDPM_V_PREDICTION = 1 } ddpm_prediction;

/* beta schedule (scheduler config "beta_schedule") */
typedef enum { DDPM_LINEAR = 0, DDPM_SCALED_LINEAR = 1 } ddpm_beta_schedule;

typedef struct {
    int T;                     /* num_train_timesteps; t runs over 0..T-1 */
    ddpm_beta_schedule kind;
    double beta_start, beta_end;
    float *betas;              /* (T) beta_t */
    float *alphas_cumprod;     /* (T) abar_t = prod_{s<=t} (1 - beta_s) */
    float *sqrt_abar;          /* (T) sqrt(abar_t), float32 as diffusers' add_noise */
    float *sqrt_1m_abar;       /* (T) sqrt(1 - abar_t) */
} ddpm_schedule;

/* Build the schedule. beta_schedule is "linear" or "scaled_linear" (SD1.x:
 * "scaled_linear", 1000, 0.00085, 0.012). beta_start/beta_end are doubles
 * because diffusers takes the square root of the Python double before
 * rounding to float32. Returns 0, or -1 with a message in err
 * (DDPM_ERR_LEN bytes) for an unknown name, T < 2, betas outside [0, 1),
 * or no memory. */
int ddpm_schedule_init(ddpm_schedule *s, const char *beta_schedule, int T,
                       double beta_start, double beta_end, char *err);
void ddpm_free(ddpm_schedule *s);

/* "epsilon" / "v_prediction" -> *p; -1 with err for anything else
 * ("sample" prediction is not supported) */
int ddpm_prediction_from_name(const char *name, ddpm_prediction *p, char *err);

/* Forward process for a batch of B items of n floats each, item b at t[b]:
 *   x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
 * (diffusers DDPMScheduler.add_noise). xt may not alias x0 or eps. */
void ddpm_add_noise(float *xt, const float *x0, const float *eps, const int *t,
                    int B, size_t n_per_item, const ddpm_schedule *s);

/* v-prediction target (DDPMScheduler.get_velocity):
 *   v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 */
void ddpm_velocity(float *v, const float *x0, const float *eps, const int *t,
                   int B, size_t n_per_item, const ddpm_schedule *s);

/* the regression target for the UNet output: eps (epsilon) or v */
void ddpm_target(float *target, const float *x0, const float *eps, const int *t,
                 int B, size_t n_per_item, ddpm_prediction pred, const ddpm_schedule *s);

/* signal-to-noise ratio (diffusers training_utils.compute_snr):
 *   snr_t = (sqrt(abar_t) / sqrt(1 - abar_t))^2 = abar_t / (1 - abar_t) */
float ddpm_snr(const ddpm_schedule *s, int t);

/* Min-SNR-gamma loss weight (Hang et al. 2023, as diffusers'
 * train_text_to_image.py): min(snr, gamma) / snr for epsilon,
 * min(snr, gamma) / (snr + 1) for v-prediction. */
float ddpm_min_snr_weight(const ddpm_schedule *s, int t, float gamma, ddpm_prediction pred);
void ddpm_min_snr_weights(float *w, const int *t, int B, float gamma, ddpm_prediction pred,
                          const ddpm_schedule *s);

/* Noise offset (crosslabs, kohya --noise_offset): one extra normal draw per
 * (item, channel), broadcast over the HW pixels of that channel:
 *   eps[b,c,:,:] += offset * N(0,1)
 * eps is (B, C, HW). offset == 0 draws nothing. */
void ddpm_noise_offset(float *eps, int B, int C, size_t HW, float offset, rng_t *rng);

/* t[b] ~ U{0, ..., T-1} */
void ddpm_sample_timesteps(int *t, int B, int T, rng_t *rng);

/* eps ~ N(0, I), n floats */
void ddpm_sample_noise(float *eps, size_t n, rng_t *rng);

/* The same draws addressed by index (nn.c's stream is splitmix64: the state
 * moves by a fixed constant per u64 draw and each draw is a hash of the
 * state, so draw k after state s0 can be computed directly). A device fills
 * eps, t or the offsets in parallel with exactly the numbers the loops above
 * draw, and the host only moves its state on by the count of draws.
 *   ddpm_rng_u64_at(s0, k)     the k-th rng_u64 after state s0 (k >= 1)
 *   ddpm_rng_normal_at(s0, i)  the (i+1)-th rng_normal after s0 (i >= 0):
 *                              u64 draws 2i+1 and 2i+2
 *   ddpm_rng_skip(s0, k)       the state after k u64 draws
 * Draw counts: ddpm_sample_timesteps B, ddpm_sample_noise 2n,
 * ddpm_noise_offset 2BC (0 when offset is 0). */
uint64_t ddpm_rng_u64_at(uint64_t s0, uint64_t k);
float ddpm_rng_normal_at(uint64_t s0, uint64_t i);
uint64_t ddpm_rng_skip(uint64_t s0, uint64_t k);

/* Weighted MSE over B items of n floats (weight NULL = all 1):
 *   L = (1/B) sum_b w_b * (1/n) sum_i (pred_bi - target_bi)^2
 * i.e. diffusers' mse_loss(reduction="none").mean(over item) * w, then mean. */
float mse_loss_forward(const float *pred, const float *target, const float *weight,
                       int B, size_t n_per_item);
/* dpred += dloss * dL/dpred = dloss * 2 w_b (pred - target) / (B n).
 * dloss is the upstream gradient: 1 for the loss itself, 1/k when k
 * micro-batches are accumulated into one step. */
void mse_loss_backward(float *dpred, const float *pred, const float *target, const float *weight,
                       float dloss, int B, size_t n_per_item);

#endif

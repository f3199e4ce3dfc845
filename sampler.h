/* sampler.h: the sampling half of the diffusion math (article 4.3): the
 * schedulers that turn noise into a latent, one UNet call per step.
 *
 * Each sampler reproduces the diffusers scheduler of the same name step for
 * step, float32 operation for float32 operation, as configured from SD1.x's
 * scheduler/scheduler_config.json (1000 steps, scaled_linear 0.00085..0.012,
 * steps_offset 1, set_alpha_to_one false, clip_sample false, epsilon):
 *
 *   ddim       DDIMScheduler                  (eta 0 by default)
 *   ddpm       DDPMScheduler                  variance_type fixed_small
 *   euler      EulerDiscreteScheduler         optional Karras sigmas
 *   euler_a    EulerAncestralDiscreteScheduler
 *   dpmpp_2m   DPMSolverMultistepScheduler    dpmsolver++, order 2, midpoint,
 *                                             lower_order_final, optional Karras
 *
 * SD1.5's config file names no timestep_spacing, so diffusers gives each
 * class its own default: "leading" for DDIM and DDPM, "linspace" for the
 * Euler pair and DPM++. sampler_config_default() does the same.
 *
 * The loop, as diffusers' StableDiffusionPipeline runs it:
 *
 *   sampler_init_latents(&s, rng, x, n);            x = randn * init_noise_sigma
 *   for (i = 0; i < s.num_steps; i++) {
 *       sampler_scale_model_input(&s, xin, x, n, i);
 *       eps = UNet(xin, sampler_timestep(&s, i), context);   (+ guidance)
 *       sampler_step(&s, eps, x, n, i, rng);         x <- x_{t-1}
 *   }
 *
 * The stochastic samplers (ddpm, euler_a, ddim with eta > 0) draw their step
 * noise from the same generator, one randn of the latent's size per step, in
 * the order diffusers draws it, so a torch CPU generator seeded as in
 * diffusers gives the same images.
 */
#ifndef SDLORA_SAMPLER_H
#define SDLORA_SAMPLER_H

#include <stddef.h>
#include "ddpm.h"
#include "torch_rng.h"

typedef enum {
    SAMPLER_DDIM = 0, SAMPLER_DDPM, SAMPLER_EULER, SAMPLER_EULER_A, SAMPLER_DPMPP_2M
} sampler_kind;

/* how the inference timesteps are spread over 0..T-1 (Lin et al. 2023, table 2) */
typedef enum { SPACING_LEADING = 0, SPACING_TRAILING, SPACING_LINSPACE } sampler_spacing;

typedef struct {
    int num_train_timesteps;       /* T, 1000 */
    const char *beta_schedule;     /* "scaled_linear" (or "linear") */
    double beta_start, beta_end;   /* 0.00085, 0.012 */
    int steps_offset;              /* 1: added to "leading" timesteps */
    sampler_spacing spacing;
    ddpm_prediction prediction;    /* epsilon (SD1.x) or v_prediction */
    int karras;                    /* Karras et al. 2022 sigmas (euler, dpmpp_2m only) */
    float eta;                     /* DDIM only: 0 deterministic, 1 DDPM-like noise */
} sampler_config;

typedef struct {
    sampler_kind kind;
    sampler_config cfg;
    ddpm_schedule sched;           /* betas, alphas_cumprod (shared with training) */
    int num_steps;
    size_t n;                      /* floats in the latent batch */
    int *t_int;                    /* (num_steps) integer timesteps (ddim, ddpm, dpmpp_2m) */
    float *timesteps;              /* (num_steps) the t given to the UNet */
    float *sigmas;                 /* (num_steps + 1) euler, euler_a, dpmpp_2m; last is 0 */
    float init_noise_sigma;
    float *noise;                  /* (n) step noise */
    float *x0_prev;                /* (n) dpmpp_2m: the previous step's data prediction */
    float *x0_cur;                 /* (n) dpmpp_2m: this step's */
    int lower_order_nums;          /* dpmpp_2m: steps taken so far, up to 2 */
} sampler_t;

/* "ddim" | "ddpm" | "euler" | "euler_a" | "dpmpp_2m" -> *kind; -1 with err otherwise */
int sampler_kind_from_name(const char *name, sampler_kind *kind, char *err);
/* "leading" | "trailing" | "linspace" */
int sampler_spacing_from_name(const char *name, sampler_spacing *sp, char *err);

/* SD1.x's scheduler config with diffusers' default spacing for that class */
void sampler_config_default(sampler_config *cfg, sampler_kind kind);

/* Compute the timesteps and sigmas for num_steps (1 .. T) steps on a latent
 * batch of n floats and allocate the step buffers. Returns 0, or -1 with a
 * message in err (DDPM_ERR_LEN bytes) for a bad step count or config (Karras
 * with a sampler that has no such option, unknown beta schedule), or no
 * memory. */
int sampler_init(sampler_t *s, sampler_kind kind, int num_steps, size_t n,
                 const sampler_config *cfg, char *err);
void sampler_free(sampler_t *s);

float sampler_init_noise_sigma(const sampler_t *s);
/* the starting latents: x = randn(n) * init_noise_sigma, one draw from rng */
void sampler_init_latents(const sampler_t *s, torch_rng *rng, float *x, size_t n);
/* the UNet's input at step i: x / sqrt(sigma_i^2 + 1) for the Euler pair,
 * x itself for the others. out may equal x. */
void sampler_scale_model_input(const sampler_t *s, float *out, const float *x, size_t n, int i);
/* the timestep (as a float) the UNet is given at step i */
float sampler_timestep(const sampler_t *s, int i);
/* One step: latents x (n floats, at step i's noise level) become the next
 * step's, in place, given the model's output (epsilon or v) at step i. Steps
 * must run in order 0, 1, ..., num_steps - 1 (DPM++ keeps the previous
 * prediction). rng is used by the stochastic samplers and may be NULL for
 * the others. */
void sampler_step(sampler_t *s, const float *model_output, float *x, size_t n, int i, torch_rng *rng);

#endif

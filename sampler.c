/* sampler.c: DDIM, DDPM, Euler, Euler ancestral and DPM++ 2M, each the
 * diffusers scheduler of the same name (see sampler.h), step for step.
 *
 * Why so literal: diffusers evaluates every step coefficient on float32
 * scalars and every update as a chain of float32 tensor operations, each
 * rounded. Doing the same operations in the same order (one C statement per
 * tensor operation; this file is compiled without floating-point
 * contraction, which -std=c99 implies in GCC) makes every +, -, * and /
 * bitwise equal to diffusers. What is left is sqrt, log and exp: torch (with
 * MKL) evaluates them through MKL's vector math, which is not correctly
 * rounded (about 1 float sqrt in 5 is an ulp away from sqrtf's), so a
 * coefficient can be an ulp off and the latents agree to ~5e-7 relative,
 * not bit for bit (tests/test_sampler.c prints the measured errors).
 *
 * The schedule arithmetic that diffusers does in numpy (float64) is done in
 * double here, with numpy's own formulas for linspace, arange, interp and
 * round (half to even), then rounded to float32 where diffusers rounds.
 */
#include <math.h>
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF   /* clang fuses a*b+c by default even in ISO mode */
#endif
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "sampler.h"

int sampler_kind_from_name(const char *name, sampler_kind *kind, char *err) {
    static const char *names[] = {"ddim", "ddpm", "euler", "euler_a", "dpmpp_2m"};
    for (int k = 0; k < 5; k++)
        if (strcmp(name, names[k]) == 0) { *kind = (sampler_kind)k; return 0; }
    snprintf(err, DDPM_ERR_LEN, "sampler \"%s\": unknown (use ddim, ddpm, euler, euler_a or dpmpp_2m)", name);
    return -1;
}

int sampler_spacing_from_name(const char *name, sampler_spacing *sp, char *err) {
    if (strcmp(name, "leading") == 0) { *sp = SPACING_LEADING; return 0; }
    if (strcmp(name, "trailing") == 0) { *sp = SPACING_TRAILING; return 0; }
    if (strcmp(name, "linspace") == 0) { *sp = SPACING_LINSPACE; return 0; }
    snprintf(err, DDPM_ERR_LEN, "timestep spacing \"%s\": unknown (use leading, trailing or linspace)", name);
    return -1;
}

void sampler_config_default(sampler_config *cfg, sampler_kind kind) {
    memset(cfg, 0, sizeof *cfg);
    cfg->num_train_timesteps = DDPM_SD_T;
    cfg->beta_schedule = "scaled_linear";
    cfg->beta_start = DDPM_SD_BETA_START;
    cfg->beta_end = DDPM_SD_BETA_END;
    cfg->steps_offset = 1;
    cfg->prediction = DDPM_EPSILON;
    /* SD1.5's scheduler_config.json has no timestep_spacing: each diffusers
     * class falls back to its own default */
    cfg->spacing = (kind == SAMPLER_DDIM || kind == SAMPLER_DDPM) ? SPACING_LEADING : SPACING_LINSPACE;
    cfg->karras = 0;
    cfg->eta = 0.0f;
}

/* ------------------------------------------------------------------------ */
/* numpy's formulas */

/* np.linspace(start, stop, num)[i] in float64: i * ((stop - start) / (num - 1))
 * + start, and exactly stop at the end */
static double np_linspace(double start, double stop, int num, int i) {
    if (num == 1) return start;
    if (i == num - 1) return stop;
    double step = (stop - start) / (double)(num - 1);
    return (double)i * step + start;
}

/* np.arange(start, 0, -step)[i] for a float step: numpy stores start and
 * start - step, then fills start + i * (their difference) */
static double np_arange_down(double start, double step, int i) {
    if (i == 0) return start;
    double d = (start - step) - start;
    return i == 1 ? start - step : start + (double)i * d;
}

/* np.interp(x, [0, 1, .., T-1], fp) with fp float32, in double */
static double np_interp_unit(double x, const float *fp, int T) {
    if (x < 0) return fp[0];
    if (x >= (double)(T - 1)) return fp[T - 1];
    int j = (int)floor(x);
    if ((double)j == x) return fp[j];
    double slope = ((double)fp[j + 1] - (double)fp[j]) / 1.0;
    return slope * (x - (double)j) + (double)fp[j];
}

/* diffusers' _sigma_to_t: the fractional timestep whose log sigma (linear
 * between the two neighbouring integer timesteps) is log(sigma). log_sig
 * is float32 (numpy logs the float32 sigmas), the rest double. */
static double sigma_to_t(double sigma, const float *log_sig, int T) {
    double ls = log(sigma > 1e-10 ? sigma : 1e-10);
    /* low = the last index with log_sig <= ls (0 if none), at most T - 2 */
    int low = 0;
    for (int j = 0; j < T; j++)
        if (ls - (double)log_sig[j] >= 0) low = j;
    if (low > T - 2) low = T - 2;
    double lo = log_sig[low], hi = log_sig[low + 1];
    double w = (lo - ls) / (lo - hi);
    if (w < 0) w = 0;
    if (w > 1) w = 1;
    return (1.0 - w) * (double)low + w * (double)(low + 1);
}

/* Karras et al. 2022, eq. 5 with rho = 7:
 *   sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho */
static double karras_sigma(double smin, double smax, int n, int i) {
    const double rho = 7.0;
    double ramp = np_linspace(0.0, 1.0, n, i);
    double min_inv = pow(smin, 1.0 / rho), max_inv = pow(smax, 1.0 / rho);
    return pow(max_inv + ramp * (min_inv - max_inv), rho);
}

/* ------------------------------------------------------------------------ */
/* set_timesteps */

/* integer timesteps of DDIMScheduler / DDPMScheduler (identical code).
 * "trailing" is numpy's arange(T, 0, -T/N): for 62 step counts (61, 103,
 * 121, ...) rounding makes numpy return N + 1 values and diffusers then runs
 * a step too many; we keep the first N (the same for the other schedulers). */
static void timesteps_ddim(int *t, int n, int T, sampler_spacing sp, int offset) {
    for (int k = 0; k < n; k++) {
        if (sp == SPACING_LINSPACE) {
            t[k] = (int)rint(np_linspace(0, T - 1, n, n - 1 - k));
        } else if (sp == SPACING_LEADING) {
            t[k] = (n - 1 - k) * (T / n) + offset;
        } else {
            t[k] = (int)rint(np_arange_down(T, (double)T / n, k)) - 1;
        }
    }
}

/* DPMSolverMultistepScheduler: n + 1 points, the last (t = 0) dropped */
static void timesteps_dpm(int *t, int n, int T, sampler_spacing sp, int offset) {
    for (int k = 0; k < n; k++) {
        if (sp == SPACING_LINSPACE) {
            t[k] = (int)rint(np_linspace(0, T - 1, n + 1, n - k));
        } else if (sp == SPACING_LEADING) {
            t[k] = (n - k) * (T / (n + 1)) + offset;
        } else {
            t[k] = (int)rint(np_arange_down(T, (double)T / n, k)) - 1;
        }
    }
}

/* EulerDiscreteScheduler / EulerAncestralDiscreteScheduler: float32 timesteps */
static void timesteps_euler(float *t, int n, int T, sampler_spacing sp, int offset) {
    for (int k = 0; k < n; k++) {
        if (sp == SPACING_LINSPACE) {
            t[k] = (float)np_linspace(0, T - 1, n, n - 1 - k);
        } else if (sp == SPACING_LEADING) {
            t[k] = (float)((n - 1 - k) * (T / n)) + (float)offset;
        } else {
            t[k] = (float)rint(np_arange_down(T, (double)T / n, k)) - 1.0f;
        }
    }
}

int sampler_init(sampler_t *s, sampler_kind kind, int num_steps, size_t n,
                 const sampler_config *cfg, char *err) {
    memset(s, 0, sizeof *s);
    s->kind = kind;
    s->cfg = *cfg;
    s->num_steps = num_steps;
    s->n = n;
    int T = cfg->num_train_timesteps;
    if (num_steps < 1 || num_steps > T) {
        snprintf(err, DDPM_ERR_LEN, "%d sampling steps: out of range (use 1 to %d)", num_steps, T);
        return -1;
    }
    if (cfg->karras && kind != SAMPLER_EULER && kind != SAMPLER_DPMPP_2M) {
        snprintf(err, DDPM_ERR_LEN, "Karras sigmas: only the euler and dpmpp_2m samplers have them (drop --karras)");
        return -1;
    }
    if (!(cfg->eta >= 0)) {
        snprintf(err, DDPM_ERR_LEN, "eta %g: must be 0 or more (0 is plain DDIM)", cfg->eta);
        return -1;
    }
    if (ddpm_schedule_init(&s->sched, cfg->beta_schedule, T, cfg->beta_start, cfg->beta_end, err) != 0) return -1;

    int N = num_steps;
    s->t_int = calloc((size_t)N, sizeof(int));
    s->timesteps = calloc((size_t)N, sizeof(float));
    s->sigmas = calloc((size_t)N + 1, sizeof(float));
    s->noise = malloc((n ? n : 1) * sizeof(float));
    float *full = malloc(2 * (size_t)T * sizeof(float));     /* sigma_t, log sigma_t for every t */
    if (kind == SAMPLER_DPMPP_2M) {
        s->x0_prev = malloc((n ? n : 1) * sizeof(float));
        s->x0_cur = malloc((n ? n : 1) * sizeof(float));
    }
    if (!s->t_int || !s->timesteps || !s->sigmas || !s->noise || !full ||
        (kind == SAMPLER_DPMPP_2M && (!s->x0_prev || !s->x0_cur))) {
        free(full);
        sampler_free(s);
        snprintf(err, DDPM_ERR_LEN, "sampler: out of memory for %zu latent floats", n);
        return -1;
    }

    /* sigma_t = sqrt((1 - abar_t) / abar_t): the noise-to-signal ratio of x_t,
     * the noise level the Euler and DPM samplers work in (x = x0 + sigma eps) */
    const float *ac = s->sched.alphas_cumprod;
    float *log_sig = full + T;
    for (int t = 0; t < T; t++) {
        full[t] = sqrtf((1.0f - ac[t]) / ac[t]);
        log_sig[t] = logf(full[t]);
    }

    s->init_noise_sigma = 1.0f;
    if (kind == SAMPLER_DDIM || kind == SAMPLER_DDPM) {
        timesteps_ddim(s->t_int, N, T, cfg->spacing, cfg->steps_offset);
        for (int k = 0; k < N; k++) s->timesteps[k] = (float)s->t_int[k];
    } else if (kind == SAMPLER_DPMPP_2M) {
        if (cfg->karras) {
            /* the whole trained range, sigma_{T-1} down to sigma_0; timesteps
             * rounded back from each sigma */
            for (int k = 0; k < N; k++) {
                double sg = karras_sigma(full[0], full[T - 1], N, k);
                s->sigmas[k] = (float)sg;
                s->t_int[k] = (int)rint(sigma_to_t(sg, log_sig, T));
            }
        } else {
            timesteps_dpm(s->t_int, N, T, cfg->spacing, cfg->steps_offset);
            for (int k = 0; k < N; k++) s->sigmas[k] = full[s->t_int[k]];
        }
        for (int k = 0; k < N; k++) s->timesteps[k] = (float)s->t_int[k];
        s->sigmas[N] = 0.0f;
    } else {
        timesteps_euler(s->timesteps, N, T, cfg->spacing, cfg->steps_offset);
        /* sigma at each (possibly fractional) timestep, linear in t */
        double *sg = malloc((size_t)N * sizeof(double));
        if (!sg) {
            free(full);
            sampler_free(s);
            snprintf(err, DDPM_ERR_LEN, "sampler: out of memory");
            return -1;
        }
        for (int k = 0; k < N; k++) sg[k] = np_interp_unit(s->timesteps[k], full, T);
        if (cfg->karras) {
            /* Euler's Karras range is that of the chosen timesteps, not the
             * whole trained range (diffusers does it so) */
            double smin = sg[N - 1], smax = sg[0];
            for (int k = 0; k < N; k++) {
                double v = karras_sigma(smin, smax, N, k);
                s->sigmas[k] = (float)v;
                s->timesteps[k] = (float)sigma_to_t(v, log_sig, T);
            }
        } else {
            for (int k = 0; k < N; k++) s->sigmas[k] = (float)sg[k];
        }
        free(sg);
        s->sigmas[N] = 0.0f;
        for (int k = 0; k < N; k++) s->t_int[k] = (int)rint(s->timesteps[k]);
        /* the starting noise has variance sigma_max^2 (+ 1 when "leading",
         * whose first timestep is below T-1: diffusers adds the signal part) */
        float smax = 0;
        for (int k = 0; k <= N; k++) if (s->sigmas[k] > smax) smax = s->sigmas[k];
        s->init_noise_sigma = cfg->spacing == SPACING_LEADING ? sqrtf(smax * smax + 1.0f) : smax;
    }
    free(full);
    return 0;
}

void sampler_free(sampler_t *s) {
    ddpm_free(&s->sched);
    free(s->t_int); free(s->timesteps); free(s->sigmas);
    free(s->noise); free(s->x0_prev); free(s->x0_cur);
    s->t_int = NULL; s->timesteps = NULL; s->sigmas = NULL;
    s->noise = s->x0_prev = s->x0_cur = NULL;
}

float sampler_init_noise_sigma(const sampler_t *s) { return s->init_noise_sigma; }

void sampler_init_latents(const sampler_t *s, torch_rng *rng, float *x, size_t n) {
    torch_rng_randn(rng, x, n);
    for (size_t j = 0; j < n; j++) x[j] = x[j] * s->init_noise_sigma;
}

float sampler_timestep(const sampler_t *s, int i) { return s->timesteps[i]; }

void sampler_scale_model_input(const sampler_t *s, float *out, const float *x, size_t n, int i) {
    if (s->kind == SAMPLER_EULER || s->kind == SAMPLER_EULER_A) {
        /* x = x0 + sigma eps has variance sigma^2 + 1; the UNet was trained on
         * sqrt(abar) x0 + sqrt(1 - abar) eps = x / sqrt(sigma^2 + 1) */
        float sigma = s->sigmas[i];
        float d = sqrtf(sigma * sigma + 1.0f);
        for (size_t j = 0; j < n; j++) out[j] = x[j] / d;
    } else if (out != x) {
        memcpy(out, x, n * sizeof(float));
    }
}

/* ------------------------------------------------------------------------ */
/* the steps */

/* DDIM (Song et al. 2021, eq. 12), t -> prev = t - T/N:
 *   x0   = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t)
 *   sd   = eta sqrt((1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev))
 *   x'   = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sd^2) eps + sd z */
static void step_ddim(sampler_t *s, const float *mo, float *x, size_t n, int i, torch_rng *rng) {
    /* ASSIGNMENT 06 BEGIN: one DDIM step t -> prev = t - T/N in place on x (epsilon and v_prediction, eta) */
    const float *ac = s->sched.alphas_cumprod;
    int t = s->t_int[i];
    int prev = t - s->cfg.num_train_timesteps / s->num_steps;
    float a_t = ac[t];
    float a_prev = prev >= 0 ? ac[prev] : ac[0];   /* set_alpha_to_one false: abar_0 */
    float b_t = 1.0f - a_t;
    float sa = sqrtf(a_t), sb = sqrtf(b_t), sa_prev = sqrtf(a_prev);
    float b_prev = 1.0f - a_prev;
    float variance = (b_prev / b_t) * (1.0f - a_t / a_prev);
    float sd = s->cfg.eta * sqrtf(variance);
    float dir = sqrtf(1.0f - a_prev - sd * sd);
    int noisy = s->cfg.eta > 0;
    if (noisy) torch_rng_randn(rng, s->noise, n);
    for (size_t j = 0; j < n; j++) {
        float x0, eps;
        if (s->cfg.prediction == DDPM_V_PREDICTION) {
            x0 = sa * x[j] - sb * mo[j];
            eps = sa * mo[j] + sb * x[j];
        } else {
            x0 = (x[j] - sb * mo[j]) / sa;
            eps = mo[j];
        }
        float v = sa_prev * x0 + dir * eps;
        if (noisy) v = v + sd * s->noise[j];
        x[j] = v;
    }
    /* ASSIGNMENT 06 END */
}

/* DDPM ancestral step (Ho et al. 2020, eqs. 6-7) from t to the next timestep
 * of the schedule (prev; abar = 1 after the last):
 *   x' = sqrt(abar_prev) beta_t' / (1 - abar_t) x0
 *      + sqrt(alpha_t') (1 - abar_prev) / (1 - abar_t) x + sqrt(var) z
 *   alpha_t' = abar_t / abar_prev, beta_t' = 1 - alpha_t',
 *   var = (1 - abar_prev) / (1 - abar_t) beta_t'  ("fixed_small"); no z at t = 0 */
static void step_ddpm(sampler_t *s, const float *mo, float *x, size_t n, int i, torch_rng *rng) {
    const float *ac = s->sched.alphas_cumprod;
    int t = s->t_int[i];
    int prev = i + 1 < s->num_steps ? s->t_int[i + 1] : -1;
    float a_t = ac[t];
    float a_prev = prev >= 0 ? ac[prev] : 1.0f;
    float b_t = 1.0f - a_t, b_prev = 1.0f - a_prev;
    float cur_alpha = a_t / a_prev;
    float cur_beta = 1.0f - cur_alpha;
    float sa = sqrtf(a_t), sb = sqrtf(b_t);
    float c_x0 = (sqrtf(a_prev) * cur_beta) / b_t;
    float c_x = sqrtf(cur_alpha) * b_prev / b_t;
    float var = (1.0f - a_prev) / (1.0f - a_t) * cur_beta;
    if (var < 1e-20f) var = 1e-20f;
    float sd = sqrtf(var);
    for (size_t j = 0; j < n; j++) {
        float x0 = s->cfg.prediction == DDPM_V_PREDICTION ? sa * x[j] - sb * mo[j]
                                                          : (x[j] - sb * mo[j]) / sa;
        x[j] = c_x0 * x0 + c_x * x[j];
    }
    if (t > 0) {
        torch_rng_randn(rng, s->noise, n);
        for (size_t j = 0; j < n; j++) x[j] = x[j] + sd * s->noise[j];
    }
}

/* the data prediction of the Euler pair, with x = x0 + sigma eps:
 *   epsilon: x0 = x - sigma eps
 *   v:       x0 = -sigma / sqrt(sigma^2 + 1) v + x / (sigma^2 + 1) */
static float euler_x0(const sampler_t *s, float sigma, float x, float mo) {
    if (s->cfg.prediction == DDPM_V_PREDICTION) {
        float s2 = sigma * sigma + 1.0f;
        float c = -sigma / sqrtf(s2);
        return mo * c + x / s2;
    }
    return x - sigma * mo;
}

/* Euler on dx/dsigma = (x - x0) / sigma (Karras et al. 2022, alg. 2, no churn):
 *   x' = x + (x - x0) / sigma (sigma' - sigma) */
static void step_euler(sampler_t *s, const float *mo, float *x, size_t n, int i) {
    float sigma = s->sigmas[i];
    float dt = s->sigmas[i + 1] - sigma;
    for (size_t j = 0; j < n; j++) {
        float x0 = euler_x0(s, sigma, x[j], mo[j]);
        float d = (x[j] - x0) / sigma;
        x[j] = x[j] + d * dt;
    }
}

/* Euler ancestral: an Euler step down to sigma_down, then fresh noise up
 * to sigma', split so the variances add up:
 *   sigma_up   = sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2)
 *   sigma_down = sqrt(sigma'^2 - sigma_up^2)
 *   x' = x + (x - x0) / sigma (sigma_down - sigma) + sigma_up z */
static void step_euler_a(sampler_t *s, const float *mo, float *x, size_t n, int i, torch_rng *rng) {
    float sigma = s->sigmas[i], to = s->sigmas[i + 1];
    float up = sqrtf(to * to * (sigma * sigma - to * to) / (sigma * sigma));
    float down = sqrtf(to * to - up * up);
    float dt = down - sigma;
    for (size_t j = 0; j < n; j++) {
        float x0 = euler_x0(s, sigma, x[j], mo[j]);
        float d = (x[j] - x0) / sigma;
        x[j] = x[j] + d * dt;
    }
    torch_rng_randn(rng, s->noise, n);
    for (size_t j = 0; j < n; j++) x[j] = x[j] + s->noise[j] * up;
}

/* DPM-Solver++ in alpha/sigma form: alpha = 1 / sqrt(sigma^2 + 1), the
 * noise level s = sigma alpha, and lambda = log(alpha) - log(s) */
static void dpm_alpha_sigma(float sigma, float *alpha, float *sg, float *lambda) {
    *alpha = 1.0f / sqrtf(sigma * sigma + 1.0f);
    *sg = sigma * *alpha;
    *lambda = logf(*alpha) - logf(*sg);
}

/* DPM-Solver++(2M) (Lu et al. 2022, alg. 2), midpoint form, h = lambda' - lambda:
 *   first order:  x' = (s'/s) x - alpha' (e^-h - 1) x0
 *   second order: D1 = (x0 - x0_prev) / r,  r = (lambda - lambda_prev) / h
 *                 x' = (s'/s) x - alpha' (e^-h - 1) x0 - 0.5 alpha' (e^-h - 1) D1
 * First order at the first step (no history) and at the last (to sigma 0). */
static void step_dpmpp_2m(sampler_t *s, const float *mo, float *x, size_t n, int i) {
    float a_s, s_s, l_s, a_t, s_t, l_t;
    dpm_alpha_sigma(s->sigmas[i], &a_s, &s_s, &l_s);
    /* the model output as a data prediction */
    float *x0 = s->x0_cur;
    for (size_t j = 0; j < n; j++)
        x0[j] = s->cfg.prediction == DDPM_V_PREDICTION ? a_s * x[j] - s_s * mo[j]
                                                       : (x[j] - s_s * mo[j]) / a_s;
    dpm_alpha_sigma(s->sigmas[i + 1], &a_t, &s_t, &l_t);
    float h = l_t - l_s;
    float ratio = s_t / s_s;
    float c0 = a_t * (expf(-h) - 1.0f);
    int last = i == s->num_steps - 1;
    if (s->lower_order_nums < 1 || last) {
        for (size_t j = 0; j < n; j++) x[j] = ratio * x[j] - c0 * x0[j];
    } else {
        float a_p, s_p, l_p;
        dpm_alpha_sigma(s->sigmas[i - 1], &a_p, &s_p, &l_p);
        float h0 = l_s - l_p;
        float r0 = h0 / h;
        float inv_r0 = 1.0f / r0;
        float c1 = 0.5f * c0;
        const float *m1 = s->x0_prev;
        for (size_t j = 0; j < n; j++) {
            float d1 = inv_r0 * (x0[j] - m1[j]);
            x[j] = ratio * x[j] - c0 * x0[j] - c1 * d1;
        }
    }
    if (s->lower_order_nums < 2) s->lower_order_nums++;
    /* this prediction is the next step's history */
    s->x0_cur = s->x0_prev;
    s->x0_prev = x0;
}

void sampler_step(sampler_t *s, const float *model_output, float *x, size_t n, int i, torch_rng *rng) {
    switch (s->kind) {
    case SAMPLER_DDIM: step_ddim(s, model_output, x, n, i, rng); break;
    case SAMPLER_DDPM: step_ddpm(s, model_output, x, n, i, rng); break;
    case SAMPLER_EULER: step_euler(s, model_output, x, n, i); break;
    case SAMPLER_EULER_A: step_euler_a(s, model_output, x, n, i, rng); break;
    case SAMPLER_DPMPP_2M: step_dpmpp_2m(s, model_output, x, n, i); break;
    }
}

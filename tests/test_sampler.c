/* test_sampler.c: sampler.c against the diffusers schedulers.
 *
 * Fixture tests/fixtures/sampler.safetensors is made by
 * tools/make_sampler_fixtures.py (diffusers 0.42.1, torch 2.15.0, CPU,
 * float32; versions in its metadata), with SD1.5's scheduler config:
 *  - sched.*: set_timesteps of DDIM, DDPM, Euler, Euler ancestral and
 *    DPM++ 2M for 1..50 steps, every timestep spacing, Karras on and off:
 *    timesteps, sigmas and init_noise_sigma.
 *  - loop.*: the StableDiffusionPipeline loop (randn latents from
 *    torch.Generator("cpu").manual_seed(seed) times init_noise_sigma, then per
 *    step scale_model_input, model, step(generator=...)) for 10 or 20 steps
 *    on a (1, 4, 8, 8) latent, with the fake model
 *        eps[j] = x[j] * 0.1 + t * w[j],  w[j] = float((j % 13) - 6) * 1e-6
 *    (same operations, same rounding, here and in the script). Every step's
 *    latents are compared.
 *
 * Tolerances: integer timesteps exactly; sigmas and timesteps 1e-6 relative
 * (float32 rounding of the same double arithmetic, bitwise on the machine
 * that made the fixture except where numpy's float32 log, not libm's, feeds
 * the Karras timesteps); latents 1e-5 relative to the largest latent, per
 * step. Measured: 2e-7 .. 5e-7. Not bitwise: torch computes the step
 * coefficients' sqrt, log and exp through MKL's vector math, which rounds
 * about 1 float sqrt in 5 to the other neighbour of the exact result, and
 * we use libm's correctly rounded sqrtf/logf/expf; the +, -, *, / chain
 * is the same operation for operation. The initial latents (torch_rng) are
 * compared exactly.
 */
#include "testutil.h"
#include "sampler.h"

#define FX "sampler.safetensors"

static const char *KIND_NAMES[] = {"ddim", "ddpm", "euler", "euler_a", "dpmpp_2m"};
static const char *SPACING_NAMES[] = {"leading", "trailing", "linspace"};
static const int SCHED_STEPS[] = {1, 3, 7, 10, 20, 50};

static void init_or_fail(sampler_t *s, sampler_kind kind, int steps, size_t n, const sampler_config *cfg) {
    char err[DDPM_ERR_LEN];
    int rc = sampler_init(s, kind, steps, n, cfg, err);
    ck_assert_msg(rc == 0, "%s", err);
}

static double rel1(double a, double b) {
    double d = fabs(a - b), m = fabs(b);
    return m > 0 ? d / m : d;
}

START_TEST(test_schedules) {
    st_file f; fx_open(&f, FX);
    printf("  fixture: diffusers %s, torch %s\n", st_meta(&f, "diffusers"), st_meta(&f, "torch"));
    int ncases = 0, nbitwise = 0;
    double worst_sig = 0, worst_t = 0;
    for (int k = 0; k < 5; k++) {
        for (int sp = 0; sp < 3; sp++) {
            int nk = (k == SAMPLER_EULER || k == SAMPLER_DPMPP_2M) ? 2 : 1;
            for (int karras = 0; karras < nk; karras++) {
                for (int si = 0; si < 6; si++) {
                    int steps = SCHED_STEPS[si];
                    char key[128], name[160];
                    snprintf(key, sizeof key, "sched.%s.%s%s.%d", KIND_NAMES[k], SPACING_NAMES[sp],
                             karras ? ".karras" : "", steps);
                    sampler_config cfg;
                    sampler_config_default(&cfg, (sampler_kind)k);
                    cfg.spacing = (sampler_spacing)sp;
                    cfg.karras = karras;
                    sampler_t s;
                    init_or_fail(&s, (sampler_kind)k, steps, 1, &cfg);
                    int bitwise = 1;

                    snprintf(name, sizeof name, "%s.timesteps", key);
                    float *ts = fx_get(&f, name, (size_t)steps);
                    for (int i = 0; i < steps; i++) {
                        float got = sampler_timestep(&s, i);
                        if (k == SAMPLER_EULER || k == SAMPLER_EULER_A) {
                            double e = rel1(got, ts[i]);
                            if (e > worst_t) worst_t = e;
                            ck_assert_msg(e <= 1e-6, "%s[%d]: %.9g vs diffusers %.9g", name, i, got, ts[i]);
                        } else {
                            ck_assert_msg(got == ts[i], "%s[%d]: %g vs diffusers %g", name, i, got, ts[i]);
                        }
                        bitwise &= got == ts[i];
                    }
                    free(ts);

                    if (k != SAMPLER_DDIM && k != SAMPLER_DDPM) {
                        snprintf(name, sizeof name, "%s.sigmas", key);
                        float *sg = fx_get(&f, name, (size_t)steps + 1);
                        for (int i = 0; i <= steps; i++) {
                            double e = rel1(s.sigmas[i], sg[i]);
                            if (e > worst_sig) worst_sig = e;
                            ck_assert_msg(e <= 1e-6, "%s[%d]: %.9g vs diffusers %.9g", name, i, s.sigmas[i], sg[i]);
                            bitwise &= s.sigmas[i] == sg[i];
                        }
                        free(sg);
                    }
                    snprintf(name, sizeof name, "%s.init_sigma", key);
                    float ins = fx_scalar(&f, name);
                    ck_assert_msg(rel1(sampler_init_noise_sigma(&s), ins) <= 1e-6, "%s: %.9g vs %.9g",
                                  name, sampler_init_noise_sigma(&s), ins);
                    bitwise &= sampler_init_noise_sigma(&s) == ins;
                    ncases++; nbitwise += bitwise;
                    sampler_free(&s);
                }
            }
        }
    }
    printf("  schedules: %d of %d bitwise equal; worst rel err sigma %.3g, float timestep %.3g\n",
           nbitwise, ncases, worst_sig, worst_t);
    st_close(&f);
}
END_TEST

/* the loop cases of the tools script */
typedef struct {
    const char *name;
    sampler_kind kind;
    int spacing;                 /* -1: the class's default */
    int karras;
    ddpm_prediction pred;
    int steps;
    uint64_t seed;
    float eta;
} loop_case;

static const loop_case LOOPS[] = {
    {"ddim", SAMPLER_DDIM, -1, 0, DDPM_EPSILON, 10, 42, 0.0f},
    {"ddim_eta1", SAMPLER_DDIM, -1, 0, DDPM_EPSILON, 10, 7, 1.0f},
    {"ddpm", SAMPLER_DDPM, -1, 0, DDPM_EPSILON, 10, 42, 0.0f},
    {"euler", SAMPLER_EULER, -1, 0, DDPM_EPSILON, 10, 42, 0.0f},
    {"euler_karras", SAMPLER_EULER, -1, 1, DDPM_EPSILON, 10, 42, 0.0f},
    {"euler_leading", SAMPLER_EULER, SPACING_LEADING, 0, DDPM_EPSILON, 10, 3, 0.0f},
    {"euler_a", SAMPLER_EULER_A, -1, 0, DDPM_EPSILON, 10, 42, 0.0f},
    {"dpmpp_2m", SAMPLER_DPMPP_2M, -1, 0, DDPM_EPSILON, 10, 42, 0.0f},
    {"dpmpp_2m_karras", SAMPLER_DPMPP_2M, -1, 1, DDPM_EPSILON, 10, 42, 0.0f},
    {"dpmpp_2m_trailing20", SAMPLER_DPMPP_2M, SPACING_TRAILING, 0, DDPM_EPSILON, 20, 5, 0.0f},
    {"ddim_v", SAMPLER_DDIM, -1, 0, DDPM_V_PREDICTION, 10, 11, 0.0f},
    {"ddpm_v", SAMPLER_DDPM, -1, 0, DDPM_V_PREDICTION, 10, 11, 0.0f},
    {"euler_v", SAMPLER_EULER, -1, 0, DDPM_V_PREDICTION, 10, 11, 0.0f},
    {"euler_a_v", SAMPLER_EULER_A, -1, 0, DDPM_V_PREDICTION, 10, 11, 0.0f},
    {"dpmpp_2m_v", SAMPLER_DPMPP_2M, -1, 0, DDPM_V_PREDICTION, 10, 11, 0.0f},
};
enum { NLOOPS = sizeof LOOPS / sizeof LOOPS[0], NLAT = 4 * 8 * 8 };

/* the fake UNet of the fixture script */
static void fake_model(float *eps, const float *x, float t, size_t n) {
    for (size_t j = 0; j < n; j++) {
        float w = (float)((int)(j % 13) - 6) * 1e-6f;
        float a = x[j] * 0.1f;
        float b = t * w;
        eps[j] = a + b;
    }
}

START_TEST(test_loops) {
    st_file f; fx_open(&f, FX);
    float x[NLAT], xin[NLAT], eps[NLAT];
    for (int c = 0; c < NLOOPS; c++) {
        const loop_case *lc = &LOOPS[c];
        sampler_config cfg;
        sampler_config_default(&cfg, lc->kind);
        if (lc->spacing >= 0) cfg.spacing = (sampler_spacing)lc->spacing;
        cfg.karras = lc->karras;
        cfg.prediction = lc->pred;
        cfg.eta = lc->eta;
        sampler_t s;
        init_or_fail(&s, lc->kind, lc->steps, NLAT, &cfg);
        char key[128];
        snprintf(key, sizeof key, "loop.%s.timesteps", lc->name);
        float *ts = fx_get(&f, key, (size_t)lc->steps);
        for (int i = 0; i < lc->steps; i++)
            ck_assert_msg(rel1(sampler_timestep(&s, i), ts[i]) <= 1e-6, "%s[%d]", key, i);
        free(ts);

        torch_rng rng;
        torch_rng_seed(&rng, TORCH_RNG_CPU, lc->seed);
        sampler_init_latents(&s, &rng, x, NLAT);
        snprintf(key, sizeof key, "loop.%s.init", lc->name);
        float *init = fx_get(&f, key, NLAT);
        double e0 = rel_err(x, init, NLAT);
        ck_assert_msg(e0 == 0, "%s: initial latents differ (rel err %g)", key, e0);
        free(init);

        snprintf(key, sizeof key, "loop.%s.latents", lc->name);
        float *ref = fx_get(&f, key, (size_t)lc->steps * NLAT);
        double worst = 0;
        int first_diff = -1;
        for (int i = 0; i < lc->steps; i++) {
            sampler_scale_model_input(&s, xin, x, NLAT, i);
            fake_model(eps, xin, sampler_timestep(&s, i), NLAT);
            sampler_step(&s, eps, x, NLAT, i, &rng);
            const float *r = ref + (size_t)i * NLAT;
            double e = rel_err(x, r, NLAT);
            if (e > worst) worst = e;
            if (e != 0 && first_diff < 0) first_diff = i;
            ck_assert_msg(e <= 1e-5, "%s step %d: rel err %g", lc->name, i, e);
        }
        if (first_diff < 0) printf("  %-20s %2d steps: bitwise equal at every step\n", lc->name, lc->steps);
        else printf("  %-20s %2d steps: worst rel err %.3g (first differs at step %d)\n",
                    lc->name, lc->steps, worst, first_diff);
        free(ref);
        sampler_free(&s);
    }
    st_close(&f);
}
END_TEST

/* the same seed through a deterministic sampler and the in-place /
 * out-of-place scale_model_input give the same latents, and a sampler
 * that draws noise gives different latents for a different seed */
START_TEST(test_seed_matters) {
    float a[NLAT], b[NLAT], xin[NLAT], eps[NLAT];
    for (int pass = 0; pass < 2; pass++) {
        sampler_config cfg; sampler_config_default(&cfg, SAMPLER_EULER_A);
        sampler_t s; init_or_fail(&s, SAMPLER_EULER_A, 5, NLAT, &cfg);
        torch_rng rng; torch_rng_seed(&rng, TORCH_RNG_CPU, 1);
        float *x = pass ? b : a;
        sampler_init_latents(&s, &rng, x, NLAT);
        /* the second pass reseeds after the initial latents: only the step noise changes */
        if (pass) torch_rng_seed(&rng, TORCH_RNG_CPU, 2);
        for (int i = 0; i < 5; i++) {
            sampler_scale_model_input(&s, xin, x, NLAT, i);
            fake_model(eps, xin, sampler_timestep(&s, i), NLAT);
            sampler_step(&s, eps, x, NLAT, i, &rng);
        }
        sampler_free(&s);
    }
    ck_assert_msg(rel_err(a, b, NLAT) > 1e-2, "euler_a ignores its step noise");
}
END_TEST

START_TEST(test_bad_config) {
    char err[DDPM_ERR_LEN];
    sampler_t s; sampler_config cfg;
    sampler_config_default(&cfg, SAMPLER_DDIM);
    ck_assert_int_eq(sampler_init(&s, SAMPLER_DDIM, 0, 16, &cfg, err), -1);
    ck_assert_msg(strstr(err, "steps") != NULL, "%s", err);
    ck_assert_int_eq(sampler_init(&s, SAMPLER_DDIM, 1001, 16, &cfg, err), -1);
    cfg.karras = 1;
    ck_assert_int_eq(sampler_init(&s, SAMPLER_DDIM, 10, 16, &cfg, err), -1);
    ck_assert_msg(strstr(err, "Karras") != NULL, "%s", err);
    sampler_config_default(&cfg, SAMPLER_DDIM);
    cfg.beta_schedule = "cosine";
    ck_assert_int_eq(sampler_init(&s, SAMPLER_DDIM, 10, 16, &cfg, err), -1);
    sampler_kind k; sampler_spacing sp;
    ck_assert_int_eq(sampler_kind_from_name("euler_a", &k, err), 0);
    ck_assert_int_eq(k, SAMPLER_EULER_A);
    ck_assert_int_eq(sampler_kind_from_name("dpm++", &k, err), -1);
    ck_assert_int_eq(sampler_spacing_from_name("trailing", &sp, err), 0);
    ck_assert_int_eq(sp, SPACING_TRAILING);
    ck_assert_int_eq(sampler_spacing_from_name("even", &sp, err), -1);
}
END_TEST

static Suite *sampler_suite(void) {
    Suite *s = suite_create("sampler");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_schedules);
    tcase_add_test(tc, test_loops);
    tcase_add_test(tc, test_seed_matters);
    tcase_add_test(tc, test_bad_config);
    suite_add_tcase(s, tc);
    return s;
}

CHECK_MAIN(sampler_suite)

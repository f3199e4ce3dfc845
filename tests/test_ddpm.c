/* test_ddpm.c: ddpm.c against diffusers.
 *
 * Fixture tests/fixtures/ddpm.safetensors is made by tools/make_ddpm_fixtures.py
 * with diffusers 0.42.1 and torch 2.15.0 (CPU, float32); the versions are also
 * in the file's metadata. It holds DDPMScheduler's betas and alphas_cumprod
 * ("scaled_linear" and "linear", 1000 steps, 0.00085..0.012), add_noise and
 * get_velocity on a (5, 4, 3, 3) batch with t = {0, 999, 1, 500, 250},
 * training_utils.compute_snr, the Min-SNR-gamma weights of
 * train_text_to_image.py, and its loss with the gradient torch autograd gives.
 *
 * Tolerances: schedule 1e-6 relative (it is bitwise equal on the machine that
 * made the fixture), everything else 1e-5.
 */
#include "testutil.h"
#include "ddpm.h"
#include "backend.h"

#define FX "ddpm.safetensors"
enum { B = 5, C = 4, HW = 9, N = C * HW };

static int schedule_or_fail(ddpm_schedule *s, const char *name) {
    char err[DDPM_ERR_LEN];
    int rc = ddpm_schedule_init(s, name, DDPM_SD_T, DDPM_SD_BETA_START, DDPM_SD_BETA_END, err);
    ck_assert_msg(rc == 0, "%s", err);
    return rc;
}

static void load_t(const st_file *f, int *t, int n, const char *name) {
    float *tf = fx_get(f, name, (size_t)n);
    for (int i = 0; i < n; i++) t[i] = (int)tf[i];
    free(tf);
}

static void expect_close(const float *got, const float *ref, size_t n, double tol, const char *what) {
    double e = rel_err(got, ref, n);
    printf("  %-28s rel err %.3g\n", what, e);
    ck_assert_msg(e <= tol, "%s: rel err %g > %g", what, e, tol);
}

/* ---- schedule ---------------------------------------------------------- */

START_TEST(test_schedule_parity) {
    st_file f; fx_open(&f, FX);
    const char *ver = st_meta(&f, "diffusers");
    ck_assert_msg(ver != NULL, "fixture lacks its diffusers version");
    printf("  fixture from diffusers %s\n", ver);
    const char *names[2] = {"scaled_linear", "linear"};
    for (int k = 0; k < 2; k++) {
        ddpm_schedule s; schedule_or_fail(&s, names[k]);
        char key[64];
        snprintf(key, sizeof key, "%s.betas", names[k]);
        float *betas = fx_get(&f, key, DDPM_SD_T);
        snprintf(key, sizeof key, "%s.alphas_cumprod", names[k]);
        float *abar = fx_get(&f, key, DDPM_SD_T);
        int diff = 0;
        for (int i = 0; i < DDPM_SD_T; i++) diff += s.betas[i] != betas[i] || s.alphas_cumprod[i] != abar[i];
        printf("  %s: %d of %d entries not bitwise equal\n", names[k], diff, DDPM_SD_T);
        /* relative per element, not to the max: abar spans 1 .. 0.005 */
        double worst = 0;
        for (int i = 0; i < DDPM_SD_T; i++) {
            double eb = fabs((double)s.betas[i] - betas[i]) / fabs((double)betas[i]);
            double ea = fabs((double)s.alphas_cumprod[i] - abar[i]) / fabs((double)abar[i]);
            if (!(eb <= worst)) worst = eb;
            if (!(ea <= worst)) worst = ea;
        }
        printf("  %s: worst elementwise rel err %.3g\n", names[k], worst);
        ck_assert_msg(worst <= 1e-6, "%s schedule: rel err %g", names[k], worst);
        /* Stricter, and deterministic on any IEEE machine: ddpm.c does torch's
         * exact operations, so every entry is bitwise equal. A plain
         * start + i*step linspace passes 1e-6 (3e-7) but fails this. */
        ck_assert_msg(diff == 0, "%s schedule: %d entries differ from diffusers in the last bits", names[k], diff);
        free(betas); free(abar);
        ddpm_free(&s);
    }
    st_close(&f);
}
END_TEST

START_TEST(test_schedule_sanity) {
    const char *names[2] = {"scaled_linear", "linear"};
    for (int k = 0; k < 2; k++) {
        ddpm_schedule s; schedule_or_fail(&s, names[k]);
        /* ends of the beta range, and abar_0 = 1 - beta_0 */
        ck_assert(fabs(s.betas[0] - DDPM_SD_BETA_START) < 1e-9);
        ck_assert(fabs(s.betas[DDPM_SD_T - 1] - DDPM_SD_BETA_END) < 1e-8);
        ck_assert(fabs(s.alphas_cumprod[0] - (1.0 - DDPM_SD_BETA_START)) < 1e-7);
        for (int i = 1; i < DDPM_SD_T; i++) {
            ck_assert_msg(s.betas[i] > s.betas[i - 1], "%s: betas not increasing at %d", names[k], i);
            ck_assert_msg(s.alphas_cumprod[i] < s.alphas_cumprod[i - 1], "%s: abar not decreasing at %d", names[k], i);
        }
        for (int i = 0; i < DDPM_SD_T; i++) {
            /* the two coefficients form a unit vector: var(x_t) = 1 for unit x0, eps */
            double a = s.sqrt_abar[i], c = s.sqrt_1m_abar[i];
            ck_assert(fabs(a * a + c * c - 1.0) < 1e-6);
        }
        ddpm_free(&s);
    }
    /* SD1.x's schedule: abar_999 = 0.0047 (the well-known non-zero terminal SNR) */
    ddpm_schedule s; schedule_or_fail(&s, "scaled_linear");
    ck_assert(fabs(s.alphas_cumprod[999] - 0.0047) < 1e-4);
    ddpm_free(&s);
}
END_TEST

START_TEST(test_schedule_errors) {
    ddpm_schedule s; char err[DDPM_ERR_LEN];
    err[0] = 0;
    ck_assert_int_eq(ddpm_schedule_init(&s, "squaredcos_cap_v3", 1000, 0.00085, 0.012, err), -1);
    ck_assert(strstr(err, "squaredcos_cap_v3") != NULL);
    err[0] = 0;
    ck_assert_int_eq(ddpm_schedule_init(&s, "linear", 1, 0.00085, 0.012, err), -1);
    ck_assert(err[0] != 0);
    err[0] = 0;
    ck_assert_int_eq(ddpm_schedule_init(&s, "linear", 1000, 0.00085, 1.5, err), -1);
    ck_assert(err[0] != 0);
    ddpm_free(&s);                    /* a failed init leaves a freeable struct */
    ddpm_prediction p = DDPM_V_PREDICTION;
    ck_assert_int_eq(ddpm_prediction_from_name("epsilon", &p, err), 0);
    ck_assert_int_eq(p, DDPM_EPSILON);
    ck_assert_int_eq(ddpm_prediction_from_name("v_prediction", &p, err), 0);
    ck_assert_int_eq(p, DDPM_V_PREDICTION);
    ck_assert_int_eq(ddpm_prediction_from_name("sample", &p, err), -1);
}
END_TEST

/* ---- forward process and targets -------------------------------------- */

START_TEST(test_add_noise_and_velocity) {
    st_file f; fx_open(&f, FX);
    int t[B]; load_t(&f, t, B, "noise.t");
    float *x0 = fx_get(&f, "noise.x0", B * N), *eps = fx_get(&f, "noise.eps", B * N);
    float *xt_s = fx_get(&f, "noise.xt_scaled", B * N), *xt_l = fx_get(&f, "noise.xt_linear", B * N);
    float *v_ref = fx_get(&f, "noise.v_scaled", B * N);
    float out[B * N];
    ddpm_schedule s, l; schedule_or_fail(&s, "scaled_linear"); schedule_or_fail(&l, "linear");

    ddpm_add_noise(out, x0, eps, t, B, N, &s);
    expect_close(out, xt_s, B * N, 1e-5, "add_noise scaled_linear");
    ddpm_add_noise(out, x0, eps, t, B, N, &l);
    expect_close(out, xt_l, B * N, 1e-5, "add_noise linear");
    ddpm_velocity(out, x0, eps, t, B, N, &s);
    expect_close(out, v_ref, B * N, 1e-5, "get_velocity");
    ddpm_target(out, x0, eps, t, B, N, DDPM_V_PREDICTION, &s);
    expect_close(out, v_ref, B * N, 1e-5, "target v_prediction");
    ddpm_target(out, x0, eps, t, B, N, DDPM_EPSILON, &s);
    ck_assert(memcmp(out, eps, sizeof out) == 0);

    ddpm_free(&s); ddpm_free(&l);
    free(x0); free(eps); free(xt_s); free(xt_l); free(v_ref);
    st_close(&f);
}
END_TEST

/* ---- SNR and Min-SNR weights ----------------------------------------- */

START_TEST(test_snr_and_weights) {
    st_file f; fx_open(&f, FX);
    ddpm_schedule s; schedule_or_fail(&s, "scaled_linear");
    enum { NS = 9 };
    int ts[NS]; load_t(&f, ts, NS, "snr.t");
    float *snr_ref = fx_get(&f, "snr.value", NS);
    float snr[NS], direct[NS];
    for (int i = 0; i < NS; i++) {
        snr[i] = ddpm_snr(&s, ts[i]);
        double abar = s.alphas_cumprod[ts[i]];
        direct[i] = (float)(abar / (1.0 - abar));    /* the formula, not the rounding path */
    }
    /* snr spans 1175 .. 0.0047: compare each element to its own scale */
    for (int i = 0; i < NS; i++) {
        ck_assert_msg(fabs(snr[i] - snr_ref[i]) <= 1e-5 * snr_ref[i], "snr t=%d: %g vs %g", ts[i], snr[i], snr_ref[i]);
        ck_assert_msg(fabs(snr[i] - direct[i]) <= 1e-5 * direct[i], "snr t=%d vs abar/(1-abar)", ts[i]);
    }
    printf("  compute_snr: rel err %.3g (t=%d, snr %.4g)\n", rel_err(snr, snr_ref, NS), ts[0], snr[0]);

    int t[B]; load_t(&f, t, B, "noise.t");
    float gamma = fx_scalar(&f, "minsnr.gamma");
    float *w_eps = fx_get(&f, "minsnr.w_eps", B), *w_v = fx_get(&f, "minsnr.w_v", B);
    float w[B];
    ddpm_min_snr_weights(w, t, B, gamma, DDPM_EPSILON, &s);
    expect_close(w, w_eps, B, 1e-5, "min-snr weights epsilon");
    ddpm_min_snr_weights(w, t, B, gamma, DDPM_V_PREDICTION, &s);
    expect_close(w, w_v, B, 1e-5, "min-snr weights v");
    /* weights are at most 1 for epsilon and equal 1 where snr < gamma */
    for (int b = 0; b < B; b++) {
        float we = ddpm_min_snr_weight(&s, t[b], gamma, DDPM_EPSILON);
        ck_assert(we <= 1.0f);
        if (ddpm_snr(&s, t[b]) < gamma) ck_assert(we == 1.0f);
    }
    free(snr_ref); free(w_eps); free(w_v);
    ddpm_free(&s);
    st_close(&f);
}
END_TEST

/* ---- loss --------------------------------------------------------------- */

START_TEST(test_loss_parity) {
    st_file f; fx_open(&f, FX);
    float *pred = fx_get(&f, "loss.pred", B * N), *target = fx_get(&f, "loss.target", B * N);
    float *w = fx_get(&f, "loss.w", B);
    float *g_w = fx_get(&f, "loss.grad_w", B * N), *g = fx_get(&f, "loss.grad", B * N);
    float lw_ref = fx_scalar(&f, "loss.value_w"), l_ref = fx_scalar(&f, "loss.value");
    float d[B * N];

    float lw = mse_loss_forward(pred, target, w, B, N);
    printf("  weighted loss %.8f vs torch %.8f\n", lw, lw_ref);
    ck_assert(fabs(lw - lw_ref) <= 1e-5 * fabs(lw_ref));
    float l = mse_loss_forward(pred, target, NULL, B, N);
    printf("  plain loss    %.8f vs torch %.8f\n", l, l_ref);
    ck_assert(fabs(l - l_ref) <= 1e-5 * fabs(l_ref));

    memset(d, 0, sizeof d);
    mse_loss_backward(d, pred, target, w, 1.0f, B, N);
    expect_close(d, g_w, B * N, 1e-5, "weighted loss grad");
    memset(d, 0, sizeof d);
    mse_loss_backward(d, pred, target, NULL, 1.0f, B, N);
    expect_close(d, g, B * N, 1e-5, "plain loss grad");
    /* backward accumulates, and dloss scales: 1 + 0.5 = 1.5 times the gradient */
    mse_loss_backward(d, pred, target, NULL, 0.5f, B, N);
    for (int i = 0; i < B * N; i++) ck_assert(fabs(d[i] - 1.5f * g[i]) <= 1e-6 * (fabs(g[i]) + 1e-3));

    free(pred); free(target); free(w); free(g_w); free(g);
    st_close(&f);
}
END_TEST

typedef struct { float *pred, *target, *w; int B; size_t n; } mse_ctx;
static double mse_fn(void *p) {
    mse_ctx *c = p;
    return mse_loss_forward(c->pred, c->target, c->w, c->B, c->n);
}

START_TEST(test_loss_grad_check) {
    enum { GB = 3, GN = 7 };
    float pred[GB * GN], target[GB * GN], w[GB] = {0.25f, 1.0f, 3.0f}, d[GB * GN];
    fill_uniform(pred, GB * GN, -1, 1, 11);
    fill_uniform(target, GB * GN, -1, 1, 12);
    mse_ctx c = {pred, target, w, GB, GN};
    memset(d, 0, sizeof d);
    mse_loss_backward(d, pred, target, w, 1.0f, GB, GN);
    /* the loss is quadratic, so the central difference is exact up to the
     * float rounding of the returned loss; a large step keeps that small */
    double e = grad_check(pred, d, GB * GN, mse_fn, &c, 1e-2f, 1e-4, GB * GN);
    printf("  mse grad check: worst %.3g\n", e);
    ck_assert_msg(e < 1e-3, "mse_loss_backward grad check %g", e);
    c.w = NULL;
    memset(d, 0, sizeof d);
    mse_loss_backward(d, pred, target, NULL, 1.0f, GB, GN);
    e = grad_check(pred, d, GB * GN, mse_fn, &c, 1e-2f, 1e-4, GB * GN);
    ck_assert_msg(e < 1e-3, "mse_loss_backward (no weights) grad check %g", e);
}
END_TEST

/* ---- randomness --------------------------------------------------------- */

START_TEST(test_noise_offset) {
    enum { OB = 64, OC = 4, OHW = 5 };
    static float eps[OB * OC * OHW], orig[OB * OC * OHW];
    fill_uniform(orig, OB * OC * OHW, -2, 2, 5);
    memcpy(eps, orig, sizeof eps);
    rng_t r, r2; rng_seed(&r, 99); rng_seed(&r2, 99);

    ddpm_noise_offset(eps, OB, OC, OHW, 0.0f, &r);      /* offset 0: no change, no draw */
    ck_assert(memcmp(eps, orig, sizeof eps) == 0);
    ck_assert(r.state == r2.state);

    const float off = 0.1f;
    ddpm_noise_offset(eps, OB, OC, OHW, off, &r);
    double sum2 = 0;
    for (int bc = 0; bc < OB * OC; bc++) {
        /* one shift per (item, channel), equal to offset * the next normal draw */
        float shift = off * rng_normal(&r2);
        for (int i = 0; i < OHW; i++) {
            size_t k = (size_t)bc * OHW + i;
            ck_assert(fabs((eps[k] - orig[k]) - shift) < 1e-6);
        }
        sum2 += (double)shift * shift;
    }
    double sd = sqrt(sum2 / (OB * OC));
    printf("  noise offset: std of the %d shifts %.4f (offset %.2f)\n", OB * OC, sd, off);
    ck_assert(sd > 0.8 * off && sd < 1.2 * off);
}
END_TEST

START_TEST(test_sample_timesteps) {
    enum { NT = 20000 };
    static int t[NT];
    static int seen[DDPM_SD_T];
    rng_t r; rng_seed(&r, 7);
    ddpm_sample_timesteps(t, NT, DDPM_SD_T, &r);
    double mean = 0;
    memset(seen, 0, sizeof seen);
    for (int i = 0; i < NT; i++) {
        ck_assert(t[i] >= 0 && t[i] < DDPM_SD_T);
        seen[t[i]] = 1;
        mean += t[i];
    }
    mean /= NT;
    int nseen = 0;
    for (int i = 0; i < DDPM_SD_T; i++) nseen += seen[i];
    printf("  timesteps: mean %.1f (499.5), %d of %d values drawn\n", mean, nseen, DDPM_SD_T);
    /* sd of the mean is 288.7 / sqrt(20000) = 2.0 */
    ck_assert(fabs(mean - 499.5) < 10.0);
    ck_assert_int_eq(nseen, DDPM_SD_T);      /* miss probability per value ~2e-9 */
}
END_TEST

/* the draws by index (what a device computes in parallel) are the loops'
 * draws, bit for bit, and nn_ddpm_micro on the CPU table is micro_noise */
START_TEST(test_draws_by_index) {
    rng_t r; rng_seed(&r, 99);
    uint64_t s0 = r.state;
    for (uint64_t k = 1; k <= 500; k++) {
        uint64_t z = rng_u64(&r);
        ck_assert(z == ddpm_rng_u64_at(s0, k) && r.state == ddpm_rng_skip(s0, k));
    }
    s0 = r.state;
    for (uint64_t i = 0; i < 2000; i++) {
        float z = rng_normal(&r), a = ddpm_rng_normal_at(s0, i);
        ck_assert(memcmp(&z, &a, sizeof z) == 0);
    }
    ddpm_schedule s;
    if (schedule_or_fail(&s, "scaled_linear")) return;
    enum { Bm = 3, Nm = Bm * N };
    float x0[Nm], e1[Nm], e2[Nm], x1[Nm], x2[Nm], y1[Nm], y2[Nm], tf[Bm], w1[Bm], w2[Bm];
    int t1[Bm], t2[Bm];
    for (int i = 0; i < Nm; i++) x0[i] = (float)sin(0.37 * i);
    rng_t a, b; rng_seed(&a, 5); rng_seed(&b, 5);
    ddpm_sample_timesteps(t1, Bm, s.T, &a);
    ddpm_sample_noise(e1, Nm, &a);
    ddpm_noise_offset(e1, Bm, C, HW, 0.1f, &a);
    ddpm_add_noise(x1, x0, e1, t1, Bm, N, &s);
    ddpm_target(y1, x0, e1, t1, Bm, N, DDPM_V_PREDICTION, &s);
    ddpm_min_snr_weights(w1, t1, Bm, 5.0f, DDPM_V_PREDICTION, &s);
    nn_ddpm_cfg c = { s.T, s.sqrt_abar, s.sqrt_1m_abar, DDPM_V_PREDICTION, 0.1f, 5.0f };
    nn_ddpm_micro(&nn_ops_cpu, &c, &b, x0, Bm, C, HW, t2, tf, e2, x2, y2, w2);
    ck_assert(memcmp(t1, t2, sizeof t1) == 0 && memcmp(e1, e2, sizeof e1) == 0 && memcmp(x1, x2, sizeof x1) == 0 &&
              memcmp(y1, y2, sizeof y1) == 0 && memcmp(w1, w2, sizeof w1) == 0 && a.state == b.state);
    for (int k = 0; k < Bm; k++) ck_assert(tf[k] == (float)t1[k]);
    ddpm_free(&s);
}
END_TEST

static Suite *ddpm_suite(void) {
    Suite *s = suite_create("ddpm");
    TCase *tc = tcase_create("ddpm");
    tcase_add_test(tc, test_schedule_parity);
    tcase_add_test(tc, test_schedule_sanity);
    tcase_add_test(tc, test_schedule_errors);
    tcase_add_test(tc, test_add_noise_and_velocity);
    tcase_add_test(tc, test_snr_and_weights);
    tcase_add_test(tc, test_loss_parity);
    tcase_add_test(tc, test_loss_grad_check);
    tcase_add_test(tc, test_noise_offset);
    tcase_add_test(tc, test_sample_timesteps);
    tcase_add_test(tc, test_draws_by_index);
    suite_add_tcase(s, tc);
    return s;
}

CHECK_MAIN(ddpm_suite)

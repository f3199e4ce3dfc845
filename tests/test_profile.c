/* test_profile.c: the per-kind profile (SDLORA_PROFILE) counts each primitive
 * once, under its kind and direction, with the flops its math says. */
#include "testutil.h"
#include "profile.h"
#include "lora.h"

static void expect(prof_kind k, int bwd, long ncalls, double nflops) {
    double s, f; long c;
    prof_get(k, bwd, &s, &f, &c);
    ck_assert_int_eq(c, ncalls);
    ck_assert_msg(f == nflops, "kind %d bwd %d: flops %.0f, expected %.0f", (int)k, bwd, f, nflops);
    ck_assert(s >= 0.0);
}

START_TEST(test_off_counts_nothing) {
    prof_enable(0); prof_reset();
    float x[6] = {1, 2, 3, 4, 5, 6}, w[6] = {1, 0, 0, 1, 1, 1}, y[4];
    linear_forward(y, x, w, NULL, 2, 3, 2);
    expect(PROF_LINEAR, 0, 0, 0);
    ck_assert(prof_total() == 0.0);
}
END_TEST

START_TEST(test_kinds_and_flops) {
    prof_enable(1); prof_reset();
    enum { N = 5, IN = 7, OUT = 3 };
    float x[N * IN], w[OUT * IN], y[N * OUT], dy[N * OUT], dx[N * IN] = {0}, dw[OUT * IN] = {0};
    fill_uniform(x, N * IN, -1, 1, 1); fill_uniform(w, OUT * IN, -1, 1, 2); fill_uniform(dy, N * OUT, -1, 1, 3);
    linear_forward(y, x, w, NULL, N, IN, OUT);
    linear_backward(dx, NULL, NULL, dy, x, w, N, IN, OUT);      /* frozen: one product */
    linear_backward(dx, dw, NULL, dy, x, w, N, IN, OUT);        /* full: two */
    expect(PROF_LINEAR, 0, 1, 2.0 * N * IN * OUT);
    expect(PROF_LINEAR, 1, 2, 2.0 * N * IN * OUT * 3);
    /* a 3x3 convolution is its own kind; a 1x1 one counts as a linear */
    enum { C = 2, H = 4, W = 4, O = 3 };
    float img[C * H * W], k3[O * C * 9], k1[O * C], out[O * H * W];
    fill_uniform(img, C * H * W, -1, 1, 4); fill_uniform(k3, O * C * 9, -1, 1, 5); fill_uniform(k1, O * C, -1, 1, 6);
    conv2d_forward(out, img, k3, NULL, 1, C, H, W, O, 3, 3, 1, 1);
    expect(PROF_CONV3, 0, 1, 2.0 * O * H * W * C * 9);
    conv2d_forward(out, img, k1, NULL, 1, C, H, W, O, 1, 1, 1, 0);
    expect(PROF_LINEAR, 0, 2, 2.0 * N * IN * OUT + 2.0 * O * H * W * C);
    /* attention: Q K^T and P V, 2 T T Dh each per head */
    enum { T = 4, NH = 2, DH = 3 };
    float q[T * NH * DH], kk[T * NH * DH], v[T * NH * DH], o[T * NH * DH];
    fill_uniform(q, sizeof q / sizeof *q, -1, 1, 7); fill_uniform(kk, sizeof kk / sizeof *kk, -1, 1, 8);
    fill_uniform(v, sizeof v / sizeof *v, -1, 1, 9);
    attention_forward(o, NULL, q, kk, v, 1, T, T, NH, DH, 0);
    expect(PROF_ATTN, 0, 1, 4.0 * NH * T * T * DH);
    /* norms and elementwise: counted, no flops claimed */
    float mean[1], rstd[1];
    groupnorm_forward(out, mean, rstd, img, NULL, NULL, 1, C, H * W, 1, 1e-5f);
    silu_forward(out, img, C * H * W);
    expect(PROF_NORM, 0, 1, 0);
    expect(PROF_ELEM, 0, 1, 0);
    /* the adapter's own products: r (in + out) per token forward */
    enum { R = 2 };
    float A[R * IN], Bm[OUT * R], ax[N * R];
    rng_t g; rng_seed(&g, 1);
    lora_t L; lora_init(&L, IN, OUT, R, 2.0f, 0.0f, A, Bm, 0, &g);
    lora_forward(y, ax, NULL, NULL, x, w, NULL, &L, N, IN, OUT, NULL);
    expect(PROF_LORA, 0, 1, 2.0 * N * R * (IN + OUT));
    expect(PROF_LINEAR, 0, 3, 2.0 * N * IN * OUT * 2 + 2.0 * O * H * W * C);
    prof_enable(0);
}
END_TEST

/* a primitive called from inside a parallel region is not counted (the
 * table is not shared between threads) */
START_TEST(test_parallel_region_not_counted) {
    prof_enable(1); prof_reset();
    float x[4] = {1, 2, 3, 4}, y[4];
#ifdef _OPENMP
    #pragma omp parallel num_threads(2)
    silu_forward(y, x, 4);
    expect(PROF_ELEM, 0, 0, 0);
#endif
    silu_forward(y, x, 4);
    expect(PROF_ELEM, 0, 1, 0);
    prof_enable(0);
}
END_TEST

static Suite *profile_suite(void) {
    Suite *s = suite_create("profile");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_off_counts_nothing);
    tcase_add_test(tc, test_kinds_and_flops);
    tcase_add_test(tc, test_parallel_region_not_counted);
    suite_add_tcase(s, tc);
    return s;
}

CHECK_MAIN(profile_suite)

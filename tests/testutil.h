/* testutil.h: shared by the Check tests in tests/test_*.c.
 *  - CHECK_MAIN(suite_fn): the main() of one test binary (with a 600 s
 *    default per-test timeout instead of Check's 4 s)
 *  - grad_check(): central finite differences against an analytic gradient
 *  - fixture helpers: read tensors that tools/make_fixtures.py wrote from
 *    the PyTorch reference into tests/fixtures/ (safetensors files)
 *  - rel_err(): max|a - b| / max|b|, the error measure every parity test uses
 *    (relative to the reference tensor's scale, so values near zero do not
 *    blow it up). */
#ifndef SDLORA_TESTUTIL_H
#define SDLORA_TESTUTIL_H

#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "nn.h"
#include "safetensors.h"

/* Check gives each test 4 s unless told otherwise, too little for the
 * heavier tests on a loaded machine or under ASan (test_lora's file tests
 * take 7-10 s). `make test` exports CK_DEFAULT_TIMEOUT=600; a binary run by
 * hand (./build/test_lora) gets the same here. A CK_DEFAULT_TIMEOUT already
 * in the environment wins, and a tcase_set_timeout() in a suite wins over
 * both. It is set before suite_fn() runs: tcase_create() reads it. */
#define CHECK_MAIN(suite_fn)                                              \
    int main(void) {                                                      \
        setenv("CK_DEFAULT_TIMEOUT", "600", 0);                           \
        SRunner *sr = srunner_create(suite_fn());                         \
        srunner_run_all(sr, CK_NORMAL);                                   \
        int nf = srunner_ntests_failed(sr);                               \
        srunner_free(sr);                                                 \
        return nf == 0 ? 0 : 1;                                           \
    }

/* deterministic test data */
static inline void fill_uniform(float *x, size_t n, float lo, float hi, uint64_t seed) {
    rng_t r; rng_seed(&r, seed);
    for (size_t i = 0; i < n; i++) x[i] = lo + (hi - lo) * rng_uniform(&r);
}

static inline double rel_err(const float *a, const float *b, size_t n) {
    double maxd = 0, maxb = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= maxd)) maxd = d;               /* NaN propagates to the max */
        if (fabs((double)b[i]) > maxb) maxb = fabs((double)b[i]);
    }
    return maxb > 0 ? maxd / maxb : maxd;
}

/* The test's scalar loss: L = sum_i out_i * R_i with fixed random R, so
 * dL/dout = R is what backward receives. fn runs the forward and returns L
 * (accumulated in double). */
typedef double (*loss_fn)(void *ctx);

/* Compare analytic[i] with (L(x_i + eps) - L(x_i - eps)) / 2eps on up to
 * max_checks evenly spread entries of x. Returns the worst
 * |a - n| / (|a| + |n| + atol); the caller asserts it is below its bound. */
static inline double grad_check(float *x, const float *analytic, size_t n,
                                loss_fn fn, void *ctx, float eps, double atol, int max_checks) {
    size_t step = n > (size_t)max_checks ? n / (size_t)max_checks : 1;
    double worst = 0;
    for (size_t i = 0; i < n; i += step) {
        float save = x[i];
        x[i] = save + eps; double lp = fn(ctx);
        x[i] = save - eps; double lm = fn(ctx);
        x[i] = save;
        double num = (lp - lm) / (2.0 * (double)eps);
        double a = analytic[i];
        double e = fabs(a - num) / (fabs(a) + fabs(num) + atol);
        if (!(e <= worst)) worst = e;
    }
    return worst;
}

/* dL/dw of one entry by central differences with Richardson extrapolation,
 * R = (4 D(h/2) - D(h)) / 3, which cancels D's h^2 term */
static inline double entry_fd(float *w, loss_fn fn, void *ctx, float h) {
    float save = *w;
    double d[2];
    for (int k = 0; k < 2; k++) {
        float hk = k ? h / 2 : h;
        *w = save + hk; double lp = fn(ctx);
        *w = save - hk; double lm = fn(ctx);
        d[k] = (lp - lm) / (2.0 * (double)hk);
    }
    *w = save;
    return (4.0 * d[1] - d[0]) / 3.0;
}

static inline double dot_d(const float *a, const float *b, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)a[i] * (double)b[i];
    return s;
}

/* fixtures */
#define FIXTURE_DIR "tests/fixtures/"

static inline void fx_open(st_file *f, const char *name) {
    char path[512], err[ST_ERR_LEN];
    snprintf(path, sizeof path, FIXTURE_DIR "%s", name);
    ck_assert_msg(st_open(f, path, err) == 0, "%s", err);
}

/* a fixture tensor as float32 (malloc'ed); asserts it exists and, when
 * expect_numel > 0, that it has that many elements */
static inline float *fx_get(const st_file *f, const char *name, size_t expect_numel) {
    char err[ST_ERR_LEN]; size_t n = 0;
    float *x = st_load_f32(f, name, &n, err);
    ck_assert_msg(x != NULL, "%s", err);
    if (expect_numel) ck_assert_msg(n == expect_numel, "%s: %zu elements, expected %zu", name, n, expect_numel);
    return x;
}

static inline float fx_scalar(const st_file *f, const char *name) {
    float *x = fx_get(f, name, 1); float v = x[0]; free(x); return v;
}

/* ---- matrices for the gemm tests (test_matmul.c, test_bf16.c) ------------
 * rand_buf: n values uniform in [-1, 1) from a 64-bit LCG of its own (the
 * same numbers on every libc), at least one element allocated.
 * ref_gemm_at: element (i, j) of alpha op(A) op(B) + beta c summed in
 * double, each operand passed through rnd first (NULL: as it is; test_bf16
 * passes bf16 rounding); *mag, when not NULL, gets |alpha| sum_p |a b| +
 * |beta c|, the scale an fp32 accumulation error bound is relative to.
 * beta == 0 ignores c (it may be NaN). */
static inline float *rand_buf(size_t n, uint64_t seed) {
    float *x = malloc((n ? n : 1) * sizeof(float));
    ck_assert_ptr_nonnull(x);
    uint64_t s = seed;
    for (size_t i = 0; i < n; i++) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        x[i] = (float)((s >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
    }
    return x;
}

static inline double ref_gemm_at(int ta, int tb, int i, int j, int K, float alpha,
                                 const float *A, int lda, const float *B, int ldb,
                                 float beta, float c, double (*rnd)(float), double *mag) {
    double s = 0, sa = 0;
    for (int p = 0; p < K; p++) {
        float fa = ta ? A[(size_t)p * lda + i] : A[(size_t)i * lda + p];
        float fb = tb ? B[(size_t)j * ldb + p] : B[(size_t)p * ldb + j];
        double a = rnd ? rnd(fa) : fa, b = rnd ? rnd(fb) : fb;
        s += a * b;
        sa += fabs(a * b);
    }
    double cc = beta == 0.0f ? 0.0 : (double)beta * c;
    if (mag) *mag = fabs(alpha) * sa + fabs(cc);
    return alpha * s + cc;
}

#endif

/* test_parity.c: every nn.h primitive against the PyTorch reference.
 *
 * tests/fixtures/nn.safetensors is written by tools/make_fixtures.py from the
 * library modules themselves (torch.nn.Linear/Conv2d/GroupNorm/LayerNorm,
 * F.silu/gelu/interpolate/scaled_dot_product_attention, diffusers GEGLU,
 * get_timestep_embedding and Attention, transformers QuickGELUActivation).
 * For each case it holds the inputs, a random upstream gradient dout, torch's
 * forward output and torch's autograd gradients of L = sum(out * dout).
 *
 * Bounds (max|c - torch| / max|torch|, rel_err in testutil.h):
 *   forward outputs  <= 1e-5,  gradients <= 1e-4.
 * Both are far above float32 rounding (~6e-8 per operation) on these tiny
 * sizes, so a failure means a different formula, not a summation order.
 *
 * The dimensions are the constants in make_fixtures.py; every tensor read
 * checks its element count, so the two cannot drift apart silently. */
#include "testutil.h"

#define TOL_FWD 1e-5
#define TOL_GRAD 1e-4

static st_file fx;
static void fx_setup(void) { fx_open(&fx, "nn.safetensors"); }
static void fx_teardown(void) { st_close(&fx); }

/* "<case>.<what>" from the fixture, n floats */
static float *get(const char *cs, const char *what, size_t n) {
    char name[128];
    snprintf(name, sizeof name, "%s.%s", cs, what);
    return fx_get(&fx, name, n);
}

static float *zeros(size_t n) {
    float *p = calloc(n ? n : 1, sizeof(float));
    ck_assert_ptr_nonnull(p);
    return p;
}

/* compare, print the measured error (so a run documents the margins), assert */
static void expect(const char *cs, const char *what, const float *got, const float *ref,
                   size_t n, double tol) {
    double e = rel_err(got, ref, n);
    printf("  %-12s %-6s rel_err %.2e (bound %.0e)\n", cs, what, e, tol);
    ck_assert_msg(e <= tol, "%s.%s: rel_err %.3e > %.0e", cs, what, e, tol);
}

/* compare against a fixture tensor by name */
static void expect_fx(const char *cs, const char *what, const float *got, size_t n, double tol) {
    float *ref = get(cs, what, n);
    expect(cs, what, got, ref, n, tol);
    free(ref);
}

/* ---------------------------------------------------------------------------
 * linear: x (N, in) -> (N, out) */
START_TEST(test_linear) {
    const char *cs = "linear";
    const int N = 6, IN = 10, OUT = 7;
    float *x = get(cs, "x", N * IN), *w = get(cs, "w", OUT * IN), *b = get(cs, "b", OUT);
    float *dout = get(cs, "dout", N * OUT);
    float *out = zeros(N * OUT), *dx = zeros(N * IN), *dw = zeros(OUT * IN), *db = zeros(OUT);
    linear_forward(out, x, w, b, N, IN, OUT);
    expect_fx(cs, "out", out, N * OUT, TOL_FWD);
    linear_backward(dx, dw, db, dout, x, w, N, IN, OUT);
    expect_fx(cs, "dx", dx, N * IN, TOL_GRAD);
    expect_fx(cs, "dw", dw, OUT * IN, TOL_GRAD);
    expect_fx(cs, "db", db, OUT, TOL_GRAD);

    /* frozen weight (NULL dw, db), as every LoRA base layer: dx unchanged */
    float *dx2 = zeros(N * IN);
    linear_backward(dx2, NULL, NULL, dout, x, w, N, IN, OUT);
    expect_fx(cs, "dx", dx2, N * IN, TOL_GRAD);
    free(x); free(w); free(b); free(dout); free(out); free(dx); free(dw); free(db); free(dx2);
}
END_TEST

/* ---------------------------------------------------------------------------
 * conv2d: x (B, C, H, W) -> (B, O, Ho, Wo) */
static void conv_case(const char *cs, int k, int stride, int pad) {
    const int B = 2, C = 4, H = 6, W = 5, O = 5;
    const int Ho = (H + 2 * pad - k) / stride + 1, Wo = (W + 2 * pad - k) / stride + 1;
    const size_t nx = (size_t)B * C * H * W, nw = (size_t)O * C * k * k, ny = (size_t)B * O * Ho * Wo;
    float *x = get(cs, "x", nx), *w = get(cs, "w", nw), *b = get(cs, "b", O);
    float *dout = get(cs, "dout", ny);
    float *out = zeros(ny), *dx = zeros(nx), *dw = zeros(nw), *db = zeros(O);
    conv2d_forward(out, x, w, b, B, C, H, W, O, k, k, stride, pad);
    expect_fx(cs, "out", out, ny, TOL_FWD);
    conv2d_backward(dx, dw, db, dout, x, w, B, C, H, W, O, k, k, stride, pad);
    expect_fx(cs, "dx", dx, nx, TOL_GRAD);
    expect_fx(cs, "dw", dw, nw, TOL_GRAD);
    expect_fx(cs, "db", db, O, TOL_GRAD);
    free(x); free(w); free(b); free(dout); free(out); free(dx); free(dw); free(db);
}

START_TEST(test_conv3) { conv_case("conv3", 3, 1, 1); } END_TEST
START_TEST(test_conv3s2) { conv_case("conv3s2", 3, 2, 1); } END_TEST   /* diffusers Downsample2D */
START_TEST(test_conv1) { conv_case("conv1", 1, 1, 0); } END_TEST

/* ---------------------------------------------------------------------------
 * group norm: x (B, C, HW), G groups */
static void gn_case(const char *cs, int B, int C, int HW, int G, float eps) {
    const size_t n = (size_t)B * C * HW;
    float *x = get(cs, "x", n), *w = get(cs, "w", C), *b = get(cs, "b", C), *dout = get(cs, "dout", n);
    float *out = zeros(n), *mean = zeros(B * G), *rstd = zeros(B * G);
    float *dx = zeros(n), *dw = zeros(C), *db = zeros(C);
    groupnorm_forward(out, mean, rstd, x, w, b, B, C, HW, G, eps);
    expect_fx(cs, "out", out, n, TOL_FWD);
    groupnorm_backward(dx, dw, db, dout, x, w, mean, rstd, B, C, HW, G);
    expect_fx(cs, "dx", dx, n, TOL_GRAD);
    expect_fx(cs, "dw", dw, C, TOL_GRAD);
    expect_fx(cs, "db", db, C, TOL_GRAD);
    free(x); free(w); free(b); free(dout); free(out); free(mean); free(rstd);
    free(dx); free(dw); free(db);
}

START_TEST(test_groupnorm_unet) { gn_case("gn32", 2, 64, 16, 32, 1e-5f); } END_TEST
START_TEST(test_groupnorm_vae) { gn_case("gn4", 2, 12, 25, 4, 1e-6f); } END_TEST

/* ---------------------------------------------------------------------------
 * layer norm over the last dim: x (N, C) */
START_TEST(test_layernorm) {
    const char *cs = "layernorm";
    const int N = 14, C = 32;
    const size_t n = (size_t)N * C;
    float *x = get(cs, "x", n), *w = get(cs, "w", C), *b = get(cs, "b", C), *dout = get(cs, "dout", n);
    float *out = zeros(n), *mean = zeros(N), *rstd = zeros(N);
    float *dx = zeros(n), *dw = zeros(C), *db = zeros(C);
    layernorm_forward(out, mean, rstd, x, w, b, N, C, 1e-5f);
    expect_fx(cs, "out", out, n, TOL_FWD);
    layernorm_backward(dx, dw, db, dout, x, w, mean, rstd, N, C);
    expect_fx(cs, "dx", dx, n, TOL_GRAD);
    expect_fx(cs, "dw", dw, C, TOL_GRAD);
    expect_fx(cs, "db", db, C, TOL_GRAD);
    free(x); free(w); free(b); free(dout); free(out); free(mean); free(rstd);
    free(dx); free(dw); free(db);
}
END_TEST

/* ---------------------------------------------------------------------------
 * pointwise activations, 256 values including +-20 and +-8 */
typedef void (*act_fwd)(float *, const float *, size_t);
typedef void (*act_bwd)(float *, const float *, const float *, size_t);

static void act_case(const char *cs, act_fwd fwd, act_bwd bwd) {
    const size_t n = 256;
    float *x = get(cs, "x", n), *dout = get(cs, "dout", n);
    float *out = zeros(n), *dx = zeros(n);
    fwd(out, x, n);
    expect_fx(cs, "out", out, n, TOL_FWD);
    bwd(dx, dout, x, n);
    expect_fx(cs, "dx", dx, n, TOL_GRAD);
    /* in place (out == inp), which nn.h allows */
    float *y = get(cs, "x", n);
    fwd(y, y, n);
    expect_fx(cs, "out", y, n, TOL_FWD);
    free(x); free(dout); free(out); free(dx); free(y);
}

START_TEST(test_silu) { act_case("silu", silu_forward, silu_backward); } END_TEST
START_TEST(test_gelu) { act_case("gelu", gelu_forward, gelu_backward); } END_TEST
START_TEST(test_quickgelu) { act_case("quickgelu", quickgelu_forward, quickgelu_backward); } END_TEST

/* ---------------------------------------------------------------------------
 * GEGLU: on the projection output h (N, 2D), then the whole diffusers module
 * (linear DIN -> 2D, then geglu) chained from its input x */
START_TEST(test_geglu) {
    const char *cs = "geglu";
    const int N = 10, DIN = 16, D = 24;
    float *h = get(cs, "h", N * 2 * D), *dout = get(cs, "dout", N * D);
    float *out = zeros(N * D), *dh = zeros(N * 2 * D);
    geglu_forward(out, h, N, D);
    expect_fx(cs, "out", out, N * D, TOL_FWD);
    geglu_backward(dh, dout, h, N, D);
    expect_fx(cs, "dh", dh, N * 2 * D, TOL_GRAD);

    float *x = get(cs, "x", N * DIN), *w = get(cs, "w", 2 * D * DIN), *b = get(cs, "b", 2 * D);
    float *h2 = zeros(N * 2 * D), *out2 = zeros(N * D), *dh2 = zeros(N * 2 * D);
    float *dx = zeros(N * DIN), *dw = zeros(2 * D * DIN), *db = zeros(2 * D);
    linear_forward(h2, x, w, b, N, DIN, 2 * D);
    geglu_forward(out2, h2, N, D);
    expect_fx(cs, "out", out2, N * D, TOL_FWD);
    geglu_backward(dh2, dout, h2, N, D);
    linear_backward(dx, dw, db, dh2, x, w, N, DIN, 2 * D);
    expect_fx(cs, "dx", dx, N * DIN, TOL_GRAD);
    expect_fx(cs, "dw", dw, 2 * D * DIN, TOL_GRAD);
    expect_fx(cs, "db", db, 2 * D, TOL_GRAD);
    free(h); free(dout); free(out); free(dh); free(x); free(w); free(b);
    free(h2); free(out2); free(dh2); free(dx); free(dw); free(db);
}
END_TEST

/* ---------------------------------------------------------------------------
 * nearest 2x upsample: (2, 3, 4, 5) -> (2, 3, 8, 10) */
START_TEST(test_upsample) {
    const char *cs = "upsample";
    const int B = 2, C = 3, H = 4, W = 5;
    const size_t nx = (size_t)B * C * H * W, ny = 4 * nx;
    float *x = get(cs, "x", nx), *dout = get(cs, "dout", ny);
    float *out = zeros(ny), *dx = zeros(nx);
    upsample2x_forward(out, x, B, C, H, W);
    expect_fx(cs, "out", out, ny, TOL_FWD);
    upsample2x_backward(dx, dout, B, C, H, W);
    expect_fx(cs, "dx", dx, nx, TOL_GRAD);
    free(x); free(dout); free(out); free(dx);
}
END_TEST

/* ---------------------------------------------------------------------------
 * timestep embedding, t = 0, 1, 10, 250, 500, 999 */
static void temb_case(const char *cs, int dim, int flip, float shift) {
    const int N = 6;
    float *t = fx_get(&fx, "temb.t", N);
    float *out = zeros((size_t)N * dim);
    timestep_embedding(out, t, N, dim, flip, shift, 10000.0f);
    expect_fx(cs, "out", out, (size_t)N * dim, TOL_FWD);
    free(t); free(out);
}

START_TEST(test_temb_sd) { temb_case("temb_sd", 32, 1, 0.0f); } END_TEST
START_TEST(test_temb_ddpm) { temb_case("temb_ddpm", 32, 0, 1.0f); } END_TEST
START_TEST(test_temb_odd) { temb_case("temb_odd", 33, 1, 0.0f); } END_TEST

/* ---------------------------------------------------------------------------
 * attention on tokens-major q (B, Tq, H*Dh), k, v (B, Tk, H*Dh), against
 * F.scaled_dot_product_attention; with stored probabilities and without
 * (backward then recomputes them) */
static void attn_case(const char *cs, int Tk, int causal) {
    const int B = 2, Tq = 16, H = 2, Dh = 8, C = H * Dh;
    const size_t nq = (size_t)B * Tq * C, nk = (size_t)B * Tk * C;
    float *q = get(cs, "q", nq), *k = get(cs, "k", nk), *v = get(cs, "v", nk);
    float *dout = get(cs, "dout", nq);
    float *att = zeros((size_t)B * H * Tq * Tk);
    for (int keep = 1; keep >= 0; keep--) {
        float *a = keep ? att : NULL;
        float *out = zeros(nq), *dq = zeros(nq), *dk = zeros(nk), *dv = zeros(nk);
        attention_forward(out, a, q, k, v, B, Tq, Tk, H, Dh, causal);
        expect_fx(cs, "out", out, nq, TOL_FWD);
        attention_backward(dq, dk, dv, dout, q, k, v, a, B, Tq, Tk, H, Dh, causal);
        expect_fx(cs, "dq", dq, nq, TOL_GRAD);
        expect_fx(cs, "dk", dk, nk, TOL_GRAD);
        expect_fx(cs, "dv", dv, nk, TOL_GRAD);
        free(out); free(dq); free(dk); free(dv);
    }
    free(q); free(k); free(v); free(dout); free(att);
}

START_TEST(test_attn_self) { attn_case("attn_self", 16, 0); } END_TEST
START_TEST(test_attn_cross) { attn_case("attn_cross", 7, 0); } END_TEST
START_TEST(test_attn_causal) { attn_case("attn_causal", 16, 1); } END_TEST

/* ---------------------------------------------------------------------------
 * the diffusers Attention module (UNet attn1 / attn2), chained from the
 * primitives: q = x Wq^T, k = c Wk^T, v = c Wv^T (no bias), SDPA,
 * out = a Wo^T + bo; c = x for self-attention. In the self case dx collects
 * three contributions, which also checks that backward accumulates. */
static void mattn_case(const char *cs, int cross) {
    const int B = 2, Tq = 9, QD = 16, H = 2, Dh = 8, C = H * Dh;
    const int Tk = cross ? 5 : Tq, CD = cross ? 12 : QD;
    const size_t nx = (size_t)B * Tq * QD, nc = (size_t)B * Tk * CD;
    const size_t nq = (size_t)B * Tq * C, nk = (size_t)B * Tk * C;
    float *x = get(cs, "x", nx), *ctx = cross ? get(cs, "ctx", nc) : x;
    float *wq = get(cs, "wq", C * QD), *wk = get(cs, "wk", C * CD), *wv = get(cs, "wv", C * CD);
    float *wo = get(cs, "wo", QD * C), *bo = get(cs, "bo", QD), *dout = get(cs, "dout", nx);
    float *q = zeros(nq), *k = zeros(nk), *v = zeros(nk), *a = zeros(nq), *out = zeros(nx);
    float *att = zeros((size_t)B * H * Tq * Tk);

    linear_forward(q, x, wq, NULL, B * Tq, QD, C);
    linear_forward(k, ctx, wk, NULL, B * Tk, CD, C);
    linear_forward(v, ctx, wv, NULL, B * Tk, CD, C);
    attention_forward(a, att, q, k, v, B, Tq, Tk, H, Dh, 0);
    linear_forward(out, a, wo, bo, B * Tq, C, QD);
    expect_fx(cs, "out", out, nx, TOL_FWD);

    float *da = zeros(nq), *dq = zeros(nq), *dk = zeros(nk), *dv = zeros(nk);
    float *dx = zeros(nx), *dctx = cross ? zeros(nc) : dx;
    float *dwq = zeros(C * QD), *dwk = zeros(C * CD), *dwv = zeros(C * CD);
    float *dwo = zeros(QD * C), *dbo = zeros(QD);
    linear_backward(da, dwo, dbo, dout, a, wo, B * Tq, C, QD);
    attention_backward(dq, dk, dv, da, q, k, v, att, B, Tq, Tk, H, Dh, 0);
    linear_backward(dx, dwq, NULL, dq, x, wq, B * Tq, QD, C);
    linear_backward(dctx, dwk, NULL, dk, ctx, wk, B * Tk, CD, C);
    linear_backward(dctx, dwv, NULL, dv, ctx, wv, B * Tk, CD, C);
    expect_fx(cs, "dx", dx, nx, TOL_GRAD);
    if (cross) expect_fx(cs, "dctx", dctx, nc, TOL_GRAD);
    expect_fx(cs, "dwq", dwq, C * QD, TOL_GRAD);
    expect_fx(cs, "dwk", dwk, C * CD, TOL_GRAD);
    expect_fx(cs, "dwv", dwv, C * CD, TOL_GRAD);
    expect_fx(cs, "dwo", dwo, QD * C, TOL_GRAD);
    expect_fx(cs, "dbo", dbo, QD, TOL_GRAD);

    free(x); free(wq); free(wk); free(wv); free(wo); free(bo); free(dout);
    free(q); free(k); free(v); free(a); free(out); free(att);
    free(da); free(dq); free(dk); free(dv); free(dx);
    free(dwq); free(dwk); free(dwv); free(dwo); free(dbo);
    if (cross) { free(ctx); free(dctx); }
}

START_TEST(test_mattn_cross) { mattn_case("mattn_cross", 1); } END_TEST
START_TEST(test_mattn_self) { mattn_case("mattn_self", 0); } END_TEST

/* ------------------------------------------------------------------------- */
static Suite *parity_suite(void) {
    Suite *s = suite_create("parity");
    TCase *tc = tcase_create("torch");
    tcase_add_checked_fixture(tc, fx_setup, fx_teardown);
    tcase_add_test(tc, test_linear);
    tcase_add_test(tc, test_conv3);
    tcase_add_test(tc, test_conv3s2);
    tcase_add_test(tc, test_conv1);
    tcase_add_test(tc, test_groupnorm_unet);
    tcase_add_test(tc, test_groupnorm_vae);
    tcase_add_test(tc, test_layernorm);
    tcase_add_test(tc, test_silu);
    tcase_add_test(tc, test_gelu);
    tcase_add_test(tc, test_quickgelu);
    tcase_add_test(tc, test_geglu);
    tcase_add_test(tc, test_upsample);
    tcase_add_test(tc, test_temb_sd);
    tcase_add_test(tc, test_temb_ddpm);
    tcase_add_test(tc, test_temb_odd);
    tcase_add_test(tc, test_attn_self);
    tcase_add_test(tc, test_attn_cross);
    tcase_add_test(tc, test_attn_causal);
    tcase_add_test(tc, test_mattn_cross);
    tcase_add_test(tc, test_mattn_self);
    suite_add_tcase(s, tc);
    return s;
}

CHECK_MAIN(parity_suite)

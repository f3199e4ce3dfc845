/* test_lora.c: the LoRA layer against its formula, its gradients, and peft.
 *   y = W0 x + b + (alpha/r) B (A dropout(x))        (article 2.2, 4.1)  */
#include "testutil.h"
#include <unistd.h>
#include "lora.h"

/* ---------------------------------------------------------------- helpers */
/* A 1x1 convolution with an adapter is lora_forward at every pixel: the UNet
 * runs proj_in / proj_out on (pixels, channels) tokens. These wrap it for
 * NCHW input, (Bn, C, HW) <-> (Bn * HW, C), so peft's Conv2d LoRA and the
 * gradient checks see the same layer the UNet runs. */
static void to_tokens(float *t, const float *x, int Bn, int C, int HW) {
    for (int b = 0; b < Bn; b++)
        for (int c = 0; c < C; c++)
            for (int p = 0; p < HW; p++) t[((size_t)b * HW + p) * C + c] = x[((size_t)b * C + c) * HW + p];
}
static void from_tokens(float *x, const float *t, int Bn, int C, int HW) {
    for (int b = 0; b < Bn; b++)
        for (int c = 0; c < C; c++)
            for (int p = 0; p < HW; p++) x[((size_t)b * C + c) * HW + p] = t[((size_t)b * HW + p) * C + c];
}
static void conv1x1_forward(float *out, float *ax, uint8_t *mask, const float *inp, const float *w0,
                            const float *b0, const lora_t *L, int Bn, int in, int outc, int HW, rng_t *rng) {
    size_t N = (size_t)Bn * HW;
    float *xt = malloc(sizeof(float) * N * in), *yt = malloc(sizeof(float) * N * outc);
    float *scratch = malloc(sizeof(float) * (lora_scratch_floats(L, (int)N) + 1));
    to_tokens(xt, inp, Bn, in, HW);
    lora_forward(yt, ax, mask, scratch, xt, w0, b0, L, (int)N, in, outc, rng);
    from_tokens(out, yt, Bn, outc, HW);
    free(xt); free(yt); free(scratch);
}
static void conv1x1_backward(float *dinp, const float *dout, const float *inp, const float *ax,
                             const uint8_t *mask, const float *w0, lora_t *L, int Bn, int in, int outc, int HW) {
    size_t N = (size_t)Bn * HW;
    float *xt = malloc(sizeof(float) * N * in), *dyt = malloc(sizeof(float) * N * outc);
    float *dxt = malloc(sizeof(float) * N * in);
    float *scratch = malloc(sizeof(float) * (lora_scratch_floats(L, (int)N) + 1));
    to_tokens(xt, inp, Bn, in, HW);
    to_tokens(dyt, dout, Bn, outc, HW);
    to_tokens(dxt, dinp, Bn, in, HW);              /* backward accumulates */
    lora_backward(dxt, dyt, xt, ax, mask, scratch, w0, L, (int)N, in, outc);
    from_tokens(dinp, dxt, Bn, in, HW);
    free(xt); free(dyt); free(dxt); free(scratch);
}
/* lora_forward / lora_backward with the scratch they ask for */
static void lin_forward(float *out, float *ax, uint8_t *mask, const float *inp, const float *w0,
                        const float *b0, const lora_t *L, int N, int in, int outc, rng_t *rng) {
    float *scratch = malloc(sizeof(float) * (lora_scratch_floats(L, N) + 1));
    lora_forward(out, ax, mask, scratch, inp, w0, b0, L, N, in, outc, rng);
    free(scratch);
}
static void lin_backward(float *dinp, const float *dout, const float *inp, const float *ax,
                         const uint8_t *mask, const float *w0, lora_t *L, int N, int in, int outc) {
    float *scratch = malloc(sizeof(float) * (lora_scratch_floats(L, N) + 1));
    lora_backward(dinp, dout, inp, ax, mask, scratch, w0, L, N, in, outc);
    free(scratch);
}

typedef struct {
    int N, in, out, r, conv, HW;
    float *x, *w0, *b0, *R, *y, *ax;
    uint8_t *mask;
    lora_t L;
    rng_t rng; uint64_t seed;
} lcase;

static void run_forward(lcase *c) {
    rng_seed(&c->rng, c->seed);        /* same dropout mask on every call */
    if (c->conv)
        conv1x1_forward(c->y, c->ax, c->mask, c->x, c->w0, c->b0, &c->L, c->N, c->in, c->out, c->HW, &c->rng);
    else
        lin_forward(c->y, c->ax, c->mask, c->x, c->w0, c->b0, &c->L, c->N, c->in, c->out, &c->rng);
}
static size_t nout(const lcase *c) { return (size_t)c->N * c->out * (c->conv ? c->HW : 1); }
static size_t nin(const lcase *c) { return (size_t)c->N * c->in * (c->conv ? c->HW : 1); }

static double loss(void *ctx) {
    lcase *c = ctx;
    run_forward(c);
    return dot_d(c->y, c->R, nout(c));
}

static void setup(lcase *c, int N, int in, int out, int r, int conv, int HW, float alpha, float p) {
    memset(c, 0, sizeof *c);
    c->N = N; c->in = in; c->out = out; c->r = r; c->conv = conv; c->HW = HW; c->seed = 7;
    c->x = malloc(sizeof(float) * nin(c));
    c->w0 = malloc(sizeof(float) * out * in);
    c->b0 = malloc(sizeof(float) * out);
    c->R = malloc(sizeof(float) * nout(c));
    c->y = malloc(sizeof(float) * nout(c));
    c->ax = malloc(sizeof(float) * (size_t)N * r * (conv ? HW : 1));
    c->mask = malloc(nin(c));
    float *A = malloc(sizeof(float) * r * in), *B = malloc(sizeof(float) * out * r);
    rng_t g; rng_seed(&g, 1);
    lora_init(&c->L, in, out, r, alpha, p, A, B, 0, &g);
    fill_uniform(B, (size_t)out * r, -1, 1, 2);    /* non-zero B so dA is not trivially 0 */
    fill_uniform(c->x, nin(c), -1, 1, 3);
    fill_uniform(c->w0, (size_t)out * in, -0.5, 0.5, 4);
    fill_uniform(c->b0, out, -0.5, 0.5, 5);
    fill_uniform(c->R, nout(c), -1, 1, 6);
    c->L.dA = calloc((size_t)r * in, sizeof(float));
    c->L.dB = calloc((size_t)out * r, sizeof(float));
}

static void teardown(lcase *c) {
    free(c->x); free(c->w0); free(c->b0); free(c->R); free(c->y); free(c->ax); free(c->mask);
    free(c->L.A); free(c->L.B); free(c->L.dA); free(c->L.dB);
}

static void backward(lcase *c, float *dx) {
    if (c->conv)
        conv1x1_backward(dx, c->R, c->x, c->ax, c->mask, c->w0, &c->L, c->N, c->in, c->out, c->HW);
    else
        lin_backward(dx, c->R, c->x, c->ax, c->mask, c->w0, &c->L, c->N, c->in, c->out);
}

/* finite differences for dx, dA, dB */
static void gradcheck_case(int conv, float p) {
    lcase c;
    setup(&c, conv ? 2 : 5, 7, 6, 3, conv, conv ? 4 : 1, 6.0f, p);
    float *dx = calloc(nin(&c), sizeof(float));
    run_forward(&c);
    backward(&c, dx);
    double e;
    e = grad_check(c.x, dx, nin(&c), loss, &c, 1e-2f, 1e-4, 200);
    ck_assert_msg(e < 1e-3, "dx rel err %g (conv=%d p=%g)", e, conv, p);
    e = grad_check(c.L.A, c.L.dA, (size_t)c.r * c.in, loss, &c, 1e-2f, 1e-4, 200);
    ck_assert_msg(e < 1e-3, "dA rel err %g (conv=%d p=%g)", e, conv, p);
    e = grad_check(c.L.B, c.L.dB, (size_t)c.out * c.r, loss, &c, 1e-2f, 1e-4, 200);
    ck_assert_msg(e < 1e-3, "dB rel err %g (conv=%d p=%g)", e, conv, p);
    free(dx);
    teardown(&c);
}

START_TEST(test_gradcheck_linear) { gradcheck_case(0, 0.0f); }
END_TEST
START_TEST(test_gradcheck_linear_dropout) { gradcheck_case(0, 0.3f); }
END_TEST
START_TEST(test_gradcheck_conv1x1) { gradcheck_case(1, 0.0f); }
END_TEST
START_TEST(test_gradcheck_conv1x1_dropout) { gradcheck_case(1, 0.25f); }
END_TEST

/* B = 0 (the initial state) gives the base layer's output bit for bit */
START_TEST(test_zero_B_is_base) {
    lcase c;
    setup(&c, 4, 9, 5, 2, 0, 1, 8.0f, 0.0f);
    memset(c.L.B, 0, sizeof(float) * c.out * c.r);
    run_forward(&c);
    float *base = malloc(sizeof(float) * nout(&c));
    linear_forward(base, c.x, c.w0, c.b0, c.N, c.in, c.out);
    ck_assert(memcmp(base, c.y, sizeof(float) * nout(&c)) == 0);
    free(base);
    teardown(&c);
}
END_TEST

/* the forward equals x (W0 + (alpha/r) B A)^T + b with W formed explicitly,
 * and merge/unmerge give that W and then W0 back */
START_TEST(test_merge_unmerge) {
    lcase c;
    setup(&c, 6, 11, 8, 4, 0, 1, 2.0f, 0.0f);
    run_forward(&c);
    float *w = malloc(sizeof(float) * c.out * c.in), *y2 = malloc(sizeof(float) * nout(&c));
    memcpy(w, c.w0, sizeof(float) * c.out * c.in);
    /* W = W0 + (alpha/r) B A computed here by plain loops, independent of gemm */
    float *wref = malloc(sizeof(float) * c.out * c.in);
    for (int o = 0; o < c.out; o++)
        for (int i = 0; i < c.in; i++) {
            double s = 0;
            for (int k = 0; k < c.r; k++) s += (double)c.L.B[o * c.r + k] * c.L.A[k * c.in + i];
            wref[o * c.in + i] = c.w0[o * c.in + i] + (float)(c.L.alpha / c.L.r * s);
        }
    lora_merge(w, &c.L, 1.0f);
    ck_assert_double_lt(rel_err(w, wref, (size_t)c.out * c.in), 1e-6);
    linear_forward(y2, c.x, w, c.b0, c.N, c.in, c.out);
    ck_assert_double_lt(rel_err(y2, c.y, nout(&c)), 1e-5);   /* merged == unmerged forward */
    lora_unmerge(w, &c.L, 1.0f);
    ck_assert_double_lt(rel_err(w, c.w0, (size_t)c.out * c.in), 1e-6);
    free(w); free(y2); free(wref);
    teardown(&c);
}
END_TEST

START_TEST(test_num_params_and_init) {
    lora_t L; rng_t g; rng_seed(&g, 3);
    int in = 320, out = 640, r = 8;
    float *A = malloc(sizeof(float) * r * in), *B = malloc(sizeof(float) * out * r);
    for (int i = 0; i < out * r; i++) B[i] = 1.0f;
    lora_init(&L, in, out, r, 4.0f, 0.0f, A, B, 0, &g);
    ck_assert_uint_eq(lora_num_params(&L), (size_t)r * (in + out));   /* r(in+out), not 2r*in*out */
    ck_assert_float_eq(L.scale, 0.5f);
    double bound = 1.0 / sqrt((double)in), s2 = 0;
    for (int i = 0; i < r * in; i++) { ck_assert(fabs(A[i]) <= bound); s2 += (double)A[i] * A[i]; }
    /* U(-b, b) has std b / sqrt(3) */
    double sd = sqrt(s2 / (r * in));
    ck_assert_msg(fabs(sd - bound / sqrt(3.0)) < 0.05 * bound, "A std %g", sd);
    for (int i = 0; i < out * r; i++) ck_assert(B[i] == 0.0f);
    free(A); free(B);
}
END_TEST

/* backward accumulates and touches nothing frozen: W0 gets no gradient at all */
START_TEST(test_backward_accumulates) {
    lcase c;
    setup(&c, 3, 5, 4, 2, 0, 1, 4.0f, 0.0f);
    float *dx = calloc(nin(&c), sizeof(float)), *dA1 = malloc(sizeof(float) * c.r * c.in);
    run_forward(&c);
    backward(&c, dx);
    memcpy(dA1, c.L.dA, sizeof(float) * c.r * c.in);
    backward(&c, dx);
    for (int i = 0; i < c.r * c.in; i++) ck_assert_float_eq_tol(c.L.dA[i], 2 * dA1[i], 1e-6);
    /* frozen adapter: NULL dA/dB accepted */
    float *sa = c.L.dA, *sb = c.L.dB;
    c.L.dA = NULL; c.L.dB = NULL;
    float *dx2 = calloc(nin(&c), sizeof(float));
    backward(&c, dx2);                      /* input gradient still flows */
    c.L.dA = sa; c.L.dB = sb;
    float *dx3 = calloc(nin(&c), sizeof(float));
    backward(&c, dx3);
    for (size_t i = 0; i < nin(&c); i++) ck_assert_float_eq(dx2[i], dx3[i]);
    free(dx); free(dx2); free(dx3); free(dA1);
    teardown(&c);
}
END_TEST

/* ---------------------------------------------------------- peft parity
 * tests/fixtures/lora.safetensors: tools/make_fixtures.py runs peft's LoRA
 * Linear / Conv2d layers and records output and autograd gradients. */
static void peft_case(const char *pre, int conv, int rs) {
    st_file f; fx_open(&f, "lora.safetensors");
    char k[128];
#define G(name) (snprintf(k, sizeof k, "%s.%s", pre, name), st_find(&f, k))
#define L(name) (snprintf(k, sizeof k, "%s.%s", pre, name), fx_get(&f, k, 0))
    const st_tensor *tA = G("A"), *tX = G("x");
    ck_assert_msg(tA && tX, "%s: fixture tensors missing", pre);
    int r = (int)tA->shape[0], in = (int)tA->shape[1];
    const st_tensor *tB = G("B");
    int out = (int)tB->shape[0];
    int N = (int)tX->shape[0];
    int HW = conv ? (int)(tX->shape[2] * tX->shape[3]) : 1;
    float *x = L("x"), *w0 = L("w0"), *b0 = L("b0"), *A = L("A"), *B = L("B");
    float *dout = L("dout"), *yref = L("out"), *dxref = L("dx"), *dAref = L("dA"), *dBref = L("dB");
    /* peft: scale = alpha / r, or alpha / sqrt(r) with use_rslora */
    float *al = L("alpha");
    float scale = rs ? al[0] / sqrtf((float)r) : al[0] / (float)r;
    lora_t Lr = { .in = in, .out = out, .r = r, .alpha = al[0], .scale = scale, .dropout = 0, .A = A, .B = B };
    Lr.dA = calloc((size_t)r * in, sizeof(float));
    Lr.dB = calloc((size_t)out * r, sizeof(float));
    size_t ny = (size_t)N * out * HW, nx = (size_t)N * in * HW;
    float *y = malloc(sizeof(float) * ny), *ax = malloc(sizeof(float) * (size_t)N * r * HW);
    float *dx = calloc(nx, sizeof(float));
    if (conv) {
        conv1x1_forward(y, ax, NULL, x, w0, b0, &Lr, N, in, out, HW, NULL);
        conv1x1_backward(dx, dout, x, ax, NULL, w0, &Lr, N, in, out, HW);
    } else {
        lin_forward(y, ax, NULL, x, w0, b0, &Lr, N, in, out, NULL);
        lin_backward(dx, dout, x, ax, NULL, w0, &Lr, N, in, out);
    }
    double e;
    e = rel_err(y, yref, ny);        ck_assert_msg(e <= 1e-5, "%s out rel err %g", pre, e);
    e = rel_err(dx, dxref, nx);      ck_assert_msg(e <= 1e-4, "%s dx rel err %g", pre, e);
    e = rel_err(Lr.dA, dAref, (size_t)r * in);  ck_assert_msg(e <= 1e-4, "%s dA rel err %g", pre, e);
    e = rel_err(Lr.dB, dBref, (size_t)out * r); ck_assert_msg(e <= 1e-4, "%s dB rel err %g", pre, e);
    printf("peft parity %-8s out %.2e  dx %.2e  dA %.2e  dB %.2e\n", pre, rel_err(y, yref, ny),
           rel_err(dx, dxref, nx), rel_err(Lr.dA, dAref, (size_t)r * in), rel_err(Lr.dB, dBref, (size_t)out * r));
    free(x); free(w0); free(b0); free(A); free(B); free(dout); free(yref); free(dxref); free(dAref);
    free(dBref); free(al); free(Lr.dA); free(Lr.dB); free(y); free(ax); free(dx);
    st_close(&f);
#undef G
#undef L
}

/* peft's scale is alpha/r (alpha/sqrt(r) with use_rslora): the fixture
 * records alpha and r, and the scale our lora_init computes must equal
 * the output difference peft produced: (out - out_b0) = scale * B A x */
START_TEST(test_peft_scale) {
    st_file f; fx_open(&f, "lora.safetensors");
    float alpha = fx_scalar(&f, "lora.alpha"), r = fx_scalar(&f, "lora.r");
    float *A = fx_get(&f, "lora.A", 0), *B = fx_get(&f, "lora.B", 0);
    float *x = fx_get(&f, "lora.x", 0), *y = fx_get(&f, "lora.out", 0), *y0 = fx_get(&f, "lora.out_b0", 0);
    const st_tensor *tA = st_find(&f, "lora.A"), *tB = st_find(&f, "lora.B"), *tx = st_find(&f, "lora.x");
    int in = (int)tA->shape[1], out = (int)tB->shape[0], rr = (int)tA->shape[0], N = (int)tx->shape[0];
    ck_assert_int_eq(rr, (int)r);
    lora_t L; rng_t g; rng_seed(&g, 1);
    float *A2 = malloc(sizeof(float) * rr * in), *B2 = malloc(sizeof(float) * out * rr);
    lora_init(&L, in, out, rr, alpha, 0.0f, A2, B2, 0, &g);
    /* delta = y - y0 must be L.scale * B A x, computed here in double */
    double maxd = 0, maxr = 0;
    for (int n = 0; n < N; n++)
        for (int o = 0; o < out; o++) {
            double s = 0;
            for (int k = 0; k < rr; k++) {
                double ax = 0;
                for (int i = 0; i < in; i++) ax += (double)A[k * in + i] * x[n * in + i];
                s += B[o * rr + k] * ax;
            }
            double want = L.scale * s, got = (double)y[n * out + o] - y0[n * out + o];
            if (fabs(want - got) > maxd) maxd = fabs(want - got);
            if (fabs(want) > maxr) maxr = fabs(want);
        }
    ck_assert_msg(maxd / maxr < 1e-4, "alpha/r scale differs from peft: rel %g", maxd / maxr);
    free(A); free(B); free(x); free(y); free(y0); free(A2); free(B2);
    st_close(&f);
}
END_TEST

START_TEST(test_peft_linear) { peft_case("lora", 0, 0); }
END_TEST
START_TEST(test_peft_rslora) { peft_case("lora_rs", 0, 1); }
END_TEST
START_TEST(test_peft_conv1x1) { peft_case("loraconv", 1, 0); }
END_TEST

/* peft's freshly initialised lora_A (in = 256) follows the distribution
 * lora_init draws from: U(-1/sqrt(in), 1/sqrt(in)), std = bound / sqrt(3) */
START_TEST(test_peft_init_bound) {
    st_file f; fx_open(&f, "lora.safetensors");
    const st_tensor *t = st_find(&f, "lora.A_init_big");
    ck_assert(t != NULL);
    int r = (int)t->shape[0], in = (int)t->shape[1];
    float *A = fx_get(&f, "lora.A_init_big", (size_t)r * in);
    double bound = 1.0 / sqrt((double)in), s2 = 0, amax = 0;
    for (int i = 0; i < r * in; i++) { s2 += (double)A[i] * A[i]; if (fabs(A[i]) > amax) amax = fabs(A[i]); }
    ck_assert_msg(amax <= bound * (1 + 1e-6), "peft A exceeds 1/sqrt(in): %g > %g", amax, bound);
    ck_assert_msg(amax > 0.95 * bound, "peft A max %g far below the bound %g", amax, bound);
    double sd = sqrt(s2 / (r * in));
    ck_assert_msg(fabs(sd - bound / sqrt(3.0)) < 0.05 * bound, "peft A std %g vs %g", sd, bound / sqrt(3.0));
    /* ours, same shape: same bound and spread */
    lora_t L; rng_t g; rng_seed(&g, 9);
    float *A2 = malloc(sizeof(float) * r * in), *B2 = malloc(sizeof(float) * r);
    lora_init(&L, in, 1, r, 1.0f, 0.0f, A2, B2, 0, &g);
    double s2b = 0;
    for (int i = 0; i < r * in; i++) { ck_assert(fabs(A2[i]) <= bound * (1 + 1e-6)); s2b += (double)A2[i] * A2[i]; }
    ck_assert_msg(fabs(sqrt(s2b / (r * in)) - sd) < 0.05 * bound, "our A std differs from peft's");
    free(A); free(A2); free(B2);
    st_close(&f);
}
END_TEST


/* ------------------------------------------------------------- LoRA files */
#include "json.h"

static char *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "cannot open %s", path);
    fseek(f, 0, SEEK_END); long len = ftell(f); fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)len + 1);
    ck_assert(fread(buf, 1, (size_t)len, f) == (size_t)len);
    fclose(f);
    buf[len] = 0; *n = (size_t)len;
    return buf;
}

/* the name our loader gives a key the Python side wrote with transformers 5
 * and the lora_te1_ prefix */
static void normalise(char *dst, size_t n, const char *src) {
    if (strncmp(src, "lora_te1_", 9) == 0) src += 9;
    else if (strncmp(src, "lora_te_", 8) == 0) src += 8;
    else { snprintf(dst, n, "%s", src); return; }
    snprintf(dst, n, strncmp(src, "encoder_", 8) == 0 ? "lora_te_text_model_%s" : "lora_te_%s", src);
}

/* files written by diffusers (save_lora_weights) and by diffusers' kohya
 * converter load with the right names, shapes, alphas and values */
static void check_against_expected(const char *file) {
    size_t n; char *txt = slurp(FIXTURE_DIR "lorafile_expected.json", &n);
    char jerr[256];
    json *j = json_parse(txt, n, jerr, sizeof jerr);
    ck_assert_msg(j != NULL, "%s", jerr);
    lora_file lf; char err[ST_ERR_LEN];
    ck_assert_msg(lora_file_load(file, &lf, err) == 0, "%s", err);
    ck_assert_int_eq(lf.n, j->n);
    for (int i = 0; i < j->n; i++) {
        const json *e = &j->items[i];
        char name[256];
        normalise(name, sizeof name, json_str(e, "name", ""));
        const lora_entry *en = lora_file_find(&lf, name);
        ck_assert_msg(en != NULL, "%s: adapter %s not found", file, name);
        ck_assert_int_eq(en->r, (int)json_num(e, "r", -1));
        ck_assert_int_eq(en->in, (int)json_num(e, "in", -1));
        ck_assert_int_eq(en->out, (int)json_num(e, "out", -1));
        ck_assert_int_eq(en->conv, (int)json_num(e, "conv", -1));
        ck_assert_float_eq(en->alpha, (float)json_num(e, "alpha", -1));
        ck_assert_float_eq(en->A[0], (float)json_num(e, "down0", NAN));
        ck_assert_float_eq(en->B[0], (float)json_num(e, "up0", NAN));
    }
    lora_file_free(&lf);
    json_free(j); free(txt);
}

START_TEST(test_file_diffusers) { check_against_expected(FIXTURE_DIR "lorafile_diffusers.safetensors"); }
END_TEST
START_TEST(test_file_kohya) { check_against_expected(FIXTURE_DIR "lorafile_kohya.safetensors"); }
END_TEST

/* save in kohya's format and load back: names, shapes, alpha, values */
START_TEST(test_file_roundtrip) {
    rng_t g; rng_seed(&g, 5);
    float A1[3 * 10], B1[6 * 3], A2[2 * 4], B2[5 * 2];
    lora_t L1, L2;
    lora_init(&L1, 10, 6, 3, 1.5f, 0, A1, B1, 0, &g);
    lora_init(&L2, 4, 5, 2, 8.0f, 0, A2, B2, 0, &g);
    fill_uniform(B1, 18, -1, 1, 11); fill_uniform(B2, 10, -1, 1, 12);
    char n1[256], n2[256];
    lora_kohya_name(n1, sizeof n1, "lora_unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q");
    lora_kohya_name(n2, sizeof n2, "lora_unet", "mid_block.attentions.0.proj_in");
    ck_assert_str_eq(n1, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q");
    lora_ref refs[2] = {{n1, &L1, 0}, {n2, &L2, 1}};
    const char *mk[] = {"ss_network_dim"}, *mv[] = {"3"};
    char path[] = "/tmp/sdlora_test_lora_XXXXXX";
    int fd = mkstemp(path); ck_assert(fd >= 0); close(fd);
    char err[ST_ERR_LEN];
    for (int dt = 0; dt < 2; dt++) {
        ck_assert_msg(lora_save_kohya(path, refs, 2, dt ? ST_F16 : ST_F32, mk, mv, 1, err) == 0, "%s", err);
        lora_file lf;
        ck_assert_msg(lora_file_load(path, &lf, err) == 0, "%s", err);
        ck_assert_int_eq(lf.n, 2);
        ck_assert_str_eq(lf.format, "kohya");
        const lora_entry *e1 = lora_file_find(&lf, n1), *e2 = lora_file_find(&lf, n2);
        ck_assert(e1 && e2);
        ck_assert(e1->r == 3 && e1->in == 10 && e1->out == 6 && !e1->conv && e1->alpha == 1.5f);
        ck_assert(e2->r == 2 && e2->in == 4 && e2->out == 5 && e2->conv && e2->alpha == 8.0f);
        double tol = dt ? 1e-3 : 0;   /* fp16 keeps 11 significant bits */
        ck_assert(rel_err(e1->A, A1, 30) <= tol && rel_err(e1->B, B1, 18) <= tol);
        ck_assert(rel_err(e2->A, A2, 8) <= tol && rel_err(e2->B, B2, 10) <= tol);
        lora_file_free(&lf);
        st_file f; ck_assert(st_open(&f, path, err) == 0);
        ck_assert_str_eq(st_meta(&f, "ss_network_dim"), "3");
        st_close(&f);
    }
    unlink(path);
}
END_TEST

/* ------------------------------------------------------- conv LoRA (LoCon)
 * lora_conv_forward / lora_conv_backward: the branch of a k x k conv LoRA,
 *   y += (alpha/r) conv1x1(conv(dropout(x), A, stride, pad), B)          */
typedef struct {
    int Bn, in, out, r, k, H, W, stride, pad, Ho, Wo;
    float *x, *R, *y, *ax, *scratch;
    uint8_t *mask;
    lora_t L;
    uint64_t seed;
} ccase;

static size_t cc_nx(const ccase *c) { return (size_t)c->Bn * c->in * c->H * c->W; }
static size_t cc_ny(const ccase *c) { return (size_t)c->Bn * c->out * c->Ho * c->Wo; }

static void cc_forward(ccase *c) {
    rng_t g; rng_seed(&g, c->seed);    /* the same mask on every call */
    memset(c->y, 0, sizeof(float) * cc_ny(c));
    lora_conv_forward(c->y, c->ax, c->mask, c->scratch, c->x, &c->L, c->Bn, c->H, c->W, c->stride, c->pad, &g);
}
static double cc_loss(void *ctx) {
    ccase *c = ctx;
    cc_forward(c);
    return dot_d(c->y, c->R, cc_ny(c));
}

static void cc_setup(ccase *c, int k, int stride, float p) {
    memset(c, 0, sizeof *c);
    c->Bn = 2; c->in = 4; c->out = 5; c->r = 3; c->k = k; c->H = 5; c->W = 6;
    c->stride = stride; c->pad = k / 2; c->seed = 9;
    c->Ho = (c->H + 2 * c->pad - k) / stride + 1; c->Wo = (c->W + 2 * c->pad - k) / stride + 1;
    size_t fan = (size_t)c->in * k * k;
    float *A = malloc(sizeof(float) * c->r * fan), *B = malloc(sizeof(float) * c->out * c->r);
    rng_t g; rng_seed(&g, 3);
    lora_conv_init(&c->L, c->in, c->out, k, c->r, 6.0f, p, A, B, &g);
    ck_assert_int_eq((int)lora_fan_in(&c->L), (int)fan);
    ck_assert_int_eq((int)lora_num_params(&c->L), (int)(c->r * (fan + c->out)));
    fill_uniform(B, (size_t)c->out * c->r, -1, 1, 21);
    c->L.dA = calloc((size_t)c->r * fan, sizeof(float));
    c->L.dB = calloc((size_t)c->out * c->r, sizeof(float));
    c->x = malloc(sizeof(float) * cc_nx(c)); fill_uniform(c->x, cc_nx(c), -1, 1, 22);
    c->R = malloc(sizeof(float) * cc_ny(c)); fill_uniform(c->R, cc_ny(c), -1, 1, 23);
    c->y = malloc(sizeof(float) * cc_ny(c));
    c->ax = malloc(sizeof(float) * (size_t)c->Bn * c->r * c->Ho * c->Wo);
    c->mask = malloc(cc_nx(c));
    size_t ns = lora_conv_scratch_floats(&c->L, c->Bn, c->H, c->W, stride, c->pad, 1);
    c->scratch = malloc(sizeof(float) * (ns + 1));
}
static void cc_free(ccase *c) {
    free(c->L.A); free(c->L.B); free(c->L.dA); free(c->L.dB);
    free(c->x); free(c->R); free(c->y); free(c->ax); free(c->mask); free(c->scratch);
}

/* finite differences for dx, dA, dB through the conv branch. The branch is
 * linear in each of x, A and B (the mask fixed by the seed), so a central
 * difference has no truncation error at any step: eps = 0.1 keeps float
 * rounding of the loss out of the comparison (at 1e-2 it reaches 1e-3 on
 * entries with small gradients, e.g. a 3x3 conv's border pixels) */
static void conv_gradcheck(int k, int stride, float p) {
    ccase c; cc_setup(&c, k, stride, p);
    float *dx = calloc(cc_nx(&c), sizeof(float));
    cc_forward(&c);
    lora_conv_backward(dx, c.R, c.x, c.ax, c.mask, c.scratch, &c.L, c.Bn, c.H, c.W, c.stride, c.pad);
    double e;
    e = grad_check(c.x, dx, cc_nx(&c), cc_loss, &c, 0.1f, 1e-4, 200);
    ck_assert_msg(e < 1e-3, "dx rel err %g (k=%d stride=%d p=%g)", e, k, stride, p);
    e = grad_check(c.L.A, c.L.dA, lora_fan_in(&c.L) * c.r, cc_loss, &c, 0.1f, 1e-4, 200);
    ck_assert_msg(e < 1e-3, "dA rel err %g (k=%d stride=%d p=%g)", e, k, stride, p);
    e = grad_check(c.L.B, c.L.dB, (size_t)c.out * c.r, cc_loss, &c, 0.1f, 1e-4, 200);
    ck_assert_msg(e < 1e-3, "dB rel err %g (k=%d stride=%d p=%g)", e, k, stride, p);
    free(dx);
    cc_free(&c);
}

START_TEST(test_gradcheck_conv3x3) { conv_gradcheck(3, 1, 0.0f); }
END_TEST
START_TEST(test_gradcheck_conv3x3_stride2) { conv_gradcheck(3, 2, 0.0f); }
END_TEST
START_TEST(test_gradcheck_conv3x3_dropout) { conv_gradcheck(3, 1, 0.3f); }
END_TEST
/* k = 1: conv_shortcut's adapter; on 1x1 pixels, time_emb_proj's (a linear) */
START_TEST(test_gradcheck_conv1x1_branch) { conv_gradcheck(1, 1, 0.2f); }
END_TEST

/* a linear is a 1x1 conv on 1x1 pixels: lora_conv_* with H = W = 1 is the
 * linear LoRA's branch (lora_forward minus W0 x + b), to rounding */
START_TEST(test_conv_branch_is_linear) {
    int N = 3, in = 7, out = 4, r = 2;
    float A[2 * 7], B[4 * 2], x[3 * 7], w0[4 * 7] = {0}, y1[3 * 4], y2[3 * 4] = {0}, ax[3 * 2];
    lora_t L; rng_t g; rng_seed(&g, 2);
    lora_init(&L, in, out, r, 3.0f, 0.0f, A, B, 0, &g);
    fill_uniform(B, 8, -1, 1, 4); fill_uniform(x, 21, -1, 1, 5);
    lora_forward(y1, ax, NULL, NULL, x, w0, NULL, &L, N, in, out, NULL);
    lora_conv_forward(y2, ax, NULL, NULL, x, &L, N, 1, 1, 1, 0, NULL);
    ck_assert_msg(rel_err(y2, y1, 12) < 1e-6, "rel %g", rel_err(y2, y1, 12));
}
END_TEST

/* peft's LoRA Conv2d on a 3x3 conv (tools/make_locon_fixtures.py): output and
 * autograd gradients, stride 1 and 2 */
static void locon_case(const char *pre) {
    st_file f; fx_open(&f, "locon.safetensors");
    char k[64];
#define G(name) (snprintf(k, sizeof k, "%s.%s", pre, name), st_find(&f, k))
#define L(name) (snprintf(k, sizeof k, "%s.%s", pre, name), fx_get(&f, k, 0))
    const st_tensor *tA = G("A"), *tB = G("B"), *tX = G("x");
    ck_assert_msg(tA && tB && tX, "%s: fixture tensors missing", pre);
    int r = (int)tA->shape[0], in = (int)tA->shape[1], kk = (int)tA->shape[2], out = (int)tB->shape[0];
    int Bn = (int)tX->shape[0], H = (int)tX->shape[2], W = (int)tX->shape[3];
    ck_assert_int_eq(kk, 3);
    ck_assert(tB->ndim == 4 && tB->shape[2] == 1 && tB->shape[3] == 1);
    int stride = (int)fx_scalar(&f, (snprintf(k, sizeof k, "%s.stride", pre), k)), pad = 1;
    float alpha = fx_scalar(&f, (snprintf(k, sizeof k, "%s.alpha", pre), k));
    int Ho = (H + 2 * pad - 3) / stride + 1, Wo = (W + 2 * pad - 3) / stride + 1;
    float *x = L("x"), *w0 = L("w0"), *b0 = L("b0"), *A = L("A"), *B = L("B"), *dout = L("dout");
    float *yref = L("out"), *dxref = L("dx"), *dAref = L("dA"), *dBref = L("dB");
    lora_t Lr = { .in = in, .out = out, .r = r, .k = 3, .alpha = alpha, .scale = alpha / (float)r, .A = A, .B = B };
    size_t nA = (size_t)r * in * 9, nB = (size_t)out * r;
    Lr.dA = calloc(nA, sizeof(float)); Lr.dB = calloc(nB, sizeof(float));
    size_t nx = (size_t)Bn * in * H * W, ny = (size_t)Bn * out * Ho * Wo;
    float *y = malloc(sizeof(float) * ny), *ax = malloc(sizeof(float) * (size_t)Bn * r * Ho * Wo);
    float *dx = calloc(nx, sizeof(float));
    float *scratch = malloc(sizeof(float) * (lora_conv_scratch_floats(&Lr, Bn, H, W, stride, pad, 1) + 1));
    /* the frozen conv, then the branch (as the UNet runs them) */
    conv2d_forward(y, x, w0, b0, Bn, in, H, W, out, 3, 3, stride, pad);
    lora_conv_forward(y, ax, NULL, NULL, x, &Lr, Bn, H, W, stride, pad, NULL);
    conv2d_backward(dx, NULL, NULL, dout, x, w0, Bn, in, H, W, out, 3, 3, stride, pad);
    lora_conv_backward(dx, dout, x, ax, NULL, scratch, &Lr, Bn, H, W, stride, pad);
    double ey = rel_err(y, yref, ny), ex = rel_err(dx, dxref, nx);
    double ea = rel_err(Lr.dA, dAref, nA), eb = rel_err(Lr.dB, dBref, nB);
    ck_assert_msg(ey <= 1e-5, "%s out rel err %g", pre, ey);
    ck_assert_msg(ex <= 1e-4, "%s dx rel err %g", pre, ex);
    ck_assert_msg(ea <= 1e-4, "%s dA rel err %g", pre, ea);
    ck_assert_msg(eb <= 1e-4, "%s dB rel err %g", pre, eb);
    printf("peft LoCon %-3s out %.2e  dx %.2e  dA %.2e  dB %.2e\n", pre, ey, ex, ea, eb);
    /* merged: conv with W0 + s B A (lora_merge over in*9 columns) is the same output */
    float *wm = malloc(sizeof(float) * (size_t)out * in * 9), *ym = malloc(sizeof(float) * ny);
    memcpy(wm, w0, sizeof(float) * (size_t)out * in * 9);
    lora_merge(wm, &Lr, 1.0f);
    conv2d_forward(ym, x, wm, b0, Bn, in, H, W, out, 3, 3, stride, pad);
    ck_assert_msg(rel_err(ym, yref, ny) <= 1e-5, "%s merged rel err %g", pre, rel_err(ym, yref, ny));
    free(wm); free(ym);
    free(x); free(w0); free(b0); free(A); free(B); free(dout); free(yref); free(dxref); free(dAref); free(dBref);
    free(Lr.dA); free(Lr.dB); free(y); free(ax); free(dx); free(scratch);
    st_close(&f);
#undef G
#undef L
}
START_TEST(test_peft_locon_s1) { locon_case("s1"); }
END_TEST
START_TEST(test_peft_locon_s2) { locon_case("s2"); }
END_TEST

/* a 3x3 conv LoRA saves as kohya's LoCon: lora_down (r, in, 3, 3),
 * lora_up (out, r, 1, 1), and loads back with k = 3 */
START_TEST(test_file_locon_roundtrip) {
    rng_t g; rng_seed(&g, 8);
    float A[2 * 4 * 9], B[5 * 2];
    lora_t L;
    lora_conv_init(&L, 4, 5, 3, 2, 1.0f, 0, A, B, &g);
    fill_uniform(B, 10, -1, 1, 3);
    const char *name = "lora_unet_down_blocks_0_resnets_0_conv1";
    lora_ref ref = {name, &L, 1};
    char path[] = "/tmp/sdlora_test_locon_XXXXXX";
    int fd = mkstemp(path); ck_assert(fd >= 0); close(fd);
    char err[ST_ERR_LEN];
    ck_assert_msg(lora_save_kohya(path, &ref, 1, ST_F32, NULL, NULL, 0, err) == 0, "%s", err);
    st_file f; ck_assert(st_open(&f, path, err) == 0);
    const st_tensor *d = st_find(&f, "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight");
    const st_tensor *u = st_find(&f, "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight");
    ck_assert(d && u && d->ndim == 4 && u->ndim == 4);
    ck_assert(d->shape[0] == 2 && d->shape[1] == 4 && d->shape[2] == 3 && d->shape[3] == 3);
    ck_assert(u->shape[0] == 5 && u->shape[1] == 2 && u->shape[2] == 1 && u->shape[3] == 1);
    st_close(&f);
    lora_file lf;
    ck_assert_msg(lora_file_load(path, &lf, err) == 0, "%s", err);
    ck_assert_int_eq(lf.n, 1);
    const lora_entry *e = &lf.e[0];
    ck_assert(e->conv && e->k == 3 && e->r == 2 && e->in == 4 && e->out == 5 && e->alpha == 1.0f);
    ck_assert(rel_err(e->A, A, 72) == 0 && rel_err(e->B, B, 10) == 0);
    lora_file_free(&lf);
    unlink(path);
}
END_TEST

/* broken LoRA files: one-line errors that name the problem, never a crash */
static void write_bad(const char *path, const char **names, int n, const int64_t shapes[][2], const int *nd) {
    st_writer *w = st_writer_new();
    float buf[64] = {0};
    for (int i = 0; i < n; i++) ck_assert(st_writer_add_f32(w, names[i], ST_F32, nd[i], shapes[i], buf) == 0);
    char err[ST_ERR_LEN];
    ck_assert_msg(st_writer_save(w, path, err) == 0, "%s", err);
    st_writer_free(w);
}

START_TEST(test_file_bad) {
    char path[] = "/tmp/sdlora_test_badlora_XXXXXX";
    int fd = mkstemp(path); ck_assert(fd >= 0); close(fd);
    char err[ST_ERR_LEN]; lora_file lf;
    static const int64_t sh[][2] = {{2, 4}, {5, 2}, {0, 0}, {3, 4}};
    /* no up weight */
    const char *a[] = {"lora_unet_x_to_q.lora_down.weight"};
    write_bad(path, a, 1, sh, (int[]){2});
    ck_assert(lora_file_load(path, &lf, err) != 0);
    ck_assert_msg(strstr(err, "lora_unet_x_to_q") && strstr(err, "up"), "%s", err);
    /* an unknown key (LoHa) */
    const char *b[] = {"lora_unet_x_to_q.hada_w1_a"};
    write_bad(path, b, 1, sh, (int[]){2});
    ck_assert(lora_file_load(path, &lf, err) != 0);
    ck_assert_msg(strstr(err, "hada_w1_a"), "%s", err);
    /* shapes that do not chain: down (2, 4), up (3, 4) */
    const char *c2[] = {"lora_unet_x_to_q.lora_down.weight", "lora_unet_x_to_q.lora_up.weight"};
    int64_t sh2[][2] = {{2, 4}, {3, 4}};
    write_bad(path, c2, 2, sh2, (int[]){2, 2});
    ck_assert(lora_file_load(path, &lf, err) != 0);
    ck_assert_msg(strstr(err, "shapes"), "%s", err);
    /* alpha that is not one number */
    const char *d[] = {"lora_unet_x_to_q.lora_down.weight", "lora_unet_x_to_q.lora_up.weight", "lora_unet_x_to_q.alpha"};
    int64_t sh3[][2] = {{2, 4}, {5, 2}, {2, 1}};
    write_bad(path, d, 3, sh3, (int[]){2, 2, 2});
    ck_assert(lora_file_load(path, &lf, err) != 0);
    ck_assert_msg(strstr(err, "alpha"), "%s", err);
    /* not a safetensors file at all, and every truncation of a good one */
    FILE *f = fopen(path, "wb"); fputs("hello", f); fclose(f);
    ck_assert(lora_file_load(path, &lf, err) != 0);
    size_t n; char *good = slurp(FIXTURE_DIR "lorafile_kohya.safetensors", &n);
    for (size_t cut = 0; cut < n; cut += (cut < 2048 ? 1 : 97)) {
        f = fopen(path, "wb"); fwrite(good, 1, cut, f); fclose(f);
        ck_assert_msg(lora_file_load(path, &lf, err) != 0, "truncated at %zu loaded", cut);
        ck_assert(strstr(err, path) != NULL);
    }
    free(good);
    unlink(path);
}
END_TEST

/* a kohya file with one adapter (down 2x4, up 5x2) whose alpha has dtype dt,
 * ndim dims of shape sh, and the raw little-endian bytes ab */
static void write_alpha(const char *path, st_dtype dt, int ndim, const int64_t *sh, const void *ab) {
    st_writer *w = st_writer_new();
    float buf[16] = {0};
    static const int64_t sd[2] = {2, 4}, su[2] = {5, 2};
    ck_assert(st_writer_add_f32(w, "lora_unet_x_to_q.lora_down.weight", ST_F32, 2, sd, buf) == 0);
    ck_assert(st_writer_add_f32(w, "lora_unet_x_to_q.lora_up.weight", ST_F32, 2, su, buf) == 0);
    ck_assert(st_writer_add(w, "lora_unet_x_to_q.alpha", dt, ndim, sh, ab) == 0);
    char err[ST_ERR_LEN];
    ck_assert_msg(st_writer_save(w, path, err) == 0, "%s", err);
    st_writer_free(w);
}

/* integer alphas are numbers too: diffusers' convert_state_dict_to_kohya
 * writes a 0-d int64 tensor; any float or integer scalar is accepted, and
 * a refusal names the dtype and shape it found */
START_TEST(test_file_alpha_dtypes) {
    char path[] = "/tmp/sdlora_test_alpha_XXXXXX";
    int fd = mkstemp(path); ck_assert(fd >= 0); close(fd);
    char err[ST_ERR_LEN]; lora_file lf;
    static const int64_t one[1] = {1}, one2[2] = {1, 1}, two[1] = {2};
    /* little-endian bytes of 8, -3, 200 in each width */
    const uint8_t i64_8[8] = {8, 0, 0, 0, 0, 0, 0, 0}, i64_m3[8] = {0xFD, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF};
    const uint8_t i32_16[4] = {16, 0, 0, 0}, i16_m3[2] = {0xFD, 0xFF}, i8_m3[1] = {0xFD}, u8_200[1] = {200};
    const uint8_t i64_big[8] = {0, 0, 0, 0, 0, 0, 0, 0x40};     /* 2^62: finite as float */
    struct { st_dtype dt; int ndim; const int64_t *sh; const void *b; float want; } ok[] = {
        {ST_I64, 0, NULL, i64_8, 8.0f}, {ST_I64, 1, one, i64_m3, -3.0f}, {ST_I32, 2, one2, i32_16, 16.0f},
        {ST_I16, 0, NULL, i16_m3, -3.0f}, {ST_I8, 1, one, i8_m3, -3.0f}, {ST_U8, 0, NULL, u8_200, 200.0f},
        {ST_I64, 0, NULL, i64_big, 4611686018427387904.0f},
    };
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        write_alpha(path, ok[i].dt, ok[i].ndim, ok[i].sh, ok[i].b);
        ck_assert_msg(lora_file_load(path, &lf, err) == 0, "%s alpha: %s", st_dtype_name(ok[i].dt), err);
        ck_assert_int_eq(lf.n, 1);
        ck_assert_msg(lf.e[0].alpha == ok[i].want, "%s alpha %g, want %g", st_dtype_name(ok[i].dt),
                      lf.e[0].alpha, ok[i].want);
        lora_file_free(&lf);
    }
    /* float scalars as before, in every float dtype: 0-d F64 and [1] F16 */
    const double d6 = 6.0;
    write_alpha(path, ST_F64, 0, NULL, &d6);
    ck_assert_msg(lora_file_load(path, &lf, err) == 0, "%s", err);
    ck_assert(lf.e[0].alpha == 6.0f);
    lora_file_free(&lf);
    const uint8_t h4[2] = {0x00, 0x44};                      /* fp16 4.0 */
    write_alpha(path, ST_F16, 1, one, h4);
    ck_assert_msg(lora_file_load(path, &lf, err) == 0, "%s", err);
    ck_assert(lf.e[0].alpha == 4.0f);
    lora_file_free(&lf);
    /* refused, naming the dtype and the shape: BOOL, two numbers, none */
    const uint8_t t1[1] = {1}, i64x2[16] = {8, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0};
    write_alpha(path, ST_BOOL, 0, NULL, t1);
    ck_assert(lora_file_load(path, &lf, err) != 0);
    ck_assert_msg(strstr(err, "should be one number") && strstr(err, "BOOL with shape []"), "%s", err);
    write_alpha(path, ST_I64, 1, two, i64x2);
    ck_assert(lora_file_load(path, &lf, err) != 0);
    ck_assert_msg(strstr(err, "I64 with shape [2]") && strstr(err, "lora_unet_x_to_q.alpha"), "%s", err);
    static const int64_t zero[1] = {0};
    write_alpha(path, ST_F32, 1, zero, NULL);
    ck_assert(lora_file_load(path, &lf, err) != 0);
    ck_assert_msg(strstr(err, "F32 with shape [0]") && strchr(err, '\n') == NULL, "%s", err);
    /* a name with a newline (a JSON escape) is named on one line */
    {
        st_writer *w = st_writer_new();
        float buf[16] = {0};
        static const int64_t sd[2] = {2, 4}, su[2] = {5, 2};
        ck_assert(st_writer_add_f32(w, "lora_unet_x\ny.lora_down.weight", ST_F32, 2, sd, buf) == 0);
        ck_assert(st_writer_add_f32(w, "lora_unet_x\ny.lora_up.weight", ST_F32, 2, su, buf) == 0);
        ck_assert(st_writer_add(w, "lora_unet_x\ny.alpha", ST_BOOL, 0, NULL, t1) == 0);
        ck_assert_msg(st_writer_save(w, path, err) == 0, "%s", err);
        st_writer_free(w);
        ck_assert(lora_file_load(path, &lf, err) != 0);
        ck_assert_msg(strstr(err, "'lora_unet_x?y.alpha'") && strchr(err, '\n') == NULL, "%s", err);
    }
    unlink(path);
}
END_TEST

static Suite *lora_suite(void) {
    Suite *s = suite_create("lora");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_gradcheck_linear);
    tcase_add_test(tc, test_gradcheck_linear_dropout);
    tcase_add_test(tc, test_gradcheck_conv1x1);
    tcase_add_test(tc, test_gradcheck_conv1x1_dropout);
    tcase_add_test(tc, test_zero_B_is_base);
    tcase_add_test(tc, test_merge_unmerge);
    tcase_add_test(tc, test_num_params_and_init);
    tcase_add_test(tc, test_backward_accumulates);
    tcase_add_test(tc, test_gradcheck_conv3x3);
    tcase_add_test(tc, test_gradcheck_conv3x3_stride2);
    tcase_add_test(tc, test_gradcheck_conv3x3_dropout);
    tcase_add_test(tc, test_gradcheck_conv1x1_branch);
    tcase_add_test(tc, test_conv_branch_is_linear);
    suite_add_tcase(s, tc);
    TCase *tp = tcase_create("peft");
    tcase_add_test(tp, test_peft_scale);
    tcase_add_test(tp, test_peft_linear);
    tcase_add_test(tp, test_peft_rslora);
    tcase_add_test(tp, test_peft_conv1x1);
    tcase_add_test(tp, test_peft_init_bound);
    tcase_add_test(tp, test_peft_locon_s1);
    tcase_add_test(tp, test_peft_locon_s2);
    suite_add_tcase(s, tp);
    TCase *tf = tcase_create("files");
    tcase_add_test(tf, test_file_diffusers);
    tcase_add_test(tf, test_file_kohya);
    tcase_add_test(tf, test_file_roundtrip);
    tcase_add_test(tf, test_file_bad);
    tcase_add_test(tf, test_file_alpha_dtypes);
    tcase_add_test(tf, test_file_locon_roundtrip);
    suite_add_tcase(s, tf);
    return s;
}

CHECK_MAIN(lora_suite)

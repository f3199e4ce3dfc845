/* test_nn.c: the primitives of nn.c.
 *  - forward of each layer against a plain reference loop written here
 *    (in double), so a wrong forward cannot hide behind a matching backward
 *  - a central finite-difference check of every gradient every backward
 *    produces, with L = sum(out * R) for a fixed random R (so dout = R)
 *  - backward accumulates, NULL gradients skip work, thread count does not
 *    change results, timestep embedding matches its formula, RNG and dropout
 *    behave as documented */
#include "testutil.h"
#ifdef _OPENMP
#include <omp.h>
#endif

/* ---------------------------------------------------------------------------
 * one description of a layer under test, used by all the generic checks */

enum { OP_LINEAR, OP_CONV, OP_GN, OP_LN, OP_SILU, OP_GELU, OP_QGELU, OP_GEGLU,
       OP_UPSAMPLE, OP_DROPOUT };

typedef struct {
    int op;
    /* dims (those the op uses) */
    int B, C, H, W, O, kh, kw, stride, pad;   /* conv; linear uses N=B, in=C, out=O */
    int G;                                    /* group norm groups */
    float p;                                  /* dropout */
    int affine;                               /* norms: w, b present */
    /* tensors */
    size_t nin, nw, nb, nout;
    float *inp, *w, *b, *out, *R;
    float *mean, *rstd;
    uint8_t *mask;
} layer;

static void *xcalloc(size_t n, size_t sz) {
    void *p = calloc(n ? n : 1, sz);
    ck_assert_ptr_nonnull(p);
    return p;
}

static int conv_ho(const layer *L) { return (L->H + 2 * L->pad - L->kh) / L->stride + 1; }
static int conv_wo(const layer *L) { return (L->W + 2 * L->pad - L->kw) / L->stride + 1; }

/* sizes from the op and dims; random inputs, weights and R */
static void layer_alloc(layer *L, uint64_t seed) {
    size_t HW = (size_t)L->H * L->W;
    switch (L->op) {
    case OP_LINEAR:
        L->nin = (size_t)L->B * L->C; L->nw = (size_t)L->O * L->C; L->nb = L->O;
        L->nout = (size_t)L->B * L->O; break;
    case OP_CONV:
        L->nin = (size_t)L->B * L->C * HW; L->nw = (size_t)L->O * L->C * L->kh * L->kw;
        L->nb = L->O; L->nout = (size_t)L->B * L->O * conv_ho(L) * conv_wo(L); break;
    case OP_GN:
        L->nin = L->nout = (size_t)L->B * L->C * HW;
        L->nw = L->nb = L->affine ? (size_t)L->C : 0; break;
    case OP_LN:
        L->nin = L->nout = (size_t)L->B * L->C;
        L->nw = L->nb = L->affine ? (size_t)L->C : 0; break;
    case OP_GEGLU:
        L->nin = (size_t)L->B * 2 * L->C; L->nout = (size_t)L->B * L->C; break;
    case OP_UPSAMPLE:
        L->nin = (size_t)L->B * L->C * HW; L->nout = 4 * L->nin; break;
    default: /* pointwise: B*C values */
        L->nin = L->nout = (size_t)L->B * L->C; break;
    }
    L->inp = xcalloc(L->nin, sizeof(float));
    L->w = L->nw ? xcalloc(L->nw, sizeof(float)) : NULL;
    L->b = L->nb ? xcalloc(L->nb, sizeof(float)) : NULL;
    L->out = xcalloc(L->nout, sizeof(float));
    L->R = xcalloc(L->nout, sizeof(float));
    L->mean = xcalloc((size_t)L->B * (L->op == OP_GN ? L->G : 1) + (size_t)L->B * L->C, sizeof(float));
    L->rstd = xcalloc((size_t)L->B * (L->op == OP_GN ? L->G : 1) + (size_t)L->B * L->C, sizeof(float));
    L->mask = xcalloc(L->nin, 1);
    fill_uniform(L->inp, L->nin, -2.0f, 2.0f, seed);
    if (L->w) fill_uniform(L->w, L->nw, -1.0f, 1.0f, seed + 1);
    if (L->b) fill_uniform(L->b, L->nb, -1.0f, 1.0f, seed + 2);
    fill_uniform(L->R, L->nout, -1.0f, 1.0f, seed + 3);
}

static void layer_free(layer *L) {
    free(L->inp); free(L->w); free(L->b); free(L->out); free(L->R);
    free(L->mean); free(L->rstd); free(L->mask);
}

static const uint64_t DROPOUT_SEED = 1234;

static void layer_forward(layer *L) {
    switch (L->op) {
    case OP_LINEAR: linear_forward(L->out, L->inp, L->w, L->b, L->B, L->C, L->O); break;
    case OP_CONV:
        conv2d_forward(L->out, L->inp, L->w, L->b, L->B, L->C, L->H, L->W, L->O,
                       L->kh, L->kw, L->stride, L->pad); break;
    case OP_GN:
        groupnorm_forward(L->out, L->mean, L->rstd, L->inp, L->w, L->b,
                          L->B, L->C, L->H * L->W, L->G, 1e-5f); break;
    case OP_LN:
        layernorm_forward(L->out, L->mean, L->rstd, L->inp, L->w, L->b, L->B, L->C, 1e-5f); break;
    case OP_SILU: silu_forward(L->out, L->inp, L->nin); break;
    case OP_GELU: gelu_forward(L->out, L->inp, L->nin); break;
    case OP_QGELU: quickgelu_forward(L->out, L->inp, L->nin); break;
    case OP_GEGLU: geglu_forward(L->out, L->inp, L->B, L->C); break;
    case OP_UPSAMPLE: upsample2x_forward(L->out, L->inp, L->B, L->C, L->H, L->W); break;
    case OP_DROPOUT: { /* reseeded every time: the mask stays fixed */
        rng_t r; rng_seed(&r, DROPOUT_SEED);
        dropout_forward(L->out, L->mask, L->inp, L->nin, L->p, &r); break;
    }
    }
}

/* needs a forward just before (norm statistics, dropout mask) */
static void layer_backward(layer *L, float *dinp, float *dw, float *db) {
    switch (L->op) {
    case OP_LINEAR: linear_backward(dinp, dw, db, L->R, L->inp, L->w, L->B, L->C, L->O); break;
    case OP_CONV:
        conv2d_backward(dinp, dw, db, L->R, L->inp, L->w, L->B, L->C, L->H, L->W, L->O,
                        L->kh, L->kw, L->stride, L->pad); break;
    case OP_GN:
        groupnorm_backward(dinp, dw, db, L->R, L->inp, L->w, L->mean, L->rstd,
                           L->B, L->C, L->H * L->W, L->G); break;
    case OP_LN:
        layernorm_backward(dinp, dw, db, L->R, L->inp, L->w, L->mean, L->rstd, L->B, L->C); break;
    case OP_SILU: silu_backward(dinp, L->R, L->inp, L->nin); break;
    case OP_GELU: gelu_backward(dinp, L->R, L->inp, L->nin); break;
    case OP_QGELU: quickgelu_backward(dinp, L->R, L->inp, L->nin); break;
    case OP_GEGLU: geglu_backward(dinp, L->R, L->inp, L->B, L->C); break;
    case OP_UPSAMPLE: upsample2x_backward(dinp, L->R, L->B, L->C, L->H, L->W); break;
    case OP_DROPOUT: dropout_backward(dinp, L->R, L->mask, L->nin, L->p); break;
    }
}

static double layer_loss(void *ctx) {
    layer *L = ctx;
    layer_forward(L);
    return dot_d(L->out, L->R, L->nout);
}

/* ---------------------------------------------------------------------------
 * the gradient check: analytic dinp, dw, db from one backward, each compared
 * with central differences. Returns the worst error over all three. */

/* Finite-difference steps. The loss is computed from a float32 forward, so
 * its rounding noise (~1e-7 relative) is divided by 2*eps: the step should
 * be as large as the truncation error O(eps^2 f''') allows. Maps that are
 * linear in the perturbed tensor (linear, conv, upsample, dropout: linear in
 * each of inp, w, b separately) have no truncation error at all. */
#define LIN_EPS 0.25f
#define NORM_EPS 3e-2f
#define ACT_EPS 1e-2f

/* grad_check's error is |a - n| / (|a| + |n| + atol): relative for large
 * entries, and for entries near zero relative to 1% of the gradient's
 * largest entry (the float noise in n is absolute, about 1e-7 |L| / eps) */
static double atol_for(const float *g, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) m = fmax(m, fabs(g[i]));
    return 1e-2 * m + 1e-12;
}

static double check_grads(layer *L, float eps, double bound, const char *what) {
    float *dinp = xcalloc(L->nin, sizeof(float));
    float *dw = L->nw ? xcalloc(L->nw, sizeof(float)) : NULL;
    float *db = L->nb ? xcalloc(L->nb, sizeof(float)) : NULL;
    layer_forward(L);
    layer_backward(L, dinp, dw, db);
    double ei = grad_check(L->inp, dinp, L->nin, layer_loss, L, eps, atol_for(dinp, L->nin), 200);
    double ew = dw ? grad_check(L->w, dw, L->nw, layer_loss, L, eps, atol_for(dw, L->nw), 200) : 0;
    double eb = db ? grad_check(L->b, db, L->nb, layer_loss, L, eps, atol_for(db, L->nb), 200) : 0;
    printf("  grad %-34s dinp %.2e  dw %.2e  db %.2e\n", what, ei, ew, eb);
    ck_assert_msg(ei < bound, "%s: dinp worst %g >= %g", what, ei, bound);
    ck_assert_msg(ew < bound, "%s: dw worst %g >= %g", what, ew, bound);
    ck_assert_msg(eb < bound, "%s: db worst %g >= %g", what, eb, bound);
    free(dinp); free(dw); free(db);
    return fmax(ei, fmax(ew, eb));
}

/* (a) backward accumulates: starting from g0, one call gives g0 + g, two
 * calls give g0 + 2g; (b) each gradient pointer may be NULL on its own and
 * the others come out the same as with all three present. */
static void check_accumulate_and_null(layer *L, const char *what) {
    size_t n[3] = {L->nin, L->nw, L->nb};
    float *g[3], *g0[3], *two[3], *part[3];
    for (int k = 0; k < 3; k++) {
        g[k] = xcalloc(n[k], sizeof(float));
        g0[k] = xcalloc(n[k], sizeof(float));
        two[k] = xcalloc(n[k], sizeof(float));
        part[k] = xcalloc(n[k], sizeof(float));
        fill_uniform(g0[k], n[k], -1.0f, 1.0f, 77 + k);
    }
#define PTR(arr, k) (n[k] ? (arr)[k] : NULL)
    layer_forward(L);
    layer_backward(L, PTR(g, 0), PTR(g, 1), PTR(g, 2));          /* g from zero */
    for (int k = 0; k < 3; k++) memcpy(two[k], g0[k], n[k] * sizeof(float));
    layer_backward(L, PTR(two, 0), PTR(two, 1), PTR(two, 2));
    layer_backward(L, PTR(two, 0), PTR(two, 1), PTR(two, 2));    /* g0 + 2g */
    for (int k = 0; k < 3; k++) {
        double worst = 0, scale = 0;
        for (size_t i = 0; i < n[k]; i++) {
            double want = (double)g0[k][i] + 2.0 * g[k][i];
            worst = fmax(worst, fabs(two[k][i] - want));
            scale = fmax(scale, fabs(g[k][i]));
        }
        ck_assert_msg(n[k] == 0 || scale > 0, "%s: gradient %d is all zero", what, k);
        ck_assert_msg(worst <= 1e-5 * (scale + 1.0), "%s: gradient %d does not accumulate (%g)", what, k, worst);
    }
    /* every NULL pattern but all-NULL: the present gradients equal g */
    for (int pat = 1; pat < 8; pat++) {
        float *ptr[3];
        for (int k = 0; k < 3; k++) {
            memset(part[k], 0, n[k] * sizeof(float));
            ptr[k] = (pat >> k & 1) && n[k] ? part[k] : NULL;
        }
        layer_backward(L, ptr[0], ptr[1], ptr[2]);
        for (int k = 0; k < 3; k++)
            if (ptr[k]) ck_assert_msg(rel_err(part[k], g[k], n[k]) <= 1e-6,
                                      "%s: gradient %d differs with NULL pattern %d", what, k, pat);
    }
    layer_backward(L, NULL, NULL, NULL);   /* must simply do nothing */
#undef PTR
    for (int k = 0; k < 3; k++) { free(g[k]); free(g0[k]); free(two[k]); free(part[k]); }
}

static void full_check(layer *L, uint64_t seed, float eps, double bound, const char *what) {
    layer_alloc(L, seed);
    check_grads(L, eps, bound, what);
    check_accumulate_and_null(L, what);
    layer_free(L);
}

/* ---------------------------------------------------------------------------
 * forward references (double) */

static double ref_gelu(double x) { return 0.5 * x * (1.0 + erf(x / sqrt(2.0))); }

START_TEST(test_linear) {
    layer L = {.op = OP_LINEAR, .B = 5, .C = 7, .O = 6};
    layer_alloc(&L, 10);
    layer_forward(&L);
    double worst = 0;
    for (int n = 0; n < L.B; n++)
        for (int o = 0; o < L.O; o++) {
            double s = L.b[o];
            for (int i = 0; i < L.C; i++) s += (double)L.inp[n * L.C + i] * L.w[o * L.C + i];
            worst = fmax(worst, fabs(L.out[n * L.O + o] - s));
        }
    ck_assert_msg(worst < 1e-5, "linear forward off by %g", worst);
    linear_forward(L.out, L.inp, L.w, NULL, L.B, L.C, L.O);  /* no bias */
    ck_assert(fabs(L.out[0] - dot_d(L.inp, L.w, L.C)) < 1e-5);
    layer_free(&L);
    layer L2 = {.op = OP_LINEAR, .B = 5, .C = 7, .O = 6};
    full_check(&L2, 11, LIN_EPS, 1e-3, "linear 5x7 -> 6");
    layer L3 = {.op = OP_LINEAR, .B = 3, .C = 70, .O = 130};  /* > 64 columns: two db blocks */
    full_check(&L3, 12, LIN_EPS, 1e-3, "linear 3x70 -> 130");
}
END_TEST

/* direct convolution, the definition */
static void ref_conv(double *out, const layer *L) {
    int Ho = conv_ho(L), Wo = conv_wo(L);
    for (int b = 0; b < L->B; b++)
        for (int o = 0; o < L->O; o++)
            for (int oy = 0; oy < Ho; oy++)
                for (int ox = 0; ox < Wo; ox++) {
                    double s = L->b ? L->b[o] : 0;
                    for (int c = 0; c < L->C; c++)
                        for (int i = 0; i < L->kh; i++)
                            for (int j = 0; j < L->kw; j++) {
                                int y = oy * L->stride - L->pad + i, x = ox * L->stride - L->pad + j;
                                if (y < 0 || y >= L->H || x < 0 || x >= L->W) continue;
                                s += (double)L->inp[((b * L->C + c) * L->H + y) * L->W + x] *
                                     L->w[((o * L->C + c) * L->kh + i) * L->kw + j];
                            }
                    out[((b * L->O + o) * Ho + oy) * Wo + ox] = s;
                }
}

static void conv_case(int B, int C, int H, int W, int O, int kh, int kw, int stride, int pad,
                      uint64_t seed, const char *what) {
    layer L = {.op = OP_CONV, .B = B, .C = C, .H = H, .W = W, .O = O,
               .kh = kh, .kw = kw, .stride = stride, .pad = pad};
    layer_alloc(&L, seed);
    layer_forward(&L);
    double *ref = xcalloc(L.nout, sizeof(double));
    ref_conv(ref, &L);
    double worst = 0;
    for (size_t i = 0; i < L.nout; i++) worst = fmax(worst, fabs(L.out[i] - ref[i]));
    ck_assert_msg(worst < 1e-4, "%s: forward off by %g", what, worst);
    free(ref);
    check_grads(&L, LIN_EPS, 1e-3, what);
    check_accumulate_and_null(&L, what);
    layer_free(&L);
}

START_TEST(test_conv2d) {
    conv_case(2, 3, 6, 5, 4, 3, 3, 1, 1, 20, "conv 3x3 s1 p1");
    conv_case(2, 3, 7, 8, 4, 3, 3, 2, 1, 21, "conv 3x3 s2 p1 (downsample)");
    conv_case(2, 5, 4, 3, 6, 1, 1, 1, 0, 22, "conv 1x1 (no im2col)");
    conv_case(2, 3, 5, 6, 2, 2, 3, 2, 1, 23, "conv 2x3 s2 p1 (non-square)");
    conv_case(2, 2, 5, 4, 3, 3, 1, 1, 0, 24, "conv 3x1 s1 p0");
    conv_case(2, 3, 5, 5, 2, 1, 1, 2, 0, 25, "conv 1x1 s2 (im2col)");
    conv_case(1, 2, 4, 4, 3, 3, 3, 1, 2, 26, "conv 3x3 p2 (wide pad)");
    conv_case(2, 3, 5, 6, 2, 3, 3, 1, 0, 28, "conv 3x3 s1 p0");
    conv_case(2, 2, 3, 1, 2, 3, 3, 2, 1, 27, "conv 3x3 s2 p1, 1 column wide (a tap with no column)");
}
END_TEST

START_TEST(test_groupnorm) {
    for (int affine = 1; affine >= 0; affine--) {
        layer L = {.op = OP_GN, .B = 2, .C = 6, .H = 3, .W = 4, .G = 3, .affine = affine};
        layer_alloc(&L, 30 + affine);
        layer_forward(&L);
        int HW = L.H * L.W, Cg = L.C / L.G;
        double worst = 0, worst_stat = 0;
        for (int b = 0; b < L.B; b++)
            for (int g = 0; g < L.G; g++) {
                const float *x = L.inp + ((size_t)b * L.C + g * Cg) * HW;
                int n = Cg * HW;
                double m = 0, v = 0;
                for (int i = 0; i < n; i++) m += x[i];
                m /= n;
                for (int i = 0; i < n; i++) v += (x[i] - m) * (x[i] - m);
                v /= n;
                double rs = 1.0 / sqrt(v + 1e-5);
                worst_stat = fmax(worst_stat, fabs(L.mean[b * L.G + g] - m) / fabs(m));
                worst_stat = fmax(worst_stat, fabs(L.rstd[b * L.G + g] - rs) / rs);
                for (int i = 0; i < n; i++) {
                    int c = g * Cg + i / HW;
                    double y = (x[i] - m) * rs * (affine ? L.w[c] : 1) + (affine ? L.b[c] : 0);
                    worst = fmax(worst, fabs(L.out[x - L.inp + i] - y));
                }
            }
        ck_assert_msg(worst < 1e-5 && worst_stat < 1e-6, "groupnorm forward off by %g / %g", worst, worst_stat);
        layer_free(&L);
        layer L2 = {.op = OP_GN, .B = 2, .C = 6, .H = 3, .W = 4, .G = 3, .affine = affine};
        full_check(&L2, 32 + affine, NORM_EPS, 5e-3, affine ? "groupnorm G=3" : "groupnorm G=3, no affine");
    }
    layer L = {.op = OP_GN, .B = 1, .C = 8, .H = 2, .W = 2, .G = 8, .affine = 1};
    full_check(&L, 34, NORM_EPS, 5e-3, "groupnorm G=C (instance norm)");
}
END_TEST

/* groupnorm_silu_forward is groupnorm_forward then silu_forward, bit for
 * bit; groups of 2 x 37 values (not a multiple of the 8 sum lanes) keep
 * their statistics within 1e-6 of a double reference */
START_TEST(test_groupnorm_silu) {
    int B = 2, C = 6, HW = 37, G = 3, Cg = C / G;
    size_t n = (size_t)B * C * HW;
    float *x = malloc(n * 4), *w = malloc(C * 4), *bb = malloc(C * 4);
    float *y0 = malloc(n * 4), *a0 = malloc(n * 4), *y1 = malloc(n * 4), *a1 = malloc(n * 4);
    float m0[6], r0[6], m1[6], r1[6];
    fill_uniform(x, n, -2, 3, 40); fill_uniform(w, C, 0.5f, 1.5f, 41); fill_uniform(bb, C, -1, 1, 42);
    groupnorm_forward(y0, m0, r0, x, w, bb, B, C, HW, G, 1e-5f);
    silu_forward(a0, y0, n);
    groupnorm_silu_forward(y1, a1, m1, r1, x, w, bb, B, C, HW, G, 1e-5f);
    ck_assert(memcmp(y0, y1, n * 4) == 0 && memcmp(a0, a1, n * 4) == 0);
    ck_assert(memcmp(m0, m1, sizeof m0) == 0 && memcmp(r0, r1, sizeof r0) == 0);
    for (int bg = 0; bg < B * G; bg++) {
        const float *xg = x + (size_t)bg * Cg * HW;
        double m = 0, v = 0;
        for (int i = 0; i < Cg * HW; i++) m += xg[i];
        m /= Cg * HW;
        for (int i = 0; i < Cg * HW; i++) v += (xg[i] - m) * (xg[i] - m);
        double rs = 1.0 / sqrt(v / (Cg * HW) + 1e-5);
        ck_assert_msg(fabs(m1[bg] - m) <= 1e-6 * fabs(m) && fabs(r1[bg] - rs) <= 1e-6 * rs,
                      "group %d: mean %g vs %g, rstd %g vs %g", bg, m1[bg], m, r1[bg], rs);
    }
    free(x); free(w); free(bb); free(y0); free(a0); free(y1); free(a1);
}
END_TEST

START_TEST(test_layernorm) {
    for (int affine = 1; affine >= 0; affine--) {
        layer L = {.op = OP_LN, .B = 4, .C = 10, .affine = affine};
        layer_alloc(&L, 40 + affine);
        layer_forward(&L);
        double worst = 0;
        for (int r = 0; r < L.B; r++) {
            const float *x = L.inp + r * L.C;
            double m = 0, v = 0;
            for (int c = 0; c < L.C; c++) m += x[c];
            m /= L.C;
            for (int c = 0; c < L.C; c++) v += (x[c] - m) * (x[c] - m);
            v /= L.C;
            for (int c = 0; c < L.C; c++) {
                double y = (x[c] - m) / sqrt(v + 1e-5) * (affine ? L.w[c] : 1) + (affine ? L.b[c] : 0);
                worst = fmax(worst, fabs(L.out[r * L.C + c] - y));
            }
        }
        ck_assert_msg(worst < 1e-5, "layernorm forward off by %g", worst);
        layer_free(&L);
        layer L2 = {.op = OP_LN, .B = 4, .C = 10, .affine = affine};
        full_check(&L2, 42 + affine, NORM_EPS, 5e-3, affine ? "layernorm" : "layernorm, no affine");
    }
    layer L = {.op = OP_LN, .B = 3, .C = 100, .affine = 1};   /* two column blocks for dw, db */
    full_check(&L, 44, NORM_EPS, 5e-3, "layernorm C=100");
}
END_TEST

START_TEST(test_activations) {
    const int ops[3] = {OP_SILU, OP_GELU, OP_QGELU};
    const char *names[3] = {"silu", "gelu", "quickgelu"};
    for (int k = 0; k < 3; k++) {
        layer L = {.op = ops[k], .B = 1, .C = 300};
        layer_alloc(&L, 50 + k);
        for (size_t i = 0; i < L.nin; i++) L.inp[i] *= 3.0f;     /* [-6, 6] */
        layer_forward(&L);
        double worst = 0;
        for (size_t i = 0; i < L.nin; i++) {
            double x = L.inp[i], y;
            if (ops[k] == OP_SILU) y = x / (1 + exp(-x));
            else if (ops[k] == OP_GELU) y = ref_gelu(x);
            else y = x / (1 + exp(-1.702 * x));
            worst = fmax(worst, fabs(L.out[i] - y));
        }
        ck_assert_msg(worst < 1e-5, "%s forward off by %g", names[k], worst);
        /* in place is allowed */
        float *copy = xcalloc(L.nin, sizeof(float));
        memcpy(copy, L.inp, L.nin * sizeof(float));
        if (ops[k] == OP_SILU) silu_forward(copy, copy, L.nin);
        else if (ops[k] == OP_GELU) gelu_forward(copy, copy, L.nin);
        else quickgelu_forward(copy, copy, L.nin);
        ck_assert(memcmp(copy, L.out, L.nin * sizeof(float)) == 0);
        free(copy);
        check_grads(&L, ACT_EPS, 5e-3, names[k]);
        check_accumulate_and_null(&L, names[k]);
        layer_free(&L);
    }
}
END_TEST

START_TEST(test_geglu) {
    layer L = {.op = OP_GEGLU, .B = 3, .C = 20};
    layer_alloc(&L, 60);
    layer_forward(&L);
    double worst = 0;
    for (int r = 0; r < L.B; r++)
        for (int j = 0; j < L.C; j++) {
            double v = L.inp[r * 2 * L.C + j], g = L.inp[r * 2 * L.C + L.C + j];
            worst = fmax(worst, fabs(L.out[r * L.C + j] - v * ref_gelu(g)));
        }
    ck_assert_msg(worst < 1e-5, "geglu forward off by %g", worst);
    check_grads(&L, ACT_EPS, 5e-3, "geglu");
    check_accumulate_and_null(&L, "geglu");
    layer_free(&L);
}
END_TEST

START_TEST(test_upsample) {
    layer L = {.op = OP_UPSAMPLE, .B = 2, .C = 3, .H = 3, .W = 4};
    layer_alloc(&L, 70);
    layer_forward(&L);
    int bad = 0;
    for (int bc = 0; bc < L.B * L.C; bc++)
        for (int y = 0; y < 2 * L.H; y++)
            for (int x = 0; x < 2 * L.W; x++)
                bad += L.out[((size_t)bc * 2 * L.H + y) * 2 * L.W + x] !=
                       L.inp[((size_t)bc * L.H + y / 2) * L.W + x / 2];
    ck_assert_int_eq(bad, 0);
    check_grads(&L, LIN_EPS, 1e-3, "upsample2x");
    check_accumulate_and_null(&L, "upsample2x");
    layer_free(&L);
}
END_TEST

START_TEST(test_dropout_grad) {
    layer L = {.op = OP_DROPOUT, .B = 1, .C = 200, .p = 0.3f};
    full_check(&L, 80, LIN_EPS, 1e-3, "dropout p=0.3 (fixed mask)");
}
END_TEST

/* ---------------------------------------------------------------------------
 * a deliberately wrong gradient must be caught: the check is not vacuous */
START_TEST(test_gradcheck_catches_errors) {
    layer L = {.op = OP_LN, .B = 2, .C = 8, .affine = 1};
    layer_alloc(&L, 90);
    float *dinp = xcalloc(L.nin, sizeof(float));
    layer_forward(&L);
    layer_backward(&L, dinp, NULL, NULL);
    double atol = atol_for(dinp, L.nin);
    ck_assert(grad_check(L.inp, dinp, L.nin, layer_loss, &L, NORM_EPS, atol, 200) < 1e-2);
    dinp[5] *= 1.1f;   /* a 10% error in one entry */
    ck_assert(grad_check(L.inp, dinp, L.nin, layer_loss, &L, NORM_EPS, atol, 200) > 1e-2);
    free(dinp);
    layer_free(&L);
}
END_TEST

/* ---------------------------------------------------------------------------
 * timestep embedding against its formula, evaluated here in double. The C
 * code rounds each step to float as torch does; for arguments t*f up to
 * ~1000 that leaves errors of order 1e-7 * |arg|, which the bound allows. */
START_TEST(test_timestep_embedding) {
    const float ts[5] = {0, 1, 10, 500, 999};
    const int dims[3] = {8, 7, 320};
    for (int di = 0; di < 3; di++)
        for (int flip = 0; flip <= 1; flip++)
            for (int shift = 0; shift <= 1; shift++) {
                int dim = dims[di], half = dim / 2;
                float *out = xcalloc((size_t)5 * dim, sizeof(float));
                for (size_t i = 0; i < (size_t)5 * dim; i++) out[i] = 99.0f;  /* must all be written */
                timestep_embedding(out, ts, 5, dim, flip, (float)shift, 10000.0f);
                for (int n = 0; n < 5; n++) {
                    const float *y = out + (size_t)n * dim;
                    for (int j = 0; j < half; j++) {
                        double arg = ts[n] * exp(-log(10000.0) * j / (half - shift));
                        double s = sin(arg), c = cos(arg);
                        double ys = y[flip ? half + j : j], yc = y[flip ? j : half + j];
                        double tol = 1e-6 + 4e-7 * arg;
                        ck_assert_msg(fabs(ys - s) <= tol && fabs(yc - c) <= tol,
                                      "dim %d flip %d shift %d t %g j %d: (%g, %g) vs (%g, %g)",
                                      dim, flip, shift, ts[n], j, ys, yc, s, c);
                    }
                    if (dim % 2) ck_assert(y[dim - 1] == 0.0f);
                }
                /* t = 0: sin part 0, cos part 1 */
                ck_assert(out[flip ? 0 : half] == 1.0f && out[flip ? half : 0] == 0.0f);
                free(out);
            }
    /* SD1.x: dim 320, flip_sin_to_cos, shift 0: the last frequency is
     * exp(-ln(1e4) * 159/160) */
    float out[320], t = 1000.0f;
    timestep_embedding(out, &t, 1, 320, 1, 0.0f, 10000.0f);
    double f = exp(-log(10000.0) * 159.0 / 160.0);
    ck_assert(fabs(out[159] - cos(1000.0 * f)) < 1e-5);
    ck_assert(fabs(out[319] - sin(1000.0 * f)) < 1e-5);
}
END_TEST

/* ---------------------------------------------------------------------------
 * RNG and dropout */
START_TEST(test_rng) {
    /* splitmix64 from seed 0: the published reference sequence */
    rng_t r; rng_seed(&r, 0);
    ck_assert(rng_u64(&r) == 0xE220A8397B1DCDAFULL);
    ck_assert(rng_u64(&r) == 0x6E789E6AA1B965F4ULL);
    ck_assert(rng_u64(&r) == 0x06C45D188009454FULL);
    /* uniform: top 24 bits, in [0, 1), mean 1/2, variance 1/12 */
    rng_seed(&r, 0);
    ck_assert(rng_uniform(&r) == (float)(0xE220A8397B1DCDAFULL >> 40) / 16777216.0f);
    const int n = 200000;
    double s = 0, s2 = 0, ns = 0, ns2 = 0, n4 = 0;
    int bad = 0;   /* counted, asserted once: Check logs every ck_assert call */
    for (int i = 0; i < n; i++) {
        float u = rng_uniform(&r);
        bad += !(u >= 0.0f && u < 1.0f);
        s += u; s2 += (double)u * u;
    }
    ck_assert_int_eq(bad, 0);
    ck_assert(fabs(s / n - 0.5) < 0.005);
    ck_assert(fabs(s2 / n - s / n * (s / n) - 1.0 / 12) < 0.002);
    for (int i = 0; i < n; i++) {
        float z = rng_normal(&r);
        bad += !isfinite(z);
        ns += z; ns2 += (double)z * z; n4 += (double)z * z * z * z;
    }
    ck_assert_int_eq(bad, 0);
    ck_assert_msg(fabs(ns / n) < 0.01, "normal mean %g", ns / n);
    ck_assert_msg(fabs(ns2 / n - 1) < 0.02, "normal variance %g", ns2 / n);
    ck_assert_msg(fabs(n4 / n - 3) < 0.1, "normal 4th moment %g", n4 / n);   /* Gaussian tails */
    /* same seed, same stream */
    rng_t a, b; rng_seed(&a, 42); rng_seed(&b, 42);
    for (int i = 0; i < 10; i++) ck_assert(rng_u64(&a) == rng_u64(&b));
}
END_TEST

START_TEST(test_dropout) {
    const size_t n = 100000;
    float *x = xcalloc(n, sizeof(float)), *y = xcalloc(n, sizeof(float));
    float *y2 = xcalloc(n, sizeof(float));
    uint8_t *m = xcalloc(n, 1), *m2 = xcalloc(n, 1);
    fill_uniform(x, n, -1.0f, 1.0f, 5);
    rng_t r; rng_seed(&r, 9);
    uint64_t state0 = r.state;

    /* p = 0: a copy, every mask bit set, the stream untouched */
    dropout_forward(y, m, x, n, 0.0f, &r);
    ck_assert(memcmp(x, y, n * sizeof(float)) == 0);
    size_t bad = 0;   /* counted, asserted once: Check logs every ck_assert call */
    for (size_t i = 0; i < n; i++) bad += m[i] != 1;
    ck_assert(bad == 0 && r.state == state0);

    /* p = 0.5: about half kept, kept values doubled, the rest zero */
    dropout_forward(y, m, x, n, 0.5f, &r);
    size_t kept = 0;
    for (size_t i = 0; i < n; i++) {
        bad += m[i] > 1;
        if (m[i]) { kept++; bad += y[i] != 2.0f * x[i]; }
        else bad += y[i] != 0.0f;
    }
    ck_assert(bad == 0);
    ck_assert_msg(fabs((double)kept / n - 0.5) < 0.01, "kept %zu of %zu", kept, n);

    /* the mask is the stream's own draws, u_i >= p, and the stream moved
     * past exactly n of them */
    rng_t s; rng_seed(&s, 9);
    for (size_t i = 0; i < n; i++) bad += m[i] != (rng_uniform(&s) >= 0.5f);
    ck_assert(bad == 0 && r.state == s.state);

    /* same seed, same mask; another seed, another mask */
    rng_seed(&r, 9);
    dropout_forward(y2, m2, x, n, 0.5f, &r);
    ck_assert(memcmp(m, m2, n) == 0 && memcmp(y, y2, n * sizeof(float)) == 0);
    rng_seed(&r, 10);
    dropout_forward(y2, m2, x, n, 0.5f, &r);
    ck_assert(memcmp(m, m2, n) != 0);

    /* p = 0.1 keeps about 90% and scales by 1/0.9 */
    rng_seed(&r, 11);
    dropout_forward(y, m, x, n, 0.1f, &r);
    kept = 0;
    for (size_t i = 0; i < n; i++)
        if (m[i]) { kept++; bad += fabs(y[i] - x[i] / 0.9) > 1e-6; }
        else bad += y[i] != 0.0f;
    ck_assert(bad == 0 && fabs((double)kept / n - 0.9) < 0.01);

    /* backward with p = 0 passes dout through (accumulating) */
    for (size_t i = 0; i < n; i++) y[i] = 1.0f;
    dropout_backward(y, x, m, n, 0.0f);
    for (size_t i = 0; i < n; i++) bad += y[i] != 1.0f + x[i];
    ck_assert(bad == 0);
    free(x); free(y); free(y2); free(m); free(m2);
}
END_TEST

START_TEST(test_scratch) {
    float *a = nn_scratch(1000);
    ck_assert_ptr_nonnull(a);
    for (int i = 0; i < 1000; i++) a[i] = (float)i;     /* all usable (ASan) */
    ck_assert_ptr_eq(nn_scratch(10), a);                /* smaller: same buffer */
    float *b = nn_scratch(100000);
    ck_assert_ptr_nonnull(b);
    b[99999] = 1.0f;
    ck_assert_ptr_eq(nn_scratch(5000), b);
    nn_scratch_free();
    nn_scratch_free();                                  /* twice is fine */
    ck_assert_ptr_nonnull(nn_scratch(0));
    ck_assert_ptr_null(nn_scratch(SIZE_MAX / 2));        /* impossible size: NULL */
    float *c = nn_scratch(16);                          /* and usable again after */
    ck_assert_ptr_nonnull(c);
    c[15] = 0.0f;
    nn_scratch_free();
}
END_TEST

/* ---------------------------------------------------------------------------
 * results do not depend on the number of threads (sizes above the
 * threshold where nn.c goes parallel). gemm is left out: it is matmul.c's. */
#ifdef _OPENMP
static void run_all_nongemm(layer *gn, layer *ln, layer *act, float *g[6], uint8_t *mask) {
    for (int k = 0; k < 6; k++) memset(g[k], 0, 1 << 20);
    layer_forward(gn);
    layer_backward(gn, g[0], g[1], g[2]);
    layer_forward(ln);
    layer_backward(ln, g[3], g[4], g[5]);
    geglu_forward(act->out, act->inp, act->B, act->C / 2);
    gelu_backward(g[0], act->R, act->inp, act->nin);
    silu_backward(g[1], act->R, act->inp, act->nin);
    upsample2x_backward(g[2], act->R, 1, 4, 64, 64);
    rng_t r; rng_seed(&r, 3);
    dropout_forward(g[3], mask, act->inp, act->nin, 0.2f, &r);
}

START_TEST(test_thread_count_invariance) {
    layer gn = {.op = OP_GN, .B = 2, .C = 32, .H = 16, .W = 16, .G = 8, .affine = 1};
    layer ln = {.op = OP_LN, .B = 300, .C = 200, .affine = 1};
    layer act = {.op = OP_SILU, .B = 64, .C = 1024};
    layer_alloc(&gn, 100); layer_alloc(&ln, 101); layer_alloc(&act, 102);
    float *g1[6], *g3[6];
    uint8_t *m1 = xcalloc(act.nin, 1), *m3 = xcalloc(act.nin, 1);
    for (int k = 0; k < 6; k++) { g1[k] = xcalloc(1 << 18, sizeof(float)); g3[k] = xcalloc(1 << 18, sizeof(float)); }
    int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    run_all_nongemm(&gn, &ln, &act, g1, m1);
    float *o1 = xcalloc(act.nout, sizeof(float));
    memcpy(o1, act.out, act.nout / 2 * sizeof(float));
    omp_set_num_threads(3);
    run_all_nongemm(&gn, &ln, &act, g3, m3);
    omp_set_num_threads(saved);
    for (int k = 0; k < 6; k++) ck_assert_msg(memcmp(g1[k], g3[k], 1 << 20) == 0, "buffer %d differs", k);
    ck_assert(memcmp(m1, m3, act.nin) == 0);
    ck_assert(memcmp(o1, act.out, act.nout / 2 * sizeof(float)) == 0);
    for (int k = 0; k < 6; k++) { free(g1[k]); free(g3[k]); }
    free(m1); free(m3); free(o1);
    layer_free(&gn); layer_free(&ln); layer_free(&act);
}
END_TEST
#endif

/* banded im2col (nn_conv_cols_max) gives the same forward and backward as
 * one band: a 3x3 stride-2 conv and a 3x3 pad-1 conv, bands of 1 and 2 rows */
START_TEST(test_conv_bands) {
    int B = 2, C = 3, H = 9, W = 7, O = 4;
    for (int cfg = 0; cfg < 2; cfg++) {
        int stride = cfg ? 2 : 1, pad = 1, k = 3;
        int Ho = (H + 2 * pad - k) / stride + 1, Wo = (W + 2 * pad - k) / stride + 1;
        size_t nx = (size_t)B * C * H * W, ny = (size_t)B * O * Ho * Wo, nw = (size_t)O * C * k * k;
        float *x = malloc(nx * 4), *w = malloc(nw * 4), *b = malloc(O * 4), *R = malloc(ny * 4);
        fill_uniform(x, nx, -1, 1, 1); fill_uniform(w, nw, -1, 1, 2); fill_uniform(b, O, -1, 1, 3);
        fill_uniform(R, ny, -1, 1, 4);
        float *y[2], *dx[2], *dw[2], *db[2];
        size_t save = nn_conv_cols_max;
        for (int v = 0; v < 2; v++) {
            y[v] = malloc(ny * 4); dx[v] = calloc(nx, 4); dw[v] = calloc(nw, 4); db[v] = calloc(O, 4);
            nn_conv_cols_max = v ? (size_t)C * k * k * Wo * (cfg ? 1 : 2) : save;
            conv2d_forward(y[v], x, w, b, B, C, H, W, O, k, k, stride, pad);
            conv2d_backward(dx[v], dw[v], db[v], R, x, w, B, C, H, W, O, k, k, stride, pad);
        }
        nn_conv_cols_max = save;
        ck_assert(memcmp(y[0], y[1], ny * 4) == 0);
        ck_assert_double_lt(rel_err(dx[1], dx[0], nx), 1e-6);
        ck_assert_double_lt(rel_err(dw[1], dw[0], nw), 1e-6);
        ck_assert_double_lt(rel_err(db[1], db[0], O), 1e-6);
        for (int v = 0; v < 2; v++) { free(y[v]); free(dx[v]); free(dw[v]); free(db[v]); }
        free(x); free(w); free(b); free(R);
    }
}
END_TEST

/* the batched convolution paths (conv2d_forward: columns packed straight
 * from the images, all B at once, or as many as nn_conv_cols_max allows;
 * conv2d_backward without dw: one w^T dout product for the batch) give the
 * per-image banded path's bits: shapes whose per-image product is blocked,
 * K of one and of two K blocks, Wo that divides the kernel's strip width
 * and Wo that does not, strides 1 and 2. Under --compute bf16 too, where
 * the columns are packed as pairs of taps (gemm_bf16_im2col): also an odd K
 * (a pair padded with 0) and a K of two bf16 blocks, the second odd. */
START_TEST(test_conv_packed_same_bits) {
    static const int cases[][6] = {   /* B, C, H, W, O, stride */
        {3, 16, 16, 16, 32, 1}, {2, 48, 8, 8, 20, 1}, {3, 24, 9, 7, 16, 1}, {2, 32, 12, 12, 24, 2},
        {1, 16, 16, 16, 32, 1}, {2, 16, 16, 16, 24, 2}, {5, 8, 4, 4, 36, 1},
        {2, 5, 16, 16, 16, 1}, {2, 7, 15, 13, 16, 2}, {2, 63, 8, 8, 20, 1},
    };
    int ncases = sizeof cases / sizeof cases[0];
    for (int m = 0; m < 2 * ncases; m++) {
        int c = m % ncases;
        gemm_set_compute(m < ncases ? GEMM_F32 : GEMM_BF16);
        int B = cases[c][0], C = cases[c][1], H = cases[c][2], W = cases[c][3], O = cases[c][4];
        int stride = cases[c][5], k = 3, pad = 1, K = C * k * k;
        int Ho = (H + 2 * pad - k) / stride + 1, Wo = (W + 2 * pad - k) / stride + 1, P = Ho * Wo;
        size_t nx = (size_t)B * C * H * W, ny = (size_t)B * O * P, nw = (size_t)O * K;
        float *x = malloc(nx * 4), *w = malloc(nw * 4), *b = malloc(O * 4), *R = malloc(ny * 4);
        fill_uniform(x, nx, -1, 1, 11); fill_uniform(w, nw, -1, 1, 12); fill_uniform(b, O, -1, 1, 13);
        fill_uniform(R, ny, -1, 1, 14);
        size_t save = nn_conv_cols_max;
        /* v = 0: room for one image's columns only (the per-image path,
         * unbanded: bands add dx in another order); 1: every image at
         * once; 2: fewer images at a time than B on the batched paths */
        size_t lim[3] = {(size_t)K * P, save, (size_t)(K + O) * P * 2 + 64};
        float *y[3], *dx[3];
        for (int v = 0; v < 3; v++) {
            y[v] = malloc(ny * 4); dx[v] = malloc(nx * 4);
            fill_uniform(dx[v], nx, -1, 1, 15);          /* backward adds to dx */
            nn_conv_cols_max = lim[v];
            conv2d_forward(y[v], x, w, v == 2 ? NULL : b, B, C, H, W, O, k, k, stride, pad);
            conv2d_backward(dx[v], NULL, NULL, R, x, w, B, C, H, W, O, k, k, stride, pad);
        }
        nn_conv_cols_max = save;
        gemm_set_compute(GEMM_F32);
        ck_assert_msg(memcmp(y[0], y[1], ny * 4) == 0, "case %d: forward differs", m);
        ck_assert_msg(memcmp(dx[0], dx[1], nx * 4) == 0, "case %d: dinp differs", m);
        ck_assert_msg(memcmp(dx[0], dx[2], nx * 4) == 0, "case %d: dinp (one image a time) differs", m);
        /* without bias: y[2] + b must be y[0] exactly (the bias is the last add) */
        for (int o = 0; o < O; o++)
            for (int bi = 0; bi < B; bi++)
                for (int p = 0; p < P; p++) {
                    size_t i = ((size_t)bi * O + o) * P + p;
                    ck_assert_msg(y[2][i] + b[o] == y[0][i], "case %d: forward without bias differs", m);
                }
        for (int v = 0; v < 3; v++) { free(y[v]); free(dx[v]); }
        free(x); free(w); free(b); free(R);
    }
}
END_TEST

/* nn_expf and nn_erff (nn.h) against libm in double at 2^21 evenly spaced
 * points of their ranges: exp within 2 ulp of the exact value (measured
 * 0.97 over every 16th float), erf within 1e-7 absolute (measured 7.6e-8;
 * libm's erff 5.4e-8) */
START_TEST(test_fast_exp_erf) {
    double worst_ulp = 0, worst_erf = 0;
    const int n = 1 << 21;
    for (int i = 0; i < n; i++) {
        float x = -87.0f + 175.0f * (float)i / (float)n;
        double e = exp((double)x);
        float ef = (float)e;
        double ulp = (double)nextafterf(ef, INFINITY) - ef;
        worst_ulp = fmax(worst_ulp, fabs((double)nn_expf(x) - e) / ulp);
        x = -6.0f + 12.0f * (float)i / (float)n;
        worst_erf = fmax(worst_erf, fabs((double)nn_erff(x) - erf((double)x)));
    }
    ck_assert_msg(worst_ulp <= 2.0, "nn_expf: %g ulp", worst_ulp);
    ck_assert_msg(worst_erf <= 1e-7, "nn_erff: %g", worst_erf);
    // the clamped ends: nothing overflows to inf or underflows below FLT_MIN
    ck_assert(nn_expf(-1000.0f) > 0.0f && nn_expf(-1000.0f) <= 1.2e-38f);
    ck_assert(isfinite(nn_expf(1000.0f)) && nn_expf(1000.0f) > 1e38f);
    ck_assert(nn_erff(100.0f) == 1.0f && nn_erff(-100.0f) == -1.0f && nn_erff(0.0f) == 0.0f);
}
END_TEST

static Suite *nn_suite(void) {
    Suite *s = suite_create("nn");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_linear);
    tcase_add_test(tc, test_conv_bands);
    tcase_add_test(tc, test_conv_packed_same_bits);
    tcase_add_test(tc, test_conv2d);
    tcase_add_test(tc, test_groupnorm);
    tcase_add_test(tc, test_groupnorm_silu);
    tcase_add_test(tc, test_layernorm);
    tcase_add_test(tc, test_activations);
    tcase_add_test(tc, test_fast_exp_erf);
    tcase_add_test(tc, test_geglu);
    tcase_add_test(tc, test_upsample);
    tcase_add_test(tc, test_dropout_grad);
    tcase_add_test(tc, test_gradcheck_catches_errors);
    tcase_add_test(tc, test_timestep_embedding);
    tcase_add_test(tc, test_rng);
    tcase_add_test(tc, test_dropout);
    tcase_add_test(tc, test_scratch);
#ifdef _OPENMP
    tcase_add_test(tc, test_thread_count_invariance);
#endif
    suite_add_tcase(s, tc);
    return s;
}

CHECK_MAIN(nn_suite)

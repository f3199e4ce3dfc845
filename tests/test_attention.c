/* test_attention.c: multi-head attention forward against a naive double-
 * precision reference, probability invariants, finite-difference gradient
 * checks of dq, dk, dv (self, cross and causal attention, with att stored and
 * recomputed), and the backward conventions (accumulate, NULL grads). */
#include "testutil.h"
#ifdef _OPENMP
#include <omp.h>
#endif

/* one attention problem: inputs, outputs, gradients and the loss weights R */
typedef struct {
    int B, Tq, Tk, H, Dh, causal;
    float *q, *k, *v, *out, *att, *R;
    float *dq, *dk, *dv;
    int use_att;   // loss(): whether forward stores att (else the NULL path)
} prob_t;

static size_t nq(const prob_t *p) { return (size_t)p->B * p->Tq * p->H * p->Dh; }
static size_t nk(const prob_t *p) { return (size_t)p->B * p->Tk * p->H * p->Dh; }
static size_t natt(const prob_t *p) { return (size_t)p->B * p->H * p->Tq * p->Tk; }

static prob_t prob_make(int B, int Tq, int Tk, int H, int Dh, int causal, uint64_t seed) {
    prob_t p = {B, Tq, Tk, H, Dh, causal, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
    p.q = malloc(nq(&p) * sizeof(float));
    p.k = malloc(nk(&p) * sizeof(float));
    p.v = malloc(nk(&p) * sizeof(float));
    p.out = malloc(nq(&p) * sizeof(float));
    p.R = malloc(nq(&p) * sizeof(float));
    p.att = malloc(natt(&p) * sizeof(float));
    p.dq = calloc(nq(&p), sizeof(float));
    p.dk = calloc(nk(&p), sizeof(float));
    p.dv = calloc(nk(&p), sizeof(float));
    // q, k in [-1.5, 1.5] give logits of order 1: the softmax is neither
    // uniform nor one-hot, so every gradient path carries signal
    fill_uniform(p.q, nq(&p), -1.5f, 1.5f, seed + 1);
    fill_uniform(p.k, nk(&p), -1.5f, 1.5f, seed + 2);
    fill_uniform(p.v, nk(&p), -1.0f, 1.0f, seed + 3);
    fill_uniform(p.R, nq(&p), -1.0f, 1.0f, seed + 4);
    return p;
}

static void prob_free(prob_t *p) {
    free(p->q); free(p->k); free(p->v); free(p->out); free(p->R); free(p->att);
    free(p->dq); free(p->dk); free(p->dv);
}

static void prob_zero_grads(prob_t *p) {
    memset(p->dq, 0, nq(p) * sizeof(float));
    memset(p->dk, 0, nk(p) * sizeof(float));
    memset(p->dv, 0, nk(p) * sizeof(float));
}

static void run_forward(prob_t *p, float *att) {
    attention_forward(p->out, att, p->q, p->k, p->v, p->B, p->Tq, p->Tk, p->H, p->Dh, p->causal);
}

static void run_backward(prob_t *p, float *dq, float *dk, float *dv, const float *att) {
    attention_backward(dq, dk, dv, p->R, p->q, p->k, p->v, att,
                       p->B, p->Tq, p->Tk, p->H, p->Dh, p->causal);
}

/* L = sum(out * R) */
static double loss(void *ctx) {
    prob_t *p = ctx;
    run_forward(p, p->use_att ? p->att : NULL);
    return dot_d(p->out, p->R, nq(p));
}

/* The textbook definition, one (b, h, i) at a time, in double, no gemm:
 *   s_j = sum_d q[i][d] k[j][d] / sqrt(Dh),  masked j > i when causal
 *   p_j = exp(s_j - max s) / sum exp(s - max s)
 *   out[i][d] = sum_j p_j v[j][d]
 * ref_out (B, Tq, C) and ref_att (B, H, Tq, Tk) are filled. */
static void naive_attention(double *ref_out, double *ref_att, const prob_t *p) {
    int C = p->H * p->Dh;
    double *s = malloc((size_t)p->Tk * sizeof(double));
    for (int b = 0; b < p->B; b++)
        for (int h = 0; h < p->H; h++)
            for (int i = 0; i < p->Tq; i++) {
                const float *qi = p->q + ((size_t)b * p->Tq + i) * C + h * p->Dh;
                double mx = -INFINITY;
                for (int j = 0; j < p->Tk; j++) {
                    const float *kj = p->k + ((size_t)b * p->Tk + j) * C + h * p->Dh;
                    double d = 0;
                    for (int c = 0; c < p->Dh; c++) d += (double)qi[c] * kj[c];
                    s[j] = d / sqrt((double)p->Dh);
                    if (p->causal && j > i) s[j] = -INFINITY;
                    if (s[j] > mx) mx = s[j];
                }
                double sum = 0;
                for (int j = 0; j < p->Tk; j++) { s[j] = exp(s[j] - mx); sum += s[j]; }
                double *arow = ref_att + (((size_t)b * p->H + h) * p->Tq + i) * p->Tk;
                for (int j = 0; j < p->Tk; j++) arow[j] = s[j] / sum;
                double *orow = ref_out + ((size_t)b * p->Tq + i) * C + h * p->Dh;
                for (int c = 0; c < p->Dh; c++) {
                    double o = 0;
                    for (int j = 0; j < p->Tk; j++)
                        o += arow[j] * p->v[((size_t)b * p->Tk + j) * C + h * p->Dh + c];
                    orow[c] = o;
                }
            }
    free(s);
}

/* max |a - ref| / max |ref| against a double reference */
static double rel_err_d(const float *a, const double *ref, size_t n) {
    double maxd = 0, maxr = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - ref[i]);
        if (!(d <= maxd)) maxd = d;
        if (fabs(ref[i]) > maxr) maxr = fabs(ref[i]);
    }
    return maxd / maxr;
}

/* the shapes the gradient tests cover */
static const int SHAPES[][6] = {
    /* B, Tq, Tk, H, Dh, causal */
    {2, 7, 7, 2, 4, 0},   /* self-attention */
    {2, 6, 5, 2, 4, 0},   /* cross-attention, Tq != Tk */
    {2, 6, 6, 2, 4, 1},   /* causal self-attention (CLIP) */
};
static const char *SHAPE_NAMES[] = {"self", "cross", "causal"};
#define NSHAPES 3

/* forward vs the naive reference, with and without att, on the test shapes
 * and on a larger odd-sized one (so blocked gemm paths are exercised too) */
START_TEST(test_forward_vs_naive) {
    const int shapes[][6] = {
        {2, 7, 7, 2, 4, 0}, {2, 6, 5, 2, 4, 0}, {2, 6, 6, 2, 4, 1},
        {2, 5, 8, 3, 4, 1},   /* causal with Tq < Tk: rows see j <= i only */
        {1, 37, 29, 3, 16, 0}, {1, 33, 33, 2, 8, 1},
    };
    for (int s = 0; s < (int)(sizeof shapes / sizeof shapes[0]); s++) {
        const int *d = shapes[s];
        prob_t p = prob_make(d[0], d[1], d[2], d[3], d[4], d[5], 100 + s);
        double *ref_out = malloc(nq(&p) * sizeof(double));
        double *ref_att = malloc(natt(&p) * sizeof(double));
        naive_attention(ref_out, ref_att, &p);

        run_forward(&p, p.att);
        double eo = rel_err_d(p.out, ref_out, nq(&p));
        double ea = rel_err_d(p.att, ref_att, natt(&p));
        ck_assert_msg(eo < 1e-5, "shape %d: out rel err %g", s, eo);
        ck_assert_msg(ea < 1e-5, "shape %d: att rel err %g", s, ea);

        // the att == NULL path does the same arithmetic: identical output
        float *out1 = malloc(nq(&p) * sizeof(float));
        memcpy(out1, p.out, nq(&p) * sizeof(float));
        run_forward(&p, NULL);
        ck_assert_msg(memcmp(out1, p.out, nq(&p) * sizeof(float)) == 0,
                      "shape %d: att == NULL forward differs", s);
        free(out1); free(ref_out); free(ref_att);
        prob_free(&p);
    }
}
END_TEST

/* large logits (|s| ~ 100): the row max subtraction keeps exp() finite */
START_TEST(test_forward_large_logits) {
    prob_t p = prob_make(1, 6, 5, 2, 4, 0, 7);
    for (size_t i = 0; i < nq(&p); i++) p.q[i] *= 40.0f;
    for (size_t i = 0; i < nk(&p); i++) p.k[i] *= 2.0f;
    double *ref_out = malloc(nq(&p) * sizeof(double));
    double *ref_att = malloc(natt(&p) * sizeof(double));
    naive_attention(ref_out, ref_att, &p);
    run_forward(&p, p.att);
    for (size_t i = 0; i < nq(&p); i++) ck_assert(isfinite(p.out[i]));
    double eo = rel_err_d(p.out, ref_out, nq(&p));
    ck_assert_msg(eo < 1e-4, "out rel err %g", eo);   // logits ~1e2: float S carries ~1e-5 abs error
    free(ref_out); free(ref_att);
    prob_free(&p);
}
END_TEST

/* every att row is a distribution; causal masked entries are exactly 0 */
START_TEST(test_att_invariants) {
    for (int s = 0; s < NSHAPES; s++) {
        const int *d = SHAPES[s];
        prob_t p = prob_make(d[0], d[1], d[2], d[3], d[4], d[5], 200 + s);
        run_forward(&p, p.att);
        for (int bh = 0; bh < p.B * p.H; bh++)
            for (int i = 0; i < p.Tq; i++) {
                const float *row = p.att + ((size_t)bh * p.Tq + i) * p.Tk;
                double sum = 0;
                for (int j = 0; j < p.Tk; j++) {
                    ck_assert(row[j] >= 0.0f);
                    if (p.causal && j > i)
                        ck_assert_msg(row[j] == 0.0f, "%s: masked att[%d][%d] = %g",
                                      SHAPE_NAMES[s], i, j, row[j]);
                    else
                        ck_assert_msg(row[j] > 0.0f, "%s: unmasked att is 0", SHAPE_NAMES[s]);
                    sum += row[j];
                }
                ck_assert_msg(fabs(sum - 1.0) < 1e-6, "%s: row sum %.9f", SHAPE_NAMES[s], sum);
            }
        prob_free(&p);
    }
}
END_TEST

/* L = sum(out * R) with out from the naive double reference: the finite
 * differences then carry no float round-off, so the bound can be tight */
static double loss_naive(void *ctx) {
    prob_t *p = ctx;
    double *ref_out = malloc(nq(p) * sizeof(double));
    double *ref_att = malloc(natt(p) * sizeof(double));
    naive_attention(ref_out, ref_att, p);
    double L = 0;
    for (size_t i = 0; i < nq(p); i++) L += ref_out[i] * p->R[i];
    free(ref_out); free(ref_att);
    return L;
}

/* finite differences of L = sum(out * R) against dq, dk, dv, for att stored
 * and att == NULL (backward recomputes P); the two paths must agree */
START_TEST(test_grad_check) {
    for (int s = 0; s < NSHAPES; s++) {
        const int *d = SHAPES[s];
        prob_t p = prob_make(d[0], d[1], d[2], d[3], d[4], d[5], 300 + s);
        float *g_att[3] = {NULL, NULL, NULL};
        for (int use_att = 1; use_att >= 0; use_att--) {
            const char *nm = SHAPE_NAMES[s], *how = use_att ? "kept" : "NULL";
            p.use_att = use_att;
            prob_zero_grads(&p);
            run_forward(&p, use_att ? p.att : NULL);
            run_backward(&p, p.dq, p.dk, p.dv, use_att ? p.att : NULL);

            // (1) against the double-precision loss. eps = 2^-10 so x +- eps
            // is exact in float; truncation error ~eps^2 ~ 1e-6, leaving the
            // float analytic gradient's own round-off (~1e-6) as the error.
            const float eps = 1.0f / 1024.0f;
            double eq = grad_check(p.q, p.dq, nq(&p), loss_naive, &p, eps, 1e-3, 1000);
            double ek = grad_check(p.k, p.dk, nk(&p), loss_naive, &p, eps, 1e-3, 1000);
            double ev = grad_check(p.v, p.dv, nk(&p), loss_naive, &p, eps, 1e-3, 1000);
            printf("attention grad check %-6s att=%s, double loss: dq %.2e dk %.2e dv %.2e\n",
                   nm, how, eq, ek, ev);
            ck_assert_msg(eq < 1e-4, "%s att=%s: dq err %g", nm, how, eq);
            ck_assert_msg(ek < 1e-4, "%s att=%s: dk err %g", nm, how, ek);
            ck_assert_msg(ev < 1e-4, "%s att=%s: dv err %g", nm, how, ev);

            // (2) against attention_forward itself (float). Its round-off in L
            // (~1e-7 |L|) divided by 2 eps dominates here: with eps = 3e-2 the
            // measured worst was ~1e-3, and it grows as eps shrinks (round-off,
            // not truncation), hence the looser bound.
            eq = grad_check(p.q, p.dq, nq(&p), loss, &p, 3e-2f, 1e-3, 1000);
            ek = grad_check(p.k, p.dk, nk(&p), loss, &p, 3e-2f, 1e-3, 1000);
            ev = grad_check(p.v, p.dv, nk(&p), loss, &p, 3e-2f, 1e-3, 1000);
            printf("attention grad check %-6s att=%s, float loss:  dq %.2e dk %.2e dv %.2e\n",
                   nm, how, eq, ek, ev);
            ck_assert_msg(eq < 3e-3, "%s att=%s: dq err %g (float loss)", nm, how, eq);
            ck_assert_msg(ek < 3e-3, "%s att=%s: dk err %g (float loss)", nm, how, ek);
            ck_assert_msg(ev < 3e-3, "%s att=%s: dv err %g (float loss)", nm, how, ev);

            if (use_att) {
                g_att[0] = malloc(nq(&p) * sizeof(float)); memcpy(g_att[0], p.dq, nq(&p) * sizeof(float));
                g_att[1] = malloc(nk(&p) * sizeof(float)); memcpy(g_att[1], p.dk, nk(&p) * sizeof(float));
                g_att[2] = malloc(nk(&p) * sizeof(float)); memcpy(g_att[2], p.dv, nk(&p) * sizeof(float));
            }
        }
        // stored-P and recomputed-P backward agree
        double e0 = rel_err(p.dq, g_att[0], nq(&p));
        double e1 = rel_err(p.dk, g_att[1], nk(&p));
        double e2 = rel_err(p.dv, g_att[2], nk(&p));
        printf("attention %-6s att kept vs NULL backward: %.2e %.2e %.2e\n", SHAPE_NAMES[s], e0, e1, e2);
        ck_assert_msg(e0 < 1e-6 && e1 < 1e-6 && e2 < 1e-6,
                      "%s: att kept vs NULL backward differ: %g %g %g", SHAPE_NAMES[s], e0, e1, e2);
        for (int i = 0; i < 3; i++) free(g_att[i]);
        prob_free(&p);
    }
}
END_TEST

/* backward accumulates: starting from G0, one call gives G0 + g, and two
 * calls from zero give 2g */
START_TEST(test_backward_accumulates) {
    prob_t p = prob_make(2, 6, 5, 2, 4, 0, 400);
    size_t n[3] = {nq(&p), nk(&p), nk(&p)};
    float *g[3] = {p.dq, p.dk, p.dv};
    float *once[3], *init[3];
    run_forward(&p, p.att);
    run_backward(&p, p.dq, p.dk, p.dv, p.att);
    for (int t = 0; t < 3; t++) {
        once[t] = malloc(n[t] * sizeof(float)); memcpy(once[t], g[t], n[t] * sizeof(float));
        ck_assert(dot_d(once[t], once[t], n[t]) > 0);   // a nonzero gradient to accumulate
    }
    // second call on top of the first: 2g
    run_backward(&p, p.dq, p.dk, p.dv, p.att);
    for (int t = 0; t < 3; t++) {
        for (size_t i = 0; i < n[t]; i++) once[t][i] *= 2.0f;
        double e = rel_err(g[t], once[t], n[t]);
        ck_assert_msg(e < 1e-6, "grad %d: two calls vs 2g: %g", t, e);
        for (size_t i = 0; i < n[t]; i++) once[t][i] *= 0.5f;
    }
    // from a random G0: G0 + g
    for (int t = 0; t < 3; t++) {
        init[t] = malloc(n[t] * sizeof(float));
        fill_uniform(init[t], n[t], -1.0f, 1.0f, 410 + t);
        memcpy(g[t], init[t], n[t] * sizeof(float));
    }
    run_backward(&p, p.dq, p.dk, p.dv, NULL);
    for (int t = 0; t < 3; t++) {
        for (size_t i = 0; i < n[t]; i++) init[t][i] += once[t][i];
        double e = rel_err(g[t], init[t], n[t]);
        ck_assert_msg(e < 1e-6, "grad %d: G0 + g: %g", t, e);
        free(once[t]); free(init[t]);
    }
    prob_free(&p);
}
END_TEST

/* any of dq, dk, dv may be NULL; the others are unaffected */
START_TEST(test_null_grads) {
    prob_t p = prob_make(2, 6, 6, 2, 4, 1, 500);
    run_forward(&p, p.att);
    run_backward(&p, p.dq, p.dk, p.dv, p.att);   // the full result
    for (int use_att = 0; use_att < 2; use_att++) {
        const float *att = use_att ? p.att : NULL;
        float *a = calloc(nk(&p), sizeof(float));
        run_backward(&p, NULL, NULL, NULL, att);    // must not crash or touch anything
        run_backward(&p, a, NULL, NULL, att);
        ck_assert(rel_err(a, p.dq, nq(&p)) < 1e-6);
        memset(a, 0, nk(&p) * sizeof(float));
        run_backward(&p, NULL, a, NULL, att);
        ck_assert(rel_err(a, p.dk, nk(&p)) < 1e-6);
        memset(a, 0, nk(&p) * sizeof(float));
        run_backward(&p, NULL, NULL, a, att);
        ck_assert(rel_err(a, p.dv, nk(&p)) < 1e-6);
        free(a);
    }
    prob_free(&p);
}
END_TEST

/* forward and backward with 1 thread and with `threads`: out, dq, dk, dv
 * bit for bit the same (a no-op without OpenMP) */
static void assert_thread_invariant(prob_t *p, int threads, const char *what) {
#ifdef _OPENMP
    int saved = omp_get_max_threads();
    float *ref[4];
    size_t n[4] = {nq(p), nq(p), nk(p), nk(p)};
    for (int run = 0; run < 2; run++) {
        omp_set_num_threads(run == 0 ? 1 : threads);
        prob_zero_grads(p);
        run_forward(p, NULL);
        run_backward(p, p->dq, p->dk, p->dv, NULL);
        float *cur[4] = {p->out, p->dq, p->dk, p->dv};
        for (int t = 0; t < 4; t++) {
            if (run == 0) {
                ref[t] = malloc(n[t] * sizeof(float));
                memcpy(ref[t], cur[t], n[t] * sizeof(float));
            } else {
                ck_assert_msg(memcmp(ref[t], cur[t], n[t] * sizeof(float)) == 0,
                              "%stensor %d differs between 1 and %d threads", what, t, threads);
                free(ref[t]);
            }
        }
    }
    omp_set_num_threads(saved);
#else
    (void)p; (void)threads; (void)what;
#endif
}

/* the same numbers whatever the OpenMP thread count (with a gemm whose
 * results do not depend on it either) */
START_TEST(test_thread_count_invariant) {
    prob_t p = prob_make(2, 37, 29, 3, 8, 0, 600);
    assert_thread_invariant(&p, 4, "");
    prob_free(&p);
}
END_TEST

/* Long sequences are cut into query tiles (attention.c: rows * Tk <= 2^17):
 * Tq = 300, Tk = 600 gives tiles of 218 rows, the last one ragged. Forward
 * and backward against the textbook formulas in double, with and without
 * att, causal or not, and bit-identical for 1 and 3 threads. */
static void naive_backward(double *dq, double *dk, double *dv, const double *P, const prob_t *p) {
    int C = p->H * p->Dh, Tq = p->Tq, Tk = p->Tk, Dh = p->Dh;
    double scale = 1.0 / sqrt((double)Dh);
    double *dS = malloc(sizeof(double) * (size_t)Tk);
    for (int b = 0; b < p->B; b++)
        for (int h = 0; h < p->H; h++)
            for (int i = 0; i < Tq; i++) {
                const double *prow = P + (((size_t)b * p->H + h) * Tq + i) * Tk;
                const float *R = p->R + ((size_t)b * Tq + i) * C + h * Dh;
                const float *qi = p->q + ((size_t)b * Tq + i) * C + h * Dh;
                // dP_j = R . v_j;  dS_j = P_j (dP_j - sum_j' P_j' dP_j')
                double dot = 0;
                for (int j = 0; j < Tk; j++) {
                    const float *vj = p->v + ((size_t)b * Tk + j) * C + h * Dh;
                    double d = 0;
                    for (int c = 0; c < Dh; c++) d += (double)R[c] * vj[c];
                    dS[j] = d;
                    dot += prow[j] * d;
                }
                for (int j = 0; j < Tk; j++) {
                    dS[j] = prow[j] * (dS[j] - dot);
                    size_t kj = ((size_t)b * Tk + j) * C + h * Dh;
                    for (int c = 0; c < Dh; c++) {
                        dv[kj + c] += prow[j] * R[c];
                        dk[kj + c] += scale * dS[j] * qi[c];
                        dq[((size_t)b * Tq + i) * C + h * Dh + c] += scale * dS[j] * p->k[kj + c];
                    }
                }
            }
    free(dS);
}

START_TEST(test_tiled_long_sequences) {
    for (int causal = 0; causal < 2; causal++) {
        prob_t p = prob_make(1, 300, 600, 2, 8, causal, 700 + causal);
        double *ref_out = malloc(nq(&p) * sizeof(double)), *ref_att = malloc(natt(&p) * sizeof(double));
        double *rq = calloc(nq(&p), sizeof(double)), *rk = calloc(nk(&p), sizeof(double));
        double *rv = calloc(nk(&p), sizeof(double));
        naive_attention(ref_out, ref_att, &p);
        naive_backward(rq, rk, rv, ref_att, &p);
        for (int keep = 0; keep < 2; keep++) {
            float *att = keep ? p.att : NULL;
            prob_zero_grads(&p);
            run_forward(&p, att);
            run_backward(&p, p.dq, p.dk, p.dv, att);
            double eo = rel_err_d(p.out, ref_out, nq(&p));
            double eq = rel_err_d(p.dq, rq, nq(&p)), ek = rel_err_d(p.dk, rk, nk(&p));
            double ev = rel_err_d(p.dv, rv, nk(&p));
            ck_assert_msg(eo < 1e-5 && eq < 1e-4 && ek < 1e-4 && ev < 1e-4,
                          "causal %d att %d: out %g dq %g dk %g dv %g", causal, keep, eo, eq, ek, ev);
            if (keep) {
                double ea = rel_err_d(p.att, ref_att, natt(&p));
                ck_assert_msg(ea < 1e-5, "causal %d: att rel err %g", causal, ea);
            }
        }
        assert_thread_invariant(&p, 3, "tiled: ");
        free(ref_out); free(ref_att); free(rq); free(rk); free(rv);
        prob_free(&p);
    }
}
END_TEST

/* With several query tiles, the backward sums a head's dK and dV over the
 * tiles in a dense buffer and adds it to dk, dv at the end. From zeroed
 * gradients that must give the bits of adding each tile straight into dk,
 * dv in turn: here, one backward call per tile's rows (each call one tile,
 * so the direct path) against one call over all of them, fp32 and bf16.
 * (Not causal: a call over a tile's rows alone would mask them as rows
 * 0 ..) */
START_TEST(test_tiled_dense_same_bits) {
    prob_t p = prob_make(1, 300, 600, 2, 8, 0, 720);
    int C = p.H * p.Dh, rows = (1 << 17) / p.Tk;      /* attention.c's tile rows */
    ck_assert_int_lt(rows, p.Tq);                        /* several tiles */
    float *g[3] = {malloc(nq(&p) * 4), malloc(nk(&p) * 4), malloc(nk(&p) * 4)};
    for (int mode = 0; mode < 2; mode++) {
        gemm_set_compute(mode ? GEMM_BF16 : GEMM_F32);
        prob_zero_grads(&p);
        run_backward(&p, p.dq, p.dk, p.dv, NULL);
        memcpy(g[0], p.dq, nq(&p) * 4); memcpy(g[1], p.dk, nk(&p) * 4); memcpy(g[2], p.dv, nk(&p) * 4);
        prob_zero_grads(&p);
        for (int i0 = 0; i0 < p.Tq; i0 += rows) {
            int nr = p.Tq - i0 < rows ? p.Tq - i0 : rows;
            size_t off = (size_t)i0 * C;
            attention_backward(p.dq + off, p.dk, p.dv, p.R + off, p.q + off, p.k, p.v, NULL,
                               1, nr, p.Tk, p.H, p.Dh, 0);
        }
        gemm_set_compute(GEMM_F32);
        ck_assert_msg(memcmp(g[0], p.dq, nq(&p) * 4) == 0, "mode %d: dq differs", mode);
        ck_assert_msg(memcmp(g[1], p.dk, nk(&p) * 4) == 0, "mode %d: dk differs", mode);
        ck_assert_msg(memcmp(g[2], p.dv, nk(&p) * 4) == 0, "mode %d: dv differs", mode);
    }
    for (int t = 0; t < 3; t++) free(g[t]);
    prob_free(&p);
}
END_TEST

static Suite *attention_suite(void) {
    Suite *s = suite_create("attention");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_forward_vs_naive);
    tcase_add_test(tc, test_forward_large_logits);
    tcase_add_test(tc, test_att_invariants);
    tcase_add_test(tc, test_grad_check);
    tcase_add_test(tc, test_backward_accumulates);
    tcase_add_test(tc, test_null_grads);
    tcase_add_test(tc, test_thread_count_invariant);
    tcase_add_test(tc, test_tiled_long_sequences);
    tcase_add_test(tc, test_tiled_dense_same_bits);
    suite_add_tcase(s, tc);
    return s;
}

CHECK_MAIN(attention_suite)

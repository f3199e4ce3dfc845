// cuda/test_cuda_host.cu: the GPU kernels' arithmetic, checked on the host
// (make CUDA=1 test-cuda; built by nvcc, needs no GPU).
//
// Every kernel of cuda/*.cu computes through a __host__ __device__ function
// of its indices (cuda/*_ops.cuh). Here those functions run in plain loops,
// in the kernels' own thread and tree order (the host twins), and the GEMM
// layers run through cuda/layers.cuh on HostBK: the same sequence of
// products and kernels as on the device, with the CPU gemm() in place of
// cuBLAS. The results are compared with the CPU layers (nn.c, attention.c,
// lora.c, optim.c, ddpm.c) by rel_err = max|a - b| / max|b|, at the CPU
// parity tests' tolerances: 1e-5 forward, 1e-4 backward through GEMMs, and
// exactly (0) where the order of operations is the CPU's. Backward is checked
// accumulating (+=) into non-zero gradients, and with NULL gradients.
//
// What this cannot check: cuBLAS's own products and the row-major swap in
// gemm_cuda, launch configurations, and everything else that needs a GPU
// (tools/gpu_check.sh's job, when one is at hand).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <vector>
#include <map>
#include <sys/mman.h>
#include "common.cuh"
#include "nn_ops.cuh"
#include "attention_ops.cuh"
#include "optim_ops.cuh"
#include "ddpm_ops.cuh"
#include "layers.cuh"
#include "mixed_ops.cuh"
extern "C" {
#include "../nn.h"
#include "../lora.h"
#include "../optim.h"
#include "../ddpm.h"
#include "cuda.h"
#include "../unet.h"
#include "../vae.h"
#include "../clip.h"
#include "../half.h"
#include "../backend.h"
#include "../json.h"
}

typedef std::vector<float> vec;

static int g_pass, g_fail;

static double rel_err(const float *a, const float *b, size_t n) {
    double maxd = 0, maxb = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= maxd)) maxd = d;               // NaN propagates
        if (fabs((double)b[i]) > maxb) maxb = fabs((double)b[i]);
    }
    return maxb > 0 ? maxd / maxb : maxd;
}

static void expect(const char *what, double err, double tol) {
    int ok = err <= tol;
    printf("%s %-58s rel err %.3g (tol %g)\n", ok ? "ok  " : "FAIL", what, err, tol);
    if (ok) g_pass++; else g_fail++;
}
static void expect_close(const char *what, const vec &got, const vec &ref, double tol) {
    expect(what, got.size() == ref.size() ? rel_err(got.data(), ref.data(), ref.size()) : INFINITY, tol);
}
static void expect_true(const char *what, int cond) {
    printf("%s %s\n", cond ? "ok  " : "FAIL", what);
    if (cond) g_pass++; else g_fail++;
}

static vec randv(size_t n, float lo, float hi, uint64_t seed) {
    vec v(n);
    rng_t r;
    rng_seed(&r, seed);
    for (size_t i = 0; i < n; i++) v[i] = lo + (hi - lo) * rng_uniform(&r);
    return v;
}

#define FWD 1e-5
#define BWD 1e-4

/* ---------------------------------------------------------------------------
 * HostBK: DevBK's methods (backend.cuh) as host loops over the same
 * functions, each in its kernel's thread order */
// the emulated device's compute mode (mixed_ops.cuh's LOWP_*; gemm.cu's g_compute)
static int g_host_lowp = LOWP_F32;
struct HostBK {
    // as gemm_cuda: in a low-precision mode both operands' spans rounded
    // (round_kernel's function), then fp32 sums (the CPU gemm in its fp32
    // mode on the rounded values: the products are exact either way)
    static void gemm(int tA, int tB, int M, int N, int K, float alpha, const float *A, int lda,
                     const float *B, int ldb, float beta, float *C, int ldc) {
        if (g_host_lowp == LOWP_F32 || K <= 0 || alpha == 0.0f || M <= 0 || N <= 0) {
            ::gemm(tA, tB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
            return;
        }
        size_t na = operand_span(tA ? K : M, tA ? M : K, lda, 0, 1), nb = operand_span(tB ? N : K, tB ? K : N, ldb, 0, 1);
        std::vector<float> ar(na), br(nb);
        for (size_t i = 0; i < na; i++) ar[i] = lowp_round(A[i], g_host_lowp);
        for (size_t i = 0; i < nb; i++) br[i] = lowp_round(B[i], g_host_lowp);
        int cpu_mode = gemm_compute();
        gemm_set_compute(GEMM_F32);
        ::gemm(tA, tB, M, N, K, alpha, ar.data(), lda, br.data(), ldb, beta, C, ldc);
        gemm_set_compute(cpu_mode);
    }
    static int lowp() { return g_host_lowp; }
    static void round_copy(float *dst, const float *src, size_t n) {
        for (size_t i = 0; i < n; i++) dst[i] = lowp_round(src[i], g_host_lowp);
    }
    static void gemm_batched(int tA, int tB, int M, int N, int K, float alpha,
                             const float *A, int lda, long long sA, const float *B, int ldb, long long sB,
                             float beta, float *C, int ldc, long long sC, int batch) {
        for (int k = 0; k < batch; k++)
            ::gemm(tA, tB, M, N, K, alpha, A + k * sA, lda, B + k * sB, ldb, beta, C + k * sC, ldc);
    }
    static float *scratch(size_t n) { return nn_scratch(n); }
    static void fail(const char *what) { fprintf(stderr, "HostBK: %s\n", what); g_fail++; }
    static void add_bias_rows(float *out, const float *b, int N, int C) {
        for (size_t i = 0; i < (size_t)N * C; i++) out[i] = bias_rows_elem(out[i], b, C, i);
    }
    static void add_bias_chan(float *out, const float *b, int B, int O, size_t P) {
        for (size_t i = 0; i < (size_t)B * O * P; i++) out[i] = bias_chan_elem(out[i], b, O, P, i);
    }
    static void bias_grad_rows(float *db, const float *dout, int N, int C) {
        for (int c = 0; c < C; c++) bias_grad_rows_col(db, dout, N, C, c);
    }
    static void bias_grad_chan(float *db, const float *dout, int B, int O, size_t P) {
        double p[NT];
        for (int o = 0; o < O; o++) {
            for (int t = 0; t < NT; t++) p[t] = bias_grad_chan_partial(dout, B, O, P, o, t, NT);
            db[o] += (float)host_tree_sum(p, NT);
        }
    }
    static void conv_fwd(float *out, const float *x, const float *w, const float *b, conv_dims d) {
        for (size_t i = 0; i < (size_t)d.B * d.O * d.Ho * d.Wo; i++) out[i] = conv_fwd_elem(x, w, b, d, i);
    }
    static void conv_dinp(float *dx, const float *dy, const float *w, conv_dims d) {
        for (size_t i = 0; i < (size_t)d.B * d.C * d.H * d.W; i++) dx[i] += conv_dinp_elem(dy, w, d, i);
    }
    static void conv_dw(float *dw, const float *dy, const float *x, conv_dims d) {
        for (size_t i = 0; i < (size_t)d.O * d.C * d.kh * d.kw; i++) dw[i] += conv_dw_elem(dy, x, d, i);
    }
    static void shift_pad(float *xpad, const float *x, conv_dims d, shift_dims s) {
        for (size_t i = 0; i < (size_t)d.C * s.ldx; i++) xpad[i] = shift_pad_elem(x, d, s, i);
    }
    static void shift_wpack(float *wp, const float *w, conv_dims d) {
        for (size_t i = 0; i < (size_t)d.kh * d.kw * d.O * d.C; i++) wp[i] = shift_wpack_elem(w, d, i);
    }
    static void shift_crop(float *out, const float *opad, const float *b, conv_dims d, shift_dims s) {
        for (size_t i = 0; i < (size_t)d.B * d.O * d.Ho * d.Wo; i++) out[i] = shift_crop_elem(opad, b, d, s, i);
    }
    static void shift_dpad(float *dpad, const float *dout, conv_dims d, shift_dims s) {
        for (size_t i = 0; i < (size_t)d.O * s.Nq; i++) dpad[i] = shift_dpad_elem(dout, d, s, i);
    }
    static void shift_dx_add(float *dx, const float *dxpad, conv_dims d, shift_dims s) {
        for (size_t i = 0; i < (size_t)d.B * d.C * d.H * d.W; i++) dx[i] += shift_dx_elem(dxpad, d, s, i);
    }
    static void shift_dw_add(float *dw, const float *dwp, conv_dims d) {
        for (size_t i = 0; i < (size_t)d.O * d.C * d.kh * d.kw; i++) dw[i] += shift_dw_elem(dwp, d, i);
    }
    static void zero(float *p, size_t n) { memset(p, 0, n * sizeof(float)); }
    static void dropout_fwd(float *out, uint8_t *mask, const float *inp, size_t n, float p, uint64_t s0) {
        float sc = dropout_scale(p);
        for (size_t i = 0; i < n; i++) {
            uint8_t keep = p <= 0.0f ? 1 : dropout_keep(s0, i, p);
            mask[i] = keep;
            out[i] = p <= 0.0f ? inp[i] : (keep ? inp[i] * sc : 0.0f);
        }
    }
    static void dropout_rebuild(float *xd, const float *inp, const uint8_t *mask, size_t n, float p) {
        float keep = 1.0f / (1.0f - p);
        for (size_t i = 0; i < n; i++) xd[i] = mask[i] ? inp[i] * keep : 0.0f;
    }
    static void dropout_bwd(float *dinp, const float *dout, const uint8_t *mask, size_t n, float p) {
        for (size_t i = 0; i < n; i++) dinp[i] += dropout_bwd_elem(dout[i], p <= 0.0f ? 1 : mask[i], p);
    }
    static void softmax_rows(float *P, int rows, int Tq, int Tk, int causal) {
        for (int r = 0; r < rows; r++) softmax_row_host(P + (size_t)r * Tk, r % Tq, Tk, causal);
    }
    static void softmax_bwd_rows(float *dS, const float *P, int rows, int Tk) {
        for (int r = 0; r < rows; r++) softmax_bwd_row_host(dS + (size_t)r * Tk, P + (size_t)r * Tk, Tk);
    }
};

/* ---------------------------------------------------------------------------
 * normalisation */

static void test_groupnorm(int B, int C, int HW, int G, int affine) {
    char name[128];
    size_t n = (size_t)B * C * HW;
    vec x = randv(n, -2.0f, 3.0f, 11 + C), w = randv(C, 0.5f, 1.5f, 12), b = randv(C, -0.5f, 0.5f, 13);
    vec y(n), yr(n), m(B * G), mr(B * G), rs(B * G), rsr(B * G);
    const float *pw = affine ? w.data() : NULL, *pb = affine ? b.data() : NULL;
    groupnorm_forward_host(y.data(), m.data(), rs.data(), x.data(), pw, pb, B, C, HW, G, 1e-5f);
    groupnorm_forward(yr.data(), mr.data(), rsr.data(), x.data(), pw, pb, B, C, HW, G, 1e-5f);
    snprintf(name, sizeof name, "groupnorm fwd B%d C%d HW%d G%d%s", B, C, HW, G, affine ? "" : " no-affine");
    expect_close(name, y, yr, FWD);
    snprintf(name, sizeof name, "groupnorm fwd mean, rstd (B%d C%d HW%d G%d)", B, C, HW, G);
    expect(name, fmax(rel_err(m.data(), mr.data(), m.size()), rel_err(rs.data(), rsr.data(), rs.size())), FWD);

    // backward, accumulating into non-zero gradients
    vec dy = randv(n, -1.0f, 1.0f, 14), dx = randv(n, -0.1f, 0.1f, 15), dxr = dx;
    vec dw = randv(C, -0.1f, 0.1f, 16), dwr = dw, db = randv(C, -0.1f, 0.1f, 17), dbr = db;
    vec sums((size_t)B * C * 2);
    float *pdw = affine ? dw.data() : NULL, *pdb = affine ? db.data() : NULL;
    groupnorm_backward_host(dx.data(), pdw, pdb, dy.data(), x.data(), pw, mr.data(), rsr.data(), B, C, HW, G, sums.data());
    for (int c = 0; c < C; c++) gn_wb_fold(pdw, pdb, sums.data(), B, C, c);
    groupnorm_backward(dxr.data(), affine ? dwr.data() : NULL, affine ? dbr.data() : NULL, dy.data(), x.data(), pw,
                       mr.data(), rsr.data(), B, C, HW, G);
    snprintf(name, sizeof name, "groupnorm bwd dx (B%d C%d HW%d G%d)", B, C, HW, G);
    expect_close(name, dx, dxr, BWD);
    if (affine) {
        snprintf(name, sizeof name, "groupnorm bwd dw, db (B%d C%d HW%d G%d)", B, C, HW, G);
        expect(name, fmax(rel_err(dw.data(), dwr.data(), C), rel_err(db.data(), dbr.data(), C)), BWD);
    }
}

static void test_layernorm(int N, int C, int affine) {
    char name[128];
    size_t n = (size_t)N * C;
    vec x = randv(n, -2.0f, 3.0f, 21 + C), w = randv(C, 0.5f, 1.5f, 22), b = randv(C, -0.5f, 0.5f, 23);
    vec y(n), yr(n), m(N), mr(N), rs(N), rsr(N);
    const float *pw = affine ? w.data() : NULL, *pb = affine ? b.data() : NULL;
    layernorm_forward_host(y.data(), m.data(), rs.data(), x.data(), pw, pb, N, C, 1e-5f);
    layernorm_forward(yr.data(), mr.data(), rsr.data(), x.data(), pw, pb, N, C, 1e-5f);
    snprintf(name, sizeof name, "layernorm fwd N%d C%d%s", N, C, affine ? "" : " no-affine");
    expect_close(name, y, yr, FWD);
    snprintf(name, sizeof name, "layernorm fwd mean, rstd (N%d C%d)", N, C);
    expect(name, fmax(rel_err(m.data(), mr.data(), N), rel_err(rs.data(), rsr.data(), N)), FWD);

    vec dy = randv(n, -1.0f, 1.0f, 24), dx = randv(n, -0.1f, 0.1f, 25), dxr = dx;
    vec dw = randv(C, -0.1f, 0.1f, 26), dwr = dw, db = randv(C, -0.1f, 0.1f, 27), dbr = db;
    layernorm_backward_host(dx.data(), affine ? dw.data() : NULL, affine ? db.data() : NULL, dy.data(), x.data(), pw,
                            mr.data(), rsr.data(), N, C);
    layernorm_backward(dxr.data(), affine ? dwr.data() : NULL, affine ? dbr.data() : NULL, dy.data(), x.data(), pw,
                       mr.data(), rsr.data(), N, C);
    snprintf(name, sizeof name, "layernorm bwd dx (N%d C%d)", N, C);
    expect_close(name, dx, dxr, BWD);
    if (affine) {
        snprintf(name, sizeof name, "layernorm bwd dw, db (N%d C%d)", N, C);
        expect(name, fmax(rel_err(dw.data(), dwr.data(), C), rel_err(db.data(), dbr.data(), C)), BWD);
    }
    // dx NULL: only dw, db, and dx untouched
    vec dw2 = randv(C, -0.1f, 0.1f, 26), db2 = randv(C, -0.1f, 0.1f, 27);
    layernorm_backward_host(NULL, dw2.data(), db2.data(), dy.data(), x.data(), pw, mr.data(), rsr.data(), N, C);
    snprintf(name, sizeof name, "layernorm bwd with dx NULL (N%d C%d)", N, C);
    expect(name, affine ? fmax(rel_err(dw2.data(), dwr.data(), C), rel_err(db2.data(), dbr.data(), C)) : 0.0, BWD);
}

/* ---------------------------------------------------------------------------
 * pointwise */

static void test_pointwise(void) {
    size_t n = 5000;
    vec x = randv(n, -8.0f, 8.0f, 31), dy = randv(n, -1.0f, 1.0f, 32), d0 = randv(n, -0.2f, 0.2f, 33);
    struct { const char *name; float (*f)(float); float (*g)(float, float);
             void (*cf)(float *, const float *, size_t); void (*cg)(float *, const float *, const float *, size_t); } acts[] = {
        {"silu", silu_fwd, silu_bwd, silu_forward, silu_backward},
        {"gelu", gelu_fwd, gelu_bwd, gelu_forward, gelu_backward},
        {"quickgelu", quickgelu_fwd, quickgelu_bwd, quickgelu_forward, quickgelu_backward},
    };
    char name[128];
    for (auto &a : acts) {
        vec y(n), yr(n), dx = d0, dxr = d0;
        for (size_t i = 0; i < n; i++) y[i] = a.f(x[i]);
        a.cf(yr.data(), x.data(), n);
        snprintf(name, sizeof name, "%s fwd", a.name);
        expect_close(name, y, yr, FWD);
        for (size_t i = 0; i < n; i++) dx[i] += a.g(dy[i], x[i]);
        a.cg(dxr.data(), dy.data(), x.data(), n);
        snprintf(name, sizeof name, "%s bwd (accumulating)", a.name);
        expect_close(name, dx, dxr, FWD);
    }

    int N = 37, D = 70;
    vec gi = randv((size_t)N * 2 * D, -4.0f, 4.0f, 34), go((size_t)N * D), gor((size_t)N * D);
    vec gdy = randv((size_t)N * D, -1.0f, 1.0f, 35), gdx = randv((size_t)N * 2 * D, -0.1f, 0.1f, 36), gdxr = gdx;
    for (size_t i = 0; i < (size_t)N * D; i++) go[i] = geglu_fwd_elem(gi.data(), D, i / D, (int)(i % D));
    geglu_forward(gor.data(), gi.data(), N, D);
    expect_close("geglu fwd", go, gor, FWD);
    for (size_t i = 0; i < (size_t)N * D; i++) geglu_bwd_elem(gdx.data(), gdy.data(), gi.data(), D, i / D, (int)(i % D));
    geglu_backward(gdxr.data(), gdy.data(), gi.data(), N, D);
    expect_close("geglu bwd (accumulating)", gdx, gdxr, FWD);

    // upsample: the CPU's order of additions, so exactly equal
    int B = 2, C = 3, H = 5, W = 7;
    size_t ni = (size_t)B * C * H * W;
    vec ux = randv(ni, -1.0f, 1.0f, 37), uy(4 * ni), uyr(4 * ni);
    for (size_t i = 0; i < 4 * ni; i++) uy[i] = upsample2x_fwd_elem(ux.data(), H, W, i);
    upsample2x_forward(uyr.data(), ux.data(), B, C, H, W);
    expect_close("upsample2x fwd (exact)", uy, uyr, 0.0);
    vec udy = randv(4 * ni, -1.0f, 1.0f, 38), udx = randv(ni, -0.1f, 0.1f, 39), udxr = udx;
    for (size_t i = 0; i < ni; i++) udx[i] += upsample2x_bwd_elem(udy.data(), H, W, i);
    upsample2x_backward(udxr.data(), udy.data(), B, C, H, W);
    expect_close("upsample2x bwd (exact)", udx, udxr, 0.0);

    // timestep embedding: SD's (320, flip, shift 0) and CLIP-free odd dims
    struct { int dim, flip; float shift; } te[] = {{320, 1, 0.0f}, {33, 0, 1.0f}};
    for (auto &c : te) {
        int Nt = 4;
        float t[4] = {0.0f, 1.0f, 517.0f, 999.0f};
        vec o((size_t)Nt * c.dim), orf((size_t)Nt * c.dim);
        float neg_log = (float)(-log(10000.0)), denom = (float)((double)(c.dim / 2) - (double)c.shift);
        for (size_t i = 0; i < o.size(); i++) o[i] = timestep_elem(t, c.dim, c.flip, neg_log, denom, i / c.dim, (int)(i % c.dim));
        timestep_embedding(orf.data(), t, Nt, c.dim, c.flip, c.shift, 10000.0f);
        snprintf(name, sizeof name, "timestep embedding dim %d flip %d shift %g", c.dim, c.flip, c.shift);
        expect_close(name, o, orf, FWD);
    }
}

/* dropout: the device draws the CPU's stream, so mask and values are equal */
static void test_dropout(void) {
    size_t n = 3001;
    vec x = randv(n, -1.0f, 1.0f, 41);
    for (float p : {0.0f, 0.1f, 0.5f}) {
        vec y(n), yr(n);
        std::vector<uint8_t> m(n), mr(n);
        rng_t r;
        rng_seed(&r, 42);
        uint64_t s0 = r.state;
        HostBK::dropout_fwd(y.data(), m.data(), x.data(), n, p, s0);
        dropout_forward(yr.data(), mr.data(), x.data(), n, p, &r);
        uint64_t s_after = p > 0.0f ? s0 + (uint64_t)n * 0x9E3779B97F4A7C15ULL : s0;
        char name[128];
        snprintf(name, sizeof name, "dropout p=%g: mask, values and rng state exact", p);
        expect_true(name, m == mr && rel_err(y.data(), yr.data(), n) == 0.0 && r.state == s_after);
        vec dy = randv(n, -1.0f, 1.0f, 43), dx = randv(n, -0.1f, 0.1f, 44), dxr = dx;
        HostBK::dropout_bwd(dx.data(), dy.data(), m.data(), n, p);
        dropout_backward(dxr.data(), dy.data(), mr.data(), n, p);
        snprintf(name, sizeof name, "dropout p=%g bwd (accumulating, exact)", p);
        expect_close(name, dx, dxr, 0.0);
    }
}

/* ---------------------------------------------------------------------------
 * GEMM layers through layers.cuh on HostBK */

static void test_linear(int N, int in, int out, int bias) {
    vec x = randv((size_t)N * in, -1.0f, 1.0f, 51), w = randv((size_t)out * in, -0.3f, 0.3f, 52), b = randv(out, -1.0f, 1.0f, 53);
    vec y((size_t)N * out), yr((size_t)N * out);
    linear_forward_t<HostBK>(y.data(), x.data(), w.data(), bias ? b.data() : NULL, N, in, out);
    linear_forward(yr.data(), x.data(), w.data(), bias ? b.data() : NULL, N, in, out);
    char name[128];
    snprintf(name, sizeof name, "linear fwd N%d %d->%d%s", N, in, out, bias ? "" : " no-bias");
    expect_close(name, y, yr, FWD);
    vec dy = randv((size_t)N * out, -1.0f, 1.0f, 54), dx = randv((size_t)N * in, -0.1f, 0.1f, 55), dxr = dx;
    vec dw = randv((size_t)out * in, -0.1f, 0.1f, 56), dwr = dw, db = randv(out, -0.1f, 0.1f, 57), dbr = db;
    linear_backward_t<HostBK>(dx.data(), dw.data(), bias ? db.data() : NULL, dy.data(), x.data(), w.data(), N, in, out);
    linear_backward(dxr.data(), dwr.data(), bias ? dbr.data() : NULL, dy.data(), x.data(), w.data(), N, in, out);
    snprintf(name, sizeof name, "linear bwd dx, dw, db N%d %d->%d", N, in, out);
    expect(name, fmax(fmax(rel_err(dx.data(), dxr.data(), dx.size()), rel_err(dw.data(), dwr.data(), dw.size())),
                      rel_err(db.data(), dbr.data(), out)), BWD);
}

static void test_conv(int B, int C, int H, int W, int O, int kh, int kw, int stride, int pad) {
    int Ho = (H + 2 * pad - kh) / stride + 1, Wo = (W + 2 * pad - kw) / stride + 1;
    size_t nx = (size_t)B * C * H * W, ny = (size_t)B * O * Ho * Wo, nw = (size_t)O * C * kh * kw;
    vec x = randv(nx, -1.0f, 1.0f, 61), w = randv(nw, -0.3f, 0.3f, 62), b = randv(O, -1.0f, 1.0f, 63);
    vec y(ny), yr(ny);
    conv2d_forward_t<HostBK>(y.data(), x.data(), w.data(), b.data(), B, C, H, W, O, kh, kw, stride, pad);
    conv2d_forward(yr.data(), x.data(), w.data(), b.data(), B, C, H, W, O, kh, kw, stride, pad);
    char name[128];
    snprintf(name, sizeof name, "conv2d fwd B%d C%d %dx%d O%d k%dx%d s%d p%d", B, C, H, W, O, kh, kw, stride, pad);
    expect_close(name, y, yr, FWD);
    vec dy = randv(ny, -1.0f, 1.0f, 64), dx = randv(nx, -0.1f, 0.1f, 65), dxr = dx;
    vec dw = randv(nw, -0.1f, 0.1f, 66), dwr = dw, db = randv(O, -0.1f, 0.1f, 67), dbr = db;
    conv2d_backward_t<HostBK>(dx.data(), dw.data(), db.data(), dy.data(), x.data(), w.data(), B, C, H, W, O, kh, kw, stride, pad);
    conv2d_backward(dxr.data(), dwr.data(), dbr.data(), dy.data(), x.data(), w.data(), B, C, H, W, O, kh, kw, stride, pad);
    snprintf(name, sizeof name, "conv2d bwd dx (k%dx%d s%d p%d)", kh, kw, stride, pad);
    expect_close(name, dx, dxr, BWD);
    snprintf(name, sizeof name, "conv2d bwd dw, db (k%dx%d s%d p%d)", kh, kw, stride, pad);
    expect(name, fmax(rel_err(dw.data(), dwr.data(), nw), rel_err(db.data(), dbr.data(), O)), BWD);
    // the direct kernel (used for strided convs) on every shape too (fp32:
    // in a low-precision mode conv2d_*_t rounds its operands first)
    conv_dims d = make_conv_dims(B, C, H, W, O, kh, kw, stride, pad);
    if (!HostBK::lowp()) {
    vec y3(ny), dx3 = randv(nx, -0.1f, 0.1f, 65), dw3 = randv(nw, -0.1f, 0.1f, 66);
    HostBK::conv_fwd(y3.data(), x.data(), w.data(), b.data(), d);
    HostBK::conv_dinp(dx3.data(), dy.data(), w.data(), d);
    HostBK::conv_dw(dw3.data(), dy.data(), x.data(), d);
    snprintf(name, sizeof name, "conv2d direct kernel fwd (k%dx%d s%d p%d)", kh, kw, stride, pad);
    expect(name, rel_err(y3.data(), yr.data(), ny), FWD);
    snprintf(name, sizeof name, "conv2d direct kernel bwd dx, dw (k%dx%d s%d p%d)", kh, kw, stride, pad);
    expect(name, fmax(rel_err(dx3.data(), dxr.data(), nx), rel_err(dw3.data(), dwr.data(), nw)), BWD);
    }
    // frozen weight (dw, db NULL): dx only
    vec dx2 = randv(nx, -0.1f, 0.1f, 65);
    conv2d_backward_t<HostBK>(dx2.data(), NULL, NULL, dy.data(), x.data(), w.data(), B, C, H, W, O, kh, kw, stride, pad);
    snprintf(name, sizeof name, "conv2d bwd frozen weight, dx only (k%dx%d s%d p%d)", kh, kw, stride, pad);
    expect_close(name, dx2, dxr, BWD);
}

static void test_attention(int B, int Tq, int Tk, int H, int Dh, int causal, int keep_att) {
    int C = H * Dh;
    size_t nq = (size_t)B * Tq * C, nk = (size_t)B * Tk * C, na = (size_t)B * H * Tq * Tk;
    vec q = randv(nq, -1.5f, 1.5f, 71), k = randv(nk, -1.5f, 1.5f, 72), v = randv(nk, -1.0f, 1.0f, 73);
    vec o(nq), orf(nq), att(na), attr(na);
    attention_forward_t<HostBK>(o.data(), keep_att ? att.data() : NULL, q.data(), k.data(), v.data(), B, Tq, Tk, H, Dh, causal);
    attention_forward(orf.data(), attr.data(), q.data(), k.data(), v.data(), B, Tq, Tk, H, Dh, causal);
    char name[160], tag[96];
    snprintf(tag, sizeof tag, "B%d Tq%d Tk%d H%d Dh%d%s att=%s", B, Tq, Tk, H, Dh, causal ? " causal" : "",
             keep_att ? "kept" : "NULL");
    snprintf(name, sizeof name, "attention fwd out (%s)", tag);
    expect_close(name, o, orf, FWD);
    if (keep_att) {
        snprintf(name, sizeof name, "attention fwd probabilities (%s)", tag);
        expect_close(name, att, attr, FWD);
    }
    vec dout = randv(nq, -1.0f, 1.0f, 74);
    vec dq = randv(nq, -0.1f, 0.1f, 75), dqr = dq, dk = randv(nk, -0.1f, 0.1f, 76), dkr = dk, dv = randv(nk, -0.1f, 0.1f, 77), dvr = dv;
    attention_backward_t<HostBK>(dq.data(), dk.data(), dv.data(), dout.data(), q.data(), k.data(), v.data(),
                                 keep_att ? att.data() : NULL, B, Tq, Tk, H, Dh, causal);
    attention_backward(dqr.data(), dkr.data(), dvr.data(), dout.data(), q.data(), k.data(), v.data(), attr.data(),
                       B, Tq, Tk, H, Dh, causal);
    snprintf(name, sizeof name, "attention bwd dq (%s)", tag);
    expect_close(name, dq, dqr, BWD);
    snprintf(name, sizeof name, "attention bwd dk (%s)", tag);
    expect_close(name, dk, dkr, BWD);
    snprintf(name, sizeof name, "attention bwd dv (%s)", tag);
    expect_close(name, dv, dvr, BWD);
    // dv only (dq, dk NULL: no dS at all)
    vec dv2 = randv(nk, -0.1f, 0.1f, 77);
    attention_backward_t<HostBK>(NULL, NULL, dv2.data(), dout.data(), q.data(), k.data(), v.data(),
                                 keep_att ? att.data() : NULL, B, Tq, Tk, H, Dh, causal);
    snprintf(name, sizeof name, "attention bwd dv only (%s)", tag);
    expect_close(name, dv2, dvr, BWD);
}

static void test_lora(int N, int in, int out, int r, float dropout) {
    vec x = randv((size_t)N * in, -1.0f, 1.0f, 81), w0 = randv((size_t)out * in, -0.3f, 0.3f, 82), b0 = randv(out, -1.0f, 1.0f, 83);
    vec A = randv((size_t)r * in, -0.3f, 0.3f, 84), Bm = randv((size_t)out * r, -0.3f, 0.3f, 85);  // B != 0: a trained adapter
    lora_t L, Lr;
    rng_t init;
    rng_seed(&init, 1);
    vec A0((size_t)r * in), B0((size_t)out * r);
    lora_init(&L, in, out, r, 8.0f, dropout, A0.data(), B0.data(), 0, &init);
    L.A = A.data(); L.B = Bm.data();
    Lr = L;
    vec dA = randv((size_t)r * in, -0.1f, 0.1f, 86), dAr = dA, dB = randv((size_t)out * r, -0.1f, 0.1f, 87), dBr = dB;
    L.dA = dA.data(); L.dB = dB.data();
    Lr.dA = dAr.data(); Lr.dB = dBr.data();
    size_t ns = lora_scratch_floats(&L, N);
    vec y((size_t)N * out), yr((size_t)N * out), ax((size_t)N * r), axr((size_t)N * r), s(ns + 1), sr(ns + 1);
    std::vector<uint8_t> m((size_t)N * in), mr((size_t)N * in);
    rng_t g1, g2;
    rng_seed(&g1, 99); rng_seed(&g2, 99);
    lora_forward_t<HostBK>(y.data(), ax.data(), m.data(), s.data(), x.data(), w0.data(), b0.data(), &L, N, in, out, &g1);
    lora_forward(yr.data(), axr.data(), mr.data(), sr.data(), x.data(), w0.data(), b0.data(), &Lr, N, in, out, &g2);
    char name[128], tag[64];
    snprintf(tag, sizeof tag, "N%d %d->%d r%d dropout %g", N, in, out, r, dropout);
    snprintf(name, sizeof name, "lora fwd out, ax (%s)", tag);
    expect(name, fmax(rel_err(y.data(), yr.data(), y.size()), rel_err(ax.data(), axr.data(), ax.size())), FWD);
    if (dropout > 0.0f) {
        snprintf(name, sizeof name, "lora fwd dropout mask and rng state exact (%s)", tag);
        expect_true(name, m == mr && g1.state == g2.state);
    }
    vec dy = randv((size_t)N * out, -1.0f, 1.0f, 88), dx = randv((size_t)N * in, -0.1f, 0.1f, 89), dxr = dx;
    lora_backward_t<HostBK>(dx.data(), dy.data(), x.data(), ax.data(), m.data(), s.data(), w0.data(), &L, N, in, out);
    lora_backward(dxr.data(), dy.data(), x.data(), axr.data(), mr.data(), sr.data(), w0.data(), &Lr, N, in, out);
    snprintf(name, sizeof name, "lora bwd dx (%s)", tag);
    expect_close(name, dx, dxr, BWD);
    snprintf(name, sizeof name, "lora bwd dA, dB (%s)", tag);
    expect(name, fmax(rel_err(dA.data(), dAr.data(), dA.size()), rel_err(dB.data(), dBr.data(), dB.size())), BWD);
    // frozen adapter (dA, dB NULL) and no dx: nothing may be written
    vec dA2 = dA;
    L.dA = NULL; L.dB = NULL;
    lora_backward_t<HostBK>(NULL, dy.data(), x.data(), ax.data(), m.data(), s.data(), w0.data(), &L, N, in, out);
    snprintf(name, sizeof name, "lora bwd, all gradients NULL, writes nothing (%s)", tag);
    expect_true(name, dA2 == dA);
}

/* ---------------------------------------------------------------------------
 * AdamW: the CPU's formula term for term, so equal bit for bit */
static void test_adamw(void) {
    size_t n = 1000;
    vec p = randv(n, -1.0f, 1.0f, 91), pr = p;
    adamw_t o, orf;
    adamw_init(&o, n, 1e-3f, 0.9f, 0.999f, 1e-8f, 1e-2f);
    adamw_init(&orf, n, 1e-3f, 0.9f, 0.999f, 1e-8f, 1e-2f);
    int exact = 1;
    for (int step = 0; step < 5; step++) {
        vec g = randv(n, -0.5f, 0.5f, 92 + step);
        float lr = 1e-3f * (step + 1) / 5.0f;
        o.step++;
        double bc1 = 1.0 - pow(o.beta1, (double)o.step), bc2 = 1.0 - pow(o.beta2, (double)o.step);
        adamw_coef k = {o.beta1, o.beta2, o.eps, (float)(lr / bc1), (float)sqrt(bc2), (float)(1.0 - (double)lr * o.weight_decay)};
        for (size_t i = 0; i < n; i++) adamw_elem(p.data(), o.m, o.v, g.data(), k, i);
        adamw_step(&orf, pr.data(), g.data(), lr);
        exact &= memcmp(p.data(), pr.data(), n * sizeof(float)) == 0 && memcmp(o.m, orf.m, n * sizeof(float)) == 0 &&
                 memcmp(o.v, orf.v, n * sizeof(float)) == 0;
    }
    expect_true("adamw 5 steps: params, m, v bit-identical to optim.c", exact);
    adamw_free(&o);
    adamw_free(&orf);
}

/* ---------------------------------------------------------------------------
 * ddpm */
// SD's scaled-linear schedule (DDPM_SD_*); a failure is a failed check
static int sd_schedule(ddpm_schedule *s) {
    char err[DDPM_ERR_LEN];
    if (ddpm_schedule_init(s, "scaled_linear", DDPM_SD_T, DDPM_SD_BETA_START, DDPM_SD_BETA_END, err) == 0) return 1;
    expect_true(err, 0);
    return 0;
}
static void test_ddpm(void) {
    ddpm_schedule s;
    if (!sd_schedule(&s)) return;
    int B = 3;
    size_t n = 4 * 9 * 11;
    int t[3] = {0, 411, 999};
    vec x0 = randv(B * n, -1.0f, 1.0f, 101), eps = randv(B * n, -2.0f, 2.0f, 102);
    vec xt(B * n), xtr(B * n), v(B * n), vr(B * n);
    for (size_t i = 0; i < B * n; i++) xt[i] = add_noise_elem(x0.data(), eps.data(), t, s.sqrt_abar, s.sqrt_1m_abar, n, i);
    ddpm_add_noise(xtr.data(), x0.data(), eps.data(), t, B, n, &s);
    expect_close("ddpm add_noise (exact)", xt, xtr, 0.0);
    for (size_t i = 0; i < B * n; i++) v[i] = velocity_elem(x0.data(), eps.data(), t, s.sqrt_abar, s.sqrt_1m_abar, n, i);
    ddpm_velocity(vr.data(), x0.data(), eps.data(), t, B, n, &s);
    expect_close("ddpm velocity (exact)", v, vr, 0.0);

    float w[3] = {1.0f, 0.25f, 2.5f};
    for (int weighted = 0; weighted < 2; weighted++) {
        const float *pw = weighted ? w : NULL;
        float L = mse_loss_host(xt.data(), eps.data(), pw, B, n);
        float Lr = mse_loss_forward(xt.data(), eps.data(), pw, B, n);
        expect(weighted ? "mse loss fwd, min-SNR weights" : "mse loss fwd", fabs(L - Lr) / fabs(Lr), FWD);
        vec d = randv(B * n, -0.1f, 0.1f, 103), dr = d;
        for (size_t i = 0; i < B * n; i++) {
            float k = mse_grad_coef(0.5f, pw, B, n, (int)(i / n));
            d[i] += mse_bwd_elem(xt.data(), eps.data(), k, i);
        }
        mse_loss_backward(dr.data(), xt.data(), eps.data(), pw, 0.5f, B, n);
        expect_close(weighted ? "mse loss bwd, weighted, dloss 1/2 (exact)" : "mse loss bwd, dloss 1/2 (exact)", d, dr, 0.0);
    }
    ddpm_free(&s);
}

/* ---------------------------------------------------------------------------
 * the no-GPU path: a clear one-line error, and recorded errors that name
 * the call and the layer */
static void test_device_check(void) {
    char err[CUDA_ERR_LEN];
    int st = cuda_device_check(err);
    printf("note: cuda_device_check: %d %s\n", st, st ? err : "(a usable GPU)");
    if (st == CUDA_DEV_OK) {
        expect_true("cuda_device_check OK agrees with cuda_available()", cuda_available() == 1);
        return;
    }
    expect_true("cuda_device_check: no GPU here, cuda_available() says 0", cuda_available() == 0);
    expect_true("cuda_device_check: says which case (no driver / no device)",
                st == CUDA_DEV_NO_DRIVER || st == CUDA_DEV_NO_DEVICE);
    expect_true("cuda_device_check: one line, \"error: --device cuda: ... (... --device cpu)\"",
                strncmp(err, "error: --device cuda: ", 22) == 0 && !strchr(err, '\n') && strstr(err, "--device cpu)"));

    // without a GPU every call fails; the first failure is kept, one line
    expect_true("cuda_last_error: NULL before any call", cuda_last_error() == NULL);
    cuda_set_layer("down_blocks.0.attentions.0.proj_in");
    float dummy = 0.0f;
    linear_forward_cuda(&dummy, &dummy, &dummy, NULL, 1, 1, 1);
    silu_forward_cuda(&dummy, &dummy, 1);
    const char *e = cuda_last_error();
    printf("note: recorded: %s\n", e ? e : "(none)");
    expect_true("gemm without a GPU: one line naming cublasCreate, the function and the layer",
                e && strncmp(e, "error: CUDA: cublasCreate failed in cuda_cublas (layer down_blocks.0.attentions.0.proj_in): ", 90) == 0 &&
                !strchr(e, '\n'));
    expect_true("cuda_last_error: cleared after it is read", cuda_last_error() == NULL);
    cuda_set_layer(NULL);
    silu_forward_cuda(&dummy, &dummy, 1);
    e = cuda_last_error();
    printf("note: recorded: %s\n", e ? e : "(none)");
    expect_true("kernel launch without a GPU: one line naming the kernel and the function",
                e && strstr(e, "silu_forward_kernel<<<>>> failed in silu_forward_cuda: ") && !strchr(e, '\n'));
}

/* ---------------------------------------------------------------------------
 * On a machine with a GPU only: the *_cuda functions themselves against the
 * CPU code, same tolerances. (Written without a GPU at hand: this part has
 * not run yet; tools/gpu_check.sh is where it will.) */
static std::vector<void *> g_dev;
static float *up(const vec &v) {
    float *p = (float *)cuda_alloc(v.size() * sizeof(float) + 4);
    if (p) { g_dev.push_back(p); cuda_upload(p, v.data(), v.size() * sizeof(float)); }
    return p;
}
static float *dzeros(size_t n) { return up(vec(n, 0.0f)); }
static vec down(const float *p, size_t n) {
    vec v(n, NAN);
    if (p) cuda_download(v.data(), p, n * sizeof(float));
    return v;
}
static void dev_done(const char *what) {
    cuda_synchronize();
    const char *e = cuda_last_error();
    char name[160];
    snprintf(name, sizeof name, "device %s: no CUDA error%s%s", what, e ? ": " : "", e ? e : "");
    expect_true(name, e == NULL);
    for (void *p : g_dev) cuda_free(p);
    g_dev.clear();
}

static void dev_nn(void) {
    char name[128];
    // group norm and layer norm, forward and backward (accumulating)
    int B = 2, C = 32, HW = 64, G = 8;
    size_t n = (size_t)B * C * HW;
    vec x = randv(n, -2.0f, 3.0f, 11), w = randv(C, 0.5f, 1.5f, 12), b = randv(C, -0.5f, 0.5f, 13);
    vec y(n), m(B * G), rs(B * G);
    groupnorm_forward(y.data(), m.data(), rs.data(), x.data(), w.data(), b.data(), B, C, HW, G, 1e-5f);
    float *dx_ = up(x), *dw_ = up(w), *db_ = up(b), *dy_ = dzeros(n), *dm = dzeros(B * G), *drs = dzeros(B * G);
    groupnorm_forward_cuda(dy_, dm, drs, dx_, dw_, db_, B, C, HW, G, 1e-5f);
    expect_close("device groupnorm fwd", down(dy_, n), y, FWD);
    vec g = randv(n, -1.0f, 1.0f, 14), gx = randv(n, -0.1f, 0.1f, 15), gw = randv(C, -0.1f, 0.1f, 16), gb = gw;
    float *dg = up(g), *dgx = up(gx), *dgw = up(gw), *dgb = up(gb), *dmr = up(m), *drsr = up(rs);
    groupnorm_backward(gx.data(), gw.data(), gb.data(), g.data(), x.data(), w.data(), m.data(), rs.data(), B, C, HW, G);
    groupnorm_backward_cuda(dgx, dgw, dgb, dg, dx_, dw_, dmr, drsr, B, C, HW, G);
    expect_close("device groupnorm bwd dx", down(dgx, n), gx, BWD);
    expect(("device groupnorm bwd dw, db"), fmax(rel_err(down(dgw, C).data(), gw.data(), C), rel_err(down(dgb, C).data(), gb.data(), C)), BWD);

    int N = 37;
    int Cl = 320;
    size_t nl = (size_t)N * Cl;
    vec lx = randv(nl, -2.0f, 3.0f, 21), lw = randv(Cl, 0.5f, 1.5f, 22), lb = randv(Cl, -0.5f, 0.5f, 23), ly(nl), lm(N), lr(N);
    layernorm_forward(ly.data(), lm.data(), lr.data(), lx.data(), lw.data(), lb.data(), N, Cl, 1e-5f);
    float *dlx = up(lx), *dlw = up(lw), *dlb = up(lb), *dly = dzeros(nl), *dlm = dzeros(N), *dlr = dzeros(N);
    layernorm_forward_cuda(dly, dlm, dlr, dlx, dlw, dlb, N, Cl, 1e-5f);
    expect_close("device layernorm fwd", down(dly, nl), ly, FWD);
    vec lg = randv(nl, -1.0f, 1.0f, 24), lgx = randv(nl, -0.1f, 0.1f, 25), lgw = randv(Cl, -0.1f, 0.1f, 26), lgb = lgw;
    float *dlg = up(lg), *dlgx = up(lgx), *dlgw = up(lgw), *dlgb = up(lgb);
    layernorm_backward(lgx.data(), lgw.data(), lgb.data(), lg.data(), lx.data(), lw.data(), lm.data(), lr.data(), N, Cl);
    layernorm_backward_cuda(dlgx, dlgw, dlgb, dlg, dlx, dlw, dlm, dlr, N, Cl);
    expect_close("device layernorm bwd dx", down(dlgx, nl), lgx, BWD);
    expect("device layernorm bwd dw, db", fmax(rel_err(down(dlgw, Cl).data(), lgw.data(), Cl), rel_err(down(dlgb, Cl).data(), lgb.data(), Cl)), BWD);

    // activations
    size_t na = 5000;
    vec ax = randv(na, -8.0f, 8.0f, 31), ady = randv(na, -1.0f, 1.0f, 32);
    float *dax = up(ax), *dady = up(ady);
    struct { const char *nm; void (*cf)(float *, const float *, size_t); void (*cb)(float *, const float *, const float *, size_t);
             void (*gf)(float *, const float *, size_t); void (*gb)(float *, const float *, const float *, size_t); } acts[] = {
        {"silu", silu_forward, silu_backward, silu_forward_cuda, silu_backward_cuda},
        {"gelu", gelu_forward, gelu_backward, gelu_forward_cuda, gelu_backward_cuda},
        {"quickgelu", quickgelu_forward, quickgelu_backward, quickgelu_forward_cuda, quickgelu_backward_cuda},
    };
    for (auto &a : acts) {
        vec r(na), rd = randv(na, -0.1f, 0.1f, 33);
        float *o = dzeros(na), *od = up(rd);
        a.cf(r.data(), ax.data(), na);
        a.gf(o, dax, na);
        snprintf(name, sizeof name, "device %s fwd", a.nm);
        expect_close(name, down(o, na), r, FWD);
        a.cb(rd.data(), ady.data(), ax.data(), na);
        a.gb(od, dady, dax, na);
        snprintf(name, sizeof name, "device %s bwd", a.nm);
        expect_close(name, down(od, na), rd, FWD);
    }
    int Ng = 37, D = 70;
    vec gi = randv((size_t)Ng * 2 * D, -4.0f, 4.0f, 34), go((size_t)Ng * D), gdy = randv((size_t)Ng * D, -1.0f, 1.0f, 35);
    vec gdx = randv((size_t)Ng * 2 * D, -0.1f, 0.1f, 36);
    float *dgi = up(gi), *dgo = dzeros(go.size()), *dgdy = up(gdy), *dgdx = up(gdx);
    geglu_forward(go.data(), gi.data(), Ng, D);
    geglu_forward_cuda(dgo, dgi, Ng, D);
    expect_close("device geglu fwd", down(dgo, go.size()), go, FWD);
    geglu_backward(gdx.data(), gdy.data(), gi.data(), Ng, D);
    geglu_backward_cuda(dgdx, dgdy, dgi, Ng, D);
    expect_close("device geglu bwd", down(dgdx, gdx.size()), gdx, FWD);

    int Bu = 2, Cu = 3, H = 5, W = 7;
    size_t ni = (size_t)Bu * Cu * H * W;
    vec ux = randv(ni, -1.0f, 1.0f, 37), uy(4 * ni), udy = randv(4 * ni, -1.0f, 1.0f, 38), udx = randv(ni, -0.1f, 0.1f, 39);
    float *dux = up(ux), *duy = dzeros(4 * ni), *dudy = up(udy), *dudx = up(udx);
    upsample2x_forward(uy.data(), ux.data(), Bu, Cu, H, W);
    upsample2x_forward_cuda(duy, dux, Bu, Cu, H, W);
    expect_close("device upsample2x fwd (exact)", down(duy, 4 * ni), uy, 0.0);
    upsample2x_backward(udx.data(), udy.data(), Bu, Cu, H, W);
    upsample2x_backward_cuda(dudx, dudy, Bu, Cu, H, W);
    expect_close("device upsample2x bwd (exact)", down(dudx, ni), udx, 0.0);

    vec t = {0.0f, 1.0f, 517.0f, 999.0f}, te(4 * 320);
    float *dt = up(t), *dte = dzeros(te.size());
    timestep_embedding(te.data(), t.data(), 4, 320, 1, 0.0f, 10000.0f);
    timestep_embedding_cuda(dte, dt, 4, 320, 1, 0.0f, 10000.0f);
    expect_close("device timestep embedding", down(dte, te.size()), te, FWD);

    // dropout: the same mask from the same rng state
    size_t nd = 3001;
    vec dxv = randv(nd, -1.0f, 1.0f, 41), dyv(nd);
    std::vector<uint8_t> mk(nd), mkd(nd);
    uint8_t *dmk = (uint8_t *)cuda_alloc(nd);
    g_dev.push_back(dmk);
    float *ddx = up(dxv), *ddy = dzeros(nd);
    rng_t r1, r2;
    rng_seed(&r1, 42); rng_seed(&r2, 42);
    dropout_forward(dyv.data(), mk.data(), dxv.data(), nd, 0.1f, &r1);
    dropout_forward_cuda(ddy, dmk, ddx, nd, 0.1f, &r2);
    if (dmk) cuda_download(mkd.data(), dmk, nd);
    expect_true("device dropout: mask, values and rng state exact",
                mk == mkd && rel_err(down(ddy, nd).data(), dyv.data(), nd) == 0.0 && r1.state == r2.state);
    dev_done("nn primitives");
}

static void dev_layers(void) {
    char name[160];
    // linear
    int N = 29, in = 48, out = 33;
    vec x = randv((size_t)N * in, -1.0f, 1.0f, 51), w = randv((size_t)out * in, -0.3f, 0.3f, 52), b = randv(out, -1.0f, 1.0f, 53);
    vec y((size_t)N * out), dy = randv(y.size(), -1.0f, 1.0f, 54), dx = randv(x.size(), -0.1f, 0.1f, 55), dw = randv(w.size(), -0.1f, 0.1f, 56), db = randv(out, -0.1f, 0.1f, 57);
    float *px = up(x), *pw = up(w), *pb = up(b), *py = dzeros(y.size()), *pdy = up(dy), *pdx = up(dx), *pdw = up(dw), *pdb = up(db);
    linear_forward(y.data(), x.data(), w.data(), b.data(), N, in, out);
    linear_forward_cuda(py, px, pw, pb, N, in, out);
    expect_close("device linear fwd", down(py, y.size()), y, FWD);
    linear_backward(dx.data(), dw.data(), db.data(), dy.data(), x.data(), w.data(), N, in, out);
    linear_backward_cuda(pdx, pdw, pdb, pdy, px, pw, N, in, out);
    expect("device linear bwd dx, dw, db", fmax(fmax(rel_err(down(pdx, dx.size()).data(), dx.data(), dx.size()),
                                                     rel_err(down(pdw, dw.size()).data(), dw.data(), dw.size())),
                                                rel_err(down(pdb, out).data(), db.data(), out)), BWD);
    // conv2d: resnet 3x3, downsampler, 1x1 (cuBLAS)
    int cs[3][9] = {{2, 5, 9, 8, 6, 3, 3, 1, 1}, {1, 4, 9, 10, 3, 3, 3, 2, 1}, {2, 6, 5, 7, 4, 1, 1, 1, 0}};
    for (auto &c : cs) {
        int Bc = c[0], C = c[1], H = c[2], W = c[3], O = c[4], kh = c[5], kw = c[6], st = c[7], pd = c[8];
        int Ho = (H + 2 * pd - kh) / st + 1, Wo = (W + 2 * pd - kw) / st + 1;
        size_t nx = (size_t)Bc * C * H * W, ny = (size_t)Bc * O * Ho * Wo, nw = (size_t)O * C * kh * kw;
        vec cx = randv(nx, -1.0f, 1.0f, 61), cw = randv(nw, -0.3f, 0.3f, 62), cb = randv(O, -1.0f, 1.0f, 63), cy(ny);
        vec cdy = randv(ny, -1.0f, 1.0f, 64), cdx = randv(nx, -0.1f, 0.1f, 65), cdw = randv(nw, -0.1f, 0.1f, 66), cdb = randv(O, -0.1f, 0.1f, 67);
        float *qx = up(cx), *qw = up(cw), *qb = up(cb), *qy = dzeros(ny), *qdy = up(cdy), *qdx = up(cdx), *qdw = up(cdw), *qdb = up(cdb);
        conv2d_forward(cy.data(), cx.data(), cw.data(), cb.data(), Bc, C, H, W, O, kh, kw, st, pd);
        conv2d_forward_cuda(qy, qx, qw, qb, Bc, C, H, W, O, kh, kw, st, pd);
        snprintf(name, sizeof name, "device conv2d fwd k%dx%d s%d", kh, kw, st);
        expect_close(name, down(qy, ny), cy, FWD);
        conv2d_backward(cdx.data(), cdw.data(), cdb.data(), cdy.data(), cx.data(), cw.data(), Bc, C, H, W, O, kh, kw, st, pd);
        conv2d_backward_cuda(qdx, qdw, qdb, qdy, qx, qw, Bc, C, H, W, O, kh, kw, st, pd);
        snprintf(name, sizeof name, "device conv2d bwd dx, dw, db k%dx%d s%d", kh, kw, st);
        expect(name, fmax(fmax(rel_err(down(qdx, nx).data(), cdx.data(), nx), rel_err(down(qdw, nw).data(), cdw.data(), nw)),
                          rel_err(down(qdb, O).data(), cdb.data(), O)), BWD);
    }
    // attention: self, cross with P recomputed, causal with rows longer than a block
    int as[3][7] = {{2, 13, 13, 3, 8, 0, 1}, {1, 21, 7, 2, 16, 0, 0}, {1, 300, 300, 2, 8, 1, 0}};
    for (auto &a : as) {
        int Ba = a[0], Tq = a[1], Tk = a[2], Hh = a[3], Dh = a[4], causal = a[5], keep = a[6], C = Hh * Dh;
        size_t nq = (size_t)Ba * Tq * C, nk = (size_t)Ba * Tk * C, na = (size_t)Ba * Hh * Tq * Tk;
        vec q = randv(nq, -1.5f, 1.5f, 71), k = randv(nk, -1.5f, 1.5f, 72), v = randv(nk, -1.0f, 1.0f, 73), o(nq), att(na);
        vec dO = randv(nq, -1.0f, 1.0f, 74), dq = randv(nq, -0.1f, 0.1f, 75), dk = randv(nk, -0.1f, 0.1f, 76), dv = randv(nk, -0.1f, 0.1f, 77);
        float *pq = up(q), *pk = up(k), *pv = up(v), *po = dzeros(nq), *pa = keep ? dzeros(na) : NULL;
        float *pdO = up(dO), *pdq = up(dq), *pdk = up(dk), *pdv = up(dv);
        attention_forward(o.data(), att.data(), q.data(), k.data(), v.data(), Ba, Tq, Tk, Hh, Dh, causal);
        attention_forward_cuda(po, pa, pq, pk, pv, Ba, Tq, Tk, Hh, Dh, causal);
        snprintf(name, sizeof name, "device attention fwd Tq%d Tk%d%s", Tq, Tk, causal ? " causal" : "");
        expect_close(name, down(po, nq), o, FWD);
        attention_backward(dq.data(), dk.data(), dv.data(), dO.data(), q.data(), k.data(), v.data(), att.data(), Ba, Tq, Tk, Hh, Dh, causal);
        attention_backward_cuda(pdq, pdk, pdv, pdO, pq, pk, pv, pa, Ba, Tq, Tk, Hh, Dh, causal);
        snprintf(name, sizeof name, "device attention bwd dq, dk, dv Tq%d Tk%d%s", Tq, Tk, causal ? " causal" : "");
        expect(name, fmax(fmax(rel_err(down(pdq, nq).data(), dq.data(), nq), rel_err(down(pdk, nk).data(), dk.data(), nk)),
                          rel_err(down(pdv, nk).data(), dv.data(), nk)), BWD);
    }
    dev_done("linear, conv2d, attention");
}

static void dev_lora_optim_ddpm(void) {
    for (float p : {0.0f, 0.25f}) {
        int N = 11, in = 33, out = 17, r = 3;
        vec x = randv((size_t)N * in, -1.0f, 1.0f, 81), w0 = randv((size_t)out * in, -0.3f, 0.3f, 82), b0 = randv(out, -1.0f, 1.0f, 83);
        vec A = randv((size_t)r * in, -0.3f, 0.3f, 84), Bm = randv((size_t)out * r, -0.3f, 0.3f, 85);
        vec dA = randv(A.size(), -0.1f, 0.1f, 86), dB = randv(Bm.size(), -0.1f, 0.1f, 87);
        lora_t L, Ld;
        rng_t init;
        rng_seed(&init, 1);
        vec A0(A.size()), B0(Bm.size());
        lora_init(&L, in, out, r, 8.0f, p, A0.data(), B0.data(), 0, &init);
        Ld = L;
        L.A = A.data(); L.B = Bm.data(); L.dA = dA.data(); L.dB = dB.data();
        Ld.A = up(A); Ld.B = up(Bm); Ld.dA = up(dA); Ld.dB = up(dB);
        size_t ns = lora_scratch_floats(&L, N) + 1;
        vec y((size_t)N * out), ax((size_t)N * r), s(ns);
        std::vector<uint8_t> m((size_t)N * in);
        uint8_t *pm = (uint8_t *)cuda_alloc(m.size());
        g_dev.push_back(pm);
        float *px = up(x), *pw0 = up(w0), *pb0 = up(b0), *py = dzeros(y.size()), *pax = dzeros(ax.size()), *ps = dzeros(ns);
        rng_t g1, g2;
        rng_seed(&g1, 99); rng_seed(&g2, 99);
        lora_forward(y.data(), ax.data(), m.data(), s.data(), x.data(), w0.data(), b0.data(), &L, N, in, out, &g1);
        lora_forward_cuda(py, pax, pm, ps, px, pw0, pb0, &Ld, N, in, out, &g2);
        char name[128];
        snprintf(name, sizeof name, "device lora fwd dropout %g", p);
        expect_close(name, down(py, y.size()), y, FWD);
        vec dy = randv(y.size(), -1.0f, 1.0f, 88), dx = randv(x.size(), -0.1f, 0.1f, 89);
        float *pdy = up(dy), *pdx = up(dx);
        lora_backward(dx.data(), dy.data(), x.data(), ax.data(), m.data(), s.data(), w0.data(), &L, N, in, out);
        lora_backward_cuda(pdx, pdy, px, pax, pm, ps, pw0, &Ld, N, in, out);
        snprintf(name, sizeof name, "device lora bwd dx, dA, dB dropout %g", p);
        expect(name, fmax(fmax(rel_err(down(pdx, dx.size()).data(), dx.data(), dx.size()),
                               rel_err(down(Ld.dA, dA.size()).data(), dA.data(), dA.size())),
                          rel_err(down(Ld.dB, dB.size()).data(), dB.data(), dB.size())), BWD);
    }
    // AdamW, 3 steps, bit for bit (cuda/optim.cu has no fused multiply-add)
    size_t n = 1000;
    vec p = randv(n, -1.0f, 1.0f, 91);
    adamw_t o, od;
    adamw_init(&o, n, 1e-3f, 0.9f, 0.999f, 1e-8f, 1e-2f);
    od = o;
    od.m = dzeros(n); od.v = dzeros(n);
    float *pp = up(p);
    for (int step = 0; step < 3; step++) {
        vec g = randv(n, -0.5f, 0.5f, 92 + step);
        float *pg = up(g);
        adamw_step(&o, p.data(), g.data(), 1e-3f);
        adamw_step_cuda(&od, pp, pg, 1e-3f);
    }
    expect_close("device adamw 3 steps (exact)", down(pp, n), p, 0.0);
    free(o.m); free(o.v);
    // --clip's sum of squares and scale: the host twins' order exactly
    {
        vec g = randv(3 * NN_SUMSQ_CHUNK + 5, -1.0f, 1.0f, 95), gs = g;
        float *pg = up(g);
        std::vector<double> runs(sumsq_nruns(g.size()));
        for (size_t c = 0; c < runs.size(); c++) runs[c] = sumsq_run(g.data(), g.size(), c);
        double sh = sumsq_total(runs.data(), runs.size()), sd = grad_sumsq_cuda(pg, g.size());
        expect_true("device grad_sumsq == its host twin (exact)", sd == sh);
        scale_cuda(pg, 0.37f, g.size());
        for (size_t i = 0; i < gs.size(); i++) gs[i] = scale_elem(gs.data(), 0.37f, i);
        expect_close("device scale (exact)", down(pg, g.size()), gs, 0.0);
    }
    // DDPM noising and the loss
    ddpm_schedule sc;
    char err[DDPM_ERR_LEN];
    if (ddpm_schedule_init(&sc, "scaled_linear", DDPM_SD_T, DDPM_SD_BETA_START, DDPM_SD_BETA_END, err) == 0) {
        int B = 3;
        size_t ni = 4 * 9 * 11;
        int t[3] = {0, 411, 999};
        vec x0 = randv(B * ni, -1.0f, 1.0f, 101), eps = randv(B * ni, -2.0f, 2.0f, 102), xt(B * ni), wv = {1.0f, 0.25f, 2.5f};
        int *pt = (int *)cuda_alloc(sizeof t);
        g_dev.push_back(pt);
        if (pt) cuda_upload(pt, t, sizeof t);
        float *px0 = up(x0), *peps = up(eps), *pxt = dzeros(B * ni), *psa = up(vec(sc.sqrt_abar, sc.sqrt_abar + sc.T));
        float *ps1 = up(vec(sc.sqrt_1m_abar, sc.sqrt_1m_abar + sc.T)), *pwv = up(wv);
        ddpm_add_noise(xt.data(), x0.data(), eps.data(), t, B, ni, &sc);
        ddpm_add_noise_cuda(pxt, px0, peps, pt, B, ni, psa, ps1);
        expect_close("device ddpm add_noise", down(pxt, B * ni), xt, FWD);
        float L = mse_loss_forward(xt.data(), eps.data(), wv.data(), B, ni);
        float Ld2 = mse_loss_forward_cuda(pxt, peps, pwv, B, ni);
        expect("device mse loss fwd, weighted", fabs(Ld2 - L) / fabs(L), FWD);
        vec d = randv(B * ni, -0.1f, 0.1f, 103);
        float *pd = up(d);
        mse_loss_backward(d.data(), xt.data(), eps.data(), wv.data(), 0.5f, B, ni);
        mse_loss_backward_cuda(pd, pxt, peps, pwv, 0.5f, B, ni);
        expect_close("device mse loss bwd", down(pd, B * ni), d, FWD);
        ddpm_free(&sc);
    }
    dev_done("lora, adamw, ddpm");
}

// a micro-batch's draws on the GPU against ddpm.c's loops: integers and
// the noising exactly; the normals within FWD (CUDA's double log and cos
// may round the float differently from glibc in the last bit)
static void dev_ddpm_draws(void) {
    ddpm_schedule sc;
    char err[DDPM_ERR_LEN];
    if (ddpm_schedule_init(&sc, "scaled_linear", DDPM_SD_T, DDPM_SD_BETA_START, DDPM_SD_BETA_END, err) != 0) return;
    int B = 3, C = 4;
    size_t HW = 64 * 64, per = (size_t)C * HW, n = per * B;
    uint64_t s0 = 0x5D1A0C0FFEEull;
    rng_t r = {s0};
    std::vector<int> tr(B), th(B);
    vec er(n), x0 = randv(n, -1.0f, 1.0f, 601), xr(n), vr(n), wr(B);
    ddpm_sample_timesteps(tr.data(), B, sc.T, &r);
    ddpm_sample_noise(er.data(), n, &r);
    int *pt = (int *)cuda_alloc(sizeof(int) * B);
    g_dev.push_back(pt);
    float *ptf = dzeros(B), *pe = dzeros(n), *px0 = up(x0), *pxt = dzeros(n), *pv = dzeros(n), *pw = dzeros(B);
    float *psa = up(vec(sc.sqrt_abar, sc.sqrt_abar + sc.T)), *ps1 = up(vec(sc.sqrt_1m_abar, sc.sqrt_1m_abar + sc.T));
    ddpm_timesteps_cuda(pt, ptf, B, sc.T, s0);
    ddpm_normal_cuda(pe, n, ddpm_rng_skip(s0, B));
    if (pt) cuda_download(th.data(), pt, sizeof(int) * B);
    expect_true("device timesteps == ddpm_sample_timesteps (exact)", th == tr);
    vec eh = down(pe, n);
    expect_close("device normals vs ddpm_sample_noise", eh, er, FWD);
    // the rest from the device's own eps: no fused multiply-add, so exactly
    ddpm_noise_offset(er.data(), B, C, HW, 0.1f, &r);
    ddpm_noise_offset_cuda(pe, B, C, HW, 0.1f, ddpm_rng_skip(s0, B + 2 * n));
    expect_close("device noise offset vs ddpm_noise_offset", down(pe, n), er, FWD);
    eh = down(pe, n);
    ddpm_add_noise(xr.data(), x0.data(), eh.data(), tr.data(), B, per, &sc);
    ddpm_velocity(vr.data(), x0.data(), eh.data(), tr.data(), B, per, &sc);
    ddpm_min_snr_weights(wr.data(), tr.data(), B, 5.0f, DDPM_V_PREDICTION, &sc);
    ddpm_add_noise_cuda(pxt, px0, pe, pt, B, per, psa, ps1);
    ddpm_target_cuda(pv, px0, pe, pt, B, per, DDPM_V_PREDICTION, psa, ps1);
    ddpm_loss_weights_cuda(pw, pt, B, 5.0f, DDPM_V_PREDICTION, psa, ps1);
    expect("device draws: x_t, v target, min-SNR weights from its eps (exact)",
           fmax(fmax(rel_err(down(pxt, n).data(), xr.data(), n), rel_err(down(pv, n).data(), vr.data(), n)),
                rel_err(down(pw, B).data(), wr.data(), B)), 0.0);
    ddpm_free(&sc);
    dev_done("ddpm draws");
}

/* ---------------------------------------------------------------------------
 * The whole UNet on a host-emulated device. nn_ops_emu is nn_ops_cuda()
 * (cuda/ops.cu) with host memory standing in for device memory: the same
 * table entries, each running its kernels' host twins (HostBK's layers of
 * cuda/layers.cuh, the *_host reductions, the *_elem functions in loops).
 * unet_to_device(u, &nn_ops_emu) then runs unet.c's device mode for real:
 * weights copied to "device" memory and every pointer translated, the arena
 * allocated there, inputs up and outputs down, LoRA A/B up and dA/dB down.
 * A wrong offset, a swapped argument, a call to the wrong entry or a
 * helper left on the host shows up as a difference from the CPU run of the
 * same model (the bundled tiny model, LoRA on every transformer projection
 * with dropout, B made non-zero so every gradient is). */
// The emulated device's allocations (start -> bytes), so that a copy can
// tell "device" from host memory as cudaMemcpyDefault does, and the bytes
// that really cross to or from the host are counted (upload / download with
// a device pointer on the host side is a copy on the device: backend.h)
static std::map<const char *, size_t> g_emu_mem;
static size_t g_emu_up, g_emu_down;      // host -> device, device -> host bytes
static int emu_is_dev(const void *p) {
    auto it = g_emu_mem.upper_bound((const char *)p);
    if (it == g_emu_mem.begin()) return 0;
    --it;
    return (const char *)p < it->first + it->second;
}
static void *emu_alloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (p) g_emu_mem[(const char *)p] = bytes ? bytes : 1;
    return p;
}
static void emu_free(void *p) { g_emu_mem.erase((const char *)p); free(p); }
static int emu_move(void *dst, const void *src, size_t bytes) {
    if (bytes) memcpy(dst, src, bytes);
    return 1;
}
static int emu_upload(void *dst, const void *src, size_t bytes) {
    if (!emu_is_dev(src)) g_emu_up += bytes;
    return emu_move(dst, src, bytes);
}
static int emu_download(void *dst, const void *src, size_t bytes) {
    if (!emu_is_dev(dst)) g_emu_down += bytes;
    return emu_move(dst, src, bytes);
}
static const char *emu_error(void) { return NULL; }
static void emu_set_layer(const char *name) { (void)name; }
static void emu_copy(float *dst, const float *src, size_t n) { if (n) memcpy(dst, src, n * sizeof(float)); }
static void emu_add(float *out, const float *a, const float *b, size_t n) {   // add_kernel
    for (size_t i = 0; i < n; i++) out[i] = stx(ldx(a[i]) + ldx(b[i]));
}
static void emu_accumulate(float *y, const float *x, size_t n) { if (y) emu_add(y, y, x, n); }
static void emu_transpose(float *out, const float *in, int B, int R, int S) {
    for (size_t i = 0; i < (size_t)B * R * S; i++) out[i] = stx(transpose_elem(in, R, S, i));
}
static void emu_add_chan(float *y, const float *v, int B, int C, size_t HW) {
    for (size_t i = 0; i < (size_t)B * C * HW; i++) y[i] = stx(add_chan_elem(ldx(y[i]), v, HW, i));
}
static void emu_sum_chan(float *out, const float *x, int B, int C, size_t HW) {
    for (size_t bc = 0; bc < (size_t)B * C; bc++) out[bc] = sum_chan_elem(x, HW, bc);
}
static void emu_widen_f16(float *dst, const uint16_t *src, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = half_bits_to_float(src[i]);
}
static void emu_move(float *dst, const float *src, size_t n) { if (n) memmove(dst, src, n * sizeof(float)); }
static void emu_pad_br(float *out, const float *in, int BC, int H, int W) {   // pad_br_kernel
    for (size_t i = 0; i < (size_t)BC * (H + 1) * (W + 1); i++) out[i] = stx(pad_br_elem(in, H, W, i));
}
static void emu_gelu_fwd(float *out, const float *inp, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = stx(gelu_fwd(ldx(inp[i])));
}
static void emu_quickgelu_fwd(float *out, const float *inp, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = stx(quickgelu_fwd(ldx(inp[i])));
}
static void emu_gn_bwd(float *dinp, float *dw, float *db, const float *dout, const float *inp, const float *w,
                       const float *mean, const float *rstd, int B, int C, int HW, int G) {
    if (!dinp && !dw && !db) return;
    vec sums((size_t)B * C * 2);
    groupnorm_backward_host(dinp, dw, db, dout, inp, w, mean, rstd, B, C, HW, G, sums.data());
    if (dw || db)
        for (int c = 0; c < C; c++) gn_wb_fold(dw, db, sums.data(), B, C, c);
}
static void emu_silu_fwd(float *out, const float *inp, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = stx(silu_fwd(ldx(inp[i])));
}
static void emu_silu_bwd(float *dinp, const float *dout, const float *inp, size_t n) {
    if (!dinp) return;
    for (size_t i = 0; i < n; i++) dinp[i] = stx(ldx(dinp[i]) + silu_bwd(ldx(dout[i]), ldx(inp[i])));
}
static void emu_geglu_fwd(float *out, const float *inp, int N, int D) {
    for (size_t i = 0; i < (size_t)N * D; i++) out[i] = stx(geglu_fwd_elem(inp, D, i / D, (int)(i % D)));
}
static void emu_geglu_bwd(float *dinp, const float *dout, const float *inp, int N, int D) {
    if (!dinp) return;
    for (size_t i = 0; i < (size_t)N * D; i++) geglu_bwd_elem(dinp, dout, inp, D, i / D, (int)(i % D));
}
static void emu_up_fwd(float *out, const float *inp, int B, int C, int H, int W) {
    for (size_t i = 0; i < (size_t)B * C * 4 * H * W; i++) out[i] = stx(upsample2x_fwd_elem(inp, H, W, i));
}
static void emu_up_bwd(float *dinp, const float *dout, int B, int C, int H, int W) {
    if (!dinp) return;
    for (size_t i = 0; i < (size_t)B * C * H * W; i++) dinp[i] = stx(ldx(dinp[i]) + upsample2x_bwd_elem(dout, H, W, i));
}
static void emu_timestep(float *out, const float *t, int N, int dim, int flip, float shift, float max_period) {
    float neg_log = (float)(-log((double)max_period));           // as timestep_embedding_cuda
    float denom = (float)((double)(dim / 2) - (double)shift);
    for (size_t i = 0; i < (size_t)N * dim; i++) out[i] = timestep_elem(t, dim, flip, neg_log, denom, i / dim, (int)(i % dim));
}
static void emu_ln_bwd(float *dinp, float *dw, float *db, const float *dout, const float *inp, const float *w,
                       const float *mean, const float *rstd, int N, int C) {
    layernorm_backward_host(dinp, dw, db, dout, inp, w, mean, rstd, N, C);
}
// the optimizer and the loss: optim.cu's and ddpm.cu's kernels' host twins
static void emu_adamw(adamw_t *o, float *p, const float *g, float lr) {   // adamw_step_cuda
    o->step++;
    double bc1 = 1.0 - pow(o->beta1, (double)o->step), bc2 = 1.0 - pow(o->beta2, (double)o->step);
    adamw_coef k = {o->beta1, o->beta2, o->eps, (float)(lr / bc1), (float)sqrt(bc2),
                    (float)(1.0 - (double)lr * o->weight_decay)};
    for (size_t i = 0; i < o->n; i++) adamw_elem(p, o->m, o->v, g, k, i);
}
static double emu_grad_sumsq(const float *g, size_t n) {                  // grad_sumsq_cuda
    std::vector<double> runs(sumsq_nruns(n));
    for (size_t c = 0; c < runs.size(); c++) runs[c] = sumsq_run(g, n, c);
    return sumsq_total(runs.data(), runs.size());
}
static void emu_scale(float *g, float k, size_t n) {
    for (size_t i = 0; i < n; i++) g[i] = scale_elem(g, k, i);
}
static float emu_mse_fwd(const float *pred, const float *target, const float *w, int B, size_t n) {
    return mse_loss_host(pred, target, w, B, n);
}
static void emu_mse_bwd(float *dpred, const float *pred, const float *target, const float *w, float dloss,
                        int B, size_t n) {
    for (size_t i = 0; i < (size_t)B * n; i++)
        dpred[i] = stx(ldx(dpred[i]) + mse_bwd_elem(pred, target, mse_grad_coef(dloss, w, B, n, (int)(i / n)), i));
}
// the text encoder's training step and conv LoRA (devte): nn.cu's activation
// backward kernels, ops.cu's embedding_kernel, lora.cu's conv LoRA layers
static void emu_gelu_bwd(float *dinp, const float *dout, const float *inp, size_t n) {
    if (!dinp) return;
    for (size_t i = 0; i < n; i++) dinp[i] = stx(ldx(dinp[i]) + gelu_bwd(ldx(dout[i]), ldx(inp[i])));
}
static void emu_quickgelu_bwd(float *dinp, const float *dout, const float *inp, size_t n) {
    if (!dinp) return;
    for (size_t i = 0; i < n; i++) dinp[i] = stx(ldx(dinp[i]) + quickgelu_bwd(ldx(dout[i]), ldx(inp[i])));
}
static void emu_embedding(float *out, const int *ids, const float *tok, const uint16_t *tok16, const float *pos,
                          const uint16_t *pos16, int B, int T, int C) {
    for (size_t i = 0; i < (size_t)B * T * C; i++) out[i] = embedding_elem(ids, tok, tok16, pos, pos16, T, C, i);
}
// a micro-batch's draws and the loss's inputs: ddpm.cu's kernels' host twins
static void emu_ddpm_timesteps(int *t, float *tf, int B, int T, uint64_t s0) {
    for (int b = 0; b < B; b++) { t[b] = timestep_at(s0, b, T); tf[b] = (float)t[b]; }
}
static void emu_ddpm_normal(float *eps, size_t n, uint64_t s0) {
    for (size_t i = 0; i < n; i++) eps[i] = stx(normal_at(s0, i));
}
static void emu_ddpm_noise_offset(float *eps, int B, int C, size_t HW, float offset, uint64_t s0) {
    if (offset == 0.0f) return;
    for (size_t i = 0; i < (size_t)B * C * HW; i++) eps[i] = stx(noise_offset_elem(ldx(eps[i]), s0, offset, HW, i));
}
static void emu_ddpm_add_noise(float *xt, const float *x0, const float *eps, const int *t, int B, size_t n,
                               const float *sa, const float *s1a) {
    for (size_t i = 0; i < (size_t)B * n; i++) xt[i] = stx(add_noise_elem(x0, eps, t, sa, s1a, n, i));
}
static void emu_ddpm_target(float *target, const float *x0, const float *eps, const int *t, int B, size_t n,
                            ddpm_prediction pred, const float *sa, const float *s1a) {
    if (pred != DDPM_V_PREDICTION) { emu_copy(target, eps, (size_t)B * n); return; }
    for (size_t i = 0; i < (size_t)B * n; i++) target[i] = stx(velocity_elem(x0, eps, t, sa, s1a, n, i));
}
static void emu_ddpm_loss_weights(float *w, const int *t, int B, float gamma, ddpm_prediction pred,
                                  const float *sa, const float *s1a) {
    for (int b = 0; b < B; b++) w[b] = loss_weight_at(t, sa, s1a, gamma, pred == DDPM_V_PREDICTION, b);
}
static nn_ops nn_ops_emu;
static void emu_init(void) {
    nn_ops &t = nn_ops_emu;
    t.name = "host-emulated device";
    t.device = 1;
    t.alloc = emu_alloc; t.free = emu_free; t.upload = emu_upload; t.download = emu_download;
    t.error = emu_error; t.set_layer = emu_set_layer;
    t.copy = emu_copy; t.zero = HostBK::zero; t.add = emu_add; t.accumulate = emu_accumulate;
    t.transpose = emu_transpose; t.add_chan = emu_add_chan; t.sum_chan = emu_sum_chan;
    t.widen_f16 = emu_widen_f16;
    t.move = emu_move; t.pad_br = emu_pad_br;
    t.gelu_forward = emu_gelu_fwd; t.quickgelu_forward = emu_quickgelu_fwd;
    t.gemm = HostBK::gemm;
    t.linear_forward = linear_forward_t<HostBK>;
    t.linear_backward = linear_backward_t<HostBK>;
    t.conv2d_forward = conv2d_forward_t<HostBK>;
    t.conv2d_backward = conv2d_backward_t<HostBK>;
    t.groupnorm_forward = groupnorm_forward_host;
    t.groupnorm_backward = emu_gn_bwd;
    t.layernorm_forward = layernorm_forward_host;
    t.layernorm_backward = emu_ln_bwd;
    t.silu_forward = emu_silu_fwd; t.silu_backward = emu_silu_bwd;
    t.geglu_forward = emu_geglu_fwd; t.geglu_backward = emu_geglu_bwd;
    t.upsample2x_forward = emu_up_fwd; t.upsample2x_backward = emu_up_bwd;
    t.timestep_embedding = emu_timestep;
    t.attention_forward = attention_forward_t<HostBK>;
    t.attention_backward = attention_backward_t<HostBK>;
    t.lora_forward = lora_forward_t<HostBK>;
    t.lora_backward = lora_backward_t<HostBK>;
    t.adamw_step = emu_adamw;
    t.grad_sumsq = emu_grad_sumsq;
    t.scale = emu_scale;
    t.mse_loss_forward = emu_mse_fwd;
    t.mse_loss_backward = emu_mse_bwd;
    t.gelu_backward = emu_gelu_bwd; t.quickgelu_backward = emu_quickgelu_bwd;
    t.embedding_forward = emu_embedding;
    t.lora_conv_forward = lora_conv_forward_t<HostBK>;
    t.lora_conv_backward = lora_conv_backward_t<HostBK>;
    t.ddpm_timesteps = emu_ddpm_timesteps;
    t.ddpm_normal = emu_ddpm_normal;
    t.ddpm_noise_offset = emu_ddpm_noise_offset;
    t.ddpm_add_noise = emu_ddpm_add_noise;
    t.ddpm_target = emu_ddpm_target;
    t.ddpm_loss_weights = emu_ddpm_loss_weights;
}

// one UNet of models/tiny (dir) with LoRA ("transformer", rank 4, dropout
// 0.1) and, with conv_rank, conv LoRA of that rank (alpha 3); every B random
// from seed bseed (so every gradient is non-zero)
static int tiny_unet_with(unet_t *u, const char *dir, weight_dtype dt, int conv_rank, uint64_t bseed) {
    char err[UNET_ERR_LEN];
    if (unet_load_diffusers_dtype(u, dir, dt, err)) { printf("note: %s\n", err); return -1; }
    if (conv_rank ? unet_add_lora_conv(u, "transformer", 4, 4.0f, conv_rank, 3.0f, 0.1f, 7)
                  : unet_add_lora(u, "transformer", 4, 4.0f, 0.1f, 7)) { printf("note: %s\n", u->err); return -1; }
    rng_t r;
    rng_seed(&r, bseed);
    for (int k = 0; k < u->nloras; k++) {
        lora_t *L = &u->loras[k].L;
        for (size_t i = 0; i < (size_t)L->out * L->r; i++) L->B[i] = 0.05f * (rng_uniform(&r) - 0.5f);
    }
    return 0;
}
// the transformers' LoRA only
static int tiny_unet(unet_t *u, const char *dir, weight_dtype dt) { return tiny_unet_with(u, dir, dt, 0, 5); }

/* uc on the CPU against its twin ue on the emulated device (unet_to_device
 * done), at 2 x 8 x 8 latents, 7 context tokens, arena mode `mode`: the
 * host's copies of the weights poisoned (a pointer left untranslated reads
 * NaN); two steps of eps, every LoRA dA, dB, dx and dctx, with an AdamW
 * update on the host and unet_lora_upload between; with `infer`, inference
 * (the sampler's arena) after the updates. Inputs from seeds seed..seed+2
 * and timesteps t; what: the checks' prefix; mname: the run's suffix. conv:
 * also the conv adapters' gradients alone and the dropout stream
 * (test_conv_lora_unet_emulated). */
static void unet_twin_steps(unet_t &uc, unet_t &ue, int mode, weight_dtype dt, int infer, const char *what,
                            const char *mname, uint64_t seed, const vec &t, int conv) {
    size_t nvec = dt == WEIGHT_F16 ? ue.nparams - ue.nmat : ue.nparams;
    for (size_t i = 0; i < nvec; i++) ue.params[i] = NAN;
    for (size_t i = 0; dt == WEIGHT_F16 && i < ue.nmat; i++) ue.params16[i] = 0x7E00;
    int B = 2, h = 8, w = 8, Tc = 7;
    const unet_config *c = &uc.cfg;
    size_t nx = (size_t)B * c->in_channels * h * w, nc = (size_t)B * Tc * c->cross_dim;
    vec x = randv(nx, -1.0f, 1.0f, seed), ctx = randv(nc, -1.0f, 1.0f, seed + 1);
    vec deps = randv(nx, -1.0f, 1.0f, seed + 2);
    vec ec(nx), ee(nx), dxc(nx), dxe(nx), dcc(nc), dce(nc);
    int ok = unet_alloc_acts(&uc, B, h, w, Tc, mode) == 0 && unet_alloc_acts(&ue, B, h, w, Tc, mode) == 0;
    ok = ok && ue.dlora_params && ue.acts.base;
    adamw_t oc, oe;
    adamw_init(&oc, uc.lora_nparams, 1e-2f, 0.9f, 0.999f, 1e-8f, 1e-2f);
    adamw_init(&oe, ue.lora_nparams, 1e-2f, 0.9f, 0.999f, 1e-8f, 1e-2f);
    for (int step = 0; ok && step < 2; step++) {
        char name[160];
        unet_zero_lora_grads(&uc);
        unet_zero_lora_grads(&ue);
        // the host's LoRA A, B and gradients poisoned while the device
        // works: only its copies may be read and written
        vec keep(ue.lora_params, ue.lora_params + ue.lora_nparams);
        for (size_t i = 0; i < ue.lora_nparams; i++) ue.lora_params[i] = ue.lora_grads[i] = NAN;
        ok = unet_forward(&uc, ec.data(), x.data(), t.data(), ctx.data(), B, h, w, Tc) == 0 &&
             unet_forward(&ue, ee.data(), x.data(), t.data(), ctx.data(), B, h, w, Tc) == 0 &&
             unet_backward(&uc, deps.data(), dxc.data(), dcc.data()) == 0 &&
             unet_backward(&ue, deps.data(), dxe.data(), dce.data()) == 0 &&
             unet_lora_grads_download(&ue) == 0;
        memcpy(ue.lora_params, keep.data(), sizeof(float) * ue.lora_nparams);
        if (!ok) break;
        snprintf(name, sizeof name, "%s: UNet eps, step %d%s", what, step + 1, mname);
        expect_close(name, ee, ec, FWD);
        if (conv) {
            // the conv adapters' gradients alone, then all of them
            vec gcc, gce;
            for (int k = 0; k < uc.nloras; k++) {
                if (!uc.loras[k].is_conv) continue;
                const lora_t *Lc = &uc.loras[k].L, *Le = &ue.loras[k].L;
                size_t na = (size_t)Lc->r * lora_fan_in(Lc), nb = (size_t)Lc->out * Lc->r;
                gcc.insert(gcc.end(), Lc->dA, Lc->dA + na); gcc.insert(gcc.end(), Lc->dB, Lc->dB + nb);
                gce.insert(gce.end(), Le->dA, Le->dA + na); gce.insert(gce.end(), Le->dB, Le->dB + nb);
            }
            snprintf(name, sizeof name, "%s: the conv adapters' dA, dB (%zu), step %d%s", what, gcc.size(), step + 1, mname);
            expect_close(name, gce, gcc, FWD);
        }
        vec gc(uc.lora_grads, uc.lora_grads + uc.lora_nparams), ge(ue.lora_grads, ue.lora_grads + ue.lora_nparams);
        snprintf(name, sizeof name, "%s: every %sdA, dB (%zu), step %d%s", what, conv ? "" : "LoRA ", uc.lora_nparams,
                 step + 1, mname);
        expect_close(name, ge, gc, FWD);
        snprintf(name, sizeof name, "%s: dx, dctx, step %d%s", what, step + 1, mname);
        expect(name, fmax(rel_err(dxe.data(), dxc.data(), nx), rel_err(dce.data(), dcc.data(), nc)), FWD);
        if (conv) {
            snprintf(name, sizeof name, "%s: the dropout stream advances as the CPU's", what);
            expect_true(name, uc.dropout_rng.state == ue.dropout_rng.state);
        }
        adamw_step(&oc, uc.lora_params, uc.lora_grads, 1e-2f);
        adamw_step(&oe, ue.lora_params, ue.lora_grads, 1e-2f);
        ok = unet_lora_upload(&ue) == 0;
    }
    char name[160];
    snprintf(name, sizeof name, "%s: every call succeeded", what);
    expect_true(name, ok);
    if (!ok) printf("note: %s / %s\n", uc.err, ue.err);
    if (infer) {
        ok = unet_alloc_acts(&uc, B, h, w, Tc, 0) == 0 && unet_alloc_acts(&ue, B, h, w, Tc, 0) == 0 &&
             unet_forward(&uc, ec.data(), x.data(), t.data(), ctx.data(), B, h, w, Tc) == 0 &&
             unet_forward(&ue, ee.data(), x.data(), t.data(), ctx.data(), B, h, w, Tc) == 0;
        snprintf(name, sizeof name, "%s: inference forward runs", what);
        expect_true(name, ok);
        snprintf(name, sizeof name, "%s: UNet eps, inference", what);
        if (ok) expect_close(name, ee, ec, FWD);
    }
    adamw_free(&oc); adamw_free(&oe);
}

static void test_unet_emulated(void) {
    const char *dir = "models/tiny/unet";
    emu_init();
    // the device's fp16 widening is half.c's, bit for bit, on all 65536 patterns
    int same = 1;
    for (uint32_t h = 0; h < 65536; h++) {
        float a = half_bits_to_float((uint16_t)h), b = half_to_float((uint16_t)h);
        same &= memcmp(&a, &b, sizeof a) == 0;
    }
    expect_true("half_bits_to_float == half.c's half_to_float on every fp16 bit pattern", same);
    // training; with gradient checkpointing; fp16-held weights (models/tiny is
    // stored as fp16, so all three compute the same numbers on the CPU)
    for (int run = 0; run < 3; run++) {
        int mode = run == 1 ? 2 : 1;
        weight_dtype dt = run == 2 ? WEIGHT_F16 : WEIGHT_F32;
        unet_t uc, ue;
        if (tiny_unet(&uc, dir, dt) || tiny_unet(&ue, dir, dt)) { expect_true("tiny UNet loads (models/tiny/unet)", 0); return; }
        expect_true("unet_to_device(host-emulated device)", unet_to_device(&ue, &nn_ops_emu) == 0);
        size_t nvec = dt == WEIGHT_F16 ? ue.nparams - ue.nmat : ue.nparams;
        expect_true("the emulated device holds its own copy of the weights",
                    ue.dparams && ue.dparams != ue.params && memcmp(ue.dparams, ue.params, sizeof(float) * nvec) == 0 &&
                    (dt == WEIGHT_F32 || (ue.dparams16 && memcmp(ue.dparams16, ue.params16, 2 * ue.nmat) == 0)));
        const char *mname = mode == 2 ? ", checkpointed" : dt == WEIGHT_F16 ? ", fp16 weights" : "";
        unet_twin_steps(uc, ue, mode, dt, run == 0, "emulated device", mname, 201, {37.0f, 911.0f}, 0);
        unet_free(&uc); unet_free(&ue);
    }
}

/* ---------------------------------------------------------------------------
 * One side of the emulated training-step comparisons (test_train_emulated;
 * devdata's test_train_draws_emulated; devte's test_te_train_emulated;
 * devmixed's mp_train): models/tiny's UNet with LoRA (tiny_unet) on the CPU
 * (dev NULL) or on the table dev (unet_to_device), its training arena for
 * B = 2 latents of 8 x 8 and Tc context tokens, AdamW (lr 1e-2, betas 0.9,
 * 0.999, weight decay 1e-2) with its moments where the LoRA is, and on dev
 * the loss's target and weights. On dev the host's LoRA A, B and gradients
 * are poisoned (NaN): only the device's copies may be used. */
struct train_side {
    unet_t u;
    const nn_ops *dev;            // NULL: the CPU
    int B, h, w, Tc;
    size_t n, per, nx, nc;        // LoRA floats; eps floats per item; x, ctx floats
    adamw_t o;
    float *dtarget, *dwt;         // on dev: the loss's target (B x per), weights (B)
    vec pred, dpred;              // on the CPU: eps and its gradient
    int ok;                       // every setup call succeeded
};

// AdamW's (zero) moments moved to dev, as train.c's to_device (dev NULL: left)
static int adamw_to(const nn_ops *dev, adamw_t *o) {
    if (!dev) return 1;
    float *m = (float *)dev->alloc(sizeof(float) * o->n), *v = (float *)dev->alloc(sizeof(float) * o->n);
    int ok = dev->upload(m, o->m, sizeof(float) * o->n) && dev->upload(v, o->v, sizeof(float) * o->n);
    adamw_free(o);
    o->m = m; o->v = v;
    return ok;
}
static void adamw_free_on(const nn_ops *dev, adamw_t *o) {
    if (dev) { dev->free(o->m); dev->free(o->v); o->m = o->v = NULL; }
    adamw_free(o);
}

// -1 where the UNet does not load; else 0, f->ok saying whether the rest ran
static int side_init(train_side *f, const nn_ops *dev, weight_dtype dt, int Tc, float adam_eps) {
    f->dev = dev;
    f->B = 2; f->h = f->w = 8; f->Tc = Tc;
    f->dtarget = f->dwt = NULL;
    if (tiny_unet(&f->u, "models/tiny/unet", dt)) return -1;
    const unet_config *c = &f->u.cfg;
    f->n = f->u.lora_nparams;
    f->per = (size_t)c->out_channels * f->h * f->w;
    f->nx = (size_t)f->B * c->in_channels * f->h * f->w;
    f->nc = (size_t)f->B * Tc * c->cross_dim;
    f->pred.assign(f->B * f->per, 0.0f);
    f->dpred.assign(f->B * f->per, 0.0f);
    adamw_init(&f->o, f->n, 1e-2f, 0.9f, 0.999f, adam_eps, 1e-2f);
    int ok = 1;
    if (dev) {
        ok = unet_to_device(&f->u, dev) == 0 && adamw_to(dev, &f->o);
        f->dtarget = (float *)dev->alloc(sizeof(float) * f->B * f->per);
        f->dwt = (float *)dev->alloc(sizeof(float) * f->B);
    }
    f->ok = ok && (!dev || (f->dtarget && f->dwt)) && unet_alloc_acts(&f->u, f->B, f->h, f->w, Tc, 1) == 0;
    // (after unet_alloc_acts, which sends the LoRA up)
    for (size_t i = 0; dev && i < f->n; i++) f->u.lora_params[i] = f->u.lora_grads[i] = NAN;
    return 0;
}
static void side_free(train_side *f) {
    if (f->dev) { f->dev->free(f->dtarget); f->dev->free(f->dwt); }
    adamw_free_on(f->dev, &f->o);
    unet_free(&f->u);
}

// step `step`'s x, target and timesteps of test_train_emulated and mp_train
static void side_inputs(const train_side *f, int step, vec *x, vec *target, vec *t) {
    *x = randv(f->nx, -1.0f, 1.0f, 310 + step);
    *target = randv(f->B * f->per, -1.0f, 1.0f, 320 + step);
    *t = {(float)(50 + 200 * step), (float)(900 - 100 * step)};
}

// a training step's forward, loss and backward on f's side, as train.c's
// micro_step (CPU) or device_loss_step (dev): the LoRA gradients zeroed,
// eps for x at t with ctx, the weighted MSE against target with weights wt
// (*loss), its gradient times dscale, the backward (dctx: the context's
// gradient, or NULL). On dev, eps and its gradient stay there
// (unet_device_io) and target, wt are dev's memory; x, t, ctx go to
// unet_forward as they are. Returns whether every call succeeded.
static int side_step(train_side *f, const float *x, const float *t, const float *ctx, const float *target,
                     const float *wt, float dscale, float *dctx, float *loss) {
    unet_t *u = &f->u;
    int B = f->B;
    size_t per = f->per;
    unet_zero_lora_grads(u);
    if (!f->dev) {
        int ok = unet_forward(u, f->pred.data(), x, t, ctx, B, f->h, f->w, f->Tc) == 0;
        *loss = mse_loss_forward(f->pred.data(), target, wt, B, per);
        std::fill(f->dpred.begin(), f->dpred.end(), 0.0f);
        mse_loss_backward(f->dpred.data(), f->pred.data(), target, wt, dscale, B, per);
        return ok && unet_backward(u, f->dpred.data(), NULL, dctx) == 0;
    }
    const nn_ops *D = f->dev;
    float *pred = NULL, *deps = NULL;
    if (unet_forward(u, NULL, x, t, ctx, B, f->h, f->w, f->Tc) != 0 || unet_device_io(u, &pred, &deps) != 0) return 0;
    *loss = D->mse_loss_forward(pred, target, wt, B, per);
    D->zero(deps, B * per);
    D->mse_loss_backward(deps, pred, target, wt, dscale, B, per);
    return unet_backward(u, NULL, NULL, dctx) == 0;
}

// --clip and AdamW on f's side, as train.c's optimizer_step; the norm before clipping
static float side_update(train_side *f, float clip, float lr) {
    if (!f->dev) {
        float norm = clip_grad_norm(f->u.lora_grads, f->n, clip);
        adamw_step(&f->o, f->u.lora_params, f->u.lora_grads, lr);
        return norm;
    }
    float norm = nn_clip_grad_norm(f->dev, f->u.dlora_grads, f->n, NULL, 0, clip);
    f->dev->adamw_step(&f->o, f->u.dlora_params, f->u.dlora_grads, lr);
    return norm;
}

// f's LoRA A, B and AdamW's m, v (any of them NULL: not wanted), down from
// dev where they are there
static int side_state(const train_side *f, vec *p, vec *m, vec *v) {
    const float *src[3] = {f->dev ? f->u.dlora_params : f->u.lora_params, f->o.m, f->o.v};
    vec *dst[3] = {p, m, v};
    int ok = 1;
    for (int k = 0; k < 3; k++) {
        if (!dst[k]) continue;
        dst[k]->resize(f->n);
        if (f->dev) ok = ok && f->dev->download(dst[k]->data(), src[k], sizeof(float) * f->n);
        else memcpy(dst[k]->data(), src[k], sizeof(float) * f->n);
    }
    return ok;
}

/* Training steps as train.c's --device cuda runs them (device_loss_step,
 * optimizer_step), on the emulated device, against the CPU's: the loss and
 * its gradient, --clip and AdamW on the device, eps left there by
 * unet_forward(NULL) and deps read there by unet_backward(NULL); only the
 * loss and the norm's sum come down. The CPU side is ddpm.c's loss, optim.c's
 * clip_grad_norm and adamw_step on the host. Min-SNR-like weights, batch 2,
 * --clip small enough that every step clips. */
static void test_train_emulated(void) {
    // the fixed-order sum of squares against the CPU's one chain
    vec g = randv(5 * NN_SUMSQ_CHUNK + 37, -1.0f, 1.0f, 301);
    double sc = 0;
    for (float x : g) sc += (double)x * x;
    expect("grad_sumsq: runs of NN_SUMSQ_CHUNK in order vs one chain", fabs(emu_grad_sumsq(g.data(), g.size()) - sc) / sc, 1e-14);
    const nn_ops *E = &nn_ops_emu;
    train_side fc, fe;      // the CPU's; the emulated device's
    if (side_init(&fc, NULL, WEIGHT_F32, 7, 1e-8f) || side_init(&fe, E, WEIGHT_F32, 7, 1e-8f)) {
        expect_true("tiny UNet loads (models/tiny/unet)", 0);
        return;
    }
    int B = fc.B, nsteps = 4;
    size_t n = fc.n, per = fc.per;
    int ok = fc.ok && fe.ok;
    vec ctx = randv(fc.nc, -1.0f, 1.0f, 302), wt = {0.8f, 0.3f};
    const float clip = 1e-3f;
    int clipped = 1;
    for (int step = 0; ok && step < nsteps; step++) {
        char name[160];
        vec x, target, t;
        side_inputs(&fc, step, &x, &target, &t);
        float lr = 1e-2f * (step + 1) / nsteps, Lc, Le;
        // CPU
        ok = side_step(&fc, x.data(), t.data(), ctx.data(), target.data(), wt.data(), 1.0f, NULL, &Lc);
        float normc = side_update(&fc, clip, lr);
        // the emulated device, as train.c's device path
        ok = ok && E->upload(fe.dtarget, target.data(), sizeof(float) * B * per) && E->upload(fe.dwt, wt.data(), sizeof(float) * B) &&
             side_step(&fe, x.data(), t.data(), ctx.data(), fe.dtarget, fe.dwt, 1.0f, NULL, &Le);
        if (!ok) break;
        float norme = side_update(&fe, clip, lr);
        clipped &= normc > clip && norme > clip;
        snprintf(name, sizeof name, "emulated training: loss, step %d", step + 1);
        expect(name, fabs((double)Le - Lc) / fabs((double)Lc), 1e-5);
        snprintf(name, sizeof name, "emulated training: gradient norm, step %d", step + 1);
        expect(name, fabs((double)norme - normc) / normc, 1e-5);
    }
    expect_true("emulated training: every call succeeded", ok);
    expect_true("emulated training: --clip clipped every step", clipped);
    // A, B and the moments come down only now
    vec pe, me, ve;
    ok = ok && side_state(&fe, &pe, &me, &ve);
    if (ok) {
        char name[160];
        snprintf(name, sizeof name, "emulated training: LoRA A, B (%zu) after %d steps", n, nsteps);
        expect_close(name, pe, vec(fc.u.lora_params, fc.u.lora_params + n), 1e-5);
        expect_close("emulated training: AdamW m after 4 steps", me, vec(fc.o.m, fc.o.m + n), 1e-5);
        expect_close("emulated training: AdamW v after 4 steps", ve, vec(fc.o.v, fc.o.v + n), 1e-5);
        expect_true("emulated training: AdamW step count", fe.o.step == nsteps && fc.o.step == nsteps);
        int host_untouched = 1;
        for (size_t i = 0; i < n; i++) host_untouched &= isnan(fe.u.lora_params[i]) != 0;
        expect_true("emulated training: the host's A, B never written during the steps", host_untouched);
    }
    side_free(&fc); side_free(&fe);
}

/* ---------------------------------------------------------------------------
 * A micro-batch's random draws on the device (backend.h's ddpm_* entries,
 * nn_ddpm_micro): the numbers train.c's micro_noise draws on the CPU, bit
 * for bit, and the host's RNG state left where the CPU loops leave it. */

// train.c's micro_noise and micro_step's weights on the CPU (the reference)
static void cpu_micro(rng_t *r, const ddpm_schedule *s, const float *x0, int B, int C, size_t HW, float offset,
                      ddpm_prediction pred, float gamma, int *t, float *tf, float *eps, float *xt, float *target, float *w) {
    size_t per = (size_t)C * HW;
    ddpm_sample_timesteps(t, B, s->T, r);
    ddpm_sample_noise(eps, per * B, r);
    ddpm_noise_offset(eps, B, C, HW, offset, r);
    ddpm_add_noise(xt, x0, eps, t, B, per, s);
    ddpm_target(target, x0, eps, t, B, per, pred, s);
    for (int b = 0; b < B; b++) tf[b] = (float)t[b];
    if (gamma > 0) ddpm_min_snr_weights(w, t, B, gamma, pred, s);
    else for (int b = 0; b < B; b++) w[b] = 1.0f;
}
static int same_bits(const void *a, const void *b, size_t bytes) { return memcmp(a, b, bytes) == 0; }

static void test_ddpm_draws(void) {
    // the index arithmetic against the stream itself
    rng_t r;
    rng_seed(&r, 0xC0FFEEull);
    uint64_t s0 = r.state;
    int ok = 1;
    for (uint64_t k = 1; k <= 1000; k++) {
        uint64_t z = rng_u64(&r);
        ok &= z == ddpm_rng_u64_at(s0, k) && z == splitmix_at(s0, k) && r.state == ddpm_rng_skip(s0, k);
    }
    expect_true("ddpm_rng_u64_at / splitmix_at / ddpm_rng_skip == rng_u64's stream, 1000 draws", ok);
    rng_seed(&r, 77);
    s0 = r.state;
    ok = 1;
    for (uint64_t i = 0; i < 20000; i++) {
        float z = rng_normal(&r), a = ddpm_rng_normal_at(s0, i), d = normal_at(s0, i);
        ok &= same_bits(&z, &a, 4) && same_bits(&z, &d, 4);
    }
    expect_true("ddpm_rng_normal_at, normal_at == rng_normal's stream, 20000 numbers (bit for bit)", ok && r.state == ddpm_rng_skip(s0, 40000));

    ddpm_schedule s;
    if (!sd_schedule(&s)) return;
    emu_init();
    const nn_ops *tabs[2] = {&nn_ops_cpu, &nn_ops_emu};
    int B = 3, C = 4;
    size_t HW = 5 * 7, n = (size_t)B * C * HW;
    vec x0 = randv(n, -1.5f, 1.5f, 401);
    for (int tab = 0; tab < 2; tab++)
        for (int k = 0; k < 4; k++) {
            // epsilon / v, noise offset or not, min-SNR or not
            ddpm_prediction pred = k & 1 ? DDPM_V_PREDICTION : DDPM_EPSILON;
            float offset = k & 2 ? 0.1f : 0.0f, gamma = k == 1 || k == 2 ? 5.0f : 0.0f;
            const nn_ops *O = tabs[tab];
            std::vector<int> tc(B), td(B);
            vec tfc(B), tfd(B), ec(n), ed(n), xc(n), xd(n), yc(n), yd(n), wc(B), wd(B);
            rng_t rc, rd;
            rng_seed(&rc, 1234 + k); rng_seed(&rd, 1234 + k);
            cpu_micro(&rc, &s, x0.data(), B, C, HW, offset, pred, gamma, tc.data(), tfc.data(), ec.data(), xc.data(),
                      yc.data(), wc.data());
            // the table's memory: the schedule's tables up once, x0 up, everything else made there
            float *sa = (float *)O->alloc(4 * s.T), *s1a = (float *)O->alloc(4 * s.T), *px0 = (float *)O->alloc(4 * n);
            float *ptf = (float *)O->alloc(4 * B), *pe = (float *)O->alloc(4 * n), *pxt = (float *)O->alloc(4 * n);
            float *py = (float *)O->alloc(4 * n), *pw = (float *)O->alloc(4 * B);
            int *pt = (int *)O->alloc(sizeof(int) * B);
            O->upload(sa, s.sqrt_abar, 4 * s.T); O->upload(s1a, s.sqrt_1m_abar, 4 * s.T); O->upload(px0, x0.data(), 4 * n);
            nn_ddpm_cfg cfg = {s.T, sa, s1a, pred, offset, gamma};
            nn_ddpm_micro(O, &cfg, &rd, px0, B, C, HW, pt, ptf, pe, pxt, py, pw);
            O->download(td.data(), pt, sizeof(int) * B); O->download(tfd.data(), ptf, 4 * B);
            O->download(ed.data(), pe, 4 * n); O->download(xd.data(), pxt, 4 * n);
            O->download(yd.data(), py, 4 * n); O->download(wd.data(), pw, 4 * B);
            char name[200];
            snprintf(name, sizeof name, "%s: micro-batch draws %s%s%s == micro_noise's: t, eps, x_t, target, weights, RNG state",
                     O->name, pred ? "v" : "eps", offset != 0 ? ", noise offset" : "", gamma > 0 ? ", min-SNR" : "");
            expect_true(name, same_bits(tc.data(), td.data(), sizeof(int) * B) && same_bits(tfc.data(), tfd.data(), 4 * B) &&
                              same_bits(ec.data(), ed.data(), 4 * n) && same_bits(xc.data(), xd.data(), 4 * n) &&
                              same_bits(yc.data(), yd.data(), 4 * n) && same_bits(wc.data(), wd.data(), 4 * B) &&
                              rc.state == rd.state);
            O->free(sa); O->free(s1a); O->free(px0); O->free(ptf); O->free(pe); O->free(pxt); O->free(py); O->free(pw); O->free(pt);
        }
    ddpm_free(&s);
}

/* Training steps with the draws on the (emulated) device, as train.c's
 * --device cuda runs them: per micro-batch the B cached latents go up (the
 * one upload), the timesteps, noise (with --noise-offset), x_t, the
 * v-prediction target and the min-SNR weights are made there from the host's
 * RNG state (a prior-loss weight scales one item's weight there), the
 * contexts are gathered from a cache uploaded once, and unet_forward is
 * handed device pointers. Against the CPU's micro_noise + micro_step with the
 * same seed: the same draws bit for bit, the same loss and LoRA at today's
 * tolerance (--clip as test_train_emulated), and the bytes that crossed to
 * the device counted. */
static void test_train_draws_emulated(void) {
    ddpm_schedule s;
    if (!sd_schedule(&s)) return;
    emu_init();
    const nn_ops *E = &nn_ops_emu;
    // AdamW's eps 1e-6, not 1e-8: a clipped gradient element near eps makes
    // its step hypersensitive (m / (sqrt(v) + eps) is ~ +-1 above it), and a
    // 1e-7 difference in the UNet's sums then moves that one parameter by
    // 1e-5 of the largest (seen: 9.5e-6 at eps 1e-8). This test is about the
    // draws; test_train_emulated covers eps 1e-8.
    train_side fc, fe;      // the CPU's; the emulated device's
    if (side_init(&fc, NULL, WEIGHT_F32, 7, 1e-6f) || side_init(&fe, E, WEIGHT_F32, 7, 1e-6f)) {
        expect_true("tiny UNet loads (models/tiny/unet)", 0);
        return;
    }
    int B = fc.B, h = fc.h, w = fc.w, Tc = fc.Tc, nsteps = 3, nimg = 3, C = fc.u.cfg.out_channels;
    size_t n = fc.n, HW = (size_t)h * w, per = fc.per, nctx = (size_t)Tc * fc.u.cfg.cross_dim;
    // --clip as test_train_emulated (AdamW's first steps take the sign of
    // every gradient element; clipped, the near-zero ones move by little)
    const float offset = 0.05f, gamma = 5.0f, prior = 0.5f, clip = 1e-3f;
    const ddpm_prediction pred = DDPM_V_PREDICTION;
    int ok = fc.ok && fe.ok;
    vec cache = randv((size_t)nimg * nctx, -1.0f, 1.0f, 501);   // the context cache, one row per image
    // the device's setup, once (AdamW's moments, the loss's target and
    // weights: side_init): the schedule's tables, the context cache, buffers
    float *dsa = (float *)E->alloc(4 * s.T), *ds1a = (float *)E->alloc(4 * s.T), *dcache = (float *)E->alloc(4 * cache.size());
    ok = ok && E->upload(dsa, s.sqrt_abar, 4 * s.T) && E->upload(ds1a, s.sqrt_1m_abar, 4 * s.T) &&
         E->upload(dcache, cache.data(), 4 * cache.size());
    float *dx0 = (float *)E->alloc(4 * B * per), *deps_ = (float *)E->alloc(4 * B * per), *dxt = (float *)E->alloc(4 * B * per);
    float *dtf = (float *)E->alloc(4 * B), *dctx = (float *)E->alloc(4 * B * nctx);
    int *dt = (int *)E->alloc(sizeof(int) * B);
    rng_t rc, re;
    rng_seed(&rc, 42); rng_seed(&re, 42);
    nn_ddpm_cfg cfg = {s.T, dsa, ds1a, pred, offset, gamma};
    std::vector<int> tc(B);
    vec tfc(B), ec(B * per), xc(B * per), yc(B * per), wc(B), ctxc(B * nctx);
    int draws_same = 1, gather_same = 1;
    size_t up_steps = 0;
    for (int step = 0; ok && step < nsteps; step++) {
        char name[160];
        int items[2] = {step % nimg, (step + 2) % nimg};                  // item 1 of the batch: a "reg" image
        vec x0 = randv(B * per, -1.0f, 1.0f, 510 + step);               // the B cached latents
        float lr = 1e-2f * (step + 1) / nsteps, Lc, Le;                  // warm-up, as test_train_emulated
        // CPU
        cpu_micro(&rc, &s, x0.data(), B, C, HW, offset, pred, gamma, tc.data(), tfc.data(), ec.data(), xc.data(),
                  yc.data(), wc.data());
        wc[1] *= prior;                                                  // dataset_loss_weights
        for (int b = 0; b < B; b++) memcpy(&ctxc[b * nctx], &cache[items[b] * nctx], 4 * nctx);
        ok = side_step(&fc, xc.data(), tfc.data(), ctxc.data(), yc.data(), wc.data(), 1.0f, NULL, &Lc);
        side_update(&fc, clip, lr);
        // the emulated device, as train.c's device path
        size_t up0 = g_emu_up;
        ok = ok && E->upload(dx0, x0.data(), 4 * B * per);
        nn_ddpm_micro(E, &cfg, &re, dx0, B, C, HW, dt, dtf, deps_, dxt, fe.dtarget, fe.dwt);
        E->scale(fe.dwt + 1, prior, 1);
        for (int b = 0; b < B; b++) E->copy(dctx + b * nctx, dcache + items[b] * nctx, nctx);
        ok = ok && side_step(&fe, dxt, dtf, dctx, fe.dtarget, fe.dwt, 1.0f, NULL, &Le);
        if (!ok) break;
        side_update(&fe, clip, lr);
        up_steps += g_emu_up - up0;
        snprintf(name, sizeof name, "device draws: bytes up in step %d == the B latents only (%zu)", step + 1, 4 * B * per);
        expect_true(name, g_emu_up - up0 == 4 * B * per);
        // the test's own look at the device's numbers (not part of the step)
        vec xe(B * per), ye(B * per), we(B), ce(B * nctx);
        E->download(xe.data(), dxt, 4 * B * per); E->download(ye.data(), fe.dtarget, 4 * B * per);
        E->download(we.data(), fe.dwt, 4 * B); E->download(ce.data(), dctx, 4 * B * nctx);
        draws_same &= same_bits(xe.data(), xc.data(), 4 * B * per) && same_bits(ye.data(), yc.data(), 4 * B * per) &&
                      same_bits(we.data(), wc.data(), 4 * B) && rc.state == re.state;
        gather_same &= same_bits(ce.data(), ctxc.data(), 4 * B * nctx);
        snprintf(name, sizeof name, "device draws: training loss, step %d", step + 1);
        expect(name, fabs((double)Le - Lc) / fabs((double)Lc), 1e-5);
        snprintf(name, sizeof name, "device draws: clipped LoRA gradients, step %d", step + 1);
        vec ge(n);
        E->download(ge.data(), fe.u.dlora_grads, sizeof(float) * n);
        expect_close(name, ge, vec(fc.u.lora_grads, fc.u.lora_grads + n), FWD);
    }
    expect_true("device draws: every call succeeded", ok);
    expect_true("device draws: x_t, v target, min-SNR x prior weights, RNG state == the CPU's every step (bit for bit)", draws_same);
    expect_true("device draws: the contexts gathered on the device == the cache's rows", gather_same);
    vec pe;
    ok = ok && side_state(&fe, &pe, NULL, NULL);
    if (ok) {
        char name[160];
        snprintf(name, sizeof name, "device draws: LoRA A, B (%zu) after %d steps", n, nsteps);
        expect_close(name, pe, vec(fc.u.lora_params, fc.u.lora_params + n), 1e-5);
    }
    printf("note: device draws: %zu bytes up in %d steps (B = %d latents of %zu floats per step)\n", up_steps, nsteps, B, per);
    E->free(dsa); E->free(ds1a); E->free(dcache); E->free(dx0); E->free(deps_);
    E->free(dxt); E->free(dtf); E->free(dctx); E->free(dt);
    side_free(&fc); side_free(&fe);
    ddpm_free(&s);
}

/* The VAE (models/tiny/vae: three levels, mid attention) through
 * vae_to_device on the emulated device against the CPU: the latent cache's
 * encode (mean, logvar, and the scaled posterior sample) and the sampler's
 * decode, with fp32- and fp16-held weights, the host's copies of the weights
 * poisoned after the upload (a pointer left untranslated reads NaN). */
static void test_vae_emulated(void) {
    emu_init();
    for (int run = 0; run < 2; run++) {
        weight_dtype dt = run ? WEIGHT_F16 : WEIGHT_F32;
        const char *wn = run ? ", fp16 weights" : "";
        char err[VAE_ERR_LEN], name[160];
        vae_t vc, ve;
        if (vae_load_diffusers_dtype(&vc, "models/tiny/vae", dt, err) ||
            vae_load_diffusers_dtype(&ve, "models/tiny/vae", dt, err)) {
            printf("note: %s\n", err);
            expect_true("tiny VAE loads (models/tiny/vae)", 0);
            return;
        }
        expect_true("vae_to_device(host-emulated device)", vae_to_device(&ve, &nn_ops_emu) == 0);
        size_t nvec = ve.params16 ? ve.nparams - ve.nmat : ve.nparams;
        expect_true("the emulated device holds its own copy of the VAE's weights",
                    ve.dparams && ve.dparams != ve.params && memcmp(ve.dparams, ve.params, sizeof(float) * nvec) == 0);
        for (size_t i = 0; i < nvec; i++) ve.params[i] = NAN;
        for (size_t i = 0; ve.params16 && i < ve.nmat; i++) ve.params16[i] = 0x7E00;
        int B = 2, H = 20, W = 24, h = vae_latent_side(&vc.cfg, H), w = vae_latent_side(&vc.cfg, W);
        size_t nimg = (size_t)B * 3 * H * W, nlat = (size_t)B * vc.cfg.latent_channels * h * w;
        vec img = randv(nimg, -1.0f, 1.0f, 301), noise = randv(nlat, -1.0f, 1.0f, 302);
        vec mc(nlat), me(nlat), lc(nlat), le(nlat), zc(nlat), ze(nlat);
        int ok = vae_alloc_acts(&vc, B, H, W, 0) == 0 && vae_alloc_acts(&ve, B, H, W, 0) == 0 &&
                 vae_encode(&vc, mc.data(), lc.data(), img.data(), B, H, W) == 0 &&
                 vae_encode(&ve, me.data(), le.data(), img.data(), B, H, W) == 0 &&
                 vae_encode_latents(&vc, zc.data(), img.data(), noise.data(), B, H, W) == 0 &&
                 vae_encode_latents(&ve, ze.data(), img.data(), noise.data(), B, H, W) == 0;
        expect_true("emulated device: VAE encode runs", ok);
        if (!ok) printf("note: %s / %s\n", vc.err, ve.err);
        if (ok) {
            snprintf(name, sizeof name, "emulated device: VAE encode mean, logvar%s", wn);
            expect(name, fmax(rel_err(me.data(), mc.data(), nlat), rel_err(le.data(), lc.data(), nlat)), FWD);
            snprintf(name, sizeof name, "emulated device: VAE latents (posterior sample, scaled)%s", wn);
            expect_close(name, ze, zc, FWD);
        }
        // decode the CPU's latents on both (B = 1 and 2: a smaller call than the block)
        vec oc(nimg), oe(nimg);
        for (int b = 1; ok && b <= 2; b++) {
            ok = vae_decode_latents(&vc, oc.data(), zc.data(), b, h, w) == 0 &&
                 vae_decode_latents(&ve, oe.data(), zc.data(), b, h, w) == 0;
            expect_true("emulated device: VAE decode runs", ok);
            if (!ok) { printf("note: %s / %s\n", vc.err, ve.err); break; }
            snprintf(name, sizeof name, "emulated device: VAE decode, batch %d%s", b, wn);
            size_t n = nimg / 2 * b;
            expect(name, rel_err(oe.data(), oc.data(), n), FWD);
        }
        expect_true("emulated device: VAE backward refuses, one line",
                    vae_decoder_backward(&ve, oc.data(), NULL) == -1 && strstr(ve.err, "does not run on") &&
                    vae_alloc_grads(&ve) == -1);
        vae_free(&vc); vae_free(&ve);
    }
}

/* CLIP (models/tiny/text_encoder) through clip_to_device against the CPU:
 * the forward at clip_skip 1 and 2, with unmerged LoRA adapters (B made
 * non-zero), fp32- and fp16-held weights; the host's weights (all but the
 * embeddings, which the host gathers) and LoRA A, B poisoned after the upload. */
static void test_clip_emulated(void) {
    emu_init();
    for (int run = 0; run < 2; run++) {
        weight_dtype dt = run ? WEIGHT_F16 : WEIGHT_F32;
        const char *wn = run ? ", fp16 weights" : "";
        char err[ST_ERR_LEN], name[160];
        clip_t cc, ce;
        if (clip_load_hf_dtype(&cc, "models/tiny/text_encoder", dt, err) ||
            clip_load_hf_dtype(&ce, "models/tiny/text_encoder", dt, err)) {
            printf("note: %s\n", err);
            expect_true("tiny CLIP loads (models/tiny/text_encoder)", 0);
            return;
        }
        int ok = clip_add_lora(&cc, 4, 4.0f, 0.0f, 11, err) == 0 && clip_add_lora(&ce, 4, 4.0f, 0.0f, 11, err) == 0;
        expect_true("tiny CLIP takes LoRA", ok);
        if (!ok) { clip_free(&cc); clip_free(&ce); return; }
        rng_t r;
        rng_seed(&r, 9);
        for (size_t i = 0; i < cc.num_lora_params; i++) cc.lora_params[i] = ce.lora_params[i] = 0.1f * (rng_uniform(&r) - 0.5f);
        expect_true("clip_to_device(host-emulated device)", clip_to_device(&ce, &nn_ops_emu) == 0);
        for (int i = 0; i < ce.ntable; i++) {
            clip_param *p = &ce.table[i];
            if (p == ce.tok_emb || p == ce.pos_emb) continue;
            for (size_t k = 0; k < p->numel; k++) {
                if (p->data) p->data[k] = NAN;
                else p->data16[k] = 0x7E00;
            }
        }
        for (size_t i = 0; i < ce.num_lora_params; i++) ce.lora_params[i] = NAN;
        int B = 2, T = cc.config.max_pos, C = cc.config.hidden_size;
        std::vector<int> ids((size_t)B * T);
        for (size_t i = 0; i < ids.size(); i++) ids[i] = (int)(rng_u64(&r) % (uint64_t)cc.config.vocab_size);
        size_t n = (size_t)B * T * C;
        vec oc(n), oe(n);
        for (int skip = 1; skip <= 2; skip++) {
            ok = clip_forward(&cc, oc.data(), ids.data(), B, T, skip) == 0 &&
                 clip_forward(&ce, oe.data(), ids.data(), B, T, skip) == 0;
            expect_true("emulated device: CLIP forward runs", ok);
            if (!ok) { printf("note: %s / %s\n", cc.err, ce.err); break; }
            snprintf(name, sizeof name, "emulated device: CLIP forward with LoRA, clip_skip %d%s", skip, wn);
            expect_close(name, oe, oc, FWD);
        }
        // (training forward and backward on the device: test_te_train_emulated)
        clip_free(&cc); clip_free(&ce);
    }
}

/* ---------------------------------------------------------------------------
 * --te and --conv-rank on the device (devte)
 *
 * embedding_kernel: the token + position gather, fp32 and fp16-held tables,
 * bit for bit backend.c's nn_embedding_forward (the CPU's clip.c loop). */
static void test_embedding(void) {
    int V = 50, P = 9, B = 2, T = 7, C = 12;
    vec tok = randv((size_t)V * C, -2.0f, 2.0f, 401), pos = randv((size_t)P * C, -2.0f, 2.0f, 402);
    std::vector<uint16_t> tok16(tok.size()), pos16(pos.size());
    float_to_half_array(tok16.data(), tok.data(), tok.size());
    float_to_half_array(pos16.data(), pos.data(), pos.size());
    std::vector<int> ids((size_t)B * T);
    for (size_t i = 0; i < ids.size(); i++) ids[i] = (int)((i * 37 + 11) % V);
    ids[3] = ids[4] = V - 1;   // repeats and the last row
    size_t n = (size_t)B * T * C;
    for (int f16 = 0; f16 < 2; f16++) {
        vec oe(n, NAN), oc(n, NAN);
        const float *tk = f16 ? NULL : tok.data(), *ps = f16 ? NULL : pos.data();
        const uint16_t *tk16 = f16 ? tok16.data() : NULL, *ps16 = f16 ? pos16.data() : NULL;
        emu_embedding(oe.data(), ids.data(), tk, tk16, ps, ps16, B, T, C);
        nn_embedding_forward(oc.data(), ids.data(), tk, tk16, ps, ps16, B, T, C);
        // the CPU's own loop, written out: rows widened, one add
        int same_loop = 1;
        for (int b = 0; b < B; b++)
            for (int t = 0; t < T; t++)
                for (int c = 0; c < C; c++) {
                    size_t r = (size_t)ids[b * T + t];
                    float te = f16 ? half_to_float(tok16[r * C + c]) : tok[r * C + c];
                    float pe = f16 ? half_to_float(pos16[(size_t)t * C + c]) : pos[(size_t)t * C + c];
                    float x = te + pe, y = oc[((size_t)b * T + t) * C + c];
                    same_loop &= memcmp(&x, &y, sizeof x) == 0;
                }
        expect_true(f16 ? "embedding gather, fp16 tables: nn_embedding_forward is the loop, bit for bit"
                        : "embedding gather, fp32 tables: nn_embedding_forward is the loop, bit for bit", same_loop);
        expect_true(f16 ? "embedding_kernel == nn_embedding_forward, bit for bit (fp16 tables)"
                        : "embedding_kernel == nn_embedding_forward, bit for bit (fp32 tables)",
                    memcmp(oe.data(), oc.data(), n * sizeof(float)) == 0);
    }
}

/* lora.cu's conv LoRA (cuda/layers.cuh lora_conv_*_t on HostBK) against
 * lora.c's, forward and backward (accumulating, with dropout), at the
 * shapes unet.c uses: 3x3 pad 1 (conv1, conv2, upsampler), 3x3 stride 2
 * (downsampler), 1x1 (conv_shortcut), 1x1 on 1x1 pixels (time_emb_proj) */
static void test_lora_conv(int Bn, int in, int out, int H, int W, int k, int stride, int pad, int r, float dropout) {
    int kk = k > 1 ? k : 1;
    int Ho = (H + 2 * pad - kk) / stride + 1, Wo = (W + 2 * pad - kk) / stride + 1;
    size_t fan = (size_t)in * kk * kk, nx = (size_t)Bn * in * H * W, ny = (size_t)Bn * out * Ho * Wo;
    vec A0(r * fan), B0((size_t)out * r);
    lora_t L, Lr;
    rng_t init;
    rng_seed(&init, 3);
    if (k > 1) lora_conv_init(&L, in, out, k, r, 8.0f, dropout, A0.data(), B0.data(), &init);
    else lora_init(&L, in, out, r, 8.0f, dropout, A0.data(), B0.data(), 0, &init);
    vec A = randv(r * fan, -0.3f, 0.3f, 411), Bm = randv((size_t)out * r, -0.3f, 0.3f, 412);
    L.A = A.data(); L.B = Bm.data();
    Lr = L;
    vec dA = randv(r * fan, -0.1f, 0.1f, 413), dAr = dA, dB = randv((size_t)out * r, -0.1f, 0.1f, 414), dBr = dB;
    L.dA = dA.data(); L.dB = dB.data(); Lr.dA = dAr.data(); Lr.dB = dBr.data();
    size_t nsf = lora_conv_scratch_floats(&L, Bn, H, W, stride, pad, 0), nsb = lora_conv_scratch_floats(&L, Bn, H, W, stride, pad, 1);
    vec x = randv(nx, -1.0f, 1.0f, 415), y = randv(ny, -1.0f, 1.0f, 416), yr = y;
    vec ax((size_t)Bn * r * Ho * Wo), axr(ax.size()), s(nsb + 1), sr(nsb + 1);
    std::vector<uint8_t> m(nx), mr(nx);
    rng_t g1, g2;
    rng_seed(&g1, 77); rng_seed(&g2, 77);
    lora_conv_forward_t<HostBK>(y.data(), ax.data(), m.data(), nsf ? s.data() : NULL, x.data(), &L, Bn, H, W, stride, pad, &g1);
    lora_conv_forward(yr.data(), axr.data(), mr.data(), nsf ? sr.data() : NULL, x.data(), &Lr, Bn, H, W, stride, pad, &g2);
    char name[160], tag[96];
    snprintf(tag, sizeof tag, "B%d %d->%d %dx%d k%d s%d p%d r%d dropout %g", Bn, in, out, H, W, kk, stride, pad, r, dropout);
    snprintf(name, sizeof name, "conv lora fwd out, ax (%s)", tag);
    expect(name, fmax(rel_err(y.data(), yr.data(), ny), rel_err(ax.data(), axr.data(), ax.size())), FWD);
    if (dropout > 0.0f) {
        snprintf(name, sizeof name, "conv lora fwd dropout mask and rng state exact (%s)", tag);
        expect_true(name, m == mr && g1.state == g2.state);
    }
    vec dy = randv(ny, -1.0f, 1.0f, 417), dx = randv(nx, -0.1f, 0.1f, 418), dxr = dx;
    lora_conv_backward_t<HostBK>(dx.data(), dy.data(), x.data(), ax.data(), m.data(), s.data(), &L, Bn, H, W, stride, pad);
    lora_conv_backward(dxr.data(), dy.data(), x.data(), axr.data(), mr.data(), sr.data(), &Lr, Bn, H, W, stride, pad);
    snprintf(name, sizeof name, "conv lora bwd dx (%s)", tag);
    expect_close(name, dx, dxr, BWD);
    snprintf(name, sizeof name, "conv lora bwd dA, dB (%s)", tag);
    expect(name, fmax(rel_err(dA.data(), dAr.data(), dA.size()), rel_err(dB.data(), dBr.data(), dB.size())), BWD);
    vec dA2 = dA, dB2 = dB;
    L.dA = NULL; L.dB = NULL;
    lora_conv_backward_t<HostBK>(NULL, dy.data(), x.data(), ax.data(), m.data(), s.data(), &L, Bn, H, W, stride, pad);
    snprintf(name, sizeof name, "conv lora bwd, all gradients NULL, writes nothing (%s)", tag);
    expect_true(name, dA2 == dA && dB2 == dB);
}

// models/tiny's UNet with LoRA on the transformers and conv LoRA (--conv-rank 3)
// on every resnet conv / shortcut / time_emb_proj and sampler conv, dropout
// 0.1, every B random (so every gradient is non-zero)
static int tiny_unet_conv(unet_t *u, weight_dtype dt) { return tiny_unet_with(u, "models/tiny/unet", dt, 3, 6); }

/* conv LoRA through unet_to_device (clora_forward / clora_backward on the
 * table) against the CPU: eps, every dA, dB (conv and transformer), dx,
 * dctx, two steps with an AdamW update between, plain and checkpointed,
 * fp32 and fp16-held weights; then inference. The host's weights and LoRA
 * poisoned while the device works. */
static void test_conv_lora_unet_emulated(void) {
    emu_init();
    for (int run = 0; run < 3; run++) {
        int mode = run == 1 ? 2 : 1;
        weight_dtype dt = run == 2 ? WEIGHT_F16 : WEIGHT_F32;
        unet_t uc, ue;
        if (tiny_unet_conv(&uc, dt) || tiny_unet_conv(&ue, dt)) { expect_true("tiny UNet with conv LoRA loads", 0); return; }
        int nconv = 0;
        for (int k = 0; k < uc.nloras; k++) nconv += uc.loras[k].is_conv;
        if (run == 0) {
            char name[160];
            snprintf(name, sizeof name, "tiny UNet takes conv LoRA (%d adapters, %d on convs)", uc.nloras, nconv);
            expect_true(name, nconv > 0);
        }
        int ok = unet_to_device(&ue, &nn_ops_emu) == 0;
        expect_true("unet_to_device with conv LoRA (--conv-rank) runs", ok);
        if (!ok) { printf("note: %s\n", ue.err); unet_free(&uc); unet_free(&ue); return; }
        const char *mname = mode == 2 ? ", checkpointed" : dt == WEIGHT_F16 ? ", fp16 weights" : "";
        unet_twin_steps(uc, ue, mode, dt, run == 0, "emulated device, conv LoRA", mname, 421, {113.0f, 640.0f}, 1);
        unet_free(&uc); unet_free(&ue);
    }
}

/* the review finding in unet.c's resnet backward: with full gradients a
 * conv adapter takes silu(n1) / silu(n2) from a1 / g2, where the frozen
 * conv's weight gradient already put them, instead of making them again.
 * On the CPU: the adapters' dA, dB, dx and dctx with full gradients on are
 * bit for bit those without. */
static void test_conv_lora_full_grads(void) {
    unet_t ug, un;
    if (tiny_unet_conv(&ug, WEIGHT_F32) || tiny_unet_conv(&un, WEIGHT_F32)) { expect_true("tiny UNet with conv LoRA loads", 0); return; }
    int ok = unet_alloc_grads(&ug) == 0;
    int B = 1, h = 8, w = 8, Tc = 5;
    const unet_config *c = &ug.cfg;
    size_t nx = (size_t)B * c->in_channels * h * w, nc = (size_t)B * Tc * c->cross_dim;
    vec x = randv(nx, -1.0f, 1.0f, 451), ctx = randv(nc, -1.0f, 1.0f, 452), t = {301.0f}, deps = randv(nx, -1.0f, 1.0f, 453);
    vec eg(nx), en(nx), dxg(nx), dxn(nx), dcg(nc), dcn(nc);
    ok = ok && unet_alloc_acts(&ug, B, h, w, Tc, 1) == 0 && unet_alloc_acts(&un, B, h, w, Tc, 1) == 0 &&
         unet_forward(&ug, eg.data(), x.data(), t.data(), ctx.data(), B, h, w, Tc) == 0 &&
         unet_forward(&un, en.data(), x.data(), t.data(), ctx.data(), B, h, w, Tc) == 0 &&
         unet_backward(&ug, deps.data(), dxg.data(), dcg.data()) == 0 &&
         unet_backward(&un, deps.data(), dxn.data(), dcn.data()) == 0;
    expect_true("conv LoRA with full gradients runs", ok);
    if (ok) {
        double gmax = 0;
        for (size_t i = 0; i < ug.nparams; i++) gmax = fmax(gmax, fabs(ug.grads[i]));
        expect_true("conv LoRA with full gradients: dA, dB, dx, dctx bit for bit those without (silu reused, not remade)",
                    gmax > 0 && memcmp(ug.lora_grads, un.lora_grads, sizeof(float) * ug.lora_nparams) == 0 &&
                    dxg == dxn && dcg == dcn);
    }
    unet_free(&ug); unet_free(&un);
}

/* A --te training step as train.c's device path runs it, against the CPU's:
 * the ids go up and the text encoder's forward leaves ctx on the device
 * (clip_forward(NULL), clip_device_out), the UNet reads it in place
 * (ctx_on_device) and writes dctx there, clip_backward reads it there; the
 * loss, --clip over both gradient sets (nn_clip_grad_norm2) and both
 * AdamW steps on the device. CLIP and UNet LoRA with dropout 0.1 (the masks
 * drawn on the device from the same streams), min-SNR-like weights, batch 2,
 * --clip small enough to clip every step, fp32 and fp16-held weights. The
 * host's LoRA A, B, gradients poisoned: nothing but the device's copies
 * may be used until A, B come down at the end, as for a save. */
static void test_te_train_emulated(void) {
    emu_init();
    const nn_ops *E = &nn_ops_emu;
    for (int run = 0; run < 2; run++) {
        weight_dtype dt = run ? WEIGHT_F16 : WEIGHT_F32;
        const char *wn = run ? ", fp16 weights" : "";
        char err[ST_ERR_LEN], name[200];
        clip_t cc, ce;
        if (clip_load_hf_dtype(&cc, "models/tiny/text_encoder", dt, err) ||
            clip_load_hf_dtype(&ce, "models/tiny/text_encoder", dt, err) ||
            clip_add_lora(&cc, 4, 4.0f, 0.1f, 12, err) || clip_add_lora(&ce, 4, 4.0f, 0.1f, 12, err)) {
            printf("note: %s\n", err);
            expect_true("tiny CLIP loads and takes LoRA", 0);
            return;
        }
        int B = 2, T = cc.config.max_pos, C = cc.config.hidden_size, nsteps = 3;
        train_side fc, fe;      // the UNets: the CPU's; the emulated device's
        if (side_init(&fc, NULL, dt, T, 1e-8f) || side_init(&fe, E, dt, T, 1e-8f)) { expect_true("tiny UNet loads", 0); return; }
        rng_t r;
        rng_seed(&r, 13);
        for (size_t i = 0; i < cc.num_lora_params; i++) cc.lora_params[i] = ce.lora_params[i] = 0.1f * (rng_uniform(&r) - 0.5f);
        cc.training = ce.training = 1;
        int ok = fc.ok && fe.ok && clip_to_device(&ce, E) == 0;
        expect_true("clip_to_device with trainable LoRA (--te) runs", ok);
        if (!ok) { printf("note: %s / %s\n", fe.u.err, ce.err); return; }
        fe.u.ctx_on_device = 1;
        size_t n1 = fc.n, n2 = cc.num_lora_params, per = fc.per, nc = (size_t)B * T * C;
        adamw_t o2c, o2d;       // the text encoder's AdamW (the UNet's: fc.o, fe.o)
        adamw_init(&o2c, n2, 5e-3f, 0.9f, 0.999f, 1e-8f, 1e-2f);
        adamw_init(&o2d, n2, 5e-3f, 0.9f, 0.999f, 1e-8f, 1e-2f);
        ok = adamw_to(E, &o2d);
        float *ddctx = (float *)E->alloc(sizeof(float) * nc);
        for (size_t i = 0; i < n2; i++) ce.lora_params[i] = ce.lora_grads[i] = NAN;
        std::vector<int> ids((size_t)B * T);
        vec wt = {0.6f, 1.1f}, ctxc(nc), dctxc(nc);
        const float clip = 1e-3f;
        int clipped = 1;
        for (int step = 0; ok && step < nsteps; step++) {
            for (size_t i = 0; i < ids.size(); i++) ids[i] = (int)(rng_u64(&r) % (uint64_t)cc.config.vocab_size);
            vec x = randv(fc.nx, -1.0f, 1.0f, 430 + step), target = randv(B * per, -1.0f, 1.0f, 440 + step);
            vec t = {(float)(20 + 300 * step), (float)(950 - 200 * step)};
            float lr1 = 1e-2f, lr2 = 5e-3f, Lc, Le;
            // CPU, as train.c's micro_step and optimizer_step
            clip_zero_grad(&cc);
            ok = clip_forward(&cc, ctxc.data(), ids.data(), B, T, 1) == 0 &&
                 side_step(&fc, x.data(), t.data(), ctxc.data(), target.data(), wt.data(), 1.0f, dctxc.data(), &Lc) &&
                 clip_backward(&cc, dctxc.data()) == 0;
            if (!ok) break;
            vec g1c(fc.u.lora_grads, fc.u.lora_grads + n1), g2c(cc.lora_grads, cc.lora_grads + n2);
            double s2 = 0;
            for (size_t i = 0; i < n1; i++) s2 += (double)fc.u.lora_grads[i] * fc.u.lora_grads[i];
            for (size_t i = 0; i < n2; i++) s2 += (double)cc.lora_grads[i] * cc.lora_grads[i];
            float normc = (float)sqrt(s2), coef = clip / (normc + 1e-6f);
            if (coef < 1.0f) {
                for (size_t i = 0; i < n1; i++) fc.u.lora_grads[i] *= coef;
                for (size_t i = 0; i < n2; i++) cc.lora_grads[i] *= coef;
            }
            adamw_step(&fc.o, fc.u.lora_params, fc.u.lora_grads, lr1);
            adamw_step(&o2c, cc.lora_params, cc.lora_grads, lr2);
            // the emulated device, as train.c's device path
            float *dctx_out = NULL;
            clip_zero_grad(&ce);
            ok = clip_forward(&ce, NULL, ids.data(), B, T, 1) == 0 && (dctx_out = clip_device_out(&ce)) != NULL &&
                 E->upload(fe.dtarget, target.data(), sizeof(float) * B * per) && E->upload(fe.dwt, wt.data(), sizeof(float) * B) &&
                 side_step(&fe, x.data(), t.data(), dctx_out, fe.dtarget, fe.dwt, 1.0f, ddctx, &Le) &&
                 clip_backward(&ce, ddctx) == 0;
            if (!ok) break;
            vec g1e(n1), g2e(n2), ctxe(nc), dctxe(nc);
            ok = E->download(g1e.data(), fe.u.dlora_grads, sizeof(float) * n1) &&
                 E->download(g2e.data(), ce.dlora_grads, sizeof(float) * n2) &&
                 E->download(ctxe.data(), dctx_out, sizeof(float) * nc) && E->download(dctxe.data(), ddctx, sizeof(float) * nc);
            snprintf(name, sizeof name, "emulated --te step %d: CLIP out (the UNet's ctx) on the device%s", step + 1, wn);
            expect_close(name, ctxe, ctxc, FWD);
            snprintf(name, sizeof name, "emulated --te step %d: loss%s", step + 1, wn);
            expect(name, fabs((double)Le - Lc) / fabs((double)Lc), FWD);
            snprintf(name, sizeof name, "emulated --te step %d: dctx, left on the device%s", step + 1, wn);
            expect_close(name, dctxe, dctxc, FWD);
            snprintf(name, sizeof name, "emulated --te step %d: UNet LoRA dA, dB (%zu)%s", step + 1, n1, wn);
            expect_close(name, g1e, g1c, FWD);
            snprintf(name, sizeof name, "emulated --te step %d: text encoder LoRA dA, dB (%zu)%s", step + 1, n2, wn);
            expect_close(name, g2e, g2c, FWD);
            snprintf(name, sizeof name, "emulated --te step %d: both dropout streams advance as the CPU's%s", step + 1, wn);
            expect_true(name, fc.u.dropout_rng.state == fe.u.dropout_rng.state && cc.rng.state == ce.rng.state);
            float norme = nn_clip_grad_norm2(E, fe.u.dlora_grads, n1, ce.dlora_grads, n2, clip);
            E->adamw_step(&fe.o, fe.u.dlora_params, fe.u.dlora_grads, lr1);
            E->adamw_step(&o2d, ce.dlora_params, ce.dlora_grads, lr2);
            snprintf(name, sizeof name, "emulated --te step %d: --clip norm over both sets%s", step + 1, wn);
            expect(name, fabs((double)norme - normc) / normc, FWD);
            clipped &= normc > clip && norme > clip;
        }
        expect_true("emulated --te: every call succeeded", ok);
        if (!ok) printf("note: %s / %s / %s / %s\n", fc.u.err, fe.u.err, cc.err, ce.err);
        expect_true("emulated --te: --clip clipped every step", clipped);
        // as device_to_host before a save: A, B and the moments come down only now
        int untouched = 1;
        for (size_t i = 0; i < n1; i++) untouched &= isnan(fe.u.lora_params[i]) != 0;
        for (size_t i = 0; i < n2; i++) untouched &= isnan(ce.lora_params[i]) && isnan(ce.lora_grads[i]);
        expect_true("emulated --te: the host's A, B, dA, dB never touched during the steps", untouched);
        vec p2e(n2), m2e(n2), v2e(n2), p1e, m1e, v1e;
        ok = ok && side_state(&fe, &p1e, &m1e, &v1e) &&
             E->download(ce.lora_params, ce.dlora_params, sizeof(float) * n2) &&
             E->download(m2e.data(), o2d.m, sizeof(float) * n2) && E->download(v2e.data(), o2d.v, sizeof(float) * n2);
        if (ok) {
            // the UNet's AdamW state rather than its A, B: Adam divides each
            // element by its own RMS, so an element whose clipped gradient is
            // near zero (many, at --clip 1e-3) carries its rounding into the
            // update at full lr (the parameters themselves: test_train_emulated)
            snprintf(name, sizeof name, "emulated --te: UNet AdamW m, v after %d steps%s", nsteps, wn);
            expect(name, fmax(rel_err(m1e.data(), fc.o.m, n1), rel_err(v1e.data(), fc.o.v, n1)), FWD);
            snprintf(name, sizeof name, "emulated --te: text encoder LoRA A, B (downloaded, as saved) after %d steps%s", nsteps, wn);
            expect_close(name, vec(ce.lora_params, ce.lora_params + n2), vec(cc.lora_params, cc.lora_params + n2), FWD);
            snprintf(name, sizeof name, "emulated --te: text encoder AdamW m, v after %d steps%s", nsteps, wn);
            expect(name, fmax(rel_err(m2e.data(), o2c.m, n2), rel_err(v2e.data(), o2c.v, n2)), FWD);
            expect_true("emulated --te: AdamW step counts", fe.o.step == nsteps && o2d.step == nsteps);
        }
        // inference after training: the trained adapters on the device, output down
        cc.training = ce.training = 0;
        vec oc(nc), oe(nc);
        ok = clip_forward(&cc, oc.data(), ids.data(), B, T, 2) == 0 && clip_forward(&ce, oe.data(), ids.data(), B, T, 2) == 0;
        expect_true("emulated --te: an inference forward after training runs", ok);
        snprintf(name, sizeof name, "emulated --te: inference forward with the trained LoRA, clip_skip 2%s", wn);
        if (ok) expect_close(name, oe, oc, FWD);
        E->free(ddctx);
        adamw_free(&o2c); adamw_free_on(E, &o2d);
        clip_free(&cc); clip_free(&ce);
        side_free(&fc); side_free(&fe);
    }
}

/* On a GPU only (not run yet, as dev_nn): the devte entries of nn_ops_cuda()
 * themselves against the CPU: conv LoRA forward and backward (3x3 with
 * dropout, the stride-2 downsampler, 1x1), the embedding gather (exact), and
 * --clip over two device sets (nn_clip_grad_norm2) against the host's sum. */
static void dev_devte(void) {
    const nn_ops *D = nn_ops_cuda();
    struct { int Bn, in, out, H, W, k, stride, pad, r; float p; } cs[] = {
        {2, 5, 6, 7, 6, 3, 1, 1, 3, 0.1f}, {2, 4, 4, 9, 8, 3, 2, 1, 3, 0.0f}, {2, 6, 3, 5, 4, 0, 1, 0, 2, 0.1f}};
    for (auto &q : cs) {
        int kk = q.k > 1 ? q.k : 1, Ho = (q.H + 2 * q.pad - kk) / q.stride + 1, Wo = (q.W + 2 * q.pad - kk) / q.stride + 1;
        size_t fan = (size_t)q.in * kk * kk, nx = (size_t)q.Bn * q.in * q.H * q.W, ny = (size_t)q.Bn * q.out * Ho * Wo;
        vec A0(q.r * fan), B0((size_t)q.out * q.r);
        lora_t L, Ld;
        rng_t init;
        rng_seed(&init, 3);
        if (q.k > 1) lora_conv_init(&L, q.in, q.out, q.k, q.r, 8.0f, q.p, A0.data(), B0.data(), &init);
        else lora_init(&L, q.in, q.out, q.r, 8.0f, q.p, A0.data(), B0.data(), 0, &init);
        vec A = randv(A0.size(), -0.3f, 0.3f, 461), Bm = randv(B0.size(), -0.3f, 0.3f, 462);
        vec dA = randv(A.size(), -0.1f, 0.1f, 463), dB = randv(Bm.size(), -0.1f, 0.1f, 464);
        Ld = L;
        L.A = A.data(); L.B = Bm.data(); L.dA = dA.data(); L.dB = dB.data();
        Ld.A = up(A); Ld.B = up(Bm); Ld.dA = up(dA); Ld.dB = up(dB);
        size_t ns = lora_conv_scratch_floats(&L, q.Bn, q.H, q.W, q.stride, q.pad, 1) + 1;
        vec x = randv(nx, -1.0f, 1.0f, 465), y = randv(ny, -1.0f, 1.0f, 466), ax((size_t)q.Bn * q.r * Ho * Wo), sc(ns);
        std::vector<uint8_t> m(nx);
        uint8_t *pm = (uint8_t *)cuda_alloc(nx);
        g_dev.push_back(pm);
        float *px = up(x), *py = up(y), *pax = dzeros(ax.size()), *ps = dzeros(ns);
        rng_t g1, g2;
        rng_seed(&g1, 77); rng_seed(&g2, 77);
        lora_conv_forward(y.data(), ax.data(), m.data(), sc.data(), x.data(), &L, q.Bn, q.H, q.W, q.stride, q.pad, &g1);
        D->lora_conv_forward(py, pax, pm, ps, px, &Ld, q.Bn, q.H, q.W, q.stride, q.pad, &g2);
        char name[160];
        snprintf(name, sizeof name, "device conv lora fwd k%d s%d dropout %g", kk, q.stride, q.p);
        expect(name, fmax(rel_err(down(py, ny).data(), y.data(), ny), rel_err(down(pax, ax.size()).data(), ax.data(), ax.size())), FWD);
        vec dy = randv(ny, -1.0f, 1.0f, 467), dx = randv(nx, -0.1f, 0.1f, 468);
        float *pdy = up(dy), *pdx = up(dx);
        lora_conv_backward(dx.data(), dy.data(), x.data(), ax.data(), m.data(), sc.data(), &L, q.Bn, q.H, q.W, q.stride, q.pad);
        D->lora_conv_backward(pdx, pdy, px, pax, pm, ps, &Ld, q.Bn, q.H, q.W, q.stride, q.pad);
        snprintf(name, sizeof name, "device conv lora bwd dx, dA, dB k%d s%d dropout %g", kk, q.stride, q.p);
        expect(name, fmax(fmax(rel_err(down(pdx, nx).data(), dx.data(), nx),
                               rel_err(down(Ld.dA, dA.size()).data(), dA.data(), dA.size())),
                          rel_err(down(Ld.dB, dB.size()).data(), dB.data(), dB.size())), BWD);
    }
    // the embedding gather, fp32 and fp16 tables: exact
    int V = 50, P = 9, B = 2, T = 7, C = 12;
    vec tok = randv((size_t)V * C, -2.0f, 2.0f, 471), pos = randv((size_t)P * C, -2.0f, 2.0f, 472);
    std::vector<uint16_t> tok16(tok.size()), pos16(pos.size());
    float_to_half_array(tok16.data(), tok.data(), tok.size());
    float_to_half_array(pos16.data(), pos.data(), pos.size());
    std::vector<int> ids((size_t)B * T);
    for (size_t i = 0; i < ids.size(); i++) ids[i] = (int)((i * 37 + 11) % V);
    int *pids = (int *)cuda_alloc(ids.size() * sizeof(int));
    uint16_t *pt16 = (uint16_t *)cuda_alloc(tok16.size() * 2), *pp16 = (uint16_t *)cuda_alloc(pos16.size() * 2);
    g_dev.push_back(pids); g_dev.push_back(pt16); g_dev.push_back(pp16);
    cuda_upload(pids, ids.data(), ids.size() * sizeof(int));
    cuda_upload(pt16, tok16.data(), tok16.size() * 2);
    cuda_upload(pp16, pos16.data(), pos16.size() * 2);
    float *ptok = up(tok), *ppos = up(pos), *pout = dzeros((size_t)B * T * C);
    for (int f16 = 0; f16 < 2; f16++) {
        vec oc((size_t)B * T * C);
        nn_embedding_forward(oc.data(), ids.data(), f16 ? NULL : tok.data(), f16 ? tok16.data() : NULL,
                             f16 ? NULL : pos.data(), f16 ? pos16.data() : NULL, B, T, C);
        D->embedding_forward(pout, pids, f16 ? NULL : ptok, f16 ? pt16 : NULL, f16 ? NULL : ppos, f16 ? pp16 : NULL, B, T, C);
        expect_close(f16 ? "device embedding gather, fp16 tables (exact)" : "device embedding gather, fp32 tables (exact)",
                     down(pout, oc.size()), oc, 0.0);
    }
    // --clip over two device sets against the host's one chain
    vec g1 = randv(3 * NN_SUMSQ_CHUNK + 5, -1.0f, 1.0f, 481), g2 = randv(NN_SUMSQ_CHUNK + 9, -1.0f, 1.0f, 482);
    double s2 = 0;
    for (float v : g1) s2 += (double)v * v;
    for (float v : g2) s2 += (double)v * v;
    float *pg1 = up(g1), *pg2 = up(g2);
    float norm = nn_clip_grad_norm2(D, pg1, g1.size(), pg2, g2.size(), 1.0f);
    float coef = 1.0f / ((float)sqrt(s2) + 1e-6f);
    for (float &v : g2) v *= coef;
    expect("device --clip over two sets: the norm", fabs((double)norm - sqrt(s2)) / sqrt(s2), 1e-6);
    expect_close("device --clip over two sets: the second set scaled", down(pg2, g2.size()), g2, 1e-6);
    dev_done("devte entries");
}

/* ---------------------------------------------------------------------------
 * Mixed precision on the device (--compute bf16|fp16; cuda/mixed_ops.cuh,
 * gemm.cu, backend.c's loss scaler). The emulated device rounds each GEMM
 * operand with the functions round_kernel runs, then sums in fp32. */

// the device's rounding against the CPU's: bf16_bits == matmul_bf16.c's
// gemm_bf16_round on every input, f16_bits == half.c's float_to_half on every
// non-NaN input (a NaN must stay a NaN), over every 4099th fp32 bit pattern
// (all exponents, signs and NaN/inf) and the edges of fp16's ranges
static void test_lowp_rounding(void) {
    static const uint32_t edges[] = {0x00000000u, 0x00000001u, 0x33000000u, 0x33000001u, 0x337fffffu, 0x33800000u,
                                     0x33c00000u, 0x387fc000u, 0x387fe000u, 0x387fffffu, 0x38800000u, 0x38801000u,
                                     0x38802000u, 0x3f800000u, 0x3f801000u, 0x3f803000u, 0x477fe000u, 0x477fefffu,
                                     0x477ff000u, 0x477fffffu, 0x47800000u, 0x7f7fffffu, 0x7f800000u, 0x7fc00000u,
                                     0x7f800001u, 0x3f7fffffu, 0x3f808000u, 0x3f818000u};
    size_t n = 0, bf_bad = 0, f16_bad = 0;
    auto check = [&](uint32_t u) {
        float f;
        memcpy(&f, &u, 4);
        n++;
        bf_bad += bf16_bits(f) != gemm_bf16_round(f);
        uint16_t h = f16_bits(f);
        if (isnan(f)) f16_bad += (h & 0x7c00u) != 0x7c00u || (h & 0x3ffu) == 0;
        else f16_bad += h != float_to_half(f);
    };
    for (uint64_t u = 0; u <= 0xffffffffull; u += 4099) check((uint32_t)u);
    for (uint32_t e : edges) { check(e); check(e | 0x80000000u); check(e + 0x1000u); check(e - 1u); }
    char name[160];
    snprintf(name, sizeof name, "device bf16 rounding == gemm_bf16_round on %zu floats (%zu differ)", n, bf_bad);
    expect_true(name, bf_bad == 0);
    snprintf(name, sizeof name, "device fp16 rounding == half.c's float_to_half on %zu floats (%zu differ)", n, f16_bad);
    expect_true(name, f16_bad == 0);
    expect_true("fp16 rounding: 65519 -> 65504, 65520 -> inf, 2^-25 -> 0, 1.5 * 2^-25 -> 2^-24",
                f16_bits(65519.0f) == 0x7bff && f16_bits(65520.0f) == 0x7c00 && f16_bits(2.98023224e-8f) == 0 &&
                f16_bits(4.47034836e-8f) == 1);
}

// the GEMM layers of layers.cuh in the bf16 mode (HostBK rounding each
// operand as round_kernel does) against nn.c's, attention.c's and lora.c's
// under gemm_set_compute(GEMM_BF16), at the fp32 tolerances: the same
// rounded operands, exact products, only the fp32 sums in another order
static void test_layers_lowp(void) {
    printf("-- the GEMM layers in bf16: device (emulated) vs CPU --compute bf16\n");
    g_host_lowp = LOWP_BF16;
    gemm_set_compute(GEMM_BF16);
    test_linear(29, 48, 33, 1);
    test_conv(2, 5, 9, 8, 6, 3, 3, 1, 1);
    test_conv(1, 4, 9, 10, 3, 3, 3, 2, 1);
    test_conv(2, 6, 5, 7, 4, 1, 1, 1, 0);
    test_attention(2, 13, 13, 3, 8, 0, 1);
    test_attention(1, 21, 7, 2, 16, 0, 0);
    test_attention(1, 300, 300, 2, 8, 1, 0);
    test_lora(19, 40, 24, 4, 0.0f);
    test_lora(11, 33, 17, 3, 0.25f);
    g_host_lowp = LOWP_F32;
    gemm_set_compute(GEMM_F32);
}

// nsteps LoRA training steps of the tiny UNet (as test_train_emulated: batch 2,
// min-SNR-like weights, --clip 1e-3), on the CPU (dev NULL: train.c's CPU path
// under gemm_set_compute(cpu_mode)) or on the emulated device at compute mode
// lowp (train.c's device path: the scaler s under fp16, --clip, AdamW).
// Records each step's loss, gradient and whether it was taken; A, B and the
// AdamW moments after the last. Step `huge_at` gets loss scale 1e30 first.
struct mp_run {
    vec loss, params, m, v;
    std::vector<vec> grad;        // each step's LoRA gradient (unscaled, before --clip)
    std::vector<int> taken;
    long adam_step;
    std::vector<float> scale;     // the scale after each step (fp16)
    int ok;
};
static mp_run mp_train(const nn_ops *dev, int lowp, int cpu_mode, nn_loss_scaler *s, int nsteps, int huge_at) {
    mp_run r;
    r.ok = 0;
    r.adam_step = 0;
    if (dev) g_host_lowp = lowp;
    gemm_set_compute(dev ? GEMM_F32 : cpu_mode);
    train_side f;
    int ok = side_init(&f, dev, WEIGHT_F32, 7, 1e-8f) == 0;
    if (!ok) { g_host_lowp = LOWP_F32; gemm_set_compute(GEMM_F32); return r; }
    int B = f.B;
    size_t n = f.n, per = f.per;
    vec ctx = randv(f.nc, -1.0f, 1.0f, 302), wt = {0.8f, 0.3f};
    const float clip = 1e-3f;
    ok = f.ok && (!dev || dev->upload(f.dwt, wt.data(), sizeof(float) * B));
    for (int step = 0; ok && step < nsteps; step++) {
        vec x, target, t;
        side_inputs(&f, step, &x, &target, &t);
        float lr = 1e-2f * (step + 1) / 4, L;
        int taken = 1;
        if (!dev) {
            ok = side_step(&f, x.data(), t.data(), ctx.data(), target.data(), wt.data(), 1.0f, NULL, &L);
            r.grad.push_back(vec(f.u.lora_grads, f.u.lora_grads + n));
            side_update(&f, clip, lr);
        } else {
            if (s && step == huge_at) s->scale = 1e30f;
            ok = dev->upload(f.dtarget, target.data(), sizeof(float) * B * per) &&
                 side_step(&f, x.data(), t.data(), ctx.data(), f.dtarget, f.dwt, s ? s->scale : 1.0f, NULL, &L);   // as device_loss_step
            if (!ok) break;
            vec g(n);
            ok = dev->download(g.data(), f.u.dlora_grads, sizeof(float) * n);
            for (float &e : g) e /= s ? s->scale : 1.0f;
            r.grad.push_back(g);
            // train.c's optimizer_step on the device: the scaler (fp16), --clip, AdamW
            taken = !s || nn_loss_scaler_unscale(s, dev, f.u.dlora_grads, n, &nn_ops_cpu, NULL, 0);
            if (taken) side_update(&f, clip, lr);
            if (s) r.scale.push_back(s->scale);
        }
        r.loss.push_back(L);
        r.taken.push_back(taken);
    }
    ok = ok && side_state(&f, &r.params, &r.m, &r.v);
    r.adam_step = f.o.step;
    r.ok = ok;
    side_free(&f);
    g_host_lowp = LOWP_F32;
    gemm_set_compute(GEMM_F32);
    return r;
}
static double loss_err(const vec &a, const vec &b) {
    double e = a.size() == b.size() ? 0 : INFINITY;
    for (size_t i = 0; i < a.size() && i < b.size(); i++) e = fmax(e, fabs((double)a[i] - b[i]) / fabs((double)b[i]));
    return e;
}

/* --compute bf16 on the (emulated) device against the CPU's --compute bf16:
 * a training step (loss, every LoRA gradient), then 3 more (losses). Both
 * round the same operands the same way and bf16 products are exact in fp32
 * (test_layers_lowp: layer by layer they agree to 1e-7..2e-5), but the order
 * of the fp32 sums differs (im2col vs shifted-GEMM convolutions, double vs
 * float-tree norms), and under bf16 a 1e-7 difference now and then flips an
 * operand's rounding by 2^-9; over the step's ~40 rounded layers the flips
 * cascade, so the two runs differ at bf16's own level: measured 2.6e-4 on
 * the loss and 5.9e-3 (of the largest) on the gradient, the same (2.9e-4,
 * 5.7e-3) when the emulation calls the CPU's own bf16 GEMM instead, so the
 * spread is that cascade, not the rounding. Tolerances: 2e-3 on the loss
 * (bf16's unit roundoff 2^-9) and 2e-2 on the gradient, about 7x and 3x
 * the measured. A, B after the steps are not compared: AdamW divides by
 * sqrt(v), which turns a near-zero gradient's tiny difference into an
 * lr-sized step. That the emulation rounded at all: its loss differs from
 * the CPU's fp32 loss by more than 1e-4 (bf16 vs fp32 on the CPU: 9.4e-4). */
static void test_train_bf16_emulated(void) {
    emu_init();
    mp_run c32 = mp_train(NULL, LOWP_F32, GEMM_F32, NULL, 4, -1);
    mp_run cbf = mp_train(NULL, LOWP_F32, GEMM_BF16, NULL, 4, -1);
    mp_run ebf = mp_train(&nn_ops_emu, LOWP_BF16, GEMM_F32, NULL, 4, -1);
    int ok = c32.ok && cbf.ok && ebf.ok && ebf.loss.size() == 4 && cbf.loss.size() == 4;
    expect_true("mixed precision: the CPU fp32, CPU bf16 and emulated bf16 runs train", ok);
    if (!ok) return;
    size_t n = cbf.grad[0].size();
    printf("note: step 1, CPU bf16 vs CPU fp32: loss %.3g, gradient %.3g\n",
           fabs(cbf.loss[0] - c32.loss[0]) / c32.loss[0], rel_err(cbf.grad[0].data(), c32.grad[0].data(), n));
    expect("emulated bf16 training step 1: loss vs CPU --compute bf16", fabs(ebf.loss[0] - cbf.loss[0]) / cbf.loss[0], 2e-3);
    expect("emulated bf16 training step 1: every LoRA gradient vs CPU bf16", rel_err(ebf.grad[0].data(), cbf.grad[0].data(), n), 2e-2);
    expect("emulated bf16 training: losses of steps 1-4 vs CPU bf16", loss_err(ebf.loss, cbf.loss), 2e-3);
    expect_true("emulated bf16 step 1's loss is not fp32's (differs by > 1e-4: the operands were rounded)",
                fabs(ebf.loss[0] - c32.loss[0]) / c32.loss[0] > 1e-4);
}

/* --compute fp16 on the emulated device: three steps at the initial scale
 * 65536 (interval 2: the scale doubles after the second), close to the CPU's
 * fp32 run (fp16's 11-bit operands: 1e-2 relative); then a run whose second
 * step starts at a scale of 1e30, so that deps * scale overflows fp16 in the
 * first GEMM: that step is skipped (A, B, AdamW's moments and step count
 * bit for bit those after step 1) and the scale halves. */
static void test_train_fp16_emulated(void) {
    emu_init();
    mp_run c32 = mp_train(NULL, LOWP_F32, GEMM_F32, NULL, 3, -1);
    nn_loss_scaler s;
    nn_loss_scaler_init(&s);
    expect_true("loss scaler starts at 65536, doubling every 2000 good steps", s.scale == 65536.0f && s.interval == 2000 && s.good == 0);
    s.interval = 2;
    mp_run e16 = mp_train(&nn_ops_emu, LOWP_F16, GEMM_F32, &s, 3, -1);
    expect_true("mixed precision: the emulated fp16 run trains", c32.ok && e16.ok);
    if (!(c32.ok && e16.ok)) return;
    expect_true("fp16 at scale 65536: every step taken; the scale 65536, 131072, 131072 (doubled after 2 good steps)",
                e16.taken == std::vector<int>({1, 1, 1}) && e16.scale == std::vector<float>({65536.0f, 131072.0f, 131072.0f}) &&
                e16.adam_step == 3);
    double dl = loss_err(e16.loss, c32.loss), dg = rel_err(e16.grad[0].data(), c32.grad[0].data(), c32.grad[0].size());
    printf("note: emulated device fp16 vs CPU fp32: losses %.3g, step 1's gradient (unscaled) %.3g\n", dl, dg);
    expect("emulated fp16 training: losses of 3 steps vs CPU fp32", dl, 2e-3);
    expect("emulated fp16 training: step 1's LoRA gradient, unscaled, vs CPU fp32", dg, 1e-2);
    // the overflow: step 2 of 2 at scale 1e30, against a 1-step run
    nn_loss_scaler s1, s2;
    nn_loss_scaler_init(&s1);
    nn_loss_scaler_init(&s2);
    mp_run one = mp_train(&nn_ops_emu, LOWP_F16, GEMM_F32, &s1, 1, -1);
    mp_run two = mp_train(&nn_ops_emu, LOWP_F16, GEMM_F32, &s2, 2, 1);
    expect_true("fp16 overflow runs train", one.ok && two.ok);
    if (!(one.ok && two.ok)) return;
    printf("note: fp16 overflow: step 2 at loss scale 1e30: taken %d, scale after %g\n", two.taken[1], (double)two.scale[1]);
    expect_true("fp16 overflow (loss scale 1e30): the step is skipped and the scale halves to 5e29",
                two.taken == std::vector<int>({1, 0}) && two.scale[1] == 5e29f && s2.good == 0);
    expect_true("fp16 overflow: LoRA A, B, AdamW m, v (bit for bit) and AdamW's step count untouched by the skipped step",
                two.params == one.params && two.m == one.m && two.v == one.v && two.adam_step == 1 && one.adam_step == 1);
    expect_true("fp16 overflow: the skipped step's loss is still finite (the forward did not overflow)", isfinite(two.loss[1]));
}


/* ---------------------------------------------------------------------------
 * The device memory of an SD1.5 LoRA training step at 512^2 (64x64
 * latents), batch 1, fp16-held weights, --grad-checkpoint, "attn" LoRA rank
 * 4, counted without a GPU. Every device allocation is made through the
 * table (unet_to_device: weights; unet_alloc_acts: the arena, the staging
 * buffers, LoRA A, B, dA, dB; train.c: AdamW's m, v and the loss's target)
 * or is one of gemm.cu's grow-only buffers (the scratch, a low-precision
 * GEMM's operand copies) or cuBLAS's workspace. nn_ops_count is a table whose
 * allocations are counted (address space reserved, never touched) and whose
 * operations do nothing but record what the device would ask of those
 * buffers: the layers of layers.cuh run on CountBK, which records the
 * largest scratch and operand-copy requests. unet.c's own code runs
 * unchanged, so a step's layout is the device's. */
static size_t g_cnt_live, g_cnt_peak, g_cnt_scratch, g_cnt_lp;
static int g_cnt_lowp;
static std::vector<std::pair<void *, size_t> > g_cnt_allocs;
static void *cnt_map(size_t bytes) {
    void *p = mmap(NULL, bytes ? bytes : 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}
static void *cnt_alloc(size_t bytes) {
    void *p = cnt_map(bytes);
    if (!p) return NULL;
    g_cnt_allocs.push_back(std::make_pair(p, bytes));
    g_cnt_live += bytes;
    if (g_cnt_live > g_cnt_peak) g_cnt_peak = g_cnt_live;
    return p;
}
static void cnt_free(void *p) {
    for (size_t i = 0; p && i < g_cnt_allocs.size(); i++)
        if (g_cnt_allocs[i].first == p) {
            munmap(p, g_cnt_allocs[i].second ? g_cnt_allocs[i].second : 1);
            g_cnt_live -= g_cnt_allocs[i].second;
            g_cnt_allocs[i] = g_cnt_allocs.back();
            g_cnt_allocs.pop_back();
            return;
        }
}
static void cnt_scratch_need(size_t bytes) { if (bytes > g_cnt_scratch) g_cnt_scratch = bytes; }
struct CountBK {
    static void gemm(int tA, int tB, int M, int N, int K, float alpha, const float *A, int lda,
                     const float *B, int ldb, float beta, float *C, int ldc) {
        gemm_batched(tA, tB, M, N, K, alpha, A, lda, 0, B, ldb, 0, beta, C, ldc, 0, 1);
    }
    // gemm.cu's lp_scratch: both operands' spans as 16-bit copies
    static void gemm_batched(int tA, int tB, int M, int N, int K, float alpha,
                             const float *A, int lda, long long sA, const float *B, int ldb, long long sB,
                             float beta, float *C, int ldc, long long sC, int batch) {
        if (g_cnt_lowp == LOWP_F32 || K <= 0 || alpha == 0.0f || M <= 0 || N <= 0) return;
        size_t na = operand_span(tA ? K : M, tA ? M : K, lda, sA, batch);
        size_t n = ((na + 7) & ~(size_t)7) + operand_span(tB ? N : K, tB ? K : N, ldb, sB, batch);
        if (2 * n > g_cnt_lp) g_cnt_lp = 2 * n;
    }
    static float *scratch(size_t n) {     // never read or written: any non-NULL pointer
        static float dummy;
        cnt_scratch_need(n * sizeof(float));
        return &dummy;
    }
    static void fail(const char *what) { fprintf(stderr, "CountBK: %s\n", what); g_fail++; }
    static int lowp() { return g_cnt_lowp; }
    static void round_copy(float *, const float *, size_t) {}
    static void add_bias_rows(float *, const float *, int, int) {}
    static void add_bias_chan(float *, const float *, int, int, size_t) {}
    static void bias_grad_rows(float *, const float *, int, int) {}
    static void bias_grad_chan(float *, const float *, int, int, size_t) {}
    static void conv_fwd(float *, const float *, const float *, const float *, conv_dims) {}
    static void conv_dinp(float *, const float *, const float *, conv_dims) {}
    static void conv_dw(float *, const float *, const float *, conv_dims) {}
    static void shift_pad(float *, const float *, conv_dims, shift_dims) {}
    static void shift_wpack(float *, const float *, conv_dims) {}
    static void shift_crop(float *, const float *, const float *, conv_dims, shift_dims) {}
    static void shift_dpad(float *, const float *, conv_dims, shift_dims) {}
    static void shift_dx_add(float *, const float *, conv_dims, shift_dims) {}
    static void shift_dw_add(float *, const float *, conv_dims) {}
    static void zero(float *, size_t) {}
    static void dropout_fwd(float *, uint8_t *, const float *, size_t, float, uint64_t) {}
    static void dropout_rebuild(float *, const float *, const uint8_t *, size_t, float) {}
    static void dropout_bwd(float *, const float *, const uint8_t *, size_t, float) {}
    static void softmax_rows(float *, int, int, int, int) {}
    static void softmax_bwd_rows(float *, const float *, int, int) {}
};
static nn_ops nn_ops_count;
static void count_init(void) {
    nn_ops &t = nn_ops_count;
    // the emulated table first: an entry not overridden below (one added to
    // backend.h later) still runs, as on the emulated device, only slower
    emu_init();
    t = nn_ops_emu;
    t.name = "counting device";
    t.device = 1;
    t.alloc = cnt_alloc; t.free = cnt_free;
    t.upload = [](void *, const void *, size_t) { return 1; };
    t.download = [](void *, const void *, size_t) { return 1; };
    t.error = []() -> const char * { return NULL; };
    t.set_layer = [](const char *) {};
    t.copy = [](float *, const float *, size_t) {};
    t.zero = [](float *, size_t) {};
    t.add = [](float *, const float *, const float *, size_t) {};
    t.accumulate = [](float *, const float *, size_t) {};
    t.transpose = [](float *, const float *, int, int, int) {};
    t.add_chan = [](float *, const float *, int, int, size_t) {};
    t.sum_chan = [](float *, const float *, int, int, size_t) {};
    t.widen_f16 = [](float *, const uint16_t *, size_t) {};
    t.move = [](float *, const float *, size_t) {};
    t.pad_br = [](float *, const float *, int, int, int) {};
    t.gemm = CountBK::gemm;
    t.linear_forward = linear_forward_t<CountBK>;
    t.linear_backward = linear_backward_t<CountBK>;
    t.conv2d_forward = conv2d_forward_t<CountBK>;
    t.conv2d_backward = conv2d_backward_t<CountBK>;
    t.groupnorm_forward = [](float *, float *, float *, const float *, const float *, const float *, int, int, int, int, float) {};
    // nn.cu's groupnorm backward: B C 2 floats of scratch for its sums
    t.groupnorm_backward = [](float *, float *, float *, const float *, const float *, const float *, const float *,
                              const float *, int B, int C, int, int) { cnt_scratch_need((size_t)B * C * 2 * sizeof(float)); };
    t.layernorm_forward = [](float *, float *, float *, const float *, const float *, const float *, int, int, float) {};
    t.layernorm_backward = [](float *, float *, float *, const float *, const float *, const float *, const float *,
                              const float *, int, int) {};
    t.silu_forward = [](float *, const float *, size_t) {};
    t.silu_backward = [](float *, const float *, const float *, size_t) {};
    t.gelu_forward = [](float *, const float *, size_t) {};
    t.quickgelu_forward = [](float *, const float *, size_t) {};
    t.geglu_forward = [](float *, const float *, int, int) {};
    t.geglu_backward = [](float *, const float *, const float *, int, int) {};
    t.upsample2x_forward = [](float *, const float *, int, int, int, int) {};
    t.upsample2x_backward = [](float *, const float *, int, int, int, int) {};
    t.timestep_embedding = [](float *, const float *, int, int, int, float, float) {};
    t.attention_forward = attention_forward_t<CountBK>;
    t.attention_backward = attention_backward_t<CountBK>;
    t.lora_forward = lora_forward_t<CountBK>;
    t.lora_backward = lora_backward_t<CountBK>;
    t.adamw_step = [](adamw_t *o, float *, const float *, float) { o->step++; };
    // optim.cu's sum of squares: 2 (runs + 1) floats of scratch; finite
    t.grad_sumsq = [](const float *, size_t n) { cnt_scratch_need(2 * (sumsq_nruns(n) + 1) * sizeof(float)); return 0.0; };
    t.scale = [](float *, float, size_t) {};
    // ddpm.cu's loss: 2 B + 2 floats of scratch
    t.mse_loss_forward = [](const float *, const float *, const float *, int B, size_t) {
        cnt_scratch_need(((size_t)B * 2 + 2) * sizeof(float));
        return 0.0f;
    };
    t.mse_loss_backward = [](float *, const float *, const float *, const float *, float, int, size_t) {};
}

// SD1.5's VAE (diffusers AutoencoderKL) and text encoder (CLIP ViT-L/14's), the keys that matter
static const char *SD15_VAE =
    "{\"_class_name\": \"AutoencoderKL\", \"act_fn\": \"silu\", \"block_out_channels\": [128, 256, 512, 512],"
    " \"down_block_types\": [\"DownEncoderBlock2D\", \"DownEncoderBlock2D\", \"DownEncoderBlock2D\", \"DownEncoderBlock2D\"],"
    " \"in_channels\": 3, \"latent_channels\": 4, \"layers_per_block\": 2, \"norm_num_groups\": 32, \"out_channels\": 3,"
    " \"sample_size\": 512, \"scaling_factor\": 0.18215, \"up_block_types\": [\"UpDecoderBlock2D\", \"UpDecoderBlock2D\","
    " \"UpDecoderBlock2D\", \"UpDecoderBlock2D\"]}";
static const char *SD15_CLIP =
    "{\"architectures\": [\"CLIPTextModel\"], \"hidden_act\": \"quick_gelu\", \"hidden_size\": 768,"
    " \"intermediate_size\": 3072, \"layer_norm_eps\": 1e-05, \"max_position_embeddings\": 77,"
    " \"num_attention_heads\": 12, \"num_hidden_layers\": 12, \"projection_dim\": 768, \"vocab_size\": 49408}";

// the budget's parts, in bytes (vae_clip: the VAE's and CLIP's share of tables)
struct mem_budget { size_t tables, scratch, lp, total, vae_clip, cache_total, vae_arena, clip; double arena_mib; int ok; };
#define CUDA_CONTEXT_ALLOWANCE ((size_t)768 << 20)
// with_vae_clip: the whole of ./train --device cuda in train.c's order:
// AdamW's moments, vae_to_device, clip_to_device, the latent cache's encode
// (vae_alloc_acts at side^2) and the text cache's forward; then build_caches
// shrinks the VAE's arena and releases the scratch, and the UNet goes up
// (unet_up), its arena, a step. Without: the UNet's step alone (with AdamW
// and the loss buffers).
static mem_budget sd15_train_budget(int lowp, int side, int with_vae_clip) {
    mem_budget b = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    char err[UNET_ERR_LEN], jerr[256];
    unet_config c;
    unet_t u;
    vae_t vae;
    clip_t clip;
    int have_vae = 0, have_clip = 0, ok = 1;
    count_init();
    g_cnt_live = g_cnt_peak = g_cnt_scratch = g_cnt_lp = 0;
    g_cnt_lowp = lowp;
    int h = side / 8, w = side / 8, Tc = 77;
    const nn_ops *E = &nn_ops_count;
    // the UNet and its LoRA on the host, then to_device's AdamW moments
    if (unet_config_sd15(&c, err) || unet_build_dtype(&u, &c, WEIGHT_F16, err)) { printf("note: %s\n", err); return b; }
    ok = unet_add_lora(&u, "attn", 4, 4.0f, 0.0f, 7) == 0;
    size_t n = u.lora_nparams, per = (size_t)c.out_channels * h * w;
    adamw_t o;
    adamw_init(&o, 0, 1e-4f, 0.9f, 0.999f, 1e-8f, 1e-2f);
    o.n = n;
    o.m = (float *)E->alloc(sizeof(float) * n);
    o.v = (float *)E->alloc(sizeof(float) * n);
    if (with_vae_clip) {
        vae_config vc;
        clip_config cc;
        json *j = json_parse(SD15_VAE, strlen(SD15_VAE), jerr, sizeof jerr);
        ok = j && vae_config_from_json(&vc, j, err) == 0 && vae_build_dtype(&vae, &vc, WEIGHT_F16, err) == 0;
        json_free(j);
        have_vae = ok;
        ok = ok && clip_config_parse(&cc, SD15_CLIP, strlen(SD15_CLIP), "SD15_CLIP", err) == 0 &&
             clip_init_dtype(&clip, &cc, WEIGHT_F16, err) == 0;
        have_clip = ok;
        if (!ok) printf("note: %s\n", j ? err : jerr);
        ok = ok && vae_to_device(&vae, E) == 0;
        size_t after_vae = g_cnt_live;
        ok = ok && clip_to_device(&clip, E) == 0;
        b.clip = g_cnt_live - after_vae;
        ok = ok && vae_alloc_acts(&vae, 1, side, side, 0) == 0;
        if (ok) {
            int hl = vae_latent_side(&vc, side);
            vec img((size_t)3 * side * side), noise((size_t)vc.latent_channels * hl * hl), lat(noise.size());
            vec ctx((size_t)Tc * cc.hidden_size);
            std::vector<int> ids(Tc, 0);
            ok = vae_encode_latents(&vae, lat.data(), img.data(), noise.data(), 1, side, side) == 0 &&
                 clip_forward(&clip, ctx.data(), ids.data(), 1, Tc, 1) == 0;
            if (!ok) printf("note: %s / %s\n", vae.err, clip.err);
        }
        b.vae_clip = g_cnt_live;
        b.vae_arena = vae.acts.nfloats * sizeof(float);
        b.cache_total = g_cnt_peak + g_cnt_scratch + g_cnt_lp + CUDA_CUBLAS_WORKSPACE + CUDA_CONTEXT_ALLOWANCE;
        // build_caches: the VAE's arena shrunk, cuda_release_scratch
        ok = ok && vae_alloc_acts(&vae, 1, 8, 8, 0) == 0;
        g_cnt_scratch = g_cnt_lp = 0;
        g_cnt_peak = g_cnt_live;      // the steps' peak counts from here
    }
    // build_caches' unet_up, then alloc_buffers: the arena, the loss's target and weights
    ok = ok && unet_to_device(&u, E) == 0;
    ok = ok && unet_alloc_acts(&u, 1, h, w, Tc, 2) == 0;
    if (!ok) printf("note: %s\n", u.err);
    b.arena_mib = (double)u.acts.nfloats * 4 / 1048576.0;
    float *dtarget = (float *)E->alloc(sizeof(float) * per), *dwt = (float *)E->alloc(sizeof(float));
    vec x(per), ctx((size_t)Tc * c.cross_dim), t = {500.0f};
    float *pred, *deps;
    nn_loss_scaler s;
    nn_loss_scaler_init(&s);
    unet_zero_lora_grads(&u);
    ok = ok && unet_forward(&u, NULL, x.data(), t.data(), ctx.data(), 1, h, w, Tc) == 0 && unet_device_io(&u, &pred, &deps) == 0;
    if (ok) {
        E->mse_loss_forward(pred, dtarget, dwt, 1, per);
        E->mse_loss_backward(deps, pred, dtarget, dwt, s.scale, 1, per);
        ok = unet_backward(&u, NULL, NULL, NULL) == 0 &&
             (lowp != LOWP_F16 || nn_loss_scaler_unscale(&s, E, u.dlora_grads, n, &nn_ops_cpu, NULL, 0) == 1);
        nn_clip_grad_norm(E, u.dlora_grads, n, NULL, 0, 1.0f);
        E->adamw_step(&o, u.dlora_params, u.dlora_grads, 1e-4f);
    }
    if (!ok) printf("note: %s\n", u.err);
    b.tables = g_cnt_peak;
    b.scratch = g_cnt_scratch;
    b.lp = g_cnt_lp;
    b.total = b.tables + b.scratch + b.lp + CUDA_CUBLAS_WORKSPACE + CUDA_CONTEXT_ALLOWANCE;
    b.ok = ok;
    E->free(o.m); E->free(o.v); E->free(dtarget); E->free(dwt);
    unet_free(&u);
    if (have_vae) vae_free(&vae);
    if (have_clip) clip_free(&clip);
    g_cnt_lowp = LOWP_F32;
    return b;
}

/* The budget: the table's allocations at their peak, plus the largest
 * scratch and operand copies (grow-only, so all of them are held at the end
 * of a step), cuBLAS's workspace (gemm.cu gives it CUDA_CUBLAS_WORKSPACE)
 * and an allowance for the CUDA context (its kernels, cuBLAS's, the
 * runtime's own heap) that cannot be counted without a GPU: 768 MiB (stated,
 * not measured; tools/gpu_check.sh reports the real total from
 * cudaMemGetInfo). The issue's goal: at most 4 GB (4e9 bytes) in all. The
 * attention's scratch is what would break it: P for SD1.5's 64x64
 * self-attention is 8 heads x 4096^2 floats, 512 MiB, twice that in
 * backward; layers.cuh runs it in passes of at most ATT_PASS_FLOATS. */
static void test_sd15_memory_budget(void) {
    static const int modes[] = {LOWP_F32, LOWP_BF16, LOWP_F16};
    static const char *names[] = {"fp32", "bf16", "fp16"};
    const double M = 1048576.0;
    for (int whole = 0; whole < 2; whole++)
        for (int i = 0; i < 3; i++) {
            mem_budget b = sd15_train_budget(modes[i], 512, whole);
            const char *what = whole ? "./train --device cuda (UNet step + VAE, CLIP for the caches)" : "UNet training step";
            char name[240];
            snprintf(name, sizeof name, "SD1.5 512^2 %s, --compute %s: counted on the emulated device", what, names[i]);
            expect_true(name, b.ok);
            if (!b.ok) return;
            printf("note: SD1.5 LoRA training at 512^2, batch 1, fp16-held weights, --grad-checkpoint, attn r4, --compute %s, %s: "
                   "allocations %.0f MiB (UNet arena %.0f MiB) + scratch %.0f MiB + operand copies %.0f MiB + cuBLAS "
                   "workspace %.0f MiB + CUDA context allowance %.0f MiB = %.0f MiB (%.2f GB)\n",
                   names[i], whole ? "the steps" : what, b.tables / M, b.arena_mib, b.scratch / M, b.lp / M,
                   CUDA_CUBLAS_WORKSPACE / M, CUDA_CONTEXT_ALLOWANCE / M, b.total / M, b.total / 1e9);
            if (whole)
                printf("note:   before them, building the caches (before the UNet goes up): AdamW's moments, VAE and CLIP weights and "
                       "the VAE's 512^2 arena %.0f MiB (the arena %.0f MiB; CLIP's weights and widening buffer %.0f MiB), "
                       "with scratch etc. %.0f MiB (%.2f GB)\n",
                       b.vae_clip / M, b.vae_arena / M, b.clip / M, b.cache_total / M, b.cache_total / 1e9);
            snprintf(name, sizeof name, "SD1.5 512^2 %s, --compute %s: the steps' %.2f GB of device memory <= 4 GB", what,
                     names[i], b.total / 1e9);
            expect_true(name, b.total <= (size_t)4000000000ull);
            if (whole) {
                snprintf(name, sizeof name, "SD1.5 512^2 %s, --compute %s: the caches' %.2f GB <= 4 GB", what, names[i],
                         b.cache_total / 1e9);
                expect_true(name, b.cache_total <= (size_t)4000000000ull);
            }
        }
}

/* a build without CUDA=1: cuda.h's fallback check, as a C program sees it
 * (cuda.h read a second time without SDLORA_CUDA, in its own namespace) */
#undef SDLORA_CUDA_H
#undef SDLORA_CUDA
namespace nobuild {
#include "cuda.h"
}
static void test_not_built(void) {
    char err[CUDA_ERR_LEN];
    int st = nobuild::cuda_device_check(err);
    printf("note: without CUDA=1: %s\n", err);
    expect_true("cuda_device_check in a build without CUDA=1: says so, one line, names make CUDA=1",
                st == nobuild::CUDA_DEV_NOT_BUILT && strncmp(err, "error: --device cuda: ", 22) == 0 &&
                !strchr(err, '\n') && strstr(err, "make CUDA=1") && strstr(err, "--device cpu)"));
}

int main(void) {
    test_groupnorm(2, 32, 64, 8, 1);
    test_groupnorm(1, 16, 7, 4, 0);
    test_groupnorm(1, 40, 64 * 64, 4, 1);      // 10 channels of 64x64 per group, as SD1.5's largest
    test_layernorm(37, 320, 1);
    test_layernorm(5, 77, 0);
    test_layernorm(3, 1280, 1);
    test_pointwise();
    test_dropout();
    test_linear(29, 48, 33, 1);
    test_linear(7, 300, 17, 0);
    test_conv(2, 5, 9, 8, 6, 3, 3, 1, 1);      // resnet conv
    test_conv(1, 4, 9, 10, 3, 3, 3, 2, 1);     // downsampler (odd size)
    test_conv(2, 6, 5, 7, 4, 1, 1, 1, 0);      // 1x1: the cuBLAS path
    test_conv(1, 3, 6, 6, 2, 1, 3, 1, 0);      // kh != kw
    test_conv(3, 4, 7, 5, 5, 3, 3, 1, 0);      // unpadded 3x3, batch 3
    test_conv(1, 2, 8, 9, 3, 5, 5, 1, 2);      // 5x5
    test_conv(1, 3, 6, 7, 4, 4, 4, 2, 1);      // 4x4 stride 2 (direct kernel)
    test_attention(2, 13, 13, 3, 8, 0, 1);
    test_attention(1, 21, 7, 2, 16, 0, 0);     // cross-attention, P recomputed
    test_attention(2, 9, 9, 2, 4, 1, 1);       // causal (CLIP)
    test_attention(1, 300, 300, 2, 8, 1, 0);   // rows longer than a block, causal, recomputed
    test_lora(19, 40, 24, 4, 0.0f);
    test_lora(11, 33, 17, 3, 0.25f);
    test_adamw();
    test_ddpm();
    test_unet_emulated();
    test_train_emulated();
    test_ddpm_draws();
    test_train_draws_emulated();
    test_vae_emulated();
    test_clip_emulated();
    test_embedding();
    test_lora_conv(2, 5, 6, 7, 6, 3, 1, 1, 3, 0.0f);    // resnet conv1 / conv2
    test_lora_conv(1, 4, 5, 8, 8, 3, 1, 1, 2, 0.2f);    // with dropout
    test_lora_conv(2, 4, 4, 9, 8, 3, 2, 1, 3, 0.1f);    // downsampler (stride 2, odd side)
    test_lora_conv(2, 6, 3, 5, 4, 0, 1, 0, 2, 0.1f);    // conv_shortcut (1x1)
    test_lora_conv(3, 16, 8, 1, 1, 0, 1, 0, 4, 0.0f);   // time_emb_proj (a linear on 1x1 pixels)
    test_conv_lora_unet_emulated();
    test_conv_lora_full_grads();
    test_te_train_emulated();
    test_lowp_rounding();
    test_layers_lowp();
    test_train_bf16_emulated();
    test_train_fp16_emulated();
    test_sd15_memory_budget();
    test_device_check();
    test_not_built();
    char err[CUDA_ERR_LEN];
    if (cuda_device_check(err) == CUDA_DEV_OK) {
        dev_nn();
        dev_layers();
        dev_lora_optim_ddpm();
        dev_devte();
        dev_ddpm_draws();
    } else {
        printf("note: no GPU: the device checks (the *_cuda functions against the CPU) are skipped\n");
    }
    nn_scratch_free();
    printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail ? 1 : 0;
}

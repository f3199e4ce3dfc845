/* nn.c: the primitives every SD1.x component is built from (see nn.h).
 *
 * Every layer is a _forward / _backward pair over flat float arrays. Backward
 * accumulates (+=) and skips whatever gradient is passed as NULL. The heavy
 * work (linear, conv) goes through gemm(); the rest are simple loops.
 *
 * Threads: loops are split with OpenMP so that every output element is
 * computed by exactly one thread in a fixed order. No reduction depends on
 * how the work is split, so results are bit-identical for any thread count.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "nn.h"
#include "profile.h"
#ifdef _OPENMP
#include <omp.h>
#endif

/* without -fopenmp the pragmas below are simply ignored; keep that quiet */
#ifndef _OPENMP
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#endif

/* below this many floats a loop is not worth waking the other threads for */
#define PAR_MIN 16384

/* ---------------------------------------------------------------------------
 * scratch: one grow-only buffer. Its contents are never kept across calls,
 * so growing is free + malloc (no copy, and the old block is gone first). */

static float *scratch_buf = NULL;
static size_t scratch_cap = 0;

float *nn_scratch(size_t nfloats) {
    if (nfloats <= scratch_cap && scratch_buf) return scratch_buf;
    if (nfloats > SIZE_MAX / sizeof(float)) return NULL;   /* size overflows */
    free(scratch_buf);
    scratch_cap = 0;
    scratch_buf = malloc((nfloats ? nfloats : 1) * sizeof(float));
    if (scratch_buf) scratch_cap = nfloats;
    return scratch_buf;
}

/* Layers have no error return, so a model reserves the largest scratch it
 * will need once, at setup, where a NULL can be reported properly; a layer
 * that still finds no memory stops the program with a message. */
static float *scratch_or_die(size_t nfloats) {
    float *p = nn_scratch(nfloats);
    if (!p) {
        fprintf(stderr, "error: out of memory: %zu MB of layer scratch (use a smaller image size or batch)\n",
                nfloats * sizeof(float) >> 20);
        abort();
    }
    return p;
}

void nn_scratch_free(void) {
    free(scratch_buf);
    scratch_buf = NULL;
    scratch_cap = 0;
}

/* ---------------------------------------------------------------------------
 * linear */

void linear_forward(float *out, const float *inp, const float *w, const float *b,
                    int N, int in, int outc) {
    double t0 = prof_begin();
    // out[n,o] = sum_i inp[n,i] * w[o,i] + b[o]
    gemm(0, 1, N, outc, in, 1.0f, inp, in, w, in, 0.0f, out, outc);
    if (b) {
        #pragma omp parallel for if ((size_t)N * outc >= PAR_MIN)
        for (int n = 0; n < N; n++) {
            float *o = out + (size_t)n * outc;
            for (int j = 0; j < outc; j++) o[j] += b[j];
        }
    }
    prof_end(PROF_LINEAR, 0, t0, 2.0 * N * in * outc);
}

void linear_backward(float *dinp, float *dw, float *db, const float *dout,
                     const float *inp, const float *w, int N, int in, int outc) {
    double t0 = prof_begin();
    // dinp (N, in) += dout (N, out) * w (out, in)
    if (dinp) gemm(0, 0, N, in, outc, 1.0f, dout, outc, w, in, 1.0f, dinp, in);
    // dw (out, in) += dout^T (out, N) * inp (N, in)
    if (dw) gemm(1, 0, outc, in, N, 1.0f, dout, outc, inp, in, 1.0f, dw, in);
    // db[o] += sum_n dout[n,o]; each thread owns a block of columns and walks
    // the rows in order, so the sum is the same for any thread count
    if (db) {
        enum { CB = 64 };
        int nblk = (outc + CB - 1) / CB;
        #pragma omp parallel for if ((size_t)N * outc >= PAR_MIN)
        for (int blk = 0; blk < nblk; blk++) {
            int j0 = blk * CB, j1 = j0 + CB < outc ? j0 + CB : outc;
            double acc[CB] = {0};
            for (int n = 0; n < N; n++) {
                const float *d = dout + (size_t)n * outc;
                for (int j = j0; j < j1; j++) acc[j - j0] += d[j];
            }
            for (int j = j0; j < j1; j++) db[j] += (float)acc[j - j0];
        }
    }
    prof_end(PROF_LINEAR, 1, t0, 2.0 * N * in * outc * ((dinp != NULL) + (dw != NULL)));
}

/* ---------------------------------------------------------------------------
 * conv2d as im2col + gemm.
 *
 * For one image, the columns matrix cols (C*kh*kw, Ho*Wo) holds in row
 * r = (c*kh + i)*kw + j and column p = oy*Wo + ox the input pixel that kernel
 * tap (c, i, j) sees at output (oy, ox):
 *     cols[r, p] = inp[c, oy*stride - pad + i, ox*stride - pad + j]  (0 outside)
 * Then the convolution is one matrix product with the weight seen as a
 * (O, C*kh*kw) matrix:  out (O, Ho*Wo) = w * cols + b.
 * A 1x1, stride 1, unpadded conv needs no columns: the image itself is the
 * (C, H*W) matrix. */

static int conv_is_pointwise(int kh, int kw, int stride, int pad) {
    return kh == 1 && kw == 1 && stride == 1 && pad == 0;
}

/* the output columns [lo, hi) whose kernel tap j reads inside the image:
 * 0 <= ox*stride - pad + j < W. Outside it the tap sees padding, so both
 * loops below run branch-free over [lo, hi) (a contiguous copy or add when
 * stride is 1) instead of testing every pixel. */
static void valid_range(int j, int W, int Wo, int stride, int pad, int *lo, int *hi) {
    int a = pad - j, b = W + pad - j;               /* need a <= ox*stride < b */
    int l = a <= 0 ? 0 : (a + stride - 1) / stride;
    int h = b <= 0 ? 0 : (b + stride - 1) / stride;
    *lo = l < Wo ? l : Wo;
    *hi = h < Wo ? h : Wo;
    if (*hi < *lo) *hi = *lo;
}

/* output rows [oy0, oy1) only: cols is then (C*kh*kw, (oy1-oy0)*Wo) */
static void im2col(float *cols, const float *img, int C, int H, int W,
                   int kh, int kw, int stride, int pad, int oy0, int oy1, int Wo) {
    int rows = C * kh * kw, nrow = oy1 - oy0;
    #pragma omp parallel for if ((size_t)rows * nrow * Wo >= PAR_MIN)
    for (int r = 0; r < rows; r++) {
        int c = r / (kh * kw), i = (r / kw) % kh, j = r % kw;
        const float *src = img + (size_t)c * H * W;
        float *dst = cols + (size_t)r * nrow * Wo;
        int lo, hi;
        valid_range(j, W, Wo, stride, pad, &lo, &hi);
        for (int oy = oy0; oy < oy1; oy++) {
            int y = oy * stride - pad + i;
            float *d = dst + (size_t)(oy - oy0) * Wo;
            if (y < 0 || y >= H) { memset(d, 0, (size_t)Wo * sizeof(float)); continue; }
            /* s[t * stride] is pixel x = (lo + t)*stride - pad + j of row y */
            const float *s = src + (size_t)y * W + (lo * stride - pad + j);
            int ox = 0;
            for (; ox < lo; ox++) d[ox] = 0.0f;
            if (stride == 1) {
                memcpy(d + lo, s, (size_t)(hi - lo) * sizeof(float));
                ox = hi;
            } else {
                for (; ox < hi; ox++) d[ox] = s[(size_t)(ox - lo) * stride];
            }
            for (; ox < Wo; ox++) d[ox] = 0.0f;
        }
    }
}

/* the adjoint of im2col: every column entry is added back to the pixel it
 * was read from:  img[c, y, x] += dcols[r, p] over all (r, p) that read it.
 * One thread per channel, so no two threads touch the same pixel. */
static void col2im_add_ld(float *img, const float *dcols, size_t ld, int C, int H, int W,
                          int kh, int kw, int stride, int pad, int oy0, int oy1, int Wo) {
    #pragma omp parallel for if ((size_t)C * kh * kw * (size_t)(oy1 - oy0) * Wo >= PAR_MIN)
    for (int c = 0; c < C; c++) {
        float *dst = img + (size_t)c * H * W;
        for (int i = 0; i < kh; i++)
            for (int j = 0; j < kw; j++) {
                const float *src = dcols + ((size_t)(c * kh + i) * kw + j) * ld;
                int lo, hi;
                valid_range(j, W, Wo, stride, pad, &lo, &hi);
                for (int oy = oy0; oy < oy1; oy++) {
                    int y = oy * stride - pad + i;
                    if (y < 0 || y >= H) continue;
                    /* d[t * stride] is pixel x = (lo + t)*stride - pad + j of row y */
                    float *d = dst + (size_t)y * W + (lo * stride - pad + j);
                    const float *sr = src + (size_t)(oy - oy0) * Wo + lo;
                    if (stride == 1) {
                        for (int t = 0; t < hi - lo; t++) d[t] += sr[t];
                    } else {
                        for (int t = 0; t < hi - lo; t++) d[(size_t)t * stride] += sr[t];
                    }
                }
            }
    }
}

/* d[0..m) += s[0..m); the usual widths with constant bounds (whole vectors) */
static inline void add_run(float *restrict d, const float *restrict s, int m) {
    switch (m) {
    case 4: for (int t = 0; t < 4; t++) d[t] += s[t]; break;
    case 8: for (int t = 0; t < 8; t++) d[t] += s[t]; break;
    case 16: for (int t = 0; t < 16; t++) d[t] += s[t]; break;
    case 32: for (int t = 0; t < 32; t++) d[t] += s[t]; break;
    default: for (int t = 0; t < m; t++) d[t] += s[t]; break;
    }
}

/* col2im_add_ld for stride 1 and whole images (oy = 0 .. Ho), through a copy
 * of each plane with a pad-wide border: every tap then adds a whole run of
 * Wo columns per output row (no clipping at the image's edge: what lands in
 * the border is dropped), and each pixel gets the same adds in the same
 * order as col2im_add_ld gives it, starting from its value in img, so the
 * same bits. 0 (nothing done) when the per-thread planes cannot be had. */
static int col2im_add_padded(float *img, const float *dcols, size_t ld, int C, int H, int W,
                             int kh, int kw, int pad, int Ho, int Wo) {
    int Hp = H + 2 * pad, Wp = W + 2 * pad, nthreads = 1;
#ifdef _OPENMP
    nthreads = omp_in_parallel() ? 1 : omp_get_max_threads();
#endif
    float *planes = malloc((size_t)nthreads * Hp * Wp * sizeof(float));
    if (!planes) return 0;
    #pragma omp parallel for num_threads(nthreads) if ((size_t)C * kh * kw * Ho * Wo >= PAR_MIN)
    for (int c = 0; c < C; c++) {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        float *acc = planes + (size_t)tid * Hp * Wp, *dst = img + (size_t)c * H * W;
        memset(acc, 0, (size_t)Hp * Wp * sizeof(float));
        for (int y = 0; y < H; y++) memcpy(acc + (size_t)(y + pad) * Wp + pad, dst + (size_t)y * W, (size_t)W * sizeof(float));
        for (int i = 0; i < kh; i++)
            for (int j = 0; j < kw; j++) {
                const float *src = dcols + ((size_t)(c * kh + i) * kw + j) * ld;
                /* output (oy, ox) of tap (i, j) is padded pixel (oy + i, ox + j) */
                for (int oy = 0; oy < Ho; oy++)
                    add_run(acc + (size_t)(oy + i) * Wp + j, src + (size_t)oy * Wo, Wo);
            }
        for (int y = 0; y < H; y++) memcpy(dst + (size_t)y * W, acc + (size_t)(y + pad) * Wp + pad, (size_t)W * sizeof(float));
    }
    free(planes);
    return 1;
}

/* dcols rows nrow * Wo apart */
static void col2im_add(float *img, const float *dcols, int C, int H, int W,
                       int kh, int kw, int stride, int pad, int oy0, int oy1, int Wo) {
    col2im_add_ld(img, dcols, (size_t)(oy1 - oy0) * Wo, C, H, W, kh, kw, stride, pad, oy0, oy1, Wo);
}

/* The columns of a big image do not fit in memory (SD's VAE at 512x512:
 * 128*9 x 262144 floats = 1.2 GB), so they are built a band of output rows
 * at a time, at most nn_conv_cols_max floats. */
size_t nn_conv_cols_max = (size_t)1 << 24;

static int conv_band_rows(int K, int Ho, int Wo) {
    size_t rows = nn_conv_cols_max / ((size_t)K * Wo);
    if (rows < 1) rows = 1;
    return rows > (size_t)Ho ? Ho : (int)rows;
}

/* out (B, O, P) = w (O, K) * cols + b for nb images at a time, cols packed
 * straight from the images (gemm_im2col): one product of N = nb P columns
 * instead of nb of P, one pass over the columns instead of three. For nb > 1
 * the product lands in (O, nb P) scratch and is moved to each image's
 * (O, P) with the bias added on the way: the same float operations as the
 * per-image path below (sum, then + b), so the same bits. Returns 0 (nothing
 * done) where it does not apply: a per-image product gemm runs unblocked
 * (other sums), or not even one image's columns within nn_conv_cols_max.
 * Under --compute bf16 the columns are packed as bf16 pairs (the bits of
 * gemm_bf16 on them). */
static int conv_forward_packed(float *out, const float *inp, const float *w, const float *b,
                               int B, int C, int H, int W, int O, int kh, int kw, int stride, int pad) {
    int Ho = (H + 2 * pad - kh) / stride + 1, Wo = (W + 2 * pad - kw) / stride + 1;
    int K = C * kh * kw, P = Ho * Wo;
    if (gemm_is_small(O, P, K)) return 0;
    /* as many images at a time as nn_conv_cols_max allows */
    int nb = B;
    while (nb > 0 && gemm_im2col_floats(nb, C, H, W, kh, kw, stride, pad) +
                     (nb > 1 ? (size_t)O * nb * P : 0) > nn_conv_cols_max) nb--;
    if (nb == 0) return 0;
    size_t npack = gemm_im2col_floats(nb, C, H, W, kh, kw, stride, pad);
    float *buf = scratch_or_die(npack + (nb > 1 ? (size_t)O * nb * P : 0)), *tmp = buf + npack;
    for (int b0 = 0; b0 < B; b0 += nb) {
        int n = B - b0 < nb ? B - b0 : nb, N = n * P;
        const float *x = inp + (size_t)b0 * C * H * W;
        float *y = out + (size_t)b0 * O * P;
        if (n == 1) {
            gemm_im2col(O, 1.0f, w, K, x, 1, C, H, W, kh, kw, stride, pad, buf, 0.0f, y, P);
            if (b) {
                #pragma omp parallel for if ((size_t)O * P >= PAR_MIN)
                for (int o = 0; o < O; o++) {
                    float *yo = y + (size_t)o * P;
                    for (int p = 0; p < P; p++) yo[p] += b[o];
                }
            }
            continue;
        }
        // tmp (O, n P) = w (O, K) * cols (K, n P)
        gemm_im2col(O, 1.0f, w, K, x, n, C, H, W, kh, kw, stride, pad, buf, 0.0f, tmp, N);
        // y[bi, o, :] = tmp[o, bi P ..] (+ b[o])
        #pragma omp parallel for collapse(2) if ((size_t)O * N >= PAR_MIN)
        for (int bi = 0; bi < n; bi++)
            for (int o = 0; o < O; o++) {
                float *yo = y + ((size_t)bi * O + o) * P;
                const float *to = tmp + (size_t)o * N + (size_t)bi * P;
                if (b) {
                    float bo = b[o];
                    for (int p = 0; p < P; p++) yo[p] = to[p] + bo;
                } else {
                    memcpy(yo, to, (size_t)P * sizeof(float));
                }
            }
    }
    return 1;
}

void conv2d_forward(float *out, const float *inp, const float *w, const float *b,
                    int B, int C, int H, int W, int O, int kh, int kw, int stride, int pad) {
    double t0 = prof_begin();
    int Ho = (H + 2 * pad - kh) / stride + 1, Wo = (W + 2 * pad - kw) / stride + 1;
    int K = C * kh * kw, P = Ho * Wo;
    int direct = conv_is_pointwise(kh, kw, stride, pad);
    if (!direct && conv_forward_packed(out, inp, w, b, B, C, H, W, O, kh, kw, stride, pad)) {
        prof_end(kh * kw > 1 ? PROF_CONV3 : PROF_LINEAR, 0, t0, 2.0 * B * O * P * K);
        return;
    }
    int band = direct ? Ho : conv_band_rows(K, Ho, Wo);
    float *cols = direct ? NULL : scratch_or_die((size_t)K * band * Wo);
    for (int bi = 0; bi < B; bi++) {
        const float *x = inp + (size_t)bi * C * H * W;
        float *y = out + (size_t)bi * O * P;
        if (direct) {
            // out_b (O, P) = w (O, C) * x_b (C, P)
            gemm(0, 0, O, P, K, 1.0f, w, K, x, P, 0.0f, y, P);
        } else {
            for (int oy0 = 0; oy0 < Ho; oy0 += band) {
                int oy1 = oy0 + band < Ho ? oy0 + band : Ho, Pb = (oy1 - oy0) * Wo;
                im2col(cols, x, C, H, W, kh, kw, stride, pad, oy0, oy1, Wo);
                // out_b[:, band] (O, Pb) = w (O, K) * cols (K, Pb)
                gemm(0, 0, O, Pb, K, 1.0f, w, K, cols, Pb, 0.0f, y + (size_t)oy0 * Wo, P);
            }
        }
        if (b) {
            #pragma omp parallel for if ((size_t)O * P >= PAR_MIN)
            for (int o = 0; o < O; o++) {
                float *yo = y + (size_t)o * P;
                for (int p = 0; p < P; p++) yo[p] += b[o];
            }
        }
    }
    prof_end(kh * kw > 1 ? PROF_CONV3 : PROF_LINEAR, 0, t0, 2.0 * B * O * P * K);
}

/* dinp only (a frozen conv), nb images at a time: dout gathered to (O, nb P),
 * one product dcols (K, nb P) = w^T dout instead of nb (w is packed once),
 * then each image's columns scattered back as below. Every dcols entry is the
 * same sum over O as the per-image product's and the scatter adds in the
 * same order, so the same bits. Returns 0 (nothing done) where a per-image
 * product would run unblocked (other sums) or one image's columns exceed
 * nn_conv_cols_max. */
static int conv_backward_dinp_batched(float *dinp, const float *dout, const float *w,
                                      int B, int C, int H, int W, int O, int kh, int kw, int stride, int pad) {
    int Ho = (H + 2 * pad - kh) / stride + 1, Wo = (W + 2 * pad - kw) / stride + 1;
    int K = C * kh * kw, P = Ho * Wo;
    if (B < 2 || gemm_is_small(K, P, O)) return 0;
    int nb = B;
    while (nb > 1 && (size_t)(K + O) * nb * P > nn_conv_cols_max) nb--;
    if (nb < 2) return 0;
    float *dcols = scratch_or_die((size_t)(K + O) * nb * P), *dy = dcols + (size_t)K * nb * P;
    for (int b0 = 0; b0 < B; b0 += nb) {
        int n = B - b0 < nb ? B - b0 : nb, N = n * P;
        // dy (O, n P): image bi's dout in columns bi P ..
        #pragma omp parallel for collapse(2) if ((size_t)O * N >= PAR_MIN)
        for (int bi = 0; bi < n; bi++)
            for (int o = 0; o < O; o++)
                memcpy(dy + (size_t)o * N + (size_t)bi * P, dout + ((size_t)(b0 + bi) * O + o) * P,
                       (size_t)P * sizeof(float));
        // dcols (K, n P) = w^T (K, O) * dy (O, n P)
        gemm(1, 0, K, N, O, 1.0f, w, K, dy, N, 0.0f, dcols, N);
        for (int bi = 0; bi < n; bi++) {
            float *dx = dinp + (size_t)(b0 + bi) * C * H * W;
            const float *dc = dcols + (size_t)bi * P;
            if (stride != 1 || !col2im_add_padded(dx, dc, N, C, H, W, kh, kw, pad, Ho, Wo))
                col2im_add_ld(dx, dc, N, C, H, W, kh, kw, stride, pad, 0, Ho, Wo);
        }
    }
    return 1;
}

void conv2d_backward(float *dinp, float *dw, float *db, const float *dout,
                     const float *inp, const float *w,
                     int B, int C, int H, int W, int O, int kh, int kw, int stride, int pad) {
    double t0 = prof_begin();
    int Ho = (H + 2 * pad - kh) / stride + 1, Wo = (W + 2 * pad - kw) / stride + 1;
    int K = C * kh * kw, P = Ho * Wo;
    int direct = conv_is_pointwise(kh, kw, stride, pad);

    // db[o] += sum_{b, p} dout[b, o, p]; one thread per channel, batch in order
    if (db) {
        #pragma omp parallel for if ((size_t)B * O * P >= PAR_MIN)
        for (int o = 0; o < O; o++) {
            double s = 0;
            for (int bi = 0; bi < B; bi++) {
                const float *d = dout + ((size_t)bi * O + o) * P;
                for (int p = 0; p < P; p++) s += d[p];
            }
            db[o] += (float)s;
        }
    }
    if (!dw && !dinp) { prof_end(kh * kw > 1 ? PROF_CONV3 : PROF_LINEAR, 1, t0, 0); return; }

    if (!dw && !direct && conv_backward_dinp_batched(dinp, dout, w, B, C, H, W, O, kh, kw, stride, pad)) {
        prof_end(kh * kw > 1 ? PROF_CONV3 : PROF_LINEAR, 1, t0, 2.0 * B * O * P * K);
        return;
    }
    // one scratch band of columns serves twice: first as the columns of the
    // input (for dw), then as their gradient dcols (for dinp)
    int band = direct ? Ho : conv_band_rows(K, Ho, Wo);
    float *buf = direct ? NULL : scratch_or_die((size_t)K * band * Wo);
    for (int bi = 0; bi < B; bi++) {
        const float *x = inp + (size_t)bi * C * H * W;
        const float *dy = dout + (size_t)bi * O * P;
        float *dx = dinp ? dinp + (size_t)bi * C * H * W : NULL;
        if (direct) {
            // dw (O, C) += dout_b (O, P) * x_b^T (P, C);  dx_b (C, P) += w^T (C, O) * dout_b (O, P)
            if (dw) gemm(0, 1, O, K, P, 1.0f, dy, P, x, P, 1.0f, dw, K);
            if (dx) gemm(1, 0, K, P, O, 1.0f, w, K, dy, P, 1.0f, dx, P);
            continue;
        }
        for (int oy0 = 0; oy0 < Ho; oy0 += band) {
            int oy1 = oy0 + band < Ho ? oy0 + band : Ho, Pb = (oy1 - oy0) * Wo;
            const float *dyb = dy + (size_t)oy0 * Wo;
            if (dw) {
                // dw (O, K) += dout_b[:, band] (O, Pb) * cols^T (Pb, K)
                im2col(buf, x, C, H, W, kh, kw, stride, pad, oy0, oy1, Wo);
                gemm(0, 1, O, K, Pb, 1.0f, dyb, P, buf, Pb, 1.0f, dw, K);
            }
            if (dx) {
                // dcols (K, Pb) = w^T (K, O) * dout_b[:, band] (O, Pb), then scatter back
                gemm(1, 0, K, Pb, O, 1.0f, w, K, dyb, P, 0.0f, buf, Pb);
                col2im_add(dx, buf, C, H, W, kh, kw, stride, pad, oy0, oy1, Wo);
            }
        }
    }
    prof_end(kh * kw > 1 ? PROF_CONV3 : PROF_LINEAR, 1, t0, 2.0 * B * O * P * K * ((dinp != NULL) + (dw != NULL)));
}

/* ---------------------------------------------------------------------------
 * group norm. In (B, C, HW) layout the C/G channels of one group are one
 * contiguous block of n = (C/G)*HW floats, normalised together:
 *     mean = sum x / n,   var = sum (x - mean)^2 / n   (biased, as torch)
 *     xhat = (x - mean) * rstd,  rstd = 1 / sqrt(var + eps)
 *     out  = xhat * w[c] + b[c]
 * The statistics are summed in double: a group of SD1.5 holds up to 40960
 * values (10 channels of 64x64), enough for float sums to drift. */

/* Sums in double, vectorised: a double add chain may not be reordered, so
 * each sum keeps NL partial sums, one per index mod NL, added pairwise at the
 * end (8 doubles: one AVX-512 register, two AVX2 ones). The order depends on
 * n alone, never on the thread count. */
#define NL 8

static double lanes_total(double *s) {
    for (int w = NL / 2; w > 0; w /= 2)
        for (int l = 0; l < w; l++) s[l] += s[l + w];
    return s[0];
}

/* mean and 1/sqrt(var + eps) of n floats, two passes in double */
static void moments(const float *x, size_t n, float eps, float *mean, float *rstd) {
    double s[NL] = {0}, v[NL] = {0};
    size_t i = 0;
    for (; i + NL <= n; i += NL)
        for (int l = 0; l < NL; l++) s[l] += x[i + l];
    for (int l = 0; i + l < n; l++) s[l] += x[i + l];
    double m = lanes_total(s) / (double)n;
    for (i = 0; i + NL <= n; i += NL)
        for (int l = 0; l < NL; l++) { double d = x[i + l] - m; v[l] += d * d; }
    for (int l = 0; i + l < n; l++) { double d = x[i + l] - m; v[l] += d * d; }
    double var = lanes_total(v) / (double)n;
    *mean = (float)m;
    *rstd = (float)(1.0 / sqrt(var + (double)eps));
}

/* *sdy += sum dy,  *sdyx += sum dy * (x - m) * rs  over n values, in double */
static void dy_sums(const float *x, const float *dy, size_t n, float m, float rs,
                    double *sdy, double *sdyx) {
    double a[NL] = {0}, c[NL] = {0};
    size_t i = 0;
    for (; i + NL <= n; i += NL)
        for (int l = 0; l < NL; l++) {
            float xh = (x[i + l] - m) * rs;
            a[l] += dy[i + l];
            c[l] += (double)dy[i + l] * xh;
        }
    for (int l = 0; i + l < n; l++) {
        float xh = (x[i + l] - m) * rs;
        a[l] += dy[i + l];
        c[l] += (double)dy[i + l] * xh;
    }
    *sdy = lanes_total(a);
    *sdyx = lanes_total(c);
}

/* group norm into out and, when act is not NULL, silu(out) into act in the
 * same pass (ResNet blocks apply the two back to back and keep both: the
 * norm's output is what silu_backward reads). The same float operations as
 * groupnorm_forward then silu_forward, so the same bits. */
static void groupnorm_act(float *out, float *act, float *mean, float *rstd, const float *inp,
                          const float *w, const float *b, int B, int C, int HW, int G, float eps) {
    int Cg = C / G;
    size_t n = (size_t)Cg * HW;
    #pragma omp parallel for if ((size_t)B * C * HW >= PAR_MIN)
    for (int bg = 0; bg < B * G; bg++) {
        const float *x = inp + (size_t)bg * n;
        float *y = out + (size_t)bg * n;
        float m, rs;
        moments(x, n, eps, &m, &rs);
        mean[bg] = m; rstd[bg] = rs;
        int c0 = (bg % G) * Cg;
        for (int cc = 0; cc < Cg; cc++) {
            float wc = w ? w[c0 + cc] : 1.0f, bc = b ? b[c0 + cc] : 0.0f;
            const float *xc = x + (size_t)cc * HW;
            float *yc = y + (size_t)cc * HW;
            if (act) {
                float *ac = act + (size_t)bg * n + (size_t)cc * HW;
                for (int i = 0; i < HW; i++) {
                    float v = (xc[i] - m) * rs * wc + bc;
                    yc[i] = v;
                    ac[i] = v / (1.0f + nn_expf(-v));
                }
            } else {
                for (int i = 0; i < HW; i++) yc[i] = (xc[i] - m) * rs * wc + bc;
            }
        }
    }
}

void groupnorm_forward(float *out, float *mean, float *rstd, const float *inp,
                       const float *w, const float *b, int B, int C, int HW, int G, float eps) {
    double t0 = prof_begin();
    groupnorm_act(out, NULL, mean, rstd, inp, w, b, B, C, HW, G, eps);
    prof_end(PROF_NORM, 0, t0, 0);
}

void groupnorm_silu_forward(float *out, float *act, float *mean, float *rstd, const float *inp,
                            const float *w, const float *b, int B, int C, int HW, int G, float eps) {
    double t0 = prof_begin();
    groupnorm_act(out, act, mean, rstd, inp, w, b, B, C, HW, G, eps);
    prof_end(PROF_NORM, 0, t0, 0);
}

/* Backward, with dxhat = dout * w[c] over the n values of one group:
 *     dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
 *     dw[c] += sum_{b, hw} dout * xhat,   db[c] += sum_{b, hw} dout
 * One thread per group walks the batch in order, so dw/db need no locks. */
void groupnorm_backward(float *dinp, float *dw, float *db, const float *dout,
                        const float *inp, const float *w, const float *mean, const float *rstd,
                        int B, int C, int HW, int G) {
    double t0 = prof_begin();
    int Cg = C / G;
    size_t n = (size_t)Cg * HW;
    #pragma omp parallel for if ((size_t)B * C * HW >= PAR_MIN)
    for (int g = 0; g < G; g++) {
        int c0 = g * Cg;
        for (int bi = 0; bi < B; bi++) {
            size_t off = ((size_t)bi * G + g) * n;
            const float *x = inp + off, *dy = dout + off;
            float m = mean[bi * G + g], rs = rstd[bi * G + g];
            double sum_dxh = 0, sum_dxh_xh = 0;
            for (int cc = 0; cc < Cg; cc++) {
                float wc = w ? w[c0 + cc] : 1.0f;
                const float *xc = x + (size_t)cc * HW, *dyc = dy + (size_t)cc * HW;
                double sdy, sdy_xh;
                dy_sums(xc, dyc, (size_t)HW, m, rs, &sdy, &sdy_xh);
                sum_dxh += wc * sdy;
                sum_dxh_xh += wc * sdy_xh;
                if (dw) dw[c0 + cc] += (float)sdy_xh;
                if (db) db[c0 + cc] += (float)sdy;
            }
            if (!dinp) continue;
            float mdxh = (float)(sum_dxh / (double)n), mdxh_xh = (float)(sum_dxh_xh / (double)n);
            float *dx = dinp + off;
            for (int cc = 0; cc < Cg; cc++) {
                float wc = w ? w[c0 + cc] : 1.0f;
                const float *xc = x + (size_t)cc * HW, *dyc = dy + (size_t)cc * HW;
                float *dxc = dx + (size_t)cc * HW;
                for (int i = 0; i < HW; i++) {
                    float xh = (xc[i] - m) * rs;
                    dxc[i] += rs * (dyc[i] * wc - mdxh - xh * mdxh_xh);
                }
            }
        }
    }
    prof_end(PROF_NORM, 1, t0, 0);
}

/* ---------------------------------------------------------------------------
 * layer norm over the last dim of (N, C), same formulas as group norm with
 * one row as the normalised set. */

void layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                       const float *w, const float *b, int N, int C, float eps) {
    double t0 = prof_begin();
    #pragma omp parallel for if ((size_t)N * C >= PAR_MIN)
    for (int r = 0; r < N; r++) {
        const float *x = inp + (size_t)r * C;
        float *y = out + (size_t)r * C;
        float m, rs;
        moments(x, (size_t)C, eps, &m, &rs);
        mean[r] = m; rstd[r] = rs;
        // out = (x - mean) * rstd * w + b
        for (int c = 0; c < C; c++) {
            float xh = (x[c] - m) * rs;
            y[c] = xh * (w ? w[c] : 1.0f) + (b ? b[c] : 0.0f);
        }
    }
    prof_end(PROF_NORM, 0, t0, 0);
}

void layernorm_backward(float *dinp, float *dw, float *db, const float *dout,
                        const float *inp, const float *w, const float *mean, const float *rstd,
                        int N, int C) {
    double t0 = prof_begin();
    // dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = dout * w
    if (dinp) {
        #pragma omp parallel for if ((size_t)N * C >= PAR_MIN)
        for (int r = 0; r < N; r++) {
            const float *x = inp + (size_t)r * C, *dy = dout + (size_t)r * C;
            float *dx = dinp + (size_t)r * C;
            float m = mean[r], rs = rstd[r];
            double a1[NL] = {0}, a2[NL] = {0};
            int c0 = 0;
            for (; c0 + NL <= C; c0 += NL)
                for (int l = 0; l < NL; l++) {
                    float xh = (x[c0 + l] - m) * rs;
                    float dxh = dy[c0 + l] * (w ? w[c0 + l] : 1.0f);
                    a1[l] += dxh;
                    a2[l] += (double)dxh * xh;
                }
            for (int l = 0; c0 + l < C; l++) {
                float xh = (x[c0 + l] - m) * rs;
                float dxh = dy[c0 + l] * (w ? w[c0 + l] : 1.0f);
                a1[l] += dxh;
                a2[l] += (double)dxh * xh;
            }
            double s1 = lanes_total(a1), s2 = lanes_total(a2);
            float m1 = (float)(s1 / C), m2 = (float)(s2 / C);
            for (int c = 0; c < C; c++) {
                float xh = (x[c] - m) * rs;
                float dxh = dy[c] * (w ? w[c] : 1.0f);
                dx[c] += rs * (dxh - m1 - xh * m2);
            }
        }
    }
    // dw[c] += sum_r dout * xhat,  db[c] += sum_r dout: a sum over rows, so
    // each thread owns a block of columns and walks the rows in order
    if (dw || db) {
        enum { CB = 64 };
        int nblk = (C + CB - 1) / CB;
        #pragma omp parallel for if ((size_t)N * C >= PAR_MIN)
        for (int blk = 0; blk < nblk; blk++) {
            int c0 = blk * CB, c1 = c0 + CB < C ? c0 + CB : C;
            double aw[CB] = {0}, ab[CB] = {0};
            for (int r = 0; r < N; r++) {
                const float *x = inp + (size_t)r * C, *dy = dout + (size_t)r * C;
                float m = mean[r], rs = rstd[r];
                for (int c = c0; c < c1; c++) {
                    float xh = (x[c] - m) * rs;
                    aw[c - c0] += (double)dy[c] * xh;
                    ab[c - c0] += dy[c];
                }
            }
            for (int c = c0; c < c1; c++) {
                if (dw) dw[c] += (float)aw[c - c0];
                if (db) db[c] += (float)ab[c - c0];
            }
        }
    }
    prof_end(PROF_NORM, 1, t0, 0);
}

/* ---------------------------------------------------------------------------
 * pointwise activations */

// silu(x) = x * s,  s = sigmoid(x) = 1 / (1 + exp(-x))
// (nn_expf, not expf: the loops then vectorise)
// silu'(x) = s + x s (1 - s) = s (1 + x (1 - s))
void silu_forward(float *out, const float *inp, size_t n) {
    double t0 = prof_begin();
    #pragma omp parallel for if (n >= PAR_MIN)
    for (size_t i = 0; i < n; i++) {
        float x = inp[i];
        out[i] = x / (1.0f + nn_expf(-x));
    }
    prof_end(PROF_ELEM, 0, t0, 0);
}

void silu_backward(float *dinp, const float *dout, const float *inp, size_t n) {
    if (!dinp) return;
    double t0 = prof_begin();
    #pragma omp parallel for if (n >= PAR_MIN)
    for (size_t i = 0; i < n; i++) {
        float x = inp[i], s = 1.0f / (1.0f + nn_expf(-x));
        dinp[i] += dout[i] * s * (1.0f + x * (1.0f - s));
    }
    prof_end(PROF_ELEM, 1, t0, 0);
}

// gelu(x) = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))   (exact, torch's default)
// gelu'(x) = Phi(x) + x phi(x),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
#define INV_SQRT2 0.70710678118654752440f
#define INV_SQRT_2PI 0.39894228040143267794f

// (nn_erff and nn_expf, inline, so that the loops below vectorise)
static inline float gelu_f(float x) { return 0.5f * x * (1.0f + nn_erff(x * INV_SQRT2)); }
static inline float gelu_grad(float x) {
    return 0.5f * (1.0f + nn_erff(x * INV_SQRT2)) + x * nn_expf(-0.5f * x * x) * INV_SQRT_2PI;
}

void gelu_forward(float *out, const float *inp, size_t n) {
    double t0 = prof_begin();
    #pragma omp parallel for if (n >= PAR_MIN)
    for (size_t i = 0; i < n; i++) out[i] = gelu_f(inp[i]);
    prof_end(PROF_ELEM, 0, t0, 0);
}

void gelu_backward(float *dinp, const float *dout, const float *inp, size_t n) {
    if (!dinp) return;
    double t0 = prof_begin();
    #pragma omp parallel for if (n >= PAR_MIN)
    for (size_t i = 0; i < n; i++) dinp[i] += dout[i] * gelu_grad(inp[i]);
    prof_end(PROF_ELEM, 1, t0, 0);
}

// quickgelu(x) = x * s,  s = sigmoid(1.702 x)   (CLIP's cheap GELU)
// quickgelu'(x) = s + 1.702 x s (1 - s)
void quickgelu_forward(float *out, const float *inp, size_t n) {
    double t0 = prof_begin();
    #pragma omp parallel for if (n >= PAR_MIN)
    for (size_t i = 0; i < n; i++) {
        float x = inp[i];
        out[i] = x / (1.0f + nn_expf(-1.702f * x));
    }
    prof_end(PROF_ELEM, 0, t0, 0);
}

void quickgelu_backward(float *dinp, const float *dout, const float *inp, size_t n) {
    if (!dinp) return;
    double t0 = prof_begin();
    #pragma omp parallel for if (n >= PAR_MIN)
    for (size_t i = 0; i < n; i++) {
        float x = inp[i], s = 1.0f / (1.0f + nn_expf(-1.702f * x));
        dinp[i] += dout[i] * (s + 1.702f * x * s * (1.0f - s));
    }
    prof_end(PROF_ELEM, 1, t0, 0);
}

/* GEGLU: row n of inp is [value (D) | gate (D)];
 *     out = value * gelu(gate)
 *     dvalue = dout * gelu(gate),  dgate = dout * value * gelu'(gate) */
void geglu_forward(float *out, const float *inp, int N, int D) {
    double t0 = prof_begin();
    #pragma omp parallel for if ((size_t)N * D >= PAR_MIN)
    for (int r = 0; r < N; r++) {
        const float *v = inp + (size_t)r * 2 * D, *g = v + D;
        float *y = out + (size_t)r * D;
        for (int j = 0; j < D; j++) y[j] = v[j] * gelu_f(g[j]);
    }
    prof_end(PROF_ELEM, 0, t0, 0);
}

void geglu_backward(float *dinp, const float *dout, const float *inp, int N, int D) {
    double t0 = prof_begin();
    /* ASSIGNMENT 03 BEGIN: dinp += [dout * gelu(gate) | dout * value * gelu'(gate)] per row; NULL dinp: no work */
    if (!dinp) return;
    #pragma omp parallel for if ((size_t)N * D >= PAR_MIN)
    for (int r = 0; r < N; r++) {
        const float *v = inp + (size_t)r * 2 * D, *g = v + D;
        const float *dy = dout + (size_t)r * D;
        float *dv = dinp + (size_t)r * 2 * D, *dg = dv + D;
        for (int j = 0; j < D; j++) {
            /* gelu_f and gelu_grad with their common erf computed once
             * (the same expressions, so the same bits) */
            float x = g[j], e = 1.0f + nn_erff(x * INV_SQRT2);
            dv[j] += dy[j] * (0.5f * x * e);
            dg[j] += dy[j] * v[j] * (0.5f * e + x * nn_expf(-0.5f * x * x) * INV_SQRT_2PI);
        }
    }
    /* ASSIGNMENT 03 END */
    prof_end(PROF_ELEM, 1, t0, 0);
}

/* ---------------------------------------------------------------------------
 * nearest 2x upsample: out[b, c, y, x] = inp[b, c, y/2, x/2]; backward adds
 * the gradients of the 4 copies back into their source pixel. */

void upsample2x_forward(float *out, const float *inp, int B, int C, int H, int W) {
    double t0 = prof_begin();
    int W2 = 2 * W;
    #pragma omp parallel for if ((size_t)B * C * H * W >= PAR_MIN)
    for (int bc = 0; bc < B * C; bc++) {
        const float *x = inp + (size_t)bc * H * W;
        float *y = out + (size_t)bc * 4 * H * W;
        for (int i = 0; i < H; i++) {
            float *r0 = y + (size_t)(2 * i) * W2, *r1 = r0 + W2;
            for (int j = 0; j < W; j++) {
                float v = x[(size_t)i * W + j];
                r0[2 * j] = r0[2 * j + 1] = r1[2 * j] = r1[2 * j + 1] = v;
            }
        }
    }
    prof_end(PROF_ELEM, 0, t0, 0);
}

void upsample2x_backward(float *dinp, const float *dout, int B, int C, int H, int W) {
    if (!dinp) return;
    double t0 = prof_begin();
    int W2 = 2 * W;
    #pragma omp parallel for if ((size_t)B * C * H * W >= PAR_MIN)
    for (int bc = 0; bc < B * C; bc++) {
        float *dx = dinp + (size_t)bc * H * W;
        const float *dy = dout + (size_t)bc * 4 * H * W;
        for (int i = 0; i < H; i++) {
            const float *r0 = dy + (size_t)(2 * i) * W2, *r1 = r0 + W2;
            for (int j = 0; j < W; j++)
                dx[(size_t)i * W + j] += (r0[2 * j] + r0[2 * j + 1]) + (r1[2 * j] + r1[2 * j + 1]);
        }
    }
    prof_end(PROF_ELEM, 1, t0, 0);
}

/* ---------------------------------------------------------------------------
 * sinusoidal timestep embedding, as diffusers' get_timestep_embedding:
 *     exponent_j = -ln(max_period) * j / (half - freq_shift),  j = 0..half-1
 *     arg_j = t * exp(exponent_j)
 *     out = [sin(arg) | cos(arg)], or [cos(arg) | sin(arg)] when flipped,
 *     and a zero last column when dim is odd.
 * Each step is rounded to float32 in torch's order, so the result matches
 * PyTorch's float32 computation, not an exact one. */
void timestep_embedding(float *out, const float *t, int N, int dim,
                        int flip_sin_to_cos, float freq_shift, float max_period) {
    int half = dim / 2;
    float neg_log = (float)(-log((double)max_period));
    float denom = (float)((double)half - (double)freq_shift);
    for (int n = 0; n < N; n++) {
        float *y = out + (size_t)n * dim;
        float *ys = y + (flip_sin_to_cos ? half : 0);
        float *yc = y + (flip_sin_to_cos ? 0 : half);
        for (int j = 0; j < half; j++) {
            float e = neg_log * (float)j;
            e = e / denom;
            float arg = t[n] * expf(e);
            ys[j] = sinf(arg);
            yc[j] = cosf(arg);
        }
        if (dim % 2) y[dim - 1] = 0.0f;
    }
}

/* ---------------------------------------------------------------------------
 * RNG: splitmix64. The state advances by a fixed odd constant and each
 * output is a hash of the state, so the i-th number after a given state can
 * be computed directly; dropout uses that to fill its mask in parallel with
 * exactly the numbers a serial loop would draw. */

#define SPLITMIX_GAMMA 0x9E3779B97F4A7C15ULL

static inline uint64_t splitmix_hash(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

void rng_seed(rng_t *r, uint64_t seed) { r->state = seed; }

uint64_t rng_u64(rng_t *r) {
    r->state += SPLITMIX_GAMMA;
    return splitmix_hash(r->state);
}

// top 24 bits -> k / 2^24, exactly representable, in [0, 1)
static inline float u64_to_uniform(uint64_t x) { return (float)(x >> 40) * (1.0f / 16777216.0f); }

float rng_uniform(rng_t *r) { return u64_to_uniform(rng_u64(r)); }

// Box-Muller: z = sqrt(-2 ln u1) cos(2 pi u2), u1 in (0, 1] so the log is
// finite. Only the cosine half of the pair is used: rng_t keeps no spare.
float rng_normal(rng_t *r) {
    double u1 = 1.0 - (double)rng_uniform(r);
    double u2 = (double)rng_uniform(r);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.28318530717958647692 * u2));
}

/* ---------------------------------------------------------------------------
 * dropout (inverted): keep each element with probability 1 - p and scale it
 * by 1 / (1 - p) so the expectation is unchanged:
 *     mask_i = (u_i >= p),  out_i = inp_i * mask_i / (1 - p)
 *     dinp_i += dout_i * mask_i / (1 - p)
 * u_i is the i-th rng_uniform() of the stream, drawn here by index. */
void dropout_forward(float *out, uint8_t *mask, const float *inp, size_t n, float p, rng_t *rng) {
    if (p <= 0.0f) {
        if (out != inp) memmove(out, inp, n * sizeof(float));
        memset(mask, 1, n);
        return;
    }
    float scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;   /* p = 1 drops all */
    uint64_t s0 = rng->state;
    #pragma omp parallel for if (n >= PAR_MIN)
    for (size_t i = 0; i < n; i++) {
        float u = u64_to_uniform(splitmix_hash(s0 + (uint64_t)(i + 1) * SPLITMIX_GAMMA));
        uint8_t keep = u >= p;
        mask[i] = keep;
        out[i] = keep ? inp[i] * scale : 0.0f;
    }
    rng->state = s0 + (uint64_t)n * SPLITMIX_GAMMA;
}

void dropout_backward(float *dinp, const float *dout, const uint8_t *mask, size_t n, float p) {
    if (!dinp) return;
    if (p <= 0.0f) {   /* forward was a copy (the mask is all ones, not read) */
        #pragma omp parallel for if (n >= PAR_MIN)
        for (size_t i = 0; i < n; i++) dinp[i] += dout[i];
        return;
    }
    float scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
    #pragma omp parallel for if (n >= PAR_MIN)
    for (size_t i = 0; i < n; i++) dinp[i] += mask[i] ? dout[i] * scale : 0.0f;
}

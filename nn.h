/* nn.h: the primitives every SD1.x component is built from.
 *
 * Conventions (NOTES.md, "The design in brief"):
 *  - flat float32 arrays; images NCHW, token sequences (B, T, C) row-major;
 *    weights in PyTorch's layout (out x in, out x in x kh x kw).
 *  - every layer is a pair  x_forward(out, inp, params.., dims..)
 *                           x_backward(dinp, dweight, dbias, dout, inp, params.., dims..)
 *  - backward ACCUMULATES (+=) into dinp / dweight / dbias.
 *  - a NULL gradient pointer means "not needed" and that work is skipped;
 *    a NULL dweight is a frozen weight, which is where LoRA saves its work.
 *  - every heavy loop goes through gemm() (matmul.c), the one place that
 *    later speed work and the CUDA backend change.
 */
#ifndef SDLORA_NN_H
#define SDLORA_NN_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* ---- matmul.c -------------------------------------------------------------
 * Row-major GEMM, BLAS semantics:
 *   C[M x N] = alpha * op(A)[M x K] * op(B)[K x N] + beta * C
 * op(X) = X when trans == 0, X^T when trans == 1. lda/ldb/ldc are row strides
 * (of A/B/C as stored). beta == 0 means C is overwritten (never read). */
void gemm(int transA, int transB, int M, int N, int K,
          float alpha, const float *A, int lda, const float *B, int ldb,
          float beta, float *C, int ldc);

/* A B operand packed once into gemm's panel layout, for a matrix that many
 * calls share and that does not change (a frozen weight): gemm_packed then
 * skips packing it. gemm_pack_b(transB, K, N, B, ldb) copies op(B) [K x N]
 * (K x N rounded up to the kernel's strip width; B itself is not kept; made
 * under GEMM_BF16, also rounded to bf16 in that kernel's layout, so that
 * gemm_packed skips the rounding too, in either mode) and returns NULL when
 * K or N <= 0 or memory runs out. gemm_packed(transA, M, alpha, A, lda, pb,
 * beta, C, ldc) is gemm(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta,
 * C, ldc) with N, K from pb, and gives the same bits. */
typedef struct gemm_packed_b gemm_packed_b;
gemm_packed_b *gemm_pack_b(int transB, int K, int N, const float *B, int ldb);
void gemm_packed(int transA, int M, float alpha, const float *A, int lda,
                 const gemm_packed_b *B, float beta, float *C, int ldc);
void gemm_packed_b_free(gemm_packed_b *pb);
/* whether gemm runs an M x N x K product element by element (no packing):
 * its sums then differ in the last bits from the blocked path's when K is
 * split, so a caller that regroups products checks both shapes alike */
int gemm_is_small(int M, int N, int K);
/* C (M x B*Ho*Wo) = alpha * A (M x C*kh*kw) * cols + beta * C, where cols is
 * conv2d's im2col of the B images img (B, C, H, W) side by side (column
 * b*Ho*Wo + oy*Wo + ox), packed straight from img into buf, which holds
 * gemm_im2col_floats(B, C, H, W, kh, kw, stride, pad) floats. The same bits
 * as gemm on the columns matrix. */
size_t gemm_im2col_floats(int B, int C, int H, int W, int kh, int kw, int stride, int pad);
void gemm_im2col(int M, float alpha, const float *A, int lda,
                 const float *img, int B, int C, int H, int W, int kh, int kw, int stride, int pad,
                 float *buf, float beta, float *Cm, int ldc);

/* ---- exp for vectorised loops ----------------------------------------------
 * libm's expf is a function call, so a loop that calls it stays scalar; this
 * one is inline and branch-free, and gcc/clang vectorise a loop over it at
 * whatever width the target has (AVX-512, AVX2, NEON).
 *   exp(x) = 2^n exp(r),  n = round(x / ln 2),  r = x - n ln 2,  |r| <= ln2 / 2
 * n ln 2 is subtracted in two parts (ln2_hi has 9 significant bits, so n *
 * ln2_hi is exact for |n| < 2^15) and exp(r) is Cephes' degree-7 polynomial
 * (Moshier, "Methods and programs for mathematical functions"): within 2 ulp
 * of the exact value over the clamped range (tests/test_nn.c measures it
 * against expf). x is clamped to [-87.33, 88]: below, the result is
 * FLT_MIN, not 0 or a denormal; above, 1.65e38, not inf. Callers
 * (softmax, sigmoid) need neither end exactly. 2^n is built in the
 * exponent bits. */
static inline float nn_expf(float x) {
    x = x < -87.3365f ? -87.3365f : x;
    x = x > 88.0f ? 88.0f : x;
    /* adding 1.5 * 2^23 rounds to an integer (round to nearest) */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float z = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * z + r + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &e, sizeof s);
    return p * s;
}

/* erf(x), inline and branch-free like nn_expf (for GELU's loops): both
 * pieces are computed and one is kept,
 *   |x| < 1:  erf(x) = x P(x^2)
 *   |x| >= 1: erf(x) = 1 - exp(-x^2) Q(|x| - 2.5),  |x| clamped to 4 (erf is
 *             1.0f from 3.92 on)
 * P (degree 6) and Q (degree 12) are least-squares fits on Chebyshev nodes
 * of erf(x)/x and erfc(x) exp(x^2), made for this file (tools/ has no
 * script: numpy.polyfit against mpmath, 3000-4000 nodes); fit error below
 * 1e-8 relative, so float rounding dominates: measured within 7.6e-8 of
 * erf() in double over [-6, 6] (libm's erff: 5.4e-8); tests/test_nn.c
 * holds it to 1e-7. */
static inline float nn_erff(float x) {
    float a = x < 0.0f ? -x : x;
    float u = a < 1.0f ? a : 1.0f, z = u * u;
    float p = 7.932738532e-05f;
    p = p * z - 8.034609958e-04f;
    p = p * z + 5.191189981e-03f;
    p = p * z - 2.685538321e-02f;
    p = p * z + 1.128362528e-01f;
    p = p * z - 3.761262983e-01f;
    p = p * z + 1.28379167e-01f;    /* P - 1: x + x (P - 1) rounds better than x P */
    float small = u + u * p;
    float v = a < 1.0f ? 1.0f : a > 4.0f ? 4.0f : a, t = v - 2.5f;
    float q = 1.065103051e-07f;
    q = q * t - 4.269412360e-07f;
    q = q * t + 9.528582362e-07f;
    q = q * t - 3.744391040e-06f;
    q = q * t + 1.617348587e-05f;
    q = q * t - 5.952961253e-05f;
    q = q * t + 2.108489560e-04f;
    q = q * t - 7.331466456e-04f;
    q = q * t + 2.467101972e-03f;
    q = q * t - 8.001696409e-03f;
    q = q * t + 2.493798781e-02f;
    q = q * t - 7.434733646e-02f;
    q = q * t + 2.108063643e-01f;
    float big = 1.0f - nn_expf(-v * v) * q;
    float r = a < 1.0f ? small : big;
    return x < 0.0f ? -r : r;
}
/* ---- compute mode (matmul_bf16.c) -----------------------------------------
 * Process-wide; gemm and gemm_packed follow it. GEMM_F32 (the default):
 * fp32 throughout. GEMM_BF16 (--compute bf16): A and B rounded to bf16
 * (nearest, ties to even) as they are packed, products summed in fp32, C
 * fp32. Set it once, before the work starts (not while a gemm runs).
 * gemm_parse_compute("fp32" | "bf16") gives the mode, -1 for anything else. */
enum { GEMM_F32 = 0, GEMM_BF16 = 1 };
void gemm_set_compute(int mode);
int gemm_compute(void);
int gemm_parse_compute(const char *s);
/* gemm in bf16 whatever the mode */
void gemm_bf16(int transA, int transB, int M, int N, int K,
               float alpha, const float *A, int lda, const float *B, int ldb,
               float beta, float *C, int ldc);
/* fp32 -> bf16 bits (torch's rounding; NaN -> 0x7fc0) and back */
uint16_t gemm_bf16_round(float x);
float gemm_bf16_to_float(uint16_t h);
/* the bf16 kernel, chosen from the CPU on first use (AUTO); set_kernel
 * returns 0 (and changes nothing) when this CPU or build lacks the one asked
 * for. SCALAR is the element-by-element fallback (the same bits as
 * PORTABLE), for tests. AMX: Intel's tiles (its own summation order, so
 * its own bits); AMX_MODEL runs the same code with the tile instructions
 * done in plain C (any CPU; tests, and AUTO's self-check of AMX). */
enum { GEMM_BF16_AUTO = 0, GEMM_BF16_PORTABLE = 1, GEMM_BF16_AVX512 = 2, GEMM_BF16_SCALAR = 3,
       GEMM_BF16_AMX = 4, GEMM_BF16_AMX_MODEL = 5 };
int gemm_bf16_set_kernel(int k);
const char *gemm_bf16_kernel_name(void);
/* one TDPBF16PS on 16 x 16 tiles, for tests: c += a . b (c fp32, a and b
 * words of two bf16, row-major 16 x 16 each) by the model (_model) or by
 * the CPU's AMX (_hw: returns 0 and does nothing where AMX is missing) */
void gemm_bf16_tdp_model(float *c, const uint32_t *a, const uint32_t *b);
int gemm_bf16_tdp_hw(float *c, const uint32_t *a, const uint32_t *b);
/* Between matmul.c and matmul_bf16.c only. gemm_pack_b under GEMM_BF16:
 * op(B) (K x N) rounded and packed once into gemm_bf16_pack_words(K, N)
 * words at dst; gemm_bf16_packed multiplies by it (the bits of gemm_bf16).
 * gemm_tiles: the threaded loop over C's rectangles both kernels share
 * (rect(job, thread, i0, i1, j0, j1) for rows [i0, i1), columns [j0, j1));
 * gemm_buffer: a grow-only packing buffer of at least `bytes` (the calling
 * thread's own inside a parallel region), NULL when out of memory. */
size_t gemm_bf16_pack_words(int K, int N);
void gemm_bf16_pack_b(uint32_t *dst, int transB, int K, int N, const float *B, int ldb);
void gemm_bf16_packed(int transA, int M, int N, int K, float alpha, const float *A, int lda,
                      const uint32_t *bp, float beta, float *C, int ldc);
/* gemm_im2col's product under GEMM_BF16 (matmul.c calls it): pimg the
 * zero-padded images (B, C, Hp, Wp), buf gemm_bf16_pack_words(C kh kw,
 * B Ho Wo) words, the bits of gemm_bf16 on the im2col columns */
void gemm_bf16_im2col(int M, float alpha, const float *A, int lda, const float *pimg,
                      int B, int C, int Hp, int Wp, int kh, int kw, int stride, int Ho, int Wo,
                      uint32_t *buf, float beta, float *Cm, int ldc);
typedef void (*gemm_rect_fn)(const void *job, int thread, int i0, int i1, int j0, int j1);
void gemm_tiles(int M, int N, int mr, int nr, int nthreads, double pack_cost,
                gemm_rect_fn rect, const void *job);
void *gemm_buffer(size_t bytes);

/* ---- scratch ---------------------------------------------------------------
 * One grow-only work buffer (im2col columns, attention scores) reused by
 * every layer, so the hot path does not malloc. Not re-entrant: a layer asks
 * for it, uses it, and is done before the next layer asks. Returns NULL when
 * memory runs out. nn_scratch_free() gives it back. */
float *nn_scratch(size_t nfloats);
void nn_scratch_free(void);

/* ---- linear: out (N, out) = inp (N, in) W^T + b;  W (out x in), b (out) or NULL */
void linear_forward(float *out, const float *inp, const float *w, const float *b,
                    int N, int in, int outc);
void linear_backward(float *dinp, float *dw, float *db, const float *dout,
                     const float *inp, const float *w, int N, int in, int outc);

/* ---- conv2d: inp (B, C, H, W) -> out (B, O, Ho, Wo); w (O, C, kh, kw), b (O) or NULL
 * Ho = (H + 2 pad - kh) / stride + 1, likewise Wo. Zero padding. */
void conv2d_forward(float *out, const float *inp, const float *w, const float *b,
                    int B, int C, int H, int W, int O, int kh, int kw, int stride, int pad);
void conv2d_backward(float *dinp, float *dw, float *db, const float *dout,
                     const float *inp, const float *w,
                     int B, int C, int H, int W, int O, int kh, int kw, int stride, int pad);
/* conv2d builds its im2col columns a band of output rows at a time, at most
 * this many floats (default 2^24 = 64 MB); tests lower it to check banding */
extern size_t nn_conv_cols_max;

/* ---- group norm: inp (B, C, HW), G groups; w, b per channel (C) or NULL.
 * mean, rstd (B*G) are written by forward and read by backward. */
void groupnorm_forward(float *out, float *mean, float *rstd, const float *inp,
                       const float *w, const float *b, int B, int C, int HW, int G, float eps);
void groupnorm_backward(float *dinp, float *dw, float *db, const float *dout,
                        const float *inp, const float *w, const float *mean, const float *rstd,
                        int B, int C, int HW, int G);
/* group norm then SiLU in one pass: out as groupnorm_forward (the tensor
 * groupnorm_backward's caller keeps for silu_backward), act = silu(out);
 * bit-identical to groupnorm_forward + silu_forward(act, out, B*C*HW), one
 * read of inp and of out fewer. Backward: silu_backward, then groupnorm_backward.
 * Called by unet.c's and vae.c's ResNet forwards (on the CPU table). */
void groupnorm_silu_forward(float *out, float *act, float *mean, float *rstd, const float *inp,
                            const float *w, const float *b, int B, int C, int HW, int G, float eps);

/* ---- layer norm over the last dim: inp (N, C); w, b (C); mean, rstd (N) */
void layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                       const float *w, const float *b, int N, int C, float eps);
void layernorm_backward(float *dinp, float *dw, float *db, const float *dout,
                        const float *inp, const float *w, const float *mean, const float *rstd,
                        int N, int C);

/* ---- pointwise activations over n floats (out may equal inp in forward) */
void silu_forward(float *out, const float *inp, size_t n);           /* x * sigmoid(x) */
void silu_backward(float *dinp, const float *dout, const float *inp, size_t n);
void gelu_forward(float *out, const float *inp, size_t n);           /* erf form, as torch's default */
void gelu_backward(float *dinp, const float *dout, const float *inp, size_t n);
void quickgelu_forward(float *out, const float *inp, size_t n);      /* x * sigmoid(1.702 x), CLIP */
void quickgelu_backward(float *dinp, const float *dout, const float *inp, size_t n);

/* ---- GEGLU (diffusers): inp (N, 2D) holds [value | gate] halves;
 * out (N, D) = value * gelu(gate). The projection before it is a linear. */
void geglu_forward(float *out, const float *inp, int N, int D);
void geglu_backward(float *dinp, const float *dout, const float *inp, int N, int D);

/* ---- nearest 2x upsample: inp (B, C, H, W) -> out (B, C, 2H, 2W) */
void upsample2x_forward(float *out, const float *inp, int B, int C, int H, int W);
void upsample2x_backward(float *dinp, const float *dout, int B, int C, int H, int W);

/* ---- sinusoidal timestep embedding (diffusers get_timestep_embedding):
 * out (N, dim); half = dim/2, freq_j = exp(-ln(max_period) * j / (half - freq_shift)),
 * out = [sin(t f), cos(t f)] or [cos, sin] when flip_sin_to_cos. No backward
 * (t is not a learned input). */
void timestep_embedding(float *out, const float *t, int N, int dim,
                        int flip_sin_to_cos, float freq_shift, float max_period);

/* ---- seeded RNG (splitmix64 stream): reproducible whatever the thread count */
typedef struct { uint64_t state; } rng_t;
void rng_seed(rng_t *r, uint64_t seed);
uint64_t rng_u64(rng_t *r);
float rng_uniform(rng_t *r);            /* [0, 1) */
float rng_normal(rng_t *r);             /* N(0, 1), Box-Muller */

/* ---- dropout (inverted): out = inp * mask / (1 - p), mask ~ Bernoulli(1-p).
 * mask (n bytes) is written by forward and read by backward. p == 0 copies. */
void dropout_forward(float *out, uint8_t *mask, const float *inp, size_t n, float p, rng_t *rng);
void dropout_backward(float *dinp, const float *dout, const uint8_t *mask, size_t n, float p);

/* ---- attention.c: multi-head scaled-dot-product attention.
 * q (B, Tq, H*Dh), k and v (B, Tk, H*Dh), out (B, Tq, H*Dh), all tokens-major
 * as produced by to_q / to_k / to_v. Self-attention has Tq == Tk, cross-
 * attention (on the text context) Tq != Tk. causal: key j > query i masked
 * (CLIP). scale = 1/sqrt(Dh).
 *   att = softmax(q k^T * scale) per head;  out = att v
 * att (B, H, Tq, Tk) may be NULL: forward then keeps no probabilities and
 * backward recomputes them from q and k (memory for time). */
void attention_forward(float *out, float *att, const float *q, const float *k, const float *v,
                       int B, int Tq, int Tk, int H, int Dh, int causal);
void attention_backward(float *dq, float *dk, float *dv, const float *dout,
                        const float *q, const float *k, const float *v, const float *att,
                        int B, int Tq, int Tk, int H, int Dh, int causal);

#endif

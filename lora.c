/* lora.c: the LoRA layer, the formula at the centre of the article.
 *
 * Article 2.2 / 4.1 write the adapted weight as
 *
 *     W = W0 + (alpha / r) * B A            W0: out x in (frozen)
 *                                            B : out x r  ("lora_up", starts at 0)
 *                                            A : r x in   ("lora_down", random)
 *
 * and the layer never forms W: it computes y = W0 x + b + (alpha/r) B (A x),
 * which costs r * (in + out) multiply-adds per token on top of the frozen
 * layer instead of in * out. (The article's 4.1 writes A B^T with A: d x r,
 * B: k x r, and its 2.2 writes A: d x r, B: r x k with Delta W = A B; those
 * are the same product with the letters swapped. Here A and B follow the
 * LoRA paper and peft: A projects down, B projects up, B = 0 at the start.)
 *
 * Names: kohya files call A "lora_down" and B "lora_up"; peft calls them
 * lora_A and lora_B. The tensors are the same, so they load unchanged. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "lora.h"

void lora_init(lora_t *L, int in, int out, int r, float alpha, float dropout,
               float *A, float *B, int gaussian, rng_t *rng) {
    L->in = in; L->out = out; L->r = r;
    L->alpha = alpha;
    L->scale = alpha / (float)r;
    L->dropout = dropout;
    L->A = A; L->B = B;
    L->dA = NULL; L->dB = NULL;
    /* Kaiming-uniform with a = sqrt(5) (torch's default for nn.Linear, used
     * by peft and kohya for lora_down):
     *   gain = sqrt(2 / (1 + a^2)) = sqrt(1/3),  bound = gain * sqrt(3 / fan_in) = 1 / sqrt(in)
     * peft's "gaussian" option: N(0, (1/r)^2). */
    float bound = 1.0f / sqrtf((float)in);
    for (size_t i = 0; i < (size_t)r * in; i++)
        A[i] = gaussian ? rng_normal(rng) / (float)r : (2.0f * rng_uniform(rng) - 1.0f) * bound;
    /* B = 0: at step 0 the adapted model is exactly the base model */
    memset(B, 0, sizeof(float) * (size_t)out * r);
}

size_t lora_num_params(const lora_t *L) {
    /* A is r x in, B is out x r (article 2.2 counts this as 2rdk, which is
     * wrong: it is r(d + k); see NOTES.md) */
    return (size_t)L->r * ((size_t)L->in + (size_t)L->out);
}

/* x_d = dropout(x): peft applies dropout to the input of the LoRA branch only;
 * the frozen path sees the clean x. Returns x itself when there is no dropout,
 * else the masked copy in scratch storage the caller provides. */
static const float *branch_input(float *buf, uint8_t *mask, const float *inp, size_t n,
                                 const lora_t *L, rng_t *rng) {
    if (L->dropout <= 0.0f) return inp;
    dropout_forward(buf, mask, inp, n, L->dropout, rng);
    return buf;
}

void lora_forward(float *out, float *ax, uint8_t *mask, const float *inp,
                  const float *w0, const float *b0, const lora_t *L,
                  int N, int in, int outc, rng_t *rng) {
    /* frozen path: out = x W0^T + b */
    linear_forward(out, inp, w0, b0, N, in, outc);
    if (!L) return;
    int r = L->r;
    float *xd = L->dropout > 0.0f ? malloc(sizeof(float) * (size_t)N * in) : NULL;
    const float *x = branch_input(xd, mask, inp, (size_t)N * in, L, rng);
    /* ax (N x r) = x_d A^T                  (down-projection to rank r) */
    gemm(0, 1, N, r, in, 1.0f, x, in, L->A, in, 0.0f, ax, r);
    /* out += (alpha/r) * ax B^T             (up-projection, scaled) */
    gemm(0, 1, N, outc, r, L->scale, ax, r, L->B, r, 1.0f, out, outc);
    free(xd);
}

void lora_backward(float *dinp, const float *dout, const float *inp, const float *ax,
                   const uint8_t *mask, const float *w0, lora_t *L, int N, int in, int outc) {
    /* frozen path: dx += dout W0; no dW0, no db (NULL = frozen, no work) */
    if (dinp) linear_backward(dinp, NULL, NULL, dout, inp, w0, N, in, outc);
    if (!L) return;
    int r = L->r;
    float s = L->scale;
    /* g (N x r) = dout B: the gradient reaching the rank-r bottleneck, over s */
    float *g = malloc(sizeof(float) * (size_t)N * r);
    if (!g) return;
    gemm(0, 0, N, r, outc, 1.0f, dout, outc, L->B, r, 0.0f, g, r);
    /* dB += s * dout^T ax                   (out x r) */
    if (L->dB) gemm(1, 0, outc, r, N, s, dout, outc, ax, r, 1.0f, L->dB, r);
    /* dA += s * g^T x_d                     (r x in) */
    if (L->dA || dinp) {
        float *xd = NULL;
        const float *x = inp;
        if (L->dropout > 0.0f) {
            /* rebuild x_d = x * mask / (1 - p) from the saved mask */
            xd = malloc(sizeof(float) * (size_t)N * in);
            if (!xd) { free(g); return; }
            float keep = 1.0f / (1.0f - L->dropout);
            for (size_t i = 0; i < (size_t)N * in; i++) xd[i] = mask[i] ? inp[i] * keep : 0.0f;
            x = xd;
        }
        if (L->dA) gemm(1, 0, r, in, N, s, g, r, x, in, 1.0f, L->dA, in);
        free(xd);
    }
    /* dx += s * g A, through the dropout mask (d x_d / dx = mask / (1-p)) */
    if (dinp) {
        if (L->dropout > 0.0f) {
            float *t = malloc(sizeof(float) * (size_t)N * in);
            if (!t) { free(g); return; }
            gemm(0, 0, N, in, r, s, g, r, L->A, in, 0.0f, t, in);
            dropout_backward(dinp, t, mask, (size_t)N * in, L->dropout);
            free(t);
        } else {
            gemm(0, 0, N, in, r, s, g, r, L->A, in, 1.0f, dinp, in);
        }
    }
    free(g);
}

/* 1x1 convolution on NCHW. Per image b, X_b is the (in x HW) matrix and the
 * layer is Y_b = W0 X_b + b + s * B (A X_b): the same algebra with the token
 * axis last, so the products are transposed relative to lora_forward. */
void lora_conv1x1_forward(float *out, float *ax, uint8_t *mask, const float *inp,
                          const float *w0, const float *b0, const lora_t *L,
                          int Bn, int in, int outc, int HW, rng_t *rng) {
    conv2d_forward(out, inp, w0, b0, Bn, in, HW, 1, outc, 1, 1, 1, 0);
    if (!L) return;
    int r = L->r;
    float *xd = L->dropout > 0.0f ? malloc(sizeof(float) * (size_t)Bn * in * HW) : NULL;
    const float *x = branch_input(xd, mask, inp, (size_t)Bn * in * HW, L, rng);
    for (int b = 0; b < Bn; b++) {
        const float *xb = x + (size_t)b * in * HW;
        float *axb = ax + (size_t)b * r * HW;
        /* AX_b (r x HW) = A X_b */
        gemm(0, 0, r, HW, in, 1.0f, L->A, in, xb, HW, 0.0f, axb, HW);
        /* Y_b += s * B AX_b */
        gemm(0, 0, outc, HW, r, L->scale, L->B, r, axb, HW, 1.0f, out + (size_t)b * outc * HW, HW);
    }
    free(xd);
}

void lora_conv1x1_backward(float *dinp, const float *dout, const float *inp, const float *ax,
                           const uint8_t *mask, const float *w0, lora_t *L,
                           int Bn, int in, int outc, int HW) {
    size_t nin = (size_t)in * HW;
    if (dinp) conv2d_backward(dinp, NULL, NULL, dout, inp, w0, Bn, in, HW, 1, outc, 1, 1, 1, 0);
    if (!L) return;
    int r = L->r;
    float s = L->scale;
    float *g = malloc(sizeof(float) * (size_t)r * HW);
    float *xd = L->dropout > 0.0f ? malloc(sizeof(float) * nin) : NULL;
    float *t = (dinp && L->dropout > 0.0f) ? malloc(sizeof(float) * nin) : NULL;
    float keep = L->dropout > 0.0f ? 1.0f / (1.0f - L->dropout) : 1.0f;
    for (int b = 0; b < Bn; b++) {
        const float *dy = dout + (size_t)b * outc * HW;
        const float *xb = inp + (size_t)b * nin;
        if (xd) {
            const uint8_t *mb = mask + (size_t)b * nin;
            for (size_t i = 0; i < nin; i++) xd[i] = mb[i] ? xb[i] * keep : 0.0f;
            xb = xd;
        }
        /* G (r x HW) = B^T dY_b */
        gemm(1, 0, r, HW, outc, 1.0f, L->B, r, dy, HW, 0.0f, g, HW);
        /* dB += s * dY_b AX_b^T    (out x r) */
        if (L->dB) gemm(0, 1, outc, r, HW, s, dy, HW, ax + (size_t)b * r * HW, HW, 1.0f, L->dB, r);
        /* dA += s * G X_b^T        (r x in) */
        if (L->dA) gemm(0, 1, r, in, HW, s, g, HW, xb, HW, 1.0f, L->dA, in);
        /* dX_b += s * A^T G  (through the dropout mask) */
        if (dinp) {
            float *dx = dinp + (size_t)b * nin;
            if (t) {
                gemm(1, 0, in, HW, r, s, L->A, in, g, HW, 0.0f, t, HW);
                dropout_backward(dx, t, mask + (size_t)b * nin, nin, L->dropout);
            } else {
                gemm(1, 0, in, HW, r, s, L->A, in, g, HW, 1.0f, dx, HW);
            }
        }
    }
    free(g); free(xd); free(t);
}

/* Merge (article 2.2, "no inference latency"): W0 <- W0 + w * (alpha/r) B A.
 * Unmerge subtracts the same product; in float32 the round trip is exact to
 * rounding (one add and one subtract of the same numbers). */
void lora_merge(float *w0, const lora_t *L, float weight) {
    gemm(0, 0, L->out, L->in, L->r, weight * L->scale, L->B, L->r, L->A, L->in, 1.0f, w0, L->in);
}

void lora_unmerge(float *w0, const lora_t *L, float weight) {
    lora_merge(w0, L, -weight);
}

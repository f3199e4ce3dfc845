/* lora.h: the LoRA layer (article 2.2, 4.1), in the LoRA paper's convention:
 *
 *     y = W0 x + b + (alpha / r) * B (A dropout(x))
 *
 *   W0 (out x in), b: the frozen pretrained weight and bias (owned by the model)
 *   A  (r x in):   "lora_down"; Kaiming-uniform (a = sqrt(5)) as kohya / peft,
 *                  or Gaussian on request
 *   B  (out x r):  "lora_up"; zero, so training starts from the base model
 *   trainable parameters: r * (in + out)
 *
 * A 1x1 convolution (proj_in / proj_out of SD1.x transformers) is the same
 * map applied at every pixel; lora_conv1x1_* take NCHW input (B, in, HW). */
#ifndef SDLORA_LORA_H
#define SDLORA_LORA_H

#include "nn.h"

typedef struct {
    int in, out, r;
    float alpha;
    float scale;          /* alpha / r (rsLoRA would be alpha / sqrt(r)) */
    float dropout;        /* on the LoRA branch input only, as peft and kohya */
    float *A, *B;         /* (r x in), (out x r): trainable */
    float *dA, *dB;       /* their gradients, same shapes; NULL = frozen */
} lora_t;

/* Set sizes and initialise: A ~ Kaiming-uniform(a = sqrt(5)), i.e.
 * U(-1/sqrt(in), 1/sqrt(in)), or N(0, 1/r) when gaussian (peft's "gaussian");
 * B = 0. A and B point at caller storage (one parameter block). */
void lora_init(lora_t *L, int in, int out, int r, float alpha, float dropout,
               float *A, float *B, int gaussian, rng_t *rng);
size_t lora_num_params(const lora_t *L);               /* r * (in + out) */

/* Linear with an optional adapter (L == NULL: plain linear).
 *   inp (N, in) -> out (N, outc); in/outc must equal L->in/L->out when L is set
 *   ax (N, r): saved A dropout(x) for backward (unused when L == NULL)
 *   mask (N * in): dropout mask, needed only when L->dropout > 0 */
void lora_forward(float *out, float *ax, uint8_t *mask, const float *inp,
                  const float *w0, const float *b0, const lora_t *L,
                  int N, int in, int outc, rng_t *rng);
/* dinp += dout W0 + scale * (dout B) A (masked);  dB += scale * dout^T ax;
 * dA += scale * (dout B)^T dropout(x). Never a gradient for W0 or b. */
void lora_backward(float *dinp, const float *dout, const float *inp, const float *ax,
                   const uint8_t *mask, const float *w0, lora_t *L, int N, int in, int outc);

/* The same for a 1x1 convolution on NCHW: inp (Bn, in, HW) -> out (Bn, out, HW);
 * ax (Bn, r, HW), mask (Bn * in * HW). w0 is (out, in, 1, 1) = (out x in).
 * L == NULL: the plain 1x1 convolution. */
void lora_conv1x1_forward(float *out, float *ax, uint8_t *mask, const float *inp,
                          const float *w0, const float *b0, const lora_t *L,
                          int Bn, int in, int outc, int HW, rng_t *rng);
void lora_conv1x1_backward(float *dinp, const float *dout, const float *inp, const float *ax,
                           const uint8_t *mask, const float *w0, lora_t *L,
                           int Bn, int in, int outc, int HW);

/* W0 += weight * scale * B A  (merge, for inference at no extra cost; article 2.2)
 * and its exact inverse with -weight (unmerge). */
void lora_merge(float *w0, const lora_t *L, float weight);
void lora_unmerge(float *w0, const lora_t *L, float weight);

#endif

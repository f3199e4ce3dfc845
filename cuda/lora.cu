// cuda/lora.cu: the LoRA layer on the GPU, lora.c's sequence of products
// (cuda/layers.cuh, through cuBLAS) with the dropout kernels of nn.cu:
//   forward:  out = x W0^T + b;  ax = dropout(x) A^T;  out += s ax B^T
//   backward: dx += dout W0;  g = dout B;  dB += s dout^T ax;
//             dA += s g^T dropout(x);  dx += s (g A) masked
// s = alpha / r. No gradient for W0 or b, ever.
#include "common.cuh"
#include "layers.cuh"
#include "backend.cuh"
extern "C" {
#include "cuda.h"
}

extern "C" void lora_forward_cuda(float *out, float *ax, uint8_t *mask, float *scratch, const float *inp,
                                  const float *w0, const float *b0, const lora_t *L,
                                  int N, int in, int outc, rng_t *rng) {
    lora_forward_t<DevBK>(out, ax, mask, scratch, inp, w0, b0, L, N, in, outc, rng);
}

extern "C" void lora_backward_cuda(float *dinp, const float *dout, const float *inp, const float *ax,
                                   const uint8_t *mask, float *scratch, const float *w0, lora_t *L,
                                   int N, int in, int outc) {
    lora_backward_t<DevBK>(dinp, dout, inp, ax, mask, scratch, w0, L, N, in, outc);
}

extern "C" void lora_conv_forward_cuda(float *out, float *ax, uint8_t *mask, float *scratch, const float *inp,
                                       const lora_t *L, int Bn, int H, int W, int stride, int pad, rng_t *rng) {
    lora_conv_forward_t<DevBK>(out, ax, mask, scratch, inp, L, Bn, H, W, stride, pad, rng);
}

extern "C" void lora_conv_backward_cuda(float *dinp, const float *dout, const float *inp, const float *ax,
                                        const uint8_t *mask, float *scratch, lora_t *L,
                                        int Bn, int H, int W, int stride, int pad) {
    lora_conv_backward_t<DevBK>(dinp, dout, inp, ax, mask, scratch, L, Bn, H, W, stride, pad);
}

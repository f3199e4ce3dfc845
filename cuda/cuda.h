/* cuda/cuda.h: the optional GPU backend (make CUDA=1), callable from C.
 *
 * Every *_cuda function is its CPU twin from nn.h / lora.h / optim.h /
 * ddpm.h on device memory (cudaMalloc), same arguments, same semantics:
 * backward accumulates (+=), a NULL gradient pointer skips that work. The
 * arithmetic of each kernel is checked against the CPU code on the host by
 * `make CUDA=1 test-cuda` (cuda/test_cuda_host.cu). Calls do not return
 * errors: the first failed CUDA or cuBLAS call is kept as one line (the
 * call, the function, the layer) until cuda_last_error() takes it.
 * (Include it as "cuda/cuda.h": it is not the CUDA driver API's <cuda.h>.)
 *
 * cuda_device_check() is callable from every build; the rest exists only
 * with SDLORA_CUDA (make CUDA=1). */
#ifndef SDLORA_CUDA_H
#define SDLORA_CUDA_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

/* what --device cuda can expect here */
typedef enum {
    CUDA_DEV_OK = 0,          /* a usable GPU */
    CUDA_DEV_NOT_BUILT = 1,   /* this build has no CUDA (make without CUDA=1) */
    CUDA_DEV_NO_DRIVER = 2,   /* no NVIDIA driver, or one too old for this runtime */
    CUDA_DEV_NO_DEVICE = 3    /* a driver, but no GPU it can use */
} cuda_dev_status;
#define CUDA_ERR_LEN 320

#ifdef SDLORA_CUDA
#include "../lora.h"
#include "../optim.h"
#include "../backend.h"

/* ---- ops.cu: the GPU's operations table (backend.h), every entry below
 * and device memory; what unet_to_device(u, nn_ops_cuda()) runs on */
const nn_ops *nn_ops_cuda(void);
/* bytes of device memory in use now (cudaMemGetInfo: total - free), 0 on failure */
size_t cuda_mem_used(void);

/* CUDA_DEV_OK, or the case with a one-line "error: ..." in err (CUDA_ERR_LEN) */
int cuda_device_check(char *err);

/* 1 when at least one CUDA device is usable, 0 when there is none, no
 * driver, or any error; never aborts. */
int cuda_available(void);

/* the first error since the last call (one line, valid until the next
 * call), or NULL; clears it */
const char *cuda_last_error(void);
/* the layer named in error messages from now on (a static string, e.g.
 * "down_blocks.0.resnets.1.conv1"; NULL: none) */
void cuda_set_layer(const char *name);

/* device memory; each returns NULL / 0 after recording a failure. Kernels
 * run asynchronously: a fault inside one is reported by the next copy or
 * by cuda_synchronize(). */
void *cuda_alloc(size_t bytes);
void cuda_free(void *p);
int cuda_upload(void *dst, const void *src, size_t bytes);     /* host -> device */
int cuda_download(void *dst, const void *src, size_t bytes);   /* device -> host */
int cuda_zero(void *dst, size_t bytes);
int cuda_synchronize(void);

/* ---- gemm.cu: mixed precision, TF32 and the device memory count.
 * cuda_set_compute: every GEMM from then on (linear, the convolutions',
 * attention's batched products, LoRA's) rounds its two operands to bf16 or
 * fp16 (nearest even) and sums in fp32 into an fp32 C: the CPU's --compute
 * bf16 (matmul_bf16.c) on the GPU (cuda/mixed_ops.cuh). Set it before the
 * work starts. cuda_set_tf32(1): fp32 GEMMs on TF32 tensor cores (--tf32).
 * cuda_mem_peak: the most bytes this backend has held at once (weights,
 * activations, scratch, cuBLAS's workspace; not the CUDA context). */
enum { CUDA_COMPUTE_F32 = 0, CUDA_COMPUTE_BF16 = 1, CUDA_COMPUTE_F16 = 2 };
#define CUDA_CUBLAS_WORKSPACE ((size_t)32 << 20)   /* cuBLAS's workspace, bytes (Hopper's default size) */
void cuda_set_compute(int mode);
int cuda_compute(void);
void cuda_set_tf32(int on);
size_t cuda_mem_peak(void);
size_t cuda_mem_live(void);
/* the grow-only scratch and operand copies freed (they grow again on demand) */
void cuda_release_scratch(void);

/* ---- gemm.cu: gemm() from nn.h through cuBLAS (row-major, BLAS semantics) */
void gemm_cuda(int transA, int transB, int M, int N, int K,
               float alpha, const float *A, int lda, const float *B, int ldb,
               float beta, float *C, int ldc);

/* ---- nn.cu */
void linear_forward_cuda(float *out, const float *inp, const float *w, const float *b,
                         int N, int in, int outc);
void linear_backward_cuda(float *dinp, float *dw, float *db, const float *dout,
                          const float *inp, const float *w, int N, int in, int outc);
void conv2d_forward_cuda(float *out, const float *inp, const float *w, const float *b,
                         int B, int C, int H, int W, int O, int kh, int kw, int stride, int pad);
void conv2d_backward_cuda(float *dinp, float *dw, float *db, const float *dout,
                          const float *inp, const float *w,
                          int B, int C, int H, int W, int O, int kh, int kw, int stride, int pad);
void groupnorm_forward_cuda(float *out, float *mean, float *rstd, const float *inp,
                            const float *w, const float *b, int B, int C, int HW, int G, float eps);
void groupnorm_backward_cuda(float *dinp, float *dw, float *db, const float *dout,
                             const float *inp, const float *w, const float *mean, const float *rstd,
                             int B, int C, int HW, int G);
void layernorm_forward_cuda(float *out, float *mean, float *rstd, const float *inp,
                            const float *w, const float *b, int N, int C, float eps);
void layernorm_backward_cuda(float *dinp, float *dw, float *db, const float *dout,
                             const float *inp, const float *w, const float *mean, const float *rstd,
                             int N, int C);
void silu_forward_cuda(float *out, const float *inp, size_t n);
void silu_backward_cuda(float *dinp, const float *dout, const float *inp, size_t n);
void gelu_forward_cuda(float *out, const float *inp, size_t n);
void gelu_backward_cuda(float *dinp, const float *dout, const float *inp, size_t n);
void quickgelu_forward_cuda(float *out, const float *inp, size_t n);
void quickgelu_backward_cuda(float *dinp, const float *dout, const float *inp, size_t n);
void geglu_forward_cuda(float *out, const float *inp, int N, int D);
void geglu_backward_cuda(float *dinp, const float *dout, const float *inp, int N, int D);
void upsample2x_forward_cuda(float *out, const float *inp, int B, int C, int H, int W);
void upsample2x_backward_cuda(float *dinp, const float *dout, int B, int C, int H, int W);
/* t: N device floats */
void timestep_embedding_cuda(float *out, const float *t, int N, int dim,
                             int flip_sin_to_cos, float freq_shift, float max_period);
/* out = a + b over n floats (residual; out may alias a or b), and its
 * backward: dst += src (a NULL dst skips) */
void add_cuda(float *out, const float *a, const float *b, size_t n);
void accumulate_cuda(float *dst, const float *src, size_t n);
/* mask: n device bytes; the rng state stays on the host and advances by n */
void dropout_forward_cuda(float *out, uint8_t *mask, const float *inp, size_t n, float p, rng_t *rng);
void dropout_backward_cuda(float *dinp, const float *dout, const uint8_t *mask, size_t n, float p);

/* ---- attention.cu (att: (B, H, Tq, Tk) device floats, or NULL) */
void attention_forward_cuda(float *out, float *att, const float *q, const float *k, const float *v,
                            int B, int Tq, int Tk, int H, int Dh, int causal);
void attention_backward_cuda(float *dq, float *dk, float *dv, const float *dout,
                             const float *q, const float *k, const float *v, const float *att,
                             int B, int Tq, int Tk, int H, int Dh, int causal);

/* ---- lora.cu: L->A, B, dA, dB, mask, scratch and every array on the device */
void lora_forward_cuda(float *out, float *ax, uint8_t *mask, float *scratch, const float *inp,
                       const float *w0, const float *b0, const lora_t *L,
                       int N, int in, int outc, rng_t *rng);
void lora_backward_cuda(float *dinp, const float *dout, const float *inp, const float *ax,
                        const uint8_t *mask, float *scratch, const float *w0, lora_t *L,
                        int N, int in, int outc);

/* conv LoRA (lora.h's lora_conv_forward / lora_conv_backward): the down
 * conv through conv2d's kernels, the 1x1 up through cuBLAS */
void lora_conv_forward_cuda(float *out, float *ax, uint8_t *mask, float *scratch, const float *inp,
                            const lora_t *L, int Bn, int H, int W, int stride, int pad, rng_t *rng);
void lora_conv_backward_cuda(float *dinp, const float *dout, const float *inp, const float *ax,
                             const uint8_t *mask, float *scratch, lora_t *L,
                             int Bn, int H, int W, int stride, int pad);

/* ---- optim.cu: o->m, o->v, params, grads on the device; o->step on the host */
void adamw_step_cuda(adamw_t *o, float *params, const float *grads, float lr);
/* sum of g^2 in double for --clip, in backend.h's fixed run order (comes
 * down; NaN when a call failed), and g *= k */
double grad_sumsq_cuda(const float *g, size_t n);
void scale_cuda(float *g, float k, size_t n);

/* ---- ddpm.cu: t (B ints), sqrt_abar and sqrt_1m_abar (the schedule's T
 * floats), weight (B floats or NULL) on the device */
void ddpm_add_noise_cuda(float *xt, const float *x0, const float *eps, const int *t, int B,
                         size_t n_per_item, const float *sqrt_abar, const float *sqrt_1m_abar);
void ddpm_velocity_cuda(float *v, const float *x0, const float *eps, const int *t, int B,
                        size_t n_per_item, const float *sqrt_abar, const float *sqrt_1m_abar);
/* the loss comes back to the host (the one value a step brings down); NaN
 * when a call failed */
float mse_loss_forward_cuda(const float *pred, const float *target, const float *weight,
                            int B, size_t n_per_item);
void mse_loss_backward_cuda(float *dpred, const float *pred, const float *target,
                            const float *weight, float dloss, int B, size_t n_per_item);
/* a micro-batch's draws and the loss's inputs (backend.h's ddpm_* entries):
 * s0 the host's RNG state before the draws; t, tf, eps, w on the device */
void ddpm_timesteps_cuda(int *t, float *tf, int B, int T, uint64_t s0);
void ddpm_normal_cuda(float *eps, size_t n, uint64_t s0);
void ddpm_noise_offset_cuda(float *eps, int B, int C, size_t HW, float offset, uint64_t s0);
void ddpm_target_cuda(float *target, const float *x0, const float *eps, const int *t, int B, size_t n_per_item,
                      ddpm_prediction pred, const float *sqrt_abar, const float *sqrt_1m_abar);
void ddpm_loss_weights_cuda(float *w, const int *t, int B, float gamma, ddpm_prediction pred,
                            const float *sqrt_abar, const float *sqrt_1m_abar);

#else  /* a build without CUDA: only the check, which says so */

static inline int cuda_device_check(char *err) {
    snprintf(err, CUDA_ERR_LEN, "error: --device cuda: this program was built without GPU support "
             "(rebuild with `make CUDA=1` on a machine with the CUDA Toolkit, or use --device cpu)");
    return CUDA_DEV_NOT_BUILT;
}

#endif

#ifdef __cplusplus
}
#endif
#endif

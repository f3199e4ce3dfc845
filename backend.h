/* backend.h: the operations table a model runs its layers through.
 *
 * unet.c, vae.c and clip.c call every primitive (nn.h, attention, lora.h) and every small
 * tensor helper (copy, zero, add, transpose, ...) through a table of
 * function pointers, nn_ops, instead of by name. nn_ops_cpu is nn.h's and
 * lora.h's functions themselves (the CPU, and every number is what it was
 * when unet.c called them directly). A second table runs the same calls on
 * another memory: nn_ops_cuda() (cuda/ops.cu, make CUDA=1) on the GPU, and
 * the host test's emulated device (cuda/test_cuda_host.cu). Every pointer a
 * table's function is given lives in that table's memory: the table also
 * says how to allocate it and move data in and out.
 *
 * Semantics are nn.h's: backward accumulates (+=), a NULL gradient skips. */
#ifndef SDLORA_BACKEND_H
#define SDLORA_BACKEND_H

#include <stddef.h>
#include <stdint.h>
#include "nn.h"
#include "lora.h"
#include "optim.h"
#include "ddpm.h"

typedef struct nn_ops {
    const char *name;      /* "cpu", "cuda", "host-emulated device" */
    int device;            /* 1: its own memory: a model copies its weights there */

    /* memory (device == 0: malloc and memcpy) */
    void *(*alloc)(size_t bytes);                                   /* NULL when out of memory */
    void (*free)(void *p);
    int (*upload)(void *dst, const void *src, size_t bytes);        /* host -> table memory; 1 = ok */
    int (*download)(void *dst, const void *src, size_t bytes);      /* table memory -> host; 1 = ok */
    /* (the host side of upload and download may be table memory too: a copy
     * within it. train.c hands unet_forward x_t, t and the context it made on
     * the device, and clip_forward a context to leave there.) */
    /* the first error since the last call, one line, or NULL (clears it) */
    const char *(*error)(void);
    /* the layer errors name from now on (a static string), or NULL */
    void (*set_layer)(const char *name);

    /* small tensor helpers, on table memory */
    void (*copy)(float *dst, const float *src, size_t n);
    void (*zero)(float *p, size_t n);
    void (*add)(float *out, const float *a, const float *b, size_t n);   /* out = a + b */
    void (*accumulate)(float *y, const float *x, size_t n);              /* y += x */
    /* out[b][s][r] = in[b][r][s]: (B, R, S) -> (B, S, R), NCHW <-> tokens */
    void (*transpose)(float *out, const float *in, int B, int R, int S);
    /* y (B, C, HW): y[b, c, :] += v[b * C + c] (a per-channel bias: B = 1) */
    void (*add_chan)(float *y, const float *v, int B, int C, size_t HW);
    /* out[b * C + c] = sum over HW of x[b, c, :], summed in double */
    void (*sum_chan)(float *out, const float *x, int B, int C, size_t HW);
    /* dst[i] = src[i] widened from fp16 bits, exactly (fp16-held weights) */
    void (*widen_f16)(float *dst, const uint16_t *src, size_t n);
    /* memmove: dst and src may overlap (the VAE moves a layer's output down
     * onto its dead input) */
    void (*move)(float *dst, const float *src, size_t n);
    /* out (BC, H+1, W+1) = in (BC, H, W) with one zero row at the bottom and
     * one zero column at the right (the VAE's Downsample2D, F.pad(x, (0,1,0,1))) */
    void (*pad_br)(float *out, const float *in, int BC, int H, int W);

    /* nn.h, attention, lora.h */
    void (*gemm)(int transA, int transB, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc);
    void (*linear_forward)(float *out, const float *inp, const float *w, const float *b,
                           int N, int in, int outc);
    void (*linear_backward)(float *dinp, float *dw, float *db, const float *dout,
                            const float *inp, const float *w, int N, int in, int outc);
    void (*conv2d_forward)(float *out, const float *inp, const float *w, const float *b,
                           int B, int C, int H, int W, int O, int kh, int kw, int stride, int pad);
    void (*conv2d_backward)(float *dinp, float *dw, float *db, const float *dout,
                            const float *inp, const float *w,
                            int B, int C, int H, int W, int O, int kh, int kw, int stride, int pad);
    void (*groupnorm_forward)(float *out, float *mean, float *rstd, const float *inp,
                              const float *w, const float *b, int B, int C, int HW, int G, float eps);
    void (*groupnorm_backward)(float *dinp, float *dw, float *db, const float *dout,
                               const float *inp, const float *w, const float *mean, const float *rstd,
                               int B, int C, int HW, int G);
    void (*layernorm_forward)(float *out, float *mean, float *rstd, const float *inp,
                              const float *w, const float *b, int N, int C, float eps);
    void (*layernorm_backward)(float *dinp, float *dw, float *db, const float *dout,
                               const float *inp, const float *w, const float *mean, const float *rstd,
                               int N, int C);
    void (*silu_forward)(float *out, const float *inp, size_t n);
    void (*silu_backward)(float *dinp, const float *dout, const float *inp, size_t n);
    void (*gelu_forward)(float *out, const float *inp, size_t n);        /* CLIP's hidden_act */
    void (*quickgelu_forward)(float *out, const float *inp, size_t n);
    void (*geglu_forward)(float *out, const float *inp, int N, int D);
    void (*geglu_backward)(float *dinp, const float *dout, const float *inp, int N, int D);
    void (*upsample2x_forward)(float *out, const float *inp, int B, int C, int H, int W);
    void (*upsample2x_backward)(float *dinp, const float *dout, int B, int C, int H, int W);
    void (*timestep_embedding)(float *out, const float *t, int N, int dim,
                               int flip_sin_to_cos, float freq_shift, float max_period);
    void (*attention_forward)(float *out, float *att, const float *q, const float *k, const float *v,
                              int B, int Tq, int Tk, int H, int Dh, int causal);
    void (*attention_backward)(float *dq, float *dk, float *dv, const float *dout,
                               const float *q, const float *k, const float *v, const float *att,
                               int B, int Tq, int Tk, int H, int Dh, int causal);
    /* L's A, B, dA, dB in table memory too */
    void (*lora_forward)(float *out, float *ax, uint8_t *mask, float *scratch, const float *inp,
                         const float *w0, const float *b0, const lora_t *L,
                         int N, int in, int outc, rng_t *rng);
    void (*lora_backward)(float *dinp, const float *dout, const float *inp, const float *ax,
                          const uint8_t *mask, float *scratch, const float *w0, lora_t *L,
                          int N, int in, int outc);

    /* the optimizer step and the loss (optim.h, ddpm.h), so that with
     * --device cuda a step brings down only its loss value */
    /* optim.h's adamw_step with o->m, o->v, params, grads in table memory (o->step on the host) */
    void (*adamw_step)(adamw_t *o, float *params, const float *grads, float lr);
    /* sum of g[i]^2 in double, for --clip. The CPU adds in index order; a
     * device adds each run of NN_SUMSQ_CHUNK elements in order, then the
     * runs' sums in order (cuda/optim_ops.cuh): the same result for any
     * launch shape, within about 1e-15 relative of the CPU's */
    double (*grad_sumsq)(const float *g, size_t n);
    void (*scale)(float *g, float k, size_t n);                            /* g *= k */
    /* ddpm.h's mse_loss_forward / mse_loss_backward (weight: B floats or NULL) */
    float (*mse_loss_forward)(const float *pred, const float *target, const float *weight,
                              int B, size_t n_per_item);
    void (*mse_loss_backward)(float *dpred, const float *pred, const float *target,
                              const float *weight, float dloss, int B, size_t n_per_item);

    /* the text encoder's training step and conv LoRA (appended) */
    void (*gelu_backward)(float *dinp, const float *dout, const float *inp, size_t n);
    void (*quickgelu_backward)(float *dinp, const float *dout, const float *inp, size_t n);
    /* CLIP's input: out (B T, C), out[b, t, :] = tok[ids[b T + t], :] + pos[t, :].
     * Each table is fp32 (tok, pos) or fp16 bits widened exactly (tok16,
     * pos16; the other NULL); ids: B T ints in table memory, in range */
    void (*embedding_forward)(float *out, const int *ids, const float *tok, const uint16_t *tok16,
                              const float *pos, const uint16_t *pos16, int B, int T, int C);
    /* lora.h's lora_conv_forward / lora_conv_backward (L's A, B, dA, dB, and
     * ax, mask, scratch in table memory; rng on the host, as lora_forward) */
    void (*lora_conv_forward)(float *out, float *ax, uint8_t *mask, float *scratch, const float *inp,
                              const lora_t *L, int Bn, int H, int W, int stride, int pad, rng_t *rng);
    void (*lora_conv_backward)(float *dinp, const float *dout, const float *inp, const float *ax,
                               const uint8_t *mask, float *scratch, lora_t *L,
                               int Bn, int H, int W, int stride, int pad);
    /* A training micro-batch's random draws and the loss's inputs (ddpm.h),
     * so that with --device cuda only the latents go up. The RNG stays on the
     * host: s0 is its state before the draws, element i is the draw a CPU
     * loop would make there (ddpm_rng_*_at), and the caller moves the state
     * on by the count (nn_ddpm_micro does both). sqrt_abar, sqrt_1m_abar: the
     * schedule's T floats, uploaded once; t (B ints) and everything else in
     * table memory. Equal to the CPU's bit for bit on the host; on a GPU the
     * double log/cos of the normals may differ from glibc's in the last bit. */
    /* t[b] = draw b+1 mod T (ddpm_sample_timesteps); tf[b] = (float)t[b] */
    void (*ddpm_timesteps)(int *t, float *tf, int B, int T, uint64_t s0);
    /* eps[i] = normal number i after s0 (ddpm_sample_noise) */
    void (*ddpm_normal)(float *eps, size_t n, uint64_t s0);
    /* eps[b,c,:] += offset * normal number b C + c after s0 (ddpm_noise_offset) */
    void (*ddpm_noise_offset)(float *eps, int B, int C, size_t HW, float offset, uint64_t s0);
    /* ddpm_add_noise: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps */
    void (*ddpm_add_noise)(float *xt, const float *x0, const float *eps, const int *t, int B, size_t n_per_item,
                           const float *sqrt_abar, const float *sqrt_1m_abar);
    /* ddpm_target: eps, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 */
    void (*ddpm_target)(float *target, const float *x0, const float *eps, const int *t, int B, size_t n_per_item,
                        ddpm_prediction pred, const float *sqrt_abar, const float *sqrt_1m_abar);
    /* w[b] = ddpm_min_snr_weight(t[b]) when gamma > 0, else 1 */
    void (*ddpm_loss_weights)(float *w, const int *t, int B, float gamma, ddpm_prediction pred,
                              const float *sqrt_abar, const float *sqrt_1m_abar);
} nn_ops;

#define NN_SUMSQ_CHUNK 1024

/* --clip on a table's memory (torch's clip_grad_norm_ over g1 and g2
 * together): norm = sqrt(sumsq(g1) + sum of g2^2), and when
 * coef = max_norm / (norm + 1e-6) < 1, g1 *= coef on the table and g2 *= coef
 * on the host. g1 (n1) in ops' memory, g2 (n2, may be 0) on the host (the
 * text encoder's LoRA, which runs on the CPU). Returns the norm; one double
 * comes down. max_norm <= 0: nothing (returns 0). */
float nn_clip_grad_norm(const nn_ops *ops, float *g1, size_t n1, float *g2, size_t n2, float max_norm);

/* --clip with both gradient sets in ops' memory (--device cuda with --te):
 * norm = sqrt(sumsq(g1) + sumsq(g2)), each sum a grad_sumsq, and when
 * coef < 1 both scaled there; one double per set comes down. n1 or n2 may
 * be 0. Returns the norm; max_norm <= 0: nothing. */
float nn_clip_grad_norm2(const nn_ops *ops, float *g1, size_t n1, float *g2, size_t n2, float max_norm);

/* embedding_forward on the CPU (clip.c's gather, any table pair) */
void nn_embedding_forward(float *out, const int *ids, const float *tok, const uint16_t *tok16,
                          const float *pos, const uint16_t *pos16, int B, int T, int C);
/* train.c's micro_noise on a table's memory: t ~ U{0..T-1}, eps ~ N(0, I)
 * (+ the noise offset), x_t, the target and (w non-NULL) the min-SNR weights
 * of a micro-batch of B items (C, HW) from x0, with the draws of *rng's
 * stream that the CPU loops make, in their order; *rng moves on by their
 * count. Every array in ops' memory: t, tf, w (B), eps, xt, target (B C HW).
 * The host needs none of the integers: the timesteps stay on the table. */
typedef struct {
    int T;                                   /* the schedule's length */
    const float *sqrt_abar, *sqrt_1m_abar;   /* its tables (T each), in ops' memory */
    ddpm_prediction pred;
    float noise_offset, min_snr;             /* 0: none */
} nn_ddpm_cfg;
void nn_ddpm_micro(const nn_ops *ops, const nn_ddpm_cfg *c, rng_t *rng, const float *x0, int B, int C, size_t HW,
                   int *t, float *tf, float *eps, float *xt, float *target, float *w);

/* the CPU: nn.h's and lora.h's functions */
extern const nn_ops nn_ops_cpu;

/* nn_ops_cpu's functions as a device table (name "cpu-as-device", .device
 * = 1): alloc/free/upload/download as malloc/free/memmove, every new or freed
 * block filled with 0xff bytes (NaN) as a GPU's memory holds garbage, and an
 * upload's destination or a download's source outside its live blocks an
 * error. It runs ./train's and ./sample's --device cuda code on the host, in
 * any build. */
const nn_ops *nn_ops_cpu_device(void);
/* the testing hook: nn_ops_cpu_device() when the environment has
 * SDLORA_DEVICE=emulate (tests/test_programs.c sets it), else NULL */
const nn_ops *nn_device_emulated(void);

/* the CPU helpers, for other tables that share them (the host emulation) */
void nn_transpose(float *out, const float *in, int B, int R, int S);
void nn_add_chan(float *y, const float *v, int B, int C, size_t HW);
void nn_sum_chan(float *out, const float *x, int B, int C, size_t HW);
void nn_pad_br(float *out, const float *in, int BC, int H, int W);

/* --compute fp16's dynamic loss scaling (torch.cuda.amp.GradScaler's rule
 * and defaults). fp16 holds at most 65504 and nothing below about 6e-8, so
 * the loss's gradient is multiplied by `scale` before backward to keep small
 * gradients from flushing to zero; a step whose scaled gradients overflowed
 * (inf or NaN) is skipped and the scale halved; after `interval` good steps
 * in a row it doubles. The scale stays a power of two, so unscaling is exact. */
typedef struct {
    float scale;       /* 65536 */
    long good;         /* finite steps since the scale last changed */
    long interval;     /* 2000 */
} nn_loss_scaler;
void nn_loss_scaler_init(nn_loss_scaler *s);
/* After a backward of scale * loss: the gradient sets g1 (n1 floats in o1's
 * memory) and g2 (n2, in o2's: &nn_ops_cpu for the host; n2 may be 0)
 * checked through their tables (a device brings down one double). All
 * finite: each divided by the scale, the good-step count advanced (the scale
 * doubles at `interval`), returns 1. Otherwise returns 0: the caller skips
 * the step (weights and optimizer state untouched); the scale halves, the
 * count restarts. */
int nn_loss_scaler_unscale(nn_loss_scaler *s, const nn_ops *o1, float *g1, size_t n1,
                           const nn_ops *o2, float *g2, size_t n2);

/* --compute, --device and --tf32 (train.c, sample.c): the CPU GEMM's
 * mode and, in a CUDA build with --device cuda, the device's */
void nn_set_compute(const char *compute, const char *device, int tf32);

#endif

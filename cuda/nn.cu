// cuda/nn.cu: nn.h's layers on the GPU, one kernel per operation. Each
// kernel's arithmetic is a __host__ __device__ function in nn_ops.cuh (the
// formula is there, above it); the kernel only maps threads to indices.
// Elementwise kernels are grid-stride loops; reductions are one block of NT
// threads per normalised set (group, row, channel) with the fixed tree of
// common.cuh.
#include "common.cuh"
#include "nn_ops.cuh"
#include "layers.cuh"
#include "backend.cuh"
extern "C" {
#include "cuda.h"
}

static const int TPB = 256;   // threads per block of the elementwise kernels

/* ---- group norm -------------------------------------------------------- */

// one block per (b, g): the group's moments, then out = (x - mean) rstd w + b
__global__ static void groupnorm_forward_kernel(floatX *out, float *mean, float *rstd, const floatX *inp,
                                                const float *w, const float *b, int C, int HW, int G, float eps) {
    __shared__ float sh[NT];
    int bg = blockIdx.x, Cg = C / G, c0 = (bg % G) * Cg;
    size_t n = (size_t)Cg * HW;
    const floatX *x = inp + bg * n;
    float m, rs;
    block_moments(x, n, eps, sh, &m, &rs);
    if (threadIdx.x == 0) { mean[bg] = m; rstd[bg] = rs; }
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) {
        int c = c0 + (int)(i / HW);
        out[bg * n + i] = stx(norm_fwd_elem(ldx(x[i]), m, rs, w ? w[c] : 1.0f, b ? b[c] : 0.0f));
    }
}

// one block per (b, g): per channel sdy, sdy_xh (kept in sums for dw, db),
// the group's means of dxhat and dxhat xhat, then dx
__global__ static void groupnorm_backward_kernel(floatX *dinp, float *sums, const floatX *dout,
                                                 const floatX *inp, const float *w, const float *mean,
                                                 const float *rstd, int C, int HW, int G) {
    __shared__ float sh[NT];
    int bg = blockIdx.x, bi = bg / G, Cg = C / G, c0 = (bg % G) * Cg;
    size_t n = (size_t)Cg * HW;
    const floatX *x = inp + bg * n, *dy = dout + bg * n;
    float m = mean[bg], rs = rstd[bg], s1 = 0.0f, s2 = 0.0f;
    for (int cc = 0; cc < Cg; cc++) {
        float a, b2;
        gn_bwd_partial(x + (size_t)cc * HW, dy + (size_t)cc * HW, HW, m, rs, threadIdx.x, NT, &a, &b2);
        float sdy = block_tree_sum(a, sh), sdy_xh = block_tree_sum(b2, sh);
        float wc = w ? w[c0 + cc] : 1.0f;
        s1 += wc * sdy;
        s2 += wc * sdy_xh;
        if (threadIdx.x == 0) {
            sums[((size_t)bi * C + c0 + cc) * 2 + 0] = sdy;
            sums[((size_t)bi * C + c0 + cc) * 2 + 1] = sdy_xh;
        }
    }
    if (!dinp) return;
    float m1 = s1 / (float)n, m2 = s2 / (float)n;
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) {
        int c = c0 + (int)(i / HW);
        float d = norm_bwd_elem(ldx(dy[i]), ldx(x[i]), w ? w[c] : 1.0f, m, rs, m1, m2);
        dinp[bg * n + i] = stx(ldx(dinp[bg * n + i]) + d);
    }
}

// one thread per channel: dw[c] += sdy_xh[b, c], db[c] += sdy[b, c], b in order
__global__ static void groupnorm_wb_kernel(float *dw, float *db, const float *sums, int B, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < C) gn_wb_fold(dw, db, sums, B, C, c);
}

extern "C" void groupnorm_forward_cuda(float *out, float *mean, float *rstd, const float *inp,
                                       const float *w, const float *b, int B, int C, int HW, int G, float eps) {
    if (B * G <= 0) return;
    groupnorm_forward_kernel<<<B * G, NT>>>(out, mean, rstd, inp, w, b, C, HW, G, eps);
    KERNEL_CHECK("groupnorm_forward_kernel");
}

extern "C" void groupnorm_backward_cuda(float *dinp, float *dw, float *db, const float *dout,
                                        const float *inp, const float *w, const float *mean, const float *rstd,
                                        int B, int C, int HW, int G) {
    if (B * G <= 0 || (!dinp && !dw && !db)) return;
    float *sums = cuda_scratch((size_t)B * C * 2);
    if (!sums) return;
    groupnorm_backward_kernel<<<B * G, NT>>>(dinp, sums, dout, inp, w, mean, rstd, C, HW, G);
    if (!KERNEL_CHECK("groupnorm_backward_kernel")) return;
    if (dw || db) {
        groupnorm_wb_kernel<<<(C + TPB - 1) / TPB, TPB>>>(dw, db, sums, B, C);
        KERNEL_CHECK("groupnorm_wb_kernel");
    }
}

/* ---- layer norm -------------------------------------------------------- */

// one block per row
__global__ static void layernorm_forward_kernel(floatX *out, float *mean, float *rstd, const floatX *inp,
                                                const float *w, const float *b, int C, float eps) {
    __shared__ float sh[NT];
    size_t r = blockIdx.x;
    const floatX *x = inp + r * C;
    float m, rs;
    block_moments(x, (size_t)C, eps, sh, &m, &rs);
    if (threadIdx.x == 0) { mean[r] = m; rstd[r] = rs; }
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        out[r * C + c] = stx(norm_fwd_elem(ldx(x[c]), m, rs, w ? w[c] : 1.0f, b ? b[c] : 0.0f));
}

// one block per row: dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))
__global__ static void layernorm_backward_kernel(floatX *dinp, const floatX *dout, const floatX *inp,
                                                 const float *w, const float *mean, const float *rstd, int C) {
    __shared__ float sh[NT];
    size_t r = blockIdx.x;
    const floatX *x = inp + r * C, *dy = dout + r * C;
    float a, b2;
    ln_bwd_partial(x, dy, w, C, mean[r], rstd[r], threadIdx.x, NT, &a, &b2);
    float m1 = block_tree_sum(a, sh) / (float)C, m2 = block_tree_sum(b2, sh) / (float)C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float d = norm_bwd_elem(ldx(dy[c]), ldx(x[c]), w ? w[c] : 1.0f, mean[r], rstd[r], m1, m2);
        dinp[r * C + c] = stx(ldx(dinp[r * C + c]) + d);
    }
}

// one thread per column: dw[c] += sum_r dout xhat, db[c] += sum_r dout
__global__ static void layernorm_wb_kernel(float *dw, float *db, const floatX *dout, const floatX *inp,
                                           const float *mean, const float *rstd, int N, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < C) ln_wb_col(dw, db, dout, inp, mean, rstd, N, C, c);
}

extern "C" void layernorm_forward_cuda(float *out, float *mean, float *rstd, const float *inp,
                                       const float *w, const float *b, int N, int C, float eps) {
    if (N <= 0) return;
    layernorm_forward_kernel<<<N, NT>>>(out, mean, rstd, inp, w, b, C, eps);
    KERNEL_CHECK("layernorm_forward_kernel");
}

extern "C" void layernorm_backward_cuda(float *dinp, float *dw, float *db, const float *dout,
                                        const float *inp, const float *w, const float *mean, const float *rstd,
                                        int N, int C) {
    if (N <= 0) return;
    if (dinp) {
        layernorm_backward_kernel<<<N, NT>>>(dinp, dout, inp, w, mean, rstd, C);
        if (!KERNEL_CHECK("layernorm_backward_kernel")) return;
    }
    if (dw || db) {
        layernorm_wb_kernel<<<(C + TPB - 1) / TPB, TPB>>>(dw, db, dout, inp, mean, rstd, N, C);
        KERNEL_CHECK("layernorm_wb_kernel");
    }
}

/* ---- pointwise --------------------------------------------------------- */

// out[i] = f(inp[i]), f one of the activations of nn_ops.cuh
#define ACT_KERNELS(name)                                                                  \
    __global__ static void name##_forward_kernel(floatX *out, const floatX *inp, size_t n) {     \
        GRID_STRIDE(i, n) out[i] = stx(name##_fwd(ldx(inp[i])));                                 \
    }                                                                                            \
    __global__ static void name##_backward_kernel(floatX *dinp, const floatX *dout,              \
                                                  const floatX *inp, size_t n) {                 \
        GRID_STRIDE(i, n) dinp[i] = stx(ldx(dinp[i]) + name##_bwd(ldx(dout[i]), ldx(inp[i])));   \
    }                                                                                            \
    extern "C" void name##_forward_cuda(float *out, const float *inp, size_t n) {                \
        if (n == 0) return;                                                                      \
        name##_forward_kernel<<<grid_for(n, TPB), TPB>>>(out, inp, n);                           \
        KERNEL_CHECK(#name "_forward_kernel");                                                   \
    }                                                                                            \
    extern "C" void name##_backward_cuda(float *dinp, const float *dout, const float *inp, size_t n) { \
        if (n == 0 || !dinp) return;                                                             \
        name##_backward_kernel<<<grid_for(n, TPB), TPB>>>(dinp, dout, inp, n);                   \
        KERNEL_CHECK(#name "_backward_kernel");                                                  \
    }
ACT_KERNELS(silu)
ACT_KERNELS(gelu)
ACT_KERNELS(quickgelu)

// out (N, D) = value * gelu(gate), element (r, j) = i
__global__ static void geglu_forward_kernel(floatX *out, const floatX *inp, int D, size_t n) {
    GRID_STRIDE(i, n) out[i] = stx(geglu_fwd_elem(inp, D, i / D, (int)(i % D)));
}
// each thread owns the pair (value j, gate j) of row r
__global__ static void geglu_backward_kernel(floatX *dinp, const floatX *dout, const floatX *inp, int D, size_t n) {
    GRID_STRIDE(i, n) geglu_bwd_elem(dinp, dout, inp, D, i / D, (int)(i % D));
}
extern "C" void geglu_forward_cuda(float *out, const float *inp, int N, int D) {
    size_t n = (size_t)N * D;
    if (n == 0) return;
    geglu_forward_kernel<<<grid_for(n, TPB), TPB>>>(out, inp, D, n);
    KERNEL_CHECK("geglu_forward_kernel");
}
extern "C" void geglu_backward_cuda(float *dinp, const float *dout, const float *inp, int N, int D) {
    size_t n = (size_t)N * D;
    if (n == 0 || !dinp) return;
    geglu_backward_kernel<<<grid_for(n, TPB), TPB>>>(dinp, dout, inp, D, n);
    KERNEL_CHECK("geglu_backward_kernel");
}

/* ---- upsample, timestep embedding, adds -------------------------------- */

__global__ static void upsample2x_forward_kernel(floatX *out, const floatX *inp, int H, int W, size_t n) {
    GRID_STRIDE(i, n) out[i] = stx(upsample2x_fwd_elem(inp, H, W, i));
}
__global__ static void upsample2x_backward_kernel(floatX *dinp, const floatX *dout, int H, int W, size_t n) {
    GRID_STRIDE(i, n) dinp[i] = stx(ldx(dinp[i]) + upsample2x_bwd_elem(dout, H, W, i));
}
extern "C" void upsample2x_forward_cuda(float *out, const float *inp, int B, int C, int H, int W) {
    size_t n = (size_t)B * C * 4 * H * W;
    if (n == 0) return;
    upsample2x_forward_kernel<<<grid_for(n, TPB), TPB>>>(out, inp, H, W, n);
    KERNEL_CHECK("upsample2x_forward_kernel");
}
extern "C" void upsample2x_backward_cuda(float *dinp, const float *dout, int B, int C, int H, int W) {
    size_t n = (size_t)B * C * H * W;
    if (n == 0 || !dinp) return;
    upsample2x_backward_kernel<<<grid_for(n, TPB), TPB>>>(dinp, dout, H, W, n);
    KERNEL_CHECK("upsample2x_backward_kernel");
}

__global__ static void timestep_kernel(float *out, const float *t, int dim, int flip, float neg_log,
                                       float denom, size_t n) {
    GRID_STRIDE(i, n) out[i] = timestep_elem(t, dim, flip, neg_log, denom, i / dim, (int)(i % dim));
}
extern "C" void timestep_embedding_cuda(float *out, const float *t, int N, int dim,
                                        int flip_sin_to_cos, float freq_shift, float max_period) {
    size_t n = (size_t)N * dim;
    if (n == 0) return;
    float neg_log = (float)(-log((double)max_period));
    float denom = (float)((double)(dim / 2) - (double)freq_shift);
    timestep_kernel<<<grid_for(n, TPB), TPB>>>(out, t, dim, flip_sin_to_cos, neg_log, denom, n);
    KERNEL_CHECK("timestep_kernel");
}

// out = a + b
__global__ static void add_kernel(floatX *out, const floatX *a, const floatX *b, size_t n) {
    GRID_STRIDE(i, n) out[i] = stx(ldx(a[i]) + ldx(b[i]));
}
extern "C" void add_cuda(float *out, const float *a, const float *b, size_t n) {
    if (n == 0) return;
    add_kernel<<<grid_for(n, TPB), TPB>>>(out, a, b, n);
    KERNEL_CHECK("add_kernel");
}
extern "C" void accumulate_cuda(float *dst, const float *src, size_t n) {
    if (n == 0 || !dst) return;
    add_kernel<<<grid_for(n, TPB), TPB>>>(dst, dst, src, n);
    KERNEL_CHECK("add_kernel");
}

/* ---- biases ------------------------------------------------------------ */

__global__ static void bias_rows_kernel(floatX *out, const float *b, int C, size_t n) {
    GRID_STRIDE(i, n) out[i] = stx(bias_rows_elem(ldx(out[i]), b, C, i));
}
__global__ static void bias_chan_kernel(floatX *out, const float *b, int O, size_t P, size_t n) {
    GRID_STRIDE(i, n) out[i] = stx(bias_chan_elem(ldx(out[i]), b, O, P, i));
}
__global__ static void bias_grad_rows_kernel(float *db, const floatX *dout, int N, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < C) bias_grad_rows_col(db, dout, N, C, c);
}
// one block per channel o
__global__ static void bias_grad_chan_kernel(float *db, const floatX *dout, int B, int O, size_t P) {
    __shared__ double sh[NT];
    int o = blockIdx.x;
    double s = block_tree_sum(bias_grad_chan_partial(dout, B, O, P, o, threadIdx.x, NT), sh);
    if (threadIdx.x == 0) db[o] += (float)s;
}

void DevBK::add_bias_rows(float *out, const float *b, int N, int C) {
    size_t n = (size_t)N * C;
    if (n == 0) return;
    bias_rows_kernel<<<grid_for(n, TPB), TPB>>>(out, b, C, n);
    KERNEL_CHECK("bias_rows_kernel");
}
void DevBK::add_bias_chan(float *out, const float *b, int B, int O, size_t P) {
    size_t n = (size_t)B * O * P;
    if (n == 0) return;
    bias_chan_kernel<<<grid_for(n, TPB), TPB>>>(out, b, O, P, n);
    KERNEL_CHECK("bias_chan_kernel");
}
void DevBK::bias_grad_rows(float *db, const float *dout, int N, int C) {
    if (C <= 0) return;
    bias_grad_rows_kernel<<<(C + TPB - 1) / TPB, TPB>>>(db, dout, N, C);
    KERNEL_CHECK("bias_grad_rows_kernel");
}
void DevBK::bias_grad_chan(float *db, const float *dout, int B, int O, size_t P) {
    if (O <= 0) return;
    bias_grad_chan_kernel<<<O, NT>>>(db, dout, B, O, P);
    KERNEL_CHECK("bias_grad_chan_kernel");
}

/* ---- direct convolution (one thread per output / input / weight value),
 * for the strided convs (downsamplers); stride 1 takes the shifted GEMM */

__global__ static void conv_fwd_kernel(floatX *out, const floatX *x, const float *w, const float *b,
                                       conv_dims d, size_t n) {
    GRID_STRIDE(i, n) out[i] = stx(conv_fwd_elem(x, w, b, d, i));
}
__global__ static void conv_dinp_kernel(floatX *dx, const floatX *dy, const float *w, conv_dims d, size_t n) {
    GRID_STRIDE(i, n) dx[i] = stx(ldx(dx[i]) + conv_dinp_elem(dy, w, d, i));
}
__global__ static void conv_dw_kernel(float *dw, const floatX *dy, const floatX *x, conv_dims d, size_t n) {
    GRID_STRIDE(i, n) dw[i] += conv_dw_elem(dy, x, d, i);
}
void DevBK::conv_fwd(float *out, const float *x, const float *w, const float *b, conv_dims d) {
    size_t n = (size_t)d.B * d.O * d.Ho * d.Wo;
    if (n == 0) return;
    conv_fwd_kernel<<<grid_for(n, TPB), TPB>>>(out, x, w, b, d, n);
    KERNEL_CHECK("conv_fwd_kernel");
}
void DevBK::conv_dinp(float *dx, const float *dy, const float *w, conv_dims d) {
    size_t n = (size_t)d.B * d.C * d.H * d.W;
    if (n == 0) return;
    conv_dinp_kernel<<<grid_for(n, TPB), TPB>>>(dx, dy, w, d, n);
    KERNEL_CHECK("conv_dinp_kernel");
}
void DevBK::conv_dw(float *dw, const float *dy, const float *x, conv_dims d) {
    size_t n = (size_t)d.O * d.C * d.kh * d.kw;
    if (n == 0) return;
    conv_dw_kernel<<<grid_for(n, TPB), TPB>>>(dw, dy, x, d, n);
    KERNEL_CHECK("conv_dw_kernel");
}

/* ---- the shifted-GEMM convolution's gathers (layers.cuh does the GEMMs) */

__global__ static void shift_pad_kernel(float *xpad, const floatX *x, conv_dims d, shift_dims s, size_t n) {
    GRID_STRIDE(i, n) xpad[i] = shift_pad_elem(x, d, s, i);
}
__global__ static void shift_wpack_kernel(float *wp, const float *w, conv_dims d, size_t n) {
    GRID_STRIDE(i, n) wp[i] = shift_wpack_elem(w, d, i);
}
__global__ static void shift_crop_kernel(floatX *out, const float *opad, const float *b, conv_dims d, shift_dims s, size_t n) {
    GRID_STRIDE(i, n) out[i] = stx(shift_crop_elem(opad, b, d, s, i));
}
__global__ static void shift_dpad_kernel(float *dpad, const floatX *dout, conv_dims d, shift_dims s, size_t n) {
    GRID_STRIDE(i, n) dpad[i] = shift_dpad_elem(dout, d, s, i);
}
__global__ static void shift_dx_kernel(floatX *dx, const float *dxpad, conv_dims d, shift_dims s, size_t n) {
    GRID_STRIDE(i, n) dx[i] = stx(ldx(dx[i]) + shift_dx_elem(dxpad, d, s, i));
}
__global__ static void shift_dw_kernel(float *dw, const float *dwp, conv_dims d, size_t n) {
    GRID_STRIDE(i, n) dw[i] += shift_dw_elem(dwp, d, i);
}
void DevBK::shift_pad(float *xpad, const float *x, conv_dims d, shift_dims s) {
    size_t n = (size_t)d.C * s.ldx;
    shift_pad_kernel<<<grid_for(n, TPB), TPB>>>(xpad, x, d, s, n);
    KERNEL_CHECK("shift_pad_kernel");
}
void DevBK::shift_wpack(float *wp, const float *w, conv_dims d) {
    size_t n = (size_t)d.kh * d.kw * d.O * d.C;
    shift_wpack_kernel<<<grid_for(n, TPB), TPB>>>(wp, w, d, n);
    KERNEL_CHECK("shift_wpack_kernel");
}
void DevBK::shift_crop(float *out, const float *opad, const float *b, conv_dims d, shift_dims s) {
    size_t n = (size_t)d.B * d.O * d.Ho * d.Wo;
    shift_crop_kernel<<<grid_for(n, TPB), TPB>>>(out, opad, b, d, s, n);
    KERNEL_CHECK("shift_crop_kernel");
}
void DevBK::shift_dpad(float *dpad, const float *dout, conv_dims d, shift_dims s) {
    size_t n = (size_t)d.O * s.Nq;
    shift_dpad_kernel<<<grid_for(n, TPB), TPB>>>(dpad, dout, d, s, n);
    KERNEL_CHECK("shift_dpad_kernel");
}
void DevBK::shift_dx_add(float *dx, const float *dxpad, conv_dims d, shift_dims s) {
    size_t n = (size_t)d.B * d.C * d.H * d.W;
    shift_dx_kernel<<<grid_for(n, TPB), TPB>>>(dx, dxpad, d, s, n);
    KERNEL_CHECK("shift_dx_kernel");
}
void DevBK::shift_dw_add(float *dw, const float *dwp, conv_dims d) {
    size_t n = (size_t)d.O * d.C * d.kh * d.kw;
    shift_dw_kernel<<<grid_for(n, TPB), TPB>>>(dw, dwp, d, n);
    KERNEL_CHECK("shift_dw_kernel");
}
void DevBK::zero(float *p, size_t n) {
    if (n) CUDA_CHECK(cudaMemsetAsync(p, 0, n * sizeof(float)));
}

/* ---- dropout ----------------------------------------------------------- */

// mask_i = (u_i >= p), out_i = inp_i mask_i / (1 - p); p <= 0 copies, mask 1
__global__ static void dropout_forward_kernel(floatX *out, uint8_t *mask, const floatX *inp, size_t n,
                                              float p, uint64_t s0) {
    float sc = dropout_scale(p);
    GRID_STRIDE(i, n) {
        uint8_t keep = p <= 0.0f ? 1 : dropout_keep(s0, i, p);
        mask[i] = keep;
        out[i] = p <= 0.0f ? inp[i] : stx(keep ? ldx(inp[i]) * sc : 0.0f);
    }
}
// x_d_i = mask_i ? inp_i / (1 - p) : 0   (lora.c's rebuild from the saved mask)
__global__ static void dropout_rebuild_kernel(floatX *xd, const floatX *inp, const uint8_t *mask, size_t n, float p) {
    float keep = 1.0f / (1.0f - p);
    GRID_STRIDE(i, n) xd[i] = stx(mask[i] ? ldx(inp[i]) * keep : 0.0f);
}
__global__ static void dropout_backward_kernel(floatX *dinp, const floatX *dout, const uint8_t *mask, size_t n, float p) {
    GRID_STRIDE(i, n) dinp[i] = stx(ldx(dinp[i]) + dropout_bwd_elem(ldx(dout[i]), p <= 0.0f ? 1 : mask[i], p));
}
void DevBK::dropout_fwd(float *out, uint8_t *mask, const float *inp, size_t n, float p, uint64_t s0) {
    if (n == 0) return;
    dropout_forward_kernel<<<grid_for(n, TPB), TPB>>>(out, mask, inp, n, p, s0);
    KERNEL_CHECK("dropout_forward_kernel");
}
void DevBK::dropout_rebuild(float *xd, const float *inp, const uint8_t *mask, size_t n, float p) {
    if (n == 0) return;
    dropout_rebuild_kernel<<<grid_for(n, TPB), TPB>>>(xd, inp, mask, n, p);
    KERNEL_CHECK("dropout_rebuild_kernel");
}
void DevBK::dropout_bwd(float *dinp, const float *dout, const uint8_t *mask, size_t n, float p) {
    if (n == 0 || !dinp) return;
    dropout_backward_kernel<<<grid_for(n, TPB), TPB>>>(dinp, dout, mask, n, p);
    KERNEL_CHECK("dropout_backward_kernel");
}
extern "C" void dropout_forward_cuda(float *out, uint8_t *mask, const float *inp, size_t n, float p, rng_t *rng) {
    DevBK::dropout_fwd(out, mask, inp, n, p, rng->state);
    if (p > 0.0f) rng->state += (uint64_t)n * 0x9E3779B97F4A7C15ULL;
}
extern "C" void dropout_backward_cuda(float *dinp, const float *dout, const uint8_t *mask, size_t n, float p) {
    DevBK::dropout_bwd(dinp, dout, mask, n, p);
}

/* ---- linear and conv2d: cuda/layers.cuh on this backend ----------------- */

extern "C" void linear_forward_cuda(float *out, const float *inp, const float *w, const float *b,
                                    int N, int in, int outc) {
    linear_forward_t<DevBK>(out, inp, w, b, N, in, outc);
}
extern "C" void linear_backward_cuda(float *dinp, float *dw, float *db, const float *dout,
                                     const float *inp, const float *w, int N, int in, int outc) {
    linear_backward_t<DevBK>(dinp, dw, db, dout, inp, w, N, in, outc);
}
extern "C" void conv2d_forward_cuda(float *out, const float *inp, const float *w, const float *b,
                                    int B, int C, int H, int W, int O, int kh, int kw, int stride, int pad) {
    conv2d_forward_t<DevBK>(out, inp, w, b, B, C, H, W, O, kh, kw, stride, pad);
}
extern "C" void conv2d_backward_cuda(float *dinp, float *dw, float *db, const float *dout,
                                     const float *inp, const float *w,
                                     int B, int C, int H, int W, int O, int kh, int kw, int stride, int pad) {
    conv2d_backward_t<DevBK>(dinp, dw, db, dout, inp, w, B, C, H, W, O, kh, kw, stride, pad);
}

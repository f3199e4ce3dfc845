// cuda/ops.cu: nn_ops_cuda(), the GPU's operations table (backend.h): the
// *_cuda twins of cuda.h, device memory through cuda_alloc / cuda_upload,
// and the kernels of backend.h's small tensor helpers (transpose, per-
// channel add and sum, copy), whose arithmetic is nn_ops.cuh's
// transpose_elem / add_chan_elem / sum_chan_elem. unet.c's device mode
// (unet_to_device) runs every layer through this table.
#include "common.cuh"
#include "nn_ops.cuh"
extern "C" {
#include "cuda.h"
#include "../backend.h"
}

static const int TPB = 256;   // threads per block of the elementwise kernels

// out (B, S, R) from in (B, R, S), one thread per output element
__global__ static void transpose_kernel(floatX *out, const floatX *in, int R, int S, size_t n) {
    GRID_STRIDE(i, n) out[i] = stx(transpose_elem(in, R, S, i));
}
static void transpose_cuda(float *out, const float *in, int B, int R, int S) {
    size_t n = (size_t)B * R * S;
    if (n == 0) return;
    transpose_kernel<<<grid_for(n, TPB), TPB>>>(out, in, R, S, n);
    KERNEL_CHECK("transpose_kernel");
}

// y[b, c, :] += v[b C + c], one thread per element of y
__global__ static void add_chan_kernel(floatX *y, const float *v, size_t HW, size_t n) {
    GRID_STRIDE(i, n) y[i] = stx(add_chan_elem(ldx(y[i]), v, HW, i));
}
static void add_chan_cuda(float *y, const float *v, int B, int C, size_t HW) {
    size_t n = (size_t)B * C * HW;
    if (n == 0) return;
    add_chan_kernel<<<grid_for(n, TPB), TPB>>>(y, v, HW, n);
    KERNEL_CHECK("add_chan_kernel");
}

// out[bc] = sum of channel bc, one thread per channel walking it in order
// (the CPU's order, in double; only full fine-tuning needs it, which the
// device does not run yet, so this is simple rather than fast)
__global__ static void sum_chan_kernel(float *out, const floatX *x, size_t HW, size_t nbc) {
    GRID_STRIDE(bc, nbc) out[bc] = sum_chan_elem(x, HW, bc);
}
static void sum_chan_cuda(float *out, const float *x, int B, int C, size_t HW) {
    size_t n = (size_t)B * C;
    if (n == 0) return;
    sum_chan_kernel<<<grid_for(n, TPB), TPB>>>(out, x, HW, n);
    KERNEL_CHECK("sum_chan_kernel");
}

// dst = src widened from fp16, one thread per element (fp16-held weights)
__global__ static void widen_f16_kernel(float *dst, const uint16_t *src, size_t n) {
    GRID_STRIDE(i, n) dst[i] = half_bits_to_float(src[i]);
}
static void widen_f16_cuda(float *dst, const uint16_t *src, size_t n) {
    if (n == 0) return;
    widen_f16_kernel<<<grid_for(n, TPB), TPB>>>(dst, src, n);
    KERNEL_CHECK("widen_f16_kernel");
}

// out (BC, H+1, W+1) = in zero-padded at the bottom and right, one thread per
// output element (the VAE encoder's downsamplers)
__global__ static void pad_br_kernel(floatX *out, const floatX *in, int H, int W, size_t n) {
    GRID_STRIDE(i, n) out[i] = stx(pad_br_elem(in, H, W, i));
}
static void pad_br_cuda(float *out, const float *in, int BC, int H, int W) {
    size_t n = (size_t)BC * (H + 1) * (W + 1);
    if (n == 0) return;
    pad_br_kernel<<<grid_for(n, TPB), TPB>>>(out, in, H, W, n);
    KERNEL_CHECK("pad_br_kernel");
}

// memmove on the device: cudaMemcpy's ranges must not overlap, so an
// overlapping move goes through a temporary (the VAE's inference layout moves
// a layer's output down onto its input, once per layer)
static void move_cuda(float *dst, const float *src, size_t n) {
    if (n == 0 || dst == src) return;
    size_t bytes = n * sizeof(float);
    const char *d = (const char *)dst, *s = (const char *)src;
    if (d + bytes <= s || s + bytes <= d) {
        CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice));
        return;
    }
    float *tmp = (float *)cuda_alloc(bytes);
    if (!tmp) return;
    CUDA_CHECK(cudaMemcpy(tmp, src, bytes, cudaMemcpyDeviceToDevice));
    CUDA_CHECK(cudaMemcpy(dst, tmp, bytes, cudaMemcpyDeviceToDevice));
    cuda_free(tmp);
}

// out (B T, C) = token rows + position rows, one thread per output element
// (CLIP's input; the ids went up, the tables stay on the device)
__global__ static void embedding_kernel(float *out, const int *ids, const float *tok, const uint16_t *tok16,
                                        const float *pos, const uint16_t *pos16, int T, int C, size_t n) {
    GRID_STRIDE(i, n) out[i] = embedding_elem(ids, tok, tok16, pos, pos16, T, C, i);
}
static void embedding_forward_cuda(float *out, const int *ids, const float *tok, const uint16_t *tok16,
                                   const float *pos, const uint16_t *pos16, int B, int T, int C) {
    size_t n = (size_t)B * T * C;
    if (n == 0) return;
    embedding_kernel<<<grid_for(n, TPB), TPB>>>(out, ids, tok, tok16, pos, pos16, T, C, n);
    KERNEL_CHECK("embedding_kernel");
}

static void copy_cuda(float *dst, const float *src, size_t n) {
    if (n) CUDA_CHECK(cudaMemcpy(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice));
}
static void zero_cuda(float *p, size_t n) { cuda_zero(p, n * sizeof(float)); }

// upload and download: cudaMemcpyDefault lets the runtime tell host from
// device pointers (unified addressing), so a pointer to device memory on the
// "host" side makes it a copy on the device (train.c's x_t, t and context,
// made there, handed to unet_forward, which uploads its inputs)
static int copy_any(void *dst, const void *src, size_t bytes) {
    return bytes == 0 || CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault));
}

extern "C" const nn_ops *nn_ops_cuda(void) {
    static nn_ops t;
    if (t.name) return &t;
    t.device = 1;
    t.alloc = cuda_alloc;
    t.free = cuda_free;
    t.upload = cuda_upload;
    t.download = cuda_download;
    t.error = cuda_last_error;
    t.set_layer = cuda_set_layer;
    t.copy = copy_cuda;
    t.zero = zero_cuda;
    t.add = add_cuda;
    t.accumulate = accumulate_cuda;
    t.transpose = transpose_cuda;
    t.add_chan = add_chan_cuda;
    t.sum_chan = sum_chan_cuda;
    t.widen_f16 = widen_f16_cuda;
    t.move = move_cuda;
    t.pad_br = pad_br_cuda;
    t.gemm = gemm_cuda;
    t.linear_forward = linear_forward_cuda;
    t.linear_backward = linear_backward_cuda;
    t.conv2d_forward = conv2d_forward_cuda;
    t.conv2d_backward = conv2d_backward_cuda;
    t.groupnorm_forward = groupnorm_forward_cuda;
    t.groupnorm_backward = groupnorm_backward_cuda;
    t.layernorm_forward = layernorm_forward_cuda;
    t.layernorm_backward = layernorm_backward_cuda;
    t.silu_forward = silu_forward_cuda;
    t.silu_backward = silu_backward_cuda;
    t.gelu_forward = gelu_forward_cuda;
    t.quickgelu_forward = quickgelu_forward_cuda;
    t.geglu_forward = geglu_forward_cuda;
    t.geglu_backward = geglu_backward_cuda;
    t.upsample2x_forward = upsample2x_forward_cuda;
    t.upsample2x_backward = upsample2x_backward_cuda;
    t.timestep_embedding = timestep_embedding_cuda;
    t.attention_forward = attention_forward_cuda;
    t.attention_backward = attention_backward_cuda;
    t.lora_forward = lora_forward_cuda;
    t.lora_backward = lora_backward_cuda;
    t.adamw_step = adamw_step_cuda;
    t.grad_sumsq = grad_sumsq_cuda;
    t.scale = scale_cuda;
    t.mse_loss_forward = mse_loss_forward_cuda;
    t.mse_loss_backward = mse_loss_backward_cuda;
    t.gelu_backward = gelu_backward_cuda;
    t.quickgelu_backward = quickgelu_backward_cuda;
    t.embedding_forward = embedding_forward_cuda;
    t.lora_conv_forward = lora_conv_forward_cuda;
    t.lora_conv_backward = lora_conv_backward_cuda;
    t.upload = copy_any;     // either side may be device memory (backend.h)
    t.download = copy_any;
    t.ddpm_timesteps = ddpm_timesteps_cuda;
    t.ddpm_normal = ddpm_normal_cuda;
    t.ddpm_noise_offset = ddpm_noise_offset_cuda;
    t.ddpm_add_noise = ddpm_add_noise_cuda;
    t.ddpm_target = ddpm_target_cuda;
    t.ddpm_loss_weights = ddpm_loss_weights_cuda;
    t.name = "cuda";
    return &t;
}

// bytes of device memory in use now (every process's, and the CUDA
// context's), from cudaMemGetInfo; 0 when it fails
extern "C" size_t cuda_mem_used(void) {
    size_t free_b = 0, total_b = 0;
    if (!CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b))) return 0;
    return total_b - free_b;
}

// cuda/attention.cu: multi-head attention on the GPU as attention.c does it:
// cuBLAS strided-batched products over the heads (layers.cuh) and two row
// kernels, the softmax and its backward (attention_ops.cuh), one block of NT
// threads per row of P. Not fused: P (H Tq Tk floats per item) is stored or
// recomputed, as on the CPU; a fused online-softmax kernel is later work.
#include "common.cuh"
#include "attention_ops.cuh"
#include "layers.cuh"
#include "backend.cuh"
extern "C" {
#include "cuda.h"
}

// row r of P (rows x Tk) is query i = r % Tq of head r / Tq:
//   P[i][j] = exp(S[i][j] - max) / sum, masked (j > i when causal) to 0
__global__ static void softmax_kernel(float *P, int Tq, int Tk, int causal) {
    __shared__ float sh[NT];
    float *row = P + (size_t)blockIdx.x * Tk;
    int t = threadIdx.x, n = softmax_row_len(blockIdx.x % Tq, Tk, causal);
    float m = block_tree_max(softmax_partial_max(row, n, t, NT), sh);
    float inv = 1.0f / block_tree_sum(softmax_exp_partial(row, n, m, t, NT), sh);
    softmax_normalize(row, n, Tk, inv, t, NT);
}

// dS[i][j] = P[i][j] (dP[i][j] - sum_j' dP[i][j'] P[i][j']), in place over dP
__global__ static void softmax_backward_kernel(float *dS, const float *P, int Tk) {
    __shared__ float sh[NT];
    float *dp = dS + (size_t)blockIdx.x * Tk;
    const float *p = P + (size_t)blockIdx.x * Tk;
    float dot = block_tree_sum(softmax_bwd_partial(dp, p, Tk, threadIdx.x, NT), sh);
    softmax_bwd_apply(dp, p, Tk, dot, threadIdx.x, NT);
}

void DevBK::softmax_rows(float *P, int rows, int Tq, int Tk, int causal) {
    if (rows <= 0) return;
    softmax_kernel<<<rows, NT>>>(P, Tq, Tk, causal);
    KERNEL_CHECK("softmax_kernel");
}
void DevBK::softmax_bwd_rows(float *dS, const float *P, int rows, int Tk) {
    if (rows <= 0) return;
    softmax_backward_kernel<<<rows, NT>>>(dS, P, Tk);
    KERNEL_CHECK("softmax_backward_kernel");
}

extern "C" void attention_forward_cuda(float *out, float *att, const float *q, const float *k, const float *v,
                                       int B, int Tq, int Tk, int H, int Dh, int causal) {
    attention_forward_t<DevBK>(out, att, q, k, v, B, Tq, Tk, H, Dh, causal);
}
extern "C" void attention_backward_cuda(float *dq, float *dk, float *dv, const float *dout,
                                        const float *q, const float *k, const float *v, const float *att,
                                        int B, int Tq, int Tk, int H, int Dh, int causal) {
    attention_backward_t<DevBK>(dq, dk, dv, dout, q, k, v, att, B, Tq, Tk, H, Dh, causal);
}

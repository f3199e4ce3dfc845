// cuda/gemm.cu: the GPU GEMM (cuBLAS) and the first hand-written kernel.
//
// cuBLAS is column-major, our arrays are row-major. A row-major M x N matrix
// with row stride ld is, byte for byte, the column-major N x M matrix (its
// transpose) with leading dimension ld. So
//     C = op(A) op(B)            (row-major)
// is  C^T = op(B)^T op(A)^T      (column-major)
// which is one cublasSgemm with the operands swapped and M, N swapped; the
// trans flags carry over unchanged, because B as stored, read column-major,
// already is B^T.
#include <cuda_runtime.h>
#include <cublas_v2.h>
#include "cuda.h"   // ours (cuda/cuda.h), found first: same directory

static const char *g_err;           // first error since cuda_last_error()
static cublasHandle_t g_handle;
static int g_handle_ok;

static void set_err(const char *msg) {
    if (!g_err) g_err = msg;
}

extern "C" const char *cuda_last_error(void) {
    const char *e = g_err;
    g_err = nullptr;
    return e;
}

extern "C" int cuda_available(void) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        cudaGetLastError();         // clear the sticky runtime error
        return 0;
    }
    return n > 0;
}

// one handle for the process, made on first use
static int handle(void) {
    if (!g_handle_ok) {
        if (cublasCreate(&g_handle) != CUBLAS_STATUS_SUCCESS) {
            set_err("cuBLAS: cublasCreate failed (no usable GPU?)");
            return 0;
        }
        g_handle_ok = 1;
    }
    return 1;
}

extern "C" void gemm_cuda(int transA, int transB, int M, int N, int K,
                          float alpha, const float *A, int lda, const float *B, int ldb,
                          float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
    if (!handle()) return;
    // cuBLAS insists on ld >= max(1, rows) even where nothing is read (K == 0,
    // where the BLAS meaning is C = beta C); the CPU gemm does not care
    int ka = transA ? M : K, kb = transB ? K : N;
    if (lda < (ka > 1 ? ka : 1)) lda = ka > 1 ? ka : 1;
    if (ldb < (kb > 1 ? kb : 1)) ldb = kb > 1 ? kb : 1;
    cublasStatus_t s = cublasSgemm(g_handle,
                                   transB ? CUBLAS_OP_T : CUBLAS_OP_N,
                                   transA ? CUBLAS_OP_T : CUBLAS_OP_N,
                                   N, M, K, &alpha, B, ldb, A, lda, &beta, C, ldc);
    if (s != CUBLAS_STATUS_SUCCESS) set_err("cuBLAS: cublasSgemm failed");
}

// silu(x) = x * sigmoid(x) = x / (1 + exp(-x)); a grid-stride loop so any n
// runs with a bounded grid
__global__ static void silu_forward_kernel(float *out, const float *inp, size_t n) {
    size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float x = inp[i];
        out[i] = x / (1.0f + expf(-x));
    }
}

extern "C" void silu_forward_cuda(float *out, const float *inp, size_t n) {
    if (n == 0) return;
    const int threads = 256;
    size_t blocks = (n + threads - 1) / threads;
    if (blocks > 65536) blocks = 65536;   // the grid-stride loop covers the rest
    silu_forward_kernel<<<(unsigned)blocks, threads>>>(out, inp, n);
    if (cudaGetLastError() != cudaSuccess) set_err("CUDA: silu_forward kernel launch failed");
}

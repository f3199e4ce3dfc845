// cuda/common.cuh: what every cuda/*.cu shares (C++, internal; the C side
// only sees cuda/cuda.h).
//
// The rule of this backend: the arithmetic of every kernel is a
// __host__ __device__ function of its indices (in cuda/*_ops.cuh), which the
// kernel calls once per thread and the host test (cuda/test_cuda_host.cu)
// calls in plain loops, so the numbers are checked against the CPU code on a
// machine without a GPU. Reductions are split the same way: a per-thread
// partial (a strided walk, thread tid of NT over elements tid, tid+NT, ...),
// then a fixed pairwise tree over the NT partials. The kernel runs the tree in
// shared memory, block_tree_sum(); the host twin host_tree_sum() adds the
// same pairs in the same order, so host and device sum the same way.
#ifndef SDLORA_CUDA_COMMON_CUH
#define SDLORA_CUDA_COMMON_CUH

#include <stddef.h>
#include <stdint.h>
#include <math.h>

#if defined(__CUDACC__)
#define HD __host__ __device__ inline
#else
#define HD inline
#endif

// The storage type of activations and gradients. fp32 today; the kernels
// load through ldx() and store through stx() and compute in float, so a
// bf16/fp16 floatX later changes this line and these two functions.
typedef float floatX;
HD float ldx(floatX v) { return (float)v; }
HD floatX stx(float v) { return (floatX)v; }

// threads per block of every reduction kernel (a power of two); the host
// twins use the same number so their trees match
#define NT 256

// The pairwise tree: p[t] += p[t + s] for s = nt/2, nt/4, ..., 1. Host twin
// of block_tree_sum(); p (nt floats) is overwritten.
template <class T> inline T host_tree_sum(T *p, int nt) {
    for (int s = nt / 2; s > 0; s >>= 1)
        for (int t = 0; t < s; t++) p[t] += p[t + s];
    return p[0];
}
inline float host_tree_max(float *p, int nt) {
    for (int s = nt / 2; s > 0; s >>= 1)
        for (int t = 0; t < s; t++) p[t] = fmaxf(p[t], p[t + s]);
    return p[0];
}

#if defined(__CUDACC__)
// The same tree in shared memory (sh: blockDim.x floats, blockDim.x == NT).
// Every thread returns the total. Ends with a barrier, so sh can be reused.
template <class T> __device__ inline T block_tree_sum(T v, T *sh) {
    int t = threadIdx.x;
    sh[t] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) sh[t] += sh[t + s];
        __syncthreads();
    }
    T r = sh[0];
    __syncthreads();
    return r;
}
__device__ inline float block_tree_max(float v, float *sh) {
    int t = threadIdx.x;
    sh[t] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) sh[t] = fmaxf(sh[t], sh[t + s]);
        __syncthreads();
    }
    float r = sh[0];
    __syncthreads();
    return r;
}

#include <cuda_runtime.h>
#include <cublas_v2.h>

// ---- errors (cuda/gemm.cu). Every CUDA and cuBLAS call goes through one of
// these; the first failure is kept as one line naming the call, the function
// it was made in and the layer set by cuda_set_layer(), for cuda_last_error().
void cuda_record_(const char *call, const char *fn, const char *why);
int cuda_check_(cudaError_t e, const char *call, const char *fn);
int cublas_check_(cublasStatus_t s, const char *call, const char *fn);
#define CUDA_CHECK(call) cuda_check_((call), #call, __func__)
#define CUBLAS_CHECK(call) cublas_check_((call), #call, __func__)
// after a <<<...>>> launch: launch errors (bad configuration, no device)
#define KERNEL_CHECK(name) cuda_check_(cudaGetLastError(), name "<<<>>>", __func__)

// the process's cuBLAS handle, made on first use; NULL (and recorded) on failure
cublasHandle_t cuda_cublas(void);
// grow-only device scratch (like nn_scratch): valid until the next call;
// NULL (and recorded) when cudaMalloc fails
float *cuda_scratch(size_t nfloats);

// grid for a grid-stride loop over n elements, bounded
inline unsigned grid_for(size_t n, int threads) {
    size_t b = (n + threads - 1) / threads;
    if (b > 65535 * 8) b = 65535 * 8;
    return b ? (unsigned)b : 1u;
}
#define GRID_STRIDE(i, n) \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

// row-major strided-batched GEMM (gemm_cuda's convention, see gemm.cu):
// for k < batch: C_k = alpha op(A_k) op(B_k) + beta C_k, X_k = X + k * strideX
void gemm_batched_cuda(int transA, int transB, int M, int N, int K, float alpha,
                       const float *A, int lda, long long strideA,
                       const float *B, int ldb, long long strideB, float beta,
                       float *C, int ldc, long long strideC, int batch);
#endif

#endif

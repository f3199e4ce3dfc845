// cuda/gemm.cu: the backend's runtime (errors, the cuBLAS handle, device
// scratch, the device check) and the GEMMs through cuBLAS.
//
// cuBLAS is column-major, our arrays are row-major. A row-major M x N matrix
// with row stride ld is, byte for byte, the column-major N x M matrix (its
// transpose) with leading dimension ld. So
//     C = op(A) op(B)            (row-major)
// is  C^T = op(B)^T op(A)^T      (column-major)
// which is one cublasSgemm with the operands swapped and M, N swapped; the
// trans flags carry over unchanged, because B as stored, read column-major,
// already is B^T. TF32 stays off: cuBLAS's default math mode is full fp32.
#include <stdio.h>
#include <string.h>
#include "common.cuh"
#include "backend.cuh"
extern "C" {
#include "cuda.h"   // ours (cuda/cuda.h), found first: same directory
}

static char g_msg[CUDA_ERR_LEN], g_out[CUDA_ERR_LEN];
static int g_have_err;
static const char *g_layer;
static cublasHandle_t g_handle;
static int g_handle_ok;
static float *g_scratch;
static size_t g_scratch_cap;

extern "C" void cuda_set_layer(const char *name) { g_layer = name; }

// "cudaMalloc(&p, n)" -> "cudaMalloc": the message names the call, not its arguments
void cuda_record_(const char *call, const char *fn, const char *why) {
    if (g_have_err) return;
    int n = (int)strcspn(call, "(");
    snprintf(g_msg, sizeof g_msg, "error: CUDA: %.*s failed in %s%s%s%s: %s", n, call, fn,
             g_layer ? " (layer " : "", g_layer ? g_layer : "", g_layer ? ")" : "", why);
    g_have_err = 1;
}

// an internal error that is not a failed call (a caller's layout bug)
static void record_internal(const char *what) {
    if (g_have_err) return;
    snprintf(g_msg, sizeof g_msg, "error: CUDA: internal error%s%s%s: %s", g_layer ? " (layer " : "",
             g_layer ? g_layer : "", g_layer ? ")" : "", what);
    g_have_err = 1;
}

int cuda_check_(cudaError_t e, const char *call, const char *fn) {
    if (e == cudaSuccess) return 1;
    cuda_record_(call, fn, cudaGetErrorString(e));
    return 0;
}

static const char *cublas_status_name(cublasStatus_t s) {
    switch (s) {
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED (no usable GPU?)";
    case CUBLAS_STATUS_ALLOC_FAILED:    return "CUBLAS_STATUS_ALLOC_FAILED (out of device memory)";
    case CUBLAS_STATUS_INVALID_VALUE:   return "CUBLAS_STATUS_INVALID_VALUE (bad size or stride)";
    case CUBLAS_STATUS_ARCH_MISMATCH:   return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_NOT_SUPPORTED:   return "CUBLAS_STATUS_NOT_SUPPORTED";
    default:                            return "cuBLAS error";
    }
}

int cublas_check_(cublasStatus_t s, const char *call, const char *fn) {
    if (s == CUBLAS_STATUS_SUCCESS) return 1;
    cuda_record_(call, fn, cublas_status_name(s));
    return 0;
}

extern "C" const char *cuda_last_error(void) {
    if (!g_have_err) return NULL;
    memcpy(g_out, g_msg, sizeof g_out);
    g_have_err = 0;
    return g_out;
}

extern "C" int cuda_available(void) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        cudaGetLastError();         // clear the runtime's last error
        return 0;
    }
    return n > 0;
}

extern "C" int cuda_device_check(char *err) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    cudaGetLastError();
    if (e == cudaSuccess && n > 0) { err[0] = '\0'; return CUDA_DEV_OK; }
    if (e == cudaSuccess || e == cudaErrorNoDevice) {
        snprintf(err, CUDA_ERR_LEN, "error: --device cuda: the NVIDIA driver sees no GPU "
                 "(check nvidia-smi and CUDA_VISIBLE_DEVICES, or use --device cpu)");
        return CUDA_DEV_NO_DEVICE;
    }
    snprintf(err, CUDA_ERR_LEN, "error: --device cuda: no usable NVIDIA driver: %s "
             "(install or update the NVIDIA driver, or use --device cpu)", cudaGetErrorString(e));
    return CUDA_DEV_NO_DRIVER;
}

/* ---- device memory, checked */
extern "C" void *cuda_alloc(size_t bytes) {
    void *p = NULL;
    if (!CUDA_CHECK(cudaMalloc(&p, bytes ? bytes : 1))) return NULL;
    return p;
}
extern "C" void cuda_free(void *p) {
    if (p) CUDA_CHECK(cudaFree(p));
}
extern "C" int cuda_upload(void *dst, const void *src, size_t bytes) {
    return bytes == 0 || CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
}
extern "C" int cuda_download(void *dst, const void *src, size_t bytes) {
    return bytes == 0 || CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
}
extern "C" int cuda_zero(void *dst, size_t bytes) {
    return bytes == 0 || CUDA_CHECK(cudaMemset(dst, 0, bytes));
}
// kernels run asynchronously: a fault inside one shows up here, or at the
// next copy
extern "C" int cuda_synchronize(void) { return CUDA_CHECK(cudaDeviceSynchronize()); }

cublasHandle_t cuda_cublas(void) {
    if (!g_handle_ok) {
        if (!CUBLAS_CHECK(cublasCreate(&g_handle))) return NULL;
        g_handle_ok = 1;
    }
    return g_handle;
}

float *cuda_scratch(size_t nfloats) {
    if (nfloats <= g_scratch_cap && g_scratch) return g_scratch;
    if (g_scratch) CUDA_CHECK(cudaFree(g_scratch));
    g_scratch = NULL;
    g_scratch_cap = 0;
    void *p = NULL;
    if (!CUDA_CHECK(cudaMalloc(&p, (nfloats ? nfloats : 1) * sizeof(float)))) return NULL;
    g_scratch = (float *)p;
    g_scratch_cap = nfloats;
    return g_scratch;
}

// cuBLAS insists on ld >= max(1, rows) even where nothing is read (K == 0,
// where the BLAS meaning is C = beta C); the CPU gemm does not care
static int ld_fix(int ld, int rows) { int m = rows > 1 ? rows : 1; return ld < m ? m : ld; }

extern "C" void gemm_cuda(int transA, int transB, int M, int N, int K,
                          float alpha, const float *A, int lda, const float *B, int ldb,
                          float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
    cublasHandle_t h = cuda_cublas();
    if (!h) return;
    lda = ld_fix(lda, transA ? M : K);
    ldb = ld_fix(ldb, transB ? K : N);
    CUBLAS_CHECK(cublasSgemm(h, transB ? CUBLAS_OP_T : CUBLAS_OP_N, transA ? CUBLAS_OP_T : CUBLAS_OP_N,
                             N, M, K, &alpha, B, ldb, A, lda, &beta, C, ldc));
}

void gemm_batched_cuda(int transA, int transB, int M, int N, int K, float alpha,
                       const float *A, int lda, long long strideA,
                       const float *B, int ldb, long long strideB, float beta,
                       float *C, int ldc, long long strideC, int batch) {
    if (M <= 0 || N <= 0 || batch <= 0) return;
    cublasHandle_t h = cuda_cublas();
    if (!h) return;
    lda = ld_fix(lda, transA ? M : K);
    ldb = ld_fix(ldb, transB ? K : N);
    CUBLAS_CHECK(cublasSgemmStridedBatched(h, transB ? CUBLAS_OP_T : CUBLAS_OP_N,
                                           transA ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K, &alpha,
                                           B, ldb, strideB, A, lda, strideA, &beta, C, ldc, strideC, batch));
}

// DevBK's share (see backend.cuh)
void DevBK::gemm(int tA, int tB, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc) {
    gemm_cuda(tA, tB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
void DevBK::gemm_batched(int tA, int tB, int M, int N, int K, float alpha,
                         const float *A, int lda, long long sA, const float *B, int ldb, long long sB,
                         float beta, float *C, int ldc, long long sC, int batch) {
    gemm_batched_cuda(tA, tB, M, N, K, alpha, A, lda, sA, B, ldb, sB, beta, C, ldc, sC, batch);
}
float *DevBK::scratch(size_t n) { return cuda_scratch(n); }
void DevBK::fail(const char *what) { record_internal(what); }

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
// already is B^T. TF32 stays off unless --tf32 asks (cuda_set_tf32):
// cuBLAS's default math mode is full fp32.
//
// --compute bf16|fp16 (cuda_set_compute): each operand is rounded into a
// 16-bit copy (round_kernel, mixed_ops.cuh) and multiplied by
// cublasGemmEx / cublasGemmStridedBatchedEx with fp32 compute and an fp32 C.
//
// Device memory is counted here: every allocation of this backend (the
// table's, the scratch, the operand copies, cuBLAS's workspace) goes through
// dev_alloc / dev_free, which keep the bytes live and their peak
// (cuda_mem_peak, the programs' summary line).
#include <stdio.h>
#include <string.h>
#include <vector>
#include "common.cuh"
#include "mixed_ops.cuh"
#include "backend.cuh"
extern "C" {
#include "cuda.h"   // ours (cuda/cuda.h), found first: same directory
}

static char g_msg[CUDA_ERR_LEN], g_out[CUDA_ERR_LEN];
static int g_have_err;
static const char *g_layer;
static cublasHandle_t g_handle;
static int g_handle_ok;
static void *g_scratch;             // cuda_scratch's buffer
static size_t g_scratch_cap;        // (floats)
static int g_compute = LOWP_F32, g_tf32;
static void *g_lp;                  // the operand copies of a low-precision GEMM
static size_t g_lp_cap;             // (uint16s)
static void *g_workspace;           // cuBLAS's, ours so that it is counted

// ---- the allocation count: live bytes per pointer, their total and peak
static std::vector<std::pair<void *, size_t> > g_live;
static size_t g_live_bytes, g_peak_bytes;
static void *dev_alloc(size_t bytes, const char *fn) {
    void *p = NULL;
    if (!cuda_check_(cudaMalloc(&p, bytes ? bytes : 1), "cudaMalloc", fn)) return NULL;
    g_live.push_back(std::make_pair(p, bytes));
    g_live_bytes += bytes;
    if (g_live_bytes > g_peak_bytes) g_peak_bytes = g_live_bytes;
    return p;
}
static void dev_free(void *p, const char *fn) {
    if (!p) return;
    for (size_t i = 0; i < g_live.size(); i++)
        if (g_live[i].first == p) {
            g_live_bytes -= g_live[i].second;
            g_live[i] = g_live.back();
            g_live.pop_back();
            break;
        }
    cuda_check_(cudaFree(p), "cudaFree", fn);
}
extern "C" size_t cuda_mem_peak(void) { return g_peak_bytes; }
extern "C" size_t cuda_mem_live(void) { return g_live_bytes; }

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
extern "C" void *cuda_alloc(size_t bytes) { return dev_alloc(bytes, __func__); }
extern "C" void cuda_free(void *p) { dev_free(p, __func__); }
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

// the handle, with our workspace (CUDA_CUBLAS_WORKSPACE bytes: cuBLAS would
// otherwise take its own, uncounted) and the math mode --tf32 asked for
cublasHandle_t cuda_cublas(void) {
    if (!g_handle_ok) {
        if (!CUBLAS_CHECK(cublasCreate(&g_handle))) return NULL;
        g_handle_ok = 1;
        g_workspace = dev_alloc(CUDA_CUBLAS_WORKSPACE, __func__);
        if (g_workspace) CUBLAS_CHECK(cublasSetWorkspace(g_handle, g_workspace, CUDA_CUBLAS_WORKSPACE));
        CUBLAS_CHECK(cublasSetMathMode(g_handle, g_tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
    }
    return g_handle;
}

// --tf32: fp32 GEMMs on TF32 tensor cores (10-bit significands in the
// products); off by default. Low-precision modes are not affected.
extern "C" void cuda_set_tf32(int on) {
    g_tf32 = on != 0;
    if (g_handle_ok)
        CUBLAS_CHECK(cublasSetMathMode(g_handle, g_tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
}
extern "C" void cuda_set_compute(int mode) {
    g_compute = mode == CUDA_COMPUTE_BF16 ? LOWP_BF16 : mode == CUDA_COMPUTE_F16 ? LOWP_F16 : LOWP_F32;
}
extern "C" int cuda_compute(void) { return g_compute; }

// a grow-only device buffer *buf of *cap elements of `size` bytes: kept
// while it holds n, else freed and made anew for n; fn (the caller) is the
// function an error line names
static void *grow_only(void **buf, size_t *cap, size_t n, size_t size, const char *fn) {
    if (n <= *cap && *buf) return *buf;
    dev_free(*buf, fn);
    *buf = NULL;
    *cap = 0;
    void *p = dev_alloc((n ? n : 1) * size, fn);
    if (!p) return NULL;
    *buf = p;
    *cap = n;
    return p;
}

float *cuda_scratch(size_t nfloats) {
    return (float *)grow_only(&g_scratch, &g_scratch_cap, nfloats, sizeof(float), __func__);
}

// the grow-only buffers back (they grow again on the next call that needs
// them): ./train calls it once the caches are built, so the VAE's 512^2
// convolutions' scratch is not carried through the UNet's steps
extern "C" void cuda_release_scratch(void) {
    dev_free(g_scratch, __func__);
    dev_free(g_lp, __func__);
    g_scratch = NULL;
    g_lp = NULL;
    g_scratch_cap = g_lp_cap = 0;
}

// grow-only room for a GEMM's two operand copies (uint16s)
static uint16_t *lp_scratch(size_t n) {
    return (uint16_t *)grow_only(&g_lp, &g_lp_cap, n, sizeof(uint16_t), __func__);
}

// dst[i] = the mode's bits of src[i], over the operand's span
__global__ static void round_kernel(uint16_t *dst, const float *src, size_t n, int mode) {
    GRID_STRIDE(i, n) dst[i] = lowp_bits(src[i], mode);
}
static void round_span(uint16_t *dst, const float *src, size_t n) {
    if (n == 0) return;
    round_kernel<<<grid_for(n, 256), 256>>>(dst, src, n, g_compute);
    KERNEL_CHECK("round_kernel");
}

// our trans flag as cuBLAS's: B as stored, read column-major, is B^T
// already (top of file), so the flag carries over unchanged
static cublasOperation_t op_of(int trans) { return trans ? CUBLAS_OP_T : CUBLAS_OP_N; }

// a GEMM (batch 1: strides unused) in the low-precision mode: both operands
// rounded into lp_scratch, then one GemmEx / GemmStridedBatchedEx
static void gemm_lowp(cublasHandle_t h, int transA, int transB, int M, int N, int K, float alpha,
                      const float *A, int lda, long long sA, const float *B, int ldb, long long sB,
                      float beta, float *C, int ldc, long long sC, int batch) {
    size_t na = operand_span(transA ? K : M, transA ? M : K, lda, sA, batch);
    size_t nb = operand_span(transB ? N : K, transB ? K : N, ldb, sB, batch);
    size_t na16 = (na + 7) & ~(size_t)7;            // B's copy 16-byte aligned, as tensor-core kernels want
    uint16_t *a16 = lp_scratch(na16 + nb);
    if (!a16) return;
    uint16_t *b16 = a16 + na16;
    round_span(a16, A, na);
    round_span(b16, B, nb);
    cudaDataType_t t = g_compute == LOWP_BF16 ? CUDA_R_16BF : CUDA_R_16F;
    cublasOperation_t oa = op_of(transA), ob = op_of(transB);
    if (batch == 1)
        CUBLAS_CHECK(cublasGemmEx(h, ob, oa, N, M, K, &alpha, b16, t, ldb, a16, t, lda, &beta, C, CUDA_R_32F, ldc,
                                  CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    else
        CUBLAS_CHECK(cublasGemmStridedBatchedEx(h, ob, oa, N, M, K, &alpha, b16, t, ldb, sB, a16, t, lda, sA, &beta,
                                                C, CUDA_R_32F, ldc, sC, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// cuBLAS insists on ld >= max(1, rows) even where nothing is read (K == 0,
// where the BLAS meaning is C = beta C); the CPU gemm does not care
static int ld_fix(int ld, int rows) { int m = rows > 1 ? rows : 1; return ld < m ? m : ld; }

// what gemm_cuda and gemm_batched_cuda share (gemm_cuda's strides are 0 and
// its batch 1): nothing to do for an empty C; the handle; lda and ldb as
// cuBLAS wants them; in a low-precision mode the whole product, here. Returns
// the handle where the caller's fp32 cuBLAS call is still to be made, else
// NULL. The calls stay in the callers, so an error line names them.
static cublasHandle_t gemm_begin(int transA, int transB, int M, int N, int K, float alpha,
                                 const float *A, int *lda, long long sA, const float *B, int *ldb, long long sB,
                                 float beta, float *C, int ldc, long long sC, int batch) {
    if (M <= 0 || N <= 0 || batch <= 0) return NULL;
    cublasHandle_t h = cuda_cublas();
    if (!h) return NULL;
    *lda = ld_fix(*lda, transA ? M : K);
    *ldb = ld_fix(*ldb, transB ? K : N);
    if (g_compute != LOWP_F32 && K > 0 && alpha != 0.0f) {   // as matmul.c: K == 0 or alpha == 0 is C = beta C
        gemm_lowp(h, transA, transB, M, N, K, alpha, A, *lda, sA, B, *ldb, sB, beta, C, ldc, sC, batch);
        return NULL;
    }
    return h;
}

extern "C" void gemm_cuda(int transA, int transB, int M, int N, int K,
                          float alpha, const float *A, int lda, const float *B, int ldb,
                          float beta, float *C, int ldc) {
    cublasHandle_t h = gemm_begin(transA, transB, M, N, K, alpha, A, &lda, 0, B, &ldb, 0, beta, C, ldc, 0, 1);
    if (h) CUBLAS_CHECK(cublasSgemm(h, op_of(transB), op_of(transA), N, M, K, &alpha, B, ldb, A, lda, &beta, C, ldc));
}

void gemm_batched_cuda(int transA, int transB, int M, int N, int K, float alpha,
                       const float *A, int lda, long long strideA,
                       const float *B, int ldb, long long strideB, float beta,
                       float *C, int ldc, long long strideC, int batch) {
    cublasHandle_t h = gemm_begin(transA, transB, M, N, K, alpha, A, &lda, strideA, B, &ldb, strideB, beta,
                                  C, ldc, strideC, batch);
    if (h) CUBLAS_CHECK(cublasSgemmStridedBatched(h, op_of(transB), op_of(transA), N, M, K, &alpha, B, ldb, strideB,
                                                  A, lda, strideA, &beta, C, ldc, strideC, batch));
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
int DevBK::lowp() { return g_compute; }
// dst = src rounded to the mode's precision, kept as fp32 (the operands of
// the direct convolution kernels, which are not GEMMs)
__global__ static void round_copy_kernel(float *dst, const float *src, size_t n, int mode) {
    GRID_STRIDE(i, n) dst[i] = lowp_round(src[i], mode);
}
void DevBK::round_copy(float *dst, const float *src, size_t n) {
    if (n == 0) return;
    round_copy_kernel<<<grid_for(n, 256), 256>>>(dst, src, n, g_compute);
    KERNEL_CHECK("round_copy_kernel");
}
void DevBK::fail(const char *what) { record_internal(what); }

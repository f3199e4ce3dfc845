/* cuda/cuda.h: the optional GPU backend (make CUDA=1), callable from C.
 *
 * Pointers passed to the *_cuda functions are device pointers (cudaMalloc).
 * Nothing here is needed by the CPU build; the C code only calls these under
 * #ifdef SDLORA_CUDA. (Include it as "cuda/cuda.h": it is not the CUDA
 * driver API's <cuda.h>.) */
#ifndef SDLORA_CUDA_H
#define SDLORA_CUDA_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* 1 when at least one CUDA device is usable, 0 when there is none, no
 * driver, or any error; never aborts. */
int cuda_available(void);

/* gemm() from nn.h on device memory, through cuBLAS:
 *   C[M x N] = alpha * op(A)[M x K] * op(B)[K x N] + beta * C   (row-major)
 * beta == 0: C is not read. Failures are recorded, see cuda_last_error(). */
void gemm_cuda(int transA, int transB, int M, int N, int K,
               float alpha, const float *A, int lda, const float *B, int ldb,
               float beta, float *C, int ldc);

/* out[i] = inp[i] * sigmoid(inp[i]) over n floats (out may equal inp) */
void silu_forward_cuda(float *out, const float *inp, size_t n);

/* the first error since the last call (a static message), or NULL; clears it */
const char *cuda_last_error(void);

#ifdef __cplusplus
}
#endif
#endif

/* matmul.c: the one matrix multiply every heavy layer goes through.
 * (placeholder: a plain correct triple loop; the blocked, vectorised,
 * OpenMP version replaces it) */
#include "nn.h"

void gemm(int transA, int transB, int M, int N, int K,
          float alpha, const float *A, int lda, const float *B, int ldb,
          float beta, float *C, int ldc) {
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            float s = 0;
            for (int p = 0; p < K; p++) {
                float a = transA ? A[(size_t)p * lda + i] : A[(size_t)i * lda + p];
                float b = transB ? B[(size_t)j * ldb + p] : B[(size_t)p * ldb + j];
                s += a * b;
            }
            C[(size_t)i * ldc + j] = alpha * s + (beta == 0.0f ? 0.0f : beta * C[(size_t)i * ldc + j]);
        }
}

// cuda/backend.cuh: DevBK, the device backend of cuda/layers.cuh's
// templates. Every method launches one kernel (or one cuBLAS call) on device
// memory and checks it; they are defined beside their kernels (gemm.cu,
// nn.cu, attention.cu). The host test's HostBK has the same methods.
#ifndef SDLORA_CUDA_BACKEND_CUH
#define SDLORA_CUDA_BACKEND_CUH

#include "nn_ops.cuh"

struct DevBK {
    // gemm.cu
    static void gemm(int tA, int tB, int M, int N, int K, float alpha, const float *A, int lda,
                     const float *B, int ldb, float beta, float *C, int ldc);
    static void gemm_batched(int tA, int tB, int M, int N, int K, float alpha,
                             const float *A, int lda, long long sA, const float *B, int ldb, long long sB,
                             float beta, float *C, int ldc, long long sC, int batch);
    static float *scratch(size_t n);
    static void fail(const char *what);
    // the compute mode (mixed_ops.cuh's LOWP_*), and a copy rounded to it
    static int lowp();
    static void round_copy(float *dst, const float *src, size_t n);
    // nn.cu
    static void add_bias_rows(float *out, const float *b, int N, int C);
    static void add_bias_chan(float *out, const float *b, int B, int O, size_t P);
    static void bias_grad_rows(float *db, const float *dout, int N, int C);
    static void bias_grad_chan(float *db, const float *dout, int B, int O, size_t P);
    static void conv_fwd(float *out, const float *x, const float *w, const float *b, conv_dims d);
    static void conv_dinp(float *dx, const float *dy, const float *w, conv_dims d);
    static void conv_dw(float *dw, const float *dy, const float *x, conv_dims d);
    static void shift_pad(float *xpad, const float *x, conv_dims d, shift_dims s);
    static void shift_wpack(float *wp, const float *w, conv_dims d);
    static void shift_crop(float *out, const float *opad, const float *b, conv_dims d, shift_dims s);
    static void shift_dpad(float *dpad, const float *dout, conv_dims d, shift_dims s);
    static void shift_dx_add(float *dx, const float *dxpad, conv_dims d, shift_dims s);
    static void shift_dw_add(float *dw, const float *dwp, conv_dims d);
    static void zero(float *p, size_t n);
    static void dropout_fwd(float *out, uint8_t *mask, const float *inp, size_t n, float p, uint64_t s0);
    static void dropout_rebuild(float *xd, const float *inp, const uint8_t *mask, size_t n, float p);
    static void dropout_bwd(float *dinp, const float *dout, const uint8_t *mask, size_t n, float p);
    // attention.cu
    static void softmax_rows(float *P, int rows, int Tq, int Tk, int causal);
    static void softmax_bwd_rows(float *dS, const float *P, int rows, int Tk);
};

#endif

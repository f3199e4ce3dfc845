/* test_matmul_avx2.c: test_matmul's cases on the AVX2+FMA micro-kernel,
 * which an AVX-512 build of the library does not use (see
 * test_matmul_portable.c for how). Where the compiler does not target AVX2
 * this is the portable kernel again. */
#define SDLORA_GEMM_NO_AVX512 1
#define gemm gemm_avx2
#define gemm_pack_b gemm_pack_b_avx2
#define gemm_packed gemm_packed_avx2
#define gemm_packed_b_free gemm_packed_b_free_avx2
#define gemm_tiles gemm_tiles_avx2
#define gemm_buffer gemm_buffer_avx2
#define gemm_is_small gemm_is_small_avx2
#define gemm_im2col_floats gemm_im2col_floats_avx2
#define gemm_im2col gemm_im2col_avx2
#include "../matmul.c"
#include "test_matmul.c"

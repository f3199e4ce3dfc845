/* test_matmul_portable.c: test_matmul's cases on the plain-C micro-kernel,
 * the one every target without AVX-512 or AVX2 builds (NEON, POWER, ...).
 * matmul.c is compiled into this test with SDLORA_GEMM_PORTABLE, its public
 * functions renamed so they do not clash with the library's, so the
 * fallback is built and checked on every machine, whatever the library
 * selected. */
#define SDLORA_GEMM_PORTABLE 1
#define gemm gemm_portable
#define gemm_pack_b gemm_pack_b_portable
#define gemm_packed gemm_packed_portable
#define gemm_packed_b_free gemm_packed_b_free_portable
#define gemm_tiles gemm_tiles_portable
#define gemm_buffer gemm_buffer_portable
#define gemm_is_small gemm_is_small_portable
#define gemm_im2col_floats gemm_im2col_floats_portable
#define gemm_im2col gemm_im2col_portable
#include "../matmul.c"
#include "test_matmul.c"

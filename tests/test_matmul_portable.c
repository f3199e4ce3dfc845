/* test_matmul_portable.c: test_matmul's cases on the plain-C micro-kernel,
 * the one every target without AVX-512 or AVX2 builds (NEON, POWER, ...).
 * matmul.c is compiled into this test with SDLORA_GEMM_PORTABLE, its gemm
 * renamed so it does not clash with the library's, so the fallback is
 * built and checked on every machine, whatever the library selected. */
#define SDLORA_GEMM_PORTABLE 1
#define gemm gemm_portable
#include "../matmul.c"
#include "test_matmul.c"

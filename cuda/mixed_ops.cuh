// cuda/mixed_ops.cuh: mixed precision on the device (--compute bf16|fp16):
// the rounding of GEMM operands, and the dynamic loss scale of fp16.
//
// A GEMM in a low-precision mode is
//     C = alpha * sum_k lo(A[i][k]) lo(B[k][j]) + beta * C         (fp32 sums)
// with lo() rounding to bf16 or fp16 (nearest, ties to even), which is what
// the CPU's --compute bf16 does (matmul_bf16.c): each product of two bf16 (8
// significant bits) or two fp16 (11 bits) is exact in fp32, so the only
// difference left between the CPU and cuBLAS (cublasGemmEx, fp32 compute) is
// the order of the fp32 additions. The device rounds each operand once, into
// a 16-bit copy (round_kernel, gemm.cu), and hands the copies to cuBLAS; the
// host test rounds the same elements with the same functions below.
#ifndef SDLORA_CUDA_MIXED_OPS_CUH
#define SDLORA_CUDA_MIXED_OPS_CUH

#include "nn_ops.cuh"

// the modes, numbered as nn.h's GEMM_F32 / GEMM_BF16 (cuda.h repeats them)
enum { LOWP_F32 = 0, LOWP_BF16 = 1, LOWP_F16 = 2 };

HD uint32_t f32_bits(float x) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(x);
#else
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
#endif
}

// bf16 = the top half of an fp32, rounded to nearest even: add 0x7fff plus
// the lowest kept bit and truncate (a carry bumps the exponent; the largest
// finite values round to inf). NaN -> the quiet NaN 0x7fc0. Bit for bit
// matmul_bf16.c's gemm_bf16_round.
HD uint16_t bf16_bits(float x) {
    uint32_t u = f32_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// fp16, nearest even (half.c's float_to_half on every non-NaN input; NaN ->
// a quiet NaN). |x| >= 65520 overflows to inf: that inf is what fp16's loss
// scaling watches for.
//   normal (|x| >= 2^-14): rebias the exponent (127 -> 15: subtract
//     112 << 23), drop 13 significand bits rounding to nearest even;
//   subnormal: the value in units of 2^-24, m 2^(e - 126) with the implicit
//     bit in m, shifted right by s = 126 - e >= 14 rounding to nearest even
//     (0x400 when it rounds up to the smallest normal: the same bits);
//   below 2^-25 (or exactly it: a tie to the even 0): signed zero.
HD uint16_t f16_bits(float x) {
    uint32_t u = f32_bits(x), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);
    if (a >= 0x38800000u) {
        uint32_t r = a - 0x38000000u;
        return (uint16_t)(sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13));
    }
    if (a <= 0x33000000u) return (uint16_t)sign;
    uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u, s = 126u - e;
    return (uint16_t)(sign | ((m + (1u << (s - 1)) - 1u + ((m >> s) & 1u)) >> s));
}

HD float bf16_bits_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// x as the mode holds it, widened back to fp32 (exact): the value cuBLAS
// multiplies
HD float lowp_round(float x, int mode) {
    if (mode == LOWP_BF16) return bf16_bits_to_float(bf16_bits(x));
    if (mode == LOWP_F16) return half_bits_to_float(f16_bits(x));
    return x;
}
HD uint16_t lowp_bits(float x, int mode) { return mode == LOWP_BF16 ? bf16_bits(x) : f16_bits(x); }

// the elements a row-major operand of `batch` matrices (rows x cols, row
// stride ld, matrix k at k * stride) spans, from its first to its last: the
// device rounds this whole range into its copy, so the copy keeps the
// operand's ld and strides (the gaps between rows are rounded too, unread)
inline size_t operand_span(int rows, int cols, int ld, long long stride, int batch) {
    if (rows <= 0 || cols <= 0 || batch <= 0) return 0;
    return (size_t)(batch - 1) * (size_t)stride + (size_t)(rows - 1) * (size_t)ld + (size_t)cols;
}

#endif

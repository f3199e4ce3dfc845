/* half.c: IEEE 754 binary16 <-> float32, exact (see half.h).
 *
 * Bit layouts (sign s, exponent e, mantissa m):
 *
 *   half    s eeeee mmmmmmmmmm                       bias 15
 *   float   s eeeeeeee mmmmmmmmmmmmmmmmmmmmmmm       bias 127
 *
 *   half value:  e = 0:       (-1)^s * m * 2^-24               zero, subnormals
 *                0 < e < 31:  (-1)^s * (1 + m/1024) * 2^(e-15)  normal
 *                e = 31:      inf (m = 0) or NaN (m != 0)
 *
 * half -> float is exact: a normal half moves to the float exponent
 * e + 127 - 15 = e + 112 with its 10 mantissa bits on top of the 23; a
 * subnormal m * 2^-24 (m < 1024) is a normal float.
 * float -> half keeps the top 10 of 23 mantissa bits and rounds on the 13
 * dropped ones, to nearest, ties to even (IEEE's default, what torch's
 * .half() does). */
#include <string.h>
#include "half.h"

#ifdef _OPENMP
#define OMP(x) _Pragma(#x)
#else
#define OMP(x)
#endif

static uint32_t f32_bits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static float bits_f32(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

int weight_dtype_parse(const char *s, weight_dtype *dt) {
    if (s && strcmp(s, "fp32") == 0) { *dt = WEIGHT_F32; return 0; }
    if (s && strcmp(s, "fp16") == 0) { *dt = WEIGHT_F16; return 0; }
    return -1;
}

const char *weight_dtype_name(weight_dtype dt) { return dt == WEIGHT_F16 ? "fp16" : "fp32"; }

/* the float bits of half h. All three cases are computed and one is
 * selected, with no branch, so the array version vectorises . */
static inline uint32_t h2f_bits(uint32_t h) {
    uint32_t sign = (h & 0x8000u) << 16, e = h & 0x7C00u, m = h & 0x3FFu;
    /* normal: rebias, float exponent = e + 112: add 112 << 23 to the shifted bits */
    uint32_t normal = ((h & 0x7FFFu) << 13) + (112u << 23);
    /* inf, NaN (payload kept) */
    uint32_t special = 0x7F800000u | m << 13;
    /* zero, subnormal m * 2^-24 (m < 1024): build 2^-14 * (1 + m/1024) and
     * subtract 2^-14, both exact, leaving m * 2^-24 (+0 for m = 0) */
    uint32_t sub = f32_bits(bits_f32(0x38800000u | m << 13) - 0x1p-14f);
    uint32_t is_special = 0u - (uint32_t)(e == 0x7C00u), is_sub = 0u - (uint32_t)(e == 0);
    uint32_t r = (special & is_special) | (normal & ~is_special);
    r = (sub & is_sub) | (r & ~is_sub);
    return sign | r;
}

float half_to_float(uint16_t h) { return bits_f32(h2f_bits(h)); }

/* round a non-negative integer q + rem / 2^shift to nearest, ties to even */
static uint32_t round_rne(uint32_t q, uint32_t rem, int shift) {
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1))) q++;
    return q;
}

uint16_t float_to_half(float f) {
    uint32_t x = f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    uint32_t ax = x & 0x7FFFFFFF;
    if (ax > 0x7F800000) {
        /* NaN: keep the top 10 payload bits; if they are all zero the
         * result would read as inf, so set the quiet bit instead */
        uint32_t pay = (ax >> 13) & 0x3FF;
        return (uint16_t)(sign | 0x7C00 | (pay ? pay : 0x200));
    }
    /* 65520 is halfway between the largest half 65504 (odd mantissa) and
     * 65536 = 2^16, so it and everything above rounds to inf */
    if (ax >= 0x477FF000) return (uint16_t)(sign | 0x7C00);
    uint32_t e = ax >> 23, m = ax & 0x7FFFFF;
    if (ax < 0x38800000) {
        /* below 2^-14: a subnormal half q = round(|f| / 2^-24) with
         * |f| = (m | 2^23) * 2^(e-150), so q = (m | 2^23) >> (126 - e) */
        if (e < 102) return sign;          /* |f| < 2^-25: rounds to zero (2^-25 itself is e = 102) */
        m |= 0x800000;
        int shift = 126 - (int)e;          /* 14..24 */
        uint32_t q = round_rne(m >> shift, m & ((1u << shift) - 1), shift);
        return (uint16_t)(sign | q);       /* q = 0x400 is the smallest normal, also right */
    }
    /* normal: rebias the exponent (127 -> 15), keep the top 10 mantissa bits,
     * round on the 13 dropped ones; a mantissa carry correctly bumps the exponent */
    uint32_t h = ((e - 127 + 15) << 10) | (m >> 13);
    h = round_rne(h, m & 0x1FFF, 13);
    return (uint16_t)(sign | h);
}

/* The array versions run once per weight matrix per layer call: big
 * matrices (SD1.5: up to 29.5M entries) are split across threads. */
void half_to_float_array(float *dst, const uint16_t *src, size_t n) {
    long long nn = (long long)n;
    OMP(omp parallel for schedule(static) if (nn > 65536))
    for (long long i = 0; i < nn; i++) dst[i] = bits_f32(h2f_bits(src[i]));
}

void float_to_half_array(uint16_t *dst, const float *src, size_t n) {
    long long nn = (long long)n;
    OMP(omp parallel for schedule(static) if (nn > 65536))
    for (long long i = 0; i < nn; i++) dst[i] = float_to_half(src[i]);
}

const float *half_widen_cached(float *buf, const uint16_t **held, const uint16_t *src, size_t n) {
    if (*held != src) {
        half_to_float_array(buf, src, n);
        *held = src;
    }
    return buf;
}

void half_param_get(float *dst, const float *f32, const uint16_t *f16, size_t n) {
    if (f16) half_to_float_array(dst, f16, n);
    else memcpy(dst, f32, sizeof(float) * n);
}

void half_param_set(float *f32, uint16_t *f16, const float *src, size_t n) {
    if (f16) float_to_half_array(f16, src, n);
    else memcpy(f32, src, sizeof(float) * n);
}

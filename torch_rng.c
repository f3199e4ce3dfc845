/* torch_rng.c: torch's CPU (mt19937) and CUDA (Philox, as AUTOMATIC1111
 * reimplements it) normal generators, reproduced bit for bit.
 *
 * Why bother: a diffusion sample is a deterministic function of its starting
 * noise. Drawing that noise exactly as torch does means `./sample --seed 42`
 * starts from the same latents as diffusers with
 * generator=torch.Generator("cpu").manual_seed(42), or as AUTOMATIC1111 with
 * its default GPU seeds, so images can be compared seed for seed.
 *
 * All arithmetic is float32 or double exactly where torch's is, with fmaf()
 * where torch's compiled kernel fuses a multiply-add; the file must be built
 * without floating-point contraction (the Makefile's -std=c99 implies
 * -ffp-contract=off in GCC) so the compiler adds no fusions of its own.
 */
#include <math.h>
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF   /* clang fuses a*b+c by default even in ISO mode */
#endif
#include <stdio.h>
#include <string.h>
#include "torch_rng.h"

/* ------------------------------------------------------------------------ */
/* mt19937 (Matsumoto & Nishimura 1998), as torch's at::mt19937 */

void torch_cpu_seed(torch_cpu_gen *g, uint64_t seed) {
    /* torch keeps the 64-bit seed but initialises the engine from its low
     * 32 bits: mt[0] = seed, mt[i] = 1812433253 (mt[i-1] ^ (mt[i-1] >> 30)) + i */
    g->mt[0] = (uint32_t)(seed & 0xffffffffu);
    for (int i = 1; i < TORCH_MT_N; i++)
        g->mt[i] = 1812433253u * (g->mt[i - 1] ^ (g->mt[i - 1] >> 30)) + (uint32_t)i;
    g->mti = TORCH_MT_N;
    g->has_next_normal = 0;
    g->next_normal = 0;
    g->kernel = TORCH_CPU_KERNEL_AVX2;
}

uint32_t torch_cpu_u32(torch_cpu_gen *g) {
    enum { N = TORCH_MT_N, M = 397 };
    if (g->mti >= N) {
        /* twist: y = upper bit of mt[i] | lower 31 bits of mt[i+1];
         * mt[i] = mt[i+M] ^ (y >> 1) ^ (y odd ? 0x9908b0df : 0) */
        for (int i = 0; i < N; i++) {
            uint32_t y = (g->mt[i] & 0x80000000u) | (g->mt[(i + 1) % N] & 0x7fffffffu);
            g->mt[i] = g->mt[(i + M) % N] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
        }
        g->mti = 0;
    }
    uint32_t y = g->mt[g->mti++];
    /* tempering */
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
}

/* float uniform: the low 24 bits (a float's mantissa digits) of one draw,
 * u = (x & (2^24 - 1)) * 2^-24, exact in float32 */
float torch_cpu_uniform(torch_cpu_gen *g) {
    return (float)(torch_cpu_u32(g) & 0xffffffu) * (1.0f / 16777216.0f);
}

/* double uniform: 53 bits of two draws, the first one the high word */
static double uniform_double(torch_cpu_gen *g) {
    uint64_t hi = torch_cpu_u32(g), lo = torch_cpu_u32(g);
    uint64_t x = (hi << 32) | lo;
    return (double)(x & ((1ull << 53) - 1)) * (1.0 / 9007199254740992.0);
}

/* torch's scalar normal sampler (at::normal_distribution<double>), used for
 * tensors of fewer than 16 floats. Box-Muller on two double uniforms:
 *   r = sqrt(-2 log(1 - u2)),  theta = 2 pi u1
 *   returns r cos(theta) and keeps r sin(theta) for the next call */
static double normal_double(torch_cpu_gen *g) {
    if (g->has_next_normal) {
        g->has_next_normal = 0;
        return g->next_normal;
    }
    double u1 = uniform_double(g);
    double u2 = uniform_double(g);
    double r = sqrt(-2.0 * log1p(-u2));
    double theta = 2.0 * 3.14159265358979323846 * u1;
    g->next_normal = r * sin(theta);
    g->has_next_normal = 1;
    return r * cos(theta);
}

/* ---- the vectorised path: float log, sin and cos ---------------------------
 * For 16 floats or more torch's AVX2 kernel fills the tensor with float
 * uniforms and runs Box-Muller eight pairs at a time with the Cephes-derived
 * polynomials of avx_mathfun.h (not libm), so those are what we evaluate,
 * one lane at a time. Each multiply-add that the compiled kernel fuses is
 * an fmaf() here; the rest round after every operation. */

static float bits_to_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static uint32_t float_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* natural log of x in (0, 1] (the kernel only sees 1 - u, u in [0, 1)).
 * x = m 2^e with m in [sqrt(1/2), sqrt(2)); log x = e log 2 + log m, where
 * log(1 + f) = f - f^2/2 + f^3 P(f) and log 2 is split in two parts
 * (0.693359375 + -2.12194440e-4) so e log 2 adds without rounding error. */
static float cephes_logf(float x) {
    uint32_t b = float_to_bits(x);
    float e = (float)((int)(b >> 23) - 127) + 1.0f;      /* x = m 2^e, m in [0.5, 1) */
    float m = bits_to_float((b & ~0x7f800000u) | 0x3f000000u);
    float f;
    if (m < 0.707106781186547524f) {                  /* m < sqrt(1/2): use 2m, e - 1 */
        e = e - 1.0f;
        f = (m - 1.0f) + m;
    } else {
        f = m - 1.0f;
    }
    float z = f * f;
    /* P(f) by Horner */
    float y = 7.0376836292E-2f;
    y = fmaf(y, f, -1.1514610310E-1f);
    y = fmaf(y, f, 1.1676998740E-1f);
    y = fmaf(y, f, -1.2420140846E-1f);
    y = fmaf(y, f, 1.4249322787E-1f);
    y = fmaf(y, f, -1.6668057665E-1f);
    y = fmaf(y, f, 2.0000714765E-1f);
    y = fmaf(y, f, -2.4999993993E-1f);
    y = fmaf(y, f, 3.3333331174E-1f);
    y = y * f;
    y = fmaf(y, z, e * -2.12194440e-4f);              /* f^3 P(f) + e log2_lo */
    y = fmaf(-z, 0.5f, y);                            /* - f^2 / 2 */
    float r = f + y;
    return fmaf(e, 0.693359375f, r);                  /* + e log2_hi */
}

/* sin and cos of x >= 0 (the kernel's theta = 2 pi u is in [0, 2 pi)).
 * j = the even integer nearest above x 4/pi; x is reduced to
 * x - j pi/4 in [-pi/4, pi/4] with pi/4 in three parts (Cody-Waite), and
 * j mod 8 picks the polynomial (sin or cos of the remainder) and the sign. */
static void cephes_sincosf(float x, float *s, float *c) {
    int j = (int)(x * 1.27323954473516f);             /* 4 / pi, truncated */
    j = (j + 1) & ~1;
    float y = (float)j;
    x = fmaf(y, -0.78515625f, x);
    x = fmaf(y, -2.4187564849853515625e-4f, x);
    x = fmaf(y, -3.77489497744594108e-8f, x);
    int sin_neg = (j & 4) != 0;
    int cos_neg = ((~(j - 2)) & 4) != 0;
    int swap = (j & 2) != 0;                          /* remainder's sin and cos swap roles */
    float z = x * x;
    /* cos r = 1 - r^2/2 + r^4 Q(r^2) */
    float yc = 2.443315711809948E-005f;
    yc = fmaf(yc, z, -1.388731625493765E-003f);
    yc = fmaf(yc, z, 4.166664568298827E-002f);
    yc = yc * z;
    yc = fmaf(yc, z, -(z * 0.5f));
    yc = yc + 1.0f;
    /* sin r = r + r^3 S(r^2) */
    float ys = -1.9515295891E-4f;
    ys = fmaf(ys, z, 8.3321608736E-3f);
    ys = fmaf(ys, z, -1.6666654611E-1f);
    ys = ys * z;
    ys = fmaf(ys, x, x);
    float sv = swap ? yc : ys, cv = swap ? ys : yc;
    *s = sin_neg ? -sv : sv;
    *c = cos_neg ? -cv : cv;
}

/* Box-Muller on one block of 16 uniforms, pairing element j with j + 8:
 *   r = sqrt(-2 log(1 - u_j)),  theta = 2 pi u_{j+8}
 *   out_j = r cos(theta),  out_{j+8} = r sin(theta) */
static void box_muller16(float *d) {
    const float two_pi = (float)(2.0 * 3.14159265358979323846);
    for (int j = 0; j < 8; j++) {
        float r = sqrtf(-2.0f * cephes_logf(1.0f - d[j]));
        float s, c;
        cephes_sincosf(two_pi * d[j + 8], &s, &c);
        d[j] = r * c;
        d[j + 8] = r * s;
    }
}

/* The same transform in torch's portable kernel (builds without AVX2, which
 * includes the AVX-512 one): libm's float log, cos and sin, and theta
 * computed in double from the double 2 pi, then rounded:
 *   theta = (float)(2 pi u_{j+8}) */
static void box_muller16_libm(float *d) {
    const double two_pi = 2.0 * 3.14159265358979323846;
    for (int j = 0; j < 8; j++) {
        float r = sqrtf(-2.0f * logf(1.0f - d[j]));
        float theta = (float)(two_pi * (double)d[j + 8]);
        d[j] = r * cosf(theta);
        d[j + 8] = r * sinf(theta);
    }
}

void torch_cpu_randn(torch_cpu_gen *g, float *out, size_t n) {
    if (n < 16) {
        /* scalar path: one double normal per float (consumes the cache) */
        for (size_t i = 0; i < n; i++) out[i] = (float)normal_double(g);
        return;
    }
    /* all uniforms first, then Box-Muller block by block */
    for (size_t i = 0; i < n; i++) out[i] = torch_cpu_uniform(g);
    void (*bm16)(float *) = g->kernel == TORCH_CPU_KERNEL_LIBM ? box_muller16_libm : box_muller16;
    for (size_t i = 0; i + 16 <= n; i += 16) bm16(out + i);
    if (n % 16) {
        /* a partial last block: draw 16 fresh uniforms over the last 16
         * slots (overwriting normals already made) and transform them */
        float *d = out + n - 16;
        for (int i = 0; i < 16; i++) d[i] = torch_cpu_uniform(g);
        bm16(d);
    }
}

/* ------------------------------------------------------------------------ */
/* Philox4x32-10 (Salmon et al. 2011), as AUTOMATIC1111's rng_philox.py */

void philox4x32_10(uint32_t out[4], const uint32_t ctr[4], uint64_t key) {
    uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
    uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
    for (int round = 0; round < 10; round++) {
        /* one round: two 32x32->64 products, their halves mixed with the key */
        uint64_t p0 = (uint64_t)0xD2511F53u * c0;
        uint64_t p1 = (uint64_t)0xCD9E8D57u * c2;
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
        uint32_t n1 = (uint32_t)p1;
        uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        uint32_t n3 = (uint32_t)p0;
        c0 = n0; c1 = n1; c2 = n2; c3 = n3;
        /* the key advances by the Weyl constants between rounds */
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

void torch_philox_seed(torch_philox_gen *g, uint64_t seed) {
    g->seed = seed;
    g->offset = 0;
}

/* Element i of call k: Philox of counter (k, 0, i, 0) gives words x, y;
 *   u = x 2^-32 + 2^-33            in (0, 1)
 *   v = y (2 pi 2^-32) + pi 2^-32  in (0, 2 pi)
 *   out_i = sqrt(-2 log u) sin v
 * The two scale constants are float32 roundings and the arithmetic is in
 * double, as in A1111's numpy code (uint32 times a float32 array promotes to
 * float64 there); only the result is rounded to float32. */
void torch_philox_randn(torch_philox_gen *g, float *out, size_t n) {
    const double inv32 = (double)2.3283064e-10f;              /* ~2^-32 */
    const double inv32_2pi = (double)(float)(2.3283064e-10 * 6.2831855);
    for (size_t i = 0; i < n; i++) {
        uint32_t ctr[4] = {g->offset, 0, (uint32_t)i, 0}, w[4];
        philox4x32_10(w, ctr, g->seed);
        double u = (double)w[0] * inv32 + inv32 / 2;
        double v = (double)w[1] * inv32_2pi + inv32_2pi / 2;
        out[i] = (float)(sqrt(-2.0 * log(u)) * sin(v));
    }
    g->offset++;
}

/* ------------------------------------------------------------------------ */

int torch_rng_kind_from_name(const char *name, torch_rng_kind *kind, char *err) {
    if (strcmp(name, "cpu") == 0) { *kind = TORCH_RNG_CPU; return 0; }
    if (strcmp(name, "cpu-libm") == 0) { *kind = TORCH_RNG_CPU_LIBM; return 0; }
    if (strcmp(name, "cuda") == 0) { *kind = TORCH_RNG_CUDA; return 0; }
    snprintf(err, 256, "rng \"%s\": unknown (use \"cpu\" for torch's CPU generator, \"cpu-libm\" for it on a CPU without AVX2 or with AVX-512, or \"cuda\" for its GPU one)",
             name);
    return -1;
}

void torch_rng_seed(torch_rng *r, torch_rng_kind kind, uint64_t seed) {
    memset(r, 0, sizeof *r);
    r->kind = kind;
    if (kind == TORCH_RNG_CUDA) torch_philox_seed(&r->philox, seed);
    else {
        torch_cpu_seed(&r->cpu, seed);
        if (kind == TORCH_RNG_CPU_LIBM) r->cpu.kernel = TORCH_CPU_KERNEL_LIBM;
    }
}

void torch_rng_randn(torch_rng *r, float *out, size_t n) {
    if (r->kind == TORCH_RNG_CUDA) torch_philox_randn(&r->philox, out, n);
    else torch_cpu_randn(&r->cpu, out, n);
}

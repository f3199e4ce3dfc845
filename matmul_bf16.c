/* matmul_bf16.c: gemm's bf16 compute mode (--compute bf16).
 *
 *   C[M x N] = alpha * bf16(op(A)) * bf16(op(B)) + beta * C        (row-major)
 *
 * Both operands are rounded to bf16 (round to nearest, ties to even, as
 * torch rounds) while they are packed; products are summed in fp32 and C
 * stays fp32. This is what PyTorch's CPU autocast does to a matmul, except
 * that C is not rounded to bf16 afterwards. gemm() and gemm_packed()
 * (matmul.c) come here when gemm_set_compute(GEMM_BF16) is in force, so
 * every model GEMM follows the mode with no change where it is called.
 *
 * Blocking is Goto's, as in matmul.c (read its header first): K blocks of
 * at most KC, B panels of NC columns, A blocks of MC rows, an MR x NR tile
 * of C in registers. What differs is the packed layout: K is walked in
 * pairs, and each packed element is a 32-bit word holding two bf16,
 * op(X)[.][2q] in its low half and op(X)[.][2q+1] in its high half:
 *
 *   A strip: a[q * MR + i] = (A[i][2q], A[i][2q+1])      i < MR
 *   B strip: b[q * NR + j] = (B[2q][j], B[2q+1][j])      j < NR
 *
 * which is the operand layout of AVX512-BF16's vdpbf16ps: for each of the
 * 16 fp32 lanes j,
 *
 *   acc[j] += a.hi * b[j].hi;  acc[j] += a.lo * b[j].lo     (two roundings)
 *
 * (Intel's pseudo-code for VDPBF16PS: the odd element first, each add
 * rounded to fp32). The product of two bf16 (8-bit significands) is exact
 * in fp32, so each step is one fp32 add of an exact product: the portable
 * kernel does exactly that with plain float multiply and add, no FMA
 * needed, and gives the same bits as the AVX512-BF16 kernel, with one
 * exception: vdpbf16ps treats bf16 denormal inputs as zero and flushes
 * denormal results (|x| < 2^-126) to zero, the portable path does not, so
 * the two differ by at most 2^-126 per product-add, only where a product or
 * a partial sum falls below 2^-126 (far below a model's values).
 * tests/test_bf16.c checks the identity on the kernels this CPU has (on
 * AMD Zen 4 the instruction matches the pseudo-code bit for bit; summing
 * the even element first fails that test).
 *
 * An odd K block is padded with a zero pair element; x + 0*0 == x (a -0
 * sum becomes +0), the same on every path.
 *
 * A B that many calls share (attention's K and V, per head) can be rounded
 * and packed once (gemm_pack_b under GEMM_BF16 -> gemm_bf16_pack_b, at the
 * end); gemm_packed then reads it as gemm_serial would have packed it, so
 * the bits are gemm_bf16's. A strip of at most 16 columns (Dh = 40 is 32 +
 * 8) runs a half-width kernel: half the work, the same sums per column.
 * Threads and packing buffers come from matmul.c (gemm_tiles, gemm_buffer),
 * as for the fp32 kernel.
 *
 * Determinism: as in matmul.c, threads split only C's tiles; the K blocks
 * (of an even length that depends on K alone) are summed in sequence, so
 * the bits do not depend on the thread count.
 *
 * AMX (Intel Sapphire Rapids and later, _tile_dpbf16ps) is not written:
 * it could not be run on the machine this was developed on (AMD Zen 4,
 * which has AVX512-BF16 but no AMX). A CPU with AMX runs the AVX512-BF16
 * kernel (every AMX CPU has it). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "nn.h"

#ifdef _OPENMP
#include <omp.h>
#define OMP(x) _Pragma(#x)
#else
#define OMP(x)
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define HAVE_X86_BF16 1
#endif

#define MR 12
#define NR 32
#ifndef KC
#define KC 512
#endif          /* even: K is cut into pairs; B strip KC/2 x NR words = 32 KB */
#ifndef MC_MAX
#define MC_MAX 192
#endif      /* A block 192 x 256 words = 192 KB (L2) */
#define NC_MAX 1024     /* B panel 256 x 1024 words = 1 MB */

/* below this many multiply-adds, element by element (no packing, no threads) */
#define SMALL_WORK 32768.0

/* ---- the mode ------------------------------------------------------------ */
static int g_compute = GEMM_F32;

void gemm_set_compute(int mode) { g_compute = mode == GEMM_BF16 ? GEMM_BF16 : GEMM_F32; }
int gemm_compute(void) { return g_compute; }

int gemm_parse_compute(const char *s) {
    if (!s) return -1;
    if (strcmp(s, "fp32") == 0) return GEMM_F32;
    if (strcmp(s, "bf16") == 0) return GEMM_BF16;
    return -1;
}

/* ---- rounding ------------------------------------------------------------
 * bf16 is the top half of an fp32. Round to nearest even: add 0x7fff plus
 * the lowest kept bit, then truncate; a carry out of the significand
 * bumps the exponent, and the largest finite values round to inf, as they
 * should. NaN would be turned into inf or a different NaN by that, so it
 * becomes the canonical quiet NaN 0x7fc0 (torch does the same). */
uint16_t gemm_bf16_round(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

float gemm_bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, 4);
    return x;
}

/* the same as gemm_bf16_round, written so that the packing loops vectorise
 * (branch-free select on the NaN test) */
static inline uint32_t rnd(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : r;
}
static inline uint32_t pair(float lo, float hi) { return rnd(lo) | rnd(hi) << 16; }

/* ---- kernels ------------------------------------------------------------- */
enum { K_PORTABLE = 0, K_AVX512BF16 = 1, K_SCALAR = 2 };
static int g_kernel = -1;          /* -1: not chosen yet */

static int cpu_has_avx512bf16(void) {
#ifdef HAVE_X86_BF16
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
#else
    return 0;
#endif
}

int gemm_bf16_set_kernel(int k) {
    if (k == GEMM_BF16_AUTO) k = cpu_has_avx512bf16() ? GEMM_BF16_AVX512 : GEMM_BF16_PORTABLE;
    if (k == GEMM_BF16_AVX512 && !cpu_has_avx512bf16()) return 0;
    if (k != GEMM_BF16_PORTABLE && k != GEMM_BF16_AVX512 && k != GEMM_BF16_SCALAR) return 0;
    g_kernel = k == GEMM_BF16_AVX512 ? K_AVX512BF16 : k == GEMM_BF16_SCALAR ? K_SCALAR : K_PORTABLE;
    return 1;
}

const char *gemm_bf16_kernel_name(void) {
    if (g_kernel < 0) gemm_bf16_set_kernel(GEMM_BF16_AUTO);
    return g_kernel == K_AVX512BF16 ? "avx512bf16" : g_kernel == K_SCALAR ? "scalar" : "portable";
}

/* C tile = alpha * acc + beta * C (beta == 0: C not read), only the mr x nr
 * corner; the same operations (no FMA) as the vector store below */
static void store_tile(const float *restrict acc, float *restrict C, int ldc, int mr, int nr,
                       float alpha, float beta) {
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            float *c = C + (size_t)i * ldc + j;
            float v = alpha * acc[i * NR + j];
            *c = beta == 0.0f ? v : v + beta * *c;
        }
}

/* plain C: acc[i][j] += a.hi b.hi, then += a.lo b.lo, per pair q (the
 * product is exact, so a separate multiply and add round once, as the
 * hardware does) */
static void kernel_portable(int kq, const uint32_t *restrict a, const uint32_t *restrict b,
                            float *restrict C, int ldc, int mr, int nr, float alpha, float beta) {
    float acc[MR * NR];
    for (int i = 0; i < MR * NR; i++) acc[i] = 0.0f;
    for (int q = 0; q < kq; q++) {
        float blo[NR], bhi[NR];
        for (int j = 0; j < NR; j++) {
            blo[j] = gemm_bf16_to_float((uint16_t)b[q * NR + j]);
            bhi[j] = gemm_bf16_to_float((uint16_t)(b[q * NR + j] >> 16));
        }
        for (int i = 0; i < MR; i++) {
            float alo = gemm_bf16_to_float((uint16_t)a[q * MR + i]);
            float ahi = gemm_bf16_to_float((uint16_t)(a[q * MR + i] >> 16));
            float *ac = acc + i * NR;
            for (int j = 0; j < NR; j++) {
                float t = ac[j] + ahi * bhi[j];
                ac[j] = t + alo * blo[j];
            }
        }
    }
    store_tile(acc, C, ldc, mr, nr, alpha, beta);
}

#ifdef HAVE_X86_BF16
/* 12 x 32 tile: 24 zmm accumulators, 2 B vectors, 1 broadcast A pair */
#define ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define K_DECL(i) __m512 c##i##0 = _mm512_setzero_ps(), c##i##1 = _mm512_setzero_ps();
#define K_DP(i) { __m512bh ai = (__m512bh)_mm512_set1_epi32((int)ap[i]);    \
                  c##i##0 = _mm512_dpbf16_ps(c##i##0, ai, b0);              \
                  c##i##1 = _mm512_dpbf16_ps(c##i##1, ai, b1); }
#define K_ST(i) if (i < mr) {                                               \
        float *ci = C + (size_t)(i) * ldc;                                  \
        __m512 v0 = _mm512_mul_ps(va, c##i##0), v1 = _mm512_mul_ps(va, c##i##1); \
        if (beta != 0.0f) {                                                 \
            v0 = _mm512_add_ps(v0, _mm512_mul_ps(vb, _mm512_maskz_loadu_ps(m0, ci)));  \
            v1 = _mm512_add_ps(v1, _mm512_mul_ps(vb, _mm512_maskz_loadu_ps(m1, ci + 16))); \
        }                                                                   \
        _mm512_mask_storeu_ps(ci, m0, v0);                                  \
        _mm512_mask_storeu_ps(ci + 16, m1, v1); }

__attribute__((target("avx512f,avx512bf16")))
static void kernel_avx512bf16(int kq, const uint32_t *restrict a, const uint32_t *restrict b,
                              float *restrict C, int ldc, int mr, int nr, float alpha, float beta) {
    for (int i = 0; i < mr; i++) __builtin_prefetch(C + (size_t)i * ldc, 1, 3);
    ROWS(K_DECL)
    for (int q = 0; q < kq; q++) {
        __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + (size_t)q * NR);
        __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + (size_t)q * NR + 16);
        const uint32_t *ap = a + (size_t)q * MR;
        ROWS(K_DP)
    }
    __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
    __mmask16 m0 = nr >= 16 ? 0xffff : (__mmask16)((1u << nr) - 1);
    __mmask16 m1 = nr >= 32 ? 0xffff : nr <= 16 ? 0 : (__mmask16)((1u << (nr - 16)) - 1);
    ROWS(K_ST)
}

/* the same for a strip with at most 16 columns (attention's Dh = 40 is a
 * strip of 32 and one of 8): half the accumulators, half the work of the
 * full tile; each column's sums are the full tile's, so the bits too */
#define K_DECL16(i) __m512 c##i##0 = _mm512_setzero_ps();
#define K_DP16(i) { __m512bh ai = (__m512bh)_mm512_set1_epi32((int)ap[i]);  \
                    c##i##0 = _mm512_dpbf16_ps(c##i##0, ai, b0); }
#define K_ST16(i) if (i < mr) {                                             \
        float *ci = C + (size_t)(i) * ldc;                                  \
        __m512 v0 = _mm512_mul_ps(va, c##i##0);                             \
        if (beta != 0.0f)                                                   \
            v0 = _mm512_add_ps(v0, _mm512_mul_ps(vb, _mm512_maskz_loadu_ps(m0, ci))); \
        _mm512_mask_storeu_ps(ci, m0, v0); }

__attribute__((target("avx512f,avx512bf16")))
static void kernel_avx512bf16_16(int kq, const uint32_t *restrict a, const uint32_t *restrict b,
                                 float *restrict C, int ldc, int mr, int nr, float alpha, float beta) {
    for (int i = 0; i < mr; i++) __builtin_prefetch(C + (size_t)i * ldc, 1, 3);
    ROWS(K_DECL16)
    for (int q = 0; q < kq; q++) {
        __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + (size_t)q * NR);
        const uint32_t *ap = a + (size_t)q * MR;
        ROWS(K_DP16)
    }
    __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
    __mmask16 m0 = nr >= 16 ? 0xffff : (__mmask16)((1u << nr) - 1);
    ROWS(K_ST16)
}
#endif

static void micro_kernel(int kq, const uint32_t *a, const uint32_t *b, float *C, int ldc,
                         int mr, int nr, float alpha, float beta) {
#ifdef HAVE_X86_BF16
    if (g_kernel == K_AVX512BF16) {
        if (nr <= 16) kernel_avx512bf16_16(kq, a, b, C, ldc, mr, nr, alpha, beta);
        else kernel_avx512bf16(kq, a, b, C, ldc, mr, nr, alpha, beta);
        return;
    }
#endif
    kernel_portable(kq, a, b, C, ldc, mr, nr, alpha, beta);
}

/* ---- packing (rounds to bf16) -------------------------------------------
 * Each loop walks its source in memory order. Rows past the edge and the
 * pad element of an odd kc are zero. */

#if defined(HAVE_X86_BF16) && defined(__AVX512F__) && MR == 12
#define HAVE_AVX512_TRANSPOSE 1
/* d[k * MR + i] = t[i][k] for k < 16, i < MR = 12: pack_a's block of 16
 * pairs of 12 rows turned into 16 rows of the strip. The scalar loop wrote
 * one word at a time and was a tenth of the bf16 step (1 thread, SD1.5
 * training); this is the usual 16 x 16 transpose (rows 12-15 zero, their
 * lanes not stored): 32-bit then 64-bit interleaves within 128-bit lanes,
 * then two rounds of 128-bit lane shuffles. Output row c = 4 L + m comes
 * from lane L of u[m], u[4 + m], u[8 + m], u[12 + m]. */
static void transpose_12x16(uint32_t *restrict d, const uint32_t t[MR][16]) {
    __m512i r[16], u[16];
    for (int i = 0; i < 16; i++) r[i] = i < MR ? _mm512_loadu_si512(t[i]) : _mm512_setzero_si512();
    for (int i = 0; i < 16; i += 4) {
        __m512i a = _mm512_unpacklo_epi32(r[i], r[i + 1]), b = _mm512_unpackhi_epi32(r[i], r[i + 1]);
        __m512i c = _mm512_unpacklo_epi32(r[i + 2], r[i + 3]), e = _mm512_unpackhi_epi32(r[i + 2], r[i + 3]);
        u[i] = _mm512_unpacklo_epi64(a, c);        /* column 4L + 0 of rows i .. i+3 */
        u[i + 1] = _mm512_unpackhi_epi64(a, c);    /* 4L + 1 */
        u[i + 2] = _mm512_unpacklo_epi64(b, e);    /* 4L + 2 */
        u[i + 3] = _mm512_unpackhi_epi64(b, e);    /* 4L + 3 */
    }
    for (int m = 0; m < 4; m++) {
        __m512i v = _mm512_shuffle_i32x4(u[m], u[4 + m], 0x44), v2 = _mm512_shuffle_i32x4(u[m], u[4 + m], 0xee);
        __m512i w = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0x44), w2 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0xee);
        _mm512_mask_storeu_epi32(d + (size_t)(m) * MR, 0x0fff, _mm512_shuffle_i32x4(v, w, 0x88));
        _mm512_mask_storeu_epi32(d + (size_t)(4 + m) * MR, 0x0fff, _mm512_shuffle_i32x4(v, w, 0xdd));
        _mm512_mask_storeu_epi32(d + (size_t)(8 + m) * MR, 0x0fff, _mm512_shuffle_i32x4(v2, w2, 0x88));
        _mm512_mask_storeu_epi32(d + (size_t)(12 + m) * MR, 0x0fff, _mm512_shuffle_i32x4(v2, w2, 0xdd));
    }
}
#endif

/* op(A)[i0 .. i0+mrows, p0 .. p0+kc] -> strips of MR rows, kqs*MR words apart */
static void pack_a(uint32_t *restrict dst, int kqs, const float *restrict A, int lda, int transA,
                   int i0, int mrows, int p0, int kc) {
    int kq = (kc + 1) / 2, nstrips = (mrows + MR - 1) / MR;
    int last = mrows - (nstrips - 1) * MR;          /* rows in the last strip */
    if (last < MR || (kc & 1))
        for (int s = 0; s < nstrips; s++) memset(dst + (size_t)s * kqs * MR, 0, (size_t)kq * MR * sizeof *dst);
    if (!transA) {
        /* A stored M x K: each row contiguous along p; 16 pairs of a row
         * at a time into a small block (vectorised), then that block's
         * columns into the strip */
        for (int s = 0; s < nstrips; s++) {
            uint32_t *d = dst + (size_t)s * kqs * MR;
            int mr = s == nstrips - 1 ? last : MR;
            const float *r[MR];
            for (int i = 0; i < mr; i++) r[i] = A + (size_t)(i0 + s * MR + i) * lda + p0;
            int q = 0;
            for (; q + 16 <= kc / 2; q += 16) {
                uint32_t t[MR][16];
                for (int i = 0; i < mr; i++)
                    for (int k = 0; k < 16; k++) t[i][k] = pair(r[i][2 * (q + k)], r[i][2 * (q + k) + 1]);
#ifdef HAVE_AVX512_TRANSPOSE
                if (mr == MR) {
                    transpose_12x16(d + (size_t)q * MR, t);
                    continue;
                }
#endif
                for (int k = 0; k < 16; k++)
                    for (int i = 0; i < mr; i++) d[(q + k) * MR + i] = t[i][k];
            }
            for (int i = 0; i < mr; i++) {
                for (int qq = q; qq < kc / 2; qq++) d[qq * MR + i] = pair(r[i][2 * qq], r[i][2 * qq + 1]);
                if (kc & 1) d[(kc / 2) * MR + i] = pair(r[i][kc - 1], 0.0f);
            }
        }
    } else {
        /* A stored K x M: rows p, p+1 rounded whole into one row of pairs
         * (a loop over up to MC_MAX elements, vectorised at full width),
         * then cut into the strips, MR words each (attention's dV and dK
         * pack a 4096-row P^T this way on every query tile) */
        uint32_t t[MC_MAX + MR];       /* mrows <= MC_MAX rounded up to MR */
        for (int i = mrows; i < nstrips * MR; i++) t[i] = 0;
        for (int q = 0; q < kq; q++) {
            const float *r0 = A + (size_t)(p0 + 2 * q) * lda + i0;
            if (2 * q + 1 < kc) {
                const float *r1 = r0 + lda;
                for (int i = 0; i < mrows; i++) t[i] = pair(r0[i], r1[i]);
            } else {
                for (int i = 0; i < mrows; i++) t[i] = pair(r0[i], 0.0f);
            }
            for (int s = 0; s < nstrips; s++)
                memcpy(dst + (size_t)s * kqs * MR + (size_t)q * MR, t + s * MR, MR * sizeof *t);
        }
    }
}

/* op(B)[p0 .. p0+kc, j0 .. j0+ncols] -> strips of NR columns, sstride words apart */
static void pack_b(uint32_t *restrict dst, size_t sstride, const float *restrict B, int ldb,
                   int transB, int p0, int kc, int j0, int ncols) {
    int kq = (kc + 1) / 2, nstrips = (ncols + NR - 1) / NR;
    int last = ncols - (nstrips - 1) * NR;          /* columns in the last strip */
    if (last < NR || (kc & 1))
        for (int s = 0; s < nstrips; s++) memset(dst + (size_t)s * sstride, 0, (size_t)kq * NR * sizeof *dst);
    if (!transB) {
        /* B stored K x N: rows p, p+1 walked whole, across all the strips,
         * in memory order */
        for (int q = 0; q < kq; q++) {
            const float *r0 = B + (size_t)(p0 + 2 * q) * ldb + j0;
            const float *r1 = 2 * q + 1 < kc ? r0 + ldb : NULL;
            for (int s = 0; s < nstrips; s++) {
                uint32_t *dq = dst + (size_t)s * sstride + (size_t)q * NR;
                const float *a0 = r0 + s * NR;
                int nr = s == nstrips - 1 ? last : NR;
                if (r1 && nr == NR) {
                    const float *a1 = r1 + s * NR;
                    for (int j = 0; j < NR; j++) dq[j] = pair(a0[j], a1[j]);
                } else if (r1) {
                    const float *a1 = r1 + s * NR;
                    for (int j = 0; j < nr; j++) dq[j] = pair(a0[j], a1[j]);
                } else {
                    for (int j = 0; j < nr; j++) dq[j] = pair(a0[j], 0.0f);
                }
            }
        }
    } else {
        /* B stored N x K (a weight, out x in): each row contiguous along p */
        for (int s = 0; s < nstrips; s++) {
            uint32_t *d = dst + (size_t)s * sstride;
            int nr = s == nstrips - 1 ? last : NR;
            for (int j = 0; j < nr; j++) {
                const float *r = B + (size_t)(j0 + s * NR + j) * ldb + p0;
                for (int q = 0; q < kc / 2; q++) d[q * NR + j] = pair(r[2 * q], r[2 * q + 1]);
                if (kc & 1) d[(kc / 2) * NR + j] = pair(r[kc - 1], 0.0f);
            }
        }
    }
}

/* ---- the blocked loops --------------------------------------------------- */
/* the K blocking (of an even length kb, K alone decides it) */
static int k_block(int K) {
    int nkb = (K + KC - 1) / KC;
    return ((K + nkb - 1) / nkb + 1) / 2 * 2;
}

static int round_up(int x, int m) { return (x + m - 1) / m * m; }

/* one thread's rectangle of C; bp, ap its packing buffers */
static void gemm_serial(int transA, int transB, int M, int N, int K,
                        float alpha, const float *A, int lda, const float *B, int ldb,
                        float beta, float *C, int ldc, uint32_t *bp, uint32_t *ap,
                        const uint32_t *bpre, int bnpad, int j0) {
    /* K blocks of equal, even length (K alone decides them: the summation
     * order of each C element does not depend on the rectangle); packed
     * strips are kqs pairs long */
    int kb = k_block(K), kqs = kb / 2;
    int nnb = (N + NC_MAX - 1) / NC_MAX, nb = round_up((N + nnb - 1) / nnb, NR);
    int nmb = (M + MC_MAX - 1) / MC_MAX, mb = round_up((M + nmb - 1) / nmb, MR);
    for (int jc = 0; jc < N; jc += nb) {
        int nc = N - jc < nb ? N - jc : nb;
        for (int pc = 0; pc < K; pc += kb) {
            int kc = K - pc < kb ? K - pc : kb, kq = (kc + 1) / 2;
            float bet = pc == 0 ? beta : 1.0f;          /* beta applies once */
            /* bpre (gemm_bf16_pack_b's layout, bnpad its padded width, j0
             * this rectangle's first column): B is packed already */
            size_t bstride = (size_t)kqs * NR;
            const uint32_t *bpan = bp;
            if (bpre) {
                bstride = (size_t)kq * NR;
                bpan = bpre + (size_t)(pc / 2) * bnpad + (size_t)((j0 + jc) / NR) * bstride;
            } else {
                pack_b(bp, bstride, B, ldb, transB, pc, kc, jc, nc);
            }
            for (int ic = 0; ic < M; ic += mb) {
                int mc = M - ic < mb ? M - ic : mb;
                pack_a(ap, kqs, A, lda, transA, ic, mc, pc, kc);
                for (int jr = 0; jr < nc; jr += NR) {
                    int nr = nc - jr < NR ? nc - jr : NR;
                    const uint32_t *bs = bpan + (size_t)(jr / NR) * bstride;
                    for (int ir = 0; ir < mc; ir += MR) {
                        int mr = mc - ir < MR ? mc - ir : MR;
                        micro_kernel(kq, ap + (size_t)(ir / MR) * kqs * MR, bs,
                                     C + (size_t)(ic + ir) * ldc + jc + jr, ldc, mr, nr, alpha, bet);
                    }
                }
            }
        }
    }
}

/* the blocked path's sums, element by element (same K blocks, same pairs,
 * same order as kernel_portable), for when its buffers cannot be had */
static void gemm_bf16_unblocked(int transA, int transB, int M, int N, int K,
                                float alpha, const float *A, int lda, const float *B, int ldb,
                                float beta, float *C, int ldc) {
    int kb = k_block(K);
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            float *c = &C[(size_t)i * ldc + j];
            for (int pc = 0; pc < K; pc += kb) {
                int pe = K - pc < kb ? K : pc + kb;
                float acc = 0.0f;
                for (int p = pc; p < pe; p += 2) {
                    float a0 = transA ? A[(size_t)p * lda + i] : A[(size_t)i * lda + p];
                    float b0 = transB ? B[(size_t)j * ldb + p] : B[(size_t)p * ldb + j];
                    float a1 = 0.0f, b1 = 0.0f;
                    if (p + 1 < pe) {
                        a1 = transA ? A[(size_t)(p + 1) * lda + i] : A[(size_t)i * lda + p + 1];
                        b1 = transB ? B[(size_t)j * ldb + p + 1] : B[(size_t)(p + 1) * ldb + j];
                    }
                    acc = acc + gemm_bf16_to_float((uint16_t)rnd(a1)) * gemm_bf16_to_float((uint16_t)rnd(b1));
                    acc = acc + gemm_bf16_to_float((uint16_t)rnd(a0)) * gemm_bf16_to_float((uint16_t)rnd(b0));
                }
                float v = alpha * acc;
                *c = (pc == 0 ? beta : 1.0f) == 0.0f ? v : v + (pc == 0 ? beta : 1.0f) * *c;
            }
        }
}

/* one gemm as gemm_tiles (matmul.c) sees it */
typedef struct {
    int transA, transB, K, lda, ldb, ldc, bnpad;
    float alpha, beta;
    const float *A, *B;
    const uint32_t *bpre;
    float *C;
    uint32_t *buf;
    size_t per, bwords;     /* words per thread; of them, the B panel's */
} bf16_job;

static void bf16_rect(const void *job, int tid, int i0, int i1, int j0, int j1) {
    const bf16_job *g = job;
    const float *a = g->transA ? g->A + i0 : g->A + (size_t)i0 * g->lda;
    const float *b = g->bpre ? NULL : g->transB ? g->B + (size_t)j0 * g->ldb : g->B + j0;
    uint32_t *bp = g->buf + (size_t)tid * g->per;
    gemm_serial(g->transA, g->transB, i1 - i0, j1 - j0, g->K, g->alpha, a, g->lda, b, g->ldb,
                g->beta, g->C + (size_t)i0 * g->ldc + j0, g->ldc, bp, bp + g->bwords,
                g->bpre, g->bnpad, j0);
}

/* op(B) (K x N, row stride N) out of a gemm_bf16_pack_b layout; exact, as
 * its values are bf16 already */
static void unpack_b(float *b, const uint32_t *bp, int K, int N) {
    int npad = round_up(N, NR), kb = k_block(K);
    for (int p = 0; p < K; p++) {
        int pc = p / kb * kb, kq = ((K - pc < kb ? K - pc : kb) + 1) / 2, q = (p - pc) / 2;
        for (int j = 0; j < N; j++) {
            uint32_t w = bp[(size_t)(pc / 2) * npad + (size_t)(j / NR) * kq * NR + (size_t)q * NR + j % NR];
            b[(size_t)p * N + j] = gemm_bf16_to_float((uint16_t)((p - pc) & 1 ? w >> 16 : w));
        }
    }
}

/* gemm_bf16 and gemm_bf16_packed: B as given (bpre NULL) or packed */
static void bf16_run(int transA, int transB, int M, int N, int K,
                     float alpha, const float *A, int lda, const float *B, int ldb,
                     const uint32_t *bpre, float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0 || alpha == 0.0f) {
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) {
                float *c = &C[(size_t)i * ldc + j];
                *c = beta == 0.0f ? 0.0f : beta * *c;
            }
        return;
    }
    if (g_kernel < 0) gemm_bf16_set_kernel(GEMM_BF16_AUTO);
    int nthreads = 1;
#ifdef _OPENMP
    nthreads = omp_in_parallel() ? 1 : omp_get_max_threads();
    while (nthreads > 1 && (double)M * N * K / nthreads < 1e6) nthreads--;
#endif
    /* per thread: a B panel (none when B is packed) and an A block, as
     * large as this problem needs */
    size_t kqs = (size_t)k_block(K) / 2;
    int nbmax = round_up(N, NR) < NC_MAX ? round_up(N, NR) : NC_MAX;
    int mbmax = round_up(M, MR) < MC_MAX ? round_up(M, MR) : MC_MAX;
    size_t bwords = bpre ? 0 : kqs * nbmax, per = bwords + kqs * mbmax;
    /* small problems (the tiny model, LoRA's rank-r products inside
     * attention's threads): packing costs more than it saves; the same
     * sums element by element, also when the buffers cannot be had */
    uint32_t *buf = (double)M * N * K < SMALL_WORK || g_kernel == K_SCALAR ? NULL
                  : gemm_buffer((size_t)nthreads * per * sizeof(uint32_t));
    if (!buf) {
        float *b = NULL;
        if (bpre) {
            b = malloc((size_t)K * N * sizeof(float));
            if (!b) { fprintf(stderr, "gemm_bf16: out of memory\n"); exit(EXIT_FAILURE); }
            unpack_b(b, bpre, K, N);
            B = b;
            ldb = N;
            transB = 0;
        }
        gemm_bf16_unblocked(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        free(b);
        return;
    }
    bf16_job job = {transA, transB, K, lda, ldb, ldc, round_up(N, NR), alpha, beta,
                    A, B, bpre, C, buf, per, bwords};
    /* packing a word costs about what 32 bf16 multiply-adds do (a 32-lane
     * pair of dot products per cycle against about one word packed) */
    gemm_tiles(M, N, MR, NR, nthreads, 32.0, bf16_rect, &job);
}

void gemm_bf16(int transA, int transB, int M, int N, int K,
               float alpha, const float *A, int lda, const float *B, int ldb,
               float beta, float *C, int ldc) {
    bf16_run(transA, transB, M, N, K, alpha, A, lda, B, ldb, NULL, beta, C, ldc);
}

/* ---- B packed once --------------------------------------------------------
 * The layout gemm_serial reads with bpre: K blocks of kb (k_block(K)), block
 * by block, (pc / 2) * npad words in; in each, round_up(N, NR) columns as
 * strips of NR, each kq x NR words (kq = the block's pairs), zero past N
 * and in the pad element of an odd last block. */
size_t gemm_bf16_pack_words(int K, int N) { return (size_t)(K + 1) / 2 * round_up(N, NR); }

void gemm_bf16_pack_b(uint32_t *dst, int transB, int K, int N, const float *B, int ldb) {
    int kb = k_block(K), npad = round_up(N, NR), nstrips = npad / NR;
    for (int pc = 0; pc < K; pc += kb) {
        int kc = K - pc < kb ? K - pc : kb, kq = (kc + 1) / 2;
        uint32_t *d = dst + (size_t)(pc / 2) * npad;
        /* strip by strip, split over the threads when it is worth it */
        OMP(omp parallel for schedule(static) if (!omp_in_parallel() && (double)K * N > 1e6))
        for (int s = 0; s < nstrips; s++) {
            int nc = N - s * NR < NR ? N - s * NR : NR;
            pack_b(d + (size_t)s * kq * NR, (size_t)kq * NR, B, ldb, transB, pc, kc, s * NR, nc);
        }
    }
}

void gemm_bf16_packed(int transA, int M, int N, int K, float alpha, const float *A, int lda,
                      const uint32_t *bp, float beta, float *C, int ldc) {
    bf16_run(transA, 0, M, N, K, alpha, A, lda, NULL, 0, bp, beta, C, ldc);
}

/* ---- convolution columns packed straight from the padded images ---------
 * matmul.c's gemm_im2col under GEMM_BF16. Row k = (c, i, j) of the im2col
 * matrix (K x N, N = B Ho Wo output pixels) is tap (i, j) of channel c at
 * every output pixel; two rows at a time go straight into
 * gemm_bf16_pack_b's layout (one word per column: the pair's two taps),
 * read from the zero-padded images pimg (B, C, Hp, Wp). Without it bf16
 * convolutions built the fp32 columns first and then packed them: three
 * passes over a matrix 9x the image (47 MB at 320 channels, 64x64). The
 * product reads the words as gemm_bf16_pack_b's (bpre): the bits of
 * gemm_bf16 on the columns. */
void gemm_bf16_im2col(int M, float alpha, const float *A, int lda, const float *pimg,
                      int B, int C, int Hp, int Wp, int kh, int kw, int stride, int Ho, int Wo,
                      uint32_t *buf, float beta, float *Cm, int ldc) {
    int K = C * kh * kw, N = B * Ho * Wo, kb = k_block(K), npad = round_up(N, NR);
    size_t plane = (size_t)C * Hp * Wp;
    OMP(omp parallel for schedule(static) if (!omp_in_parallel() && (double)K * N >= 65536.0))
    for (int st = 0; st < npad / NR; st++) {
        /* the strip's columns as runs along one output row: run r covers
         * columns t0[r] .. t0[r] + len[r] of the strip, its first pixel
         * reading src[r] at tap (0, 0, 0), the next ones stride further */
        const float *src[NR];
        int t0[NR], len[NR], nrun = 0;
        for (int t = 0; t < NR;) {
            int n = st * NR + t;
            if (n >= N) break;
            int b = n / (Ho * Wo), oy = n / Wo % Ho, ox = n % Wo;
            int m = Wo - ox < NR - t ? Wo - ox : NR - t;
            if (N - n < m) m = N - n;
            src[nrun] = pimg + (size_t)b * plane + (size_t)oy * stride * Wp + (size_t)ox * stride;
            t0[nrun] = t;
            len[nrun++] = m;
            t += m;
        }
        int used = nrun ? t0[nrun - 1] + len[nrun - 1] : 0;
        int c = 0, i = 0, j = 0;                      /* tap k = (c kh + i) kw + j */
        for (int pc = 0; pc < K; pc += kb) {
            int kc = K - pc < kb ? K - pc : kb, kq = (kc + 1) / 2;
            uint32_t *d = buf + (size_t)(pc / 2) * npad + (size_t)st * kq * NR;
            for (int q = 0; q < kq; q++, d += NR) {
                size_t o0 = ((size_t)c * Hp + i) * Wp + j, o1 = 0;
                if (++j == kw) { j = 0; if (++i == kh) { i = 0; c++; } }
                int has1 = 2 * q + 1 < kc;
                if (has1) {
                    o1 = ((size_t)c * Hp + i) * Wp + j;
                    if (++j == kw) { j = 0; if (++i == kh) { i = 0; c++; } }
                }
                /* word t = (tap k0, tap k1) of column t; the odd block's
                 * last word pairs its tap with 0, as pack_b does */
                for (int r = 0; r < nrun; r++) {
                    const float *s0 = src[r] + o0, *s1 = src[r] + o1;
                    uint32_t *dr = d + t0[r];
                    int m = len[r];
                    if (stride == 1 && has1) {
                        for (int t = 0; t < m; t++) dr[t] = pair(s0[t], s1[t]);
                    } else {
                        for (int t = 0; t < m; t++)
                            dr[t] = pair(s0[(size_t)t * stride], has1 ? s1[(size_t)t * stride] : 0.0f);
                    }
                }
                for (int t = used; t < NR; t++) d[t] = 0;
            }
        }
    }
    bf16_run(0, 0, M, N, K, alpha, A, lda, NULL, 0, buf, beta, Cm, ldc);
}

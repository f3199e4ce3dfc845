/* matmul.c: the one matrix multiply every heavy layer goes through.
 *
 *   C[M x N] = alpha * op(A)[M x K] * op(B)[K x N] + beta * C      (row-major)
 *
 * Blocking, after Goto & van de Geijn ("Anatomy of high-performance matrix
 * multiplication"), in plain C99 that the compiler vectorises, with x86
 * intrinsics for the micro-kernel and the transposing packs where the
 * compiler targets AVX2 or AVX-512 (the shape section below):
 *
 *   for jc in N by NC:                 panel of B columns
 *     for pc in K by KC:               rank-KC update: C += alpha op(A)[:,pc] op(B)[pc,jc]
 *       pack op(B)[pc.., jc..] -> Bp    KC x NC          (L2/L3)
 *       for ic in M by MC:
 *         pack op(A)[ic.., pc..] -> Ap  MC x KC          (L2)
 *         for jr in NC by NR:           Bp strip KC x NR (L1)
 *           for ir in MC by MR:         Ap strip MR x KC
 *             micro-kernel: an MR x NR tile of C held in registers,
 *             acc[i][j] += a[p][i] * b[p][j],  p = 0 .. kc-1
 *
 * Each level keeps the operand it reuses in the cache that level fits in, so
 * the FMA units are fed from L1 and L2, not from memory. Threads each run
 * this on their own rectangles of C (gemm_tiles).
 *
 * Packing copies op(A) and op(B) into the exact order the micro-kernel reads
 * them, so the four transpose cases differ only in the packing loops, and
 * ragged edges are zero-padded there (the kernel always runs full MR x NR
 * and only the store is clipped). A B that does not change can be packed
 * once (gemm_pack_b, at the end).
 *
 * Determinism: threads split only the output tiles; every C element is
 * summed over p in the same order (K blocks of KC, in sequence, each summed
 * p = 0..kc-1) whatever the thread count, so results are bit-identical with
 * 1 or 64 threads. K is never split across threads. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include "nn.h"

#ifdef _OPENMP
#include <omp.h>
#define OMP(x) _Pragma(#x)
#else
#define OMP(x)
#endif

/* The micro-kernel's j loop must be vectorised as a loop (12 accumulator
 * registers); left alone, gcc unrolls it early and then vectorises across p
 * as an in-order reduction, 30x slower. `omp simd` says so under OpenMP;
 * without it, forbidding the early unroll has the same effect on gcc and
 * clang. */
#if defined(_OPENMP)
#define SIMD_LOOP _Pragma("omp simd")
#elif defined(__GNUC__)
#define SIMD_LOOP _Pragma("GCC unroll 1")
#else
#define SIMD_LOOP
#endif

/* a*b + c, fused where the hardware has FMA (FP_FAST_FMAF is C99's way of
 * saying fmaf is as fast as a multiply-add); otherwise a plain multiply-add.
 * -std=c99 turns off gcc's automatic contraction, so without this the
 * kernel would issue separate mul and add at half the FMA rate. */
#ifdef FP_FAST_FMAF
#define MADD(a, b, c) fmaf((a), (b), (c))
#else
#define MADD(a, b, c) ((a) * (b) + (c))
#endif

/* ---- the micro-kernel's shape ------------------------------------------
 * An MR x NR tile of C lives in registers while the kernel runs down K, so
 * the tile is chosen from the vector registers the compiler targets (its
 * predefined macros): NR a whole number of vectors, MR rows so that the
 * MR * NR / lanes accumulators, the NR / lanes B vectors and one broadcast
 * A value fill the register file without spilling. Each step p then does
 * MR * NR / lanes FMAs for NR / lanes vector loads and MR broadcasts.
 *
 *   AVX-512 (32 zmm, 16 lanes): 12 x 32 = 24 accumulators + 2 B + 1 A
 *   AVX2+FMA (16 ymm, 8 lanes):  6 x 16 = 12 accumulators + 2 B + 1 A
 *   portable C (any other target, NEON's 32 q registers included, or
 *     SDLORA_GEMM_PORTABLE defined): 6 x 16, vectorised by the compiler
 * (SDLORA_GEMM_NO_AVX512 skips the first; tests/test_matmul_portable.c and
 * test_matmul_avx2.c build those paths on any x86 machine.)
 *
 * The two x86 kernels use intrinsics, because the plain loop is vectorised
 * at the compiler's preferred width (gcc prefers 256-bit on Intel's AVX-512
 * parts), which halves the FMA rate there. Every path sums each C element
 * over p in the same order, so which one is built changes the last bits of
 * C (FMA versus multiply-add on the portable path), never the determinism.
 *
 * Cache blocking (KC, MC, NC): the B strip (KC x NR) is reused by every A
 * strip of the MC x KC block, the A block by every strip of the KC x NC
 * panel. AVX-512: B strip 48 KB (read from L2 as often as from L1), A block
 * 288 KB (L2); on Zen 4 (32 KB L1d, 1 MB L2) KC = 384 and 512 ran within
 * the machine's noise of each other, KC = 256 slower. The other paths keep
 * the sizes measured on Zen 3 (notes on the last branch). */
#if defined(__AVX512F__) && !defined(SDLORA_GEMM_PORTABLE) && !defined(SDLORA_GEMM_NO_AVX512)
#include <immintrin.h>
#define GEMM_AVX512 1
#define MR 12
#define NR 32
#define KC 384
#define MC_MAX 192
#define NC_MAX 1024
#elif defined(__AVX2__) && defined(__FMA__) && !defined(SDLORA_GEMM_PORTABLE)
#include <immintrin.h>
#define GEMM_AVX2 1
#define MR 6
#define NR 16
#define KC 512
#define MC_MAX 96
#define NC_MAX 768
#else
#define MR 6
#define NR 16
#define KC 512          /* Bp strip KC x NR = 32 KB, Ap strip MR x KC = 12 KB */
#define MC_MAX 96       /* Ap block MC x KC = 192 KB: fits a 512 KB L2      */
#define NC_MAX 768      /* Bp panel KC x NC = 1.5 MB: 4096 measured 10-20% slower */
#endif

/* a B panel up to this many floats (256 KB) is read from L2 */
#define SMALL_PANEL 65536

/* below this many multiply-adds packing and threads cost more than they save */
#define SMALL_WORK 32768.0

static int round_up(int x, int m) { return (x + m - 1) / m * m; }

/* ---- packing ------------------------------------------------------------ */

/* Hints to start fetching memory before it is used: PREFETCH_W for the C
 * tile while the k loop runs (C is often far larger than the caches, and
 * its rows are one miss each every time a tile is updated), PREFETCH_R for
 * the packs' source rows. No-ops where the compiler has no such builtin; a
 * prefetch never faults, so it may point past an array's end. */
#if defined(__GNUC__)
#define PREFETCH_W(p) __builtin_prefetch((p), 1, 3)
#define PREFETCH_R(p) __builtin_prefetch((p), 0, 3)
#else
#define PREFETCH_W(p) ((void)(p))
#define PREFETCH_R(p) ((void)(p))
#endif
/* floats ahead: two PB blocks (measured 32, 64, 128 on Zen 4, within noise) */
#ifndef PF
#define PF 32
#endif

/* transposing packs read this many consecutive floats (a cache line) from
 * each source row before moving to the next row */
#define PB 16

/* d[p * ldd + i] = r[i][p] for i < nrows, pb <= p < pe: a block of the
 * transposing packs. On x86 builds, 8 x 8 blocks (then 4 x 4) are
 * transposed in registers (8 row loads, 24 shuffles, 8 stores for 64
 * floats, against 64 scalar loads and stores), the rest element by element. */
static void transpose_rows(float *restrict d, int ldd, const float *const *r, int nrows,
                           int pb, int pe) {
    int i = 0;
    /* the rows are often in memory (a layer's weights), and many row
     * streams at once are more than the hardware prefetcher follows: ask
     * for each row's line PF floats ahead */
    for (int k = 0; k < nrows; k++) PREFETCH_R(r[k] + pe + PF);
#if defined(GEMM_AVX512) || defined(GEMM_AVX2)
    for (; i + 8 <= nrows; i += 8) {
        int p = pb;
        for (; p + 8 <= pe; p += 8) {
            __m256 r0 = _mm256_loadu_ps(r[i] + p), r1 = _mm256_loadu_ps(r[i + 1] + p);
            __m256 r2 = _mm256_loadu_ps(r[i + 2] + p), r3 = _mm256_loadu_ps(r[i + 3] + p);
            __m256 r4 = _mm256_loadu_ps(r[i + 4] + p), r5 = _mm256_loadu_ps(r[i + 5] + p);
            __m256 r6 = _mm256_loadu_ps(r[i + 6] + p), r7 = _mm256_loadu_ps(r[i + 7] + p);
            /* pairs of rows interleaved, then quads, then the 128-bit halves */
            __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
            __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
            __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
            __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
            __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
            __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
            __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
            __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
            float *o = d + (size_t)p * ldd + i;
            _mm256_storeu_ps(o, _mm256_permute2f128_ps(u0, u4, 0x20));
            _mm256_storeu_ps(o + ldd, _mm256_permute2f128_ps(u1, u5, 0x20));
            _mm256_storeu_ps(o + 2 * ldd, _mm256_permute2f128_ps(u2, u6, 0x20));
            _mm256_storeu_ps(o + 3 * ldd, _mm256_permute2f128_ps(u3, u7, 0x20));
            _mm256_storeu_ps(o + 4 * ldd, _mm256_permute2f128_ps(u0, u4, 0x31));
            _mm256_storeu_ps(o + 5 * ldd, _mm256_permute2f128_ps(u1, u5, 0x31));
            _mm256_storeu_ps(o + 6 * ldd, _mm256_permute2f128_ps(u2, u6, 0x31));
            _mm256_storeu_ps(o + 7 * ldd, _mm256_permute2f128_ps(u3, u7, 0x31));
        }
        for (int k = i; k < i + 8; k++)
            for (int q = p; q < pe; q++) d[(size_t)q * ldd + k] = r[k][q];
    }
    /* 4 rows left (MR = 12, 6): 4 x 4 blocks */
    for (; i + 4 <= nrows; i += 4) {
        int p = pb;
        for (; p + 4 <= pe; p += 4) {
            __m128 r0 = _mm_loadu_ps(r[i] + p), r1 = _mm_loadu_ps(r[i + 1] + p);
            __m128 r2 = _mm_loadu_ps(r[i + 2] + p), r3 = _mm_loadu_ps(r[i + 3] + p);
            _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
            float *o = d + (size_t)p * ldd + i;
            _mm_storeu_ps(o, r0);
            _mm_storeu_ps(o + ldd, r1);
            _mm_storeu_ps(o + 2 * ldd, r2);
            _mm_storeu_ps(o + 3 * ldd, r3);
        }
        for (int k = i; k < i + 4; k++)
            for (int q = p; q < pe; q++) d[(size_t)q * ldd + k] = r[k][q];
    }
#endif
    for (; i < nrows; i++)
        for (int p = pb; p < pe; p++) d[(size_t)p * ldd + i] = r[i][p];
}

/* Strips [s0, s1) of op(A)[i0 .. i0+mrows, p0 .. p0+kc] -> dst. Strip s
 * holds rows i0 + s*MR .. +MR at dst + s*KC*MR, laid out dst[p*MR + i];
 * rows past mrows are zero. Each loop walks memory in the order it is
 * stored, so the hardware prefetcher can follow it. */
static void pack_a(float *restrict dst, const float *restrict A, int lda, int transA,
                   int i0, int mrows, int p0, int kc, int s0, int s1) {
    if (!transA) {
        /* A stored M x K: MR row streams per strip, each contiguous in p;
         * missing rows read a valid row and are zeroed after */
        for (int s = s0; s < s1; s++) {
            float *d = dst + (size_t)s * KC * MR;
            int mr = mrows - s * MR < MR ? mrows - s * MR : MR;
            const float *r[MR];
            for (int i = 0; i < MR; i++)
                r[i] = A + (size_t)(i0 + s * MR + (i < mr ? i : 0)) * lda + p0;
            /* PB values of p per row at a time: each row's cache line is
             * used up while it is in L1, even when the MR rows, lda apart,
             * fall in the same L1 set (lda a multiple of 1024 floats) */
            for (int pb = 0; pb < kc; pb += PB) {
                int pe = kc - pb < PB ? kc : pb + PB;
                transpose_rows(d, MR, r, MR, pb, pe);
            }
            if (mr < MR)
                for (int p = 0; p < kc; p++)
                    for (int i = mr; i < MR; i++) d[p * MR + i] = 0.0f;
        }
    } else {
        /* A stored K x M: op(A)[i][p] = A[p][i]; walk each stored row p
         * across all strips of the range */
        for (int p = 0; p < kc; p++) {
            const float *src = A + (size_t)(p0 + p) * lda + i0;
            for (int s = s0; s < s1; s++) {
                float *d = dst + (size_t)s * KC * MR + (size_t)p * MR;
                int mr = mrows - s * MR < MR ? mrows - s * MR : MR;
                if (mr == MR) {            /* constant bounds: one vector copy */
                    for (int i = 0; i < MR; i++) d[i] = src[s * MR + i];
                } else {
                    int i = 0;
                    for (; i < mr; i++) d[i] = src[s * MR + i];
                    for (; i < MR; i++) d[i] = 0.0f;
                }
            }
        }
    }
}

/* Strips [s0, s1) of op(B)[p0 .. p0+kc, j0 .. j0+ncols] -> dst. Strip s
 * holds columns j0 + s*NR .. +NR at dst + s*KC*NR, laid out dst[p*NR + j];
 * columns past ncols are zero. */
static void pack_b(float *restrict dst, size_t sstride, const float *restrict B, int ldb,
                   int transB, int p0, int kc, int j0, int ncols, int s0, int s1) {
    if (!transB) {
        /* B stored K x N: walk each stored row p across the strips */
        for (int p = 0; p < kc; p++) {
            const float *src = B + (size_t)(p0 + p) * ldb + j0;
            for (int s = s0; s < s1; s++) {
                float *d = dst + (size_t)s * sstride + (size_t)p * NR;
                int nr = ncols - s * NR < NR ? ncols - s * NR : NR;
                if (nr == NR) {
                    for (int j = 0; j < NR; j++) d[j] = src[s * NR + j];
                } else {
                    int j = 0;
                    for (; j < nr; j++) d[j] = src[s * NR + j];
                    for (; j < NR; j++) d[j] = 0.0f;
                }
            }
        }
    } else {
        /* B stored N x K (a PyTorch weight, out x in): column j of op(B) is
         * row j of B, contiguous in p; NR row streams per strip */
        for (int s = s0; s < s1; s++) {
            float *d = dst + (size_t)s * sstride;
            int nr = ncols - s * NR < NR ? ncols - s * NR : NR;
            const float *r[NR];
            for (int j = 0; j < NR; j++)
                r[j] = B + (size_t)(j0 + s * NR + (j < nr ? j : 0)) * ldb + p0;
            for (int pb = 0; pb < kc; pb += PB) {   /* as in pack_a */
                int pe = kc - pb < PB ? kc : pb + PB;
                transpose_rows(d, NR, r, NR, pb, pe);
            }
            if (nr < NR)
                for (int p = 0; p < kc; p++)
                    for (int j = nr; j < NR; j++) d[p * NR + j] = 0.0f;
        }
    }
}


/* ---- micro-kernel -------------------------------------------------------
 * acc = sum_p a[p][0..MR) (outer) b[p][0..NR), then
 *   first K block:  C = alpha * acc + beta * C   (beta == 0: C not read)
 *   later K blocks: C = alpha * acc + C
 * Only the mr x nr corner of the tile is stored (ragged edges). */

/* store the tile: full tiles straight from acc, ragged ones clipped; the
 * same float operations either way (no contraction under -std=c99) */
static void store_tile(const float *restrict acc, float *restrict C, int ldc, int mr, int nr,
                       float alpha, float beta) {
    if (beta == 0.0f) {
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < nr; j++) C[(size_t)i * ldc + j] = alpha * acc[i * NR + j];
    } else {
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < nr; j++)
                C[(size_t)i * ldc + j] = alpha * acc[i * NR + j] + beta * C[(size_t)i * ldc + j];
    }
}

#if defined(GEMM_AVX512) || defined(GEMM_AVX2)
/* The accumulators are named variables, one pair per row, written out by
 * ROWS(X) = X(0) .. X(MR-1): an array of vectors would be zeroed by memset
 * and copied through the stack around the k loop. */
#if defined(GEMM_AVX512)
/* 12 rows x 2 zmm; a strip whose live columns fit one vector (N = 40's
 * last 8) runs the one-vector loop: half the FMAs, the same sums */
#define ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define VW 16
#define vec __m512
#define vzero _mm512_setzero_ps
#define vload _mm512_load_ps
#define vloadu _mm512_loadu_ps
#define vstoreu _mm512_storeu_ps
#define vset1 _mm512_set1_ps
#define vfma _mm512_fmadd_ps
#define vmul _mm512_mul_ps
#define vadd _mm512_add_ps
#else
/* 6 rows x 2 ymm */
#define ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define VW 8
#define vec __m256
#define vzero _mm256_setzero_ps
#define vload _mm256_load_ps
#define vloadu _mm256_loadu_ps
#define vstoreu _mm256_storeu_ps
#define vset1 _mm256_set1_ps
#define vfma _mm256_fmadd_ps
#define vmul _mm256_mul_ps
#define vadd _mm256_add_ps
#endif
#define K_DECL(i) vec c##i##0 = vzero(), c##i##1 = vzero();
#define K_FMA2(i) { vec ai = vset1(ap[i]); c##i##0 = vfma(ai, b0, c##i##0); c##i##1 = vfma(ai, b1, c##i##1); }
#define K_FMA1(i) c##i##0 = vfma(vset1(ap[i]), b0, c##i##0);
#define K_ST0(i) vstoreu(C + (size_t)(i) * ldc, vmul(va, c##i##0)); \
                 vstoreu(C + (size_t)(i) * ldc + VW, vmul(va, c##i##1));
#define K_STB(i) vstoreu(C + (size_t)(i) * ldc, vadd(vmul(va, c##i##0), vmul(vb, vloadu(C + (size_t)(i) * ldc)))); \
                 vstoreu(C + (size_t)(i) * ldc + VW, vadd(vmul(va, c##i##1), vmul(vb, vloadu(C + (size_t)(i) * ldc + VW))));
#define K_ACC(i) vstoreu(acc + (i) * NR, c##i##0); vstoreu(acc + (i) * NR + VW, c##i##1);
/* The store step micro_kernel and micro_kernel_rows end with, on the
 * kernel's C, ldc, mr, nr, alpha, beta:
 *   if (mr == MR && nr == NR) { K_STORE_FULL(); return; }
 *   K_STORE_RAGGED(dump)
 * a full tile straight from the accumulators; a ragged one copied out to
 * acc, a row's registers at a time by dump, and clipped by store_tile (the
 * same float operations). The return stays in the kernels: gcc then builds
 * the code it built from their own copies, instruction for instruction. */
#define K_STORE_FULL()                  \
    do {                                \
        vec va = vset1(alpha);          \
        if (beta == 0.0f) {             \
            ROWS(K_ST0)                 \
        } else {                        \
            vec vb = vset1(beta);       \
            ROWS(K_STB)                 \
        }                               \
    } while (0)
#define K_STORE_RAGGED(DUMP) \
    float acc[MR * NR];      \
    ROWS(DUMP)               \
    store_tile(acc, C, ldc, mr, nr, alpha, beta);

static void micro_kernel(int kc, const float *restrict a, const float *restrict b,
                         float *restrict C, int ldc, int mr, int nr,
                         float alpha, float beta) {
    for (int i = 0; i < mr; i++) {
        PREFETCH_W(C + (size_t)i * ldc);
        PREFETCH_W(C + (size_t)i * ldc + nr - 1);
    }
    ROWS(K_DECL)
    if (nr > VW) {
        for (int p = 0; p < kc; p++) {
            vec b0 = vload(b + (size_t)p * NR), b1 = vload(b + (size_t)p * NR + VW);
            const float *ap = a + (size_t)p * MR;
            ROWS(K_FMA2)
        }
    } else {
        for (int p = 0; p < kc; p++) {
            vec b0 = vload(b + (size_t)p * NR);
            const float *ap = a + (size_t)p * MR;
            ROWS(K_FMA1)
        }
    }
    if (mr == MR && nr == NR) {
        K_STORE_FULL();
        return;
    }
    K_STORE_RAGGED(K_ACC)
}
#else
/* plain C: the k loop is outermost and the MR x NR loops have constant
 * bounds, so the compiler unrolls them and keeps acc in registers (see
 * SIMD_LOOP) */
static void micro_kernel(int kc, const float *restrict a, const float *restrict b,
                         float *restrict C, int ldc, int mr, int nr,
                         float alpha, float beta) {
    float acc[MR][NR];
    for (int i = 0; i < mr; i++) {
        PREFETCH_W(C + (size_t)i * ldc);
        PREFETCH_W(C + (size_t)i * ldc + nr - 1);
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = 0.0f;
    for (int p = 0; p < kc; p++) {
        const float *restrict ap = a + p * MR;
        const float *restrict bp = b + p * NR;
        for (int i = 0; i < MR; i++) {
            float ai = ap[i];
            SIMD_LOOP
            for (int j = 0; j < NR; j++) acc[i][j] = MADD(ai, bp[j], acc[i][j]);
        }
    }
    store_tile(&acc[0][0], C, ldc, mr, nr, alpha, beta);
}
#endif

static float *alloc_floats(size_t n);

/* ---- narrow products: A read in place --------------------------------------
 * C (M x N) with N <= 2 NR: the linears of the tiny model's first two
 * levels (32, 64 outputs), the adapters' rank-16 products and their dB =
 * dout^T ax. The blocked path would pack all of op(A) (M x K) for one or
 * two strips of B, so each packed value is used once or twice: the pack
 * cost about what the FMAs did. Here
 * op(B) is packed (K x NR) and each tile's MR rows of op(A) are read where
 * they are (op(A)[i][p] at a[i * rs + p * cs]), broadcast from memory. K is
 * cut into the blocks gemm_serial cuts it into, each summed by the same FMA
 * chain p = 0 .. kc-1 and stored the same way (beta on the first block, 1
 * after), so every C element gets the blocked path's bits. */
#if defined(GEMM_AVX512) || defined(GEMM_AVX2)
/* up to this many strips of B: the tile's rows of A, read once per strip,
 * are still in L1 for the next one */
#ifndef NARROW_STRIPS
#define NARROW_STRIPS 2
#endif
#define N_RDECL(i) const float *r##i = a + (size_t)((i) < mr ? (i) : 0) * rs;
#define N_FMA2(i) { vec ai = vset1(r##i[o]); c##i##0 = vfma(ai, b0, c##i##0); c##i##1 = vfma(ai, b1, c##i##1); }
#define N_FMA1(i) c##i##0 = vfma(vset1(r##i[o]), b0, c##i##0);
#define H_DECL(i) __m256 h##i = _mm256_setzero_ps();
#define H_FMA(i) h##i = _mm256_fmadd_ps(_mm256_set1_ps(r##i[o]), b0, h##i);
#define H_ACC(i) _mm256_storeu_ps(acc + (i) * NR, h##i);

/* micro_kernel with op(A)'s tile read in place (rows past mr read row 0;
 * their sums are not stored) */
static void micro_kernel_rows(int kc, const float *restrict a, size_t rs, size_t cs,
                              const float *restrict b, float *restrict C, int ldc, int mr, int nr,
                              float alpha, float beta) {
    ROWS(N_RDECL)
#if defined(GEMM_AVX512)
    if (nr <= 8) {
        /* at most 8 live columns (attention's 8-wide heads): 256-bit FMAs,
         * which Zen 4 issues two per cycle against one 512-bit; the same
         * sums per column */
        ROWS(H_DECL)
        for (int p = 0; p < kc; p++) {
            size_t o = (size_t)p * cs;
            __m256 b0 = _mm256_load_ps(b + (size_t)p * NR);
            ROWS(H_FMA)
        }
        K_STORE_RAGGED(H_ACC)
        return;
    }
#endif
    ROWS(K_DECL)
    if (nr > VW) {
        for (int p = 0; p < kc; p++) {
            size_t o = (size_t)p * cs;
            vec b0 = vload(b + (size_t)p * NR), b1 = vload(b + (size_t)p * NR + VW);
            ROWS(N_FMA2)
        }
    } else {
        for (int p = 0; p < kc; p++) {
            size_t o = (size_t)p * cs;
            vec b0 = vload(b + (size_t)p * NR);
            ROWS(N_FMA1)
        }
    }
    if (mr == MR && nr == NR) {
        K_STORE_FULL();
        return;
    }
    K_STORE_RAGGED(K_ACC)
}

/* returns 0 (nothing done) where it does not apply */
static int gemm_narrow(int transA, int transB, int M, int N, int K,
                       float alpha, const float *A, int lda, const float *B, int ldb,
                       float beta, float *C, int ldc) {
    if (N > NARROW_STRIPS * NR) return 0;
    int nkb = (K + KC - 1) / KC, kb = (K + nkb - 1) / nkb;   /* as gemm_serial */
    int npad = round_up(N, NR), nstrips = npad / NR;
    /* gemm_buffer: grow-only and kept (SD1.5's dB packs K = 4096 B tokens
     * x 32: 0.5 MB a call), its own per thread inside a parallel region */
    float *bp = gemm_buffer((size_t)K * npad * sizeof(float));
    if (!bp) return 0;
    /* block pc of op(B) at bp + pc * npad, its strips kc x NR ([p][j]) in turn */
    for (int pc = 0; pc < K; pc += kb) {
        int kc = K - pc < kb ? K - pc : kb;
        pack_b(bp + (size_t)pc * npad, (size_t)kc * NR, B, ldb, transB, pc, kc, 0, N, 0, nstrips);
    }
    size_t rs = transA ? 1 : (size_t)lda, cs = transA ? (size_t)lda : 1;
    int nblk = (M + MR - 1) / MR, nthreads = 1;
#ifdef _OPENMP
    nthreads = omp_in_parallel() ? 1 : omp_get_max_threads();
    /* as gemm_run: a thread needs a few tiles' worth of work */
    while (nthreads > 1 && (double)M * N * K / nthreads < 1e6) nthreads--;
#endif
    OMP(omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1))
    for (int blk = 0; blk < nblk; blk++) {
        int i0 = blk * MR, mr = M - i0 < MR ? M - i0 : MR;
        for (int st = 0; st < nstrips; st++) {
            int j0 = st * NR, nr = N - j0 < NR ? N - j0 : NR;
            for (int pc = 0; pc < K; pc += kb) {
                int kc = K - pc < kb ? K - pc : kb;
                micro_kernel_rows(kc, A + (size_t)i0 * rs + (size_t)pc * cs, rs, cs,
                                  bp + (size_t)pc * npad + (size_t)st * kc * NR,
                                  C + (size_t)i0 * ldc + j0, ldc, mr, nr, alpha, pc == 0 ? beta : 1.0f);
            }
        }
    }
    return 1;
}
#else
static int gemm_narrow(int transA, int transB, int M, int N, int K,
                       float alpha, const float *A, int lda, const float *B, int ldb,
                       float beta, float *C, int ldc) {
    (void)transA; (void)transB; (void)M; (void)N; (void)K; (void)alpha; (void)A; (void)lda;
    (void)B; (void)ldb; (void)beta; (void)C; (void)ldc;
    return 0;   /* the portable kernel's path: packed as usual */
}
#endif

/* ---- small problems: direct loops, no packing, no threads ---------------- */
static void gemm_small(int transA, int transB, int M, int N, int K,
                       float alpha, const float *A, int lda, const float *B, int ldb,
                       float beta, float *C, int ldc) {
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            float s = 0.0f;
            for (int p = 0; p < K; p++) {
                float a = transA ? A[(size_t)p * lda + i] : A[(size_t)i * lda + p];
                float b = transB ? B[(size_t)j * ldb + p] : B[(size_t)p * ldb + j];
                s = MADD(a, b, s);
            }
            float *c = &C[(size_t)i * ldc + j];
            *c = beta == 0.0f ? alpha * s : alpha * s + beta * *c;
        }
}

/* ---- packing buffers ----------------------------------------------------
 * Grow-only, kept between calls so the hot path does not malloc: one for
 * calls made outside any OpenMP parallel region (shared out by thread
 * number), and one per thread for calls made inside one (attention's
 * per-head products), which then run on their one thread. Like nn_scratch,
 * gemm is not for concurrent calls from threads OpenMP does not know about.
 * matmul_bf16.c packs into the same buffers (gemm_buffer). */
static void *g_buf, *t_buf;
static size_t g_buf_n, t_buf_n;
OMP(omp threadprivate(t_buf, t_buf_n))

static float *alloc_floats(size_t n) {
    void *p = NULL;
    /* 64-byte aligned: whole cache lines, aligned vector loads */
    if (posix_memalign(&p, 64, n * sizeof(float)) != 0) return NULL;
    return p;
}

void *gemm_buffer(size_t bytes) {
    int nested = 0;
#ifdef _OPENMP
    nested = omp_in_parallel();
#endif
    void **buf = nested ? &t_buf : &g_buf;
    size_t *have = nested ? &t_buf_n : &g_buf_n;
    if (*have < bytes) {
        free(*buf);
        *buf = alloc_floats((bytes + sizeof(float) - 1) / sizeof(float));
        *have = *buf ? bytes : 0;
    }
    return *buf;
}

/* ---- the blocked path --------------------------------------------------- */

/* per-thread buffer: one B panel (KC x NC) and one A block (MC x KC) */
#define BUF_FLOATS ((size_t)KC * NC_MAX + (size_t)MC_MAX * KC)

/* C[M x N] (+)= alpha op(A) op(B) on one thread, Goto's loop order (top of
 * file). bp and ap are that thread's packing buffers. With bpre (a
 * gemm_pack_b layout, bnpad its padded width, j0 this rectangle's first
 * column) B is already packed and bp is not used. */
static void gemm_serial(int transA, int transB, int M, int N, int K,
                        float alpha, const float *A, int lda, const float *B, int ldb,
                        float beta, float *C, int ldc, float *bp, float *ap,
                        const float *bpre, int bnpad, int j0) {
    /* blocks of equal size in each dimension (K = 640 runs as 320 + 320,
     * not 512 + 128). The K blocking depends on K alone, so the order each
     * C element is summed in does too. */
    int nkb = (K + KC - 1) / KC, kb = (K + nkb - 1) / nkb;
    int nnb = (N + NC_MAX - 1) / NC_MAX, nb = round_up((N + nnb - 1) / nnb, NR);
    int nmb = (M + MC_MAX - 1) / MC_MAX, mb = round_up((M + nmb - 1) / nmb, MR);

    for (int jc = 0; jc < N; jc += nb) {
        int nc = N - jc < nb ? N - jc : nb;
        for (int pc = 0; pc < K; pc += kb) {
            int kc = K - pc < kb ? K - pc : kb;
            float bet = pc == 0 ? beta : 1.0f;        /* beta applies once */
            size_t bstride = (size_t)KC * NR;         /* floats from strip to strip */
            const float *bpan = bp;
            if (bpre) {
                bstride = (size_t)kc * NR;
                bpan = bpre + (size_t)pc * bnpad + (size_t)((j0 + jc) / NR) * bstride;
            } else {
                pack_b(bp, bstride, B, ldb, transB, pc, kc, jc, nc, 0, (nc + NR - 1) / NR);
            }
            for (int ic = 0; ic < M; ic += mb) {
                int mc = M - ic < mb ? M - ic : mb;
                pack_a(ap, A, lda, transA, ic, mc, pc, kc, 0, (mc + MR - 1) / MR);
                if ((size_t)kc * nc <= SMALL_PANEL) {
                    /* short K (attention's Dh = 40): the whole B panel fits
                     * in L2 and storing C costs as much as computing it, so
                     * walk C along its rows, where the prefetcher helps */
                    for (int ir = 0; ir < mc; ir += MR) {
                        int mr = mc - ir < MR ? mc - ir : MR;
                        const float *as = ap + (size_t)(ir / MR) * KC * MR;
                        for (int jr = 0; jr < nc; jr += NR) {
                            int nr = nc - jr < NR ? nc - jr : NR;
                            const float *bs = bpan + (size_t)(jr / NR) * bstride;
                            micro_kernel(kc, as, bs, C + (size_t)(ic + ir) * ldc + jc + jr, ldc,
                                         mr, nr, alpha, bet);
                        }
                    }
                    continue;
                }
                for (int jr = 0; jr < nc; jr += NR) {
                    int nr = nc - jr < NR ? nc - jr : NR;
                    const float *bs = bpan + (size_t)(jr / NR) * bstride;
                    for (int ir = 0; ir < mc; ir += MR) {
                        int mr = mc - ir < MR ? mc - ir : MR;
                        const float *as = ap + (size_t)(ir / MR) * KC * MR;
                        micro_kernel(kc, as, bs, C + (size_t)(ic + ir) * ldc + jc + jr, ldc,
                                     mr, nr, alpha, bet);
                    }
                }
            }
        }
    }
}

/* Threads: C is cut into a gm x gn grid of rectangles (rows in mr
 * multiples, columns in nr multiples), each an independent gemm_serial with
 * its own packing, handed out on demand. No barriers inside, so a thread
 * that loses its core to another process holds up only its own rectangle.
 * A rectangle repacks its rows of A and its columns of B: a gm x gn grid
 * packs K (gn M + gm N) values for M N K multiply-adds. Packing a value
 * costs about what pack_cost multiply-adds do (fp32: 16, one 8-wide FMA
 * pair per cycle against about one float copied), so the packing overhead
 * is ~pack_cost (gn / N + gm / M). More rectangles than threads balance the
 * load (and survive a busy machine), but are only used while they add less
 * than 2% of packing over one rectangle. */
static void choose_grid(int M, int N, int mr, int nr, int tasks, int *gm, int *gn) {
    int mstrips = (M + mr - 1) / mr, nstrips = (N + nr - 1) / nr;
    double best = 1e300;
    *gm = *gn = 1;
    for (int m = 1; m <= tasks && m <= mstrips; m++) {
        int n = (tasks + m - 1) / m;
        if (n > nstrips) continue;
        double cost = (double)n * M + (double)m * N;
        /* on a tie, split M: a thread's B panel then keeps all its
         * strips, and each packed A block is reused across more of them
         * (dW 320 x 320 x 4096 on 2 threads: 160 x 320 each ran 10%
         * faster than 320 x 160) */
        if (cost <= best) { best = cost; *gm = m; *gn = n; }
    }
}

/* the loop both kernels (this file's, matmul_bf16.c's) run their
 * rectangles under; which thread gets which rectangle changes no bit, as
 * each C element is summed by one rectangle alone */
void gemm_tiles(int M, int N, int mr, int nr, int nthreads, double pack_cost,
                gemm_rect_fn rect, const void *job) {
    int mstrips = (M + mr - 1) / mr, nstrips = (N + nr - 1) / nr;
    int gm = 1, gn = 1;
    if (nthreads > 1) {
        double base = pack_cost * (1.0 / N + 1.0 / M);
        for (int f = 4; f >= 1; f /= 2) {
            choose_grid(M, N, mr, nr, f * nthreads, &gm, &gn);
            if (pack_cost * ((double)gn / N + (double)gm / M) - base < 0.02) break;
        }
    }
    OMP(omp parallel for collapse(2) schedule(dynamic) num_threads(nthreads) if (nthreads > 1))
    for (int tm = 0; tm < gm; tm++)
        for (int tn = 0; tn < gn; tn++) {
            int tid = 0;
#ifdef _OPENMP
            tid = omp_get_thread_num();
#endif
            int i0 = (int)((long)mstrips * tm / gm) * mr, i1 = (int)((long)mstrips * (tm + 1) / gm) * mr;
            int j0 = (int)((long)nstrips * tn / gn) * nr, j1 = (int)((long)nstrips * (tn + 1) / gn) * nr;
            if (i1 > M) i1 = M;
            if (j1 > N) j1 = N;
            if (i0 >= i1 || j0 >= j1) continue;
            rect(job, tid, i0, i1, j0, j1);
        }
}

/* one fp32 gemm as gemm_tiles sees it */
typedef struct {
    int transA, transB, K, lda, ldb, ldc, bnpad;
    float alpha, beta;
    const float *A, *B, *bpre;
    float *C, *buf;
} f32_job;

static void f32_rect(const void *job, int tid, int i0, int i1, int j0, int j1) {
    const f32_job *g = job;
    const float *a = g->transA ? g->A + i0 : g->A + (size_t)i0 * g->lda;
    const float *b = g->bpre ? NULL : g->transB ? g->B + (size_t)j0 * g->ldb : g->B + j0;
    float *bp = g->buf + (size_t)tid * BUF_FLOATS;
    gemm_serial(g->transA, g->transB, i1 - i0, j1 - j0, g->K, g->alpha, a, g->lda, b, g->ldb,
                g->beta, g->C + (size_t)i0 * g->ldc + j0, g->ldc, bp, bp + (size_t)KC * NC_MAX,
                g->bpre, g->bnpad, j0);
}

/* ---- B packed once (gemm_pack_b) ------------------------------------------
 * Packed for the compute mode in force when gemm_pack_b is called. fp32:
 * the layout gemm_serial reads: K blocks of kb (as gemm_serial cuts them),
 * block by block; in each, the round_up(N, NR) columns as strips of NR, each
 * strip kc x NR, laid out [p][j], zero past N. Under GEMM_BF16 also
 * matmul_bf16.c's layout (gemm_bf16_pack_b), B rounded once, half the
 * size again: a pack made under either mode serves calls under both
 * (an fp32-only pack under bf16 is unpacked on every call: correct, slow),
 * and B itself is never read again. */
struct gemm_packed_b {
    int K, N, npad, kb;
    float *data;           /* always */
    uint32_t *words;       /* made under GEMM_BF16 */
};

/* op(B)[p][j] out of the packed layout */
static float packed_at(const gemm_packed_b *pb, int p, int j) {
    int pc = p / pb->kb * pb->kb, kc = pb->K - pc < pb->kb ? pb->K - pc : pb->kb;
    return pb->data[(size_t)pc * pb->npad + (size_t)(j / NR) * kc * NR + (size_t)(p - pc) * NR + j % NR];
}

/* gemm_small with B read from the packed layout: the same sums */
static void gemm_small_packed(int transA, int M, int N, int K, float alpha, const float *A, int lda,
                              const gemm_packed_b *pb, float beta, float *C, int ldc) {
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            float s = 0.0f;
            for (int p = 0; p < K; p++) {
                float a = transA ? A[(size_t)p * lda + i] : A[(size_t)i * lda + p];
                s = MADD(a, packed_at(pb, p, j), s);
            }
            float *c = &C[(size_t)i * ldc + j];
            *c = beta == 0.0f ? alpha * s : alpha * s + beta * *c;
        }
}

gemm_packed_b *gemm_pack_b(int transB, int K, int N, const float *B, int ldb) {
    if (K <= 0 || N <= 0) return NULL;
    gemm_packed_b *pb = calloc(1, sizeof *pb);
    if (!pb) return NULL;
    int nkb = (K + KC - 1) / KC;
    pb->K = K;
    pb->N = N;
    pb->npad = round_up(N, NR);
    pb->kb = (K + nkb - 1) / nkb;
    if (gemm_compute() == GEMM_BF16) {
        void *w = NULL;
        if (posix_memalign(&w, 64, gemm_bf16_pack_words(K, N) * sizeof(uint32_t)) != 0) { free(pb); return NULL; }
        pb->words = w;
        gemm_bf16_pack_b(pb->words, transB, K, N, B, ldb);
    }
    pb->data = alloc_floats((size_t)K * pb->npad);
    if (!pb->data) { free(pb->words); free(pb); return NULL; }
    int nstrips = pb->npad / NR;
    /* one K block at a time, its strips split over the threads */
    for (int pc = 0; pc < K; pc += pb->kb) {
        int kc = K - pc < pb->kb ? K - pc : pb->kb;
        float *dst = pb->data + (size_t)pc * pb->npad;
        OMP(omp parallel for schedule(static) if (!omp_in_parallel() && (double)K * N > 1e6))
        for (int s = 0; s < nstrips; s++)
            pack_b(dst, (size_t)kc * NR, B, ldb, transB, pc, kc, 0, N, s, s + 1);
    }
    return pb;
}

void gemm_packed_b_free(gemm_packed_b *pb) {
    if (!pb) return;
    free(pb->data);
    free(pb->words);
    free(pb);
}

/* gemm and gemm_packed: B as given (pb NULL) or packed */
static void gemm_run(int transA, int transB, int M, int N, int K,
                     float alpha, const float *A, int lda, const float *B, int ldb,
                     const gemm_packed_b *pb, float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
    if (gemm_compute() == GEMM_BF16) {
        if (!pb) {
            gemm_bf16(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
            return;
        }
        if (pb->words) {
            gemm_bf16_packed(transA, M, N, K, alpha, A, lda, pb->words, beta, C, ldc);
            return;
        }
        /* packed under fp32 only: unpack it. Correct but slow (a copy per
         * call) */
        float *b = malloc((size_t)K * N * sizeof(float));
        if (b) {
            for (int p = 0; p < K; p++)
                for (int j = 0; j < N; j++) b[(size_t)p * N + j] = packed_at(pb, p, j);
            gemm_bf16(transA, 0, M, N, K, alpha, A, lda, b, N, beta, C, ldc);
            free(b);
            return;
        }
        /* out of memory for that copy: the fp32 sums below */
    }
    if (K <= 0 || alpha == 0.0f) {
        /* C = beta * C: nothing to multiply */
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) {
                float *c = &C[(size_t)i * ldc + j];
                *c = beta == 0.0f ? 0.0f : beta * *c;
            }
        return;
    }
    if ((double)M * N * K < SMALL_WORK) {
        if (pb) gemm_small_packed(transA, M, N, K, alpha, A, lda, pb, beta, C, ldc);
        else gemm_small(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }

    /* narrow products: A not packed (the same sums) */
    if (!pb && gemm_narrow(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)) return;

    int nthreads = 1;
#ifdef _OPENMP
    nthreads = omp_in_parallel() ? 1 : omp_get_max_threads();
    /* a thread needs a few tiles' worth of work to pay for waking it */
    while (nthreads > 1 && (double)M * N * K / nthreads < 1e6) nthreads--;
#endif
    float *buf = gemm_buffer((size_t)nthreads * BUF_FLOATS * sizeof(float));
    if (!buf) {
        /* out of memory for the packing buffers: still give the right answer */
        if (pb) gemm_small_packed(transA, M, N, K, alpha, A, lda, pb, beta, C, ldc);
        else gemm_small(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    f32_job job = {transA, transB, K, lda, ldb, ldc, pb ? pb->npad : 0, alpha, beta,
                   A, B, pb ? pb->data : NULL, C, buf};
    gemm_tiles(M, N, MR, NR, nthreads, 16.0, f32_rect, &job);
}

void gemm(int transA, int transB, int M, int N, int K,
          float alpha, const float *A, int lda, const float *B, int ldb,
          float beta, float *C, int ldc) {
    gemm_run(transA, transB, M, N, K, alpha, A, lda, B, ldb, NULL, beta, C, ldc);
}

void gemm_packed(int transA, int M, float alpha, const float *A, int lda,
                 const gemm_packed_b *B, float beta, float *C, int ldc) {
    gemm_run(transA, 0, M, B->N, B->K, alpha, A, lda, NULL, 0, B, beta, C, ldc);
}

/* ---- convolution columns packed straight from the image -----------------
 * conv2d's forward is out = w * cols, cols (K x N) the im2col columns, K =
 * C kh kw taps, N = B Ho Wo output pixels of all B images side by side. Built
 * as a matrix and then packed, every column entry is written, read and
 * written again, and with few output channels (M = 32) each packed entry is
 * used only M times: that traffic, not the FMAs, set the forward's rate.
 * Here the image is zero-padded once, and then every row k = (c, i, j) of
 * cols is a run of Wo pixels of a padded row per output row, copied straight
 * into gemm_pack_b's layout, which gemm_packed then reads. The product is
 * the same sums in the same order as gemm on the columns. */
int gemm_is_small(int M, int N, int K) { return (double)M * N * K < SMALL_WORK; }

static size_t padded_floats(int B, int C, int H, int W, int pad) {
    return pad > 0 ? (size_t)B * C * (H + 2 * pad) * (W + 2 * pad) : 0;
}

/* the packed columns' floats: gemm_pack_b's fp32 layout, or under GEMM_BF16
 * as many words of matmul_bf16.c's; the padded images come after them */
static size_t im2col_pack_floats(int K, int N) {
    size_t f = (size_t)K * round_up(N, NR), w = gemm_bf16_pack_words(K, N);
    return f > w ? f : w;
}

size_t gemm_im2col_floats(int B, int C, int H, int W, int kh, int kw, int stride, int pad) {
    int Ho = (H + 2 * pad - kh) / stride + 1, Wo = (W + 2 * pad - kw) / stride + 1;
    return im2col_pack_floats(C * kh * kw, B * Ho * Wo) + padded_floats(B, C, H, W, pad) + 16;
}

/* cnt values s[0], s[stride], .. to columns n, n+1, .. of one packed row:
 * column n is at base + (n / NR) * sstride + n % NR. The runs are short
 * (Wo = 16 on the tiny model): gcc would make each copy a memcpy call,
 * which then costs more than the copy itself. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-loop-distribute-patterns")))
#endif
static void put_run(float *restrict base, size_t sstride, int n, const float *restrict s,
                    int cnt, int stride) {
    while (cnt > 0) {
        int t = n % NR, m = NR - t < cnt ? NR - t : cnt;
        float *d = base + (size_t)(n / NR) * sstride + t;
        if (stride == 1) {
            for (int q = 0; q < m; q++) d[q] = s[q];
        } else {
            for (int q = 0; q < m; q++) d[q] = s[(size_t)q * stride];
        }
        s += (size_t)m * stride;
        n += m;
        cnt -= m;
    }
}

/* d[0..m) = s[0], s[stride], ..; the common widths with constant bounds
 * (one or two vector moves each) */
static inline void copy_run(float *restrict d, const float *restrict s, int m, int stride) {
    if (stride != 1) {
        for (int q = 0; q < m; q++) d[q] = s[(size_t)q * stride];
        return;
    }
    switch (m) {
    case 4: for (int q = 0; q < 4; q++) d[q] = s[q]; break;
    case 8: for (int q = 0; q < 8; q++) d[q] = s[q]; break;
    case 16: for (int q = 0; q < 16; q++) d[q] = s[q]; break;
    case 32: for (int q = 0; q < 32; q++) d[q] = s[q]; break;
    default: for (int q = 0; q < m; q++) d[q] = s[q]; break;
    }
}

void gemm_im2col(int M, float alpha, const float *A, int lda,
                 const float *img, int B, int C, int H, int W, int kh, int kw, int stride, int pad,
                 float *buf, float beta, float *Cm, int ldc) {
    int Ho = (H + 2 * pad - kh) / stride + 1, Wo = (W + 2 * pad - kw) / stride + 1;
    int K = C * kh * kw, N = B * Ho * Wo, Hp = H + 2 * pad, Wp = W + 2 * pad;
    if (M <= 0 || N <= 0 || K <= 0) return;
    /* the kernel reads packed B with aligned loads */
    buf = (float *)(((uintptr_t)buf + 63) & ~(uintptr_t)63);
    gemm_packed_b pb;
    int nkb = (K + KC - 1) / KC;
    pb.K = K;
    pb.N = N;
    pb.npad = round_up(N, NR);
    pb.kb = (K + nkb - 1) / nkb;
    pb.data = buf;
    const float *pimg = img;
    if (pad > 0) {
        /* img with pad zeros around each plane: (B, C, Hp, Wp) */
        float *p = buf + im2col_pack_floats(K, N);
        OMP(omp parallel for if (!omp_in_parallel() && padded_floats(B, C, H, W, pad) >= 65536))
        for (int bc = 0; bc < B * C; bc++) {
            float *d = p + (size_t)bc * Hp * Wp;
            const float *s = img + (size_t)bc * H * W;
            for (int x = 0; x < pad * Wp; x++) d[x] = 0.0f;
            for (int y = 0; y < H; y++) {
                float *r = d + (size_t)(y + pad) * Wp;
                for (int x = 0; x < pad; x++) r[x] = 0.0f;
                for (int x = 0; x < W; x++) r[pad + x] = s[(size_t)y * W + x];
                for (int x = pad + W; x < Wp; x++) r[x] = 0.0f;
            }
            for (int x = (pad + H) * Wp; x < Hp * Wp; x++) d[x] = 0.0f;
        }
        pimg = p;
    }
    if (gemm_compute() == GEMM_BF16) {
        /* the same columns, two taps to a word, in matmul_bf16.c's layout */
        gemm_bf16_im2col(M, alpha, A, lda, pimg, B, C, Hp, Wp, kh, kw, stride, Ho, Wo,
                         (uint32_t *)buf, beta, Cm, ldc);
        return;
    }
    size_t plane = (size_t)C * Hp * Wp;          /* one padded image */
    int nstrips = pb.npad / NR;
    if (NR % Wo == 0) {
        /* NR / Wo whole output rows per strip (Wo = 4, 8, 16, 32): each
         * strip is written start to end, kc rows of NR after one another
         * (a stream the hardware follows), each row one short copy per
         * output row, read from the padded image (in L2); threads take
         * whole strips */
        int per = NR / Wo;
        OMP(omp parallel for schedule(static) if (!omp_in_parallel() && (double)K * N >= 65536.0))
        for (int st = 0; st < nstrips; st++) {
            /* output row q of the strip: row oy of image b, or past N */
            const float *src[NR];
            for (int q = 0; q < per; q++) {
                int r = st * per + q, b = r / Ho, oy = r % Ho;
                src[q] = b < B ? pimg + (size_t)b * plane + (size_t)oy * stride * Wp : NULL;
            }
            int c = 0, i = 0, j = 0;                 /* tap k = (c*kh + i)*kw + j */
            for (int pc = 0; pc < K; pc += pb.kb) {
                int kc = K - pc < pb.kb ? K - pc : pb.kb;
                float *d = buf + (size_t)pc * pb.npad + (size_t)st * kc * NR;
                for (int k = pc; k < pc + kc; k++, d += NR) {
                    size_t off = ((size_t)c * Hp + i) * Wp + j;
                    for (int q = 0; q < per; q++) {
                        if (src[q]) copy_run(d + q * Wo, src[q] + off, Wo, stride);
                        else for (int t = 0; t < Wo; t++) d[q * Wo + t] = 0.0f;
                    }
                    if (++j == kw) { j = 0; if (++i == kh) { i = 0; c++; } }
                }
            }
        }
        gemm_run(0, 0, M, N, K, alpha, A, lda, NULL, 0, &pb, beta, Cm, ldc);
        return;
    }
    /* any other Wo: threads take whole rows; a row's strips are NR floats
     * (whole cache lines) kc * NR apart, so no two threads write the same line */
    OMP(omp parallel for schedule(static) if (!omp_in_parallel() && (double)K * N >= 65536.0))
    for (int k = 0; k < K; k++) {
        int c = k / (kh * kw), i = (k / kw) % kh, j = k % kw;
        int pc = k / pb.kb * pb.kb, kc = K - pc < pb.kb ? K - pc : pb.kb;
        size_t sstride = (size_t)kc * NR;
        float *base = buf + (size_t)pc * pb.npad + (size_t)(k - pc) * NR;
        /* tap (c, i, j) of output row oy of image b reads padded row
         * oy*stride + i from column j on, every stride-th pixel */
        const float *s0 = pimg + ((size_t)c * Hp + i) * Wp + j;
        for (int b = 0; b < B; b++)
            for (int oy = 0; oy < Ho; oy++)
                put_run(base, sstride, (b * Ho + oy) * Wo, s0 + (size_t)b * plane + (size_t)oy * stride * Wp,
                        Wo, stride);
        /* columns past N: zero */
        if (N < pb.npad) {
            float *d = base + (size_t)(N / NR) * sstride;
            for (int t = N % NR; t < NR; t++) d[t] = 0.0f;
        }
    }
    gemm_run(0, 0, M, N, K, alpha, A, lda, NULL, 0, &pb, beta, Cm, ldc);
}

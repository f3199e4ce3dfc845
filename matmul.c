/* matmul.c: the one matrix multiply every heavy layer goes through.
 *
 *   C[M x N] = alpha * op(A)[M x K] * op(B)[K x N] + beta * C      (row-major)
 *
 * Blocking, after Goto & van de Geijn ("Anatomy of high-performance matrix
 * multiplication"), all in plain C99 so the compiler vectorises it:
 *
 *   for jc in N by NC:                 panel of B columns
 *     for pc in K by KC:               rank-KC update: C += alpha op(A)[:,pc] op(B)[pc,jc]
 *       pack op(B)[pc.., jc..] -> Bp    KC x NC, shared by the threads (L2/L3)
 *       for each tile (MC rows x a slice of the NC columns), in parallel:
 *         pack op(A)[ic.., pc..] -> Ap  MC x KC, the thread's own (L2)
 *         for jr in slice by NR:        Bp strip KC x NR (L1)
 *           for ir in MC by MR:         Ap strip MR x KC
 *             micro-kernel: an MR x NR tile of C held in registers,
 *             acc[i][j] += a[p][i] * b[p][j],  p = 0 .. kc-1
 *
 * Each level keeps the operand it reuses in the cache that level fits in, so
 * the FMA units are fed from L1 and L2, not from memory.
 *
 * Packing copies op(A) and op(B) into the exact order the micro-kernel reads
 * them, so the four transpose cases differ only in the packing loops, and
 * ragged edges are zero-padded there (the kernel always runs full MR x NR
 * and only the store is clipped).
 *
 * Determinism: threads split only the output tiles; every C element is
 * summed over p in the same order (K blocks of KC, in sequence, each summed
 * p = 0..kc-1) whatever the thread count, so results are bit-identical with
 * 1 or 64 threads. K is never split across threads. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "nn.h"

#ifdef _OPENMP
#include <omp.h>
#define OMP(x) _Pragma(#x)
#else
#define OMP(x)
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

/* Sizes tuned on Zen 3 (32 KB L1d, 512 KB L2): KC = 512 beat 256 and 384 by
 * 10-20%, mostly by touching each C tile half as often.
 * micro-tile: 6 x 16 floats = 12 AVX2 registers of accumulators, plus two
 * for the B row and one for the broadcast A value (16 ymm registers). */
#define MR 6
#define NR 16
#define KC 512          /* Bp strip KC x NR = 32 KB, Ap strip MR x KC = 12 KB */
#define MC_MAX 96       /* Ap block MC x KC = 192 KB: fits a 512 KB L2      */
#define NC_MAX 768      /* Bp panel KC x NC = 1.5 MB: 4096 measured 10-20% slower */

/* below this many multiply-adds packing and threads cost more than they save */
#define SMALL_WORK 32768.0

static int round_up(int x, int m) { return (x + m - 1) / m * m; }

/* ---- packing ------------------------------------------------------------ */

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
            for (int p = 0; p < kc; p++)
                for (int i = 0; i < MR; i++) d[p * MR + i] = r[i][p];
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
                int i = 0;
                for (; i < mr; i++) d[i] = src[s * MR + i];
                for (; i < MR; i++) d[i] = 0.0f;
            }
        }
    }
}

/* Strips [s0, s1) of op(B)[p0 .. p0+kc, j0 .. j0+ncols] -> dst. Strip s
 * holds columns j0 + s*NR .. +NR at dst + s*KC*NR, laid out dst[p*NR + j];
 * columns past ncols are zero. */
static void pack_b(float *restrict dst, const float *restrict B, int ldb, int transB,
                   int p0, int kc, int j0, int ncols, int s0, int s1) {
    if (!transB) {
        /* B stored K x N: walk each stored row p across the strips */
        for (int p = 0; p < kc; p++) {
            const float *src = B + (size_t)(p0 + p) * ldb + j0;
            for (int s = s0; s < s1; s++) {
                float *d = dst + (size_t)s * KC * NR + (size_t)p * NR;
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
            float *d = dst + (size_t)s * KC * NR;
            int nr = ncols - s * NR < NR ? ncols - s * NR : NR;
            const float *r[NR];
            for (int j = 0; j < NR; j++)
                r[j] = B + (size_t)(j0 + s * NR + (j < nr ? j : 0)) * ldb + p0;
            for (int p = 0; p < kc; p++)
                for (int j = 0; j < NR; j++) d[p * NR + j] = r[j][p];
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
 * The k loop is outermost and the MR x NR loops have constant bounds, so
 * gcc unrolls them and keeps acc in registers. The `omp simd` on the j loop
 * matters: without it gcc vectorises across p instead and spills acc to the
 * stack (builds without OpenMP get that slower code, still correct). */
static void micro_kernel(int kc, const float *restrict a, const float *restrict b,
                         float *restrict C, int ldc, int mr, int nr,
                         float alpha, float beta) {
    float acc[MR][NR];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = 0.0f;
    for (int p = 0; p < kc; p++) {
        const float *restrict ap = a + p * MR;
        const float *restrict bp = b + p * NR;
        for (int i = 0; i < MR; i++) {
            float ai = ap[i];
            OMP(omp simd)
            for (int j = 0; j < NR; j++) acc[i][j] = MADD(ai, bp[j], acc[i][j]);
        }
    }
    if (mr == MR && nr == NR) {
        if (beta == 0.0f) {
            for (int i = 0; i < MR; i++)
                for (int j = 0; j < NR; j++) C[(size_t)i * ldc + j] = alpha * acc[i][j];
        } else {
            for (int i = 0; i < MR; i++)
                for (int j = 0; j < NR; j++)
                    C[(size_t)i * ldc + j] = alpha * acc[i][j] + beta * C[(size_t)i * ldc + j];
        }
    } else {
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < nr; j++) {
                float *c = &C[(size_t)i * ldc + j];
                *c = beta == 0.0f ? alpha * acc[i][j] : alpha * acc[i][j] + beta * *c;
            }
    }
}

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
 * Grow-only, kept between calls so the hot path does not malloc. A call
 * made from inside someone else's parallel region gets private buffers. */
static float *g_buf;
static size_t g_buf_n;

static float *alloc_floats(size_t n) {
    void *p = NULL;
    /* 64-byte aligned: whole cache lines, aligned vector loads */
    if (posix_memalign(&p, 64, n * sizeof(float)) != 0) return NULL;
    return p;
}

/* ---- the blocked path --------------------------------------------------- */

/* how C is cut into tiles for the threads: MC-row blocks (an even split of
 * M into MR multiples no larger than MC_MAX) by column slices of the panel
 * (NR multiples), with enough tiles to keep every thread busy. Only which
 * thread writes which part of C depends on this, never the sum order. */
typedef struct { int mc, nmb, ns, nnb; } tiling_t;

static tiling_t make_tiling(int M, int nc, int nthreads) {
    tiling_t t;
    t.nmb = (M + MC_MAX - 1) / MC_MAX;
    t.mc = round_up((M + t.nmb - 1) / t.nmb, MR);
    t.nmb = (M + t.mc - 1) / t.mc;
    t.nnb = 1;
    while (t.nmb * t.nnb < 4 * nthreads && nc / (2 * t.nnb) >= 8 * NR) t.nnb *= 2;
    t.ns = round_up((nc + t.nnb - 1) / t.nnb, NR);
    t.nnb = (nc + t.ns - 1) / t.ns;
    return t;
}

/* buf holds the shared B panel (KC x NC) then one MC x KC A block per thread */
static size_t blocked_buf_floats(int N, int nthreads) {
    int nc_max = round_up(N < NC_MAX ? N : NC_MAX, NR);
    return (size_t)KC * nc_max + (size_t)nthreads * MC_MAX * KC;
}

static void gemm_blocked(int transA, int transB, int M, int N, int K,
                         float alpha, const float *A, int lda, const float *B, int ldb,
                         float beta, float *C, int ldc, float *buf, int nthreads) {
    /* N panels of equal width too (N = 1024 as 512 + 512, not 768 + 256) */
    int npanel = (N + NC_MAX - 1) / NC_MAX;
    int ncb = round_up((N + npanel - 1) / npanel, NR);
    int nc_max = round_up(N < NC_MAX ? N : NC_MAX, NR);
    float *Bp = buf;
    /* K blocks of equal size (K = 640 runs as 320 + 320, not 512 + 128):
     * depends on K alone, so the summation order does too */
    int nkb = (K + KC - 1) / KC;
    int kb = (K + nkb - 1) / nkb;

    OMP(omp parallel num_threads(nthreads))
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        float *Ap = buf + (size_t)KC * nc_max + (size_t)tid * MC_MAX * KC;
        for (int jc = 0; jc < N; jc += ncb) {
            int nc = N - jc < ncb ? N - jc : ncb;
            int nstrips_b = (nc + NR - 1) / NR;
            tiling_t tl = make_tiling(M, nc, nthreads);
            for (int pc = 0; pc < K; pc += kb) {
                int kc = K - pc < kb ? K - pc : kb;
                float bet = pc == 0 ? beta : 1.0f;    /* beta applies once */

                /* B panel, shared: one contiguous range of strips per thread */
                OMP(omp for schedule(static))
                for (int t = 0; t < nthreads; t++)
                    pack_b(Bp, B, ldb, transB, pc, kc, jc, nc,
                           (int)((long)nstrips_b * t / nthreads),
                           (int)((long)nstrips_b * (t + 1) / nthreads));
                /* implicit barrier: Bp complete */

                /* a thread's consecutive tiles mostly share their row block,
                 * so it packs that A block once and keeps it hot in L2 */
                int packed_tm = -1;
                OMP(omp for collapse(2) schedule(static))
                for (int tm = 0; tm < tl.nmb; tm++)
                    for (int tn = 0; tn < tl.nnb; tn++) {
                        int ib = tm * tl.mc, mrows = M - ib < tl.mc ? M - ib : tl.mc;
                        int jb = tn * tl.ns, je = jb + tl.ns < nc ? jb + tl.ns : nc;
                        if (tm != packed_tm) {
                            pack_a(Ap, A, lda, transA, ib, mrows, pc, kc, 0, (mrows + MR - 1) / MR);
                            packed_tm = tm;
                        }
                        for (int jr = jb; jr < je; jr += NR) {
                            int nr = je - jr < NR ? je - jr : NR;
                            const float *bs = Bp + (size_t)(jr / NR) * KC * NR;
                            for (int ir = 0; ir < mrows; ir += MR) {
                                int mr = mrows - ir < MR ? mrows - ir : MR;
                                const float *as = Ap + (size_t)(ir / MR) * KC * MR;
                                float *c = C + (size_t)(ib + ir) * ldc + jc + jr;
                                micro_kernel(kc, as, bs, c, ldc, mr, nr, alpha, bet);
                            }
                        }
                    }
                /* implicit barrier: Bp free to be repacked */
            }
        }
    }
}

void gemm(int transA, int transB, int M, int N, int K,
          float alpha, const float *A, int lda, const float *B, int ldb,
          float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
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
        gemm_small(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }

    int nested = 0, nthreads = 1;
#ifdef _OPENMP
    nested = omp_in_parallel();
    nthreads = nested ? 1 : omp_get_max_threads();
    /* a thread needs a few tiles' worth of work to pay for waking it */
    while (nthreads > 1 && (double)M * N * K / nthreads < 1e6) nthreads--;
#endif

    size_t need = blocked_buf_floats(N, nthreads);
    float *buf;
    if (nested) {
        buf = alloc_floats(need);
    } else {
        if (g_buf_n < need) {
            free(g_buf);
            g_buf = alloc_floats(need);
            g_buf_n = g_buf ? need : 0;
        }
        buf = g_buf;
    }
    if (!buf) {
        /* out of memory for the packing buffers: still give the right answer */
        gemm_small(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    gemm_blocked(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, buf, nthreads);
    if (nested) free(buf);
}

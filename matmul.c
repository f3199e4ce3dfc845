/* matmul.c: the one matrix multiply every heavy layer goes through.
 *
 *   C[M x N] = alpha * op(A)[M x K] * op(B)[K x N] + beta * C      (row-major)
 *
 * Blocking, after Goto & van de Geijn ("Anatomy of high-performance matrix
 * multiplication"), all in plain C99 so the compiler vectorises it:
 *
 *   for jc in N by NC:              panel of B columns
 *     for pc in K by KC:            rank-KC update: C += alpha * A[:,pc] B[pc,jc]
 *       pack op(B)[pc:pc+KC, jc:jc+NC] -> Bp   (KC x NC, lives in L3)
 *       pack op(A)[ic.., pc:pc+KC]    -> Ap   (rows in MR-strips)
 *       for each tile (MC rows x a slice of the NC columns), in parallel:
 *         for jr in slice by NR:      Bp strip KC x NR   (stays in L1)
 *           for ir in MC by MR:       Ap strip MR x KC   (block stays in L2)
 *             micro-kernel: MR x NR tile of C held in registers,
 *             acc[i][j] += a[p][i] * b[p][j] for p = 0..kc-1
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

/* micro-tile: 6 x 16 floats = 12 AVX2 registers of accumulators, plus two
 * for the B row and one for the broadcast A value (16 ymm registers). */
#define MR 6
#define NR 16
#define KC 256          /* Bp strip KC x NR = 16 KB: half of L1d            */
#define MC_MAX 144      /* Ap block MC x KC = 144 KB: fits a 512 KB L2      */
#define NC_MAX 4096     /* Bp panel KC x NC = 4 MB: in L3                   */
#define MCHUNK 4098     /* rows of A packed at once (multiple of MR), bounds memory */

/* below this many multiply-adds packing and threads cost more than they save */
#define SMALL_WORK 32768.0

static int round_up(int x, int m) { return (x + m - 1) / m * m; }

/* ---- packing ------------------------------------------------------------ */

/* op(A)[i0 .. i0+mr, p0 .. p0+kc] -> dst, MR-strip layout: dst[p*MR + i].
 * rows i >= mr are zero. */
static void pack_a_strip(float *restrict dst, const float *restrict A, int lda, int transA,
                         int i0, int mr, int p0, int kc) {
    if (!transA) {
        /* A stored M x K: row i is contiguous in p */
        for (int i = 0; i < MR; i++) {
            if (i < mr) {
                const float *src = A + (size_t)(i0 + i) * lda + p0;
                for (int p = 0; p < kc; p++) dst[p * MR + i] = src[p];
            } else {
                for (int p = 0; p < kc; p++) dst[p * MR + i] = 0.0f;
            }
        }
    } else {
        /* A stored K x M: op(A)[i][p] = A[p][i], MR contiguous values per p */
        for (int p = 0; p < kc; p++) {
            const float *src = A + (size_t)(p0 + p) * lda + i0;
            int i = 0;
            for (; i < mr; i++) dst[p * MR + i] = src[i];
            for (; i < MR; i++) dst[p * MR + i] = 0.0f;
        }
    }
}

/* op(B)[p0 .. p0+kc, j0 .. j0+nr] -> dst, NR-strip layout: dst[p*NR + j].
 * columns j >= nr are zero. */
static void pack_b_strip(float *restrict dst, const float *restrict B, int ldb, int transB,
                         int p0, int kc, int j0, int nr) {
    if (!transB) {
        /* B stored K x N: NR contiguous values per p */
        for (int p = 0; p < kc; p++) {
            const float *src = B + (size_t)(p0 + p) * ldb + j0;
            if (nr == NR) {
                for (int j = 0; j < NR; j++) dst[p * NR + j] = src[j];
            } else {
                int j = 0;
                for (; j < nr; j++) dst[p * NR + j] = src[j];
                for (; j < NR; j++) dst[p * NR + j] = 0.0f;
            }
        }
    } else {
        /* B stored N x K (a PyTorch weight, out x in): column j of op(B) is
         * row j of B, contiguous in p */
        for (int j = 0; j < NR; j++) {
            if (j < nr) {
                const float *src = B + (size_t)(j0 + j) * ldb + p0;
                for (int p = 0; p < kc; p++) dst[p * NR + j] = src[p];
            } else {
                for (int p = 0; p < kc; p++) dst[p * NR + j] = 0.0f;
            }
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
static void gemm_blocked(int transA, int transB, int M, int N, int K,
                         float alpha, const float *A, int lda, const float *B, int ldb,
                         float beta, float *C, int ldc, float *buf, int nthreads) {
    int nc_max = N < NC_MAX ? round_up(N, NR) : NC_MAX;
    int mchunk = M < MCHUNK ? round_up(M, MR) : MCHUNK;
    float *Bp = buf;                                  /* KC x nc_max */
    float *Ap = buf + (size_t)KC * nc_max;            /* mchunk x KC */

    OMP(omp parallel num_threads(nthreads))
    for (int jc = 0; jc < N; jc += NC_MAX) {
        int nc = N - jc < NC_MAX ? N - jc : NC_MAX;
        int nstrips_b = (nc + NR - 1) / NR;
        for (int pc = 0; pc < K; pc += KC) {
            int kc = K - pc < KC ? K - pc : KC;
            float bet = pc == 0 ? beta : 1.0f;        /* beta applies once */

            /* B panel, shared by all threads */
            OMP(omp for schedule(static))
            for (int s = 0; s < nstrips_b; s++) {
                int j0 = s * NR;
                int nr = nc - j0 < NR ? nc - j0 : NR;
                pack_b_strip(Bp + (size_t)s * KC * NR, B, ldb, transB, pc, kc, jc + j0, nr);
            }
            /* implicit barrier: Bp complete */

            for (int ic0 = 0; ic0 < M; ic0 += mchunk) {
                int mrows = M - ic0 < mchunk ? M - ic0 : mchunk;
                int nstrips_a = (mrows + MR - 1) / MR;
                OMP(omp for schedule(static))
                for (int s = 0; s < nstrips_a; s++) {
                    int i0 = s * MR;
                    int mr = mrows - i0 < MR ? mrows - i0 : MR;
                    pack_a_strip(Ap + (size_t)s * KC * MR, A, lda, transA, ic0 + i0, mr, pc, kc);
                }

                /* tiles: MC rows (even split of the chunk, MR multiple, <= MC_MAX)
                 * by NS columns (even split of the panel, NR multiple); enough
                 * tiles to keep every thread busy. The split is only about
                 * which thread writes which part of C, never about sum order. */
                int nmb = (mrows + MC_MAX - 1) / MC_MAX;
                int mc = round_up((mrows + nmb - 1) / nmb, MR);
                nmb = (mrows + mc - 1) / mc;
                int nnb = 1;
                while (nmb * nnb < 4 * nthreads && nc / (2 * nnb) >= 8 * NR) nnb *= 2;
                int ns = round_up((nc + nnb - 1) / nnb, NR);
                nnb = (nc + ns - 1) / ns;

                OMP(omp for collapse(2) schedule(static))
                for (int tm = 0; tm < nmb; tm++)
                    for (int tn = 0; tn < nnb; tn++) {
                        int ib = tm * mc, ie = ib + mc < mrows ? ib + mc : mrows;
                        int jb = tn * ns, je = jb + ns < nc ? jb + ns : nc;
                        for (int jr = jb; jr < je; jr += NR) {
                            int nr = je - jr < NR ? je - jr : NR;
                            const float *bs = Bp + (size_t)(jr / NR) * KC * NR;
                            for (int ir = ib; ir < ie; ir += MR) {
                                int mr = ie - ir < MR ? ie - ir : MR;
                                const float *as = Ap + (size_t)(ir / MR) * KC * MR;
                                float *c = C + (size_t)(ic0 + ir) * ldc + jc + jr;
                                micro_kernel(kc, as, bs, c, ldc, mr, nr, alpha, bet);
                            }
                        }
                    }
                /* implicit barrier: Ap free to be repacked */
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

    int nc_max = N < NC_MAX ? round_up(N, NR) : NC_MAX;
    int mchunk = M < MCHUNK ? round_up(M, MR) : MCHUNK;
    size_t need = (size_t)KC * nc_max + (size_t)mchunk * KC;

    int nested = 0, nthreads = 1;
#ifdef _OPENMP
    nested = omp_in_parallel();
    nthreads = nested ? 1 : omp_get_max_threads();
    /* a thread needs a few tiles' worth of work to pay for waking it */
    double per_thread = (double)M * N * K / nthreads;
    while (nthreads > 1 && per_thread < 1e6) { nthreads--; per_thread = (double)M * N * K / nthreads; }
#endif

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

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
 * AMX (Intel Sapphire Rapids and later, TDPBF16PS; section "AMX" below
 * for the tile ops and the model of them): a C block of MRA x NR = 32 x 32
 * in four 16 x 16 fp32 tiles, K in steps of 16 pairs. B is pack_b's strip
 * as it stands: 16 of its rows are a B tile (the "VNNI" layout: row q holds
 * the pairs (B[2q][j], B[2q+1][j]), 64 bytes for 16 columns, NR words a
 * row), so a pack (gemm_bf16_pack_b) serves every kernel. A needs rows
 * contiguous in q, so it has its own pack (pack_a_amx):
 *
 *   A strip: a[(q / 16) * 16 * MRA + i * 16 + q % 16]     i < MRA
 *
 * one 32-row x 16-pair block per step, zero past M and in the pairs that
 * fill a K block's last step (its B rows come from a zero-padded copy).
 * The order: per K block (the same blocks as above), per step of 16
 * pairs, an fp32 sum of the even products and one of the odd (one
 * rounding each, denormals in and out as zero), then C += (even + odd).
 * That is not the other kernels' order, so AMX has bits of its own; they
 * do not depend on the thread count either. AUTO uses AMX only after a
 * one-time self-check, the tiles against the model, bit for bit. It has
 * not run on AMX hardware (developed on AMD Zen 4). */
#if defined(__linux__) && defined(__x86_64__)
#define _DEFAULT_SOURCE         /* syscall(): arch_prctl asks Linux for the AMX state */
#include <unistd.h>
#include <sys/syscall.h>
#endif
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
/* the AMX intrinsics: gcc >= 11 or clang >= 12, 64-bit Linux (the OS must
 * grant the tile state) */
#if defined(HAVE_X86_BF16) && defined(__x86_64__) && defined(__linux__) && defined(SYS_arch_prctl) && \
    (defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11)
#include <cpuid.h>
#define HAVE_AMX 1
#endif

#define MR 12
#define NR 32
#define MRA 32          /* the AMX kernel's rows: two 16-row tiles */
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

static int round_up(int x, int m) { return (x + m - 1) / m * m; }

/* ---- kernels ------------------------------------------------------------- */
enum { K_PORTABLE = 0, K_AVX512BF16 = 1, K_SCALAR = 2, K_AMX = 3, K_AMX_MODEL = 4 };
static int g_kernel = -1;          /* -1: not chosen yet */

static int is_amx(int k) { return k == K_AMX || k == K_AMX_MODEL; }

static int cpu_has_avx512bf16(void) {
#ifdef HAVE_X86_BF16
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
#else
    return 0;
#endif
}

/* AMX-TILE and AMX-BF16 (CPUID.(7,0):EDX bits 24, 22), the OS saving the
 * tile state (XCR0 bits 17, 18; xgetbv needs OSXSAVE, CPUID.1:ECX bit 27),
 * and Linux letting this process use it (arch_prctl(ARCH_REQ_XCOMP_PERM,
 * XFEATURE_XTILEDATA) == 0; without it the first tile instruction faults) */
static int cpu_has_amx(void) {
    static int have = -1;
    if (have >= 0) return have;
    have = 0;
#ifdef HAVE_AMX
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d >> 24 & 1) || !(d >> 22 & 1)) return have;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c >> 27 & 1)) return have;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo >> 17 & 3) != 3) return have;
    if (syscall(SYS_arch_prctl, 0x1023L, 18L) != 0) return have;
    have = 1;
#endif
    return have;
}

static int amx_self_check(void);

int gemm_bf16_set_kernel(int k) {
    if (k == GEMM_BF16_AUTO)
        k = cpu_has_amx() && amx_self_check() ? GEMM_BF16_AMX
          : cpu_has_avx512bf16() ? GEMM_BF16_AVX512 : GEMM_BF16_PORTABLE;
    if (k == GEMM_BF16_AVX512 && !cpu_has_avx512bf16()) return 0;
    if (k == GEMM_BF16_AMX && !cpu_has_amx()) return 0;
    switch (k) {
    case GEMM_BF16_PORTABLE: g_kernel = K_PORTABLE; return 1;
    case GEMM_BF16_AVX512: g_kernel = K_AVX512BF16; return 1;
    case GEMM_BF16_SCALAR: g_kernel = K_SCALAR; return 1;
    case GEMM_BF16_AMX: g_kernel = K_AMX; return 1;
    case GEMM_BF16_AMX_MODEL: g_kernel = K_AMX_MODEL; return 1;
    default: return 0;
    }
}

const char *gemm_bf16_kernel_name(void) {
    if (g_kernel < 0) gemm_bf16_set_kernel(GEMM_BF16_AUTO);
    static const char *names[] = {"portable", "avx512bf16", "scalar", "amx", "amx-model"};
    return names[g_kernel];
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
/* `wide` is a constant in each caller below, so each gets its own code:
 * a strip of at most 16 columns (attention's Dh = 40 is a strip of 32 and
 * one of 8) runs half the accumulators and half the work of the full
 * tile; each column's sums are the full tile's, so the bits too */
#define K_DECL(i) __m512 c##i##0 = _mm512_setzero_ps(), c##i##1 = _mm512_setzero_ps();
#define K_DP(i) { __m512bh ai = (__m512bh)_mm512_set1_epi32((int)ap[i]);    \
                  c##i##0 = _mm512_dpbf16_ps(c##i##0, ai, b0);              \
                  if (wide) c##i##1 = _mm512_dpbf16_ps(c##i##1, ai, b1); }
#define K_ST(i) if (i < mr) {                                               \
        float *ci = C + (size_t)(i) * ldc;                                  \
        __m512 v0 = _mm512_mul_ps(va, c##i##0);                             \
        if (beta != 0.0f)                                                   \
            v0 = _mm512_add_ps(v0, _mm512_mul_ps(vb, _mm512_maskz_loadu_ps(m0, ci))); \
        _mm512_mask_storeu_ps(ci, m0, v0);                                  \
        if (wide) {                                                         \
            __m512 v1 = _mm512_mul_ps(va, c##i##1);                         \
            if (beta != 0.0f)                                               \
                v1 = _mm512_add_ps(v1, _mm512_mul_ps(vb, _mm512_maskz_loadu_ps(m1, ci + 16))); \
            _mm512_mask_storeu_ps(ci + 16, m1, v1);                         \
        } }

__attribute__((target("avx512f,avx512bf16"), always_inline))
static inline void avx512bf16_tile(int wide, int kq, const uint32_t *restrict a, const uint32_t *restrict b,
                                   float *restrict C, int ldc, int mr, int nr, float alpha, float beta) {
    for (int i = 0; i < mr; i++) __builtin_prefetch(C + (size_t)i * ldc, 1, 3);
    ROWS(K_DECL)
    for (int q = 0; q < kq; q++) {
        __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + (size_t)q * NR);
        __m512bh b1 = b0;
        if (wide) b1 = (__m512bh)_mm512_loadu_si512(b + (size_t)q * NR + 16);
        const uint32_t *ap = a + (size_t)q * MR;
        ROWS(K_DP)
    }
    __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
    __mmask16 m0 = nr >= 16 ? 0xffff : (__mmask16)((1u << nr) - 1);
    __mmask16 m1 = nr >= 32 ? 0xffff : nr <= 16 ? 0 : (__mmask16)((1u << (nr - 16)) - 1);
    ROWS(K_ST)
}

__attribute__((target("avx512f,avx512bf16")))
static void kernel_avx512bf16(int kq, const uint32_t *restrict a, const uint32_t *restrict b,
                              float *restrict C, int ldc, int mr, int nr, float alpha, float beta) {
    avx512bf16_tile(1, kq, a, b, C, ldc, mr, nr, alpha, beta);
}

__attribute__((target("avx512f,avx512bf16")))
static void kernel_avx512bf16_16(int kq, const uint32_t *restrict a, const uint32_t *restrict b,
                                 float *restrict C, int ldc, int mr, int nr, float alpha, float beta) {
    avx512bf16_tile(0, kq, a, b, C, ldc, mr, nr, alpha, beta);
}
#endif

/* ---- AMX ------------------------------------------------------------------
 * The AMX kernel is written once against this tile op set, which has two
 * implementations: Intel's instructions (amx-tile, amx-bf16) and a model
 * of them in plain C, so that everything but the instructions themselves
 * runs (and is tested) on any CPU. Eight tile registers, all configured as
 * 16 rows of 64 bytes (16 fp32, or 16 words of two bf16):
 *
 *   CFG            load that configuration (LDTILECFG, palette 1); zeroes all tiles
 *   ZERO t         tile t = 0                                   (TILEZERO)
 *   LOAD t, p, s   row r of tile t = the 64 bytes at p + r s    (TILELOADD)
 *   DP c, a, b     c += a b: c 16 x 16 fp32, a 16 rows x 16 pairs,
 *                  b 16 pair-rows x 16 columns                  (TDPBF16PS)
 *   STORE t, p, s  the 64 bytes at p + r s = row r of tile t    (TILESTORED)
 *   RELEASE        tiles back to their init state              (TILERELEASE)
 *
 * TDPBF16PS, as the operation in Intel's SDM (current revision) gives it:
 * for each row m of c, two fp32 sums per column n, one of the even bf16
 * products, one of the odd, over the 16 pairs k in order,
 *
 *   e[n] = fma(a[m][k].lo, b[k][n].lo, e[n]);  o[n] = fma(a[m][k].hi, b[k][n].hi, o[n])
 *
 * then c[m][n] = c[m][n] + (e[n] + o[n]). Every step rounds to nearest
 * even; bf16 and fp32 denormal inputs count as zero (of their sign) and
 * denormal results are flushed to zero; MXCSR is not read. (The older
 * Intrinsics Guide gives a simpler loop, c += even then c += odd pair by
 * pair; the two differ in the last bits. The model follows the SDM; the
 * self-check below keeps a CPU whose tiles do otherwise off this path.) */

/* the model's state: the eight tiles and their shapes */
typedef struct {
    uint8_t rows[8];
    uint16_t colsb[8];
    uint32_t t[8][16 * 16];     /* row r, word w at t[r * 16 + w] */
} tile_model;

/* a denormal fp32 becomes a zero of its sign (DAZ on inputs, FTZ on results) */
static float ftz(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) == 0) u &= 0x80000000u;
    memcpy(&x, &u, 4);
    return x;
}
static float bf_daz(uint32_t h) { return ftz(gemm_bf16_to_float((uint16_t)h)); }
/* c + a b with one rounding: a b (two bf16, 16 significant bits) is exact
 * in double, and rounding c + a b to double then to float is the single
 * rounding to float (both terms have at most 24 significant bits and
 * double has more than 2 x 24 + 2) */
static float fma_ftz(float a, float b, float c) { return ftz((float)((double)a * b + (double)ftz(c))); }
static float add_ftz(float a, float b) { return ftz(ftz(a) + ftz(b)); }

static void tm_cfg(tile_model *x) {
    for (int t = 0; t < 8; t++) { x->rows[t] = 16; x->colsb[t] = 64; }
    memset(x->t, 0, sizeof x->t);
}
static void tm_zero(tile_model *x, int t) { memset(x->t[t], 0, sizeof x->t[t]); }
static void tm_load(tile_model *x, int t, const void *p, size_t stride) {
    for (int r = 0; r < x->rows[t]; r++) memcpy(x->t[t] + r * 16, (const char *)p + r * stride, x->colsb[t]);
}
static void tm_store(const tile_model *x, int t, void *p, size_t stride) {
    for (int r = 0; r < x->rows[t]; r++) memcpy((char *)p + r * stride, x->t[t] + r * 16, x->colsb[t]);
}
static void tm_dp(tile_model *x, int c, int a, int b) {
    int nk = x->colsb[a] / 4, nn = x->colsb[c] / 4;
    for (int m = 0; m < x->rows[c]; m++) {
        float e[16] = {0}, o[16] = {0};
        for (int k = 0; k < nk; k++) {
            uint32_t aw = x->t[a][m * 16 + k];
            float alo = bf_daz(aw & 0xffffu), ahi = bf_daz(aw >> 16);
            for (int n = 0; n < nn; n++) {
                uint32_t bw = x->t[b][k * 16 + n];
                e[n] = fma_ftz(alo, bf_daz(bw & 0xffffu), e[n]);
                o[n] = fma_ftz(ahi, bf_daz(bw >> 16), o[n]);
            }
        }
        for (int n = 0; n < nn; n++) {
            float v;
            memcpy(&v, &x->t[c][m * 16 + n], 4);
            v = add_ftz(v, add_ftz(e[n], o[n]));
            memcpy(&x->t[c][m * 16 + n], &v, 4);
        }
    }
}
#define M_ZERO(t) tm_zero(x, t)
#define M_LOAD(t, p, s) tm_load(x, t, p, s)
#define M_DP(c, a, b) tm_dp(x, c, a, b)
#define M_STORE(t, p, s) tm_store(x, t, p, s)
/* (a compiler barrier: the tile intrinsics' asm tells the compiler it reads
 * a pointer, not the memory behind it, so every store before must be done) */
#ifdef HAVE_AMX
#define MEM_BARRIER() __asm__ volatile("" ::: "memory")
#else
#define MEM_BARRIER() ((void)0)
#endif

#ifdef HAVE_AMX
/* LDTILECFG's 64 bytes: palette, start row, 14 reserved, the bytes per row
 * of tiles 0-15 (16-bit each), their rows (8-bit each) */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((aligned(64))) tile_cfg;
static const tile_cfg amx_cfg = {1, 0, {0}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

__attribute__((target("amx-tile"))) static void th_cfg(void) {
    MEM_BARRIER();
    _tile_loadconfig(&amx_cfg);
}
__attribute__((target("amx-tile"))) static void th_release(void) { _tile_release(); }
#define H_ZERO(t) _tile_zero(t)
#define H_LOAD(t, p, s) _tile_loadd(t, p, s)
#define H_DP(c, a, b) _tile_dpbf16ps(c, a, b)
#define H_STORE(t, p, s) _tile_stored(t, p, s)
#endif

/* The kernel: a 32 x 32 block of C in tiles 0-3 (rows 0-15 / 16-31 x
 * columns 0-15 / 16-31), A in tiles 4, 5 (rows 0-15, 16-31), B in tiles 6,
 * 7 (columns 0-15, 16-31), 16 pairs of K a step. The A strip (pack_a_amx)
 * holds per step the 32 rows of 16 words, 64 bytes a row; the B strip is
 * pack_b's (b[q * NR + j]), 16 of its rows a step at a stride of NR words,
 * the last, partial step from btail (those rows, zero rows below). A block
 * of at most 16 rows or columns skips the tiles it does not need. acc gets
 * the sums, MRA x NR (row stride NR). */
#define TILE_KERNEL(name, attr, ZERO, LOAD, DP, STORE)                                  \
attr static void name(tile_model *x, int kq, const uint32_t *a, const uint32_t *b,      \
                      const uint32_t *btail, float *acc, int mr, int nr) {              \
    int nstep = (kq + 15) / 16, nfull = kq / 16, m2 = mr > 16, n2 = nr > 16;            \
    (void)x;                                                                            \
    MEM_BARRIER();                                                                      \
    ZERO(0); if (n2) ZERO(1);                                                           \
    if (m2) { ZERO(2); if (n2) ZERO(3); }                                               \
    for (int s = 0; s < nstep; s++) {                                                   \
        const uint32_t *as = a + (size_t)s * 16 * MRA;                                  \
        const uint32_t *bs = s < nfull ? b + (size_t)s * 16 * NR : btail;               \
        LOAD(4, as, 64); if (m2) LOAD(5, as + 16 * 16, 64);                             \
        LOAD(6, bs, NR * 4); if (n2) LOAD(7, bs + 16, NR * 4);                          \
        DP(0, 4, 6); if (n2) DP(1, 4, 7);                                               \
        if (m2) { DP(2, 5, 6); if (n2) DP(3, 5, 7); }                                   \
    }                                                                                   \
    STORE(0, acc, NR * 4); if (n2) STORE(1, acc + 16, NR * 4);                          \
    if (m2) { STORE(2, acc + 16 * NR, NR * 4); if (n2) STORE(3, acc + 16 * NR + 16, NR * 4); } \
}

TILE_KERNEL(kernel_amx_model, , M_ZERO, M_LOAD, M_DP, M_STORE)
#ifdef HAVE_AMX
TILE_KERNEL(kernel_amx_hw, __attribute__((target("amx-tile,amx-bf16"), noinline)), H_ZERO, H_LOAD, H_DP, H_STORE)
#endif

/* one TDPBF16PS on 16 x 16 tiles, for tests (nn.h) */
void gemm_bf16_tdp_model(float *c, const uint32_t *a, const uint32_t *b) {
    tile_model xm, *x = &xm;
    tm_cfg(x);
    M_LOAD(0, c, 64);
    M_LOAD(4, a, 64);
    M_LOAD(6, b, 64);
    M_DP(0, 4, 6);
    M_STORE(0, c, 64);
}

#ifdef HAVE_AMX
__attribute__((target("amx-tile,amx-bf16"), noinline))
static void tdp_hw(float *c, const uint32_t *a, const uint32_t *b) {
    th_cfg();
    H_LOAD(0, c, 64);
    H_LOAD(4, a, 64);
    H_LOAD(6, b, 64);
    H_DP(0, 4, 6);
    H_STORE(0, c, 64);
    th_release();
}
#endif

int gemm_bf16_tdp_hw(float *c, const uint32_t *a, const uint32_t *b) {
#ifdef HAVE_AMX
    if (!cpu_has_amx()) return 0;
    tdp_hw(c, a, b);
    return 1;
#else
    (void)c; (void)a; (void)b;
    return 0;
#endif
}

/* one strip of B (kq pairs, bs) against the A strips of an A block (mc
 * rows, kqa pairs apart): C[mc x nr] = alpha * sums + beta * C */
static void amx_strip(int kern, tile_model *x, int kq, const uint32_t *ap, int kqa,
                      const uint32_t *bs, float *C, int ldc, int mc, int nr, float alpha, float beta) {
    uint32_t tail[16 * NR];
    float acc[MRA * NR];
    int nfull = kq / 16, rest = kq % 16;
    if (rest) {     /* the partial last step, padded with zero pairs (x + 0*0 == x) */
        memcpy(tail, bs + (size_t)nfull * 16 * NR, (size_t)rest * NR * sizeof *tail);
        memset(tail + rest * NR, 0, (size_t)(16 - rest) * NR * sizeof *tail);
    }
    for (int ir = 0; ir < mc; ir += MRA) {
        int mr = mc - ir < MRA ? mc - ir : MRA;
        const uint32_t *a = ap + (size_t)(ir / MRA) * kqa * MRA;
#ifdef HAVE_AMX
        if (kern == K_AMX) kernel_amx_hw(x, kq, a, bs, tail, acc, mr, nr);
        else
#endif
        kernel_amx_model(x, kq, a, bs, tail, acc, mr, nr);
        store_tile(acc, C + (size_t)ir * ldc, ldc, mr, nr, alpha, beta);
    }
    (void)kern;
}

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

/* the AMX kernel's A: op(A)[i0 .. i0+mrows, p0 .. p0+kc] -> strips of MRA
 * rows, kqa * MRA words apart; in a strip, per step of 16 pairs, its MRA
 * rows of 16 words (one tile row each): a[(q / 16) * 16 * MRA + i * 16 + q % 16].
 * Rows past the edge, the pad element of an odd kc and the pairs that fill
 * the last step up to 16 are zero. */
static void pack_a_amx(uint32_t *restrict dst, int kqa, const float *restrict A, int lda, int transA,
                       int i0, int mrows, int p0, int kc) {
    int kq = (kc + 1) / 2, kqp = round_up(kq, 16), nstrips = (mrows + MRA - 1) / MRA;
    if (mrows % MRA || kqp != kc / 2)
        for (int s = 0; s < nstrips; s++) memset(dst + (size_t)s * kqa * MRA, 0, (size_t)kqp * MRA * sizeof *dst);
    if (!transA) {
        /* A stored M x K: row by row, each row's pairs in memory order */
        for (int i = 0; i < mrows; i++) {
            const float *r = A + (size_t)(i0 + i) * lda + p0;
            uint32_t *d = dst + (size_t)(i / MRA) * kqa * MRA + (size_t)(i % MRA) * 16;
            for (int q0 = 0; q0 < kc / 2; q0 += 16) {
                int n = kc / 2 - q0 < 16 ? kc / 2 - q0 : 16;
                uint32_t *dq = d + (size_t)q0 * MRA;
                for (int k = 0; k < n; k++) dq[k] = pair(r[2 * (q0 + k)], r[2 * (q0 + k) + 1]);
            }
            if (kc & 1) d[(size_t)(kc / 2 / 16) * 16 * MRA + (kc / 2) % 16] = pair(r[kc - 1], 0.0f);
        }
    } else {
        /* A stored K x M: rows p, p+1 walked along i */
        for (int q = 0; q < kq; q++) {
            const float *r0 = A + (size_t)(p0 + 2 * q) * lda + i0;
            const float *r1 = 2 * q + 1 < kc ? r0 + lda : NULL;
            uint32_t *d = dst + (size_t)(q / 16) * 16 * MRA + q % 16;
            for (int i = 0; i < mrows; i++)
                d[(size_t)(i / MRA) * kqa * MRA + (size_t)(i % MRA) * 16] = pair(r0[i], r1 ? r1[i] : 0.0f);
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

/* one thread's rectangle of C; bp, ap its packing buffers */
static void gemm_serial(int kern, tile_model *x, int transA, int transB, int M, int N, int K,
                        float alpha, const float *A, int lda, const float *B, int ldb,
                        float beta, float *C, int ldc, uint32_t *bp, uint32_t *ap,
                        const uint32_t *bpre, int bnpad, int j0) {
    /* K blocks of equal, even length (K alone decides them: the summation
     * order of each C element does not depend on the rectangle); packed
     * strips are kqs pairs long (the AMX kernel's A strips: MRA rows, kqa
     * pairs, kqs rounded up to whole steps) */
    int amx = is_amx(kern), kb = k_block(K), kqs = kb / 2, kqa = round_up(kqs, 16);
    int nnb = (N + NC_MAX - 1) / NC_MAX, nb = round_up((N + nnb - 1) / nnb, NR);
    int nmb = (M + MC_MAX - 1) / MC_MAX, mb = round_up((M + nmb - 1) / nmb, amx ? MRA : MR);
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
                if (amx) pack_a_amx(ap, kqa, A, lda, transA, ic, mc, pc, kc);
                else pack_a(ap, kqs, A, lda, transA, ic, mc, pc, kc);
                for (int jr = 0; jr < nc; jr += NR) {
                    int nr = nc - jr < NR ? nc - jr : NR;
                    const uint32_t *bs = bpan + (size_t)(jr / NR) * bstride;
                    if (amx) {
                        amx_strip(kern, x, kq, ap, kqa, bs, C + (size_t)ic * ldc + jc + jr, ldc, mc, nr,
                                  alpha, bet);
                        continue;
                    }
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
static float amx_order_sum(int transA, int transB, int i, int j, int pc, int pe,
                           const float *A, int lda, const float *B, int ldb);

static void gemm_bf16_unblocked(int amx, int transA, int transB, int M, int N, int K,
                                float alpha, const float *A, int lda, const float *B, int ldb,
                                float beta, float *C, int ldc) {
    int kb = k_block(K);
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            float *c = &C[(size_t)i * ldc + j];
            for (int pc = 0; pc < K; pc += kb) {
                int pe = K - pc < kb ? K : pc + kb;
                float acc = 0.0f;
                if (amx) acc = amx_order_sum(transA, transB, i, j, pc, pe, A, lda, B, ldb);
                else for (int p = pc; p < pe; p += 2) {
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

/* the AMX kernel's sum of one element over one K block [pc, pe), as the
 * tiles make it: per step of 16 pairs an even and an odd sum, then their
 * sum added to the block's (zero pad pairs change nothing) */
static float amx_order_sum(int transA, int transB, int i, int j, int pc, int pe,
                           const float *A, int lda, const float *B, int ldb) {
    float acc = 0.0f;
    for (int ps = pc; ps < pe; ps += 32) {
        float e = 0.0f, o = 0.0f;
        for (int p = ps; p < pe && p < ps + 32; p += 2) {
            float a0 = transA ? A[(size_t)p * lda + i] : A[(size_t)i * lda + p];
            float b0 = transB ? B[(size_t)j * ldb + p] : B[(size_t)p * ldb + j];
            float a1 = 0.0f, b1 = 0.0f;
            if (p + 1 < pe) {
                a1 = transA ? A[(size_t)(p + 1) * lda + i] : A[(size_t)i * lda + p + 1];
                b1 = transB ? B[(size_t)j * ldb + p + 1] : B[(size_t)(p + 1) * ldb + j];
            }
            e = fma_ftz(bf_daz(rnd(a0)), bf_daz(rnd(b0)), e);
            o = fma_ftz(bf_daz(rnd(a1)), bf_daz(rnd(b1)), o);
        }
        acc = add_ftz(acc, add_ftz(e, o));
    }
    return acc;
}

/* one gemm as gemm_tiles (matmul.c) sees it */
typedef struct {
    int kern, transA, transB, K, lda, ldb, ldc, bnpad;
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
    /* the tile configuration is per thread: loaded here, released at the end */
    tile_model xm, *x = NULL;
    if (g->kern == K_AMX_MODEL) { x = &xm; tm_cfg(x); }
#ifdef HAVE_AMX
    if (g->kern == K_AMX) th_cfg();
#endif
    gemm_serial(g->kern, x, g->transA, g->transB, i1 - i0, j1 - j0, g->K, g->alpha, a, g->lda, b, g->ldb,
                g->beta, g->C + (size_t)i0 * g->ldc + j0, g->ldc, bp, bp + g->bwords,
                g->bpre, g->bnpad, j0);
#ifdef HAVE_AMX
    if (g->kern == K_AMX) th_release();
#endif
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

/* gemm_bf16 and gemm_bf16_packed: B as given (bpre NULL) or packed; kern
 * the kernel (-1: the one chosen, choosing it on first use) */
static void bf16_run_kernel(int kern, int transA, int transB, int M, int N, int K,
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
    if (kern < 0) {
        if (g_kernel < 0) gemm_bf16_set_kernel(GEMM_BF16_AUTO);
        kern = g_kernel;
    }
    int amx = is_amx(kern), mr = amx ? MRA : MR;
    int nthreads = 1;
#ifdef _OPENMP
    nthreads = omp_in_parallel() ? 1 : omp_get_max_threads();
    while (nthreads > 1 && (double)M * N * K / nthreads < 1e6) nthreads--;
#endif
    /* per thread: a B panel (none when B is packed) and an A block, as
     * large as this problem needs */
    size_t kqs = (size_t)k_block(K) / 2, kqa = amx ? (size_t)round_up((int)kqs, 16) : kqs;
    int nbmax = round_up(N, NR) < NC_MAX ? round_up(N, NR) : NC_MAX;
    int mbmax = round_up(M, mr) < MC_MAX ? round_up(M, mr) : MC_MAX;
    size_t bwords = bpre ? 0 : kqs * nbmax, per = bwords + kqa * mbmax;
    /* small problems (the tiny model, LoRA's rank-r products inside
     * attention's threads): packing costs more than it saves; the same
     * sums element by element, also when the buffers cannot be had */
    uint32_t *buf = (double)M * N * K < SMALL_WORK || kern == K_SCALAR ? NULL
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
        gemm_bf16_unblocked(amx, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        free(b);
        return;
    }
    bf16_job job = {kern, transA, transB, K, lda, ldb, ldc, round_up(N, NR), alpha, beta,
                    A, B, bpre, C, buf, per, bwords};
    /* packing a word costs about what 32 bf16 multiply-adds do (a 32-lane
     * pair of dot products per cycle against about one word packed) */
    gemm_tiles(M, N, mr, NR, nthreads, 32.0, bf16_rect, &job);
}

/* the same with the kernel chosen (AUTO on first use) */
static void bf16_run(int transA, int transB, int M, int N, int K,
                     float alpha, const float *A, int lda, const float *B, int ldb,
                     const uint32_t *bpre, float beta, float *C, int ldc) {
    bf16_run_kernel(-1, transA, transB, M, N, K, alpha, A, lda, B, ldb, bpre, beta, C, ldc);
}

void gemm_bf16(int transA, int transB, int M, int N, int K,
               float alpha, const float *A, int lda, const float *B, int ldb,
               float beta, float *C, int ldc) {
    bf16_run(transA, transB, M, N, K, alpha, A, lda, B, ldb, NULL, beta, C, ldc);
}

/* ---- AMX's self-check ------------------------------------------------------
 * Run once, when AUTO would pick AMX: two small products with ragged edges
 * (partial tiles, a partial step, an odd K, several K blocks, both
 * transposes, beta 0 and 1) by the tiles and by the model must agree bit
 * for bit, or AMX is not used. A CPU (or an emulator) whose tiles sum in
 * another order than the model, or a mistake in the tile code that the
 * model cannot show, then costs speed, never a wrong number. */
static int amx_self_check(void) {
    static int result = -1;
    if (result >= 0) return result;
    static const int shapes[2][6] = {{37, 45, 70, 0, 1, 0}, {40, 33, 1100, 1, 0, 1}};   /* M N K tA tB beta */
    int ok = 1;
    uint64_t s = 0x5eed;
    for (int c = 0; c < 2 && ok; c++) {
        int M = shapes[c][0], N = shapes[c][1], K = shapes[c][2];
        float *A = malloc((size_t)M * K * sizeof(float)), *B = malloc((size_t)K * N * sizeof(float));
        float *C0 = malloc((size_t)M * N * sizeof(float)), *C1 = malloc((size_t)M * N * sizeof(float));
        if (!A || !B || !C0 || !C1) ok = 0;
        for (size_t i = 0; ok && i < (size_t)M * K + (size_t)K * N + (size_t)M * N; i++) {
            s = s * 6364136223846793005ULL + 1442695040888963407ULL;
            float v = (float)((double)(s >> 40) / 16777216.0 * 4.0 - 2.0);
            if (i < (size_t)M * K) A[i] = v;
            else if (i < (size_t)M * K + (size_t)K * N) B[i - (size_t)M * K] = v;
            else C0[i - (size_t)M * K - (size_t)K * N] = C1[i - (size_t)M * K - (size_t)K * N] = v;
        }
        if (ok) {
            int ta = shapes[c][3], tb = shapes[c][4];
            float beta = (float)shapes[c][5];
            bf16_run_kernel(K_AMX_MODEL, ta, tb, M, N, K, 0.75f, A, ta ? M : K, B, tb ? K : N, NULL, beta, C0, N);
            bf16_run_kernel(K_AMX, ta, tb, M, N, K, 0.75f, A, ta ? M : K, B, tb ? K : N, NULL, beta, C1, N);
            ok = memcmp(C0, C1, (size_t)M * N * sizeof(float)) == 0;
            if (!ok) fprintf(stderr, "note: AMX bf16 kernel disagrees with its model; using avx512bf16\n");
        }
        free(A); free(B); free(C0); free(C1);
    }
    result = ok;
    return ok;
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

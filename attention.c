/* attention.c: multi-head scaled-dot-product attention, forward and backward.
 *
 * Layout: q (B, Tq, C), k and v (B, Tk, C), C = H * Dh, tokens-major exactly as
 * to_q / to_k / to_v produce them; head h of token t is the Dh columns
 * h*Dh .. h*Dh+Dh-1 of row t. Every per-head matrix product is a gemm on a
 * strided view (row stride C), so no head reshuffling copies are made.
 *
 * Per (b, h), with Q = q_h (Tq x Dh), K = k_h (Tk x Dh), V = v_h (Tk x Dh):
 *   S = Q K^T * scale,  scale = 1/sqrt(Dh)        (Tq x Tk)
 *   causal: S[i][j] = -inf for j > i
 *   P = softmax_j(S)                               (Tq x Tk)
 *   O = P V                                        (Tq x Dh)
 *
 * Tiles. Nothing ever holds the whole Tq x Tk matrix P: the queries are cut
 * into tiles of `rows` consecutive rows (rows * Tk <= ATT_TILE floats, 32
 * rows for a 4096-key self-attention), and a tile's scores, softmax and P V
 * are done while its rows of P sit in the cache (S_t = Q_t K^T, P_t =
 * softmax(S_t), O_t = P_t V). Each row of P is computed exactly as the whole
 * matrix would compute it, so the tiling changes no output bit. For SD1.5
 * at 64x64 latents the untiled P was 64 MiB per head, written and read back
 * three times; a tile is 512 KiB.
 * att (the whole P, B*H*Tq*Tk floats) is optional: with att == NULL the
 * backward recomputes each tile's P from Q and K, one extra Q K^T per head
 * for B*H*Tq*Tk floats of activation memory.
 *
 * Packing. Every tile of a head multiplies by the same K and V; when a head
 * has more than one tile they are packed into gemm's panel layout once per
 * head (gemm_pack_b), not once per tile by gemm itself. gemm_packed gives
 * gemm's bits, so this changes speed only. Under --compute bf16 the packs
 * are rounded to bf16 once, in the bf16 kernel's layout: a tile then
 * packs only its own Q, P or dS. (Before, bf16 attention packed and
 * rounded K and V again on every tile and ran slower than fp32: SD1.5's
 * 4096-token layer, 1 thread, forward 0.48 s against fp32's 0.38 s; now
 * 0.26 s. The other way, its products in fp32 under bf16, would only have
 * matched fp32.)
 *
 * Threading: forward tiles are independent, so threads take whole tiles
 * (gemm runs single-threaded inside a parallel region). Backward sums dK and
 * dV over all the query tiles of a head, so threads take whole heads and walk
 * a head's tiles in order. Either way every number is computed by one thread
 * in a fixed order: results do not depend on the thread count.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "nn.h"
#include "profile.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* floats of one tile of P (and of dP in backward): 512 KiB, an L2's worth */
#define ATT_TILE ((size_t)1 << 17)

static float *attention_scratch(size_t n) {
    float *buf = nn_scratch(n);
    if (buf == NULL) {
        fprintf(stderr, "attention: out of memory asking for %zu floats of scratch\n", n);
        exit(EXIT_FAILURE);
    }
    return buf;
}

/* query rows per tile: as many as fit ATT_TILE with Tk keys, at least 1 */
static int tile_rows(int Tq, int Tk) {
    size_t r = ATT_TILE / (size_t)Tk;
    if (r < 1) r = 1;
    return r < (size_t)Tq ? (int)r : Tq;
}

static int max_threads(void) {
#ifdef _OPENMP
    return omp_in_parallel() ? 1 : omp_get_max_threads();
#else
    return 1;
#endif
}

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* The softmax's row loops, vectorised. A float reduction (max, sum) is a
 * chain the compiler may not reorder, so each keeps LANES independent
 * partial results, one per position j mod LANES, combined in a fixed order
 * at the end: the loops over l then vectorise at any width (16 lanes are one
 * AVX-512 register or two AVX2 ones), and the result depends on n alone,
 * never on the thread count. */
#define LANES 16

/* combine LANES partials pairwise: (0+8, 1+9, ..), then (0+4, ..), .. */
static float lanes_sum(float *s) {
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int l = 0; l < w; l++) s[l] += s[l + w];
    return s[0];
}

/* The max is exact in any order, so no lanes are needed, only leave to
 * reorder: gcc turns `a > b ? a : b` into a vector max only under
 * -ffinite-math-only, or in an `omp simd reduction(max)` loop (without
 * OpenMP the pragma is ignored and the loop stays scalar, same result). */
static float row_max(const float *x, int n) {
    float r = -INFINITY;
#ifdef _OPENMP
    #pragma omp simd reduction(max:r)
#endif
    for (int j = 0; j < n; j++) r = x[j] > r ? x[j] : r;
    return r;
}

/* x[j] = exp(x[j] - m) for j < n; returns their sum */
static float row_exp_sum(float *x, int n, float m) {
    float s[LANES] = {0};
    int j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int l = 0; l < LANES; l++) {
            float e = nn_expf(x[j + l] - m);
            x[j + l] = e;
            s[l] += e;
        }
    for (int l = 0; j + l < n; l++) {
        float e = nn_expf(x[j + l] - m);
        x[j + l] = e;
        s[l] += e;
    }
    return lanes_sum(s);
}

/* sum_j a[j] b[j] (inline: the stubbed assignment 04 leaves it unused) */
static inline float row_dot(const float *a, const float *b, int n) {
    float s[LANES] = {0};
    int j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int l = 0; l < LANES; l++) s[l] += a[j + l] * b[j + l];
    for (int l = 0; j + l < n; l++) s[l] += a[j + l] * b[j + l];
    return lanes_sum(s);
}

/* P (rows x Tk, row stride Tk) = softmax(Q K^T * scale) for query rows
 * i0 .. i0+rows-1 of one head. qh, kh point at the head's first column of
 * row 0; their row stride is C. */
static void attention_probs(float *P, const float *qh, const float *kh, const gemm_packed_b *kp,
                            int i0, int rows, int Tk, int Dh, int C, float scale, int causal) {
    // S = scale * Q_t K^T   (Q_t: rows x Dh, K: Tk x Dh, both with row stride C);
    // kp, when not NULL, is K^T already packed (the same bits)
    if (kp) gemm_packed(0, rows, scale, qh + (size_t)i0 * C, C, kp, 0.0f, P, Tk);
    else gemm(0, 1, rows, Tk, Dh, scale, qh + (size_t)i0 * C, C, kh, C, 0.0f, P, Tk);

    // P[i][j] = exp(S[i][j] - m_i) / sum_j' exp(S[i][j'] - m_i),  m_i = max_j S[i][j]
    // over the unmasked j (j <= i when causal); masked entries are exactly 0.
    // Subtracting the row max keeps every exp() <= 1, so nothing overflows.
    for (int r = 0; r < rows; r++) {
        int i = i0 + r;
        float *row = P + (size_t)r * Tk;
        int n = causal ? (i + 1 < Tk ? i + 1 : Tk) : Tk;   // keys this query sees
        float maxval = row_max(row, n);
        float sum = row_exp_sum(row, n, maxval);
        float inv = 1.0f / sum;   // sum >= 1: the max entry contributes exp(0)
        for (int j = 0; j < n; j++) row[j] *= inv;
        for (int j = n; j < Tk; j++) row[j] = 0.0f;
    }
}

/* frees n packs (NULLs allowed) and the array */
static void free_packs(gemm_packed_b **pk, int n) {
    if (!pk) return;
    for (int i = 0; i < n; i++) gemm_packed_b_free(pk[i]);
    free(pk);
}

void attention_forward(float *out, float *att, const float *q, const float *k, const float *v,
                       int B, int Tq, int Tk, int H, int Dh, int causal) {
    double t0 = prof_begin();
    int C = H * Dh;
    float scale = 1.0f / sqrtf((float)Dh);
    int rows = tile_rows(Tq, Tk), ntiles = (Tq + rows - 1) / rows;
    long nwork = (long)B * H * ntiles;
    int nth = max_threads();
    if (nth > nwork) nth = (int)nwork;
    // without att, each thread keeps one tile of P in the scratch buffer
    float *Pbuf = att ? NULL : attention_scratch((size_t)nth * rows * Tk);

    // Every tile of a head multiplies by the same K^T and V, and gemm would
    // pack them again for each tile (SD1.5's 4096 queries: 128 times, half
    // as much work as the products themselves). With more than one tile per
    // head, all heads' K^T and V are packed once, here, into gemm's panel
    // layout (the size of k and v); NULL when there is one tile or no memory.
    // Under --compute bf16 the packs are bf16 (rounded once, half the size).
    int nheads = B * H;
    gemm_packed_b **pk = NULL;
    if (ntiles > 1) {
        pk = calloc((size_t)2 * nheads, sizeof *pk);
        int npk = max_threads() < nheads ? max_threads() : nheads, ok = pk != NULL;
        if (pk) {
#ifdef _OPENMP
            #pragma omp parallel for schedule(dynamic) num_threads(npk) if (npk > 1)
#endif
            for (int bh = 0; bh < nheads; bh++) {
                size_t off = (size_t)(bh / H) * Tk * C + (size_t)(bh % H) * Dh;
                pk[bh] = gemm_pack_b(1, Dh, Tk, k + off, C);            // K^T: Dh x Tk
                pk[nheads + bh] = gemm_pack_b(0, Tk, Dh, v + off, C);   // V:   Tk x Dh
            }
            for (int i = 0; i < 2 * nheads; i++) ok &= pk[i] != NULL;
        }
        (void)npk;
        if (!ok) { free_packs(pk, 2 * nheads); pk = NULL; }
    }

#ifdef _OPENMP
    #pragma omp parallel for schedule(dynamic) num_threads(nth) if (nth > 1)
#endif
    for (long w = 0; w < nwork; w++) {
        int b = (int)(w / ((long)H * ntiles)), h = (int)(w / ntiles % H), i0 = (int)(w % ntiles) * rows;
        int nr = i0 + rows <= Tq ? rows : Tq - i0;
        const float *qh = q + (size_t)b * Tq * C + (size_t)h * Dh;
        const float *kh = k + (size_t)b * Tk * C + (size_t)h * Dh;
        const float *vh = v + (size_t)b * Tk * C + (size_t)h * Dh;
        float *oh = out + (size_t)b * Tq * C + (size_t)h * Dh;
        float *P = att ? att + ((size_t)b * H + h) * Tq * Tk + (size_t)i0 * Tk
                       : Pbuf + (size_t)thread_id() * rows * Tk;

        const gemm_packed_b *kp = pk ? pk[w / ntiles] : NULL, *vp = pk ? pk[nheads + w / ntiles] : NULL;

        // P_t = softmax(Q_t K^T * scale), masked when causal
        attention_probs(P, qh, kh, kp, i0, nr, Tk, Dh, C, scale, causal);

        // O_t = P_t V   (rows x Tk times Tk x Dh), written at the head's columns
        if (vp) gemm_packed(0, nr, 1.0f, P, Tk, vp, 0.0f, oh + (size_t)i0 * C, C);
        else gemm(0, 0, nr, Dh, Tk, 1.0f, P, Tk, vh, C, 0.0f, oh + (size_t)i0 * C, C);
    }
    free_packs(pk, 2 * nheads);
    prof_end(PROF_ATTN, 0, t0, 4.0 * B * H * Tq * Tk * Dh);
}

void attention_backward(float *dq, float *dk, float *dv, const float *dout,
                        const float *q, const float *k, const float *v, const float *att,
                        int B, int Tq, int Tk, int H, int Dh, int causal) {
    if (dq == NULL && dk == NULL && dv == NULL) return;
    double t0 = prof_begin();
    int C = H * Dh;
    float scale = 1.0f / sqrtf((float)Dh);
    int need_ds = dq != NULL || dk != NULL;   // dS only feeds dQ and dK
    int rows = tile_rows(Tq, Tk);
    int nheads = B * H, nth = max_threads();
    if (nth > nheads) nth = nheads;

    // per thread: a tile of dP/dS when needed, then the recomputed P when att == NULL
    size_t tile = (size_t)rows * Tk;
    size_t per_thread = (need_ds ? tile : 0) + (att ? 0 : tile);
    // With several tiles, dK and dV of a head are summed over its tiles in
    // a dense Tk x Dh buffer each (row stride Dh, not C) and added to dk,
    // dv once at the end: every tile's update then reads and writes 4096 x
    // 40 floats in whole cache lines that stay in L2, not 40 of every 320
    // (a head's columns of k's rows), which went to memory and back on each
    // of the 128 tiles (SD1.5's 4096-token layer, fp32, 2 threads: backward
    // 0.64-0.67 -> 0.48-0.58 s). The sum is dv + (t1 + t2 + ..) for
    // ((dv + t1) + t2) + ..: the same bits when dk and dv arrive zero, as
    // unet.c, vae.c and clip.c pass them (tests/test_attention.c checks
    // the bits against one-tile-at-a-time sums).
    int dense = Tq > rows;
    size_t hd = (size_t)Tk * Dh;
    per_thread += dense ? (dk != NULL) * hd + (dv != NULL) * hd : 0;
    float *scratch = per_thread ? attention_scratch((size_t)nth * per_thread) : NULL;

#ifdef _OPENMP
    #pragma omp parallel for schedule(dynamic) num_threads(nth) if (nth > 1)
#endif
    for (int bh = 0; bh < nheads; bh++) {
        int b = bh / H, h = bh % H;
        float *mine = scratch ? scratch + (size_t)thread_id() * per_thread : NULL;
        float *dS = need_ds ? mine : NULL;
        float *Pbuf = att ? NULL : mine + (need_ds ? tile : 0);
        size_t koff = (size_t)b * Tk * C + (size_t)h * Dh;
        // where this head's dV, dK are summed, and their row stride
        float *dvh = dv ? dv + koff : NULL, *dkh = dk ? dk + koff : NULL;
        int ldd = C;
        if (dense) {
            float *d = mine + (need_ds ? tile : 0) + (att ? 0 : tile);
            if (dv) { dvh = d; memset(dvh, 0, hd * sizeof(float)); d += hd; }
            if (dk) { dkh = d; memset(dkh, 0, hd * sizeof(float)); }
            ldd = Dh;
        }
        const float *kh = k + koff, *vh = v + koff;
        // as in the forward: with several tiles, the operands every tile
        // shares (K^T for the recomputed scores, V^T for dP, K for dQ) are
        // packed once per head (NULL: gemm packs them itself, same bits)
        gemm_packed_b *kT = NULL, *vT = NULL, *kN = NULL;
        if (Tq > rows) {
            if (!att) kT = gemm_pack_b(1, Dh, Tk, kh, C);
            if (need_ds) vT = gemm_pack_b(1, Dh, Tk, vh, C);
            if (dq) kN = gemm_pack_b(0, Tk, Dh, kh, C);
        }
        for (int i0 = 0; i0 < Tq; i0 += rows) {
            int nr = i0 + rows <= Tq ? rows : Tq - i0;
            size_t qoff = ((size_t)b * Tq + i0) * C + (size_t)h * Dh;   // row i0 of the head
            const float *qh = q + qoff;
            const float *doh = dout + qoff;
            const float *P;
            if (att) {
                P = att + ((size_t)b * H + h) * Tq * Tk + (size_t)i0 * Tk;
            } else {
                // recompute P_t = softmax(Q_t K^T * scale) exactly as the forward did
                attention_probs(Pbuf, q + (size_t)b * Tq * C + (size_t)h * Dh, kh, kT, i0, nr,
                                Tk, Dh, C, scale, causal);
                P = Pbuf;
            }

            /* ASSIGNMENT 04 BEGIN: dV, then dP = dO V^T, the softmax backward to dS, then dQ and dK */
            /* ASSIGNMENT 04 STUB: (void)doh; (void)vh; (void)P; (void)dS; (void)qh; (void)dvh; (void)dkh; (void)ldd; */
            // dV += P_t^T dO_t   (Tk x rows times rows x Dh)
            if (dv) gemm(1, 0, Tk, Dh, nr, 1.0f, P, Tk, doh, C, 1.0f, dvh, ldd);

            if (!need_ds) continue;

            // dP_t = dO_t V^T   (rows x Dh times Dh x Tk)
            if (vT) gemm_packed(0, nr, 1.0f, doh, C, vT, 0.0f, dS, Tk);
            else gemm(0, 1, nr, Tk, Dh, 1.0f, doh, C, vh, C, 0.0f, dS, Tk);

            // softmax backward, row by row, in place over dP:
            //   dS[i][j] = P[i][j] * (dP[i][j] - sum_j' dP[i][j'] P[i][j'])
            // masked entries have P == 0, so their dS is 0 and nothing flows
            // back through them.
            for (int i = 0; i < nr; i++) {
                const float *prow = P + (size_t)i * Tk;
                float *drow = dS + (size_t)i * Tk;
                float dot = row_dot(drow, prow, Tk);
                for (int j = 0; j < Tk; j++) drow[j] = prow[j] * (drow[j] - dot);
            }

            // S = scale * Q K^T, so
            //   dQ_t += scale * dS_t K     (rows x Tk times Tk x Dh)
            //   dK   += scale * dS_t^T Q_t (Tk x rows times rows x Dh)
            if (dq && kN) gemm_packed(0, nr, scale, dS, Tk, kN, 1.0f, dq + qoff, C);
            else if (dq) gemm(0, 0, nr, Dh, Tk, scale, dS, Tk, kh, C, 1.0f, dq + qoff, C);
            if (dk) gemm(1, 0, Tk, Dh, nr, scale, dS, Tk, qh, C, 1.0f, dkh, ldd);
            /* ASSIGNMENT 04 END */
        }
        gemm_packed_b_free(kT);
        gemm_packed_b_free(vT);
        gemm_packed_b_free(kN);
        if (dense)   // dv, dk += the head's sums
            for (int j = 0; j < Tk; j++)
                for (int d = 0; d < Dh; d++) {
                    if (dv) dv[koff + (size_t)j * C + d] += dvh[(size_t)j * Dh + d];
                    if (dk) dk[koff + (size_t)j * C + d] += dkh[(size_t)j * Dh + d];
                }
    }
    prof_end(PROF_ATTN, 1, t0, 2.0 * B * H * Tq * Tk * Dh * ((att == NULL) + (dv != NULL) + 2 * need_ds + (dq != NULL) + (dk != NULL)));
}

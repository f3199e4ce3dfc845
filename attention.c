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
 * Memory: P for SD1.5 self-attention at 64x64 latents is 4096 x 4096 floats
 * (64 MiB) per head, times B*H heads. So storing att is optional: with
 * att == NULL the forward keeps P for one head at a time in the scratch
 * buffer and the backward recomputes it, trading one extra Q K^T per head
 * for B*H*Tq*Tk floats of activation memory.
 *
 * Threading: gemm is OpenMP-parallel inside, so the (b, h) loop is serial
 * and only the softmax rows get their own parallel for. Each row is done
 * start to finish by one thread in a fixed order, so results do not depend
 * on the thread count (as long as gemm's do not).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include "nn.h"
#include "profile.h"

static float *attention_scratch(size_t n) {
    float *buf = nn_scratch(n);
    if (buf == NULL) {
        fprintf(stderr, "attention: out of memory asking for %zu floats of scratch\n", n);
        exit(EXIT_FAILURE);
    }
    return buf;
}

/* P (Tq x Tk, row stride Tk) = softmax(Q K^T * scale) for one head.
 * qh, kh point at the head's first column; their row stride is C. */
static void attention_probs(float *P, const float *qh, const float *kh,
                            int Tq, int Tk, int Dh, int C, float scale, int causal) {
    // S = scale * Q K^T   (Q: Tq x Dh, K: Tk x Dh, both with row stride C)
    gemm(0, 1, Tq, Tk, Dh, scale, qh, C, kh, C, 0.0f, P, Tk);

    // P[i][j] = exp(S[i][j] - m_i) / sum_j' exp(S[i][j'] - m_i),  m_i = max_j S[i][j]
    // over the unmasked j (j <= i when causal); masked entries are exactly 0.
    // Subtracting the row max keeps every exp() <= 1, so nothing overflows.
#ifdef _OPENMP
    #pragma omp parallel for if ((size_t)Tq * Tk >= 16384)
#endif
    for (int i = 0; i < Tq; i++) {
        float *row = P + (size_t)i * Tk;
        int n = causal ? (i + 1 < Tk ? i + 1 : Tk) : Tk;   // keys this query sees
        float maxval = -INFINITY;
        for (int j = 0; j < n; j++) {
            if (row[j] > maxval) maxval = row[j];
        }
        float sum = 0.0f;
        for (int j = 0; j < n; j++) {
            row[j] = expf(row[j] - maxval);
            sum += row[j];
        }
        float inv = 1.0f / sum;   // sum >= 1: the max entry contributes exp(0)
        for (int j = 0; j < n; j++) row[j] *= inv;
        for (int j = n; j < Tk; j++) row[j] = 0.0f;
    }
}

void attention_forward(float *out, float *att, const float *q, const float *k, const float *v,
                       int B, int Tq, int Tk, int H, int Dh, int causal) {
    double t0 = prof_begin();
    int C = H * Dh;
    float scale = 1.0f / sqrtf((float)Dh);
    // without att, one head's P lives in the scratch buffer at a time
    float *Pbuf = att ? NULL : attention_scratch((size_t)Tq * Tk);

    for (int b = 0; b < B; b++) {
        for (int h = 0; h < H; h++) {
            const float *qh = q + (size_t)b * Tq * C + (size_t)h * Dh;
            const float *kh = k + (size_t)b * Tk * C + (size_t)h * Dh;
            const float *vh = v + (size_t)b * Tk * C + (size_t)h * Dh;
            float *oh = out + (size_t)b * Tq * C + (size_t)h * Dh;
            float *P = att ? att + ((size_t)b * H + h) * Tq * Tk : Pbuf;

            // P = softmax(Q K^T * scale), masked when causal
            attention_probs(P, qh, kh, Tq, Tk, Dh, C, scale, causal);

            // O = P V   (Tq x Tk times Tk x Dh), written at the head's columns
            gemm(0, 0, Tq, Dh, Tk, 1.0f, P, Tk, vh, C, 0.0f, oh, C);
        }
    }
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

    // scratch: dP/dS (Tq x Tk) when needed, then the recomputed P when att == NULL
    size_t TT = (size_t)Tq * Tk;
    size_t nscratch = (need_ds ? TT : 0) + (att ? 0 : TT);
    float *scratch = nscratch ? attention_scratch(nscratch) : NULL;
    float *dS = need_ds ? scratch : NULL;
    float *Pbuf = att ? NULL : scratch + (need_ds ? TT : 0);

    for (int b = 0; b < B; b++) {
        for (int h = 0; h < H; h++) {
            size_t qoff = (size_t)b * Tq * C + (size_t)h * Dh;
            size_t koff = (size_t)b * Tk * C + (size_t)h * Dh;
            const float *qh = q + qoff, *kh = k + koff, *vh = v + koff;
            const float *doh = dout + qoff;
            const float *P;
            if (att) {
                P = att + ((size_t)b * H + h) * TT;
            } else {
                // recompute P = softmax(Q K^T * scale) exactly as the forward did
                attention_probs(Pbuf, qh, kh, Tq, Tk, Dh, C, scale, causal);
                P = Pbuf;
            }

            /* ASSIGNMENT 04 BEGIN: dV, then dP = dO V^T, the softmax backward to dS, then dQ and dK */
            /* ASSIGNMENT 04 STUB: (void)doh; (void)vh; (void)P; (void)dS; */
            // dV += P^T dO   (Tk x Tq times Tq x Dh)
            if (dv) gemm(1, 0, Tk, Dh, Tq, 1.0f, P, Tk, doh, C, 1.0f, dv + koff, C);

            if (!need_ds) continue;

            // dP = dO V^T   (Tq x Dh times Dh x Tk)
            gemm(0, 1, Tq, Tk, Dh, 1.0f, doh, C, vh, C, 0.0f, dS, Tk);

            // softmax backward, row by row, in place over dP:
            //   dS[i][j] = P[i][j] * (dP[i][j] - sum_j' dP[i][j'] P[i][j'])
            // masked entries have P == 0, so their dS is 0 and nothing flows
            // back through them.
#ifdef _OPENMP
            #pragma omp parallel for if ((size_t)Tq * Tk >= 16384)
#endif
            for (int i = 0; i < Tq; i++) {
                const float *prow = P + (size_t)i * Tk;
                float *drow = dS + (size_t)i * Tk;
                float dot = 0.0f;
                for (int j = 0; j < Tk; j++) dot += drow[j] * prow[j];
                for (int j = 0; j < Tk; j++) drow[j] = prow[j] * (drow[j] - dot);
            }

            // S = scale * Q K^T, so
            //   dQ += scale * dS K     (Tq x Tk times Tk x Dh)
            //   dK += scale * dS^T Q   (Tk x Tq times Tq x Dh)
            if (dq) gemm(0, 0, Tq, Dh, Tk, scale, dS, Tk, kh, C, 1.0f, dq + qoff, C);
            if (dk) gemm(1, 0, Tk, Dh, Tq, scale, dS, Tk, qh, C, 1.0f, dk + koff, C);
            /* ASSIGNMENT 04 END */
        }
    }
    prof_end(PROF_ATTN, 1, t0, 2.0 * B * H * Tq * Tk * Dh * ((att == NULL) + (dv != NULL) + 2 * need_ds + (dq != NULL) + (dk != NULL)));
}

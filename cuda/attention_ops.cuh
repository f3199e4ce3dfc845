// cuda/attention_ops.cuh: the softmax kernels of cuda/attention.cu (the
// products are cuBLAS), as __host__ __device__ per-thread functions of
// (row, thread), and their host twins. One block of NT threads per row of
// P (B*H*Tq rows of Tk), thread tid owning columns tid, tid + NT, ...
#ifndef SDLORA_CUDA_ATTENTION_OPS_CUH
#define SDLORA_CUDA_ATTENTION_OPS_CUH

#include "common.cuh"

/* P[i][j] = exp(S[i][j] - m_i) / sum_j' exp(S[i][j'] - m_i),  m_i = max_j S[i][j]
 * over the n keys row i sees (n = min(i + 1, Tk) when causal, else Tk);
 * masked entries are exactly 0, as attention.c. */
HD int softmax_row_len(int i, int Tk, int causal) { return causal ? (i + 1 < Tk ? i + 1 : Tk) : Tk; }
HD float softmax_partial_max(const float *row, int n, int tid, int nt) {
    float m = -INFINITY;
    for (int j = tid; j < n; j += nt) m = fmaxf(m, row[j]);
    return m;
}
// row[j] = exp(row[j] - m) for the thread's j; returns their sum
HD float softmax_exp_partial(float *row, int n, float m, int tid, int nt) {
    float s = 0.0f;
    for (int j = tid; j < n; j += nt) {
        row[j] = expf(row[j] - m);
        s += row[j];
    }
    return s;
}
// row[j] *= 1 / sum for j < n, 0 for n <= j < Tk
HD void softmax_normalize(float *row, int n, int Tk, float inv, int tid, int nt) {
    for (int j = tid; j < Tk; j += nt) row[j] = j < n ? row[j] * inv : 0.0f;
}

inline void softmax_row_host(float *row, int i, int Tk, int causal) {
    float p[NT];
    int n = softmax_row_len(i, Tk, causal);
    for (int t = 0; t < NT; t++) p[t] = softmax_partial_max(row, n, t, NT);
    float m = host_tree_max(p, NT);
    for (int t = 0; t < NT; t++) p[t] = softmax_exp_partial(row, n, m, t, NT);
    float inv = 1.0f / host_tree_sum(p, NT);
    for (int t = 0; t < NT; t++) softmax_normalize(row, n, Tk, inv, t, NT);
}

/* softmax backward, in place over dP:
 *   dS[i][j] = P[i][j] (dP[i][j] - sum_j' dP[i][j'] P[i][j'])
 * (masked entries have P = 0: their dS is 0) */
HD float softmax_bwd_partial(const float *dp, const float *p, int Tk, int tid, int nt) {
    float s = 0.0f;
    for (int j = tid; j < Tk; j += nt) s += dp[j] * p[j];
    return s;
}
HD void softmax_bwd_apply(float *dp, const float *p, int Tk, float dot, int tid, int nt) {
    for (int j = tid; j < Tk; j += nt) dp[j] = p[j] * (dp[j] - dot);
}
inline void softmax_bwd_row_host(float *dp, const float *p, int Tk) {
    float q[NT];
    for (int t = 0; t < NT; t++) q[t] = softmax_bwd_partial(dp, p, Tk, t, NT);
    float dot = host_tree_sum(q, NT);
    for (int t = 0; t < NT; t++) softmax_bwd_apply(dp, p, Tk, dot, t, NT);
}

#endif

// cuda/nn_ops.cuh: the arithmetic of cuda/nn.cu's kernels, one
// __host__ __device__ function per kernel (of its indices), plus the host
// twin of each reduction kernel (the same partials and the same tree, see
// common.cuh). The formulas are nn.c's; the comments say where the order of
// operations differs from it.
#ifndef SDLORA_CUDA_NN_OPS_CUH
#define SDLORA_CUDA_NN_OPS_CUH

#include <string.h>
#include "common.cuh"

/* ---------------------------------------------------------------------------
 * normalisation statistics, two passes as nn.c's moments(), but in float:
 *   mean = sum x / n,  var = sum (x - mean)^2 / n,  rstd = 1 / sqrt(var + eps)
 * each sum a strided partial per thread, then the tree (nn.c sums in double,
 * in order; the tree keeps the float error near log2(NT) roundings). */

// thread tid's share of sum x[i], i = tid, tid + nt, ... < n
HD float strided_sum(const floatX *x, size_t n, int tid, int nt) {
    float s = 0.0f;
    for (size_t i = (size_t)tid; i < n; i += (size_t)nt) s += ldx(x[i]);
    return s;
}
// thread tid's share of sum (x[i] - mean)^2
HD float strided_sqdev(const floatX *x, size_t n, float mean, int tid, int nt) {
    float s = 0.0f;
    for (size_t i = (size_t)tid; i < n; i += (size_t)nt) {
        float d = ldx(x[i]) - mean;
        s += d * d;
    }
    return s;
}
HD float rstd_of(float var, float eps) { return 1.0f / sqrtf(var + eps); }

inline void moments_host(const floatX *x, size_t n, float eps, float *mean, float *rstd) {
    float p[NT];
    for (int t = 0; t < NT; t++) p[t] = strided_sum(x, n, t, NT);
    float m = host_tree_sum(p, NT) / (float)n;
    for (int t = 0; t < NT; t++) p[t] = strided_sqdev(x, n, m, t, NT);
    float var = host_tree_sum(p, NT) / (float)n;
    *mean = m;
    *rstd = rstd_of(var, eps);
}
#if defined(__CUDACC__)
__device__ inline void block_moments(const floatX *x, size_t n, float eps, float *sh,
                                     float *mean, float *rstd) {
    int t = threadIdx.x;
    float m = block_tree_sum(strided_sum(x, n, t, NT), sh) / (float)n;
    float var = block_tree_sum(strided_sqdev(x, n, m, t, NT), sh) / (float)n;
    *mean = m;
    *rstd = rstd_of(var, eps);
}
#endif

// out = (x - mean) * rstd * w + b   (group norm and layer norm; w = 1, b = 0 when absent)
HD float norm_fwd_elem(float x, float mean, float rstd, float w, float b) {
    return (x - mean) * rstd * w + b;
}
// dx = rstd * (dy w - mean(dxhat) - xhat * mean(dxhat xhat)),  dxhat = dy w
HD float norm_bwd_elem(float dy, float x, float w, float mean, float rstd, float m1, float m2) {
    float xh = (x - mean) * rstd;
    return rstd * (dy * w - m1 - xh * m2);
}

/* group norm backward, one block per (b, g), per channel cc of the group:
 *   sdy = sum_hw dy,  sdy_xh = sum_hw dy * xhat       (strided partials + tree)
 * then over the channels in order: sum_dxh += w_c sdy, sum_dxh_xh += w_c sdy_xh */
HD void gn_bwd_partial(const floatX *x, const floatX *dy, int HW, float mean, float rstd,
                       int tid, int nt, float *sdy, float *sdy_xh) {
    float a = 0.0f, b = 0.0f;
    for (int i = tid; i < HW; i += nt) {
        float d = ldx(dy[i]), xh = (ldx(x[i]) - mean) * rstd;
        a += d;
        b += d * xh;
    }
    *sdy = a;
    *sdy_xh = b;
}

/* group norm's host twins. sums (B, C, 2): per (item, channel) sdy, sdy_xh,
 * which a second kernel folds into dw, db over the batch in order (as nn.c) */
inline void groupnorm_forward_host(floatX *out, float *mean, float *rstd, const floatX *inp,
                                   const float *w, const float *b, int B, int C, int HW, int G, float eps) {
    int Cg = C / G;
    size_t n = (size_t)Cg * HW;
    for (int bg = 0; bg < B * G; bg++) {
        moments_host(inp + bg * n, n, eps, &mean[bg], &rstd[bg]);
        int c0 = (bg % G) * Cg;
        for (size_t i = 0; i < n; i++) {
            int c = c0 + (int)(i / HW);
            out[bg * n + i] = stx(norm_fwd_elem(ldx(inp[bg * n + i]), mean[bg], rstd[bg],
                                                w ? w[c] : 1.0f, b ? b[c] : 0.0f));
        }
    }
}

inline void groupnorm_backward_host(floatX *dinp, float *dw, float *db, const floatX *dout,
                                    const floatX *inp, const float *w, const float *mean,
                                    const float *rstd, int B, int C, int HW, int G, float *sums) {
    int Cg = C / G;
    size_t n = (size_t)Cg * HW;
    float pa[NT], pb[NT];
    for (int bg = 0; bg < B * G; bg++) {
        int bi = bg / G, c0 = (bg % G) * Cg;
        const floatX *x = inp + bg * n, *dy = dout + bg * n;
        float m = mean[bg], rs = rstd[bg], s1 = 0.0f, s2 = 0.0f;
        for (int cc = 0; cc < Cg; cc++) {
            for (int t = 0; t < NT; t++)
                gn_bwd_partial(x + (size_t)cc * HW, dy + (size_t)cc * HW, HW, m, rs, t, NT, &pa[t], &pb[t]);
            float sdy = host_tree_sum(pa, NT), sdy_xh = host_tree_sum(pb, NT);
            float wc = w ? w[c0 + cc] : 1.0f;
            s1 += wc * sdy;
            s2 += wc * sdy_xh;
            sums[((size_t)bi * C + c0 + cc) * 2 + 0] = sdy;
            sums[((size_t)bi * C + c0 + cc) * 2 + 1] = sdy_xh;
        }
        if (!dinp) continue;
        float m1 = s1 / (float)n, m2 = s2 / (float)n;
        for (size_t i = 0; i < n; i++) {
            int c = c0 + (int)(i / HW);
            float d = norm_bwd_elem(ldx(dy[i]), ldx(x[i]), w ? w[c] : 1.0f, m, rs, m1, m2);
            dinp[bg * n + i] = stx(ldx(dinp[bg * n + i]) + d);
        }
    }
    (void)G;
}

// dw[c] += sdy_xh[b, c] and db[c] += sdy[b, c], b = 0 .. B-1 in order (one thread per c)
HD void gn_wb_fold(float *dw, float *db, const float *sums, int B, int C, int c) {
    for (int bi = 0; bi < B; bi++) {
        if (dw) dw[c] += sums[((size_t)bi * C + c) * 2 + 1];
        if (db) db[c] += sums[((size_t)bi * C + c) * 2 + 0];
    }
}

/* layer norm backward, one block per row: s1 = sum dxhat, s2 = sum dxhat * xhat */
HD void ln_bwd_partial(const floatX *x, const floatX *dy, const float *w, int C, float mean,
                       float rstd, int tid, int nt, float *s1, float *s2) {
    float a = 0.0f, b = 0.0f;
    for (int c = tid; c < C; c += nt) {
        float dxh = ldx(dy[c]) * (w ? w[c] : 1.0f), xh = (ldx(x[c]) - mean) * rstd;
        a += dxh;
        b += dxh * xh;
    }
    *s1 = a;
    *s2 = b;
}
// layer norm's dw, db for column c: a sum over the N rows in order, in double
// as nn.c (N is B * 4096 tokens for SD1.5, a long sum)
HD void ln_wb_col(float *dw, float *db, const floatX *dout, const floatX *inp, const float *mean,
                  const float *rstd, int N, int C, int c) {
    double aw = 0.0, ab = 0.0;
    for (int r = 0; r < N; r++) {
        float d = ldx(dout[(size_t)r * C + c]);
        float xh = (ldx(inp[(size_t)r * C + c]) - mean[r]) * rstd[r];
        aw += (double)d * xh;
        ab += d;
    }
    if (dw) dw[c] += (float)aw;
    if (db) db[c] += (float)ab;
}

inline void layernorm_forward_host(floatX *out, float *mean, float *rstd, const floatX *inp,
                                   const float *w, const float *b, int N, int C, float eps) {
    for (int r = 0; r < N; r++) {
        moments_host(inp + (size_t)r * C, (size_t)C, eps, &mean[r], &rstd[r]);
        for (int c = 0; c < C; c++)
            out[(size_t)r * C + c] = stx(norm_fwd_elem(ldx(inp[(size_t)r * C + c]), mean[r], rstd[r],
                                                       w ? w[c] : 1.0f, b ? b[c] : 0.0f));
    }
}

inline void layernorm_backward_host(floatX *dinp, float *dw, float *db, const floatX *dout,
                                    const floatX *inp, const float *w, const float *mean,
                                    const float *rstd, int N, int C) {
    float pa[NT], pb[NT];
    if (dinp)
        for (int r = 0; r < N; r++) {
            const floatX *x = inp + (size_t)r * C, *dy = dout + (size_t)r * C;
            for (int t = 0; t < NT; t++) ln_bwd_partial(x, dy, w, C, mean[r], rstd[r], t, NT, &pa[t], &pb[t]);
            float m1 = host_tree_sum(pa, NT) / (float)C, m2 = host_tree_sum(pb, NT) / (float)C;
            for (int c = 0; c < C; c++) {
                float d = norm_bwd_elem(ldx(dy[c]), ldx(x[c]), w ? w[c] : 1.0f, mean[r], rstd[r], m1, m2);
                dinp[(size_t)r * C + c] = stx(ldx(dinp[(size_t)r * C + c]) + d);
            }
        }
    if (dw || db)
        for (int c = 0; c < C; c++) ln_wb_col(dw, db, dout, inp, mean, rstd, N, C, c);
}

/* ---------------------------------------------------------------------------
 * pointwise activations (nn.c's formulas, term for term) */
#define SDL_INV_SQRT2 0.70710678118654752440f
#define SDL_INV_SQRT_2PI 0.39894228040143267794f

// silu(x) = x sigmoid(x) = x / (1 + exp(-x))
HD float silu_fwd(float x) { return x / (1.0f + expf(-x)); }
// silu'(x) = s (1 + x (1 - s)),  s = sigmoid(x)
HD float silu_bwd(float dy, float x) {
    float s = 1.0f / (1.0f + expf(-x));
    return dy * s * (1.0f + x * (1.0f - s));
}
// gelu(x) = 0.5 x (1 + erf(x / sqrt 2))
HD float gelu_fwd(float x) { return 0.5f * x * (1.0f + erff(x * SDL_INV_SQRT2)); }
// gelu'(x) = Phi(x) + x phi(x)
HD float gelu_grad(float x) {
    return 0.5f * (1.0f + erff(x * SDL_INV_SQRT2)) + x * expf(-0.5f * x * x) * SDL_INV_SQRT_2PI;
}
HD float gelu_bwd(float dy, float x) { return dy * gelu_grad(x); }
// quickgelu(x) = x sigmoid(1.702 x)
HD float quickgelu_fwd(float x) { return x / (1.0f + expf(-1.702f * x)); }
// quickgelu'(x) = s + 1.702 x s (1 - s)
HD float quickgelu_bwd(float dy, float x) {
    float s = 1.0f / (1.0f + expf(-1.702f * x));
    return dy * (s + 1.702f * x * s * (1.0f - s));
}

// GEGLU, element (r, j) of out (N, D): inp row r is [value | gate]
//   out = value * gelu(gate)
HD float geglu_fwd_elem(const floatX *inp, int D, size_t r, int j) {
    const floatX *v = inp + r * 2 * D;
    return ldx(v[j]) * gelu_fwd(ldx(v[D + j]));
}
//   dvalue += dout gelu(gate),  dgate += dout value gelu'(gate)
HD void geglu_bwd_elem(floatX *dinp, const floatX *dout, const floatX *inp, int D, size_t r, int j) {
    const floatX *v = inp + r * 2 * D;
    floatX *dv = dinp + r * 2 * D;
    float dy = ldx(dout[r * D + j]), val = ldx(v[j]), g = ldx(v[D + j]);
    dv[j] = stx(ldx(dv[j]) + dy * gelu_fwd(g));
    dv[D + j] = stx(ldx(dv[D + j]) + dy * val * gelu_grad(g));
}

/* ---------------------------------------------------------------------------
 * nearest 2x upsample: out[bc, y, x] = inp[bc, y/2, x/2]; element i of out */
HD float upsample2x_fwd_elem(const floatX *inp, int H, int W, size_t i) {
    size_t W2 = 2 * (size_t)W, plane = 4 * (size_t)H * W;
    size_t bc = i / plane, yx = i % plane, y = yx / W2, x = yx % W2;
    return ldx(inp[bc * H * W + (y / 2) * W + x / 2]);
}
// dinp[bc, y, x] += the 4 copies' gradients, in nn.c's order of addition
HD float upsample2x_bwd_elem(const floatX *dout, int H, int W, size_t i) {
    size_t bc = i / ((size_t)H * W), yx = i % ((size_t)H * W), y = yx / W, x = yx % W;
    size_t W2 = 2 * (size_t)W;
    const floatX *r0 = dout + bc * 4 * H * W + (2 * y) * W2, *r1 = r0 + W2;
    return (ldx(r0[2 * x]) + ldx(r0[2 * x + 1])) + (ldx(r1[2 * x]) + ldx(r1[2 * x + 1]));
}

/* ---------------------------------------------------------------------------
 * timestep embedding, element (n, k) of out (N, dim), with nn.c's float steps:
 *   e_j = -ln(max_period) * j / (half - shift),  arg = t * exp(e_j)
 *   out = [sin arg | cos arg] (or [cos | sin] flipped), 0 in an odd last column
 * neg_log and denom are computed once on the host, in double, as nn.c does */
HD float timestep_elem(const float *t, int dim, int flip, float neg_log, float denom, size_t n, int k) {
    int half = dim / 2;
    if (k >= 2 * half) return 0.0f;
    int second = k >= half, j = second ? k - half : k;
    int is_sin = flip ? second : !second;
    float e = neg_log * (float)j;
    e = e / denom;
    float arg = t[n] * expf(e);
    return is_sin ? sinf(arg) : cosf(arg);
}

/* ---------------------------------------------------------------------------
 * dropout with nn.c's stream: u_i = top 24 bits of splitmix(s0 + (i+1) gamma),
 * so the device mask is the CPU mask, bit for bit.
 *   mask_i = (u_i >= p),  out_i = inp_i * mask_i / (1 - p) */
HD uint8_t dropout_keep(uint64_t s0, size_t i, float p) {
    uint64_t z = s0 + (uint64_t)(i + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z = z ^ (z >> 31);
    float u = (float)(z >> 40) * (1.0f / 16777216.0f);
    return u >= p;
}
HD float dropout_scale(float p) { return p < 1.0f ? 1.0f / (1.0f - p) : 0.0f; }
// dinp_i += dout_i * mask_i / (1 - p)   (p <= 0: the forward was a copy)
HD float dropout_bwd_elem(float dy, uint8_t keep, float p) {
    if (p <= 0.0f) return dy;
    return keep ? dy * dropout_scale(p) : 0.0f;
}

/* ---------------------------------------------------------------------------
 * biases and residuals */

// out[n, c] += b[c] over (N, C) rows (linear); element i
HD float bias_rows_elem(float o, const float *b, int C, size_t i) { return o + b[i % C]; }
// out[b, o, p] += bias[o] over (B, O, P) (conv); element i
HD float bias_chan_elem(float o, const float *b, int O, size_t P, size_t i) { return o + b[(i / P) % O]; }
// db[c] += sum_n dout[n, c], in double, rows in order (one thread per column)
HD void bias_grad_rows_col(float *db, const floatX *dout, int N, int C, int c) {
    double s = 0.0;
    for (int r = 0; r < N; r++) s += ldx(dout[(size_t)r * C + c]);
    db[c] += (float)s;
}
// conv db[o] += sum_{b, p} dout[b, o, p]: one block per o, thread tid's strided
// share over the B * P values in double (then the tree, in double)
HD double bias_grad_chan_partial(const floatX *dout, int B, int O, size_t P, int o, int tid, int nt) {
    double s = 0.0;
    for (size_t k = (size_t)tid; k < (size_t)B * P; k += (size_t)nt)
        s += ldx(dout[((k / P) * O + o) * P + k % P]);
    return s;
}

/* ---------------------------------------------------------------------------
 * direct convolution (no im2col buffer; readable first: one thread per
 * output value, cuBLAS only for the 1x1 case). Zero padding.
 *   out[b, o, oy, ox] = bias[o] + sum_{c, i, j} w[o, c, i, j] x[b, c, oy s - pad + i, ox s - pad + j] */
struct conv_dims { int B, C, H, W, O, kh, kw, stride, pad, Ho, Wo; };

HD float conv_fwd_elem(const floatX *x, const float *w, const float *bias, conv_dims d, size_t idx) {
    int ox = (int)(idx % d.Wo), oy = (int)((idx / d.Wo) % d.Ho);
    int o = (int)((idx / ((size_t)d.Wo * d.Ho)) % d.O);
    size_t b = idx / ((size_t)d.Wo * d.Ho * d.O);
    float acc = 0.0f;
    for (int c = 0; c < d.C; c++) {
        const floatX *xc = x + (b * d.C + c) * (size_t)d.H * d.W;
        const float *wc = w + ((size_t)o * d.C + c) * d.kh * d.kw;
        for (int i = 0; i < d.kh; i++) {
            int y = oy * d.stride - d.pad + i;
            if (y < 0 || y >= d.H) continue;
            for (int j = 0; j < d.kw; j++) {
                int xx = ox * d.stride - d.pad + j;
                if (xx >= 0 && xx < d.W) acc += wc[i * d.kw + j] * ldx(xc[(size_t)y * d.W + xx]);
            }
        }
    }
    return bias ? acc + bias[o] : acc;
}
// dx[b, c, y, x] = sum over the (o, i, j) whose output (oy, ox) read it:
//   oy = (y + pad - i) / s when that divides exactly and is in range, likewise ox
HD float conv_dinp_elem(const floatX *dout, const float *w, conv_dims d, size_t idx) {
    int xx = (int)(idx % d.W), y = (int)((idx / d.W) % d.H);
    int c = (int)((idx / ((size_t)d.W * d.H)) % d.C);
    size_t b = idx / ((size_t)d.W * d.H * d.C);
    float acc = 0.0f;
    for (int o = 0; o < d.O; o++) {
        const floatX *dyo = dout + (b * d.O + o) * (size_t)d.Ho * d.Wo;
        const float *wo = w + ((size_t)o * d.C + c) * d.kh * d.kw;
        for (int i = 0; i < d.kh; i++) {
            int ty = y + d.pad - i;
            if (ty < 0 || ty % d.stride) continue;
            int oy = ty / d.stride;
            if (oy >= d.Ho) continue;
            for (int j = 0; j < d.kw; j++) {
                int tx = xx + d.pad - j;
                if (tx < 0 || tx % d.stride) continue;
                int ox = tx / d.stride;
                if (ox < d.Wo) acc += wo[i * d.kw + j] * ldx(dyo[(size_t)oy * d.Wo + ox]);
            }
        }
    }
    return acc;
}
// dw[o, c, i, j] = sum_{b, oy, ox} dout[b, o, oy, ox] x[b, c, oy s - pad + i, ox s - pad + j]
HD float conv_dw_elem(const floatX *dout, const floatX *x, conv_dims d, size_t idx) {
    int j = (int)(idx % d.kw), i = (int)((idx / d.kw) % d.kh);
    int c = (int)((idx / ((size_t)d.kw * d.kh)) % d.C);
    int o = (int)(idx / ((size_t)d.kw * d.kh * d.C));
    float acc = 0.0f;
    for (int b = 0; b < d.B; b++) {
        const floatX *dyo = dout + ((size_t)b * d.O + o) * (size_t)d.Ho * d.Wo;
        const floatX *xc = x + ((size_t)b * d.C + c) * (size_t)d.H * d.W;
        for (int oy = 0; oy < d.Ho; oy++) {
            int y = oy * d.stride - d.pad + i;
            if (y < 0 || y >= d.H) continue;
            for (int ox = 0; ox < d.Wo; ox++) {
                int xx = ox * d.stride - d.pad + j;
                if (xx >= 0 && xx < d.W) acc += ldx(dyo[(size_t)oy * d.Wo + ox]) * ldx(xc[(size_t)y * d.W + xx]);
            }
        }
    }
    return acc;
}

/* ---------------------------------------------------------------------------
 * stride-1 convolution as kh*kw GEMMs, no im2col buffer (the "shifted GEMM"):
 * the input is copied once, zero-padded, as xpad (C, B*Hp*Wp) with row
 * stride ldx, and the output is computed on the padded grid: for tap (i, j)
 *     opad (O, B*Hp*Wp) += W_ij (O, C) * xpad[:, q + i*Wp + j]
 * since column q = b*S + oy*Wp + ox (S = Hp*Wp) of that shifted window holds
 * x[b, c, oy + i - pad, ox + j - pad]. Columns with ox >= Wo or oy >= Ho are
 * computed and thrown away (about 2 pad / W of the work); the tail of each
 * xpad row, (kh-1)*Wp + kw-1 zeros, keeps the last window inside the row.
 * W_ij is w[:, :, i, j], packed as wp (kh*kw, O, C) so that each is a plain
 * matrix. Backward is the adjoint of each step (dout padded with zeros on
 * the thrown-away columns, so they contribute nothing). */
struct shift_dims { int Hp, Wp; size_t S, Nq, ldx; };
HD shift_dims make_shift_dims(conv_dims d) {
    shift_dims s;
    s.Hp = d.H + 2 * d.pad;
    s.Wp = d.W + 2 * d.pad;
    s.S = (size_t)s.Hp * s.Wp;
    s.Nq = (size_t)d.B * s.S;
    s.ldx = s.Nq + (size_t)(d.kh - 1) * s.Wp + (d.kw - 1);
    return s;
}
// xpad[c, q], element idx of (C, ldx): x at the unpadded position, else 0
HD float shift_pad_elem(const floatX *x, conv_dims d, shift_dims s, size_t idx) {
    size_t c = idx / s.ldx, q = idx % s.ldx;
    if (q >= s.Nq) return 0.0f;
    size_t b = q / s.S, r = q % s.S;
    int y = (int)(r / s.Wp) - d.pad, xx = (int)(r % s.Wp) - d.pad;
    if (y < 0 || y >= d.H || xx < 0 || xx >= d.W) return 0.0f;
    return ldx(x[((b * d.C + c) * d.H + y) * d.W + xx]);
}
// wp[t, o, c] = w[o, c, t], t = i*kw + j; element idx of (kh*kw, O, C)
HD float shift_wpack_elem(const float *w, conv_dims d, size_t idx) {
    size_t oc = (size_t)d.O * d.C, t = idx / oc;
    return w[(idx % oc) * d.kh * d.kw + t];
}
// out[b, o, oy, ox] = opad[o, b*S + oy*Wp + ox] + bias[o]
HD float shift_crop_elem(const float *opad, const float *bias, conv_dims d, shift_dims s, size_t idx) {
    int ox = (int)(idx % d.Wo), oy = (int)((idx / d.Wo) % d.Ho);
    int o = (int)((idx / ((size_t)d.Wo * d.Ho)) % d.O);
    size_t b = idx / ((size_t)d.Wo * d.Ho * d.O);
    float v = opad[(size_t)o * s.Nq + b * s.S + (size_t)oy * s.Wp + ox];
    return bias ? v + bias[o] : v;
}
// dpad[o, q] = dout at a kept column, 0 at a thrown-away one
HD float shift_dpad_elem(const floatX *dout, conv_dims d, shift_dims s, size_t idx) {
    size_t o = idx / s.Nq, q = idx % s.Nq, b = q / s.S, r = q % s.S;
    int oy = (int)(r / s.Wp), ox = (int)(r % s.Wp);
    if (oy >= d.Ho || ox >= d.Wo) return 0.0f;
    return ldx(dout[((b * d.O + o) * d.Ho + oy) * d.Wo + ox]);
}
// dx[b, c, y, x] gets dxpad[c, b*S + (y + pad)*Wp + x + pad]
HD float shift_dx_elem(const float *dxpad, conv_dims d, shift_dims s, size_t idx) {
    int xx = (int)(idx % d.W), y = (int)((idx / d.W) % d.H);
    size_t c = (idx / ((size_t)d.W * d.H)) % d.C, b = idx / ((size_t)d.W * d.H * d.C);
    return dxpad[c * s.ldx + b * s.S + (size_t)(y + d.pad) * s.Wp + xx + d.pad];
}
// dw[o, c, t] gets dwp[t, o, c]
HD float shift_dw_elem(const float *dwp, conv_dims d, size_t idx) {
    size_t t = idx % ((size_t)d.kh * d.kw), oc = idx / ((size_t)d.kh * d.kw);
    return dwp[t * d.O * d.C + oc];
}


/* ---------------------------------------------------------------------------
 * the small tensor helpers of backend.h (backend.c's loops, element by element)
 * transpose (B, R, S) -> (B, S, R): element i = (b, s, r) of out is in[b, r, s] */
HD float transpose_elem(const floatX *in, int R, int S, size_t i) {
    size_t r = i % (size_t)R, bs = i / (size_t)R, s = bs % (size_t)S, b = bs / (size_t)S;
    return ldx(in[(b * R + r) * S + s]);
}
// out (BC, H+1, W+1) from in (BC, H, W) padded with a zero row at the bottom
// and a zero column at the right: element i = (bc, y, x) of out is
// in[bc, y, x] inside, 0 on the pad
HD float pad_br_elem(const floatX *in, int H, int W, size_t i) {
    size_t Wp = (size_t)W + 1, x = i % Wp, yb = i / Wp, y = yb % ((size_t)H + 1), bc = yb / ((size_t)H + 1);
    return y < (size_t)H && x < (size_t)W ? ldx(in[(bc * H + y) * W + x]) : 0.0f;
}
// y (B, C, HW) += v per channel: element i belongs to channel b C + c = i / HW
HD float add_chan_elem(float y, const float *v, size_t HW, size_t i) { return y + v[i / HW]; }
// an fp16 bit pattern as float, exactly (half.c's half_to_float, branch by
// branch): inf/NaN keep the payload, subnormals are m 2^-24
HD float half_bits_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu, bits;
    if (e == 0) {
        float f = (float)m * 5.9604644775390625e-8f;   // m * 2^-24, exact
        return sign ? -f : f;
    }
    bits = e == 0x1Fu ? (sign | 0x7F800000u | m << 13) : (sign | (e + 112u) << 23 | m << 13);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
// the sum of channel bc over its HW values, in double and in order (backend.c)
HD float sum_chan_elem(const floatX *x, size_t HW, size_t bc) {
    double s = 0;
    for (size_t i = 0; i < HW; i++) s += ldx(x[bc * HW + i]);
    return (float)s;
}
// CLIP's input, element i = (n, c) of out (B T, C), n = b T + t:
//   out = tok[ids[n], c] + pos[t, c]
// each table fp32 or fp16 bits (the other pointer NULL), widened exactly, then
// one float add: backend.c's nn_embedding_forward, bit for bit
HD float embedding_elem(const int *ids, const float *tok, const uint16_t *tok16, const float *pos,
                        const uint16_t *pos16, int T, int C, size_t i) {
    size_t n = i / (size_t)C, c = i % (size_t)C, t = n % (size_t)T, r = (size_t)ids[n];
    float te = tok ? tok[r * C + c] : half_bits_to_float(tok16[r * C + c]);
    float pe = pos ? pos[t * C + c] : half_bits_to_float(pos16[t * C + c]);
    return te + pe;
}

#endif

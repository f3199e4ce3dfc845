// cuda/layers.cuh: the layers made of GEMMs (linear, conv2d, attention,
// LoRA), written once as templates over a backend BK:
//   BK = DevBK (cuda/backend.cuh): cuBLAS and the kernels, on device memory;
//   BK = HostBK (cuda/test_cuda_host.cu): the CPU gemm() and host loops over
//        the same __host__ __device__ functions the kernels call.
// So the host test runs exactly this sequence of products and kernels (every
// operand, transpose, stride and beta) and compares it with nn.c,
// attention.c and lora.c. Same signatures and semantics as the CPU layers:
// backward accumulates, a NULL gradient skips its work.
#ifndef SDLORA_CUDA_LAYERS_CUH
#define SDLORA_CUDA_LAYERS_CUH

#include "nn_ops.cuh"
extern "C" {
#include "../lora.h"
}

/* linear: out (N, outc) = inp (N, in) W^T + b */
template <class BK>
void linear_forward_t(float *out, const float *inp, const float *w, const float *b,
                      int N, int in, int outc) {
    BK::gemm(0, 1, N, outc, in, 1.0f, inp, in, w, in, 0.0f, out, outc);
    if (b) BK::add_bias_rows(out, b, N, outc);
}
template <class BK>
void linear_backward_t(float *dinp, float *dw, float *db, const float *dout, const float *inp,
                       const float *w, int N, int in, int outc) {
    // dinp (N, in) += dout w;  dw (out, in) += dout^T inp;  db += column sums
    if (dinp) BK::gemm(0, 0, N, in, outc, 1.0f, dout, outc, w, in, 1.0f, dinp, in);
    if (dw) BK::gemm(1, 0, outc, in, N, 1.0f, dout, outc, inp, in, 1.0f, dw, in);
    if (db) BK::bias_grad_rows(db, dout, N, outc);
}

/* conv2d: a 1x1 stride-1 unpadded conv is one GEMM per image,
 *   out_b (O, P) = w (O, C) x_b (C, P)
 * (batched over b); any other stride-1 conv is kh*kw GEMMs on a padded copy
 * (the shifted GEMM above); strided ones (the downsamplers) are the direct
 * kernel (nn_ops.cuh) */
inline conv_dims make_conv_dims(int B, int C, int H, int W, int O, int kh, int kw, int stride, int pad) {
    conv_dims d = {B, C, H, W, O, kh, kw, stride, pad,
                   (H + 2 * pad - kh) / stride + 1, (W + 2 * pad - kw) / stride + 1};
    return d;
}
/* the stride-1 shifted-GEMM convolution (nn_ops.cuh); scratch: xpad
 * (C ldx), wp (kh kw O C), opad (O Nq) */
template <class BK>
void conv2d_shift_forward_t(float *out, const float *inp, const float *w, const float *b, conv_dims d) {
    shift_dims s = make_shift_dims(d);
    size_t nxp = (size_t)d.C * s.ldx, nwp = (size_t)d.kh * d.kw * d.O * d.C, nop = (size_t)d.O * s.Nq;
    float *xpad = BK::scratch(nxp + nwp + nop);
    if (!xpad) return;
    float *wp = xpad + nxp, *opad = wp + nwp;
    BK::shift_pad(xpad, inp, d, s);
    BK::shift_wpack(wp, w, d);
    for (int i = 0; i < d.kh; i++)
        for (int j = 0; j < d.kw; j++) {
            int t = i * d.kw + j;
            // opad (O, Nq) += W_ij (O, C) xpad[:, shifted by i Wp + j] (C, Nq)
            BK::gemm(0, 0, d.O, (int)s.Nq, d.C, 1.0f, wp + (size_t)t * d.O * d.C, d.C,
                     xpad + (size_t)i * s.Wp + j, (int)s.ldx, t ? 1.0f : 0.0f, opad, (int)s.Nq);
        }
    BK::shift_crop(out, opad, b, d, s);
}
template <class BK>
void conv2d_shift_backward_t(float *dinp, float *dw, const float *dout, const float *inp,
                             const float *w, conv_dims d) {
    shift_dims s = make_shift_dims(d);
    size_t nxp = (size_t)d.C * s.ldx, nwp = (size_t)d.kh * d.kw * d.O * d.C, ndp = (size_t)d.O * s.Nq;
    // dpad, then xpad and dwp (only for dw), wp and dxpad (only for dinp):
    // a frozen weight's dwp is not held (SD1.5's 2560 -> 1280 3x3 convs:
    // 118 MiB of the step's scratch)
    float *dpad = BK::scratch(ndp + (dw ? nxp + nwp : 0) + (dinp ? nwp + nxp : 0));
    if (!dpad) return;
    float *xpad = dpad + ndp, *dwp = xpad + nxp;
    float *wp = dw ? dwp + nwp : dpad + ndp, *dxpad = wp + nwp;
    BK::shift_dpad(dpad, dout, d, s);
    if (dw) {
        BK::shift_pad(xpad, inp, d, s);
        // dW_ij (O, C) = dpad (O, Nq) xpad[:, shifted]^T (Nq, C)
        for (int i = 0; i < d.kh; i++)
            for (int j = 0; j < d.kw; j++)
                BK::gemm(0, 1, d.O, d.C, (int)s.Nq, 1.0f, dpad, (int)s.Nq, xpad + (size_t)i * s.Wp + j, (int)s.ldx,
                         0.0f, dwp + (size_t)(i * d.kw + j) * d.O * d.C, d.C);
        BK::shift_dw_add(dw, dwp, d);
    }
    if (dinp) {
        BK::shift_wpack(wp, w, d);
        BK::zero(dxpad, nxp);
        // dxpad[:, shifted] (C, Nq) += W_ij^T (C, O) dpad (O, Nq), tap after tap
        for (int i = 0; i < d.kh; i++)
            for (int j = 0; j < d.kw; j++)
                BK::gemm(1, 0, d.C, (int)s.Nq, d.O, 1.0f, wp + (size_t)(i * d.kw + j) * d.O * d.C, d.C, dpad,
                         (int)s.Nq, 1.0f, dxpad + (size_t)i * s.Wp + j, (int)s.ldx);
        BK::shift_dx_add(dinp, dxpad, d, s);
    }
}

template <class BK>
void conv2d_forward_t(float *out, const float *inp, const float *w, const float *b,
                      int B, int C, int H, int W, int O, int kh, int kw, int stride, int pad) {
    conv_dims d = make_conv_dims(B, C, H, W, O, kh, kw, stride, pad);
    long long P = (long long)d.Ho * d.Wo;
    if (kh == 1 && kw == 1 && stride == 1 && pad == 0) {
        BK::gemm_batched(0, 0, O, (int)P, C, 1.0f, w, C, 0, inp, (int)P, C * P, 0.0f, out, (int)P, O * P, B);
        if (b) BK::add_bias_chan(out, b, B, O, (size_t)P);
    } else if (stride == 1) {
        conv2d_shift_forward_t<BK>(out, inp, w, b, d);
    } else if (BK::lowp()) {
        // --compute bf16|fp16: the direct kernel is no GEMM, so its operands
        // are rounded here, as the CPU's im2col GEMM rounds them
        size_t nx = (size_t)B * C * H * W, nw = (size_t)O * C * kh * kw;
        float *xr = BK::scratch(nx + nw);
        if (!xr) return;
        BK::round_copy(xr, inp, nx);
        BK::round_copy(xr + nx, w, nw);
        BK::conv_fwd(out, xr, xr + nx, b, d);
    } else {
        BK::conv_fwd(out, inp, w, b, d);
    }
}
template <class BK>
void conv2d_backward_t(float *dinp, float *dw, float *db, const float *dout, const float *inp,
                       const float *w, int B, int C, int H, int W, int O, int kh, int kw,
                       int stride, int pad) {
    conv_dims d = make_conv_dims(B, C, H, W, O, kh, kw, stride, pad);
    long long P = (long long)d.Ho * d.Wo;
    if (db) BK::bias_grad_chan(db, dout, B, O, (size_t)P);
    if (kh == 1 && kw == 1 && stride == 1 && pad == 0) {
        // dw (O, C) += dout_b (O, P) x_b^T, image by image (one accumulator)
        if (dw)
            for (int bi = 0; bi < B; bi++)
                BK::gemm(0, 1, O, C, (int)P, 1.0f, dout + bi * O * P, (int)P, inp + bi * C * P, (int)P,
                         1.0f, dw, C);
        // dx_b (C, P) += w^T (C, O) dout_b (O, P)
        if (dinp)
            BK::gemm_batched(1, 0, C, (int)P, O, 1.0f, w, C, 0, dout, (int)P, O * P, 1.0f, dinp, (int)P,
                             C * P, B);
    } else if (stride == 1) {
        if (dw || dinp) conv2d_shift_backward_t<BK>(dinp, dw, dout, inp, w, d);
    } else if (BK::lowp() && (dw || dinp)) {
        // rounded operands, as the forward's
        size_t nx = (size_t)B * C * H * W, nw = (size_t)O * C * kh * kw, ny = (size_t)B * O * P;
        float *yr = BK::scratch(ny + (dw ? nx : 0) + (dinp ? nw : 0));
        if (!yr) return;
        BK::round_copy(yr, dout, ny);
        if (dw) {
            BK::round_copy(yr + ny, inp, nx);
            BK::conv_dw(dw, yr, yr + ny, d);
        }
        if (dinp) {
            float *wr = yr + ny + (dw ? nx : 0);
            BK::round_copy(wr, w, nw);
            BK::conv_dinp(dinp, yr, wr, d);
        }
    } else {
        if (dw) BK::conv_dw(dw, dout, inp, d);
        if (dinp) BK::conv_dinp(dinp, dout, w, d);
    }
}

/* attention, per (b, h), heads as strided views (row stride C = H Dh,
 * head h at column h Dh), one batched product over a pass of heads of item b:
 *   S = scale Q K^T,  P = softmax(S) (causal: j > i masked),  O = P V
 * att (B, H, Tq, Tk) or NULL: P then lives in scratch, one pass of heads at
 * a time, and backward recomputes it (as attention.c). A pass holds at most
 * ATT_PASS_FLOATS of P (at least one head): SD1.5's 64x64 self-attention
 * has 4096^2 floats (64 MiB) of P per head, 512 MiB for its 8 heads at once
 * and twice that in backward (P and dS), the largest scratch of a step. */
#define ATT_PASS_FLOATS ((long long)1 << 24)
inline int att_heads_per_pass(int H, long long TT) {
    long long h = ATT_PASS_FLOATS / (TT > 0 ? TT : 1);
    return h < 1 ? 1 : h > H ? H : (int)h;
}
template <class BK>
void attention_probs_t(float *P, const float *q, const float *k, int Tq, int Tk, int nh, int Dh, int C,
                       float scale, int causal) {
    long long TT = (long long)Tq * Tk;
    BK::gemm_batched(0, 1, Tq, Tk, Dh, scale, q, C, Dh, k, C, Dh, 0.0f, P, Tk, TT, nh);
    BK::softmax_rows(P, nh * Tq, Tq, Tk, causal);
}
template <class BK>
void attention_forward_t(float *out, float *att, const float *q, const float *k, const float *v,
                         int B, int Tq, int Tk, int H, int Dh, int causal) {
    int C = H * Dh;
    float scale = 1.0f / sqrtf((float)Dh);
    long long TT = (long long)Tq * Tk;
    int hp = att ? H : att_heads_per_pass(H, TT);
    float *buf = att ? NULL : BK::scratch((size_t)hp * TT);
    if (!att && !buf) return;
    for (int b = 0; b < B; b++)
        for (int h0 = 0; h0 < H; h0 += hp) {
            int nh = H - h0 < hp ? H - h0 : hp;
            float *P = att ? att + ((size_t)b * H + h0) * TT : buf;
            size_t qo = (size_t)b * Tq * C + (size_t)h0 * Dh, ko = (size_t)b * Tk * C + (size_t)h0 * Dh;
            attention_probs_t<BK>(P, q + qo, k + ko, Tq, Tk, nh, Dh, C, scale, causal);
            // O = P V   (Tq x Tk)(Tk x Dh), written at the heads' columns
            BK::gemm_batched(0, 0, Tq, Dh, Tk, 1.0f, P, Tk, TT, v + ko, C, Dh, 0.0f, out + qo, C, Dh, nh);
        }
}
template <class BK>
void attention_backward_t(float *dq, float *dk, float *dv, const float *dout, const float *q,
                          const float *k, const float *v, const float *att,
                          int B, int Tq, int Tk, int H, int Dh, int causal) {
    if (!dq && !dk && !dv) return;
    int C = H * Dh;
    float scale = 1.0f / sqrtf((float)Dh);
    long long TT = (long long)Tq * Tk;
    int need_ds = dq || dk;
    int hp = att_heads_per_pass(H, TT);
    size_t nbuf = (need_ds ? (size_t)hp * TT : 0) + (att ? 0 : (size_t)hp * TT);
    float *buf = nbuf ? BK::scratch(nbuf) : NULL;
    if (nbuf && !buf) return;
    float *dS = need_ds ? buf : NULL;
    float *Pbuf = att ? NULL : buf + (need_ds ? (size_t)hp * TT : 0);
    for (int b = 0; b < B; b++)
        for (int h0 = 0; h0 < H; h0 += hp) {
            int nh = H - h0 < hp ? H - h0 : hp;
            size_t qo = (size_t)b * Tq * C + (size_t)h0 * Dh, ko = (size_t)b * Tk * C + (size_t)h0 * Dh;
            const float *P = att ? att + ((size_t)b * H + h0) * TT : Pbuf;
            if (!att) attention_probs_t<BK>(Pbuf, q + qo, k + ko, Tq, Tk, nh, Dh, C, scale, causal);
            // dV += P^T dO   (Tk x Tq)(Tq x Dh)
            if (dv) BK::gemm_batched(1, 0, Tk, Dh, Tq, 1.0f, P, Tk, TT, dout + qo, C, Dh, 1.0f, dv + ko, C, Dh, nh);
            if (!need_ds) continue;
            // dP = dO V^T   (Tq x Dh)(Dh x Tk), then dS = P (dP - rowsum(dP P)) in place
            BK::gemm_batched(0, 1, Tq, Tk, Dh, 1.0f, dout + qo, C, Dh, v + ko, C, Dh, 0.0f, dS, Tk, TT, nh);
            BK::softmax_bwd_rows(dS, P, nh * Tq, Tk);
            // dQ += scale dS K;  dK += scale dS^T Q
            if (dq) BK::gemm_batched(0, 0, Tq, Dh, Tk, scale, dS, Tk, TT, k + ko, C, Dh, 1.0f, dq + qo, C, Dh, nh);
            if (dk) BK::gemm_batched(1, 0, Tk, Dh, Tq, scale, dS, Tk, TT, q + qo, C, Dh, 1.0f, dk + ko, C, Dh, nh);
        }
}

/* LoRA (lora.c): y = x W0^T + b + s (dropout(x) A^T) B^T,  s = alpha / r.
 * L's A, B, dA, dB and every array are device memory on the GPU; rng stays
 * on the host (the mask is drawn on the device from its state, then the
 * state advances by N * in draws, as on the CPU). scratch:
 * lora_scratch_floats(L, N) floats, as lora.c. */
template <class BK>
void lora_forward_t(float *out, float *ax, uint8_t *mask, float *scratch, const float *inp,
                    const float *w0, const float *b0, const lora_t *L, int N, int in, int outc, rng_t *rng) {
    linear_forward_t<BK>(out, inp, w0, b0, N, in, outc);
    if (!L) return;
    int r = L->r;
    const float *x = inp;
    if (L->dropout > 0.0f) {
        if (!scratch) { BK::fail("lora_forward: no scratch memory (lora_scratch_floats)"); return; }
        size_t n = (size_t)N * in;
        BK::dropout_fwd(scratch, mask, inp, n, L->dropout, rng->state);
        rng->state += (uint64_t)n * 0x9E3779B97F4A7C15ULL;
        x = scratch;
    }
    // ax (N x r) = x_d A^T;  out += s ax B^T
    BK::gemm(0, 1, N, r, in, 1.0f, x, in, L->A, in, 0.0f, ax, r);
    BK::gemm(0, 1, N, outc, r, L->scale, ax, r, L->B, r, 1.0f, out, outc);
}
template <class BK>
void lora_backward_t(float *dinp, const float *dout, const float *inp, const float *ax,
                     const uint8_t *mask, float *scratch, const float *w0, lora_t *L,
                     int N, int in, int outc) {
    if (dinp) linear_backward_t<BK>(dinp, NULL, NULL, dout, inp, w0, N, in, outc);
    if (!L) return;
    if (!scratch) { BK::fail("lora_backward: no scratch memory (lora_scratch_floats)"); return; }
    int r = L->r;
    float s = L->scale;
    float *g = scratch, *xd = scratch + (size_t)N * r;
    size_t n = (size_t)N * in;
    // g (N x r) = dout B;  dB += s dout^T ax;  dA += s g^T x_d
    BK::gemm(0, 0, N, r, outc, 1.0f, dout, outc, L->B, r, 0.0f, g, r);
    if (L->dB) BK::gemm(1, 0, outc, r, N, s, dout, outc, ax, r, 1.0f, L->dB, r);
    if (L->dA) {
        const float *x = inp;
        if (L->dropout > 0.0f) {   // x_d = x mask / (1 - p), from the saved mask
            BK::dropout_rebuild(xd, inp, mask, n, L->dropout);
            x = xd;
        }
        BK::gemm(1, 0, r, in, N, s, g, r, x, in, 1.0f, L->dA, in);
    }
    // dx += s g A, through the mask when there is dropout
    if (dinp) {
        if (L->dropout > 0.0f) {
            BK::gemm(0, 0, N, in, r, s, g, r, L->A, in, 0.0f, xd, in);
            BK::dropout_bwd(dinp, xd, mask, n, L->dropout);
        } else {
            BK::gemm(0, 0, N, in, r, s, g, r, L->A, in, 1.0f, dinp, in);
        }
    }
}

/* conv LoRA (LoCon, lora.c's lora_conv_forward / lora_conv_backward), made
 * of the conv2d layers above and GEMMs; s = alpha / r, k x k down conv with
 * the frozen conv's stride and padding, 1x1 up:
 *   forward:  ax (Bn, r, Ho, Wo) = conv(dropout(x), A);  out_b += s B ax_b
 *   backward: g_b = s B^T dout_b;  dB += s dout_b ax_b^T (b in order);
 *             dA += conv_dW(g, dropout(x));  dx += conv_dX(g, A) masked
 * scratch: lora_conv_scratch_floats floats (x_d; g then x_d backward), as lora.c */
template <class BK>
void lora_conv_forward_t(float *out, float *ax, uint8_t *mask, float *scratch, const float *inp,
                         const lora_t *L, int Bn, int H, int W, int stride, int pad, rng_t *rng) {
    if (!L) return;
    int k = L->k > 1 ? L->k : 1, r = L->r;
    long long P = (long long)((H + 2 * pad - k) / stride + 1) * ((W + 2 * pad - k) / stride + 1);
    const float *x = inp;
    if (L->dropout > 0.0f) {
        if (!scratch) { BK::fail("lora_conv_forward: no scratch memory (lora_conv_scratch_floats)"); return; }
        size_t n = (size_t)Bn * L->in * H * W;
        BK::dropout_fwd(scratch, mask, inp, n, L->dropout, rng->state);
        rng->state += (uint64_t)n * 0x9E3779B97F4A7C15ULL;
        x = scratch;
    }
    conv2d_forward_t<BK>(ax, x, L->A, NULL, Bn, L->in, H, W, r, k, k, stride, pad);
    // out_b (out x P) += s B (out x r) ax_b (r x P), one batched product
    BK::gemm_batched(0, 0, L->out, (int)P, r, L->scale, L->B, r, 0, ax, (int)P, r * P, 1.0f, out, (int)P,
                     L->out * P, Bn);
}
template <class BK>
void lora_conv_backward_t(float *dinp, const float *dout, const float *inp, const float *ax,
                          const uint8_t *mask, float *scratch, lora_t *L,
                          int Bn, int H, int W, int stride, int pad) {
    if (!L) return;
    if (!scratch) { BK::fail("lora_conv_backward: no scratch memory (lora_conv_scratch_floats)"); return; }
    int k = L->k > 1 ? L->k : 1, r = L->r, in = L->in, outc = L->out;
    long long P = (long long)((H + 2 * pad - k) / stride + 1) * ((W + 2 * pad - k) / stride + 1);
    size_t nx = (size_t)Bn * in * H * W;
    float s = L->scale;
    float *g = scratch, *xd = scratch + (size_t)Bn * r * P;
    // g_b (r x P) = s B^T (r x out) dout_b (out x P)
    BK::gemm_batched(1, 0, r, (int)P, outc, s, L->B, r, 0, dout, (int)P, outc * P, 0.0f, g, (int)P, r * P, Bn);
    // dB (out x r) += s dout_b ax_b^T, image by image (one accumulator)
    if (L->dB)
        for (int b = 0; b < Bn; b++)
            BK::gemm(0, 1, outc, r, (int)P, s, dout + b * outc * P, (int)P, ax + b * r * P, (int)P, 1.0f, L->dB, r);
    const float *x = inp;
    if (L->dropout > 0.0f && (L->dA || dinp)) {   // x_d = x mask / (1 - p), from the saved mask
        BK::dropout_rebuild(xd, inp, mask, nx, L->dropout);
        x = xd;
    }
    if (L->dA) conv2d_backward_t<BK>(NULL, L->dA, NULL, g, x, L->A, Bn, in, H, W, r, k, k, stride, pad);
    if (dinp) {
        if (L->dropout > 0.0f) {
            BK::zero(xd, nx);
            conv2d_backward_t<BK>(xd, NULL, NULL, g, xd, L->A, Bn, in, H, W, r, k, k, stride, pad);
            BK::dropout_bwd(dinp, xd, mask, nx, L->dropout);
        } else {
            conv2d_backward_t<BK>(dinp, NULL, NULL, g, inp, L->A, Bn, in, H, W, r, k, k, stride, pad);
        }
    }
}

#endif

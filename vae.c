/* vae.c: AutoencoderKL (diffusers) encoder and decoder, forward and backward.
 *
 * The model is two flat lists of layers run in order (the encoder's and the
 * decoder's); a diffusers block is just several consecutive layers:
 *   DownEncoderBlock2D = resnets + DOWN,  UpDecoderBlock2D = resnets + UP,
 *   UNetMidBlock2D     = resnet, ATTN, resnet.
 * Forward pushes each layer's output (and, when training, what its backward
 * reads) onto the half's arena; backward walks the list in reverse, each
 * layer turning dL/d(output) into dL/d(input). Parameters are addressed by
 * offset into v->params, so the same offset into v->grads is the gradient.
 * With fp16 weights the conv and linear weights' offsets are into
 * v->params16 instead (and the vectors' into the shorter v->params), and
 * wmat() widens one weight at a time into v->wbuf for the op about to run.
 *
 * Every norm here is a GroupNorm with eps 1e-6 (diffusers hard-codes it for
 * the VAE, whatever norm_eps would say) and every activation is SiLU.
 */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "vae.h"

#define VAE_EPS 1e-6f
#define LOGVAR_MIN -30.0f
#define LOGVAR_MAX 20.0f

static void seterr(char *err, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, VAE_ERR_LEN, fmt, ap);
    va_end(ap);
}

/* ---------------------------------------------------------------------------
 * the module tree: offsets of parameters, and the activations a forward saved */

typedef struct { size_t w, b; int cin, cout, k; } conv_p;   /* k x k, bias always */
typedef struct { size_t w, b; int C; } norm_p;
typedef struct { size_t w, b; int in, out; } lin_p;

typedef enum { L_CONV, L_RESNET, L_ATTN, L_DOWN, L_UP, L_NORMACT } layer_kind;

typedef struct {
    layer_kind kind;
    int cin, cout;
    /* parameters (which ones are used depends on kind) */
    conv_p conv;                     /* CONV, DOWN, UP */
    norm_p norm1, norm2;             /* RESNET; NORMACT and ATTN use norm1 */
    conv_p conv1, conv2, shortcut;   /* RESNET; shortcut.cin == 0: identity */
    lin_p q, k, v, o;                /* ATTN */
    /* the input shape of the last forward */
    int B, H, W;
    /* saved by a training forward (NULL otherwise) */
    float *x;                        /* the layer's input */
    float *n1, *a1, *h1, *n2, *a2;   /* norm1, SiLU, conv1, norm2, SiLU outputs */
    float *m1, *r1, *m2, *r2;        /* group norm mean / rstd */
    float *t, *qa, *ka, *va, *att, *oa; /* ATTN: tokens, q, k, v, probabilities, attention out */
    float *xp;                       /* DOWN: padded input;  UP: upsampled input */
} layer;

struct vae_net {
    layer *enc, *dec;
    int nenc, ndec;
    float *moments;                  /* the encoder's raw output, kept for the clamp's backward */
};

static inline float *P(const vae_t *v, size_t off) { return v->params + off; }
static inline float *G(const vae_t *v, size_t off) { return v->grads ? v->grads + off : NULL; }

/* a conv / linear weight of n floats as fp32: the weights themselves, or
 * (held as fp16) widened exactly into wbuf, which then holds that one */
static const float *wmat(vae_t *v, size_t off, size_t n) {
    if (!v->params16) return v->params + off;
    return half_widen_cached(v->wbuf, &v->wbuf_of, v->params16 + off, n);
}

static size_t conv_numel(const conv_p *c) { return (size_t)c->cout * c->cin * c->k * c->k; }
static size_t lin_numel(const lin_p *l) { return (size_t)l->out * l->in; }

/* ---------------------------------------------------------------------------
 * the arena: a stack. push() hands out the next n floats; pop_to() moves the
 * most recent result down to an earlier mark, dropping everything between
 * (inference drops each layer's input, backward each layer's dL/d(output)).
 * While measuring, nothing is allocated or computed: only top and peak move. */

static float *push(vae_t *v, vae_arena *a, size_t n) {
    size_t at = a->top;
    a->top += n;
    if (a->top > a->peak) a->peak = a->top;
    if (v->measuring) return NULL;
    return a->base + at;   /* fits: the forward checked the measured peak first */
}

static float *pushz(vae_t *v, vae_arena *a, size_t n) {
    float *p = push(v, a, n);
    if (p) memset(p, 0, n * sizeof(float));
    return p;
}

static float *pop_to(vae_t *v, vae_arena *a, size_t mark, float *keep, size_t n) {
    a->top = mark + n;
    if (v->measuring) return NULL;
    if (keep != a->base + mark) memmove(a->base + mark, keep, n * sizeof(float));
    return a->base + mark;
}

/* ---------------------------------------------------------------------------
 * the ops, as the layers use them: thin wrappers over nn.h that know the
 * parameter block, skip the work while measuring, and pass NULL weight
 * gradients when the VAE is frozen. */

static void conv_fwd(vae_t *v, const conv_p *c, float *out, const float *in,
                     int B, int H, int W, int stride, int pad) {
    if (v->measuring) return;
    conv2d_forward(out, in, wmat(v, c->w, conv_numel(c)), P(v, c->b), B, c->cin, H, W, c->cout, c->k, c->k, stride, pad);
}

static void conv_bwd(vae_t *v, const conv_p *c, float *din, const float *dout, const float *in,
                     int B, int H, int W, int stride, int pad) {
    if (v->measuring) return;
    conv2d_backward(din, G(v, c->w), G(v, c->b), dout, in, wmat(v, c->w, conv_numel(c)),
                    B, c->cin, H, W, c->cout, c->k, c->k, stride, pad);
}

static void gn_fwd(vae_t *v, const norm_p *n, float *out, float *mean, float *rstd,
                   const float *in, int B, int HW) {
    if (v->measuring) return;
    groupnorm_forward(out, mean, rstd, in, P(v, n->w), P(v, n->b), B, n->C, HW, v->cfg.groups, VAE_EPS);
}

static void gn_bwd(vae_t *v, const norm_p *n, float *din, const float *dout, const float *in,
                   const float *mean, const float *rstd, int B, int HW) {
    if (v->measuring) return;
    groupnorm_backward(din, G(v, n->w), G(v, n->b), dout, in, P(v, n->w), mean, rstd,
                       B, n->C, HW, v->cfg.groups);
}

static void lin_fwd(vae_t *v, const lin_p *l, float *out, const float *in, int N) {
    if (v->measuring) return;
    linear_forward(out, in, wmat(v, l->w, lin_numel(l)), P(v, l->b), N, l->in, l->out);
}

static void lin_bwd(vae_t *v, const lin_p *l, float *din, const float *dout, const float *in, int N) {
    if (v->measuring) return;
    linear_backward(din, G(v, l->w), G(v, l->b), dout, in, wmat(v, l->w, lin_numel(l)), N, l->in, l->out);
}

static void silu_fwd(vae_t *v, float *out, const float *in, size_t n) {
    if (!v->measuring) silu_forward(out, in, n);
}

static void silu_bwd(vae_t *v, float *din, const float *dout, const float *in, size_t n) {
    if (!v->measuring) silu_backward(din, dout, in, n);
}

/* y += x */
static void add_to(vae_t *v, float *y, const float *x, size_t n) {
    if (v->measuring) return;
#ifdef _OPENMP
    #pragma omp parallel for if (n >= 16384)
#endif
    for (size_t i = 0; i < n; i++) y[i] += x[i];
}

/* out[b][j][i] = in[b][i][j]: (B, R, S) -> (B, S, R). Images (B, C, HW) and
 * token sequences (B, HW, C) are the same numbers in the two orders. */
static void transpose(vae_t *v, float *out, const float *in, int B, int R, int S) {
    if (v->measuring) return;
    for (int b = 0; b < B; b++) {
        const float *x = in + (size_t)b * R * S;
        float *y = out + (size_t)b * R * S;
#ifdef _OPENMP
        #pragma omp parallel for if ((size_t)R * S >= 16384)
#endif
        for (int j = 0; j < S; j++)
            for (int i = 0; i < R; i++) y[(size_t)j * R + i] = x[(size_t)i * S + j];
    }
}

/* ---------------------------------------------------------------------------
 * layers: forward returns the output (pushed on a), backward dL/d(input)
 * (pushed on a, NULL when !need_dx). Forward records the input shape in L. */

/* ResnetBlock2D without time embedding (output_scale_factor 1, dropout 0):
 *   h   = conv1(silu(norm1(x)))
 *   out = conv2(silu(norm2(h))) + shortcut(x)      shortcut = 1x1 conv or identity */
static float *resnet_forward(vae_t *v, vae_arena *a, layer *L, const float *x, int B, int H, int W) {
    int HW = H * W, G_ = v->cfg.groups;
    size_t ni = (size_t)B * L->cin * HW, no = (size_t)B * L->cout * HW;
    float *m1 = push(v, a, (size_t)B * G_), *r1 = push(v, a, (size_t)B * G_);
    float *m2 = push(v, a, (size_t)B * G_), *r2 = push(v, a, (size_t)B * G_);
    float *n1 = push(v, a, ni);
    gn_fwd(v, &L->norm1, n1, m1, r1, x, B, HW);
    float *a1 = v->train ? push(v, a, ni) : n1;      /* inference: SiLU in place */
    silu_fwd(v, a1, n1, ni);
    float *h1 = push(v, a, no);
    conv_fwd(v, &L->conv1, h1, a1, B, H, W, 1, 1);
    float *n2 = push(v, a, no);
    gn_fwd(v, &L->norm2, n2, m2, r2, h1, B, HW);
    float *a2 = v->train ? push(v, a, no) : n2;
    silu_fwd(v, a2, n2, no);
    float *out = push(v, a, no);
    conv_fwd(v, &L->conv2, out, a2, B, H, W, 1, 1);
    if (L->shortcut.cin) {
        float *s = push(v, a, no);
        conv_fwd(v, &L->shortcut, s, x, B, H, W, 1, 0);
        add_to(v, out, s, no);
    } else {
        add_to(v, out, x, no);
    }
    if (v->train) {
        L->n1 = n1; L->a1 = a1; L->h1 = h1; L->n2 = n2; L->a2 = a2;
        L->m1 = m1; L->r1 = r1; L->m2 = m2; L->r2 = r2;
    }
    return out;
}

/* dL/dx = norm1'(silu'(conv1'(norm2'(silu'(conv2'(dout)))))) + shortcut'(dout),
 * each ' the backward of that op at the saved input. Two ping-pong buffers
 * carry the chain (the second also holds dL/da1, which has cin channels); a
 * third of the input's size ends it. */
static float *resnet_backward(vae_t *v, vae_arena *a, layer *L, const float *dy) {
    int B = L->B, H = L->H, W = L->W, HW = H * W;
    size_t ni = (size_t)B * L->cin * HW, no = (size_t)B * L->cout * HW;
    float *dx = pushz(v, a, ni);
    float *ta = pushz(v, a, no), *tb = pushz(v, a, ni > no ? ni : no), *tc = pushz(v, a, ni);
    conv_bwd(v, &L->conv2, ta, dy, L->a2, B, H, W, 1, 1);          /* ta = dL/da2 */
    silu_bwd(v, tb, ta, L->n2, no);                                 /* tb = dL/dn2 */
    if (!v->measuring) memset(ta, 0, no * sizeof(float));
    gn_bwd(v, &L->norm2, ta, tb, L->h1, L->m2, L->r2, B, HW);       /* ta = dL/dh1 */
    if (!v->measuring) memset(tb, 0, ni * sizeof(float));
    conv_bwd(v, &L->conv1, tb, ta, L->a1, B, H, W, 1, 1);          /* tb = dL/da1 (cin channels) */
    silu_bwd(v, tc, tb, L->n1, ni);                                 /* tc = dL/dn1 */
    gn_bwd(v, &L->norm1, dx, tc, L->x, L->m1, L->r1, B, HW);
    if (L->shortcut.cin) conv_bwd(v, &L->shortcut, dx, dy, L->x, B, H, W, 1, 0);
    else add_to(v, dx, dy, no);
    return dx;
}

/* Mid-block attention (diffusers Attention, one head of width C, as the
 * deprecated AttentionBlock it replaced): on the T = H*W pixels as tokens,
 *   t = norm(x)^T                        (B, T, C)
 *   q, k, v = t Wq^T + bq, t Wk^T + bk, t Wv^T + bv
 *   o = softmax(q k^T / sqrt(C)) v
 *   out = x + (o Wo^T + bo)^T            (residual, rescale_output_factor 1) */
static float *attn_forward(vae_t *v, vae_arena *a, layer *L, const float *x, int B, int H, int W) {
    int C = L->cin, T = H * W, G_ = v->cfg.groups;
    size_t n = (size_t)B * C * T;
    float *m = push(v, a, (size_t)B * G_), *r = push(v, a, (size_t)B * G_);
    float *nx = push(v, a, n);
    gn_fwd(v, &L->norm1, nx, m, r, x, B, T);
    float *t = push(v, a, n);
    transpose(v, t, nx, B, C, T);
    float *q = push(v, a, n), *k = push(v, a, n), *vv = push(v, a, n);
    lin_fwd(v, &L->q, q, t, B * T);
    lin_fwd(v, &L->k, k, t, B * T);
    lin_fwd(v, &L->v, vv, t, B * T);
    /* training keeps the probabilities (B T^2 floats: 64 MiB per image at
     * 512 px) so the backward does not recompute q k^T */
    float *att = v->train ? push(v, a, (size_t)B * T * T) : NULL;
    float *o = push(v, a, n);
    if (!v->measuring) attention_forward(o, att, q, k, vv, B, T, T, 1, C, 0);
    float *p = push(v, a, n);
    lin_fwd(v, &L->o, p, o, B * T);
    float *out = push(v, a, n);
    transpose(v, out, p, B, T, C);
    add_to(v, out, x, n);
    if (v->train) {
        L->m1 = m; L->r1 = r; L->t = t;
        L->qa = q; L->ka = k; L->va = vv; L->att = att; L->oa = o;
    }
    return out;
}

static float *attn_backward(vae_t *v, vae_arena *a, layer *L, const float *dy) {
    int B = L->B, C = L->cin, T = L->H * L->W;
    size_t n = (size_t)B * C * T;
    float *dx = pushz(v, a, n);
    add_to(v, dx, dy, n);                                   /* the residual */
    float *dp = push(v, a, n);
    transpose(v, dp, dy, B, C, T);
    float *dout = pushz(v, a, n);
    lin_bwd(v, &L->o, dout, dp, L->oa, B * T);
    float *dq = pushz(v, a, n), *dk = pushz(v, a, n), *dv = pushz(v, a, n);
    if (!v->measuring)
        attention_backward(dq, dk, dv, dout, L->qa, L->ka, L->va, L->att, B, T, T, 1, C, 0);
    float *dt = pushz(v, a, n);                             /* q, k, v all read t */
    lin_bwd(v, &L->q, dt, dq, L->t, B * T);
    lin_bwd(v, &L->k, dt, dk, L->t, B * T);
    lin_bwd(v, &L->v, dt, dv, L->t, B * T);
    float *dn = push(v, a, n);
    transpose(v, dn, dt, B, T, C);
    gn_bwd(v, &L->norm1, dx, dn, L->x, L->m1, L->r1, B, T);
    return dx;
}

/* Downsample2D with padding=0: pad one zero row at the bottom and one zero
 * column at the right (F.pad(x, (0, 1, 0, 1))), then a 3x3 stride-2 conv:
 *   xp (H+1, W+1),  out side = (side + 1 - 3) / 2 + 1 = floor(side / 2).
 * Not the UNet's symmetric pad-1 downsample: the two differ at every
 * output pixel's window, so SD checkpoints only match with this one. */
static float *down_forward(vae_t *v, vae_arena *a, layer *L, const float *x, int B, int H, int W) {
    int C = L->cin, Hp = H + 1, Wp = W + 1, Ho = (Hp - 3) / 2 + 1, Wo = (Wp - 3) / 2 + 1;
    float *xp = push(v, a, (size_t)B * C * Hp * Wp);
    if (!v->measuring) {
        for (int bc = 0; bc < B * C; bc++) {
            const float *s = x + (size_t)bc * H * W;
            float *d = xp + (size_t)bc * Hp * Wp;
            for (int i = 0; i < H; i++) {
                memcpy(d + (size_t)i * Wp, s + (size_t)i * W, (size_t)W * sizeof(float));
                d[(size_t)i * Wp + W] = 0.0f;
            }
            memset(d + (size_t)H * Wp, 0, (size_t)Wp * sizeof(float));
        }
    }
    float *out = push(v, a, (size_t)B * L->cout * Ho * Wo);
    conv_fwd(v, &L->conv, out, xp, B, Hp, Wp, 2, 0);
    if (v->train) L->xp = xp;
    return out;
}

static float *down_backward(vae_t *v, vae_arena *a, layer *L, const float *dy) {
    int B = L->B, C = L->cin, H = L->H, W = L->W, Hp = H + 1, Wp = W + 1;
    float *dxp = pushz(v, a, (size_t)B * C * Hp * Wp);
    conv_bwd(v, &L->conv, dxp, dy, L->xp, B, Hp, Wp, 2, 0);
    float *dx = push(v, a, (size_t)B * C * H * W);
    if (!v->measuring) {                  /* the padding's gradient goes nowhere */
        for (int bc = 0; bc < B * C; bc++)
            for (int i = 0; i < H; i++)
                memcpy(dx + ((size_t)bc * H + i) * W, dxp + ((size_t)bc * Hp + i) * Wp,
                       (size_t)W * sizeof(float));
    }
    return dx;
}

/* Upsample2D: nearest 2x, then a 3x3 conv (pad 1) */
static float *up_forward(vae_t *v, vae_arena *a, layer *L, const float *x, int B, int H, int W) {
    int C = L->cin;
    float *u = push(v, a, (size_t)B * C * 4 * H * W);
    if (!v->measuring) upsample2x_forward(u, x, B, C, H, W);
    float *out = push(v, a, (size_t)B * L->cout * 4 * H * W);
    conv_fwd(v, &L->conv, out, u, B, 2 * H, 2 * W, 1, 1);
    if (v->train) L->xp = u;
    return out;
}

static float *up_backward(vae_t *v, vae_arena *a, layer *L, const float *dy) {
    int B = L->B, C = L->cin, H = L->H, W = L->W;
    float *du = pushz(v, a, (size_t)B * C * 4 * H * W);
    conv_bwd(v, &L->conv, du, dy, L->xp, B, 2 * H, 2 * W, 1, 1);
    float *dx = pushz(v, a, (size_t)B * C * H * W);
    if (!v->measuring) upsample2x_backward(dx, du, B, C, H, W);
    return dx;
}

/* conv_norm_out then conv_act: out = silu(norm(x)) */
static float *normact_forward(vae_t *v, vae_arena *a, layer *L, const float *x, int B, int H, int W) {
    int HW = H * W, G_ = v->cfg.groups;
    size_t n = (size_t)B * L->cin * HW;
    float *m = push(v, a, (size_t)B * G_), *r = push(v, a, (size_t)B * G_);
    float *nx = push(v, a, n);
    gn_fwd(v, &L->norm1, nx, m, r, x, B, HW);
    float *out = v->train ? push(v, a, n) : nx;
    silu_fwd(v, out, nx, n);
    if (v->train) { L->n1 = nx; L->m1 = m; L->r1 = r; }
    return out;
}

static float *normact_backward(vae_t *v, vae_arena *a, layer *L, const float *dy) {
    int B = L->B, HW = L->H * L->W;
    size_t n = (size_t)B * L->cin * HW;
    float *dn = pushz(v, a, n);
    silu_bwd(v, dn, dy, L->n1, n);
    float *dx = pushz(v, a, n);
    gn_bwd(v, &L->norm1, dx, dn, L->x, L->m1, L->r1, B, HW);
    return dx;
}

/* a k x k conv, stride 1, "same" padding (conv_in, conv_out: 3x3; quant_conv: 1x1) */
static float *conv_forward_layer(vae_t *v, vae_arena *a, layer *L, const float *x, int B, int H, int W) {
    float *out = push(v, a, (size_t)B * L->cout * H * W);
    conv_fwd(v, &L->conv, out, x, B, H, W, 1, L->conv.k / 2);
    return out;
}

static float *conv_backward_layer(vae_t *v, vae_arena *a, layer *L, const float *dy, int need_dx) {
    float *dx = need_dx ? pushz(v, a, (size_t)L->B * L->cin * L->H * L->W) : NULL;
    if (need_dx || v->grads) conv_bwd(v, &L->conv, dx, dy, L->x, L->B, L->H, L->W, 1, L->conv.k / 2);
    return dx;
}

static float *layer_forward(vae_t *v, vae_arena *a, layer *L, const float *x, int B, int *H, int *W) {
    L->B = B; L->H = *H; L->W = *W;
    L->x = v->train ? (float *)x : NULL;
    switch (L->kind) {
    case L_CONV:    return conv_forward_layer(v, a, L, x, B, *H, *W);
    case L_RESNET:  return resnet_forward(v, a, L, x, B, *H, *W);
    case L_ATTN:    return attn_forward(v, a, L, x, B, *H, *W);
    case L_NORMACT: return normact_forward(v, a, L, x, B, *H, *W);
    case L_DOWN: {
        float *out = down_forward(v, a, L, x, B, *H, *W);
        *H = (*H - 2) / 2 + 1; *W = (*W - 2) / 2 + 1;
        return out;
    }
    case L_UP: {
        float *out = up_forward(v, a, L, x, B, *H, *W);
        *H *= 2; *W *= 2;
        return out;
    }
    }
    return NULL;
}

static float *layer_backward(vae_t *v, vae_arena *a, layer *L, const float *dy, int need_dx) {
    switch (L->kind) {
    case L_CONV:    return conv_backward_layer(v, a, L, dy, need_dx);
    case L_RESNET:  return resnet_backward(v, a, L, dy);
    case L_ATTN:    return attn_backward(v, a, L, dy);
    case L_NORMACT: return normact_backward(v, a, L, dy);
    case L_DOWN:    return down_backward(v, a, L, dy);
    case L_UP:      return up_backward(v, a, L, dy);
    }
    return NULL;
}

/* Run n layers on x, which sits at the bottom of the arena (offset 0).
 * Inference moves each output down onto its input, so the arena holds one
 * layer's worth at a time; training keeps everything. Returns the output;
 * *H, *W, *C become its shape. */
static float *run_forward(vae_t *v, vae_arena *a, layer *Ls, int n, float *x, int B, int *H, int *W) {
    for (int i = 0; i < n; i++) {
        float *y = layer_forward(v, a, &Ls[i], x, B, H, W);
        if (!v->train) y = pop_to(v, a, 0, y, (size_t)B * Ls[i].cout * *H * *W);
        x = y;
    }
    return x;
}

/* dy sits at the arena's top (offset mark); each layer's dL/d(input) is moved
 * down onto it. need_dx: whether the first layer's input gradient is wanted. */
static float *run_backward(vae_t *v, vae_arena *a, layer *Ls, int n, float *dy, size_t mark, int need_dx) {
    for (int i = n - 1; i >= 0; i--) {
        layer *L = &Ls[i];
        int want = i > 0 || need_dx;
        float *dx = layer_backward(v, a, L, dy, want);
        if (!want) { a->top = mark; return NULL; }
        dy = pop_to(v, a, mark, dx, (size_t)L->B * L->cin * L->H * L->W);
    }
    return dy;
}

/* ---------------------------------------------------------------------------
 * config */

static const char *const known_keys[] = {
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
    "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size",
    "scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast",
    "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention", NULL
};

/* a whole number in [lo, hi] under key, or dflt when absent */
static int cfg_int(const json *j, const char *key, int dflt, int lo, int hi, int *out, char *err) {
    const json *x = json_get(j, key);
    if (!x) { *out = dflt; return 0; }
    if (x->type != JSON_NUMBER || x->number != floor(x->number) || x->number < lo || x->number > hi) {
        seterr(err, "key '%s': expected a whole number in [%d, %d]", key, lo, hi);
        return -1;
    }
    *out = (int)x->number;
    return 0;
}

static int cfg_bool(const json *j, const char *key, int dflt, int *out, char *err) {
    const json *x = json_get(j, key);
    if (!x) { *out = dflt; return 0; }
    if (x->type != JSON_BOOL) { seterr(err, "key '%s': expected true or false", key); return -1; }
    *out = x->boolean;
    return 0;
}

/* an array of n block type names, each equal to want */
static int cfg_types(const json *j, const char *key, const char *want, int n, char *err) {
    const json *x = json_get(j, key);
    if (!x) {
        if (n == 1) return 0;     /* diffusers' default is one such block */
        seterr(err, "key '%s' is missing (it needs %d entries, one per block_out_channels)", key, n);
        return -1;
    }
    if (x->type != JSON_ARRAY || x->n != n) {
        seterr(err, "key '%s': expected an array of %d block types (as many as block_out_channels)", key, n);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        const json *s = &x->items[i];
        if (s->type != JSON_STRING || strcmp(s->string, want) != 0) {
            seterr(err, "key '%s'[%d]: '%s' is not supported (only %s)", key, i,
                   s->type == JSON_STRING ? s->string : "(not a string)", want);
            return -1;
        }
    }
    return 0;
}

int vae_config_from_json(vae_config *c, const json *j, char *err) {
    memset(c, 0, sizeof *c);
    if (!j || j->type != JSON_OBJECT) { seterr(err, "config: not a JSON object"); return -1; }
    for (int i = 0; i < j->n; i++) {
        const char *k = j->keys[i];
        if (k[0] == '_') continue;              /* _class_name, _diffusers_version, ... */
        int known = 0;
        for (int q = 0; known_keys[q]; q++) known |= strcmp(k, known_keys[q]) == 0;
        if (!known) {
            seterr(err, "key '%s' is not supported by this AutoencoderKL (remove it or use a plain SD1.x VAE)", k);
            return -1;
        }
    }
    /* defaults are diffusers' AutoencoderKL.__init__ defaults */
    if (cfg_int(j, "in_channels", 3, 1, 4096, &c->in_channels, err) ||
        cfg_int(j, "out_channels", 3, 1, 4096, &c->out_channels, err) ||
        cfg_int(j, "latent_channels", 4, 1, 4096, &c->latent_channels, err) ||
        cfg_int(j, "layers_per_block", 1, 1, 64, &c->layers, err) ||
        cfg_int(j, "norm_num_groups", 32, 1, 4096, &c->groups, err) ||
        cfg_bool(j, "mid_block_add_attention", 1, &c->mid_attn, err) ||
        cfg_bool(j, "use_quant_conv", 1, &c->quant_conv, err) ||
        cfg_bool(j, "use_post_quant_conv", 1, &c->post_quant_conv, err))
        return -1;
    int force_upcast;
    if (cfg_bool(j, "force_upcast", 1, &force_upcast, err)) return -1;   /* fp32 always: nothing to do */

    const json *bo = json_get(j, "block_out_channels");
    if (!bo) {
        c->nlevels = 1; c->block_out[0] = 64;
    } else {
        if (bo->type != JSON_ARRAY || bo->n < 1 || bo->n > VAE_MAX_LEVELS) {
            seterr(err, "key 'block_out_channels': expected an array of 1 to %d channel counts", VAE_MAX_LEVELS);
            return -1;
        }
        c->nlevels = bo->n;
        for (int i = 0; i < bo->n; i++) {
            const json *x = &bo->items[i];
            if (x->type != JSON_NUMBER || x->number != floor(x->number) || x->number < 1 || x->number > 65536) {
                seterr(err, "key 'block_out_channels'[%d]: expected a positive whole number", i);
                return -1;
            }
            c->block_out[i] = (int)x->number;
        }
    }
    for (int i = 0; i < c->nlevels; i++) {
        if (c->block_out[i] % c->groups != 0) {
            seterr(err, "key 'norm_num_groups': %d does not divide block_out_channels[%d] = %d",
                   c->groups, i, c->block_out[i]);
            return -1;
        }
    }
    if (cfg_types(j, "down_block_types", "DownEncoderBlock2D", c->nlevels, err) ||
        cfg_types(j, "up_block_types", "UpDecoderBlock2D", c->nlevels, err))
        return -1;

    const char *act = json_str(j, "act_fn", "silu");
    const json *actj = json_get(j, "act_fn");
    if ((actj && actj->type != JSON_STRING) || (strcmp(act, "silu") != 0 && strcmp(act, "swish") != 0)) {
        seterr(err, "key 'act_fn': '%s' is not supported (only silu)", actj && actj->type == JSON_STRING ? act : "?");
        return -1;
    }

    const json *sc = json_get(j, "scaling_factor");
    c->scaling_factor = 0.18215f;
    if (sc) {
        if (sc->type != JSON_NUMBER || !(sc->number > 0) || !isfinite(sc->number)) {
            seterr(err, "key 'scaling_factor': expected a positive number");
            return -1;
        }
        c->scaling_factor = (float)sc->number;
    }
    const json *sh = json_get(j, "shift_factor");
    if (sh && sh->type != JSON_NULL) {
        if (sh->type != JSON_NUMBER || !isfinite(sh->number)) {
            seterr(err, "key 'shift_factor': expected a number or null");
            return -1;
        }
        c->shift_factor = (float)sh->number;
    }
    const char *perchan[2] = { "latents_mean", "latents_std" };
    for (int i = 0; i < 2; i++) {
        const json *x = json_get(j, perchan[i]);
        if (x && x->type != JSON_NULL) {
            seterr(err, "key '%s': per-channel latent statistics are not supported (SD1.x has null)", perchan[i]);
            return -1;
        }
    }
    const json *ss = json_get(j, "sample_size");
    c->sample_size = 32;
    if (ss) {
        const json *x = ss->type == JSON_ARRAY && ss->n >= 1 ? &ss->items[0] : ss;
        if (x->type != JSON_NUMBER || x->number < 1 || x->number > 1e6) {
            seterr(err, "key 'sample_size': expected a positive number or [h, w]");
            return -1;
        }
        c->sample_size = (int)x->number;
    }
    return 0;
}

/* ---------------------------------------------------------------------------
 * building: the layer lists and the parameter table, in one walk */

typedef struct {
    vae_t *v;
    int cap;
    size_t n;          /* floats so far */
    size_t nmat;       /* of which in matrices (ndim >= 2) */
    int fail;
} builder;

static size_t add_param(builder *b, const char *name, int ndim, int s0, int s1, int s2, int s3) {
    vae_t *v = b->v;
    if (b->fail) return 0;
    if (v->ntable == b->cap) {
        int ncap = b->cap ? 2 * b->cap : 128;
        vae_param *t = realloc(v->table, (size_t)ncap * sizeof *t);
        if (!t) { b->fail = 1; return 0; }
        v->table = t; b->cap = ncap;
    }
    vae_param *p = &v->table[v->ntable++];
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "%s", name);
    int s[4] = { s0, s1, s2, s3 };
    size_t numel = 1;
    p->ndim = ndim;
    for (int i = 0; i < ndim; i++) { p->shape[i] = s[i]; numel *= (size_t)s[i]; }
    p->offset = b->n;
    p->numel = numel;
    /* where the layers address it: the fp32 layout, or with fp16 weights
     * the matrices' block / the vectors' block */
    size_t at = p->offset;
    if (v->wdtype == WEIGHT_F16) at = ndim >= 2 ? b->nmat : b->n - b->nmat;
    b->n += numel;
    if (ndim >= 2) b->nmat += numel;
    return at;
}

/* "<prefix>.<leaf>.weight" and ".bias" */
static void name2(char *out, const char *prefix, const char *leaf, const char *wb) {
    snprintf(out, VAE_NAME_LEN, "%s%s%s.%s", prefix, leaf[0] ? "." : "", leaf, wb);
}

static conv_p mk_conv(builder *b, const char *prefix, const char *leaf, int cin, int cout, int k) {
    char nm[VAE_NAME_LEN];
    conv_p c = { 0, 0, cin, cout, k };
    name2(nm, prefix, leaf, "weight"); c.w = add_param(b, nm, 4, cout, cin, k, k);
    name2(nm, prefix, leaf, "bias");   c.b = add_param(b, nm, 1, cout, 0, 0, 0);
    return c;
}

static norm_p mk_norm(builder *b, const char *prefix, const char *leaf, int C) {
    char nm[VAE_NAME_LEN];
    norm_p n = { 0, 0, C };
    name2(nm, prefix, leaf, "weight"); n.w = add_param(b, nm, 1, C, 0, 0, 0);
    name2(nm, prefix, leaf, "bias");   n.b = add_param(b, nm, 1, C, 0, 0, 0);
    return n;
}

static lin_p mk_lin(builder *b, const char *prefix, const char *leaf, int in, int out) {
    char nm[VAE_NAME_LEN];
    lin_p l = { 0, 0, in, out };
    name2(nm, prefix, leaf, "weight"); l.w = add_param(b, nm, 2, out, in, 0, 0);
    name2(nm, prefix, leaf, "bias");   l.b = add_param(b, nm, 1, out, 0, 0, 0);
    return l;
}

static layer *next_layer(layer *Ls, int *n, layer_kind kind, int cin, int cout) {
    layer *L = &Ls[(*n)++];
    memset(L, 0, sizeof *L);
    L->kind = kind; L->cin = cin; L->cout = cout;
    return L;
}

static void mk_resnet(builder *b, layer *Ls, int *n, const char *prefix, int cin, int cout) {
    layer *L = next_layer(Ls, n, L_RESNET, cin, cout);
    L->norm1 = mk_norm(b, prefix, "norm1", cin);
    L->conv1 = mk_conv(b, prefix, "conv1", cin, cout, 3);
    L->norm2 = mk_norm(b, prefix, "norm2", cout);
    L->conv2 = mk_conv(b, prefix, "conv2", cout, cout, 3);
    if (cin != cout) L->shortcut = mk_conv(b, prefix, "conv_shortcut", cin, cout, 1);
}

/* UNetMidBlock2D: resnets.0, attentions.0 (optional), resnets.1 */
static void mk_mid(builder *b, layer *Ls, int *n, const char *half, int C, int attn) {
    char pre[VAE_NAME_LEN];
    snprintf(pre, sizeof pre, "%s.mid_block.resnets.0", half);
    mk_resnet(b, Ls, n, pre, C, C);
    if (attn) {
        snprintf(pre, sizeof pre, "%s.mid_block.attentions.0", half);
        layer *L = next_layer(Ls, n, L_ATTN, C, C);
        L->norm1 = mk_norm(b, pre, "group_norm", C);
        L->q = mk_lin(b, pre, "to_q", C, C);
        L->k = mk_lin(b, pre, "to_k", C, C);
        L->v = mk_lin(b, pre, "to_v", C, C);
        L->o = mk_lin(b, pre, "to_out.0", C, C);
    }
    snprintf(pre, sizeof pre, "%s.mid_block.resnets.1", half);
    mk_resnet(b, Ls, n, pre, C, C);
}

int vae_build(vae_t *v, const vae_config *c, char *err) {
    return vae_build_dtype(v, c, WEIGHT_F32, err);
}

int vae_build_dtype(vae_t *v, const vae_config *c, weight_dtype wdtype, char *err) {
    memset(v, 0, sizeof *v);
    v->cfg = *c;
    v->wdtype = wdtype;
    v->wbuf_of = NULL;
    int nl = c->nlevels, lpb = c->layers, Lc = c->latent_channels;
    const int *bo = c->block_out;
    /* layers per half: convs and norm, resnets, samplers, mid (3) */
    int maxl = 8 + nl * (lpb + 2);
    v->net = calloc(1, sizeof *v->net);
    if (v->net) {
        v->net->enc = calloc((size_t)maxl, sizeof(layer));
        v->net->dec = calloc((size_t)maxl, sizeof(layer));
    }
    if (!v->net || !v->net->enc || !v->net->dec) {
        vae_free(v);
        seterr(err, "vae: out of memory building the model");
        return -1;
    }
    builder b = { v, 0, 0, 0, 0 };
    char pre[VAE_NAME_LEN];
    layer *E = v->net->enc, *D = v->net->dec;
    int ne = 0, nd = 0;
    layer *L;

    /* encoder */
    L = next_layer(E, &ne, L_CONV, c->in_channels, bo[0]);
    L->conv = mk_conv(&b, "encoder.conv_in", "", c->in_channels, bo[0], 3);
    int ch = bo[0];
    for (int i = 0; i < nl; i++) {
        for (int r = 0; r < lpb; r++) {
            snprintf(pre, sizeof pre, "encoder.down_blocks.%d.resnets.%d", i, r);
            mk_resnet(&b, E, &ne, pre, ch, bo[i]);
            ch = bo[i];
        }
        if (i < nl - 1) {
            snprintf(pre, sizeof pre, "encoder.down_blocks.%d.downsamplers.0.conv", i);
            L = next_layer(E, &ne, L_DOWN, ch, ch);
            L->conv = mk_conv(&b, pre, "", ch, ch, 3);
        }
    }
    mk_mid(&b, E, &ne, "encoder", ch, c->mid_attn);
    L = next_layer(E, &ne, L_NORMACT, ch, ch);
    L->norm1 = mk_norm(&b, "encoder.conv_norm_out", "", ch);
    L = next_layer(E, &ne, L_CONV, ch, 2 * Lc);           /* double_z: mean and logvar */
    L->conv = mk_conv(&b, "encoder.conv_out", "", ch, 2 * Lc, 3);
    if (c->quant_conv) {
        L = next_layer(E, &ne, L_CONV, 2 * Lc, 2 * Lc);
        L->conv = mk_conv(&b, "quant_conv", "", 2 * Lc, 2 * Lc, 1);
    }

    /* decoder (channels walk block_out_channels backwards) */
    if (c->post_quant_conv) {
        L = next_layer(D, &nd, L_CONV, Lc, Lc);
        L->conv = mk_conv(&b, "post_quant_conv", "", Lc, Lc, 1);
    }
    ch = bo[nl - 1];
    L = next_layer(D, &nd, L_CONV, Lc, ch);
    L->conv = mk_conv(&b, "decoder.conv_in", "", Lc, ch, 3);
    mk_mid(&b, D, &nd, "decoder", ch, c->mid_attn);
    for (int i = 0; i < nl; i++) {
        int co = bo[nl - 1 - i];
        for (int r = 0; r < lpb + 1; r++) {
            snprintf(pre, sizeof pre, "decoder.up_blocks.%d.resnets.%d", i, r);
            mk_resnet(&b, D, &nd, pre, ch, co);
            ch = co;
        }
        if (i < nl - 1) {
            snprintf(pre, sizeof pre, "decoder.up_blocks.%d.upsamplers.0.conv", i);
            L = next_layer(D, &nd, L_UP, ch, ch);
            L->conv = mk_conv(&b, pre, "", ch, ch, 3);
        }
    }
    L = next_layer(D, &nd, L_NORMACT, ch, ch);
    L->norm1 = mk_norm(&b, "decoder.conv_norm_out", "", ch);
    L = next_layer(D, &nd, L_CONV, ch, c->out_channels);
    L->conv = mk_conv(&b, "decoder.conv_out", "", ch, c->out_channels, 3);

    v->net->nenc = ne; v->net->ndec = nd;
    v->nparams = b.n;
    v->nmat = b.nmat;
    int f16 = wdtype == WEIGHT_F16;
    size_t big = 1;
    for (int i = 0; !b.fail && i < v->ntable; i++)
        if (v->table[i].ndim >= 2 && v->table[i].numel > big) big = v->table[i].numel;
    v->params = b.fail ? NULL : calloc(f16 ? b.n - b.nmat + 1 : b.n, sizeof(float));
    if (f16 && v->params) {
        v->params16 = calloc(b.nmat + 1, sizeof(uint16_t));
        v->wbuf = malloc(sizeof(float) * big);
    }
    if (!v->params || (f16 && (!v->params16 || !v->wbuf))) {
        vae_free(v);
        seterr(err, "vae: out of memory for %zu parameters", b.n);
        return -1;
    }
    /* each table entry's data, in the same order add_param handed out offsets */
    size_t nm = 0, nv = 0;
    for (int i = 0; i < v->ntable; i++) {
        vae_param *p = &v->table[i];
        if (f16 && p->ndim >= 2) { p->data16 = v->params16 + nm; nm += p->numel; }
        else if (f16) { p->data = v->params + nv; nv += p->numel; }
        else p->data = v->params + p->offset;
    }
    return 0;
}

void vae_free(vae_t *v) {
    if (v->net) { free(v->net->enc); free(v->net->dec); free(v->net); }
    free(v->params); free(v->params16); free(v->wbuf); free(v->grads); free(v->table);
    free(v->enc.base); free(v->dec.base);
    memset(v, 0, sizeof *v);
}

int vae_param_index(const vae_t *v, const char *name) {
    for (int i = 0; i < v->ntable; i++)
        if (strcmp(v->table[i].name, name) == 0) return i;
    return -1;
}

int vae_alloc_grads(vae_t *v) {
    if (v->params16) {
        seterr(v->err, "vae: training the VAE needs fp32 weights (load with --weight-dtype fp32)");
        return -1;
    }
    if (!v->grads) v->grads = calloc(v->nparams, sizeof(float));
    if (!v->grads) { seterr(v->err, "vae: out of memory for %zu weight gradients", v->nparams); return -1; }
    return 0;
}

void vae_zero_grads(vae_t *v) {
    if (v->grads) memset(v->grads, 0, v->nparams * sizeof(float));
}

/* ---------------------------------------------------------------------------
 * loading */

static int same_shape(const vae_param *p, const st_tensor *t) {
    if (t->ndim == p->ndim) {
        for (int i = 0; i < p->ndim; i++) if (t->shape[i] != p->shape[i]) return 0;
        return 1;
    }
    /* a linear (O, I) stored as a 1x1 conv (O, I, 1, 1), or the reverse:
     * the same numbers in the same order */
    const int64_t *ts = t->shape;
    if (p->ndim == 2 && t->ndim == 4)
        return ts[0] == p->shape[0] && ts[1] == p->shape[1] && ts[2] == 1 && ts[3] == 1;
    if (p->ndim == 4 && t->ndim == 2)
        return ts[0] == p->shape[0] && ts[1] == p->shape[1] && p->shape[2] == 1 && p->shape[3] == 1;
    return 0;
}

static void shape_str(char *out, size_t len, int ndim, const int64_t *s) {
    size_t k = 0;
    k += (size_t)snprintf(out + k, len - k, "(");
    for (int i = 0; i < ndim && k < len; i++)
        k += (size_t)snprintf(out + k, len - k, "%s%lld", i ? ", " : "", (long long)s[i]);
    if (k < len) snprintf(out + k, len - k, ")");
}

int vae_load_st(vae_t *v, const st_file *f, vae_name_fn map, void *ctx,
                const char *extra_prefix, char *err) {
    unsigned char *used = calloc((size_t)f->ntensors + 1, 1);
    if (!used) { seterr(err, "%s: out of memory", f->path); return -1; }
    int rc = -1;
    for (int i = 0; i < v->ntable; i++) {
        const vae_param *p = &v->table[i];
        char buf[256];
        const char *fname = map ? map(p->name, ctx, buf, sizeof buf) : p->name;
        const st_tensor *t = fname ? st_find(f, fname) : NULL;
        if (!t) {
            seterr(err, "%s: tensor '%s' is missing (the VAE config asks for it: is this the right file or config?)",
                   f->path, fname ? fname : p->name);
            goto done;
        }
        if (!same_shape(p, t)) {
            char want[96], got[96];
            int64_t ps[4];
            for (int d = 0; d < p->ndim; d++) ps[d] = p->shape[d];
            shape_str(want, sizeof want, p->ndim, ps);
            shape_str(got, sizeof got, t->ndim, t->shape);
            seterr(err, "%s: tensor '%s' has shape %s, the config asks for %s (config and weights do not match)",
                   f->path, t->name, got, want);
            goto done;
        }
        char serr[ST_ERR_LEN];
        v->wbuf_of = NULL;   /* the widened copy may be of this weight */
        if ((p->data16 ? st_to_f16(t, p->data16, serr) : st_to_f32(t, p->data, serr)) != 0) {
            seterr(err, "%s: tensor '%s': %s", f->path, t->name, serr);
            goto done;
        }
        st_release(f, t);   /* copied: the mapped pages can go (a lower load peak) */
        used[t - f->tensors] = 1;
    }
    if (extra_prefix) {
        size_t lp = strlen(extra_prefix);
        for (int i = 0; i < f->ntensors; i++) {
            if (!used[i] && strncmp(f->tensors[i].name, extra_prefix, lp) == 0) {
                seterr(err, "%s: tensor '%s' is not part of this VAE (the config and the weights do not match)",
                       f->path, f->tensors[i].name);
                goto done;
            }
        }
    }
    rc = 0;
done:
    free(used);
    return rc;
}

/* diffusers files written before the Attention rewrite call the mid-block
 * attention's linears query/key/value/proj_attn; same shapes, same math */
static const char *diffusers_name(const char *name, void *ctx, char *buf, size_t len) {
    const st_file *f = ctx;
    if (st_find(f, name)) return name;
    static const char *const renames[][2] = {
        { ".to_q.", ".query." }, { ".to_k.", ".key." }, { ".to_v.", ".value." }, { ".to_out.0.", ".proj_attn." },
    };
    for (int i = 0; i < 4; i++) {
        const char *at = strstr(name, renames[i][0]);
        if (!at) continue;
        snprintf(buf, len, "%.*s%s%s", (int)(at - name), name, renames[i][1], at + strlen(renames[i][0]));
        if (st_find(f, buf)) return buf;
    }
    return name;
}

/* the whole file as a string (NULL + message on failure) */
static char *read_text(const char *path, size_t *len, char *err) {
    FILE *fp = fopen(path, "rb");
    if (!fp) { seterr(err, "%s: cannot open: %s (is the VAE folder right?)", path, strerror(errno)); return NULL; }
    size_t cap = 4096, n = 0;
    char *s = malloc(cap);
    while (s) {
        if (n == cap) {
            if (cap >= ((size_t)16 << 20)) { free(s); s = NULL; seterr(err, "%s: larger than 16 MiB, not a config", path); fclose(fp); return NULL; }
            char *t = realloc(s, cap * 2);
            if (!t) { free(s); s = NULL; break; }
            s = t; cap *= 2;
        }
        size_t k = fread(s + n, 1, cap - n, fp);
        n += k;
        if (k == 0) break;
    }
    int bad = ferror(fp);
    fclose(fp);
    if (!s || bad) { free(s); seterr(err, "%s: read failed", path); return NULL; }
    *len = n;
    return s;
}

int vae_load_diffusers(vae_t *v, const char *dir, char *err) {
    return vae_load_diffusers_dtype(v, dir, WEIGHT_F32, err);
}

int vae_load_diffusers_dtype(vae_t *v, const char *dir, weight_dtype wdtype, char *err) {
    char path[1024], jerr[256];
    snprintf(path, sizeof path, "%s/config.json", dir);
    memset(v, 0, sizeof *v);
    size_t len = 0;
    char *text = read_text(path, &len, err);
    if (!text) return -1;
    json *j = json_parse(text, len, jerr, sizeof jerr);
    free(text);
    if (!j) { seterr(err, "%s: %s (not valid JSON)", path, jerr); return -1; }
    vae_config c;
    char cerr[VAE_ERR_LEN];
    int rc = vae_config_from_json(&c, j, cerr);
    json_free(j);
    if (rc) { seterr(err, "%s: %s", path, cerr); return -1; }
    if (vae_build_dtype(v, &c, wdtype, err)) return -1;

    snprintf(path, sizeof path, "%s/diffusion_pytorch_model.safetensors", dir);
    st_file f;
    char serr[ST_ERR_LEN];
    if (st_open(&f, path, serr)) { seterr(err, "%s", serr); vae_free(v); return -1; }
    rc = vae_load_st(v, &f, diffusers_name, &f, "", err);
    st_close(&f);
    if (rc) vae_free(v);
    return rc;
}

/* ---------------------------------------------------------------------------
 * running */

int vae_latent_side(const vae_config *c, int side) {
    for (int i = 0; i < c->nlevels - 1; i++) {
        if (side < 2) return 0;
        side /= 2;              /* (side + 1 - 3) / 2 + 1 */
    }
    return side;
}

/* arena floats one forward (and, training, its backward) of this half needs */
static size_t measure(vae_t *v, int dec, int B, int H, int W) {
    vae_arena a = { NULL, 0, 0, 0 };
    layer *Ls = dec ? v->net->dec : v->net->enc;
    int n = dec ? v->net->ndec : v->net->nenc;
    int cin = Ls[0].cin, h = H, w = W;
    v->measuring = 1;
    push(v, &a, (size_t)B * cin * H * W);                    /* the input copy */
    run_forward(v, &a, Ls, n, NULL, B, &h, &w);
    if (v->train) {
        size_t mark = a.top;
        push(v, &a, (size_t)B * Ls[n - 1].cout * h * w);     /* dL/d(output) */
        run_backward(v, &a, Ls, n, NULL, mark, 1);
    }
    v->measuring = 0;
    return a.peak;
}

int vae_alloc_acts(vae_t *v, int B, int H, int W, int train) {
    int h = vae_latent_side(&v->cfg, H), w = vae_latent_side(&v->cfg, W);
    if (B < 1 || h < 1 || w < 1) {
        seterr(v->err, "vae: cannot size activations for %d images of %dx%d (too small to downsample %d times)",
               B, H, W, v->cfg.nlevels - 1);
        return -1;
    }
    v->train = train;
    size_t ne = measure(v, 0, B, H, W), nd = measure(v, 1, B, h, w);
    free(v->enc.base); free(v->dec.base);
    memset(&v->enc, 0, sizeof v->enc); memset(&v->dec, 0, sizeof v->dec);
    v->enc.base = malloc(ne * sizeof(float));
    v->dec.base = malloc(nd * sizeof(float));
    if (!v->enc.base || !v->dec.base) {
        free(v->enc.base); free(v->dec.base);
        memset(&v->enc, 0, sizeof v->enc); memset(&v->dec, 0, sizeof v->dec);
        seterr(v->err, "vae: out of memory for %zu activation floats", ne + nd);
        return -1;
    }
    v->enc.cap = ne; v->dec.cap = nd;
    v->B = B; v->H = H; v->W = W;
    v->enc_B = v->dec_B = 0;
    return 0;
}

size_t vae_acts_floats(const vae_t *v) { return v->enc.cap + v->dec.cap; }

/* check this call fits the arena the shape was sized for */
static int fits(vae_t *v, int dec, int B, int H, int W) {
    vae_arena *a = dec ? &v->dec : &v->enc;
    if (!a->base) { seterr(v->err, "vae: no activation memory (call vae_alloc_acts first)"); return -1; }
    size_t need = measure(v, dec, B, H, W);
    if (need > a->cap) {
        seterr(v->err, "vae: %s of %d x %dx%d needs %zu activation floats, vae_alloc_acts sized %zu (size for the largest batch)",
               dec ? "decoding" : "encoding", B, H, W, need, a->cap);
        return -1;
    }
    return 0;
}

/* encoder forward to the moments (B, 2L, h, w) at the arena's top */
static float *encode_moments(vae_t *v, const float *img, int B, int H, int W, int *h, int *w) {
    if (B < 1 || vae_latent_side(&v->cfg, H) < 1 || vae_latent_side(&v->cfg, W) < 1) {
        seterr(v->err, "vae: cannot encode %d images of %dx%d (too small to downsample %d times)",
               B, H, W, v->cfg.nlevels - 1);
        return NULL;
    }
    if (fits(v, 0, B, H, W)) return NULL;
    vae_arena *a = &v->enc;
    a->top = 0;
    size_t n = (size_t)B * v->cfg.in_channels * H * W;
    float *x = push(v, a, n);
    memcpy(x, img, n * sizeof(float));
    *h = H; *w = W;
    float *m = run_forward(v, a, v->net->enc, v->net->nenc, x, B, h, w);
    if (v->train) { v->enc_B = B; v->enc_H = H; v->enc_W = W; }
    else v->enc_B = 0;
    v->net->moments = m;
    return m;
}

int vae_encode(vae_t *v, float *mean, float *logvar, const float *img, int B, int H, int W) {
    int h, w;
    float *m = encode_moments(v, img, B, H, W, &h, &w);
    if (!m) return -1;
    /* moments = [mean | logvar] along channels; logvar = clamp(logvar, -30, 20) */
    int Lc = v->cfg.latent_channels;
    size_t hw = (size_t)h * w, per = (size_t)Lc * hw;
    for (int b = 0; b < B; b++) {
        const float *mb = m + (size_t)b * 2 * per;
        memcpy(mean + b * per, mb, per * sizeof(float));
        for (size_t i = 0; i < per; i++) {
            float lv = mb[per + i];
            logvar[b * per + i] = lv < LOGVAR_MIN ? LOGVAR_MIN : lv > LOGVAR_MAX ? LOGVAR_MAX : lv;
        }
    }
    return 0;
}

/* sample = mean + std * noise,  std = exp(0.5 logvar)  (DiagonalGaussianDistribution) */
void vae_posterior_sample(float *sample, const float *mean, const float *logvar,
                          const float *noise, size_t n) {
    for (size_t i = 0; i < n; i++) sample[i] = mean[i] + expf(0.5f * logvar[i]) * noise[i];
}

/* d sample / d mean = 1,  d sample / d logvar = 0.5 std noise */
void vae_posterior_sample_backward(float *dmean, float *dlogvar, const float *dsample,
                                   const float *logvar, const float *noise, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (dmean) dmean[i] += dsample[i];
        if (dlogvar) dlogvar[i] += dsample[i] * noise[i] * 0.5f * expf(0.5f * logvar[i]);
    }
}

int vae_encode_latents(vae_t *v, float *latents, const float *img, const float *noise,
                       int B, int H, int W) {
    int h = vae_latent_side(&v->cfg, H), w = vae_latent_side(&v->cfg, W);
    size_t n = (size_t)B * v->cfg.latent_channels * (h > 0 ? h : 0) * (w > 0 ? w : 0);
    float *lv = malloc((n ? n : 1) * sizeof(float));
    if (!lv) { seterr(v->err, "vae: out of memory"); return -1; }
    int rc = vae_encode(v, latents, lv, img, B, H, W);
    if (rc == 0) {
        if (noise) vae_posterior_sample(latents, latents, lv, noise, n);
        /* latents = scaling_factor * (z - shift_factor) */
        float s = v->cfg.scaling_factor, sh = v->cfg.shift_factor;
        for (size_t i = 0; i < n; i++) latents[i] = s * (latents[i] - sh);
    }
    free(lv);
    return rc;
}

/* backward reads the weights as the forward did, but it exists to train the
 * VAE (tools/tiny_base.c), and that needs fp32 weights */
static int refuse_f16(vae_t *v) {
    if (!v->params16) return 0;
    seterr(v->err, "vae: backward needs fp32 weights (load with --weight-dtype fp32)");
    return -1;
}

int vae_encoder_backward(vae_t *v, const float *dmean, const float *dlogvar, float *dimg) {
    if (refuse_f16(v)) return -1;
    if (!v->train || v->enc_B == 0) {
        seterr(v->err, "vae: encoder backward needs a training-mode encode just before it (vae_alloc_acts(..., train=1))");
        return -1;
    }
    int B = v->enc_B, h = vae_latent_side(&v->cfg, v->enc_H), w = vae_latent_side(&v->cfg, v->enc_W);
    int Lc = v->cfg.latent_channels, n = v->net->nenc;
    if (!dimg && !v->grads) return 0;               /* nothing asked for */
    vae_arena *a = &v->enc;
    size_t per = (size_t)Lc * h * w, nm = 2 * per * B;
    const float *m = v->net->moments;
    size_t mark = a->top;
    float *dm = push(v, a, nm);
    /* dmoments = [dmean | dlogvar * 1{-30 <= logvar <= 20}]  (clamp passes
     * the gradient where it did not clip, as torch.clamp's backward) */
    for (int b = 0; b < B; b++) {
        float *d = dm + (size_t)b * 2 * per;
        const float *mb = m + (size_t)b * 2 * per;
        for (size_t i = 0; i < per; i++) {
            d[i] = dmean ? dmean[b * per + i] : 0.0f;
            float lv = mb[per + i];
            int pass = lv >= LOGVAR_MIN && lv <= LOGVAR_MAX;
            d[per + i] = dlogvar && pass ? dlogvar[b * per + i] : 0.0f;
        }
    }
    float *dx = run_backward(v, a, v->net->enc, n, dm, mark, dimg != NULL);
    if (dimg) memcpy(dimg, dx, (size_t)B * v->cfg.in_channels * v->enc_H * v->enc_W * sizeof(float));
    a->top = mark;
    return 0;
}

/* z -> img; in_scale, in_shift: the decoder's input is z * in_scale + in_shift */
static int decode(vae_t *v, float *img, const float *z, int B, int h, int w, float in_scale, float in_shift) {
    if (B < 1 || h < 1 || w < 1) { seterr(v->err, "vae: cannot decode %d latents of %dx%d", B, h, w); return -1; }
    if (fits(v, 1, B, h, w)) return -1;
    vae_arena *a = &v->dec;
    a->top = 0;
    size_t n = (size_t)B * v->cfg.latent_channels * h * w;
    float *x = push(v, a, n);
    for (size_t i = 0; i < n; i++) x[i] = z[i] * in_scale + in_shift;
    int H = h, W = w;
    float *y = run_forward(v, a, v->net->dec, v->net->ndec, x, B, &H, &W);
    memcpy(img, y, (size_t)B * v->cfg.out_channels * H * W * sizeof(float));
    if (v->train) { v->dec_B = B; v->dec_h = h; v->dec_w = w; v->dec_in_scale = in_scale; }
    else v->dec_B = 0;
    return 0;
}

int vae_decode(vae_t *v, float *img, const float *z, int B, int h, int w) {
    return decode(v, img, z, B, h, w, 1.0f, 0.0f);
}

/* z = latents / scaling_factor + shift_factor */
int vae_decode_latents(vae_t *v, float *img, const float *latents, int B, int h, int w) {
    return decode(v, img, latents, B, h, w, 1.0f / v->cfg.scaling_factor, v->cfg.shift_factor);
}

int vae_decoder_backward(vae_t *v, const float *dimg, float *dlatent) {
    if (refuse_f16(v)) return -1;
    if (!v->train || v->dec_B == 0) {
        seterr(v->err, "vae: decoder backward needs a training-mode decode just before it (vae_alloc_acts(..., train=1))");
        return -1;
    }
    if (!dlatent && !v->grads) return 0;
    int B = v->dec_B, f = 1 << (v->cfg.nlevels - 1);
    int H = v->dec_h * f, W = v->dec_w * f;
    vae_arena *a = &v->dec;
    size_t mark = a->top, n = (size_t)B * v->cfg.out_channels * H * W;
    float *dy = push(v, a, n);
    memcpy(dy, dimg, n * sizeof(float));
    float *dx = run_backward(v, a, v->net->dec, v->net->ndec, dy, mark, dlatent != NULL);
    if (dlatent) {
        /* chain rule through z = latents * in_scale + shift */
        size_t nz = (size_t)B * v->cfg.latent_channels * v->dec_h * v->dec_w;
        for (size_t i = 0; i < nz; i++) dlatent[i] = dx[i] * v->dec_in_scale;
    }
    a->top = mark;
    return 0;
}

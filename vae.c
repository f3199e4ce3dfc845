/* vae.c: AutoencoderKL (diffusers) encoder and decoder, forward and backward.
 *
 * The model is two flat lists of layers run in order (the encoder's and the
 * decoder's); a diffusers block is just several consecutive layers:
 *   DownEncoderBlock2D = resnets + DOWN,  UpDecoderBlock2D = resnets + UP,
 *   UNetMidBlock2D     = resnet, ATTN, resnet.
 * Memory: vae_layout walks a half's layers once for a shape and mode and
 * gives every activation an offset (arena.h); vae_alloc_acts allocates the
 * encoder's and the decoder's layouts as one block, and the forward and
 * backward only read and write at those offsets. Forward writes each
 * layer's output (and, when training, keeps what its backward reads);
 * backward walks the list in reverse, each layer turning dL/d(output) into
 * dL/d(input). Parameters are addressed by offset into v->params, so the
 * same offset into v->grads is the gradient. With fp16 weights the conv and
 * linear weights' offsets are into v->params16 instead (and the vectors'
 * into the shorter v->params), and weight_f32() widens one weight at a time
 * into v->wbuf for the op about to run.
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
#include "backend.h"

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
 * the module tree: offsets of parameters, and of the activations */

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
    /* the input shape vae_layout laid the layer out for */
    int B, H, W;
    /* Activations: offsets into v->acts, set by vae_layout (which ones are
     * used depends on kind). Forward: */
    size_t x;                        /* the layer's input */
    size_t out;                      /* its output */
    size_t y;                        /* where the next layer reads the output: out (training),
                                        or x, the output moved down onto the dead input (inference) */
    size_t mean1, rstd1, mean2, rstd2;   /* group norm statistics, (B, groups) */
    size_t n1, a1, h1, n2, a2;       /* RESNET: norm1, SiLU, conv1, norm2, SiLU outputs
                                        (inference: a1 = n1, a2 = n2, SiLU in place);
                                        ATTN, NORMACT: n1 = the norm's output */
    size_t shortcut_out;             /* RESNET: the 1x1 shortcut's output */
    size_t tokens, q_out, k_out, v_out, probs, attn_out, proj_out; /* ATTN: (B, T, C) each, probs (B, T, T) */
    size_t xp;                       /* DOWN: the padded input;  UP: the upsampled input */
    /* backward (training only): dL/d(output) waits at dy; the layer writes
     * dL/d(input) at dx, which then moves down onto dy for the layer below */
    size_t dy, dx;
    size_t d_a2_h1;                  /* RESNET: dL/da2, then dL/dh1 (cout channels) */
    size_t d_n2_a1;                  /* RESNET: dL/dn2, then dL/da1 (room for either) */
    size_t d_n1;                     /* RESNET: dL/dn1 */
    size_t d_proj, d_attn, dq, dk, dv, d_tokens, d_norm; /* ATTN (NORMACT: d_norm) */
    size_t d_xp;                     /* DOWN: dL/d(padded input);  UP: dL/d(upsampled input) */
} layer;

/* the encoder or the decoder: its layers, and where the whole half's
 * input, output and output gradient live (vae_layout) */
typedef struct {
    layer *L;
    int n;
    size_t in;                       /* the caller's input, copied in (decoder: scaled) */
    size_t out;                      /* the last layer's output (encoder: the moments) */
    size_t dout;                     /* dL/d(out): where backward starts */
    size_t din;                      /* dL/d(in): where backward ends */
} half_net;

struct vae_net {
    half_net enc, dec;
};

/* the operations table every layer runs through (backend.h): the CPU's, or
 * a device's after vae_to_device, where every pointer is in its memory */
#define OPS (v->ops ? v->ops : &nn_ops_cpu)
#define ON_DEVICE(v) ((v)->dparams != NULL)

/* a vector parameter: on a device, its copy at the same offset */
static inline float *param(const vae_t *v, size_t off) { return (v->dparams ? v->dparams : v->params) + off; }
static inline float *grad_of(const vae_t *v, size_t off) { return v->grads ? v->grads + off : NULL; }
/* the activation at offset off */
static inline float *at(const vae_t *v, size_t off) { return arena_at(&v->acts, off); }

/* a conv / linear weight of n floats as fp32: the weights themselves, or
 * (held as fp16) widened exactly into wbuf, which then holds that one */
static const float *weight_f32(vae_t *v, size_t off, size_t n) {
    if (ON_DEVICE(v)) {
        /* the device's copy; fp16 widened there into its buffer */
        if (!v->dparams16) return v->dparams + off;
        if (v->dwbuf_of != v->dparams16 + off) {
            OPS->widen_f16(v->dwbuf, v->dparams16 + off, n);
            v->dwbuf_of = v->dparams16 + off;
        }
        return v->dwbuf;
    }
    if (!v->params16) return v->params + off;
    return half_widen_cached(v->wbuf, &v->wbuf_of, v->params16 + off, n);
}

static size_t conv_numel(const conv_p *c) { return (size_t)c->cout * c->cin * c->k * c->k; }
static size_t lin_numel(const lin_p *l) { return (size_t)l->out * l->in; }

/* floats of a layer's input and of its output at the laid-out shape */
static size_t in_floats(const layer *L) { return (size_t)L->B * L->cin * L->H * L->W; }
static size_t out_floats(const layer *L) {
    int H = L->H, W = L->W;
    if (L->kind == L_DOWN) { H = (H - 2) / 2 + 1; W = (W - 2) / 2 + 1; }   /* (side + 1 - 3) / 2 + 1 */
    if (L->kind == L_UP) { H *= 2; W *= 2; }
    return (size_t)L->B * L->cout * H * W;
}

/* ---------------------------------------------------------------------------
 * the activation layout
 *
 * vae_layout gives every tensor one half (encoder or decoder) will hold an
 * offset, for input (B, cin, H, W) and the mode in v->train, walking the
 * layers in diffusers' module order as the forward runs them, then
 * backwards as the backward does. Offsets, not pointers: the CPU runs them
 * in v->acts, one block of the plan's peak, and a CUDA backend can allocate
 * the same number of floats once on its device and use the same offsets.
 *
 * Training keeps every forward tensor (the backward reads them). Inference
 * keeps only the current layer: its output moves down onto its input, so
 * the half needs about one layer's worth. Backward needs a layer's gradient
 * buffers only while it runs: each layer's dL/d(input) moves down onto its
 * dL/d(output), and the rest is given back. */
static void vae_layout(vae_t *v, int dec, int B, int H, int W, arena_plan *p) {
    half_net *h = dec ? &v->net->dec : &v->net->enc;
    size_t G = (size_t)B * v->cfg.groups;
    int train = v->train;
    size_t base = arena_mark(p);
    h->in = arena_take(p, (size_t)B * h->L[0].cin * H * W);
    size_t x = h->in;
    for (int i = 0; i < h->n; i++) {
        layer *L = &h->L[i];
        L->B = B; L->H = H; L->W = W;
        L->x = x;
        size_t ni = in_floats(L), no = out_floats(L);
        switch (L->kind) {
        case L_CONV:
            L->out = arena_take(p, no);
            break;
        case L_RESNET:
            L->mean1 = arena_take(p, 4 * G);   /* the four small vectors in one piece */
            L->rstd1 = L->mean1 + G; L->mean2 = L->mean1 + 2 * G; L->rstd2 = L->mean1 + 3 * G;
            L->n1 = arena_take(p, ni);
            L->a1 = train ? arena_take(p, ni) : L->n1;
            L->h1 = arena_take(p, no);
            L->n2 = arena_take(p, no);
            L->a2 = train ? arena_take(p, no) : L->n2;
            L->out = arena_take(p, no);
            if (L->shortcut.cin) L->shortcut_out = arena_take(p, no);
            break;
        case L_ATTN: {
            size_t T = (size_t)H * W;
            L->mean1 = arena_take(p, 2 * G); L->rstd1 = L->mean1 + G;
            L->n1 = arena_take(p, ni);
            L->tokens = arena_take(p, ni);
            L->q_out = arena_take(p, ni); L->k_out = arena_take(p, ni); L->v_out = arena_take(p, ni);
            /* training keeps the probabilities (B T^2 floats: 64 MiB per
             * image at 512 px) so the backward does not recompute q k^T */
            if (train) L->probs = arena_take(p, (size_t)B * T * T);
            L->attn_out = arena_take(p, ni);
            L->proj_out = arena_take(p, ni);
            L->out = arena_take(p, no);
            break;
        }
        case L_DOWN:
            L->xp = arena_take(p, (size_t)B * L->cin * (H + 1) * (W + 1));
            L->out = arena_take(p, no);
            H = (H - 2) / 2 + 1; W = (W - 2) / 2 + 1;
            break;
        case L_UP:
            L->xp = arena_take(p, (size_t)B * L->cin * 4 * H * W);
            L->out = arena_take(p, no);
            H *= 2; W *= 2;
            break;
        case L_NORMACT:
            L->mean1 = arena_take(p, 2 * G); L->rstd1 = L->mean1 + G;
            L->n1 = arena_take(p, ni);
            L->out = train ? arena_take(p, ni) : L->n1;   /* inference: SiLU in place */
            break;
        }
        if (train) {
            L->y = L->out;
        } else {
            arena_release(p, base);          /* everything but the output is dead */
            L->y = arena_take(p, no);        /* == h->in: the output moved down */
        }
        x = L->y;
    }
    h->out = x;
    if (!train) return;

    size_t mark = arena_mark(p);
    h->dout = arena_take(p, out_floats(&h->L[h->n - 1]));
    size_t dy = h->dout;
    for (int i = h->n - 1; i >= 0; i--) {
        layer *L = &h->L[i];
        size_t ni = in_floats(L), no = out_floats(L);
        L->dy = dy;
        L->dx = arena_take(p, ni);
        switch (L->kind) {
        case L_CONV:
            break;
        case L_RESNET:
            L->d_a2_h1 = arena_take(p, no);
            L->d_n2_a1 = arena_take(p, ni > no ? ni : no);
            L->d_n1 = arena_take(p, ni);
            break;
        case L_ATTN:
            L->d_proj = arena_take(p, ni);
            L->d_attn = arena_take(p, ni);
            L->dq = arena_take(p, ni); L->dk = arena_take(p, ni); L->dv = arena_take(p, ni);
            L->d_tokens = arena_take(p, ni);
            L->d_norm = arena_take(p, ni);
            break;
        case L_DOWN:
            L->d_xp = arena_take(p, (size_t)L->B * L->cin * (L->H + 1) * (L->W + 1));
            break;
        case L_UP:
            L->d_xp = arena_take(p, (size_t)L->B * L->cin * 4 * L->H * L->W);
            break;
        case L_NORMACT:
            L->d_norm = arena_take(p, ni);
            break;
        }
        arena_release(p, mark);              /* the layer's gradient buffers are dead */
        dy = arena_take(p, ni);              /* == L->dy: dL/d(input) moved down */
    }
    h->din = dy;
    arena_release(p, mark);
}

/* ---------------------------------------------------------------------------
 * the ops, as the layers use them: thin wrappers over nn.h that know the
 * parameter block and pass NULL weight gradients when the VAE is frozen */

static void conv_fwd(vae_t *v, const conv_p *c, float *out, const float *in,
                     int B, int H, int W, int stride, int pad) {
    OPS->conv2d_forward(out, in, weight_f32(v, c->w, conv_numel(c)), param(v, c->b),
                   B, c->cin, H, W, c->cout, c->k, c->k, stride, pad);
}

static void conv_bwd(vae_t *v, const conv_p *c, float *din, const float *dout, const float *in,
                     int B, int H, int W, int stride, int pad) {
    OPS->conv2d_backward(din, grad_of(v, c->w), grad_of(v, c->b), dout, in, weight_f32(v, c->w, conv_numel(c)),
                    B, c->cin, H, W, c->cout, c->k, c->k, stride, pad);
}

static void gn_fwd(vae_t *v, const norm_p *n, float *out, float *mean, float *rstd,
                   const float *in, int B, int HW) {
    OPS->groupnorm_forward(out, mean, rstd, in, param(v, n->w), param(v, n->b), B, n->C, HW, v->cfg.groups, VAE_EPS);
}

/* norm, then act = silu(out): one pass over memory on the CPU
 * (groupnorm_silu_forward, bit for bit the pair); a device table, the pair */
static void gn_silu_fwd(vae_t *v, const norm_p *n, float *out, float *act, float *mean, float *rstd,
                        const float *in, int B, int HW) {
    if (OPS == &nn_ops_cpu) {
        groupnorm_silu_forward(out, act, mean, rstd, in, param(v, n->w), param(v, n->b), B, n->C, HW,
                               v->cfg.groups, VAE_EPS);
        return;
    }
    gn_fwd(v, n, out, mean, rstd, in, B, HW);
    OPS->silu_forward(act, out, (size_t)B * n->C * HW);
}

static void gn_bwd(vae_t *v, const norm_p *n, float *din, const float *dout, const float *in,
                   const float *mean, const float *rstd, int B, int HW) {
    OPS->groupnorm_backward(din, grad_of(v, n->w), grad_of(v, n->b), dout, in, param(v, n->w), mean, rstd,
                       B, n->C, HW, v->cfg.groups);
}

static void lin_fwd(vae_t *v, const lin_p *l, float *out, const float *in, int N) {
    OPS->linear_forward(out, in, weight_f32(v, l->w, lin_numel(l)), param(v, l->b), N, l->in, l->out);
}

static void lin_bwd(vae_t *v, const lin_p *l, float *din, const float *dout, const float *in, int N) {
    OPS->linear_backward(din, grad_of(v, l->w), grad_of(v, l->b), dout, in, weight_f32(v, l->w, lin_numel(l)),
                    N, l->in, l->out);
}

/* y += x (the table's accumulate) */
#define add_to(y, x, n) OPS->accumulate(y, x, n)

/* out[b][j][i] = in[b][i][j]: (B, R, S) -> (B, S, R). Images (B, C, HW) and
 * token sequences (B, HW, C) are the same numbers in the two orders. */
#define transpose(out, in, B, R, S) OPS->transpose(out, in, B, R, S)

/* a buffer the backward accumulates into (+=) starts at zero */
static float *zeroed(vae_t *v, size_t off, size_t n) {
    float *p = at(v, off);
    OPS->zero(p, n);
    return p;
}

/* ---------------------------------------------------------------------------
 * layers: forward reads its input at L->x and writes L->out; backward reads
 * dL/d(output) at L->dy and writes dL/d(input) at L->dx. Every tensor is
 * where vae_layout put it. */

/* ResnetBlock2D without time embedding (output_scale_factor 1, dropout 0):
 *   h   = conv1(silu(norm1(x)))
 *   out = conv2(silu(norm2(h))) + shortcut(x)      shortcut = 1x1 conv or identity */
static void resnet_forward(vae_t *v, const layer *L) {
    int B = L->B, H = L->H, W = L->W, HW = H * W;
    size_t no = out_floats(L);
    const float *x = at(v, L->x);
    float *n1 = at(v, L->n1), *a1 = at(v, L->a1), *h1 = at(v, L->h1);
    float *n2 = at(v, L->n2), *a2 = at(v, L->a2), *out = at(v, L->out);
    gn_silu_fwd(v, &L->norm1, n1, a1, at(v, L->mean1), at(v, L->rstd1), x, B, HW);
    conv_fwd(v, &L->conv1, h1, a1, B, H, W, 1, 1);
    gn_silu_fwd(v, &L->norm2, n2, a2, at(v, L->mean2), at(v, L->rstd2), h1, B, HW);
    conv_fwd(v, &L->conv2, out, a2, B, H, W, 1, 1);
    if (L->shortcut.cin) {
        float *s = at(v, L->shortcut_out);
        conv_fwd(v, &L->shortcut, s, x, B, H, W, 1, 0);
        add_to(out, s, no);
    } else {
        add_to(out, x, no);
    }
}

/* dL/dx = norm1'(silu'(conv1'(norm2'(silu'(conv2'(dout)))))) + shortcut'(dout),
 * each ' the backward of that op at the saved input. Two ping-pong buffers
 * carry the chain (the second also holds dL/da1, which has cin channels); a
 * third of the input's size ends it. */
static void resnet_backward(vae_t *v, const layer *L) {
    int B = L->B, H = L->H, W = L->W, HW = H * W;
    size_t ni = in_floats(L), no = out_floats(L);
    const float *x = at(v, L->x), *dy = at(v, L->dy);
    float *dx = zeroed(v, L->dx, ni);
    float *d_a2_h1 = zeroed(v, L->d_a2_h1, no);
    float *d_n2_a1 = zeroed(v, L->d_n2_a1, ni > no ? ni : no);
    float *d_n1 = zeroed(v, L->d_n1, ni);
    conv_bwd(v, &L->conv2, d_a2_h1, dy, at(v, L->a2), B, H, W, 1, 1);       /* dL/da2 */
    OPS->silu_backward(d_n2_a1, d_a2_h1, at(v, L->n2), no);                      /* dL/dn2 */
    OPS->zero(d_a2_h1, no);
    gn_bwd(v, &L->norm2, d_a2_h1, d_n2_a1, at(v, L->h1), at(v, L->mean2), at(v, L->rstd2), B, HW);  /* dL/dh1 */
    OPS->zero(d_n2_a1, ni);
    conv_bwd(v, &L->conv1, d_n2_a1, d_a2_h1, at(v, L->a1), B, H, W, 1, 1);  /* dL/da1 (cin channels) */
    OPS->silu_backward(d_n1, d_n2_a1, at(v, L->n1), ni);                         /* dL/dn1 */
    gn_bwd(v, &L->norm1, dx, d_n1, x, at(v, L->mean1), at(v, L->rstd1), B, HW);
    if (L->shortcut.cin) conv_bwd(v, &L->shortcut, dx, dy, x, B, H, W, 1, 0);
    else add_to(dx, dy, no);
}

/* Mid-block attention (diffusers Attention, one head of width C, as the
 * deprecated AttentionBlock it replaced): on the T = H*W pixels as tokens,
 *   t = norm(x)^T                        (B, T, C)
 *   q, k, v = t Wq^T + bq, t Wk^T + bk, t Wv^T + bv
 *   o = softmax(q k^T / sqrt(C)) v
 *   out = x + (o Wo^T + bo)^T            (residual, rescale_output_factor 1) */
static void attn_forward(vae_t *v, const layer *L) {
    int B = L->B, C = L->cin, T = L->H * L->W;
    size_t n = in_floats(L);
    const float *x = at(v, L->x);
    float *nx = at(v, L->n1), *t = at(v, L->tokens);
    float *q = at(v, L->q_out), *k = at(v, L->k_out), *vv = at(v, L->v_out);
    float *o = at(v, L->attn_out), *p = at(v, L->proj_out), *out = at(v, L->out);
    gn_fwd(v, &L->norm1, nx, at(v, L->mean1), at(v, L->rstd1), x, B, T);
    transpose(t, nx, B, C, T);
    lin_fwd(v, &L->q, q, t, B * T);
    lin_fwd(v, &L->k, k, t, B * T);
    lin_fwd(v, &L->v, vv, t, B * T);
    OPS->attention_forward(o, v->train ? at(v, L->probs) : NULL, q, k, vv, B, T, T, 1, C, 0);
    lin_fwd(v, &L->o, p, o, B * T);
    transpose(out, p, B, T, C);
    add_to(out, x, n);
}

static void attn_backward(vae_t *v, const layer *L) {
    int B = L->B, C = L->cin, T = L->H * L->W;
    size_t n = in_floats(L);
    const float *dy = at(v, L->dy), *t = at(v, L->tokens);
    float *dx = zeroed(v, L->dx, n);
    add_to(dx, dy, n);                                          /* the residual */
    float *d_proj = at(v, L->d_proj);
    transpose(d_proj, dy, B, C, T);
    float *d_attn = zeroed(v, L->d_attn, n);
    lin_bwd(v, &L->o, d_attn, d_proj, at(v, L->attn_out), B * T);
    float *dq = zeroed(v, L->dq, n), *dk = zeroed(v, L->dk, n), *dv = zeroed(v, L->dv, n);
    OPS->attention_backward(dq, dk, dv, d_attn, at(v, L->q_out), at(v, L->k_out), at(v, L->v_out),
                       at(v, L->probs), B, T, T, 1, C, 0);
    float *d_tokens = zeroed(v, L->d_tokens, n);                /* q, k, v all read t */
    lin_bwd(v, &L->q, d_tokens, dq, t, B * T);
    lin_bwd(v, &L->k, d_tokens, dk, t, B * T);
    lin_bwd(v, &L->v, d_tokens, dv, t, B * T);
    float *d_norm = at(v, L->d_norm);
    transpose(d_norm, d_tokens, B, T, C);
    gn_bwd(v, &L->norm1, dx, d_norm, at(v, L->x), at(v, L->mean1), at(v, L->rstd1), B, T);
}

/* Downsample2D with padding=0: pad one zero row at the bottom and one zero
 * column at the right (F.pad(x, (0, 1, 0, 1))), then a 3x3 stride-2 conv:
 *   xp (H+1, W+1),  out side = (side + 1 - 3) / 2 + 1 = floor(side / 2).
 * Not the UNet's symmetric pad-1 downsample: the two differ at every
 * output pixel's window, so SD checkpoints only match with this one. */
static void down_forward(vae_t *v, const layer *L) {
    int B = L->B, C = L->cin, H = L->H, W = L->W, Hp = H + 1, Wp = W + 1;
    /* xp = F.pad(x, (0, 1, 0, 1)) */
    float *xp = at(v, L->xp);
    OPS->pad_br(xp, at(v, L->x), B * C, H, W);
    conv_fwd(v, &L->conv, at(v, L->out), xp, B, Hp, Wp, 2, 0);
}

static void down_backward(vae_t *v, const layer *L) {
    int B = L->B, C = L->cin, H = L->H, W = L->W, Hp = H + 1, Wp = W + 1;
    float *d_xp = zeroed(v, L->d_xp, (size_t)B * C * Hp * Wp), *dx = at(v, L->dx);
    conv_bwd(v, &L->conv, d_xp, at(v, L->dy), at(v, L->xp), B, Hp, Wp, 2, 0);
    for (int bc = 0; bc < B * C; bc++)          /* the padding's gradient goes nowhere */
        for (int i = 0; i < H; i++)
            OPS->copy(dx + ((size_t)bc * H + i) * W, d_xp + ((size_t)bc * Hp + i) * Wp, (size_t)W);
}

/* Upsample2D: nearest 2x, then a 3x3 conv (pad 1) */
static void up_forward(vae_t *v, const layer *L) {
    int B = L->B, C = L->cin, H = L->H, W = L->W;
    float *u = at(v, L->xp);
    OPS->upsample2x_forward(u, at(v, L->x), B, C, H, W);
    conv_fwd(v, &L->conv, at(v, L->out), u, B, 2 * H, 2 * W, 1, 1);
}

static void up_backward(vae_t *v, const layer *L) {
    int B = L->B, C = L->cin, H = L->H, W = L->W;
    float *du = zeroed(v, L->d_xp, (size_t)B * C * 4 * H * W);
    conv_bwd(v, &L->conv, du, at(v, L->dy), at(v, L->xp), B, 2 * H, 2 * W, 1, 1);
    OPS->upsample2x_backward(zeroed(v, L->dx, in_floats(L)), du, B, C, H, W);
}

/* conv_norm_out then conv_act: out = silu(norm(x)) */
static void normact_forward(vae_t *v, const layer *L) {
    int HW = L->H * L->W;
    float *nx = at(v, L->n1);
    gn_silu_fwd(v, &L->norm1, nx, at(v, L->out), at(v, L->mean1), at(v, L->rstd1), at(v, L->x), L->B, HW);
}

static void normact_backward(vae_t *v, const layer *L) {
    size_t n = in_floats(L);
    float *d_norm = zeroed(v, L->d_norm, n);
    OPS->silu_backward(d_norm, at(v, L->dy), at(v, L->n1), n);
    gn_bwd(v, &L->norm1, zeroed(v, L->dx, n), d_norm, at(v, L->x), at(v, L->mean1), at(v, L->rstd1),
           L->B, L->H * L->W);
}

/* a k x k conv, stride 1, "same" padding (conv_in, conv_out: 3x3; quant_conv: 1x1) */
static void conv_layer_forward(vae_t *v, const layer *L) {
    conv_fwd(v, &L->conv, at(v, L->out), at(v, L->x), L->B, L->H, L->W, 1, L->conv.k / 2);
}

/* need_dx 0: only the weight gradients (the first layer, when the caller
 * wants no input gradient) */
static void conv_layer_backward(vae_t *v, const layer *L, int need_dx) {
    float *dx = need_dx ? zeroed(v, L->dx, in_floats(L)) : NULL;
    if (need_dx || v->grads)
        conv_bwd(v, &L->conv, dx, at(v, L->dy), at(v, L->x), L->B, L->H, L->W, 1, L->conv.k / 2);
}

/* Run a half's layers on its input (at h->in), each reading the last one's
 * output where vae_layout put it; the output ends at h->out. */
static void run_forward(vae_t *v, const half_net *h) {
    for (int i = 0; i < h->n; i++) {
        const layer *L = &h->L[i];
        switch (L->kind) {
        case L_CONV:    conv_layer_forward(v, L); break;
        case L_RESNET:  resnet_forward(v, L); break;
        case L_ATTN:    attn_forward(v, L); break;
        case L_DOWN:    down_forward(v, L); break;
        case L_UP:      up_forward(v, L); break;
        case L_NORMACT: normact_forward(v, L); break;
        }
        /* inference: the output moves down onto the dead input */
        if (L->y != L->out) OPS->move(at(v, L->y), at(v, L->out), out_floats(L));
    }
}

/* Backward through a half, from dL/d(output) at h->dout to dL/d(input) at
 * h->din. need_dx: whether the first layer's input gradient is wanted. */
static void run_backward(vae_t *v, const half_net *h, int need_dx) {
    for (int i = h->n - 1; i >= 0; i--) {
        const layer *L = &h->L[i];
        int want = i > 0 || need_dx;
        switch (L->kind) {
        case L_CONV:    conv_layer_backward(v, L, want); break;
        case L_RESNET:  resnet_backward(v, L); break;
        case L_ATTN:    attn_backward(v, L); break;
        case L_DOWN:    down_backward(v, L); break;
        case L_UP:      up_backward(v, L); break;
        case L_NORMACT: normact_backward(v, L); break;
        }
        if (!want) return;
        /* dL/d(input) moves down onto the dead dL/d(output): the layer below's dy */
        OPS->move(at(v, L->dy), at(v, L->dx), in_floats(L));
    }
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
            char q[300];
            json_quote_key(q, sizeof q, s->type == JSON_STRING ? s->string : "(not a string)");
            seterr(err, "key '%s'[%d]: '%s' is not supported (only %s)", key, i, q, want);
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
            char q[300];
            json_quote_key(q, sizeof q, k);          /* keys come from the file: keep one line */
            seterr(err, "key '%s' is not supported by this AutoencoderKL (remove it or use a plain SD1.x VAE)", q);
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
        char q[300];
        json_quote_key(q, sizeof q, actj && actj->type == JSON_STRING ? act : "?");
        seterr(err, "key 'act_fn': '%s' is not supported (only silu)", q);
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
        v->net->enc.L = calloc((size_t)maxl, sizeof(layer));
        v->net->dec.L = calloc((size_t)maxl, sizeof(layer));
    }
    if (!v->net || !v->net->enc.L || !v->net->dec.L) {
        vae_free(v);
        seterr(err, "vae: out of memory building the model");
        return -1;
    }
    builder b = { v, 0, 0, 0, 0 };
    char pre[VAE_NAME_LEN];
    layer *E = v->net->enc.L, *D = v->net->dec.L;
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

    v->net->enc.n = ne; v->net->dec.n = nd;
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
    if (v->net) { free(v->net->enc.L); free(v->net->dec.L); free(v->net); }
    free(v->params); free(v->params16); free(v->wbuf); free(v->grads); free(v->table);
    if (v->ops) {
        if (v->acts.base) v->ops->free(v->acts.base);
        if (v->dparams) v->ops->free(v->dparams);
        if (v->dparams16) v->ops->free(v->dparams16);
        if (v->dwbuf) v->ops->free(v->dwbuf);
    } else {
        arena_free(&v->acts);
    }
    memset(v, 0, sizeof *v);
}

int vae_param_index(const vae_t *v, const char *name) {
    for (int i = 0; i < v->ntable; i++)
        if (strcmp(v->table[i].name, name) == 0) return i;
    return -1;
}

int vae_alloc_grads(vae_t *v) {
    if (ON_DEVICE(v)) {
        seterr(v->err, "vae: training the VAE does not run on %s (use --device cpu)", v->ops->name);
        return -1;
    }
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
 * the device (backend.h) */

/* the table's first error (a failed copy, or one a kernel left) as v->err */
static int device_error(vae_t *v) {
    const char *e = v->ops->error();
    if (e && strncmp(e, "error: ", 7) == 0) e += 7;
    seterr(v->err, "vae: %s: %s", v->ops->name, e ? e : "a copy failed");
    return -1;
}

int vae_to_device(vae_t *v, const nn_ops *ops) {
    if (!ops->device) { seterr(v->err, "vae: %s is not a device table", ops->name); return -1; }
    if (v->ops) { seterr(v->err, "vae: already on %s", v->ops->name); return -1; }
    if (v->grads) {
        seterr(v->err, "vae: training the VAE does not run on %s (use --device cpu)", ops->name);
        return -1;
    }
    /* as on the host: fp32, or the vectors in fp32 and the matrices in fp16
     * with a buffer for the largest widened */
    int f16 = v->params16 != NULL;
    size_t nvec = f16 ? v->nparams - v->nmat : v->nparams, big = 1;
    for (int i = 0; f16 && i < v->ntable; i++)
        if (v->table[i].data16 && v->table[i].numel > big) big = v->table[i].numel;
    float *d = ops->alloc(sizeof(float) * (nvec ? nvec : 1));
    uint16_t *d16 = f16 ? ops->alloc(sizeof(uint16_t) * (v->nmat ? v->nmat : 1)) : NULL;
    float *wb = f16 ? ops->alloc(sizeof(float) * big) : NULL;
    if (!d || (f16 && (!d16 || !wb)) || !ops->upload(d, v->params, sizeof(float) * nvec) ||
        (f16 && !ops->upload(d16, v->params16, sizeof(uint16_t) * v->nmat))) {
        const char *e = ops->error();
        if (e && strncmp(e, "error: ", 7) == 0) e += 7;
        seterr(v->err, "vae: cannot copy %.1f MiB of weights to %s: %s",
               (double)(nvec * 4 + (f16 ? v->nmat * 2 + big * 4 : 0)) / 1048576.0, ops->name,
               e ? e : "out of memory");
        if (d) ops->free(d);
        if (d16) ops->free(d16);
        if (wb) ops->free(wb);
        return -1;
    }
    arena_free(&v->acts);       /* a host block, if any: the device gets its own */
    v->enc_floats = 0;
    v->enc_B = v->dec_B = 0;
    v->ops = ops;
    v->dparams = d;
    v->dparams16 = d16;
    v->dwbuf = wb;
    v->dwbuf_of = NULL;
    return 0;
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

/* the decoder's activations start where the encoder's end: encoding, then
 * decoding, then backward through both (tools/tiny_base.c) keeps both */
static arena_plan half_plan(const vae_t *v, int dec) {
    arena_plan p = { 0, 0 };
    if (dec) p.top = p.peak = v->enc_floats;
    return p;
}

int vae_alloc_acts(vae_t *v, int B, int H, int W, int train) {
    int h = vae_latent_side(&v->cfg, H), w = vae_latent_side(&v->cfg, W);
    if (B < 1 || h < 1 || w < 1) {
        seterr(v->err, "vae: cannot size activations for %d images of %dx%d (too small to downsample %d times)",
               B, H, W, v->cfg.nlevels - 1);
        return -1;
    }
    v->train = train;
    v->enc_B = v->dec_B = 0;
    arena_plan p = half_plan(v, 0);
    vae_layout(v, 0, B, H, W, &p);
    v->enc_floats = p.peak;
    p = half_plan(v, 1);
    vae_layout(v, 1, B, h, w, &p);
    int fail;
    if (ON_DEVICE(v)) {
        /* the same plan, one allocation in the device's memory */
        if (v->acts.base) v->ops->free(v->acts.base);
        v->acts.nfloats = 0;
        v->acts.base = v->ops->alloc(sizeof(float) * (p.peak ? p.peak : 1));
        fail = v->acts.base == NULL;
        if (!fail) v->acts.nfloats = p.peak;
        else v->ops->error();                /* the message is ours below */
    } else {
        fail = arena_alloc(&v->acts, &p) != 0;
    }
    if (fail) {
        v->enc_floats = 0;
        seterr(v->err, "vae: out of %s memory for %zu activation floats", ON_DEVICE(v) ? v->ops->name : "host", p.peak);
        return -1;
    }
    v->B = B; v->H = H; v->W = W;
    return 0;
}

size_t vae_acts_floats(const vae_t *v) { return v->acts.nfloats; }

/* Lay out a half for this call's shape (it may be smaller than the one
 * vae_alloc_acts sized) and check that it fits there. A failed call leaves
 * nothing for a backward. */
static int layout_for_call(vae_t *v, int dec, int B, int H, int W) {
    if (dec) v->dec_B = 0; else v->enc_B = 0;
    if (!v->acts.base) { seterr(v->err, "vae: no activation memory (call vae_alloc_acts first)"); return -1; }
    arena_plan p = half_plan(v, dec);
    size_t start = p.top, end = dec ? v->acts.nfloats : v->enc_floats;
    vae_layout(v, dec, B, H, W, &p);
    if (p.peak > end) {
        seterr(v->err, "vae: %s of %d x %dx%d needs %zu activation floats, vae_alloc_acts sized %zu (size for the largest batch)",
               dec ? "decoding" : "encoding", B, H, W, p.peak - start, end - start);
        return -1;
    }
    return 0;
}

/* encoder forward: the moments (B, 2L, h, w) end at v->net->enc.out */
static int encode_moments(vae_t *v, const float *img, int B, int H, int W) {
    if (B < 1 || vae_latent_side(&v->cfg, H) < 1 || vae_latent_side(&v->cfg, W) < 1) {
        seterr(v->err, "vae: cannot encode %d images of %dx%d (too small to downsample %d times)",
               B, H, W, v->cfg.nlevels - 1);
        return -1;
    }
    if (layout_for_call(v, 0, B, H, W)) return -1;
    const half_net *enc = &v->net->enc;
    size_t nin = (size_t)B * v->cfg.in_channels * H * W;
    if (ON_DEVICE(v)) {
        if (!v->ops->upload(at(v, enc->in), img, nin * sizeof(float))) return device_error(v);
    } else {
        memcpy(at(v, enc->in), img, nin * sizeof(float));
    }
    run_forward(v, enc);
    if (v->train) { v->enc_B = B; v->enc_H = H; v->enc_W = W; }
    return 0;
}

int vae_encode(vae_t *v, float *mean, float *logvar, const float *img, int B, int H, int W) {
    if (encode_moments(v, img, B, H, W)) return -1;
    const float *m = at(v, v->net->enc.out);
    int h = vae_latent_side(&v->cfg, H), w = vae_latent_side(&v->cfg, W);
    /* moments = [mean | logvar] along channels; logvar = clamp(logvar, -30, 20) */
    int Lc = v->cfg.latent_channels;
    size_t hw = (size_t)h * w, per = (size_t)Lc * hw;
    float *host = NULL;
    if (ON_DEVICE(v)) {
        /* the moments come down; the split and clamp run here */
        host = malloc(sizeof(float) * 2 * per * B);
        if (!host) { seterr(v->err, "vae: out of memory"); return -1; }
        if (!v->ops->download(host, m, sizeof(float) * 2 * per * B)) { free(host); return device_error(v); }
        m = host;
    }
    for (int b = 0; b < B; b++) {
        const float *mb = m + (size_t)b * 2 * per;
        memcpy(mean + b * per, mb, per * sizeof(float));
        for (size_t i = 0; i < per; i++) {
            float lv = mb[per + i];
            logvar[b * per + i] = lv < LOGVAR_MIN ? LOGVAR_MIN : lv > LOGVAR_MAX ? LOGVAR_MAX : lv;
        }
    }
    free(host);
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
    if (ON_DEVICE(v)) {
        seterr(v->err, "vae: backward does not run on %s (use --device cpu)", v->ops->name);
        return -1;
    }
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
    int Lc = v->cfg.latent_channels;
    if (!dimg && !v->grads) return 0;               /* nothing asked for */
    const half_net *enc = &v->net->enc;
    size_t per = (size_t)Lc * h * w;
    const float *m = at(v, enc->out);
    float *dm = at(v, enc->dout);
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
    run_backward(v, enc, dimg != NULL);
    if (dimg) memcpy(dimg, at(v, enc->din), (size_t)B * v->cfg.in_channels * v->enc_H * v->enc_W * sizeof(float));
    return 0;
}

/* z -> img; in_scale, in_shift: the decoder's input is z * in_scale + in_shift */
static int decode(vae_t *v, float *img, const float *z, int B, int h, int w, float in_scale, float in_shift) {
    if (B < 1 || h < 1 || w < 1) { seterr(v->err, "vae: cannot decode %d latents of %dx%d", B, h, w); return -1; }
    if (layout_for_call(v, 1, B, h, w)) return -1;
    const half_net *dec = &v->net->dec;
    size_t n = (size_t)B * v->cfg.latent_channels * h * w;
    float *x = ON_DEVICE(v) ? malloc(sizeof(float) * n) : at(v, dec->in);
    if (!x) { seterr(v->err, "vae: out of memory"); return -1; }
    for (size_t i = 0; i < n; i++) x[i] = z[i] * in_scale + in_shift;
    if (ON_DEVICE(v)) {
        /* scaled here, then up */
        int ok = v->ops->upload(at(v, dec->in), x, sizeof(float) * n);
        free(x);
        if (!ok) return device_error(v);
    }
    run_forward(v, dec);
    int f = 1 << (v->cfg.nlevels - 1);
    size_t nimg = (size_t)B * v->cfg.out_channels * h * f * w * f;
    if (ON_DEVICE(v)) {
        if (!v->ops->download(img, at(v, dec->out), sizeof(float) * nimg)) return device_error(v);
    } else {
        memcpy(img, at(v, dec->out), nimg * sizeof(float));
    }
    if (v->train) { v->dec_B = B; v->dec_h = h; v->dec_w = w; v->dec_in_scale = in_scale; }
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
    const half_net *dec = &v->net->dec;
    memcpy(at(v, dec->dout), dimg, (size_t)B * v->cfg.out_channels * H * W * sizeof(float));
    run_backward(v, dec, dlatent != NULL);
    if (dlatent) {
        /* chain rule through z = latents * in_scale + shift */
        const float *dz = at(v, dec->din);
        size_t nz = (size_t)B * v->cfg.latent_channels * v->dec_h * v->dec_w;
        for (size_t i = 0; i < nz; i++) dlatent[i] = dz[i] * v->dec_in_scale;
    }
    return 0;
}

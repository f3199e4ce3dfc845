/* unet.c: UNet2DConditionModel (diffusers) as SD1.x uses it, forward and
 * backward, from config.json. See unet.h for the API.
 *
 * The module tree mirrors diffusers one to one, and so do the names:
 *
 *   conv_in, time_embedding.linear_1/2
 *   down_blocks[i]: resnets[j] (+ attentions[j] for CrossAttnDownBlock2D),
 *                   downsamplers[0].conv (all but the last block)
 *   mid_block:      resnets[0], attentions[0], resnets[1]
 *   up_blocks[i]:   layers+1 resnets, each on cat(h, skip), (+ attentions[j]),
 *                   upsamplers[0].conv after a nearest 2x (all but the last)
 *   conv_norm_out, conv_out
 *
 * Every skip tensor the down path saves is consumed by exactly one up-block
 * resnet (a stack: last saved, first used). Backward runs the same graph in
 * reverse; the gradient of a skip is collected in its own buffer by the up
 * path and added in when the down path reaches the tensor.
 *
 * Memory. Every activation, every gradient buffer of backward and every
 * layer's scratch (the LoRA adapters' included) has an offset in one arena,
 * which unet_layout computes from the config, the shape (B, h, w, Tc) and the
 * mode before anything runs; unet_alloc_acts then allocates its peak once.
 * The layout walks the modules as forward does, then as backward does, and
 * each tensor is taken from the top of a stack and given back when its last
 * reader is done (arena.h):
 *   inference:     a resnet's or transformer's inner tensors are given back
 *                  when it is done, so only block outputs (the skips among
 *                  them) stay;
 *   training:      forward keeps everything backward reads; backward's
 *                  gradients and scratch go on top;
 *   checkpointing: forward keeps only block outputs; backward runs each
 *                  resnet / transformer forward again just before its
 *                  backward, into a region above backward's buffers (so the
 *                  peak is set by the largest block; forward uses the same
 *                  region, free then).
 * The layout is offsets, not pointers: a second backend (CUDA) allocates the
 * same number of floats once on its device and uses the same offsets.
 * SD1.5 at 64x64 latents, batch 1, 77 tokens, no adapters: training 1656 MiB
 * (1501 kept by forward); checkpointed 464 MiB (179 kept); inference 254 MiB
 * (119 of block outputs). Attention probabilities are never stored
 * (attention_backward recomputes them), which keeps 64x64 self-attention
 * (4096 x 4096 per head) out of the arena.
 *
 * Full fine-tuning (unet_alloc_grads): every parameter's gradient goes to
 * u->grads at the parameter's own offset, so grad_of(u, w) turns a weight
 * pointer into its gradient pointer, or NULL (frozen: nn.h skips the work)
 * when no block was allocated. The few inputs that backward then needs and forward
 * kept only in scratch (the latents, the time MLP's activations) are kept;
 * the SiLU / upsample outputs that feed convolutions are recomputed in
 * backward's scratch rather than kept.
 *
 * fp16 weights (unet_build_dtype(..., WEIGHT_F16), --weight-dtype fp16): the
 * modules point at their matrices' table entries, and weight_f32() hands a
 * layer its matrix as fp32, widened into one buffer just before the call (forward, and
 * backward's dX = dY W). Widening is exact, so from an fp16 checkpoint the
 * numbers are bit for bit those of fp32 weights; the cost is one pass over
 * each matrix per use (SD1.5: 860M halfs, about 0.7 s per forward on the
 * 2-core development machine, against 18 s for the step).
 */
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "unet.h"
#include "safetensors.h"
#include "half.h"

/* ------------------------------------------------------------------------ */
/* module structs                                                            */
/* Every activation is an offset into the arena (u->acts), set by           */
/* unet_layout; NONE marks one this mode does not hold.                     */

#define NONE ((size_t)-1)

/* a projection that can carry a LoRA adapter: linear, or a 1x1 conv (which is
 * the same map on the token view, so it runs through the same code) */
typedef struct {
    int in, out;
    const unet_param *w;       /* W0 (out x in [x 1 x 1]): read through weight_f32() */
    float *b;                  /* bias or NULL */
    lora_t *L;                 /* NULL: no adapter */
    int N;                     /* tokens */
    size_t inp;                /* (N, in): another module's tensor */
    size_t ax;                 /* (N, r) A dropout(x), for backward */
    size_t mask;               /* (N, in) bytes: the dropout mask, training only */
    size_t scratch, dscratch;  /* the adapter's scratch in forward, in backward */
} lin_t;

/* a convolution's LoRA (LoCon, --conv-rank; kohya's conv_dim): resnet conv1,
 * conv2 (3x3), conv_shortcut (1x1), time_emb_proj (a linear, run as a 1x1
 * conv on 1x1 pixels) and the samplers' 3x3 conv. The frozen conv runs as
 * ever; lora_conv_forward adds the adapter's branch to its output. */
typedef struct {
    lora_t *L;                 /* NULL: no adapter */
    int in, out, k, stride, pad;
    int H, W;                  /* input size, set by the layout */
    size_t ax;                 /* (B, r, Ho, Wo) A dropout(x), for backward */
    size_t mask;               /* (B, in, H, W) bytes: dropout mask, training only */
    size_t scratch, dscratch;  /* forward's, backward's */
} clora_t;

typedef struct {
    int cin, cout;
    float *norm1_w, *norm1_b, *conv1_b, *temb_b, *norm2_w, *norm2_b, *conv2_b;
    const unet_param *conv1_w, *temb_w, *conv2_w;
    const unet_param *short_w; /* conv_shortcut, only when cin != cout */
    float *short_b;
    int H, W;
    size_t x, out;                                  /* (B, cin, H, W), (B, cout, H, W) */
    size_t n1, mean1, rstd1, h1, n2, mean2, rstd2;  /* kept for backward */
    size_t silu, tproj;                             /* forward: conv input, time_emb_proj output */
    size_t g1, g2, silu1, dtproj;                   /* backward: two gradient buffers; full
                                                       grads: silu(n1) again, d tproj */
    clora_t l1, l2, ls, lt;    /* conv LoRA on conv1, conv2, conv_shortcut, time_emb_proj */
    size_t lx;                 /* backward, with l1 / l2: silu(n1) or silu(n2) again */
    rng_t rng;                 /* dropout stream at entry, to recompute the same masks */
} resnet_t;

typedef struct {
    int heads, dh;
    lin_t q, k, v, o;          /* to_q, to_k, to_v, to_out.0 */
    int Tq, Tk;
    size_t qb, kb, vb, ob;     /* q, k, v and the attention output (input of to_out) */
    size_t dob, dq, dk, dv;    /* backward: their gradients */
} attn_t;

typedef struct {               /* BasicTransformerBlock */
    int dim;
    float *norm1_w, *norm1_b, *norm2_w, *norm2_b, *norm3_w, *norm3_b;
    attn_t attn1, attn2;
    lin_t ff1, ff2;            /* ff.net.0.proj (GEGLU's projection), ff.net.2 */
    int T;
    size_t x, out;             /* (B, T, dim) tokens */
    size_t n1, m1, r1, h1, n2, m2, r2, h2, n3, m3, r3, f1, g;   /* kept */
    size_t branch;             /* forward: each branch's output before the residual add */
    size_t dg, df1, dn;        /* backward: d geglu, d ff.net.0.proj, d of a norm's output */
} tblock_t;

typedef struct {               /* Transformer2DModel */
    int C, nblocks;
    float *norm_w, *norm_b;
    lin_t proj_in, proj_out;
    tblock_t *blocks;
    rng_t rng;                 /* dropout stream at entry, to recompute the same masks */
    int H, W;
    size_t x, out;             /* (B, C, H, W) */
    size_t mean, rstd, gnT, t0;   /* kept: group norm stats, its output as tokens, proj_in's */
    size_t gn;                 /* forward: the group norm's output, then proj_out's */
    size_t dp, dt, dg;         /* backward: d proj_out's tokens (then d gn), d tokens, d gnT */
} xformer_t;

typedef struct {               /* a down or up block */
    int nres;
    resnet_t *res;
    xformer_t *att;            /* NULL for DownBlock2D / UpBlock2D */
    const unet_param *conv_w;  /* downsamplers.0.conv / upsamplers.0.conv, or NULL */
    float *conv_b;
    int *skip;                 /* down: skip index of each layer's output; up: the skip each resnet takes */
    int ds_skip;               /* down: skip index of the downsampler's output */
    size_t *dcat;              /* up, backward: d cat(h, skip) of each resnet */
    size_t sampler_in, sampler_out;   /* the down/upsampler's input (before the 2x) and output */
    size_t up2x, dup2x;        /* up: upsample(h), the conv's input; its gradient in backward */
    clora_t ls;                /* conv LoRA on the sampler's conv */
} block_t;

/* S_CONV: the 3x3 convs (--conv-rank); S_RESLIN: time_emb_proj and
 * conv_shortcut, which kohya's conv_dim adds with the linear rank */
enum { S_Q = 1, S_K = 2, S_V = 4, S_OUT = 8, S_PROJ = 16, S_FF = 32, S_CONV = 64, S_RESLIN = 128 };

typedef struct {               /* where an adapter can go */
    char name[UNET_NAME_LEN];
    lora_t **slot;             /* the module's adapter pointer (lin_t's or clora_t's L) */
    int in, out, k;            /* k: the kernel of a k x k conv (3), else 0 */
    int kind, is_conv;
} site_t;

struct unet_net {
    const unet_param *conv_in_w, *t1_w, *t2_w, *conv_out_w;
    float *conv_in_b, *t1_b, *t2_b;
    block_t down[UNET_MAX_LEVELS], up[UNET_MAX_LEVELS];
    resnet_t mid_res[2];
    xformer_t mid_att;
    float *norm_out_w, *norm_out_b, *conv_out_b;
    int nskips;
    int *skip_C, *skip_lvl;    /* channels and level (resolution H >> lvl) of each skip */
    site_t *sites;
    int nsites, sites_cap;
    int build_err;
    /* activations (offsets) */
    size_t ctx, temb;          /* copy of the context; silu(time embedding) */
    size_t tsin, t1o, t1s, t2o;   /* the time MLP: sinusoid, linear_1, its SiLU, linear_2 */
    size_t xin;                /* full grads: copy of the input latents (conv_in's dW) */
    size_t *skips, *dskips;    /* every skip tensor and, in backward, its gradient */
    size_t *skipn;             /* their sizes */
    size_t h_last, n_out, mean_out, rstd_out, out_silu;   /* conv_norm_out, SiLU */
    size_t maxact;             /* largest (B, C, H, W) tensor: the size of dcur, doth */
    size_t dtemb;              /* full grads, backward: d silu(temb), summed over the resnets */
    size_t dcur, doth;         /* backward: the running gradient, and a second buffer */
    size_t dout_silu;          /* backward: d silu(conv_norm_out) */
    size_t dt2o, t1s_bwd, dt1s, dt1o;   /* full grads, backward: the time MLP */
    float *dctx;               /* backward: where cross-attention sends dctx (or NULL) */
};

/* ------------------------------------------------------------------------ */
/* helpers                                                                   */

/* the tensor at offset off of the arena, or NULL for NONE */
static float *at(const unet_t *u, size_t off) {
    return off == NONE ? NULL : arena_at(&u->acts, off);
}

static void zero(float *p, size_t n) { memset(p, 0, sizeof(float) * n); }

/* the operations table every layer runs through (backend.h): the CPU's, or
 * a device's after unet_to_device. Every pointer given to it is in its
 * memory: an activation (the arena's base + an offset) or a parameter,
 * translated by PV / weight_f32 / lora_of to the device's copy. */
#define OPS (u->ops ? u->ops : &nn_ops_cpu)

/* a vector parameter (bias, norm scale) in the table's memory: the same
 * offset in the device's copy of params (NULL stays NULL) */
static const float *PV(const unet_t *u, const float *p) {
    return p && u->dparams ? u->dparams + (p - u->params) : p;
}

/* an adapter with A, B, dA, dB in the table's memory (on the CPU, itself;
 * on a device, a copy pointing at the same offsets of the device's blocks) */
static lora_t *lora_of(const unet_t *u, lora_t *L, lora_t *tmp) {
    if (!L || !u->dlora_params) return L;
    *tmp = *L;
    tmp->A = u->dlora_params + (L->A - u->lora_params);
    tmp->B = u->dlora_params + (L->B - u->lora_params);
    tmp->dA = L->dA ? u->dlora_grads + (L->dA - u->lora_grads) : NULL;
    tmp->dB = L->dB ? u->dlora_grads + (L->dB - u->lora_grads) : NULL;
    return tmp;
}

/* the arena on the table's memory */
static void acts_free(unet_t *u) {
    if (u->ops && u->ops->device) {
        if (u->acts.base) u->ops->free(u->acts.base);
        u->acts.base = NULL;
        u->acts.nfloats = 0;
    } else {
        arena_free(&u->acts);
    }
}

/* the layout is out of date (adapters or weight gradients change it) */
static void drop_acts(unet_t *u) {
    acts_free(u);
    u->have_forward = 0;
}

/* the gradient of parameter p: same offset in u->grads; NULL when the weights
 * are frozen (no grads block), which every nn.h backward reads as "skip" */
static float *grad_of(const unet_t *u, const float *p) {
    return u->grads && p ? u->grads + (p - u->params) : NULL;
}

/* the same for a weight matrix (grads exist only with fp32 weights) */
static float *grad_of_matrix(const unet_t *u, const unet_param *p) {
    return u->grads && p ? u->grads + p->offset : NULL;
}

/* A weight matrix as fp32, for the layer about to use it. Held as fp32: the
 * weights themselves. Held as fp16 (--weight-dtype fp16): widened (exactly)
 * into u->wbuf, one matrix at a time, so a layer must be done with one matrix
 * before it asks for the next; asking again for the matrix already there
 * costs nothing (lin_backward reads W0 twice). */
static const float *weight_f32(unet_t *u, const unet_param *p) {
    if (u->dparams) {
        /* on a device: its copy, at the same place; fp16 widened there */
        if (!p->data16) return u->dparams + (p->data - u->params);
        if (u->dwbuf_of != p->data16) {
            OPS->widen_f16(u->dwbuf, u->dparams16 + (p->data16 - u->params16), p->numel);
            u->dwbuf_of = p->data16;
        }
        return u->dwbuf;
    }
    if (p->data) return p->data;
    return half_widen_cached(u->wbuf, &u->wbuf_of, p->data16, p->numel);
}

/* ------------------------------------------------------------------------ */
/* small tensor helpers                                                      */

/* transpose, add, accumulate, per-channel adds and sums: the table's (backend.h) */

/* ------------------------------------------------------------------------ */
/* lin: linear or 1x1 conv with an optional adapter, on (N, in) tokens       */

static void lin_forward(unet_t *u, lin_t *l, float *out) {
    const float *inp = at(u, l->inp);
    float *ax = at(u, l->ax);
    if (l->L && !u->train && l->L->dropout > 0.0f) {
        /* inference: dropout is off, as in torch's eval() */
        lora_t Lt, Le = *lora_of(u, l->L, &Lt);
        Le.dropout = 0.0f;
        OPS->lora_forward(out, ax, NULL, NULL, inp, weight_f32(u, l->w), PV(u, l->b), &Le, l->N, l->in, l->out, NULL);
        return;
    }
    lora_t Ld;
    OPS->lora_forward(out, ax, (uint8_t *)at(u, l->mask), at(u, l->scratch), inp, weight_f32(u, l->w), PV(u, l->b),
                 lora_of(u, l->L, &Ld), l->N, l->in, l->out, &u->dropout_rng);
}

/* dinp += d/dinp (may be NULL); the adapter's dA, dB +=; with full grads
 * also dW0 += dout^T inp, db += sum_n dout (the adapter's dropout acts on its
 * own branch only, so W0 sees the undropped input) */
static void lin_backward(unet_t *u, lin_t *l, float *dinp, const float *dout) {
    const float *inp = at(u, l->inp);
    if (u->grads)
        OPS->linear_backward(NULL, grad_of_matrix(u, l->w), grad_of(u, l->b), dout, inp, weight_f32(u, l->w),
                        l->N, l->in, l->out);
    if (!dinp && !l->L) return;
    lora_t Ld;
    OPS->lora_backward(dinp, dout, inp, at(u, l->ax), (const uint8_t *)at(u, l->mask), at(u, l->dscratch),
                  weight_f32(u, l->w), lora_of(u, l->L, &Ld), l->N, l->in, l->out);
}

/* ------------------------------------------------------------------------ */
/* clora: a convolution's LoRA branch, added to the frozen conv's output     */

/* out += the branch on inp (B, in, H, W); nothing without an adapter */
static void clora_forward(unet_t *u, clora_t *c, float *out, const float *inp) {
    if (!c->L) return;
    lora_t Lt, Le = *lora_of(u, c->L, &Lt);
    if (!u->train) Le.dropout = 0.0f;    /* inference: dropout off, as torch's eval() */
    OPS->lora_conv_forward(out, at(u, c->ax), (uint8_t *)at(u, c->mask), at(u, c->scratch), inp, &Le,
                           u->B, c->H, c->W, c->stride, c->pad, &u->dropout_rng);
}

/* dA, dB += and dinp += the branch's part (dinp may be NULL) */
static void clora_backward(unet_t *u, clora_t *c, float *dinp, const float *dout, const float *inp) {
    if (!c->L) return;
    lora_t Ld;
    OPS->lora_conv_backward(dinp, dout, inp, at(u, c->ax), (const uint8_t *)at(u, c->mask), at(u, c->dscratch),
                            lora_of(u, c->L, &Ld), u->B, c->H, c->W, c->stride, c->pad);
}

static int resnet_has_lora(const resnet_t *r) { return r->l1.L || r->l2.L || r->ls.L || r->lt.L; }

/* ------------------------------------------------------------------------ */
/* ResnetBlock2D                                                             */
/*   h1  = conv1(silu(norm1(x))) + time_emb_proj(silu(temb))[:, :, None, None]
 *   out = conv2(silu(norm2(h1))) + shortcut(x)
 * shortcut = conv_shortcut (1x1) when cin != cout, else identity. Dropout
 * (between silu and conv2) is 0 in every SD config, and
 * output_scale_factor is 1. */

/* n = groupnorm(x), act = silu(n): one pass over memory on the CPU
 * (groupnorm_silu_forward, bit for bit the pair); a device table, the pair */
static void gn_silu(unet_t *u, float *n, float *act, float *mean, float *rstd, const float *x,
                    const float *w, const float *b, int B, int C, int HW, int G, float eps) {
    if (OPS == &nn_ops_cpu) {
        groupnorm_silu_forward(n, act, mean, rstd, x, PV(u, w), PV(u, b), B, C, HW, G, eps);
        return;
    }
    OPS->groupnorm_forward(n, mean, rstd, x, PV(u, w), PV(u, b), B, C, HW, G, eps);
    OPS->silu_forward(act, n, (size_t)B * C * HW);
}

static void resnet_forward(unet_t *u, resnet_t *r) {
    OPS->set_layer(r->conv1_w->name);   /* a device error names the block (its conv1 weight) */
    int B = u->B, H = r->H, W = r->W, HW = H * W, G = u->cfg.groups, cin = r->cin, cout = r->cout;
    int T = 4 * u->cfg.block_out[0];
    float eps = u->cfg.eps;
    size_t nout = (size_t)B * cout * HW;
    const float *x = at(u, r->x);
    float *out = at(u, r->out), *n1 = at(u, r->n1), *h1 = at(u, r->h1), *n2 = at(u, r->n2);
    float *mean1 = at(u, r->mean1), *rstd1 = at(u, r->rstd1), *mean2 = at(u, r->mean2), *rstd2 = at(u, r->rstd2);
    float *silu_out = at(u, r->silu), *tp = at(u, r->tproj);
    r->rng = u->dropout_rng;

    gn_silu(u, n1, silu_out, mean1, rstd1, x, r->norm1_w, r->norm1_b, B, cin, HW, G, eps);
    OPS->conv2d_forward(h1, silu_out, weight_f32(u, r->conv1_w), PV(u, r->conv1_b), B, cin, H, W, cout, 3, 3, 1, 1);
    clora_forward(u, &r->l1, h1, silu_out);
    // h1[b, c, :] += (W_t silu(temb[b]) + b_t)[c]
    OPS->linear_forward(tp, at(u, u->net->temb), weight_f32(u, r->temb_w), PV(u, r->temb_b), B, T, cout);
    clora_forward(u, &r->lt, tp, at(u, u->net->temb));
    OPS->add_chan(h1, tp, B, cout, (size_t)HW);
    gn_silu(u, n2, silu_out, mean2, rstd2, h1, r->norm2_w, r->norm2_b, B, cout, HW, G, eps);
    OPS->conv2d_forward(out, silu_out, weight_f32(u, r->conv2_w), PV(u, r->conv2_b), B, cout, H, W, cout, 3, 3, 1, 1);
    clora_forward(u, &r->l2, out, silu_out);
    if (r->short_w) {
        // out_b (cout x HW) += W_s (cout x cin) x_b (cin x HW) + b_s
        for (int b = 0; b < B; b++) {
            float *ob = out + (size_t)b * cout * HW;
            OPS->gemm(0, 0, cout, HW, cin, 1.0f, weight_f32(u, r->short_w), cin, x + (size_t)b * cin * HW, HW,
                 1.0f, ob, HW);
            OPS->add_chan(ob, PV(u, r->short_b), 1, cout, (size_t)HW);
        }
        clora_forward(u, &r->ls, out, x);
    } else {
        OPS->accumulate(out, x, nout);
    }
}

/* dx (B, cin, H, W) += d/dx given dout (B, cout, H, W). Without full grads
 * the time embedding gets no gradient (t is not learned, the time MLP is
 * frozen); with them, d silu(temb) is added to net->dtemb and every weight of
 * the block gets its gradient. */
static void resnet_backward(unet_t *u, resnet_t *r, float *dx, const float *dout) {
    OPS->set_layer(r->conv1_w->name);
    int B = u->B, H = r->H, W = r->W, HW = H * W, G = u->cfg.groups, cin = r->cin, cout = r->cout;
    int T = 4 * u->cfg.block_out[0];
    size_t nin = (size_t)B * cin * HW, nout = (size_t)B * cout * HW;
    const float *x = at(u, r->x);
    float *g1 = at(u, r->g1), *g2 = at(u, r->g2);
    /* full grads: conv1's input silu(n1) (live next to its gradient and
     * dh1), and the time projection's output gradient */
    float *a1 = at(u, r->silu1), *dtp = at(u, r->dtproj);
    // shortcut: dx += W_s^T dout, or dx += dout
    if (r->short_w) {
        for (int b = 0; b < B; b++)
            OPS->gemm(1, 0, cin, HW, cout, 1.0f, weight_f32(u, r->short_w), cin, dout + (size_t)b * cout * HW, HW,
                 1.0f, dx + (size_t)b * cin * HW, HW);
        // dW_s += dout_b x_b^T, db_s += sum dout (a 1x1 conv, no input gradient here)
        if (u->grads)
            OPS->conv2d_backward(NULL, grad_of_matrix(u, r->short_w), grad_of(u, r->short_b), dout, x,
                            weight_f32(u, r->short_w), B, cin, H, W, cout, 1, 1, 1, 0);
        clora_backward(u, &r->ls, dx, dout, x);
    } else {
        OPS->accumulate(dx, dout, nout);
    }
    // conv backward reads its input only for dweight; when that is NULL
    // the gradient buffer of the input has the right shape to stand in
    // for it, else the input silu(n2) is recomputed (forward kept only n2)
    if (u->grads) OPS->silu_forward(g2, at(u, r->n2), nout);
    OPS->zero(g1, nout);
    OPS->conv2d_backward(g1, grad_of_matrix(u, r->conv2_w), grad_of(u, r->conv2_b), dout, u->grads ? g2 : g1,
                    weight_f32(u, r->conv2_w), B, cout, H, W, cout, 3, 3, 1, 1);
    if (r->l2.L) {
        /* conv2's adapter: its input silu(n2) (for dA; full grads left it in
         * g2, else made again), its dx into g1 */
        float *a2 = g2;
        if (!u->grads) {
            a2 = at(u, r->lx);
            OPS->silu_forward(a2, at(u, r->n2), nout);
        }
        clora_backward(u, &r->l2, g1, dout, a2);
    }
    OPS->zero(g2, nout);
    OPS->silu_backward(g2, g1, at(u, r->n2), nout);
    OPS->zero(g1, nout);
    OPS->groupnorm_backward(g1, grad_of(u, r->norm2_w), grad_of(u, r->norm2_b), g2, at(u, r->h1), PV(u, r->norm2_w),
                       at(u, r->mean2), at(u, r->rstd2), B, cout, HW, G);
    if (u->grads || r->lt.L) {
        // h1[b, c, :] += tp[b, c]  =>  dtp[b, c] = sum_i dh1[b, c, i]; tp = W_t silu(temb) + b_t
        OPS->sum_chan(dtp, g1, B, cout, (size_t)HW);
        if (u->grads)
            OPS->linear_backward(at(u, u->net->dtemb), grad_of_matrix(u, r->temb_w), grad_of(u, r->temb_b), dtp,
                                 at(u, u->net->temb), weight_f32(u, r->temb_w), B, T, cout);
        /* time_emb_proj's adapter (d silu(temb) only with full grads) */
        clora_backward(u, &r->lt, u->grads ? at(u, u->net->dtemb) : NULL, dtp, at(u, u->net->temb));
        if (u->grads) OPS->silu_forward(a1, at(u, r->n1), nin);
    }
    OPS->zero(g2, nin);
    OPS->conv2d_backward(g2, grad_of_matrix(u, r->conv1_w), grad_of(u, r->conv1_b), g1, u->grads ? a1 : g2,
                    weight_f32(u, r->conv1_w), B, cin, H, W, cout, 3, 3, 1, 1);
    if (r->l1.L) {
        /* conv1's adapter: its input silu(n1) (full grads: in a1 already),
         * its dx into g2 */
        float *a0 = a1;
        if (!u->grads) {
            a0 = at(u, r->lx);
            OPS->silu_forward(a0, at(u, r->n1), nin);
        }
        clora_backward(u, &r->l1, g2, g1, a0);
    }
    OPS->zero(g1, nin);
    OPS->silu_backward(g1, g2, at(u, r->n1), nin);
    OPS->groupnorm_backward(dx, grad_of(u, r->norm1_w), grad_of(u, r->norm1_b), g1, x, PV(u, r->norm1_w),
                       at(u, r->mean1), at(u, r->rstd1), B, cin, HW, G);
}

/* ------------------------------------------------------------------------ */
/* Attention (diffusers Attention with the default processor):              */
/*   q = to_q(x), k = to_k(src), v = to_v(src)   (src = x, or the context)   */
/*   o = softmax(q k^T / sqrt(dh)) v  per head;  out = to_out.0(o)           */

static void attn_forward(unet_t *u, attn_t *a, float *out) {
    float *qb = at(u, a->qb), *kb = at(u, a->kb), *vb = at(u, a->vb), *ob = at(u, a->ob);
    lin_forward(u, &a->q, qb);
    lin_forward(u, &a->k, kb);
    lin_forward(u, &a->v, vb);
    OPS->attention_forward(ob, NULL, qb, kb, vb, u->B, a->Tq, a->Tk, a->heads, a->dh, 0);
    lin_forward(u, &a->o, out);
}

/* dx += d/dx; dsrc += d/dsrc (dsrc may be NULL; may equal dx for self-attention) */
static void attn_backward(unet_t *u, attn_t *a, float *dx, float *dsrc, const float *dout) {
    int B = u->B, C = a->heads * a->dh, Tq = a->Tq, Tk = a->Tk;
    size_t nq = (size_t)B * Tq * C, nk = (size_t)B * Tk * C;
    float *dob = at(u, a->dob), *dq = at(u, a->dq), *dk = at(u, a->dk), *dv = at(u, a->dv);
    OPS->zero(dob, nq); OPS->zero(dq, nq); OPS->zero(dk, nk); OPS->zero(dv, nk);
    lin_backward(u, &a->o, dob, dout);
    // k and v need a gradient only if it goes somewhere: src or an adapter
    int need_kv = dsrc || a->k.L || a->v.L || u->grads;
    OPS->attention_backward(dq, need_kv ? dk : NULL, need_kv ? dv : NULL, dob,
                       at(u, a->qb), at(u, a->kb), at(u, a->vb), NULL, B, Tq, Tk, a->heads, a->dh, 0);
    lin_backward(u, &a->q, dx, dq);
    if (need_kv) {
        lin_backward(u, &a->k, dsrc, dk);
        lin_backward(u, &a->v, dsrc, dv);
    }
}

/* ------------------------------------------------------------------------ */
/* BasicTransformerBlock on tokens x (B, T, D):                             */
/*   h1  = x  + attn1(norm1(x))                 self-attention               */
/*   h2  = h1 + attn2(norm2(h1), ctx)           cross-attention on the text  */
/*   out = h2 + ff.net.2(geglu(ff.net.0.proj(norm3(h2))))                    */

static void tblock_forward(unet_t *u, tblock_t *tb) {
    int D = tb->dim, N = u->B * tb->T;
    size_t nd = (size_t)N * D;
    const float eps = 1e-5f;    /* nn.LayerNorm default; diffusers passes norm_eps = 1e-5 */
    const float *x = at(u, tb->x);
    float *out = at(u, tb->out), *t = at(u, tb->branch);
    float *h1 = at(u, tb->h1), *h2 = at(u, tb->h2);

    OPS->layernorm_forward(at(u, tb->n1), at(u, tb->m1), at(u, tb->r1), x, PV(u, tb->norm1_w), PV(u, tb->norm1_b), N, D, eps);
    attn_forward(u, &tb->attn1, t);
    OPS->add(h1, x, t, nd);

    OPS->layernorm_forward(at(u, tb->n2), at(u, tb->m2), at(u, tb->r2), h1, PV(u, tb->norm2_w), PV(u, tb->norm2_b), N, D, eps);
    attn_forward(u, &tb->attn2, t);
    OPS->add(h2, h1, t, nd);

    OPS->layernorm_forward(at(u, tb->n3), at(u, tb->m3), at(u, tb->r3), h2, PV(u, tb->norm3_w), PV(u, tb->norm3_b), N, D, eps);
    lin_forward(u, &tb->ff1, at(u, tb->f1));
    OPS->geglu_forward(at(u, tb->g), at(u, tb->f1), N, 4 * D);
    lin_forward(u, &tb->ff2, t);
    OPS->add(out, h2, t, nd);
}

/* in place: dh holds d(out) on entry and d(x) on return (every branch is residual) */
static void tblock_backward(unet_t *u, tblock_t *tb, float *dh) {
    int D = tb->dim, N = u->B * tb->T;
    size_t nd = (size_t)N * D;
    float *dg = at(u, tb->dg), *df1 = at(u, tb->df1), *dn = at(u, tb->dn);
    OPS->zero(dg, (size_t)N * 4 * D); OPS->zero(df1, (size_t)N * 8 * D); OPS->zero(dn, nd);
    // feed-forward branch, then dh += norm3^T dn
    lin_backward(u, &tb->ff2, dg, dh);
    OPS->geglu_backward(df1, dg, at(u, tb->f1), N, 4 * D);
    lin_backward(u, &tb->ff1, dn, df1);
    OPS->layernorm_backward(dh, grad_of(u, tb->norm3_w), grad_of(u, tb->norm3_b), dn, at(u, tb->h2), PV(u, tb->norm3_w),
                       at(u, tb->m3), at(u, tb->r3), N, D);
    OPS->zero(dn, nd);
    // cross-attention: the context's gradient goes to net->dctx (if wanted)
    attn_backward(u, &tb->attn2, dn, u->net->dctx, dh);
    OPS->layernorm_backward(dh, grad_of(u, tb->norm2_w), grad_of(u, tb->norm2_b), dn, at(u, tb->h1), PV(u, tb->norm2_w),
                       at(u, tb->m2), at(u, tb->r2), N, D);
    OPS->zero(dn, nd);
    // self-attention: q, k and v all come from norm1(x)
    attn_backward(u, &tb->attn1, dn, dn, dh);
    OPS->layernorm_backward(dh, grad_of(u, tb->norm1_w), grad_of(u, tb->norm1_b), dn, at(u, tb->x), PV(u, tb->norm1_w),
                       at(u, tb->m1), at(u, tb->r1), N, D);
}

/* ------------------------------------------------------------------------ */
/* Transformer2DModel (continuous input, SD1.x/2.x):                         */
/*   tokens = proj_in(GroupNorm(x))  as (B, HW, C)                           */
/*   tokens = transformer_blocks(tokens)                                     */
/*   out    = proj_out(tokens) as NCHW + x                                   */
/* diffusers applies a 1x1 conv proj_in to NCHW and then permutes to tokens */
/* (use_linear_projection = False), or permutes first and applies a linear  */
/* (True). A 1x1 conv is a linear on every pixel, so both are the same      */
/* product and share one path here: permute, then project.                  */

static void xformer_forward(unet_t *u, xformer_t *xf) {
    OPS->set_layer(xf->proj_in.w->name);   /* the transformer, by its proj_in weight */
    int B = u->B, C = xf->C, HW = xf->H * xf->W, G = u->cfg.groups;
    size_t n = (size_t)B * C * HW;
    const float *x = at(u, xf->x);
    float *out = at(u, xf->out), *gn = at(u, xf->gn);
    xf->rng = u->dropout_rng;
    OPS->groupnorm_forward(gn, at(u, xf->mean), at(u, xf->rstd), x, PV(u, xf->norm_w), PV(u, xf->norm_b), B, C, HW, G, 1e-6f);
    OPS->transpose(at(u, xf->gnT), gn, B, C, HW);
    lin_forward(u, &xf->proj_in, at(u, xf->t0));
    for (int k = 0; k < xf->nblocks; k++) tblock_forward(u, &xf->blocks[k]);
    lin_forward(u, &xf->proj_out, gn);     /* gn is free again: proj_out's tokens */
    OPS->transpose(out, gn, B, HW, C);
    OPS->accumulate(out, x, n);
}

/* in place: dh (B, C, H, W) holds d(out) on entry and d(x) on return */
static void xformer_backward(unet_t *u, xformer_t *xf, float *dh) {
    OPS->set_layer(xf->proj_in.w->name);
    int B = u->B, C = xf->C, HW = xf->H * xf->W, G = u->cfg.groups;
    size_t n = (size_t)B * C * HW;
    float *dp = at(u, xf->dp), *dt = at(u, xf->dt), *dg = at(u, xf->dg);
    OPS->zero(dt, n); OPS->zero(dg, n);
    OPS->transpose(dp, dh, B, C, HW);                 /* d(proj_out output) as tokens */
    lin_backward(u, &xf->proj_out, dt, dp);
    for (int k = xf->nblocks - 1; k >= 0; k--) tblock_backward(u, &xf->blocks[k], dt);
    lin_backward(u, &xf->proj_in, dg, dt);       /* d(gnT) */
    OPS->transpose(dp, dg, B, HW, C);                 /* d(gn) as NCHW */
    OPS->groupnorm_backward(dh, grad_of(u, xf->norm_w), grad_of(u, xf->norm_b), dp, at(u, xf->x), PV(u, xf->norm_w),
                       at(u, xf->mean), at(u, xf->rstd), B, C, HW, G);
}

/* ------------------------------------------------------------------------ */
/* building the tree and the parameter table                                */
/* Run twice: first to count (u->table == NULL), then for real.            */

/* buf = "prefix.name" (or the one that is not empty); a name longer than
 * UNET_NAME_LEN marks the build as failed rather than being cut short */
static const char *join(unet_t *u, char *buf, const char *prefix, const char *name) {
    size_t a = strlen(prefix), b = strlen(name), dot = a && b;
    if (a + dot + b >= UNET_NAME_LEN) {
        u->net->build_err = 1;
        buf[0] = 0;
        return buf;
    }
    memcpy(buf, prefix, a);
    if (dot) buf[a] = '.';
    memcpy(buf + a + dot, name, b + 1);
    return buf;
}

/* Register one parameter tensor: count it (first pass), or also fill its
 * table entry (second pass, which returns it). Where it is held:
 *   fp32 weights: params + offset, every tensor (offset also indexes grads);
 *   fp16 weights: matrices (ndim >= 2) in params16, vectors (biases, norm
 *                 scales) in params as fp32, each block packed in table order. */
static unet_param *param(unet_t *u, const char *prefix, const char *suffix, int ndim,
                         int d0, int d1, int d2, int d3) {
    int shape[4] = {d0, d1, d2, d3};
    size_t n = 1;
    for (int i = 0; i < ndim; i++) n *= (size_t)shape[i];
    unet_param *p = NULL;
    if (u->table) {
        p = &u->table[u->ntable];
        join(u, p->name, prefix, suffix);
        p->offset = u->nparams;
        p->ndim = ndim;
        p->numel = n;
        for (int i = 0; i < 4; i++) p->shape[i] = i < ndim ? shape[i] : 0;
        if (u->wdtype == WEIGHT_F16 && ndim >= 2) p->data16 = u->params16 + u->nmat;
        else p->data = u->params + (u->wdtype == WEIGHT_F16 ? u->nparams - u->nmat : u->nparams);
    }
    u->ntable++;
    u->nparams += n;
    if (ndim >= 2) u->nmat += n;
    return p;
}

/* a vector (bias, norm scale): always fp32 */
static float *vec(unet_t *u, const char *prefix, const char *suffix, int C) {
    unet_param *p = param(u, prefix, suffix, 1, C, 0, 0, 0);
    return p ? p->data : NULL;
}

static void *xcalloc(unet_t *u, size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size);
    if (!p) u->net->build_err = 1;
    return p;
}

static void lin_build(unet_t *u, lin_t *l, const char *prefix, const char *name,
                      int in, int out, int bias, int conv, int kind) {
    char full[UNET_NAME_LEN];
    join(u, full, prefix, name);
    l->in = in; l->out = out; l->L = NULL;
    l->w = conv ? param(u, full, "weight", 4, out, in, 1, 1) : param(u, full, "weight", 2, out, in, 0, 0);
    l->b = bias ? vec(u, full, "bias", out) : NULL;
    struct unet_net *net = u->net;
    if (u->table && kind) {
        if (net->nsites == net->sites_cap) {
            int cap = net->sites_cap ? 2 * net->sites_cap : 64;
            site_t *s = realloc(net->sites, sizeof(site_t) * (size_t)cap);
            if (!s) { net->build_err = 1; return; }
            net->sites = s; net->sites_cap = cap;
        }
        site_t *s = &net->sites[net->nsites++];
        memcpy(s->name, full, sizeof s->name);
        s->slot = &l->L; s->in = in; s->out = out; s->k = 0;
        s->kind = kind; s->is_conv = conv;
    }
}

/* a conv LoRA site on module prefix.name (its weight already registered) */
static void clora_build(unet_t *u, clora_t *c, const char *prefix, const char *name,
                        int in, int out, int k, int stride, int kind, int is_conv) {
    struct unet_net *net = u->net;
    c->L = NULL; c->in = in; c->out = out; c->k = k; c->stride = stride; c->pad = k / 2;
    if (!u->table) return;
    if (net->nsites == net->sites_cap) {
        int cap = net->sites_cap ? 2 * net->sites_cap : 64;
        site_t *s = realloc(net->sites, sizeof(site_t) * (size_t)cap);
        if (!s) { net->build_err = 1; return; }
        net->sites = s; net->sites_cap = cap;
    }
    site_t *s = &net->sites[net->nsites++];
    join(u, s->name, prefix, name);
    s->slot = &c->L; s->in = in; s->out = out; s->k = k > 1 ? k : 0;
    s->kind = kind; s->is_conv = is_conv;
}

static void norm_build(unet_t *u, float **w, float **b, const char *prefix, const char *name, int C) {
    char full[UNET_NAME_LEN];
    join(u, full, prefix, name);
    *w = vec(u, full, "weight", C);
    *b = vec(u, full, "bias", C);
}

static void conv_build(unet_t *u, const unet_param **w, float **b, const char *prefix, const char *name,
                       int out, int in, int k) {
    char full[UNET_NAME_LEN];
    join(u, full, prefix, name);
    *w = param(u, full, "weight", 4, out, in, k, k);
    *b = vec(u, full, "bias", out);
}

static void resnet_build(unet_t *u, resnet_t *r, const char *prefix, int cin, int cout) {
    int T = 4 * u->cfg.block_out[0];
    r->cin = cin; r->cout = cout;
    norm_build(u, &r->norm1_w, &r->norm1_b, prefix, "norm1", cin);
    conv_build(u, &r->conv1_w, &r->conv1_b, prefix, "conv1", cout, cin, 3);
    clora_build(u, &r->l1, prefix, "conv1", cin, cout, 3, 1, S_CONV, 1);
    char full[UNET_NAME_LEN];
    join(u, full, prefix, "time_emb_proj");
    r->temb_w = param(u, full, "weight", 2, cout, T, 0, 0);
    r->temb_b = vec(u, full, "bias", cout);
    clora_build(u, &r->lt, prefix, "time_emb_proj", T, cout, 1, 1, S_RESLIN, 0);
    norm_build(u, &r->norm2_w, &r->norm2_b, prefix, "norm2", cout);
    conv_build(u, &r->conv2_w, &r->conv2_b, prefix, "conv2", cout, cout, 3);
    clora_build(u, &r->l2, prefix, "conv2", cout, cout, 3, 1, S_CONV, 1);
    r->short_w = NULL;
    r->short_b = NULL;
    r->ls.L = NULL;
    if (cin != cout) {
        conv_build(u, &r->short_w, &r->short_b, prefix, "conv_shortcut", cout, cin, 1);
        clora_build(u, &r->ls, prefix, "conv_shortcut", cin, cout, 1, 1, S_RESLIN, 1);
    }
}

static void attn_build(unet_t *u, attn_t *a, const char *prefix, int dim, int kvdim, int heads) {
    a->heads = heads; a->dh = dim / heads;
    lin_build(u, &a->q, prefix, "to_q", dim, dim, 0, 0, S_Q);
    lin_build(u, &a->k, prefix, "to_k", kvdim, dim, 0, 0, S_K);
    lin_build(u, &a->v, prefix, "to_v", kvdim, dim, 0, 0, S_V);
    lin_build(u, &a->o, prefix, "to_out.0", dim, dim, 1, 0, S_OUT);
}

static void xformer_build(unet_t *u, xformer_t *xf, const char *prefix, int C, int heads, int nblocks) {
    int conv = !u->cfg.linear_proj;
    char p[UNET_NAME_LEN];
    xf->C = C; xf->nblocks = nblocks;
    norm_build(u, &xf->norm_w, &xf->norm_b, prefix, "norm", C);
    lin_build(u, &xf->proj_in, prefix, "proj_in", C, C, 1, conv, S_PROJ);
    xf->blocks = xcalloc(u, (size_t)nblocks, sizeof(tblock_t));
    if (!xf->blocks) return;
    for (int k = 0; k < nblocks; k++) {
        tblock_t *tb = &xf->blocks[k];
        char tp[UNET_NAME_LEN];
        char kname[32];
        snprintf(kname, sizeof kname, "transformer_blocks.%d", k);
        join(u, tp, prefix, kname);
        tb->dim = C;
        norm_build(u, &tb->norm1_w, &tb->norm1_b, tp, "norm1", C);
        norm_build(u, &tb->norm2_w, &tb->norm2_b, tp, "norm2", C);
        norm_build(u, &tb->norm3_w, &tb->norm3_b, tp, "norm3", C);
        join(u, p, tp, "attn1");
        attn_build(u, &tb->attn1, p, C, C, heads);
        join(u, p, tp, "attn2");
        attn_build(u, &tb->attn2, p, C, u->cfg.cross_dim, heads);
        lin_build(u, &tb->ff1, tp, "ff.net.0.proj", C, 8 * C, 1, 0, S_FF);
        lin_build(u, &tb->ff2, tp, "ff.net.2", 4 * C, C, 1, 0, S_FF);
    }
    lin_build(u, &xf->proj_out, prefix, "proj_out", C, C, 1, conv, S_PROJ);
}

static void block_free(block_t *b) {
    if (b->att)
        for (int j = 0; j < b->nres; j++) free(b->att[j].blocks);
    free(b->res); free(b->att); free(b->skip); free(b->dcat);
    memset(b, 0, sizeof *b);
}

static void net_free_modules(struct unet_net *net) {
    for (int i = 0; i < UNET_MAX_LEVELS; i++) { block_free(&net->down[i]); block_free(&net->up[i]); }
    free(net->mid_att.blocks); net->mid_att.blocks = NULL;
    free(net->skip_C); free(net->skip_lvl); free(net->skips); free(net->dskips); free(net->skipn);
    net->skip_C = net->skip_lvl = NULL; net->skips = net->dskips = NULL; net->skipn = NULL;
    free(net->sites); net->sites = NULL; net->nsites = net->sites_cap = 0;
}

/* The whole tree, in diffusers' order. Returns 0, or -1 with err set. */
static int net_build(unet_t *u, char *err) {
    const unet_config *c = &u->cfg;
    struct unet_net *net = u->net;
    int n = c->nlevels, C0 = c->block_out[0], T = 4 * C0;
    char p[UNET_NAME_LEN];

    conv_build(u, &net->conv_in_w, &net->conv_in_b, "", "conv_in", C0, c->in_channels, 3);
    net->t1_w = param(u, "time_embedding.linear_1", "weight", 2, T, C0, 0, 0);
    net->t1_b = vec(u, "time_embedding.linear_1", "bias", T);
    net->t2_w = param(u, "time_embedding.linear_2", "weight", 2, T, T, 0, 0);
    net->t2_b = vec(u, "time_embedding.linear_2", "bias", T);

    /* skips: conv_in's output, each down layer's output, each downsampler's */
    int maxskips = 1 + n;
    for (int i = 0; i < n; i++) maxskips += c->layers[i];
    net->skip_C = xcalloc(u, (size_t)maxskips, sizeof(int));
    net->skip_lvl = xcalloc(u, (size_t)maxskips, sizeof(int));
    net->skips = xcalloc(u, (size_t)maxskips, sizeof(size_t));
    net->dskips = xcalloc(u, (size_t)maxskips, sizeof(size_t));
    net->skipn = xcalloc(u, (size_t)maxskips, sizeof(size_t));
    if (net->build_err) goto oom;
    int ns = 0;
    net->skip_C[ns] = C0; net->skip_lvl[ns] = 0; ns++;

    int out = C0;
    for (int i = 0; i < n; i++) {
        block_t *blk = &net->down[i];
        int in = out;
        out = c->block_out[i];
        blk->nres = c->layers[i];
        blk->res = xcalloc(u, (size_t)blk->nres, sizeof(resnet_t));
        blk->skip = xcalloc(u, (size_t)blk->nres, sizeof(int));
        if (c->down_attn[i]) blk->att = xcalloc(u, (size_t)blk->nres, sizeof(xformer_t));
        if (net->build_err) goto oom;
        for (int j = 0; j < blk->nres; j++) {
            snprintf(p, sizeof p, "down_blocks.%d.resnets.%d", i, j);
            resnet_build(u, &blk->res[j], p, j == 0 ? in : out, out);
            if (blk->att) {
                snprintf(p, sizeof p, "down_blocks.%d.attentions.%d", i, j);
                xformer_build(u, &blk->att[j], p, out, c->heads[i], c->tlayers[i]);
            }
            blk->skip[j] = ns;
            net->skip_C[ns] = out; net->skip_lvl[ns] = i; ns++;
        }
        if (i < n - 1) {
            snprintf(p, sizeof p, "down_blocks.%d.downsamplers.0", i);
            conv_build(u, &blk->conv_w, &blk->conv_b, p, "conv", out, out, 3);
            clora_build(u, &blk->ls, p, "conv", out, out, 3, 2, S_CONV, 1);
            blk->ds_skip = ns;
            net->skip_C[ns] = out; net->skip_lvl[ns] = i + 1; ns++;
        }
    }
    net->nskips = ns;

    int Cm = c->block_out[n - 1];
    resnet_build(u, &net->mid_res[0], "mid_block.resnets.0", Cm, Cm);
    xformer_build(u, &net->mid_att, "mid_block.attentions.0", Cm, c->heads[n - 1], c->tlayers[n - 1]);
    resnet_build(u, &net->mid_res[1], "mid_block.resnets.1", Cm, Cm);

    /* up block i works at level n-1-i with the reversed per-block settings */
    int prev = Cm;
    for (int i = 0; i < n; i++) {
        block_t *blk = &net->up[i];
        int l = n - 1 - i;
        out = c->block_out[l];
        int inch = c->block_out[l > 0 ? l - 1 : 0];
        blk->nres = c->layers[l] + 1;
        blk->res = xcalloc(u, (size_t)blk->nres, sizeof(resnet_t));
        blk->skip = xcalloc(u, (size_t)blk->nres, sizeof(int));
        blk->dcat = xcalloc(u, (size_t)blk->nres, sizeof(size_t));
        if (c->up_attn[i]) blk->att = xcalloc(u, (size_t)blk->nres, sizeof(xformer_t));
        if (net->build_err) goto oom;
        for (int j = 0; j < blk->nres; j++) {
            int skipch = j == blk->nres - 1 ? inch : out;
            int resin = j == 0 ? prev : out;
            if (ns == 0 || net->skip_C[ns - 1] != skipch || net->skip_lvl[ns - 1] != l) {
                snprintf(err, UNET_ERR_LEN,
                         "config.json: layers_per_block: up_blocks.%d.resnets.%d finds no matching "
                         "skip connection (use the same layers_per_block for every block)", i, j);
                return -1;
            }
            blk->skip[j] = --ns;
            snprintf(p, sizeof p, "up_blocks.%d.resnets.%d", i, j);
            resnet_build(u, &blk->res[j], p, resin + skipch, out);
            if (blk->att) {
                snprintf(p, sizeof p, "up_blocks.%d.attentions.%d", i, j);
                xformer_build(u, &blk->att[j], p, out, c->heads[l], c->tlayers[l]);
            }
        }
        if (i < n - 1) {
            snprintf(p, sizeof p, "up_blocks.%d.upsamplers.0", i);
            conv_build(u, &blk->conv_w, &blk->conv_b, p, "conv", out, out, 3);
            clora_build(u, &blk->ls, p, "conv", out, out, 3, 1, S_CONV, 1);
        }
        prev = out;
    }
    if (ns != 0) {
        snprintf(err, UNET_ERR_LEN, "config.json: layers_per_block: %d skip connections left unused "
                 "(use the same layers_per_block for every block)", ns);
        return -1;
    }
    norm_build(u, &net->norm_out_w, &net->norm_out_b, "", "conv_norm_out", C0);
    net->conv_out_w = param(u, "conv_out", "weight", 4, c->out_channels, C0, 3, 3);
    net->conv_out_b = vec(u, "conv_out", "bias", c->out_channels);
    if (net->build_err) goto oom;
    return 0;
oom:
    snprintf(err, UNET_ERR_LEN, "unet: out of memory building the model");
    return -1;
}

int unet_build(unet_t *u, const unet_config *c, char *err) {
    return unet_build_dtype(u, c, WEIGHT_F32, err);
}

int unet_build_dtype(unet_t *u, const unet_config *c, weight_dtype wdtype, char *err) {
    memset(u, 0, sizeof *u);
    u->cfg = *c;
    u->wdtype = wdtype;
    u->net = calloc(1, sizeof(struct unet_net));
    if (!u->net) { snprintf(err, UNET_ERR_LEN, "unet: out of memory"); return -1; }
    /* pass 1: count */
    if (net_build(u, err)) { unet_free(u); return -1; }
    net_free_modules(u->net);
    size_t nparams = u->nparams, nmat = u->nmat;
    int ntable = u->ntable;
    /* pass 2: the same walk with storage, so every pointer and name is set.
     * fp16 weights: the matrices in params16, the vectors in params */
    int f16 = wdtype == WEIGHT_F16;
    u->table = calloc((size_t)ntable, sizeof(unet_param));
    u->params = calloc(f16 ? nparams - nmat + 1 : nparams, sizeof(float));
    if (f16) u->params16 = calloc(nmat + 1, sizeof(uint16_t));
    if (!u->table || !u->params || (f16 && !u->params16)) {
        snprintf(err, UNET_ERR_LEN, "unet: out of memory for %zu parameters", nparams);
        unet_free(u);
        return -1;
    }
    u->nparams = 0; u->nmat = 0; u->ntable = 0;
    if (net_build(u, err)) { unet_free(u); return -1; }
    if (u->net->build_err) {
        snprintf(err, UNET_ERR_LEN, "unet: out of memory or a name too long building the model");
        unet_free(u);
        return -1;
    }
    if (f16) {
        /* the widening buffer: room for the largest matrix (SD1.5: 1280 x 2560 x 3 x 3) */
        size_t big = 1;
        for (int i = 0; i < u->ntable; i++)
            if (u->table[i].data16 && u->table[i].numel > big) big = u->table[i].numel;
        u->wbuf = malloc(sizeof(float) * big);
        if (!u->wbuf) {
            snprintf(err, UNET_ERR_LEN, "unet: out of memory for the %zu-float weight buffer", big);
            unet_free(u);
            return -1;
        }
    }
    return 0;
}

int unet_count_params(const unet_config *c, size_t *nparams, int *ntensors, char *err) {
    unet_t u;
    memset(&u, 0, sizeof u);
    u.cfg = *c;
    u.net = calloc(1, sizeof(struct unet_net));
    if (!u.net) { snprintf(err, UNET_ERR_LEN, "unet: out of memory"); return -1; }
    int rc = net_build(&u, err);   /* the counting pass only */
    if (rc == 0 && u.net->build_err) {
        snprintf(err, UNET_ERR_LEN, "unet: out of memory building the model");
        rc = -1;
    }
    *nparams = u.nparams;
    *ntensors = u.ntable;
    net_free_modules(u.net);
    free(u.net);
    return rc;
}

void unet_free(unet_t *u) {
    if (u->net) { net_free_modules(u->net); free(u->net); }
    free(u->params); free(u->params16); free(u->wbuf); free(u->grads); free(u->table);
    free(u->loras); free(u->lora_params); free(u->lora_grads);
    acts_free(u);
    if (u->ops && u->ops->device) {
        u->ops->free(u->dparams); u->ops->free(u->dlora_params); u->ops->free(u->dlora_grads);
        u->ops->free(u->dparams16); u->ops->free(u->dwbuf);
        u->ops->free(u->dio);
    }
    memset(u, 0, sizeof *u);
}

int unet_param_index(const unet_t *u, const char *name) {
    for (int i = 0; i < u->ntable; i++)
        if (strcmp(u->table[i].name, name) == 0) return i;
    return -1;
}

int unet_read_param(unet_t *u, int i, const st_file *f, const char *name, int squeeze, char *err) {
    const unet_param *p = &u->table[i];
    int64_t shape[4];
    for (int d = 0; d < p->ndim; d++) shape[d] = p->shape[d];
    u->wbuf_of = NULL;   /* the widened copy may be of this matrix */
    return st_read_param(f, name, squeeze, p->ndim, shape, p->data, p->data16, err);
}

void unet_param_get(const unet_t *u, int i, float *dst) {
    const unet_param *p = &u->table[i];
    half_param_get(dst, p->data, p->data16, p->numel);
}

void unet_param_set(unet_t *u, int i, const float *src) {
    const unet_param *p = &u->table[i];
    half_param_set(p->data, p->data16, src, p->numel);
    u->wbuf_of = NULL;
    if (u->dparams && p->data) u->ops->upload(u->dparams + (p->data - u->params), p->data, sizeof(float) * p->numel);
    if (u->dparams16 && p->data16) {
        u->ops->upload(u->dparams16 + (p->data16 - u->params16), p->data16, sizeof(uint16_t) * p->numel);
        u->dwbuf_of = NULL;
    }
}

/* ------------------------------------------------------------------------ */
/* config.json                                                               */

/* an int, or a list of n ints, or absent (dflt); out gets n values */
static int int_list(const json *j, const char *key, int dflt, int n, int *out, char *err) {
    const json *v = json_get(j, key);
    if (!v || v->type == JSON_NULL) {
        for (int i = 0; i < n; i++) out[i] = dflt;
        return 0;
    }
    /* the range is checked before any conversion: a double out of int's
     * range converts to nothing defined */
    if (v->type == JSON_NUMBER) {
        if (!(v->number >= 1 && v->number <= INT_MAX) || v->number != (double)(int)v->number) goto bad;
        for (int i = 0; i < n; i++) out[i] = (int)v->number;
        return 0;
    }
    if (v->type == JSON_ARRAY && v->n == n) {
        for (int i = 0; i < n; i++) {
            if (v->items[i].type != JSON_NUMBER || !(v->items[i].number >= 1 && v->items[i].number <= INT_MAX) ||
                v->items[i].number != (double)(int)v->items[i].number) goto bad;
            out[i] = (int)v->items[i].number;
        }
        return 0;
    }
bad:
    snprintf(err, UNET_ERR_LEN, "config.json: %s: expected a positive integer or a list of %d "
             "(check the file)", key, n);
    return -1;
}

/* json_num as an int; a value outside int's range becomes -1, which the
 * size checks refuse (converting it directly would be undefined) */
static int num_int(const json *j, const char *key, int dflt) {
    double d = json_num(j, key, dflt);
    return d > -2147483648.0 && d < 2147483648.0 ? (int)d : -1;
}

static int is_set(const json *j, const char *key) {
    const json *v = json_get(j, key);
    return v && v->type != JSON_NULL;
}

static int is_true(const json *j, const char *key) {
    const json *v = json_get(j, key);
    if (!v) return 0;
    if (v->type == JSON_BOOL) return v->boolean;
    if (v->type == JSON_ARRAY) {
        for (int i = 0; i < v->n; i++)
            if (v->items[i].type == JSON_BOOL && v->items[i].boolean) return 1;
    }
    return 0;
}

int unet_config_from_json(unet_config *c, const json *j, char *err) {
    memset(c, 0, sizeof *c);
    if (!j || j->type != JSON_OBJECT) {
        snprintf(err, UNET_ERR_LEN, "config.json: not a JSON object (check the file)");
        return -1;
    }
    /* features of UNet2DConditionModel that SD1.x does not use: refuse rather
     * than compute something else */
    static const char *must_be_null[] = {
        "class_embed_type", "addition_embed_type", "num_class_embeds", "encoder_hid_dim",
        "encoder_hid_dim_type", "time_cond_proj_dim", "time_embedding_dim", "time_embedding_act_fn",
        "timestep_post_act", "projection_class_embeddings_input_dim", "addition_time_embed_dim",
        "cross_attention_norm", "num_attention_heads", "reverse_transformer_layers_per_block",
    };
    for (size_t i = 0; i < sizeof must_be_null / sizeof *must_be_null; i++)
        if (is_set(j, must_be_null[i])) {
            snprintf(err, UNET_ERR_LEN, "config.json: %s: not supported (only SD1.x-style UNets are)",
                     must_be_null[i]);
            return -1;
        }
    static const char *must_be_false[] = {
        "center_input_sample", "only_cross_attention", "dual_cross_attention",
        "resnet_skip_time_act", "class_embeddings_concat", "mid_block_only_cross_attention",
    };
    for (size_t i = 0; i < sizeof must_be_false / sizeof *must_be_false; i++)
        if (is_true(j, must_be_false[i])) {
            snprintf(err, UNET_ERR_LEN, "config.json: %s: true is not supported (only SD1.x-style UNets are)",
                     must_be_false[i]);
            return -1;
        }
    static const struct { const char *key, *value; } strings[] = {
        {"time_embedding_type", "positional"}, {"act_fn", "silu"},
        {"resnet_time_scale_shift", "default"}, {"attention_type", "default"},
        {"mid_block_type", "UNetMidBlock2DCrossAttn"},
    };
    for (size_t i = 0; i < sizeof strings / sizeof *strings; i++) {
        const json *v = json_get(j, strings[i].key);
        if (!v) continue;
        if (v->type != JSON_STRING || strcmp(v->string, strings[i].value) != 0) {
            snprintf(err, UNET_ERR_LEN, "config.json: %s: only \"%s\" is supported",
                     strings[i].key, strings[i].value);
            return -1;
        }
    }
    static const struct { const char *key; double value; } numbers[] = {
        {"conv_in_kernel", 3}, {"conv_out_kernel", 3}, {"downsample_padding", 1},
        {"mid_block_scale_factor", 1}, {"resnet_out_scale_factor", 1}, {"dropout", 0},
    };
    for (size_t i = 0; i < sizeof numbers / sizeof *numbers; i++) {
        const json *v = json_get(j, numbers[i].key);
        if (!v) continue;
        if (v->type != JSON_NUMBER || v->number != numbers[i].value) {
            snprintf(err, UNET_ERR_LEN, "config.json: %s: only %g is supported",
                     numbers[i].key, numbers[i].value);
            return -1;
        }
    }

    /* block_out_channels and the block types fix the number of levels */
    const json *boc = json_get(j, "block_out_channels");
    static const int dflt_boc[4] = {320, 640, 1280, 1280};
    if (!boc) {
        c->nlevels = 4;
        memcpy(c->block_out, dflt_boc, sizeof dflt_boc);
    } else {
        if (boc->type != JSON_ARRAY || boc->n < 1 || boc->n > UNET_MAX_LEVELS) {
            snprintf(err, UNET_ERR_LEN, "config.json: block_out_channels: expected a list of 1 to %d "
                     "integers", UNET_MAX_LEVELS);
            return -1;
        }
        c->nlevels = boc->n;
        for (int i = 0; i < boc->n; i++) {
            const json *v = &boc->items[i];
            if (v->type != JSON_NUMBER || v->number < 1 || v->number > 65536 ||
                v->number != (double)(int)v->number) {
                snprintf(err, UNET_ERR_LEN, "config.json: block_out_channels: item %d is not a "
                         "positive integer", i);
                return -1;
            }
            c->block_out[i] = (int)v->number;
        }
    }
    int n = c->nlevels;
    for (int pass = 0; pass < 2; pass++) {
        const char *key = pass ? "up_block_types" : "down_block_types";
        const char *attn_name = pass ? "CrossAttnUpBlock2D" : "CrossAttnDownBlock2D";
        const char *plain_name = pass ? "UpBlock2D" : "DownBlock2D";
        int *flags = pass ? c->up_attn : c->down_attn;
        const json *v = json_get(j, key);
        if (!v) {   /* diffusers' defaults for 4 levels */
            if (n != 4) {
                snprintf(err, UNET_ERR_LEN, "config.json: %s: missing (needed with %d levels)", key, n);
                return -1;
            }
            for (int i = 0; i < 4; i++) flags[i] = pass ? i > 0 : i < 3;
            continue;
        }
        if (v->type != JSON_ARRAY || v->n != n) {
            snprintf(err, UNET_ERR_LEN, "config.json: %s: expected a list of %d block types "
                     "(one per block_out_channels)", key, n);
            return -1;
        }
        for (int i = 0; i < n; i++) {
            const json *s = &v->items[i];
            if (s->type == JSON_STRING && strcmp(s->string, attn_name) == 0) flags[i] = 1;
            else if (s->type == JSON_STRING && strcmp(s->string, plain_name) == 0) flags[i] = 0;
            else {
                snprintf(err, UNET_ERR_LEN, "config.json: %s: item %d: only %s and %s are supported",
                         key, i, attn_name, plain_name);
                return -1;
            }
        }
    }

    c->in_channels = num_int(j, "in_channels", 4);
    c->out_channels = num_int(j, "out_channels", 4);
    const json *ss = json_get(j, "sample_size");
    c->sample_size = ss && ss->type == JSON_NUMBER ? num_int(j, "sample_size", 0) : 0;
    if (int_list(j, "layers_per_block", 2, n, c->layers, err)) return -1;
    /* "attention_head_dim" is, for these models, the number of heads: diffusers
     * sets num_attention_heads = attention_head_dim when num_attention_heads is
     * not given (a naming mistake kept for compatibility, diffusers issue 2011) */
    if (int_list(j, "attention_head_dim", 8, n, c->heads, err)) return -1;
    if (int_list(j, "transformer_layers_per_block", 1, n, c->tlayers, err)) return -1;
    const json *cd = json_get(j, "cross_attention_dim");
    if (cd && cd->type != JSON_NUMBER) {
        snprintf(err, UNET_ERR_LEN, "config.json: cross_attention_dim: per-block lists are not "
                 "supported (one context size for every block)");
        return -1;
    }
    c->cross_dim = num_int(j, "cross_attention_dim", 1280);
    const json *g = json_get(j, "norm_num_groups");
    if (g && g->type == JSON_NULL) {
        snprintf(err, UNET_ERR_LEN, "config.json: norm_num_groups: null (no output norm) is not supported");
        return -1;
    }
    c->groups = num_int(j, "norm_num_groups", 32);
    double eps = json_num(j, "norm_eps", 1e-5);
    c->eps = eps > 0 && eps <= 3.4e38 ? (float)eps : -1.0f;   /* beyond float: refused below */
    c->linear_proj = json_bool(j, "use_linear_projection", 0);
    c->flip_sin_to_cos = json_bool(j, "flip_sin_to_cos", 1);
    c->freq_shift = (float)json_num(j, "freq_shift", 0);

    /* sizes the layers divide */
    if (c->in_channels < 1 || c->out_channels < 1 || c->cross_dim < 1 || c->groups < 1 || !(c->eps > 0)) {
        snprintf(err, UNET_ERR_LEN, "config.json: in_channels, out_channels, cross_attention_dim, "
                 "norm_num_groups and norm_eps must be positive");
        return -1;
    }
    if (c->block_out[0] % 2) {
        snprintf(err, UNET_ERR_LEN, "config.json: block_out_channels: the first entry must be even "
                 "(it is the sinusoidal embedding size)");
        return -1;
    }
    for (int i = 0; i < n; i++) {
        if (c->block_out[i] % c->groups) {
            snprintf(err, UNET_ERR_LEN, "config.json: norm_num_groups: %d does not divide "
                     "block_out_channels[%d] = %d", c->groups, i, c->block_out[i]);
            return -1;
        }
        int has_attn = c->down_attn[i] || c->up_attn[n - 1 - i] || i == n - 1;
        if (has_attn && c->block_out[i] % c->heads[i]) {
            snprintf(err, UNET_ERR_LEN, "config.json: attention_head_dim: %d heads do not divide "
                     "the channels of block %d", c->heads[i], i);
            return -1;
        }
    }
    return 0;
}

/* SD1.5's unet/config.json as the tests and gpu_check once each spelled it */
static const char *SD15_CONFIG =
    "{\"_class_name\": \"UNet2DConditionModel\", \"act_fn\": \"silu\", \"attention_head_dim\": 8,"
    " \"block_out_channels\": [320, 640, 1280, 1280], \"center_input_sample\": false,"
    " \"cross_attention_dim\": 768, \"down_block_types\": [\"CrossAttnDownBlock2D\","
    " \"CrossAttnDownBlock2D\", \"CrossAttnDownBlock2D\", \"DownBlock2D\"],"
    " \"downsample_padding\": 1, \"flip_sin_to_cos\": true, \"freq_shift\": 0, \"in_channels\": 4,"
    " \"layers_per_block\": 2, \"mid_block_scale_factor\": 1, \"norm_eps\": 1e-05,"
    " \"norm_num_groups\": 32, \"out_channels\": 4, \"sample_size\": 64, \"up_block_types\":"
    " [\"UpBlock2D\", \"CrossAttnUpBlock2D\", \"CrossAttnUpBlock2D\", \"CrossAttnUpBlock2D\"]}";

int unet_config_sd15(unet_config *c, char *err) {
    char jerr[256];
    json *j = json_parse(SD15_CONFIG, strlen(SD15_CONFIG), jerr, sizeof jerr);
    if (!j) { snprintf(err, UNET_ERR_LEN, "unet: SD1.5 config: %s", jerr); return -1; }
    int rc = unet_config_from_json(c, j, err);
    json_free(j);
    return rc;
}


/* ------------------------------------------------------------------------ */
/* loading                                                                   */

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *buf = NULL;
    size_t cap = 0, n = 0;
    for (;;) {
        if (n + 4096 > cap) {
            cap = cap ? 2 * cap : 65536;
            char *nb = realloc(buf, cap + 1);
            if (!nb) { free(buf); fclose(f); return NULL; }
            buf = nb;
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0) break;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) { free(buf); return NULL; }
    buf[n] = 0;
    *len = n;
    return buf;
}

int unet_load_diffusers(unet_t *u, const char *dir, char *err) {
    return unet_load_diffusers_dtype(u, dir, WEIGHT_F32, err);
}

int unet_load_diffusers_dtype(unet_t *u, const char *dir, weight_dtype wdtype, char *err) {
    char path[4096], jerr[256];
    memset(u, 0, sizeof *u);
    snprintf(path, sizeof path, "%s/config.json", dir);
    size_t len = 0;
    char *text = read_file(path, &len);
    if (!text) {
        snprintf(err, UNET_ERR_LEN, "%.400s: cannot read (give a diffusers unet folder)", path);
        return -1;
    }
    json *j = json_parse(text, len, jerr, sizeof jerr);
    free(text);
    if (!j) {
        snprintf(err, UNET_ERR_LEN, "%.200s: %s", path, jerr);
        return -1;
    }
    unet_config c;
    int rc = unet_config_from_json(&c, j, err);
    json_free(j);
    if (rc) return -1;
    if (unet_build_dtype(u, &c, wdtype, err)) return -1;

    st_file f;
    char sterr[ST_ERR_LEN];
    snprintf(path, sizeof path, "%s/diffusion_pytorch_model.safetensors", dir);
    FILE *probe = fopen(path, "rb");
    if (probe) fclose(probe);
    else snprintf(path, sizeof path, "%s/diffusion_pytorch_model.fp16.safetensors", dir);
    if (st_open(&f, path, sterr)) {
        snprintf(err, UNET_ERR_LEN, "%s", sterr);
        unet_free(u);
        return -1;
    }
    for (int i = 0; i < u->ntable; i++) {
        if (unet_read_param(u, i, &f, u->table[i].name, 0, sterr)) {
            snprintf(err, UNET_ERR_LEN, "%s", sterr);
            st_close(&f); unet_free(u);
            return -1;
        }
    }
    for (int i = 0; i < f.ntensors; i++) {
        if (unet_param_index(u, f.tensors[i].name) < 0) {
            snprintf(err, UNET_ERR_LEN, "%.300s: unexpected tensor %.100s (not part of the UNet config.json "
                     "describes; is config.json from the same model?)", path, f.tensors[i].name);
            st_close(&f); unet_free(u);
            return -1;
        }
    }
    st_close(&f);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* LoRA                                                                      */

int unet_add_lora(unet_t *u, const char *targets, int rank, float alpha, float dropout,
                  uint64_t seed) {
    return unet_add_lora_conv(u, targets, rank, alpha, 0, 0.0f, dropout, seed);
}

/* the rank and alpha of site s, or rank 0 when it gets no adapter: the
 * targets' linears; with conv_rank, kohya's conv_dim set as well: the 3x3
 * convs at conv_rank / conv_alpha, time_emb_proj and conv_shortcut at rank */
static int site_rank(const site_t *s, int kinds, int rank, float alpha, int conv_rank, float conv_alpha,
                     float *a) {
    if (s->kind & kinds) { *a = alpha; return rank; }
    if (conv_rank > 0 && s->kind == S_RESLIN) { *a = alpha; return rank; }
    if (conv_rank > 0 && s->kind == S_CONV) { *a = conv_alpha; return conv_rank; }
    return 0;
}

int unet_add_lora_conv(unet_t *u, const char *targets, int rank, float alpha, int conv_rank, float conv_alpha,
                       float dropout, uint64_t seed) {
    struct unet_net *net = u->net;
    int kinds;
    if (!net) {
        snprintf(u->err, UNET_ERR_LEN, "LoRA: the UNet is not built (load it first)");
        return -1;
    }
    if (strcmp(targets, "qv") == 0) kinds = S_Q | S_V;
    else if (strcmp(targets, "attn") == 0) kinds = S_Q | S_K | S_V | S_OUT;
    else if (strcmp(targets, "transformer") == 0) kinds = S_Q | S_K | S_V | S_OUT | S_PROJ | S_FF;
    else {
        snprintf(u->err, UNET_ERR_LEN, "LoRA targets \"%s\": unknown (use qv, attn or transformer)", targets);
        return -1;
    }
    if (u->nloras) {
        snprintf(u->err, UNET_ERR_LEN, "LoRA: the UNet already has adapters");
        return -1;
    }
    if (rank < 1 || !(alpha > 0) || !(dropout >= 0 && dropout < 1) || conv_rank < 0 ||
        (conv_rank > 0 && !(conv_alpha > 0))) {
        snprintf(u->err, UNET_ERR_LEN, "LoRA: rank must be >= 1, alpha > 0, dropout in [0, 1), conv rank >= 0, conv alpha > 0");
        return -1;
    }
    int count = 0;
    size_t total = 0;
    for (int i = 0; i < net->nsites; i++) {
        const site_t *st = &net->sites[i];
        float a;
        int rk = site_rank(st, kinds, rank, alpha, conv_rank, conv_alpha, &a);
        if (!rk) continue;
        count++;
        total += (size_t)rk * ((size_t)st->in * (st->k ? st->k * st->k : 1) + st->out);
    }
    u->loras = calloc((size_t)count, sizeof(unet_lora));
    u->lora_params = calloc(total, sizeof(float));
    u->lora_grads = calloc(total, sizeof(float));
    if (!u->loras || !u->lora_params || !u->lora_grads) {
        free(u->loras); free(u->lora_params); free(u->lora_grads);
        u->loras = NULL; u->lora_params = u->lora_grads = NULL;
        snprintf(u->err, UNET_ERR_LEN, "LoRA: out of memory");
        return -1;
    }
    rng_t rng;
    rng_seed(&rng, seed);
    size_t off = 0;
    int k = 0;
    for (int i = 0; i < net->nsites; i++) {
        site_t *s = &net->sites[i];
        float a;
        int rk = site_rank(s, kinds, rank, alpha, conv_rank, conv_alpha, &a);
        if (!rk) continue;
        unet_lora *ul = &u->loras[k++];
        lora_t *L = &ul->L;
        int in = s->in, out = s->out;
        snprintf(ul->name, sizeof ul->name, "%s", s->name);
        ul->is_conv = s->is_conv;
        size_t fan = (size_t)in * (s->k ? s->k * s->k : 1);
        float *A = u->lora_params + off, *Bm = A + (size_t)rk * fan;
        if (s->k) lora_conv_init(L, in, out, s->k, rk, a, dropout, A, Bm, &rng);
        else lora_init(L, in, out, rk, a, dropout, A, Bm, 0, &rng);
        L->dA = u->lora_grads + off;
        L->dB = L->dA + (size_t)rk * fan;
        off += (size_t)rk * (fan + out);
        *s->slot = L;
    }
    u->nloras = count;
    u->lora_nparams = total;
    rng_seed(&u->dropout_rng, seed ^ 0x9e3779b97f4a7c15ull);
    /* the adapters' saved activations change the arena's layout */
    drop_acts(u);
    return 0;
}

unet_lora *unet_find_lora(unet_t *u, const char *module_name) {
    for (int i = 0; i < u->nloras; i++)
        if (strcmp(u->loras[i].name, module_name) == 0) return &u->loras[i];
    return NULL;
}

void unet_zero_lora_grads(unet_t *u) {
    if (u->lora_grads) zero(u->lora_grads, u->lora_nparams);
    if (u->dlora_grads) u->ops->zero(u->dlora_grads, u->dlora_n);
}

/* ------------------------------------------------------------------------ */
/* full fine-tuning                                                          */

int unet_alloc_grads(unet_t *u) {
    if (u->grads) return 0;
    if (u->wdtype != WEIGHT_F32) {
        /* the gradient updates the weights themselves, which fp16 cannot hold
         * to the precision small updates need */
        snprintf(u->err, UNET_ERR_LEN, "unet: full fine-tuning needs fp32 weights (load with --weight-dtype fp32)");
        return -1;
    }
    u->grads = calloc(u->nparams ? u->nparams : 1, sizeof(float));
    if (!u->grads) {
        snprintf(u->err, UNET_ERR_LEN, "unet: out of memory for %zu weight gradients (%.1f MiB)",
                 u->nparams, (double)u->nparams * 4 / 1048576.0);
        return -1;
    }
    /* forward now keeps a little more (the latents, the time MLP) and backward
     * needs more scratch: the arena's sizes change, as after unet_add_lora */
    drop_acts(u);
    return 0;
}

void unet_zero_grads(unet_t *u) {
    if (u->grads) zero(u->grads, u->nparams);
}

/* ------------------------------------------------------------------------ */
/* the activation layout                                                    */
/* unet_layout gives every tensor forward and backward use an offset in one */
/* arena, from the config and the shape alone (arena.h). It walks the       */
/* modules in forward order, then in backward's. Each module has three      */
/* helpers: _keep (what its forward writes and backward reads), and         */
/* _fwd_scratch / _bwd_scratch (what it needs only while it runs: they give */
/* it back before returning, so they only raise the peak).                  */

static void lin_keep(unet_t *u, arena_plan *p, lin_t *l, size_t inp, int N) {
    l->inp = inp;
    l->N = N;
    l->ax = l->L ? arena_take(p, (size_t)N * l->L->r) : NONE;
    l->mask = l->L && u->train && l->L->dropout > 0.0f ? arena_take(p, ((size_t)N * l->in + 3) / 4) : NONE;
    l->scratch = l->dscratch = NONE;
}

static void lin_fwd_scratch(arena_plan *p, lin_t *l) {
    size_t m = arena_mark(p);
    /* lora_forward needs scratch only for the dropped-out copy of its input */
    if (l->mask != NONE) l->scratch = arena_take(p, lora_scratch_floats(l->L, l->N));
    arena_release(p, m);
}

static void lin_bwd_scratch(arena_plan *p, lin_t *l) {
    size_t m = arena_mark(p);
    if (l->L) l->dscratch = arena_take(p, lora_scratch_floats(l->L, l->N));
    arena_release(p, m);
}

/* a conv LoRA's kept tensors (its input is H x W), and its scratch */
static void clora_keep(unet_t *u, arena_plan *p, clora_t *c, int H, int W) {
    c->H = H; c->W = W;
    c->ax = c->mask = c->scratch = c->dscratch = NONE;
    if (!c->L) return;
    int Ho = (H + 2 * c->pad - c->k) / c->stride + 1, Wo = (W + 2 * c->pad - c->k) / c->stride + 1;
    c->ax = arena_take(p, (size_t)u->B * c->L->r * Ho * Wo);
    if (u->train && c->L->dropout > 0.0f) c->mask = arena_take(p, ((size_t)u->B * c->in * H * W + 3) / 4);
}

static void clora_fwd_scratch(unet_t *u, arena_plan *p, clora_t *c) {
    if (c->mask == NONE) return;     /* scratch only for the dropped-out input */
    size_t m = arena_mark(p);
    c->scratch = arena_take(p, lora_conv_scratch_floats(c->L, u->B, c->H, c->W, c->stride, c->pad, 0));
    arena_release(p, m);
}

static void clora_bwd_scratch(unet_t *u, arena_plan *p, clora_t *c) {
    if (!c->L) return;
    size_t m = arena_mark(p);
    c->dscratch = arena_take(p, lora_conv_scratch_floats(c->L, u->B, c->H, c->W, c->stride, c->pad, 1));
    arena_release(p, m);
}

static void resnet_keep(unet_t *u, arena_plan *p, resnet_t *r) {
    size_t B = (size_t)u->B, HW = (size_t)r->H * r->W, G = (size_t)u->cfg.groups;
    r->n1 = arena_take(p, B * r->cin * HW);
    r->mean1 = arena_take(p, B * G);
    r->rstd1 = arena_take(p, B * G);
    r->h1 = arena_take(p, B * r->cout * HW);
    r->n2 = arena_take(p, B * r->cout * HW);
    r->mean2 = arena_take(p, B * G);
    r->rstd2 = arena_take(p, B * G);
    clora_keep(u, p, &r->l1, r->H, r->W);
    clora_keep(u, p, &r->lt, 1, 1);
    clora_keep(u, p, &r->l2, r->H, r->W);
    clora_keep(u, p, &r->ls, r->H, r->W);
}

static void resnet_fwd_scratch(unet_t *u, arena_plan *p, resnet_t *r) {
    size_t B = (size_t)u->B, HW = (size_t)r->H * r->W, m = arena_mark(p);
    r->silu = arena_take(p, B * (r->cin > r->cout ? r->cin : r->cout) * HW);
    r->tproj = arena_take(p, B * r->cout);
    clora_fwd_scratch(u, p, &r->l1);
    clora_fwd_scratch(u, p, &r->lt);
    clora_fwd_scratch(u, p, &r->l2);
    clora_fwd_scratch(u, p, &r->ls);
    arena_release(p, m);
}

static void resnet_bwd_scratch(unet_t *u, arena_plan *p, resnet_t *r) {
    size_t B = (size_t)u->B, HW = (size_t)r->H * r->W, m = arena_mark(p);
    size_t nmax = B * (r->cin > r->cout ? r->cin : r->cout) * HW;
    r->g1 = arena_take(p, nmax);
    r->g2 = arena_take(p, nmax);
    r->silu1 = u->grads ? arena_take(p, B * r->cin * HW) : NONE;
    r->dtproj = u->grads || r->lt.L ? arena_take(p, B * r->cout) : NONE;
    r->lx = r->l1.L || r->l2.L ? arena_take(p, nmax) : NONE;
    clora_bwd_scratch(u, p, &r->ls);
    clora_bwd_scratch(u, p, &r->l2);
    clora_bwd_scratch(u, p, &r->lt);
    clora_bwd_scratch(u, p, &r->l1);
    arena_release(p, m);
}

static void attn_keep(unet_t *u, arena_plan *p, attn_t *a, size_t x, size_t src, int Tq, int Tk) {
    size_t C = (size_t)a->heads * a->dh, nq = (size_t)u->B * Tq * C, nk = (size_t)u->B * Tk * C;
    a->Tq = Tq; a->Tk = Tk;
    a->qb = arena_take(p, nq);
    a->kb = arena_take(p, nk);
    a->vb = arena_take(p, nk);
    a->ob = arena_take(p, nq);
    lin_keep(u, p, &a->q, x, u->B * Tq);
    lin_keep(u, p, &a->k, src, u->B * Tk);
    lin_keep(u, p, &a->v, src, u->B * Tk);
    lin_keep(u, p, &a->o, a->ob, u->B * Tq);
}

static void attn_fwd_scratch(arena_plan *p, attn_t *a) {
    lin_fwd_scratch(p, &a->q);
    lin_fwd_scratch(p, &a->k);
    lin_fwd_scratch(p, &a->v);
    lin_fwd_scratch(p, &a->o);
}

static void attn_bwd_scratch(unet_t *u, arena_plan *p, attn_t *a) {
    size_t C = (size_t)a->heads * a->dh, nq = (size_t)u->B * a->Tq * C, nk = (size_t)u->B * a->Tk * C;
    size_t m = arena_mark(p);
    a->dob = arena_take(p, nq);
    a->dq = arena_take(p, nq);
    a->dk = arena_take(p, nk);
    a->dv = arena_take(p, nk);
    lin_bwd_scratch(p, &a->o);
    lin_bwd_scratch(p, &a->q);
    lin_bwd_scratch(p, &a->k);
    lin_bwd_scratch(p, &a->v);
    arena_release(p, m);
}

static void tblock_keep(unet_t *u, arena_plan *p, tblock_t *tb, size_t x, int T) {
    size_t N = (size_t)u->B * T, nd = N * tb->dim;
    tb->x = x; tb->T = T;
    tb->out = arena_take(p, nd);
    tb->n1 = arena_take(p, nd); tb->m1 = arena_take(p, N); tb->r1 = arena_take(p, N);
    attn_keep(u, p, &tb->attn1, tb->n1, tb->n1, T, T);
    tb->h1 = arena_take(p, nd);
    tb->n2 = arena_take(p, nd); tb->m2 = arena_take(p, N); tb->r2 = arena_take(p, N);
    attn_keep(u, p, &tb->attn2, tb->n2, u->net->ctx, T, u->Tc);
    tb->h2 = arena_take(p, nd);
    tb->n3 = arena_take(p, nd); tb->m3 = arena_take(p, N); tb->r3 = arena_take(p, N);
    tb->f1 = arena_take(p, N * 8 * tb->dim);   /* [value | gate], 4 dim each */
    tb->g = arena_take(p, N * 4 * tb->dim);
    lin_keep(u, p, &tb->ff1, tb->n3, (int)N);
    lin_keep(u, p, &tb->ff2, tb->g, (int)N);
}

static void tblock_fwd_scratch(unet_t *u, arena_plan *p, tblock_t *tb) {
    size_t m = arena_mark(p);
    tb->branch = arena_take(p, (size_t)u->B * tb->T * tb->dim);
    attn_fwd_scratch(p, &tb->attn1);
    attn_fwd_scratch(p, &tb->attn2);
    lin_fwd_scratch(p, &tb->ff1);
    lin_fwd_scratch(p, &tb->ff2);
    arena_release(p, m);
}

static void tblock_bwd_scratch(unet_t *u, arena_plan *p, tblock_t *tb) {
    size_t N = (size_t)u->B * tb->T, m = arena_mark(p);
    tb->dg = arena_take(p, N * 4 * tb->dim);
    tb->df1 = arena_take(p, N * 8 * tb->dim);
    tb->dn = arena_take(p, N * tb->dim);
    lin_bwd_scratch(p, &tb->ff2);
    lin_bwd_scratch(p, &tb->ff1);
    attn_bwd_scratch(u, p, &tb->attn2);
    attn_bwd_scratch(u, p, &tb->attn1);
    arena_release(p, m);
}

static void xformer_keep(unet_t *u, arena_plan *p, xformer_t *xf) {
    int HW = xf->H * xf->W;
    size_t n = (size_t)u->B * xf->C * HW;
    xf->mean = arena_take(p, (size_t)u->B * u->cfg.groups);
    xf->rstd = arena_take(p, (size_t)u->B * u->cfg.groups);
    xf->gnT = arena_take(p, n);
    xf->t0 = arena_take(p, n);
    lin_keep(u, p, &xf->proj_in, xf->gnT, u->B * HW);
    size_t h = xf->t0;
    for (int k = 0; k < xf->nblocks; k++) {
        tblock_keep(u, p, &xf->blocks[k], h, HW);
        h = xf->blocks[k].out;
    }
    lin_keep(u, p, &xf->proj_out, h, u->B * HW);
}

static void xformer_fwd_scratch(unet_t *u, arena_plan *p, xformer_t *xf) {
    size_t m = arena_mark(p);
    xf->gn = arena_take(p, (size_t)u->B * xf->C * xf->H * xf->W);
    lin_fwd_scratch(p, &xf->proj_in);
    for (int k = 0; k < xf->nblocks; k++) tblock_fwd_scratch(u, p, &xf->blocks[k]);
    lin_fwd_scratch(p, &xf->proj_out);
    arena_release(p, m);
}

static void xformer_bwd_scratch(unet_t *u, arena_plan *p, xformer_t *xf) {
    size_t n = (size_t)u->B * xf->C * xf->H * xf->W, m = arena_mark(p);
    xf->dp = arena_take(p, n);
    xf->dt = arena_take(p, n);
    xf->dg = arena_take(p, n);
    lin_bwd_scratch(p, &xf->proj_out);
    for (int k = xf->nblocks - 1; k >= 0; k--) tblock_bwd_scratch(u, p, &xf->blocks[k]);
    lin_bwd_scratch(p, &xf->proj_in);
    arena_release(p, m);
}

/* The forward walk's part of a resnet or transformer whose output is placed:
 * training keeps its inner tensors; inference gives them back once it is
 * done; checkpointing plans them with backward, which runs it again. */
static void resnet_plan_inner(unet_t *u, arena_plan *p, resnet_t *r) {
    if (u->checkpoint) return;
    size_t m = arena_mark(p);
    resnet_keep(u, p, r);
    resnet_fwd_scratch(u, p, r);
    if (!u->train) arena_release(p, m);
}

static void xformer_plan_inner(unet_t *u, arena_plan *p, xformer_t *xf) {
    if (u->checkpoint) return;
    size_t m = arena_mark(p);
    xformer_keep(u, p, xf);
    xformer_fwd_scratch(u, p, xf);
    if (!u->train) arena_release(p, m);
}

static size_t resnet_plan_forward(unet_t *u, arena_plan *p, resnet_t *r, size_t x, int H, int W) {
    r->x = x; r->H = H; r->W = W;
    r->out = arena_take(p, (size_t)u->B * r->cout * H * W);
    resnet_plan_inner(u, p, r);
    return r->out;
}

static size_t xformer_plan_forward(unet_t *u, arena_plan *p, xformer_t *xf, size_t x, int H, int W) {
    xf->x = x; xf->H = H; xf->W = W;
    xf->out = arena_take(p, (size_t)u->B * xf->C * H * W);
    xformer_plan_inner(u, p, xf);
    return xf->out;
}

/* The backward walk's part: its scratch, and with checkpointing first its
 * inner tensors again (forward, free then, uses the same place). */
static void resnet_plan_backward(unet_t *u, arena_plan *p, resnet_t *r) {
    size_t m = arena_mark(p);
    if (u->checkpoint) {
        resnet_keep(u, p, r);
        resnet_fwd_scratch(u, p, r);
    }
    resnet_bwd_scratch(u, p, r);
    arena_release(p, m);
}

static void xformer_plan_backward(unet_t *u, arena_plan *p, xformer_t *xf) {
    size_t m = arena_mark(p);
    if (u->checkpoint) {
        xformer_keep(u, p, xf);
        xformer_fwd_scratch(u, p, xf);
    }
    xformer_bwd_scratch(u, p, xf);
    arena_release(p, m);
}

static void note_size(struct unet_net *net, size_t n) { if (n > net->maxact) net->maxact = n; }

/* Every offset, for batch B, latents H x W, context length Tc, in the mode
 * u->train / u->checkpoint set. Returns the plan; its peak is the arena's
 * size. The layout holds offsets, not pointers, so a second backend (CUDA)
 * can allocate the same peak once on its device and use the same offsets. */
static arena_plan unet_layout(unet_t *u, int B, int H, int W, int Tc) {
    const unet_config *c = &u->cfg;
    struct unet_net *net = u->net;
    int n = c->nlevels, C0 = c->block_out[0], T = 4 * C0;
    int keep_time = u->train && u->grads;
    arena_plan plan = {0}, *p = &plan;
    size_t m;
    u->B = B; u->H = H; u->W = W; u->Tc = Tc;
    net->maxact = 0;

    /* ---- forward ---- */
    /* the context is read again by backward (to_k / to_v adapters): a copy */
    net->ctx = arena_take(p, (size_t)B * Tc * c->cross_dim);
    /* the time MLP; full grads keep the sinusoid and both linears' outputs */
    net->temb = arena_take(p, (size_t)B * T);
    if (keep_time) {
        net->tsin = arena_take(p, (size_t)B * C0);
        net->t1o = arena_take(p, (size_t)B * T);
        net->t2o = arena_take(p, (size_t)B * T);
        m = arena_mark(p);
        net->t1s = arena_take(p, (size_t)B * T);
        arena_release(p, m);
    } else {
        m = arena_mark(p);
        net->tsin = arena_take(p, (size_t)B * C0);
        net->t1o = arena_take(p, (size_t)B * T);
        net->t1s = net->t1o;          /* SiLU in place */
        net->t2o = net->temb;         /* SiLU in place */
        arena_release(p, m);
    }
    /* conv_in (full grads keep its input for dW) */
    net->xin = keep_time ? arena_take(p, (size_t)B * c->in_channels * H * W) : NONE;
    size_t h = net->skips[0] = arena_take(p, (size_t)B * C0 * H * W);
    note_size(net, (size_t)B * C0 * H * W);

    /* down */
    int hh = H, ww = W;
    for (int i = 0; i < n; i++) {
        block_t *blk = &net->down[i];
        int C = c->block_out[i];
        for (int j = 0; j < blk->nres; j++) {
            h = resnet_plan_forward(u, p, &blk->res[j], h, hh, ww);
            note_size(net, (size_t)B * C * hh * ww);
            if (blk->att) h = xformer_plan_forward(u, p, &blk->att[j], h, hh, ww);
            net->skips[blk->skip[j]] = h;
        }
        if (blk->conv_w) {
            blk->sampler_in = h;
            blk->sampler_out = arena_take(p, (size_t)B * C * (hh / 2) * (ww / 2));
            clora_keep(u, p, &blk->ls, hh, ww);
            clora_fwd_scratch(u, p, &blk->ls);
            hh /= 2; ww /= 2;
            h = net->skips[blk->ds_skip] = blk->sampler_out;
        }
    }

    /* mid */
    h = resnet_plan_forward(u, p, &net->mid_res[0], h, hh, ww);
    h = xformer_plan_forward(u, p, &net->mid_att, h, hh, ww);
    h = resnet_plan_forward(u, p, &net->mid_res[1], h, hh, ww);

    /* up */
    for (int i = 0; i < n; i++) {
        block_t *blk = &net->up[i];
        int C = c->block_out[n - 1 - i];
        for (int j = 0; j < blk->nres; j++) {
            resnet_t *r = &blk->res[j];
            size_t ncat = (size_t)B * r->cin * hh * ww;
            note_size(net, ncat);
            r->H = hh; r->W = ww;
            if (u->train) {
                /* backward reads cat(h, skip): kept */
                r->x = arena_take(p, ncat);
                r->out = arena_take(p, (size_t)B * C * hh * ww);
                resnet_plan_inner(u, p, r);
            } else {
                /* needed only while the resnet runs: above its output */
                r->out = arena_take(p, (size_t)B * C * hh * ww);
                m = arena_mark(p);
                r->x = arena_take(p, ncat);
                resnet_plan_inner(u, p, r);
                arena_release(p, m);
            }
            h = r->out;
            if (blk->att) h = xformer_plan_forward(u, p, &blk->att[j], h, hh, ww);
        }
        if (blk->conv_w) {
            blk->sampler_in = h;
            blk->sampler_out = arena_take(p, (size_t)B * C * 4 * hh * ww);
            clora_keep(u, p, &blk->ls, 2 * hh, 2 * ww);
            m = arena_mark(p);
            blk->up2x = arena_take(p, (size_t)B * C * 4 * hh * ww);
            clora_fwd_scratch(u, p, &blk->ls);
            arena_release(p, m);
            hh *= 2; ww *= 2;
            h = blk->sampler_out;
            note_size(net, (size_t)B * C * hh * ww);
        }
    }

    /* out */
    size_t nout = (size_t)B * C0 * H * W;
    net->h_last = h;
    net->mean_out = arena_take(p, (size_t)B * c->groups);
    net->rstd_out = arena_take(p, (size_t)B * c->groups);
    net->n_out = arena_take(p, nout);
    m = arena_mark(p);
    net->out_silu = arena_take(p, nout);
    arena_release(p, m);

    for (int k = 0; k < net->nskips; k++) {
        int l = net->skip_lvl[k];
        net->skipn[k] = (size_t)B * net->skip_C[k] * (H >> l) * (W >> l);
    }
    if (!u->train) return plan;

    /* ---- backward, on top of what forward kept ---- */
    net->dtemb = u->grads ? arena_take(p, (size_t)B * T) : NONE;
    for (int k = 0; k < net->nskips; k++) net->dskips[k] = arena_take(p, net->skipn[k]);
    net->dcur = arena_take(p, net->maxact);
    net->doth = arena_take(p, net->maxact);
    m = arena_mark(p);
    net->dout_silu = arena_take(p, nout);
    arena_release(p, m);

    /* up, in reverse */
    for (int i = n - 1; i >= 0; i--) {
        block_t *blk = &net->up[i];
        int l = n - 1 - i;
        size_t HW = (size_t)(H >> l) * (W >> l);
        if (blk->conv_w) {
            m = arena_mark(p);
            blk->dup2x = arena_take(p, (size_t)B * c->block_out[l] * 4 * HW);
            clora_bwd_scratch(u, p, &blk->ls);
            arena_release(p, m);
        }
        for (int j = blk->nres - 1; j >= 0; j--) {
            if (blk->att) xformer_plan_backward(u, p, &blk->att[j]);
            m = arena_mark(p);
            blk->dcat[j] = arena_take(p, (size_t)B * blk->res[j].cin * HW);
            resnet_plan_backward(u, p, &blk->res[j]);
            arena_release(p, m);
        }
    }

    /* mid */
    resnet_plan_backward(u, p, &net->mid_res[1]);
    xformer_plan_backward(u, p, &net->mid_att);
    resnet_plan_backward(u, p, &net->mid_res[0]);

    /* down, in reverse */
    for (int i = n - 1; i >= 0; i--) {
        block_t *blk = &net->down[i];
        if (blk->conv_w) clora_bwd_scratch(u, p, &blk->ls);
        for (int j = blk->nres - 1; j >= 0; j--) {
            if (blk->att) xformer_plan_backward(u, p, &blk->att[j]);
            resnet_plan_backward(u, p, &blk->res[j]);
        }
    }

    /* full grads: the time MLP */
    if (u->grads) {
        net->dt2o = arena_take(p, (size_t)B * T);
        net->t1s_bwd = arena_take(p, (size_t)B * T);
        net->dt1s = arena_take(p, (size_t)B * T);
        net->dt1o = arena_take(p, (size_t)B * T);
    }
    return plan;
}

/* ------------------------------------------------------------------------ */
/* the whole network                                                        */

static void run_forward(unet_t *u, float *eps_out, const float *x, const float *t, const float *ctx) {
    const unet_config *c = &u->cfg;
    struct unet_net *net = u->net;
    int B = u->B, H = u->H, W = u->W, n = c->nlevels, C0 = c->block_out[0], T = 4 * C0;
    u->have_forward = 0;

    OPS->copy(at(u, net->ctx), ctx, (size_t)B * u->Tc * c->cross_dim);

    /* time: temb = linear_2(silu(linear_1(sinusoid(t)))); the resnets all use silu(temb) */
    float *tsin = at(u, net->tsin), *t1o = at(u, net->t1o), *t1s = at(u, net->t1s), *t2o = at(u, net->t2o);
    OPS->timestep_embedding(tsin, t, B, C0, c->flip_sin_to_cos, c->freq_shift, 10000.0f);
    OPS->linear_forward(t1o, tsin, weight_f32(u, net->t1_w), PV(u, net->t1_b), B, C0, T);
    OPS->silu_forward(t1s, t1o, (size_t)B * T);
    OPS->linear_forward(t2o, t1s, weight_f32(u, net->t2_w), PV(u, net->t2_b), B, T, T);
    OPS->silu_forward(at(u, net->temb), t2o, (size_t)B * T);

    /* conv_in */
    if (net->xin != NONE) OPS->copy(at(u, net->xin), x, (size_t)B * c->in_channels * H * W);
    OPS->conv2d_forward(at(u, net->skips[0]), x, weight_f32(u, net->conv_in_w), PV(u, net->conv_in_b),
                   B, c->in_channels, H, W, C0, 3, 3, 1, 1);

    /* down */
    for (int i = 0; i < n; i++) {
        block_t *blk = &net->down[i];
        int C = c->block_out[i];
        for (int j = 0; j < blk->nres; j++) {
            resnet_forward(u, &blk->res[j]);
            if (blk->att) xformer_forward(u, &blk->att[j]);
        }
        /* Downsample2D: 3x3 conv, stride 2, padding 1 */
        if (blk->conv_w)
        {
            OPS->conv2d_forward(at(u, blk->sampler_out), at(u, blk->sampler_in), weight_f32(u, blk->conv_w),
                                PV(u, blk->conv_b), B, C, H >> i, W >> i, C, 3, 3, 2, 1);
            clora_forward(u, &blk->ls, at(u, blk->sampler_out), at(u, blk->sampler_in));
        }
    }

    /* mid */
    resnet_forward(u, &net->mid_res[0]);
    xformer_forward(u, &net->mid_att);
    resnet_forward(u, &net->mid_res[1]);

    /* up: each resnet takes cat(h, skip) along channels */
    const float *h = at(u, net->mid_res[1].out);
    for (int i = 0; i < n; i++) {
        block_t *blk = &net->up[i];
        int l = n - 1 - i, C = c->block_out[l], hh = H >> l, ww = W >> l, HW = hh * ww;
        for (int j = 0; j < blk->nres; j++) {
            resnet_t *r = &blk->res[j];
            int k = blk->skip[j], cs = net->skip_C[k], ch = r->cin - cs;
            const float *s = at(u, net->skips[k]);
            float *cat = at(u, r->x);
            for (int b = 0; b < B; b++) {
                float *cb = cat + (size_t)b * r->cin * HW;
                OPS->copy(cb, h + (size_t)b * ch * HW, (size_t)ch * HW);
                OPS->copy(cb + (size_t)ch * HW, s + (size_t)b * cs * HW, (size_t)cs * HW);
            }
            resnet_forward(u, r);
            h = at(u, r->out);
            if (blk->att) {
                xformer_forward(u, &blk->att[j]);
                h = at(u, blk->att[j].out);
            }
        }
        if (blk->conv_w) {
            /* Upsample2D: nearest 2x, then 3x3 conv */
            float *up = at(u, blk->up2x);
            OPS->upsample2x_forward(up, h, B, C, hh, ww);
            OPS->conv2d_forward(at(u, blk->sampler_out), up, weight_f32(u, blk->conv_w), PV(u, blk->conv_b),
                           B, C, 2 * hh, 2 * ww, C, 3, 3, 1, 1);
            clora_forward(u, &blk->ls, at(u, blk->sampler_out), up);
            h = at(u, blk->sampler_out);
        }
    }

    /* out: eps = conv_out(silu(conv_norm_out(h))) */
    size_t nout = (size_t)B * C0 * H * W;
    float *n_out = at(u, net->n_out), *silu_out = at(u, net->out_silu);
    OPS->groupnorm_forward(n_out, at(u, net->mean_out), at(u, net->rstd_out), h, PV(u, net->norm_out_w), PV(u, net->norm_out_b),
                      B, C0, H * W, c->groups, c->eps);
    OPS->silu_forward(silu_out, n_out, nout);
    OPS->conv2d_forward(eps_out, silu_out, weight_f32(u, net->conv_out_w), PV(u, net->conv_out_b), B, C0, H, W, c->out_channels,
                   3, 3, 1, 1);
    u->have_forward = u->train;
}

/* Backward of one resnet / transformer. With checkpointing its inner
 * activations were not kept: run its forward again first (same input, same
 * dropout stream, so the same numbers, its output rewritten unchanged). */
static void resnet_bwd(unet_t *u, resnet_t *r, float *dx, const float *dout) {
    if (u->checkpoint) {
        rng_t cont = u->dropout_rng;
        u->dropout_rng = r->rng;
        resnet_forward(u, r);
        u->dropout_rng = cont;
    }
    resnet_backward(u, r, dx, dout);
}

static void xformer_bwd(unet_t *u, xformer_t *xf, float *dh) {
    if (u->checkpoint) {
        rng_t cont = u->dropout_rng;
        u->dropout_rng = xf->rng;
        xformer_forward(u, xf);
        u->dropout_rng = cont;
    }
    xformer_backward(u, xf, dh);
}

static int xformer_has_lora(const xformer_t *xf) {
    if (xf->proj_in.L || xf->proj_out.L) return 1;
    for (int k = 0; k < xf->nblocks; k++) {
        const tblock_t *tb = &xf->blocks[k];
        const attn_t *a[2] = {&tb->attn1, &tb->attn2};
        if (tb->ff1.L || tb->ff2.L) return 1;
        for (int m = 0; m < 2; m++)
            if (a[m]->q.L || a[m]->k.L || a[m]->v.L || a[m]->o.L) return 1;
    }
    return 0;
}

static void run_backward(unet_t *u, const float *deps, float *dx, float *dctx) {
    const unet_config *c = &u->cfg;
    struct unet_net *net = u->net;
    int B = u->B, H = u->H, W = u->W, n = c->nlevels, C0 = c->block_out[0], G = c->groups;
    net->dctx = dctx;
    if (dctx) OPS->zero(dctx, (size_t)B * u->Tc * c->cross_dim);
    /* full grads: every resnet adds its d silu(temb) here */
    if (u->grads) OPS->zero(at(u, net->dtemb), (size_t)B * 4 * C0);
    /* the gradient of every skip: filled on the way up, drained on the way down */
    for (int k = 0; k < net->nskips; k++) OPS->zero(at(u, net->dskips[k]), net->skipn[k]);
    /* the running gradient and a second buffer to swap with */
    float *cur = at(u, net->dcur), *oth = at(u, net->doth), *sw;
#define SWAP() (sw = cur, cur = oth, oth = sw)

    /* out */
    size_t nout = (size_t)B * C0 * H * W;
    float *da = at(u, net->dout_silu), *n_out = at(u, net->n_out);
    OPS->zero(da, nout);
    /* conv_out's input silu(n_out), recomputed for its dW (else da stands in, unread) */
    if (u->grads) OPS->silu_forward(oth, n_out, nout);
    OPS->conv2d_backward(da, grad_of_matrix(u, net->conv_out_w), grad_of(u, net->conv_out_b), deps,
                    u->grads ? oth : da, weight_f32(u, net->conv_out_w), B, C0, H, W, c->out_channels, 3, 3, 1, 1);
    OPS->zero(oth, nout);
    OPS->silu_backward(oth, da, n_out, nout);
    OPS->zero(cur, nout);
    OPS->groupnorm_backward(cur, grad_of(u, net->norm_out_w), grad_of(u, net->norm_out_b), oth, at(u, net->h_last),
                       PV(u, net->norm_out_w), at(u, net->mean_out), at(u, net->rstd_out), B, C0, H * W, G);

    /* up, in reverse */
    for (int i = n - 1; i >= 0; i--) {
        block_t *blk = &net->up[i];
        int l = n - 1 - i, C = c->block_out[l], hh = H >> l, ww = W >> l, HW = hh * ww;
        if (blk->conv_w) {
            float *dup = at(u, blk->dup2x);
            OPS->zero(dup, (size_t)B * C * 4 * HW);
            /* the conv's input, upsample(h), recomputed for its dW */
            if (u->grads || blk->ls.L) OPS->upsample2x_forward(oth, at(u, blk->sampler_in), B, C, hh, ww);
            OPS->conv2d_backward(dup, grad_of_matrix(u, blk->conv_w), grad_of(u, blk->conv_b), cur, u->grads ? oth : dup,
                                 weight_f32(u, blk->conv_w), B, C, 2 * hh, 2 * ww, C, 3, 3, 1, 1);
            clora_backward(u, &blk->ls, dup, cur, oth);
            OPS->zero(oth, (size_t)B * C * HW);
            OPS->upsample2x_backward(oth, dup, B, C, hh, ww);
            SWAP();
        }
        for (int j = blk->nres - 1; j >= 0; j--) {
            if (blk->att) xformer_bwd(u, &blk->att[j], cur);
            resnet_t *r = &blk->res[j];
            int k = blk->skip[j], cs = net->skip_C[k], ch = r->cin - cs;
            float *dcat = at(u, blk->dcat[j]), *dskip = at(u, net->dskips[k]);
            OPS->zero(dcat, (size_t)B * r->cin * HW);
            resnet_bwd(u, r, dcat, cur);
            /* split d(cat) into d(h) and d(skip) */
            for (int b = 0; b < B; b++) {
                const float *db = dcat + (size_t)b * r->cin * HW;
                OPS->copy(oth + (size_t)b * ch * HW, db, (size_t)ch * HW);
                OPS->accumulate(dskip + (size_t)b * cs * HW, db + (size_t)ch * HW, (size_t)cs * HW);
            }
            SWAP();
        }
    }

    /* mid */
    size_t nm = (size_t)B * c->block_out[n - 1] * (H >> (n - 1)) * (W >> (n - 1));
    OPS->zero(oth, nm);
    resnet_bwd(u, &net->mid_res[1], oth, cur);
    SWAP();
    xformer_bwd(u, &net->mid_att, cur);
    OPS->zero(oth, nm);
    resnet_bwd(u, &net->mid_res[0], oth, cur);
    SWAP();

    /* down, in reverse: each saved output gets its skip's gradient added.
     * Without dx, nothing below the first transformer that holds an adapter
     * (or, for dctx, the first transformer at all) needs a gradient: stop
     * there and save the resnet and conv_in backward beneath it. Full grads
     * need everything, down to conv_in and the time MLP. */
    /* (conv LoRA: a resnet or downsampler with an adapter also needs its
     * gradient; stop_res says the stop is after a resnet, stop_j == nres
     * after the downsampler, else after the transformer) */
    int stop_i = -1, stop_j = -1, stop_res = 0;
    if (!dx && !u->grads) {
        for (int i = n - 1; i >= 0; i--) {
            block_t *b = &net->down[i];
            if (b->conv_w && b->ls.L) { stop_i = i; stop_j = b->nres; stop_res = 0; }
            for (int j = b->nres - 1; j >= 0; j--) {
                if (b->att && (dctx || xformer_has_lora(&b->att[j]))) {
                    stop_i = i; stop_j = j; stop_res = 0;
                }
                if (resnet_has_lora(&b->res[j])) { stop_i = i; stop_j = j; stop_res = 1; }
            }
        }
    }
    for (int i = n - 1; i >= 0; i--) {
        block_t *blk = &net->down[i];
        int C = c->block_out[i], hh = H >> i, ww = W >> i, HW = hh * ww;
        if (blk->conv_w) {
            OPS->accumulate(cur, at(u, net->dskips[blk->ds_skip]), net->skipn[blk->ds_skip]);
            OPS->zero(oth, (size_t)B * C * HW);
            OPS->conv2d_backward(oth, grad_of_matrix(u, blk->conv_w), grad_of(u, blk->conv_b), cur,
                            u->grads ? at(u, blk->sampler_in) : oth, weight_f32(u, blk->conv_w),
                            B, C, hh, ww, C, 3, 3, 2, 1);
            clora_backward(u, &blk->ls, oth, cur, at(u, blk->sampler_in));
            if (i == stop_i && stop_j == blk->nres) goto done;
            SWAP();
        }
        for (int j = blk->nres - 1; j >= 0; j--) {
            OPS->accumulate(cur, at(u, net->dskips[blk->skip[j]]), net->skipn[blk->skip[j]]);
            if (blk->att) xformer_bwd(u, &blk->att[j], cur);
            if (i == stop_i && j == stop_j && !stop_res) goto done;
            resnet_t *r = &blk->res[j];
            OPS->zero(oth, (size_t)B * r->cin * HW);
            resnet_bwd(u, r, oth, cur);
            if (i == stop_i && j == stop_j && stop_res) goto done;
            SWAP();
        }
    }
    OPS->accumulate(cur, at(u, net->dskips[0]), net->skipn[0]);
done:
    if (dx || u->grads) {
        if (dx) OPS->zero(dx, (size_t)B * c->in_channels * H * W);
        OPS->conv2d_backward(dx, grad_of_matrix(u, net->conv_in_w), grad_of(u, net->conv_in_b), cur,
                        u->grads ? at(u, net->xin) : dx, weight_f32(u, net->conv_in_w),
                        B, c->in_channels, H, W, C0, 3, 3, 1, 1);
    }
    if (u->grads) {
        /* the time MLP, from d silu(temb):
         *   d t2o = silu'(t2o) dtemb;  dW_2 += d t2o^T silu(t1o);  d silu(t1o) = d t2o W_2
         *   d t1o = silu'(t1o) d silu(t1o);  dW_1 += d t1o^T sinusoid */
        int T = 4 * C0;
        size_t nt = (size_t)B * T;
        float *dt2o = at(u, net->dt2o), *t1s = at(u, net->t1s_bwd), *dt1s = at(u, net->dt1s);
        float *dt1o = at(u, net->dt1o);
        OPS->zero(dt2o, nt); OPS->zero(dt1s, nt); OPS->zero(dt1o, nt);
        OPS->silu_forward(t1s, at(u, net->t1o), nt);
        OPS->silu_backward(dt2o, at(u, net->dtemb), at(u, net->t2o), nt);
        OPS->linear_backward(dt1s, grad_of_matrix(u, net->t2_w), grad_of(u, net->t2_b), dt2o, t1s,
                        weight_f32(u, net->t2_w), B, T, T);
        OPS->silu_backward(dt1o, dt1s, at(u, net->t1o), nt);
        OPS->linear_backward(NULL, grad_of_matrix(u, net->t1_w), grad_of(u, net->t1_b), dt1o, at(u, net->tsin),
                        weight_f32(u, net->t1_w), B, C0, T);
    }
#undef SWAP
}

/* ------------------------------------------------------------------------ */
/* on a device (backend.h)                                                  */

/* the device's last error as u->err; -1 when there was one */
static int device_error(unet_t *u) {
    const char *e = OPS->error();
    if (!e) return 0;
    snprintf(u->err, UNET_ERR_LEN, "%s", strncmp(e, "error: ", 7) == 0 ? e + 7 : e);
    return -1;
}

int unet_to_device(unet_t *u, const nn_ops *ops) {
    if (!ops->device) {
        snprintf(u->err, UNET_ERR_LEN, "unet: %s is not a device table", ops->name);
        return -1;
    }
    if (u->ops && u->ops->device) {
        snprintf(u->err, UNET_ERR_LEN, "unet: already on %s", u->ops->name);
        return -1;
    }
    if (u->grads) {
        snprintf(u->err, UNET_ERR_LEN, "unet: full fine-tuning does not run on %s yet "
                 "(train a LoRA there, or use --device cpu)", ops->name);
        return -1;
    }
    drop_acts(u);               /* a host arena, if any: the device gets its own */
    /* as on the host: fp32, or the vectors in fp32 and the matrices in fp16
     * with a buffer for the largest widened */
    int f16 = u->wdtype == WEIGHT_F16;
    size_t nvec = f16 ? u->nparams - u->nmat : u->nparams, big = 1;
    for (int i = 0; f16 && i < u->ntable; i++)
        if (u->table[i].data16 && u->table[i].numel > big) big = u->table[i].numel;
    float *d = ops->alloc(sizeof(float) * (nvec ? nvec : 1));
    uint16_t *d16 = f16 ? ops->alloc(sizeof(uint16_t) * (u->nmat ? u->nmat : 1)) : NULL;
    float *wb = f16 ? ops->alloc(sizeof(float) * big) : NULL;
    if (!d || (f16 && (!d16 || !wb)) || !ops->upload(d, u->params, sizeof(float) * nvec) ||
        (f16 && !ops->upload(d16, u->params16, sizeof(uint16_t) * u->nmat))) {
        const char *e = ops->error();
        if (e && strncmp(e, "error: ", 7) == 0) e += 7;
        snprintf(u->err, UNET_ERR_LEN, "unet: cannot copy %.1f MiB of weights to %s: %s",
                 (double)(nvec * 4 + (f16 ? u->nmat * 2 + big * 4 : 0)) / 1048576.0, ops->name,
                 e ? e : "out of memory");
        if (d) ops->free(d);
        if (d16) ops->free(d16);
        if (wb) ops->free(wb);
        return -1;
    }
    u->ops = ops;
    u->dparams = d;
    u->dparams16 = d16;
    u->dwbuf = wb;
    u->dwbuf_of = NULL;
    return 0;
}

int unet_lora_upload(unet_t *u) {
    if (!u->dparams || !u->lora_nparams) return 0;
    if (u->dlora_n != u->lora_nparams) {        /* adapters added or stacked since */
        u->ops->free(u->dlora_params); u->ops->free(u->dlora_grads);
        u->dlora_n = 0;
        u->dlora_params = u->ops->alloc(sizeof(float) * u->lora_nparams);
        u->dlora_grads = u->ops->alloc(sizeof(float) * u->lora_nparams);
        if (!u->dlora_params || !u->dlora_grads) {
            u->ops->free(u->dlora_params); u->ops->free(u->dlora_grads);
            u->dlora_params = u->dlora_grads = NULL;
            device_error(u);
            snprintf(u->err, UNET_ERR_LEN, "unet: out of %s memory for %zu LoRA parameters", u->ops->name,
                     u->lora_nparams);
            return -1;
        }
        u->dlora_n = u->lora_nparams;
        if (!u->ops->upload(u->dlora_grads, u->lora_grads, sizeof(float) * u->lora_nparams)) return device_error(u);
    }
    if (!u->ops->upload(u->dlora_params, u->lora_params, sizeof(float) * u->lora_nparams)) return device_error(u);
    return 0;
}

int unet_lora_grads_download(unet_t *u) {
    if (!u->dlora_grads) return 0;
    if (!u->ops->download(u->lora_grads, u->dlora_grads, sizeof(float) * u->lora_nparams)) return device_error(u);
    return device_error(u);
}

/* the staging buffers of unet_forward / unet_backward, for this shape:
 * x and dx, t, ctx and dctx, eps and deps, one after another */
typedef struct { float *x, *t, *ctx, *eps, *deps, *dx, *dctx; } unet_io;

static int io_for(unet_t *u, int B, int h, int w, int Tc, unet_io *io) {
    const unet_config *c = &u->cfg;
    size_t nx = (size_t)B * c->in_channels * h * w, nc = (size_t)B * Tc * c->cross_dim;
    size_t ne = (size_t)B * c->out_channels * h * w, nt = (size_t)B;
    size_t need = 2 * nx + nt + 2 * nc + 2 * ne;
    if (need > u->dio_n) {
        u->ops->free(u->dio);
        u->dio_n = 0;
        u->dio = u->ops->alloc(sizeof(float) * need);
        if (!u->dio) {
            device_error(u);
            snprintf(u->err, UNET_ERR_LEN, "unet: out of %s memory for the inputs and outputs", u->ops->name);
            return -1;
        }
        u->dio_n = need;
    }
    io->x = u->dio; io->dx = io->x + nx; io->t = io->dx + nx; io->ctx = io->t + nt;
    io->dctx = io->ctx + nc; io->eps = io->dctx + nc; io->deps = io->eps + ne;
    return 0;
}

int unet_device_io(unet_t *u, float **eps, float **deps) {
    unet_io io;
    if (!u->dparams || !u->acts.base) {
        snprintf(u->err, UNET_ERR_LEN, "unet: unet_device_io: not on a device with activations allocated");
        return -1;
    }
    if (io_for(u, u->B, u->H, u->W, u->Tc, &io)) return -1;
    *eps = io.eps;
    *deps = io.deps;
    return 0;
}

static int check_shape(unet_t *u, int B, int h, int w, int Tc) {
    int f = 1 << (u->cfg.nlevels - 1);
    if (B < 1 || Tc < 1 || h < f || w < f || h % f || w % f) {
        snprintf(u->err, UNET_ERR_LEN, "unet: shape B=%d h=%d w=%d Tc=%d: need B, Tc >= 1 and h, w "
                 "multiples of %d (image sides multiples of %d)", B, h, w, Tc, f, 8 * f);
        return -1;
    }
    return 0;
}

int unet_alloc_acts(unet_t *u, int B, int h, int w, int Tc, int train) {
    if (check_shape(u, B, h, w, Tc)) return -1;
    drop_acts(u);
    u->train = train != 0;
    u->checkpoint = train == 2;
    arena_plan p = unet_layout(u, B, h, w, Tc);
    if (u->dparams) {
        /* on a device: the same floats there, and the adapters' current A, B */
        u->acts.base = u->ops->alloc(sizeof(float) * (p.peak ? p.peak : 1));
        u->acts.nfloats = u->acts.base ? p.peak : 0;
        unet_io io;
        if (!u->acts.base) {
            device_error(u);
            snprintf(u->err, UNET_ERR_LEN, "unet: out of %s memory for %.1f MiB of activations "
                     "(use a smaller batch or resolution, or --grad-checkpoint)", u->ops->name,
                     (double)p.peak * 4 / 1048576.0);
            return -1;
        }
        return io_for(u, B, h, w, Tc, &io) || unet_lora_upload(u) ? -1 : 0;
    }
    if (arena_alloc(&u->acts, &p)) {
        snprintf(u->err, UNET_ERR_LEN, "unet: out of memory for %.1f MiB of activations "
                 "(use a smaller batch or resolution)", (double)p.peak * 4 / 1048576.0);
        return -1;
    }
    return 0;
}

size_t unet_acts_floats(const unet_t *u) { return u->acts.nfloats; }

int unet_forward(unet_t *u, float *eps_out, const float *x, const float *t, const float *ctx,
                 int B, int h, int w, int Tc) {
    if (!u->acts.base) {
        snprintf(u->err, UNET_ERR_LEN, "unet: no activation memory (call unet_alloc_acts first, "
                 "and again after unet_add_lora or unet_alloc_grads)");
        return -1;
    }
    if (check_shape(u, B, h, w, Tc)) return -1;
    if (B != u->B || h != u->H || w != u->W || Tc != u->Tc) {
        /* another shape: fine if its layout fits what was allocated */
        int oB = u->B, oH = u->H, oW = u->W, oT = u->Tc;
        u->have_forward = 0;
        if (unet_layout(u, B, h, w, Tc).peak > u->acts.nfloats) {
            unet_layout(u, oB, oH, oW, oT);
            snprintf(u->err, UNET_ERR_LEN, "unet: shape B=%d h=%d w=%d Tc=%d needs more activation "
                     "memory than was allocated (call unet_alloc_acts with it)", B, h, w, Tc);
            return -1;
        }
    }
    if (u->dparams) {
        /* on a device: inputs up, eps down */
        const unet_config *c = &u->cfg;
        unet_io io;
        if (io_for(u, B, h, w, Tc, &io)) return -1;
        if (!OPS->upload(io.x, x, sizeof(float) * B * c->in_channels * h * w) ||
            !OPS->upload(io.t, t, sizeof(float) * B) ||
            (!u->ctx_on_device && !OPS->upload(io.ctx, ctx, sizeof(float) * B * Tc * c->cross_dim))) return device_error(u);
        run_forward(u, io.eps, io.x, io.t, u->ctx_on_device ? ctx : io.ctx);
        /* eps_out NULL: eps stays on the device (unet_device_io), for a loss there */
        if (eps_out && !OPS->download(eps_out, io.eps, sizeof(float) * B * c->out_channels * h * w)) return device_error(u);
        if (device_error(u)) { u->have_forward = 0; return -1; }
        return 0;
    }
    if (!eps_out) { snprintf(u->err, UNET_ERR_LEN, "unet: eps_out NULL is for a model on a device"); return -1; }
    run_forward(u, eps_out, x, t, ctx);
    return 0;
}

int unet_backward(unet_t *u, const float *deps, float *dx, float *dctx) {
    if (!u->train || !u->have_forward) {
        snprintf(u->err, UNET_ERR_LEN, "unet: backward needs a forward just before it, with "
                 "activations allocated for training (unet_alloc_acts(..., train = 1))");
        return -1;
    }
    if (u->dparams) {
        /* on a device: deps up, dx and dctx down */
        const unet_config *c = &u->cfg;
        unet_io io;
        size_t nx = (size_t)u->B * c->in_channels * u->H * u->W, nc = (size_t)u->B * u->Tc * c->cross_dim;
        if (io_for(u, u->B, u->H, u->W, u->Tc, &io)) return -1;
        /* deps NULL: already written on the device (unet_device_io) */
        if (deps && !OPS->upload(io.deps, deps, sizeof(float) * u->B * c->out_channels * u->H * u->W)) return device_error(u);
        float *dc = dctx && !u->ctx_on_device ? io.dctx : dctx;   /* ctx_on_device: dctx in place */
        run_backward(u, io.deps, dx ? io.dx : NULL, dc);
        if ((dx && !OPS->download(dx, io.dx, sizeof(float) * nx)) ||
            (dctx && dc != dctx && !OPS->download(dctx, io.dctx, sizeof(float) * nc))) return device_error(u);
        return device_error(u);
    }
    if (!deps) { snprintf(u->err, UNET_ERR_LEN, "unet: deps NULL is for a model on a device"); return -1; }
    run_backward(u, deps, dx, dctx);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* LoRA adapters from a file, for inference (sd_apply_lora without merging)  */

int unet_lora_site(const unet_t *u, const char *module, int *in, int *out, int *is_conv) {
    const struct unet_net *net = u->net;
    for (int i = 0; net && i < net->nsites; i++)
        if (strcmp(net->sites[i].name, module) == 0) {
            *in = net->sites[i].in;
            *out = net->sites[i].out;
            *is_conv = net->sites[i].is_conv;
            return 1;
        }
    return 0;
}

/* The adapters live in one block [A_0 | B_0 | A_1 | B_1 | ...] (and the
 * gradients in a second of the same layout), so adding one means a new
 * block: copy every adapter over and point the sites at the copies.
 * A second adapter on the same module is stacked onto the first by
 * concatenating ranks, which is exact:
 *     s1 B1 A1 x + s2 B2 A2 x = [s1 B1 | s2 B2] [A1 ; A2] x   (scale 1) */
int unet_attach_lora(unet_t *u, const char *module, int r, float scale,
                     const float *A, const float *B) {
    struct unet_net *net = u->net;
    site_t *site = NULL;
    for (int i = 0; net && i < net->nsites; i++)
        if (strcmp(net->sites[i].name, module) == 0) { site = &net->sites[i]; break; }
    if (!site) {
        snprintf(u->err, UNET_ERR_LEN, "%s: not a module that can carry an adapter (only the transformer "
                 "projections and the resnet / sampler convolutions can)", module);
        return -1;
    }
    if (r < 1) { snprintf(u->err, UNET_ERR_LEN, "%s: LoRA rank %d", module, r); return -1; }
    int in = site->in, out = site->out;
    size_t fan_new = (size_t)in * (site->k ? site->k * site->k : 1);
    int ex = -1;                       /* the adapter already on this module */
    for (int k = 0; k < u->nloras; k++)
        if (strcmp(u->loras[k].name, module) == 0) ex = k;
    if (ex >= 0 && u->loras[ex].L.dA) {
        snprintf(u->err, UNET_ERR_LEN, "%s: already has a trainable adapter (merge the file instead)", module);
        return -1;
    }
    int n = u->nloras + (ex < 0);
    size_t total = u->lora_nparams + (size_t)r * (fan_new + out);
    unet_lora *L2 = calloc((size_t)n, sizeof *L2);
    float *P2 = calloc(total, sizeof(float)), *G2 = calloc(total, sizeof(float));
    if (!L2 || !P2 || !G2) {
        free(L2); free(P2); free(G2);
        snprintf(u->err, UNET_ERR_LEN, "%s: out of memory for the LoRA adapter", module);
        return -1;
    }
    size_t off = 0;
    for (int k = 0; k < n; k++) {
        unet_lora *d = &L2[k];
        if (k < u->nloras) *d = u->loras[k];
        else {                         /* the new one, at the end */
            snprintf(d->name, sizeof d->name, "%s", module);
            d->is_conv = site->is_conv;
            d->L.in = in; d->L.out = out; d->L.r = 0; d->L.k = site->k;
        }
        const lora_t *o = k < u->nloras ? &u->loras[k].L : NULL;
        int ro = o ? o->r : 0, rn = (k == ex || k == u->nloras) ? r : 0;
        int rt = ro + rn, li = (int)lora_fan_in(&d->L), lo = d->L.out;
        float *An = P2 + off, *Bn = An + (size_t)rt * li;
        /* A: the old rows, then the new ones */
        if (ro) memcpy(An, o->A, sizeof(float) * (size_t)ro * li);
        if (rn) memcpy(An + (size_t)ro * li, A, sizeof(float) * (size_t)rn * li);
        /* B (out x rt): each row is [old row | new row]; when stacking, each
         * part carries its own scale and the adapter's becomes 1 */
        float so = rn && ro ? o->scale : 1.0f, sn = rn && ro ? scale : 1.0f;
        for (int row = 0; row < lo; row++) {
            for (int c = 0; c < ro; c++) Bn[(size_t)row * rt + c] = so * o->B[(size_t)row * ro + c];
            for (int c = 0; c < rn; c++) Bn[(size_t)row * rt + ro + c] = sn * B[(size_t)row * rn + c];
        }
        d->L.A = An; d->L.B = Bn; d->L.r = rt;
        if (rn) {
            d->L.scale = ro ? 1.0f : scale;
            d->L.alpha = d->L.scale * (float)rt;
            d->L.dropout = 0.0f;
            d->L.dA = d->L.dB = NULL;  /* frozen: read from a file */
        }
        if (o && o->dA) {              /* a trainable adapter keeps its gradients */
            d->L.dA = G2 + off;
            d->L.dB = d->L.dA + (size_t)rt * li;
            memcpy(d->L.dA, o->dA, sizeof(float) * (size_t)rt * ((size_t)li + lo));
        }
        off += (size_t)rt * ((size_t)li + lo);
    }
    free(u->loras); free(u->lora_params); free(u->lora_grads);
    u->loras = L2; u->lora_params = P2; u->lora_grads = G2;
    u->nloras = n; u->lora_nparams = total;
    /* the sites point at the new copies */
    for (int i = 0; i < net->nsites; i++) *net->sites[i].slot = NULL;
    for (int k = 0; k < n; k++)
        for (int i = 0; i < net->nsites; i++)
            if (strcmp(net->sites[i].name, L2[k].name) == 0) *net->sites[i].slot = &L2[k].L;
    /* the adapters' saved activations change the arena's layout */
    drop_acts(u);
    return 0;
}

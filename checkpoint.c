/* checkpoint.c: SD1.x single-file (LDM) checkpoints: diffusers -> LDM names,
 * architecture from tensor shapes, and clear refusals of everything else.
 * See checkpoint.h for the layouts. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "checkpoint.h"

#define LDM_MAX_BLOCKS 64     /* input_blocks / output_blocks indices we track (SD1.5: 12) */
#define LDM_MAX_CLIP_LAYERS 64

/* ---- small parsing helpers ------------------------------------------------ */

/* s without the prefix pre, or NULL if s does not start with it */
static const char *skip(const char *s, const char *pre) {
    size_t k = strlen(pre);
    return strncmp(s, pre, k) == 0 ? s + k : NULL;
}

/* "<decimal>." at *s: the number, and *s moves past the dot; -1 if absent.
 * No sign, no leading zeros ("01" is not a module index), at most 5 digits. */
static int num(const char **s) {
    const char *p = *s;
    int v = 0, d = 0;
    while (*p >= '0' && *p <= '9') {
        if (++d > 5 || (d == 2 && v == 0)) return -1;
        v = v * 10 + (*p++ - '0');
    }
    if (d == 0 || *p != '.') return -1;
    *s = p + 1;
    return v;
}

static int is_leaf(const char *s) { return s && (strcmp(s, "weight") == 0 || strcmp(s, "bias") == 0); }

/* write into out; -1 when it does not fit */
static int put(char *out, size_t n, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(out, n, fmt, ap);
    va_end(ap);
    return (k < 0 || (size_t)k >= n) ? -1 : 0;
}

/* rest = "<sub>.<leaf>" with sub one of table[i][0]: the LDM sub table[i][1],
 * *leaf set; NULL when rest is none of them */
static const char *map_sub(const char *rest, const char *const (*table)[2], int nt, const char **leaf) {
    for (int i = 0; i < nt; i++) {
        const char *p = skip(rest, table[i][0]);
        if (p && is_leaf(p)) { *leaf = p; return table[i][1]; }
    }
    return NULL;
}

/* ---- UNet names ------------------------------------------------------------ */

/* LDM's ResBlock: in_layers = (GroupNorm, SiLU, conv), emb_layers = (SiLU,
 * linear), out_layers = (GroupNorm, SiLU, dropout, conv): the numbers are
 * positions in those nn.Sequentials */
static const char *const unet_res[][2] = {
    {"norm1.", "in_layers.0"}, {"conv1.", "in_layers.2"}, {"time_emb_proj.", "emb_layers.1"},
    {"norm2.", "out_layers.0"}, {"conv2.", "out_layers.3"}, {"conv_shortcut.", "skip_connection"},
};
#define NRES ((int)(sizeof unet_res / sizeof unet_res[0]))

/* the Transformer2DModel's names are the same in both layouts; check the
 * name is one of its parameters */
static int unet_attn_ok(const char *r) {
    static const char *const top[] = {"norm.", "proj_in.", "proj_out."};
    static const char *const blk[] = {
        "norm1.", "norm2.", "norm3.",
        "attn1.to_q.", "attn1.to_k.", "attn1.to_v.", "attn1.to_out.0.",
        "attn2.to_q.", "attn2.to_k.", "attn2.to_v.", "attn2.to_out.0.",
        "ff.net.0.proj.", "ff.net.2.",
    };
    const char *p;
    for (int i = 0; i < 3; i++)
        if ((p = skip(r, top[i]))) return is_leaf(p);
    if (!(p = skip(r, "transformer_blocks.")) || num(&p) < 0) return 0;
    for (size_t i = 0; i < sizeof blk / sizeof blk[0]; i++) {
        const char *q = skip(p, blk[i]);
        if (q) return is_leaf(q);
    }
    return 0;
}

static int unet_layout_ok(const ldm_unet_layout *l) {
    if (!l || l->nlevels < 1 || l->nlevels > LDM_MAX_LEVELS) return 0;
    for (int b = 0; b < l->nlevels; b++)
        if (l->layers[b] < 1 || l->layers[b] > LDM_MAX_BLOCKS) return 0;
    return 1;
}

/* a ResBlock parameter ("norm1.weight") of LDM block where.idx: in
 * input_blocks / output_blocks the ResBlock is slot 0 of its block
 * ("input_blocks.4.0.in_layers.0.weight"); middle_block is one flat list
 * ("middle_block.2.in_layers.0.weight") */
static int unet_res_name(char *out, size_t n, const char *where, int idx, const char *rest) {
    const char *leaf, *sub = map_sub(rest, unet_res, NRES, &leaf);
    if (!sub) return -1;
    return put(out, n, LDM_UNET_PREFIX "%s.%d%s.%s.%s", where, idx,
               strcmp(where, "middle_block") == 0 ? "" : ".0", sub, leaf);
}

int ldm_unet_name(const char *dn, const ldm_unet_layout *lay, char *out, size_t n) {
    static const char *const fixed[][2] = {
        {"time_embedding.linear_1.", "time_embed.0."}, {"time_embedding.linear_2.", "time_embed.2."},
        {"conv_in.", "input_blocks.0.0."}, {"conv_norm_out.", "out.0."}, {"conv_out.", "out.2."},
    };
    if (!dn || !out || !unet_layout_ok(lay)) return -1;
    const int nl = lay->nlevels;
    const char *p, *q;
    for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++)
        if ((p = skip(dn, fixed[i][0])) && is_leaf(p))
            return put(out, n, LDM_UNET_PREFIX "%s%s", fixed[i][1], p);

    if ((p = skip(dn, "down_blocks."))) {
        int b = num(&p), j;
        if (b < 0 || b >= nl) return -1;
        /* input_blocks: [0] conv_in, then per level: layers[b] blocks and
         * one more for the downsampler if the level has one
         *   idx(b, j) = 1 + sum_{k<b} (layers[k] + downsample[k]) + j */
        int base = 1;
        for (int k = 0; k < b; k++) base += lay->layers[k] + (lay->downsample[k] ? 1 : 0);
        if ((q = skip(p, "resnets."))) {
            if ((j = num(&q)) < 0 || j >= lay->layers[b]) return -1;
            return unet_res_name(out, n, "input_blocks", base + j, q);
        }
        if ((q = skip(p, "attentions."))) {
            if ((j = num(&q)) < 0 || j >= lay->layers[b] || !lay->down_attn[b] || !unet_attn_ok(q)) return -1;
            return put(out, n, LDM_UNET_PREFIX "input_blocks.%d.1.%s", base + j, q);
        }
        if ((q = skip(p, "downsamplers.0.conv.")) && is_leaf(q) && lay->downsample[b])
            return put(out, n, LDM_UNET_PREFIX "input_blocks.%d.0.op.%s", base + lay->layers[b], q);
        return -1;
    }

    if ((p = skip(dn, "mid_block."))) {
        /* middle_block = (ResBlock, SpatialTransformer, ResBlock) */
        int k;
        if ((q = skip(p, "resnets."))) {
            if ((k = num(&q)) < 0 || k > 1) return -1;
            return unet_res_name(out, n, "middle_block", 2 * k, q);
        }
        if ((q = skip(p, "attentions.0.")) && unet_attn_ok(q))
            return put(out, n, LDM_UNET_PREFIX "middle_block.1.%s", q);
        return -1;
    }

    if ((p = skip(dn, "up_blocks."))) {
        int b = num(&p), j;
        if (b < 0 || b >= nl) return -1;
        /* output_blocks: per up level b (deepest first), layers[nl-1-b] + 1 blocks
         *   idx(b, j) = sum_{k<b} (layers[nl-1-k] + 1) + j */
        int base = 0, L = lay->layers[nl - 1 - b] + 1;
        for (int k = 0; k < b; k++) base += lay->layers[nl - 1 - k] + 1;
        if ((q = skip(p, "resnets."))) {
            if ((j = num(&q)) < 0 || j >= L) return -1;
            return unet_res_name(out, n, "output_blocks", base + j, q);
        }
        if ((q = skip(p, "attentions."))) {
            if ((j = num(&q)) < 0 || j >= L || !lay->up_attn[b] || !unet_attn_ok(q)) return -1;
            return put(out, n, LDM_UNET_PREFIX "output_blocks.%d.1.%s", base + j, q);
        }
        /* the upsampler follows the level's last ResBlock (slot 1), or its
         * last ResBlock and SpatialTransformer (slot 2) */
        if ((q = skip(p, "upsamplers.0.conv.")) && is_leaf(q) && lay->upsample[b])
            return put(out, n, LDM_UNET_PREFIX "output_blocks.%d.%d.conv.%s", base + L - 1,
                       lay->up_attn[b] ? 2 : 1, q);
        return -1;
    }
    return -1;
}

/* ---- VAE names ------------------------------------------------------------- */

static const char *const vae_res[][2] = {
    {"norm1.", "norm1"}, {"conv1.", "conv1"}, {"norm2.", "norm2"}, {"conv2.", "conv2"},
    {"conv_shortcut.", "nin_shortcut"},
};
static const char *const vae_attn[][2] = {
    {"group_norm.", "norm"}, {"to_q.", "q"}, {"to_k.", "k"}, {"to_v.", "v"}, {"to_out.0.", "proj_out"},
};

static int vae_res_name(char *out, size_t n, const char *part, const char *where, const char *rest) {
    const char *leaf, *sub = map_sub(rest, vae_res, 5, &leaf);
    if (!sub) return -1;
    return put(out, n, LDM_VAE_PREFIX "%s.%s.%s.%s", part, where, sub, leaf);
}

int ldm_vae_name(const char *dn, const ldm_vae_layout *lay, char *out, size_t n) {
    if (!dn || !out || !lay || lay->nlevels < 1 || lay->nlevels > LDM_MAX_LEVELS || lay->layers < 1) return -1;
    const int nl = lay->nlevels;
    const char *p, *q, *leaf, *sub;
    char where[48];
    if ((p = skip(dn, "quant_conv.")) || (p = skip(dn, "post_quant_conv.")))
        return is_leaf(p) ? put(out, n, LDM_VAE_PREFIX "%s", dn) : -1;

    const char *part = (p = skip(dn, "encoder.")) ? "encoder" : (p = skip(dn, "decoder.")) ? "decoder" : NULL;
    if (!part) return -1;
    const int enc = part[0] == 'e';
    if ((q = skip(p, "conv_in.")) || (q = skip(p, "conv_out.")))
        return is_leaf(q) ? put(out, n, LDM_VAE_PREFIX "%s", dn) : -1;
    if ((q = skip(p, "conv_norm_out.")))
        return is_leaf(q) ? put(out, n, LDM_VAE_PREFIX "%s.norm_out.%s", part, q) : -1;

    if ((q = skip(p, "mid_block.resnets."))) {
        int k = num(&q);
        if (k < 0 || k > 1) return -1;
        snprintf(where, sizeof where, "mid.block_%d", k + 1);
        return vae_res_name(out, n, part, where, q);
    }
    if ((q = skip(p, "mid_block.attentions.0."))) {
        if (!(sub = map_sub(q, vae_attn, 5, &leaf))) return -1;
        if (put(out, n, LDM_VAE_PREFIX "%s.mid.attn_1.%s.%s", part, sub, leaf)) return -1;
        /* LDM's AttnBlock computes q, k, v and the output projection with
         * 1x1 convs (C, C, 1, 1); diffusers with linears (C, C) */
        return (strcmp(sub, "norm") != 0 && strcmp(leaf, "weight") == 0) ? LDM_SQUEEZE : 0;
    }

    /* levels: the encoder's down.i is diffusers' down_blocks.i; the decoder
     * numbers up.i by resolution (up.0 full size), diffusers' up_blocks
     * deepest first, so up_blocks.i = up.(nl-1-i) */
    if ((q = skip(p, enc ? "down_blocks." : "up_blocks."))) {
        int i = num(&q), j;
        if (i < 0 || i >= nl) return -1;
        const int lvl = enc ? i : nl - 1 - i;
        const char *r;
        if ((r = skip(q, "resnets."))) {
            if ((j = num(&r)) < 0 || j >= lay->layers + (enc ? 0 : 1)) return -1;
            snprintf(where, sizeof where, "%s.%d.block.%d", enc ? "down" : "up", lvl, j);
            return vae_res_name(out, n, part, where, r);
        }
        /* every level but the last in diffusers' order resamples */
        if (i == nl - 1) return -1;
        if ((r = skip(q, enc ? "downsamplers.0.conv." : "upsamplers.0.conv.")) && is_leaf(r))
            return put(out, n, LDM_VAE_PREFIX "%s.%s.%d.%s.conv.%s", part, enc ? "down" : "up", lvl,
                       enc ? "downsample" : "upsample", r);
    }
    return -1;
}

/* ---- CLIP names ------------------------------------------------------------ */

/* OpenCLIP's names for a layer's parts: transformers' sub-module -> open_clip's */
static const char *const openclip_sub[][2] = {
    {"self_attn.out_proj.", "attn.out_proj."}, {"layer_norm1.", "ln_1."}, {"layer_norm2.", "ln_2."},
    {"mlp.fc1.", "mlp.c_fc."}, {"mlp.fc2.", "mlp.c_proj."},
};

/* p: a transformers name without "text_model."; layer l's sub-name is q */
static int openclip_name(const char *p, const ldm_clip_layout *lay, char *out, size_t n) {
    static const char *const qkv[3] = {"self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj."};
    const char *q, *leaf;
    if (strcmp(p, "embeddings.token_embedding.weight") == 0)
        return put(out, n, LDM_OPENCLIP_PREFIX "token_embedding.weight");
    if (strcmp(p, "embeddings.position_embedding.weight") == 0)
        return put(out, n, LDM_OPENCLIP_PREFIX "positional_embedding");   /* a bare parameter */
    if (is_leaf(q = skip(p, "final_layer_norm.")))
        return put(out, n, LDM_OPENCLIP_PREFIX "ln_final.%s", q);
    if (!(q = skip(p, "encoder.layers."))) return -1;
    int l = num(&q);
    if (l < 0 || l >= lay->num_layers) return -1;
    /* q, k, v are one fused projection in open_clip (nn.MultiheadAttention):
     * in_proj_weight = [W_q; W_k; W_v] (3d, d), in_proj_bias = [b_q; b_k; b_v] */
    for (int k = 0; k < 3; k++)
        if (is_leaf(leaf = skip(q, qkv[k])))
            return put(out, n, LDM_OPENCLIP_PREFIX "transformer.resblocks.%d.attn.in_proj_%s", l, leaf)
                   ? -1 : LDM_SPLIT_Q + k;
    const char *sub = map_sub(q, openclip_sub, 5, &leaf);
    return sub ? put(out, n, LDM_OPENCLIP_PREFIX "transformer.resblocks.%d.%s%s", l, sub, leaf) : -1;
}

int ldm_clip_name(const char *dn, const ldm_clip_layout *lay, char *out, size_t n) {
    static const char *const sub[] = {
        "self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.", "self_attn.out_proj.",
        "layer_norm1.", "layer_norm2.", "mlp.fc1.", "mlp.fc2.",
    };
    if (!dn || !out || !lay || lay->num_layers < 0) return -1;
    const char *p = skip(dn, "text_model.") ? dn + strlen("text_model.") : dn, *q;
    if (lay->openclip) return openclip_name(p, lay, out, n);
    int ok = strcmp(p, "embeddings.token_embedding.weight") == 0 ||
             strcmp(p, "embeddings.position_embedding.weight") == 0 ||
             is_leaf(skip(p, "final_layer_norm."));
    if (!ok && (q = skip(p, "encoder.layers."))) {
        int l = num(&q);
        for (size_t i = 0; l >= 0 && l < lay->num_layers && i < sizeof sub / sizeof sub[0] && !ok; i++)
            ok = is_leaf(skip(q, sub[i]));
    }
    if (!ok) return -1;
    return put(out, n, LDM_CLIP_PREFIX "%s%s", lay->text_model_level ? "text_model." : "", p);
}

/* ---- what a loader skips --------------------------------------------------- */

int ldm_ignorable(const char *name) {
    /* LatentDiffusion registers its noise schedule as buffers, so they are
     * saved with the weights; logvar is its learned-log-variance buffer */
    static const char *const sched[] = {
        "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
        "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
    };
    if (!name) return 0;
    for (size_t i = 0; i < sizeof sched / sizeof sched[0]; i++)
        if (strcmp(name, sched[i]) == 0) return 1;
    if (skip(name, "model_ema.")) return 1;
    const char *p = skip(name, LDM_OPENCLIP_PREFIX);
    if (p && (strcmp(p, "text_projection") == 0 || strcmp(p, "logit_scale") == 0 || strcmp(p, "attn_mask") == 0))
        return 1;
    p = skip(name, LDM_CLIP_PREFIX);
    if (p) {
        if (skip(p, "text_model.")) p += strlen("text_model.");
        if (strcmp(p, "embeddings.position_ids") == 0) return 1;
    }
    return 0;
}

/* ---- architecture ---------------------------------------------------------- */

static int fail(char *err, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, ST_ERR_LEN, fmt, ap);
        va_end(ap);
    }
    return -1;
}

/* what one LDM UNet block (input_blocks.i / output_blocks.i) holds */
typedef struct {
    int res;          /* a ResBlock at slot 0 */
    int cout;         /* its conv1 output channels */
    int op;           /* a downsampler at slot 0 (input) */
    int up;           /* an upsampler at slot 1 or 2 (output) */
    int attn;         /* a SpatialTransformer at slot 1 */
    int tblocks;      /* its transformer_blocks count */
} ublock;

typedef struct {
    ublock in[LDM_MAX_BLOCKS], out[LDM_MAX_BLOCKS];
    int nin, nout;                    /* 1 + the largest index seen */
    int mid[3];
    int conv_in[2], conv_out, temb;   /* shapes we need (0: absent) */
    int cross, cross_bad, proj_dim;   /* attn2.to_k width; proj_in ndim */
    int label_emb, any;
    const char *bad;                  /* an index past LDM_MAX_BLOCKS */
} uscan;

static int ishape(const st_tensor *t, int d) { return d < t->ndim ? (int)t->shape[d] : 0; }

/* one model.diffusion_model.* tensor; r is the name without the prefix */
static void unet_scan(uscan *s, const char *r, const st_tensor *t) {
    const char *p, *q;
    s->any = 1;
    /* attention details, wherever the transformer sits */
    if ((q = strstr(r, "attn2.to_k.weight")) && strcmp(q, "attn2.to_k.weight") == 0) {
        int c = t->ndim == 2 ? ishape(t, 1) : -1;
        if (s->cross && c != s->cross) s->cross_bad = 1;
        s->cross = c;
    }
    if ((q = strstr(r, "proj_in.weight")) && strcmp(q, "proj_in.weight") == 0) {
        if (s->proj_dim && s->proj_dim != t->ndim) s->cross_bad = 1;
        s->proj_dim = t->ndim;
    }
    if (strcmp(r, "input_blocks.0.0.weight") == 0) {
        if (t->ndim == 4) { s->conv_in[0] = ishape(t, 0); s->conv_in[1] = ishape(t, 1); }
        return;
    }
    if (strcmp(r, "out.2.weight") == 0) { s->conv_out = ishape(t, 0); return; }
    if (strcmp(r, "time_embed.0.weight") == 0) { s->temb = ishape(t, 0); return; }
    if (skip(r, "label_emb.")) { s->label_emb = 1; return; }
    if ((p = skip(r, "middle_block."))) {
        int k = num(&p);
        if (k >= 0 && k < 3) s->mid[k] = 1;
        return;
    }
    int in = (p = skip(r, "input_blocks.")) != NULL;
    if (!in && !(p = skip(r, "output_blocks."))) return;
    int i = num(&p);
    if (i < 0) return;
    if (i >= LDM_MAX_BLOCKS) { s->bad = r; return; }
    ublock *b = in ? &s->in[i] : &s->out[i];
    int *cnt = in ? &s->nin : &s->nout;
    if (i + 1 > *cnt) *cnt = i + 1;
    if (strcmp(p, "0.in_layers.2.weight") == 0) { b->res = 1; b->cout = ishape(t, 0); }
    else if (in && strcmp(p, "0.op.weight") == 0) b->op = 1;
    else if (!in && strcmp(p, "1.conv.weight") == 0) b->up = 1;
    else if (!in && strcmp(p, "2.conv.weight") == 0) b->up = 2;
    else if ((q = skip(p, "1.")) && unet_attn_ok(q)) {
        b->attn = 1;
        if ((q = skip(q, "transformer_blocks."))) {
            int k = num(&q);
            if (k + 1 > b->tblocks) b->tblocks = k + 1;
        }
    }
}

static int unet_arch(uscan *s, ldm_unet_arch *a, int sd2, char *err) {
    const char *U = LDM_UNET_PREFIX;
    memset(a, 0, sizeof *a);
    if (s->bad) return fail(err, "%s%s: more UNet blocks than any SD1.x model has (not an SD1.x checkpoint)", U, s->bad);
    if (s->label_emb)
        return fail(err, "%slabel_emb.* present: a class- or size-conditioned UNet (SDXL, upscaler), not SD1.x "
                    "(sdlora supports SD1.x text-to-image checkpoints)", U);
    if (!s->conv_in[0] || s->nin < 2)
        return fail(err, "%s* has no input_blocks: not an SD1.x UNet (SD3, Flux and other "
                    "architectures are not supported; sdlora supports SD1.x)", U);
    a->in_channels = s->conv_in[1];
    if (a->in_channels == 9)
        return fail(err, "the UNet takes 9 input channels: this is an inpainting checkpoint "
                    "(sdlora trains SD1.x text-to-image models with 4; use the base model it was made from)");
    if (a->in_channels == 8)
        return fail(err, "the UNet takes 8 input channels: this is an instruct-pix2pix checkpoint "
                    "(sdlora trains SD1.x text-to-image models with 4)");
    if (a->in_channels != 4)
        return fail(err, "the UNet takes %d input channels, SD1.x takes 4 (not an SD1.x text-to-image checkpoint)",
                    a->in_channels);
    if (s->cross_bad || s->cross <= 0)
        return fail(err, "%s*.attn2.to_k.weight missing or of mixed widths (damaged or not an SD1.x checkpoint)", U);
    if (s->cross == 2048 || s->cross == 1280 || (s->cross == 1024 && !sd2))
        return fail(err, "the UNet's text context is %d wide without an SD2.x text encoder: this is an SDXL "
                    "checkpoint, or a damaged one; sdlora supports SD1.x and SD2.x", s->cross);
    a->cross_dim = s->cross;
    a->linear_proj = s->proj_dim == 2;
    if (!s->mid[0] || !s->mid[1] || !s->mid[2])
        return fail(err, "%smiddle_block is not (ResBlock, SpatialTransformer, ResBlock): "
                    "not an SD1.x UNet, or a damaged file", U);

    /* down path: runs of ResBlocks, each run closed by a downsampler block,
     * the last run by the end of input_blocks */
    ldm_unet_layout *l = &a->layout;
    int nl = 0, run = 0;
    for (int i = 1; i < s->nin; i++) {
        const ublock *b = &s->in[i];
        if (b->res == b->op)
            return fail(err, "%sinput_blocks.%d is %s (a damaged checkpoint, or not SD1.x)", U, i,
                        b->res ? "both a ResBlock and a downsampler" : "missing or incomplete");
        if (b->op) {
            if (run == 0) return fail(err, "%sinput_blocks.%d: a downsampler with no ResBlock before it "
                                      "(not an SD1.x UNet)", U, i);
            l->layers[nl] = run; l->downsample[nl] = 1; nl++; run = 0;
            continue;
        }
        if (run == 0) {
            if (nl == LDM_MAX_LEVELS) return fail(err, "the UNet has more than %d levels (not SD1.x)", LDM_MAX_LEVELS);
            l->down_attn[nl] = b->attn; a->block_out[nl] = b->cout; a->tlayers[nl] = b->tblocks;
        } else if (b->attn != l->down_attn[nl] || b->cout != a->block_out[nl] || b->tblocks != a->tlayers[nl]) {
            return fail(err, "%sinput_blocks.%d differs from the blocks before it on its level (not an SD1.x UNet)",
                        U, i);
        }
        run++;
    }
    if (run == 0)
        return fail(err, "%sinput_blocks ends in a downsampler (not an SD1.x UNet)", U);
    l->layers[nl] = run; l->downsample[nl] = 0; nl++;
    l->nlevels = a->nlevels = nl;
    /* a level without attention has no transformer count; diffusers'
     * default (1) keeps the config valid, and nothing reads it */
    for (int b = 0; b < nl; b++)
        if (!l->down_attn[b]) a->tlayers[b] = 1;

    /* up path: level b (deepest first) has layers[nl-1-b] + 1 blocks; the
     * last block of every level but the last carries the upsampler */
    int i = 0;
    for (int b = 0; b < nl; b++) {
        const int L = l->layers[nl - 1 - b] + 1;
        l->upsample[b] = b < nl - 1;
        for (int j = 0; j < L; j++, i++) {
            const ublock *o = i < s->nout ? &s->out[i] : NULL;
            if (!o || !o->res)
                return fail(err, "%soutput_blocks.%d missing or incomplete (a damaged checkpoint, or not SD1.x)", U, i);
            if (j == 0) l->up_attn[b] = o->attn;
            int want_up = (j == L - 1 && l->upsample[b]) ? (o->attn ? 2 : 1) : 0;
            if (o->attn != l->up_attn[b] || o->cout != a->block_out[nl - 1 - b] || o->up != want_up)
                return fail(err, "%soutput_blocks.%d does not match the down path's layout (not an SD1.x UNet)", U, i);
        }
    }
    if (s->nout != i)
        return fail(err, "%soutput_blocks has %d blocks, the down path implies %d (not an SD1.x UNet)", U, s->nout, i);

    a->layers_per_block = l->layers[0];
    a->out_channels = s->conv_out;
    a->time_embed_dim = s->temb;
    if (a->out_channels <= 0 || a->time_embed_dim <= 0)
        return fail(err, "%sout.2 or time_embed.0 missing (a damaged checkpoint)", U);
    /* heads are in no shape: SD1.x's v1-inference.yaml has num_heads 8 on
     * every level; SD2.x's v2-inference.yaml num_head_channels 64, i.e.
     * heads = channels / 64 (5, 10, 20, 20), one for a level under 64 wide */
    for (int b = 0; b < nl; b++) a->heads[b] = sd2 ? (a->block_out[b] >= 64 ? a->block_out[b] / 64 : 1) : 8;
    a->groups = 32;
    a->eps = 1e-5f;
    a->flip_sin_to_cos = 1;
    a->freq_shift = 0;
    a->sample_size = sd2 ? 96 : 64;
    return 0;
}

/* VAE: per level, block count and width of encoder down.i / decoder up.i */
typedef struct {
    int enc_n[LDM_MAX_LEVELS], enc_c[LDM_MAX_LEVELS], enc_down[LDM_MAX_LEVELS];
    int dec_n[LDM_MAX_LEVELS], dec_c[LDM_MAX_LEVELS], dec_up[LDM_MAX_LEVELS];
    int nenc, ndec, bad, any;
    int conv_in[2], enc_out, dec_in[2], dec_out, quant, post_quant, mid_attn, mid_res;
} vscan;

static void vae_scan(vscan *s, const char *r, const st_tensor *t) {
    const char *p;
    s->any = 1;
    if (strcmp(r, "encoder.conv_in.weight") == 0) { s->conv_in[0] = ishape(t, 0); s->conv_in[1] = ishape(t, 1); }
    else if (strcmp(r, "encoder.conv_out.weight") == 0) s->enc_out = ishape(t, 0);
    else if (strcmp(r, "decoder.conv_in.weight") == 0) { s->dec_in[0] = ishape(t, 0); s->dec_in[1] = ishape(t, 1); }
    else if (strcmp(r, "decoder.conv_out.weight") == 0) s->dec_out = ishape(t, 0);
    else if (strcmp(r, "quant_conv.weight") == 0) s->quant = 1;
    else if (strcmp(r, "post_quant_conv.weight") == 0) s->post_quant = 1;
    else if (strcmp(r, "encoder.mid.attn_1.q.weight") == 0) s->mid_attn = 1;
    else if (strcmp(r, "encoder.mid.block_1.conv1.weight") == 0) s->mid_res = 1;
    else {
        int enc = (p = skip(r, "encoder.down.")) != NULL;
        if (!enc && !(p = skip(r, "decoder.up."))) return;
        int i = num(&p), j;
        if (i < 0) return;
        if (i >= LDM_MAX_LEVELS) { s->bad = 1; return; }
        int *nlev = enc ? &s->nenc : &s->ndec;
        if (i + 1 > *nlev) *nlev = i + 1;
        if (strcmp(p, enc ? "downsample.conv.weight" : "upsample.conv.weight") == 0) {
            (enc ? s->enc_down : s->dec_up)[i] = 1;
        } else if ((p = skip(p, "block.")) && (j = num(&p)) >= 0 && strcmp(p, "conv1.weight") == 0) {
            int *n = enc ? &s->enc_n[i] : &s->dec_n[i], *c = enc ? &s->enc_c[i] : &s->dec_c[i];
            if (j + 1 > *n) *n = j + 1;
            if (*c && *c != ishape(t, 0)) s->bad = 1;
            *c = ishape(t, 0);
        }
    }
}

static int vae_arch(const vscan *s, ldm_vae_arch *a, char *err) {
    const char *V = LDM_VAE_PREFIX;
    memset(a, 0, sizeof *a);
    if (!s->any)
        return fail(err, "no %s* tensors: the checkpoint has no VAE (an SD1.x single file holds UNet, VAE "
                    "and text encoder; use a complete one)", V);
    if (s->bad || s->nenc < 1 || s->nenc != s->ndec || !s->conv_in[0] || !s->dec_in[0] || !s->mid_res)
        return fail(err, "%s* is not an SD1.x AutoencoderKL (a damaged checkpoint, or another VAE type)", V);
    const int nl = s->nenc;
    a->layout.nlevels = a->nlevels = nl;
    a->layout.layers = a->layers_per_block = s->enc_n[0];
    for (int i = 0; i < nl; i++) {
        /* encoder down.i: layers blocks, a downsampler on all but the last;
         * decoder up.i (same width): layers + 1 blocks, an upsampler on all but up.0 */
        if (s->enc_n[i] != a->layers_per_block || s->dec_n[i] != a->layers_per_block + 1 ||
            s->enc_down[i] != (i < nl - 1) || s->dec_up[i] != (i > 0) || s->dec_c[i] != s->enc_c[i])
            return fail(err, "%sencoder.down.%d / decoder.up.%d do not have the SD1.x VAE layout "
                        "(a damaged checkpoint, or another VAE type)", V, i, i);
        a->block_out[i] = s->enc_c[i];
    }
    a->in_channels = s->conv_in[1];
    a->latent_channels = s->dec_in[1];
    a->out_channels = s->dec_out;
    if (s->enc_out != 2 * a->latent_channels || a->out_channels <= 0)
        return fail(err, "%sencoder.conv_out does not give mean and log-variance for %d latent channels "
                    "(not an SD1.x AutoencoderKL)", V, a->latent_channels);
    a->mid_attn = s->mid_attn;
    a->quant_conv = s->quant;
    a->post_quant_conv = s->post_quant;
    a->groups = 32;
    a->scaling_factor = 0.18215f;
    a->sample_size = 512;
    return 0;
}

typedef struct {
    int vocab, d, max_pos, inter, final_ln, level_yes, level_no, bad;
    int nlayers;
    unsigned char seen[LDM_MAX_CLIP_LAYERS];
} cscan;

static void clip_scan(cscan *s, const char *r, const st_tensor *t) {
    const char *p;
    if (strcmp(r, "embeddings.position_ids") == 0 || strcmp(r, "text_model.embeddings.position_ids") == 0) return;
    if ((p = skip(r, "text_model."))) s->level_yes = 1; else { s->level_no = 1; p = r; }
    if (strcmp(p, "embeddings.token_embedding.weight") == 0) { s->vocab = ishape(t, 0); s->d = ishape(t, 1); }
    else if (strcmp(p, "embeddings.position_embedding.weight") == 0) s->max_pos = ishape(t, 0);
    else if (strcmp(p, "final_layer_norm.weight") == 0) s->final_ln = 1;
    else if ((p = skip(p, "encoder.layers."))) {
        int l = num(&p);
        if (l < 0) return;
        if (l >= LDM_MAX_CLIP_LAYERS) { s->bad = 1; return; }
        if (l + 1 > s->nlayers) s->nlayers = l + 1;
        if (strcmp(p, "self_attn.q_proj.weight") == 0) s->seen[l] = 1;
        if (!s->inter && strcmp(p, "mlp.fc1.weight") == 0) s->inter = ishape(t, 0);
    }
}

static int clip_arch(const cscan *s, ldm_clip_arch *a, char *err) {
    const char *C = LDM_CLIP_PREFIX;
    memset(a, 0, sizeof *a);
    if (!s->vocab && !s->nlayers)
        return fail(err, "no %s* tensors: the checkpoint has no CLIP text encoder (an SD1.x single file "
                    "holds UNet, VAE and text encoder; use a complete one)", C);
    if (s->bad || s->level_yes == s->level_no || !s->vocab || !s->d || !s->max_pos || !s->inter || !s->final_ln)
        return fail(err, "%s* is not a complete CLIP text model (a damaged checkpoint)", C);
    for (int l = 0; l < s->nlayers; l++)
        if (!s->seen[l]) return fail(err, "%sencoder.layers.%d missing (a damaged checkpoint)", C, l);
    a->layout.num_layers = a->num_layers = s->nlayers;
    a->layout.text_model_level = s->level_yes;
    a->vocab_size = s->vocab;
    a->hidden_size = s->d;
    a->intermediate_size = s->inter;
    a->max_pos = s->max_pos;
    /* CLIP's heads are 64 wide (12 x 64 = 768 in SD1.x); not in any shape */
    a->num_heads = s->d % 64 == 0 ? s->d / 64 : 1;
    return 0;
}

/* OpenCLIP (SD2.x): what cond_stage_model.model.* holds */
typedef struct {
    int vocab, d, max_pos, inter, final_ln, bad, any;
    int nres;                          /* 1 + the largest resblock index */
    unsigned char seen[LDM_MAX_CLIP_LAYERS];
} oscan;

static void openclip_scan(oscan *s, const char *r, const st_tensor *t) {
    const char *p;
    s->any = 1;
    if (strcmp(r, "token_embedding.weight") == 0) { s->vocab = ishape(t, 0); s->d = ishape(t, 1); }
    else if (strcmp(r, "positional_embedding") == 0) s->max_pos = ishape(t, 0);
    else if (strcmp(r, "ln_final.weight") == 0) s->final_ln = 1;
    else if ((p = skip(r, "transformer.resblocks."))) {
        int l = num(&p);
        if (l < 0) return;
        if (l >= LDM_MAX_CLIP_LAYERS) { s->bad = 1; return; }
        if (l + 1 > s->nres) s->nres = l + 1;
        if (strcmp(p, "attn.in_proj_weight") == 0) s->seen[l] = 1;
        if (!s->inter && strcmp(p, "mlp.c_fc.weight") == 0) s->inter = ishape(t, 0);
    }
}

static int openclip_arch(const oscan *s, ldm_clip_arch *a, char *err) {
    const char *C = LDM_OPENCLIP_PREFIX;
    memset(a, 0, sizeof *a);
    if (s->bad || !s->vocab || !s->d || !s->max_pos || !s->inter || !s->final_ln)
        return fail(err, "%s* is not a complete OpenCLIP text model (a damaged SD2.x checkpoint)", C);
    for (int l = 0; l < s->nres; l++)
        if (!s->seen[l]) return fail(err, "%stransformer.resblocks.%d missing (a damaged checkpoint)", C, l);
    if (s->nres < 2)
        return fail(err, "%s* has %d resblock(s): SD2.x reads the penultimate one, so it needs 2 or more "
                    "(a damaged checkpoint)", C, s->nres);
    /* the penultimate layer: the last resblock is not part of the model.
     * A file that diffusers' convert_diffusers_to_original_stable_diffusion
     * wrote from a diffusers SD2 folder holds only the 23 resblocks of
     * OpenCLIP-H that run: all of them are the model then (SD2's 23 for its
     * 1024-wide tower, as diffusers and A1111 read such a file) */
    a->resblocks = s->nres;
    a->layout.num_layers = a->num_layers = (s->d == 1024 && s->nres == 23) ? 23 : s->nres - 1;
    a->layout.openclip = 1;
    a->vocab_size = s->vocab;
    a->hidden_size = s->d;
    a->intermediate_size = s->inter;
    a->max_pos = s->max_pos;
    a->num_heads = s->d % 64 == 0 ? s->d / 64 : 1;   /* OpenCLIP-H: 16 heads of 64 */
    a->gelu = 1;
    return 0;
}

/* the first name that marks a LoRA / LyCORIS file, or NULL */
static const char *lora_key(const st_tensor *t, int n) {
    static const char *const marks[] = {".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".hada_w1_a",
                                        ".lokr_w1", "lora_unet_", "lora_te_", "lora_te1_"};
    for (int i = 0; i < n; i++)
        for (size_t k = 0; k < sizeof marks / sizeof marks[0]; k++)
            if (strstr(t[i].name, marks[k])) return t[i].name;
    return NULL;
}

int ldm_infer(const st_tensor *t, int n, ldm_arch *a, char *err) {
    if (!t || n <= 0)
        return fail(err, "the file holds no tensors (not an SD1.x checkpoint; "
                    "give one such as v1-5-pruned-emaonly.safetensors)");
    const char *k = lora_key(t, n);
    if (k)
        return fail(err, "this is a LoRA file ('%s'), not a base model (give the SD1.x checkpoint "
                    "the LoRA was made for as the model)", k);
    int nunet = 0, diffusers_unet = 0, vae_only = 0, te_only = 0;
    for (int i = 0; i < n; i++) {
        const char *s = t[i].name;
        if (skip(s, "conditioner.embedders."))
            return fail(err, "this is an SDXL checkpoint ('%s'); sdlora supports SD1.x", s);
        if (skip(s, LDM_UNET_PREFIX)) nunet++;
        diffusers_unet |= skip(s, "down_blocks.") || skip(s, "mid_block.") || skip(s, "time_embedding.");
        vae_only |= skip(s, "encoder.down.") || skip(s, "decoder.up.") || skip(s, "encoder.down_blocks.");
        te_only |= skip(s, "text_model.") || skip(s, "encoder.layers.");
    }
    if (nunet == 0) {
        if (diffusers_unet)
            return fail(err, "this is a diffusers-format UNet file, not a single-file checkpoint "
                        "(give the diffusers model folder, the one holding unet/, vae/ and text_encoder/)");
        if (vae_only)
            return fail(err, "this is a standalone VAE file, not a full SD1.x checkpoint "
                        "(give the SD1.x checkpoint as the model)");
        if (te_only)
            return fail(err, "this is a standalone text-encoder file, not a full SD1.x checkpoint "
                        "(give the SD1.x checkpoint as the model)");
        return fail(err, "no " LDM_UNET_PREFIX "* tensors: not an SD1.x single-file checkpoint "
                    "(give one such as v1-5-pruned-emaonly.safetensors, or a diffusers folder)");
    }

    /* the scans are large (a few KB): heap, not stack */
    uscan *us = calloc(1, sizeof *us);
    vscan *vs = calloc(1, sizeof *vs);
    cscan *cs = calloc(1, sizeof *cs);
    oscan *os = calloc(1, sizeof *os);
    int rc = -1, ncs = 0;
    if (!us || !vs || !cs || !os) { fail(err, "out of memory reading the checkpoint's layout"); goto done; }
    for (int i = 0; i < n; i++) {
        const char *s = t[i].name, *r;
        if ((r = skip(s, LDM_UNET_PREFIX))) unet_scan(us, r, &t[i]);
        else if ((r = skip(s, LDM_VAE_PREFIX))) vae_scan(vs, r, &t[i]);
        else if ((r = skip(s, LDM_CLIP_PREFIX))) { clip_scan(cs, r, &t[i]); ncs++; }
        else if ((r = skip(s, LDM_OPENCLIP_PREFIX)) && !ldm_ignorable(s)) openclip_scan(os, r, &t[i]);
    }
    ldm_arch tmp;
    if (!a) a = &tmp;
    if (os->any && ncs) {
        fail(err, "the file holds two text encoders, %s* and %s* (SD1.x's and SD2.x's): a damaged or "
             "mixed checkpoint", LDM_CLIP_PREFIX, LDM_OPENCLIP_PREFIX);
        goto done;
    }
    a->sd2 = os->any;
    if (unet_arch(us, &a->unet, a->sd2, err) || vae_arch(vs, &a->vae, err) ||
        (a->sd2 ? openclip_arch(os, &a->clip, err) : clip_arch(cs, &a->clip, err))) goto done;
    if (a->clip.hidden_size != a->unet.cross_dim) {
        fail(err, "the text encoder is %d wide but the UNet attends to %d-wide context "
             "(the checkpoint's parts do not belong together)", a->clip.hidden_size, a->unet.cross_dim);
        goto done;
    }
    rc = 0;
done:
    free(us); free(vs); free(cs); free(os);
    return rc;
}

int ldm_infer_file(const st_file *f, ldm_arch *a, char *err) {
    char why[ST_ERR_LEN];
    if (!f) return fail(err, "no file");
    if (ldm_infer(f->tensors, f->ntensors, a, why) == 0) return 0;
    return fail(err, "%s: %s", f->path ? f->path : "(checkpoint)", why);
}

const char *ldm_detect(const st_file *f, char *err) {
    ldm_arch a;
    if (ldm_infer_file(f, &a, err)) return NULL;
    return a.sd2 ? "sd2" : "sd1";
}

/* ---- reading --------------------------------------------------------------- */

int ldm_read_f32(const st_file *f, const char *ldm_name, int squeeze, int ndim,
                 const int64_t *shape, float *dst, char *err) {
    const st_tensor *t = st_find(f, ldm_name);
    if (t && squeeze && shape && ndim >= 0 && t->ndim > ndim) {
        /* (C, C, 1, 1) for (C, C): same numbers, same order */
        int same = 1;
        for (int d = 0; d < t->ndim; d++) same &= t->shape[d] == (d < ndim ? shape[d] : 1);
        if (same) return st_read_f32(f, ldm_name, t->ndim, t->shape, dst, err);
    }
    return st_read_f32(f, ldm_name, ndim, shape, dst, err);
}

int ldm_read_split(const st_file *f, const char *ldm_name, int split, int ndim,
                   const int64_t *shape, float *dst, char *err) {
    if (split < LDM_SPLIT_Q || split > LDM_SPLIT_V) return ldm_read_f32(f, ldm_name, split, ndim, shape, dst, err);
    if (!shape || ndim < 1 || ndim > 2) return fail(err, "%s: bad shape for a split read", ldm_name);
    /* the fused tensor: (3 rows, cols); block k is rows [k rows, (k+1) rows),
     * contiguous in row-major order */
    int64_t fused[2] = {3 * shape[0], ndim == 2 ? shape[1] : 1};
    size_t block = (size_t)shape[0] * (size_t)fused[1];
    float *all = malloc(3 * block * sizeof *all);
    if (!all) return fail(err, "%s: out of memory", ldm_name);
    int rc = st_read_f32(f, ldm_name, ndim, fused, all, err);
    if (rc == 0) memcpy(dst, all + (size_t)(split - LDM_SPLIT_Q) * block, block * sizeof *dst);
    free(all);
    return rc;
}

/* clip.c: the CLIP text transformer (transformers CLIPTextModel) that turns
 * SD1.x's 77 token ids into the 77 x 768 context the UNet cross-attends to.
 *
 * A pre-norm transformer with a causal mask (the article's text encoder box):
 *
 *   x_0 = token_embedding[id_t] + position_embedding[t]
 *   x'  = x_l + out_proj(attn(q_proj(ln1(x_l)), k_proj(ln1(x_l)), v_proj(ln1(x_l))))
 *   x_{l+1} = x' + fc2(act(fc1(ln2(x'))))
 *   out = final_layer_norm(x_n)
 *
 * SD1.x feeds no padding mask: the eos padding tokens are ordinary tokens that
 * see (causally) the whole prompt, and the UNet attends to all 77 rows.
 *
 * Every projection goes through lora_forward / lora_backward with L == NULL
 * meaning the plain linear, so adding LoRA (article 4.1) changes no code path
 * here, only whether an adapter pointer is set.
 *
 * Backward (for text-encoder LoRA): the only trainable tensors are LoRA's A
 * and B, so the backward pass carries the gradient down the residual stream
 * (dx through every frozen weight is unavoidable: the adapters of lower
 * layers need it) but never forms a frozen weight's gradient, and stops at
 * the first layer's adapters: nothing below them (the embeddings) trains.
 * With a grads block (clip_alloc_grads, full fine-tuning) every weight's
 * gradient is formed too, at the weight's own offset in grads, and backward
 * runs on down to the embeddings.
 *
 * Memory: clip_layout gives every activation a forward keeps, the dropout
 * masks, the adapters' scratch and the backward's workspace an offset into
 * one block (arena.h); clip_forward allocates it (again only when a bigger
 * shape comes) and forward and backward read and write at those offsets.
 *
 * fp16 weights (clip_init_dtype(..., WEIGHT_F16), --weight-dtype fp16): the
 * matrices are held as fp16 and weight_f32() widens each, exactly, into one fp32
 * buffer just before its layer (forward, and backward's dX = dY W); the
 * embeddings are gathered from fp16 row by row. Widening is exact, so from
 * an fp16 checkpoint the numbers are bit for bit those of fp32 weights. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "clip.h"
#include "json.h"
#include "half.h"
#include "backend.h"

/* the operations table every layer runs through (backend.h): the CPU's, or
 * a device's after clip_to_device, where every pointer is in its memory */
#define OPS (m->ops ? m->ops : &nn_ops_cpu)
#define ON_DEVICE(m) ((m)->dparams != NULL)

/* where the activations live: offsets into m->acts, set by clip_layout */
typedef struct {
    size_t res;                        /* (N, C) layer input x_l */
    size_t ln1, ln1_mean, ln1_rstd;    /* (N, C), (N), (N) */
    size_t q, k, v;                    /* (N, C) */
    size_t att;                        /* (B, H, T, T) softmax probabilities */
    size_t atty;                       /* (N, C) attention output, before out_proj */
    size_t res2;                       /* (N, C) x' = x_l + attention branch */
    size_t ln2, ln2_mean, ln2_rstd;
    size_t h, ha;                      /* (N, F) fc1 output, after the activation */
    size_t ax[CLIP_NPROJ];             /* (N, r) each: A x saved by lora_forward */
    size_t mask[CLIP_NPROJ];           /* (N * in) bytes each: dropout masks, training with dropout */
} layer_offsets;

struct clip_layout {
    size_t ids;                        /* (B, T) ints: the last forward's ids (the token embedding's gradient) */
    size_t x_final;                    /* (N, C) the last run layer's output */
    size_t out;                        /* (N, C) on a device: the output before it comes down */
    size_t lnf_mean, lnf_rstd;         /* (N) final_layer_norm statistics */
    size_t lora_scratch;               /* lora_scratch_floats of the widest adapter */
    int backward;                      /* whether the workspace below is laid out */
    size_t dres, dln, datty;           /* (N, C): dL/d(residual stream), d(a norm's output), d(atty) */
    size_t dq, dk, dv;                 /* (N, C) */
    size_t dh, dha;                    /* (N, F): dL/dh, dL/dha */
    layer_offsets layer[];             /* num_layers (the first nrun laid out) */
};

/* ---------------------------------------------------------------------------
 * config */

void clip_config_default(clip_config *c) {
    /* transformers CLIPTextConfig() defaults (a config.json may omit any key) */
    c->vocab_size = 49408;
    c->hidden_size = 512;
    c->intermediate_size = 2048;
    c->num_layers = 12;
    c->num_heads = 8;
    c->max_pos = 77;
    c->act = CLIP_ACT_QUICKGELU;
    c->layer_norm_eps = 1e-5f;
    c->pad_token_id = 1;
    c->bos_token_id = 49406;
    c->eos_token_id = 49407;
}

/* an integer-valued number in [lo, hi], or the default when the key is absent
 * or null; anything else is an error naming the key */
static int cfg_int(const json *o, const char *key, int lo, int hi, int *v, const char *path, char *err) {
    const json *j = json_get(o, key);
    if (!j || j->type == JSON_NULL) return 0;
    if (j->type != JSON_NUMBER || !(j->number >= lo && j->number <= hi) || j->number != floor(j->number)) {
        snprintf(err, ST_ERR_LEN, "%s: \"%s\" must be an integer in [%d, %d] "
                 "(is this a CLIP text model config.json?)", path, key, lo, hi);
        return -1;
    }
    *v = (int)j->number;
    return 0;
}

int clip_config_parse(clip_config *c, const char *text, size_t len, const char *path, char *err) {
    char jerr[256];
    clip_config_default(c);
    json *root = json_parse(text, len, jerr, sizeof jerr);
    if (!root) {
        snprintf(err, ST_ERR_LEN, "%s: not valid JSON: %s (is the file complete?)", path, jerr);
        return -1;
    }
    /* a full CLIPConfig keeps the text model's settings under "text_config" */
    const json *o = root;
    const json *tc = json_get(root, "text_config");
    if (tc && tc->type == JSON_OBJECT) o = tc;
    int rc = -1;
    if (o->type != JSON_OBJECT) {
        snprintf(err, ST_ERR_LEN, "%s: top level is not a JSON object (is this a config.json?)", path);
        goto done;
    }
    /* the bounds keep every size product inside size_t and int indexing */
    if (cfg_int(o, "vocab_size", 1, 1 << 24, &c->vocab_size, path, err) ||
        cfg_int(o, "hidden_size", 1, 1 << 16, &c->hidden_size, path, err) ||
        cfg_int(o, "intermediate_size", 1, 1 << 18, &c->intermediate_size, path, err) ||
        cfg_int(o, "num_hidden_layers", 1, 1024, &c->num_layers, path, err) ||
        cfg_int(o, "num_attention_heads", 1, 1 << 16, &c->num_heads, path, err) ||
        cfg_int(o, "max_position_embeddings", 1, 1 << 16, &c->max_pos, path, err) ||
        cfg_int(o, "bos_token_id", -1, 1 << 30, &c->bos_token_id, path, err) ||
        cfg_int(o, "eos_token_id", -1, 1 << 30, &c->eos_token_id, path, err) ||
        cfg_int(o, "pad_token_id", -1, 1 << 30, &c->pad_token_id, path, err))
        goto done;
    if (c->hidden_size % c->num_heads != 0) {
        snprintf(err, ST_ERR_LEN, "%s: hidden_size %d is not a multiple of num_attention_heads %d "
                 "(is the config.json edited by hand?)", path, c->hidden_size, c->num_heads);
        goto done;
    }
    const json *eps = json_get(o, "layer_norm_eps");
    if (eps && eps->type != JSON_NULL) {
        if (eps->type != JSON_NUMBER || !(eps->number > 0 && eps->number < 1)) {
            snprintf(err, ST_ERR_LEN, "%s: \"layer_norm_eps\" must be a number in (0, 1)", path);
            goto done;
        }
        c->layer_norm_eps = (float)eps->number;
    }
    const json *act = json_get(o, "hidden_act");
    if (act && act->type != JSON_NULL) {
        if (act->type == JSON_STRING && strcmp(act->string, "quick_gelu") == 0) c->act = CLIP_ACT_QUICKGELU;
        else if (act->type == JSON_STRING && strcmp(act->string, "gelu") == 0) c->act = CLIP_ACT_GELU;
        else {
            char q[300];
            json_quote_key(q, sizeof q, act->type == JSON_STRING ? act->string : "(not a string)");
            snprintf(err, ST_ERR_LEN, "%s: unsupported \"hidden_act\" %s%.40s%s (quick_gelu and gelu are supported)",
                     path, act->type == JSON_STRING ? "\"" : "", q, act->type == JSON_STRING ? "\"" : "");
            goto done;
        }
    }
    rc = 0;
done:
    json_free(root);
    return rc;
}

int clip_config_load(clip_config *c, const char *path, char *err) {
    FILE *fp = fopen(path, "rb");
    if (!fp) {
        snprintf(err, ST_ERR_LEN, "%s: cannot open (is the model folder right?)", path);
        return -1;
    }
    /* config.json is small; read it whole, refusing anything absurd */
    size_t cap = 1 << 12, len = 0;
    char *buf = malloc(cap);
    int rc = -1;
    while (buf) {
        size_t got = fread(buf + len, 1, cap - len, fp);
        len += got;
        if (len < cap) break;
        if (cap >= (1u << 24)) { free(buf); buf = NULL; break; }
        char *nb = realloc(buf, cap * 2);
        if (!nb) { free(buf); buf = NULL; break; }
        buf = nb; cap *= 2;
    }
    if (!buf) snprintf(err, ST_ERR_LEN, "%s: too large or out of memory (a config.json is a few KB)", path);
    else if (ferror(fp)) snprintf(err, ST_ERR_LEN, "%s: read error", path);
    else rc = clip_config_parse(c, buf, len, path, err);
    free(buf);
    fclose(fp);
    return rc;
}

/* ---------------------------------------------------------------------------
 * parameters: one block, one table */

static void table_add(clip_t *m, size_t *off, const char *name, int ndim, int64_t d0, int64_t d1) {
    clip_param *p = &m->table[m->ntable++];
    snprintf(p->name, sizeof p->name, "%s", name);
    p->offset = *off;
    p->ndim = ndim;
    p->shape[0] = d0; p->shape[1] = ndim > 1 ? d1 : 1;
    p->numel = (size_t)d0 * (size_t)p->shape[1];
    *off += p->numel;
}

int clip_init(clip_t *m, const clip_config *c, char *err) {
    return clip_init_dtype(m, c, WEIGHT_F32, err);
}

int clip_init_dtype(clip_t *m, const clip_config *c, weight_dtype wdtype, char *err) {
    memset(m, 0, sizeof *m);
    m->config = *c;
    m->wdtype = wdtype;
    int C = c->hidden_size, F = c->intermediate_size, n = c->num_layers;
    m->table = calloc((size_t)(4 + 16 * n), sizeof(clip_param));
    m->layers = malloc(sizeof(clip_layer) * (size_t)n);
    m->layout = calloc(1, sizeof(struct clip_layout) + sizeof(layer_offsets) * (size_t)n);
    if (!m->table || !m->layers || !m->layout) goto oom;
    /* the table, in a fixed order; names as transformers writes them */
    size_t off = 0;
    char name[64];
    table_add(m, &off, "embeddings.token_embedding.weight", 2, c->vocab_size, C);
    table_add(m, &off, "embeddings.position_embedding.weight", 2, c->max_pos, C);
    static const struct { const char *suffix; int kind; } lp[16] = {
        {"layer_norm1.weight", 0}, {"layer_norm1.bias", 0},
        {"self_attn.q_proj.weight", 1}, {"self_attn.q_proj.bias", 0},
        {"self_attn.k_proj.weight", 1}, {"self_attn.k_proj.bias", 0},
        {"self_attn.v_proj.weight", 1}, {"self_attn.v_proj.bias", 0},
        {"self_attn.out_proj.weight", 1}, {"self_attn.out_proj.bias", 0},
        {"layer_norm2.weight", 0}, {"layer_norm2.bias", 0},
        {"mlp.fc1.weight", 2}, {"mlp.fc1.bias", 3},
        {"mlp.fc2.weight", 4}, {"mlp.fc2.bias", 0},
    };
    for (int l = 0; l < n; l++) {
        for (int i = 0; i < 16; i++) {
            snprintf(name, sizeof name, "encoder.layers.%d.%s", l, lp[i].suffix);
            switch (lp[i].kind) {
            case 0: table_add(m, &off, name, 1, C, 1); break;     /* (C) vectors */
            case 1: table_add(m, &off, name, 2, C, C); break;     /* (C x C) */
            case 2: table_add(m, &off, name, 2, F, C); break;     /* fc1 (F x C) */
            case 3: table_add(m, &off, name, 1, F, 1); break;     /* fc1 bias (F) */
            default: table_add(m, &off, name, 2, C, F); break;    /* fc2 (C x F) */
            }
        }
    }
    table_add(m, &off, "final_layer_norm.weight", 1, C, 1);
    table_add(m, &off, "final_layer_norm.bias", 1, C, 1);
    m->num_params = off;
    if (off > SIZE_MAX / sizeof(float)) goto oom;
    /* where each tensor is held: fp32 weights, all in params at its offset;
     * fp16 weights, the matrices packed in params16 and the vectors packed in
     * params, each in table order. The widening buffer fits the largest
     * layer matrix (the embeddings are read row by row, never widened whole). */
    int f16 = wdtype == WEIGHT_F16;
    size_t nmat = 0, big = 1;
    for (int i = 0; i < m->ntable; i++) {
        if (m->table[i].ndim < 2) continue;
        nmat += m->table[i].numel;
        if (i >= 2 && m->table[i].numel > big) big = m->table[i].numel;
    }
    m->params = malloc(sizeof(float) * (f16 ? off - nmat + 1 : off));
    if (f16) {
        m->params16 = malloc(sizeof(uint16_t) * (nmat + 1));
        m->wbuf = malloc(sizeof(float) * big);
        if (!m->params16 || !m->wbuf) goto oom;
    }
    if (!m->params) goto oom;
    size_t nv = 0;
    m->nmat = 0;
    for (int i = 0; i < m->ntable; i++) {
        clip_param *q = &m->table[i];
        if (f16 && q->ndim >= 2) { q->data16 = m->params16 + m->nmat; m->nmat += q->numel; }
        else if (f16) { q->data = m->params + nv; nv += q->numel; }
        else q->data = m->params + q->offset;
        if (q->ndim >= 2 && !f16) m->nmat += q->numel;
    }
    /* named pointers, in table order */
    int t = 0;
    m->tok_emb = &m->table[t++];
    m->pos_emb = &m->table[t++];
    for (int l = 0; l < n; l++) {
        clip_layer *L = &m->layers[l];
        float **vs[10] = {&L->ln1_w, &L->ln1_b, &L->q_b, &L->k_b, &L->v_b, &L->o_b, &L->ln2_w, &L->ln2_b,
                          &L->fc1_b, &L->fc2_b};
        const clip_param **ms[6] = {&L->q_w, &L->k_w, &L->v_w, &L->o_w, &L->fc1_w, &L->fc2_w};
        int nvs = 0, nms = 0;
        /* the table's 16 entries of a layer: vectors and matrices alternate as lp[] says */
        for (int i = 0; i < 16; i++) {
            const clip_param *q = &m->table[t++];
            if (q->ndim >= 2) *ms[nms++] = q;
            else *vs[nvs++] = q->data;
        }
    }
    m->lnf_w = m->table[t++].data;
    m->lnf_b = m->table[t++].data;
    return 0;
oom:
    snprintf(err, ST_ERR_LEN, "clip: out of memory for %d layers of width %d (vocab %d)",
             n, C, c->vocab_size);
    clip_free(m);
    return -1;
}

void clip_free(clip_t *m) {
    free(m->params); free(m->params16); free(m->wbuf); free(m->table); free(m->layers);
    free(m->adapters); free(m->lora_params); free(m->lora_grads);
    free(m->grads); free(m->layout);
    if (m->ops) {
        if (m->acts.base) m->ops->free(m->acts.base);
        if (m->dparams) m->ops->free(m->dparams);
        if (m->dparams16) m->ops->free(m->dparams16);
        if (m->dwbuf) m->ops->free(m->dwbuf);
        if (m->dlora_params) m->ops->free(m->dlora_params);
        if (m->dlora_grads) m->ops->free(m->dlora_grads);
    } else {
        arena_free(&m->acts);
    }
    memset(m, 0, sizeof *m);
}

int clip_read_param(clip_t *m, int i, const st_file *f, const char *name, int squeeze, char *err) {
    const clip_param *p = &m->table[i];
    m->wbuf_of = NULL;   /* the widened copy may be of this matrix */
    return st_read_param(f, name, squeeze, p->ndim, p->shape, p->data, p->data16, err);
}

void clip_param_get(const clip_t *m, int i, float *dst) {
    const clip_param *p = &m->table[i];
    half_param_get(dst, p->data, p->data16, p->numel);
}

void clip_param_set(clip_t *m, int i, const float *src) {
    const clip_param *p = &m->table[i];
    half_param_set(p->data, p->data16, src, p->numel);
    m->wbuf_of = NULL;
}

int clip_load_st(clip_t *m, const st_file *f, const char *prefix, char *err) {
    char name[256];
    for (int i = 0; i < m->ntable; i++) {
        snprintf(name, sizeof name, "%s%s", prefix, m->table[i].name);
        if (clip_read_param(m, i, f, name, 0, err)) return -1;
    }
    return 0;
}

int clip_load_hf(clip_t *m, const char *dir, char *err) {
    return clip_load_hf_dtype(m, dir, WEIGHT_F32, err);
}

int clip_load_hf_dtype(clip_t *m, const char *dir, weight_dtype wdtype, char *err) {
    char path[4096];
    clip_config c;
    memset(m, 0, sizeof *m);
    if (snprintf(path, sizeof path, "%s/config.json", dir) >= (int)sizeof path) {
        snprintf(err, ST_ERR_LEN, "%.200s...: path too long", dir);
        return -1;
    }
    if (clip_config_load(&c, path, err)) return -1;
    if (clip_init_dtype(m, &c, wdtype, err)) return -1;
    /* diffusers folders may hold only the fp16 variant */
    st_file f;
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    FILE *probe = fopen(path, "rb");
    if (probe) fclose(probe);
    else {
        char alt[4096];
        snprintf(alt, sizeof alt, "%s/model.fp16.safetensors", dir);
        if ((probe = fopen(alt, "rb")) != NULL) { fclose(probe); memcpy(path, alt, sizeof path); }
    }
    if (st_open(&f, path, err)) { clip_free(m); return -1; }
    /* transformers 4 (every SD1.x text_encoder on the Hub) writes
     * "text_model.embeddings..."; transformers 5 drops the prefix */
    const char *prefix = st_find(&f, "text_model.embeddings.token_embedding.weight") ? "text_model." : "";
    int rc = clip_load_st(m, &f, prefix, err);
    st_close(&f);
    if (rc) clip_free(m);
    return rc;
}

/* ---------------------------------------------------------------------------
 * LoRA */

static const char *proj_module[CLIP_NPROJ] = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"
};

/* in and out features of projection p */
static void proj_dims(const clip_config *c, int p, int *in, int *out) {
    *in = p == CLIP_FC2 ? c->intermediate_size : c->hidden_size;
    *out = p == CLIP_FC1 ? c->intermediate_size : c->hidden_size;
}

int clip_add_lora(clip_t *m, int rank, float alpha, float dropout, uint64_t seed, char *err) {
    const clip_config *c = &m->config;
    if (m->adapters) {
        snprintf(err, ST_ERR_LEN, "clip: LoRA already added");
        return -1;
    }
    if (rank < 1 || rank > c->hidden_size || !(dropout >= 0.0f && dropout < 1.0f) || !isfinite(alpha)) {
        snprintf(err, ST_ERR_LEN, "clip: bad LoRA settings rank %d (1..%d), dropout %g ([0, 1)), alpha %g",
                 rank, c->hidden_size, (double)dropout, (double)alpha);
        return -1;
    }
    int n = c->num_layers * CLIP_NPROJ;
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        int in, out;
        proj_dims(c, i % CLIP_NPROJ, &in, &out);
        total += (size_t)rank * ((size_t)in + (size_t)out);
    }
    m->adapters = calloc((size_t)n, sizeof(clip_adapter));
    m->lora_params = malloc(sizeof(float) * total);
    m->lora_grads = calloc(total, sizeof(float));
    if (!m->adapters || !m->lora_params || !m->lora_grads) {
        free(m->adapters); free(m->lora_params); free(m->lora_grads);
        m->adapters = NULL; m->lora_params = m->lora_grads = NULL;
        snprintf(err, ST_ERR_LEN, "clip: out of memory for %zu LoRA parameters", total);
        return -1;
    }
    rng_t rng;
    rng_seed(&rng, seed);
    rng_seed(&m->rng, seed ^ 0x9e3779b97f4a7c15ull);   /* dropout: its own stream */
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        clip_adapter *a = &m->adapters[i];
        int in, out;
        a->layer = i / CLIP_NPROJ; a->proj = i % CLIP_NPROJ;
        proj_dims(c, a->proj, &in, &out);
        /* the module path kohya turns into lora_te_text_model_encoder_layers_0_self_attn_q_proj */
        snprintf(a->name, sizeof a->name, "text_model.encoder.layers.%d.%s", a->layer, proj_module[a->proj]);
        float *A = m->lora_params + off, *Bm = A + (size_t)rank * in;
        lora_init(&a->L, in, out, rank, alpha, dropout, A, Bm, 0, &rng);
        a->L.dA = m->lora_grads + off;
        a->L.dB = a->L.dA + (size_t)rank * in;
        off += (size_t)rank * ((size_t)in + (size_t)out);
    }
    m->nadapters = n;
    m->num_lora_params = total;
    m->nrun = 0;   /* the activation layout changed: a new forward is needed */
    return 0;
}

void clip_zero_grad(clip_t *m) {
    if (m->dlora_grads) m->ops->zero(m->dlora_grads, m->num_lora_params);   /* on a device: its copy, the one used */
    else if (m->lora_grads) memset(m->lora_grads, 0, sizeof(float) * m->num_lora_params);
}

/* ---------------------------------------------------------------------------
 * full fine-tuning */

int clip_alloc_grads(clip_t *m) {
    if (m->grads) return 0;
    if (ON_DEVICE(m)) {
        snprintf(m->err, sizeof m->err, "clip: full fine-tuning does not run on %s (use --device cpu)", m->ops->name);
        return -1;
    }
    if (m->wdtype != WEIGHT_F32) {
        /* the gradient updates the weights themselves, which fp16 cannot hold
         * to the precision small updates need */
        snprintf(m->err, sizeof m->err, "clip: full fine-tuning needs fp32 weights (load with --weight-dtype fp32)");
        return -1;
    }
    m->grads = calloc(m->num_params ? m->num_params : 1, sizeof(float));
    if (!m->grads) {
        snprintf(m->err, sizeof m->err, "clip: out of memory for %zu weight gradients", m->num_params);
        return -1;
    }
    m->nrun = 0;   /* the next forward lays out the backward's workspace */
    return 0;
}

void clip_zero_grads(clip_t *m) {
    if (m->grads) memset(m->grads, 0, sizeof(float) * m->num_params);
}

/* the gradient of vector p (same offset in grads), or NULL: frozen. Grads
 * exist only with fp32 weights, where params is the whole fp32 layout. */

/* a vector parameter in the table's memory: on a device, its copy */
static const float *PV(const clip_t *m, const float *p) {
    return ON_DEVICE(m) ? m->dparams + (p - m->params) : p;
}

static float *grad_of(const clip_t *m, const float *p) {
    return m->grads ? m->grads + (p - m->params) : NULL;
}

/* the same for a matrix, by its table entry */
static float *grad_of_param(const clip_t *m, const clip_param *p) {
    return m->grads ? m->grads + p->offset : NULL;
}

/* A layer matrix as fp32, for the layer about to use it: the weights
 * themselves, or (held as fp16) widened exactly into m->wbuf, one matrix at
 * a time; asking again for the matrix already there costs nothing. */
static const float *weight_f32(clip_t *m, const clip_param *p) {
    if (ON_DEVICE(m)) {
        if (p->data) return m->dparams + (p->data - m->params);
        const uint16_t *d16 = m->dparams16 + (p->data16 - m->params16);
        if (m->dwbuf_of != d16) {
            OPS->widen_f16(m->dwbuf, d16, p->numel);
            m->dwbuf_of = d16;
        }
        return m->dwbuf;
    }
    if (p->data) return p->data;
    return half_widen_cached(m->wbuf, &m->wbuf_of, p->data16, p->numel);
}

/* an embedding table in the table's memory, as embedding_forward takes it:
 * fp32 (*f) or fp16 (*h), the other NULL. The gather widens only the rows
 * it reads, not the 49408 x 768 table. */
static void emb_table(const clip_t *m, const clip_param *p, const float **f, const uint16_t **h) {
    *f = NULL; *h = NULL;
    if (p->data) *f = ON_DEVICE(m) ? m->dparams + (p->data - m->params) : p->data;
    else *h = ON_DEVICE(m) ? m->dparams16 + (p->data16 - m->params16) : p->data16;
}

/* backward of one projection: dinp += (may be NULL), the adapter's dA, dB +=,
 * and with full grads dW += dout^T inp, db += sum_n dout (W0 sees the
 * undropped input: dropout is on the adapter's branch only) */
static void proj_backward(clip_t *m, float *dinp, const float *dout, const float *inp, const float *ax,
                          const uint8_t *mask, float *scratch, const clip_param *w, const float *b, lora_t *L,
                          int N, int in, int out) {
    const float *w32 = weight_f32(m, w);
    if (m->grads) OPS->linear_backward(NULL, grad_of_param(m, w), grad_of(m, b), dout, inp, w32, N, in, out);
    OPS->lora_backward(dinp, dout, inp, ax, mask, scratch, w32, L, N, in, out);
}

int clip_num_adapters(const clip_t *m) { return m->nadapters; }

clip_adapter *clip_adapter_at(clip_t *m, int i) {
    return i >= 0 && i < m->nadapters ? &m->adapters[i] : NULL;
}

/* The adapters of layer l as this pass runs them (dropout off unless the
 * last forward was a training one), into run[]: ad[p] = &run[p], or NULL
 * for a plain linear when there is no LoRA. */
static void layer_adapters(const clip_t *m, int l, lora_t run[CLIP_NPROJ], lora_t *ad[CLIP_NPROJ]) {
    for (int p = 0; p < CLIP_NPROJ; p++) {
        ad[p] = NULL;
        if (!m->adapters) continue;
        run[p] = m->adapters[l * CLIP_NPROJ + p].L;
        if (!m->dropout_on) run[p].dropout = 0.0f;
        if (ON_DEVICE(m)) {
            /* A and B: the device's copies, at the same offsets */
            run[p].A = m->dlora_params + (run[p].A - m->lora_params);
            run[p].B = m->dlora_params + (run[p].B - m->lora_params);
            run[p].dA = run[p].dA ? m->dlora_grads + (run[p].dA - m->lora_grads) : NULL;
            run[p].dB = run[p].dB ? m->dlora_grads + (run[p].dB - m->lora_grads) : NULL;
        }
        ad[p] = &run[p];
    }
}

/* ---------------------------------------------------------------------------
 * the activation layout
 *
 * clip_layout gives every tensor a forward over (B, T) keeps, and the
 * backward's workspace, an offset into m->acts (arena.h), in module order.
 * Offsets, not pointers: the CPU allocates the plan's peak once (and again
 * only when a forward needs more), and a CUDA backend can allocate the same
 * number of floats once on its device and use the same offsets. Every layer
 * run keeps everything (the backward reads it); CLIP is small beside the
 * UNet, so there is no inference-only layout. */

static float *at(const clip_t *m, size_t off) { return arena_at(&m->acts, off); }

/* the layout of a forward over (B, T) that runs nrun layers: dropout masks
 * when m->dropout_on, the backward's workspace when anything trains */
static void clip_layout(clip_t *m, int B, int T, int nrun, arena_plan *p) {
    const clip_config *c = &m->config;
    struct clip_layout *o = m->layout;
    size_t N = (size_t)B * T, C = c->hidden_size, F = c->intermediate_size;
    size_t r = m->adapters ? (size_t)m->adapters[0].L.r : 0;
    o->ids = arena_take(p, N);         /* an int is a float's size */
    for (int l = 0; l < nrun; l++) {
        layer_offsets *a = &o->layer[l];
        a->res = arena_take(p, N * C);
        a->ln1 = arena_take(p, N * C);
        /* the small vectors in one piece each: one alignment pad, not six */
        a->ln1_mean = arena_take(p, 4 * N);
        a->ln1_rstd = a->ln1_mean + N; a->ln2_mean = a->ln1_mean + 2 * N; a->ln2_rstd = a->ln1_mean + 3 * N;
        a->q = arena_take(p, N * C);
        a->k = arena_take(p, N * C);
        a->v = arena_take(p, N * C);
        a->att = arena_take(p, (size_t)B * c->num_heads * T * T);
        a->atty = arena_take(p, N * C);
        a->res2 = arena_take(p, N * C);
        a->ln2 = arena_take(p, N * C);
        a->h = arena_take(p, N * F);
        a->ha = arena_take(p, N * F);
        size_t ax = arena_take(p, CLIP_NPROJ * N * r);
        for (int i = 0; i < CLIP_NPROJ; i++) {
            int in, out;
            proj_dims(c, i, &in, &out);
            a->ax[i] = ax + i * N * r;
            /* bytes, in floats of their own */
            a->mask[i] = m->dropout_on ? arena_take(p, (N * in + sizeof(float) - 1) / sizeof(float)) : 0;
        }
    }
    o->x_final = arena_take(p, N * C);
    o->out = ON_DEVICE(m) ? arena_take(p, N * C) : 0;   /* a device's: out before it comes down */
    o->lnf_mean = arena_take(p, 2 * N); o->lnf_rstd = o->lnf_mean + N;
    /* the adapters' scratch, forward and backward: N r, and N in with dropout */
    size_t scratch = 0;
    if (m->adapters) {
        lora_t run[CLIP_NPROJ], *ad[CLIP_NPROJ];
        layer_adapters(m, 0, run, ad);
        for (int i = 0; i < CLIP_NPROJ; i++) {
            size_t s = lora_scratch_floats(ad[i], (int)N);
            if (s > scratch) scratch = s;
        }
    }
    o->lora_scratch = arena_take(p, scratch);
    /* backward's workspace, when there is something to train */
    o->backward = m->adapters || m->grads;
    if (o->backward) {
        o->dres = arena_take(p, N * C);
        o->dln = arena_take(p, N * C);
        o->datty = arena_take(p, N * C);
        o->dq = arena_take(p, N * C);
        o->dk = arena_take(p, N * C);
        o->dv = arena_take(p, N * C);
        o->dh = arena_take(p, N * F);
        o->dha = arena_take(p, N * F);
    }
}

/* ---------------------------------------------------------------------------
 * the device (backend.h) */

/* the table's first error (a failed copy, or one a kernel left) as m->err */
static int device_error(clip_t *m) {
    const char *e = m->ops->error();
    if (e && strncmp(e, "error: ", 7) == 0) e += 7;
    snprintf(m->err, sizeof m->err, "clip: %s: %s", m->ops->name, e ? e : "a copy failed");
    return -1;
}
/* the same only when a kernel left an error: -1, else 0 */
static int device_failed(clip_t *m) {
    const char *e = m->ops->error();
    if (!e) return 0;
    if (strncmp(e, "error: ", 7) == 0) e += 7;
    snprintf(m->err, sizeof m->err, "clip: %s: %s", m->ops->name, e);
    return -1;
}

float *clip_device_out(clip_t *m) {
    return ON_DEVICE(m) && m->nrun ? at(m, m->layout->out) : NULL;
}

int clip_to_device(clip_t *m, const nn_ops *ops) {
    if (!ops->device) { snprintf(m->err, sizeof m->err, "clip: %s is not a device table", ops->name); return -1; }
    if (m->ops) { snprintf(m->err, sizeof m->err, "clip: already on %s", m->ops->name); return -1; }
    if (m->grads) {
        snprintf(m->err, sizeof m->err, "clip: full fine-tuning does not run on %s (use --device cpu)", ops->name);
        return -1;
    }
    int f16 = m->params16 != NULL;
    size_t nvec = f16 ? m->num_params - m->nmat : m->num_params, big = 1;
    for (int i = 0; f16 && i < m->ntable; i++)
        if (m->table[i].data16 && m->table[i].numel > big) big = m->table[i].numel;
    size_t nl = m->num_lora_params;
    float *d = ops->alloc(sizeof(float) * (nvec ? nvec : 1));
    uint16_t *d16 = f16 ? ops->alloc(sizeof(uint16_t) * (m->nmat ? m->nmat : 1)) : NULL;
    float *wb = f16 ? ops->alloc(sizeof(float) * big) : NULL;
    float *dl = nl ? ops->alloc(sizeof(float) * nl) : NULL;
    float *dg = nl ? ops->alloc(sizeof(float) * nl) : NULL;   /* dA, dB: --te trains there */
    if (!d || (f16 && (!d16 || !wb)) || (nl && (!dl || !dg)) || !ops->upload(d, m->params, sizeof(float) * nvec) ||
        (f16 && !ops->upload(d16, m->params16, sizeof(uint16_t) * m->nmat)) ||
        (nl && (!ops->upload(dl, m->lora_params, sizeof(float) * nl) ||
                !ops->upload(dg, m->lora_grads, sizeof(float) * nl)))) {
        const char *e = ops->error();
        if (e && strncmp(e, "error: ", 7) == 0) e += 7;
        snprintf(m->err, sizeof m->err, "clip: cannot copy %.1f MiB of weights to %s: %s",
                 (double)(nvec * 4 + nl * 8 + (f16 ? m->nmat * 2 + big * 4 : 0)) / 1048576.0, ops->name,
                 e ? e : "out of memory");
        if (d) ops->free(d);
        if (d16) ops->free(d16);
        if (wb) ops->free(wb);
        if (dl) ops->free(dl);
        if (dg) ops->free(dg);
        return -1;
    }
    arena_free(&m->acts);       /* a host block, if any: the device gets its own */
    m->nrun = 0;
    m->ops = ops;
    m->dparams = d;
    m->dparams16 = d16;
    m->dwbuf = wb;
    m->dwbuf_of = NULL;
    m->dlora_params = dl;
    m->dlora_grads = dg;
    return 0;
}

/* ---------------------------------------------------------------------------
 * forward */

int clip_forward(clip_t *m, float *out, const int *ids, int B, int T, int clip_skip) {
    const clip_config *c = &m->config;
    int C = c->hidden_size, F = c->intermediate_size, H = c->num_heads, Dh = C / H;
    m->B = m->T = m->nrun = 0;   /* nothing valid for backward until we finish */
    if (B < 1 || T < 1 || T > c->max_pos) {
        snprintf(m->err, sizeof m->err, "clip: bad shape B=%d T=%d (need B >= 1, 1 <= T <= %d)", B, T, c->max_pos);
        return -1;
    }
    if (clip_skip < 1 || clip_skip > c->num_layers) {
        snprintf(m->err, sizeof m->err, "clip: clip_skip %d out of range (1 = last layer .. %d)",
                 clip_skip, c->num_layers);
        return -1;
    }
    for (size_t i = 0; i < (size_t)B * T; i++) {
        if (ids[i] < 0 || ids[i] >= c->vocab_size) {
            snprintf(m->err, sizeof m->err, "clip: token id %d at position %zu outside the vocabulary [0, %d) "
                     "(tokenizer and text encoder do not match)", ids[i], i, c->vocab_size);
            return -1;
        }
    }
    int nrun = c->num_layers - clip_skip + 1;
    int dev = ON_DEVICE(m);
    if (!out && !dev) { snprintf(m->err, sizeof m->err, "clip: out NULL is for a model on a device"); return -1; }
    m->dropout_on = m->training && m->adapters && m->adapters[0].L.dropout > 0.0f;
    arena_plan plan = { 0, 0 };
    clip_layout(m, B, T, nrun, &plan);
    if (plan.peak > m->acts.nfloats) {
        int fail;
        if (dev) {
            /* the same plan, one allocation in the device's memory */
            if (m->acts.base) m->ops->free(m->acts.base);
            m->acts.base = m->ops->alloc(sizeof(float) * plan.peak);
            m->acts.nfloats = m->acts.base ? plan.peak : 0;
            fail = m->acts.base == NULL;
        } else {
            fail = arena_alloc(&m->acts, &plan) != 0;
        }
        if (fail) {
            snprintf(m->err, sizeof m->err, "clip: out of %s memory for activations (B=%d, T=%d)",
                     dev ? m->ops->name : "host", B, T);
            return -1;
        }
    }
    const struct clip_layout *o = m->layout;
    size_t N = (size_t)B * T;
    /* the ids into table memory (the gather reads them there; backward's
     * token-embedding gradient, on the host, reads them too) */
    if (dev) {
        if (!m->ops->upload(at(m, o->ids), ids, sizeof(int) * N)) return device_error(m);
    } else {
        memcpy(at(m, o->ids), ids, sizeof(int) * N);
    }
    m->B = B; m->T = T;
    float *lora_scratch = at(m, o->lora_scratch);

    /* x_0[b, t] = token_embedding[ids[b, t]] + position_embedding[t] */
    const float *tok, *pos;
    const uint16_t *tok16, *pos16;
    emb_table(m, m->tok_emb, &tok, &tok16);
    emb_table(m, m->pos_emb, &pos, &pos16);
    OPS->embedding_forward(at(m, o->layer[0].res), (const int *)at(m, o->ids), tok, tok16, pos, pos16, B, T, C);

    for (int l = 0; l < nrun; l++) {
        const clip_layer *P = &m->layers[l];
        const layer_offsets *a = &o->layer[l];
        lora_t run[CLIP_NPROJ], *ad[CLIP_NPROJ];
        layer_adapters(m, l, run, ad);
        float *x = at(m, a->res), *ln1 = at(m, a->ln1), *q = at(m, a->q), *k = at(m, a->k), *v = at(m, a->v);
        float *atty = at(m, a->atty), *res2 = at(m, a->res2), *ln2 = at(m, a->ln2);
        float *h = at(m, a->h), *ha = at(m, a->ha);
        float *xnext = at(m, l + 1 < nrun ? o->layer[l + 1].res : o->x_final);
        uint8_t *mask[CLIP_NPROJ];
        for (int i = 0; i < CLIP_NPROJ; i++) mask[i] = m->dropout_on ? (uint8_t *)at(m, a->mask[i]) : NULL;
        /* attention branch: x' = x + out_proj(attn(q, k, v)),  q = q_proj(ln1(x)) etc. */
        OPS->layernorm_forward(ln1, at(m, a->ln1_mean), at(m, a->ln1_rstd), x, PV(m, P->ln1_w), PV(m, P->ln1_b), (int)N, C, c->layer_norm_eps);
        OPS->lora_forward(q, at(m, a->ax[CLIP_Q]), mask[CLIP_Q], lora_scratch, ln1, weight_f32(m, P->q_w), PV(m, P->q_b), ad[CLIP_Q], (int)N, C, C, &m->rng);
        OPS->lora_forward(k, at(m, a->ax[CLIP_K]), mask[CLIP_K], lora_scratch, ln1, weight_f32(m, P->k_w), PV(m, P->k_b), ad[CLIP_K], (int)N, C, C, &m->rng);
        OPS->lora_forward(v, at(m, a->ax[CLIP_V]), mask[CLIP_V], lora_scratch, ln1, weight_f32(m, P->v_w), PV(m, P->v_b), ad[CLIP_V], (int)N, C, C, &m->rng);
        /* causal: token t sees tokens 0..t only (CLIP was trained left to right) */
        OPS->attention_forward(atty, at(m, a->att), q, k, v, B, T, T, H, Dh, 1);
        OPS->lora_forward(res2, at(m, a->ax[CLIP_O]), mask[CLIP_O], lora_scratch, atty, weight_f32(m, P->o_w), PV(m, P->o_b), ad[CLIP_O], (int)N, C, C, &m->rng);
        OPS->accumulate(res2, x, N * C);
        /* MLP branch: x_{l+1} = x' + fc2(act(fc1(ln2(x')))) */
        OPS->layernorm_forward(ln2, at(m, a->ln2_mean), at(m, a->ln2_rstd), res2, PV(m, P->ln2_w), PV(m, P->ln2_b), (int)N, C, c->layer_norm_eps);
        OPS->lora_forward(h, at(m, a->ax[CLIP_FC1]), mask[CLIP_FC1], lora_scratch, ln2, weight_f32(m, P->fc1_w), PV(m, P->fc1_b), ad[CLIP_FC1], (int)N, C, F, &m->rng);
        if (c->act == CLIP_ACT_GELU) OPS->gelu_forward(ha, h, N * F);
        else OPS->quickgelu_forward(ha, h, N * F);
        OPS->lora_forward(xnext, at(m, a->ax[CLIP_FC2]), mask[CLIP_FC2], lora_scratch, ha, weight_f32(m, P->fc2_w), PV(m, P->fc2_b), ad[CLIP_FC2], (int)N, F, C, &m->rng);
        OPS->accumulate(xnext, res2, N * C);
    }
    /* A1111 and diffusers apply the final layer norm to the skipped-to layer too */
    OPS->layernorm_forward(dev ? at(m, o->out) : out, at(m, o->lnf_mean), at(m, o->lnf_rstd), at(m, o->x_final),
                           PV(m, m->lnf_w), PV(m, m->lnf_b),
                           (int)N, C, c->layer_norm_eps);
    if (dev && out && !m->ops->download(out, at(m, o->out), sizeof(float) * N * C)) return device_error(m);
    if (dev && device_failed(m)) return -1;
    m->nrun = nrun;
    return 0;
}

/* ---------------------------------------------------------------------------
 * backward: LoRA gradients, and every weight's with full grads */

int clip_backward(clip_t *m, const float *dout) {
    const clip_config *c = &m->config;
    int C = c->hidden_size, F = c->intermediate_size, H = c->num_heads, Dh = C / H;
    int B = m->B, T = m->T;
    if (!m->adapters && !m->grads) {
        snprintf(m->err, sizeof m->err, "clip: backward without LoRA or weight gradients (nothing trains; "
                 "call clip_add_lora or clip_alloc_grads)");
        return -1;
    }
    const struct clip_layout *o = m->layout;
    if (m->nrun == 0 || B == 0 || !o->backward) {
        snprintf(m->err, sizeof m->err, "clip: backward without a successful forward");
        return -1;
    }
    size_t N = (size_t)B * T;
    float *dres = at(m, o->dres), *dln = at(m, o->dln), *datty = at(m, o->datty);
    float *dq = at(m, o->dq), *dk = at(m, o->dk), *dv = at(m, o->dv);
    float *dh = at(m, o->dh), *dha = at(m, o->dha);
    float *lora_scratch = at(m, o->lora_scratch);
    size_t nC = N * C, nF = N * F;

    /* through final_layer_norm (frozen unless full grads: grad_of gives NULL) */
    OPS->zero(dres, nC);
    OPS->layernorm_backward(dres, grad_of(m, m->lnf_w), grad_of(m, m->lnf_b), dout, at(m, o->x_final),
                            PV(m, m->lnf_w), at(m, o->lnf_mean), at(m, o->lnf_rstd), (int)N, C);
    for (int l = m->nrun - 1; l >= 0; l--) {
        const clip_layer *P = &m->layers[l];
        const layer_offsets *a = &o->layer[l];
        lora_t run[CLIP_NPROJ], *ad[CLIP_NPROJ];
        layer_adapters(m, l, run, ad);
        const float *ax[CLIP_NPROJ];
        const uint8_t *mask[CLIP_NPROJ];
        for (int i = 0; i < CLIP_NPROJ; i++) {
            ax[i] = at(m, a->ax[i]);
            mask[i] = m->dropout_on ? (const uint8_t *)at(m, a->mask[i]) : NULL;
        }
        const float *ln1 = at(m, a->ln1);
        /* dres holds dL/dx_{l+1}. MLP branch; the residual passes dres through unchanged */
        OPS->zero(dha, nF);
        proj_backward(m, dha, dres, at(m, a->ha), ax[CLIP_FC2], mask[CLIP_FC2], lora_scratch, P->fc2_w, P->fc2_b,
                      ad[CLIP_FC2], (int)N, F, C);
        OPS->zero(dh, nF);
        if (c->act == CLIP_ACT_GELU) OPS->gelu_backward(dh, dha, at(m, a->h), N * F);
        else OPS->quickgelu_backward(dh, dha, at(m, a->h), N * F);
        OPS->zero(dln, nC);
        proj_backward(m, dln, dh, at(m, a->ln2), ax[CLIP_FC1], mask[CLIP_FC1], lora_scratch, P->fc1_w, P->fc1_b,
                      ad[CLIP_FC1], (int)N, C, F);
        /* dL/dx' = dL/dx_{l+1} + ln2 backward */
        OPS->layernorm_backward(dres, grad_of(m, P->ln2_w), grad_of(m, P->ln2_b), dln, at(m, a->res2),
                                PV(m, P->ln2_w), at(m, a->ln2_mean), at(m, a->ln2_rstd), (int)N, C);
        /* attention branch */
        OPS->zero(datty, nC);
        proj_backward(m, datty, dres, at(m, a->atty), ax[CLIP_O], mask[CLIP_O], lora_scratch, P->o_w, P->o_b,
                      ad[CLIP_O], (int)N, C, C);
        OPS->zero(dq, nC); OPS->zero(dk, nC); OPS->zero(dv, nC);
        OPS->attention_backward(dq, dk, dv, datty, at(m, a->q), at(m, a->k), at(m, a->v), at(m, a->att),
                           B, T, T, H, Dh, 1);
        /* the first layer's input gradient reaches only the embeddings: skip
         * it when they are frozen (lora_backward with dinp NULL still gives dA, dB) */
        float *dx = l > 0 || m->grads ? dln : NULL;
        if (dx) OPS->zero(dln, nC);
        proj_backward(m, dx, dq, ln1, ax[CLIP_Q], mask[CLIP_Q], lora_scratch, P->q_w, P->q_b, ad[CLIP_Q], (int)N, C, C);
        proj_backward(m, dx, dk, ln1, ax[CLIP_K], mask[CLIP_K], lora_scratch, P->k_w, P->k_b, ad[CLIP_K], (int)N, C, C);
        proj_backward(m, dx, dv, ln1, ax[CLIP_V], mask[CLIP_V], lora_scratch, P->v_w, P->v_b, ad[CLIP_V], (int)N, C, C);
        /* dL/dx_l = dL/dx' + ln1 backward */
        if (dx)
            OPS->layernorm_backward(dres, grad_of(m, P->ln1_w), grad_of(m, P->ln1_b), dln, at(m, a->res),
                                    PV(m, P->ln1_w), at(m, a->ln1_mean), at(m, a->ln1_rstd), (int)N, C);
    }
    if (m->grads) {
        /* x_0[b, t] = tok[ids[b, t]] + pos[t]:
         *   dtok[ids[b, t]] += dx_0[b, t],  dpos[t] += dx_0[b, t]
         * (a repeated id, as the eos padding, sums its rows; serial, so in order) */
        float *dtok = grad_of_param(m, m->tok_emb), *dpos = grad_of_param(m, m->pos_emb);
        const int *ids = (const int *)at(m, o->ids);
        for (int b = 0; b < B; b++)
            for (int t = 0; t < T; t++) {
                const float *d = dres + ((size_t)b * T + t) * C;
                float *dt = dtok + (size_t)ids[b * T + t] * C, *dp = dpos + (size_t)t * C;
                for (int i = 0; i < C; i++) { dt[i] += d[i]; dp[i] += d[i]; }
            }
    }
    return ON_DEVICE(m) ? device_failed(m) : 0;
}

/* ---------------------------------------------------------------------------
 * pooled output */

void clip_pooled(const clip_t *m, float *pooled, const float *hidden, const int *ids, int B, int T) {
    int C = m->config.hidden_size, eos = m->config.eos_token_id;
    for (int b = 0; b < B; b++) {
        const int *row = ids + (size_t)b * T;
        int pos = 0;
        if (eos == 2) {
            /* old configs: the end-of-text token is the largest id (first if tied) */
            for (int t = 1; t < T; t++) if (row[t] > row[pos]) pos = t;
        } else {
            /* the first eos (the padding may be eos too); position 0 if none, as argmax of all-zero */
            for (int t = 0; t < T; t++) if (row[t] == eos) { pos = t; break; }
        }
        memcpy(pooled + (size_t)b * C, hidden + ((size_t)b * T + pos) * C, sizeof(float) * C);
    }
}

/* lora.c: the LoRA layer, the formula at the centre of the article.
 *
 * Article 2.2 / 4.1 write the adapted weight as
 *
 *     W = W0 + (alpha / r) * B A            W0: out x in (frozen)
 *                                            B : out x r  ("lora_up", starts at 0)
 *                                            A : r x in   ("lora_down", random)
 *
 * and the layer never forms W: it computes y = W0 x + b + (alpha/r) B (A x),
 * which costs r * (in + out) multiply-adds per token on top of the frozen
 * layer instead of in * out. (The article's 4.1 writes A B^T with A: d x r,
 * B: k x r, and its 2.2 writes A: d x r, B: r x k with Delta W = A B; those
 * are the same product with the letters swapped. Here A and B follow the
 * LoRA paper and peft: A projects down, B projects up, B = 0 at the start.)
 *
 * Names: kohya files call A "lora_down" and B "lora_up"; peft calls them
 * lora_A and lora_B. The tensors are the same, so they load unchanged. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "lora.h"
#include "profile.h"

void lora_init(lora_t *L, int in, int out, int r, float alpha, float dropout,
               float *A, float *B, int gaussian, rng_t *rng) {
    L->in = in; L->out = out; L->r = r;
    L->alpha = alpha;
    L->scale = alpha / (float)r;
    L->dropout = dropout;
    L->A = A; L->B = B;
    L->dA = NULL; L->dB = NULL;
    L->k = 0;
    /* Kaiming-uniform with a = sqrt(5) (torch's default for nn.Linear, used
     * by peft and kohya for lora_down):
     *   gain = sqrt(2 / (1 + a^2)) = sqrt(1/3),  bound = gain * sqrt(3 / fan_in) = 1 / sqrt(in)
     * peft's "gaussian" option: N(0, (1/r)^2). */
    float bound = 1.0f / sqrtf((float)in);
    for (size_t i = 0; i < (size_t)r * in; i++)
        A[i] = gaussian ? rng_normal(rng) / (float)r : (2.0f * rng_uniform(rng) - 1.0f) * bound;
    /* B = 0: at step 0 the adapted model is exactly the base model */
    memset(B, 0, sizeof(float) * (size_t)out * r);
}

size_t lora_num_params(const lora_t *L) {
    /* A is r x in, B is out x r (article 2.2 counts this as 2rdk, which is
     * wrong: it is r(d + k); see NOTES.md) */
    return (size_t)L->r * (lora_fan_in(L) + (size_t)L->out);
}

void lora_conv_init(lora_t *L, int in, int out, int k, int r, float alpha, float dropout,
                    float *A, float *B, rng_t *rng) {
    /* A viewed as r x (in k k): the Kaiming bound 1 / sqrt(in k k) is torch's
     * for a conv weight (fan_in = in * kh * kw), which kohya's lora_down uses */
    lora_init(L, in * k * k, out, r, alpha, dropout, A, B, 0, rng);
    L->in = in;
    L->k = k > 1 ? k : 0;
}

/* x_d = dropout(x): peft applies dropout to the input of the LoRA branch only;
 * the frozen path sees the clean x. Returns x itself when there is no dropout,
 * else the masked copy in scratch storage the caller provides. */
static const float *branch_input(float *buf, uint8_t *mask, const float *inp, size_t n,
                                 const lora_t *L, rng_t *rng) {
    if (L->dropout <= 0.0f) return inp;
    dropout_forward(buf, mask, inp, n, L->dropout, rng);
    return buf;
}

size_t lora_scratch_floats(const lora_t *L, int N) {
    if (!L) return 0;
    /* g = dout B (N x r), and x_d (N x in) when there is dropout */
    return (size_t)N * L->r + (L->dropout > 0.0f ? (size_t)N * L->in : 0);
}

/* the caller's arena must hold the scratch: a missing one is a bug in the
 * caller's layout, never bad input, and never a silently skipped gradient */
static void need_scratch(const float *scratch, const char *fn) {
    if (!scratch) {
        fprintf(stderr, "%s: internal error: no scratch memory (lora_scratch_floats)\n", fn);
        abort();
    }
}

void lora_forward(float *out, float *ax, uint8_t *mask, float *scratch, const float *inp,
                  const float *w0, const float *b0, const lora_t *L,
                  int N, int in, int outc, rng_t *rng) {
    /* frozen path: out = x W0^T + b */
    linear_forward(out, inp, w0, b0, N, in, outc);
    if (!L) return;
    if (L->dropout > 0.0f) need_scratch(scratch, "lora_forward");
    double t0 = prof_begin();
    /* ASSIGNMENT 01 BEGIN: the LoRA branch, ax = x_d A^T, out += (alpha/r) ax B^T */
    /* ASSIGNMENT 01 STUB: (void)branch_input; */
    int r = L->r;
    const float *x = branch_input(scratch, mask, inp, (size_t)N * in, L, rng);
    /* ax (N x r) = x_d A^T                  (down-projection to rank r) */
    gemm(0, 1, N, r, in, 1.0f, x, in, L->A, in, 0.0f, ax, r);
    /* out += (alpha/r) * ax B^T             (up-projection, scaled) */
    gemm(0, 1, N, outc, r, L->scale, ax, r, L->B, r, 1.0f, out, outc);
    /* ASSIGNMENT 01 END */
    prof_end(PROF_LORA, 0, t0, 2.0 * N * L->r * (in + outc));
}

void lora_backward(float *dinp, const float *dout, const float *inp, const float *ax,
                   const uint8_t *mask, float *scratch, const float *w0, lora_t *L,
                   int N, int in, int outc) {
    /* frozen path: dx += dout W0; no dW0, no db (NULL = frozen, no work) */
    if (dinp) linear_backward(dinp, NULL, NULL, dout, inp, w0, N, in, outc);
    if (!L) return;
    need_scratch(scratch, "lora_backward");
    double t0 = prof_begin();
    /* ASSIGNMENT 01 BEGIN: dB += s dout^T ax, dA += s (dout B)^T x_d, dinp += s (dout B) A through the mask */
    int r = L->r;
    float s = L->scale;
    float *g = scratch;                      /* N x r */
    float *xd = scratch + (size_t)N * r;     /* N x in, with dropout */
    /* g (N x r) = dout B: the gradient reaching the rank-r bottleneck, over s */
    gemm(0, 0, N, r, outc, 1.0f, dout, outc, L->B, r, 0.0f, g, r);
    /* dB += s * dout^T ax                   (out x r) */
    if (L->dB) gemm(1, 0, outc, r, N, s, dout, outc, ax, r, 1.0f, L->dB, r);
    /* dA += s * g^T x_d                     (r x in) */
    if (L->dA) {
        const float *x = inp;
        if (L->dropout > 0.0f) {
            /* rebuild x_d = x * mask / (1 - p) from the saved mask */
            float keep = 1.0f / (1.0f - L->dropout);
            for (size_t i = 0; i < (size_t)N * in; i++) xd[i] = mask[i] ? inp[i] * keep : 0.0f;
            x = xd;
        }
        gemm(1, 0, r, in, N, s, g, r, x, in, 1.0f, L->dA, in);
    }
    /* dx += s * g A, through the dropout mask (d x_d / dx = mask / (1-p)):
     * with dropout, s g A goes to the x_d buffer first (done with above) */
    if (dinp) {
        if (L->dropout > 0.0f) {
            gemm(0, 0, N, in, r, s, g, r, L->A, in, 0.0f, xd, in);
            dropout_backward(dinp, xd, mask, (size_t)N * in, L->dropout);
        } else {
            gemm(0, 0, N, in, r, s, g, r, L->A, in, 1.0f, dinp, in);
        }
    }
    /* ASSIGNMENT 01 END */
    prof_end(PROF_LORA, 1, t0, 2.0 * N * L->r * (outc + (L->dB != NULL) * outc + (L->dA != NULL) * in +
                                                (dinp != NULL) * in));
}

/* ------------------------------------------------------------- conv LoRA */
/* LoCon (kohya's conv_dim): the adapter of a k x k convolution W0 is itself
 * a k x k convolution down to r channels followed by a 1x1 one back up:
 *
 *     y = conv(x, W0) + b + (alpha/r) * conv1x1(conv(dropout(x), A), B)
 *
 *   A (r, in, k, k): "lora_down", with W0's stride and padding
 *   B (out, r, 1, 1): "lora_up", zero at the start
 * Because B is pointwise this is the convolution with kernel W0 + s B A
 * (lora_merge), and on 1x1 pixels with k = 1 it is the linear LoRA. */
static int conv_k(const lora_t *L) { return L->k > 1 ? L->k : 1; }

size_t lora_conv_scratch_floats(const lora_t *L, int Bn, int H, int W, int stride, int pad, int backward) {
    if (!L) return 0;
    int k = conv_k(L), Ho = (H + 2 * pad - k) / stride + 1, Wo = (W + 2 * pad - k) / stride + 1;
    size_t nx = L->dropout > 0.0f ? (size_t)Bn * L->in * H * W : 0;
    /* forward: x_d; backward: g (Bn, r, Ho, Wo) and x_d */
    return nx + (backward ? (size_t)Bn * L->r * Ho * Wo : 0);
}

void lora_conv_forward(float *out, float *ax, uint8_t *mask, float *scratch, const float *inp,
                       const lora_t *L, int Bn, int H, int W, int stride, int pad, rng_t *rng) {
    if (!L) return;
    if (L->dropout > 0.0f) need_scratch(scratch, "lora_conv_forward");
    double t0 = prof_begin();
    int k = conv_k(L), r = L->r, Ho = (H + 2 * pad - k) / stride + 1, Wo = (W + 2 * pad - k) / stride + 1;
    int P = Ho * Wo;
    const float *x = branch_input(scratch, mask, inp, (size_t)Bn * L->in * H * W, L, rng);
    /* ax (Bn, r, Ho, Wo) = conv(x_d, A)          (down, with W0's stride / padding) */
    conv2d_forward(ax, x, L->A, NULL, Bn, L->in, H, W, r, k, k, stride, pad);
    /* out_b (out x P) += s * B (out x r) ax_b (r x P)   (1x1 up, scaled) */
    for (int b = 0; b < Bn; b++)
        gemm(0, 0, L->out, P, r, L->scale, L->B, r, ax + (size_t)b * r * P, P, 1.0f,
             out + (size_t)b * L->out * P, P);
    prof_end(PROF_LORA, 0, t0, 2.0 * Bn * P * r * ((double)lora_fan_in(L) + L->out));
}

void lora_conv_backward(float *dinp, const float *dout, const float *inp, const float *ax,
                        const uint8_t *mask, float *scratch, lora_t *L,
                        int Bn, int H, int W, int stride, int pad) {
    if (!L) return;
    need_scratch(scratch, "lora_conv_backward");
    double t0 = prof_begin();
    int k = conv_k(L), r = L->r, Ho = (H + 2 * pad - k) / stride + 1, Wo = (W + 2 * pad - k) / stride + 1;
    int P = Ho * Wo, in = L->in, outc = L->out;
    size_t nx = (size_t)Bn * in * H * W;
    float s = L->scale;
    float *g = scratch;                          /* (Bn, r, Ho, Wo) */
    float *xd = scratch + (size_t)Bn * r * P;    /* (Bn, in, H, W), with dropout */
    for (int b = 0; b < Bn; b++) {
        const float *db = dout + (size_t)b * outc * P;
        /* g_b (r x P) = s * B^T dout_b: the gradient of ax, scale included */
        gemm(1, 0, r, P, outc, s, L->B, r, db, P, 0.0f, g + (size_t)b * r * P, P);
        /* dB (out x r) += s * dout_b (out x P) ax_b^T (P x r) */
        if (L->dB) gemm(0, 1, outc, r, P, s, db, P, ax + (size_t)b * r * P, P, 1.0f, L->dB, r);
    }
    const float *x = inp;
    if (L->dropout > 0.0f && (L->dA || dinp)) {
        /* x_d = x * mask / (1 - p), rebuilt from the saved mask */
        float keep = 1.0f / (1.0f - L->dropout);
        for (size_t i = 0; i < nx; i++) xd[i] = mask[i] ? inp[i] * keep : 0.0f;
        x = xd;
    }
    /* dA += conv_dW(g, x_d): the down conv's weight gradient */
    if (L->dA) conv2d_backward(NULL, L->dA, NULL, g, x, L->A, Bn, in, H, W, r, k, k, stride, pad);
    /* dx += conv_dX(g, A), through the mask (d x_d / dx = mask / (1-p)) */
    if (dinp) {
        if (L->dropout > 0.0f) {
            memset(xd, 0, sizeof(float) * nx);
            conv2d_backward(xd, NULL, NULL, g, xd, L->A, Bn, in, H, W, r, k, k, stride, pad);
            dropout_backward(dinp, xd, mask, nx, L->dropout);
        } else {
            conv2d_backward(dinp, NULL, NULL, g, inp, L->A, Bn, in, H, W, r, k, k, stride, pad);
        }
    }
    prof_end(PROF_LORA, 1, t0, 2.0 * Bn * P * r * (2.0 * outc + (L->dA != NULL) * (double)lora_fan_in(L) +
                                                 (dinp != NULL) * (double)lora_fan_in(L)));
}

/* Merge (article 2.2, "no inference latency"): W0 <- W0 + w * (alpha/r) B A.
 * Unmerge subtracts the same product; in float32 the round trip is exact to
 * rounding (one add and one subtract of the same numbers). */
void lora_merge(float *w0, const lora_t *L, float weight) {
    /* ASSIGNMENT 02 BEGIN: W0 += weight * (alpha/r) B A, in place (W0: out x in) */
    /* a k x k conv LoRA merges the same way: up is 1x1, so the merged kernel is
     * W0[o, c, i, j] += s sum_q B[o, q] A[q, c, i, j], the product over in k k columns */
    int K = (int)lora_fan_in(L);
    gemm(0, 0, L->out, K, L->r, weight * L->scale, L->B, L->r, L->A, K, 1.0f, w0, K);
    /* ASSIGNMENT 02 END */
}

void lora_unmerge(float *w0, const lora_t *L, float weight) {
    /* ASSIGNMENT 02 BEGIN: undo lora_merge(w0, L, weight) */
    lora_merge(w0, L, -weight);
    /* ASSIGNMENT 02 END */
}

/* ------------------------------------------------------------------ files */
#include <stdio.h>

void lora_kohya_name(char *out, size_t n, const char *prefix, const char *module) {
    snprintf(out, n, "%s_%s", prefix, module);
    for (char *p = out + strlen(prefix); *p; p++)
        if (*p == '.') *p = '_';
}

int lora_save_kohya(const char *path, const lora_ref *refs, int n, st_dtype dt,
                    const char **meta_keys, const char **meta_vals, int nmeta, char *err) {
    st_writer *w = st_writer_new();
    if (!w) { snprintf(err, ST_ERR_LEN, "%s: out of memory", path); return -1; }
    char key[320];
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        const lora_t *L = refs[i].L;
        /* kohya stores a 1x1-conv adapter as 1x1 convolutions: 4-D shapes */
        /* and a k x k conv LoRA (LoCon) as a k x k lora_down */
        int kk = L->k > 1 ? L->k : 1;
        int64_t sa[4] = {L->r, L->in, kk, kk}, sb[4] = {L->out, L->r, 1, 1};
        int nd = refs[i].conv ? 4 : 2;
        snprintf(key, sizeof key, "%s.lora_down.weight", refs[i].name);
        rc |= st_writer_add_f32(w, key, dt, nd, sa, L->A);
        snprintf(key, sizeof key, "%s.lora_up.weight", refs[i].name);
        rc |= st_writer_add_f32(w, key, dt, nd, sb, L->B);
        snprintf(key, sizeof key, "%s.alpha", refs[i].name);
        rc |= st_writer_add_f32(w, key, dt, 0, NULL, &L->alpha);
    }
    for (int i = 0; i < nmeta && rc == 0; i++) rc |= st_writer_meta(w, meta_keys[i], meta_vals[i]);
    /* kohya's save_weights adds the two hashes AUTOMATIC1111's LoRA card
     * shows (sd-webui-additional-networks' model hash and legacy hash),
     * computed over the file with only the ss_* metadata */
    char mh[65], lh[9];
    if (rc == 0) rc = st_writer_kohya_hashes(w, mh, lh);
    if (rc == 0) rc = st_writer_meta(w, "sshs_model_hash", mh) | st_writer_meta(w, "sshs_legacy_hash", lh);
    if (rc) { snprintf(err, ST_ERR_LEN, "%s: out of memory while collecting tensors", path); st_writer_free(w); return -1; }
    rc = st_writer_save(w, path, err);
    st_writer_free(w);
    return rc;
}

static int ends_with(const char *s, size_t n, const char *suf, size_t *stem) {
    size_t k = strlen(suf);
    if (n < k || memcmp(s + n - k, suf, k) != 0) return 0;
    *stem = n - k;
    return 1;
}

enum { ROLE_DOWN, ROLE_UP, ROLE_ALPHA };

/* Turn one tensor key into (kohya name, role). Returns 0, or -1 when the key
 * is not a LoRA key this loader knows. */
static int classify_key(const char *key, char *name, size_t nn, int *role) {
    size_t n = strlen(key), stem;
    /* kohya: lora_unet_* / lora_te_* / lora_te1_* */
    if (strncmp(key, "lora_unet_", 10) == 0 || strncmp(key, "lora_te_", 8) == 0 || strncmp(key, "lora_te1_", 9) == 0) {
        const char *dot = strchr(key, '.');
        if (!dot) return -1;
        const char *suf = dot + 1;
        if (strcmp(suf, "lora_down.weight") == 0) *role = ROLE_DOWN;
        else if (strcmp(suf, "lora_up.weight") == 0) *role = ROLE_UP;
        else if (strcmp(suf, "alpha") == 0) *role = ROLE_ALPHA;
        else return -1;
        size_t len = (size_t)(dot - key);
        /* SD1.x has one text encoder: lora_te1_ is lora_te_; and a name
         * without the "text_model" level (transformers 5) gets it back */
        const char *rest = key + (strncmp(key, "lora_te1_", 9) == 0 ? 9 : strncmp(key, "lora_te_", 8) == 0 ? 8 : 10);
        int rl = (int)(len - (size_t)(rest - key));
        int w;
        if (rest == key + 10) w = snprintf(name, nn, "lora_unet_%.*s", rl, rest);
        else if (strncmp(rest, "encoder_", 8) == 0) w = snprintf(name, nn, "lora_te_text_model_%.*s", rl, rest);
        else w = snprintf(name, nn, "lora_te_%.*s", rl, rest);
        return w < (int)nn ? 0 : -1;
    }
    /* diffusers / peft: [unet.|text_encoder.|base_model.model.]<module>.<suffix> */
    const char *m = key, *prefix = NULL;
    if (strncmp(m, "unet.", 5) == 0) { m += 5; prefix = "lora_unet"; }
    else if (strncmp(m, "text_encoder.", 13) == 0) { m += 13; prefix = "lora_te"; }
    else if (strncmp(m, "base_model.model.", 17) == 0) m += 17;
    if (!prefix) prefix = strncmp(m, "text_model.", 11) == 0 ? "lora_te" : "lora_unet";
    n = strlen(m);
    static const struct { const char *suf; int role; } sufs[] = {
        {".lora_A.weight", ROLE_DOWN}, {".lora_B.weight", ROLE_UP},
        {".lora_A.default.weight", ROLE_DOWN}, {".lora_B.default.weight", ROLE_UP},
        {".lora.down.weight", ROLE_DOWN}, {".lora.up.weight", ROLE_UP},
        {".lora_linear_layer.down.weight", ROLE_DOWN}, {".lora_linear_layer.up.weight", ROLE_UP},
        {"_lora.down.weight", ROLE_DOWN}, {"_lora.up.weight", ROLE_UP},
        {".alpha", ROLE_ALPHA},
    };
    for (size_t i = 0; i < sizeof sufs / sizeof sufs[0]; i++) {
        if (!ends_with(m, n, sufs[i].suf, &stem)) continue;
        *role = sufs[i].role;
        char mod[256];
        if (stem >= sizeof mod) return -1;
        memcpy(mod, m, stem); mod[stem] = '\0';
        if (sufs[i].suf[0] == '_') {
            /* old attention processors: "<attn>.processor.to_q_lora.down.weight"
             * (UNet) or "<self_attn>.to_q_lora.down.weight" (text encoder) */
            char *p = strstr(mod, ".processor.");
            char *last = strrchr(mod, '.');
            if (!last) return -1;
            const char *proj = last + 1;
            char base[240];
            size_t bl = (size_t)((p ? p : last) - mod);
            if (bl >= sizeof base) return -1;
            memcpy(base, mod, bl); base[bl] = '\0';
            int te = strcmp(prefix, "lora_te") == 0;
            const char *to;
            if (strcmp(proj, "to_q") == 0) to = te ? "q_proj" : "to_q";
            else if (strcmp(proj, "to_k") == 0) to = te ? "k_proj" : "to_k";
            else if (strcmp(proj, "to_v") == 0) to = te ? "v_proj" : "to_v";
            else if (strcmp(proj, "to_out") == 0) to = te ? "out_proj" : "to_out.0";
            else return -1;
            snprintf(mod, sizeof mod, "%s.%s", base, to);
        }
        /* transformers 5 saves CLIPTextModel without its "text_model." level;
         * SD1.x text-encoder LoRAs everywhere else name it */
        if (strcmp(prefix, "lora_te") == 0 && strncmp(mod, "encoder.", 8) == 0) {
            char tmp[256];
            if (snprintf(tmp, sizeof tmp, "text_model.%s", mod) >= (int)sizeof tmp) return -1;
            memcpy(mod, tmp, sizeof mod);
        }
        lora_kohya_name(name, nn, prefix, mod);
        return 0;
    }
    return -1;
}

void lora_file_free(lora_file *lf) {
    for (int i = 0; i < lf->n; i++) { free(lf->e[i].A); free(lf->e[i].B); }
    free(lf->e);
    lf->e = NULL; lf->n = 0;
}

const lora_entry *lora_file_find(const lora_file *lf, const char *kohya_name) {
    for (int i = 0; i < lf->n; i++)
        if (strcmp(lf->e[i].name, kohya_name) == 0) return &lf->e[i];
    return NULL;
}

/* alpha for peft files from diffusers' "lora_adapter_metadata" JSON
 * ({"unet.lora_alpha": 8, "unet.r": 4, ...}); NaN when absent */
#include "json.h"
static float peft_meta_alpha(const st_file *f, int te) {
    const char *s = st_meta(f, "lora_adapter_metadata");
    if (!s) return NAN;
    char jerr[256];
    json *j = json_parse(s, strlen(s), jerr, sizeof jerr);
    if (!j) return NAN;
    float a = (float)json_num(j, te ? "text_encoder.lora_alpha" : "unet.lora_alpha", NAN);
    json_free(j);
    return a;
}

/* a LoRA alpha: one number of any shape holding one element ([], [1], ..),
 * float or integer. diffusers' convert_state_dict_to_kohya writes int64;
 * BOOL is not a number. Bytes are little-endian and maybe unaligned. */
static int alpha_value(const st_tensor *t, float *a) {
    if (t->numel != 1) return -1;
    const uint8_t *p = t->data;
    uint64_t u = 0;
    size_t nb = st_dtype_size(t->dtype);
    for (size_t i = 0; i < nb && i < 8; i++) u |= (uint64_t)p[i] << (8 * i);
    switch (t->dtype) {
    case ST_I64: *a = (float)(int64_t)u; return 0;
    case ST_I32: *a = (float)(int32_t)(uint32_t)u; return 0;
    case ST_I16: *a = (float)(int16_t)(uint16_t)u; return 0;
    case ST_I8: *a = (float)(int8_t)(uint8_t)u; return 0;
    case ST_U8: *a = (float)u; return 0;
    case ST_BOOL: return -1;
    default: return st_to_f32(t, a, NULL);
    }
}

/* tensor names in messages come from the file: control bytes become '?' */
static void one_line(char *s) {
    for (; *s; s++) if ((unsigned char)*s < 0x20 || *s == 0x7f) *s = '?';
}

int lora_file_load(const char *path, lora_file *lf, char *err) {
    memset(lf, 0, sizeof *lf);
    st_file f;
    if (st_open(&f, path, err)) return -1;
    int peft = 0, cap = 0;
    lora_entry *e = NULL;
    int ne = 0;
    /* pass 1: group the keys by adapter */
    typedef struct { const st_tensor *down, *up, *alpha; } trio;
    trio *t = NULL;
    for (int i = 0; i < f.ntensors; i++) {
        const st_tensor *x = &f.tensors[i];
        char name[256]; int role;
        if (classify_key(x->name, name, sizeof name, &role)) {
            snprintf(err, ST_ERR_LEN, "%s: tensor '%s' is not a LoRA key sdlora knows (supported: kohya lora_down/lora_up/alpha and diffusers/peft lora_A/lora_B; LyCORIS, LoHa and DoRA are not)", path, x->name);
            goto fail;
        }
        if (strncmp(x->name, "lora_", 5) != 0) peft = 1;
        int k = 0;
        while (k < ne && strcmp(e[k].name, name) != 0) k++;
        if (k == ne) {
            if (ne == cap) {
                cap = cap ? 2 * cap : 64;
                lora_entry *ee = realloc(e, sizeof *e * cap);
                trio *tt = realloc(t, sizeof *t * cap);
                if (!ee || !tt) { free(ee ? ee : e); free(tt ? tt : t); e = NULL; t = NULL; ne = 0;
                    snprintf(err, ST_ERR_LEN, "%s: out of memory", path); goto fail; }
                e = ee; t = tt;
            }
            memset(&e[ne], 0, sizeof e[ne]);
            memset(&t[ne], 0, sizeof t[ne]);
            snprintf(e[ne].name, sizeof e[ne].name, "%s", name);
            ne++;
        }
        const st_tensor **slot = role == ROLE_DOWN ? &t[k].down : role == ROLE_UP ? &t[k].up : &t[k].alpha;
        if (*slot) {
            snprintf(err, ST_ERR_LEN, "%s: two tensors give the same LoRA weight ('%s' and '%s'); the file mixes formats (re-save it)", path, (*slot)->name, x->name);
            goto fail;
        }
        *slot = x;
    }
    lf->e = e; lf->n = ne;
    lf->format = peft ? "peft" : "kohya";
    /* pass 2: check shapes and convert */
    for (int k = 0; k < ne; k++) {
        lora_entry *en = &e[k];
        const st_tensor *d = t[k].down, *u = t[k].up;
        if (!d || !u) {
            snprintf(err, ST_ERR_LEN, "%s: adapter '%s' has no %s weight (the file is incomplete; re-save it)", path, en->name, d ? "up (lora_up / lora_B)" : "down (lora_down / lora_A)");
            goto fail_lf;
        }
        int conv = d->ndim == 4;
        /* LoCon: lora_down a square k x k conv, lora_up always 1x1 */
        if ((d->ndim != 2 && d->ndim != 4) || u->ndim != d->ndim ||
            (conv && (d->shape[2] != d->shape[3] || d->shape[2] < 1 || d->shape[2] > 15 ||
                      u->shape[2] != 1 || u->shape[3] != 1)) ||
            u->shape[1] != d->shape[0] || d->shape[0] < 1 || d->shape[1] < 1 || u->shape[0] < 1) {
            snprintf(err, ST_ERR_LEN, "%s: adapter '%s': down %s and up %s shapes do not fit a LoRA pair (expected (r, in) and (out, r), or (r, in, k, k) and (out, r, 1, 1) for a conv LoRA)",
                     path, en->name, d->name, u->name);
            goto fail_lf;
        }
        en->conv = conv;
        en->k = conv && d->shape[2] > 1 ? (int)d->shape[2] : 0;
        en->r = (int)d->shape[0]; en->in = (int)d->shape[1]; en->out = (int)u->shape[0];
        en->A = malloc(sizeof(float) * d->numel);
        en->B = malloc(sizeof(float) * u->numel);
        if (!en->A || !en->B) { snprintf(err, ST_ERR_LEN, "%s: out of memory", path); goto fail_lf; }
        if (st_to_f32(d, en->A, NULL) || st_to_f32(u, en->B, NULL)) {
            const st_tensor *bad = st_to_f32(d, en->A, NULL) ? d : u;
            snprintf(err, ST_ERR_LEN, "%s: '%s' has dtype %s, not a float type (LoRA weights are F32, F16, BF16 or F64; re-save it)",
                     path, bad->name, st_dtype_name(bad->dtype));
            goto fail_lf;
        }
        if (t[k].alpha) {
            const st_tensor *al = t[k].alpha;
            if (alpha_value(al, &en->alpha)) {
                char sh[160];
                size_t o = (size_t)snprintf(sh, sizeof sh, "[");
                for (int dd = 0; dd < al->ndim && o < sizeof sh; dd++)
                    o += (size_t)snprintf(sh + o, sizeof sh - o, "%s%lld", dd ? ", " : "", (long long)al->shape[dd]);
                if (o < sizeof sh) snprintf(sh + o, sizeof sh - o, "]");
                snprintf(err, ST_ERR_LEN, "%s: '%s' should be one number (the LoRA alpha) but is %s with shape %s "
                         "(save it as a float or integer scalar)", path, al->name, st_dtype_name(al->dtype), sh);
                goto fail_lf;
            }
        } else {
            /* kohya without alpha means alpha = r (scale 1); diffusers files
             * may carry it in lora_adapter_metadata */
            float a = peft ? peft_meta_alpha(&f, strncmp(en->name, "lora_te_", 8) == 0) : NAN;
            en->alpha = isnan(a) ? (float)en->r : a;
        }
        if (!isfinite(en->alpha)) {
            snprintf(err, ST_ERR_LEN, "%s: adapter '%s' has a non-finite alpha (the file is corrupt)", path, en->name);
            goto fail_lf;
        }
    }
    free(t);
    st_close(&f);
    return 0;
fail_lf:
    free(t);
    lora_file_free(lf);
    st_close(&f);
    one_line(err);
    return -1;
fail:
    for (int k = 0; k < ne; k++) { free(e[k].A); free(e[k].B); }
    free(e); free(t);
    st_close(&f);
    one_line(err);
    return -1;
}

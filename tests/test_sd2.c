/* test_sd2.c: SD2.x models. tests/fixtures/sd2_tiny.safetensors is a tiny
 * random SD2-architecture model in the LDM single-file layout (OpenCLIP text
 * tower with fused q/k/v and one resblock past the penultimate layer, UNet
 * with linear proj_in / proj_out and 64-wide heads), written and checked
 * against diffusers' own converters by tools/make_sd2_fixtures.py, which
 * also computed with diffusers what the model gives: the SD2 pipeline's
 * prompt embeddings, a UNet output and a v-prediction training loss. Here
 * the file is loaded as ./train and ./sample load it, must give the same
 * numbers, and both programs run on it end to end. */
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include "testutil.h"
#include "checkpoint.h"
#include "image.h"
#include "model.h"

#ifndef SDLORA_BUILD
#define SDLORA_BUILD "build"
#endif
#define SD2 FIXTURE_DIR "sd2_tiny.safetensors"
#define SD2_TOK FIXTURE_DIR "gen_tiny/tokenizer"

static void load(sd_model *m, const char *path, weight_dtype wd) {
    char err[SD_ERR_LEN];
    ck_assert_msg(sd_model_load_dtype(m, path, SD2_TOK, wd, err) == 0, "%s", err);
}

/* what the file is, read from its tensors alone */
START_TEST(test_sd2_arch) {
    st_file f; char err[ST_ERR_LEN];
    ck_assert_msg(st_open(&f, SD2, err) == 0, "%s", err);
    ck_assert_str_eq(ldm_detect(&f, err), "sd2");
    ldm_arch a;
    ck_assert_msg(ldm_infer_file(&f, &a, err) == 0, "%s", err);
    ck_assert(a.sd2 && a.clip.layout.openclip && a.clip.gelu);
    ck_assert_int_eq(a.clip.num_layers, 2);          /* 3 resblocks in the file: the penultimate rule */
    ck_assert_int_eq(a.clip.hidden_size, 32);
    ck_assert_int_eq(a.clip.intermediate_size, 64);
    ck_assert_int_eq(a.clip.vocab_size, 534);
    ck_assert_int_eq(a.clip.num_heads, 1);
    ck_assert_int_eq(a.unet.linear_proj, 1);
    ck_assert_int_eq(a.unet.cross_dim, 32);
    ck_assert_int_eq(a.unet.heads[0], 1);
    ck_assert_int_eq(a.unet.sample_size, 96);
    /* the names: q/k/v are row blocks of one fused tensor */
    char nm[LDM_NAME_LEN];
    ck_assert_int_eq(ldm_clip_name("text_model.encoder.layers.1.self_attn.k_proj.bias", &a.clip.layout, nm, sizeof nm),
                     LDM_SPLIT_K);
    ck_assert_str_eq(nm, "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_bias");
    ck_assert_int_eq(ldm_clip_name("encoder.layers.0.mlp.fc2.weight", &a.clip.layout, nm, sizeof nm), 0);
    ck_assert_str_eq(nm, "cond_stage_model.model.transformer.resblocks.0.mlp.c_proj.weight");
    ck_assert_int_eq(ldm_clip_name("text_model.embeddings.position_embedding.weight", &a.clip.layout, nm, sizeof nm), 0);
    ck_assert_str_eq(nm, "cond_stage_model.model.positional_embedding");
    /* the last resblock is not part of the model */
    ck_assert_int_eq(ldm_clip_name("encoder.layers.2.mlp.fc1.weight", &a.clip.layout, nm, sizeof nm), -1);
    ck_assert(ldm_ignorable("cond_stage_model.model.text_projection"));
    ck_assert(ldm_ignorable("cond_stage_model.model.logit_scale"));
    ck_assert(!ldm_ignorable("cond_stage_model.model.ln_final.weight"));
    st_close(&f);
}
END_TEST

/* prompt embeddings, a UNet output and a v-prediction loss, as diffusers */
static void check_numbers(sd_model *m) {
    st_file r; fx_open(&r, "sd2_tiny_ref.safetensors");
    const int B = 2, T = TOK_CTX, d = 32, n = 4 * 8 * 8;
    float *ids_f = fx_get(&r, "ids", (size_t)B * T), *ctx_ref = fx_get(&r, "ctx", (size_t)B * T * d);
    /* the tokenizer pads with "!" as SD2's does */
    const char *prompts[2] = {"a red cat", "a small blue house by the sea"};
    for (int b = 0; b < B; b++) {
        int ids[TOK_CTX];
        ck_assert(tok_encode_sd(m->tok, prompts[b], ids) >= 0);
        for (int i = 0; i < T; i++) ck_assert_int_eq(ids[i], (int)ids_f[b * T + i]);
    }
    ck_assert_int_eq(m->tok->pad_id, 0);
    float *ctx = malloc(sizeof(float) * B * T * d);
    char err[SD_ERR_LEN];
    ck_assert_msg(sd_encode_prompts(m, prompts, B, 1, ctx, err) == 0, "%s", err);
    double e = rel_err(ctx, ctx_ref, (size_t)B * T * d);
    printf("sd2 encode_prompt rel_err %.3g\n", e);
    ck_assert_msg(e < 1e-5, "prompt embeddings rel_err %g", e);

    float *x = fx_get(&r, "x", (size_t)B * n), *t = fx_get(&r, "t", B), *ref = fx_get(&r, "unet_out", (size_t)B * n);
    float *out = malloc(sizeof(float) * B * n);
    ck_assert(unet_alloc_acts(&m->unet, B, 8, 8, T, 0) == 0);
    ck_assert_msg(unet_forward(&m->unet, out, x, t, ctx_ref, B, 8, 8, T) == 0, "%s", m->unet.err);
    e = rel_err(out, ref, (size_t)B * n);
    printf("sd2 unet rel_err %.3g\n", e);
    ck_assert_msg(e < 1e-5, "UNet rel_err %g", e);

    /* the training loss: v = sqrt(abar) eps - sqrt(1 - abar) x0 is the target */
    ck_assert_int_eq(m->prediction, DDPM_V_PREDICTION);
    float *x0 = fx_get(&r, "x0", (size_t)B * n), *eps = fx_get(&r, "eps", (size_t)B * n);
    float *tl = fx_get(&r, "t_loss", B), loss_ref = fx_scalar(&r, "loss_v");
    int ti[2] = {(int)tl[0], (int)tl[1]};
    float *xt = malloc(sizeof(float) * B * n), *target = malloc(sizeof(float) * B * n);
    ddpm_add_noise(xt, x0, eps, ti, B, (size_t)n, &m->sched);
    ddpm_target(target, x0, eps, ti, B, (size_t)n, m->prediction, &m->sched);
    ck_assert_msg(unet_forward(&m->unet, out, xt, tl, ctx_ref, B, 8, 8, T) == 0, "%s", m->unet.err);
    float loss = mse_loss_forward(out, target, NULL, B, (size_t)n);
    printf("sd2 v-prediction loss %.7g, diffusers %.7g\n", loss, loss_ref);
    ck_assert_msg(fabsf(loss - loss_ref) <= 1e-5f * loss_ref, "loss %g, diffusers %g", loss, loss_ref);
    /* and not the epsilon loss */
    ddpm_target(target, x0, eps, ti, B, (size_t)n, DDPM_EPSILON, &m->sched);
    ck_assert(fabsf(mse_loss_forward(out, target, NULL, B, (size_t)n) - loss_ref) > 1e-2f * loss_ref);

    free(ids_f); free(ctx_ref); free(ctx); free(x); free(t); free(ref); free(out);
    free(x0); free(eps); free(tl); free(xt); free(target);
    st_close(&r);
}

START_TEST(test_sd2_single_file) {
    sd_model m;
    load(&m, SD2, WEIGHT_F32);
    ck_assert_int_eq(m.clip.config.act, CLIP_ACT_GELU);
    ck_assert_int_eq(m.clip.config.num_layers, 2);
    ck_assert_int_eq(m.unet.cfg.linear_proj, 1);
    check_numbers(&m);
    sd_model_free(&m);
}
END_TEST

/* fp16-held weights: the file is fp16, so the same numbers */
START_TEST(test_sd2_single_file_fp16) {
    sd_model m;
    load(&m, SD2, WEIGHT_F16);
    check_numbers(&m);
    sd_model_free(&m);
}
END_TEST


/* The same model as a diffusers folder: tests/fixtures/sd2_tiny_folder has
 * the configs diffusers wrote (linear projection, per-block head list,
 * upcast_attention, gelu, v_prediction, pad "!"); the weights are written
 * here, under their diffusers names, from what the single file gave. */
static void write_part(const char *path, int n, const char *(*name)(const void *, int),
                       const float *(*data)(const void *, int), int (*shape)(const void *, int, int64_t *),
                       const void *obj) {
    st_writer *w = st_writer_new();
    char err[ST_ERR_LEN];
    for (int i = 0; i < n; i++) {
        int64_t sh[4]; int nd = shape(obj, i, sh);
        ck_assert(st_writer_add_f32(w, name(obj, i), ST_F32, nd, sh, data(obj, i)) == 0);
    }
    ck_assert_msg(st_writer_save(w, path, err) == 0, "%s", err);
    st_writer_free(w);
}
static const char *u_name(const void *o, int i) { return ((const unet_t *)o)->table[i].name; }
static const float *u_data(const void *o, int i) { return ((const unet_t *)o)->table[i].data; }
static int u_shape(const void *o, int i, int64_t *sh) {
    const unet_param *p = &((const unet_t *)o)->table[i];
    for (int d = 0; d < p->ndim; d++) sh[d] = p->shape[d];
    return p->ndim;
}
static const char *v_name(const void *o, int i) { return ((const vae_t *)o)->table[i].name; }
static const float *v_data(const void *o, int i) { return ((const vae_t *)o)->table[i].data; }
static int v_shape(const void *o, int i, int64_t *sh) {
    const vae_param *p = &((const vae_t *)o)->table[i];
    for (int d = 0; d < p->ndim; d++) sh[d] = p->shape[d];
    return p->ndim;
}
static const char *c_name(const void *o, int i) { return ((const clip_t *)o)->table[i].name; }
static const float *c_data(const void *o, int i) { return ((const clip_t *)o)->table[i].data; }
static int c_shape(const void *o, int i, int64_t *sh) {
    const clip_param *p = &((const clip_t *)o)->table[i];
    for (int d = 0; d < p->ndim; d++) sh[d] = p->shape[d];
    return p->ndim;
}

START_TEST(test_sd2_diffusers_folder) {
    char dir[64], cmd[512], p[256];
    snprintf(dir, sizeof dir, "/tmp/sdlora_sd2f_XXXXXX");
    ck_assert(mkdtemp(dir) != NULL);
    snprintf(cmd, sizeof cmd, "cp -r " FIXTURE_DIR "sd2_tiny_folder/. %s/", dir);
    ck_assert(system(cmd) == 0);
    sd_model m;
    load(&m, SD2, WEIGHT_F32);
    snprintf(p, sizeof p, "%s/unet/diffusion_pytorch_model.safetensors", dir);
    write_part(p, m.unet.ntable, u_name, u_data, u_shape, &m.unet);
    snprintf(p, sizeof p, "%s/vae/diffusion_pytorch_model.safetensors", dir);
    write_part(p, m.vae.ntable, v_name, v_data, v_shape, &m.vae);
    snprintf(p, sizeof p, "%s/text_encoder/model.safetensors", dir);
    write_part(p, m.clip.ntable, c_name, c_data, c_shape, &m.clip);
    sd_model_free(&m);

    char err[SD_ERR_LEN];
    ck_assert_msg(sd_model_load(&m, dir, NULL, err) == 0, "%s", err);
    ck_assert(!m.single_file);
    ck_assert_int_eq(m.clip.config.act, CLIP_ACT_GELU);
    ck_assert_int_eq(m.unet.cfg.linear_proj, 1);
    check_numbers(&m);            /* pad "!" and v_prediction from the folder's files */
    sd_model_free(&m);
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    ck_assert(system(cmd) == 0);
}
END_TEST

/* epsilon or v: A1111's .yaml beside the file decides; without one, v */
START_TEST(test_sd2_yaml) {
    char dir[64], path[128], yaml[128], cwd[1024], err[SD_ERR_LEN];
    snprintf(dir, sizeof dir, "/tmp/sdlora_sd2_XXXXXX");
    ck_assert(mkdtemp(dir) != NULL);
    ck_assert(getcwd(cwd, sizeof cwd) != NULL);
    snprintf(path, sizeof path, "%s/m.safetensors", dir);
    snprintf(yaml, sizeof yaml, "%s/m.yaml", dir);
    char target[1200];
    snprintf(target, sizeof target, "%s/" SD2, cwd);
    ck_assert(symlink(target, path) == 0);
    static const struct { const char *text; ddpm_prediction want; } cases[] = {
        {"model:\n  params:\n    parameterization: \"v\"\n    linear_start: 0.00085\n", DDPM_V_PREDICTION},
        {"model:\n  params:\n    parameterization: v\n", DDPM_V_PREDICTION},
        {"model:\n  params:\n    linear_start: 0.00085\n", DDPM_EPSILON},          /* LDM's default: eps */
        {"model:\n  params:\n    parameterization: \"eps\"\n", DDPM_EPSILON},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        FILE *f = fopen(yaml, "w");
        ck_assert(f && fputs(cases[i].text, f) >= 0 && fclose(f) == 0);
        sd_model m;
        ck_assert_msg(sd_model_load(&m, path, SD2_TOK, err) == 0, "%s", err);
        ck_assert_msg(m.prediction == cases[i].want, "case %zu", i);
        /* v: a 768 model (sample_size 96), epsilon: a 512 base model (64); one VAE level here */
        ck_assert_int_eq(sd_default_image_side(&m), cases[i].want == DDPM_V_PREDICTION ? 96 : 64);
        sd_model_free(&m);
    }
    unlink(yaml); unlink(path); rmdir(dir);
}
END_TEST

/* an SD2 file without its last resblock, or with one of its tensors gone,
 * is refused in one line */
START_TEST(test_sd2_refusals) {
    st_file f; char err[ST_ERR_LEN];
    ck_assert_msg(st_open(&f, SD2, err) == 0, "%s", err);
    int n = f.ntensors;
    st_tensor *t = calloc((size_t)n + 1, sizeof *t);
    memcpy(t, f.tensors, (size_t)n * sizeof *t);
    ldm_arch a;
    ck_assert_msg(ldm_infer(t, n, &a, err) == 0, "%s", err);
    /* both text encoders */
    t[n] = t[0];
    t[n].name = "cond_stage_model.transformer.text_model.final_layer_norm.weight";
    ck_assert_int_eq(ldm_infer(t, n + 1, &a, err), -1);
    ck_assert_msg(strstr(err, "two text encoders"), "%s", err);
    /* a resblock's in_proj missing */
    for (int i = 0; i < n; i++)
        if (strcmp(t[i].name, "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight") == 0)
            t[i].name = "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight_x";
    ck_assert_int_eq(ldm_infer(t, n, &a, err), -1);
    ck_assert_msg(strstr(err, "resblocks.1 missing"), "%s", err);
    free(t);
    st_close(&f);
}
END_TEST


/* SD2.1's real sizes: SD1.5's LDM names and shapes (ldm_sd15_names.txt),
 * with what SD2 changes: a 1024-wide context for attn2.to_k / to_v, linear
 * proj_in / proj_out, and OpenCLIP-H (24 resblocks of 1024, c_fc 4096)
 * under cond_stage_model.model. in place of the CLIP text model */
static int add(st_tensor *t, int n, char **names, const char *name, int nd, int64_t d0, int64_t d1) {
    names[n] = strdup(name);
    memset(&t[n], 0, sizeof t[n]);
    t[n].name = names[n]; t[n].dtype = ST_F16; t[n].ndim = nd;
    t[n].shape[0] = d0; t[n].shape[1] = d1;
    return n + 1;
}

START_TEST(test_sd21_sizes) {
    FILE *f = fopen(FIXTURE_DIR "ldm_sd15_names.txt", "r");
    ck_assert(f != NULL);
    const int cap = 2000;
    st_tensor *t = calloc(cap, sizeof *t);
    char **names = calloc(cap, sizeof *names), line[1024];
    int n = 0;
    while (fgets(line, sizeof line, f)) {
        char dn[400], ln[400], ls[100];
        if (sscanf(line, "%399s %399s %99s", dn, ln, ls) != 3) continue;
        if (strncmp(ln, LDM_CLIP_PREFIX, strlen(LDM_CLIP_PREFIX)) == 0) continue;
        int64_t sh[4] = {0}; int nd = 0;
        for (char *c = ls; *c && nd < 4; nd++) { sh[nd] = strtoll(c, &c, 10); if (*c == ',') c++; }
        int is_kv = strstr(ln, "attn2.to_k.weight") || strstr(ln, "attn2.to_v.weight");
        int is_proj = strstr(ln, "proj_in.weight") || strstr(ln, "proj_out.weight");
        if (is_kv) { ck_assert_int_eq(sh[1], 768); sh[1] = 1024; }
        if (is_proj && strncmp(ln, LDM_UNET_PREFIX, strlen(LDM_UNET_PREFIX)) == 0) { ck_assert_int_eq(nd, 4); nd = 2; }
        n = add(t, n, names, ln, nd, sh[0], sh[1]);
        t[n - 1].shape[2] = sh[2]; t[n - 1].shape[3] = sh[3];
    }
    fclose(f);
    const char *P = LDM_OPENCLIP_PREFIX;
    char nm[LDM_NAME_LEN];
    snprintf(nm, sizeof nm, "%stoken_embedding.weight", P); n = add(t, n, names, nm, 2, 49408, 1024);
    snprintf(nm, sizeof nm, "%spositional_embedding", P);   n = add(t, n, names, nm, 2, 77, 1024);
    snprintf(nm, sizeof nm, "%sln_final.weight", P);        n = add(t, n, names, nm, 1, 1024, 0);
    snprintf(nm, sizeof nm, "%sln_final.bias", P);          n = add(t, n, names, nm, 1, 1024, 0);
    snprintf(nm, sizeof nm, "%stext_projection", P);        n = add(t, n, names, nm, 2, 1024, 1024);
    snprintf(nm, sizeof nm, "%slogit_scale", P);            n = add(t, n, names, nm, 0, 0, 0);
    static const struct { const char *sub; int nd; int64_t d0, d1; } blk[] = {
        {"attn.in_proj_weight", 2, 3072, 1024}, {"attn.in_proj_bias", 1, 3072, 0},
        {"attn.out_proj.weight", 2, 1024, 1024}, {"attn.out_proj.bias", 1, 1024, 0},
        {"ln_1.weight", 1, 1024, 0}, {"ln_1.bias", 1, 1024, 0}, {"ln_2.weight", 1, 1024, 0}, {"ln_2.bias", 1, 1024, 0},
        {"mlp.c_fc.weight", 2, 4096, 1024}, {"mlp.c_fc.bias", 1, 4096, 0},
        {"mlp.c_proj.weight", 2, 1024, 4096}, {"mlp.c_proj.bias", 1, 1024, 0},
    };
    for (int l = 0; l < 24; l++)
        for (size_t k = 0; k < sizeof blk / sizeof blk[0]; k++) {
            snprintf(nm, sizeof nm, "%stransformer.resblocks.%d.%s", P, l, blk[k].sub);
            n = add(t, n, names, nm, blk[k].nd, blk[k].d0, blk[k].d1);
        }
    ldm_arch a; char err[ST_ERR_LEN];
    ck_assert_msg(ldm_infer(t, n, &a, err) == 0, "%s", err);
    /* stabilityai/stable-diffusion-2-1's unet/ and text_encoder/ config.json */
    const int heads[4] = {5, 10, 20, 20};
    ck_assert(a.sd2);
    for (int b = 0; b < 4; b++) ck_assert_int_eq(a.unet.heads[b], heads[b]);
    ck_assert_int_eq(a.unet.cross_dim, 1024);
    ck_assert_int_eq(a.unet.linear_proj, 1);
    ck_assert_int_eq(a.unet.sample_size, 96);
    ck_assert_int_eq(a.clip.num_layers, 23);
    ck_assert_int_eq(a.clip.hidden_size, 1024);
    ck_assert_int_eq(a.clip.intermediate_size, 4096);
    ck_assert_int_eq(a.clip.num_heads, 16);
    ck_assert_int_eq(a.clip.vocab_size, 49408);
    ck_assert_int_eq(a.clip.max_pos, 77);
    ck_assert(a.clip.gelu);
    /* the UNet this gives has SD2.1's 865,910,724 parameters (diffusers, meta device) */
    unet_config c;
    memset(&c, 0, sizeof c);
    c.in_channels = a.unet.in_channels; c.out_channels = a.unet.out_channels; c.nlevels = a.unet.nlevels;
    for (int b = 0; b < c.nlevels; b++) {
        c.block_out[b] = a.unet.block_out[b]; c.layers[b] = a.unet.layout.layers[b];
        c.down_attn[b] = a.unet.layout.down_attn[b]; c.up_attn[b] = a.unet.layout.up_attn[b];
        c.heads[b] = a.unet.heads[b]; c.tlayers[b] = a.unet.tlayers[b];
    }
    c.cross_dim = a.unet.cross_dim; c.groups = a.unet.groups; c.eps = a.unet.eps;
    c.linear_proj = a.unet.linear_proj; c.flip_sin_to_cos = 1;
    size_t np; int nt;
    ck_assert_msg(unet_count_params(&c, &np, &nt, err) == 0, "%s", err);
    ck_assert_uint_eq(np, 865910724u);
    ck_assert_int_eq(nt, 686);
    /* every text-model name of the 23 layers maps onto a tensor of the list */
    static const char *sub[] = {"self_attn.q_proj.weight", "self_attn.v_proj.bias", "self_attn.out_proj.weight",
                                "layer_norm1.bias", "layer_norm2.weight", "mlp.fc1.weight", "mlp.fc2.bias"};
    for (int l = 0; l < 24; l++)
        for (size_t k = 0; k < sizeof sub / sizeof sub[0]; k++) {
            char dn[128];
            snprintf(dn, sizeof dn, "text_model.encoder.layers.%d.%s", l, sub[k]);
            int rc = ldm_clip_name(dn, &a.clip.layout, nm, sizeof nm);
            if (l == 23) { ck_assert_int_eq(rc, -1); continue; }
            ck_assert_msg(rc >= 0, "%s", dn);
            int found = 0;
            for (int i = 0; i < n && !found; i++) found = strcmp(t[i].name, nm) == 0;
            ck_assert_msg(found, "%s -> %s: not in the file", dn, nm);
        }
    /* a file converted back from a diffusers folder has only the 23 layers
     * SD2 runs (diffusers' convert_diffusers_to_original_stable_diffusion):
     * still 23, not 22 */
    int k = 0;
    for (int i = 0; i < n; i++)
        if (!strstr(t[i].name, "resblocks.23.")) t[k++] = t[i];
    ck_assert_int_eq(k, n - 12);
    ck_assert_msg(ldm_infer(t, k, &a, err) == 0, "%s", err);
    ck_assert_int_eq(a.clip.num_layers, 23);
    ck_assert_int_eq(a.clip.resblocks, 23);
    for (int i = 0; i < n; i++) free(names[i]);
    free(names); free(t);
}
END_TEST

/* ---- the programs --------------------------------------------------------- */

static int run(const char *cmd) {
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

START_TEST(test_sd2_train_sample) {
    char dir[64], cmd[2048], p[256], err[256];
    snprintf(dir, sizeof dir, "/tmp/sdlora_sd2p_XXXXXX");
    ck_assert(mkdtemp(dir) != NULL);
    snprintf(p, sizeof p, "%s/data", dir);
    mkdir(p, 0777);
    uint8_t px[16 * 16 * 3];
    for (int i = 0; i < 2; i++) {
        for (int k = 0; k < 16 * 16 * 3; k++) px[k] = (uint8_t)(k * (7 + i) % 251);
        snprintf(p, sizeof p, "%s/data/img%d.png", dir, i);
        ck_assert_msg(image_save_png(p, px, 16, 16, NULL, NULL, 0, err, sizeof err) == 0, "%s", err);
        snprintf(p, sizeof p, "%s/data/img%d.txt", dir, i);
        FILE *f = fopen(p, "w"); fprintf(f, "a red cat %d\n", i); fclose(f);
    }
    snprintf(cmd, sizeof cmd, SDLORA_BUILD "/train %s/data --model " SD2 " --tokenizer " SD2_TOK
             " --res 16 --rank 2 --alpha 2 --batch 2 --steps 3 --seed 3 --no-grid --out %s/out > %s/log 2>&1",
             dir, dir, dir);
    int rc = run(cmd);
    snprintf(p, sizeof p, "cat %s/log", dir);
    if (rc) ck_assert(system(p) >= 0);
    ck_assert_int_eq(rc, 0);
    snprintf(p, sizeof p, "%s/out/lora.safetensors", dir);
    ck_assert(access(p, F_OK) == 0);
    snprintf(cmd, sizeof cmd, SDLORA_BUILD "/sample --model " SD2 " --tokenizer " SD2_TOK
             " --lora %s/out/lora.safetensors --width 16 --height 16 --steps 3 --seed 1 --out %s/s.png"
             " --prompt \"a red cat\" > %s/log 2>&1", dir, dir, dir);
    rc = run(cmd);
    snprintf(p, sizeof p, "cat %s/log", dir);
    if (rc) ck_assert(system(p) >= 0);
    ck_assert_int_eq(rc, 0);
    image_t im; snprintf(p, sizeof p, "%s/s.png", dir);
    ck_assert_msg(image_load(&im, p, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(im.w, 16);
    ck_assert_int_eq(im.h, 16);
    image_free(&im);
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    ck_assert(system(cmd) == 0);
}
END_TEST

static Suite *sd2_suite(void) {
    Suite *s = suite_create("sd2");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_sd2_arch);
    tcase_add_test(tc, test_sd2_single_file);
    tcase_add_test(tc, test_sd2_single_file_fp16);
    tcase_add_test(tc, test_sd2_diffusers_folder);
    tcase_add_test(tc, test_sd2_yaml);
    tcase_add_test(tc, test_sd2_refusals);
    tcase_add_test(tc, test_sd21_sizes);
    tcase_add_test(tc, test_sd2_train_sample);
    suite_add_tcase(s, tc);
    return s;
}

CHECK_MAIN(sd2_suite)

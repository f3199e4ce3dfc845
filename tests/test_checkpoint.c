/* test_checkpoint.c: diffusers <-> LDM single-file names and architecture
 * inference (checkpoint.c).
 *
 * Ground truth comes from tools/make_ldm_fixtures.py, whose single file
 * diffusers' own from_single_file loads back bit-identically:
 *   ldm_tiny.safetensors + ldm_tiny_names.txt + ldm_tiny_arch.txt  (a tiny model)
 *   ldm_sd15_names.txt   every name and shape of the real SD1.5 (no weights)
 * Names lines: diffusers_name TAB ldm_name TAB ldm_shape TAB diffusers_shape. */
#include "testutil.h"
#include "checkpoint.h"
#include "unet.h"
#include "vae.h"
#include "clip.h"

typedef struct {
    char *d, *l;                   /* diffusers name, LDM name */
    int lnd, dnd;
    int64_t ls[ST_MAX_DIMS], ds[ST_MAX_DIMS];
} pair_t;

static int parse_shape(const char *s, int64_t *shape) {
    int nd = 0;
    while (*s && nd < ST_MAX_DIMS) {
        char *end;
        shape[nd++] = strtoll(s, &end, 10);
        s = *end == ',' ? end + 1 : end;
        if (end == s && *s) break;
    }
    return nd;
}

/* the names file, or fail the test */
static pair_t *load_pairs(const char *path, int *np) {
    FILE *f = fopen(path, "r");
    ck_assert_msg(f != NULL, "cannot open %s", path);
    int cap = 2048, n = 0;
    pair_t *p = calloc((size_t)cap, sizeof *p);
    char line[1024];
    while (fgets(line, sizeof line, f)) {
        char *d = strtok(line, "\t\n"), *l = strtok(NULL, "\t\n"), *ls = strtok(NULL, "\t\n"),
             *ds = strtok(NULL, "\t\n");
        ck_assert_msg(d && l && ls && ds, "%s: bad line %d", path, n + 1);
        ck_assert_int_lt(n, cap);
        p[n].d = strdup(d);
        p[n].l = strdup(l);
        p[n].lnd = parse_shape(ls, p[n].ls);
        p[n].dnd = parse_shape(ds, p[n].ds);
        n++;
    }
    fclose(f);
    *np = n;
    return p;
}

static void free_pairs(pair_t *p, int n) {
    for (int i = 0; i < n; i++) { free(p[i].d); free(p[i].l); }
    free(p);
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* Map every pair's diffusers name with the layouts of a and check:
 *  - the LDM name is exactly the ground truth's;
 *  - LDM_SQUEEZE is returned exactly where the LDM shape is the diffusers
 *    shape with (1, 1) appended (the VAE's mid attention), 0 elsewhere;
 *  - CLIP names map the same with and without "text_model.";
 *  - the tensors (name, shape) cover t[0..nt) exactly once: every tensor is
 *    either ignorable or the image of exactly one pair, and no two pairs map
 *    to one name. */
static void check_mapping(const pair_t *p, int np, const ldm_arch *a, const st_tensor *t, int nt) {
    char out[LDM_NAME_LEN], out2[LDM_NAME_LEN];
    char **mapped = malloc((size_t)np * sizeof *mapped);
    int nsq = 0;
    for (int i = 0; i < np; i++) {
        int rc;
        if (strncmp(p[i].l, LDM_UNET_PREFIX, strlen(LDM_UNET_PREFIX)) == 0) {
            rc = ldm_unet_name(p[i].d, &a->unet.layout, out, sizeof out);
        } else if (strncmp(p[i].l, LDM_VAE_PREFIX, strlen(LDM_VAE_PREFIX)) == 0) {
            rc = ldm_vae_name(p[i].d, &a->vae.layout, out, sizeof out);
        } else {
            ck_assert_msg(strncmp(p[i].l, LDM_CLIP_PREFIX, strlen(LDM_CLIP_PREFIX)) == 0, "%s", p[i].l);
            rc = ldm_clip_name(p[i].d, &a->clip.layout, out, sizeof out);
            ck_assert(strncmp(p[i].d, "text_model.", 11) == 0);
            ck_assert_int_eq(ldm_clip_name(p[i].d + 11, &a->clip.layout, out2, sizeof out2), rc);
            ck_assert_str_eq(out2, out);
        }
        ck_assert_msg(rc >= 0, "%s: not mapped", p[i].d);
        ck_assert_msg(strcmp(out, p[i].l) == 0, "%s -> %s, want %s", p[i].d, out, p[i].l);
        int squeezed = p[i].lnd == p[i].dnd + 2 && p[i].ls[p[i].dnd] == 1 && p[i].ls[p[i].dnd + 1] == 1;
        for (int d = 0; squeezed && d < p[i].dnd; d++) squeezed = p[i].ls[d] == p[i].ds[d];
        if (!squeezed) {
            ck_assert_int_eq(p[i].lnd, p[i].dnd);
            for (int d = 0; d < p[i].dnd; d++) ck_assert(p[i].ls[d] == p[i].ds[d]);
        }
        ck_assert_msg(rc == (squeezed ? LDM_SQUEEZE : 0), "%s: squeeze flag %d", p[i].d, rc);
        nsq += squeezed;
        mapped[i] = p[i].l;
    }
    ck_assert_int_eq(nsq, 8);   /* q, k, v, proj_out weights, in encoder and decoder */

    qsort(mapped, (size_t)np, sizeof *mapped, cmp_str);
    for (int i = 1; i < np; i++) ck_assert_msg(strcmp(mapped[i - 1], mapped[i]) != 0, "duplicate %s", mapped[i]);
    int hit = 0;
    for (int i = 0; i < nt; i++) {
        const char *key = t[i].name;
        char **m = bsearch(&key, mapped, (size_t)np, sizeof *mapped, cmp_str);
        ck_assert_msg(!m != !ldm_ignorable(key), "%s: %s", key, m ? "mapped and ignorable" : "unmapped");
        if (!m) continue;
        hit++;
        const pair_t *q = NULL;
        for (int j = 0; j < np && !q; j++) if (p[j].l == *m) q = &p[j];
        ck_assert_int_eq(t[i].ndim, q->lnd);
        for (int d = 0; d < q->lnd; d++) ck_assert(t[i].shape[d] == q->ls[d]);
    }
    ck_assert_int_eq(hit, np);
    free(mapped);
}

/* key value lines */
static const char *arch_val(const char *key) {
    static char buf[4096];
    static int loaded;
    if (!loaded) {
        FILE *f = fopen(FIXTURE_DIR "ldm_tiny_arch.txt", "r");
        ck_assert(f != NULL);
        size_t k = fread(buf, 1, sizeof buf - 1, f);
        buf[k] = 0;
        fclose(f);
        loaded = 1;
    }
    size_t kl = strlen(key);
    for (const char *s = buf; s && *s; s = strchr(s, '\n') ? strchr(s, '\n') + 1 : NULL)
        if (strncmp(s, key, kl) == 0 && s[kl] == ' ') return s + kl + 1;
    ck_abort_msg("no %s in ldm_tiny_arch.txt", key);
    return NULL;
}
static int arch_int(const char *key) { return atoi(arch_val(key)); }
static void arch_list_eq(const char *key, const int *v, int n) {
    const char *s = arch_val(key);
    for (int i = 0; i < n; i++) {
        char *end;
        long x = strtol(s, &end, 10);
        ck_assert_msg(x == v[i], "%s[%d] = %d, want %ld", key, i, v[i], x);
        s = end + (*end == ',');
    }
    ck_assert_msg(*s == '\n' || *s == 0, "%s: more values than %d", key, n);
}

START_TEST(test_tiny_file) {
    st_file f;
    char err[ST_ERR_LEN];
    ck_assert_msg(st_open(&f, FIXTURE_DIR "ldm_tiny.safetensors", err) == 0, "%s", err);
    ck_assert_str_eq(ldm_detect(&f, err), "sd1");
    ldm_arch a;
    ck_assert_msg(ldm_infer_file(&f, &a, err) == 0, "%s", err);

    const ldm_unet_arch *u = &a.unet;
    ck_assert_int_eq(u->in_channels, arch_int("unet.in_channels"));
    ck_assert_int_eq(u->out_channels, arch_int("unet.out_channels"));
    ck_assert_int_eq(u->nlevels, arch_int("unet.nlevels"));
    ck_assert_int_eq(u->layout.nlevels, u->nlevels);
    arch_list_eq("unet.block_out", u->block_out, u->nlevels);
    arch_list_eq("unet.layers", u->layout.layers, u->nlevels);
    arch_list_eq("unet.down_attn", u->layout.down_attn, u->nlevels);
    arch_list_eq("unet.up_attn", u->layout.up_attn, u->nlevels);
    arch_list_eq("unet.tlayers", u->tlayers, u->nlevels);
    ck_assert_int_eq(u->cross_dim, arch_int("unet.cross_dim"));
    ck_assert_int_eq(u->linear_proj, arch_int("unet.linear_proj"));
    ck_assert_int_eq(u->time_embed_dim, arch_int("unet.time_embed_dim"));
    for (int b = 0; b < u->nlevels; b++) {
        ck_assert_int_eq(u->layout.downsample[b], b < u->nlevels - 1);
        ck_assert_int_eq(u->layout.upsample[b], b < u->nlevels - 1);
        ck_assert_int_eq(u->heads[b], 8);
    }
    const ldm_vae_arch *v = &a.vae;
    ck_assert_int_eq(v->in_channels, arch_int("vae.in_channels"));
    ck_assert_int_eq(v->out_channels, arch_int("vae.out_channels"));
    ck_assert_int_eq(v->latent_channels, arch_int("vae.latent_channels"));
    ck_assert_int_eq(v->nlevels, arch_int("vae.nlevels"));
    arch_list_eq("vae.block_out", v->block_out, v->nlevels);
    ck_assert_int_eq(v->layers_per_block, arch_int("vae.layers"));
    ck_assert(v->mid_attn && v->quant_conv && v->post_quant_conv);
    const ldm_clip_arch *c = &a.clip;
    ck_assert_int_eq(c->vocab_size, arch_int("clip.vocab_size"));
    ck_assert_int_eq(c->hidden_size, arch_int("clip.hidden_size"));
    ck_assert_int_eq(c->intermediate_size, arch_int("clip.intermediate_size"));
    ck_assert_int_eq(c->num_layers, arch_int("clip.num_layers"));
    ck_assert_int_eq(c->max_pos, arch_int("clip.max_pos"));
    ck_assert_int_eq(c->layout.text_model_level, 1);

    int np;
    pair_t *p = load_pairs(FIXTURE_DIR "ldm_tiny_names.txt", &np);
    ck_assert_int_eq(np, 572);
    check_mapping(p, np, &a, f.tensors, f.ntensors);
    ck_assert_int_eq(f.ntensors - np, 11);   /* 8 schedule buffers, 2 model_ema, position_ids */

    /* the squeezed VAE attention reads with the diffusers (C, C) shape, and
     * the numbers are the file's */
    char name[LDM_NAME_LEN];
    int rc = ldm_vae_name("decoder.mid_block.attentions.0.to_k.weight", &a.vae.layout, name, sizeof name);
    ck_assert_int_eq(rc, LDM_SQUEEZE);
    const st_tensor *t = st_find(&f, name);
    ck_assert(t && t->ndim == 4);
    int64_t sh[2] = {t->shape[0], t->shape[1]};
    float *x = malloc(t->numel * sizeof(float)), *y = malloc(t->numel * sizeof(float));
    ck_assert_msg(ldm_read_f32(&f, name, rc, 2, sh, x, err) == 0, "%s", err);
    ck_assert_int_eq(st_to_f32(t, y, err), 0);
    ck_assert(memcmp(x, y, t->numel * sizeof(float)) == 0);
    ck_assert_int_ne(ldm_read_f32(&f, name, 0, 2, sh, x, err), 0);   /* without the flag: shape error */
    ck_assert_ptr_nonnull(strstr(err, name));
    int64_t wrong[2] = {sh[0], sh[1] + 1};
    ck_assert_int_ne(ldm_read_f32(&f, name, rc, 2, wrong, x, err), 0);
    free(x); free(y);
    free_pairs(p, np);
    st_close(&f);
}
END_TEST

/* an st_tensor view of a names list (no data): what ldm_infer reads */
static st_tensor *view(const pair_t *p, int np, int extra) {
    st_tensor *t = calloc((size_t)(np + extra), sizeof *t);
    for (int i = 0; i < np; i++) {
        t[i].name = p[i].l;
        t[i].dtype = ST_F32;
        t[i].ndim = p[i].lnd;
        memcpy(t[i].shape, p[i].ls, sizeof t[i].shape);
    }
    return t;
}

START_TEST(test_sd15_names) {
    int np;
    pair_t *p = load_pairs(FIXTURE_DIR "ldm_sd15_names.txt", &np);
    ck_assert_int_eq(np, 1130);          /* UNet 686 + VAE 248 + CLIP 196 */
    /* a real file also has these; put them first so order cannot matter */
    static char *extras[] = {"cond_stage_model.transformer.text_model.embeddings.position_ids", "betas",
                             "alphas_cumprod", "model_ema.decay", "posterior_mean_coef2"};
    const int ne = 5;
    st_tensor *t = view(p, np, ne);
    memmove(t + ne, t, (size_t)np * sizeof *t);
    for (int i = 0; i < ne; i++) {
        memset(&t[i], 0, sizeof t[i]);
        t[i].name = extras[i]; t[i].ndim = 1; t[i].shape[0] = 1000;
    }
    ldm_arch a;
    char err[ST_ERR_LEN];
    ck_assert_msg(ldm_infer(t, np + ne, &a, err) == 0, "%s", err);
    /* SD1.5's published configs (unet/, vae/, text_encoder/ config.json) */
    const int bo[4] = {320, 640, 1280, 1280}, da[4] = {1, 1, 1, 0}, ua[4] = {0, 1, 1, 1};
    const int vb[4] = {128, 256, 512, 512};
    ck_assert_int_eq(a.unet.nlevels, 4);
    for (int b = 0; b < 4; b++) {
        ck_assert_int_eq(a.unet.block_out[b], bo[b]);
        ck_assert_int_eq(a.unet.layout.layers[b], 2);
        ck_assert_int_eq(a.unet.layout.down_attn[b], da[b]);
        ck_assert_int_eq(a.unet.layout.up_attn[b], ua[b]);
        ck_assert_int_eq(a.unet.tlayers[b], 1);
        ck_assert_int_eq(a.unet.heads[b], 8);
        ck_assert_int_eq(a.vae.block_out[b], vb[b]);
    }
    ck_assert_int_eq(a.unet.layers_per_block, 2);
    ck_assert_int_eq(a.unet.in_channels, 4);
    ck_assert_int_eq(a.unet.out_channels, 4);
    ck_assert_int_eq(a.unet.cross_dim, 768);
    ck_assert_int_eq(a.unet.linear_proj, 0);
    ck_assert_int_eq(a.unet.time_embed_dim, 1280);
    ck_assert_int_eq(a.unet.groups, 32);
    ck_assert_int_eq(a.vae.nlevels, 4);
    ck_assert_int_eq(a.vae.layers_per_block, 2);
    ck_assert_int_eq(a.vae.latent_channels, 4);
    ck_assert_int_eq(a.vae.in_channels, 3);
    ck_assert_int_eq(a.vae.out_channels, 3);
    ck_assert(a.vae.mid_attn && a.vae.quant_conv && a.vae.post_quant_conv);
    ck_assert_int_eq(a.clip.vocab_size, 49408);
    ck_assert_int_eq(a.clip.hidden_size, 768);
    ck_assert_int_eq(a.clip.intermediate_size, 3072);
    ck_assert_int_eq(a.clip.num_layers, 12);
    ck_assert_int_eq(a.clip.num_heads, 12);
    ck_assert_int_eq(a.clip.max_pos, 77);
    check_mapping(p, np, &a, t, np + ne);

    /* a few names as they appear in v1-5-pruned-emaonly.safetensors (and in
     * diffusers' CHECKPOINT_KEY_NAMES), written here by hand */
    static const char *const known[][2] = {
        {"up_blocks.3.resnets.2.conv_shortcut.weight", "output_blocks.11.0.skip_connection.weight"},
        {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
         "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"},
        {"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
         "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"},
        {"down_blocks.0.downsamplers.0.conv.weight", "input_blocks.3.0.op.weight"},
        {"down_blocks.3.resnets.1.conv2.bias", "input_blocks.11.0.out_layers.3.bias"},
        {"up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.1.conv.weight"},
        {"up_blocks.1.upsamplers.0.conv.bias", "output_blocks.5.2.conv.bias"},
        {"up_blocks.2.attentions.1.proj_out.weight", "output_blocks.7.1.proj_out.weight"},
        {"mid_block.resnets.1.time_emb_proj.weight", "middle_block.2.emb_layers.1.weight"},
        {"mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
         "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight"},
        {"time_embedding.linear_2.bias", "time_embed.2.bias"},
        {"conv_norm_out.weight", "out.0.weight"},
    };
    char out[LDM_NAME_LEN], want[LDM_NAME_LEN];
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++) {
        ck_assert_int_eq(ldm_unet_name(known[i][0], &a.unet.layout, out, sizeof out), 0);
        snprintf(want, sizeof want, LDM_UNET_PREFIX "%s", known[i][1]);
        ck_assert_str_eq(out, want);
    }
    ck_assert_int_eq(ldm_vae_name("decoder.up_blocks.0.resnets.2.norm1.weight", &a.vae.layout, out, sizeof out), 0);
    ck_assert_str_eq(out, "first_stage_model.decoder.up.3.block.2.norm1.weight");
    ck_assert_int_eq(ldm_vae_name("encoder.mid_block.attentions.0.to_out.0.weight", &a.vae.layout, out, sizeof out),
                     LDM_SQUEEZE);
    ck_assert_str_eq(out, "first_stage_model.encoder.mid.attn_1.proj_out.weight");
    ck_assert_int_eq(ldm_vae_name("encoder.mid_block.attentions.0.to_out.0.bias", &a.vae.layout, out, sizeof out), 0);

    /* names that are not parameters of this layout */
    static const char *const bad_unet[] = {
        "down_blocks.4.resnets.0.conv1.weight",            /* 4 levels */
        "down_blocks.0.resnets.2.conv1.weight",            /* 2 layers */
        "down_blocks.3.attentions.0.norm.weight",          /* DownBlock2D: no attention */
        "down_blocks.3.downsamplers.0.conv.weight",        /* last level: no downsampler */
        "up_blocks.3.upsamplers.0.conv.weight",            /* last up level: no upsampler */
        "up_blocks.0.attentions.0.norm.weight",            /* UpBlock2D: no attention */
        "up_blocks.1.resnets.3.conv1.weight",              /* up levels have 3 */
        "mid_block.resnets.2.conv1.weight",
        "mid_block.attentions.1.norm.weight",
        "down_blocks.0.resnets.0.norm4.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn3.to_q.weight",
        "down_blocks.0.resnets.0.conv1.weights",
        "down_blocks.01.resnets.0.conv1.weight",
        "down_blocks.-1.resnets.0.conv1.weight",
        "conv_in.weight.x", "conv_in", "", "class_embedding.linear_1.weight",
    };
    for (size_t i = 0; i < sizeof bad_unet / sizeof bad_unet[0]; i++)
        ck_assert_msg(ldm_unet_name(bad_unet[i], &a.unet.layout, out, sizeof out) == -1, "%s", bad_unet[i]);
    static const char *const bad_vae[] = {
        "encoder.down_blocks.3.downsamplers.0.conv.weight", "decoder.up_blocks.3.upsamplers.0.conv.weight",
        "encoder.down_blocks.0.resnets.2.conv1.weight", "decoder.up_blocks.0.resnets.3.conv1.weight",
        "encoder.mid_block.attentions.0.query.weight", "decoder.down_blocks.0.resnets.0.conv1.weight",
        "quant_conv.weight.x", "encoder.conv_norm_out.scale",
    };
    for (size_t i = 0; i < sizeof bad_vae / sizeof bad_vae[0]; i++)
        ck_assert_msg(ldm_vae_name(bad_vae[i], &a.vae.layout, out, sizeof out) == -1, "%s", bad_vae[i]);
    ck_assert_int_eq(ldm_clip_name("text_model.encoder.layers.12.mlp.fc1.weight", &a.clip.layout, out, sizeof out), -1);
    ck_assert_int_eq(ldm_clip_name("text_model.embeddings.position_ids", &a.clip.layout, out, sizeof out), -1);
    ck_assert_int_eq(ldm_clip_name("logit_scale", &a.clip.layout, out, sizeof out), -1);
    /* too small a buffer is an error, not a truncated name */
    const size_t need = strlen(LDM_UNET_PREFIX "input_blocks.0.0.weight") + 1;
    ck_assert_int_eq(ldm_unet_name("conv_in.weight", &a.unet.layout, out, need), 0);
    ck_assert_str_eq(out, LDM_UNET_PREFIX "input_blocks.0.0.weight");
    ck_assert_int_eq(ldm_unet_name("conv_in.weight", &a.unet.layout, out, need - 1), -1);
    /* old files without the "text_model." level */
    ldm_clip_layout old = a.clip.layout;
    old.text_model_level = 0;
    ck_assert_int_eq(ldm_clip_name("encoder.layers.3.layer_norm2.bias", &old, out, sizeof out), 0);
    ck_assert_str_eq(out, "cond_stage_model.transformer.encoder.layers.3.layer_norm2.bias");

    free(t);
    free_pairs(p, np);
}
END_TEST

/* ---- refusals ----------------------------------------------------------------
 * Mutants of the tiny model's names and shapes: infer must refuse each with
 * one line that says what the file is. */
static pair_t *tiny;
static int ntiny;

static void load_tiny(void) { if (!tiny) tiny = load_pairs(FIXTURE_DIR "ldm_tiny_names.txt", &ntiny); }

/* infer on t; expect failure whose message contains want */
static void expect_refusal(const st_tensor *t, int n, const char *want) {
    ldm_arch a;
    char err[ST_ERR_LEN] = "";
    ck_assert_msg(ldm_infer(t, n, &a, err) == -1, "accepted; wanted '%s'", want);
    ck_assert_msg(strstr(err, want) != NULL, "message '%s' lacks '%s'", err, want);
    ck_assert_msg(strchr(err, '\n') == NULL && strlen(err) > 20, "not one line: '%s'", err);
}

static int find_name(st_tensor *t, int n, const char *name) {
    for (int i = 0; i < n; i++) if (strcmp(t[i].name, name) == 0) return i;
    ck_abort_msg("no %s", name);
    return -1;
}

START_TEST(test_refusals_in_memory) {
    load_tiny();
    st_tensor *t = view(tiny, ntiny, 1);
    ldm_arch a;
    char err[ST_ERR_LEN];
    ck_assert_msg(ldm_infer(t, ntiny, &a, err) == 0, "%s", err);   /* the unmodified list is fine */
    ck_assert_int_eq(ldm_infer(t, 0, &a, err), -1);
    ck_assert_ptr_nonnull(strstr(err, "no tensors"));

    int ci = find_name(t, ntiny, LDM_UNET_PREFIX "input_blocks.0.0.weight");
    t[ci].shape[1] = 8;
    expect_refusal(t, ntiny, "instruct-pix2pix");
    t[ci].shape[1] = 5;
    expect_refusal(t, ntiny, "5 input channels");
    t[ci].shape[1] = 4;

    /* an extra key of another model family */
    t[ntiny] = t[0];
    t[ntiny].name = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight";
    expect_refusal(t, ntiny + 1, "two text encoders");   /* SD1.x CLIP and SD2.x OpenCLIP */
    t[ntiny].name = LDM_UNET_PREFIX "label_emb.0.0.weight";
    expect_refusal(t, ntiny + 1, "label_emb");
    t[ntiny].name = "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha";
    expect_refusal(t, ntiny + 1, "LoRA");
    t[ntiny].name = LDM_UNET_PREFIX "input_blocks.64.0.in_layers.2.weight";
    expect_refusal(t, ntiny + 1, "more UNet blocks");
    t[ntiny].name = LDM_UNET_PREFIX "output_blocks.9.0.in_layers.2.weight";   /* one block too many */
    expect_refusal(t, ntiny + 1, "output_blocks has 10 blocks");

    /* one context width different from the others */
    int ki = find_name(t, ntiny, LDM_UNET_PREFIX "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight");
    t[ki].shape[1] = 48;
    expect_refusal(t, ntiny, "mixed widths");
    t[ki].shape[1] = 32;

    /* a text encoder that does not fit the UNet */
    int ti = find_name(t, ntiny, LDM_CLIP_PREFIX "text_model.embeddings.token_embedding.weight");
    t[ti].shape[1] = 40;
    expect_refusal(t, ntiny, "do not belong together");
    t[ti].shape[1] = 32;

    /* whole components or single blocks missing: drop every name with a prefix */
    static const char *const drop[][2] = {
        {"first_stage_model.", "has no VAE"},
        {LDM_CLIP_PREFIX, "has no CLIP text encoder"},
        {LDM_UNET_PREFIX "output_blocks.4.", "output_blocks.4 missing"},
        {LDM_UNET_PREFIX "input_blocks.2.0.", "input_blocks.2 is missing"},
        {LDM_UNET_PREFIX "middle_block.1.", "middle_block"},
        {LDM_UNET_PREFIX "input_blocks.", "no input_blocks"},
        {LDM_UNET_PREFIX "output_blocks.1.1.conv.", "does not match the down path"},
        {"first_stage_model.decoder.up.1.upsample.", "decoder.up.1"},
        {LDM_CLIP_PREFIX "text_model.encoder.layers.0.", "encoder.layers.0 missing"},
        {LDM_UNET_PREFIX, "no model.diffusion_model."},
    };
    st_tensor *u = calloc((size_t)ntiny, sizeof *u);
    for (size_t k = 0; k < sizeof drop / sizeof drop[0]; k++) {
        int n = 0;
        for (int i = 0; i < ntiny; i++)
            if (strncmp(t[i].name, drop[k][0], strlen(drop[k][0])) != 0) u[n++] = t[i];
        ck_assert_int_lt(n, ntiny);
        expect_refusal(u, n, drop[k][1]);
    }

    /* diffusers-format and single-component files: names without the LDM prefixes */
    static const char *const alone[][2] = {
        {"down_blocks.0.resnets.0.conv1.weight", "diffusers-format UNet"},
        {"encoder.down.0.block.0.conv1.weight", "standalone VAE"},
        {"text_model.encoder.layers.0.mlp.fc1.weight", "standalone text-encoder"},
        {"something.else", "no model.diffusion_model."},
    };
    for (size_t k = 0; k < sizeof alone / sizeof alone[0]; k++) {
        u[0] = t[0];
        u[0].name = (char *)alone[k][0];
        expect_refusal(u, 1, alone[k][1]);
    }
    free(u);
    free(t);
}
END_TEST

/* write the tiny model's names and shapes (zeros) to a real safetensors file,
 * changing what mutate says, and run ldm_detect on it */
typedef void (*mutate_fn)(char *name, int *ndim, int64_t *shape, int *keep);

static void write_and_detect(const char *path, mutate_fn mut, const char *extra, const char *want) {
    load_tiny();
    st_writer *w = st_writer_new();
    ck_assert_ptr_nonnull(w);
    static float zeros[1 << 16];
    for (int i = 0; i < ntiny && mut; i++) {
        char name[LDM_NAME_LEN];
        int nd = tiny[i].lnd, keep = 1;
        int64_t sh[ST_MAX_DIMS];
        memcpy(sh, tiny[i].ls, sizeof sh);
        snprintf(name, sizeof name, "%s", tiny[i].l);
        mut(name, &nd, sh, &keep);
        if (!keep) continue;
        size_t numel = 1;
        for (int d = 0; d < nd; d++) numel *= (size_t)sh[d];
        ck_assert_int_le(numel, sizeof zeros / sizeof zeros[0]);
        ck_assert_int_eq(st_writer_add_f32(w, name, ST_F16, nd, sh, zeros), 0);
    }
    if (extra) {
        int64_t one = 4;
        ck_assert_int_eq(st_writer_add_f32(w, extra, ST_F32, 1, &one, zeros), 0);
    }
    char err[ST_ERR_LEN];
    ck_assert_msg(st_writer_save(w, path, err) == 0, "%s", err);
    st_writer_free(w);

    st_file f;
    ck_assert_msg(st_open(&f, path, err) == 0, "%s", err);
    const char *kind = ldm_detect(&f, err);
    if (!want) {
        ck_assert_msg(kind && strcmp(kind, "sd1") == 0, "%s", err);
    } else {
        ck_assert_ptr_null(kind);
        ck_assert_msg(strncmp(err, path, strlen(path)) == 0, "'%s' does not start with the path", err);
        ck_assert_msg(strstr(err, want) != NULL, "message '%s' lacks '%s'", err, want);
        ck_assert_msg(strchr(err, '\n') == NULL, "not one line: '%s'", err);
    }
    st_close(&f);
    remove(path);
}

static void m_none(char *name, int *nd, int64_t *sh, int *keep) { (void)name; (void)nd; (void)sh; (void)keep; }
static void m_ctx1024(char *name, int *nd, int64_t *sh, int *keep) {
    (void)nd; (void)keep;
    /* every cross-attention key/value projection and the text encoder at 1024 */
    if (strstr(name, "attn2.to_k.weight") || strstr(name, "attn2.to_v.weight")) sh[1] = 1024;
}
static void m_inpaint(char *name, int *nd, int64_t *sh, int *keep) {
    (void)nd; (void)keep;
    if (strcmp(name, LDM_UNET_PREFIX "input_blocks.0.0.weight") == 0) sh[1] = 9;
}
static void m_sdxl(char *name, int *nd, int64_t *sh, int *keep) {
    (void)nd; (void)sh; (void)keep;
    /* SDXL keeps its text encoders under conditioner.embedders.N */
    const char *p = LDM_CLIP_PREFIX;
    if (strncmp(name, p, strlen(p)) == 0) {
        char rest[LDM_NAME_LEN];
        snprintf(rest, sizeof rest, "%s", name + strlen(p));
        snprintf(name, LDM_NAME_LEN, "conditioner.embedders.0.transformer.%.150s", rest);
    }
}
static void m_lora(char *name, int *nd, int64_t *sh, int *keep) {
    /* a kohya LoRA: only lora_down / lora_up pairs for the attention projections */
    char *q = strstr(name, "attn1.to_q.weight");
    if (!q || strncmp(name, LDM_UNET_PREFIX, strlen(LDM_UNET_PREFIX)) != 0) { *keep = 0; return; }
    char mod[LDM_NAME_LEN];
    snprintf(mod, sizeof mod, "lora_unet_%.*s", (int)(q - name - strlen(LDM_UNET_PREFIX)),
             name + strlen(LDM_UNET_PREFIX));
    for (char *c = mod; *c; c++) if (*c == '.') *c = '_';
    snprintf(name, LDM_NAME_LEN, "%.150sattn1_to_q.lora_down.weight", mod);
    *nd = 2; sh[0] = 4;
}
static void m_drop_all(char *name, int *nd, int64_t *sh, int *keep) { (void)name; (void)nd; (void)sh; *keep = 0; }

START_TEST(test_refusals_files) {
    const char *path = "/tmp/sdlora_test_checkpoint.safetensors";
    write_and_detect(path, m_none, NULL, NULL);                 /* control: the tiny model passes */
    write_and_detect(path, m_ctx1024, NULL, "1024 wide without an SD2.x text encoder");
    write_and_detect(path, m_inpaint, NULL, "inpainting");
    write_and_detect(path, m_sdxl, NULL, "SDXL");
    write_and_detect(path, m_lora, NULL, "LoRA file");
    write_and_detect(path, m_drop_all, NULL, "no tensors");     /* an empty file */
    write_and_detect(path, m_drop_all, "betas", "no model.diffusion_model.");
}
END_TEST

START_TEST(test_ignorable) {
    ck_assert(ldm_ignorable("alphas_cumprod"));
    ck_assert(ldm_ignorable("model_ema.num_updates"));
    ck_assert(ldm_ignorable("model_ema.diffusion_modelinput_blocks00weight"));
    ck_assert(ldm_ignorable("cond_stage_model.transformer.text_model.embeddings.position_ids"));
    ck_assert(ldm_ignorable("cond_stage_model.transformer.embeddings.position_ids"));
    ck_assert(!ldm_ignorable("cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"));
    ck_assert(!ldm_ignorable(LDM_UNET_PREFIX "input_blocks.0.0.weight"));
    ck_assert(!ldm_ignorable("alphas_cumprod.x"));
    ck_assert(!ldm_ignorable(NULL));
}
END_TEST

/* The loaders' own parameter tables (unet.c, vae.c, clip.c), built from the
 * inferred architecture, map name by name onto the tiny single file and
 * read with ldm_read_f32; together they use every weight in it. (norm
 * groups are not in any shape: the tiny model's 4 is given here.) */
static const char *vae_map(const char *name, void *ctx, char *buf, size_t len) {
    return ldm_vae_name(name, (const ldm_vae_layout *)ctx, buf, len) >= 0 ? buf : NULL;
}

START_TEST(test_loaders_tables) {
    st_file f;
    char err[ST_ERR_LEN], nm[LDM_NAME_LEN];
    ldm_arch a;
    ck_assert_msg(st_open(&f, FIXTURE_DIR "ldm_tiny.safetensors", err) == 0, "%s", err);
    ck_assert_msg(ldm_infer_file(&f, &a, err) == 0, "%s", err);
    int used = 0;

    unet_config c;
    memset(&c, 0, sizeof c);
    c.in_channels = a.unet.in_channels; c.out_channels = a.unet.out_channels;
    c.sample_size = 8; c.nlevels = a.unet.nlevels;
    for (int b = 0; b < c.nlevels; b++) {
        c.block_out[b] = a.unet.block_out[b]; c.layers[b] = a.unet.layout.layers[b];
        c.down_attn[b] = a.unet.layout.down_attn[b]; c.up_attn[b] = a.unet.layout.up_attn[b];
        c.heads[b] = a.unet.heads[b]; c.tlayers[b] = a.unet.tlayers[b];
    }
    c.cross_dim = a.unet.cross_dim; c.groups = 4; c.eps = a.unet.eps;
    c.linear_proj = a.unet.linear_proj; c.flip_sin_to_cos = a.unet.flip_sin_to_cos;
    unet_t u;
    memset(&u, 0, sizeof u);
    ck_assert_msg(unet_build(&u, &c, err) == 0, "%s", err);
    for (int i = 0; i < u.ntable; i++) {
        int64_t sh[4];
        for (int d = 0; d < u.table[i].ndim; d++) sh[d] = u.table[i].shape[d];
        int rc = ldm_unet_name(u.table[i].name, &a.unet.layout, nm, sizeof nm);
        ck_assert_msg(rc >= 0, "unet table name %s not mapped", u.table[i].name);
        ck_assert_msg(ldm_read_f32(&f, nm, rc, u.table[i].ndim, sh, u.params + u.table[i].offset, err) == 0,
                      "%s", err);
    }
    used += u.ntable;
    unet_free(&u);

    vae_config vc;
    memset(&vc, 0, sizeof vc);
    vc.in_channels = a.vae.in_channels; vc.out_channels = a.vae.out_channels;
    vc.latent_channels = a.vae.latent_channels; vc.nlevels = a.vae.nlevels;
    for (int b = 0; b < vc.nlevels; b++) vc.block_out[b] = a.vae.block_out[b];
    vc.layers = a.vae.layers_per_block; vc.groups = 4; vc.mid_attn = a.vae.mid_attn;
    vc.quant_conv = a.vae.quant_conv; vc.post_quant_conv = a.vae.post_quant_conv;
    vc.scaling_factor = a.vae.scaling_factor;
    vae_t v;
    memset(&v, 0, sizeof v);
    ck_assert_msg(vae_build(&v, &vc, err) == 0, "%s", err);
    /* extra_prefix: every first_stage_model.* tensor must be used */
    ck_assert_msg(vae_load_st(&v, &f, vae_map, &a.vae.layout, LDM_VAE_PREFIX, err) == 0, "%s", err);
    used += v.ntable;
    vae_free(&v);

    clip_config cc;
    clip_config_default(&cc);
    cc.vocab_size = a.clip.vocab_size; cc.hidden_size = a.clip.hidden_size;
    cc.intermediate_size = a.clip.intermediate_size; cc.num_layers = a.clip.num_layers;
    cc.num_heads = a.clip.num_heads; cc.max_pos = a.clip.max_pos;
    cc.bos_token_id = 0; cc.eos_token_id = 1; cc.pad_token_id = 1;
    clip_t m;
    memset(&m, 0, sizeof m);
    ck_assert_msg(clip_init(&m, &cc, err) == 0, "%s", err);
    for (int i = 0; i < m.ntable; i++) {
        int rc = ldm_clip_name(m.table[i].name, &a.clip.layout, nm, sizeof nm);
        ck_assert_msg(rc == 0, "clip table name %s not mapped", m.table[i].name);
        ck_assert_msg(ldm_read_f32(&f, nm, rc, m.table[i].ndim, m.table[i].shape,
                                   m.params + m.table[i].offset, err) == 0, "%s", err);
    }
    used += m.ntable;
    clip_free(&m);

    int weights = 0;
    for (int i = 0; i < f.ntensors; i++) weights += !ldm_ignorable(f.tensors[i].name);
    ck_assert_int_eq(used, weights);
    st_close(&f);
}
END_TEST

static Suite *checkpoint_suite(void) {
    Suite *s = suite_create("checkpoint");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_tiny_file);
    tcase_add_test(tc, test_sd15_names);
    tcase_add_test(tc, test_refusals_in_memory);
    tcase_add_test(tc, test_refusals_files);
    tcase_add_test(tc, test_ignorable);
    tcase_add_test(tc, test_loaders_tables);
    suite_add_tcase(s, tc);
    return s;
}

CHECK_MAIN(checkpoint_suite)

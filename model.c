/* model.c: load a whole SD1.x or SD2.x model. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include "model.h"
#include "json.h"

static int is_dir(const char *p) { struct stat st; return stat(p, &st) == 0 && S_ISDIR(st.st_mode); }
static int is_file(const char *p) { struct stat st; return stat(p, &st) == 0 && S_ISREG(st.st_mode); }

static char *read_text(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    for (size_t r; buf && (r = fread(buf + len, 1, cap - len, f)) > 0; ) {
        len += r;
        if (len == cap) { char *nb = realloc(buf, cap *= 2); if (!nb) { free(buf); buf = NULL; } else buf = nb; }
    }
    fclose(f);
    if (buf) { buf[len < cap ? len : cap - 1] = 0; *n = len; }
    return buf;
}

/* *v = the number under key (left as it is when absent), which must be a
 * whole number in [lo, 1000000]: checked before the conversion to int,
 * since a double out of int's range converts to nothing defined */
static int whole_number(const json *j, const char *key, int lo, int *v, const char *path, const char *usual,
                        char *err) {
    double d = json_num(j, key, *v);
    if (d >= lo && d <= 1000000 && d == floor(d)) { *v = (int)d; return 0; }
    snprintf(err, SD_ERR_LEN, "%.500s: \"%s\" %g is not a whole number in [%d, 1000000] (SD1.x uses %s)",
             path, key, d, lo, usual);
    return -1;
}

/* scheduler/scheduler_config.json, else SD1.x's values */
static int load_scheduler(sd_model *m, const char *dir, char *err) {
    char path[1200], jerr[256];
    snprintf(path, sizeof path, "%s/scheduler/scheduler_config.json", dir ? dir : "");
    const char *schedule = "scaled_linear", *pred = "epsilon";
    double b0 = 0.00085, b1 = 0.012;
    int T = 1000;
    m->steps_offset = 1;
    json *j = NULL;
    if (dir && is_file(path)) {
        size_t n; char *txt = read_text(path, &n);
        j = txt ? json_parse(txt, n, jerr, sizeof jerr) : NULL;
        free(txt);
        if (!j || j->type != JSON_OBJECT) {
            snprintf(err, SD_ERR_LEN, "%.500s: %.300s (fix or delete the file; SD1.x defaults are used without it)", path, j ? "not a JSON object" : jerr);
            json_free(j);
            return -1;
        }
        schedule = json_str(j, "beta_schedule", schedule);
        pred = json_str(j, "prediction_type", pred);
        b0 = json_num(j, "beta_start", b0);
        b1 = json_num(j, "beta_end", b1);
        if (whole_number(j, "num_train_timesteps", 2, &T, path, "1000", err) ||
            whole_number(j, "steps_offset", 0, &m->steps_offset, path, "1", err)) {
            json_free(j);
            return -1;
        }
        /* diffusers builds any scheduler class from this file, so a
         * timestep_spacing written here overrides every class's default */
        snprintf(m->timestep_spacing, sizeof m->timestep_spacing, "%s", json_str(j, "timestep_spacing", ""));
    }
    char derr[DDPM_ERR_LEN];
    int rc = ddpm_schedule_init(&m->sched, schedule, T, b0, b1, derr);
    if (rc == 0) rc = ddpm_prediction_from_name(pred, &m->prediction, derr);
    if (rc) {
        /* the names in derr come from the file: control bytes would break the one line */
        for (char *c = derr; *c; c++) if ((unsigned char)*c < 0x20 || *c == 0x7f) *c = '?';
        snprintf(err, SD_ERR_LEN, "%.500s: %.300s", j ? path : "scheduler", derr);
    }
    json_free(j);
    return rc;
}

static int load_diffusers(sd_model *m, const char *dir, char *err) {
    char sub[1200];
    static const char *parts[] = {"unet", "text_encoder", "vae", "tokenizer"};
    for (int i = 0; i < 4; i++) {
        snprintf(sub, sizeof sub, "%s/%s", dir, parts[i]);
        if (!is_dir(sub)) {
            snprintf(err, SD_ERR_LEN, "%s: no %s/ folder (a diffusers Stable Diffusion folder has unet/, text_encoder/, vae/ and tokenizer/)", dir, parts[i]);
            return -1;
        }
    }
    char e[ST_ERR_LEN > UNET_ERR_LEN ? ST_ERR_LEN : UNET_ERR_LEN];
    snprintf(sub, sizeof sub, "%s/tokenizer", dir);
    m->tok = tok_load(sub, e, sizeof e);
    if (!m->tok) { snprintf(err, SD_ERR_LEN, "%s", e); return -1; }
    snprintf(sub, sizeof sub, "%s/text_encoder", dir);
    if (clip_load_hf_dtype(&m->clip, sub, m->wdtype, e)) { snprintf(err, SD_ERR_LEN, "%s", e); return -1; }
    snprintf(sub, sizeof sub, "%s/unet", dir);
    if (unet_load_diffusers_dtype(&m->unet, sub, m->wdtype, e)) { snprintf(err, SD_ERR_LEN, "%s", e); return -1; }
    snprintf(sub, sizeof sub, "%s/vae", dir);
    if (vae_load_diffusers_dtype(&m->vae, sub, m->wdtype, e)) { snprintf(err, SD_ERR_LEN, "%s", e); return -1; }
    return load_scheduler(m, dir, err);
}

/* ---- SD1.x single-file checkpoint (LDM key names) ---------------------------
 * The architecture comes from the tensors' shapes (checkpoint.c); each of
 * our parameter tables, named by the diffusers module tree, is mapped name by
 * name onto the file. The tokenizer is not in the file: it is looked for in
 * --tokenizer DIR, beside the file, then in the Hugging Face cache. */
#include <dirent.h>
#include "checkpoint.h"

static const char *vae_ldm_map(const char *name, void *ctx, char *buf, size_t len) {
    return ldm_vae_name(name, (const ldm_vae_layout *)ctx, buf, len) >= 0 ? buf : NULL;
}

static int has_vocab(const char *dir) {
    char p[1300];
    snprintf(p, sizeof p, "%.1200s/vocab.json", dir);
    if (!is_file(p)) return 0;
    snprintf(p, sizeof p, "%.1200s/merges.txt", dir);
    return is_file(p);
}

/* where the CLIP vocabulary for a single file may be */
static int find_tokenizer(char *out, size_t n, const char *file, const char *tokenizer_dir) {
    if (tokenizer_dir) { snprintf(out, n, "%s", tokenizer_dir); return has_vocab(out) || is_file(out); }
    char dir[1024];
    snprintf(dir, sizeof dir, "%s", file);
    char *slash = strrchr(dir, '/');
    if (slash) *slash = 0; else snprintf(dir, sizeof dir, ".");
    snprintf(out, n, "%s/tokenizer", dir);
    if (has_vocab(out)) return 1;
    snprintf(out, n, "%s", dir);
    if (has_vocab(out)) return 1;
    /* the Hugging Face cache: $HF_HUB_CACHE, $HF_HOME/hub, ~/.cache/huggingface/hub */
    char hub[1024];
    const char *e;
    if ((e = getenv("HF_HUB_CACHE")) && *e) snprintf(hub, sizeof hub, "%s", e);
    else if ((e = getenv("HF_HOME")) && *e) snprintf(hub, sizeof hub, "%s/hub", e);
    else if ((e = getenv("HOME")) && *e) snprintf(hub, sizeof hub, "%s/.cache/huggingface/hub", e);
    else return 0;
    static const char *repos[] = {"models--openai--clip-vit-large-patch14", "models--runwayml--stable-diffusion-v1-5",
                                  "models--stable-diffusion-v1-5--stable-diffusion-v1-5",
                                  /* SD2.x: the same vocabulary (its pad token is set after loading) */
                                  "models--stabilityai--stable-diffusion-2-1", "models--stabilityai--stable-diffusion-2-1-base"};
    for (size_t r = 0; r < sizeof repos / sizeof repos[0]; r++) {
        char snaps[1200];
        snprintf(snaps, sizeof snaps, "%s/%s/snapshots", hub, repos[r]);
        DIR *d = opendir(snaps);
        if (!d) continue;
        struct dirent *de;
        int found = 0;
        while (!found && (de = readdir(d))) {
            if (de->d_name[0] == '.') continue;
            snprintf(out, n, "%.600s/%.200s", snaps, de->d_name);
            if (has_vocab(out)) found = 1;
            else {
                snprintf(out, n, "%.600s/%.200s/tokenizer", snaps, de->d_name);
                found = has_vocab(out);
            }
        }
        closedir(d);
        if (found) return 1;
    }
    return 0;
}

/* count the file's tensors under prefix that a loader must use */
static int count_prefixed(const st_file *f, const char *prefix) {
    int n = 0;
    size_t k = strlen(prefix);
    for (int i = 0; i < f->ntensors; i++)
        if (strncmp(f->tensors[i].name, prefix, k) == 0 && !ldm_ignorable(f->tensors[i].name)) n++;
    return n;
}

/* An SD2.x single file does not say whether it predicts epsilon (SD2.0 /
 * 2.1 base, 512) or v (the 768 models). AUTOMATIC1111 reads a .yaml of the
 * same name beside it, whose model.params.parameterization is "v" for the
 * v models; so do we. Without one we take diffusers' answer for a file
 * without a global step: v_prediction. */
static int sd2_prediction(sd_model *m, const char *path, char *err) {
    char yaml[1100];
    snprintf(yaml, sizeof yaml, "%.1000s", path);
    char *dot = strrchr(yaml, '.'), *slash = strrchr(yaml, '/');
    if (dot && (!slash || dot > slash)) *dot = 0;
    strcat(yaml, ".yaml");
    m->prediction = DDPM_V_PREDICTION;
    if (!is_file(yaml)) return 0;
    size_t n;
    char *txt = read_text(yaml, &n);
    if (!txt) { snprintf(err, SD_ERR_LEN, "%.600s: %s (fix its permissions or remove it)", yaml, strerror(errno)); return -1; }
    /* "parameterization: "v"" (quoted or not); absent means LDM's default, eps */
    m->prediction = DDPM_EPSILON;
    const char *k = strstr(txt, "parameterization:");
    if (k) {
        k += strlen("parameterization:");
        while (*k == ' ' || *k == '\t' || *k == '"' || *k == '\'') k++;
        if (*k == 'v' && (k[1] == '"' || k[1] == '\'' || k[1] == '\n' || k[1] == '\r' || k[1] == ' ' || k[1] == 0))
            m->prediction = DDPM_V_PREDICTION;
    }
    free(txt);
    return 0;
}

static int sd_model_load_single_file(sd_model *m, const char *path, const char *tokenizer_dir, char *err) {
    char e[ST_ERR_LEN > UNET_ERR_LEN ? ST_ERR_LEN : UNET_ERR_LEN], nm[LDM_NAME_LEN];
    char tokdir[1200];
    if (!find_tokenizer(tokdir, sizeof tokdir, path, tokenizer_dir)) {
        if (tokenizer_dir)
            snprintf(err, SD_ERR_LEN, "%s: no vocab.json + merges.txt there (give --tokenizer the tokenizer folder of openai/clip-vit-large-patch14)", tokenizer_dir);
        else
            snprintf(err, SD_ERR_LEN, "%.600s: no CLIP tokenizer found beside it or in the Hugging Face cache (download vocab.json and merges.txt of openai/clip-vit-large-patch14 and pass --tokenizer DIR)", path);
        return -1;
    }
    st_file f;
    if (st_open(&f, path, e)) { snprintf(err, SD_ERR_LEN, "%s", e); return -1; }
    ldm_arch a;
    int rc = -1;
    if (ldm_infer_file(&f, &a, e)) { snprintf(err, SD_ERR_LEN, "%s", e); goto done; }

    /* UNet */
    unet_config c;
    memset(&c, 0, sizeof c);
    c.in_channels = a.unet.in_channels; c.out_channels = a.unet.out_channels;
    c.sample_size = a.unet.sample_size; c.nlevels = a.unet.nlevels;
    for (int b = 0; b < c.nlevels; b++) {
        c.block_out[b] = a.unet.block_out[b]; c.layers[b] = a.unet.layout.layers[b];
        c.down_attn[b] = a.unet.layout.down_attn[b]; c.up_attn[b] = a.unet.layout.up_attn[b];
        c.heads[b] = a.unet.heads[b]; c.tlayers[b] = a.unet.tlayers[b];
    }
    c.cross_dim = a.unet.cross_dim; c.groups = a.unet.groups; c.eps = a.unet.eps;
    c.linear_proj = a.unet.linear_proj; c.flip_sin_to_cos = a.unet.flip_sin_to_cos;
    c.freq_shift = a.unet.freq_shift;
    if (unet_build_dtype(&m->unet, &c, m->wdtype, e)) { snprintf(err, SD_ERR_LEN, "%s: %s", path, e); goto done; }
    for (int i = 0; i < m->unet.ntable; i++) {
        const unet_param *p = &m->unet.table[i];
        int sq = ldm_unet_name(p->name, &a.unet.layout, nm, sizeof nm);
        if (sq < 0) { snprintf(err, SD_ERR_LEN, "%s: UNet tensor for '%s' has no LDM name (unsupported layout)", path, p->name); goto done; }
        if (unet_read_param(&m->unet, i, &f, nm, sq, e)) { snprintf(err, SD_ERR_LEN, "%s", e); goto done; }
    }
    if (count_prefixed(&f, LDM_UNET_PREFIX) != m->unet.ntable) {
        snprintf(err, SD_ERR_LEN, "%s: holds %d UNet tensors, an SD1.x UNet of this shape has %d (not an SD1.x checkpoint, or a modified one)",
                 path, count_prefixed(&f, LDM_UNET_PREFIX), m->unet.ntable);
        goto done;
    }
    /* VAE: vae_load_st checks that every first_stage_model.* tensor is used */
    vae_config vc;
    memset(&vc, 0, sizeof vc);
    vc.in_channels = a.vae.in_channels; vc.out_channels = a.vae.out_channels;
    vc.latent_channels = a.vae.latent_channels; vc.nlevels = a.vae.nlevels;
    for (int b = 0; b < vc.nlevels; b++) vc.block_out[b] = a.vae.block_out[b];
    vc.layers = a.vae.layers_per_block; vc.groups = a.vae.groups; vc.mid_attn = a.vae.mid_attn;
    vc.quant_conv = a.vae.quant_conv; vc.post_quant_conv = a.vae.post_quant_conv;
    vc.scaling_factor = a.vae.scaling_factor; vc.sample_size = a.vae.sample_size;
    if (vae_build_dtype(&m->vae, &vc, m->wdtype, e) || vae_load_st(&m->vae, &f, vae_ldm_map, &a.vae.layout, LDM_VAE_PREFIX, e)) {
        snprintf(err, SD_ERR_LEN, "%s", e); goto done;
    }
    /* CLIP text model (SD2.x: OpenCLIP's names, fused q/k/v, gelu) */
    clip_config cc;
    clip_config_default(&cc);
    cc.vocab_size = a.clip.vocab_size; cc.hidden_size = a.clip.hidden_size;
    cc.intermediate_size = a.clip.intermediate_size; cc.num_layers = a.clip.num_layers;
    cc.num_heads = a.clip.num_heads; cc.max_pos = a.clip.max_pos;
    cc.act = a.clip.gelu ? CLIP_ACT_GELU : CLIP_ACT_QUICKGELU;
    if (clip_init_dtype(&m->clip, &cc, m->wdtype, e)) { snprintf(err, SD_ERR_LEN, "%s: %s", path, e); goto done; }
    for (int i = 0; i < m->clip.ntable; i++) {
        const clip_param *p = &m->clip.table[i];
        int sq = ldm_clip_name(p->name, &a.clip.layout, nm, sizeof nm);
        if (sq < 0) { snprintf(err, SD_ERR_LEN, "%s: text encoder tensor for '%s' has no LDM name", path, p->name); goto done; }
        if (sq >= LDM_SPLIT_Q) {
            /* one third of a fused in_proj: through fp32, then held as the table says */
            float *buf = malloc(p->numel * sizeof *buf);
            if (!buf) { snprintf(err, SD_ERR_LEN, "%s: out of memory", path); goto done; }
            int r = ldm_read_split(&f, nm, sq, p->ndim, p->shape, buf, e);
            if (r == 0) clip_param_set(&m->clip, i, buf);
            free(buf);
            if (r) { snprintf(err, SD_ERR_LEN, "%s", e); goto done; }
        } else if (clip_read_param(&m->clip, i, &f, nm, sq, e)) { snprintf(err, SD_ERR_LEN, "%s", e); goto done; }
    }
    /* every text-encoder tensor is used, but for SD2.x's last resblock (12
     * tensors: ln_1, in_proj, out_proj, ln_2, c_fc, c_proj, weight and bias)
     * when the file has it, which the penultimate-layer conditioning never
     * runs; q/k/v are 3 table entries from 2 fused tensors per layer */
    const char *cpre = a.sd2 ? LDM_OPENCLIP_PREFIX : LDM_CLIP_PREFIX;
    int want = a.sd2 ? m->clip.ntable - 4 * cc.num_layers + 12 * (a.clip.resblocks - cc.num_layers)
                     : m->clip.ntable;
    if (count_prefixed(&f, cpre) != want) {
        snprintf(err, SD_ERR_LEN, "%s: holds %d text-encoder tensors, expected %d (not an SD%s checkpoint, or a modified one)",
                 path, count_prefixed(&f, cpre), want, a.sd2 ? "2.x" : "1.x");
        goto done;
    }
    m->tok = tok_load(tokdir, e, sizeof e);
    if (!m->tok) { snprintf(err, SD_ERR_LEN, "%s", e); goto done; }
    /* SD2.x pads after the end-of-text token with "!" (id 0 in the CLIP
     * vocabulary), as open_clip's tokenizer and stabilityai's tokenizer/
     * special_tokens_map.json do, whatever tokenizer folder was found */
    if (a.sd2 && tok_id(m->tok, "!") >= 0) m->tok->pad_id = tok_id(m->tok, "!");
    if (m->tok->n_vocab != cc.vocab_size) {
        snprintf(err, SD_ERR_LEN, "%.600s: the tokenizer has %d tokens but the text encoder %d (give --tokenizer the matching vocabulary)", tokdir, m->tok->n_vocab, cc.vocab_size);
        goto done;
    }
    rc = load_scheduler(m, NULL, err);
    if (rc == 0 && a.sd2) {
        rc = sd2_prediction(m, path, err);
        /* the v models are the 768 ones, the epsilon ones (2.0 / 2.1 base) 512 */
        m->unet.cfg.sample_size = m->prediction == DDPM_V_PREDICTION ? 96 : 64;
    }
done:
    st_close(&f);
    return rc;
}

int sd_model_load(sd_model *m, const char *path, const char *tokenizer_dir, char *err) {
    return sd_model_load_dtype(m, path, tokenizer_dir, WEIGHT_F32, err);
}

int sd_model_load_dtype(sd_model *m, const char *path, const char *tokenizer_dir, weight_dtype wdtype,
                        char *err) {
    memset(m, 0, sizeof *m);
    m->wdtype = wdtype;
    if (!path) path = SD_DEFAULT_MODEL;
    snprintf(m->path, sizeof m->path, "%s", path);
    const char *base = strrchr(path, '/');
    base = base && base[1] ? base + 1 : path;
    snprintf(m->name, sizeof m->name, "%s", base);
    char *dot = strrchr(m->name, '.');
    if (dot && strcmp(dot, ".safetensors") == 0) *dot = 0;
    int rc;
    if (is_dir(path)) {
        rc = load_diffusers(m, path, err);
    } else if (is_file(path)) {
        m->single_file = 1;
        rc = sd_model_load_single_file(m, path, tokenizer_dir, err);
    } else {
        snprintf(err, SD_ERR_LEN, "%s: %s (give --model a diffusers folder or an SD1.x .safetensors file)", path, strerror(errno));
        rc = -1;
    }
    if (rc) sd_model_free(m);
    return rc;
}

void sd_model_free(sd_model *m) {
    if (m->tok) tok_free(m->tok);
    m->tok = NULL;
    clip_free(&m->clip);
    unet_free(&m->unet);
    vae_free(&m->vae);
    ddpm_free(&m->sched);
}

/* a part's bytes: nmat of its n numbers are matrices, 2 bytes each when fp16 */
static size_t part_bytes(size_t n, size_t nmat, int f16) {
    return f16 ? (n - nmat) * sizeof(float) + nmat * sizeof(uint16_t) : n * sizeof(float);
}

size_t sd_model_weight_bytes(const sd_model *m) {
    return part_bytes(m->clip.num_params, m->clip.nmat, m->clip.params16 != NULL) +
           part_bytes(m->unet.nparams, m->unet.nmat, m->unet.params16 != NULL) +
           part_bytes(m->vae.nparams, m->vae.nmat, m->vae.params16 != NULL);
}

int sd_latent_side(const sd_model *m, int image_side) {
    return vae_latent_side(&m->vae.cfg, image_side);
}

int sd_default_image_side(const sd_model *m) {
    /* the VAE halves the side once per level but the last */
    return m->unet.cfg.sample_size << (m->vae.cfg.nlevels - 1);
}

int sd_encode_prompts(sd_model *m, const char **prompts, int n, int clip_skip, float *ctx, char *err) {
    int d = m->clip.config.hidden_size;
    int *ids = malloc(sizeof(int) * TOK_CTX * (size_t)n);
    if (!ids) { snprintf(err, SD_ERR_LEN, "out of memory"); return -1; }
    for (int i = 0; i < n; i++) tok_encode_sd(m->tok, prompts[i], ids + (size_t)i * TOK_CTX);
    int rc = clip_forward(&m->clip, ctx, ids, n, TOK_CTX, clip_skip);
    if (rc) snprintf(err, SD_ERR_LEN, "text encoder: %s", m->clip.err);
    free(ids);
    (void)d;
    return rc;
}

/* model.c: load a whole SD1.x model. */
#include <errno.h>
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
        T = (int)json_num(j, "num_train_timesteps", T);
        m->steps_offset = (int)json_num(j, "steps_offset", 1);
    }
    char derr[DDPM_ERR_LEN];
    int rc = ddpm_schedule_init(&m->sched, schedule, T, b0, b1, derr);
    if (rc == 0) rc = ddpm_prediction_from_name(pred, &m->prediction, derr);
    if (rc) snprintf(err, SD_ERR_LEN, "%.500s: %.300s", j ? path : "scheduler", derr);
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
    if (clip_load_hf(&m->clip, sub, e)) { snprintf(err, SD_ERR_LEN, "%s", e); return -1; }
    snprintf(sub, sizeof sub, "%s/unet", dir);
    if (unet_load_diffusers(&m->unet, sub, e)) { snprintf(err, SD_ERR_LEN, "%s", e); return -1; }
    snprintf(sub, sizeof sub, "%s/vae", dir);
    if (vae_load_diffusers(&m->vae, sub, e)) { snprintf(err, SD_ERR_LEN, "%s", e); return -1; }
    return load_scheduler(m, dir, err);
}

/* SD1.x single-file checkpoint (LDM key names) */
static int sd_model_load_single_file(sd_model *m, const char *path, const char *tokenizer_dir, char *err) {
    (void)m; (void)tokenizer_dir;
    snprintf(err, SD_ERR_LEN, "%s: single-file checkpoints are not supported by this build yet (convert it to a diffusers folder)", path);
    return -1;
}

int sd_model_load(sd_model *m, const char *path, const char *tokenizer_dir, char *err) {
    memset(m, 0, sizeof *m);
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

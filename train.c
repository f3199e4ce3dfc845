/* train.c: ./train DIR — LoRA fine-tuning of a Stable Diffusion 1.x model on
 * a folder of captioned images (article section 5).
 *
 * One optimizer step (article 3.3 and 4.2, with what they leave out):
 *   x0    = VAE(image) * 0.18215          latents, computed once and cached
 *   c     = CLIP(tokenize(caption))        context, cached unless --te
 *   t ~ U{0..999}, eps ~ N(0, I)
 *   x_t   = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps                     (ddpm.c)
 *   loss  = mean((UNet(x_t, t, c) - eps)^2)    [ * min-SNR weight ]
 *   backward through the frozen UNet: gradients for LoRA A, B only  (lora.c)
 *   AdamW on A, B                                                    (optim.c)
 * and every --save-every steps the LoRA in kohya's format plus a training
 * state that --resume continues from, byte for byte. */
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "caption.h"
#include "cli.h"
#include "cuda/cuda.h"
#include "bucket.h"
#include "dataset.h"
#include "dist.h"
#include "generate.h"
#include "image.h"
#include "profile.h"
#include "plot.h"
#include "grid.h"
#include "lora.h"
#include "model.h"
#include "optim.h"
#include "safetensors.h"

typedef struct {
    const char *data, *model, *out, *name, *targets, *sched, *resume, *sample_prompt, *tokenizer, *precision,
               *weight_dtype, *device, *reg, *compute;
    int buckets, bucket_step, min_bucket, max_bucket;
    float prior_loss_weight;
    int rank, res, batch, accum, steps, epochs, warmup, save_every, sample_every, te, flip,
        random_crop, grad_ckpt, threads, clip_skip, full, no_grid, conv_rank;
    int tf32;              /* --tf32 (--device cuda only) */
    float conv_alpha;      /* 0: the conv rank (scale 1) */
    float alpha, dropout, lr, te_lr, beta1, beta2, adam_eps, wd, clip, min_snr, noise_offset;
    uint64_t seed;
    /* captions (caption.h): which files, and what each step does to them */
    const char *caption_ext;
    caption_opts cap;
} train_args;

/* ---------------------------------------------------------------- signals */
static volatile sig_atomic_t g_stop = 0;
static void on_signal(int sig) { (void)sig; g_stop = 1; }

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int mkdir_p(const char *dir, char *err) {
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", dir);
    for (char *p = buf + 1; ; p++) {
        if (*p == '/' || *p == 0) {
            char c = *p; *p = 0;
            if (mkdir(buf, 0777) != 0 && errno != EEXIST) {
                snprintf(err, SD_ERR_LEN, "%.600s: cannot create folder: %s (choose another --out)", buf, strerror(errno));
                return -1;
            }
            *p = c;
            if (!c) break;
        }
    }
    return 0;
}

/* ------------------------------------------------------------- the data */
typedef struct {
    int n;             /* images */
    int variants;      /* 1, or 2 with --flip (the mirrored latent as well) */
    int lc, lh, lw;    /* latent shape */
    float *latents;    /* (n * variants, lc, lh, lw), cached once */
    int d;             /* context width */
    float *ctx;        /* (n, 77, d): cached contexts (NULL with --te) */
    int *ids;          /* (n, 77) token ids */
    float *ctx_empty;  /* (77, d): the empty caption's context, for --caption-dropout without --te */
    /* --buckets (bucket.h): the resolutions, each image's bucket and the
     * size it is scaled to before the crop, where its latents start in
     * `latents`, and the current epoch's batches */
    bucket_reso *resos;
    int nresos;
    int *bucket_of, *rw, *rh;
    size_t *lat_off;
    long nbatches;     /* per epoch */
    long *bstart;
    int *blen;
} train_data;

/* decode, resize the short side to res, crop (centre, or at a seeded random
 * offset), optionally mirror; -> CHW floats in [-1, 1] */
static int load_image_chw(float *chw, const char *path, int res, int random_crop, int flip,
                          rng_t *rng, char *err) {
    image_t im, cr;
    if (image_load(&im, path, err, SD_ERR_LEN)) return -1;
    int x0 = -1, y0 = -1;
    if (random_crop) {
        /* the scaled size, as image_resize_crop computes it */
        int sw = im.w <= im.h ? res : (int)((long)res * im.w / im.h);
        int sh = im.h <= im.w ? res : (int)((long)res * im.h / im.w);
        x0 = sw > res ? (int)(rng_u64(rng) % (uint64_t)(sw - res + 1)) : 0;
        y0 = sh > res ? (int)(rng_u64(rng) % (uint64_t)(sh - res + 1)) : 0;
    }
    int rc = image_resize_crop(&cr, &im, res, res, res, x0, y0, IMAGE_LANCZOS, err, SD_ERR_LEN);
    image_free(&im);
    if (rc) return -1;
    if (flip) image_flip_h(cr.rgb, res, res);
    image_to_chw(chw, cr.rgb, res, res);
    image_free(&cr);
    return 0;
}

/* latents of every image (and its mirror with --flip), encoded once: the VAE
 * is frozen, so the same image always gives the same latent distribution;
 * the posterior sample is drawn once here with a seeded noise, as kohya's
 * cache_latents does. */
static int cache_latents(train_data *td, sd_model *m, const dataset_t *ds, const train_args *a, char *err) {
    int res = a->res;
    td->lc = m->vae.cfg.latent_channels;
    td->lh = td->lw = sd_latent_side(m, res);
    td->variants = a->flip ? 2 : 1;
    size_t per = (size_t)td->lc * td->lh * td->lw;
    td->latents = malloc(sizeof(float) * per * td->n * td->variants);
    float *img = malloc(sizeof(float) * 3 * (size_t)res * res);
    float *noise = malloc(sizeof(float) * per);
    if (!td->latents || !img || !noise) { snprintf(err, SD_ERR_LEN, "out of memory for the latent cache"); free(img); free(noise); return -1; }
    if (vae_alloc_acts(&m->vae, 1, res, res, 0)) { snprintf(err, SD_ERR_LEN, "VAE: %s", m->vae.err); free(img); free(noise); return -1; }
    rng_t rng; rng_seed(&rng, a->seed ^ 0x6c6174656e7473ULL);   /* "latents" */
    double t0 = now_s();
    int lo, hi;                    /* under MPI this rank's share; the rest only draws its noise */
    dist_share(td->n, &lo, &hi);
    for (int i = 0; i < td->n; i++) {
        for (int v = 0; v < td->variants; v++) {
            if (i < lo || i >= hi) { for (size_t k = 0; k < per; k++) (void)rng_normal(&rng); continue; }
            if (load_image_chw(img, ds->path[i], res, 0, v, &rng, err)) { free(img); free(noise); return -1; }
            for (size_t k = 0; k < per; k++) noise[k] = rng_normal(&rng);
            if (vae_encode_latents(&m->vae, td->latents + ((size_t)i * td->variants + v) * per, img, noise, 1, res, res)) {
                snprintf(err, SD_ERR_LEN, "%s: VAE: %s", ds->path[i], m->vae.err);
                free(img); free(noise); return -1;
            }
        }
        if (isatty(2) && i >= lo && i < hi) fprintf(stderr, "\rcaching latents %d/%d", i + 1, td->n);
    }
    if (dist_allgather_rows(td->latents, per * td->variants, td->n, err)) { free(img); free(noise); return -1; }
    fprintf(stderr, "%scached %d latents (%dx%d) in %.1f s\n", isatty(2) ? "\r" : "",
            td->n * td->variants, td->lh, td->lw, now_s() - t0);
    free(img); free(noise);
    return 0;
}

/* --buckets: decode, scale to rw x rh (covering the bucket bw x bh, one
 * side exactly), crop the other side at its centre (kohya: floor of half
 * the excess) or at a seeded random offset in [0, excess], optionally
 * mirror; -> CHW floats in [-1, 1] */
static int load_bucket_chw(float *chw, const char *path, int bw, int bh, int rw, int rh, int random_crop,
                           int flip, rng_t *rng, char *err) {
    image_t im;
    if (image_load(&im, path, err, SD_ERR_LEN)) return -1;
    uint8_t *sc = malloc((size_t)rw * rh * 3), *cr = malloc((size_t)bw * bh * 3);
    int rc = !sc || !cr || image_resize(sc, rw, rh, im.rgb, im.w, im.h, IMAGE_LANCZOS);
    image_free(&im);
    if (rc) { free(sc); free(cr); snprintf(err, SD_ERR_LEN, "%.600s: out of memory resizing it", path); return -1; }
    int x0 = (rw - bw) / 2, y0 = (rh - bh) / 2;
    if (random_crop) {
        x0 = (int)(rng_u64(rng) % (uint64_t)(rw - bw + 1));
        y0 = (int)(rng_u64(rng) % (uint64_t)(rh - bh + 1));
    }
    for (int y = 0; y < bh; y++)
        memcpy(cr + (size_t)y * bw * 3, sc + ((size_t)(y0 + y) * rw + x0) * 3, (size_t)bw * 3);
    if (flip) image_flip_h(cr, bw, bh);
    image_to_chw(chw, cr, bw, bh);
    free(sc); free(cr);
    return 0;
}

/* is bucket k trained (has an image)? */
static int bucket_used(const train_data *td, int k) {
    for (int i = 0; i < td->n; i++)
        if (td->bucket_of[i] == k) return 1;
    return 0;
}

/* the VAE's activations for the largest bucket in use: any smaller shape
 * then fits (vae.h); with buckets, as big as one --res x --res image at most */
static int vae_alloc_buckets(train_data *td, sd_model *m, char *err) {
    int best = -1;
    size_t most = 0;
    for (int k = 0; k < td->nresos; k++) {
        if (!bucket_used(td, k)) continue;
        if (vae_alloc_acts(&m->vae, 1, td->resos[k].h, td->resos[k].w, 0)) { snprintf(err, SD_ERR_LEN, "VAE: %s", m->vae.err); return -1; }
        if (vae_acts_floats(&m->vae) > most) { most = vae_acts_floats(&m->vae); best = k; }
    }
    if (best >= 0 && vae_alloc_acts(&m->vae, 1, td->resos[best].h, td->resos[best].w, 0)) {
        snprintf(err, SD_ERR_LEN, "VAE: %s", m->vae.err); return -1;
    }
    return 0;
}

/* image i's latent shape with --buckets */
static void bucket_latent(const train_data *td, const sd_model *m, int i, int *lh, int *lw) {
    const bucket_reso *r = &td->resos[td->bucket_of[i]];
    *lh = sd_latent_side(m, r->h);
    *lw = sd_latent_side(m, r->w);
}

/* --buckets: the latents of every image at its bucket's shape (and its
 * mirror with --flip), one after the other from lat_off[i]; encoded once,
 * with seeded posterior noise, as cache_latents does */
static int cache_latents_buckets(train_data *td, sd_model *m, const dataset_t *ds, const train_args *a, char *err) {
    td->lc = m->vae.cfg.latent_channels;
    td->lh = td->lw = sd_latent_side(m, a->res);      /* the sample grids' shape */
    td->variants = a->flip ? 2 : 1;
    td->lat_off = malloc(sizeof(size_t) * (size_t)td->n);
    if (!td->lat_off) { snprintf(err, SD_ERR_LEN, "out of memory for the latent cache"); return -1; }
    size_t total = 0, most = 0;
    for (int i = 0; i < td->n; i++) {
        int lh, lw;
        bucket_latent(td, m, i, &lh, &lw);
        size_t per = (size_t)td->lc * lh * lw;
        td->lat_off[i] = total;
        total += per * td->variants;
        if (per > most) most = per;
    }
    size_t img_floats = 0;
    for (int k = 0; k < td->nresos; k++)
        if ((size_t)td->resos[k].w * td->resos[k].h > img_floats) img_floats = (size_t)td->resos[k].w * td->resos[k].h;
    td->latents = malloc(sizeof(float) * (total ? total : 1));
    float *img = malloc(sizeof(float) * 3 * img_floats);
    float *noise = malloc(sizeof(float) * (most ? most : 1));
    if (!td->latents || !img || !noise) { snprintf(err, SD_ERR_LEN, "out of memory for the latent cache"); free(img); free(noise); return -1; }
    if (vae_alloc_buckets(td, m, err)) { free(img); free(noise); return -1; }
    rng_t rng; rng_seed(&rng, a->seed ^ 0x6c6174656e7473ULL);   /* "latents" */
    double t0 = now_s();
    for (int i = 0; i < td->n; i++) {
        const bucket_reso *r = &td->resos[td->bucket_of[i]];
        int lh, lw;
        bucket_latent(td, m, i, &lh, &lw);
        size_t per = (size_t)td->lc * lh * lw;
        for (int v = 0; v < td->variants; v++) {
            if (load_bucket_chw(img, ds->path[i], r->w, r->h, td->rw[i], td->rh[i], 0, v, &rng, err)) { free(img); free(noise); return -1; }
            for (size_t k = 0; k < per; k++) noise[k] = rng_normal(&rng);
            if (vae_encode_latents(&m->vae, td->latents + td->lat_off[i] + v * per, img, noise, 1, r->h, r->w)) {
                snprintf(err, SD_ERR_LEN, "%s: VAE: %s", ds->path[i], m->vae.err);
                free(img); free(noise); return -1;
            }
        }
        if (isatty(2)) fprintf(stderr, "\rcaching latents %d/%d", i + 1, td->n);
    }
    int used = 0;
    for (int k = 0; k < td->nresos; k++) used += bucket_used(td, k);
    fprintf(stderr, "%scached %d latents in %d bucket%s in %.1f s\n", isatty(2) ? "\r" : "",
            td->n * td->variants, used, used == 1 ? "" : "s", now_s() - t0);
    free(img); free(noise);
    return 0;
}

static int cache_text(train_data *td, sd_model *m, const dataset_t *ds, const train_args *a, char *err) {
    td->d = m->clip.config.hidden_size;
    td->ids = malloc(sizeof(int) * TOK_CTX * (size_t)td->n);
    if (!td->ids) { snprintf(err, SD_ERR_LEN, "out of memory"); return -1; }
    for (int i = 0; i < td->n; i++) tok_encode_sd(m->tok, ds->caption[i], td->ids + (size_t)i * TOK_CTX);
    if (a->te) return 0;                      /* the text encoder trains: no cache */
    td->ctx = malloc(sizeof(float) * TOK_CTX * (size_t)td->d * td->n);
    if (!td->ctx) { snprintf(err, SD_ERR_LEN, "out of memory for the text cache"); return -1; }
    int lo, hi;                    /* under MPI each rank encodes its share */
    dist_share(td->n, &lo, &hi);
    for (int i = lo; i < hi; i++)
        if (clip_forward(&m->clip, td->ctx + (size_t)i * TOK_CTX * td->d, td->ids + (size_t)i * TOK_CTX, 1, TOK_CTX, a->clip_skip)) {
            snprintf(err, SD_ERR_LEN, "text encoder: %s", m->clip.err);
            return -1;
        }
    /* a dropped caption is "": its context is cached once as well */
    if (a->cap.dropout > 0) {
        int ids[TOK_CTX];
        tok_encode_sd(m->tok, "", ids);
        td->ctx_empty = malloc(sizeof(float) * TOK_CTX * (size_t)td->d);
        if (!td->ctx_empty) { snprintf(err, SD_ERR_LEN, "out of memory for the text cache"); return -1; }
        if (clip_forward(&m->clip, td->ctx_empty, ids, 1, TOK_CTX, a->clip_skip)) {
            snprintf(err, SD_ERR_LEN, "text encoder: %s", m->clip.err);
            return -1;
        }
    }
    return dist_allgather_rows(td->ctx, (size_t)TOK_CTX * td->d, td->n, err);
}

/* ------------------------------------------------------------ the state
 * Everything a resumed run needs to continue exactly: LoRA weights, AdamW
 * moments, the step, the RNG streams (timesteps/noise, LoRA dropout), and
 * every step's loss as computed (loss.csv holds them rounded: the smoothed
 * column and loss.png are recomputed from these, so they come out the same). */
typedef struct {
    long step;             /* optimizer steps done */
    long sample_pos;       /* samples consumed (across epochs) */
    rng_t rng;             /* timesteps, noise, noise offset */
    adamw_t opt_unet, opt_te;
    double *loss;          /* (total) the loss of each step done */
    long nloss;            /* how many of them are known (step, or fewer from an old state) */
    long long started;     /* when the run began (Unix seconds): the LoRA's modelspec.date */
    nn_loss_scaler scaler; /* --compute fp16: the loss scale, kept for --resume */
} train_state;

static void fmt_u64(char *b, size_t n, uint64_t v) { snprintf(b, n, "%llu", (unsigned long long)v); }

/* the flags that must match for --resume to continue the same run */
static void run_signature(char *b, size_t n, const train_args *a, const char *model_name) {
    snprintf(b, n, "model=%s targets=%s rank=%d alpha=%g dropout=%g te=%d res=%d batch=%d accum=%d "
             "lr=%g te_lr=%g sched=%s warmup=%d steps=%d epochs=%d seed=%llu flip=%d crop=%d "
             "snr=%g offset=%g clip=%g wd=%g b1=%g b2=%g eps=%g clip_skip=%d",
             model_name, a->targets, a->rank, a->alpha, a->dropout, a->te, a->res, a->batch, a->accum,
             a->lr, a->te_lr, a->sched, a->warmup, a->steps, a->epochs, (unsigned long long)a->seed,
             a->flip, a->random_crop, a->min_snr, a->noise_offset, a->clip, a->wd, a->beta1, a->beta2,
             a->adam_eps, a->clip_skip);
    /* caption options only when set: a state from before they existed still resumes */
    size_t l = strlen(b);
    if (a->caption_ext) snprintf(b + l, n - l, " caption_ext=%s", a->caption_ext), l = strlen(b);
    if (caption_opts_active(&a->cap))
        snprintf(b + l, n - l, " shuffle_caption=%d keep_tokens=%d caption_dropout=%g keep_sep=%.32s", a->cap.shuffle,
                 a->cap.keep_tokens, a->cap.dropout, a->cap.keep_sep ? a->cap.keep_sep : "");
    l = strlen(b);
    if (a->conv_rank > 0 && l < n)
        snprintf(b + l, n - l, " conv_rank=%d conv_alpha=%g", a->conv_rank, a->conv_alpha);
    /* appended only when used, so the states of runs without them stay as they were */
    l = strlen(b);
    if (a->buckets && l < n)
        l += (size_t)snprintf(b + l, n - l, " buckets=%d,%d,%d,%d", a->bucket_step, a->min_bucket, a->max_bucket, a->res);
    if (a->reg && l < n)
        snprintf(b + l, n - l, " reg=%s prior=%g", a->reg, a->prior_loss_weight);
}

static int save_state(const char *path, const train_state *s, sd_model *m, const train_args *a, char *err) {
    st_writer *w = st_writer_new();
    if (!w) { snprintf(err, SD_ERR_LEN, "out of memory"); return -1; }
    int64_t n1 = (int64_t)m->unet.lora_nparams, n2 = (int64_t)m->clip.num_lora_params;
    int rc = 0;
    rc |= st_writer_add(w, "unet.lora", ST_F32, 1, &n1, m->unet.lora_params);
    rc |= st_writer_add(w, "unet.adam_m", ST_F32, 1, &n1, s->opt_unet.m);
    rc |= st_writer_add(w, "unet.adam_v", ST_F32, 1, &n1, s->opt_unet.v);
    if (a->te) {
        rc |= st_writer_add(w, "te.lora", ST_F32, 1, &n2, m->clip.lora_params);
        rc |= st_writer_add(w, "te.adam_m", ST_F32, 1, &n2, s->opt_te.m);
        rc |= st_writer_add(w, "te.adam_v", ST_F32, 1, &n2, s->opt_te.v);
    }
    int64_t nl = s->step;
    if (nl > 0) rc |= st_writer_add(w, "loss", ST_F64, 1, &nl, s->loss);
    char b[4][32], sig[1024];
    snprintf(b[0], 32, "%ld", s->step);
    snprintf(b[1], 32, "%ld", s->sample_pos);
    fmt_u64(b[2], 32, s->rng.state);
    fmt_u64(b[3], 32, m->unet.dropout_rng.state);
    char b4[32]; fmt_u64(b4, 32, m->clip.rng.state);
    char b5[32]; snprintf(b5, 32, "%lld", s->started);
    run_signature(sig, sizeof sig, a, m->name);
    rc |= st_writer_meta(w, "sdlora_state", "1");
    rc |= st_writer_meta(w, "step", b[0]);
    rc |= st_writer_meta(w, "sample_pos", b[1]);
    rc |= st_writer_meta(w, "rng", b[2]);
    rc |= st_writer_meta(w, "unet_dropout_rng", b[3]);
    rc |= st_writer_meta(w, "te_dropout_rng", b4);
    rc |= st_writer_meta(w, "started", b5);
    rc |= st_writer_meta(w, "run", sig);
    if (strcmp(a->compute, "fp16") == 0) {
        /* fp16's loss scale, and AdamW's own step count (skipped steps do not
         * advance it); only then, so other runs' states stay as they were */
        char b6[32], b7[32], b8[32];
        snprintf(b6, 32, "%.9g", s->scaler.scale);
        snprintf(b7, 32, "%ld", s->scaler.good);
        snprintf(b8, 32, "%ld", s->opt_unet.step);
        rc |= st_writer_meta(w, "loss_scale", b6);
        rc |= st_writer_meta(w, "loss_scale_good", b7);
        rc |= st_writer_meta(w, "adam_step", b8);
    }
    if (rc) { st_writer_free(w); snprintf(err, SD_ERR_LEN, "%.600s: out of memory", path); return -1; }
    rc = st_writer_save(w, path, err);
    st_writer_free(w);
    return rc;
}

static int meta_u64(const st_file *f, const char *key, uint64_t *v, const char *path, char *err) {
    const char *s = st_meta(f, key);
    char *end;
    if (!s || !*s) { snprintf(err, SD_ERR_LEN, "%s: no '%s' in the state (not an sdlora training state?)", path, key); return -1; }
    errno = 0;
    unsigned long long x = strtoull(s, &end, 10);
    if (*end || errno) { snprintf(err, SD_ERR_LEN, "%s: '%s' is not a number (the state file is corrupt)", path, key); return -1; }
    *v = x;
    return 0;
}

static int load_state(const char *path, train_state *s, sd_model *m, const train_args *a, long total, char *err) {
    st_file f;
    if (st_open(&f, path, err)) return -1;
    int rc = -1;
    uint64_t step, pos, r0, r1, r2;
    char sig[1024];
    run_signature(sig, sizeof sig, a, m->name);
    const char *have = st_meta(&f, "run");
    if (!st_meta(&f, "sdlora_state")) { snprintf(err, SD_ERR_LEN, "%s: not an sdlora training state (give --resume the state.safetensors that ./train wrote)", path); goto done; }
    if (!have || strcmp(have, sig) != 0) {
        snprintf(err, SD_ERR_LEN, "%s: was written by a run with other settings (resume with the same flags; it has: %.300s)", path, have ? have : "?");
        goto done;
    }
    if (meta_u64(&f, "step", &step, path, err) || meta_u64(&f, "sample_pos", &pos, path, err) ||
        meta_u64(&f, "rng", &r0, path, err) || meta_u64(&f, "unet_dropout_rng", &r1, path, err) ||
        meta_u64(&f, "te_dropout_rng", &r2, path, err)) goto done;
    int64_t n1 = (int64_t)m->unet.lora_nparams, n2 = (int64_t)m->clip.num_lora_params;
    if (st_read_f32(&f, "unet.lora", 1, &n1, m->unet.lora_params, err) ||
        st_read_f32(&f, "unet.adam_m", 1, &n1, s->opt_unet.m, err) ||
        st_read_f32(&f, "unet.adam_v", 1, &n1, s->opt_unet.v, err)) goto done;
    if (a->te && (st_read_f32(&f, "te.lora", 1, &n2, m->clip.lora_params, err) ||
                  st_read_f32(&f, "te.adam_m", 1, &n2, s->opt_te.m, err) ||
                  st_read_f32(&f, "te.adam_v", 1, &n2, s->opt_te.v, err))) goto done;
    if (step > (uint64_t)total) {
        snprintf(err, SD_ERR_LEN, "%s: at step %llu, past this run's %ld steps (resume with the same data and flags)", path, (unsigned long long)step, total);
        goto done;
    }
    /* the losses (a state written before they were kept has none: loss.csv's then) */
    const st_tensor *lt = st_find(&f, "loss");
    if (lt && (lt->dtype != ST_F64 || lt->ndim != 1 || lt->numel != step)) {
        snprintf(err, SD_ERR_LEN, "%s: 'loss' is not %llu float64 values (the state file is corrupt)", path, (unsigned long long)step);
        goto done;
    }
    if (lt) memcpy(s->loss, lt->data, sizeof(double) * (size_t)step);
    s->nloss = lt ? (long)step : 0;
    s->step = (long)step; s->sample_pos = (long)pos;
    s->opt_unet.step = s->opt_te.step = (long)step;
    s->rng.state = r0; m->unet.dropout_rng.state = r1; m->clip.rng.state = r2;
    /* the start of the run it continues (a state from before this was kept: now) */
    uint64_t started;
    if (st_meta(&f, "started") && meta_u64(&f, "started", &started, path, err) == 0) s->started = (long long)started;
    /* --compute fp16: the loss scale and AdamW's step count (a state without
     * them: the scale starts over, AdamW has done every step) */
    uint64_t good, astep;
    const char *ls = st_meta(&f, "loss_scale");
    if (ls && strcmp(a->compute, "fp16") == 0) {
        char *end;
        float sc = strtof(ls, &end);
        if (*end || !(sc > 0) || !isfinite(sc)) {
            snprintf(err, SD_ERR_LEN, "%s: 'loss_scale' is not a positive number (the state file is corrupt)", path);
            goto done;
        }
        if (meta_u64(&f, "loss_scale_good", &good, path, err) || meta_u64(&f, "adam_step", &astep, path, err)) goto done;
        if (astep > step) {
            snprintf(err, SD_ERR_LEN, "%s: 'adam_step' is past 'step' (the state file is corrupt)", path);
            goto done;
        }
        s->scaler.scale = sc;
        s->scaler.good = (long)good;
        s->opt_unet.step = s->opt_te.step = (long)astep;
    }
    err[0] = 0;
    rc = 0;
done:
    st_close(&f);
    return rc;
}

/* ------------------------------------------------------------ the LoRA file */
/* x as Python's str(float) writes it (kohya's metadata holds str() of its
 * float arguments): the shortest digits that give x back, ".0" on whole
 * numbers, an exponent below 1e-4 and from 1e16 on */
static void py_float(char *b, size_t n, float x) {
    if (!isfinite(x)) { snprintf(b, n, "%s", isnan(x) ? "nan" : x > 0 ? "inf" : "-inf"); return; }
    if (x == 0) { snprintf(b, n, "%s0.0", signbit(x) ? "-" : ""); return; }
    char t[48], dig[16], o[64];
    int p = 1;
    while (p < 9 && (snprintf(t, sizeof t, "%.*e", p - 1, x), strtof(t, NULL) != x)) p++;
    snprintf(t, sizeof t, "%.*e", p - 1, x);          /* [-]d.ddde[+-]XX */
    char *e = strchr(t, 'e');
    int ex = atoi(e + 1), neg = t[0] == '-', nd = 0, k = 0;
    for (char *q = t + neg; q < e; q++) if (*q != '.') dig[nd++] = *q;
    while (nd > 1 && dig[nd - 1] == '0') nd--;
    if (neg) o[k++] = '-';
    if (ex < -4 || ex >= 16) {                        /* 1e-05, 1.5e+16 */
        o[k++] = dig[0];
        if (nd > 1) { o[k++] = '.'; for (int i = 1; i < nd; i++) o[k++] = dig[i]; }
        k += snprintf(o + k, sizeof o - (size_t)k, "e%c%02d", ex < 0 ? '-' : '+', ex < 0 ? -ex : ex);
    } else if (ex < 0) {                              /* 0.05 */
        o[k++] = '0'; o[k++] = '.';
        for (int i = 0; i < -ex - 1; i++) o[k++] = '0';
        for (int i = 0; i < nd; i++) o[k++] = dig[i];
    } else {                                          /* 12.5, 100.0 */
        int whole = ex + 1;
        for (int i = 0; i < whole; i++) o[k++] = i < nd ? dig[i] : '0';
        o[k++] = '.';
        if (nd <= whole) o[k++] = '0';
        for (int i = whole; i < nd; i++) o[k++] = dig[i];
    }
    o[k] = 0;
    snprintf(b, n, "%s", o);
}

/* kohya's ss_optimizer for AdamW: torch's class name, and (as kohya writes
 * its --optimizer_args) the settings that differ from torch's defaults */
static void optimizer_desc(char *b, size_t n, const train_args *a) {
    char v1[32], v2[32], v3[32];
    int l = snprintf(b, n, "torch.optim.adamw.AdamW"), k = 0;
    char args[160] = "";
    if (a->wd != 1e-2f) { py_float(v1, sizeof v1, a->wd); k += snprintf(args + k, sizeof args - k, "%sweight_decay=%s", k ? "," : "", v1); }
    if (a->beta1 != 0.9f || a->beta2 != 0.999f) {
        py_float(v1, sizeof v1, a->beta1); py_float(v2, sizeof v2, a->beta2);
        k += snprintf(args + k, sizeof args - k, "%sbetas=(%s, %s)", k ? "," : "", v1, v2);
    }
    if (a->adam_eps != 1e-8f) { py_float(v3, sizeof v3, a->adam_eps); k += snprintf(args + k, sizeof args - k, "%seps=%s", k ? "," : "", v3); }
    if (k) snprintf(b + l, n - l, "(%s)", args);
}

/* what the LoRA file says beyond the flags: the data, how far the run is, when it began */
typedef struct {
    const dataset_t *ds;
    long sample_pos;      /* samples consumed so far */
    long long started;    /* Unix seconds */
} run_info;

/* kohya's modelspec.date: ISO 8601 without a zone, as Python's
 * datetime.fromtimestamp(t).isoformat() (local time); in UTC when the time
 * came from SOURCE_DATE_EPOCH (reproducible builds' convention) */
static void iso_date(char *b, size_t n, long long t) {
    time_t tt = (time_t)t;
    struct tm tmv;
    if (getenv("SOURCE_DATE_EPOCH")) gmtime_r(&tt, &tmv);
    else localtime_r(&tt, &tmv);
    strftime(b, n, "%Y-%m-%dT%H:%M:%S", &tmv);
}

static int save_lora(const char *path, sd_model *m, const train_args *a, long step, long total,
                     int n_images, const run_info *ri, char *err) {
    int nu = m->unet.nloras, nt = a->te ? clip_num_adapters(&m->clip) : 0;
    lora_ref *refs = malloc(sizeof(lora_ref) * (size_t)(nu + nt + 1));
    char (*names)[256] = malloc(256 * (size_t)(nu + nt + 1));
    if (!refs || !names) { free(refs); free(names); snprintf(err, SD_ERR_LEN, "out of memory"); return -1; }
    for (int i = 0; i < nu; i++) {
        lora_kohya_name(names[i], 256, "lora_unet", m->unet.loras[i].name);
        refs[i] = (lora_ref){names[i], &m->unet.loras[i].L, m->unet.loras[i].is_conv};
    }
    for (int i = 0; i < nt; i++) {
        clip_adapter *ad = clip_adapter_at(&m->clip, i);
        lora_kohya_name(names[nu + i], 256, "lora_te", ad->name);
        refs[nu + i] = (lora_ref){names[nu + i], &ad->L, 0};
    }
    /* kohya's ss_* metadata, which AUTOMATIC1111's and kohya's tools show.
     * The only clock time is the run's start, kept in the state: a resumed run
     * must write the same bytes. */
    char v[24][64];
    snprintf(v[0], 64, "%d", a->rank);
    snprintf(v[1], 64, "%g", a->alpha);
    snprintf(v[2], 64, "%g", a->lr);
    snprintf(v[3], 64, "%g", a->te ? a->te_lr : 0.0f);
    snprintf(v[4], 64, "%ld", step);
    snprintf(v[5], 64, "%ld", total);
    snprintf(v[6], 64, "(%d, %d)", a->res, a->res);
    snprintf(v[7], 64, "%llu", (unsigned long long)a->seed);
    snprintf(v[8], 64, "%d", n_images);
    snprintf(v[9], 64, "%d", a->batch);
    snprintf(v[10], 64, "%d", a->accum);
    snprintf(v[11], 64, "%g", a->dropout);
    snprintf(v[12], 64, "%g", a->min_snr);
    snprintf(v[13], 64, "%g", a->noise_offset);
    snprintf(v[14], 64, "%d", a->clip_skip);
    snprintf(v[15], 64, "%d", a->warmup);
    snprintf(v[16], 64, "%g", a->clip);
    /* kohya's get_model_version_str_for_sd1_sd2: sd_v1 / sd_v2, "_v" for v-prediction */
    int is_v2 = m->unet.cfg.cross_dim == 1024, is_vpred = m->prediction == DDPM_V_PREDICTION;
    char base_version[16];
    snprintf(base_version, sizeof base_version, "sd_v%d%s", is_v2 ? 2 : 1, is_vpred ? "_v" : "");
    const char *mk[] = {"ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_learning_rate",
                        "ss_unet_lr", "ss_text_encoder_lr", "ss_steps", "ss_max_train_steps", "ss_resolution",
                        "ss_seed", "ss_num_train_images", "ss_batch_size_per_device",
                        "ss_gradient_accumulation_steps", "ss_network_dropout", "ss_min_snr_gamma",
                        "ss_noise_offset", "ss_clip_skip", "ss_lr_warmup_steps", "ss_max_grad_norm",
                        "ss_lr_scheduler", "ss_base_model_version", "ss_v2", "ss_sd_model_name",
                        "ss_output_name", "ss_network_train_unet_only", "ss_training_comment", "sdlora_targets"};
    const char *mv[] = {"networks.lora", v[0], v[1], v[2], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9],
                        v[10], v[11], v[12], v[13], v[14], v[15], v[16], a->sched, base_version, is_v2 ? "True" : "False",
                        m->name, a->name, a->te ? "False" : "True", "trained with sdlora", a->targets};
    enum { NBASE = (int)(sizeof mk / sizeof mk[0]), NMORE = 20 };
    /* what kohya adds (train_network.py) and AUTOMATIC1111's LoRA card
     * shows: the data set's folders and tags, the epoch, the optimizer, and
     * the sai_model_spec keys (sd-scripts library/sai_model_spec.py) */
    const char *keys[NBASE + NMORE], *vals[NBASE + NMORE];
    memcpy(keys, mk, sizeof mk);
    memcpy(vals, mv, sizeof mv);
    int nk = NBASE;
    char *tags = caption_tag_frequency_json(ri->ds, a->data), *dirs = caption_dataset_dirs_json(ri->ds, a->data);
    char ep[32], opt[256], started[32], keep[16], cdrop[32], res[40], date[40], layer[16];
    long per_epoch = ri->ds->n_total_with_repeats;
    snprintf(ep, sizeof ep, "%ld", ri->sample_pos > 0 ? (ri->sample_pos - 1) / per_epoch + 1 : 0);
    optimizer_desc(opt, sizeof opt, a);
    snprintf(started, sizeof started, "%lld", ri->started);
    snprintf(keep, sizeof keep, "%d", a->cap.keep_tokens);
    py_float(cdrop, sizeof cdrop, a->cap.dropout);
    snprintf(res, sizeof res, "%dx%d", a->res, a->res);
    iso_date(date, sizeof date, ri->started);
    snprintf(layer, sizeof layer, "%d", a->clip_skip);
    int v2 = is_v2, vpred = is_vpred;
    const char *more[][2] = {
        {"ss_epoch", ep},
        {"ss_optimizer", opt},
        {"ss_mixed_precision", strcmp(a->compute, "fp32") == 0 ? "no" : a->compute},   /* kohya: no / fp16 / bf16 */
        {"ss_training_started_at", started},
        {"ss_dataset_dirs", dirs},
        {"ss_tag_frequency", tags},
        {"ss_shuffle_caption", a->cap.shuffle ? "True" : "False"},
        {"ss_keep_tokens", keep},
        {"ss_caption_dropout_rate", cdrop},
        {"modelspec.sai_model_spec", "1.0.1"},
        {"modelspec.architecture", !v2 ? "stable-diffusion-v1/lora" : vpred ? "stable-diffusion-v2-768-v/lora"
                                                                          : "stable-diffusion-v2-512/lora"},
        {"modelspec.implementation", "diffusers"},
        {"modelspec.title", a->name},
        {"modelspec.resolution", res},
        {"modelspec.date", date},
        {"modelspec.prediction_type", vpred ? "v" : "epsilon"},
        {"modelspec.encoder_layer", a->clip_skip > 1 ? layer : NULL},   /* kohya: only with --clip_skip */
    };
    for (size_t i = 0; i < sizeof more / sizeof more[0]; i++)
        if (more[i][1]) { keys[nk] = more[i][0]; vals[nk] = more[i][1]; nk++; }
    /* --conv-rank: kohya's ss_network_args, as its conv_dim / conv_alpha write it */
    char nargs[128];
    snprintf(nargs, sizeof nargs, "{\"conv_dim\": \"%d\", \"conv_alpha\": \"%g\"}", a->conv_rank, a->conv_alpha);
    if (a->conv_rank > 0) { keys[nk] = "ss_network_args"; vals[nk] = nargs; nk++; }
    int rc = -1;
    if (!tags || !dirs) snprintf(err, SD_ERR_LEN, "out of memory");
    else rc = lora_save_kohya(path, refs, nu + nt, strcmp(a->precision, "fp16") == 0 ? ST_F16 : ST_F32,
                              keys, vals, nk, err);
    free(tags); free(dirs);
    free(refs); free(names);
    return rc;
}

/* --full: the fine-tuned UNet, under its diffusers names */
static int save_full_unet(const char *path, sd_model *m, char *err) {
    st_writer *w = st_writer_new();
    if (!w) { snprintf(err, SD_ERR_LEN, "out of memory"); return -1; }
    int rc = 0;
    for (int i = 0; i < m->unet.ntable && rc == 0; i++) {
        const unet_param *p = &m->unet.table[i];
        int64_t sh[4];
        for (int d = 0; d < p->ndim; d++) sh[d] = p->shape[d];
        rc = st_writer_add(w, p->name, ST_F32, p->ndim, sh, m->unet.params + p->offset);
    }
    if (rc) { st_writer_free(w); snprintf(err, SD_ERR_LEN, "out of memory"); return -1; }
    rc = st_writer_save(w, path, err);
    st_writer_free(w);
    return rc;
}

/* ------------------------------------------------------------- the plots */

/* the labels of a grid column: the prompt (wrapped by grid.c) and its seed */
static void column_label(char *b, size_t n, const char *prompt, uint64_t seed) {
    snprintf(b, n, "%s\nseed %llu", prompt, (unsigned long long)seed);
}

/* Draw prompts[i] with seed + i into cells[row * np + i] (side x side RGB);
 * the generation settings of every grid the run writes */
static int draw_row(sd_model *m, const train_args *a, char *const *prompts, int np, uint8_t **cells,
                    int row, char *err) {
    int side = a->res;
    for (int i = 0; i < np; i++) {
        gen_params p = {.prompt = prompts[i], .negative = "", .width = side, .height = side, .steps = 20,
                        .cfg = 7.0f, .seed = a->seed + (uint64_t)i, .batch = 1, .clip_skip = a->clip_skip,
                        .sampler = "euler_a", .karras = 0, .rng_cuda = 0};
        if (sd_generate(m, &p, cells[row * np + i], err)) return -1;
    }
    return 0;
}

/* rows x np cells of side x side, labelled, into path (grid.c) */
static int save_grid(const char *path, uint8_t **cells, int rows, int np, const train_args *a,
                     char *const *prompts, const char *const *row_labels, const char *desc, char *err) {
    if (!dist_is_root()) return 0;     /* MPI: every rank drew the cells, rank 0 writes */
    char heads[16][600];
    const char *hp[16];
    for (int i = 0; i < np && i < 16; i++) {
        column_label(heads[i], sizeof heads[i], prompts[i], a->seed + (uint64_t)i);
        hp[i] = heads[i];
    }
    grid_image g;
    if (grid_compose(&g, (const uint8_t *const *)cells, rows, np, a->res, a->res, 256, hp, row_labels)) {
        snprintf(err, SD_ERR_LEN, "out of memory");
        return -1;
    }
    const char *k[] = {"Title"}, *v[] = {desc};
    int rc = image_save_png(path, g.rgb, g.w, g.h, k, v, 1, err, SD_ERR_LEN);
    grid_free(&g);
    return rc;
}

static uint8_t **alloc_cells(int n, int side) {
    uint8_t **c = calloc((size_t)n, sizeof *c);
    for (int i = 0; c && i < n; i++)
        if (!(c[i] = malloc((size_t)side * side * 3))) {
            for (int j = 0; j < i; j++) free(c[j]);
            free(c);
            return NULL;
        }
    return c;
}

static void free_cells(uint8_t **c, int n) {
    for (int i = 0; c && i < n; i++) free(c[i]);
    free(c);
}

/* a row of images per prompt: the sample prompts at this checkpoint */
static int save_sample_grid(const char *path, sd_model *m, const train_args *a, long step, char *err) {
    char buf[2048];
    snprintf(buf, sizeof buf, "%s", a->sample_prompt);
    char *prompts[16];
    int np = sd_split_prompts(buf, "|", prompts, 16);
    if (np == 0) return 0;
    uint8_t **cells = alloc_cells(np, a->res);
    if (!cells) { snprintf(err, SD_ERR_LEN, "out of memory"); return -1; }
    char label[64], desc[2200];
    snprintf(label, sizeof label, "LoRA, step %ld", step);
    const char *rows[1] = {label};
    snprintf(desc, sizeof desc, "step %ld; euler_a, 20 steps, cfg 7; prompts: %s", step, a->sample_prompt);
    int rc = draw_row(m, a, prompts, np, cells, 0, err);
    if (rc == 0) rc = save_grid(path, cells, 1, np, a, prompts, rows, desc, err);
    free_cells(cells, np);
    return rc;
}

/* The before/after grid (the student's first look at LoRA): the same
 * prompts and seeds, top row without the LoRA (scale 0: the base model),
 * bottom row with it. Prompts: DIR/sample_prompts.txt (one per line, as
 * kohya's --sample_prompts), else --sample-prompt, else the first captions. */
static void set_lora_scale(sd_model *m, float *saved, int restore) {
    int k = 0;
    for (int i = 0; i < m->unet.nloras; i++, k++) {
        if (restore) m->unet.loras[i].L.scale = saved[k];
        else { saved[k] = m->unet.loras[i].L.scale; m->unet.loras[i].L.scale = 0; }
    }
    for (int i = 0; i < m->clip.nadapters; i++, k++) {
        clip_adapter *ad = clip_adapter_at(&m->clip, i);
        if (restore) ad->L.scale = saved[k];
        else { saved[k] = ad->L.scale; ad->L.scale = 0; }
    }
}

static int save_before_after(const char *path, sd_model *m, const train_args *a, const dataset_t *ds, long step,
                             char *err) {
    char buf[4096] = "", pp[1200];
    snprintf(pp, sizeof pp, "%s/sample_prompts.txt", a->data);
    FILE *f = fopen(pp, "r");
    if (f) {
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        buf[n] = 0;
        fclose(f);
    } else if (a->sample_prompt) {
        snprintf(buf, sizeof buf, "%s", a->sample_prompt);
    } else {
        for (int i = 0, k = 0; i < ds->n_images && k < 4; i++)
            if (ds->caption[i][0] && !strstr(buf, ds->caption[i])) {
                size_t l = strlen(buf);
                snprintf(buf + l, sizeof buf - l, "%s\n", ds->caption[i]);
                k++;
            }
    }
    char *prompts[8];
    int np = sd_split_prompts(buf, "|\n", prompts, 8);
    if (np == 0) return 0;
    uint8_t **cells = alloc_cells(2 * np, a->res);
    float *saved = malloc(sizeof(float) * (size_t)(m->unet.nloras + m->clip.nadapters + 1));
    if (!cells || !saved) { free_cells(cells, 2 * np); free(saved); snprintf(err, SD_ERR_LEN, "out of memory"); return -1; }
    /* top row: the adapters' scale 0 is the base model, bit for bit */
    set_lora_scale(m, saved, 0);
    int rc = draw_row(m, a, prompts, np, cells, 0, err);
    set_lora_scale(m, saved, 1);
    if (rc == 0) rc = draw_row(m, a, prompts, np, cells, 1, err);
    if (rc == 0) {
        char desc[4200], after[64];
        snprintf(after, sizeof after, "LoRA, step %ld", step);
        const char *rows[2] = {"base model", after};
        snprintf(desc, sizeof desc, "top: base model, bottom: with the LoRA; seeds %llu.., euler_a, 20 steps, cfg 7; prompts: %s",
                 (unsigned long long)a->seed, buf);
        rc = save_grid(path, cells, 2, np, a, prompts, rows, desc, err);
    }
    free_cells(cells, 2 * np); free(saved);
    return rc;
}

/* -------------------------------------------------------------- training */
/* one micro-batch: B samples of latents x0 (B, C, h, w), their token ids and
 * (without --te) cached contexts, the noise, the noised latents, the UNet's
 * prediction and its target, and the loss's gradient */
typedef struct {
    float *x0, *eps, *xt, *pred, *target, *dpred;   /* (B, C, h, w) each */
    float *ctx, *dctx;                              /* (B, 77, d); dctx only with --te */
    float *tf, *wt;                                 /* timesteps as floats, min-SNR weights: (B) */
    int *tt, *ids;                                  /* timesteps (B), token ids (B, 77) */
    float *img;                                     /* (3, res, res): --random-crop decodes here */
    int n, h, w;                                    /* this batch: samples (<= B), latent shape */
    int *items;                                     /* (B) the image index of each sample */
} micro_batch;

/* everything one run holds */
typedef struct {
    train_args *a;
    sd_model m;
    int model_loaded;
    dataset_t ds;
    train_data td;
    train_state st;
    float *P1, *G1, *P2, *G2;   /* what trains: UNet (1), text encoder (2; none without --te) */
    size_t n1, n2;
    long total;                 /* optimizer steps of the whole run */
    lr_schedule sched;
    micro_batch mb;
    int *order, cur_epoch;      /* the current epoch's shuffled sample order */
    float lr, lr_te;            /* this step's learning rates */
    double step_loss;           /* this step's loss (mean over its micro-batches) */
    float smooth;               /* exponential moving average of the loss */
    float *loss_hist;           /* smooth after each step, for loss.png */
    FILE *csv;                  /* loss.csv, written as OUT/loss.csv.tmp until it has a row of this run */
    int csv_in_place;
    char csv_path[1200], csv_tmp[1200];
    long step0, stop_after, nan_at;
    double t_start;             /* when the loop began */
    double t_steps;             /* seconds in optimizer steps only (no checkpoints, no grids) */
    int tty;
    char lora_path[1200], state_path[1200];
    float *gsum;                /* G1 then G2 in one block, for dist.c's sum (NULL: G1 alone) */
    uint64_t drop_step[2];      /* MPI: how far one micro-batch moves the UNet's, CLIP's dropout RNG */
    int drop_probed;
    /* --device cuda: the table the step runs on (NULL: the CPU), the loss's
     * inputs there, and the UNet LoRA's AdamW moments there (dopt.m, dopt.v
     * in device memory; st.opt_unet's come up on --resume and down on save) */
    const nn_ops *dev;
    float *dtarget, *dwt;       /* (B, C, h, w) target, (B) min-SNR weights */
    adamw_t dopt;
    /* --device cuda --te: the text encoder LoRA's AdamW moments there
     * (st.opt_te's on the host), and dL/dctx there between UNet and CLIP */
    adamw_t dopt_te;
    float *ddctx;
    /* --device cuda: the micro-batch on the device (alloc_device_buffers):
     * its latents (the one upload a step makes), the draws and x_t made there
     * (nn_ddpm_micro), its contexts gathered there from the cache's device
     * copy; the schedule's sqrt tables (2T) */
    float *dx0, *deps, *dxt, *dtf, *dctx, *dctx_cache, *dctx_empty, *dsched;
    int *dtt;
} trainer;

/* --reg DIR: the regularisation images, balanced as kohya balances them
 * (dataset_balance_reg) and appended to the data set as its last images */
static int add_reg_images(trainer *t, char *err) {
    const train_args *a = t->a;
    dataset_t reg;
    memset(&reg, 0, sizeof reg);
    reg.uncaptioned = t->ds.uncaptioned;
    if (dataset_scan(&reg, a->reg, err, SD_ERR_LEN)) return -1;
    fputs(reg.warnings, stderr);
    reg.warnings[0] = 0;
    int found = reg.n_images;
    long with = reg.n_total_with_repeats, n_train = t->ds.n_total_with_repeats;
    int used = dataset_balance_reg(&reg, n_train);
    fprintf(stderr, "regularisation images %s: %d (%ld samples with repeats); %d of them used, %d samples per epoch "
            "beside the %ld training samples, loss weight %g\n", a->reg, found, with, used, reg.n_total_with_repeats,
            n_train, a->prior_loss_weight);
    if (with > n_train)
        fprintf(stderr, "warning: %s: more regularisation samples than training samples; %d image%s not used, as kohya does\n",
                a->reg, found - used, found - used == 1 ? " is" : "s are");
    if (dataset_add_reg(&t->ds, &reg, err, SD_ERR_LEN)) { dataset_free(&reg); return -1; }
    return 0;
}

/* --buckets: kohya's buckets for --res (bucket.h), each image's bucket from
 * its size (decoded once here, again when its latent is cached), the
 * samples per bucket, and the images the nearest ratio crops by more than
 * a step */
static int assign_buckets(trainer *t, char *err) {
    const train_args *a = t->a;
    train_data *td = &t->td;
    const dataset_t *ds = &t->ds;
    if (a->min_bucket > a->max_bucket || a->max_bucket < a->res) {
        snprintf(err, SD_ERR_LEN, "--min-bucket %d, --max-bucket %d, --res %d: need min <= res <= max "
                 "(kohya's rule; e.g. --max-bucket %d)", a->min_bucket, a->max_bucket, a->res,
                 a->res > a->min_bucket ? a->res : a->min_bucket);
        return -1;
    }
    int cap = bucket_max_count(a->min_bucket, a->max_bucket, a->bucket_step);
    td->resos = malloc(sizeof(bucket_reso) * (size_t)cap);
    td->bucket_of = malloc(sizeof(int) * (size_t)td->n);
    td->rw = malloc(sizeof(int) * (size_t)td->n);
    td->rh = malloc(sizeof(int) * (size_t)td->n);
    long *count = calloc((size_t)cap, sizeof *count);
    if (!td->resos || !td->bucket_of || !td->rw || !td->rh || !count) { free(count); snprintf(err, SD_ERR_LEN, "out of memory"); return -1; }
    td->nresos = bucket_resolutions(td->resos, cap, a->res, a->res, a->min_bucket, a->max_bucket, a->bucket_step);
    int need = 1 << (t->m.unet.cfg.nlevels - 1), f = a->res / sd_latent_side(&t->m, a->res);
    for (int k = 0; k < td->nresos; k++) {
        int s2[2] = {td->resos[k].w, td->resos[k].h};
        for (int j = 0; j < 2; j++) {
            int ls = sd_latent_side(&t->m, s2[j]);
            if (s2[j] < 1 || s2[j] % f || ls <= 0 || ls % need) {
                snprintf(err, SD_ERR_LEN, "--bucket-step %d: bucket %dx%d has a side this model cannot take "
                         "(sides must be multiples of %d: use a --bucket-step, --min-bucket and --res that are)",
                         a->bucket_step, td->resos[k].w, td->resos[k].h, f * need);
                free(count);
                return -1;
            }
        }
    }
    char over[600] = "";
    int nover = 0;
    for (int i = 0; i < td->n; i++) {
        image_t im;
        if (image_load(&im, ds->path[i], err, SD_ERR_LEN)) { free(count); return -1; }
        int k = bucket_select(td->resos, td->nresos, im.w, im.h, &td->rw[i], &td->rh[i]);
        td->bucket_of[i] = k;
        count[k] += ds->repeats[i];
        int crop = td->rw[i] - td->resos[k].w + td->rh[i] - td->resos[k].h;
        if (crop > a->bucket_step) {
            size_t l = strlen(over);
            if (nover < 5) snprintf(over + l, sizeof over - l, "%s%s (%dx%d, %d px)", nover ? ", " : "",
                                    ds->path[i], im.w, im.h, crop);
            nover++;
        }
        image_free(&im);
    }
    fprintf(stderr, "buckets (WxH: samples per epoch):");
    for (int k = 0; k < td->nresos; k++)
        if (count[k]) fprintf(stderr, " %dx%d: %ld", td->resos[k].w, td->resos[k].h, count[k]);
    fputc('\n', stderr);
    if (nover)
        fprintf(stderr, "warning: %d image%s cropped by more than one bucket step (%d px), their aspect ratio lying "
                "between two buckets': %s%s (crop them yourself to keep what matters)\n", nover,
                nover == 1 ? " is" : "s are", a->bucket_step, over, nover > 5 ? ", ..." : "");
    free(count);
    td->nbatches = bucket_count_batches(td->n, ds->repeats, td->bucket_of, td->nresos, a->batch);
    td->bstart = malloc(sizeof(long) * (size_t)(td->nbatches + 1));
    td->blen = malloc(sizeof(int) * (size_t)(td->nbatches + 1));
    if (td->nbatches < 0 || !td->bstart || !td->blen) { snprintf(err, SD_ERR_LEN, "out of memory"); return -1; }
    return 0;
}

/* the model, the data set, the resolution, the length of the run, OUT */
static int load_model_and_data(trainer *t, char *err) {
    train_args *a = t->a;
    weight_dtype wdtype = WEIGHT_F32;
    weight_dtype_parse(a->weight_dtype, &wdtype);   /* cli_parse checked it is fp32 or fp16 */
    if (sd_model_load_dtype(&t->m, a->model, a->tokenizer, wdtype, err)) return -1;
    t->model_loaded = 1;
    t->ds.caption_ext = a->caption_ext;
    if (dataset_scan(&t->ds, a->data, err, SD_ERR_LEN)) return -1;
    fputs(t->ds.warnings, stderr);
    if (a->reg && add_reg_images(t, err)) return -1;
    t->td.n = t->ds.n_images;

    /* resolution: the model's own unless --res; it must survive the UNet's downsamples */
    if (a->res == 0) a->res = sd_default_image_side(&t->m);
    int ls = sd_latent_side(&t->m, a->res);
    int need = 1 << (t->m.unet.cfg.nlevels - 1);
    if (a->res % 8 || ls <= 0 || ls % need) {
        snprintf(err, SD_ERR_LEN, "--res %d: the latent side %d must be a multiple of %d for this model (use a multiple of %d, e.g. %d)",
                 a->res, ls, need, a->res / (ls > 0 ? ls : 1) * need, sd_default_image_side(&t->m));
        return -1;
    }
    long per_epoch = (t->ds.n_total_with_repeats + (long)a->batch * a->accum - 1) / ((long)a->batch * a->accum);
    if (a->buckets) {
        if (assign_buckets(t, err)) return -1;
        per_epoch = (t->td.nbatches + a->accum - 1) / a->accum;   /* batches never mix buckets */
    }
    t->total = a->steps > 0 ? a->steps : (long)(a->epochs > 0 ? a->epochs : 10) * per_epoch;
    snprintf(t->state_path, sizeof t->state_path, "%s/state.safetensors", a->out);
    return mkdir_p(a->out, err);
}

/* What trains. LoRA (article 2.2): adapters on the UNet (and the text
 * encoder with --te), every pretrained weight frozen. --full (the article's
 * "traditional full fine-tuning", the baseline of 2.1): every UNet (and
 * text-encoder) weight, with a gradient and two AdamW moments each. Then the
 * optimizer, and with --resume the state it continues from. */
static int setup_trainables(trainer *t, char *err) {
    train_args *a = t->a;
    sd_model *m = &t->m;
    if (a->full) {
        if (unet_alloc_grads(&m->unet) || (a->te && clip_alloc_grads(&m->clip))) {
            snprintf(err, SD_ERR_LEN, "out of memory for the full fine-tuning gradients (use LoRA: drop --full)"); return -1;
        }
        t->P1 = m->unet.params; t->G1 = m->unet.grads; t->n1 = m->unet.nparams;
        if (a->te) { t->P2 = m->clip.params; t->G2 = m->clip.grads; t->n2 = m->clip.num_params; }
    } else {
        if (unet_add_lora_conv(&m->unet, a->targets, a->rank, a->alpha, a->conv_rank, a->conv_alpha, a->dropout,
                               a->seed)) {
            snprintf(err, SD_ERR_LEN, "UNet LoRA: %s", m->unet.err); return -1;
        }
        char e[ST_ERR_LEN];
        if (a->te && clip_add_lora(&m->clip, a->rank, a->alpha, a->dropout, a->seed + 1, e)) {
            snprintf(err, SD_ERR_LEN, "text encoder LoRA: %s", e); return -1;
        }
        t->P1 = m->unet.lora_params; t->G1 = m->unet.lora_grads; t->n1 = m->unet.lora_nparams;
        if (a->te) { t->P2 = m->clip.lora_params; t->G2 = m->clip.lora_grads; t->n2 = m->clip.num_lora_params; }
    }
    if (adamw_init(&t->st.opt_unet, t->n1, a->lr, a->beta1, a->beta2, a->adam_eps, a->wd) ||
        adamw_init(&t->st.opt_te, t->n2, a->te_lr, a->beta1, a->beta2, a->adam_eps, a->wd)) {
        snprintf(err, SD_ERR_LEN, "out of memory for the optimizer"); return -1;
    }
    rng_seed(&t->st.rng, a->seed);
    nn_loss_scaler_init(&t->st.scaler);
    t->st.loss = malloc(sizeof(double) * (size_t)(t->total + 1));
    if (!t->st.loss) { snprintf(err, SD_ERR_LEN, "out of memory"); return -1; }
    t->st.started = (long long)time(NULL);
    if (a->resume) {
        if (load_state(a->resume, &t->st, m, a, t->total, err)) return -1;
        fprintf(stderr, "resuming from %s at step %ld\n", a->resume, t->st.step);
    }
    /* SOURCE_DATE_EPOCH (reproducible builds): a fixed date for the metadata */
    const char *sde = getenv("SOURCE_DATE_EPOCH");
    if (sde && *sde) {
        char *end;
        errno = 0;
        long long v = strtoll(sde, &end, 10);
        if (*end || errno || v < 0) {
            snprintf(err, SD_ERR_LEN, "SOURCE_DATE_EPOCH=%.40s: not a number of seconds (unset it, or give e.g. 1700000000)", sde);
            return -1;
        }
        t->st.started = v;
    }
    return 0;
}

static void print_run(const trainer *t) {
    const train_args *a = t->a;
    const sd_model *m = &t->m;
    size_t ntrain = t->n1 + t->n2;
    if (a->full)
        fprintf(stderr, "model %s: full fine-tuning: %zu trainable parameters%s\n", m->name, ntrain,
                a->te ? " (UNet + text encoder)" : " (UNet)");
    else {
        char conv[64] = "";
        if (a->conv_rank > 0) snprintf(conv, sizeof conv, ", conv LoRA rank %d alpha %g", a->conv_rank, a->conv_alpha);
        fprintf(stderr, "model %s: UNet %zu parameters frozen (all weights: %.0f MiB held as %s); LoRA '%s' rank %d alpha %g%s: %d adapters, %zu trainable parameters%s\n",
                m->name, m->unet.nparams, (double)sd_model_weight_bytes(m) / 1048576.0, weight_dtype_name(m->wdtype), a->targets, a->rank, a->alpha, conv,
                m->unet.nloras + (a->te ? clip_num_adapters(&m->clip) : 0), ntrain, a->te ? " (UNet + text encoder)" : "");
    }
    fprintf(stderr, "data %s: %d images, %d samples per epoch, %ld steps of %d x %d at %dx%d%s\n",
            a->data, t->ds.n_images - t->ds.n_reg, t->ds.n_total_with_repeats, t->total, a->batch, a->accum, a->res, a->res,
            a->buckets ? " (area; buckets)" : "");
}

/* the frozen parts run once: latents (unless --random-crop, which encodes
 * each crop as it comes) and, without --te, the contexts */
static int unet_up(trainer *t, char *err);
static int build_caches(trainer *t, char *err) {
    train_args *a = t->a;
    if (a->buckets) {
        if (!a->random_crop && cache_latents_buckets(&t->td, &t->m, &t->ds, a, err)) return -1;
        if (a->random_crop) {
            t->td.lc = t->m.vae.cfg.latent_channels;
            t->td.lh = t->td.lw = sd_latent_side(&t->m, a->res);
            t->td.variants = 1;
            if (vae_alloc_buckets(&t->td, &t->m, err)) return -1;
        }
    } else if (!a->random_crop && cache_latents(&t->td, &t->m, &t->ds, a, err)) return -1;
    if (a->random_crop && !a->buckets) {
        t->td.lc = t->m.vae.cfg.latent_channels;
        t->td.lh = t->td.lw = sd_latent_side(&t->m, a->res);
        t->td.variants = 1;
        if (vae_alloc_acts(&t->m.vae, 1, a->res, a->res, 0)) { snprintf(err, SD_ERR_LEN, "VAE: %s", t->m.vae.err); return -1; }
    }
    if (cache_text(&t->td, &t->m, &t->ds, a, err)) return -1;
    if (a->te) t->m.clip.training = 1;
    /* --device cuda, the caches built: the VAE's arena (1.7 GB for SD1.5 at
     * 512^2) shrinks to one 8x8 image and the scratch its convolutions grew
     * goes back (a sample grid's decode allocates its own again); only then
     * the UNet goes up, so the two never share the device (SD1.5 at 512^2:
     * 3.9 GB at most, cuda/test_cuda_host.cu's budget) */
    if (t->dev) {
        if (!a->random_crop) {
            if (vae_alloc_acts(&t->m.vae, 1, 8, 8, 0)) { snprintf(err, SD_ERR_LEN, "VAE: %s", t->m.vae.err); return -1; }
#ifdef SDLORA_CUDA
            cuda_release_scratch();
#endif
        }
        if (unet_up(t, err)) return -1;
    }
    return 0;
}

/* the first error the device table recorded, as err; -1 when there was one */
static int device_failed(trainer *t, const char *what, char *err) {
    const char *e = t->dev->error();
    if (!e) return 0;
    snprintf(err, SD_ERR_LEN, "--device %s: %s: %s", t->dev->name, what, strncmp(e, "error: ", 7) == 0 ? e + 7 : e);
    return -1;
}
/* a failed copy or allocation: -1, with the device's message or a plain one */
static int device_fail(trainer *t, const char *what, char *err) {
    if (!device_failed(t, what, err)) snprintf(err, SD_ERR_LEN, "--device %s: %s: a copy failed", t->dev->name, what);
    return -1;
}

/* --device cuda: an AdamW state's moments into device memory (n floats
 * each; the first `up` of them copied from the host's: zero, or --resume's),
 * the step count with them in *dev */
static int adamw_up(trainer *t, adamw_t *dev, const adamw_t *host, size_t n, size_t up, const char *what, char *err) {
    *dev = *host;
    dev->m = t->dev->alloc(sizeof(float) * n);
    dev->v = t->dev->alloc(sizeof(float) * n);
    if (!dev->m || !dev->v) {
        if (!device_failed(t, what, err)) snprintf(err, SD_ERR_LEN, "--device %s: out of device memory for the %s", t->dev->name, what);
        return -1;
    }
    if (up && (!t->dev->upload(dev->m, host->m, sizeof(float) * up) || !t->dev->upload(dev->v, host->v, sizeof(float) * up)))
        return device_fail(t, what, err);
    return 0;
}

/* --device cuda: from here on the UNet's forward and backward, the loss and
 * its gradient, --clip and the UNet LoRA's AdamW run on the GPU
 * (unet_to_device), and the VAE encode and text encoder forward that build
 * the caches (vae_to_device, clip_to_device); with --te the text encoder's
 * forward and backward, its LoRA's gradients and AdamW too (the token ids go
 * up, ctx and dctx stay there); the noise and timestep draws, x_t and the
 * loss's target and weights are made there too (alloc_device_buffers,
 * micro_noise), so a step sends up its latents (and --te's token ids) and
 * brings down the loss (and with --clip the sums of squares, one
 * double per set); A, B and the moments come down only to be saved or
 * sampled with (device_to_host). */
static int to_device(trainer *t, char *err) {
    if (strcmp(t->a->device, "cuda") != 0) return 0;
    t->dev = nn_device_emulated();   /* testing hook (backend.h): SDLORA_DEVICE=emulate, the CPU as the device */
#ifdef SDLORA_CUDA
    if (!t->dev) t->dev = nn_ops_cuda();   /* the UNet itself goes up after the caches (unet_up, from build_caches) */
#endif
    if (!t->dev) return 0;
    /* the moments up (zero, or --resume's), the step count with them */
    if (adamw_up(t, &t->dopt, &t->st.opt_unet, t->n1 ? t->n1 : 1, t->n1, "AdamW state", err)) return -1;
    /* the VAE's encode (latent cache) and the text encoder (the text cache, or with --te its training) */
    if (vae_to_device(&t->m.vae, t->dev)) { snprintf(err, SD_ERR_LEN, "--device cuda: %s", t->m.vae.err); return -1; }
    if (clip_to_device(&t->m.clip, t->dev)) { snprintf(err, SD_ERR_LEN, "--device cuda: %s", t->m.clip.err); return -1; }
    if (t->n2 && adamw_up(t, &t->dopt_te, &t->st.opt_te, t->n2, t->n2, "text encoder AdamW state", err)) return -1;   /* --te */
    fprintf(stderr, "device: cuda: the UNet's forward and backward, the loss, --clip and the LoRA's AdamW, the VAE encode, "
                    "the text encoder%s\n", t->a->te ? "'s forward, backward and AdamW (--te)" : "");
    return 0;
}

/* --device cuda, once the caches are built (build_caches): the UNet up */
static int unet_up(trainer *t, char *err) {
    if (unet_to_device(&t->m.unet, t->dev)) { snprintf(err, SD_ERR_LEN, "--device cuda: %s", t->m.unet.err); return -1; }
    return 0;
}

/* --device cuda: the micro-batch on the device: latents, timesteps, noise,
 * x_t, the loss's target and weights, the contexts; the schedule's tables
 * and (without --te) the context cache go up here, once */
static int alloc_device_buffers(trainer *t, char *err) {
    const nn_ops *ops = t->dev;
    const train_data *td = &t->td;
    int B = t->a->batch, T = t->m.sched.T;
    size_t lat = sizeof(float) * (size_t)td->lc * td->lh * td->lw * B, nctx = (size_t)TOK_CTX * td->d;
    int cache = !t->a->te && td->ctx;
    t->dtarget = ops->alloc(lat); t->dwt = ops->alloc(sizeof(float) * B);
    t->dx0 = ops->alloc(lat); t->deps = ops->alloc(lat); t->dxt = ops->alloc(lat);
    t->dtf = ops->alloc(sizeof(float) * B); t->dtt = ops->alloc(sizeof(int) * B);
    t->dctx = ops->alloc(sizeof(float) * nctx * B);
    t->dsched = ops->alloc(sizeof(float) * 2 * T);
    if (t->a->te) t->ddctx = ops->alloc(sizeof(float) * nctx * B);
    if (cache) t->dctx_cache = ops->alloc(sizeof(float) * nctx * td->n);
    if (cache && td->ctx_empty) t->dctx_empty = ops->alloc(sizeof(float) * nctx);
    if (!t->dtarget || !t->dwt || !t->dx0 || !t->deps || !t->dxt || !t->dtf || !t->dtt || !t->dctx || !t->dsched ||
        (cache && !t->dctx_cache) || (t->a->te && !t->ddctx) || (cache && td->ctx_empty && !t->dctx_empty)) {
        if (!device_failed(t, "training buffers", err))
            snprintf(err, SD_ERR_LEN, "--device %s: out of device memory for the training buffers and the context cache "
                     "(%.1f MiB; use a smaller --batch or fewer images)", ops->name,
                     (double)(4 * lat + sizeof(float) * nctx * ((size_t)B + (cache ? td->n + 1 : 0))) / 1048576.0);
        return -1;
    }
    if (!ops->upload(t->dsched, t->m.sched.sqrt_abar, sizeof(float) * T) ||
        !ops->upload(t->dsched + T, t->m.sched.sqrt_1m_abar, sizeof(float) * T) ||
        (cache && !ops->upload(t->dctx_cache, td->ctx, sizeof(float) * nctx * td->n)) ||
        (t->dctx_empty && !ops->upload(t->dctx_empty, td->ctx_empty, sizeof(float) * nctx)))
        return device_fail(t, "training buffers", err);
    fprintf(stderr, "device: %s: the timestep and noise draws, x_t and the loss's target and weights too; "
                    "a step sends up its latents%s\n", ops->name,
            t->a->te ? " and token ids (the text encoder trains there)" : cache ? " (the context cache is there)" : "");
    return 0;
}

/* --device cuda: the UNet LoRA's A, B and its AdamW moments down into the
 * host's copies, before they are saved or the sampler re-allocates the
 * UNet's activations (which uploads the host's A, B) */
static int device_to_host(trainer *t, char *err) {
    unet_t *u = &t->m.unet;
    size_t nb = sizeof(float) * t->n1;
    if (!t->dev || !t->n1) return 0;
    if (!t->dev->download(u->lora_params, u->dlora_params, nb) ||
        !t->dev->download(t->st.opt_unet.m, t->dopt.m, nb) || !t->dev->download(t->st.opt_unet.v, t->dopt.v, nb))
        return device_fail(t, "LoRA and AdamW state", err);
    size_t n2b = sizeof(float) * t->n2;   /* --te: the text encoder's A, B and moments */
    if (t->n2 && (!t->dev->download(t->m.clip.lora_params, t->m.clip.dlora_params, n2b) ||
                  !t->dev->download(t->st.opt_te.m, t->dopt_te.m, n2b) || !t->dev->download(t->st.opt_te.v, t->dopt_te.v, n2b)))
        return device_fail(t, "text encoder LoRA and AdamW state", err);
    return 0;
}

static void device_free(trainer *t) {
    if (!t->dev) return;
    t->dev->free(t->dtarget); t->dev->free(t->dwt);
    t->dev->free(t->dx0); t->dev->free(t->deps); t->dev->free(t->dxt); t->dev->free(t->dtf); t->dev->free(t->dtt);
    t->dev->free(t->dctx); t->dev->free(t->dctx_cache); t->dev->free(t->dctx_empty); t->dev->free(t->dsched);
    t->dev->free(t->dopt.m); t->dev->free(t->dopt.v);
    t->dev->free(t->dopt_te.m); t->dev->free(t->dopt_te.v); t->dev->free(t->ddctx);
}

/* the UNet's activations for a training micro-batch (with --grad-checkpoint
 * only what backward cannot recompute) */
static int alloc_train_acts(trainer *t, char *err) {
    if (t->a->buckets) {
        /* the bucket whose layout is largest: every other one fits in it */
        int bh = t->td.lh, bw = t->td.lw;
        size_t most = 0;
        for (int k = 0; k < t->td.nresos; k++) {
            if (!bucket_used(&t->td, k)) continue;
            int lh = sd_latent_side(&t->m, t->td.resos[k].h), lw = sd_latent_side(&t->m, t->td.resos[k].w);
            if (unet_alloc_acts(&t->m.unet, t->a->batch, lh, lw, TOK_CTX, t->a->grad_ckpt ? 2 : 1)) {
                snprintf(err, SD_ERR_LEN, "UNet: %s", t->m.unet.err);
                return -1;
            }
            if (unet_acts_floats(&t->m.unet) > most) { most = unet_acts_floats(&t->m.unet); bh = lh; bw = lw; }
        }
        if (unet_alloc_acts(&t->m.unet, t->a->batch, bh, bw, TOK_CTX, t->a->grad_ckpt ? 2 : 1)) {
            snprintf(err, SD_ERR_LEN, "UNet: %s", t->m.unet.err);
            return -1;
        }
        return 0;
    }
    if (unet_alloc_acts(&t->m.unet, t->a->batch, t->td.lh, t->td.lw, TOK_CTX, t->a->grad_ckpt ? 2 : 1)) {
        snprintf(err, SD_ERR_LEN, "UNet: %s", t->m.unet.err);
        return -1;
    }
    return 0;
}

static int alloc_buffers(trainer *t, char *err) {
    const train_args *a = t->a;
    micro_batch *b = &t->mb;
    int B = a->batch, d = t->td.d;
    size_t lat = sizeof(float) * (size_t)t->td.lc * t->td.lh * t->td.lw * B, text = sizeof(float) * (size_t)B * TOK_CTX * d;
    if (alloc_train_acts(t, err) || (t->dev && alloc_device_buffers(t, err))) return -1;
    b->x0 = malloc(lat); b->eps = malloc(lat); b->xt = malloc(lat);
    b->pred = malloc(lat); b->target = malloc(lat); b->dpred = malloc(lat);
    b->ctx = malloc(text); b->dctx = a->te ? malloc(text) : NULL;
    b->tf = malloc(sizeof(float) * B); b->wt = malloc(sizeof(float) * B);
    b->tt = malloc(sizeof(int) * B); b->ids = malloc(sizeof(int) * B * TOK_CTX);
    b->items = malloc(sizeof(int) * B);
    b->img = a->random_crop ? malloc(sizeof(float) * 3 * (size_t)a->res * a->res) : NULL;
    t->order = malloc(sizeof(int) * (size_t)t->ds.n_total_with_repeats);
    t->loss_hist = malloc(sizeof(float) * (size_t)(t->total + 1));
    if (!b->x0 || !b->eps || !b->xt || !b->pred || !b->target || !b->dpred || !b->ctx || (a->te && !b->dctx) ||
        !b->tf || !b->wt || !b->tt || !b->ids || !b->items || !t->order || !t->loss_hist || (a->random_crop && !b->img)) {
        snprintf(err, SD_ERR_LEN, "out of memory for the training buffers");
        return -1;
    }
    if (t->n2 && !(t->gsum = malloc(sizeof(float) * (t->n1 + t->n2)))) {
        snprintf(err, SD_ERR_LEN, "out of memory for the training buffers");
        return -1;
    }
    lr_schedule_from_name(a->sched, &t->sched);
    t->cur_epoch = -1;
    return 0;
}

/* a state written before the losses were kept: loss.csv's rows (rounded) */
static void losses_from_csv(trainer *t) {
    FILE *f = fopen(t->csv_path, "r");
    if (!f) return;
    char line[256]; long s; double l, sm, lr_;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "%ld,%lf,%lf,%lf", &s, &l, &sm, &lr_) == 4 && s == t->st.nloss + 1 && s <= t->st.step)
            t->st.loss[t->st.nloss++] = l;
    fclose(f);
}

/* the smoothed loss after step i (0-based) from the one before; as log_step computes it */
static float smoothed(float prev, double loss, long i) {
    return i == 0 ? (float)loss : 0.95f * prev + 0.05f * (float)loss;
}

/* loss.png: the raw loss faint, the smoothed loss bold, the learning rate
 * below when it is scheduled, and what ran in the title (plot.c). Made from
 * the state's exact losses, so a resumed run draws the same picture. */
static int save_loss_plot(const char *path, const trainer *t, long n, char *err) {
    const train_args *a = t->a;
    const int W = 900, H = 540;
    float *raw = malloc(sizeof(float) * (size_t)n), *lr = malloc(sizeof(float) * (size_t)n);
    uint8_t *px = malloc((size_t)W * H * 3);
    if (!raw || !lr || !px) { free(raw); free(lr); free(px); snprintf(err, SD_ERR_LEN, "out of memory"); return -1; }
    for (long i = 0; i < n; i++) {
        raw[i] = i < t->st.nloss ? (float)t->st.loss[i] : t->loss_hist[i];
        lr[i] = lr_at(t->sched, a->lr, i, a->warmup, t->total);
    }
    char title[256], sub[512];
    if (a->full) snprintf(title, sizeof title, "%s: full fine-tuning", a->name);
    else snprintf(title, sizeof title, "%s: LoRA rank %d, alpha %g", a->name, a->rank, a->alpha);
    snprintf(sub, sizeof sub, "%.200s; %s%s; %ld steps of batch %d x %d; lr %g (%s)", t->m.path,
             a->full ? "UNet" : a->targets, a->te ? " + text encoder" : "", t->total, a->batch, a->accum,
             a->lr, a->sched);
    plot_series ps = {raw, t->loss_hist, lr, n, title, sub, -1};
    int rc = plot_loss(px, W, H, &ps, NULL);
    if (rc == 0) {
        char desc[160];
        snprintf(desc, sizeof desc, "loss (smoothed) from %.4f to %.4f over %ld steps", t->loss_hist[0], t->loss_hist[n - 1], n);
        const char *k[] = {"Title"}, *v[] = {desc};
        rc = image_save_png(path, px, W, H, k, v, 1, err, SD_ERR_LEN);
    } else {
        snprintf(err, SD_ERR_LEN, "%.600s: nothing to plot", path);
    }
    free(raw); free(lr); free(px);
    return rc;
}

/* loss.csv: the resumed steps' rows, recomputed from the state's losses,
 * then a row per step. It goes to OUT/loss.csv.tmp, which replaces
 * loss.csv only once this run has a step of its own to add (log_step): a
 * run that fails before that leaves an earlier run's loss.csv as it was. */
static int open_loss_log(trainer *t, char *err) {
    const train_args *a = t->a;
    long done = t->st.step;
    snprintf(t->csv_path, sizeof t->csv_path, "%s/loss.csv", a->out);
    snprintf(t->csv_tmp, sizeof t->csv_tmp, "%s/loss.csv.tmp", a->out);
    if (done > 0 && t->st.nloss == 0) losses_from_csv(t);
    if (dist_is_root()) {           /* MPI: the other ranks keep the losses, not the file */
        t->csv = fopen(t->csv_tmp, "w");
        if (!t->csv) { snprintf(err, SD_ERR_LEN, "%.600s: %s (check that --out is writable)", t->csv_tmp, strerror(errno)); return -1; }
        fprintf(t->csv, "step,loss,smoothed,lr\n");
    }
    float smooth = 0;
    for (long i = 0; i < t->st.nloss; i++) {
        smooth = smoothed(smooth, t->st.loss[i], i);
        t->loss_hist[i] = smooth;
        if (t->csv) fprintf(t->csv, "%ld,%.6f,%.6f,%.6g\n", i + 1, t->st.loss[i], smooth, lr_at(t->sched, a->lr, i, a->warmup, t->total));
    }
    /* steps whose loss is unknown (an old state without loss.csv) repeat the last */
    for (long k = t->st.nloss; k < done; k++) t->loss_hist[k] = t->st.nloss ? t->loss_hist[t->st.nloss - 1] : 0;
    t->smooth = done > 0 ? t->loss_hist[done - 1] : 0;
    return 0;
}

/* Ctrl-C and kill save a checkpoint and stop; the tests stop after N steps
 * exactly as Ctrl-C would (SDLORA_STOP_AFTER=N), or make step N's loss NaN
 * to check what a diverged run does (SDLORA_NAN_AT=N) */
static void install_stop_hooks(trainer *t) {
    /* MPI: a signal is passed on with the next gradient sum, so every rank stops after the same step */
    signal(SIGINT, dist_size() > 1 ? dist_on_signal : on_signal);
    signal(SIGTERM, dist_size() > 1 ? dist_on_signal : on_signal);
    const char *stop_env = getenv("SDLORA_STOP_AFTER"), *nan_env = getenv("SDLORA_NAN_AT");
    t->stop_after = stop_env ? atol(stop_env) : 0;
    t->nan_at = nan_env ? atol(nan_env) : 0;
}

/* one context row of the batch: on the device from the cache's copy there
 * (--device cuda), else from the host's cache */
static void ctx_put(trainer *t, float *dst, const float *host, const float *dev) {
    size_t nctx = (size_t)TOK_CTX * t->td.d;
    if (t->dev) t->dev->copy(dst, dev, nctx);
    else memcpy(dst, host, sizeof(float) * nctx);
}

/* --device cuda: the batch's latents up, the one upload of a step (its
 * contexts are already on the device, or go up in unet_forward with --te) */
static int batch_up(trainer *t, char *err) {
    const micro_batch *mb = &t->mb;
    size_t n = (size_t)t->td.lc * mb->h * mb->w * mb->n;
    if (!t->dev) return 0;
    t->dev->set_layer("batch");
    return t->dev->upload(t->dx0, mb->x0, sizeof(float) * n) ? 0 : device_fail(t, "the batch's latents", err);
}

/* --shuffle-caption / --caption-dropout: the caption sample number pos sees
 * (caption.c), as token ids and (without --te) its context. The caches serve
 * what they hold: a caption that came out unchanged, and the empty one; any
 * other goes through the text encoder here, once per sample. */
static int sample_caption(trainer *t, int i, long pos, int *ids, float *ctx, char *err) {
    const train_args *a = t->a;
    const train_data *td = &t->td;
    size_t nctx = (size_t)TOK_CTX * td->d;
    char *cap = caption_process(t->ds.caption[i], &a->cap, a->seed, (uint64_t)pos);
    if (!cap) { snprintf(err, SD_ERR_LEN, "out of memory"); return -1; }
    int same = strcmp(cap, t->ds.caption[i]) == 0;
    if (same) memcpy(ids, td->ids + (size_t)i * TOK_CTX, sizeof(int) * TOK_CTX);
    else tok_encode_sd(t->m.tok, cap, ids);
    int rc = 0;
    if (!a->te) {
        /* --device cuda: ctx is on the device; a new caption's context is
         * left there by the text encoder (its download is a device copy) */
        if (same) ctx_put(t, ctx, td->ctx + (size_t)i * nctx, t->dctx_cache + (size_t)i * nctx);
        else if (!cap[0] && td->ctx_empty) ctx_put(t, ctx, td->ctx_empty, t->dctx_empty);
        else if (clip_forward(&t->m.clip, ctx, ids, 1, TOK_CTX, a->clip_skip)) {
            snprintf(err, SD_ERR_LEN, "text encoder: %s", t->m.clip.err);
            rc = -1;
        }
    }
    free(cap);
    return rc;
}

/* the batch: the next B samples of the epoch's shuffled order, as latents
 * (from the cache, or a fresh random crop through the VAE), token ids and
 * cached contexts. skip (MPI: another rank's micro-batch): only its random
 * draws, so this rank's stream stays where a single process's would be. */
static int next_batch_buckets(trainer *t, int skip, char *err);

static int next_batch(trainer *t, int skip, char *err) {
    const train_args *a = t->a;
    micro_batch *mb = &t->mb;
    const train_data *td = &t->td;
    if (a->buckets) return next_batch_buckets(t, skip, err);
    size_t per = (size_t)td->lc * td->lh * td->lw, nctx = (size_t)TOK_CTX * td->d;
    float *ctx = t->dev && !a->te ? t->dctx : mb->ctx;   /* --device cuda: the contexts go to the device */
    mb->n = a->batch; mb->h = td->lh; mb->w = td->lw;
    for (int b = 0; b < a->batch; b++) {
        long pos = t->st.sample_pos++;
        int epoch = (int)(pos / t->ds.n_total_with_repeats);
        if (epoch != t->cur_epoch) { dataset_epoch_order(&t->ds, a->seed, epoch, t->order); t->cur_epoch = epoch; }
        int i = t->order[pos % t->ds.n_total_with_repeats];
        mb->items[b] = i;
        int v = a->flip ? (int)(rng_u64(&t->st.rng) & 1) : 0;
        if (a->random_crop) {
            if (load_image_chw(mb->img, t->ds.path[i], a->res, 1, v, &t->st.rng, err)) return -1;
            for (size_t q = 0; q < per; q++) mb->eps[q] = rng_normal(&t->st.rng);   /* posterior noise */
            if (!skip && vae_encode_latents(&t->m.vae, mb->x0 + b * per, mb->img, mb->eps, 1, a->res, a->res)) {
                snprintf(err, SD_ERR_LEN, "VAE: %s", t->m.vae.err); return -1;
            }
        } else {
            memcpy(mb->x0 + b * per, td->latents + ((size_t)i * td->variants + v) * per, sizeof(float) * per);
        }
        if (caption_opts_active(&a->cap)) {   /* draws nothing from st.rng: skipped when not ours */
            if (!skip && sample_caption(t, i, pos, mb->ids + b * TOK_CTX, ctx + b * nctx, err)) return -1;
            continue;
        }
        memcpy(mb->ids + b * TOK_CTX, td->ids + (size_t)i * TOK_CTX, sizeof(int) * TOK_CTX);
        if (!a->te) ctx_put(t, ctx + b * nctx, td->ctx + (size_t)i * nctx, t->dctx_cache + (size_t)i * nctx);
    }
    return batch_up(t, err);
}

/* --buckets: the next batch of the epoch's bucket batches (sample_pos
 * counts batches here): up to B samples of one bucket, so one shape */
static int next_batch_buckets(trainer *t, int skip, char *err) {
    const train_args *a = t->a;
    micro_batch *mb = &t->mb;
    train_data *td = &t->td;
    long pos = t->st.sample_pos++;
    int epoch = (int)(pos / td->nbatches);
    if (epoch != t->cur_epoch) {
        if (bucket_epoch_batches(td->n, t->ds.repeats, td->bucket_of, td->nresos, a->batch, a->seed, epoch,
                                 t->order, td->bstart, td->blen) < 0) {
            snprintf(err, SD_ERR_LEN, "out of memory"); return -1;
        }
        t->cur_epoch = epoch;
    }
    long k = pos % td->nbatches;
    const int *items = t->order + td->bstart[k];
    mb->n = td->blen[k];
    bucket_latent(td, &t->m, items[0], &mb->h, &mb->w);
    const bucket_reso *r = &td->resos[td->bucket_of[items[0]]];
    size_t per = (size_t)td->lc * mb->h * mb->w, nctx = (size_t)TOK_CTX * td->d;
    float *ctx = t->dev && !a->te ? t->dctx : mb->ctx;   /* --device cuda: the contexts go to the device */
    for (int b = 0; b < mb->n; b++) {
        int i = items[b];
        mb->items[b] = i;
        int v = a->flip ? (int)(rng_u64(&t->st.rng) & 1) : 0;
        if (a->random_crop) {
            if (load_bucket_chw(mb->img, t->ds.path[i], r->w, r->h, td->rw[i], td->rh[i], 1, v, &t->st.rng, err)) return -1;
            for (size_t q = 0; q < per; q++) mb->eps[q] = rng_normal(&t->st.rng);   /* posterior noise */
            if (!skip && vae_encode_latents(&t->m.vae, mb->x0 + b * per, mb->img, mb->eps, 1, r->h, r->w)) {
                snprintf(err, SD_ERR_LEN, "VAE: %s", t->m.vae.err); return -1;
            }
        } else {
            memcpy(mb->x0 + b * per, td->latents + td->lat_off[i] + v * per, sizeof(float) * per);
        }
        if (caption_opts_active(&a->cap)) {
            /* pos counts batches here: one caption draw per sample of it */
            if (!skip && sample_caption(t, i, pos * a->batch + b, mb->ids + b * TOK_CTX, ctx + b * nctx, err)) return -1;
            continue;
        }
        memcpy(mb->ids + b * TOK_CTX, td->ids + (size_t)i * TOK_CTX, sizeof(int) * TOK_CTX);
        if (!a->te) ctx_put(t, ctx + b * nctx, td->ctx + (size_t)i * nctx, t->dctx_cache + (size_t)i * nctx);
    }
    return batch_up(t, err);
}

/* one micro-batch's noise and timesteps (article 4.2):
 * x_t = sqrt(abar) x0 + sqrt(1-abar) eps */
static void micro_noise(trainer *t) {
    const train_args *a = t->a;
    sd_model *m = &t->m;
    micro_batch *mb = &t->mb;
    int B = mb->n, C = t->td.lc, h = mb->h, w = mb->w;
    size_t per = (size_t)C * h * w;
    if (t->dev) {
        /* --device cuda: the same draws, made on the device from st.rng's
         * state, which moves on by their count here (nn_ddpm_micro); the
         * min-SNR weights there too, and --prior-loss-weight's factors
         * applied there. The host needs none of the timesteps. */
        nn_ddpm_cfg c = { m->sched.T, t->dsched, t->dsched + m->sched.T, m->prediction, a->noise_offset, a->min_snr };
        float *wt = a->min_snr > 0 || t->ds.n_reg ? t->dwt : NULL;
        nn_ddpm_micro(t->dev, &c, &t->st.rng, t->dx0, B, C, (size_t)h * w, t->dtt, t->dtf, t->deps, t->dxt, t->dtarget, wt);
        if (t->ds.n_reg) {
            for (int b = 0; b < B; b++) mb->wt[b] = 1.0f;
            dataset_loss_weights(&t->ds, mb->items, B, a->prior_loss_weight, mb->wt);
            for (int b = 0; b < B; b++)
                if (mb->wt[b] != 1.0f) t->dev->scale(wt + b, mb->wt[b], 1);   /* w_b *= prior, as on the CPU */
        }
        return;
    }
    ddpm_sample_timesteps(mb->tt, B, m->sched.T, &t->st.rng);
    ddpm_sample_noise(mb->eps, per * B, &t->st.rng);
    ddpm_noise_offset(mb->eps, B, C, (size_t)h * w, a->noise_offset, &t->st.rng);
    ddpm_add_noise(mb->xt, mb->x0, mb->eps, mb->tt, B, per, &m->sched);
    ddpm_target(mb->target, mb->x0, mb->eps, mb->tt, B, per, m->prediction, &m->sched);
    for (int b = 0; b < B; b++) mb->tf[b] = (float)mb->tt[b];
}

/* --device cuda: micro_step from the UNet on. x_t, t, the target and the
 * weights are on the device already (micro_noise), and so are the contexts:
 * gathered from the cache's device copy (unet_forward's "upload" of them is
 * a copy on the device), or with --te the text encoder's output there, read
 * in place; eps stays there, the loss and its gradient run there and only
 * the loss comes down; --te's dctx is left there for its backward. */
static int device_loss_step(trainer *t, int weighted, float *lpart, char *err) {
    const train_args *a = t->a;
    sd_model *m = &t->m;
    micro_batch *mb = &t->mb;
    const nn_ops *ops = t->dev;
    int B = mb->n;
    size_t per = (size_t)t->td.lc * mb->h * mb->w;
    float *pred, *deps;
    m->unet.ctx_on_device = a->te;
    const float *ctx = a->te ? clip_device_out(&m->clip) : t->dctx;
    if (unet_forward(&m->unet, NULL, t->dxt, t->dtf, ctx, B, mb->h, mb->w, TOK_CTX) ||
        unet_device_io(&m->unet, &pred, &deps)) { snprintf(err, SD_ERR_LEN, "UNet: %s", m->unet.err); return -1; }
    ops->set_layer("loss");
    const float *dw = weighted ? t->dwt : NULL;
    float loss = ops->mse_loss_forward(pred, t->dtarget, dw, B, per);
    *lpart = loss / a->accum;
    ops->zero(deps, per * B);
    /* --compute fp16: backward of scale * loss (nn_loss_scaler) */
    float dloss = strcmp(a->compute, "fp16") == 0 ? t->st.scaler.scale / a->accum : 1.0f / a->accum;
    ops->mse_loss_backward(deps, pred, t->dtarget, dw, dloss, B, per);
    if (device_failed(t, "loss", err)) return -1;
    int rc = unet_backward(&m->unet, NULL, NULL, a->te ? t->ddctx : NULL);
    m->unet.ctx_on_device = 0;   /* the sampler's calls pass host memory */
    if (rc) { snprintf(err, SD_ERR_LEN, "UNet: %s", m->unet.err); return -1; }
    if (a->te && clip_backward(&m->clip, t->ddctx)) { snprintf(err, SD_ERR_LEN, "text encoder: %s", m->clip.err); return -1; }
    return 0;
}

/* one micro-batch forward and backward; *lpart = its share of the step's
 * loss. Gradients accumulate into G1, G2 (scaled by 1/accum). */
static int micro_step(trainer *t, float *lpart, char *err) {
    const train_args *a = t->a;
    sd_model *m = &t->m;
    micro_batch *mb = &t->mb;
    int B = mb->n, C = t->td.lc, h = mb->h, w = mb->w;
    size_t per = (size_t)C * h * w;
    /* per-sample weights: min-SNR, and --prior-loss-weight on regularisation images */
    float *wt = a->min_snr > 0 || t->ds.n_reg ? mb->wt : NULL;
    if (wt && !t->dev) {   /* --device cuda: made on the device (micro_noise) */
        if (a->min_snr > 0) ddpm_min_snr_weights(wt, mb->tt, B, a->min_snr, m->prediction, &m->sched);
        else for (int b = 0; b < B; b++) wt[b] = 1.0f;
        if (t->ds.n_reg) dataset_loss_weights(&t->ds, mb->items, B, a->prior_loss_weight, wt);
    }
    /* (--device cuda: out NULL, ctx stays there for the UNet) */
    if (a->te && clip_forward(&m->clip, t->dev ? NULL : mb->ctx, mb->ids, B, TOK_CTX, a->clip_skip)) { snprintf(err, SD_ERR_LEN, "text encoder: %s", m->clip.err); return -1; }
    if (t->dev) return device_loss_step(t, wt != NULL, lpart, err);
    if (unet_forward(&m->unet, mb->pred, mb->xt, mb->tf, mb->ctx, B, h, w, TOK_CTX)) { snprintf(err, SD_ERR_LEN, "UNet: %s", m->unet.err); return -1; }
    /* loss = mean((eps_hat - eps)^2), optionally min-SNR and prior-loss weighted */
    float loss = mse_loss_forward(mb->pred, mb->target, wt, B, per);
    *lpart = loss / a->accum;
    memset(mb->dpred, 0, sizeof(float) * per * B);
    /* dL/dpred for every sample of the micro-batch, scaled by 1/accum (the
     * step's loss is the mean over its micro-batches) */
    mse_loss_backward(mb->dpred, mb->pred, mb->target, wt, 1.0f / a->accum, B, per);
    if (unet_backward(&m->unet, mb->dpred, NULL, mb->dctx)) { snprintf(err, SD_ERR_LEN, "UNet: %s", m->unet.err); return -1; }
    if (a->te && clip_backward(&m->clip, mb->dctx)) { snprintf(err, SD_ERR_LEN, "text encoder: %s", m->clip.err); return -1; }
    return 0;
}

/* one clipping norm over every trainable parameter: g *= clip / (|g| + 1e-6) when that is < 1 */
static void clip_gradients(trainer *t) {
    float c = t->a->clip;
    if (c <= 0) return;
    double s2 = 0;
    for (size_t i = 0; i < t->n1; i++) s2 += (double)t->G1[i] * t->G1[i];
    for (size_t i = 0; i < t->n2; i++) s2 += (double)t->G2[i] * t->G2[i];
    float norm = (float)sqrt(s2), coef = c / (norm + 1e-6f);
    if (coef < 1.0f) {
        for (size_t i = 0; i < t->n1; i++) t->G1[i] *= coef;
        for (size_t i = 0; i < t->n2; i++) t->G2[i] *= coef;
    }
}

/* MPI with LoRA dropout: a micro-batch's masks come from the dropout RNGs
 * (splitmix64: drawing n numbers adds n * gamma to the state), so rank r
 * starts micro-batch k where a single process would: at the step's state
 * plus k times what one micro-batch draws. That amount is measured once,
 * by running this rank's first micro-batch and putting everything back. */
static int probe_dropout(trainer *t, char *err) {
    uint64_t s0 = t->m.unet.dropout_rng.state, s1 = t->m.clip.rng.state;
    float lpart;
    if (micro_step(t, &lpart, err)) return -1;
    t->drop_step[0] = t->m.unet.dropout_rng.state - s0;
    t->drop_step[1] = t->m.clip.rng.state - s1;
    t->m.unet.dropout_rng.state = s0;
    t->m.clip.rng.state = s1;
    t->drop_probed = 1;
    return 0;
}

/* The step's gradient over its --accum micro-batches (with MPI: over all
 * ranks' micro-batches, k % N on rank k), summed in micro-batch order by
 * dist.c: G = ((g_0 + g_1) + g_2) + ..., each g_k from zero. Every rank
 * walks every micro-batch's random draws, computes its own. */
static int accumulate(trainer *t, char *err) {
    const train_args *a = t->a;
    if (t->dev) {   /* --device cuda (one process): the LoRA gradients add up on the device */
        if (t->n2) clip_zero_grad(&t->m.clip);
        unet_zero_lora_grads(&t->m.unet);
        for (int k = 0; k < a->accum; k++) {
            float lpart;
            if (next_batch(t, 0, err)) return -1;
            micro_noise(t);
            if (micro_step(t, &lpart, err)) return -1;
            t->step_loss += lpart;
        }
        return 0;
    }
    int N = dist_size(), K = a->accum, stop = 0, s;
    uint64_t d0 = t->m.unet.dropout_rng.state, d1 = t->m.clip.rng.state;
    int dropout = N > 1 && a->dropout > 0;
    size_t n = t->n1 + t->n2;
    float *g = t->gsum ? t->gsum : t->G1;
    if (dist_begin(n, err)) return -1;
    for (int k = 0; k < K; k++) {
        int mine = k % N == dist_rank();
        if (next_batch(t, !mine, err)) return -1;
        micro_noise(t);
        if (!mine) continue;
        if (dropout && !t->drop_probed && probe_dropout(t, err)) return -1;
        if (dropout) {
            t->m.unet.dropout_rng.state = d0 + (uint64_t)k * t->drop_step[0];
            t->m.clip.rng.state = d1 + (uint64_t)k * t->drop_step[1];
        }
        memset(t->G1, 0, sizeof(float) * t->n1);
        if (t->n2) memset(t->G2, 0, sizeof(float) * t->n2);
        float lpart;
        if (micro_step(t, &lpart, err)) return -1;
        if (t->gsum) {
            memcpy(t->gsum, t->G1, sizeof(float) * t->n1);
            memcpy(t->gsum + t->n1, t->G2, sizeof(float) * t->n2);
        }
        if (dist_round(g, lpart, &t->step_loss, &s, err)) return -1;
        stop |= s;
    }
    if (dropout) {
        t->m.unet.dropout_rng.state = d0 + (uint64_t)K * t->drop_step[0];
        t->m.clip.rng.state = d1 + (uint64_t)K * t->drop_step[1];
    }
    if (dist_end(g, err)) return -1;
    if (t->gsum) {
        memcpy(t->G1, t->gsum, sizeof(float) * t->n1);
        memcpy(t->G2, t->gsum + t->n1, sizeof(float) * t->n2);
    }
    if (stop) g_stop = 1;          /* a rank got Ctrl-C: all stop after this step */
    return 0;
}

/* one optimizer step: --accum micro-batches of gradient, a check that the
 * loss is finite, clipping, AdamW */
static int optimizer_step(trainer *t, char *err) {
    const train_args *a = t->a;
    t->lr = lr_at(t->sched, a->lr, t->st.step, a->warmup, t->total);
    t->lr_te = lr_at(t->sched, a->te_lr, t->st.step, a->warmup, t->total);
    t->step_loss = 0;
    if (accumulate(t, err)) return -1;
    if (t->nan_at > 0 && t->st.step + 1 == t->nan_at) t->step_loss = NAN;
    if (!isfinite(t->step_loss)) {
        if (t->tty) fputc('\n', stderr);
        snprintf(err, SD_ERR_LEN, "step %ld: the loss is %s (try a lower --lr, e.g. %g, or --clip-grad 1; the last good checkpoint is in %s/)",
                 t->st.step + 1, isnan(t->step_loss) ? "NaN" : "infinite", a->lr / 4, a->out);
        return -1;
    }
    if (t->dev) {
        /* on the device: clip over both gradient sets (--te: the text
         * encoder's there too), AdamW on each set's A, B there */
        unet_t *u = &t->m.unet;
        clip_t *ce = &t->m.clip;
        t->dev->set_layer("optimizer");
        if (strcmp(a->compute, "fp16") == 0) {
            /* fp16: the gradients of scale * loss checked and unscaled first
             * (both sets on the device); an overflow skips the step: A, B and
             * AdamW untouched, the scale halved */
            float sc = t->st.scaler.scale;
            if (!nn_loss_scaler_unscale(&t->st.scaler, t->dev, u->dlora_grads, t->n1, t->dev,
                                        t->n2 ? ce->dlora_grads : NULL, t->n2)) {
                if (device_failed(t, "optimizer step", err)) return -1;
                if (t->tty) fputc('\n', stderr);
                fprintf(stderr, "step %ld: fp16 gradients overflowed at loss scale %g: step skipped, loss scale now %g\n",
                        t->st.step + 1, sc, t->st.scaler.scale);
                t->st.step++;
                if (t->stop_after > 0 && t->st.step - t->step0 >= t->stop_after) g_stop = 1;
                return 0;
            }
        }
        nn_clip_grad_norm2(t->dev, u->dlora_grads, t->n1, t->n2 ? ce->dlora_grads : NULL, t->n2, a->clip);
        if (t->n1) t->dev->adamw_step(&t->dopt, u->dlora_params, u->dlora_grads, t->lr);
        t->st.opt_unet.step = t->dopt.step;
        if (t->n2) {
            t->dev->adamw_step(&t->dopt_te, ce->dlora_params, ce->dlora_grads, t->lr_te);
            t->st.opt_te.step = t->dopt_te.step;
        }
        if (device_failed(t, "optimizer step", err)) return -1;
    } else {
        clip_gradients(t);
        adamw_step(&t->st.opt_unet, t->P1, t->G1, t->lr);
        if (t->n2) adamw_step(&t->st.opt_te, t->P2, t->G2, t->lr_te);
    }
    t->st.step++;
    if (t->stop_after > 0 && t->st.step - t->step0 >= t->stop_after) g_stop = 1;
    return 0;
}

/* the step's row of loss.csv, and the progress line: step, loss, seconds
 * per step and images per second (optimizer steps only), elapsed < ETA */
static int log_step(trainer *t, char *err) {
    long step = t->st.step, total = t->total, done = step - t->step0;
    t->st.loss[step - 1] = t->step_loss;
    t->st.nloss = step;
    t->smooth = smoothed(t->smooth, t->step_loss, step - 1);
    t->loss_hist[step - 1] = t->smooth;
    if (!dist_is_root()) return 0;     /* MPI: rank 0 logs */
    fprintf(t->csv, "%ld,%.6f,%.6f,%.6g\n", step, t->step_loss, t->smooth, t->lr);
    if (fflush(t->csv) != 0) {
        snprintf(err, SD_ERR_LEN, "%.600s: %s (check that --out has space)", t->csv_tmp, strerror(errno));
        return -1;
    }
    if (!t->csv_in_place) {
        if (rename(t->csv_tmp, t->csv_path) != 0) {
            snprintf(err, SD_ERR_LEN, "%.600s: cannot rename loss.csv.tmp onto it: %s (check that --out is writable)", t->csv_path, strerror(errno));
            return -1;
        }
        t->csv_in_place = 1;
    }
    double el = now_s() - t->t_start, ips = done / (el > 0 ? el : 1e-9);
    char eta[32], ela[32];
    cli_fmt_duration(eta, sizeof eta, (total - step) / (ips > 0 ? ips : 1e-9));
    cli_fmt_duration(ela, sizeof ela, el);
    if (t->tty || step == total || step % 10 == 0) {
        int bar = (int)(30 * step / total);
        double sps = t->t_steps / done, imgs = (double)done * t->a->batch * t->a->accum / (t->t_steps > 0 ? t->t_steps : 1e-9);
        fprintf(stderr, "%s[%.*s%*s] step %ld/%ld  loss %.4f (avg %.4f)  %.3f s/step  %.1f img/s  %s < %s%s",
                t->tty ? "\r" : "", bar, "==============================", 30 - bar, "", step, total,
                t->step_loss, t->smooth, sps, imgs, ela, eta, t->tty ? "   " : "\n");
    }
    return 0;
}

/* every --save-every steps, at the end, and on Ctrl-C: the LoRA (NAME-stepN,
 * or NAME at the end) and the state, or with --full the UNet; and loss.png */
static int checkpoint_due(const trainer *t) {
    long s = t->st.step;
    return (t->a->save_every > 0 && s % t->a->save_every == 0) || s == t->total || g_stop;
}

static int save_checkpoint(trainer *t, char *err) {
    const train_args *a = t->a;
    long step = t->st.step;
    char path[1200];
    snprintf(t->lora_path, sizeof t->lora_path, step == t->total ? "%s/%s.safetensors" : "%s/%s-step%06ld.safetensors",
             a->out, a->name, step);
    if (a->full) {
        snprintf(t->lora_path, sizeof t->lora_path, "%s/%s-unet.safetensors", a->out, a->name);
        if (save_full_unet(t->lora_path, &t->m, err)) return -1;
    } else if (save_lora(t->lora_path, &t->m, a, step, t->total, t->ds.n_total_with_repeats,   /* kohya counts repeats */
                         &(run_info){&t->ds, t->st.sample_pos, t->st.started}, err) ||
               save_state(t->state_path, &t->st, &t->m, a, err)) return -1;
    snprintf(path, sizeof path, "%s/loss.png", a->out);
    if (save_loss_plot(path, t, step, err)) return -1;
    if (t->tty) fputc('\n', stderr);
    if (a->full) fprintf(stderr, "saved %s\n", t->lora_path);
    else fprintf(stderr, "saved %s and %s\n", t->lora_path, t->state_path);
    return 0;
}

/* --sample-every: a grid of the sample prompts at this step. Sampling runs
 * the UNet at batch 2 (cfg) without training activations; then back. */
static int sample_due(const trainer *t) {
    const train_args *a = t->a;
    return a->sample_prompt && a->sample_every > 0 && (t->st.step % a->sample_every == 0 || t->st.step == t->total);
}

static int sample_grid_step(trainer *t, char *err) {
    char path[1200];
    snprintf(path, sizeof path, "%s/sample-step%06ld.png", t->a->out, t->st.step);
    if (unet_alloc_acts(&t->m.unet, 2, t->td.lh, t->td.lw, TOK_CTX, 0) ||
        (t->m.clip.training = 0, save_sample_grid(path, &t->m, t->a, t->st.step, err)) ||
        alloc_train_acts(t, err)) {
        if (!err[0]) snprintf(err, SD_ERR_LEN, "UNet: %s", t->m.unet.err);
        return -1;
    }
    t->m.clip.training = t->a->te;
    fprintf(stderr, "sample grid: %s\n", path);
    return 0;
}

/* after the loop: the before/after grid, and what was done (or how to resume) */
static int finish(trainer *t, double t_loop, char *err) {
    const train_args *a = t->a;
    char path[1200];
    if (!g_stop && !a->full && !a->no_grid) {
        snprintf(path, sizeof path, "%s/before_after.png", a->out);
        t->m.clip.training = 0;
        if (unet_alloc_acts(&t->m.unet, 2, t->td.lh, t->td.lw, TOK_CTX, 0)) { snprintf(err, SD_ERR_LEN, "UNet: %s", t->m.unet.err); return 1; }
        if (save_before_after(path, &t->m, a, &t->ds, t->st.step, err)) return 1;
        fprintf(stderr, "before/after grid (top: base model, bottom: with the LoRA): %s\n", path);
    }
    if (g_stop) {
        fprintf(stderr, "stopped at step %ld; continue with: ./train %s --resume %s (and the same flags)\n", t->st.step, a->data, t->state_path);
        return 130;
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    long steps = t->st.step;
    /* one line the comparison (make compare) reads */
    fprintf(stderr, "summary: mode %s, trainable %zu, peak_rss_mb %.1f, s_per_step %.4f, final_loss %.5f",
            a->full ? "full" : "lora", t->n1 + t->n2, ru.ru_maxrss / 1024.0,
            t_loop / (double)(steps - t->step0 > 0 ? steps - t->step0 : 1), t->smooth);
#ifdef SDLORA_CUDA
    /* --device cuda: the most device memory this run held at once (weights,
     * activations, scratch, cuBLAS's workspace; the CUDA context not counted) */
    if (t->dev) fprintf(stderr, ", peak_device_mb %.1f", (double)cuda_mem_peak() / 1048576.0);
#endif
    fputc('\n', stderr);
    if (a->full)
        fprintf(stderr, "done: %ld steps in %.1f s. UNet weights: %s  loss: %s/loss.csv, %s/loss.png\n",
                steps, t_loop, t->lora_path, a->out, a->out);
    else
        fprintf(stderr, "done: %ld steps in %.1f s. LoRA: %s/%s.safetensors  loss: %s/loss.csv, %s/loss.png\n"
                        "try: ./sample --model %s --lora %s/%s.safetensors --prompt \"%s\"\n",
                steps, t_loop, a->out, a->name, a->out, a->out, t->m.path, a->out, a->name,
                t->ds.n_images ? t->ds.caption[0] : "a photo");
    return 0;
}

static void trainer_free(trainer *t) {
    micro_batch *b = &t->mb;
    free(b->x0); free(b->eps); free(b->xt); free(b->pred); free(b->target); free(b->dpred);
    free(b->ctx); free(b->dctx); free(b->tf); free(b->wt); free(b->tt); free(b->ids); free(b->img); free(b->items);
    free(t->td.resos); free(t->td.bucket_of); free(t->td.rw); free(t->td.rh); free(t->td.lat_off);
    free(t->td.bstart); free(t->td.blen);
    free(t->order); free(t->gsum);
    if (t->csv) fclose(t->csv);
    if (t->csv && !t->csv_in_place) remove(t->csv_tmp);   /* nothing of this run to show */
    free(t->loss_hist);
    free(t->td.latents); free(t->td.ctx); free(t->td.ids); free(t->td.ctx_empty);
    adamw_free(&t->st.opt_unet); adamw_free(&t->st.opt_te);
    device_free(t);
    free(t->st.loss);
    dataset_free(&t->ds);
    if (t->model_loaded) sd_model_free(&t->m);
}

/* the run, as a list of steps */
static int train(train_args *a, char *err) {
    trainer t;
    memset(&t, 0, sizeof t);
    t.a = a;
    int ret = 1;
    if (load_model_and_data(&t, err) || setup_trainables(&t, err) || to_device(&t, err)) goto out;
    print_run(&t);
    if (build_caches(&t, err) || alloc_buffers(&t, err) || open_loss_log(&t, err)) goto out;
    install_stop_hooks(&t);
    int profiling = prof_init();         /* SDLORA_PROFILE=1: the training steps only */
    prof_reset();
    t.tty = isatty(2);
    t.step0 = t.st.step;
    t.t_start = now_s();
    while (t.st.step < t.total && !g_stop) {
        double t0 = now_s();
        if (optimizer_step(&t, err)) goto out;
        t.t_steps += now_s() - t0;
        prof_enable(0);                  /* checkpoints and grids are not steps */
        if (log_step(&t, err)) goto out;
        if ((checkpoint_due(&t) || sample_due(&t)) && device_to_host(&t, err)) goto out;   /* --device cuda */
        if (checkpoint_due(&t) && dist_is_root() && save_checkpoint(&t, err)) goto out;
        if (sample_due(&t) && sample_grid_step(&t, err)) goto out;
        prof_enable(profiling);
    }
    prof_print(stderr, "training steps (per kind of operation)", t.t_steps);
    if (device_to_host(&t, err)) goto out;
    ret = finish(&t, now_s() - t.t_start, err);
out:
    trainer_free(&t);
    return ret;
}

/* ------------------------------------------------------------ the flags */
/* A data folder may carry its own default flags in DIR/sdlora_args.txt (the
 * bundled data/ does: the settings that suit the tiny model); they go before
 * the command line's, so anything typed wins. Returns the argument list to
 * parse (argv itself when there is no such file; else a new list whose
 * words point into buf and argv) and sets *ac, the file's name and its
 * number of words *nfile (they come first); NULL when out of memory. */
static char **with_args_file(int argc, char **argv, const cli_opt *opts, int nopts, char *buf, size_t nbuf, int *ac,
                             char *file, size_t nf, int *nfile) {
    const char *dir = NULL;
    *ac = argc;
    *nfile = 0;
    for (int i = 1; i < argc; i++) {
        if (argv[i][0] != '-') { dir = argv[i]; break; }
        /* a flag that takes a value, written "--flag value", skips that value */
        for (int k = 0; k < nopts; k++)
            if (strcmp(argv[i], opts[k].name) == 0 && opts[k].kind != OPT_FLAG) { i++; break; }
    }
    if (!dir) return argv;
    size_t dl = strlen(dir);
    snprintf(file, nf, "%s%ssdlora_args.txt", dir, dl && dir[dl - 1] == '/' ? "" : "/");
    FILE *f = fopen(file, "r");
    if (!f) return argv;
    size_t n = fread(buf, 1, nbuf - 1, f);
    buf[n] = 0;
    fclose(f);
    char **av = malloc(sizeof(char *) * (size_t)(argc + 256));
    if (!av) return NULL;
    int k = 0;
    av[k++] = argv[0];
    for (char *s = buf; *s && k < 250; ) {      /* words, and # comments to the end of a line */
        while (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r') s++;
        if (!*s) break;
        if (*s == '#') { while (*s && *s != '\n') s++; continue; }
        char *word = s;
        while (*s && *s != ' ' && *s != '\t' && *s != '\n' && *s != '\r') s++;
        if (*s) *s++ = 0;
        av[k++] = word;
    }
    *nfile = k - 1;
    for (int i = 1; i < argc; i++) av[k++] = argv[i];
    *ac = k;
    return av;
}

/* the combinations the table's ranges cannot check; 0 or 2 */
static int check_args(train_args *a) {
    struct stat sb;
    if (a->caption_ext) {
        /* ".caption" or "caption": kohya's --caption_extension is written both ways */
        static char ext[40];
        const char *e = a->caption_ext;
        size_t l = strlen(e);
        if (l == 0 || l > 32 || strchr(e, '/') || strcmp(e, ".") == 0) {
            fprintf(stderr, "error: --caption-ext %s: not a file extension (use e.g. --caption-ext .caption or --caption-ext .txt)\n", e);
            return 2;
        }
        snprintf(ext, sizeof ext, "%s%s", e[0] == '.' ? "" : ".", e);
        a->caption_ext = ext;
    }
    if (a->cap.keep_tokens > 0 && !a->cap.shuffle)
        fprintf(stderr, "warning: --keep-tokens %d does nothing without --shuffle-caption (as in kohya)\n", a->cap.keep_tokens);
    if (a->cap.keep_sep && !a->cap.shuffle)
        fprintf(stderr, "warning: --keep-tokens-separator does nothing without --shuffle-caption: captions are "
                "trained with the separator in them (as in kohya)\n");
    if (stat(a->data, &sb) != 0 || !S_ISDIR(sb.st_mode)) {
        fprintf(stderr, "error: %s: not a folder (give the folder that holds your images and captions)\n", a->data);
        return 2;
    }
    if (a->sample_every > 0 && !a->sample_prompt) {
        fprintf(stderr, "error: --sample-every needs --sample-prompt (e.g. --sample-prompt \"a red circle|a blue square\")\n");
        return 2;
    }
    if (a->full && strcmp(a->weight_dtype, "fp32") != 0) {
        fprintf(stderr, "error: --weight-dtype %s: full fine-tuning updates the weights themselves and needs fp32 (drop --full or use --weight-dtype fp32)\n", a->weight_dtype);
        return 2;
    }
    if (strcmp(a->device, "cuda") == 0 && a->full) {
        fprintf(stderr, "error: --device cuda: trains a LoRA only for now (drop --full, or use --device cpu)\n");
        return 2;
    }
    if (a->full && a->resume) {
        fprintf(stderr, "error: --resume works with LoRA runs only (drop --full or --resume)\n");
        return 2;
    }
    if (a->reg && (stat(a->reg, &sb) != 0 || !S_ISDIR(sb.st_mode))) {
        fprintf(stderr, "error: --reg %s: not a folder (give the folder of regularisation images, e.g. reg/ with 1_person/ in it)\n", a->reg);
        return 2;
    }
    if (strchr(a->name, '/')) {
        fprintf(stderr, "error: --name %s: must be a file name, not a path (use --out for the folder)\n", a->name);
        return 2;
    }
    return 0;
}

/* DIR/sdlora_args.txt, then the command line, into a; -1 to go on, else
 * the exit status (0 after --help, 2 for a bad flag) */
static int parse_args(train_args *a, int argc, char **argv) {
    const cli_opt opts[] = {
        {"--model", OPT_STR, &a->model, 0, 0, NULL, "base model: SD1.x/SD2.x .safetensors or diffusers folder (default: " SD_DEFAULT_MODEL ")"},
        {"--tokenizer", OPT_STR, &a->tokenizer, 0, 0, NULL, "folder with vocab.json + merges.txt (single-file checkpoints)"},
        {"--out", OPT_STR, &a->out, 0, 0, NULL, "output folder for the LoRA, loss.csv, loss.png, state"},
        {"--name", OPT_STR, &a->name, 0, 0, NULL, "file name of the LoRA (NAME.safetensors)"},
        {"--targets", OPT_CHOICE, &a->targets, 0, 0, "qv|attn|transformer", "UNet layers that get a LoRA"},
        {"--te", OPT_FLAG, &a->te, 0, 0, NULL, "also train the text encoder (its LoRA, or all of it with --full)"},
        {"--full", OPT_FLAG, &a->full, 0, 0, NULL, "full fine-tuning of every UNet weight instead of LoRA (the baseline)"},
        {"--rank", OPT_INT, &a->rank, 1, 1024, NULL, "LoRA rank r"},
        {"--alpha", OPT_FLOAT, &a->alpha, 1e-6, 1e6, NULL, "LoRA alpha (scale = alpha / rank)"},
        {"--conv-rank", OPT_INT, &a->conv_rank, 0, 1024, NULL, "conv LoRA (LoCon, kohya's conv_dim): rank on the ResNet and sampler 3x3 convs (their time_emb_proj and conv_shortcut get --rank); 0: none"},
        {"--conv-alpha", OPT_FLOAT, &a->conv_alpha, 0, 1e6, NULL, "conv LoRA alpha, scale = alpha / conv rank (0: the conv rank)"},
        {"--dropout", OPT_FLOAT, &a->dropout, 0, 0.99, NULL, "dropout on the LoRA branch"},
        {"--res", OPT_INT, &a->res, 0, 4096, NULL, "training resolution, multiple of 8 (0: the model's)"},
        {"--caption-ext", OPT_STR, &a->caption_ext, 0, 0, NULL, "read only NAME + this extension as caption, e.g. .caption (default: NAME.txt, else NAME.caption)"},
        {"--shuffle-caption", OPT_FLAG, &a->cap.shuffle, 0, 0, NULL, "shuffle the comma-separated tags of each caption at every step (kohya)"},
        {"--keep-tokens", OPT_INT, &a->cap.keep_tokens, 0, 1000000, NULL, "with --shuffle-caption: the first N tags stay in front"},
        {"--keep-tokens-separator", OPT_STR, &a->cap.keep_sep, 0, 0, NULL, "with --shuffle-caption: in \"a, b S c, d S e\" only c, d move (kohya; e.g. \"|||\")"},
        {"--caption-dropout", OPT_FLOAT, &a->cap.dropout, 0, 1, NULL, "probability of training a sample with the empty caption"},
        {"--flip", OPT_FLAG, &a->flip, 0, 0, NULL, "random horizontal flips"},
        {"--random-crop", OPT_FLAG, &a->random_crop, 0, 0, NULL, "random instead of centre crop (no latent cache: slower)"},
        {"--buckets", OPT_FLAG, &a->buckets, 0, 0, NULL, "aspect-ratio buckets (kohya enable_bucket): each image at the bucket nearest its shape, area <= res^2"},
        {"--bucket-step", OPT_INT, &a->bucket_step, 8, 4096, NULL, "bucket sides are multiples of this (with --buckets)"},
        {"--min-bucket", OPT_INT, &a->min_bucket, 8, 16384, NULL, "smallest bucket side (with --buckets)"},
        {"--max-bucket", OPT_INT, &a->max_bucket, 8, 16384, NULL, "largest bucket side, >= --res (with --buckets)"},
        {"--reg", OPT_STR, &a->reg, 0, 0, NULL, "regularisation (class) images, kohya reg_data_dir: N_class folders, balanced to the training samples"},
        {"--prior-loss-weight", OPT_FLOAT, &a->prior_loss_weight, 0, 1e6, NULL, "loss weight of the regularisation images (DreamBooth prior preservation)"},
        {"--batch", OPT_INT, &a->batch, 1, 1024, NULL, "images per micro-batch"},
        {"--accum", OPT_INT, &a->accum, 1, 1024, NULL, "gradient accumulation: micro-batches per step"},
        {"--steps", OPT_INT, &a->steps, 0, 100000000, NULL, "optimizer steps (0: from --epochs)"},
        {"--epochs", OPT_INT, &a->epochs, 0, 1000000, NULL, "passes over the data set (0 with --steps 0: 10)"},
        {"--lr", OPT_FLOAT, &a->lr, 0, 10, NULL, "UNet LoRA learning rate"},
        {"--te-lr", OPT_FLOAT, &a->te_lr, 0, 10, NULL, "text-encoder LoRA learning rate"},
        {"--scheduler", OPT_CHOICE, &a->sched, 0, 0, "constant|constant_with_warmup|cosine|linear", "learning-rate schedule"},
        {"--warmup", OPT_INT, &a->warmup, 0, 100000000, NULL, "warm-up steps"},
        {"--beta1", OPT_FLOAT, &a->beta1, 0, 0.999999, NULL, "AdamW beta1"},
        {"--beta2", OPT_FLOAT, &a->beta2, 0, 0.999999, NULL, "AdamW beta2"},
        {"--adam-eps", OPT_FLOAT, &a->adam_eps, 0, 1, NULL, "AdamW epsilon"},
        {"--weight-decay", OPT_FLOAT, &a->wd, 0, 10, NULL, "AdamW weight decay"},
        {"--clip-grad", OPT_FLOAT, &a->clip, 0, 1e9, NULL, "gradient-norm clipping (0: off)"},
        {"--min-snr-gamma", OPT_FLOAT, &a->min_snr, 0, 1e6, NULL, "min-SNR loss weighting gamma (0: off)"},
        {"--noise-offset", OPT_FLOAT, &a->noise_offset, 0, 10, NULL, "noise offset"},
        {"--clip-skip", OPT_INT, &a->clip_skip, 1, 12, NULL, "use the output of the N-th last CLIP layer"},
        {"--seed", OPT_U64, &a->seed, 0, 9.2e18, NULL, "random seed"},
        {"--grad-checkpoint", OPT_FLAG, &a->grad_ckpt, 0, 0, NULL, "recompute activations in backward (less memory)"},
        {"--save-every", OPT_INT, &a->save_every, 0, 100000000, NULL, "save the LoRA and state every N steps (0: only at the end)"},
        {"--precision", OPT_CHOICE, &a->precision, 0, 0, "fp32|fp16", "dtype of the saved LoRA"},
        {"--weight-dtype", OPT_CHOICE, &a->weight_dtype, 0, 0, "fp32|fp16", "fp16: hold the model's frozen weights as fp16 (half the RAM, fp32 math; not with --full)"},
        {"--sample-every", OPT_INT, &a->sample_every, 0, 100000000, NULL, "sample grid every N steps"},
        {"--sample-prompt", OPT_STR, &a->sample_prompt, 0, 0, NULL, "prompt(s) for the sample grid, separated by '|'"},
        {"--no-grid", OPT_FLAG, &a->no_grid, 0, 0, NULL, "skip the before/after grid at the end"},
        {"--resume", OPT_STR, &a->resume, 0, 0, NULL, "training state to resume from (OUT/state.safetensors)"},
        {"--threads", OPT_INT, &a->threads, 0, 4096, NULL, "CPU threads (0: all)"},
        {"--device", OPT_CHOICE, &a->device, 0, 0, "cpu|cuda", "where the UNet's step, the VAE encode and the text encoder run (cuda: a build with make CUDA=1 and an NVIDIA GPU)"},
        {"--compute", OPT_CHOICE, &a->compute, 0, 0, "fp32|bf16|fp16", "bf16: every matrix product on bf16-rounded operands, fp32 sums (LoRA weights, optimizer, loss stay fp32); fp16 (--device cuda only): fp16 operands with dynamic loss scaling"},
        {"--tf32", OPT_FLAG, &a->tf32, 0, 0, NULL, "--device cuda: fp32 matrix products on TF32 tensor cores (faster, 10-bit products)"},
    };
    enum { NOPTS = (int)(sizeof opts / sizeof opts[0]) };
    int ac, npos, nfile, set_at[NOPTS];
    static char argsbuf[4096];   /* the values point into it: it outlives this call */
    char file[1200] = "";
    char **av = with_args_file(argc, argv, opts, NOPTS, argsbuf, sizeof argsbuf, &ac, file, sizeof file, &nfile);
    if (!av) { fprintf(stderr, "error: out of memory\n"); return 1; }
    const char *pos[1];
    int rc = cli_parse_at(ac, av, opts, NOPTS, pos, 1, &npos,
                          "usage: ./train DIR [options]\n"
                          "Trains a LoRA for a Stable Diffusion 1.x or 2.x model on the captioned images in DIR\n"
                          "(PNG/JPEG with same-name .txt captions, or a captions.csv; N_name folders repeat N times).\n"
                          "Data parallel: make MPI=1, then mpirun -np N ./train DIR: each rank --batch b x --accum a,\n"
                          "the same LoRA bytes as one process with --accum N*a (SDLORA_DIST_TIMEOUT: seconds, default 60).",
                          set_at);
    if (rc == 0 && npos != 1) {
        fprintf(stderr, "error: no data folder given (run ./train DIR, e.g. ./train data/; see ./train --help)\n");
        rc = 2;
    }
    if (rc == 0) a->data = pos[0];
    if (rc == 0) rc = check_args(a);
    /* what each setting is and where it came from: the file, the command line, the default */
    if (rc == 0) cli_print_sources(stderr, opts, NOPTS, set_at, ac, av, nfile, file);
    if (av != argv) free(av);   /* the values point into argsbuf and argv, not into av */
    return rc == 1 ? 0 : rc ? rc : -1;
}

int main(int argc, char **argv) {
    train_args a = {
        .model = NULL, .out = "out", .name = "lora", .targets = "qv", .sched = "constant", .precision = "fp32",
        .weight_dtype = "fp32", .device = "cpu", .compute = "fp32",
        .bucket_step = 64, .min_bucket = 256, .max_bucket = 1024, .prior_loss_weight = 1.0f,
        .rank = 4, .res = 0, .batch = 1, .accum = 1, .steps = 0, .epochs = 0, .warmup = 0,
        .save_every = 0, .sample_every = 0, .clip_skip = 1,
        .alpha = 4.0f, .dropout = 0.0f, .lr = 1e-4f, .te_lr = 5e-5f,
        .beta1 = 0.9f, .beta2 = 0.999f, .adam_eps = 1e-8f, .wd = 1e-2f, .clip = 1.0f,
        .min_snr = 0.0f, .noise_offset = 0.0f, .seed = 42,
    };
    if (dist_init(&argc, &argv)) return 1;
    int rc = parse_args(&a, argc, argv);
    if (rc >= 0) { dist_finish(0, rc); return rc; }
    if (a.conv_alpha <= 0) a.conv_alpha = (float)a.conv_rank;
    /* fp16 is the GPU's: a CPU has no fp32-summing fp16 product (AVX512-FP16
     * sums in fp16), so it would be bf16's cost with less range and a loss
     * scale to manage; and TF32 is a GPU math mode */
    if (strcmp(a.device, "cuda") != 0 && strcmp(a.compute, "fp16") == 0) {
        fprintf(stderr, "error: --compute fp16: runs on the GPU only (add --device cuda, or use --compute bf16 on the CPU)\n");
        dist_finish(0, 2);
        return 2;
    }
    if (strcmp(a.device, "cuda") != 0 && a.tf32) {
        fprintf(stderr, "error: --tf32: TF32 is a GPU math mode (add --device cuda, or drop --tf32)\n");
        dist_finish(0, 2);
        return 2;
    }
    char err[SD_ERR_LEN] = "";
    /* --device cuda without CUDA=1, a driver or a GPU: one line saying which */
    if (strcmp(a.device, "cuda") == 0 && !nn_device_emulated() && cuda_device_check(err) != 0) { fprintf(stderr, "%s\n", err); dist_finish(1, 1); return 1; }
    if (strcmp(a.device, "cuda") == 0 && dist_size() > 1) {
        fprintf(stderr, "error: --device cuda under mpirun: not supported yet (one process per GPU, or --device cpu)\n");
        dist_finish(1, 1);
        return 1;
    }
    /* mpirun -np N: --accum counts each rank's micro-batches, the run has
     * N times as many per step (what a single process with that --accum does) */
    a.accum *= dist_size();
    if (dist_size() > 1)
        fprintf(stderr, "data parallel: %d ranks x --batch %d x %d micro-batches per step: the run of one process with --batch %d --accum %d\n",
                dist_size(), a.batch, a.accum / dist_size(), a.batch, a.accum);
#ifdef _OPENMP
    if (a.threads > 0) omp_set_num_threads(a.threads);
#endif
    /* cli_parse checked it is fp32, bf16 or fp16 (fp16: the CPU's part, --te, stays fp32) */
    nn_set_compute(a.compute, a.device, a.tf32);
    rc = train(&a, err);
    if (rc && rc != 130) {
        if (dist_size() > 1) fprintf(dist_stderr(), "error: rank %d of %d: %s\n", dist_rank(), dist_size(), err);
        else fprintf(stderr, "error: %s\n", err);
    }
    dist_finish(rc && rc != 130, rc);
    return rc;
}

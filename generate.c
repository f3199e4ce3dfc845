/* generate.c: text to image (article 5.5), step for step as diffusers'
 * StableDiffusionPipeline.__call__ runs it, so that a seed gives the same
 * picture here as there:
 *
 *   cond   = CLIP(prompt),  uncond = CLIP(negative)     ("" when none: diffusers
 *            encodes the empty prompt, it does not use zeros)
 *   x      = randn(B, 4, h, w) * init_noise_sigma       one randn call for the batch
 *   for each step i:
 *       xin       = scale_model_input([x, x], i)        batch 2B, uncond first
 *       [u, c]    = UNet(xin, t_i, [uncond, cond])
 *       eps       = u + cfg (c - u)                      classifier-free guidance
 *       x         = sampler_step(eps, x, i)              ancestral noise: same generator
 *   image  = VAE_decode(x / 0.18215) -> round(clamp((y + 1) / 2) * 255)
 *
 * With cfg <= 1 diffusers skips the unconditional half (its
 * do_classifier_free_guidance is cfg > 1), and so do we: eps = c.
 *
 * One departure: clip skip (A1111's "Clip skip: N") applies to the negative
 * prompt too, as in A1111. diffusers' encode_prompt(clip_skip=N-1) skips
 * layers for the positive prompt only; tools/check_sample_diffusers.py hands
 * it both embeddings made with the skip.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "generate.h"
#include "sampler.h"
#include "image.h"

/* ------------------------------------------------------------------------ */
/* sampling                                                                  */

/* the sampler's config: the model's scheduler (betas, offset, prediction)
 * with diffusers' default timestep spacing for the chosen class */
static int make_sampler(sampler_t *s, const sd_model *m, const gen_params *p, size_t n, char *err) {
    sampler_kind kind;
    char e[DDPM_ERR_LEN > 256 ? DDPM_ERR_LEN : 256];
    if (sampler_kind_from_name(p->sampler ? p->sampler : "euler_a", &kind, e)) {
        snprintf(err, SD_ERR_LEN, "sampler: %s", e);
        return -1;
    }
    sampler_config c;
    sampler_config_default(&c, kind);
    c.num_train_timesteps = m->sched.T;
    c.beta_schedule = m->sched.kind == DDPM_LINEAR ? "linear" : "scaled_linear";
    c.beta_start = m->sched.beta_start;
    c.beta_end = m->sched.beta_end;
    c.steps_offset = m->steps_offset;
    if (m->timestep_spacing[0] && sampler_spacing_from_name(m->timestep_spacing, &c.spacing, e)) {
        snprintf(err, SD_ERR_LEN, "%.600s/scheduler/scheduler_config.json: %.200s", m->path, e);
        return -1;
    }
    c.prediction = m->prediction;
    c.karras = p->karras;
    if (sampler_init(s, kind, p->steps, n, &c, e)) {
        snprintf(err, SD_ERR_LEN, "sampler %s: %s", p->sampler, e);
        return -1;
    }
    return 0;
}

int sd_generate(sd_model *m, const gen_params *p, uint8_t *rgb, char *err) {
    int B = p->batch, W = p->width, H = p->height;
    if (B < 1 || p->steps < 1 || W < 8 || H < 8 || W % 8 || H % 8) {
        snprintf(err, SD_ERR_LEN, "size %dx%d, batch %d, steps %d: not allowed "
                 "(width and height multiples of 8, batch and steps >= 1)", W, H, B, p->steps);
        return -1;
    }
    int h = sd_latent_side(m, H), w = sd_latent_side(m, W);
    int C = m->unet.cfg.in_channels, d = m->clip.config.hidden_size, T = TOK_CTX;
    int cfg_on = p->cfg > 1.0f;               /* diffusers' do_classifier_free_guidance */
    int nb = cfg_on ? 2 * B : B;              /* UNet batch */
    size_t nlat = (size_t)B * C * h * w, per = (size_t)C * h * w;
    if (h <= 0 || w <= 0 || m->unet.cfg.out_channels != C || m->vae.cfg.latent_channels != C) {
        snprintf(err, SD_ERR_LEN, "size %dx%d: too small for this model's VAE", W, H);
        return -1;
    }

    sampler_t s;
    memset(&s, 0, sizeof s);
    if (make_sampler(&s, m, p, nlat, err)) return -1;

    int rc = -1;
    float *ctx = malloc(sizeof(float) * (size_t)nb * T * d);      /* [uncond x B, cond x B] */
    float *x = malloc(sizeof(float) * nlat);
    float *xin = malloc(sizeof(float) * per * nb);
    float *eps = malloc(sizeof(float) * per * nb);
    float *tt = malloc(sizeof(float) * nb);
    float *img = malloc(sizeof(float) * 3 * (size_t)H * W);
    if (!ctx || !x || !xin || !eps || !tt || !img) { snprintf(err, SD_ERR_LEN, "out of memory"); goto done; }

    /* text: one CLIP pass for the (negative, prompt) pair, then copied B
     * times each, as diffusers' num_images_per_prompt repeats the embeddings */
    {
        const char *texts[2] = {p->negative ? p->negative : "", p->prompt ? p->prompt : ""};
        float *two = malloc(sizeof(float) * 2 * (size_t)T * d);
        if (!two) { snprintf(err, SD_ERR_LEN, "out of memory"); goto done; }
        if (sd_encode_prompts(m, cfg_on ? texts : texts + 1, cfg_on ? 2 : 1, p->clip_skip, two, err)) {
            free(two);
            goto done;
        }
        size_t one = (size_t)T * d;
        for (int b = 0; b < B; b++) {
            if (cfg_on) {
                memcpy(ctx + (size_t)b * one, two, sizeof(float) * one);
                memcpy(ctx + (size_t)(B + b) * one, two + one, sizeof(float) * one);
            } else {
                memcpy(ctx + (size_t)b * one, two, sizeof(float) * one);
            }
        }
        free(two);
    }

    if (unet_alloc_acts(&m->unet, nb, h, w, T, 0)) {
        snprintf(err, SD_ERR_LEN, "unet: %s", m->unet.err);
        goto done;
    }

    torch_rng rng;
    torch_rng_seed(&rng, p->rng_cuda ? TORCH_RNG_CUDA : TORCH_RNG_CPU, p->seed);
    sampler_init_latents(&s, &rng, x, nlat);

    for (int i = 0; i < s.num_steps; i++) {
        /* the UNet sees [x, x] (uncond half first) scaled for this step */
        sampler_scale_model_input(&s, xin, x, nlat, i);
        if (cfg_on) memcpy(xin + nlat, xin, sizeof(float) * nlat);
        float t = sampler_timestep(&s, i);
        for (int b = 0; b < nb; b++) tt[b] = t;
        if (unet_forward(&m->unet, eps, xin, tt, ctx, nb, h, w, T)) {
            snprintf(err, SD_ERR_LEN, "unet: %s", m->unet.err);
            goto done;
        }
        /* classifier-free guidance: eps = u + cfg (c - u), in place on u */
        if (cfg_on) {
            float g = p->cfg;
            for (size_t k = 0; k < nlat; k++) eps[k] = eps[k] + g * (eps[nlat + k] - eps[k]);
        }
        sampler_step(&s, eps, x, nlat, i, &rng);
        if (p->on_step) p->on_step(p->on_step_ctx, i + 1, s.num_steps);
    }

    /* decode one image at a time: the VAE's activations at 512x512 are the
     * largest buffers of the whole run, and images do not interact */
    if (vae_alloc_acts(&m->vae, 1, H, W, 0)) {
        snprintf(err, SD_ERR_LEN, "vae: %s", m->vae.err);
        goto done;
    }
    for (int b = 0; b < B; b++) {
        if (vae_decode_latents(&m->vae, img, x + (size_t)b * per, 1, h, w)) {
            snprintf(err, SD_ERR_LEN, "vae: %s", m->vae.err);
            goto done;
        }
        image_from_chw(rgb + (size_t)b * H * W * 3, img, W, H);
    }
    rc = 0;
done:
    sampler_free(&s);
    free(ctx); free(x); free(xin); free(eps); free(tt); free(img);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* AUTOMATIC1111's "parameters" text                                         */

/* A1111's names for the samplers (the "Schedule type" of newer versions is
 * folded into the name, as older versions and most readers expect) */
static const char *a1111_sampler_name(const char *s, int karras) {
    if (!s) s = "euler_a";
    if (strcmp(s, "euler_a") == 0) return "Euler a";
    if (strcmp(s, "euler") == 0) return karras ? "Euler Karras" : "Euler";
    if (strcmp(s, "ddim") == 0) return "DDIM";
    if (strcmp(s, "ddpm") == 0) return "DDPM";
    if (strcmp(s, "dpmpp_2m") == 0) return karras ? "DPM++ 2M Karras" : "DPM++ 2M";
    return s;
}

void sd_params_text(char *buf, size_t n, const sd_model *m, const gen_params *p, const char *loras) {
    size_t k = 0;
#define PUT(...) do { if (k < n) { int r_ = snprintf(buf + k, n - k, __VA_ARGS__); if (r_ > 0) k += (size_t)r_; } } while (0)
    if (n == 0) return;
    buf[0] = 0;
    /* A1111 keeps the <lora:...> tags in the prompt line */
    PUT("%s", p->prompt ? p->prompt : "");
    if (loras && *loras) PUT("%s%s", p->prompt && *p->prompt ? " " : "", loras);
    if (p->negative && *p->negative) PUT("\nNegative prompt: %s", p->negative);
    PUT("\nSteps: %d, Sampler: %s, CFG scale: %g, Seed: %llu, Size: %dx%d, Model: %s",
        p->steps, a1111_sampler_name(p->sampler, p->karras), (double)p->cfg,
        (unsigned long long)p->seed, p->width, p->height, m && m->name[0] ? m->name : "unknown");
    if (p->batch > 1) PUT(", Batch size: %d", p->batch);
    if (p->clip_skip > 1) PUT(", Clip skip: %d", p->clip_skip);
    /* A1111 draws on the GPU by default and says so only otherwise */
    if (!p->rng_cuda) PUT(", RNG: CPU");
#undef PUT
}

/* ------------------------------------------------------------------------ */
/* LoRA files on a loaded model                                              */

/* where one file entry goes */
typedef struct {
    int te;               /* 0: UNet, 1: text encoder */
    float *w0;            /* the (out x in) weight it changes, or NULL when held as fp16 */
    int index;            /* its table entry, UNet's or text encoder's (for fp16 weights) */
    char module[UNET_NAME_LEN + 16];
} lora_target;

/* W0 (out, in), (out, in, 1, 1), or (out, in, k, k) for a conv LoRA
 * (LoCon) whose lora_down is k x k, with the entry's sizes? */
static int shape_ok(const int *shape, int ndim, const lora_entry *e, char *why, size_t nwhy) {
    int k = e->k > 1 ? e->k : 1;
    if (ndim == 4 && (shape[2] != k || shape[3] != k)) {
        snprintf(why, nwhy, "the weight is a %dx%d convolution but the LoRA's lora_down is %dx%d", shape[2], shape[3], k, k);
        return 0;
    }
    if (ndim != 4 && k != 1) {
        snprintf(why, nwhy, "the LoRA is a %dx%d conv LoRA but the model's weight is not a convolution", k, k);
        return 0;
    }
    if ((ndim != 2 && ndim != 4) || shape[0] != e->out || shape[1] != e->in) {
        snprintf(why, nwhy, "LoRA is %d -> %d but the model's weight is %d -> %d (a LoRA for another model?)",
                 e->in, e->out, ndim >= 2 ? shape[1] : 0, ndim >= 2 ? shape[0] : 0);
        return 0;
    }
    return 1;
}

static int find_target(sd_model *m, const lora_entry *e, lora_target *t, char *err) {
    char kname[320], why[256];
    memset(t, 0, sizeof *t);
    if (strncmp(e->name, "lora_unet_", 10) == 0) {
        for (int i = 0; i < m->unet.ntable; i++) {
            const unet_param *up = &m->unet.table[i];
            size_t len = strlen(up->name);
            if (len < 8 || strcmp(up->name + len - 7, ".weight") != 0) continue;
            char mod[UNET_NAME_LEN];
            snprintf(mod, sizeof mod, "%.*s", (int)(len - 7), up->name);
            lora_kohya_name(kname, sizeof kname, "lora_unet", mod);
            if (strcmp(kname, e->name) != 0) continue;
            if (!shape_ok(up->shape, up->ndim, e, why, sizeof why)) {
                snprintf(err, SD_ERR_LEN, "LoRA entry %s: %s", e->name, why);
                return -1;
            }
            t->te = 0;
            t->w0 = up->data;
            t->index = i;
            snprintf(t->module, sizeof t->module, "%s", mod);
            return 0;
        }
    } else if (strncmp(e->name, "lora_te_", 8) == 0) {
        for (int i = 0; i < m->clip.ntable; i++) {
            const clip_param *cp = &m->clip.table[i];
            size_t len = strlen(cp->name);
            if (len < 8 || strcmp(cp->name + len - 7, ".weight") != 0 || cp->ndim != 2) continue;
            /* kohya's names keep transformers 4's "text_model." level;
             * files saved from transformers 5 models do not have it */
            char mod[96], kshort[320];
            snprintf(mod, sizeof mod, "text_model.%.*s", (int)(len - 7), cp->name);
            lora_kohya_name(kname, sizeof kname, "lora_te", mod);
            lora_kohya_name(kshort, sizeof kshort, "lora_te", mod + 11);
            if (strcmp(kname, e->name) != 0 && strcmp(kshort, e->name) != 0) continue;
            int shape[2] = {(int)cp->shape[0], (int)cp->shape[1]};
            if (!shape_ok(shape, 2, e, why, sizeof why)) {
                snprintf(err, SD_ERR_LEN, "LoRA entry %s: %s", e->name, why);
                return -1;
            }
            t->te = 1;
            t->w0 = cp->data;
            t->index = i;
            snprintf(t->module, sizeof t->module, "%s", mod);
            return 0;
        }
    }
    snprintf(err, SD_ERR_LEN, "LoRA entry %s: no such module in this model (a LoRA for another "
             "architecture, e.g. SDXL or SD2?)", e->name);
    return -1;
}

/* the entry as a lora_t over its own A and B */
static void entry_layer(lora_t *L, const lora_entry *e) {
    memset(L, 0, sizeof *L);
    L->in = e->in; L->out = e->out; L->r = e->r; L->k = e->k;
    L->alpha = e->alpha;
    L->scale = e->alpha / (float)e->r;
    L->A = e->A; L->B = e->B;
}

int sd_apply_lora(sd_model *m, const lora_file *lf, float w, int merge, char *err) {
    if (!lf || lf->n <= 0) { snprintf(err, SD_ERR_LEN, "LoRA file has no entries"); return -1; }
    lora_target *t = calloc((size_t)lf->n, sizeof *t);
    if (!t) { snprintf(err, SD_ERR_LEN, "out of memory"); return -1; }
    /* validate every entry before the model changes at all */
    for (int i = 0; i < lf->n; i++) {
        if (find_target(m, &lf->e[i], &t[i], err)) { free(t); return -1; }
    }
    /* then whether each side branch has somewhere to go */
    for (int i = 0; i < lf->n; i++) {
        if (!merge && !t[i].te) {
#ifdef UNET_ATTACH_LORA
            int in, out, conv;
            if (!unet_lora_site(&m->unet, t[i].module, &in, &out, &conv)) {
                snprintf(err, SD_ERR_LEN, "LoRA entry %s: module %s cannot carry an adapter "
                         "(only the transformer projections and the resnet / sampler convolutions can; use --merge)", lf->e[i].name, t[i].module);
                free(t);
                return -1;
            }
#else
            /* unet.c without unet_attach_lora (see unet.h): no side branches */
            snprintf(err, SD_ERR_LEN, "LoRA entry %s: this build cannot attach UNet adapters as "
                     "side branches (use --merge)", lf->e[i].name);
            free(t);
            return -1;
#endif
        }
    }
    /* fp16 weights: merged in fp32 and rounded back to fp16 (as diffusers'
     * fuse_lora does on an fp16 pipeline), through one buffer */
    float *wide = NULL;
    for (int i = 0; i < lf->n; i++) {
        if ((merge || t[i].te) && !t[i].w0) {
            size_t big = 0;
            for (int k = 0; k < lf->n; k++) {
                if (!(merge || t[k].te) || t[k].w0) continue;
                size_t n = t[k].te ? m->clip.table[t[k].index].numel : m->unet.table[t[k].index].numel;
                if (n > big) big = n;
            }
            wide = malloc(sizeof(float) * big);
            if (!wide) { snprintf(err, SD_ERR_LEN, "out of memory merging the LoRA"); free(t); return -1; }
            break;
        }
    }
    /* side branches next (they allocate; merges cannot fail). The text
     * encoder runs once per image, so its LoRA is always merged: the same
     * numbers as a side branch, and clip.c's adapters are for training. */
    for (int i = 0; i < lf->n; i++) {
        if (merge || t[i].te) continue;
#ifdef UNET_ATTACH_LORA
        const lora_entry *e = &lf->e[i];
        if (unet_attach_lora(&m->unet, t[i].module, e->r, w * e->alpha / (float)e->r, e->A, e->B)) {
            snprintf(err, SD_ERR_LEN, "LoRA entry %s: %s", e->name, m->unet.err);
            free(wide);
            free(t);
            return -1;
        }
#endif
    }
    for (int i = 0; i < lf->n; i++) {
        if (!merge && !t[i].te) continue;
        lora_t L;
        entry_layer(&L, &lf->e[i]);
        if (t[i].w0) {
            lora_merge(t[i].w0, &L, w);
        } else if (t[i].te) {
            clip_param_get(&m->clip, t[i].index, wide);
            lora_merge(wide, &L, w);
            clip_param_set(&m->clip, t[i].index, wide);
        } else {
            unet_param_get(&m->unet, t[i].index, wide);
            lora_merge(wide, &L, w);
            unet_param_set(&m->unet, t[i].index, wide);
        }
    }
    free(wide);
    free(t);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* <lora:name:weight> tags                                                   */

int sd_prompt_loras(const char *prompt, char *text, size_t ntext,
                    sd_prompt_lora *loras, int max, char *err) {
    size_t k = 0;
    int n = 0;
    if (ntext == 0) { snprintf(err, SD_ERR_LEN, "prompt: no room for the text"); return -1; }
    for (const char *p = prompt; *p; ) {
        if (strncmp(p, "<lora:", 6) != 0) {
            if (k + 1 < ntext) text[k++] = *p;
            p++;
            continue;
        }
        const char *end = strchr(p, '>');
        if (!end) {
            snprintf(err, SD_ERR_LEN, "prompt: \"%.60s\": unclosed LoRA tag (write <lora:name:weight>)", p);
            return -1;
        }
        /* name[:weight] between "<lora:" and ">" */
        const char *body = p + 6, *colon = memchr(body, ':', (size_t)(end - body));
        size_t nlen = (size_t)((colon ? colon : end) - body);
        float wgt = 1.0f;
        if (colon) {
            char num[64], *e;
            size_t wl = (size_t)(end - colon - 1);
            if (wl == 0 || wl >= sizeof num) goto bad;
            memcpy(num, colon + 1, wl);
            num[wl] = 0;
            double v = strtod(num, &e);
            if (*e != 0) goto bad;       /* also A1111's <lora:name:te:unet> form */
            wgt = (float)v;
        }
        if (nlen == 0 || nlen >= sizeof loras[0].name) goto bad;
        if (n >= max) {
            snprintf(err, SD_ERR_LEN, "prompt: more than %d LoRA tags (merge some LoRAs into one file)", max);
            return -1;
        }
        memcpy(loras[n].name, body, nlen);
        loras[n].name[nlen] = 0;
        loras[n].weight = wgt;
        n++;
        p = end + 1;
        continue;
    bad:
        snprintf(err, SD_ERR_LEN, "prompt: \"%.*s\": not a LoRA tag this program reads (write <lora:name:weight>, e.g. <lora:style:0.8>)",
                 (int)(end - p + 1 < 80 ? end - p + 1 : 80), p);
        return -1;
    }
    text[k] = 0;
    /* trim the spaces a tag at either end leaves */
    while (k > 0 && text[k - 1] == ' ') text[--k] = 0;
    size_t lead = 0;
    while (text[lead] == ' ') lead++;
    if (lead) memmove(text, text + lead, k - lead + 1);
    return n;
}

int sd_split_prompts(char *buf, const char *seps, char **out, int max) {
    int n = 0;
    for (char *s = buf; s && n < max; ) {
        char *e = s + strcspn(s, seps);
        char c = *e;
        *e = 0;
        if (*s) out[n++] = s;
        s = c ? e + 1 : NULL;
    }
    return n;
}

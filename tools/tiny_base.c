/* tools/tiny_base.c: pre-train the bundled tiny SD1.x-architecture model
 * (models/tiny/) from random weights, with this project's own forward and
 * backward passes. `make tiny-base` builds and runs it.
 *
 *   0. tokenizer: a byte-level BPE vocabulary learned from the base captions
 *   1. VAE (AutoencoderKL, encoder + decoder) on the 64x64 base images and
 *      the VAE set (make_data --vae: the same scenes drawn in many looks):
 *        L = mean (x - D(z))^2 + kl_w * KL(q(z|x) || N(0,I)) / (3*64*64),
 *        z = mean + exp(logvar/2) * noise
 *      SD's VAE also had an LPIPS perceptual loss and a patch GAN; here it is
 *      MSE + KL only, so edges come out a little soft.
 *      scaling_factor = 1 / std(latent means over the data), as SD chose 0.18215.
 *   2. VAE frozen; latents = scaling * mean computed once; the CLIP text
 *      encoder and the UNet trained together on
 *        L = mean (eps - UNet(sqrt(abar_t) z0 + sqrt(1-abar_t) eps, t, CLIP(c)))^2
 *      with the caption dropped (empty prompt) 10% of the time so that
 *      classifier-free guidance has an unconditional model to push from.
 *   3. a diffusers folder that our sd_model_load and diffusers'
 *      StableDiffusionPipeline.from_pretrained both read (fp16 weights).
 *
 * Same seed, same machine -> the same bytes (the GEMMs split work into
 * independent rectangles, so thread count does not change sums).
 *
 *   tiny_base [--data DIR] [--vae-data DIR] [--out DIR] [--seed N]
 *             [--vae-steps N] [--steps N] [--images N] [--bench] (usage() has all)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <time.h>
#include <errno.h>
#include <sys/stat.h>
#include <unistd.h>

#include "nn.h"
#include "vae.h"
#include "unet.h"
#include "clip.h"
#include "tokenizer.h"
#include "bpe_train.h"
#include "dataset.h"
#include "image.h"
#include "ddpm.h"
#include "optim.h"
#include "json.h"
#include "safetensors.h"

/* ---------------------------------------------------------------------------
 * the architecture: SD1.x's module tree, shrunk.
 * 64x64 images -> VAE with 3 levels (2 downsamples: factor 4) -> 16x16x4
 * latents -> UNet (32, 64, 128) channels at 16x16, 8x8, 4x4 -> text encoder
 * hidden 64, 3 layers. SD's factor 8 would leave 8x8 latents, too coarse to
 * carry the style's 2-px hatching (README "The tiny model" has both
 * measured). Sized so that a student's LoRA step is cheap on a laptop CPU
 * (tiny_base --bench measures it). */

#define TB_IMG 64
#define TB_LC 4                     /* latent channels */
#define TB_VOCAB 1000               /* asked of the BPE trainer (it may stop earlier) */
#define TB_D 64                     /* text hidden size = UNet cross_attention_dim */


static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

/* config.json of each part, with every key diffusers 0.42 / transformers 5
 * write for it (from save_pretrained on the same sizes), so both loaders see
 * what they expect; the C side parses the same text, so there is one truth. */
/* the VAE's block_out_channels, one per level; each level but the last
 * halves the side: 3 levels turn 64x64 into 16x16 latents (factor 4;
 * --vae-channels 8,16,32,64 gives SD's factor 8 and 8x8 latents) */
#define TB_MAXLEV 5
static int tb_vae_ch[TB_MAXLEV] = {8, 16, 32};
static int tb_vae_nlev = 3;
#define TB_LAT (TB_IMG >> (tb_vae_nlev - 1))   /* latent side */

static int vae_config_text(char *buf, size_t n, float scaling) {
    char ch[96] = "", down[256] = "", up[256] = "";
    for (int i = 0; i < tb_vae_nlev; i++) {
        const char *sep = i ? ", " : "";
        snprintf(ch + strlen(ch), sizeof ch - strlen(ch), "%s%d", sep, tb_vae_ch[i]);
        snprintf(down + strlen(down), sizeof down - strlen(down), "%s\"DownEncoderBlock2D\"", sep);
        snprintf(up + strlen(up), sizeof up - strlen(up), "%s\"UpDecoderBlock2D\"", sep);
    }
    return snprintf(buf, n,
        "{\n"
        "  \"_class_name\": \"AutoencoderKL\",\n"
        "  \"_diffusers_version\": \"0.42.1\",\n"
        "  \"act_fn\": \"silu\",\n"
        "  \"block_out_channels\": [%s],\n"
        "  \"down_block_types\": [%s],\n"
        "  \"force_upcast\": true,\n"
        "  \"in_channels\": 3,\n"
        "  \"latent_channels\": %d,\n"
        "  \"latents_mean\": null,\n"
        "  \"latents_std\": null,\n"
        "  \"layers_per_block\": 1,\n"
        "  \"mid_block_add_attention\": true,\n"
        "  \"norm_num_groups\": 4,\n"
        "  \"out_channels\": 3,\n"
        "  \"sample_size\": %d,\n"
        "  \"scaling_factor\": %.6g,\n"
        "  \"shift_factor\": null,\n"
        "  \"up_block_types\": [%s],\n"
        "  \"use_post_quant_conv\": true,\n"
        "  \"use_quant_conv\": true\n"
        "}\n", ch, down, TB_LC, TB_IMG, scaling, up);
}

static int unet_config_text(char *buf, size_t n) {
    return snprintf(buf, n,
        "{\n"
        "  \"_class_name\": \"UNet2DConditionModel\",\n"
        "  \"_diffusers_version\": \"0.42.1\",\n"
        "  \"act_fn\": \"silu\",\n"
        "  \"addition_embed_type\": null,\n"
        "  \"addition_embed_type_num_heads\": 64,\n"
        "  \"addition_time_embed_dim\": null,\n"
        "  \"attention_head_dim\": 4,\n"
        "  \"attention_type\": \"default\",\n"
        "  \"block_out_channels\": [32, 64, 128],\n"
        "  \"center_input_sample\": false,\n"
        "  \"class_embed_type\": null,\n"
        "  \"class_embeddings_concat\": false,\n"
        "  \"conv_in_kernel\": 3,\n"
        "  \"conv_out_kernel\": 3,\n"
        "  \"cross_attention_dim\": %d,\n"
        "  \"cross_attention_norm\": null,\n"
        "  \"down_block_types\": [\"CrossAttnDownBlock2D\", \"CrossAttnDownBlock2D\", \"DownBlock2D\"],\n"
        "  \"downsample_padding\": 1,\n"
        "  \"dropout\": 0.0,\n"
        "  \"dual_cross_attention\": false,\n"
        "  \"encoder_hid_dim\": null,\n"
        "  \"encoder_hid_dim_type\": null,\n"
        "  \"flip_sin_to_cos\": true,\n"
        "  \"freq_shift\": 0,\n"
        "  \"in_channels\": %d,\n"
        "  \"layers_per_block\": 1,\n"
        "  \"mid_block_only_cross_attention\": null,\n"
        "  \"mid_block_scale_factor\": 1,\n"
        "  \"mid_block_type\": \"UNetMidBlock2DCrossAttn\",\n"
        "  \"norm_eps\": 1e-05,\n"
        "  \"norm_num_groups\": 16,\n"
        "  \"num_attention_heads\": null,\n"
        "  \"num_class_embeds\": null,\n"
        "  \"only_cross_attention\": false,\n"
        "  \"out_channels\": %d,\n"
        "  \"projection_class_embeddings_input_dim\": null,\n"
        "  \"resnet_out_scale_factor\": 1.0,\n"
        "  \"resnet_skip_time_act\": false,\n"
        "  \"resnet_time_scale_shift\": \"default\",\n"
        "  \"reverse_transformer_layers_per_block\": null,\n"
        "  \"sample_size\": %d,\n"
        "  \"time_cond_proj_dim\": null,\n"
        "  \"time_embedding_act_fn\": null,\n"
        "  \"time_embedding_dim\": null,\n"
        "  \"time_embedding_type\": \"positional\",\n"
        "  \"timestep_post_act\": null,\n"
        "  \"transformer_layers_per_block\": 1,\n"
        "  \"up_block_types\": [\"UpBlock2D\", \"CrossAttnUpBlock2D\", \"CrossAttnUpBlock2D\"],\n"
        "  \"upcast_attention\": false,\n"
        "  \"use_linear_projection\": false\n"
        "}\n", TB_D, TB_LC, TB_LC, TB_LAT);
}

/* bos/eos are the last two ids of the trained vocabulary; pad = eos as in SD1.x */
static int clip_config_text(char *buf, size_t n, int vocab) {
    return snprintf(buf, n,
        "{\n"
        "  \"architectures\": [\"CLIPTextModel\"],\n"
        "  \"attention_dropout\": 0.0,\n"
        "  \"bos_token_id\": %d,\n"
        "  \"dtype\": \"float32\",\n"
        "  \"eos_token_id\": %d,\n"
        "  \"hidden_act\": \"quick_gelu\",\n"
        "  \"hidden_size\": %d,\n"
        "  \"initializer_factor\": 1.0,\n"
        "  \"initializer_range\": 0.02,\n"
        "  \"intermediate_size\": %d,\n"
        "  \"layer_norm_eps\": 1e-05,\n"
        "  \"max_position_embeddings\": 77,\n"
        "  \"model_type\": \"clip_text_model\",\n"
        "  \"num_attention_heads\": 4,\n"
        "  \"num_hidden_layers\": 3,\n"
        "  \"pad_token_id\": %d,\n"
        "  \"projection_dim\": %d,\n"
        "  \"transformers_version\": \"5.24.0\",\n"
        "  \"vocab_size\": %d\n"
        "}\n", vocab - 2, vocab - 1, TB_D, 4 * TB_D, vocab - 1, TB_D, vocab);
}

static const char *SCHEDULER_JSON =
    "{\n"
    "  \"_class_name\": \"PNDMScheduler\",\n"
    "  \"_diffusers_version\": \"0.42.1\",\n"
    "  \"beta_end\": 0.012,\n"
    "  \"beta_schedule\": \"scaled_linear\",\n"
    "  \"beta_start\": 0.00085,\n"
    "  \"clip_sample\": false,\n"
    "  \"num_train_timesteps\": 1000,\n"
    "  \"prediction_type\": \"epsilon\",\n"
    "  \"set_alpha_to_one\": false,\n"
    "  \"skip_prk_steps\": true,\n"
    "  \"steps_offset\": 1,\n"
    "  \"timestep_spacing\": \"leading\",\n"
    "  \"trained_betas\": null\n"
    "}\n";

static const char *MODEL_INDEX_JSON =
    "{\n"
    "  \"_class_name\": \"StableDiffusionPipeline\",\n"
    "  \"_diffusers_version\": \"0.42.1\",\n"
    "  \"feature_extractor\": [null, null],\n"
    "  \"image_encoder\": [null, null],\n"
    "  \"requires_safety_checker\": false,\n"
    "  \"safety_checker\": [null, null],\n"
    "  \"scheduler\": [\"diffusers\", \"PNDMScheduler\"],\n"
    "  \"text_encoder\": [\"transformers\", \"CLIPTextModel\"],\n"
    "  \"tokenizer\": [\"transformers\", \"CLIPTokenizer\"],\n"
    "  \"unet\": [\"diffusers\", \"UNet2DConditionModel\"],\n"
    "  \"vae\": [\"diffusers\", \"AutoencoderKL\"]\n"
    "}\n";

#define TOKEN_JSON(tok) "{\"__type\": \"AddedToken\", \"content\": \"" tok "\", \"lstrip\": false, " \
                        "\"normalized\": true, \"rstrip\": false, \"single_word\": false}"

static const char *TOKENIZER_CONFIG_JSON =
    "{\n"
    "  \"add_prefix_space\": false,\n"
    "  \"bos_token\": " TOKEN_JSON("<|startoftext|>") ",\n"
    "  \"clean_up_tokenization_spaces\": true,\n"
    "  \"do_lower_case\": true,\n"
    "  \"eos_token\": " TOKEN_JSON("<|endoftext|>") ",\n"
    "  \"errors\": \"replace\",\n"
    "  \"model_max_length\": 77,\n"
    "  \"pad_token\": \"<|endoftext|>\",\n"
    "  \"tokenizer_class\": \"CLIPTokenizer\",\n"
    "  \"unk_token\": " TOKEN_JSON("<|endoftext|>") "\n"
    "}\n";

static const char *SPECIAL_TOKENS_JSON =
    "{\n"
    "  \"bos_token\": {\"content\": \"<|startoftext|>\", \"lstrip\": false, \"normalized\": true, \"rstrip\": false, \"single_word\": false},\n"
    "  \"eos_token\": {\"content\": \"<|endoftext|>\", \"lstrip\": false, \"normalized\": true, \"rstrip\": false, \"single_word\": false},\n"
    "  \"pad_token\": \"<|endoftext|>\",\n"
    "  \"unk_token\": {\"content\": \"<|endoftext|>\", \"lstrip\": false, \"normalized\": true, \"rstrip\": false, \"single_word\": false}\n"
    "}\n";

/* ---------------------------------------------------------------------------
 * small file helpers */

static int mkdir_p(const char *dir) {
    char p[1024];
    snprintf(p, sizeof p, "%s", dir);
    for (char *s = p + 1; *s; s++)
        if (*s == '/') { *s = 0; if (mkdir(p, 0755) && errno != EEXIST) return -1; *s = '/'; }
    return (mkdir(p, 0755) && errno != EEXIST) ? -1 : 0;
}

/* write text to dir/name through a temporary name */
static int write_text(const char *dir, const char *name, const char *text) {
    char path[1200], tmp[1300];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) { fprintf(stderr, "error: %s: %s\n", tmp, strerror(errno)); return -1; }
    size_t n = strlen(text);
    int bad = fwrite(text, 1, n, f) != n;
    bad |= fclose(f) != 0;
    if (bad || rename(tmp, path)) { fprintf(stderr, "error: %s: write failed\n", path); return -1; }
    return 0;
}

/* ---------------------------------------------------------------------------
 * initialisation: PyTorch's defaults for freshly built modules, by name.
 *   conv / linear weight ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))  (kaiming_uniform, a = sqrt(5))
 *   biases 0 (PyTorch draws them from the same range; zero is simpler and trains as well)
 *   norm weight 1, norm bias 0
 *   CLIP token / position embeddings ~ N(0, 0.02^2) (transformers' CLIP init) */
static void init_tensor(float *p, const char *name, int ndim, const int64_t *shape,
                        int embedding_ok, rng_t *rng) {
    size_t n = 1;
    for (int i = 0; i < ndim; i++) n *= (size_t)shape[i];
    if (ndim == 1) {
        int is_norm_w = strstr(name, "norm") && strcmp(name + strlen(name) - 7, ".weight") == 0;
        for (size_t i = 0; i < n; i++) p[i] = is_norm_w ? 1.0f : 0.0f;
        return;
    }
    if (embedding_ok && strstr(name, "embedding")) {
        for (size_t i = 0; i < n; i++) p[i] = 0.02f * rng_normal(rng);
        return;
    }
    size_t fan_in = n / (size_t)shape[0];
    float bound = 1.0f / sqrtf((float)fan_in);
    for (size_t i = 0; i < n; i++) p[i] = bound * (2.0f * rng_uniform(rng) - 1.0f);
}

static void init_vae(vae_t *v, rng_t *rng) {
    for (int i = 0; i < v->ntable; i++) {
        const vae_param *t = &v->table[i];
        int64_t sh[4];
        for (int k = 0; k < t->ndim; k++) sh[k] = t->shape[k];
        init_tensor(v->params + t->offset, t->name, t->ndim, sh, 0, rng);
    }
}

static void init_unet(unet_t *u, rng_t *rng) {
    for (int i = 0; i < u->ntable; i++) {
        const unet_param *t = &u->table[i];
        int64_t sh[4];
        for (int k = 0; k < t->ndim; k++) sh[k] = t->shape[k];
        init_tensor(u->params + t->offset, t->name, t->ndim, sh, 0, rng);
    }
}

static void init_clip(clip_t *m, rng_t *rng) {
    for (int i = 0; i < m->ntable; i++) {
        const clip_param *t = &m->table[i];
        init_tensor(m->params + t->offset, t->name, t->ndim, t->shape, 1, rng);
    }
}

/* what is saved is fp16: train on, and measure, the weights as they will be read */
static void round_f16(float *p, size_t n) {
    for (size_t i = 0; i < n; i++) p[i] = st_f16_to_f32(st_f32_to_f16(p[i]));
}

/* ---------------------------------------------------------------------------
 * the data: every image of the base set as floats in [-1, 1], and its caption */

typedef struct {
    int n;
    float *img;          /* (n, 3, 64, 64) */
    char **caption;      /* n */
} tb_data;

static void tb_data_free(tb_data *d) {
    if (d->caption) for (int i = 0; i < d->n; i++) free(d->caption[i]);
    free(d->caption); free(d->img);
    memset(d, 0, sizeof *d);
}

/* first `limit` images (0 = all) in dataset order */
static int tb_data_load(tb_data *d, const char *dir, int limit) {
    memset(d, 0, sizeof *d);
    dataset_t ds;
    memset(&ds, 0, sizeof ds);
    char err[1024];
    if (dataset_scan(&ds, dir, err, sizeof err)) { fprintf(stderr, "error: %s\n", err); return -1; }
    int n = limit > 0 && limit < ds.n_images ? limit : ds.n_images;
    const size_t per = 3 * TB_IMG * TB_IMG;
    d->img = malloc(n * per * sizeof(float));
    d->caption = calloc(n, sizeof(char *));
    if (!d->img || !d->caption) { dataset_free(&ds); tb_data_free(d); fprintf(stderr, "error: out of memory\n"); return -1; }
    for (int i = 0; i < n; i++) {
        image_t im;
        if (image_load(&im, ds.path[i], err, sizeof err)) {
            fprintf(stderr, "error: %s\n", err);
            dataset_free(&ds); d->n = i; tb_data_free(d); return -1;
        }
        if (im.w != TB_IMG || im.h != TB_IMG) {
            fprintf(stderr, "error: %s: %dx%d, expected %dx%d (the base set is 64x64; make data redraws it)\n",
                    ds.path[i], im.w, im.h, TB_IMG, TB_IMG);
            image_free(&im); dataset_free(&ds); d->n = i; tb_data_free(d); return -1;
        }
        image_to_chw(d->img + i * per, im.rgb, TB_IMG, TB_IMG);
        image_free(&im);
        d->caption[i] = strdup(ds.caption[i]);
        d->n = i + 1;
        if (!d->caption[i]) { dataset_free(&ds); tb_data_free(d); return -1; }
    }
    dataset_free(&ds);
    return 0;
}

/* ---------------------------------------------------------------------------
 * stage 0: the tokenizer */

static int make_tokenizer(const tb_data *d, const char *tokdir, int *vocab) {
    char err[512];
    if (mkdir_p(tokdir)) { fprintf(stderr, "error: %s: cannot create\n", tokdir); return -1; }
    int nv = bpe_train((const char *const *)d->caption, d->n, TB_VOCAB, tokdir, err, sizeof err);
    if (nv < 0) { fprintf(stderr, "error: %s\n", err); return -1; }
    if (write_text(tokdir, "tokenizer_config.json", TOKENIZER_CONFIG_JSON) ||
        write_text(tokdir, "special_tokens_map.json", SPECIAL_TOKENS_JSON)) return -1;
    *vocab = nv;
    return 0;
}

/* ---------------------------------------------------------------------------
 * stage 1: the VAE */

typedef struct {
    int steps, batch;
    float lr, kl_weight;
    uint64_t seed;
    int log_every;
} vae_opts;

typedef struct {
    float loss_first, loss_last;  /* mean recon MSE over the first / last 10% of steps */
    float init_mse;               /* the same measure at the random initialisation */
    float eval_mse, psnr;         /* over eval images, posterior mean, fp16 weights */
    float eval_mse_vae;           /* the same on the first images of the VAE set */
    float scaling;                /* 1 / std(latent means) */
} vae_result;

static int build_vae(vae_t *v, float scaling) {
    char text[4096], err[VAE_ERR_LEN];
    vae_config_text(text, sizeof text, scaling);
    json *j = json_parse(text, strlen(text), err, sizeof err);
    vae_config c;
    if (!j || vae_config_from_json(&c, j, err) || vae_build(v, &c, err)) {
        fprintf(stderr, "error: vae: %s\n", err); json_free(j); return -1;
    }
    json_free(j);
    return 0;
}

/* reconstruction MSE of the posterior mean over images [0, n), in [-1, 1] units */
static float vae_eval(vae_t *v, const tb_data *d, int n, int B) {
    const size_t per = 3 * TB_IMG * TB_IMG, lper = TB_LC * TB_LAT * TB_LAT;
    float *mean = malloc(B * lper * sizeof(float)), *lv = malloc(B * lper * sizeof(float));
    float *rec = malloc(B * per * sizeof(float));
    double se = 0;
    if (!mean || !lv || !rec || vae_alloc_acts(v, B, TB_IMG, TB_IMG, 0)) { se = NAN; goto done; }
    for (int i = 0; i < n; i += B) {
        int b = n - i < B ? n - i : B;
        if (vae_encode(v, mean, lv, d->img + i * per, b, TB_IMG, TB_IMG) ||
            vae_decode(v, rec, mean, b, TB_LAT, TB_LAT)) { se = NAN; goto done; }
        for (size_t k = 0; k < b * per; k++) { double e = rec[k] - d->img[i * per + k]; se += e * e; }
    }
    se /= (double)n * per;
done:
    free(mean); free(lv); free(rec);
    return (float)se;
}

/* trains on d; the random initialisation's reconstruction error is measured
 * on the first neval images of ev, where the caller measures the result */
static int train_vae(vae_t *v, const tb_data *d, const tb_data *ev, int neval,
                     const vae_opts *o, vae_result *r) {
    const int B = o->batch;
    const size_t per = 3 * TB_IMG * TB_IMG, lper = TB_LC * TB_LAT * TB_LAT;
    rng_t rng;
    rng_seed(&rng, o->seed ^ 0x7661650000000000ull);
    init_vae(v, &rng);
    r->init_mse = vae_eval(v, ev, neval, 25);
    if (vae_alloc_grads(v) || vae_alloc_acts(v, B, TB_IMG, TB_IMG, 1)) { fprintf(stderr, "error: %s\n", v->err); return -1; }
    adamw_t opt;
    if (adamw_init(&opt, v->nparams, o->lr, 0.9f, 0.999f, 1e-8f, 0.0f)) return -1;
    float *x = malloc(B * per * sizeof(float)), *rec = malloc(B * per * sizeof(float));
    float *drec = malloc(B * per * sizeof(float));
    float *mean = malloc(B * lper * sizeof(float)), *lv = malloc(B * lper * sizeof(float));
    float *noise = malloc(B * lper * sizeof(float)), *z = malloc(B * lper * sizeof(float));
    float *dz = malloc(B * lper * sizeof(float)), *dmean = malloc(B * lper * sizeof(float));
    float *dlv = malloc(B * lper * sizeof(float));
    int *order = malloc(d->n * sizeof(int));
    int rc = -1;
    if (!x || !rec || !drec || !mean || !lv || !noise || !z || !dz || !dmean || !dlv || !order) goto done;
    for (int i = 0; i < d->n; i++) order[i] = i;

    double t0 = now_s(), sum_first = 0, sum_last = 0;
    int n_first = 0, n_last = 0, pos = d->n;
    double log_sum = 0; int log_n = 0;
    for (int step = 0; step < o->steps; step++) {
        /* batch: the next B images of a shuffled pass over the data */
        for (int b = 0; b < B; b++) {
            if (pos == d->n) {         /* new epoch: Fisher-Yates */
                for (int i = d->n - 1; i > 0; i--) {
                    int k = (int)(rng_u64(&rng) % (uint64_t)(i + 1));
                    int tmp = order[i]; order[i] = order[k]; order[k] = tmp;
                }
                pos = 0;
            }
            memcpy(x + b * per, d->img + (size_t)order[pos++] * per, per * sizeof(float));
        }
        for (size_t k = 0; k < B * lper; k++) noise[k] = rng_normal(&rng);
        vae_zero_grads(v);
        if (vae_encode(v, mean, lv, x, B, TB_IMG, TB_IMG)) goto fail;
        vae_posterior_sample(z, mean, lv, noise, B * lper);
        if (vae_decode(v, rec, z, B, TB_LAT, TB_LAT)) goto fail;
        /* L_rec = (1/(B N)) sum (rec - x)^2 ;  dL/drec = 2 (rec - x) / (B N) */
        double se = 0;
        for (size_t k = 0; k < B * per; k++) {
            float e = rec[k] - x[k];
            se += (double)e * e;
            drec[k] = 2.0f * e / (float)(B * per);
        }
        float mse = (float)(se / (B * per));
        if (vae_decoder_backward(v, drec, dz)) goto fail;
        memset(dmean, 0, B * lper * sizeof(float));
        memset(dlv, 0, B * lper * sizeof(float));
        vae_posterior_sample_backward(dmean, dlv, dz, lv, noise, B * lper);
        /* KL per item = 0.5 sum (mu^2 + e^lv - 1 - lv), weighted kl_w / (B N):
         * dKL/dmu = mu, dKL/dlv = 0.5 (e^lv - 1) */
        float kw = o->kl_weight / (float)(B * per);
        for (size_t k = 0; k < B * lper; k++) {
            dmean[k] += kw * mean[k];
            dlv[k] += kw * 0.5f * (expf(lv[k]) - 1.0f);
        }
        if (vae_encoder_backward(v, dmean, dlv, NULL)) goto fail;
        clip_grad_norm(v->grads, v->nparams, 1.0f);
        float lr = lr_at(LR_COSINE, o->lr, step, o->steps / 20, o->steps);
        adamw_step(&opt, v->params, v->grads, lr);

        if (step < (o->steps + 9) / 10) { sum_first += mse; n_first++; }
        if (step >= o->steps - (o->steps + 9) / 10) { sum_last += mse; n_last++; }
        log_sum += mse; log_n++;
        if (o->log_every > 0 && ((step + 1) % o->log_every == 0 || step + 1 == o->steps)) {
            printf("vae step %5d/%d  recon mse %.5f  psnr %.2f dB  lr %.2e  %.0f ms/step\n",
                   step + 1, o->steps, log_sum / log_n, 10 * log10(4.0 / (log_sum / log_n)), lr,
                   1000 * (now_s() - t0) / (step + 1));
            fflush(stdout);
            log_sum = 0; log_n = 0;
        }
    }
    r->loss_first = n_first ? (float)(sum_first / n_first) : NAN;
    r->loss_last = n_last ? (float)(sum_last / n_last) : NAN;
    round_f16(v->params, v->nparams);
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "error: vae: %s\n", v->err);
done:
    adamw_free(&opt);
    free(x); free(rec); free(drec); free(mean); free(lv); free(noise); free(z); free(dz); free(dmean); free(dlv);
    free(order);
    return rc;
}

/* latent means of every image (n, 4, 8, 8), unscaled; and their std */
static float *vae_latents(vae_t *v, const tb_data *d, float *std_out) {
    const size_t per = 3 * TB_IMG * TB_IMG, lper = TB_LC * TB_LAT * TB_LAT;
    const int B = 50;
    float *lat = malloc((size_t)d->n * lper * sizeof(float));
    float *lv = malloc(B * lper * sizeof(float));
    if (!lat || !lv || vae_alloc_acts(v, B, TB_IMG, TB_IMG, 0)) { free(lat); free(lv); return NULL; }
    for (int i = 0; i < d->n; i += B) {
        int b = d->n - i < B ? d->n - i : B;
        if (vae_encode(v, lat + i * lper, lv, d->img + i * per, b, TB_IMG, TB_IMG)) {
            fprintf(stderr, "error: %s\n", v->err); free(lat); free(lv); return NULL;
        }
    }
    free(lv);
    /* std = sqrt( sum (z - zbar)^2 / (N - 1) ), as torch.std */
    size_t N = (size_t)d->n * lper;
    double s = 0, ss = 0;
    for (size_t k = 0; k < N; k++) s += lat[k];
    double m = s / N;
    for (size_t k = 0; k < N; k++) ss += (lat[k] - m) * (lat[k] - m);
    *std_out = (float)sqrt(ss / (N > 1 ? N - 1 : 1));
    return lat;
}

/* ---------------------------------------------------------------------------
 * saving */

static int save_vae(const vae_t *v, const char *dir, float scaling) {
    char err[ST_ERR_LEN], text[4096], path[1200];
    if (mkdir_p(dir)) return -1;
    vae_config_text(text, sizeof text, scaling);
    if (write_text(dir, "config.json", text)) return -1;
    st_writer *w = st_writer_new();
    if (!w) return -1;
    st_writer_meta(w, "format", "pt");
    for (int i = 0; i < v->ntable; i++) {
        const vae_param *t = &v->table[i];
        int64_t sh[4];
        for (int k = 0; k < t->ndim; k++) sh[k] = t->shape[k];
        if (st_writer_add_f32(w, t->name, ST_F16, t->ndim, sh, v->params + t->offset)) { st_writer_free(w); return -1; }
    }
    snprintf(path, sizeof path, "%s/diffusion_pytorch_model.safetensors", dir);
    int rc = st_writer_save(w, path, err);
    if (rc) fprintf(stderr, "error: %s\n", err);
    st_writer_free(w);
    return rc;
}

static int save_unet(const unet_t *u, const char *dir) {
    char err[ST_ERR_LEN], text[8192], path[1200];
    if (mkdir_p(dir)) return -1;
    unet_config_text(text, sizeof text);
    if (write_text(dir, "config.json", text)) return -1;
    st_writer *w = st_writer_new();
    if (!w) return -1;
    st_writer_meta(w, "format", "pt");
    for (int i = 0; i < u->ntable; i++) {
        const unet_param *t = &u->table[i];
        int64_t sh[4];
        for (int k = 0; k < t->ndim; k++) sh[k] = t->shape[k];
        if (st_writer_add_f32(w, t->name, ST_F16, t->ndim, sh, u->params + t->offset)) { st_writer_free(w); return -1; }
    }
    snprintf(path, sizeof path, "%s/diffusion_pytorch_model.safetensors", dir);
    int rc = st_writer_save(w, path, err);
    if (rc) fprintf(stderr, "error: %s\n", err);
    st_writer_free(w);
    return rc;
}

/* names with the "text_model." prefix, as transformers 4 writes them; our
 * loader and transformers 5 read that form too */
static int save_clip(const clip_t *m, const char *dir, int vocab) {
    char err[ST_ERR_LEN], text[4096], path[1200], name[128];
    if (mkdir_p(dir)) return -1;
    clip_config_text(text, sizeof text, vocab);
    if (write_text(dir, "config.json", text)) return -1;
    st_writer *w = st_writer_new();
    if (!w) return -1;
    st_writer_meta(w, "format", "pt");
    for (int i = 0; i < m->ntable; i++) {
        const clip_param *t = &m->table[i];
        snprintf(name, sizeof name, "text_model.%s", t->name);
        if (st_writer_add_f32(w, name, ST_F16, t->ndim, t->shape, m->params + t->offset)) { st_writer_free(w); return -1; }
    }
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    int rc = st_writer_save(w, path, err);
    if (rc) fprintf(stderr, "error: %s\n", err);
    st_writer_free(w);
    return rc;
}

/* ---------------------------------------------------------------------------
 * stage 2: text encoder + UNet */

static int build_unet(unet_t *u) {
    char text[8192], err[UNET_ERR_LEN];
    unet_config_text(text, sizeof text);
    json *j = json_parse(text, strlen(text), err, sizeof err);
    unet_config c;
    if (!j || unet_config_from_json(&c, j, err) || unet_build(u, &c, err)) {
        fprintf(stderr, "error: unet: %s\n", err); json_free(j); return -1;
    }
    json_free(j);
    return 0;
}

static int build_clip(clip_t *m, int vocab) {
    char text[4096], err[ST_ERR_LEN];
    clip_config c;
    clip_config_text(text, sizeof text, vocab);
    if (clip_config_parse(&c, text, strlen(text), "text_encoder/config.json", err) || clip_init(m, &c, err)) {
        fprintf(stderr, "error: clip: %s\n", err); return -1;
    }
    return 0;
}

typedef struct {
    int steps, batch;
    float lr, uncond_p;
    float min_snr;     /* min-SNR-gamma loss weighting (0: off) */
    float ema;         /* EMA decay of the saved weights (0: off, save the last weights) */
    float noise_offset; /* eps += offset * N(0,1) per (image, channel): lets the model move a picture's mean colour */
    uint64_t seed;
    int log_every;
} diff_opts;

typedef struct {
    float loss_first, loss_last;  /* mean eps MSE over the first / last 10% of steps */
    float init_eval;              /* diffusion_eval at the random initialisation */
} diff_result;

static float diffusion_eval(unet_t *u, clip_t *m, const tokenizer *tok, const float *lat,
                            const tb_data *d, int n, uint64_t seed);

/* lat: (n, 4, 8, 8) scaled latents of d's images */
static int train_diffusion(unet_t *u, clip_t *m, const tokenizer *tok, const float *lat,
                           const tb_data *d, const diff_opts *o, diff_result *r) {
    const int B = o->batch, T = TOK_CTX, D = TB_D;
    const size_t lper = TB_LC * TB_LAT * TB_LAT;
    char err[DDPM_ERR_LEN];
    rng_t rng;
    rng_seed(&rng, o->seed ^ 0x756e657400000000ull);
    init_unet(u, &rng);
    init_clip(m, &rng);
    r->init_eval = diffusion_eval(u, m, tok, lat, d, d->n < 64 ? d->n : 64, o->seed + 7);
    ddpm_schedule s;
    if (ddpm_schedule_init(&s, "scaled_linear", DDPM_SD_T, DDPM_SD_BETA_START, DDPM_SD_BETA_END, err)) {
        fprintf(stderr, "error: %s\n", err); return -1;
    }
    if (unet_alloc_grads(u) || unet_alloc_acts(u, B, TB_LAT, TB_LAT, T, 1)) {
        fprintf(stderr, "error: %s\n", u->err); ddpm_free(&s); return -1;
    }
    if (clip_alloc_grads(m)) { fprintf(stderr, "error: clip: %s\n", m->err); ddpm_free(&s); return -1; }
    adamw_t ou, oc;
    memset(&ou, 0, sizeof ou); memset(&oc, 0, sizeof oc);
    int *ids_all = malloc((size_t)(d->n + 1) * T * sizeof(int));
    int *ids = malloc((size_t)B * T * sizeof(int)), *order = malloc(d->n * sizeof(int));
    int *ti = malloc(B * sizeof(int));
    float *tf = malloc(B * sizeof(float));
    float *x0 = malloc(B * lper * sizeof(float)), *eps = malloc(B * lper * sizeof(float));
    float *xt = malloc(B * lper * sizeof(float)), *pred = malloc(B * lper * sizeof(float));
    float *dpred = malloc(B * lper * sizeof(float)), *wt = malloc(B * sizeof(float));
    float *ctx = malloc((size_t)B * T * D * sizeof(float)), *dctx = malloc((size_t)B * T * D * sizeof(float));
    float *ema_u = NULL, *ema_c = NULL;
    int rc = -1;
    if (!ids_all || !ids || !order || !ti || !tf || !x0 || !eps || !xt || !pred || !dpred || !wt || !ctx || !dctx) goto done;
    if (o->ema > 0) {
        if (!(ema_u = malloc(u->nparams * sizeof(float))) || !(ema_c = malloc(m->num_params * sizeof(float)))) goto done;
        memcpy(ema_u, u->params, u->nparams * sizeof(float));
        memcpy(ema_c, m->params, m->num_params * sizeof(float));
    }
    if (adamw_init(&ou, u->nparams, o->lr, 0.9f, 0.999f, 1e-8f, 0.01f) ||
        adamw_init(&oc, m->num_params, o->lr, 0.9f, 0.999f, 1e-8f, 0.01f)) goto done;
    /* every caption tokenised once; row n is the empty prompt */
    for (int i = 0; i < d->n; i++) tok_encode_sd(tok, d->caption[i], ids_all + (size_t)i * T);
    tok_encode_sd(tok, "", ids_all + (size_t)d->n * T);
    for (int i = 0; i < d->n; i++) order[i] = i;

    double t0 = now_s(), sum_first = 0, sum_last = 0, log_sum = 0;
    int n_first = 0, n_last = 0, pos = d->n, log_n = 0;
    for (int step = 0; step < o->steps; step++) {
        for (int b = 0; b < B; b++) {
            if (pos == d->n) {
                for (int i = d->n - 1; i > 0; i--) {
                    int k = (int)(rng_u64(&rng) % (uint64_t)(i + 1));
                    int tmp = order[i]; order[i] = order[k]; order[k] = tmp;
                }
                pos = 0;
            }
            int i = order[pos++];
            memcpy(x0 + b * lper, lat + (size_t)i * lper, lper * sizeof(float));
            /* conditioning dropout: the empty prompt, so CFG has an unconditional model */
            int row = rng_uniform(&rng) < o->uncond_p ? d->n : i;
            memcpy(ids + (size_t)b * T, ids_all + (size_t)row * T, T * sizeof(int));
        }
        ddpm_sample_timesteps(ti, B, DDPM_SD_T, &rng);
        ddpm_sample_noise(eps, B * lper, &rng);
        if (o->noise_offset > 0) ddpm_noise_offset(eps, B, TB_LC, (size_t)TB_LAT * TB_LAT, o->noise_offset, &rng);
        for (int b = 0; b < B; b++) tf[b] = (float)ti[b];
        ddpm_add_noise(xt, x0, eps, ti, B, lper, &s);

        unet_zero_grads(u);
        clip_zero_grads(m);
        if (clip_forward(m, ctx, ids, B, T, 1)) { fprintf(stderr, "error: clip: %s\n", m->err); goto done; }
        if (unet_forward(u, pred, xt, tf, ctx, B, TB_LAT, TB_LAT, T)) { fprintf(stderr, "error: %s\n", u->err); goto done; }
        const float *w = NULL;   /* per-image loss weights, min-SNR only */
        if (o->min_snr > 0) { ddpm_min_snr_weights(wt, ti, B, o->min_snr, DDPM_EPSILON, &s); w = wt; }
        float loss = mse_loss_forward(pred, eps, w, B, lper);
        memset(dpred, 0, B * lper * sizeof(float));
        mse_loss_backward(dpred, pred, eps, w, 1.0f, B, lper);
        if (unet_backward(u, dpred, NULL, dctx)) { fprintf(stderr, "error: %s\n", u->err); goto done; }
        if (clip_backward(m, dctx)) { fprintf(stderr, "error: clip: %s\n", m->err); goto done; }
        clip_grad_norm(u->grads, u->nparams, 1.0f);
        clip_grad_norm(m->grads, m->num_params, 1.0f);
        float lr = lr_at(LR_COSINE, o->lr, step, o->steps / 20, o->steps);
        adamw_step(&ou, u->params, u->grads, lr);
        adamw_step(&oc, m->params, m->grads, lr);
        /* EMA of the weights: e = d e + (1 - d) w, the decay warmed up as
         * min(d, (1 + step) / (10 + step)) so early weights fade fast */
        if (ema_u) {
            float dcy = fminf(o->ema, (1.0f + step) / (10.0f + step));
            for (size_t k = 0; k < u->nparams; k++) ema_u[k] = dcy * ema_u[k] + (1 - dcy) * u->params[k];
            for (size_t k = 0; k < m->num_params; k++) ema_c[k] = dcy * ema_c[k] + (1 - dcy) * m->params[k];
        }

        if (step < (o->steps + 9) / 10) { sum_first += loss; n_first++; }
        if (step >= o->steps - (o->steps + 9) / 10) { sum_last += loss; n_last++; }
        log_sum += loss; log_n++;
        if (o->log_every > 0 && ((step + 1) % o->log_every == 0 || step + 1 == o->steps)) {
            printf("unet step %5d/%d  eps mse %.5f  lr %.2e  %.0f ms/step\n", step + 1, o->steps,
                   log_sum / log_n, lr, 1000 * (now_s() - t0) / (step + 1));
            fflush(stdout);
            log_sum = 0; log_n = 0;
        }
    }
    r->loss_first = n_first ? (float)(sum_first / n_first) : NAN;
    r->loss_last = n_last ? (float)(sum_last / n_last) : NAN;
    if (ema_u) {
        memcpy(u->params, ema_u, u->nparams * sizeof(float));
        memcpy(m->params, ema_c, m->num_params * sizeof(float));
    }
    round_f16(u->params, u->nparams);
    round_f16(m->params, m->num_params);
    rc = 0;
done:
    adamw_free(&ou); adamw_free(&oc);
    ddpm_free(&s);
    free(ids_all); free(ids); free(order); free(ti); free(tf); free(x0); free(eps); free(xt);
    free(pred); free(dpred); free(wt); free(ctx); free(dctx); free(ema_u); free(ema_c);
    return rc;
}

/* eps MSE of the trained model on fixed (image, t, noise) draws: the same
 * number every run, unlike the training-loss average */
static float diffusion_eval(unet_t *u, clip_t *m, const tokenizer *tok, const float *lat,
                            const tb_data *d, int n, uint64_t seed) {
    const int B = 8, T = TOK_CTX;
    const size_t lper = TB_LC * TB_LAT * TB_LAT;
    char err[DDPM_ERR_LEN];
    ddpm_schedule s;
    if (ddpm_schedule_init(&s, "scaled_linear", DDPM_SD_T, DDPM_SD_BETA_START, DDPM_SD_BETA_END, err)) return NAN;
    rng_t rng;
    rng_seed(&rng, seed);
    int ids[8 * TOK_CTX], ti[8];
    float tf[8];
    float *eps = malloc(B * lper * sizeof(float)), *xt = malloc(B * lper * sizeof(float));
    float *pred = malloc(B * lper * sizeof(float));
    float *ctx = malloc((size_t)B * T * TB_D * sizeof(float));
    double sum = 0;
    int nb = 0;
    if (!ctx || !eps || !xt || !pred || unet_alloc_acts(u, B, TB_LAT, TB_LAT, T, 0)) { sum = NAN; goto done; }
    for (int i = 0; i + B <= n; i += B, nb++) {
        for (int b = 0; b < B; b++) tok_encode_sd(tok, d->caption[i + b], ids + b * T);
        ddpm_sample_timesteps(ti, B, DDPM_SD_T, &rng);
        ddpm_sample_noise(eps, B * lper, &rng);
        for (int b = 0; b < B; b++) tf[b] = (float)ti[b];
        ddpm_add_noise(xt, lat + (size_t)i * lper, eps, ti, B, lper, &s);
        if (clip_forward(m, ctx, ids, B, T, 1) ||
            unet_forward(u, pred, xt, tf, ctx, B, TB_LAT, TB_LAT, T)) { sum = NAN; goto done; }
        sum += mse_loss_forward(pred, eps, NULL, B, lper);
    }
done:
    free(ctx); free(eps); free(xt); free(pred);
    ddpm_free(&s);
    return nb ? (float)(sum / nb) : NAN;
}

#ifndef TINY_BASE_NO_MAIN
/* ---------------------------------------------------------------------------
 * the LoRA step a student's ./train runs on this model: UNet LoRA ("qv",
 * rank 4), frozen text encoder and VAE, latents cached */
static void bench_lora(int B) {
    unet_t u;
    clip_t m;
    memset(&u, 0, sizeof u); memset(&m, 0, sizeof m);
    rng_t rng;
    rng_seed(&rng, 1);
    if (build_unet(&u) || build_clip(&m, TB_VOCAB)) return;
    init_unet(&u, &rng);
    init_clip(&m, &rng);
    const int T = TOK_CTX;
    const size_t lper = TB_LC * TB_LAT * TB_LAT;
    if (unet_add_lora(&u, "qv", 4, 4.0f, 0.0f, 1) || unet_alloc_acts(&u, B, TB_LAT, TB_LAT, T, 1)) {
        fprintf(stderr, "error: %s\n", u.err); goto done;
    }
    int *ids = calloc((size_t)B * T, sizeof(int));
    float *x = malloc(B * lper * sizeof(float)), *pred = malloc(B * lper * sizeof(float));
    float *tf = malloc(B * sizeof(float)), *ctx = malloc((size_t)B * T * TB_D * sizeof(float));
    for (size_t k = 0; k < B * lper; k++) x[k] = rng_normal(&rng);
    for (int b = 0; b < B; b++) tf[b] = 500.0f + b;
    double tc = 0, tu = 0;
    const int reps = 20;
    for (int r = -2; r < reps; r++) {
        double a = now_s();
        clip_forward(&m, ctx, ids, B, T, 1);
        double b2 = now_s();
        unet_zero_lora_grads(&u);
        unet_forward(&u, pred, x, tf, ctx, B, TB_LAT, TB_LAT, T);
        unet_backward(&u, x, NULL, NULL);
        double c = now_s();
        if (r >= 0) { tc += b2 - a; tu += c - b2; }
    }
    printf("LoRA step (UNet qv r4, batch %d, %dx%d latents): unet fwd+bwd %.1f ms, text encoder fwd %.1f ms\n",
           B, TB_LAT, TB_LAT, 1000 * tu / reps, 1000 * tc / reps);
    free(ids); free(x); free(pred); free(tf); free(ctx);
done:
    unet_free(&u);
    clip_free(&m);
}

#endif

/* ---------------------------------------------------------------------------
 * the whole run */

typedef struct {
    const char *data_dir, *out_dir;
    const char *vae_data_dir;   /* more pictures for the VAE stage only ("" = none) */
    const char *vae_from;       /* a trained VAE folder to use instead of stage 1 (NULL: train one) */
    int vae_only;               /* stop after the VAE stage (to try VAE settings) */
    uint64_t seed;
    int images;                 /* 0 = all */
    vae_opts vae;
    diff_opts diff;
    int save;
} tb_opts;

typedef struct {
    int vocab;
    vae_result vae;
    diff_result diff;
    float diff_eval;
    double secs_vae, secs_diff;
} tb_result;

static void tb_default_opts(tb_opts *o) {
    memset(o, 0, sizeof *o);
    o->data_dir = "models/tiny/data";
    o->vae_data_dir = "build/vae_data";   /* make tiny-base draws it first */
    o->out_dir = "models/tiny";
    o->seed = 1234;
    o->vae = (vae_opts){.steps = 8000, .batch = 4, .lr = 1e-3f, .kl_weight = 1e-6f, .log_every = 100};
    o->diff = (diff_opts){.steps = 3200, .batch = 16, .lr = 1e-3f, .uncond_p = 0.1f,
                          .min_snr = 5, .ema = 0.999f, .log_every = 100};
    o->save = 1;
}

static int tb_run(const tb_opts *o, tb_result *res) {
    memset(res, 0, sizeof *res);
    tb_data d;
    char dir[1100], err[TOK_ERR_LEN];
    int rc = -1;
    vae_t v;
    unet_t u;
    clip_t m;
    tokenizer *tok = NULL;
    float *lat = NULL;
    memset(&v, 0, sizeof v); memset(&u, 0, sizeof u); memset(&m, 0, sizeof m);
    /* both picture sets are read before anything is written */
    tb_data dv, dall;
    memset(&dv, 0, sizeof dv); memset(&dall, 0, sizeof dall);
    const int use_vd = o->vae_data_dir && o->vae_data_dir[0] && !o->vae_from;
    struct stat st;
    if (use_vd && stat(o->vae_data_dir, &st) != 0) {
        fprintf(stderr, "error: %s: no such folder (the VAE pictures): draw it with "
                "`build/make_data --base 0 --style 0 --vae 3000 --vae-dir %s` (make tiny-base does), "
                "or pass --vae-data '' to train the VAE on the base pictures only\n",
                o->vae_data_dir, o->vae_data_dir);
        return -1;
    }
    if (tb_data_load(&d, o->data_dir, o->images)) return -1;
    if (use_vd && tb_data_load(&dv, o->vae_data_dir, o->images)) { tb_data_free(&d); return -1; }
    if (o->vae.log_every) printf("data: %d images from %s\n", d.n, o->data_dir);

    /* 0: tokenizer (into the output folder, or a scratch one when not saving) */
    if (o->save) snprintf(dir, sizeof dir, "%s/tokenizer", o->out_dir);
    else snprintf(dir, sizeof dir, "/tmp/tiny_base_tok.%ld", (long)getpid());
    if (make_tokenizer(&d, dir, &res->vocab)) goto done;
    if (!(tok = tok_load(dir, err, sizeof err))) { fprintf(stderr, "error: %s\n", err); goto done; }
    if (!o->save) {
        char p[1200];
        const char *files[] = {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"};
        for (int i = 0; i < 4; i++) { snprintf(p, sizeof p, "%s/%s", dir, files[i]); remove(p); }
        rmdir(dir);
    }
    if (o->vae.log_every) printf("tokenizer: %d tokens\n", res->vocab);

    /* 1: VAE, on the base pictures and the VAE set (make_data --vae: the
     * same scenes drawn in many looks, as SD's VAE saw pictures of every
     * kind, so that outlines, hatching and paper survive it; --vae-data ''
     * trains on the base pictures only) */
    double t0 = now_s();
    vae_opts vo = o->vae;
    vo.seed = o->seed;
    if (dv.n) {   /* the VAE trains on both sets, one after the other in one block */
        const size_t per = 3 * TB_IMG * TB_IMG;
        dall.n = d.n + dv.n;
        if (!(dall.img = malloc((size_t)dall.n * per * sizeof(float)))) goto done;
        memcpy(dall.img, d.img, (size_t)d.n * per * sizeof(float));
        memcpy(dall.img + (size_t)d.n * per, dv.img, (size_t)dv.n * per * sizeof(float));
        if (o->vae.log_every) printf("vae: %d base + %d pictures from %s\n", d.n, dv.n, o->vae_data_dir);
    }
    int neval = d.n < 200 ? d.n : 200;
    int vae_rc;
    if (o->vae_from) {   /* a VAE from an earlier run: stage 2 gets the latents that run's would get */
        char e2[VAE_ERR_LEN];
        vae_rc = vae_load_diffusers(&v, o->vae_from, e2);
        if (vae_rc) fprintf(stderr, "error: %s\n", e2);
        else {
            tb_vae_nlev = v.cfg.nlevels;
            for (int i = 0; i < v.cfg.nlevels && i < TB_MAXLEV; i++) tb_vae_ch[i] = v.cfg.block_out[i];
        }
    } else vae_rc = build_vae(&v, 1.0f) || train_vae(&v, dv.n ? &dall : &d, &d, neval, &vo, &res->vae);
    tb_data_free(&dall);
    if (!vae_rc && dv.n) res->vae.eval_mse_vae = vae_eval(&v, &dv, dv.n < 200 ? dv.n : 200, 25);
    tb_data_free(&dv);
    if (vae_rc) goto done;
    res->vae.eval_mse = vae_eval(&v, &d, neval, 25);
    res->vae.psnr = 10.0f * log10f(4.0f / res->vae.eval_mse);
    float std;
    if (!(lat = vae_latents(&v, &d, &std))) goto done;
    res->vae.scaling = 1.0f / std;
    /* the config stores the factor to 6 digits; use exactly that */
    { char b[32]; snprintf(b, sizeof b, "%.6g", res->vae.scaling); res->vae.scaling = strtof(b, NULL); }
    for (size_t k = 0; k < (size_t)d.n * TB_LC * TB_LAT * TB_LAT; k++) lat[k] *= res->vae.scaling;
    res->secs_vae = now_s() - t0;
    if (o->vae.log_every)
        printf("vae: recon mse %.5f (psnr %.2f dB) on %d images, latent std %.4f -> scaling_factor %.6g, %.0f s\n",
               res->vae.eval_mse, res->vae.psnr, neval, std, res->vae.scaling, res->secs_vae);
    fflush(stdout);
    if (o->save) { snprintf(dir, sizeof dir, "%s/vae", o->out_dir); if (save_vae(&v, dir, res->vae.scaling)) goto done; }
    if (o->vae_only) { rc = 0; goto done; }

    /* 2: text encoder + UNet */
    t0 = now_s();
    diff_opts dopt = o->diff;
    dopt.seed = o->seed;
    if (build_unet(&u) || build_clip(&m, res->vocab)) goto done;
    if (train_diffusion(&u, &m, tok, lat, &d, &dopt, &res->diff)) goto done;
    res->diff_eval = diffusion_eval(&u, &m, tok, lat, &d, d.n < 64 ? d.n : 64, o->seed + 7);
    res->secs_diff = now_s() - t0;
    if (o->save) {
        snprintf(dir, sizeof dir, "%s/unet", o->out_dir);
        if (save_unet(&u, dir)) goto done;
        snprintf(dir, sizeof dir, "%s/text_encoder", o->out_dir);
        if (save_clip(&m, dir, res->vocab)) goto done;
        snprintf(dir, sizeof dir, "%s/scheduler", o->out_dir);
        if (mkdir_p(dir) || write_text(dir, "scheduler_config.json", SCHEDULER_JSON)) goto done;
        if (write_text(o->out_dir, "model_index.json", MODEL_INDEX_JSON)) goto done;
    }
    rc = 0;
done:
    free(lat);
    tb_data_free(&dv); tb_data_free(&dall);
    tok_free(tok);
    vae_free(&v); unet_free(&u); clip_free(&m);
    tb_data_free(&d);
    return rc;
}

#ifndef TINY_BASE_NO_MAIN
static void usage(void) {
    fprintf(stderr,
        "usage: tiny_base [--data DIR] [--out DIR] [--seed N] [--images N]\n"
        "                 [--vae-data DIR] [--vae-steps N] [--vae-only] [--steps N] [--bench]\n"
        "                 [--vae-channels a,b,c[,d]] [--vae-lr X] [--vae-batch N] [--vae-from DIR]\n"
        "                 [--lr X] [--batch N] [--min-snr G] [--ema D] [--noise-offset X]\n"
        "pre-trains the tiny SD1.x-architecture model from scratch (models/tiny/)\n");
}

static int parse_int(const char *flag, const char *s, long lo, long hi, long *v) {
    char *end;
    errno = 0;
    long x = s ? strtol(s, &end, 10) : 0;
    if (!s || errno || *end || x < lo || x > hi) {
        fprintf(stderr, "error: %s: '%s' is not a number in [%ld, %ld]\n", flag, s ? s : "", lo, hi);
        return -1;
    }
    *v = x;
    return 0;
}

static int parse_float(const char *flag, const char *s, float lo, float hi, float *v) {
    char *end;
    float x = s ? strtof(s, &end) : 0;
    if (!s || *end || !(x >= lo && x <= hi)) {
        fprintf(stderr, "error: %s: '%s' is not a number in [%g, %g]\n", flag, s ? s : "", lo, hi);
        return -1;
    }
    *v = x;
    return 0;
}

/* --vae-channels a,b[,c...]: 2 to TB_MAXLEV levels, each a multiple of 4
 * (the VAE's GroupNorm has 4 groups); sets tb_vae_ch / tb_vae_nlev */
static int parse_channels(const char *flag, const char *s) {
    int ch[TB_MAXLEV], k = 0, ok = 0;
    for (const char *q = s; q && k < TB_MAXLEV; ) {
        char *end;
        errno = 0;
        long c = strtol(q, &end, 10);
        if (end == q || errno || c < 4 || c > 4096 || c % 4) break;
        ch[k++] = (int)c;
        if (*end == '\0') { ok = k >= 2; break; }   /* the whole list read */
        q = *end == ',' ? end + 1 : NULL;
    }
    if (!ok) {
        fprintf(stderr, "error: %s: '%s' is not 2 to %d multiples of 4 (4..4096) separated by commas, e.g. 8,16,32\n",
                flag, s ? s : "", TB_MAXLEV);
        return -1;
    }
    memcpy(tb_vae_ch, ch, sizeof ch);
    tb_vae_nlev = k;
    return 0;
}

int main(int argc, char **argv) {
    tb_opts o;
    tb_default_opts(&o);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;
        long x;
        if (strcmp(a, "--bench") == 0) { bench_lora(1); bench_lora(4); bench_lora(8); return 0; }
        else if (strcmp(a, "--data") == 0 && val) { o.data_dir = val; i++; }
        else if (strcmp(a, "--out") == 0 && val) { o.out_dir = val; i++; }
        else if (strcmp(a, "--vae-data") == 0 && val) { o.vae_data_dir = val; i++; }
        else if (strcmp(a, "--vae-only") == 0) o.vae_only = 1;
        else if (strcmp(a, "--vae-from") == 0 && val) { o.vae_from = val; i++; }
        else if (strcmp(a, "--min-snr") == 0) { if (parse_float(a, val, 0, 100, &o.diff.min_snr)) return 2; i++; }
        else if (strcmp(a, "--noise-offset") == 0) { if (parse_float(a, val, 0, 1, &o.diff.noise_offset)) return 2; i++; }
        else if (strcmp(a, "--ema") == 0) { if (parse_float(a, val, 0, 0.99999f, &o.diff.ema)) return 2; i++; }
        else if (strcmp(a, "--lr") == 0) { if (parse_float(a, val, 1e-7f, 1, &o.diff.lr)) return 2; i++; }
        else if (strcmp(a, "--batch") == 0) { if (parse_int(a, val, 1, 1024, &x)) return 2; o.diff.batch = (int)x; i++; }
        else if (strcmp(a, "--seed") == 0) { if (parse_int(a, val, 0, 1L << 30, &x)) return 2; o.seed = (uint64_t)x; i++; }
        else if (strcmp(a, "--images") == 0) { if (parse_int(a, val, 0, 1L << 30, &x)) return 2; o.images = (int)x; i++; }
        else if (strcmp(a, "--vae-channels") == 0) { if (parse_channels(a, val)) return 2; i++; }
        else if (strcmp(a, "--vae-lr") == 0) { if (parse_float(a, val, 1e-7f, 1, &o.vae.lr)) return 2; i++; }
        else if (strcmp(a, "--vae-batch") == 0) { if (parse_int(a, val, 1, 256, &x)) return 2; o.vae.batch = (int)x; i++; }
        else if (strcmp(a, "--vae-steps") == 0) { if (parse_int(a, val, 1, 1L << 30, &x)) return 2; o.vae.steps = (int)x; i++; }
        else if (strcmp(a, "--steps") == 0) { if (parse_int(a, val, 1, 1L << 30, &x)) return 2; o.diff.steps = (int)x; i++; }
        else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) { usage(); return 0; }
        else { fprintf(stderr, "error: %s: unknown or incomplete flag (see --help)\n", a); return 2; }
    }
    double t0 = now_s();
    tb_result r;
    if (tb_run(&o, &r)) return 1;
    printf("\nfinal (seed %llu, %d images, vae %d x %d, unet %d x %d):\n"
           "  tokenizer       %d tokens\n"
           "  vae recon mse   train first 10%% %.5f, last 10%% %.5f; eval %.5f (init %.5f) = PSNR %.2f dB\n"
           "  scaling_factor  %.6g\n"
           "  unet eps mse    train first 10%% %.4f, last 10%% %.4f; eval %.4f (init %.4f)\n"
           "  time            vae %.0f s, text encoder + unet %.0f s, total %.0f s\n",
           (unsigned long long)o.seed, o.images, o.vae.steps, o.vae.batch, o.diff.steps, o.diff.batch,
           r.vocab, r.vae.loss_first, r.vae.loss_last, r.vae.eval_mse, r.vae.init_mse, r.vae.psnr,
           r.vae.scaling, r.diff.loss_first, r.diff.loss_last, r.diff_eval, r.diff.init_eval,
           r.secs_vae, r.secs_diff, now_s() - t0);
    if (r.vae.eval_mse_vae > 0)
        printf("  vae on --vae-data: eval %.5f = PSNR %.2f dB\n", r.vae.eval_mse_vae, 10.0f * log10f(4.0f / r.vae.eval_mse_vae));
    if (o.save) printf("wrote %s/\n", o.out_dir);
    return 0;
}
#endif

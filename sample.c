/* sample.c: ./sample — text-to-image with a Stable Diffusion 1.x model and
 * optional LoRAs (article 5.5).
 *
 * Data flow (see DESIGN.md and generate.c): prompt, negative -> CLIP ->
 * cond, uncond ; seeded noise -> sampler steps with eps = u + cfg (c - u)
 * -> VAE decode -> PNG with AUTOMATIC1111's "parameters" text.
 *
 * LoRAs come from --lora FILE[:weight] (repeatable) and from A1111 tags in
 * the prompt, <lora:name:weight>, which load NAME.safetensors from --lora-dir
 * (default ./loras, where ./train's examples put them). Without --merge each
 * UNet adapter runs as a side branch, W0 x + w (alpha/r) B A x, as diffusers
 * and A1111 do; with --merge it is added into W0 once (same image, no extra
 * work per step). Text-encoder adapters are always merged (it runs once).
 * --weight-dtype fp16 holds the weight matrices of the text encoder, the
 * UNet and the VAE as fp16 (half the memory, fp32 arithmetic); a merge into
 * them is rounded to fp16.
 *
 * --batch N writes OUT, then OUT with -1, -2, ... before the extension: the
 * N images diffusers makes from one seed (num_images_per_prompt = N). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/resource.h>
#include <sys/stat.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "cli.h"
#include "generate.h"
#include "image.h"

#define MAX_LORAS (CLI_LIST_MAX + 16)

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* "dir/style.safetensors" -> "style" (the name A1111 shows in <lora:...>) */
static void lora_stem(char *out, size_t n, const char *path) {
    const char *b = strrchr(path, '/');
    b = b ? b + 1 : path;
    snprintf(out, n, "%s", b);
    char *dot = strrchr(out, '.');
    if (dot && dot != out) *dot = 0;
}

/* "FILE[:weight]": a trailing ":number" is the weight, else the whole is the path */
static int split_lora_arg(const char *arg, char *path, size_t n, float *w) {
    const char *colon = strrchr(arg, ':');
    *w = 1.0f;
    if (colon && colon[1]) {
        char *end;
        double v = strtod(colon + 1, &end);
        if (*end == 0) {
            *w = (float)v;
            snprintf(path, n, "%.*s", (int)(colon - arg), arg);
            return 0;
        }
    }
    snprintf(path, n, "%s", arg);
    return 0;
}

/* OUT for image 0, OUT with "-b" before the extension for image b */
static void out_name(char *buf, size_t n, const char *out, int b) {
    if (b == 0) { snprintf(buf, n, "%s", out); return; }
    const char *slash = strrchr(out, '/'), *dot = strrchr(out, '.');
    if (!dot || (slash && dot < slash)) { snprintf(buf, n, "%s-%d", out, b); return; }
    snprintf(buf, n, "%.*s-%d%s", (int)(dot - out), out, b, dot);
}

int main(int argc, char **argv) {
    const char *model = NULL, *prompt = NULL, *negative = "", *out = "sample.png",
               *sampler = "euler_a", *rng = "cpu", *lora_dir = "loras", *tok_dir = NULL,
               *wdtype_name = "fp32";
    int steps = 20, width = 0, height = 0, batch = 1, clip_skip = 1, karras = 0, merge = 0, threads = 0;
    float cfg = 7.0f;
    uint64_t seed = 42;
    cli_strlist lora = {{0}, 0};
    const cli_opt opts[] = {
        {"--model", OPT_STR, &model, 0, 0, NULL, "base model: SD1.x .safetensors or diffusers folder (default: models/tiny)"},
        {"--tokenizer", OPT_STR, &tok_dir, 0, 0, NULL, "folder with vocab.json + merges.txt (single-file checkpoints)"},
        {"--weight-dtype", OPT_CHOICE, &wdtype_name, 0, 0, "fp32|fp16", "fp16: hold the model's frozen weights as fp16 (half the RAM, fp32 math; --merge rounds to fp16)"},
        {"--prompt", OPT_STR, &prompt, 0, 0, NULL, "what to draw (may hold <lora:name:weight>)"},
        {"--negative", OPT_STR, &negative, 0, 0, NULL, "negative prompt"},
        {"--steps", OPT_INT, &steps, 1, 1000, NULL, "sampling steps"},
        {"--cfg", OPT_FLOAT, &cfg, 0, 100, NULL, "classifier-free guidance scale (<= 1: no negative pass)"},
        {"--seed", OPT_U64, &seed, 0, 9.2e18, NULL, "noise seed"},
        {"--width", OPT_INT, &width, 0, 8192, NULL, "image width, multiple of 8 (0: the model's)"},
        {"--height", OPT_INT, &height, 0, 8192, NULL, "image height, multiple of 8 (0: the model's)"},
        {"--batch", OPT_INT, &batch, 1, 64, NULL, "images per prompt (OUT, OUT-1, OUT-2, ...)"},
        {"--sampler", OPT_CHOICE, &sampler, 0, 0, "ddim|ddpm|euler|euler_a|dpmpp_2m", "sampler"},
        {"--karras", OPT_FLAG, &karras, 0, 0, NULL, "Karras sigmas (dpmpp_2m, euler)"},
        {"--rng", OPT_CHOICE, &rng, 0, 0, "cpu|cuda", "noise generator to reproduce (torch CPU or CUDA Philox)"},
        {"--lora", OPT_STRLIST, &lora, 0, 0, NULL, "LoRA file[:weight], repeatable"},
        {"--lora-dir", OPT_STR, &lora_dir, 0, 0, NULL, "folder searched for <lora:name:w> in the prompt"},
        {"--merge", OPT_FLAG, &merge, 0, 0, NULL, "bake LoRAs into the weights"},
        {"--clip-skip", OPT_INT, &clip_skip, 1, 12, NULL, "use the output of the N-th last CLIP layer"},
        {"--out", OPT_STR, &out, 0, 0, NULL, "output PNG"},
        {"--threads", OPT_INT, &threads, 0, 4096, NULL, "CPU threads (0: all)"},
    };
    const char *pos[1]; int npos;
    int rc = cli_parse(argc, argv, opts, (int)(sizeof opts / sizeof opts[0]), pos, 0, &npos,
                       "usage: ./sample --prompt TEXT [options]\n"
                       "Draws images with a Stable Diffusion 1.x model and optional LoRAs.");
    if (rc == 1) return 0;
    if (rc) return rc;
    if (!prompt) {
        fprintf(stderr, "error: no prompt given (add --prompt \"a red circle\"; see ./sample --help)\n");
        return 2;
    }
    if (width % 8 || height % 8) {
        fprintf(stderr, "error: --width/--height %dx%d: not multiples of 8 (the VAE works on 8x8 blocks; use e.g. 512)\n", width, height);
        return 2;
    }
    if (karras && strcmp(sampler, "euler") != 0 && strcmp(sampler, "dpmpp_2m") != 0) {
        fprintf(stderr, "error: --karras: the %s sampler has no Karras schedule (use --sampler euler or dpmpp_2m)\n", sampler);
        return 2;
    }
#ifdef _OPENMP
    if (threads > 0) omp_set_num_threads(threads);
#endif

    /* the LoRAs: --lora flags, then the prompt's tags */
    char err[SD_ERR_LEN];
    size_t plen = strlen(prompt) + 1;
    char *text = malloc(plen);
    sd_prompt_lora tags[MAX_LORAS];
    int ntags = text ? sd_prompt_loras(prompt, text, plen, tags, MAX_LORAS - lora.n, err) : -1;
    if (ntags < 0) { fprintf(stderr, "error: %s\n", text ? err : "out of memory"); free(text); return 2; }
    int nl = 0;
    char paths[MAX_LORAS][1024];
    float weights[MAX_LORAS];
    for (int i = 0; i < lora.n; i++, nl++)
        split_lora_arg(lora.v[i], paths[nl], sizeof paths[nl], &weights[nl]);
    for (int i = 0; i < ntags; i++, nl++) {
        snprintf(paths[nl], sizeof paths[nl], "%.700s/%.250s.safetensors", lora_dir, tags[i].name);
        weights[nl] = tags[i].weight;
        struct stat st;
        if (stat(paths[nl], &st) != 0) {
            fprintf(stderr, "error: <lora:%s>: %s not found (put %s.safetensors in %s/ or point --lora-dir at its folder)\n",
                    tags[i].name, paths[nl], tags[i].name, lora_dir);
            free(text);
            return 2;
        }
    }

    double t0 = now();
    sd_model m;
    weight_dtype wdtype = WEIGHT_F32;
    weight_dtype_parse(wdtype_name, &wdtype);   /* cli_parse checked it is fp32 or fp16 */
    if (sd_model_load_dtype(&m, model, tok_dir, wdtype, err)) {
        fprintf(stderr, "error: model: %s\n", err);
        free(text);
        return 1;
    }
    char lora_text[MAX_LORAS * 300] = "";
    for (int i = 0; i < nl; i++) {
        lora_file lf;
        char lerr[SD_ERR_LEN > ST_ERR_LEN ? SD_ERR_LEN : ST_ERR_LEN];
        if (lora_file_load(paths[i], &lf, lerr)) {
            fprintf(stderr, "error: LoRA %s\n", lerr);
            sd_model_free(&m); free(text);
            return 1;
        }
        rc = sd_apply_lora(&m, &lf, weights[i], merge, lerr);
        int nmod = lf.n;
        lora_file_free(&lf);
        if (rc) {
            fprintf(stderr, "error: LoRA %s: %s\n", paths[i], lerr);
            sd_model_free(&m); free(text);
            return 1;
        }
        char stem[256];
        lora_stem(stem, sizeof stem, paths[i]);
        size_t k = strlen(lora_text);
        snprintf(lora_text + k, sizeof lora_text - k, "%s<lora:%s:%g>", k ? " " : "", stem, (double)weights[i]);
        printf("LoRA %s, weight %g (%d modules%s)\n", paths[i], (double)weights[i], nmod, merge ? ", merged" : "");
    }
    double t_load = now() - t0;

    int side = sd_default_image_side(&m);
    gen_params p = {
        .prompt = text, .negative = negative, .width = width ? width : side,
        .height = height ? height : side, .steps = steps, .cfg = cfg, .seed = seed,
        .batch = batch, .clip_skip = clip_skip, .sampler = sampler, .karras = karras,
        .rng_cuda = strcmp(rng, "cuda") == 0,
    };
    if (clip_skip > m.clip.config.num_layers) {
        fprintf(stderr, "error: --clip-skip %d: the text encoder has only %d layers (use 1 to %d)\n",
                clip_skip, m.clip.config.num_layers, m.clip.config.num_layers);
        sd_model_free(&m); free(text);
        return 2;
    }
    size_t npix = (size_t)p.width * p.height * 3;
    uint8_t *rgb = malloc(npix * (size_t)batch);
    if (!rgb) {
        fprintf(stderr, "error: %dx%d x %d images: out of memory (use a smaller --batch or size)\n", p.width, p.height, batch);
        sd_model_free(&m); free(text);
        return 1;
    }
    double t1 = now();
    if (sd_generate(&m, &p, rgb, err)) {
        fprintf(stderr, "error: generate: %s\n", err);
        free(rgb); sd_model_free(&m); free(text);
        return 1;
    }
    double t_gen = now() - t1;

    char params[8192];
    sd_params_text(params, sizeof params, &m, &p, lora_text);
    const char *keys[1] = {"parameters"}, *vals[1] = {params};
    rc = 0;
    for (int b = 0; b < batch && rc == 0; b++) {
        char name[1200], ierr[512];
        out_name(name, sizeof name, out, b);
        if (image_save_png(name, rgb + npix * (size_t)b, p.width, p.height, keys, vals, 1, ierr, sizeof ierr)) {
            fprintf(stderr, "error: %s\n", ierr);
            rc = 1;
        } else {
            printf("wrote %s\n", name);
        }
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("%dx%d, %d steps (%s%s), batch %d: load %.2f s, sampling and decoding %.2f s; peak memory %.0f MiB "
           "(weights %.0f MiB held as %s)\n",
           p.width, p.height, steps, sampler, karras ? ", Karras" : "", batch, t_load, t_gen,
           (double)ru.ru_maxrss / 1024.0, (double)sd_model_weight_bytes(&m) / 1048576.0, weight_dtype_name(m.wdtype));
    free(rgb);
    sd_model_free(&m);
    free(text);
    return rc;
}

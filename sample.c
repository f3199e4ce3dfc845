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
#include <unistd.h>
#include <sys/resource.h>
#include <sys/stat.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "cli.h"
#include "cuda/cuda.h"
#include "generate.h"
#include "image.h"
#include "grid.h"
#include "profile.h"

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

/* "FILE[:w]" or, for --grid, "FILE:w1,w2,...": a trailing ":number[,number...]"
 * holds the weights (at most max), else the whole is the path and the
 * weight is 1. Returns how many weights were found. */
static int split_lora_arg(const char *arg, char *path, size_t n, float *w, int max) {
    const char *colon = strrchr(arg, ':');
    w[0] = 1.0f;
    if (colon && colon[1]) {
        int k = 0;
        const char *p = colon + 1;
        char *end;
        for (;;) {
            double v = strtod(p, &end);
            if (end == p || k == max) break;
            w[k++] = (float)v;
            if (*end == ',') { p = end + 1; continue; }
            if (*end == 0) {
                snprintf(path, n, "%.*s", (int)(colon - arg), arg);
                return k;
            }
            break;
        }
        w[0] = 1.0f;
    }
    snprintf(path, n, "%s", arg);
    return 1;
}

/* OUT for image 0, OUT with "-b" before the extension for image b */
static void out_name(char *buf, size_t n, const char *out, int b) {
    if (b == 0) { snprintf(buf, n, "%s", out); return; }
    const char *slash = strrchr(out, '/'), *dot = strrchr(out, '.');
    if (!dot || (slash && dot < slash)) { snprintf(buf, n, "%s-%d", out, b); return; }
    snprintf(buf, n, "%.*s-%d%s", (int)(dot - out), out, b, dot);
}

/* the flags, and what one run holds */
typedef struct {
    const char *model, *prompt, *negative, *out, *sampler, *rng, *lora_dir, *tok_dir, *wdtype_name, *device, *compute;
    int steps, width, height, batch, clip_skip, karras, merge, threads, grid;
    int tf32;                           /* --tf32 (--device cuda only) */
    float cfg;
    uint64_t seed;
    cli_strlist lora;
} sample_args;

typedef struct {
    char *text;                         /* the prompt without its <lora:...> tags */
    int nl;                             /* LoRAs: --lora flags, then the prompt's tags */
    char paths[MAX_LORAS][1024];
    float weights[MAX_LORAS];
    char lora_text[MAX_LORAS * 300];    /* "<lora:stem:w> ..." for the PNG's parameters */
    sd_model m;
    int model_loaded;
    gen_params p;
    uint8_t *rgb;                       /* batch x height x width x 3 */
    double t_load, t_gen;
    int grid_lora;                      /* --grid: the LoRA whose weights make the rows, or -1 */
    int ngrid_w;
    float grid_w[16];
} sample_run;

/* the table of flags into a; -1 to go on, else the exit status */
static int parse_args(sample_args *a, int argc, char **argv) {
    const cli_opt opts[] = {
        {"--model", OPT_STR, &a->model, 0, 0, NULL, "base model: SD1.x/SD2.x .safetensors or diffusers folder (default: models/tiny)"},
        {"--tokenizer", OPT_STR, &a->tok_dir, 0, 0, NULL, "folder with vocab.json + merges.txt (single-file checkpoints)"},
        {"--weight-dtype", OPT_CHOICE, &a->wdtype_name, 0, 0, "fp32|fp16", "fp16: hold the model's frozen weights as fp16 (half the RAM, fp32 math; --merge rounds to fp16)"},
        {"--compute", OPT_CHOICE, &a->compute, 0, 0, "fp32|bf16|fp16", "bf16: every matrix product on bf16-rounded operands, fp32 sums (faster where the CPU has AVX512-BF16); fp16: fp16 operands (--device cuda only)"},
        {"--tf32", OPT_FLAG, &a->tf32, 0, 0, NULL, "--device cuda: fp32 matrix products on TF32 tensor cores (faster, 10-bit products)"},
        {"--prompt", OPT_STR, &a->prompt, 0, 0, NULL, "what to draw (may hold <lora:name:weight>)"},
        {"--negative", OPT_STR, &a->negative, 0, 0, NULL, "negative prompt"},
        {"--steps", OPT_INT, &a->steps, 1, 1000, NULL, "sampling steps"},
        {"--cfg", OPT_FLOAT, &a->cfg, 0, 100, NULL, "classifier-free guidance scale (<= 1: no negative pass)"},
        {"--seed", OPT_U64, &a->seed, 0, 9.2e18, NULL, "noise seed"},
        {"--width", OPT_INT, &a->width, 0, 8192, NULL, "image width, multiple of 8 (0: the model's)"},
        {"--height", OPT_INT, &a->height, 0, 8192, NULL, "image height, multiple of 8 (0: the model's)"},
        {"--batch", OPT_INT, &a->batch, 1, 64, NULL, "images per prompt (OUT, OUT-1, OUT-2, ...)"},
        {"--sampler", OPT_CHOICE, &a->sampler, 0, 0, "ddim|ddpm|euler|euler_a|dpmpp_2m", "sampler"},
        {"--karras", OPT_FLAG, &a->karras, 0, 0, NULL, "Karras sigmas (dpmpp_2m, euler)"},
        {"--rng", OPT_CHOICE, &a->rng, 0, 0, "cpu|cuda", "noise generator to reproduce (torch CPU or CUDA Philox)"},
        {"--lora", OPT_STRLIST, &a->lora, 0, 0, NULL, "LoRA file[:weight], repeatable"},
        {"--lora-dir", OPT_STR, &a->lora_dir, 0, 0, NULL, "folder searched for <lora:name:w> in the prompt"},
        {"--merge", OPT_FLAG, &a->merge, 0, 0, NULL, "bake LoRAs into the weights"},
        {"--grid", OPT_FLAG, &a->grid, 0, 0, NULL, "one labelled X/Y grid: a column per prompt (split at |), a row per weight of --lora FILE:w1,w2,..."},
        {"--clip-skip", OPT_INT, &a->clip_skip, 1, 12, NULL, "use the output of the N-th last CLIP layer"},
        {"--out", OPT_STR, &a->out, 0, 0, NULL, "output PNG"},
        {"--threads", OPT_INT, &a->threads, 0, 4096, NULL, "CPU threads (0: all)"},
        {"--device", OPT_CHOICE, &a->device, 0, 0, "cpu|cuda", "where the UNet, text encoder and VAE run (cuda: a build with make CUDA=1 and an NVIDIA GPU)"},
    };
    const char *pos[1]; int npos;
    int rc = cli_parse(argc, argv, opts, (int)(sizeof opts / sizeof opts[0]), pos, 0, &npos,
                       "usage: ./sample --prompt TEXT [options]\n"
                       "Draws images with a Stable Diffusion 1.x or 2.x model and optional LoRAs.");
    if (rc == 1) return 0;
    if (rc) return rc;
    if (!a->prompt) {
        fprintf(stderr, "error: no prompt given (add --prompt \"a red circle\"; see ./sample --help)\n");
        return 2;
    }
    if (a->width % 8 || a->height % 8) {
        fprintf(stderr, "error: --width/--height %dx%d: not multiples of 8 (the VAE works on 8x8 blocks; use e.g. 512)\n", a->width, a->height);
        return 2;
    }
    if (a->grid && a->batch != 1) {
        fprintf(stderr, "error: --grid with --batch %d: a grid holds one image per prompt and weight (drop --batch)\n", a->batch);
        return 2;
    }
    if (a->karras && strcmp(a->sampler, "euler") != 0 && strcmp(a->sampler, "dpmpp_2m") != 0) {
        fprintf(stderr, "error: --karras: the %s sampler has no Karras schedule (use --sampler euler or dpmpp_2m)\n", a->sampler);
        return 2;
    }
    return -1;
}

/* the LoRAs: --lora flags, then the prompt's tags (which must exist in
 * --lora-dir); the prompt without its tags into r->text. 0 or 2. */
static int collect_loras(sample_run *r, const sample_args *a) {
    char err[SD_ERR_LEN];
    size_t plen = strlen(a->prompt) + 1;
    r->text = malloc(plen);
    sd_prompt_lora tags[MAX_LORAS];
    int ntags = r->text ? sd_prompt_loras(a->prompt, r->text, plen, tags, MAX_LORAS - a->lora.n, err) : -1;
    if (ntags < 0) { fprintf(stderr, "error: %s\n", r->text ? err : "out of memory"); return 2; }
    r->grid_lora = -1;
    for (int i = 0; i < a->lora.n; i++, r->nl++) {
        float w[16];
        int nw = split_lora_arg(a->lora.v[i], r->paths[r->nl], sizeof r->paths[r->nl], w, 16);
        r->weights[r->nl] = w[0];
        if (nw == 1) continue;
        if (!a->grid) {
            fprintf(stderr, "error: --lora %s: a list of weights makes the rows of a grid (add --grid, or give one weight)\n", a->lora.v[i]);
            return 2;
        }
        if (r->grid_lora >= 0) {
            fprintf(stderr, "error: --lora %s: only one LoRA may carry a list of weights (the grid's rows)\n", a->lora.v[i]);
            return 2;
        }
        r->grid_lora = r->nl;
        r->ngrid_w = nw;
        memcpy(r->grid_w, w, sizeof(float) * (size_t)nw);
    }
    for (int i = 0; i < ntags; i++, r->nl++) {
        snprintf(r->paths[r->nl], sizeof r->paths[r->nl], "%.700s/%.250s.safetensors", a->lora_dir, tags[i].name);
        r->weights[r->nl] = tags[i].weight;
        struct stat st;
        if (stat(r->paths[r->nl], &st) != 0) {
            fprintf(stderr, "error: <lora:%s>: %s not found (put %s.safetensors in %s/ or point --lora-dir at its folder)\n",
                    tags[i].name, r->paths[r->nl], tags[i].name, a->lora_dir);
            return 2;
        }
    }
    return 0;
}

/* the model, then each LoRA on it (as a side branch, or merged); 0 or 1 */
static int load_model_and_loras(sample_run *r, const sample_args *a) {
    char err[SD_ERR_LEN];
    weight_dtype wdtype = WEIGHT_F32;
    weight_dtype_parse(a->wdtype_name, &wdtype);   /* cli_parse checked it is fp32 or fp16 */
    if (sd_model_load_dtype(&r->m, a->model, a->tok_dir, wdtype, err)) {
        fprintf(stderr, "error: model: %s\n", err);
        return 1;
    }
    r->model_loaded = 1;
    for (int i = 0; i < r->nl; i++) {
        lora_file lf;
        char lerr[SD_ERR_LEN > ST_ERR_LEN ? SD_ERR_LEN : ST_ERR_LEN];
        if (lora_file_load(r->paths[i], &lf, lerr)) {
            fprintf(stderr, "error: LoRA %s\n", lerr);
            return 1;
        }
        int rc = sd_apply_lora(&r->m, &lf, r->weights[i], a->merge, lerr);
        int nmod = lf.n;
        lora_file_free(&lf);
        if (rc) {
            fprintf(stderr, "error: LoRA %s: %s\n", r->paths[i], lerr);
            return 1;
        }
        char stem[256];
        lora_stem(stem, sizeof stem, r->paths[i]);
        size_t k = strlen(r->lora_text);
        snprintf(r->lora_text + k, sizeof r->lora_text - k, "%s<lora:%s:%g>", k ? " " : "", stem, (double)r->weights[i]);
        printf("LoRA %s, weight %g (%d modules%s)\n", r->paths[i], (double)r->weights[i], nmod, a->merge ? ", merged" : "");
    }
    /* --device cuda: the sampler's UNet, text encoder and VAE decode on the
     * GPU, with the LoRAs as they are now (merged or side branches) */
    const nn_ops *ops = nn_device_emulated();   /* testing hook (backend.h): SDLORA_DEVICE=emulate, the CPU as the device */
#ifdef SDLORA_CUDA
    if (!ops) ops = nn_ops_cuda();
#endif
    if (strcmp(a->device, "cuda") == 0 && ops) {
        const char *e = unet_to_device(&r->m.unet, ops) ? r->m.unet.err :
                        clip_to_device(&r->m.clip, ops) ? r->m.clip.err :
                        vae_to_device(&r->m.vae, ops) ? r->m.vae.err : NULL;
        if (e) { fprintf(stderr, "error: --device cuda: %s\n", e); return 1; }
    }
    return 0;
}

/* the generation's settings (size 0: the model's) and the image buffer; 0, 1 or 2 */
static int prepare(sample_run *r, const sample_args *a) {
    int side = sd_default_image_side(&r->m);
    r->p = (gen_params){
        .prompt = r->text, .negative = a->negative, .width = a->width ? a->width : side,
        .height = a->height ? a->height : side, .steps = a->steps, .cfg = a->cfg, .seed = a->seed,
        .batch = a->batch, .clip_skip = a->clip_skip, .sampler = a->sampler, .karras = a->karras,
        .rng_cuda = strcmp(a->rng, "cuda") == 0,
    };
    int nlayers = r->m.clip.config.num_layers;
    if (a->clip_skip > nlayers) {
        fprintf(stderr, "error: --clip-skip %d: the text encoder has only %d layers (use 1 to %d)\n", a->clip_skip, nlayers, nlayers);
        return 2;
    }
    r->rgb = malloc((size_t)r->p.width * r->p.height * 3 * (size_t)a->batch);
    if (!r->rgb) {
        fprintf(stderr, "error: %dx%d x %d images: out of memory (use a smaller --batch or size)\n", r->p.width, r->p.height, a->batch);
        return 1;
    }
    return 0;
}

/* OUT, OUT-1, ...: PNGs with AUTOMATIC1111's "parameters" text; 0 or 1 */
static int save_images(sample_run *r, const sample_args *a) {
    char params[8192];
    sd_params_text(params, sizeof params, &r->m, &r->p, r->lora_text);
    const char *keys[1] = {"parameters"}, *vals[1] = {params};
    size_t npix = (size_t)r->p.width * r->p.height * 3;
    int rc = 0;
    for (int b = 0; b < a->batch && rc == 0; b++) {
        char name[1200], ierr[512];
        out_name(name, sizeof name, a->out, b);
        if (image_save_png(name, r->rgb + npix * (size_t)b, r->p.width, r->p.height, keys, vals, 1, ierr, sizeof ierr)) {
            fprintf(stderr, "error: %s\n", ierr);
            rc = 1;
        } else {
            printf("wrote %s\n", name);
        }
    }
    return rc;
}

static void report(const sample_run *r, const sample_args *a) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("%dx%d, %d steps (%s%s), batch %d: load %.2f s, sampling and decoding %.2f s; peak memory %.0f MiB "
           "(weights %.0f MiB held as %s)\n",
           r->p.width, r->p.height, a->steps, a->sampler, a->karras ? ", Karras" : "", a->batch, r->t_load, r->t_gen,
           (double)ru.ru_maxrss / 1024.0, (double)sd_model_weight_bytes(&r->m) / 1048576.0, weight_dtype_name(r->m.wdtype));
#ifdef SDLORA_CUDA
    /* --device cuda: the most device memory held at once (weights, activations,
     * scratch, cuBLAS's workspace; the CUDA context not counted) */
    if (strcmp(a->device, "cuda") == 0) printf("peak device memory %.0f MiB\n", (double)cuda_mem_peak() / 1048576.0);
#endif
}

/* the progress line after each sampler step: its seconds, the mean, the time left */
typedef struct { double t_start, t_prev; int tty; } progress;

static void on_step(void *ctx, int step, int steps) {
    progress *pr = ctx;
    double t = now(), el = t - pr->t_start, mean = el / step;
    char ela[32], eta[32];
    cli_fmt_duration(ela, sizeof ela, el);
    cli_fmt_duration(eta, sizeof eta, mean * (steps - step));
    fprintf(stderr, "%sstep %d/%d  %.3f s/step (mean %.3f)  %s < %s%s", pr->tty ? "\r" : "", step, steps,
            t - pr->t_prev, mean, ela, eta, pr->tty && step < steps ? "   " : "\n");
    pr->t_prev = t;
}

/* --grid: an X/Y grid, a column per prompt (the prompt split at '|') and a
 * row per weight of the one LoRA given a list (FILE:0,0.5,1), all from the
 * same seed, labelled (grid.c). Each row loads the model again with that
 * weight, so each cell is exactly the image ./sample draws alone. */
static int run_grid(sample_run *r, const sample_args *a) {
    char *prompts_buf = strdup(r->text), *prompts[16];
    if (!prompts_buf) { fprintf(stderr, "error: out of memory\n"); return 1; }
    int np = 0, nparts = sd_split_prompts(prompts_buf, "|", prompts, 16);
    for (int i = 0; i < nparts; i++) {          /* "a|  b": the space is not part of b */
        while (*prompts[i] == ' ') prompts[i]++;
        if (*prompts[i]) prompts[np++] = prompts[i];
    }
    int nrows = r->grid_lora >= 0 ? r->ngrid_w : 1, rc = 0;
    uint8_t *cells[16 * 16] = {0};
    char heads[16][700], rowlab[16][300];
    const char *hp[16], *rp[16];
    int w = 0, h = 0;
    for (int row = 0; row < nrows && rc == 0; row++) {
        if (r->grid_lora >= 0) r->weights[r->grid_lora] = r->grid_w[row];
        r->lora_text[0] = 0;
        if ((rc = load_model_and_loras(r, a)) || (rc = prepare(r, a))) break;
        w = r->p.width; h = r->p.height;
        for (int i = 0; i < np && rc == 0; i++) {
            char err[SD_ERR_LEN];
            r->p.prompt = prompts[i];
            cells[row * np + i] = malloc((size_t)w * h * 3);
            if (!cells[row * np + i]) { fprintf(stderr, "error: out of memory\n"); rc = 1; break; }
            if (sd_generate(&r->m, &r->p, cells[row * np + i], err)) {
                fprintf(stderr, "error: generate: %s\n", err);
                rc = 1;
            }
            printf("grid: row %d/%d, prompt %d/%d done\n", row + 1, nrows, i + 1, np);
        }
        char stem[256] = "";
        if (r->grid_lora >= 0) lora_stem(stem, sizeof stem, r->paths[r->grid_lora]);
        snprintf(rowlab[row], sizeof rowlab[row], "%s %g", stem, (double)r->grid_w[row]);
        rp[row] = rowlab[row];
        free(r->rgb); r->rgb = NULL;
        sd_model_free(&r->m);
        r->model_loaded = 0;
    }
    if (rc == 0) {
        for (int i = 0; i < np; i++) {
            snprintf(heads[i], sizeof heads[i], "%s\nseed %llu", prompts[i], (unsigned long long)a->seed);
            hp[i] = heads[i];
        }
        grid_image g;
        char desc[2048], ierr[512];
        snprintf(desc, sizeof desc, "columns: the prompts; rows: %s; seed %llu, %s, %d steps, cfg %g",
                 r->grid_lora >= 0 ? "the LoRA's weight" : "one", (unsigned long long)a->seed, a->sampler, a->steps,
                 (double)a->cfg);
        const char *k[1] = {"Title"}, *v[1] = {desc};
        if (grid_compose(&g, (const uint8_t *const *)cells, nrows, np, w, h, 256, hp, r->grid_lora >= 0 ? rp : NULL)) {
            fprintf(stderr, "error: out of memory for the grid\n");
            rc = 1;
        } else if (image_save_png(a->out, g.rgb, g.w, g.h, k, v, 1, ierr, sizeof ierr)) {
            fprintf(stderr, "error: %s\n", ierr);
            rc = 1;
        } else {
            printf("wrote %s (%d x %d cells, %dx%d)\n", a->out, nrows, np, g.w, g.h);
        }
        grid_free(&g);
    }
    for (int i = 0; i < nrows * np; i++) free(cells[i]);
    free(prompts_buf);
    return rc;
}

/* the run, as a list of steps; the exit status */
static int run(sample_run *r, const sample_args *a) {
    int rc = collect_loras(r, a);
    if (rc) return rc;
    if (a->grid) return run_grid(r, a);
    double t0 = now();
    if ((rc = load_model_and_loras(r, a))) return rc;
    r->t_load = now() - t0;
    if ((rc = prepare(r, a))) return rc;
    prof_reset();                          /* SDLORA_PROFILE=1: the sampling steps only */
    double t1 = now();
    progress pr = {t1, t1, isatty(2)};
    r->p.on_step = on_step;
    r->p.on_step_ctx = &pr;
    char err[SD_ERR_LEN];
    if (sd_generate(&r->m, &r->p, r->rgb, err)) {
        if (pr.tty) fputc('\n', stderr);
        fprintf(stderr, "error: generate: %s\n", err);
        return 1;
    }
    r->t_gen = now() - t1;
    prof_print(stderr, "sampling, after loading (per kind of operation)", r->t_gen);
    rc = save_images(r, a);
    report(r, a);
    return rc;
}

int main(int argc, char **argv) {
    sample_args a = {
        .model = NULL, .prompt = NULL, .negative = "", .out = "sample.png", .sampler = "euler_a", .rng = "cpu",
        .lora_dir = "loras", .tok_dir = NULL, .wdtype_name = "fp32", .device = "cpu", .compute = "fp32",
        .steps = 20, .width = 0, .height = 0, .batch = 1, .clip_skip = 1, .karras = 0, .merge = 0, .threads = 0,
        .cfg = 7.0f, .seed = 42, .lora = {{0}, 0},
    };
    int rc = parse_args(&a, argc, argv);
    if (rc >= 0) return rc;
    /* fp16 and TF32 are the GPU's (train.c says why) */
    if (strcmp(a.device, "cuda") != 0 && strcmp(a.compute, "fp16") == 0) {
        fprintf(stderr, "error: --compute fp16: runs on the GPU only (add --device cuda, or use --compute bf16 on the CPU)\n");
        return 2;
    }
    if (strcmp(a.device, "cuda") != 0 && a.tf32) {
        fprintf(stderr, "error: --tf32: TF32 is a GPU math mode (add --device cuda, or drop --tf32)\n");
        return 2;
    }
    char derr[CUDA_ERR_LEN];
    /* --device cuda without CUDA=1, a driver or a GPU: one line saying which */
    if (strcmp(a.device, "cuda") == 0 && !nn_device_emulated() && cuda_device_check(derr) != 0) { fprintf(stderr, "%s\n", derr); return 1; }
#ifdef _OPENMP
    if (a.threads > 0) omp_set_num_threads(a.threads);
#endif
    /* cli_parse checked it is fp32, bf16 or fp16 */
    nn_set_compute(a.compute, a.device, a.tf32);
    prof_init();
    sample_run *r = calloc(1, sizeof *r);   /* ~60 KB of LoRA paths: not on the stack */
    if (!r) { fprintf(stderr, "error: out of memory\n"); return 1; }
    rc = run(r, &a);
    free(r->rgb);
    if (r->model_loaded) sd_model_free(&r->m);
    free(r->text);
    free(r);
    return rc;
}

/* bench_unet.c: one full-size SD1.5 UNet step on the CPU, timed, for the
 * comparison with PyTorch that tools/bench_unet.sh prints (`make bench`).
 *
 *   bench_unet MODEL INPUTS OUT infer [REPS]
 *   bench_unet MODEL INPUTS OUT train|train-ckpt|train-tf [REPS]
 *   ... [REPS fp16]: the UNet's weights held as fp16 (--weight-dtype fp16);
 *   its result lines say "sdlora-fp16"
 *   ... [REPS fp32 bf16]: the step in the bf16 compute mode (--compute bf16)
 *   and in fp32, alternately (fp32, bf16, fp32, bf16, ...: a busy spell on a
 *   shared machine lands on both), best of each; OUT gets the bf16 outputs.
 *   Its result line says "sdlora-bf16", with the fp32 times beside and the
 *   bf16 step's error against the fp32 one, relative L2 (||bf16 - fp32|| /
 *   ||fp32||) of eps and of all LoRA gradients together (and the worst one).
 *
 * MODEL: an SD1.x single .safetensors file or a diffusers folder (loaded by
 * sd_model_load, so the text encoder and VAE are in memory too, as in
 * train/sample). INPUTS: written by tools/bench_unet.py: x (1,4,h,w), t (1),
 * ctx (1,77,768), and for training target (1,4,h,w) and every adapter's A and
 * B ("lora.<diffusers module>.A" / ".B"), so both sides start from the same
 * LoRA weights. OUT gets what the Python side compares against diffusers:
 * eps, and for training every adapter's gradients ("grad.<module>.A"/".B").
 *
 * infer: one forward (inference arena). train: LoRA "attn" rank 4 (to_q, to_k,
 * to_v, to_out.0 of every attn1/attn2; alpha 4, no dropout), a training-mode
 * forward, loss = mean((eps - target)^2), backward to the LoRA gradients only.
 * train-ckpt: the same with gradient checkpointing (unet_alloc_acts train=2).
 * train-tf: LoRA "transformer" rank 16 (alpha 16: the attn targets and
 * proj_in, proj_out, ff.net.0.proj, ff.net.2 of every transformer), its A and
 * B from the inputs' "lora16.<module>.A" / ".B"; otherwise as train.
 * Each is run once to warm up, then REPS (3) times; the best time is printed.
 * One measurement per process, so the peak RSS (getrusage ru_maxrss) printed
 * at the end is that measurement's own; loading usually sets it (the fp32
 * weights and the mapped file together), so the peak of the steps alone is
 * printed too, measured after resetting the kernel's high-water mark. SDLORA_PROFILE=1: the
 * per-kind profile of the last timed step (of each compute mode). Threads: OpenMP's default, every core
 * (OMP_NUM_THREADS overrides). Lines starting "result " are for the script. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/resource.h>
#include "model.h"
#include "profile.h"
#include "safetensors.h"
#ifdef _OPENMP
#include <omp.h>
#endif

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

/* CPU seconds of the whole process (every thread): on a shared machine the
 * time a step's threads actually ran, which other processes do not inflate
 * the way they inflate the wall time (OMP_WAIT_POLICY=passive, so idle
 * threads do not count) */
static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static double peak_rss_mb(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss / 1024.0;     /* Linux: kilobytes */
}

/* the resident set now, from /proc (0 where there is none) */
static double rss_mb(void) {
    long pages = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f) return 0;
    if (fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
    fclose(f);
    return resident * 4096.0 / (1024 * 1024);
}

/* Linux: writing 5 to /proc/self/clear_refs resets the peak RSS to the
 * current RSS, so the next peak is the steps' own, not the loading's */
static int reset_peak_rss(void) {
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (!f) return -1;
    int ok = fputs("5", f) >= 0;
    return fclose(f) == 0 && ok ? 0 : -1;
}

static void die(const char *what, const char *why) {
    fprintf(stderr, "error: %s: %s\n", what, why);
    exit(1);
}

/* read a tensor of exactly n floats from the inputs file */
static float *need(const st_file *f, const char *name, size_t n, const char *path) {
    char err[512];
    size_t got = 0;
    float *p = st_load_f32(f, name, &got, err);
    if (!p) die(path, err);
    if (got != n) {
        snprintf(err, sizeof err, "tensor %s has %zu values, expected %zu (rerun tools/bench_unet.py prepare)", name, got, n);
        die(path, err);
    }
    return p;
}

int main(int argc, char **argv) {
    if (argc < 5 || (strcmp(argv[4], "infer") && strcmp(argv[4], "train") && strcmp(argv[4], "train-ckpt") &&
                     strcmp(argv[4], "train-tf"))) {
        fprintf(stderr, "usage: %s MODEL INPUTS.safetensors OUT.safetensors infer|train|train-ckpt|train-tf [REPS [fp32|fp16 [fp32|bf16]]]\n", argv[0]);
        return 2;
    }
    const char *model_path = argv[1], *in_path = argv[2], *out_path = argv[3], *mode = argv[4];
    int reps = argc > 5 ? atoi(argv[5]) : 3;
    if (reps < 1) reps = 1;
    weight_dtype wdt = WEIGHT_F32;
    if (argc > 6 && weight_dtype_parse(argv[6], &wdt)) die(argv[6], "weight dtype: use fp32 or fp16");
    int bf16 = argc > 7 && strcmp(argv[7], "bf16") == 0;
    if (argc > 7 && !bf16 && strcmp(argv[7], "fp32")) die(argv[7], "compute: use fp32 or bf16");
    int train = strcmp(mode, "infer") == 0 ? 0 : strcmp(mode, "train-ckpt") == 0 ? 2 : 1;
    int tf = strcmp(mode, "train-tf") == 0;   /* transformer r16, not attn r4 */
    int rank = tf ? 16 : 4;
    const char *targets = tf ? "transformer" : "attn", *lprefix = tf ? "lora16" : "lora";
    prof_init();
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif

    char err[SD_ERR_LEN];
    sd_model m;
    double t0 = now();
    if (sd_model_load_dtype(&m, model_path, NULL, wdt, err)) die(model_path, err);
    double load_s = now() - t0;
    unet_t *u = &m.unet;
    printf("loaded %s in %.1f s (%s, UNet weights %s), RSS %.0f MB, peak %.0f MB\n", model_path, load_s,
           m.single_file ? "single file" : "diffusers folder", weight_dtype_name(wdt), rss_mb(), peak_rss_mb());

    st_file inp;
    if (st_open(&inp, in_path, err)) die(in_path, err);
    const st_tensor *xt = st_find(&inp, "x");
    if (!xt || xt->ndim != 4) die(in_path, "no 4-D tensor x (rerun tools/bench_unet.py prepare)");
    int B = (int)xt->shape[0], C = (int)xt->shape[1], h = (int)xt->shape[2], w = (int)xt->shape[3];
    int Tc = 77, D = u->cfg.cross_dim;
    size_t nx = (size_t)B * C * h * w, neps = (size_t)B * u->cfg.out_channels * h * w;
    if (C != u->cfg.in_channels) die(in_path, "x has the wrong channel count for this UNet");
    float *x = need(&inp, "x", nx, in_path);
    float *t = need(&inp, "t", (size_t)B, in_path);
    float *ctx = need(&inp, "ctx", (size_t)B * Tc * D, in_path);
    float *eps = malloc(sizeof(float) * neps);
    float *target = NULL, *deps = NULL;
    if (!eps) die("eps", "out of memory");

    if (train) {
        if (unet_add_lora(u, targets, rank, (float)rank, 0.0f, 1234)) die("LoRA", u->err);
        /* the Python side's A and B, so the gradients can be compared */
        for (int i = 0; i < u->nloras; i++) {
            lora_t *L = &u->loras[i].L;
            char name[160];
            snprintf(name, sizeof name, "%s.%s.A", lprefix, u->loras[i].name);
            float *a = need(&inp, name, (size_t)L->r * L->in, in_path);
            snprintf(name, sizeof name, "%s.%s.B", lprefix, u->loras[i].name);
            float *b = need(&inp, name, (size_t)L->out * L->r, in_path);
            memcpy(L->A, a, sizeof(float) * L->r * L->in);
            memcpy(L->B, b, sizeof(float) * L->out * L->r);
            free(a); free(b);
        }
        target = need(&inp, "target", neps, in_path);
        deps = malloc(sizeof(float) * neps);
        if (!deps) die("deps", "out of memory");
        printf("LoRA %s rank %d: %d adapters, %zu parameters\n", targets, rank, u->nloras, u->lora_nparams);
    }
    double load_rss = rss_mb(), load_peak = peak_rss_mb();
    int step_peak_known = reset_peak_rss() == 0;
    if (unet_alloc_acts(u, B, h, w, Tc, train)) die("activations", u->err);
    printf("activation arena %.0f MB (train=%d), %d threads\n",
           unet_acts_floats(u) * 4.0 / (1 << 20), train, threads);

    double best = 1e30, best_f = 1e30, best_b = 1e30, loss = 0;
    /* bf16: each rep runs the fp32 step (kept in eps32 / g32), then the
     * bf16 one */
    double best32 = 1e30, best32_f = 1e30, best32_b = 1e30, cpu = 1e30, cpu32 = 1e30;
    float *eps32 = NULL, *g32 = NULL;
    size_t ng = 0;
    for (int i = 0; i < u->nloras; i++) ng += (size_t)u->loras[i].L.r * (u->loras[i].L.in + u->loras[i].L.out);
    if (bf16) {
        eps32 = malloc(sizeof(float) * neps);
        g32 = malloc(sizeof(float) * (ng ? ng : 1));
        if (!eps32 || !g32) die("eps", "out of memory");
    }
    int npass = bf16 ? 2 : 1;
    for (int it = 0; it < (reps + 1) * npass; it++) {
        int rep = it / npass, pass = bf16 && it % 2 == 0;    /* rep 0 warms up; pass 1: fp32 */
        if (bf16) gemm_set_compute(pass ? GEMM_F32 : GEMM_BF16);
        prof_reset();
        double a = now(), ca = cpu_now();
        if (unet_forward(u, eps, x, t, ctx, B, h, w, Tc)) die("forward", u->err);
        double b = now();
        if (train) {
            /* loss = mean((eps - target)^2)  =>  dL/deps = 2 (eps - target) / n */
            loss = 0;
            for (size_t i = 0; i < neps; i++) {
                double d = eps[i] - target[i];
                loss += d * d;
                deps[i] = (float)(2.0 * d / neps);
            }
            loss /= neps;
            unet_zero_lora_grads(u);
            if (unet_backward(u, deps, NULL, NULL)) die("backward", u->err);
        }
        double c = now(), cc = cpu_now() - ca;
        printf("  %s %d%s: %.3f s (CPU %.3f s)%s", rep ? "run" : "warm-up", rep, !bf16 ? "" : pass ? " fp32" : " bf16",
               c - a, cc, train ? "" : "\n");
        if (train) printf(" (forward %.3f s, backward %.3f s, loss %.6f)\n", b - a, c - b, loss);
        fflush(stdout);
        if (prof_on && rep == reps) {
            char title[64];
            snprintf(title, sizeof title, "%s step, %s", mode, pass || !bf16 ? "fp32" : "--compute bf16");
            prof_print(stdout, title, c - a);
        }
        if (bf16 && pass) {
            if (rep && c - a < best32) { best32 = c - a; best32_f = b - a; best32_b = c - b; }
            if (rep && cc < cpu32) cpu32 = cc;
            memcpy(eps32, eps, sizeof(float) * neps);
            for (int i = 0, o = 0; train && i < u->nloras; i++) {
                lora_t *L = &u->loras[i].L;
                memcpy(g32 + o, L->dA, sizeof(float) * L->r * L->in);
                o += L->r * L->in;
                memcpy(g32 + o, L->dB, sizeof(float) * L->out * L->r);
                o += L->out * L->r;
            }
            continue;
        }
        if (rep && c - a < best) { best = c - a; best_f = b - a; best_b = c - b; }
        if (rep && cc < cpu) cpu = cc;
    }
    /* the bf16 step against the fp32 one: relative L2, eps and the LoRA
     * gradients (all together, and the worst single tensor) */
    double eps_l2 = 0, grad_l2 = 0, grad_worst = 0;
    char worst_name[160] = "";
    if (bf16) {
        double d = 0, n = 0, dg = 0, ngs = 0;
        for (size_t i = 0; i < neps; i++) {
            d += ((double)eps[i] - eps32[i]) * ((double)eps[i] - eps32[i]);
            n += (double)eps32[i] * eps32[i];
        }
        eps_l2 = n > 0 ? sqrt(d / n) : sqrt(d);
        for (int i = 0, o = 0; train && i < u->nloras; i++) {
            lora_t *L = &u->loras[i].L;
            for (int wb = 0; wb < 2; wb++) {
                const float *g = wb ? L->dB : L->dA;
                int cnt = wb ? L->out * L->r : L->r * L->in;
                double td = 0, tn = 0;
                for (int k = 0; k < cnt; k++) {
                    double e = (double)g[k] - g32[o + k];
                    td += e * e;
                    tn += (double)g32[o + k] * g32[o + k];
                }
                o += cnt;
                dg += td;
                ngs += tn;
                double r = tn > 0 ? sqrt(td / tn) : sqrt(td);
                if (r > grad_worst) {
                    grad_worst = r;
                    snprintf(worst_name, sizeof worst_name, "%s.%s", u->loras[i].name, wb ? "B" : "A");
                }
            }
        }
        grad_l2 = ngs > 0 ? sqrt(dg / ngs) : sqrt(dg);
        gemm_set_compute(GEMM_F32);
    }

    st_writer *wr = st_writer_new();
    int64_t shp[4] = {B, u->cfg.out_channels, h, w};
    int rc = st_writer_add_f32(wr, "eps", ST_F32, 4, shp, eps);
    for (int i = 0; train && rc == 0 && i < u->nloras; i++) {
        lora_t *L = &u->loras[i].L;
        char name[160];
        int64_t sa[2] = {L->r, L->in}, sb[2] = {L->out, L->r};
        snprintf(name, sizeof name, "grad.%s.A", u->loras[i].name);
        rc = st_writer_add_f32(wr, name, ST_F32, 2, sa, L->dA);
        snprintf(name, sizeof name, "grad.%s.B", u->loras[i].name);
        if (rc == 0) rc = st_writer_add_f32(wr, name, ST_F32, 2, sb, L->dB);
    }
    if (rc || st_writer_save(wr, out_path, err)) die(out_path, rc ? "cannot add a tensor" : err);
    st_writer_free(wr);

    double step_peak = step_peak_known ? peak_rss_mb() : -1;
    double peak = step_peak > load_peak ? step_peak : load_peak;
    printf("best of %d: %.3f s", reps, best);
    if (train) printf(" (forward %.3f s + backward %.3f s)", best_f, best_b);
    printf(", peak RSS %.0f MB (after loading %.0f MB, peak during the steps %.0f MB)\n", peak, load_rss, step_peak);
    printf("result %s %s time_s=%.4f fwd_s=%.4f bwd_s=%.4f peak_rss_mb=%.0f load_rss_mb=%.0f "
           "step_peak_rss_mb=%.0f load_peak_rss_mb=%.0f threads=%d load_s=%.1f",
           bf16 ? "sdlora-bf16" : wdt == WEIGHT_F16 ? "sdlora-fp16" : "sdlora", mode, best,
           train ? best_f : best, train ? best_b : 0.0, peak, load_rss, step_peak, load_peak, threads, load_s);
    if (bf16)
        printf(" f32_time_s=%.4f f32_fwd_s=%.4f f32_bwd_s=%.4f cpu_s=%.3f f32_cpu_s=%.3f eps_rel_l2=%.3e "
               "grad_rel_l2=%.3e grad_worst_rel_l2=%.3e grad_worst=%s kernel=%s",
               best32, train ? best32_f : best32, train ? best32_b : 0.0, cpu, cpu32, eps_l2, grad_l2, grad_worst,
               worst_name[0] ? worst_name : "-", gemm_bf16_kernel_name());
    printf("\n");

    free(x); free(t); free(ctx); free(eps); free(target); free(deps); free(eps32); free(g32);
    st_close(&inp);
    sd_model_free(&m);
    return 0;
}

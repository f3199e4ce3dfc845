/* gpu_check.c: the GPU path against the CPU, and its speed (tools/gpu_check.sh).
 *
 *   gpu_check tiny DIR          the UNet of DIR (models/tiny/unet) on both: LoRA
 *                               "transformer" rank 4 with dropout, B random; two
 *                               training steps (eps, every dA/dB, dx, dctx), one
 *                               checkpointed, an inference forward, and a step with
 *                               the weights held as fp16; rel err <= 1e-4 each
 *   gpu_check tiny-vae-clip DIR the VAE and text encoder of DIR (models/tiny) on both:
 *                               encode (mean, logvar) and decode of a batch of 2, and
 *                               the text encoder's forward with LoRA (B random),
 *                               fp32 and fp16-held weights; rel err <= 1e-4 each
 *   gpu_check sd15 [SIDE [TSIDE]] SD1.5's architecture (859,520,964 parameters) made in
 *                               memory with random weights (no file, no network):
 *                               one training step compared with the CPU at SIDE x SIDE
 *                               latents (default 16), then on the device alone at
 *                               64x64 (512^2 images), batch 1, 77 tokens, LoRA "attn"
 *                               rank 4: a training step (and with gradient
 *                               checkpointing) and a batch-2 inference forward (one
 *                               cfg step of a sampler), best of 3, and the device
 *                               memory in use (TSIDE: that side instead of 64)
 *   gpu_check cmp-lora A B TOL  two LoRA files: same modules, A and B within TOL
 *                               (max |a - b| / max |b| over each file)
 *
 * rel err = max |dev - cpu| / max |cpu| over the tensor. Exit status 1 when a
 * comparison fails. Built by `make CUDA=1 build-cuda/gpu_check` (BUILD=build-cuda);
 * in a build without CUDA (or with GPU_CHECK_HOST=1) the "device" is the CPU's
 * own table on memory of its own, which checks this program, not a GPU. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "unet.h"
#include "backend.h"
#include "vae.h"
#include "clip.h"
#include "ddpm.h"
#include "cuda/cuda.h"

static int g_fail;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static const nn_ops *device_ops(void) {
#ifdef SDLORA_CUDA
    if (!getenv("GPU_CHECK_HOST")) return nn_ops_cuda();
#endif
    static nn_ops t;
    t = nn_ops_cpu;
    t.device = 1;
    t.name = "the CPU standing in for a device";
    return &t;
}

static double mem_used_mib(void) {
#ifdef SDLORA_CUDA
    if (!getenv("GPU_CHECK_HOST")) return cuda_mem_used() / 1048576.0;
#endif
    return 0.0;
}

static double rel_err(const float *a, const float *b, size_t n) {
    double maxd = 0, maxb = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= maxd)) maxd = d;               /* NaN propagates */
        if (fabs((double)b[i]) > maxb) maxb = fabs((double)b[i]);
    }
    return maxb > 0 ? maxd / maxb : maxd;
}

static void expect(const char *what, double err, double tol) {
    int ok = err <= tol;
    printf("%s %-60s rel err %.3g (tol %g)\n", ok ? "ok  " : "FAIL", what, err, tol);
    if (!ok) g_fail++;
}

static void die(const char *what, const char *why) {
    fprintf(stderr, "error: %s: %s\n", what, why);
    exit(1);
}

static float *randv(size_t n, float lo, float hi, uint64_t seed) {
    float *v = malloc(sizeof(float) * (n ? n : 1));
    if (!v) die("gpu_check", "out of memory");
    rng_t r;
    rng_seed(&r, seed);
    for (size_t i = 0; i < n; i++) v[i] = lo + (hi - lo) * rng_uniform(&r);
    return v;
}

/* LoRA B random (it starts at zero, which would make every dA zero) */
static void randomize_b(unet_t *u) {
    rng_t r;
    rng_seed(&r, 5);
    for (int k = 0; k < u->nloras; k++) {
        lora_t *L = &u->loras[k].L;
        for (size_t i = 0; i < (size_t)L->out * L->r; i++) L->B[i] = 0.05f * (rng_uniform(&r) - 0.5f);
    }
}

/* one training step (forward, backward) or an inference forward on both
 * UNets, compared; dev is on the device, cpu is not */
static void compare(const char *label, unet_t *cpu, unet_t *dev, int B, int h, int w, int Tc, int train, double tol) {
    const unet_config *c = &cpu->cfg;
    size_t nx = (size_t)B * c->in_channels * h * w, ne = (size_t)B * c->out_channels * h * w;
    size_t nc = (size_t)B * Tc * c->cross_dim;
    float *x = randv(nx, -1, 1, 201), *ctx = randv(nc, -1, 1, 202), *deps = randv(ne, -1, 1, 203);
    float *t = randv(B, 0, 999, 204);
    float *ec = malloc(sizeof(float) * ne), *ed = malloc(sizeof(float) * ne);
    float *dxc = malloc(sizeof(float) * nx), *dxd = malloc(sizeof(float) * nx);
    float *dcc = malloc(sizeof(float) * nc), *dcd = malloc(sizeof(float) * nc);
    char name[200];
    if (!ec || !ed || !dxc || !dxd || !dcc || !dcd) die("gpu_check", "out of memory");
    if (unet_alloc_acts(cpu, B, h, w, Tc, train)) die("cpu UNet", cpu->err);
    if (unet_alloc_acts(dev, B, h, w, Tc, train)) die("device UNet", dev->err);
    unet_zero_lora_grads(cpu);
    unet_zero_lora_grads(dev);
    if (unet_forward(cpu, ec, x, t, ctx, B, h, w, Tc)) die("cpu UNet", cpu->err);
    if (unet_forward(dev, ed, x, t, ctx, B, h, w, Tc)) die("device UNet", dev->err);
    snprintf(name, sizeof name, "%s: eps", label);
    expect(name, rel_err(ed, ec, ne), tol);
    if (train) {
        if (unet_backward(cpu, deps, dxc, dcc)) die("cpu UNet", cpu->err);
        if (unet_backward(dev, deps, dxd, dcd) || unet_lora_grads_download(dev)) die("device UNet", dev->err);
        snprintf(name, sizeof name, "%s: LoRA dA, dB (%zu)", label, cpu->lora_nparams);
        expect(name, rel_err(dev->lora_grads, cpu->lora_grads, cpu->lora_nparams), tol);
        snprintf(name, sizeof name, "%s: dx", label);
        expect(name, rel_err(dxd, dxc, nx), tol);
        snprintf(name, sizeof name, "%s: dctx", label);
        expect(name, rel_err(dcd, dcc, nc), tol);
    }
    free(x); free(ctx); free(deps); free(t); free(ec); free(ed); free(dxc); free(dxd); free(dcc); free(dcd);
}

static void check_tiny(const char *dir, weight_dtype dt) {
    unet_t cpu, dev;
    char err[UNET_ERR_LEN];
    if (unet_load_diffusers_dtype(&cpu, dir, dt, err) || unet_load_diffusers_dtype(&dev, dir, dt, err)) die(dir, err);
    if (unet_add_lora(&cpu, "transformer", 4, 4.0f, 0.1f, 7)) die(dir, cpu.err);
    if (unet_add_lora(&dev, "transformer", 4, 4.0f, 0.1f, 7)) die(dir, dev.err);
    randomize_b(&cpu);
    randomize_b(&dev);
    if (unet_to_device(&dev, device_ops())) die(dir, dev.err);
    printf("tiny UNet (%s, weights held as %s), on %s\n", dir, weight_dtype_name(dt), device_ops()->name);
    if (dt == WEIGHT_F16) {
        compare("tiny fp16, training step", &cpu, &dev, 2, 16, 16, 77, 1, 1e-4);
    } else {
        compare("tiny, training step 1", &cpu, &dev, 2, 16, 16, 77, 1, 1e-4);
        compare("tiny, training step 2", &cpu, &dev, 2, 16, 16, 77, 1, 1e-4);
        compare("tiny, checkpointed step", &cpu, &dev, 2, 16, 16, 77, 2, 1e-4);
        compare("tiny, inference", &cpu, &dev, 2, 16, 16, 77, 0, 1e-4);
    }
    unet_free(&cpu);
    unet_free(&dev);
}

/* models/tiny's VAE (encode, decode) and text encoder (forward with LoRA) */
static void check_tiny_vae_clip(const char *dir, weight_dtype dt) {
    char path[1024], err[VAE_ERR_LEN > ST_ERR_LEN ? VAE_ERR_LEN : ST_ERR_LEN];
    const char *wn = weight_dtype_name(dt);
    vae_t vc, vd;
    snprintf(path, sizeof path, "%s/vae", dir);
    if (vae_load_diffusers_dtype(&vc, path, dt, err) || vae_load_diffusers_dtype(&vd, path, dt, err)) die(path, err);
    if (vae_to_device(&vd, device_ops())) die(path, vd.err);
    int B = 2, H = 64, W = 48, h = vae_latent_side(&vc.cfg, H), w = vae_latent_side(&vc.cfg, W);
    size_t ni = (size_t)B * 3 * H * W, nl = (size_t)B * vc.cfg.latent_channels * h * w;
    float *img = randv(ni, -1, 1, 301), *mc = malloc(4 * nl), *md = malloc(4 * nl), *lc = malloc(4 * nl), *ld = malloc(4 * nl);
    float *oc = malloc(4 * ni), *od = malloc(4 * ni);
    if (vae_alloc_acts(&vc, B, H, W, 0) || vae_alloc_acts(&vd, B, H, W, 0)) die(path, vc.err[0] ? vc.err : vd.err);
    if (vae_encode(&vc, mc, lc, img, B, H, W) || vae_encode(&vd, md, ld, img, B, H, W)) die(path, vc.err[0] ? vc.err : vd.err);
    char label[128];
    snprintf(label, sizeof label, "tiny VAE (%s), encode mean", wn); expect(label, rel_err(md, mc, nl), 1e-4);
    snprintf(label, sizeof label, "tiny VAE (%s), encode logvar", wn); expect(label, rel_err(ld, lc, nl), 1e-4);
    if (vae_decode_latents(&vc, oc, mc, B, h, w) || vae_decode_latents(&vd, od, mc, B, h, w)) die(path, vc.err[0] ? vc.err : vd.err);
    snprintf(label, sizeof label, "tiny VAE (%s), decode", wn); expect(label, rel_err(od, oc, ni), 1e-4);
    free(img); free(mc); free(md); free(lc); free(ld); free(oc); free(od);
    vae_free(&vc); vae_free(&vd);

    clip_t cc, cd;
    snprintf(path, sizeof path, "%s/text_encoder", dir);
    if (clip_load_hf_dtype(&cc, path, dt, err) || clip_load_hf_dtype(&cd, path, dt, err)) die(path, err);
    if (clip_add_lora(&cc, 4, 4.0f, 0.0f, 11, err) || clip_add_lora(&cd, 4, 4.0f, 0.0f, 11, err)) die(path, err);
    rng_t r;
    rng_seed(&r, 9);
    for (size_t i = 0; i < cc.num_lora_params; i++) cc.lora_params[i] = cd.lora_params[i] = 0.1f * (rng_uniform(&r) - 0.5f);
    if (clip_to_device(&cd, device_ops())) die(path, cd.err);
    int T = cc.config.max_pos;
    size_t n = (size_t)B * T * cc.config.hidden_size;
    int *ids = malloc(sizeof(int) * B * T);
    for (int i = 0; i < B * T; i++) ids[i] = (int)(rng_u64(&r) % (uint64_t)cc.config.vocab_size);
    float *xc = malloc(4 * n), *xd = malloc(4 * n);
    if (clip_forward(&cc, xc, ids, B, T, 1) || clip_forward(&cd, xd, ids, B, T, 1)) die(path, cc.err[0] ? cc.err : cd.err);
    snprintf(label, sizeof label, "tiny text encoder (%s), forward with LoRA", wn); expect(label, rel_err(xd, xc, n), 1e-4);
    free(ids); free(xc); free(xd);
    clip_free(&cc); clip_free(&cd);
}

/* SD1.5's architecture with random weights: matrices U(-1/sqrt(fan_in),
 * 1/sqrt(fan_in)) (torch's default scale), biases small, norm scales 1 */
static void build_sd15(unet_t *u, weight_dtype dt) {
    char err[UNET_ERR_LEN];
    unet_config c;
    if (unet_config_sd15(&c, err)) die("SD1.5 config", err);   /* unet.c's, as tests/test_unet.c */
    if (unet_build_dtype(u, &c, dt, err)) die("SD1.5 UNet", err);
    rng_t r;
    rng_seed(&r, 1234);
    size_t big = 1;
    for (int i = 0; i < u->ntable; i++) if (u->table[i].numel > big) big = u->table[i].numel;
    float *tmp = malloc(sizeof(float) * big);
    if (!tmp) die("gpu_check", "out of memory");
    for (int i = 0; i < u->ntable; i++) {
        unet_param *p = &u->table[i];
        int is_norm = p->ndim == 1 && strstr(p->name, "norm") && strstr(p->name, ".weight");
        size_t fan_in = p->ndim >= 2 ? p->numel / (size_t)p->shape[0] : 1;
        float a = p->ndim >= 2 ? 1.0f / sqrtf((float)fan_in) : 0.02f;
        for (size_t k = 0; k < p->numel; k++)
            tmp[k] = is_norm ? 1.0f : a * (2.0f * rng_uniform(&r) - 1.0f);
        unet_param_set(u, i, tmp);                 /* rounded to fp16 when held so */
    }
    free(tmp);
    if (unet_add_lora(u, "attn", 4, 4.0f, 0.0f, 7)) die("SD1.5 LoRA", u->err);
    randomize_b(u);
}

/* the best of 3 (after one to warm up) of a training step on the device:
 * zero the grads, forward, the loss and its gradient (on the host), backward,
 * the LoRA gradients down (which waits for the device) */
static double time_train_step(unet_t *u, int h, int w, int Tc, float *loss_out) {
    const unet_config *c = &u->cfg;
    size_t ne = (size_t)c->out_channels * h * w, nc = (size_t)Tc * c->cross_dim;
    float *x = randv(ne, -1, 1, 301), *ctx = randv(nc, -1, 1, 302), *target = randv(ne, -1, 1, 303);
    float t = 500.0f, *eps = malloc(sizeof(float) * ne), *deps = malloc(sizeof(float) * ne);
    double best = 1e30;
    for (int rep = 0; rep < 4; rep++) {
        double t0 = now();
        unet_zero_lora_grads(u);
        if (unet_forward(u, eps, x, &t, ctx, 1, h, w, Tc)) die("device UNet", u->err);
        *loss_out = mse_loss_forward(eps, target, NULL, 1, ne);
        memset(deps, 0, sizeof(float) * ne);
        mse_loss_backward(deps, eps, target, NULL, 1.0f, 1, ne);
        if (unet_backward(u, deps, NULL, NULL) || unet_lora_grads_download(u)) die("device UNet", u->err);
        double dt = now() - t0;
        if (rep > 0 && dt < best) best = dt;
    }
    free(x); free(ctx); free(target); free(eps); free(deps);
    return best;
}

static double time_infer(unet_t *u, int B, int h, int w, int Tc) {
    const unet_config *c = &u->cfg;
    size_t ne = (size_t)B * c->out_channels * h * w, nc = (size_t)B * Tc * c->cross_dim;
    float *x = randv(ne, -1, 1, 311), *ctx = randv(nc, -1, 1, 312), t[2] = {500.0f, 500.0f};
    float *eps = malloc(sizeof(float) * ne);
    double best = 1e30;
    for (int rep = 0; rep < 4; rep++) {
        double t0 = now();
        if (unet_forward(u, eps, x, t, ctx, B, h, w, Tc)) die("device UNet", u->err);
        double dt = now() - t0;
        if (rep > 0 && dt < best) best = dt;
    }
    free(x); free(ctx); free(eps);
    return best;
}

static void check_sd15(int side, int tside) {
    unet_t cpu, dev;
    double t0 = now();
    build_sd15(&cpu, WEIGHT_F32);
    build_sd15(&dev, WEIGHT_F32);
    printf("SD1.5 architecture, random weights: %zu parameters, %d adapters (\"attn\" rank 4), built in %.1f s\n",
           dev.nparams, dev.nloras, now() - t0);
    double m0 = mem_used_mib();
    if (unet_to_device(&dev, device_ops())) die("SD1.5 UNet", dev.err);
    printf("device: %s; memory in use: %.0f MiB before the weights, %.0f MiB with them\n", device_ops()->name,
           m0, mem_used_mib());
    if (side > 0) {
        char label[64];
        snprintf(label, sizeof label, "SD1.5 %dx%d, training step", side, side);
        t0 = now();
        compare(label, &cpu, &dev, 1, side, side, 77, 1, 1e-4);
        printf("  (compared in %.1f s)\n", now() - t0);
    }
    unet_free(&cpu);
    /* 512^2: 64x64 latents, batch 1, 77 tokens */
    int h = tside, w = tside, Tc = 77;
    float loss = 0;
    if (unet_alloc_acts(&dev, 1, h, w, Tc, 1)) die("SD1.5 UNet", dev.err);
    double ts = time_train_step(&dev, h, w, Tc, &loss);
    printf("result SD1.5 %dx%d latents, batch 1, LoRA training step (fp32): %.1f ms (loss %.4f); arena %.0f MiB; "
           "device memory in use %.0f MiB\n", h, w, ts * 1e3, loss, unet_acts_floats(&dev) * 4 / 1048576.0, mem_used_mib());
    if (unet_alloc_acts(&dev, 1, h, w, Tc, 2)) die("SD1.5 UNet", dev.err);
    ts = time_train_step(&dev, h, w, Tc, &loss);
    printf("result SD1.5 %dx%d latents, batch 1, LoRA training step, gradient checkpointing (fp32): %.1f ms; arena %.0f MiB\n",
           h, w, ts * 1e3, unet_acts_floats(&dev) * 4 / 1048576.0);
    if (unet_alloc_acts(&dev, 2, h, w, Tc, 0)) die("SD1.5 UNet", dev.err);
    double ti = time_infer(&dev, 2, h, w, Tc);
    printf("result SD1.5 %dx%d latents, inference forward at batch 2 (one cfg step): %.1f ms, so a 20-step sample's UNet "
           "about %.2f s\n", h, w, ti * 1e3, 20 * ti);
    printf("result device memory in use with fp32 weights (every allocation is made once and kept: the peak, "
           "with the CUDA context and the layers' scratch): %.0f MiB\n", mem_used_mib());
    unet_free(&dev);
    /* the memory goal of issue 15: fp16-held weights with gradient checkpointing */
    build_sd15(&dev, WEIGHT_F16);
    if (unet_to_device(&dev, device_ops())) die("SD1.5 UNet", dev.err);
    if (unet_alloc_acts(&dev, 1, h, w, Tc, 2)) die("SD1.5 UNet", dev.err);
    ts = time_train_step(&dev, h, w, Tc, &loss);
    printf("result SD1.5 %dx%d latents, batch 1, LoRA training step, fp16-held weights, gradient checkpointing: "
           "%.1f ms; device memory in use %.0f MiB (the fp32 run's scratch still held)\n", h, w, ts * 1e3, mem_used_mib());
#ifdef SDLORA_CUDA
    /* --compute bf16 and fp16 (issue 15's goal: <= 100 ms in bf16 on an
     * H100/H200-class GPU), then the peak sdlora itself held (cuda_mem_peak;
     * test-cuda's counted budget for this run: 3.35 GB with a 768 MiB
     * context allowance) beside what the driver reports in use */
    static const int modes[] = {CUDA_COMPUTE_BF16, CUDA_COMPUTE_F16};
    static const char *mname[] = {"bf16", "fp16"};
    for (int i = 0; i < 2; i++) {
        cuda_set_compute(modes[i]);
        ts = time_train_step(&dev, h, w, Tc, &loss);
        printf("result SD1.5 %dx%d latents, batch 1, LoRA training step, fp16-held weights, gradient checkpointing, "
               "--compute %s: %.1f ms (loss %.4f)\n", h, w, mname[i], ts * 1e3, loss);
    }
    cuda_set_compute(CUDA_COMPUTE_F32);
    printf("result peak device memory held by sdlora over this run: %.0f MiB (cuda_mem_peak, CUDA context excluded); "
           "in use now by the driver's count: %.0f MiB\n", (double)cuda_mem_peak() / 1048576.0, mem_used_mib());
#endif
    unet_free(&dev);
}

static void cmp_lora(const char *a, const char *b, double tol) {
    lora_file fa, fb;
    char err[ST_ERR_LEN];
    if (lora_file_load(a, &fa, err)) die(a, err);
    if (lora_file_load(b, &fb, err)) die(b, err);
    double num = 0, den = 0;
    int missing = fa.n != fb.n;
    for (int i = 0; i < fb.n; i++) {
        const lora_entry *eb = &fb.e[i], *ea = lora_file_find(&fa, eb->name);
        if (!ea || ea->r != eb->r || ea->in != eb->in || ea->out != eb->out) { missing = 1; continue; }
        for (int pass = 0; pass < 2; pass++) {
            const float *pa = pass ? ea->B : ea->A, *pb = pass ? eb->B : eb->A;
            size_t n = (size_t)eb->r * (pass ? eb->out : eb->in);
            for (size_t k = 0; k < n; k++) {
                double d = fabs((double)pa[k] - pb[k]);
                if (!(d <= num)) num = d;
                if (fabs((double)pb[k]) > den) den = fabs((double)pb[k]);
            }
        }
    }
    if (missing) { printf("FAIL %s and %s: not the same modules and shapes\n", a, b); g_fail++; }
    char name[300];
    snprintf(name, sizeof name, "LoRA %s vs %s (%d modules)", a, b, fb.n);
    expect(name, den > 0 ? num / den : num, tol);
    lora_file_free(&fa);
    lora_file_free(&fb);
}

int main(int argc, char **argv) {
    if (argc >= 3 && strcmp(argv[1], "tiny") == 0) {
        check_tiny(argv[2], WEIGHT_F32);
        check_tiny(argv[2], WEIGHT_F16);
    }
    else if (argc >= 3 && strcmp(argv[1], "tiny-vae-clip") == 0) {
        printf("tiny VAE and text encoder (%s), on %s\n", argv[2], device_ops()->name);
        check_tiny_vae_clip(argv[2], WEIGHT_F32);
        check_tiny_vae_clip(argv[2], WEIGHT_F16);
    }
    else if (argc >= 2 && strcmp(argv[1], "sd15") == 0) check_sd15(argc >= 3 ? atoi(argv[2]) : 16, argc >= 4 ? atoi(argv[3]) : 64);
    else if (argc >= 5 && strcmp(argv[1], "cmp-lora") == 0) cmp_lora(argv[2], argv[3], atof(argv[4]));
    else {
        fprintf(stderr, "usage: gpu_check tiny DIR | tiny-vae-clip DIR | sd15 [SIDE [TSIDE]] | cmp-lora A B TOL\n");
        return 2;
    }
    if (g_fail) printf("%d comparison(s) FAILED\n", g_fail);
    return g_fail ? 1 : 0;
}

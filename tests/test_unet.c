/* test_unet.c: UNet2DConditionModel against diffusers and peft.
 *
 * Fixtures (tools/make_unet_fixtures.py): two tiny random-weight models,
 *   unet_a: block_out (8, 16), 1 layer per block, 2 heads, 1x1-conv projections
 *   unet_b: block_out (8, 8, 8), 2 layers, heads (2, 4, 8) per block,
 *           transformer_layers_per_block (1, 2, 1), linear projections,
 *           freq_shift 1, flip_sin_to_cos False
 * and for each: inputs, output, dL/dx and dL/dctx for L = sum(out * dout), and
 * the same with peft LoRA adapters (output, every lora_A / lora_B gradient).
 * Plus finite-difference checks of the analytic gradient, the arena's
 * inference mode, shapes, and loading / config errors.
 * Full fine-tuning (unet_alloc_grads): every parameter's gradient of unet_a
 * against autograd's (unet_a_grads.safetensors), checkpointing and LoRA
 * alongside, and finite differences on single weights and whole tensors. */
#include <unistd.h>
#include <sys/stat.h>
#include "testutil.h"
#include "unet.h"
#include "json.h"

#define OUT_TOL 1e-4
#define GRAD_TOL 1e-3
#ifndef FD_H_ENTRY
#define FD_H_ENTRY 3e-3f     /* finite-difference steps of the full-grads checks */
#define FD_H_DIR 1e-4f
#endif
#define FD_ENTRY_TOL 1e-2
#define FD_ALL_TOL 5e-3

static void load(unet_t *u, const char *name) {
    char err[UNET_ERR_LEN], dir[256];
    snprintf(dir, sizeof dir, FIXTURE_DIR "%s", name);
    ck_assert_msg(unet_load_diffusers(u, dir, err) == 0, "%s", err);
}

typedef struct {
    st_file f;
    float *x, *t, *ctx, *dout;
    int B, C, h, w, Tc, cd;
} io_t;

static void io_open(io_t *io, const char *name, const unet_t *u) {
    fx_open(&io->f, name);
    const st_tensor *x = st_find(&io->f, "x"), *ctx = st_find(&io->f, "ctx");
    ck_assert(x && ctx && x->ndim == 4 && ctx->ndim == 3);
    io->B = (int)x->shape[0]; io->C = (int)x->shape[1];
    io->h = (int)x->shape[2]; io->w = (int)x->shape[3];
    io->Tc = (int)ctx->shape[1]; io->cd = (int)ctx->shape[2];
    ck_assert_int_eq(io->C, u->cfg.in_channels);
    ck_assert_int_eq(io->cd, u->cfg.cross_dim);
    io->x = fx_get(&io->f, "x", 0);
    io->t = fx_get(&io->f, "t", (size_t)io->B);
    io->ctx = fx_get(&io->f, "ctx", 0);
    io->dout = fx_get(&io->f, "dout", (size_t)io->B * u->cfg.out_channels * io->h * io->w);
}

static void io_close(io_t *io) {
    free(io->x); free(io->t); free(io->ctx); free(io->dout);
    st_close(&io->f);
}

static size_t nout_of(const io_t *io, const unet_t *u) {
    return (size_t)io->B * u->cfg.out_channels * io->h * io->w;
}

/* compare a tensor with the fixture's; returns rel_err */
static double cmp(const st_file *f, const char *name, const float *got, size_t n, double tol) {
    float *ref = fx_get(f, name, n);
    double e = rel_err(got, ref, n);
    free(ref);
    printf("  %-40s rel_err %.3g\n", name, e);
    ck_assert_msg(e < tol, "%s: rel_err %g >= %g", name, e, tol);
    return e;
}

/* ---- the plain model: output, dx, dctx ---------------------------------- */

static void check_model(const char *model, const char *iofile) {
    unet_t u;
    io_t io;
    load(&u, model);
    io_open(&io, iofile, &u);
    size_t no = nout_of(&io, &u), nx = (size_t)io.B * io.C * io.h * io.w;
    size_t nc = (size_t)io.B * io.Tc * io.cd;
    float *out = malloc(sizeof(float) * no), *dx = malloc(sizeof(float) * nx);
    float *dctx = malloc(sizeof(float) * nc), *scratch_out = malloc(sizeof(float) * no);

    printf("%s:\n", model);
    ck_assert_msg(unet_alloc_acts(&u, io.B, io.h, io.w, io.Tc, 1) == 0, "%s", u.err);
    ck_assert_msg(unet_forward(&u, out, io.x, io.t, io.ctx, io.B, io.h, io.w, io.Tc) == 0, "%s", u.err);
    cmp(&io.f, "out", out, no, OUT_TOL);
    ck_assert_msg(unet_backward(&u, io.dout, dx, dctx) == 0, "%s", u.err);
    cmp(&io.f, "dx", dx, nx, GRAD_TOL);
    cmp(&io.f, "dctx", dctx, nc, GRAD_TOL);

    /* gradient checkpointing: the same numbers, bit for bit, in less memory */
    size_t train_floats = unet_acts_floats(&u);
    float *dx2 = malloc(sizeof(float) * nx), *dctx2 = malloc(sizeof(float) * nc);
    ck_assert(unet_alloc_acts(&u, io.B, io.h, io.w, io.Tc, 2) == 0);
    ck_assert(unet_forward(&u, scratch_out, io.x, io.t, io.ctx, io.B, io.h, io.w, io.Tc) == 0);
    ck_assert(unet_backward(&u, io.dout, dx2, dctx2) == 0);
    ck_assert(memcmp(dx, dx2, sizeof(float) * nx) == 0 && memcmp(dctx, dctx2, sizeof(float) * nc) == 0);
    printf("  arena floats: checkpointed %zu\n", unet_acts_floats(&u));
    ck_assert(unet_acts_floats(&u) < train_floats);
    free(dx2); free(dctx2);

    /* inference mode: same numbers, less memory */
    float *out2 = malloc(sizeof(float) * no);
    ck_assert(unet_alloc_acts(&u, io.B, io.h, io.w, io.Tc, 0) == 0);
    ck_assert(unet_forward(&u, out2, io.x, io.t, io.ctx, io.B, io.h, io.w, io.Tc) == 0);
    ck_assert_msg(memcmp(out, out2, sizeof(float) * no) == 0, "inference forward differs from training forward");
    printf("  arena floats: train %zu, inference %zu\n", train_floats, unet_acts_floats(&u));
    ck_assert(unet_acts_floats(&u) < train_floats);
    /* and backward refuses to run on it */
    ck_assert(unet_backward(&u, io.dout, dx, dctx) != 0);

    free(out); free(out2); free(dx); free(dctx); free(scratch_out);
    io_close(&io);
    unet_free(&u);
}

START_TEST(test_model_a) { check_model("unet_a", "unet_a_io.safetensors"); }
END_TEST

START_TEST(test_model_b) { check_model("unet_b", "unet_b_io.safetensors"); }
END_TEST

/* ---- LoRA against peft --------------------------------------------------- */

static void check_lora(const char *model, const char *iofile, const char *targets) {
    unet_t u;
    io_t io;
    char name[256];
    load(&u, model);
    io_open(&io, iofile, &u);
    ck_assert_msg(unet_add_lora(&u, targets, 2, 4.0f, 0.0f, 7) == 0, "%s", u.err);

    /* the same set of modules as peft's target_modules, with peft's A and B */
    int nfix = 0;
    for (int i = 0; i < io.f.ntensors; i++) {
        const char *tn = io.f.tensors[i].name;
        size_t tl = strlen(targets);
        if (strncmp(tn, targets, tl) == 0 && strncmp(tn + tl, ".A.", 3) == 0) {
            nfix++;
            unet_lora *ul = unet_find_lora(&u, tn + tl + 3);
            ck_assert_msg(ul != NULL, "peft adapter %s has no counterpart", tn + tl + 3);
        }
    }
    printf("%s LoRA %s: %d adapters (peft %d)\n", model, targets, u.nloras, nfix);
    ck_assert_int_eq(u.nloras, nfix);
    for (int i = 0; i < u.nloras; i++) {
        lora_t *L = &u.loras[i].L;
        float *A, *B;
        snprintf(name, sizeof name, "%s.A.%s", targets, u.loras[i].name);
        A = fx_get(&io.f, name, (size_t)L->r * L->in);
        snprintf(name, sizeof name, "%s.B.%s", targets, u.loras[i].name);
        B = fx_get(&io.f, name, (size_t)L->out * L->r);
        memcpy(L->A, A, sizeof(float) * L->r * L->in);
        memcpy(L->B, B, sizeof(float) * L->out * L->r);
        free(A); free(B);
    }

    size_t no = nout_of(&io, &u), nx = (size_t)io.B * io.C * io.h * io.w;
    size_t nc = (size_t)io.B * io.Tc * io.cd;
    float *out = malloc(sizeof(float) * no), *dx = malloc(sizeof(float) * nx);
    float *dctx = malloc(sizeof(float) * nc);
    ck_assert_msg(unet_alloc_acts(&u, io.B, io.h, io.w, io.Tc, 1) == 0, "%s", u.err);
    ck_assert(unet_forward(&u, out, io.x, io.t, io.ctx, io.B, io.h, io.w, io.Tc) == 0);
    snprintf(name, sizeof name, "%s.out", targets);
    cmp(&io.f, name, out, no, OUT_TOL);
    unet_zero_lora_grads(&u);
    ck_assert(unet_backward(&u, io.dout, dx, dctx) == 0);
    snprintf(name, sizeof name, "%s.dx", targets);
    cmp(&io.f, name, dx, nx, GRAD_TOL);
    snprintf(name, sizeof name, "%s.dctx", targets);
    cmp(&io.f, name, dctx, nc, GRAD_TOL);

    double worst = 0;
    const char *worst_name = "";
    for (int i = 0; i < u.nloras; i++) {
        lora_t *L = &u.loras[i].L;
        for (int which = 0; which < 2; which++) {
            size_t n = which ? (size_t)L->out * L->r : (size_t)L->r * L->in;
            snprintf(name, sizeof name, "%s.d%c.%s", targets, which ? 'B' : 'A', u.loras[i].name);
            float *ref = fx_get(&io.f, name, n);
            double e = rel_err(which ? L->dB : L->dA, ref, n);
            free(ref);
            if (e > worst) { worst = e; worst_name = u.loras[i].name; }
            ck_assert_msg(e < GRAD_TOL, "%s: rel_err %g", name, e);
        }
    }
    printf("  all %d dA/dB: worst rel_err %.3g (%s)\n", 2 * u.nloras, worst, worst_name);

    /* without dx and dctx, backward stops below the first adapter: the LoRA
     * gradients must not change */
    float *g = malloc(sizeof(float) * u.lora_nparams);
    memcpy(g, u.lora_grads, sizeof(float) * u.lora_nparams);
    unet_zero_lora_grads(&u);
    ck_assert(unet_backward(&u, io.dout, NULL, NULL) == 0);
    ck_assert(memcmp(g, u.lora_grads, sizeof(float) * u.lora_nparams) == 0);
    free(g);

    free(out); free(dx); free(dctx);
    io_close(&io);
    unet_free(&u);
}

START_TEST(test_lora_a_qv) { check_lora("unet_a", "unet_a_io.safetensors", "qv"); }
END_TEST

START_TEST(test_lora_a_transformer) { check_lora("unet_a", "unet_a_io.safetensors", "transformer"); }
END_TEST

START_TEST(test_lora_b_transformer) { check_lora("unet_b", "unet_b_io.safetensors", "transformer"); }
END_TEST

/* ---- conv LoRA (LoCon) against peft --------------------------------------
 * unet_add_lora_conv("qv", rank 2, conv rank 3): the modules kohya's conv_dim
 * adds (resnets' conv1 / conv2 / conv_shortcut / time_emb_proj, the samplers'
 * conv) with peft's A and B (tools/make_locon_unet_fixtures.py). Then: the
 * adapter gradients without dx / dctx (backward stops early) and with
 * checkpointing; with dropout, checkpointing recomputes the same masks; and
 * inference (dropout off) is the training forward without dropout. */
START_TEST(test_locon_a) {
    unet_t u;
    io_t io;
    char name[320];
    load(&u, "unet_a");
    io_open(&io, "unet_a_io.safetensors", &u);
    st_file fx; fx_open(&fx, "unet_a_locon.safetensors");
    ck_assert_msg(unet_add_lora_conv(&u, "qv", 2, 4.0f, 3, 6.0f, 0.0f, 7) == 0, "%s", u.err);
    int nfix = 0, n3 = 0;
    for (int i = 0; i < fx.ntensors; i++)
        if (strncmp(fx.tensors[i].name, "locon.A.", 8) == 0) {
            nfix++;
            ck_assert_msg(unet_find_lora(&u, fx.tensors[i].name + 8) != NULL, "peft adapter %s has no counterpart",
                          fx.tensors[i].name + 8);
        }
    for (int i = 0; i < u.nloras; i++) n3 += u.loras[i].L.k == 3;
    printf("unet_a LoCon: %d adapters (%d 3x3; peft %d)\n", u.nloras, n3, nfix);
    ck_assert_int_eq(u.nloras, nfix);
    ck_assert_int_eq(n3, 2 * 8 + 2);       /* conv1, conv2 of 8 resnets; 2 samplers */
    for (int i = 0; i < u.nloras; i++) {
        lora_t *L = &u.loras[i].L;
        size_t na = (size_t)L->r * lora_fan_in(L), nb = (size_t)L->out * L->r;
        ck_assert_int_eq(L->r, L->k == 3 ? 3 : 2);
        ck_assert(L->scale == 2.0f);
        snprintf(name, sizeof name, "locon.A.%s", u.loras[i].name);
        float *A = fx_get(&fx, name, na);
        snprintf(name, sizeof name, "locon.B.%s", u.loras[i].name);
        float *B = fx_get(&fx, name, nb);
        memcpy(L->A, A, sizeof(float) * na); memcpy(L->B, B, sizeof(float) * nb);
        free(A); free(B);
    }
    size_t no = nout_of(&io, &u), nx = (size_t)io.B * io.C * io.h * io.w, nc = (size_t)io.B * io.Tc * io.cd;
    float *out = malloc(sizeof(float) * no), *out1 = malloc(sizeof(float) * no);
    float *dx = malloc(sizeof(float) * nx), *dctx = malloc(sizeof(float) * nc);
    ck_assert_msg(unet_alloc_acts(&u, io.B, io.h, io.w, io.Tc, 1) == 0, "%s", u.err);
    ck_assert(unet_forward(&u, out, io.x, io.t, io.ctx, io.B, io.h, io.w, io.Tc) == 0);
    cmp(&fx, "locon.out", out, no, OUT_TOL);
    unet_zero_lora_grads(&u);
    ck_assert(unet_backward(&u, io.dout, dx, dctx) == 0);
    cmp(&fx, "locon.dx", dx, nx, GRAD_TOL);
    cmp(&fx, "locon.dctx", dctx, nc, GRAD_TOL);
    double worst = 0;
    for (int i = 0; i < u.nloras; i++) {
        lora_t *L = &u.loras[i].L;
        for (int which = 0; which < 2; which++) {
            size_t n = which ? (size_t)L->out * L->r : (size_t)L->r * lora_fan_in(L);
            snprintf(name, sizeof name, "locon.d%c.%s", which ? 'B' : 'A', u.loras[i].name);
            float *ref = fx_get(&fx, name, n);
            double e = rel_err(which ? L->dB : L->dA, ref, n);
            free(ref);
            if (e > worst) worst = e;
            ck_assert_msg(e < GRAD_TOL, "%s: rel_err %g", name, e);
        }
    }
    printf("  all %d dA/dB: worst rel_err %.3g\n", 2 * u.nloras, worst);
    /* the same adapter gradients without dx / dctx, and with checkpointing */
    float *g = malloc(sizeof(float) * u.lora_nparams);
    memcpy(g, u.lora_grads, sizeof(float) * u.lora_nparams);
    unet_zero_lora_grads(&u);
    ck_assert(unet_backward(&u, io.dout, NULL, NULL) == 0);
    ck_assert(memcmp(g, u.lora_grads, sizeof(float) * u.lora_nparams) == 0);
    ck_assert(unet_alloc_acts(&u, io.B, io.h, io.w, io.Tc, 2) == 0);
    ck_assert(unet_forward(&u, out1, io.x, io.t, io.ctx, io.B, io.h, io.w, io.Tc) == 0);
    ck_assert(memcmp(out, out1, sizeof(float) * no) == 0);
    unet_zero_lora_grads(&u);
    ck_assert(unet_backward(&u, io.dout, NULL, NULL) == 0);
    ck_assert(memcmp(g, u.lora_grads, sizeof(float) * u.lora_nparams) == 0);
    /* inference: the same output */
    ck_assert(unet_alloc_acts(&u, io.B, io.h, io.w, io.Tc, 0) == 0);
    ck_assert(unet_forward(&u, out1, io.x, io.t, io.ctx, io.B, io.h, io.w, io.Tc) == 0);
    ck_assert(memcmp(out, out1, sizeof(float) * no) == 0);
    /* dropout on every adapter: checkpointing recomputes the same masks */
    for (int i = 0; i < u.nloras; i++) u.loras[i].L.dropout = 0.3f;
    ck_assert(unet_alloc_acts(&u, io.B, io.h, io.w, io.Tc, 1) == 0);
    rng_t start = u.dropout_rng;
    ck_assert(unet_forward(&u, out1, io.x, io.t, io.ctx, io.B, io.h, io.w, io.Tc) == 0);
    ck_assert(rel_err(out1, out, no) > 1e-3);
    unet_zero_lora_grads(&u);
    ck_assert(unet_backward(&u, io.dout, NULL, NULL) == 0);
    memcpy(g, u.lora_grads, sizeof(float) * u.lora_nparams);
    ck_assert(unet_alloc_acts(&u, io.B, io.h, io.w, io.Tc, 2) == 0);
    u.dropout_rng = start;
    float *out2 = malloc(sizeof(float) * no);
    ck_assert(unet_forward(&u, out2, io.x, io.t, io.ctx, io.B, io.h, io.w, io.Tc) == 0);
    ck_assert(memcmp(out1, out2, sizeof(float) * no) == 0);
    unet_zero_lora_grads(&u);
    ck_assert(unet_backward(&u, io.dout, NULL, NULL) == 0);
    ck_assert(memcmp(g, u.lora_grads, sizeof(float) * u.lora_nparams) == 0);
    free(g); free(out); free(out1); free(out2); free(dx); free(dctx);
    st_close(&fx);
    io_close(&io);
    unet_free(&u);
}
END_TEST

/* ---- finite differences --------------------------------------------------- */

typedef struct {
    unet_t *u;
    io_t *io;
    float *out;
} fd_ctx;

/* L = sum(out * dout) in double */
static double fd_loss(void *p) {
    fd_ctx *c = p;
    io_t *io = c->io;
    ck_assert(unet_forward(c->u, c->out, io->x, io->t, io->ctx, io->B, io->h, io->w, io->Tc) == 0);
    return dot_d(c->out, io->dout, nout_of(io, c->u));
}

/* Directional finite differences. A float32 forward of even this tiny
 * network rounds the loss at about 1e-5, which puts a noise floor of ~1e-3
 * under any one entry's difference quotient (seen by scanning the step),
 * as large as the smaller gradient entries themselves. Moving all n entries
 * at once along a random direction v gives a derivative g.v about sqrt(n)
 * times larger with the same noise, and still checks every entry (a wrong
 * entry would have to be orthogonal to a random v to hide). Richardson
 * extrapolation R = (4 D(h/2) - D(h)) / 3 cancels the h^2 term of the
 * central difference D, so the curvature of this random network does not
 * matter either (with h = 1e-3 per entry: at 1e-2 the step along v is 0.2
 * long and dx's check is off by 3e-3). The context moves the output little
 * and along a curved path: a random direction gives g.v ~ 1 there, in the
 * noise, so dctx is checked along dctx itself (seed 0), where g.v is largest
 * and a wrong gradient still shows (g_true.g != |g|^2 unless g is right);
 * likewise single adapters. dx and all adapters together use random v.
 * Measured: 5e-5 to 1e-3 depending on build flags; a wrong gradient is off
 * by O(1), so the bound is 2e-3.  Returns |g.v - R| / |g.v|. */
static double dir_check(float *p, const float *g, size_t n, fd_ctx *c, float h, uint64_t seed) {
    float *save = malloc(sizeof(float) * n), *v = malloc(sizeof(float) * n);
    rng_t r;
    rng_seed(&r, seed);
    if (seed) {
        for (size_t i = 0; i < n; i++) v[i] = rng_normal(&r);
    } else {
        /* seed 0: along g itself, scaled to rms 1 (the largest g.v) */
        double s = sqrt(dot_d(g, g, n) / (double)n);
        for (size_t i = 0; i < n; i++) v[i] = (float)(g[i] / s);
    }
    memcpy(save, p, sizeof(float) * n);
    double a = dot_d(g, v, n), d[2];
    for (int k = 0; k < 2; k++) {
        float hk = k ? h / 2 : h;
        for (size_t i = 0; i < n; i++) p[i] = save[i] + hk * v[i];
        double lp = fd_loss(c);
        for (size_t i = 0; i < n; i++) p[i] = save[i] - hk * v[i];
        double lm = fd_loss(c);
        d[k] = (lp - lm) / (2.0 * (double)hk);
    }
    memcpy(p, save, sizeof(float) * n);
    free(save); free(v);
    double num = (4.0 * d[1] - d[0]) / 3.0;
    return fabs(a - num) / fabs(a);
}

START_TEST(test_gradcheck) {
    unet_t u;
    io_t io;
    load(&u, "unet_a");
    io_open(&io, "unet_a_io.safetensors", &u);
    /* every kind of adapter, with B nonzero so A gets a gradient (A keeps
     * its Kaiming-uniform init) */
    ck_assert(unet_add_lora(&u, "transformer", 2, 4.0f, 0.0f, 11) == 0);
    rng_t r;
    rng_seed(&r, 5);
    for (int i = 0; i < u.nloras; i++) {
        lora_t *L = &u.loras[i].L;
        for (int k = 0; k < L->out * L->r; k++) L->B[k] = 0.1f * rng_normal(&r);
    }
    size_t no = nout_of(&io, &u), nx = (size_t)io.B * io.C * io.h * io.w;
    size_t nc = (size_t)io.B * io.Tc * io.cd;
    float *out = malloc(sizeof(float) * no), *dx = malloc(sizeof(float) * nx);
    float *dctx = malloc(sizeof(float) * nc);
    ck_assert(unet_alloc_acts(&u, io.B, io.h, io.w, io.Tc, 1) == 0);
    ck_assert(unet_forward(&u, out, io.x, io.t, io.ctx, io.B, io.h, io.w, io.Tc) == 0);
    unet_zero_lora_grads(&u);
    ck_assert(unet_backward(&u, io.dout, dx, dctx) == 0);
    /* backward consumed the saved activations of this forward only; the
     * finite differences below run more forwards, so copy the gradients */
    float *dl = malloc(sizeof(float) * u.lora_nparams);
    memcpy(dl, u.lora_grads, sizeof(float) * u.lora_nparams);

    fd_ctx c = {&u, &io, out};
    const float h = 1e-3f;   /* per entry; the whole step is h |v| ~ h sqrt(n) */
    double e_x = 0, e_c = 0, e_l = 0;
    for (uint64_t k = 0; k < 2; k++) {   /* (along dx itself the path is too curved) */
        double e = dir_check(io.x, dx, nx, &c, h, 100 + k);
        if (e > e_x) e_x = e;
    }
    e_c = dir_check(io.ctx, dctx, nc, &c, h, 0);
    /* all adapters at once, then each kind on its own: proj_in (1x1 conv),
     * self- and cross-attention projections, feed-forward, proj_out */
    e_l = dir_check(u.lora_params, dl, u.lora_nparams, &c, h, 300);
    const char *mods[] = {
        "down_blocks.0.attentions.0.proj_in",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_out.0",
        "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj",
        "up_blocks.1.attentions.0.proj_out",
    };
    for (size_t m = 0; m < sizeof mods / sizeof *mods; m++) {
        unet_lora *ul = unet_find_lora(&u, mods[m]);
        ck_assert_msg(ul != NULL, "%s", mods[m]);
        lora_t *L = &ul->L;
        size_t off = (size_t)(L->A - u.lora_params);
        /* A then B are adjacent; one adapter is few numbers, so along its gradient */
        double e = dir_check(L->A, dl + off, lora_num_params(L), &c, h, 0);
        printf("  %-62s %.3g\n", mods[m], e);
        if (e > e_l) e_l = e;
    }
    printf("directional finite differences: x %.3g, ctx %.3g, LoRA %.3g\n", e_x, e_c, e_l);
    ck_assert_msg(e_x < 2e-3, "dx: %g", e_x);
    ck_assert_msg(e_c < 2e-3, "dctx: %g", e_c);
    ck_assert_msg(e_l < 2e-3, "LoRA: %g", e_l);
    free(out); free(dx); free(dctx); free(dl);
    io_close(&io);
    unet_free(&u);
}
END_TEST

/* ---- full fine-tuning: a gradient for every parameter -------------------- */

/* one forward and backward of u on io's data (dx, dctx may be NULL) */
static void fwd_bwd(unet_t *u, io_t *io, float *out, float *dx, float *dctx) {
    ck_assert_msg(unet_forward(u, out, io->x, io->t, io->ctx, io->B, io->h, io->w, io->Tc) == 0, "%s", u->err);
    ck_assert_msg(unet_backward(u, io->dout, dx, dctx) == 0, "%s", u->err);
}

START_TEST(test_full_grads_a) {
    unet_t u;
    io_t io;
    load(&u, "unet_a");
    io_open(&io, "unet_a_io.safetensors", &u);
    size_t no = nout_of(&io, &u), nx = (size_t)io.B * io.C * io.h * io.w;
    size_t nc = (size_t)io.B * io.Tc * io.cd, np = u.nparams;
    float *out = malloc(sizeof(float) * no), *dx = malloc(sizeof(float) * nx);
    float *dctx = malloc(sizeof(float) * nc);

    ck_assert(unet_alloc_acts(&u, io.B, io.h, io.w, io.Tc, 1) == 0);
    size_t frozen_floats = unet_acts_floats(&u);
    ck_assert_msg(unet_alloc_grads(&u) == 0, "%s", u.err);
    ck_assert(u.grads != NULL);
    /* the arena was sized without the gradients' needs: it must be redone */
    ck_assert(unet_forward(&u, out, io.x, io.t, io.ctx, io.B, io.h, io.w, io.Tc) != 0);
    ck_assert(strstr(u.err, "unet_alloc_acts") != NULL);
    ck_assert(unet_alloc_acts(&u, io.B, io.h, io.w, io.Tc, 1) == 0);
    printf("unet_a full grads: arena floats %zu (frozen %zu)\n", unet_acts_floats(&u), frozen_floats);
    unet_zero_grads(&u);
    fwd_bwd(&u, &io, out, dx, dctx);
    /* the rest of backward is as without weight gradients */
    cmp(&io.f, "out", out, no, OUT_TOL);
    cmp(&io.f, "dx", dx, nx, GRAD_TOL);
    cmp(&io.f, "dctx", dctx, nc, GRAD_TOL);

    /* every tensor of the table against autograd */
    st_file gf;
    fx_open(&gf, "unet_a_grads.safetensors");
    ck_assert_int_eq(gf.ntensors, u.ntable);
    double worst = 0;
    const char *worst_name = "";
    for (int i = 0; i < u.ntable; i++) {
        const unet_param *p = &u.table[i];
        size_t n = 1;
        for (int d = 0; d < p->ndim; d++) n *= (size_t)p->shape[d];
        float *ref = fx_get(&gf, p->name, n);
        double e = rel_err(u.grads + p->offset, ref, n);
        free(ref);
        if (!(e <= worst)) { worst = e; worst_name = p->name; }
        ck_assert_msg(e < GRAD_TOL, "%s: rel_err %g", p->name, e);
    }
    printf("  all %d weight gradients: worst rel_err %.3g (%s)\n", u.ntable, worst, worst_name);
    st_close(&gf);

    float *g1 = malloc(sizeof(float) * np);
    memcpy(g1, u.grads, sizeof(float) * np);
    /* without dx and dctx backward still reaches conv_in and the time MLP */
    unet_zero_grads(&u);
    fwd_bwd(&u, &io, out, NULL, NULL);
    ck_assert(memcmp(g1, u.grads, sizeof(float) * np) == 0);
    /* backward accumulates: a second backward of the same forward doubles */
    ck_assert(unet_backward(&u, io.dout, NULL, NULL) == 0);
    float *g2 = malloc(sizeof(float) * np);
    for (size_t i = 0; i < np; i++) g2[i] = 2.0f * g1[i];
    ck_assert(rel_err(u.grads, g2, np) < 1e-6);
    free(g2);
    /* gradient checkpointing: the same numbers, bit for bit */
    ck_assert(unet_alloc_acts(&u, io.B, io.h, io.w, io.Tc, 2) == 0);
    unet_zero_grads(&u);
    fwd_bwd(&u, &io, out, dx, dctx);
    ck_assert(memcmp(g1, u.grads, sizeof(float) * np) == 0);
    unet_zero_grads(&u);
    for (size_t i = 0; i < np; i++) ck_assert(u.grads[i] == 0.0f);

    free(out); free(dx); free(dctx); free(g1);
    io_close(&io);
    unet_free(&u);
}
END_TEST

/* Finite differences on the weights, with and without LoRA adapters (whose
 * gradients must not change when full grads are on). On unet_b, not unet_a:
 * unet_a's loss is so curved in its first convolutions (seen in float64
 * torch too: d/dw of down_blocks.0.resnets.0.conv1.weight[156] is -22.36 at
 * h = 1e-5, -17.7 at h = 3e-3, -2.4 at h = 1e-2) that no step is both past
 * the float32 noise and inside the linear range; unet_b's difference
 * quotients agree to 4 digits from h = 1e-2 to 3e-4. For a set of tensors
 * covering every kind of layer: the largest-gradient entry of each on its
 * own, and the whole tensor along its gradient (dir_check); then every
 * parameter at once along a random direction. */
static void check_full_fd(int with_lora) {
    unet_t u;
    io_t io;
    load(&u, "unet_b");
    io_open(&io, "unet_b_io.safetensors", &u);
    size_t no = nout_of(&io, &u), nx = (size_t)io.B * io.C * io.h * io.w;
    size_t nc = (size_t)io.B * io.Tc * io.cd, np = u.nparams;
    float *out = malloc(sizeof(float) * no), *dx = malloc(sizeof(float) * nx);
    float *dctx = malloc(sizeof(float) * nc), *dl = NULL;
    if (with_lora) {
        ck_assert(unet_add_lora(&u, "transformer", 2, 4.0f, 0.0f, 11) == 0);
        rng_t r;
        rng_seed(&r, 5);
        for (int i = 0; i < u.nloras; i++) {
            lora_t *L = &u.loras[i].L;
            for (int k = 0; k < L->out * L->r; k++) L->B[k] = 0.1f * rng_normal(&r);
        }
        /* the LoRA gradients without weight gradients, to compare with */
        ck_assert(unet_alloc_acts(&u, io.B, io.h, io.w, io.Tc, 1) == 0);
        unet_zero_lora_grads(&u);
        fwd_bwd(&u, &io, out, dx, dctx);
        dl = malloc(sizeof(float) * u.lora_nparams);
        memcpy(dl, u.lora_grads, sizeof(float) * u.lora_nparams);
    }
    ck_assert(unet_alloc_grads(&u) == 0);
    ck_assert(unet_alloc_acts(&u, io.B, io.h, io.w, io.Tc, 1) == 0);
    unet_zero_grads(&u);
    unet_zero_lora_grads(&u);
    fwd_bwd(&u, &io, out, dx, dctx);
    if (with_lora)
        ck_assert_msg(memcmp(dl, u.lora_grads, sizeof(float) * u.lora_nparams) == 0,
                      "LoRA gradients change when weight gradients are on");
    float *g = malloc(sizeof(float) * np);
    memcpy(g, u.grads, sizeof(float) * np);

    fd_ctx c = {&u, &io, out};
    static const char *names[] = {
        "time_embedding.linear_1.weight", "time_embedding.linear_2.bias", "conv_in.weight",
        "down_blocks.0.resnets.0.norm1.weight", "down_blocks.0.resnets.1.conv1.weight",
        "down_blocks.1.resnets.0.time_emb_proj.weight", "down_blocks.0.downsamplers.0.conv.weight",
        "down_blocks.1.attentions.1.norm.bias", "down_blocks.0.attentions.0.proj_in.weight",
        "down_blocks.1.attentions.0.transformer_blocks.1.norm2.weight",
        "mid_block.resnets.1.norm2.bias",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.bias",
        "up_blocks.2.attentions.2.transformer_blocks.0.ff.net.0.proj.weight",
        "up_blocks.2.attentions.2.transformer_blocks.0.ff.net.2.bias",
        "up_blocks.1.attentions.0.proj_out.weight", "up_blocks.0.resnets.0.conv_shortcut.weight",
        "up_blocks.0.resnets.2.conv2.weight", "up_blocks.1.upsamplers.0.conv.weight",
        "conv_norm_out.weight", "conv_out.weight",
    };
    double e_entry = 0;
    for (size_t k = 0; k < sizeof names / sizeof *names; k++) {
        int ti = unet_param_index(&u, names[k]);
        ck_assert_msg(ti >= 0, "%s", names[k]);
        const unet_param *p = &u.table[ti];
        size_t n = 1, best = 0;
        for (int d = 0; d < p->ndim; d++) n *= (size_t)p->shape[d];
        const float *gt = g + p->offset;
        for (size_t i = 1; i < n; i++) if (fabsf(gt[i]) > fabsf(gt[best])) best = i;
        double num = entry_fd(u.params + p->offset + best, fd_loss, &c, FD_H_ENTRY);
        double ee = fabs(gt[best] - num) / (fabs(gt[best]) + fabs(num) + 1.0);
        printf("  %-66s [%4zu] %8.4f vs %8.4f: %.2g\n", names[k], best, gt[best], num, ee);
        if (ee > e_entry) e_entry = ee;
    }
    /* and every parameter at once along a random direction */
    double e_all = dir_check(u.params, g, np, &c, FD_H_DIR, 77);
    printf("unet_b full grads%s, finite differences: worst entry %.3g, all %.3g\n",
           with_lora ? " with LoRA" : "", e_entry, e_all);
    ck_assert_msg(e_entry < FD_ENTRY_TOL, "entry: %g", e_entry);
    ck_assert_msg(e_all < FD_ALL_TOL, "all: %g", e_all);
    free(out); free(dx); free(dctx); free(dl); free(g);
    io_close(&io);
    unet_free(&u);
}

START_TEST(test_full_grads_fd) { check_full_fd(0); }
END_TEST

START_TEST(test_full_grads_fd_lora) { check_full_fd(1); }
END_TEST

/* ---- shapes, dropout ---------------------------------------------------- */

START_TEST(test_shapes_and_dropout) {
    unet_t u;
    io_t io;
    load(&u, "unet_a");
    io_open(&io, "unet_a_io.safetensors", &u);
    size_t no = nout_of(&io, &u);
    float *out = malloc(sizeof(float) * no), *out1 = malloc(sizeof(float) * no);
    float *ref = fx_get(&io.f, "out", no);
    ck_assert(unet_alloc_acts(&u, io.B, io.h, io.w, io.Tc, 0) == 0);
    /* batch 1 fits the batch-2 arena and gives the first image's result */
    ck_assert(unet_forward(&u, out1, io.x, io.t, io.ctx, 1, io.h, io.w, io.Tc) == 0);
    ck_assert(rel_err(out1, ref, no / 2) < OUT_TOL);
    /* larger than allocated, or not a multiple of 2^(levels-1): refused */
    ck_assert(unet_forward(&u, out, io.x, io.t, io.ctx, io.B, 2 * io.h, io.w, io.Tc) != 0);
    ck_assert(strstr(u.err, "unet_alloc_acts") != NULL);
    ck_assert(unet_forward(&u, out, io.x, io.t, io.ctx, io.B, io.h - 1, io.w, io.Tc) != 0);
    ck_assert(unet_alloc_acts(&u, 1, 3, 8, 5, 0) != 0);
    /* bad targets */
    ck_assert(unet_add_lora(&u, "everything", 2, 4.0f, 0.0f, 1) != 0);
    ck_assert(strstr(u.err, "everything") != NULL);

    /* dropout: off at inference (B = 0 would hide it, so randomise B) */
    ck_assert(unet_add_lora(&u, "qv", 2, 4.0f, 0.5f, 1) == 0);
    ck_assert(unet_add_lora(&u, "qv", 2, 4.0f, 0.5f, 1) != 0);   /* once only */
    rng_t r;
    rng_seed(&r, 3);
    for (size_t i = 0; i < u.lora_nparams; i++) u.lora_params[i] = 0.5f * rng_normal(&r);
    ck_assert(unet_alloc_acts(&u, io.B, io.h, io.w, io.Tc, 0) == 0);
    ck_assert(unet_forward(&u, out, io.x, io.t, io.ctx, io.B, io.h, io.w, io.Tc) == 0);
    for (int i = 0; i < u.nloras; i++) u.loras[i].L.dropout = 0.0f;
    ck_assert(unet_forward(&u, out1, io.x, io.t, io.ctx, io.B, io.h, io.w, io.Tc) == 0);
    ck_assert(memcmp(out, out1, sizeof(float) * no) == 0);
    /* and on in training, where backward still matches finite differences of
     * the same mask: here only check it changes the output */
    for (int i = 0; i < u.nloras; i++) u.loras[i].L.dropout = 0.5f;
    ck_assert(unet_alloc_acts(&u, io.B, io.h, io.w, io.Tc, 1) == 0);
    rng_t start = u.dropout_rng;
    ck_assert(unet_forward(&u, out, io.x, io.t, io.ctx, io.B, io.h, io.w, io.Tc) == 0);
    ck_assert(rel_err(out, out1, no) > 1e-3);
    unet_zero_lora_grads(&u);
    ck_assert(unet_backward(&u, io.dout, NULL, NULL) == 0);
    /* checkpointing recomputes the same dropout masks: same gradients */
    float *g = malloc(sizeof(float) * u.lora_nparams);
    memcpy(g, u.lora_grads, sizeof(float) * u.lora_nparams);
    ck_assert(unet_alloc_acts(&u, io.B, io.h, io.w, io.Tc, 2) == 0);
    u.dropout_rng = start;
    ck_assert(unet_forward(&u, out1, io.x, io.t, io.ctx, io.B, io.h, io.w, io.Tc) == 0);
    ck_assert(memcmp(out, out1, sizeof(float) * no) == 0);
    unet_zero_lora_grads(&u);
    ck_assert(unet_backward(&u, io.dout, NULL, NULL) == 0);
    ck_assert(memcmp(g, u.lora_grads, sizeof(float) * u.lora_nparams) == 0);
    free(g);

    free(out); free(out1); free(ref);
    io_close(&io);
    unet_free(&u);
}
END_TEST

/* ---- config.json --------------------------------------------------------- */

static int parse_cfg(const char *text, unet_config *c, char *err) {
    char jerr[256];
    json *j = json_parse(text, strlen(text), jerr, sizeof jerr);
    ck_assert_msg(j != NULL, "%s", jerr);
    int rc = unet_config_from_json(c, j, err);
    json_free(j);
    return rc;
}

START_TEST(test_config) {
    unet_config c;
    char err[UNET_ERR_LEN];
    /* SD1.5's unet/config.json (the keys that matter), as unet.c spells it */
    ck_assert_msg(unet_config_sd15(&c, err) == 0, "%s", err);
    ck_assert_int_eq(c.nlevels, 4);
    ck_assert_int_eq(c.heads[0], 8);       /* the naming quirk: 8 heads, not head size 8 */
    ck_assert_int_eq(c.heads[3], 8);
    ck_assert_int_eq(c.cross_dim, 768);
    ck_assert_int_eq(c.layers[2], 2);
    ck_assert(c.down_attn[0] && c.down_attn[2] && !c.down_attn[3]);
    ck_assert(!c.up_attn[0] && c.up_attn[1] && c.up_attn[3]);
    ck_assert(c.flip_sin_to_cos && c.freq_shift == 0 && !c.linear_proj);
    /* the table: SD1.5's UNet has 859,520,964 parameters in 686 tensors */
    size_t np = 0;
    int nt = 0;
    ck_assert_msg(unet_count_params(&c, &np, &nt, err) == 0, "%s", err);
    ck_assert_uint_eq(np, 859520964u);
    ck_assert_int_eq(nt, 686);

    /* what SD1.x does not use is refused, naming the key */
    static const struct { const char *json, *key; } bad[] = {
        {"{\"class_embed_type\": \"timestep\"}", "class_embed_type"},
        {"{\"addition_embed_type\": \"text_time\"}", "addition_embed_type"},
        {"{\"down_block_types\": [\"AttnDownBlock2D\", \"DownBlock2D\"], \"block_out_channels\": [32, 64],"
         " \"up_block_types\": [\"UpBlock2D\", \"CrossAttnUpBlock2D\"]}", "down_block_types"},
        {"{\"mid_block_type\": \"UNetMidBlock2DSimpleCrossAttn\"}", "mid_block_type"},
        {"{\"resnet_time_scale_shift\": \"scale_shift\"}", "resnet_time_scale_shift"},
        {"{\"num_attention_heads\": 8}", "num_attention_heads"},
        {"{\"only_cross_attention\": [false, true, false, false]}", "only_cross_attention"},
        {"{\"cross_attention_dim\": [768, 768, 768, 768]}", "cross_attention_dim"},
        {"{\"attention_head_dim\": [8, 8]}", "attention_head_dim"},
        {"{\"attention_head_dim\": 7}", "attention_head_dim"},
        {"{\"norm_num_groups\": 48}", "norm_num_groups"},
        {"{\"conv_in_kernel\": 7}", "conv_in_kernel"},
        {"{\"time_embedding_type\": \"fourier\"}", "time_embedding_type"},
        {"[1, 2]", "object"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        err[0] = 0;
        ck_assert_msg(parse_cfg(bad[i].json, &c, err) != 0, "accepted %s", bad[i].json);
        ck_assert_msg(strstr(err, bad[i].key) != NULL, "error '%s' does not name %s", err, bad[i].key);
    }

}
END_TEST

/* ---- loading errors ------------------------------------------------------ */

/* copy unet_a into dir, dropping tensor `drop` and adding `extra` (either
 * NULL), storing every tensor as F16 when f16 */
static void write_variant_dt(const char *dir, const char *drop, const char *extra, int f16) {
    char path[512], err[ST_ERR_LEN];
    mkdir(dir, 0755);
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *in = fopen(FIXTURE_DIR "unet_a/config.json", "rb"), *out = fopen(path, "wb");
    ck_assert(in && out);
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, in)) > 0) fwrite(buf, 1, n, out);
    fclose(in); fclose(out);
    st_file f;
    fx_open(&f, "unet_a/diffusion_pytorch_model.safetensors");
    st_writer *w = st_writer_new();
    for (int i = 0; i < f.ntensors; i++) {
        const st_tensor *t = &f.tensors[i];
        if (drop && strcmp(t->name, drop) == 0) continue;
        if (f16) {
            char e[ST_ERR_LEN];
            float *v = malloc(sizeof(float) * t->numel);
            ck_assert(st_to_f32(t, v, e) == 0);
            ck_assert(st_writer_add_f32(w, t->name, ST_F16, t->ndim, t->shape, v) == 0);
            free(v);
        } else {
            ck_assert(st_writer_add(w, t->name, t->dtype, t->ndim, t->shape, t->data) == 0);
        }
    }
    if (extra) {
        float z[3] = {0, 0, 0};
        int64_t shape[1] = {3};
        ck_assert(st_writer_add(w, extra, ST_F32, 1, shape, z) == 0);
    }
    snprintf(path, sizeof path, "%s/diffusion_pytorch_model.safetensors", dir);
    ck_assert_msg(st_writer_save(w, path, err) == 0, "%s", err);
    st_writer_free(w);
    st_close(&f);
}

static void write_variant(const char *dir, const char *drop, const char *extra) {
    write_variant_dt(dir, drop, extra, 0);
}

START_TEST(test_load_errors) {
    unet_t u;
    char err[UNET_ERR_LEN], dir[256];
    ck_assert(unet_load_diffusers(&u, "/nonexistent/unet", err) != 0);
    ck_assert(strstr(err, "config.json") != NULL);

    snprintf(dir, sizeof dir, "/tmp/sdlora_test_unet_%d", (int)getpid());
    const char *t = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight";
    write_variant(dir, t, NULL);
    ck_assert(unet_load_diffusers(&u, dir, err) != 0);
    ck_assert_msg(strstr(err, t) != NULL, "%s", err);

    write_variant(dir, NULL, "mid_block.extra.weight");
    ck_assert(unet_load_diffusers(&u, dir, err) != 0);
    ck_assert_msg(strstr(err, "mid_block.extra.weight") != NULL, "%s", err);

    /* the unchanged copy loads, and has exactly the file's tensors */
    write_variant(dir, NULL, NULL);
    ck_assert_msg(unet_load_diffusers(&u, dir, err) == 0, "%s", err);
    printf("unet_a: %d tensors, %zu parameters\n", u.ntable, u.nparams);
    ck_assert_int_eq(u.nparams, 52004);    /* sum of numel in diffusers */
    unet_free(&u);

    /* an fp16 copy loads too; its output is the fp32 one to within fp16's
     * rounding of the weights (2^-11 relative) */
    write_variant_dt(dir, NULL, NULL, 1);
    ck_assert_msg(unet_load_diffusers(&u, dir, err) == 0, "%s", err);
    io_t io;
    io_open(&io, "unet_a_io.safetensors", &u);
    size_t no = nout_of(&io, &u);
    float *out = malloc(sizeof(float) * no), *ref = fx_get(&io.f, "out", no);
    ck_assert(unet_alloc_acts(&u, io.B, io.h, io.w, io.Tc, 0) == 0);
    ck_assert(unet_forward(&u, out, io.x, io.t, io.ctx, io.B, io.h, io.w, io.Tc) == 0);
    double e = rel_err(out, ref, no);
    printf("unet_a from fp16 weights: rel_err %.3g\n", e);
    ck_assert(e > 1e-6 && e < 1e-2);
    free(out); free(ref);
    io_close(&io);
    unet_free(&u);

    char path[512];
    snprintf(path, sizeof path, "%s/config.json", dir); unlink(path);
    snprintf(path, sizeof path, "%s/diffusion_pytorch_model.safetensors", dir); unlink(path);
    rmdir(dir);
}
END_TEST

static Suite *unet_suite(void) {
    Suite *s = suite_create("unet");
    TCase *tc = tcase_create("unet");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_config);
    tcase_add_test(tc, test_load_errors);
    tcase_add_test(tc, test_model_a);
    tcase_add_test(tc, test_model_b);
    tcase_add_test(tc, test_lora_a_qv);
    tcase_add_test(tc, test_lora_a_transformer);
    tcase_add_test(tc, test_lora_b_transformer);
    tcase_add_test(tc, test_locon_a);
    tcase_add_test(tc, test_shapes_and_dropout);
    tcase_add_test(tc, test_gradcheck);
    tcase_add_test(tc, test_full_grads_a);
    tcase_add_test(tc, test_full_grads_fd);
    tcase_add_test(tc, test_full_grads_fd_lora);
    suite_add_tcase(s, tc);
    return s;
}

CHECK_MAIN(unet_suite)

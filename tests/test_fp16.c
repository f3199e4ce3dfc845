/* test_fp16.c: --weight-dtype fp16, the frozen weights held as fp16.
 *   1. half.c's conversions: hand-known bit patterns, every half round-trips
 *      exactly, and every midpoint between neighbouring halfs rounds to the
 *      even one (an exhaustive check of round-to-nearest-even that does not
 *      use the code's own rounding).
 *   2. models/tiny (an fp16 file) held as fp16 and as fp32: widening is exact,
 *      so the UNet output, dx, dctx and the LoRA gradients are BIT-identical.
 *   3. tests/fixtures/unet_a (an fp32 file) held as fp16 equals the fp32-held
 *      model whose matrices were rounded to fp16 by hand, bit for bit.
 *   4. loading details: st_release keeps the data readable, st_read_f16 of
 *      an F32 tensor rounds, unet_param_set rounds, full fine-tuning refused.
 *   5. the same for the CLIP text encoder (output and LoRA gradients) and the
 *      VAE (encode's mean and logvar, decode): models/tiny held as fp16 is
 *      bit-identical to fp32-held; the fp32 fixtures clip_a / vae_a held as
 *      fp16 equal the fp32-held ones with matrices rounded by hand.
 *   6. the whole model: all three parts held as fp16, the bytes they take,
 *      and a text-encoder LoRA merged into fp16 weights is the fp32 merge
 *      rounded once. */
#include <stdint.h>
#include "testutil.h"
#include "half.h"
#include "unet.h"
#include "clip.h"
#include "vae.h"
#include "model.h"
#include "generate.h"

static uint32_t fbits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static float bitsf(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

START_TEST(test_known_patterns) {
    /* float -> half */
    ck_assert_uint_eq(float_to_half(1.0f), 0x3C00);
    ck_assert_uint_eq(float_to_half(-2.0f), 0xC000);
    ck_assert_uint_eq(float_to_half(0.0f), 0x0000);
    ck_assert_uint_eq(float_to_half(-0.0f), 0x8000);
    ck_assert_uint_eq(float_to_half(65504.0f), 0x7BFF);          /* largest half */
    ck_assert_uint_eq(float_to_half(0x1p-24f), 0x0001);          /* smallest subnormal */
    ck_assert_uint_eq(float_to_half(0x1p-14f), 0x0400);          /* smallest normal */
    ck_assert_uint_eq(float_to_half(0x1p-25f), 0x0000);          /* tie between 0 and 2^-24: even is 0 */
    ck_assert_uint_eq(float_to_half(0x1.8p-24f), 0x0002);        /* tie 1.5 * 2^-24 -> 2 (even) */
    ck_assert_uint_eq(float_to_half(65520.0f), 0x7C00);          /* tie with 2^16 -> inf */
    ck_assert_uint_eq(float_to_half(65519.0f), 0x7BFF);
    ck_assert_uint_eq(float_to_half(-1e10f), 0xFC00);
    ck_assert_uint_eq(float_to_half(INFINITY), 0x7C00);
    ck_assert_uint_eq(float_to_half(-INFINITY), 0xFC00);
    ck_assert_uint_eq(float_to_half(1.0f + 0x1p-11f), 0x3C00);   /* tie, 0x3C00 is even */
    ck_assert_uint_eq(float_to_half(1.0f + 3 * 0x1p-11f), 0x3C02); /* tie, 0x3C02 is even */
    ck_assert_uint_eq(float_to_half(1.0f + 0x1p-10f), 0x3C01);
    ck_assert_uint_eq(float_to_half(0.333333343f), 0x3555);
    uint16_t hn = float_to_half(NAN);
    ck_assert((hn & 0x7C00) == 0x7C00 && (hn & 0x3FF) != 0);
    /* a float NaN whose payload sits below the kept bits stays a NaN */
    hn = float_to_half(bitsf(0x7F800001u));
    ck_assert((hn & 0x7C00) == 0x7C00 && (hn & 0x3FF) != 0);
    /* half -> float */
    ck_assert(half_to_float(0x3C00) == 1.0f);
    ck_assert(half_to_float(0xC000) == -2.0f);
    ck_assert(half_to_float(0x7BFF) == 65504.0f);
    ck_assert(half_to_float(0x0001) == 0x1p-24f);
    ck_assert(half_to_float(0x03FF) == 1023 * 0x1p-24f);
    ck_assert(half_to_float(0x0400) == 0x1p-14f);
    ck_assert(half_to_float(0x3555) == 0x1.554p-2f);
    ck_assert_uint_eq(fbits(half_to_float(0x8000)), 0x80000000u);
    ck_assert(isinf(half_to_float(0x7C00)) && half_to_float(0x7C00) > 0);
    ck_assert(isinf(half_to_float(0xFC00)) && half_to_float(0xFC00) < 0);
    ck_assert(isnan(half_to_float(0x7E00)) && isnan(half_to_float(0x7C01)) && isnan(half_to_float(0xFFFF)));
    /* the safetensors names are the same functions */
    ck_assert_uint_eq(st_f32_to_f16(1.0f + 3 * 0x1p-11f), 0x3C02);
    ck_assert(st_f16_to_f32(0x0001) == 0x1p-24f);
    weight_dtype dt;
    ck_assert(weight_dtype_parse("fp16", &dt) == 0 && dt == WEIGHT_F16);
    ck_assert(weight_dtype_parse("fp32", &dt) == 0 && dt == WEIGHT_F32);
    ck_assert(weight_dtype_parse("bf16", &dt) != 0);
}
END_TEST

/* Check records every ck_assert (a write to its pipe), so the loops below
 * count failures and assert once, naming the first. */

/* every one of the 65536 halfs, NaNs included (their payload fits), goes to
 * float and back unchanged; the array version agrees with the scalar one */
START_TEST(test_roundtrip_all) {
    uint16_t *h = malloc(65536 * sizeof *h), *back = malloc(65536 * sizeof *back);
    float *f = malloc(65536 * sizeof *f);
    for (uint32_t i = 0; i < 65536; i++) h[i] = (uint16_t)i;
    half_to_float_array(f, h, 65536);
    long bad = 0, first = -1;
    for (uint32_t i = 0; i < 65536; i++) {
        int ok = fbits(f[i]) == fbits(half_to_float(h[i]))      /* array == scalar */
              && float_to_half(f[i]) == h[i];                   /* round trip */
        /* the value, from the layout, by plain arithmetic */
        int e = (i >> 10) & 31, m = i & 1023;
        if (e < 31) {
            double v = e == 0 ? m * 0x1p-24 : ldexp(1.0 + m / 1024.0, e - 15);
            if (i & 0x8000) v = -v;
            ok = ok && (double)f[i] == v;
        } else {
            ok = ok && (m ? isnan(f[i]) : isinf(f[i]));
        }
        if (!ok && bad++ == 0) first = (long)i;
    }
    ck_assert_msg(bad == 0, "%ld halfs fail, the first 0x%04lx", bad, first);
    float_to_half_array(back, f, 65536);
    ck_assert(memcmp(back, h, 65536 * sizeof *h) == 0);
    free(h); free(back); free(f);
}
END_TEST

/* between two neighbouring finite halfs a < b (as floats), the midpoint
 * rounds to the one with the even mantissa, and anything strictly inside
 * either half of the gap rounds to the nearer. The midpoints are exact in
 * float (a half has 11 significant bits, a float 24). */
START_TEST(test_rounding_all_gaps) {
    long bad = 0, first = -1;
    for (uint32_t i = 0; i < 0x7BFF; i++) {
        uint16_t a = (uint16_t)i, b = (uint16_t)(i + 1);
        float fa = half_to_float(a), fb = half_to_float(b);
        float mid = fa + (fb - fa) / 2;
        uint16_t even = (a & 1) ? b : a;
        int ok = mid > fa && mid < fb
              && float_to_half(mid) == even
              && float_to_half(-mid) == (even | 0x8000)
              && float_to_half(nextafterf(mid, 0.0f)) == a
              && float_to_half(nextafterf(mid, INFINITY)) == b;
        if (!ok && bad++ == 0) first = (long)i;
    }
    ck_assert_msg(bad == 0, "%ld gaps round wrong, the first above 0x%04lx", bad, first);
    /* above the largest half: up to (not including) the midpoint with 2^16 it stays 65504 */
    ck_assert_uint_eq(float_to_half(nextafterf(65520.0f, 0.0f)), 0x7BFF);
}
END_TEST

/* ---- the UNet held as fp16 ------------------------------------------------ */

static void load(unet_t *u, const char *dir, weight_dtype dt) {
    char err[UNET_ERR_LEN];
    ck_assert_msg(unet_load_diffusers_dtype(u, dir, dt, err) == 0, "%s", err);
}

typedef struct { float *out, *dx, *dctx, *lg; } run_t;

/* one training forward + backward with LoRA on every transformer projection
 * (A and B random, so every adapter's gradients are non-zero), then an
 * inference forward. Everything the run produces is returned. */
static run_t run_unet(unet_t *u, int B, int h, int w, int Tc, int checkpoint) {
    int C = u->cfg.in_channels, O = u->cfg.out_channels, cd = u->cfg.cross_dim;
    ck_assert_msg(unet_add_lora(u, "transformer", 2, 2.0f, 0.0f, 5) == 0, "%s", u->err);
    fill_uniform(u->lora_params, u->lora_nparams, -0.2f, 0.2f, 6);
    size_t nx = (size_t)B * C * h * w, no = (size_t)B * O * h * w, nc = (size_t)B * Tc * cd;
    float *x = malloc(sizeof(float) * nx), *ctx = malloc(sizeof(float) * nc), *dout = malloc(sizeof(float) * no);
    float t[4] = {999, 10, 500, 1};
    fill_uniform(x, nx, -1, 1, 1);
    fill_uniform(ctx, nc, -1, 1, 2);
    fill_uniform(dout, no, -1, 1, 3);
    run_t r;
    r.out = malloc(sizeof(float) * 2 * no);
    r.dx = malloc(sizeof(float) * nx);
    r.dctx = malloc(sizeof(float) * nc);
    r.lg = malloc(sizeof(float) * u->lora_nparams);
    ck_assert_msg(unet_alloc_acts(u, B, h, w, Tc, checkpoint ? 2 : 1) == 0, "%s", u->err);
    unet_zero_lora_grads(u);
    ck_assert_msg(unet_forward(u, r.out, x, t, ctx, B, h, w, Tc) == 0, "%s", u->err);
    ck_assert_msg(unet_backward(u, dout, r.dx, r.dctx) == 0, "%s", u->err);
    memcpy(r.lg, u->lora_grads, sizeof(float) * u->lora_nparams);
    ck_assert_msg(unet_alloc_acts(u, B, h, w, Tc, 0) == 0, "%s", u->err);
    ck_assert(unet_forward(u, r.out + no, x, t, ctx, B, h, w, Tc) == 0);
    free(x); free(ctx); free(dout);
    return r;
}

static void run_free(run_t *r) { free(r->out); free(r->dx); free(r->dctx); free(r->lg); }

/* bit-identical, and not trivially (something non-zero came out) */
static void assert_same(const run_t *a, const run_t *b, size_t no, size_t nx, size_t nc, size_t nl) {
    ck_assert_msg(memcmp(a->out, b->out, sizeof(float) * 2 * no) == 0, "UNet output differs");
    ck_assert_msg(memcmp(a->dx, b->dx, sizeof(float) * nx) == 0, "dx differs");
    ck_assert_msg(memcmp(a->dctx, b->dctx, sizeof(float) * nc) == 0, "dctx differs");
    ck_assert_msg(memcmp(a->lg, b->lg, sizeof(float) * nl) == 0, "LoRA gradients differ");
    double s = 0;
    for (size_t i = 0; i < nl; i++) s += fabs(a->lg[i]);
    ck_assert(s > 0);
    s = 0;
    for (size_t i = 0; i < no; i++) s += fabs(a->out[i]);
    ck_assert(s > 0 && isfinite(s));
}

/* models/tiny is stored as fp16: fp16-held and fp32-held compute the same bits */
static void check_fp16_file(int checkpoint) {
    unet_t a, b;
    load(&a, "models/tiny/unet", WEIGHT_F32);
    load(&b, "models/tiny/unet", WEIGHT_F16);
    ck_assert(a.params16 == NULL && b.params16 != NULL && b.wbuf != NULL);
    ck_assert(b.nmat > 0 && b.nmat < b.nparams && a.nparams == b.nparams);
    /* the matrices hold the same numbers */
    size_t bad = 0;
    for (int i = 0; i < a.ntable; i++) {
        const unet_param *pa = &a.table[i], *pb = &b.table[i];
        ck_assert(pa->numel == pb->numel && pa->data);
        ck_assert_int_eq(pb->data16 != NULL, pb->ndim >= 2);
        for (size_t k = 0; k < pa->numel; k++) {
            float vb = pb->data16 ? half_to_float(pb->data16[k]) : pb->data[k];
            bad += fbits(pa->data[k]) != fbits(vb);
        }
    }
    ck_assert_msg(bad == 0, "%zu weights differ", bad);
    int B = 2, h = 8, w = 8, Tc = 7;
    run_t ra = run_unet(&a, B, h, w, Tc, checkpoint), rb = run_unet(&b, B, h, w, Tc, checkpoint);
    assert_same(&ra, &rb, (size_t)B * a.cfg.out_channels * h * w, (size_t)B * a.cfg.in_channels * h * w,
                (size_t)B * Tc * a.cfg.cross_dim, a.lora_nparams);
    run_free(&ra); run_free(&rb);
    unet_free(&a); unet_free(&b);
}

START_TEST(test_fp16_file_identical) { check_fp16_file(0); }
END_TEST
START_TEST(test_fp16_file_identical_checkpointed) { check_fp16_file(1); }
END_TEST

/* an fp32 file held as fp16 is the fp32 model with every matrix rounded to
 * fp16 (vectors untouched) */
START_TEST(test_fp32_file_rounded) {
    unet_t a, b, c;
    load(&a, FIXTURE_DIR "unet_a", WEIGHT_F32);
    load(&b, FIXTURE_DIR "unet_a", WEIGHT_F16);
    load(&c, FIXTURE_DIR "unet_a", WEIGHT_F32);    /* stays unrounded */
    size_t changed = 0;
    for (int i = 0; i < a.ntable; i++) {
        unet_param *p = &a.table[i];
        if (p->ndim < 2) continue;
        for (size_t k = 0; k < p->numel; k++) {
            float r = half_to_float(float_to_half(p->data[k]));
            changed += r != p->data[k];
            p->data[k] = r;
        }
    }
    ck_assert_msg(changed > 1000, "only %zu weights changed by rounding: is unet_a fp32?", changed);
    int B = 2, h = 8, w = 8, Tc = 5;
    run_t ra = run_unet(&a, B, h, w, Tc, 0), rb = run_unet(&b, B, h, w, Tc, 0), rc = run_unet(&c, B, h, w, Tc, 0);
    size_t no = (size_t)B * a.cfg.out_channels * h * w;
    assert_same(&ra, &rb, no, (size_t)B * a.cfg.in_channels * h * w, (size_t)B * Tc * a.cfg.cross_dim,
                a.lora_nparams);
    /* and rounding did change the output, a little */
    double e = rel_err(rc.out, ra.out, no);
    ck_assert_msg(e > 0 && e < 1e-2, "fp16-rounded vs fp32 output: rel err %g", e);
    run_free(&ra); run_free(&rb); run_free(&rc);
    unet_free(&a); unet_free(&b); unet_free(&c);
}
END_TEST

START_TEST(test_loading_details) {
    char err[ST_ERR_LEN];
    st_file f;
    ck_assert_msg(st_open(&f, FIXTURE_DIR "unet_a/diffusion_pytorch_model.safetensors", err) == 0, "%s", err);
    /* the largest tensor: read, release its pages, read again: same numbers */
    const st_tensor *t = &f.tensors[0];
    for (int i = 1; i < f.ntensors; i++) if (f.tensors[i].numel > t->numel) t = &f.tensors[i];
    ck_assert(t->dtype == ST_F32 && t->numel > 1024);
    float *x1 = malloc(sizeof(float) * t->numel), *x2 = malloc(sizeof(float) * t->numel);
    uint16_t *hh = malloc(sizeof(uint16_t) * t->numel);
    ck_assert(st_read_f32(&f, t->name, t->ndim, t->shape, x1, err) == 0);
    st_release(&f, t);
    ck_assert(st_read_f32(&f, t->name, t->ndim, t->shape, x2, err) == 0);
    ck_assert(memcmp(x1, x2, sizeof(float) * t->numel) == 0);
    /* F32 -> fp16 rounds each value */
    ck_assert(st_read_f16(&f, t->name, t->ndim, t->shape, hh, err) == 0);
    size_t bad = 0;
    for (size_t k = 0; k < t->numel; k++) bad += hh[k] != float_to_half(x1[k]);
    ck_assert_msg(bad == 0, "%zu values not rounded", bad);
    /* a wrong shape is still an error naming the tensor */
    int64_t wrong[1] = {3};
    ck_assert(st_read_f16(&f, t->name, 1, wrong, hh, err) != 0);
    ck_assert(strstr(err, t->name) != NULL);
    free(x1); free(x2); free(hh);
    st_close(&f);

    unet_t u;
    load(&u, FIXTURE_DIR "unet_a", WEIGHT_F16);
    /* set rounds, get widens */
    int k = -1;
    for (int i = 0; i < u.ntable; i++) if (u.table[i].ndim >= 2) { k = i; break; }
    ck_assert(k >= 0);
    size_t n = u.table[k].numel;
    float *v = malloc(sizeof(float) * n), *g = malloc(sizeof(float) * n);
    fill_uniform(v, n, -3, 3, 9);
    unet_param_set(&u, k, v);
    unet_param_get(&u, k, g);
    bad = 0;
    for (size_t i = 0; i < n; i++) bad += g[i] != half_to_float(float_to_half(v[i]));
    ck_assert_msg(bad == 0, "%zu values not rounded by unet_param_set", bad);
    free(v); free(g);
    /* full fine-tuning needs fp32 weights */
    ck_assert(unet_alloc_grads(&u) != 0);
    ck_assert(strstr(u.err, "fp32") != NULL);
    ck_assert(u.grads == NULL);
    unet_free(&u);
}
END_TEST

/* ---- the CLIP text encoder held as fp16 ----------------------------------- */

static void clip_load(clip_t *m, const char *dir, weight_dtype dt) {
    char err[ST_ERR_LEN];
    ck_assert_msg(clip_load_hf_dtype(m, dir, dt, err) == 0, "%s", err);
}

typedef struct { float *out, *out2, *lg; size_t nout, nl; } clip_run;

/* ids (B, T) random in the vocabulary; an inference forward at clip_skip 2,
 * then LoRA (random A and B, so every adapter gets a gradient and changes
 * the output) and a forward + backward at clip_skip 1 */
static clip_run run_clip(clip_t *m, int B, int T) {
    const clip_config *c = &m->config;
    clip_run r;
    r.nout = (size_t)B * T * c->hidden_size;
    int *ids = malloc(sizeof(int) * B * T);
    uint64_t z = 12345;
    for (int i = 0; i < B * T; i++) {
        z = z * 6364136223846793005ull + 1442695040888963407ull;
        ids[i] = (int)((z >> 33) % (uint64_t)c->vocab_size);
    }
    r.out = malloc(sizeof(float) * r.nout);
    r.out2 = malloc(sizeof(float) * r.nout);
    float *dout = malloc(sizeof(float) * r.nout);
    fill_uniform(dout, r.nout, -1, 1, 4);
    ck_assert_msg(clip_forward(m, r.out2, ids, B, T, 2) == 0, "%s", m->err);
    char err[ST_ERR_LEN];
    ck_assert_msg(clip_add_lora(m, 2, 2.0f, 0.0f, 7, err) == 0, "%s", err);
    fill_uniform(m->lora_params, m->num_lora_params, -0.2f, 0.2f, 8);
    r.nl = m->num_lora_params;
    r.lg = malloc(sizeof(float) * r.nl);
    clip_zero_grad(m);
    ck_assert_msg(clip_forward(m, r.out, ids, B, T, 1) == 0, "%s", m->err);
    ck_assert_msg(clip_backward(m, dout) == 0, "%s", m->err);
    memcpy(r.lg, m->lora_grads, sizeof(float) * r.nl);
    free(ids); free(dout);
    return r;
}

static void clip_run_free(clip_run *r) { free(r->out); free(r->out2); free(r->lg); }

static void assert_clip_same(const clip_run *a, const clip_run *b) {
    ck_assert(a->nout == b->nout && a->nl == b->nl);
    ck_assert_msg(memcmp(a->out, b->out, sizeof(float) * a->nout) == 0, "CLIP output (with LoRA) differs");
    ck_assert_msg(memcmp(a->out2, b->out2, sizeof(float) * a->nout) == 0, "CLIP output (clip_skip 2) differs");
    ck_assert_msg(memcmp(a->lg, b->lg, sizeof(float) * a->nl) == 0, "CLIP LoRA gradients differ");
    double s = 0, o = 0;
    for (size_t i = 0; i < a->nl; i++) s += fabs(a->lg[i]);
    for (size_t i = 0; i < a->nout; i++) o += fabs(a->out[i]);
    ck_assert(s > 0 && isfinite(s) && o > 0 && isfinite(o));
}

/* models/tiny's text encoder is an fp16 file: held either way, the same bits */
START_TEST(test_clip_fp16_file_identical) {
    clip_t a, b;
    clip_load(&a, "models/tiny/text_encoder", WEIGHT_F32);
    clip_load(&b, "models/tiny/text_encoder", WEIGHT_F16);
    ck_assert(a.params16 == NULL && b.params16 != NULL && b.wbuf != NULL);
    ck_assert(b.nmat > 0 && b.nmat < b.num_params && a.nmat == b.nmat);
    size_t bad = 0;
    for (int i = 0; i < a.ntable; i++) {
        const clip_param *pa = &a.table[i], *pb = &b.table[i];
        ck_assert(pa->data && pa->numel == pb->numel);
        ck_assert_int_eq(pb->data16 != NULL, pb->ndim == 2);
        for (size_t k = 0; k < pa->numel; k++)
            bad += fbits(pa->data[k]) != fbits(pb->data16 ? half_to_float(pb->data16[k]) : pb->data[k]);
    }
    ck_assert_msg(bad == 0, "%zu weights differ", bad);
    clip_run ra = run_clip(&a, 2, 77), rb = run_clip(&b, 2, 77);
    assert_clip_same(&ra, &rb);
    /* full fine-tuning needs fp32 weights; LoRA was fine above */
    ck_assert(clip_alloc_grads(&b) != 0 && b.grads == NULL);
    ck_assert(strstr(b.err, "fp32") != NULL);
    ck_assert(clip_alloc_grads(&a) == 0);
    clip_run_free(&ra); clip_run_free(&rb);
    clip_free(&a); clip_free(&b);
}
END_TEST

/* an fp32 fixture held as fp16 = the fp32-held one with every matrix rounded */
START_TEST(test_clip_fp32_file_rounded) {
    clip_t a, b, c;
    clip_load(&a, FIXTURE_DIR "clip_a", WEIGHT_F32);
    clip_load(&b, FIXTURE_DIR "clip_a", WEIGHT_F16);
    clip_load(&c, FIXTURE_DIR "clip_a", WEIGHT_F32);
    size_t changed = 0;
    for (int i = 0; i < a.ntable; i++) {
        clip_param *p = &a.table[i];
        if (p->ndim < 2) continue;
        for (size_t k = 0; k < p->numel; k++) {
            float r = half_to_float(float_to_half(p->data[k]));
            changed += r != p->data[k];
            p->data[k] = r;
        }
    }
    ck_assert_msg(changed > 1000, "only %zu weights changed by rounding: is clip_a fp32?", changed);
    int T = a.config.max_pos < 9 ? a.config.max_pos : 9;
    clip_run ra = run_clip(&a, 2, T), rb = run_clip(&b, 2, T), rc = run_clip(&c, 2, T);
    assert_clip_same(&ra, &rb);
    double e = rel_err(rc.out, ra.out, ra.nout);
    ck_assert_msg(e > 0 && e < 1e-2, "fp16-rounded vs fp32 CLIP output: rel err %g", e);
    /* set rounds, get widens */
    int k = 4;   /* encoder.layers.0.self_attn.q_proj.weight */
    ck_assert(b.table[k].ndim == 2);
    size_t n = b.table[k].numel;
    float *v = malloc(sizeof(float) * n), *g = malloc(sizeof(float) * n);
    fill_uniform(v, n, -3, 3, 9);
    clip_param_set(&b, k, v);
    clip_param_get(&b, k, g);
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) bad += g[i] != half_to_float(float_to_half(v[i]));
    ck_assert_msg(bad == 0, "%zu values not rounded by clip_param_set", bad);
    free(v); free(g);
    clip_run_free(&ra); clip_run_free(&rb); clip_run_free(&rc);
    clip_free(&a); clip_free(&b); clip_free(&c);
}
END_TEST

/* ---- the VAE held as fp16 -------------------------------------------------- */

static void vae_load(vae_t *v, const char *dir, weight_dtype dt) {
    char err[VAE_ERR_LEN];
    ck_assert_msg(vae_load_diffusers_dtype(v, dir, dt, err) == 0, "%s", err);
}

typedef struct { float *mean, *logvar, *img; size_t nl, ni; } vae_run;

/* encode B random images (mean, logvar), decode the mean */
static vae_run run_vae(vae_t *v, int B, int H) {
    int h = vae_latent_side(&v->cfg, H);
    vae_run r;
    r.nl = (size_t)B * v->cfg.latent_channels * h * h;
    r.ni = (size_t)B * v->cfg.out_channels * H * H;
    size_t nin = (size_t)B * v->cfg.in_channels * H * H;
    float *x = malloc(sizeof(float) * nin);
    fill_uniform(x, nin, -1, 1, 11);
    r.mean = malloc(sizeof(float) * r.nl);
    r.logvar = malloc(sizeof(float) * r.nl);
    r.img = malloc(sizeof(float) * r.ni);
    ck_assert_msg(vae_alloc_acts(v, B, H, H, 0) == 0, "%s", v->err);
    ck_assert_msg(vae_encode(v, r.mean, r.logvar, x, B, H, H) == 0, "%s", v->err);
    ck_assert_msg(vae_decode(v, r.img, r.mean, B, h, h) == 0, "%s", v->err);
    free(x);
    return r;
}

static void vae_run_free(vae_run *r) { free(r->mean); free(r->logvar); free(r->img); }

static void assert_vae_same(const vae_run *a, const vae_run *b) {
    ck_assert_msg(memcmp(a->mean, b->mean, sizeof(float) * a->nl) == 0, "VAE mean differs");
    ck_assert_msg(memcmp(a->logvar, b->logvar, sizeof(float) * a->nl) == 0, "VAE logvar differs");
    ck_assert_msg(memcmp(a->img, b->img, sizeof(float) * a->ni) == 0, "VAE decode differs");
    double s = 0;
    for (size_t i = 0; i < a->ni; i++) s += fabs(a->img[i]);
    ck_assert(s > 0 && isfinite(s));
}

START_TEST(test_vae_fp16_file_identical) {
    vae_t a, b;
    vae_load(&a, "models/tiny/vae", WEIGHT_F32);
    vae_load(&b, "models/tiny/vae", WEIGHT_F16);
    ck_assert(a.params16 == NULL && b.params16 != NULL && b.wbuf != NULL);
    ck_assert(b.nmat > 0 && b.nmat < b.nparams && a.nparams == b.nparams);
    size_t bad = 0;
    for (int i = 0; i < a.ntable; i++) {
        const vae_param *pa = &a.table[i], *pb = &b.table[i];
        ck_assert(pa->data && pa->numel == pb->numel);
        ck_assert_int_eq(pb->data16 != NULL, pb->ndim >= 2);
        for (size_t k = 0; k < pa->numel; k++)
            bad += fbits(pa->data[k]) != fbits(pb->data16 ? half_to_float(pb->data16[k]) : pb->data[k]);
    }
    ck_assert_msg(bad == 0, "%zu weights differ", bad);
    vae_run ra = run_vae(&a, 2, 64), rb = run_vae(&b, 2, 64);
    assert_vae_same(&ra, &rb);
    /* backward (training the VAE) needs fp32 weights */
    ck_assert(vae_alloc_grads(&b) != 0 && b.grads == NULL);
    ck_assert(strstr(b.err, "fp32") != NULL);
    int h = vae_latent_side(&b.cfg, 16);
    size_t nl = (size_t)b.cfg.latent_channels * h * h;
    float *x = calloc((size_t)3 * 16 * 16, sizeof(float)), *m = malloc(sizeof(float) * nl), *lv = malloc(sizeof(float) * nl);
    ck_assert(vae_alloc_acts(&b, 1, 16, 16, 1) == 0);
    ck_assert(vae_encode(&b, m, lv, x, 1, 16, 16) == 0);
    b.err[0] = 0;
    ck_assert(vae_encoder_backward(&b, m, NULL, x) != 0);
    ck_assert(strstr(b.err, "fp32") != NULL);
    free(x); free(m); free(lv);
    vae_run_free(&ra); vae_run_free(&rb);
    vae_free(&a); vae_free(&b);
}
END_TEST

START_TEST(test_vae_fp32_file_rounded) {
    vae_t a, b, c;
    vae_load(&a, FIXTURE_DIR "vae_a", WEIGHT_F32);
    vae_load(&b, FIXTURE_DIR "vae_a", WEIGHT_F16);
    vae_load(&c, FIXTURE_DIR "vae_a", WEIGHT_F32);
    size_t changed = 0;
    for (int i = 0; i < a.ntable; i++) {
        vae_param *p = &a.table[i];
        if (p->ndim < 2) continue;
        for (size_t k = 0; k < p->numel; k++) {
            float r = half_to_float(float_to_half(p->data[k]));
            changed += r != p->data[k];
            p->data[k] = r;
        }
    }
    ck_assert_msg(changed > 1000, "only %zu weights changed by rounding: is vae_a fp32?", changed);
    int H = 16;
    vae_run ra = run_vae(&a, 2, H), rb = run_vae(&b, 2, H), rc = run_vae(&c, 2, H);
    assert_vae_same(&ra, &rb);
    double e = rel_err(rc.img, ra.img, ra.ni);
    ck_assert_msg(e > 0 && e < 1e-2, "fp16-rounded vs fp32 VAE decode: rel err %g", e);
    vae_run_free(&ra); vae_run_free(&rb); vae_run_free(&rc);
    vae_free(&a); vae_free(&b); vae_free(&c);
}
END_TEST

/* ---- the whole model --------------------------------------------------------- */

/* bytes as the tables say: matrices 2 or 4 bytes a number, vectors 4 */
static size_t table_bytes(const sd_model *m, int f16) {
    size_t b = 0, w = f16 ? 2 : 4;
    for (int i = 0; i < m->clip.ntable; i++) b += m->clip.table[i].numel * (m->clip.table[i].ndim >= 2 ? w : 4);
    for (int i = 0; i < m->unet.ntable; i++) b += m->unet.table[i].numel * (m->unet.table[i].ndim >= 2 ? w : 4);
    for (int i = 0; i < m->vae.ntable; i++) b += m->vae.table[i].numel * (m->vae.table[i].ndim >= 2 ? w : 4);
    return b;
}

START_TEST(test_model_all_parts) {
    char err[SD_ERR_LEN];
    sd_model a, b;
    ck_assert_msg(sd_model_load_dtype(&a, "models/tiny", NULL, WEIGHT_F32, err) == 0, "%s", err);
    ck_assert_msg(sd_model_load_dtype(&b, "models/tiny", NULL, WEIGHT_F16, err) == 0, "%s", err);
    ck_assert(!a.clip.params16 && !a.unet.params16 && !a.vae.params16);
    ck_assert(b.clip.params16 && b.unet.params16 && b.vae.params16);
    size_t ba = sd_model_weight_bytes(&a), bb = sd_model_weight_bytes(&b);
    ck_assert_uint_eq(ba, table_bytes(&a, 0));
    ck_assert_uint_eq(bb, table_bytes(&b, 1));
    ck_assert_msg(bb < ba * 0.52 && bb > ba / 2, "fp16 %zu vs fp32 %zu bytes", bb, ba);
    /* the prompt's context: the same bits */
    const char *pr[2] = {"a red circle", ""};
    size_t n = (size_t)2 * 77 * a.clip.config.hidden_size;
    float *ca = malloc(sizeof(float) * n), *cb = malloc(sizeof(float) * n);
    ck_assert_msg(sd_encode_prompts(&a, pr, 2, 1, ca, err) == 0, "%s", err);
    ck_assert_msg(sd_encode_prompts(&b, pr, 2, 1, cb, err) == 0, "%s", err);
    ck_assert(memcmp(ca, cb, sizeof(float) * n) == 0);
    free(ca); free(cb);
    sd_model_free(&a); sd_model_free(&b);
}
END_TEST

/* A LoRA with text-encoder entries (always merged) on an fp32 model held as
 * fp16: the merge is done in fp32 on the widened weights and rounded back
 * once, so it equals the fp32 merge into hand-rounded weights, rounded. */
START_TEST(test_te_lora_merge_fp16) {
    char err[SD_ERR_LEN];
    sd_model a, b;
    ck_assert_msg(sd_model_load_dtype(&a, FIXTURE_DIR "gen_tiny", NULL, WEIGHT_F32, err) == 0, "%s", err);
    ck_assert_msg(sd_model_load_dtype(&b, FIXTURE_DIR "gen_tiny", NULL, WEIGHT_F16, err) == 0, "%s", err);
    for (int i = 0; i < a.clip.ntable; i++) {
        clip_param *p = &a.clip.table[i];
        if (p->ndim < 2) continue;
        for (size_t k = 0; k < p->numel; k++) p->data[k] = half_to_float(float_to_half(p->data[k]));
    }
    /* before, to see that the merge changed something */
    uint16_t *before = malloc(sizeof(uint16_t) * b.clip.nmat);
    memcpy(before, b.clip.params16, sizeof(uint16_t) * b.clip.nmat);
    lora_file lf;
    char lerr[ST_ERR_LEN];
    ck_assert_msg(lora_file_load(FIXTURE_DIR "gen_lora.safetensors", &lf, lerr) == 0, "%s", lerr);
    ck_assert_msg(sd_apply_lora(&a, &lf, 0.8f, 1, err) == 0, "%s", err);
    ck_assert_msg(sd_apply_lora(&b, &lf, 0.8f, 1, err) == 0, "%s", err);
    lora_file_free(&lf);
    size_t bad = 0, moved = 0;
    for (int i = 0; i < a.clip.ntable; i++) {
        const clip_param *pa = &a.clip.table[i], *pb = &b.clip.table[i];
        if (pa->ndim < 2) continue;
        for (size_t k = 0; k < pa->numel; k++) {
            bad += pb->data16[k] != float_to_half(pa->data[k]);
            moved += pb->data16[k] != before[(size_t)(pb->data16 - b.clip.params16) + k];
        }
    }
    ck_assert_msg(bad == 0, "%zu merged text-encoder weights differ", bad);
    ck_assert_msg(moved > 100, "the merge changed only %zu fp16 weights", moved);
    free(before);
    sd_model_free(&a); sd_model_free(&b);
}
END_TEST

static Suite *fp16_suite(void) {
    Suite *s = suite_create("fp16");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_known_patterns);
    tcase_add_test(tc, test_roundtrip_all);
    tcase_add_test(tc, test_rounding_all_gaps);
    tcase_add_test(tc, test_fp16_file_identical);
    tcase_add_test(tc, test_fp16_file_identical_checkpointed);
    tcase_add_test(tc, test_fp32_file_rounded);
    tcase_add_test(tc, test_loading_details);
    tcase_add_test(tc, test_clip_fp16_file_identical);
    tcase_add_test(tc, test_clip_fp32_file_rounded);
    tcase_add_test(tc, test_vae_fp16_file_identical);
    tcase_add_test(tc, test_vae_fp32_file_rounded);
    tcase_add_test(tc, test_model_all_parts);
    tcase_add_test(tc, test_te_lora_merge_fp16);
    suite_add_tcase(s, tc);
    return s;
}

CHECK_MAIN(fp16_suite)

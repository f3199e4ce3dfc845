/* test_vae.c: AutoencoderKL (vae.c) against diffusers fixtures, finite
 * differences, and bad input.
 *   fixtures: tools/make_vae_fixtures.py (vae_a: fp32, 16x16; vae_b: fp16,
 *   3 levels, 18x20 images so a downsample sees an odd side, one logvar
 *   channel clamped at 20). */
#include <unistd.h>
#include <sys/stat.h>
#include "testutil.h"
#include "vae.h"
#include "json.h"

#define OUT_TOL 1e-4
#define GRAD_TOL 1e-3

static void load(vae_t *v, const char *tag) {
    char dir[256], err[VAE_ERR_LEN];
    snprintf(dir, sizeof dir, FIXTURE_DIR "vae_%s", tag);
    ck_assert_msg(vae_load_diffusers(v, dir, err) == 0, "%s", err);
}

static size_t numel_of(const st_file *f, const char *name) {
    const st_tensor *t = st_find(f, name);
    ck_assert_msg(t != NULL, "fixture tensor %s missing", name);
    return t->numel;
}

static int dim_of(const st_file *f, const char *name, int d) {
    const st_tensor *t = st_find(f, name);
    ck_assert_msg(t != NULL && t->ndim == 4, "fixture tensor %s missing", name);
    return (int)t->shape[d];
}

static double check_close(const char *what, const float *got, const float *want, size_t n, double tol) {
    double e = rel_err(got, want, n);
    printf("  %-60s rel_err %.2e\n", what, e);
    fflush(stdout);
    ck_assert_msg(e < tol, "%s: rel_err %g >= %g", what, e, tol);
    return e;
}

/* compare every "<prefix><param>" fixture tensor with v->grads at that param */
static void check_weight_grads(const vae_t *v, const st_file *io, const char *prefix, const char *tag) {
    size_t lp = strlen(prefix);
    int seen = 0;
    for (int i = 0; i < io->ntensors; i++) {
        const char *nm = io->tensors[i].name;
        if (strncmp(nm, prefix, lp) != 0) continue;
        int k = vae_param_index(v, nm + lp);
        ck_assert_msg(k >= 0, "no parameter %s", nm + lp);
        size_t n = io->tensors[i].numel;
        float *want = fx_get(io, nm, n);
        char what[160];
        snprintf(what, sizeof what, "%s %s", tag, nm);
        check_close(what, v->grads + v->table[k].offset, want, n, GRAD_TOL);
        free(want);
        seen++;
    }
    ck_assert_msg(seen >= 4, "only %d weight-gradient fixtures under %s", seen, prefix);
}

/* ------------------------------------------------------------ parity */

static void parity(const char *tag) {
    vae_t v;
    load(&v, tag);
    st_file io;
    char iname[64];
    snprintf(iname, sizeof iname, "vae_%s_io.safetensors", tag);
    fx_open(&io, iname);
    printf("vae_%s (%zu params)\n", tag, v.nparams);

    int B = dim_of(&io, "x", 0), H = dim_of(&io, "x", 2), W = dim_of(&io, "x", 3);
    size_t nx = numel_of(&io, "x"), nl = numel_of(&io, "mean");
    ck_assert_int_eq(dim_of(&io, "mean", 2), vae_latent_side(&v.cfg, H));
    ck_assert_int_eq(dim_of(&io, "mean", 3), vae_latent_side(&v.cfg, W));
    float *x = fx_get(&io, "x", nx), *mean_r = fx_get(&io, "mean", nl), *logvar_r = fx_get(&io, "logvar", nl);
    float *noise = fx_get(&io, "noise", nl), *sample_r = fx_get(&io, "sample", nl);
    float *r_mean = fx_get(&io, "r_mean", nl), *r_logvar = fx_get(&io, "r_logvar", nl);
    float *dx_r = fx_get(&io, "dx", nx);
    float *mean = malloc(nl * sizeof(float)), *logvar = malloc(nl * sizeof(float));
    float *tmp = malloc(nl * sizeof(float)), *dx = malloc(nx * sizeof(float));

    /* encoder, inference mode first: the results must not depend on the mode */
    ck_assert_msg(vae_alloc_acts(&v, B, H, W, 0) == 0, "%s", v.err);
    size_t infer_floats = vae_acts_floats(&v);
    ck_assert_msg(vae_encode(&v, mean, logvar, x, B, H, W) == 0, "%s", v.err);
    check_close("encode mean (inference arena)", mean, mean_r, nl, OUT_TOL);
    check_close("encode logvar (inference arena)", logvar, logvar_r, nl, OUT_TOL);
    ck_assert(vae_encoder_backward(&v, r_mean, r_logvar, dx) == -1);   /* no training forward */

    ck_assert_msg(vae_alloc_acts(&v, B, H, W, 1) == 0, "%s", v.err);
    ck_assert_msg(vae_acts_floats(&v) > infer_floats, "training arena %zu not above inference %zu",
                  vae_acts_floats(&v), infer_floats);
    ck_assert_msg(vae_alloc_grads(&v) == 0, "%s", v.err);
    ck_assert_msg(vae_encode(&v, mean, logvar, x, B, H, W) == 0, "%s", v.err);
    check_close("encode mean", mean, mean_r, nl, OUT_TOL);
    check_close("encode logvar", logvar, logvar_r, nl, OUT_TOL);
    vae_posterior_sample(tmp, mean, logvar, noise, nl);
    check_close("posterior sample", tmp, sample_r, nl, OUT_TOL);

    ck_assert_msg(vae_encoder_backward(&v, r_mean, r_logvar, dx) == 0, "%s", v.err);
    check_close("d(encoder)/dx", dx, dx_r, nx, GRAD_TOL);
    check_weight_grads(&v, &io, "egrad.", "encoder");

    /* a second backward adds the same weight gradients again, and gives the
     * same (written, not accumulated) input gradient */
    float *dx2 = malloc(nx * sizeof(float));
    int k = vae_param_index(&v, "encoder.conv_in.weight");
    ck_assert_int_ge(k, 0);
    float g0 = v.grads[v.table[k].offset + 5];
    ck_assert(vae_encoder_backward(&v, r_mean, r_logvar, dx2) == 0);
    ck_assert(rel_err(dx2, dx, nx) == 0);
    ck_assert_msg(fabsf(v.grads[v.table[k].offset + 5] - 2 * g0) <= 1e-5f * fabsf(g0) + 1e-7f,
                  "weight gradient does not accumulate");
    free(dx2);

    /* latents for the UNet: scaling_factor * sample (or * mean) */
    float sf = v.cfg.scaling_factor;
    ck_assert_msg(fabsf(sf - 0.18215f) < 1e-7f, "scaling_factor %g", sf);
    float *want = malloc(nl * sizeof(float));
    ck_assert(vae_encode_latents(&v, tmp, x, noise, B, H, W) == 0);
    for (size_t i = 0; i < nl; i++) want[i] = sf * sample_r[i];
    check_close("encode_latents (sampled) = 0.18215 sample", tmp, want, nl, OUT_TOL);
    ck_assert(vae_encode_latents(&v, tmp, x, NULL, B, H, W) == 0);
    for (size_t i = 0; i < nl; i++) want[i] = sf * mean_r[i];
    check_close("encode_latents (mean) = 0.18215 mean", tmp, want, nl, OUT_TOL);
    free(want);

    /* decoder */
    int zh = dim_of(&io, "z", 2), zw = dim_of(&io, "z", 3);
    size_t nz = numel_of(&io, "z"), nd = numel_of(&io, "dec");
    ck_assert_int_eq(dim_of(&io, "dec", 2), zh << (v.cfg.nlevels - 1));
    ck_assert_int_eq(dim_of(&io, "dec", 3), zw << (v.cfg.nlevels - 1));
    float *z = fx_get(&io, "z", nz), *dec_r = fx_get(&io, "dec", nd);
    float *r_dec = fx_get(&io, "r_dec", nd), *dz_r = fx_get(&io, "dz", nz);
    float *dec = malloc(nd * sizeof(float)), *dz = malloc(nz * sizeof(float));
    int f = 1 << (v.cfg.nlevels - 1);
    ck_assert_msg(vae_alloc_acts(&v, B, zh * f, zw * f, 1) == 0, "%s", v.err);
    vae_zero_grads(&v);
    ck_assert_msg(vae_decode(&v, dec, z, B, zh, zw) == 0, "%s", v.err);
    check_close("decode", dec, dec_r, nd, OUT_TOL);
    ck_assert_msg(vae_decoder_backward(&v, r_dec, dz) == 0, "%s", v.err);
    check_close("d(decoder)/dz", dz, dz_r, nz, GRAD_TOL);
    check_weight_grads(&v, &io, "dgrad.", "decoder");

    /* decode_latents divides by the scaling factor first: same image, and
     * the latent gradient is dz / scaling_factor */
    float *lat = malloc(nz * sizeof(float));
    for (size_t i = 0; i < nz; i++) lat[i] = z[i] * sf;
    ck_assert(vae_decode_latents(&v, dec, lat, B, zh, zw) == 0);
    check_close("decode_latents(0.18215 z)", dec, dec_r, nd, OUT_TOL);
    ck_assert(vae_decoder_backward(&v, r_dec, dz) == 0);
    for (size_t i = 0; i < nz; i++) lat[i] = dz_r[i] / sf;
    check_close("d(decode_latents)/dlatents = dz / 0.18215", dz, lat, nz, GRAD_TOL);
    free(lat);

    /* frozen (no grad block): the same input gradient, nothing else touched */
    free(v.grads); v.grads = NULL;
    ck_assert(vae_decode(&v, dec, z, B, zh, zw) == 0);
    ck_assert(vae_decoder_backward(&v, r_dec, dz) == 0);
    check_close("d(decoder)/dz, frozen weights", dz, dz_r, nz, GRAD_TOL);

    /* the decoder in inference mode */
    ck_assert(vae_alloc_acts(&v, B, zh * f, zw * f, 0) == 0);
    ck_assert(vae_decode(&v, dec, z, B, zh, zw) == 0);
    check_close("decode (inference arena)", dec, dec_r, nd, OUT_TOL);
    ck_assert(vae_decoder_backward(&v, r_dec, dz) == -1);

    free(x); free(mean_r); free(logvar_r); free(noise); free(sample_r); free(r_mean); free(r_logvar);
    free(dx_r); free(mean); free(logvar); free(tmp); free(dx);
    free(z); free(dec_r); free(r_dec); free(dz_r); free(dec); free(dz);
    st_close(&io);
    vae_free(&v);
}

START_TEST(test_parity_a) { parity("a"); }
END_TEST

START_TEST(test_parity_b) { parity("b"); }
END_TEST

/* config B has one logvar channel at the clamp: exactly 20 there, and the
 * logvar gradient must not reach the image through it */
START_TEST(test_logvar_clamp) {
    vae_t v;
    load(&v, "b");
    int B = 1, H = 18, W = 20, h = 4, w = 5, Lc = 4;
    size_t nx = (size_t)B * 3 * H * W, nl = (size_t)B * Lc * h * w;
    float *x = malloc(nx * sizeof(float)), *mean = malloc(nl * sizeof(float));
    float *lv = malloc(nl * sizeof(float)), *dl = calloc(nl, sizeof(float)), *dx = malloc(nx * sizeof(float));
    fill_uniform(x, nx, -1, 1, 5);
    ck_assert(vae_alloc_acts(&v, B, H, W, 1) == 0);
    ck_assert(vae_encode(&v, mean, lv, x, B, H, W) == 0);
    for (int i = 0; i < h * w; i++) ck_assert_float_eq(lv[3 * h * w + i], 20.0f);
    for (int i = 0; i < h * w; i++) dl[3 * h * w + i] = 1.0f;       /* only the clamped channel */
    ck_assert(vae_encoder_backward(&v, NULL, dl, dx) == 0);
    for (size_t i = 0; i < nx; i++) ck_assert_float_eq(dx[i], 0.0f);
    dl[0] = 1.0f;                                                   /* an unclamped one */
    ck_assert(vae_encoder_backward(&v, NULL, dl, dx) == 0);
    double s = 0;
    for (size_t i = 0; i < nx; i++) s += fabs(dx[i]);
    ck_assert(s > 0);
    free(x); free(mean); free(lv); free(dl); free(dx);
    vae_free(&v);
}
END_TEST

/* ------------------------------------------------------------ finite differences */

typedef struct {
    vae_t *v;
    int dec, B, H, W;      /* dec: decoder on (B, 4, H, W), else encoder on (B, 3, H, W) */
    float *in, *out1, *out2, *R1, *R2;
    size_t n1;
} fdcase;

/* encoder: L = sum(mean R1) + sum(logvar R2);  decoder: L = sum(img R1) */
static double fd_loss(void *ctx) {
    fdcase *c = ctx;
    if (c->dec) {
        ck_assert(vae_decode(c->v, c->out1, c->in, c->B, c->H, c->W) == 0);
        return dot_d(c->out1, c->R1, c->n1);
    }
    ck_assert(vae_encode(c->v, c->out1, c->out2, c->in, c->B, c->H, c->W) == 0);
    return dot_d(c->out1, c->R1, c->n1) + dot_d(c->out2, c->R2, c->n1);
}

/* The forward is float32, so a difference quotient carries noise of about
 * |L| 1e-7 / eps whatever the gradient entry's size: an absolute floor of 1%
 * of the tensor's largest gradient keeps small entries from reading that noise
 * as error (the same scale-relative view as rel_err). A wrong gradient is off
 * by O(1) of that scale and still fails; the exact check is the torch parity. */
static double fd_atol(const float *g, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) if (fabs(g[i]) > m) m = fabs(g[i]);
    return 1e-2 * m + 1e-6;
}

static void fd_run(const char *tag, int dec) {
    vae_t v;
    load(&v, tag);
    int B = 1, H = dec ? 3 : 12, W = dec ? 2 : 10;
    int f = 1 << (v.cfg.nlevels - 1);
    int h = vae_latent_side(&v.cfg, H), w = vae_latent_side(&v.cfg, W);
    size_t nin = dec ? (size_t)B * 4 * H * W : (size_t)B * 3 * H * W;
    size_t nout = dec ? (size_t)B * 3 * H * f * W * f : (size_t)B * 4 * h * w;
    fdcase c = { &v, dec, B, H, W, malloc(nin * 4), malloc(nout * 4), malloc(nout * 4),
                 malloc(nout * 4), malloc(nout * 4), nout };
    fill_uniform(c.in, nin, -1, 1, 11);
    fill_uniform(c.R1, nout, -1, 1, 12);
    fill_uniform(c.R2, nout, -1, 1, 13);
    ck_assert(vae_alloc_acts(&v, B, dec ? H * f : H, dec ? W * f : W, 1) == 0);
    ck_assert(vae_alloc_grads(&v) == 0);
    float *din = malloc(nin * 4);
    fd_loss(&c);
    if (dec) ck_assert(vae_decoder_backward(&v, c.R1, din) == 0);
    else ck_assert(vae_encoder_backward(&v, c.R1, c.R2, din) == 0);
    double e = grad_check(c.in, din, nin, fd_loss, &c, 1e-2f, fd_atol(din, nin), 12);
    printf("  vae_%s %s input: finite-difference worst %.2e\n", tag, dec ? "decoder" : "encoder", e);
    ck_assert_msg(e < 2e-2, "input gradient vs finite differences: %g", e);

    /* a few weights, through the grad block */
    const char *enc_p[] = { "encoder.mid_block.attentions.0.to_q.weight",
                            "encoder.down_blocks.0.downsamplers.0.conv.weight", "quant_conv.bias" };
    const char *dec_p[] = { "decoder.mid_block.attentions.0.group_norm.weight",
                            "decoder.up_blocks.0.upsamplers.0.conv.weight", "post_quant_conv.weight" };
    float *gcopy = malloc(v.nparams * 4);
    memcpy(gcopy, v.grads, v.nparams * 4);
    for (int i = 0; i < 3; i++) {
        const char *nm = dec ? dec_p[i] : enc_p[i];
        int k = vae_param_index(&v, nm);
        ck_assert_msg(k >= 0, "%s", nm);
        size_t n = 1;
        for (int d = 0; d < v.table[k].ndim; d++) n *= (size_t)v.table[k].shape[d];
        e = grad_check(v.params + v.table[k].offset, gcopy + v.table[k].offset, n, fd_loss, &c, 1e-2f,
                       fd_atol(gcopy + v.table[k].offset, n), 6);
        printf("  vae_%s %s: finite-difference worst %.2e\n", tag, nm, e);
        ck_assert_msg(e < 2e-2, "%s vs finite differences: %g", nm, e);
    }
    free(gcopy); free(din);
    free(c.in); free(c.out1); free(c.out2); free(c.R1); free(c.R2);
    vae_free(&v);
}

START_TEST(test_fd_encoder) { fd_run("a", 0); fd_run("b", 0); }
END_TEST

START_TEST(test_fd_decoder) { fd_run("a", 1); fd_run("b", 1); }
END_TEST

/* ------------------------------------------------------------ config and files */

static void write_file(const char *path, const void *data, size_t n) {
    FILE *fp = fopen(path, "wb");
    ck_assert_msg(fp != NULL, "cannot write %s", path);
    ck_assert(fwrite(data, 1, n, fp) == n);
    fclose(fp);
}

static char *slurp(const char *path, size_t *n) {
    FILE *fp = fopen(path, "rb");
    ck_assert_msg(fp != NULL, "cannot read %s", path);
    fseek(fp, 0, SEEK_END);
    long len = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    char *s = malloc((size_t)len + 1);
    ck_assert(fread(s, 1, (size_t)len, fp) == (size_t)len);
    fclose(fp);
    s[len] = 0;
    *n = (size_t)len;
    return s;
}

static char tmpdir[64];

static void make_tmpdir(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/test_vae_XXXXXX");
    ck_assert(mkdtemp(tmpdir) != NULL);
}

static void remove_tmpdir(void) {
    char p[128];
    snprintf(p, sizeof p, "%s/config.json", tmpdir); unlink(p);
    snprintf(p, sizeof p, "%s/diffusion_pytorch_model.safetensors", tmpdir); unlink(p);
    rmdir(tmpdir);
}

/* config A's text with one substitution (or as is when from == NULL) */
static void put_config(const char *from, const char *to) {
    size_t n;
    char *s = slurp(FIXTURE_DIR "vae_a/config.json", &n), p[128];
    char *out = malloc(n + strlen(to ? to : "") + 1);
    if (from) {
        char *at = strstr(s, from);
        ck_assert_msg(at != NULL, "config has no %s", from);
        size_t pre = (size_t)(at - s);
        memcpy(out, s, pre);
        strcpy(out + pre, to);
        strcat(out, at + strlen(from));
    } else {
        strcpy(out, s);
    }
    snprintf(p, sizeof p, "%s/config.json", tmpdir);
    write_file(p, out, strlen(out));
    free(s); free(out);
}

static void put_weights_of_a(void) {
    size_t n;
    char *s = slurp(FIXTURE_DIR "vae_a/diffusion_pytorch_model.safetensors", &n), p[128];
    snprintf(p, sizeof p, "%s/diffusion_pytorch_model.safetensors", tmpdir);
    write_file(p, s, n);
    free(s);
}

/* load tmpdir and expect an error containing want */
static void expect_error(const char *want) {
    vae_t v;
    char err[VAE_ERR_LEN] = "";
    int rc = vae_load_diffusers(&v, tmpdir, err);
    printf("  -> %s\n", err);
    ck_assert_msg(rc == -1, "expected an error about %s", want);
    ck_assert_msg(strstr(err, want) != NULL, "error '%s' does not mention '%s'", err, want);
}

START_TEST(test_bad_config) {
    make_tmpdir();
    put_weights_of_a();
    put_config(NULL, NULL);
    vae_t v; char err[VAE_ERR_LEN];
    ck_assert_msg(vae_load_diffusers(&v, tmpdir, err) == 0, "%s", err);   /* the copy itself is fine */
    vae_free(&v);

    put_config("\"act_fn\": \"silu\"", "\"act_fn\": \"gelu\"");                expect_error("act_fn");
    put_config("\"in_channels\": 3,", "\"in_channels\": 3, \"wobble\": 1,");   expect_error("wobble");
    put_config("\"norm_num_groups\": 4", "\"norm_num_groups\": 3");            expect_error("norm_num_groups");
    put_config("\"layers_per_block\": 1", "\"layers_per_block\": 1.5");        expect_error("layers_per_block");
    put_config("\"latents_mean\": null", "\"latents_mean\": [0, 0, 0, 0]");    expect_error("latents_mean");
    put_config("\"DownEncoderBlock2D\",", "\"AttnDownEncoderBlock2D\",");       expect_error("down_block_types");
    put_config("\"UpDecoderBlock2D\",", "");                                    expect_error("up_block_types");
    put_config("\"scaling_factor\": 0.18215", "\"scaling_factor\": -1");       expect_error("scaling_factor");
    put_config("\"block_out_channels\": [", "\"block_out_channels\": [\"8\", "); expect_error("block_out_channels");
    put_config("\"use_quant_conv\": true", "\"use_quant_conv\": 1");           expect_error("use_quant_conv");
    put_config("}", "");                                                      expect_error("config.json");
    /* a config that is valid but describes another model: the weights disagree */
    put_config("\"latent_channels\": 4", "\"latent_channels\": 8");           expect_error("shape");
    put_config("\"use_quant_conv\": true", "\"use_quant_conv\": false");      expect_error("quant_conv");
    put_config("\"mid_block_add_attention\": true", "\"mid_block_add_attention\": false");
    expect_error("attentions.0");
    remove_tmpdir();
    vae_free(&v);

    /* defaults of an empty config are diffusers' */
    char jerr[256];
    json *j = json_parse("{}", 2, jerr, sizeof jerr);
    vae_config c;
    ck_assert(vae_config_from_json(&c, j, err) == 0);
    ck_assert_int_eq(c.nlevels, 1); ck_assert_int_eq(c.block_out[0], 64);
    ck_assert_int_eq(c.groups, 32); ck_assert_int_eq(c.layers, 1);
    ck_assert_int_eq(c.latent_channels, 4); ck_assert(c.mid_attn && c.quant_conv && c.post_quant_conv);
    ck_assert(fabsf(c.scaling_factor - 0.18215f) < 1e-7f && c.shift_factor == 0.0f);
    json_free(j);

    /* names from the file with control bytes in them (JSON escapes) stay on
     * one line in the message: a key, a block type, act_fn (found by fuzz_config) */
    const char *odd[] = {
        "{\"lat\\nt_channels\": 4}",
        "{\"block_out_channels\": [64], \"down_block_types\": [\"Down\\nBlock\"]}",
        "{\"act_fn\": \"si\\r\\nlu\"}",
    };
    for (int i = 0; i < 3; i++) {
        j = json_parse(odd[i], strlen(odd[i]), jerr, sizeof jerr);
        ck_assert_msg(j != NULL, "%s", jerr);
        err[0] = 0;
        ck_assert(vae_config_from_json(&c, j, err) == -1);
        ck_assert_msg(err[0] && !strchr(err, '\n') && !strchr(err, '\r'), "case %d: [%s]", i, err);
        ck_assert_msg(strstr(err, "\\x0a"), "case %d: the newline is shown escaped: [%s]", i, err);
        json_free(j);
    }
}
END_TEST

/* rewrite A's weights through a filter: drop / reshape / rename / add */
typedef enum { W_DROP, W_RESHAPE, W_EXTRA, W_OLDNAMES, W_PREFIX } wedit;

static void put_weights_edited(wedit what, const char *target) {
    st_file f; char err[ST_ERR_LEN], p[128];
    fx_open(&f, "vae_a/diffusion_pytorch_model.safetensors");
    st_writer *w = st_writer_new();
    for (int i = 0; i < f.ntensors; i++) {
        const st_tensor *t = &f.tensors[i];
        char name[256];
        snprintf(name, sizeof name, "%s%s", what == W_PREFIX ? "first_stage_model." : "", t->name);
        int64_t shape[ST_MAX_DIMS];
        int ndim = t->ndim;
        memcpy(shape, t->shape, sizeof shape);
        if (target && strcmp(t->name, target) == 0) {
            if (what == W_DROP) continue;
            if (what == W_RESHAPE) { shape[0] = 1; shape[1] = (int64_t)t->numel; ndim = 2; }
        }
        if (what == W_OLDNAMES) {       /* the pre-0.15 diffusers attention names */
            const char *olds[][2] = { { ".to_q.", ".query." }, { ".to_k.", ".key." }, { ".to_v.", ".value." },
                                      { ".to_out.0.", ".proj_attn." } };
            for (int r = 0; r < 4; r++) {
                const char *at = strstr(t->name, olds[r][0]);
                if (at) snprintf(name, sizeof name, "%.*s%s%s", (int)(at - t->name), t->name, olds[r][1],
                                 at + strlen(olds[r][0]));
            }
            /* and as 1x1 convs, as the LDM checkpoints store them */
            if (strstr(name, "attentions") && ndim == 2) { shape[2] = shape[3] = 1; ndim = 4; }
        }
        ck_assert(st_writer_add(w, name, t->dtype, ndim, shape, t->data) == 0);
    }
    if (what == W_EXTRA || what == W_PREFIX) {
        float one = 1; int64_t s1[1] = { 1 };
        ck_assert(st_writer_add(w, what == W_EXTRA ? target : "model.diffusion_model.x", ST_F32, 1, s1, &one) == 0);
    }
    snprintf(p, sizeof p, "%s/diffusion_pytorch_model.safetensors", tmpdir);
    ck_assert_msg(st_writer_save(w, p, err) == 0, "%s", err);
    st_writer_free(w);
    st_close(&f);
}

static const char *ldm_map(const char *name, void *ctx, char *buf, size_t len) {
    snprintf(buf, len, "%s%s", (const char *)ctx, name);
    return buf;
}

START_TEST(test_bad_weights) {
    make_tmpdir();
    put_config(NULL, NULL);
    put_weights_edited(W_DROP, "decoder.up_blocks.1.resnets.0.conv_shortcut.weight");
    expect_error("decoder.up_blocks.1.resnets.0.conv_shortcut.weight");
    put_weights_edited(W_RESHAPE, "encoder.mid_block.attentions.0.to_v.weight");
    expect_error("encoder.mid_block.attentions.0.to_v.weight");
    put_weights_edited(W_EXTRA, "encoder.stray.weight");
    expect_error("encoder.stray.weight");

    /* truncated at several points, and an empty file: an error, never a crash */
    size_t n;
    char *s = slurp(FIXTURE_DIR "vae_a/diffusion_pytorch_model.safetensors", &n), p[128];
    snprintf(p, sizeof p, "%s/diffusion_pytorch_model.safetensors", tmpdir);
    size_t cuts[] = { 0, 4, 9, 200, n / 2, n - 1 };
    for (int i = 0; i < 6; i++) {
        write_file(p, s, cuts[i]);
        expect_error("diffusion_pytorch_model.safetensors");
    }
    free(s);
    unlink(p);
    expect_error("diffusion_pytorch_model.safetensors");                 /* absent */
    put_weights_of_a();
    snprintf(p, sizeof p, "%s/config.json", tmpdir);
    unlink(p);
    expect_error("config.json");                                        /* absent */
    remove_tmpdir();
}
END_TEST

/* the same weights under other names load to the same model */
START_TEST(test_other_names) {
    vae_t ref, v;
    char err[VAE_ERR_LEN];
    load(&ref, "a");
    make_tmpdir();
    put_config(NULL, NULL);
    put_weights_edited(W_OLDNAMES, NULL);
    ck_assert_msg(vae_load_diffusers(&v, tmpdir, err) == 0, "%s", err);
    ck_assert_int_eq(v.nparams, ref.nparams);
    ck_assert(memcmp(v.params, ref.params, v.nparams * sizeof(float)) == 0);
    vae_free(&v);

    /* a single-file checkpoint: our names mapped by a callback, the file's
     * other models ignored, an extra tensor under our prefix an error */
    put_weights_edited(W_PREFIX, NULL);
    ck_assert(vae_build(&v, &ref.cfg, err) == 0);
    st_file f; char p[128];
    snprintf(p, sizeof p, "%s/diffusion_pytorch_model.safetensors", tmpdir);
    ck_assert_msg(st_open(&f, p, err) == 0, "%s", err);
    ck_assert_msg(vae_load_st(&v, &f, ldm_map, "first_stage_model.", "first_stage_model.", err) == 0, "%s", err);
    ck_assert(memcmp(v.params, ref.params, v.nparams * sizeof(float)) == 0);
    ck_assert(vae_load_st(&v, &f, ldm_map, "first_stage_model.", "", err) == -1);   /* the unet tensor */
    ck_assert_msg(strstr(err, "model.diffusion_model.x") != NULL, "%s", err);
    ck_assert(vae_load_st(&v, &f, NULL, NULL, NULL, err) == -1);                     /* unmapped names */
    st_close(&f);
    vae_free(&v);
    remove_tmpdir();
    vae_free(&ref);
}
END_TEST

START_TEST(test_shape_errors) {
    vae_t v;
    load(&v, "a");
    float x[2 * 3 * 32 * 32], m[2 * 4 * 16 * 16], l[2 * 4 * 16 * 16];
    fill_uniform(x, sizeof x / sizeof x[0], -1, 1, 3);
    ck_assert(vae_encode(&v, m, l, x, 1, 16, 16) == -1);                /* no arena yet */
    printf("  -> %s\n", v.err);
    ck_assert(vae_alloc_acts(&v, 1, 16, 16, 0) == 0);
    ck_assert(vae_encode(&v, m, l, x, 1, 16, 16) == 0);
    ck_assert(vae_encode(&v, m, l, x, 1, 8, 8) == 0);                   /* smaller fits */
    ck_assert(vae_encode(&v, m, l, x, 2, 32, 32) == -1);                /* bigger does not */
    printf("  -> %s\n", v.err);
    ck_assert(strstr(v.err, "vae_alloc_acts") != NULL);
    ck_assert(vae_encode(&v, m, l, x, 1, 1, 1) == -1);                  /* cannot downsample */
    ck_assert(vae_alloc_acts(&v, 1, 1, 8, 0) == -1);
    ck_assert(vae_decode(&v, x, m, 1, 0, 4) == -1);
    vae_free(&v);
}
END_TEST

static Suite *vae_suite(void) {
    Suite *s = suite_create("vae");
    TCase *tc = tcase_create("vae");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_parity_a);
    tcase_add_test(tc, test_parity_b);
    tcase_add_test(tc, test_logvar_clamp);
    tcase_add_test(tc, test_fd_encoder);
    tcase_add_test(tc, test_fd_decoder);
    tcase_add_test(tc, test_bad_config);
    tcase_add_test(tc, test_bad_weights);
    tcase_add_test(tc, test_other_names);
    tcase_add_test(tc, test_shape_errors);
    suite_add_tcase(s, tc);
    return s;
}

CHECK_MAIN(vae_suite)

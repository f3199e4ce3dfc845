/* test_tiny_base.c: the pre-training program of the bundled tiny model
 * (tools/tiny_base.c), run for a few steps on a few base images: both stages
 * must lower their loss, two runs with the same seed must agree bit for bit,
 * and what it writes must load. The full run is `make tiny-base`. */
#define TINY_BASE_NO_MAIN
#include "tools/tiny_base.c"
#include "model.h"
#include "testutil.h"

static void short_opts(tb_opts *o) {
    tb_default_opts(o);
    o->images = 16;
    o->save = 0;
    o->vae_data_dir = "";   /* the base pictures only: the VAE set is drawn by make tiny-base */
    o->vae.steps = 5; o->vae.batch = 2; o->vae.log_every = 0;
    o->diff.steps = 6; o->diff.batch = 2; o->diff.log_every = 0;
}

/* both stages learn, and the run is a function of the seed */
START_TEST(test_short_run) {
    tb_opts o;
    tb_result a, b;
    short_opts(&o);
    ck_assert_int_eq(tb_run(&o, &a), 0);
    ck_assert_int_eq(tb_run(&o, &b), 0);
    /* the trained VAE reconstructs better than its random initialisation,
     * and the denoiser predicts the noise better than its initialisation,
     * on the same fixed (image, t, noise) draws */
    ck_assert_msg(a.vae.eval_mse < a.vae.init_mse, "vae: %g !< %g", a.vae.eval_mse, a.vae.init_mse);
    ck_assert_msg(a.diff_eval < a.diff.init_eval, "unet: %g !< %g", a.diff_eval, a.diff.init_eval);
    ck_assert(isfinite(a.vae.scaling) && a.vae.scaling > 0);
    ck_assert_int_ge(a.vocab, BPE_MIN_VOCAB);
    /* same seed, same numbers */
    ck_assert(a.vae.eval_mse == b.vae.eval_mse && a.vae.loss_last == b.vae.loss_last);
    ck_assert(a.vae.scaling == b.vae.scaling);
    ck_assert(a.diff.loss_last == b.diff.loss_last && a.diff_eval == b.diff_eval);
}
END_TEST

/* a missing VAE set is an error before anything is written */
START_TEST(test_missing_vae_data) {
    tb_opts o;
    tb_result r;
    short_opts(&o);
    o.save = 1;
    o.out_dir = "/tmp/sdlora_tiny_base_never_written";
    o.vae_data_dir = "/tmp/sdlora_no_such_vae_data";
    ck_assert_int_eq(tb_run(&o, &r), -1);
    struct stat st;
    ck_assert_int_ne(stat(o.out_dir, &st), 0);
}
END_TEST

/* the config texts are what our parsers accept, and fit together:
 * 64x64 images -> 16x16 latents, UNet context width = text hidden size,
 * bos/eos = the last two ids of the trained vocabulary */
START_TEST(test_configs_fit) {
    vae_t v;
    unet_t u;
    clip_t m;
    memset(&v, 0, sizeof v); memset(&u, 0, sizeof u); memset(&m, 0, sizeof m);
    ck_assert_int_eq(build_vae(&v, 0.5f), 0);
    ck_assert_int_eq(vae_latent_side(&v.cfg, TB_IMG), TB_LAT);
    ck_assert_int_eq(TB_LAT, 16);
    ck_assert_int_eq(v.cfg.latent_channels, TB_LC);
    ck_assert(v.cfg.scaling_factor == 0.5f);
    ck_assert_int_eq(build_unet(&u), 0);
    ck_assert_int_eq(u.cfg.in_channels, v.cfg.latent_channels);
    ck_assert_int_eq(u.cfg.sample_size, TB_LAT);
    ck_assert_int_eq(build_clip(&m, 700), 0);
    ck_assert_int_eq(u.cfg.cross_dim, m.config.hidden_size);
    ck_assert_int_eq(m.config.bos_token_id, 698);
    ck_assert_int_eq(m.config.eos_token_id, 699);
    ck_assert_int_eq(m.config.max_pos, TOK_CTX);
    /* every tensor initialised: norms 1, no NaN, conv weights within 1/sqrt(fan_in) */
    rng_t r;
    rng_seed(&r, 3);
    init_unet(&u, &r);
    int k = unet_param_index(&u, "conv_in.weight");
    ck_assert_int_ge(k, 0);
    const unet_param *p = &u.table[k];
    float bound = 1.0f / sqrtf((float)(p->shape[1] * p->shape[2] * p->shape[3])), mx = 0;
    for (size_t i = 0; i < (size_t)p->shape[0] * p->shape[1] * p->shape[2] * p->shape[3]; i++)
        mx = fmaxf(mx, fabsf(u.params[p->offset + i]));
    ck_assert(mx <= bound && mx > 0.5f * bound);
    k = unet_param_index(&u, "conv_norm_out.weight");
    ck_assert(u.params[u.table[k].offset] == 1.0f);
    vae_free(&v); unet_free(&u); clip_free(&m);
}
END_TEST

/* the committed model loads with the project's own loader and fits the
 * size budget (skipped before `make tiny-base` has written it) */
START_TEST(test_committed_model) {
    FILE *f = fopen("models/tiny/model_index.json", "rb");
    if (!f) return;
    fclose(f);
    sd_model md;
    char err[SD_ERR_LEN];
    memset(&md, 0, sizeof md);
    ck_assert_msg(sd_model_load(&md, "models/tiny", NULL, err) == 0, "%s", err);
    ck_assert_int_eq(sd_latent_side(&md, TB_IMG), TB_LAT);
    ck_assert_int_eq(md.unet.cfg.cross_dim, md.clip.config.hidden_size);
    const char *files[] = {"models/tiny/unet/diffusion_pytorch_model.safetensors",
                           "models/tiny/vae/diffusion_pytorch_model.safetensors",
                           "models/tiny/text_encoder/model.safetensors"};
    long total = 0;
    for (int i = 0; i < 3; i++) {
        struct stat st;
        ck_assert_int_eq(stat(files[i], &st), 0);
        total += (long)st.st_size;
    }
    ck_assert_msg(total < 18L * 1024 * 1024, "weights %ld bytes", total);
    int ids[TOK_CTX];
    tok_encode_sd(md.tok, "a big red circle on the left, blue background", ids);
    ck_assert_int_eq(ids[0], md.clip.config.bos_token_id);

    /* it is trained, not random: on 16 base images the VAE reconstructs
     * with a tenth of the error of a flat image of each picture's mean
     * colour (a random VAE is about 4x worse than flat; the committed one,
     * 29.5 dB on the base set, measured 0.00496 against 0.135), and the
     * UNet's noise prediction has less than half the error of predicting
     * zero (which is E[eps^2] = 1) */
    tb_data d;
    ck_assert_int_eq(tb_data_load(&d, "models/tiny/data", 16), 0);
    const size_t per = 3 * TB_IMG * TB_IMG, hw = TB_IMG * TB_IMG;
    double flat = 0;
    for (int i = 0; i < d.n; i++)
        for (int c = 0; c < 3; c++) {
            const float *x = d.img + i * per + c * hw;
            double mu = 0, se = 0;
            for (size_t k = 0; k < hw; k++) mu += x[k];
            mu /= hw;
            for (size_t k = 0; k < hw; k++) se += (x[k] - mu) * (x[k] - mu);
            flat += se;
        }
    flat /= (double)d.n * per;
    float rec = vae_eval(&md.vae, &d, d.n, 8);
    printf("committed model: vae recon mse %g (flat colour %g)\n", rec, flat);
    ck_assert_msg(rec < 0.1 * flat, "vae recon mse %g, flat-colour mse %g", rec, flat);
    float std;
    float *lat = vae_latents(&md.vae, &d, &std);
    ck_assert_ptr_nonnull(lat);
    for (size_t k = 0; k < (size_t)d.n * TB_LC * TB_LAT * TB_LAT; k++) lat[k] *= md.vae.cfg.scaling_factor;
    float eps = diffusion_eval(&md.unet, &md.clip, md.tok, lat, &d, d.n, 7);
    ck_assert_msg(eps < 0.5f, "unet eps mse %g", eps);
    free(lat);
    tb_data_free(&d);
    sd_model_free(&md);
}
END_TEST

static Suite *tiny_base_suite(void) {
    Suite *s = suite_create("tiny_base");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_configs_fit);
    tcase_add_test(tc, test_short_run);
    tcase_add_test(tc, test_missing_vae_data);
    tcase_add_test(tc, test_committed_model);
    suite_add_tcase(s, tc);
    return s;
}

CHECK_MAIN(tiny_base_suite)

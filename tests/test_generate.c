/* test_generate: text to image against diffusers' StableDiffusionPipeline.
 *
 * tests/fixtures/gen_tiny/ is a tiny random SD1.x-architecture diffusers
 * folder and gen_expected.safetensors holds the images diffusers drew with it
 * (uint8, (B, H, W, 3), settings in the metadata as JSON), one per sampler,
 * and one with gen_lora.safetensors (peft adapters saved by diffusers'
 * save_lora_weights) at scale 0.8; tools/check_sample_diffusers.py wrote
 * them. Every image must match to within one level of 255. */
#include "testutil.h"
#include "generate.h"
#include "image.h"
#include "json.h"

#define MODEL "tests/fixtures/gen_tiny"
#define EXPECTED "gen_expected.safetensors"   /* fx_open prefixes tests/fixtures/ */
#define LORA "tests/fixtures/gen_lora.safetensors"

static void load_model(sd_model *m) {
    char err[SD_ERR_LEN];
    int rc = sd_model_load(m, MODEL, NULL, err);
    ck_assert_msg(rc == 0, "%s", err);
}

/* the settings diffusers used for fixture image `key` */
static void case_params(const st_file *f, const char *key, gen_params *p, char *prompt,
                        char *negative, char *sampler) {
    const char *meta = st_meta(f, key);
    ck_assert_msg(meta != NULL, "no settings for %s", key);
    char jerr[256];
    json *j = json_parse(meta, strlen(meta), jerr, sizeof jerr);
    ck_assert_msg(j != NULL, "%s", jerr);
    memset(p, 0, sizeof *p);
    snprintf(prompt, 256, "%s", json_str(j, "prompt", ""));
    snprintf(negative, 256, "%s", json_str(j, "negative", ""));
    p->prompt = prompt;
    p->negative = negative;
    p->steps = (int)json_num(j, "steps", 0);
    p->cfg = (float)json_num(j, "cfg", 0);
    p->seed = (uint64_t)json_num(j, "seed", 0);
    p->width = p->height = (int)json_num(j, "size", 0);
    p->batch = (int)json_num(j, "batch", 0);
    p->clip_skip = (int)json_num(j, "clip_skip", 1);
    json_free(j);
    /* "dpmpp_2m_karras" -> "dpmpp_2m" + karras */
    snprintf(sampler, 64, "%s", key);
    char *k = strstr(sampler, "_karras");
    if (k) { *k = 0; p->karras = 1; }
    if (strcmp(sampler, "lora_euler") == 0) snprintf(sampler, 64, "euler");
    p->sampler = sampler;
}

/* generate case `key` with m and return the largest difference in levels */
static int max_diff_vs_fixture(sd_model *m, const st_file *f, const char *key) {
    gen_params p;
    char prompt[256], negative[256], sampler[64], err[SD_ERR_LEN];
    case_params(f, key, &p, prompt, negative, sampler);
    const st_tensor *t = st_find(f, key);
    ck_assert_msg(t && t->dtype == ST_U8 && t->ndim == 4, "%s: missing or not uint8 (B, H, W, 3)", key);
    ck_assert_int_eq((int)t->shape[0], p.batch);
    ck_assert_int_eq((int)t->shape[1], p.height);
    ck_assert_int_eq((int)t->shape[2], p.width);
    size_t n = (size_t)p.batch * p.height * p.width * 3;
    ck_assert(t->numel == n);
    uint8_t *rgb = malloc(n);
    int rc = sd_generate(m, &p, rgb, err);
    ck_assert_msg(rc == 0, "%s: %s", key, err);
    int worst = 0;
    for (size_t i = 0; i < n; i++) {
        int d = abs((int)rgb[i] - (int)t->data[i]);
        if (d > worst) worst = d;
    }
    free(rgb);
    return worst;
}

START_TEST(test_samplers_match_diffusers) {
    static const char *keys[] = {"ddim", "ddpm", "euler", "euler_karras", "euler_a",
                                 "dpmpp_2m", "dpmpp_2m_karras"};
    sd_model m;
    load_model(&m);
    st_file f;
    fx_open(&f, EXPECTED);
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        int d = max_diff_vs_fixture(&m, &f, keys[i]);
        ck_assert_msg(d <= 1, "%s: image differs from diffusers' by %d levels", keys[i], d);
    }
    st_close(&f);
    sd_model_free(&m);
}
END_TEST

/* the LoRA as a side branch, merged, and applied twice at half weight
 * (the second copy is stacked onto the first adapter of each module) */
START_TEST(test_lora_matches_diffusers) {
    char err[SD_ERR_LEN];
    st_file f;
    fx_open(&f, EXPECTED);
    lora_file lf;
    int rc = lora_file_load(LORA, &lf, err);
    ck_assert_msg(rc == 0, "%s", err);
    for (int mode = 0; mode < 3; mode++) {
        sd_model m;
        load_model(&m);
        int d0 = max_diff_vs_fixture(&m, &f, "lora_euler");
        ck_assert_msg(d0 > 10, "the LoRA fixture should differ from the plain model's image (%d)", d0);
#ifndef UNET_ATTACH_LORA
        /* unet.c without side branches: only --merge works, and says so */
        if (mode != 1) {
            ck_assert_int_eq(sd_apply_lora(&m, &lf, 0.8f, 0, err), -1);
            ck_assert_msg(strstr(err, "--merge") != NULL, "%s", err);
            sd_model_free(&m);
            continue;
        }
#endif
        if (mode < 2) {
            rc = sd_apply_lora(&m, &lf, 0.8f, mode, err);
        } else {
            rc = sd_apply_lora(&m, &lf, 0.4f, 0, err);
            if (rc == 0) rc = sd_apply_lora(&m, &lf, 0.4f, 0, err);
        }
        ck_assert_msg(rc == 0, "%s", err);
        ck_assert_int_eq(m.unet.nloras, mode == 1 ? 0 : 32);   /* 8 attentions x 4 projections */
        int d = max_diff_vs_fixture(&m, &f, "lora_euler");
        ck_assert_msg(d <= 1, "LoRA mode %d: image differs from diffusers' by %d levels", mode, d);
        sd_model_free(&m);
    }
    lora_file_free(&lf);
    st_close(&f);
}
END_TEST

/* a file entry for module `name` with the given sizes, A = B = 1 */
static void make_entry(lora_entry *e, const char *name, int r, int in, int out) {
    memset(e, 0, sizeof *e);
    snprintf(e->name, sizeof e->name, "%s", name);
    e->r = r; e->in = in; e->out = out; e->alpha = (float)r;
    e->A = malloc(sizeof(float) * (size_t)r * in);
    e->B = malloc(sizeof(float) * (size_t)out * r);
    for (int i = 0; i < r * in; i++) e->A[i] = 1.0f;
    for (int i = 0; i < out * r; i++) e->B[i] = 1.0f;
}

/* an unknown module or a misshapen entry anywhere in the file: an error
 * naming it, and the model exactly as it was (nothing merged or attached) */
START_TEST(test_apply_lora_errors_leave_model_unchanged) {
    sd_model m;
    load_model(&m);
    char err[SD_ERR_LEN];
    float *u0 = malloc(sizeof(float) * m.unet.nparams);
    float *c0 = malloc(sizeof(float) * m.clip.num_params);
    memcpy(u0, m.unet.params, sizeof(float) * m.unet.nparams);
    memcpy(c0, m.clip.params, sizeof(float) * m.clip.num_params);
    /* block 0 has 8 channels, the text encoder 32 */
    const char *good_u = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    const char *good_te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj";
    lora_entry e[3];
    lora_file lf = {3, e, "kohya"};
    for (int merge = 0; merge < 2; merge++) {
        make_entry(&e[0], good_u, 2, 8, 8);
        make_entry(&e[1], good_te, 2, 32, 32);
        make_entry(&e[2], "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn9_to_q", 2, 8, 8);
        ck_assert_int_eq(sd_apply_lora(&m, &lf, 1.0f, merge, err), -1);
        ck_assert_msg(strstr(err, "attn9_to_q") != NULL, "error does not name the entry: %s", err);
        /* right name, wrong size: 16 -> 8 where the weight is 8 -> 8 */
        free(e[2].A); free(e[2].B);
        make_entry(&e[2], "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q", 2, 16, 8);
        ck_assert_int_eq(sd_apply_lora(&m, &lf, 1.0f, merge, err), -1);
        ck_assert_msg(strstr(err, "attn2_to_q") != NULL, "error does not name the entry: %s", err);
        /* a 3x3 convolution has no LoRA here */
        free(e[2].A); free(e[2].B);
        make_entry(&e[2], "lora_unet_down_blocks_0_resnets_0_conv1", 2, 8, 8);
        ck_assert_int_eq(sd_apply_lora(&m, &lf, 1.0f, merge, err), -1);
        ck_assert_msg(strstr(err, "resnets_0_conv1") != NULL, "error does not name the entry: %s", err);
        ck_assert(memcmp(u0, m.unet.params, sizeof(float) * m.unet.nparams) == 0);
        ck_assert(memcmp(c0, m.clip.params, sizeof(float) * m.clip.num_params) == 0);
        ck_assert_int_eq(m.unet.nloras, 0);
        for (int i = 0; i < 3; i++) { free(e[i].A); free(e[i].B); }
    }
    /* side branch only where the UNet has adapter sites: a 1x1 conv outside
     * the transformers (the time embedding linear) needs --merge */
    make_entry(&e[0], "lora_unet_time_embedding_linear_1", 1, 8, 32);
    lf.n = 1;
    ck_assert_int_eq(sd_apply_lora(&m, &lf, 1.0f, 0, err), -1);
    ck_assert_msg(strstr(err, "merge") != NULL, "%s", err);
    ck_assert(memcmp(u0, m.unet.params, sizeof(float) * m.unet.nparams) == 0);
    /* merged, it changes exactly that weight: W += (alpha/r) B A = all ones */
    ck_assert_int_eq(sd_apply_lora(&m, &lf, 0.5f, 1, err), 0);
    int wi = unet_param_index(&m.unet, "time_embedding.linear_1.weight");
    ck_assert_int_ge(wi, 0);
    size_t off = m.unet.table[wi].offset;
    for (size_t i = 0; i < m.unet.nparams; i++) {
        float want = i >= off && i < off + 8 * 32 ? u0[i] + 0.5f : u0[i];
        ck_assert_msg(m.unet.params[i] == want, "param %zu: %g, want %g", i, m.unet.params[i], want);
    }
    free(e[0].A); free(e[0].B);
    free(u0); free(c0);
    sd_model_free(&m);
}
END_TEST

START_TEST(test_params_text_and_png) {
    gen_params p = {
        .prompt = "a red circle", .negative = "blurry", .width = 64, .height = 48, .steps = 20,
        .cfg = 7.5f, .seed = 1234, .batch = 1, .clip_skip = 2, .sampler = "dpmpp_2m", .karras = 1,
    };
    sd_model m;
    memset(&m, 0, sizeof m);
    snprintf(m.name, sizeof m.name, "gen_tiny");
    char buf[1024];
    sd_params_text(buf, sizeof buf, &m, &p, "<lora:style:0.8>");
    ck_assert_str_eq(buf, "a red circle <lora:style:0.8>\nNegative prompt: blurry\n"
                          "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 1234, "
                          "Size: 64x48, Model: gen_tiny, Clip skip: 2, RNG: CPU");
    /* no negative line, A1111's names, no clip skip at 1, GPU noise unmentioned */
    static const char *names[][2] = {{"euler_a", "Euler a"}, {"euler", "Euler"}, {"ddim", "DDIM"},
                                     {"dpmpp_2m", "DPM++ 2M"}};
    for (int i = 0; i < 4; i++) {
        gen_params q = p;
        q.negative = ""; q.clip_skip = 1; q.karras = 0; q.rng_cuda = 1; q.sampler = names[i][0];
        sd_params_text(buf, sizeof buf, &m, &q, "");
        char want[512];
        snprintf(want, sizeof want, "a red circle\nSteps: 20, Sampler: %s, CFG scale: 7.5, "
                 "Seed: 1234, Size: 64x48, Model: gen_tiny", names[i][1]);
        ck_assert_str_eq(buf, want);
    }
    /* a tiny buffer is truncated, never overrun */
    char small[8];
    sd_params_text(small, sizeof small, &m, &p, "");
    ck_assert_str_eq(small, "a red c");

    /* the PNG carries it as tEXt "parameters" */
    uint8_t rgb[2 * 2 * 3] = {0};
    const char *k[1] = {"parameters"}, *v[1] = {"a red circle\nSteps: 20"};
    uint8_t *png; size_t n; char err[256];
    ck_assert_int_eq(image_encode_png(&png, &n, rgb, 2, 2, k, v, 1, err, sizeof err), 0);
    const char want[] = "tEXtparameters\0a red circle\nSteps: 20";
    int found = 0;
    for (size_t i = 0; i + sizeof want - 1 <= n; i++)
        if (memcmp(png + i, want, sizeof want - 1) == 0) found = 1;
    ck_assert(found);
    free(png);
}
END_TEST

START_TEST(test_prompt_lora_tags) {
    char text[256], err[SD_ERR_LEN];
    sd_prompt_lora t[4];
    int n = sd_prompt_loras("<lora:style_a:0.8> a cat <lora:b>, night <hypernet:x:1>", text, sizeof text, t, 4, err);
    ck_assert_int_eq(n, 2);
    ck_assert_str_eq(text, "a cat , night <hypernet:x:1>");
    ck_assert_str_eq(t[0].name, "style_a");
    ck_assert(t[0].weight == 0.8f);
    ck_assert_str_eq(t[1].name, "b");
    ck_assert(t[1].weight == 1.0f);
    ck_assert_int_eq(sd_prompt_loras("plain prompt", text, sizeof text, t, 4, err), 0);
    ck_assert_str_eq(text, "plain prompt");
    ck_assert_int_eq(sd_prompt_loras("x <lora:a:-0.5e0>", text, sizeof text, t, 4, err), 1);
    ck_assert(t[0].weight == -0.5f);
    ck_assert_str_eq(text, "x");
    /* malformed: unclosed, bad number, empty name, A1111's te:unet pair, too many */
    static const char *bad[] = {"a <lora:x:0.5", "a <lora:x:abc>", "<lora::1>", "<lora:x:1:0.5>",
                                "<lora:x:>", "<lora:a><lora:b><lora:c><lora:d><lora:e>"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = 0;
        ck_assert_msg(sd_prompt_loras(bad[i], text, sizeof text, t, 4, err) == -1, "%s accepted", bad[i]);
        ck_assert_msg(strncmp(err, "prompt: ", 8) == 0, "%s: %s", bad[i], err);
    }
}
END_TEST

START_TEST(test_bad_sizes) {
    sd_model m;
    load_model(&m);
    gen_params p = {.prompt = "a", .negative = "", .width = 60, .height = 64, .steps = 2, .cfg = 7,
                    .seed = 1, .batch = 1, .clip_skip = 1, .sampler = "euler"};
    uint8_t rgb[64 * 64 * 3];
    char err[SD_ERR_LEN];
    ck_assert_int_eq(sd_generate(&m, &p, rgb, err), -1);
    ck_assert(strstr(err, "60x64") != NULL);
    p.width = 64; p.sampler = "plms";
    ck_assert_int_eq(sd_generate(&m, &p, rgb, err), -1);
    ck_assert(strstr(err, "plms") != NULL);
    p.sampler = "ddim"; p.karras = 1;
    ck_assert_int_eq(sd_generate(&m, &p, rgb, err), -1);
    sd_model_free(&m);
}
END_TEST

static Suite *generate_suite(void) {
    Suite *s = suite_create("generate");
    TCase *tc = tcase_create("generate");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_samplers_match_diffusers);
    tcase_add_test(tc, test_lora_matches_diffusers);
    tcase_add_test(tc, test_apply_lora_errors_leave_model_unchanged);
    tcase_add_test(tc, test_params_text_and_png);
    tcase_add_test(tc, test_prompt_lora_tags);
    tcase_add_test(tc, test_bad_sizes);
    suite_add_tcase(s, tc);
    return s;
}

CHECK_MAIN(generate_suite)

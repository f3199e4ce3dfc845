/* test_model.c: loading a whole model: the one-line errors a user sees for
 * a wrong --model or a single file without its tokenizer, and a diffusers
 * folder that loads (tests/fixtures/gen_tiny, written by diffusers). */
#include <sys/stat.h>
#include <unistd.h>
#include "testutil.h"
#include "model.h"

START_TEST(test_missing_path) {
    sd_model m; char err[SD_ERR_LEN];
    ck_assert(sd_model_load(&m, "/nonexistent/model.safetensors", NULL, err) != 0);
    ck_assert_msg(strstr(err, "/nonexistent/model.safetensors") && strstr(err, "--model"), "%s", err);
    ck_assert(strchr(err, '\n') == NULL);
}
END_TEST

START_TEST(test_folder_not_diffusers) {
    sd_model m; char err[SD_ERR_LEN];
    char dir[] = "/tmp/sdlora_model_XXXXXX";
    ck_assert(mkdtemp(dir) != NULL);
    ck_assert(sd_model_load(&m, dir, NULL, err) != 0);
    ck_assert_msg(strstr(err, dir) && strstr(err, "unet/"), "%s", err);
    rmdir(dir);
}
END_TEST

/* a single file with no tokenizer beside it, none in --tokenizer and no HF cache */
START_TEST(test_single_file_no_tokenizer) {
    sd_model m; char err[SD_ERR_LEN];
    setenv("HF_HUB_CACHE", "/nonexistent", 1);
    char dir[] = "/tmp/sdlora_model_XXXXXX";
    ck_assert(mkdtemp(dir) != NULL);
    char path[256];
    snprintf(path, sizeof path, "%s/m.safetensors", dir);
    FILE *f = fopen(path, "wb"); fputs("not really", f); fclose(f);
    ck_assert(sd_model_load(&m, path, NULL, err) != 0);
    ck_assert_msg(strstr(err, "tokenizer") && strstr(err, "--tokenizer"), "%s", err);
    ck_assert(sd_model_load(&m, path, dir, err) != 0);
    ck_assert_msg(strstr(err, dir) && strstr(err, "vocab.json"), "%s", err);
    unlink(path); rmdir(dir);
}
END_TEST

/* with a tokenizer found, a file that is not an SD1.x checkpoint is refused
 * with its path in the message, never a crash: truncated, a LoRA, garbage */
START_TEST(test_single_file_bad) {
    sd_model m; char err[SD_ERR_LEN];
    char dir[] = "/tmp/sdlora_model_XXXXXX";
    ck_assert(mkdtemp(dir) != NULL);
    char path[256], cmd[512];
    snprintf(path, sizeof path, "%s/m.safetensors", dir);
    snprintf(cmd, sizeof cmd, "cp " FIXTURE_DIR "tokenizer_tiny/vocab.json " FIXTURE_DIR "tokenizer_tiny/merges.txt %s/", dir);
    ck_assert(system(cmd) == 0);
    /* a LoRA file given as a model */
    snprintf(cmd, sizeof cmd, "cp " FIXTURE_DIR "lorafile_kohya.safetensors %s", path);
    ck_assert(system(cmd) == 0);
    ck_assert(sd_model_load(&m, path, NULL, err) != 0);
    ck_assert_msg(strstr(err, path) != NULL, "%s", err);
    /* truncations of a real single file (the tiny LDM fixture) */
    FILE *in = fopen(FIXTURE_DIR "ldm_tiny.safetensors", "rb");
    ck_assert(in != NULL);
    fseek(in, 0, SEEK_END); long n = ftell(in); fseek(in, 0, SEEK_SET);
    char *buf = malloc((size_t)n);
    ck_assert(fread(buf, 1, (size_t)n, in) == (size_t)n);
    fclose(in);
    long cuts[] = {0, 7, 8, 100, n / 3, n - 1};
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        FILE *o = fopen(path, "wb"); fwrite(buf, 1, (size_t)cuts[i], o); fclose(o);
        ck_assert_msg(sd_model_load(&m, path, NULL, err) != 0, "cut %ld loaded", cuts[i]);
        ck_assert_msg(strstr(err, path) != NULL, "cut %ld: %s", cuts[i], err);
    }
    free(buf);
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    ck_assert(system(cmd) == 0);
}
END_TEST

/* a diffusers folder written by diffusers' save_pretrained loads, and the
 * prompt encoding gives (n, 77, d) finite numbers */
START_TEST(test_diffusers_folder) {
    sd_model m; char err[SD_ERR_LEN];
    ck_assert_msg(sd_model_load(&m, FIXTURE_DIR "gen_tiny", NULL, err) == 0, "%s", err);
    ck_assert_str_eq(m.name, "gen_tiny");
    ck_assert_int_eq(m.sched.T, 1000);
    int d = m.clip.config.hidden_size;
    float *ctx = malloc(sizeof(float) * 2 * TOK_CTX * d);
    const char *p[2] = {"a red circle", ""};
    ck_assert_msg(sd_encode_prompts(&m, p, 2, 1, ctx, err) == 0, "%s", err);
    for (int i = 0; i < 2 * TOK_CTX * d; i++) ck_assert(isfinite(ctx[i]));
    ck_assert(memcmp(ctx, ctx + TOK_CTX * d, sizeof(float) * TOK_CTX * d) != 0);
    free(ctx);
    sd_model_free(&m);
}
END_TEST

/* the scheduler config's timestep_spacing is read (diffusers builds every
 * scheduler class from it, so ./sample must too); gen_tiny has none */
START_TEST(test_scheduler_spacing) {
    sd_model m; char err[SD_ERR_LEN];
    ck_assert_msg(sd_model_load(&m, "models/tiny", NULL, err) == 0, "%s", err);
    ck_assert_str_eq(m.timestep_spacing, "leading");
    ck_assert_int_eq(m.steps_offset, 1);
    sd_model_free(&m);
    ck_assert_msg(sd_model_load(&m, FIXTURE_DIR "gen_tiny", NULL, err) == 0, "%s", err);
    ck_assert_str_eq(m.timestep_spacing, "");
    sd_model_free(&m);
}
END_TEST

static Suite *model_suite(void) {
    Suite *s = suite_create("model");
    TCase *tc = tcase_create("load");
    tcase_add_test(tc, test_missing_path);
    tcase_add_test(tc, test_folder_not_diffusers);
    tcase_add_test(tc, test_single_file_no_tokenizer);
    tcase_add_test(tc, test_single_file_bad);
    tcase_add_test(tc, test_diffusers_folder);
    tcase_add_test(tc, test_scheduler_spacing);
    suite_add_tcase(s, tc);
    return s;
}

CHECK_MAIN(model_suite)

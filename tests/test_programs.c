/* test_programs.c: ./train and ./sample as a user runs them, on the tiny
 * diffusers-made model in tests/fixtures/gen_tiny and small data sets made
 * here: end to end (train, then sample with the LoRA), Ctrl-C and --resume
 * giving the same bytes as a run never stopped, the same bytes whatever the
 * thread count, every data-set layout, and bad input of every kind ending in
 * one clear line. Under `make asan` the programs themselves are sanitised. */
#include <signal.h>
#include <stdarg.h>
#include <time.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include "testutil.h"
#include "grid.h"
#include "image.h"
#include "lora.h"
#include "cuda/cuda.h"
#include "sha256.h"

#ifndef SDLORA_BUILD
#define SDLORA_BUILD "build"
#endif
#define TRAIN SDLORA_BUILD "/train"
#define SAMPLE SDLORA_BUILD "/sample"
#define MODEL FIXTURE_DIR "gen_tiny"

static char tmp[64];

static void setup(void) {
    snprintf(tmp, sizeof tmp, "/tmp/sdlora_prog_XXXXXX");
    ck_assert(mkdtemp(tmp) != NULL);
    /* the LoRA's modelspec.date is when the run began: fixed here, so that
     * two runs compared byte for byte began at the same time */
    setenv("SOURCE_DATE_EPOCH", "1700000000", 1);
}
static void teardown(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmp);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmp);
}

/* run a shell command; stderr+stdout to tmp/log; exit status */
static int run(const char *fmt, ...) {
    char cmd[4096], full[4400];
    va_list ap; va_start(ap, fmt); vsnprintf(cmd, sizeof cmd, fmt, ap); va_end(ap);
    snprintf(full, sizeof full, "%s > %s/log 2>&1", cmd, tmp);
    int st = system(full);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static char *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END); long len = ftell(f); fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)len + 1);
    if (fread(b, 1, (size_t)len, f) != (size_t)len) { free(b); fclose(f); return NULL; }
    fclose(f); b[len] = 0;
    if (n) *n = (size_t)len;
    return b;
}

static char *log_text(void) {
    char p[128]; snprintf(p, sizeof p, "%s/log", tmp);
    char *s = slurp(p, NULL);
    return s ? s : calloc(1, 1);
}

/* the one error line the program printed */
static void assert_error_line(const char *must1, const char *must2) {
    char *s = log_text();
    char *e = strstr(s, "error: ");
    ck_assert_msg(e != NULL, "no 'error:' line in: %s", s);
    char *nl = strchr(e, '\n');
    ck_assert_msg(nl && nl[1] == 0, "the error is not one last line: %s", s);
    ck_assert_msg(!must1 || strstr(e, must1), "error lacks '%s': %s", must1, e);
    ck_assert_msg(!must2 || strstr(e, must2), "error lacks '%s': %s", must2, e);
    free(s);
}

static int has_bytes(const char *hay, size_t n, const char *needle) {
    size_t k = strlen(needle);
    for (size_t i = 0; i + k <= n; i++) if (memcmp(hay + i, needle, k) == 0) return 1;
    return 0;
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static int same_file(const char *a, const char *b) {
    size_t na, nb;
    char *x = slurp(a, &na), *y = slurp(b, &nb);
    int same = x && y && na == nb && memcmp(x, y, na) == 0;
    free(x); free(y);
    return same;
}

/* a small captioned data set: n 64x64 images of a coloured square */
static void make_images(const char *dir, int n, int captions) {
    char p[512];
    mkdir(dir, 0777);
    uint8_t *px = malloc(64 * 64 * 3);
    for (int i = 0; i < n; i++) {
        for (int y = 0; y < 64; y++)
            for (int x = 0; x < 64; x++) {
                int in = x > 8 + 4 * i && x < 40 + 2 * i && y > 12 && y < 44;
                uint8_t *q = px + (y * 64 + x) * 3;
                q[0] = in ? 220 : 30; q[1] = in ? (uint8_t)(40 * i) : 60; q[2] = in ? 40 : 200;
            }
        char err[256];
        snprintf(p, sizeof p, "%s/img%02d.png", dir, i);
        ck_assert_msg(image_save_png(p, px, 64, 64, NULL, NULL, 0, err, sizeof err) == 0, "%s", err);
        if (captions) {
            snprintf(p, sizeof p, "%s/img%02d.txt", dir, i);
            FILE *f = fopen(p, "w"); fprintf(f, "a red square number %d\n", i); fclose(f);
        }
    }
    free(px);
}

#define FLAGS0 "--model " MODEL " --rank 2 --alpha 2 --batch 2 --seed 7 --lr 1e-3"
#define FLAGS FLAGS0 " --no-grid"

START_TEST(test_help) {
    ck_assert_int_eq(run(TRAIN " --help"), 0);
    char *s = log_text(); ck_assert(strstr(s, "usage: ./train DIR") && strstr(s, "--rank")); free(s);
    ck_assert_int_eq(run(SAMPLE " --help"), 0);
    s = log_text(); ck_assert(strstr(s, "usage: ./sample") && strstr(s, "--sampler")); free(s);
}
END_TEST

START_TEST(test_bad_flags) {
    char d[128]; snprintf(d, sizeof d, "%s/data", tmp);
    make_images(d, 2, 1);
    ck_assert_int_eq(run(TRAIN " %s --rank abc", d), 2);          assert_error_line("--rank", "abc");
    ck_assert_int_eq(run(TRAIN " %s --rank 0", d), 2);            assert_error_line("--rank", "range");
    ck_assert_int_eq(run(TRAIN " %s --lr", d), 2);                assert_error_line("--lr", "value");
    ck_assert_int_eq(run(TRAIN " %s --bogus 1", d), 2);           assert_error_line("--bogus", NULL);
    ck_assert_int_eq(run(TRAIN " %s --targets everything", d), 2); assert_error_line("--targets", "qv");
    ck_assert_int_eq(run(TRAIN), 2);                              assert_error_line("data folder", NULL);
    ck_assert_int_eq(run(TRAIN " %s/none", tmp), 2);              assert_error_line("not a folder", NULL);
    ck_assert_int_eq(run(TRAIN " %s --sample-every 5", d), 2);    assert_error_line("--sample-prompt", NULL);
    ck_assert_int_eq(run(SAMPLE " --steps 5"), 2);                assert_error_line("--prompt", NULL);
    ck_assert_int_eq(run(SAMPLE " --prompt x --width 30"), 2);    assert_error_line("8", NULL);
}
END_TEST

/* --weight-dtype: bad values and --full are one-line errors; models/tiny is
 * stored as fp16, so holding it as fp16 draws the very same PNG; a LoRA
 * merged into fp16 weights works */
START_TEST(test_weight_dtype) {
    char d[128], a[256], b[256];
    snprintf(d, sizeof d, "%s/data", tmp);
    make_images(d, 2, 1);
    ck_assert_int_eq(run(TRAIN " %s --weight-dtype fp8", d), 2);        assert_error_line("--weight-dtype", "fp32|fp16");
    ck_assert_int_eq(run(TRAIN " %s --weight-dtype fp16 --full", d), 2); assert_error_line("--weight-dtype", "--full");
    ck_assert_int_eq(run(SAMPLE " --prompt x --weight-dtype half"), 2);  assert_error_line("--weight-dtype", "fp32|fp16");
    ck_assert_int_eq(run(SAMPLE " --help"), 0);
    char *s = log_text(); ck_assert(strstr(s, "--weight-dtype")); free(s);
    snprintf(a, sizeof a, "%s/a.png", tmp); snprintf(b, sizeof b, "%s/b.png", tmp);
    ck_assert_msg(run(SAMPLE " --model models/tiny --prompt \"a red circle\" --steps 2 --out %s", a) == 0, "%s", log_text());
    ck_assert_msg(run(SAMPLE " --model models/tiny --prompt \"a red circle\" --steps 2 --weight-dtype fp16 --out %s", b) == 0,
                  "%s", log_text());
    ck_assert_msg(same_file(a, b), "fp16-held models/tiny drew another image");
    ck_assert_msg(run(SAMPLE " --model " MODEL " --prompt x --steps 2 --weight-dtype fp16 --lora " FIXTURE_DIR
                      "gen_lora.safetensors --merge --out %s", b) == 0, "%s", log_text());
    s = log_text(); ck_assert_msg(strstr(s, "merged") && strstr(s, "wrote"), "%s", s); free(s);
}
END_TEST

/* ./train data/ --weight-dtype fp16 --te: the text encoder, UNet and VAE of
 * models/tiny (an fp16 file) held as fp16, text-encoder LoRA trained through
 * fp16-held frozen weights: the LoRA and the training state are the very
 * bytes the fp32-held run writes */
START_TEST(test_weight_dtype_te) {
    char a[128], b[128], fa[256], fb[256];
    snprintf(a, sizeof a, "%s/a", tmp);
    snprintf(b, sizeof b, "%s/b", tmp);
    ck_assert_msg(run(TRAIN " data/ --te --steps 2 --no-grid --weight-dtype fp16 --out %s", a) == 0, "%s", log_text());
    char *s = log_text();
    ck_assert_msg(strstr(s, "held as fp16") && strstr(s, "UNet + text encoder"), "%s", s);
    free(s);
    ck_assert_msg(run(TRAIN " data/ --te --steps 2 --no-grid --weight-dtype fp32 --out %s", b) == 0, "%s", log_text());
    snprintf(fa, sizeof fa, "%s/lora.safetensors", a); snprintf(fb, sizeof fb, "%s/lora.safetensors", b);
    ck_assert_msg(same_file(fa, fb), "fp16-held training wrote another LoRA");
    size_t n;
    char *lora = slurp(fa, &n);
    ck_assert(lora && has_bytes(lora, n, "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"));
    free(lora);
    snprintf(fa, sizeof fa, "%s/state.safetensors", a); snprintf(fb, sizeof fb, "%s/state.safetensors", b);
    ck_assert_msg(same_file(fa, fb), "fp16-held training wrote another training state");
}
END_TEST

/* train, then sample with the LoRA it wrote */
START_TEST(test_train_then_sample) {
    char d[128], o[128], p[256];
    snprintf(d, sizeof d, "%s/data", tmp); snprintf(o, sizeof o, "%s/out", tmp);
    make_images(d, 4, 1);
    ck_assert_msg(run(TRAIN " %s " FLAGS0 " --steps 6 --save-every 3 --out %s", d, o) == 0, "%s", log_text());
    char *s = log_text();
    ck_assert_msg(strstr(s, "trainable parameters") && strstr(s, "./sample"), "%s", s);
    /* the progress line: seconds per step and images per second */
    ck_assert_msg(strstr(s, "step 6/6") && strstr(s, " s/step  ") && strstr(s, " img/s  "), "%s", s);
    free(s);
    /* the LoRA in kohya's format, with ss_* metadata */
    snprintf(p, sizeof p, "%s/lora.safetensors", o);
    lora_file lf; char err[ST_ERR_LEN];
    ck_assert_msg(lora_file_load(p, &lf, err) == 0, "%s", err);
    ck_assert_str_eq(lf.format, "kohya");
    ck_assert(lf.n > 0 && lf.e[0].r == 2 && lf.e[0].alpha == 2.0f);
    ck_assert_msg(strncmp(lf.e[0].name, "lora_unet_", 10) == 0, "%s", lf.e[0].name);
    double bsum = 0;
    for (int i = 0; i < lf.n; i++) for (int k = 0; k < lf.e[i].out * lf.e[i].r; k++) bsum += fabs(lf.e[i].B[k]);
    ck_assert_msg(bsum > 0, "B is still zero after 6 steps: nothing trained");
    lora_file_free(&lf);
    st_file f; ck_assert(st_open(&f, p, err) == 0);
    ck_assert_str_eq(st_meta(&f, "ss_network_dim"), "2");
    ck_assert_str_eq(st_meta(&f, "ss_network_module"), "networks.lora");
    st_close(&f);
    snprintf(p, sizeof p, "%s/lora-step000003.safetensors", o); ck_assert(access(p, F_OK) == 0);
    snprintf(p, sizeof p, "%s/state.safetensors", o);          ck_assert(access(p, F_OK) == 0);
    /* loss.csv: a header and one line per step; loss.png decodes */
    snprintf(p, sizeof p, "%s/loss.csv", o);
    s = slurp(p, NULL); ck_assert(s);
    int lines = 0; for (char *q = s; *q; q++) lines += *q == '\n';
    ck_assert_int_eq(lines, 7);
    ck_assert(strncmp(s, "step,loss,smoothed,lr\n1,", 24) == 0);
    free(s);
    image_t im; snprintf(p, sizeof p, "%s/loss.png", o);
    ck_assert_msg(image_load(&im, p, err, sizeof err) == 0, "%s", err);
    image_free(&im);
    /* the before/after grid: 2 rows (base, LoRA) of one 64x64 cell per
     * distinct caption (4), each scaled to 256 and labelled (grid.c) */
    snprintf(p, sizeof p, "%s/before_after.png", o);
    ck_assert_msg(image_load(&im, p, err, sizeof err) == 0, "%s", err);
    grid_image geo;
    ck_assert_int_eq(grid_geometry(&geo, 2, 4, 64, 64, 256, 1, 1), 0);
    ck_assert_int_eq(geo.scale, 4);
    ck_assert_int_eq(im.h, geo.h);
    ck_assert_int_eq(im.w, geo.w);
    image_free(&im);
    /* sample with it: a PNG that carries A1111's parameters */
    snprintf(p, sizeof p, "%s/s.png", o);
    ck_assert_msg(run(SAMPLE " --model " MODEL " --prompt \"a red square\" --steps 3 --seed 1 --lora %s/lora.safetensors:0.8 --out %s", o, p) == 0,
                  "%s", log_text());
    ck_assert_msg(image_load(&im, p, err, sizeof err) == 0, "%s", err);
    ck_assert(im.w == 64 && im.h == 64);
    image_free(&im);
    /* a progress line per sampler step, with its seconds */
    s = log_text();
    ck_assert_msg(strstr(s, "step 1/3  ") && strstr(s, "step 3/3  ") && strstr(s, " s/step (mean "), "%s", s);
    free(s);
    size_t n; s = slurp(p, &n);
    ck_assert(s != NULL);
    ck_assert(has_bytes(s, n, "parameters") && has_bytes(s, n, "Steps: 3"));
    free(s);
    /* an X/Y grid: a column per prompt, a row per LoRA weight, labelled; the
     * cell of "a red square" at weight 0.8 is exactly s.png above */
    char g[256];
    snprintf(g, sizeof g, "%s/g.png", o);
    ck_assert_msg(run(SAMPLE " --model " MODEL " --grid --prompt \"a red square|a cat\" --steps 3 --seed 1 "
                      "--lora %s/lora.safetensors:0,0.8 --out %s", o, g) == 0, "%s", log_text());
    image_t gi, si;
    ck_assert_msg(image_load(&gi, g, err, sizeof err) == 0, "%s", err);
    ck_assert_msg(image_load(&si, p, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(grid_geometry(&geo, 2, 2, 64, 64, 256, 1, 1), 0);
    ck_assert(gi.w == geo.w && gi.h == geo.h);
    int ox, oy, same = 1;
    grid_cell_origin(&geo, 1, 0, &ox, &oy);
    for (int y = 0; y < 64; y++)
        for (int x = 0; x < 64; x++)
            same &= memcmp(gi.rgb + ((size_t)(oy + y * geo.scale) * gi.w + ox + x * geo.scale) * 3,
                           si.rgb + ((size_t)y * 64 + x) * 3, 3) == 0;
    ck_assert_msg(same, "the grid's weight-0.8 cell differs from ./sample --lora ...:0.8");
    image_free(&gi); image_free(&si);
    /* a list of weights without --grid: a one-line error */
    ck_assert_int_eq(run(SAMPLE " --model " MODEL " --prompt x --lora %s/lora.safetensors:0,1 --out %s/x.png", o, o), 2);
    s = log_text();
    ck_assert_msg(strstr(s, "--grid") && !strstr(s, "wrote"), "%s", s);
    free(s);
}
END_TEST

/* stopped after 3, or 7, of 12 steps (as Ctrl-C does), then --resume: the
 * final LoRA, state, loss.csv (whose smoothed column the resumed run
 * recomputes) and loss.png are byte-identical to a run never stopped */
START_TEST(test_resume_identical) {
    char d[128], a[128], b[128], p1[256], p2[256];
    snprintf(d, sizeof d, "%s/data", tmp);
    snprintf(a, sizeof a, "%s/a", tmp);
    make_images(d, 5, 1);
    const char *more = " --steps 12 --flip --dropout 0.1 --noise-offset 0.05 --te";
    ck_assert_msg(run(TRAIN " %s " FLAGS "%s --out %s", d, more, a) == 0, "%s", log_text());
    const int stops[] = {3, 7};
    for (int k = 0; k < 2; k++) {
        snprintf(b, sizeof b, "%s/b%d", tmp, stops[k]);
        ck_assert_int_eq(run("SDLORA_STOP_AFTER=%d " TRAIN " %s " FLAGS "%s --out %s", stops[k], d, more, b), 130);
        char *s = log_text(); ck_assert_msg(strstr(s, "--resume"), "%s", s); free(s);
        snprintf(p1, sizeof p1, "%s/lora-step%06d.safetensors", b, stops[k]); ck_assert(access(p1, F_OK) == 0);
        ck_assert_msg(run(TRAIN " %s " FLAGS "%s --out %s --resume %s/state.safetensors", d, more, b, b) == 0, "%s", log_text());
        const char *files[] = {"lora.safetensors", "state.safetensors", "loss.csv", "loss.png"};
        for (int f = 0; f < 4; f++) {
            snprintf(p1, sizeof p1, "%s/%s", a, files[f]); snprintf(p2, sizeof p2, "%s/%s", b, files[f]);
            ck_assert_msg(same_file(p1, p2), "stopped at %d and resumed: %s differs from the uninterrupted run's", stops[k], files[f]);
        }
    }
    /* resuming with other flags is refused */
    ck_assert_int_eq(run(TRAIN " %s " FLAGS " --steps 12 --out %s --resume %s/state.safetensors", d, b, b), 1);
    assert_error_line("other settings", NULL);
}
END_TEST

/* a real Ctrl-C: the run saves its state and says how to resume */
START_TEST(test_sigint_saves) {
    char d[128], o[128], cmd[1024], p[256];
    snprintf(d, sizeof d, "%s/data", tmp); snprintf(o, sizeof o, "%s/out", tmp);
    make_images(d, 3, 1);
    snprintf(cmd, sizeof cmd, "%s/log", tmp);
    pid_t pid = fork();
    if (pid == 0) {
        FILE *lf = fopen(cmd, "w");
        if (!lf) _exit(127);
        dup2(fileno(lf), 1); dup2(fileno(lf), 2);
        execl(TRAIN, "train", d, "--model", MODEL, "--rank", "2", "--alpha", "2", "--batch", "2",
              "--seed", "7", "--lr", "1e-3", "--steps", "1000000", "--out", o, (char *)NULL);
        _exit(127);
    }
    snprintf(p, sizeof p, "%s/loss.csv", o);
    for (int i = 0; i < 6000; i++) {                 /* wait for two steps */
        char *s = slurp(p, NULL);
        int lines = 0;
        if (s) { for (char *q = s; *q; q++) lines += *q == '\n'; free(s); }
        if (lines >= 3) break;
        sleep_ms(10);
    }
    kill(pid, SIGINT);
    int st; waitpid(pid, &st, 0);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 130, "exit %d", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    snprintf(p, sizeof p, "%s/state.safetensors", o);
    ck_assert(access(p, F_OK) == 0);
    char *s = log_text(); ck_assert_msg(strstr(s, "stopped at step") && strstr(s, "--resume"), "%s", s); free(s);
}
END_TEST

/* the same seed and flags give the same bytes with 1 or 2 threads */
START_TEST(test_threads_identical) {
    char d[128], a[128], b[128], p1[256], p2[256];
    snprintf(d, sizeof d, "%s/data", tmp);
    snprintf(a, sizeof a, "%s/a", tmp); snprintf(b, sizeof b, "%s/b", tmp);
    make_images(d, 4, 1);
    ck_assert_int_eq(run("OMP_NUM_THREADS=1 " TRAIN " %s " FLAGS " --steps 4 --targets transformer --out %s", d, a), 0);
    ck_assert_int_eq(run("OMP_NUM_THREADS=2 " TRAIN " %s " FLAGS " --steps 4 --targets transformer --out %s", d, b), 0);
    snprintf(p1, sizeof p1, "%s/lora.safetensors", a); snprintf(p2, sizeof p2, "%s/lora.safetensors", b);
    ck_assert_msg(same_file(p1, p2), "1 and 2 threads wrote different LoRAs");
}
END_TEST

/* captions.csv, N_name repeat folders, .caption files, an uncaptioned image */
START_TEST(test_dataset_layouts) {
    char d[128], sub[256], p[300], o[128];
    snprintf(d, sizeof d, "%s/data", tmp); snprintf(o, sizeof o, "%s/out", tmp);
    mkdir(d, 0777);
    snprintf(sub, sizeof sub, "%s/3_squares", d);
    make_images(sub, 2, 1);                           /* 2 images x 3 repeats */
    snprintf(sub, sizeof sub, "%s/csv", d);
    make_images(sub, 2, 0);
    snprintf(p, sizeof p, "%s/captions.csv", sub);
    FILE *f = fopen(p, "w"); fprintf(f, "file,caption\nimg00.png,\"a square, red\"\n"); fclose(f);
    snprintf(p, sizeof p, "%s/img01.caption", sub);  /* img01: .caption file */
    f = fopen(p, "w"); fprintf(f, "another square\n"); fclose(f);
    snprintf(sub, sizeof sub, "%s/plain", d);
    make_images(sub, 1, 0);                           /* uncaptioned */
    ck_assert_msg(run(TRAIN " %s " FLAGS " --steps 1 --out %s", d, o) == 0, "%s", log_text());
    char *s = log_text();
    ck_assert_msg(strstr(s, "5 images, 9 samples per epoch"), "%s", s);
    ck_assert_msg(strstr(s, "warning") && strstr(s, "plain/img00.png"), "%s", s);
    free(s);
}
END_TEST

/* bad data and models: one clear line naming the file, nothing written over */
START_TEST(test_bad_inputs) {
    char d[128], o[128], p[256];
    snprintf(d, sizeof d, "%s/data", tmp); snprintf(o, sizeof o, "%s/out", tmp);
    make_images(d, 3, 1);
    /* a truncated PNG */
    snprintf(p, sizeof p, "%s/img01.png", d);
    ck_assert(truncate(p, 40) == 0);
    ck_assert_int_eq(run(TRAIN " %s " FLAGS " --steps 2 --out %s", d, o), 1);
    assert_error_line("img01.png", NULL);
    /* not an image at all */
    FILE *f = fopen(p, "w"); fputs("hello", f); fclose(f);
    ck_assert_int_eq(run(TRAIN " %s " FLAGS " --steps 2 --out %s", d, o), 1);
    assert_error_line("img01.png", NULL);
    unlink(p);
    /* a caption that is not UTF-8 */
    snprintf(p, sizeof p, "%s/img02.txt", d);
    f = fopen(p, "wb"); fputs("caf\xe9\n", f); fclose(f);
    ck_assert_int_eq(run(TRAIN " %s " FLAGS " --steps 2 --out %s", d, o), 1);
    assert_error_line("img02.txt", "UTF-8");
    unlink(p);
    /* a model that is not there, a model folder without a UNet */
    ck_assert_int_eq(run(TRAIN " %s --model %s/nomodel --steps 2 --out %s", d, tmp, o), 1);
    assert_error_line("nomodel", NULL);
    ck_assert_int_eq(run(TRAIN " %s --model %s --steps 2 --out %s", d, d, o), 1);
    assert_error_line("unet/", NULL);
    /* a good run, then a corrupt --resume state: the good LoRA stays as it was */
    ck_assert_int_eq(run(TRAIN " %s " FLAGS " --steps 2 --out %s", d, o), 0);
    char lora[256], keep[600];
    snprintf(lora, sizeof lora, "%s/lora.safetensors", o);
    snprintf(keep, sizeof keep, "cp %s %s/keep.safetensors", lora, tmp);
    ck_assert(system(keep) == 0);
    snprintf(p, sizeof p, "%s/state.safetensors", o);
    ck_assert(truncate(p, 100) == 0);
    ck_assert_int_eq(run(TRAIN " %s " FLAGS " --steps 2 --out %s --resume %s", d, o, p), 1);
    assert_error_line("state.safetensors", NULL);
    snprintf(keep, sizeof keep, "%s/keep.safetensors", tmp);
    ck_assert(same_file(lora, keep));
    /* a resolution the model cannot take */
    ck_assert_int_eq(run(TRAIN " %s " FLAGS " --steps 2 --res 60 --out %s", d, o), 1);
    assert_error_line("--res", NULL);
    /* a LoRA that does not fit the model, and a missing one, for ./sample */
    ck_assert_int_eq(run(SAMPLE " --model " MODEL " --prompt x --steps 2 --lora " FIXTURE_DIR "lorafile_kohya.safetensors --out %s/x.png", tmp), 1);
    assert_error_line("lora_", NULL);
    ck_assert_int_eq(run(SAMPLE " --model " MODEL " --prompt x --steps 2 --lora %s/none.safetensors --out %s/x.png", tmp, tmp), 1);
    assert_error_line("none.safetensors", NULL);
}
END_TEST

/* a diverged run (step 4's loss made NaN through the test hook): it stops
 * with one line naming the step and what to try, and the checkpoint of
 * step 2 stays intact and resumable */
START_TEST(test_nan_stops) {
    char d[128], o[128], p[256];
    snprintf(d, sizeof d, "%s/data", tmp); snprintf(o, sizeof o, "%s/out", tmp);
    make_images(d, 3, 1);
    ck_assert_int_eq(run("SDLORA_NAN_AT=4 " TRAIN " %s " FLAGS " --steps 6 --save-every 2 --out %s", d, o), 1);
    assert_error_line("step 4", "NaN");
    assert_error_line("--lr", NULL);
    snprintf(p, sizeof p, "%s/lora-step000002.safetensors", o);
    lora_file lf; char err[ST_ERR_LEN];
    ck_assert_msg(lora_file_load(p, &lf, err) == 0, "%s", err);
    lora_file_free(&lf);
    snprintf(p, sizeof p, "%s/lora-step000004.safetensors", o);
    ck_assert(access(p, F_OK) != 0);
    ck_assert_msg(run(TRAIN " %s " FLAGS " --steps 6 --save-every 2 --out %s --resume %s/state.safetensors", d, o, o) == 0,
                  "%s", log_text());
    char *s = log_text(); ck_assert_msg(strstr(s, "at step 2"), "%s", s); free(s);
}
END_TEST

/* A run that fails before it has a step of its own (every image corrupt,
 * met in the first step with --random-crop, or while caching latents
 * without it) leaves an earlier run's OUT as it was: loss.csv not cut to
 * its header, no loss.csv.tmp left behind */
START_TEST(test_failed_run_keeps_out) {
    char d[128], o[128], p[256], keep[256];
    snprintf(d, sizeof d, "%s/data", tmp); snprintf(o, sizeof o, "%s/out", tmp);
    make_images(d, 2, 1);
    ck_assert_msg(run(TRAIN " %s " FLAGS " --steps 2 --out %s", d, o) == 0, "%s", log_text());
    snprintf(p, sizeof p, "%s/loss.csv", o); snprintf(keep, sizeof keep, "%s/loss.keep", tmp);
    char cmd[600]; snprintf(cmd, sizeof cmd, "cp %s %s", p, keep);
    ck_assert(system(cmd) == 0);
    for (int i = 0; i < 2; i++) {
        char img[256]; snprintf(img, sizeof img, "%s/img%02d.png", d, i);
        ck_assert(truncate(img, 40) == 0);
    }
    const char *modes[] = {" --random-crop", " --random-crop --te", "", " --full"};
    for (int k = 0; k < 4; k++) {
        ck_assert_int_eq(run(TRAIN " %s " FLAGS " --steps 2%s --out %s", d, modes[k], o), 1);
        assert_error_line("img0", NULL);
        ck_assert_msg(same_file(p, keep), "%s: the earlier run's loss.csv was changed", modes[k]);
        char t[300]; snprintf(t, sizeof t, "%s.tmp", p);
        ck_assert_msg(access(t, F_OK) != 0, "%s: loss.csv.tmp left behind", modes[k]);
    }
}
END_TEST

/* the line of the log that starts with prefix, copied (NULL when none) */
static char *log_line(const char *prefix) {
    char *s = log_text(), *found = NULL;
    for (char *l = s; l && *l; ) {
        char *nl = strchr(l, '\n');
        size_t len = nl ? (size_t)(nl - l) : strlen(l);
        /* a wrapped group continues on lines that start with spaces */
        while (nl && nl[1] == ' ') { nl = strchr(nl + 1, '\n'); len = nl ? (size_t)(nl - l) : strlen(l); }
        if (strncmp(l, prefix, strlen(prefix)) == 0) { found = strndup(l, len); break; }
        l = nl ? nl + 1 : NULL;
    }
    free(s);
    return found;
}

/* ", name value," as one item of a settings line (either end of the line counts) */
static int has_setting(const char *line, const char *item) {
    size_t k = strlen(item);
    for (const char *p = strstr(line, item); p; p = strstr(p + 1, item)) {
        int start = p - line >= 2 && p[-1] == ' ' && (p[-2] == ',' || p[-2] == ':' || p[-2] == ' ');
        int end = p[k] == ',' || p[k] == 0 || p[k] == ' ' || p[k] == '\n';
        if (start && end) return 1;
    }
    return 0;
}

/* ./train prints every setting with where it came from: DIR/sdlora_args.txt,
 * the command line (over the file's value), or the default */
START_TEST(test_settings_sources) {
    char d[128], o[128], p[256], file[300];
    snprintf(d, sizeof d, "%s/data", tmp); snprintf(o, sizeof o, "%s/out", tmp);
    make_images(d, 2, 1);
    snprintf(p, sizeof p, "%s/sdlora_args.txt", d);
    FILE *f = fopen(p, "w");
    fprintf(f, "# defaults for this folder\n--rank 3 --alpha 3\n--steps 5 --lr 2e-3\n");
    fclose(f);
    ck_assert_msg(run(TRAIN " %s --model " MODEL " --batch 2 --steps 1 --no-grid --out %s", d, o) == 0, "%s", log_text());
    snprintf(file, sizeof file, "settings from %s/sdlora_args.txt:", d);
    char *fl = log_line(file), *cl = log_line("settings from the command line:"), *dl = log_line("settings by default:");
    ck_assert_msg(fl && cl && dl, "%s", log_text());
    ck_assert_msg(has_setting(fl, "rank 3") && has_setting(fl, "alpha 3") && has_setting(fl, "lr 0.002"), "%s", fl);
    ck_assert_msg(!strstr(fl, "steps"), "the file's --steps was overridden: %s", fl);
    char over[400];
    snprintf(over, sizeof over, "steps 1 (over %s/sdlora_args.txt)", d);
    ck_assert_msg(strstr(cl, over) && has_setting(cl, "batch 2"), "%s", cl);
    ck_assert_msg(!strstr(cl, "rank"), "%s", cl);
    ck_assert_msg(has_setting(dl, "targets qv") && has_setting(dl, "seed 42") && has_setting(dl, "te off"), "%s", dl);
    /* (has_setting: "conv-rank 0" is a default of its own, not "rank") */
    ck_assert_msg(!has_setting(dl, "rank") && !strstr(dl, "batch") && !strstr(dl, "steps"), "%s", dl);
    free(fl); free(cl); free(dl);
    /* and the run used them */
    char *s = log_text();
    ck_assert_msg(strstr(s, "rank 3 alpha 3") && strstr(s, "1 steps of 2 x 1"), "%s", s);
    free(s);
}
END_TEST

/* --device: a bad value is a flag error; cuda with --full is refused
 * (exit 2); cuda on this build without CUDA=1, or on a CUDA build
 * on a machine with no driver or no GPU, is one line saying which and what
 * to do, exit 1, before any model is read */
START_TEST(test_device) {
    char d[128];
    snprintf(d, sizeof d, "%s/data", tmp);
    make_images(d, 2, 1);
    ck_assert_int_eq(run(TRAIN " %s --device tpu", d), 2);       assert_error_line("--device", "cpu|cuda");
    ck_assert_int_eq(run(SAMPLE " --prompt x --device tpu"), 2);  assert_error_line("--device", "cpu|cuda");
    ck_assert_int_eq(run(TRAIN " %s --device cuda --full", d), 2); assert_error_line("--device cuda", "--device cpu");
    /* fp16 and --tf32 are the GPU's: on the CPU, a flag error naming the way out */
    ck_assert_int_eq(run(TRAIN " %s --compute fp16", d), 2);       assert_error_line("--compute fp16: runs on the GPU only", "--compute bf16");
    ck_assert_int_eq(run(SAMPLE " --prompt x --compute fp16"), 2);  assert_error_line("--compute fp16: runs on the GPU only", "--compute bf16");
    ck_assert_int_eq(run(TRAIN " %s --tf32", d), 2);                assert_error_line("--tf32: TF32 is a GPU math mode", "--device cuda");
    ck_assert_int_eq(run(SAMPLE " --prompt x --tf32"), 2);          assert_error_line("--tf32: TF32 is a GPU math mode", "--device cuda");
    ck_assert_int_eq(run(TRAIN " %s --compute fp8", d), 2);        assert_error_line("--compute", "fp32|bf16|fp16");
#ifndef SDLORA_CUDA
    /* bf16, fp16 and --tf32 with --device cuda pass the flags: the build is what is missing */
    ck_assert_int_eq(run(TRAIN " %s --device cuda --compute fp16 --tf32 --model /nonexistent", d), 1);
    assert_error_line("--device cuda: this program was built without GPU support", "make CUDA=1");
    ck_assert_int_eq(run(SAMPLE " --prompt x --device cuda --compute bf16 --model /nonexistent"), 1);
    assert_error_line("--device cuda: this program was built without GPU support", "make CUDA=1");
    ck_assert_int_eq(run(TRAIN " %s --device cuda --model /nonexistent", d), 1);
    assert_error_line("--device cuda: this program was built without GPU support", "make CUDA=1");
    ck_assert_int_eq(run(SAMPLE " --prompt x --device cuda --model /nonexistent"), 1);
    assert_error_line("--device cuda: this program was built without GPU support", "make CUDA=1");
#else
    if (!cuda_available()) {
        ck_assert_int_eq(run(TRAIN " %s --device cuda --model /nonexistent", d), 1);
        assert_error_line("--device cuda: no ", "--device cpu)");
        ck_assert_int_eq(run(SAMPLE " --prompt x --device cuda --model /nonexistent"), 1);
        assert_error_line("--device cuda: no ", "--device cpu)");
    }
#endif
}
END_TEST

/* the metadata kohya writes and AUTOMATIC1111's LoRA card reads, for a
 * known run: 3 images in 3_thing (3 repeats) and 2 in DIR, 11 samples an
 * epoch, 7 steps of 2 = 14 samples: the second epoch */
static void assert_meta(const st_file *f, const char *key, const char *want) {
    const char *got = st_meta(f, key);
    ck_assert_msg(got && strcmp(got, want) == 0, "%s: '%s', expected '%s'", key, got ? got : "(absent)", want);
}

START_TEST(test_lora_metadata) {
    char d[128], sub[160], o[128], p[256], err[ST_ERR_LEN];
    snprintf(d, sizeof d, "%s/data", tmp); snprintf(sub, sizeof sub, "%s/3_thing", d); snprintf(o, sizeof o, "%s/out", tmp);
    make_images(d, 2, 1);
    make_images(sub, 3, 1);
    ck_assert_msg(run(TRAIN " %s " FLAGS " --steps 7 --weight-decay 0.05 --beta2 0.99 --clip-skip 2 --name myface --out %s",
                      d, o) == 0, "%s", log_text());
    snprintf(p, sizeof p, "%s/myface.safetensors", o);
    st_file f;
    ck_assert_msg(st_open(&f, p, err) == 0, "%s", err);
    assert_meta(&f, "ss_epoch", "2");
    assert_meta(&f, "ss_num_train_images", "11");   /* kohya: images x repeats */
    assert_meta(&f, "ss_steps", "7");
    assert_meta(&f, "ss_optimizer", "torch.optim.adamw.AdamW(weight_decay=0.05,betas=(0.9, 0.99))");
    assert_meta(&f, "ss_mixed_precision", "no");
    assert_meta(&f, "ss_dataset_dirs", "{\"3_thing\": {\"n_repeats\": 3, \"img_count\": 3}, "
                                       "\"data\": {\"n_repeats\": 1, \"img_count\": 2}}");
    assert_meta(&f, "ss_tag_frequency", "{\"3_thing\": {\"a red square number 0\": 1, \"a red square number 1\": 1, "
                                        "\"a red square number 2\": 1}, \"data\": {\"a red square number 0\": 1, "
                                        "\"a red square number 1\": 1}}");
    assert_meta(&f, "ss_shuffle_caption", "False");
    assert_meta(&f, "ss_keep_tokens", "0");
    assert_meta(&f, "ss_caption_dropout_rate", "0.0");
    assert_meta(&f, "ss_training_started_at", "1700000000");
    assert_meta(&f, "modelspec.sai_model_spec", "1.0.1");
    assert_meta(&f, "modelspec.architecture", "stable-diffusion-v1/lora");
    assert_meta(&f, "modelspec.implementation", "diffusers");
    assert_meta(&f, "modelspec.title", "myface");
    assert_meta(&f, "modelspec.resolution", "64x64");
    assert_meta(&f, "modelspec.date", "2023-11-14T22:13:20");   /* SOURCE_DATE_EPOCH 1700000000, UTC */
    assert_meta(&f, "modelspec.prediction_type", "epsilon");
    assert_meta(&f, "modelspec.encoder_layer", "2");
    /* sshs_model_hash: sha256 of the tensor bytes, everything after the header */
    uint64_t hl = 0;
    const uint8_t *raw = f.map;
    for (int i = 0; i < 8; i++) hl |= (uint64_t)raw[i] << (8 * i);
    sha256_ctx c; uint8_t dg[32]; char hex[65];
    sha256_init(&c); sha256_update(&c, raw + 8 + hl, f.size - 8 - hl); sha256_final(&c, dg); sha256_hex(dg, hex);
    assert_meta(&f, "sshs_model_hash", hex);
    /* sshs_legacy_hash: the file's tensors and ss_* keys hashed anew (the
     * hashing itself is checked against Python in test_caption) */
    st_writer *w = st_writer_new();
    for (int i = 0; i < f.ntensors; i++) {
        const st_tensor *t = &f.tensors[i];
        ck_assert(st_writer_add(w, t->name, t->dtype, t->ndim, t->shape, t->data) == 0);
    }
    for (int i = 0; i < f.nmeta; i++) ck_assert(st_writer_meta(w, f.meta_keys[i], f.meta_vals[i]) == 0);
    char mh[65], lh[9];
    ck_assert(st_writer_kohya_hashes(w, mh, lh) == 0);
    assert_meta(&f, "sshs_model_hash", mh);
    assert_meta(&f, "sshs_legacy_hash", lh);
    st_writer_free(w);
    st_close(&f);

    /* without SOURCE_DATE_EPOCH the date is the clock's when the run began,
     * and a resumed run keeps the date of the run it continues */
    char b[160], p2[256];
    snprintf(b, sizeof b, "%s/b", tmp);
    ck_assert_int_eq(run("env -u SOURCE_DATE_EPOCH SDLORA_STOP_AFTER=2 " TRAIN " %s " FLAGS " --steps 4 --out %s", d, b), 130);
    sleep_ms(1100);
    ck_assert_msg(run("env -u SOURCE_DATE_EPOCH " TRAIN " %s " FLAGS " --steps 4 --out %s --resume %s/state.safetensors", d, b, b) == 0,
                  "%s", log_text());
    snprintf(p, sizeof p, "%s/lora-step000002.safetensors", b); snprintf(p2, sizeof p2, "%s/lora.safetensors", b);
    st_file f1, f2;
    ck_assert_msg(st_open(&f1, p, err) == 0 && st_open(&f2, p2, err) == 0, "%s", err);
    const char *t1 = st_meta(&f1, "ss_training_started_at"), *t2 = st_meta(&f2, "ss_training_started_at");
    long long now = (long long)time(NULL), t0 = t1 ? atoll(t1) : 0;
    ck_assert_msg(t1 && t2 && strcmp(t1, t2) == 0, "resumed run began at %s, the first part at %s", t2, t1);
    ck_assert_msg(t0 > now - 600 && t0 <= now, "started at %lld, now is %lld", t0, now);
    ck_assert_str_eq(st_meta(&f1, "modelspec.date"), st_meta(&f2, "modelspec.date"));
    st_close(&f1); st_close(&f2);
}
END_TEST

/* --shuffle-caption, --keep-tokens, --caption-dropout: the same seed gives
 * the same bytes, a stopped and resumed run too; the options change what is
 * trained; --caption-ext reads the files it names */
START_TEST(test_caption_options) {
    char d[128], a[128], b[160], c[160], p1[256], p2[256], err[ST_ERR_LEN];
    snprintf(d, sizeof d, "%s/data", tmp);
    make_images(d, 4, 0);
    for (int i = 0; i < 4; i++) {      /* tagged captions, as a tagger writes them */
        snprintf(p1, sizeof p1, "%s/img%02d.txt", d, i);
        FILE *fp = fopen(p1, "w"); fprintf(fp, "sks, red square, number %d, blue background, solo\n", i); fclose(fp);
    }
    const char *opt = " --steps 6 --shuffle-caption --keep-tokens 1 --caption-dropout 0.2";
    snprintf(a, sizeof a, "%s/a", tmp); snprintf(b, sizeof b, "%s/b", tmp); snprintf(c, sizeof c, "%s/c", tmp);
    ck_assert_msg(run(TRAIN " %s " FLAGS "%s --out %s", d, opt, a) == 0, "%s", log_text());
    ck_assert_msg(run(TRAIN " %s " FLAGS "%s --out %s", d, opt, b) == 0, "%s", log_text());
    snprintf(p1, sizeof p1, "%s/lora.safetensors", a); snprintf(p2, sizeof p2, "%s/lora.safetensors", b);
    ck_assert_msg(same_file(p1, p2), "two runs with the same seed wrote different LoRAs");
    /* stopped after 2 of 6 and resumed: the same bytes */
    ck_assert_int_eq(run("SDLORA_STOP_AFTER=2 " TRAIN " %s " FLAGS "%s --out %s", d, opt, c), 130);
    ck_assert_msg(run(TRAIN " %s " FLAGS "%s --out %s --resume %s/state.safetensors", d, opt, c, c) == 0, "%s", log_text());
    snprintf(p2, sizeof p2, "%s/lora.safetensors", c);
    ck_assert_msg(same_file(p1, p2), "stopped and resumed with --shuffle-caption: another LoRA");
    snprintf(p1, sizeof p1, "%s/loss.csv", a); snprintf(p2, sizeof p2, "%s/loss.csv", c);
    ck_assert_msg(same_file(p1, p2), "stopped and resumed with --shuffle-caption: another loss.csv");
    /* the options change the training: other losses than the plain run's */
    ck_assert_msg(run(TRAIN " %s " FLAGS " --steps 6 --out %s", d, b) == 0, "%s", log_text());
    snprintf(p1, sizeof p1, "%s/loss.csv", a); snprintf(p2, sizeof p2, "%s/loss.csv", b);
    ck_assert_msg(!same_file(p1, p2), "--shuffle-caption --caption-dropout changed nothing");
    /* each option on its own changes it too, and with --te as well */
    const char *each[] = {" --shuffle-caption", " --caption-dropout 0.5", " --shuffle-caption --caption-dropout 0.3 --te"};
    for (int k = 0; k < 3; k++) {
        ck_assert_msg(run(TRAIN " %s " FLAGS " --steps 6%s --out %s", d, each[k], c) == 0, "%s", log_text());
        if (k == 2) ck_assert_msg(run(TRAIN " %s " FLAGS " --steps 6 --te --out %s", d, b) == 0, "%s", log_text());
        snprintf(p1, sizeof p1, "%s/loss.csv", c);
        ck_assert_msg(!same_file(p1, p2), "%s changed nothing", each[k]);
    }
    /* the per-sample paths give what the text cache gives for the same text:
     * --caption-dropout 1 trains as empty captions do (the cached empty
     * context; with --te the empty caption's tokens); and "x,y" shuffled with
     * every tag kept comes out as "x, y", encoded per step, the same tokens as
     * the cached "x, y" */
    char e[160], e2[160];
    snprintf(e, sizeof e, "%s/empty", tmp); snprintf(e2, sizeof e2, "%s/nospace", tmp);
    make_images(e, 4, 0);
    make_images(e2, 4, 0);
    for (int i = 0; i < 4; i++) {
        snprintf(p1, sizeof p1, "%s/img%02d.txt", e, i);
        FILE *fp = fopen(p1, "w"); fclose(fp);
        snprintf(p1, sizeof p1, "%s/img%02d.txt", e2, i);
        fp = fopen(p1, "w"); fprintf(fp, "sks,red square,number %d,blue background,solo\n", i); fclose(fp);
    }
    const char *pairs[][4] = {
        {d, " --caption-dropout 1", e, ""},
        {d, " --caption-dropout 1 --te", e, " --te"},
        {e2, " --shuffle-caption --keep-tokens 5", d, ""},
        {e2, " --shuffle-caption --keep-tokens 5 --te", d, " --te"},
    };
    for (int k = 0; k < 4; k++) {
        ck_assert_msg(run(TRAIN " %s " FLAGS " --steps 4%s --out %s", pairs[k][0], pairs[k][1], c) == 0, "%s", log_text());
        ck_assert_msg(run(TRAIN " %s " FLAGS " --steps 4%s --out %s", pairs[k][2], pairs[k][3], b) == 0, "%s", log_text());
        snprintf(p1, sizeof p1, "%s/loss.csv", c); snprintf(p2, sizeof p2, "%s/loss.csv", b);
        ck_assert_msg(same_file(p1, p2), "%s on %s trained otherwise than %s on %s", pairs[k][1], pairs[k][0], pairs[k][3], pairs[k][2]);
    }
    /* the metadata says what ran */
    snprintf(p1, sizeof p1, "%s/lora.safetensors", a);
    st_file f;
    ck_assert_msg(st_open(&f, p1, err) == 0, "%s", err);
    assert_meta(&f, "ss_shuffle_caption", "True");
    assert_meta(&f, "ss_keep_tokens", "1");
    assert_meta(&f, "ss_caption_dropout_rate", "0.2");
    st_close(&f);
    /* --keep-tokens alone: a warning, and the plain run's bytes */
    ck_assert_msg(run(TRAIN " %s " FLAGS " --steps 6 --keep-tokens 2 --out %s", d, c) == 0, "%s", log_text());
    char *s = log_text();
    ck_assert_msg(strstr(s, "warning: --keep-tokens 2 does nothing without --shuffle-caption"), "%s", s);
    free(s);
    ck_assert_msg(run(TRAIN " %s " FLAGS " --steps 6 --out %s", d, b) == 0, "%s", log_text());
    const char *files[] = {"state.safetensors", "loss.csv"};   /* (the LoRA says ss_keep_tokens 2, as kohya writes it) */
    for (int k = 0; k < 2; k++) {
        snprintf(p1, sizeof p1, "%s/%s", c, files[k]); snprintf(p2, sizeof p2, "%s/%s", b, files[k]);
        ck_assert_msg(same_file(p1, p2), "--keep-tokens alone changed %s", files[k]);
    }
    /* --caption-ext .caption: the .caption files are read, the .txt ones not */
    for (int i = 0; i < 4; i++) {
        snprintf(p1, sizeof p1, "%s/img%02d.caption", d, i);
        FILE *fp = fopen(p1, "w"); fprintf(fp, "Other, TAGS\n"); fclose(fp);
    }
    ck_assert_msg(run(TRAIN " %s " FLAGS " --steps 1 --caption-ext caption --out %s", d, c) == 0, "%s", log_text());
    snprintf(p1, sizeof p1, "%s/lora.safetensors", c);
    ck_assert_msg(st_open(&f, p1, err) == 0, "%s", err);
    assert_meta(&f, "ss_tag_frequency", "{\"data\": {\"other\": 4, \"tags\": 4}}");
    st_close(&f);
    /* without the flag, .txt wins as before */
    ck_assert_msg(run(TRAIN " %s " FLAGS " --steps 1 --out %s", d, c) == 0, "%s", log_text());
    ck_assert_msg(st_open(&f, p1, err) == 0, "%s", err);
    ck_assert_msg(strstr(st_meta(&f, "ss_tag_frequency"), "\"sks\": 4"), "%s", st_meta(&f, "ss_tag_frequency"));
    st_close(&f);
    /* an extension that has no files: every image uncaptioned, and the warning says which flag reads them */
    ck_assert_msg(run(TRAIN " %s " FLAGS " --steps 1 --caption-ext .tags --out %s", d, c) == 0, "%s", log_text());
    s = log_text();
    ck_assert_msg(strstr(s, "4 images have no caption (no .tags or captions.csv row)") &&
                  strstr(s, "4 of them have a .txt file beside it, which --caption-ext .tags does not read (use --caption-ext .txt)"), "%s", s);
    free(s);
    ck_assert_int_eq(run(TRAIN " %s " FLAGS " --caption-ext a/b --out %s", d, c), 2);
    assert_error_line("--caption-ext a/b", "not a file extension");
    ck_assert_int_eq(run(TRAIN " %s " FLAGS " --caption-dropout 1.5 --out %s", d, c), 2);
    assert_error_line("--caption-dropout", NULL);
}
END_TEST

/* the loss gradient reaches every sample of a batch and every micro-batch
 * of an accumulated step (once it reached only a batch's first sample, and
 * with --accum > 1 none: the loss backward took its arguments in the wrong
 * order). One step at batch 2 on two images: changing EITHER image changes
 * the LoRA. One step of batch 1 x accum 2: lora_up, zero at the start, moves.
 * min-SNR weights at batch 2: a finite LoRA. */
static void lora_up_stats(const char *path, int *nonzero, int *nonfinite) {
    st_file f; char err[ST_ERR_LEN];
    ck_assert_msg(st_open(&f, path, err) == 0, "%s", err);
    *nonzero = *nonfinite = 0;
    for (int i = 0; i < f.ntensors; i++) {
        const st_tensor *t = &f.tensors[i];
        if (!strstr(t->name, "lora_up") || t->dtype != ST_F32) continue;
        for (size_t k = 0; k < t->numel; k++) {
            float v; memcpy(&v, t->data + 4 * k, 4);
            if (v != 0.0f) (*nonzero)++;
            if (!isfinite(v)) (*nonfinite)++;
        }
    }
    st_close(&f);
}

/* the two files hold the same tensors, bit for bit (metadata aside) */
static int same_tensors(const char *p1, const char *p2) {
    st_file f, g; char err[ST_ERR_LEN];
    ck_assert_msg(st_open(&f, p1, err) == 0 && st_open(&g, p2, err) == 0, "%s", err);
    int same = f.ntensors == g.ntensors;
    for (int i = 0; same && i < f.ntensors; i++)
        same = strcmp(f.tensors[i].name, g.tensors[i].name) == 0 && f.tensors[i].nbytes == g.tensors[i].nbytes &&
               memcmp(f.tensors[i].data, g.tensors[i].data, f.tensors[i].nbytes) == 0;
    st_close(&f); st_close(&g);
    return same;
}

START_TEST(test_every_sample_trains) {
    char d[3][128], o[3][160], p[3][512], q[1024];
    for (int k = 0; k < 3; k++) {
        snprintf(d[k], sizeof d[k], "%s/d%d", tmp, k);
        make_images(d[k], 2, 1);
        snprintf(o[k], sizeof o[k], "%s/o%d", tmp, k);
        snprintf(p[k], sizeof p[k], "%s/lora.safetensors", o[k]);
    }
    /* d1: img00 another picture; d2: img01 another picture (img02's) */
    char e[160]; snprintf(e, sizeof e, "%s/e", tmp); make_images(e, 3, 0);
    snprintf(q, sizeof q, "cp %s/img02.png %s/d1/img00.png && cp %s/img02.png %s/d2/img01.png", e, tmp, e, tmp);
    ck_assert(system(q) == 0);
    for (int k = 0; k < 3; k++)
        ck_assert_msg(run(TRAIN " %s " FLAGS " --steps 1 --precision fp32 --out %s", d[k], o[k]) == 0, "%s", log_text());
    ck_assert_msg(!same_tensors(p[0], p[1]), "changing the batch's image img00 did not change the LoRA");
    ck_assert_msg(!same_tensors(p[0], p[2]), "changing the batch's image img01 did not change the LoRA");
    int nz, nf;
    ck_assert_msg(run(TRAIN " %s " FLAGS " --batch 1 --accum 2 --steps 1 --precision fp32 --out %s/acc", d[0], tmp) == 0, "%s", log_text());
    snprintf(q, sizeof q, "%s/acc/lora.safetensors", tmp);
    lora_up_stats(q, &nz, &nf);
    ck_assert_msg(nz > 0 && nf == 0, "--accum 2: %d lora_up values moved, %d not finite", nz, nf);
    ck_assert_msg(run(TRAIN " %s " FLAGS " --min-snr-gamma 5 --steps 2 --precision fp32 --out %s/snr", d[0], tmp) == 0, "%s", log_text());
    snprintf(q, sizeof q, "%s/snr/lora.safetensors", tmp);
    lora_up_stats(q, &nz, &nf);
    ck_assert_msg(nz > 0 && nf == 0, "--min-snr-gamma at batch 2: %d lora_up values moved, %d not finite", nz, nf);
}
END_TEST

/* --device cuda through ./train and ./sample themselves, without a GPU:
 * SDLORA_DEVICE=emulate (backend.h's testing hook) hands them
 * nn_ops_cpu_device(), the CPU's own functions as a device table whose
 * memory starts as NaN. Everything train.c does only for a device (the
 * uploads in to_device and alloc_device_buffers, the batch's latents and
 * contexts on the device, micro_noise's draws there, device_loss_step, the
 * optimizer step and --clip on device memory, device_to_host for saves and
 * --resume, --te's text encoder there) then runs, on numbers that must come
 * out bit for bit as the CPU path's: any missed upload, download or
 * device-side initialisation shows up as NaN or other bytes. */
#define EMU "SDLORA_DEVICE=emulate "

/* largest |a - b| over the two files' f32 tensors; *finite: all finite */
static double max_tensor_diff(const char *p1, const char *p2, int *finite) {
    st_file f, g; char err[ST_ERR_LEN];
    ck_assert_msg(st_open(&f, p1, err) == 0 && st_open(&g, p2, err) == 0, "%s", err);
    ck_assert_int_eq(f.ntensors, g.ntensors);
    double worst = 0;
    *finite = 1;
    for (int i = 0; i < f.ntensors; i++) {
        const st_tensor *a = &f.tensors[i], *b = &g.tensors[i];
        ck_assert_str_eq(a->name, b->name);
        ck_assert(a->dtype == ST_F32 && b->dtype == ST_F32 && a->numel == b->numel);
        for (size_t k = 0; k < a->numel; k++) {
            float x, y;
            memcpy(&x, a->data + 4 * k, 4); memcpy(&y, b->data + 4 * k, 4);
            if (!isfinite(x) || !isfinite(y)) *finite = 0;
            else if (fabs((double)x - y) > worst) worst = fabs((double)x - y);
        }
    }
    st_close(&f); st_close(&g);
    return worst;
}

/* the same run on the cpu (tmp/cpu) and on the emulated device (tmp/dev);
 * grid: with the before/after grid (the sampler inside ./train) */
static void emu_pair(const char *d, const char *flags, int grid) {
    char c[160], g[160], rm[400];
    snprintf(c, sizeof c, "%s/cpu", tmp); snprintf(g, sizeof g, "%s/dev", tmp);
    snprintf(rm, sizeof rm, "rm -rf %s %s", c, g); ck_assert(system(rm) == 0);
    const char *nogrid = grid ? "" : "--no-grid";
    ck_assert_msg(run(TRAIN " %s " FLAGS0 " %s %s --out %s", d, nogrid, flags, c) == 0, "[%s] cpu: %s", flags, log_text());
    ck_assert_msg(run(EMU TRAIN " %s " FLAGS0 " %s %s --device cuda --out %s", d, nogrid, flags, g) == 0, "[%s] device: %s", flags, log_text());
    char *s = log_text();
    ck_assert_msg(strstr(s, "device: cpu-as-device: "), "[%s] the device path did not run: %s", flags, s);
    free(s);
}

START_TEST(test_device_emulated) {
    char d[128], r[128], p1[256], p2[256];
    snprintf(d, sizeof d, "%s/data", tmp);
    make_images(d, 4, 0);
    for (int i = 0; i < 4; i++) {      /* tagged captions, for the caption options */
        snprintf(p1, sizeof p1, "%s/img%02d.txt", d, i);
        FILE *fp = fopen(p1, "w"); fprintf(fp, "sks, red square, number %d, blue background, solo\n", i); fclose(fp);
    }
    {   /* one wide image: --buckets below makes a 64x64 and an 80x48 bucket */
        static uint8_t px[96 * 48 * 3];
        for (int k = 0; k < 96 * 48 * 3; k++) px[k] = (uint8_t)(k * 7 % 251);
        char err[256];
        snprintf(p1, sizeof p1, "%s/wide.png", d);
        ck_assert_msg(image_save_png(p1, px, 96, 48, NULL, NULL, 0, err, sizeof err) == 0, "%s", err);
        snprintf(p1, sizeof p1, "%s/wide.txt", d);
        FILE *fp = fopen(p1, "w"); fprintf(fp, "sks, noise, wide\n"); fclose(fp);
    }
    snprintf(r, sizeof r, "%s/reg", tmp);
    mkdir(r, 0777);
    snprintf(p1, sizeof p1, "%s/reg/1_thing", tmp);
    make_images(p1, 2, 0);
    char reg[200]; snprintf(reg, sizeof reg, "--steps 3 --reg %s --prior-loss-weight 0.5", r);
    /* identical bytes: the LoRA, the optimizer state and loss.csv */
    const char *same[] = {
        /* a checkpoint and samples mid-run (device_to_host, then on), the grid at the end */
        "--steps 4 --save-every 2 --sample-every 2 --sample-prompt \"a red square|sks\"",
        "--steps 3 --flip",
        "--steps 3 --min-snr-gamma 5",
        "--steps 3 --noise-offset 0.05",
        "--steps 3 --shuffle-caption --keep-tokens 1 --caption-dropout 0.3",
        "--steps 3 --buckets --bucket-step 16 --min-bucket 32 --max-bucket 128 --res 64",
        "--steps 3 --random-crop --res 32",
        reg,
        "--steps 3 --te --shuffle-caption --caption-dropout 0.3 --dropout 0.1",
        "--steps 3 --targets attn --weight-dtype fp16 --grad-checkpoint --clip-grad 0.01",
    };
    for (size_t k = 0; k < sizeof same / sizeof same[0]; k++) {
        emu_pair(d, same[k], k == 0);
        const char *files[] = {"lora.safetensors", "state.safetensors", "loss.csv"};
        for (int f = 0; f < 3; f++) {
            snprintf(p1, sizeof p1, "%s/cpu/%s", tmp, files[f]); snprintf(p2, sizeof p2, "%s/dev/%s", tmp, files[f]);
            ck_assert_msg(same_file(p1, p2), "[%s] --device cuda (emulated): %s differs from --device cpu's", same[k], files[f]);
        }
        const char *more_files[] = {"lora-step000002.safetensors", "sample-step000002.png", "sample-step000004.png", "before_after.png"};
        for (int f = 0; k == 0 && f < 4; f++) {
            snprintf(p1, sizeof p1, "%s/cpu/%s", tmp, more_files[f]); snprintf(p2, sizeof p2, "%s/dev/%s", tmp, more_files[f]);
            ck_assert_msg(access(p1, F_OK) == 0 && same_file(p1, p2), "[%s] %s differs", same[k], more_files[f]);
        }
    }
    /* --accum 2 with a conv LoRA: on the device each micro-batch's gradient
     * adds into the running sum inside the backward's GEMMs and conv loops
     * (beta = 1), on the CPU each is made from zero and then added (dist.c's
     * order, shared with mpirun): the same sum in another order, so the bytes
     * may differ (they do here: 1.2e-7 at most); the numbers agree to float
     * rounding. The LoRA moves by about lr = 1e-3 a step: 1e-6 is a
     * thousandth of a step. */
    emu_pair(d, "--steps 3 --batch 2 --accum 2 --conv-rank 2 --targets transformer", 0);
    snprintf(p1, sizeof p1, "%s/cpu/lora.safetensors", tmp); snprintf(p2, sizeof p2, "%s/dev/lora.safetensors", tmp);
    int finite;
    double dl = max_tensor_diff(p1, p2, &finite);
    ck_assert_msg(finite && dl <= 1e-6, "--accum 2: the device's LoRA is %g from the cpu's (finite %d)", dl, finite);
    snprintf(p1, sizeof p1, "%s/cpu/loss.csv", tmp); snprintf(p2, sizeof p2, "%s/dev/loss.csv", tmp);
    char *x = slurp(p1, NULL), *y = slurp(p2, NULL);
    ck_assert(x && y);
    char *u = strchr(x, '\n'), *v = strchr(y, '\n');
    for (int step = 1; step <= 3; step++) {
        ck_assert(u && v);
        int s1, s2; float l1, l2;
        ck_assert(sscanf(u + 1, "%d,%f", &s1, &l1) == 2 && sscanf(v + 1, "%d,%f", &s2, &l2) == 2);
        ck_assert_int_eq(s1, step); ck_assert_int_eq(s2, step);
        ck_assert_msg(isfinite(l1) && fabsf(l1 - l2) <= 1e-5f * fabsf(l1), "--accum 2 step %d: loss %g on the cpu, %g on the device", step, l1, l2);
        u = strchr(u + 1, '\n'); v = strchr(v + 1, '\n');
    }
    free(x); free(y);

    /* --compute fp16 on the device: backward of 65536 x loss, the gradients
     * checked and unscaled there (nn_loss_scaler), then the step. The
     * emulated device's GEMMs stay fp32, and scaling by a power of two and
     * back is exact, so the LoRA's tensors and loss.csv must be the cpu fp32
     * run's bit for bit: a wrong scale, a missed unscale or a skipped step
     * shows. (The files' metadata differ: ss_mixed_precision says fp16.) */
    {
        char c[160], g[160];
        snprintf(c, sizeof c, "%s/cpu16", tmp); snprintf(g, sizeof g, "%s/dev16", tmp);
        const char *fl = "--steps 3 --te --clip-grad 0.01 --no-grid";
        ck_assert_msg(run(TRAIN " %s " FLAGS0 " %s --out %s", d, fl, c) == 0, "fp16 pair, cpu: %s", log_text());
        ck_assert_msg(run(EMU TRAIN " %s " FLAGS0 " %s --device cuda --compute fp16 --out %s", d, fl, g) == 0,
                      "fp16 pair, device: %s", log_text());
        char *lg = log_text();
        ck_assert_msg(strstr(lg, "device: cpu-as-device: ") && !strstr(lg, "overflowed"), "--compute fp16: %s", lg);
        free(lg);
        snprintf(p1, sizeof p1, "%s/lora.safetensors", c); snprintf(p2, sizeof p2, "%s/lora.safetensors", g);
        int fin;
        double d16 = max_tensor_diff(p1, p2, &fin);
        ck_assert_msg(fin && d16 == 0.0, "--compute fp16 (emulated device): the LoRA is %g from the cpu fp32 run's", d16);
        snprintf(p1, sizeof p1, "%s/loss.csv", c); snprintf(p2, sizeof p2, "%s/loss.csv", g);
        ck_assert_msg(same_file(p1, p2), "--compute fp16 (emulated device): loss.csv differs from the cpu fp32 run's");
    }

    /* --resume across devices: stopped on the device, resumed on the cpu,
     * and the other way: the bytes of a cpu run never stopped */
    const char *more = "--steps 6 --te --flip --dropout 0.1 --noise-offset 0.05";
    ck_assert_msg(run(TRAIN " %s " FLAGS " %s --out %s/a", d, more, tmp) == 0, "%s", log_text());
    for (int k = 0; k < 2; k++) {
        const char *first = k == 0 ? EMU : "", *then = k == 0 ? "" : EMU;
        const char *fdev = k == 0 ? "cuda" : "cpu", *tdev = k == 0 ? "cpu" : "cuda";
        ck_assert_int_eq(run("%sSDLORA_STOP_AFTER=%d " TRAIN " %s " FLAGS " %s --device %s --out %s/b%d", first, 2 + k, d, more, fdev, tmp, k), 130);
        ck_assert_msg(run("%s" TRAIN " %s " FLAGS " %s --device %s --out %s/b%d --resume %s/b%d/state.safetensors",
                          then, d, more, tdev, tmp, k, tmp, k) == 0, "%s", log_text());
        const char *files[] = {"lora.safetensors", "state.safetensors", "loss.csv", "loss.png"};
        for (int f = 0; f < 4; f++) {
            snprintf(p1, sizeof p1, "%s/a/%s", tmp, files[f]); snprintf(p2, sizeof p2, "%s/b%d/%s", tmp, k, files[f]);
            ck_assert_msg(same_file(p1, p2), "stopped on the %s at step %d, resumed on the %s: %s differs from the cpu run's",
                          fdev, 2 + k, tdev, files[f]);
        }
    }

    /* ./sample: the UNet, text encoder and VAE decode on the device give the
     * same PNG, with the LoRA as a side branch and merged */
    const char *sm[] = {"", "--merge --sampler ddim"};
    for (int k = 0; k < 2; k++) {
        snprintf(p1, sizeof p1, "%s/s_cpu.png", tmp); snprintf(p2, sizeof p2, "%s/s_dev.png", tmp);
        const char *fmt = "%s" SAMPLE " --model " MODEL " --prompt \"a red square\" --negative \"blue\" --steps 3 --seed 1 "
                          "--lora %s/a/lora.safetensors:0.8 %s --device %s --out %s";
        ck_assert_msg(run(fmt, "", tmp, sm[k], "cpu", p1) == 0, "%s", log_text());
        ck_assert_msg(run(fmt, EMU, tmp, sm[k], "cuda", p2) == 0, "%s", log_text());
        ck_assert_msg(same_file(p1, p2), "[%s] ./sample --device cuda (emulated) wrote another PNG than --device cpu", sm[k]);
    }
}
END_TEST

/* one case per test, so that CK_RUN_CASE=test_resume_identical runs just that one */
static void add_case(Suite *s, const char *name, const TTest *t) {
    TCase *tc = tcase_create(name);
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 900);   /* whole training runs; slow under ASan */
    tcase_add_test(tc, t);
    suite_add_tcase(s, tc);
}
#define ADD_CASE(s, t) add_case(s, #t, t)

static Suite *programs_suite(void) {
    Suite *s = suite_create("programs");
    ADD_CASE(s, test_help);
    ADD_CASE(s, test_bad_flags);
    ADD_CASE(s, test_weight_dtype);
    ADD_CASE(s, test_weight_dtype_te);
    ADD_CASE(s, test_device);
    ADD_CASE(s, test_device_emulated);
    ADD_CASE(s, test_every_sample_trains);
    ADD_CASE(s, test_train_then_sample);
    ADD_CASE(s, test_resume_identical);
    ADD_CASE(s, test_sigint_saves);
    ADD_CASE(s, test_threads_identical);
    ADD_CASE(s, test_dataset_layouts);
    ADD_CASE(s, test_bad_inputs);
    ADD_CASE(s, test_nan_stops);
    ADD_CASE(s, test_settings_sources);
    ADD_CASE(s, test_failed_run_keeps_out);
    ADD_CASE(s, test_lora_metadata);
    ADD_CASE(s, test_caption_options);
    return s;
}

CHECK_MAIN(programs_suite)

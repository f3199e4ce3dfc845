/* test_style.c: the default run, `./train data/`, moves measurable style
 * properties from the base model's samples toward the style set's.
 *
 * The style (data/README.md) is outlined, hatched shapes in posterised inks
 * on pastel "paper" backgrounds. The statistics (tools/style_stats.h, the
 * same code as `make_data --stat`):
 *   chroma = mean max(R,G,B) - min(R,G,B): style set 99.1, base set 122.1
 *   paper  = mean min(R,G,B):              style set 121.4, base set 71.3
 *   hatch  (diagonal bands):               style set 6.22, base set 0.01
 * The before/after grid ./train writes has the same prompts and seeds
 * without (top row) and with (bottom row) the LoRA, on prompts that include
 * content the style set never shows (data/sample_prompts.txt). The LoRA's
 * row must be closer to the style set in chroma and paper (its distance to
 * them at least 40% shorter) and more hatched.
 *
 * Measured with models/tiny and data/sdlora_args.txt (1200 steps, batch 4):
 * chroma 106.2 -> 98.0, paper 132.3 -> 125.3, hatch -0.27 -> 0.82. (Before
 * train.c's loss backward was fixed only a batch's first sample trained, at
 * B^2 the gradient; that run overshot to chroma 77.3, paper 154.2, and the
 * old thresholds, "15 less chroma, 10 more paper", were set from it.)
 *
 * This is a 1200-step training run (about 3.5 min at -O3 on 2 cores), so it
 * is skipped in the sanitiser build, where it would take many minutes. */
#include <unistd.h>
#include "testutil.h"
#include "grid.h"
#include "image.h"
#include "tools/style_stats.h"
#include <math.h>

/* the style set's statistics (make_data --stat) */
#define STYLE_CHROMA 99.1
#define STYLE_PAPER 121.4

#ifndef SDLORA_BUILD
#define SDLORA_BUILD "build"
#endif

#if defined(__SANITIZE_ADDRESS__)
#define SANITISED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SANITISED 1
#endif
#endif

START_TEST(test_default_run_shows_style) {
#ifdef SANITISED
    printf("test_default_run_shows_style: skipped in the sanitiser build (a 1200-step training run)\n");
    return;
#endif
    char dir[] = "/tmp/sdlora_style_XXXXXX";
    ck_assert(mkdtemp(dir) != NULL);
    char cmd[512];
    snprintf(cmd, sizeof cmd, SDLORA_BUILD "/train data/ --out %s > %s/log 2>&1", dir, dir);
    int rc = system(cmd);
    ck_assert_msg(rc == 0, "./train data/ failed (see %s/log)", dir);
    char p[256], err[256];
    snprintf(p, sizeof p, "%s/before_after.png", dir);
    image_t im;
    ck_assert_msg(image_load(&im, p, err, sizeof err) == 0, "%s", err);
    /* 2 rows (base, LoRA) of 4 labelled cells, each 64x64 scaled by a whole
     * factor (grid.c): every scale-th pixel gives the sample back exactly */
    enum { n = 4, side = 64 };
    grid_image geo;
    ck_assert_int_eq(grid_geometry(&geo, 2, n, side, side, 256, 1, 1), 0);
    ck_assert_msg(im.w == geo.w && im.h == geo.h, "before_after.png is %dx%d, the grid's layout %dx%d",
                  im.w, im.h, geo.w, geo.h);
    uint8_t *cell[2] = {malloc(side * side * 3), malloc(side * side * 3)};
    double hb = 0, ha = 0, pb = 0, pa = 0, cb = 0, ca = 0;
    for (int i = 0; i < n; i++) {
        double h0, h1, d, p0, p1, c0, c1;
        for (int r = 0; r < 2; r++) {
            int ox, oy;
            grid_cell_origin(&geo, r, i, &ox, &oy);
            for (int y = 0; y < side; y++)
                for (int x = 0; x < side; x++)
                    memcpy(cell[r] + ((size_t)y * side + x) * 3,
                           im.rgb + ((size_t)(oy + y * geo.scale) * im.w + ox + x * geo.scale) * 3, 3);
        }
        style_stats(cell[0], side, side, side, &h0, &d, &p0, &c0);
        style_stats(cell[1], side, side, side, &h1, &d, &p1, &c1);
        printf("prompt %d: chroma %5.1f -> %5.1f, paper %5.1f -> %5.1f, hatch %6.2f -> %6.2f (without -> with the LoRA)\n",
               i, c0, c1, p0, p1, h0, h1);
        hb += h0 / n; ha += h1 / n; pb += p0 / n; pa += p1 / n; cb += c0 / n; ca += c1 / n;
    }
    printf("mean chroma: %.1f -> %.1f (style set 99.1, base set 122.1)\n", cb, ca);
    printf("mean paper:  %.1f -> %.1f (style set 121.4, base set 71.3)\n", pb, pa);
    printf("mean hatch:  %.2f -> %.2f (style set 6.22, base set 0.01)\n", hb, ha);
    fflush(stdout);   /* printed even when an assertion below ends the test */
    /* each statistic moves toward the style set's: its distance to it at
     * least 40% shorter with the LoRA than without (chroma, paper), and the
     * hatching up. Overshooting counts against: a run that pushes chroma far
     * below the style set's is not closer to it. */
    double dc0 = fabs(cb - STYLE_CHROMA), dc1 = fabs(ca - STYLE_CHROMA);
    double dp0 = fabs(pb - STYLE_PAPER), dp1 = fabs(pa - STYLE_PAPER);
    ck_assert_msg(dc1 < 0.6 * dc0, "the LoRA did not move the samples' chroma toward the style set's %.1f: %.1f -> %.1f",
                  STYLE_CHROMA, cb, ca);
    ck_assert_msg(dp1 < 0.6 * dp0, "the LoRA did not move the samples' paper toward the style set's %.1f: %.1f -> %.1f",
                  STYLE_PAPER, pb, pa);
    ck_assert_msg(ha > hb, "the LoRA did not add hatching: %.2f -> %.2f", hb, ha);
    image_free(&im);
    free(cell[0]); free(cell[1]);
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    ck_assert(system(cmd) == 0);
}
END_TEST

static Suite *style_suite(void) {
    Suite *s = suite_create("style");
    TCase *tc = tcase_create("default run");
    tcase_set_timeout(tc, 1800);
    tcase_add_test(tc, test_default_run_shows_style);
    suite_add_tcase(s, tc);
    return s;
}

CHECK_MAIN(style_suite)

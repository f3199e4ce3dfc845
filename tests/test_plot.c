/* test_plot.c: the loss chart puts its ticks, lines and labels where its
 * mapping says, for known series. */
#include "testutil.h"
#include "plot.h"
#include "font.h"

enum { W = 640, H = 400 };

static int is_rgb(const uint8_t *im, int x, int y, int r, int g, int b) {
    const uint8_t *p = im + ((size_t)y * W + x) * 3;
    return p[0] == r && p[1] == g && p[2] == b;
}
static int dark(const uint8_t *im, int x, int y) { return im[((size_t)y * W + x) * 3] < 128; }

START_TEST(test_ticks) {
    double t[16];
    int n = plot_ticks(0, 1, 5, t, 16);
    ck_assert_int_eq(n, 6);
    for (int i = 0; i < n; i++) ck_assert(fabs(t[i] - 0.2 * i) < 1e-12);
    /* range 0.074 over 6 ticks wanted: a step of 0.02 (1, 2, 5 x 10^k) */
    n = plot_ticks(0.013, 0.087, 6, t, 16);
    ck_assert_int_eq(n, 4);
    ck_assert(fabs(t[0] - 0.02) < 1e-12 && fabs(t[3] - 0.08) < 1e-12);
    ck_assert_int_eq(plot_ticks(1, 1, 5, t, 16), 0);
}
END_TEST

START_TEST(test_line_through_points) {
    /* loss falls linearly from 1 to 0 over 101 steps: the bold line passes
     * through (51, 0.5), and the lines' pixels sit nowhere near (51, 0.9) */
    enum { N = 101 };
    float sm[N];
    for (int i = 0; i < N; i++) sm[i] = 1.0f - i / 100.0f;
    plot_series s = {NULL, sm, NULL, N, "test", NULL, 0};
    uint8_t *im = malloc((size_t)W * H * 3);
    plot_frame f;
    ck_assert_int_eq(plot_loss(im, W, H, &s, &f), 0);
    ck_assert(f.lo < 0 && f.hi > 1 && f.log_y == 0 && f.n == N);
    ck_assert(f.x0 >= 40 && f.x1 < W && f.y0 > 0 && f.y1 < H);
    ck_assert_int_eq(plot_x(&f, 1), f.x0);
    ck_assert_int_eq(plot_x(&f, N), f.x1);
    int x = plot_x(&f, 51), y = plot_y(&f, 0.5);
    ck_assert_msg(is_rgb(im, x, y, 20, 60, 170), "no line at (%d, %d)", x, y);
    ck_assert(!is_rgb(im, x, plot_y(&f, 0.9), 20, 60, 170));
    ck_assert(!is_rgb(im, x, plot_y(&f, 0.1), 20, 60, 170));
    /* the axes: the left one runs the panel's height, the bottom one its width */
    for (int yy = f.y0; yy <= f.y1; yy++) ck_assert(is_rgb(im, f.x0, yy, 0, 0, 0));
    for (int xx = f.x0; xx <= f.x1; xx++) ck_assert(is_rgb(im, xx, f.y1, 0, 0, 0));
    /* the tick at 0.4: a tick mark left of the axis, a grid line across,
     * and its label ("0.4", 3 characters) right-aligned before the mark */
    int ty = plot_y(&f, 0.4);
    ck_assert(is_rgb(im, f.x0 - 3, ty, 0, 0, 0));
    ck_assert(is_rgb(im, (f.x0 + f.x1) / 2 + 7, ty, 225, 225, 225) || is_rgb(im, (f.x0 + f.x1) / 2 + 7, ty, 20, 60, 170));
    int ink = 0, lx1 = f.x0 - 7, lx0 = lx1 - font_text_width("0.4", 1);
    for (int yy = ty - FONT_H / 2; yy < ty - FONT_H / 2 + FONT_H; yy++)
        for (int xx = lx0; xx < lx1; xx++) ink += dark(im, xx, yy);
    ck_assert_msg(ink > 10, "tick label at 0.4: %d dark pixels", ink);
    /* the step ticks: 20, 40, ... 100 (1, 2, 5 x 10^k, about 8 wanted) under the axis */
    ck_assert(is_rgb(im, plot_x(&f, 40), f.y1 + 3, 0, 0, 0) && !is_rgb(im, plot_x(&f, 50), f.y1 + 3, 0, 0, 0));
    /* the title is drawn at the top left, at scale 2 */
    ink = 0;
    for (int yy = 6; yy < 6 + 2 * FONT_H; yy++)
        for (int xx = 8; xx < 8 + font_text_width("test", 2); xx++) ink += dark(im, xx, yy);
    ck_assert(ink > 40);
    free(im);
}
END_TEST

START_TEST(test_log_scale_and_lr_panel) {
    enum { N = 50 };
    float sm[N], raw[N], lr[N];
    for (int i = 0; i < N; i++) { sm[i] = powf(10.0f, -2.0f * i / (N - 1)); raw[i] = sm[i] * 1.3f; lr[i] = 1e-3f; }
    plot_series s = {raw, sm, lr, N, "decades", "sub", -1};
    uint8_t *im = malloc((size_t)W * H * 3);
    plot_frame f, g;
    ck_assert_int_eq(plot_loss(im, W, H, &s, &f), 0);
    ck_assert_int_eq(f.log_y, 1);                 /* 1 -> 0.01 spans two decades */
    /* on a log axis equal ratios are equal distances */
    int d1 = plot_y(&f, 0.01) - plot_y(&f, 0.1), d2 = plot_y(&f, 0.1) - plot_y(&f, 1.0);
    ck_assert(abs(d1 - d2) <= 1);
    /* a constant learning rate gets no panel; a scheduled one does, below */
    for (int i = 0; i < N; i++) lr[i] = 1e-3f * (1.0f - (float)i / N);
    ck_assert_int_eq(plot_loss(im, W, H, &s, &g), 0);
    ck_assert(g.y1 < f.y1 - 40);
    /* within a decade: linear */
    for (int i = 0; i < N; i++) sm[i] = 0.5f - 0.2f * i / N;
    s.raw = NULL; s.lr = NULL;
    ck_assert_int_eq(plot_loss(im, W, H, &s, &f), 0);
    ck_assert_int_eq(f.log_y, 0);
    /* nothing to draw, or no room to draw it: refused */
    s.n = 0;
    ck_assert_int_eq(plot_loss(im, W, H, &s, NULL), -1);
    s.n = N;
    ck_assert_int_eq(plot_loss(im, 100, 100, &s, NULL), -1);
    free(im);
}
END_TEST

static Suite *plot_suite(void) {
    Suite *s = suite_create("plot");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_ticks);
    tcase_add_test(tc, test_line_through_points);
    tcase_add_test(tc, test_log_scale_and_lr_panel);
    suite_add_tcase(s, tc);
    return s;
}

CHECK_MAIN(plot_suite)

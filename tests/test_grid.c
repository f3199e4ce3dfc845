/* test_grid.c: labelled grids have the expected size, cells scaled by a
 * whole factor at their places, and labels where they belong. */
#include "testutil.h"
#include "grid.h"
#include "font.h"

static int dark_in(const grid_image *g, int x0, int y0, int x1, int y1) {
    int n = 0;
    for (int y = y0; y < y1; y++)
        for (int x = x0; x < x1; x++) n += g->rgb[((size_t)y * g->w + x) * 3] < 100;
    return n;
}

START_TEST(test_cells_scaled_and_placed) {
    /* 2 x 3 cells of 64 x 48, each a colour ramp: scaled by 6 to a 288
     * shorter side (>= 256), each source pixel a 6 x 6 block */
    enum { R = 2, C = 3, CW = 64, CH = 48 };
    uint8_t *cells[R * C];
    for (int i = 0; i < R * C; i++) {
        cells[i] = malloc(CW * CH * 3);
        for (int y = 0; y < CH; y++)
            for (int x = 0; x < CW; x++) {
                uint8_t *p = cells[i] + ((size_t)y * CW + x) * 3;
                p[0] = (uint8_t)(40 * i); p[1] = (uint8_t)(x * 4); p[2] = (uint8_t)(y * 5);
            }
    }
    grid_image g;
    ck_assert_int_eq(grid_compose(&g, (const uint8_t *const *)cells, R, C, CW, CH, 256, NULL, NULL), 0);
    ck_assert_int_eq(g.scale, 6);
    ck_assert_int_eq(g.cell_w, 384);
    ck_assert_int_eq(g.cell_h, 288);
    /* no labels: only the outer padding and the gaps around the cells */
    ck_assert_int_eq(g.w, g.x0 + C * 384 + (C - 1) * g.gap + g.gap);
    ck_assert_int_eq(g.h, g.y0 + R * 288 + (R - 1) * g.gap + g.gap);
    for (int i = 0; i < R * C; i++) {
        int ox, oy;
        grid_cell_origin(&g, i / C, i % C, &ox, &oy);
        /* output pixel (x, y) of a cell is source pixel (x / 6, y / 6) */
        const int xs[] = {0, 5, 6, 200, 383}, ys[] = {0, 5, 6, 100, 287};
        for (int a = 0; a < 5; a++)
            for (int b = 0; b < 5; b++) {
                const uint8_t *o = g.rgb + ((size_t)(oy + ys[b]) * g.w + ox + xs[a]) * 3;
                const uint8_t *s = cells[i] + ((size_t)(ys[b] / 6) * CW + xs[a] / 6) * 3;
                ck_assert_msg(memcmp(o, s, 3) == 0, "cell %d pixel (%d, %d)", i, xs[a], ys[b]);
            }
    }
    grid_free(&g);
    for (int i = 0; i < R * C; i++) free(cells[i]);
}
END_TEST

START_TEST(test_labels) {
    enum { CW = 32, CH = 32 };
    uint8_t *white = malloc(CW * CH * 3);
    memset(white, 255, CW * CH * 3);
    const uint8_t *cells[4] = {white, white, white, white};
    const char *cols[2] = {"sdlstyle, a small red circle on the right, white background\nseed 42", "a cat\nseed 7"};
    const char *rows[2] = {"base", "LoRA step 1200"};
    grid_image g;
    ck_assert_int_eq(grid_compose(&g, cells, 2, 2, CW, CH, 256, cols, rows), 0);
    ck_assert_int_eq(g.scale, 8);
    int lh = FONT_LINE * 2;
    /* column 0's header wraps to several lines above the first row; the
     * header band is as tall as the longest one */
    ck_assert(g.y0 >= 3 * lh);
    int ox, oy;
    grid_cell_origin(&g, 0, 0, &ox, &oy);
    ck_assert(dark_in(&g, ox, 0, ox + g.cell_w, oy) > 100);
    /* column 1's header has 2 lines: ink in them, none below */
    grid_cell_origin(&g, 0, 1, &ox, &oy);
    ck_assert(dark_in(&g, ox, 8, ox + g.cell_w, 8 + 2 * lh) > 50);
    ck_assert_int_eq(dark_in(&g, ox, 8 + 2 * lh, ox + g.cell_w, oy), 0);
    /* row labels sit left of their rows: "base" beside row 0, nothing of
     * it beside row 1 */
    int r0y, r1y, x;
    grid_cell_origin(&g, 0, 0, &x, &r0y);
    grid_cell_origin(&g, 1, 0, &x, &r1y);
    ck_assert(g.x0 >= font_text_width("LoRA step 1200", 2));
    ck_assert(dark_in(&g, 0, r0y, g.x0, r0y + g.cell_h) > 30);
    ck_assert(dark_in(&g, 0, r1y, g.x0, r1y + g.cell_h) > 30);
    /* the cells themselves stay white: no label drawn over them */
    ck_assert_int_eq(dark_in(&g, g.x0, g.y0, g.w - g.gap, g.h - g.gap), 0);
    /* the layout does not depend on the labels' text: grid_geometry gives it */
    grid_image geo;
    ck_assert_int_eq(grid_geometry(&geo, 2, 2, CW, CH, 256, 1, 1), 0);
    ck_assert(geo.w == g.w && geo.h == g.h && geo.x0 == g.x0 && geo.y0 == g.y0 && geo.scale == g.scale && !geo.rgb);
    grid_free(&g);
    const char *longer[2] = {"one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                             "fifteen sixteen seventeen eighteen nineteen twenty\nseed 3", "x"};
    ck_assert_int_eq(grid_compose(&g, cells, 2, 2, CW, CH, 256, longer, rows), 0);
    ck_assert(geo.w == g.w && geo.h == g.h && geo.x0 == g.x0 && geo.y0 == g.y0);
    /* cut at GRID_HEAD_LINES lines, the last one (the seed) kept: ink on the
     * header's last line, and none between it and the cells */
    grid_cell_origin(&g, 0, 0, &ox, &oy);
    ck_assert(dark_in(&g, ox, 8 + (GRID_HEAD_LINES - 1) * lh, ox + g.cell_w, 8 + GRID_HEAD_LINES * lh) > 10);
    ck_assert_int_eq(dark_in(&g, ox, 8 + GRID_HEAD_LINES * lh, ox + g.cell_w, oy), 0);
    grid_free(&g);
    ck_assert_int_eq(grid_compose(&g, cells, 0, 2, CW, CH, 256, NULL, NULL), -1);
    free(white);
}
END_TEST

static Suite *grid_suite(void) {
    Suite *s = suite_create("grid");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_cells_scaled_and_placed);
    tcase_add_test(tc, test_labels);
    suite_add_tcase(s, tc);
    return s;
}

CHECK_MAIN(grid_suite)

/* test_font.c: the bitmap font covers printable ASCII, draws where it says,
 * and wraps text at spaces. */
#include "testutil.h"
#include "font.h"

static const uint8_t INK[3] = {0, 0, 0};

static int ink_at(const uint8_t *im, int w, int x, int y) {
    return im[((size_t)y * w + x) * 3] == 0;
}

START_TEST(test_every_glyph) {
    /* all 95 printable characters have a glyph, every one but the space has
     * ink, no two are the same, and nothing outside 32..126 has one */
    for (int c = 32; c <= 126; c++) {
        const uint8_t *g = font_glyph(c);
        ck_assert_msg(g != NULL, "no glyph for %d", c);
        int ink = 0;
        for (int r = 0; r < FONT_H; r++) {
            ck_assert_msg((g[r] >> FONT_W) == 0, "glyph %d row %d wider than %d", c, r, FONT_W);
            ink += g[r] != 0;
        }
        ck_assert_msg(c == ' ' ? ink == 0 : ink > 0, "glyph %d: %d inked rows", c, ink);
        for (int d = 32; d < c; d++)
            ck_assert_msg(memcmp(g, font_glyph(d), FONT_H) != 0, "glyphs %d and %d are the same", c, d);
    }
    ck_assert(font_glyph(31) == NULL && font_glyph(127) == NULL && font_glyph(200) == NULL);
}
END_TEST

START_TEST(test_draw_places_pixels) {
    enum { W = 24, H = 24 };
    uint8_t im[W * H * 3];
    memset(im, 255, sizeof im);
    /* 'L' at (3, 4), scale 2: its left column covers x 3..4, y 4..17, its
     * bottom row y 16..17, x 3..12; nothing else */
    int wd = font_draw(im, W, H, 3, 4, "L", 2, INK);
    ck_assert_int_eq(wd, 10);
    int n = 0;
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++) {
            int want = (x >= 3 && x <= 4 && y >= 4 && y <= 17) || (y >= 16 && y <= 17 && x >= 3 && x <= 12);
            ck_assert_msg(ink_at(im, W, x, y) == want, "pixel (%d, %d): ink %d, want %d", x, y,
                          ink_at(im, W, x, y), want);
            n += want;
        }
    ck_assert_int_eq(n, 2 * 14 + 8 * 2);     /* the stroke, then the foot beyond it */
    /* the second character starts FONT_ADV * scale to the right */
    memset(im, 255, sizeof im);
    font_draw(im, W, H, 0, 0, "||", 1, INK);
    ck_assert(ink_at(im, W, 2, 0) && ink_at(im, W, 2 + FONT_ADV, 0) && !ink_at(im, W, 3, 0));
    ck_assert_int_eq(font_text_width("ab", 1), 2 * FONT_ADV - 1);
    ck_assert_int_eq(font_text_width("", 3), 0);
}
END_TEST

START_TEST(test_clipped_and_unknown) {
    enum { W = 8, H = 8 };
    uint8_t im[W * H * 3];
    memset(im, 255, sizeof im);
    /* half off the left and bottom edges: no write outside, the rest drawn */
    font_draw(im, W, H, -3, 4, "H", 1, INK);
    ck_assert(ink_at(im, W, 1, 4) && ink_at(im, W, 1, 7));   /* the right stroke of H */
    /* a character the font lacks is a '?' */
    uint8_t a[W * H * 3], b[W * H * 3];
    memset(a, 255, sizeof a); memset(b, 255, sizeof b);
    font_draw(a, W, H, 0, 0, "\x7f", 1, INK);
    font_draw(b, W, H, 0, 0, "?", 1, INK);
    ck_assert(memcmp(a, b, sizeof a) == 0);
}
END_TEST

START_TEST(test_wrap) {
    char lines[4][16];
    int n = font_wrap("a red circle on the right", 10, &lines[0][0], 16, 4);
    ck_assert_int_eq(n, 3);
    ck_assert_str_eq(lines[0], "a red");
    ck_assert_str_eq(lines[1], "circle on");
    ck_assert_str_eq(lines[2], "the right");
    /* a word longer than a line is cut; the line count is capped */
    n = font_wrap("abcdefghijkl xy", 5, &lines[0][0], 16, 2);
    ck_assert_int_eq(n, 2);
    ck_assert_str_eq(lines[0], "abcde");
    ck_assert_str_eq(lines[1], "fghij");
}
END_TEST

static Suite *font_suite(void) {
    Suite *s = suite_create("font");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_every_glyph);
    tcase_add_test(tc, test_draw_places_pixels);
    tcase_add_test(tc, test_clipped_and_unknown);
    tcase_add_test(tc, test_wrap);
    suite_add_tcase(s, tc);
    return s;
}

CHECK_MAIN(font_suite)

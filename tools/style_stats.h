/* tools/style_stats.h: the statistics that define the bundled style
 * (data/README.md), shared by make_data --stat and tests/test_style.c so
 * that the data's numbers and the test's are the same measurement.
 *
 * On a w x h window of an RGB image whose rows are `stride` pixels apart:
 *   hatch = mean |L(x,y) - L(x+2,y+2)| - mean |L(x,y) - L(x+2,y-2)|
 *     (L = luma 0..255). The style's bands run along x + y = const: they do
 *     not change along (+2,-2) and flip along (+2,+2), so hatch is large;
 *     unstyled scenes are mirror-symmetric on average, so theirs is near 0.
 *   dark  = the fraction of pixels with every channel below 48 (outlines).
 *   paper = mean of min(R, G, B): pale backgrounds raise it.
 *   chroma = mean of max(R, G, B) - min(R, G, B): the style's pastel paper
 *     and posterised inks lower it. */
#ifndef SDLORA_STYLE_STATS_H
#define SDLORA_STYLE_STATS_H
#include <stdint.h>

/* luma, Rec. 601 integer weights, 0..255 */
static inline int style_luma(const uint8_t *c) { return (299 * c[0] + 587 * c[1] + 114 * c[2] + 500) / 1000; }

static inline void style_stats(const uint8_t *rgb, int stride, int w, int h,
                               double *hatch, double *dark, double *paper, double *chroma) {
    long long a = 0, b = 0, nd = 0, np = 0, pm = 0, cm = 0;
    for (int y = 2; y + 2 < h; y++)
        for (int x = 0; x + 2 < w; x++) {
            int l = style_luma(rgb + 3 * ((long)y * stride + x));
            int d1 = l - style_luma(rgb + 3 * ((long)(y + 2) * stride + x + 2));
            int d2 = l - style_luma(rgb + 3 * ((long)(y - 2) * stride + x + 2));
            a += d1 < 0 ? -d1 : d1;
            b += d2 < 0 ? -d2 : d2;
            np++;
        }
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) {
            const uint8_t *c = rgb + 3 * ((long)y * stride + x);
            int m = c[0] < c[1] ? c[0] : c[1], M = c[0] > c[1] ? c[0] : c[1];
            m = m < c[2] ? m : c[2];
            M = M > c[2] ? M : c[2];
            pm += m;
            cm += M - m;
            nd += c[0] < 48 && c[1] < 48 && c[2] < 48;
        }
    *hatch = np ? (double)(a - b) / (double)np : 0;
    *dark = (double)nd / ((double)w * h);
    *paper = (double)pm / ((double)w * h);
    *chroma = (double)cm / ((double)w * h);
}
#endif

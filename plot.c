/* plot.c: the loss chart (see plot.h), drawn pixel by pixel with font.c. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "plot.h"
#include "font.h"

static const uint8_t BLACK[3] = {0, 0, 0}, GRID[3] = {225, 225, 225}, GREY[3] = {90, 90, 90};
static const uint8_t RAW[3] = {160, 185, 230}, SMOOTH[3] = {20, 60, 170}, LR[3] = {200, 90, 30};

typedef struct { uint8_t *rgb; int w, h; } canvas;

static void put(canvas *c, int x, int y, const uint8_t col[3]) {
    if (x < 0 || y < 0 || x >= c->w || y >= c->h) return;
    memcpy(c->rgb + ((size_t)y * c->w + x) * 3, col, 3);
}

/* a straight line from (x0, y0) to (x1, y1), `thick` pixels wide
 * (Bresenham: step along the longer axis, carry the error on the other) */
static void line(canvas *c, int x0, int y0, int x1, int y1, const uint8_t col[3], int thick) {
    int dx = abs(x1 - x0), dy = -abs(y1 - y0), sx = x0 < x1 ? 1 : -1, sy = y0 < y1 ? 1 : -1;
    int e = dx + dy;
    for (;;) {
        for (int t = 0; t < thick; t++) { put(c, x0, y0 + t, col); if (thick > 1) put(c, x0 + t, y0, col); }
        if (x0 == x1 && y0 == y1) break;
        int e2 = 2 * e;
        if (e2 >= dy) { e += dy; x0 += sx; }
        if (e2 <= dx) { e += dx; y0 += sy; }
    }
}

int plot_ticks(double lo, double hi, int want, double *ticks, int max) {
    if (!(hi > lo) || want < 1) return 0;
    // step = 1, 2 or 5 x 10^k, the first at least (hi - lo) / want
    double raw = (hi - lo) / want, p = pow(10.0, floor(log10(raw)));
    double step = raw <= p ? p : raw <= 2 * p ? 2 * p : raw <= 5 * p ? 5 * p : 10 * p;
    int n = 0;
    for (double t = ceil(lo / step - 1e-9) * step; t <= hi + step * 1e-9 && n < max; t += step)
        ticks[n++] = fabs(t) < step * 1e-9 ? 0.0 : t;
    return n;
}

int plot_x(const plot_frame *f, double step) {
    double u = f->n > 1 ? (step - 1) / (double)(f->n - 1) : 0.5;
    return f->x0 + (int)lround(u * (f->x1 - f->x0));
}

int plot_y(const plot_frame *f, double v) {
    double a = f->lo, b = f->hi;
    if (f->log_y) { v = log10(v > 1e-30 ? v : 1e-30); a = log10(a); b = log10(b); }
    double u = (v - a) / (b - a);
    return f->y1 - (int)lround(u * (f->y1 - f->y0));
}

/* a number for an axis: as short as it can be and still tell ticks apart */
static void fmt_num(char *b, size_t n, double v) {
    double a = fabs(v);
    if (v == 0) snprintf(b, n, "0");
    else if (a >= 1e4 || a < 1e-2) snprintf(b, n, "%.0e", v);
    else snprintf(b, n, "%g", v);
}

static void text(canvas *c, int x, int y, const char *s, int scale, const uint8_t col[3]) {
    font_draw(c->rgb, c->w, c->h, x, y, s, scale, col);
}

/* text right-aligned to x */
static void text_right(canvas *c, int x, int y, const char *s, const uint8_t col[3]) {
    text(c, x - font_text_width(s, 1), y, s, 1, col);
}

static void frame_box(canvas *c, const plot_frame *f) {
    line(c, f->x0, f->y0, f->x0, f->y1, BLACK, 1);
    line(c, f->x0, f->y1, f->x1, f->y1, BLACK, 1);
}

/* the y axis: grid lines and labelled ticks, linear or by decades */
static void y_axis(canvas *c, const plot_frame *f) {
    double t[32];
    int nt = 0;
    if (f->log_y) {
        for (double p = pow(10.0, floor(log10(f->lo))); p <= f->hi * 1.0001 && nt < 30; p *= 10) {
            const double m[3] = {1, 2, 5};
            int decades = (int)ceil(log10(f->hi / f->lo));
            for (int k = 0; k < (decades <= 2 ? 3 : 1); k++)
                if (p * m[k] >= f->lo * 0.9999 && p * m[k] <= f->hi * 1.0001) t[nt++] = p * m[k];
        }
    } else {
        nt = plot_ticks(f->lo, f->hi, 6, t, 32);
    }
    for (int i = 0; i < nt; i++) {
        int y = plot_y(f, t[i]);
        for (int x = f->x0 + 1; x <= f->x1; x++) put(c, x, y, GRID);
        line(c, f->x0 - 4, y, f->x0, y, BLACK, 1);
        char b[32];
        fmt_num(b, sizeof b, t[i]);
        text_right(c, f->x0 - 7, y - FONT_H / 2, b, GREY);
    }
}

/* the x axis: steps, labelled ticks under the panel */
static void x_axis(canvas *c, const plot_frame *f, int labels) {
    double t[32];
    int nt = f->n > 1 ? plot_ticks(1, (double)f->n, 8, t, 32) : 0;
    if (f->n == 1) { t[0] = 1; nt = 1; }
    for (int i = 0; i < nt; i++) {
        if (t[i] < 1) continue;
        int x = plot_x(f, t[i]);
        line(c, x, f->y1, x, f->y1 + 4, BLACK, 1);
        if (!labels) continue;
        char b[32];
        snprintf(b, sizeof b, "%ld", (long)t[i]);
        text(c, x - font_text_width(b, 1) / 2, f->y1 + 7, b, 1, GREY);
    }
}

static void series(canvas *c, const plot_frame *f, const float *v, long n, const uint8_t col[3], int thick) {
    int px = 0, py = 0;
    for (long i = 0; i < n; i++) {
        int x = plot_x(f, (double)(i + 1)), y = plot_y(f, v[i]);
        if (i > 0) line(c, px, py, x, y, col, thick);
        else put(c, x, y, col);
        px = x; py = y;
    }
}

static void range(const float *v, long n, int positive, double *lo, double *hi) {
    for (long i = 0; i < n; i++) {
        if (!isfinite(v[i]) || (positive && v[i] <= 0)) continue;
        if (v[i] < *lo) *lo = v[i];
        if (v[i] > *hi) *hi = v[i];
    }
}

int plot_loss(uint8_t *rgb, int w, int h, const plot_series *s, plot_frame *out) {
    if (s->n < 1 || !s->smooth || w < 320 || h < 200) return -1;
    canvas c = {rgb, w, h};
    memset(rgb, 255, (size_t)w * h * 3);

    int lr_changes = 0;
    for (long i = 1; s->lr && i < s->n; i++) lr_changes |= s->lr[i] != s->lr[0];

    // the loss range, over both series; log when asked, or when it spans a decade
    double lo = INFINITY, hi = -INFINITY;
    range(s->smooth, s->n, 0, &lo, &hi);
    if (s->raw) range(s->raw, s->n, 0, &lo, &hi);
    int log_y = s->log_y;
    if (log_y < 0) log_y = lo > 0 && hi / lo >= 10.0;
    if (log_y) {
        lo = INFINITY; hi = -INFINITY;
        range(s->smooth, s->n, 1, &lo, &hi);
        if (s->raw) range(s->raw, s->n, 1, &lo, &hi);
        if (!(lo > 0)) { log_y = 0; lo = 0; hi = 1; }
    }
    if (!(hi > lo)) { double m = isfinite(lo) ? fabs(lo) * 0.05 + 1e-3 : 1; lo = (isfinite(lo) ? lo : 0) - m; hi = lo + 2 * m; }
    if (log_y) { lo /= 1.05; hi *= 1.05; } else { double pad = (hi - lo) * 0.04; lo -= pad; hi += pad; }

    // layout: title, loss panel, optional lr panel, step axis
    int top = s->subtitle ? 44 : 30, bottom = 34;
    int lr_h = lr_changes ? (h - top - bottom) / 4 : 0;
    plot_frame f = {64, top, w - 16, h - bottom - (lr_h ? lr_h + 18 : 0), lo, hi, log_y, s->n};

    if (s->title) text(&c, 8, 6, s->title, 2, BLACK);
    if (s->subtitle) text(&c, 8, 6 + 2 * FONT_LINE + 2, s->subtitle, 1, GREY);
    text(&c, f.x0 + 6, f.y0 + 4, log_y ? "loss (log scale)" : "loss", 1, BLACK);

    y_axis(&c, &f);
    x_axis(&c, &f, !lr_h);
    if (s->raw) series(&c, &f, s->raw, s->n, RAW, 1);
    series(&c, &f, s->smooth, s->n, SMOOTH, 2);
    frame_box(&c, &f);

    // legend, top right: what each line is, and where the smoothed loss ended
    char fin[64];
    snprintf(fin, sizeof fin, "final %.4g", (double)s->smooth[s->n - 1]);
    int lx = f.x1 - 150, ly = f.y0 + 6;
    if (s->raw) {
        line(&c, lx, ly + 3, lx + 18, ly + 3, RAW, 1);
        text(&c, lx + 24, ly, "raw loss", 1, BLACK);
        ly += FONT_LINE + 3;
    }
    line(&c, lx, ly + 3, lx + 18, ly + 3, SMOOTH, 2);
    text(&c, lx + 24, ly, "smoothed (EMA)", 1, BLACK);
    text(&c, lx + 24, ly + FONT_LINE + 3, fin, 1, SMOOTH);

    if (lr_h) {
        double a = INFINITY, b = -INFINITY;
        range(s->lr, s->n, 0, &a, &b);
        if (!(b > a)) b = a + 1e-12;
        plot_frame g = {f.x0, f.y1 + 18, f.x1, h - bottom, a, b, 0, s->n};
        text(&c, g.x0 + 6, g.y0 + 2, "learning rate", 1, LR);
        y_axis(&c, &g);
        x_axis(&c, &f, 0);
        x_axis(&c, &g, 1);
        series(&c, &g, s->lr, s->n, LR, 1);
        frame_box(&c, &g);
    }
    const char *xl = "step";
    text(&c, (f.x0 + f.x1 - font_text_width(xl, 1)) / 2, h - FONT_LINE - 2, xl, 1, BLACK);
    if (out) *out = f;
    return 0;
}

/* grid.c: labelled image grids (see grid.h). */
#include <stdlib.h>
#include <string.h>
#include "grid.h"
#include "font.h"

enum { TEXT_SCALE = 2, MAX_LINES = 6, LINE_CHARS = 96, PAD = 8 };
static const uint8_t INK[3] = {20, 20, 20};

/* wrap a label into lines of at most max_chars: each '\n' part on its own */
static int wrap_label(const char *label, int max_chars, char out[MAX_LINES][LINE_CHARS]) {
    int n = 0;
    const char *p = label;
    while (p && *p && n < MAX_LINES) {
        const char *nl = strchr(p, '\n');
        size_t len = nl ? (size_t)(nl - p) : strlen(p);
        char part[512];
        if (len >= sizeof part) len = sizeof part - 1;
        memcpy(part, p, len);
        part[len] = '\0';
        n += font_wrap(part, max_chars, &out[n][0], LINE_CHARS, MAX_LINES - n);
        p = nl ? nl + 1 : NULL;
    }
    return n;
}

void grid_cell_origin(const grid_image *g, int r, int c, int *x, int *y) {
    *x = g->x0 + c * (g->cell_w + g->gap);
    *y = g->y0 + r * (g->cell_h + g->gap);
}

int grid_geometry(grid_image *g, int rows, int cols, int cw, int ch, int min_side,
                  int has_col_labels, int has_row_labels) {
    memset(g, 0, sizeof *g);
    if (rows < 1 || cols < 1 || cw < 1 || ch < 1) return -1;
    // the smallest whole factor that brings the shorter side to min_side
    int side = cw < ch ? cw : ch, scale = 1;
    while (side * scale < min_side) scale++;
    g->scale = scale;
    g->cell_w = cw * scale;
    g->cell_h = ch * scale;
    g->gap = PAD;
    int left_w = has_row_labels ? (GRID_LABEL_CHARS * FONT_ADV - 1) * TEXT_SCALE : 0;
    g->x0 = PAD + (left_w ? left_w + PAD : 0);
    g->y0 = PAD + (has_col_labels ? GRID_HEAD_LINES * FONT_LINE * TEXT_SCALE + PAD : 0);
    g->w = g->x0 + cols * g->cell_w + (cols - 1) * g->gap + PAD;
    g->h = g->y0 + rows * g->cell_h + (rows - 1) * g->gap + PAD;
    return 0;
}

int grid_compose(grid_image *g, const uint8_t *const *cells, int rows, int cols, int cw, int ch,
                 int min_side, const char *const *col_labels, const char *const *row_labels) {
    if (grid_geometry(g, rows, cols, cw, ch, min_side, col_labels != NULL, row_labels != NULL)) return -1;
    int scale = g->scale, adv = FONT_ADV * TEXT_SCALE, lh = FONT_LINE * TEXT_SCALE;
    int col_chars = (g->cell_w - 4) / adv, row_chars = GRID_LABEL_CHARS;
    char lines[MAX_LINES][LINE_CHARS];
    g->rgb = malloc((size_t)g->w * g->h * 3);
    if (!g->rgb) return -1;
    memset(g->rgb, 255, (size_t)g->w * g->h * 3);

    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) {
            int ox, oy;
            grid_cell_origin(g, r, c, &ox, &oy);
            const uint8_t *src = cells[r * cols + c];
            if (!src) continue;
            // out pixel (x, y) of the cell = source pixel (x / scale, y / scale)
            for (int y = 0; y < g->cell_h; y++) {
                uint8_t *row = g->rgb + ((size_t)(oy + y) * g->w + ox) * 3;
                const uint8_t *s = src + (size_t)(y / scale) * cw * 3;
                for (int x = 0; x < g->cell_w; x++) memcpy(row + (size_t)x * 3, s + (size_t)(x / scale) * 3, 3);
            }
        }
    for (int c = 0; col_labels && c < cols; c++) {
        if (!col_labels[c]) continue;
        int ox, oy, n = wrap_label(col_labels[c], col_chars, lines);
        if (n > GRID_HEAD_LINES) {
            // too long: the first lines, "...", and the last line (the seed)
            size_t l = strlen(lines[GRID_HEAD_LINES - 2]);
            if (l > (size_t)col_chars - 3) l = (size_t)col_chars - 3;
            memcpy(lines[GRID_HEAD_LINES - 2] + l, "...", 4);
            memcpy(lines[GRID_HEAD_LINES - 1], lines[n - 1], LINE_CHARS);
            n = GRID_HEAD_LINES;
        }
        grid_cell_origin(g, 0, c, &ox, &oy);
        for (int i = 0; i < n; i++)
            font_draw(g->rgb, g->w, g->h, ox + 2, PAD + i * lh, lines[i], TEXT_SCALE, INK);
    }
    for (int r = 0; row_labels && r < rows; r++) {
        if (!row_labels[r]) continue;
        int ox, oy, n = wrap_label(row_labels[r], row_chars, lines);
        grid_cell_origin(g, r, 0, &ox, &oy);
        int ty = oy + (g->cell_h - n * lh) / 2;     // centred on the row
        for (int i = 0; i < n; i++)
            font_draw(g->rgb, g->w, g->h, PAD, ty + i * lh, lines[i], TEXT_SCALE, INK);
    }
    return 0;
}

void grid_free(grid_image *g) {
    free(g->rgb);
    memset(g, 0, sizeof *g);
}

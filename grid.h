/* grid.h: labelled grids of images (sample grids, before/after, X/Y grids):
 * every cell scaled up by a whole factor (nearest neighbour: no detail is
 * invented) to at least a given side, a header over each column (a prompt,
 * wrapped, and its seed) and a label left of each row ("base", "LoRA step N",
 * a weight). */
#ifndef SDLORA_GRID_H
#define SDLORA_GRID_H

#include <stdint.h>

typedef struct {
    uint8_t *rgb;            /* w x h x 3, malloc'ed; grid_free releases it */
    int w, h;
    int scale;               /* the whole factor each cell was scaled by */
    int cell_w, cell_h;      /* a cell's size after scaling */
    int x0, y0;              /* top-left pixel of cell (0, 0) */
    int gap;                 /* pixels between cells */
} grid_image;

/* cells[r * cols + c]: RGB images of cw x ch pixels. col_labels (cols) and
 * row_labels (rows) may be NULL, and so may any one of them; a '\n' in a
 * label starts a new line, and long lines are wrapped at spaces (and cut at
 * GRID_HEAD_LINES lines over a column). Returns 0,
 * or -1 when out of memory or the sizes are not positive. */
int grid_compose(grid_image *g, const uint8_t *const *cells, int rows, int cols, int cw, int ch,
                 int min_side, const char *const *col_labels, const char *const *row_labels);
/* the layout alone (rgb NULL): it depends on the cell size, the counts and
 * whether there are column headers (GRID_HEAD_LINES lines tall) and row
 * labels (GRID_LABEL_CHARS wide), never on the labels' text, so a reader of
 * the picture can find every cell. Returns 0, or -1 for sizes < 1. */
#define GRID_HEAD_LINES 4
#define GRID_LABEL_CHARS 14
int grid_geometry(grid_image *g, int rows, int cols, int cw, int ch, int min_side,
                  int has_col_labels, int has_row_labels);
/* top-left pixel of cell (r, c) in g */
void grid_cell_origin(const grid_image *g, int r, int c, int *x, int *y);
void grid_free(grid_image *g);

#endif

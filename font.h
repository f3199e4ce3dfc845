/* font.h: a small bitmap font (printable ASCII, 5x7 pixels in a 6x9 cell),
 * drawn by this project, for text on the pictures the programs write. */
#ifndef SDLORA_FONT_H
#define SDLORA_FONT_H

#include <stdint.h>

#define FONT_W 5          /* glyph pixels across */
#define FONT_H 7          /* glyph pixels down */
#define FONT_ADV 6        /* cell width: the next character starts here */
#define FONT_LINE 9       /* line height */

/* the glyph of character c (FONT_H rows, bit FONT_W-1 the leftmost column),
 * or NULL outside ASCII 32..126 */
const uint8_t *font_glyph(int c);
/* pixels the text covers across at this scale (each font pixel a scale x
 * scale square) */
int font_text_width(const char *text, int scale);
/* draw text with its top-left at (x, y) on an RGB image w x h, clipped to
 * it; characters the font lacks are drawn as '?'. Returns the width drawn. */
int font_draw(uint8_t *rgb, int w, int h, int x, int y, const char *text, int scale,
              const uint8_t color[3]);
/* break text at spaces into at most max_lines lines of at most max_chars
 * characters (a longer word is cut), into lines[i * line_len]. Returns the
 * number of lines. */
int font_wrap(const char *text, int max_chars, char *lines, int line_len, int max_lines);

#endif

/* make_data.c: draws the two bundled datasets (run by `make data`).
 *
 *   models/tiny/data/  the base set: captioned scenes of simple shapes that
 *                      the tiny SD1.x-architecture model is pre-trained on
 *   data/              the style set: the same kind of scenes in one
 *                      distinctive style, captions starting with the trigger
 *                      word "sdlstyle" -- what `./train data/` learns
 *   build/vae_data/    the VAE set: base scenes, each drawn with a random
 *                      look (outlines, hatching, palettes), so the tiny VAE
 *                      can encode and decode pictures of any of these kinds
 *                      (an experiment, not committed)
 *
 * 64x64 RGB PNG + same-name .txt caption. data/README.md describes the
 * caption grammar, the style and the style statistic.
 *
 *   make_data [--base N] [--style N] [--vae N] [--vae-dir DIR]
 *                                      write the sets (defaults below; the
 *                                      VAE set only when asked for; N = 0
 *                                      skips a set)
 *   make_data --stat FILE.png...       print the style statistics of images
 *   make_data --vocab DIR [SIZE]       train a BPE vocabulary (bpe_train.c,
 *                                      default 1000 tokens) on the base
 *                                      captions, write it to DIR, and print
 *                                      "caption<TAB>ids" for the style and
 *                                      the first 200 base captions (what
 *                                      tools/check_bpe_train.py compares
 *                                      with transformers)
 *
 * The output is the same bytes on every machine: one integer RNG with fixed
 * seeds, and every pixel computed in integer arithmetic (shapes are tested
 * at 4x4 subsamples per pixel on an integer grid, then box-averaged), so no
 * libm function or floating-point contraction can change a pixel. */
#include "image.h"
#include "bpe_train.h"
#include "tokenizer.h"
#include "tools/style_stats.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#define W 64                 /* image side in pixels (VAE latents: 16x16) */
#define SS 4                 /* subsamples per pixel side */
#define HW (W * SS)          /* the drawing grid: 256x256 */

#define N_BASE_DEFAULT 3000
#define N_STYLE_DEFAULT 60
#define N_VAE_DEFAULT 0      /* make tiny-base draws it: make_data --base 0 --style 0 --vae 3000 */
#define BASE_DIR "models/tiny/data"
#define STYLE_DIR "data"
#define VAE_DIR "build/vae_data"   /* not committed; --vae-dir DIR elsewhere */
#define TRIGGER "sdlstyle"

/* ------------------------------------------------------------------ */
/* the vocabulary of scenes                                            */

enum { CIRCLE, SQUARE, TRIANGLE, STAR, RING, NSHAPE };
static const char *const SHAPE[NSHAPE] = {"circle", "square", "triangle", "star", "ring"};

enum { RED, GREEN, BLUE, YELLOW, PURPLE, ORANGE, WHITE, BLACK, NCOLOUR };
static const char *const COLOUR[NCOLOUR] = {"red", "green", "blue", "yellow", "purple", "orange", "white", "black"};
static const uint8_t RGB[NCOLOUR][3] = {
    {220, 40, 40}, {40, 170, 60}, {40, 80, 220}, {240, 220, 40},
    {140, 60, 180}, {245, 140, 30}, {245, 245, 245}, {20, 20, 20},
};
#define SKY NCOLOUR          /* background index for "sky and grass" */
#define HORIZON 42           /* sky above this row, grass below */

enum { LEFT, RIGHT, TOP, BOTTOM, CENTER, NPOS };
static const char *const WHERE[NPOS] = {"on the left", "on the right", "at the top", "at the bottom", "in the center"};
static const int ANCHOR[NPOS][2] = {{16, 32}, {48, 32}, {32, 16}, {32, 48}, {32, 32}};

/* shape "radius" in pixels: small / big singles, pairs, counted groups */
#define R_SMALL 7
#define R_BIG 14
#define R_PAIR 10
#define R_COUNT 7

/* The style set leaves some content out so that samples can show the style
 * on content the LoRA never saw with it: no stars, no rings, no purple,
 * orange or black, no sky and grass. */
static int style_allows(int shape, int colour) {
    return shape <= TRIANGLE && colour != PURPLE && colour != ORANGE && colour != BLACK;
}

/* ------------------------------------------------------------------ */
/* RNG: splitmix64                                                     */

static uint64_t rng_state;
static uint64_t next64(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static int randint(int n) { return (int)(next64() % (uint64_t)n); }   /* 0..n-1 */

/* ------------------------------------------------------------------ */
/* shapes on the integer grid                                          */

/* Coordinates are in half-subsample units, so a subsample centre
 * (X + 1/2, Y + 1/2) is the integer (2X + 1, 2Y + 1). */
typedef struct { int shape; int colour; int cx, cy, r; } object;   /* cx, cy, r in subsamples */

/* cos and sin of -90 + 36k degrees, times 4096: the ten star vertices
 * (written out so no libm call decides a pixel) */
static const int STAR_DIR[10][2] = {
    {0, -4096}, {2408, -3314}, {3895, -1266}, {3895, 1266}, {2408, 3314},
    {0, 4096}, {-2408, 3314}, {-3895, 1266}, {-3895, -1266}, {-2408, -3314},
};

/* a / b rounded half away from zero (C99 division truncates toward zero) */
static int64_t rdiv(int64_t a, int64_t b) { return a >= 0 ? (a + b / 2) / b : -((-a + b / 2) / b); }

/* even-odd rule: is (px, py) inside the polygon v[0..n)? */
static int in_polygon(const int64_t (*v)[2], int n, int64_t px, int64_t py) {
    int in = 0;
    for (int i = 0, j = n - 1; i < n; j = i++) {
        int64_t xi = v[i][0], yi = v[i][1], xj = v[j][0], yj = v[j][1];
        if ((yi > py) == (yj > py)) continue;
        /* crossing x of the edge at height py: xi + (py - yi)(xj - xi)/(yj - yi);
         * compare px < that without dividing (multiply through by yj - yi) */
        int64_t lhs = (px - xi) * (yj - yi), rhs = (py - yi) * (xj - xi);
        if (yj > yi ? lhs < rhs : lhs > rhs) in = !in;
    }
    return in;
}

/* inside test for subsample (X, Y); grow widens the shape by that many
 * half-subsample units all round (0: the shape itself) */
static int inside(const object *o, int X, int Y, int grow) {
    int64_t px = 2 * X + 1, py = 2 * Y + 1, cx = 2 * (int64_t)o->cx, cy = 2 * (int64_t)o->cy, r = 2 * (int64_t)o->r;
    int64_t dx = px - cx, dy = py - cy;
    switch (o->shape) {
    case CIRCLE: return dx * dx + dy * dy <= (r + grow) * (r + grow);
    case RING: {
        /* a ring of width ~0.4 r; both rims move out by grow (an outline
         * drawn inside the hole as well as outside) */
        int64_t ri = r * 6 / 10 - grow, d2 = dx * dx + dy * dy;
        return d2 <= (r + grow) * (r + grow) && (ri < 0 || d2 >= ri * ri);
    }
    case SQUARE: {
        int64_t h = r * 7 / 8 + grow;   /* a square looks as big as a circle when a bit smaller */
        return dx >= -h && dx <= h && dy >= -h && dy <= h;
    }
    case TRIANGLE: {
        /* apex up, base at 0.8 r; grown by moving each vertex away from
         * the centre (close enough to an offset outline at these sizes) */
        int64_t g = grow * 2;
        int64_t v[3][2] = {{cx, cy - r - g}, {cx - r - g, cy + r * 8 / 10 + grow}, {cx + r + g, cy + r * 8 / 10 + grow}};
        return in_polygon(v, 3, px, py);
    }
    case STAR: {
        int64_t v[10][2];
        int64_t oy = cy + r / 10;   /* the points reach r up but 0.81 r down: centre it */
        for (int k = 0; k < 10; k++) {
            int64_t rad = (k % 2 ? r * 45 / 100 : r) + (k % 2 ? grow : 2 * grow);
            v[k][0] = cx + rdiv(rad * STAR_DIR[k][0], 4096);
            v[k][1] = oy + rdiv(rad * STAR_DIR[k][1], 4096);
        }
        return in_polygon(v, 10, px, py);
    }
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* drawing                                                             */

static uint8_t grid[HW * HW * 3];   /* the 4x-subsampled canvas */

static void put(int X, int Y, const uint8_t *c) { memcpy(grid + 3 * (Y * HW + X), c, 3); }

/* style colours: inks posterised to 4 levels per channel, v -> round(v/85)*85;
 * backgrounds are the posterised colour halfway to cream paper */
static const uint8_t CREAM[3] = {245, 236, 214};
static void style_ink(uint8_t *o, const uint8_t *c) {
    for (int k = 0; k < 3; k++) o[k] = (uint8_t)((c[k] + 42) / 85 * 85);
}
static void style_paper(uint8_t *o, const uint8_t *c) {
    uint8_t ink[3]; style_ink(ink, c);
    for (int k = 0; k < 3; k++) o[k] = (uint8_t)((ink[k] + CREAM[k] + 1) / 2);
}

/* How a scene is drawn. The base set uses PLAIN, the style set STYLE; the
 * VAE set (build/vae_data/) draws each scene with a random look, so
 * that the tiny VAE, like SD's, is trained on pictures of every kind and can
 * encode and decode a style the UNet has never seen. */
enum { HATCH_NONE, HATCH_SLASH, HATCH_BACKSLASH, HATCH_ROWS, HATCH_COLUMNS };
typedef struct {
    int outline;             /* outline width in px (0: none) */
    uint8_t outline_rgb[3];
    int hatch, band;         /* hatching direction and band width in px */
    int posterise;           /* inks posterised to 4 levels per channel */
    int paper;               /* plain backgrounds pulled halfway to cream paper */
} look;

static const look PLAIN = {0, {0, 0, 0}, HATCH_NONE, 0, 0, 0};
/* The style: thick black outline (2 px), posterised ink on pastel paper, and
 * diagonal hatching inside every shape: bands 4 px wide along x + y = const,
 * alternating the ink with the ink pulled halfway to black (light inks) or
 * to white (dark inks). */
static const look STYLE = {2, {10, 10, 10}, HATCH_SLASH, 4, 1, 1};

static void draw_background(int bg, const look *lk) {
    for (int Y = 0; Y < HW; Y++) {
        uint8_t c[3];
        if (bg == SKY) {
            /* sky: deep blue at the top to pale at the horizon; grass:
             * green, a little darker toward the bottom (linear, integer) */
            int y = Y, hy = HORIZON * SS;
            if (y < hy) { c[0] = (uint8_t)(100 + 90 * y / hy); c[1] = (uint8_t)(160 + 60 * y / hy); c[2] = (uint8_t)(230 + 20 * y / hy); }
            else { int t = y - hy, n = HW - hy; c[0] = (uint8_t)(80 - 30 * t / n); c[1] = (uint8_t)(170 - 50 * t / n); c[2] = (uint8_t)(60 - 20 * t / n); }
        } else if (lk->paper) style_paper(c, RGB[bg]);
        else memcpy(c, RGB[bg], 3);
        for (int X = 0; X < HW; X++) put(X, Y, c);
    }
}

/* which hatching band subsample (X, Y) falls in: 0 or 1 */
static int hatch_band(const look *lk, int X, int Y) {
    int b = lk->band * SS;
    switch (lk->hatch) {
    case HATCH_SLASH: return ((X + Y) / b) % 2;
    case HATCH_BACKSLASH: return ((X - Y + HW) / b) % 2;
    case HATCH_ROWS: return (Y / b) % 2;
    case HATCH_COLUMNS: return (X / b) % 2;
    }
    return 0;
}

static void draw_object(const object *o, const look *lk) {
    int m = o->r + 4 * SS;   /* bounding box half-size with room for the outline */
    int x0 = o->cx - m, x1 = o->cx + m, y0 = o->cy - m, y1 = o->cy + m;
    if (x0 < 0) x0 = 0;
    if (y0 < 0) y0 = 0;
    if (x1 > HW - 1) x1 = HW - 1;
    if (y1 > HW - 1) y1 = HW - 1;
    uint8_t ink[3], alt[3];
    if (lk->posterise) style_ink(ink, RGB[o->colour]);
    else memcpy(ink, RGB[o->colour], 3);
    int toward = style_luma(ink) > 110 ? 0 : 255;
    for (int k = 0; k < 3; k++) alt[k] = (uint8_t)((ink[k] + toward + 1) / 2);
    int grow = lk->outline * SS * 2;   /* the outline width in half-subsample units */
    for (int Y = y0; Y <= y1; Y++)
        for (int X = x0; X <= x1; X++) {
            if (inside(o, X, Y, 0)) put(X, Y, lk->hatch && hatch_band(lk, X, Y) ? alt : ink);
            else if (grow && inside(o, X, Y, grow)) put(X, Y, lk->outline_rgb);
        }
}

/* box-average SS x SS subsamples per pixel, rounded */
static void downsample(uint8_t *rgb) {
    for (int y = 0; y < W; y++)
        for (int x = 0; x < W; x++)
            for (int k = 0; k < 3; k++) {
                int s = 0;
                for (int j = 0; j < SS; j++)
                    for (int i = 0; i < SS; i++) s += grid[3 * ((y * SS + j) * HW + x * SS + i) + k];
                rgb[3 * (y * W + x) + k] = (uint8_t)((s + SS * SS / 2) / (SS * SS));
            }
}

/* ------------------------------------------------------------------ */
/* scenes and captions                                                 */

typedef struct { object obj[3]; int n; int bg; char caption[256]; } scene;

static const char *article(int colour) { return colour == ORANGE ? "an" : "a"; }

/* a colour that shows on the background (on sky and grass: not blue or green) */
static int pick_colour(int bg, int styled) {
    for (;;) {
        int c = randint(NCOLOUR);
        if (c == bg || (bg == SKY && (c == BLUE || c == GREEN))) continue;
        if (styled && !style_allows(CIRCLE, c)) continue;
        return c;
    }
}
static int pick_shape(int styled) { return styled ? randint(TRIANGLE + 1) : randint(NSHAPE); }

/* anchor position plus up to +-3 px of jitter, kept inside the image */
static void place(object *o, int pos) {
    int j = 3 * SS;
    o->cx = ANCHOR[pos][0] * SS + randint(2 * j + 1) - j;
    o->cy = ANCHOR[pos][1] * SS + randint(2 * j + 1) - j;
    int lo = o->r + 3 * SS, hi = HW - 1 - o->r - 3 * SS;   /* room for the outline */
    if (o->cx < lo) o->cx = lo;
    if (o->cx > hi) o->cx = hi;
    if (o->cy < lo) o->cy = lo;
    if (o->cy > hi) o->cy = hi;
}

static void make_scene(scene *s, int styled) {
    memset(s, 0, sizeof *s);
    /* background: one of the plain colours, or (base only) sky and grass 1 in 5 */
    s->bg = !styled && randint(5) == 0 ? SKY : randint(NCOLOUR);
    while (styled && !style_allows(CIRCLE, s->bg)) s->bg = randint(NCOLOUR);
    char bgtext[64];
    if (s->bg == SKY) snprintf(bgtext, sizeof bgtext, "sky and grass");
    else snprintf(bgtext, sizeof bgtext, "%s background", COLOUR[s->bg]);
    const char *pre = styled ? TRIGGER ", " : "";

    int kind = randint(20);   /* 9/20 single, 6/20 pair, 5/20 counted group */
    if (kind < 9) {
        object *o = &s->obj[0];
        int big = randint(2), pos = randint(NPOS);
        o->shape = pick_shape(styled); o->colour = pick_colour(s->bg, styled);
        o->r = (big ? R_BIG : R_SMALL) * SS;
        place(o, pos);
        s->n = 1;
        snprintf(s->caption, sizeof s->caption, "%sa %s %s %s %s, %s", pre, big ? "big" : "small",
                 COLOUR[o->colour], SHAPE[o->shape], WHERE[pos], bgtext);
    } else if (kind < 15) {
        static const int PAIRS[4][2] = {{LEFT, RIGHT}, {RIGHT, LEFT}, {TOP, BOTTOM}, {BOTTOM, TOP}};
        int p = randint(4);
        for (int i = 0; i < 2; i++) {
            object *o = &s->obj[i];
            o->shape = pick_shape(styled); o->colour = pick_colour(s->bg, styled);
            o->r = R_PAIR * SS;
            place(o, PAIRS[p][i]);
        }
        /* two of the same would read as a count: make the second differ */
        while (s->obj[1].shape == s->obj[0].shape && s->obj[1].colour == s->obj[0].colour)
            s->obj[1].colour = pick_colour(s->bg, styled);
        s->n = 2;
        snprintf(s->caption, sizeof s->caption, "%s%s %s %s %s and %s %s %s %s, %s", pre,
                 article(s->obj[0].colour), COLOUR[s->obj[0].colour], SHAPE[s->obj[0].shape], WHERE[PAIRS[p][0]],
                 article(s->obj[1].colour), COLOUR[s->obj[1].colour], SHAPE[s->obj[1].shape], WHERE[PAIRS[p][1]], bgtext);
    } else {
        int n = 2 + randint(2), shape = pick_shape(styled), colour = pick_colour(s->bg, styled);
        /* scattered without overlap (outline included): rejection sampling */
        for (int i = 0; i < n;) {
            object *o = &s->obj[i];
            o->shape = shape; o->colour = colour; o->r = R_COUNT * SS;
            int lo = o->r + 5 * SS, span = HW - 2 * lo;   /* the grown triangle apex reaches 4 px out */
            o->cx = lo + randint(span); o->cy = lo + randint(span);
            int ok = 1;
            for (int k = 0; k < i; k++) {
                int64_t dx = o->cx - s->obj[k].cx, dy = o->cy - s->obj[k].cy, dmin = 2 * o->r + 4 * SS;
                if (dx * dx + dy * dy < dmin * dmin) ok = 0;
            }
            if (ok) i++;
        }
        s->n = n;
        snprintf(s->caption, sizeof s->caption, "%s%s %s %ss, %s", pre, n == 2 ? "two" : "three",
                 COLOUR[colour], SHAPE[shape], bgtext);
    }
}

static void render(uint8_t *rgb, const scene *s, const look *lk) {
    draw_background(s->bg, lk);
    for (int i = 0; i < s->n; i++) draw_object(&s->obj[i], lk);
    downsample(rgb);
}

/* a random look for the VAE set: each trait on or off independently, so the
 * style's exact combination is one of many and nothing in the set is the
 * style set */
static void random_look(look *lk) {
    static const uint8_t INKS[4][3] = {{10, 10, 10}, {60, 40, 30}, {30, 40, 90}, {245, 245, 245}};
    memset(lk, 0, sizeof *lk);
    if (randint(3)) {
        lk->outline = 1 + randint(3);
        memcpy(lk->outline_rgb, INKS[randint(4)], 3);
    }
    if (randint(3)) { lk->hatch = 1 + randint(4); lk->band = 2 + randint(4); }
    lk->posterise = randint(2);
    lk->paper = randint(2);
}

/* the style statistics (hatch, dark, paper, chroma): tools/style_stats.h */

/* ------------------------------------------------------------------ */

static int mkdirs(const char *path) {
    char p[512];
    snprintf(p, sizeof p, "%s", path);
    for (char *s = p + 1; ; s++) {
        if (*s == '/' || *s == 0) {
            char c = *s; *s = 0;
            if (mkdir(p, 0777) != 0 && errno != EEXIST) return -1;
            *s = c;
            if (!c) return 0;
        }
    }
}

static long file_size(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 ? (long)st.st_size : 0;
}

/* write one set; prints its size on disk and mean statistics */
/* kind: 0 the base set, 1 the style set, 2 the VAE set (base scenes, random looks) */
static int make_set(const char *dir, int n, int kind, uint64_t seed) {
    if (mkdirs(dir)) { fprintf(stderr, "error: cannot create folder %s: %s\n", dir, strerror(errno)); return -1; }
    rng_state = seed;
    uint8_t rgb[W * W * 3];
    long bytes = 0;
    double sh = 0, sd = 0, sp = 0, sc = 0, hmin = 1e9, hmax = -1e9;
    for (int i = 0; i < n; i++) {
        scene s;
        look lk = kind == 1 ? STYLE : PLAIN;
        make_scene(&s, kind == 1);
        if (kind == 2) random_look(&lk);
        render(rgb, &s, &lk);
        char png[512], txt[512], err[512];
        snprintf(png, sizeof png, "%s/%04d.png", dir, i);
        snprintf(txt, sizeof txt, "%s/%04d.txt", dir, i);
        if (image_save_png(png, rgb, W, W, NULL, NULL, 0, err, sizeof err)) { fprintf(stderr, "error: %s\n", err); return -1; }
        FILE *f = fopen(txt, "wb");
        if (!f || fprintf(f, "%s\n", s.caption) < 0 || fclose(f) != 0) {
            fprintf(stderr, "error: cannot write %s: %s\n", txt, strerror(errno)); return -1;
        }
        bytes += file_size(png) + file_size(txt);
        double h, d, pp, ch;
        style_stats(rgb, W, W, W, &h, &d, &pp, &ch);
        sh += h; sd += d; sp += pp; sc += ch;
        if (h < hmin) hmin = h;
        if (h > hmax) hmax = h;
    }
    if (n) printf("%-18s %5d images  %8.1f KB  hatch mean %5.2f (min %5.2f, max %5.2f)  dark mean %.3f  paper %.1f  chroma %.1f\n",
                  dir, n, bytes / 1024.0, sh / n, hmin, hmax, sd / n, sp / n, sc / n);
    return 0;
}

/* the captions of a set, drawn again (the scene RNG does not depend on rendering) */
static char **captions(int n, int styled, uint64_t seed) {
    char **c = malloc((size_t)n * sizeof *c);
    if (!c) return NULL;
    rng_state = seed;
    for (int i = 0; i < n; i++) {
        scene s;
        make_scene(&s, styled);
        if (!(c[i] = strdup(s.caption))) { while (i--) free(c[i]); free(c); return NULL; }
    }
    return c;
}

#define SEED_BASE 0x5D10A0001ull
#define SEED_STYLE 0x5D10A0002ull
#define SEED_VAE 0x5D10A0003ull

static int make_vocab(const char *dir, int size) {
    char err[TOK_ERR_LEN];
    char **base = captions(N_BASE_DEFAULT, 0, SEED_BASE), **style = captions(N_STYLE_DEFAULT, 1, SEED_STYLE);
    if (!base || !style) { fprintf(stderr, "error: out of memory\n"); return 1; }
    int nv = bpe_train((const char *const *)base, N_BASE_DEFAULT, size, dir, err, sizeof err);
    if (nv < 0) { fprintf(stderr, "error: %s\n", err); return 1; }
    tokenizer *t = tok_load(dir, err, sizeof err);
    if (!t) { fprintf(stderr, "error: %s\n", err); return 1; }
    fprintf(stderr, "%s: %d tokens, %d merges\n", dir, nv, t->n_merges);
    for (int i = 0; i < N_STYLE_DEFAULT + 200; i++) {
        const char *c = i < N_STYLE_DEFAULT ? style[i] : base[i - N_STYLE_DEFAULT];
        int ids[TOK_CTX];
        int n = tok_encode(t, c, ids, TOK_CTX);
        printf("%s\t", c);
        for (int k = 0; k < n; k++) printf(k ? " %d" : "%d", ids[k]);
        printf("\n");
    }
    tok_free(t);
    for (int i = 0; i < N_BASE_DEFAULT; i++) free(base[i]);
    for (int i = 0; i < N_STYLE_DEFAULT; i++) free(style[i]);
    free(base); free(style);
    return 0;
}

int main(int argc, char **argv) {
    int nbase = N_BASE_DEFAULT, nstyle = N_STYLE_DEFAULT, nvae = N_VAE_DEFAULT;
    const char *vae_dir = VAE_DIR;
    if (argc > 2 && strcmp(argv[1], "--vocab") == 0) return make_vocab(argv[2], argc > 3 ? atoi(argv[3]) : 1000);
    if (argc > 1 && strcmp(argv[1], "--stat") == 0) {
        double th = 0, td = 0, tp = 0, tc = 0; int n = 0;
        for (int i = 2; i < argc; i++) {
            image_t im; char err[512];
            if (image_load(&im, argv[i], err, sizeof err)) { fprintf(stderr, "error: %s\n", err); return 1; }
            double h, d, pp, ch;
            style_stats(im.rgb, im.w, im.w, im.h, &h, &d, &pp, &ch);
            printf("%s  hatch %6.2f  dark %.3f  paper %5.1f  chroma %5.1f\n", argv[i], h, d, pp, ch);
            th += h; td += d; tp += pp; tc += ch; n++;
            image_free(&im);
        }
        if (n > 1) printf("mean of %d  hatch %6.2f  dark %.3f  paper %5.1f  chroma %5.1f\n", n, th / n, td / n, tp / n, tc / n);
        return 0;
    }
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--vae-dir") == 0 && i + 1 < argc) { vae_dir = argv[++i]; continue; }
        int *dst = strcmp(argv[i], "--base") == 0 ? &nbase : strcmp(argv[i], "--style") == 0 ? &nstyle
                 : strcmp(argv[i], "--vae") == 0 ? &nvae : NULL;
        char *end;
        long v = i + 1 < argc ? strtol(argv[i + 1], &end, 10) : -1;
        if (!dst || i + 1 >= argc || *end || v < 0 || v > 9999) {
            fprintf(stderr, "error: bad argument '%s' (usage: make_data [--base N] [--style N] [--vae N] [--vae-dir DIR] | --stat FILE.png...)\n", argv[i]);
            return 2;
        }
        *dst = (int)v; i++;
    }
    clock_t t0 = clock();
    if (nbase && make_set(BASE_DIR, nbase, 0, SEED_BASE)) return 1;
    if (nstyle && make_set(STYLE_DIR, nstyle, 1, SEED_STYLE)) return 1;
    if (nvae && make_set(vae_dir, nvae, 2, SEED_VAE)) return 1;
    printf("%.1f s\n", (double)(clock() - t0) / CLOCKS_PER_SEC);
    return 0;
}

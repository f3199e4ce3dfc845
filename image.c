/* image.c: PNG and JPEG decoding, PNG encoding, resampling and the training
 * crop. See image.h for what each function promises.
 *
 * Safety: every read from the file goes through a bounds check against the
 * buffer length; sizes are checked against IMAGE_MAX_SIDE / IMAGE_MAX_PIXELS
 * before anything image-sized is allocated; entropy-coded data that runs out
 * (or hits a marker early) is an error, found within one block, so a corrupt
 * file never makes us decode a huge image of zeros. */
#include "image.h"
#include "inflate.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

/* "<name>: <why>" into err, return -1 */
static int fail(char *err, size_t errlen, const char *name, const char *fmt, ...) {
    if (err && errlen) {
        int k = snprintf(err, errlen, "%s: ", name ? name : "image");
        if (k < 0) k = 0;
        if ((size_t)k < errlen) {
            va_list ap; va_start(ap, fmt);
            vsnprintf(err + k, errlen - (size_t)k, fmt, ap);
            va_end(ap);
        }
    }
    return -1;
}

static int check_size(long w, long h, const char *name, char *err, size_t errlen) {
    if (w < 1 || h < 1) return fail(err, errlen, name, "image has zero size (%ldx%ld)", w, h);
    if (w > IMAGE_MAX_SIDE || h > IMAGE_MAX_SIDE || w * h > IMAGE_MAX_PIXELS)
        return fail(err, errlen, name, "image is %ldx%ld, larger than the limit of %d pixels a side "
                    "and %ld pixels in all (scale it down first)", w, h, IMAGE_MAX_SIDE, IMAGE_MAX_PIXELS);
    return 0;
}

void image_free(image_t *im) {
    if (!im) return;
    free(im->rgb);
    im->rgb = NULL; im->w = im->h = 0;
}

static uint32_t be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static int be16(const uint8_t *p) { return (p[0] << 8) | p[1]; }

/* ======================================================================
 * PNG decoding
 * ====================================================================== */

static const int adam7[7][4] = {   /* x0, y0, dx, dy of each pass */
    {0, 0, 8, 8}, {4, 0, 8, 8}, {0, 4, 4, 8}, {2, 0, 4, 4}, {0, 2, 2, 4}, {1, 0, 2, 2}, {0, 1, 1, 2}};

static int png_paeth(int a, int b, int c) {
    /* the neighbour closest to the gradient estimate a + b - c; ties go a, b, c */
    int p = a + b - c, pa = abs(p - a), pb = abs(p - b), pc = abs(p - c);
    if (pa <= pb && pa <= pc) return a;
    return pb <= pc ? b : c;
}

/* undo the filter of one row in place; prev is the unfiltered row above
 * (all zeros for the first row of a pass); bpp = bytes per pixel, >= 1 */
static int png_unfilter(uint8_t *row, const uint8_t *prev, size_t nb, int bpp, int ft) {
    size_t i, b = (size_t)bpp;
    switch (ft) {
    case 0: break;
    case 1: for (i = b; i < nb; i++) row[i] = (uint8_t)(row[i] + row[i - b]); break;
    case 2: for (i = 0; i < nb; i++) row[i] = (uint8_t)(row[i] + prev[i]); break;
    case 3:   /* x + floor((left + up) / 2) */
        for (i = 0; i < nb; i++) row[i] = (uint8_t)(row[i] + (((i >= b ? row[i - b] : 0) + prev[i]) >> 1));
        break;
    case 4:
        for (i = 0; i < nb; i++)
            row[i] = (uint8_t)(row[i] + png_paeth(i >= b ? row[i - b] : 0, prev[i], i >= b ? prev[i - b] : 0));
        break;
    default: return -1;
    }
    return 0;
}

/* one sample of pixel i, channel c, of an unfiltered row; depth < 8 packs
 * pixels MSB first; 16-bit samples are big-endian */
static int png_sample(const uint8_t *row, int i, int c, int ch, int depth) {
    if (depth == 8) return row[(size_t)i * ch + c];
    if (depth == 16) return be16(row + ((size_t)i * ch + c) * 2);
    size_t bit = (size_t)i * (size_t)depth;   /* ch == 1 for depths below 8 */
    return (row[bit >> 3] >> (8 - depth - (int)(bit & 7))) & ((1 << depth) - 1);
}

/* one unfiltered row of pw pixels -> RGB at out, pixels dx apart.
 * The conversions are Pillow's convert("RGB"): alpha dropped, 16-bit keeps
 * the high byte, except gray 16 which Pillow holds as I;16 and clips. */
static void png_row_rgb(uint8_t *out, int dx, const uint8_t *row, int pw, int ctype, int depth,
                        const uint8_t *plte, int nplte) {
    for (int i = 0; i < pw; i++, out += 3 * dx) {
        int r, g, b;
        switch (ctype) {
        case 0: case 4: {
            int ch = ctype == 0 ? 1 : 2;
            int v = png_sample(row, i, 0, ch, depth);
            if (depth == 16) v = ctype == 0 ? (v > 255 ? 255 : v) : v >> 8;
            else if (depth < 8) v = v * (255 / ((1 << depth) - 1));   /* 1,2,4 bits: x255, x85, x17 */
            r = g = b = v;
            break;
        }
        case 3: {
            int k = png_sample(row, i, 0, 1, depth);
            if (k < nplte) { r = plte[3 * k]; g = plte[3 * k + 1]; b = plte[3 * k + 2]; }
            else r = g = b = 0;
            break;
        }
        default: {   /* 2 (RGB) or 6 (RGBA) */
            int ch = ctype == 2 ? 3 : 4, sh = depth == 16 ? 8 : 0;
            r = png_sample(row, i, 0, ch, depth) >> sh;
            g = png_sample(row, i, 1, ch, depth) >> sh;
            b = png_sample(row, i, 2, ch, depth) >> sh;
        }
        }
        out[0] = (uint8_t)r; out[1] = (uint8_t)g; out[2] = (uint8_t)b;
    }
}

static int png_decode(image_t *im, const uint8_t *d, size_t n, const char *name, char *err, size_t errlen) {
    size_t pos = 8;
    long w = 0, h = 0;
    int depth = 0, ctype = -1, interlace = 0, nplte = 0, have_ihdr = 0;
    uint8_t plte[768];
    uint8_t *z = NULL, *raw = NULL;
    size_t zn = 0, zcap = 0, rawn = 0;
    int rc = -1;

    for (;;) {
        if (n - pos < 12) { fail(err, errlen, name, "PNG is truncated (chunk header at byte %zu)", pos); goto done; }
        uint32_t len = be32(d + pos);
        const uint8_t *type = d + pos + 4, *cd = d + pos + 8;
        if (len > 0x7fffffffu) { fail(err, errlen, name, "corrupt PNG (chunk length %u)", len); goto done; }
        if ((size_t)len > n - pos - 12) {
            fail(err, errlen, name, "PNG is truncated (chunk of %u bytes at byte %zu)", len, pos); goto done;
        }
        for (int k = 0; k < 4; k++) {
            int c = type[k] | 0x20;
            if (c < 'a' || c > 'z') { fail(err, errlen, name, "corrupt PNG (bad chunk type at byte %zu)", pos); goto done; }
        }
        if (crc32_update(0, type, (size_t)len + 4) != be32(cd + len)) {
            fail(err, errlen, name, "corrupt PNG (CRC mismatch in %.4s chunk)", (const char *)type); goto done;
        }
        if (!have_ihdr && memcmp(type, "IHDR", 4) != 0) { fail(err, errlen, name, "corrupt PNG (first chunk is not IHDR)"); goto done; }
        if (memcmp(type, "IHDR", 4) == 0) {
            if (have_ihdr || len != 13) { fail(err, errlen, name, "corrupt PNG (bad IHDR)"); goto done; }
            have_ihdr = 1;
            uint32_t uw = be32(cd), uh = be32(cd + 4);
            depth = cd[8]; ctype = cd[9]; interlace = cd[12];
            int ok;
            switch (ctype) {
            case 0: ok = depth == 1 || depth == 2 || depth == 4 || depth == 8 || depth == 16; break;
            case 3: ok = depth == 1 || depth == 2 || depth == 4 || depth == 8; break;
            case 2: case 4: case 6: ok = depth == 8 || depth == 16; break;
            default: ok = 0;
            }
            if (!ok) { fail(err, errlen, name, "corrupt PNG (colour type %d with bit depth %d)", ctype, depth); goto done; }
            if (cd[10] != 0 || cd[11] != 0 || interlace > 1) {
                fail(err, errlen, name, "corrupt PNG (unknown compression, filter or interlace method)"); goto done;
            }
            if (uw > 0x7fffffffu || uh > 0x7fffffffu) { fail(err, errlen, name, "corrupt PNG (size %ux%u)", uw, uh); goto done; }
            w = (long)uw; h = (long)uh;
            if (check_size(w, h, name, err, errlen)) goto done;
        } else if (memcmp(type, "PLTE", 4) == 0) {
            if (len % 3 || len == 0 || len > 768) { fail(err, errlen, name, "corrupt PNG (PLTE of %u bytes)", len); goto done; }
            memcpy(plte, cd, len); nplte = (int)(len / 3);
        } else if (memcmp(type, "IDAT", 4) == 0) {
            /* an empty IDAT adds nothing (and z may still be NULL: no memcpy) */
            if (len > 0 && zn + len > zcap) {
                size_t nc = zcap ? zcap : 65536;
                while (nc < zn + len) nc *= 2;
                uint8_t *t = realloc(z, nc);
                if (!t) { fail(err, errlen, name, "out of memory"); goto done; }
                z = t; zcap = nc;
            }
            if (len > 0) { memcpy(z + zn, cd, len); zn += len; }
        } else if (memcmp(type, "IEND", 4) == 0) {
            break;
        } else if (!(type[0] & 0x20)) {   /* lowercase first letter = ancillary, safe to skip */
            fail(err, errlen, name, "PNG has an unknown critical chunk %.4s", (const char *)type); goto done;
        }
        pos += 12 + (size_t)len;
    }
    if (ctype == 3 && nplte == 0) { fail(err, errlen, name, "corrupt PNG (palette image without PLTE)"); goto done; }
    if (zn == 0) { fail(err, errlen, name, "corrupt PNG (no image data)"); goto done; }

    char zerr[256];
    if (inflate_zlib(z, zn, &raw, &rawn, zerr, sizeof zerr)) {
        fail(err, errlen, name, "corrupt PNG image data (%s)", zerr); goto done;
    }
    int ch = ctype == 0 || ctype == 3 ? 1 : ctype == 2 ? 3 : ctype == 4 ? 2 : 4;
    int bpp = ch * depth / 8 < 1 ? 1 : ch * depth / 8;
    /* bytes the passes need: per row one filter byte + the packed samples */
    size_t need = 0, maxrow = 0;
    int npass = interlace ? 7 : 1;
    for (int p = 0; p < npass; p++) {
        int x0 = interlace ? adam7[p][0] : 0, y0 = interlace ? adam7[p][1] : 0;
        int dx = interlace ? adam7[p][2] : 1, dy = interlace ? adam7[p][3] : 1;
        size_t pw = w > x0 ? (size_t)(w - x0 + dx - 1) / (size_t)dx : 0;
        size_t ph = h > y0 ? (size_t)(h - y0 + dy - 1) / (size_t)dy : 0;
        if (!pw || !ph) continue;
        size_t rb = (pw * (size_t)ch * (size_t)depth + 7) / 8;
        if (rb > maxrow) maxrow = rb;
        need += ph * (1 + rb);
    }
    if (rawn < need) { fail(err, errlen, name, "PNG image data is short (%zu of %zu bytes: truncated?)", rawn, need); goto done; }

    im->rgb = malloc((size_t)w * (size_t)h * 3);
    uint8_t *zero = calloc(maxrow, 1);
    if (!im->rgb || !zero) { free(zero); image_free(im); fail(err, errlen, name, "out of memory"); goto done; }
    im->w = (int)w; im->h = (int)h;
    uint8_t *p8 = raw;
    for (int p = 0; p < npass; p++) {
        int x0 = interlace ? adam7[p][0] : 0, y0 = interlace ? adam7[p][1] : 0;
        int dx = interlace ? adam7[p][2] : 1, dy = interlace ? adam7[p][3] : 1;
        int pw = w > x0 ? (int)((w - x0 + dx - 1) / dx) : 0;
        int ph = h > y0 ? (int)((h - y0 + dy - 1) / dy) : 0;
        if (!pw || !ph) continue;
        size_t rb = ((size_t)pw * (size_t)ch * (size_t)depth + 7) / 8;
        const uint8_t *prev = zero;
        for (int y = 0; y < ph; y++) {
            uint8_t *row = p8 + 1;
            if (png_unfilter(row, prev, rb, bpp, p8[0])) {
                free(zero); image_free(im);
                fail(err, errlen, name, "corrupt PNG (filter type %d)", p8[0]); goto done;
            }
            png_row_rgb(im->rgb + (((size_t)(y0 + y * dy)) * (size_t)w + (size_t)x0) * 3, dx, row, pw,
                        ctype, depth, plte, nplte);
            prev = row;
            p8 += 1 + rb;
        }
    }
    free(zero);
    rc = 0;
done:
    free(z); free(raw);
    return rc;
}

/* ======================================================================
 * PNG encoding: 8-bit RGB, per-row adaptive filter, zlib with one
 * fixed-Huffman DEFLATE block fed by a hash-chain LZ77 matcher.
 * ====================================================================== */

typedef struct { uint8_t *p; size_t n, cap; int oom; } buf_t;

static void buf_put(buf_t *b, const void *src, size_t k) {
    if (b->oom) return;
    if (b->n + k > b->cap) {
        size_t nc = b->cap ? b->cap : 4096;
        while (nc < b->n + k) nc *= 2;
        uint8_t *t = realloc(b->p, nc);
        if (!t) { b->oom = 1; return; }
        b->p = t; b->cap = nc;
    }
    memcpy(b->p + b->n, src, k); b->n += k;
}
static void buf_be32(buf_t *b, uint32_t v) {
    uint8_t t[4] = {(uint8_t)(v >> 24), (uint8_t)(v >> 16), (uint8_t)(v >> 8), (uint8_t)v};
    buf_put(b, t, 4);
}

/* DEFLATE writes bits LSB first; Huffman codes go most significant bit first,
 * so they are reversed before being written */
typedef struct { buf_t *out; uint32_t acc; int nacc; } bitw;

static void bw_bits(bitw *w, uint32_t v, int k) {   /* k <= 16 */
    w->acc |= v << w->nacc; w->nacc += k;
    while (w->nacc >= 8) { uint8_t c = (uint8_t)w->acc; buf_put(w->out, &c, 1); w->acc >>= 8; w->nacc -= 8; }
}
static void bw_code(bitw *w, uint32_t code, int len) {
    uint32_t r = 0;
    for (int i = 0; i < len; i++) r |= ((code >> i) & 1u) << (len - 1 - i);
    bw_bits(w, r, len);
}
/* the fixed literal/length code of RFC 1951 3.2.6 */
static void bw_litlen(bitw *w, int s) {
    if (s < 144) bw_code(w, 0x30u + (uint32_t)s, 8);
    else if (s < 256) bw_code(w, 0x190u + (uint32_t)(s - 144), 9);
    else if (s < 280) bw_code(w, (uint32_t)(s - 256), 7);
    else bw_code(w, 0xC0u + (uint32_t)(s - 280), 8);
}

static const int len_base[29] = {3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31,
                                 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258};
static const int len_extra[29] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2,
                                  3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};
static const int dist_base[30] = {1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385,
                                  513, 769, 1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577};
static const int dist_extra[30] = {0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7,
                                   8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13};

#define LZ_WIN 32768
#define LZ_HBITS 15
#define LZ_CHAIN 32

static int deflate_fixed(buf_t *out, const uint8_t *s, size_t n) {
    int32_t *head = malloc(sizeof(int32_t) << LZ_HBITS), *prev = malloc(sizeof(int32_t) * LZ_WIN);
    if (!head || !prev) { free(head); free(prev); return -1; }
    for (size_t i = 0; i < ((size_t)1 << LZ_HBITS); i++) head[i] = -1;
    bitw w = {out, 0, 0};
    bw_bits(&w, 1, 1);   /* BFINAL */
    bw_bits(&w, 1, 2);   /* BTYPE = 01, fixed Huffman */
    size_t i = 0;
    while (i < n) {
        int best = 0; size_t bdist = 0;
        if (n - i >= 3) {
            uint32_t hs = (((uint32_t)s[i] << 10) ^ ((uint32_t)s[i + 1] << 5) ^ s[i + 2]) & ((1u << LZ_HBITS) - 1);
            int maxl = n - i < 258 ? (int)(n - i) : 258;
            int32_t c = head[hs];
            for (int chain = 0; c >= 0 && chain < LZ_CHAIN; chain++) {
                size_t dist = i - (size_t)c;
                if (dist > LZ_WIN) break;
                int l = 0;
                while (l < maxl && s[(size_t)c + l] == s[i + l]) l++;
                if (l > best) { best = l; bdist = dist; if (l == maxl) break; }
                int32_t nx = prev[c & (LZ_WIN - 1)];
                if (nx >= c) break;   /* chain entry overwritten by a newer position */
                c = nx;
            }
        }
        size_t adv = best >= 3 ? (size_t)best : 1;
        if (best >= 3) {
            int k = 28;
            while (len_base[k] > best) k--;
            bw_litlen(&w, 257 + k);
            bw_bits(&w, (uint32_t)(best - len_base[k]), len_extra[k]);
            int dk = 29;
            while ((size_t)dist_base[dk] > bdist) dk--;
            bw_code(&w, (uint32_t)dk, 5);
            bw_bits(&w, (uint32_t)(bdist - (size_t)dist_base[dk]), dist_extra[dk]);
        } else {
            bw_litlen(&w, s[i]);
        }
        /* insert every position we step over, so later matches can find it */
        for (size_t j = i; j < i + adv; j++) {
            if (n - j < 3) break;
            uint32_t hs = (((uint32_t)s[j] << 10) ^ ((uint32_t)s[j + 1] << 5) ^ s[j + 2]) & ((1u << LZ_HBITS) - 1);
            prev[j & (LZ_WIN - 1)] = head[hs];
            head[hs] = (int32_t)j;
        }
        i += adv;
    }
    bw_litlen(&w, 256);          /* end of block */
    if (w.nacc) bw_bits(&w, 0, 8 - w.nacc);
    free(head); free(prev);
    return out->oom ? -1 : 0;
}

static void png_chunk(buf_t *b, const char *type, const uint8_t *data, size_t len) {
    buf_be32(b, (uint32_t)len);
    size_t at = b->n;
    buf_put(b, type, 4);
    if (len) buf_put(b, data, len);
    if (b->oom) return;
    buf_be32(b, crc32_update(0, b->p + at, len + 4));
}

int image_encode_png(uint8_t **out, size_t *outn, const uint8_t *rgb, int w, int h,
                     const char **text_keys, const char **text_vals, int ntext,
                     char *err, size_t errlen) {
    *out = NULL; *outn = 0;
    if (check_size(w, h, "PNG encoder", err, errlen)) return -1;
    for (int t = 0; t < ntext; t++) {
        size_t kl = strlen(text_keys[t]);
        if (kl < 1 || kl > 79) return fail(err, errlen, "PNG encoder", "text key '%s' must be 1 to 79 bytes", text_keys[t]);
        for (size_t k = 0; k < kl; k++) {
            unsigned c = (unsigned char)text_keys[t][k];
            if (c < 32 || (c > 126 && c < 161))
                return fail(err, errlen, "PNG encoder", "text key '%s' has a character PNG does not allow", text_keys[t]);
        }
    }
    /* filtered scanlines: each row takes the filter with the smallest sum of
     * |residual| (as signed bytes), the usual heuristic for photos */
    size_t rb = (size_t)w * 3, rawn = (size_t)h * (rb + 1);
    uint8_t *raw = malloc(rawn), *cand = malloc(5 * rb), *zero = calloc(rb, 1);
    buf_t z = {0}, b = {0};
    if (!raw || !cand || !zero) { free(raw); free(cand); free(zero); return fail(err, errlen, "PNG encoder", "out of memory"); }
    for (int y = 0; y < h; y++) {
        const uint8_t *row = rgb + (size_t)y * rb, *up = y ? row - rb : zero;
        long best = -1; int bf = 0;
        for (int f = 0; f < 5; f++) {
            uint8_t *c = cand + (size_t)f * rb;
            long sum = 0;
            for (size_t i = 0; i < rb; i++) {
                int a = i >= 3 ? row[i - 3] : 0, u = up[i], ul = i >= 3 ? up[i - 3] : 0, pred;
                switch (f) {
                case 0: pred = 0; break;
                case 1: pred = a; break;
                case 2: pred = u; break;
                case 3: pred = (a + u) >> 1; break;
                default: pred = png_paeth(a, u, ul);
                }
                c[i] = (uint8_t)(row[i] - pred);
                sum += c[i] < 128 ? c[i] : 256 - c[i];
            }
            if (best < 0 || sum < best) { best = sum; bf = f; }
        }
        raw[(size_t)y * (rb + 1)] = (uint8_t)bf;
        memcpy(raw + (size_t)y * (rb + 1) + 1, cand + (size_t)bf * rb, rb);
    }
    free(cand); free(zero);
    /* zlib: CMF 0x78 (deflate, 32K window), FLG 0x01 makes CMF*256+FLG a multiple of 31 */
    uint8_t zh[2] = {0x78, 0x01};
    buf_put(&z, zh, 2);
    if (deflate_fixed(&z, raw, rawn)) { free(raw); free(z.p); return fail(err, errlen, "PNG encoder", "out of memory"); }
    buf_be32(&z, adler32_update(1, raw, rawn));
    free(raw);

    static const uint8_t sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    buf_put(&b, sig, 8);
    uint8_t ihdr[13];
    ihdr[0] = (uint8_t)(w >> 24); ihdr[1] = (uint8_t)(w >> 16); ihdr[2] = (uint8_t)(w >> 8); ihdr[3] = (uint8_t)w;
    ihdr[4] = (uint8_t)(h >> 24); ihdr[5] = (uint8_t)(h >> 16); ihdr[6] = (uint8_t)(h >> 8); ihdr[7] = (uint8_t)h;
    ihdr[8] = 8; ihdr[9] = 2; ihdr[10] = ihdr[11] = ihdr[12] = 0;   /* 8-bit RGB, not interlaced */
    png_chunk(&b, "IHDR", ihdr, 13);
    for (int t = 0; t < ntext; t++) {
        /* tEXt is Latin-1; a value with bytes >= 0x80 is taken as UTF-8 and
         * goes in an iTXt chunk (uncompressed, no language), as Pillow does */
        const char *k = text_keys[t], *v = text_vals[t] ? text_vals[t] : "";
        size_t kl = strlen(k), vl = strlen(v);
        int utf8 = 0;
        for (size_t i = 0; i < vl; i++) if ((unsigned char)v[i] >= 0x80) utf8 = 1;
        buf_t c = {0};
        buf_put(&c, k, kl + 1);                         /* key and its NUL */
        if (utf8) { static const uint8_t it[4] = {0, 0, 0, 0}; buf_put(&c, it, 4); }   /* flag, method, "", "" */
        buf_put(&c, v, vl);
        if (c.oom) { free(c.p); free(z.p); free(b.p); return fail(err, errlen, "PNG encoder", "out of memory"); }
        png_chunk(&b, utf8 ? "iTXt" : "tEXt", c.p, c.n);
        free(c.p);
    }
    png_chunk(&b, "IDAT", z.p, z.n);
    png_chunk(&b, "IEND", NULL, 0);
    free(z.p);
    if (b.oom) { free(b.p); return fail(err, errlen, "PNG encoder", "out of memory"); }
    *out = b.p; *outn = b.n;
    return 0;
}

int image_save_png(const char *path, const uint8_t *rgb, int w, int h,
                   const char **text_keys, const char **text_vals, int ntext,
                   char *err, size_t errlen) {
    uint8_t *png; size_t n;
    if (image_encode_png(&png, &n, rgb, w, h, text_keys, text_vals, ntext, err, errlen)) return -1;
    size_t pl = strlen(path);
    char *tmp = malloc(pl + 5);
    if (!tmp) { free(png); return fail(err, errlen, path, "out of memory"); }
    memcpy(tmp, path, pl); memcpy(tmp + pl, ".tmp", 5);
    FILE *f = fopen(tmp, "wb");
    if (!f) { fail(err, errlen, path, "cannot write %s: %s", tmp, strerror(errno)); free(tmp); free(png); return -1; }
    int bad = fwrite(png, 1, n, f) != n;
    bad |= fflush(f) != 0;
    bad |= fsync(fileno(f)) != 0;
    bad |= fclose(f) != 0;
    free(png);
    if (bad) { fail(err, errlen, path, "writing %s failed: %s", tmp, strerror(errno)); remove(tmp); free(tmp); return -1; }
    if (rename(tmp, path)) { fail(err, errlen, path, "cannot rename %s: %s", tmp, strerror(errno)); remove(tmp); free(tmp); return -1; }
    free(tmp);
    return 0;
}

/* ======================================================================
 * JPEG decoding (ITU T.81): baseline and progressive Huffman, 8-bit
 * ====================================================================== */

/* position in the 8x8 block (row-major) of the k-th coefficient in zig-zag order */
static const uint8_t zz[64] = {
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48,
    41, 34, 27, 20, 13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23,
    30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63};

#define HUFF_FAST 9
typedef struct {
    int defined;
    uint8_t sym[256];
    int32_t maxcode[17];   /* largest code of each length, -1 if none */
    int32_t mincode[17];
    int valptr[17];        /* index in sym of the first code of each length */
    uint16_t fast[1 << HUFF_FAST];   /* (len << 8) | symbol for codes of <= 9 bits; 0 = slow path */
} huff_t;

typedef struct {
    int id, h, v, tq, td, ta;
    int bw, bh;            /* blocks per row / column in the MCU-padded plane */
    int cw, ch;            /* size in samples: ceil(W * h / hmax) x ceil(H * v / vmax) */
    int16_t *coef;         /* bw * bh * 64, natural order, not yet dequantised */
    int dcpred, qlatched;
    uint16_t q[64];        /* quantisation table (natural order), latched at the first scan */
    uint8_t *pix;          /* bw*8 x bh*8 samples after the IDCT */
    int8_t al[64];         /* progressive: the lowest bit sent so far of each zig-zag
                              coefficient, -1 before any scan; 0 everywhere = complete */
} jcomp_t;

typedef struct {
    const uint8_t *d; size_t n, pos;
    const char *name; char *err; size_t errlen;
    /* bit reader: the next bits sit at the top of acc; after a marker or the
     * end of data, zeros are fed and counted in fake */
    uint32_t acc; int nbits, fake, stop;
    int corrupt;
    uint16_t qt[4][64]; int qdef[4];
    huff_t dc[4], ac[4];
    int w, hgt, ncomp, progressive, have_frame, hmax, vmax, mcux, mcuy;
    int ri, eobrun, orientation;
    int jfif, adobe, adobe_transform;
    jcomp_t c[3];
} jpeg_t;

static void jb_fill(jpeg_t *j) {
    while (j->nbits <= 24) {
        uint32_t byte = 0;
        if (!j->stop && j->pos < j->n) {
            byte = j->d[j->pos];
            if (byte == 0xFF) {
                if (j->pos + 1 < j->n && j->d[j->pos + 1] == 0x00) j->pos += 2;   /* stuffed 0xFF */
                else { j->stop = 1; byte = 0; }                                  /* a marker: stop here */
            } else j->pos++;
        } else j->stop = 1;
        if (j->stop) j->fake += 8;
        j->acc |= byte << (24 - j->nbits);
        j->nbits += 8;
    }
}

static int jb_bits(jpeg_t *j, int k) {   /* k in 0..16 */
    if (k == 0) return 0;
    if (j->nbits < k) jb_fill(j);
    int v = (int)(j->acc >> (32 - k));
    j->acc <<= k; j->nbits -= k;
    return v;
}
static int jb_bit(jpeg_t *j) { return jb_bits(j, 1); }

/* a magnitude category s and s extra bits -> the signed value (T.81 F.12) */
static int jb_extend(jpeg_t *j, int s) {
    int v = jb_bits(j, s);
    return v < (1 << (s - 1)) ? v - ((1 << s) - 1) : v;
}

static int jb_huff(jpeg_t *j, const huff_t *t) {
    if (j->nbits < 16) jb_fill(j);
    int f = t->fast[j->acc >> (32 - HUFF_FAST)];
    if (f) { int len = f >> 8; j->acc <<= len; j->nbits -= len; return f & 255; }
    for (int len = 1; len <= 16; len++) {
        int32_t code = (int32_t)(j->acc >> (32 - len));
        if (code <= t->maxcode[len]) {
            j->acc <<= len; j->nbits -= len;
            return t->sym[t->valptr[len] + code - t->mincode[len]];
        }
    }
    j->corrupt = 1;
    return 0;
}

static int jfail(jpeg_t *j, const char *fmt, ...) {
    char msg[300];
    va_list ap; va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return fail(j->err, j->errlen, j->name, "%s", msg);
}

static int jpeg_dht(jpeg_t *j, const uint8_t *s, size_t len) {
    size_t p = 0;
    while (p < len) {
        if (len - p < 17) return jfail(j, "corrupt JPEG (short DHT)");
        int tc = s[p] >> 4, th = s[p] & 15;
        if (tc > 1 || th > 3) return jfail(j, "corrupt JPEG (DHT class %d id %d)", tc, th);
        huff_t *t = tc ? &j->ac[th] : &j->dc[th];
        int counts[17], total = 0;
        for (int l = 1; l <= 16; l++) { counts[l] = s[p + l]; total += counts[l]; }
        p += 17;
        if (total > 256 || (size_t)total > len - p) return jfail(j, "corrupt JPEG (DHT of %d symbols)", total);
        memset(t, 0, sizeof *t);
        memcpy(t->sym, s + p, (size_t)total);
        p += (size_t)total;
        /* canonical Huffman codes: consecutive integers within a length, and
         * each longer length starts at (last code + 1) << 1 */
        int32_t code = 0; int k = 0;
        for (int l = 1; l <= 16; l++) {
            t->valptr[l] = k; t->mincode[l] = code;
            code += counts[l]; k += counts[l];
            t->maxcode[l] = counts[l] ? code - 1 : -1;
            if (code > (1 << l)) return jfail(j, "corrupt JPEG (over-full Huffman table)");
            code <<= 1;
        }
        k = 0;
        for (int l = 1; l <= HUFF_FAST; l++)
            for (int i = 0; i < counts[l]; i++, k++) {
                int c = t->mincode[l] + i, sh = HUFF_FAST - l;
                for (int f = 0; f < (1 << sh); f++) t->fast[(c << sh) | f] = (uint16_t)((l << 8) | t->sym[k]);
            }
        t->defined = 1;
    }
    return 0;
}

static int jpeg_dqt(jpeg_t *j, const uint8_t *s, size_t len) {
    size_t p = 0;
    while (p < len) {
        int pq = s[p] >> 4, tq = s[p] & 15;
        if (pq > 1 || tq > 3) return jfail(j, "corrupt JPEG (DQT precision %d id %d)", pq, tq);
        size_t need = 1 + 64 * (size_t)(pq + 1);
        if (len - p < need) return jfail(j, "corrupt JPEG (short DQT)");
        for (int k = 0; k < 64; k++)
            j->qt[tq][zz[k]] = (uint16_t)(pq ? be16(s + p + 1 + 2 * k) : s[p + 1 + k]);
        j->qdef[tq] = 1;
        p += need;
    }
    return 0;
}

static int jpeg_sof(jpeg_t *j, int marker, const uint8_t *s, size_t len) {
    if (j->have_frame) return jfail(j, "corrupt JPEG (two frame headers)");
    if (len < 6) return jfail(j, "corrupt JPEG (short SOF)");
    if (s[0] != 8) return jfail(j, "%d-bit JPEG (sample precision %d) is not supported, only 8-bit", s[0], s[0]);
    j->hgt = be16(s + 1); j->w = be16(s + 3); j->ncomp = s[5];
    if (j->hgt == 0) return jfail(j, "JPEG with the height in a DNL marker is not supported");
    if (check_size(j->w, j->hgt, j->name, j->err, j->errlen)) return -1;
    if (j->ncomp == 4) return jfail(j, "CMYK/YCCK JPEG (4 components) is not supported (convert it to RGB)");
    if (j->ncomp != 1 && j->ncomp != 3) return jfail(j, "JPEG with %d components is not supported", j->ncomp);
    if (len < 6 + 3 * (size_t)j->ncomp) return jfail(j, "corrupt JPEG (short SOF)");
    j->progressive = marker == 0xC2;
    j->hmax = j->vmax = 1;
    for (int i = 0; i < j->ncomp; i++) {
        jcomp_t *c = &j->c[i];
        c->id = s[6 + 3 * i]; c->h = s[7 + 3 * i] >> 4; c->v = s[7 + 3 * i] & 15; c->tq = s[8 + 3 * i];
        if (c->h < 1 || c->h > 4 || c->v < 1 || c->v > 4 || c->tq > 3)
            return jfail(j, "corrupt JPEG (component %d sampling %dx%d, table %d)", i, c->h, c->v, c->tq);
        for (int k = 0; k < i; k++) if (j->c[k].id == c->id) return jfail(j, "corrupt JPEG (repeated component id)");
        if (c->h > j->hmax) j->hmax = c->h;
        if (c->v > j->vmax) j->vmax = c->v;
    }
    if (j->ncomp == 1) j->c[0].h = j->c[0].v = j->hmax = j->vmax = 1;   /* one component: sampling is moot */
    j->mcux = (j->w + 8 * j->hmax - 1) / (8 * j->hmax);
    j->mcuy = (j->hgt + 8 * j->vmax - 1) / (8 * j->vmax);
    for (int i = 0; i < j->ncomp; i++) {
        jcomp_t *c = &j->c[i];
        if (j->hmax % c->h || j->vmax % c->v)
            return jfail(j, "JPEG with non-integer chroma subsampling (%dx%d of %dx%d) is not supported",
                         c->h, c->v, j->hmax, j->vmax);
        c->cw = (j->w * c->h + j->hmax - 1) / j->hmax;
        c->ch = (j->hgt * c->v + j->vmax - 1) / j->vmax;
        c->bw = j->mcux * c->h; c->bh = j->mcuy * c->v;
        memset(c->al, -1, sizeof c->al);
        c->coef = calloc((size_t)c->bw * (size_t)c->bh * 64, sizeof(int16_t));
        if (!c->coef) return jfail(j, "out of memory for a %dx%d JPEG", j->w, j->hgt);
    }
    j->have_frame = 1;
    return 0;
}

/* one block of a sequential scan (T.81 F.2.2) */
static void jpeg_block_seq(jpeg_t *j, jcomp_t *c, int16_t *b) {
    int t = jb_huff(j, &j->dc[c->td]);
    if (t > 15) { j->corrupt = 1; return; }
    /* DC is coded as the difference from the previous block's DC; wrap to 16 bits like the coefficients */
    c->dcpred = (int16_t)(c->dcpred + (t ? jb_extend(j, t) : 0));
    b[0] = (int16_t)c->dcpred;
    for (int k = 1; k < 64; k++) {
        int rs = jb_huff(j, &j->ac[c->ta]), r = rs >> 4, s = rs & 15;
        if (s == 0) {
            if (r != 15) break;   /* end of block */
            k += 15;              /* sixteen zeros */
            continue;
        }
        k += r;
        if (k > 63) { j->corrupt = 1; return; }
        b[zz[k]] = (int16_t)jb_extend(j, s);
    }
}

/* progressive scans (T.81 G.1.2): DC first / refine, AC first / refine */
static void jpeg_block_dc(jpeg_t *j, jcomp_t *c, int16_t *b, int ah, int al) {
    if (ah == 0) {
        int t = jb_huff(j, &j->dc[c->td]);
        if (t > 15) { j->corrupt = 1; return; }
        c->dcpred = (int16_t)(c->dcpred + (t ? jb_extend(j, t) : 0));
        b[0] = (int16_t)(c->dcpred * (1 << al));
    } else if (jb_bit(j)) {
        b[0] = (int16_t)(b[0] | (1 << al));
    }
}

static void jpeg_block_ac_first(jpeg_t *j, jcomp_t *c, int16_t *b, int ss, int se, int al) {
    if (j->eobrun > 0) { j->eobrun--; return; }
    for (int k = ss; k <= se; k++) {
        int rs = jb_huff(j, &j->ac[c->ta]), r = rs >> 4, s = rs & 15;
        if (s == 0) {
            if (r < 15) {   /* a run of 2^r + extra blocks ends here (this one included) */
                j->eobrun = (1 << r) - 1 + jb_bits(j, r);
                break;
            }
            k += 15;
            continue;
        }
        k += r;
        if (k > 63) { j->corrupt = 1; return; }
        b[zz[k]] = (int16_t)(jb_extend(j, s) * (1 << al));
    }
}

/* refinement: one more bit for every coefficient already non-zero, and new
 * coefficients of magnitude 1 << al placed after r zero-history positions */
static void jpeg_block_ac_refine(jpeg_t *j, jcomp_t *c, int16_t *b, int ss, int se, int al) {
    int p1 = 1 << al, m1 = -p1, k = ss;
    if (j->eobrun == 0) {
        for (; k <= se; k++) {
            int rs = jb_huff(j, &j->ac[c->ta]), r = rs >> 4, s = rs & 15, val = 0;
            if (s) {
                if (s != 1) { j->corrupt = 1; return; }
                val = jb_bit(j) ? p1 : m1;
            } else if (r != 15) {
                j->eobrun = (1 << r) + jb_bits(j, r);
                break;
            }
            /* skip r zero coefficients (refining the non-zero ones passed) */
            for (; k <= se; k++) {
                int16_t *x = b + zz[k];
                if (*x) {
                    if (jb_bit(j) && (*x & p1) == 0) *x = (int16_t)(*x >= 0 ? *x + p1 : *x + m1);
                } else {
                    if (r == 0) break;
                    r--;
                }
            }
            if (val) {
                if (k > se) { j->corrupt = 1; return; }
                b[zz[k]] = (int16_t)val;
            }
            if (j->corrupt) return;
        }
    }
    if (j->eobrun > 0) {   /* inside an end-of-band run: only refine what is there */
        for (; k <= se; k++) {
            int16_t *x = b + zz[k];
            if (*x && jb_bit(j) && (*x & p1) == 0) *x = (int16_t)(*x >= 0 ? *x + p1 : *x + m1);
        }
        j->eobrun--;
    }
}

/* after ri MCUs: the RSTn marker, then fresh DC predictions and bit reader */
static int jpeg_restart(jpeg_t *j, int ncs, jcomp_t **cs) {
    j->acc = 0; j->nbits = 0; j->fake = 0; j->stop = 0;
    if (j->n - j->pos < 2 || j->d[j->pos] != 0xFF || j->d[j->pos + 1] < 0xD0 || j->d[j->pos + 1] > 0xD7)
        return jfail(j, "corrupt or truncated JPEG (missing restart marker at byte %zu)", j->pos);
    j->pos += 2;
    for (int i = 0; i < ncs; i++) cs[i]->dcpred = 0;
    j->eobrun = 0;
    return 0;
}

static int jpeg_sos(jpeg_t *j, const uint8_t *s, size_t len) {
    if (!j->have_frame) return jfail(j, "corrupt JPEG (scan before frame header)");
    if (len < 1) return jfail(j, "corrupt JPEG (short SOS)");
    int ns = s[0];
    if (ns < 1 || ns > j->ncomp || len < 4 + 2 * (size_t)ns) return jfail(j, "corrupt JPEG (SOS with %d components)", ns);
    jcomp_t *cs[3];
    for (int i = 0; i < ns; i++) {
        int id = s[1 + 2 * i], k;
        for (k = 0; k < j->ncomp; k++) if (j->c[k].id == id) break;
        if (k == j->ncomp) return jfail(j, "corrupt JPEG (scan names unknown component %d)", id);
        for (int m = 0; m < i; m++) if (cs[m] == &j->c[k]) return jfail(j, "corrupt JPEG (component twice in a scan)");
        cs[i] = &j->c[k];
        cs[i]->td = s[2 + 2 * i] >> 4; cs[i]->ta = s[2 + 2 * i] & 15;
        if (cs[i]->td > 3 || cs[i]->ta > 3) return jfail(j, "corrupt JPEG (Huffman table id)");
    }
    int ss = s[1 + 2 * ns], se = s[2 + 2 * ns], ah = s[3 + 2 * ns] >> 4, al = s[3 + 2 * ns] & 15;
    if (j->progressive) {
        if (ss > se || se > 63 || (ss == 0 && se != 0) || (ss > 0 && ns != 1) || ah > 13 || al > 13)
            return jfail(j, "corrupt JPEG (progressive scan Ss=%d Se=%d Ah=%d Al=%d)", ss, se, ah, al);
    } else if (ss != 0 || se != 63) {
        return jfail(j, "corrupt JPEG (sequential scan with Ss=%d Se=%d)", ss, se);
    }
    if (ns > 1) {
        int nb = 0;
        for (int i = 0; i < ns; i++) nb += cs[i]->h * cs[i]->v;
        if (nb > 10) return jfail(j, "corrupt JPEG (%d blocks per MCU)", nb);
    }
    for (int i = 0; i < ns; i++) {
        jcomp_t *c = cs[i];
        int need_dc = !j->progressive || (ss == 0 && ah == 0), need_ac = !j->progressive || ss > 0;
        if ((need_dc && !j->dc[c->td].defined) || (need_ac && !j->ac[c->ta].defined))
            return jfail(j, "corrupt JPEG (scan uses an undefined Huffman table)");
        if (!c->qlatched) {
            if (!j->qdef[c->tq]) return jfail(j, "corrupt JPEG (component uses an undefined quantisation table)");
            memcpy(c->q, j->qt[c->tq], sizeof c->q); c->qlatched = 1;
        }
        c->dcpred = 0;
    }
    j->acc = 0; j->nbits = 0; j->fake = 0; j->stop = 0; j->eobrun = 0; j->corrupt = 0;

    /* one component: its blocks in raster order, one block per MCU;
     * several: MCUs of h x v blocks of each component */
    long nmcu, mx_n;
    if (ns == 1) {
        mx_n = (cs[0]->cw + 7) / 8;
        nmcu = mx_n * (long)((cs[0]->ch + 7) / 8);
    } else {
        mx_n = j->mcux;
        nmcu = (long)j->mcux * j->mcuy;
    }
    long todo = j->ri;
    for (long m = 0; m < nmcu; m++) {
        int mx = (int)(m % mx_n), my = (int)(m / mx_n);
        for (int i = 0; i < ns; i++) {
            jcomp_t *c = cs[i];
            int nbx = ns == 1 ? 1 : c->h, nby = ns == 1 ? 1 : c->v;
            for (int by = 0; by < nby; by++)
                for (int bx = 0; bx < nbx; bx++) {
                    size_t col = (size_t)mx * nbx + bx, row = (size_t)my * nby + by;
                    int16_t *b = c->coef + (row * (size_t)c->bw + col) * 64;
                    if (!j->progressive) jpeg_block_seq(j, c, b);
                    else if (ss == 0) jpeg_block_dc(j, c, b, ah, al);
                    else if (ah == 0) jpeg_block_ac_first(j, c, b, ss, se, al);
                    else jpeg_block_ac_refine(j, c, b, ss, se, al);
                    if (j->corrupt) return jfail(j, "corrupt JPEG (bad Huffman data)");
                    if (j->nbits < j->fake)
                        return jfail(j, "JPEG data is truncated or corrupt (scan ends before its last block)");
                }
        }
        if (j->ri && --todo == 0 && m + 1 < nmcu) {
            if (jpeg_restart(j, ns, cs)) return -1;
            todo = j->ri;
        }
    }
    if (j->progressive)
        for (int i = 0; i < ns; i++)
            for (int k = ss; k <= se; k++) cs[i]->al[k] = (int8_t)al;
    return 0;
}

/* EXIF orientation: APP1 "Exif\0\0", a TIFF header, IFD0's tag 0x0112 */
static void jpeg_exif(jpeg_t *j, const uint8_t *s, size_t len) {
    if (len < 14 || memcmp(s, "Exif\0\0", 6) != 0 || j->orientation) return;
    const uint8_t *t = s + 6; size_t tn = len - 6;
    int le;
    if (t[0] == 'I' && t[1] == 'I') le = 1;
    else if (t[0] == 'M' && t[1] == 'M') le = 0;
    else return;
#define U16(p) (le ? (int)((p)[0] | ((p)[1] << 8)) : be16(p))
#define U32(p) (le ? ((uint32_t)(p)[0] | ((uint32_t)(p)[1] << 8) | ((uint32_t)(p)[2] << 16) | ((uint32_t)(p)[3] << 24)) : be32(p))
    if (U16(t + 2) != 42) return;
    uint32_t off = U32(t + 4);
    if (off > tn || tn - off < 2) return;
    int cnt = U16(t + off);
    for (int i = 0; i < cnt; i++) {
        size_t e = off + 2 + 12 * (size_t)i;
        if (e + 12 > tn) break;
        if (U16(t + e) == 0x0112) {
            int type = U16(t + e + 2), v = 0;
            if (type == 3) v = U16(t + e + 8);
            else if (type == 4) v = (int)(U32(t + e + 8) & 0xffff);
            if (v >= 1 && v <= 8) j->orientation = v;
            break;
        }
    }
#undef U16
#undef U32
}

/* Inverse DCT of one block, in the same integer arithmetic as libjpeg's
 * default ("islow") method that Pillow uses, so the pixels agree exactly
 * rather than within a level. The transform is the definition
 *   f(x,y) = sum_u sum_v C(u)/2 C(v)/2 F(v,u) cos((2x+1)u pi/16) cos((2y+1)v pi/16)
 * (C(0) = 1/sqrt(2), else 1) factored the Loeffler-Ligtenberg-Moschytz way:
 * a 1-D 8-point IDCT with 12 multiplications, constants in 13-bit fixed point,
 * applied to the columns (keeping 2 extra bits) and then to the rows; the
 * final shift also divides by 8 (the C(u)/2 C(v)/2 normalisation). */
#define IDCT_CB 13   /* constant bits */
#define IDCT_P1 2    /* extra precision kept between the passes */
#define FIX(x) ((int64_t)((x) * (1 << IDCT_CB) + 0.5))

/* round(x / 2^n), rounding halves up, for negative x too */
static int64_t descale(int64_t x, int n) {
    x += (int64_t)1 << (n - 1);
    return x >= 0 ? x >> n : -((-x + ((int64_t)1 << n) - 1) >> n);
}

/* 1-D: in[0..7] (stride st) -> out[0..7], all scaled by 2^IDCT_CB * in_scale */
static void idct_1d(int64_t *o, const int64_t *in, int st) {
    /* even part: the 4-point IDCT of in[0], in[2], in[4], in[6]; its rotation
     * by pi/8 as one shared product plus two corrections */
    int64_t z1 = (in[2 * st] + in[6 * st]) * FIX(0.541196100);
    int64_t t2 = z1 - in[6 * st] * FIX(1.847759065);
    int64_t t3 = z1 + in[2 * st] * FIX(0.765366865);
    int64_t t0 = (in[0] + in[4 * st]) * (1 << IDCT_CB);
    int64_t t1 = (in[0] - in[4 * st]) * (1 << IDCT_CB);
    int64_t e0 = t0 + t3, e3 = t0 - t3, e1 = t1 + t2, e2 = t1 - t2;
    /* odd part: in[7], in[5], in[3], in[1] through the butterfly with the
     * sqrt(2) cos(k pi/16) rotations */
    int64_t a0 = in[7 * st], a1 = in[5 * st], a2 = in[3 * st], a3 = in[st];
    int64_t s1 = a0 + a3, s2 = a1 + a2, s3 = a0 + a2, s4 = a1 + a3;
    int64_t z5 = (s3 + s4) * FIX(1.175875602);
    a0 *= FIX(0.298631336); a1 *= FIX(2.053119869); a2 *= FIX(3.072711026); a3 *= FIX(1.501321110);
    s1 *= -FIX(0.899976223); s2 *= -FIX(2.562915447); s3 *= -FIX(1.961570560); s4 *= -FIX(0.390180644);
    s3 += z5; s4 += z5;
    a0 += s1 + s3; a1 += s2 + s4; a2 += s2 + s3; a3 += s1 + s4;
    o[0] = e0 + a3; o[7] = e0 - a3;
    o[1] = e1 + a2; o[6] = e1 - a2;
    o[2] = e2 + a1; o[5] = e2 - a1;
    o[3] = e3 + a0; o[4] = e3 - a0;
}

static void idct_block(uint8_t *out, int stride, const int16_t *b, const uint16_t *q) {
    int64_t f[64], ws[64], col[8], t[8];
    for (int i = 0; i < 64; i++) f[i] = (int64_t)b[i] * q[i];   /* dequantise */
    for (int x = 0; x < 8; x++) {   /* columns */
        idct_1d(t, f + x, 8);
        for (int y = 0; y < 8; y++) ws[8 * y + x] = descale(t[y], IDCT_CB - IDCT_P1);
    }
    for (int y = 0; y < 8; y++) {   /* rows, then level shift and clamp */
        for (int x = 0; x < 8; x++) col[x] = ws[8 * y + x];
        idct_1d(t, col, 1);
        for (int x = 0; x < 8; x++) {
            int64_t v = descale(t[x], IDCT_CB + IDCT_P1 + 3) + 128;
            out[y * stride + x] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
        }
    }
}

/* chroma upsampling to the full W x H grid. For 2x horizontal and/or
 * vertical this is libjpeg's "fancy" (triangular) filter, which Pillow uses:
 * each output sample is 3/4 of the nearest input sample plus 1/4 of the next
 * nearest, edges replicated, with libjpeg's alternating rounding biases:
 *   h2v1: (3 near + far + 1 or 2) >> 2
 *   h1v2: (3 near + far + 1 (upper) or 2 (lower)) >> 2
 *   h2v2: colsum = 3 near row + far row; (3 colsum + neighbour colsum + 8 or 7) >> 4
 * Other integer factors replicate samples. */
static void upsample(uint8_t *dst, int W, int H, const jcomp_t *c, int hs, int vs) {
    const uint8_t *p = c->pix;
    int stride = c->bw * 8, cw = c->cw, ch = c->ch;
    for (int yo = 0; yo < H; yo++) {
        uint8_t *o = dst + (size_t)yo * W;
        int jr = yo / vs;
        const uint8_t *r0 = p + (size_t)jr * stride;
        if (vs == 2) {
            int upper = (yo & 1) == 0;
            int jn = upper ? (jr > 0 ? jr - 1 : 0) : (jr + 1 < ch ? jr + 1 : ch - 1);
            const uint8_t *r1 = p + (size_t)jn * stride;
            if (hs == 2) {
                for (int i = 0; i < cw; i++) {
                    int il = i > 0 ? i - 1 : 0, ir = i + 1 < cw ? i + 1 : cw - 1;
                    int cs = 3 * r0[i] + r1[i], cl = 3 * r0[il] + r1[il], cr = 3 * r0[ir] + r1[ir];
                    if (2 * i < W) o[2 * i] = (uint8_t)((3 * cs + cl + 8) >> 4);
                    if (2 * i + 1 < W) o[2 * i + 1] = (uint8_t)((3 * cs + cr + 7) >> 4);
                }
            } else if (hs == 1) {
                int bias = upper ? 1 : 2;
                for (int i = 0; i < W; i++) o[i] = (uint8_t)((3 * r0[i] + r1[i] + bias) >> 2);
            } else {
                for (int i = 0; i < W; i++) o[i] = r0[i / hs];
            }
        } else if (vs == 1 && hs == 2) {
            for (int i = 0; i < cw; i++) {
                int il = i > 0 ? i - 1 : 0, ir = i + 1 < cw ? i + 1 : cw - 1;
                if (2 * i < W) o[2 * i] = (uint8_t)((3 * r0[i] + r0[il] + 1) >> 2);
                if (2 * i + 1 < W) o[2 * i + 1] = (uint8_t)((3 * r0[i] + r0[ir] + 2) >> 2);
            }
        } else {
            for (int i = 0; i < W; i++) o[i] = r0[i / hs];
        }
    }
}

/* floor(v / 65536) for negative v too */
static int asr16(int v) { return v >= 0 ? v >> 16 : -((-v + 65535) >> 16); }

/* apply the EXIF orientation as ImageOps.exif_transpose does:
 * 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 clockwise,
 * 7 transverse, 8 rotate 90 counter-clockwise */
static uint8_t *orient(const uint8_t *in, int w, int h, int o, int *ow, int *oh) {
    int swap = o >= 5;
    *ow = swap ? h : w; *oh = swap ? w : h;
    uint8_t *out = malloc((size_t)w * (size_t)h * 3);
    if (!out) return NULL;
    for (int y = 0; y < *oh; y++)
        for (int x = 0; x < *ow; x++) {
            int sx, sy;
            switch (o) {
            case 2: sx = w - 1 - x; sy = y; break;
            case 3: sx = w - 1 - x; sy = h - 1 - y; break;
            case 4: sx = x; sy = h - 1 - y; break;
            case 5: sx = y; sy = x; break;
            case 6: sx = y; sy = h - 1 - x; break;
            case 7: sx = w - 1 - y; sy = h - 1 - x; break;
            case 8: sx = w - 1 - y; sy = x; break;
            default: sx = x; sy = y;
            }
            memcpy(out + ((size_t)y * *ow + x) * 3, in + ((size_t)sy * w + sx) * 3, 3);
        }
    return out;
}

static int jpeg_decode(image_t *im, const uint8_t *d, size_t n, const char *name, char *err, size_t errlen) {
    jpeg_t *j = calloc(1, sizeof *j);
    if (!j) return fail(err, errlen, name, "out of memory");
    j->d = d; j->n = n; j->pos = 2; j->name = name; j->err = err; j->errlen = errlen;
    int rc = -1, scans = 0, eoi = 0;
    uint8_t *planes[3] = {0};

    while (!eoi) {
        /* next marker: skip anything up to a 0xFF that is not stuffing, then fill bytes */
        while (j->pos < n && !(d[j->pos] == 0xFF && j->pos + 1 < n && d[j->pos + 1] != 0x00)) j->pos++;
        while (j->pos + 1 < n && d[j->pos + 1] == 0xFF) j->pos++;
        if (n - j->pos < 2) { jfail(j, scans ? "JPEG is truncated (no end-of-image marker)" : "JPEG is truncated"); goto done; }
        int m = d[j->pos + 1];
        j->pos += 2;
        if (m == 0xD9) { eoi = 1; break; }
        if ((m >= 0xD0 && m <= 0xD7) || m == 0x01) continue;   /* stray RSTn, TEM: no segment */
        if (m == 0xD8) { jfail(j, "corrupt JPEG (second start-of-image marker)"); goto done; }
        if (n - j->pos < 2) { jfail(j, "JPEG is truncated"); goto done; }
        size_t len = (size_t)be16(d + j->pos);
        if (len < 2 || len > n - j->pos) { jfail(j, "JPEG is truncated (segment at byte %zu)", j->pos); goto done; }
        const uint8_t *s = d + j->pos + 2;
        size_t sl = len - 2;
        j->pos += len;
        switch (m) {
        case 0xC0: case 0xC1: case 0xC2:
            if (jpeg_sof(j, m, s, sl)) goto done;
            break;
        case 0xC3: jfail(j, "lossless JPEG (SOF3) is not supported"); goto done;
        case 0xC5: case 0xC6: case 0xC7:
            jfail(j, "hierarchical JPEG (SOF%d) is not supported", m - 0xC0); goto done;
        case 0xC9: case 0xCA: case 0xCB: case 0xCD: case 0xCE: case 0xCF: case 0xCC:
            jfail(j, "arithmetic-coded JPEG (%s%d) is not supported", m == 0xCC ? "DAC" : "SOF", m == 0xCC ? 0 : m - 0xC0);
            goto done;
        case 0xC4: if (jpeg_dht(j, s, sl)) goto done; break;
        case 0xDB: if (jpeg_dqt(j, s, sl)) goto done; break;
        case 0xDD:
            if (sl < 2) { jfail(j, "corrupt JPEG (short DRI)"); goto done; }
            j->ri = be16(s);
            break;
        case 0xDA:
            if (jpeg_sos(j, s, sl)) goto done;
            scans++;
            break;
        case 0xDC: jfail(j, "JPEG with a DNL marker is not supported"); goto done;
        case 0xDE: case 0xDF: jfail(j, "hierarchical JPEG is not supported"); goto done;
        case 0xE0:
            if (sl >= 5 && memcmp(s, "JFIF", 5) == 0) j->jfif = 1;
            break;
        case 0xE1: jpeg_exif(j, s, sl); break;
        case 0xEE:
            if (sl >= 12 && memcmp(s, "Adobe", 5) == 0) { j->adobe = 1; j->adobe_transform = s[11]; }
            break;
        default:
            if (m < 0xC0) { jfail(j, "corrupt JPEG (unknown marker 0x%02X)", m); goto done; }
            break;   /* APPn, COM and the rest: skipped */
        }
    }
    if (!j->have_frame || scans == 0) { jfail(j, "corrupt JPEG (no image data)"); goto done; }
    /* A progressive file cut short but closed with an end-of-image marker
     * (its last scans missing) is refused: libjpeg, and so Pillow, would
     * smooth the blocks whose low AC coefficients never arrived, which this
     * decoder does not do, so the picture would differ from theirs. A
     * complete file brings every coefficient down to its last bit (al 0). */
    if (j->progressive)
        for (int i = 0; i < j->ncomp; i++)
            for (int k = 0; k < 64; k++)
                if (j->c[i].al[k] != 0) {
                    jfail(j, "progressive JPEG is incomplete: its last scans are missing (coefficient %d of "
                          "component %d %s); re-download it, or re-save it from a complete copy", k, i,
                          j->c[i].al[k] < 0 ? "never sent" : "not refined to its last bit");
                    goto done;
                }

    /* dequantise + IDCT each component into its own plane */
    for (int i = 0; i < j->ncomp; i++) {
        jcomp_t *c = &j->c[i];
        if (!c->qlatched) { jfail(j, "JPEG is incomplete (component %d never coded)", i); goto done; }
        size_t stride = (size_t)c->bw * 8;
        c->pix = malloc(stride * (size_t)c->bh * 8);
        if (!c->pix) { jfail(j, "out of memory"); goto done; }
        for (int by = 0; by < c->bh; by++)
            for (int bx = 0; bx < c->bw; bx++)
                idct_block(c->pix + (size_t)by * 8 * stride + (size_t)bx * 8, (int)stride,
                           c->coef + ((size_t)by * c->bw + bx) * 64, c->q);
    }
    int W = j->w, H = j->hgt;
    for (int i = 0; i < j->ncomp; i++) {
        planes[i] = malloc((size_t)W * H);
        if (!planes[i]) { jfail(j, "out of memory"); goto done; }
        upsample(planes[i], W, H, &j->c[i], j->hmax / j->c[i].h, j->vmax / j->c[i].v);
    }
    uint8_t *rgb = malloc((size_t)W * H * 3);
    if (!rgb) { jfail(j, "out of memory"); goto done; }
    /* colour space as libjpeg decides it: JFIF means YCbCr; else Adobe's
     * transform flag; else component ids 'R','G','B' mean RGB */
    int is_rgb = 0;
    if (j->ncomp == 3 && !j->jfif) {
        if (j->adobe) is_rgb = j->adobe_transform == 0;
        else is_rgb = j->c[0].id == 'R' && j->c[1].id == 'G' && j->c[2].id == 'B';
    }
    for (size_t p = 0; p < (size_t)W * H; p++) {
        uint8_t *o = rgb + 3 * p;
        if (j->ncomp == 1) { o[0] = o[1] = o[2] = planes[0][p]; continue; }
        if (is_rgb) { o[0] = planes[0][p]; o[1] = planes[1][p]; o[2] = planes[2][p]; continue; }
        /* JFIF YCbCr -> RGB, in libjpeg's 16-bit fixed point:
         *   R = Y + 1.402 Cr'   G = Y - 0.34414 Cb' - 0.71414 Cr'   B = Y + 1.772 Cb'
         * with Cb' = Cb - 128, Cr' = Cr - 128 */
        int y = planes[0][p], cb = planes[1][p] - 128, cr = planes[2][p] - 128;
        int r = y + asr16(91881 * cr + 32768);
        int g = y + asr16(-22554 * cb - 46802 * cr + 32768);
        int b = y + asr16(116130 * cb + 32768);
        o[0] = (uint8_t)(r < 0 ? 0 : r > 255 ? 255 : r);
        o[1] = (uint8_t)(g < 0 ? 0 : g > 255 ? 255 : g);
        o[2] = (uint8_t)(b < 0 ? 0 : b > 255 ? 255 : b);
    }
    if (j->orientation > 1) {
        int ow, oh;
        uint8_t *t = orient(rgb, W, H, j->orientation, &ow, &oh);
        free(rgb);
        if (!t) { jfail(j, "out of memory"); goto done; }
        rgb = t; W = ow; H = oh;
    }
    im->rgb = rgb; im->w = W; im->h = H;
    rc = 0;
done:
    for (int i = 0; i < 3; i++) { free(j->c[i].coef); free(j->c[i].pix); free(planes[i]); }
    free(j);
    return rc;
}

/* ======================================================================
 * entry points
 * ====================================================================== */

int image_decode(image_t *im, const uint8_t *d, size_t n, const char *name, char *err, size_t errlen) {
    im->w = im->h = 0; im->rgb = NULL;
    static const uint8_t png_sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    if (n >= 8 && memcmp(d, png_sig, 8) == 0) return png_decode(im, d, n, name, err, errlen);
    if (n >= 3 && d[0] == 0xFF && d[1] == 0xD8 && d[2] == 0xFF) return jpeg_decode(im, d, n, name, err, errlen);
    const char *kind = NULL;
    if (n >= 6 && (memcmp(d, "GIF87a", 6) == 0 || memcmp(d, "GIF89a", 6) == 0)) kind = "GIF";
    else if (n >= 12 && memcmp(d, "RIFF", 4) == 0 && memcmp(d + 8, "WEBP", 4) == 0) kind = "WebP";
    else if (n >= 2 && memcmp(d, "BM", 2) == 0) kind = "BMP";
    else if (n >= 4 && (memcmp(d, "II*\0", 4) == 0 || memcmp(d, "MM\0*", 4) == 0)) kind = "TIFF";
    if (kind) return fail(err, errlen, name, "%s images are not supported (convert to PNG or JPEG)", kind);
    if (n < 8) return fail(err, errlen, name, "not an image (%zu bytes; truncated?)", n);
    return fail(err, errlen, name, "not a PNG or JPEG file (unknown first bytes %02X %02X %02X %02X)",
                d[0], d[1], d[2], d[3]);
}

int image_load(image_t *im, const char *path, char *err, size_t errlen) {
    im->w = im->h = 0; im->rgb = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return fail(err, errlen, path, "cannot open: %s", strerror(errno));
    uint8_t *d = NULL; size_t n = 0, cap = 0;
    for (;;) {
        if (n == cap) {
            size_t nc = cap ? cap * 2 : 1 << 16;
            if (nc > ((size_t)1 << 31)) { free(d); fclose(f); return fail(err, errlen, path, "file is over 2 GiB"); }
            uint8_t *t = realloc(d, nc);
            if (!t) { free(d); fclose(f); return fail(err, errlen, path, "out of memory"); }
            d = t; cap = nc;
        }
        size_t k = fread(d + n, 1, cap - n, f);
        n += k;
        if (k == 0) break;
    }
    int rd = ferror(f);
    fclose(f);
    if (rd) { free(d); return fail(err, errlen, path, "read error"); }
    int rc = image_decode(im, d, n, path, err, errlen);
    free(d);
    return rc;
}

/* ======================================================================
 * resampling, Pillow's way (Resample.c): for each output pixel a weight per
 * input pixel in its window, normalised to sum 1, stored as 22-bit fixed
 * point; horizontal pass into 8-bit, then vertical.
 * ====================================================================== */

static double sinc(double x) {
    if (x == 0.0) return 1.0;
    x *= M_PI;
    return sin(x) / x;
}
static double filt_lanczos(double x) { return (x >= -3.0 && x < 3.0) ? sinc(x) * sinc(x / 3.0) : 0.0; }
static double filt_box(double x) { return (x > -0.5 && x <= 0.5) ? 1.0 : 0.0; }

#define RS_BITS 22   /* 32 - 8 bits of pixel - 2 bits of headroom */

/* for each output index: first input index, tap count, and ksize weights */
static int rs_coeffs(int insz, int outsz, image_filter f, int **pbound, int32_t **pk, int *pksize) {
    double scale = (double)insz / outsz;
    double fscale = scale < 1.0 ? 1.0 : scale;   /* widen the kernel when shrinking: antialiasing */
    double support = (f == IMAGE_LANCZOS ? 3.0 : 0.5) * fscale;
    int ksize = (int)ceil(support) * 2 + 1;
    int *bound = malloc(sizeof(int) * 2 * (size_t)outsz);
    int32_t *k = calloc((size_t)outsz * (size_t)ksize, sizeof(int32_t));
    double *w = malloc(sizeof(double) * (size_t)ksize);
    if (!bound || !k || !w) { free(bound); free(k); free(w); return -1; }
    for (int xx = 0; xx < outsz; xx++) {
        double center = (xx + 0.5) * scale, ss = 1.0 / fscale, sum = 0;
        int xmin = (int)(center - support + 0.5), xmax;
        if (xmin < 0) xmin = 0;
        xmax = (int)(center + support + 0.5);
        if (xmax > insz) xmax = insz;
        xmax -= xmin;
        for (int x = 0; x < xmax; x++) {
            double v = (x + xmin - center + 0.5) * ss;
            w[x] = f == IMAGE_LANCZOS ? filt_lanczos(v) : filt_box(v);
            sum += w[x];
        }
        for (int x = 0; x < xmax; x++) {
            double v = sum != 0.0 ? w[x] / sum : w[x];
            /* round half away from zero into fixed point */
            k[(size_t)xx * ksize + x] = (int32_t)(v < 0 ? -0.5 + v * (1 << RS_BITS) : 0.5 + v * (1 << RS_BITS));
        }
        bound[2 * xx] = xmin; bound[2 * xx + 1] = xmax;
    }
    free(w);
    *pbound = bound; *pk = k; *pksize = ksize;
    return 0;
}

static uint8_t rs_clip(int64_t ss) {
    if (ss < 0) return 0;
    ss >>= RS_BITS;
    return (uint8_t)(ss > 255 ? 255 : ss);
}

int image_resize(uint8_t *dst, int dw, int dh, const uint8_t *src, int sw, int sh, image_filter filter) {
    if (dw < 1 || dh < 1 || sw < 1 || sh < 1) return -1;
    int *bx = NULL, *by = NULL, kx = 0, ky = 0;
    int32_t *wx = NULL, *wy = NULL;
    uint8_t *mid = malloc((size_t)dw * sh * 3);
    if (!mid || rs_coeffs(sw, dw, filter, &bx, &wx, &kx) || rs_coeffs(sh, dh, filter, &by, &wy, &ky)) {
        free(mid); free(bx); free(wx); free(by); free(wy); return -1;
    }
    /* horizontal: mid[y][x] = sum_i src[y][xmin + i] k_x[i], rounded and clipped to 8 bits */
    for (int y = 0; y < sh; y++)
        for (int x = 0; x < dw; x++) {
            const int32_t *k = wx + (size_t)x * kx;
            const uint8_t *s = src + ((size_t)y * sw + bx[2 * x]) * 3;
            for (int c = 0; c < 3; c++) {
                int64_t acc = 1 << (RS_BITS - 1);
                for (int i = 0; i < bx[2 * x + 1]; i++) acc += (int64_t)s[3 * i + c] * k[i];
                mid[((size_t)y * dw + x) * 3 + c] = rs_clip(acc);
            }
        }
    /* vertical: dst[y][x] = sum_i mid[ymin + i][x] k_y[i] */
    for (int y = 0; y < dh; y++) {
        const int32_t *k = wy + (size_t)y * ky;
        for (int x = 0; x < dw; x++)
            for (int c = 0; c < 3; c++) {
                int64_t acc = 1 << (RS_BITS - 1);
                for (int i = 0; i < by[2 * y + 1]; i++)
                    acc += (int64_t)mid[((size_t)(by[2 * y] + i) * dw + x) * 3 + c] * k[i];
                dst[((size_t)y * dw + x) * 3 + c] = rs_clip(acc);
            }
    }
    free(mid); free(bx); free(wx); free(by); free(wy);
    return 0;
}

int image_resize_crop(image_t *out, const image_t *in, int size, int crop_w, int crop_h,
                      int x0, int y0, image_filter filter, char *err, size_t errlen) {
    out->w = out->h = 0; out->rgb = NULL;
    if (size < 1 || crop_w < 1 || crop_h < 1 || in->w < 1 || in->h < 1)
        return fail(err, errlen, "resize", "bad sizes (size %d, crop %dx%d, image %dx%d)", size, crop_w, crop_h, in->w, in->h);
    /* short side -> size, long side -> floor(size * long / short) */
    int sw, sh;
    if (in->w <= in->h) { sw = size; sh = (int)((double)((int64_t)size * in->h) / in->w); }
    else { sh = size; sw = (int)((double)((int64_t)size * in->w) / in->h); }
    if (check_size(sw, sh, "resize", err, errlen)) return -1;
    if (crop_w > sw || crop_h > sh)
        return fail(err, errlen, "resize", "crop %dx%d is larger than the scaled image %dx%d", crop_w, crop_h, sw, sh);
    /* centred: round((scaled - crop) / 2), halves to even, as Python's round */
    if (x0 < 0) { int dd = sw - crop_w; x0 = dd / 2 + ((dd & 1) && ((dd / 2) & 1)); }
    if (y0 < 0) { int dd = sh - crop_h; y0 = dd / 2 + ((dd & 1) && ((dd / 2) & 1)); }
    if (x0 + crop_w > sw || y0 + crop_h > sh)
        return fail(err, errlen, "resize", "crop %dx%d at (%d,%d) does not fit in %dx%d", crop_w, crop_h, x0, y0, sw, sh);
    uint8_t *scaled = malloc((size_t)sw * sh * 3), *o = malloc((size_t)crop_w * crop_h * 3);
    if (!scaled || !o || image_resize(scaled, sw, sh, in->rgb, in->w, in->h, filter)) {
        free(scaled); free(o); return fail(err, errlen, "resize", "out of memory");
    }
    for (int y = 0; y < crop_h; y++)
        memcpy(o + (size_t)y * crop_w * 3, scaled + ((size_t)(y0 + y) * sw + x0) * 3, (size_t)crop_w * 3);
    free(scaled);
    out->rgb = o; out->w = crop_w; out->h = crop_h;
    return 0;
}

void image_flip_h(uint8_t *rgb, int w, int h) {
    for (int y = 0; y < h; y++) {
        uint8_t *r = rgb + (size_t)y * w * 3;
        for (int a = 0, b = w - 1; a < b; a++, b--)
            for (int c = 0; c < 3; c++) { uint8_t t = r[3 * a + c]; r[3 * a + c] = r[3 * b + c]; r[3 * b + c] = t; }
    }
}

void image_to_chw(float *chw, const uint8_t *rgb, int w, int h) {
    size_t hw = (size_t)w * h;
    for (int c = 0; c < 3; c++)
        for (size_t i = 0; i < hw; i++) chw[c * hw + i] = rgb[3 * i + c] / 127.5f - 1.0f;
}

void image_from_chw(uint8_t *rgb, const float *chw, int w, int h) {
    size_t hw = (size_t)w * h;
    for (int c = 0; c < 3; c++)
        for (size_t i = 0; i < hw; i++) {
            float v = chw[c * hw + i] / 2.0f + 0.5f;
            if (!(v >= 0.0f)) v = 0.0f;   /* NaN too */
            if (v > 1.0f) v = 1.0f;
            rgb[3 * i + c] = (uint8_t)rintf(v * 255.0f);   /* half to even, as numpy's round */
        }
}

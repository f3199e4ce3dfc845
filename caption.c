/* caption.c: kohya's per-sample caption processing (dropout, shuffle with
 * kept leading tags) and the caption statistics of a LoRA file's metadata.
 * See caption.h for the rules. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "caption.h"
#include "nn.h"

/* ---- UTF-8 ------------------------------------------------------------------ */

/* the code point at s (n bytes left) and its length; a malformed byte is
 * returned as itself, length 1 (it is then never a space and never lowered) */
static uint32_t utf8_at(const unsigned char *s, size_t n, size_t *len) {
    uint32_t c = s[0];
    int k = c < 0x80 ? 0 : (c & 0xE0) == 0xC0 ? 1 : (c & 0xF0) == 0xE0 ? 2 : (c & 0xF8) == 0xF0 ? 3 : -1;
    *len = 1;
    if (k <= 0) return c;
    if ((size_t)k >= n) return c;
    uint32_t cp = c & (0x3F >> k);
    for (int i = 1; i <= k; i++) {
        if ((s[i] & 0xC0) != 0x80) return c;
        cp = cp << 6 | (s[i] & 0x3F);
    }
    *len = (size_t)k + 1;
    return cp;
}

static size_t utf8_put(char *o, uint32_t cp) {
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    if (cp < 0x800) { o[0] = (char)(0xC0 | cp >> 6); o[1] = (char)(0x80 | (cp & 0x3F)); return 2; }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | cp >> 12); o[1] = (char)(0x80 | (cp >> 6 & 0x3F)); o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | cp >> 18); o[1] = (char)(0x80 | (cp >> 12 & 0x3F));
    o[2] = (char)(0x80 | (cp >> 6 & 0x3F)); o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Python's str.isspace(): the characters str.strip() removes by default */
static int py_space(uint32_t c) {
    return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

const char *caption_strip(const char *s, size_t n, size_t *len) {
    const unsigned char *p = (const unsigned char *)s, *e = p + n;
    size_t l;
    while (p < e && py_space(utf8_at(p, (size_t)(e - p), &l))) p += l;
    while (e > p) {
        /* the character that ends at e: back over continuation bytes */
        const unsigned char *q = e - 1;
        while (q > p && e - q < 4 && (*q & 0xC0) == 0x80) q--;
        uint32_t c = utf8_at(q, (size_t)(e - q), &l);
        if (q + l != e) { q = e - 1; c = *q; }      /* not one whole character: a lone byte */
        if (!py_space(c)) break;
        e = q;
    }
    *len = (size_t)(e - p);
    return (const char *)p;
}

/* str.lower() for ASCII, Latin-1, Greek and Cyrillic capitals; other
 * scripts' capitals are kept as they are (a departure from Python) */
static uint32_t lower_cp(uint32_t c) {
    if (c >= 'A' && c <= 'Z') return c + 32;
    if (c >= 0xC0 && c <= 0xDE && c != 0xD7) return c + 32;
    if (c >= 0x391 && c <= 0x3A9 && c != 0x3A2) return c + 32;
    if (c >= 0x410 && c <= 0x42F) return c + 32;
    if (c >= 0x400 && c <= 0x40F) return c + 80;
    return c;
}

/* ---- a growable string -------------------------------------------------------- */
typedef struct { char *s; size_t n, cap; int oom; } str_t;

static void put(str_t *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->n + n + 1 > b->cap) {
        size_t nc = b->cap ? b->cap : 64;
        while (nc < b->n + n + 1) nc *= 2;
        char *ns = realloc(b->s, nc);
        if (!ns) { b->oom = 1; free(b->s); b->s = NULL; return; }
        b->s = ns; b->cap = nc;
    }
    memcpy(b->s + b->n, s, n);
    b->n += n;
    b->s[b->n] = 0;
}
static void puts_(str_t *b, const char *s) { put(b, s, strlen(s)); }
static char *take(str_t *b) { if (b->oom) return NULL; if (!b->s) put(b, "", 0); return b->oom ? NULL : b->s; }

/* ---- per-sample processing ------------------------------------------------------ */

int caption_opts_active(const caption_opts *o) { return o && (o->shuffle || o->dropout > 0); }

/* uniform in [0, n) without modulo bias (as dataset_epoch_order draws) */
static uint64_t below(rng_t *r, uint64_t n) {
    uint64_t threshold = (0 - n) % n;
    for (;;) {
        uint64_t x = rng_u64(r);
        if (x >= threshold) return x % n;
    }
}

/* the tags of s[0..len): split at ',', each stripped; empty ones dropped
 * when drop_empty. Appended to tag/tlen from *n on (room for every comma + 1). */
static void split_tags(const char *s, size_t len, int drop_empty, const char **tag, size_t *tlen, int *n) {
    for (size_t i = 0, start = 0; i <= len; i++)
        if (i == len || s[i] == ',') {
            tag[*n] = caption_strip(s + start, i - start, &tlen[*n]);
            if (tlen[*n] || !drop_empty) (*n)++;
            start = i + 1;
        }
}

char *caption_process(const char *caption, const caption_opts *o, uint64_t seed, uint64_t sample) {
    /* one stream per (seed, sample), mixed through a splitmix64 draw */
    rng_t r;
    rng_seed(&r, seed ^ 0x63617074696f6e73ULL ^ sample * 0x9E3779B97F4A7C15ULL);   /* "captions" */
    rng_seed(&r, rng_u64(&r));
    if (o->dropout > 0) {
        double u = (double)(rng_u64(&r) >> 11) * (1.0 / 9007199254740992.0);   /* [0, 1), 53 bits */
        if (u < o->dropout) return calloc(1, 1);
    }
    if (!o->shuffle) return strdup(caption);

    size_t len = strlen(caption);
    int most = 1;
    for (size_t i = 0; i < len; i++) most += caption[i] == ',';
    const char **tag = malloc(sizeof *tag * (size_t)(most + 2));
    size_t *tlen = malloc(sizeof *tlen * (size_t)(most + 2));
    int *idx = malloc(sizeof *idx * (size_t)(most + 2));
    if (!tag || !tlen || !idx) { free(tag); free(tlen); free(idx); return NULL; }
    int n = 0, lo, hi;   /* tags [lo, hi) are shuffled */
    const char *sep = o->keep_sep && o->keep_sep[0] ? strstr(caption, o->keep_sep) : NULL;
    if (sep) {
        /* "fixed SEP flex [SEP suffix]": only flex moves; empty tags dropped */
        size_t sl = strlen(o->keep_sep);
        const char *flex = sep + sl, *sep2 = strstr(flex, o->keep_sep);
        split_tags(caption, (size_t)(sep - caption), 1, tag, tlen, &n);
        lo = n;
        split_tags(flex, sep2 ? (size_t)(sep2 - flex) : strlen(flex), 1, tag, tlen, &n);
        hi = n;
        if (sep2) split_tags(sep2 + sl, strlen(sep2 + sl), 1, tag, tlen, &n);
    } else {
        /* tags = [t.strip() for t in caption.strip().split(",")]; the first keep_tokens stay */
        size_t sl;
        const char *s = caption_strip(caption, len, &sl);
        split_tags(s, sl, 0, tag, tlen, &n);
        lo = o->keep_tokens < n ? (o->keep_tokens > 0 ? o->keep_tokens : 0) : n;
        hi = n;
    }
    /* Fisher-Yates on [lo, hi): for i = hi-1 .. lo+1, swap idx[i] with idx[j], j ~ U{lo..i} */
    for (int i = 0; i < n; i++) idx[i] = i;
    for (int i = hi - 1; i > lo; i--) {
        int j = lo + (int)below(&r, (uint64_t)(i - lo) + 1);
        int t = idx[i]; idx[i] = idx[j]; idx[j] = t;
    }
    str_t b = {0};
    for (int i = 0; i < n; i++) {
        if (i) puts_(&b, ", ");
        put(&b, tag[idx[i]], tlen[idx[i]]);
    }
    free(tag); free(tlen); free(idx);
    return take(&b);
}

/* ---- metadata --------------------------------------------------------------------- */

int caption_json_string(char **buf, size_t *len, size_t *cap, const char *s) {
    str_t b = { *buf, *len, *cap, 0 };
    put(&b, "\"", 1);
    const unsigned char *p = (const unsigned char *)s;
    size_t n = strlen(s);
    while (n) {
        size_t l;
        uint32_t c = utf8_at(p, n, &l);
        char e[16];
        if (c == '"') puts_(&b, "\\\"");
        else if (c == '\\') puts_(&b, "\\\\");
        else if (c == '\n') puts_(&b, "\\n");
        else if (c == '\r') puts_(&b, "\\r");
        else if (c == '\t') puts_(&b, "\\t");
        else if (c == '\b') puts_(&b, "\\b");
        else if (c == '\f') puts_(&b, "\\f");
        else if (c < 0x20 || (c >= 0x7F && c < 0x10000)) {   /* Python escapes all but ' ' .. '~' */
            snprintf(e, sizeof e, "\\u%04x", (unsigned)c);
            puts_(&b, e);
        }
        else if (c >= 0x10000) {   /* a UTF-16 surrogate pair, as Python writes it */
            uint32_t v = c - 0x10000;
            snprintf(e, sizeof e, "\\u%04x\\u%04x", (unsigned)(0xD800 + (v >> 10)), (unsigned)(0xDC00 + (v & 0x3FF)));
            puts_(&b, e);
        } else put(&b, (const char *)p, 1);
        p += l; n -= l;
    }
    put(&b, "\"", 1);
    *buf = b.s; *len = b.n; *cap = b.cap;
    return b.oom ? -1 : 0;
}

static void json_str(str_t *b, const char *s) {
    if (b->oom) return;
    if (caption_json_string(&b->s, &b->n, &b->cap, s)) b->oom = 1;
}

void caption_dir_key(char *out, size_t n, const char *data_dir, const char *image_path) {
    size_t rl = strlen(data_dir);
    while (rl > 1 && data_dir[rl - 1] == '/') rl--;
    /* dataset_scan's paths are the root, '/', and the path below it */
    const char *rel = image_path;
    if (strncmp(image_path, data_dir, rl) == 0) rel = image_path + rl + (rl == 1 && data_dir[0] == '/' ? 0 : 1);
    const char *slash = strchr(rel, '/');
    if (slash) { snprintf(out, n, "%.*s", (int)(slash - rel), rel); return; }
    size_t b = rl;
    while (b > 0 && data_dir[b - 1] != '/') b--;
    if (b == rl) b = 0;                           /* data_dir is "/" */
    snprintf(out, n, "%.*s", (int)(rl - b), data_dir + b);
}

typedef struct { int dir; char *tag; int seq, count; } tag_entry;

static int cmp_dir_tag(const void *a, const void *b) {
    const tag_entry *x = a, *y = b;
    if (x->dir != y->dir) return x->dir < y->dir ? -1 : 1;
    int c = strcmp(x->tag, y->tag);
    return c ? c : (x->seq > y->seq) - (x->seq < y->seq);
}
static int cmp_dir_seq(const void *a, const void *b) {
    const tag_entry *x = a, *y = b;
    if (x->dir != y->dir) return x->dir < y->dir ? -1 : 1;
    return (x->seq > y->seq) - (x->seq < y->seq);
}

/* the images' folders (caption_dir_key) in order of first appearance:
 * dir[i] for image i, names[0..*nd) */
static int image_dirs(const dataset_t *ds, const char *data_dir, int *dir, char (**names)[256], int *nd) {
    *names = malloc(sizeof **names * (size_t)(ds->n_images + 1));
    if (!*names) return -1;
    *nd = 0;
    for (int i = 0; i < ds->n_images; i++) {
        char k[256];
        caption_dir_key(k, sizeof k, data_dir, ds->path[i]);
        int d = *nd - 1;   /* images come sorted by path: the same folder is usually the last one */
        while (d >= 0 && strcmp((*names)[d], k) != 0) d--;
        if (d < 0) { d = (*nd)++; memcpy((*names)[d], k, sizeof k); }
        dir[i] = d;
    }
    return 0;
}

char *caption_tag_frequency_json(const dataset_t *ds, const char *data_dir) {
    int *dir = malloc(sizeof(int) * (size_t)(ds->n_images + 1)), nd = 0, ne = 0, cap = 0;
    char (*names)[256] = NULL;
    tag_entry *e = NULL;
    str_t b = {0};
    if (!dir || image_dirs(ds, data_dir, dir, &names, &nd)) goto oom;
    /* every tag of every caption: caption.split(","), strip, skip empty, lower */
    for (int i = 0, seq = 0; i < ds->n_images; i++) {
        const char *s = ds->caption[i];
        for (;;) {
            const char *comma = strchr(s, ',');
            size_t n = comma ? (size_t)(comma - s) : strlen(s), l;
            const char *t = caption_strip(s, n, &l);
            if (l) {
                if (ne == cap) {
                    cap = cap ? 2 * cap : 256;
                    tag_entry *ee = realloc(e, sizeof *e * (size_t)cap);
                    if (!ee) goto oom;
                    e = ee;
                }
                char *low = malloc(4 * l + 1);   /* a lowered character is never longer than 4 bytes */
                if (!low) goto oom;
                size_t o = 0, k = 0, cl;
                while (k < l) {
                    uint32_t c = utf8_at((const unsigned char *)t + k, l - k, &cl);
                    if (cl == 1 && c >= 0x80) low[o++] = t[k];   /* a malformed byte stays */
                    else o += utf8_put(low + o, lower_cp(c));
                    k += cl;
                }
                low[o] = 0;
                e[ne++] = (tag_entry){dir[i], low, seq++, 1};
            }
            if (!comma) break;
            s = comma + 1;
        }
    }
    /* count: sort by (folder, tag), merge runs (keeping the first seen) */
    if (ne) qsort(e, (size_t)ne, sizeof *e, cmp_dir_tag);
    int nu = 0;
    for (int i = 0; i < ne; i++) {
        if (nu && e[nu - 1].dir == e[i].dir && strcmp(e[nu - 1].tag, e[i].tag) == 0) { e[nu - 1].count++; free(e[i].tag); continue; }
        e[nu++] = e[i];
    }
    ne = nu;
    if (ne) qsort(e, (size_t)ne, sizeof *e, cmp_dir_seq);
    /* {"dir": {"tag": n, ...}, ...}; a folder is there even when it has no tags */
    puts_(&b, "{");
    for (int d = 0, k = 0; d < nd; d++) {
        if (d) puts_(&b, ", ");
        json_str(&b, names[d]);
        puts_(&b, ": {");
        for (int first = 1; k < ne && e[k].dir == d; k++, first = 0) {
            char num[32];
            if (!first) puts_(&b, ", ");
            json_str(&b, e[k].tag);
            snprintf(num, sizeof num, ": %d", e[k].count);
            puts_(&b, num);
        }
        puts_(&b, "}");
    }
    puts_(&b, "}");
    for (int i = 0; i < ne; i++) free(e[i].tag);
    free(e); free(dir); free(names);
    return take(&b);
oom:
    for (int i = 0; i < ne; i++) free(e[i].tag);
    free(e); free(dir); free(names); free(b.s);
    return NULL;
}

char *caption_dataset_dirs_json(const dataset_t *ds, const char *data_dir) {
    int *dir = malloc(sizeof(int) * (size_t)(ds->n_images + 1)), nd = 0;
    char (*names)[256] = NULL;
    str_t b = {0};
    if (!dir || image_dirs(ds, data_dir, dir, &names, &nd)) { free(dir); free(names); return NULL; }
    puts_(&b, "{");
    for (int d = 0; d < nd; d++) {
        int count = 0, rep = 1;
        for (int i = 0; i < ds->n_images; i++)
            if (dir[i] == d) { if (!count) rep = ds->repeats[i]; count++; }
        char num[96];
        if (d) puts_(&b, ", ");
        json_str(&b, names[d]);
        snprintf(num, sizeof num, ": {\"n_repeats\": %d, \"img_count\": %d}", rep, count);
        puts_(&b, num);
    }
    puts_(&b, "}");
    free(dir); free(names);
    return take(&b);
}

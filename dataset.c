/* dataset.c: find the training images and their captions (see dataset.h for
 * the rules, and why they are kohya's).
 *
 * Three passes:
 *   1. walk DIR: image files, files in formats we cannot decode, and the
 *      folders that hold a captions.csv; repeats come from the first-level
 *      folder name as we descend;
 *   2. parse every captions.csv into (path below DIR, caption) rows, sorted
 *      by path so an image finds its row by binary search;
 *   3. sort the images by path and give each its caption: .txt, .caption,
 *      then the closest CSV row.
 * All paths inside are relative to DIR ("" is DIR itself); only file system
 * calls and messages use DIR "/" rel. */
#include "dataset.h"
#include "nn.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define LIST_SHOW        10            /* names shown in a warning before "and N more" */
#define CAPTION_MAX_BYTES (1L << 20)   /* a caption is a line; 1 MB is surely not one */
#define CSV_MAX_BYTES    (256L << 20)

/* ---- small growable containers ------------------------------------------- */

typedef struct { char *s; size_t len, cap; int oom; } sbuf;

static void sb_vprintf(sbuf *b, const char *fmt, va_list ap) {
    if (b->oom) return;
    va_list ap2; va_copy(ap2, ap);
    int n = vsnprintf(NULL, 0, fmt, ap2);
    va_end(ap2);
    if (n < 0) { b->oom = 1; return; }
    if (b->len + (size_t)n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + (size_t)n + 1) cap *= 2;
        char *s = realloc(b->s, cap);
        if (!s) { b->oom = 1; return; }
        b->s = s; b->cap = cap;
    }
    vsnprintf(b->s + b->len, (size_t)n + 1, fmt, ap);
    b->len += (size_t)n;
}

static void sb_printf(sbuf *b, const char *fmt, ...) {
    va_list ap; va_start(ap, fmt); sb_vprintf(b, fmt, ap); va_end(ap);
}

static void sb_putc(sbuf *b, char c) { sb_printf(b, "%c", c); }

/* a list of owned strings */
typedef struct { char **v; int n, cap; } strlist;

static int sl_push(strlist *l, char *s) {    /* takes s; frees it on failure */
    if (!s) return -1;
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 16;
        char **v = realloc(l->v, (size_t)cap * sizeof *v);
        if (!v) { free(s); return -1; }
        l->v = v; l->cap = cap;
    }
    l->v[l->n++] = s;
    return 0;
}

static void sl_free(strlist *l) {
    for (int i = 0; i < l->n; i++) free(l->v[i]);
    free(l->v);
    l->v = NULL; l->n = l->cap = 0;
}

/* qsort, which must not be handed a NULL base even for 0 elements */
static void sort(void *base, size_t n, size_t size, int (*cmp)(const void *, const void *)) {
    if (n > 1) qsort(base, n, size, cmp);
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static char *dup_printf(const char *fmt, ...) {
    sbuf b = {0};
    va_list ap; va_start(ap, fmt); sb_vprintf(&b, fmt, ap); va_end(ap);
    if (b.oom) { free(b.s); return NULL; }
    if (!b.s) return calloc(1, 1);
    return b.s;
}

/* "warning: <head> a, b, c, ... and N more<tail>\n" for a list of names */
static void warn_list(sbuf *w, const char *head, const strlist *names, const char *tail) {
    sb_printf(w, "warning: %s", head);
    for (int i = 0; i < names->n && i < LIST_SHOW; i++)
        sb_printf(w, "%s%s", i ? ", " : " ", names->v[i]);
    if (names->n > LIST_SHOW) sb_printf(w, " and %d more", names->n - LIST_SHOW);
    sb_printf(w, "%s\n", tail);
}

/* ---- names ----------------------------------------------------------------- */

static int ascii_lower(int c) { return c >= 'A' && c <= 'Z' ? c + 32 : c; }

static int ends_with_ci(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    if (m > n) return 0;
    for (size_t i = 0; i < m; i++)
        if (ascii_lower((unsigned char)s[n - m + i]) != ascii_lower((unsigned char)suffix[i])) return 0;
    return 1;
}

static int eq_ci(const char *a, const char *b) {
    for (; *a && *b; a++, b++)
        if (ascii_lower((unsigned char)*a) != ascii_lower((unsigned char)*b)) return 0;
    return *a == *b;
}

static int is_image_name(const char *name) {
    return ends_with_ci(name, ".png") || ends_with_ci(name, ".jpg") || ends_with_ci(name, ".jpeg");
}

/* pictures in formats kohya (Pillow) reads but image.c does not */
static int is_unsupported_image_name(const char *name) {
    static const char *ext[] = { ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif",
                                 ".heic", ".heif", ".jxl" };
    for (size_t i = 0; i < sizeof ext / sizeof ext[0]; i++)
        if (ends_with_ci(name, ext[i])) return 1;
    return 0;
}

/* kohya's first-level folder "N_name": returns N >= 1 and *cls = "name"; 0 for
 * a folder not named that way; -1 for "0_name" (kohya skips it); -2 for N too
 * large. kohya takes int(name.split('_')[0]); we want the '_' so that a
 * folder called "2023" is not read as 2023 repeats. */
static long parse_repeats(const char *name, const char **cls) {
    const char *p = name;
    long n = 0;
    if (*p < '0' || *p > '9') return 0;
    while (*p >= '0' && *p <= '9') {
        if (n <= DATASET_MAX_REPEATS) n = 10 * n + (*p - '0');
        p++;
    }
    if (*p != '_') return 0;
    *cls = p + 1;
    if (n == 0) return -1;
    if (n > DATASET_MAX_REPEATS) return -2;
    return n;
}

/* ---- pass 1: the walk ------------------------------------------------------ */

typedef struct {
    char *rel;          /* path below DIR */
    int repeats;
    const char *cls;    /* kohya class tokens of its N_name folder, or NULL */
} image_ent;

typedef struct {
    const char *root;   /* DIR without trailing '/' ("/" stays "/") */
    char *err; size_t errlen;
    image_ent *img; int nimg, capimg;
    strlist unsupported;   /* rel paths */
    strlist csvdirs;       /* rel folders holding a captions.csv */
    strlist classes;       /* storage for the cls strings */
    strlist zero_dirs;     /* "0_name" folders skipped */
    sbuf warn;             /* walk-time warnings, emitted first */
    dev_t anc_dev[DATASET_MAX_DEPTH + 2];
    ino_t anc_ino[DATASET_MAX_DEPTH + 2];
} scan_ctx;

static void set_err(scan_ctx *c, const char *fmt, ...) {
    va_list ap; va_start(ap, fmt);
    vsnprintf(c->err, c->errlen, fmt, ap);
    va_end(ap);
}

static int oom(scan_ctx *c) { set_err(c, "%s: out of memory while scanning (free some memory)", c->root); return -1; }

/* DIR "/" rel, malloc'ed */
static char *full_path(const scan_ctx *c, const char *rel) {
    if (!rel[0]) return dup_printf("%s", c->root);
    if (strcmp(c->root, "/") == 0) return dup_printf("/%s", rel);
    return dup_printf("%s/%s", c->root, rel);
}

static char *join_rel(const char *dir, const char *name) {
    return dir[0] ? dup_printf("%s/%s", dir, name) : dup_printf("%s", name);
}

static int push_image(scan_ctx *c, char *rel, int repeats, const char *cls) {
    if (!rel) return -1;
    if (c->nimg == c->capimg) {
        int cap = c->capimg ? 2 * c->capimg : 64;
        image_ent *v = realloc(c->img, (size_t)cap * sizeof *v);
        if (!v) { free(rel); return -1; }
        c->img = v; c->capimg = cap;
    }
    c->img[c->nimg].rel = rel;
    c->img[c->nimg].repeats = repeats;
    c->img[c->nimg].cls = cls;
    c->nimg++;
    return 0;
}

static int walk(scan_ctx *c, const char *rel, int depth, int repeats, const char *cls) {
    char *dpath = full_path(c, rel);
    if (!dpath) return oom(c);
    DIR *d = opendir(dpath);
    if (!d) {
        set_err(c, "%s: cannot read the folder: %s (check that it exists and that you may read it)",
                dpath, strerror(errno));
        free(dpath);
        return -1;
    }
    /* list first, sort, then look: the order must not depend on readdir */
    strlist names = {0};
    struct dirent *e;
    int rc = 0;
    errno = 0;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;       /* hidden, ".", ".." */
        if (sl_push(&names, dup_printf("%s", e->d_name))) { rc = oom(c); break; }
        errno = 0;
    }
    if (!rc && errno) {
        set_err(c, "%s: cannot read the folder: %s (check that you may read it)", dpath, strerror(errno));
        rc = -1;
    }
    closedir(d);
    free(dpath);
    if (rc) { sl_free(&names); return rc; }
    sort(names.v, (size_t)names.n, sizeof *names.v, cmp_str);

    for (int i = 0; i < names.n && !rc; i++) {
        const char *name = names.v[i];
        char *crel = join_rel(rel, name);
        char *cfull = crel ? full_path(c, crel) : NULL;
        if (!cfull) { free(crel); rc = oom(c); break; }
        struct stat st;
        if (stat(cfull, &st) != 0) {
            /* a broken link or a file removed while we look: say so, go on */
            sb_printf(&c->warn, "warning: %s: cannot be read (%s), skipped\n", cfull, strerror(errno));
            free(crel); free(cfull);
            continue;
        }
        if (S_ISDIR(st.st_mode)) {
            int loop = 0;
            for (int k = 0; k <= depth; k++)
                if (c->anc_dev[k] == st.st_dev && c->anc_ino[k] == st.st_ino) loop = 1;
            if (loop) {
                sb_printf(&c->warn, "warning: %s: links back to a folder above it, not entered "
                          "(a symlink loop)\n", cfull);
            } else if (depth + 1 > DATASET_MAX_DEPTH) {
                sb_printf(&c->warn, "warning: %s: folders nested deeper than %d, not entered\n",
                          cfull, DATASET_MAX_DEPTH);
            } else {
                int r = repeats; const char *k = cls;
                if (depth == 0) {                   /* kohya's N_name, first level only */
                    const char *name_cls = NULL;
                    long n = parse_repeats(name, &name_cls);
                    if (n == -2) {
                        set_err(c, "%s: repeat count larger than %d (kohya folders look like 10_name; rename it)",
                                cfull, DATASET_MAX_REPEATS);
                        rc = -1;
                    } else if (n == -1) {
                        if (sl_push(&c->zero_dirs, dup_printf("%s", crel))) rc = oom(c);
                        r = 0;                      /* skipped, as kohya skips it */
                    } else if (n > 0) {
                        r = (int)n;
                        if (sl_push(&c->classes, dup_printf("%s", name_cls))) rc = oom(c);
                        else k = c->classes.v[c->classes.n - 1];
                    }
                }
                if (!rc && r > 0) {
                    c->anc_dev[depth + 1] = st.st_dev;
                    c->anc_ino[depth + 1] = st.st_ino;
                    rc = walk(c, crel, depth + 1, r, k);
                }
            }
            free(crel);
        } else if (S_ISREG(st.st_mode)) {
            if (is_image_name(name)) {
                if (push_image(c, crel, repeats, cls)) rc = oom(c);
                crel = NULL;
            } else if (is_unsupported_image_name(name)) {
                if (sl_push(&c->unsupported, crel)) rc = oom(c);
                crel = NULL;
            } else if (strcmp(name, "captions.csv") == 0) {
                if (sl_push(&c->csvdirs, dup_printf("%s", rel))) rc = oom(c);
            }
            free(crel);
        } else {
            free(crel);
        }
        free(cfull);
    }
    sl_free(&names);
    return rc;
}

/* ---- text files -------------------------------------------------------------- */

/* Whole file into memory (NUL-terminated). 1: no such file; -1: error. */
static int read_small_file(scan_ctx *c, const char *path, long maxbytes, char **out, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        if (errno == ENOENT) return 1;
        set_err(c, "%s: cannot open: %s (check that you may read it)", path, strerror(errno));
        return -1;
    }
    sbuf b = {0};
    char chunk[8192];
    size_t n, total = 0;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0) {
        total += n;
        if (total > (size_t)maxbytes) {
            fclose(f); free(b.s);
            set_err(c, "%s: larger than %ld bytes, too large for a caption file "
                    "(a caption is one line of text)", path, maxbytes);
            return -1;
        }
        if (b.len + n + 1 > b.cap) {
            size_t cap = b.cap ? b.cap : 8192;
            while (cap < b.len + n + 1) cap *= 2;
            char *s = realloc(b.s, cap);
            if (!s) { fclose(f); free(b.s); return oom(c); }
            b.s = s; b.cap = cap;
        }
        memcpy(b.s + b.len, chunk, n);
        b.len += n;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(b.s);
        set_err(c, "%s: read error (check the disk and the file)", path);
        return -1;
    }
    if (!b.s) { b.s = malloc(1); if (!b.s) return oom(c); }
    b.s[b.len] = 0;
    *out = b.s; *len = b.len;
    return 0;
}

/* Strict UTF-8 (as Python's decoder: no overlongs, no surrogates, <= U+10FFFF).
 * Returns the offset of the first bad byte, or n when all is well. */
static size_t utf8_bad_offset(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        if (c < 0x80) { i++; continue; }
        int len; unsigned lo = 0x80, hi = 0xBF;          /* range of the 2nd byte */
        if (c >= 0xC2 && c <= 0xDF) len = 2;
        else if (c == 0xE0) { len = 3; lo = 0xA0; }       /* no overlong */
        else if (c == 0xED) { len = 3; hi = 0x9F; }       /* no surrogates */
        else if (c >= 0xE1 && c <= 0xEF) len = 3;
        else if (c == 0xF0) { len = 4; lo = 0x90; }
        else if (c == 0xF4) { len = 4; hi = 0x8F; }       /* <= U+10FFFF */
        else if (c >= 0xF1 && c <= 0xF3) len = 4;
        else return i;
        if (i + (size_t)len > n) return i;
        if (s[i + 1] < lo || s[i + 1] > hi) return i;
        for (int k = 2; k < len; k++)
            if (s[i + (size_t)k] < 0x80 || s[i + (size_t)k] > 0xBF) return i;
        i += (size_t)len;
    }
    return n;
}

/* Check a text file's bytes; returns the offset past a UTF-8 BOM, or -1. */
static long text_check(scan_ctx *c, const char *path, const char *buf, size_t len) {
    const unsigned char *u = (const unsigned char *)buf;
    if (len >= 2 && ((u[0] == 0xFF && u[1] == 0xFE) || (u[0] == 0xFE && u[1] == 0xFF))) {
        set_err(c, "%s: UTF-16 text, not UTF-8 (re-save it as UTF-8)", path);
        return -1;
    }
    if (memchr(buf, 0, len)) {
        set_err(c, "%s: holds NUL bytes, not UTF-8 text (re-save it as UTF-8)", path);
        return -1;
    }
    size_t bad = utf8_bad_offset(u, len);
    if (bad < len) {
        set_err(c, "%s: not UTF-8 text, byte 0x%02X at offset %zu (re-save it as UTF-8)", path, u[bad], bad);
        return -1;
    }
    return (len >= 3 && u[0] == 0xEF && u[1] == 0xBB && u[2] == 0xBF) ? 3 : 0;
}

static int is_space(int ch) { return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' || ch == '\v' || ch == '\f'; }

/* copy s[0..n) without surrounding whitespace */
static char *trim_dup(const char *s, size_t n) {
    while (n > 0 && is_space((unsigned char)s[0])) { s++; n--; }
    while (n > 0 && is_space((unsigned char)s[n - 1])) n--;
    char *out = malloc(n + 1);
    if (!out) return NULL;
    memcpy(out, s, n);
    out[n] = 0;
    return out;
}

/* A caption file as kohya's read_caption reads it: Python's universal
 * newlines split lines at \n, \r or \r\n, and the caption is lines[0].strip().
 * Returns 0 (caption set), 1 (no such file), -1 (error). *more: the file has
 * text after its first line. */
static int read_caption_file(scan_ctx *c, const char *path, char **caption, int *more) {
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISREG(st.st_mode)) return 1;
    char *buf; size_t len;
    int rc = read_small_file(c, path, CAPTION_MAX_BYTES, &buf, &len);
    if (rc) return rc;
    long start = text_check(c, path, buf, len);
    if (start < 0) { free(buf); return -1; }
    const char *s = buf + start;
    size_t n = len - (size_t)start;
    size_t eol = 0;
    while (eol < n && s[eol] != '\n' && s[eol] != '\r') eol++;
    *more = 0;
    for (size_t i = eol; i < n; i++)
        if (!is_space((unsigned char)s[i])) { *more = 1; break; }
    *caption = trim_dup(s, eol);
    free(buf);
    if (!*caption) return oom(c);
    return 0;
}

/* ---- pass 2: captions.csv ----------------------------------------------------- */

typedef struct {
    char *key;       /* resolved path below DIR, or NULL when it points outside DIR */
    char *file;      /* as written, for messages */
    char *caption;
    int csv;         /* index into csvdirs */
    int depth;       /* folder depth of that CSV: the closest one above the image wins */
    int line;
    int used;
} csv_row;

typedef struct { csv_row *v; int n, cap; } rowlist;

/* Lexically resolve "dir/file": '\' as '/', "." dropped, ".." pops. NULL
 * when it climbs above DIR (or on out of memory: *oomp set). An absolute
 * file name is taken relative to the file system root and must lie in DIR. */
static char *resolve_key(const scan_ctx *c, const char *dir, const char *file, int *oomp) {
    char *joined;
    if (file[0] == '/' || file[0] == '\\') {
        size_t rl = strlen(c->root);
        int in_root = strcmp(c->root, "/") == 0 ||
                      (strncmp(file, c->root, rl) == 0 && (file[rl] == '/' || file[rl] == '\\'));
        if (!in_root) return NULL;
        joined = dup_printf("%s", strcmp(c->root, "/") == 0 ? file : file + rl);
    } else {
        joined = join_rel(dir, file);
    }
    if (!joined) { *oomp = 1; return NULL; }
    char *out = malloc(strlen(joined) + 1);
    if (!out) { free(joined); *oomp = 1; return NULL; }
    size_t olen = 0;
    for (char *p = joined; *p; p++) if (*p == '\\') *p = '/';
    char *seg = joined;
    int ok = 1;
    while (seg) {
        char *slash = strchr(seg, '/');
        if (slash) *slash = 0;
        if (seg[0] == 0 || strcmp(seg, ".") == 0) {
            /* nothing */
        } else if (strcmp(seg, "..") == 0) {
            if (olen == 0) { ok = 0; break; }
            while (olen > 0 && out[olen - 1] != '/') olen--;
            if (olen > 0) olen--;                     /* the '/' before it */
        } else {
            if (olen) out[olen++] = '/';
            size_t sl = strlen(seg);
            memcpy(out + olen, seg, sl);
            olen += sl;
        }
        seg = slash ? slash + 1 : NULL;
    }
    free(joined);
    if (!ok || olen == 0) { free(out); return NULL; }
    out[olen] = 0;
    return out;
}

static int push_row(rowlist *l, csv_row r) {
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 64;
        csv_row *v = realloc(l->v, (size_t)cap * sizeof *v);
        if (!v) return -1;
        l->v = v; l->cap = cap;
    }
    l->v[l->n++] = r;
    return 0;
}

static int exists_below(const scan_ctx *c, const char *key) {
    char *p = key ? full_path(c, key) : NULL;
    if (!p) return 0;
    struct stat st;
    int ok = stat(p, &st) == 0;
    free(p);
    return ok;
}

static int is_header_name(const char *f) {
    static const char *names[] = { "file", "filename", "file_name", "filepath", "file_path",
        "image", "images", "image_file", "image_name", "image_path", "img", "path", "name" };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (eq_ci(f, names[i])) return 1;
    return 0;
}

/* One record's fields -> a row (or a header / blank line skipped). */
static int csv_record(scan_ctx *c, rowlist *rows, int csv, const char *csvrel,
                      strlist *fields, int line, int first) {
    const char *dir = c->csvdirs.v[csv];
    char *file = trim_dup(fields->v[0], strlen(fields->v[0]));
    if (!file) return oom(c);
    if (fields->n == 1 && !file[0]) { free(file); return 0; }       /* blank line */
    int oomf = 0;
    char *key = file[0] ? resolve_key(c, dir, file, &oomf) : NULL;
    if (oomf) { free(file); return oom(c); }
    if (first && (is_header_name(file) ||
                  (!exists_below(c, key) && !is_image_name(file) && !is_unsupported_image_name(file)))) {
        free(file); free(key);
        return 0;                                                    /* header row */
    }
    if (!file[0]) {
        sb_printf(&c->warn, "warning: %s:%d: no file name before the first comma, row ignored\n",
                  csvrel, line);
        free(file); free(key);
        return 0;
    }
    /* caption = fields 1.. joined by ',' (unquoted commas stay in the caption);
     * newlines inside quotes become spaces */
    sbuf cap = {0};
    sb_printf(&cap, "%s", "");
    for (int i = 1; i < fields->n; i++) {
        if (i > 1) sb_putc(&cap, ',');
        for (const char *p = fields->v[i]; *p; p++) {
            if (*p == '\r' && p[1] == '\n') continue;
            sb_putc(&cap, (*p == '\n' || *p == '\r') ? ' ' : *p);
        }
    }
    if (fields->n == 1)
        sb_printf(&c->warn, "warning: %s:%d: %s has no caption column (no comma after the file name), "
                  "so its caption is empty\n", csvrel, line, file);
    char *caption = cap.oom ? NULL : trim_dup(cap.s, cap.len);
    free(cap.s);
    int depth = 0;
    for (const char *p = dir; *p; p++) depth += *p == '/';
    if (dir[0]) depth++;
    csv_row r = { key, file, caption, csv, depth, line, 0 };
    if (!caption || push_row(rows, r)) { free(key); free(file); free(caption); return oom(c); }
    return 0;
}

/* RFC 4180 reader: fields split at ',', records at LF / CRLF / CR; a field
 * opening with '"' runs to the next lone '"', with "" meaning one quote. */
static int csv_parse(scan_ctx *c, rowlist *rows, int csv) {
    char *rel = join_rel(c->csvdirs.v[csv], "captions.csv");
    char *path = rel ? full_path(c, rel) : NULL;
    if (!path) { free(rel); return oom(c); }
    char *buf; size_t len;
    int rc = read_small_file(c, path, CSV_MAX_BYTES, &buf, &len);
    if (rc == 1) {                               /* vanished since the walk */
        set_err(c, "%s: cannot open: %s (check that you may read it)", path, strerror(ENOENT));
        rc = -1;
    }
    if (rc) { free(path); free(rel); return rc; }
    long start = text_check(c, path, buf, len);
    if (start < 0) { free(buf); free(path); free(rel); return -1; }

    const char *s = buf;
    size_t n = len, pos = (size_t)start;
    int line = 1, first = 1;
    strlist fields = {0};
    sbuf f = {0};
    while (pos < n && !rc) {
        int rec_line = line;
        for (;;) {                                          /* one field */
            f.len = 0;
            sb_printf(&f, "%s", "");
            if (pos < n && s[pos] == '"') {
                int qline = line;
                pos++;
                for (;;) {
                    if (pos >= n) {
                        set_err(c, "%s:%d: a quote opened here is never closed "
                                "(close the caption with \" and write a quote inside it as \"\")",
                                path, qline);
                        rc = -1;
                        break;
                    }
                    if (s[pos] == '"') {
                        if (pos + 1 < n && s[pos + 1] == '"') { sb_putc(&f, '"'); pos += 2; continue; }
                        pos++;
                        break;
                    }
                    if (s[pos] == '\n' || (s[pos] == '\r' && !(pos + 1 < n && s[pos + 1] == '\n'))) line++;
                    sb_putc(&f, s[pos++]);
                }
                if (rc) break;
            }
            /* unquoted text (or stray text after a closing quote: kept, leniently) */
            while (pos < n && s[pos] != ',' && s[pos] != '\n' && s[pos] != '\r') sb_putc(&f, s[pos++]);
            if (f.oom || sl_push(&fields, dup_printf("%s", f.s))) { rc = oom(c); break; }
            if (pos < n && s[pos] == ',') { pos++; continue; }
            break;
        }
        if (rc) break;
        if (pos < n && s[pos] == '\r') pos++;
        if (pos < n && s[pos] == '\n') pos++;
        line++;
        int was_blank = fields.n == 1;
        for (const char *q = fields.v[0]; *q && was_blank; q++) was_blank = is_space((unsigned char)*q);
        rc = csv_record(c, rows, csv, rel, &fields, rec_line, first);
        if (!was_blank) first = 0;
        sl_free(&fields);
    }
    sl_free(&fields);
    free(f.s);
    free(buf);
    free(path);
    free(rel);
    return rc;
}

/* rows by key, then CSV, then file order */
static int cmp_row(const void *a, const void *b) {
    const csv_row *x = a, *y = b;
    int k = strcmp(x->key, y->key);
    if (k) return k;
    if (x->csv != y->csv) return x->csv - y->csv;
    return x->line - y->line;
}

/* is folder dir (rel, "" = DIR) an ancestor of (or the folder of) file rel? */
static int is_ancestor(const char *dir, const char *rel) {
    size_t n = strlen(dir);
    return n == 0 || (strncmp(dir, rel, n) == 0 && rel[n] == '/');
}

/* first row whose key equals key, or -1 */
static int find_row(const rowlist *rows, int nkeyed, const char *key) {
    int lo = 0, hi = nkeyed;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        if (strcmp(rows->v[mid].key, key) < 0) lo = mid + 1; else hi = mid;
    }
    return lo < nkeyed && strcmp(rows->v[lo].key, key) == 0 ? lo : -1;
}

static int cmp_image(const void *a, const void *b) {
    return strcmp(((const image_ent *)a)->rel, ((const image_ent *)b)->rel);
}

/* ---- pass 3 and the whole scan --------------------------------------------- */

void dataset_free(dataset_t *ds) {
    for (int i = 0; i < ds->n_images; i++) {
        free(ds->path[i]);
        free(ds->caption[i]);
    }
    free(ds->path); free(ds->caption); free(ds->repeats); free(ds->warnings);
    int policy = ds->uncaptioned;
    const char *ext = ds->caption_ext;
    memset(ds, 0, sizeof *ds);
    ds->uncaptioned = policy;
    ds->caption_ext = ext;
}

/* rel with its extension replaced */
static char *sibling(const scan_ctx *c, const char *rel, const char *ext) {
    const char *dot = strrchr(rel, '.');
    int base = (int)(dot ? (size_t)(dot - rel) : strlen(rel));
    char *r = dup_printf("%.*s%s", base, rel, ext);
    char *p = r ? full_path(c, r) : NULL;
    free(r);
    return p;
}

int dataset_scan(dataset_t *ds, const char *dir, char *err, size_t errlen) {
    int policy = ds->uncaptioned;
    const char *only_ext = ds->caption_ext;
    memset(ds, 0, sizeof *ds);
    ds->uncaptioned = policy;
    ds->caption_ext = only_ext;
    if (err && errlen) err[0] = 0;
    char dummy[8];
    if (!err || !errlen) { err = dummy; errlen = sizeof dummy; }

    struct stat st;
    if (!dir || !dir[0]) { snprintf(err, errlen, "no data folder given (give the folder that holds your images)"); return -1; }
    if (stat(dir, &st) != 0) {
        snprintf(err, errlen, "%s: %s (check the path to your image folder)", dir,
                 errno == ENOENT ? "no such folder" : strerror(errno));
        return -1;
    }
    if (!S_ISDIR(st.st_mode)) {
        snprintf(err, errlen, "%s: not a folder (give the folder that holds your images and captions)", dir);
        return -1;
    }
    if (policy < DATASET_UNCAPTIONED_KOHYA || policy > DATASET_UNCAPTIONED_DROP) {
        snprintf(err, errlen, "dataset: unknown uncaptioned-image policy %d (use DATASET_UNCAPTIONED_*)", policy);
        return -1;
    }

    scan_ctx c;
    memset(&c, 0, sizeof c);
    char *root = dup_printf("%s", dir);
    if (!root) { snprintf(err, errlen, "%s: out of memory", dir); return -1; }
    size_t rl = strlen(root);
    while (rl > 1 && root[rl - 1] == '/') root[--rl] = 0;
    c.root = root; c.err = err; c.errlen = errlen;
    c.anc_dev[0] = st.st_dev; c.anc_ino[0] = st.st_ino;

    rowlist rows = {0};
    strlist unc = {0}, empty = {0}, multi = {0}, both = {0}, missing = {0}, dups = {0};
    sbuf w = {0};
    char **cap_of = NULL;           /* caption per walked image, NULL = none */
    int other_ext[2] = {0, 0};      /* uncaptioned images with a .txt / .caption beside them */
    int rc = walk(&c, "", 0, 1, NULL);

    /* pass 2 */
    for (int i = 0; i < c.csvdirs.n && !rc; i++) rc = csv_parse(&c, &rows, i);
    int nkeyed = 0;
    if (!rc) {
        /* rows pointing outside DIR have no key: move them to the end */
        for (int i = 0; i < rows.n; i++)
            if (rows.v[i].key) { csv_row t = rows.v[nkeyed]; rows.v[nkeyed] = rows.v[i]; rows.v[i] = t; nkeyed++; }
        sort(rows.v, (size_t)nkeyed, sizeof *rows.v, cmp_row);
        for (int i = 1; i < nkeyed && !rc; i++) {
            const csv_row *a = &rows.v[i - 1], *b = &rows.v[i];
            if (strcmp(a->key, b->key) == 0 && a->csv == b->csv) {
                char *p = join_rel(c.csvdirs.v[b->csv], "captions.csv");
                if (sl_push(&dups, dup_printf("%s:%d %s (first at line %d)", p ? p : "?", b->line, b->file, a->line))) rc = oom(&c);
                free(p);
            }
        }
    }

    /* pass 3 */
    if (!rc) {
        sort(c.img, (size_t)c.nimg, sizeof *c.img, cmp_image);
        cap_of = calloc((size_t)c.nimg + 1, sizeof *cap_of);
        if (!cap_of) rc = oom(&c);
    }
    int nkeep = 0;
    for (int i = 0; i < c.nimg && !rc; i++) {
        const char *rel = c.img[i].rel;
        char *cap = NULL;
        int more = 0, got = 1, from_file = 0;
        static const char *both_exts[2] = { ".txt", ".caption" };
        const char *const *exts = only_ext ? &only_ext : both_exts;
        int next = only_ext ? 1 : 2;
        for (int k = 0; k < next && got == 1; k++) {
            char *p = sibling(&c, rel, exts[k]);
            if (!p) { rc = oom(&c); break; }
            got = read_caption_file(&c, p, &cap, &more);
            if (got == 0 && more) {
                const char *shown = p + strlen(c.root) + (strcmp(c.root, "/") ? 1 : 0);
                if (sl_push(&multi, dup_printf("%s", shown))) rc = oom(&c);
            }
            free(p);
            if (got < 0) rc = -1;
        }
        if (rc) { free(cap); break; }
        from_file = got == 0;
        int r = find_row(&rows, nkeyed, rel);
        if (r >= 0) {
            /* several CSVs may name it: the deepest one in a folder above the
             * image wins; a row reaching in with ".." only when none does */
            int best = r, best_depth = -1;
            for (int j = r; j < nkeyed && strcmp(rows.v[j].key, rel) == 0; j++) {
                rows.v[j].used = 1;
                const csv_row *x = &rows.v[j];
                if (is_ancestor(c.csvdirs.v[x->csv], rel) && x->depth > best_depth) { best = j; best_depth = x->depth; }
            }
            r = best;
            if (from_file) {
                if (sl_push(&both, dup_printf("%s", rel))) rc = oom(&c);
            } else {
                cap = dup_printf("%s", rows.v[r].caption);
                if (!cap) rc = oom(&c);
                got = 0;
            }
        }
        if (rc) { free(cap); break; }
        if (got == 0) {
            if (!cap[0] && sl_push(&empty, dup_printf("%s", rel))) rc = oom(&c);
            cap_of[i] = cap;
            nkeep++;
        } else {
            if (sl_push(&unc, dup_printf("%s", rel))) { rc = oom(&c); break; }
            /* --caption-ext: does it have a caption file of the other usual kind? */
            for (int k = 0; only_ext && k < 2; k++) {
                if (strcmp(both_exts[k], only_ext) == 0) continue;
                char *p = sibling(&c, rel, both_exts[k]);
                struct stat sb;
                if (!p) { rc = oom(&c); break; }
                if (stat(p, &sb) == 0 && S_ISREG(sb.st_mode)) other_ext[k]++;
                free(p);
            }
            if (rc) break;
            if (policy != DATASET_UNCAPTIONED_DROP) {
                const char *k = policy == DATASET_UNCAPTIONED_KOHYA && c.img[i].cls ? c.img[i].cls : "";
                cap_of[i] = dup_printf("%s", k);
                if (!cap_of[i]) { rc = oom(&c); break; }
                nkeep++;
            }
        }
    }

    /* CSV rows naming files that are not there */
    for (int i = 0; i < rows.n && !rc; i++) {
        const csv_row *r = &rows.v[i];
        if (r->used || (r->key && exists_below(&c, r->key))) continue;
        char *p = join_rel(c.csvdirs.v[r->csv], "captions.csv");
        if (sl_push(&missing, dup_printf("%s:%d %s%s", p ? p : "?", r->line, r->file,
                                         r->key ? "" : " (outside the data folder)"))) rc = oom(&c);
        free(p);
    }

    if (!rc && nkeep == 0) {
        if (c.nimg > 0)
            set_err(&c, "%s: none of the %d images has a caption and uncaptioned images are dropped "
                    "(add a .txt caption beside each image, or keep uncaptioned images)", c.root, c.nimg);
        else if (c.unsupported.n > 0)
            set_err(&c, "%s: no PNG or JPEG images, only %d in formats that cannot be read, e.g. %s "
                    "(convert them to PNG or JPEG)", c.root, c.unsupported.n, c.unsupported.v[0]);
        else if (c.zero_dirs.n > 0)
            set_err(&c, "%s: no PNG or JPEG images outside folders with 0 repeats such as %s "
                    "(rename it to 1_name to train its images)", c.root, c.zero_dirs.v[0]);
        else
            set_err(&c, "%s: no PNG or JPEG images found (put your pictures there, with a .txt caption "
                    "beside each)", c.root);
        rc = -1;
    }

    /* the dataset */
    long long total = 0;
    if (!rc) {
        ds->path = calloc((size_t)nkeep, sizeof *ds->path);
        ds->caption = calloc((size_t)nkeep, sizeof *ds->caption);
        ds->repeats = calloc((size_t)nkeep, sizeof *ds->repeats);
        if (!ds->path || !ds->caption || !ds->repeats) rc = oom(&c);
    }
    for (int i = 0; i < c.nimg && !rc; i++) {
        if (!cap_of[i]) continue;
        int j = ds->n_images;
        ds->path[j] = full_path(&c, c.img[i].rel);
        if (!ds->path[j]) { rc = oom(&c); break; }
        ds->caption[j] = cap_of[i];
        cap_of[i] = NULL;
        ds->repeats[j] = c.img[i].repeats;
        ds->n_images++;
        total += c.img[i].repeats;
        if (total > INT_MAX) {
            set_err(&c, "%s: more than %d samples per epoch with repeats (use smaller N in the N_name folders)",
                    c.root, INT_MAX);
            rc = -1;
        }
    }

    /* warnings, most important first */
    if (!rc) {
        ds->n_uncaptioned = unc.n;
        ds->n_empty_caption = empty.n;
        ds->n_total_with_repeats = (int)total;
        sort(c.unsupported.v, (size_t)c.unsupported.n, sizeof(char *), cmp_str);
        if (c.unsupported.n) {
            char head[160];
            snprintf(head, sizeof head, "%d image%s skipped because the format is not supported "
                     "(only PNG and JPEG are):", c.unsupported.n, c.unsupported.n == 1 ? " is" : "s are");
            warn_list(&w, head, &c.unsupported, " (convert them to PNG or JPEG)");
        }
        for (int i = 0; i < c.zero_dirs.n; i++)
            sb_printf(&w, "warning: %s: 0 repeats, its images are skipped as kohya skips them "
                      "(rename it to 1_name to train them)\n", c.zero_dirs.v[i]);
        if (c.warn.s) sb_printf(&w, "%s", c.warn.s);
        if (unc.n) {
            char head[160];
            snprintf(head, sizeof head, "%d image%s no caption (no %s or captions.csv row):",
                     unc.n, unc.n == 1 ? " has" : "s have", only_ext ? only_ext : ".txt, .caption");
            const char *tail =
                policy == DATASET_UNCAPTIONED_DROP ? "; they are left out (add a .txt caption beside each)" :
                policy == DATASET_UNCAPTIONED_EMPTY ? "; they are trained with an empty caption (add a .txt caption beside each)" :
                "; they are trained with their N_name folder's name as caption, or an empty one, "
                "as kohya does (add a .txt caption beside each)";
            warn_list(&w, head, &unc, tail);
            for (int k = 0; k < 2; k++)
                if (other_ext[k])
                    sb_printf(&w, "warning: %d of them ha%s a %s file beside it, which --caption-ext %s does not read "
                              "(use --caption-ext %s)\n", other_ext[k], other_ext[k] == 1 ? "s" : "ve",
                              k ? ".caption" : ".txt", only_ext, k ? ".caption" : ".txt");
        }
        if (empty.n) {
            char head[96];
            snprintf(head, sizeof head, "%d image%s an empty caption:", empty.n, empty.n == 1 ? " has" : "s have");
            warn_list(&w, head, &empty, " (trained unconditioned; write a caption if that is not meant)");
        }
        if (multi.n) {
            char head[160];
            snprintf(head, sizeof head, "%d caption file%s more than one line; only the first line is used, "
                     "as kohya does:", multi.n, multi.n == 1 ? " has" : "s have");
            warn_list(&w, head, &multi, " (put the whole caption on the first line)");
        }
        if (both.n) {
            char head[160];
            snprintf(head, sizeof head, "%d image%s both a caption file and a captions.csv row; "
                     "the .txt/.caption file is used:", both.n, both.n == 1 ? " has" : "s have");
            warn_list(&w, head, &both, "");
        }
        if (missing.n) {
            char head[96];
            snprintf(head, sizeof head, "captions.csv names %d file%s that do%s not exist:",
                     missing.n, missing.n == 1 ? "" : "s", missing.n == 1 ? "es" : "");
            warn_list(&w, head, &missing, " (fix the file names or remove those rows)");
        }
        if (dups.n) {
            char head[96];
            snprintf(head, sizeof head, "captions.csv lists %d file%s twice; the first row is used:",
                     dups.n, dups.n == 1 ? "" : "s");
            warn_list(&w, head, &dups, "");
        }
        if (w.oom) rc = oom(&c);
        else {
            ds->warnings = w.s ? w.s : calloc(1, 1);
            w.s = NULL;
            if (!ds->warnings) rc = oom(&c);
        }
    }

    if (rc) dataset_free(ds);
    for (int i = 0; i < c.nimg; i++) { free(c.img[i].rel); if (cap_of) free(cap_of[i]); }
    free(cap_of);
    free(c.img);
    for (int i = 0; i < rows.n; i++) { free(rows.v[i].key); free(rows.v[i].file); free(rows.v[i].caption); }
    free(rows.v);
    sl_free(&c.unsupported); sl_free(&c.csvdirs); sl_free(&c.classes); sl_free(&c.zero_dirs);
    sl_free(&unc); sl_free(&empty); sl_free(&multi); sl_free(&both); sl_free(&missing); sl_free(&dups);
    free(c.warn.s); free(w.s);
    free(root);
    return rc ? -1 : 0;
}

/* ---- epoch order ------------------------------------------------------------- */

/* uniform integer in [0, n): reject the lowest 2^64 mod n values so every
 * residue is hit equally often (x % n alone favours small residues) */
static uint64_t below(rng_t *r, uint64_t n) {
    uint64_t threshold = (0 - n) % n;     /* = 2^64 mod n */
    for (;;) {
        uint64_t x = rng_u64(r);
        if (x >= threshold) return x % n;
    }
}

void dataset_epoch_order(const dataset_t *ds, uint64_t seed, int epoch, int *order) {
    int n = 0;
    for (int i = 0; i < ds->n_images; i++)
        for (int k = 0; k < ds->repeats[i]; k++) order[n++] = i;
    /* one stream per (seed, epoch): the epoch is mixed in through one
     * splitmix64 draw so nearby seeds / epochs give unrelated streams */
    rng_t r;
    rng_seed(&r, seed ^ ((uint64_t)(uint32_t)epoch * 0xD1B54A32D192ED03ULL));
    rng_seed(&r, rng_u64(&r));
    /* Fisher-Yates: for i = n-1 .. 1, swap order[i] with order[j], j ~ U{0..i} */
    for (int i = n - 1; i > 0; i--) {
        int j = (int)below(&r, (uint64_t)i + 1);
        int t = order[i]; order[i] = order[j]; order[j] = t;
    }
}

/* ---- regularisation images --------------------------------------------------- */

int dataset_balance_reg(dataset_t *reg, long n_train) {
    long n = 0;
    int used = 0;
    /* first pass: whole images with their own repeats, until n_train is reached */
    while (used < reg->n_images && n < n_train) n += reg->repeats[used++];
    for (int i = used; i < reg->n_images; i++) { free(reg->path[i]); free(reg->caption[i]); }
    reg->n_images = used;
    /* later passes: one more repeat each, in turn, until n_train */
    for (int i = 0; n < n_train && used > 0; i = (i + 1) % used, n++) reg->repeats[i]++;
    reg->n_total_with_repeats = (int)n;
    return used;
}

int dataset_add_reg(dataset_t *ds, dataset_t *reg, char *err, size_t errlen) {
    int n = ds->n_images + reg->n_images;
    if ((long long)ds->n_total_with_repeats + reg->n_total_with_repeats > INT_MAX) {
        snprintf(err, errlen, "regularisation images: more than %d samples per epoch (use fewer repeats)", INT_MAX);
        return -1;
    }
    char **p = realloc(ds->path, sizeof(char *) * (size_t)n);
    if (p) ds->path = p;
    char **c = realloc(ds->caption, sizeof(char *) * (size_t)n);
    if (c) ds->caption = c;
    int *r = realloc(ds->repeats, sizeof(int) * (size_t)n);
    if (r) ds->repeats = r;
    size_t wl = strlen(ds->warnings), rl = strlen(reg->warnings);
    char *w = realloc(ds->warnings, wl + rl + 1);
    if (w) ds->warnings = w;
    if (!p || !c || !r || !w) { snprintf(err, errlen, "out of memory for the regularisation images"); return -1; }
    memcpy(ds->warnings + wl, reg->warnings, rl + 1);
    for (int i = 0; i < reg->n_images; i++) {
        ds->path[ds->n_images + i] = reg->path[i];
        ds->caption[ds->n_images + i] = reg->caption[i];
        ds->repeats[ds->n_images + i] = reg->repeats[i];
    }
    ds->n_images = n;
    ds->n_reg += reg->n_images;
    ds->n_total_with_repeats += reg->n_total_with_repeats;
    reg->n_images = 0;                       /* the strings now belong to ds */
    dataset_free(reg);
    return 0;
}

void dataset_loss_weights(const dataset_t *ds, const int *items, int n, float prior, float *w) {
    for (int k = 0; k < n; k++)
        if (items[k] >= ds->n_images - ds->n_reg) w[k] *= prior;
}

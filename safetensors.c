/* safetensors.c: read (mmap) and write .safetensors files.
 *
 * File layout: u64 little-endian N | N bytes of JSON header | tensor bytes.
 * The header maps each tensor name to {"dtype", "shape", "data_offsets":
 * [begin, end]} with offsets relative to the start of the tensor bytes.
 *
 * Nothing in the file is trusted: every length, offset and shape is checked
 * before a pointer is formed, so a truncated or corrupt file gives a one-line
 * error instead of a crash. Tensor data may sit at any byte offset, so it is
 * always read with memcpy / byte loads, never through a cast pointer. */
/* madvise(MADV_DONTNEED) (st_release) is not POSIX: ask the C library for it */
#ifndef _DEFAULT_SOURCE
#define _DEFAULT_SOURCE
#endif
#include "safetensors.h"
#include "half.h"
#include "json.h"
#include "sha256.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define ST_MAX_HEADER (100u * 1024u * 1024u)   /* the Python library's limit too */

/* ---- dtypes ------------------------------------------------------------- */

static const char *dtype_names[] = { "F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL" };
static const size_t dtype_sizes[] = { 4, 2, 2, 8, 8, 4, 2, 1, 1, 1 };
#define ST_NDTYPES ((int)(sizeof dtype_sizes / sizeof dtype_sizes[0]))

size_t st_dtype_size(st_dtype dt) {
    return (int)dt >= 0 && (int)dt < ST_NDTYPES ? dtype_sizes[dt] : 0;
}

const char *st_dtype_name(st_dtype dt) {
    return (int)dt >= 0 && (int)dt < ST_NDTYPES ? dtype_names[dt] : "?";
}

static int dtype_parse(const char *s, st_dtype *dt) {
    for (int i = 0; i < ST_NDTYPES; i++)
        if (strcmp(s, dtype_names[i]) == 0) { *dt = (st_dtype)i; return 0; }
    return -1;
}

/* ---- errors ------------------------------------------------------------- */

/* err = "<path>: <why> (<fix>)"; always returns -1 */
static int st_fail(char *err, const char *path, const char *fix, const char *fmt, ...) {
    if (!err) return -1;
    /* a very long path or name is cut off at ST_ERR_LEN; the result is still one line */
    size_t k = (size_t)snprintf(err, ST_ERR_LEN, "%s: ", path);
    if (k < ST_ERR_LEN) {
        va_list ap;
        va_start(ap, fmt);
        k += (size_t)vsnprintf(err + k, ST_ERR_LEN - k, fmt, ap);
        va_end(ap);
    }
    if (k < ST_ERR_LEN) snprintf(err + k, ST_ERR_LEN - k, " (%s)", fix);
    /* names come from the file and may hold control bytes: keep one line */
    for (char *c = err; *c; c++) if ((unsigned char)*c < 0x20 || *c == 0x7f) *c = '?';
    return -1;
}

static const char *FIX_REDOWNLOAD = "re-download or re-save the file";

/* "[320, 4, 3, 3]" */
static void shape_str(char *buf, size_t n, int ndim, const int64_t *shape) {
    size_t k = 0;
    k += (size_t)snprintf(buf, n, "[");
    for (int i = 0; i < ndim && k < n; i++)
        k += (size_t)snprintf(buf + k, n - k, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (k < n) snprintf(buf + k, n - k, "]");
}

/* a JSON number that is an exact non-negative integer below 2^53 */
static int json_uint(const json *v, uint64_t *out) {
    if (!v || v->type != JSON_NUMBER) return -1;
    double d = v->number;
    if (!(d >= 0 && d <= 9007199254740992.0) || d != floor(d)) return -1;
    *out = (uint64_t)d;
    return 0;
}

/* ---- reading -------------------------------------------------------------- */

static int cmp_tensor_name(const void *a, const void *b) {
    return strcmp(((const st_tensor *)a)->name, ((const st_tensor *)b)->name);
}

typedef struct { uint64_t begin, end; int idx; } span;

static int cmp_span(const void *a, const void *b) {
    const span *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

/* the whole file into memory: mmap, or read() where mmap is not possible */
static int load_file(st_file *f, const char *path, char *err) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return st_fail(err, path, "check the path", "cannot open: %s", strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int e = errno; close(fd);
        return st_fail(err, path, "check the path", "cannot stat: %s", strerror(e));
    }
    if (!S_ISREG(sb.st_mode)) { close(fd); return st_fail(err, path, "give the path of a .safetensors file", "not a regular file"); }
    if (sb.st_size < 8) {
        close(fd);
        return st_fail(err, path, FIX_REDOWNLOAD, "file is %lld bytes, too short for a safetensors header",
                       (long long)sb.st_size);
    }
    if ((unsigned long long)sb.st_size > (unsigned long long)SIZE_MAX) {
        close(fd); return st_fail(err, path, "use a 64-bit build", "file too large to map");
    }
    f->size = (size_t)sb.st_size;
    void *m = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (m != MAP_FAILED) {
        f->map = m; f->mapped = 1;
    } else {
        uint8_t *buf = malloc(f->size);
        if (!buf) { close(fd); return st_fail(err, path, "free some memory", "out of memory reading %zu bytes", f->size); }
        size_t got = 0;
        while (got < f->size) {
            ssize_t r = read(fd, buf + got, f->size - got);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) {
                int e = r < 0 ? errno : 0;
                free(buf); close(fd);
                return st_fail(err, path, FIX_REDOWNLOAD, "read failed after %zu of %zu bytes: %s", got, f->size,
                               e ? strerror(e) : "unexpected end of file");
            }
            got += (size_t)r;
        }
        f->map = buf; f->mapped = 0;
    }
    close(fd);
    return 0;
}

/* Fill f->tensors / meta from the parsed header. data is the tensor byte
 * section (dsize bytes); hdr_end is its offset in the file (for messages). */
static int read_header(st_file *f, const json *h, const uint8_t *data, size_t dsize, char *err) {
    const char *path = f->path;
    if (h->type != JSON_OBJECT)
        return st_fail(err, path, FIX_REDOWNLOAD, "header is JSON but not an object");
    f->tensors = calloc((size_t)h->n + 1, sizeof *f->tensors);
    if (!f->tensors) return st_fail(err, path, "free some memory", "out of memory");
    for (int i = 0; i < h->n; i++) {
        const char *name = h->keys[i];
        const json *e = &h->items[i];
        if (strcmp(name, "__metadata__") == 0) {
            if (e->type != JSON_OBJECT)
                return st_fail(err, path, FIX_REDOWNLOAD, "__metadata__ is not an object of strings");
            /* json_parse refuses a repeated key; this guards the arrays below */
            if (f->meta_keys)
                return st_fail(err, path, FIX_REDOWNLOAD, "__metadata__ appears twice in the header");
            f->meta_keys = calloc((size_t)e->n + 1, sizeof(char *));
            f->meta_vals = calloc((size_t)e->n + 1, sizeof(char *));
            if (!f->meta_keys || !f->meta_vals) return st_fail(err, path, "free some memory", "out of memory");
            for (int k = 0; k < e->n; k++) {
                /* the format only has string values; others are skipped */
                if (e->items[k].type != JSON_STRING) continue;
                char *key = strdup(e->keys[k]), *val = strdup(e->items[k].string);
                if (!key || !val) { free(key); free(val); return st_fail(err, path, "free some memory", "out of memory"); }
                f->meta_keys[f->nmeta] = key;
                f->meta_vals[f->nmeta] = val;
                f->nmeta++;
            }
            continue;
        }
        if (e->type != JSON_OBJECT)
            return st_fail(err, path, FIX_REDOWNLOAD, "header entry '%s' is not an object", name);
        const json *jd = json_get(e, "dtype"), *js = json_get(e, "shape"), *jo = json_get(e, "data_offsets");
        if (!jd || !js || !jo)
            return st_fail(err, path, FIX_REDOWNLOAD, "tensor '%s' has no %s", name,
                           !jd ? "dtype" : !js ? "shape" : "data_offsets");
        st_tensor *t = &f->tensors[f->ntensors];
        if (jd->type != JSON_STRING || dtype_parse(jd->string, &t->dtype))
            return st_fail(err, path, "convert it to F32, F16 or BF16 with the Python safetensors library",
                           "tensor '%s' has unknown dtype %s", name, jd->type == JSON_STRING ? jd->string : "(not a string)");
        if (js->type != JSON_ARRAY || js->n > ST_MAX_DIMS)
            return st_fail(err, path, FIX_REDOWNLOAD, "tensor '%s': shape is not an array of at most %d sizes",
                           name, ST_MAX_DIMS);
        t->ndim = js->n;
        /* numel = prod(shape), nbytes = numel * dtype size, each step overflow-checked */
        size_t numel = 1;
        int overflow = 0;
        for (int d = 0; d < js->n; d++) {
            uint64_t v;
            if (json_uint(&js->items[d], &v))
                return st_fail(err, path, FIX_REDOWNLOAD, "tensor '%s': shape[%d] is not a non-negative integer", name, d);
            t->shape[d] = (int64_t)v;
            if (v > SIZE_MAX) overflow = 1;
            else if (v != 0 && numel > SIZE_MAX / (size_t)v) overflow = 1;
            else numel *= (size_t)v;
        }
        size_t dsz = dtype_sizes[t->dtype];
        for (int d = 0; d < js->n; d++) if (t->shape[d] == 0) { overflow = 0; numel = 0; }
        if (overflow || numel > SIZE_MAX / dsz)
            return st_fail(err, path, FIX_REDOWNLOAD, "tensor '%s': shape is too large", name);
        t->numel = numel;
        t->nbytes = numel * dsz;
        uint64_t b, en;
        if (jo->type != JSON_ARRAY || jo->n != 2 || json_uint(&jo->items[0], &b) || json_uint(&jo->items[1], &en))
            return st_fail(err, path, FIX_REDOWNLOAD, "tensor '%s': data_offsets is not two non-negative integers", name);
        if (b > en)
            return st_fail(err, path, FIX_REDOWNLOAD, "tensor '%s': data_offsets [%llu, %llu] begin after they end",
                           name, (unsigned long long)b, (unsigned long long)en);
        if (en > dsize)
            return st_fail(err, path, FIX_REDOWNLOAD, "truncated: tensor '%s' ends at byte %llu but the file has %zu",
                           name, (unsigned long long)(en + (f->size - dsize)), f->size);
        if (en - b != t->nbytes) {
            char sh[256];
            shape_str(sh, sizeof sh, t->ndim, t->shape);
            return st_fail(err, path, FIX_REDOWNLOAD,
                           "tensor '%s' has %llu bytes but dtype %s and shape %s need %zu",
                           name, (unsigned long long)(en - b), dtype_names[t->dtype], sh, t->nbytes);
        }
        t->name = strdup(name);
        if (!t->name) return st_fail(err, path, "free some memory", "out of memory");
        t->data = data + b;
        f->ntensors++;
    }
    int n = f->ntensors;
    /* no two tensors may share bytes: sort by offset, each begins after the
     * previous one ends (empty tensors take no bytes) */
    span *sp = malloc(((size_t)n + 1) * sizeof *sp);
    if (!sp) return st_fail(err, path, "free some memory", "out of memory");
    for (int i = 0; i < n; i++) {
        sp[i].begin = (uint64_t)(f->tensors[i].data - data);
        sp[i].end = sp[i].begin + f->tensors[i].nbytes;
        sp[i].idx = i;
    }
    qsort(sp, (size_t)n, sizeof *sp, cmp_span);
    int prev = -1;
    for (int i = 0; i < n; i++) {
        if (sp[i].begin == sp[i].end) continue;
        if (prev >= 0 && sp[i].begin < sp[prev].end) {
            int a = sp[prev].idx, c = sp[i].idx;
            free(sp);
            return st_fail(err, path, FIX_REDOWNLOAD, "tensors '%s' and '%s' overlap in the file",
                           f->tensors[a].name, f->tensors[c].name);
        }
        prev = i;
    }
    free(sp);
    /* sorted by name: st_find is a binary search, and duplicates sit side by side */
    qsort(f->tensors, (size_t)n, sizeof *f->tensors, cmp_tensor_name);
    for (int i = 1; i < n; i++)
        if (strcmp(f->tensors[i - 1].name, f->tensors[i].name) == 0)
            return st_fail(err, path, FIX_REDOWNLOAD, "tensor '%s' appears twice in the header", f->tensors[i].name);
    return 0;
}

int st_open(st_file *f, const char *path, char *err) {
    memset(f, 0, sizeof *f);
    if (err) err[0] = '\0';
    f->path = strdup(path);
    if (!f->path) return st_fail(err, path, "free some memory", "out of memory");
    if (load_file(f, path, err)) { st_close(f); return -1; }
    const uint8_t *m = f->map;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | m[i];    /* little-endian */
    if (hlen > ST_MAX_HEADER) {
        st_fail(err, path, "not a safetensors file, or corrupt; re-download it",
                "header length %llu is absurd (over 100 MB)", (unsigned long long)hlen);
        st_close(f); return -1;
    }
    if (hlen > f->size - 8) {
        st_fail(err, path, FIX_REDOWNLOAD, "truncated: the header needs %llu bytes but the file has %zu",
                (unsigned long long)(hlen + 8), f->size);
        st_close(f); return -1;
    }
    char jerr[256];
    json *h = json_parse((const char *)m + 8, (size_t)hlen, jerr, sizeof jerr);
    if (!h) {
        st_fail(err, path, "not a safetensors file, or corrupt; re-download it", "header is not valid JSON: %s", jerr);
        st_close(f); return -1;
    }
    int rc = read_header(f, h, m + 8 + hlen, f->size - 8 - (size_t)hlen, err);
    json_free(h);
    if (rc) { st_close(f); return -1; }
    return 0;
}

void st_close(st_file *f) {
    if (!f) return;
    /* tensors is allocated with one spare zeroed slot, so freeing every
     * name up to ntensors covers a half-built list too */
    if (f->tensors) for (int i = 0; i <= f->ntensors; i++) free(f->tensors[i].name);
    free(f->tensors);
    for (int i = 0; i < f->nmeta; i++) { free(f->meta_keys[i]); free(f->meta_vals[i]); }
    free(f->meta_keys);
    free(f->meta_vals);
    if (f->map) {
        if (f->mapped) munmap(f->map, f->size);
        else free(f->map);
    }
    free(f->path);
    memset(f, 0, sizeof *f);
}

const st_tensor *st_find(const st_file *f, const char *name) {
    if (!f || !name) return NULL;
    int lo = 0, hi = f->ntensors - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        int c = strcmp(f->tensors[mid].name, name);
        if (c == 0) return &f->tensors[mid];
        if (c < 0) lo = mid + 1; else hi = mid - 1;
    }
    return NULL;
}

const char *st_meta(const st_file *f, const char *key) {
    if (!f || !key) return NULL;
    for (int i = 0; i < f->nmeta; i++)
        if (strcmp(f->meta_keys[i], key) == 0) return f->meta_vals[i];
    return NULL;
}

/* ---- fp16 / bf16 ------------------------------------------------------------ */

static uint32_t f32_bits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static float bits_f32(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

/* fp16: the exact conversions live in half.c (one place for the bit layout) */
float st_f16_to_f32(uint16_t h) { return half_to_float(h); }
uint16_t st_f32_to_f16(float f) { return float_to_half(f); }

/* bf16 is the top half of an f32 */
float st_bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

uint16_t st_f32_to_bf16(float f) {
    uint32_t x = f32_bits(f);
    if ((x & 0x7FFFFFFF) > 0x7F800000) return (uint16_t)((x >> 16) | 0x40);   /* quiet NaN */
    /* round to nearest even on the low 16 bits: add 0x7FFF plus the lowest kept
     * bit; a carry moves into the exponent (and FLT_MAX rounds up to inf) */
    x += 0x7FFF + ((x >> 16) & 1);
    return (uint16_t)(x >> 16);
}

/* ---- conversion ------------------------------------------------------------- */

/* Tensor bytes are little-endian and possibly unaligned; half types are
 * assembled from bytes, F32/F64 copied with memcpy (little-endian host). */
int st_to_f32(const st_tensor *t, float *dst, char *err) {
    const uint8_t *p = t->data;
    size_t n = t->numel;
    switch (t->dtype) {
    case ST_F32:
        if (n) memcpy(dst, p, n * 4);
        return 0;
    case ST_F16:
        for (size_t i = 0; i < n; i++) dst[i] = st_f16_to_f32((uint16_t)(p[2 * i] | p[2 * i + 1] << 8));
        return 0;
    case ST_BF16:
        for (size_t i = 0; i < n; i++) dst[i] = st_bf16_to_f32((uint16_t)(p[2 * i] | p[2 * i + 1] << 8));
        return 0;
    case ST_F64:
        for (size_t i = 0; i < n; i++) {
            double d;
            memcpy(&d, p + 8 * i, 8);
            /* out-of-range double -> float is undefined in C; from the tie
             * between FLT_MAX and 2^128 up, round-to-nearest gives inf */
            dst[i] = fabs(d) >= 0x1.ffffffp127 ? (float)copysign(INFINITY, d) : (float)d;
        }
        return 0;
    default:
        if (err) snprintf(err, ST_ERR_LEN, "tensor '%s' has integer dtype %s, not a float type "
                          "(only F32, F16, BF16 and F64 convert to float32)", t->name, st_dtype_name(t->dtype));
        return -1;
    }
}

/* After a tensor is copied out of the mapped file its pages are not needed
 * again: give them back, so loading a checkpoint peaks near the size of the
 * copy rather than file + copy. Only whole pages inside the tensor are
 * dropped (a neighbour may share the edge pages). For a private read-only
 * file mapping MADV_DONTNEED only drops the page: touched again, it is read
 * back from the file, so this changes memory, never contents. */
void st_release(const st_file *f, const st_tensor *t) {
#ifdef MADV_DONTNEED
    if (!f || !t || !f->mapped || !t->data || t->nbytes == 0) return;
    long pg = sysconf(_SC_PAGESIZE);
    if (pg <= 0) return;
    uintptr_t lo = (uintptr_t)t->data, hi = lo + t->nbytes;
    lo = (lo + (uintptr_t)pg - 1) & ~((uintptr_t)pg - 1);
    hi &= ~((uintptr_t)pg - 1);
    if (hi > lo) madvise((void *)lo, hi - lo, MADV_DONTNEED);
#else
    (void)f; (void)t;
#endif
}

/* the tensor named name, checked to have shape (ndim, shape) unless shape is NULL */
static const st_tensor *find_shaped(const st_file *f, const char *name, int ndim, const int64_t *shape,
                                    char *err) {
    const st_tensor *t = st_find(f, name);
    if (!t) { st_fail(err, f->path, "is this the right model file?", "missing tensor '%s'", name); return NULL; }
    if (shape) {
        int same = t->ndim == ndim;
        for (int i = 0; same && i < ndim; i++) same = t->shape[i] == shape[i];
        if (!same) {
            char a[256], b[256];
            shape_str(a, sizeof a, t->ndim, t->shape);
            shape_str(b, sizeof b, ndim > ST_MAX_DIMS ? ST_MAX_DIMS : ndim < 0 ? 0 : ndim, shape);
            st_fail(err, f->path, "is this the right model file?", "tensor '%s' has shape %s, expected %s",
                    name, a, b);
            return NULL;
        }
    }
    return t;
}

int st_read_f32(const st_file *f, const char *name, int ndim, const int64_t *shape, float *dst, char *err) {
    const st_tensor *t = find_shaped(f, name, ndim, shape, err);
    if (!t) return -1;
    if (st_to_f32(t, dst, NULL))
        return st_fail(err, f->path, "only F32, F16, BF16 and F64 convert to float32",
                       "tensor '%s' has integer dtype %s, not a float type", name, st_dtype_name(t->dtype));
    st_release(f, t);
    return 0;
}

/* F16 bytes are copied as they are (little-endian host, as for F32);
 * every other float type goes through float32 and is rounded to nearest even */
int st_to_f16(const st_tensor *t, uint16_t *dst, char *err) {
    const uint8_t *p = t->data;
    size_t n = t->numel;
    switch (t->dtype) {
    case ST_F16:
        if (n) memcpy(dst, p, n * 2);
        return 0;
    case ST_F32:
        for (size_t i = 0; i < n; i++) {
            float x;
            memcpy(&x, p + 4 * i, 4);
            dst[i] = float_to_half(x);
        }
        return 0;
    case ST_BF16:
        for (size_t i = 0; i < n; i++) dst[i] = float_to_half(st_bf16_to_f32((uint16_t)(p[2 * i] | p[2 * i + 1] << 8)));
        return 0;
    case ST_F64:
        for (size_t i = 0; i < n; i++) {
            double d;
            memcpy(&d, p + 8 * i, 8);
            /* through float32: out-of-range doubles become inf first (st_to_f32) */
            float x = fabs(d) >= 0x1.ffffffp127 ? (float)copysign(INFINITY, d) : (float)d;
            dst[i] = float_to_half(x);
        }
        return 0;
    default:
        if (err) snprintf(err, ST_ERR_LEN, "tensor '%s' has integer dtype %s, not a float type "
                          "(only F32, F16, BF16 and F64 convert to float16)", t->name, st_dtype_name(t->dtype));
        return -1;
    }
}

int st_read_f16(const st_file *f, const char *name, int ndim, const int64_t *shape, uint16_t *dst, char *err) {
    const st_tensor *t = find_shaped(f, name, ndim, shape, err);
    if (!t) return -1;
    if (st_to_f16(t, dst, NULL))
        return st_fail(err, f->path, "only F32, F16, BF16 and F64 convert to float16",
                       "tensor '%s' has integer dtype %s, not a float type", name, st_dtype_name(t->dtype));
    st_release(f, t);
    return 0;
}

int st_read_param(const st_file *f, const char *name, int squeeze, int ndim, const int64_t *shape,
                  float *dst, uint16_t *dst16, char *err) {
    int64_t sh[ST_MAX_DIMS];
    const st_tensor *t = st_find(f, name);
    if (t && squeeze && ndim >= 0 && t->ndim > ndim && t->ndim <= ST_MAX_DIMS) {
        /* (C, C, 1, 1) for (C, C): the same numbers in the same order */
        int same = 1;
        for (int d = 0; d < t->ndim; d++) same &= t->shape[d] == (d < ndim ? shape[d] : 1);
        if (same) {
            for (int d = 0; d < t->ndim; d++) sh[d] = t->shape[d];
            ndim = t->ndim;
            shape = sh;
        }
    }
    return dst16 ? st_read_f16(f, name, ndim, shape, dst16, err) : st_read_f32(f, name, ndim, shape, dst, err);
}

float *st_load_f32(const st_file *f, const char *name, size_t *numel, char *err) {
    const st_tensor *t = st_find(f, name);
    if (!t) { st_fail(err, f->path, "is this the right model file?", "missing tensor '%s'", name); return NULL; }
    float *x = malloc((t->numel ? t->numel : 1) * sizeof(float));
    if (!x) { st_fail(err, f->path, "free some memory", "out of memory for tensor '%s'", name); return NULL; }
    if (st_read_f32(f, name, 0, NULL, x, err)) { free(x); return NULL; }
    if (numel) *numel = t->numel;
    return x;
}

/* ---- writing --------------------------------------------------------------- */

typedef struct {
    char *name;
    st_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    size_t nbytes;
    uint8_t *data;
} st_entry;

struct st_writer {
    int n, cap;
    st_entry *e;
    int nmeta, metacap;
    char **mkeys, **mvals;
};

st_writer *st_writer_new(void) { return calloc(1, sizeof(st_writer)); }

void st_writer_free(st_writer *w) {
    if (!w) return;
    for (int i = 0; i < w->n; i++) { free(w->e[i].name); free(w->e[i].data); }
    free(w->e);
    for (int i = 0; i < w->nmeta; i++) { free(w->mkeys[i]); free(w->mvals[i]); }
    free(w->mkeys);
    free(w->mvals);
    free(w);
}

/* checks the name and shape; *nbytes = numel * dtype size without overflow */
static int entry_check(const st_writer *w, const char *name, st_dtype dt, int ndim, const int64_t *shape,
                       size_t *numel, size_t *nbytes) {
    if (!w || !name || !name[0] || strcmp(name, "__metadata__") == 0) return -1;
    if ((int)dt < 0 || (int)dt >= ST_NDTYPES || ndim < 0 || ndim > ST_MAX_DIMS || (ndim > 0 && !shape)) return -1;
    for (int i = 0; i < w->n; i++) if (strcmp(w->e[i].name, name) == 0) return -1;
    size_t nel = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0) return -1;
        if (shape[i] != 0 && ((uint64_t)shape[i] > SIZE_MAX || nel > SIZE_MAX / (size_t)shape[i])) return -1;
        nel *= (size_t)shape[i];
    }
    if (nel > SIZE_MAX / dtype_sizes[dt]) return -1;
    *numel = nel;
    *nbytes = nel * dtype_sizes[dt];
    return 0;
}

/* takes ownership of data (malloc'ed, nbytes) */
static int entry_push(st_writer *w, const char *name, st_dtype dt, int ndim, const int64_t *shape,
                      size_t nbytes, uint8_t *data) {
    if (w->n == w->cap) {
        int nc = w->cap ? w->cap * 2 : 16;
        st_entry *ne = realloc(w->e, (size_t)nc * sizeof *ne);
        if (!ne) { free(data); return -1; }
        w->e = ne; w->cap = nc;
    }
    st_entry *e = &w->e[w->n];
    memset(e, 0, sizeof *e);
    e->name = strdup(name);
    if (!e->name) { free(data); return -1; }
    e->dtype = dt;
    e->ndim = ndim;
    for (int i = 0; i < ndim; i++) e->shape[i] = shape[i];
    e->nbytes = nbytes;
    e->data = data;
    w->n++;
    return 0;
}

int st_writer_add(st_writer *w, const char *name, st_dtype dt, int ndim, const int64_t *shape, const void *data) {
    size_t numel, nbytes;
    if (entry_check(w, name, dt, ndim, shape, &numel, &nbytes)) return -1;
    if (nbytes && !data) return -1;
    uint8_t *copy = malloc(nbytes ? nbytes : 1);
    if (!copy) return -1;
    if (nbytes) memcpy(copy, data, nbytes);
    return entry_push(w, name, dt, ndim, shape, nbytes, copy);
}

int st_writer_add_f32(st_writer *w, const char *name, st_dtype dt, int ndim, const int64_t *shape,
                      const float *data) {
    size_t numel, nbytes;
    if (dt != ST_F32 && dt != ST_F16 && dt != ST_BF16 && dt != ST_F64) return -1;
    if (entry_check(w, name, dt, ndim, shape, &numel, &nbytes)) return -1;
    if (numel && !data) return -1;
    uint8_t *out = malloc(nbytes ? nbytes : 1);
    if (!out) return -1;
    for (size_t i = 0; i < numel; i++) {
        if (dt == ST_F32) memcpy(out + 4 * i, &data[i], 4);
        else if (dt == ST_F64) { double d = data[i]; memcpy(out + 8 * i, &d, 8); }
        else {
            uint16_t h = dt == ST_F16 ? st_f32_to_f16(data[i]) : st_f32_to_bf16(data[i]);
            out[2 * i] = (uint8_t)(h & 0xFF);          /* little-endian */
            out[2 * i + 1] = (uint8_t)(h >> 8);
        }
    }
    return entry_push(w, name, dt, ndim, shape, nbytes, out);
}

int st_writer_meta(st_writer *w, const char *key, const char *val) {
    if (!w || !key || !val) return -1;
    char *v = strdup(val);
    if (!v) return -1;
    for (int i = 0; i < w->nmeta; i++)
        if (strcmp(w->mkeys[i], key) == 0) { free(w->mvals[i]); w->mvals[i] = v; return 0; }
    if (w->nmeta == w->metacap) {
        int nc = w->metacap ? w->metacap * 2 : 8;
        char **k = realloc(w->mkeys, (size_t)nc * sizeof *k);
        if (!k) { free(v); return -1; }
        w->mkeys = k;
        char **vv = realloc(w->mvals, (size_t)nc * sizeof *vv);
        if (!vv) { free(v); return -1; }
        w->mvals = vv;
        w->metacap = nc;
    }
    char *k = strdup(key);
    if (!k) { free(v); return -1; }
    w->mkeys[w->nmeta] = k;
    w->mvals[w->nmeta] = v;
    w->nmeta++;
    return 0;
}

/* growable text buffer for the header */
typedef struct { char *s; size_t n, cap; int oom; } sbuf;

static void sb_put(sbuf *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->n + n + 1 > b->cap) {
        size_t nc = b->cap ? b->cap : 256;
        while (nc < b->n + n + 1) nc *= 2;
        char *ns = realloc(b->s, nc);
        if (!ns) { b->oom = 1; return; }
        b->s = ns; b->cap = nc;
    }
    memcpy(b->s + b->n, s, n);
    b->n += n;
    b->s[b->n] = '\0';
}

static void sb_str(sbuf *b, const char *s) { sb_put(b, s, strlen(s)); }

/* a JSON string literal; escapes as serde_json (the Python library) does */
static void sb_json_string(sbuf *b, const char *s) {
    sb_put(b, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        char esc[8];
        switch (*p) {
        case '"': sb_str(b, "\\\""); break;
        case '\\': sb_str(b, "\\\\"); break;
        case '\b': sb_str(b, "\\b"); break;
        case '\f': sb_str(b, "\\f"); break;
        case '\n': sb_str(b, "\\n"); break;
        case '\r': sb_str(b, "\\r"); break;
        case '\t': sb_str(b, "\\t"); break;
        default:
            if (*p < 0x20) { snprintf(esc, sizeof esc, "\\u%04x", *p); sb_str(b, esc); }
            else sb_put(b, (const char *)p, 1);   /* UTF-8 bytes pass through */
        }
    }
    sb_put(b, "\"", 1);
}

/* The Python library lays tensors out by dtype (widest first, so every
 * tensor is aligned to its element size) and then by name; doing the same
 * gives byte-identical files. */
static int dtype_rank(st_dtype dt) {
    static const int rank[] = { /*F32*/ 7, /*F16*/ 4, /*BF16*/ 5, /*F64*/ 8, /*I64*/ 9,
                                /*I32*/ 6, /*I16*/ 3, /*I8*/ 2, /*U8*/ 1, /*BOOL*/ 0 };
    return rank[dt];
}

static int cmp_entry(const void *a, const void *b) {
    const st_entry *x = *(const st_entry *const *)a, *y = *(const st_entry *const *)b;
    int rx = dtype_rank(x->dtype), ry = dtype_rank(y->dtype);
    if (rx != ry) return ry - rx;
    return strcmp(x->name, y->name);
}

static int write_all(FILE *fp, const void *p, size_t n) { return n == 0 || fwrite(p, 1, n, fp) == n ? 0 : -1; }

/* The header of w's file: {"__metadata__":{...},"name":{"dtype":..,
 * "shape":[..],"data_offsets":[b,e]},...}, padded with spaces to a multiple
 * of 8 as the Python library pads it. Only the metadata keys starting with
 * prefix go in (NULL: all). order: the entries sorted by cmp_entry. */
static int build_header(sbuf *h, const st_writer *w, st_entry *const *order, const char *prefix) {
    char num[64];
    size_t pl = prefix ? strlen(prefix) : 0;
    int nm = 0;
    sb_str(h, "{");
    for (int i = 0; i < w->nmeta; i++) {
        if (prefix && strncmp(w->mkeys[i], prefix, pl) != 0) continue;
        sb_str(h, nm++ ? "," : "\"__metadata__\":{");
        sb_json_string(h, w->mkeys[i]);
        sb_str(h, ":");
        sb_json_string(h, w->mvals[i]);
    }
    if (nm) sb_str(h, "}");
    size_t off = 0;
    for (int i = 0; i < w->n; i++) {
        const st_entry *e = order[i];
        if (i || nm) sb_str(h, ",");
        sb_json_string(h, e->name);
        sb_str(h, ":{\"dtype\":\"");
        sb_str(h, dtype_names[e->dtype]);
        sb_str(h, "\",\"shape\":[");
        for (int d = 0; d < e->ndim; d++) {
            snprintf(num, sizeof num, "%s%lld", d ? "," : "", (long long)e->shape[d]);
            sb_str(h, num);
        }
        snprintf(num, sizeof num, "],\"data_offsets\":[%zu,%zu]}", off, off + e->nbytes);
        sb_str(h, num);
        off += e->nbytes;
    }
    sb_str(h, "}");
    while (!h->oom && h->n % 8) sb_str(h, " ");   /* so the tensor bytes start 8-aligned */
    return h->oom ? -1 : 0;
}

static st_entry **sorted_entries(const st_writer *w) {
    st_entry **order = malloc(((size_t)w->n + 1) * sizeof *order);
    if (!order) return NULL;
    for (int i = 0; i < w->n; i++) order[i] = &w->e[i];
    qsort(order, (size_t)w->n, sizeof *order, cmp_entry);
    return order;
}

/* kohya's precalculate_safetensors_hashes (sd-scripts library/train_util.py):
 * the file Python's safetensors would write for these tensors with only the
 * "ss_" metadata, hashed two ways (sd-webui-additional-networks' hashes):
 *   model:  sha256 of everything after the header (the tensor bytes)
 *   legacy: the first 8 hex digits of sha256 of the 64 KiB at offset 1 MiB
 *           of that file (fewer bytes, or none, when the file is shorter)
 * The tensor bytes do not depend on the metadata, but the legacy window
 * does, through the header's length: hence the header rebuilt here. */
int st_writer_kohya_hashes(const st_writer *w, char model_hash[65], char legacy_hash[9]) {
    if (!w) return -1;
    st_entry **order = sorted_entries(w);
    if (!order) return -1;
    sbuf h = { 0 };
    if (build_header(&h, w, order, "ss_")) { free(h.s); free(order); return -1; }
    sha256_ctx all, win;
    sha256_init(&all);
    sha256_init(&win);
    const uint64_t w0 = 0x100000, w1 = 0x110000;   /* the legacy window [1 MiB, 1 MiB + 64 KiB) */
    uint64_t pos = 8 + h.n;                          /* file offset of the next tensor byte */
    if (pos > w0) {                                  /* a header over 1 MiB: the window starts inside it */
        size_t from = (size_t)(w0 - 8), to = (size_t)(pos < w1 ? pos : w1) - 8;
        sha256_update(&win, h.s + from, to - from);
    }
    for (int i = 0; i < w->n; i++) {
        const st_entry *e = order[i];
        sha256_update(&all, e->data, e->nbytes);
        uint64_t a = pos > w0 ? pos : w0, b = pos + e->nbytes < w1 ? pos + e->nbytes : w1;
        if (a < b) sha256_update(&win, e->data + (a - pos), (size_t)(b - a));
        pos += e->nbytes;
    }
    uint8_t d[32];
    char hex[65];
    sha256_final(&all, d);
    sha256_hex(d, model_hash);
    sha256_final(&win, d);
    sha256_hex(d, hex);
    memcpy(legacy_hash, hex, 8);
    legacy_hash[8] = 0;
    free(h.s);
    free(order);
    return 0;
}

int st_writer_save(st_writer *w, const char *path, char *err) {
    const char *fix_dir = "check that the directory exists, is writable and has free space";
    if (err) err[0] = '\0';
    if (!w) return st_fail(err, path, "create a writer first", "no writer");
    st_entry **order = sorted_entries(w);
    if (!order) return st_fail(err, path, "free some memory", "out of memory");

    sbuf h = { 0 };
    if (build_header(&h, w, order, NULL)) { free(h.s); free(order); return st_fail(err, path, "free some memory", "out of memory"); }

    size_t plen = strlen(path);
    char *tmp = malloc(plen + 5);
    if (!tmp) { free(h.s); free(order); return st_fail(err, path, "free some memory", "out of memory"); }
    memcpy(tmp, path, plen);
    memcpy(tmp + plen, ".tmp", 5);

    int rc = -1;
    FILE *fp = fopen(tmp, "wb");
    if (!fp) {
        st_fail(err, path, fix_dir, "cannot create %s: %s", tmp, strerror(errno));
        goto done;                          /* nothing created (or not ours), nothing to remove */
    }
    uint8_t len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (uint8_t)((uint64_t)h.n >> (8 * i));
    int bad = write_all(fp, len8, 8) || write_all(fp, h.s, h.n);
    for (int i = 0; i < w->n && !bad; i++) bad = write_all(fp, order[i]->data, order[i]->nbytes);
    /* the data must reach the disk before the rename makes it the file at path */
    if (!bad && fflush(fp) != 0) bad = 1;
    if (!bad && fsync(fileno(fp)) != 0) bad = 1;
    int e1 = errno;
    if (fclose(fp) != 0 && !bad) { bad = 1; e1 = errno; }
    if (bad) {
        st_fail(err, path, fix_dir, "writing %s failed: %s", tmp, strerror(e1));
        remove(tmp);
        goto done;
    }
    if (rename(tmp, path) != 0) {
        st_fail(err, path, fix_dir, "cannot rename %s onto it: %s", tmp, strerror(errno));
        remove(tmp);
        goto done;
    }
    rc = 0;
done:
    free(tmp);
    free(h.s);
    free(order);
    return rc;
}

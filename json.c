/* json.c: a recursive-descent JSON parser (RFC 8259) for safetensors headers,
 * config.json and tokenizer vocab.json.
 *
 * The text need not be NUL-terminated: every read is checked against len.
 * Objects keep their keys in file order; a key repeated in one object is an
 * error (naming the key). On any error the partial tree is
 * freed and a one-line reason with the byte offset goes to err. */
#include "json.h"

#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define JSON_MAX_DEPTH 64

typedef struct {
    const char *s;
    size_t len, pos;
    int depth;
    char *err;
    size_t errlen;
    int failed;
} parser;

/* Record the first error only: inner failures are the precise ones. */
static void fail(parser *p, const char *fmt, ...) {
    if (p->failed) return;
    p->failed = 1;
    if (!p->err || p->errlen == 0) return;
    char why[192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    snprintf(p->err, p->errlen, "json: %s at byte %zu", why, p->pos);
}

static void free_contents(json *j) {
    if (!j) return;
    if (j->type == JSON_STRING) free(j->string);
    if (j->type == JSON_ARRAY || j->type == JSON_OBJECT) {
        for (int i = 0; i < j->n; i++) {
            free_contents(&j->items[i]);
            if (j->keys) free(j->keys[i]);
        }
        free(j->items);
        free(j->keys);
    }
    memset(j, 0, sizeof *j);
}

void json_free(json *j) {
    if (!j) return;
    free_contents(j);
    free(j);
}

/* JSON whitespace is exactly space, tab, LF, CR */
static void skip_ws(parser *p) {
    while (p->pos < p->len) {
        char c = p->s[p->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        p->pos++;
    }
}

static int peek(parser *p) { return p->pos < p->len ? (unsigned char)p->s[p->pos] : -1; }

static const char *describe(int c, char *buf) {
    if (c < 0) return "end of input";
    if (c >= 0x20 && c < 0x7f) { sprintf(buf, "'%c'", c); return buf; }
    sprintf(buf, "byte 0x%02x", c);
    return buf;
}

static int parse_value(parser *p, json *out);

static int hex4(parser *p, unsigned *v) {
    if (p->len - p->pos < 4) { fail(p, "truncated \\u escape"); return -1; }
    unsigned x = 0;
    for (int i = 0; i < 4; i++) {
        char c = p->s[p->pos + i];
        x <<= 4;
        if (c >= '0' && c <= '9') x |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') x |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') x |= (unsigned)(c - 'A' + 10);
        else { p->pos += (size_t)i; fail(p, "bad hex digit in \\u escape"); return -1; }
    }
    p->pos += 4;
    *v = x;
    return 0;
}

/* code point -> UTF-8, returns the number of bytes written (1..4) */
static int put_utf8(char *o, unsigned cp) {
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    if (cp < 0x800) {
        o[0] = (char)(0xC0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Parse a string starting at the opening quote. Every escape decodes to no
 * more bytes than it occupies (\uXXXX: 6 -> <=3, surrogate pair: 12 -> 4),
 * so the decoded text fits in the raw span between the quotes. */
static int parse_string(parser *p, char **str, size_t *slen) {
    size_t start = ++p->pos;               /* past the opening quote */
    size_t end = start;
    while (end < p->len && p->s[end] != '"') {
        if (p->s[end] == '\\') end++;      /* skip the escaped char (maybe a quote) */
        end++;
    }
    if (end >= p->len) { fail(p, "unterminated string"); return -1; }
    char *o = malloc(end - start + 1);
    if (!o) { fail(p, "out of memory"); return -1; }
    size_t n = 0;
    while (p->pos < end) {
        unsigned char c = (unsigned char)p->s[p->pos];
        if (c < 0x20) { fail(p, "control character 0x%02x in string (escape it)", c); goto bad; }
        if (c != '\\') { o[n++] = (char)c; p->pos++; continue; }
        p->pos++;                          /* the backslash; end > pos holds here */
        char e = p->s[p->pos++];
        switch (e) {
        case '"': o[n++] = '"'; break;
        case '\\': o[n++] = '\\'; break;
        case '/': o[n++] = '/'; break;
        case 'b': o[n++] = '\b'; break;
        case 'f': o[n++] = '\f'; break;
        case 'n': o[n++] = '\n'; break;
        case 'r': o[n++] = '\r'; break;
        case 't': o[n++] = '\t'; break;
        case 'u': {
            unsigned cp;
            if (p->pos + 4 > end) { fail(p, "truncated \\u escape"); goto bad; }
            if (hex4(p, &cp)) goto bad;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                /* high surrogate: must be followed by \u low surrogate;
                 * cp = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00) */
                unsigned lo;
                if (p->pos + 6 > end || p->s[p->pos] != '\\' || p->s[p->pos + 1] != 'u') {
                    fail(p, "high surrogate \\u%04X without a low surrogate", cp); goto bad;
                }
                p->pos += 2;
                if (hex4(p, &lo)) goto bad;
                if (lo < 0xDC00 || lo > 0xDFFF) {
                    fail(p, "high surrogate \\u%04X followed by \\u%04X, not a low surrogate", cp, lo);
                    goto bad;
                }
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                fail(p, "lone low surrogate \\u%04X", cp); goto bad;
            }
            n += (size_t)put_utf8(o + n, cp);
            break;
        }
        default:
            p->pos -= 2;                   /* point at the backslash */
            if (e > 0x20 && e < 0x7f) fail(p, "bad escape '\\%c' in string", e);
            else fail(p, "bad escape (backslash then byte 0x%02x) in string", (unsigned char)e);
            goto bad;
        }
    }
    o[n] = '\0';
    p->pos = end + 1;                      /* past the closing quote */
    *str = o;
    *slen = n;
    return 0;
bad:
    free(o);
    return -1;
}

static int is_digit(int c) { return c >= '0' && c <= '9'; }

/* number = -? (0 | [1-9][0-9]*) (.[0-9]+)? ([eE][+-]?[0-9]+)?
 * The grammar is checked here; strtod then converts a bounded, NUL-terminated
 * copy (the input itself may not be terminated). */
static int parse_number(parser *p, double *v) {
    size_t start = p->pos;
    if (peek(p) == '-') p->pos++;
    if (peek(p) == '0') {
        p->pos++;
        if (is_digit(peek(p))) { fail(p, "leading zero in number"); return -1; }
    } else if (is_digit(peek(p))) {
        while (is_digit(peek(p))) p->pos++;
    } else { fail(p, "expected a digit"); return -1; }
    if (peek(p) == '.') {
        p->pos++;
        if (!is_digit(peek(p))) { fail(p, "expected a digit after '.'"); return -1; }
        while (is_digit(peek(p))) p->pos++;
    }
    if (peek(p) == 'e' || peek(p) == 'E') {
        p->pos++;
        if (peek(p) == '+' || peek(p) == '-') p->pos++;
        if (!is_digit(peek(p))) { fail(p, "expected a digit in exponent"); return -1; }
        while (is_digit(peek(p))) p->pos++;
    }
    size_t n = p->pos - start;
    char small[64];
    char *buf = n < sizeof small ? small : malloc(n + 1);
    if (!buf) { fail(p, "out of memory"); return -1; }
    memcpy(buf, p->s + start, n);
    buf[n] = '\0';
    *v = strtod(buf, NULL);                /* out-of-range values become +-inf / 0, as in Python */
    if (buf != small) free(buf);
    return 0;
}

static int match_word(parser *p, const char *w) {
    size_t n = strlen(w);
    if (p->len - p->pos < n || memcmp(p->s + p->pos, w, n) != 0) {
        fail(p, "invalid literal (expected '%s')", w);
        return -1;
    }
    p->pos += n;
    return 0;
}

/* grow items (and keys) to hold at least need entries */
static int grow(parser *p, json *j, int *cap, int need, int with_keys) {
    if (need <= *cap) return 0;
    if (*cap >= INT_MAX / 2) { fail(p, "too many items"); return -1; }
    int nc = *cap ? *cap * 2 : 4;
    json *it = realloc(j->items, (size_t)nc * sizeof *it);
    if (!it) { fail(p, "out of memory"); return -1; }
    j->items = it;
    if (with_keys) {
        char **k = realloc(j->keys, (size_t)nc * sizeof *k);
        if (!k) { fail(p, "out of memory"); return -1; }
        j->keys = k;
    }
    *cap = nc;
    return 0;
}

/* FNV-1a over the key up to its NUL: keys that differ only after an
 * embedded \u0000 compare equal in json_get, so they count as one key here */
static size_t key_hash(const char *k) {
    size_t h = 2166136261u;
    for (const unsigned char *s = (const unsigned char *)k; *s; s++) h = (h ^ *s) * 16777619u;
    return h;
}

/* The keys of one object seen so far, in an open-addressed table of key
 * indices + 1 (0 = empty), kept at most half full. A repeated key is
 * refused rather than resolved: readers would otherwise disagree on which
 * copy counts (safetensors metadata twice used to corrupt the heap). */
typedef struct { int *slot; size_t cap; } keyset;

static int keyset_insert(const json *obj, keyset *ks, int idx) {
    if (((size_t)idx + 1) * 2 > ks->cap) {
        size_t nc = ks->cap ? ks->cap * 2 : 16;
        int *ns = calloc(nc, sizeof *ns);
        if (!ns) return -1;
        for (size_t i = 0; i < ks->cap; i++) {
            if (!ks->slot[i]) continue;
            size_t h = key_hash(obj->keys[ks->slot[i] - 1]) & (nc - 1);
            while (ns[h]) h = (h + 1) & (nc - 1);
            ns[h] = ks->slot[i];
        }
        free(ks->slot);
        ks->slot = ns;
        ks->cap = nc;
    }
    size_t h = key_hash(obj->keys[idx]) & (ks->cap - 1);
    while (ks->slot[h]) {
        if (strcmp(obj->keys[ks->slot[h] - 1], obj->keys[idx]) == 0) return 1;
        h = (h + 1) & (ks->cap - 1);
    }
    ks->slot[h] = idx + 1;
    return 0;
}

/* a key for a message: at most 64 bytes, control bytes and quotes escaped */
void json_quote_key(char *o, size_t on, const char *k) {
    size_t n = 0;
    const unsigned char *s = (const unsigned char *)k;
    for (; *s && n + 8 < on; s++) {
        if (s - (const unsigned char *)k >= 64) { memcpy(o + n, "...", 3); n += 3; break; }
        if (*s < 0x20 || *s == 0x7f || *s == '"' || *s == '\\') n += (size_t)snprintf(o + n, on - n, "\\x%02x", *s);
        else o[n++] = (char)*s;
    }
    o[n] = '\0';
}

static int parse_items(parser *p, json *out, int is_obj, keyset *ks);

/* shared by arrays and objects; the container is already typed in out and
 * the caller frees it on failure */
static int parse_container(parser *p, json *out, int is_obj) {
    keyset ks = { NULL, 0 };
    int rc = parse_items(p, out, is_obj, &ks);
    free(ks.slot);
    return rc;
}

static int parse_items(parser *p, json *out, int is_obj, keyset *ks) {
    char close = is_obj ? '}' : ']';
    char b[16];
    int cap = 0;
    if (++p->depth > JSON_MAX_DEPTH) { fail(p, "nesting deeper than %d", JSON_MAX_DEPTH); return -1; }
    p->pos++;                              /* the opening bracket */
    skip_ws(p);
    if (peek(p) == close) { p->pos++; p->depth--; return 0; }
    for (;;) {
        if (grow(p, out, &cap, out->n + 1, is_obj)) return -1;
        json *item = &out->items[out->n];
        memset(item, 0, sizeof *item);
        if (is_obj) {
            skip_ws(p);
            if (peek(p) != '"') { fail(p, "expected a string key, got %s", describe(peek(p), b)); return -1; }
            char *key; size_t klen;
            size_t kpos = p->pos;
            if (parse_string(p, &key, &klen)) return -1;
            out->keys[out->n] = key;
            out->n++;                      /* counted now so the key is freed on error */
            int dup = keyset_insert(out, ks, out->n - 1);
            if (dup) {
                char q[100];
                json_quote_key(q, sizeof q, key);
                p->pos = kpos;
                if (dup < 0) fail(p, "out of memory");
                else fail(p, "key \"%s\" appears twice in one object", q);
                return -1;
            }
            skip_ws(p);
            if (peek(p) != ':') { fail(p, "expected ':' after key, got %s", describe(peek(p), b)); return -1; }
            p->pos++;
            if (parse_value(p, item)) return -1;
        } else {
            out->n++;
            if (parse_value(p, item)) return -1;
        }
        skip_ws(p);
        int c = peek(p);
        if (c == ',') { p->pos++; continue; }
        if (c == close) { p->pos++; break; }
        fail(p, "expected ',' or '%c', got %s", close, describe(c, b));
        return -1;
    }
    p->depth--;
    return 0;
}

static int parse_value(parser *p, json *out) {
    char b[16];
    skip_ws(p);
    memset(out, 0, sizeof *out);
    int c = peek(p);
    switch (c) {
    case '{': out->type = JSON_OBJECT; return parse_container(p, out, 1);
    case '[': out->type = JSON_ARRAY; return parse_container(p, out, 0);
    case '"':
        if (parse_string(p, &out->string, &out->slen)) return -1;
        out->type = JSON_STRING;
        return 0;
    case 't': out->type = JSON_BOOL; out->boolean = 1; return match_word(p, "true");
    case 'f': out->type = JSON_BOOL; out->boolean = 0; return match_word(p, "false");
    case 'n': out->type = JSON_NULL; return match_word(p, "null");
    default:
        if (c == '-' || is_digit(c)) {
            out->type = JSON_NUMBER;
            return parse_number(p, &out->number);
        }
        fail(p, "unexpected %s", describe(c, b));
        return -1;
    }
}

json *json_parse(const char *text, size_t len, char *err, size_t errlen) {
    parser p = { text, len, 0, 0, err, errlen, 0 };
    if (err && errlen) err[0] = '\0';
    if (!text) { len = 0; p.len = 0; p.s = ""; }
    /* a UTF-8 byte order mark is allowed (RFC 8259 section 8.1) */
    if (len >= 3 && memcmp(text, "\xEF\xBB\xBF", 3) == 0) p.pos = 3;
    json *j = calloc(1, sizeof *j);
    if (!j) { fail(&p, "out of memory"); return NULL; }
    if (parse_value(&p, j) == 0) {
        skip_ws(&p);
        if (p.pos == p.len) return j;
        char b[16];
        fail(&p, "trailing %s after the document", describe(peek(&p), b));
    }
    json_free(j);
    return NULL;
}

const json *json_get(const json *obj, const char *key) {
    if (!obj || obj->type != JSON_OBJECT || !key) return NULL;
    /* json_parse refuses repeated keys, so the first match is the only one */
    for (int i = 0; i < obj->n; i++)
        if (strcmp(obj->keys[i], key) == 0) return &obj->items[i];
    return NULL;
}

double json_num(const json *obj, const char *key, double dflt) {
    const json *v = json_get(obj, key);
    return v && v->type == JSON_NUMBER ? v->number : dflt;
}

int json_bool(const json *obj, const char *key, int dflt) {
    const json *v = json_get(obj, key);
    return v && v->type == JSON_BOOL ? v->boolean : dflt;
}

const char *json_str(const json *obj, const char *key, const char *dflt) {
    const json *v = json_get(obj, key);
    return v && v->type == JSON_STRING ? v->string : dflt;
}

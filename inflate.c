/* inflate.c: DEFLATE (RFC 1951) decoding with gzip (RFC 1952) and zlib
 * (RFC 1950) wrappers. See inflate.h.
 *
 * Every read of input is bounds-checked: running out of input sets an error
 * flag and decoding stops, so truncated streams fail instead of looping.
 * Huffman decoding uses a 9-bit lookup table for short codes and a
 * bit-at-a-time canonical walk for the rest. */
#include "inflate.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAXBITS 15      /* longest Huffman code DEFLATE allows */
#define FASTBITS 9      /* lookup-table width */
#define MAXLCODES 288   /* literal/length alphabet (286 used + 2 reserved) */
#define MAXDCODES 32    /* distance alphabet (30 used + 2 reserved) */

typedef struct {
    const uint8_t *in; size_t n, pos;
    uint64_t buf; int cnt;          /* bit buffer, LSB first */
    uint8_t *out; size_t outn, cap;
    const char *fail;               /* first error, or NULL */
} inf_state;

/* a canonical Huffman code */
typedef struct {
    uint16_t count[MAXBITS + 1];    /* number of codes of each length */
    uint16_t symbol[MAXLCODES];     /* symbols ordered by code */
    uint16_t fast[1 << FASTBITS];   /* (symbol << 4) | length, 0 = use the slow walk */
} huff;

static void set_err(char *err, size_t errlen, const char *what, const char *msg) {
    if (err && errlen) snprintf(err, errlen, "%s: %s", what, msg);
}

/* keep at least need bits in the buffer when input allows; returns 0 if it cannot */
static int refill(inf_state *s, int need) {
    while (s->cnt <= 56 && s->pos < s->n) {
        s->buf |= (uint64_t)s->in[s->pos++] << s->cnt;
        s->cnt += 8;
    }
    return s->cnt >= need;
}

static uint32_t getbits(inf_state *s, int k) {
    if (k == 0) return 0;
    if (!refill(s, k)) { if (!s->fail) s->fail = "unexpected end of compressed data"; return 0; }
    uint32_t v = (uint32_t)(s->buf & (((uint64_t)1 << k) - 1));
    s->buf >>= k; s->cnt -= k;
    return v;
}

/* Build the canonical code from code lengths. Canonical rule (RFC 1951
 * 3.2.2): codes of one length are consecutive integers in symbol order, and
 * the first code of length L is (first code of L-1 + count[L-1]) << 1.
 * Returns -1 if over-subscribed; incomplete codes are allowed, their unused
 * bit patterns fail when decoded. */
static int huff_build(huff *h, const uint8_t *len, int n) {
    memset(h->count, 0, sizeof h->count);
    memset(h->fast, 0, sizeof h->fast);
    for (int i = 0; i < n; i++) h->count[len[i]]++;
    h->count[0] = 0;
    int left = 1;
    for (int l = 1; l <= MAXBITS; l++) {
        left <<= 1; left -= h->count[l];
        if (left < 0) return -1;
    }
    uint16_t offs[MAXBITS + 2];
    offs[1] = 0;
    for (int l = 1; l < MAXBITS; l++) offs[l + 1] = offs[l] + h->count[l];
    uint32_t next[MAXBITS + 1];
    next[1] = 0;
    for (int l = 2; l <= MAXBITS; l++) next[l] = (next[l - 1] + h->count[l - 1]) << 1;
    for (int i = 0; i < n; i++) {
        int l = len[i];
        if (!l) continue;
        h->symbol[offs[l]++] = (uint16_t)i;
        uint32_t c = next[l]++;
        if (l <= FASTBITS) {
            /* the stream sends the code MSB first, our buffer is LSB first: reverse */
            uint32_t r = 0;
            for (int b = 0; b < l; b++) r |= ((c >> b) & 1u) << (l - 1 - b);
            for (uint32_t j = r; j < (1u << FASTBITS); j += 1u << l)
                h->fast[j] = (uint16_t)((i << 4) | l);
        }
    }
    return 0;
}

static int huff_decode(inf_state *s, const huff *h) {
    refill(s, FASTBITS);
    uint16_t e = h->fast[s->buf & ((1u << FASTBITS) - 1)];
    if (e && (e & 15) <= s->cnt) {
        s->buf >>= (e & 15); s->cnt -= (e & 15);
        return e >> 4;
    }
    /* slow walk: code values of length l start at first, occupy count[l] */
    int code = 0, first = 0, index = 0;
    for (int l = 1; l <= MAXBITS; l++) {
        code |= (int)getbits(s, 1);
        if (s->fail) return -1;
        int count = h->count[l];
        if (code - first < count) return h->symbol[index + (code - first)];
        index += count; first += count;
        first <<= 1; code <<= 1;
    }
    if (!s->fail) s->fail = "invalid Huffman code";
    return -1;
}

static int put_room(inf_state *s, size_t k) {
    if (s->outn + k <= s->cap) return 0;
    if (s->outn + k > INFLATE_MAX_OUT || s->outn + k < s->outn) { s->fail = "output larger than 1 GiB"; return -1; }
    size_t nc = s->cap ? s->cap : 4096;
    while (nc < s->outn + k) nc *= 2;
    if (nc > INFLATE_MAX_OUT) nc = INFLATE_MAX_OUT;
    uint8_t *p = realloc(s->out, nc);
    if (!p) { s->fail = "out of memory"; return -1; }
    s->out = p; s->cap = nc;
    return 0;
}

static const uint16_t len_base[29] = {3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31,
                                      35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258};
static const uint8_t len_extra[29] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2,
                                      3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};
static const uint16_t dist_base[30] = {1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193,
                                       257, 385, 513, 769, 1025, 1537, 2049, 3073, 4097, 6145,
                                       8193, 12289, 16385, 24577};
static const uint8_t dist_extra[30] = {0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6,
                                       7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13};

/* literal/length + distance symbols until end-of-block (256) */
static int codes(inf_state *s, const huff *lc, const huff *dc) {
    for (;;) {
        int sym = huff_decode(s, lc);
        if (sym < 0) return -1;
        if (sym < 256) {
            if (put_room(s, 1)) return -1;
            s->out[s->outn++] = (uint8_t)sym;
        } else if (sym == 256) {
            return 0;
        } else {
            sym -= 257;
            if (sym >= 29) { s->fail = "invalid length symbol"; return -1; }
            size_t len = len_base[sym] + getbits(s, len_extra[sym]);
            int ds = huff_decode(s, dc);
            if (ds < 0) return -1;
            if (ds >= 30) { s->fail = "invalid distance symbol"; return -1; }
            size_t dist = dist_base[ds] + getbits(s, dist_extra[ds]);
            if (s->fail) return -1;
            if (dist > s->outn) { s->fail = "distance too far back"; return -1; }
            if (put_room(s, len)) return -1;
            /* byte by byte: the source may overlap the bytes being written (run-length) */
            uint8_t *o = s->out + s->outn;
            const uint8_t *src = o - dist;
            for (size_t i = 0; i < len; i++) o[i] = src[i];
            s->outn += len;
        }
    }
}

static int stored(inf_state *s) {
    /* drop to a byte boundary, then give whole buffered bytes back to the input */
    s->buf >>= s->cnt & 7; s->cnt -= s->cnt & 7;
    s->pos -= (size_t)(s->cnt / 8); s->buf = 0; s->cnt = 0;
    if (s->n - s->pos < 4) { s->fail = "unexpected end of compressed data"; return -1; }
    unsigned len = s->in[s->pos] | (unsigned)s->in[s->pos + 1] << 8;
    unsigned nlen = s->in[s->pos + 2] | (unsigned)s->in[s->pos + 3] << 8;
    s->pos += 4;
    if (len != (~nlen & 0xffffu)) { s->fail = "stored block length check failed"; return -1; }
    if (s->n - s->pos < len) { s->fail = "unexpected end of compressed data"; return -1; }
    if (put_room(s, len)) return -1;
    if (len) memcpy(s->out + s->outn, s->in + s->pos, len);
    s->outn += len; s->pos += len;
    return 0;
}

static int fixed(inf_state *s) {
    /* rebuilt per block: cheap, and avoids shared mutable state between threads */
    uint8_t l[MAXLCODES];
    int i = 0;
    for (; i < 144; i++) l[i] = 8;
    for (; i < 256; i++) l[i] = 9;
    for (; i < 280; i++) l[i] = 7;
    for (; i < 288; i++) l[i] = 8;
    huff *plc = malloc(sizeof(huff) * 2);
    if (!plc) { s->fail = "out of memory"; return -1; }
    huff_build(&plc[0], l, 288);
    for (i = 0; i < 30; i++) l[i] = 5;
    huff_build(&plc[1], l, 30);
    int r = codes(s, &plc[0], &plc[1]);
    free(plc);
    return r;
}

static int dynamic(inf_state *s) {
    static const uint8_t order[19] = {16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15};
    int nlen = (int)getbits(s, 5) + 257, ndist = (int)getbits(s, 5) + 1, ncode = (int)getbits(s, 4) + 4;
    if (s->fail) return -1;
    if (nlen > 286 || ndist > 30) { s->fail = "too many length or distance codes"; return -1; }
    uint8_t l[MAXLCODES + MAXDCODES];
    memset(l, 0, sizeof l);
    for (int i = 0; i < ncode; i++) l[order[i]] = (uint8_t)getbits(s, 3);
    if (s->fail) return -1;
    huff *h = malloc(sizeof(huff) * 2);
    if (!h) { s->fail = "out of memory"; return -1; }
    int r = -1;
    if (huff_build(&h[0], l, 19)) { s->fail = "bad code-length code"; goto done; }
    memset(l, 0, sizeof l);
    for (int i = 0; i < nlen + ndist;) {
        int sym = huff_decode(s, &h[0]);
        if (sym < 0) goto done;
        if (sym < 16) { l[i++] = (uint8_t)sym; continue; }
        int rep; uint8_t v = 0;
        if (sym == 16) {
            if (i == 0) { s->fail = "repeat with no previous length"; goto done; }
            v = l[i - 1]; rep = 3 + (int)getbits(s, 2);
        } else if (sym == 17) rep = 3 + (int)getbits(s, 3);
        else rep = 11 + (int)getbits(s, 7);
        if (s->fail) goto done;
        if (i + rep > nlen + ndist) { s->fail = "too many code lengths"; goto done; }
        while (rep--) l[i++] = v;
    }
    if (l[256] == 0) { s->fail = "no end-of-block code"; goto done; }
    if (huff_build(&h[0], l, nlen)) { s->fail = "bad literal/length code"; goto done; }
    if (huff_build(&h[1], l + nlen, ndist)) { s->fail = "bad distance code"; goto done; }
    r = codes(s, &h[0], &h[1]);
done:
    free(h);
    return r;
}

/* blocks until the final one; output appended to s->out */
static int deflate_blocks(inf_state *s) {
    int last;
    do {
        last = (int)getbits(s, 1);
        int type = (int)getbits(s, 2);
        if (s->fail) return -1;
        int r;
        if (type == 0) r = stored(s);
        else if (type == 1) r = fixed(s);
        else if (type == 2) r = dynamic(s);
        else { s->fail = "invalid block type 3"; return -1; }
        if (r || s->fail) { if (!s->fail) s->fail = "corrupt data"; return -1; }
    } while (!last);
    /* hand unused whole bytes back so the caller can read the trailer */
    s->pos -= (size_t)(s->cnt / 8); s->buf = 0; s->cnt = 0;
    return 0;
}

static int finish(inf_state *s, uint8_t **out, size_t *outn, char *err, size_t errlen, const char *what) {
    if (s->fail) {
        set_err(err, errlen, what, s->fail);
        free(s->out); *out = NULL; *outn = 0;
        return -1;
    }
    if (!s->out) { s->out = malloc(1); if (!s->out) { set_err(err, errlen, what, "out of memory"); return -1; } }
    *out = s->out; *outn = s->outn;
    return 0;
}

int inflate_raw(const uint8_t *in, size_t n, uint8_t **out, size_t *outn, size_t *used,
                char *err, size_t errlen) {
    inf_state s; memset(&s, 0, sizeof s);
    s.in = in; s.n = in ? n : 0;
    deflate_blocks(&s);
    if (used) *used = s.pos;
    return finish(&s, out, outn, err, errlen, "deflate");
}

/* CRC-32 (IEEE, reflected polynomial 0xEDB88320), table built on the stack */
uint32_t crc32_update(uint32_t crc, const uint8_t *p, size_t n) {
    uint32_t t[256];
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        t[i] = c;
    }
    crc = ~crc;
    for (size_t i = 0; i < n; i++) crc = t[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
    return ~crc;
}

/* Adler-32: a = 1 + sum bytes, b = sum of a's, both mod 65521 */
uint32_t adler32_update(uint32_t adler, const uint8_t *p, size_t n) {
    uint32_t a = adler & 0xffff, b = adler >> 16;
    while (n) {
        size_t k = n < 5552 ? n : 5552;   /* largest run before b can overflow 32 bits */
        n -= k;
        while (k--) { a += *p++; b += a; }
        a %= 65521; b %= 65521;
    }
    return (b << 16) | a;
}

static uint32_t rd32le(const uint8_t *p) {
    return p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

int inflate_gzip(const uint8_t *in, size_t n, uint8_t **out, size_t *outn, char *err, size_t errlen) {
    inf_state s; memset(&s, 0, sizeof s);
    s.in = in; s.n = in ? n : 0;
    size_t p = 0;
    int members = 0;
    while (!s.fail) {
        if (members > 0 && p == s.n) break;   /* all members read */
        if (s.n - p < 18) { s.fail = members ? "trailing garbage after gzip member" : "truncated gzip header"; break; }
        if (in[p] != 0x1f || in[p + 1] != 0x8b) { s.fail = members ? "trailing garbage after gzip member" : "not gzip data (bad magic)"; break; }
        if (in[p + 2] != 8) { s.fail = "unknown gzip compression method"; break; }
        int flg = in[p + 3];
        if (flg & 0xe0) { s.fail = "reserved gzip flags set"; break; }
        size_t h = p + 10;
        if (flg & 4) {   /* FEXTRA: 2-byte length then data */
            if (s.n - h < 2) { s.fail = "truncated gzip header"; break; }
            size_t xlen = in[h] | (size_t)in[h + 1] << 8;
            h += 2;
            if (s.n - h < xlen) { s.fail = "truncated gzip header"; break; }
            h += xlen;
        }
        for (int f = 8; f <= 16 && !s.fail; f <<= 1) {   /* FNAME, FCOMMENT: NUL-terminated */
            if (!(flg & f)) continue;
            while (h < s.n && in[h]) h++;
            if (h >= s.n) s.fail = "truncated gzip header";
            h++;
        }
        if (s.fail) break;
        if (flg & 2) {   /* FHCRC: low 16 bits of the CRC-32 of the header so far */
            if (s.n - h < 2) { s.fail = "truncated gzip header"; break; }
            uint32_t c = crc32_update(0, in + p, h - p) & 0xffff;
            if (c != (uint32_t)(in[h] | in[h + 1] << 8)) { s.fail = "gzip header CRC mismatch"; break; }
            h += 2;
        }
        size_t start = s.outn;
        s.pos = h;
        if (deflate_blocks(&s)) break;
        if (s.n - s.pos < 8) { s.fail = "truncated gzip trailer (CRC32/ISIZE)"; break; }
        uint32_t crc = rd32le(in + s.pos), isize = rd32le(in + s.pos + 4);
        if (crc32_update(0, s.out ? s.out + start : NULL, s.outn - start) != crc) { s.fail = "CRC32 mismatch (corrupt data)"; break; }
        if ((uint32_t)(s.outn - start) != isize) { s.fail = "ISIZE mismatch (corrupt data)"; break; }
        p = s.pos + 8;
        members++;
    }
    return finish(&s, out, outn, err, errlen, "gzip");
}

int inflate_zlib(const uint8_t *in, size_t n, uint8_t **out, size_t *outn, char *err, size_t errlen) {
    inf_state s; memset(&s, 0, sizeof s);
    s.in = in; s.n = in ? n : 0;
    if (s.n < 6) s.fail = "truncated zlib stream";
    else if ((in[0] & 15) != 8 || (in[0] >> 4) > 7) s.fail = "not zlib data (bad method/window)";
    else if (((unsigned)in[0] << 8 | in[1]) % 31) s.fail = "not zlib data (header check)";
    else if (in[1] & 0x20) s.fail = "zlib preset dictionary not supported";
    else {
        s.pos = 2;
        if (!deflate_blocks(&s)) {
            if (s.n - s.pos < 4) s.fail = "truncated zlib trailer (adler32)";
            else {
                uint32_t want = (uint32_t)in[s.pos] << 24 | (uint32_t)in[s.pos + 1] << 16 |
                                (uint32_t)in[s.pos + 2] << 8 | in[s.pos + 3];
                if (adler32_update(1, s.out ? s.out : NULL, s.outn) != want) s.fail = "adler32 mismatch (corrupt data)";
            }
        }
    }
    return finish(&s, out, outn, err, errlen, "zlib");
}

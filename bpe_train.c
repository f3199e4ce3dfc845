/* bpe_train.c: byte-level BPE training, CLIP flavour (see bpe_train.h).
 *
 * Pre-tokenisation is not re-implemented here: a vocabulary of only the 512
 * byte symbols (no merges) is loaded with tokenizer.c, and tok_encode on it
 * returns each word as its byte symbols with "</w>" on the last one, i.e.
 * exactly the symbols tokenizer.c will later apply our merges to. So the
 * trainer and the encoder can never disagree about where words split or how
 * text is normalised.
 *
 * Training, after Sennrich et al. (2016):
 *   words   = the distinct pre-tokenised words w with their counts c(w)
 *   repeat: count(a, b) = sum_w c(w) * #{i : w[i] = a, w[i+1] = b}
 *           (a*, b*)    = argmax count, ties -> smallest (str(a), str(b))
 *           replace every a* b* in every word (left to right, no overlap)
 *           by the token str(a*) str(b*); record the merge
 * Cost per merge: one pass and one sort over the pairs of the distinct
 * words, which is plenty for caption sets (thousands of distinct words). */
#include "bpe_train.h"
#include "tokenizer.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const BOS_STR = "<|startoftext|>";
static const char *const EOS_STR = "<|endoftext|>";

/* ------------------------------------------------------------------ */
/* the byte alphabet                                                   */

/* GPT-2 / CLIP byte -> unicode: printable bytes 33..126, 161..172,
 * 174..255 stand for themselves; the other 68 take U+0100, U+0101, ... in
 * byte order. order[] is CLIP's vocabulary order: printable bytes first. */
static int printable_byte(int b) { return (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255); }

static void byte_symbols(char sym[256][3], int order[256]) {
    int k = 0, extra = 0;
    uint32_t cp[256];
    for (int b = 0; b < 256; b++) if (printable_byte(b)) { cp[b] = (uint32_t)b; order[k++] = b; }
    for (int b = 0; b < 256; b++) if (!printable_byte(b)) { cp[b] = 256u + (uint32_t)extra++; order[k++] = b; }
    /* every code point here is below U+0800: one or two UTF-8 bytes */
    for (int b = 0; b < 256; b++) {
        if (cp[b] < 0x80) { sym[b][0] = (char)cp[b]; sym[b][1] = 0; }
        else { sym[b][0] = (char)(0xC0 | cp[b] >> 6); sym[b][1] = (char)(0x80 | (cp[b] & 63)); sym[b][2] = 0; }
    }
}

/* ------------------------------------------------------------------ */
/* writing files: temporary name, flush, rename                        */

typedef struct { char path[4096], tmp[4112]; FILE *f; } out_file;

static int out_open(out_file *o, const char *dir, const char *name, char *err, size_t errlen) {
    if (snprintf(o->path, sizeof o->path, "%s/%s", dir, name) >= (int)sizeof o->path) {
        snprintf(err, errlen, "bpe_train: output folder path too long"); return -1;
    }
    snprintf(o->tmp, sizeof o->tmp, "%s.tmp", o->path);
    o->f = fopen(o->tmp, "wb");
    if (!o->f) {
        snprintf(err, errlen, "bpe_train: cannot write '%s': %s (does the output folder exist and is it writable?)", o->tmp, strerror(errno));
        return -1;
    }
    return 0;
}

static int out_close(out_file *o, char *err, size_t errlen) {
    int bad = ferror(o->f);
    bad |= fflush(o->f) != 0;
    bad |= fclose(o->f) != 0;
    if (bad || rename(o->tmp, o->path) != 0) {
        snprintf(err, errlen, "bpe_train: cannot write '%s': %s (disk full?)", o->path, strerror(errno));
        remove(o->tmp);
        return -1;
    }
    return 0;
}

/* JSON string: token strings hold no control characters (bytes below 33
 * are mapped to U+0100..), so only the quote and the backslash need escapes */
static void put_json_string(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') fputc('\\', f);
        fputc(*s, f);
    }
    fputc('"', f);
}

/* vocab.json with tokens[0..n) as ids 0..n-1, then the two specials */
static int write_vocab(const char *dir, const char *name, char **tokens, int n, char *err, size_t errlen) {
    out_file o;
    if (out_open(&o, dir, name, err, errlen)) return -1;
    fputc('{', o.f);
    for (int i = 0; i < n; i++) {
        put_json_string(o.f, tokens[i]);
        fprintf(o.f, ": %d,\n", i);
    }
    fprintf(o.f, "\"%s\": %d,\n\"%s\": %d}\n", BOS_STR, n, EOS_STR, n + 1);
    return out_close(&o, err, errlen);
}

static int write_merges(const char *dir, const char *name, char **tokens, const int *ml, const int *mr, int nm,
                        char *err, size_t errlen) {
    out_file o;
    if (out_open(&o, dir, name, err, errlen)) return -1;
    fputs("#version: 0.2\n", o.f);
    for (int i = 0; i < nm; i++) fprintf(o.f, "%s %s\n", tokens[ml[i]], tokens[mr[i]]);
    return out_close(&o, err, errlen);
}

/* ------------------------------------------------------------------ */
/* hash tables: token string -> id, and word (id sequence) -> word index */

static uint64_t fnv1a(const void *p, size_t n) {
    const uint8_t *s = p;
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) { h ^= s[i]; h *= 1099511628211ull; }
    return h;
}

typedef struct {
    /* tokens */
    char **tok; int ntok, captok;
    int *thash; size_t tcap;             /* open addressing, stores id + 1 */
    /* distinct words: symbols in one pool */
    int *sym; size_t nsym, capsym;
    size_t *wstart; int *wlen; long long *wcount; int nword, capword;
    int *whash; size_t wcap;             /* stores word index + 1 */
    /* merges */
    int *ml, *mr; int nmerge, capmerge;
} trainer;

static int tok_find(const trainer *tr, const char *s) {
    size_t mask = tr->tcap - 1, h = (size_t)fnv1a(s, strlen(s)) & mask;
    for (; tr->thash[h]; h = (h + 1) & mask)
        if (strcmp(tr->tok[tr->thash[h] - 1], s) == 0) return tr->thash[h] - 1;
    return -1;
}

static int grow(void **p, int *cap, int need, size_t elem) {
    if (need <= *cap) return 0;
    int c = *cap ? *cap : 64;
    while (c < need) c *= 2;
    void *q = realloc(*p, (size_t)c * elem);
    if (!q) return -1;
    *p = q; *cap = c;
    return 0;
}

/* append a token (s is taken over); the table keeps load <= 1/2 */
static int tok_add(trainer *tr, char *s) {
    if (grow((void **)&tr->tok, &tr->captok, tr->ntok + 1, sizeof *tr->tok)) return -1;
    if (2 * (size_t)(tr->ntok + 1) > tr->tcap) {
        size_t nc = tr->tcap ? 2 * tr->tcap : 1024;
        int *nh = calloc(nc, sizeof *nh);
        if (!nh) return -1;
        free(tr->thash); tr->thash = nh; tr->tcap = nc;
        for (int i = 0; i < tr->ntok; i++) {
            size_t h = (size_t)fnv1a(tr->tok[i], strlen(tr->tok[i])) & (nc - 1);
            while (nh[h]) h = (h + 1) & (nc - 1);
            nh[h] = i + 1;
        }
    }
    tr->tok[tr->ntok] = s;
    size_t mask = tr->tcap - 1, h = (size_t)fnv1a(s, strlen(s)) & mask;
    while (tr->thash[h]) h = (h + 1) & mask;
    tr->thash[h] = ++tr->ntok;
    return 0;
}

static int word_rehash(trainer *tr, size_t nc) {
    int *nh = calloc(nc, sizeof *nh);
    if (!nh) return -1;
    for (int i = 0; i < tr->nword; i++) {
        size_t h = (size_t)fnv1a(tr->sym + tr->wstart[i], (size_t)tr->wlen[i] * sizeof(int)) & (nc - 1);
        while (nh[h]) h = (h + 1) & (nc - 1);
        nh[h] = i + 1;
    }
    free(tr->whash); tr->whash = nh; tr->wcap = nc;
    return 0;
}

/* count one occurrence of the word w[0..n) */
static int word_add(trainer *tr, const int *w, int n) {
    if (2 * (size_t)(tr->nword + 1) > tr->wcap && word_rehash(tr, tr->wcap ? 2 * tr->wcap : 1024)) return -1;
    size_t bytes = (size_t)n * sizeof(int), mask = tr->wcap - 1, h = (size_t)fnv1a(w, bytes) & mask;
    for (; tr->whash[h]; h = (h + 1) & mask) {
        int i = tr->whash[h] - 1;
        if (tr->wlen[i] == n && memcmp(tr->sym + tr->wstart[i], w, bytes) == 0) { tr->wcount[i]++; return 0; }
    }
    if (tr->nsym + (size_t)n > tr->capsym) {
        size_t c = tr->capsym ? tr->capsym : 1024;
        while (c < tr->nsym + (size_t)n) c *= 2;
        int *q = realloc(tr->sym, c * sizeof *q);
        if (!q) return -1;
        tr->sym = q; tr->capsym = c;
    }
    int cap = tr->capword;
    if (grow((void **)&tr->wstart, &cap, tr->nword + 1, sizeof *tr->wstart)) return -1;
    cap = tr->capword;
    if (grow((void **)&tr->wlen, &cap, tr->nword + 1, sizeof *tr->wlen)) return -1;
    if (grow((void **)&tr->wcount, &tr->capword, tr->nword + 1, sizeof *tr->wcount)) return -1;
    memcpy(tr->sym + tr->nsym, w, bytes);
    tr->wstart[tr->nword] = tr->nsym; tr->wlen[tr->nword] = n; tr->wcount[tr->nword] = 1;
    tr->nsym += (size_t)n;
    tr->whash[h] = ++tr->nword;
    return 0;
}

static void trainer_free(trainer *tr) {
    for (int i = 0; i < tr->ntok; i++) free(tr->tok[i]);
    free(tr->tok); free(tr->thash); free(tr->sym); free(tr->wstart); free(tr->wlen); free(tr->wcount);
    free(tr->whash); free(tr->ml); free(tr->mr);
}

/* ------------------------------------------------------------------ */
/* pair counting                                                       */

typedef struct { int a, b; long long c; } pair;

static int pair_cmp(const void *x, const void *y) {
    const pair *p = x, *q = y;
    if (p->a != q->a) return p->a < q->a ? -1 : 1;
    if (p->b != q->b) return p->b < q->b ? -1 : 1;
    return 0;
}

/* is (a, b) with count c a better merge than (a2, b2) with count c2? */
static int pair_better(const trainer *tr, int a, int b, long long c, int a2, int b2, long long c2) {
    if (c != c2) return c > c2;
    int s = strcmp(tr->tok[a], tr->tok[a2]);
    if (s) return s < 0;
    return strcmp(tr->tok[b], tr->tok[b2]) < 0;
}

/* ------------------------------------------------------------------ */

int bpe_train(const char *const *texts, int n_texts, int vocab_size, const char *out_dir,
              char *err, size_t errlen) {
    char e2[TOK_ERR_LEN];
    if (!texts || n_texts <= 0) { snprintf(err, errlen, "bpe_train: no texts to learn from (give at least one caption)"); return -1; }
    if (vocab_size < BPE_MIN_VOCAB || vocab_size > BPE_MAX_VOCAB) {
        snprintf(err, errlen, "bpe_train: vocabulary size %d out of range (%d..%d: the 512 byte symbols and 2 specials come first)",
                 vocab_size, BPE_MIN_VOCAB, BPE_MAX_VOCAB);
        return -1;
    }
    if (!out_dir) { snprintf(err, errlen, "bpe_train: no output folder"); return -1; }

    trainer tr; memset(&tr, 0, sizeof tr);
    tokenizer *bt = NULL;
    int *ids = NULL; pair *pairs = NULL;
    int result = -1;

    /* the byte alphabet, in CLIP's order: symbols, then symbols + "</w>" */
    char sym[256][3]; int order[256];
    byte_symbols(sym, order);
    for (int w = 0; w < 2; w++)
        for (int k = 0; k < 256; k++) {
            char *s = malloc(8);
            if (!s) goto oom;
            snprintf(s, 8, "%s%s", sym[order[k]], w ? "</w>" : "");
            if (tok_add(&tr, s)) { free(s); goto oom; }
        }

    /* the byte-only tokenizer does the pre-tokenisation */
    if (write_vocab(out_dir, "bpe_bytes_vocab.json", tr.tok, 512, err, errlen)) goto done;
    if (write_merges(out_dir, "bpe_bytes_merges.txt", tr.tok, NULL, NULL, 0, err, errlen)) goto done;
    {
        char vp[4200], mp[4200];
        snprintf(vp, sizeof vp, "%s/bpe_bytes_vocab.json", out_dir);
        snprintf(mp, sizeof mp, "%s/bpe_bytes_merges.txt", out_dir);
        bt = tok_load_files(vp, mp, e2, sizeof e2);
        remove(vp); remove(mp);
        if (!bt) { snprintf(err, errlen, "bpe_train: %s", e2); goto done; }
    }
    /* the loaded tokenizer must number the bytes as we do */
    for (int k = 0; k < 256; k++)
        if (bt->byte_id[order[k]] != k || bt->byte_id_w[order[k]] != 256 + k) {
            snprintf(err, errlen, "bpe_train: byte alphabet disagrees with tokenizer.c (internal error)");
            goto done;
        }

    /* distinct words and their counts; a word ends at a "</w>" symbol
     * (ids 256..511); specials (512, 513) are not words */
    size_t cap_ids = 0;
    for (int i = 0; i < n_texts; i++) {
        if (!texts[i]) continue;
        size_t need = 4 * strlen(texts[i]) + 16;
        int n;
        for (;;) {
            if (need > cap_ids) {
                int *q = realloc(ids, need * sizeof *q);
                if (!q) goto oom;
                ids = q; cap_ids = need;
            }
            if (cap_ids > (size_t)0x7fffffff) goto oom;
            n = tok_encode(bt, texts[i], ids, (int)cap_ids);
            if (n < 0) goto oom;
            if ((size_t)n < cap_ids) break;
            need = 2 * cap_ids;   /* may have stopped early: retry with room to spare */
        }
        int start = 0;
        for (int k = 0; k < n; k++) {
            if (ids[k] >= 512) { start = k + 1; continue; }
            if (ids[k] >= 256) {
                if (word_add(&tr, ids + start, k + 1 - start)) goto oom;
                start = k + 1;
            }
        }
    }
    if (tr.nword == 0) { snprintf(err, errlen, "bpe_train: the texts contain no words (only whitespace?)"); goto done; }

    /* merge until the vocabulary (plus the two specials) is full */
    size_t cap_pairs = tr.nsym;
    pairs = malloc((cap_pairs ? cap_pairs : 1) * sizeof *pairs);
    if (!pairs) goto oom;
    while (tr.ntok + 2 < vocab_size) {
        size_t np = 0;
        for (int w = 0; w < tr.nword; w++) {
            const int *s = tr.sym + tr.wstart[w];
            for (int k = 0; k + 1 < tr.wlen[w]; k++) pairs[np++] = (pair){s[k], s[k + 1], tr.wcount[w]};
        }
        if (np == 0) break;   /* every word is one token */
        qsort(pairs, np, sizeof *pairs, pair_cmp);
        int ba = -1, bb = -1; long long bc = 0;
        for (size_t i = 0; i < np;) {
            size_t j = i; long long c = 0;
            while (j < np && pairs[j].a == pairs[i].a && pairs[j].b == pairs[i].b) c += pairs[j++].c;
            if (ba < 0 || pair_better(&tr, pairs[i].a, pairs[i].b, c, ba, bb, bc)) { ba = pairs[i].a; bb = pairs[i].b; bc = c; }
            i = j;
        }
        /* the new token; a string already in the vocabulary (reached by
         * another split) keeps its id, and the merge is still recorded */
        size_t la = strlen(tr.tok[ba]), lb = strlen(tr.tok[bb]);
        char *js = malloc(la + lb + 1);
        if (!js) goto oom;
        memcpy(js, tr.tok[ba], la); memcpy(js + la, tr.tok[bb], lb + 1);
        int nid = tok_find(&tr, js);
        if (nid >= 0) free(js);
        else { nid = tr.ntok; if (tok_add(&tr, js)) { free(js); goto oom; } }
        int cap = tr.capmerge;
        if (grow((void **)&tr.ml, &cap, tr.nmerge + 1, sizeof(int))) goto oom;
        if (grow((void **)&tr.mr, &tr.capmerge, tr.nmerge + 1, sizeof(int))) goto oom;
        tr.ml[tr.nmerge] = ba; tr.mr[tr.nmerge] = bb; tr.nmerge++;
        /* apply it: left to right, non-overlapping (a a a -> aa a) */
        for (int w = 0; w < tr.nword; w++) {
            int *s = tr.sym + tr.wstart[w], n = tr.wlen[w], m = 0;
            for (int k = 0; k < n; k++) {
                if (k + 1 < n && s[k] == ba && s[k + 1] == bb) { s[m++] = nid; k++; }
                else s[m++] = s[k];
            }
            tr.wlen[w] = m;
        }
        /* the word table is keyed by the old sequences; it is not used again */
    }

    if (write_vocab(out_dir, "vocab.json", tr.tok, tr.ntok, err, errlen)) goto done;
    if (write_merges(out_dir, "merges.txt", tr.tok, tr.ml, tr.mr, tr.nmerge, err, errlen)) goto done;
    result = tr.ntok + 2;
    goto done;
oom:
    snprintf(err, errlen, "bpe_train: out of memory");
done:
    tok_free(bt);
    free(ids); free(pairs);
    trainer_free(&tr);
    return result;
}

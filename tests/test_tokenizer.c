/* test_tokenizer.c: the CLIP BPE tokenizer.
 *  - always: a hand-made vocabulary (tests/fixtures/tokenizer_tiny) whose
 *    expected ids follow from its merges by hand (and were confirmed with
 *    transformers by tools/make_tokenizer_fixtures.py); BOS/EOS/padding/
 *    truncation; malformed vocab/merges/gz files give errors, not crashes.
 *  - with OpenAI's vocabulary ($SDLORA_CLIP_VOCAB or
 *    tests/fixtures/vocab/bpe_simple_vocab_16e6.txt.gz, fetched by
 *    tools/get_clip_vocab.sh): the 77 ids transformers' CLIPTokenizer gives
 *    for every prompt in tests/fixtures/tokenizer_cases.json. */
#include "testutil.h"
#include "tokenizer.h"
#include "inflate.h"
#include "json.h"

#include <time.h>
#include <unistd.h>

#define TINY FIXTURE_DIR "tokenizer_tiny"
#define VOCAB_DEFAULT FIXTURE_DIR "vocab/bpe_simple_vocab_16e6.txt.gz"

#if defined(__SANITIZE_ADDRESS__)
#define SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SANITIZED 1
#endif
#endif
#ifndef SANITIZED
#define SANITIZED 0
#endif

/* CPU time: the timing bounds should not depend on how busy the machine is */
static double now_s(void) { return (double)clock() / CLOCKS_PER_SEC; }

static uint32_t xs = 2463534242u;
static uint32_t xrand(void) { xs ^= xs << 13; xs ^= xs >> 17; xs ^= xs << 5; return xs; }

static tokenizer *load_tiny(void) {
    char err[TOK_ERR_LEN];
    tokenizer *t = tok_load(TINY, err, sizeof err);
    ck_assert_msg(t != NULL, "%s", err);
    return t;
}

/* encode without BOS/EOS and compare */
static void expect_ids(const tokenizer *t, const char *text, const int *want, int nwant) {
    int ids[256];
    int n = tok_encode(t, text, ids, 256);
    ck_assert_msg(n == nwant, "'%s': %d ids, expected %d", text, n, nwant);
    for (int i = 0; i < n; i++) ck_assert_msg(ids[i] == want[i], "'%s': id[%d] = %d, expected %d", text, i, ids[i], want[i]);
}
#define EXPECT(t, text, ...) do { const int w_[] = {__VA_ARGS__}; expect_ids(t, text, w_, (int)(sizeof w_ / sizeof w_[0])); } while (0)

START_TEST(test_tiny_merges) {
    tokenizer *t = load_tiny();
    ck_assert_int_eq(t->n_vocab, 22);
    ck_assert_int_eq(t->n_merges, 6);
    ck_assert_int_eq(t->bos_id, 0); ck_assert_int_eq(t->eos_id, 1); ck_assert_int_eq(t->pad_id, 1);
    /* a b c</w>: "a b" (rank 0) then "ab c</w>" (rank 1) beats "b c</w>" (rank 2) */
    EXPECT(t, "abc", 9);
    EXPECT(t, "bc", 10);
    /* the last b carries </w>, and "a b</w>" is no merge */
    EXPECT(t, "abab", 8, 2, 6);
    /* ranks decide the order: a b | a b | c</w> -> ab ab c</w> -> ab abc</w> ("ab ab" ranks below "ab c</w>") */
    EXPECT(t, "ababc", 8, 9);
    EXPECT(t, "ABC  abc", 9, 9);                   /* lowercase; whitespace separates words */
    EXPECT(t, "d", 1);                             /* unknown symbol -> <|endoftext|> */
    EXPECT(t, "'s", 16);                           /* contraction is its own piece */
    EXPECT(t, "\xc3\xa9", 21);                     /* é as bytes C3 A9 -> symbols Ã ©</w>, not token "é" */
    EXPECT(t, "e\xcc\x81", 21);                    /* e + U+0301 composes to é (NFC) first */
    EXPECT(t, "ab!", 2, 6, 13);                    /* letters and punctuation are separate pieces */
    EXPECT(t, "a<|endoftext|>b", 5, 1, 6);         /* literal special token */
    EXPECT(t, "a<|startoftext|>b", 5, 0, 6);
    ck_assert_int_eq(tok_encode(t, "", NULL, 0), 0);
    ck_assert_int_eq(tok_id(t, "ab"), 8);
    ck_assert_int_eq(tok_id(t, "zz"), -1);
    tok_free(t);
}
END_TEST

START_TEST(test_tiny_sd_padding) {
    tokenizer *t = load_tiny();
    int ids[TOK_CTX];
    int e = tok_encode_sd(t, "abc bc", ids);
    ck_assert_int_eq(e, 3);
    ck_assert_int_eq(ids[0], 0); ck_assert_int_eq(ids[1], 9); ck_assert_int_eq(ids[2], 10); ck_assert_int_eq(ids[3], 1);
    for (int i = 4; i < TOK_CTX; i++) ck_assert_int_eq(ids[i], 1);
    /* empty prompt: BOS EOS pad... */
    e = tok_encode_sd(t, "", ids);
    ck_assert_int_eq(e, 1);
    ck_assert_int_eq(ids[0], 0); ck_assert_int_eq(ids[1], 1);
    /* 100 words: the first 75 survive, EOS at 76 */
    char buf[1024] = "";
    for (int i = 0; i < 100; i++) strcat(buf, i % 2 ? "bc " : "abc ");
    e = tok_encode_sd(t, buf, ids);
    ck_assert_int_eq(e, 76);
    for (int i = 1; i < 76; i++) ck_assert_int_eq(ids[i], i % 2 ? 9 : 10);
    ck_assert_int_eq(ids[76], 1);
    /* exactly 75 fits with no truncation */
    buf[0] = 0;
    for (int i = 0; i < 75; i++) strcat(buf, "abc ");
    ck_assert_int_eq(tok_encode_sd(t, buf, ids), 76);
    /* pad id is a field */
    t->pad_id = 12;
    e = tok_encode_sd(t, "abc", ids);
    ck_assert_int_eq(e, 2); ck_assert_int_eq(ids[2], 1); ck_assert_int_eq(ids[3], 12); ck_assert_int_eq(ids[76], 12);
    /* decode: </w> ends a word */
    int d[] = {0, 9, 10, 8, 6, 21, 1};
    char *s = tok_decode(t, d, 7);
    ck_assert_str_eq(s, "<|startoftext|>abc bc abb \xc3\xa9 <|endoftext|>");
    free(s);
    tok_free(t);
}
END_TEST

/* ---- malformed files, written into a temporary folder ---- */

static char tmpdir[256];

static void setup_tmp(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/sdlora_tok_XXXXXX");
    ck_assert(mkdtemp(tmpdir) != NULL);
}
static void write_bytes(const char *name, const void *p, size_t n) {
    char path[512]; snprintf(path, sizeof path, "%s/%s", tmpdir, name);
    FILE *f = fopen(path, "wb"); ck_assert(f != NULL);
    ck_assert(fwrite(p, 1, n, f) == n); fclose(f);
}
static void write_text(const char *name, const char *s) { write_bytes(name, s, strlen(s)); }
static void rm_tmp(void) {
    const char *names[] = {"vocab.json", "merges.txt", "special_tokens_map.json", "v.gz"};
    char path[512];
    for (int i = 0; i < 4; i++) { snprintf(path, sizeof path, "%s/%s", tmpdir, names[i]); unlink(path); }
    rmdir(tmpdir);
}
static char *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb"); ck_assert_msg(f != NULL, "%s", path);
    fseek(f, 0, SEEK_END); long sz = ftell(f); fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)sz + 1); ck_assert(fread(b, 1, (size_t)sz, f) == (size_t)sz); b[sz] = 0;
    fclose(f); *n = (size_t)sz; return b;
}

/* loading tmpdir must fail with an error naming `mention` */
static void expect_fail(const char *mention) {
    char err[TOK_ERR_LEN] = "";
    tokenizer *t = tok_load(tmpdir, err, sizeof err);
    ck_assert_msg(t == NULL, "loaded a bad tokenizer (expected error about %s)", mention);
    ck_assert_msg(strstr(err, mention) != NULL, "error '%s' does not mention %s", err, mention);
    ck_assert_msg(strchr(err, '\n') == NULL, "error is not one line: %s", err);
}

START_TEST(test_malformed_files) {
    size_t vn, mn;
    char *vocab = slurp(TINY "/vocab.json", &vn), *merges = slurp(TINY "/merges.txt", &mn);
    setup_tmp();
    char err[TOK_ERR_LEN];
    /* missing files */
    expect_fail("vocab.json");
    write_text("vocab.json", vocab);
    expect_fail("merges.txt");
    write_text("merges.txt", merges);
    tokenizer *t = tok_load(tmpdir, err, sizeof err);
    ck_assert_msg(t != NULL, "%s", err); tok_free(t);
    /* every truncation of vocab.json */
    for (size_t k = 0; k < vn - 1; k++) {
        write_bytes("vocab.json", vocab, k);
        expect_fail("vocab.json");
    }
    write_text("vocab.json", "not json at all"); expect_fail("vocab.json");
    write_text("vocab.json", "[1, 2, 3]"); expect_fail("vocab.json");
    write_text("vocab.json", "{}"); expect_fail("vocab.json");
    write_text("vocab.json", "{\"<|startoftext|>\": \"0\", \"<|endoftext|>\": 1}"); expect_fail("vocab.json");
    write_text("vocab.json", "{\"<|startoftext|>\": -1, \"<|endoftext|>\": 1}"); expect_fail("vocab.json");
    write_text("vocab.json", "{\"<|startoftext|>\": 0.5, \"<|endoftext|>\": 1}"); expect_fail("vocab.json");
    write_text("vocab.json", "{\"<|startoftext|>\": 1e300, \"<|endoftext|>\": 1}"); expect_fail("vocab.json");
    write_text("vocab.json", "{\"a\": 0, \"b\": 1, \"ab\": 2}"); write_text("merges.txt", "a b\n");
    expect_fail("vocab.json");   /* no <|startoftext|> */
    /* merges: no space, two spaces, unknown token, merged token missing */
    write_text("vocab.json", vocab);
    write_text("merges.txt", "#version: 0.2\na b\nab\n"); expect_fail("merges.txt line 3");
    write_text("merges.txt", "a  b\n"); expect_fail("merges.txt line 1");
    write_text("merges.txt", "a x\n"); expect_fail("merges.txt line 1");
    write_text("merges.txt", "b b\n"); expect_fail("merges.txt line 1");
    write_text("merges.txt", " a\n"); expect_fail("merges.txt");
    /* every truncation of merges.txt: loads or fails, never crashes */
    for (size_t k = 0; k <= mn; k++) {
        write_bytes("merges.txt", merges, k);
        t = tok_load(tmpdir, err, sizeof err);
        if (t) tok_free(t); else ck_assert(strstr(err, "merges.txt") != NULL);
    }
    /* random byte changes in either file: an error or a tokenizer, never a crash */
    char *mv = malloc(vn), *mm = malloc(mn);
    for (int it = 0; it < 400; it++) {
        memcpy(mv, vocab, vn); memcpy(mm, merges, mn);
        int flips = 1 + (int)(xrand() % 3);
        for (int f = 0; f < flips; f++) {
            if (it % 2) mv[xrand() % vn] = (char)xrand();
            else mm[xrand() % mn] = (char)xrand();
        }
        write_bytes("vocab.json", mv, vn); write_bytes("merges.txt", mm, mn);
        t = tok_load(tmpdir, err, sizeof err);
        if (t) {
            int ids[TOK_CTX];
            ck_assert(tok_encode_sd(t, "abc ab\xc3\xa9 's!", ids) >= 1);
            tok_free(t);
        } else ck_assert(err[0] != 0 && strchr(err, '\n') == NULL);
    }
    free(mv); free(mm);
    write_text("vocab.json", vocab);
    write_text("merges.txt", merges);
    /* CRLF line endings are fine */
    write_text("merges.txt", "#version: 0.2\r\na b\r\nab c</w>\r\n");
    t = tok_load(tmpdir, err, sizeof err);
    ck_assert_msg(t != NULL, "%s", err);
    EXPECT(t, "abc", 9);
    tok_free(t);
    /* special_tokens_map.json sets the pad token (string or {"content": ...}) */
    write_text("merges.txt", merges);
    write_text("special_tokens_map.json", "{\"pad_token\": \"!</w>\"}");
    t = tok_load(tmpdir, err, sizeof err);
    ck_assert_msg(t != NULL, "%s", err); ck_assert_int_eq(t->pad_id, 13); tok_free(t);
    write_text("special_tokens_map.json", "{\"pad_token\": {\"content\": \"<|endoftext|>\", \"lstrip\": false}}");
    t = tok_load(tmpdir, err, sizeof err);
    ck_assert_msg(t != NULL, "%s", err); ck_assert_int_eq(t->pad_id, 1); tok_free(t);
    write_text("special_tokens_map.json", "{\"pad_token\": \"nope\"}"); expect_fail("special_tokens_map.json");
    write_text("special_tokens_map.json", "{\"pad_token\": "); expect_fail("special_tokens_map.json");
    /* loading a vocab.json path finds merges.txt beside it */
    char path[512]; snprintf(path, sizeof path, "%s/vocab.json", tmpdir);
    t = tok_load(path, err, sizeof err); ck_assert_msg(t != NULL, "%s", err); tok_free(t);
    ck_assert(tok_load("/nonexistent/tokenizer", err, sizeof err) == NULL);
    ck_assert(strstr(err, "not found") != NULL);
    rm_tmp();
    free(vocab); free(merges);
}
END_TEST

/* a gzip member holding data in stored blocks, so the test needs no compressor */
static uint8_t *make_gz(const uint8_t *data, size_t n, size_t *outn) {
    size_t nb = n / 65535 + 1, cap = 18 + n + 5 * nb;
    uint8_t *g = malloc(cap), *p = g;
    const uint8_t hdr[10] = {0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3};
    memcpy(p, hdr, 10); p += 10;
    size_t off = 0;
    for (size_t b = 0; b < nb; b++) {
        size_t len = n - off < 65535 ? n - off : 65535;
        *p++ = b == nb - 1;   /* BFINAL, BTYPE 00 */
        *p++ = (uint8_t)len; *p++ = (uint8_t)(len >> 8);
        *p++ = (uint8_t)~len; *p++ = (uint8_t)(~len >> 8);
        memcpy(p, data + off, len); p += len; off += len;
    }
    uint32_t crc = crc32_update(0, data, n);
    for (int i = 0; i < 4; i++) *p++ = (uint8_t)(crc >> (8 * i));
    for (int i = 0; i < 4; i++) *p++ = (uint8_t)((uint32_t)n >> (8 * i));
    *outn = (size_t)(p - g);
    return g;
}

START_TEST(test_malformed_gz) {
    setup_tmp();
    char path[512], err[TOK_ERR_LEN];
    snprintf(path, sizeof path, "%s/v.gz", tmpdir);
    /* too few merge lines */
    const char *small = "\"bpe_simple_vocab_16e6.txt#version: 0.2\ni n\nt h\n";
    size_t gn; uint8_t *g = make_gz((const uint8_t *)small, strlen(small), &gn);
    write_bytes("v.gz", g, gn);
    ck_assert(tok_load(path, err, sizeof err) == NULL);
    ck_assert_msg(strstr(err, "v.gz") && strstr(err, "merges"), "%s", err);
    /* truncated gzip */
    for (size_t k = 0; k < gn; k += 3) {
        write_bytes("v.gz", g, k);
        ck_assert(tok_load(path, err, sizeof err) == NULL);
        ck_assert_msg(strstr(err, "v.gz") != NULL, "%s", err);
    }
    free(g);
    /* not gzip at all */
    write_text("v.gz", "{\"hello\": 1}");
    ck_assert(tok_load(path, err, sizeof err) == NULL);
    ck_assert_msg(strstr(err, "gzip") != NULL, "%s", err);
    /* enough lines, but one without a space */
    size_t cap = 49000 * 8, n = 0;
    char *big = malloc(cap);
    n += (size_t)sprintf(big + n, "header\n");
    for (int i = 0; i < 48894; i++) n += (size_t)sprintf(big + n, i == 100 ? "ab\n" : "a b\n");
    g = make_gz((const uint8_t *)big, n, &gn);
    write_bytes("v.gz", g, gn);
    ck_assert(tok_load(path, err, sizeof err) == NULL);
    ck_assert_msg(strstr(err, "line 102") != NULL, "%s", err);
    free(g); free(big);
    rm_tmp();
}
END_TEST

START_TEST(test_bad_utf8_and_long) {
    tokenizer *t = load_tiny();
    int ids[TOK_CTX];
    /* invalid UTF-8 is read as U+FFFD, whose bytes are unknown here: unk ids, no crash */
    const char *bad[] = {"\xff", "\xc3", "a\xe2\x82", "\xed\xa0\x80", "\xf4\x90\x80\x80", "\xc0\xaf", "abc\x80"};
    for (int i = 0; i < 7; i++) ck_assert(tok_encode_sd(t, bad[i], ids) >= 1);
    /* random bytes: always BOS ... EOS with ids in the vocabulary */
    for (int it = 0; it < 3000; it++) {
        char r[80]; int len = (int)(xrand() % 79);
        for (int i = 0; i < len; i++) r[i] = (char)(1 + xrand() % 255);
        r[len] = 0;
        int e = tok_encode_sd(t, r, ids);
        ck_assert(e >= 1 && e <= TOK_CTX - 1);
        for (int i = 0; i < TOK_CTX; i++) ck_assert(ids[i] >= 0 && ids[i] < t->n_vocab);
        char *d = tok_decode(t, ids, TOK_CTX);
        ck_assert(d != NULL); free(d);
    }
    /* a 200k-character word and 200k characters of mixed text are fast */
    size_t n = 200000;
    char *s = malloc(n + 1);
    for (size_t i = 0; i < n; i++) s[i] = "ab"[i % 2];
    s[n] = 0;
    double t0 = now_s();
    int *all = malloc(n * sizeof(int));
    int k = tok_encode(t, s, all, (int)n);
    /* a b a b ... a b</w>: every "a b" (rank 0), then "ab ab" pairs left to
     * right: 99999 ab -> 49999 abab + ab, then a, b</w> */
    ck_assert_int_eq(k, 50002);
    for (int i = 0; i < 49999; i++) ck_assert_int_eq(all[i], 11);
    ck_assert_int_eq(all[49999], 8); ck_assert_int_eq(all[50000], 2); ck_assert_int_eq(all[50001], 6);
    free(all);
    for (size_t i = 0; i < n; i++) s[i] = "aB c!\xc3\xa9\t"[i % 8];
    s[n - 1] = 0;
    k = tok_encode_sd(t, s, ids);
    ck_assert_int_eq(k, 76);
    double dt = now_s() - t0;
    ck_assert_msg(dt < 2.0, "long inputs took %.2f s", dt);
    free(s);
    tok_free(t);
}
END_TEST

/* ---- the real vocabulary ---- */

static const char *vocab_path(void) {
    const char *p = getenv("SDLORA_CLIP_VOCAB");
    if (p && *p) return p;
    return VOCAB_DEFAULT;
}
static int have_vocab(void) {
    FILE *f = fopen(vocab_path(), "rb");
    if (!f) return 0;
    fclose(f);
    return 1;
}

START_TEST(test_clip_parity) {
    if (!have_vocab()) {
        printf("tokenizer parity SKIPPED: CLIP vocabulary not found (run tools/get_clip_vocab.sh)\n");
        return;
    }
    char err[TOK_ERR_LEN];
    double t0 = now_s();
    tokenizer *t = tok_load(vocab_path(), err, sizeof err);
    double dt = now_s() - t0;
    ck_assert_msg(t != NULL, "%s", err);
    printf("CLIP vocabulary loaded in %.3f s\n", dt);
    if (!SANITIZED) ck_assert_msg(dt < 0.5, "loading took %.3f s", dt);
    ck_assert_int_eq(t->n_vocab, 49408);
    ck_assert_int_eq(t->bos_id, 49406); ck_assert_int_eq(t->eos_id, 49407); ck_assert_int_eq(t->pad_id, 49407);

    size_t n; char *text = slurp(FIXTURE_DIR "tokenizer_cases.json", &n);
    json *j = json_parse(text, n, err, sizeof err);
    ck_assert_msg(j != NULL, "%s", err);
    free(text);
    const json *cases = json_get(j, "cases");
    ck_assert(cases && cases->type == JSON_ARRAY && cases->n >= 300);
    int match = 0;
    for (int c = 0; c < cases->n; c++) {
        const json *txt = json_get(&cases->items[c], "text"), *ids = json_get(&cases->items[c], "ids");
        ck_assert(txt && ids && ids->type == JSON_ARRAY && ids->n == TOK_CTX);
        int got[TOK_CTX], e = tok_encode_sd(t, txt->string, got), ok = 1;
        for (int i = 0; i < TOK_CTX; i++) {
            int w = (int)ids->items[i].number;
            if (got[i] != w) {
                if (ok) printf("case %d: id[%d] = %d, transformers %d\n", c, i, got[i], w);
                ok = 0;
            }
        }
        /* the returned EOS index: ids after it are all padding */
        ck_assert(got[e] == t->eos_id);
        for (int i = e + 1; i < TOK_CTX; i++) ck_assert(got[i] == t->pad_id);
        match += ok;
    }
    printf("tokenizer parity: %d of %d prompts identical to transformers\n", match, cases->n);
    ck_assert_int_eq(match, cases->n);
    json_free(j);
    tok_free(t);
}
END_TEST

/* the real vocabulary written as vocab.json + merges.txt loads to the same tokenizer */
START_TEST(test_clip_json_roundtrip) {
    if (!have_vocab()) return;
    char err[TOK_ERR_LEN];
    tokenizer *a = tok_load(vocab_path(), err, sizeof err);
    ck_assert_msg(a != NULL, "%s", err);
    setup_tmp();
    char path[512];
    snprintf(path, sizeof path, "%s/vocab.json", tmpdir);
    FILE *f = fopen(path, "wb");
    fputc('{', f);
    for (int i = 0; i < a->n_vocab; i++) {
        fputc('"', f);
        for (const char *p = a->tokens[i]; *p; p++) {
            if (*p == '"' || *p == '\\') fputc('\\', f);
            fputc(*p, f);
        }
        fprintf(f, "\": %d%s", i, i + 1 < a->n_vocab ? ", " : "}");
    }
    fclose(f);
    /* merges from the gz, lines 1..48894 */
    size_t gn, rn; char *gz = slurp(vocab_path(), &gn); uint8_t *raw;
    ck_assert(inflate_gzip((uint8_t *)gz, gn, &raw, &rn, err, sizeof err) == 0);
    free(gz);
    size_t p = 0, lines = 0;
    while (p < rn && lines < 48895) { if (raw[p] == '\n') lines++; p++; }
    snprintf(path, sizeof path, "%s/merges.txt", tmpdir);
    f = fopen(path, "wb");
    fputs("#version: 0.2\n", f);
    const uint8_t *first = memchr(raw, '\n', rn) + 1;
    fwrite(first, 1, (size_t)(raw + p - first), f);
    fclose(f);
    free(raw);
    double t0 = now_s();
    tokenizer *b = tok_load(tmpdir, err, sizeof err);
    double dt = now_s() - t0;
    ck_assert_msg(b != NULL, "%s", err);
    printf("vocab.json + merges.txt loaded in %.3f s\n", dt);
    if (!SANITIZED) ck_assert_msg(dt < 0.5, "loading took %.3f s", dt);
    ck_assert_int_eq(b->n_vocab, a->n_vocab); ck_assert_int_eq(b->n_merges, a->n_merges);
    const char *texts[] = {"a photo of a cat", "Ünïcödé 日本語 🐱 it's 3.14", "(masterpiece:1.2) <lora:x:0.5>"};
    for (int k = 0; k < 3; k++) {
        int ia[TOK_CTX], ib[TOK_CTX];
        ck_assert_int_eq(tok_encode_sd(a, texts[k], ia), tok_encode_sd(b, texts[k], ib));
        ck_assert(memcmp(ia, ib, sizeof ia) == 0);
    }
    tok_free(a); tok_free(b);
    rm_tmp();
}
END_TEST

START_TEST(test_clip_known_and_long) {
    if (!have_vocab()) return;
    char err[TOK_ERR_LEN];
    tokenizer *t = tok_load(vocab_path(), err, sizeof err);
    ck_assert_msg(t != NULL, "%s", err);
    /* openai/clip-vit-large-patch14 on "a photo of a cat" */
    int want[] = {49406, 320, 1125, 539, 320, 2368, 49407}, ids[TOK_CTX];
    ck_assert_int_eq(tok_encode_sd(t, "a photo of a cat", ids), 6);
    for (int i = 0; i < 7; i++) ck_assert_int_eq(ids[i], want[i]);
    char *d = tok_decode(t, ids, 7);
    ck_assert_str_eq(d, "<|startoftext|>a photo of a cat <|endoftext|>");
    free(d);
    /* one 100k-letter word: BPE must not be quadratic */
    size_t n = 100000;
    char *s = malloc(n + 1);
    uint32_t x = 7;
    for (size_t i = 0; i < n; i++) { x = x * 1103515245u + 12345u; s[i] = (char)('a' + (x >> 16) % 26); }
    s[n] = 0;
    double t0 = now_s();
    int *all = malloc(n * sizeof(int));
    int k = tok_encode(t, s, all, (int)n);
    double dt = now_s() - t0;
    ck_assert(k > 10000 && k < (int)n);
    printf("100k-letter word: %d tokens in %.3f s\n", k, dt);
    ck_assert_msg(dt < 3.0, "%.3f s", dt);
    /* decoding gives the word back */
    d = tok_decode(t, all, k);
    ck_assert(strcmp(d, s) == 0);
    free(d); free(all); free(s);
    tok_free(t);
}
END_TEST

START_TEST(test_clip_truncated_gz) {
    if (!have_vocab()) return;
    size_t gn; char *gz = slurp(vocab_path(), &gn);
    setup_tmp();
    char path[512], err[TOK_ERR_LEN];
    snprintf(path, sizeof path, "%s/v.gz", tmpdir);
    size_t cuts[] = {0, 10, 100, gn / 3, gn / 2, gn - 9, gn - 1};
    for (int i = 0; i < 7; i++) {
        write_bytes("v.gz", gz, cuts[i]);
        ck_assert(tok_load(path, err, sizeof err) == NULL);
        ck_assert_msg(strstr(err, "v.gz") != NULL, "%s", err);
    }
    gz[gn / 2] ^= 0x55;   /* corrupt one byte */
    write_bytes("v.gz", gz, gn);
    ck_assert(tok_load(path, err, sizeof err) == NULL);
    free(gz);
    rm_tmp();
}
END_TEST

static Suite *tokenizer_suite(void) {
    Suite *s = suite_create("tokenizer");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_tiny_merges);
    tcase_add_test(tc, test_tiny_sd_padding);
    tcase_add_test(tc, test_malformed_files);
    tcase_add_test(tc, test_malformed_gz);
    tcase_add_test(tc, test_bad_utf8_and_long);
    tcase_add_test(tc, test_clip_parity);
    tcase_add_test(tc, test_clip_json_roundtrip);
    tcase_add_test(tc, test_clip_known_and_long);
    tcase_add_test(tc, test_clip_truncated_gz);
    suite_add_tcase(s, tc);
    return s;
}

CHECK_MAIN(tokenizer_suite)

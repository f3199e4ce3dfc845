/* test_bpe_train.c: the BPE trainer (bpe_train.c), checked through the
 * tokenizer that will use its files (tokenizer.c):
 *  - frequent caption words become single tokens; encode -> decode gives
 *    the caption back; every id is inside the vocabulary
 *  - the layout CLIP has: 256 byte symbols, their "</w>" forms, merges,
 *    then <|startoftext|> and <|endoftext|> as the last two ids
 *  - hand-worked merges on a two-word corpus, including the tie rule
 *  - training twice gives byte-identical files
 *  - bad arguments (vocabulary smaller than the byte alphabet, no texts,
 *    no words, missing folder) are errors */
#include "testutil.h"
#include "tokenizer.h"
#include "bpe_train.h"

#include <sys/stat.h>
#include <unistd.h>

static const char *const CAPTIONS[] = {
    "a big red circle on the left, blue background",
    "two yellow stars, white background",
    "a small green square at the top, black background",
    "a red circle on the left and a blue square on the right, white background",
    "three purple triangles, sky and grass",
    "a big orange ring in the center, green background",
    "a small blue star at the bottom, yellow background",
    "two red squares, blue background",
    "a big white triangle on the right, purple background",
    "a small black circle in the center, sky and grass",
    "Caf\xc3\xa9 it's  BLUE!!",   /* accents, contraction, case, punctuation */
};
#define NCAP ((int)(sizeof CAPTIONS / sizeof CAPTIONS[0]))

/* a fresh folder under /tmp */
static void tmp_dir(char *buf, size_t n, const char *tag) {
    snprintf(buf, n, "/tmp/test_bpe_train_%s_%d", tag, (int)getpid());
    mkdir(buf, 0700);
}

static void rm_dir(const char *d) {
    char p[512];
    snprintf(p, sizeof p, "%s/vocab.json", d); remove(p);
    snprintf(p, sizeof p, "%s/merges.txt", d); remove(p);
    rmdir(d);
}

static char *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END); long sz = ftell(f); fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)sz + 1);
    *n = fread(b, 1, (size_t)sz, f);
    b[*n] = 0;
    fclose(f);
    return b;
}

START_TEST(test_captions_roundtrip) {
    char d[256], err[TOK_ERR_LEN];
    tmp_dir(d, sizeof d, "rt");
    int nv = bpe_train(CAPTIONS, NCAP, 700, d, err, sizeof err);
    ck_assert_msg(nv > BPE_MIN_VOCAB && nv <= 700, "%d: %s", nv, err);
    tokenizer *t = tok_load(d, err, sizeof err);
    ck_assert_msg(t != NULL, "%s", err);
    ck_assert_int_eq(t->n_vocab, nv);
    /* CLIP's layout: specials last, bytes first ("!" is the first printable byte) */
    ck_assert_int_eq(t->bos_id, nv - 2);
    ck_assert_int_eq(t->eos_id, nv - 1);
    ck_assert_int_eq(tok_id(t, "!"), 0);
    ck_assert_int_eq(tok_id(t, "!</w>"), 256);
    ck_assert_int_eq(tok_id(t, "\xc4\xa0"), 188 + 32);   /* the space byte: U+0120, after the 188 printable bytes and bytes 0..31 */

    /* frequent words are whole tokens */
    const char *words[] = {"background", "circle", "red", "blue", "on", "the"};
    int ids[256];
    for (int i = 0; i < 6; i++) {
        char w[64]; snprintf(w, sizeof w, "%s</w>", words[i]);
        ck_assert_msg(tok_id(t, w) >= 512, "'%s' is not a learned token", w);
        ck_assert_int_eq(tok_encode(t, words[i], ids, 256), 1);
        ck_assert_int_eq(ids[0], tok_id(t, w));
    }
    int n = tok_encode(t, CAPTIONS[0], ids, 256);
    /* a big red circle on the left , blue background: 10 words, 10 tokens */
    ck_assert_int_eq(n, 10);
    ck_assert_int_eq(ids[3], tok_id(t, "circle</w>"));
    ck_assert_int_eq(ids[7], tok_id(t, ",</w>"));
    ck_assert_int_eq(ids[9], tok_id(t, "background</w>"));

    /* every caption: ids in range, and decode gives the normalised caption back */
    for (int c = 0; c < NCAP; c++) {
        n = tok_encode(t, CAPTIONS[c], ids, 256);
        ck_assert_int_gt(n, 0);
        int bad = 0;
        for (int k = 0; k < n; k++) bad |= ids[k] < 0 || ids[k] >= nv - 2;
        ck_assert_msg(!bad, "caption %d: id out of range", c);
        char *s = tok_decode(t, ids, n);
        if (c < NCAP - 1) {
            /* the commas come back with a space before them, as HF decode gives */
            char want[256]; const char *p = CAPTIONS[c]; size_t o = 0;
            for (; *p; p++) { if (*p == ',') want[o++] = ' '; want[o++] = *p; }
            want[o] = 0;
            ck_assert_str_eq(s, want);
        } else {
            ck_assert_str_eq(s, "caf\xc3\xa9 it 's blue !!");
        }
        free(s);
    }
    tok_free(t);
    rm_dir(d);
}
END_TEST

/* The merges on "low low low lower" worked by hand.
 * Words: low</w> x3, lower</w> x1 (symbols l o w </w>-forms).
 *   pairs: (l,o) 4, (o,w</w>) 3, (o,w) 1, (w,e) 1, (e,r</w>) 1
 *   1: l o      -> lo       (count 4)
 *   2: lo w</w> -> low</w>  (3)
 *   now low</w> is one token; lower</w> = lo w e r</w>, every pair count 1:
 *   ties go to the smallest (left, right) strings: "e" < "lo" < "w", so
 *   3: e r</w>  -> er</w>
 *   4: lo w     -> low   ("lo" < "w")
 *   5: low er</w> -> lower</w>
 *   then no pairs are left. */
START_TEST(test_hand_worked) {
    const char *txt[] = {"low low", "low lower"};
    char d[256], err[TOK_ERR_LEN];
    tmp_dir(d, sizeof d, "hand");
    int nv = bpe_train(txt, 2, 1000, d, err, sizeof err);
    ck_assert_msg(nv == 512 + 5 + 2, "%d: %s", nv, err);
    char p[512]; size_t n;
    snprintf(p, sizeof p, "%s/merges.txt", d);
    char *m = slurp(p, &n);
    ck_assert_ptr_nonnull(m);
    ck_assert_str_eq(m, "#version: 0.2\nl o\nlo w</w>\ne r</w>\nlo w\nlow er</w>\n");
    free(m);
    tokenizer *t = tok_load(d, err, sizeof err);
    ck_assert_msg(t != NULL, "%s", err);
    ck_assert_int_eq(tok_id(t, "lo"), 512);
    ck_assert_int_eq(tok_id(t, "low</w>"), 513);
    ck_assert_int_eq(tok_id(t, "er</w>"), 514);
    ck_assert_int_eq(tok_id(t, "low"), 515);
    ck_assert_int_eq(tok_id(t, "lower</w>"), 516);
    ck_assert_int_eq(tok_id(t, "<|startoftext|>"), 517);
    ck_assert_int_eq(tok_id(t, "<|endoftext|>"), 518);
    int ids[8];
    /* "lowest": l o w e s t</w> -> lo w e s t</w> -> low e s t</w> */
    ck_assert_int_eq(tok_encode(t, "lower low lowest", ids, 8), 6);
    ck_assert_int_eq(ids[0], 516);
    ck_assert_int_eq(ids[1], 513);
    ck_assert_int_eq(ids[2], 515);
    ck_assert_int_eq(ids[3], tok_id(t, "e"));
    ck_assert_int_eq(ids[4], tok_id(t, "s"));
    ck_assert_int_eq(ids[5], tok_id(t, "t</w>"));
    tok_free(t);
    rm_dir(d);
}
END_TEST

/* vocab_size caps the merges: exactly vocab_size tokens */
START_TEST(test_target_size) {
    char d[256], err[TOK_ERR_LEN];
    tmp_dir(d, sizeof d, "size");
    int nv = bpe_train(CAPTIONS, NCAP, 530, d, err, sizeof err);
    ck_assert_msg(nv == 530, "%d: %s", nv, err);
    tokenizer *t = tok_load(d, err, sizeof err);
    ck_assert_msg(t != NULL, "%s", err);
    ck_assert_int_eq(t->n_vocab, 530);
    ck_assert_int_eq(t->n_merges, 530 - 514);   /* no repeated joins this early */
    tok_free(t);
    /* the smallest vocabulary: bytes and specials, no merges */
    nv = bpe_train(CAPTIONS, NCAP, BPE_MIN_VOCAB, d, err, sizeof err);
    ck_assert_int_eq(nv, BPE_MIN_VOCAB);
    t = tok_load(d, err, sizeof err);
    ck_assert_msg(t != NULL, "%s", err);
    int ids[16];
    ck_assert_int_eq(tok_encode(t, "red", ids, 16), 3);
    ck_assert_int_eq(ids[2], tok_id(t, "d</w>"));
    tok_free(t);
    rm_dir(d);
}
END_TEST

START_TEST(test_deterministic) {
    char d1[256], d2[256], err[TOK_ERR_LEN];
    tmp_dir(d1, sizeof d1, "det1");
    tmp_dir(d2, sizeof d2, "det2");
    ck_assert_int_gt(bpe_train(CAPTIONS, NCAP, 1000, d1, err, sizeof err), 0);
    ck_assert_int_gt(bpe_train(CAPTIONS, NCAP, 1000, d2, err, sizeof err), 0);
    const char *names[] = {"vocab.json", "merges.txt"};
    for (int i = 0; i < 2; i++) {
        char p1[512], p2[512]; size_t n1, n2;
        snprintf(p1, sizeof p1, "%s/%s", d1, names[i]);
        snprintf(p2, sizeof p2, "%s/%s", d2, names[i]);
        char *a = slurp(p1, &n1), *b = slurp(p2, &n2);
        ck_assert_ptr_nonnull(a); ck_assert_ptr_nonnull(b);
        ck_assert_msg(n1 == n2 && memcmp(a, b, n1) == 0, "%s differs between runs", names[i]);
        free(a); free(b);
    }
    /* no temporary files left behind */
    char p[512];
    snprintf(p, sizeof p, "%s/bpe_bytes_vocab.json", d1);
    ck_assert_int_ne(access(p, F_OK), 0);
    snprintf(p, sizeof p, "%s/vocab.json.tmp", d1);
    ck_assert_int_ne(access(p, F_OK), 0);
    rm_dir(d1); rm_dir(d2);
}
END_TEST

START_TEST(test_bad_input) {
    char d[256], err[TOK_ERR_LEN];
    tmp_dir(d, sizeof d, "bad");
    err[0] = 0;
    ck_assert_int_eq(bpe_train(CAPTIONS, NCAP, 300, d, err, sizeof err), -1);
    ck_assert_ptr_nonnull(strstr(err, "vocabulary size"));
    ck_assert_int_eq(bpe_train(CAPTIONS, NCAP, BPE_MIN_VOCAB - 1, d, err, sizeof err), -1);
    ck_assert_int_eq(bpe_train(CAPTIONS, NCAP, BPE_MAX_VOCAB + 1, d, err, sizeof err), -1);
    err[0] = 0;
    ck_assert_int_eq(bpe_train(CAPTIONS, 0, 1000, d, err, sizeof err), -1);
    ck_assert_ptr_nonnull(strstr(err, "no texts"));
    ck_assert_int_eq(bpe_train(NULL, 3, 1000, d, err, sizeof err), -1);
    const char *blank[] = {"", "   \t\n", NULL};
    err[0] = 0;
    ck_assert_int_eq(bpe_train(blank, 3, 1000, d, err, sizeof err), -1);
    ck_assert_ptr_nonnull(strstr(err, "no words"));
    err[0] = 0;
    ck_assert_int_eq(bpe_train(CAPTIONS, NCAP, 1000, "/nonexistent/dir/for/bpe", err, sizeof err), -1);
    ck_assert_ptr_nonnull(strstr(err, "cannot write"));
    ck_assert_ptr_null(strchr(err, '\n'));
    /* nothing was written by the failed calls */
    char p[512];
    snprintf(p, sizeof p, "%s/vocab.json", d);
    ck_assert_int_ne(access(p, F_OK), 0);
    rm_dir(d);
}
END_TEST

static Suite *bpe_train_suite(void) {
    Suite *s = suite_create("bpe_train");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_captions_roundtrip);
    tcase_add_test(tc, test_hand_worked);
    tcase_add_test(tc, test_target_size);
    tcase_add_test(tc, test_deterministic);
    tcase_add_test(tc, test_bad_input);
    suite_add_tcase(s, tc);
    return s;
}

CHECK_MAIN(bpe_train_suite)

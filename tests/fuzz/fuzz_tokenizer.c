/* fuzz_tokenizer.c: the tokenizer's files. The input is
 * vocab.json NUL merges.txt NUL text [NUL special_tokens_map.json]: the
 * files are written to a folder and loaded (tok_load on the folder when the
 * fourth part is there, else tok_load_files); a tokenizer that loads then
 * encodes the text and a fixed prompt, and decodes what it got. When the
 * input has no NUL at all it is read as OpenAI's bpe_simple_vocab_16e6.txt.gz. */
#include "fuzz_util.h"
#include "tokenizer.h"

static void exercise(const tokenizer *t, const char *text) {
    int ids[TOK_CTX];
    int e = tok_encode_sd(t, text, ids);
    if (e < 0) return;
    if (e >= TOK_CTX) abort();
    for (int i = 0; i < TOK_CTX; i++) if (ids[i] < 0 || ids[i] >= t->n_vocab) abort();
    char *s = tok_decode(t, ids, TOK_CTX);
    free(s);
    int many[300];
    int k = tok_encode(t, text, many, 300);
    if (k > 300) abort();
    for (int i = 0; i < k; i++) if (many[i] < 0 || many[i] >= t->n_vocab) abort();
    (void)tok_id(t, text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
    char err[TOK_ERR_LEN];
    tokenizer *t;
    const char *text = "a photo of sks dog, <|endoftext|> caf\xc3\xa9 12345 it's";
    char *tx = NULL;
    if (!memchr(data, 0, n)) {
        const char *gz = fuzz_path(0, "bpe.txt.gz");
        fuzz_write(gz, data, n);
        t = tok_load_clip_gz(gz, err, sizeof err);
    } else {
        const uint8_t *rest, *rest2;
        size_t rn, rn2;
        char *vocab = fuzz_split(data, n, &rest, &rn);
        char *merges = fuzz_split(rest, rn, &rest2, &rn2);
        tx = fuzz_split(rest2, rn2, &rest, &rn);
        int with_map = rest > rest2 && rest[-1] == 0;     /* a third NUL: the map follows */
        const char *dir = fuzz_path(2, "tok");
        mkdir(dir, 0700);
        const char *vp = fuzz_path(0, "tok/vocab.json"), *mp = fuzz_path(1, "tok/merges.txt");
        const char *sp = fuzz_path(3, "tok/special_tokens_map.json");
        fuzz_write(vp, vocab, strlen(vocab));
        fuzz_write(mp, merges, strlen(merges));
        free(vocab); free(merges);
        if (with_map) {
            fuzz_write(sp, rest, rn);
            t = tok_load(dir, err, sizeof err);
        } else {
            unlink(sp);
            t = tok_load_files(vp, mp, err, sizeof err);
        }
    }
    if (!t) {
        if (!err[0] || strchr(err, '\n')) abort();
    } else {
        exercise(t, text);
        if (tx) exercise(t, tx);
        tok_free(t);
    }
    free(tx);
    return 0;
}

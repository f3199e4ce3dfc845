/* tokens.c: assignment 07's experiment. Prints how the tokenizer cuts each
 * line of stdin into tokens, then how many of the 75 caption slots of SD's
 * 77-token context the lines use.
 *
 *   cc -O2 -std=c99 -D_POSIX_C_SOURCE=200809L -I. assignments/07-bpe-merges/tokens.c \
 *      tokenizer.c inflate.c json.c -lm -o /tmp/tokens
 *   cat data/0*.txt | /tmp/tokens tests/fixtures/vocab/bpe_simple_vocab_16e6.txt.gz
 *   echo "sdlstyle, a red circle" | /tmp/tokens tests/fixtures/tokenizer_tiny
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "tokenizer.h"

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s TOKENIZER < lines  (TOKENIZER: a folder with vocab.json + merges.txt, or bpe_simple_vocab_16e6.txt.gz)\n", argv[0]);
        return 2;
    }
    char err[TOK_ERR_LEN];
    tokenizer *t = tok_load(argv[1], err, sizeof err);
    if (!t) { fprintf(stderr, "error: %s\n", err); return 1; }
    static char line[65536];
    static int ids[4096];
    long lines = 0, total = 0, longest = 0, over = 0;
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\r\n")] = '\0';
        int n = tok_encode(t, line, ids, 4096);
        if (n < 0) { fprintf(stderr, "error: out of memory\n"); tok_free(t); return 1; }
        printf("%3d |", n);
        for (int i = 0; i < n; i++) printf(" %s", t->tokens[ids[i]] ? t->tokens[ids[i]] : "?");
        printf("\n");
        lines++; total += n;
        if (n > longest) longest = n;
        if (n > TOK_CTX - 2) over++;
    }
    if (lines)
        printf("%ld lines: %.1f tokens on average, %ld at most; %ld longer than the %d that fit between BOS and EOS\n",
               lines, (double)total / lines, longest, over, TOK_CTX - 2);
    tok_free(t);
    return 0;
}

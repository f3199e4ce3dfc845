/* tokenizer.h: the CLIP byte-level BPE tokenizer as SD1.x uses it, matching
 * transformers' CLIPTokenizer (openai/clip-vit-large-patch14) without ftfy:
 *
 *   text -> split out literal "<|startoftext|>" / "<|endoftext|>" (special ids)
 *        -> NFC -> every run of Unicode whitespace to one " " -> lowercase
 *        -> pieces by  <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|
 *                      [\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+   (whitespace dropped)
 *        -> UTF-8 bytes of each piece -> GPT-2 byte-to-unicode symbols,
 *           "</w>" on the last one -> BPE merges by rank -> ids
 *
 * SD conditioning: [BOS] + first 75 ids + [EOS], padded to 77 with pad_id.
 * Invalid UTF-8 in the text is read as U+FFFD. */
#ifndef SDLORA_TOKENIZER_H
#define SDLORA_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#define TOK_CTX 77          /* CLIP context length */
#define TOK_ERR_LEN 512

typedef struct {
    int n_vocab;
    char **tokens;          /* id -> UTF-8 token string (NULL for an unused id) */
    int bos_id, eos_id;     /* <|startoftext|>, <|endoftext|> */
    int pad_id;             /* padding after EOS; <|endoftext|> unless special_tokens_map.json says otherwise */
    int unk_id;             /* symbols missing from the vocabulary (CLIP: <|endoftext|>) */
    int n_merges;
    /* private: hash tables and byte maps */
    int *vhash; size_t vcap;                      /* token string -> id, open addressing */
    uint64_t *mkey; int32_t *mrank, *mid; size_t mcap;   /* (left id, right id) -> rank, merged id */
    int byte_id[256], byte_id_w[256];             /* id of byte b's symbol, without / with "</w>" */
} tokenizer;

/* path: a folder with vocab.json + merges.txt (+ optional special_tokens_map.json
 * for pad_token), a vocab.json (merges.txt beside it), or OpenAI's
 * bpe_simple_vocab_16e6.txt.gz. NULL and a one-line error on failure. */
tokenizer *tok_load(const char *path, char *err, size_t errlen);
tokenizer *tok_load_files(const char *vocab_json, const char *merges_txt, char *err, size_t errlen);
tokenizer *tok_load_clip_gz(const char *gz_path, char *err, size_t errlen);
void tok_free(tokenizer *t);

/* BPE ids of text, no BOS/EOS. Writes at most max_ids and stops working
 * once it has them; returns how many it wrote (or -1 on out of memory). */
int tok_encode(const tokenizer *t, const char *text, int *ids, int max_ids);

/* ids[TOK_CTX] = BOS, first TOK_CTX-2 ids, EOS, pad... Returns the index of
 * that EOS (the real length is the return value + 1), or -1 on out of memory.
 * Note: HF CLIP pools at the FIRST id equal to eos_id, which is earlier
 * than this EOS when the text itself contains "<|endoftext|>". */
int tok_encode_sd(const tokenizer *t, const char *text, int ids[TOK_CTX]);

int tok_id(const tokenizer *t, const char *token);   /* -1 if not in the vocabulary */

/* ids back to text (malloc'ed): tokens joined, bytes restored, "</w>" -> " ",
 * trimmed, as HF decode does. Unknown ids are skipped. */
char *tok_decode(const tokenizer *t, const int *ids, int n);

#endif

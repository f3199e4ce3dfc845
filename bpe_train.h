/* bpe_train.h: learn a CLIP-style byte-level BPE vocabulary from captions,
 * for a model trained from scratch (the bundled tiny model) whose text
 * encoder should not carry CLIP's 49408-token embedding table.
 *
 * The files it writes load with tok_load (tokenizer.c) and with
 * transformers' CLIPTokenizer, laid out as OpenAI's CLIP vocabulary is:
 *   ids 0..255      the 256 byte symbols (GPT-2 byte-to-unicode, CLIP's order)
 *   ids 256..511    the same with "</w>" (end of word)
 *   ids 512..       one token per learned merge, in merge order
 *   last two        <|startoftext|>, <|endoftext|>
 * and merges.txt starts with "#version: 0.2". */
#ifndef SDLORA_BPE_TRAIN_H
#define SDLORA_BPE_TRAIN_H

#include <stddef.h>

#define BPE_MIN_VOCAB (512 + 2)     /* byte symbols, their "</w>" forms, two specials */
#define BPE_MAX_VOCAB 49408         /* CLIP's size: transformers reads at most 49152-256-2 merges */

/* Pre-tokenise texts[0..n_texts) exactly as tokenizer.c encodes (NFC,
 * lowercase, CLIP's split regex), then repeatedly merge the most frequent
 * adjacent symbol pair, counted over all words; ties go to the pair whose
 * (left, right) token strings are byte-wise smallest, so the result depends
 * only on the texts. Stops at vocab_size tokens (specials included) or when
 * every word is a single token. Writes out_dir/vocab.json and
 * out_dir/merges.txt (each to a temporary name, then renamed); out_dir must
 * exist. Returns the vocabulary size written, or -1 with a one-line
 * message in err. */
int bpe_train(const char *const *texts, int n_texts, int vocab_size, const char *out_dir,
              char *err, size_t errlen);

#endif

/* caption.h: what happens to a caption between the file and the text
 * encoder, as kohya's sd-scripts does it (library/train_util.py,
 * BaseDataset.process_caption), and the caption statistics kohya writes into
 * a LoRA file's metadata (ss_tag_frequency, ss_dataset_dirs).
 *
 * Per training sample, in this order:
 *   1. --caption-dropout P: with probability P the whole caption becomes ""
 *      (kohya's caption_dropout_rate; the model also learns the unconditioned
 *      prediction that classifier-free guidance needs). Nothing else happens
 *      to a dropped caption.
 *   2. --shuffle-caption: the caption is split at every ',' into tags, each
 *      stripped of surrounding whitespace (Python's str.strip: ASCII and
 *      Unicode spaces); empty tags are kept, as kohya keeps them. The first
 *      --keep-tokens N tags stay in place, the rest are shuffled, and the
 *      tags are joined again with ", ". A caption without a comma is one tag
 *      and comes back stripped.
 *      --keep-tokens-separator S (kohya's keep_tokens_separator), when the
 *      caption holds S: "fixed tags S shuffled tags [S fixed tags]"; the
 *      parts around S stay in place and --keep-tokens is not used; here
 *      empty tags are dropped, as kohya drops them in this form.
 *   --keep-tokens (and S) without --shuffle-caption change nothing (as in
 *   kohya, which then trains the caption with S in it).
 * The draws come from a splitmix64 stream seeded by (seed, sample index):
 * the same --seed gives the same captions at every step, and a resumed run
 * draws what the uninterrupted one drew. Python's random is not reproduced:
 * the rules are kohya's, the particular permutations are not. */
#ifndef SDLORA_CAPTION_H
#define SDLORA_CAPTION_H

#include <stddef.h>
#include <stdint.h>
#include "dataset.h"

typedef struct {
    int shuffle;        /* --shuffle-caption */
    int keep_tokens;    /* --keep-tokens N: tags kept in front */
    float dropout;      /* --caption-dropout P in [0, 1] */
    const char *keep_sep;   /* --keep-tokens-separator S, or NULL */
} caption_opts;

/* 1 when the options can change a caption (so the text cache is not enough) */
int caption_opts_active(const caption_opts *o);

/* The caption sample number `sample` of the run sees (steps 1 and 2 above);
 * a malloc'ed string, or NULL when out of memory. */
char *caption_process(const char *caption, const caption_opts *o, uint64_t seed, uint64_t sample);

/* Python's str.strip() on s[0..n): the first kept byte and the kept length */
const char *caption_strip(const char *s, size_t n, size_t *len);

/* The dataset folder an image counts under in kohya's metadata, which names
 * a DreamBooth subset by its folder (os.path.basename(image_dir)): the
 * first-level folder below data_dir ("10_mystyle"), or data_dir's own last
 * component for images directly in it. Writes at most n bytes with the NUL. */
void caption_dir_key(char *out, size_t n, const char *data_dir, const char *image_path);

/* kohya's ss_tag_frequency: {"dir": {"tag": count, ...}, ...} as Python's
 * json.dumps writes it (", " and ": ", non-ASCII as \uXXXX). Tags are the
 * comma-separated parts of each image's caption (repeats not counted),
 * stripped, lowercased, empty ones skipped; in order of first appearance.
 * malloc'ed, or NULL when out of memory. */
char *caption_tag_frequency_json(const dataset_t *ds, const char *data_dir);

/* kohya's ss_dataset_dirs: {"dir": {"n_repeats": N, "img_count": M}, ...} */
char *caption_dataset_dirs_json(const dataset_t *ds, const char *data_dir);

/* s as a JSON string literal the way Python's json.dumps writes one
 * (ensure_ascii): appended to *buf (malloc'ed, grown; *len its length).
 * Returns 0, or -1 when out of memory (*buf is then freed and NULL). */
int caption_json_string(char **buf, size_t *len, size_t *cap, const char *s);

#endif

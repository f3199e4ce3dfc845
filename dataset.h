/* dataset.h: the training images and their captions, found in a folder the
 * way kohya sd-scripts lays it out (and the article's captions.csv, 5.2).
 *
 *   data/
 *     a.png  a.txt              caption beside the image (kohya's default)
 *     b.jpg  b.caption          the other extension kohya knows
 *     captions.csv              "file,caption" rows for images in this folder
 *     10_mystyle/c.png c.txt    a first-level "N_name" folder: each image
 *                               repeats N times per epoch (kohya)
 *
 * What is collected: every .png/.jpg/.jpeg (any letter case) in DIR and all
 * its subfolders, in byte-wise order of the path below DIR (the same on every
 * machine, whatever order the file system lists). Names starting with '.'
 * are skipped. Symlinks are followed, but a link back into its own parent
 * chain and folders nested deeper than 32 are not entered (warned). Other
 * image formats (.webp .bmp .gif .tif .tiff .avif .heic .jxl) are listed in
 * a warning: this program decodes PNG and JPEG only.
 *
 * Caption of an image, first found wins:
 *   1. NAME.txt beside it (same base name; the extension is ".txt" exactly).
 *   2. NAME.caption beside it.
 *   3. a row of a captions.csv in the image's folder, else in the closest
 *      parent folder up to DIR that has one. A .txt (or .caption) beats a CSV
 *      row for the same image; the warning lists such images.
 * Caption files are read as kohya's read_caption does: only the FIRST line,
 * stripped of surrounding whitespace (kohya: lines[0].strip()); a file with
 * more lines is used that way and named in a warning. A UTF-8 byte-order mark
 * is dropped. A file that is not UTF-8 (or is UTF-16, or holds NUL bytes) is
 * an error. An empty caption file gives an empty caption (old kohya refused
 * it, newer kohya accepts it); such images are named in a warning.
 *
 * captions.csv: one "file,caption" row per line, RFC 4180 quoting (a field
 * in double quotes may hold commas, newlines and "" for a quote), UTF-8 with
 * or without BOM, LF or CRLF. The file field is relative to the CSV's
 * folder ('\' is read as '/', "./" and ".." are resolved). The first row is
 * a header, and skipped, when its first field is a usual column name (file,
 * filename, image, path, ...) or names neither an existing file nor anything
 * with an image extension. Unquoted commas after the first one are kept in
 * the caption ("a.png,a cat, sitting" -> "a cat, sitting"). Newlines inside
 * a quoted caption become spaces; the caption is trimmed. Rows naming files
 * that do not exist are warned, not fatal; a file listed twice in one CSV
 * keeps its first row (warned).
 *
 * Repeats (kohya's DreamBooth folder layout): a direct subfolder of DIR named
 * "N_name", N a positive decimal number, repeats every image under it
 * (subfolders included) N times per epoch. Anything else repeats once:
 * images directly in DIR, folders not named that way, and "N_name" folders
 * deeper than the first level. Two departures from kohya, both deliberate:
 * kohya ignores images directly in DIR and in first-level folders without a
 * number, and it only looks one level deep; here they are all trained, once
 * per epoch, so nothing the user put in DIR is dropped unnoticed.
 * A "0_name" folder is skipped, as kohya skips it (its images are not
 * trained), and named in a warning. N above DATASET_MAX_REPEATS is an error.
 *
 * Images without any caption are never dropped silently: they are counted,
 * named (the first 10, then "and N more") in the warning, and handled by
 * ds->uncaptioned:
 *   DATASET_UNCAPTIONED_KOHYA (0, default): kohya's rule: the "name" part of
 *       the image's N_name folder ("10_mystyle" -> "mystyle"; kohya's
 *       class_tokens), or an empty caption outside such a folder;
 *   DATASET_UNCAPTIONED_EMPTY: always an empty caption;
 *   DATASET_UNCAPTIONED_DROP: left out of the dataset.
 *
 * Errors (return -1; err gets one line "<path>: <why> (<fix>)"): DIR missing,
 * not a folder or unreadable; a subfolder or caption/CSV file unreadable; a
 * caption or CSV that is not UTF-8 text; a CSV quote never closed; no PNG or
 * JPEG image found; a repeat count too large. */
#ifndef SDLORA_DATASET_H
#define SDLORA_DATASET_H

#include <stddef.h>
#include <stdint.h>

#define DATASET_MAX_DEPTH   32
#define DATASET_MAX_REPEATS 100000

enum {
    DATASET_UNCAPTIONED_KOHYA = 0,
    DATASET_UNCAPTIONED_EMPTY = 1,
    DATASET_UNCAPTIONED_DROP  = 2
};

typedef struct {
    int uncaptioned;        /* INPUT, set before dataset_scan: DATASET_UNCAPTIONED_* */
    const char *caption_ext; /* INPUT: NULL: NAME.txt, else NAME.caption (rules 1, 2
                              * below); ".xyz": only NAME.xyz, as kohya's
                              * --caption_extension reads only that one (images
                              * with another caption file are uncaptioned, and the
                              * warning says which extension they have) */

    int n_images;           /* entries in path / caption / repeats */
    char **path;            /* DIR "/" relative path, ready for fopen */
    char **caption;         /* UTF-8, one line, trimmed; "" when empty */
    int *repeats;           /* >= 1 */
    int n_uncaptioned;      /* images found with no caption (kept or dropped per policy) */
    int n_empty_caption;    /* images whose caption file / CSV row was empty */
    int n_total_with_repeats; /* sum of repeats: samples in one epoch */
    char *warnings;         /* "" or lines "warning: ...\n" for the caller to print */
    int n_reg;              /* the last n_reg images are regularisation images (dataset_add_reg) */
} dataset_t;

/* Scan DIR into ds (all fields but ds->uncaptioned are overwritten). Returns 0,
 * or -1 with a one-line message in err (ds is then empty, nothing to free). */
int dataset_scan(dataset_t *ds, const char *dir, char *err, size_t errlen);
void dataset_free(dataset_t *ds);

/* The samples of one epoch: image indices, each image i appearing repeats[i]
 * times, shuffled by Fisher-Yates with a splitmix64 stream (nn.h rng_t)
 * seeded from (seed, epoch) only, so resuming at (epoch, position) gives the
 * same order. order has room for ds->n_total_with_repeats ints. */
void dataset_epoch_order(const dataset_t *ds, uint64_t seed, int epoch, int *order);

/* Regularisation (class) images, kohya's reg_data_dir: a second folder,
 * scanned with dataset_scan (N_class folders repeat, uncaptioned images
 * take the class name), balanced against the training samples and trained
 * alongside them with their loss times --prior-loss-weight.
 *
 * dataset_balance_reg: kohya's balancing. n_train is the training samples
 * of an epoch (with repeats). One pass over reg's images in order takes
 * each with its folder's repeats until the total reaches n_train (images
 * after that point are not used: dropped from reg); while the total is
 * still short, further passes give one more repeat to each image in turn,
 * stopping as soon as it reaches n_train. So the total is n_train, or more
 * only when the first pass overshoots by part of one image's repeats.
 * Returns the number of images kept. */
int dataset_balance_reg(dataset_t *reg, long n_train);

/* Append reg's images to ds as its last ds->n_reg images (repeats and
 * n_total_with_repeats included) and its warnings; reg is left empty.
 * Returns 0, or -1 with a message in err (out of memory, too many samples). */
int dataset_add_reg(dataset_t *ds, dataset_t *reg, char *err, size_t errlen);

/* w[k] *= 1 for a training image, prior for a regularisation image, for the
 * n images items[k] of a batch: the per-sample loss weights of kohya's
 * prior preservation (loss_b * weight_b, then the mean over the batch). */
void dataset_loss_weights(const dataset_t *ds, const int *items, int n, float prior, float *w);

#endif

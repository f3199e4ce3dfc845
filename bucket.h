/* bucket.h: aspect-ratio bucketing, as kohya sd-scripts does it
 * (--enable_bucket, with bucket_no_upscale off).
 *
 * A photo set has every shape; a square crop of each throws away the top
 * and bottom of a landscape and the sides of a portrait. Bucketing trains
 * each image at a resolution of about its own aspect ratio instead:
 *
 *   1. the buckets: resolutions (w, h) with sides multiples of `step`
 *      between min_size and max_size and area at most max_w * max_h
 *      (--res^2), one per width, mirrored, plus the square (kohya's
 *      make_bucket_resolutions);
 *   2. each image goes to the bucket whose aspect ratio w/h is nearest its
 *      own (the first in sorted order on a tie; an image whose size is a
 *      bucket takes that bucket), is scaled so it covers the bucket, one
 *      side exactly, and the other side is cropped (kohya's select_bucket
 *      and trim_and_resize_if_required);
 *   3. every batch holds images of one bucket (one tensor shape); the
 *      batches of an epoch are shuffled across buckets.
 *
 * How much is cropped: the nearest aspect ratio bounds the crop by half the
 * gap between neighbouring buckets' ratios times the matched side. That is
 * within one step for most photos but not all: kohya's bucket list has
 * wider gaps near the square and at the extremes (at --res 512 an image of
 * ratio 1.14 goes to 512x512 and loses 72 px of width; a 3:1 panorama loses
 * more). train.c names such images in a warning. */
#ifndef SDLORA_BUCKET_H
#define SDLORA_BUCKET_H

#include <stdint.h>

typedef struct { int w, h; } bucket_reso;

/* the most resolutions bucket_resolutions can make for these sizes */
int bucket_max_count(int min_size, int max_size, int step);

/* kohya's make_bucket_resolutions(max_reso=(max_w, max_h), min_size,
 * max_size, divisible=step): the set
 *   { (s, s) : s = floor(sqrt(A) / step) * step }
 *   u { (w, h), (h, w) : w = min_size, min_size + step, ... <= max_size,
 *                        h = min(max_size, floor(floor(A / w) / step) * step) >= min_size }
 * with A = max_w * max_h, sorted by (w, h), no duplicates. Writes at most
 * cap into out; returns how many (or -1 for sizes that make no sense). */
int bucket_resolutions(bucket_reso *out, int cap, int max_w, int max_h, int min_size, int max_size, int step);

/* kohya's select_bucket for an iw x ih image: the index of its bucket in
 * r[0..n), and *rw x *rh, the size it is scaled to before the crop:
 *   a = iw / ih; bucket = (iw, ih) if that is one of r, else
 *   argmin_k |r_k.w / r_k.h - a| (the first one on a tie);
 *   scale = bucket.h / ih if a > bucket.w / bucket.h (wider: match heights),
 *           else bucket.w / iw;
 *   rw = int(iw * scale + 0.5), rh = int(ih * scale + 0.5)
 * in double precision, as Python computes it. rw >= bucket.w, rh >= bucket.h. */
int bucket_select(const bucket_reso *r, int n, int iw, int ih, int *rw, int *rh);

/* Number of batches of size <= B in one epoch: sum over buckets of
 * ceil(samples in the bucket / B), image i counting repeats[i] samples. */
long bucket_count_batches(int n_images, const int *repeats, const int *bucket_of, int n_buckets, int B);

/* The batches of one epoch, as kohya's bucket batching: the samples of each
 * bucket (image i repeats[i] times) shuffled, cut into batches of B (the
 * last one of a bucket may be smaller), and the list of all batches
 * shuffled, with a splitmix64 stream seeded from (seed, epoch) only, so a
 * resumed run gets the same epochs. order (room for sum repeats ints)
 * receives image indices; batch k is order[start[k] .. start[k] + len[k]);
 * start and len have room for bucket_count_batches(). Returns the number of
 * batches, or -1 when out of memory. */
long bucket_epoch_batches(int n_images, const int *repeats, const int *bucket_of, int n_buckets, int B,
                          uint64_t seed, int epoch, int *order, long *start, int *len);

#endif

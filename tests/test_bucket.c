/* test_bucket.c: aspect-ratio buckets (bucket.c) and regularisation images
 * (dataset.c's balancing and loss weights).
 *
 * The bucket lists and the image -> bucket table are kohya sd-scripts'
 * algorithm (make_bucket_resolutions, BucketManager.select_bucket) as
 * tools/kohya_buckets.py writes it again in Python, never this program's
 * output; the balancing counts are worked by hand from kohya's loop in
 * DreamBoothDataset.__init__. */
#include <stdarg.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include "testutil.h"
#include "bucket.h"
#include "image.h"
#include "dataset.h"
#include "ddpm.h"

typedef struct { int w, h; } wh;

/* tools/kohya_buckets.py: make_bucket_resolutions((res, res), min, max, step) */
static const wh r512[] = {{256, 832}, {256, 896}, {256, 960}, {256, 1024}, {320, 704}, {320, 768}, {384, 640}, {448, 576}, {512, 512}, {576, 448}, {640, 384}, {704, 320}, {768, 320}, {832, 256}, {896, 256}, {960, 256}, {1024, 256}};
static const wh r768[] = {{256, 1024}, {320, 1024}, {384, 1024}, {448, 1024}, {512, 1024}, {576, 960}, {576, 1024}, {640, 896}, {704, 832}, {768, 768}, {832, 704}, {896, 640}, {960, 576}, {1024, 256}, {1024, 320}, {1024, 384}, {1024, 448}, {1024, 512}, {1024, 576}};
static const wh r1024[] = {{256, 1024}, {320, 1024}, {384, 1024}, {448, 1024}, {512, 1024}, {576, 1024}, {640, 1024}, {704, 1024}, {768, 1024}, {832, 1024}, {896, 1024}, {960, 1024}, {1024, 256}, {1024, 320}, {1024, 384}, {1024, 448}, {1024, 512}, {1024, 576}, {1024, 640}, {1024, 704}, {1024, 768}, {1024, 832}, {1024, 896}, {1024, 960}, {1024, 1024}};
static const wh r64[] = {{32, 96}, {32, 112}, {32, 128}, {48, 80}, {64, 64}, {80, 48}, {96, 32}, {112, 32}, {128, 32}};

static void expect_list(int res, int mn, int mx, int st, const wh *want, int nwant) {
    bucket_reso got[64];
    ck_assert(bucket_max_count(mn, mx, st) <= 64);
    int n = bucket_resolutions(got, 64, res, res, mn, mx, st);
    ck_assert_msg(n == nwant, "res %d: %d buckets, kohya makes %d", res, n, nwant);
    for (int i = 0; i < n; i++)
        ck_assert_msg(got[i].w == want[i].w && got[i].h == want[i].h, "res %d bucket %d: %dx%d, kohya %dx%d",
                      res, i, got[i].w, got[i].h, want[i].w, want[i].h);
}

START_TEST(resolutions_as_kohya) {
    expect_list(512, 256, 1024, 64, r512, (int)(sizeof r512 / sizeof r512[0]));
    expect_list(768, 256, 1024, 64, r768, (int)(sizeof r768 / sizeof r768[0]));
    expect_list(1024, 256, 1024, 64, r1024, (int)(sizeof r1024 / sizeof r1024[0]));
    expect_list(64, 32, 128, 16, r64, (int)(sizeof r64 / sizeof r64[0]));
    /* every bucket: area <= res^2, sides multiples of the step within [min, max] or the square */
    bucket_reso r[64];
    int n = bucket_resolutions(r, 64, 512, 512, 256, 1024, 64);
    for (int i = 0; i < n; i++) {
        ck_assert((long)r[i].w * r[i].h <= 512L * 512);
        ck_assert(r[i].w % 64 == 0 && r[i].h % 64 == 0);
    }
    /* too small an output array, and nonsense sizes */
    ck_assert_int_eq(bucket_resolutions(r, 3, 512, 512, 256, 1024, 64), -1);
    ck_assert_int_eq(bucket_resolutions(r, 64, 512, 512, 256, 1024, 0), -1);
    ck_assert_int_eq(bucket_resolutions(r, 64, 512, 512, 1024, 256, 64), -1);
}
END_TEST

/* tools/kohya_buckets.py: res, min, max, step, image w, h -> bucket w, h, resized w, h */
static const int table[][10] = {
    {512, 256, 1024, 64, 512, 512, 512, 512, 512, 512},
    {512, 256, 1024, 64, 640, 480, 576, 448, 597, 448},
    {512, 256, 1024, 64, 480, 640, 448, 576, 448, 597},
    {512, 256, 1024, 64, 1920, 1080, 640, 384, 683, 384},
    {512, 256, 1024, 64, 1080, 1920, 384, 640, 384, 683},
    {512, 256, 1024, 64, 4032, 3024, 576, 448, 597, 448},
    {512, 256, 1024, 64, 3024, 4032, 448, 576, 448, 597},
    {512, 256, 1024, 64, 6000, 4000, 640, 384, 640, 427},
    {512, 256, 1024, 64, 1000, 1000, 512, 512, 512, 512},
    {512, 256, 1024, 64, 584, 512, 512, 512, 584, 512},
    {512, 256, 1024, 64, 300, 100, 832, 256, 832, 277},
    {512, 256, 1024, 64, 100, 300, 256, 832, 277, 832},
    {512, 256, 1024, 64, 2000, 500, 1024, 256, 1024, 256},
    {512, 256, 1024, 64, 123, 457, 256, 960, 258, 960},
    {512, 256, 1024, 64, 576, 448, 576, 448, 576, 448},
    {512, 256, 1024, 64, 256, 1024, 256, 1024, 256, 1024},
    {512, 256, 1024, 64, 50, 50, 512, 512, 512, 512},
    {512, 256, 1024, 64, 7, 3, 768, 320, 768, 329},
    {512, 256, 1024, 64, 3000, 1000, 832, 256, 832, 277},
    {512, 256, 1024, 64, 1280, 720, 640, 384, 683, 384},
    {512, 256, 1024, 64, 720, 1280, 384, 640, 384, 683},
    {512, 256, 1024, 64, 70, 64, 512, 512, 560, 512},
    {512, 256, 1024, 64, 800, 700, 512, 512, 585, 512},
    {512, 256, 1024, 64, 400, 300, 576, 448, 597, 448},
    {768, 256, 1024, 64, 512, 512, 768, 768, 768, 768},
    {768, 256, 1024, 64, 640, 480, 896, 640, 896, 672},
    {768, 256, 1024, 64, 480, 640, 640, 896, 672, 896},
    {768, 256, 1024, 64, 1920, 1080, 1024, 576, 1024, 576},
    {768, 256, 1024, 64, 1080, 1920, 576, 1024, 576, 1024},
    {768, 256, 1024, 64, 4032, 3024, 896, 640, 896, 672},
    {768, 256, 1024, 64, 3024, 4032, 640, 896, 672, 896},
    {768, 256, 1024, 64, 6000, 4000, 896, 640, 960, 640},
    {768, 256, 1024, 64, 1000, 1000, 768, 768, 768, 768},
    {768, 256, 1024, 64, 584, 512, 832, 704, 832, 729},
    {768, 256, 1024, 64, 300, 100, 1024, 320, 1024, 341},
    {768, 256, 1024, 64, 100, 300, 320, 1024, 341, 1024},
    {768, 256, 1024, 64, 2000, 500, 1024, 256, 1024, 256},
    {768, 256, 1024, 64, 123, 457, 256, 1024, 276, 1024},
    {768, 256, 1024, 64, 576, 448, 832, 704, 905, 704},
    {768, 256, 1024, 64, 256, 1024, 256, 1024, 256, 1024},
    {768, 256, 1024, 64, 50, 50, 768, 768, 768, 768},
    {768, 256, 1024, 64, 7, 3, 1024, 448, 1045, 448},
    {768, 256, 1024, 64, 3000, 1000, 1024, 320, 1024, 341},
    {768, 256, 1024, 64, 1280, 720, 1024, 576, 1024, 576},
    {768, 256, 1024, 64, 720, 1280, 576, 1024, 576, 1024},
    {768, 256, 1024, 64, 70, 64, 832, 704, 832, 761},
    {768, 256, 1024, 64, 800, 700, 832, 704, 832, 728},
    {768, 256, 1024, 64, 400, 300, 896, 640, 896, 672},
    {1024, 256, 1024, 64, 512, 512, 1024, 1024, 1024, 1024},
    {1024, 256, 1024, 64, 640, 480, 1024, 768, 1024, 768},
    {1024, 256, 1024, 64, 480, 640, 768, 1024, 768, 1024},
    {1024, 256, 1024, 64, 1920, 1080, 1024, 576, 1024, 576},
    {1024, 256, 1024, 64, 1080, 1920, 576, 1024, 576, 1024},
    {1024, 256, 1024, 64, 4032, 3024, 1024, 768, 1024, 768},
    {1024, 256, 1024, 64, 3024, 4032, 768, 1024, 768, 1024},
    {1024, 256, 1024, 64, 6000, 4000, 1024, 704, 1056, 704},
    {1024, 256, 1024, 64, 1000, 1000, 1024, 1024, 1024, 1024},
    {1024, 256, 1024, 64, 584, 512, 1024, 896, 1024, 898},
    {1024, 256, 1024, 64, 300, 100, 1024, 320, 1024, 341},
    {1024, 256, 1024, 64, 100, 300, 320, 1024, 341, 1024},
    {1024, 256, 1024, 64, 2000, 500, 1024, 256, 1024, 256},
    {1024, 256, 1024, 64, 123, 457, 256, 1024, 276, 1024},
    {1024, 256, 1024, 64, 576, 448, 1024, 768, 1024, 796},
    {1024, 256, 1024, 64, 256, 1024, 256, 1024, 256, 1024},
    {1024, 256, 1024, 64, 50, 50, 1024, 1024, 1024, 1024},
    {1024, 256, 1024, 64, 7, 3, 1024, 448, 1045, 448},
    {1024, 256, 1024, 64, 3000, 1000, 1024, 320, 1024, 341},
    {1024, 256, 1024, 64, 1280, 720, 1024, 576, 1024, 576},
    {1024, 256, 1024, 64, 720, 1280, 576, 1024, 576, 1024},
    {1024, 256, 1024, 64, 70, 64, 1024, 960, 1050, 960},
    {1024, 256, 1024, 64, 800, 700, 1024, 896, 1024, 896},
    {1024, 256, 1024, 64, 400, 300, 1024, 768, 1024, 768},
    {64, 32, 128, 16, 512, 512, 64, 64, 64, 64},
    {64, 32, 128, 16, 640, 480, 64, 64, 85, 64},
    {64, 32, 128, 16, 480, 640, 48, 80, 60, 80},
    {64, 32, 128, 16, 1920, 1080, 80, 48, 85, 48},
    {64, 32, 128, 16, 1080, 1920, 48, 80, 48, 85},
    {64, 32, 128, 16, 4032, 3024, 64, 64, 85, 64},
    {64, 32, 128, 16, 3024, 4032, 48, 80, 60, 80},
    {64, 32, 128, 16, 6000, 4000, 80, 48, 80, 53},
    {64, 32, 128, 16, 1000, 1000, 64, 64, 64, 64},
    {64, 32, 128, 16, 584, 512, 64, 64, 73, 64},
    {64, 32, 128, 16, 300, 100, 96, 32, 96, 32},
    {64, 32, 128, 16, 100, 300, 32, 96, 32, 96},
    {64, 32, 128, 16, 2000, 500, 128, 32, 128, 32},
    {64, 32, 128, 16, 123, 457, 32, 112, 32, 119},
    {64, 32, 128, 16, 576, 448, 64, 64, 82, 64},
    {64, 32, 128, 16, 256, 1024, 32, 128, 32, 128},
    {64, 32, 128, 16, 50, 50, 64, 64, 64, 64},
    {64, 32, 128, 16, 7, 3, 96, 32, 96, 41},
    {64, 32, 128, 16, 3000, 1000, 96, 32, 96, 32},
    {64, 32, 128, 16, 1280, 720, 80, 48, 85, 48},
    {64, 32, 128, 16, 720, 1280, 48, 80, 48, 85},
    {64, 32, 128, 16, 70, 64, 64, 64, 70, 64},
    {64, 32, 128, 16, 800, 700, 64, 64, 73, 64},
    {64, 32, 128, 16, 400, 300, 64, 64, 85, 64},
};

START_TEST(selection_as_kohya) {
    bucket_reso r[64];
    for (size_t t = 0; t < sizeof table / sizeof table[0]; t++) {
        const int *e = table[t];
        int n = bucket_resolutions(r, 64, e[0], e[0], e[1], e[2], e[3]);
        int rw, rh, k = bucket_select(r, n, e[4], e[5], &rw, &rh);
        ck_assert_msg(r[k].w == e[6] && r[k].h == e[7] && rw == e[8] && rh == e[9],
                      "res %d: %dx%d -> bucket %dx%d scaled %dx%d; kohya: %dx%d scaled %dx%d",
                      e[0], e[4], e[5], r[k].w, r[k].h, rw, rh, e[6], e[7], e[8], e[9]);
    }
}
END_TEST

/* The crop: the scaled image covers its bucket, one side exactly, and the
 * nearest ratio bounds the other side's excess by half the gap to the
 * neighbouring bucket's ratio times the matched side. At --res 1024 that is
 * within one step (64 px) for every image from 1:2 to 2:1; at 512 it is not
 * (kohya's list jumps from 1:1 to 9:7: see the 584x512 row of the table,
 * cropped 72 px, which train.c warns about). */
START_TEST(crop_bounds) {
    const int res[] = {512, 768, 1024};
    bucket_reso r[64];
    for (int c = 0; c < 3; c++) {
        int n = bucket_resolutions(r, 64, res[c], res[c], 256, 1024, 64);
        double lo = 1e9, hi = 0;
        for (int i = 0; i < n; i++) {
            double a = (double)r[i].w / r[i].h;
            if (a < lo) lo = a;
            if (a > hi) hi = a;
        }
        for (int iw = 40; iw <= 4000; iw += 37)
            for (int ih = 40; ih <= 4000; ih += 41) {
                int rw, rh, k = bucket_select(r, n, iw, ih, &rw, &rh);
                ck_assert_msg(rw >= r[k].w && rh >= r[k].h && (rw == r[k].w || rh == r[k].h),
                              "%dx%d scaled to %dx%d does not cover bucket %dx%d with one side exact",
                              iw, ih, rw, rh, r[k].w, r[k].h);
                double a = (double)iw / ih, rk = (double)r[k].w / r[k].h;
                if (a < lo || a > hi) continue;           /* beyond the extremes: no bound */
                /* the neighbouring ratio on the image's side of r_k */
                double next = a > rk ? hi : lo;
                for (int j = 0; j < n; j++) {
                    double rj = (double)r[j].w / r[j].h;
                    if (a > rk && rj > rk && rj < next) next = rj;
                    if (a <= rk && rj < rk && rj > next) next = rj;
                }
                double bound = a > rk ? (next - rk) / 2 * r[k].h : (1 / next - 1 / rk) / 2 * r[k].w;
                int crop = rw - r[k].w + rh - r[k].h;
                ck_assert_msg(crop <= bound + 1, "%dx%d: cropped %d px in bucket %dx%d, nearest ratio allows %.1f",
                              iw, ih, crop, r[k].w, r[k].h, bound);
                if (res[c] == 1024 && a >= 0.5 && a <= 2.0)
                    ck_assert_msg(crop <= 64, "%dx%d: cropped %d px > one step at --res 1024", iw, ih, crop);
            }
    }
}
END_TEST

/* every batch from one bucket; every sample repeats[i] times an epoch; the
 * same (seed, epoch) the same batches; another epoch another order */
START_TEST(epoch_batches) {
    const int bucket_of[7] = {0, 1, 0, 2, 1, 0, 0}, repeats[7] = {1, 2, 1, 3, 1, 1, 2};
    const int B = 2;
    /* samples per bucket: 0: 1+1+1+2 = 5 (3 batches), 1: 2+1 = 3 (2), 2: 3 (2) */
    ck_assert_int_eq(bucket_count_batches(7, repeats, bucket_of, 3, B), 7);
    int order[3][11]; long start[3][7]; int len[3][7];
    for (int e = 0; e < 3; e++)
        ck_assert_int_eq(bucket_epoch_batches(7, repeats, bucket_of, 3, B, 42, e < 2 ? 0 : 1, order[e], start[e], len[e]), 7);
    ck_assert(memcmp(order[0], order[1], sizeof order[0]) == 0 && memcmp(start[0], start[1], sizeof start[0]) == 0);
    for (int e = 0; e < 3; e += 2) {
        int seen[7] = {0}, full[3] = {0}, part[3] = {0};
        for (int k = 0; k < 7; k++) {
            ck_assert(len[e][k] >= 1 && len[e][k] <= B);
            int b0 = bucket_of[order[e][start[e][k]]];
            for (int q = 0; q < len[e][k]; q++) {
                int i = order[e][start[e][k] + q];
                ck_assert_msg(bucket_of[i] == b0, "batch %d mixes buckets %d and %d", k, b0, bucket_of[i]);
                seen[i]++;
            }
            if (len[e][k] == B) full[b0]++; else part[b0]++;
        }
        for (int i = 0; i < 7; i++) ck_assert_int_eq(seen[i], repeats[i]);
        ck_assert(full[0] == 2 && part[0] == 1 && full[1] == 1 && part[1] == 1 && full[2] == 1 && part[2] == 1);
    }
    int same = memcmp(order[0], order[2], sizeof order[0]) == 0 && memcmp(start[0], start[2], sizeof start[0]) == 0;
    ck_assert_msg(!same, "epochs 0 and 1 have the same batches");
}
END_TEST

/* a dataset of n images with these repeats, as dataset_scan leaves one */
static void fake_ds(dataset_t *ds, int n, const int *repeats, const char *prefix) {
    memset(ds, 0, sizeof *ds);
    ds->path = calloc((size_t)n, sizeof(char *));
    ds->caption = calloc((size_t)n, sizeof(char *));
    ds->repeats = calloc((size_t)n, sizeof(int));
    ds->warnings = calloc(1, 1);
    for (int i = 0; i < n; i++) {
        char b[64]; snprintf(b, sizeof b, "%s%d.png", prefix, i);
        ds->path[i] = strdup(b);
        ds->caption[i] = strdup(prefix);
        ds->repeats[i] = repeats[i];
        ds->n_total_with_repeats += repeats[i];
    }
    ds->n_images = n;
}

/* kohya's loop, by hand: a first pass registers whole images until the
 * training samples are reached, then one more repeat to each in turn */
START_TEST(reg_balancing) {
    dataset_t reg;
    /* 10 training samples, 3 reg images x1: 1,1,1 (3) then +1 each in turn
     * -> 2,2,2 (6) -> 3,3,3 (9) -> 4,3,3 (10) */
    fake_ds(&reg, 3, (const int[]){1, 1, 1}, "r");
    ck_assert_int_eq(dataset_balance_reg(&reg, 10), 3);
    ck_assert(reg.repeats[0] == 4 && reg.repeats[1] == 3 && reg.repeats[2] == 3);
    ck_assert_int_eq(reg.n_total_with_repeats, 10);
    dataset_free(&reg);
    /* 7 training samples, 3 reg images of 5_class: 5 (< 7), 10 (>= 7): the
     * third is never used and the total overshoots to 10, as in kohya */
    fake_ds(&reg, 3, (const int[]){5, 5, 5}, "r");
    ck_assert_int_eq(dataset_balance_reg(&reg, 7), 2);
    ck_assert(reg.n_images == 2 && reg.repeats[0] == 5 && reg.repeats[1] == 5);
    ck_assert_int_eq(reg.n_total_with_repeats, 10);
    dataset_free(&reg);
    /* more reg images than training samples: the first 4 once each */
    fake_ds(&reg, 5, (const int[]){1, 1, 1, 1, 1}, "r");
    ck_assert_int_eq(dataset_balance_reg(&reg, 4), 4);
    for (int i = 0; i < 4; i++) ck_assert_int_eq(reg.repeats[i], 1);
    ck_assert_int_eq(reg.n_total_with_repeats, 4);
    dataset_free(&reg);
    /* repeats 2 and 1 against 5: 2, 3, then 3 (4), 2 (5) */
    fake_ds(&reg, 2, (const int[]){2, 1}, "r");
    ck_assert_int_eq(dataset_balance_reg(&reg, 5), 2);
    ck_assert(reg.repeats[0] == 3 && reg.repeats[1] == 2 && reg.n_total_with_repeats == 5);
    /* appended after the training images */
    dataset_t ds;
    fake_ds(&ds, 3, (const int[]){2, 2, 1}, "t");
    char err[256];
    ck_assert_int_eq(dataset_add_reg(&ds, &reg, err, sizeof err), 0);
    ck_assert(ds.n_images == 5 && ds.n_reg == 2 && ds.n_total_with_repeats == 10 && reg.n_images == 0);
    ck_assert_str_eq(ds.path[2], "t2.png");
    ck_assert_str_eq(ds.path[3], "r0.png");
    ck_assert_int_eq(ds.repeats[3], 3);
    ck_assert_int_eq(ds.repeats[4], 2);
    /* every image appears its repeats times in an epoch */
    int order[10], seen[5] = {0};
    dataset_epoch_order(&ds, 1, 0, order);
    for (int k = 0; k < 10; k++) seen[order[k]]++;
    for (int i = 0; i < 5; i++) ck_assert_int_eq(seen[i], ds.repeats[i]);
    dataset_free(&ds);
}
END_TEST

/* the prior-preservation loss: per-sample MSE times 1 (training image) or
 * the prior weight (regularisation image), then the batch mean; weight 0
 * leaves the regularisation samples no gradient at all */
START_TEST(prior_loss_weight) {
    dataset_t ds;
    fake_ds(&ds, 5, (const int[]){1, 1, 1, 1, 1}, "x");
    ds.n_reg = 2;                                   /* images 3 and 4 */
    const int items[4] = {0, 3, 1, 4};
    float w[4] = {1, 1, 1, 1};
    dataset_loss_weights(&ds, items, 4, 0.25f, w);
    ck_assert(w[0] == 1 && w[1] == 0.25f && w[2] == 1 && w[3] == 0.25f);
    float w2[4] = {2, 2, 2, 2};                     /* on top of min-SNR weights: a product */
    dataset_loss_weights(&ds, items, 4, 0.25f, w2);
    ck_assert(w2[0] == 2 && w2[1] == 0.5f && w2[2] == 2 && w2[3] == 0.5f);
    const int B = 4, n = 6;
    float pred[24], target[24], d[24] = {0}, z[4] = {1, 1, 1, 1};
    fill_uniform(pred, 24, -1, 1, 3);
    fill_uniform(target, 24, -1, 1, 4);
    dataset_loss_weights(&ds, items, 4, 0.0f, z);
    double m[4] = {0};
    for (int b = 0; b < B; b++)
        for (int i = 0; i < n; i++) m[b] += (double)(pred[b * n + i] - target[b * n + i]) * (pred[b * n + i] - target[b * n + i]) / n;
    float L = mse_loss_forward(pred, target, z, B, n);
    ck_assert_msg(fabs(L - (m[0] + m[2]) / 4) < 1e-6, "loss %g, training samples alone %g", L, (m[0] + m[2]) / 4);
    mse_loss_backward(d, pred, target, z, 1.0f, B, n);
    for (int i = 0; i < n; i++) {
        ck_assert(d[1 * n + i] == 0 && d[3 * n + i] == 0);
        ck_assert(fabsf(d[i] - 2 * (pred[i] - target[i]) / (B * n)) < 1e-7f);
    }
    dataset_free(&ds);
}
END_TEST

/* ---- ./train --buckets --reg, as a user runs it -------------------------- */

#ifndef SDLORA_BUILD
#define SDLORA_BUILD "build"
#endif
#define TRAIN SDLORA_BUILD "/train"
/* gen_tiny: --res 64, sides must be multiples of 16 */
#define TFLAGS "--model " FIXTURE_DIR "gen_tiny --rank 2 --alpha 2 --seed 7 --lr 1e-3 --no-grid"
#define BFLAGS " --buckets --min-bucket 32 --max-bucket 128 --bucket-step 16"

static char tmp[64];

static int run(const char *fmt, ...) {
    char cmd[4096], full[4400];
    va_list ap; va_start(ap, fmt); vsnprintf(cmd, sizeof cmd, fmt, ap); va_end(ap);
    snprintf(full, sizeof full, "%s > %s/log 2>&1", cmd, tmp);
    int st = system(full);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static char *slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return calloc(1, 1);
    fseek(f, 0, SEEK_END); long len = ftell(f); fseek(f, 0, SEEK_SET);
    char *b = calloc((size_t)len + 1, 1);
    if (fread(b, 1, (size_t)len, f) != (size_t)len) b[0] = 0;
    fclose(f);
    return b;
}

static char *log_text(void) { char p[128]; snprintf(p, sizeof p, "%s/log", tmp); return slurp(p); }

/* a w x h picture of a red disc on a coloured ground, with a caption */
static void put_image(const char *dir, const char *name, int w, int h, int caption) {
    char p[512], err[256];
    mkdir(dir, 0777);
    uint8_t *px = malloc((size_t)w * h * 3);
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) {
            double dx = (x - w / 2.0) / w, dy = (y - h / 2.0) / h;
            int in = dx * dx + dy * dy < 0.06;
            uint8_t *q = px + ((size_t)y * w + x) * 3;
            q[0] = in ? 220 : (uint8_t)(w & 255); q[1] = in ? 30 : 90; q[2] = in ? 40 : (uint8_t)(h & 255);
        }
    snprintf(p, sizeof p, "%s/%s.png", dir, name);
    ck_assert_msg(image_save_png(p, px, w, h, NULL, NULL, 0, err, sizeof err) == 0, "%s", err);
    free(px);
    if (caption) {
        snprintf(p, sizeof p, "%s/%s.txt", dir, name);
        FILE *f = fopen(p, "w"); fprintf(f, "a red disc\n"); fclose(f);
    }
}

/* the loss column of loss.csv: how many of the first n steps are exactly 0 */
static int zero_losses(const char *out, int n) {
    char p[256]; snprintf(p, sizeof p, "%s/loss.csv", out);
    char *s = slurp(p), *line = strchr(s, '\n');
    int zeros = 0, rows = 0;
    while (line && rows < n) {
        long step; double loss;
        if (sscanf(line + 1, "%ld,%lf", &step, &loss) == 2) { rows++; zeros += loss == 0.0; }
        line = strchr(line + 1, '\n');
    }
    free(s);
    ck_assert_int_eq(rows, n);
    return zeros;
}

static int same_file(const char *a, const char *b) {
    char *x = slurp(a), *y = slurp(b);
    int same = strlen(x) > 0 && strcmp(x, y) == 0;   /* the CSVs compared here are text */
    free(x); free(y);
    return same;
}

START_TEST(train_buckets_and_reg) {
    snprintf(tmp, sizeof tmp, "/tmp/sdlora_bucket_XXXXXX");
    ck_assert(mkdtemp(tmp) != NULL);
    char d[128], r[160], o[160];
    snprintf(d, sizeof d, "%s/data", tmp);
    snprintf(r, sizeof r, "%s/reg/1_disc", tmp);
    mkdir(d, 0777);
    snprintf(o, sizeof o, "%s/reg", tmp); mkdir(o, 0777);
    /* the buckets of tools/kohya_buckets.py at res 64, 32..128, step 16:
     * 64x64 -> 64x64, 96x48 (2:1) -> 80x48, 48x96 -> 48x80, 128x40 (3.2:1) -> 96x32 */
    put_image(d, "a", 64, 64, 1);
    put_image(d, "b", 64, 64, 1);
    put_image(d, "c", 96, 48, 1);
    put_image(d, "d", 48, 96, 1);
    put_image(d, "e", 128, 40, 1);
    put_image(r, "r0", 64, 64, 0);       /* uncaptioned: the class name "disc" */
    put_image(r, "r1", 64, 64, 0);
    /* 5 training samples; the 2 reg images balanced to 5: repeats 3 and 2 */
    snprintf(o, sizeof o, "%s/a", tmp);
    ck_assert_msg(run(TRAIN " %s " TFLAGS BFLAGS " --batch 2 --flip --steps 8 --reg %s/reg --out %s", d, tmp, o) == 0, "%s", log_text());
    char *s = log_text();
    ck_assert_msg(strstr(s, "buckets (WxH: samples per epoch): 48x80: 1 64x64: 7 80x48: 1 96x32: 1\n"), "%s", s);
    ck_assert_msg(strstr(s, "2 of them used, 5 samples per epoch beside the 5 training samples"), "%s", s);
    ck_assert_msg(strstr(s, "5 images, 10 samples per epoch"), "%s", s);
    free(s);
    /* stopped and resumed: the same files as the uninterrupted run */
    char b[160], p1[256], p2[256];
    snprintf(b, sizeof b, "%s/b", tmp);
    ck_assert_int_eq(run("SDLORA_STOP_AFTER=3 " TRAIN " %s " TFLAGS BFLAGS " --batch 2 --flip --steps 8 --reg %s/reg --out %s", d, tmp, b), 130);
    ck_assert_msg(run(TRAIN " %s " TFLAGS BFLAGS " --batch 2 --flip --steps 8 --reg %s/reg --out %s --resume %s/state.safetensors",
                      d, tmp, b, b) == 0, "%s", log_text());
    snprintf(p1, sizeof p1, "%s/loss.csv", o); snprintf(p2, sizeof p2, "%s/loss.csv", b);
    ck_assert_msg(same_file(p1, p2), "resumed bucket run: loss.csv differs");
    /* --prior-loss-weight 0, batch 1: one epoch is 10 steps, and the 5 that
     * drew a regularisation image have a loss of exactly 0; with weight 1
     * none has. With and without buckets. */
    const char *modes[2] = {BFLAGS, ""};
    for (int m = 0; m < 2; m++) {
        snprintf(o, sizeof o, "%s/w0_%d", tmp, m);
        ck_assert_msg(run(TRAIN " %s " TFLAGS "%s --batch 1 --steps 10 --reg %s/reg --prior-loss-weight 0 --out %s",
                          d, modes[m], tmp, o) == 0, "%s", log_text());
        ck_assert_int_eq(zero_losses(o, 10), 5);
        snprintf(o, sizeof o, "%s/w1_%d", tmp, m);
        ck_assert_msg(run(TRAIN " %s " TFLAGS "%s --batch 1 --steps 10 --reg %s/reg --out %s", d, modes[m], tmp, o) == 0, "%s", log_text());
        ck_assert_int_eq(zero_losses(o, 10), 0);
    }
    /* a 150x50 (3:1) picture at --res 64 with buckets up to 64: the widest is
     * 64x32 (2:1): scaled to 96x32, cropped 32 px > one step: named */
    put_image(d, "f", 150, 50, 1);
    snprintf(o, sizeof o, "%s/c", tmp);
    ck_assert_msg(run(TRAIN " %s " TFLAGS " --buckets --min-bucket 32 --max-bucket 64 --bucket-step 16 --steps 1 --out %s", d, o) == 0, "%s", log_text());
    s = log_text();
    ck_assert_msg(strstr(s, "cropped by more than one bucket step") && strstr(s, "f.png (150x50, 32 px)"), "%s", s);
    free(s);
    /* kohya's rule: --max-bucket below --res is an error, one line */
    ck_assert_int_eq(run(TRAIN " %s " TFLAGS " --buckets --max-bucket 48 --steps 1 --out %s", d, o), 1);
    s = log_text();
    ck_assert_msg(strstr(s, "error: --min-bucket") && strstr(s, "min <= res <= max"), "%s", s);
    free(s);
    ck_assert_int_eq(run(TRAIN " %s " TFLAGS " --reg %s/nothere --steps 1 --out %s", d, tmp, o), 2);
    s = log_text(); ck_assert_msg(strstr(s, "error: --reg"), "%s", s); free(s);
    char cmd[128]; snprintf(cmd, sizeof cmd, "rm -rf %s", tmp);
    ck_assert(system(cmd) == 0);
}
END_TEST

static Suite *bucket_suite(void) {
    Suite *s = suite_create("bucket");
    TCase *tc = tcase_create("bucket");
    tcase_add_test(tc, resolutions_as_kohya);
    tcase_add_test(tc, selection_as_kohya);
    tcase_add_test(tc, crop_bounds);
    tcase_add_test(tc, epoch_batches);
    tcase_add_test(tc, reg_balancing);
    tcase_add_test(tc, prior_loss_weight);
    suite_add_tcase(s, tc);
    TCase *tp = tcase_create("train");
    tcase_set_timeout(tp, 900);          /* whole (tiny) training runs; slow under ASan */
    tcase_add_test(tp, train_buckets_and_reg);
    suite_add_tcase(s, tp);
    return s;
}

CHECK_MAIN(bucket_suite)

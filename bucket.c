/* bucket.c: aspect-ratio buckets (see bucket.h for the rules and why they
 * are kohya's). */
#include "bucket.h"
#include "nn.h"

#include <stdlib.h>

int bucket_max_count(int min_size, int max_size, int step) {
    if (step < 1 || min_size < 1 || max_size < min_size) return 1;
    return 2 * ((max_size - min_size) / step + 1) + 1;
}

/* largest s with s * s <= a */
static long isqrt(long a) {
    long s = 0;
    for (long bit = 1L << 31; bit; bit >>= 1)
        if ((s + bit) * (s + bit) <= a) s += bit;
    return s;
}

static int cmp_reso(const void *x, const void *y) {
    const bucket_reso *a = x, *b = y;
    if (a->w != b->w) return a->w < b->w ? -1 : 1;
    return a->h < b->h ? -1 : a->h > b->h;
}

static int add_reso(bucket_reso *out, int n, int cap, int w, int h) {
    for (int i = 0; i < n; i++)
        if (out[i].w == w && out[i].h == h) return n;     /* a set: once each */
    if (n < cap) out[n] = (bucket_reso){w, h};
    return n + 1;
}

int bucket_resolutions(bucket_reso *out, int cap, int max_w, int max_h, int min_size, int max_size, int step) {
    if (step < 1 || min_size < 1 || max_size < min_size || max_w < 1 || max_h < 1) return -1;
    long area = (long)max_w * max_h;
    int n = 0;
    /* the square: floor(sqrt(A) / step) * step (floor(floor(x) / k) = floor(x / k)) */
    int s = (int)(isqrt(area) / step * step);
    n = add_reso(out, n, cap, s, s);
    /* one bucket per width, the tallest of area <= A that is a multiple of step */
    for (int w = min_size; w <= max_size; w += step) {
        long h = area / w / step * step;
        if (h > max_size) h = max_size;
        if (h >= min_size) {
            n = add_reso(out, n, cap, w, (int)h);
            n = add_reso(out, n, cap, (int)h, w);
        }
    }
    if (n > cap) return -1;
    qsort(out, (size_t)n, sizeof *out, cmp_reso);
    return n;
}

int bucket_select(const bucket_reso *r, int n, int iw, int ih, int *rw, int *rh) {
    double a = (double)iw / ih;
    int k = -1;
    for (int i = 0; i < n && k < 0; i++)
        if (r[i].w == iw && r[i].h == ih) k = i;
    if (k < 0) {
        /* nearest ratio; strict < keeps the first of equals, as numpy's argmin */
        double best = 0;
        for (int i = 0; i < n; i++) {
            double e = (double)r[i].w / r[i].h - a;
            if (e < 0) e = -e;
            if (k < 0 || e < best) { best = e; k = i; }
        }
    }
    double ar = (double)r[k].w / r[k].h;
    /* wider than the bucket: match heights and crop the width; else the other way */
    double scale = a > ar ? (double)r[k].h / ih : (double)r[k].w / iw;
    *rw = (int)(iw * scale + 0.5);
    *rh = (int)(ih * scale + 0.5);
    return k;
}

long bucket_count_batches(int n_images, const int *repeats, const int *bucket_of, int n_buckets, int B) {
    long *cnt = calloc((size_t)n_buckets + 1, sizeof *cnt);
    if (!cnt) return -1;
    for (int i = 0; i < n_images; i++) cnt[bucket_of[i]] += repeats[i];
    long nb = 0;
    for (int k = 0; k < n_buckets; k++) nb += (cnt[k] + B - 1) / B;
    free(cnt);
    return nb;
}

/* uniform in [0, n): rejection of the lowest 2^64 mod n values, no modulo bias */
static uint64_t below(rng_t *r, uint64_t n) {
    uint64_t threshold = (0 - n) % n;
    for (;;) {
        uint64_t x = rng_u64(r);
        if (x >= threshold) return x % n;
    }
}

long bucket_epoch_batches(int n_images, const int *repeats, const int *bucket_of, int n_buckets, int B,
                          uint64_t seed, int epoch, int *order, long *start, int *len) {
    long *off = calloc((size_t)n_buckets + 1, sizeof *off);
    if (!off) return -1;
    /* the samples grouped by bucket (image order inside a bucket), then shuffled */
    for (int i = 0; i < n_images; i++) off[bucket_of[i] + 1] += repeats[i];
    for (int k = 0; k < n_buckets; k++) off[k + 1] += off[k];
    long *fill = malloc(sizeof(long) * ((size_t)n_buckets + 1));
    if (!fill) { free(off); return -1; }
    for (int k = 0; k <= n_buckets; k++) fill[k] = off[k];
    for (int i = 0; i < n_images; i++)
        for (int r = 0; r < repeats[i]; r++) order[fill[bucket_of[i]]++] = i;
    free(fill);
    rng_t g;
    rng_seed(&g, seed ^ ((uint64_t)(uint32_t)epoch * 0x9E3779B97F4A7C15ULL) ^ 0x6275636b657473ULL);  /* "buckets" */
    rng_seed(&g, rng_u64(&g));
    long nb = 0;
    for (int k = 0; k < n_buckets; k++) {
        int *s = order + off[k];
        long n = off[k + 1] - off[k];
        /* Fisher-Yates: for i = n-1 .. 1, swap s[i] with s[j], j ~ U{0..i} */
        for (long i = n - 1; i > 0; i--) {
            long j = (long)below(&g, (uint64_t)i + 1);
            int tmp = s[i]; s[i] = s[j]; s[j] = tmp;
        }
        for (long b = 0; b < n; b += B) {
            start[nb] = off[k] + b;
            len[nb] = (int)(n - b < B ? n - b : B);
            nb++;
        }
    }
    free(off);
    /* the batches across buckets, shuffled the same way */
    for (long i = nb - 1; i > 0; i--) {
        long j = (long)below(&g, (uint64_t)i + 1);
        long ts = start[i]; start[i] = start[j]; start[j] = ts;
        int tl = len[i]; len[i] = len[j]; len[j] = tl;
    }
    return nb;
}

/* test_image.c: image.c against Pillow's decodes and resizes
 * (tools/make_image_fixtures.py wrote tests/fixtures/images/), PNG round
 * trips, and truncated / corrupt / unsupported files. */
#include "testutil.h"
#include "image.h"
#include "inflate.h"
#include <unistd.h>

#define IMG_DIR FIXTURE_DIR "images/"

static st_file fx;
static int fx_ok = 0;

static void open_fx(void) {
    if (fx_ok) return;
    char err[ST_ERR_LEN];
    ck_assert_msg(st_open(&fx, IMG_DIR "expected.safetensors", err) == 0, "%s", err);
    fx_ok = 1;
}

/* Pillow's RGB for a fixture: a U8 tensor [h, w, 3] */
static const st_tensor *want(const char *name) {
    open_fx();
    const st_tensor *t = st_find(&fx, name);
    ck_assert_msg(t != NULL, "fixture %s missing", name);
    ck_assert(t->dtype == ST_U8 && t->ndim == 3 && t->shape[2] == 3);
    return t;
}

static int max_diff(const uint8_t *a, const uint8_t *b, size_t n) {
    int m = 0;
    for (size_t i = 0; i < n; i++) { int d = abs((int)a[i] - (int)b[i]); if (d > m) m = d; }
    return m;
}

static uint8_t *read_all(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "cannot open %s", path);
    fseek(f, 0, SEEK_END); long sz = ftell(f); fseek(f, 0, SEEK_SET);
    uint8_t *d = malloc((size_t)sz + 1);
    ck_assert(fread(d, 1, (size_t)sz, f) == (size_t)sz);
    fclose(f);
    *n = (size_t)sz;
    return d;
}

/* decode every fixture whose name starts with prefix and compare with
 * Pillow; returns the worst difference over all of them */
static int compare_all(const char *prefix, int tol, int *count) {
    open_fx();
    int worst = 0; *count = 0;
    for (int i = 0; i < fx.ntensors; i++) {
        const st_tensor *t = &fx.tensors[i];
        if (strncmp(t->name, prefix, strlen(prefix)) != 0) continue;
        char path[512], err[512];
        snprintf(path, sizeof path, IMG_DIR "%s", t->name);
        image_t im;
        ck_assert_msg(image_load(&im, path, err, sizeof err) == 0, "%s", err);
        ck_assert_msg(im.w == t->shape[1] && im.h == t->shape[0], "%s: %dx%d, Pillow %dx%d",
                      t->name, im.w, im.h, (int)t->shape[1], (int)t->shape[0]);
        int d = max_diff(im.rgb, t->data, t->numel);
        printf("  %-34s %3dx%-3d max |diff| vs Pillow = %d\n", t->name, im.w, im.h, d);
        ck_assert_msg(d <= tol, "%s: max diff %d > %d", t->name, d, tol);
        if (d > worst) worst = d;
        image_free(&im);
        (*count)++;
    }
    return worst;
}

START_TEST(test_png_matches_pillow) {
    int n, worst = compare_all("png_", 0, &n);
    printf("PNG: %d files, all identical to Pillow (worst %d)\n", n, worst);
    ck_assert_int_ge(n, 40);
}
END_TEST

START_TEST(test_jpeg_matches_pillow) {
    int n, worst = compare_all("jpg_", 0, &n);   /* integer IDCT + fancy upsampling as libjpeg: exact */
    printf("JPEG: %d files, worst max |diff| %d\n", n, worst);
    ck_assert_int_ge(n, 30);
}
END_TEST

/* the orientation fixtures differ only in their EXIF tag: check the
 * geometry directly as well, against orientation 1 */
START_TEST(test_exif_geometry) {
    char err[512];
    image_t base, im;
    ck_assert_msg(image_load(&base, IMG_DIR "jpg_exif1_40x24.jpg", err, sizeof err) == 0, "%s", err);
    ck_assert(base.w == 40 && base.h == 24);
    ck_assert_msg(image_load(&im, IMG_DIR "jpg_exif6_40x24.jpg", err, sizeof err) == 0, "%s", err);
    ck_assert(im.w == 24 && im.h == 40);
    /* 90 degrees clockwise: the top-left output pixel is the bottom-left input pixel */
    ck_assert_int_le(max_diff(im.rgb, base.rgb + (size_t)(23 * 40) * 3, 3), 0);
    image_free(&im);
    ck_assert_msg(image_load(&im, IMG_DIR "jpg_exif3_40x24.jpg", err, sizeof err) == 0, "%s", err);
    ck_assert(im.w == 40 && im.h == 24);
    ck_assert_int_le(max_diff(im.rgb, base.rgb + (size_t)(24 * 40 - 1) * 3, 3), 0);
    image_free(&im);
    image_free(&base);
}
END_TEST

START_TEST(test_unsupported_kinds) {
    struct { const char *file, *word; } cases[] = {
        {"bad_cmyk.jpg", "CMYK"}, {"bad_12bit.jpg", "12-bit"}, {"bad_sof9.jpg", "arithmetic"},
        {"bad_arith.jpg", "arithmetic"}, {"bad_lossless.jpg", "lossless"}, {"bad_hier.jpg", "hierarchical"},
        {"bad_notimage.txt", "GIF"}, {"does_not_exist.png", "cannot open"}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char path[512], err[512] = "";
        snprintf(path, sizeof path, IMG_DIR "%s", cases[i].file);
        image_t im;
        if (i == 3) { FILE *f = fopen(path, "rb"); if (!f) continue; fclose(f); }   /* needs cjpeg */
        ck_assert_int_eq(image_load(&im, path, err, sizeof err), -1);
        ck_assert(im.rgb == NULL);
        printf("  %s\n", err);
        ck_assert_msg(strstr(err, cases[i].word) && strstr(err, cases[i].file), "%s", err);
    }
}
END_TEST

START_TEST(test_png_crc) {
    size_t n; uint8_t *d = read_all(IMG_DIR "png_c2_d8_33x17.png", &n);
    image_t im; char err[512];
    d[n - 40] ^= 0x10;   /* inside the last IDAT's data */
    ck_assert_int_eq(image_decode(&im, d, n, "x.png", err, sizeof err), -1);
    ck_assert_msg(strstr(err, "CRC mismatch in IDAT"), "%s", err);
    free(d);
}
END_TEST

START_TEST(test_size_limits) {
    /* a PNG header claiming 20000 x 8 (valid CRC): refused before decoding */
    uint8_t png[8 + 25] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n', 0, 0, 0, 13, 'I', 'H', 'D', 'R',
                           0, 0, 0x4e, 0x20, 0, 0, 0, 8, 8, 2, 0, 0, 0};
    uint32_t c = crc32_update(0, png + 12, 17);
    png[29] = (uint8_t)(c >> 24); png[30] = (uint8_t)(c >> 16); png[31] = (uint8_t)(c >> 8); png[32] = (uint8_t)c;
    image_t im; char err[512];
    ck_assert_int_eq(image_decode(&im, png, sizeof png, "big.png", err, sizeof err), -1);
    ck_assert_msg(strstr(err, "20000x8") && strstr(err, "limit"), "%s", err);
    /* a JPEG frame of 12000 x 12000 = 144 Mpixel: over the pixel limit */
    uint8_t jpg[] = {0xFF, 0xD8, 0xFF, 0xC0, 0, 17, 8, 0x2E, 0xE0, 0x2E, 0xE0, 3,
                     1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1, 0xFF, 0xD9};
    ck_assert_int_eq(image_decode(&im, jpg, sizeof jpg, "big.jpg", err, sizeof err), -1);
    ck_assert_msg(strstr(err, "12000x12000") && strstr(err, "limit"), "%s", err);
}
END_TEST

/* a test picture with smooth and noisy parts */
static uint8_t *test_picture(int w, int h, uint64_t seed) {
    uint8_t *p = malloc((size_t)w * h * 3);
    rng_t r; rng_seed(&r, seed);
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++)
            for (int c = 0; c < 3; c++) {
                int v = (x * 3 + y * 2 + c * 40) & 255;
                if (x > w / 2) v = (int)(rng_uniform(&r) * 256) & 255;
                p[((size_t)y * w + x) * 3 + c] = (uint8_t)v;
            }
    return p;
}

/* find a text chunk key\0... in a PNG buffer; returns its value's start, or NULL */
static const uint8_t *find_text(const uint8_t *png, size_t n, const char *type, const char *key, size_t *vlen) {
    size_t pos = 8, kl = strlen(key);
    while (pos + 12 <= n) {
        uint32_t len = ((uint32_t)png[pos] << 24) | ((uint32_t)png[pos + 1] << 16) | ((uint32_t)png[pos + 2] << 8) | png[pos + 3];
        const uint8_t *d = png + pos + 8;
        if (memcmp(png + pos + 4, type, 4) == 0 && len > kl && memcmp(d, key, kl) == 0 && d[kl] == 0) {
            size_t skip = kl + 1 + (strcmp(type, "iTXt") == 0 ? 4 : 0);
            *vlen = len - skip;
            return d + skip;
        }
        pos += 12 + len;
    }
    return NULL;
}

START_TEST(test_png_roundtrip) {
    const int sizes[][2] = {{1, 1}, {7, 3}, {64, 48}, {300, 7}};
    const char *params = "a photo of sks dog\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42";
    const char *keys[2] = {"parameters", "Comment"}, *vals[2] = {params, "caf\xc3\xa9 \xe2\x9c\x93"};
    for (int s = 0; s < 4; s++) {
        int w = sizes[s][0], h = sizes[s][1];
        uint8_t *p = test_picture(w, h, 7 + s), *png; size_t n;
        char err[512];
        ck_assert_msg(image_encode_png(&png, &n, p, w, h, keys, vals, 2, err, sizeof err) == 0, "%s", err);
        image_t im;
        ck_assert_msg(image_decode(&im, png, n, "rt.png", err, sizeof err) == 0, "%s", err);
        ck_assert(im.w == w && im.h == h);
        ck_assert_int_eq(max_diff(im.rgb, p, (size_t)w * h * 3), 0);
        size_t vl;
        const uint8_t *v = find_text(png, n, "tEXt", "parameters", &vl);
        ck_assert(v && vl == strlen(params) && memcmp(v, params, vl) == 0);
        v = find_text(png, n, "iTXt", "Comment", &vl);   /* non-Latin-1 goes as UTF-8 iTXt */
        ck_assert(v && vl == strlen(vals[1]) && memcmp(v, vals[1], vl) == 0);
        if (s == 2) printf("PNG encoder: 64x48 (half noise) -> %zu bytes (raw %d)\n", n, 64 * 48 * 3);
        image_free(&im); free(png); free(p);
    }
    /* compression actually happens on smooth content */
    int w = 256, h = 256;
    uint8_t *g = malloc((size_t)w * h * 3), *png; size_t n; char err[512];
    for (int i = 0; i < w * h * 3; i++) g[i] = (uint8_t)((i / 3) % w + (i / 3) / w);
    ck_assert(image_encode_png(&png, &n, g, w, h, NULL, NULL, 0, err, sizeof err) == 0);
    printf("PNG encoder: 256x256 gradient -> %zu bytes\n", n);
    ck_assert_int_lt(n, (size_t)w * h * 3 / 20);
    image_t im;
    ck_assert(image_decode(&im, png, n, "g.png", err, sizeof err) == 0);
    ck_assert_int_eq(max_diff(im.rgb, g, (size_t)w * h * 3), 0);
    /* a bad key is refused */
    const char *bad[1] = {""};
    uint8_t *none = NULL;
    ck_assert_int_eq(image_encode_png(&none, &n, g, 1, 1, bad, bad, 1, err, sizeof err), -1);
    ck_assert(none == NULL);
    image_free(&im); free(png); free(g);
}
END_TEST

START_TEST(test_png_save_file) {
    char path[] = "/tmp/sdlora_test_image_XXXXXX";
    int fd = mkstemp(path);
    ck_assert(fd >= 0);
    close(fd);
    uint8_t *p = test_picture(20, 10, 3);
    const char *k[1] = {"parameters"}, *v[1] = {"hello"};
    char err[512], tmp[64];
    ck_assert_msg(image_save_png(path, p, 20, 10, k, v, 1, err, sizeof err) == 0, "%s", err);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    ck_assert_msg(access(tmp, F_OK) != 0, "temporary file left behind");
    image_t im;
    ck_assert_msg(image_load(&im, path, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(max_diff(im.rgb, p, 600), 0);
    image_free(&im);
    remove(path);
    ck_assert_int_eq(image_save_png("/nonexistent_dir/x.png", p, 20, 10, NULL, NULL, 0, err, sizeof err), -1);
    ck_assert_msg(strstr(err, "/nonexistent_dir/x.png"), "%s", err);
    free(p);
}
END_TEST

/* every prefix of a file is an error (never a crash, never a picture) */
static void truncations(const char *file) {
    char path[512], err[512];
    snprintf(path, sizeof path, IMG_DIR "%s", file);
    size_t n; uint8_t *d = read_all(path, &n);
    image_t im;
    ck_assert_msg(image_decode(&im, d, n, file, err, sizeof err) == 0, "%s", err);
    image_free(&im);
    for (size_t k = 0; k < n; k++) {
        uint8_t *c = malloc(k ? k : 1);   /* exact-size copy so ASan sees any over-read */
        memcpy(c, d, k);
        int rc = image_decode(&im, c, k, file, err, sizeof err);
        ck_assert_msg(rc == -1, "%s cut to %zu of %zu bytes decoded", file, k, n);
        ck_assert(im.rgb == NULL && err[0]);
        free(c);
    }
    printf("  %s: all %zu truncations refused (e.g. \"%s\")\n", file, n, err);
    free(d);
}

START_TEST(test_truncation) {
    truncations("png_c3_d4_i_13x11.png");
    truncations("png_c6_d16_33x17.png");
    truncations("jpg_420_33x17.jpg");
    truncations("jpg_prog_restart_48x40.jpg");
    truncations("jpg_exif6_40x24.jpg");
}
END_TEST

/* random byte changes: decode must return 0 or -1, never crash or hang.
 * For PNG the chunk CRCs are fixed up afterwards, so the damage reaches
 * inflate, the filters and the pixel conversion instead of the CRC check. */
static void fix_png_crcs(uint8_t *d, size_t n) {
    size_t pos = 8;
    while (pos + 12 <= n) {
        uint32_t len = ((uint32_t)d[pos] << 24) | ((uint32_t)d[pos + 1] << 16) | ((uint32_t)d[pos + 2] << 8) | d[pos + 3];
        if (len > n - pos - 12) break;
        uint32_t c = crc32_update(0, d + pos + 4, (size_t)len + 4);
        uint8_t *q = d + pos + 8 + len;
        q[0] = (uint8_t)(c >> 24); q[1] = (uint8_t)(c >> 16); q[2] = (uint8_t)(c >> 8); q[3] = (uint8_t)c;
        pos += 12 + len;
    }
}

static void corruptions(const char *file, int seeds, int png) {
    char path[512], err[512];
    snprintf(path, sizeof path, IMG_DIR "%s", file);
    size_t n; uint8_t *d = read_all(path, &n);
    int ok = 0;
    rng_t r;
    for (int s = 0; s < seeds; s++) {
        rng_seed(&r, 1000 + (uint64_t)s);
        uint8_t *c = malloc(n);
        memcpy(c, d, n);
        int nflip = 1 + (int)(rng_uniform(&r) * 4);
        for (int f = 0; f < nflip; f++) {
            size_t at = (size_t)(rng_uniform(&r) * (float)n) % n;
            c[at] = (uint8_t)(rng_uniform(&r) * 256);
        }
        if (png) fix_png_crcs(c, n);
        image_t im;
        int rc = image_decode(&im, c, n, file, err, sizeof err);
        ck_assert(rc == 0 || rc == -1);
        if (rc == 0) {
            ck_assert(im.w >= 1 && im.h >= 1 && im.rgb);
            ok++;
            image_free(&im);
        } else {
            ck_assert(im.rgb == NULL);
        }
        free(c);
    }
    printf("  %s: %d corrupted copies, %d still decoded, %d refused\n", file, seeds, ok, seeds - ok);
    free(d);
}

START_TEST(test_corruption) {
    corruptions("png_c2_d8_i_13x11.png", 1500, 1);
    corruptions("png_c3_d2_33x17.png", 1000, 1);
    corruptions("jpg_420_33x17.jpg", 1500, 0);
    corruptions("jpg_prog_420_33x17.jpg", 1500, 0);
    corruptions("jpg_prog_restart_48x40.jpg", 500, 0);
}
END_TEST

static void resize_case(const char *flt, image_filter f, int w, int h, int tol) {
    const st_tensor *src = want("resize_src");
    char name[64];
    snprintf(name, sizeof name, "resize_%s_%dx%d", flt, w, h);
    const st_tensor *ref = want(name);
    ck_assert(ref->shape[0] == h && ref->shape[1] == w);
    uint8_t *out = malloc((size_t)w * h * 3);
    ck_assert(image_resize(out, w, h, src->data, (int)src->shape[1], (int)src->shape[0], f) == 0);
    int d = max_diff(out, ref->data, ref->numel);
    printf("  64x48 -> %-6s %3dx%-3d max |diff| vs Pillow = %d\n", flt, w, h, d);
    ck_assert_msg(d <= tol, "%s: %d", name, d);
    free(out);
}

START_TEST(test_resize_matches_pillow) {
    const int sz[][2] = {{32, 24}, {19, 15}, {96, 72}, {40, 60}, {64, 20}, {7, 5}};
    for (int i = 0; i < 6; i++) {
        resize_case("lanczos", IMAGE_LANCZOS, sz[i][0], sz[i][1], 1);
        resize_case("box", IMAGE_BOX, sz[i][0], sz[i][1], 1);
    }
    /* same size: identity */
    const st_tensor *src = want("resize_src");
    uint8_t *out = malloc(src->numel);
    ck_assert(image_resize(out, 64, 48, src->data, 64, 48, IMAGE_LANCZOS) == 0);
    ck_assert_int_eq(max_diff(out, src->data, src->numel), 0);
    free(out);
}
END_TEST

START_TEST(test_resize_crop) {
    const st_tensor *src = want("resize_src");
    image_t in = {64, 48, (uint8_t *)src->data}, out;
    char err[512];
    /* 64x48, short side -> 32: 42x32, centre 32x32 at x = 5 */
    ck_assert_msg(image_resize_crop(&out, &in, 32, 32, 32, -1, -1, IMAGE_LANCZOS, err, sizeof err) == 0, "%s", err);
    const st_tensor *ref = want("crop_centre_32");
    int d = max_diff(out.rgb, ref->data, ref->numel);
    printf("  resize_crop centre 32: max |diff| = %d\n", d);
    ck_assert_int_le(d, 1);
    image_free(&out);
    ck_assert(image_resize_crop(&out, &in, 32, 24, 24, 3, 0, IMAGE_LANCZOS, err, sizeof err) == 0);
    ref = want("crop_off3_24");
    ck_assert_int_le(max_diff(out.rgb, ref->data, ref->numel), 1);
    image_free(&out);
    /* a window that does not fit */
    ck_assert_int_eq(image_resize_crop(&out, &in, 32, 24, 24, 30, 0, IMAGE_LANCZOS, err, sizeof err), -1);
    ck_assert_int_eq(image_resize_crop(&out, &in, 32, 33, 33, -1, -1, IMAGE_LANCZOS, err, sizeof err), -1);
    /* centring rounds halves to even (Python's round): 3 spare columns -> 2, 5 -> 2, 6 -> 3 */
    uint8_t px[9 * 3 * 3];
    const int spare[3][2] = {{6, 2}, {8, 2}, {9, 3}};
    for (int k = 0; k < 3; k++) {
        int w = spare[k][0];
        for (int i = 0; i < w * 3 * 3; i++) px[i] = (uint8_t)((i / 3) % w);   /* column index */
        image_t t = {w, 3, px};
        ck_assert(image_resize_crop(&out, &t, 3, 3, 3, -1, -1, IMAGE_BOX, err, sizeof err) == 0);
        ck_assert_int_eq(out.rgb[0], spare[k][1]);
        image_free(&out);
    }
}
END_TEST

START_TEST(test_flip_chw) {
    uint8_t p[2 * 3 * 3] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18};
    image_flip_h(p, 3, 2);
    const uint8_t e[18] = {7, 8, 9, 4, 5, 6, 1, 2, 3, 16, 17, 18, 13, 14, 15, 10, 11, 12};
    ck_assert_int_eq(memcmp(p, e, 18), 0);
    /* x / 127.5 - 1: 0 -> -1, 255 -> 1, CHW order */
    uint8_t all[256 * 3];
    for (int i = 0; i < 256; i++) { all[3 * i] = (uint8_t)i; all[3 * i + 1] = (uint8_t)(255 - i); all[3 * i + 2] = 7; }
    float chw[256 * 3];
    image_to_chw(chw, all, 256, 1);
    ck_assert(chw[0] == -1.0f && chw[255] == 1.0f && chw[256] == 1.0f);
    ck_assert(fabsf(chw[2 * 256] - (7 / 127.5f - 1)) < 1e-7f);
    uint8_t back[256 * 3];
    image_from_chw(back, chw, 256, 1);
    ck_assert_int_eq(memcmp(back, all, sizeof all), 0);
    /* clamping, NaN, rounding: w=3, h=1, so pixel i channel c = v[3c + i] */
    float v[9] = {-3.0f, 2.0f, NAN, 0.0f, 1.0f / 255.0f, -1.0f, 1.0f, 0.5f, -0.5f};
    uint8_t q[9];
    image_from_chw(q, v, 3, 1);
    const uint8_t qe[9] = {0, 128, 255,     /* -3 clamps; 0 -> 127.5 -> half to even 128; 1 -> 255 */
                           255, 128, 191,   /* 2 clamps; 1/255 -> 128.0; 0.5 -> 191.25 */
                           0, 0, 64};       /* NaN -> 0; -1 -> 0; -0.5 -> 63.75 */
    for (int i = 0; i < 3; i++)
        for (int c = 0; c < 3; c++) ck_assert_int_eq(q[3 * i + c], qe[3 * i + c]);
}
END_TEST

/* a PNG chunk (length, type, data, CRC) into out; returns its size */
static size_t put_chunk(uint8_t *out, const char *type, const uint8_t *data, uint32_t len) {
    out[0] = (uint8_t)(len >> 24); out[1] = (uint8_t)(len >> 16); out[2] = (uint8_t)(len >> 8); out[3] = (uint8_t)len;
    memcpy(out + 4, type, 4);
    if (len) memcpy(out + 8, data, len);
    uint32_t c = crc32_update(0, out + 4, (size_t)len + 4);
    uint8_t *q = out + 8 + len;
    q[0] = (uint8_t)(c >> 24); q[1] = (uint8_t)(c >> 16); q[2] = (uint8_t)(c >> 8); q[3] = (uint8_t)c;
    return 12 + (size_t)len;
}

/* empty IDAT chunks (legal: the zlib stream is the concatenation of the
 * IDAT data) before, between and after the real one decode to the same
 * picture; an empty first IDAT used to memcpy from a NULL buffer (UBSan,
 * make asan). Only empty IDATs: no image data. */
START_TEST(test_png_empty_idat) {
    int w = 23, h = 9;
    uint8_t *p = test_picture(w, h, 11), *png; size_t n;
    char err[512];
    ck_assert(image_encode_png(&png, &n, p, w, h, NULL, NULL, 0, err, sizeof err) == 0);
    /* the encoder writes IHDR, one IDAT, IEND: find the IDAT */
    size_t at = 8 + 25;
    ck_assert(memcmp(png + at + 4, "IDAT", 4) == 0);
    uint32_t len = ((uint32_t)png[at] << 24) | ((uint32_t)png[at + 1] << 16) | ((uint32_t)png[at + 2] << 8) | png[at + 3];
    ck_assert(len > 2);
    const uint8_t *zd = png + at + 8;
    uint8_t *o = malloc(n + 200);
    for (int variant = 0; variant < 4; variant++) {
        size_t k = 0;
        memcpy(o, png, at); k = at;                            /* signature + IHDR */
        if (variant == 0 || variant == 3) k += put_chunk(o + k, "IDAT", NULL, 0);
        if (variant == 3) k += put_chunk(o + k, "IDAT", NULL, 0);
        if (variant == 1) {                                    /* split, an empty one between */
            k += put_chunk(o + k, "IDAT", zd, 2);
            k += put_chunk(o + k, "IDAT", NULL, 0);
            k += put_chunk(o + k, "IDAT", zd + 2, len - 2);
        } else {
            k += put_chunk(o + k, "IDAT", zd, len);
        }
        if (variant == 2) k += put_chunk(o + k, "IDAT", NULL, 0);
        k += put_chunk(o + k, "IEND", NULL, 0);
        uint8_t *c = malloc(k);                                /* exact size for ASan */
        memcpy(c, o, k);
        image_t im;
        ck_assert_msg(image_decode(&im, c, k, "empty_idat.png", err, sizeof err) == 0, "variant %d: %s", variant, err);
        ck_assert(im.w == w && im.h == h);
        ck_assert_int_eq(max_diff(im.rgb, p, (size_t)w * h * 3), 0);
        image_free(&im);
        free(c);
    }
    size_t k = at;
    memcpy(o, png, at);
    k += put_chunk(o + k, "IDAT", NULL, 0);
    k += put_chunk(o + k, "IEND", NULL, 0);
    image_t im;
    ck_assert_int_eq(image_decode(&im, o, k, "only_empty.png", err, sizeof err), -1);
    ck_assert_msg(strstr(err, "no image data"), "%s", err);
    free(o); free(png); free(p);
}
END_TEST

/* where each scan of a JPEG ends: the offset of the marker that follows its
 * entropy-coded data; returns the number of scans */
static int jpeg_scan_ends(const uint8_t *d, size_t n, size_t *ends, int max) {
    size_t pos = 2;
    int ns = 0;
    while (pos + 4 <= n) {
        ck_assert(d[pos] == 0xFF);
        int m = d[pos + 1];
        if (m == 0xD9) break;
        size_t len = ((size_t)d[pos + 2] << 8) | d[pos + 3];
        pos += 2 + len;
        if (m != 0xDA) continue;
        /* entropy data runs to the first 0xFF not followed by 00 or RSTn */
        while (pos + 1 < n && !(d[pos] == 0xFF && d[pos + 1] != 0x00 && !(d[pos + 1] >= 0xD0 && d[pos + 1] <= 0xD7)))
            pos++;
        ck_assert(ns < max);
        ends[ns++] = pos;
    }
    return ns;
}

/* a progressive JPEG whose last scans are missing, closed with an
 * end-of-image marker, is refused (libjpeg would smooth the blocks that lack
 * AC coefficients; this decoder does not, README "Hardening"); the complete
 * file still decodes as Pillow does (test_jpeg_matches_pillow) */
static void progressive_cuts(const char *file) {
    char path[512], err[512];
    snprintf(path, sizeof path, IMG_DIR "%s", file);
    size_t n; uint8_t *d = read_all(path, &n);
    size_t ends[64];
    int ns = jpeg_scan_ends(d, n, ends, 64);
    ck_assert_msg(ns >= 2, "%s: %d scans", file, ns);
    image_t im;
    for (int k = 1; k <= ns; k++) {
        size_t cut = ends[k - 1];
        uint8_t *c = malloc(cut + 2);
        memcpy(c, d, cut);
        c[cut] = 0xFF; c[cut + 1] = 0xD9;
        int rc = image_decode(&im, c, cut + 2, file, err, sizeof err);
        if (k < ns) {
            ck_assert_msg(rc == -1, "%s: %d of %d scans decoded", file, k, ns);
            ck_assert_msg(strstr(err, "progressive JPEG is incomplete") && strchr(err, '\n') == NULL, "%s", err);
        } else {
            ck_assert_msg(rc == 0, "%s: all %d scans: %s", file, ns, err);
            image_free(&im);
        }
        free(c);
    }
    printf("  %s: %d scans, the %d cuts before the last refused\n", file, ns, ns - 1);
    free(d);
}

START_TEST(test_progressive_incomplete) {
    progressive_cuts("jpg_prog_420_33x17.jpg");
    progressive_cuts("jpg_prog_48x40.jpg");
    progressive_cuts("jpg_gray_prog_33x17.jpg");
    progressive_cuts("jpg_prog_restart_48x40.jpg");
}
END_TEST

static Suite *image_suite(void) {
    Suite *s = suite_create("image");
    TCase *tc = tcase_create("image");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_png_matches_pillow);
    tcase_add_test(tc, test_jpeg_matches_pillow);
    tcase_add_test(tc, test_exif_geometry);
    tcase_add_test(tc, test_unsupported_kinds);
    tcase_add_test(tc, test_png_crc);
    tcase_add_test(tc, test_size_limits);
    tcase_add_test(tc, test_png_roundtrip);
    tcase_add_test(tc, test_png_save_file);
    tcase_add_test(tc, test_truncation);
    tcase_add_test(tc, test_corruption);
    tcase_add_test(tc, test_resize_matches_pillow);
    tcase_add_test(tc, test_resize_crop);
    tcase_add_test(tc, test_flip_chw);
    tcase_add_test(tc, test_png_empty_idat);
    tcase_add_test(tc, test_progressive_incomplete);
    suite_add_tcase(s, tc);
    return s;
}

CHECK_MAIN(image_suite)

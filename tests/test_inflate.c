/* test_inflate.c: the DEFLATE/gzip/zlib decoder against streams made by
 * Python's gzip and zlib modules (tools/make_inflate_fixtures.py), plus
 * truncated, corrupted and checksum-broken input, which must fail cleanly. */
#include "testutil.h"
#include "inflate.h"

static uint8_t *read_all(const char *name, size_t *n) {
    char path[512];
    snprintf(path, sizeof path, FIXTURE_DIR "%s", name);
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc((size_t)sz + 1);
    ck_assert(b != NULL);
    ck_assert(fread(b, 1, (size_t)sz, f) == (size_t)sz);
    fclose(f);
    *n = (size_t)sz;
    return b;
}

/* a local generator so this test needs only inflate.c */
static uint64_t rs = 88172645463325252ull;
static double urand(void) { rs ^= rs << 13; rs ^= rs >> 7; rs ^= rs << 17; return (double)(rs >> 11) / 9007199254740992.0; }

typedef int (*inflate_fn)(const uint8_t *, size_t, uint8_t **, size_t *, char *, size_t);

/* decode fixture `name` with fn and compare with the plain text */
static void expect_text(const char *name, inflate_fn fn) {
    size_t tn, cn, on;
    uint8_t *text = read_all("inflate_text.txt", &tn);
    uint8_t *comp = read_all(name, &cn);
    uint8_t *out; char err[256] = "";
    ck_assert_msg(fn(comp, cn, &out, &on, err, sizeof err) == 0, "%s: %s", name, err);
    ck_assert_msg(on == tn, "%s: %zu bytes, expected %zu", name, on, tn);
    ck_assert_msg(memcmp(out, text, tn) == 0, "%s: content differs", name);
    free(out); free(text); free(comp);
}

START_TEST(test_gzip_levels) {
    expect_text("inflate_text_l0.gz", inflate_gzip);   /* stored blocks */
    expect_text("inflate_text_l1.gz", inflate_gzip);   /* dynamic Huffman */
    expect_text("inflate_text_l9.gz", inflate_gzip);
    expect_text("inflate_text_named.gz", inflate_gzip);    /* FNAME */
    expect_text("inflate_text_allflags.gz", inflate_gzip); /* FEXTRA FNAME FCOMMENT FHCRC */
    expect_text("inflate_text_2members.gz", inflate_gzip); /* concatenated members */
}
END_TEST

START_TEST(test_zlib_levels) {
    expect_text("inflate_text_l0.zz", inflate_zlib);
    expect_text("inflate_text_l1.zz", inflate_zlib);
    expect_text("inflate_text_l9.zz", inflate_zlib);
}
END_TEST

START_TEST(test_raw_and_fixed) {
    size_t tn, cn, on, used = 0;
    uint8_t *text = read_all("inflate_text.txt", &tn);
    uint8_t *comp = read_all("inflate_text.deflate", &cn);
    uint8_t *out; char err[256] = "";
    ck_assert_msg(inflate_raw(comp, cn, &out, &on, &used, err, sizeof err) == 0, "%s", err);
    ck_assert(on == tn && memcmp(out, text, tn) == 0);
    ck_assert_uint_eq(used, cn);
    free(out); free(comp); free(text);
    /* block type 1 (fixed code), checked by the generator */
    comp = read_all("inflate_small.zz", &cn);
    ck_assert_int_eq((comp[2] >> 1) & 3, 1);
    ck_assert_msg(inflate_zlib(comp, cn, &out, &on, err, sizeof err) == 0, "%s", err);
    const char *want = "hello, hello, hello world";
    ck_assert_uint_eq(on, strlen(want));
    ck_assert(memcmp(out, want, on) == 0);
    free(out); free(comp);
}
END_TEST

START_TEST(test_empty) {
    size_t cn, on = 99; uint8_t *out = NULL; char err[256] = "";
    uint8_t *comp = read_all("inflate_empty.gz", &cn);
    ck_assert_msg(inflate_gzip(comp, cn, &out, &on, err, sizeof err) == 0, "%s", err);
    ck_assert(out != NULL); ck_assert_uint_eq(on, 0);
    free(out); free(comp);
    comp = read_all("inflate_empty.zz", &cn);
    ck_assert_msg(inflate_zlib(comp, cn, &out, &on, err, sizeof err) == 0, "%s", err);
    ck_assert(out != NULL); ck_assert_uint_eq(on, 0);
    free(out); free(comp);
    /* zero bytes of input is not a stream */
    ck_assert_int_eq(inflate_gzip(NULL, 0, &out, &on, err, sizeof err), -1);
    ck_assert(out == NULL);
    ck_assert_int_eq(inflate_zlib((const uint8_t *)"", 0, &out, &on, err, sizeof err), -1);
    ck_assert_int_eq(inflate_raw(NULL, 0, &out, &on, NULL, err, sizeof err), -1);
}
END_TEST

START_TEST(test_big_backrefs) {
    /* 1 MiB of a 20000-byte block repeated: mostly length-258 copies from 20000 back */
    size_t cn, on; uint8_t *out; char err[256] = "";
    uint8_t *comp = read_all("inflate_big.gz", &cn);
    ck_assert_msg(inflate_gzip(comp, cn, &out, &on, err, sizeof err) == 0, "%s", err);
    ck_assert_uint_eq(on, (size_t)1 << 20);
    uint8_t blk[20000]; uint32_t x = 12345;
    for (int i = 0; i < 20000; i++) { x = x * 1103515245u + 12345u; blk[i] = (uint8_t)('a' + ((x >> 16) & 3)); }
    size_t bad = 0;
    for (size_t i = 0; i < on; i++) bad += out[i] != blk[i % 20000];
    ck_assert_uint_eq(bad, 0);
    free(out); free(comp);
}
END_TEST

START_TEST(test_truncations) {
    /* every proper prefix of each stream must be refused with a reason */
    const char *names[] = {"inflate_text_l9.gz", "inflate_text_l0.gz", "inflate_text_l1.zz", "inflate_small.zz"};
    for (int k = 0; k < 4; k++) {
        size_t cn, on; uint8_t *out; char err[256];
        uint8_t *comp = read_all(names[k], &cn);
        inflate_fn fn = strstr(names[k], ".gz") ? inflate_gzip : inflate_zlib;
        for (size_t len = 0; len < cn; len++) {
            uint8_t *cut = malloc(len ? len : 1);   /* exact size so ASan sees any over-read */
            memcpy(cut, comp, len);
            err[0] = 0;
            int r = fn(cut, len, &out, &on, err, sizeof err);
            ck_assert_msg(r == -1, "%s cut to %zu bytes decoded", names[k], len);
            ck_assert(out == NULL && err[0] != 0);
            free(cut);
        }
        free(comp);
    }
}
END_TEST

START_TEST(test_checksums) {
    size_t cn, on; uint8_t *out; char err[256];
    uint8_t *comp = read_all("inflate_text_l9.gz", &cn);
    comp[cn - 8] ^= 1;                      /* CRC32 */
    ck_assert_int_eq(inflate_gzip(comp, cn, &out, &on, err, sizeof err), -1);
    ck_assert_msg(strstr(err, "CRC32") != NULL, "%s", err);
    comp[cn - 8] ^= 1; comp[cn - 4] ^= 1;   /* ISIZE */
    ck_assert_int_eq(inflate_gzip(comp, cn, &out, &on, err, sizeof err), -1);
    ck_assert_msg(strstr(err, "ISIZE") != NULL, "%s", err);
    comp[cn - 4] ^= 1;
    comp[0] = 0x1e;                         /* magic */
    ck_assert_int_eq(inflate_gzip(comp, cn, &out, &on, err, sizeof err), -1);
    ck_assert_msg(strstr(err, "magic") != NULL, "%s", err);
    comp[0] = 0x1f; comp[3] = 0x80;         /* reserved flag */
    ck_assert_int_eq(inflate_gzip(comp, cn, &out, &on, err, sizeof err), -1);
    comp[3] = 0;
    ck_assert_int_eq(inflate_gzip(comp, cn, &out, &on, err, sizeof err), 0);
    free(out);
    free(comp);

    comp = read_all("inflate_text_allflags.gz", &cn);
    comp[12] ^= 1;                          /* inside FEXTRA: header CRC16 catches it */
    ck_assert_int_eq(inflate_gzip(comp, cn, &out, &on, err, sizeof err), -1);
    ck_assert_msg(strstr(err, "header CRC") != NULL, "%s", err);
    free(comp);

    comp = read_all("inflate_text_l9.zz", &cn);
    comp[cn - 1] ^= 0x40;                   /* adler32 */
    ck_assert_int_eq(inflate_zlib(comp, cn, &out, &on, err, sizeof err), -1);
    ck_assert_msg(strstr(err, "adler32") != NULL, "%s", err);
    comp[cn - 1] ^= 0x40;
    comp[1] |= 0x20; comp[1] = (uint8_t)(comp[1] - ((comp[0] << 8 | comp[1]) % 31)); /* FDICT, still valid FCHECK */
    ck_assert_int_eq(inflate_zlib(comp, cn, &out, &on, err, sizeof err), -1);
    free(comp);

    /* crafted raw blocks: type 3; stored block with NLEN != ~LEN */
    const uint8_t t3[] = {0x07, 0, 0};
    ck_assert_int_eq(inflate_raw(t3, sizeof t3, &out, &on, NULL, err, sizeof err), -1);
    ck_assert_msg(strstr(err, "block type") != NULL, "%s", err);
    const uint8_t st[] = {0x01, 0x02, 0x00, 0xfd, 0xff, 'h', 'i'};
    ck_assert_int_eq(inflate_raw(st, sizeof st, &out, &on, NULL, err, sizeof err), 0);
    ck_assert(on == 2 && out[0] == 'h'); free(out);
    const uint8_t st2[] = {0x01, 0x02, 0x00, 0xfd, 0xfe, 'h', 'i'};
    ck_assert_int_eq(inflate_raw(st2, sizeof st2, &out, &on, NULL, err, sizeof err), -1);
    /* fixed block whose first symbol is a copy: distance reaches before the output */
    const uint8_t far[] = {0x03, 0x02, 0x00, 0x00};   /* BFINAL, fixed, length sym 257, dist 0 */
    ck_assert_int_eq(inflate_raw(far, sizeof far, &out, &on, NULL, err, sizeof err), -1);
}
END_TEST

START_TEST(test_random_corruption) {
    /* flip random bytes: decoding must end (error or, rarely, success) without
     * memory errors; gzip's CRC should reject nearly all of them */
    const char *names[] = {"inflate_text_l9.gz", "inflate_text_l1.zz", "inflate_text.deflate"};
    int ok_gz = 0, runs_gz = 0;
    for (int k = 0; k < 3; k++) {
        size_t cn, on; uint8_t *out; char err[256];
        uint8_t *comp = read_all(names[k], &cn);
        uint8_t *m = malloc(cn);
        for (int seed = 0; seed < 1500; seed++) {
            memcpy(m, comp, cn);
            int flips = 1 + (int)(urand() * 4);
            for (int f = 0; f < flips; f++) {
                size_t at = (size_t)(urand() * (double)cn) % cn;
                m[at] ^= (uint8_t)(1 + (int)(urand() * 255));
            }
            int res;
            if (k == 0) { res = inflate_gzip(m, cn, &out, &on, err, sizeof err); runs_gz++; ok_gz += res == 0; }
            else if (k == 1) res = inflate_zlib(m, cn, &out, &on, err, sizeof err);
            else res = inflate_raw(m, cn, &out, &on, NULL, err, sizeof err);
            if (res == 0) free(out); else ck_assert(out == NULL);
        }
        free(m); free(comp);
    }
    ck_assert_msg(ok_gz < runs_gz / 100, "%d of %d corrupted gzip streams accepted", ok_gz, runs_gz);
    /* pure noise */
    uint8_t noise[512];
    for (int seed = 0; seed < 2000; seed++) {
        for (size_t i = 0; i < sizeof noise; i++) noise[i] = (uint8_t)(urand() * 256);
        size_t on; uint8_t *out; char err[256];
        if (inflate_raw(noise, sizeof noise, &out, &on, NULL, err, sizeof err) == 0) free(out);
    }
}
END_TEST

START_TEST(test_checksum_values) {
    /* standard check values: CRC-32("123456789") = CBF43926, Adler-32("Wikipedia") = 11E60398 */
    ck_assert_uint_eq(crc32_update(0, (const uint8_t *)"123456789", 9), 0xCBF43926u);
    ck_assert_uint_eq(adler32_update(1, (const uint8_t *)"Wikipedia", 9), 0x11E60398u);
    /* incremental == one shot */
    uint32_t c = crc32_update(0, (const uint8_t *)"1234", 4);
    ck_assert_uint_eq(crc32_update(c, (const uint8_t *)"56789", 5), 0xCBF43926u);
}
END_TEST

static Suite *inflate_suite(void) {
    Suite *s = suite_create("inflate");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_gzip_levels);
    tcase_add_test(tc, test_zlib_levels);
    tcase_add_test(tc, test_raw_and_fixed);
    tcase_add_test(tc, test_empty);
    tcase_add_test(tc, test_big_backrefs);
    tcase_add_test(tc, test_truncations);
    tcase_add_test(tc, test_checksums);
    tcase_add_test(tc, test_random_corruption);
    tcase_add_test(tc, test_checksum_values);
    suite_add_tcase(s, tc);
    return s;
}

CHECK_MAIN(inflate_suite)

/* test_safetensors.c: the safetensors reader and writer.
 *  - fp16 / bf16 converters: known bit patterns, every half value, and the
 *    round-to-nearest-even rule checked at every midpoint
 *  - a file written by the Python library (tools/make_st_fixture.py) reads
 *    back with torch's values, and our writer reproduces it byte for byte
 *  - writer -> reader round trips (dtypes, metadata, 0-d, zero-size dims)
 *  - truncated and corrupt files give a one-line error, never a crash
 *  - a failing save leaves the existing file untouched */
#include "testutil.h"
#include "json.h"

#include <errno.h>
#include <float.h>
#include <sys/stat.h>
#include <unistd.h>

#define PY_FIXTURE FIXTURE_DIR "st_python.safetensors"

static uint32_t fbits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static float bitsf(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

/* ---- file helpers ------------------------------------------------------- */

static char tmpdir[64];

static void make_tmpdir(void) {
    strcpy(tmpdir, "/tmp/st_test_XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(tmpdir));
}

static void tmp_path(char *buf, const char *name) { snprintf(buf, 256, "%s/%s", tmpdir, name); }

static void write_bytes(const char *path, const void *p, size_t n) {
    FILE *fp = fopen(path, "wb");
    ck_assert_msg(fp != NULL, "cannot write %s", path);
    if (n) ck_assert_uint_eq(fwrite(p, 1, n, fp), n);
    ck_assert_int_eq(fclose(fp), 0);
}

static uint8_t *read_bytes(const char *path, size_t *n) {
    FILE *fp = fopen(path, "rb");
    ck_assert_msg(fp != NULL, "cannot read %s", path);
    fseek(fp, 0, SEEK_END);
    long sz = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    uint8_t *p = malloc((size_t)sz + 1);
    ck_assert_uint_eq(fread(p, 1, (size_t)sz, fp), (size_t)sz);
    fclose(fp);
    *n = (size_t)sz;
    return p;
}

/* a file with the given header text (length field = strlen) and data bytes */
static void craft(const char *path, const char *header, const void *data, size_t dlen) {
    size_t hl = strlen(header);
    uint8_t *buf = malloc(8 + hl + dlen + 1);
    for (int i = 0; i < 8; i++) buf[i] = (uint8_t)((uint64_t)hl >> (8 * i));
    memcpy(buf + 8, header, hl);
    if (dlen) memcpy(buf + 8 + hl, data, dlen);
    write_bytes(path, buf, 8 + hl + dlen);
    free(buf);
}

/* open must fail with a one-line "<path>: <why> (<fix>)" containing want */
static void expect_open_fail(const char *path, const char *want) {
    st_file f;
    char err[ST_ERR_LEN];
    err[0] = '\0';
    int rc = st_open(&f, path, err);
    if (rc == 0) st_close(&f);
    ck_assert_msg(rc == -1, "%s: opened a corrupt file (expected '%s')", path, want);
    ck_assert_msg(strncmp(err, path, strlen(path)) == 0, "message does not start with the path: %s", err);
    ck_assert_msg(strchr(err, '\n') == NULL, "message is not one line: %s", err);
    ck_assert_msg(err[strlen(err) - 1] == ')', "message has no (fix): %s", err);
    if (want) ck_assert_msg(strstr(err, want) != NULL, "message '%s' lacks '%s'", err, want);
    /* the st_file is left empty, so closing it again is harmless */
    ck_assert_ptr_null(f.map);
    st_close(&f);
}

/* ---- fp16 / bf16 ---------------------------------------------------------- */

START_TEST(test_f16_known_bits) {
    ck_assert_uint_eq(st_f32_to_f16(1.0f), 0x3C00);
    ck_assert_uint_eq(st_f32_to_f16(-2.0f), 0xC000);
    ck_assert_uint_eq(st_f32_to_f16(0.0f), 0x0000);
    ck_assert_uint_eq(st_f32_to_f16(-0.0f), 0x8000);
    ck_assert_uint_eq(st_f32_to_f16(65504.0f), 0x7BFF);          /* largest half */
    ck_assert_uint_eq(st_f32_to_f16(65519.0f), 0x7BFF);          /* below the tie */
    ck_assert_uint_eq(st_f32_to_f16(65520.0f), 0x7C00);          /* tie, odd mantissa -> inf */
    ck_assert_uint_eq(st_f32_to_f16(1e6f), 0x7C00);
    ck_assert_uint_eq(st_f32_to_f16(-1e6f), 0xFC00);
    ck_assert_uint_eq(st_f32_to_f16(INFINITY), 0x7C00);
    ck_assert_uint_eq(st_f32_to_f16(-INFINITY), 0xFC00);
    ck_assert_uint_eq(st_f32_to_f16(ldexpf(1, -14)), 0x0400);    /* smallest normal */
    ck_assert_uint_eq(st_f32_to_f16(ldexpf(1, -24)), 0x0001);    /* smallest subnormal */
    ck_assert_uint_eq(st_f32_to_f16(ldexpf(1023, -24)), 0x03FF); /* largest subnormal */
    ck_assert_uint_eq(st_f32_to_f16(ldexpf(1, -25)), 0x0000);    /* tie between 0 and 2^-24 -> even 0 */
    ck_assert_uint_eq(st_f32_to_f16(ldexpf(3, -25)), 0x0002);    /* tie between 1 and 2 (x2^-24) -> 2 */
    ck_assert_uint_eq(st_f32_to_f16(ldexpf(1.0001f, -25)), 0x0001);  /* just above the tie */
    ck_assert_uint_eq(st_f32_to_f16(ldexpf(1, -26)), 0x0000);
    ck_assert_uint_eq(st_f32_to_f16(1.0f + ldexpf(1, -11)), 0x3C00);     /* tie -> even */
    ck_assert_uint_eq(st_f32_to_f16(1.0f + ldexpf(3, -11)), 0x3C02);     /* tie -> even (up) */
    ck_assert_uint_eq(st_f32_to_f16(1.0f / 3.0f), 0x3555);
    ck_assert_uint_eq(st_f32_to_f16(ldexpf(2047, -25)), 0x0400); /* largest-subnormal tie rounds into the normals */
    uint16_t hn = st_f32_to_f16(NAN);
    ck_assert_msg((hn & 0x7C00) == 0x7C00 && (hn & 0x3FF) != 0, "NaN -> 0x%04x", hn);

    ck_assert(st_f16_to_f32(0x3C00) == 1.0f);
    ck_assert(st_f16_to_f32(0xC000) == -2.0f);
    ck_assert(st_f16_to_f32(0x7BFF) == 65504.0f);
    ck_assert(st_f16_to_f32(0x0001) == ldexpf(1, -24));
    ck_assert(st_f16_to_f32(0x03FF) == ldexpf(1023, -24));
    ck_assert(st_f16_to_f32(0x0400) == ldexpf(1, -14));
    ck_assert(st_f16_to_f32(0x3555) == 0.333251953125f);
    ck_assert_uint_eq(fbits(st_f16_to_f32(0x8000)), 0x80000000u);
    ck_assert(isinf(st_f16_to_f32(0x7C00)) && st_f16_to_f32(0x7C00) > 0);
    ck_assert(isinf(st_f16_to_f32(0xFC00)) && st_f16_to_f32(0xFC00) < 0);
    ck_assert(isnan(st_f16_to_f32(0x7E00)));
    ck_assert(isnan(st_f16_to_f32(0x7C01)));
}
END_TEST

/* the value of a half computed from the definition, independent of the converter */
static double half_value(uint16_t h) {
    int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double v = e == 0 ? ldexp(m, -24) : ldexp(1024 + m, e - 25);
    return s ? -v : v;
}

START_TEST(test_f16_exhaustive) {
    for (uint32_t h = 0; h < 65536; h++) {
        float f = st_f16_to_f32((uint16_t)h);
        int e = (h >> 10) & 31, m = h & 1023;
        if (e == 31) {
            ck_assert(m ? isnan(f) : isinf(f));
            if (m) { ck_assert(isnan(st_f16_to_f32(st_f32_to_f16(f)))); continue; }
        } else {
            ck_assert_msg((double)f == half_value((uint16_t)h), "0x%04x -> %g", h, f);
        }
        ck_assert_msg(st_f32_to_f16(f) == h, "round trip 0x%04x -> %g -> 0x%04x", h, f, st_f32_to_f16(f));
    }
    /* every midpoint between neighbouring non-negative halves (exact in f32:
     * 12 significant bits) rounds to the one with the even mantissa; one f32 ulp
     * either side rounds to the nearer one */
    for (uint32_t h = 0; h < 0x7C00; h++) {
        double lo = half_value((uint16_t)h), hi = h + 1 < 0x7C00 ? half_value((uint16_t)(h + 1)) : 65536.0;
        float mid = (float)((lo + hi) / 2);
        ck_assert((double)mid == (lo + hi) / 2);
        uint16_t even = (h & 1) ? (uint16_t)(h + 1) : (uint16_t)h;
        ck_assert_msg(st_f32_to_f16(mid) == even, "midpoint after 0x%04x -> 0x%04x", h, st_f32_to_f16(mid));
        ck_assert_msg(st_f32_to_f16(-mid) == (even | 0x8000), "negative midpoint after 0x%04x", h);
        ck_assert_uint_eq(st_f32_to_f16(nextafterf(mid, 0)), h);
        ck_assert_uint_eq(st_f32_to_f16(nextafterf(mid, INFINITY)), h + 1);
    }
}
END_TEST

START_TEST(test_bf16) {
    ck_assert_uint_eq(st_f32_to_bf16(1.0f), 0x3F80);
    ck_assert_uint_eq(st_f32_to_bf16(-2.0f), 0xC000);
    ck_assert_uint_eq(st_f32_to_bf16(-0.0f), 0x8000);
    ck_assert_uint_eq(st_f32_to_bf16(INFINITY), 0x7F80);
    ck_assert_uint_eq(st_f32_to_bf16(-INFINITY), 0xFF80);
    ck_assert_uint_eq(st_f32_to_bf16(FLT_MAX), 0x7F80);                 /* rounds past the largest bf16 */
    ck_assert_uint_eq(st_f32_to_bf16(1.0f + ldexpf(1, -8)), 0x3F80);   /* tie -> even */
    ck_assert_uint_eq(st_f32_to_bf16(1.0f + ldexpf(3, -8)), 0x3F82);   /* tie -> even (up) */
    ck_assert_uint_eq(st_f32_to_bf16(bitsf(0x00018000)), 0x0002);      /* subnormal tie -> even (up) */
    ck_assert_uint_eq(st_f32_to_bf16(bitsf(0x00008000)), 0x0000);      /* subnormal tie -> even 0 */
    ck_assert_uint_eq(st_f32_to_bf16(bitsf(0x00008001)), 0x0001);
    ck_assert(st_bf16_to_f32(0x3F80) == 1.0f);
    ck_assert(st_bf16_to_f32(0x4049) == 3.140625f);
    uint16_t bn = st_f32_to_bf16(NAN);
    ck_assert(isnan(st_bf16_to_f32(bn)));
    /* a NaN whose payload sits only in the low bits must not become inf */
    ck_assert(isnan(st_bf16_to_f32(st_f32_to_bf16(bitsf(0x7F800001)))));
    ck_assert(isnan(st_bf16_to_f32(st_f32_to_bf16(bitsf(0xFF800001)))));
    for (uint32_t h = 0; h < 65536; h++) {
        float f = st_bf16_to_f32((uint16_t)h);
        ck_assert_uint_eq(fbits(f), h << 16);
        if (isnan(f)) { ck_assert(isnan(st_bf16_to_f32(st_f32_to_bf16(f)))); continue; }
        ck_assert_uint_eq(st_f32_to_bf16(f), h);
        if ((h & 0x7F80) == 0x7F80) continue;                           /* inf: no upper neighbour */
        /* the midpoint to the next bf16 goes to the even one, +-1 ulp to the nearer */
        uint32_t mid = (h << 16) | 0x8000;
        uint16_t even = (h & 1) ? (uint16_t)(h + 1) : (uint16_t)h;
        ck_assert_uint_eq(st_f32_to_bf16(bitsf(mid)), even);
        ck_assert_uint_eq(st_f32_to_bf16(bitsf(mid - 1)), h);
        ck_assert_uint_eq(st_f32_to_bf16(bitsf(mid + 1)), h + 1);
    }
}
END_TEST

START_TEST(test_dtype_table) {
    ck_assert_uint_eq(st_dtype_size(ST_F32), 4);
    ck_assert_uint_eq(st_dtype_size(ST_F16), 2);
    ck_assert_uint_eq(st_dtype_size(ST_BF16), 2);
    ck_assert_uint_eq(st_dtype_size(ST_F64), 8);
    ck_assert_uint_eq(st_dtype_size(ST_I64), 8);
    ck_assert_uint_eq(st_dtype_size(ST_I32), 4);
    ck_assert_uint_eq(st_dtype_size(ST_I16), 2);
    ck_assert_uint_eq(st_dtype_size(ST_I8), 1);
    ck_assert_uint_eq(st_dtype_size(ST_U8), 1);
    ck_assert_uint_eq(st_dtype_size(ST_BOOL), 1);
    ck_assert_str_eq(st_dtype_name(ST_BF16), "BF16");
    ck_assert_str_eq(st_dtype_name(ST_BOOL), "BOOL");
}
END_TEST

/* ---- the file written by the Python library ------------------------------- */

static uint16_t raw16(const st_tensor *t, size_t i) { return (uint16_t)(t->data[2 * i] | t->data[2 * i + 1] << 8); }

START_TEST(test_python_fixture) {
    st_file f;
    char err[ST_ERR_LEN];
    ck_assert_msg(st_open(&f, PY_FIXTURE, err) == 0, "%s", err);
    ck_assert_int_eq(f.ntensors, 13);
    ck_assert_int_eq(f.nmeta, 2);
    ck_assert_str_eq(st_meta(&f, "format"), "pt");
    ck_assert_str_eq(st_meta(&f, "note"), "h\xc3\xa9llo \"q\"\n\\");
    ck_assert_ptr_null(st_meta(&f, "missing"));

    /* f32 = arange(6) * 0.25 - 1, shape [2, 3] */
    int64_t s23[2] = { 2, 3 };
    float x[6];
    ck_assert_msg(st_read_f32(&f, "f32", 2, s23, x, err) == 0, "%s", err);
    for (int i = 0; i < 6; i++) ck_assert(x[i] == i * 0.25f - 1.0f);

    /* 0-d scalar and zero-size tensors */
    const st_tensor *sc = st_find(&f, "scalar");
    ck_assert_ptr_nonnull(sc);
    ck_assert_int_eq(sc->ndim, 0);
    ck_assert_uint_eq(sc->numel, 1);
    ck_assert(fx_scalar(&f, "scalar") == 7.25f);
    ck_assert_msg(st_read_f32(&f, "scalar", 0, (const int64_t *)s23, x, err) == 0, "%s", err);
    const st_tensor *em = st_find(&f, "empty");
    ck_assert_int_eq(em->ndim, 2);
    ck_assert(em->shape[0] == 0 && em->shape[1] == 3);
    ck_assert_uint_eq(em->numel, 0);
    ck_assert_uint_eq(em->nbytes, 0);
    size_t n = 99;
    float *e = st_load_f32(&f, "empty", &n, err);
    ck_assert_ptr_nonnull(e);
    ck_assert_uint_eq(n, 0);
    free(e);

    /* torch's f16 / bf16 rounding of src, and torch's conversion back */
    const st_tensor *src = st_find(&f, "src"), *h = st_find(&f, "src_f16"), *b = st_find(&f, "src_bf16");
    ck_assert(src && h && b);
    ck_assert_int_eq(h->dtype, ST_F16);
    ck_assert_int_eq(b->dtype, ST_BF16);
    size_t N = src->numel;
    ck_assert_uint_eq(N, 95);
    float *s = fx_get(&f, "src", N);
    float *hf = fx_get(&f, "src_f16", N), *hf_ref = fx_get(&f, "src_f16_as_f32", N);
    float *bf = fx_get(&f, "src_bf16", N), *bf_ref = fx_get(&f, "src_bf16_as_f32", N);
    for (size_t i = 0; i < N; i++) {
        if (isnan(s[i])) {
            ck_assert(isnan(hf[i]) && isnan(bf[i]) && isnan(st_f16_to_f32(st_f32_to_f16(s[i]))));
            continue;
        }
        ck_assert_msg(fbits(hf[i]) == fbits(hf_ref[i]), "f16 %zu: %g vs torch %g", i, hf[i], hf_ref[i]);
        ck_assert_msg(fbits(bf[i]) == fbits(bf_ref[i]), "bf16 %zu: %g vs torch %g", i, bf[i], bf_ref[i]);
        ck_assert_msg(st_f32_to_f16(s[i]) == raw16(h, i), "f32->f16 of %.9g: 0x%04x, torch 0x%04x", s[i],
                      st_f32_to_f16(s[i]), raw16(h, i));
        ck_assert_msg(st_f32_to_bf16(s[i]) == raw16(b, i), "f32->bf16 of %.9g: 0x%04x, torch 0x%04x", s[i],
                      st_f32_to_bf16(s[i]), raw16(b, i));
    }
    /* the first entries are the hand-picked ones in make_st_fixture.py */
    ck_assert_uint_eq(raw16(h, 2), 0x3C00);   /* 1.0 */
    ck_assert_uint_eq(raw16(b, 2), 0x3F80);
    ck_assert_uint_eq(raw16(h, 7), 0x7BFF);   /* 65504 */
    ck_assert_uint_eq(raw16(h, 9), 0x7C00);   /* 65520 -> inf */
    ck_assert_uint_eq(raw16(h, 13), 0x0001);  /* 2^-24 */
    free(s); free(hf); free(hf_ref); free(bf); free(bf_ref);

    float *d = fx_get(&f, "f64", 3);
    ck_assert(d[0] == 1.5f && d[1] == -ldexpf(1, -30) && isinf(d[2]) && d[2] > 0);
    free(d);
    float *o = fx_get(&f, "odd.f16", 3);
    ck_assert(o[0] == 1.0f && o[1] == -2.0f && o[2] == 0.5f);
    free(o);

    /* integer tensors: raw bytes are right, float conversion is refused by name */
    const st_tensor *ii = st_find(&f, "i64");
    ck_assert_int_eq(ii->dtype, ST_I64);
    int64_t iv[3];
    memcpy(iv, ii->data, sizeof iv);
    ck_assert(iv[0] == -1 && iv[1] == 0 && iv[2] == ((int64_t)1 << 40));
    const st_tensor *u8 = st_find(&f, "u8");
    ck_assert(u8->data[0] == 1 && u8->data[1] == 2 && u8->data[2] == 255);
    ck_assert_int_eq(st_to_f32(ii, x, err), -1);
    ck_assert_msg(strstr(err, "'i64'") && strstr(err, "I64") && strstr(err, "integer"), "%s", err);
    ck_assert_ptr_null(st_load_f32(&f, "i64", NULL, err));
    ck_assert_msg(strstr(err, PY_FIXTURE) && strstr(err, "'i64'"), "%s", err);

    /* shape checks and missing tensors name the tensor */
    int64_t good[4] = { 4, 2, 3, 3 }, bad[4] = { 4, 2, 1, 1 };
    float w[72];
    ck_assert_msg(st_read_f32(&f, "conv.weight", 4, good, w, err) == 0, "%s", err);
    ck_assert_int_eq(st_read_f32(&f, "conv.weight", 4, bad, w, err), -1);
    ck_assert_msg(strstr(err, "tensor 'conv.weight' has shape [4, 2, 3, 3], expected [4, 2, 1, 1]"), "%s", err);
    ck_assert_msg(strncmp(err, PY_FIXTURE ": ", strlen(PY_FIXTURE) + 2) == 0, "%s", err);
    ck_assert_int_eq(st_read_f32(&f, "conv.weight", 2, good, w, err), -1);
    ck_assert_msg(strstr(err, "expected [4, 2]"), "%s", err);
    ck_assert_int_eq(st_read_f32(&f, "conv.bias", 1, good, w, err), -1);
    ck_assert_msg(strstr(err, "missing tensor 'conv.bias'"), "%s", err);
    ck_assert_ptr_null(st_load_f32(&f, "nope", NULL, err));
    ck_assert_msg(strstr(err, "missing tensor 'nope'"), "%s", err);
    ck_assert_ptr_null(st_find(&f, "nope"));
    ck_assert_ptr_null(st_find(&f, ""));
    st_close(&f);
    st_close(&f);                          /* a second close is harmless */
}
END_TEST

/* our writer, given the same tensors and metadata order, writes the very bytes
 * the Python library wrote */
START_TEST(test_writer_matches_python) {
    make_tmpdir();
    st_file f;
    char err[ST_ERR_LEN], out[256];
    ck_assert_msg(st_open(&f, PY_FIXTURE, err) == 0, "%s", err);
    st_writer *w = st_writer_new();
    for (int i = 0; i < f.nmeta; i++) ck_assert_int_eq(st_writer_meta(w, f.meta_keys[i], f.meta_vals[i]), 0);
    /* add in reverse name order: the writer must do its own sorting */
    for (int i = f.ntensors - 1; i >= 0; i--) {
        const st_tensor *t = &f.tensors[i];
        ck_assert_int_eq(st_writer_add(w, t->name, t->dtype, t->ndim, t->shape, t->data), 0);
    }
    tmp_path(out, "copy.safetensors");
    ck_assert_msg(st_writer_save(w, out, err) == 0, "%s", err);
    st_writer_free(w);
    st_close(&f);
    size_t na, nb;
    uint8_t *a = read_bytes(PY_FIXTURE, &na), *b = read_bytes(out, &nb);
    ck_assert_uint_eq(na, nb);
    ck_assert_msg(memcmp(a, b, na) == 0, "bytes differ from the Python library's file");
    free(a); free(b);
    remove(out);
    rmdir(tmpdir);
}
END_TEST

/* ---- writer -> reader round trips ---------------------------------------------- */

START_TEST(test_roundtrip) {
    make_tmpdir();
    char path[256], err[ST_ERR_LEN];
    tmp_path(path, "rt.safetensors");
    enum { N = 300 };
    float x[N];
    fill_uniform(x, N, -3.0f, 3.0f, 42);
    x[0] = 65504.0f; x[1] = ldexpf(1, -24); x[2] = INFINITY; x[3] = -INFINITY; x[4] = NAN; x[5] = -0.0f;
    int64_t shape[3] = { 3, 10, 10 }, zshape[3] = { 4, 0, 2 };
    float one = 2.5f;
    st_writer *w = st_writer_new();
    ck_assert_int_eq(st_writer_add_f32(w, "a.f32", ST_F32, 3, shape, x), 0);
    ck_assert_int_eq(st_writer_add_f32(w, "a.f16", ST_F16, 3, shape, x), 0);
    ck_assert_int_eq(st_writer_add_f32(w, "a.bf16", ST_BF16, 3, shape, x), 0);
    ck_assert_int_eq(st_writer_add_f32(w, "a.f64", ST_F64, 3, shape, x), 0);
    ck_assert_int_eq(st_writer_add_f32(w, "scalar", ST_F32, 0, NULL, &one), 0);
    ck_assert_int_eq(st_writer_add_f32(w, "zero", ST_F16, 3, zshape, NULL), 0);
    int32_t iv[3] = { -7, 0, 1 << 30 };
    int64_t s3[1] = { 3 };
    ck_assert_int_eq(st_writer_add(w, "ints", ST_I32, 1, s3, iv), 0);
    /* keys that need escaping, unicode, and a replaced value */
    ck_assert_int_eq(st_writer_meta(w, "ss_network_dim", "8"), 0);
    ck_assert_int_eq(st_writer_meta(w, "q\"uote\\s", "tab\there\x01 ctrl \xe2\x82\xac"), 0);
    ck_assert_int_eq(st_writer_meta(w, "ss_network_dim", "16"), 0);
    /* bad additions are refused */
    ck_assert_int_eq(st_writer_add_f32(w, "a.f32", ST_F32, 3, shape, x), -1);          /* duplicate */
    ck_assert_int_eq(st_writer_add_f32(w, "__metadata__", ST_F32, 3, shape, x), -1);
    ck_assert_int_eq(st_writer_add_f32(w, "i", ST_I64, 3, shape, x), -1);              /* not a float type */
    int64_t neg[1] = { -1 };
    ck_assert_int_eq(st_writer_add_f32(w, "neg", ST_F32, 1, neg, x), -1);
    ck_assert_int_eq(st_writer_add_f32(w, "deep", ST_F32, ST_MAX_DIMS + 1, shape, x), -1);
    int64_t huge[4] = { (int64_t)1 << 40, (int64_t)1 << 40, 1, 1 };
    ck_assert_int_eq(st_writer_add(w, "huge", ST_F32, 2, huge, x), -1);                 /* numel overflows */
    /* data is copied at add time: changing x now must not change the file */
    float x0 = x[10];
    x[10] = 1234.0f;
    ck_assert_msg(st_writer_save(w, path, err) == 0, "%s", err);
    x[10] = x0;
    st_writer_free(w);

    st_file f;
    ck_assert_msg(st_open(&f, path, err) == 0, "%s", err);
    ck_assert_int_eq(f.ntensors, 7);
    ck_assert_str_eq(st_meta(&f, "ss_network_dim"), "16");
    ck_assert_str_eq(st_meta(&f, "q\"uote\\s"), "tab\there\x01 ctrl \xe2\x82\xac");
    ck_assert_int_eq(f.nmeta, 2);
    float y[N];
    const char *names[4] = { "a.f32", "a.f16", "a.bf16", "a.f64" };
    for (int k = 0; k < 4; k++) {
        ck_assert_msg(st_read_f32(&f, names[k], 3, shape, y, err) == 0, "%s", err);
        ck_assert(y[0] == (k == 0 || k == 3 ? 65504.0f : k == 1 ? 65504.0f : 65536.0f)); /* bf16 rounds 65504 up */
        ck_assert(isinf(y[2]) && y[2] > 0 && isinf(y[3]) && y[3] < 0 && isnan(y[4]));
        ck_assert(y[5] == 0 && signbit(y[5]));
        for (int i = 6; i < N; i++) {
            /* F32 and F64 exact; F16 within half an ulp (2^-11 relative),
             * BF16 within 2^-8 relative */
            double tol = k == 1 ? ldexp(fabs(x[i]), -11) : k == 2 ? ldexp(fabs(x[i]), -8) : 0;
            ck_assert_msg(fabs((double)y[i] - x[i]) <= tol, "%s[%d]: %.9g vs %.9g", names[k], i, y[i], x[i]);
        }
    }
    ck_assert(y[1] == ldexpf(1, -24));  /* f64 keeps 2^-24 */
    ck_assert(fx_scalar(&f, "scalar") == 2.5f);
    ck_assert_int_eq(st_find(&f, "scalar")->ndim, 0);
    const st_tensor *z = st_find(&f, "zero");
    ck_assert(z->ndim == 3 && z->shape[1] == 0 && z->numel == 0 && z->dtype == ST_F16);
    const st_tensor *it = st_find(&f, "ints");
    int32_t got[3];
    memcpy(got, it->data, sizeof got);
    ck_assert(got[0] == -7 && got[1] == 0 && got[2] == (1 << 30));
    /* the data section starts 8-aligned: the header was padded */
    uint64_t hl = 0;
    memcpy(&hl, f.map, 8);
    ck_assert_uint_eq(hl % 8, 0);
    st_close(&f);
    /* no tmp file left behind */
    char tmp[300];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    ck_assert_int_eq(access(tmp, F_OK), -1);
    remove(path);

    /* an empty writer makes a valid file with no tensors */
    w = st_writer_new();
    ck_assert_int_eq(st_writer_save(w, path, err), 0);
    st_writer_free(w);
    size_t n;
    uint8_t *bytes = read_bytes(path, &n);
    ck_assert_uint_eq(n, 16);
    ck_assert(memcmp(bytes, "\x08\0\0\0\0\0\0\0{}      ", 16) == 0);   /* as Python writes it */
    free(bytes);
    ck_assert_msg(st_open(&f, path, err) == 0, "%s", err);
    ck_assert_int_eq(f.ntensors, 0);
    st_close(&f);
    remove(path);
    rmdir(tmpdir);
}
END_TEST

/* tensors at odd byte offsets (allowed by the format) read through memcpy */
START_TEST(test_unaligned) {
    make_tmpdir();
    char path[256], err[ST_ERR_LEN];
    tmp_path(path, "odd.safetensors");
    uint8_t data[1 + 8 + 4 + 16];
    float a[2] = { 1.5f, -3.25f };
    uint16_t h[2] = { 0x3C00, 0xC100 };                  /* 1.0, -2.5 */
    double d[2] = { 0.125, -1e-3 };
    data[0] = 0xEE;
    memcpy(data + 1, a, 8);
    memcpy(data + 9, h, 4);
    memcpy(data + 13, d, 16);
    craft(path, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[1,9]},"
                "\"h\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[9,13]},"
                "\"d\":{\"dtype\":\"F64\",\"shape\":[2],\"data_offsets\":[13,29]}}", data, sizeof data);
    st_file f;
    ck_assert_msg(st_open(&f, path, err) == 0, "%s", err);
    float y[2];
    ck_assert(st_read_f32(&f, "a", 0, NULL, y, err) == 0 && y[0] == 1.5f && y[1] == -3.25f);
    ck_assert(st_read_f32(&f, "h", 0, NULL, y, err) == 0 && y[0] == 1.0f && y[1] == -2.5f);
    ck_assert(st_read_f32(&f, "d", 0, NULL, y, err) == 0 && y[0] == 0.125f && y[1] == (float)-1e-3);
    st_close(&f);
    remove(path);
    rmdir(tmpdir);
}
END_TEST

/* a small valid file from our writer: F32, F16, BF16, a scalar and metadata */
static void write_small(const char *path) {
    float x[6] = { 1, -2, 0.5f, 3, 65504, -0.25f }, one = 4;
    int64_t s6[1] = { 6 }, s23[2] = { 2, 3 };
    char err[ST_ERR_LEN];
    st_writer *w = st_writer_new();
    ck_assert_int_eq(st_writer_add_f32(w, "w.f32", ST_F32, 2, s23, x), 0);
    ck_assert_int_eq(st_writer_add_f32(w, "w.f16", ST_F16, 1, s6, x), 0);
    ck_assert_int_eq(st_writer_add_f32(w, "w.bf16", ST_BF16, 1, s6, x), 0);
    ck_assert_int_eq(st_writer_add_f32(w, "s", ST_F32, 0, NULL, &one), 0);
    ck_assert_int_eq(st_writer_meta(w, "format", "pt"), 0);
    ck_assert_msg(st_writer_save(w, path, err) == 0, "%s", err);
    st_writer_free(w);
}

/* ---- corrupt input -------------------------------------------------------------- */

/* every prefix of a valid file is rejected (the writer leaves no slack at the
 * end, so cutting even one byte loses tensor data): every length of a small
 * file of ours, and every 7th length of the Python library's file */
START_TEST(test_truncated_every_length) {
    make_tmpdir();
    char path[256], small[256];
    tmp_path(path, "cut.safetensors");
    tmp_path(small, "small.safetensors");
    write_small(small);
    for (int which = 0; which < 2; which++) {
        size_t n;
        uint8_t *full = read_bytes(which ? PY_FIXTURE : small, &n);
        for (size_t len = 0; len < n; len += which ? 7 : 1) {
            write_bytes(path, full, len);
            expect_open_fail(path, len < 8 ? "too short" : "truncated");
        }
        free(full);
    }
    remove(small);
    remove(path);
    rmdir(tmpdir);
}
END_TEST

/* single-byte corruptions anywhere in the header: open either fails with a
 * message or succeeds with tensors that lie inside the file (converting them
 * all runs under ASan) */
START_TEST(test_header_byte_flips) {
    make_tmpdir();
    char path[256], err[ST_ERR_LEN];
    tmp_path(path, "flip.safetensors");
    write_small(path);
    size_t n;
    uint8_t *full = read_bytes(path, &n);
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = hl << 8 | full[i];
    uint8_t *m = malloc(n);
    const uint8_t subs[] = { '0', '9', '"', '[', '}', ',', '-', 0x00, 0xFF, 'e', ' ' };
    int opened = 0, failed = 0;
    for (size_t pos = 0; pos < 8 + hl; pos++) {
        for (size_t k = 0; k < sizeof subs; k++) {
            memcpy(m, full, n);
            if (m[pos] == subs[k]) continue;
            m[pos] = subs[k];
            write_bytes(path, m, n);
            st_file f;
            err[0] = '\0';
            if (st_open(&f, path, err) == 0) {
                opened++;
                for (int t = 0; t < f.ntensors; t++) {
                    const st_tensor *tt = &f.tensors[t];
                    ck_assert(tt->data >= (const uint8_t *)f.map && tt->data + tt->nbytes <= (const uint8_t *)f.map + f.size);
                    float *y = malloc((tt->numel ? tt->numel : 1) * sizeof(float));
                    st_to_f32(tt, y, err);
                    free(y);
                }
                st_close(&f);
            } else {
                failed++;
                ck_assert_msg(strncmp(err, path, strlen(path)) == 0 && !strchr(err, '\n'), "bad message: %s", err);
            }
        }
    }
    ck_assert(opened > 0 && failed > 0);
    free(m);
    free(full);
    remove(path);
    rmdir(tmpdir);
}
END_TEST

START_TEST(test_corrupt_headers) {
    make_tmpdir();
    char path[256];
    tmp_path(path, "bad.safetensors");
    uint8_t zeros[64] = { 0 };

    write_bytes(path, zeros, 0);
    expect_open_fail(path, "too short");
    write_bytes(path, zeros, 7);
    expect_open_fail(path, "too short");

    /* header length field: huge, absurd, just past the end */
    uint8_t buf[16] = { 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F, '{', '}' };
    write_bytes(path, buf, 10);
    expect_open_fail(path, "absurd");
    uint64_t big = 200u * 1024 * 1024;
    for (int i = 0; i < 8; i++) buf[i] = (uint8_t)(big >> (8 * i));
    write_bytes(path, buf, 10);
    expect_open_fail(path, "absurd");
    for (int i = 0; i < 8; i++) buf[i] = 0;
    buf[0] = 3;                            /* 3 bytes of header but only 2 present */
    write_bytes(path, buf, 10);
    expect_open_fail(path, "truncated");
    char missing_dir[300];
    snprintf(missing_dir, sizeof missing_dir, "%s/nope/x.safetensors", tmpdir);
    expect_open_fail(missing_dir, "cannot open");
    expect_open_fail(tmpdir, "not a regular file");

    static const struct { const char *header; size_t dlen; const char *want; } cases[] = {
        { "not json at all", 0, "not valid JSON" },
        { "{\"a\": ", 0, "not valid JSON" },
        { "[]", 0, "not an object" },
        { "\"str\"", 0, "not an object" },
        { "{\"a\": 1}", 0, "'a' is not an object" },
        { "{\"a\": {\"shape\": [1], \"data_offsets\": [0, 4]}}", 4, "'a' has no dtype" },
        { "{\"a\": {\"dtype\": \"F32\", \"data_offsets\": [0, 4]}}", 4, "'a' has no shape" },
        { "{\"a\": {\"dtype\": \"F32\", \"shape\": [1]}}", 4, "'a' has no data_offsets" },
        { "{\"a\": {\"dtype\": \"F8_E4M3\", \"shape\": [1], \"data_offsets\": [0, 1]}}", 1, "unknown dtype F8_E4M3" },
        { "{\"a\": {\"dtype\": 5, \"shape\": [1], \"data_offsets\": [0, 4]}}", 4, "unknown dtype" },
        { "{\"a\": {\"dtype\": \"F32\", \"shape\": [-1], \"data_offsets\": [0, 4]}}", 4, "shape[0] is not a non-negative integer" },
        { "{\"a\": {\"dtype\": \"F32\", \"shape\": [1.5], \"data_offsets\": [0, 4]}}", 4, "shape[0]" },
        { "{\"a\": {\"dtype\": \"F32\", \"shape\": [2, \"3\"], \"data_offsets\": [0, 4]}}", 4, "shape[1]" },
        { "{\"a\": {\"dtype\": \"F32\", \"shape\": 4, \"data_offsets\": [0, 4]}}", 4, "shape is not an array" },
        { "{\"a\": {\"dtype\": \"F32\", \"shape\": [1,1,1,1,1,1,1,1,1], \"data_offsets\": [0, 4]}}", 4, "at most 8" },
        { "{\"a\": {\"dtype\": \"F32\", \"shape\": [4294967296, 4294967296, 4294967296], \"data_offsets\": [0, 4]}}", 4,
          "too large" },
        { "{\"a\": {\"dtype\": \"F32\", \"shape\": [1e300], \"data_offsets\": [0, 4]}}", 4, "shape[0]" },
        { "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [-4, 0]}}", 4, "data_offsets" },
        { "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0.5, 4.5]}}", 4, "data_offsets" },
        { "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0]}}", 4, "data_offsets" },
        { "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [8, 4]}}", 8, "begin after they end" },
        { "{\"x\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]}}", 8,
          "truncated: tensor 'x' ends at byte" },
        { "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 18446744073709551615]}}", 8,
          "data_offsets" },
        { "{\"a\": {\"dtype\": \"F32\", \"shape\": [2, 2], \"data_offsets\": [0, 12]}}", 16,
          "tensor 'a' has 12 bytes but dtype F32 and shape [2, 2] need 16" },
        { "{\"a\": {\"dtype\": \"F16\", \"shape\": [2], \"data_offsets\": [0, 8]}}", 8, "need 4" },
        { "{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]},"
          " \"b\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [4, 12]}}", 16, "'a' and 'b' overlap" },
        { "{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]},"
          " \"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [8, 16]}}", 16, "key \"a\" appears twice" },
        /* __metadata__ twice, the second larger: this used to write past the
         * first one's arrays (double free in ./sample --lora, a segfault in
         * ./train --resume) */
        { "{\"__metadata__\": {\"k\": \"v\"}, \"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]},"
          " \"__metadata__\": {\"k1\": \"1\", \"k2\": \"2\", \"k3\": \"3\", \"k4\": \"4\", \"k5\": \"5\"}}", 4,
          "key \"__metadata__\" appears twice" },
        { "{\"__metadata__\": {\"k\": \"v\", \"k\": \"w\"}}", 0, "key \"k\" appears twice" },
        /* a name with control characters (JSON escapes) still gives one line */
        { "{\"a\\nb\\u0007\": 1}", 0, "'a?b?' is not an object" },
        { "{\"__metadata__\": [1], \"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}}", 4,
          "__metadata__" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        craft(path, cases[i].header, zeros, cases[i].dlen);
        expect_open_fail(path, cases[i].want);
    }
    /* the exact message for a truncated tensor */
    {
        st_file f;
        char err[ST_ERR_LEN], want[512];
        const char *hdr = "{\"x\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]}}";
        craft(path, hdr, zeros, 8);
        ck_assert_int_eq(st_open(&f, path, err), -1);
        /* the tensor needs file bytes up to 8 + header + 16; the file has 8 + header + 8 */
        snprintf(want, sizeof want, "%s: truncated: tensor 'x' ends at byte %zu but the file has %zu "
                 "(re-download or re-save the file)", path, 8 + strlen(hdr) + 16, 8 + strlen(hdr) + 8);
        ck_assert_str_eq(err, want);
    }
    /* sanity: the same shapes with consistent offsets open fine, metadata
     * with a non-string value is skipped, and adjacent / empty tensors are
     * not overlaps */
    craft(path, "{\"__metadata__\": {\"k\": \"v\", \"n\": 3}, \"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]},"
                " \"e\": {\"dtype\": \"F32\", \"shape\": [0], \"data_offsets\": [4, 4]},"
                " \"b\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [8, 16]}}", zeros, 16);
    st_file f;
    char err[ST_ERR_LEN];
    ck_assert_msg(st_open(&f, path, err) == 0, "%s", err);
    ck_assert_int_eq(f.ntensors, 3);
    ck_assert_int_eq(f.nmeta, 1);
    ck_assert_str_eq(st_meta(&f, "k"), "v");
    st_close(&f);
    remove(path);
    rmdir(tmpdir);
}
END_TEST

/* ---- failing saves ---------------------------------------------------------------- */

static st_writer *small_writer(void) {
    st_writer *w = st_writer_new();
    float x[4] = { 1, 2, 3, 4 };
    int64_t s[1] = { 4 };
    ck_assert_int_eq(st_writer_add_f32(w, "x", ST_F32, 1, s, x), 0);
    return w;
}

static void assert_file_is(const char *path, const uint8_t *want, size_t n) {
    size_t m;
    uint8_t *got = read_bytes(path, &m);
    ck_assert_msg(m == n && memcmp(got, want, n) == 0, "%s changed", path);
    free(got);
}

START_TEST(test_save_failures) {
    make_tmpdir();
    char path[256], tmp[300], err[ST_ERR_LEN];
    const uint8_t old[] = "the previous checkpoint, which must survive";
    tmp_path(path, "keep.safetensors");
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    write_bytes(path, old, sizeof old);
    st_writer *w = small_writer();

    /* 1. the tmp file cannot be created (a directory is in the way) */
    ck_assert_int_eq(mkdir(tmp, 0755), 0);
    ck_assert_int_eq(st_writer_save(w, path, err), -1);
    ck_assert_msg(strncmp(err, path, strlen(path)) == 0 && strstr(err, "cannot create"), "%s", err);
    assert_file_is(path, old, sizeof old);
    ck_assert_int_eq(rmdir(tmp), 0);

    /* 2. the disk is full: writes go to /dev/full, the fflush fails */
    ck_assert_int_eq(symlink("/dev/full", tmp), 0);
    ck_assert_int_eq(st_writer_save(w, path, err), -1);
    ck_assert_msg(strncmp(err, path, strlen(path)) == 0 && strstr(err, "writing"), "%s", err);
    assert_file_is(path, old, sizeof old);
    struct stat sb;
    ck_assert_int_eq(lstat(tmp, &sb), -1);   /* the failed tmp was removed */

    /* 3. the directory does not exist */
    char nodir[300];
    snprintf(nodir, sizeof nodir, "%s/no/such/dir/out.safetensors", tmpdir);
    ck_assert_int_eq(st_writer_save(w, nodir, err), -1);
    ck_assert_msg(strncmp(err, nodir, strlen(nodir)) == 0, "%s", err);

    /* 4. the rename fails (a non-empty directory sits at the target): the tmp is removed */
    char dpath[256], inner[300], dtmp[300];
    tmp_path(dpath, "dirtarget");
    ck_assert_int_eq(mkdir(dpath, 0755), 0);
    snprintf(inner, sizeof inner, "%s/f", dpath);
    write_bytes(inner, old, sizeof old);
    ck_assert_int_eq(st_writer_save(w, dpath, err), -1);
    ck_assert_msg(strncmp(err, dpath, strlen(dpath)) == 0 && strstr(err, "rename"), "%s", err);
    snprintf(dtmp, sizeof dtmp, "%s.tmp", dpath);
    ck_assert_int_eq(access(dtmp, F_OK), -1);
    assert_file_is(inner, old, sizeof old);
    remove(inner);
    rmdir(dpath);

    /* 5. a read-only directory (only meaningful when not root, who may write anyway) */
    if (geteuid() != 0) {
        ck_assert_int_eq(chmod(tmpdir, 0555), 0);
        ck_assert_int_eq(st_writer_save(w, path, err), -1);
        ck_assert_msg(strncmp(err, path, strlen(path)) == 0, "%s", err);
        assert_file_is(path, old, sizeof old);
        chmod(tmpdir, 0755);
    }

    /* and a good save replaces the file */
    ck_assert_msg(st_writer_save(w, path, err) == 0, "%s", err);
    st_file f;
    ck_assert_msg(st_open(&f, path, err) == 0, "%s", err);
    float y[4];
    int64_t s[1] = { 4 };
    ck_assert_int_eq(st_read_f32(&f, "x", 1, s, y, err), 0);
    ck_assert(y[0] == 1 && y[3] == 4);
    st_close(&f);
    st_writer_free(w);
    remove(path);
    rmdir(tmpdir);
}
END_TEST

static Suite *safetensors_suite(void) {
    Suite *s = suite_create("safetensors");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_f16_known_bits);
    tcase_add_test(tc, test_f16_exhaustive);
    tcase_add_test(tc, test_bf16);
    tcase_add_test(tc, test_dtype_table);
    tcase_add_test(tc, test_python_fixture);
    tcase_add_test(tc, test_writer_matches_python);
    tcase_add_test(tc, test_roundtrip);
    tcase_add_test(tc, test_unaligned);
    tcase_add_test(tc, test_truncated_every_length);
    tcase_add_test(tc, test_header_byte_flips);
    tcase_add_test(tc, test_corrupt_headers);
    tcase_add_test(tc, test_save_failures);
    suite_add_tcase(s, tc);
    return s;
}

CHECK_MAIN(safetensors_suite)

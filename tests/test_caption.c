/* test_caption.c: kohya's caption rules (caption.c) and the LoRA metadata
 * kohya computes: SHA-256 against FIPS 180-4's vectors, sshs_model_hash /
 * sshs_legacy_hash against values the real Python safetensors library gave
 * (tools/make_kohya_hash_fixture.py), and ss_tag_frequency / ss_dataset_dirs
 * / JSON strings against what Python's json.dumps writes for the same input
 * (written out by hand here from its rules). */
#include "testutil.h"
#include "caption.h"
#include "sha256.h"

/* ---- SHA-256 ------------------------------------------------------------------ */

static void sha_hex(const void *data, size_t n, size_t chunk, char hex[65]) {
    sha256_ctx c;
    uint8_t d[32];
    sha256_init(&c);
    for (size_t o = 0; o < n; o += chunk) sha256_update(&c, (const char *)data + o, n - o < chunk ? n - o : chunk);
    sha256_final(&c, d);
    sha256_hex(d, hex);
}

START_TEST(test_sha256_vectors) {
    char h[65];
    sha_hex("", 0, 1, h);
    ck_assert_str_eq(h, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    sha_hex("abc", 3, 3, h);
    ck_assert_str_eq(h, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    const char *m2 = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";   /* 448 bits: padding spills */
    for (size_t chunk = 1; chunk <= 64; chunk += 7) {
        sha_hex(m2, strlen(m2), chunk, h);
        ck_assert_str_eq(h, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    }
    size_t n = 1000000;
    char *a = malloc(n);
    memset(a, 'a', n);
    sha_hex(a, n, 4096, h);
    ck_assert_str_eq(h, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    sha_hex(a, n, 999, h);   /* odd chunk sizes give the same */
    ck_assert_str_eq(h, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    free(a);
}
END_TEST

/* ---- kohya's hashes ------------------------------------------------------------- */

/* the fixture's tensor values: ((i*37 + seed) % 1009 - 504) / 64, exact in f16 too */
static float *fixture_values(size_t n, int seed) {
    float *v = malloc(sizeof(float) * n);
    for (size_t i = 0; i < n; i++) v[i] = (float)((long)((i * 37 + (size_t)seed) % 1009) - 504) / 64.0f;
    return v;
}

static void add_fixture_tensor(st_writer *w, const char *name, int64_t r, int64_t c, int seed, st_dtype dt) {
    int64_t sh[2] = {r, c};
    float *v = fixture_values((size_t)(r * c), seed);
    ck_assert(st_writer_add_f32(w, name, dt, 2, sh, v) == 0);
    free(v);
    char alpha[256];
    snprintf(alpha, sizeof alpha, "%.*s.alpha", (int)(strchr(name, '.') - name), name);
    float two = 2.0f;
    if (strstr(name, "lora_up")) return;                  /* the fixture sets each alpha once */
    ck_assert(st_writer_add_f32(w, alpha, ST_F32, 0, NULL, &two) == 0);
}

START_TEST(test_kohya_hashes_fixture) {
    FILE *f = fopen(FIXTURE_DIR "kohya_hashes.txt", "r");
    ck_assert_msg(f != NULL, "run tools/make_kohya_hash_fixture.py");
    char line[512];
    int cases = 0;
    while (fgets(line, sizeof line, f)) {
        if (line[0] == '#') continue;
        char name[64], mh[80], lh[16];
        ck_assert(sscanf(line, "%63s %79s %15s", name, mh, lh) == 3);
        st_writer *w = st_writer_new();
        st_dtype dt = strncmp(name, "f16", 3) == 0 ? ST_F16 : ST_F32;
        if (strcmp(name, "f32_small") == 0) {
            add_fixture_tensor(w, "x.lora_down.weight", 4, 320, 5, dt);
        } else {
            add_fixture_tensor(w, "lora_unet_a.lora_down.weight", 4, 80000, 1, dt);
            add_fixture_tensor(w, "lora_unet_a.lora_up.weight", 80000, 4, 2, dt);
            add_fixture_tensor(w, "lora_unet_b.lora_down.weight", 4, 320, 3, dt);
        }
        if (strcmp(name, "f32_big_nometa") == 0) {
            ck_assert(st_writer_meta(w, "ss_v2", "False") == 0);
        } else {
            ck_assert(st_writer_meta(w, "ss_network_module", "networks.lora") == 0);
            ck_assert(st_writer_meta(w, "ss_network_dim", "4") == 0);
            ck_assert(st_writer_meta(w, "ss_tag_frequency", "{\"10_style\": {\"red\": 3, \"caf\\u00e9\": 1}}") == 0);
            ck_assert(st_writer_meta(w, "ss_comment", "quote \" backslash \\ tab \t newline \n caf\xc3\xa9 \xe2\x98\x83") == 0);
            ck_assert(st_writer_meta(w, "modelspec.title", "left out of the hash: not ss_") == 0);
            ck_assert(st_writer_meta(w, "sshs_model_hash", "left out too") == 0);
        }
        char got_m[65], got_l[9];
        ck_assert(st_writer_kohya_hashes(w, got_m, got_l) == 0);
        ck_assert_msg(strcmp(got_m, mh) == 0, "%s: model hash %s, kohya's %s", name, got_m, mh);
        ck_assert_msg(strcmp(got_l, lh) == 0, "%s: legacy hash %s, kohya's %s", name, got_l, lh);
        st_writer_free(w);
        cases++;
    }
    fclose(f);
    ck_assert_int_eq(cases, 4);
}
END_TEST

/* ---- caption processing ------------------------------------------------------------ */

/* split s at ", " into at most 16 parts (the joiner process_caption uses) */
static int split_tags(const char *s, char parts[16][64]) {
    int n = 0;
    for (;;) {
        const char *e = strstr(s, ", ");
        size_t l = e ? (size_t)(e - s) : strlen(s);
        ck_assert(n < 16 && l < 64);
        memcpy(parts[n], s, l); parts[n][l] = 0; n++;
        if (!e) return n;
        s = e + 2;
    }
}

static int cmp_tag(const void *a, const void *b) { return strcmp(a, b); }

/* out is tags in some order, with the first `keep` of them in place */
static void assert_shuffle_of(const char *out, const char *const *tags, int n, int keep) {
    char got[16][64], want[16][64];
    int m = split_tags(out, got);
    ck_assert_msg(m == n, "'%s': %d tags, expected %d", out, m, n);
    for (int i = 0; i < keep && i < n; i++) ck_assert_msg(strcmp(got[i], tags[i]) == 0, "'%s': tag %d moved", out, i);
    for (int i = 0; i < n; i++) snprintf(want[i], 64, "%s", tags[i]);
    qsort(got, (size_t)n, 64, cmp_tag);
    qsort(want, (size_t)n, 64, cmp_tag);
    for (int i = 0; i < n; i++) ck_assert_msg(strcmp(got[i], want[i]) == 0, "'%s' is not a shuffle of the tags", out);
}

START_TEST(test_shuffle_rules) {
    caption_opts o = {1, 1, 0, NULL};
    const char *t5[] = {"sdlstyle", "a red circle", "white background", "small", "left"};
    for (uint64_t s = 0; s < 50; s++) {
        char *c = caption_process("sdlstyle, a red circle,white background ,  small,left", &o, 42, s);
        assert_shuffle_of(c, t5, 5, 1);
        free(c);
    }
    /* kohya strips the caption and every tag, keeps empty tags, joins with ", " */
    const char *t3[] = {"a", "", "b"};
    o.keep_tokens = 0;
    for (uint64_t s = 0; s < 20; s++) {
        char *c = caption_process("  a ,, b  ", &o, 1, s);
        assert_shuffle_of(c, t3, 3, 0);
        free(c);
    }
    /* Python's str.strip(): tab, U+3000 ideographic and U+00A0 no-break spaces go too */
    const char *tu[] = {"tag", "b"};
    char *c = caption_process("\t\xe3\x80\x80tag\xc2\xa0,b ", &o, 3, 0);
    assert_shuffle_of(c, tu, 2, 0);
    free(c);
    /* but not a character that only looks like one (U+200B zero width space is not a space to Python) */
    c = caption_process("\xe2\x80\x8bx", &o, 3, 0);
    ck_assert_str_eq(c, "\xe2\x80\x8bx");
    free(c);
    /* one tag: stripped, nothing to move */
    c = caption_process("  a photo of sks dog \n", &o, 3, 9);
    ck_assert_str_eq(c, "a photo of sks dog");
    free(c);
    /* keep_tokens >= the number of tags: the order stays, re-joined */
    o.keep_tokens = 7;
    c = caption_process("a ,b,c", &o, 3, 9);
    ck_assert_str_eq(c, "a, b, c");
    free(c);
    /* keep 2 of 4: the last two swap or not, the first two never move */
    o.keep_tokens = 2;
    int swapped = 0;
    for (uint64_t s = 0; s < 200; s++) {
        c = caption_process("w, x, y, z", &o, 5, s);
        ck_assert_msg(strcmp(c, "w, x, y, z") == 0 || strcmp(c, "w, x, z, y") == 0, "%s", c);
        swapped += strcmp(c, "w, x, z, y") == 0;
        free(c);
    }
    ck_assert_msg(swapped > 60 && swapped < 140, "%d of 200 swapped", swapped);
}
END_TEST

/* kohya's keep_tokens_separator: "fixed ||| shuffled ||| fixed suffix" */
START_TEST(test_keep_tokens_separator) {
    caption_opts o = {1, 5, 0, "|||"};   /* keep_tokens is not used in this form */
    const char *t[] = {"trig", "style", "a", "b", "c", "end"};
    int moved = 0;
    for (uint64_t s = 0; s < 60; s++) {
        char *c = caption_process(" trig, style |||a, ,b, c|||  end, ", &o, 4, s);
        assert_shuffle_of(c, t, 6, 2);                     /* empty tags dropped */
        ck_assert_msg(strncmp(c + strlen(c) - 5, ", end", 5) == 0, "%s", c);
        moved += strcmp(c, "trig, style, a, b, c, end") != 0;
        free(c);
    }
    ck_assert_msg(moved > 30, "the middle part was shuffled in only %d of 60", moved);
    /* one separator: fixed part, then the rest shuffled */
    const char *t2[] = {"x", "a", "b"};
    char *c = caption_process("x ||| a, b", &o, 4, 1);
    assert_shuffle_of(c, t2, 3, 1);
    free(c);
    /* no separator in the caption: --keep-tokens as usual (5 >= 3 tags: the order stays) */
    c = caption_process("p ,q, r", &o, 4, 1);
    ck_assert_str_eq(c, "p, q, r");
    free(c);
    /* without --shuffle-caption the caption is used as it is, separator and all (kohya) */
    o.shuffle = 0;
    ck_assert(!caption_opts_active(&o));
    c = caption_process("x ||| a, b", &o, 4, 1);
    ck_assert_str_eq(c, "x ||| a, b");
    free(c);
}
END_TEST

/* every order of the shuffled tags comes out, about equally often */
START_TEST(test_shuffle_uniform) {
    caption_opts o = {1, 1, 0, NULL};
    const char *perm[6] = {"k, a, b, c", "k, a, c, b", "k, b, a, c", "k, b, c, a", "k, c, a, b", "k, c, b, a"};
    int count[6] = {0};
    int N = 6000;
    for (int s = 0; s < N; s++) {
        char *c = caption_process("k, a, b, c", &o, 11, (uint64_t)s);
        int k = 0;
        while (k < 6 && strcmp(c, perm[k]) != 0) k++;
        ck_assert_msg(k < 6, "not a permutation keeping 'k' first: %s", c);
        count[k]++;
        free(c);
    }
    /* 1000 expected each; binomial sd ~29: 6 sd either side */
    for (int k = 0; k < 6; k++) ck_assert_msg(count[k] > 820 && count[k] < 1180, "%s: %d of %d", perm[k], count[k], N);
}
END_TEST

/* the same (seed, sample) gives the same caption; other samples, others */
START_TEST(test_caption_deterministic) {
    caption_opts o = {1, 0, 0.3f, NULL};
    const char *cap = "a, b, c, d, e, f";
    int differ = 0;
    for (uint64_t s = 0; s < 64; s++) {
        char *x = caption_process(cap, &o, 42, s), *y = caption_process(cap, &o, 42, s);
        char *z = caption_process(cap, &o, 43, s);
        ck_assert_str_eq(x, y);
        differ += strcmp(x, z) != 0;
        free(x); free(y); free(z);
    }
    ck_assert_msg(differ > 32, "seed 43 gave the same caption as seed 42 in %d of 64 samples", 64 - differ);
}
END_TEST

START_TEST(test_caption_dropout) {
    caption_opts o = {0, 0, 0, NULL};
    ck_assert(!caption_opts_active(&o));
    o.keep_tokens = 3;                       /* --keep-tokens alone changes nothing (kohya) */
    ck_assert(!caption_opts_active(&o));
    char *c = caption_process("x, y", &o, 1, 1);
    ck_assert_str_eq(c, "x, y");
    free(c);
    o.dropout = 1.0f;
    for (uint64_t s = 0; s < 100; s++) { c = caption_process("x, y", &o, 1, s); ck_assert_str_eq(c, ""); free(c); }
    /* P = 0.25: the fraction dropped over 20000 samples (sd 0.003) */
    o.dropout = 0.25f; o.shuffle = 1;
    int dropped = 0, N = 20000;
    for (int s = 0; s < N; s++) {
        c = caption_process(" x ,y", &o, 9, (uint64_t)s);
        if (!c[0]) dropped++;
        else ck_assert_msg(strcmp(c, "x, y") == 0 || strcmp(c, "y, x") == 0, "%s", c);
        free(c);
    }
    ck_assert_msg(dropped > 0.235 * N && dropped < 0.265 * N, "%d of %d dropped at P = 0.25", dropped, N);
    /* dropout alone hands back the caption as it is (no strip, no re-join) */
    o.shuffle = 0; o.dropout = 0.5f;
    for (uint64_t s = 0; s < 20; s++) {
        c = caption_process(" x ,y", &o, 9, s);
        ck_assert_msg(!c[0] || strcmp(c, " x ,y") == 0, "%s", c);
        free(c);
    }
}
END_TEST

/* ---- metadata JSON ---------------------------------------------------------------- */

START_TEST(test_json_string) {
    char *b = NULL;
    size_t n = 0, cap = 0;
    /* json.dumps('quote " back \\ nl \n tab \t bell \x07 del \x7f café 東 😀') */
    ck_assert(caption_json_string(&b, &n, &cap, "quote \" back \\ nl \n tab \t bell \x07 del \x7f caf\xc3\xa9 \xe6\x9d\xb1 \xf0\x9f\x98\x80") == 0);
    ck_assert_str_eq(b, "\"quote \\\" back \\\\ nl \\n tab \\t bell \\u0007 del \\u007f caf\\u00e9 \\u6771 \\ud83d\\ude00\"");
    ck_assert_uint_eq(n, strlen(b));
    free(b);
}
END_TEST

START_TEST(test_dir_key) {
    char k[64];
    caption_dir_key(k, sizeof k, "data", "data/0001.png");
    ck_assert_str_eq(k, "data");
    caption_dir_key(k, sizeof k, "data/", "data/10_style/a/b.png");
    ck_assert_str_eq(k, "10_style");
    caption_dir_key(k, sizeof k, "/x/y//", "/x/y/2_dog/c.jpg");
    ck_assert_str_eq(k, "2_dog");
    caption_dir_key(k, sizeof k, "/x/y", "/x/y/c.jpg");
    ck_assert_str_eq(k, "y");
    caption_dir_key(k, sizeof k, "/", "/c.jpg");
    ck_assert_str_eq(k, "/");
}
END_TEST

START_TEST(test_tag_frequency_json) {
    /* kohya's set_tag_frequency and json.dumps on the same captions give
     * {"10_Style": {"red": 2, "blue": 1, "caf\u00e9": 1, "\u00fcber": 1, "x": 1}, "data": {"one": 2, "two": 1}} */
    char *path[] = {"data/10_Style/a.png", "data/10_Style/b.png", "data/10_Style/sub/c.png", "data/z.png"};
    char *capt[] = {"Red, blue , ,RED", "Caf\xc3\xa9, \xc3\x9c" "BER", "x", "one, two,one"};
    int rep[] = {10, 10, 10, 1};
    dataset_t ds = {0};
    ds.n_images = 4; ds.path = path; ds.caption = capt; ds.repeats = rep; ds.n_total_with_repeats = 31;
    char *j = caption_tag_frequency_json(&ds, "data");
    ck_assert_str_eq(j, "{\"10_Style\": {\"red\": 2, \"blue\": 1, \"caf\\u00e9\": 1, \"\\u00fcber\": 1, \"x\": 1}, "
                        "\"data\": {\"one\": 2, \"two\": 1}}");
    free(j);
    j = caption_dataset_dirs_json(&ds, "data");
    ck_assert_str_eq(j, "{\"10_Style\": {\"n_repeats\": 10, \"img_count\": 3}, \"data\": {\"n_repeats\": 1, \"img_count\": 1}}");
    free(j);
    /* Greek and Cyrillic capitals are lowered as Python lowers them */
    char *p2[] = {"d/a.png"};
    char *c2[] = {"\xce\x91\xce\x92\xce\x93, \xd0\x81\xd0\xb6"};   /* ΑΒΓ, Ёж -> αβγ, ёж */
    int r2[] = {1};
    dataset_t d2 = {0};
    d2.n_images = 1; d2.path = p2; d2.caption = c2; d2.repeats = r2; d2.n_total_with_repeats = 1;
    j = caption_tag_frequency_json(&d2, "d");
    ck_assert_str_eq(j, "{\"d\": {\"\\u03b1\\u03b2\\u03b3\": 1, \"\\u0451\\u0436\": 1}}");
    free(j);
}
END_TEST

static Suite *caption_suite(void) {
    Suite *s = suite_create("caption");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_sha256_vectors);
    tcase_add_test(tc, test_kohya_hashes_fixture);
    tcase_add_test(tc, test_shuffle_rules);
    tcase_add_test(tc, test_shuffle_uniform);
    tcase_add_test(tc, test_keep_tokens_separator);
    tcase_add_test(tc, test_caption_deterministic);
    tcase_add_test(tc, test_caption_dropout);
    tcase_add_test(tc, test_json_string);
    tcase_add_test(tc, test_dir_key);
    tcase_add_test(tc, test_tag_frequency_json);
    suite_add_tcase(s, tc);
    return s;
}

CHECK_MAIN(caption_suite)

/* test_dataset.c: dataset_scan on folder trees built under /tmp, one layout
 * per test (kohya .txt / .caption, captions.csv in its variants, N_name
 * repeat folders, bad input), and dataset_epoch_order's permutation. The
 * expected captions are the text each test writes, never the program's own
 * output. */
#include "testutil.h"
#include "dataset.h"

#include <dirent.h>
#include <errno.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- temporary trees ------------------------------------------------------- */

static void make_tmp(char *root, size_t n) {
    snprintf(root, n, "/tmp/sdlora_ds_XXXXXX");
    ck_assert_msg(mkdtemp(root) != NULL, "mkdtemp: %s", strerror(errno));
}

/* write root/rel (len bytes, or strlen when len < 0), creating folders */
static void put(const char *root, const char *rel, const char *data, long len) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", root, rel);
    for (char *p = path + strlen(root) + 1; *p; p++)
        if (*p == '/') { *p = 0; mkdir(path, 0755); *p = '/'; }
    FILE *f = fopen(path, "wb");
    ck_assert_msg(f != NULL, "%s: %s", path, strerror(errno));
    size_t n = len < 0 ? strlen(data) : (size_t)len;
    ck_assert(fwrite(data, 1, n, f) == n);
    fclose(f);
}

static void rm_rf(const char *path) {
    struct stat st;
    if (lstat(path, &st) != 0) return;
    if (S_ISDIR(st.st_mode)) {
        chmod(path, 0755);
        DIR *d = opendir(path);
        if (d) {
            struct dirent *e;
            while ((e = readdir(d)) != NULL) {
                if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
                char sub[1024];
                snprintf(sub, sizeof sub, "%s/%s", path, e->d_name);
                rm_rf(sub);
            }
            closedir(d);
        }
        rmdir(path);
    } else {
        unlink(path);
    }
}

/* index of the image ROOT/rel in ds, or -1 */
static int find(const dataset_t *ds, const char *root, const char *rel) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", root, rel);
    for (int i = 0; i < ds->n_images; i++)
        if (strcmp(ds->path[i], path) == 0) return i;
    return -1;
}

static void expect_caption(const dataset_t *ds, const char *root, const char *rel, const char *cap) {
    int i = find(ds, root, rel);
    ck_assert_msg(i >= 0, "%s not in the dataset", rel);
    ck_assert_msg(strcmp(ds->caption[i], cap) == 0, "%s: caption [%s], expected [%s]", rel, ds->caption[i], cap);
}

static int scan_ok(dataset_t *ds, const char *root) {
    char err[512];
    int rc = dataset_scan(ds, root, err, sizeof err);
    ck_assert_msg(rc == 0, "scan failed: %s", err);
    ck_assert(ds->warnings != NULL);
    return rc;
}

static int has(const char *hay, const char *needle) { return hay && strstr(hay, needle) != NULL; }

/* ---- layouts ------------------------------------------------------------------- */

START_TEST(flat_txt) {
    char root[64]; make_tmp(root, sizeof root);
    put(root, "a.png", "img", -1);
    put(root, "a.txt", "a cat on a mat\n", -1);
    put(root, "b.jpg", "img", -1);
    put(root, "b.txt", "  \t a dog, sitting  \r\n", -1);
    put(root, "c.jpeg", "img", -1);
    put(root, "c.txt", "\xEF\xBB\xBF" "caf\xC3\xA9 \xE7\x8C\xAB", -1);   /* BOM, UTF-8, no newline */
    put(root, "notes.md", "not an image", -1);
    dataset_t ds = {0};
    scan_ok(&ds, root);
    ck_assert_int_eq(ds.n_images, 3);
    ck_assert_int_eq(ds.n_uncaptioned, 0);
    ck_assert_int_eq(ds.n_empty_caption, 0);
    ck_assert_int_eq(ds.n_total_with_repeats, 3);
    expect_caption(&ds, root, "a.png", "a cat on a mat");
    expect_caption(&ds, root, "b.jpg", "a dog, sitting");
    expect_caption(&ds, root, "c.jpeg", "caf\xC3\xA9 \xE7\x8C\xAB");
    for (int i = 0; i < 3; i++) ck_assert_int_eq(ds.repeats[i], 1);
    ck_assert_msg(ds.warnings[0] == 0, "unexpected warnings: %s", ds.warnings);
    dataset_free(&ds);
    /* a trailing '/' on DIR gives the same paths */
    char slash[80]; snprintf(slash, sizeof slash, "%s/", root);
    scan_ok(&ds, slash);
    ck_assert_int_eq(ds.n_images, 3);
    ck_assert(find(&ds, root, "a.png") >= 0);
    dataset_free(&ds);
    rm_rf(root);
}
END_TEST

/* .caption, and .txt before .caption; only the first line (kohya's lines[0].strip()) */
START_TEST(caption_ext_and_first_line) {
    char root[64]; make_tmp(root, sizeof root);
    put(root, "a.png", "img", -1);
    put(root, "a.caption", "from caption\n", -1);
    put(root, "b.png", "img", -1);
    put(root, "b.txt", "from txt", -1);
    put(root, "b.caption", "from caption", -1);
    put(root, "c.png", "img", -1);
    put(root, "c.txt", "first line\r\nsecond line\n", -1);
    put(root, "d.png", "img", -1);
    put(root, "d.txt", "old mac\rline two", -1);                 /* CR alone ends a line too */
    put(root, "e.png", "img", -1);
    put(root, "e.txt", "only line\n\n  \n", -1);                 /* blank tail: no warning */
    dataset_t ds = {0};
    scan_ok(&ds, root);
    ck_assert_int_eq(ds.n_images, 5);
    expect_caption(&ds, root, "a.png", "from caption");
    expect_caption(&ds, root, "b.png", "from txt");
    expect_caption(&ds, root, "c.png", "first line");
    expect_caption(&ds, root, "d.png", "old mac");
    expect_caption(&ds, root, "e.png", "only line");
    ck_assert_msg(has(ds.warnings, "2 caption files have more than one line"), "%s", ds.warnings);
    ck_assert(has(ds.warnings, "c.txt") && has(ds.warnings, "d.txt") && !has(ds.warnings, "e.txt"));
    dataset_free(&ds);
    rm_rf(root);
}
END_TEST

/* caption_ext (--caption-ext): only NAME + that extension, as kohya's
 * --caption_extension; an image with only the other kind is uncaptioned and
 * the warning names the flag that would read it */
START_TEST(caption_ext_only) {
    char root[64]; make_tmp(root, sizeof root);
    put(root, "a.png", "img", -1);
    put(root, "a.caption", "a from caption\n", -1);
    put(root, "b.png", "img", -1);
    put(root, "b.txt", "b from txt", -1);
    put(root, "b.caption", "b from caption", -1);
    put(root, "c.png", "img", -1);
    put(root, "c.txt", "c from txt", -1);
    put(root, "d.png", "img", -1);
    put(root, "d.tags", "d from tags", -1);
    dataset_t ds = {0};
    ds.caption_ext = ".caption";
    scan_ok(&ds, root);
    ck_assert_int_eq(ds.n_images, 4);
    ck_assert_int_eq(ds.n_uncaptioned, 2);
    expect_caption(&ds, root, "a.png", "a from caption");
    expect_caption(&ds, root, "b.png", "b from caption");
    expect_caption(&ds, root, "c.png", "");
    expect_caption(&ds, root, "d.png", "");
    ck_assert_msg(has(ds.warnings, "2 images have no caption (no .caption or captions.csv row)"), "%s", ds.warnings);
    ck_assert_msg(has(ds.warnings, "1 of them has a .txt file beside it, which --caption-ext .caption does not read (use --caption-ext .txt)"),
                  "%s", ds.warnings);
    dataset_free(&ds);
    ck_assert_str_eq(ds.caption_ext, ".caption");   /* an input: kept by dataset_free */
    ds.caption_ext = ".txt";
    scan_ok(&ds, root);
    expect_caption(&ds, root, "a.png", "");
    expect_caption(&ds, root, "b.png", "b from txt");
    expect_caption(&ds, root, "c.png", "c from txt");
    ck_assert_msg(has(ds.warnings, "1 of them has a .caption file beside it, which --caption-ext .txt does not read (use --caption-ext .caption)"),
                  "%s", ds.warnings);
    dataset_free(&ds);
    ds.caption_ext = ".tags";
    scan_ok(&ds, root);
    ck_assert_int_eq(ds.n_uncaptioned, 3);
    expect_caption(&ds, root, "d.png", "d from tags");
    ck_assert_msg(has(ds.warnings, "2 of them have a .txt file beside it") && has(ds.warnings, "2 of them have a .caption file beside it"), "%s", ds.warnings);
    dataset_free(&ds);
    rm_rf(root);
}
END_TEST

START_TEST(csv_with_header_quotes_crlf_bom) {
    char root[64]; make_tmp(root, sizeof root);
    put(root, "a.png", "img", -1);
    put(root, "b.png", "img", -1);
    put(root, "c.png", "img", -1);
    put(root, "d.png", "img", -1);
    put(root, "sub/e.jpg", "img", -1);
    put(root, "sub/deeper/f.png", "img", -1);
    put(root, "g.png", "img", -1);
    const char csv[] =
        "\xEF\xBB\xBF" "file,caption\r\n"
        "a.png,plain caption\r\n"
        "b.png,\"with, a comma\"\r\n"
        "\r\n"
        "c.png,\"a \"\"quoted\"\" word\"\r\n"
        "\"d.png\",\"two\r\nlines\"\r\n"
        "./sub/e.jpg,  in a subfolder  \r\n"
        "sub\\deeper\\f.png,backslashes\r\n"
        "g.png,unquoted, extra, commas";                          /* no final newline */
    put(root, "captions.csv", csv, -1);
    dataset_t ds = {0};
    scan_ok(&ds, root);
    ck_assert_int_eq(ds.n_images, 7);
    ck_assert_int_eq(ds.n_uncaptioned, 0);
    expect_caption(&ds, root, "a.png", "plain caption");
    expect_caption(&ds, root, "b.png", "with, a comma");
    expect_caption(&ds, root, "c.png", "a \"quoted\" word");
    expect_caption(&ds, root, "d.png", "two lines");
    expect_caption(&ds, root, "sub/e.jpg", "in a subfolder");
    expect_caption(&ds, root, "sub/deeper/f.png", "backslashes");
    expect_caption(&ds, root, "g.png", "unquoted, extra, commas");
    ck_assert_msg(ds.warnings[0] == 0, "unexpected warnings: %s", ds.warnings);
    dataset_free(&ds);
    rm_rf(root);
}
END_TEST

START_TEST(csv_without_header_and_other_header_names) {
    char root[64]; make_tmp(root, sizeof root);
    put(root, "a.png", "img", -1);
    put(root, "b.png", "img", -1);
    put(root, "captions.csv", "a.png,first row is data\nb.png,second\n", -1);
    put(root, "s/c.png", "img", -1);
    put(root, "s/captions.csv", "image,text\nc.png,header was image,text\n", -1);
    put(root, "t/d.png", "img", -1);
    put(root, "t/captions.csv", "Picture,Prompt\nd.png,unknown header words\n", -1);
    dataset_t ds = {0};
    scan_ok(&ds, root);
    ck_assert_int_eq(ds.n_images, 4);
    ck_assert_msg(ds.warnings[0] == 0, "unexpected warnings: %s", ds.warnings);
    expect_caption(&ds, root, "a.png", "first row is data");
    expect_caption(&ds, root, "b.png", "second");
    expect_caption(&ds, root, "s/c.png", "header was image,text");
    expect_caption(&ds, root, "t/d.png", "unknown header words");
    dataset_free(&ds);
    /* a first row naming a missing image is a data row (warned), not a header */
    put(root, "u/e.png", "img", -1);
    put(root, "u/captions.csv", "gone.png,was deleted\ne.png,second row\n", -1);
    scan_ok(&ds, root);
    expect_caption(&ds, root, "u/e.png", "second row");
    ck_assert_msg(has(ds.warnings, "u/captions.csv:1 gone.png"), "%s", ds.warnings);
    dataset_free(&ds);
    rm_rf(root);
}
END_TEST

/* the closest captions.csv wins; a parent CSV reaches into subfolders;
 * a .txt beats any CSV row (and the warning says so) */
START_TEST(csv_precedence) {
    char root[64]; make_tmp(root, sizeof root);
    put(root, "sub/x.png", "img", -1);
    put(root, "sub/y.png", "img", -1);
    put(root, "sub/z.png", "img", -1);
    put(root, "w.png", "img", -1);
    put(root, "captions.csv", "file,caption\nsub/x.png,from root csv\nsub/y.png,root y\nw.png,root w\n", -1);
    put(root, "sub/captions.csv", "x.png,from sub csv\nz.png,sub z\n../w.png,sub reaches up\n", -1);
    put(root, "sub/z.txt", "from txt", -1);
    dataset_t ds = {0};
    scan_ok(&ds, root);
    ck_assert_int_eq(ds.n_images, 4);
    expect_caption(&ds, root, "sub/x.png", "from sub csv");     /* closest CSV */
    expect_caption(&ds, root, "sub/y.png", "root y");           /* only the parent lists it */
    expect_caption(&ds, root, "sub/z.png", "from txt");         /* .txt beats CSV */
    expect_caption(&ds, root, "w.png", "root w");               /* root CSV is closer to w.png */
    ck_assert_msg(has(ds.warnings, "both a caption file and a captions.csv row") &&
                  has(ds.warnings, "sub/z.png"), "%s", ds.warnings);
    dataset_free(&ds);
    rm_rf(root);
}
END_TEST

/* kohya's N_name folders; the class-token caption for uncaptioned images */
START_TEST(repeat_folders) {
    char root[64]; make_tmp(root, sizeof root);
    put(root, "10_style/a.png", "img", -1);
    put(root, "10_style/a.txt", "style a", -1);
    put(root, "10_style/deep/b.png", "img", -1);                 /* inherits 10 */
    put(root, "10_style/deep/b.txt", "style b", -1);
    put(root, "10_style/u.png", "img", -1);                      /* uncaptioned */
    put(root, "3_my_other/c.png", "img", -1);
    put(root, "3_my_other/c.txt", "other c", -1);
    put(root, "3_my_other/v.png", "img", -1);                    /* uncaptioned */
    put(root, "plain/d.png", "img", -1);
    put(root, "plain/d.txt", "plain d", -1);
    put(root, "plain/5_inner/e.png", "img", -1);                 /* not first level: 1 */
    put(root, "plain/5_inner/e.txt", "inner e", -1);
    put(root, "abc_x/f.png", "img", -1);
    put(root, "abc_x/f.txt", "abc f", -1);
    put(root, "2023/g.png", "img", -1);                          /* no '_': not a repeat folder */
    put(root, "2023/g.txt", "year g", -1);
    put(root, "0_skip/h.png", "img", -1);
    put(root, "0_skip/h.txt", "skipped", -1);
    put(root, "root.png", "img", -1);
    put(root, "root.txt", "root", -1);
    dataset_t ds = {0};
    scan_ok(&ds, root);
    ck_assert_int_eq(ds.n_images, 10);
    struct { const char *rel; int rep; } want[] = {
        {"10_style/a.png", 10}, {"10_style/deep/b.png", 10}, {"10_style/u.png", 10},
        {"3_my_other/c.png", 3}, {"3_my_other/v.png", 3}, {"plain/d.png", 1},
        {"plain/5_inner/e.png", 1}, {"abc_x/f.png", 1}, {"2023/g.png", 1}, {"root.png", 1} };
    int total = 0;
    for (size_t k = 0; k < sizeof want / sizeof want[0]; k++) {
        int i = find(&ds, root, want[k].rel);
        ck_assert_msg(i >= 0, "%s missing", want[k].rel);
        ck_assert_msg(ds.repeats[i] == want[k].rep, "%s: %d repeats, expected %d", want[k].rel, ds.repeats[i], want[k].rep);
        total += want[k].rep;
    }
    ck_assert_int_eq(find(&ds, root, "0_skip/h.png"), -1);
    ck_assert_int_eq(ds.n_total_with_repeats, total);
    ck_assert_int_eq(ds.n_uncaptioned, 2);
    /* kohya: an uncaptioned image in N_name gets "name" (class_tokens) */
    expect_caption(&ds, root, "10_style/u.png", "style");
    expect_caption(&ds, root, "3_my_other/v.png", "my_other");
    expect_caption(&ds, root, "plain/5_inner/e.png", "inner e");
    ck_assert_msg(has(ds.warnings, "0_skip: 0 repeats"), "%s", ds.warnings);
    ck_assert(has(ds.warnings, "2 images have no caption"));
    dataset_free(&ds);

    ds.uncaptioned = DATASET_UNCAPTIONED_EMPTY;
    scan_ok(&ds, root);
    ck_assert_int_eq(ds.n_images, 10);
    expect_caption(&ds, root, "10_style/u.png", "");
    ck_assert(has(ds.warnings, "empty caption"));
    dataset_free(&ds);
    ck_assert_int_eq(ds.uncaptioned, DATASET_UNCAPTIONED_EMPTY);   /* free keeps the policy */

    ds.uncaptioned = DATASET_UNCAPTIONED_DROP;
    scan_ok(&ds, root);
    ck_assert_int_eq(ds.n_images, 8);
    ck_assert_int_eq(ds.n_uncaptioned, 2);
    ck_assert_int_eq(find(&ds, root, "10_style/u.png"), -1);
    ck_assert_int_eq(ds.n_total_with_repeats, total - 10 - 3);
    ck_assert(has(ds.warnings, "left out"));
    dataset_free(&ds);
    rm_rf(root);
}
END_TEST

START_TEST(repeat_count_too_large) {
    char root[64]; make_tmp(root, sizeof root);
    put(root, "99999999999999999999_x/a.png", "img", -1);
    dataset_t ds = {0};
    char err[512];
    ck_assert_int_eq(dataset_scan(&ds, root, err, sizeof err), -1);
    ck_assert_msg(has(err, "99999999999999999999_x") && has(err, "repeat count"), "%s", err);
    ck_assert_int_eq(ds.n_images, 0);
    rm_rf(root);
}
END_TEST

START_TEST(nested_uppercase_hidden_unsupported) {
    char root[64]; make_tmp(root, sizeof root);
    put(root, "a/b/c/d/deep.png", "img", -1);
    put(root, "a/b/c/d/deep.txt", "deep", -1);
    put(root, "UP.PNG", "img", -1);
    put(root, "UP.txt", "upper png", -1);
    put(root, "mix.JpEg", "img", -1);
    put(root, "mix.txt", "mixed jpeg", -1);
    put(root, "cam.JPG", "img", -1);
    put(root, "cam.txt", "camera", -1);
    put(root, ".hidden.png", "img", -1);
    put(root, ".git/x.png", "img", -1);
    put(root, "a/.thumbs/y.png", "img", -1);
    put(root, "w.webp", "img", -1);
    put(root, "g.gif", "img", -1);
    put(root, "a/t.TIFF", "img", -1);
    put(root, "bm.BMP", "img", -1);
    dataset_t ds = {0};
    scan_ok(&ds, root);
    ck_assert_int_eq(ds.n_images, 4);
    expect_caption(&ds, root, "a/b/c/d/deep.png", "deep");
    expect_caption(&ds, root, "UP.PNG", "upper png");
    expect_caption(&ds, root, "mix.JpEg", "mixed jpeg");
    expect_caption(&ds, root, "cam.JPG", "camera");
    ck_assert_msg(has(ds.warnings, "4 images are skipped because the format is not supported") &&
                  has(ds.warnings, "w.webp") && has(ds.warnings, "g.gif") && has(ds.warnings, "a/t.TIFF") &&
                  has(ds.warnings, "bm.BMP") && has(ds.warnings, "convert them to PNG or JPEG"), "%s", ds.warnings);
    ck_assert(!has(ds.warnings, "hidden") && !has(ds.warnings, "x.png"));
    dataset_free(&ds);
    rm_rf(root);
}
END_TEST

START_TEST(uncaptioned_named_and_counted) {
    char root[64]; make_tmp(root, sizeof root);
    char rel[64];
    for (int i = 0; i < 13; i++) { snprintf(rel, sizeof rel, "u%02d.png", i); put(root, rel, "img", -1); }
    put(root, "ok.png", "img", -1);
    put(root, "ok.txt", "fine", -1);
    dataset_t ds = {0};
    scan_ok(&ds, root);
    ck_assert_int_eq(ds.n_images, 14);
    ck_assert_int_eq(ds.n_uncaptioned, 13);
    expect_caption(&ds, root, "u00.png", "");
    ck_assert_msg(has(ds.warnings, "13 images have no caption"), "%s", ds.warnings);
    ck_assert(has(ds.warnings, "u00.png") && has(ds.warnings, "u09.png"));
    ck_assert(!has(ds.warnings, "u10.png") && has(ds.warnings, "and 3 more"));
    ck_assert(!has(ds.warnings, "ok.png"));
    dataset_free(&ds);
    rm_rf(root);
}
END_TEST

START_TEST(empty_caption) {
    char root[64]; make_tmp(root, sizeof root);
    put(root, "a.png", "img", -1);
    put(root, "a.txt", "", 0);
    put(root, "b.png", "img", -1);
    put(root, "b.txt", "   \n", -1);
    put(root, "c.png", "img", -1);
    put(root, "captions.csv", "c.png,\n", -1);
    put(root, "d.png", "img", -1);
    put(root, "d.txt", "not empty", -1);
    dataset_t ds = {0};
    scan_ok(&ds, root);
    ck_assert_int_eq(ds.n_images, 4);
    ck_assert_int_eq(ds.n_empty_caption, 3);
    ck_assert_int_eq(ds.n_uncaptioned, 0);
    expect_caption(&ds, root, "a.png", "");
    expect_caption(&ds, root, "b.png", "");
    expect_caption(&ds, root, "c.png", "");
    ck_assert_msg(has(ds.warnings, "3 images have an empty caption: a.png, b.png, c.png"), "%s", ds.warnings);
    dataset_free(&ds);
    rm_rf(root);
}
END_TEST

START_TEST(non_utf8_caption_is_an_error) {
    const char *bad[] = { "caf\xE9",                  /* Latin-1 */
                          "\xFF\xFE" "a\0b\0",        /* UTF-16 LE with BOM */
                          "a\0b",                     /* NUL */
                          "\xC0\xAF",                 /* overlong '/' */
                          "\xED\xA0\x80",             /* surrogate */
                          "ok \xE2\x82" };            /* truncated sequence */
    const long len[] = { -1, 6, 3, -1, -1, -1 };
    for (int t = 0; t < 6; t++) {
        char root[64]; make_tmp(root, sizeof root);
        put(root, "a.png", "img", -1);
        put(root, "a.txt", bad[t], len[t]);
        dataset_t ds = {0};
        char err[512];
        ck_assert_int_eq(dataset_scan(&ds, root, err, sizeof err), -1);
        ck_assert_msg(has(err, "a.txt") && has(err, "UTF-8") && has(err, "re-save it as UTF-8") &&
                      !strchr(err, '\n'), "case %d: %s", t, err);
        ck_assert(ds.n_images == 0 && ds.path == NULL && ds.warnings == NULL);
        rm_rf(root);
    }
    /* the same in captions.csv */
    char root[64]; make_tmp(root, sizeof root);
    put(root, "a.png", "img", -1);
    put(root, "captions.csv", "a.png,na\xEFve\n", -1);
    dataset_t ds = {0};
    char err[512];
    ck_assert_int_eq(dataset_scan(&ds, root, err, sizeof err), -1);
    ck_assert_msg(has(err, "captions.csv") && has(err, "not UTF-8"), "%s", err);
    rm_rf(root);
}
END_TEST

START_TEST(csv_problems) {
    char root[64]; make_tmp(root, sizeof root);
    put(root, "a.png", "img", -1);
    put(root, "b.png", "img", -1);
    put(root, "c.webp", "img", -1);
    put(root, "captions.csv",
        "file,caption\n"
        "a.png,first\n"
        "ghost.png,no such file\n"
        "a.png,listed again\n"
        "c.webp,exists but unsupported\n"
        "../../outside.png,outside\n"
        "b.png\n", -1);
    dataset_t ds = {0};
    scan_ok(&ds, root);
    ck_assert_int_eq(ds.n_images, 2);
    expect_caption(&ds, root, "a.png", "first");
    expect_caption(&ds, root, "b.png", "");
    ck_assert_msg(has(ds.warnings, "captions.csv names 2 files that do not exist") &&
                  has(ds.warnings, "captions.csv:3 ghost.png") && has(ds.warnings, "outside.png"), "%s", ds.warnings);
    ck_assert_msg(has(ds.warnings, "captions.csv lists 1 file twice") && has(ds.warnings, "captions.csv:4 a.png"), "%s", ds.warnings);
    ck_assert_msg(has(ds.warnings, ":7: b.png has no caption column"), "%s", ds.warnings);
    ck_assert(!has(ds.warnings, "exists but unsupported") && !has(ds.warnings, "captions.csv:5"));
    dataset_free(&ds);

    /* a quote never closed: an error naming the line where it opened */
    put(root, "captions.csv", "a.png,ok\nb.png,\"never closed\nmore text\n", -1);
    char err[512];
    ck_assert_int_eq(dataset_scan(&ds, root, err, sizeof err), -1);
    ck_assert_msg(has(err, "captions.csv:2") && has(err, "never closed"), "%s", err);
    rm_rf(root);
}
END_TEST

/* every truncation and some corruptions of a CSV and a caption: an answer
 * (0 or -1 with a message), never a crash; run under ASan/UBSan */
START_TEST(truncated_and_corrupt_input) {
    const char csv[] = "\xEF\xBB\xBF" "file,caption\r\n\"a.png\",\"x, \"\"y\"\"\r\nz\"\r\nsub/b.png,\xE7\x8C\xAB\r\n";
    char root[64]; make_tmp(root, sizeof root);
    put(root, "a.png", "img", -1);
    put(root, "sub/b.png", "img", -1);
    int n = (int)strlen(csv), ok = 0, failed = 0;
    rng_t r; rng_seed(&r, 7);
    for (int t = 0; t < 2 * n; t++) {
        char buf[128];
        memcpy(buf, csv, (size_t)n);
        int len = n;
        if (t < n) len = t;                                         /* truncate */
        else buf[rng_u64(&r) % (uint64_t)n] = (char)(rng_u64(&r) & 0xFF);   /* corrupt a byte */
        put(root, "captions.csv", buf, len);
        put(root, "sub/b.txt", buf, len / 3);
        dataset_t ds = {0};
        char err[256];
        int rc = dataset_scan(&ds, root, err, sizeof err);
        if (rc == 0) { ok++; ck_assert(ds.n_images == 2 && ds.warnings); dataset_free(&ds); }
        else { failed++; ck_assert(err[0] && !strchr(err, '\n')); }
    }
    ck_assert(ok > 0 && failed > 0);
    rm_rf(root);
}
END_TEST

START_TEST(folder_errors) {
    dataset_t ds = {0};
    char err[512];
    char root[64]; make_tmp(root, sizeof root);
    /* empty folder */
    ck_assert_int_eq(dataset_scan(&ds, root, err, sizeof err), -1);
    ck_assert_msg(has(err, root) && has(err, "no PNG or JPEG images") &&
                  has(err, "with a .txt caption beside each"), "%s", err);
    /* only captions and an unsupported format */
    put(root, "a.txt", "caption", -1);
    put(root, "a.webp", "img", -1);
    ck_assert_int_eq(dataset_scan(&ds, root, err, sizeof err), -1);
    ck_assert_msg(has(err, "no PNG or JPEG images") && has(err, "convert them to PNG or JPEG"), "%s", err);
    /* not a folder */
    char file[128]; snprintf(file, sizeof file, "%s/a.txt", root);
    ck_assert_int_eq(dataset_scan(&ds, file, err, sizeof err), -1);
    ck_assert_msg(has(err, file) && has(err, "not a folder"), "%s", err);
    /* missing */
    char gone[128]; snprintf(gone, sizeof gone, "%s/nope", root);
    ck_assert_int_eq(dataset_scan(&ds, gone, err, sizeof err), -1);
    ck_assert_msg(has(err, gone) && has(err, "no such folder"), "%s", err);
    /* bad policy */
    ds.uncaptioned = 7;
    ck_assert_int_eq(dataset_scan(&ds, root, err, sizeof err), -1);
    ds.uncaptioned = 0;
    /* unreadable subfolder (root can read anything: skip then) */
    if (geteuid() != 0) {
        put(root, "ok.png", "img", -1);
        put(root, "locked/x.png", "img", -1);
        char locked[128]; snprintf(locked, sizeof locked, "%s/locked", root);
        chmod(locked, 0);
        ck_assert_int_eq(dataset_scan(&ds, root, err, sizeof err), -1);
        ck_assert_msg(has(err, "locked") && has(err, "cannot read the folder"), "%s", err);
        chmod(locked, 0755);
    }
    rm_rf(root);
}
END_TEST

START_TEST(symlink_loop_terminates) {
    char root[64]; make_tmp(root, sizeof root);
    put(root, "sub/a.png", "img", -1);
    put(root, "sub/a.txt", "a", -1);
    char link[128]; snprintf(link, sizeof link, "%s/sub/loop", root);
    ck_assert(symlink("..", link) == 0);
    char dangling[128]; snprintf(dangling, sizeof dangling, "%s/broken.png", root);
    ck_assert(symlink("nowhere.png", dangling) == 0);
    dataset_t ds = {0};
    scan_ok(&ds, root);
    ck_assert_int_eq(ds.n_images, 1);
    ck_assert_msg(has(ds.warnings, "sub/loop: links back") && has(ds.warnings, "broken.png"), "%s", ds.warnings);
    dataset_free(&ds);
    rm_rf(root);
}
END_TEST

/* byte-wise path order, whatever order the files were created in */
START_TEST(deterministic_order) {
    const char *names[] = { "b.png", "a/x.png", "a.png", "B.png", "a/b/c.png", "10_s/z.png",
                            "2_s/y.png", "a-b.png", "A/q.png", "\xC3\xA9.png" };
    const int n = 10;
    /* expected: sorted with strcmp, written out by hand */
    const char *want[] = { "10_s/z.png", "2_s/y.png", "A/q.png", "B.png", "a-b.png", "a.png",
                           "a/b/c.png", "a/x.png", "b.png", "\xC3\xA9.png" };
    char r1[64], r2[64];
    make_tmp(r1, sizeof r1); make_tmp(r2, sizeof r2);
    for (int i = 0; i < n; i++) put(r1, names[i], "img", -1);
    for (int i = n - 1; i >= 0; i--) put(r2, names[(i * 7) % n], "img", -1);
    dataset_t d1 = {0}, d2 = {0};
    scan_ok(&d1, r1); scan_ok(&d2, r2);
    ck_assert_int_eq(d1.n_images, n);
    ck_assert_int_eq(d2.n_images, n);
    for (int i = 0; i < n; i++) {
        ck_assert_str_eq(d1.path[i] + strlen(r1) + 1, want[i]);
        ck_assert_str_eq(d2.path[i] + strlen(r2) + 1, want[i]);
    }
    dataset_free(&d1); dataset_free(&d2);
    rm_rf(r1); rm_rf(r2);
}
END_TEST

/* ---- epoch order -------------------------------------------------------------- */

START_TEST(epoch_order) {
    dataset_t ds = {0};
    int rep[] = { 1, 3, 10, 1, 2 };
    ds.n_images = 5;
    ds.repeats = rep;
    ds.n_total_with_repeats = 17;
    int a[17], b[17], c[17], d[17];
    dataset_epoch_order(&ds, 42, 0, a);
    dataset_epoch_order(&ds, 42, 0, b);
    dataset_epoch_order(&ds, 42, 1, c);
    dataset_epoch_order(&ds, 43, 0, d);
    int count[5] = {0};
    for (int i = 0; i < 17; i++) { ck_assert(a[i] >= 0 && a[i] < 5); count[a[i]]++; }
    for (int k = 0; k < 5; k++) ck_assert_int_eq(count[k], rep[k]);
    ck_assert(memcmp(a, b, sizeof a) == 0);                     /* reproducible */
    ck_assert(memcmp(a, c, sizeof a) != 0);                     /* a new epoch, a new order */
    ck_assert(memcmp(a, d, sizeof a) != 0);                     /* a new seed, a new order */
    int sorted = 1;
    for (int i = 1; i < 17; i++) sorted &= a[i - 1] <= a[i];
    ck_assert(!sorted);                                         /* it is shuffled at all */

    /* uniformity: over many epochs each image lands at position 0 with
     * probability repeats / total; 17000 draws, 5-sigma bounds */
    int first[5] = {0};
    const int E = 17000;
    for (int e = 0; e < E; e++) { dataset_epoch_order(&ds, 5, e, c); first[c[0]]++; }
    for (int k = 0; k < 5; k++) {
        double p = rep[k] / 17.0, mean = E * p, sd = sqrt(E * p * (1 - p));
        ck_assert_msg(fabs(first[k] - mean) < 5 * sd, "image %d first %d times, expected %.0f +- %.0f",
                      k, first[k], mean, sd);
    }
}
END_TEST

static Suite *dataset_suite(void) {
    Suite *s = suite_create("dataset");
    TCase *tc = tcase_create("scan");
    tcase_add_test(tc, flat_txt);
    tcase_add_test(tc, caption_ext_and_first_line);
    tcase_add_test(tc, caption_ext_only);
    tcase_add_test(tc, csv_with_header_quotes_crlf_bom);
    tcase_add_test(tc, csv_without_header_and_other_header_names);
    tcase_add_test(tc, csv_precedence);
    tcase_add_test(tc, repeat_folders);
    tcase_add_test(tc, repeat_count_too_large);
    tcase_add_test(tc, nested_uppercase_hidden_unsupported);
    tcase_add_test(tc, uncaptioned_named_and_counted);
    tcase_add_test(tc, empty_caption);
    tcase_add_test(tc, non_utf8_caption_is_an_error);
    tcase_add_test(tc, csv_problems);
    tcase_add_test(tc, truncated_and_corrupt_input);
    tcase_add_test(tc, folder_errors);
    tcase_add_test(tc, symlink_loop_terminates);
    tcase_add_test(tc, deterministic_order);
    tcase_add_test(tc, epoch_order);
    suite_add_tcase(s, tc);
    return s;
}

CHECK_MAIN(dataset_suite)

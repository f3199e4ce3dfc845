/* fuzz_captions.c: a captions.csv (dataset_scan). The input is the CSV of a
 * folder that also holds a.png, b.jpg, c.png with c.txt, sub/d.png and a
 * 3_style/e.jpg (empty files: the scanner lists images, it does not decode
 * them); the CSV's rows name them (or not) in every way the fuzzer finds. */
#include "fuzz_util.h"
#include "dataset.h"

static char root[1100];

static void setup(void) {
    if (root[0]) return;
    snprintf(root, sizeof root, "%s", fuzz_path(0, "ds"));
    mkdir(root, 0700);
    char p[1300];
    static const char *dirs[] = {"sub", "3_style"};
    for (int i = 0; i < 2; i++) { snprintf(p, sizeof p, "%s/%s", root, dirs[i]); mkdir(p, 0700); }
    static const char *files[] = {"a.png", "b.jpg", "c.png", "sub/d.png", "3_style/e.jpg"};
    for (int i = 0; i < 5; i++) { snprintf(p, sizeof p, "%s/%s", root, files[i]); fuzz_write(p, "", 0); }
    snprintf(p, sizeof p, "%s/c.txt", root);
    fuzz_write(p, "a caption\n", 10);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
    setup();
    char p[1300], err[1024];
    snprintf(p, sizeof p, "%s/captions.csv", root);
    fuzz_write(p, data, n);
    /* the same CSV in the subfolder when the input's length is odd */
    snprintf(p, sizeof p, "%s/sub/captions.csv", root);
    if (n & 1) fuzz_write(p, data, n); else unlink(p);
    for (int pol = 0; pol < 3; pol++) {
        dataset_t ds;
        memset(&ds, 0, sizeof ds);
        ds.uncaptioned = pol;
        if (dataset_scan(&ds, root, err, sizeof err)) {
            if (!err[0] || strchr(err, '\n')) abort();
            continue;
        }
        int tot = 0;
        for (int i = 0; i < ds.n_images; i++) {
            if (!ds.path[i] || !ds.caption[i] || ds.repeats[i] < 1) abort();
            if (strchr(ds.caption[i], '\n')) abort();    /* a caption is one line */
            tot += ds.repeats[i];
        }
        if (tot != ds.n_total_with_repeats) abort();
        if (tot > 0) {
            int *order = malloc((size_t)tot * sizeof *order);
            dataset_epoch_order(&ds, 1, 0, order);
            for (int i = 0; i < tot; i++) if (order[i] < 0 || order[i] >= ds.n_images) abort();
            free(order);
        }
        dataset_free(&ds);
    }
    return 0;
}

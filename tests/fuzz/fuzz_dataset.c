/* fuzz_dataset.c: the dataset scanner on a folder tree the input describes.
 * The input is records "kind path NUL content NUL": kind 'd' a folder, 'f' a
 * file with that content, 'l' a symlink to content (a relative target, kept
 * inside the tree: no "..", no leading '/'). Paths are relative, made of
 * [A-Za-z0-9_.,-] and '/', without "..": the tree stays in the scratch
 * folder. At most 24 records; the tree is built fresh for each input. */
#include "fuzz_util.h"
#include "dataset.h"

static int safe(const char *s, int allow_empty) {
    if (!s[0]) return allow_empty;
    if (s[0] == '/' || strstr(s, "..") || strlen(s) > 200) return 0;
    for (const char *c = s; *c; c++) {
        int ok = (*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') ||
                 *c == '_' || *c == '.' || *c == ',' || *c == '-' || *c == '/' || *c == ' ';
        if (!ok) return 0;
    }
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
    char root[1100], p[1400], err[1024];
    snprintf(root, sizeof root, "%s", fuzz_path(0, "tree"));
    fuzz_rm_rf(root);
    mkdir(root, 0700);
    const uint8_t *rest = data;
    size_t rn = n;
    for (int rec = 0; rec < 24 && rn > 1; rec++) {
        int kind = rest[0];
        const uint8_t *r2;
        size_t rn2;
        char *path = fuzz_split(rest + 1, rn - 1, &r2, &rn2);
        const uint8_t *body = r2;
        size_t bn = rn2;
        const uint8_t *z = memchr(body, 0, bn);
        size_t blen = z ? (size_t)(z - body) : bn;
        rest = z ? z + 1 : body + bn;
        rn = z ? bn - blen - 1 : 0;
        if (safe(path, 0)) {
            snprintf(p, sizeof p, "%s/%s", root, path);
            if (kind == 'd') mkdir(p, 0700);
            else if (kind == 'l') {
                char tgt[256];
                size_t k = blen < sizeof tgt - 1 ? blen : sizeof tgt - 1;
                memcpy(tgt, body, k); tgt[k] = '\0';
                if (safe(tgt, 0)) (void)symlink(tgt, p);
            } else {
                FILE *f = fopen(p, "wb");
                if (f) { fwrite(body, 1, blen, f); fclose(f); }
            }
        }
        free(path);
    }
    dataset_t ds;
    memset(&ds, 0, sizeof ds);
    ds.uncaptioned = n ? data[n - 1] % 3 : 0;
    if (dataset_scan(&ds, root, err, sizeof err)) {
        if (!err[0] || strchr(err, '\n')) abort();
        return 0;
    }
    int tot = 0;
    for (int i = 0; i < ds.n_images; i++) {
        if (!ds.path[i] || !ds.caption[i] || ds.repeats[i] < 1) abort();
        if (strchr(ds.caption[i], '\n')) abort();
        tot += ds.repeats[i];
    }
    if (tot != ds.n_total_with_repeats) abort();
    dataset_free(&ds);
    return 0;
}

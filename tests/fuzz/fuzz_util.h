/* fuzz_util.h: what the libFuzzer harnesses in tests/fuzz/ share: each
 * harness defines LLVMFuzzerTestOneInput(data, n) and feeds the bytes to one
 * reader; these helpers put bytes in files for the readers that take a path.
 * Every file lives in one private folder per process, made on first use. */
#ifndef SDLORA_FUZZ_UTIL_H
#define SDLORA_FUZZ_UTIL_H

#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n);

static void fuzz_rm_rf(const char *path);
static char fuzz_scratch[512];
static void fuzz_cleanup(void) { if (fuzz_scratch[0]) fuzz_rm_rf(fuzz_scratch); }

/* the per-process scratch folder (under TMPDIR or /tmp), removed at exit */
static const char *fuzz_dir(void) {
    if (!fuzz_scratch[0]) {
        const char *t = getenv("TMPDIR");
        snprintf(fuzz_scratch, sizeof fuzz_scratch, "%s/sdlora_fuzz_XXXXXX", t && t[0] ? t : "/tmp");
        if (!mkdtemp(fuzz_scratch)) { perror("mkdtemp"); abort(); }
        atexit(fuzz_cleanup);
    }
    return fuzz_scratch;
}

/* dir/name, in a static buffer per call site slot (k = 0..3) */
static const char *fuzz_path(int k, const char *name) {
    static char p[4][1024];
    snprintf(p[k & 3], sizeof p[0], "%s/%s", fuzz_dir(), name);
    return p[k & 3];
}

static void fuzz_write(const char *path, const void *d, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) { perror(path); abort(); }
    if (n && fwrite(d, 1, n, f) != n) { perror(path); abort(); }
    fclose(f);
}

/* remove path and everything under it (symlinks removed, never followed) */
static void fuzz_rm_rf(const char *path) {
    struct stat st;
    if (lstat(path, &st) != 0) return;
    if (S_ISDIR(st.st_mode)) {
        DIR *d = opendir(path);
        if (d) {
            struct dirent *e;
            while ((e = readdir(d)) != NULL) {
                if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
                char sub[2048];
                snprintf(sub, sizeof sub, "%s/%s", path, e->d_name);
                fuzz_rm_rf(sub);
            }
            closedir(d);
        }
        rmdir(path);
    } else {
        unlink(path);
    }
}

/* split data at the first NUL: *a = before (a NUL-terminated copy), the
 * rest after it in *rest / *rn (empty when there is no NUL) */
static char *fuzz_split(const uint8_t *data, size_t n, const uint8_t **rest, size_t *rn) {
    const uint8_t *z = memchr(data, 0, n);
    size_t k = z ? (size_t)(z - data) : n;
    char *a = malloc(k + 1);
    if (!a) abort();
    memcpy(a, data, k);
    a[k] = '\0';
    *rest = z ? z + 1 : data + n;
    *rn = z ? n - k - 1 : 0;
    return a;
}

#endif

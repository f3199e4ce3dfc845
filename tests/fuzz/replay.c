/* replay.c: a main for the harnesses without libFuzzer: each argument, a
 * file or a folder of files (one level), goes once through
 * LLVMFuzzerTestOneInput. Built with gcc -fsanitize=address,undefined it
 * replays the seed corpus and the reproducers with no clang needed:
 *   sh tests/fuzz/replay.sh            (every harness, its whole corpus), or by hand:
 *   cc -std=c99 -D_POSIX_C_SOURCE=200809L -I. -fsanitize=address,undefined \
 *      tests/fuzz/fuzz_json.c tests/fuzz/replay.c json.c -o replay_json
 *   ./replay_json tests/fuzz/corpus/json */
#include "fuzz_util.h"

static int run_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) { perror(path); return 1; }
    size_t cap = 1 << 16, n = 0;
    uint8_t *d = malloc(cap);
    size_t r;
    while (d && (r = fread(d + n, 1, cap - n, f)) > 0) {
        n += r;
        if (n == cap) { uint8_t *nd = realloc(d, cap *= 2); if (!nd) { free(d); d = NULL; } else d = nd; }
    }
    fclose(f);
    if (!d) { fprintf(stderr, "%s: out of memory\n", path); return 1; }
    LLVMFuzzerTestOneInput(d, n);
    free(d);
    return 0;
}

int main(int argc, char **argv) {
    int bad = 0, count = 0;
    for (int i = 1; i < argc; i++) {
        struct stat st;
        if (stat(argv[i], &st) != 0) { perror(argv[i]); bad = 1; continue; }
        if (!S_ISDIR(st.st_mode)) { bad |= run_file(argv[i]); count++; continue; }
        DIR *dir = opendir(argv[i]);
        if (!dir) { perror(argv[i]); bad = 1; continue; }
        struct dirent *e;
        while ((e = readdir(dir)) != NULL) {
            if (e->d_name[0] == '.') continue;
            char p[4096];
            snprintf(p, sizeof p, "%s/%s", argv[i], e->d_name);
            if (stat(p, &st) == 0 && S_ISREG(st.st_mode)) { bad |= run_file(p); count++; }
        }
        closedir(dir);
    }
    printf("replayed %d inputs\n", count);
    return bad;
}

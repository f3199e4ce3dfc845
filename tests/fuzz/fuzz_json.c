/* fuzz_json.c: the JSON reader. A parsed tree is walked in full and looked
 * up by each of its keys; within one object the lookup must find exactly
 * that item (repeated keys are refused by the parser). */
#include "fuzz_util.h"
#include "json.h"

static void walk(const json *j) {
    volatile double s = 0;
    switch (j->type) {
    case JSON_STRING:
        if (!j->string || j->string[j->slen] != '\0') abort();
        for (size_t i = 0; i < j->slen; i++) s += (unsigned char)j->string[i];
        break;
    case JSON_NUMBER: s += j->number; break;
    case JSON_ARRAY:
        for (int i = 0; i < j->n; i++) walk(&j->items[i]);
        break;
    case JSON_OBJECT:
        for (int i = 0; i < j->n; i++) {
            if (json_get(j, j->keys[i]) != &j->items[i]) abort();
            walk(&j->items[i]);
            (void)json_num(j, j->keys[i], 0); (void)json_str(j, j->keys[i], ""); (void)json_bool(j, j->keys[i], 0);
        }
        break;
    default: break;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
    char *b = malloc(n ? n : 1);            /* not NUL-terminated, exact size */
    if (!b) return 0;
    if (n) memcpy(b, data, n);
    char err[256];
    json *j = json_parse(b, n, err, sizeof err);
    if (j) { walk(j); json_free(j); }
    else if (!err[0] || strchr(err, '\n')) abort();
    free(b);
    return 0;
}

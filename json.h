/* json.h: a small JSON reader for safetensors headers, config.json,
 * tokenizer vocab.json. Parses the whole text into a tree. */
#ifndef SDLORA_JSON_H
#define SDLORA_JSON_H

#include <stddef.h>

typedef enum { JSON_NULL = 0, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT } json_type;

typedef struct json {
    json_type type;
    int boolean;          /* JSON_BOOL */
    double number;        /* JSON_NUMBER */
    char *string;         /* JSON_STRING: UTF-8, NUL-terminated (len in slen) */
    size_t slen;
    int n;                /* JSON_ARRAY / JSON_OBJECT: number of items */
    struct json *items;   /* n items */
    char **keys;          /* JSON_OBJECT: n keys, in file order */
} json;

/* Parse len bytes. Returns NULL and a one-line reason in err (ERR_LEN 256
 * at least, with the byte offset) on any syntax error, nesting deeper than
 * 64, trailing garbage, or a key repeated within one object (named). */
json *json_parse(const char *text, size_t len, char *err, size_t errlen);
void json_free(json *j);
const json *json_get(const json *obj, const char *key);   /* NULL if not an object or absent */
/* convenience with defaults, for config.json */
double json_num(const json *obj, const char *key, double dflt);
int json_bool(const json *obj, const char *key, int dflt);
const char *json_str(const json *obj, const char *key, const char *dflt);

/* key k as it may appear in a one-line message: at most 64 bytes, control
 * bytes, quotes and backslashes as \xNN, into o (on bytes, at least 16) */
void json_quote_key(char *o, size_t on, const char *k);

#endif

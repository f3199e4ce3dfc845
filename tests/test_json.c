/* test_json.c: the JSON reader on valid documents and on every kind of bad
 * input (which must give NULL and a message, never a crash or an overread:
 * inputs are copied into exact-size heap buffers so ASan sees any read past
 * len). */
#include "testutil.h"
#include "json.h"

/* parse a copy of s (without its NUL) in an exact-size heap buffer */
static json *parse_exact(const char *s, size_t len, char *err) {
    char *buf = malloc(len ? len : 1);
    ck_assert_ptr_nonnull(buf);
    memcpy(buf, s, len);
    json *j = json_parse(buf, len, err, 256);
    free(buf);
    return j;
}

static json *parse_ok(const char *s) {
    char err[256];
    json *j = parse_exact(s, strlen(s), err);
    ck_assert_msg(j != NULL, "failed to parse %s: %s", s, err);
    return j;
}

static void expect_fail(const char *s, size_t len) {
    char err[256];
    err[0] = '\0';
    json *j = parse_exact(s, len, err);
    ck_assert_msg(j == NULL, "accepted invalid JSON: %.*s", (int)len, s);
    ck_assert_msg(strlen(err) > 0 && strstr(err, "byte") != NULL, "no message for %.*s: '%s'", (int)len, s, err);
    ck_assert_msg(strchr(err, '\n') == NULL, "message is not one line: %s", err);
}

START_TEST(test_nested) {
    const char *s = " {\"b\": [1, 2, {\"x\": null}], \"a\": {\"t\": true, \"f\": false},"
                    " \"s\": \"hi\", \"e\": {}, \"ea\": [] } \n";
    json *j = parse_ok(s);
    ck_assert_int_eq(j->type, JSON_OBJECT);
    ck_assert_int_eq(j->n, 5);
    /* keys kept in file order, not sorted */
    ck_assert_str_eq(j->keys[0], "b");
    ck_assert_str_eq(j->keys[1], "a");
    ck_assert_str_eq(j->keys[2], "s");
    ck_assert_str_eq(j->keys[3], "e");
    ck_assert_str_eq(j->keys[4], "ea");
    const json *b = json_get(j, "b");
    ck_assert_ptr_nonnull(b);
    ck_assert_int_eq(b->type, JSON_ARRAY);
    ck_assert_int_eq(b->n, 3);
    ck_assert(b->items[0].type == JSON_NUMBER && b->items[0].number == 1.0);
    ck_assert(b->items[1].number == 2.0);
    ck_assert_int_eq(b->items[2].type, JSON_OBJECT);
    const json *x = json_get(&b->items[2], "x");
    ck_assert_ptr_nonnull(x);
    ck_assert_int_eq(x->type, JSON_NULL);
    const json *a = json_get(j, "a");
    ck_assert_int_eq(json_bool(a, "t", 0), 1);
    ck_assert_int_eq(json_bool(a, "f", 1), 0);
    ck_assert_str_eq(json_str(j, "s", "?"), "hi");
    ck_assert_int_eq(json_get(j, "e")->type, JSON_OBJECT);
    ck_assert_int_eq(json_get(j, "e")->n, 0);
    ck_assert_int_eq(json_get(j, "ea")->type, JSON_ARRAY);
    ck_assert_int_eq(json_get(j, "ea")->n, 0);
    ck_assert_ptr_null(json_get(j, "missing"));
    ck_assert_ptr_null(json_get(b, "x"));          /* not an object */
    ck_assert_ptr_null(json_get(NULL, "x"));
    json_free(j);
}
END_TEST

START_TEST(test_helpers_defaults) {
    json *j = parse_ok("{\"n\": 3.5, \"s\": \"str\", \"b\": true}");
    ck_assert(json_num(j, "n", -1) == 3.5);
    ck_assert(json_num(j, "s", -1) == -1);          /* wrong type -> default */
    ck_assert(json_num(j, "zz", 7) == 7);
    ck_assert_int_eq(json_bool(j, "n", 5), 5);
    ck_assert_int_eq(json_bool(j, "b", 0), 1);
    ck_assert_str_eq(json_str(j, "n", "dflt"), "dflt");
    ck_assert_str_eq(json_str(j, "zz", "dflt"), "dflt");
    ck_assert(json_num(NULL, "n", 9) == 9);
    json_free(j);
    json_free(NULL);
}
END_TEST

START_TEST(test_escapes) {
    json *j = parse_ok("[\"q\\\"b\\\\s\\/b\\bf\\fn\\nr\\rt\\t\", \"\\u00e9\\u20AC\", \"\\uD83D\\uDE00\","
                       " \"a\\u0000b\", \"\xc3\xa9 raw\", \"\"]");
    ck_assert_int_eq(j->n, 6);
    ck_assert_str_eq(j->items[0].string, "q\"b\\s/b\bf\fn\nr\rt\t");
    /* U+00E9 = C3 A9, U+20AC = E2 82 AC */
    ck_assert_str_eq(j->items[1].string, "\xc3\xa9\xe2\x82\xac");
    ck_assert_uint_eq(j->items[1].slen, 5);
    /* U+1F600 from the surrogate pair D83D DE00 = F0 9F 98 80 */
    ck_assert_str_eq(j->items[2].string, "\xf0\x9f\x98\x80");
    ck_assert_uint_eq(j->items[2].slen, 4);
    /* an escaped NUL is kept; slen tells the real length */
    ck_assert_uint_eq(j->items[3].slen, 3);
    ck_assert(memcmp(j->items[3].string, "a\0b", 4) == 0);
    ck_assert_str_eq(j->items[4].string, "\xc3\xa9 raw");
    ck_assert_uint_eq(j->items[5].slen, 0);
    ck_assert_str_eq(j->items[5].string, "");
    json_free(j);
    /* escaped key */
    j = parse_ok("{\"k\\u0041\\n\": 1}");
    ck_assert_str_eq(j->keys[0], "kA\n");
    ck_assert(json_num(j, "kA\n", 0) == 1);
    json_free(j);
}
END_TEST

START_TEST(test_numbers) {
    json *j = parse_ok("[-1.5e-3, 0, -0, 1E+2, 123456789, 0.5, 2.5E2, 1e-2, -7, 3.0e0, 1e400, 9007199254740993]");
    double want[] = { -1.5e-3, 0, 0, 100, 123456789, 0.5, 250, 0.01, -7, 3.0 };
    for (int i = 0; i < 10; i++) {
        ck_assert_int_eq(j->items[i].type, JSON_NUMBER);
        ck_assert_msg(j->items[i].number == want[i], "item %d: %.17g != %.17g", i, j->items[i].number, want[i]);
    }
    ck_assert(signbit(j->items[2].number));          /* -0 keeps its sign */
    ck_assert(isinf(j->items[10].number));           /* overflow -> inf, like Python */
    ck_assert(j->items[11].number == 9007199254740992.0);
    json_free(j);
    /* top-level scalars */
    j = parse_ok("42");
    ck_assert(j->type == JSON_NUMBER && j->number == 42);
    json_free(j);
    j = parse_ok(" \"s\" ");
    ck_assert(j->type == JSON_STRING);
    json_free(j);
    j = parse_ok("null");
    ck_assert(j->type == JSON_NULL);
    json_free(j);
    /* a long number (longer than any small stack buffer) */
    char big[500];
    memset(big, '1', 300);
    strcpy(big + 300, ".25");
    j = parse_ok(big);
    ck_assert(j->number > 1.1e299 && j->number < 1.12e299);
    json_free(j);
}
END_TEST

START_TEST(test_invalid) {
    const char *bad[] = {
        "", "   ", "{", "}", "[", "]", "[1,]", "[,1]", "[1 2]", "{,}", "{\"a\":1,}", "{\"a\" 1}",
        "{a:1}", "{'a':1}", "{\"a\":}", "{\"a\"}", "{1:2}", "[1]]", "{} x", "[1] [2]", "01", "-",
        "-01", "1.", ".5", "1e", "1e+", "+1", "0x10", "NaN", "Infinity", "-Infinity", "tru", "nul",
        "falsey", "True", "\"abc", "\"a\\\"", "\"\\x\"", "\"\\u12G4\"", "\"\\u12\"", "\"\\uD800\"",
        "\"\\uDC00\"", "\"\\uD800\\u0041\"", "\"\\uD800x\"", "\"a\tb\"", "\"a\nb\"", "[\"a\",]",
        "\"\\", "\"\\u", "1 2", "[1,\n2,,3]", "{\"a\":1 \"b\":2}", "\xef\xbb\xbf",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) expect_fail(bad[i], strlen(bad[i]));
    /* embedded NUL outside a string is garbage, not an end marker */
    expect_fail("[1]\0", 4);
    expect_fail("[1,\0 2]", 7);
    /* a BOM before a document is allowed */
    json *j = parse_ok("\xef\xbb\xbf{\"a\": 1}");
    ck_assert(json_num(j, "a", 0) == 1);
    json_free(j);
}
END_TEST

START_TEST(test_error_offset) {
    char err[256];
    /* "[1, 2,]": the ']' where a value belongs is byte 6 */
    ck_assert_ptr_null(parse_exact("[1, 2,]", 7, err));
    ck_assert_msg(strstr(err, "at byte 6") != NULL, "%s", err);
    ck_assert_ptr_null(parse_exact("{\"a\": 1} x", 10, err));
    ck_assert_msg(strstr(err, "trailing") && strstr(err, "at byte 9"), "%s", err);
    ck_assert_ptr_null(parse_exact("[\"ab", 4, err));
    ck_assert_msg(strstr(err, "unterminated string") != NULL, "%s", err);
    ck_assert_ptr_null(parse_exact("\"\\q\"", 4, err));
    ck_assert_msg(strstr(err, "bad escape") && strstr(err, "at byte 1"), "%s", err);
    /* a short err buffer is never overrun */
    char small[8];
    memset(small, 'x', sizeof small);
    ck_assert_ptr_null(json_parse("[1,]", 4, small, 5));
    ck_assert_int_eq(small[4], '\0');
    ck_assert_int_eq(small[5], 'x');
    /* NULL err is allowed */
    ck_assert_ptr_null(json_parse("[1,]", 4, NULL, 0));
}
END_TEST

/* a key repeated within one object is refused, naming the key and where
 * its second copy begins; the same key in different objects is fine */
START_TEST(test_duplicate_keys) {
    char err[256];
    const char *s = "{\"dup\": 1, \"x\": 2, \"dup\": 3}";
    ck_assert_ptr_null(parse_exact(s, strlen(s), err));
    ck_assert_msg(strstr(err, "\"dup\" appears twice") && strstr(err, "at byte 19"), "%s", err);
    ck_assert_msg(strchr(err, '\n') == NULL, "%s", err);
    /* the safetensors case: __metadata__ twice, each one valid alone */
    s = "{\"__metadata__\": {\"a\": \"1\"}, \"t\": {}, \"__metadata__\": {\"b\": \"2\", \"c\": \"3\"}}";
    ck_assert_ptr_null(parse_exact(s, strlen(s), err));
    ck_assert_msg(strstr(err, "\"__metadata__\" appears twice"), "%s", err);
    /* nested, and spelled differently (an escape decodes to the same key) */
    s = "[{\"o\": {\"k\": 1, \"\\u006b\": 2}}]";
    ck_assert_ptr_null(parse_exact(s, strlen(s), err));
    ck_assert_msg(strstr(err, "\"k\" appears twice"), "%s", err);
    /* a key with a newline is named on one line */
    s = "{\"a\\nb\": 1, \"a\\nb\": 2}";
    ck_assert_ptr_null(parse_exact(s, strlen(s), err));
    ck_assert_msg(strchr(err, '\n') == NULL && strstr(err, "a\\x0ab"), "%s", err);
    /* a long key is cut in the message, which stays one short line */
    char big[500];
    int n = snprintf(big, sizeof big, "{\"%0200d\": 1, \"%0200d\": 2}", 7, 7);
    ck_assert_ptr_null(parse_exact(big, (size_t)n, err));
    ck_assert_msg(strstr(err, "...\" appears twice"), "%s", err);
    /* the same key in sibling and nested objects is not a repeat */
    json *j = parse_ok("{\"k\": {\"k\": 1}, \"o\": [{\"k\": 2}, {\"k\": 3}], \"K\": 4}");
    ck_assert_int_eq(j->n, 3);
    json_free(j);
    /* many keys (a vocab.json has ~49k): the last one repeating the first is found */
    size_t cap = 60000 * 20 + 32, len = 0;
    char *v = malloc(cap);
    ck_assert_ptr_nonnull(v);
    v[len++] = '{';
    for (int i = 0; i < 60000; i++) len += (size_t)snprintf(v + len, cap - len, "%s\"w%d\":%d", i ? "," : "", i, i);
    size_t ok_len = len;
    v[ok_len] = '}';
    j = parse_exact(v, ok_len + 1, err);
    ck_assert_msg(j != NULL, "%s", err);
    ck_assert(json_num(j, "w59999", -1) == 59999);
    json_free(j);
    len += (size_t)snprintf(v + len, cap - len, ",\"w0\":1}");
    ck_assert_ptr_null(parse_exact(v, len, err));
    ck_assert_msg(strstr(err, "\"w0\" appears twice"), "%s", err);
    free(v);
}
END_TEST

/* every proper prefix of an object document is invalid */
START_TEST(test_truncated_every_byte) {
    const char *doc = "{\"name\": \"x\\u00e9\\uD83D\\uDE00\", \"dtype\": \"F32\", \"shape\": [320, 4, 3, 3],"
                      " \"data_offsets\": [0, 46080], \"f\": -1.5e-3, \"t\": true, \"n\": null,"
                      " \"o\": {\"k\": [false, {}, []]}}";
    size_t len = strlen(doc);
    json *j = parse_ok(doc);
    ck_assert_int_eq(j->n, 8);
    const json *shape = json_get(j, "shape");
    ck_assert_int_eq(shape->n, 4);
    ck_assert(shape->items[0].number == 320);
    json_free(j);
    for (size_t n = 0; n < len; n++) expect_fail(doc, n);
    /* and replacing any one byte with garbage never crashes (may or may not parse) */
    char *m = malloc(len);
    for (size_t i = 0; i < len; i++) {
        const char subs[] = { '\0', '"', '\\', '{', ']', ',', (char)0xff };
        for (size_t k = 0; k < sizeof subs; k++) {
            memcpy(m, doc, len);
            m[i] = subs[k];
            char err[256];
            json *q = json_parse(m, len, err, sizeof err);
            if (!q) ck_assert(strlen(err) > 0);
            json_free(q);
        }
    }
    free(m);
}
END_TEST

START_TEST(test_depth) {
    char err[256];
    /* 64 levels are fine, 65 are not */
    char buf[2100];
    for (int depth = 63; depth <= 66; depth++) {
        int n = 0;
        for (int i = 0; i < depth; i++) buf[n++] = '[';
        for (int i = 0; i < depth; i++) buf[n++] = ']';
        json *j = parse_exact(buf, (size_t)n, err);
        if (depth <= 64) { ck_assert_msg(j != NULL, "depth %d: %s", depth, err); json_free(j); }
        else { ck_assert_ptr_null(j); ck_assert_msg(strstr(err, "nesting") != NULL, "%s", err); }
    }
    /* 1000 levels of arrays and of objects: an error, not a stack overflow */
    int n = 0;
    for (int i = 0; i < 1000; i++) buf[n++] = '[';
    for (int i = 0; i < 1000; i++) buf[n++] = ']';
    ck_assert_ptr_null(parse_exact(buf, (size_t)n, err));
    ck_assert_msg(strstr(err, "nesting") != NULL, "%s", err);
    char *obj = malloc(7000);
    n = 0;
    for (int i = 0; i < 1000; i++) { memcpy(obj + n, "{\"a\":", 5); n += 5; }
    obj[n++] = '1';
    for (int i = 0; i < 1000; i++) obj[n++] = '}';
    ck_assert_ptr_null(parse_exact(obj, (size_t)n, err));
    ck_assert_msg(strstr(err, "nesting") != NULL, "%s", err);
    free(obj);
}
END_TEST

/* many items: the arrays grow, and a failure late in a big document frees it all (ASan) */
START_TEST(test_large_and_late_failure) {
    size_t cap = 200000, n = 0;
    char *buf = malloc(cap);
    buf[n++] = '{';
    for (int i = 0; i < 5000; i++) n += (size_t)sprintf(buf + n, "%s\"k%d\": [%d, \"v%d\"]", i ? "," : "", i, i, i);
    buf[n++] = '}';
    json *j = parse_exact(buf, n, NULL);
    ck_assert_ptr_nonnull(j);
    ck_assert_int_eq(j->n, 5000);
    ck_assert_str_eq(j->keys[4321], "k4321");
    ck_assert(json_get(j, "k4321")->items[0].number == 4321);
    ck_assert_str_eq(json_get(j, "k4999")->items[1].string, "v4999");
    json_free(j);
    buf[n - 1] = ',';                      /* now it ends with a trailing comma */
    char err[256];
    ck_assert_ptr_null(parse_exact(buf, n, err));
    free(buf);
}
END_TEST

static Suite *json_suite(void) {
    Suite *s = suite_create("json");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_nested);
    tcase_add_test(tc, test_helpers_defaults);
    tcase_add_test(tc, test_escapes);
    tcase_add_test(tc, test_numbers);
    tcase_add_test(tc, test_invalid);
    tcase_add_test(tc, test_error_offset);
    tcase_add_test(tc, test_duplicate_keys);
    tcase_add_test(tc, test_truncated_every_byte);
    tcase_add_test(tc, test_depth);
    tcase_add_test(tc, test_large_and_late_failure);
    suite_add_tcase(s, tc);
    return s;
}

CHECK_MAIN(json_suite)

/* fuzz_inflate.c: DEFLATE and its gzip / zlib wrappers. The first byte picks
 * the wrapper (0 raw, 1 gzip, 2 zlib), the rest is the stream. A success
 * must give a buffer of *outn readable bytes; raw reports what it used. */
#include "fuzz_util.h"
#include "inflate.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
    if (n < 1) return 0;
    int kind = data[0] % 3;
    size_t m = n - 1;
    uint8_t *in = malloc(m ? m : 1);
    if (!in) return 0;
    if (m) memcpy(in, data + 1, m);
    uint8_t *out = NULL;
    size_t outn = 0, used = 0;
    char err[256];
    int rc = kind == 0 ? inflate_raw(in, m, &out, &outn, &used, err, sizeof err)
           : kind == 1 ? inflate_gzip(in, m, &out, &outn, err, sizeof err)
                       : inflate_zlib(in, m, &out, &outn, err, sizeof err);
    if (rc == 0) {
        if (!out || (kind == 0 && used > m)) abort();
        volatile uint8_t s = 0;
        for (size_t i = 0; i < outn; i++) s ^= out[i];
        /* the checksums agree with a second computation in pieces */
        uint32_t c1 = crc32_update(0, out, outn), c2 = crc32_update(crc32_update(0, out, outn / 2), out + outn / 2, outn - outn / 2);
        if (c1 != c2) abort();
    } else if (out || !err[0] || strchr(err, '\n')) {
        abort();
    }
    free(out);
    free(in);
    return 0;
}

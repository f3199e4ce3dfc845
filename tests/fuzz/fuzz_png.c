/* fuzz_png.c: PNG decoding (image_decode). The input is the file after its
 * 8-byte signature, which the harness puts back. When the first byte is odd
 * the chunk CRCs are recomputed first, so mutations reach inflate, the
 * filters and the pixel conversions instead of stopping at the CRC check. */
#include "fuzz_util.h"
#include "image.h"
#include "inflate.h"

static void fix_crcs(uint8_t *d, size_t n) {
    size_t pos = 8;
    while (n - pos >= 12) {
        uint32_t len = (uint32_t)d[pos] << 24 | (uint32_t)d[pos + 1] << 16 | (uint32_t)d[pos + 2] << 8 | d[pos + 3];
        if (len > n - pos - 12) break;
        uint32_t c = crc32_update(0, d + pos + 4, (size_t)len + 4);
        uint8_t *q = d + pos + 8 + len;
        q[0] = (uint8_t)(c >> 24); q[1] = (uint8_t)(c >> 16); q[2] = (uint8_t)(c >> 8); q[3] = (uint8_t)c;
        pos += 12 + (size_t)len;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
    if (n < 1) return 0;
    int fix = data[0] & 1;
    size_t m = 8 + n - 1;
    uint8_t *b = malloc(m);                 /* exact size: ASan sees any over-read */
    if (!b) return 0;
    memcpy(b, "\x89PNG\r\n\x1a\n", 8);
    memcpy(b + 8, data + 1, n - 1);
    if (fix) fix_crcs(b, m);
    image_t im;
    char err[512];
    if (image_decode(&im, b, m, "fuzz.png", err, sizeof err) == 0) {
        if (im.w < 1 || im.h < 1 || !im.rgb) abort();
        volatile uint8_t s = 0;             /* every pixel is readable */
        for (size_t i = 0; i < (size_t)im.w * (size_t)im.h * 3; i++) s ^= im.rgb[i];
        image_free(&im);
    } else if (!err[0] || strchr(err, '\n')) {
        abort();                            /* a refusal always says why, on one line */
    }
    free(b);
    return 0;
}

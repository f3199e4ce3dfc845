/* fuzz_jpeg.c: JPEG decoding (image_decode): baseline, progressive,
 * restart intervals, EXIF orientation. The input is the whole file. */
#include "fuzz_util.h"
#include "image.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
    uint8_t *b = malloc(n ? n : 1);         /* exact size: ASan sees any over-read */
    if (!b) return 0;
    if (n) memcpy(b, data, n);
    image_t im;
    char err[512];
    if (image_decode(&im, b, n, "fuzz.jpg", err, sizeof err) == 0) {
        if (im.w < 1 || im.h < 1 || !im.rgb) abort();
        volatile uint8_t s = 0;
        for (size_t i = 0; i < (size_t)im.w * (size_t)im.h * 3; i++) s ^= im.rgb[i];
        image_free(&im);
    } else if (!err[0] || strchr(err, '\n')) {
        abort();
    }
    free(b);
    return 0;
}

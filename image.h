/* image.h: the pictures going in (training data) and coming out (samples).
 *
 * Decoding gives 8-bit RGB, row-major, w*h*3 bytes, exactly what Pillow's
 * Image.open(path).convert("RGB") gives, because kohya and diffusers read
 * training images that way:
 *   - PNG: every colour type and bit depth, PLTE, Adam7, all filters, split
 *     IDAT, CRC of every chunk checked. Alpha (RGBA, gray+alpha, tRNS) is
 *     DROPPED, not composited: that is what convert("RGB") does. 16-bit
 *     samples keep their high byte (Pillow's RGB;16B unpackers); 1/2/4-bit
 *     gray is scaled to 0..255 (x255, x85, x17). 16-bit GRAY is the odd one:
 *     Pillow opens it as mode I;16 and convert("RGB") CLIPS each value to
 *     255 (so most of a 16-bit gray image comes out white); we do the same,
 *     on purpose, so a dataset trains identically here and in kohya.
 *     Palette indices past the PLTE give black.
 *   - JPEG: baseline and progressive Huffman, 8-bit, 1 or 3 components, any
 *     integer chroma subsampling (4:4:4, 4:2:2, 4:2:0, 4:4:0, ...), restart
 *     markers. The IDCT is libjpeg's default accurate-integer one and chroma
 *     is upsampled with libjpeg's triangular ("fancy") filter (replication
 *     for factors other than 2), so pixels equal Pillow's exactly on every
 *     fixture (tests/test_image.c checks it).
 *     The EXIF orientation tag (APP1, 0x0112) is APPLIED, as
 *     ImageOps.exif_transpose does, so phone photos come out upright.
 *     Refused with an error naming the kind: CMYK/YCCK, 12-bit, arithmetic
 *     coding, lossless, hierarchical.
 * The format is chosen by the first bytes, never by the file name.
 * Images larger than IMAGE_MAX_SIDE on a side or IMAGE_MAX_PIXELS in all are
 * refused before any large allocation.
 *
 * Every function that can fail returns 0 or -1 with a one-line message
 * "<file>: <why>" in err; none exits, and corrupt or truncated input is an
 * error, never a crash or an endless loop. */
#ifndef SDLORA_IMAGE_H
#define SDLORA_IMAGE_H

#include <stddef.h>
#include <stdint.h>

#define IMAGE_MAX_SIDE   16384
#define IMAGE_MAX_PIXELS 100000000L

typedef struct {
    int w, h;
    uint8_t *rgb;   /* w*h*3, malloc'ed; image_free releases it */
} image_t;

void image_free(image_t *im);

/* decode a PNG or JPEG file / buffer into im (im->rgb malloc'ed).
 * name is only used in messages. */
int image_load(image_t *im, const char *path, char *err, size_t errlen);
int image_decode(image_t *im, const uint8_t *data, size_t n, const char *name,
                 char *err, size_t errlen);

/* write an 8-bit RGB PNG with tEXt chunks (key, value pairs; A1111 reads the
 * generation settings from key "parameters"). Written to path.tmp, flushed,
 * then renamed onto path. Keys are 1-79 Latin-1 bytes; values any bytes
 * except NUL. */
int image_save_png(const char *path, const uint8_t *rgb, int w, int h,
                   const char **text_keys, const char **text_vals, int ntext,
                   char *err, size_t errlen);
/* the same PNG, in memory (*out malloc'ed, *outn bytes) */
int image_encode_png(uint8_t **out, size_t *outn, const uint8_t *rgb, int w, int h,
                     const char **text_keys, const char **text_vals, int ntext,
                     char *err, size_t errlen);

/* resampling, RGB8 -> RGB8, separable, the same arithmetic as Pillow's
 * Image.resize (horizontal pass first, rounded to 8 bits between passes):
 *   IMAGE_LANCZOS: sinc(x) sinc(x/3), |x| < 3, support widened by the scale
 *                  factor when shrinking (antialiasing) = Image.LANCZOS
 *   IMAGE_BOX:     each output pixel is the area average of the input pixels
 *                  it covers = Image.BOX ("area") */
typedef enum { IMAGE_LANCZOS = 0, IMAGE_BOX = 1 } image_filter;

int image_resize(uint8_t *dst, int dw, int dh, const uint8_t *src, int sw, int sh,
                 image_filter filter);

/* The training crop: scale so the SHORT side becomes `size` (long side =
 * floor(size * long / short), as torchvision's Resize(int)), then cut a
 * crop_w x crop_h window at (x0, y0) of the scaled image; x0 or y0 < 0 means
 * centred (offset round((scaled - crop) / 2), half to even, as CenterCrop).
 * The window must fit inside the scaled image. out->rgb is malloc'ed. */
int image_resize_crop(image_t *out, const image_t *in, int size, int crop_w, int crop_h,
                      int x0, int y0, image_filter filter, char *err, size_t errlen);

/* mirror left-right in place */
void image_flip_h(uint8_t *rgb, int w, int h);

/* RGB8 HWC -> float CHW in [-1, 1]: x / 127.5 - 1 (the VAE's input range) */
void image_to_chw(float *chw, const uint8_t *rgb, int w, int h);
/* float CHW -> RGB8 HWC: round(clamp((x + 1) / 2, 0, 1) * 255), as
 * diffusers' postprocess does with the VAE's output */
void image_from_chw(uint8_t *rgb, const float *chw, int w, int h);

#endif

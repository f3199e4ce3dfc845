/* inflate.h: a DEFLATE decoder (RFC 1951) with the gzip (RFC 1952) and zlib
 * (RFC 1950) wrappers. Used for OpenAI's gzipped CLIP vocabulary and, later,
 * PNG's zlib streams.
 *
 * Every function returns 0 on success, with *out a malloc'ed buffer of *outn
 * bytes (the caller frees it; never NULL on success, even for empty output),
 * or -1 with a one-line reason in err and *out = NULL. Corrupt or truncated
 * input is always an error, never a crash or an endless loop; output beyond
 * INFLATE_MAX_OUT bytes is refused. */
#ifndef SDLORA_INFLATE_H
#define SDLORA_INFLATE_H

#include <stddef.h>
#include <stdint.h>

#define INFLATE_MAX_OUT ((size_t)1 << 30)   /* 1 GiB */

/* raw DEFLATE; *used (may be NULL) = input bytes consumed */
int inflate_raw(const uint8_t *in, size_t n, uint8_t **out, size_t *outn, size_t *used,
                char *err, size_t errlen);
/* gzip member(s): header, flags, CRC32 and ISIZE checked; concatenated members are joined */
int inflate_gzip(const uint8_t *in, size_t n, uint8_t **out, size_t *outn, char *err, size_t errlen);
/* zlib: CMF/FLG check, no preset dictionary, adler32 checked */
int inflate_zlib(const uint8_t *in, size_t n, uint8_t **out, size_t *outn, char *err, size_t errlen);

uint32_t crc32_update(uint32_t crc, const uint8_t *p, size_t n);   /* start with crc = 0 */
uint32_t adler32_update(uint32_t a, const uint8_t *p, size_t n);  /* start with a = 1 */

#endif

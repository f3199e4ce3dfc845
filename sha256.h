/* sha256.h: SHA-256 (FIPS 180-4), for the model hashes kohya puts in a LoRA
 * file's metadata (sshs_model_hash, sshs_legacy_hash) and that AUTOMATIC1111
 * shows on the LoRA card. */
#ifndef SDLORA_SHA256_H
#define SDLORA_SHA256_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint32_t h[8];        /* the running hash */
    uint64_t nbytes;      /* message length so far */
    uint8_t block[64];    /* a partial block */
    size_t nblock;
} sha256_ctx;

void sha256_init(sha256_ctx *c);
void sha256_update(sha256_ctx *c, const void *data, size_t n);
void sha256_final(sha256_ctx *c, uint8_t digest[32]);
/* the 64 lowercase hex digits of digest, and a NUL */
void sha256_hex(const uint8_t digest[32], char hex[65]);

#endif

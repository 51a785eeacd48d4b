/* Small SHA-256 and HMAC-SHA256 for the actuator link (FIPS 180-4, RFC 2104).
 * No dynamic allocation, no floating point; the round constants live in flash on AVR. */
#ifndef RS_SHA256_H
#define RS_SHA256_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define RS_SHA256_LEN 32

typedef struct {
    uint32_t h[8];
    uint8_t buf[64];
    uint32_t total; /* bytes hashed so far (messages here are tiny) */
    uint8_t fill;
} rs_sha256_t;

void rs_sha256_init(rs_sha256_t *s);
void rs_sha256_update(rs_sha256_t *s, const uint8_t *data, uint16_t len);
void rs_sha256_final(rs_sha256_t *s, uint8_t out[RS_SHA256_LEN]);

/* HMAC-SHA256 with a key of at most 64 bytes (the link always uses 32). */
void rs_hmac_sha256(const uint8_t *key, uint8_t key_len, const uint8_t *msg, uint16_t len,
                    uint8_t out[RS_SHA256_LEN]);

#ifdef __cplusplus
}
#endif
#endif

/* SHA-256 (FIPS 180-4) and HMAC-SHA256 (RFC 2104), sized for an 8-bit MCU. */
#include "rs_sha256.h"

#include <string.h>

#ifdef __AVR__
#include <avr/pgmspace.h>
#define RS_K_ATTR PROGMEM
#define RS_K(i) pgm_read_dword(&K[i])
#else
#define RS_K_ATTR
#define RS_K(i) K[i]
#endif

static const uint32_t K[64] RS_K_ATTR = {
    0x428a2f98UL, 0x71374491UL, 0xb5c0fbcfUL, 0xe9b5dba5UL, 0x3956c25bUL, 0x59f111f1UL,
    0x923f82a4UL, 0xab1c5ed5UL, 0xd807aa98UL, 0x12835b01UL, 0x243185beUL, 0x550c7dc3UL,
    0x72be5d74UL, 0x80deb1feUL, 0x9bdc06a7UL, 0xc19bf174UL, 0xe49b69c1UL, 0xefbe4786UL,
    0x0fc19dc6UL, 0x240ca1ccUL, 0x2de92c6fUL, 0x4a7484aaUL, 0x5cb0a9dcUL, 0x76f988daUL,
    0x983e5152UL, 0xa831c66dUL, 0xb00327c8UL, 0xbf597fc7UL, 0xc6e00bf3UL, 0xd5a79147UL,
    0x06ca6351UL, 0x14292967UL, 0x27b70a85UL, 0x2e1b2138UL, 0x4d2c6dfcUL, 0x53380d13UL,
    0x650a7354UL, 0x766a0abbUL, 0x81c2c92eUL, 0x92722c85UL, 0xa2bfe8a1UL, 0xa81a664bUL,
    0xc24b8b70UL, 0xc76c51a3UL, 0xd192e819UL, 0xd6990624UL, 0xf40e3585UL, 0x106aa070UL,
    0x19a4c116UL, 0x1e376c08UL, 0x2748774cUL, 0x34b0bcb5UL, 0x391c0cb3UL, 0x4ed8aa4aUL,
    0x5b9cca4fUL, 0x682e6ff3UL, 0x748f82eeUL, 0x78a5636fUL, 0x84c87814UL, 0x8cc70208UL,
    0x90befffaUL, 0xa4506cebUL, 0xbef9a3f7UL, 0xc67178f2UL};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void compress(rs_sha256_t *s) {
    uint32_t w[16];
    uint32_t a = s->h[0], b = s->h[1], c = s->h[2], d = s->h[3];
    uint32_t e = s->h[4], f = s->h[5], g = s->h[6], h = s->h[7];
    uint8_t i;
    for (i = 0; i < 16; i++) {
        w[i] = ((uint32_t)s->buf[4 * i] << 24) | ((uint32_t)s->buf[4 * i + 1] << 16) |
               ((uint32_t)s->buf[4 * i + 2] << 8) | (uint32_t)s->buf[4 * i + 3];
    }
    for (i = 0; i < 64; i++) {
        uint32_t wi;
        if (i < 16) {
            wi = w[i];
        } else { /* rolling 16-word schedule keeps RAM use at 64 bytes */
            uint32_t w15 = w[(i + 1) & 15], w2 = w[(i + 14) & 15];
            uint32_t s0 = ROR(w15, 7) ^ ROR(w15, 18) ^ (w15 >> 3);
            uint32_t s1 = ROR(w2, 17) ^ ROR(w2, 19) ^ (w2 >> 10);
            wi = w[i & 15] = w[i & 15] + s0 + w[(i + 9) & 15] + s1;
        }
        uint32_t t1 = h + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) +
                      RS_K(i) + wi;
        uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g; g = f; f = e; e = d + t1;
        d = c; c = b; b = a; a = t1 + t2;
    }
    s->h[0] += a; s->h[1] += b; s->h[2] += c; s->h[3] += d;
    s->h[4] += e; s->h[5] += f; s->h[6] += g; s->h[7] += h;
}

void rs_sha256_init(rs_sha256_t *s) {
    static const uint32_t iv[8] = {0x6a09e667UL, 0xbb67ae85UL, 0x3c6ef372UL, 0xa54ff53aUL,
                                   0x510e527fUL, 0x9b05688cUL, 0x1f83d9abUL, 0x5be0cd19UL};
    memcpy(s->h, iv, sizeof iv);
    s->total = 0;
    s->fill = 0;
}

void rs_sha256_update(rs_sha256_t *s, const uint8_t *data, uint16_t len) {
    while (len--) {
        s->buf[s->fill++] = *data++;
        s->total++;
        if (s->fill == 64) {
            compress(s);
            s->fill = 0;
        }
    }
}

void rs_sha256_final(rs_sha256_t *s, uint8_t out[RS_SHA256_LEN]) {
    uint32_t bits_hi = s->total >> 29, bits_lo = s->total << 3;
    uint8_t i;
    s->buf[s->fill++] = 0x80;
    if (s->fill > 56) {
        while (s->fill < 64) s->buf[s->fill++] = 0;
        compress(s);
        s->fill = 0;
    }
    while (s->fill < 56) s->buf[s->fill++] = 0;
    for (i = 0; i < 4; i++) {
        s->buf[56 + i] = (uint8_t)(bits_hi >> (24 - 8 * i));
        s->buf[60 + i] = (uint8_t)(bits_lo >> (24 - 8 * i));
    }
    compress(s);
    for (i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)(s->h[i] >> 24);
        out[4 * i + 1] = (uint8_t)(s->h[i] >> 16);
        out[4 * i + 2] = (uint8_t)(s->h[i] >> 8);
        out[4 * i + 3] = (uint8_t)s->h[i];
    }
}

void rs_hmac_sha256(const uint8_t *key, uint8_t key_len, const uint8_t *msg, uint16_t len,
                    uint8_t out[RS_SHA256_LEN]) {
    rs_sha256_t s;
    uint8_t pad[64];
    uint8_t inner[RS_SHA256_LEN];
    uint8_t i;
    for (i = 0; i < 64; i++) pad[i] = (uint8_t)((i < key_len ? key[i] : 0) ^ 0x36);
    rs_sha256_init(&s);
    rs_sha256_update(&s, pad, 64);
    rs_sha256_update(&s, msg, len);
    rs_sha256_final(&s, inner);
    for (i = 0; i < 64; i++) pad[i] = (uint8_t)((i < key_len ? key[i] : 0) ^ 0x5c);
    rs_sha256_init(&s);
    rs_sha256_update(&s, pad, 64);
    rs_sha256_update(&s, inner, RS_SHA256_LEN);
    rs_sha256_final(&s, out);
}

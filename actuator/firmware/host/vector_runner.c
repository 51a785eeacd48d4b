/* Host harness for the C core: runs a shared-vector script from stdin, prints what the
 * core wrote and its state after each step, in the format actuator/scenarios.py prints
 * for the Python simulator, so a test can compare the two line by line.
 *
 * Script lines:  key <hex32>|none   bootfault <n>   button <0|1>   counters <n>
 *                random <hex>  (appended to the pool the core draws nonces / secrets from)
 *                boot <ms>     rx <ms> <hex>     tick <ms>     selftest
 *                bench <n>     (times n X25519 scalar multiplications on this machine) */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../monocypher.h"
#include "../rs_link.h"
#include "../rs_sha256.h"

#define POOL_MAX 2048

typedef struct {
    uint8_t pool[POOL_MAX];
    int filled, drawn;
} runner_t;

static void write_hex(const uint8_t *d, uint16_t n) {
    uint16_t i;
    for (i = 0; i < n; i++) printf("%02x", d[i]);
}

static void on_write(void *ctx, const uint8_t *data, uint16_t len) {
    (void)ctx;
    printf("tx ");
    write_hex(data, len);
    printf("\n");
}

static void on_random(void *ctx, uint8_t *out, uint8_t len) {
    runner_t *r = (runner_t *)ctx;
    if (r->drawn + len > r->filled) {
        fprintf(stderr, "vector_runner: script ran out of random bytes\n");
        exit(3);
    }
    memcpy(out, r->pool + r->drawn, len);
    r->drawn += len;
}

static int parse_hex(const char *s, uint8_t *out, int cap) {
    int n = 0;
    while (s[0] && s[1] && s[0] != '\n') {
        unsigned v;
        if (n >= cap || sscanf(s, "%2x", &v) != 1) return -1;
        out[n++] = (uint8_t)v;
        s += 2;
    }
    return n;
}

static void print_state(const rs_link_t *l) {
    const uint16_t *c = l->counters;
    printf("state state=%u fault=%u prov=%u pmode=%u host=%u sp=%u brake=%u steer=%d thr=%u "
           "target=%d "
           "spseq=%u bad_frame=%u bad_crc=%u bad_tag=%u replay=%u refused=%u stale=%u "
           "expired=%u dup=%u accepted=%u\n",
           l->state, l->fault, l->provisioned, l->provision_mode, l->host_seen, l->sp_active,
           l->brake, l->steering, l->throttle, l->target, l->sp_seq, c[RS_C_BAD_FRAME], c[RS_C_BAD_CRC],
           c[RS_C_BAD_TAG], c[RS_C_REPLAY], c[RS_C_REFUSED], c[RS_C_STALE], c[RS_C_EXPIRED],
           c[RS_C_DUP], c[RS_C_ACCEPTED]);
}

int main(void) {
    static char line[8192];
    static uint8_t bytes[4096];
    static rs_link_t link;
    static runner_t r;
    uint8_t key[RS_KEY_LEN];
    int have_key = 0, booted = 0, i;
    unsigned boot_fault = RS_FAULT_BOOT, button = 0, preset = 0;
    while (fgets(line, sizeof line, stdin)) {
        unsigned long t;
        char hex[8000];
        if (line[0] == '\n' || line[0] == '#') continue;
        if (strncmp(line, "key ", 4) == 0) {
            have_key = strncmp(line + 4, "none", 4) != 0;
            if (have_key && parse_hex(line + 4, key, RS_KEY_LEN) != RS_KEY_LEN) goto bad;
        } else if (sscanf(line, "bootfault %u", &boot_fault) == 1 ||
                   sscanf(line, "button %u", &button) == 1 ||
                   sscanf(line, "counters %u", &preset) == 1) {
            continue;
        } else if (strncmp(line, "random ", 7) == 0) {
            int n = parse_hex(line + 7, r.pool + r.filled, POOL_MAX - r.filled);
            if (n < 0) goto bad;
            r.filled += n;
        } else if (sscanf(line, "boot %lu", &t) == 1) {
            rs_link_init(&link, have_key ? key : 0, (uint8_t)boot_fault, (uint8_t)button,
                         on_write, on_random, &r);
            for (i = 0; i < RS_NUM_COUNTERS; i++) link.counters[i] = (uint16_t)preset;
            rs_link_boot(&link, (uint32_t)t);
            booted = 1;
            print_state(&link);
        } else if (booted && sscanf(line, "rx %lu %7999s", &t, hex) == 2) {
            int n = parse_hex(hex, bytes, sizeof bytes);
            if (n < 0) goto bad;
            for (i = 0; i < n; i++) rs_link_rx_byte(&link, bytes[i], (uint32_t)t);
            rs_link_tick(&link, (uint32_t)t);
            print_state(&link);
        } else if (booted && sscanf(line, "tick %lu", &t) == 1) {
            rs_link_tick(&link, (uint32_t)t);
            print_state(&link);
        } else if (sscanf(line, "bench %lu", &t) == 1) {
            uint8_t sk[32], pk[32];
            unsigned long k;
            clock_t c0;
            for (k = 0; k < 32; k++) sk[k] = (uint8_t)(k * 7 + 1);
            c0 = clock();
            for (k = 0; k < t; k++) {
                crypto_x25519_public_key(pk, sk);
                sk[0] ^= pk[0]; /* depend on the result: nothing is optimised away */
            }
            printf("x25519_us %.1f\n",
                   (double)(clock() - c0) * 1e6 / CLOCKS_PER_SEC / (double)(t ? t : 1));
        } else if (strncmp(line, "selftest", 8) == 0) {
            uint8_t out[RS_SHA256_LEN];
            rs_sha256_t s;
            printf("crc %04x\n", rs_crc16_mcrf4xx(0xFFFF, (const uint8_t *)"123456789", 9));
            rs_sha256_init(&s);
            rs_sha256_update(&s, (const uint8_t *)"abc", 3);
            rs_sha256_final(&s, out);
            printf("sha256 ");
            write_hex(out, RS_SHA256_LEN);
            rs_hmac_sha256((const uint8_t *)"key", 3,
                           (const uint8_t *)"The quick brown fox jumps over the lazy dog", 43,
                           out);
            printf("\nhmac ");
            write_hex(out, RS_SHA256_LEN);
            {   /* RFC 7748 section 6.1: Alice's secret -> her public key, and the shared secret */
                static const char *alice = "77076d0a7318a57d3c16c17251b26645"
                                           "df4c2f87ebc0992ab177fba51db92c2a";
                static const char *bob_pub = "de9edb7d7b7dc1b4d35b61c2ece43537"
                                             "3f8343c85b78674dadfc7e146f882b4f";
                uint8_t a[32], b[32], o[32];
                parse_hex(alice, a, 32);
                parse_hex(bob_pub, b, 32);
                crypto_x25519_public_key(o, a);
                printf("\nx25519_public ");
                write_hex(o, 32);
                crypto_x25519(o, a, b);
                printf("\nx25519_shared ");
                write_hex(o, 32);
            }
            printf("\n");
        } else {
            goto bad;
        }
        fflush(stdout);
    }
    return 0;
bad:
    fprintf(stderr, "vector_runner: cannot parse line: %s", line);
    return 2;
}

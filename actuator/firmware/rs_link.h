/* roadshield actuator link: the device side of the protocol and its safety rules.
 *
 * Portable C99: no dynamic allocation, no floating point, integer per-mille outputs.
 * The same rules as actuator/device.py (the Python simulator); the JSON files in actuator/vectors
 * run through both keep them identical. Wire format: actuator/PROTOCOL.md.
 *
 * Use: rs_link_init() once, rs_link_boot() at power-up, rs_link_rx_byte() for every
 * received byte, rs_link_tick() from the main loop (every few ms), then drive the
 * brake / steering / throttle outputs from the fields brake, steering, throttle. */
#ifndef RS_LINK_H
#define RS_LINK_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define RS_VERSION 2
#define RS_FW_MAJOR 2
#define RS_FW_MINOR 0
#define RS_FW_PATCH 0
#define RS_KEY_LEN 32
#define RS_NONCE_LEN 8
#define RS_TAG_LEN 8
#define RS_HEADER_LEN 6
#define RS_PUB_LEN 32
#define RS_MAX_PAYLOAD 35 /* KEY: u16 seq, u8 op, 32-byte public key */
#define RS_OVERHEAD 20
#define RS_MAX_RAW (RS_OVERHEAD + RS_MAX_PAYLOAD)
#define RS_RX_MAX 64
#define RS_FLAG_RETRY 0x01
#define RS_FLAG_FROM_DEVICE 0x80

enum { RS_HELLO = 1, RS_HEARTBEAT, RS_SETPOINT, RS_COMMAND, RS_ACK, RS_STATUS, RS_FAULT,
       RS_PROVISION, RS_KEY, RS_REKEY, RS_JOIN };
enum { RS_STATE_SAFE = 0, RS_STATE_ARMED = 1 };
enum { RS_FAULT_NONE = 0, RS_FAULT_BOOT, RS_FAULT_LINK_TIMEOUT, RS_FAULT_HOST_BRAKE,
       RS_FAULT_DISARMED, RS_FAULT_WATCHDOG_RESET };
enum { RS_OP_ARM = 1, RS_OP_DISARM, RS_OP_BRAKE, RS_OP_CONFIG };
/* ACK / KEY op of PROVISION and REKEY: the message type with bit 7 set */
#define RS_OP_PROVISION (0x80 | RS_PROVISION)
#define RS_OP_REKEY (0x80 | RS_REKEY)
enum { RS_RESULT_OK = 0, RS_RESULT_REFUSED, RS_RESULT_BAD_ARGS, RS_RESULT_SEQ_REUSED };
#define RS_HELLO_PROVISIONED 0x01
#define RS_HELLO_PROVISION_MODE 0x02
/* counters, in the order of device.COUNTER_NAMES */
enum { RS_C_BAD_FRAME = 0, RS_C_BAD_CRC, RS_C_BAD_TAG, RS_C_REPLAY, RS_C_REFUSED, RS_C_STALE,
       RS_C_EXPIRED, RS_C_DUP, RS_C_ACCEPTED, RS_NUM_COUNTERS };

#define RS_FULL 1000
#define RS_HELLO_INTERVAL_MS 200
#define RS_HEARTBEAT_INTERVAL_MS 100

/* write one encoded frame (delimiter included) to the serial port */
typedef void (*rs_write_fn)(void *ctx, const uint8_t *data, uint16_t len);
/* fill len fresh, unpredictable bytes: 8 per session nonce, 32 per key agreement */
typedef void (*rs_random_fn)(void *ctx, uint8_t *out, uint8_t len);
/* called with 1 before each X25519 step and 0 after the agreement (seconds on an AVR) */
typedef void (*rs_busy_fn)(void *ctx, uint8_t busy);

typedef struct {
    uint8_t key[RS_KEY_LEN];
    uint8_t session_key[RS_KEY_LEN]; /* the hello key until JOIN, then the session key */
    uint8_t nonce[RS_NONCE_LEN];
    uint8_t provisioned;
    uint8_t provision_mode; /* booted with the provisioning button held */
    uint8_t key_changed; /* PROVISION / REKEY stored a new key: the glue persists it */
    rs_write_fn write;
    rs_random_fn random;
    rs_busy_fn busy; /* optional; set after rs_link_init */
    void *ctx;
    /* configuration (COMMAND config, only while safe) */
    uint16_t steer_limit, slew, max_throttle, link_timeout;
    uint16_t counters[RS_NUM_COUNTERS];
    /* state and outputs */
    uint8_t state, fault;
    uint16_t brake, throttle;
    int16_t steering, target;
    /* session */
    uint16_t tx_seq;
    uint32_t tx_counter, rx_counter;
    uint8_t host_seen, hb_since_safe;
    uint32_t hello_t, hb_t, last_hb, steer_t;
    /* latest setpoint */
    uint16_t sp_brake, sp_throttle, sp_ttl, sp_seq;
    int16_t sp_steering;
    uint8_t sp_active, sp_seen;
    uint32_t sp_t;
    /* last command, for de-duplication of retries (op and arguments byte for byte) */
    uint8_t cmd_seen, cmd_result;
    uint8_t cmd_payload[9];
    uint16_t cmd_seq;
    /* receive framing */
    uint8_t rx_buf[RS_RX_MAX];
    uint8_t rx_len, rx_overflow;
} rs_link_t;

/* key: the 32-byte device key, or NULL when unprovisioned (factory key of zeros).
 * boot_fault: RS_FAULT_BOOT, or RS_FAULT_WATCHDOG_RESET after a watchdog reset.
 * provision_button: nonzero when the provisioning button was held at boot. */
void rs_link_init(rs_link_t *l, const uint8_t *key, uint8_t boot_fault,
                  uint8_t provision_button, rs_write_fn write, rs_random_fn random, void *ctx);
void rs_link_boot(rs_link_t *l, uint32_t now_ms);
void rs_link_rx_byte(rs_link_t *l, uint8_t byte, uint32_t now_ms);
void rs_link_tick(rs_link_t *l, uint32_t now_ms);

/* exposed for the host test harness */
uint16_t rs_crc16_mcrf4xx(uint16_t crc, const uint8_t *data, uint16_t len);
int16_t rs_cobs_decode(const uint8_t *in, uint8_t n, uint8_t *out, uint8_t cap);
uint8_t rs_cobs_encode(const uint8_t *in, uint8_t n, uint8_t *out);

#ifdef __cplusplus
}
#endif
#endif

/* Device side of the roadshield actuator link; mirrors actuator/device.py. */
#include "rs_link.h"

#include <string.h>

#include "monocypher.h"
#include "rs_sha256.h"

/* per-message CRC extra bytes: actuator.protocol.CRC_EXTRA */
static uint8_t crc_extra(uint8_t type) {
    switch (type) {
    case RS_HELLO: return 0x8a;
    case RS_HEARTBEAT: return 0xa8;
    case RS_SETPOINT: return 0x6b;
    case RS_COMMAND: return 0x57;
    case RS_ACK: return 0x94;
    case RS_STATUS: return 0x37;
    case RS_FAULT: return 0x8e;
    case RS_PROVISION: return 0xbf;
    case RS_KEY: return 0x6b;
    case RS_REKEY: return 0xea;
    case RS_JOIN: return 0x5c;
    default: return 0;
    }
}

/* payload sizes of the messages a host may send (0: not accepted from a host) */
static uint8_t host_payload_len(uint8_t type) {
    switch (type) {
    case RS_HEARTBEAT: return 2;
    case RS_SETPOINT: return 8;
    case RS_COMMAND: return 9;
    case RS_PROVISION: return RS_PUB_LEN;
    case RS_REKEY: return RS_PUB_LEN;
    case RS_JOIN: return RS_NONCE_LEN;
    default: return 0;
    }
}

uint16_t rs_crc16_mcrf4xx(uint16_t crc, const uint8_t *data, uint16_t len) {
    while (len--) {
        uint8_t tmp = (uint8_t)(*data++ ^ (uint8_t)crc);
        tmp ^= (uint8_t)(tmp << 4);
        crc = (uint16_t)((crc >> 8) ^ ((uint16_t)tmp << 8) ^ ((uint16_t)tmp << 3) ^ (tmp >> 4));
    }
    return crc;
}

uint8_t rs_cobs_encode(const uint8_t *in, uint8_t n, uint8_t *out) {
    uint8_t code_at = 0, w = 1, code = 1, i;
    for (i = 0; i < n; i++) {
        if (in[i] == 0) {
            out[code_at] = code;
            code_at = w++;
            code = 1;
        } else {
            out[w++] = in[i];
            if (++code == 255) {
                out[code_at] = code;
                code_at = w++;
                code = 1;
            }
        }
    }
    out[code_at] = code;
    return w;
}

int16_t rs_cobs_decode(const uint8_t *in, uint8_t n, uint8_t *out, uint8_t cap) {
    uint8_t i = 0, w = 0;
    while (i < n) {
        uint8_t code = in[i], j;
        if (code == 0 || (uint16_t)i + code > n) return -1;
        for (j = 1; j < code; j++) {
            if (in[i + j] == 0 || w >= cap) return -1;
            out[w++] = in[i + j];
        }
        i = (uint8_t)(i + code);
        if (code != 255 && i < n) {
            if (w >= cap) return -1;
            out[w++] = 0;
        }
    }
    return w;
}

static uint32_t elapsed(uint32_t now, uint32_t then) { return now - then; }

static uint8_t newer(uint16_t a, uint16_t b) {
    uint16_t d = (uint16_t)(a - b);
    return d > 0 && d < 0x8000;
}

/* counters wrap at 65536 (a client reads differences mod 2^16, see PROTOCOL.md) */
static void count(rs_link_t *l, uint8_t which) { l->counters[which]++; }

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | ((uint16_t)p[1] << 8)); }
static uint32_t get32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

static void emit(rs_link_t *l, uint8_t type, const uint8_t *payload, uint8_t len) {
    uint8_t raw[RS_MAX_RAW];
    uint8_t enc[RS_MAX_RAW + 2]; /* one COBS code byte and the delimiter */
    uint8_t mac[RS_SHA256_LEN];
    uint8_t n = 0, body;
    uint16_t crc;
    l->tx_counter++;
    l->tx_seq++;
    raw[n++] = RS_VERSION;
    raw[n++] = type;
    raw[n++] = RS_FLAG_FROM_DEVICE;
    put16(raw + n, l->tx_seq); n += 2;
    raw[n++] = len;
    memcpy(raw + n, payload, len); n += len;
    put16(raw + n, (uint16_t)l->tx_counter);
    put16(raw + n + 2, (uint16_t)(l->tx_counter >> 16)); n += 4;
    body = n;
    rs_hmac_sha256(l->session_key, RS_KEY_LEN, raw, body, mac);
    memcpy(raw + n, mac, RS_TAG_LEN); n += RS_TAG_LEN;
    crc = rs_crc16_mcrf4xx(0xFFFF, raw, n);
    {
        uint8_t extra = crc_extra(type);
        crc = rs_crc16_mcrf4xx(crc, &extra, 1);
    }
    put16(raw + n, crc); n += 2;
    n = rs_cobs_encode(raw, n, enc);
    enc[n++] = 0;
    l->write(l->ctx, enc, n);
}

static void emit_hello(rs_link_t *l) {
    uint8_t p[12];
    p[0] = RS_FW_MAJOR; p[1] = RS_FW_MINOR; p[2] = RS_FW_PATCH;
    p[3] = (uint8_t)((l->provisioned ? RS_HELLO_PROVISIONED : 0) |
                     (l->provision_mode ? RS_HELLO_PROVISION_MODE : 0));
    memcpy(p + 4, l->nonce, RS_NONCE_LEN);
    emit(l, RS_HELLO, p, sizeof p);
}

static void emit_status(rs_link_t *l) {
    uint8_t p[21];
    p[0] = l->state;
    p[1] = l->fault;
    p[2] = (uint8_t)((l->sp_active ? 1 : 0) | (l->provisioned ? 2 : 0));
    put16(p + 3, l->brake);
    put16(p + 5, (uint16_t)l->steering);
    put16(p + 7, l->throttle);
    put16(p + 9, l->sp_seq);
    put16(p + 11, l->counters[RS_C_BAD_FRAME]);
    put16(p + 13, l->counters[RS_C_BAD_CRC]);
    put16(p + 15, l->counters[RS_C_BAD_TAG]);
    put16(p + 17, l->counters[RS_C_REPLAY]);
    put16(p + 19, l->counters[RS_C_REFUSED]);
    emit(l, RS_STATUS, p, sizeof p);
}

static void emit_ack(rs_link_t *l, uint16_t seq, uint8_t op, uint8_t result) {
    uint8_t p[4];
    put16(p, seq);
    p[2] = op;
    p[3] = result;
    emit(l, RS_ACK, p, sizeof p);
}

static const uint8_t factory_key[RS_KEY_LEN] = {0};

/* the key sessions derive from: the factory key in provisioning mode */
static const uint8_t *link_key(const rs_link_t *l) {
    return l->provision_mode ? factory_key : l->key;
}

static void start_session(rs_link_t *l, uint32_t now) {
    uint8_t msg[8 + RS_NONCE_LEN] = {'R', 'S', 'H', 'E', 'L', 'L', 'O', '2'};
    l->random(l->ctx, l->nonce, RS_NONCE_LEN);
    memcpy(msg + 8, l->nonce, RS_NONCE_LEN);
    /* the hello key: HELLO and JOIN only; JOIN's host nonce makes the session key */
    rs_hmac_sha256(link_key(l), RS_KEY_LEN, msg, sizeof msg, l->session_key);
    l->tx_counter = l->rx_counter = 0;
    l->host_seen = 0;
    l->sp_seen = l->sp_active = 0;
    l->cmd_seen = 0;
    l->hello_t = now;
    emit_hello(l);
}

static void update_outputs(rs_link_t *l, uint32_t now) {
    uint32_t dt, step;
    if (l->sp_active && elapsed(now, l->sp_t) >= l->sp_ttl) {
        l->sp_active = 0;
        count(l, RS_C_EXPIRED);
    }
    if (l->state == RS_STATE_ARMED && l->sp_active) {
        int16_t lim = (int16_t)l->steer_limit;
        l->brake = l->sp_brake;
        l->throttle = l->sp_throttle < l->max_throttle ? l->sp_throttle : l->max_throttle;
        l->target = l->sp_steering > lim ? lim : (l->sp_steering < -lim ? -lim : l->sp_steering);
    } else {
        l->brake = RS_FULL;
        l->throttle = 0;
        l->target = 0;
    }
    if (l->steering == l->target) {
        l->steer_t = now;
        return;
    }
    dt = elapsed(now, l->steer_t);
    if (dt > 1000) dt = 1000;
    step = (uint32_t)l->slew * dt / 1000;
    if (step > 0) {
        int32_t diff = (int32_t)l->target - l->steering;
        if (diff > (int32_t)step) diff = (int32_t)step;
        if (diff < -(int32_t)step) diff = -(int32_t)step;
        l->steering = (int16_t)(l->steering + diff);
        l->steer_t = now;
    }
}

static void enter_safe(rs_link_t *l, uint8_t fault, uint32_t now) {
    uint8_t was_armed = l->state == RS_STATE_ARMED;
    l->state = RS_STATE_SAFE;
    l->fault = fault;
    l->sp_active = 0;
    l->hb_since_safe = 0;
    update_outputs(l, now);
    if (was_armed) {
        uint8_t p[2] = {fault, RS_STATE_SAFE};
        emit(l, RS_FAULT, p, 2);
    }
}

void rs_link_init(rs_link_t *l, const uint8_t *key, uint8_t boot_fault,
                  uint8_t provision_button, rs_write_fn write, rs_random_fn random, void *ctx) {
    memset(l, 0, sizeof *l);
    if (key) memcpy(l->key, key, RS_KEY_LEN);
    l->provisioned = key != 0;
    l->provision_mode = provision_button ? 1 : 0;
    l->write = write;
    l->random = random;
    l->ctx = ctx;
    l->steer_limit = 300;
    l->slew = 500;
    l->max_throttle = RS_FULL;
    l->link_timeout = 250;
    l->state = RS_STATE_SAFE;
    l->fault = boot_fault;
    l->brake = RS_FULL;
}

void rs_link_boot(rs_link_t *l, uint32_t now) {
    l->steer_t = now;
    start_session(l, now);
}

void rs_link_tick(rs_link_t *l, uint32_t now) {
    if (l->host_seen && elapsed(now, l->last_hb) > l->link_timeout) {
        enter_safe(l, RS_FAULT_LINK_TIMEOUT, now);
        start_session(l, now);
    } else if (!l->host_seen && elapsed(now, l->hello_t) >= RS_HELLO_INTERVAL_MS) {
        l->hello_t = now;
        emit_hello(l);
    }
    if (l->host_seen && elapsed(now, l->hb_t) >= RS_HEARTBEAT_INTERVAL_MS) {
        uint8_t p[2] = {l->state, l->fault};
        l->hb_t = now;
        emit(l, RS_HEARTBEAT, p, 2);
    }
    update_outputs(l, now);
}

static void on_setpoint(rs_link_t *l, uint16_t seq, const uint8_t *p, uint32_t now) {
    uint16_t brake = get16(p), throttle = get16(p + 4), ttl = get16(p + 6);
    int16_t steering = (int16_t)get16(p + 2);
    if (l->state != RS_STATE_ARMED || brake > RS_FULL || throttle > RS_FULL ||
        steering > RS_FULL || steering < -RS_FULL) {
        count(l, RS_C_REFUSED);
    } else if (ttl == 0) {
        count(l, RS_C_EXPIRED);
    } else if (l->sp_seen && !newer(seq, l->sp_seq)) {
        count(l, RS_C_STALE);
    } else {
        l->sp_brake = brake;
        l->sp_steering = steering;
        l->sp_throttle = throttle;
        l->sp_ttl = ttl;
        l->sp_seq = seq;
        l->sp_t = now;
        l->sp_seen = l->sp_active = 1;
    }
    update_outputs(l, now);
    emit_status(l);
}

static uint8_t execute(rs_link_t *l, const uint8_t *p, uint32_t now) {
    uint8_t op = p[0];
    uint16_t a0 = get16(p + 1), a1 = get16(p + 3), a2 = get16(p + 5), a3 = get16(p + 7);
    if (op == RS_OP_ARM) {
        uint8_t fresh = l->hb_since_safe && elapsed(now, l->last_hb) <= l->link_timeout;
        if (!(l->provisioned && !l->provision_mode && fresh)) return RS_RESULT_REFUSED;
        l->state = RS_STATE_ARMED;
        l->fault = RS_FAULT_NONE;
        l->sp_active = 0;
        update_outputs(l, now);
        return RS_RESULT_OK;
    }
    if (op == RS_OP_DISARM || op == RS_OP_BRAKE) {
        enter_safe(l, op == RS_OP_DISARM ? RS_FAULT_DISARMED : RS_FAULT_HOST_BRAKE, now);
        return RS_RESULT_OK;
    }
    if (op == RS_OP_CONFIG) {
        if (l->state != RS_STATE_SAFE) return RS_RESULT_REFUSED;
        if (a0 > RS_FULL || a1 < 1 || a1 > 10000 || a2 > RS_FULL || a3 < 50 || a3 > 1000)
            return RS_RESULT_BAD_ARGS;
        l->steer_limit = a0;
        l->slew = a1;
        l->max_throttle = a2;
        l->link_timeout = a3;
        return RS_RESULT_OK;
    }
    return RS_RESULT_BAD_ARGS;
}

static void on_command(rs_link_t *l, uint16_t seq, uint8_t flags, const uint8_t *p,
                       uint32_t now) {
    uint8_t result;
    if (l->cmd_seen && seq == l->cmd_seq) {
        if ((flags & RS_FLAG_RETRY) && memcmp(p, l->cmd_payload, sizeof l->cmd_payload) == 0) {
            count(l, RS_C_DUP); /* a true retry: answer again, do not redo */
            emit_ack(l, seq, p[0], l->cmd_result);
        } else { /* same seq, other command (or no retry flag): never silently dropped */
            count(l, RS_C_REFUSED);
            emit_ack(l, seq, p[0], RS_RESULT_SEQ_REUSED);
        }
        return;
    }
    result = execute(l, p, now);
    l->cmd_seen = 1;
    l->cmd_seq = seq;
    memcpy(l->cmd_payload, p, sizeof l->cmd_payload);
    l->cmd_result = result;
    if (result != RS_RESULT_OK) count(l, RS_C_REFUSED);
    emit_ack(l, seq, p[0], result);
    emit_status(l);
}

static void on_join(rs_link_t *l, const uint8_t *host_nonce, uint32_t now) {
    uint8_t msg[7 + 2 * RS_NONCE_LEN] = {'R', 'S', 'L', 'I', 'N', 'K', '2'};
    uint8_t p[2];
    memcpy(msg + 7, l->nonce, RS_NONCE_LEN);
    memcpy(msg + 7 + RS_NONCE_LEN, host_nonce, RS_NONCE_LEN);
    rs_hmac_sha256(link_key(l), RS_KEY_LEN, msg, sizeof msg, l->session_key);
    l->host_seen = 1;
    l->last_hb = l->hb_t = now;
    p[0] = l->state;
    p[1] = l->fault;
    emit(l, RS_HEARTBEAT, p, 2); /* the first frame under the new key confirms it */
}

/* PROVISION (button boot only) or REKEY (current key, SAFE): X25519, then re-key.
 * device_key = HMAC-SHA256(shared, "RSKEY2" || host_public || device_public) */
static void on_key_agreement(rs_link_t *l, uint8_t type, uint16_t seq, const uint8_t *host_pub,
                             uint32_t now) {
    uint8_t secret[RS_PUB_LEN], shared[RS_PUB_LEN];
    uint8_t msg[6 + 2 * RS_PUB_LEN] = {'R', 'S', 'K', 'E', 'Y', '2'};
    uint8_t reply[3 + RS_PUB_LEN];
    uint8_t op = type == RS_PROVISION ? RS_OP_PROVISION : RS_OP_REKEY;
    uint8_t ok, i, nonzero = 0;
    if (type == RS_PROVISION) {
        ok = l->provision_mode;
    } else {
        ok = l->provisioned && !l->provision_mode && l->state == RS_STATE_SAFE;
    }
    if (!ok) {
        count(l, RS_C_REFUSED);
        emit_ack(l, seq, op, RS_RESULT_REFUSED);
        return;
    }
    l->random(l->ctx, secret, RS_PUB_LEN);
    if (l->busy) l->busy(l->ctx, 1);
    crypto_x25519_public_key(msg + 6 + RS_PUB_LEN, secret);
    if (l->busy) l->busy(l->ctx, 1); /* each step takes seconds on an AVR */
    crypto_x25519(shared, secret, host_pub);
    crypto_wipe(secret, sizeof secret);
    if (l->busy) l->busy(l->ctx, 0);
    for (i = 0; i < RS_PUB_LEN; i++) nonzero |= shared[i];
    if (!nonzero) { /* a low-order point from the host: no key from it */
        count(l, RS_C_REFUSED);
        emit_ack(l, seq, op, RS_RESULT_BAD_ARGS);
        return;
    }
    memcpy(msg + 6, host_pub, RS_PUB_LEN);
    put16(reply, seq);
    reply[2] = op;
    memcpy(reply + 3, msg + 6 + RS_PUB_LEN, RS_PUB_LEN);
    emit(l, RS_KEY, reply, sizeof reply); /* under the old key, which the host has */
    rs_hmac_sha256(shared, RS_PUB_LEN, msg, sizeof msg, l->key);
    crypto_wipe(shared, sizeof shared);
    l->provisioned = 1;
    l->provision_mode = 0; /* one key per button boot */
    l->key_changed = 1;
    start_session(l, now); /* re-key at once: the old session ends here */
}

static void handle(rs_link_t *l, uint32_t now) {
    uint8_t raw[RS_MAX_RAW];
    uint8_t mac[RS_SHA256_LEN];
    uint8_t type, flags, len, extra, i, diff = 0;
    uint16_t seq, crc;
    uint32_t counter;
    int16_t n = rs_cobs_decode(l->rx_buf, l->rx_len, raw, sizeof raw);
    if (n < RS_OVERHEAD || raw[0] != RS_VERSION) { count(l, RS_C_BAD_FRAME); return; }
    type = raw[1];
    flags = raw[2];
    seq = get16(raw + 3);
    len = raw[5];
    if (len > RS_MAX_PAYLOAD || n != RS_OVERHEAD + len || crc_extra(type) == 0) {
        count(l, RS_C_BAD_FRAME);
        return;
    }
    extra = crc_extra(type);
    crc = rs_crc16_mcrf4xx(rs_crc16_mcrf4xx(0xFFFF, raw, (uint16_t)(n - 2)), &extra, 1);
    if (crc != get16(raw + n - 2)) { count(l, RS_C_BAD_CRC); return; }
    if (flags & RS_FLAG_FROM_DEVICE) { count(l, RS_C_BAD_FRAME); return; }
    rs_hmac_sha256(l->session_key, RS_KEY_LEN, raw, (uint16_t)(RS_HEADER_LEN + len + 4), mac);
    for (i = 0; i < RS_TAG_LEN; i++) diff |= (uint8_t)(mac[i] ^ raw[RS_HEADER_LEN + len + 4 + i]);
    if (diff) { count(l, RS_C_BAD_TAG); return; }
    counter = get32(raw + RS_HEADER_LEN + len);
    if (counter <= l->rx_counter) { count(l, RS_C_REPLAY); return; }
    /* before JOIN only JOIN; after it every host type but JOIN (device-only types never) */
    if ((l->host_seen ? type == RS_JOIN : type != RS_JOIN) || host_payload_len(type) == 0 ||
        host_payload_len(type) != len) {
        count(l, RS_C_BAD_FRAME);
        return;
    }
    l->rx_counter = counter;
    count(l, RS_C_ACCEPTED);
    if (type == RS_JOIN) {
        on_join(l, raw + RS_HEADER_LEN, now);
    } else if (type == RS_HEARTBEAT) {
        l->last_hb = now;
        l->hb_since_safe = 1;
    } else if (type == RS_SETPOINT) {
        on_setpoint(l, seq, raw + RS_HEADER_LEN, now);
    } else if (type == RS_COMMAND) {
        on_command(l, seq, flags, raw + RS_HEADER_LEN, now);
    } else {
        on_key_agreement(l, type, seq, raw + RS_HEADER_LEN, now);
    }
}

void rs_link_rx_byte(rs_link_t *l, uint8_t byte, uint32_t now) {
    if (byte == 0) {
        if (l->rx_overflow) {
            count(l, RS_C_BAD_FRAME);
        } else if (l->rx_len) {
            handle(l, now);
        }
        l->rx_len = 0;
        l->rx_overflow = 0;
    } else if (!l->rx_overflow) {
        if (l->rx_len >= RS_RX_MAX) {
            l->rx_overflow = 1;
            l->rx_len = 0;
        } else {
            l->rx_buf[l->rx_len++] = byte;
        }
    }
}

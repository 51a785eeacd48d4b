// roadshield actuator firmware: thin Arduino glue around the portable C core (rs_link.c).
//
// Boards: AVR (Uno, Nano; avr/wdt.h) or RP2040 (arduino-pico core; hardware watchdog).
// The core does the protocol and the safety rules (link watchdog: no valid heartbeat for
// 250 ms -> brake on, steering neutral, latched until re-armed). This file adds what only
// the board can do: the serial port, the servos, the key in EEPROM, a nonce from
// hardware noise, and the hardware watchdog, which resets the MCU if loop() ever stalls
// for 250 ms (the core then boots SAFE with fault "watchdog reset").
//
// Pins: brake servo D9, steering servo D10 (1000..2000 us), throttle-limit PWM D5.
// Build: see actuator/README.md (arduino-cli needs the sketch in a folder of its name).

#include <EEPROM.h>
#include <Servo.h>

#include "rs_link.h"
#include "rs_sha256.h"

#if defined(ARDUINO_ARCH_AVR)
#include <avr/wdt.h>
#elif defined(ARDUINO_ARCH_RP2040)
#include <hardware/watchdog.h>
#else
#error "roadshield_actuator supports AVR and RP2040 boards"
#endif

static const uint8_t PIN_BRAKE = 9;
static const uint8_t PIN_STEER = 10;
static const uint8_t PIN_THROTTLE = 5;
static const uint16_t BRAKE_RELEASED_DEG = 20;  // servo angle with brake 0
static const uint16_t BRAKE_FULL_DEG = 160;     // servo angle with brake 1000

// EEPROM layout: "RSK1" magic, the 32-byte key, a 32-bit boot counter.
static const int EE_MAGIC = 0;
static const int EE_KEY = 4;
static const int EE_BOOTS = EE_KEY + RS_KEY_LEN;
static const int EE_SIZE = EE_BOOTS + 4;

static rs_link_t link;
static Servo brake_servo;
static Servo steer_servo;
static uint32_t boot_count = 0;
static uint8_t sessions = 0;

static void ee_commit() {
#if defined(ARDUINO_ARCH_RP2040)
  EEPROM.commit();  // the RP2040 core emulates EEPROM in flash
#endif
}

static bool load_key(uint8_t key[RS_KEY_LEN]) {
  if (EEPROM.read(EE_MAGIC) != 'R' || EEPROM.read(EE_MAGIC + 1) != 'S' ||
      EEPROM.read(EE_MAGIC + 2) != 'K' || EEPROM.read(EE_MAGIC + 3) != '1') {
    return false;
  }
  for (int i = 0; i < RS_KEY_LEN; i++) key[i] = EEPROM.read(EE_KEY + i);
  return true;
}

static void store_key(const uint8_t key[RS_KEY_LEN]) {
  for (int i = 0; i < RS_KEY_LEN; i++) EEPROM.write(EE_KEY + i, key[i]);
  EEPROM.write(EE_MAGIC, 'R');
  EEPROM.write(EE_MAGIC + 1, 'S');
  EEPROM.write(EE_MAGIC + 2, 'K');
  EEPROM.write(EE_MAGIC + 3, '1');
  ee_commit();
}

static void serial_write(void *ctx, const uint8_t *data, uint16_t len) {
  (void)ctx;
  Serial.write(data, len);
}

// A fresh nonce per session: SHA-256 over the boot counter (never repeats across
// reboots), the session number, timer jitter and ADC noise from a floating pin.
static void make_nonce(void *ctx, uint8_t out[RS_NONCE_LEN]) {
  (void)ctx;
  rs_sha256_t s;
  uint8_t digest[RS_SHA256_LEN];
  uint32_t mix[6];
  mix[0] = boot_count;
  mix[1] = ++sessions;
  mix[2] = micros();
  mix[3] = (uint32_t)analogRead(A0) << 16 | (uint32_t)analogRead(A1);
#if defined(ARDUINO_ARCH_RP2040)
  mix[4] = rp2040.hwrand32();
#else
  mix[4] = (uint32_t)analogRead(A2) << 16 | (uint32_t)analogRead(A3);
#endif
  mix[5] = micros();
  rs_sha256_init(&s);
  rs_sha256_update(&s, (const uint8_t *)mix, sizeof mix);
  rs_sha256_final(&s, digest);
  memcpy(out, digest, RS_NONCE_LEN);
}

static uint8_t watchdog_was_reset() {
#if defined(ARDUINO_ARCH_AVR)
  uint8_t flag = MCUSR & (1 << WDRF);
  MCUSR = 0;
  wdt_disable();  // a watchdog reset leaves it running: stop it until setup() is done
  return flag != 0;
#else
  return watchdog_caused_reboot();
#endif
}

static void watchdog_start() {
#if defined(ARDUINO_ARCH_AVR)
  wdt_enable(WDTO_250MS);
#else
  watchdog_enable(250, true);
#endif
}

static void watchdog_kick() {
#if defined(ARDUINO_ARCH_AVR)
  wdt_reset();
#else
  watchdog_update();
#endif
}

static void drive_outputs() {
  // integer maps only: no floating point on the AVR
  uint32_t deg = BRAKE_RELEASED_DEG +
                 (uint32_t)(BRAKE_FULL_DEG - BRAKE_RELEASED_DEG) * link.brake / RS_FULL;
  brake_servo.write((int)deg);
  steer_servo.writeMicroseconds(1500 + link.steering / 2);
  analogWrite(PIN_THROTTLE, (int)((uint32_t)link.throttle * 255 / RS_FULL));
}

void setup() {
  uint8_t wd = watchdog_was_reset();
  uint8_t key[RS_KEY_LEN];
  bool have_key;
#if defined(ARDUINO_ARCH_RP2040)
  EEPROM.begin(EE_SIZE);
#endif
  // safe outputs first, before anything that could fail
  brake_servo.attach(PIN_BRAKE);
  steer_servo.attach(PIN_STEER);
  pinMode(PIN_THROTTLE, OUTPUT);
  analogWrite(PIN_THROTTLE, 0);
  brake_servo.write(BRAKE_FULL_DEG);
  steer_servo.writeMicroseconds(1500);

  for (int i = 0; i < 4; i++) boot_count |= (uint32_t)EEPROM.read(EE_BOOTS + i) << (8 * i);
  boot_count++;
  for (int i = 0; i < 4; i++) EEPROM.write(EE_BOOTS + i, (uint8_t)(boot_count >> (8 * i)));
  ee_commit();

  Serial.begin(115200);
  have_key = load_key(key);
  rs_link_init(&link, have_key ? key : 0, wd ? RS_FAULT_WATCHDOG_RESET : RS_FAULT_BOOT,
               serial_write, make_nonce, 0);
  watchdog_start();
  rs_link_boot(&link, millis());
}

void loop() {
  uint32_t now = millis();
  while (Serial.available() > 0) {
    rs_link_rx_byte(&link, (uint8_t)Serial.read(), now);
  }
  rs_link_tick(&link, now);
  if (link.key_changed) {
    store_key(link.key);
    link.key_changed = 0;
  }
  drive_outputs();
  watchdog_kick();  // only reached while loop() keeps running
}

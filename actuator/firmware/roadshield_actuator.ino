// roadshield actuator firmware: thin Arduino glue around the portable C core (rs_link.c).
//
// Boards: AVR with at least 64 KB flash (Arduino Mega 2560; avr/wdt.h) or RP2040
// (arduino-pico core; hardware watchdog). The X25519 key agreement (Monocypher) alone
// is about 36 KB of AVR code, so a 32 KB Uno / Nano (ATmega328P) cannot hold it.
// The core does the protocol and the safety rules (link watchdog: no valid heartbeat for
// 250 ms -> brake on, steering neutral, latched until re-armed). This file adds what only
// the board can do: the serial port, the servos, the key in EEPROM, random bytes from
// hardware noise, the provisioning button, and the hardware watchdog, which resets the
// MCU if loop() ever stalls for 250 ms (the core then boots SAFE with fault "watchdog
// reset"). During an X25519 step (about 4.8 s each on a 16 MHz AVR, two per key
// agreement; the board is SAFE then) the watchdog is stretched to 8 s, not turned off.
//
// Pins: brake servo D9, steering servo D10 (1000..2000 us), throttle-limit PWM D5,
// provisioning button D2 to GND (internal pull-up): held at power-up or reset, the
// board keys its session with the factory key and accepts one PROVISION.
// Build: see actuator/README.md (arduino-cli needs the sketch in a folder of its name).

#include <EEPROM.h>
#include <Servo.h>

#include "rs_link.h"
#include "rs_sha256.h"

#if defined(ARDUINO_ARCH_AVR)
#include <avr/wdt.h>
#if defined(FLASHEND) && FLASHEND < 0xFFFF
#error "roadshield_actuator needs >= 64 KB flash (X25519): use an Arduino Mega 2560 or RP2040"
#endif
#elif defined(ARDUINO_ARCH_RP2040)
#include <hardware/watchdog.h>
#else
#error "roadshield_actuator supports AVR and RP2040 boards"
#endif

static const uint8_t PIN_BRAKE = 9;
static const uint8_t PIN_STEER = 10;
static const uint8_t PIN_THROTTLE = 5;
static const uint8_t PIN_PROVISION = 2;  // button / jumper to GND; read only at boot
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
static uint32_t draws = 0;

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

// Fresh bytes for nonces and X25519 secrets: SHA-256 blocks over the boot counter (never
// repeats across reboots), a draw counter, timer jitter and ADC noise from floating pins.
// The ADC noise is the only physical entropy on an AVR: see actuator/README.md.
static void make_random(void *ctx, uint8_t *out, uint8_t len) {
  (void)ctx;
  while (len > 0) {
    rs_sha256_t s;
    uint8_t digest[RS_SHA256_LEN];
    uint32_t mix[7];
    uint8_t n = len < RS_SHA256_LEN ? len : RS_SHA256_LEN;
    mix[0] = boot_count;
    mix[1] = ++draws;
    mix[2] = micros();
    mix[3] = (uint32_t)analogRead(A0) << 16 | (uint32_t)analogRead(A1);
#if defined(ARDUINO_ARCH_RP2040)
    mix[4] = rp2040.hwrand32();
    mix[5] = rp2040.hwrand32();
#else
    mix[4] = (uint32_t)analogRead(A2) << 16 | (uint32_t)analogRead(A3);
    mix[5] = (uint32_t)analogRead(A0) << 16 | (uint32_t)analogRead(A2);
#endif
    mix[6] = micros();
    rs_sha256_init(&s);
    rs_sha256_update(&s, (const uint8_t *)mix, sizeof mix);
    rs_sha256_final(&s, digest);
    memcpy(out, digest, n);
    out += n;
    len = (uint8_t)(len - n);
  }
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

// The core calls this before each X25519 step (1) and after the agreement (0): the
// watchdog is stretched to its 8 s maximum, never disabled, so a hang still resets.
static void keyx_busy(void *ctx, uint8_t busy) {
  (void)ctx;
#if defined(ARDUINO_ARCH_AVR)
  wdt_enable(busy ? WDTO_8S : WDTO_250MS);
#else
  watchdog_enable(busy ? 8000 : 250, true);
#endif
}

// Provisioning needs someone at the board: D2 held low through 20 ms at boot.
static uint8_t provision_button_held() {
  pinMode(PIN_PROVISION, INPUT_PULLUP);
  delay(5);  // let the pull-up charge the line
  for (uint8_t i = 0; i < 20; i++) {
    if (digitalRead(PIN_PROVISION) != LOW) return 0;
    delay(1);
  }
  return 1;
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
  uint8_t button;
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

  button = provision_button_held();
  Serial.begin(115200);
  have_key = load_key(key);
  rs_link_init(&link, have_key ? key : 0, wd ? RS_FAULT_WATCHDOG_RESET : RS_FAULT_BOOT,
               button, serial_write, make_random, 0);
  link.busy = keyx_busy;
  memset(key, 0, sizeof key);  // the core holds its own copy
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

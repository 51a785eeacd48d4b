// A fake AVR board for the host: runs setup() and loop() with a scripted clock and
// serial input, then prints the outputs, so a test sees the sketch boot safe.
// Argument "button": the provisioning button (D2) is held at boot.
#include <stdio.h>

#include "Arduino.h"
#include "EEPROM.h"
#include "avr/wdt.h"

uint8_t MCUSR = 0;
StubSerial Serial;
StubEEPROM EEPROM;
static uint32_t now_ms = 0;
static int wdt_kicks = 0, wdt_on = 0, tx_bytes = 0, tx_frames = 0, throttle_pwm = -1;
static int button_held = 0, hello_flags = -1;
static uint8_t first[80];
static int first_len = 0;

uint32_t millis() { return now_ms; }
uint32_t micros() { return now_ms * 1000u + 7u; }
int analogRead(uint8_t pin) { return (int)(pin * 37u + now_ms) & 1023; }
void analogWrite(uint8_t pin, int value) { if (pin == 5) throttle_pwm = value; }
void pinMode(uint8_t, uint8_t) {}
int digitalRead(uint8_t pin) { return pin == 2 && button_held ? LOW : HIGH; }
void delay(uint32_t ms) { now_ms += ms; }
void StubSerial::begin(unsigned long) {}
int StubSerial::available() { return 0; }
int StubSerial::read() { return -1; }
size_t StubSerial::write(const uint8_t *data, size_t len) {
  for (size_t i = 0; i < len; i++) {
    if (tx_frames == 0 && first_len < (int)sizeof first) first[first_len++] = data[i];
    tx_frames += data[i] == 0;
  }
  tx_bytes += (int)len;
  return len;
}
void wdt_enable(int) { wdt_on = 1; }
void wdt_disable() { wdt_on = 0; }
void wdt_reset() { wdt_kicks++; }

// the HELLO flags byte (raw offset 9) of the first frame, COBS-decoded
static int first_hello_flags() {
  uint8_t raw[80];
  int i = 0, w = 0;
  while (i < first_len && first[i] != 0) {
    int code = first[i];
    for (int j = 1; j < code && i + j < first_len; j++) raw[w++] = first[i + j];
    i += code;
    if (code != 255 && i < first_len && first[i] != 0) raw[w++] = 0;
  }
  return w > 9 && raw[1] == 1 ? raw[9] : -1;
}

int main(int argc, char **argv) {
  button_held = argc > 1 && strcmp(argv[1], "button") == 0;
  setup();
  uint32_t start = now_ms;
  for (now_ms = start + 1; now_ms <= start + 1000; now_ms++) loop();
  hello_flags = first_hello_flags();
  // HELLO at boot and every 200 ms while no host speaks: 1 + 5 frames in the first second
  printf("watchdog=%d kicks=%d frames=%d throttle_pwm=%d eeprom_boots=%u hello_flags=%d\n",
         wdt_on, wdt_kicks, tx_frames, throttle_pwm, EEPROM.mem[36], hello_flags);
  return 0;
}

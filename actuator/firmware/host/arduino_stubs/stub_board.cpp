// A fake AVR board for the host: runs setup() and loop() with a scripted clock and
// serial input, then prints the outputs, so a test sees the sketch boot safe.
#include <stdio.h>

#include "Arduino.h"
#include "EEPROM.h"
#include "avr/wdt.h"

uint8_t MCUSR = 0;
StubSerial Serial;
StubEEPROM EEPROM;
static uint32_t now_ms = 0;
static int wdt_kicks = 0, wdt_on = 0, tx_bytes = 0, tx_frames = 0, throttle_pwm = -1;

uint32_t millis() { return now_ms; }
uint32_t micros() { return now_ms * 1000u + 7u; }
int analogRead(uint8_t pin) { return (int)(pin * 37u + now_ms) & 1023; }
void analogWrite(uint8_t pin, int value) { if (pin == 5) throttle_pwm = value; }
void pinMode(uint8_t, uint8_t) {}
void StubSerial::begin(unsigned long) {}
int StubSerial::available() { return 0; }
int StubSerial::read() { return -1; }
size_t StubSerial::write(const uint8_t *data, size_t len) {
  for (size_t i = 0; i < len; i++) tx_frames += data[i] == 0;
  tx_bytes += (int)len;
  return len;
}
void wdt_enable(int) { wdt_on = 1; }
void wdt_disable() { wdt_on = 0; }
void wdt_reset() { wdt_kicks++; }

int main() {
  setup();
  for (now_ms = 1; now_ms <= 1000; now_ms++) loop();
  // HELLO at boot and every 200 ms while no host speaks: 1 + 5 frames in the first second
  printf("watchdog=%d kicks=%d frames=%d throttle_pwm=%d eeprom_boots=%u\n", wdt_on,
         wdt_kicks, tx_frames, throttle_pwm, EEPROM.mem[36]);
  return 0;
}

/* The slice of the Arduino API roadshield_actuator.ino uses, for a host-side compile check
 * (tests/actuator/test_vectors.py); the bodies are a fake board that records outputs. */
#ifndef RS_ARDUINO_STUB_H
#define RS_ARDUINO_STUB_H
#include <stdint.h>
#include <string.h>

#define OUTPUT 1
#define INPUT_PULLUP 2
#define LOW 0
#define HIGH 1
#define A0 14
#define A1 15
#define A2 16
#define A3 17
#define WDRF 3

extern uint8_t MCUSR;
uint32_t millis();
uint32_t micros();
int analogRead(uint8_t pin);
void analogWrite(uint8_t pin, int value);
void pinMode(uint8_t pin, uint8_t mode);
int digitalRead(uint8_t pin);
void delay(uint32_t ms);

struct StubSerial {
  void begin(unsigned long baud);
  int available();
  int read();
  size_t write(const uint8_t *data, size_t len);
};
extern StubSerial Serial;

void setup();
void loop();
#endif

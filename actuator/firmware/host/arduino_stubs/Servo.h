#ifndef RS_SERVO_STUB_H
#define RS_SERVO_STUB_H
#include "Arduino.h"
struct Servo {
  int pin = -1, deg = -1, us = -1;
  void attach(int p) { pin = p; }
  void write(int d) { deg = d; }
  void writeMicroseconds(int u) { us = u; }
};
#endif

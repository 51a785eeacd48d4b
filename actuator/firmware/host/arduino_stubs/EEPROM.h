#ifndef RS_EEPROM_STUB_H
#define RS_EEPROM_STUB_H
#include "Arduino.h"
struct StubEEPROM {
  uint8_t mem[1024];
  uint8_t read(int addr) { return mem[addr]; }
  void write(int addr, uint8_t v) { mem[addr] = v; }
};
extern StubEEPROM EEPROM;
#endif

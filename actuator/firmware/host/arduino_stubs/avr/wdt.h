#ifndef RS_WDT_STUB_H
#define RS_WDT_STUB_H
#define WDTO_250MS 4
#define WDTO_8S 9
void wdt_enable(int timeout);
void wdt_disable();
void wdt_reset();
#endif

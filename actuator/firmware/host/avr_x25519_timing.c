/* Times Monocypher's X25519 on an AVR, for scripts/bench_actuator.py: build with avr-gcc
 * for the board's MCU and run in simavr (or on a board with a serial monitor). Timer 1
 * counts CPU clocks / 1024; the result goes out on UART 0 as
 *   "public_key ticks1024 <n>" and "shared ticks1024 <n>"  (seconds = n * 1024 / F_CPU).
 * It also reports the stack high-water mark of the two calls ("stack_bytes <n>"). */
#include <avr/interrupt.h>
#include <avr/io.h>
#include <stdio.h>

#include "../monocypher.h"

extern uint8_t __heap_start;
static volatile uint16_t overflows;

ISR(TIMER1_OVF_vect) { overflows++; }

static int uart_putc(char c, FILE *f) {
    (void)f;
    while (!(UCSR0A & (1 << UDRE0))) {
    }
    UDR0 = (uint8_t)c;
    return 0;
}
static FILE uart = FDEV_SETUP_STREAM(uart_putc, NULL, _FDEV_SETUP_WRITE);

static void timer_start(void) {
    overflows = 0;
    TCNT1 = 0;
    TCCR1B = (1 << CS12) | (1 << CS10); /* clk / 1024 */
}

static uint32_t timer_stop(void) {
    uint32_t t;
    cli();
    t = TCNT1;
    if (TIFR1 & (1 << TOV1)) { /* an overflow not yet counted */
        overflows++;
        t = TCNT1;
    }
    t |= (uint32_t)overflows << 16;
    TCCR1B = 0;
    sei();
    return t;
}

int main(void) {
    uint8_t sk[32], pk[32], shared[32];
    uint8_t i, *p;
    uint16_t untouched = 0;
    UCSR0B = (1 << TXEN0);
    stdout = &uart;
    /* paint the free RAM between the heap start and the current stack with 0xA5 */
    for (p = &__heap_start; p < (uint8_t *)SP - 16; p++) *p = 0xA5;
    for (i = 0; i < 32; i++) sk[i] = (uint8_t)(i * 7 + 1);
    TCCR1A = 0;
    TIMSK1 = 1 << TOIE1;
    sei();
    timer_start();
    crypto_x25519_public_key(pk, sk);
    printf("public_key ticks1024 %lu\n", (unsigned long)timer_stop());
    timer_start();
    crypto_x25519(shared, sk, pk);
    printf("shared ticks1024 %lu\n", (unsigned long)timer_stop());
    for (p = &__heap_start; *p == 0xA5; p++) untouched++;
    printf("stack_bytes %u\n", (unsigned)((uint8_t *)RAMEND - &__heap_start - untouched));
    printf("done %02x\n", shared[0]);
    cli();
    for (;;) {
    }
}

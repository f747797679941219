//! Polled 8250/16550 UART at COM1 (0x3f8).
//!
//! No initialisation: QEMU's and wbvmm's (vm-superio) UARTs transmit and
//! receive without the divisor/LCR set up, and every register access is an
//! exit (~32 µs from CPL3, far more through QEMU on PVM hosts). Enabling the
//! FIFO ourselves (FCR) would flush input that arrived before boot, so:
//! if the UART says its FIFO is on (IIR bits 7:6, read once; vm-superio
//! always says so), one THRE poll covers 16 bytes, else one per byte.

use crate::io::{inb, outb};
use crate::Global;
use core::fmt;

pub const COM1: u16 = 0x3f8;
const IIR: u16 = 2;
const LSR: u16 = 5;
const LSR_DATA_READY: u8 = 0x01;
const LSR_THR_EMPTY: u8 = 0x20;
const IIR_FIFO_ENABLED: u8 = 0xc0;
const FIFO_DEPTH: u8 = 16;

struct TxState {
    /// Bytes per THRE poll: 0 = not yet determined, 1 or FIFO_DEPTH.
    burst: u8,
    /// Bytes that may still be written without polling LSR.
    credit: u8,
}

static TX: Global<TxState> = Global::new(TxState {
    burst: 0,
    credit: 0,
});

pub fn write_byte(b: u8) {
    // SAFETY: one CPU; an exception handler printing in the middle of this
    // can at worst skip one THRE wait.
    let tx = unsafe { &mut *TX.get() };
    if tx.credit == 0 {
        if tx.burst == 0 {
            tx.burst = if inb(COM1 + IIR) & IIR_FIFO_ENABLED == IIR_FIFO_ENABLED {
                FIFO_DEPTH
            } else {
                1
            };
        }
        while inb(COM1 + LSR) & LSR_THR_EMPTY == 0 {
            core::hint::spin_loop();
        }
        tx.credit = tx.burst;
    }
    tx.credit -= 1;
    outb(COM1, b);
}

/// Writes `s`, turning "\n" into "\r\n" for terminals (tests using
/// `str::lines()` see the same lines either way).
pub fn write_str(s: &str) {
    for &b in s.as_bytes() {
        if b == b'\n' {
            write_byte(b'\r');
        }
        write_byte(b);
    }
}

/// One received byte, if the UART has one (does not wait).
pub fn try_read_byte() -> Option<u8> {
    if inb(COM1 + LSR) & LSR_DATA_READY != 0 {
        Some(inb(COM1))
    } else {
        None
    }
}

pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_str(s);
        Ok(())
    }
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = write!($crate::serial::Serial, $($arg)*);
    }};
}

#[macro_export]
macro_rules! println {
    () => { $crate::serial::write_str("\n") };
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::serial::Serial, $($arg)*);
    }};
}

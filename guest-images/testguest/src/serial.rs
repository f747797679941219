//! Polled 8250/16550 UART at COM1 (0x3f8).
//!
//! No initialisation: QEMU's and wbvmm's (vm-superio) UARTs transmit and
//! receive without the divisor/LCR set up, and every register write is an
//! exit. One LSR read per transmitted byte (THRE), one per receive poll.

use crate::io::{inb, outb};
use core::fmt;

pub const COM1: u16 = 0x3f8;
const LSR: u16 = 5;
const LSR_DATA_READY: u8 = 0x01;
const LSR_THR_EMPTY: u8 = 0x20;

pub fn write_byte(b: u8) {
    while inb(COM1 + LSR) & LSR_THR_EMPTY == 0 {
        core::hint::spin_loop();
    }
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

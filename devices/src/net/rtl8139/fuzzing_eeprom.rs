//! Fuzz harness for the 93C46 EEPROM behind Cfg9346 (the `eeprom` target in
//! `devices/fuzz`; the unit tests replay its corpus). Not part of the device API.
//!
//! The input bit-bangs the pins as a guest may — raw Cfg9346 writes (any mode:
//! normal, auto-load, program, config-write), single pin steps, whole commands of
//! any opcode, address and data, clocked read bits — interleaved with the config
//! registers the unlocked mode opens, other registers and resets.
//!
//! Checked after the sequence, whatever state it left: the protocol recovers (CS
//! low, then a READ as 8139too clocks it returns what the part holds, for the ID
//! and MAC words and two more), an EWEN + WRITE + EWDS stores exactly one word, a
//! WRITE after EWDS stores nothing, and auto-load brings the MAC words into IDR0-5.

use std::sync::Arc;

use super::regs::*;
use super::{Rtl8139, Rtl8139Config};
use crate::bus::BusDevice;
use crate::dma::VecGuestMemory;
use crate::irq::RecordingIrq;
use crate::net::FrameSink;
use crate::pci::{PciDevice, PCI_COMMAND_IO, PCI_COMMAND_MASTER};

const MAC: [u8; 6] = [0x52, 0x54, 0, 1, 2, 3];
const PROGRAM: u8 = EEM_PROGRAM;
const CS: u8 = EE_CS;
const SK: u8 = EE_SK;
const DI: u8 = EE_DI;
const WORDS: u32 = 64;

struct NullSink;

impl FrameSink for NullSink {
    fn send(&self, _frame: &[u8]) -> bool {
        true
    }
}

struct Pins<'a>(&'a Rtl8139);

impl Pins<'_> {
    fn w(&self, v: u8) {
        self.0.write(0, CFG9346 as u64, &[v]);
    }
    fn r(&self) -> u8 {
        let mut b = [0u8];
        self.0.read(0, CFG9346 as u64, &mut b);
        b[0]
    }
    /// Clock `n` bits of `bits` out MSB first, data set up before the rising edge.
    fn shift(&self, bits: u32, n: u32) {
        for i in (0..n).rev() {
            let di = if bits & (1 << i) != 0 { DI } else { 0 };
            self.w(PROGRAM | CS | di);
            self.w(PROGRAM | CS | di | SK);
        }
        self.w(PROGRAM | CS);
    }
    /// Start a command: CS low then high (ends whatever was in progress).
    fn select(&self) {
        self.w(PROGRAM);
        self.w(PROGRAM | CS);
    }
    /// 8139too's `read_eeprom` for a 93C46 (leading zeros, start bit, READ, address).
    fn read_word(&self, addr: u32) -> u16 {
        self.select();
        self.shift(addr | (6 << 6), 4 + 6 + 1);
        let mut v = 0u16;
        for _ in 0..16 {
            self.w(PROGRAM | CS | SK);
            v = (v << 1) | (self.r() & EE_DO) as u16;
            self.w(PROGRAM | CS);
        }
        self.w(PROGRAM);
        v
    }
    fn command(&self, op: u32, addr: u32) {
        self.select();
        self.shift((0b100 | op) << 6 | (addr & 0x3f), 9);
    }
}

fn contents(dev: &Rtl8139) -> [u16; WORDS as usize] {
    dev.lock().eeprom.contents
}

/// Run one input. Panics only on a model bug.
pub fn run(data: &[u8]) {
    let mem = Arc::new(VecGuestMemory::new(0, 1 << 16));
    let revision = if data.first().is_some_and(|b| b & 1 == 1) {
        super::REVISION_C
    } else {
        0x20
    };
    let Ok(dev) = Rtl8139::new(
        Rtl8139Config { mac: MAC, revision },
        mem,
        Arc::new(RecordingIrq::default()),
        Arc::new(NullSink),
    ) else {
        return;
    };
    dev.command_written(PCI_COMMAND_IO | PCI_COMMAND_MASTER);
    let pins = Pins(&dev);
    let mut it = data.iter().copied().skip(1);
    // Bounded by the input: every op consumes at least one byte.
    while let Some(op) = it.next() {
        match op % 8 {
            // Raw Cfg9346 writes: any mode, any pins.
            0 => pins.w(it.next().unwrap_or(0)),
            1 => {
                let _ = pins.r();
            }
            // Pin steps in program mode (the high bits of `op` are the pins).
            2 | 3 => pins.w(PROGRAM | (op >> 3) & (CS | SK | DI)),
            4 => {
                // A whole command: opcode, address, and for writes the data.
                let (Some(a), Some(d0), Some(d1)) = (it.next(), it.next(), it.next()) else {
                    break;
                };
                if a & 0x80 == 0 {
                    pins.select();
                } else {
                    pins.w(PROGRAM | CS);
                }
                pins.shift((0b100 | (a as u32 >> 6 & 3)) << 6 | (a as u32 & 0x3f), 9);
                if op & 0x10 != 0 {
                    pins.shift(u16::from_le_bytes([d0, d1]) as u32, 16);
                }
            }
            5 => {
                // Clock bits with DI from the input, reading DO on each.
                let (Some(n), Some(bits)) = (it.next(), it.next()) else {
                    break;
                };
                for i in 0..n % 24 {
                    let di = if bits & (1 << (i % 8)) != 0 { DI } else { 0 };
                    pins.w(PROGRAM | CS | di | SK);
                    let _ = pins.r();
                    pins.w(PROGRAM | CS | di);
                }
            }
            6 => {
                // Registers the config-write mode unlocks, and IDR.
                let (Some(r), Some(v)) = (it.next(), it.next()) else {
                    break;
                };
                let regs = [CONFIG0, CONFIG1, CONFIG3, CONFIG4, CONFIG5, 0, 3, 5];
                let reg = regs[(r & 7) as usize];
                if r & 0x80 != 0 {
                    pins.w(EEM_CONFIG_WRITE);
                }
                dev.write(0, reg as u64, &[v]);
                let mut b = [0u8];
                dev.read(0, reg as u64, &mut b);
            }
            _ => match it.next().map(|b| b % 4) {
                Some(0) => dev.reset(),
                Some(1) => dev.write(0, CR as u64, &[CR_RST]),
                Some(2) => {
                    let (Some(off), Some(v)) = (it.next(), it.next()) else {
                        break;
                    };
                    dev.write(0, off as u64, &[v]);
                }
                Some(_) => pins.w(EEM_AUTOLOAD),
                None => break,
            },
        }
    }

    // Whatever the input left: a driver starting afresh reads what the part holds.
    let held = contents(&dev);
    // The identity and MAC words, and two the input picks: a READ is ~80 register
    // accesses, so all 64 words would cost most of the fuzzer's time.
    let picked = data.last().map_or(0, |b| u32::from(*b));
    let checked = (0..10).chain([10 + picked % 54, 10 + (picked >> 2) % 54]);
    for addr in checked {
        assert_eq!(
            pins.read_word(addr),
            held[addr as usize],
            "READ of word {addr} after the fuzzed sequence"
        );
    }
    // Outside program mode DO reads low.
    pins.w(0);
    assert_eq!(pins.r() & EE_DO, 0, "EEDO visible outside program mode");

    // EWEN, one WRITE, EWDS: exactly one word changes.
    let target = u32::from(data.len() as u8) % WORDS;
    let value = !held[target as usize] ^ 0x0100;
    pins.command(0b00, 0x30);
    pins.command(0b01, target);
    pins.shift(value as u32, 16);
    pins.command(0b00, 0x00);
    let mut want = held;
    want[target as usize] = value;
    assert_eq!(contents(&dev), want, "EWEN + WRITE of word {target}");
    // After EWDS a WRITE is ignored.
    pins.command(0b01, target);
    pins.shift(!value as u32, 16);
    pins.w(PROGRAM);
    assert_eq!(contents(&dev), want, "WRITE after EWDS changed the part");
    assert_eq!(pins.read_word(target), value);

    // Auto-load: IDR0-5 take the MAC words (7-9).
    pins.w(EEM_AUTOLOAD);
    let mut idr = [0u8; 6];
    for (i, b) in idr.iter_mut().enumerate() {
        let mut r = [0u8];
        dev.read(0, i as u64, &mut r);
        *b = r[0];
    }
    let mut mac = [0u8; 6];
    for i in 0..3 {
        mac[2 * i..2 * i + 2].copy_from_slice(&want[7 + i].to_le_bytes());
    }
    assert_eq!(
        idr, mac,
        "auto-load did not bring the EEPROM's MAC into IDR"
    );
}

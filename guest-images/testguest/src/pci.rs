//! PCI configuration mechanism #1 (ports 0xCF8/0xCFC): bus 0 enumeration,
//! BAR sizing and assignment, command register.
//!
//! Every config access is two port exits (address, data), so the scan reads
//! only the vendor/device word of each function (and the header type of
//! function 0, to decide whether to look at functions 1-7).

use crate::io::{inl, outl};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

/// Command register bits.
pub const CMD_IO: u16 = 1 << 0;
pub const CMD_MEMORY: u16 = 1 << 1;
pub const CMD_BUS_MASTER: u16 = 1 << 2;
pub const CMD_INTX_DISABLE: u16 = 1 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bdf {
    pub bus: u8,
    pub dev: u8,
    pub func: u8,
}

impl Bdf {
    fn address(self, offset: u8) -> u32 {
        0x8000_0000
            | (self.bus as u32) << 16
            | (self.dev as u32) << 11
            | (self.func as u32) << 8
            | (offset as u32 & 0xfc)
    }

    pub fn read32(self, offset: u8) -> u32 {
        outl(CONFIG_ADDRESS, self.address(offset));
        inl(CONFIG_DATA)
    }

    pub fn write32(self, offset: u8, val: u32) {
        outl(CONFIG_ADDRESS, self.address(offset));
        outl(CONFIG_DATA, val);
    }

    /// Read-modify-write of the command register (low half of dword 4),
    /// leaving the status half's write-1-to-clear bits alone (writes 0).
    pub fn set_command_bits(self, bits: u16) -> u16 {
        let cmd = (self.read32(0x04) & 0xffff) as u16 | bits;
        self.write32(0x04, cmd as u32);
        cmd
    }
}

impl Bdf {
    /// Clears command bits (read-modify-write, as `set_command_bits`).
    pub fn clear_command_bits(self, bits: u16) -> u16 {
        let cmd = (self.read32(0x04) & 0xffff) as u16 & !bits;
        self.write32(0x04, cmd as u32);
        cmd
    }
}

/// A function found on bus 0.
#[derive(Clone, Copy, Debug)]
pub struct Function {
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
}

/// Finds the first function with `vendor:device` on bus 0 (devices 0-31,
/// all functions of multi-function devices).
pub fn find(vendor: u16, device: u16) -> Option<Function> {
    let want = (device as u32) << 16 | vendor as u32;
    for dev in 0..32u8 {
        let f0 = Bdf {
            bus: 0,
            dev,
            func: 0,
        };
        let id0 = f0.read32(0x00);
        if id0 & 0xffff == 0xffff {
            continue; // no device
        }
        let multi = (f0.read32(0x0c) >> 16) & 0x80 != 0;
        let funcs = if multi { 8 } else { 1 };
        for func in 0..funcs {
            let bdf = Bdf { bus: 0, dev, func };
            let id = if func == 0 { id0 } else { bdf.read32(0x00) };
            if id == want {
                let revision = (bdf.read32(0x08) & 0xff) as u8;
                return Some(Function {
                    bdf,
                    vendor,
                    device,
                    revision,
                });
            }
        }
    }
    None
}

/// A BAR's kind and current base.
#[derive(Clone, Copy, Debug)]
pub struct Bar {
    pub io: bool,
    pub base: u64,
    #[allow(dead_code)] // reported by future words
    pub size: u64,
}

/// Reads BAR `index` (0-5) and sizes it (all-ones write, read back,
/// restore). Decoding of the function should be off while sizing; callers
/// size before enabling I/O/memory space, or accept the brief window.
/// 64-bit memory BARs are read as such (the next BAR is the high half).
pub fn read_bar(bdf: Bdf, index: u8) -> Bar {
    let off = 0x10 + index * 4;
    let orig = bdf.read32(off);
    bdf.write32(off, 0xffff_ffff);
    let mask = bdf.read32(off);
    bdf.write32(off, orig);
    if orig & 1 == 1 {
        let m = mask & !3;
        // I/O BARs may implement only 16 bits: the upper half reads 0.
        let m = if m & 0xffff_0000 == 0 {
            m | 0xffff_0000
        } else {
            m
        };
        Bar {
            io: true,
            base: (orig & !3) as u64,
            size: (!m).wrapping_add(1) as u64 & 0xffff_ffff,
        }
    } else {
        let is64 = (orig >> 1) & 3 == 2;
        let mut base = (orig & !0xf) as u64;
        if is64 {
            base |= (bdf.read32(off + 4) as u64) << 32;
        }
        let m = mask & !0xf;
        Bar {
            io: false,
            base,
            size: (!m).wrapping_add(1) as u64 & 0xffff_ffff,
        }
    }
}

/// Programs BAR `index` with `base` (for a 64-bit BAR the high half is
/// cleared).
pub fn write_bar(bdf: Bdf, index: u8, base: u64) {
    let off = 0x10 + index * 4;
    let orig = bdf.read32(off);
    let flags = if orig & 1 == 1 { orig & 3 } else { orig & 0xf };
    bdf.write32(off, base as u32 | flags);
    if orig & 1 == 0 && (orig >> 1) & 3 == 2 {
        bdf.write32(off + 4, (base >> 32) as u32);
    }
}

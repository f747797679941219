//! Fuzz harness for PCI configuration space as a guest reaches it (the `pci_config`
//! target in `devices/fuzz`; the unit tests replay its corpus). Not part of the API.
//!
//! Behind the root: the real RTL8139 model and a second device with a large memory
//! BAR, next to fixed devices on both buses to collide with. The input drives config
//! mechanism #1 at every width and byte offset (0xCF8-0xCFF, any CONFIG_ADDRESS, any
//! device number), BAR sizing and moves, command changes, and accesses through the
//! buses at BAR addresses.
//!
//! Checked against the PCI spec, not the model's bookkeeping: identity registers
//! never change; a write to a BAR reads back as the merged value with the size and
//! type bits forced; the command register keeps exactly its writable bits; the
//! expansion ROM BAR and unimplemented BARs read 0; each BAR is on its bus exactly at
//! its register's address, with its size, only while its decode enable is set, and a
//! fixed device is never shadowed; the capability list (when status says there is
//! one) is a chain of dword-aligned pointers at 0x40 and above that ends; every
//! narrow config read agrees with the dword it is part of; absent functions read
//! all-ones.

use std::sync::Arc;

use super::*;
use crate::dma::VecGuestMemory;
use crate::irq::RecordingIrq;
use crate::net::rtl8139::{Rtl8139, Rtl8139Config};
use crate::net::FrameSink;

/// A device that answers with a constant, to sit where BARs may be moved onto it.
struct Fixed(u8);

impl BusDevice for Fixed {
    fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(self.0);
    }
    fn write(&self, _base: u64, _offset: u64, _data: &[u8]) {}
}

/// A second PCI function with a 1 MiB memory BAR at index 2 and an I/O BAR at 5.
struct Big;

impl BusDevice for Big {
    fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0xB1);
    }
    fn write(&self, _base: u64, _offset: u64, _data: &[u8]) {}
}

impl PciDevice for Big {
    fn ids(&self) -> PciIds {
        PciIds {
            vendor: 0x1af4,
            device: 0x10ff,
            revision: 1,
            class: 0x0007_8000,
            subsystem_vendor: 0x1af4,
            subsystem: 1,
        }
    }
    fn bars(&self) -> Vec<BarSpec> {
        vec![
            BarSpec {
                index: 2,
                kind: BarKind::Mem32,
                size: 1 << 20,
            },
            BarSpec {
                index: 5,
                kind: BarKind::Io,
                size: 32,
            },
        ]
    }
}

struct NullSink;

impl FrameSink for NullSink {
    fn send(&self, _frame: &[u8]) -> bool {
        true
    }
}

const FIXED_MMIO: u64 = 0xfec0_0000;
const FIXED_PIO: u64 = 0x3f8;

struct Harness {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    root: Arc<PciRoot>,
    /// (device number, its ids dwords 0x00/0x08/0x2C/0x3C-pin, its BARs).
    funcs: Vec<(u8, [u32; 3], u8, Vec<BarSpec>)>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        // The root holds the buses and the PIO bus holds the root: break the cycle so
        // each run frees its devices (the fuzzer runs millions in one process).
        let _ = self.pio.remove(PciRoot::CONFIG_PORT);
    }
}

impl Harness {
    fn cfg_addr(&self, dev: u8, reg: u8) {
        let a = 0x8000_0000 | (dev as u32 & 0x1f) << 11 | (reg as u32 & 0xfc);
        self.pio.write(0xCF8, &a.to_le_bytes());
    }
    fn cfg_read(&self, dev: u8, reg: u8) -> u32 {
        self.cfg_addr(dev, reg);
        let mut b = [0u8; 4];
        self.pio.read(0xCFC, &mut b);
        u32::from_le_bytes(b)
    }

    /// A dword written to a BAR reads back as the spec says.
    fn check_bar_write(&self, dev: u8, reg: u8, before: u32, val: u32, mask: u32) {
        let Some((_, _, _, bars)) = self.funcs.iter().find(|f| f.0 == dev) else {
            return;
        };
        let got = self.root.config_read(dev, reg);
        let idx = (reg - 0x10) / 4;
        let want = match bars.iter().find(|b| b.index == idx) {
            None => 0,
            Some(b) => {
                let merged = (before & !mask) | (val & mask);
                let size_mask = !((b.size as u32).wrapping_sub(1));
                match b.kind {
                    BarKind::Io => (merged & !0x3 & size_mask) | 1,
                    BarKind::Mem32 => merged & !0xF & size_mask,
                }
            }
        };
        assert_eq!(
            got, want,
            "BAR {idx} of device {dev}: wrote {val:#x} (mask {mask:#x}) over {before:#x}"
        );
    }

    fn check_command_write(&self, dev: u8, before: u32, val: u32, mask: u32) {
        if !self.funcs.iter().any(|f| f.0 == dev) {
            return;
        }
        let got = self.root.config_read(dev, 4) as u16;
        let merged = ((before & !mask) | (val & mask)) as u16;
        if mask & 0xFFFF != 0 {
            assert_eq!(got, merged & COMMAND_WRITABLE, "command of device {dev}");
        } else {
            assert_eq!(got, before as u16, "a status-only write changed command");
        }
    }

    fn check_all(&self) {
        // Host bridge: read-only identity, command as the root set it.
        assert_eq!(self.root.config_read(0, 0), 0x1237_8086);
        let mut mapped_mem: Vec<(u64, u64)> = Vec::new();
        for (dev, ids, pin, bars) in &self.funcs {
            let dev = *dev;
            assert_eq!(self.root.config_read(dev, 0x00), ids[0], "vendor/device");
            assert_eq!(self.root.config_read(dev, 0x08), ids[1], "class/revision");
            assert_eq!(self.root.config_read(dev, 0x2C), ids[2], "subsystem");
            assert_eq!((self.root.config_read(dev, 0x3C) >> 8) as u8, *pin, "pin");
            // Header type 0, single function.
            assert_eq!((self.root.config_read(dev, 0x0C) >> 16) & 0xFF, 0);
            assert_eq!(self.root.config_read(dev, 0x30), 0, "expansion ROM BAR");
            for idx in 0..6u8 {
                if !bars.iter().any(|b| b.index == idx) {
                    assert_eq!(self.root.config_read(dev, 0x10 + 4 * idx), 0);
                }
            }
            self.walk_capabilities(dev);
            let cmd = self.root.config_read(dev, 4) as u16;
            for b in bars {
                let Some((addr, mapped)) = self.root.bar_mapping(dev, b.index) else {
                    panic!("BAR {} of device {dev} vanished", b.index);
                };
                let reg = self.root.config_read(dev, 0x10 + 4 * b.index);
                let (enabled, bus, reg_addr) = match b.kind {
                    BarKind::Io => (cmd & PCI_COMMAND_IO != 0, &self.pio, reg & !0x3),
                    BarKind::Mem32 => (cmd & PCI_COMMAND_MEMORY != 0, &self.mmio, reg & !0xF),
                };
                assert_eq!(addr, reg_addr as u64, "BAR register and state disagree");
                if let Some(at) = mapped {
                    assert!(enabled, "BAR {} of {dev} mapped with decode off", b.index);
                    assert_eq!(
                        at, addr,
                        "BAR {} of {dev} mapped away from its register",
                        b.index
                    );
                    let r = bus.route(at).expect("a mapped BAR routes");
                    assert!(r.base == at && r.len == b.size, "BAR range on the bus");
                    if b.kind == BarKind::Mem32 {
                        mapped_mem.push((at, at + b.size));
                    }
                }
            }
        }
        // The fixed devices are never shadowed by a BAR.
        let r = self.mmio.route(FIXED_MMIO).expect("fixed MMIO device");
        assert!(r.base == FIXED_MMIO && r.len == 0x1000);
        let r = self.pio.route(FIXED_PIO).expect("fixed PIO device");
        assert!(r.base == FIXED_PIO && r.len == 8);
        for (i, a) in mapped_mem.iter().enumerate() {
            for b in &mapped_mem[i + 1..] {
                assert!(a.1 <= b.0 || b.1 <= a.0, "two BARs overlap: {a:x?} {b:x?}");
            }
        }
    }

    /// The walk an OS does: status bit 4, pointer at 0x34, then (id, next) pairs.
    fn walk_capabilities(&self, dev: u8) {
        let status = self.root.config_read(dev, 4) >> 16;
        if status & 0x10 == 0 {
            return;
        }
        let mut ptr = (self.root.config_read(dev, 0x34) & 0xFC) as u8;
        // 48 dwords fit above 0x40: a longer chain is a loop.
        for _ in 0..48 {
            if ptr == 0 {
                return;
            }
            assert!(ptr >= 0x40, "capability pointer {ptr:#x} inside the header");
            let cap = self.root.config_read(dev, ptr);
            ptr = ((cap >> 8) & 0xFC) as u8;
        }
        panic!("capability list of device {dev} does not end");
    }

    /// A narrow read through the ports equals the bytes of the dword.
    fn check_narrow_read(&self, dev: u8, reg: u8, byte: u8, size: usize) {
        let dword = self.root.config_read(dev, reg & 0xFC);
        self.cfg_addr(dev, reg);
        let mut b = [0u8; 4];
        self.pio.read(0xCFC + byte as u64, &mut b[..size]);
        let full = dword.to_le_bytes();
        for (i, got) in b.iter().take(size).enumerate() {
            let want = full.get(byte as usize + i).copied().unwrap_or(0xFF);
            assert_eq!(
                *got, want,
                "config read dev {dev} reg {reg:#x}+{byte} size {size}"
            );
        }
    }
}

/// Run one input. Panics only on a model bug.
pub fn run(data: &[u8]) {
    let pio = Arc::new(Bus::new());
    let mmio = Arc::new(Bus::new());
    let root = Arc::new(PciRoot::new(pio.clone(), mmio.clone()));
    let mut h = Harness {
        pio,
        mmio,
        root,
        funcs: Vec::new(),
    };
    if h.pio
        .insert(h.root.clone(), PciRoot::CONFIG_PORT, PciRoot::CONFIG_LEN)
        .is_err()
        || h.mmio
            .insert(Arc::new(Fixed(0xEE)), FIXED_MMIO, 0x1000)
            .is_err()
        || h.pio.insert(Arc::new(Fixed(0xEF)), FIXED_PIO, 8).is_err()
    {
        return;
    }
    let revision = if data.first().is_some_and(|b| b & 1 == 1) {
        crate::net::rtl8139::REVISION_C
    } else {
        0x20
    };
    let Ok(nic) = Rtl8139::new(
        Rtl8139Config {
            mac: [0x52, 0x54, 0, 1, 2, 3],
            revision,
        },
        Arc::new(VecGuestMemory::new(0, 1 << 16)),
        Arc::new(RecordingIrq::default()),
        Arc::new(NullSink),
    ) else {
        return;
    };
    let nic = Arc::new(nic);
    let placement = |irq: u8, bar_addresses: Vec<u64>| PciPlacement {
        device: None,
        irq,
        bar_addresses,
    };
    let root = h.root.clone();
    let added = [
        (
            root.add_device(nic.clone(), placement(10, vec![0xc000, 0xfebf_f000])),
            nic.bars(),
        ),
        (
            root.add_device(Arc::new(Big), placement(11, vec![0xfe00_0000, 0xc100])),
            Big.bars(),
        ),
    ];
    for (info, bars) in added {
        let Ok(info) = info else { return };
        let d = info.device;
        h.funcs.push((
            d,
            [
                root.config_read(d, 0),
                root.config_read(d, 8),
                root.config_read(d, 0x2C),
            ],
            (root.config_read(d, 0x3C) >> 8) as u8,
            bars,
        ));
    }
    drop(root);
    let h = h;
    let ndev = h.funcs.len() as u8;
    for chunk in data.get(1..).unwrap_or(&[]).chunks_exact(7) {
        let op = chunk[0];
        let v = u32::from_le_bytes([chunk[2], chunk[3], chunk[4], chunk[5]]);
        // Aim mostly at our functions; sometimes at the host bridge, empty slots or
        // anything a 32-bit CONFIG_ADDRESS names.
        let dev = match chunk[6] & 3 {
            0 | 1 => h.funcs[(chunk[6] as usize >> 2) % ndev as usize].0,
            2 => chunk[6] >> 3,
            _ => 0,
        };
        let reg = chunk[1] & 0xFC;
        let byte = chunk[1] & 3;
        match op % 6 {
            0 => {
                // A config write of 1, 2 or 4 bytes at any byte offset.
                let size = [1usize, 2, 4, 4][(op as usize >> 3) & 3];
                let before = h.root.config_read(dev, reg);
                h.cfg_addr(dev, reg);
                let n = size.min(4 - byte as usize);
                h.pio.write(0xCFC + byte as u64, &v.to_le_bytes()[..size]);
                let shift = 8 * byte as u32;
                let mask = if n == 4 {
                    u32::MAX
                } else {
                    ((1u32 << (8 * n)) - 1) << shift
                };
                let val = v << shift;
                if (0x10..=0x24).contains(&reg) {
                    h.check_bar_write(dev, reg, before, val, mask);
                } else if reg == 4 {
                    h.check_command_write(dev, before, val, mask);
                }
            }
            1 => {
                let size = [1usize, 2, 4, 4][(op as usize >> 3) & 3];
                h.check_narrow_read(dev, reg, byte, size);
            }
            2 => {
                // BAR sizing as an OS does it: save, all-ones, read the mask, restore
                // (or, from the input, move it somewhere else).
                let Some((d, _, _, bars)) = h.funcs.get((chunk[6] as usize) % ndev as usize) else {
                    continue;
                };
                let Some(b) = bars.get((op as usize >> 3) % bars.len()) else {
                    continue;
                };
                let breg = 0x10 + 4 * b.index;
                let saved = h.root.config_read(*d, breg);
                h.cfg_addr(*d, breg);
                h.pio.write(0xCFC, &u32::MAX.to_le_bytes());
                h.check_bar_write(*d, breg, saved, u32::MAX, u32::MAX);
                let back = if op & 0x80 != 0 { v } else { saved };
                h.pio.write(0xCFC, &back.to_le_bytes());
                h.check_bar_write(*d, breg, u32::MAX, back, u32::MAX);
            }
            3 => {
                // CONFIG_ADDRESS as is, any width (narrow ones go elsewhere).
                let port = 0xCF8 + (chunk[1] & 7) as u64;
                let size = [1usize, 2, 4, 4][(op as usize >> 3) & 3];
                h.pio.write(port, &v.to_le_bytes()[..size]);
                let mut b = [0u8; 4];
                h.pio.read(0xCFC + (chunk[1] & 3) as u64, &mut b[..size]);
            }
            4 => {
                // Accesses through the buses where BARs may be.
                let addr = if op & 0x08 != 0 {
                    0xfe00_0000 | (v & 0x01ff_ffff) as u64
                } else {
                    (v & 0xffff) as u64
                };
                let bus = if op & 0x08 != 0 { &h.mmio } else { &h.pio };
                let mut b = [0u8; 4];
                if op & 0x10 != 0 {
                    bus.write(addr, &b[..1 + (op as usize >> 5) % 4]);
                } else {
                    bus.read(addr, &mut b[..1 + (op as usize >> 5) % 4]);
                }
            }
            _ => {
                // Command changes: decode enables on and off, bus master, INTx.
                let before = h.root.config_read(dev, 4);
                h.cfg_addr(dev, 4);
                h.pio.write(0xCFC, &(v as u16).to_le_bytes());
                h.check_command_write(dev, before, v & 0xFFFF, 0xFFFF);
            }
        }
        // Absent functions answer all-ones.
        if (ndev + 1..32).contains(&(chunk[6] >> 3)) {
            assert_eq!(h.cfg_read(chunk[6] >> 3, 0), u32::MAX, "empty slot answers");
        }
        h.check_all();
    }
}

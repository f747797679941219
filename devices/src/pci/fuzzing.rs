//! Fuzz harness for the PCI root (config mechanism #1, BAR moves, decode enables),
//! shared by `devices/fuzz` and the regression tests. Not part of the API.

use std::sync::Arc;

use super::*;

struct Regs;

impl BusDevice for Regs {
    fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0x5A);
    }
    fn write(&self, _base: u64, _offset: u64, _data: &[u8]) {}
}

impl PciDevice for Regs {
    fn ids(&self) -> PciIds {
        PciIds {
            vendor: 0x10ec,
            device: 0x8139,
            revision: 0x20,
            class: 0x020000,
            subsystem_vendor: 0x10ec,
            subsystem: 0x8139,
        }
    }
    fn bars(&self) -> Vec<BarSpec> {
        vec![
            BarSpec {
                index: 0,
                kind: BarKind::Io,
                size: 256,
            },
            BarSpec {
                index: 1,
                kind: BarKind::Mem32,
                size: 256,
            },
        ]
    }
    fn interrupt_pin(&self) -> u8 {
        PCI_INTERRUPT_PIN_INTA
    }
}

/// Run one input: a sequence of (op, size, offset, value) config accesses.
/// Panics only on a bug: after every access each BAR is either unmapped or
/// mapped exactly where its register says, and only while decoding is enabled.
pub fn run(data: &[u8]) {
    let pio = Arc::new(Bus::new());
    let mmio = Arc::new(Bus::new());
    let root = Arc::new(PciRoot::new(pio.clone(), mmio.clone()));
    if pio
        .insert(root.clone(), PciRoot::CONFIG_PORT, PciRoot::CONFIG_LEN)
        .is_err()
    {
        return;
    }
    // Something to collide with.
    let _ = mmio.insert(Arc::new(Regs), 0xfec0_0000, 0x1000);
    let _ = pio.insert(Arc::new(Regs), 0x3f8, 8);
    let dev = Arc::new(Regs);
    let Ok(info) = root.add_device(
        dev,
        PciPlacement {
            device: None,
            irq: 10,
            bar_addresses: vec![0xc000, 0xfebf_f000],
        },
    ) else {
        return;
    };
    for chunk in data.chunks_exact(7) {
        let op = chunk[0];
        let size = [1usize, 2, 4, 4][(op as usize >> 1) & 3];
        let port = 0xCF8 + (chunk[1] & 7) as u64;
        let v = u32::from_le_bytes([chunk[2], chunk[3], chunk[4], chunk[5]]);
        if op & 1 == 0 {
            // Aim most address writes at our device's header.
            let v = if chunk[6] & 1 == 0 {
                0x8000_0000 | (info.device as u32) << 11 | (v & 0xFC)
            } else {
                v
            };
            if port == 0xCF8 && size == 4 {
                pio.write(port, &v.to_le_bytes());
            } else {
                pio.write(port, &v.to_le_bytes()[..size]);
            }
        } else {
            let mut b = [0u8; 4];
            pio.read(port, &mut b[..size]);
        }
        let cmd = root.config_read(info.device, 4) as u16;
        for (idx, kind) in [(0u8, BarKind::Io), (1, BarKind::Mem32)] {
            let Some((addr, mapped)) = root.bar_mapping(info.device, idx) else {
                panic!("BAR {idx} vanished");
            };
            let enabled = match kind {
                BarKind::Io => cmd & PCI_COMMAND_IO != 0,
                BarKind::Mem32 => cmd & PCI_COMMAND_MEMORY != 0,
            };
            let bus = match kind {
                BarKind::Io => &pio,
                BarKind::Mem32 => &mmio,
            };
            if let Some(at) = mapped {
                assert!(enabled, "BAR {idx} mapped while decode is off");
                assert_eq!(at, addr, "BAR {idx} mapped away from its register");
                assert!(bus.route(at).is_some_and(|r| r.base == at && r.len == 256));
            }
        }
    }
}

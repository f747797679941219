use super::*;
use std::sync::atomic::{AtomicU16, Ordering};

struct Dummy {
    cmd: AtomicU16,
    bars_moved: std::sync::atomic::AtomicU32,
}

impl BusDevice for Dummy {
    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8 ^ 0xA5);
    }
    fn write(&self, _base: u64, _offset: u64, _data: &[u8]) {}
}

impl PciDevice for Dummy {
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
    fn command_written(&self, command: u16) {
        self.cmd.store(command, Ordering::SeqCst);
    }
    fn bars_moved(&self) {
        // The root must not hold its lock here: a device may read config space.
        self.bars_moved.fetch_add(1, Ordering::SeqCst);
    }
}

fn setup() -> (Arc<Bus>, Arc<Bus>, Arc<PciRoot>, Arc<Dummy>, PciSlotInfo) {
    let pio = Arc::new(Bus::new());
    let mmio = Arc::new(Bus::new());
    let root = Arc::new(PciRoot::new(pio.clone(), mmio.clone()));
    pio.insert(root.clone(), PciRoot::CONFIG_PORT, PciRoot::CONFIG_LEN)
        .unwrap();
    let dev = Arc::new(Dummy {
        cmd: AtomicU16::new(0),
        bars_moved: Default::default(),
    });
    let info = root
        .add_device(
            dev.clone(),
            PciPlacement {
                device: None,
                irq: 10,
                bar_addresses: vec![0xc000, 0xfebf_f000],
            },
        )
        .unwrap();
    (pio, mmio, root, dev, info)
}

fn addr(dev: u8, reg: u8) -> u32 {
    0x8000_0000 | (dev as u32) << 11 | reg as u32
}

fn cfg_read32(pio: &Bus, dev: u8, reg: u8) -> u32 {
    assert!(pio.write(0xCF8, &addr(dev, reg).to_le_bytes()));
    let mut b = [0u8; 4];
    assert!(pio.read(0xCFC, &mut b));
    u32::from_le_bytes(b)
}

fn cfg_write32(pio: &Bus, dev: u8, reg: u8, v: u32) {
    pio.write(0xCF8, &addr(dev, reg).to_le_bytes());
    pio.write(0xCFC, &v.to_le_bytes());
}

#[test]
fn host_bridge_and_device_ids() {
    let (pio, _mmio, _root, dev, info) = setup();
    assert_eq!(info.device, 1);
    assert_eq!(info.pin, 1);
    assert_eq!(info.irq, 10);
    assert_eq!(info.mp_source_bus_irq(), Some(4));
    assert_eq!(cfg_read32(&pio, 0, 0), 0x1237_8086);
    assert_eq!(cfg_read32(&pio, 0, 8) >> 8, 0x060000);
    assert_eq!(cfg_read32(&pio, 1, 0), 0x8139_10ec);
    assert_eq!(cfg_read32(&pio, 1, 8), 0x0200_0020);
    assert_eq!(cfg_read32(&pio, 1, 0x2c), 0x8139_10ec);
    assert_eq!(cfg_read32(&pio, 1, 0x3c) & 0xffff, 0x010a);
    assert_eq!(cfg_read32(&pio, 2, 0), 0xffff_ffff);
    // Started with I/O + memory enabled, bus master off.
    assert_eq!(cfg_read32(&pio, 1, 4) & 0xffff, 3);
    assert_eq!(dev.cmd.load(Ordering::SeqCst), 3);
    // Enable bit clear: no config cycle.
    pio.write(0xCF8, &0u32.to_le_bytes());
    let mut b = [0u8; 4];
    pio.read(0xCFC, &mut b);
    assert_eq!(b, [0xff; 4]);
}

#[test]
fn narrow_config_accesses_hit_the_right_bytes() {
    let (pio, _mmio, _root, _dev, _info) = setup();
    pio.write(0xCF8, &addr(1, 0).to_le_bytes());
    let mut b = [0u8; 2];
    pio.read(0xCFE, &mut b);
    assert_eq!(u16::from_le_bytes(b), 0x8139);
    let mut b1 = [0u8; 1];
    pio.read(0xCFD, &mut b1);
    assert_eq!(b1[0], 0x10);
    // Byte write of interrupt line at 0x3C.
    pio.write(0xCF8, &addr(1, 0x3c).to_le_bytes());
    pio.write(0xCFC, &[11]);
    // Byte write to the pin (0x3D) is ignored.
    pio.write(0xCFD, &[7]);
    assert_eq!(cfg_read32(&pio, 1, 0x3c) & 0xffff, 0x010b);
    // 16-bit write to the command register at 0xCFC, leaving status.
    pio.write(0xCF8, &addr(1, 4).to_le_bytes());
    pio.write(0xCFC, &7u16.to_le_bytes());
    assert_eq!(cfg_read32(&pio, 1, 4) & 0xffff, 7);
}

#[test]
fn bar_sizing_and_moving() {
    let (pio, mmio, root, _dev, _info) = setup();
    let mut b = [0u8; 1];
    assert!(pio.read(0xc010, &mut b));
    assert!(mmio.read(0xfebf_f010, &mut b));
    // Linux disables decode, sizes, restores.
    cfg_write32(&pio, 1, 4, 0);
    assert!(!pio.read(0xc010, &mut b));
    assert!(!mmio.read(0xfebf_f010, &mut b));
    cfg_write32(&pio, 1, 0x10, 0xffff_ffff);
    assert_eq!(cfg_read32(&pio, 1, 0x10), 0xffff_ff01);
    cfg_write32(&pio, 1, 0x14, 0xffff_ffff);
    assert_eq!(cfg_read32(&pio, 1, 0x14), 0xffff_ff00);
    // Unimplemented BAR reads 0 even after all-ones.
    cfg_write32(&pio, 1, 0x18, 0xffff_ffff);
    assert_eq!(cfg_read32(&pio, 1, 0x18), 0);
    // Move both BARs, re-enable.
    cfg_write32(&pio, 1, 0x10, 0xd000);
    cfg_write32(&pio, 1, 0x14, 0xe000_0000);
    let g = mmio.generation();
    cfg_write32(&pio, 1, 4, 3);
    assert!(mmio.generation() > g);
    assert!(!pio.read(0xc010, &mut b));
    assert!(pio.read(0xd010, &mut b));
    assert_eq!(b[0], 0x10 ^ 0xA5);
    assert!(mmio.read(0xe000_00ff, &mut b));
    assert!(!mmio.read(0xe000_0100, &mut b));
    assert_eq!(
        root.bar_mapping(1, 1),
        Some((0xe000_0000, Some(0xe000_0000)))
    );
    // Moving while enabled relocates directly.
    cfg_write32(&pio, 1, 0x14, 0xe000_1000);
    assert!(!mmio.read(0xe000_0000, &mut b));
    assert!(mmio.read(0xe000_1000, &mut b));
    // Sizing with decode on: the I/O BAR leaves port space and is unmapped,
    // then comes back.
    cfg_write32(&pio, 1, 0x10, 0xffff_ffff);
    assert!(!pio.read(0xd000, &mut b));
    cfg_write32(&pio, 1, 0x10, 0xc001);
    assert!(pio.read(0xc000, &mut b));
    // Only memory decode disabled.
    cfg_write32(&pio, 1, 4, 1);
    assert!(pio.read(0xc000, &mut b));
    assert!(!mmio.read(0xe000_1000, &mut b));
}

#[test]
fn the_device_hears_of_every_bar_mapping_change_and_only_those() {
    let (pio, _mmio, _root, dev, _info) = setup();
    let moves = || dev.bars_moved.load(Ordering::SeqCst);
    cfg_write32(&pio, 1, 4, 0); // decode off: both unmapped
    assert_eq!(moves(), 1);
    cfg_write32(&pio, 1, 0x10, 0xd000); // moved while off: nothing mapped changes
    assert_eq!(moves(), 1);
    cfg_write32(&pio, 1, 4, 3); // both mapped again
    assert_eq!(moves(), 2);
    cfg_write32(&pio, 1, 0x14, 0xe000_0000); // relocated while on
    assert_eq!(moves(), 3);
    cfg_write32(&pio, 1, 0x14, 0xe000_0000); // same place: no change
    cfg_write32(&pio, 1, 0x3c, 11); // not a BAR
    assert_eq!(moves(), 3);
    // The root's lock is free when the device hears of it.
    assert_eq!(cfg_read32(&pio, 1, 0x14), 0xe000_0000);
}

#[test]
fn conflicting_bar_is_unmapped_not_shadowing() {
    let (pio, mmio, root, _dev, _info) = setup();
    let other = Arc::new(Dummy {
        cmd: AtomicU16::new(0),
        bars_moved: Default::default(),
    });
    mmio.insert(other, 0xa000_0000, 0x1000).unwrap();
    cfg_write32(&pio, 1, 0x14, 0xa000_0000);
    assert_eq!(root.bar_mapping(1, 1), Some((0xa000_0000, None)));
    cfg_write32(&pio, 1, 0x14, 0xb000_0000);
    assert_eq!(
        root.bar_mapping(1, 1),
        Some((0xb000_0000, Some(0xb000_0000)))
    );
}

#[test]
fn add_device_errors() {
    let pio = Arc::new(Bus::new());
    let mmio = Arc::new(Bus::new());
    let root = PciRoot::new(pio.clone(), mmio.clone());
    let dev = Arc::new(Dummy {
        cmd: AtomicU16::new(0),
        bars_moved: Default::default(),
    });
    let p = |addrs: Vec<u64>, device| PciPlacement {
        device,
        irq: 5,
        bar_addresses: addrs,
    };
    assert!(matches!(
        root.add_device(dev.clone(), p(vec![0xc000], None)),
        Err(PciError::BarCount { .. })
    ));
    assert!(matches!(
        root.add_device(dev.clone(), p(vec![0xc010, 0x1000], None)),
        Err(PciError::MisalignedBar { .. })
    ));
    assert!(matches!(
        root.add_device(dev.clone(), p(vec![0xc000, 0x1000], Some(0))),
        Err(PciError::SlotUnavailable(0))
    ));
    root.add_device(dev.clone(), p(vec![0xc000, 0x1000], Some(3)))
        .unwrap();
    // Second copy at the same addresses overlaps: nothing left mapped from it.
    assert!(matches!(
        root.add_device(dev.clone(), p(vec![0xc100, 0x1000], None)),
        Err(PciError::Map { index: 1, .. })
    ));
    let mut b = [0u8; 1];
    assert!(!pio.read(0xc100, &mut b));
    assert_eq!(root.devices().len(), 2);
}

#[test]
fn fuzz_regressions_and_corpus_replay() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    for dir in ["regressions-pci", "corpus/pci"] {
        let Ok(rd) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for e in rd.flatten() {
            super::fuzzing::run(&std::fs::read(e.path()).unwrap());
        }
    }
    // A few fixed inputs: sizing, moving onto another device, disabling.
    let mut seq = Vec::new();
    for (port, v) in [
        (0u8, 0x10u32),
        (4, 0xffff_ffff),
        (0, 0x14),
        (4, 0xfec0_0000),
        (0, 0x04),
        (4, 0),
        (4, 3),
    ] {
        seq.push(4);
        seq.push(port);
        seq.extend_from_slice(&v.to_le_bytes());
        seq.push(0);
    }
    super::fuzzing::run(&seq);
}

/// Every stored input of the `pci_config` target (the minimized corpus and
/// `devices/fuzz/regressions-pci_config`) runs clean.
#[test]
fn fuzz_config_corpus_replay() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in ["corpus/pci_config", "regressions-pci_config"] {
        let Ok(rd) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for e in rd.flatten() {
            super::fuzzing_config::run(&std::fs::read(e.path()).unwrap());
            n += 1;
        }
    }
    assert!(n > 0, "no stored inputs for fuzz target pci_config");
}

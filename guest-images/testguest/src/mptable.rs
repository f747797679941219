//! Intel MultiProcessor Specification 1.4 table: count enabled processors.

/// Result of looking for an MP table.
pub enum MpInfo {
    /// Enabled processor entries in the configuration table.
    Table {
        cpus: u32,
    },
    /// Floating pointer without a table: one of the default configurations
    /// (always two processors).
    Default {
        config_type: u8,
    },
    NotFound,
}

fn read8(addr: u64) -> u8 {
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

fn read16(addr: u64) -> u16 {
    unsafe { core::ptr::read_volatile(addr as *const u16) }
}

fn read32(addr: u64) -> u32 {
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

fn checksum_ok(addr: u64, len: u64) -> bool {
    (0..len).fold(0u8, |s, i| s.wrapping_add(read8(addr + i))) == 0
}

/// "_MP_" on a 16-byte boundary with a valid checksum over `length * 16`.
fn scan(start: u64, end: u64) -> Option<u64> {
    let mut a = start & !15;
    while a + 16 <= end {
        if read32(a) == u32::from_le_bytes(*b"_MP_") {
            let len = read8(a + 8) as u64 * 16;
            if len >= 16 && checksum_ok(a, len) {
                return Some(a);
            }
        }
        a += 16;
    }
    None
}

fn find_floating() -> Option<u64> {
    // Where the spec says to look: the first KiB of the EBDA (segment at BDA
    // 0x40e), the last KiB of base memory, then the BIOS ROM area.
    let ebda = (read16(0x40e) as u64) << 4;
    if (0x80000..0xa0000).contains(&ebda) {
        if let Some(a) = scan(ebda, ebda + 1024) {
            return Some(a);
        }
    }
    scan(0x9fc00, 0xa0000).or_else(|| scan(0xf0000, 0x100000))
}

pub fn probe() -> MpInfo {
    let Some(fp) = find_floating() else {
        return MpInfo::NotFound;
    };
    let config = read32(fp + 4) as u64;
    let feature1 = read8(fp + 11);
    if config == 0 {
        return if feature1 != 0 {
            MpInfo::Default {
                config_type: feature1,
            }
        } else {
            MpInfo::NotFound
        };
    }
    if read32(config) != u32::from_le_bytes(*b"PCMP") {
        return MpInfo::NotFound;
    }
    let base_len = read16(config + 4) as u64;
    let end = config + base_len;
    // Entries follow the 44-byte header; processors (type 0) are 20 bytes,
    // every other base entry type is 8 bytes. Walk by the table length, not
    // the entry count at offset 34, like Linux does: qboot (QEMU microvm's
    // firmware) leaves the count at 0.
    let mut p = config + 44;
    let mut cpus = 0;
    while p < end {
        match read8(p) {
            0 => {
                if read8(p + 3) & 1 != 0 {
                    cpus += 1;
                }
                p += 20;
            }
            1..=4 => p += 8,
            _ => break, // unknown type: its length is unknown too
        }
    }
    MpInfo::Table { cpus }
}

/// An MP table I/O interrupt entry (type 3) for a PCI INTx.
pub struct IntxEntry {
    /// The destination IOAPIC's address (from its type 2 entry).
    pub ioapic: u64,
    pub pin: u8,
    /// MPS flags: polarity bits 1:0, trigger mode bits 3:2.
    pub flags: u16,
}

/// The configuration table's entries as (address, type), walked by length.
fn entries() -> impl Iterator<Item = (u64, u8)> {
    let (mut p, end) = match find_floating().map(|fp| read32(fp + 4) as u64) {
        Some(config) if config != 0 && read32(config) == u32::from_le_bytes(*b"PCMP") => {
            (config + 44, config + read16(config + 4) as u64)
        }
        _ => (0, 0),
    };
    core::iter::from_fn(move || {
        if p >= end {
            return None;
        }
        let (at, kind) = (p, read8(p));
        p += match kind {
            0 => 20,
            1..=4 => 8,
            _ => return None,
        };
        Some((at, kind))
    })
}

/// The address of the IOAPIC with MP id `id`.
fn ioapic_address(id: u8) -> Option<u64> {
    entries()
        .find(|&(a, k)| k == 2 && read8(a + 1) == id)
        .map(|(a, _)| read32(a + 4) as u64)
}

/// The first IOAPIC's address.
pub fn first_ioapic() -> Option<u64> {
    entries()
        .find(|&(_, k)| k == 2)
        .map(|(a, _)| read32(a + 4) as u64)
}

/// Where PCI `bus`/`dev`'s INTx `pin` (1 = INTA) goes: the I/O interrupt entry
/// (interrupt type INT) whose source is that bus (a "PCI   " bus entry) and
/// source IRQ `dev << 2 | pin - 1`, as MPS 1.4 D.3 lays out PCI sources.
pub fn pci_intx(bus: u8, dev: u8, pin: u8) -> Option<IntxEntry> {
    let is_pci_bus = |id: u8| {
        entries().any(|(a, k)| {
            k == 1
                && read8(a + 1) == id
                && (0..6).all(|i| read8(a + 2 + i) == b"PCI   "[i as usize])
        })
    };
    let src = dev << 2 | (pin - 1) & 3;
    let (a, _) = entries().find(|&(a, k)| {
        k == 3 && read8(a + 1) == 0 && read8(a + 4) == bus && read8(a + 5) == src && is_pci_bus(bus)
    })?;
    Some(IntxEntry {
        ioapic: ioapic_address(read8(a + 6))?,
        pin: read8(a + 7),
        flags: read16(a + 2),
    })
}

//! Intel MultiProcessor Specification 1.4 tables, so a Linux guest finds its CPUs,
//! the IOAPIC and its interrupt routing (ISA and PCI INTx) without ACPI.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MpTableError {
    #[error("{0} vCPUs cannot be described by an MP table (at most 254): use fewer --cpus")]
    TooManyCpus(u32),
}

/// The IOAPIC's MP-table id: one past the last LAPIC id.
pub fn ioapic_id(cpus: u32) -> u8 {
    cpus as u8
}

/// A PCI INTx routing: device number on bus 0, pin (1 = INTA .. 4 = INTD), IOAPIC pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIntx {
    pub device: u8,
    pub pin: u8,
    pub ioapic_pin: u8,
}

const PCI_BUS: u8 = 0;
const ISA_BUS: u8 = 1;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// The IOAPIC pins an ISA IRQ reaches in KVM's default routing: IRQ i → pin i.
const ISA_IRQS: u8 = 16;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Build the floating pointer and the configuration table, laid out to start at
/// guest-physical `base`. Returns the bytes to write at `base`.
pub fn build(base: u64, cpus: u32, pci_intx: &[PciIntx]) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > 254 {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    let ioapic = ioapic_id(cpus);
    let table_addr = base + 16;

    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = if id == 0 { 0x3 } else { 0x1 }; // enabled, BSP
        entries.extend_from_slice(&[0, id as u8, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // CPU signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU | APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    for (id, name) in [(PCI_BUS, b"PCI   "), (ISA_BUS, b"ISA   ")] {
        entries.extend_from_slice(&[1, id]);
        entries.extend_from_slice(name);
        count += 1;
    }
    entries.extend_from_slice(&[2, ioapic, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(crate::layout::IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        // type 3 (I/O interrupt), INT, flags 0 (conforms to bus: edge, active high)
        entries.extend_from_slice(&[3, 0, 0, 0, ISA_BUS, irq, ioapic, irq]);
        count += 1;
    }
    for p in pci_intx {
        // PCI INTx: level-triggered (bits 3:2 = 3), active low (bits 1:0 = 3).
        let src = (p.device << 2) | (p.pin.saturating_sub(1) & 3);
        entries.extend_from_slice(&[3, 0, 0x0f, 0, PCI_BUS, src, ioapic, p.ioapic_pin]);
        count += 1;
    }
    // Local interrupts: ExtINT to the BSP's LINT0, NMI to every LINT1.
    entries.extend_from_slice(&[4, 3, 0, 0, ISA_BUS, 0, 0, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, ISA_BUS, 0, 0xff, 1]);
    count += 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    let length = (44 + entries.len()) as u16;
    table.extend_from_slice(&length.to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"WBVMM   "); // OEM id (8)
    table.extend_from_slice(b"WBVMM-MPTBL "); // product id (12)
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(crate::layout::LAPIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(16 + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&(table_addr as u32).to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(4); // spec revision
    out.push(0); // checksum, below
    out.extend_from_slice(&[0; 5]); // feature bytes: 0 = a table is present
    out[10] = checksum(&out[..16]);
    out.extend_from_slice(&table);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_counts_and_entries() {
        let intx = [PciIntx {
            device: 3,
            pin: 1,
            ioapic_pin: 16,
        }];
        let t = build(0x9fc00, 4, &intx).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
        assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()), 0x9fc10);
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0, "table checksum");
        let count = u16::from_le_bytes([table[34], table[35]]);
        // 4 CPUs + 2 buses + 1 IOAPIC + 16 ISA + 1 PCI + 2 local
        assert_eq!(count, 26);
        assert_eq!(len, 44 + 4 * 20 + (26 - 4) * 8);
        // Walk the entries the way Linux does and check what they say.
        let mut off = 44;
        let (mut cpus, mut bsp, mut pci_found) = (0, 0, false);
        while off < len {
            match table[off] {
                0 => {
                    cpus += 1;
                    if table[off + 3] & 2 != 0 {
                        bsp += 1;
                        assert_eq!(table[off + 1], 0);
                    }
                    off += 20;
                }
                3 => {
                    if table[off + 4] == PCI_BUS {
                        assert_eq!(table[off + 5], 3 << 2);
                        assert_eq!(table[off + 7], 16);
                        assert_eq!(table[off + 6], 4, "IOAPIC id follows the CPUs");
                        pci_found = true;
                    }
                    off += 8;
                }
                1 | 2 | 4 => off += 8,
                t => panic!("unknown entry type {t}"),
            }
        }
        assert_eq!((cpus, bsp, pci_found), (4, 1, true));
    }

    #[test]
    fn cpu_limits() {
        assert_eq!(build(0, 0, &[]), Err(MpTableError::TooManyCpus(0)));
        assert_eq!(build(0, 255, &[]), Err(MpTableError::TooManyCpus(255)));
        assert!(build(0, 254, &[]).is_ok());
    }
}

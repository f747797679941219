//! The guest-physical memory map wbvmm presents (x86_64, no firmware, no ACPI).
//!
//! ```text
//! 0x0000_0000  IVT/BDA (zero)
//! 0x0000_0500  boot GDT            (64-bit Linux protocol)
//! 0x0000_0520  boot IDT (empty)
//! 0x0000_6000  PVH hvm_start_info, 0x6040 module list
//! 0x0000_7000  Linux zero page, or the PVH memmap
//! 0x0000_8ff0  boot stack top      (64-bit Linux protocol)
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000 PD (identity map of the first 1 GiB)
//! 0x0002_0000  kernel command line (2048 bytes)
//! 0x0009_fc00  MP floating pointer + MP table   (reserved in the e820)
//! 0x000a_0000  VGA / ROM hole                    (not RAM)
//! 0x0010_0000  kernel load address (HIMEM)
//! ...          RAM up to min(size, 3 GiB)
//! 0xc000_0000  32-bit PCI MMIO window (BARs)
//! 0xfebf_f000  RTL8139 MMIO BAR (default)
//! 0xfec0_0000  IOAPIC (in-kernel)
//! 0xfee0_0000  LAPIC (in-kernel)
//! 0xfffb_c000  KVM identity map page, 0xfffb_d000 KVM TSS (3 pages)
//! 4 GiB        RAM above the hole, when the guest has more than 3 GiB
//! ```

pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MODLIST_START: u64 = 0x6040;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const PVH_MEMMAP_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x20000;
/// x86 COMMAND_LINE_SIZE, including the NUL. Longer lines are an error, never
/// silently truncated.
pub const CMDLINE_MAX_SIZE: usize = 2048;
pub const MPTABLE_START: u64 = 0x9fc00;
/// End of conventional low memory: [MPTABLE_START, 1 MiB) is not RAM.
pub const EBDA_START: u64 = 0x9fc00;
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole; RAM beyond this goes above 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
pub const KVM_TSS_START: u64 = 0xfffb_d000;

/// The RAM ranges (gpa, size) for a guest of `mem_size` bytes: below the MMIO hole,
/// then the rest from 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, mem_size - MMIO_HOLE_START),
        ]
    }
}

/// An e820 / PVH memmap entry type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Type {
    Ram = 1,
    Reserved = 2,
}

/// The memory map the guest is told about: conventional memory up to the MP table,
/// the reserved MP table and BIOS area, RAM from 1 MiB, and RAM above 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, E820Type)> {
    let mut map = vec![
        (0, EBDA_START, E820Type::Ram),
        (EBDA_START, HIMEM_START - EBDA_START, E820Type::Reserved),
    ];
    for (start, size) in ram_ranges(mem_size) {
        let (s, e) = (start.max(HIMEM_START), start + size);
        if e > s {
            map.push((s, e - s, E820Type::Ram));
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_ranges_split_at_hole() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(ram_ranges(3 << 30), vec![(0, 3 << 30)]);
        assert_eq!(ram_ranges(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
    }

    #[test]
    fn e820_has_low_ram_reserved_area_and_high_ram() {
        let m = e820_map(5 << 30);
        assert_eq!(m[0], (0, 0x9fc00, E820Type::Ram));
        assert_eq!(m[1], (0x9fc00, 0x100000 - 0x9fc00, E820Type::Reserved));
        assert_eq!(m[2], (0x100000, (3 << 30) - 0x100000, E820Type::Ram));
        assert_eq!(m[3], (4 << 30, 2 << 30, E820Type::Ram));
        // No RAM entry overlaps another entry.
        for w in m.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0);
        }
    }
}

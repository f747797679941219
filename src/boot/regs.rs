//! Initial vCPU state for the two entry protocols: 64-bit Linux (long mode, paging
//! on, identity map of the first GiB) and PVH (32-bit protected mode, paging off).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::*;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// A GDT entry from flags, base and limit (the usual packed layout).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Decode a GDT entry into the segment KVM wants (limit scaled when G=1).
pub fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: (((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000)),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if present == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// The GDT for the 64-bit Linux entry: null, code64, data, TSS.
pub const LINUX_GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// The GDT for PVH: null, 32-bit flat code, data, a byte-granular 32-bit busy TSS.
pub const PVH_GDT: [u64; 4] = [
    0,
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x008b, 0, 0x67),
];

fn write_gdt(mem: &GuestMemoryMmap, gdt: &[u64]) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
}

/// Identity-map the first GiB with 2 MiB pages (enough for the kernel, its
/// decompressor, the zero page and the command line).
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))?;
    }
    Ok(())
}

fn set_segments(sregs: &mut kvm_sregs, gdt: &[u64; 4]) {
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
}

/// Long mode with paging, for the Linux 64-bit boot protocol. `sregs` must come from
/// `get_sregs()` so that the APIC base survives.
pub fn setup_long_mode(
    mem: &GuestMemoryMmap,
    sregs: &mut kvm_sregs,
) -> Result<(), vm_memory::GuestMemoryError> {
    write_gdt(mem, &LINUX_GDT)?;
    write_page_tables(mem)?;
    set_segments(sregs, &LINUX_GDT);
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(())
}

/// 32-bit flat protected mode, paging off, for PVH.
pub fn setup_pvh(
    mem: &GuestMemoryMmap,
    sregs: &mut kvm_sregs,
) -> Result<(), vm_memory::GuestMemoryError> {
    write_gdt(mem, &PVH_GDT)?;
    set_segments(sregs, &PVH_GDT);
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
    Ok(())
}

pub fn linux_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        rflags: 0x2,
        ..Default::default()
    }
}

pub fn pvh_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rbx: PVH_INFO_START,
        rflags: 0x2,
        ..Default::default()
    }
}

/// x87 and SSE exceptions masked, as after FNINIT.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs a kernel expects in a known state at entry: (index, value).
pub const BOOT_MSRS: &[(u32, u64)] = &[
    (0x174, 0),             // SYSENTER_CS
    (0x175, 0),             // SYSENTER_ESP
    (0x176, 0),             // SYSENTER_EIP
    (0xc000_0081, 0),       // STAR
    (0xc000_0082, 0),       // LSTAR
    (0xc000_0083, 0),       // CSTAR
    (0xc000_0084, 0),       // SYSCALL_MASK
    (0xc000_0102, 0),       // KERNEL_GS_BASE
    (0x10, 0),              // TSC: a host write of 0 is KVM's signal to sync the vCPUs' TSCs
    (0x1a0, 1),             // MISC_ENABLE: fast strings
    (0x2ff, (1 << 11) | 6), // MTRRdefType: enabled, write-back
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_the_well_known_values() {
        assert_eq!(LINUX_GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(LINUX_GDT[2], 0x00cf_9300_0000_ffff);
        assert_eq!(LINUX_GDT[3], 0x008f_8b00_0000_ffff);
        let cs = segment_from_gdt(LINUX_GDT[1], 1);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.limit, cs.type_, cs.present),
            (8, 1, 0, 0xffff_ffff, 0xb, 1)
        );
        let tss = segment_from_gdt(PVH_GDT[3], 3);
        assert_eq!((tss.limit, tss.g, tss.type_), (0x67, 0, 0xb));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn page_tables_identity_map_first_gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut sregs = kvm_sregs::default();
        setup_long_mode(&mem, &mut sregs).unwrap();
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(PML4_START)).unwrap(),
            PDPTE_START | 3
        );
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(PDE_START + 8 * 511))
                .unwrap(),
            (511 << 21) | 0x83
        );
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.efer & EFER_LMA, 0);
        assert_eq!(sregs.cs.selector, 8);
    }
}

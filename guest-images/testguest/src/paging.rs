//! Identity mappings above 4 GiB, made at CPL3 on demand.
//!
//! The boot page tables (static, in `entry`) map 0-4 GiB. The page tables
//! themselves are ordinary user-accessible, writable memory, so CPL3 code
//! can add PDPT entries without a trip to CPL0. No TLB flush is needed:
//! CPUs do not cache not-present entries, and a shadow-paging hypervisor
//! (PVM) traps the write to the shadowed page table and updates its copy.

use crate::Global;

/// Highest address (exclusive) this module can map: 64 GiB.
pub const LIMIT: u64 = 64 << 30;
const GIB: u64 = 1 << 30;
const LOW_GIBS: usize = 4; // mapped at boot
const HIGH_GIBS: usize = (LIMIT / GIB) as usize - LOW_GIBS;

extern "C" {
    /// The boot PDPT (entry 0 of the PML4), see `entry`.
    static mut pdpt: [u64; 512];
}

#[repr(C, align(4096))]
struct PageDirs([[u64; 512]; HIGH_GIBS]);

// 240 KiB of .bss: zero-filled by the loader (fresh guest RAM), filled
// here only for the GiBs that get mapped.
static HIGH_PDS: Global<PageDirs> = Global::new(PageDirs([[0; 512]; HIGH_GIBS]));

/// Page-table entry bits for a 2 MiB page: P | RW | US | PS.
const PDE_2M: u64 = 0x87;
/// PWT | PCD: uncached, for device memory.
const PDE_UNCACHED: u64 = 0x18;
/// P | RW | US for a PDPT entry pointing at a page directory.
const PDPTE_TABLE: u64 = 0x7;

/// Makes sure [start, end) is identity-mapped (2 MiB pages, user, writable).
/// GiBs newly mapped here get write-back caching, or uncached if `uncached`;
/// GiBs already mapped keep theirs. False if the range reaches `LIMIT`.
pub fn ensure_identity_mapped(start: u64, end: u64, uncached: bool) -> bool {
    if end <= start {
        return true;
    }
    if end > LIMIT {
        return false;
    }
    #[allow(clippy::needless_range_loop)] // gib is an address, not just an index
    for gib in (start / GIB) as usize..=((end - 1) / GIB) as usize {
        if gib < LOW_GIBS {
            continue;
        }
        // SAFETY: single CPU; the entries are only read by the MMU.
        unsafe {
            let pdpte = core::ptr::addr_of_mut!(pdpt[gib]);
            if core::ptr::read_volatile(pdpte) != 0 {
                continue;
            }
            let pd = &mut (*HIGH_PDS.get()).0[gib - LOW_GIBS];
            let flags = PDE_2M | if uncached { PDE_UNCACHED } else { 0 };
            for (i, e) in pd.iter_mut().enumerate() {
                *e = (gib as u64 * GIB + ((i as u64) << 21)) | flags;
            }
            // The directory must be complete before the MMU can see it.
            core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
            core::ptr::write_volatile(pdpte, pd.as_ptr() as u64 | PDPTE_TABLE);
        }
    }
    true
}

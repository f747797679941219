//! `memcheck`: write an address-dependent pattern to every 8-byte word of
//! RAM above the guest's own image, then read it all back.
//!
//! Runs at CPL3, natively; the cost is dominated by the host faulting in
//! guest memory on first touch. Writing everything before reading anything
//! also catches aliasing (two guest-physical ranges backed by one host page).

use crate::entry;
use crate::paging;
use crate::pvh::{BootInfo, MEMMAP_RAM};

/// Highest address memcheck can map (see `paging`).
const MAPPED_LIMIT: u64 = paging::LIMIT;

pub enum MemcheckResult {
    Ok {
        bytes: u64,
        ranges: u32,
        skipped_high: u64,
    },
    Fail {
        addr: u64,
        wrote: u64,
        read: u64,
    },
    NoMemmap,
}

#[inline(always)]
fn pattern(addr: u64) -> u64 {
    // Multiplying by an odd constant is a bijection on u64, so every
    // address gets its own pattern (aliased ranges cannot agree), and
    // neighbouring words differ in many bits.
    addr.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xa5a5_5a5a_a5a5_5a5a
}

/// Lowest address memcheck may overwrite: 2 MiB, or above the image (code,
/// data, stacks, page tables) if it ever grows past that.
pub fn check_floor() -> u64 {
    let end = core::ptr::addr_of!(entry::__image_end) as u64;
    let two_mib = 2 << 20;
    (end + two_mib - 1) & !(two_mib - 1)
}

/// The testable part of each RAM range: above the floor, below 4 GiB,
/// 8-byte aligned.
fn ranges(info: &BootInfo, mut f: impl FnMut(u64, u64)) -> u64 {
    let floor = check_floor();
    let mut skipped_high = 0;
    for r in info.memmap().iter().filter(|r| r.kind == MEMMAP_RAM) {
        let end = r.addr.saturating_add(r.size);
        if end > MAPPED_LIMIT {
            skipped_high += end - r.addr.max(MAPPED_LIMIT);
        }
        let start = (r.addr.max(floor) + 7) & !7;
        let end = end.min(MAPPED_LIMIT) & !7;
        if start < end {
            // RAM: write-back. Maps only what lies above the boot tables.
            paging::ensure_identity_mapped(start, end, false);
            f(start, end);
        }
    }
    skipped_high
}

pub fn memcheck(info: &BootInfo) -> MemcheckResult {
    if !info.has_memmap {
        return MemcheckResult::NoMemmap;
    }
    let mut bytes = 0;
    let mut count = 0;
    let skipped_high = ranges(info, |start, end| {
        let mut a = start;
        while a < end {
            unsafe { core::ptr::write_volatile(a as *mut u64, pattern(a)) };
            a += 8;
        }
        bytes += end - start;
        count += 1;
    });
    let mut fail = None;
    ranges(info, |start, end| {
        if fail.is_some() {
            return;
        }
        let mut a = start;
        while a < end {
            let v = unsafe { core::ptr::read_volatile(a as *const u64) };
            if v != pattern(a) {
                fail = Some((a, v));
                return;
            }
            a += 8;
        }
    });
    match fail {
        Some((addr, read)) => MemcheckResult::Fail {
            addr,
            wrote: pattern(addr),
            read,
        },
        None => MemcheckResult::Ok {
            bytes,
            ranges: count,
            skipped_high,
        },
    }
}

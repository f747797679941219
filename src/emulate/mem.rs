//! Guest-physical memory as the emulator sees it, and the host-pointer operations
//! both the real and the fake memory use (so the unit tests exercise the same
//! atomics as the VMM).

use std::sync::atomic::{AtomicU64, Ordering};

/// A guest-physical access the memory refused: not RAM (MMIO, a hole), or a write to
/// a read-only slot. The emulator does not route such accesses to devices: the VM
/// ends with a line naming the address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotRam {
    pub gpa: u64,
    pub write: bool,
}

/// Guest-physical memory. Callers never pass a range that crosses a 4 KiB page
/// boundary, and the compare-exchanges are naturally aligned (8 or 16 bytes);
/// implementations may rely on both.
pub trait GuestPhysMem {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), NotRam>;
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), NotRam>;
    /// Atomic compare-exchange of the 8 bytes at `gpa` (8-aligned): the value that
    /// was there (the exchange happened iff it equals `old`).
    fn cmpxchg64(&self, gpa: u64, old: u64, new: u64) -> Result<u64, NotRam>;
    /// Atomic compare-exchange of the 16 bytes at `gpa` (16-aligned).
    fn cmpxchg128(&self, gpa: u64, old: u128, new: u128) -> Result<u128, NotRam>;
}

pub const PAGE: u64 = 4096;

/// Host-side primitives over a host address that maps guest RAM.
pub mod host {
    use super::*;

    /// # Safety
    /// `[host, host + buf.len())` must be mapped and readable.
    pub unsafe fn read(host: u64, buf: &mut [u8]) {
        // Guest RAM may change under us (other vCPUs): a plain copy, as vm-memory does.
        std::ptr::copy_nonoverlapping(host as *const u8, buf.as_mut_ptr(), buf.len());
    }

    /// # Safety
    /// `[host, host + data.len())` must be mapped and writable.
    pub unsafe fn write(host: u64, data: &[u8]) {
        std::ptr::copy_nonoverlapping(data.as_ptr(), host as *mut u8, data.len());
    }

    /// # Safety
    /// `host` must be 8-aligned, mapped and writable.
    pub unsafe fn cmpxchg64(host: u64, old: u64, new: u64) -> u64 {
        let a = AtomicU64::from_ptr(host as *mut u64);
        match a.compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(v) | Err(v) => v,
        }
    }

    /// A real `lock cmpxchg16b` on the host mapping, so concurrent vCPUs (native or
    /// emulated) see one atomic 16-byte operation.
    ///
    /// # Safety
    /// `host` must be 16-aligned, mapped and writable, and the host CPU must have
    /// CMPXCHG16B (see [`has_cmpxchg16b`]).
    pub unsafe fn cmpxchg128(host: u64, old: u128, new: u128) -> u128 {
        // Inline assembly rather than core::arch::x86_64::cmpxchg16b, which may be
        // lowered to a libatomic call when not inlined with the feature enabled.
        // RBX is reserved by LLVM: swap the new value's low half in and out.
        let (mut lo, mut hi) = (old as u64, (old >> 64) as u64);
        core::arch::asm!(
            "xchg {nlo}, rbx",
            "lock cmpxchg16b xmmword ptr [{p}]",
            "mov rbx, {nlo}",
            p = in(reg) host,
            nlo = inout(reg) new as u64 => _,
            in("rcx") (new >> 64) as u64,
            inout("rax") lo,
            inout("rdx") hi,
            options(nostack)
        );
        (u128::from(hi) << 64) | u128::from(lo)
    }

    pub fn has_cmpxchg16b() -> bool {
        std::arch::is_x86_feature_detected!("cmpxchg16b")
    }
}

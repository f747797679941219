//! Port I/O, CPUID, TSC and the debug-exit port.
//!
//! All of these work at CPL3: the guest runs with IOPL=3, so `in`/`out` need
//! no I/O bitmap, and `rdtsc` is allowed because CR4.TSD is clear. Every port
//! access is a VM exit (~32 µs from CPL3 on the development hosts, much less
//! for ports the VMM handles in the kernel), so callers should not poll ports
//! needlessly.

use core::arch::asm;

#[inline]
pub fn outb(port: u16, val: u8) {
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") val, options(nomem, nostack, preserves_flags))
    }
}

#[inline]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}

#[inline]
pub fn outw(port: u16, val: u16) {
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") val, options(nomem, nostack, preserves_flags))
    }
}

#[inline]
pub fn inw(port: u16) -> u16 {
    let v: u16;
    unsafe {
        asm!("in ax, dx", out("ax") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}

#[inline]
pub fn outl(port: u16, val: u32) {
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") val, options(nomem, nostack, preserves_flags))
    }
}

#[inline]
pub fn inl(port: u16) -> u32 {
    let v: u32;
    unsafe {
        asm!("in eax, dx", out("eax") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}

#[inline]
pub fn rdtsc() -> u64 {
    // Not serializing; callers time thousands of operations, so the few
    // cycles of reordering do not matter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[derive(Clone, Copy, Debug)]
pub struct Cpuid {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

#[inline]
pub fn cpuid(leaf: u32, subleaf: u32) -> Cpuid {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    Cpuid {
        eax: r.eax,
        ebx: r.ebx,
        ecx: r.ecx,
        edx: r.edx,
    }
}

/// Current privilege level (low two bits of CS).
#[inline]
pub fn cpl() -> u16 {
    let cs: u16;
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) }
    cs & 3
}

/// Debug-exit port (QEMU's isa-debug-exit, wbvmm's debug exit device).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// End the VM with `code` through the debug-exit port (a 32-bit `out`).
/// QEMU's isa-debug-exit reports `(code << 1) | 1` as its exit status.
pub fn exit(code: u32) -> ! {
    outl(DEBUG_EXIT_PORT, code);
    // Only reached without a debug-exit device. Say so once, then spin
    // (no hlt: it would #GP at CPL3).
    crate::println!(
        "testguest: debug-exit port 0x{:x} did not stop the VM (code {})",
        DEBUG_EXIT_PORT,
        code
    );
    loop {
        core::hint::spin_loop();
    }
}

//! wbvmm test guest: a freestanding PVH ELF that sets up long mode at CPL0
//! with as few instructions as possible (CPL0 is emulated on nested PVM KVM
//! hosts) and then does all of its work at CPL3, where it runs natively.
//!
//! Boot: `entry` (32-bit PVH entry, static page tables/GDT, long mode) →
//! `cpu::cpl0_main` (IDT, TSS) → `iretq` to `user_main` at CPL3 with IOPL 3
//! and IF 0. Work is driven by the kernel command line (`commands`).

#![no_std]
#![no_main]

mod commands;
mod cpl0test;
mod cpu;
mod entry;
// Port I/O helpers the current commands do not all use yet (the PCI
// enumerator and NIC driver will).
#[allow(dead_code)]
mod io;
mod mem;
mod memmap;
mod mptable;
mod net;
mod netserver;
mod nicirq;
mod paging;
mod pci;
mod pvh;
mod rtl8139;
mod serial;
mod tsc;

use core::cell::UnsafeCell;

/// A global for a single-CPU guest without interrupts: nothing runs
/// concurrently with its user, so plain interior mutability is enough.
pub struct Global<T>(UnsafeCell<T>);

// SAFETY: one vCPU, interrupts disabled; exception handlers only touch their
// own state.
unsafe impl<T> Sync for Global<T> {}

impl<T> Global<T> {
    pub const fn new(v: T) -> Self {
        Global(UnsafeCell::new(v))
    }
    pub fn get(&self) -> *mut T {
        self.0.get()
    }
}

/// TSC ticks from `_start32` to the first CPL3 instruction (`tsc` word).
pub static CPL0_TICKS: Global<u64> = Global::new(0);

/// First CPL3 code. `start_info` is the PVH `hvm_start_info` address.
pub extern "C" fn user_main(start_info: u64) -> ! {
    let t = io::rdtsc();
    // Zero .bss except stacks and CPU tables: loaders zero-fill it on the
    // first boot (fresh RAM), but not necessarily after a reset. Natively
    // at CPL3 this takes microseconds; at CPL0 it would take many ms.
    unsafe {
        let start = core::ptr::addr_of_mut!(entry::__bss_zero_start);
        let end = core::ptr::addr_of_mut!(entry::__bss_zero_end);
        core::ptr::write_bytes(start, 0, end as usize - start as usize);
        *CPL0_TICKS.get() = t.wrapping_sub(core::ptr::read_volatile(core::ptr::addr_of!(
            entry::boot_tsc
        )));
    }
    let info = pvh::BootInfo::read(start_info);
    let code = commands::run(info);
    io::exit(code)
}

/// Exit status after a Rust panic.
const PANIC_EXIT: u32 = 0x7e;

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("testguest: panic: {}", info);
    io::exit(PANIC_EXIT)
}

/// The precompiled `core` references this symbol even with panic=abort.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

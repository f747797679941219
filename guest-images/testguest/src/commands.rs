//! Command-line words: the guest's whole behaviour.
//!
//! Words are separated by spaces and run in order; `exit=N` only sets the
//! final status, which is reported through the debug-exit port after the
//! last word. Exit statuses: 0 default, 3 memcheck failure or no memmap,
//! 4 timeout (watch, echo, hold), 5 reset did not reset, 6 triple-fault did not
//! end the VM, 0x7e panic, 0x7f unexpected exception.

use crate::io::{self, rdtsc};
use crate::memmap::{self, MemcheckResult};
use crate::mptable::{self, MpInfo};
use crate::pvh::BootInfo;
use crate::{cpu, net, paging, print, println, serial, tsc};
use core::arch::asm;

pub const EXIT_MEMCHECK: u32 = 3;
pub const EXIT_TIMEOUT: u32 = 4;
pub const EXIT_RESET_FAILED: u32 = 5;
pub const EXIT_TRIPLE_FAULT_FAILED: u32 = 6;

/// Bound on polling loops that wait for the host or the user.
const POLL_TIMEOUT_NS: u64 = 60_000_000_000;
/// `hold` waits this long for the host unless told otherwise; a bound for a
/// broken test, never a pass condition.
const HOLD_DEFAULT_SECS: u64 = 600;
const HOLD_MAX_SECS: u64 = 3600;

/// Runs every word; returns the exit status (`exit=N`, default 0). Words
/// that fail fatally end the VM themselves.
pub fn run(info: &BootInfo) -> u32 {
    let mut exit_code = 0;
    // Network settings (ip=, peer=, nic=, ...) apply wherever they appear
    // on the line: collect them all before running any word.
    let mut net_args = net::NetArgs::new();
    for word in info.cmdline().split_ascii_whitespace() {
        if let Some((n, v)) = word.split_once('=') {
            if let Err(e) = net_args.set(n, v) {
                println!("net: {}: {}", word, e);
            }
        }
    }
    for word in info.cmdline().split_ascii_whitespace() {
        let (name, arg) = match word.split_once('=') {
            Some((n, a)) => (n, Some(a)),
            None => (word, None),
        };
        match (name, arg) {
            ("banner", None) => banner(info),
            ("echo", None) => echo(),
            ("hold", None) => hold(HOLD_DEFAULT_SECS),
            ("hold", Some(a)) => match parse_num(a) {
                Some(n) if (1..=HOLD_MAX_SECS).contains(&n) => hold(n),
                _ => println!(
                    "hold: bad argument {} (want seconds, 1..{})",
                    a, HOLD_MAX_SECS
                ),
            },
            ("cpus", None) => cpus(),
            ("memcheck", None) => memcheck(info),
            ("mmio-loop", Some(a)) => match parse_pair(a) {
                Some((addr, count)) => mmio_loop(addr, count),
                None => println!("mmio-loop: bad argument {} (want ADDR,COUNT)", a),
            },
            ("watch", Some(a)) => match parse_pair(a) {
                Some((addr, n)) => watch(addr, n),
                None => println!("watch: bad argument {} (want ADDR,N)", a),
            },
            ("tsc", None) => {
                let f = tsc::freq();
                let cpl0_us = tsc::ticks_to_ns(unsafe { *crate::CPL0_TICKS.get() }) / 1000;
                println!(
                    "tsc: {} kHz from {} (boot at CPL0: {} us)",
                    f.khz,
                    f.source.describe(),
                    cpl0_us
                );
            }
            ("exit", Some(a)) => match parse_num(a) {
                Some(n) if n <= u32::MAX as u64 => exit_code = n as u32,
                _ => println!("exit: bad argument {}", a),
            },
            ("reset", None) => reset(),
            ("triple-fault", None) => triple_fault(),
            // Exception-path checks: #BP returns, #UD ends the VM with 0x7f.
            ("int3", None) => {
                // Not `nomem`: the handler prints, which touches the serial state.
                unsafe { asm!("int3", options(nostack)) };
                println!("int3: returned");
            }
            ("ud2", None) => unsafe { asm!("ud2", options(nomem, nostack)) },
            ("int80", None) => {
                let mut v: u64 = 0x7f;
                unsafe { asm!("int 0x80", inout("rax") v, options(nostack)) };
                println!("int80: returned rax=0x{:x}", v);
            }
            ("cpuid", None) => cpuid_word(),
            ("cpl0-insns", None) => crate::cpl0test::cpl0_insns(),
            ("syscall-probe", None) => crate::cpl0test::syscall_probe(),
            ("cpl0-unsupported", None) => crate::cpl0test::cpl0_unsupported(),
            ("dmatx", Some(a)) => match parse_triple(a) {
                Some((gpa, len, mailbox)) => {
                    let status = net::dma_tx(&net_args, gpa, len, mailbox);
                    if status != 0 {
                        io::exit(status);
                    }
                }
                None => println!("dmatx: bad argument {} (want GPA,LEN,MAILBOX)", a),
            },
            ("soak", Some(a)) => match parse_num(a) {
                Some(secs) if (1..=86_400).contains(&secs) => {
                    let _ = net::soak(&net_args, secs);
                }
                _ => println!("soak: bad argument {} (want SECS, 1..86400)", a),
            },
            ("net", Some(a)) => {
                let status = match a {
                    "up" => net::up(&net_args),
                    "ping" => net::ping(&net_args),
                    "rr" => net::rr(&net_args),
                    "netserver" => crate::netserver::netserver(&net_args),
                    _ => {
                        println!("net: unknown action {} (up, ping, rr, netserver)", a);
                        net::EXIT_NET_SETUP
                    }
                };
                crate::nicirq::quiesce();
                if status != 0 {
                    io::exit(status);
                }
            }
            // Network settings: already taken before the first word.
            (
                "ip" | "peer" | "count" | "port" | "secs" | "trans" | "tests" | "nic" | "nicio"
                | "nicbars" | "nicrx" | "nicdrv" | "csum",
                Some(_),
            ) => {}
            _ => println!("testguest: unknown word {}", word),
        }
    }
    exit_code
}

/// Hex with a `0x` prefix, or decimal.
pub fn parse_num(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

fn parse_pair(s: &str) -> Option<(u64, u64)> {
    let (a, b) = s.split_once(',')?;
    Some((parse_num(a)?, parse_num(b)?))
}

fn parse_triple(s: &str) -> Option<(u64, u64, u64)> {
    let (a, rest) = s.split_once(',')?;
    let (b, c) = parse_pair(rest)?;
    Some((parse_num(a)?, b, c))
}

/// `cpuid`: the feature words the VMM may hide (CX16, XSAVE, ...).
fn cpuid_word() {
    let max = io::cpuid(0, 0).eax;
    let l1 = io::cpuid(1, 0);
    let l7 = if max >= 7 {
        io::cpuid(7, 0)
    } else {
        io::Cpuid {
            eax: 0,
            ebx: 0,
            ecx: 0,
            edx: 0,
        }
    };
    let ld = if max >= 0xd {
        io::cpuid(0xd, 0)
    } else {
        io::Cpuid {
            eax: 0,
            ebx: 0,
            ecx: 0,
            edx: 0,
        }
    };
    println!(
        "cpuid: 1.ecx=0x{:08x} 1.edx=0x{:08x} 7.ebx=0x{:08x} 7.ecx=0x{:08x} 0xd.eax=0x{:08x}",
        l1.ecx, l1.edx, l7.ebx, l7.ecx, ld.eax
    );
}

fn rflags() -> u64 {
    let f: u64;
    unsafe { asm!("pushfq", "pop {}", out(reg) f, options(nomem, preserves_flags)) };
    f
}

fn banner(info: &BootInfo) {
    let iopl = (rflags() >> 12) & 3;
    let image_start = core::ptr::addr_of!(crate::entry::__image_start) as u64;
    let image_end = core::ptr::addr_of!(crate::entry::__image_end) as u64;
    print!("testguest ready: cpl={} iopl={} ", io::cpl(), iopl);
    if info.has_memmap {
        print!(
            "mem={}MiB memmap={} ",
            info.ram_bytes() >> 20,
            info.memmap().len()
        );
    } else {
        print!("mem=? memmap=none ");
    }
    println!(
        "start_info=0x{:x} version={} image=0x{:x}-0x{:x}",
        info.start_info, info.version, image_start, image_end
    );
}

/// Reads one line from COM1 into `buf` (up to '\n' or '\r'; a '\n' right
/// after a '\r' is skipped so CRLF input gives one line; an overlong line
/// keeps its first `buf.len()` bytes). None when `deadline` passes first.
fn read_line(buf: &mut [u8], deadline: &tsc::Deadline) -> Option<usize> {
    static AFTER_CR: crate::Global<bool> = crate::Global::new(false);
    let mut len = 0;
    loop {
        let Some(b) = serial::try_read_byte() else {
            if deadline.expired() {
                return None;
            }
            continue;
        };
        // SAFETY: one CPU, and only this function touches AFTER_CR.
        let after_cr = unsafe { core::mem::replace(&mut *AFTER_CR.get(), b == b'\r') };
        match b {
            b'\n' if after_cr && len == 0 => continue,
            b'\n' | b'\r' => return Some(len),
            _ if len < buf.len() => {
                buf[len] = b;
                len += 1;
            }
            _ => {}
        }
    }
}

/// Reads one line from COM1 and prints it back.
fn echo() {
    let mut buf = [0u8; 256];
    let Some(len) = read_line(&mut buf, &tsc::Deadline::after_ns(POLL_TIMEOUT_NS)) else {
        println!("echo: timeout");
        io::exit(EXIT_TIMEOUT);
    };
    let line = core::str::from_utf8(&buf[..len]).unwrap_or("<not utf-8>");
    println!("echo: {}", line);
}

/// Waits, touching nothing but COM1, until the host sends a line: tests use it
/// to keep the guest busy (its NIC up and unserviced, its threads alive) for
/// exactly as long as the host's side of the test needs, on any machine. The
/// deadline only bounds a test that went wrong.
fn hold(secs: u64) {
    println!("hold: waiting for a line on COM1 (at most {} s)", secs);
    let mut buf = [0u8; 64];
    let deadline = tsc::Deadline::after_ns(secs.saturating_mul(1_000_000_000));
    let Some(len) = read_line(&mut buf, &deadline) else {
        println!("hold: timeout");
        io::exit(EXIT_TIMEOUT);
    };
    let line = core::str::from_utf8(&buf[..len]).unwrap_or("<not utf-8>");
    println!("hold: released by '{}'", line);
}

fn cpus() {
    match mptable::probe() {
        MpInfo::Table { cpus } => println!("cpus: {}", cpus),
        MpInfo::Default { config_type } => {
            println!("cpus: 2 (MP default configuration {})", config_type)
        }
        MpInfo::NotFound => println!("cpus: no MP table"),
    }
}

fn memcheck(info: &BootInfo) {
    let t0 = rdtsc();
    match memmap::memcheck(info) {
        MemcheckResult::Ok {
            bytes,
            ranges,
            skipped_high,
        } => {
            let ms = tsc::ticks_to_ns(rdtsc() - t0) / 1_000_000;
            print!("memcheck: ok {} MiB in {} ranges", bytes >> 20, ranges);
            if skipped_high != 0 {
                print!(" ({} MiB above 64 GiB not checked)", skipped_high >> 20);
            }
            println!(" from 0x{:x}, {} ms", memmap::check_floor(), ms);
        }
        MemcheckResult::Fail { addr, wrote, read } => {
            println!(
                "memcheck: FAIL at 0x{:x}: wrote 0x{:x}, read 0x{:x}",
                addr, wrote, read
            );
            io::exit(EXIT_MEMCHECK);
        }
        MemcheckResult::NoMemmap => {
            println!("memcheck: no memmap");
            io::exit(EXIT_MEMCHECK);
        }
    }
}

fn mmio_loop(addr: u64, count: u64) {
    // Device memory: a GiB mapped here for the first time is uncached.
    if !paging::ensure_identity_mapped(addr, addr.saturating_add(4), true) {
        println!(
            "mmio-loop: 0x{:x} is beyond the mappable {} GiB",
            addr,
            paging::LIMIT >> 30
        );
        return;
    }
    let p = addr as *const u32;
    let mut last = 0u32;
    let t0 = rdtsc();
    for _ in 0..count {
        last = unsafe { core::ptr::read_volatile(p) };
    }
    let ns = tsc::ticks_to_ns(rdtsc() - t0);
    let tenths = (ns * 10).checked_div(count).unwrap_or(0);
    println!(
        "mmio-loop: {} reads of 0x{:x} in {} ns = {}.{} ns/read, last=0x{:x}",
        count,
        addr,
        ns,
        tenths / 10,
        tenths % 10,
        last
    );
}

/// Polls the u64 at `addr`, printing the first value and every change until
/// `n` values were printed. The host maps and unmaps memory there meanwhile
/// (unmapped reads are MMIO exits returning all-ones).
fn watch(addr: u64, n: u64) {
    // Usually RAM the host plugs in: write-back if newly mapped.
    if !paging::ensure_identity_mapped(addr, addr.saturating_add(8), false) {
        println!(
            "watch: 0x{:x} is beyond the mappable {} GiB",
            addr,
            paging::LIMIT >> 30
        );
        return;
    }
    let p = addr as *const u64;
    let deadline = tsc::Deadline::after_ns(POLL_TIMEOUT_NS);
    let mut v = unsafe { core::ptr::read_volatile(p) };
    println!("watch: 0x{:x} = 0x{:x}", addr, v);
    let mut printed = 1;
    while printed < n {
        let now = unsafe { core::ptr::read_volatile(p) };
        if now != v {
            v = now;
            println!("watch: 0x{:x} = 0x{:x}", addr, v);
            printed += 1;
        } else if deadline.expired() {
            println!("watch: timeout");
            io::exit(EXIT_TIMEOUT);
        } else {
            core::hint::spin_loop();
        }
    }
}

fn reset() {
    println!("reset: now");
    // i8042 "pulse output line 0": CPU reset.
    io::outb(0x64, 0xfe);
    // Spin a bounded number of TSC ticks (no calibration needed: ~0.1-0.2 s
    // on any plausible TSC) to give the VMM time to act.
    let t0 = rdtsc();
    while rdtsc().wrapping_sub(t0) < 400_000_000 {
        core::hint::spin_loop();
    }
    println!("reset: still running");
    io::exit(EXIT_RESET_FAILED);
}

fn triple_fault() {
    println!("triple-fault: now");
    // At CPL0: empty IDT, then #UD -> #GP -> #DF -> shutdown.
    cpu::cpl0_call(cpu::Cpl0Request::TripleFault);
    println!("triple-fault: still running");
    io::exit(EXIT_TRIPLE_FAULT_FAILED);
}

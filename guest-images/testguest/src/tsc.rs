//! TSC frequency and time.
//!
//! Sources, in order: the hypervisor timing leaf 0x40000010 (EAX = TSC kHz;
//! wbvmm exposes it, as do VMware and QEMU with `vmware-cpuid-freq`), then
//! CPUID 0x15 (crystal ratio) / 0x16 (base MHz), then a PIT channel 2
//! calibration. Determined lazily, on first use, so a guest that needs no
//! time pays nothing.

use crate::io::{cpuid, inb, outb, rdtsc};
use crate::Global;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    HypervisorLeaf,
    Cpuid15,
    Cpuid16,
    Pit,
    /// Nothing worked; `FALLBACK_KHZ` is assumed.
    Fallback,
}

impl Source {
    pub fn describe(self) -> &'static str {
        match self {
            Source::HypervisorLeaf => "cpuid 0x40000010",
            Source::Cpuid15 => "cpuid 0x15",
            Source::Cpuid16 => "cpuid 0x16",
            Source::Pit => "pit calibration",
            Source::Fallback => "fallback guess (pit calibration failed)",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct TscFreq {
    pub khz: u64,
    pub source: Source,
}

const FALLBACK_KHZ: u64 = 2_000_000;

static FREQ: Global<Option<TscFreq>> = Global::new(None);

/// The TSC frequency, determined on first call.
pub fn freq() -> TscFreq {
    // SAFETY: single CPU, not used from exception handlers.
    unsafe {
        if let Some(f) = *FREQ.get() {
            return f;
        }
        let f = detect();
        *FREQ.get() = Some(f);
        f
    }
}

fn detect() -> TscFreq {
    if let Some(khz) = hypervisor_leaf_khz() {
        return TscFreq {
            khz,
            source: Source::HypervisorLeaf,
        };
    }
    if let Some(f) = cpuid_15_16() {
        return f;
    }
    match pit_calibrate_agreed_khz() {
        Some(khz) => TscFreq {
            khz,
            source: Source::Pit,
        },
        None => TscFreq {
            khz: FALLBACK_KHZ,
            source: Source::Fallback,
        },
    }
}

fn hypervisor_leaf_khz() -> Option<u64> {
    // Leaves 0x4000_00xx mean nothing without the hypervisor bit; on bare
    // metal they echo the highest basic leaf.
    if cpuid(1, 0).ecx & (1 << 31) == 0 {
        return None;
    }
    let max = cpuid(0x4000_0000, 0).eax;
    if !(0x4000_0010..0x4000_0100).contains(&max) {
        return None;
    }
    let khz = cpuid(0x4000_0010, 0).eax;
    (khz != 0).then_some(khz as u64)
}

fn cpuid_15_16() -> Option<TscFreq> {
    let max = cpuid(0, 0).eax;
    if max >= 0x15 {
        let l = cpuid(0x15, 0);
        // TSC Hz = crystal Hz * EBX / EAX; ECX (crystal Hz) may be 0.
        if l.eax != 0 && l.ebx != 0 && l.ecx != 0 {
            let hz = l.ecx as u64 * l.ebx as u64 / l.eax as u64;
            return Some(TscFreq {
                khz: hz / 1000,
                source: Source::Cpuid15,
            });
        }
    }
    if max >= 0x16 {
        // Base frequency in MHz: equals the TSC rate on the parts that have
        // the leaf but leave the crystal frequency out of 0x15.
        let mhz = cpuid(0x16, 0).eax & 0xffff;
        if mhz != 0 {
            return Some(TscFreq {
                khz: mhz as u64 * 1000,
                source: Source::Cpuid16,
            });
        }
    }
    None
}

const PIT_HZ: u64 = 1_193_182;
const PIT_CH0: u16 = 0x40;
const PIT_CMD: u16 = 0x43;

/// Latches and reads PIT channel 0's counter; returns it with the TSC at
/// the latch (midpoint of the TSC readings around the latching `out`).
fn pit_read_ch0() -> (u16, u64) {
    let t0 = rdtsc();
    outb(PIT_CMD, 0x00); // counter latch, channel 0
    let t1 = rdtsc();
    let lo = inb(PIT_CH0) as u16;
    let hi = inb(PIT_CH0) as u16;
    (hi << 8 | lo, t0 + (t1 - t0) / 2)
}

/// Calibrates against PIT channel 0 by reading its counter, not by
/// waiting for OUT2 on port 0x61: QEMU's microvm has a PIT but no port 0x61
/// (reads 0xff), and channel 0's gate is always on. Channel 0 is
/// reprogrammed (one-shot from 0xffff); the PICs are masked, so its IRQ0
/// goes nowhere. The window is ~40 ms; the error is about one port exit at
/// each end (tens of µs).
fn pit_calibrate_khz() -> Option<u64> {
    const WINDOW: u64 = PIT_HZ / 25; // 40 ms of PIT counts (< 0xffff)
    outb(PIT_CMD, 0x30); // channel 0, lobyte/hibyte, mode 0, binary
    outb(PIT_CH0, 0xff);
    outb(PIT_CH0, 0xff);
    let (c0, t0) = pit_read_ch0();
    // Each read costs three exits (~0.1 ms from CPL3), so this bounds the
    // wait to well under a second even if the counter never moves.
    for _ in 0..5_000u32 {
        let (c, t) = pit_read_ch0();
        if c > c0 {
            return None; // wrapped or garbage: no PIT here
        }
        let counted = (c0 - c) as u64;
        if counted >= WINDOW {
            let khz = (t - t0) * PIT_HZ / counted / 1000;
            // A TSC between 100 MHz and 100 GHz, or the PIT is not real.
            return (100_000..100_000_000).contains(&khz).then_some(khz);
        }
    }
    None
}

/// [`pit_calibrate_khz`] until two windows agree within 0.5%, at most 5
/// windows; then the lowest. A vCPU preempted for longer than the PIT's
/// 55 ms wrap during a window loses whole wraps of counts, and that only
/// ever makes the estimate too high (seen on a loaded 2-CPU host: a 3.6x
/// too fast clock), never too low.
fn pit_calibrate_agreed_khz() -> Option<u64> {
    let mut best: Option<u64> = None;
    for _ in 0..5 {
        let khz = pit_calibrate_khz()?;
        if let Some(b) = best {
            if khz.abs_diff(b) * 200 <= b {
                return Some(b.min(khz));
            }
        }
        best = Some(best.map_or(khz, |b| b.min(khz)));
    }
    best
}

/// TSC ticks to nanoseconds at the guest's TSC frequency.
pub fn ticks_to_ns(ticks: u64) -> u64 {
    (ticks as u128 * 1_000_000 / freq().khz as u128) as u64
}

/// Nanoseconds to TSC ticks.
pub fn ns_to_ticks(ns: u64) -> u64 {
    (ns as u128 * freq().khz as u128 / 1_000_000) as u64
}

/// A deadline `ns` from now.
pub struct Deadline(u64);

impl Deadline {
    pub fn after_ns(ns: u64) -> Self {
        Deadline(rdtsc().wrapping_add(ns_to_ticks(ns)))
    }
    pub fn expired(&self) -> bool {
        (rdtsc().wrapping_sub(self.0) as i64) >= 0
    }
}

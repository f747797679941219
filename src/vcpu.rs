//! vCPU threads: the run loop and exit dispatch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::Serialize;
use wbvmm_devices::legacy::{ExitSink, GuestExitRequest};
use wbvmm_devices::Bus;

use crate::coalesced::CoalescedRing;
use crate::emulate::kvm::VcpuEmulator;
use crate::emulate::EmulationStats;
use crate::latency::{ExitKind, ExitLatencies};
use crate::memory::{fill_open_bus, MemoryStats, MmioRoute, MmioRouter, SlotRegistry};
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest wrote this value to the debug-exit port.
    DebugExit(u32),
    /// The guest reset itself (i8042, or KVM's reset system event).
    Reset,
    /// The guest powered off (KVM shutdown system event).
    PowerOff,
    /// The user quit from the console (Ctrl-A x) or signalled wbvmm.
    UserQuit,
    TripleFault {
        vcpu: u32,
        rip: u64,
    },
    /// KVM could not run or emulate guest code.
    InternalError {
        vcpu: u32,
        suberror: u32,
        rip: u64,
        cpl: u8,
        insn: Vec<u8>,
        data: Vec<u64>,
        /// The emulation fallback's reading of the instruction and why it stopped.
        decoded: Option<String>,
    },
    /// VM entry failed (invalid guest state).
    FailEntry {
        vcpu: u32,
        reason: u64,
    },
    /// An exit wbvmm does not handle, or a KVM_RUN error.
    Unexpected {
        vcpu: u32,
        what: String,
    },
}

/// Exit statuses for the ends that the guest did not choose.
pub const EXIT_TRIPLE_FAULT: i32 = 101;
pub const EXIT_INTERNAL_ERROR: i32 = 102;
pub const EXIT_UNEXPECTED: i32 = 103;
pub const EXIT_VMM_ERROR: i32 = 1;
pub const EXIT_USER_QUIT: i32 = 130;

impl VmOutcome {
    /// The process exit status: the debug-exit value's low 8 bits, 0 for a reset or
    /// power-off, and fixed codes for failures.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmOutcome::DebugExit(v) => (*v & 0xff) as i32,
            VmOutcome::Reset | VmOutcome::PowerOff => 0,
            VmOutcome::UserQuit => EXIT_USER_QUIT,
            VmOutcome::TripleFault { .. } => EXIT_TRIPLE_FAULT,
            VmOutcome::InternalError { .. } => EXIT_INTERNAL_ERROR,
            VmOutcome::FailEntry { .. } | VmOutcome::Unexpected { .. } => EXIT_UNEXPECTED,
        }
    }

    /// A one-line reason for ends the guest did not ask for.
    pub fn failure_line(&self) -> Option<String> {
        match self {
            VmOutcome::TripleFault { vcpu, rip } => Some(format!(
                "guest triple fault on vCPU {vcpu} at RIP {rip:#x}; the VM was stopped"
            )),
            VmOutcome::InternalError {
                vcpu,
                suberror,
                rip,
                cpl,
                insn,
                data,
                decoded,
            } => {
                let what = match suberror {
                    1 => "instruction emulation failed",
                    2 => "simultaneous exceptions",
                    3 => "exception during event delivery",
                    4 => "unexpected exit reason",
                    _ => "internal error",
                };
                let bytes: Vec<String> = insn.iter().map(|b| format!("{b:02x}")).collect();
                let decoded = decoded
                    .as_ref()
                    .map(|d| format!(", decoded {d}"))
                    .unwrap_or_default();
                Some(format!(
                    "KVM internal error on vCPU {vcpu}: {what} (suberror {suberror}) at RIP {rip:#x}, CPL {cpl}, instruction bytes [{}]{decoded}, data {data:x?}",
                    bytes.join(" ")
                ))
            }
            VmOutcome::FailEntry { vcpu, reason } => Some(format!(
                "KVM could not enter vCPU {vcpu}: hardware entry failure reason {reason:#x}"
            )),
            VmOutcome::Unexpected { vcpu, what } => Some(format!("vCPU {vcpu} stopped: {what}")),
            _ => None,
        }
    }
}

/// Shared by every vCPU and the main thread: the first end reported wins.
#[derive(Default)]
pub struct ExitState {
    stop: AtomicBool,
    outcome: Mutex<Option<VmOutcome>>,
    cv: Condvar,
}

impl ExitState {
    pub fn finish(&self, outcome: VmOutcome) {
        let mut o = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if o.is_none() {
            *o = Some(outcome);
        }
        self.stop.store(true, Ordering::Release);
        self.cv.notify_all();
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Wait for the outcome, checking `interrupted` now and then (signals).
    /// Returns None early when `snapshot()` says statistics are wanted meanwhile.
    pub fn wait(
        &self,
        interrupted: &dyn Fn() -> bool,
        snapshot: &dyn Fn() -> bool,
    ) -> Option<VmOutcome> {
        let mut o = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(out) = o.clone() {
                return Some(out);
            }
            if snapshot() {
                return None;
            }
            if interrupted() {
                drop(o);
                self.finish(VmOutcome::UserQuit);
                o = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
                continue;
            }
            o = self
                .cv
                .wait_timeout(o, std::time::Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

impl ExitSink for ExitState {
    fn request_exit(&self, request: GuestExitRequest) {
        self.finish(match request {
            GuestExitRequest::DebugExit(v) => VmOutcome::DebugExit(v),
            GuestExitRequest::Reset => VmOutcome::Reset,
        });
    }
}

/// Exits counted by one vCPU, by reason.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ExitCounters {
    pub io_in: u64,
    pub io_out: u64,
    pub mmio_read: u64,
    pub mmio_write: u64,
    pub unclaimed_pio: u64,
    pub hlt: u64,
    pub interrupted: u64,
    pub int3_injected: u64,
    pub other: u64,
}

impl ExitCounters {
    pub fn add(&mut self, o: &ExitCounters) {
        self.io_in += o.io_in;
        self.io_out += o.io_out;
        self.mmio_read += o.mmio_read;
        self.mmio_write += o.mmio_write;
        self.unclaimed_pio += o.unclaimed_pio;
        self.hlt += o.hlt;
        self.interrupted += o.interrupted;
        self.int3_injected += o.int3_injected;
        self.other += o.other;
    }
}

/// Everything a vCPU thread needs.
pub struct VcpuContext {
    pub mailbox: Arc<StatsMailbox>,
    /// Writes KVM queued without an exit; replayed before any other exit is handled.
    pub coalesced: Option<Arc<CoalescedRing>>,
    pub id: u32,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<ExitState>,
    pub memory: Arc<SlotRegistry>,
    pub mmio_cache: bool,
}

/// Exits counted per device and register offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceKey {
    pub bus: &'static str,
    pub device: &'static str,
    pub offset: u64,
}

/// Everything one vCPU measured; merged across vCPUs for `--stats`.
#[derive(Debug, Clone, Default)]
pub struct VcpuStats {
    pub exits: ExitCounters,
    pub latency: Box<ExitLatencies>,
    pub by_device: HashMap<DeviceKey, u64>,
    pub memory: MemoryStats,
    pub emulated: EmulationStats,
}

impl VcpuStats {
    pub fn merge(&mut self, o: &VcpuStats) {
        self.exits.add(&o.exits);
        self.emulated.merge(&o.emulated);
        self.latency.merge(&o.latency);
        for (k, v) in &o.by_device {
            *self.by_device.entry(*k).or_default() += v;
        }
        self.memory.merge(&o.memory);
    }
}

/// Where vCPU threads leave copies of their statistics when asked (SIGUSR1), so a
/// running VM can be reported without a lock on the exit path: a thread checks one
/// atomic after each exit.
#[derive(Default)]
pub struct StatsMailbox {
    pub request: AtomicU64,
    /// Per vCPU: (request answered, statistics).
    pub slots: Mutex<HashMap<u32, (u64, VcpuStats)>>,
}

fn count_device(stats: &mut VcpuStats, bus: &'static str, device: &'static str, offset: u64) {
    *stats
        .by_device
        .entry(DeviceKey {
            bus,
            device,
            offset,
        })
        .or_default() += 1;
}

/// Replay queued writes on their buses, in order; returns how many there were.
pub fn replay_coalesced(ring: &CoalescedRing, pio: &Bus, mmio: &Bus) -> usize {
    ring.drain(|w| {
        let bus = if w.pio { pio } else { mmio };
        bus.write(w.addr, &w.data[..w.len]);
    })
}

/// Run the vCPU until the VM stops. Returns what it measured.
pub fn run_loop(mut vcpu: VcpuFd, ctx: VcpuContext) -> VcpuStats {
    // A kick (crate::vcpu_kick) now sets immediate_exit: cleared after the EINTR below.
    let _kick = crate::vcpu_kick::arm(&mut vcpu);
    let mut st = VcpuStats::default();
    let mut router = MmioRouter::new(ctx.mmio_cache);
    let mut answered = 0u64;
    let mut emulator = VcpuEmulator::new(&vcpu);
    let fail = |o: VmOutcome| ctx.exit.finish(o);
    while !ctx.exit.stopping() {
        let result = vcpu.run();
        let t0 = Instant::now();
        if let Some(ring) = &ctx.coalesced {
            replay_coalesced(ring, &ctx.pio, &ctx.mmio);
        }
        let c = &mut st.exits;
        let kind = match result {
            Ok(VcpuExit::IoIn(port, data)) => {
                c.io_in += 1;
                let port = u64::from(port);
                match ctx.pio.route(port) {
                    Some(r) => {
                        r.device.read(r.base, port - r.base, data);
                        count_device(&mut st, "pio", r.device.name(), port - r.base);
                    }
                    None => {
                        data.fill(0xff);
                        c.unclaimed_pio += 1;
                        count_device(&mut st, "pio", "unclaimed", port);
                    }
                }
                Some(ExitKind::IoIn)
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                c.io_out += 1;
                let port = u64::from(port);
                match ctx.pio.route(port) {
                    Some(r) => {
                        r.device.write(r.base, port - r.base, data);
                        count_device(&mut st, "pio", r.device.name(), port - r.base);
                    }
                    None => count_device(&mut st, "pio", "unclaimed", port),
                }
                Some(ExitKind::IoOut)
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                c.mmio_read += 1;
                // The router counts and rate-limit-logs unmapped accesses itself.
                match router.route_mmio_in(addr, false, &ctx.memory, &ctx.mmio) {
                    MmioRoute::Device(r) => {
                        r.device.read(r.base, addr - r.base, data);
                        let (name, off) = (r.device.name(), addr - r.base);
                        count_device(&mut st, "mmio", name, off);
                    }
                    MmioRoute::Unmapped | MmioRoute::ReadOnlyRam => fill_open_bus(data),
                }
                Some(ExitKind::MmioRead)
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                c.mmio_write += 1;
                if let MmioRoute::Device(r) =
                    router.route_mmio_in(addr, true, &ctx.memory, &ctx.mmio)
                {
                    r.device.write(r.base, addr - r.base, data);
                    let (name, off) = (r.device.name(), addr - r.base);
                    count_device(&mut st, "mmio", name, off);
                }
                Some(ExitKind::MmioWrite)
            }
            Ok(VcpuExit::Hlt) => {
                // Only seen without an in-kernel LAPIC; nothing will wake this vCPU.
                c.hlt += 1;
                std::thread::sleep(std::time::Duration::from_millis(1));
                None
            }
            Ok(VcpuExit::Shutdown) => {
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                fail(VmOutcome::TripleFault { vcpu: ctx.id, rip });
                None
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => fail(VmOutcome::PowerOff),
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => fail(VmOutcome::Reset),
                    other => fail(VmOutcome::Unexpected {
                        vcpu: ctx.id,
                        what: format!("KVM system event {other}"),
                    }),
                }
                None
            }
            Ok(VcpuExit::FailEntry(reason, _cpu)) => {
                fail(VmOutcome::FailEntry {
                    vcpu: ctx.id,
                    reason,
                });
                None
            }
            Ok(VcpuExit::InternalError) => {
                let fallback = (&mut emulator, ctx.memory.as_ref(), &mut st.emulated);
                if let Some(outcome) = handle_internal_error(&mut vcpu, ctx.id, c, fallback) {
                    fail(outcome);
                }
                Some(ExitKind::Other)
            }
            Ok(VcpuExit::Intr) => {
                c.interrupted += 1;
                None
            }
            Ok(other) => {
                c.other += 1;
                fail(VmOutcome::Unexpected {
                    vcpu: ctx.id,
                    what: format!("unhandled exit {other:?}"),
                });
                None
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A kick (EINTR) or an AP woken by SIPI (EAGAIN).
                c.interrupted += 1;
                vcpu.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => {
                fail(VmOutcome::Unexpected {
                    vcpu: ctx.id,
                    what: format!("KVM_RUN failed: {e}"),
                });
                None
            }
        };
        if let Some(k) = kind {
            st.latency.record(k, t0.elapsed().as_nanos() as u64);
        }
        let req = ctx.mailbox.request.load(Ordering::Relaxed);
        if req != answered {
            answered = req;
            let mut copy = st.clone();
            copy.memory = router.stats();
            ctx.mailbox
                .slots
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(ctx.id, (req, copy));
        }
    }
    st.memory = router.stats();
    st
}

/// KVM's emulator (which runs all guest kernel code on a nested PVM host) lacks some
/// instructions; with KVM_CAP_EXIT_ON_EMULATION_FAILURE they come here and the
/// fallback (`emulate`) carries them out or injects the exception hardware would
/// raise. Whatever it cannot do, and every other internal error, ends the VM.
fn handle_internal_error(
    vcpu: &mut VcpuFd,
    id: u32,
    c: &mut ExitCounters,
    (emulator, memory, emulated): (&mut VcpuEmulator, &SlotRegistry, &mut EmulationStats),
) -> Option<VmOutcome> {
    let run = vcpu.get_kvm_run();
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` and
    // `emulation_failure` are the union members KVM filled.
    let (suberror, data, insn) = unsafe {
        let internal = run.__bindgen_anon_1.internal;
        let n = (internal.ndata as usize).min(internal.data.len());
        let mut insn = Vec::new();
        if internal.suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
            let ef = run.__bindgen_anon_1.emulation_failure;
            if ef.flags
                & u64::from(kvm_bindings::KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)
                != 0
            {
                let b = ef.__bindgen_anon_1.__bindgen_anon_1;
                insn = b.insn_bytes[..(b.insn_size as usize).min(15)].to_vec();
            }
        }
        (internal.suberror, internal.data[..n].to_vec(), insn)
    };
    let mut decoded = None;
    if suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
        match emulator.handle(vcpu, memory, &insn, emulated) {
            Ok((_, delivered)) => {
                if delivered == Some(3) {
                    c.int3_injected += 1;
                }
                return None;
            }
            Err(text) => decoded = Some(text),
        }
    }
    let regs = vcpu.get_regs().ok();
    let sregs = vcpu.get_sregs().ok();
    Some(VmOutcome::InternalError {
        vcpu: id,
        suberror,
        rip: regs.map(|r| r.rip).unwrap_or(0),
        cpl: sregs.map(|s| s.cs.selector as u8 & 3).unwrap_or(0),
        insn,
        data,
        decoded,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(VmOutcome::DebugExit(7).exit_code(), 7);
        assert_eq!(VmOutcome::DebugExit(0x1_02).exit_code(), 2);
        assert_eq!(VmOutcome::Reset.exit_code(), 0);
        assert_eq!(VmOutcome::PowerOff.exit_code(), 0);
        assert_eq!(
            VmOutcome::TripleFault { vcpu: 0, rip: 0 }.exit_code(),
            EXIT_TRIPLE_FAULT
        );
        let ie = VmOutcome::InternalError {
            vcpu: 0,
            suberror: 1,
            rip: 0x1000,
            cpl: 0,
            insn: vec![0x0f, 0xc7],
            data: vec![],
            decoded: Some("`cmpxchg16b [rbp]`: not emulated".into()),
        };
        assert_eq!(ie.exit_code(), EXIT_INTERNAL_ERROR);
        let line = ie.failure_line().unwrap();
        assert!(
            line.contains("RIP 0x1000")
                && line.contains("CPL 0")
                && line.contains("0f c7")
                && line.contains("decoded `cmpxchg16b [rbp]`"),
            "{line}"
        );
        assert!(VmOutcome::DebugExit(0).failure_line().is_none());
    }

    #[test]
    fn first_outcome_wins() {
        let s = ExitState::default();
        s.request_exit(GuestExitRequest::DebugExit(5));
        s.request_exit(GuestExitRequest::Reset);
        assert!(s.stopping());
        assert_eq!(s.wait(&|| false, &|| false), Some(VmOutcome::DebugExit(5)));
    }
}

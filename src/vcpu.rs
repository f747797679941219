//! vCPU threads: how a VM ends, the run loop, and what each vCPU measures. The exit
//! handling itself is in [`dispatch`]; the exit kinds in [`crate::exit_kind`].

pub mod debug_port;
pub mod device_exits;
pub mod dispatch;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use kvm_ioctls::VcpuFd;
use wbvmm_devices::legacy::{ExitSink, GuestExitRequest};
use wbvmm_devices::Bus;

pub use self::device_exits::{BusKind, DeviceExitCounts, DeviceKey};
use self::dispatch::{Action, ExitHandler, KvmVcpu};
use crate::coalesced::CoalescedRing;
use crate::emulate::EmulationStats;
pub use crate::exit_kind::ExitCounters;
use crate::latency::ExitLatencies;
use crate::memory::{MemoryStats, SlotRegistry};
use crate::vcpu::debug_port::StopCause;

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
    /// This vCPU's end of the GDB stub (`--gdb`).
    pub debug: Option<crate::vcpu::debug_port::VcpuPort>,
}

/// Everything one vCPU measured; merged across vCPUs for `--stats`.
#[derive(Debug, Clone, Default)]
pub struct VcpuStats {
    pub exits: ExitCounters,
    pub latency: Box<ExitLatencies>,
    pub by_device: DeviceExitCounts,
    pub memory: MemoryStats,
    pub emulated: EmulationStats,
    /// Where the vCPU was when it answered (one per vCPU once merged).
    pub positions: Vec<VcpuPosition>,
}

/// A vCPU's place in guest code at a snapshot or at its end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcpuPosition {
    pub id: u32,
    pub rip: u64,
    pub cpl: u8,
}

impl VcpuStats {
    /// Empty, with room for the registers a guest usually reaches (so that counting
    /// them does not allocate on the exit path).
    pub fn new() -> Self {
        Self {
            by_device: DeviceExitCounts::with_capacity(64),
            ..Default::default()
        }
    }

    pub fn merge(&mut self, o: &VcpuStats) {
        self.exits.add(&o.exits);
        self.emulated.merge(&o.emulated);
        self.latency.merge(&o.latency);
        self.by_device.merge(&o.by_device);
        self.memory.merge(&o.memory);
        self.positions.extend_from_slice(&o.positions);
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

impl StatsMailbox {
    /// If a request newer than `answered` is pending, leave vCPU `id`'s statistics
    /// (`stats()`, only called then) and note the request answered.
    #[inline]
    pub fn answer(&self, id: u32, answered: &mut u64, stats: impl FnOnce() -> VcpuStats) {
        let req = self.request.load(Ordering::Relaxed);
        if req != *answered {
            *answered = req;
            let copy = stats();
            self.slots
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, (req, copy));
        }
    }
}

/// Replay queued writes on their buses, in order; returns how many there were.
pub fn replay_coalesced(ring: &CoalescedRing, pio: &Bus, mmio: &Bus) -> usize {
    ring.drain(|w| {
        let bus = if w.pio { pio } else { mmio };
        bus.write(w.addr, &w.data[..w.len]);
    })
}

/// Run the vCPU until the VM stops. Returns what it measured.
pub fn run_loop(vcpu: VcpuFd, mut ctx: VcpuContext) -> VcpuStats {
    let mut vcpu = KvmVcpu::new(vcpu);
    // A kick (crate::vcpu_kick) sets immediate_exit; the dispatch clears it after the
    // EINTR. Declared after `vcpu`, so dropped before it: a late kick never writes to
    // an unmapped kvm_run page.
    let _kick = crate::vcpu_kick::arm(vcpu.fd_mut());
    // With --gdb only; it starts paused, so the guest waits for the debugger.
    let mut debug = ctx.debug.take();
    if let Some(d) = debug.as_mut() {
        d.attach();
    }
    let mut exits = ExitHandler::new(&ctx, debug.as_ref().map(|d| d.shared()));
    let mut answered = 0u64;
    while !ctx.exit.stopping() {
        let stopped = match debug.as_ref() {
            Some(d) if d.pause_wanted() => Some(StopCause::Paused),
            _ => None,
        };
        let stopped = stopped.or_else(|| match exits.step(&mut vcpu) {
            Action::Resume => None,
            Action::Stop(outcome) => {
                ctx.exit.finish(outcome);
                None
            }
            Action::Debug(cause) => Some(cause),
        });
        if let (Some(cause), Some(d)) = (stopped, debug.as_mut()) {
            let (mailbox, id) = (&ctx.mailbox, ctx.id);
            let answer = || mailbox.answer(id, &mut answered, || exits.snapshot(&vcpu));
            d.park(cause, vcpu.fd(), &ctx.memory, &ctx.exit, answer);
            continue;
        }
        ctx.mailbox
            .answer(ctx.id, &mut answered, || exits.snapshot(&vcpu));
    }
    exits.into_stats(&vcpu)
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

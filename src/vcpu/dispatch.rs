//! The exit dispatch: one return from KVM_RUN turned into what the vCPU thread does next.
//!
//! [`ExitHandler::step`] runs the vCPU to its next exit and handles it: writes KVM
//! queued without an exit (coalesced MMIO) are replayed first; port I/O goes to the
//! PIO bus; MMIO goes through the router (miss cache → memslot mirror → bus → device);
//! instructions KVM's emulator cannot run go to the emulation fallback (`emulate`);
//! the ends of the VM come back as [`Action::Stop`]. Every exit is counted by
//! [`ExitKind`] and by device, and the kinds the table marks timed are timed.
//!
//! The vCPU is a [`Vcpu`]: [`KvmVcpu`] in the VMM, a scripted one in the tests, so the
//! whole path is tested without /dev/kvm. `step` is generic, not `dyn`: the exit path
//! compiles to the same direct calls as before.

use std::sync::Arc;
use std::time::Instant;

use kvm_ioctls::{VcpuExit, VcpuFd};
use wbvmm_devices::{Bus, DeviceId};

use super::device_exits::{BusKind, DeviceKey};
use super::{replay_coalesced, VcpuContext, VcpuPosition, VcpuStats, VmOutcome};
use crate::coalesced::CoalescedRing;
use crate::emulate::kvm::VcpuEmulator;
use crate::emulate::EmulationStats;
use crate::exit_kind::ExitKind;
use crate::memory::{fill_open_bus, MmioRoute, MmioRouter, SlotRegistry};
use crate::vcpu::debug_port::{Shared as DebugShared, StopCause};

/// What the vCPU thread does after an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Handled: run the vCPU again.
    Resume,
    /// The VM ends (the first end reported wins, see `ExitState::finish`).
    Stop(VmOutcome),
    /// Stopped for the debugger (`--gdb`): a breakpoint it placed, or a single step.
    Debug(StopCause),
}

/// What KVM reported with `KVM_EXIT_INTERNAL_ERROR`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InternalError {
    pub suberror: u32,
    pub data: Vec<u64>,
    /// The instruction bytes KVM fetched (emulation failures only).
    pub insn: Vec<u8>,
}

/// The vCPU as the exit dispatch uses it.
pub trait Vcpu {
    /// KVM_RUN: run until the next exit.
    fn run(&mut self) -> Result<VcpuExit<'_>, kvm_ioctls::Error>;
    /// KVM_RUN returned EINTR: clear `immediate_exit` (a kick may have set it) so the
    /// next KVM_RUN enters the guest.
    fn clear_immediate_exit(&mut self);
    /// The guest's RIP, for reports (0 when it cannot be read).
    fn rip(&self) -> u64;
    /// The guest's privilege level, for reports (0 when it cannot be read).
    fn cpl(&self) -> u8;
    /// The details of the internal error KVM_RUN just returned.
    fn internal_error(&mut self) -> InternalError;
    /// Carry out `insn` in the emulation fallback, counted in `stats`. Ok: the vector
    /// delivered to the guest, if any; Err: why the VM cannot go on.
    fn emulate(
        &mut self,
        memory: &SlotRegistry,
        insn: &[u8],
        stats: &mut EmulationStats,
    ) -> Result<Option<u8>, String>;
}

/// A KVM vCPU with its emulation fallback.
pub struct KvmVcpu {
    fd: VcpuFd,
    emulator: VcpuEmulator,
}

impl KvmVcpu {
    pub fn new(fd: VcpuFd) -> Self {
        let emulator = VcpuEmulator::new(&fd);
        Self { fd, emulator }
    }

    /// The vCPU's fd, for arming the kick (`crate::vcpu_kick::arm`).
    pub fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// The vCPU's fd, for the debugger's requests while it is parked.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }
}

impl Vcpu for KvmVcpu {
    #[inline]
    fn run(&mut self) -> Result<VcpuExit<'_>, kvm_ioctls::Error> {
        self.fd.run()
    }

    fn clear_immediate_exit(&mut self) {
        self.fd.set_kvm_immediate_exit(0);
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map(|r| r.rip).unwrap_or(0)
    }

    fn cpl(&self) -> u8 {
        self.fd
            .get_sregs()
            .map(|s| s.cs.selector as u8 & 3)
            .unwrap_or(0)
    }

    fn internal_error(&mut self) -> InternalError {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` and
        // `emulation_failure` are the union members KVM filled.
        unsafe {
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
            InternalError {
                suberror: internal.suberror,
                data: internal.data[..n].to_vec(),
                insn,
            }
        }
    }

    fn emulate(
        &mut self,
        memory: &SlotRegistry,
        insn: &[u8],
        stats: &mut EmulationStats,
    ) -> Result<Option<u8>, String> {
        self.emulator
            .handle(&self.fd, memory, insn, stats)
            .map(|(_, delivered)| delivered)
    }
}

/// One vCPU thread's exit handling: the buses and memory it routes to, its MMIO
/// router, and what it measured.
pub struct ExitHandler {
    id: u32,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    memory: Arc<SlotRegistry>,
    coalesced: Option<Arc<CoalescedRing>>,
    router: MmioRouter,
    /// The id port I/O to no device is counted under.
    unclaimed: DeviceId,
    stats: VcpuStats,
    /// The GDB stub's breakpoints (`--gdb` only).
    debugger: Option<Arc<DebugShared>>,
}

impl ExitHandler {
    pub fn new(ctx: &VcpuContext, debugger: Option<Arc<DebugShared>>) -> Self {
        Self {
            id: ctx.id,
            pio: ctx.pio.clone(),
            mmio: ctx.mmio.clone(),
            memory: ctx.memory.clone(),
            coalesced: ctx.coalesced.clone(),
            router: MmioRouter::new(ctx.mmio_cache),
            unclaimed: DeviceId::for_name("unclaimed"),
            stats: VcpuStats::new(),
            debugger,
        }
    }

    /// Run `vcpu` to its next exit and handle it.
    pub fn step(&mut self, vcpu: &mut impl Vcpu) -> Action {
        let result = vcpu.run();
        let t0 = Instant::now();
        if let Some(ring) = &self.coalesced {
            replay_coalesced(ring, &self.pio, &self.mmio);
        }
        let id = self.id;
        let (kind, action) = match result {
            Ok(VcpuExit::IoIn(port, data)) => {
                self.port_in(port, data);
                (Some(ExitKind::IoIn), Action::Resume)
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                self.port_out(port, data);
                (Some(ExitKind::IoOut), Action::Resume)
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                self.mmio_read(addr, data);
                (Some(ExitKind::MmioRead), Action::Resume)
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.mmio_write(addr, data);
                (Some(ExitKind::MmioWrite), Action::Resume)
            }
            Ok(VcpuExit::Hlt) => {
                // Only seen without an in-kernel LAPIC; nothing will wake this vCPU.
                std::thread::sleep(std::time::Duration::from_millis(1));
                (Some(ExitKind::Hlt), Action::Resume)
            }
            Ok(VcpuExit::Shutdown) => {
                let rip = vcpu.rip();
                (None, Action::Stop(VmOutcome::TripleFault { vcpu: id, rip }))
            }
            Ok(VcpuExit::SystemEvent(event, _)) => (None, Action::Stop(system_event(id, event))),
            Ok(VcpuExit::FailEntry(reason, _cpu)) => (
                None,
                Action::Stop(VmOutcome::FailEntry { vcpu: id, reason }),
            ),
            Ok(VcpuExit::InternalError) => {
                (Some(ExitKind::InternalError), self.internal_error(vcpu))
            }
            Ok(VcpuExit::Intr) => (Some(ExitKind::Interrupted), Action::Resume),
            // Only with --gdb (KVM_SET_GUEST_DEBUG): not an exit the guest makes.
            Ok(VcpuExit::Debug(arch)) => (None, self.debug_exit(vcpu, arch.exception)),
            Ok(other) => {
                let what = format!("unhandled exit {other:?}");
                (
                    Some(ExitKind::Other),
                    Action::Stop(VmOutcome::Unexpected { vcpu: id, what }),
                )
            }
            // The one place a kick lands: a signal interrupted KVM_RUN (EINTR, with
            // immediate_exit set if the kick came before the entry), or an AP was woken
            // by SIPI (EAGAIN).
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.clear_immediate_exit();
                (Some(ExitKind::Interrupted), Action::Resume)
            }
            Err(e) => {
                let what = format!("KVM_RUN failed: {e}");
                (None, Action::Stop(VmOutcome::Unexpected { vcpu: id, what }))
            }
        };
        if let Some(kind) = kind {
            self.stats.exits.count(kind);
            if kind.timed() {
                let ns = t0.elapsed().as_nanos() as u64;
                self.stats.latency.record(kind, ns);
            }
        }
        action
    }

    /// What this vCPU measured so far, and where `vcpu` is (for a SIGUSR1 snapshot).
    pub fn snapshot(&self, vcpu: &impl Vcpu) -> VcpuStats {
        let mut copy = self.stats.clone();
        copy.memory = self.router.stats();
        copy.positions = vec![self.position(vcpu)];
        copy
    }

    /// What this vCPU measured, and where it stopped.
    pub fn into_stats(mut self, vcpu: &impl Vcpu) -> VcpuStats {
        self.stats.memory = self.router.stats();
        self.stats.positions = vec![self.position(vcpu)];
        self.stats
    }

    fn position(&self, vcpu: &impl Vcpu) -> VcpuPosition {
        VcpuPosition {
            id: self.id,
            rip: vcpu.rip(),
            cpl: vcpu.cpl(),
        }
    }

    #[inline]
    fn count_device(&mut self, bus: BusKind, device: DeviceId, offset: u64) {
        let key = DeviceKey {
            bus,
            device,
            offset,
        };
        self.stats.by_device.count(key);
    }

    fn port_in(&mut self, port: u16, data: &mut [u8]) {
        let port = u64::from(port);
        match self.pio.route(port) {
            Some(r) => {
                r.device.read(r.base, port - r.base, data);
                self.count_device(BusKind::Pio, r.id, port - r.base);
            }
            None => {
                data.fill(0xff);
                self.stats.exits.count(ExitKind::UnclaimedPio);
                self.count_device(BusKind::Pio, self.unclaimed, port);
            }
        }
    }

    fn port_out(&mut self, port: u16, data: &[u8]) {
        let port = u64::from(port);
        match self.pio.route(port) {
            Some(r) => {
                r.device.write(r.base, port - r.base, data);
                self.count_device(BusKind::Pio, r.id, port - r.base);
            }
            None => self.count_device(BusKind::Pio, self.unclaimed, port),
        }
    }

    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        // The router counts and rate-limit-logs unmapped accesses itself.
        let device = match self
            .router
            .route_mmio_in(addr, false, &self.memory, &self.mmio)
        {
            MmioRoute::Device(r) => {
                r.device.read(r.base, addr - r.base, data);
                Some((r.id, addr - r.base))
            }
            MmioRoute::Unmapped | MmioRoute::ReadOnlyRam => {
                fill_open_bus(data);
                None
            }
        };
        if let Some((id, offset)) = device {
            self.count_device(BusKind::Mmio, id, offset);
        }
    }

    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        let device = match self
            .router
            .route_mmio_in(addr, true, &self.memory, &self.mmio)
        {
            MmioRoute::Device(r) => {
                r.device.write(r.base, addr - r.base, data);
                Some((r.id, addr - r.base))
            }
            MmioRoute::Unmapped | MmioRoute::ReadOnlyRam => None,
        };
        if let Some((id, offset)) = device {
            self.count_device(BusKind::Mmio, id, offset);
        }
    }

    /// A debug exit (`--gdb`): #DB after a single step; #BP at one of the debugger's
    /// int3s, or the guest's own int3, which goes on to the guest as hardware would
    /// deliver it (the fallback emulates it).
    fn debug_exit(&mut self, vcpu: &mut impl Vcpu, exception: u32) -> Action {
        match exception {
            1 => Action::Debug(StopCause::Step),
            3 if self.is_breakpoint(vcpu) => Action::Debug(StopCause::Breakpoint),
            3 => match vcpu.emulate(&self.memory, &[0xcc], &mut self.stats.emulated) {
                Ok(_) => Action::Resume,
                Err(what) => Action::Stop(VmOutcome::Unexpected {
                    vcpu: self.id,
                    what,
                }),
            },
            _ => Action::Resume,
        }
    }

    /// Whether `vcpu` is at one of the debugger's int3s.
    fn is_breakpoint(&self, vcpu: &impl Vcpu) -> bool {
        self.debugger
            .as_ref()
            .is_some_and(|d| d.is_breakpoint(vcpu.rip()))
    }

    /// KVM's emulator (which runs all guest kernel code on a nested PVM host) lacks some
    /// instructions; with KVM_CAP_EXIT_ON_EMULATION_FAILURE they come here and the
    /// fallback (`emulate`) carries them out or injects the exception hardware would
    /// raise. Whatever it cannot do, and every other internal error, ends the VM.
    fn internal_error(&mut self, vcpu: &mut impl Vcpu) -> Action {
        let InternalError {
            suberror,
            data,
            insn,
        } = vcpu.internal_error();
        let mut decoded = None;
        // An int3 at CPL0 comes here on this host (KVM's emulator does not run it).
        if insn.first() == Some(&0xcc) && self.is_breakpoint(vcpu) {
            return Action::Debug(StopCause::Breakpoint);
        }
        if suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
            match vcpu.emulate(&self.memory, &insn, &mut self.stats.emulated) {
                Ok(delivered) => {
                    if delivered == Some(3) {
                        self.stats.exits.count(ExitKind::Int3Injected);
                    }
                    return Action::Resume;
                }
                Err(text) => decoded = Some(text),
            }
        }
        Action::Stop(VmOutcome::InternalError {
            vcpu: self.id,
            suberror,
            rip: vcpu.rip(),
            cpl: vcpu.cpl(),
            insn,
            data,
            decoded,
        })
    }
}

fn system_event(vcpu: u32, event: u32) -> VmOutcome {
    match event {
        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmOutcome::PowerOff,
        kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmOutcome::Reset,
        other => VmOutcome::Unexpected {
            vcpu,
            what: format!("KVM system event {other}"),
        },
    }
}

#[cfg(test)]
mod tests;

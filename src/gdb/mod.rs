//! `--gdb SOCKET`: a GDB remote stub (the `gdbstub` crate) on a Unix socket.
//!
//! The design Firecracker and Cloud Hypervisor use: a `wbvmm-gdb` thread talks to the
//! debugger; vCPUs are stopped by a pause flag and a kick and then park in
//! [`crate::vcpu::debug_port::VcpuPort::park`], where each answers the stub's requests on its own
//! thread (registers, memory through its page tables, KVM_SET_GUEST_DEBUG). All-stop:
//! one vCPU stopping (breakpoint, step) stops the others before the debugger hears
//! of it. Threads are vCPUs (thread id = vCPU id + 1). The VM waits for the debugger
//! before its first instruction. Software breakpoints are int3 bytes the stub writes
//! itself; with KVM_GUESTDBG_USE_SW_BP an int3 at CPL3 exits to wbvmm, and at CPL0
//! (which this host runs in KVM's emulator) it arrives as an emulation failure that
//! the exit dispatch hands here when the address is a breakpoint
//! (`crate::vcpu::dispatch`). A debugger that goes away lets the VM run on, with
//! its breakpoints removed; the next one may connect.

use std::io::{self, Read, Write};
use std::num::NonZeroUsize;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;

use gdbstub::common::{Signal, Tid};
use gdbstub::conn::{Connection, ConnectionExt};
use gdbstub::stub::run_blocking::{BlockingEventLoop, Event as LoopEvent, WaitForStopReasonError};
use gdbstub::stub::{DisconnectReason, GdbStub, MultiThreadStopReason};
use gdbstub::target::ext::base::multithread::{
    MultiThreadBase, MultiThreadResume, MultiThreadResumeOps, MultiThreadSchedulerLocking,
    MultiThreadSchedulerLockingOps, MultiThreadSingleStep, MultiThreadSingleStepOps,
};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, SwBreakpoint, SwBreakpointOps,
};
use gdbstub::target::{Target, TargetError, TargetResult};
use gdbstub_arch::x86::reg::X86_64CoreRegs;
use gdbstub_arch::x86::X86_64_SSE;
use thiserror::Error;

use crate::vcpu::debug_port::{Event, Reply, Request, Shared, StopCause, VcpuPort};
use crate::vcpu::{ExitState, VmOutcome};

#[derive(Debug, Error)]
pub enum GdbError {
    #[error("cannot listen for a debugger on --gdb {path}: give a socket path in a directory wbvmm can write to (a socket already there is replaced, any other file is not)")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up the GDB stub's event notification (eventfd)")]
    EventFd(#[source] io::Error),
    #[error("cannot start the GDB stub thread")]
    Thread(#[source] io::Error),
}

/// The stub before it runs: the bound socket (bound on the main thread, before any
/// system call filter) and one port per vCPU, handed to the vCPU threads.
pub struct GdbServer {
    path: PathBuf,
    listener: UnixListener,
    shared: Arc<Shared>,
    to_vcpus: Vec<Sender<Request>>,
    events: Receiver<(u32, Event)>,
    ports: Vec<Option<VcpuPort>>,
}

impl GdbServer {
    /// Listen on `path` for a VM of `cpus` vCPUs. A stale socket at `path` is replaced.
    pub fn bind(path: &Path, cpus: u32) -> Result<Self, GdbError> {
        let bind_err = |source| GdbError::Bind {
            path: path.to_path_buf(),
            source,
        };
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            std::fs::remove_file(path).map_err(bind_err)?;
        }
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        let shared = Arc::new(Shared::new(cpus as usize).map_err(GdbError::EventFd)?);
        let (events_tx, events) = std::sync::mpsc::channel();
        let mut to_vcpus = Vec::new();
        let mut ports = Vec::new();
        for id in 0..cpus {
            let (tx, rx) = std::sync::mpsc::channel();
            to_vcpus.push(tx);
            ports.push(Some(VcpuPort::new(
                id,
                shared.clone(),
                rx,
                events_tx.clone(),
            )));
        }
        Ok(Self {
            path: path.to_path_buf(),
            listener,
            shared,
            to_vcpus,
            events,
            ports,
        })
    }

    /// vCPU `id`'s end of the stub (once).
    pub fn take_port(&mut self, id: u32) -> Option<VcpuPort> {
        self.ports.get_mut(id as usize).and_then(Option::take)
    }

    /// Start the `wbvmm-gdb` thread. It lives until the process ends. `on_start`
    /// runs first on the new thread (the VM installs the thread's seccomp filter
    /// there; this module does not know the filters, as vcpu depends on it).
    pub fn spawn(
        self,
        exit: Arc<ExitState>,
        on_start: impl FnOnce() + Send + 'static,
    ) -> Result<(), GdbError> {
        eprintln!(
            "wbvmm: waiting for a debugger on {} before the first guest instruction (gdb: target remote {})",
            self.path.display(),
            self.path.display()
        );
        std::thread::Builder::new()
            .name("wbvmm-gdb".into())
            .spawn(move || {
                on_start();
                self.serve(exit)
            })
            .map(|_| ())
            .map_err(GdbError::Thread)
    }

    /// One debugger after another, until the VM ends.
    fn serve(self, exit: Arc<ExitState>) {
        let n = self.to_vcpus.len();
        let mut vm = DebuggedVm {
            shared: self.shared.clone(),
            to_vcpus: self.to_vcpus,
            events: self.events,
            exit,
            parked: vec![false; n],
            ended: vec![false; n],
            cause: vec![None; n],
            action: vec![None; n],
            locked: false,
        };
        for stream in self.listener.incoming() {
            let Ok(stream) = stream else { continue };
            vm.stop_all();
            let conn = BufferedConn::new(stream);
            let reason = GdbStub::new(conn).run_blocking::<DebuggedVm>(&mut vm);
            match reason {
                Ok(DisconnectReason::Kill) => {
                    vm.exit.finish(VmOutcome::UserQuit);
                    vm.release_all(false);
                    return;
                }
                Ok(_) => {}
                Err(e) => log::warn!("gdb: the debugger's connection ended: {e}"),
            }
            // Detached or gone: the guest runs on without its breakpoints.
            vm.remove_all_breakpoints();
            vm.release_all(false);
            if vm.all_ended() {
                return;
            }
        }
    }
}

/// The VM as the stub sees it: which vCPUs are parked, why they stopped, what each
/// does on resume.
pub struct DebuggedVm {
    shared: Arc<Shared>,
    to_vcpus: Vec<Sender<Request>>,
    events: Receiver<(u32, Event)>,
    exit: Arc<ExitState>,
    parked: Vec<bool>,
    ended: Vec<bool>,
    cause: Vec<Option<StopCause>>,
    /// This resume's action per vCPU: None (not mentioned), Some(step).
    action: Vec<Option<bool>>,
    /// gdb's scheduler locking for this resume: vCPUs not mentioned stay parked.
    locked: bool,
}

/// How long a parked vCPU may take to answer one request.
const REPLY_DEADLINE: Duration = Duration::from_secs(10);
/// How often the stub kicks again vCPUs that have not parked yet (a kick that landed
/// while a vCPU was between exits is seen at its next one; repeating is harmless).
const KICK_AGAIN: Duration = Duration::from_millis(100);

fn tid(id: usize) -> Tid {
    NonZeroUsize::new(id + 1).unwrap_or(NonZeroUsize::MIN)
}

fn vcpu_of(tid: Tid) -> usize {
    tid.get() - 1
}

impl DebuggedVm {
    fn all_ended(&self) -> bool {
        self.ended.iter().all(|e| *e)
    }

    fn note(&mut self, id: u32, event: Event) -> Option<Reply> {
        let id = id as usize;
        if id >= self.parked.len() {
            return None;
        }
        match event {
            Event::Stopped(cause) => {
                self.parked[id] = true;
                self.cause[id] = Some(cause);
            }
            Event::Ended => {
                self.ended[id] = true;
                self.parked[id] = false;
            }
            Event::Reply(r) => return Some(r),
        }
        None
    }

    fn drain_events(&mut self) {
        let _ = self.shared.events_ready.read();
        while let Ok((id, ev)) = self.events.try_recv() {
            self.note(id, ev);
        }
    }

    /// Stop every vCPU (pause flag, kicks) and wait until each is parked or gone.
    fn stop_all(&mut self) {
        self.shared.set_pause(true);
        loop {
            self.drain_events();
            let waiting: Vec<usize> = (0..self.parked.len())
                .filter(|&i| !self.parked[i] && !self.ended[i])
                .collect();
            if waiting.is_empty() {
                return;
            }
            for &i in &waiting {
                self.shared.kick(i);
            }
            match self.events.recv_timeout(KICK_AGAIN) {
                Ok((id, ev)) => {
                    self.note(id, ev);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Resume the parked vCPUs (those gdb named, under scheduler locking): `debug`
    /// keeps breakpoint exits on.
    fn release_all(&mut self, debug: bool) {
        self.shared.set_pause(false);
        for i in 0..self.parked.len() {
            if debug && self.locked && self.action[i].is_none() {
                continue;
            }
            if self.parked[i] {
                let step = debug && self.action[i] == Some(true);
                if step && self.step_reaches_the_guest(i) {
                    // Stays parked; the debugger hears of a step that did not move.
                    self.cause[i] = Some(StopCause::Step);
                    continue;
                }
                if self.to_vcpus[i]
                    .send(Request::Resume { debug, step })
                    .is_ok()
                {
                    self.parked[i] = false;
                    self.cause[i] = None;
                }
            }
        }
    }

    /// On a PVM host a single step at CPL3 is not intercepted: the guest itself gets
    /// the #DB, which its kernel does not expect (measured: the test guest ends with
    /// an unexpected exception). Such a step is not made.
    fn step_reaches_the_guest(&mut self, id: usize) -> bool {
        if !crate::cpuid::pvm_host() {
            return false;
        }
        let user = matches!(
            self.ask(id, Request::ReadRegs),
            Some(Reply::Regs(b)) if b.1.cs.selector & 3 == 3
        );
        if user {
            log::warn!(
                "gdb: vCPU {id} is in user mode, where this host's KVM gives a single step's #DB to the guest instead of wbvmm: not stepped"
            );
        }
        user
    }

    /// Ask parked vCPU `id` and wait for its answer.
    fn ask(&mut self, id: usize, request: Request) -> Option<Reply> {
        if !self.parked.get(id).copied().unwrap_or(false) {
            return None;
        }
        self.to_vcpus[id].send(request).ok()?;
        let deadline = std::time::Instant::now() + REPLY_DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let (from, ev) = self.events.recv_timeout(left).ok()?;
            let reply = self.note(from, ev);
            if from as usize == id {
                if let Some(r) = reply {
                    return Some(r);
                }
                if self.ended[id] {
                    return None;
                }
            }
        }
    }

    fn any_parked(&self) -> Option<usize> {
        self.parked.iter().position(|p| *p)
    }

    fn read_mem(&mut self, id: usize, addr: u64, len: usize) -> Option<Vec<u8>> {
        match self.ask(id, Request::ReadMem { addr, len })? {
            Reply::Mem(m) => Some(m),
            _ => None,
        }
    }

    fn write_mem(&mut self, id: usize, addr: u64, data: &[u8]) -> bool {
        let data = data.to_vec();
        matches!(
            self.ask(id, Request::WriteMem { addr, data }),
            Some(Reply::Done(true))
        )
    }

    fn remove_all_breakpoints(&mut self) {
        let all: Vec<(u64, u8)> = std::mem::take(
            &mut *self
                .shared
                .breakpoints
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
        .into_iter()
        .collect();
        if let Some(id) = self.any_parked() {
            for (addr, byte) in all {
                self.write_mem(id, addr, &[byte]);
            }
        }
    }

    /// The stop to report once every vCPU is parked: a breakpoint or step first.
    fn stop_reason(&self) -> MultiThreadStopReason<u64> {
        let find = |want| self.cause.iter().position(|c| *c == Some(want));
        if let Some(i) = find(StopCause::Breakpoint) {
            return MultiThreadStopReason::SwBreak(tid(i));
        }
        if find(StopCause::Step).is_some() {
            return MultiThreadStopReason::DoneStep;
        }
        MultiThreadStopReason::SignalWithThread {
            tid: tid(self.any_parked().unwrap_or(0)),
            signal: Signal::SIGINT,
        }
    }

    fn exited(&self) -> MultiThreadStopReason<u64> {
        let code = self
            .exit
            .wait(&|| false, &|| false)
            .map(|o| o.exit_code())
            .unwrap_or(0);
        MultiThreadStopReason::Exited(code as u8)
    }
}

#[derive(Debug, Error)]
pub enum TargetErr {
    #[error("no vCPU is stopped to answer the debugger")]
    NoAnswer,
}

impl Target for DebuggedVm {
    type Arch = X86_64_SSE;
    type Error = TargetErr;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::MultiThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }

    // The stub writes int3 itself; it does not need gdbstub's guard.
    fn guard_rail_implicit_sw_breakpoints(&self) -> bool {
        true
    }
}

impl MultiThreadBase for DebuggedVm {
    fn read_registers(&mut self, regs: &mut X86_64CoreRegs, tid: Tid) -> TargetResult<(), Self> {
        let Some(Reply::Regs(b)) = self.ask(vcpu_of(tid), Request::ReadRegs) else {
            return Err(TargetError::NonFatal);
        };
        let (r, s) = &*b;
        regs.regs = [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ];
        regs.rip = r.rip;
        regs.eflags = r.rflags as u32;
        let seg = &mut regs.segments;
        seg.cs = u32::from(s.cs.selector);
        seg.ss = u32::from(s.ss.selector);
        seg.ds = u32::from(s.ds.selector);
        seg.es = u32::from(s.es.selector);
        seg.fs = u32::from(s.fs.selector);
        seg.gs = u32::from(s.gs.selector);
        Ok(())
    }

    fn write_registers(&mut self, regs: &X86_64CoreRegs, tid: Tid) -> TargetResult<(), Self> {
        let id = vcpu_of(tid);
        let Some(Reply::Regs(b)) = self.ask(id, Request::ReadRegs) else {
            return Err(TargetError::NonFatal);
        };
        let mut r = b.0;
        let g = &regs.regs;
        (r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp) =
            (g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]);
        (r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15) =
            (g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]);
        r.rip = regs.rip;
        // Bit 1 of RFLAGS is always set.
        r.rflags = (r.rflags & !0xffff_ffff) | u64::from(regs.eflags) | 2;
        // Segment selectors are not written: a selector without its descriptor
        // would put the vCPU in a state the guest never made.
        match self.ask(id, Request::WriteRegs(Box::new(r))) {
            Some(Reply::Done(true)) => Ok(()),
            _ => Err(TargetError::NonFatal),
        }
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8], tid: Tid) -> TargetResult<usize, Self> {
        let mem = self
            .read_mem(vcpu_of(tid), start, data.len())
            .ok_or(TargetError::NonFatal)?;
        data[..mem.len()].copy_from_slice(&mem);
        // Show the guest's bytes, not the int3s placed over them.
        let bps = self
            .shared
            .breakpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let end = start.saturating_add(mem.len() as u64);
        for (&addr, &byte) in bps.range(start..end) {
            data[(addr - start) as usize] = byte;
        }
        Ok(mem.len())
    }

    fn write_addrs(&mut self, start: u64, data: &[u8], tid: Tid) -> TargetResult<(), Self> {
        if self.write_mem(vcpu_of(tid), start, data) {
            Ok(())
        } else {
            Err(TargetError::NonFatal)
        }
    }

    fn list_active_threads(&mut self, active: &mut dyn FnMut(Tid)) -> Result<(), Self::Error> {
        for i in (0..self.ended.len()).filter(|&i| !self.ended[i]) {
            active(tid(i));
        }
        Ok(())
    }

    fn support_resume(&mut self) -> Option<MultiThreadResumeOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadResume for DebuggedVm {
    fn resume(&mut self) -> Result<(), Self::Error> {
        self.release_all(true);
        Ok(())
    }

    fn clear_resume_actions(&mut self) -> Result<(), Self::Error> {
        self.action.iter_mut().for_each(|s| *s = None);
        self.locked = false;
        Ok(())
    }

    fn set_resume_action_continue(
        &mut self,
        tid: Tid,
        _signal: Option<Signal>,
    ) -> Result<(), Self::Error> {
        self.resume(tid, false)
    }

    fn support_single_step(&mut self) -> Option<MultiThreadSingleStepOps<'_, Self>> {
        Some(self)
    }

    fn support_scheduler_locking(&mut self) -> Option<MultiThreadSchedulerLockingOps<'_, Self>> {
        Some(self)
    }
}

impl DebuggedVm {
    /// How vCPU `tid` resumes: one step (`true`) or running on.
    fn resume(&mut self, tid: Tid, step: bool) -> Result<(), TargetErr> {
        if let Some(s) = self.action.get_mut(vcpu_of(tid)) {
            *s = Some(step);
        }
        Ok(())
    }
}

impl MultiThreadSchedulerLocking for DebuggedVm {
    fn set_resume_action_scheduler_lock(&mut self) -> Result<(), Self::Error> {
        self.locked = true;
        Ok(())
    }
}

impl MultiThreadSingleStep for DebuggedVm {
    fn set_resume_action_step(
        &mut self,
        tid: Tid,
        _signal: Option<Signal>,
    ) -> Result<(), Self::Error> {
        self.resume(tid, true)
    }
}

impl Breakpoints for DebuggedVm {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }
}

impl SwBreakpoint for DebuggedVm {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if self.shared.is_breakpoint(addr) {
            return Ok(true);
        }
        let id = self
            .any_parked()
            .ok_or(TargetError::Fatal(TargetErr::NoAnswer))?;
        let Some(orig) = self.read_mem(id, addr, 1).and_then(|m| m.first().copied()) else {
            return Ok(false);
        };
        if !self.write_mem(id, addr, &[0xcc]) {
            return Ok(false);
        }
        self.shared
            .breakpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr, orig);
        Ok(true)
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        let orig = self
            .shared
            .breakpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&addr);
        let Some(orig) = orig else { return Ok(false) };
        let id = self
            .any_parked()
            .ok_or(TargetError::Fatal(TargetErr::NoAnswer))?;
        Ok(self.write_mem(id, addr, &[orig]))
    }
}

impl BlockingEventLoop for DebuggedVm {
    type Target = DebuggedVm;
    type Connection = BufferedConn;
    type StopReason = MultiThreadStopReason<u64>;

    /// Wait for the debugger's next byte (Ctrl-C, or a packet while running) or a
    /// vCPU's stop, whichever comes first; on a stop, stop the others too.
    fn wait_for_stop_reason(
        vm: &mut DebuggedVm,
        conn: &mut BufferedConn,
    ) -> Result<LoopEvent<Self::StopReason>, WaitForStopReasonError<TargetErr, io::Error>> {
        loop {
            if let Some(b) = conn.buffered() {
                return Ok(LoopEvent::IncomingData(b));
            }
            vm.drain_events();
            if vm.all_ended() {
                return Ok(LoopEvent::TargetStopped(vm.exited()));
            }
            if vm.cause.iter().any(Option::is_some) {
                vm.stop_all();
                if vm.all_ended() {
                    return Ok(LoopEvent::TargetStopped(vm.exited()));
                }
                return Ok(LoopEvent::TargetStopped(vm.stop_reason()));
            }
            conn.flush().map_err(WaitForStopReasonError::Connection)?;
            let mut fds = [
                libc::pollfd {
                    fd: conn.stream.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: vm.shared.events_ready.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds, for as long as the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(WaitForStopReasonError::Connection(e));
                }
                continue;
            }
            if fds[0].revents != 0 {
                let b = conn.read().map_err(WaitForStopReasonError::Connection)?;
                return Ok(LoopEvent::IncomingData(b));
            }
        }
    }

    /// Ctrl-C: stop every vCPU and report SIGINT.
    fn on_interrupt(vm: &mut DebuggedVm) -> Result<Option<Self::StopReason>, TargetErr> {
        vm.stop_all();
        if vm.all_ended() {
            return Ok(Some(vm.exited()));
        }
        Ok(Some(vm.stop_reason()))
    }
}

/// The debugger's connection, read and written in blocks (gdbstub works byte by
/// byte; a system call per byte would make `g` packets slow).
pub struct BufferedConn {
    stream: UnixStream,
    rbuf: Vec<u8>,
    rpos: usize,
    wbuf: Vec<u8>,
}

impl BufferedConn {
    fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            rbuf: Vec::new(),
            rpos: 0,
            wbuf: Vec::new(),
        }
    }

    fn buffered(&mut self) -> Option<u8> {
        let b = self.rbuf.get(self.rpos).copied()?;
        self.rpos += 1;
        Some(b)
    }
}

impl Connection for BufferedConn {
    type Error = io::Error;

    fn write(&mut self, byte: u8) -> io::Result<()> {
        self.wbuf.push(byte);
        Ok(())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.wbuf.extend_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        let out = std::mem::take(&mut self.wbuf);
        Write::write_all(&mut self.stream, &out)
    }
}

impl ConnectionExt for BufferedConn {
    fn read(&mut self) -> io::Result<u8> {
        if let Some(b) = self.buffered() {
            return Ok(b);
        }
        // A reply may still sit in the write buffer (gdbstub flushes per packet, but
        // an ack alone is only written).
        self.flush()?;
        let mut buf = [0u8; 4096];
        let n = Read::read(&mut self.stream, &mut buf)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.rbuf.clear();
        self.rbuf.extend_from_slice(&buf[..n]);
        self.rpos = 1;
        Ok(buf[0])
    }

    fn peek(&mut self) -> io::Result<Option<u8>> {
        Ok(self.rbuf.get(self.rpos).copied())
    }
}

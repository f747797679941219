//! The vCPU side of the GDB stub: a vCPU thread parks here while the debugger has the
//! VM stopped and answers the stub's requests itself (registers, memory through its
//! own page tables, guest debug controls), so that no other thread touches its fd.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::{kvm_guest_debug, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vmm_sys_util::eventfd::EventFd;

use crate::emulate::kvm::{CpuidSource, KvmCpu, SlotMem};
use crate::emulate::mem::{GuestPhysMem, PAGE};
use crate::emulate::paging::{Access, AccessKind, Paging};
use crate::memory::SlotRegistry;
use crate::vcpu::ExitState;

/// Why a vCPU stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCause {
    /// The stub asked every vCPU to stop (a debugger connected, Ctrl-C, another vCPU
    /// hit a breakpoint).
    Paused,
    /// An int3 the debugger placed.
    Breakpoint,
    /// One instruction done (KVM_GUESTDBG_SINGLESTEP).
    Step,
}

/// What the stub asks of a parked vCPU.
#[derive(Debug)]
pub enum Request {
    ReadRegs,
    /// General-purpose registers, RIP and RFLAGS.
    WriteRegs(Box<kvm_regs>),
    /// Bytes at a guest virtual address (physical when paging is off).
    ReadMem {
        addr: u64,
        len: usize,
    },
    WriteMem {
        addr: u64,
        data: Vec<u8>,
    },
    /// Run again: `debug` keeps int3 and single-step exits to wbvmm on, `step` runs one
    /// instruction.
    Resume {
        debug: bool,
        step: bool,
    },
}

#[derive(Debug)]
pub enum Reply {
    Regs(Box<(kvm_regs, kvm_sregs)>),
    /// Fewer bytes than asked when the range runs into an unmapped page.
    Mem(Vec<u8>),
    Done(bool),
}

#[derive(Debug)]
pub enum Event {
    Stopped(StopCause),
    Reply(Reply),
    /// The vCPU thread left its run loop (the VM is ending).
    Ended,
}

/// What the stub and every vCPU share.
pub struct Shared {
    /// Set by the stub: vCPUs park after their current exit (and before the first
    /// KVM_RUN: it starts set, so the guest waits for the debugger).
    pause: AtomicBool,
    /// Written after each event, so the stub can poll it beside the debugger's socket.
    pub(crate) events_ready: EventFd,
    /// Each vCPU thread while it runs, for kicks (cleared under the lock before it
    /// ends, so a kick never reaches a thread that is gone).
    threads: Mutex<Vec<Option<libc::pthread_t>>>,
    /// The debugger's software breakpoints: address → the byte the int3 replaced.
    pub(crate) breakpoints: Mutex<BTreeMap<u64, u8>>,
}

impl Shared {
    pub(crate) fn new(cpus: usize) -> std::io::Result<Self> {
        Ok(Self {
            pause: AtomicBool::new(true),
            events_ready: EventFd::new(libc::EFD_NONBLOCK)?,
            threads: Mutex::new(vec![None; cpus]),
            breakpoints: Mutex::new(BTreeMap::new()),
        })
    }

    pub(crate) fn set_pause(&self, pause: bool) {
        self.pause.store(pause, Ordering::SeqCst);
    }

    /// Take vCPU `id` out of KVM_RUN (see `crate::vcpu_kick`); nothing if it is not
    /// running.
    pub(crate) fn kick(&self, id: usize) {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(Some(t)) = threads.get(id) {
            crate::vcpu_kick::kick_pthread(*t);
        }
    }

    /// Whether the debugger placed an int3 at `addr`.
    pub fn is_breakpoint(&self, addr: u64) -> bool {
        self.breakpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&addr)
    }
}

/// One vCPU's end of the stub, owned by its thread.
pub struct VcpuPort {
    pub(crate) id: u32,
    pub(crate) shared: Arc<Shared>,
    pub(crate) requests: Receiver<Request>,
    pub(crate) events: Sender<(u32, Event)>,
    cpuid: Option<CpuidSource>,
    attached: bool,
}

/// How often a parked vCPU looks at the VM's stop flag and statistics requests: a
/// parked VM waits for a human, so this only bounds how late it notices the VM end.
const PARKED_CHECK: Duration = Duration::from_millis(50);

impl VcpuPort {
    pub(crate) fn new(
        id: u32,
        shared: Arc<Shared>,
        requests: Receiver<Request>,
        events: Sender<(u32, Event)>,
    ) -> Self {
        Self {
            id,
            shared,
            requests,
            events,
            cpuid: None,
            attached: false,
        }
    }

    /// On the vCPU thread, before its first KVM_RUN: the stub may kick it from now.
    pub fn attach(&mut self) {
        // SAFETY: pthread_self has no preconditions.
        self.attached = self.set_thread(Some(unsafe { libc::pthread_self() }));
    }

    /// This vCPU's entry in the stub's thread table (what a kick signals); false if
    /// the table has no entry for it.
    fn set_thread(&self, thread: Option<libc::pthread_t>) -> bool {
        let mut threads = self
            .shared
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match threads.get_mut(self.id as usize) {
            Some(slot) => {
                *slot = thread;
                true
            }
            None => false,
        }
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Whether the stub wants this vCPU parked.
    #[inline]
    pub fn pause_wanted(&self) -> bool {
        self.shared.pause.load(Ordering::Relaxed)
    }

    fn send(&self, event: Event) {
        let _ = self.events.send((self.id, event));
        let _ = self.shared.events_ready.write(1);
    }

    /// Tell the stub why this vCPU stopped and serve its requests until it says
    /// resume, the stub goes away, or the VM ends. `idle` runs now and then meanwhile
    /// (statistics snapshots).
    pub fn park(
        &mut self,
        cause: StopCause,
        fd: &VcpuFd,
        memory: &SlotRegistry,
        exit: &ExitState,
        mut idle: impl FnMut(),
    ) {
        self.send(Event::Stopped(cause));
        loop {
            let request = match self.requests.recv_timeout(PARKED_CHECK) {
                Ok(r) => r,
                Err(RecvTimeoutError::Timeout) => {
                    if exit.stopping() {
                        return;
                    }
                    idle();
                    continue;
                }
                // The stub is gone: run on without it.
                Err(RecvTimeoutError::Disconnected) => {
                    self.shared.set_pause(false);
                    let _ = set_guest_debug(fd, false, false);
                    return;
                }
            };
            let reply = match request {
                Request::Resume { debug, step } => {
                    if let Err(e) = set_guest_debug(fd, debug, step) {
                        log::warn!("gdb: vCPU {}: KVM_SET_GUEST_DEBUG failed: {e}", self.id);
                    }
                    return;
                }
                Request::ReadRegs => match (fd.get_regs(), fd.get_sregs()) {
                    (Ok(r), Ok(s)) => Reply::Regs(Box::new((r, s))),
                    _ => Reply::Done(false),
                },
                Request::WriteRegs(regs) => Reply::Done(fd.set_regs(&regs).is_ok()),
                Request::ReadMem { addr, len } => {
                    let mut buf = vec![0u8; len];
                    let n = self.access(fd, memory, addr, Dir::Read(&mut buf));
                    buf.truncate(n);
                    Reply::Mem(buf)
                }
                Request::WriteMem { addr, data } => {
                    let n = self.access(fd, memory, addr, Dir::Write(&data));
                    Reply::Done(n == data.len())
                }
            };
            self.send(Event::Reply(reply));
        }
    }

    /// Copy between guest virtual memory and `dir`'s buffer, page by page, translated
    /// with this vCPU's page tables; returns the bytes done before the first page
    /// that is not mapped to RAM. The debugger sees through protections (it reads
    /// as the kernel with SMAP off, and writes read-only code pages to place int3s).
    fn access(&mut self, fd: &VcpuFd, memory: &SlotRegistry, addr: u64, mut dir: Dir) -> usize {
        let cpl = fd.get_sregs().map(|s| s.cs.selector as u8 & 3).unwrap_or(0);
        let cpuid = self
            .cpuid
            .get_or_insert_with(|| CpuidSource::for_vcpu(fd, crate::cpuid::pvm_host()));
        let mut cpu = KvmCpu::new(fd, cpuid);
        let mut paging = Paging::from_cpu(&mut cpu, cpl);
        paging.ac_override = true;
        let snap = memory.load();
        let mem = SlotMem { snap: &snap };
        let read = Access {
            kind: AccessKind::Read,
            user: false,
        };
        let len = dir.len();
        let mut done = 0;
        while done < len {
            let la = addr.wrapping_add(done as u64);
            let n = ((PAGE - (la & (PAGE - 1))) as usize).min(len - done);
            let Ok(pa) = paging.translate(&mem, la, read) else {
                break;
            };
            let ok = match &mut dir {
                Dir::Read(buf) => mem.read(pa, &mut buf[done..done + n]).is_ok(),
                Dir::Write(data) => mem.write(pa, &data[done..done + n]).is_ok(),
            };
            if !ok {
                break;
            }
            done += n;
        }
        done
    }
}

enum Dir<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

impl Dir<'_> {
    fn len(&self) -> usize {
        match self {
            Dir::Read(b) => b.len(),
            Dir::Write(d) => d.len(),
        }
    }
}

impl Drop for VcpuPort {
    fn drop(&mut self) {
        if self.attached {
            self.set_thread(None);
        }
        self.send(Event::Ended);
    }
}

/// KVM_SET_GUEST_DEBUG: with `debug`, int3 (#BP) exits to wbvmm instead of reaching
/// the guest; with `step` too, each instruction ends with a debug exit.
fn set_guest_debug(fd: &VcpuFd, debug: bool, step: bool) -> Result<(), kvm_ioctls::Error> {
    let mut control = 0;
    if debug {
        control = kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_USE_SW_BP;
        if step {
            control |= kvm_bindings::KVM_GUESTDBG_SINGLESTEP;
        }
    }
    let dbg = kvm_guest_debug {
        control,
        ..Default::default()
    };
    fd.set_guest_debug(&dbg)
}

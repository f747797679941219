//! The `wbvmm-io` thread: one epoll loop over the VM's host-side event sources.
//!
//! Each source has a [`Token`] and one handler: console input and COM1's FIFO space
//! (`console`), the VM signals (`signals`), the NIC's tap, ring space, TimerInt,
//! INTx resample and TX doorbells (`nic`). Two duties are timed rather than
//! fd-driven and run after every wake-up: replaying KVM's coalesced COM1 writes,
//! and TimerInt's deadline; [`IoLoop::timeout_ms`] picks the wait for both.
//!
//! Why an enum of tokens and not rust-vmm's `event-manager` (Firecracker's
//! subscribers): those two timed duties have no fd, and event-manager's loop has
//! no hook after a wait, so each would need a timerfd re-armed whenever the NIC's
//! deadline moves (a syscall per change on the RX path); its subscribers sit behind
//! `Arc<Mutex<dyn ...>>`, a lock per event, and the tap and the NIC's space event
//! share the RX handler's backpressure state. A `match` over an enum (Cloud
//! Hypervisor's `EpollDispatch`, crosvm's `EventToken`) dispatches without either,
//! and reads as the list of what the thread waits for.

mod busy_poll;
mod console;
mod nic;
mod signals;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use wbvmm_devices::Bus;

pub use busy_poll::{BusyPoll, Source};
pub use console::Console;
pub use nic::{FrameSource, Nic, NicDoorbells, RX_BUDGET};
pub use signals::{block_vm_signals, SignalFd, VM_SIGNALS};

use crate::affinity::{self, CpuList};
use crate::coalesced::CoalescedRing;
use crate::terminal::RawModeGuard;
use crate::vcpu::{self, ExitState};

#[derive(Debug, Error)]
pub enum IoThreadError {
    #[error("cannot set up the I/O thread's {what}")]
    Setup {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn setup_err(what: &'static str) -> impl FnOnce(std::io::Error) -> IoThreadError {
    move |source| IoThreadError::Setup { what, source }
}

/// What the loop waits for; the epoll data of each registered fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token {
    /// The main thread ends the loop.
    Stop,
    /// SIGINT, SIGTERM or SIGUSR1 (a signalfd).
    Signal,
    /// Console input.
    Stdin,
    /// The guest drained COM1's receive FIFO.
    SerialSpace,
    /// Frames on the tap.
    Tap,
    /// The guest freed space in the NIC's RX ring.
    NicRxSpace,
    /// The guest EOI'd the NIC's INTx (irqfd resample).
    NicResample,
    /// The C+ TxPoll doorbell (ioeventfd).
    NicTxPoll,
    /// TimerInt's deadline moved.
    NicTimer,
    /// A learnt C-mode TSD doorbell (ioeventfd), by slot (`TsdDoorbells::evts`).
    NicTsd(u8),
    /// The learnt IntrMask unmask (ioeventfd, `net/unmask.rs`).
    NicUnmask,
}

const TSD_BASE: u64 = 16;

impl Token {
    fn to_u64(self) -> u64 {
        match self {
            Token::Stop => 0,
            Token::Signal => 1,
            Token::Stdin => 2,
            Token::SerialSpace => 3,
            Token::Tap => 4,
            Token::NicRxSpace => 5,
            Token::NicResample => 6,
            Token::NicTxPoll => 7,
            Token::NicTimer => 8,
            Token::NicUnmask => 9,
            Token::NicTsd(n) => TSD_BASE + u64::from(n),
        }
    }

    fn from_u64(v: u64) -> Option<Self> {
        Some(match v {
            0 => Token::Stop,
            1 => Token::Signal,
            2 => Token::Stdin,
            3 => Token::SerialSpace,
            4 => Token::Tap,
            5 => Token::NicRxSpace,
            6 => Token::NicResample,
            7 => Token::NicTxPoll,
            8 => Token::NicTimer,
            9 => Token::NicUnmask,
            v if (TSD_BASE..=TSD_BASE + u64::from(u8::MAX)).contains(&v) => {
                Token::NicTsd((v - TSD_BASE) as u8)
            }
            _ => return None,
        })
    }
}

/// What a handler tells the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// End the loop (the VM is ending).
    Stop,
}

/// Why the main thread wakes while the VM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// SIGUSR1: report the running VM's statistics.
    Snapshot,
    /// Something ended the VM (`ExitState` has the outcome), or a vCPU thread ended.
    Ended,
    /// The NIC's MMIO BAR moved: move its register shadow's memslot (only the main
    /// thread may change memslots; see `crate::net::RegisterShadow`).
    NicShadow,
}

/// The loop's epoll, addressed by [`Token`].
pub struct Watcher(Epoll);

impl Watcher {
    fn new() -> std::io::Result<Self> {
        Epoll::new().map(Self)
    }

    pub fn add(&self, fd: RawFd, token: Token) -> std::io::Result<()> {
        let ev = EpollEvent::new(EventSet::IN, token.to_u64());
        self.0.ctl(ControlOperation::Add, fd, ev)
    }

    /// Change what `fd` is watched for (empty: nothing, but stay registered).
    pub fn set(&self, fd: RawFd, token: Token, events: EventSet) {
        let ev = EpollEvent::new(events, token.to_u64());
        let _ = self.0.ctl(ControlOperation::Modify, fd, ev);
    }

    pub fn remove(&self, fd: RawFd) {
        let _ = self
            .0
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }
}

/// KVM's queue of COM1 transmit writes, replayed on the port bus.
pub struct CoalescedOutput {
    pub ring: Arc<CoalescedRing>,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
}

/// Everything the loop serves.
pub struct IoSources {
    pub console: Console,
    pub signals: Option<SignalFd>,
    pub nic: Option<Nic>,
    pub coalesced: Option<CoalescedOutput>,
    pub exit: Arc<ExitState>,
    /// To the main thread.
    pub wake: Sender<Wake>,
}

pub struct IoLoop {
    watcher: Watcher,
    /// Kept open while registered.
    _stop: EventFd,
    src: IoSources,
    /// Queued UART output was replayed at the last wake-up.
    output_flowing: bool,
    events: Vec<EpollEvent>,
    /// Polling after NIC activity instead of going to sleep (`--net ...,poll-us=N`).
    poll: BusyPoll,
}

impl IoLoop {
    fn new(mut src: IoSources, stop: EventFd) -> Result<Self, IoThreadError> {
        let watcher = Watcher::new().map_err(setup_err("epoll"))?;
        watcher
            .add(stop.as_raw_fd(), Token::Stop)
            .map_err(setup_err("epoll"))?;
        if let Some(s) = &src.signals {
            watcher
                .add(s.as_raw_fd(), Token::Signal)
                .map_err(setup_err("signalfd"))?;
        }
        src.console
            .watch(&watcher)
            .map_err(setup_err("console input"))?;
        if let Some(n) = &src.nic {
            n.watch(&watcher).map_err(setup_err("NIC events"))?;
        }
        let poll = BusyPoll::new(src.nic.as_ref().map_or(Duration::ZERO, Nic::poll_window));
        Ok(Self {
            watcher,
            _stop: stop,
            src,
            output_flowing: false,
            events: vec![EpollEvent::default(); 8],
            poll,
        })
    }

    fn run(&mut self) {
        loop {
            let timeout = self.timeout_ms(Instant::now());
            let n = match self.wait(timeout) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            let by = self.ready_source(n);
            self.poll.woke(Instant::now(), by);
            if self.dispatch_ready(n) == Flow::Stop {
                return;
            }
            if by != Source::Other && self.busy_poll() == Flow::Stop {
                return;
            }
        }
    }

    /// Whose NIC data-path work the `n` ready events are: the guest's if any is
    /// (see [`Source`]), else the tap's, else none.
    fn ready_source(&self, n: usize) -> Source {
        let mut by = Source::Other;
        for e in &self.events[..n] {
            match Token::from_u64(e.data()) {
                Some(
                    Token::NicRxSpace | Token::NicTxPoll | Token::NicTsd(_) | Token::NicUnmask,
                ) => return Source::Guest,
                Some(Token::Tap) => by = Source::Peer,
                // An EOI (the resample irqfd) is no data-path work: the guest's
                // doorbell follows it much later, if at all.
                _ => {}
            }
        }
        by
    }

    /// After NIC activity: poll every source without sleeping for the window
    /// [`BusyPoll`] allows, serving what comes, again while windows find work.
    fn busy_poll(&mut self) -> Flow {
        loop {
            let start = Instant::now();
            let Some(window) = self.poll.window(start) else {
                self.poll.skipped(start);
                return Flow::Continue;
            };
            let found = loop {
                let n = match self.wait(0) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
                    Err(_) => return Flow::Stop,
                };
                if n > 0 {
                    let by = self.ready_source(n);
                    if self.dispatch_ready(n) == Flow::Stop {
                        return Flow::Stop;
                    }
                    // The peer's frames end this window, neutrally: the next one
                    // waits for the guest's answer to them.
                    if by != Source::Other {
                        break by;
                    }
                }
                if self.src.nic.as_ref().is_some_and(Nic::snoop_tx) {
                    break Source::Guest;
                }
                if start.elapsed() >= window {
                    break Source::Other;
                }
                // The peer (netperf, the tap's writer) may share this CPU: let it run.
                std::thread::yield_now();
            };
            let now = Instant::now();
            self.poll.finished(found, now - start, now);
            if let Some(nic) = &self.src.nic {
                nic.count_poll(found != Source::Other);
            }
            if found == Source::Other {
                return Flow::Continue;
            }
        }
    }

    /// How long to wait: for ever, unless queued UART writes must show (an idle
    /// guest's output, and THRE for an interrupt-driven driver: every 10 ms, every
    /// 1 ms while output flows, as fast as a 115200 baud UART) or TimerInt is due.
    fn timeout_ms(&self, now: Instant) -> i32 {
        wait_timeout_ms(
            self.src.coalesced.is_some(),
            self.output_flowing,
            self.src.nic.as_ref().and_then(Nic::timer_deadline),
            now,
        )
    }

    /// Wait once, then do the timed duties; returns how many events are ready.
    fn wait(&mut self, timeout_ms: i32) -> std::io::Result<usize> {
        let n = self.watcher.0.wait(timeout_ms, &mut self.events)?;
        if let Some(c) = &self.src.coalesced {
            self.output_flowing = vcpu::replay_coalesced(&c.ring, &c.pio, &c.mmio) > 0;
        }
        if let Some(nic) = &mut self.src.nic {
            nic.poll_timer(Instant::now());
        }
        Ok(n)
    }

    #[cfg(test)]
    fn ready(&self, n: usize) -> impl Iterator<Item = (Token, EventSet)> + '_ {
        self.events[..n]
            .iter()
            .filter_map(|e| Some((Token::from_u64(e.data())?, e.event_set())))
    }

    fn dispatch_ready(&mut self, n: usize) -> Flow {
        for i in 0..n {
            let ev = self.events[i];
            let Some(token) = Token::from_u64(ev.data()) else {
                continue;
            };
            if self.dispatch(token, ev.event_set()) == Flow::Stop {
                return Flow::Stop;
            }
        }
        Flow::Continue
    }

    /// The one place that says which handler serves which source.
    fn dispatch(&mut self, token: Token, events: EventSet) -> Flow {
        let IoSources {
            console,
            signals,
            nic,
            exit,
            wake,
            ..
        } = &mut self.src;
        let w = &self.watcher;
        match (token, nic.as_mut()) {
            (Token::Stop, _) => Flow::Stop,
            (Token::Signal, _) => match signals {
                Some(s) => signals::on_signals(s, exit, wake),
                None => Flow::Continue,
            },
            (Token::Stdin, _) => console.on_input(w, exit, wake),
            (Token::SerialSpace, _) => console.on_rx_space(),
            (Token::Tap | Token::NicRxSpace, Some(nic)) => nic.on_rx(token, events, w),
            (Token::NicTimer, Some(nic)) => nic.on_timer_moved(),
            (Token::NicResample, Some(nic)) => nic.on_resample(),
            (Token::NicTxPoll, Some(nic)) => nic.on_txpoll(),
            (Token::NicTsd(_), Some(nic)) => nic.on_tsd(),
            (Token::NicUnmask, Some(nic)) => nic.on_unmask(),
            (_, None) => Flow::Continue,
        }
    }
}

/// See [`IoLoop::timeout_ms`]; -1 waits for ever.
fn wait_timeout_ms(
    coalesced: bool,
    output_flowing: bool,
    nic_timer: Option<Instant>,
    now: Instant,
) -> i32 {
    let uart = match (coalesced, output_flowing) {
        (true, true) => Some(1),
        (true, false) => Some(10),
        (false, _) => None,
    };
    let timer = nic_timer.map(|due| {
        due.saturating_duration_since(now)
            .as_micros()
            .div_ceil(1000)
            .min(i32::MAX as u128) as i32
    });
    match (uart, timer) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => -1,
    }
}

/// The running `wbvmm-io` thread.
pub struct IoThread {
    stop: EventFd,
    handle: Option<JoinHandle<()>>,
    pub tid: i32,
    /// Restores the terminal when the thread is stopped.
    _raw: Option<RawModeGuard>,
}

impl IoThread {
    /// `raw_stdin`: put the terminal on stdin in raw mode (console input goes to
    /// the guest, Ctrl-A x quits) until [`IoThread::stop`].
    pub fn spawn(
        src: IoSources,
        raw_stdin: bool,
        pin: Option<CpuList>,
    ) -> Result<Self, IoThreadError> {
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(setup_err("stop eventfd"))?;
        let raw = raw_stdin
            .then(|| RawModeGuard::enter(libc::STDIN_FILENO))
            .flatten();
        let mut lp = IoLoop::new(src, stop.try_clone().map_err(setup_err("stop eventfd"))?)?;
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("wbvmm-io".into())
            .spawn(move || {
                if let Some(list) = pin {
                    if let Err(e) = affinity::pin_current_thread("wbvmm-io", &list) {
                        log::error!("{}", crate::error_chain(&e));
                    }
                }
                crate::seccomp::enter(crate::seccomp::ThreadKind::Io);
                // SAFETY: gettid has no preconditions.
                let _ = tid_tx.send(unsafe { libc::gettid() });
                lp.run();
            })
            .map_err(setup_err("thread"))?;
        let tid = tid_rx.recv().unwrap_or(0);
        Ok(Self {
            stop,
            handle: Some(handle),
            tid,
            _raw: raw,
        })
    }

    pub fn stop(mut self) {
        let _ = self.stop.write(1);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        // The raw-mode guard drops here, restoring the terminal.
    }
}

#[cfg(test)]
pub(crate) mod tests;

//! The NIC's event sources in the I/O thread: frames from the tap into the guest
//! (with backpressure while the guest's ring is full), the ring's "space again"
//! event, TimerInt's deadline, and the KVM-bound ones — the INTx resample irqfd and
//! the TX doorbell ioeventfds — behind [`NicDoorbells`], so that every handler here
//! runs in tests on the RTL8139 model, fake guest memory and a socket.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use wbvmm_devices::net::rtl8139::Rtl8139;
use wbvmm_devices::net::tap::{Tap, TapError, MAX_TAP_FRAME};
use wbvmm_devices::net::RxResult;

use super::{Flow, Token, Watcher};
use crate::net::{IoCounters, NetDevice};

/// Frames moved per wake-up before other sources get a turn.
pub const RX_BUDGET: usize = 64;

/// Where received frames come from: the tap; in tests, a datagram socket.
pub trait FrameSource: AsRawFd + Send + Sync {
    /// One frame into `buf`; `Ok(None)` when nothing is queued.
    fn read_frame(&self, buf: &mut [u8]) -> Result<Option<usize>, TapError>;
    fn name(&self) -> &str;
}

impl FrameSource for Tap {
    fn read_frame(&self, buf: &mut [u8]) -> Result<Option<usize>, TapError> {
        Tap::read_frame(self, buf)
    }
    fn name(&self) -> &str {
        Tap::name(self)
    }
}

/// The NIC's event sources that exist only with a VM: the INTx line's resample
/// irqfd and the TX doorbells KVM completes as ioeventfds.
pub trait NicDoorbells: Send + Sync {
    fn resample(&self) -> &EventFd;
    /// The guest EOI'd INTx or unmasked its pin: count it, and raise the line again
    /// while the device asserts it (`irq::LevelIrq::on_resample`).
    fn on_resample(&self);
    /// The C+ TxPoll doorbell, with `--net tx=ioeventfd`.
    fn txpoll(&self) -> Option<&EventFd>;
    fn on_txpoll(&self);
    /// The learnt C-mode TSD doorbells (up to three lengths per TSD), with `--net tx=ioeventfd`.
    fn tsd(&self) -> &[EventFd];
    fn on_tsd(&self);
    /// The learnt IntrMask unmask beside the register shadow, with `--net unmask=on`.
    fn unmask(&self) -> Option<&EventFd>;
    fn on_unmask(&self);
}

impl NicDoorbells for NetDevice {
    fn resample(&self) -> &EventFd {
        &self.irq.resample
    }
    fn on_resample(&self) {
        self.irq.on_resample();
    }
    fn txpoll(&self) -> Option<&EventFd> {
        self.doorbell.as_ref().map(|d| &d.evt)
    }
    fn on_txpoll(&self) {
        if let Some(d) = &self.doorbell {
            let _ = d.evt.read();
            self.nic.process_tx();
            d.follow_bars();
        }
    }
    fn tsd(&self) -> &[EventFd] {
        self.frontend.as_ref().map_or(&[], |f| &f.tsd.evts[..])
    }
    fn on_tsd(&self) {
        if let Some(f) = &self.frontend {
            f.tsd.replay(&f.nic);
        }
    }
    fn unmask(&self) -> Option<&EventFd> {
        self.frontend.as_ref()?.unmask.as_ref().map(|u| &u.evt)
    }
    fn on_unmask(&self) {
        if let Some(f) = &self.frontend {
            if let Some(u) = &f.unmask {
                u.apply(&f.nic);
            }
        }
    }
}

/// How often a ring that looks full is looked at again. A real 8139C+ reads the
/// next descriptor for every arriving frame, so a driver may refill its ring without
/// any register write (the test guest's lean C+ driver does): the space event alone
/// could then never come, and RX would stall for good.
const RX_RECHECK: Duration = Duration::from_millis(1);

pub struct Nic {
    model: Arc<Rtl8139>,
    frames: Arc<dyn FrameSource>,
    counters: Arc<IoCounters>,
    doorbells: Arc<dyn NicDoorbells>,
    /// What the loop waits for on the tap: nothing while the guest's ring is full.
    tap_interest: EventSet,
    tap_open: bool,
    /// TimerInt's deadline, re-read only when the device says it moved or after it
    /// fired: no NIC lock per wake-up.
    timer: Option<Instant>,
    /// While the guest's ring looks full: when to look at it again.
    rx_recheck: Option<Instant>,
    frame: Vec<u8>,
    /// The I/O loop's longest busy-poll window after NIC activity (zero: none).
    poll_window: Duration,
    /// While busy-polling, look at the C+ TX ring too (`tx-snoop=on`).
    tx_snoop: bool,
}

impl Nic {
    pub fn new(
        model: Arc<Rtl8139>,
        frames: Arc<dyn FrameSource>,
        counters: Arc<IoCounters>,
        doorbells: Arc<dyn NicDoorbells>,
    ) -> Self {
        let timer = model.next_timer_deadline();
        Self {
            model,
            frames,
            counters,
            doorbells,
            tap_interest: EventSet::IN,
            tap_open: true,
            timer,
            rx_recheck: None,
            frame: vec![0; MAX_TAP_FRAME],
            poll_window: Duration::ZERO,
            tx_snoop: false,
        }
    }

    /// Busy-poll up to `window` after NIC activity (see `super::BusyPoll`).
    pub fn with_poll_window(mut self, window: Duration) -> Self {
        self.poll_window = window;
        self
    }

    pub fn poll_window(&self) -> Duration {
        self.poll_window
    }

    /// While busy-polling, send C+ frames found in the TX ring before their doorbell.
    pub fn with_tx_snoop(mut self, on: bool) -> Self {
        self.tx_snoop = on;
        self
    }

    /// One look of a busy-poll at the C+ TX ring (see `Rtl8139::snoop_tx`): the
    /// doorbell's exit costs the vCPU ~15-20 us here and the frame would wait for
    /// its ioeventfd; now it leaves while the vCPU is still in that exit. True when
    /// it found frames.
    pub fn snoop_tx(&self) -> bool {
        if !self.tx_snoop || !self.model.snoop_tx() {
            return false;
        }
        self.counters.tx_snooped.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// A busy-poll window ended, having found work or not.
    pub fn count_poll(&self, found: bool) {
        let c = if found {
            &self.counters.polls_found
        } else {
            &self.counters.polls_empty
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// The VM's NIC: its tap, model, counters and KVM doorbells.
    pub fn of_device(net: &Arc<NetDevice>) -> Self {
        Self::new(
            net.nic.clone(),
            net.tap.clone(),
            net.io.clone(),
            net.clone(),
        )
        .with_poll_window(net.poll_window)
        .with_tx_snoop(net.tx_snoop)
    }

    pub fn watch(&self, w: &Watcher) -> std::io::Result<()> {
        w.add(self.frames.as_raw_fd(), Token::Tap)?;
        w.add(self.model.rx_space_event().as_raw_fd(), Token::NicRxSpace)?;
        w.add(self.model.timer_event().as_raw_fd(), Token::NicTimer)?;
        w.add(self.doorbells.resample().as_raw_fd(), Token::NicResample)?;
        if let Some(e) = self.doorbells.txpoll() {
            w.add(e.as_raw_fd(), Token::NicTxPoll)?;
        }
        for (i, e) in self.doorbells.tsd().iter().enumerate() {
            w.add(e.as_raw_fd(), Token::NicTsd(i as u8))?;
        }
        if let Some(e) = self.doorbells.unmask() {
            w.add(e.as_raw_fd(), Token::NicUnmask)?;
        }
        Ok(())
    }

    /// The tap has frames (`Token::Tap`) or the guest freed ring space
    /// (`Token::NicRxSpace`): move frames in while they fit.
    pub fn on_rx(&mut self, token: Token, events: EventSet, w: &Watcher) -> Flow {
        if token == Token::NicRxSpace {
            let _ = self.model.rx_space_event().read();
        }
        if !self.tap_open {
            return Flow::Continue;
        }
        let room = self.pump_rx();
        // Backpressure: while the guest's ring is full, stop watching the tap (the
        // host queues or drops, as for a real NIC); the space event brings it back.
        let want = if room {
            EventSet::IN
        } else {
            EventSet::empty()
        };
        self.rx_recheck = (!room).then(|| Instant::now() + RX_RECHECK);
        if want != self.tap_interest {
            w.set(self.frames.as_raw_fd(), Token::Tap, want);
            self.tap_interest = want;
        }
        if token == Token::Tap && events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            // The tap went away under the guest: stop polling it.
            w.remove(self.frames.as_raw_fd());
            self.tap_open = false;
            log::warn!(
                "tap {} closed; the guest's NIC is now cut off",
                self.frames.name()
            );
        }
        Flow::Continue
    }

    /// Move frames from the tap into the guest while it has room; at most
    /// [`RX_BUDGET`] frames so console input is not starved. False when the guest's
    /// ring is full.
    fn pump_rx(&mut self) -> bool {
        let room = self.pump_rx_held();
        // The burst's held C+ descriptors go back to the guest together.
        self.model.release_rx();
        room
    }

    fn pump_rx_held(&mut self) -> bool {
        let io = &self.counters;
        for _ in 0..RX_BUDGET {
            if !self.model.can_receive() {
                io.rx_backpressure.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            match self.frames.read_frame(&mut self.frame) {
                Ok(Some(n)) => {
                    io.tap_rx_frames.fetch_add(1, Ordering::Relaxed);
                    io.tap_rx_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    if self.model.receive_held(&self.frame[..n]) == RxResult::RingFull {
                        io.rx_backpressure.fetch_add(1, Ordering::Relaxed);
                        return false;
                    }
                }
                Ok(None) => return true,
                Err(e) => {
                    // A tap deleted under the guest: keep the VM running, count it.
                    if io.tap_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                        log::warn!("{}", crate::error_chain(&e));
                    }
                    return true;
                }
            }
        }
        true
    }

    /// The device says TimerInt's deadline moved.
    pub fn on_timer_moved(&mut self) -> Flow {
        let _ = self.model.timer_event().read();
        self.timer = self.model.next_timer_deadline();
        Flow::Continue
    }

    /// When the loop must wake for TimerInt (no register access may come to check it
    /// for a while).
    pub fn timer_deadline(&self) -> Option<Instant> {
        match (self.timer, self.rx_recheck) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// After every wake-up: fire TimerInt if it is due.
    pub fn poll_timer(&mut self, now: Instant) {
        if self.timer.is_some_and(|due| now >= due) {
            self.model.poll_timer();
            self.timer = self.model.next_timer_deadline();
        }
        if self.rx_recheck.is_some_and(|due| now >= due) {
            self.rx_recheck = None;
            // Handled as the device's own space event, where the tap is watched again.
            let _ = self.model.rx_space_event().write(1);
        }
    }

    pub fn on_resample(&self) -> Flow {
        self.doorbells.on_resample();
        Flow::Continue
    }

    pub fn on_txpoll(&self) -> Flow {
        self.doorbells.on_txpoll();
        Flow::Continue
    }

    pub fn on_tsd(&self) -> Flow {
        self.doorbells.on_tsd();
        Flow::Continue
    }

    pub fn on_unmask(&self) -> Flow {
        self.doorbells.on_unmask();
        Flow::Continue
    }
}

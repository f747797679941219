//! The I/O thread's bounded, adaptive busy-poll after NIC activity.
//!
//! On this kind of host the dearest step of a request/response is the cross-CPU
//! wake-up of the I/O thread: the vCPU's ioeventfd doorbell (or netperf's tap write)
//! finds it asleep in `epoll_wait` and the scheduler has to wake it on the other CPU.
//! A thread still polling (`epoll_wait` with timeout 0) when the doorbell rings is
//! not asleep, so there is nothing to wake: it sees the event on its next poll.
//!
//! The window adapts like KVM's halt polling (`halt_poll_ns`): it grows while
//! polling finds the guest's work (or the guest's work arrives soon after an empty
//! window, which a longer window would have caught), and shrinks when a window ends
//! empty and nothing comes from the guest for longer than the longest window
//! (polling was wasted).
//!
//! Only the guest's events judge a window ([`Source::Guest`]: its doorbells, a TX
//! ring the snoop found, RX ring space it freed). They come from the vCPU's CPU,
//! so a thread asleep for them must be woken across CPUs. The tap's frames
//! ([`Source::Peer`]) are served when polling finds them, but they neither grow
//! nor shrink the window: their writer (netperf, the host's stack) may share this
//! thread's CPU, where waking the thread is cheap, and it is the guest's answer
//! to a delivered frame that polling waits for. Before this rule a window that
//! caught netperf's next request counted as work found, so drivers that answer
//! 100-200 us after a frame (the Linux-shaped ones) kept the thread spinning the
//! whole transaction for nothing (Levers 8 in the README). It is bounded
//! twice: by the configured maximum, and by a share of the thread's wall time per
//! accounting period, so an idle-but-chatty guest cannot make it spin for ever.
//! This type is the policy only; it reads no clock, so it is tested with fake time.

use std::time::{Duration, Instant};

/// Who caused a wake-up, or what a window found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The guest: a doorbell, the snooped TX ring, RX ring space.
    Guest,
    /// The tap's side of the NIC: frames for the guest.
    Peer,
    /// Nothing of the NIC's data path (console input, timers, EOIs; or, for a
    /// window, nothing at all).
    Other,
}

/// The share of wall time polling may burn, per [`ACCOUNTING_PERIOD`].
const MAX_POLL_SHARE_PERCENT: u32 = 50;
/// How often the burnt time is forgotten.
const ACCOUNTING_PERIOD: Duration = Duration::from_millis(100);
/// A window grows from 0 to this fraction of the maximum first.
const START_DIVISOR: u32 = 8;

#[derive(Debug, Clone)]
pub struct BusyPoll {
    /// The longest window; zero turns polling off.
    max: Duration,
    /// The window the next poll uses.
    current: Duration,
    period_start: Option<Instant>,
    /// Time spent polling in the current accounting period.
    spent: Duration,
    /// When the last window ended empty (to judge the wake-up that follows it).
    empty_at: Option<Instant>,
}

impl BusyPoll {
    pub fn new(max: Duration) -> Self {
        Self {
            max,
            current: max,
            period_start: None,
            spent: Duration::ZERO,
            empty_at: None,
        }
    }

    fn start(&self) -> Duration {
        (self.max / START_DIVISOR)
            .max(Duration::from_micros(1))
            .min(self.max)
    }

    fn grow(&mut self) {
        self.current = (self.current * 2).clamp(self.start(), self.max);
    }

    fn shrink(&mut self) {
        self.current /= 2;
        if self.current < self.start() {
            self.current = Duration::ZERO;
        }
    }

    /// How long to poll now, after the loop served NIC activity; `None`: block.
    pub fn window(&mut self, now: Instant) -> Option<Duration> {
        if self.max.is_zero() || self.current.is_zero() {
            return None;
        }
        let period = *self.period_start.get_or_insert(now);
        if now.saturating_duration_since(period) >= ACCOUNTING_PERIOD {
            self.period_start = Some(now);
            self.spent = Duration::ZERO;
        }
        let budget = ACCOUNTING_PERIOD * MAX_POLL_SHARE_PERCENT / 100;
        let left = budget.checked_sub(self.spent).filter(|d| !d.is_zero())?;
        Some(self.current.min(left))
    }

    /// A window opened by [`BusyPoll::window`] ended at `now` after `spent`, having
    /// found `found`: the guest's work grows the window, none marks it empty, the
    /// peer's frames only count the time (the loop opens the next window for the
    /// guest's answer to them).
    pub fn finished(&mut self, found: Source, spent: Duration, now: Instant) {
        self.spent += spent;
        match found {
            Source::Guest => {
                self.grow();
                self.empty_at = None;
            }
            Source::Peer => {}
            Source::Other => self.empty_at = Some(now),
        }
    }

    /// The loop woke from a blocking wait at `now`, for `by`. The guest's work
    /// within the longest window of the last empty poll (or of the last activity,
    /// while polling is shrunk to nothing) says a longer window would have paid;
    /// the peer's says nothing either way.
    pub fn woke(&mut self, now: Instant, by: Source) {
        if self.max.is_zero() || by == Source::Peer {
            return;
        }
        let Some(empty_at) = self.empty_at.take() else {
            return;
        };
        if by == Source::Guest && now.saturating_duration_since(empty_at) <= self.max {
            self.grow();
        } else {
            self.shrink();
        }
    }

    /// After NIC activity the loop did not poll for (polling shrunk to nothing):
    /// remember it, so that [`BusyPoll::woke`] can judge the next wake-up.
    pub fn skipped(&mut self, now: Instant) {
        if !self.max.is_zero() && self.current.is_zero() {
            self.empty_at = Some(now);
        }
    }

    #[cfg(test)]
    pub fn current(&self) -> Duration {
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn off_never_polls() {
        let t = Instant::now();
        let mut p = BusyPoll::new(Duration::ZERO);
        assert_eq!(p.window(t), None);
        p.woke(t, Source::Guest);
        p.skipped(t);
        assert_eq!(p.window(t), None);
    }

    #[test]
    fn shrinks_to_nothing_when_polls_come_up_empty_and_regrows_on_quick_work() {
        let t0 = Instant::now();
        let mut p = BusyPoll::new(80 * US);
        let mut t = t0;
        // Empty windows, each followed by a wake-up long after: halve until off.
        let mut windows = Vec::new();
        while let Some(w) = p.window(t) {
            windows.push(w);
            t += w;
            p.finished(Source::Other, w, t);
            t += Duration::from_millis(5);
            p.woke(t, Source::Guest);
        }
        assert_eq!(windows, vec![80 * US, 40 * US, 20 * US, 10 * US]);
        assert_eq!(p.current(), Duration::ZERO);
        // Off: activity, then work 30 us later (within the longest window) grows it back.
        p.skipped(t);
        t += 30 * US;
        p.woke(t, Source::Guest);
        assert_eq!(p.window(t), Some(10 * US));
        // Found work: doubles, up to the maximum.
        for want in [20, 40, 80, 80] {
            p.finished(Source::Guest, US, t);
            assert_eq!(p.current(), want * US);
        }
    }

    #[test]
    fn an_empty_window_then_quick_work_grows_and_console_input_does_not() {
        let mut t = Instant::now();
        let mut p = BusyPoll::new(64 * US);
        p.finished(Source::Other, 64 * US, t);
        p.woke(t + 200 * US, Source::Guest);
        assert_eq!(p.current(), 32 * US, "work long after: shrink");
        p.finished(Source::Other, 32 * US, t);
        t += 20 * US;
        p.woke(t, Source::Guest);
        assert_eq!(p.current(), 64 * US, "work soon after: grow");
        p.finished(Source::Other, 64 * US, t);
        p.woke(t + US, Source::Other);
        assert_eq!(p.current(), 32 * US, "not the NIC: shrink");
    }

    #[test]
    fn the_peers_frames_neither_grow_nor_shrink_the_window() {
        let mut t = Instant::now();
        let mut p = BusyPoll::new(64 * US);
        // Windows that catch only the tap's frames, however many, leave it as it is.
        for _ in 0..8 {
            let w = p.window(t).expect("polling on");
            t += US;
            p.finished(Source::Peer, US, t);
            assert_eq!(w, 64 * US);
        }
        // An empty window, then a frame from the tap soon after: no verdict; the
        // guest's doorbell long after the empty window is the one that shrinks it.
        p.finished(Source::Other, 64 * US, t);
        p.woke(t + US, Source::Peer);
        assert_eq!(p.current(), 64 * US);
        p.woke(t + 500 * US, Source::Guest);
        assert_eq!(p.current(), 32 * US);
        // A Linux-shaped driver: each delivered frame is answered 150 us later, beyond
        // any window: polling goes off and stays off.
        for _ in 0..6 {
            if let Some(w) = p.window(t) {
                t += w;
                p.finished(Source::Other, w, t);
            } else {
                p.skipped(t);
            }
            t += 150 * US;
            p.woke(t, Source::Guest);
        }
        assert_eq!(p.window(t), None);
    }

    #[test]
    fn burns_at_most_its_share_of_each_period() {
        let t0 = Instant::now();
        let mut p = BusyPoll::new(200 * US);
        let mut t = t0;
        let mut burnt = Duration::ZERO;
        while let Some(w) = p.window(t) {
            burnt += w;
            t += w;
            p.finished(Source::Guest, w, t);
            assert!(t - t0 < ACCOUNTING_PERIOD, "one period only");
        }
        assert_eq!(burnt, ACCOUNTING_PERIOD * MAX_POLL_SHARE_PERCENT / 100);
        // The next period has a fresh budget.
        assert_eq!(p.window(t0 + ACCOUNTING_PERIOD), Some(200 * US));
    }
}

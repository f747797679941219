//! The I/O thread's bounded, adaptive busy-poll after NIC activity.
//!
//! On this kind of host the dearest step of a request/response is the cross-CPU
//! wake-up of the I/O thread: the vCPU's ioeventfd doorbell (or netperf's tap write)
//! finds it asleep in `epoll_wait` and the scheduler has to wake it on the other CPU.
//! A thread still polling (`epoll_wait` with timeout 0) when the doorbell rings is
//! not asleep, so there is nothing to wake: it sees the event on its next poll.
//!
//! The window adapts like KVM's halt polling (`halt_poll_ns`): it grows while
//! polling finds work (or work arrives soon after an empty window, which a longer
//! window would have caught), and shrinks when a window ends empty and nothing
//! comes for longer than the longest window (polling was wasted). It is bounded
//! twice: by the configured maximum, and by a share of the thread's wall time per
//! accounting period, so an idle-but-chatty guest cannot make it spin for ever.
//! This type is the policy only; it reads no clock, so it is tested with fake time.

use std::time::{Duration, Instant};

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

    /// A window opened by [`BusyPoll::window`] ended at `now` after `spent`; `found`:
    /// it found work.
    pub fn finished(&mut self, found: bool, spent: Duration, now: Instant) {
        self.spent += spent;
        if found {
            self.grow();
            self.empty_at = None;
        } else {
            self.empty_at = Some(now);
        }
    }

    /// The loop woke from a blocking wait at `now`; `nic`: for NIC activity. Work
    /// within the longest window of the last empty poll (or of the last activity,
    /// while polling is shrunk to nothing) says a longer window would have paid.
    pub fn woke(&mut self, now: Instant, nic: bool) {
        if self.max.is_zero() {
            return;
        }
        let Some(empty_at) = self.empty_at.take() else {
            return;
        };
        if nic && now.saturating_duration_since(empty_at) <= self.max {
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
        p.woke(t, true);
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
            p.finished(false, w, t);
            t += Duration::from_millis(5);
            p.woke(t, true);
        }
        assert_eq!(windows, vec![80 * US, 40 * US, 20 * US, 10 * US]);
        assert_eq!(p.current(), Duration::ZERO);
        // Off: activity, then work 30 us later (within the longest window) grows it back.
        p.skipped(t);
        t += 30 * US;
        p.woke(t, true);
        assert_eq!(p.window(t), Some(10 * US));
        // Found work: doubles, up to the maximum.
        for want in [20, 40, 80, 80] {
            p.finished(true, US, t);
            assert_eq!(p.current(), want * US);
        }
    }

    #[test]
    fn an_empty_window_then_quick_work_grows_and_console_input_does_not() {
        let mut t = Instant::now();
        let mut p = BusyPoll::new(64 * US);
        p.finished(false, 64 * US, t);
        p.woke(t + 200 * US, true);
        assert_eq!(p.current(), 32 * US, "work long after: shrink");
        p.finished(false, 32 * US, t);
        t += 20 * US;
        p.woke(t, true);
        assert_eq!(p.current(), 64 * US, "work soon after: grow");
        p.finished(false, 64 * US, t);
        p.woke(t + US, false);
        assert_eq!(p.current(), 32 * US, "not the NIC: shrink");
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
            p.finished(true, w, t);
            assert!(t - t0 < ACCOUNTING_PERIOD, "one period only");
        }
        assert_eq!(burnt, ACCOUNTING_PERIOD * MAX_POLL_SHARE_PERCENT / 100);
        // The next period has a fresh budget.
        assert_eq!(p.window(t0 + ACCOUNTING_PERIOD), Some(200 * US));
    }
}

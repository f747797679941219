//! Interrupt lines as devices see them.

/// A device's interrupt output. The VMM backs it with a KVM irqfd (edge) or an
/// irqfd with resample (level); tests back it with a recorder.
pub trait IrqLine: Send + Sync {
    /// Pulse the line (edge-triggered interrupt).
    fn trigger(&self);
    /// Drive a level-triggered line. Defaults to a pulse on assert, for backends
    /// that only know edges.
    fn set_level(&self, asserted: bool) {
        if asserted {
            self.trigger();
        }
    }
}

/// An [`IrqLine`] that records what happened; for tests.
#[derive(Default)]
pub struct RecordingIrq {
    pub pulses: std::sync::atomic::AtomicU64,
    pub level: std::sync::atomic::AtomicBool,
}

impl IrqLine for RecordingIrq {
    fn trigger(&self) {
        self.pulses
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    fn set_level(&self, asserted: bool) {
        if asserted && !self.level.load(std::sync::atomic::Ordering::SeqCst) {
            self.trigger();
        }
        self.level
            .store(asserted, std::sync::atomic::Ordering::SeqCst);
    }
}

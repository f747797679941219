//! Interrupt lines from devices into KVM's in-kernel irqchip.
//!
//! - [`IrqFdLine`]: an edge line, one KVM irqfd (COM1 on IRQ 4).
//! - [`LevelIrq`]: a level line (the NIC on GSI 16), set with KVM_IRQ_LINE as the
//!   device's level changes; an irqfd with resample beside it reports the guest's
//!   EOIs and asks for the level again where KVM leaves that to userspace.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_ioctls::VmFd;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;
use wbvmm_devices::IrqLine;

#[derive(Debug, Error)]
pub enum IrqError {
    #[error("cannot create an eventfd for interrupt {gsi}; raise the open-file limit (ulimit -n)")]
    EventFd {
        gsi: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("KVM refused an irqfd for interrupt {gsi}")]
    Register {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// An edge interrupt line backed by a KVM irqfd.
pub struct IrqFdLine {
    evt: EventFd,
    /// Interrupts raised, for the statistics.
    pub raised: AtomicU64,
}

impl IrqFdLine {
    pub fn new(vm: &VmFd, gsi: u32) -> Result<Self, IrqError> {
        let evt =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|source| IrqError::EventFd { gsi, source })?;
        vm.register_irqfd(&evt, gsi)
            .map_err(|source| IrqError::Register { gsi, source })?;
        Ok(Self::on_eventfd(evt))
    }

    fn on_eventfd(evt: EventFd) -> Self {
        Self {
            evt,
            raised: AtomicU64::new(0),
        }
    }
}

impl IrqLine for IrqFdLine {
    fn trigger(&self) {
        self.raised.fetch_add(1, Ordering::Relaxed);
        // EAGAIN means the counter is saturated: the interrupt is already pending.
        let _ = self.evt.write(1);
    }
}

/// Sets a GSI's level in KVM's irqchip, synchronously.
type SetLine = Box<dyn Fn(bool) -> Result<(), kvm_ioctls::Error> + Send + Sync>;

/// A level-triggered interrupt line. The device's level goes straight into KVM's
/// irqchip with KVM_IRQ_LINE (as QEMU does), from whichever thread changed it: the
/// interrupt is pending before that thread's next instruction, and while the level
/// stays up KVM's IOAPIC delivers again at each EOI by itself.
///
/// Why not the irqfd's trigger: KVM cannot inject an IOAPIC interrupt from the
/// eventfd's wake-up, so every raise through an irqfd waits for a kworker
/// (`irqfd_inject`) to be scheduled. On a loaded nested host that made a netperf
/// TCP_RR transaction with two interrupts ~4x slower than QEMU's.
///
/// The irqfd with resample stays registered, never triggered: KVM signals its
/// resample eventfd at each EOI of the GSI, which the I/O thread counts
/// (`resamples`, the guest's EOIs), and then sets the level again while the device
/// still asserts it. KVM needs that once: a guest that unmasks the pin's IOAPIC
/// entry while the line is up (Linux's enable_irq after a masked arrival) gets no
/// interrupt from KVM when the GSI has a resampler; KVM drops the pending state
/// and signals the resampler instead, for userspace to raise the line again
/// (`ioapic_write_indirect`). After an ordinary EOI with the line up KVM has
/// delivered again already, and setting the level again delivers nothing more
/// (the entry waits for its EOI). Without a VM (tests), raises go to the trigger
/// eventfd as an irqfd would see them, and a resample re-raises while asserted.
pub struct LevelIrq {
    trigger: EventFd,
    pub resample: EventFd,
    set_line: Option<SetLine>,
    /// The device's level, locked around KVM_IRQ_LINE so that a re-raise at an EOI
    /// (I/O thread) never lands after the device lowered the line (vCPU thread).
    asserted: Mutex<bool>,
    /// Rising edges of the device's level (and, without a VM, re-raises at an EOI).
    pub raised: AtomicU64,
    /// Resample events: the guest EOI'd the line.
    pub resamples: AtomicU64,
    /// KVM_IRQ_LINE failures (the first is logged).
    line_errors: AtomicU64,
}

impl LevelIrq {
    pub fn new(vm: &Arc<VmFd>, gsi: u32) -> Result<Self, IrqError> {
        let eventfd =
            || EventFd::new(libc::EFD_NONBLOCK).map_err(|source| IrqError::EventFd { gsi, source });
        let (trigger, resample) = (eventfd()?, eventfd()?);
        vm.register_irqfd_with_resample(&trigger, &resample, gsi)
            .map_err(|source| IrqError::Register { gsi, source })?;
        let vm = vm.clone();
        let set_line: SetLine = Box::new(move |level| vm.set_irq_line(gsi, level));
        Ok(Self::on_eventfds(trigger, resample, Some(set_line)))
    }

    fn on_eventfds(trigger: EventFd, resample: EventFd, set_line: Option<SetLine>) -> Self {
        Self {
            trigger,
            resample,
            set_line,
            asserted: Mutex::new(false),
            raised: AtomicU64::new(0),
            resamples: AtomicU64::new(0),
            line_errors: AtomicU64::new(0),
        }
    }

    fn level(&self) -> MutexGuard<'_, bool> {
        // A panic while holding it left a bool: still the last level set.
        self.asserted.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The guest EOI'd the interrupt (or unmasked its pin): count it, and raise
    /// the line again while the device asserts it.
    pub fn on_resample(&self) {
        // Several EOIs between two wake-ups arrive as one count > 1.
        match self.resample.read() {
            Ok(n) => self.resamples.fetch_add(n, Ordering::Relaxed),
            Err(_) => return,
        };
        let asserted = self.level();
        if !*asserted {
            return;
        }
        match &self.set_line {
            Some(set) => self.drive(set, true),
            None => {
                self.raised.fetch_add(1, Ordering::Relaxed);
                let _ = self.trigger.write(1);
            }
        }
    }

    fn drive(&self, set: &SetLine, level: bool) {
        if let Err(e) = set(level) {
            if self.line_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                log::warn!("KVM refused to set the NIC's interrupt line: {e}");
            }
        }
    }
}

impl IrqLine for LevelIrq {
    fn trigger(&self) {
        self.raised.fetch_add(1, Ordering::Relaxed);
        match &self.set_line {
            // A pulse, for a caller that only knows edges; a level stays as it is.
            Some(set) => {
                let asserted = self.level();
                self.drive(set, true);
                if !*asserted {
                    self.drive(set, false);
                }
            }
            None => {
                let _ = self.trigger.write(1);
            }
        }
    }
    /// The device calls this with its lock held, so level changes reach KVM in
    /// the order they happened.
    fn set_level(&self, asserted: bool) {
        let mut level = self.level();
        let was = std::mem::replace(&mut *level, asserted);
        if asserted == was {
            return;
        }
        match &self.set_line {
            Some(set) => {
                if asserted {
                    self.raised.fetch_add(1, Ordering::Relaxed);
                }
                self.drive(set, asserted);
            }
            None if asserted => self.trigger(),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_trigger_is_counted_and_reaches_the_eventfd() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let line = IrqFdLine::on_eventfd(evt.try_clone().unwrap());
        assert!(evt.read().is_err(), "nothing raised yet");
        line.trigger();
        line.trigger();
        assert_eq!(evt.read().unwrap(), 2);
        assert_eq!(line.raised.load(Ordering::Relaxed), 2);
        // A level assert on an edge line is one pulse (IrqLine's default).
        line.set_level(true);
        assert_eq!(evt.read().unwrap(), 1);
    }

    /// What KVM does at the guest's EOI, by hand: it signals the resample eventfd
    /// (here a write) after lowering the line.
    fn eoi(line: &LevelIrq, resample: &EventFd) {
        resample.write(1).unwrap();
        line.on_resample();
    }

    #[test]
    fn a_level_line_is_raised_again_after_an_eoi_only_while_asserted() {
        let (trigger, resample) = (
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        );
        let line = LevelIrq::on_eventfds(
            trigger.try_clone().unwrap(),
            resample.try_clone().unwrap(),
            None,
        );
        line.set_level(true);
        assert_eq!(trigger.read().unwrap(), 1, "the rising edge raises");
        line.set_level(true);
        assert!(trigger.read().is_err(), "still asserted: no second raise");
        // EOI while the device still asserts (the guest acked nothing): raised again.
        eoi(&line, &resample);
        assert_eq!(trigger.read().unwrap(), 1);
        // The guest acked, then EOI'd: the line stays down.
        line.set_level(false);
        eoi(&line, &resample);
        assert!(trigger.read().is_err(), "deasserted: not raised at the EOI");
        // Two EOIs before the I/O thread woke: one read, both counted.
        resample.write(2).unwrap();
        line.on_resample();
        assert_eq!(line.resamples.load(Ordering::Relaxed), 4);
        assert_eq!(line.raised.load(Ordering::Relaxed), 2);
        // A spurious wake-up with nothing to read counts nothing.
        line.on_resample();
        assert_eq!(line.resamples.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn with_kvm_a_resample_sets_the_level_again_only_while_the_device_asserts_it() {
        let resample = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = calls.clone();
        let set_line: SetLine = Box::new(move |level| {
            seen.lock().unwrap().push(level);
            Ok(())
        });
        let line = LevelIrq::on_eventfds(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            resample.try_clone().unwrap(),
            Some(set_line),
        );
        line.set_level(true);
        assert_eq!(*calls.lock().unwrap(), [true]);
        // The pin unmasked (or EOI'd) while the line is up: KVM asks, wbvmm raises.
        eoi(&line, &resample);
        assert_eq!(*calls.lock().unwrap(), [true, true]);
        // No event to read: nothing asked, nothing set.
        line.on_resample();
        assert_eq!(calls.lock().unwrap().len(), 2);
        // Lowered by the device: an EOI after that leaves the line down.
        line.set_level(false);
        eoi(&line, &resample);
        assert_eq!(*calls.lock().unwrap(), [true, true, false]);
        assert_eq!(line.resamples.load(Ordering::Relaxed), 2);
        assert_eq!(line.raised.load(Ordering::Relaxed), 1, "one rising edge");
    }
}

//! The IntrMask unmask as a KVM ioeventfd beside the register shadow (`--net
//! ...,unmask=on`, the default).
//!
//! Beside the shadow a Linux-shaped driver's register reads cost no exit, and what
//! is left per packet are its writes: the IntrStatus acks, and IntrMask masked and
//! unmasked around the NAPI poll (8139cp's `cpw16_f`, 8139too's `RTL_W16_F`). None
//! of them can be posted: the shadow's loads do not exit, so nothing would apply a
//! posted write before the guest reads the register (`net/posted.rs`). One of them
//! needs no such care: the unmask. After `LEARN_AFTER` writes of one IntrMask value
//! that enables every cause any IntrMask write since the chip's reset enabled, an
//! ioeventfd with that exact value as its datamatch completes those writes inside
//! KVM, and the I/O thread applies them when the eventfd wakes it. Any other value
//! (a mask) still exits, and every exit to the NIC applies a pending unmask first.
//!
//! What the guest can tell, and why it does not matter:
//! - **IntrMask's own value.** Until the I/O thread has applied the unmask, a load
//!   of IntrMask from the shadow page returns the value before it. The drivers read
//!   IntrMask only to flush the write (`cpw16_f`, `RTL_W16_F`: the value is
//!   dropped), and no other register depends on IntrMask.
//! - **The interrupt it enables** comes when the write is applied, as from a PCI
//!   write still in flight: the unmask enables only causes, so applying it late can
//!   only hold an interrupt back, never deliver one the guest masked. Its own events
//!   (the ioeventfd is in the I/O thread's epoll set) bound that delay, not a timer.
//! - **Program order** with the guest's other accesses: every register access that
//!   exits applies a pending unmask first (`observe`, under the mutex the I/O thread
//!   applies it under), so a mask written after it is applied after it. The flag
//!   that makes `observe` look goes up before the ioeventfd is registered, as for
//!   the TSD doorbells (`net/doorbell.rs`).
//! - **Out of the shadow** (C+ off, a reset, the page unmapped, the BARs moved) it is
//!   disarmed, a pending write applied first.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use kvm_ioctls::IoEventAddress;
use vmm_sys_util::eventfd::EventFd;
use wbvmm_devices::net::rtl8139::regs::IMR;
use wbvmm_devices::net::rtl8139::Rtl8139;
use wbvmm_devices::pci::{BarSpec, PciRoot};
use wbvmm_devices::{Bus, BusDevice};

use super::doorbell::{BarBases, Datamatch, LearntIoEvents};
use super::NetError;

/// Writes of one value, each enabling all that any IntrMask write enabled, before
/// KVM takes them over.
const LEARN_AFTER: u32 = 4;

#[derive(Default)]
struct UnmaskState {
    /// The registered address and value.
    armed: Option<(IoEventAddress, u16)>,
    /// Every IntrMask value written (that exited) since the chip's last reset, ORed.
    enabled_ever: u16,
    /// The value being learnt and how often it was written.
    candidate: (u16, u32),
    /// Bus generations when arming: a BAR move disarms.
    gens: (u64, u64),
}

/// See the module comment.
pub struct UnmaskDoorbell {
    io: Arc<dyn LearntIoEvents>,
    pci: Weak<PciRoot>,
    device: u8,
    bars: Vec<BarSpec>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    pub evt: EventFd,
    /// Up from just before the ioeventfd is registered until it is unregistered and
    /// drained: while down, `observe` has nothing to apply.
    armed_flag: AtomicBool,
    state: Mutex<UnmaskState>,
    /// The register shadow's: learn and stay armed only while it may be mapped.
    shadow_present: Arc<AtomicBool>,
    /// Unmask writes KVM completed (each applied once, however many were pending).
    pub absorbed: AtomicU64,
}

/// `Some(value)` if this access writes all of IntrMask.
fn imr_write(offset: u64, write: Option<&[u8]>) -> Option<u16> {
    let data: [u8; 2] = write?.try_into().ok()?;
    (offset == IMR as u64).then(|| u16::from_le_bytes(data))
}

impl UnmaskDoorbell {
    pub(super) fn new(
        io: Arc<dyn LearntIoEvents>,
        pci: Weak<PciRoot>,
        (device, bars): (u8, Vec<BarSpec>),
        (pio, mmio): (Arc<Bus>, Arc<Bus>),
        shadow_present: Arc<AtomicBool>,
    ) -> Result<Self, NetError> {
        Ok(Self {
            io,
            pci,
            device,
            bars,
            pio,
            mmio,
            evt: EventFd::new(libc::EFD_NONBLOCK).map_err(NetError::Irq)?,
            armed_flag: AtomicBool::new(false),
            state: Mutex::default(),
            shadow_present,
            absorbed: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, UnmaskState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The I/O thread's handler of `evt`: apply what KVM absorbed.
    pub fn apply(&self, nic: &Rtl8139) {
        let st = self.lock();
        self.apply_locked(&st, nic);
    }

    fn apply_locked(&self, st: &UnmaskState, nic: &Rtl8139) {
        let Some((_, value)) = st.armed else { return };
        if let Ok(count) = self.evt.read() {
            self.absorbed.fetch_add(count, Ordering::Relaxed);
            // One write of the value is all of them: IntrMask has no side effect.
            nic.write(0, IMR as u64, &value.to_le_bytes());
        }
    }

    /// Stop absorbing; what KVM absorbed before is applied (unregister, then drain:
    /// nothing new can arrive in between).
    fn disarm(&self, st: &mut UnmaskState, nic: &Rtl8139) {
        if let Some((addr, value)) = st.armed {
            let _ = self.io.unregister(&self.evt, addr, Datamatch::U16(value));
            self.apply_locked(st, nic);
            st.armed = None;
            self.armed_flag.store(false, Ordering::SeqCst);
        }
        st.candidate = (0, 0);
    }

    /// Before every register access from a vCPU: apply a pending unmask; learn from
    /// IntrMask writes.
    pub(super) fn observe(&self, nic: &Rtl8139, base: u64, offset: u64, write: Option<&[u8]>) {
        let value = imr_write(offset, write);
        let reset = write.is_some_and(|data| super::writes_chip_reset(offset, data));
        if !self.armed_flag.load(Ordering::SeqCst) && value.is_none() && !reset {
            return;
        }
        let mut st = self.lock();
        self.apply_locked(&st, nic);
        let gens = (self.pio.generation(), self.mmio.generation());
        let present = self.shadow_present.load(Ordering::SeqCst);
        if reset || gens != st.gens || !present {
            self.disarm(&mut st, nic);
            st.gens = gens;
            if reset {
                st.enabled_ever = 0;
                return;
            }
        }
        let Some(value) = value else { return };
        st.enabled_ever |= value;
        if let Some((_, armed)) = st.armed {
            // It exited, so it is another value. One that enables a cause the armed
            // value does not: the armed one no longer enables all, so stop.
            if value & !armed != 0 {
                self.disarm(&mut st, nic);
            }
            return;
        }
        // The masks between two unmasks neither count nor reset the count.
        if !present || value == 0 || value != st.enabled_ever {
            return;
        }
        st.candidate = match st.candidate {
            (v, n) if v == value => (v, n + 1),
            _ => (value, 1),
        };
        if st.candidate.1 < LEARN_AFTER {
            return;
        }
        let Some(pci) = self.pci.upgrade() else {
            return;
        };
        let Some(addr) = BarBases::now(&pci, self.device, &self.bars).ioevent(base, offset) else {
            return;
        };
        self.armed_flag.store(true, Ordering::SeqCst);
        match self.io.register(&self.evt, addr, Datamatch::U16(value)) {
            Ok(()) => st.armed = Some((addr, value)),
            Err(e) => {
                self.armed_flag.store(false, Ordering::SeqCst);
                log::debug!("IntrMask doorbell at {addr:?} refused ({e}); unmasks keep exiting");
            }
        }
        st.candidate = (0, 0);
    }
}

//! NIC register writes posted through KVM's coalesced ring (`--net ...,posted=on`,
//! the default).
//!
//! Through port I/O (8139too built with `CONFIG_8139TOO_PIO`) every
//! interrupt ack, IntrMask change and CAPR update is an exit, five of the ~15 per
//! request/response. None of them needs an answer: KVM can queue them in its
//! coalesced ring (a zone over CAPR..IntrStatus, 0x38-0x3F, in each BAR) and let
//! the guest go on at once, as it already does for COM1's transmit register. The
//! write still traps into KVM, but the trip through wbvmm's userspace is saved.
//!
//! Why the guest cannot tell, apart from time:
//! - **Its own accesses stay in program order.** Every exit to wbvmm replays the
//!   ring before it is handled (`ExitHandler::step`), so a read after posted writes
//!   sees them; the ring is one per VM, replayed oldest first under one lock.
//! - **Against the TX doorbells** (ioeventfds, whose absorbed writes are replayed
//!   before register accesses): a doorbell signalled after a posted write finds the
//!   write already queued (KVM queued it first), and the I/O thread replays the ring
//!   after every wait, before it dispatches the doorbell. Writes in the zone do not
//!   replay pending doorbells first themselves (`NicFrontend::write`): a doorbell
//!   still pending then is younger than the write or concurrent with it, and an ack,
//!   a mask or a CAPR update applied before a TX the guest ordered earlier only looks
//!   like a slower transmitter. Replaying the doorbell first would be wrong: its TX
//!   would set TxOK, and an older ack of TxOK would then clear it.
//! - **Against the chip's own events** (RX, TX completion, the timer) a posted write
//!   takes effect when it is replayed, like a posted PCI write: Linux's drivers read
//!   IntrMask back after writing it where that matters (`RTL_W16_F`), and so does the
//!   test guest. A guest that never exits again still sees its writes within the I/O
//!   thread's ring replay period (1 ms while writes flow, 10 ms otherwise); an ack
//!   not yet replayed at the EOI can cost one interrupt that finds nothing to do.
//! - **Never beside the register shadow**: its loads do not exit, so nothing would
//!   replay the ring before them. The zone exists only while the shadow page cannot
//!   be mapped (`shadow=auto` maps it while the driver uses the MMIO BAR: in C+
//!   mode, and in C mode from its first access there), and is removed on the vCPU's
//!   switch to C+, or on that first access, before the guest runs again. So in
//!   practice writes are posted for a C-mode driver on the port BAR (8139too built
//!   with `CONFIG_8139TOO_PIO`), or with `shadow=off`.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use kvm_ioctls::{IoEventAddress, VmFd};
use wbvmm_devices::net::rtl8139::regs::{CAPR, ISR};
use wbvmm_devices::net::rtl8139::{Rtl8139, Rtl8139Mode};
use wbvmm_devices::pci::{BarKind, BarSpec, PciRoot};

use super::{RegisterShadow, ShadowPolicy};

/// The posted registers: CAPR (0x38), CBR (0x3A, read-only: a write is ignored
/// either way), IntrMask (0x3C) and IntrStatus (0x3E).
pub const POSTED_FIRST: u64 = CAPR as u64;
pub const POSTED_END: u64 = ISR as u64 + 2;

/// Whether a write of `len` bytes at `offset` lies wholly in the posted zone (KVM
/// queues only those; a write crossing its edge exits as before).
pub fn in_posted_zone(offset: u64, len: usize) -> bool {
    offset >= POSTED_FIRST && offset + len as u64 <= POSTED_END
}

/// Where a zone starts, by address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZoneStart {
    Pio(u64),
    Mmio(u64),
}

impl ZoneStart {
    fn kvm(self) -> IoEventAddress {
        match self {
            Self::Pio(a) => IoEventAddress::Pio(a),
            Self::Mmio(a) => IoEventAddress::Mmio(a),
        }
    }
}

/// Where the zones are registered: KVM (the `VmFd`), or a fake in the unit tests.
pub trait CoalescedZones: Send + Sync {
    fn register(&self, at: ZoneStart, len: u32) -> io::Result<()>;
    fn unregister(&self, at: ZoneStart, len: u32) -> io::Result<()>;
}

impl CoalescedZones for VmFd {
    fn register(&self, at: ZoneStart, len: u32) -> io::Result<()> {
        self.register_coalesced_mmio(at.kvm(), len)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
    fn unregister(&self, at: ZoneStart, len: u32) -> io::Result<()> {
        self.unregister_coalesced_mmio(at.kvm(), len)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

pub struct PostedWrites {
    zones: Arc<dyn CoalescedZones>,
    pci: Weak<PciRoot>,
    device: u8,
    bars: Vec<BarSpec>,
    nic: Weak<Rtl8139>,
    /// The register shadow's policy and its `present` flag, if there is a shadow.
    shadow: Option<(ShadowPolicy, Arc<AtomicBool>)>,
    /// Set once something replays KVM's ring (`enable`): queued writes nobody
    /// replays would be lost.
    ready: AtomicBool,
    /// Where the zones start (one per BAR that decodes), while registered.
    at: Mutex<Vec<ZoneStart>>,
}

impl PostedWrites {
    pub fn new(
        zones: Arc<dyn CoalescedZones>,
        pci: Weak<PciRoot>,
        (device, bars): (u8, Vec<BarSpec>),
        nic: &Arc<Rtl8139>,
        shadow: Option<&RegisterShadow>,
    ) -> Self {
        Self {
            zones,
            pci,
            device,
            bars,
            nic: Arc::downgrade(nic),
            shadow: shadow.map(|s| (s.policy(), s.present())),
            ready: AtomicBool::new(false),
            at: Mutex::new(Vec::new()),
        }
    }

    /// KVM's coalesced ring is mapped and replayed on every exit and by the I/O
    /// thread: from now on the zone may exist.
    pub fn enable(&self) {
        self.ready.store(true, Ordering::SeqCst);
        self.follow();
    }

    /// Whether a zone is registered now.
    pub fn active(&self) -> bool {
        !self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<ZoneStart>> {
        self.at.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The shadow page is, or may soon be, readable without an exit.
    fn shadow_may_be_mapped(&self) -> bool {
        let Some((policy, present)) = &self.shadow else {
            return false;
        };
        match policy {
            ShadowPolicy::Off => false,
            ShadowPolicy::Always => true,
            // Between the vCPU's switch to C+ and the main thread's remap, `present`
            // is not set yet: the mode says it (a turn to the MMIO BAR sets it at once).
            ShadowPolicy::Auto => {
                present.load(Ordering::SeqCst)
                    || self
                        .nic
                        .upgrade()
                        .is_some_and(|n| n.mode() == Rtl8139Mode::CPlus)
            }
        }
    }

    /// Where the zones should start now: CAPR in each BAR that decodes, unless the
    /// ring has no consumer yet or the shadow may be read.
    fn wanted(&self) -> Vec<ZoneStart> {
        if !self.ready.load(Ordering::SeqCst) || self.shadow_may_be_mapped() {
            return Vec::new();
        }
        let Some(pci) = self.pci.upgrade() else {
            return Vec::new();
        };
        self.bars
            .iter()
            .filter_map(|b| {
                let base = pci.bar_mapping(self.device, b.index)?.1?;
                Some(match b.kind {
                    BarKind::Io => ZoneStart::Pio(base + POSTED_FIRST),
                    BarKind::Mem32 => ZoneStart::Mmio(base + POSTED_FIRST),
                })
            })
            .collect()
    }

    /// Register, move or remove the zones as the BARs, the mode and the shadow say.
    /// Called when they may have changed: setup, a BAR move, a mode switch (on the
    /// vCPU that wrote it, before the guest runs on), the shadow's remap.
    pub fn follow(&self) {
        // Decided under the lock, so two callers cannot apply their answers in the
        // wrong order.
        let mut at = self.lock();
        let want = self.wanted();
        if *at == want {
            return;
        }
        let len = (POSTED_END - POSTED_FIRST) as u32;
        for old in at.drain(..) {
            if let Err(e) = self.zones.unregister(old, len) {
                log::warn!("cannot remove the NIC's posted-write zone at {old:?}: {e}");
            }
        }
        for zone in want {
            match self.zones.register(zone, len) {
                Ok(()) => at.push(zone),
                Err(e) => log::warn!(
                    "KVM refused the NIC's posted-write zone at {zone:?} ({e}); its acks and masks keep exiting"
                ),
            }
        }
    }
}

// The zone's life beside the BARs, the modes and the shadow, and its ordering
// against the TSD doorbells, are tested with the doorbells' rig
// (`net/doorbell/tests.rs`), which has the real NIC behind the frontend.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_writes_wholly_inside_capr_to_intr_status_are_posted() {
        for (offset, len, posted) in [
            (0x38, 2, true),  // CAPR
            (0x3c, 2, true),  // IntrMask
            (0x3e, 2, true),  // IntrStatus
            (0x3c, 4, true),  // IntrMask and IntrStatus at once
            (0x3e, 4, false), // crosses into TxConfig: KVM lets it exit
            (0x37, 2, false),
            (0x40, 1, false),
            (0x10, 4, false), // TSD0
        ] {
            assert_eq!(in_posted_zone(offset, len), posted, "{offset:#x}+{len}");
        }
    }
}

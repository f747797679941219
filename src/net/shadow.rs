//! The NIC's register shadow (`--net ...,shadow=on`) as a read-only KVM memslot over
//! the MMIO BAR: guest loads from the BAR read the page the device keeps current
//! (`wbvmm_devices::net::rtl8139::ShadowPage`, whose comment argues the ordering),
//! guest stores still exit as MMIO (KVM_MEM_READONLY) and reach the device through
//! the bus, which the exit router asks before the memslot mirror.
//!
//! When: `shadow=on` maps it whenever the BAR decodes; `shadow=auto` (the default)
//! only while the driver runs the chip in C+ mode (8139cp, which reads its registers
//! through the MMIO BAR). In C mode the TSD doorbells are learnt instead (a write KVM
//! absorbs would leave the shadow's TSD status older than the guest's write): the
//! frontend disarms them before a C+ switch asks for the slot, and `present` keeps
//! the learner from arming while the slot may still be mapped.
//!
//! The NIC keeps the page current only while it is mapped (publishing reads every
//! register at the end of each entry point): `remap` hands the page to the NIC just
//! before adding the slot and takes it back just after removing it.
//!
//! The slot follows the BAR: moved, or removed while memory decode is off, after the
//! PCI root's `bars_moved` callback (a rare event: firmware or driver setup, never per
//! access). That callback runs on the vCPU thread that wrote the config space, whose
//! system call filter forbids memslot changes, so once the VM runs it only wakes the
//! main thread, which moves the slot. Until it has, loads at the new address exit to
//! the device (slower, not wrong), and loads at the old one, where nothing else is
//! mapped, read the shadow rather than open bus.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use wbvmm_devices::net::rtl8139::{Rtl8139, Rtl8139Mode, ShadowPage, SHADOW_PAGE_SIZE};
use wbvmm_devices::pci::PciRoot;

use crate::memory::{SlotFlags, SlotId, SlotRegistry};

/// The NIC's MMIO BAR index.
const MMIO_BAR: u8 = 1;

/// When the shadow is mapped (`--net ...,shadow=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowPolicy {
    /// Never: every MMIO read exits.
    Off,
    /// While the NIC is in C+ mode (`auto`).
    CPlusOnly,
    /// Whenever the BAR decodes (`on`); the TSD doorbells are then never learnt.
    Always,
}

pub struct RegisterShadow {
    /// Lives for the process (one reference is leaked): the registry's contract for
    /// caller-owned memory (an older snapshot may still name the slot after it is
    /// removed).
    page: Arc<ShadowPage>,
    registry: Arc<SlotRegistry>,
    pci: Weak<PciRoot>,
    device: u8,
    nic: Weak<Rtl8139>,
    policy: ShadowPolicy,
    /// True from just before the slot is added until just after it is removed: while
    /// set, the TSD learner arms nothing (see the module comment).
    present: Arc<AtomicBool>,
    /// (BAR address, slot) while mapped.
    at: Mutex<Option<(u64, SlotId)>>,
    /// Wakes the main thread, once the VM runs: it moves the slot.
    main: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl RegisterShadow {
    /// Give the NIC its shadow page; map it where the MMIO BAR is now, if `policy`
    /// wants it. `policy` is not `Off` (no shadow is built then).
    pub fn new(
        nic: &Arc<Rtl8139>,
        registry: Arc<SlotRegistry>,
        pci: Weak<PciRoot>,
        device: u8,
        policy: ShadowPolicy,
    ) -> Self {
        let page: Arc<ShadowPage> = ShadowPage::new().into();
        std::mem::forget(page.clone());
        let s = Self {
            page,
            registry,
            pci,
            device,
            nic: Arc::downgrade(nic),
            policy,
            present: Arc::new(AtomicBool::new(policy == ShadowPolicy::Always)),
            at: Mutex::new(None),
            main: OnceLock::new(),
        };
        s.remap();
        s
    }

    /// From now on BAR moves call `wake_main` (the VM sends the main thread
    /// `io_thread::Wake::NicShadow`), which then calls [`RegisterShadow::remap`].
    pub fn remap_on(&self, wake_main: impl Fn() + Send + Sync + 'static) {
        let _ = self.main.set(Box::new(wake_main));
    }

    /// The BAR may have moved: move the slot now (during setup) or have the main
    /// thread do it (while the VM runs).
    pub fn follow_bar(&self) {
        match self.main.get() {
            Some(wake_main) => wake_main(),
            None => self.remap(),
        }
    }

    /// Set while the slot is (or may be) mapped: the TSD learner's stop sign.
    pub fn present(&self) -> Arc<AtomicBool> {
        self.present.clone()
    }

    pub fn policy(&self) -> ShadowPolicy {
        self.policy
    }

    /// The page itself (tests read what the NIC published).
    #[cfg(test)]
    pub(crate) fn page(&self) -> &ShadowPage {
        &self.page
    }

    /// Where the shadow is mapped now (for tests and diagnostics).
    pub fn mapped_at(&self) -> Option<u64> {
        self.at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|a| a.0)
    }

    /// Whether the policy wants the page mapped in the NIC's present mode.
    fn wanted_in_this_mode(&self) -> bool {
        match self.policy {
            ShadowPolicy::Off => false,
            ShadowPolicy::Always => true,
            ShadowPolicy::CPlusOnly => self
                .nic
                .upgrade()
                .is_some_and(|n| n.mode() == Rtl8139Mode::CPlus),
        }
    }

    /// Map the page where the MMIO BAR decodes now (if the policy wants it in the
    /// NIC's present mode), or nowhere. Changes memslots: not on a vCPU thread.
    pub fn remap(&self) {
        let want = self
            .pci
            .upgrade()
            .filter(|_| self.wanted_in_this_mode())
            .and_then(|p| p.bar_mapping(self.device, MMIO_BAR))
            .and_then(|(_, at)| at)
            .filter(|a| a.is_multiple_of(SHADOW_PAGE_SIZE));
        let mut at = self.at.lock().unwrap_or_else(|e| e.into_inner());
        if at.map(|a| a.0) == want {
            return;
        }
        let nic = self.nic.upgrade();
        if let Some((gpa, id)) = at.take() {
            if let Err(e) = self.registry.remove(id) {
                log::warn!(
                    "cannot unmap the NIC's register shadow at {gpa:#x}: {}",
                    crate::error_chain(&e)
                );
            }
            // Unmapped: the NIC need not keep the page current.
            if let Some(n) = &nic {
                n.clear_shadow();
            }
        }
        let Some(gpa) = want else {
            if self.policy != ShadowPolicy::Always {
                // Removed: the learner may arm again.
                self.present.store(false, Ordering::SeqCst);
            }
            return;
        };
        // Before the slot exists, so no learner arms once a load can hit the page.
        self.present.store(true, Ordering::SeqCst);
        // And the page is current before the first load can hit it.
        if let Some(n) = &nic {
            n.set_shadow(self.page.clone());
        }
        // SAFETY: the page is leaked, so mapped for the process's lifetime; the slot
        // is read-only, so neither KVM nor the DMA path writes it.
        let added = unsafe {
            self.registry.add_mapped(
                gpa,
                self.page.host_addr(),
                SHADOW_PAGE_SIZE,
                SlotFlags::READONLY,
            )
        };
        match added {
            Ok(id) => *at = Some((gpa, id)),
            // Reads then exit as before: slower, not wrong.
            Err(e) => {
                if let Some(n) = &nic {
                    n.clear_shadow();
                }
                if self.policy != ShadowPolicy::Always {
                    self.present.store(false, Ordering::SeqCst);
                }
                log::warn!(
                    "cannot map the NIC's register shadow at {gpa:#x}; register reads will exit: {}",
                    crate::error_chain(&e)
                )
            }
        }
    }
}

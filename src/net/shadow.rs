//! The NIC's register shadow (`--net ...,shadow=on`) as a read-only KVM memslot over
//! the MMIO BAR: guest loads from the BAR read the page the device keeps current
//! (`wbvmm_devices::net::rtl8139::ShadowPage`, whose comment argues the ordering),
//! guest stores still exit as MMIO (KVM_MEM_READONLY) and reach the device through
//! the bus, which the exit router asks before the memslot mirror.
//!
//! The slot follows the BAR: moved, or removed while memory decode is off, after the
//! PCI root's `bars_moved` callback (a rare event: firmware or driver setup, never per
//! access). That callback runs on the vCPU thread that wrote the config space, whose
//! system call filter forbids memslot changes, so once the VM runs it only wakes the
//! main thread, which moves the slot. Until it has, loads at the new address exit to
//! the device (slower, not wrong), and loads at the old one, where nothing else is
//! mapped, read the shadow rather than open bus.

use std::sync::{Arc, Mutex, OnceLock, Weak};

use wbvmm_devices::net::rtl8139::{Rtl8139, ShadowPage, SHADOW_PAGE_SIZE};
use wbvmm_devices::pci::PciRoot;

use crate::memory::{SlotFlags, SlotId, SlotRegistry};

/// The NIC's MMIO BAR index.
const MMIO_BAR: u8 = 1;

pub struct RegisterShadow {
    /// Lives for the process (one reference is leaked): the registry's contract for
    /// caller-owned memory (an older snapshot may still name the slot after it is
    /// removed).
    page: Arc<ShadowPage>,
    registry: Arc<SlotRegistry>,
    pci: Weak<PciRoot>,
    device: u8,
    /// (BAR address, slot) while mapped.
    at: Mutex<Option<(u64, SlotId)>>,
    /// Wakes the main thread, once the VM runs: it moves the slot.
    main: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl RegisterShadow {
    /// Give the NIC its shadow page; map it where the MMIO BAR is now.
    pub fn new(nic: &Rtl8139, registry: Arc<SlotRegistry>, pci: Weak<PciRoot>, device: u8) -> Self {
        let page: Arc<ShadowPage> = ShadowPage::new().into();
        std::mem::forget(page.clone());
        nic.set_shadow(page.clone());
        let s = Self {
            page,
            registry,
            pci,
            device,
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

    /// Where the shadow is mapped now (for tests and diagnostics).
    pub fn mapped_at(&self) -> Option<u64> {
        self.at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|a| a.0)
    }

    /// Map the page where the MMIO BAR decodes now, or nowhere. Changes memslots:
    /// not on a vCPU thread.
    pub fn remap(&self) {
        let want = self
            .pci
            .upgrade()
            .and_then(|p| p.bar_mapping(self.device, MMIO_BAR))
            .and_then(|(_, at)| at)
            .filter(|a| a.is_multiple_of(SHADOW_PAGE_SIZE));
        let mut at = self.at.lock().unwrap_or_else(|e| e.into_inner());
        if at.map(|a| a.0) == want {
            return;
        }
        if let Some((gpa, id)) = at.take() {
            if let Err(e) = self.registry.remove(id) {
                log::warn!(
                    "cannot unmap the NIC's register shadow at {gpa:#x}: {}",
                    crate::error_chain(&e)
                );
            }
        }
        let Some(gpa) = want else { return };
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
            Err(e) => log::warn!(
                "cannot map the NIC's register shadow at {gpa:#x}; register reads will exit: {}",
                crate::error_chain(&e)
            ),
        }
    }
}

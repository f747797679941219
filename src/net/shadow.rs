//! The NIC's register shadow (`--net ...,shadow=on`) as a read-only KVM memslot over
//! the MMIO BAR: guest loads from the BAR read the page the device keeps current
//! (`wbvmm_devices::net::rtl8139::ShadowPage`, whose comment argues the ordering),
//! guest stores still exit as MMIO (KVM_MEM_READONLY) and reach the device through
//! the bus, which the exit router asks before the memslot mirror.
//!
//! When: `shadow=on` maps it whenever the BAR decodes; `shadow=auto` (the default)
//! in C+ mode (8139cp, which has only the MMIO BAR), and in C mode once a driver
//! reading its registers through the MMIO BAR reads enough of them for the shadow to
//! pay (8139too as Debian builds it: `CONFIG_8139TOO_PIO` is not set, so it maps BAR1;
//! `READ_WINDOW` says how that is weighed). Otherwise C mode gets the TSD doorbells
//! learnt and its acks posted (a write KVM absorbs would leave the shadow older than
//! the guest's own write, so the two never meet). Either way into the shadow, the
//! frontend disarms the doorbells and removes the posted zones before it asks for
//! the slot, and `present` keeps the learner from arming while the slot is or may
//! soon be mapped.
//!
//! A bus access does not say its address space, so the MMIO BAR is told by its base
//! (cached at every remap; the learner tells the spaces apart the same way). The
//! C-mode choice sticks until a chip reset written through the port BAR: a driver
//! that resets the chip there is a port-I/O driver from then on.
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

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use wbvmm_devices::net::rtl8139::{Rtl8139, Rtl8139Mode, ShadowPage, SHADOW_PAGE_SIZE};
use wbvmm_devices::pci::PciRoot;

use crate::memory::{SlotFlags, SlotId, SlotRegistry};

/// The NIC's MMIO BAR index.
const MMIO_BAR: u8 = 1;
/// `mmio_base` while the MMIO BAR does not decode (no bus base is this).
const NO_BAR: u64 = u64::MAX;

/// `auto` in C mode weighs, per window of this many register reads through the
/// MMIO BAR that exited, what the shadow would save against what it would cost:
/// it saves those reads; it costs an exit for every TSD write the learner would
/// have absorbed (about one per frame sent) and for every write it would no
/// longer post. So the shadow is taken when the reads outnumber the frames sent
/// plus the writes posted in the window: 8139too's sequence reads ~10 registers
/// per frame and posts ~5 writes (the shadow wins: 6 exits instead of ~10 and
/// the queued writes); the lean driver reads one register every 4 frames (the
/// learner wins). Only windows that begin after the NIC's first frame decide: a
/// driver's setup (the EEPROM, the PHY) reads many registers before it sends
/// anything. A window with reads and no frames (a driver polling while nothing
/// comes) decides for the shadow, which serves such polling best.
pub(crate) const READ_WINDOW: u32 = 256;

/// What kind of register access `RegisterShadow::turns_to_mmio` is told of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterAccess {
    Read,
    /// A write in the posted zone (queued by KVM while there is no shadow).
    PostedWrite,
    OtherWrite,
}

/// When the shadow is mapped (`--net ...,shadow=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowPolicy {
    /// Never: every MMIO read exits.
    Off,
    /// While the NIC is in C+ mode or its driver uses the MMIO BAR (`auto`).
    Auto,
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
    /// True from just before the slot is added until just after it is removed, and
    /// from the moment a C-mode driver turns to the MMIO BAR: while set, the TSD
    /// learner arms nothing and no write is posted (see the module comment).
    present: Arc<AtomicBool>,
    /// `auto`: the driver reaches the registers through the MMIO BAR.
    mmio_driver: AtomicBool,
    /// The MMIO BAR's base as of the last remap (`NO_BAR` while it does not decode).
    mmio_base: AtomicU64,
    /// `auto`, C mode: the window `turns_to_mmio` counts (reads through the MMIO
    /// BAR, posted writes there, and the NIC's frames sent when it began).
    window_reads: AtomicU32,
    window_posted: AtomicU32,
    window_sent: AtomicU64,
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
            mmio_driver: AtomicBool::new(false),
            mmio_base: AtomicU64::new(NO_BAR),
            window_reads: AtomicU32::new(0),
            window_posted: AtomicU32::new(0),
            window_sent: AtomicU64::new(0),
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

    /// `auto`: a register access (`RegisterAccess`) arrived at bus base `base`. True once,
    /// when the driver's traffic on the MMIO BAR says the shadow saves more exits
    /// than it costs (see `READ_WINDOW`): the caller then disarms the TSD
    /// doorbells, asks for the slot (`follow_bar`) and lets the posted zones follow,
    /// before the guest runs on. `present` is up before it returns, so no learner
    /// arms again. Two loads per access through the port BAR or once decided.
    pub fn turns_to_mmio(&self, base: u64, access: RegisterAccess, nic: &Rtl8139) -> bool {
        if self.policy != ShadowPolicy::Auto
            || self.mmio_driver.load(Ordering::Relaxed)
            || base != self.mmio_base.load(Ordering::Relaxed)
        {
            return false;
        }
        match access {
            RegisterAccess::PostedWrite => {
                self.window_posted.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            RegisterAccess::OtherWrite => return false,
            RegisterAccess::Read => {}
        }
        if self.window_reads.fetch_add(1, Ordering::Relaxed) + 1 < READ_WINDOW {
            return false;
        }
        // The window's end (two vCPUs at once may each see one: a heuristic, and
        // either answer is correct).
        self.window_reads.store(0, Ordering::Relaxed);
        let posted = self.window_posted.swap(0, Ordering::Relaxed);
        let sent = nic.stats().tx_packets;
        let began_at = self.window_sent.swap(sent, Ordering::Relaxed);
        let frames = sent.wrapping_sub(began_at);
        if began_at == 0
            || u64::from(READ_WINDOW) <= frames + u64::from(posted)
            || nic.mode() == Rtl8139Mode::CPlus
        {
            return false;
        }
        self.present.store(true, Ordering::SeqCst);
        !self.mmio_driver.swap(true, Ordering::SeqCst)
    }

    /// `auto`: the chip was reset by a write at bus base `base`. True if that ends
    /// the MMIO choice (a reset through the port BAR): the caller then lets the slot
    /// and the posted zones follow.
    pub fn reset_through(&self, base: u64) -> bool {
        self.policy == ShadowPolicy::Auto
            && base != self.mmio_base.load(Ordering::Relaxed)
            && self.mmio_driver.swap(false, Ordering::SeqCst)
    }

    /// Whether `present` may fall when the slot is not mapped.
    fn may_clear_present(&self) -> bool {
        self.policy != ShadowPolicy::Always && !self.mmio_driver.load(Ordering::SeqCst)
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
            ShadowPolicy::Auto => {
                self.mmio_driver.load(Ordering::SeqCst)
                    || self
                        .nic
                        .upgrade()
                        .is_some_and(|n| n.mode() == Rtl8139Mode::CPlus)
            }
        }
    }

    /// Map the page where the MMIO BAR decodes now (if the policy wants it in the
    /// NIC's present mode), or nowhere. Changes memslots: not on a vCPU thread.
    pub fn remap(&self) {
        let bar = self
            .pci
            .upgrade()
            .and_then(|p| p.bar_mapping(self.device, MMIO_BAR))
            .and_then(|(_, at)| at);
        self.mmio_base
            .store(bar.unwrap_or(NO_BAR), Ordering::Relaxed);
        let want = bar
            .filter(|_| self.wanted_in_this_mode())
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
            if self.may_clear_present() {
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
                if self.may_clear_present() {
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

//! A read-only shadow of the register block: a page the device keeps current and
//! the VMM maps into the guest over the MMIO BAR as read-only memory, so that guest
//! reads of the registers (8139cp's and 8139too's IntrStatus polls, IntrMask, ChipCmd,
//! TSD status, ...) are plain memory loads instead of exits, while writes still exit
//! and reach the device.
//!
//! Ordering, which is what makes the loads safe:
//! - The device republishes the registers an entry point can change at its end
//!   (after a register write, reset or link change every word; after data-path
//!   work, a frame in, a TX walk or the timer, the words of the registers that
//!   report events), under its state lock, after the DMA that the new register
//!   values report (a received frame, a TX descriptor's status) and before it
//!   raises the interrupt line. So a
//!   guest that sees ISR.ROK in the shadow finds the frame in its ring, and a guest
//!   woken by the interrupt sees the ISR bit that raised it.
//! - ISR's word is stored last (Release), after the registers that describe the
//!   event (CBR, TSD, CR.BUFE).
//! - A register write exits; the device applies it and republishes before the exit
//!   returns, so the guest's next load (its write-1-to-clear ack, an IMR change)
//!   already sees the result.
//!
//! What a page of memory cannot do: a register whose value must be computed at the
//! moment of the read. Of the RTL8139's, only TCTR (the free-running timer) is one;
//! through the shadow it reads as of the device's last update (the port BAR keeps
//! it exact). No RTL8139 register has a read side effect. Port I/O cannot be backed
//! by memory at all: only the MMIO BAR is shadowed.

use std::sync::atomic::{AtomicU32, Ordering};

/// The shadow page's size: one host page, the unit of a KVM memslot.
pub const SHADOW_PAGE_SIZE: u64 = 4096;
const WORDS: usize = SHADOW_PAGE_SIZE as usize / 4;
/// The word holding IMR (0x3C) and ISR (0x3E), stored last.
pub(super) const ISR_WORD: usize = super::regs::IMR / 4;

/// One page-aligned page of register values. Everything past the 256-byte register
/// block reads 0, as the device's own decode does.
#[repr(C, align(4096))]
pub struct ShadowPage {
    words: [AtomicU32; WORDS],
}

impl ShadowPage {
    pub fn new() -> Box<Self> {
        Box::new(Self {
            words: std::array::from_fn(|_| AtomicU32::new(0)),
        })
    }

    /// The page's host address (page-aligned), for the memslot.
    pub fn host_addr(&self) -> u64 {
        self.words.as_ptr() as u64
    }

    /// What a guest load of `data.len()` bytes at `offset` sees.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            let off = offset as usize + i;
            *d = match self.words.get(off / 4) {
                Some(w) => (w.load(Ordering::Acquire) >> (8 * (off % 4))) as u8,
                None => 0,
            };
        }
    }

    /// Store register word `w` (the device stores ISR's word last), skipping an
    /// unchanged one: the guest's CPU keeps its cache line.
    pub(super) fn store(&self, w: usize, v: u32) {
        if self.words[w].load(Ordering::Relaxed) != v {
            self.words[w].store(v, Ordering::Release);
        }
    }
}

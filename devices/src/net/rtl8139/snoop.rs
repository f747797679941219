//! TX without the doorbell: a busy-polling I/O thread looks at the C+ normal-priority
//! ring's next descriptor in guest memory and sends what the guest has handed over.
//!
//! Why it is legal. A C+ TX descriptor with OWN set belongs to the NIC: the driver
//! gives it up with that store and may not touch it until the NIC clears OWN. 8139cp
//! (`cp_start_xmit`) writes opts2 and addr, `wmb()`, then opts1 with OWN, and for a
//! frame over several descriptors sets the first one's OWN last, so a walk that
//! stops at the first descriptor without OWN never sees half a frame. A real 8139C+
//! fetches descriptors only when TxPoll is written; taking them earlier makes this a
//! faster NIC, not a different protocol: a driver cannot tell "sent before my TxPoll"
//! from "sent the moment my TxPoll landed" without breaking OWN itself. A driver
//! that sets OWN on several descriptors before one TxPoll may see the first ones go
//! before it rings: also legal under OWN. 8139cp reclaims (`cp_tx`) under the lock
//! `cp_start_xmit` holds while it fills descriptors and moves `tx_head`, and its
//! TxOK interrupt is taken only after that lock is dropped, so an early completion
//! finds `tx_head` already past the frame.
//!
//! Memory order (x86, the only target): the look is one 4-byte load of opts1; if it
//! sees OWN, every earlier guest store (the buffer, opts2, addr) is visible to this
//! thread's later loads, which [`State::cplus_tx`] makes in that order (opts1
//! again, then the rest). The guest's TxPoll write still arrives and finds the ring
//! walked: a no-op.
//!
//! Race-free with the vCPU: the look takes no lock and only decides whether to take
//! it; the TX itself is the ordinary TxPoll path under the device mutex, which
//! re-checks TE, TxEnb, bus mastering and the ring index. Where to look is an
//! atomic every entry point republishes before it unlocks (`finish`); a stale value
//! costs one wasted lock at worst.
//!
//! C mode has nothing to snoop: its TX "descriptors" are the TSDn registers, and the
//! write of TSDn is the hand-over itself (its doorbell learner, `TsdDoorbells`, is
//! the VMM's lever there).

use std::sync::atomic::Ordering;

use super::regs::*;
use super::{Rtl8139, State};

/// [`Rtl8139::tx_snoop`]'s value while there is nothing to look at.
pub(super) const NO_SNOOP: u64 = u64::MAX;

impl State {
    /// Where opts1 of the descriptor a TxPoll NPQ would take next lies, while a
    /// TxPoll would take one at all: C+ mode, TE, TxEnb, bus mastering and a ring
    /// address programmed (0 is the reset value: a ring not set up yet).
    fn snoop_target(&self) -> u64 {
        if !self.cplus
            || self.cr & CR_TE == 0
            || self.cpcmd & CPCMD_TXENB == 0
            || !self.bus_master()
        {
            return NO_SNOOP;
        }
        match self.cplus_ring_base(0) {
            0 => NO_SNOOP,
            base => base
                .checked_add(16 * self.cp_tx_idx[0] as u64)
                .unwrap_or(NO_SNOOP),
        }
    }
}

impl Rtl8139 {
    /// Called with the state locked, at the end of every entry point.
    pub(super) fn publish_snoop_target(&self, st: &State) {
        // Relaxed: a hint only; `snoop_tx` re-decides under the lock.
        self.tx_snoop.store(st.snoop_target(), Ordering::Relaxed);
    }

    /// For an I/O thread that is polling anyway: if the guest has handed the C+
    /// normal-priority ring's next descriptor to the NIC, run that ring as a TxPoll
    /// NPQ write would. One atomic load and one 4-byte read of guest memory when
    /// there is nothing to send; the device lock only when there is. True when the
    /// walk took descriptors (sent, or failed as they would after a TxPoll).
    pub fn snoop_tx(&self) -> bool {
        let at = self.tx_snoop.load(Ordering::Relaxed);
        if at == NO_SNOOP {
            return false;
        }
        // Outside RAM: the ring is broken; the guest's TxPoll reports it (SERR).
        match self.snoop_dma.read_u32(at) {
            Ok(opts1) if opts1 & DESC_OWN != 0 => {}
            _ => return false,
        }
        let mut st = self.lock();
        st.update_timer();
        let taken = if st.cplus { st.cplus_tx(0) } else { 0 };
        self.finish_data_path(st);
        taken > 0
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{cplus_up, desc_opts1, frame_to, send_one, tx_desc, H, TXR};
    use super::*;
    use crate::dma::GuestDma;
    use crate::pci::{PciDevice, PCI_COMMAND_IO, PCI_COMMAND_MEMORY};

    fn cplus() -> H {
        let h = H::new(super::super::REVISION_CPLUS);
        cplus_up(&h, 0x2b);
        h
    }

    #[test]
    fn an_owned_descriptor_is_sent_without_txpoll_and_the_later_txpoll_is_a_no_op() {
        let h = cplus();
        assert!(!h.dev.snoop_tx(), "empty ring");
        let f = frame_to([0xff; 6], 100);
        send_one(&h, 0, &f, 0, 0);
        assert!(h.dev.snoop_tx());
        assert_eq!(h.sink.take(), vec![f.clone()]);
        assert_eq!(desc_opts1(&h, TXR, 0) & DESC_OWN, 0, "handed back");
        assert_eq!(h.r16(0x3e) & INT_TOK, INT_TOK);
        // The guest's own doorbell comes after: nothing left to send.
        h.w8(0xd9, TPPOLL_NPQ);
        assert!(h.sink.take().is_empty());
        assert!(!h.dev.snoop_tx());
        // The snoop follows the ring index: the next slot goes too.
        send_one(&h, 1, &f, 0, 0);
        assert!(h.dev.snoop_tx());
        assert_eq!(h.sink.take().len(), 1);
        assert_eq!(h.dev.stats().tx_packets, 2);
    }

    #[test]
    fn several_owned_descriptors_go_in_one_snoop_and_a_partial_frame_waits_for_its_first() {
        let h = cplus();
        let f = frame_to([0xff; 6], 200);
        send_one(&h, 0, &f, 0, 0);
        send_one(&h, 1, &f, 0, 0);
        // Slot 2 onwards: a two-descriptor frame whose first descriptor is not yet
        // owned (8139cp sets it last): the walk stops there.
        h.poke(0x6_0000, &f[..80]);
        h.poke(0x7_0000, &f[80..]);
        tx_desc(&h, 2, DESC_FS | 80, 0, 0x6_0000);
        tx_desc(&h, 3, DESC_OWN | DESC_LS | 120, 0, 0x7_0000);
        assert!(h.dev.snoop_tx());
        assert_eq!(h.sink.take().len(), 2);
        assert!(!h.dev.snoop_tx());
        assert_eq!(desc_opts1(&h, TXR, 3) & DESC_OWN, DESC_OWN, "untouched");
        tx_desc(&h, 2, DESC_OWN | DESC_FS | 80, 0, 0x6_0000);
        assert!(h.dev.snoop_tx());
        assert_eq!(h.sink.take(), vec![f]);
    }

    #[test]
    fn nothing_is_sent_while_te_txenb_or_bus_mastering_is_off_or_the_ring_is_unset() {
        let f = frame_to([0xff; 6], 60);
        let owned = |h: &H| {
            send_one(h, 0, &f, 0, 0);
            assert!(!h.dev.snoop_tx());
            assert!(h.sink.take().is_empty());
        };
        // TE off.
        let h = cplus();
        h.w8(0x37, CR_RE);
        owned(&h);
        // TxEnb off (CpCmd without bit 0).
        let h = H::new(super::super::REVISION_CPLUS);
        cplus_up(&h, 0x2a);
        owned(&h);
        // Bus mastering off.
        let h = cplus();
        h.dev.command_written(PCI_COMMAND_IO | PCI_COMMAND_MEMORY);
        owned(&h);
        // Ring address not programmed (the test ring sits at TXR, so point it at 0
        // and put an owned descriptor there: still not looked at).
        let h = cplus();
        h.w32(0x20, 0);
        h.mem
            .write_u32(0, DESC_OWN | DESC_FS | DESC_LS | 60)
            .unwrap();
        assert!(!h.dev.snoop_tx());
        assert!(h.sink.take().is_empty());
        // C mode: never, even with an "owned" word where a C+ ring would be.
        let h = H::new(super::super::REVISION_CPLUS);
        h.w32(0x20, TXR as u32);
        h.w8(0x37, CR_RE | CR_TE);
        owned(&h);
        // And each one, switched back on, lets the snoop send.
        let h = cplus();
        h.w8(0x37, CR_RE);
        send_one(&h, 0, &f, 0, 0);
        assert!(!h.dev.snoop_tx());
        h.w8(0x37, CR_RE | CR_TE);
        assert!(h.dev.snoop_tx());
        assert_eq!(h.sink.take().len(), 1);
    }

    #[test]
    fn garbage_descriptors_fail_as_they_do_after_a_txpoll() {
        // The same rings, one walked by TxPoll and one by the snoop: same frames out,
        // same write-backs, same interrupt status.
        let run = |snoop: bool| {
            let h = cplus();
            let f = frame_to([0xff; 6], 100);
            // A fragment without FS, a buffer outside RAM, an oversized frame, a
            // bad TSO request, then a good frame.
            h.poke(0x4_0000, &f);
            tx_desc(&h, 0, DESC_OWN | DESC_LS | 100, 0, 0x4_0000);
            tx_desc(
                &h,
                1,
                DESC_OWN | DESC_FS | DESC_LS | 100,
                0,
                0xffff_ffff_ffff_ff00,
            );
            tx_desc(&h, 2, DESC_OWN | DESC_FS | DESC_LS | 0xffff, 0, 0x4_0000);
            tx_desc(
                &h,
                3,
                DESC_OWN | DESC_FS | DESC_LS | TXD_LGSEN | 100,
                0,
                0x4_0000,
            );
            send_one(&h, 4, &f, 0, 0);
            if snoop {
                assert!(h.dev.snoop_tx());
            } else {
                h.w8(0xd9, TPPOLL_NPQ);
            }
            let opts: Vec<u32> = (0..5).map(|i| desc_opts1(&h, TXR, i)).collect();
            (h.sink.take(), opts, h.r16(0x3e), h.dev.stats())
        };
        let by_txpoll = run(false);
        assert_eq!(by_txpoll.0.len(), 1, "only the good frame leaves");
        assert_eq!(run(true), by_txpoll);
    }

    #[test]
    fn a_ring_outside_ram_is_left_to_the_txpoll() {
        let h = cplus();
        h.w32(0x24, 0x10);
        assert!(!h.dev.snoop_tx());
        assert_eq!(h.r16(0x3e) & INT_SERR, 0, "the look reports nothing");
        h.w8(0xd9, TPPOLL_NPQ);
        assert_eq!(h.r16(0x3e) & (INT_SERR | INT_TER), INT_SERR | INT_TER);
    }

    #[test]
    fn a_reset_stops_the_snoop() {
        let h = cplus();
        h.dev.reset();
        send_one(&h, 0, &frame_to([0xff; 6], 60), 0, 0);
        assert!(!h.dev.snoop_tx());
        assert!(h.sink.take().is_empty());
    }
}

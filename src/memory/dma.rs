//! Device DMA through the memslot mirror: `wbvmm_devices::GuestDma` for guest RAM.
//!
//! Each access loads the current snapshot (lock-free), checks the whole range first (it may
//! span adjacent slots; every byte must be in a RAM slot, and for writes in a writable one),
//! and only then copies, so a failed access writes nothing.
//!
//! Guest memory is shared with running vCPUs, which may write it at any time. Like
//! vm-memory (and every VMM), the copy is a plain `ptr::copy_nonoverlapping` between the
//! guest mapping and a private buffer: we never create Rust references (`&[u8]`) into guest
//! memory, so the only "race" is on bytes the guest itself is racing on, whose values are
//! then unspecified to the device, exactly as on real hardware DMA. The exception is
//! `read_u32`/`write_u32` at an aligned address: one atomic 32-bit access, because
//! descriptor words are a protocol with the running guest (see `GuestDma`).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use wbvmm_devices::{DmaError, GuestDma};

use super::registry::SlotRegistry;
use super::snapshot::MemSnapshot;
use super::stats::IndexStats;
use super::{RangeIndex, RangeItem, Slot};

/// Guest RAM as devices see it. Cheap to create: give each device its own, so that the
/// statistics counters (plain relaxed loads and stores, not read-modify-write) are not
/// shared between threads.
pub struct GuestRamDma {
    reg: Arc<SlotRegistry>,
    hint: AtomicU32,
    lookups: AtomicU64,
    hits: AtomicU64,
    nodes_total: AtomicU64,
    nodes_max: AtomicU32,
}

impl std::fmt::Debug for GuestRamDma {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRamDma")
            .field("registry", &self.reg)
            .finish()
    }
}

/// One piece of an access: `len` bytes at host address `host`.
#[derive(Clone, Copy)]
struct Piece {
    host: u64,
    len: usize,
}

impl GuestRamDma {
    pub fn new(reg: Arc<SlotRegistry>) -> Self {
        Self {
            reg,
            hint: AtomicU32::new(0),
            lookups: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            nodes_total: AtomicU64::new(0),
            nodes_max: AtomicU32::new(0),
        }
    }

    pub fn registry(&self) -> &Arc<SlotRegistry> {
        &self.reg
    }

    /// Lookup statistics of this handle.
    pub fn stats(&self) -> IndexStats {
        IndexStats::from_counts(
            self.reg.index_kind(),
            self.lookups.load(Ordering::Relaxed),
            self.hits.load(Ordering::Relaxed),
            self.nodes_total.load(Ordering::Relaxed),
            self.nodes_max.load(Ordering::Relaxed),
        )
    }

    // Counters are bumped with load + store rather than fetch_add: a plain move on x86, no
    // locked instruction. Two threads sharing one handle may lose an increment; that only
    // affects statistics.
    fn bump(c: &AtomicU64, by: u64) {
        c.store(
            c.load(Ordering::Relaxed).wrapping_add(by),
            Ordering::Relaxed,
        );
    }

    fn lookup(&self, snap: &MemSnapshot, gpa: u64) -> Option<Slot> {
        let mut hint = self.hint.load(Ordering::Relaxed);
        let (s, nodes) = snap.index().lookup(gpa, &mut hint);
        self.hint.store(hint, Ordering::Relaxed);
        Self::bump(&self.lookups, 1);
        Self::bump(&self.hits, u64::from(s.is_some()));
        Self::bump(&self.nodes_total, u64::from(nodes));
        if nodes > self.nodes_max.load(Ordering::Relaxed) {
            self.nodes_max.store(nodes, Ordering::Relaxed);
        }
        s.copied()
    }

    /// Check `[gpa, gpa + len)` and call `each` with its pieces, in order, only if the
    /// whole range is valid. Calls `each` with nothing on error.
    fn plan(
        &self,
        snap: &MemSnapshot,
        gpa: u64,
        len: usize,
        write: bool,
        mut each: impl FnMut(Piece),
    ) -> Result<(), DmaError> {
        if len == 0 {
            return Ok(());
        }
        let oor = DmaError::OutOfRange { gpa, len };
        let end = gpa.checked_add(len as u64).ok_or(oor)?;
        // Pass 1: validate. Accesses rarely span more than two slots, so walking twice is
        // cheaper than collecting the pieces in a Vec.
        let mut at = gpa;
        let mut readonly = false;
        while at < end {
            let s = self.lookup(snap, at).ok_or(oor)?;
            readonly |= s.flags.readonly();
            at = s.end().min(end);
        }
        if write && readonly {
            return Err(DmaError::ReadOnly { gpa, len });
        }
        // Pass 2: the same snapshot, so the same slots.
        let mut at = gpa;
        while at < end {
            let s = self.lookup(snap, at).ok_or(oor)?;
            let stop = s.end().min(end);
            each(Piece {
                host: s.host_addr_of(at),
                len: (stop - at) as usize,
            });
            at = stop;
        }
        Ok(())
    }
}

impl GuestRamDma {
    /// The host address of the aligned word at `gpa`, if it is in RAM (writable for
    /// `write`); `None` to fall back to the byte copy's checks and errors.
    fn word_at(&self, snap: &MemSnapshot, gpa: u64, write: bool) -> Option<*const AtomicU32> {
        if !gpa.is_multiple_of(4) {
            return None;
        }
        let mut host = None;
        // An aligned word never straddles a (page-aligned) slot: one piece or an error.
        self.plan(snap, gpa, 4, write, |p| {
            host = (p.len == 4 && p.host.is_multiple_of(4)).then_some(p.host as *const AtomicU32)
        })
        .ok()?;
        host
    }
}

impl GuestDma for GuestRamDma {
    fn read_u32(&self, gpa: u64) -> Result<u32, DmaError> {
        let snap = self.reg.load();
        match self.word_at(&snap, gpa, false) {
            // SAFETY: an aligned word of a RAM slot of `snap`, mapped while `snap` lives
            // (as in `read`). An atomic view of shared memory: one 32-bit load, whatever
            // the vCPUs store beside it.
            Some(w) => Ok(u32::from_le(unsafe { (*w).load(Ordering::Acquire) })),
            None => {
                let mut b = [0u8; 4];
                self.read(gpa, &mut b)?;
                Ok(u32::from_le_bytes(b))
            }
        }
    }

    fn write_u32(&self, gpa: u64, v: u32) -> Result<(), DmaError> {
        let snap = self.reg.load();
        match self.word_at(&snap, gpa, true) {
            // SAFETY: as in `read_u32`, in a writable slot (checked by `plan`). Release:
            // the frame and the other descriptor words written before are visible first.
            Some(w) => {
                unsafe { (*w).store(v.to_le(), Ordering::Release) };
                Ok(())
            }
            None => self.write(gpa, &v.to_le_bytes()),
        }
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let snap = self.reg.load();
        let mut off = 0usize;
        let dst = buf.as_mut_ptr();
        self.plan(&snap, gpa, buf.len(), false, |p| {
            // SAFETY: `p` lies inside a slot of `snap`, whose host memory stays mapped while
            // `snap` is alive (registry-owned mappings are kept by the snapshot, caller-owned
            // ones by `add_mapped`'s contract); `off + p.len <= buf.len()` because the pieces
            // partition [gpa, gpa + buf.len()). Guest memory never aliases `buf`.
            unsafe {
                std::ptr::copy_nonoverlapping(p.host as *const u8, dst.add(off), p.len);
            }
            off += p.len;
        })
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), DmaError> {
        let snap = self.reg.load();
        let mut off = 0usize;
        let src = data.as_ptr();
        self.plan(&snap, gpa, data.len(), true, |p| {
            // SAFETY: as in `read`; the pieces are in writable slots (checked by `plan`), and
            // the slot's host memory is mapped writable (registry mappings are PROT_WRITE;
            // `add_mapped` requires writable memory for non-READONLY slots).
            unsafe {
                std::ptr::copy_nonoverlapping(src.add(off), p.host as *mut u8, p.len);
            }
            off += p.len;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{FakeBackend, SlotFlags, SlotIndexKind};

    fn setup(kind: SlotIndexKind) -> (Arc<SlotRegistry>, GuestRamDma) {
        let reg = Arc::new(SlotRegistry::new(FakeBackend::new(16), kind));
        reg.add_ram(0x1000, 0x2000, SlotFlags::NONE).unwrap();
        reg.add_ram(0x3000, 0x1000, SlotFlags::LOG_DIRTY).unwrap(); // adjacent
        reg.add_ram(0x4000, 0x1000, SlotFlags::READONLY).unwrap(); // adjacent ROM
        reg.add_ram(0x10000, 0x1000, SlotFlags::NONE).unwrap(); // after a hole
        let dma = GuestRamDma::new(reg.clone());
        (reg, dma)
    }

    #[test]
    fn spans_slots_and_fails_cleanly() {
        for kind in SlotIndexKind::ALL {
            let (_reg, dma) = setup(kind);
            let data: Vec<u8> = (0..64u8).collect();
            // Spanning the first two slots.
            dma.write(0x3000 - 32, &data).unwrap();
            let mut back = [0u8; 64];
            dma.read(0x3000 - 32, &mut back).unwrap();
            assert_eq!(&back[..], &data[..]);
            // Read across RAM into ROM is fine; write is not, and writes nothing.
            dma.read(0x4000 - 8, &mut [0; 16]).unwrap();
            assert_eq!(
                dma.write(0x4000 - 8, &[0xaa; 16]),
                Err(DmaError::ReadOnly {
                    gpa: 0x4000 - 8,
                    len: 16
                })
            );
            let mut b = [0u8; 8];
            dma.read(0x4000 - 8, &mut b).unwrap();
            assert_eq!(b, [0; 8], "nothing written on failure");
            // Partial overlap with the hole after the ROM: out of range, nothing written.
            assert_eq!(
                dma.write(0x3ff8, &[0xbb; 0x1010]),
                Err(DmaError::OutOfRange {
                    gpa: 0x3ff8,
                    len: 0x1010
                })
            );
            dma.read(0x3ff8, &mut b).unwrap();
            assert_eq!(b, [0; 8]);
            assert!(dma.write(0xfff, &[1, 2]).is_err(), "starts below RAM");
            dma.read(0x1000, &mut b[..1]).unwrap();
            assert_eq!(b[0], 0);
            assert!(dma.read(u64::MAX - 1, &mut [0; 4]).is_err());
            assert!(dma.read(0x20000, &mut [0; 1]).is_err());
            dma.write_u32(0x10000, 0xdead_beef).unwrap();
            assert_eq!(dma.read_u32(0x10000).unwrap(), 0xdead_beef);
            let st = dma.stats();
            assert!(st.lookups > 0 && st.hits > 0 && st.misses > 0);
        }
    }

    #[test]
    fn words_are_checked_like_bytes_and_never_torn() {
        let (_reg, dma) = setup(SlotIndexKind::Wbtree);
        // Unaligned and slot-straddling words fall back to the byte copy and its checks.
        dma.write_u32(0x3000 - 2, 0x1122_3344).unwrap();
        assert_eq!(dma.read_u32(0x3000 - 2).unwrap(), 0x1122_3344);
        assert!(dma.write_u32(0x4000, 1).is_err(), "ROM");
        assert!(dma.write_u32(0x4ffe, 1).is_err(), "ROM, unaligned");
        assert_eq!(dma.read_u32(0x4000).unwrap(), 0, "nothing written");
        assert!(dma.read_u32(0x5000).is_err() && dma.write_u32(0x5000, 1).is_err());
        // An aligned word is one access: a reader racing a writer that flips every bit
        // sees only whole values.
        let dma = Arc::new(dma);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (dma, stop) = (dma.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut v = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    v = !v;
                    dma.write_u32(0x1ffc, v).unwrap();
                }
            })
        };
        let mut seen = [false; 2];
        for _ in 0..200_000 {
            match dma.read_u32(0x1ffc).unwrap() {
                0 => seen[0] = true,
                u32::MAX => seen[1] = true,
                torn => panic!("torn word {torn:#x}"),
            }
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        assert!(seen[0] || seen[1]);
    }
}

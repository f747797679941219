//! Changing a live slot: resize, move (both a KVM delete and create, rolled back if the
//! create fails) and dirty-page logging.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{validate, Record, SlotRegistry, WriterState};
use crate::memory::index::RangeIndex;
use crate::memory::mapping::HostMapping;
use crate::memory::{MemoryError, Slot, SlotFlags, SlotId};

impl SlotRegistry {
    /// Replace slot `id` by `new` in KVM (delete, then create, as KVM requires for size and
    /// address changes), restoring the old slot if the create fails.
    ///
    /// `between` runs after KVM deleted the old slot and before the new one is created: the
    /// guest can no longer write the old memory then (copying contents there loses nothing).
    fn replace_locked(
        &self,
        w: &mut WriterState,
        old: Record,
        new: Record,
        between: impl FnOnce(),
    ) -> Result<(), MemoryError> {
        let (o, n) = (old.slot, new.slot);
        let id = o.id;
        let be = |s: &Slot, size: u64| {
            self.backend
                .set_slot(id, s.gpa, size, s.host_addr, s.flags.bits())
        };
        be(&o, 0).map_err(|source| MemoryError::Backend {
            slot: id,
            gpa: o.gpa,
            size: 0,
            flags: o.flags.bits(),
            source,
        })?;
        between();
        if let Err(source) = be(&n, n.size) {
            return match be(&o, o.size) {
                Ok(()) => Err(MemoryError::Backend {
                    slot: id,
                    gpa: n.gpa,
                    size: n.size,
                    flags: n.flags.bits(),
                    source,
                }),
                Err(e) => {
                    // KVM lost the slot: mirror that, so that the registry still matches KVM.
                    w.table[id as usize] = None;
                    w.free.insert(id);
                    let owned = old.owned.clone();
                    self.publish(w, move |next| {
                        next.index.remove(o.gpa);
                        if let Some(m) = &owned {
                            next.keep.retain(|k| !Arc::ptr_eq(k, m));
                        }
                    });
                    self.count.fetch_sub(1, Ordering::Relaxed);
                    log::error!("slot {id}: create failed ({source}) and restore failed ({e})");
                    Err(MemoryError::RollbackFailed {
                        slot: id,
                        source: e,
                    })
                }
            };
        }
        w.table[id as usize] = Some(new.clone());
        let (old_owned, new_owned) = (old.owned, new.owned);
        self.publish(w, move |next| {
            next.index.remove(o.gpa);
            let _ = next.index.insert(n);
            if let Some(m) = &old_owned {
                next.keep.retain(|k| !Arc::ptr_eq(k, m));
            }
            if let Some(m) = &new_owned {
                next.keep.push(m.clone());
            }
        });
        Ok(())
    }

    /// Change slot `id`'s size. Shrinking keeps the memory; growing a registry-owned slot
    /// maps a new region and copies the old contents (the guest sees the slot disappear
    /// briefly, as with any KVM slot resize); caller-owned slots cannot grow.
    pub fn resize(&self, id: SlotId, new_size: u64) -> Result<(), MemoryError> {
        let mut w = self.lock();
        let old = Self::record(&w, id)?;
        let o = old.slot;
        validate(o.gpa, new_size, o.flags)?;
        if new_size == o.size {
            return Ok(());
        }
        if new_size > o.size {
            self.check_range_free_except(o.gpa + o.size, new_size - o.size, &o)?;
        }
        let owned = if new_size > o.size {
            if old.owned.is_none() {
                return Err(MemoryError::CannotGrowMapped { slot: id });
            }
            Some(Arc::new(HostMapping::new(o.gpa, new_size)?))
        } else {
            old.owned.clone()
        };
        // Growing into a new mapping: copy the contents once the guest cannot write the old
        // one any more (devices doing DMA on an older snapshot should be quiesced first).
        let copy = owned
            .as_ref()
            .filter(|m| m.addr() != o.host_addr)
            .map(|m| m.addr());
        let between = move || {
            if let Some(dst) = copy {
                // SAFETY: both ranges are live mappings (the old one is kept alive by
                // `old.owned` and the current snapshot) of at least `o.size` bytes, and two
                // distinct mappings cannot overlap.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        o.host_addr as *const u8,
                        dst as *mut u8,
                        o.size as usize,
                    );
                }
            }
        };
        let host_addr = owned.as_ref().map_or(o.host_addr, |m| m.addr());
        let new = Record {
            slot: Slot {
                size: new_size,
                host_addr,
                ..o
            },
            owned,
        };
        self.replace_locked(&mut w, old, new, between)
    }

    /// Move slot `id` to guest address `new_gpa` (same host memory, same size).
    pub fn move_slot(&self, id: SlotId, new_gpa: u64) -> Result<(), MemoryError> {
        let mut w = self.lock();
        let old = Self::record(&w, id)?;
        let o = old.slot;
        validate(new_gpa, o.size, o.flags)?;
        self.check_range_free_except(new_gpa, o.size, &o)?;
        let new = Record {
            slot: Slot { gpa: new_gpa, ..o },
            owned: old.owned.clone(),
        };
        self.replace_locked(&mut w, old, new, || {})
    }

    fn check_range_free_except(
        &self,
        gpa: u64,
        size: u64,
        except: &Slot,
    ) -> Result<(), MemoryError> {
        let snap = self.current.load();
        let end = gpa + size;
        // Slots are disjoint, so another slot intersecting [gpa, end) must intersect the
        // part of it outside `except`'s own range: at most two index queries, no scan.
        let (es, ee) = (except.gpa, except.gpa + except.size);
        let parts = [(gpa, end.min(es)), (gpa.max(ee), end)];
        for (a, b) in parts {
            if a >= b {
                continue;
            }
            if let Some(s) = snap.index.overlapping(a, b) {
                return Err(MemoryError::Overlap {
                    gpa,
                    size,
                    slot: s.id,
                    slot_gpa: s.gpa,
                    slot_size: s.size,
                });
            }
        }
        Ok(())
    }

    /// Turn dirty-page logging on or off for slot `id` (KVM allows this on a live slot).
    pub fn set_dirty_log(&self, id: SlotId, on: bool) -> Result<(), MemoryError> {
        let mut w = self.lock();
        let old = Self::record(&w, id)?;
        let o = old.slot;
        let flags = o.flags.with(SlotFlags::LOG_DIRTY, on);
        if flags == o.flags {
            return Ok(());
        }
        self.backend
            .set_slot(id, o.gpa, o.size, o.host_addr, flags.bits())
            .map_err(|source| MemoryError::Backend {
                slot: id,
                gpa: o.gpa,
                size: o.size,
                flags: flags.bits(),
                source,
            })?;
        let n = Slot { flags, ..o };
        w.table[id as usize] = Some(Record {
            slot: n,
            owned: old.owned,
        });
        self.publish(&mut w, move |next| {
            next.index.remove(o.gpa);
            let _ = next.index.insert(n);
        });
        Ok(())
    }
}

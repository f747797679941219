//! The memslot registry: KVM slots plus an immutable, atomically published mirror.
//!
//! Writers (slot add, remove, resize, move, flag change) serialise on a mutex, make the KVM
//! change first, and only then publish a new [`MemSnapshot`]; if KVM refuses, nothing is
//! published and the slot id goes back to the free list, so the registry and KVM agree after
//! any failure. Readers (vCPU threads, the I/O thread doing DMA) `load()` the current
//! snapshot through `arc_swap`: no lock, never blocked by a writer.
//!
//! Host memory safety: a snapshot keeps the registry-owned mappings it references alive
//! (`Arc<HostMapping>`), so a reader still holding an old snapshot never touches unmapped
//! memory after a slot is removed; the mapping is unmapped when the last snapshot that
//! references it is dropped.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, Guard};

use super::backend::SlotBackend;
use super::index::{RangeIndex, SlotIndexKind};
use super::mapping::HostMapping;
use super::snapshot::MemSnapshot;
use super::split::split_layout;
use super::{MemoryError, Slot, SlotFlags, SlotId, PAGE_SIZE};

mod change;
#[cfg(test)]
mod tests;

struct WriterState {
    /// By slot id; grows on demand (never beyond the backend's limit).
    table: Vec<Option<Record>>,
    /// Ids below `table.len()` that are free; the lowest is reused first.
    free: BTreeSet<u32>,
    /// The previously published snapshot and the change that turned it into the current
    /// one (see `publish`).
    spare: Option<(Arc<MemSnapshot>, Replay)>,
}

type Replay = Box<dyn Fn(&mut MemSnapshot) + Send>;

#[derive(Clone)]
struct Record {
    slot: Slot,
    owned: Option<Arc<HostMapping>>,
}

/// The memslot registry. Share it as `Arc<SlotRegistry>`.
pub struct SlotRegistry {
    backend: Box<dyn SlotBackend>,
    limit: u32,
    current: ArcSwap<MemSnapshot>,
    writer: Mutex<WriterState>,
    count: AtomicU32,
    /// The published snapshot's generation, bumped right after each publish. A cheap
    /// read for caches that only need to know whether anything changed (`MmioRouter`).
    generation: AtomicU64,
}

impl std::fmt::Debug for SlotRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotRegistry")
            .field("limit", &self.limit)
            .field("slots", &self.len())
            .field("generation", &self.generation())
            .finish()
    }
}

pub(super) fn validate(gpa: u64, size: u64, flags: SlotFlags) -> Result<(), MemoryError> {
    if size == 0 {
        return Err(MemoryError::ZeroSize { gpa });
    }
    if !gpa.is_multiple_of(PAGE_SIZE) || !size.is_multiple_of(PAGE_SIZE) {
        return Err(MemoryError::Unaligned { gpa, size });
    }
    if gpa.checked_add(size).is_none() {
        return Err(MemoryError::AddressOverflow { gpa, size });
    }
    SlotFlags::from_bits(flags.bits()).ok_or(MemoryError::BadFlags { bits: flags.bits() })?;
    Ok(())
}

impl SlotRegistry {
    /// A registry over `backend` (e.g. the `VmFd`, or an `Arc<VmFd>`), mirroring the slots in
    /// the index `kind`.
    pub fn new(backend: impl SlotBackend + 'static, kind: SlotIndexKind) -> Self {
        let limit = backend.max_slots();
        Self {
            backend: Box::new(backend),
            limit,
            current: ArcSwap::from_pointee(MemSnapshot::empty(kind)),
            writer: Mutex::new(WriterState {
                table: Vec::new(),
                free: BTreeSet::new(),
                spare: None,
            }),
            count: AtomicU32::new(0),
            generation: AtomicU64::new(0),
        }
    }

    /// The host's slot limit (`KVM_CAP_NR_MEMSLOTS`).
    pub fn limit(&self) -> u32 {
        self.limit
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn index_kind(&self) -> SlotIndexKind {
        self.current.load().index_kind()
    }

    /// Current snapshot, cheaply (hot path: no lock, normally no refcount traffic).
    #[inline]
    pub fn load(&self) -> Guard<Arc<MemSnapshot>> {
        self.current.load()
    }

    /// Current snapshot as an owned `Arc` (to hold across calls).
    pub fn snapshot(&self) -> Arc<MemSnapshot> {
        self.current.load_full()
    }

    /// The generation of the latest published snapshot: one atomic load. It is bumped after
    /// the snapshot is published, so a reader that sees generation `g` and then loads the
    /// snapshot gets generation `g` or newer.
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Capacity of the id table (grows on demand; for tests and reports).
    pub fn table_capacity(&self) -> usize {
        self.lock().table.len()
    }

    /// The slot with id `id`.
    pub fn slot(&self, id: SlotId) -> Option<Slot> {
        self.lock()
            .table
            .get(id as usize)
            .and_then(|r| r.as_ref().map(|r| r.slot))
    }

    /// All slots in address order.
    pub fn slots(&self) -> Vec<Slot> {
        self.load().slots()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WriterState> {
        // A panic while holding the lock cannot leave the table half-changed: every change is
        // computed first and committed with plain assignments at the end.
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Add guest RAM backed by a fresh anonymous mapping the registry owns.
    pub fn add_ram(&self, gpa: u64, size: u64, flags: SlotFlags) -> Result<SlotId, MemoryError> {
        validate(gpa, size, flags)?;
        let mut w = self.lock();
        self.check_free(&w, gpa, size)?;
        let mapping = Arc::new(HostMapping::new(gpa, size)?);
        self.add_locked(&mut w, gpa, size, mapping.addr(), flags, Some(mapping))
    }

    /// Add guest memory backed by caller-owned host memory `[host_addr, host_addr + size)`.
    ///
    /// # Safety
    ///
    /// The host range must be a readable (and, unless `READONLY`, writable) mapping that
    /// stays mapped for as long as this registry or any snapshot or [`GuestRamDma`]
    /// (super::GuestRamDma) taken from it exists, even after the slot is removed (a reader
    /// may still hold an older snapshot). In practice: guest RAM mapped for the VM's
    /// lifetime.
    pub unsafe fn add_mapped(
        &self,
        gpa: u64,
        host_addr: u64,
        size: u64,
        flags: SlotFlags,
    ) -> Result<SlotId, MemoryError> {
        validate(gpa, size, flags)?;
        if !host_addr.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::UnalignedHost { gpa, host_addr });
        }
        let mut w = self.lock();
        self.check_free(&w, gpa, size)?;
        self.add_locked(&mut w, gpa, size, host_addr, flags, None)
    }

    /// Register guest RAM that lives in one caller-owned host mapping, split over `nslots`
    /// slots with [`split_layout`]. `ram_ranges` are the guest RAM ranges in address order
    /// (e.g. below and above the PCI hole); they are laid out back to back in host memory
    /// from `host_base`, so range `k` starts at `host_base + sum(sizes of ranges before k)`.
    /// All or nothing: if any slot fails, the ones already added are removed again.
    ///
    /// # Safety
    ///
    /// As for [`SlotRegistry::add_mapped`], for the whole host range
    /// `[host_base, host_base + sum(sizes))`.
    pub unsafe fn add_mapped_split(
        &self,
        ram_ranges: &[(u64, u64)],
        host_base: u64,
        nslots: u32,
        flags: SlotFlags,
    ) -> Result<Vec<SlotId>, MemoryError> {
        let pieces = split_layout(ram_ranges, nslots)?;
        let free = (self.limit as usize).saturating_sub(self.len());
        if pieces.len() > free {
            return Err(MemoryError::TooManySlots {
                gpa: pieces.first().map_or(0, |p| p.0),
                limit: self.limit,
            });
        }
        // Host offset of each range: ranges are packed in host memory in the given order.
        let mut host_of_range = Vec::with_capacity(ram_ranges.len());
        let mut off = 0u64;
        for &(gpa, size) in ram_ranges {
            host_of_range.push((gpa, size, host_base + off));
            off += size;
        }
        let mut ids = Vec::with_capacity(pieces.len());
        for &(gpa, size) in &pieces {
            let host = host_of_range
                .iter()
                .find(|&&(g, s, _)| gpa >= g && gpa + size <= g + s)
                .map(|&(g, _, h)| h + (gpa - g));
            // split_layout only returns pieces inside the given ranges.
            let Some(host) = host else { continue };
            // SAFETY: the caller's contract covers the whole host range.
            match unsafe { self.add_mapped(gpa, host, size, flags) } {
                Ok(id) => ids.push(id),
                Err(e) => {
                    for &id in ids.iter().rev() {
                        if let Err(re) = self.remove(id) {
                            log::error!(
                                "cannot undo slot {id} after a failed split: {}",
                                crate::error_chain(&re)
                            );
                        }
                    }
                    return Err(e);
                }
            }
        }
        self.optimize();
        Ok(ids)
    }

    /// Re-shape the mirror's index for lookups (a full size-biased rebuild of the wbtree;
    /// nothing for the other indexes) and publish it. `add_mapped_split` does this itself;
    /// call it after other bulk setups. Bumps the generation.
    pub fn optimize(&self) {
        let mut w = self.lock();
        if self.current.load().index_kind() == SlotIndexKind::Wbtree {
            self.publish(&mut w, |next| next.index.optimize());
        }
    }

    fn check_free(&self, w: &WriterState, gpa: u64, size: u64) -> Result<(), MemoryError> {
        let snap = self.current.load();
        if let Some(s) = snap.overlapping(gpa, size) {
            return Err(MemoryError::Overlap {
                gpa,
                size,
                slot: s.id,
                slot_gpa: s.gpa,
                slot_size: s.size,
            });
        }
        let used = w.table.len() - w.free.len();
        if used >= self.limit as usize {
            return Err(MemoryError::TooManySlots {
                gpa,
                limit: self.limit,
            });
        }
        Ok(())
    }

    fn add_locked(
        &self,
        w: &mut WriterState,
        gpa: u64,
        size: u64,
        host_addr: u64,
        flags: SlotFlags,
        owned: Option<Arc<HostMapping>>,
    ) -> Result<SlotId, MemoryError> {
        // Lowest free id, or grow the table by one (bounded by check_free).
        let id = match w.free.first() {
            Some(&id) => id,
            None => w.table.len() as u32,
        };
        self.backend
            .set_slot(id, gpa, size, host_addr, flags.bits())
            .map_err(|source| MemoryError::Backend {
                slot: id,
                gpa,
                size,
                flags: flags.bits(),
                source,
            })?;
        // KVM has it: commit the table, then publish.
        let slot = Slot {
            gpa,
            size,
            host_addr,
            id,
            flags,
        };
        w.free.remove(&id);
        let rec = Record { slot, owned };
        if id as usize == w.table.len() {
            w.table.push(Some(rec.clone()));
        } else {
            w.table[id as usize] = Some(rec.clone());
        }
        let owned = rec.owned;
        self.publish(w, move |next| {
            // Cannot fail: overlap was checked under the writer lock.
            let _ = next.index.insert(slot);
            if let Some(m) = &owned {
                next.keep.push(m.clone());
            }
        });
        self.count.fetch_add(1, Ordering::Relaxed);
        Ok(id)
    }

    /// Publish the current snapshot with `change` applied.
    ///
    /// Copy-on-write, but without copying when possible: the snapshot that the current one
    /// replaced is kept as a spare together with the change that led from it to the current
    /// one. If no reader holds the spare any more (`Arc::get_mut`: after a swap, arc-swap
    /// has converted every reader's borrow of the old value into a reference count), it is
    /// brought up to date by replaying that change and reused, so an update costs the index
    /// operations (`O(log n)` for the trees) instead of an `O(n)` copy. Otherwise it is a
    /// full copy. The spare delays the unmapping of a removed slot's memory by one update.
    fn publish(&self, w: &mut WriterState, change: impl Fn(&mut MemSnapshot) + Send + 'static) {
        let gen = self.current.load().generation + 1;
        let reused = match w.spare.take() {
            Some((mut spare, replay)) => match Arc::get_mut(&mut spare) {
                Some(s) => {
                    replay(s);
                    change(s);
                    s.generation = gen;
                    Some(spare)
                }
                None => None,
            },
            None => None,
        };
        let next = reused.unwrap_or_else(|| {
            let mut n = MemSnapshot::clone(&self.current.load());
            change(&mut n);
            n.generation = gen;
            Arc::new(n)
        });
        let old = self.current.swap(next);
        self.generation.store(gen, Ordering::Release);
        w.spare = Some((old, Box::new(change)));
    }

    fn record(w: &WriterState, id: SlotId) -> Result<Record, MemoryError> {
        w.table
            .get(id as usize)
            .and_then(|r| r.clone())
            .ok_or(MemoryError::NoSuchSlot { slot: id })
    }

    /// Remove slot `id`. Registry-owned memory is unmapped once no snapshot uses it.
    pub fn remove(&self, id: SlotId) -> Result<Slot, MemoryError> {
        let mut w = self.lock();
        let rec = Self::record(&w, id)?;
        let s = rec.slot;
        self.backend
            .set_slot(id, s.gpa, 0, s.host_addr, s.flags.bits())
            .map_err(|source| MemoryError::Backend {
                slot: id,
                gpa: s.gpa,
                size: 0,
                flags: s.flags.bits(),
                source,
            })?;
        w.table[id as usize] = None;
        w.free.insert(id);
        // Shrink the table's tail so that it only grows as far as the live ids need.
        while let Some(None) = w.table.last() {
            let last = w.table.len() as u32 - 1;
            w.table.pop();
            w.free.remove(&last);
        }
        let owned = rec.owned;
        self.publish(&mut w, move |next| {
            next.index.remove(s.gpa);
            if let Some(m) = &owned {
                next.keep.retain(|k| !Arc::ptr_eq(k, m));
            }
        });
        self.count.fetch_sub(1, Ordering::Relaxed);
        Ok(s)
    }

    /// Check that the mirror, the id table and `expected` (e.g. the fake backend's slots as
    /// (id, gpa, size, host, flags)) agree. For tests.
    #[cfg(any(test, feature = "test-doubles"))]
    pub fn check_consistent(&self, expected: &[(u32, u64, u64, u64, u32)]) -> Result<(), String> {
        let w = self.lock();
        let snap = self.current.load();
        let mut from_table: Vec<(u32, u64, u64, u64, u32)> = w
            .table
            .iter()
            .flatten()
            .map(|r| {
                let s = r.slot;
                (s.id, s.gpa, s.size, s.host_addr, s.flags.bits())
            })
            .collect();
        from_table.sort();
        let mut from_index: Vec<_> = snap
            .slots()
            .iter()
            .map(|s| (s.id, s.gpa, s.size, s.host_addr, s.flags.bits()))
            .collect();
        from_index.sort();
        let mut exp = expected.to_vec();
        exp.sort();
        if from_table != exp {
            return Err(format!("table {from_table:x?} != backend {exp:x?}"));
        }
        if from_index != exp {
            return Err(format!("index {from_index:x?} != backend {exp:x?}"));
        }
        if self.len() != exp.len() {
            return Err(format!("count {} != {}", self.len(), exp.len()));
        }
        for id in &w.free {
            if w.table.get(*id as usize).is_some_and(|r| r.is_some()) {
                return Err(format!("free id {id} is in use"));
            }
        }
        let owned = w
            .table
            .iter()
            .flatten()
            .filter(|r| r.owned.is_some())
            .count();
        if owned != snap.keep.len() {
            return Err(format!(
                "{owned} owned mappings, snapshot keeps {}",
                snap.keep.len()
            ));
        }
        Ok(())
    }
}

impl Drop for SlotRegistry {
    /// Delete the remaining slots from KVM before the registry's own mappings can be
    /// unmapped, so that KVM never holds a slot over freed host memory. Stop the vCPUs
    /// first: a running guest would see its RAM disappear.
    fn drop(&mut self) {
        let w = self.writer.get_mut().unwrap_or_else(|e| e.into_inner());
        for rec in w.table.iter().flatten() {
            let s = rec.slot;
            if let Err(e) = self
                .backend
                .set_slot(s.id, s.gpa, 0, s.host_addr, s.flags.bits())
            {
                log::debug!("deleting slot {} at teardown: {e}", s.id);
            }
        }
    }
}

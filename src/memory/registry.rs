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
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, Guard};

use super::index::{AnyIndex, RangeIndex, SlotIndexKind};
use super::stats::IndexStats;
use super::{MemoryError, Slot, SlotFlags, SlotId, PAGE_SIZE};

/// How the registry talks to KVM. `size == 0` deletes the slot.
pub trait SlotBackend: Send + Sync {
    fn set_slot(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        host_addr: u64,
        flags: u32,
    ) -> io::Result<()>;
    /// `KVM_CAP_NR_MEMSLOTS`: slot ids are `0..max_slots()`.
    fn max_slots(&self) -> u32;
}

impl SlotBackend for kvm_ioctls::VmFd {
    fn set_slot(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        host_addr: u64,
        flags: u32,
    ) -> io::Result<()> {
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host_addr,
        };
        // SAFETY: the registry only registers host ranges that stay mapped while the slot is
        // registered: its own anonymous mappings are unmapped only after KVM has deleted the
        // slot (and no snapshot references them), and `add_mapped`'s caller promises the
        // same for caller-owned memory. A delete (size 0) passes no memory.
        unsafe { self.set_user_memory_region(region) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    fn max_slots(&self) -> u32 {
        // KVM documents "if this capability is not supported, assume 32 slots" (api.rst).
        let n = self.check_extension_int(kvm_ioctls::Cap::NrMemslots);
        if n > 0 {
            n as u32
        } else {
            32
        }
    }
}

impl<B: SlotBackend + ?Sized> SlotBackend for Arc<B> {
    fn set_slot(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        host_addr: u64,
        flags: u32,
    ) -> io::Result<()> {
        (**self).set_slot(slot, gpa, size, host_addr, flags)
    }
    fn max_slots(&self) -> u32 {
        (**self).max_slots()
    }
}

/// A fake KVM for tests and benchmarks. It enforces what KVM enforces (slot id below the
/// limit, no overlap between slots, no resizing a live slot) and can be told to fail.
pub struct FakeBackend {
    limit: u32,
    slots: Mutex<FakeSlots>,
    /// Calls left before injected failures start; negative = none armed.
    fail_in: std::sync::atomic::AtomicI64,
    /// How many consecutive calls fail once armed.
    fail_count: AtomicU32,
    calls: AtomicU64,
}

impl FakeBackend {
    pub fn new(limit: u32) -> Self {
        Self {
            limit,
            slots: Mutex::new(Default::default()),
            fail_in: std::sync::atomic::AtomicI64::new(-1),
            fail_count: AtomicU32::new(0),
            calls: AtomicU64::new(0),
        }
    }

    /// Make the `n`-th next call (0 = the very next one) fail with `EFAULT`.
    pub fn fail_after(&self, n: u32) {
        self.fail_calls(n, 1);
    }

    /// Let `skip` calls succeed, then fail the following `count` calls with `EFAULT`.
    pub fn fail_calls(&self, skip: u32, count: u32) {
        self.fail_count.store(count, Ordering::SeqCst);
        let arm = if count == 0 { -1 } else { i64::from(skip) };
        self.fail_in.store(arm, Ordering::SeqCst);
    }

    /// Slots as KVM would hold them: id → (gpa, size, host_addr, flags).
    pub fn slots(&self) -> Vec<(u32, u64, u64, u64, u32)> {
        let s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        s.by_id
            .iter()
            .map(|(&id, &(g, sz, h, f))| (id, g, sz, h, f))
            .collect()
    }

    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

impl SlotBackend for FakeBackend {
    fn set_slot(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        host_addr: u64,
        flags: u32,
    ) -> io::Result<()> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let armed = self.fail_in.load(Ordering::SeqCst);
        if armed > 0 {
            self.fail_in.store(armed - 1, Ordering::SeqCst);
        } else if armed == 0 {
            let left = self.fail_count.load(Ordering::SeqCst);
            if left <= 1 {
                self.fail_in.store(-1, Ordering::SeqCst);
            }
            self.fail_count
                .store(left.saturating_sub(1), Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        }
        if slot >= self.limit {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut guard = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let st = &mut *guard;
        if size == 0 {
            return match st.by_id.remove(&slot) {
                Some((g, ..)) => {
                    st.by_gpa.remove(&g);
                    Ok(())
                }
                None => Err(io::Error::from_raw_os_error(libc::EINVAL)),
            };
        }
        if let Some(&(g, sz, _, _)) = st.by_id.get(&slot) {
            // KVM allows only flag changes on a live slot.
            if g != gpa || sz != size {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
        }
        // Overlap with another slot: the last slot starting below our end must end at or
        // before our start (slots never overlap each other, so one check suffices).
        let end = gpa
            .checked_add(size)
            .ok_or(io::Error::from_raw_os_error(libc::EINVAL))?;
        let clash = st.by_gpa.range(..end).next_back().is_some_and(|(&g, &id)| {
            id != slot && st.by_id.get(&id).is_some_and(|v| g + v.1 > gpa)
        });
        if clash {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        st.by_id.insert(slot, (gpa, size, host_addr, flags));
        st.by_gpa.insert(gpa, slot);
        Ok(())
    }

    fn max_slots(&self) -> u32 {
        self.limit
    }
}

#[derive(Default)]
struct FakeSlots {
    by_id: std::collections::BTreeMap<u32, (u64, u64, u64, u32)>,
    by_gpa: std::collections::BTreeMap<u64, u32>,
}

/// An anonymous mapping of guest RAM (the registry's own slots, and the VMM's main
/// RAM); unmapped on drop.
#[derive(Debug)]
pub struct HostMapping {
    addr: u64,
    size: u64,
}

impl HostMapping {
    /// Map `size` bytes for guest memory at `gpa` (`gpa` only labels errors).
    pub fn new(gpa: u64, size: u64) -> Result<Self, MemoryError> {
        let len = usize::try_from(size).map_err(|_| MemoryError::Mmap {
            gpa,
            size,
            source: io::Error::from_raw_os_error(libc::ENOMEM),
        })?;
        // SAFETY: a fresh anonymous private mapping; it aliases nothing. NORESERVE because
        // guest RAM is sparse in practice and must not be charged against overcommit upfront.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MemoryError::Mmap {
                gpa,
                size,
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self {
            addr: p as u64,
            size,
        })
    }

    pub fn addr(&self) -> u64 {
        self.addr
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        // SAFETY: we created this mapping in `new` and nothing references it any more: KVM's
        // slot was deleted and no snapshot holds this `Arc`.
        unsafe {
            libc::munmap(self.addr as *mut libc::c_void, self.size as usize);
        }
    }
}

/// An immutable view of the memslots at one generation.
#[derive(Clone, Debug)]
pub struct MemSnapshot {
    generation: u64,
    index: AnyIndex<Slot>,
    /// Keeps registry-owned host memory mapped while this snapshot is alive.
    keep: Vec<Arc<HostMapping>>,
}

/// Per-reader lookup state: the `binary` index's last-hit hint and plain counters. One per
/// thread (owned by the vCPU's router, or by a DMA handle): no sharing, no atomics.
#[derive(Clone, Debug, Default)]
pub struct SlotProbe {
    pub hint: u32,
    pub lookups: u64,
    pub hits: u64,
    pub nodes_total: u64,
    pub nodes_max: u32,
}

impl SlotProbe {
    pub fn stats(&self, kind: SlotIndexKind) -> IndexStats {
        IndexStats::from_counts(
            kind,
            self.lookups,
            self.hits,
            self.nodes_total,
            self.nodes_max,
        )
    }
}

impl MemSnapshot {
    fn empty(kind: SlotIndexKind) -> Self {
        Self {
            generation: 0,
            index: AnyIndex::new(kind),
            keep: Vec::new(),
        }
    }

    /// Bumped on every change of the slot set.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn index_kind(&self) -> SlotIndexKind {
        self.index.kind()
    }

    pub fn index(&self) -> &AnyIndex<Slot> {
        &self.index
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The slot containing `gpa` (no statistics).
    #[inline]
    pub fn lookup(&self, gpa: u64) -> Option<&Slot> {
        let mut hint = 0;
        self.index.lookup(gpa, &mut hint).0
    }

    /// The slot containing `gpa`, counting into `probe`.
    #[inline]
    pub fn lookup_with(&self, gpa: u64, probe: &mut SlotProbe) -> Option<&Slot> {
        let (s, nodes) = self.index.lookup(gpa, &mut probe.hint);
        probe.lookups += 1;
        probe.hits += u64::from(s.is_some());
        probe.nodes_total += u64::from(nodes);
        probe.nodes_max = probe.nodes_max.max(nodes);
        s
    }

    /// Some slot intersecting `[gpa, gpa + size)`.
    pub fn overlapping(&self, gpa: u64, size: u64) -> Option<&Slot> {
        self.index.overlapping(gpa, gpa.saturating_add(size))
    }

    /// All slots in address order.
    pub fn slots(&self) -> Vec<Slot> {
        self.index.items()
    }
}

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

fn validate(gpa: u64, size: u64, flags: SlotFlags) -> Result<(), MemoryError> {
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
        self.add_locked(&mut w, gpa, size, mapping.addr, flags, Some(mapping))
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
            .filter(|m| m.addr != o.host_addr)
            .map(|m| m.addr);
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
        let host_addr = owned.as_ref().map_or(o.host_addr, |m| m.addr);
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

    /// Check that the mirror, the id table and `expected` (e.g. the fake backend's slots as
    /// (id, gpa, size, host, flags)) agree. For tests.
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

/// Split RAM ranges `(gpa, size)` into `nslots` page-aligned slots, as equal as possible.
///
/// Slots never span a hole between ranges, so every range gets at least one slot; the rest
/// go one at a time to the range whose pieces are currently largest (this minimises the
/// largest piece). Within a range, piece sizes differ by at most one page.
pub fn split_layout(
    ram_ranges: &[(u64, u64)],
    nslots: u32,
) -> Result<Vec<(u64, u64)>, MemoryError> {
    let ranges: Vec<(u64, u64)> = ram_ranges.iter().copied().filter(|r| r.1 > 0).collect();
    for &(gpa, size) in &ranges {
        validate(gpa, size, SlotFlags::NONE)?;
    }
    let pages: Vec<u64> = ranges.iter().map(|r| r.1 / PAGE_SIZE).collect();
    let total: u64 = pages.iter().sum();
    let n = u64::from(nslots);
    if n < ranges.len() as u64 || n > total || n == 0 {
        return Err(MemoryError::BadSplit {
            nslots: n,
            ranges: ranges.len(),
            pages: total,
            max: total,
        });
    }
    let mut count = vec![1u64; ranges.len()];
    // Max-heap on the current largest piece (ceil(pages / count)) of each range.
    let mut heap: std::collections::BinaryHeap<(u64, usize)> =
        pages.iter().enumerate().map(|(i, &p)| (p, i)).collect();
    let mut left = n - ranges.len() as u64;
    while left > 0 {
        let Some((_, i)) = heap.pop() else { break };
        count[i] += 1;
        left -= 1;
        if count[i] < pages[i] {
            heap.push((pages[i].div_ceil(count[i]), i));
        }
    }
    let mut out = Vec::with_capacity(nslots as usize);
    for (i, &(gpa, _)) in ranges.iter().enumerate() {
        let (q, r) = (pages[i] / count[i], pages[i] % count[i]);
        let mut at = gpa;
        for k in 0..count[i] {
            let p = q + u64::from(k < r);
            out.push((at, p * PAGE_SIZE));
            at += p * PAGE_SIZE;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(limit: u32) -> (Arc<FakeBackend>, SlotRegistry) {
        let be = Arc::new(FakeBackend::new(limit));
        (be.clone(), SlotRegistry::new(be, SlotIndexKind::Wbtree))
    }

    const BASE: u64 = 0x1_0000_0000;

    #[test]
    fn grows_past_32_and_509_to_the_limit_and_reuses_ids() {
        let limit = 600;
        let (be, r) = reg(limit);
        let host = 0x7000_0000_0000u64; // fake backend never touches memory
        for i in 0..limit as u64 {
            // SAFETY: the fake backend and these tests never dereference the host address.
            let id = unsafe {
                r.add_mapped(
                    BASE + i * 0x2000,
                    host + i * 0x1000,
                    0x1000,
                    SlotFlags::NONE,
                )
            }
            .unwrap();
            assert_eq!(id as u64, i);
            if i == 32 || i == 509 {
                r.check_consistent(&be.slots()).unwrap();
            }
        }
        assert_eq!(r.len(), 600);
        let g = r.generation();
        let e = unsafe { r.add_mapped(0, host, 0x1000, SlotFlags::NONE) }.unwrap_err();
        assert!(
            matches!(e, MemoryError::TooManySlots { limit: 600, .. }),
            "{e}"
        );
        assert_eq!(r.generation(), g, "failed change publishes nothing");
        r.remove(17).unwrap();
        r.remove(3).unwrap();
        assert!(r.generation() > g);
        let id = unsafe { r.add_mapped(0, host, 0x1000, SlotFlags::NONE) }.unwrap();
        assert_eq!(id, 3, "lowest free id reused");
        let id = unsafe { r.add_mapped(0x1000, host, 0x1000, SlotFlags::NONE) }.unwrap();
        assert_eq!(id, 17);
        r.check_consistent(&be.slots()).unwrap();
        assert_eq!(r.table_capacity(), 600);
    }

    #[test]
    fn errors_leave_everything_consistent() {
        let (be, r) = reg(64);
        let a = r.add_ram(0x10_0000, 0x10_000, SlotFlags::NONE).unwrap();
        let snap = r.snapshot();
        let cases: Vec<(Result<SlotId, MemoryError>, &str)> = vec![
            (
                r.add_ram(0x10_8000, 0x10_000, SlotFlags::NONE),
                "overlaps slot 0",
            ),
            (r.add_ram(0x20_0000, 0, SlotFlags::NONE), "size 0"),
            (
                r.add_ram(0x20_0800, 0x1000, SlotFlags::NONE),
                "not 4 KiB aligned",
            ),
            (
                r.add_ram(u64::MAX - 0xfff, 0x2000, SlotFlags::NONE),
                "past the end",
            ),
            (
                r.add_ram(
                    0x20_0000,
                    0x1000,
                    SlotFlags::from_bits(0).unwrap() | SlotFlags(8),
                ),
                "unsupported",
            ),
        ];
        for (res, msg) in cases {
            let e = res.unwrap_err().to_string();
            assert!(e.contains(msg), "{e:?} should mention {msg:?}");
        }
        // Backend failure on add.
        be.fail_after(0);
        let e = r.add_ram(0x40_0000, 0x1000, SlotFlags::NONE).unwrap_err();
        assert!(matches!(e, MemoryError::Backend { .. }));
        r.check_consistent(&be.slots()).unwrap();
        assert_eq!(r.generation(), snap.generation());
        // Backend failure on the create half of a move: rolled back.
        be.fail_after(1);
        assert!(r.move_slot(a, 0x80_0000).is_err());
        r.check_consistent(&be.slots()).unwrap();
        assert_eq!(r.slot(a).unwrap().gpa, 0x10_0000);
        // Failure on both create and restore: registry follows KVM (slot gone).
        let b = r.add_ram(0x90_0000, 0x1000, SlotFlags::NONE).unwrap();
        be.fail_calls(1, 2);
        let e = r.resize(b, 0x3000).unwrap_err();
        assert!(matches!(e, MemoryError::RollbackFailed { .. }), "{e}");
        assert!(r.slot(b).is_none());
        r.check_consistent(&be.slots()).unwrap();
        // Backend failure on remove: slot kept.
        be.fail_after(0);
        assert!(r.remove(a).is_err());
        r.check_consistent(&be.slots()).unwrap();
        assert!(matches!(
            r.remove(99),
            Err(MemoryError::NoSuchSlot { slot: 99 })
        ));
    }

    #[test]
    fn resize_move_dirty_log_and_data() {
        let (be, r) = reg(8);
        let a = r.add_ram(0x10_0000, 0x2000, SlotFlags::NONE).unwrap();
        let b = r.add_ram(0x20_0000, 0x1000, SlotFlags::READONLY).unwrap();
        let s = r.slot(a).unwrap();
        // SAFETY: the slot's mapping is registry-owned, live and 0x2000 bytes long.
        unsafe { *(s.host_addr as *mut u8).add(5) = 42 };
        r.resize(a, 0x8000).unwrap();
        let s2 = r.slot(a).unwrap();
        assert_eq!(s2.size, 0x8000);
        // SAFETY: as above, the new mapping is 0x8000 bytes.
        assert_eq!(
            unsafe { *(s2.host_addr as *const u8).add(5) },
            42,
            "contents kept"
        );
        assert!(r.resize(a, 0x10_1000).is_err(), "would overlap slot b");
        r.resize(a, 0x1000).unwrap();
        r.move_slot(b, 0x30_0000).unwrap();
        assert_eq!(r.load().lookup(0x30_0000).unwrap().id, b);
        assert!(r.load().lookup(0x20_0000).is_none());
        r.set_dirty_log(a, true).unwrap();
        assert!(r.slot(a).unwrap().flags.log_dirty());
        r.check_consistent(&be.slots()).unwrap();
        let g = r.generation();
        r.remove(a).unwrap();
        r.remove(b).unwrap();
        assert_eq!(r.generation(), g + 2);
        assert_eq!(r.table_capacity(), 0);
        r.check_consistent(&be.slots()).unwrap();
    }

    #[test]
    fn add_mapped_split_packs_ranges_and_rolls_back() {
        let (be, r) = reg(16);
        let g = 1u64 << 30;
        let ram = [(0, 3 * g), (4 * g, 2 * g)];
        let host = 0x7f00_0000_0000u64;
        // SAFETY: fake backend; host memory is never touched.
        let ids = unsafe { r.add_mapped_split(&ram, host, 5, SlotFlags::NONE) }.unwrap();
        assert_eq!(ids.len(), 5);
        let snap = r.load();
        assert_eq!(snap.lookup(4 * g).unwrap().host_addr, host + 3 * g);
        assert_eq!(
            snap.lookup(g + 5).unwrap().host_addr_of(g + 5),
            host + g + 5
        );
        assert!(snap.lookup(3 * g).is_none());
        for id in ids {
            r.remove(id).unwrap();
        }
        // A failure on the fourth slot removes the first three again.
        be.fail_after(3);
        assert!(unsafe { r.add_mapped_split(&ram, host, 5, SlotFlags::NONE) }.is_err());
        assert!(r.is_empty());
        r.check_consistent(&be.slots()).unwrap();
        let e = unsafe { r.add_mapped_split(&ram, host, 17, SlotFlags::NONE) }.unwrap_err();
        assert!(matches!(e, MemoryError::TooManySlots { .. }), "{e}");
    }

    #[test]
    fn held_snapshots_never_change() {
        let (be, r) = reg(16);
        let a = r.add_ram(0x1000, 0x1000, SlotFlags::NONE).unwrap();
        let held = r.snapshot();
        let guard = r.load();
        let before: Vec<Slot> = held.slots();
        for k in 0..6u64 {
            let id = r
                .add_ram(0x10_0000 + k * 0x1000, 0x1000, SlotFlags::NONE)
                .unwrap();
            if k % 2 == 0 {
                r.remove(id).unwrap();
            }
        }
        r.move_slot(a, 0x20_0000).unwrap();
        assert_eq!(held.slots(), before);
        assert_eq!(guard.slots(), before);
        assert_eq!(held.generation(), 1);
        drop(guard);
        drop(held);
        // With no readers left, updates reuse the spare snapshot; results stay right.
        for k in 0..6u64 {
            r.add_ram(0x30_0000 + k * 0x1000, 0x1000, SlotFlags::READONLY)
                .unwrap();
            r.check_consistent(&be.slots()).unwrap();
        }
        let s = r.load();
        assert_eq!(s.lookup(0x30_5000).map(|s| s.flags.readonly()), Some(true));
        assert_eq!(s.lookup(0x20_0000).map(|s| s.id), Some(a));
        assert_eq!(s.len(), r.len());
    }

    #[test]
    fn drop_deletes_slots_from_kvm() {
        let (be, r) = reg(8);
        r.add_ram(0x1000, 0x1000, SlotFlags::NONE).unwrap();
        r.add_ram(0x8000, 0x2000, SlotFlags::READONLY).unwrap();
        assert_eq!(be.slots().len(), 2);
        drop(r);
        assert!(be.slots().is_empty());
    }

    #[test]
    fn split_layout_pieces() {
        let g = 1u64 << 30;
        let ranges = [(0, 3 * g), (4 * g, g)];
        let s = split_layout(&ranges, 4).unwrap();
        assert_eq!(s, vec![(0, g), (g, g), (2 * g, g), (4 * g, g)]);
        let s = split_layout(&ranges, 1000).unwrap();
        assert_eq!(s.len(), 1000);
        let max = s.iter().map(|p| p.1).max().unwrap();
        let min = s.iter().map(|p| p.1).min().unwrap();
        assert!(max - min <= 2 * PAGE_SIZE * 1024, "{max:#x} {min:#x}");
        let total: u64 = s.iter().map(|p| p.1).sum();
        assert_eq!(total, 4 * g);
        assert!(
            split_layout(&ranges, 1).is_err(),
            "one slot cannot cover a hole"
        );
        assert!(split_layout(&[(0, 0x3000)], 4).is_err());
        assert_eq!(split_layout(&[(0, 0x3000)], 3).unwrap().len(), 3);
        assert!(split_layout(&[(0x800, 0x3000)], 1).is_err());
    }
}

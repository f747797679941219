//! Range indexes for the memslot mirror, all behind one interface with static dispatch.
//!
//! | name          | structure                                   | history                        |
//! |---------------|---------------------------------------------|--------------------------------|
//! | `linear`      | `Vec` in insertion order, scanned           | KVM before 2011                |
//! | `size-sorted` | `Vec` sorted by size (largest first)        | Avi Kivity / Xiao 2011         |
//! | `binary`      | `Vec` sorted by address + per-reader hint   | Igor Mammedov 2014 (`lru_slot`)|
//! | `btree`       | `std::collections::BTreeMap` range query    | Firecracker, Cloud Hypervisor  |
//! | `wbtree`      | [`WbTree`](super::wbtree::WbTree)           | Alex Williamson's 2011 RFC     |
//!
//! Every lookup reports the number of nodes (entries, probes) it visited, so the experiment
//! can compare the structures independently of the machine. The `binary` index's last-hit
//! entry is a `hint` owned by the caller (one per reader thread), not shared state in the
//! index: a shared "last used" slot would be a cache line written by every vCPU.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use super::wbtree::WbTree;

/// A half-open address range `[start, end)` that an index can hold.
pub trait RangeItem: Clone {
    fn start(&self) -> u64;
    fn end(&self) -> u64;
    /// The weight used by size-aware indexes: the range's length.
    fn weight(&self) -> u64 {
        self.end() - self.start()
    }
    fn contains(&self, addr: u64) -> bool {
        self.start() <= addr && addr < self.end()
    }
}

/// An insertion was rejected: the new range is empty or overlaps `[start, end)`.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[error("range overlaps existing range [{start:#x}, {end:#x}) or is empty")]
pub struct Overlap {
    pub start: u64,
    pub end: u64,
}

/// The interface every index implements.
pub trait RangeIndex<T: RangeItem>: Clone + Default {
    /// Insert `item`; rejects empty ranges and overlaps, leaving the index unchanged.
    fn insert(&mut self, item: T) -> Result<(), Overlap>;
    /// Remove the range that starts exactly at `start`.
    fn remove(&mut self, start: u64) -> Option<T>;
    /// Find the range containing `addr`. `hint` is per-reader scratch (only `binary` uses it,
    /// as its last-hit entry; pass 0 initially). Returns (item, nodes visited).
    fn lookup(&self, addr: u64, hint: &mut u32) -> (Option<&T>, u32);
    /// Some range intersecting `[start, end)`.
    fn overlapping(&self, start: u64, end: u64) -> Option<&T>;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Heap bytes held by the index (from capacities; for `btree` an estimate).
    fn heap_bytes(&self) -> usize;
    /// All items in address order.
    fn items(&self) -> Vec<T>;
}

fn check_nonempty<T: RangeItem>(item: &T) -> Result<(), Overlap> {
    if item.end() <= item.start() {
        Err(Overlap {
            start: item.start(),
            end: item.end(),
        })
    } else {
        Ok(())
    }
}

fn scan_overlap<T: RangeItem>(v: &[T], start: u64, end: u64) -> Option<&T> {
    v.iter().find(|r| start < r.end() && r.start() < end)
}

// The two linear indexes differ only in the order they keep; they scan alike.

fn scan_remove<T: RangeItem>(v: &mut Vec<T>, start: u64) -> Option<T> {
    let pos = v.iter().position(|r| r.start() == start)?;
    Some(v.remove(pos))
}

/// First range containing `addr`, and the nodes visited (position + 1, or all on a miss).
#[inline]
fn scan_lookup<T: RangeItem>(v: &[T], addr: u64) -> (Option<&T>, u32) {
    match v.iter().position(|r| r.contains(addr)) {
        Some(i) => (Some(&v[i]), i as u32 + 1),
        None => (None, v.len() as u32),
    }
}

fn sorted_copy<T: RangeItem + Clone>(v: &[T]) -> Vec<T> {
    let mut out = v.to_vec();
    out.sort_by_key(|r| r.start());
    out
}

fn overlap_err<T: RangeItem>(o: &T) -> Overlap {
    Overlap {
        start: o.start(),
        end: o.end(),
    }
}

/// Insertion order, linear scan.
#[derive(Clone, Debug)]
pub struct LinearIndex<T>(Vec<T>);

impl<T> Default for LinearIndex<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T: RangeItem> RangeIndex<T> for LinearIndex<T> {
    fn insert(&mut self, item: T) -> Result<(), Overlap> {
        check_nonempty(&item)?;
        if let Some(o) = scan_overlap(&self.0, item.start(), item.end()) {
            return Err(overlap_err(o));
        }
        self.0.push(item);
        Ok(())
    }
    fn remove(&mut self, start: u64) -> Option<T> {
        scan_remove(&mut self.0, start)
    }
    #[inline]
    fn lookup(&self, addr: u64, _hint: &mut u32) -> (Option<&T>, u32) {
        scan_lookup(&self.0, addr)
    }
    fn overlapping(&self, start: u64, end: u64) -> Option<&T> {
        scan_overlap(&self.0, start, end)
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn heap_bytes(&self) -> usize {
        self.0.capacity() * std::mem::size_of::<T>()
    }
    fn items(&self) -> Vec<T> {
        sorted_copy(&self.0)
    }
}

/// Largest first (ties by address), linear scan: Avi's "sort it by size, descending, and
/// limit it by the number of instantiated slots".
#[derive(Clone, Debug)]
pub struct SizeSortedIndex<T>(Vec<T>);

impl<T> Default for SizeSortedIndex<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T: RangeItem> RangeIndex<T> for SizeSortedIndex<T> {
    fn insert(&mut self, item: T) -> Result<(), Overlap> {
        check_nonempty(&item)?;
        if let Some(o) = scan_overlap(&self.0, item.start(), item.end()) {
            return Err(overlap_err(o));
        }
        // Insertion pass rather than a full sort: Igor's 2014 fix for slot-update latency.
        let key = (std::cmp::Reverse(item.weight()), item.start());
        let pos = self
            .0
            .partition_point(|r| (std::cmp::Reverse(r.weight()), r.start()) < key);
        self.0.insert(pos, item);
        Ok(())
    }
    fn remove(&mut self, start: u64) -> Option<T> {
        scan_remove(&mut self.0, start)
    }
    #[inline]
    fn lookup(&self, addr: u64, _hint: &mut u32) -> (Option<&T>, u32) {
        scan_lookup(&self.0, addr)
    }
    fn overlapping(&self, start: u64, end: u64) -> Option<&T> {
        scan_overlap(&self.0, start, end)
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn heap_bytes(&self) -> usize {
        self.0.capacity() * std::mem::size_of::<T>()
    }
    fn items(&self) -> Vec<T> {
        sorted_copy(&self.0)
    }
}

/// Sorted by address; binary search after checking the reader's last hit.
#[derive(Clone, Debug)]
pub struct BinaryIndex<T>(Vec<T>);

impl<T> Default for BinaryIndex<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T: RangeItem> RangeIndex<T> for BinaryIndex<T> {
    fn insert(&mut self, item: T) -> Result<(), Overlap> {
        check_nonempty(&item)?;
        if let Some(o) = self.overlapping(item.start(), item.end()) {
            return Err(overlap_err(o));
        }
        let pos = self.0.partition_point(|r| r.start() < item.start());
        self.0.insert(pos, item);
        Ok(())
    }
    fn remove(&mut self, start: u64) -> Option<T> {
        let pos = self.0.binary_search_by_key(&start, |r| r.start()).ok()?;
        Some(self.0.remove(pos))
    }
    #[inline]
    fn lookup(&self, addr: u64, hint: &mut u32) -> (Option<&T>, u32) {
        // The hint is validated by containment alone: ranges are disjoint, so a range that
        // contains `addr` is the answer whatever snapshot the hint came from.
        if let Some(r) = self.0.get(*hint as usize) {
            if r.contains(addr) {
                return (Some(r), 1);
            }
        }
        // Branch-free halving (the compiler emits a conditional move): on random addresses
        // a branchy binary search mispredicts about every other step.
        let mut visited = 1u32; // the hint probe
        let mut size = self.0.len();
        if size == 0 {
            return (None, visited);
        }
        let mut base = 0usize;
        while size > 1 {
            let half = size / 2;
            let mid = base + half;
            base = if self.0[mid].start() <= addr {
                mid
            } else {
                base
            };
            size -= half;
            visited += 1;
        }
        visited += 1; // the final containment check
        let r = &self.0[base];
        if r.contains(addr) {
            *hint = base as u32;
            return (Some(r), visited);
        }
        (None, visited)
    }
    fn overlapping(&self, start: u64, end: u64) -> Option<&T> {
        let pos = self.0.partition_point(|r| r.start() < end);
        let r = self.0.get(pos.checked_sub(1)?)?;
        (r.end() > start).then_some(r)
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn heap_bytes(&self) -> usize {
        self.0.capacity() * std::mem::size_of::<T>()
    }
    fn items(&self) -> Vec<T> {
        self.0.clone()
    }
}

/// `BTreeMap<start, item>` with `range(..=addr).next_back()`, as the Rust VMMs do.
#[derive(Clone, Debug)]
pub struct BTreeIndex<T>(BTreeMap<u64, T>);

impl<T> Default for BTreeIndex<T> {
    fn default() -> Self {
        Self(BTreeMap::new())
    }
}

impl<T: RangeItem> RangeIndex<T> for BTreeIndex<T> {
    fn insert(&mut self, item: T) -> Result<(), Overlap> {
        check_nonempty(&item)?;
        if let Some(o) = self.overlapping(item.start(), item.end()) {
            return Err(overlap_err(o));
        }
        self.0.insert(item.start(), item);
        Ok(())
    }
    fn remove(&mut self, start: u64) -> Option<T> {
        self.0.remove(&start)
    }
    /// The B-tree's internals are not instrumented: the node count is reported as the
    /// number of levels of a B-tree with this many keys (`B = 6`, full nodes of 11 keys at
    /// best, 5 at worst: we use the average fan-out of 8), an estimate.
    #[inline]
    fn lookup(&self, addr: u64, _hint: &mut u32) -> (Option<&T>, u32) {
        let found = self
            .0
            .range(..=addr)
            .next_back()
            .map(|(_, r)| r)
            .filter(|r| addr < r.end());
        (found, btree_levels(self.0.len()))
    }
    fn overlapping(&self, start: u64, end: u64) -> Option<&T> {
        let (_, r) = self.0.range(..end).next_back()?;
        (r.end() > start).then_some(r)
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn heap_bytes(&self) -> usize {
        // std's leaf node: 11 keys + 11 values + parent pointer + lengths; internal nodes add
        // 12 edges. Assume nodes 2/3 full on average.
        let per_entry = std::mem::size_of::<u64>() + std::mem::size_of::<T>();
        let nodes = self.0.len().div_ceil(7);
        nodes * (11 * per_entry + 16)
    }
    fn items(&self) -> Vec<T> {
        self.0.values().cloned().collect()
    }
}

fn btree_levels(n: usize) -> u32 {
    let mut levels = 1;
    let mut cap = 11usize;
    while cap < n {
        cap = cap.saturating_mul(8);
        levels += 1;
    }
    levels
}

impl<T: RangeItem> RangeIndex<T> for WbTree<T> {
    fn insert(&mut self, item: T) -> Result<(), Overlap> {
        WbTree::insert(self, item)
    }
    fn remove(&mut self, start: u64) -> Option<T> {
        WbTree::remove(self, start)
    }
    #[inline]
    fn lookup(&self, addr: u64, _hint: &mut u32) -> (Option<&T>, u32) {
        WbTree::lookup(self, addr)
    }
    fn overlapping(&self, start: u64, end: u64) -> Option<&T> {
        WbTree::overlapping(self, start, end)
    }
    fn len(&self) -> usize {
        WbTree::len(self)
    }
    fn heap_bytes(&self) -> usize {
        WbTree::heap_bytes(self)
    }
    fn items(&self) -> Vec<T> {
        WbTree::items(self).into_iter().cloned().collect()
    }
}

/// Which index the memslot mirror uses (`--slot-index NAME`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum SlotIndexKind {
    Linear,
    SizeSorted,
    Binary,
    Btree,
    #[default]
    Wbtree,
}

impl SlotIndexKind {
    pub const ALL: [SlotIndexKind; 5] = [
        SlotIndexKind::Linear,
        SlotIndexKind::SizeSorted,
        SlotIndexKind::Binary,
        SlotIndexKind::Btree,
        SlotIndexKind::Wbtree,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SlotIndexKind::Linear => "linear",
            SlotIndexKind::SizeSorted => "size-sorted",
            SlotIndexKind::Binary => "binary",
            SlotIndexKind::Btree => "btree",
            SlotIndexKind::Wbtree => "wbtree",
        }
    }
}

impl fmt::Display for SlotIndexKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("unknown slot index {0:?}; use one of: linear, size-sorted, binary, btree, wbtree")]
pub struct UnknownSlotIndex(pub String);

impl FromStr for SlotIndexKind {
    type Err = UnknownSlotIndex;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| UnknownSlotIndex(s.to_string()))
    }
}

/// One of the indexes, chosen at run time, dispatched with a `match` (no `dyn`).
#[derive(Clone, Debug)]
pub enum AnyIndex<T> {
    Linear(LinearIndex<T>),
    SizeSorted(SizeSortedIndex<T>),
    Binary(BinaryIndex<T>),
    Btree(BTreeIndex<T>),
    Wbtree(WbTree<T>),
}

impl<T> Default for AnyIndex<T> {
    fn default() -> Self {
        AnyIndex::Wbtree(WbTree::default())
    }
}

macro_rules! dispatch {
    ($self:expr, $i:ident => $e:expr) => {
        match $self {
            AnyIndex::Linear($i) => $e,
            AnyIndex::SizeSorted($i) => $e,
            AnyIndex::Binary($i) => $e,
            AnyIndex::Btree($i) => $e,
            AnyIndex::Wbtree($i) => $e,
        }
    };
}

impl<T: RangeItem> AnyIndex<T> {
    pub fn new(kind: SlotIndexKind) -> Self {
        match kind {
            SlotIndexKind::Linear => AnyIndex::Linear(LinearIndex::default()),
            SlotIndexKind::SizeSorted => AnyIndex::SizeSorted(SizeSortedIndex::default()),
            SlotIndexKind::Binary => AnyIndex::Binary(BinaryIndex::default()),
            SlotIndexKind::Btree => AnyIndex::Btree(BTreeIndex::default()),
            SlotIndexKind::Wbtree => AnyIndex::Wbtree(WbTree::default()),
        }
    }

    /// Re-shape the index for lookups after a bulk change (only the wbtree has anything to
    /// do: a full size-biased rebuild).
    pub fn optimize(&mut self) {
        if let AnyIndex::Wbtree(t) = self {
            t.rebuild_all();
        }
    }

    pub fn kind(&self) -> SlotIndexKind {
        match self {
            AnyIndex::Linear(_) => SlotIndexKind::Linear,
            AnyIndex::SizeSorted(_) => SlotIndexKind::SizeSorted,
            AnyIndex::Binary(_) => SlotIndexKind::Binary,
            AnyIndex::Btree(_) => SlotIndexKind::Btree,
            AnyIndex::Wbtree(_) => SlotIndexKind::Wbtree,
        }
    }
}

impl<T: RangeItem> RangeIndex<T> for AnyIndex<T> {
    fn insert(&mut self, item: T) -> Result<(), Overlap> {
        dispatch!(self, i => i.insert(item))
    }
    fn remove(&mut self, start: u64) -> Option<T> {
        dispatch!(self, i => RangeIndex::remove(i, start))
    }
    #[inline]
    fn lookup(&self, addr: u64, hint: &mut u32) -> (Option<&T>, u32) {
        dispatch!(self, i => RangeIndex::lookup(i, addr, hint))
    }
    fn overlapping(&self, start: u64, end: u64) -> Option<&T> {
        dispatch!(self, i => RangeIndex::overlapping(i, start, end))
    }
    fn len(&self) -> usize {
        dispatch!(self, i => RangeIndex::len(i))
    }
    fn heap_bytes(&self) -> usize {
        dispatch!(self, i => RangeIndex::heap_bytes(i))
    }
    fn items(&self) -> Vec<T> {
        dispatch!(self, i => RangeIndex::items(i))
    }
}

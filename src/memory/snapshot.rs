//! What readers see: an immutable [`MemSnapshot`] of the memslots at one generation, and
//! each reader's own lookup counters ([`SlotProbe`]).

use std::sync::Arc;

use super::index::{AnyIndex, RangeIndex, SlotIndexKind};
use super::mapping::HostMapping;
use super::stats::IndexStats;
use super::Slot;

/// An immutable view of the memslots at one generation.
#[derive(Clone, Debug)]
pub struct MemSnapshot {
    // The registry (the only writer) builds and updates snapshots in place.
    pub(super) generation: u64,
    pub(super) index: AnyIndex<Slot>,
    /// Keeps registry-owned host memory mapped while this snapshot is alive.
    pub(super) keep: Vec<Arc<HostMapping>>,
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
    pub(super) fn empty(kind: SlotIndexKind) -> Self {
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

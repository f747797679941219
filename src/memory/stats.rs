//! Statistics for the memory subsystem, serialisable to JSON and read back (missing
//! fields as their defaults). Nested objects so that new
//! groups can be added without breaking readers.

use serde::{Deserialize, Serialize};

use super::index::SlotIndexKind;
use super::registry::SlotRegistry;

/// Lookups in one slot index.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct IndexStats {
    /// The index kind (`linear`, `size-sorted`, `binary`, `btree`, `wbtree`).
    pub index: Option<SlotIndexKind>,
    pub lookups: u64,
    pub hits: u64,
    pub misses: u64,
    /// Sum of nodes (entries, probes) visited; `btree` reports estimated levels.
    pub nodes_total: u64,
    pub mean_nodes: f64,
    pub max_nodes: u32,
}

impl IndexStats {
    pub fn from_counts(
        kind: SlotIndexKind,
        lookups: u64,
        hits: u64,
        nodes_total: u64,
        max_nodes: u32,
    ) -> Self {
        let mut s = Self {
            index: Some(kind),
            lookups,
            hits,
            misses: lookups - hits.min(lookups),
            nodes_total,
            mean_nodes: 0.0,
            max_nodes,
        };
        s.update_mean();
        s
    }

    fn update_mean(&mut self) {
        self.mean_nodes = if self.lookups == 0 {
            0.0
        } else {
            self.nodes_total as f64 / self.lookups as f64
        };
    }

    pub fn merge(&mut self, o: &IndexStats) {
        self.index = self.index.or(o.index);
        self.lookups += o.lookups;
        self.hits += o.hits;
        self.misses += o.misses;
        self.nodes_total += o.nodes_total;
        self.max_nodes = self.max_nodes.max(o.max_nodes);
        self.update_mean();
    }
}

/// The per-vCPU MMIO-miss cache (summed over vCPUs after `merge`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct MissCacheStats {
    pub enabled: bool,
    pub entries: usize,
    pub hits: u64,
    /// Lookups the cache could not answer (invalidations included).
    pub misses: u64,
    /// Entries found with a stale generation and dropped.
    pub invalidations: u64,
}

/// MMIO exits as routed by the `MmioRouter`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct MmioStats {
    pub exits: u64,
    pub device: u64,
    /// Reads outside every device and slot (answered with all-ones).
    pub unmapped_reads: u64,
    pub unmapped_writes: u64,
    /// Writes to read-only slots (ROM) with no device behind them (dropped).
    pub readonly_writes: u64,
}

/// Slot-index lookups, by where they came from.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct LookupStats {
    /// Mirror lookups on the MMIO exit path (only on miss-cache misses).
    pub exit: IndexStats,
    /// GPA → host translations for device DMA.
    pub dma: IndexStats,
}

/// Everything, as one JSON object:
/// `{ "slot_index": .., "slots": .., "generation": .., "lookups": {"exit": {..}, "dma": {..}},
///    "miss_cache": {..}, "mmio": {..} }`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct MemoryStats {
    pub slot_index: Option<SlotIndexKind>,
    pub slots: usize,
    pub generation: u64,
    pub lookups: LookupStats,
    pub miss_cache: MissCacheStats,
    pub mmio: MmioStats,
}

impl MemoryStats {
    /// Registry-level facts; add per-vCPU router stats and DMA stats with `merge`.
    pub fn for_registry(reg: &SlotRegistry) -> Self {
        Self {
            slot_index: Some(reg.index_kind()),
            slots: reg.len(),
            generation: reg.generation(),
            ..Default::default()
        }
    }

    /// Add another part (a vCPU router's stats, a DMA handle's stats) into this one.
    pub fn merge(&mut self, o: &MemoryStats) {
        self.slot_index = self.slot_index.or(o.slot_index);
        self.slots = self.slots.max(o.slots);
        self.generation = self.generation.max(o.generation);
        self.lookups.exit.merge(&o.lookups.exit);
        self.lookups.dma.merge(&o.lookups.dma);
        let (c, oc) = (&mut self.miss_cache, &o.miss_cache);
        c.enabled |= oc.enabled;
        c.entries = c.entries.max(oc.entries);
        c.hits += oc.hits;
        c.misses += oc.misses;
        c.invalidations += oc.invalidations;
        let (m, om) = (&mut self.mmio, &o.mmio);
        m.exits += om.exits;
        m.device += om.device;
        m.unmapped_reads += om.unmapped_reads;
        m.unmapped_writes += om.unmapped_writes;
        m.readonly_writes += om.readonly_writes;
    }
}

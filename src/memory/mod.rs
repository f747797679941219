//! Guest memory: the memslot registry, its host-side mirror (wbtree and the other
//! slot indexes), and the MMIO-miss cache.
//!
//! - [`SlotRegistry`] owns the KVM memory slots (through a [`SlotBackend`]), grows the slot
//!   table on demand up to `KVM_CAP_NR_MEMSLOTS`, and publishes an immutable
//!   [`MemSnapshot`] through `arc_swap` after every change. Readers never lock.
//! - The snapshot's index is one of [`SlotIndexKind`]: `linear`, `size-sorted`, `binary`,
//!   `btree` or `wbtree` (default), behind [`AnyIndex`] with static dispatch.
//! - [`MmioRouter`] is the per-vCPU MMIO exit router with its direct-mapped page cache.
//! - [`GuestRamDma`] implements `wbvmm_devices::GuestDma` over the mirror.
//! - [`MemoryStats`] is the JSON-serialisable report.
//!
//! # Wiring (for the VMM)
//!
//! ```text
//! // Setup (main thread). `--slot-index NAME` parses with `SlotIndexKind::from_str`.
//! let vm = Arc::new(kvm.create_vm()?);
//! let reg = Arc::new(SlotRegistry::new(vm.clone(), slot_index));
//! // Guest RAM: one host mmap the VMM owns, split over `--mem-slots N` slots with a hole
//! // below 4 GiB; ranges are packed back to back in the host mapping.
//! let ids = unsafe { reg.add_mapped_split(&[(0, low), (4 << 30, high)], host_base, n, SlotFlags::NONE)? };
//! let rom = reg.add_ram(0xfffc_0000, 0x4_0000, SlotFlags::READONLY)?; // registry-owned
//! let dma: Arc<dyn GuestDma> = Arc::new(GuestRamDma::new(reg.clone())); // one per device
//!
//! // vCPU thread: one router per vCPU, `--mmio-cache on|off`.
//! let mut router = MmioRouter::new(mmio_cache);
//! VcpuExit::MmioRead(addr, data) => {
//!     let snap = reg.load();
//!     match router.route_mmio(addr, false, &snap, &mmio_bus) {
//!         MmioRoute::Device(r) => r.device.read(r.base, addr - r.base, data),
//!         _ => fill_open_bus(data), // counted and rate-limit logged by the router
//!     }
//! }
//! VcpuExit::MmioWrite(addr, data) => {
//!     let snap = reg.load();
//!     if let MmioRoute::Device(r) = router.route_mmio(addr, true, &snap, &mmio_bus) {
//!         r.device.write(r.base, addr - r.base, data);
//!     } // Unmapped / ReadOnlyRam: dropped (counted)
//! }
//!
//! // Stats (JSON): registry facts + each vCPU's router + each DMA handle.
//! let mut st = MemoryStats::for_registry(&reg);
//! st.merge(&router.stats());
//! st.lookups.dma.merge(&dma_handle.stats());
//! serde_json::to_value(&st)?;
//! ```

pub mod backend;
pub mod cache;
pub mod dma;
#[cfg(any(test, feature = "test-doubles"))]
pub mod fake_backend;
pub mod guest_ram;
pub mod index;
pub mod mapping;
pub mod registry;
pub mod snapshot;
pub mod split;
pub mod stats;
pub mod wbtree;

pub use backend::SlotBackend;
pub use cache::{
    fill_open_bus, Generation, MmioRoute, MmioRouter, PageCache, RateLimitedLog, PAGE_CACHE_ENTRIES,
};
pub use dma::GuestRamDma;
#[cfg(any(test, feature = "test-doubles"))]
pub use fake_backend::FakeBackend;
pub use index::{
    AnyIndex, BTreeIndex, BinaryIndex, LinearIndex, Overlap, RangeIndex, RangeItem,
    SizeSortedIndex, SlotIndexKind, UnknownSlotIndex,
};
pub use mapping::HostMapping;
pub use registry::SlotRegistry;
pub use snapshot::{MemSnapshot, SlotProbe};
pub use split::split_layout;
pub use stats::{IndexStats, LookupStats, MemoryStats, MissCacheStats, MmioStats};
pub use wbtree::WbTree;

use thiserror::Error;

/// Guest pages are 4 KiB; KVM requires slot addresses and sizes to be multiples of it.
pub const PAGE_SIZE: u64 = 4096;
pub const PAGE_SHIFT: u32 = 12;

/// KVM memslot flags we support (`KVM_MEM_LOG_DIRTY_PAGES`, `KVM_MEM_READONLY`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub struct SlotFlags(u32);

impl SlotFlags {
    pub const NONE: SlotFlags = SlotFlags(0);
    pub const LOG_DIRTY: SlotFlags = SlotFlags(kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES);
    pub const READONLY: SlotFlags = SlotFlags(kvm_bindings::KVM_MEM_READONLY);

    const KNOWN: u32 = kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES | kvm_bindings::KVM_MEM_READONLY;

    /// Flags from raw KVM bits; `None` if an unsupported bit is set.
    pub fn from_bits(bits: u32) -> Option<Self> {
        (bits & !Self::KNOWN == 0).then_some(SlotFlags(bits))
    }
    pub fn bits(self) -> u32 {
        self.0
    }
    pub fn readonly(self) -> bool {
        self.0 & Self::READONLY.0 != 0
    }
    pub fn log_dirty(self) -> bool {
        self.0 & Self::LOG_DIRTY.0 != 0
    }
    pub fn with(self, other: SlotFlags, on: bool) -> Self {
        if on {
            SlotFlags(self.0 | other.0)
        } else {
            SlotFlags(self.0 & !other.0)
        }
    }
}

impl std::ops::BitOr for SlotFlags {
    type Output = SlotFlags;
    fn bitor(self, rhs: SlotFlags) -> SlotFlags {
        SlotFlags(self.0 | rhs.0)
    }
}

/// A KVM slot id.
pub type SlotId = u32;

/// One registered memory slot as the mirror sees it (32 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Slot {
    /// Guest-physical start.
    pub gpa: u64,
    pub size: u64,
    /// Host virtual address backing `gpa`.
    pub host_addr: u64,
    pub id: SlotId,
    pub flags: SlotFlags,
}

impl Slot {
    /// Host address of `gpa`, which must lie inside the slot.
    #[inline]
    pub fn host_addr_of(&self, gpa: u64) -> u64 {
        debug_assert!(self.contains(gpa));
        self.host_addr + (gpa - self.gpa)
    }
}

impl RangeItem for Slot {
    #[inline]
    fn start(&self) -> u64 {
        self.gpa
    }
    #[inline]
    fn end(&self) -> u64 {
        // Registry validation guarantees gpa + size does not wrap.
        self.gpa + self.size
    }
}

/// Errors from the memslot registry. Messages say what failed and what to do about it.
#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("cannot add memory at {gpa:#x}: all {limit} KVM memory slots are in use; remove a slot or use fewer --mem-slots")]
    TooManySlots { gpa: u64, limit: u32 },
    #[error("memory range {gpa:#x}+{size:#x} overlaps slot {slot} at {slot_gpa:#x}+{slot_size:#x}; choose a free guest-physical range or remove that slot first")]
    Overlap {
        gpa: u64,
        size: u64,
        slot: SlotId,
        slot_gpa: u64,
        slot_size: u64,
    },
    #[error("memory slot at {gpa:#x} has size 0; give a non-zero size (a multiple of 4 KiB)")]
    ZeroSize { gpa: u64 },
    #[error("memory range {gpa:#x}+{size:#x} is not 4 KiB aligned; round the address and size to multiples of 0x1000")]
    Unaligned { gpa: u64, size: u64 },
    #[error("host memory at {host_addr:#x} for guest address {gpa:#x} is not page aligned; pass an address returned by mmap")]
    UnalignedHost { gpa: u64, host_addr: u64 },
    #[error("memory range {gpa:#x}+{size:#x} runs past the end of the address space; lower the address or size")]
    AddressOverflow { gpa: u64, size: u64 },
    #[error("unsupported memory slot flags {bits:#x}; only KVM_MEM_LOG_DIRTY_PAGES (1) and KVM_MEM_READONLY (2) are supported")]
    BadFlags { bits: u32 },
    #[error("no memory slot {slot}; list the registered slots with SlotRegistry::slots()")]
    NoSuchSlot { slot: SlotId },
    #[error("KVM rejected memory slot {slot} ({gpa:#x}+{size:#x}, flags {flags:#x}); check KVM_CAP_READONLY_MEM for read-only slots and the host's memory limits")]
    Backend {
        slot: SlotId,
        gpa: u64,
        size: u64,
        flags: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("KVM rejected a change to slot {slot} and then rejected restoring it; the guest lost that memory range, so stop the VM")]
    RollbackFailed {
        slot: SlotId,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot map {size:#x} bytes of host memory for guest address {gpa:#x}; lower the guest RAM size or raise the host's memory limits")]
    Mmap {
        gpa: u64,
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("slot {slot} uses caller-owned memory and cannot grow in place; remove it and add a larger mapping with add_mapped")]
    CannotGrowMapped { slot: SlotId },
    #[error("cannot split {pages} pages of guest RAM in {ranges} range(s) into {nslots} slots; use --mem-slots between {ranges} and {max}")]
    BadSplit {
        nslots: u64,
        ranges: usize,
        pages: u64,
        max: u64,
    },
}

//! Guest RAM: one anonymous host mapping holding every RAM range of the guest's
//! layout back to back, a vm-memory view of it for the kernel loader, and its
//! registration with KVM through the memslot registry.

use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use super::{HostMapping, MemoryError, SlotFlags, SlotRegistry};
use crate::layout::ram_ranges;

/// These can only come from a layout bug in wbvmm (`layout::ram_ranges` builds
/// sorted, disjoint, page-aligned ranges), never from the user's input.
#[derive(Debug, Error)]
pub enum GuestRamError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("vm-memory refused the view of guest RAM at {gpa:#x}+{size:#x} (a wbvmm bug: please report it)")]
    View {
        gpa: u64,
        size: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("guest RAM range at {gpa:#x} wraps around the address space (a wbvmm bug: please report it)")]
    RangeWraps { gpa: u64 },
    #[error("guest RAM ranges overlap or are out of order (a wbvmm bug: please report it)")]
    Ranges(#[source] vm_memory::GuestRegionCollectionError),
}

/// The host's physical RAM: guest memory is mapped without reservation, so a size
/// beyond this would only fail later, inside the guest.
pub fn host_ram_bytes() -> u64 {
    // SAFETY: sysinfo fills the struct we pass.
    unsafe {
        let mut si: libc::sysinfo = std::mem::zeroed();
        if libc::sysinfo(&mut si) == 0 {
            (si.totalram as u64).saturating_mul(u64::from(si.mem_unit))
        } else {
            u64::MAX
        }
    }
}

/// Guest RAM: one anonymous host mapping holding every RAM range back to back (the
/// memslot registry splits it over `--mem-slots` slots), not reserved up front.
pub struct GuestRam {
    /// A vm-memory view of the mapping, for the kernel loader. Declared first so it
    /// is dropped before the mapping it views.
    pub mem: GuestMemoryMmap,
    pub ranges: Vec<(u64, u64)>,
    mapping: HostMapping,
}

/// At most this much low memory is backed before the guest starts.
pub const PREFAULT_MAX: u64 = 16 << 20;

impl GuestRam {
    /// Map `mem_size` bytes of guest RAM, laid out by `layout::ram_ranges`.
    pub fn allocate(mem_size: u64) -> Result<Self, GuestRamError> {
        let ranges = ram_ranges(mem_size);
        let mapping = HostMapping::new(0, mem_size)?;
        let host = mapping.addr() as *mut u8;
        let mut regions = Vec::new();
        let mut offset = 0usize;
        for &(gpa, size) in &ranges {
            // SAFETY: [host + offset, + size) lies inside the mapping above, which
            // GuestRam keeps alive for as long as this view exists.
            let map = unsafe {
                MmapRegion::build_raw(
                    host.add(offset),
                    size as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                )
            }
            .map_err(|source| GuestRamError::View { gpa, size, source })?;
            regions.push(
                GuestRegionMmap::new(map, GuestAddress(gpa))
                    .ok_or(GuestRamError::RangeWraps { gpa })?,
            );
            offset += size as usize;
        }
        let mem = GuestMemoryMmap::from_regions(regions).map_err(GuestRamError::Ranges)?;
        Ok(GuestRam {
            mem,
            ranges,
            mapping,
        })
    }

    pub fn host_base(&self) -> u64 {
        self.mapping.addr()
    }

    /// Back the first `len` bytes of guest RAM (best effort).
    pub fn prefault(&self, len: u64) {
        let first = self.ranges.first().map(|r| r.1).unwrap_or(0);
        let len = len.min(first) as usize;
        // SAFETY: [addr, addr + len) lies in the first RAM range of our mapping.
        unsafe {
            libc::madvise(
                self.mapping.addr() as *mut libc::c_void,
                len,
                libc::MADV_POPULATE_WRITE,
            );
        }
    }

    /// Register the RAM with KVM through the registry, split over `nslots` slots.
    pub fn register(&self, reg: &SlotRegistry, nslots: u32) -> Result<(), MemoryError> {
        // SAFETY: the host range is this mapping, which outlives the registry (the
        // Vmm drops the registry first).
        unsafe { reg.add_mapped_split(&self.ranges, self.host_base(), nslots, SlotFlags::NONE) }?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    fn resident_pages(addr: u64, len: usize) -> usize {
        let mut vec = vec![0u8; len.div_ceil(4096)];
        // SAFETY: [addr, addr+len) is a mapping the test owns; mincore only fills vec.
        let r = unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        vec.iter().filter(|b| *b & 1 != 0).count()
    }

    #[test]
    fn ranges_are_packed_back_to_back_in_one_mapping() {
        let size = 64 << 20;
        let ram = GuestRam::allocate(size).unwrap();
        assert_eq!(ram.ranges, ram_ranges(size));
        assert_eq!(ram.mem.num_regions(), ram.ranges.len());
        // The loader's view writes the very bytes the host mapping holds.
        let (gpa, len) = *ram.ranges.last().unwrap();
        ram.mem
            .write_obj(0xabu8, GuestAddress(gpa + len - 1))
            .unwrap();
        let before: u64 = ram.ranges.iter().map(|r| r.1).sum::<u64>() - 1;
        // SAFETY: `before` < size, inside the mapping.
        let byte = unsafe { *((ram.host_base() + before) as *const u8) };
        assert_eq!(byte, 0xab);
    }

    #[test]
    fn prefault_backs_only_what_it_is_asked_to() {
        let ram = GuestRam::allocate(32 << 20).unwrap();
        assert_eq!(resident_pages(ram.host_base(), 16 << 20), 0);
        ram.prefault(4 << 20);
        assert_eq!(resident_pages(ram.host_base(), 4 << 20), 1024);
        // Beyond what a transparent huge page around the 4 MiB mark could cover.
        assert_eq!(resident_pages(ram.host_base() + (8 << 20), 8 << 20), 0);
    }

    #[test]
    fn host_ram_is_known() {
        let host = host_ram_bytes();
        assert!(host > 0 && host < u64::MAX, "{host}");
    }
}

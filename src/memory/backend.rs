//! How the registry talks to KVM: the [`SlotBackend`] trait and its implementation on the
//! `VmFd` (`KVM_SET_USER_MEMORY_REGION`, `KVM_CAP_NR_MEMSLOTS`).

use std::io;
use std::sync::Arc;

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

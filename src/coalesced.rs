//! KVM's coalesced MMIO/PIO ring: writes that need no answer (the UART's transmit
//! register) complete inside KVM without an exit and queue here; wbvmm replays them
//! in order before handling any other exit, and the I/O thread drains the ring every
//! few milliseconds so output from an idle guest still appears.

use std::ptr::NonNull;
use std::sync::atomic::{fence, Ordering};
use std::sync::Mutex;

use kvm_bindings::{kvm_coalesced_mmio, kvm_coalesced_mmio_ring, KVM_COALESCED_MMIO_PAGE_OFFSET};

/// One queued write.
pub struct CoalescedWrite {
    pub addr: u64,
    pub pio: bool,
    pub data: [u8; 8],
    pub len: usize,
}

pub struct CoalescedRing {
    ring: NonNull<kvm_coalesced_mmio_ring>,
    page_size: usize,
    /// One consumer at a time: vCPU threads and the I/O thread all drain.
    consumer: Mutex<()>,
}

// SAFETY: the ring page is shared memory written by KVM; this process only reads
// entries and advances `first`, serialised by `consumer`.
unsafe impl Send for CoalescedRing {}
unsafe impl Sync for CoalescedRing {}

impl CoalescedRing {
    /// Map the VM's ring through any of its vCPU fds.
    pub fn map(vcpu: &impl std::os::fd::AsRawFd) -> std::io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let offset =
            libc::off_t::from(KVM_COALESCED_MMIO_PAGE_OFFSET as i32) * page_size as libc::off_t;
        // SAFETY: KVM provides this page on vCPU fds when KVM_CAP_COALESCED_MMIO is
        // present; a failure is reported, not assumed away.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ring = NonNull::new(p.cast()).ok_or_else(std::io::Error::last_os_error)?;
        Ok(Self {
            ring,
            page_size,
            consumer: Mutex::new(()),
        })
    }

    fn capacity(&self) -> u32 {
        ((self.page_size - std::mem::size_of::<kvm_coalesced_mmio_ring>())
            / std::mem::size_of::<kvm_coalesced_mmio>()) as u32
    }

    /// Replay every queued write, oldest first. Returns how many there were.
    pub fn drain(&self, mut apply: impl FnMut(&CoalescedWrite)) -> usize {
        let ring = self.ring.as_ptr();
        // Every exit calls this: an empty ring costs two loads, not a lock.
        // SAFETY: `ring` points at the mapped page.
        if unsafe {
            std::ptr::addr_of!((*ring).first).read_volatile()
                == std::ptr::addr_of!((*ring).last).read_volatile()
        } {
            return 0;
        }
        let _one = self.consumer.lock().unwrap_or_else(|e| e.into_inner());
        let cap = self.capacity();
        let mut n = 0;
        loop {
            // SAFETY: `ring` points at the mapped page; KVM writes `last` after the
            // entry, so the entry read after an acquire fence is complete.
            let (first, last) = unsafe {
                (
                    std::ptr::addr_of!((*ring).first).read_volatile(),
                    std::ptr::addr_of!((*ring).last).read_volatile(),
                )
            };
            fence(Ordering::Acquire);
            if first == last || first >= cap {
                return n;
            }
            // SAFETY: `first < cap`, so the entry lies inside the page.
            let e = unsafe {
                (*ring)
                    .coalesced_mmio
                    .as_ptr()
                    .add(first as usize)
                    .read_volatile()
            };
            // SAFETY: the union's `pio` member is what KVM writes for PIO entries.
            let pio = unsafe { e.__bindgen_anon_1.pio } != 0;
            let len = (e.len as usize).min(8);
            apply(&CoalescedWrite {
                addr: e.phys_addr,
                pio,
                data: e.data,
                len,
            });
            fence(Ordering::Release);
            // SAFETY: advancing `first` hands the slot back to KVM.
            unsafe { std::ptr::addr_of_mut!((*ring).first).write_volatile((first + 1) % cap) };
            n += 1;
        }
    }
}

impl Drop for CoalescedRing {
    fn drop(&mut self) {
        // SAFETY: unmaps the page mapped in `map`.
        unsafe {
            libc::munmap(self.ring.as_ptr().cast(), self.page_size);
        }
    }
}

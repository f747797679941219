//! The host memory behind guest RAM: an anonymous mapping owned by whoever holds it.

use std::io;

use super::MemoryError;

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

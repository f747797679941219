//! Guest memory as a device sees it: DMA by guest-physical address.
//!
//! The VMM implements [`GuestDma`] over its memslot mirror, so a device can only
//! reach guest RAM (never device memory, never host memory). Tests use
//! [`VecGuestMemory`].

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq, Clone, Copy)]
pub enum DmaError {
    /// Some byte of [gpa, gpa+len) is not guest RAM (outside every RAM slot, or MMIO).
    #[error("guest DMA to {gpa:#x} (+{len} bytes) is outside guest RAM")]
    OutOfRange { gpa: u64, len: usize },
    /// The access would write a read-only slot (ROM).
    #[error("guest DMA write to {gpa:#x} (+{len} bytes) hits read-only memory")]
    ReadOnly { gpa: u64, len: usize },
}

/// Bounds-checked access to guest RAM by guest-physical address.
///
/// An access is all-or-nothing: on error nothing was written (implementations
/// check the whole range before copying).
pub trait GuestDma: Send + Sync {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DmaError>;
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), DmaError>;

    fn read_u32(&self, gpa: u64) -> Result<u32, DmaError> {
        let mut b = [0u8; 4];
        self.read(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn write_u32(&self, gpa: u64, v: u32) -> Result<(), DmaError> {
        self.write(gpa, &v.to_le_bytes())
    }
}

/// A fake guest memory for tests: one RAM range [base, base + len).
pub struct VecGuestMemory {
    base: u64,
    bytes: std::sync::Mutex<Vec<u8>>,
}

impl VecGuestMemory {
    pub fn new(base: u64, len: usize) -> Self {
        Self {
            base,
            bytes: std::sync::Mutex::new(vec![0; len]),
        }
    }

    fn range(
        &self,
        gpa: u64,
        len: usize,
        total: usize,
    ) -> Result<std::ops::Range<usize>, DmaError> {
        let err = DmaError::OutOfRange { gpa, len };
        let start = gpa.checked_sub(self.base).ok_or(err)?;
        let start = usize::try_from(start).map_err(|_| err)?;
        let end = start.checked_add(len).ok_or(err)?;
        if end > total {
            return Err(err);
        }
        Ok(start..end)
    }

    /// Snapshot of the whole memory, for assertions.
    pub fn contents(&self) -> Vec<u8> {
        self.bytes.lock().map(|b| b.clone()).unwrap_or_default()
    }
}

impl GuestDma for VecGuestMemory {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let mem = self.bytes.lock().expect("test memory lock poisoned");
        let r = self.range(gpa, buf.len(), mem.len())?;
        buf.copy_from_slice(&mem[r]);
        Ok(())
    }
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), DmaError> {
        let mut mem = self.bytes.lock().expect("test memory lock poisoned");
        let r = self.range(gpa, data.len(), mem.len())?;
        mem[r].copy_from_slice(data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vec_memory_bounds() {
        let m = VecGuestMemory::new(0x1000, 0x100);
        assert!(m.write(0x1000, &[1, 2, 3]).is_ok());
        assert_eq!(m.read_u32(0x1000).unwrap(), 0x030201);
        assert!(m.write(0x10fe, &[0; 4]).is_err());
        assert!(m.read(0xfff, &mut [0; 1]).is_err());
        assert!(m.read(u64::MAX, &mut [0; 2]).is_err());
    }
}

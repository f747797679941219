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
///
/// `read`/`write` copy bytes in no promised order or width. [`GuestDma::read_u32`]
/// and [`GuestDma::write_u32`] at a 4-aligned address must each be one 32-bit
/// access, as a chip's descriptor fetch and write-back are: descriptor words are a
/// protocol with a vCPU running beside the device. A byte copy may store a word
/// twice (glibc's memcpy of 4 bytes does), and a second store landing after the
/// guest took the descriptor back and re-armed it hands the guest's descriptor
/// back to the guest, a lap late; a torn read pairs a new OWN bit with an old
/// length.
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

/// One access a device made, as [`VecGuestMemory`] journals it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `read` / `write`: bytes in no promised order or width.
    Read {
        gpa: u64,
        len: usize,
    },
    Write {
        gpa: u64,
        len: usize,
    },
    /// `read_u32` / `write_u32`: one 32-bit access.
    ReadWord {
        gpa: u64,
    },
    WriteWord {
        gpa: u64,
    },
}

impl Access {
    /// Whether the access touches any byte of [gpa, gpa + len).
    pub fn touches(&self, gpa: u64, len: usize) -> bool {
        let (a, n) = match *self {
            Access::Read { gpa, len } | Access::Write { gpa, len } => (gpa, len),
            Access::ReadWord { gpa } | Access::WriteWord { gpa } => (gpa, 4),
        };
        a < gpa + len as u64 && gpa < a + n as u64
    }
}

/// A fake guest memory for tests: one RAM range [base, base + len). It can journal
/// the device's accesses, so tests can check their order and width.
pub struct VecGuestMemory {
    base: u64,
    bytes: std::sync::Mutex<Vec<u8>>,
    journal: std::sync::Mutex<Option<Vec<Access>>>,
}

impl VecGuestMemory {
    pub fn new(base: u64, len: usize) -> Self {
        Self {
            base,
            bytes: std::sync::Mutex::new(vec![0; len]),
            journal: std::sync::Mutex::new(None),
        }
    }

    /// Start journalling accesses (dropping any earlier journal).
    pub fn record(&self) {
        *self.journal.lock().expect("journal lock poisoned") = Some(Vec::new());
    }

    /// The accesses since [`VecGuestMemory::record`], in order; journalling stops.
    pub fn take_journal(&self) -> Vec<Access> {
        self.journal
            .lock()
            .expect("journal lock poisoned")
            .take()
            .unwrap_or_default()
    }

    fn log(&self, a: Access) {
        if let Some(j) = self.journal.lock().expect("journal lock poisoned").as_mut() {
            j.push(a);
        }
    }

    fn copy_out(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let mem = self.bytes.lock().expect("test memory lock poisoned");
        let r = self.range(gpa, buf.len(), mem.len())?;
        buf.copy_from_slice(&mem[r]);
        Ok(())
    }

    fn copy_in(&self, gpa: u64, data: &[u8]) -> Result<(), DmaError> {
        let mut mem = self.bytes.lock().expect("test memory lock poisoned");
        let r = self.range(gpa, data.len(), mem.len())?;
        mem[r].copy_from_slice(data);
        Ok(())
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
        self.log(Access::Read {
            gpa,
            len: buf.len(),
        });
        self.copy_out(gpa, buf)
    }
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), DmaError> {
        self.log(Access::Write {
            gpa,
            len: data.len(),
        });
        self.copy_in(gpa, data)
    }
    fn read_u32(&self, gpa: u64) -> Result<u32, DmaError> {
        self.log(Access::ReadWord { gpa });
        let mut b = [0u8; 4];
        self.copy_out(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn write_u32(&self, gpa: u64, v: u32) -> Result<(), DmaError> {
        self.log(Access::WriteWord { gpa });
        self.copy_in(gpa, &v.to_le_bytes())
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

//! Device models for wbvmm.
//!
//! Nothing in this crate issues KVM ioctls: devices see guest memory only through
//! [`GuestDma`], raise interrupts only through [`IrqLine`], and are reached only
//! through the [`bus::Bus`]. That keeps every model testable with a fake guest memory.

pub mod bus;
pub mod dma;
pub mod irq;
pub mod legacy;
pub mod net;
pub mod pci;

pub use bus::{Bus, BusDevice, BusError, DeviceId};
pub use dma::{DmaError, GuestDma, VecGuestMemory};
pub use irq::IrqLine;

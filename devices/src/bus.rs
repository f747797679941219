//! The device bus: address ranges (port I/O or MMIO) mapped to devices.
//!
//! Lookups take no lock: the range table is an immutable sorted snapshot published
//! through `arc_swap`, and writers (device insertion, PCI BAR moves) build a new one.
//! Every change bumps [`Bus::generation`], which the VMM's MMIO-miss cache uses to
//! drop stale entries.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use thiserror::Error;

/// A device reachable on a bus. Methods take `&self` so that the bus needs no lock;
/// each device synchronises its own state.
pub trait BusDevice: Send + Sync {
    /// Read `data.len()` bytes at `offset` from the start of the range the device was
    /// inserted with (`base` is that range's start, for devices mapped more than once).
    fn read(&self, base: u64, offset: u64, data: &mut [u8]);
    /// Write `data` at `offset` from the start of the device's range.
    fn write(&self, base: u64, offset: u64, data: &[u8]);
    /// A short name for statistics ("exits by device").
    fn name(&self) -> &'static str {
        "device"
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device range")]
    Overlap { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
    #[error("no device range starts at {base:#x}")]
    NotFound { base: u64 },
}

/// A small number for a device name, handed out when a device is put on a bus, so
/// that per-device exit counters are keyed by an integer (no string hashing on the
/// exit path) and the name is looked up only when a report is written. Devices with
/// the same [`BusDevice::name`] share an id: reports list exits by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(u32);

/// Every name a [`DeviceId`] stands for, indexed by the id. Only grows by distinct
/// `&'static str` names (device kinds), never by guest activity: a BAR the guest
/// moves or remaps keeps its device's id.
static DEVICE_NAMES: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());

impl DeviceId {
    /// The id of `name`, assigned on first use. Takes a lock: call it when registering
    /// a device, not per access.
    pub fn for_name(name: &'static str) -> DeviceId {
        let mut names = DEVICE_NAMES.lock().unwrap_or_else(|e| e.into_inner());
        let i = match names.iter().position(|n| *n == name) {
            Some(i) => i,
            None => {
                names.push(name);
                names.len() - 1
            }
        };
        DeviceId(u32::try_from(i).unwrap_or(u32::MAX))
    }

    /// The name this id was assigned for.
    pub fn name(self) -> &'static str {
        let names = DEVICE_NAMES.lock().unwrap_or_else(|e| e.into_inner());
        names.get(self.0 as usize).copied().unwrap_or("device")
    }
}

/// One mapped range.
#[derive(Clone)]
pub struct BusRange {
    pub base: u64,
    pub len: u64,
    pub device: Arc<dyn BusDevice>,
    /// The device's [`DeviceId`], for statistics.
    pub id: DeviceId,
}

impl BusRange {
    fn end(&self) -> u64 {
        self.base + self.len
    }
}

/// A routing result: the device and the range it was found in.
pub type Route = BusRange;

pub struct Bus {
    ranges: ArcSwap<Vec<BusRange>>,
    generation: AtomicU64,
    writer: Mutex<()>,
}

impl Default for Bus {
    fn default() -> Self {
        Self::new()
    }
}

impl Bus {
    pub fn new() -> Self {
        Self {
            ranges: ArcSwap::from_pointee(Vec::new()),
            generation: AtomicU64::new(0),
            writer: Mutex::new(()),
        }
    }

    /// Bumped on every insert, remove or move.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn insert(&self, device: Arc<dyn BusDevice>, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::BadRange { base, len });
        }
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.ranges.load();
        if cur.iter().any(|r| base < r.end() && r.base < base + len) {
            return Err(BusError::Overlap { base, len });
        }
        let id = DeviceId::for_name(device.name());
        let mut next: Vec<BusRange> = cur.as_ref().clone();
        next.push(BusRange {
            base,
            len,
            device,
            id,
        });
        next.sort_by_key(|r| r.base);
        self.publish(next);
        Ok(())
    }

    pub fn remove(&self, base: u64) -> Result<BusRange, BusError> {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.ranges.load();
        let pos = cur
            .iter()
            .position(|r| r.base == base)
            .ok_or(BusError::NotFound { base })?;
        let mut next: Vec<BusRange> = cur.as_ref().clone();
        let removed = next.remove(pos);
        self.publish(next);
        Ok(removed)
    }

    /// Move the range that starts at `old_base` to `new_base` atomically (PCI BAR
    /// reprogramming). On error the bus is unchanged.
    pub fn relocate(&self, old_base: u64, new_base: u64) -> Result<(), BusError> {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.ranges.load();
        let pos = cur
            .iter()
            .position(|r| r.base == old_base)
            .ok_or(BusError::NotFound { base: old_base })?;
        let len = cur[pos].len;
        if new_base.checked_add(len).is_none() {
            return Err(BusError::BadRange {
                base: new_base,
                len,
            });
        }
        if cur
            .iter()
            .enumerate()
            .any(|(i, r)| i != pos && new_base < r.end() && r.base < new_base + len)
        {
            return Err(BusError::Overlap {
                base: new_base,
                len,
            });
        }
        let mut next: Vec<BusRange> = cur.as_ref().clone();
        next[pos].base = new_base;
        next.sort_by_key(|r| r.base);
        self.publish(next);
        Ok(())
    }

    fn publish(&self, next: Vec<BusRange>) {
        self.ranges.store(Arc::new(next));
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Find the range containing `addr`. Lock-free.
    pub fn route(&self, addr: u64) -> Option<Route> {
        let ranges = self.ranges.load();
        let idx = ranges.partition_point(|r| r.base <= addr);
        let r = ranges.get(idx.checked_sub(1)?)?;
        (addr < r.end()).then(|| r.clone())
    }

    /// Dispatch a read; returns false (and leaves `data` untouched) when no device
    /// claims `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.route(addr) {
            Some(r) => {
                r.device.read(r.base, addr - r.base, data);
                true
            }
            None => false,
        }
    }

    /// Dispatch a write; returns false when no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.route(addr) {
            Some(r) => {
                r.device.write(r.base, addr - r.base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU8;

    struct Reg(AtomicU8);
    impl BusDevice for Reg {
        fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(self.0.load(Ordering::SeqCst).wrapping_add(offset as u8));
        }
        fn write(&self, _base: u64, _offset: u64, data: &[u8]) {
            self.0.store(data[0], Ordering::SeqCst);
        }
    }

    #[test]
    fn insert_route_overlap_relocate() {
        let bus = Bus::new();
        let d = Arc::new(Reg(AtomicU8::new(7)));
        bus.insert(d.clone(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(d.clone(), 0x10f, 2),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 2
            })
        );
        assert_eq!(
            bus.insert(d.clone(), 5, 0),
            Err(BusError::BadRange { base: 5, len: 0 })
        );
        bus.insert(d.clone(), 0x110, 0x10).unwrap();
        let g = bus.generation();
        let mut b = [0u8; 1];
        assert!(bus.read(0x103, &mut b));
        assert_eq!(b[0], 10);
        assert!(!bus.read(0xff, &mut b));
        assert!(!bus.read(0x120, &mut b));
        assert!(bus.write(0x111, &[1]));
        assert_eq!(d.0.load(Ordering::SeqCst), 1);
        assert_eq!(
            bus.relocate(0x100, 0x118),
            Err(BusError::Overlap {
                base: 0x118,
                len: 0x10
            })
        );
        bus.relocate(0x100, 0x200).unwrap();
        assert!(bus.generation() > g);
        assert!(!bus.read(0x100, &mut b));
        assert!(bus.read(0x20f, &mut b));
        bus.remove(0x200).unwrap();
        assert!(!bus.read(0x200, &mut b));
        assert!(bus.remove(0x200).is_err());
    }

    struct Named(&'static str);
    impl BusDevice for Named {
        fn read(&self, _base: u64, _offset: u64, _data: &mut [u8]) {}
        fn write(&self, _base: u64, _offset: u64, _data: &[u8]) {}
        fn name(&self) -> &'static str {
            self.0
        }
    }

    #[test]
    fn ranges_carry_a_device_id_by_name() {
        let bus = Bus::new();
        bus.insert(Arc::new(Named("bus-test-a")), 0x10, 4).unwrap();
        bus.insert(Arc::new(Named("bus-test-b")), 0x20, 4).unwrap();
        bus.insert(Arc::new(Named("bus-test-a")), 0x30, 4).unwrap();
        let id = |addr| bus.route(addr).unwrap().id;
        assert_eq!(id(0x11), id(0x33), "same name, same id");
        assert_ne!(id(0x11), id(0x21));
        assert_eq!(id(0x12).name(), "bus-test-a");
        assert_eq!(id(0x22).name(), "bus-test-b");
        // A moved range keeps its id.
        let before = id(0x20);
        bus.relocate(0x20, 0x40).unwrap();
        assert_eq!(id(0x40), before);
        assert_eq!(DeviceId::for_name("bus-test-b"), before);
    }
}

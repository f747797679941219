//! Exits counted per device and register offset, keyed by the bus's [`DeviceId`]s:
//! counting is a binary search over a short sorted table (no hashing, no allocation
//! once a register has been seen), and names are looked up only for the report.

use wbvmm_devices::DeviceId;

/// Which bus an exit went to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BusKind {
    Pio,
    Mmio,
}

impl BusKind {
    /// The name `--stats` uses: `pio`, `mmio`.
    pub const fn name(self) -> &'static str {
        match self {
            BusKind::Pio => "pio",
            BusKind::Mmio => "mmio",
        }
    }
}

/// Exits counted per device and register offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceKey {
    pub bus: BusKind,
    pub device: DeviceId,
    /// From the start of the device's range (the port, for unclaimed port I/O).
    pub offset: u64,
}

/// Counts by [`DeviceKey`], sorted by key. A guest reaches a few dozen registers, so
/// a sorted vector beats a hash map here: a lookup is a handful of integer compares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceExitCounts(Vec<(DeviceKey, u64)>);

impl DeviceExitCounts {
    /// Room for `n` distinct registers before the table grows.
    pub fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }

    #[inline]
    pub fn count(&mut self, key: DeviceKey) {
        self.add(key, 1);
    }

    #[inline]
    pub fn add(&mut self, key: DeviceKey, n: u64) {
        match self.0.binary_search_by(|(k, _)| k.cmp(&key)) {
            Ok(i) => self.0[i].1 += n,
            Err(i) => self.0.insert(i, (key, n)),
        }
    }

    pub fn merge(&mut self, o: &DeviceExitCounts) {
        for &(k, n) in &o.0 {
            self.add(k, n);
        }
    }

    pub fn get(&self, key: &DeviceKey) -> u64 {
        self.0
            .binary_search_by(|(k, _)| k.cmp(key))
            .map_or(0, |i| self.0[i].1)
    }

    /// `(key, count)` in key order.
    pub fn iter(&self) -> impl Iterator<Item = (DeviceKey, u64)> + '_ {
        self.0.iter().copied()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl IntoIterator for DeviceExitCounts {
    type Item = (DeviceKey, u64);
    type IntoIter = std::vec::IntoIter<(DeviceKey, u64)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_stay_sorted_and_merge() {
        let (a, b) = (
            DeviceId::for_name("counts-test-a"),
            DeviceId::for_name("counts-test-b"),
        );
        let key = |bus, device, offset| DeviceKey {
            bus,
            device,
            offset,
        };
        let mut c = DeviceExitCounts::default();
        for (bus, dev, off) in [
            (BusKind::Mmio, b, 4),
            (BusKind::Pio, a, 1),
            (BusKind::Mmio, b, 4),
            (BusKind::Pio, a, 0),
            (BusKind::Pio, b, 0),
        ] {
            c.count(key(bus, dev, off));
        }
        assert_eq!(c.len(), 4);
        assert_eq!(c.get(&key(BusKind::Mmio, b, 4)), 2);
        assert_eq!(c.get(&key(BusKind::Mmio, a, 4)), 0);
        let keys: Vec<DeviceKey> = c.iter().map(|(k, _)| k).collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");

        let mut m = c.clone();
        m.merge(&c);
        assert_eq!(m.get(&key(BusKind::Mmio, b, 4)), 4);
        assert_eq!(m.get(&key(BusKind::Pio, a, 0)), 2);
        assert_eq!(m.len(), 4);
        assert_eq!(m.into_iter().map(|(_, n)| n).sum::<u64>(), 10);
    }
}

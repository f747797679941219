//! A fake KVM for the registry's tests and benchmarks (compiled for unit tests and with the
//! `test-doubles` feature, which the crate's own integration tests and benchmarks enable).

use std::io;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use super::SlotBackend;

/// A fake KVM for tests and benchmarks. It enforces what KVM enforces (slot id below the
/// limit, no overlap between slots, no resizing a live slot) and can be told to fail.
pub struct FakeBackend {
    limit: u32,
    slots: Mutex<FakeSlots>,
    /// Calls left before injected failures start; negative = none armed.
    fail_in: AtomicI64,
    /// How many consecutive calls fail once armed.
    fail_count: AtomicU32,
    calls: AtomicU64,
}

impl FakeBackend {
    pub fn new(limit: u32) -> Self {
        Self {
            limit,
            slots: Mutex::new(Default::default()),
            fail_in: AtomicI64::new(-1),
            fail_count: AtomicU32::new(0),
            calls: AtomicU64::new(0),
        }
    }

    /// Make the `n`-th next call (0 = the very next one) fail with `EFAULT`.
    pub fn fail_after(&self, n: u32) {
        self.fail_calls(n, 1);
    }

    /// Let `skip` calls succeed, then fail the following `count` calls with `EFAULT`.
    pub fn fail_calls(&self, skip: u32, count: u32) {
        self.fail_count.store(count, Ordering::SeqCst);
        let arm = if count == 0 { -1 } else { i64::from(skip) };
        self.fail_in.store(arm, Ordering::SeqCst);
    }

    /// Slots as KVM would hold them: id → (gpa, size, host_addr, flags).
    pub fn slots(&self) -> Vec<(u32, u64, u64, u64, u32)> {
        let s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        s.by_id
            .iter()
            .map(|(&id, &(g, sz, h, f))| (id, g, sz, h, f))
            .collect()
    }

    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

impl SlotBackend for FakeBackend {
    fn set_slot(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        host_addr: u64,
        flags: u32,
    ) -> io::Result<()> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let armed = self.fail_in.load(Ordering::SeqCst);
        if armed > 0 {
            self.fail_in.store(armed - 1, Ordering::SeqCst);
        } else if armed == 0 {
            let left = self.fail_count.load(Ordering::SeqCst);
            if left <= 1 {
                self.fail_in.store(-1, Ordering::SeqCst);
            }
            self.fail_count
                .store(left.saturating_sub(1), Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        }
        if slot >= self.limit {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut guard = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let st = &mut *guard;
        if size == 0 {
            return match st.by_id.remove(&slot) {
                Some((g, ..)) => {
                    st.by_gpa.remove(&g);
                    Ok(())
                }
                None => Err(io::Error::from_raw_os_error(libc::EINVAL)),
            };
        }
        if let Some(&(g, sz, _, _)) = st.by_id.get(&slot) {
            // KVM allows only flag changes on a live slot.
            if g != gpa || sz != size {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
        }
        // Overlap with another slot: the last slot starting below our end must end at or
        // before our start (slots never overlap each other, so one check suffices).
        let end = gpa
            .checked_add(size)
            .ok_or(io::Error::from_raw_os_error(libc::EINVAL))?;
        let clash = st.by_gpa.range(..end).next_back().is_some_and(|(&g, &id)| {
            id != slot && st.by_id.get(&id).is_some_and(|v| g + v.1 > gpa)
        });
        if clash {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        st.by_id.insert(slot, (gpa, size, host_addr, flags));
        st.by_gpa.insert(gpa, slot);
        Ok(())
    }

    fn max_slots(&self) -> u32 {
        self.limit
    }
}

#[derive(Default)]
struct FakeSlots {
    by_id: std::collections::BTreeMap<u32, (u64, u64, u64, u32)>,
    by_gpa: std::collections::BTreeMap<u64, u32>,
}

use std::sync::Arc;

use super::SlotRegistry;
use crate::memory::{
    split_layout, FakeBackend, MemoryError, Slot, SlotFlags, SlotId, SlotIndexKind, PAGE_SIZE,
};

fn reg(limit: u32) -> (Arc<FakeBackend>, SlotRegistry) {
    let be = Arc::new(FakeBackend::new(limit));
    (be.clone(), SlotRegistry::new(be, SlotIndexKind::Wbtree))
}

const BASE: u64 = 0x1_0000_0000;

#[test]
fn grows_past_32_and_509_to_the_limit_and_reuses_ids() {
    let limit = 600;
    let (be, r) = reg(limit);
    let host = 0x7000_0000_0000u64; // fake backend never touches memory
    for i in 0..limit as u64 {
        // SAFETY: the fake backend and these tests never dereference the host address.
        let id = unsafe {
            r.add_mapped(
                BASE + i * 0x2000,
                host + i * 0x1000,
                0x1000,
                SlotFlags::NONE,
            )
        }
        .unwrap();
        assert_eq!(id as u64, i);
        if i == 32 || i == 509 {
            r.check_consistent(&be.slots()).unwrap();
        }
    }
    assert_eq!(r.len(), 600);
    let g = r.generation();
    let e = unsafe { r.add_mapped(0, host, 0x1000, SlotFlags::NONE) }.unwrap_err();
    assert!(
        matches!(e, MemoryError::TooManySlots { limit: 600, .. }),
        "{e}"
    );
    assert_eq!(r.generation(), g, "failed change publishes nothing");
    r.remove(17).unwrap();
    r.remove(3).unwrap();
    assert!(r.generation() > g);
    let id = unsafe { r.add_mapped(0, host, 0x1000, SlotFlags::NONE) }.unwrap();
    assert_eq!(id, 3, "lowest free id reused");
    let id = unsafe { r.add_mapped(0x1000, host, 0x1000, SlotFlags::NONE) }.unwrap();
    assert_eq!(id, 17);
    r.check_consistent(&be.slots()).unwrap();
    assert_eq!(r.table_capacity(), 600);
}

#[test]
fn errors_leave_everything_consistent() {
    let (be, r) = reg(64);
    let a = r.add_ram(0x10_0000, 0x10_000, SlotFlags::NONE).unwrap();
    let snap = r.snapshot();
    let cases: Vec<(Result<SlotId, MemoryError>, &str)> = vec![
        (
            r.add_ram(0x10_8000, 0x10_000, SlotFlags::NONE),
            "overlaps slot 0",
        ),
        (r.add_ram(0x20_0000, 0, SlotFlags::NONE), "size 0"),
        (
            r.add_ram(0x20_0800, 0x1000, SlotFlags::NONE),
            "not 4 KiB aligned",
        ),
        (
            r.add_ram(u64::MAX - 0xfff, 0x2000, SlotFlags::NONE),
            "past the end",
        ),
        (
            r.add_ram(
                0x20_0000,
                0x1000,
                SlotFlags::from_bits(0).unwrap() | SlotFlags(8),
            ),
            "unsupported",
        ),
    ];
    for (res, msg) in cases {
        let e = res.unwrap_err().to_string();
        assert!(e.contains(msg), "{e:?} should mention {msg:?}");
    }
    // Backend failure on add.
    be.fail_after(0);
    let e = r.add_ram(0x40_0000, 0x1000, SlotFlags::NONE).unwrap_err();
    assert!(matches!(e, MemoryError::Backend { .. }));
    r.check_consistent(&be.slots()).unwrap();
    assert_eq!(r.generation(), snap.generation());
    // Backend failure on the create half of a move: rolled back.
    be.fail_after(1);
    assert!(r.move_slot(a, 0x80_0000).is_err());
    r.check_consistent(&be.slots()).unwrap();
    assert_eq!(r.slot(a).unwrap().gpa, 0x10_0000);
    // Failure on both create and restore: registry follows KVM (slot gone).
    let b = r.add_ram(0x90_0000, 0x1000, SlotFlags::NONE).unwrap();
    be.fail_calls(1, 2);
    let e = r.resize(b, 0x3000).unwrap_err();
    assert!(matches!(e, MemoryError::RollbackFailed { .. }), "{e}");
    assert!(r.slot(b).is_none());
    r.check_consistent(&be.slots()).unwrap();
    // Backend failure on remove: slot kept.
    be.fail_after(0);
    assert!(r.remove(a).is_err());
    r.check_consistent(&be.slots()).unwrap();
    assert!(matches!(
        r.remove(99),
        Err(MemoryError::NoSuchSlot { slot: 99 })
    ));
}

#[test]
fn resize_move_dirty_log_and_data() {
    let (be, r) = reg(8);
    let a = r.add_ram(0x10_0000, 0x2000, SlotFlags::NONE).unwrap();
    let b = r.add_ram(0x20_0000, 0x1000, SlotFlags::READONLY).unwrap();
    let s = r.slot(a).unwrap();
    // SAFETY: the slot's mapping is registry-owned, live and 0x2000 bytes long.
    unsafe { *(s.host_addr as *mut u8).add(5) = 42 };
    r.resize(a, 0x8000).unwrap();
    let s2 = r.slot(a).unwrap();
    assert_eq!(s2.size, 0x8000);
    // SAFETY: as above, the new mapping is 0x8000 bytes.
    assert_eq!(
        unsafe { *(s2.host_addr as *const u8).add(5) },
        42,
        "contents kept"
    );
    assert!(r.resize(a, 0x10_1000).is_err(), "would overlap slot b");
    r.resize(a, 0x1000).unwrap();
    r.move_slot(b, 0x30_0000).unwrap();
    assert_eq!(r.load().lookup(0x30_0000).unwrap().id, b);
    assert!(r.load().lookup(0x20_0000).is_none());
    r.set_dirty_log(a, true).unwrap();
    assert!(r.slot(a).unwrap().flags.log_dirty());
    r.check_consistent(&be.slots()).unwrap();
    let g = r.generation();
    r.remove(a).unwrap();
    r.remove(b).unwrap();
    assert_eq!(r.generation(), g + 2);
    assert_eq!(r.table_capacity(), 0);
    r.check_consistent(&be.slots()).unwrap();
}

#[test]
fn add_mapped_split_packs_ranges_and_rolls_back() {
    let (be, r) = reg(16);
    let g = 1u64 << 30;
    let ram = [(0, 3 * g), (4 * g, 2 * g)];
    let host = 0x7f00_0000_0000u64;
    // SAFETY: fake backend; host memory is never touched.
    let ids = unsafe { r.add_mapped_split(&ram, host, 5, SlotFlags::NONE) }.unwrap();
    assert_eq!(ids.len(), 5);
    let snap = r.load();
    assert_eq!(snap.lookup(4 * g).unwrap().host_addr, host + 3 * g);
    assert_eq!(
        snap.lookup(g + 5).unwrap().host_addr_of(g + 5),
        host + g + 5
    );
    assert!(snap.lookup(3 * g).is_none());
    for id in ids {
        r.remove(id).unwrap();
    }
    // A failure on the fourth slot removes the first three again.
    be.fail_after(3);
    assert!(unsafe { r.add_mapped_split(&ram, host, 5, SlotFlags::NONE) }.is_err());
    assert!(r.is_empty());
    r.check_consistent(&be.slots()).unwrap();
    let e = unsafe { r.add_mapped_split(&ram, host, 17, SlotFlags::NONE) }.unwrap_err();
    assert!(matches!(e, MemoryError::TooManySlots { .. }), "{e}");
}

#[test]
fn held_snapshots_never_change() {
    let (be, r) = reg(16);
    let a = r.add_ram(0x1000, 0x1000, SlotFlags::NONE).unwrap();
    let held = r.snapshot();
    let guard = r.load();
    let before: Vec<Slot> = held.slots();
    for k in 0..6u64 {
        let id = r
            .add_ram(0x10_0000 + k * 0x1000, 0x1000, SlotFlags::NONE)
            .unwrap();
        if k % 2 == 0 {
            r.remove(id).unwrap();
        }
    }
    r.move_slot(a, 0x20_0000).unwrap();
    assert_eq!(held.slots(), before);
    assert_eq!(guard.slots(), before);
    assert_eq!(held.generation(), 1);
    drop(guard);
    drop(held);
    // With no readers left, updates reuse the spare snapshot; results stay right.
    for k in 0..6u64 {
        r.add_ram(0x30_0000 + k * 0x1000, 0x1000, SlotFlags::READONLY)
            .unwrap();
        r.check_consistent(&be.slots()).unwrap();
    }
    let s = r.load();
    assert_eq!(s.lookup(0x30_5000).map(|s| s.flags.readonly()), Some(true));
    assert_eq!(s.lookup(0x20_0000).map(|s| s.id), Some(a));
    assert_eq!(s.len(), r.len());
}

#[test]
fn drop_deletes_slots_from_kvm() {
    let (be, r) = reg(8);
    r.add_ram(0x1000, 0x1000, SlotFlags::NONE).unwrap();
    r.add_ram(0x8000, 0x2000, SlotFlags::READONLY).unwrap();
    assert_eq!(be.slots().len(), 2);
    drop(r);
    assert!(be.slots().is_empty());
}

#[test]
fn split_layout_pieces() {
    let g = 1u64 << 30;
    let ranges = [(0, 3 * g), (4 * g, g)];
    let s = split_layout(&ranges, 4).unwrap();
    assert_eq!(s, vec![(0, g), (g, g), (2 * g, g), (4 * g, g)]);
    let s = split_layout(&ranges, 1000).unwrap();
    assert_eq!(s.len(), 1000);
    let max = s.iter().map(|p| p.1).max().unwrap();
    let min = s.iter().map(|p| p.1).min().unwrap();
    assert!(max - min <= 2 * PAGE_SIZE * 1024, "{max:#x} {min:#x}");
    let total: u64 = s.iter().map(|p| p.1).sum();
    assert_eq!(total, 4 * g);
    assert!(
        split_layout(&ranges, 1).is_err(),
        "one slot cannot cover a hole"
    );
    assert!(split_layout(&[(0, 0x3000)], 4).is_err());
    assert_eq!(split_layout(&[(0, 0x3000)], 3).unwrap().len(), 3);
    assert!(split_layout(&[(0x800, 0x3000)], 1).is_err());
}

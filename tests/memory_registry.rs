//! Registry tests with the fake KVM backend: growth to the limit, id reuse, and consistency
//! of registry and backend after any failed change.

use std::sync::Arc;

use proptest::prelude::*;
use wbvmm::memory::{
    split_layout, FakeBackend, MemoryError, SlotFlags, SlotIndexKind, SlotRegistry,
};

const HOST: u64 = 0x7f00_0000_0000; // never dereferenced: the fake backend ignores it

fn reg(limit: u32, kind: SlotIndexKind) -> (Arc<FakeBackend>, SlotRegistry) {
    let be = Arc::new(FakeBackend::new(limit));
    (be.clone(), SlotRegistry::new(be, kind))
}

#[test]
fn grows_to_a_4096_limit_for_every_index() {
    for kind in SlotIndexKind::ALL {
        let limit = 4096;
        let (be, r) = reg(limit, kind);
        let layout =
            split_layout(&[(0, 0xc000_0000), (0x1_0000_0000, 0x4000_0000)], limit).unwrap();
        assert_eq!(layout.len(), 4096);
        for (i, &(gpa, size)) in layout.iter().enumerate() {
            // SAFETY: the fake backend never touches host memory and no DMA is done here.
            let id = unsafe { r.add_mapped(gpa, HOST + gpa, size, SlotFlags::NONE) }.unwrap();
            assert_eq!(id as usize, i);
            if [31, 32, 508, 509, 4095].contains(&i) {
                r.check_consistent(&be.slots()).unwrap();
            }
        }
        let e = unsafe { r.add_mapped(0xf000_0000, HOST, 0x1000, SlotFlags::NONE) }.unwrap_err();
        assert!(matches!(e, MemoryError::TooManySlots { limit: 4096, .. }));
        assert!(e.to_string().contains("remove a slot"), "{e}");
        // Every address resolves to the right slot.
        let snap = r.load();
        for &(gpa, size) in layout.iter().step_by(97) {
            let s = snap.lookup(gpa + size - 1).unwrap();
            assert_eq!((s.gpa, s.size), (gpa, size));
        }
        assert!(snap.lookup(0xd000_0000).is_none(), "hole below 4 GiB");
        // Remove a few, re-add: ids come back lowest first.
        for id in [4000, 7, 300] {
            r.remove(id).unwrap();
        }
        let ids: Vec<u32> = (0..3)
            .map(|k| {
                unsafe { r.add_mapped(0xf000_0000 + k * 0x1000, HOST, 0x1000, SlotFlags::NONE) }
                    .unwrap()
            })
            .collect();
        assert_eq!(ids, vec![7, 300, 4000]);
        r.check_consistent(&be.slots()).unwrap();
    }
}

#[derive(Clone, Debug)]
enum Op {
    Add(u64, u64, bool),
    AddRam(u64, u64),
    Remove(usize),
    Resize(usize, u64),
    Move(usize, u64),
    DirtyLog(usize, bool),
    /// Arm the fake backend to fail `count` calls after letting `skip` succeed.
    Fail(u32, u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..64, 0u64..6, any::<bool>()).prop_map(|(p, n, ro)| Op::Add(p * 0x1000, n * 0x1000, ro)),
        2 => (0u64..64, 1u64..4).prop_map(|(p, n)| Op::AddRam(p * 0x1000, n * 0x1000)),
        2 => any::<usize>().prop_map(Op::Remove),
        2 => (any::<usize>(), 0u64..6).prop_map(|(i, n)| Op::Resize(i, n * 0x1000)),
        2 => (any::<usize>(), 0u64..64).prop_map(|(i, p)| Op::Move(i, p * 0x1000)),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(i, on)| Op::DirtyLog(i, on)),
        2 => (0u32..2, 1u32..3).prop_map(|(s, c)| Op::Fail(s, c)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Random changes with injected KVM failures: after every call, succeeded or not, the
    /// registry's table, its published index and the backend hold the same slots, and the
    /// generation moved exactly when something was published.
    #[test]
    fn registry_stays_consistent(ops in prop::collection::vec(op(), 1..60), kind in 0usize..5) {
        let (be, r) = reg(12, SlotIndexKind::ALL[kind]);
        for op in ops {
            let pick = |i: usize| {
                let s = r.slots();
                (!s.is_empty()).then(|| s[i % s.len()].id)
            };
            let g0 = r.generation();
            let before = be.slots();
            let res: Result<(), MemoryError> = match op {
                Op::Add(g, n, ro) => {
                    let f = if ro { SlotFlags::READONLY } else { SlotFlags::NONE };
                    // SAFETY: fake backend; host memory is never touched.
                    unsafe { r.add_mapped(g, HOST + g, n, f) }.map(|_| ())
                }
                Op::AddRam(g, n) => r.add_ram(g, n, SlotFlags::NONE).map(|_| ()),
                Op::Remove(i) => match pick(i) { Some(id) => r.remove(id).map(|_| ()), None => Ok(()) },
                Op::Resize(i, n) => match pick(i) { Some(id) => r.resize(id, n), None => Ok(()) },
                Op::Move(i, g) => match pick(i) { Some(id) => r.move_slot(id, g), None => Ok(()) },
                Op::DirtyLog(i, on) => match pick(i) { Some(id) => r.set_dirty_log(id, on), None => Ok(()) },
                Op::Fail(s, c) => { be.fail_calls(s, c); Ok(()) }
            };
            r.check_consistent(&be.slots()).map_err(TestCaseError::fail)?;
            let changed = be.slots() != before;
            if changed {
                prop_assert!(r.generation() > g0, "backend changed but nothing was published");
            }
            if res.is_err() && !matches!(res, Err(MemoryError::RollbackFailed { .. })) {
                prop_assert_eq!(r.generation(), g0, "a failed change published: {:?}", res);
                prop_assert!(!changed, "a failed change altered KVM: {:?}", res);
            }
        }
        be.fail_calls(0, 0);
    }
}

/// Readers hold snapshots while a writer adds and removes a slot as fast as it can: every
/// snapshot's content matches its generation and never changes while held (the registry
/// reuses old snapshots only when no reader holds them).
#[test]
fn snapshots_are_immutable_under_concurrent_updates() {
    let (_be, r) = reg(8, SlotIndexKind::Wbtree);
    let r = Arc::new(r);
    const X: u64 = 0x10_0000;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (r, stop) = (r.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 20_000 {
                let id = r.add_ram(X, 0x1000, SlotFlags::NONE).unwrap();
                r.remove(id).unwrap();
                n += 1;
            }
            n
        })
    };
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..20_000u32 {
        let s = r.load();
        let g = s.generation();
        let present = s.lookup(X).is_some();
        assert_eq!(present, g % 2 == 1, "generation {g}");
        for _ in 0..(i % 64) {
            std::hint::spin_loop();
        }
        assert_eq!(s.generation(), g);
        assert_eq!(
            s.lookup(X).is_some(),
            present,
            "snapshot {g} changed while held"
        );
        seen.insert(g % 2);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let n = writer.join().unwrap();
    eprintln!("{n} add/remove pairs; parities seen {seen:?}");
}

//! MMIO router and miss cache: routing rules and invalidation (including under concurrent
//! changes).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use proptest::prelude::*;
use wbvmm::memory::{
    FakeBackend, MemSnapshot, MmioRoute, MmioRouter, SlotFlags, SlotIndexKind, SlotRegistry,
};
use wbvmm_devices::bus::{Bus, BusDevice};

struct Dummy;
impl BusDevice for Dummy {
    fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, _base: u64, _offset: u64, _data: &[u8]) {}
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Want {
    Device(u64, u64),
    Unmapped,
    ReadOnlyRam,
}

fn want_of(r: &MmioRoute<'_>) -> Want {
    match r {
        MmioRoute::Device(d) => Want::Device(d.base, d.len),
        MmioRoute::Unmapped => Want::Unmapped,
        MmioRoute::ReadOnlyRam => Want::ReadOnlyRam,
    }
}

/// The uncached truth.
fn oracle(addr: u64, is_write: bool, snap: &MemSnapshot, bus: &Bus) -> Want {
    if let Some(r) = bus.route(addr) {
        return Want::Device(r.base, r.len);
    }
    match snap.lookup(addr) {
        Some(s) if is_write && s.flags.readonly() => Want::ReadOnlyRam,
        _ => Want::Unmapped,
    }
}

fn registry() -> Arc<SlotRegistry> {
    Arc::new(SlotRegistry::new(
        FakeBackend::new(64),
        SlotIndexKind::Wbtree,
    ))
}

#[test]
fn routes_devices_rom_and_holes() {
    let reg = registry();
    let bus = Bus::new();
    let d: Arc<dyn BusDevice> = Arc::new(Dummy);
    reg.add_ram(0, 0x10_0000, SlotFlags::NONE).unwrap();
    reg.add_ram(0xf_0000_0000, 0x1000, SlotFlags::READONLY)
        .unwrap();
    // Two devices sharing one page, and one covering several pages.
    bus.insert(d.clone(), 0xfeb0_0000, 0x100).unwrap();
    bus.insert(d.clone(), 0xfeb0_0100, 0x20).unwrap();
    bus.insert(d.clone(), 0xfec0_0000, 0x3000).unwrap();
    for cache in [true, false] {
        let mut r = MmioRouter::new(cache);
        let snap = reg.load();
        for _ in 0..3 {
            for (addr, w) in [
                (0xfeb0_0000, false),
                (0xfeb0_00ff, true),
                (0xfeb0_0100, false),
                (0xfeb0_011f, true),
                (0xfeb0_0120, false), // same page, no device
                (0xfeb0_0004, false),
                (0xfec0_2fff, false),
                (0xfec0_0010, true),
                (0xf_0000_0010, true),  // ROM write
                (0xf_0000_0010, false), // ROM read: not an exit KVM makes; unmapped
                (0x5000, true),
            ] {
                let got = want_of(&r.route_mmio(addr, w, &snap, &bus));
                assert_eq!(
                    got,
                    oracle(addr, w, &snap, &bus),
                    "addr {addr:#x} write {w}"
                );
            }
        }
        let st = r.stats();
        assert_eq!(st.mmio.exits, 33);
        assert_eq!(st.mmio.readonly_writes, 3);
        assert_eq!(st.mmio.unmapped_reads, 6);
        if cache {
            assert!(st.miss_cache.hits >= 12, "{:?}", st.miss_cache);
        } else {
            assert_eq!(st.miss_cache.hits, 0);
        }
    }
}

#[derive(Clone, Debug)]
enum Change {
    AddRom(u64),
    RemoveSlot(usize),
    BusInsert(u64, u64),
    BusRemove(usize),
    BusRelocate(usize, u64),
    Route(u64, bool),
}

fn change() -> impl Strategy<Value = Change> {
    // Everything within 16 pages so that entries collide and get reused.
    let a = 0u64..16 * 4096;
    prop_oneof![
        1 => (0u64..16).prop_map(|p| Change::AddRom(p * 4096)),
        1 => any::<usize>().prop_map(Change::RemoveSlot),
        1 => (a.clone(), 1u64..0x1800).prop_map(|(b, l)| Change::BusInsert(b, l)),
        1 => any::<usize>().prop_map(Change::BusRemove),
        1 => (any::<usize>(), a.clone()).prop_map(|(i, b)| Change::BusRelocate(i, b)),
        8 => (a, any::<bool>()).prop_map(|(x, w)| Change::Route(x, w)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// After any sequence of slot and bus changes, the cached router answers exactly as the
    /// uncached oracle.
    #[test]
    fn cache_never_stale(ops in prop::collection::vec(change(), 1..150)) {
        let reg = registry();
        let bus = Bus::new();
        let d: Arc<dyn BusDevice> = Arc::new(Dummy);
        let mut r = MmioRouter::new(true);
        let mut bases: Vec<u64> = Vec::new();
        for op in ops {
            match op {
                Change::AddRom(g) => { let _ = reg.add_ram(g, 4096, SlotFlags::READONLY); }
                Change::RemoveSlot(i) => {
                    let s = reg.slots();
                    if !s.is_empty() { reg.remove(s[i % s.len()].id).unwrap(); }
                }
                Change::BusInsert(b, l) => {
                    if bus.insert(d.clone(), b, l).is_ok() { bases.push(b); }
                }
                Change::BusRemove(i) => {
                    if !bases.is_empty() {
                        let b = bases.swap_remove(i % bases.len());
                        bus.remove(b).unwrap();
                    }
                }
                Change::BusRelocate(i, nb) => {
                    if !bases.is_empty() {
                        let k = i % bases.len();
                        if bus.relocate(bases[k], nb).is_ok() { bases[k] = nb; }
                    }
                }
                Change::Route(a, w) => {
                    let snap = reg.load();
                    let got = want_of(&r.route_mmio(a, w, &snap, &bus));
                    prop_assert_eq!(got, oracle(a, w, &snap, &bus), "addr {:#x}", a);
                    // Twice: the second answer comes from the cache when cacheable.
                    let got = want_of(&r.route_mmio(a, w, &snap, &bus));
                    prop_assert_eq!(got, oracle(a, w, &snap, &bus), "addr {:#x} again", a);
                }
            }
        }
    }
}

/// A writer relocates a device and toggles a ROM slot while a reader routes through its
/// cache; every answer must match a state the reader could have seen: for the memslot
/// part exactly the snapshot it passed, for the bus a generation between the one it read
/// before routing and the one after (plus the store that precedes each bump).
#[test]
fn concurrent_changes_never_give_stale_answers() {
    let reg = registry();
    let bus = Arc::new(Bus::new());
    let d: Arc<dyn BusDevice> = Arc::new(Dummy);
    let base = |j: u64| 0x4000_0000 + (j % 13) * 0x800;
    bus.insert(d, base(0), 0x400).unwrap();
    let g_init = bus.generation();
    const ROM: u64 = 0x8000_0000;
    let stop = Arc::new(AtomicBool::new(false));
    // The writer starts only once the reader is routing, so the two overlap however
    // fast the writer is (release builds finish 5000 changes in microseconds).
    let started = Arc::new(AtomicBool::new(false));
    let writer = {
        let (reg, bus, stop, started) = (reg.clone(), bus.clone(), stop.clone(), started.clone());
        std::thread::spawn(move || {
            while !started.load(Ordering::Acquire) {
                std::hint::spin_loop();
            }
            let mut j = 0u64;
            let mut rom = None;
            // At least 500 changes whatever the reader does, so they overlap.
            while (j < 500 || !stop.load(Ordering::Relaxed)) && j < 5_000 {
                bus.relocate(base(j), base(j + 1)).unwrap();
                j += 1;
                rom = match rom {
                    None => Some(reg.add_ram(ROM, 0x1000, SlotFlags::READONLY).unwrap()),
                    Some(id) => {
                        reg.remove(id).unwrap();
                        None
                    }
                };
            }
            j
        })
    };
    let mut r = MmioRouter::new(true);
    let addrs: Vec<u64> = (0..13)
        .map(|j| base(j) + 0x3f0)
        .chain([ROM, ROM + 8])
        .collect();
    let mut checked = 0u64;
    // The run ends when both sides did their share (60,000 routes, the writer's
    // changes), however long that takes here; the deadline only fails a hung run.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    for round in 0..u64::MAX {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer did not finish within 600 s ({round} routes checked)"
        );
        if round == 64 {
            started.store(true, Ordering::Release);
        }
        let addr = addrs[(round as usize * 7) % addrs.len()];
        let g0 = bus.generation();
        let snap = reg.load();
        let got = want_of(&r.route_mmio(addr, true, &snap, &bus));
        let g1 = bus.generation();
        let js = (g0 - g_init)..=(g1 - g_init + 1);
        let ok = match got {
            Want::Device(b, l) => {
                addr >= b && addr < b + l && js.clone().any(|j| base(j) == b) && l == 0x400
            }
            Want::ReadOnlyRam => {
                (ROM..ROM + 0x1000).contains(&addr)
                    && snap.lookup(addr).is_some_and(|s| s.flags.readonly())
            }
            Want::Unmapped => {
                let in_rom = snap.lookup(addr).is_some();
                !in_rom
                    && js
                        .clone()
                        .any(|j| !(base(j)..base(j) + 0x400).contains(&addr))
            }
        };
        assert!(
            ok,
            "addr {addr:#x}: {got:?} not valid for bus gens {g0}..{g1}, slot gen {}",
            snap.generation()
        );
        checked += 1;
        if round >= 60_000 && round % 4096 == 0 && writer.is_finished() {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let j = writer.join().unwrap();
    let st = r.stats();
    eprintln!(
        "checked {checked} answers over {j} relocations; cache {:?}",
        st.miss_cache
    );
    assert!(st.miss_cache.hits > 0 && st.miss_cache.invalidations > 0);
}

//! Memslot mirror benchmarks: lookup cost per index, layout and access stream, with and
//! without the per-page cache; update cost at 32764 slots; memory per slot; and a
//! "nodes visited" report against the optimal BST (Knuth) as the lower bound.
//!
//! `cargo bench --bench memslots` (ids `memslots/<layout>/<stream>/<index>[+cache]`);
//! `cargo bench --bench memslots -- --test` runs everything once, on a reduced set.
//! The nodes report is printed and written to `target/memslots-nodes.json`.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::Criterion;
use serde_json::{json, Value};
use wbvmm::memory::{
    AnyIndex, FakeBackend, PageCache, RangeIndex, RangeItem, Slot, SlotFlags, SlotIndexKind,
    SlotRegistry, PAGE_SIZE,
};

const STREAM_LEN: usize = 4096; // power of two: the bench loop masks the position
const KNUTH_MAX: usize = 4096;
const K: u64 = 1024;
const M: u64 = 1024 * K;
const G: u64 = 1024 * M;

/// SplitMix64: a fixed-seed PRNG, so every run measures the same addresses.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn slot(i: usize, gpa: u64, size: u64, ro: bool) -> Slot {
    Slot {
        gpa,
        size,
        host_addr: 0x7f00_0000_0000 + gpa,
        id: i as u32,
        flags: if ro {
            SlotFlags::READONLY
        } else {
            SlotFlags::NONE
        },
    }
}

struct Layout {
    name: &'static str,
    slots: Vec<Slot>, // address order
    /// Hot MMIO addresses outside every slot (the exit addresses of `miss90` / `repeat`).
    hot_misses: [u64; 3],
}

fn pc() -> Layout {
    let r = [
        (0, 640 * K, false),          // low RAM
        (0xc0000, 128 * K, true),     // option ROMs
        (0xe0000, 128 * K, true),     // isa-bios
        (M, 3 * G - M, false),        // RAM 1M-3G
        (0xfd00_0000, 16 * M, false), // VGA BAR (RAM-backed)
        (0xfffc_0000, 256 * K, true), // BIOS
        (4 * G, 5 * G, false),        // high RAM
    ];
    Layout {
        name: "pc",
        slots: r
            .iter()
            .enumerate()
            .map(|(i, &(g, s, ro))| slot(i, g, s, ro))
            .collect(),
        // rtl8139 BAR, IOAPIC, LAPIC: all in the hole below 4 GiB.
        hot_misses: [0xfebf_1000 + 0x37, 0xfec0_0000, 0xfee0_00b0],
    }
}

/// `n` slots of 4 pages, each followed by a one-page gap (so misses land between slots).
fn equal(name: &'static str, n: usize) -> Layout {
    let stride = 5 * PAGE_SIZE;
    let base = 4 * G;
    let slots: Vec<Slot> = (0..n)
        .map(|i| slot(i, base + i as u64 * stride, 4 * PAGE_SIZE, false))
        .collect();
    let gap = |k: usize| base + k as u64 * stride + 4 * PAGE_SIZE + 0x10;
    Layout {
        name,
        hot_misses: [gap(n / 3), gap(2 * n / 3), gap(n - 1) + stride],
        slots,
    }
}

/// 3 GiB + 507 x 2 MiB + 64 GiB (virtio-mem / SynIC-like).
fn mixed509() -> Layout {
    let mut s = vec![slot(0, 0, 3 * G, false)];
    for i in 0..507 {
        s.push(slot(i + 1, 4 * G + i as u64 * 2 * M, 2 * M, false));
    }
    s.push(slot(508, 1 << 40, 64 * G, false));
    Layout {
        name: "mixed509",
        slots: s,
        hot_misses: [0xfebf_1037, 0xfee0_00b0, 4 * G + 507 * 2 * M + 0x1000],
    }
}

/// Sizes increasing with address: the adversarial order for a heap-by-size tree.
fn monotone509() -> Layout {
    let mut at = 4 * G;
    let mut slots = Vec::new();
    for i in 0..509 {
        let size = (i as u64 + 1) * PAGE_SIZE;
        slots.push(slot(i, at, size, false));
        at += size + PAGE_SIZE;
    }
    let gap = |k: usize| slots[k].gpa + slots[k].size + 8;
    Layout {
        name: "monotone509",
        hot_misses: [gap(100), gap(300), gap(508)],
        slots,
    }
}

fn layouts(test_mode: bool) -> Vec<Layout> {
    let mut v = vec![
        pc(),
        equal("equal32", 32),
        equal("equal509", 509),
        equal("equal4096", 4096),
    ];
    if !test_mode {
        v.push(equal("equal32764", 32764));
    }
    v.push(mixed509());
    v.push(monotone509());
    v
}

const STREAMS: [&str; 4] = ["hit-by-size", "hit-uniform", "miss90", "repeat"];

fn by_size(l: &Layout, rng: &mut Rng, cum: &[u64]) -> u64 {
    let total = *cum.last().unwrap_or(&1);
    let x = rng.below(total);
    let i = cum.partition_point(|&c| c <= x);
    let s = &l.slots[i];
    s.gpa + rng.below(s.size)
}

fn stream(l: &Layout, name: &str) -> Vec<u64> {
    let mut rng = Rng(0x5eed ^ name.len() as u64 ^ (l.slots.len() as u64) << 8);
    let cum: Vec<u64> = l
        .slots
        .iter()
        .scan(0u64, |acc, s| {
            *acc += s.size;
            Some(*acc)
        })
        .collect();
    (0..STREAM_LEN)
        .map(|k| match name {
            "hit-by-size" => by_size(l, &mut rng, &cum),
            "hit-uniform" => {
                let s = &l.slots[rng.below(l.slots.len() as u64) as usize];
                s.gpa + rng.below(s.size)
            }
            "miss90" => {
                if rng.below(10) < 9 {
                    l.hot_misses[rng.below(3) as usize]
                } else {
                    by_size(l, &mut rng, &cum)
                }
            }
            // The same few exit addresses again and again: the three MMIO registers and
            // one RAM address (a descriptor ring), in a fixed cycle.
            _ => {
                let ring = l.slots[l.slots.len() / 2].gpa + 0x40;
                [l.hot_misses[0], l.hot_misses[1], ring, l.hot_misses[2]][k % 4]
            }
        })
        .collect()
}

fn build(kind: SlotIndexKind, l: &Layout) -> AnyIndex<Slot> {
    let mut idx = AnyIndex::new(kind);
    for s in &l.slots {
        idx.insert(*s).expect("layout slots do not overlap");
    }
    idx
}

/// Mean and max nodes visited for `addrs`, and the mean with a page cache in front.
fn nodes(idx: &AnyIndex<Slot>, addrs: &[u64]) -> (f64, u32, f64) {
    let mut hint = 0;
    let (mut sum, mut max) = (0u64, 0u32);
    let mut cache: PageCache<()> = PageCache::new();
    let mut cached_sum = 0u64;
    for &a in addrs {
        let (_, n) = idx.lookup(a, &mut hint);
        sum += u64::from(n);
        max = max.max(n);
        if cache.get(a >> 12, (0, 0)).is_none() {
            cached_sum += u64::from(n);
            cache.insert(a >> 12, (0, 0), ());
        }
    }
    let len = addrs.len() as f64;
    (sum as f64 / len, max, cached_sum as f64 / len)
}

/// Knuth's optimal BST over the slots (keys, hit counts p) and the gaps between them
/// (external nodes, miss counts q), O(n^2) with root monotonicity. Cost unit: nodes
/// visited (a hit at depth d visits d + 1 nodes, a miss visits the internal nodes above its
/// gap). Returns the mean over all accesses.
fn optimal_bst(l: &Layout, addrs: &[u64]) -> Option<f64> {
    let n = l.slots.len();
    if n > KNUTH_MAX {
        return None;
    }
    let mut p = vec![0u32; n + 1]; // p[1..=n]
    let mut q = vec![0u32; n + 1]; // q[0..=n]: gap before slot 1, between, after slot n
    for &a in addrs {
        let i = l.slots.partition_point(|s| s.gpa <= a); // slots starting at or below a
        if i > 0 && l.slots[i - 1].contains(a) {
            p[i] += 1;
        } else {
            q[i] += 1;
        }
    }
    // Triangular tables over 0 <= i <= j <= n.
    // Row i holds j = i..=n.
    let idx = |i: usize, j: usize| i * (n + 1) - i * i.saturating_sub(1) / 2 + (j - i);
    let size = (n + 1) * (n + 2) / 2;
    let mut e = vec![0u32; size];
    let mut root = vec![0u16; size];
    // w(i, j) = q_i + sum_{k=i+1..=j} (p_k + q_k) = s[j] - s[i] + q_i.
    let mut pre = vec![0u32; n + 1];
    for k in 1..=n {
        pre[k] = pre[k - 1] + p[k] + q[k];
    }
    for len in 1..=n {
        for i in 0..=n - len {
            let j = i + len;
            let wij = pre[j] - pre[i] + q[i];
            let (lo, hi) = if len == 1 {
                (j, j)
            } else {
                (root[idx(i, j - 1)] as usize, root[idx(i + 1, j)] as usize)
            };
            let mut best = (u32::MAX, lo);
            for r in lo..=hi {
                let c = e[idx(i, r - 1)] + e[idx(r, j)];
                if c < best.0 {
                    best = (c, r);
                }
            }
            e[idx(i, j)] = best.0 + wij;
            root[idx(i, j)] = best.1 as u16;
        }
    }
    Some(f64::from(e[idx(0, n)]) / addrs.len() as f64)
}

fn nodes_report(test_mode: bool) -> Value {
    let mut out = BTreeMap::new();
    println!("\n== nodes visited per lookup (mean; max; mean with a 256-entry page cache) ==");
    for l in layouts(test_mode) {
        // One-shot build time (slots inserted in address order): the setup cost at boot.
        let mut build_us = BTreeMap::new();
        let idxs: Vec<(SlotIndexKind, AnyIndex<Slot>)> = SlotIndexKind::ALL
            .iter()
            .map(|&k| {
                let t0 = std::time::Instant::now();
                let idx = build(k, &l);
                build_us.insert(k.name().to_string(), t0.elapsed().as_secs_f64() * 1e6);
                (k, idx)
            })
            .collect();
        println!(
            "{:<12} build (us, address order): {}",
            l.name,
            build_us
                .iter()
                .map(|(k, v)| format!("{k}={v:.0}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut streams = BTreeMap::new();
        for s in STREAMS {
            let addrs = stream(&l, s);
            let skip_knuth = test_mode && l.slots.len() > 509;
            let opt = if skip_knuth {
                None
            } else {
                optimal_bst(&l, &addrs)
            };
            let mut per = BTreeMap::new();
            let mut line = format!("{:<12} {:<12}", l.name, s);
            for (k, idx) in &idxs {
                let (mean, max, cached) = nodes(idx, &addrs);
                line += &format!(" {}={:.2}/{}/{:.2}", k.name(), mean, max, cached);
                per.insert(
                    k.name().to_string(),
                    json!({"mean": mean, "max": max, "cached_mean": cached}),
                );
            }
            // The wbtree after a full size-biased rebuild (what `add_mapped_split` and
            // `SlotRegistry::optimize` leave after a bulk setup).
            if let Some((_, AnyIndex::Wbtree(t))) =
                idxs.iter().find(|(k, _)| *k == SlotIndexKind::Wbtree)
            {
                let mut t = t.clone();
                t.rebuild_all();
                let (mean, max, cached) = nodes(&AnyIndex::Wbtree(t), &addrs);
                line += &format!(" wbtree-rebuilt={mean:.2}/{max}/{cached:.2}");
                per.insert(
                    "wbtree-rebuilt".to_string(),
                    json!({"mean": mean, "max": max, "cached_mean": cached}),
                );
            }
            match opt {
                Some(o) => line += &format!(" | optimal={o:.3}"),
                None => line += " | optimal=skipped",
            }
            println!("{line}");
            streams.insert(
                s.to_string(),
                json!({
                    "indexes": per,
                    "optimal_bst": opt.map_or(json!("skipped"), |o| json!(o)),
                }),
            );
        }
        let wb = idxs
            .iter()
            .find_map(|(_, i)| match i {
                AnyIndex::Wbtree(t) => Some(t),
                _ => None,
            })
            .expect("wbtree built");
        let bytes: BTreeMap<String, f64> = idxs
            .iter()
            .map(|(k, i)| (k.name().to_string(), i.heap_bytes() as f64 / i.len() as f64))
            .collect();
        out.insert(
            l.name.to_string(),
            json!({
                "slots": l.slots.len(),
                "wbtree_depth": wb.depth(),
                "wbtree_rebuilds_while_building": wb.rebuilds(),
                "wbtree_rebuilt_nodes_while_building": wb.rebuilt_nodes(),
                "bytes_per_slot": bytes,
                "build_us": build_us,
                "streams": streams,
            }),
        );
    }
    println!("(btree: levels of a B-tree with that many keys, an estimate; not instrumented)");
    // Worst shape for rebuild churn: a huge range first, many small ones after it in address
    // order, a huge one last (no slack under the bound at the root).
    if !test_mode {
        let mut slots = vec![slot(0, 0, 3 * G, false)];
        for i in 0..32762u64 {
            slots.push(slot(i as usize + 1, 4 * G + i * 2 * M, 2 * M, false));
        }
        slots.push(slot(32763, 1 << 40, 64 * G, false));
        let l = Layout {
            name: "mixed32764",
            slots,
            hot_misses: [0; 3],
        };
        let t0 = std::time::Instant::now();
        let idx = build(SlotIndexKind::Wbtree, &l);
        let us = t0.elapsed().as_secs_f64() * 1e6;
        if let AnyIndex::Wbtree(t) = &idx {
            println!(
                "mixed32764   wbtree build {us:.0} us, {} rebuilds moving {} nodes, depth {}",
                t.rebuilds(),
                t.rebuilt_nodes(),
                t.depth()
            );
            out.insert(
                "mixed32764-build".to_string(),
                json!({"wbtree_build_us": us, "rebuilds": t.rebuilds(),
                       "rebuilt_nodes": t.rebuilt_nodes(), "depth": t.depth()}),
            );
        }
    }
    Value::Object(out.into_iter().collect())
}

fn memory_report(report: &Value) {
    println!("\n== index memory, bytes per slot (from capacities) ==");
    println!(
        "(per-vCPU MMIO router cache: {} bytes; bench page cache of Option<(gpa, host)>: {} bytes)",
        wbvmm::memory::MmioRouter::new(true).cache_bytes(),
        PageCache::<Option<(u64, u64)>>::new().footprint_bytes()
    );
    if let Value::Object(m) = report {
        for (layout, v) in m {
            if !v["bytes_per_slot"].is_null() {
                println!("{layout:<12} {}", v["bytes_per_slot"]);
            }
        }
    }
}

fn lookup_benches(c: &mut Criterion, test_mode: bool) {
    let mut g = c.benchmark_group("memslots");
    for l in layouts(test_mode) {
        let big = l.slots.len() > 4096;
        for kind in SlotIndexKind::ALL {
            let idx = build(kind, &l);
            for s in STREAMS {
                // A linear scan of 32764 slots is ~10 us per lookup; keep the two streams
                // that say something (misses scan everything; uniform hits scan half).
                let linear = matches!(kind, SlotIndexKind::Linear | SlotIndexKind::SizeSorted);
                if big && linear && !matches!(s, "miss90" | "hit-uniform") {
                    continue;
                }
                let addrs = stream(&l, s);
                let id = format!("{}/{}/{}", l.name, s, kind.name());
                g.bench_function(&id, |b| {
                    let (mut i, mut hint) = (0usize, 0u32);
                    b.iter(|| {
                        let a = addrs[i & (STREAM_LEN - 1)];
                        i = i.wrapping_add(1);
                        black_box(idx.lookup(black_box(a), &mut hint).0.map(|s| s.host_addr))
                    })
                });
                g.bench_function(format!("{id}+cache"), |b| {
                    let (mut i, mut hint) = (0usize, 0u32);
                    let mut cache: PageCache<Option<(u64, u64)>> = PageCache::new();
                    b.iter(|| {
                        let a = addrs[i & (STREAM_LEN - 1)];
                        i = i.wrapping_add(1);
                        let page = black_box(a) >> 12;
                        let v = match cache.get(page, (1, 0)) {
                            Some(v) => *v,
                            None => {
                                let v = idx.lookup(a, &mut hint).0.map(|s| (s.gpa, s.host_addr));
                                cache.insert(page, (1, 0), v);
                                v
                            }
                        };
                        black_box(v.map(|(gpa, host)| host + (a - gpa)))
                    })
                });
            }
        }
    }
    g.finish();
}

/// Insert + remove of one slot with 32763 others present: the index operation alone, and
/// through the registry (KVM call on the fake backend, copy-on-write snapshot publish).
fn update_benches(c: &mut Criterion, test_mode: bool) {
    let n = if test_mode { 4096 } else { 32764 };
    let l = equal("equal", n);
    let victim = l.slots[n / 2];
    let mut g = c.benchmark_group("memslots/update");
    for kind in SlotIndexKind::ALL {
        let mut idx = build(kind, &l);
        idx.remove(victim.gpa);
        g.bench_function(
            format!("equal{n}/index-insert+remove/{}", kind.name()),
            |b| {
                b.iter(|| {
                    idx.insert(black_box(victim)).expect("slot is free");
                    black_box(idx.remove(victim.gpa))
                })
            },
        );
        let reg = SlotRegistry::new(FakeBackend::new(32764), kind);
        for s in &l.slots {
            if s.gpa != victim.gpa {
                // SAFETY: the fake backend never touches host memory; nothing reads it.
                unsafe { reg.add_mapped(s.gpa, s.host_addr, s.size, SlotFlags::NONE) }
                    .expect("fresh registry accepts the layout");
            }
        }
        g.bench_function(
            format!("equal{n}/registry-add+remove/{}", kind.name()),
            |b| {
                b.iter(|| {
                    // SAFETY: as above.
                    let id = unsafe {
                        reg.add_mapped(victim.gpa, victim.host_addr, victim.size, SlotFlags::NONE)
                    }
                    .expect("slot is free");
                    black_box(reg.remove(id).expect("just added"))
                })
            },
        );
    }
    g.finish();
}

struct NullDevice;
impl wbvmm_devices::BusDevice for NullDevice {
    fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, _base: u64, _offset: u64, _data: &[u8]) {}
}

/// The MMIO exit router end to end (bus + memslot mirror + per-vCPU cache), on a PC-like
/// device map: the rtl8139's 256-byte BAR, IOAPIC, HPET, LAPIC and a few small ranges.
/// Streams: `repeat` (three register addresses of one driver), `devices` (uniform over the
/// devices' registers), `unmapped` (probing absent devices).
fn router_benches(c: &mut Criterion) {
    use wbvmm::memory::{MmioRoute, MmioRouter};
    use wbvmm_devices::bus::Bus;
    let reg = SlotRegistry::new(FakeBackend::new(64), SlotIndexKind::Wbtree);
    for s in &pc().slots {
        // SAFETY: the fake backend never touches host memory; nothing reads it.
        unsafe { reg.add_mapped(s.gpa, s.host_addr, s.size, s.flags) }.expect("pc layout");
    }
    let bus = Bus::new();
    let dev: std::sync::Arc<dyn wbvmm_devices::BusDevice> = std::sync::Arc::new(NullDevice);
    let ranges = [
        (0xfebf_1000u64, 0x100u64), // rtl8139 BAR
        (0xfebf_2000, 0x1000),
        (0xfec0_0000, 0x20),   // IOAPIC
        (0xfed0_0000, 0x400),  // HPET
        (0xfee0_0000, 0x1000), // LAPIC
        (0xfe00_0000, 0x4000),
        (0xfe00_4000, 0x10),
        (0xfe00_4010, 0x10), // two devices sharing a page
    ];
    for &(b, l) in &ranges {
        bus.insert(dev.clone(), b, l).expect("disjoint ranges");
    }
    let mut rng = Rng(42);
    let streams: [(&str, Vec<u64>); 3] = [
        (
            "repeat",
            (0..STREAM_LEN)
                .map(|k| [0xfebf_1037, 0xfebf_103e, 0xfebf_1010][k % 3])
                .collect(),
        ),
        (
            "devices",
            (0..STREAM_LEN)
                .map(|_| {
                    let (b, l) = ranges[rng.below(ranges.len() as u64) as usize];
                    b + rng.below(l) / 4 * 4
                })
                .collect(),
        ),
        (
            "unmapped",
            (0..STREAM_LEN)
                .map(|_| 0xfeb0_0000 + rng.below(64) * 0x1000 + 0x10)
                .collect(),
        ),
    ];
    let mut g = c.benchmark_group("memslots/router");
    for (name, addrs) in &streams {
        // cache-off / cache-on: `route_mmio` with a snapshot loaded per exit;
        // cache-on-reg: `route_mmio_in`, which loads a snapshot only on a miss.
        for (variant, cache, via_reg) in [
            ("cache-off", false, false),
            ("cache-on", true, false),
            ("cache-on-reg", true, true),
        ] {
            let mut router = MmioRouter::new(cache);
            g.bench_function(format!("pc/{name}/{variant}"), |b| {
                let mut i = 0usize;
                b.iter(|| {
                    let a = black_box(addrs[i & (STREAM_LEN - 1)]);
                    i = i.wrapping_add(1);
                    let route = if via_reg {
                        router.route_mmio_in(a, false, &reg, &bus)
                    } else {
                        router.route_mmio(a, false, &reg.load(), &bus)
                    };
                    match route {
                        MmioRoute::Device(r) => black_box(r.base),
                        _ => black_box(u64::MAX),
                    }
                })
            });
        }
    }
    g.finish();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes --bench; `cargo test --benches` and `-- --test` do not measure.
    let test_mode = args.iter().any(|a| a == "--test") || !args.iter().any(|a| a == "--bench");
    let report = nodes_report(test_mode);
    memory_report(&report);
    let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let path = std::path::Path::new(&dir).join("memslots-nodes.json");
    match serde_json::to_string_pretty(&report)
        .map_err(std::io::Error::other)
        .and_then(|s| std::fs::write(&path, s))
    {
        Ok(()) => println!("nodes report written to {}", path.display()),
        Err(e) => eprintln!("cannot write {}: {e}", path.display()),
    }
    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(10)
        // The default 100k bootstrap resamples cost more than the measurement itself.
        .nresamples(1000)
        .warm_up_time(Duration::from_millis(50))
        .measurement_time(Duration::from_millis(150))
        .without_plots();
    lookup_benches(&mut c, test_mode);
    router_benches(&mut c);
    update_benches(&mut c, test_mode);
    c.final_summary();
}

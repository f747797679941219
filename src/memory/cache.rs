//! The per-vCPU MMIO-miss cache and the MMIO exit router.
//!
//! KVM exits with `KVM_EXIT_MMIO` only for addresses outside every memslot, or for writes
//! to read-only slots, so on the exit path the memslot mirror is almost always a confirmed
//! miss: the cache sits in front of the *device bus*. It is a small direct-mapped table
//! keyed by guest page (`gpa >> 12`), owned by one vCPU thread (no sharing, no locks, no
//! atomics), each entry tagged with the [`Generation`] it was computed at: the memslot
//! generation and the bus generation as a pair. An entry whose tag differs from the current
//! pair is dropped (counted as an invalidation); both counters only grow, so a pair never
//! repeats and nothing needs flushing on wrap.
//!
//! Correctness with ranges smaller than a page: an entry records the sub-range `[lo, hi)`
//! of its page over which its answer holds, and only answers addresses inside it.
//! - a device route holds over `route ∩ page` (a page with two devices keeps one of them
//!   cached at a time; the other misses and replaces it);
//! - "unmapped" and "read-only RAM" hold only for the exact address: the bus API cannot tell
//!   us the extent of the gap around an address (a one-byte device may sit next to it). KVM
//!   exits on the same few addresses over and over (a driver's status register), which is
//!   what this caches.

use std::fmt;
use std::time::{Duration, Instant};

use wbvmm_devices::bus::{Bus, Route};

use super::index::SlotIndexKind;
use super::registry::SlotRegistry;
use super::snapshot::{MemSnapshot, SlotProbe};
use super::stats::{MemoryStats, MissCacheStats, MmioStats};
use super::PAGE_SHIFT;

/// Direct-mapped entries per vCPU. With the router's entry (page, generation pair, valid
/// sub-range, route) that is about 20 KiB per vCPU; see [`MmioRouter::cache_bytes`].
pub const PAGE_CACHE_ENTRIES: usize = 256;

/// `(memslot generation, bus generation)`.
pub type Generation = (u64, u64);

#[derive(Clone, Debug)]
struct Entry<V> {
    page: u64,
    gen: Generation,
    val: V,
}

/// A direct-mapped page cache with generation tags and hit/miss/invalidation counters.
#[derive(Clone, Debug)]
pub struct PageCache<V> {
    entries: Box<[Option<Entry<V>>]>,
    pub hits: u64,
    pub misses: u64,
    pub invalidations: u64,
}

impl<V> Default for PageCache<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> PageCache<V> {
    pub fn new() -> Self {
        Self {
            entries: (0..PAGE_CACHE_ENTRIES).map(|_| None).collect(),
            hits: 0,
            misses: 0,
            invalidations: 0,
        }
    }

    #[inline]
    fn slot_of(page: u64) -> usize {
        (page as usize) & (PAGE_CACHE_ENTRIES - 1)
    }

    /// Look `page` up at generation `gen`; `valid` may reject an entry for this access (it
    /// is then a miss). Returns the entry's position for [`PageCache::at`].
    #[inline]
    pub fn probe(
        &mut self,
        page: u64,
        gen: Generation,
        valid: impl FnOnce(&V) -> bool,
    ) -> Option<usize> {
        let i = Self::slot_of(page);
        match &self.entries[i] {
            Some(e) if e.page == page => {
                if e.gen != gen {
                    self.invalidations += 1;
                    self.misses += 1;
                    self.entries[i] = None;
                    None
                } else if valid(&e.val) {
                    self.hits += 1;
                    Some(i)
                } else {
                    self.misses += 1;
                    None
                }
            }
            _ => {
                self.misses += 1;
                None
            }
        }
    }

    /// The value at a position returned by [`PageCache::probe`] or [`PageCache::insert`].
    #[inline]
    pub fn at(&self, i: usize) -> Option<&V> {
        self.entries.get(i)?.as_ref().map(|e| &e.val)
    }

    /// `get` = `probe` + `at`.
    #[inline]
    pub fn get(&mut self, page: u64, gen: Generation) -> Option<&V> {
        let i = self.probe(page, gen, |_| true)?;
        self.at(i)
    }

    /// Store `val` for `page` at `gen`, replacing whatever shared its line.
    #[inline]
    pub fn insert(&mut self, page: u64, gen: Generation, val: V) -> usize {
        let i = Self::slot_of(page);
        self.entries[i] = Some(Entry { page, gen, val });
        i
    }

    /// Bytes of the entry table.
    pub fn footprint_bytes(&self) -> usize {
        self.entries.len() * std::mem::size_of::<Option<Entry<V>>>()
    }

    pub fn clear(&mut self) {
        self.entries.iter_mut().for_each(|e| *e = None);
    }

    pub fn stats(&self) -> MissCacheStats {
        MissCacheStats {
            enabled: true,
            entries: PAGE_CACHE_ENTRIES,
            hits: self.hits,
            misses: self.misses,
            invalidations: self.invalidations,
        }
    }
}

/// Where an MMIO exit goes.
pub enum MmioRoute<'a> {
    /// A device claims the address. Dispatch with
    /// `r.device.read(r.base, addr - r.base, data)` / `write`. Borrowed from the router, so
    /// routing clones no `Arc` (no shared refcount traffic on the hot path).
    Device(&'a Route),
    /// Nothing is there: reads return all-ones ([`fill_open_bus`]), writes are dropped. The
    /// router has already counted it and logged it (rate-limited).
    Unmapped,
    /// A write to a read-only slot (ROM) with no device behind it: drop it.
    ReadOnlyRam,
}

impl fmt::Debug for MmioRoute<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MmioRoute::Device(r) => write!(f, "Device({:#x}+{:#x})", r.base, r.len),
            MmioRoute::Unmapped => f.write_str("Unmapped"),
            MmioRoute::ReadOnlyRam => f.write_str("ReadOnlyRam"),
        }
    }
}

impl MmioRoute<'_> {
    /// `(base, len)` of the device range, for comparisons in tests and logs.
    pub fn device_range(&self) -> Option<(u64, u64)> {
        match self {
            MmioRoute::Device(r) => Some((r.base, r.len)),
            _ => None,
        }
    }
}

/// Fill an MMIO read buffer with open-bus all-ones.
pub fn fill_open_bus(data: &mut [u8]) {
    data.fill(0xff);
}

#[derive(Clone)]
enum Answer {
    Device(Route),
    ReadOnlyRam,
    Unmapped,
}

#[derive(Clone)]
struct Cached {
    lo: u64,
    hi: u64,
    answer: Answer,
}

/// A log limiter: at most `burst` messages per `window`, then a count of what was dropped.
#[derive(Clone, Debug)]
pub struct RateLimitedLog {
    burst: u32,
    window: Duration,
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl Default for RateLimitedLog {
    fn default() -> Self {
        Self::new(10, Duration::from_secs(1))
    }
}

impl RateLimitedLog {
    pub fn new(burst: u32, window: Duration) -> Self {
        Self {
            burst,
            window,
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Whether to emit a message now. When a new window opens after suppressing messages,
    /// logs how many were dropped.
    pub fn allow(&mut self) -> bool {
        let now = Instant::now();
        let expired = self
            .window_start
            .is_none_or(|s| now.duration_since(s) >= self.window);
        if expired {
            if self.suppressed > 0 {
                log::info!("{} similar messages suppressed", self.suppressed);
                self.suppressed = 0;
            }
            self.window_start = Some(now);
            self.in_window = 0;
        }
        if self.in_window < self.burst {
            self.in_window += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// Messages dropped in the current window.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

/// The per-vCPU MMIO exit router: miss cache → memslot mirror → device bus.
pub struct MmioRouter {
    cache: Option<PageCache<Cached>>,
    /// Holds the last uncached answer so that [`MmioRoute::Device`] can borrow it.
    last: Option<Cached>,
    probe: SlotProbe,
    index: Option<SlotIndexKind>,
    mmio: MmioStats,
    log: RateLimitedLog,
}

impl MmioRouter {
    /// `cache` is `--mmio-cache on|off`.
    pub fn new(cache: bool) -> Self {
        Self {
            cache: cache.then(PageCache::new),
            last: None,
            probe: SlotProbe::default(),
            index: None,
            mmio: MmioStats::default(),
            log: RateLimitedLog::default(),
        }
    }

    pub fn cache_enabled(&self) -> bool {
        self.cache.is_some()
    }

    /// Bytes of this router's cache table (0 when disabled).
    pub fn cache_bytes(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.footprint_bytes())
    }

    /// Route an MMIO exit at `addr`.
    ///
    /// Precedence: a device on the bus wins (a ROM slot with a device behind it, such as a
    /// flash chip in ROM mode, takes its writes); otherwise a write inside a read-only slot
    /// is `ReadOnlyRam`; otherwise `Unmapped`. (A read inside a RAM slot only exits when
    /// that slot was added concurrently with the exit; it is `Unmapped` for this exit.)
    ///
    /// `snapshot` is the current memslot snapshot (`registry.load()`); the generations are
    /// read before the lookups, so an answer is never cached under a newer tag than the
    /// state it was computed from.
    #[inline]
    pub fn route_mmio<'a>(
        &'a mut self,
        addr: u64,
        is_write: bool,
        snapshot: &MemSnapshot,
        bus: &Bus,
    ) -> MmioRoute<'a> {
        let gen = (snapshot.generation(), bus.generation());
        self.route_inner(addr, is_write, gen, bus, |f| f(snapshot))
    }

    /// As [`MmioRouter::route_mmio`], but takes the registry and loads a snapshot only on a
    /// cache miss: a hit costs two atomic loads (the generations) and one table probe,
    /// instead of an `arc_swap` load per exit.
    #[inline]
    pub fn route_mmio_in<'a>(
        &'a mut self,
        addr: u64,
        is_write: bool,
        registry: &SlotRegistry,
        bus: &Bus,
    ) -> MmioRoute<'a> {
        // Generations first, then the state: an answer is never tagged newer than the state
        // it was computed from.
        let gen = (registry.generation(), bus.generation());
        self.route_inner(addr, is_write, gen, bus, |f| f(&registry.load()))
    }

    #[inline]
    fn route_inner<'a>(
        &'a mut self,
        addr: u64,
        is_write: bool,
        gen: Generation,
        bus: &Bus,
        with_snapshot: impl FnOnce(&mut dyn FnMut(&MemSnapshot)),
    ) -> MmioRoute<'a> {
        self.mmio.exits += 1;
        let page = addr >> PAGE_SHIFT;
        let (probe, index) = (&mut self.probe, &mut self.index);
        let compute = || {
            let mut out = None;
            with_snapshot(&mut |snap| out = Some(resolve(addr, snap, bus, probe, index)));
            out
        };
        // Only disjoint fields are borrowed below, so the answer can borrow the cache (or
        // `last`) while the counters are updated.
        let answer = if let Some(c) = &mut self.cache {
            let pos = match c.probe(page, gen, |v| v.lo <= addr && addr < v.hi) {
                Some(i) => Some(i),
                None => compute().map(|ans| c.insert(page, gen, ans)),
            };
            pos.and_then(|i| c.at(i)).map(|e| &e.answer)
        } else {
            compute().map(|ans| &self.last.insert(ans).answer)
        };
        match answer {
            Some(Answer::Device(r)) => {
                self.mmio.device += 1;
                MmioRoute::Device(r)
            }
            Some(Answer::ReadOnlyRam) if is_write => {
                self.mmio.readonly_writes += 1;
                MmioRoute::ReadOnlyRam
            }
            _ => {
                note_unmapped(&mut self.mmio, &mut self.log, addr, is_write);
                MmioRoute::Unmapped
            }
        }
    }

    /// This router's counters (merge the vCPUs' with [`MemoryStats::merge`]).
    pub fn stats(&self) -> MemoryStats {
        let mut s = MemoryStats::default();
        if let Some(kind) = self.index {
            s.lookups.exit = self.probe.stats(kind);
        }
        s.miss_cache = match &self.cache {
            Some(c) => c.stats(),
            None => MissCacheStats::default(),
        };
        s.mmio = self.mmio.clone();
        s
    }
}

fn note_unmapped(mmio: &mut MmioStats, log: &mut RateLimitedLog, addr: u64, is_write: bool) {
    if is_write {
        mmio.unmapped_writes += 1;
    } else {
        mmio.unmapped_reads += 1;
    }
    // Check the level first: the limiter reads the clock, which is not free on every
    // unmapped access when nobody would see the message anyway.
    if log::log_enabled!(log::Level::Warn) && log.allow() {
        let what = if is_write { "write to" } else { "read of" };
        log::info!("guest MMIO {what} unmapped address {addr:#x} (open bus)");
    }
}

/// The uncached answer, with the sub-range of the page it holds for.
fn resolve(
    addr: u64,
    snapshot: &MemSnapshot,
    bus: &Bus,
    probe: &mut SlotProbe,
    index: &mut Option<SlotIndexKind>,
) -> Cached {
    let page_lo = addr & !((1u64 << PAGE_SHIFT) - 1);
    let page_hi = page_lo.saturating_add(1 << PAGE_SHIFT);
    if let Some(r) = bus.route(addr) {
        let lo = r.base.max(page_lo);
        let hi = r.base.saturating_add(r.len).min(page_hi);
        return Cached {
            lo,
            hi,
            answer: Answer::Device(r),
        };
    }
    *index = Some(snapshot.index_kind());
    let ro = snapshot
        .lookup_with(addr, probe)
        .is_some_and(|s| s.flags.readonly());
    Cached {
        lo: addr,
        hi: addr.saturating_add(1),
        answer: if ro {
            Answer::ReadOnlyRam
        } else {
            Answer::Unmapped
        },
    }
}

//! Cheap per-thread latency histograms for the vCPU exit path.
//!
//! [`LatencyHistogram`] is log-linear ("HDR-style"): every power of two is split into
//! [`SUB_BUCKETS`] (8) equal sub-buckets, and values below 8 get one exact bucket each.
//! That is [`NUM_BUCKETS`] (496) `u64` buckets covering all of `u64`, about 4 KiB inline.
//! [`LatencyHistogram::record`] is a leading-zero count, two shifts and three adds: no
//! allocation, no atomics, no branches on the data beyond `max`. One histogram belongs
//! to one thread; merge them at the end with [`LatencyHistogram::merge`].
//!
//! # Error bound
//!
//! `count`, `mean_ns` (exact sum / count, rounded down) and `max_ns` are exact.
//! Percentiles use the nearest-rank definition (the value of rank `ceil(p * count)`),
//! located in its bucket and linearly interpolated inside it, then clamped to the exact
//! `[min, max]` seen. The estimate and the true value lie in the same bucket, so
//! **the absolute error is below the bucket width: exact for values < 8, and otherwise
//! less than 1/8 (12.5 %) of the true value** (a bucket `[lo, lo + w)` has `w <= lo / 8`).
//! When every sample is equal the clamp makes the result exact.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::exit_kind::ExitKind;

/// log2 of the number of sub-buckets per power of two.
pub const SUB_BITS: u32 = 3;
/// Sub-buckets per power of two; also the number of exact buckets for small values.
pub const SUB_BUCKETS: usize = 1 << SUB_BITS;
/// Buckets needed for all of `u64`.
pub const NUM_BUCKETS: usize = (64 - SUB_BITS as usize + 1) << SUB_BITS;

/// Bucket index of `v`.
#[inline(always)]
fn bucket_of(v: u64) -> usize {
    if v < SUB_BUCKETS as u64 {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // >= SUB_BITS
    let sub = (v >> (e - SUB_BITS)) as usize & (SUB_BUCKETS - 1);
    (((e - SUB_BITS + 1) as usize) << SUB_BITS) + sub
}

/// `[lo, lo + width)` of bucket `i`.
fn bucket_range(i: usize) -> (u64, u64) {
    if i < SUB_BUCKETS {
        return (i as u64, 1);
    }
    let e = (i >> SUB_BITS) as u32 + SUB_BITS - 1;
    let sub = (i & (SUB_BUCKETS - 1)) as u64;
    let shift = e - SUB_BITS;
    ((SUB_BUCKETS as u64 + sub) << shift, 1u64 << shift)
}

/// A log-linear histogram of nanoseconds, owned by one thread.
#[derive(Clone, Debug)]
pub struct LatencyHistogram {
    buckets: [u64; NUM_BUCKETS],
    count: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl PartialEq for LatencyHistogram {
    fn eq(&self, o: &Self) -> bool {
        self.buckets[..] == o.buckets[..]
            && (self.count, self.sum, self.min, self.max) == (o.count, o.sum, o.min, o.max)
    }
}

impl LatencyHistogram {
    pub const fn new() -> Self {
        Self {
            buckets: [0; NUM_BUCKETS],
            count: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    /// Record one latency.
    #[inline]
    pub fn record(&mut self, ns: u64) {
        self.buckets[bucket_of(ns)] += 1;
        self.count += 1;
        self.sum += ns as u128;
        self.min = self.min.min(ns);
        self.max = self.max.max(ns);
    }

    /// Record the time since `start` (saturating at `u64::MAX` ns).
    #[inline]
    pub fn record_since(&mut self, start: std::time::Instant) {
        self.record(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }

    /// Add another histogram's samples to this one.
    pub fn merge(&mut self, o: &LatencyHistogram) {
        for (a, b) in self.buckets.iter_mut().zip(o.buckets.iter()) {
            *a += *b;
        }
        self.count += o.count;
        self.sum += o.sum;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The largest value recorded (0 if none).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The smallest value recorded (`None` if none).
    pub fn min(&self) -> Option<u64> {
        (self.count > 0).then_some(self.min)
    }

    /// Exact mean, rounded down (0 if empty).
    pub fn mean(&self) -> u64 {
        if self.count == 0 {
            0
        } else {
            (self.sum / self.count as u128) as u64
        }
    }

    /// Estimated `p`-quantile (`p` in `0.0..=1.0`, nearest rank); 0 if empty. See the
    /// module docs for the error bound.
    pub fn quantile(&self, p: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let p = if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) };
        let rank = ((p * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0u64;
        for (i, &c) in self.buckets.iter().enumerate() {
            if c == 0 {
                continue;
            }
            if seen + c >= rank {
                let (lo, w) = bucket_range(i);
                // The k-th of c values in the bucket sits at the middle of the k-th of c
                // equal slices of [lo, lo + w).
                let k = (rank - seen) as u128;
                let off = (w as u128 * (2 * k - 1)) / (2 * c as u128);
                let est = lo.saturating_add(off as u64);
                return est.clamp(self.min, self.max);
            }
            seen += c;
        }
        self.max
    }

    /// `count`, exact mean and max, estimated p50 and p99.
    pub fn summary(&self) -> LatencySummary {
        LatencySummary {
            count: self.count,
            mean_ns: self.mean(),
            p50_ns: Some(self.quantile(0.50)),
            p99_ns: Some(self.quantile(0.99)),
            max_ns: Some(self.max),
        }
    }
}

/// What [`LatencyHistogram::summary`] reports; serialised as
/// `{"count":..,"mean_ns":..,"p50_ns":..,"p99_ns":..,"max_ns":..}`. The last three
/// are absent where a summary is the difference of two snapshots (counts and means
/// subtract; percentiles and maxima do not: `scripts/lib/linux-run-report.py`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ns: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ns: Option<u64>,
}

/// One histogram per [`ExitKind`] (the run loop fills those the table marks timed),
/// owned by one vCPU thread (about 40 KiB; box it if the owner lives on a small stack).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExitLatencies {
    hists: [LatencyHistogram; ExitKind::COUNT],
}

impl ExitLatencies {
    pub const fn new() -> Self {
        Self {
            hists: [const { LatencyHistogram::new() }; ExitKind::COUNT],
        }
    }

    #[inline]
    pub fn record(&mut self, kind: ExitKind, ns: u64) {
        self.hists[kind as usize].record(ns);
    }

    pub fn get(&self, kind: ExitKind) -> &LatencyHistogram {
        &self.hists[kind as usize]
    }

    pub fn merge(&mut self, o: &ExitLatencies) {
        for (a, b) in self.hists.iter_mut().zip(o.hists.iter()) {
            a.merge(b);
        }
    }

    /// Summaries by kind (serialised by kind name, in table order), skipping kinds
    /// with no samples.
    pub fn summary(&self) -> BTreeMap<ExitKind, LatencySummary> {
        ExitKind::all()
            .map(|k| (k, self.get(k)))
            .filter(|(_, h)| h.count() > 0)
            .map(|(k, h)| (k, h.summary()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented bound: exact below 8, else within 1/8 of the true value.
    fn within_bound(est: u64, truth: u64) -> bool {
        let err = est.abs_diff(truth);
        if truth < SUB_BUCKETS as u64 {
            err == 0
        } else {
            err * 8 < truth
        }
    }

    /// Nearest-rank quantile of sorted data.
    fn true_quantile(sorted: &[u64], p: f64) -> u64 {
        let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1]
    }

    fn check(values: &[u64]) -> LatencySummary {
        let mut h = LatencyHistogram::new();
        values.iter().for_each(|&v| h.record(v));
        let mut s = values.to_vec();
        s.sort_unstable();
        let sum = h.summary();
        assert_eq!(sum.count, values.len() as u64);
        assert_eq!(sum.max_ns, s.last().copied());
        assert_eq!(
            sum.mean_ns as u128,
            s.iter().map(|&v| v as u128).sum::<u128>() / s.len() as u128
        );
        for (p, est) in [(0.5, sum.p50_ns.unwrap()), (0.99, sum.p99_ns.unwrap())] {
            let t = true_quantile(&s, p);
            assert!(within_bound(est, t), "p{p}: estimated {est}, true {t}");
        }
        for p in [0.0, 0.1, 0.25, 0.75, 0.9, 0.999, 1.0] {
            let (est, t) = (h.quantile(p), true_quantile(&s, p));
            assert!(within_bound(est, t), "p{p}: estimated {est}, true {t}");
        }
        sum
    }

    #[test]
    fn buckets_partition_u64() {
        let mut prev_end = 0u64;
        for i in 0..NUM_BUCKETS {
            let (lo, w) = bucket_range(i);
            assert_eq!(lo, prev_end, "bucket {i}");
            assert_eq!(bucket_of(lo), i);
            assert_eq!(bucket_of(lo + (w - 1)), i);
            if i >= SUB_BUCKETS {
                assert!(w * 8 <= lo, "bucket {i} too wide");
            }
            prev_end = lo.wrapping_add(w);
        }
        assert_eq!(prev_end, 0, "last bucket ends at 2^64");
        assert_eq!(bucket_of(u64::MAX), NUM_BUCKETS - 1);
    }

    #[test]
    fn all_equal_is_exact() {
        for v in [0, 1, 7, 8, 1234, 999_999, u64::MAX] {
            let s = check(&vec![v; 1000]);
            assert_eq!(
                (s.p50_ns, s.p99_ns, s.max_ns, s.mean_ns),
                (Some(v), Some(v), Some(v), v)
            );
        }
    }

    #[test]
    fn uniform_1_to_1000() {
        let v: Vec<u64> = (1..=1000).collect();
        let s = check(&v);
        assert_eq!(s.mean_ns, 500);
        assert_eq!(s.max_ns, Some(1000));
    }

    #[test]
    fn uniform_wide_and_shuffled() {
        // A deterministic pseudo-random spread over 1 ns .. 10 ms.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let v: Vec<u64> = (0..20_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                1 + x % 10_000_000
            })
            .collect();
        check(&v);
    }

    #[test]
    fn bimodal() {
        // 95 % fast PIO exits at ~300 ns, 5 % slow ones at ~80 us.
        let mut v = Vec::new();
        for i in 0..9500u64 {
            v.push(280 + i % 41);
        }
        for i in 0..500u64 {
            v.push(80_000 + i * 7);
        }
        let s = check(&v);
        assert!((280..=320).contains(&s.p50_ns.unwrap()), "{s:?}");
        assert!(s.p99_ns.unwrap() >= 70_000, "{s:?}");
    }

    #[test]
    fn empty_is_zero() {
        let h = LatencyHistogram::new();
        let zero = LatencySummary {
            p50_ns: Some(0),
            p99_ns: Some(0),
            max_ns: Some(0),
            ..Default::default()
        };
        assert_eq!(h.summary(), zero);
        assert_eq!(h.min(), None);
        assert!(ExitLatencies::new().summary().is_empty());
    }

    #[test]
    fn merge_equals_recording_in_one() {
        let mut all = ExitLatencies::new();
        let mut parts = [
            ExitLatencies::new(),
            ExitLatencies::new(),
            ExitLatencies::new(),
        ];
        for i in 0..3000u64 {
            let kind = ExitKind::all().nth((i % 4) as usize).unwrap(); // the four I/O kinds
            let ns = (i * 2_654_435_761) % 50_000;
            all.record(kind, ns);
            parts[(i % 3) as usize].record(kind, ns);
        }
        let mut merged = ExitLatencies::default();
        for p in &parts {
            merged.merge(p);
        }
        assert_eq!(merged, all);
        let s = merged.summary();
        assert_eq!(s, all.summary());
        assert_eq!(
            s.keys().map(|k| k.name()).collect::<Vec<_>>(),
            vec!["io_in", "io_out", "mmio_read", "mmio_write"]
        );
        assert_eq!(s[&ExitKind::IoIn].count, 750);
        let json = serde_json::to_value(&s).unwrap();
        assert!(json["mmio_write"]["p99_ns"].is_u64());
        assert!(json.get("other").is_none());
    }
}

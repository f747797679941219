//! The one table of vCPU exit kinds: what the run loop counts, what it times, and the
//! names `--stats` and `wbvmm stats` use for them. A new exit kind is one variant and
//! one row here; the counters, the latency histograms, the JSON and the summary follow.

use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Everything the vCPU run loop counts per exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExitKind {
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    UnclaimedPio,
    Hlt,
    Interrupted,
    InternalError,
    Int3Injected,
    Other,
}

/// How a count relates to the exits KVM_RUN returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counted {
    /// One per return from KVM_RUN: these add up to the exits wbvmm handled.
    Exit,
    /// A subset of another kind's exits (left out of totals).
    PartOf(ExitKind),
}

/// One row of [`EXIT_KINDS`].
#[derive(Clone, Copy, Debug)]
pub struct ExitKindInfo {
    pub kind: ExitKind,
    /// The key in `--stats` JSON (`exits`, `exit_latency`) and the summary's row name.
    pub name: &'static str,
    pub counted: Counted,
    /// Whether the run loop records its handling time (KVM_RUN return to the next KVM_RUN).
    pub timed: bool,
}

const fn row(kind: ExitKind, name: &'static str, counted: Counted, timed: bool) -> ExitKindInfo {
    ExitKindInfo {
        kind,
        name,
        counted,
        timed,
    }
}

use Counted::{Exit, PartOf};

/// Every [`ExitKind`], in report order (row `i` is the kind with discriminant `i`).
pub const EXIT_KINDS: [ExitKindInfo; ExitKind::COUNT] = [
    row(ExitKind::IoIn, "io_in", Exit, true),
    row(ExitKind::IoOut, "io_out", Exit, true),
    row(ExitKind::MmioRead, "mmio_read", Exit, true),
    row(ExitKind::MmioWrite, "mmio_write", Exit, true),
    // Port I/O no device claims (reads answer all-ones).
    row(
        ExitKind::UnclaimedPio,
        "unclaimed_pio",
        PartOf(ExitKind::IoIn),
        false,
    ),
    // Only without an in-kernel LAPIC; handling is a 1 ms sleep, so not timed.
    row(ExitKind::Hlt, "hlt", Exit, false),
    // KVM_RUN interrupted by a signal (a kick) or an AP woken by SIPI.
    row(ExitKind::Interrupted, "interrupted", Exit, false),
    // KVM could not emulate; the emulation fallback's time is in the latency.
    row(ExitKind::InternalError, "internal_error", Exit, true),
    // Internal errors the fallback answered by injecting #BP.
    row(
        ExitKind::Int3Injected,
        "int3_injected",
        PartOf(ExitKind::InternalError),
        false,
    ),
    // An exit wbvmm does not handle (it ends the VM).
    row(ExitKind::Other, "other", Exit, false),
];

// The table is indexed by discriminant; check that at compile time.
const _: () = {
    let mut i = 0;
    while i < EXIT_KINDS.len() {
        assert!(EXIT_KINDS[i].kind as usize == i);
        i += 1;
    }
};

impl ExitKind {
    pub const COUNT: usize = ExitKind::Other as usize + 1;

    /// Every kind, in report order.
    pub fn all() -> impl Iterator<Item = ExitKind> {
        EXIT_KINDS.iter().map(|r| r.kind)
    }

    pub const fn info(self) -> &'static ExitKindInfo {
        &EXIT_KINDS[self as usize]
    }

    /// The JSON key: `io_in`, `mmio_write`, `internal_error`, ...
    pub const fn name(self) -> &'static str {
        self.info().name
    }

    #[inline]
    pub const fn timed(self) -> bool {
        self.info().timed
    }

    pub fn from_name(name: &str) -> Option<ExitKind> {
        EXIT_KINDS.iter().find(|r| r.name == name).map(|r| r.kind)
    }
}

impl fmt::Display for ExitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for ExitKind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for ExitKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        ExitKind::from_name(&name).ok_or_else(|| {
            let known: Vec<&str> = EXIT_KINDS.iter().map(|r| r.name).collect();
            de::Error::custom(format!(
                "unknown exit kind `{name}` (known: {})",
                known.join(", ")
            ))
        })
    }
}

/// Exits counted by one vCPU (or merged over all), one counter per [`ExitKind`].
/// Serialised as `{"io_in": n, "io_out": n, ...}` in table order, every kind present;
/// read back with missing kinds as 0.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExitCounters([u64; ExitKind::COUNT]);

impl ExitCounters {
    #[inline]
    pub fn count(&mut self, kind: ExitKind) {
        self.0[kind as usize] += 1;
    }

    pub fn get(&self, kind: ExitKind) -> u64 {
        self.0[kind as usize]
    }

    pub fn set(&mut self, kind: ExitKind, n: u64) {
        self.0[kind as usize] = n;
    }

    pub fn add(&mut self, o: &ExitCounters) {
        for (a, b) in self.0.iter_mut().zip(o.0.iter()) {
            *a += b;
        }
    }

    /// Returns from KVM_RUN that wbvmm handled: the [`Counted::Exit`] rows summed.
    pub fn total(&self) -> u64 {
        EXIT_KINDS
            .iter()
            .filter(|r| r.counted == Counted::Exit)
            .map(|r| self.get(r.kind))
            .fold(0, u64::saturating_add)
    }

    /// `(kind, count)` in table order.
    pub fn iter(&self) -> impl Iterator<Item = (ExitKind, u64)> + '_ {
        ExitKind::all().map(|k| (k, self.get(k)))
    }
}

impl Serialize for ExitCounters {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(ExitKind::COUNT))?;
        for (k, n) in self.iter() {
            m.serialize_entry(k.name(), &n)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for ExitCounters {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ExitCounters;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of exit counts by kind")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ExitCounters, A::Error> {
                let mut c = ExitCounters::default();
                while let Some((kind, n)) = map.next_entry::<ExitKind, u64>()? {
                    c.set(kind, n);
                }
                Ok(c)
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_parts_name_exits() {
        for (i, r) in EXIT_KINDS.iter().enumerate() {
            assert_eq!(ExitKind::from_name(r.name), Some(r.kind));
            assert!(
                EXIT_KINDS[..i].iter().all(|o| o.name != r.name),
                "{}",
                r.name
            );
            if let Counted::PartOf(whole) = r.counted {
                assert_eq!(whole.info().counted, Counted::Exit, "{}", r.name);
            }
        }
        assert_eq!(ExitKind::all().count(), ExitKind::COUNT);
    }

    #[test]
    fn counters_round_trip_through_json_in_table_order() {
        let mut c = ExitCounters::default();
        for (i, k) in ExitKind::all().enumerate() {
            for _ in 0..=i {
                c.count(k);
            }
        }
        let json = serde_json::to_string(&c).unwrap();
        assert!(
            json.starts_with(
                r#"{"io_in":1,"io_out":2,"mmio_read":3,"mmio_write":4,"unclaimed_pio":5,"#
            ),
            "{json}"
        );
        assert!(json.contains(r#""internal_error":8"#), "{json}");
        assert_eq!(serde_json::from_str::<ExitCounters>(&json).unwrap(), c);
        // Subsets stay out of the total: 1+2+3+4 + 6+7+8 + 10.
        assert_eq!(c.total(), 41);

        let old: ExitCounters = serde_json::from_str(r#"{"io_out": 7}"#).unwrap();
        assert_eq!((old.get(ExitKind::IoOut), old.total()), (7, 7));
        let e = serde_json::from_str::<ExitCounters>(r#"{"warp": 1}"#).unwrap_err();
        assert!(e.to_string().contains("unknown exit kind `warp`"), "{e}");
    }
}

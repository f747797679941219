//! KVM's binary statistics (`KVM_GET_STATS_FD`, Linux 5.14+).
//!
//! `KVM_GET_STATS_FD` on a VM fd or a vCPU fd returns a read-only fd laid out as:
//!
//! ```text
//! header  (struct kvm_stats_header, 24 bytes, at offset 0)
//! id      (name_size bytes at id_offset, e.g. "kvm-1234/vcpu-0", NUL-padded)
//! descs   (num_desc * (16 + name_size) bytes at desc_offset: struct kvm_stats_desc + name)
//! data    (u64 values at data_offset + desc.offset, desc.size values each)
//! ```
//!
//! The header, id and descriptors never change for the life of the fd, so
//! [`KvmStatsReader`] reads them once; every [`KvmStatsReader::sample`] re-reads only the
//! data block with one `pread`.
//!
//! A sample is a [`KvmStats`]: counter name to value, serialised as plain JSON
//! (`{"exits": 123, "halt_poll_success_hist": [0, 4, ...]}`). Units are left out of the
//! JSON on purpose (KVM's names already say `_ns`, `_hist`, ...); the full descriptors are
//! available from [`KvmStatsReader::descriptors`].

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, FromRawFd};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// `KVM_GET_STATS_FD` = `_IO(KVMIO, 0xce)`.
pub const KVM_GET_STATS_FD: u64 = 0xAECE;

/// `sizeof(struct kvm_stats_header)`.
const HEADER_SIZE: usize = 24;
/// `sizeof(struct kvm_stats_desc)` without the flexible `name` array.
const DESC_FIXED_SIZE: usize = 16;
/// Sanity limits so a corrupt header cannot make us allocate gigabytes.
const MAX_NAME_SIZE: u32 = 4096;
const MAX_DESCS: u32 = 65536;
const MAX_DATA_BYTES: usize = 64 << 20;

/// Errors from opening or reading a KVM stats fd.
#[derive(Debug, Error)]
pub enum KvmStatsError {
    #[error("this host's KVM has no binary stats (KVM_CAP_BINARY_STATS_FD)")]
    NotSupported(#[source] io::Error),
    #[error("KVM_GET_STATS_FD failed")]
    Ioctl(#[source] io::Error),
    #[error("cannot read the KVM stats {what} ({len} bytes at offset {offset})")]
    Read {
        what: &'static str,
        offset: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("malformed KVM stats {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
}

/// What a statistic measures (`KVM_STATS_TYPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvmStatKind {
    /// Monotonic counter; summed when merging.
    Cumulative,
    /// Current value (a gauge); summed when merging.
    Instant,
    /// Highest value seen; the maximum is kept when merging.
    Peak,
    /// Linear histogram with `bucket_size`-wide buckets.
    LinearHist,
    /// Log2 histogram.
    LogHist,
    /// A type this code does not know; treated like a counter.
    Unknown(u32),
}

impl KvmStatKind {
    fn from_flags(flags: u32) -> Self {
        use kvm_bindings::*;
        match flags & KVM_STATS_TYPE_MASK {
            KVM_STATS_TYPE_CUMULATIVE => Self::Cumulative,
            KVM_STATS_TYPE_INSTANT => Self::Instant,
            KVM_STATS_TYPE_PEAK => Self::Peak,
            KVM_STATS_TYPE_LINEAR_HIST => Self::LinearHist,
            KVM_STATS_TYPE_LOG_HIST => Self::LogHist,
            t => Self::Unknown(t),
        }
    }
}

/// Unit of a statistic (`KVM_STATS_UNIT_*`), scaled by `base^exponent`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvmStatUnit {
    None,
    Bytes,
    Seconds,
    Cycles,
    Boolean,
    Unknown(u32),
}

impl KvmStatUnit {
    fn from_flags(flags: u32) -> Self {
        use kvm_bindings::*;
        match flags & KVM_STATS_UNIT_MASK {
            KVM_STATS_UNIT_NONE => Self::None,
            KVM_STATS_UNIT_BYTES => Self::Bytes,
            KVM_STATS_UNIT_SECONDS => Self::Seconds,
            KVM_STATS_UNIT_CYCLES => Self::Cycles,
            KVM_STATS_UNIT_BOOLEAN => Self::Boolean,
            u => Self::Unknown(u),
        }
    }
}

/// One parsed `kvm_stats_desc`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KvmStatDesc {
    pub name: String,
    pub kind: KvmStatKind,
    pub unit: KvmStatUnit,
    /// Base of the exponent: 10 or 2.
    pub base: u32,
    /// Value scale: `value * base^exponent` is in `unit` (e.g. -9 with seconds = ns).
    pub exponent: i16,
    /// Number of u64 values (1 for scalars, buckets for histograms).
    pub size: u16,
    /// Byte offset of the values from the header's `data_offset`.
    pub offset: u32,
    /// Bucket width of a linear histogram.
    pub bucket_size: u32,
    /// The raw `flags` word.
    pub flags: u32,
}

/// One statistic's value.
///
/// Serialised untagged: scalars as a JSON number, arrays as a JSON array of numbers
/// (read back, every number is a [`KvmStatValue::Scalar`]: JSON does not say which
/// were peaks).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum KvmStatValue {
    /// A counter or gauge (`size == 1`); summed by [`KvmStats::add`].
    Scalar(u64),
    /// A peak value (`size == 1`, `KVM_STATS_TYPE_PEAK`); maxed by [`KvmStats::add`].
    Peak(u64),
    /// A histogram or array (`size != 1`); summed element-wise by [`KvmStats::add`].
    Array(Vec<u64>),
}

impl KvmStatValue {
    /// The value of a scalar or peak statistic; `None` for arrays.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Self::Scalar(v) | Self::Peak(v) => Some(*v),
            Self::Array(_) => None,
        }
    }

    fn add(&mut self, other: &KvmStatValue) {
        match (self, other) {
            (Self::Scalar(a), Self::Scalar(b) | Self::Peak(b)) => *a = a.wrapping_add(*b),
            (Self::Peak(a), Self::Peak(b) | Self::Scalar(b)) => *a = (*a).max(*b),
            (Self::Array(a), Self::Array(b)) => {
                if a.len() < b.len() {
                    a.resize(b.len(), 0);
                }
                for (x, y) in a.iter_mut().zip(b) {
                    *x = x.wrapping_add(*y);
                }
            }
            // Shapes differ (cannot happen for one KVM): keep ours.
            _ => {}
        }
    }
}

/// One sample of a stats fd: statistic name to value.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct KvmStats(pub BTreeMap<String, KvmStatValue>);

impl KvmStats {
    /// The value of a scalar statistic (counter, gauge or peak); `None` if absent or an array.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.0.get(name).and_then(KvmStatValue::as_u64)
    }

    /// The values of an array statistic (histogram); `None` if absent or a scalar.
    pub fn get_array(&self, name: &str) -> Option<&[u64]> {
        match self.0.get(name)? {
            KvmStatValue::Array(v) => Some(v),
            _ => None,
        }
    }

    /// Merge another sample in (e.g. all vCPUs into one): counters, gauges and histograms
    /// are summed, peaks keep the maximum; names only in `other` are copied.
    pub fn add(&mut self, other: &KvmStats) {
        for (name, v) in &other.0 {
            match self.0.get_mut(name) {
                Some(mine) => mine.add(v),
                None => {
                    self.0.insert(name.clone(), v.clone());
                }
            }
        }
    }

    /// Only the scalar statistics that are nonzero (for compact reports).
    pub fn nonzero_scalars(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0
            .iter()
            .filter_map(|(k, v)| v.as_u64().filter(|&x| x != 0).map(|x| (k.as_str(), x)))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// A KVM stats fd with its descriptors parsed; [`sample`](Self::sample) reads the values.
#[derive(Debug)]
pub struct KvmStatsReader {
    file: File,
    id: String,
    data_offset: u64,
    /// Bytes of the data block covered by the descriptors.
    data_len: usize,
    descs: Vec<KvmStatDesc>,
}

impl KvmStatsReader {
    /// Issue `KVM_GET_STATS_FD` on a VM fd (`VmFd`) or a vCPU fd (`VcpuFd`) and parse it.
    pub fn open(fd: &impl AsRawFd) -> Result<Self, KvmStatsError> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1; it does
        // not touch our memory.
        let ret = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_GET_STATS_FD as _) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                // Unknown ioctl: ENOTTY from the VM ioctl path, EINVAL from the vCPU one.
                Some(libc::ENOTTY) | Some(libc::EINVAL) => KvmStatsError::NotSupported(e),
                _ => KvmStatsError::Ioctl(e),
            });
        }
        // SAFETY: `ret` is a fresh fd that nothing else owns.
        let file = unsafe { File::from_raw_fd(ret) };
        Self::from_stats_fd(file)
    }

    /// Parse an already-open stats fd (or any file with the same layout, for tests).
    pub fn from_stats_fd(file: File) -> Result<Self, KvmStatsError> {
        let hdr = read_at(&file, "header", 0, HEADER_SIZE)?;
        let word = |i: usize| u32::from_ne_bytes(hdr[i * 4..i * 4 + 4].try_into().unwrap());
        let (_flags, name_size, num_desc) = (word(0), word(1), word(2));
        let (id_offset, desc_offset, data_offset) = (word(3), word(4), word(5));
        let malformed = |what, detail: String| KvmStatsError::Malformed { what, detail };
        if name_size == 0 || name_size > MAX_NAME_SIZE {
            return Err(malformed("header", format!("name_size {name_size}")));
        }
        if num_desc > MAX_DESCS {
            return Err(malformed("header", format!("num_desc {num_desc}")));
        }
        let name_size = name_size as usize;

        let id = if id_offset == 0 {
            String::new()
        } else {
            c_name(&read_at(&file, "id", id_offset.into(), name_size)?)
        };

        let desc_len = DESC_FIXED_SIZE + name_size;
        let raw = read_at(
            &file,
            "descriptors",
            desc_offset.into(),
            desc_len * num_desc as usize,
        )?;
        let mut descs = Vec::with_capacity(num_desc as usize);
        let mut data_len = 0usize;
        for d in raw.chunks_exact(desc_len) {
            let flags = u32::from_ne_bytes(d[0..4].try_into().unwrap());
            let exponent = i16::from_ne_bytes(d[4..6].try_into().unwrap());
            let size = u16::from_ne_bytes(d[6..8].try_into().unwrap());
            let offset = u32::from_ne_bytes(d[8..12].try_into().unwrap());
            let bucket_size = u32::from_ne_bytes(d[12..16].try_into().unwrap());
            let name = c_name(&d[DESC_FIXED_SIZE..]);
            if name.is_empty() {
                return Err(malformed("descriptor", format!("empty name at {offset}")));
            }
            let end = offset as usize + size as usize * 8;
            if end > MAX_DATA_BYTES {
                return Err(malformed(
                    "descriptor",
                    format!("{name}: data ends at {end}"),
                ));
            }
            data_len = data_len.max(end);
            descs.push(KvmStatDesc {
                kind: KvmStatKind::from_flags(flags),
                unit: KvmStatUnit::from_flags(flags),
                base: if flags & kvm_bindings::KVM_STATS_BASE_MASK
                    == kvm_bindings::KVM_STATS_BASE_POW2
                {
                    2
                } else {
                    10
                },
                name,
                exponent,
                size,
                offset,
                bucket_size,
                flags,
            });
        }
        Ok(Self {
            file,
            id,
            data_offset: data_offset.into(),
            data_len,
            descs,
        })
    }

    /// The fd's id string, e.g. `kvm-1234` (VM) or `kvm-1234/vcpu-0`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The parsed descriptors, in fd order.
    pub fn descriptors(&self) -> &[KvmStatDesc] {
        &self.descs
    }

    /// Read the current values (one `pread` of the data block).
    pub fn sample(&self) -> Result<KvmStats, KvmStatsError> {
        let data = read_at(&self.file, "data", self.data_offset, self.data_len)?;
        let value = |i: usize| {
            let b = i;
            u64::from_ne_bytes(data[b..b + 8].try_into().unwrap())
        };
        let mut out = BTreeMap::new();
        for d in &self.descs {
            let start = d.offset as usize;
            let v = if d.size == 1 {
                let x = value(start);
                if d.kind == KvmStatKind::Peak {
                    KvmStatValue::Peak(x)
                } else {
                    KvmStatValue::Scalar(x)
                }
            } else {
                KvmStatValue::Array((0..d.size as usize).map(|i| value(start + 8 * i)).collect())
            };
            out.insert(d.name.clone(), v);
        }
        Ok(KvmStats(out))
    }
}

/// `pread` exactly `len` bytes at `offset`.
fn read_at(
    file: &File,
    what: &'static str,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, KvmStatsError> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)
        .map_err(|source| KvmStatsError::Read {
            what,
            offset,
            len,
            source,
        })?;
    Ok(buf)
}

/// A NUL-padded C string field as a `String` (lossy on bad UTF-8).
fn c_name(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const NAME_SIZE: usize = 48;

    struct TempFile(std::path::PathBuf);
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn temp_file(bytes: &[u8]) -> (TempFile, File) {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "wbvmm-kvm-stats-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let mut f = File::create(&path).unwrap();
        f.write_all(bytes).unwrap();
        drop(f);
        let f = File::open(&path).unwrap();
        (TempFile(path), f)
    }

    fn desc(flags: u32, exponent: i16, size: u16, offset: u32, bucket: u32, name: &str) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&flags.to_ne_bytes());
        d.extend_from_slice(&exponent.to_ne_bytes());
        d.extend_from_slice(&size.to_ne_bytes());
        d.extend_from_slice(&offset.to_ne_bytes());
        d.extend_from_slice(&bucket.to_ne_bytes());
        let mut n = name.as_bytes().to_vec();
        n.resize(NAME_SIZE, 0);
        d.extend_from_slice(&n);
        d
    }

    /// header | id | 3 descriptors | data (exits, halt_poll_ns peak, a 4-bucket histogram).
    fn synthetic(data: &[u64; 6]) -> Vec<u8> {
        use kvm_bindings::*;
        let descs = [
            desc(KVM_STATS_TYPE_CUMULATIVE, 0, 1, 0, 0, "exits"),
            desc(
                KVM_STATS_TYPE_PEAK | KVM_STATS_UNIT_SECONDS,
                -9,
                1,
                8,
                0,
                "max_halt_ns",
            ),
            desc(
                KVM_STATS_TYPE_LOG_HIST | KVM_STATS_BASE_POW2,
                0,
                4,
                16,
                0,
                "halt_wait_hist",
            ),
        ]
        .concat();
        let id_offset = HEADER_SIZE as u32;
        let desc_offset = id_offset + NAME_SIZE as u32;
        // Leave a gap before the data to check data_offset is honoured.
        let data_offset = desc_offset + descs.len() as u32 + 8;
        let mut f = Vec::new();
        for w in [0, NAME_SIZE as u32, 3, id_offset, desc_offset, data_offset] {
            f.extend_from_slice(&w.to_ne_bytes());
        }
        let mut id = b"kvm-42/vcpu-0".to_vec();
        id.resize(NAME_SIZE, 0);
        f.extend_from_slice(&id);
        f.extend_from_slice(&descs);
        f.extend_from_slice(&[0xff; 8]);
        for v in data {
            f.extend_from_slice(&v.to_ne_bytes());
        }
        f
    }

    #[test]
    fn parses_synthetic_stats_file() {
        let (_t, file) = temp_file(&synthetic(&[7, 900, 1, 2, 3, 4]));
        let r = KvmStatsReader::from_stats_fd(file).unwrap();
        assert_eq!(r.id(), "kvm-42/vcpu-0");
        let d = r.descriptors();
        assert_eq!(d.len(), 3);
        assert_eq!(d[0].name, "exits");
        assert_eq!(d[0].kind, KvmStatKind::Cumulative);
        assert_eq!(d[1].kind, KvmStatKind::Peak);
        assert_eq!(
            (d[1].unit, d[1].exponent, d[1].base),
            (KvmStatUnit::Seconds, -9, 10)
        );
        assert_eq!(
            (d[2].kind, d[2].size, d[2].base),
            (KvmStatKind::LogHist, 4, 2)
        );

        let s = r.sample().unwrap();
        assert_eq!(s.get("exits"), Some(7));
        assert_eq!(s.get("max_halt_ns"), Some(900));
        assert_eq!(s.get("halt_wait_hist"), None);
        assert_eq!(s.get_array("halt_wait_hist"), Some(&[1, 2, 3, 4][..]));
        assert_eq!(s.get("nope"), None);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(
            json,
            r#"{"exits":7,"halt_wait_hist":[1,2,3,4],"max_halt_ns":900}"#
        );
    }

    #[test]
    fn resamples_data_each_time() {
        let (t, file) = temp_file(&synthetic(&[7, 900, 1, 2, 3, 4]));
        let r = KvmStatsReader::from_stats_fd(file).unwrap();
        assert_eq!(r.sample().unwrap().get("exits"), Some(7));
        std::fs::write(&t.0, synthetic(&[8, 901, 1, 2, 3, 5])).unwrap();
        let s = r.sample().unwrap();
        assert_eq!(s.get("exits"), Some(8));
        assert_eq!(s.get_array("halt_wait_hist"), Some(&[1, 2, 3, 5][..]));
    }

    #[test]
    fn add_sums_counters_and_maxes_peaks() {
        let (_t, f1) = temp_file(&synthetic(&[7, 900, 1, 2, 3, 4]));
        let (_u, f2) = temp_file(&synthetic(&[5, 100, 10, 20, 30, 40]));
        let a = KvmStatsReader::from_stats_fd(f1).unwrap().sample().unwrap();
        let b = KvmStatsReader::from_stats_fd(f2).unwrap().sample().unwrap();
        let mut m = KvmStats::default();
        m.add(&a);
        assert_eq!(m, a);
        m.add(&b);
        assert_eq!(m.get("exits"), Some(12));
        assert_eq!(m.get("max_halt_ns"), Some(900));
        assert_eq!(m.get_array("halt_wait_hist"), Some(&[11, 22, 33, 44][..]));
        assert_eq!(
            m.nonzero_scalars().collect::<Vec<_>>(),
            vec![("exits", 12), ("max_halt_ns", 900)]
        );
    }

    #[test]
    fn rejects_truncated_and_malformed() {
        let full = synthetic(&[7, 900, 1, 2, 3, 4]);
        let (_t, f) = temp_file(&full[..10]);
        let e = KvmStatsReader::from_stats_fd(f).unwrap_err();
        assert!(
            matches!(e, KvmStatsError::Read { what: "header", .. }),
            "{e}"
        );

        // Descriptors fine, data cut short: open works, sample fails.
        let (_t, f) = temp_file(&full[..full.len() - 4]);
        let r = KvmStatsReader::from_stats_fd(f).unwrap();
        let e = r.sample().unwrap_err();
        assert!(matches!(e, KvmStatsError::Read { what: "data", .. }), "{e}");

        let mut bad = full.clone();
        bad[4..8].copy_from_slice(&0u32.to_ne_bytes()); // name_size 0
        let (_t, f) = temp_file(&bad);
        let e = KvmStatsReader::from_stats_fd(f).unwrap_err();
        assert!(matches!(e, KvmStatsError::Malformed { .. }), "{e}");
    }

    #[test]
    fn not_supported_on_a_non_kvm_fd() {
        // /dev/null answers unknown ioctls with ENOTTY: reported as "no binary stats".
        let f = File::open("/dev/null").unwrap();
        let e = KvmStatsReader::open(&f).unwrap_err();
        assert!(matches!(e, KvmStatsError::NotSupported(_)), "{e}");
        assert!(e.to_string().contains("KVM_CAP_BINARY_STATS_FD"), "{e}");
    }

    #[test]
    fn samples_a_real_vm_and_vcpu() {
        let kvm = match kvm_ioctls::Kvm::new() {
            Ok(k) => k,
            Err(e) => {
                eprintln!("!!! SKIPPING samples_a_real_vm_and_vcpu: cannot open /dev/kvm: {e}");
                return;
            }
        };
        let cap = kvm.check_extension_raw(kvm_bindings::KVM_CAP_BINARY_STATS_FD.into());
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let vm_stats = match KvmStatsReader::open(&vm) {
            Ok(r) => r,
            Err(KvmStatsError::NotSupported(e)) if cap <= 0 => {
                eprintln!("!!! SKIPPING samples_a_real_vm_and_vcpu: no KVM binary stats: {e}");
                return;
            }
            Err(e) => panic!(
                "KVM_CAP_BINARY_STATS_FD={cap} but: {}",
                crate::error_chain(&e)
            ),
        };
        let vcpu_stats = KvmStatsReader::open(&vcpu).unwrap();
        assert!(vm_stats.id().starts_with("kvm-"), "{}", vm_stats.id());
        assert!(vcpu_stats.id().contains("vcpu"), "{}", vcpu_stats.id());

        let v = vm_stats.sample().unwrap();
        assert!(v.0.contains_key("remote_tlb_flush"), "{:?}", v.0.keys());
        let c = vcpu_stats.sample().unwrap();
        assert!(c.get("exits").is_some(), "{:?}", c.0.keys());
        for name in ["io_exits", "mmio_exits", "halt_exits"] {
            assert!(c.0.contains_key(name), "no {name} in {:?}", c.0.keys());
        }
        let mut sum = c.clone();
        sum.add(&c);
        assert_eq!(sum.get("exits"), c.get("exits").map(|x| x * 2));
        serde_json::to_string(&c).unwrap();
    }
}

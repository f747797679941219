//! The `--stats` report: JSON written when the VM ends (and on SIGUSR1 while it
//! runs). Nested objects, so new parts join without breaking readers.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::latency::LatencySummary;
use crate::memory::MemoryStats;
use crate::vcpu::ExitCounters;
use crate::vmm::{InterruptCounts, KvmReport, RunReport};

#[derive(Debug, Serialize)]
pub struct VmStats<'a> {
    /// "running" for a SIGUSR1 snapshot.
    pub outcome: String,
    pub exit_code: Option<i32>,
    pub setup_us: u128,
    pub rss_overhead_bytes: u64,
    pub threads: Threads<'a>,
    pub exits: &'a ExitCounters,
    /// wbvmm's handling time per exit kind (KVM_RUN return to the next KVM_RUN).
    pub exit_latency: BTreeMap<crate::exit_kind::ExitKind, LatencySummary>,
    pub exits_by_device: Vec<DeviceExits>,
    /// Emulation fallbacks per mnemonic: count and total handling time.
    pub emulated: &'a crate::emulate::EmulationStats,
    pub interrupts: &'a InterruptCounts,
    pub memory: &'a MemoryStats,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub net: Option<&'a crate::net::NetStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kvm: Option<&'a KvmReport>,
}

#[derive(Debug, Serialize)]
pub struct Threads<'a> {
    /// Host thread ids of `vcpu0`, `vcpu1`, ... for `taskset -p`.
    pub vcpu: &'a [i32],
    /// Host thread id of `wbvmm-io`.
    pub io: i32,
}

#[derive(Debug, Serialize)]
pub struct DeviceExits {
    pub bus: &'static str,
    pub device: &'static str,
    pub offset: u64,
    pub count: u64,
}

impl<'a> VmStats<'a> {
    pub fn from_report(r: &'a RunReport) -> Self {
        Self {
            outcome: r
                .outcome
                .as_ref()
                .map(|o| format!("{o:?}"))
                .unwrap_or_else(|| "running".into()),
            exit_code: r.outcome.as_ref().map(|o| o.exit_code()),
            setup_us: r.setup_time.as_micros(),
            rss_overhead_bytes: r.rss_overhead_bytes,
            threads: Threads {
                vcpu: &r.vcpu_tids,
                io: r.io_tid,
            },
            exits: &r.exits,
            exit_latency: r.exit_latency.summary(),
            exits_by_device: r
                .exits_by_device
                .iter()
                .map(|(k, n)| DeviceExits {
                    bus: k.bus.name(),
                    device: k.device.name(),
                    offset: k.offset,
                    count: *n,
                })
                .collect(),
            emulated: &r.emulated,
            interrupts: &r.interrupts,
            memory: &r.memory,
            net: r.net.as_ref(),
            kvm: r.kvm.as_ref(),
        }
    }
}

/// A `--stats` file that cannot be written, or a stats file that cannot be read back.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("cannot create the --stats file {path}: give a file path in an existing directory that wbvmm can write to")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the --stats file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot encode the statistics as JSON")]
    Encode(#[source] serde_json::Error),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a --stats JSON file")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Where `--stats` goes: `--stats` alone prints to stderr, `--stats=PATH` writes a file
/// (see [`write_file`]).
pub fn write(report: &RunReport, path: Option<&Path>) -> Result<(), StatsError> {
    let json =
        serde_json::to_string_pretty(&VmStats::from_report(report)).map_err(StatsError::Encode)?;
    match path {
        Some(p) => write_file(p, (json + "\n").as_bytes()),
        None => {
            eprintln!("{json}");
            Ok(())
        }
    }
}

/// The file [`write_file`] writes first and then renames over `path`.
fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// What a write to `path` replaces: the file a symlink points to, not the link.
fn target(path: &Path) -> PathBuf {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
        }
        _ => path.to_path_buf(),
    }
}

/// True when `path` is something other than a regular file (a device such as
/// /dev/stderr, or a FIFO): written in place, never replaced by a rename.
fn is_special(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir())
}

/// Write `bytes` to `path` atomically: to `PATH.tmp` in the same directory, then
/// renamed over `path`, so that a reader (while SIGUSR1 snapshots rewrite it) sees
/// the old file or the new one, never a part. A symlink's target is replaced, not the
/// link; a device or FIFO is written in place.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), StatsError> {
    let err = |source| StatsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let target = target(path);
    if is_special(&target) {
        return std::fs::write(&target, bytes).map_err(err);
    }
    let tmp = temp_path(&target);
    let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &target));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(err)
}

/// Before the VM starts: check that [`write_file`] will be able to write `path`, by
/// creating (and removing) the same `PATH.tmp` it writes and renames, so a missing or
/// read-only directory fails now instead of after the guest ran; a directory given
/// as PATH fails too. A device or FIFO only has to exist.
pub fn check_destination(path: &Path) -> Result<(), StatsError> {
    let err = |source| StatsError::Create {
        path: path.to_path_buf(),
        source,
    };
    let target = target(path);
    if is_special(&target) {
        return Ok(());
    }
    if target.is_dir() {
        return Err(err(io::Error::from_raw_os_error(libc::EISDIR)));
    }
    let tmp = temp_path(&target);
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(err)?;
    std::fs::remove_file(&tmp).map_err(err)
}

/// A `--stats` file read back, for `wbvmm stats FILE`.
pub fn read_file(path: &Path) -> Result<serde_json::Value, StatsError> {
    let text = std::fs::read_to_string(path).map_err(|source| StatsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| StatsError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error_chain;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("wbvmm-stats-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).unwrap();
        d
    }

    #[test]
    fn write_file_replaces_and_leaves_no_temp() {
        let d = scratch("replace");
        let p = d.join("s.json");
        write_file(&p, b"{\"a\": 1}\n").unwrap();
        write_file(&p, b"{\"a\": 2}\n").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "{\"a\": 2}\n");
        let names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["s.json"]);
        std::fs::remove_dir_all(d).unwrap();
    }

    /// A reader racing the writer sees one whole version or the other.
    #[test]
    fn readers_never_see_a_partial_file() {
        let d = scratch("race");
        let p = d.join("s.json");
        let big = |n: u8| vec![b'a' + n; 1 << 20];
        write_file(&p, &big(0)).unwrap();
        let reader = {
            let p = p.clone();
            std::thread::spawn(move || {
                for _ in 0..200 {
                    let b = std::fs::read(&p).unwrap();
                    assert_eq!(b.len(), 1 << 20);
                    assert!(b.iter().all(|&c| c == b[0]));
                }
            })
        };
        for i in 0..50 {
            write_file(&p, &big(i % 2)).unwrap();
        }
        reader.join().unwrap();
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn check_destination_reports_the_path_and_errno() {
        let d = scratch("check");
        let ok = d.join("s.json");
        check_destination(&ok).unwrap();
        assert!(!ok.exists() && !temp_path(&ok).exists());

        let missing = d.join("nosuch/s.json");
        let e = check_destination(&missing).unwrap_err();
        let chain = error_chain(&e);
        assert!(
            chain.starts_with(&format!(
                "cannot create the --stats file {}",
                missing.display()
            )),
            "{chain}"
        );
        assert_eq!(chain.matches("(os error 2)").count(), 1, "{chain}");

        let e = check_destination(&d).unwrap_err();
        assert!(
            error_chain(&e).contains("Is a directory (os error 21)"),
            "{e}"
        );

        // A device is written in place and needs no temporary file.
        check_destination(Path::new("/dev/null")).unwrap();
        write_file(Path::new("/dev/null"), b"{}").unwrap();
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn write_failure_names_the_path() {
        let d = scratch("fail");
        let p = d.join("gone/s.json");
        let e = write_file(&p, b"{}").unwrap_err();
        let chain = error_chain(&e);
        assert!(
            chain.starts_with(&format!("cannot write the --stats file {}", p.display())),
            "{chain}"
        );
        assert!(
            chain.contains("caused by: No such file or directory (os error 2)"),
            "{chain}"
        );
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn read_file_errors() {
        let d = scratch("read");
        let p = d.join("s.json");
        let e = read_file(&p).unwrap_err();
        assert!(error_chain(&e).contains("(os error 2)"), "{e}");
        std::fs::write(&p, "not json").unwrap();
        let e = read_file(&p).unwrap_err();
        assert!(e.to_string().contains("is not a --stats JSON file"), "{e}");
        assert!(
            error_chain(&e).contains("caused by: expected"),
            "{}",
            error_chain(&e)
        );
        std::fs::remove_dir_all(d).unwrap();
    }
}

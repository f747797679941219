//! The `--stats` report: JSON written when the VM ends (and on SIGUSR1 while it
//! runs), and read back by `wbvmm stats`. One typed schema ([`schema::VmStats`]) for
//! both; [`summary`] renders it as tables. Nested objects, so new parts join without
//! breaking readers.

use std::io;
use std::path::{Path, PathBuf};

pub mod schema;
pub mod summary;
mod table;

pub use schema::VmStats;

use crate::vmm::RunReport;

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
    #[error("{path} is not a --stats JSON file (or one written by an incompatible wbvmm)")]
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

/// A value for `wbvmm stats --get`, for shell scripts: strings without quotes,
/// numbers and booleans as they are, arrays of those space-separated, anything else
/// as compact JSON.
pub fn plain_value(v: &serde_json::Value) -> String {
    use serde_json::Value;
    let scalar = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(_) | Value::Bool(_) => Some(v.to_string()),
        _ => None,
    };
    if let Some(s) = scalar(v) {
        return s;
    }
    if let Value::Array(a) = v {
        if let Some(parts) = a.iter().map(scalar).collect::<Option<Vec<_>>>() {
            return parts.join(" ");
        }
    }
    v.to_string()
}

/// A `--stats` file read back, for `wbvmm stats FILE`.
pub fn read_file(path: &Path) -> Result<VmStats, StatsError> {
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
mod tests;

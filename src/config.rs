//! What the user asked for, parsed and checked before any KVM object exists.

use std::path::PathBuf;
use std::str::FromStr;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "'{0}' is not a size: use a number with an optional K, M or G suffix, like 512M or 2G"
    )]
    BadSize(String),
    #[error("memory size {0} is too small: wbvmm needs at least 8M for the boot structures and a kernel")]
    MemoryTooSmall(u64),
    #[error("memory size {0:#x} is not a multiple of 4 KiB")]
    MemoryUnaligned(u64),
    #[error("'{0}' is not a serial mode: use stdio, null or file=PATH")]
    BadSerial(String),
    #[error("'{0}' is not a CPU feature edit: use a comma-separated list like -cx16,-xsave (known: {known})", known = crate::cpuid::KNOWN_FEATURES)]
    BadCpuFeature(String),
    #[error("--cpus must be at least 1")]
    ZeroCpus,
}

/// Parse `512M`, `2G`, `4096K`, `1048576` (bytes) and the like.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let t = s.trim();
    let bad = || ConfigError::BadSize(s.to_string());
    let (digits, shift) = match t.as_bytes().last().map(|c| c.to_ascii_uppercase()) {
        Some(b'K') => (&t[..t.len() - 1], 10),
        Some(b'M') => (&t[..t.len() - 1], 20),
        Some(b'G') => (&t[..t.len() - 1], 30),
        Some(b'T') => (&t[..t.len() - 1], 40),
        Some(c) if c.is_ascii_digit() => (t, 0),
        _ => return Err(bad()),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Check a guest memory size.
pub fn check_memory_size(bytes: u64) -> Result<u64, ConfigError> {
    if bytes < (8 << 20) {
        return Err(ConfigError::MemoryTooSmall(bytes));
    }
    if !bytes.is_multiple_of(4096) {
        return Err(ConfigError::MemoryUnaligned(bytes));
    }
    Ok(bytes)
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialMode {
    /// Output to stdout; stdin forwarded to the guest (raw mode on a terminal).
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// Discarded.
    Null,
}

impl FromStr for SerialMode {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdio" => Ok(SerialMode::Stdio),
            "null" => Ok(SerialMode::Null),
            _ => match s.strip_prefix("file=") {
                Some(p) if !p.is_empty() => Ok(SerialMode::File(PathBuf::from(p))),
                _ => Err(ConfigError::BadSerial(s.to_string())),
            },
        }
    }
}

/// `-name` edits: CPUID features hidden from the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuFeatureEdits {
    pub hide: Vec<crate::cpuid::Feature>,
}

impl FromStr for CpuFeatureEdits {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut edits = CpuFeatureEdits::default();
        for word in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            let bad = || ConfigError::BadCpuFeature(word.to_string());
            let (sign, name) = word.split_at(1);
            let f: crate::cpuid::Feature = name.parse().map_err(|_| bad())?;
            if sign != "-" {
                return Err(bad());
            }
            edits.hide.push(f);
        }
        Ok(edits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in [
            "",
            "M",
            "12X",
            "-1G",
            "1.5G",
            "99999999999999999999G",
            "0x10M",
        ] {
            assert!(parse_size(bad).is_err(), "{bad} should not parse");
        }
        assert!(matches!(
            check_memory_size(1 << 20),
            Err(ConfigError::MemoryTooSmall(_))
        ));
        assert!(matches!(
            check_memory_size((16 << 20) + 1),
            Err(ConfigError::MemoryUnaligned(_))
        ));
        assert_eq!(check_memory_size(256 << 20), Ok(256 << 20));
    }

    #[test]
    fn serial_modes() {
        assert_eq!("stdio".parse(), Ok(SerialMode::Stdio));
        assert_eq!("null".parse(), Ok(SerialMode::Null));
        assert_eq!("file=/tmp/x".parse(), Ok(SerialMode::File("/tmp/x".into())));
        assert!("file=".parse::<SerialMode>().is_err());
        assert!("tty".parse::<SerialMode>().is_err());
    }

    #[test]
    fn cpu_features() {
        use crate::cpuid::Feature;
        let e: CpuFeatureEdits = "-cx16,-xsave,-x2apic".parse().unwrap();
        assert_eq!(e.hide, vec![Feature::Cx16, Feature::Xsave, Feature::X2apic]);
        assert!("+x2apic".parse::<CpuFeatureEdits>().is_err());
        assert!("cx16".parse::<CpuFeatureEdits>().is_err());
        assert!("-nosuch".parse::<CpuFeatureEdits>().is_err());
    }
}

//! Pinning wbvmm's threads to host CPUs: `--cpu-affinity 0=1,1=0-1` (vCPU N to a
//! CPU list) and `--io-affinity LIST` (the `wbvmm-io` thread). Each thread pins
//! itself before its first KVM_RUN / epoll wait, so no run happens on the wrong CPU.

use std::collections::BTreeMap;
use std::str::FromStr;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum AffinityError {
    #[error("'{0}' is not a CPU list: use numbers and ranges like 0,2-3")]
    BadList(String),
    #[error("'{0}' is not a vCPU affinity: use VCPU=LIST pairs like 0=1,1=0-1")]
    BadSpec(String),
    #[error(
        "host CPU {cpu} is not available to wbvmm (allowed: {allowed}); pick CPUs from that set"
    )]
    NoSuchCpu { cpu: usize, allowed: String },
    #[error("--cpu-affinity names vCPU {vcpu}, but the guest has {cpus} vCPU(s)")]
    NoSuchVcpu { vcpu: u32, cpus: u32 },
    #[error("cannot pin thread {thread} to CPUs {cpus:?}")]
    Apply {
        thread: String,
        cpus: Vec<usize>,
        source: std::io::Error,
    },
}

/// A set of host CPUs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CpuList(pub Vec<usize>);

impl FromStr for CpuList {
    type Err = AffinityError;
    fn from_str(s: &str) -> Result<Self, AffinityError> {
        let bad = || AffinityError::BadList(s.to_string());
        let mut cpus = Vec::new();
        for part in s.split(',').map(str::trim) {
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (a, b),
                None => (part, part),
            };
            let (a, b): (usize, usize) =
                (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
            if a > b || b >= libc::CPU_SETSIZE as usize {
                return Err(bad());
            }
            cpus.extend(a..=b);
        }
        cpus.sort_unstable();
        cpus.dedup();
        Ok(CpuList(cpus))
    }
}

/// `--cpu-affinity`: vCPU index to CPU list. Items are comma-separated; an item
/// without `=` adds to the previous vCPU's list (`0=1,3,1=0` pins vCPU 0 to 1 and 3).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VcpuAffinity(pub BTreeMap<u32, CpuList>);

impl FromStr for VcpuAffinity {
    type Err = AffinityError;
    fn from_str(s: &str) -> Result<Self, AffinityError> {
        let bad = || AffinityError::BadSpec(s.to_string());
        let mut map: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        let mut current = None;
        for item in s.split(',').map(str::trim) {
            match item.split_once('=') {
                Some((v, list)) => {
                    let v: u32 = v.parse().map_err(|_| bad())?;
                    map.entry(v).or_default().push(list.to_string());
                    current = Some(v);
                }
                None => map
                    .entry(current.ok_or_else(bad)?)
                    .or_default()
                    .push(item.to_string()),
            }
        }
        if map.is_empty() {
            return Err(bad());
        }
        let mut out = BTreeMap::new();
        for (v, parts) in map {
            out.insert(v, parts.join(",").parse()?);
        }
        Ok(VcpuAffinity(out))
    }
}

/// CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills the cpu_set_t we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Check every CPU in `list` is one this process may use.
pub fn check(list: &CpuList, allowed: &[usize]) -> Result<(), AffinityError> {
    match list.0.iter().find(|c| !allowed.contains(c)) {
        Some(&cpu) => Err(AffinityError::NoSuchCpu {
            cpu,
            allowed: allowed
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(","),
        }),
        None => Ok(()),
    }
}

/// Check a whole configuration before any thread starts.
pub fn validate(
    vcpus: &VcpuAffinity,
    io: Option<&CpuList>,
    cpus: u32,
) -> Result<(), AffinityError> {
    let allowed = allowed_cpus();
    for (&v, list) in &vcpus.0 {
        if v >= cpus {
            return Err(AffinityError::NoSuchVcpu { vcpu: v, cpus });
        }
        check(list, &allowed)?;
    }
    if let Some(l) = io {
        check(l, &allowed)?;
    }
    Ok(())
}

/// Pin the calling thread.
pub fn pin_current_thread(thread: &str, list: &CpuList) -> Result<(), AffinityError> {
    // SAFETY: builds a cpu_set_t we own and applies it to the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in &list.0 {
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(AffinityError::Apply {
                thread: thread.to_string(),
                cpus: list.0.clone(),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!("0".parse::<CpuList>().unwrap(), CpuList(vec![0]));
        assert_eq!(
            "3,0-1,1".parse::<CpuList>().unwrap(),
            CpuList(vec![0, 1, 3])
        );
        for bad in ["", "a", "2-1", "-1", "1-", "99999"] {
            assert!(bad.parse::<CpuList>().is_err(), "{bad}");
        }
    }

    #[test]
    fn vcpu_affinities() {
        let a: VcpuAffinity = "0=1,1=0-1".parse().unwrap();
        assert_eq!(a.0[&0], CpuList(vec![1]));
        assert_eq!(a.0[&1], CpuList(vec![0, 1]));
        let a: VcpuAffinity = "0=1,3,1=0".parse().unwrap();
        assert_eq!(a.0[&0], CpuList(vec![1, 3]));
        for bad in ["", "1", "x=1", "0=", "0=a", ",0=1"] {
            assert!(bad.parse::<VcpuAffinity>().is_err(), "{bad}");
        }
    }

    #[test]
    fn validation_against_the_host() {
        let allowed = allowed_cpus();
        assert!(!allowed.is_empty());
        let first = allowed[0];
        let ok: VcpuAffinity = format!("0={first}").parse().unwrap();
        assert!(validate(&ok, None, 1).is_ok());
        assert!(matches!(
            validate(&ok, None, 0),
            Err(AffinityError::NoSuchVcpu { .. })
        ));
        let missing: CpuList = "1000".parse().unwrap();
        assert!(matches!(
            validate(&VcpuAffinity::default(), Some(&missing), 1),
            Err(AffinityError::NoSuchCpu { cpu: 1000, .. })
        ));
    }

    #[test]
    fn pinning_a_thread_takes_effect() {
        let first = allowed_cpus()[0];
        let got = std::thread::spawn(move || {
            pin_current_thread("test", &CpuList(vec![first])).unwrap();
            allowed_cpus()
        })
        .join()
        .unwrap();
        assert_eq!(got, vec![first]);
    }
}

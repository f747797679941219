//! The `--stats` JSON, as types: [`VmStats`] is what wbvmm writes (built from a
//! [`RunReport`]) and what `wbvmm stats` reads back and renders. Every part reads
//! back with missing fields as their defaults, so a file from an older wbvmm still
//! renders; fields are only added, never renamed (scripts and tests read them).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::emulate::EmulationCount;
use crate::exit_kind::{ExitCounters, ExitKind};
use crate::latency::LatencySummary;
use crate::memory::MemoryStats;
use crate::vmm::RunReport;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VmStats {
    /// How the VM ended (`DebugExit(0)`, `Reset`, ...); "running" for a SIGUSR1 snapshot.
    pub outcome: String,
    pub exit_code: Option<i32>,
    /// Process start to the first KVM_RUN.
    pub setup_us: u64,
    /// wbvmm's resident memory beyond the resident guest RAM.
    pub rss_overhead_bytes: u64,
    pub threads: Threads,
    /// Where each vCPU was (RIP, CPL, kernel symbol), by id.
    pub vcpus: Vec<Vcpu>,
    pub exits: ExitCounters,
    /// wbvmm's handling time per exit kind (KVM_RUN return to the next KVM_RUN), for
    /// the kinds with samples.
    pub exit_latency: BTreeMap<ExitKind, LatencySummary>,
    /// Most exits first.
    pub exits_by_device: Vec<DeviceExits>,
    /// Emulation fallbacks per mnemonic: count and total handling time.
    pub emulated: BTreeMap<String, EmulationCount>,
    pub interrupts: Interrupts,
    pub memory: MemoryStats,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub net: Option<Net>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kvm: Option<Kvm>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Threads {
    /// Host thread ids of `vcpu0`, `vcpu1`, ... for `taskset -p`.
    pub vcpu: Vec<i32>,
    /// Host thread id of `wbvmm-io`.
    pub io: i32,
}

/// Exits to one register of one device (`offset` from the start of its range; the
/// port for `unclaimed` port I/O).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeviceExits {
    /// `pio` or `mmio`.
    pub bus: String,
    pub device: String,
    pub offset: u64,
    pub count: u64,
}

// The VMM's own report types are the schema's too (they derive Deserialize):
// one description of each section.
pub use crate::net::NetStats as Net;
pub use crate::run_report::VcpuAt as Vcpu;
pub use crate::vmm::{InterruptCounts as Interrupts, KvmReport as Kvm};

impl VmStats {
    pub fn from_report(r: &RunReport) -> Self {
        Self {
            outcome: r
                .outcome
                .as_ref()
                .map(|o| format!("{o:?}"))
                .unwrap_or_else(|| "running".into()),
            exit_code: r.outcome.as_ref().map(|o| o.exit_code()),
            setup_us: u64::try_from(r.setup_time.as_micros()).unwrap_or(u64::MAX),
            rss_overhead_bytes: r.rss_overhead_bytes,
            threads: Threads {
                vcpu: r.vcpu_tids.clone(),
                io: r.io_tid,
            },
            vcpus: r.vcpus.clone(),
            exits: r.exits.clone(),
            exit_latency: r.exit_latency.summary(),
            // Device names are looked up here, once per report, not per exit.
            exits_by_device: r
                .exits_by_device
                .iter()
                .map(|(k, n)| DeviceExits {
                    bus: k.bus.name().into(),
                    device: k.device.name().into(),
                    offset: k.offset,
                    count: *n,
                })
                .collect(),
            emulated: r.emulated.by_name(),
            interrupts: r.interrupts.clone(),
            memory: r.memory.clone(),
            net: r.net.clone(),
            kvm: r.kvm.clone(),
        }
    }

    /// The value at `path` (`exits.io_out`, `threads.vcpu.0`, `net`): object keys and
    /// array indices joined by dots.
    pub fn get(&self, path: &str) -> Option<serde_json::Value> {
        let mut v = serde_json::to_value(self).ok()?;
        for part in path.split('.').filter(|p| !p.is_empty()) {
            v = match v {
                serde_json::Value::Object(mut m) => m.remove(part)?,
                serde_json::Value::Array(mut a) => {
                    let i: usize = part.parse().ok()?;
                    (i < a.len()).then(|| a.swap_remove(i))?
                }
                _ => return None,
            };
        }
        Some(v)
    }
}

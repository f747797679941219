//! The `--stats` JSON, as types: [`VmStats`] is what wbvmm writes (built from a
//! [`RunReport`]) and what `wbvmm stats` reads back and renders. Every part reads
//! back with missing fields as their defaults, so a file from an older wbvmm still
//! renders; fields are only added, never renamed (scripts and tests read them).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::emulate::EmulationCount;
use crate::exit_kind::{ExitCounters, ExitKind};
use crate::kvm_stats::KvmStats;
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

/// Interrupts wbvmm raised, by source.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Interrupts {
    pub serial: u64,
    pub nic: u64,
}

/// KVM's own statistics, where the host offers them (KVM_GET_STATS_FD).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Kvm {
    pub vm: KvmStats,
    /// Summed over vCPUs.
    pub vcpu: KvmStats,
}

/// The NIC and its tap.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Net {
    pub tap: String,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_filtered: u64,
    pub rx_ring_full: u64,
    pub rx_disabled: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
    pub tap_rx_frames: u64,
    pub rx_backpressure: u64,
    pub tap_errors: u64,
}

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
            interrupts: Interrupts::from(&r.interrupts),
            memory: r.memory.clone(),
            net: r.net.as_ref().map(Net::from),
            kvm: r.kvm.as_ref().map(Kvm::from),
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

// The conversions below destructure every field, so a field added to the VMM's
// report types fails to build until the schema has it too.

impl From<&crate::vmm::InterruptCounts> for Interrupts {
    fn from(i: &crate::vmm::InterruptCounts) -> Self {
        let crate::vmm::InterruptCounts { serial, nic } = *i;
        Self { serial, nic }
    }
}

impl From<&crate::vmm::KvmReport> for Kvm {
    fn from(k: &crate::vmm::KvmReport) -> Self {
        let crate::vmm::KvmReport { vm, vcpu } = k;
        Self {
            vm: vm.clone(),
            vcpu: vcpu.clone(),
        }
    }
}

impl From<&crate::net::NetStats> for Net {
    fn from(n: &crate::net::NetStats) -> Self {
        let crate::net::NetStats {
            tap,
            rx_packets,
            rx_bytes,
            rx_filtered,
            rx_ring_full,
            rx_disabled,
            tx_packets,
            tx_bytes,
            tx_dropped,
            tap_rx_frames,
            rx_backpressure,
            tap_errors,
        } = n.clone();
        Self {
            tap,
            rx_packets,
            rx_bytes,
            rx_filtered,
            rx_ring_full,
            rx_disabled,
            tx_packets,
            tx_bytes,
            tx_dropped,
            tap_rx_frames,
            rx_backpressure,
            tap_errors,
        }
    }
}

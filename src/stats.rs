//! The `--stats` report: JSON written when the VM ends (and on SIGUSR1 while it
//! runs). Nested objects, so new parts join without breaking readers.

use std::collections::BTreeMap;

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
    pub exit_latency: BTreeMap<&'static str, LatencySummary>,
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
                    bus: k.bus,
                    device: k.device,
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

/// Where `--stats` goes: `--stats` alone prints to stderr, `--stats=PATH` writes a file.
pub fn write(report: &RunReport, path: Option<&std::path::Path>) -> std::io::Result<()> {
    let json = serde_json::to_string_pretty(&VmStats::from_report(report))
        .map_err(std::io::Error::other)?;
    match path {
        Some(p) => std::fs::write(p, json + "\n"),
        None => {
            eprintln!("{json}");
            Ok(())
        }
    }
}

//! The `--stats` report: JSON written when the VM ends. Nested objects, so later
//! parts (network, latency) join without breaking readers.

use serde::Serialize;

use crate::memory::MemoryStats;
use crate::vcpu::ExitCounters;
use crate::vmm::RunReport;

#[derive(Debug, Serialize)]
pub struct VmStats<'a> {
    pub outcome: String,
    pub exit_code: i32,
    pub setup_us: u128,
    pub rss_overhead_bytes: u64,
    pub threads: Threads<'a>,
    pub exits: &'a ExitCounters,
    pub memory: &'a MemoryStats,
    pub net: Option<&'a crate::net::NetStats>,
}

#[derive(Debug, Serialize)]
pub struct Threads<'a> {
    /// Host thread ids of `vcpu0`, `vcpu1`, ... for `taskset -p`.
    pub vcpu: &'a [i32],
    /// Host thread id of `wbvmm-io`.
    pub io: i32,
}

impl<'a> VmStats<'a> {
    pub fn from_report(r: &'a RunReport) -> Self {
        Self {
            outcome: format!("{:?}", r.outcome),
            exit_code: r.outcome.exit_code(),
            setup_us: r.setup_time.as_micros(),
            rss_overhead_bytes: r.rss_overhead_bytes,
            threads: Threads {
                vcpu: &r.vcpu_tids,
                io: r.io_tid,
            },
            exits: &r.exits,
            memory: &r.memory,
            net: r.net.as_ref(),
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

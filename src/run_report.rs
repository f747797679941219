//! What a run reports: the outcome, exits, interrupts, memory, KVM's and the NIC's
//! statistics, and wbvmm's own footprint. Gathered from a running VM's parts while it runs
//! (SIGUSR1) and when it ends; written as JSON by `crate::stats`.

use std::sync::atomic::Ordering;

use vm_memory::GuestMemoryMmap;

use crate::irq::IrqFdLine;
use crate::kvm_stats::{KvmStats, KvmStatsReader};
use crate::memory::{MemoryStats, SlotRegistry};
use crate::net::{NetDevice, NetStats};
use crate::symbols::KernelSymbols;
use crate::vcpu::{DeviceKey, ExitCounters, VcpuStats, VmOutcome};

/// When the process started (set first thing in `main`), for setup timing.
pub static PROCESS_START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// The result of a run.
pub struct RunReport {
    /// None while the VM still runs (a SIGUSR1 snapshot).
    pub outcome: Option<VmOutcome>,
    pub exits: ExitCounters,
    pub exit_latency: Box<crate::latency::ExitLatencies>,
    pub exits_by_device: Vec<(DeviceKey, u64)>,
    /// Instructions the emulation fallback carried out, by mnemonic.
    pub emulated: crate::emulate::EmulationStats,
    pub interrupts: InterruptCounts,
    pub memory: MemoryStats,
    pub kvm: Option<KvmReport>,
    pub net: Option<NetStats>,
    pub vcpu_tids: Vec<i32>,
    /// Where each vCPU was, by id.
    pub vcpus: Vec<VcpuAt>,
    pub io_tid: i32,
    /// Process start to the vCPU threads' start (just before the first KVM_RUN).
    pub setup_time: std::time::Duration,
    /// wbvmm's resident memory beyond the guest RAM pages that are resident.
    pub rss_overhead_bytes: u64,
}

/// Interrupts wbvmm raised, by source. Also the `--stats` schema's `interrupts`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct InterruptCounts {
    pub serial: u64,
    /// NIC INTx raises, re-raises after an EOI included.
    pub nic: u64,
    /// The guest's EOIs of the NIC's line (irqfd resample events).
    pub nic_resamples: u64,
}

/// Where one vCPU was in guest code. Also the `--stats` schema's `vcpus` entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct VcpuAt {
    pub id: u32,
    pub rip: u64,
    /// The privilege level (CS.RPL): 0 kernel, 3 user.
    pub cpl: u8,
    /// `function+0xoffset` from the kernel ELF's symbol table, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symbol: Option<String>,
}

/// KVM's own statistics, where the host offers them (KVM_GET_STATS_FD). Also the
/// `--stats` schema's `kvm`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct KvmReport {
    pub vm: KvmStats,
    /// Summed over vCPUs.
    pub vcpu: KvmStats,
}

/// Resident bytes of the guest RAM mappings (mincore), so that they can be taken
/// out of the process's RSS.
fn guest_resident_bytes(mem: &GuestMemoryMmap) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let page = 4096usize;
    let mut total = 0u64;
    for r in mem.iter() {
        let Ok(host) = r.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
            continue;
        };
        let len = r.len() as usize;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: [host, host+len) is a mapping we own; mincore only fills `vec`.
        if unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) } == 0 {
            total += vec.iter().filter(|b| *b & 1 != 0).count() as u64 * page as u64;
        }
    }
    let _ = mem.num_regions();
    total
}

fn process_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// The parts of a running VM a report is gathered from.
pub(crate) struct ReportSources<'a> {
    pub memory: &'a SlotRegistry,
    pub net: Option<&'a NetDevice>,
    pub kvm_stats: Option<&'a (KvmStatsReader, Vec<KvmStatsReader>)>,
    pub serial_irq: &'a IrqFdLine,
    pub tids: &'a [i32],
    pub setup_time: std::time::Duration,
    pub ram: &'a GuestMemoryMmap,
    pub symbols: &'a KernelSymbols,
}

impl ReportSources<'_> {
    pub(crate) fn report(
        &self,
        outcome: Option<VmOutcome>,
        per_vcpu: &[VcpuStats],
        io_tid: i32,
    ) -> RunReport {
        let mut all = VcpuStats {
            memory: MemoryStats::for_registry(self.memory),
            ..Default::default()
        };
        for v in per_vcpu {
            all.merge(v);
        }
        if let Some(n) = self.net {
            all.memory.lookups.dma.merge(&n.dma.stats());
        }
        let mut vcpus: Vec<VcpuAt> = all
            .positions
            .iter()
            .map(|p| VcpuAt {
                id: p.id,
                rip: p.rip,
                cpl: p.cpl,
                symbol: self.symbols.table().describe(p.rip),
            })
            .collect();
        vcpus.sort_by_key(|v| v.id);
        let mut exits_by_device: Vec<(DeviceKey, u64)> = all.by_device.into_iter().collect();
        exits_by_device.sort_by_key(|e| std::cmp::Reverse(e.1));
        let kvm = self.kvm_stats.map(|(vm, vcpus)| {
            let mut vcpu = KvmStats::default();
            for r in vcpus {
                if let Ok(s) = r.sample() {
                    vcpu.add(&s);
                }
            }
            KvmReport {
                vm: vm.sample().unwrap_or_default(),
                vcpu,
            }
        });
        RunReport {
            outcome,
            exits: all.exits,
            exit_latency: all.latency,
            exits_by_device,
            emulated: all.emulated,
            interrupts: InterruptCounts {
                serial: self.serial_irq.raised.load(Ordering::Relaxed),
                nic: self
                    .net
                    .map(|n| n.irq.raised.load(Ordering::Relaxed))
                    .unwrap_or(0),
                nic_resamples: self
                    .net
                    .map(|n| n.irq.resamples.load(Ordering::Relaxed))
                    .unwrap_or(0),
            },
            memory: all.memory,
            kvm,
            vcpu_tids: self.tids.to_vec(),
            vcpus,
            io_tid,
            net: self.net.map(|n| n.stats()),
            setup_time: self.setup_time,
            rss_overhead_bytes: process_rss_bytes().saturating_sub(guest_resident_bytes(self.ram)),
        }
    }
}

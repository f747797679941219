//! wbvmm: a KVM virtual machine monitor.
pub mod affinity;
pub mod boot;
pub mod coalesced;
pub mod config;
pub mod cpuid;
pub mod emulate;
pub mod exit;
pub mod kvm_stats;
pub mod latency;
pub mod layout;
pub mod memory;
pub mod net;
pub mod probe;
pub mod seccomp;
pub mod stats;
pub mod stats_summary;
pub mod terminal;
pub mod vcpu;
pub mod vmm;

pub use exit::error_chain;

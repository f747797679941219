//! wbvmm: a KVM virtual machine monitor.
pub mod affinity;
pub mod boot;
pub mod coalesced;
pub mod config;
pub mod cpuid;
pub mod emulate;
pub mod exit;
pub mod exit_kind;
pub mod io_thread;
pub mod irq;
pub mod kvm;
pub mod kvm_stats;
pub mod latency;
pub mod layout;
pub mod legacy;
pub mod memory;
pub mod net;
pub mod probe;
pub mod run_report;
pub mod seccomp;
pub mod stats;
pub mod terminal;
pub mod vcpu;
pub mod vcpu_kick;
pub mod vmm;

pub use exit::error_chain;

//! wbvmm: a KVM virtual machine monitor.
pub mod memory;

//! KVM setup: opening /dev/kvm, the capabilities wbvmm needs, the VM with its
//! in-kernel irqchip and PIT, and each vCPU's architectural state at boot.
//!
//! A file of its own (Firecracker's `vstate/kvm.rs`) because `wbvmm probe` builds its
//! tiny VMs from the same pieces, and because this is the code to read when a host's
//! KVM refuses something.

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use thiserror::Error;
use vm_memory::GuestMemoryMmap;

use crate::boot::{self, BootError, BootProtocol};
use crate::cpuid::{self, CpuidParams};
use crate::layout::{KVM_IDENTITY_MAP_START, KVM_TSS_START};

#[derive(Debug, Error)]
pub enum KvmError {
    #[error("/dev/kvm does not exist: this host has no KVM; enable virtualization in firmware or load kvm_intel/kvm_amd")]
    Missing,
    #[error("permission denied opening /dev/kvm: run as root or add your user to the 'kvm' group")]
    Permission,
    #[error("cannot open /dev/kvm")]
    Open(#[source] kvm_ioctls::Error),
    #[error("this host's KVM lacks {0}, which wbvmm needs")]
    MissingCap(&'static str),
    #[error("cannot build the list of {count} boot MSRs for KVM")]
    MsrList {
        count: usize,
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    #[error("KVM refused to {what}")]
    Ioctl {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The boot registers need page tables and a GDT written into guest memory.
    #[error(transparent)]
    Boot(#[from] BootError),
}

/// `map_err` for a refused ioctl: says which one.
pub fn ioctl_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Ioctl { what, source }
}

/// What wbvmm cannot run without. IMMEDIATE_EXIT makes a vCPU kick race-free
/// (`crate::vcpu_kick`).
const REQUIRED_CAPS: [(Cap, &str); 5] = [
    (Cap::Irqchip, "the in-kernel irqchip (KVM_CAP_IRQCHIP)"),
    (Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Pit2, "the in-kernel PIT (KVM_CAP_PIT2)"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// Open /dev/kvm with errors a user can act on.
pub fn open_kvm() -> Result<Kvm, KvmError> {
    Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => KvmError::Missing,
        libc::EACCES | libc::EPERM => KvmError::Permission,
        _ => KvmError::Open(e),
    })
}

/// Create the VM with the TSS and identity map set.
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, KvmError> {
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(cap) {
            return Err(KvmError::MissingCap(name));
        }
    }
    let vm = kvm.create_vm().map_err(ioctl_err("create a VM"))?;
    // Instructions KVM's emulator cannot run come to wbvmm's fallback (crate::emulate)
    // instead of turning into a #UD (or a silent retry loop) inside KVM.
    if kvm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_EXIT_ON_EMULATION_FAILURE)) > 0 {
        let cap = kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_EXIT_ON_EMULATION_FAILURE,
            args: [1, 0, 0, 0],
            ..Default::default()
        };
        if let Err(e) = vm.enable_cap(&cap) {
            log::warn!("KVM_CAP_EXIT_ON_EMULATION_FAILURE offered but not enabled: {e}");
        }
    }
    vm.set_identity_map_address(KVM_IDENTITY_MAP_START)
        .map_err(ioctl_err("set the identity map address"))?;
    vm.set_tss_address(KVM_TSS_START as usize)
        .map_err(ioctl_err("set the TSS address"))?;
    Ok(vm)
}

/// The in-kernel PIC/IOAPIC/LAPICs and PIT; before any vCPU exists.
pub fn create_irqchip_and_pit(vm: &VmFd) -> Result<(), KvmError> {
    vm.create_irq_chip()
        .map_err(ioctl_err("create the in-kernel irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(ioctl_err("create the in-kernel PIT"))
}

/// Create vCPU `params.vcpu_id` and give it its CPUID, MSRs, FPU and LAPIC.
pub fn create_vcpu(kvm: &Kvm, vm: &VmFd, mut params: CpuidParams) -> Result<VcpuFd, KvmError> {
    let vcpu = vm
        .create_vcpu(u64::from(params.vcpu_id))
        .map_err(ioctl_err("create a vCPU"))?;
    params.tsc_khz = vcpu.get_tsc_khz().ok();
    configure_vcpu(kvm, &vcpu, &params)?;
    Ok(vcpu)
}

/// Per-vCPU architectural setup: CPUID, MSRs, FPU, LINT0/LINT1. Registers are set
/// separately (only the BSP's matter; INIT/SIPI resets the APs).
pub fn configure_vcpu(kvm: &Kvm, vcpu: &VcpuFd, params: &CpuidParams) -> Result<(), KvmError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl_err("report its CPUID"))?;
    cpuid::fixup(&mut cpuid, params);
    vcpu.set_cpuid2(&cpuid)
        .map_err(ioctl_err("set the vCPU's CPUID"))?;

    let supported = kvm
        .get_msr_index_list()
        .map_err(ioctl_err("list its MSRs"))?;
    let entries: Vec<kvm_bindings::kvm_msr_entry> = boot::regs::BOOT_MSRS
        .iter()
        .filter(|(i, _)| supported.as_slice().contains(i))
        .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = kvm_bindings::Msrs::from_entries(&entries).map_err(|source| KvmError::MsrList {
        count: entries.len(),
        source,
    })?;
    let written = vcpu
        .set_msrs(&msrs)
        .map_err(ioctl_err("set the boot MSRs"))?;
    if written != entries.len() {
        log::warn!("KVM accepted {written} of {} boot MSRs", entries.len());
    }
    vcpu.set_fpu(&boot::regs::boot_fpu())
        .map_err(ioctl_err("set the FPU state"))?;

    let mut lapic = vcpu.get_lapic().map_err(ioctl_err("read the LAPIC"))?;
    // LVT LINT0 (0x350) = ExtINT, LVT LINT1 (0x360) = NMI: the PIC's output and NMIs
    // reach the CPU as on a PC.
    for (reg, mode) in [(0x350usize, 7u32), (0x360, 4)] {
        let mut v = u32::from_le_bytes(
            lapic.regs[reg..reg + 4]
                .iter()
                .map(|b| *b as u8)
                .collect::<Vec<_>>()
                .try_into()
                .unwrap_or([0; 4]),
        );
        v = (v & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(ioctl_err("set the LAPIC"))?;
    Ok(())
}

/// Set the BSP's registers for the kernel's entry protocol.
pub fn set_boot_registers(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    info: &boot::BootInfo,
) -> Result<(), KvmError> {
    let mut sregs = vcpu
        .get_sregs()
        .map_err(ioctl_err("read special registers"))?;
    match info.protocol {
        BootProtocol::Linux64 => {
            boot::regs::setup_long_mode(mem, &mut sregs).map_err(BootError::from)?;
            vcpu.set_regs(&boot::regs::linux_regs(info.entry))
                .map_err(ioctl_err("set registers"))?;
        }
        BootProtocol::Pvh => {
            boot::regs::setup_pvh(mem, &mut sregs).map_err(BootError::from)?;
            vcpu.set_regs(&boot::regs::pvh_regs(info.entry))
                .map_err(ioctl_err("set registers"))?;
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(ioctl_err("set special registers"))
}

//! Building, running and tearing down a VM.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};
use wbvmm_devices::legacy::{DebugExit, ExitSink, IgnoredPort, SerialDevice, I8042};
use wbvmm_devices::{Bus, IrqLine};

use crate::affinity::{self, CpuList, VcpuAffinity};
use crate::boot::mptable::PciIntx;
use crate::boot::{self, BootError, BootProtocol};
use crate::coalesced::CoalescedRing;
use crate::config::{CpuFeatureEdits, SerialMode};
use crate::cpuid::{self, CpuidParams};
use crate::kvm_stats::{KvmStats, KvmStatsReader};
use crate::layout::*;
use crate::memory::{
    GuestRamDma, HostMapping, MemoryStats, SlotFlags, SlotIndexKind, SlotRegistry,
};
use crate::net::{NetConfig, NetDevice, NetStats, NIC_GSI, NIC_PCI_DEVICE};
use crate::terminal::{EscapeParser, FdWriter, Input, RawModeGuard};
use crate::vcpu::{self, DeviceKey, ExitCounters, ExitState, VcpuContext, VcpuStats, VmOutcome};
use wbvmm_devices::pci::PciRoot;

#[derive(Debug, Error)]
pub enum VmmError {
    #[error("/dev/kvm does not exist: this host has no KVM; enable virtualization in firmware or load kvm_intel/kvm_amd")]
    KvmMissing,
    #[error("permission denied opening /dev/kvm: run as root or add your user to the 'kvm' group")]
    KvmPermission,
    #[error("cannot open /dev/kvm")]
    KvmOpen(#[source] kvm_ioctls::Error),
    #[error("this host's KVM lacks {0}, which wbvmm needs")]
    MissingCap(&'static str),
    #[error("cannot build the list of {count} boot MSRs for KVM")]
    MsrList {
        count: usize,
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    #[error("KVM refused to {what}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("--cpus {requested} is more than this host's KVM allows ({max})")]
    TooManyCpus { requested: u32, max: u32 },
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error(
        "--mem-slots {requested} is more than this host's KVM allows ({max}, KVM_CAP_NR_MEMSLOTS)"
    )]
    TooManySlots { requested: u32, max: u32 },
    #[error("--memory {requested} bytes is more than this host's {host} bytes of RAM; use a smaller --memory")]
    MemoryExceedsHost { requested: u64, host: u64 },
    #[error("guest memory layout is invalid: {0}")]
    GuestMemoryLayout(String),
    #[error(
        "the {0} thread panicked (a wbvmm bug: please report it with the panic message above)"
    )]
    SetupPanicked(&'static str),
    #[error("cannot map the probe VM's memory")]
    ProbeMemory(#[source] vm_memory::mmap::FromRangesError),
    #[error("{0}")]
    Probe(String),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    #[error(transparent)]
    Affinity(#[from] crate::affinity::AffinityError),
    #[error(transparent)]
    MpTable(#[from] boot::mptable::MpTableError),
    #[error("cannot open serial output file {path}")]
    SerialFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot set up {what}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot place a device on the I/O or MMIO bus")]
    Bus(#[from] wbvmm_devices::BusError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmmError {
    move |source| VmmError::Io { what, source }
}

/// Everything needed to build a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub mem_size: u64,
    pub cpus: u32,
    pub serial: SerialMode,
    pub cpu_features: CpuFeatureEdits,
    /// Split guest RAM over this many KVM memslots (default: one per RAM range).
    pub mem_slots: Option<u32>,
    /// The host-side mirror's index (`--slot-index`).
    pub slot_index: SlotIndexKind,
    /// The per-vCPU MMIO-miss cache (`--mmio-cache`).
    pub mmio_cache: bool,
    /// An RTL8139 on a host tap (`--net`).
    pub net: Option<NetConfig>,
    /// `--cpu-affinity`: vCPU threads to host CPUs.
    pub cpu_affinity: VcpuAffinity,
    /// `--io-affinity`: the `wbvmm-io` thread's host CPUs.
    pub io_affinity: Option<CpuList>,
}

/// Open /dev/kvm with errors a user can act on.
pub fn open_kvm() -> Result<Kvm, VmmError> {
    Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => VmmError::KvmMissing,
        libc::EACCES | libc::EPERM => VmmError::KvmPermission,
        _ => VmmError::KvmOpen(e),
    })
}

/// An edge interrupt line backed by a KVM irqfd.
pub struct IrqFdLine {
    evt: EventFd,
    /// Interrupts raised, for the statistics.
    pub raised: std::sync::atomic::AtomicU64,
}

impl IrqFdLine {
    pub fn new(vm: &VmFd, gsi: u32) -> Result<Self, VmmError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("an interrupt eventfd"))?;
        vm.register_irqfd(&evt, gsi)
            .map_err(kvm_err("register an irqfd"))?;
        Ok(Self {
            evt,
            raised: Default::default(),
        })
    }
}

impl IrqLine for IrqFdLine {
    fn trigger(&self) {
        self.raised.fetch_add(1, Ordering::Relaxed);
        // EAGAIN means the counter is saturated: the interrupt is already pending.
        let _ = self.evt.write(1);
    }
}

/// The host's physical RAM: guest memory is mapped without reservation, so a size
/// beyond this would only fail later, inside the guest.
pub fn host_ram_bytes() -> u64 {
    // SAFETY: sysinfo fills the struct we pass.
    unsafe {
        let mut si: libc::sysinfo = std::mem::zeroed();
        if libc::sysinfo(&mut si) == 0 {
            (si.totalram as u64).saturating_mul(u64::from(si.mem_unit))
        } else {
            u64::MAX
        }
    }
}

/// Guest RAM: one anonymous host mapping holding every RAM range back to back (the
/// memslot registry splits it over `--mem-slots` slots), not reserved up front.
pub struct GuestRam {
    /// A vm-memory view of the mapping, for the kernel loader. Declared first so it
    /// is dropped before the mapping it views.
    pub mem: GuestMemoryMmap,
    pub ranges: Vec<(u64, u64)>,
    mapping: HostMapping,
}

/// At most this much low memory is backed before the guest starts.
const PREFAULT_MAX: u64 = 16 << 20;

impl GuestRam {
    pub fn host_base(&self) -> u64 {
        self.mapping.addr()
    }

    /// Back the first `len` bytes of guest RAM (best effort).
    pub fn prefault(&self, len: u64) {
        let first = self.ranges.first().map(|r| r.1).unwrap_or(0);
        let len = len.min(first) as usize;
        // SAFETY: [addr, addr + len) lies in the first RAM range of our mapping.
        unsafe {
            libc::madvise(
                self.mapping.addr() as *mut libc::c_void,
                len,
                libc::MADV_POPULATE_WRITE,
            );
        }
    }
}

pub fn allocate_guest_memory(mem_size: u64) -> Result<GuestRam, VmmError> {
    let ranges = ram_ranges(mem_size);
    let mapping = HostMapping::new(0, mem_size)?;
    let host = mapping.addr() as *mut u8;
    let mut regions = Vec::new();
    let mut offset = 0usize;
    for &(gpa, size) in &ranges {
        // SAFETY: [host + offset, + size) lies inside the mapping above, which
        // GuestRam keeps alive for as long as this view exists.
        let map = unsafe {
            MmapRegion::build_raw(
                host.add(offset),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            )
        }
        .map_err(|e| VmmError::GuestMemoryLayout(e.to_string()))?;
        regions.push(
            GuestRegionMmap::new(map, GuestAddress(gpa))
                .ok_or_else(|| VmmError::GuestMemoryLayout(format!("region at {gpa:#x} wraps")))?,
        );
        offset += size as usize;
    }
    let mem = GuestMemoryMmap::from_regions(regions)
        .map_err(|e| VmmError::GuestMemoryLayout(e.to_string()))?;
    Ok(GuestRam {
        mem,
        ranges,
        mapping,
    })
}

/// Register guest RAM with KVM through the registry, split over `nslots` slots.
pub fn register_guest_memory(
    reg: &SlotRegistry,
    ram: &GuestRam,
    nslots: u32,
) -> Result<(), VmmError> {
    // SAFETY: the host range is GuestRam's mapping, which outlives the registry (the
    // Vmm drops the registry first).
    unsafe { reg.add_mapped_split(&ram.ranges, ram.host_base(), nslots, SlotFlags::NONE) }?;
    Ok(())
}

/// Create the VM with the TSS and identity map set.
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, VmmError> {
    for (cap, name) in [
        (Cap::Irqchip, "the in-kernel irqchip (KVM_CAP_IRQCHIP)"),
        (Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
        (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
        (Cap::Pit2, "the in-kernel PIT (KVM_CAP_PIT2)"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmmError::MissingCap(name));
        }
    }
    let vm = kvm.create_vm().map_err(kvm_err("create a VM"))?;
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
        .map_err(kvm_err("set the identity map address"))?;
    vm.set_tss_address(KVM_TSS_START as usize)
        .map_err(kvm_err("set the TSS address"))?;
    Ok(vm)
}

/// The in-kernel PIC/IOAPIC/LAPICs and PIT; before any vCPU exists.
pub fn create_irqchip_and_pit(vm: &VmFd) -> Result<(), VmmError> {
    vm.create_irq_chip()
        .map_err(kvm_err("create the in-kernel irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(kvm_err("create the in-kernel PIT"))
}

/// Per-vCPU architectural setup: CPUID, MSRs, FPU, LINT0/LINT1. Registers are set
/// separately (only the BSP's matter; INIT/SIPI resets the APs).
pub fn configure_vcpu(kvm: &Kvm, vcpu: &VcpuFd, params: &CpuidParams) -> Result<(), VmmError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("report its CPUID"))?;
    cpuid::fixup(&mut cpuid, params);
    vcpu.set_cpuid2(&cpuid)
        .map_err(kvm_err("set the vCPU's CPUID"))?;

    let supported = kvm.get_msr_index_list().map_err(kvm_err("list its MSRs"))?;
    let entries: Vec<kvm_bindings::kvm_msr_entry> = boot::regs::BOOT_MSRS
        .iter()
        .filter(|(i, _)| supported.as_slice().contains(i))
        .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = kvm_bindings::Msrs::from_entries(&entries).map_err(|source| VmmError::MsrList {
        count: entries.len(),
        source,
    })?;
    let written = vcpu.set_msrs(&msrs).map_err(kvm_err("set the boot MSRs"))?;
    if written != entries.len() {
        log::warn!("KVM accepted {written} of {} boot MSRs", entries.len());
    }
    vcpu.set_fpu(&boot::regs::boot_fpu())
        .map_err(kvm_err("set the FPU state"))?;

    let mut lapic = vcpu.get_lapic().map_err(kvm_err("read the LAPIC"))?;
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
    vcpu.set_lapic(&lapic).map_err(kvm_err("set the LAPIC"))?;
    Ok(())
}

/// Set the BSP's registers for the kernel's entry protocol.
pub fn set_boot_registers(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    info: &boot::BootInfo,
) -> Result<(), VmmError> {
    let mut sregs = vcpu
        .get_sregs()
        .map_err(kvm_err("read special registers"))?;
    match info.protocol {
        BootProtocol::Linux64 => {
            boot::regs::setup_long_mode(mem, &mut sregs).map_err(BootError::from)?;
            vcpu.set_regs(&boot::regs::linux_regs(info.entry))
                .map_err(kvm_err("set registers"))?;
        }
        BootProtocol::Pvh => {
            boot::regs::setup_pvh(mem, &mut sregs).map_err(BootError::from)?;
            vcpu.set_regs(&boot::regs::pvh_regs(info.entry))
                .map_err(kvm_err("set registers"))?;
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(kvm_err("set special registers"))
}

const COM1_BASE: u64 = 0x3f8;
const COM1_IRQ: u32 = 4;
const I8042_BASE: u64 = 0x60;
const DEBUG_EXIT_PORT: u64 = 0xf4;

/// A built VM, ready to run.
pub struct Vmm {
    pub kvm: Kvm,
    pub vm: Arc<VmFd>,
    /// The memslot registry and its mirror; also the DMA path for devices.
    pub memory: Arc<SlotRegistry>,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<ExitState>,
    vcpus: Vec<VcpuFd>,
    serial: Arc<SerialDevice>,
    serial_rx_space: Arc<EventFd>,
    serial_mode: SerialMode,
    pub boot: boot::BootInfo,
    pub hidden_features: Vec<cpuid::Feature>,
    mmio_cache: bool,
    pub pci: Arc<PciRoot>,
    pub net: Option<Arc<NetDevice>>,
    cpu_affinity: VcpuAffinity,
    io_affinity: Option<CpuList>,
    mailbox: Arc<vcpu::StatsMailbox>,
    coalesced: Option<Arc<CoalescedRing>>,
    serial_irq: Arc<IrqFdLine>,
    /// KVM's binary statistics for the VM and each vCPU, where the host has them.
    kvm_stats: Option<(KvmStatsReader, Vec<KvmStatsReader>)>,
    /// Last: the host memory must outlive the registry and the VM fd.
    pub ram: GuestRam,
}

impl Vmm {
    pub fn new(config: &VmConfig) -> Result<Self, VmmError> {
        let kvm = open_kvm()?;
        if config.cpus == 0 {
            return Err(VmmError::TooManyCpus {
                requested: 0,
                max: kvm.get_max_vcpus() as u32,
            });
        }
        let max = (kvm.get_max_vcpus() as u32).min(254);
        if config.cpus > max {
            return Err(VmmError::TooManyCpus {
                requested: config.cpus,
                max,
            });
        }
        affinity::validate(
            &config.cpu_affinity,
            config.io_affinity.as_ref(),
            config.cpus,
        )?;
        let host = host_ram_bytes();
        if config.mem_size > host {
            return Err(VmmError::MemoryExceedsHost {
                requested: config.mem_size,
                host,
            });
        }
        let since_start = || {
            PROCESS_START
                .get()
                .map(|t| t.elapsed().as_micros())
                .unwrap_or(0)
        };
        log::debug!("setup: KVM opened at {} us", since_start());
        let vm = Arc::new(create_vm(&kvm)?);
        log::debug!("setup: VM created at {} us", since_start());
        let ram = allocate_guest_memory(config.mem_size)?;
        let mem = &ram.mem;
        let memory = Arc::new(SlotRegistry::new(vm.clone(), config.slot_index));
        let nslots = config.mem_slots.unwrap_or(ram.ranges.len() as u32);
        if nslots > memory.limit() {
            return Err(VmmError::TooManySlots {
                requested: nslots,
                max: memory.limit(),
            });
        }

        // Registering RAM and creating the in-kernel irqchip each cost milliseconds
        // inside KVM, under different locks: do them at the same time, and load the
        // kernel meanwhile.
        // Memslots before the in-kernel irqchip: measured here, registering 256 MiB
        // takes ~0.1 ms before KVM_CREATE_IRQCHIP and 5-11 ms after it. The kernel is
        // loaded meanwhile on another thread (it only touches host memory).
        let boot = std::thread::scope(|s| {
            let loading = s.spawn(|| {
                let boot = boot::load(
                    mem,
                    &boot::KernelSpec {
                        kernel: &config.kernel,
                        initramfs: config.initramfs.as_deref(),
                        cmdline: &config.cmdline,
                        mem_size: config.mem_size,
                    },
                )?;
                let intx: Vec<PciIntx> = config
                    .net
                    .iter()
                    .map(|_| PciIntx {
                        device: NIC_PCI_DEVICE,
                        pin: 1,
                        ioapic_pin: NIC_GSI as u8,
                    })
                    .collect();
                boot::write_mptable(mem, config.cpus, &intx)?;
                // Back what the guest touches first (boot structures, the image and
                // its zero-filled tail) now, off the critical path: each such page
                // would otherwise cost a fault inside a KVM exit.
                ram.prefault(boot.kernel_end.min(PREFAULT_MAX));
                Ok::<_, VmmError>(boot)
            });
            let kvm_side = (|| {
                register_guest_memory(&memory, &ram, nslots)?;
                log::debug!(
                    "setup: {nslots} memslot(s) registered at {} us",
                    since_start()
                );
                create_irqchip_and_pit(&vm)?;
                log::debug!("setup: irqchip and PIT at {} us", since_start());
                Ok::<_, VmmError>(())
            })();
            let boot = loading
                .join()
                .unwrap_or(Err(VmmError::SetupPanicked("kernel loading")));
            kvm_side?;
            boot
        })?;

        log::debug!("setup: memory, irqchip, kernel at {} us", since_start());
        let exit = Arc::new(ExitState::default());
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());

        let serial_rx_space =
            Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("a serial eventfd"))?);
        let out: Box<dyn std::io::Write + Send> = match &config.serial {
            SerialMode::Stdio => Box::new(FdWriter(libc::STDOUT_FILENO)),
            SerialMode::Null => Box::new(std::io::sink()),
            SerialMode::File(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|source| VmmError::SerialFile {
                        path: p.clone(),
                        source,
                    })?,
            ),
        };
        let rx_evt = serial_rx_space.clone();
        let serial_irq = Arc::new(IrqFdLine::new(&vm, COM1_IRQ)?);
        let serial = Arc::new(SerialDevice::new(
            serial_irq.clone(),
            out,
            Arc::new(move || {
                let _ = rx_evt.write(1);
            }),
        ));
        pio.insert(serial.clone(), COM1_BASE, 8)?;
        let sink: Arc<dyn ExitSink> = exit.clone();
        pio.insert(Arc::new(I8042::new(sink.clone())), I8042_BASE, 5)?;
        pio.insert(Arc::new(DebugExit::new(sink)), DEBUG_EXIT_PORT, 4)?;
        // POST codes and io_delay: no behaviour, and not worth a log line each.
        pio.insert(Arc::new(IgnoredPort { read_value: 0xff }), 0x80, 1)?;

        let pci = Arc::new(PciRoot::new(pio.clone(), mmio.clone()));
        pio.insert(pci.clone(), PciRoot::CONFIG_PORT, PciRoot::CONFIG_LEN)?;
        let net = match &config.net {
            Some(nc) => {
                let dma = Arc::new(GuestRamDma::new(memory.clone()));
                Some(Arc::new(NetDevice::create(
                    &vm,
                    &pci,
                    (&pio, &mmio),
                    dma,
                    nc,
                )?))
            }
            None => None,
        };

        let hidden_features = config.cpu_features.hide.clone();
        if !hidden_features.is_empty() && cpuid::pvm_host() {
            log::warn!(
                "this host's KVM (kvm_pvm) answers guest CPUID itself: hiding {hidden_features:?} has no effect here"
            );
        }
        let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
        let mut kvm_stats = match KvmStatsReader::open(vm.as_ref()) {
            Ok(r) => Some((r, Vec::new())),
            Err(e) => {
                log::debug!("{}", crate::error_chain(&e));
                None
            }
        };
        log::debug!("setup: devices at {} us", since_start());
        let mut vcpus = Vec::new();
        for id in 0..config.cpus {
            let vcpu = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("create a vCPU"))?;
            let params = CpuidParams {
                vcpu_id: id,
                vcpu_count: config.cpus,
                tsc_khz: vcpu.get_tsc_khz().ok(),
                tsc_deadline,
                hidden: hidden_features.clone(),
            };
            configure_vcpu(&kvm, &vcpu, &params)?;
            if id == 0 {
                set_boot_registers(&vcpu, mem, &boot)?;
            }
            if let Some((_, readers)) = kvm_stats.as_mut() {
                match KvmStatsReader::open(&vcpu) {
                    Ok(r) => readers.push(r),
                    Err(e) => log::debug!("no KVM stats for vCPU {id}: {e}"),
                }
            }
            vcpus.push(vcpu);
        }

        // The UART's transmit register needs no answer: let KVM queue those writes
        // instead of exiting for each byte (replayed in order before the next exit,
        // and by the I/O thread every few ms).
        let coalesced = match (kvm.check_extension(Cap::CoalescedPio), vcpus.first()) {
            (true, Some(v0)) => vm
                .register_coalesced_mmio(IoEventAddress::Pio(COM1_BASE), 1)
                .ok()
                .and_then(|()| CoalescedRing::map(v0).ok())
                .map(Arc::new),
            _ => None,
        };
        log::debug!("setup: vCPUs at {} us", since_start());
        Ok(Self {
            kvm,
            vm,
            memory,
            pio,
            mmio,
            exit,
            vcpus,
            serial,
            serial_rx_space,
            serial_mode: config.serial.clone(),
            boot,
            hidden_features,
            mmio_cache: config.mmio_cache,
            pci,
            net,
            cpu_affinity: config.cpu_affinity.clone(),
            io_affinity: config.io_affinity.clone(),
            mailbox: Default::default(),
            coalesced,
            serial_irq,
            kvm_stats,
            ram,
        })
    }

    /// Start the vCPU and I/O threads.
    pub fn start(mut self) -> Result<RunningVm, VmmError> {
        install_kick_handler()?;
        let io = IoThread::spawn(
            self.serial.clone(),
            self.serial_rx_space.clone(),
            self.exit.clone(),
            self.serial_mode == SerialMode::Stdio,
            self.net.clone(),
            self.io_affinity.clone(),
            self.coalesced
                .clone()
                .map(|r| (r, self.pio.clone(), self.mmio.clone())),
        )?;
        let setup_time = PROCESS_START.get().map(|t| t.elapsed()).unwrap_or_default();
        let mut threads = Vec::new();
        let mut tids = Vec::new();
        for (id, vcpu) in self.vcpus.drain(..).enumerate() {
            let ctx = VcpuContext {
                mailbox: self.mailbox.clone(),
                coalesced: self.coalesced.clone(),
                id: id as u32,
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                exit: self.exit.clone(),
                memory: self.memory.clone(),
                mmio_cache: self.mmio_cache,
            };
            let (tid_tx, tid_rx) = std::sync::mpsc::channel();
            let pin = self.cpu_affinity.0.get(&(id as u32)).cloned();
            let h = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    // Pinned before the first KVM_RUN: no guest instruction runs on
                    // the wrong CPU.
                    if let Some(list) = pin {
                        if let Err(e) = affinity::pin_current_thread(&format!("vcpu{id}"), &list) {
                            ctx.exit.finish(VmOutcome::Unexpected {
                                vcpu: id as u32,
                                what: crate::error_chain(&e),
                            });
                        }
                    }
                    // SAFETY: gettid has no preconditions.
                    let _ = tid_tx.send(unsafe { libc::gettid() });
                    crate::seccomp::enter(crate::seccomp::ThreadKind::Vcpu);
                    vcpu::run_loop(vcpu, ctx)
                })
                .map_err(io_err("a vCPU thread"))?;
            tids.push(tid_rx.recv().unwrap_or(0));
            threads.push(h);
        }
        let names: Vec<String> = tids
            .iter()
            .enumerate()
            .map(|(i, t)| format!("vcpu{i}={t}"))
            .collect();
        eprintln!("wbvmm: threads {} wbvmm-io={}", names.join(" "), io.tid);
        crate::seccomp::enter(crate::seccomp::ThreadKind::Main);
        Ok(RunningVm {
            vmm: self,
            threads,
            tids,
            io: Some(io),
            setup_time,
        })
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() -> Result<(), VmmError> {
    register_signal_handler(SIGRTMIN(), kick_handler).map_err(|e| VmmError::Io {
        what: "the vCPU kick signal",
        source: std::io::Error::from_raw_os_error(e.errno()),
    })
}

/// A running VM: its threads and shared state.
pub struct RunningVm {
    pub vmm: Vmm,
    threads: Vec<JoinHandle<VcpuStats>>,
    pub tids: Vec<i32>,
    io: Option<IoThread>,
    setup_time: std::time::Duration,
}

/// Set by SIGINT/SIGTERM: wbvmm stops the guest and restores the terminal.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Set by SIGUSR1: report statistics of the running VM.
static SNAPSHOT: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

extern "C" fn on_usr1(_: libc::c_int) {
    SNAPSHOT.store(true, Ordering::SeqCst);
}

/// Catch SIGINT/SIGTERM so every exit path restores the terminal, and SIGUSR1 for
/// statistics of the running VM.
pub fn install_termination_handlers() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_terminate as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_terminate as *const () as libc::sighandler_t,
        );
        libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t);
    }
}

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
    pub io_tid: i32,
    /// Process start to the vCPU threads' start (just before the first KVM_RUN).
    pub setup_time: std::time::Duration,
    /// wbvmm's resident memory beyond the guest RAM pages that are resident.
    pub rss_overhead_bytes: u64,
}

/// Interrupts wbvmm raised, by source.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct InterruptCounts {
    pub serial: u64,
    pub nic: u64,
}

/// KVM's own statistics, where the host offers them (KVM_GET_STATS_FD).
#[derive(Debug, Clone, Default, serde::Serialize)]
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

impl RunningVm {
    /// Wait until the VM ends, stop every thread, and report.
    /// Wait until the VM ends, stop every thread, and report. `on_snapshot` gets a
    /// report of the running VM each time SIGUSR1 arrives.
    pub fn wait_with(mut self, on_snapshot: &dyn Fn(&RunReport)) -> RunReport {
        let outcome = loop {
            let o = self
                .vmm
                .exit
                .wait(&|| INTERRUPTED.load(Ordering::SeqCst), &|| {
                    SNAPSHOT.load(Ordering::SeqCst)
                });
            if let Some(o) = o {
                break o;
            }
            SNAPSHOT.store(false, Ordering::SeqCst);
            on_snapshot(&self.snapshot());
        };
        self.stop_threads();
        let per_vcpu: Vec<VcpuStats> = self
            .threads
            .drain(..)
            .filter_map(|h| h.join().ok())
            .collect();
        let io_tid = self.io.as_ref().map(|io| io.tid).unwrap_or(0);
        if let Some(io) = self.io.take() {
            io.stop();
        }
        if let Some(ring) = &self.vmm.coalesced {
            let _ = vcpu::replay_coalesced(ring, &self.vmm.pio, &self.vmm.mmio);
        }
        self.vmm.serial.flush_output();
        self.report(Some(outcome), &per_vcpu, io_tid)
    }

    pub fn wait(self) -> RunReport {
        self.wait_with(&|_| {})
    }

    /// Ask every vCPU for a copy of its statistics (kicking it out of KVM_RUN so it
    /// answers promptly) and report the running VM.
    pub fn snapshot(&self) -> RunReport {
        let mb = &self.vmm.mailbox;
        let req = mb.request.fetch_add(1, Ordering::SeqCst) + 1;
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(500);
        loop {
            let done = {
                let slots = mb.slots.lock().unwrap_or_else(|e| e.into_inner());
                (0..self.tids.len() as u32).all(|i| slots.get(&i).is_some_and(|(r, _)| *r >= req))
            };
            if done || std::time::Instant::now() > deadline {
                break;
            }
            for h in self.threads.iter().filter(|h| !h.is_finished()) {
                let _ = h.kill(SIGRTMIN());
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let per_vcpu: Vec<VcpuStats> = mb
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|(_, s)| s.clone())
            .collect();
        self.report(
            None,
            &per_vcpu,
            self.io.as_ref().map(|io| io.tid).unwrap_or(0),
        )
    }

    fn report(&self, outcome: Option<VmOutcome>, per_vcpu: &[VcpuStats], io_tid: i32) -> RunReport {
        let mut all = VcpuStats {
            memory: MemoryStats::for_registry(&self.vmm.memory),
            ..Default::default()
        };
        for v in per_vcpu {
            all.merge(v);
        }
        if let Some(n) = &self.vmm.net {
            all.memory.lookups.dma.merge(&n.dma.stats());
        }
        let mut exits_by_device: Vec<(DeviceKey, u64)> = all.by_device.into_iter().collect();
        exits_by_device.sort_by_key(|e| std::cmp::Reverse(e.1));
        let kvm = self.vmm.kvm_stats.as_ref().map(|(vm, vcpus)| {
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
                serial: self.vmm.serial_irq.raised.load(Ordering::Relaxed),
                nic: self
                    .vmm
                    .net
                    .as_ref()
                    .map(|n| n.irq.raised.load(Ordering::Relaxed))
                    .unwrap_or(0),
            },
            memory: all.memory,
            kvm,
            vcpu_tids: self.tids.clone(),
            io_tid,
            net: self.vmm.net.as_ref().map(|n| n.stats()),
            setup_time: self.setup_time,
            rss_overhead_bytes: process_rss_bytes()
                .saturating_sub(guest_resident_bytes(&self.vmm.ram.mem)),
        }
    }

    /// Kick every vCPU out of KVM_RUN until all have seen the stop flag. Kicks
    /// repeat because one sent just before a thread enters KVM_RUN is lost.
    fn stop_threads(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while self.threads.iter().any(|h| !h.is_finished()) && std::time::Instant::now() < deadline
        {
            for h in self.threads.iter().filter(|h| !h.is_finished()) {
                let _ = h.kill(SIGRTMIN());
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    pub fn request_stop(&self, outcome: VmOutcome) {
        self.vmm.exit.finish(outcome);
    }
}

/// The `wbvmm-io` thread: console input now; the NIC's tap joins it later.
struct IoThread {
    stop: Arc<EventFd>,
    handle: Option<JoinHandle<()>>,
    tid: i32,
    _raw: Option<RawModeGuard>,
}

const TOKEN_STOP: u64 = 0;
const TOKEN_STDIN: u64 = 1;
const TOKEN_SERIAL_SPACE: u64 = 2;
const TOKEN_TAP: u64 = 3;
const TOKEN_NIC_SPACE: u64 = 4;
const TOKEN_NIC_RESAMPLE: u64 = 5;
const TOKEN_NIC_DOORBELL: u64 = 6;
/// The NIC's TCTR/TimerInt deadline moved.
const TOKEN_NIC_TIMER: u64 = 7;
/// Tokens 8..12: the C-mode TSD0-3 doorbells.
const TOKEN_TSD0: u64 = 8;
/// Frames moved per wake-up before other sources get a turn.
const RX_BUDGET: usize = 64;

impl IoThread {
    fn spawn(
        serial: Arc<SerialDevice>,
        rx_space: Arc<EventFd>,
        exit: Arc<ExitState>,
        stdin_input: bool,
        net: Option<Arc<NetDevice>>,
        pin: Option<CpuList>,
        coalesced: Option<(Arc<CoalescedRing>, Arc<Bus>, Arc<Bus>)>,
    ) -> Result<Self, VmmError> {
        use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("an eventfd"))?);
        let epoll = Epoll::new().map_err(io_err("epoll"))?;
        epoll
            .ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_STOP),
            )
            .map_err(io_err("epoll"))?;
        epoll
            .ctl(
                ControlOperation::Add,
                rx_space.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_SERIAL_SPACE),
            )
            .map_err(io_err("epoll"))?;
        if let Some(n) = &net {
            for (fd, token) in [
                (n.tap.as_raw_fd(), TOKEN_TAP),
                (n.nic.rx_space_event().as_raw_fd(), TOKEN_NIC_SPACE),
                (n.irq.resample.as_raw_fd(), TOKEN_NIC_RESAMPLE),
                (n.nic.timer_event().as_raw_fd(), TOKEN_NIC_TIMER),
            ]
            .into_iter()
            .chain(
                n.doorbell
                    .as_ref()
                    .map(|d| (d.evt.as_raw_fd(), TOKEN_NIC_DOORBELL)),
            )
            .chain(n.frontend.iter().flat_map(|f| {
                f.tsd
                    .evts
                    .iter()
                    .enumerate()
                    .map(|(i, e)| (e.as_raw_fd(), TOKEN_TSD0 + i as u64))
            })) {
                epoll
                    .ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::IN, token),
                    )
                    .map_err(io_err("epoll"))?;
            }
        }
        let raw = if stdin_input {
            RawModeGuard::enter(libc::STDIN_FILENO)
        } else {
            None
        };
        let mut stdin_watched = false;
        if stdin_input {
            match epoll.ctl(
                ControlOperation::Add,
                libc::STDIN_FILENO,
                EpollEvent::new(EventSet::IN, TOKEN_STDIN),
            ) {
                Ok(()) => stdin_watched = true,
                // A regular file cannot be polled: hand its whole content over now.
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    let mut buf = Vec::new();
                    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf);
                    serial.queue_input(&buf);
                }
                Err(e) => {
                    return Err(VmmError::Io {
                        what: "watching stdin",
                        source: e,
                    })
                }
            }
        }
        let stop2 = stop.clone();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("wbvmm-io".into())
            .spawn(move || {
                if let Some(list) = pin {
                    if let Err(e) = affinity::pin_current_thread("wbvmm-io", &list) {
                        log::error!("{}", crate::error_chain(&e));
                    }
                }
                crate::seccomp::enter(crate::seccomp::ThreadKind::Io);
                // SAFETY: gettid has no preconditions.
                let _ = tid_tx.send(unsafe { libc::gettid() });
                let mut events = vec![EpollEvent::default(); 8];
                let mut esc = EscapeParser::default();
                let mut frame = vec![0u8; 65536];
                let mut tap_events = EventSet::IN;
                let mut output_flowing = false;
                let mut buf = [0u8; 1024];
                let mut stdin_open = stdin_watched;
                // The NIC's TimerInt deadline, re-read only when the device says it
                // moved (TOKEN_NIC_TIMER) or after it fired: no NIC lock per wake-up.
                let mut nic_timer = net.as_ref().and_then(|n| n.nic.next_timer_deadline());
                loop {
                    // With queued UART writes, wake to show an idle guest's output
                    // (and let an interrupt-driven driver see THRE): every 10 ms, and
                    // every 1 ms while output is flowing, as fast as a 115200 baud UART.
                    let mut timeout = match &coalesced {
                        Some(_) if output_flowing => 1,
                        Some(_) => 10,
                        None => -1,
                    };
                    // The NIC's TimerInt (which no register access may come to
                    // check for a while) fires on time: wake at its deadline.
                    if let Some(due) = nic_timer {
                        let ms = due
                            .saturating_duration_since(std::time::Instant::now())
                            .as_micros()
                            .div_ceil(1000)
                            .min(i32::MAX as u128) as i32;
                        timeout = if timeout < 0 { ms } else { timeout.min(ms) };
                    }
                    let n = match epoll.wait(timeout, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => return,
                    };
                    if let Some((ring, pio, mmio)) = &coalesced {
                        output_flowing = vcpu::replay_coalesced(ring, pio, mmio) > 0;
                    }
                    if let (Some(n), Some(due)) = (&net, nic_timer) {
                        if std::time::Instant::now() >= due {
                            n.nic.poll_timer();
                            nic_timer = n.nic.next_timer_deadline();
                        }
                    }
                    for ev in &events[..n] {
                        match ev.data() {
                            TOKEN_STOP => return,
                            TOKEN_TAP | TOKEN_NIC_SPACE => {
                                let Some(n) = &net else { continue };
                                if ev.data() == TOKEN_NIC_SPACE {
                                    let _ = n.nic.rx_space_event().read();
                                }
                                let ok = n.pump_rx(&mut frame, RX_BUDGET);
                                // Backpressure: while the guest's ring is full, stop
                                // watching the tap (the host queues or drops, as for a
                                // real NIC); the NIC's space event brings it back.
                                let want = if ok { EventSet::IN } else { EventSet::empty() };
                                if want != tap_events {
                                    let _ = epoll.ctl(
                                        ControlOperation::Modify,
                                        n.tap.as_raw_fd(),
                                        EpollEvent::new(want, TOKEN_TAP),
                                    );
                                    tap_events = want;
                                }
                                if ev
                                    .event_set()
                                    .intersects(EventSet::HANG_UP | EventSet::ERROR)
                                    && ev.data() == TOKEN_TAP
                                {
                                    // The tap went away under the guest: stop polling it.
                                    let _ = epoll.ctl(
                                        ControlOperation::Delete,
                                        n.tap.as_raw_fd(),
                                        EpollEvent::default(),
                                    );
                                    log::warn!(
                                        "tap {} closed; the guest's NIC is now cut off",
                                        n.tap.name()
                                    );
                                }
                            }
                            TOKEN_NIC_DOORBELL => {
                                if let Some(d) = net
                                    .as_ref()
                                    .and_then(|n| n.doorbell.as_ref().map(|d| (n, d)))
                                {
                                    let _ = d.1.evt.read();
                                    d.0.nic.process_tx();
                                    d.1.follow_bars();
                                }
                            }
                            t if (TOKEN_TSD0..TOKEN_TSD0 + 4).contains(&t) => {
                                if let Some(f) = net.as_ref().and_then(|n| n.frontend.as_ref()) {
                                    f.tsd.replay(&f.nic);
                                }
                            }
                            TOKEN_NIC_TIMER => {
                                if let Some(n) = &net {
                                    let _ = n.nic.timer_event().read();
                                    nic_timer = n.nic.next_timer_deadline();
                                }
                            }
                            TOKEN_NIC_RESAMPLE => {
                                if let Some(n) = &net {
                                    n.irq.on_resample();
                                }
                            }
                            TOKEN_SERIAL_SPACE => {
                                let _ = rx_space.read();
                                serial.flush_input();
                            }
                            TOKEN_STDIN if stdin_open => {
                                // SAFETY: reads into a local buffer from stdin.
                                let r = unsafe {
                                    libc::read(
                                        libc::STDIN_FILENO,
                                        buf.as_mut_ptr().cast(),
                                        buf.len(),
                                    )
                                };
                                if r <= 0 {
                                    if r < 0
                                        && std::io::Error::last_os_error().kind()
                                            == std::io::ErrorKind::Interrupted
                                    {
                                        continue;
                                    }
                                    // EOF: stop watching; the guest keeps running.
                                    let _ = epoll.ctl(
                                        ControlOperation::Delete,
                                        libc::STDIN_FILENO,
                                        EpollEvent::default(),
                                    );
                                    stdin_open = false;
                                    continue;
                                }
                                match esc.feed(&buf[..r as usize]) {
                                    Input::Forward(b) => serial.queue_input(&b),
                                    Input::Quit(b) => {
                                        serial.queue_input(&b);
                                        exit.finish(VmOutcome::UserQuit);
                                        let _ = stop2.write(1);
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
            })
            .map_err(io_err("the I/O thread"))?;
        let tid = tid_rx.recv().unwrap_or(0);
        Ok(Self {
            stop,
            handle: Some(handle),
            tid,
            _raw: raw,
        })
    }

    fn stop(mut self) {
        let _ = self.stop.write(1);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        // The raw-mode guard drops here, restoring the terminal.
    }
}

/// Build, run and tear down a VM; the whole life of `wbvmm --kernel ...`.
pub fn run(config: &VmConfig, on_snapshot: &dyn Fn(&RunReport)) -> Result<RunReport, VmmError> {
    let vmm = Vmm::new(config)?;
    let running = vmm.start()?;
    Ok(running.wait_with(on_snapshot))
}

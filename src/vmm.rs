//! Building, running and tearing down a VM: the order of things. Each step is a
//! file of its own — KVM setup (`kvm`), guest RAM (`memory::guest_ram`), the legacy
//! devices (`legacy`), the I/O thread (`io_thread`), the vCPU kick (`vcpu_kick`),
//! the run report (`run_report`).

use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;
use wbvmm_devices::legacy::{ExitSink, SerialDevice};
use wbvmm_devices::pci::PciRoot;
use wbvmm_devices::Bus;

use crate::affinity::{self, CpuList, VcpuAffinity};
use crate::boot::mptable::PciIntx;
use crate::boot::{self, BootError};
use crate::coalesced::CoalescedRing;
use crate::config::{ConfigError, CpuFeatureEdits, SerialMode};
use crate::cpuid::{self, CpuidParams};
use crate::io_thread::{
    CoalescedOutput, Console, IoSources, IoThread, IoThreadError, Nic, SignalFd, Wake,
};
use crate::irq::IrqFdLine;
use crate::kvm::{self as kvm_setup, KvmError};
use crate::kvm_stats::KvmStatsReader;
use crate::legacy::{self, LegacyError};
use crate::memory::guest_ram::{host_ram_bytes, GuestRam, GuestRamError, PREFAULT_MAX};
use crate::memory::{GuestRamDma, SlotIndexKind, SlotRegistry};
use crate::net::{NetConfig, NetDevice, NIC_GSI, NIC_PCI_DEVICE};
use crate::vcpu::{self, ExitState, VcpuContext, VcpuStats, VmOutcome};
use crate::vcpu_kick::{self, KickError};

mod running;

pub use crate::io_thread::block_vm_signals;
pub use crate::run_report::{InterruptCounts, KvmReport, RunReport, PROCESS_START};
pub use running::RunningVm;

#[derive(Debug, Error)]
pub enum VmmError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("--cpus {requested} is more than this host's KVM allows ({max})")]
    TooManyCpus { requested: u32, max: u32 },
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error(transparent)]
    GuestRam(#[from] GuestRamError),
    #[error(
        "--mem-slots {requested} is more than this host's KVM allows ({max}, KVM_CAP_NR_MEMSLOTS)"
    )]
    TooManySlots { requested: u32, max: u32 },
    #[error("--memory {requested} bytes is more than this host's {host} bytes of RAM; use a smaller --memory")]
    MemoryExceedsHost { requested: u64, host: u64 },
    #[error(
        "the {0} thread panicked (a wbvmm bug: please report it with the panic message above)"
    )]
    SetupPanicked(&'static str),
    #[error("cannot map the probe VM's memory")]
    ProbeMemory(#[source] vm_memory::mmap::FromRangesError),
    #[error("the probe VM's memory has no host address (a wbvmm bug: please report it)")]
    ProbeHostAddress(#[source] vm_memory::GuestMemoryError),
    #[error("{0}")]
    Probe(String),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    #[error(transparent)]
    Affinity(#[from] crate::affinity::AffinityError),
    #[error(transparent)]
    Legacy(#[from] LegacyError),
    #[error(transparent)]
    IoThread(#[from] IoThreadError),
    #[error(transparent)]
    Kick(#[from] KickError),
    #[error("cannot set up {what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Gdb(#[from] crate::gdb::GdbError),
    #[error("cannot place a device on the I/O or MMIO bus")]
    Bus(#[from] wbvmm_devices::BusError),
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
    /// `--gdb SOCKET`: a GDB remote stub; the guest waits for the debugger.
    pub gdb: Option<PathBuf>,
}

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
    kvm_stats: KvmStatsReaders,
    /// The kernel ELF's function symbols, for reports of where vCPUs are.
    symbols: crate::symbols::KernelSymbols,
    /// The GDB stub, bound, until `start` runs it.
    gdb: Option<crate::gdb::GdbServer>,
    /// Last: the host memory must outlive the registry and the VM fd.
    pub ram: GuestRam,
}

fn since_start() -> u128 {
    PROCESS_START
        .get()
        .map(|t| t.elapsed().as_micros())
        .unwrap_or(0)
}

impl Vmm {
    pub fn new(config: &VmConfig) -> Result<Self, VmmError> {
        let kvm = kvm_setup::open_kvm()?;
        check_config(&kvm, config)?;
        log::debug!("setup: KVM opened at {} us", since_start());
        let vm = Arc::new(kvm_setup::create_vm(&kvm)?);
        log::debug!("setup: VM created at {} us", since_start());
        let ram = GuestRam::allocate(config.mem_size)?;
        let memory = Arc::new(SlotRegistry::new(vm.clone(), config.slot_index));
        let nslots = config.mem_slots.unwrap_or(ram.ranges.len() as u32);
        if nslots > memory.limit() {
            return Err(VmmError::TooManySlots {
                requested: nslots,
                max: memory.limit(),
            });
        }
        let boot = load_kernel_and_register_memory(config, &vm, &ram, &memory, nslots)?;
        log::debug!("setup: memory, irqchip, kernel at {} us", since_start());

        let exit = Arc::new(ExitState::default());
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let com1 = legacy::add_legacy_devices(
            &vm,
            &pio,
            exit.clone() as Arc<dyn ExitSink>,
            &config.serial,
        )?;
        let pci = Arc::new(PciRoot::new(pio.clone(), mmio.clone()));
        pio.insert(pci.clone(), PciRoot::CONFIG_PORT, PciRoot::CONFIG_LEN)?;
        let net = match &config.net {
            Some(nc) => {
                let dma = Arc::new(GuestRamDma::new(memory.clone()));
                let buses = (&pio, &mmio);
                Some(Arc::new(NetDevice::create(&vm, &pci, buses, dma, nc)?))
            }
            None => None,
        };
        log::debug!("setup: devices at {} us", since_start());

        let hidden_features = config.cpu_features.hide.clone();
        if !hidden_features.is_empty() && cpuid::pvm_host() {
            log::warn!(
                "this host's KVM (kvm_pvm) answers guest CPUID itself: hiding {hidden_features:?} has no effect here"
            );
        }
        let (vcpus, kvm_stats) = create_vcpus(&kvm, &vm, config, &ram, &boot)?;
        // Bound here, on the main thread before any system call filter.
        let gdb = match &config.gdb {
            Some(path) => Some(crate::gdb::GdbServer::bind(path, config.cpus)?),
            None => None,
        };
        let coalesced = vcpus
            .first()
            .and_then(|v0| legacy::coalesce_com1_output(&kvm, &vm, v0));
        // The ring has consumers now (every exit, and the I/O thread once it runs).
        if let (Some(_), Some(n)) = (&coalesced, &net) {
            n.enable_posted();
        }
        log::debug!("setup: vCPUs at {} us", since_start());
        Ok(Self {
            kvm,
            vm,
            memory,
            pio,
            mmio,
            exit,
            vcpus,
            serial: com1.serial,
            serial_rx_space: com1.rx_space,
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
            serial_irq: com1.irq,
            kvm_stats,
            symbols: crate::symbols::KernelSymbols::new(&config.kernel),
            gdb,
            ram,
        })
    }

    /// The NIC's register shadow, with `--net ...,shadow=on` or `auto` (the default).
    pub fn nic_shadow(&self) -> Option<&Arc<crate::net::RegisterShadow>> {
        self.net.as_ref()?.frontend.as_ref()?.shadow.as_ref()
    }

    /// The NIC's posted-write zone (`--net ...,posted=`).
    pub fn nic_posted(&self) -> Option<&crate::net::PostedWrites> {
        self.net.as_ref()?.posted_writes()
    }

    /// Start the I/O and vCPU threads. SIGINT, SIGTERM and SIGUSR1 are blocked in
    /// the calling thread from here on: the I/O thread reads them.
    pub fn start(mut self) -> Result<RunningVm, VmmError> {
        vcpu_kick::install()?;
        block_vm_signals().map_err(io_err("blocking SIGINT/SIGTERM/SIGUSR1"))?;
        let signals = SignalFd::new().map_err(io_err("a signalfd"))?;
        let (wake_tx, wake_rx) = std::sync::mpsc::channel();
        if let Some(s) = self.nic_shadow() {
            let main = std::sync::Mutex::new(wake_tx.clone());
            s.remap_on(move || {
                let _ = main
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .send(Wake::NicShadow);
            });
        }
        let stdio = self.serial_mode == SerialMode::Stdio;
        let sources = IoSources {
            console: Console::new(
                self.serial.clone(),
                self.serial_rx_space.clone(),
                stdio.then_some(libc::STDIN_FILENO),
            ),
            signals: Some(signals),
            nic: self.net.as_ref().map(Nic::of_device),
            coalesced: self.coalesced.clone().map(|ring| CoalescedOutput {
                ring,
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
            }),
            exit: self.exit.clone(),
            wake: wake_tx.clone(),
        };
        let io = IoThread::spawn(sources, stdio, self.io_affinity.clone())?;
        let setup_time = PROCESS_START.get().map(|t| t.elapsed()).unwrap_or_default();
        let mut threads = Vec::new();
        let mut tids = Vec::new();
        let mut gdb = self.gdb.take();
        for (id, vcpu) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            let debug = gdb.as_mut().and_then(|g| g.take_port(id as u32));
            let (thread, tid) = self.spawn_vcpu(id as u32, vcpu, debug, wake_tx.clone())?;
            threads.push(thread);
            tids.push(tid);
        }
        let names: Vec<String> = tids
            .iter()
            .enumerate()
            .map(|(i, t)| format!("vcpu{i}={t}"))
            .collect();
        eprintln!("wbvmm: threads {} wbvmm-io={}", names.join(" "), io.tid);
        if let Some(g) = gdb {
            g.spawn(self.exit.clone(), || {
                crate::seccomp::enter(crate::seccomp::ThreadKind::Gdb)
            })?;
        }
        // The vCPU threads wait for this filter before their first KVM_RUN.
        crate::seccomp::enter(crate::seccomp::ThreadKind::Main);
        Ok(RunningVm {
            vmm: self,
            threads,
            tids,
            io: Some(io),
            setup_time,
            wake_tx,
            wake_rx,
        })
    }

    /// A vCPU thread, pinned before its first KVM_RUN; returns it and its tid.
    fn spawn_vcpu(
        &self,
        id: u32,
        vcpu: VcpuFd,
        debug: Option<crate::vcpu::debug_port::VcpuPort>,
        wake: Sender<Wake>,
    ) -> Result<(JoinHandle<VcpuStats>, i32), VmmError> {
        let ctx = VcpuContext {
            mailbox: self.mailbox.clone(),
            coalesced: self.coalesced.clone(),
            id,
            pio: self.pio.clone(),
            mmio: self.mmio.clone(),
            exit: self.exit.clone(),
            memory: self.memory.clone(),
            mmio_cache: self.mmio_cache,
            debug,
        };
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let pin = self.cpu_affinity.0.get(&id).cloned();
        let h = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let _ended = TellMainOnEnd {
                    wake,
                    exit: ctx.exit.clone(),
                    vcpu: id,
                };
                // Pinned before the first KVM_RUN: no guest instruction runs on
                // the wrong CPU.
                if let Some(list) = pin {
                    if let Err(e) = affinity::pin_current_thread(&format!("vcpu{id}"), &list) {
                        ctx.exit.finish(VmOutcome::Unexpected {
                            vcpu: id,
                            what: crate::error_chain(&e),
                        });
                    }
                }
                // SAFETY: gettid has no preconditions.
                let _ = tid_tx.send(unsafe { libc::gettid() });
                // After the tid send (start() waits for it), before the first KVM_RUN.
                crate::seccomp::enter(crate::seccomp::ThreadKind::Vcpu);
                vcpu::run_loop(vcpu, ctx)
            })
            .map_err(io_err("a vCPU thread"))?;
        Ok((h, tid_rx.recv().unwrap_or(0)))
    }
}

/// What the host's KVM and RAM must allow, before anything is built.
fn check_config(kvm: &Kvm, config: &VmConfig) -> Result<(), VmmError> {
    if config.cpus == 0 {
        return Err(ConfigError::ZeroCpus.into());
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
    Ok(())
}

/// Registering RAM and creating the in-kernel irqchip each cost milliseconds inside
/// KVM, under different locks; loading the kernel only touches host memory. So the
/// kernel loads on another thread meanwhile. Memslots go before the irqchip:
/// measured here, registering 256 MiB takes ~0.1 ms before KVM_CREATE_IRQCHIP and
/// 5-11 ms after it.
fn load_kernel_and_register_memory(
    config: &VmConfig,
    vm: &VmFd,
    ram: &GuestRam,
    memory: &SlotRegistry,
    nslots: u32,
) -> Result<boot::BootInfo, VmmError> {
    std::thread::scope(|s| {
        let loading = s.spawn(|| {
            let mem = &ram.mem;
            let spec = boot::KernelSpec {
                kernel: &config.kernel,
                initramfs: config.initramfs.as_deref(),
                cmdline: &config.cmdline,
                mem_size: config.mem_size,
            };
            let info = boot::load(mem, &spec)?;
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
            // Back what the guest touches first (boot structures, the image and its
            // zero-filled tail) now, off the critical path: each such page would
            // otherwise cost a fault inside a KVM exit.
            ram.prefault(info.kernel_end.min(PREFAULT_MAX));
            Ok::<_, VmmError>(info)
        });
        let kvm_side = (|| {
            ram.register(memory, nslots)?;
            log::debug!(
                "setup: {nslots} memslot(s) registered at {} us",
                since_start()
            );
            kvm_setup::create_irqchip_and_pit(vm)?;
            log::debug!("setup: irqchip and PIT at {} us", since_start());
            Ok::<_, VmmError>(())
        })();
        let info = loading
            .join()
            .unwrap_or(Err(VmmError::SetupPanicked("kernel loading")));
        kvm_side?;
        info
    })
}

type KvmStatsReaders = Option<(KvmStatsReader, Vec<KvmStatsReader>)>;

/// Every vCPU, configured, the BSP with its boot registers; and KVM's statistics
/// readers for the VM and each vCPU, where the host has them.
fn create_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    config: &VmConfig,
    ram: &GuestRam,
    boot: &boot::BootInfo,
) -> Result<(Vec<VcpuFd>, KvmStatsReaders), VmmError> {
    let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    let mut kvm_stats = match KvmStatsReader::open(vm) {
        Ok(r) => Some((r, Vec::new())),
        Err(e) => {
            log::debug!("{}", crate::error_chain(&e));
            None
        }
    };
    let mut vcpus = Vec::new();
    for id in 0..config.cpus {
        let params = CpuidParams {
            vcpu_id: id,
            vcpu_count: config.cpus,
            tsc_khz: None,
            tsc_deadline,
            hidden: config.cpu_features.hide.clone(),
        };
        let vcpu = kvm_setup::create_vcpu(kvm, vm, params)?;
        if id == 0 {
            kvm_setup::set_boot_registers(&vcpu, &ram.mem, boot)?;
        }
        if let Some((_, readers)) = kvm_stats.as_mut() {
            match KvmStatsReader::open(&vcpu) {
                Ok(r) => readers.push(r),
                Err(e) => log::debug!("no KVM stats for vCPU {id}: {e}"),
            }
        }
        vcpus.push(vcpu);
    }
    Ok((vcpus, kvm_stats))
}

/// Dropped when a vCPU thread ends, however it ends: wakes the main thread, which
/// then stops the others. A panic ends the VM rather than leaving it waiting.
struct TellMainOnEnd {
    wake: Sender<Wake>,
    exit: Arc<ExitState>,
    vcpu: u32,
}

impl Drop for TellMainOnEnd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.exit.finish(VmOutcome::Unexpected {
                vcpu: self.vcpu,
                what: "its thread panicked (a wbvmm bug: please report it with the panic message above)".into(),
            });
        }
        let _ = self.wake.send(Wake::Ended);
    }
}

/// Build, run and tear down a VM; the whole life of `wbvmm --kernel ...`.
pub fn run(config: &VmConfig, on_snapshot: &dyn Fn(&RunReport)) -> Result<RunReport, VmmError> {
    let vmm = Vmm::new(config)?;
    let running = vmm.start()?;
    Ok(running.wait_with(on_snapshot))
}

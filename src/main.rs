//! The `wbvmm` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wbvmm::config::{self, CpuFeatureEdits, SerialMode};
use wbvmm::error_chain;
use wbvmm::memory::SlotIndexKind;
use wbvmm::vcpu::EXIT_VMM_ERROR;
use wbvmm::vmm::{self, VmConfig};

const AFTER_HELP: &str = "\
EXIT STATUS:
  N    the guest wrote N to the debug-exit port (I/O port 0xf4; low 8 bits)
  0    the guest reset (i8042, reboot=k) or powered off
  1    wbvmm could not build or run the VM (the reason is printed), or could not
       write --stats=PATH: a PATH that cannot be created (say, in a missing or
       read-only directory) stops wbvmm before the guest starts; a write that
       fails when the VM ends turns the guest's status 0 into 1 (another status
       of the guest is kept)
  2    bad command line
  101  guest triple fault
  102  KVM internal error (RIP, CPL and instruction bytes are printed)
  103  other unexpected VM exit
  130  quit from the console (Ctrl-A x) or by SIGINT/SIGTERM
  159  --seccomp kill: a thread made a forbidden system call (the line says which)

CONSOLE: with --serial stdio the guest's COM1 is on the terminal, which is put in
raw mode; press Ctrl-A x to quit, Ctrl-A Ctrl-A to send Ctrl-A.";

#[derive(Parser, Debug)]
#[command(name = "wbvmm", version, about = "A KVM virtual machine monitor: boot a Linux (or PVH) kernel with a serial console", after_help = AFTER_HELP)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Kernel to boot: a bzImage, an ELF vmlinux, or an ELF with a PVH entry note.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,

    /// Initial ramdisk, placed below 3 GiB and within the kernel's limits.
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,

    /// Kernel command line (at most 2047 bytes).
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,

    /// Guest memory, like 256M or 2G. RAM beyond 3 GiB is placed above 4 GiB.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_memory)]
    memory: u64,

    /// Number of vCPUs (1 up to the host KVM's limit, at most 254).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    cpus: u32,

    /// Serial console: stdio, null, or file=PATH.
    #[arg(long, value_name = "MODE", default_value = "stdio", value_parser = parse_serial)]
    serial: SerialMode,

    /// Hide CPU features from the guest's CPUID, e.g. -cx16,-xsave (known: cx16, xsave,
    /// avx, avx2, x2apic, tsc-deadline, pdpe1gb, rdrand, rdseed, popcnt).
    #[arg(long, value_name = "LIST", default_value = "", allow_hyphen_values = true, value_parser = parse_cpu_features)]
    cpu_features: CpuFeatureEdits,

    /// Split guest RAM over N KVM memslots (1 up to the host's KVM_CAP_NR_MEMSLOTS;
    /// default one per RAM range).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    mem_slots: Option<u32>,

    /// The host-side memslot mirror: wbtree (default), linear, size-sorted, binary, btree.
    #[arg(long, value_name = "NAME", default_value = "wbtree", value_parser = parse_slot_index)]
    slot_index: SlotIndexKind,

    /// The per-vCPU MMIO-miss cache in front of the device bus: on or off.
    #[arg(long, value_name = "on|off", default_value = "on", action = clap::ArgAction::Set, value_parser = parse_on_off)]
    mmio_cache: bool,

    /// An RTL8139 NIC on a pre-created host tap: tap=NAME[,mac=MAC][,rev=0x20|0x10].
    /// Revision 0x20 (default) is an 8139C+ (Linux: 8139cp), 0x10 an 8139C (8139too).
    #[arg(long, value_name = "SPEC", value_parser = parse_net)]
    net: Option<wbvmm::net::NetConfig>,

    /// Pin vCPU threads to host CPUs: VCPU=LIST pairs, e.g. 0=1,1=0-1. Applied inside
    /// each vCPU thread before its first run.
    #[arg(long, value_name = "MAP", value_parser = parse_vcpu_affinity)]
    cpu_affinity: Option<wbvmm::affinity::VcpuAffinity>,

    /// Pin the wbvmm-io thread (console, tap RX) to host CPUs, e.g. 0 or 0-1.
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    io_affinity: Option<wbvmm::affinity::CpuList>,

    /// Serve a GDB remote stub on this Unix socket path; the guest waits for the
    /// debugger before its first instruction (gdb: target remote PATH).
    #[arg(long, value_name = "SOCKET")]
    gdb: Option<PathBuf>,

    /// Write statistics as JSON when the VM ends: to PATH, or to stderr without one.
    #[arg(long, value_name = "PATH", num_args = 0..=1, require_equals = true)]
    stats: Option<Option<PathBuf>>,

    /// Per-thread system call filters: kill (a forbidden call stops wbvmm with a line
    /// naming the thread and the call), log (the same line, and the call goes on), off.
    #[arg(long, value_name = "kill|log|off", default_value = "kill", value_parser = parse_seccomp)]
    seccomp: wbvmm::seccomp::SeccompMode,
}

fn parse_seccomp(s: &str) -> Result<wbvmm::seccomp::SeccompMode, String> {
    s.parse()
        .map_err(|e: wbvmm::seccomp::SeccompError| e.to_string())
}

fn parse_slot_index(s: &str) -> Result<SlotIndexKind, String> {
    s.parse()
        .map_err(|e: wbvmm::memory::UnknownSlotIndex| e.to_string())
}

fn parse_vcpu_affinity(s: &str) -> Result<wbvmm::affinity::VcpuAffinity, String> {
    s.parse()
        .map_err(|e: wbvmm::affinity::AffinityError| e.to_string())
}

fn parse_cpu_list(s: &str) -> Result<wbvmm::affinity::CpuList, String> {
    s.parse()
        .map_err(|e: wbvmm::affinity::AffinityError| e.to_string())
}

fn parse_net(s: &str) -> Result<wbvmm::net::NetConfig, String> {
    s.parse().map_err(|e: wbvmm::net::NetError| e.to_string())
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("'{s}' is neither on nor off")),
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Time guest kernel mode, user mode and an exit round trip, and say whether
    /// guest kernel mode runs natively on this host.
    Probe {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print a --stats JSON file as readable tables, or single values from it.
    Stats {
        /// The file written by --stats=PATH.
        file: PathBuf,
        /// Print only the value at KEY.PATH (object keys and array indices joined by
        /// dots, e.g. `exits.io_out`, `threads.vcpu.0`), one line per --get: numbers
        /// and strings as they are, arrays of them space-separated, anything else as
        /// JSON.
        #[arg(long = "get", value_name = "KEY.PATH")]
        get: Vec<String>,
    },
}

fn parse_memory(s: &str) -> Result<u64, String> {
    config::parse_size(s)
        .and_then(config::check_memory_size)
        .map_err(|e| e.to_string())
}

fn parse_serial(s: &str) -> Result<SerialMode, String> {
    s.parse().map_err(|e: config::ConfigError| e.to_string())
}

fn parse_cpu_features(s: &str) -> Result<CpuFeatureEdits, String> {
    s.parse().map_err(|e: config::ConfigError| e.to_string())
}

fn main() -> ExitCode {
    let _ = vmm::PROCESS_START.set(std::time::Instant::now());
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Probe { json }) => match wbvmm::probe::run() {
            Ok(r) => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                } else {
                    print!("{}", r.human());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("wbvmm probe: {}", error_chain(&e));
                ExitCode::from(EXIT_VMM_ERROR as u8)
            }
        },
        Some(Command::Stats { file, get }) => match wbvmm::stats::read_file(&file) {
            Ok(stats) if get.is_empty() => {
                print!("{}", wbvmm::stats::summary::render(&stats));
                ExitCode::SUCCESS
            }
            Ok(stats) => {
                for path in &get {
                    match stats.get(path) {
                        Some(v) => println!("{}", wbvmm::stats::plain_value(&v)),
                        None => {
                            eprintln!(
                                "wbvmm stats: {} has no {path:?} (see `wbvmm stats {}` for what it has)",
                                file.display(),
                                file.display()
                            );
                            return ExitCode::from(EXIT_VMM_ERROR as u8);
                        }
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("wbvmm stats: {}", error_chain(&e));
                ExitCode::from(EXIT_VMM_ERROR as u8)
            }
        },
        None => {
            let Some(kernel) = cli.kernel else {
                eprintln!("wbvmm: --kernel PATH is required (see wbvmm --help)");
                return ExitCode::from(2);
            };
            let cfg = VmConfig {
                kernel,
                initramfs: cli.initramfs,
                cmdline: cli.cmdline,
                mem_size: cli.memory,
                cpus: cli.cpus,
                serial: cli.serial,
                cpu_features: cli.cpu_features,
                mem_slots: cli.mem_slots,
                slot_index: cli.slot_index,
                mmio_cache: cli.mmio_cache,
                net: cli.net,
                cpu_affinity: cli.cpu_affinity.unwrap_or_default(),
                io_affinity: cli.io_affinity,
                gdb: cli.gdb,
            };
            // A --stats file that cannot be written fails now, not after the guest ran.
            if let Some(Some(path)) = &cli.stats {
                if let Err(e) = wbvmm::stats::check_destination(path) {
                    eprintln!("wbvmm: {}", error_chain(&e));
                    return ExitCode::from(EXIT_VMM_ERROR as u8);
                }
            }
            // Before any thread exists: SIGINT/SIGTERM/SIGUSR1 (also one sent during
            // setup) reach the VM's I/O thread, which ends the VM or takes a snapshot.
            if let Err(e) = vmm::block_vm_signals() {
                eprintln!("wbvmm: cannot block SIGINT/SIGTERM/SIGUSR1: {e}");
                return ExitCode::from(EXIT_VMM_ERROR as u8);
            }
            // After the signals are blocked: `--seccomp log`'s supervisor thread inherits
            // the mask, so a SIGINT still reaches the VM's signalfd.
            if let Err(e) = wbvmm::seccomp::configure(cli.seccomp) {
                eprintln!("wbvmm: {}", error_chain(&e));
                return ExitCode::from(EXIT_VMM_ERROR as u8);
            }
            let stats_path = cli.stats.clone();
            let snapshot = move |r: &vmm::RunReport| {
                // SIGUSR1: the running VM's statistics, to the --stats destination.
                if let Err(e) =
                    wbvmm::stats::write(r, stats_path.as_ref().and_then(|p| p.as_deref()))
                {
                    eprintln!("wbvmm: {}", error_chain(&e));
                }
            };
            match vmm::run(&cfg, &snapshot) {
                Ok(report) => {
                    log::info!(
                        "setup {} us (process start to first KVM_RUN), resident overhead {} KiB beyond guest RAM",
                        report.setup_time.as_micros(),
                        report.rss_overhead_bytes / 1024
                    );
                    let stats = match &cli.stats {
                        Some(path) => wbvmm::stats::write(&report, path.as_deref()),
                        None => Ok(()),
                    };
                    let outcome = report.outcome.as_ref();
                    if let Some(line) = outcome.and_then(|o| o.failure_line()) {
                        eprintln!("wbvmm: {line}");
                    }
                    if let Err(e) = &stats {
                        eprintln!("wbvmm: {}", error_chain(e));
                    }
                    ExitCode::from(wbvmm::exit::exit_status(outcome, stats.is_ok()))
                }
                Err(e) => {
                    eprintln!("wbvmm: {}", error_chain(&e));
                    ExitCode::from(EXIT_VMM_ERROR as u8)
                }
            }
        }
    }
}

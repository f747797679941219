//! The VM side of `scripts/soak.sh`: boots the test guest on a tap through the library
//! and adds and removes memslots under it while it runs — the one thing the soak needs
//! that the command line cannot do from outside. Everything else (the namespace, the
//! flood, SIGUSR1 every second, sampling RSS/descriptors/threads, deleting and
//! re-creating the tap) is the script's.
//!
//! ```text
//! soak --kernel ELF --tap NAME --cmdline 'WORDS' --serial FILE
//! ```
//!
//! Prints one `snapshot:` line per SIGUSR1 (the drop counters and the slot churn so
//! far) and a last `soak-vm:` line; exits 0 when the guest ended with status 0.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use wbvmm::config::{CpuFeatureEdits, SerialMode};
use wbvmm::memory::{SlotFlags, SlotRegistry};
use wbvmm::net::{NetConfig, NetStats};
use wbvmm::vcpu::VmOutcome;
use wbvmm::vmm::{block_vm_signals, RunReport, VmConfig, Vmm};

/// The churned slots: above the guest's RAM, below the PCI hole.
const CHURN_BASE: u64 = 0x4000_0000;
const CHURN_SLOTS: u64 = 4;
const CHURN_SIZE: u64 = 2 << 20;
/// Pace of the churn: a few hundred KVM slot updates a second at most, so the soak
/// measures steady state rather than how fast one thread can call the ioctl.
const CHURN_PAUSE: Duration = Duration::from_millis(20);

struct Args {
    kernel: std::path::PathBuf,
    tap: String,
    cmdline: String,
    serial: std::path::PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let (mut kernel, mut tap, mut cmdline, mut serial) = (None, None, None, None);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--kernel" => kernel = Some(v.into()),
            "--tap" => tap = Some(v),
            "--cmdline" => cmdline = Some(v),
            "--serial" => serial = Some(v.into()),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    let need = |name: &str| format!("--{name} is required");
    Ok(Args {
        kernel: kernel.ok_or_else(|| need("kernel"))?,
        tap: tap.ok_or_else(|| need("tap"))?,
        cmdline: cmdline.ok_or_else(|| need("cmdline"))?,
        serial: serial.ok_or_else(|| need("serial"))?,
    })
}

/// Add and remove the churn slots until `stop`; each slot gets one page written, so
/// it is real memory while it exists.
fn churn(reg: &SlotRegistry, stop: &AtomicBool, cycles: &AtomicU64, errors: &AtomicU64) {
    while !stop.load(Ordering::Relaxed) {
        let mut ids = Vec::new();
        for i in 0..CHURN_SLOTS {
            match reg.add_ram(CHURN_BASE + i * 2 * CHURN_SIZE, CHURN_SIZE, SlotFlags::NONE) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!("soak-vm: adding a slot failed: {}", wbvmm::error_chain(&e));
                    }
                }
            }
        }
        for &id in &ids {
            if let Some(s) = reg.slot(id) {
                // SAFETY: the registry owns this mapping while the slot exists, and
                // only this thread removes it.
                unsafe { std::ptr::write_volatile(s.host_addr as *mut u64, s.gpa) };
            }
        }
        std::thread::sleep(CHURN_PAUSE);
        for id in ids {
            if let Err(e) = reg.remove(id) {
                if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                    eprintln!(
                        "soak-vm: removing a slot failed: {}",
                        wbvmm::error_chain(&e)
                    );
                }
            }
        }
        cycles.fetch_add(1, Ordering::Relaxed);
    }
}

fn net_line(net: &Option<NetStats>) -> String {
    match net {
        Some(n) => format!(
            "rx_packets={} rx_ring_full={} rx_disabled={} rx_filtered={} rx_backpressure={} \
             tx_packets={} tx_dropped={} tap_errors={}",
            n.rx_packets,
            n.rx_ring_full,
            n.rx_disabled,
            n.rx_filtered,
            n.rx_backpressure,
            n.tx_packets,
            n.tx_dropped,
            n.tap_errors
        ),
        None => "no-net".into(),
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!(
                "soak-vm: {e}\nusage: soak --kernel ELF --tap NAME --cmdline WORDS --serial FILE"
            );
            std::process::exit(2);
        }
    };
    let net: NetConfig = match format!("tap={}", args.tap).parse() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("soak-vm: {}", wbvmm::error_chain(&e));
            std::process::exit(2);
        }
    };
    let cfg = VmConfig {
        kernel: args.kernel,
        initramfs: None,
        cmdline: args.cmdline,
        mem_size: 256 << 20,
        cpus: 1,
        serial: SerialMode::File(args.serial),
        cpu_features: CpuFeatureEdits::default(),
        mem_slots: None,
        slot_index: Default::default(),
        mmio_cache: true,
        net: Some(net),
        cpu_affinity: Default::default(),
        io_affinity: None,
        gdb: None,
    };
    if let Err(e) = block_vm_signals() {
        eprintln!("soak-vm: cannot block SIGINT/SIGTERM/SIGUSR1 for the VM's signalfd: {e}");
        std::process::exit(1);
    }
    let running = match Vmm::new(&cfg).and_then(|v| v.start()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("soak-vm: {}", wbvmm::error_chain(&e));
            std::process::exit(1);
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let cycles = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let churner = {
        let (reg, stop, cycles, errors) = (
            running.vmm.memory.clone(),
            stop.clone(),
            cycles.clone(),
            errors.clone(),
        );
        std::thread::Builder::new()
            .name("soak-churn".into())
            .spawn(move || churn(&reg, &stop, &cycles, &errors))
            .expect("spawn the churn thread")
    };
    let snapshots = AtomicU64::new(0);
    let on_snapshot = |r: &RunReport| {
        let n = snapshots.fetch_add(1, Ordering::Relaxed) + 1;
        println!(
            "snapshot: n={n} slot_cycles={} {}",
            cycles.load(Ordering::Relaxed),
            net_line(&r.net)
        );
    };
    let report = running.wait_with(&on_snapshot);
    stop.store(true, Ordering::Relaxed);
    let _ = churner.join();
    println!(
        "soak-vm: outcome={:?} snapshots={} slot_cycles={} slot_errors={} {}",
        report.outcome,
        snapshots.load(Ordering::Relaxed),
        cycles.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        net_line(&report.net)
    );
    let ok = report.outcome == Some(VmOutcome::DebugExit(0)) && errors.load(Ordering::Relaxed) == 0;
    std::process::exit(if ok { 0 } else { 1 });
}

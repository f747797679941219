//! The per-thread seccomp filters, end to end: each thread kind makes a forbidden
//! system call (an AF_INET socket) right after its filter is in, through a hook that
//! exists only in test builds (feature `test-hooks`, see src/seccomp) and that the
//! guest cannot reach (chosen by this program before the VM is built, fired at
//! thread start). With `kill` wbvmm stops with a line naming the thread and the call;
//! with `log` it prints the same line, the call goes through and the guest runs on.
//!
//! Each case runs in a child process (this same binary, re-run with
//! `WBVMM_SECCOMP_CHILD=KIND,MODE`) that builds and runs the VM through the library
//! as `wbvmm` does: a filter is per process for good, and a killed child must not
//! take the test runner with it. Hence `harness = false`: the child needs a plain
//! `main` of its own.

mod common;
use common::*;

use std::process::{Command, Stdio};
use std::time::Duration;

use wbvmm::config::{CpuFeatureEdits, SerialMode};
use wbvmm::memory::SlotIndexKind;
use wbvmm::seccomp::{self, SeccompMode, ThreadKind, EXIT_SECCOMP};
use wbvmm::vmm::{self, VmConfig};

const CHILD_ENV: &str = "WBVMM_SECCOMP_CHILD";
/// The guest's exit status when it ran to its end.
const GUEST_EXIT: i32 = 7;

fn kind_of(s: &str) -> ThreadKind {
    match s {
        "main" => ThreadKind::Main,
        "vcpu" => ThreadKind::Vcpu,
        "io" => ThreadKind::Io,
        other => panic!("unknown thread kind {other}"),
    }
}

/// The child: one VM whose `kind` thread makes the forbidden call.
fn child(spec: &str) -> ! {
    let (kind, mode) = spec.split_once(',').expect("KIND,MODE");
    let mode: SeccompMode = mode.parse().expect("mode");
    seccomp::configure(mode).expect("configure seccomp");
    seccomp::test_hooks::forbidden_call_at_start(kind_of(kind));
    let cfg = VmConfig {
        kernel: testguest(),
        initramfs: None,
        cmdline: format!("banner exit={GUEST_EXIT}"),
        mem_size: 64 << 20,
        cpus: 1,
        serial: SerialMode::Stdio,
        cpu_features: CpuFeatureEdits::default(),
        mem_slots: None,
        slot_index: SlotIndexKind::default(),
        mmio_cache: true,
        net: None,
        cpu_affinity: Default::default(),
        io_affinity: None,
        gdb: None,
    };
    let report = vmm::run(&cfg, &|_| {}).expect("run the VM");
    let code = report.outcome.map(|o| o.exit_code()).unwrap_or(1);
    std::process::exit(code);
}

fn run_child(kind: &str, mode: &str) -> Output {
    let mut cmd = Command::new(std::env::current_exe().expect("own path"));
    cmd.env(CHILD_ENV, format!("{kind},{mode}"))
        .stdin(Stdio::null());
    run_with_timeout(&mut cmd, None, Duration::from_secs(60))
}

fn kill_mode_stops_with_a_line(kind: &str, line: &str) {
    let o = run_child(kind, "kill");
    assert_eq!(o.code, Some(EXIT_SECCOMP), "{}", o.show());
    let wanted = format!("wbvmm: seccomp: {line} made a forbidden system call: socket (41);");
    assert!(o.stderr.contains(&wanted), "no '{wanted}'\n{}", o.show());
    // The report is the last thing wbvmm says: nothing ran on after it.
    assert!(
        o.stderr
            .trim_end()
            .lines()
            .last()
            .is_some_and(|l| l.starts_with(&wanted)),
        "{}",
        o.show()
    );
    if kind != "main" {
        // vCPU and I/O filters are in (and the hook fired) before the first KVM_RUN.
        assert!(!o.stdout.contains("testguest ready"), "{}", o.show());
    }
}

fn vcpu_thread_forbidden_call_stops_wbvmm() {
    kill_mode_stops_with_a_line("vcpu", "the vCPU thread vcpu0");
}

fn io_thread_forbidden_call_stops_wbvmm() {
    kill_mode_stops_with_a_line("io", "the I/O thread wbvmm-io");
}

fn main_thread_forbidden_call_stops_wbvmm() {
    kill_mode_stops_with_a_line("main", "the main thread");
}

/// `log`: each kind's call is reported with the same line and goes through: the
/// guest runs to its end.
fn log_mode_reports_the_call_and_goes_on() {
    for (kind, line) in [
        ("vcpu", "the vCPU thread vcpu0"),
        ("io", "the I/O thread wbvmm-io"),
        ("main", "the main thread"),
    ] {
        let o = run_child(kind, "log");
        assert_eq!(o.code, Some(GUEST_EXIT), "{kind}: {}", o.show());
        assert!(o.stdout.contains("testguest ready"), "{kind}: {}", o.show());
        let wanted = format!(
            "wbvmm: seccomp: {line} made a forbidden system call: socket (41); let through (--seccomp log)"
        );
        assert_eq!(o.stderr.matches(&wanted).count(), 1, "{kind}: {}", o.show());
        assert_eq!(
            o.stderr.matches("forbidden").count(),
            1,
            "{kind}: {}",
            o.show()
        );
    }
}

/// The product binary: a bad mode is a command-line error; `off` and the default run.
fn the_flag_of_the_product_binary() {
    let o = boot_testguest("banner exit=5", &["--seccomp", "trap"], None);
    assert_eq!(o.code, Some(2), "{}", o.show());
    assert!(
        o.stderr
            .contains("'trap' is not a --seccomp mode: use kill, log or off"),
        "{}",
        o.show()
    );
    for mode in [None, Some("kill"), Some("log"), Some("off")] {
        let args: Vec<&str> = mode.map(|m| vec!["--seccomp", m]).unwrap_or_default();
        let o = boot_testguest("banner exit=5", &args, None);
        assert_eq!(o.code, Some(5), "{mode:?}: {}", o.show());
        assert!(!o.stderr.contains("forbidden"), "{mode:?}: {}", o.show());
    }
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child(&spec);
    }
    let tests: [(&str, fn()); 5] = [
        (
            "vcpu_thread_forbidden_call_stops_wbvmm",
            vcpu_thread_forbidden_call_stops_wbvmm,
        ),
        (
            "io_thread_forbidden_call_stops_wbvmm",
            io_thread_forbidden_call_stops_wbvmm,
        ),
        (
            "main_thread_forbidden_call_stops_wbvmm",
            main_thread_forbidden_call_stops_wbvmm,
        ),
        (
            "log_mode_reports_the_call_and_goes_on",
            log_mode_reports_the_call_and_goes_on,
        ),
        (
            "the_flag_of_the_product_binary",
            the_flag_of_the_product_binary,
        ),
    ];
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let (mut passed, mut failed) = (0, 0);
    for (name, test) in tests {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        if !kvm_available(name) {
            continue;
        }
        match std::panic::catch_unwind(test) {
            Ok(()) => {
                println!("test {name} ... ok");
                passed += 1;
            }
            Err(_) => {
                println!("test {name} ... FAILED");
                failed += 1;
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    std::process::exit(if failed == 0 { 0 } else { 101 });
}

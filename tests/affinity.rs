//! vCPU and I/O thread pinning, checked from /proc while the guest runs.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

fn allowed_list(pid: u32, tid: &str) -> String {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[test]
fn vcpu_and_io_threads_are_pinned_before_they_run() {
    if !kvm_available("vcpu_and_io_threads_are_pinned_before_they_run") {
        return;
    }
    if wbvmm::affinity::allowed_cpus().len() < 2 {
        eprintln!("\n!!! SKIPPED pinning test: this host offers fewer than 2 CPUs !!!\n");
        return;
    }
    let tg = testguest();
    let stats = stats_file("affinity");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wbvmm"));
    cmd.args([
        "--kernel",
        tg.to_str().unwrap(),
        "--cpus",
        "2",
        "--cpu-affinity",
        "0=1,1=0",
        "--io-affinity",
        "0",
        "--cmdline",
        "hold",
        &format!("--stats={}", stats.display()),
    ]);
    // The guest holds (all threads alive) until the checks below are done.
    let mut vm = Running::spawn(cmd, Some(stats.clone()));
    vm.wait_for("hold: waiting", STARTUP_DEADLINE);
    let pid = vm.pid();
    let snap = vm.snapshot();
    let tid = |v: &serde_json::Value| v.as_i64().expect("a thread id").to_string();
    let (v0, v1, io) = (
        tid(&snap["threads"]["vcpu"][0]),
        tid(&snap["threads"]["vcpu"][1]),
        tid(&snap["threads"]["io"]),
    );
    assert_eq!(allowed_list(pid, &v0), "1", "{snap}");
    assert_eq!(allowed_list(pid, &v1), "0", "{snap}");
    assert_eq!(allowed_list(pid, &io), "0", "{snap}");
    let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{v1}/comm")).unwrap();
    assert_eq!(comm.trim(), "vcpu1");
    vm.send_line("done");
    let o = vm.finish(STARTUP_DEADLINE);
    assert_eq!(o.code, Some(0), "{}", o.show());
    let _ = std::fs::remove_file(&stats);
    // The same ids were printed at start, for `taskset -p`.
    let line = format!("wbvmm: threads vcpu0={v0} vcpu1={v1} wbvmm-io={io}");
    assert!(o.stderr.contains(&line), "want '{line}'\n{}", o.show());
}

#[test]
fn bad_affinity_is_a_clear_error() {
    let o = wbvmm(
        &["--kernel", "x", "--cpu-affinity", "0=a"],
        None,
        Duration::from_secs(10),
    );
    assert_eq!(o.code, Some(2), "{}", o.show());
    assert!(o.stderr.contains("not a CPU list"), "{}", o.show());
    if !kvm_available("bad_affinity_is_a_clear_error") {
        return;
    }
    let tg = testguest();
    let o = wbvmm(
        &["--kernel", tg.to_str().unwrap(), "--cpu-affinity", "0=999"],
        None,
        Duration::from_secs(30),
    );
    assert_eq!(o.code, Some(1), "{}", o.show());
    assert!(
        o.stderr.contains("host CPU 999 is not available"),
        "{}",
        o.show()
    );
    let o = wbvmm(
        &["--kernel", tg.to_str().unwrap(), "--cpu-affinity", "2=0"],
        None,
        Duration::from_secs(30),
    );
    assert_eq!(o.code, Some(1), "{}", o.show());
    assert!(o.stderr.contains("vCPU 2"), "{}", o.show());
}

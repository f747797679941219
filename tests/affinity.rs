//! vCPU and I/O thread pinning, checked from /proc while the guest runs.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
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
    let mut child = Command::new(env!("CARGO_BIN_EXE_wbvmm"))
        .args([
            "--kernel",
            tg.to_str().unwrap(),
            "--cpus",
            "2",
            "--cpu-affinity",
            "0=1,1=0",
            "--io-affinity",
            "0",
        ])
        .args([
            "--cmdline",
            "mmio-loop=0xd0000000,20000",
            "--serial",
            "null",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wbvmm");
    let pid = child.id();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // "wbvmm: threads vcpu0=TID vcpu1=TID wbvmm-io=TID"
    let tid = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name} in '{line}'"))
            .to_string()
    };
    let (v0, v1, io) = (tid("vcpu0"), tid("vcpu1"), tid("wbvmm-io"));
    assert_eq!(allowed_list(pid, &v0), "1", "{line}");
    assert_eq!(allowed_list(pid, &v1), "0", "{line}");
    assert_eq!(allowed_list(pid, &io), "0", "{line}");
    let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{v1}/comm")).unwrap();
    assert_eq!(comm.trim(), "vcpu1");
    let status = child.wait_timeout_or_kill(Duration::from_secs(60));
    assert_eq!(status, Some(0));
}

trait WaitTimeout {
    fn wait_timeout_or_kill(&mut self, t: Duration) -> Option<i32>;
}

impl WaitTimeout for std::process::Child {
    fn wait_timeout_or_kill(&mut self, t: Duration) -> Option<i32> {
        let start = std::time::Instant::now();
        loop {
            if let Ok(Some(s)) = self.try_wait() {
                return s.code();
            }
            if start.elapsed() > t {
                let _ = self.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
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

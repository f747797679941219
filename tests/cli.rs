//! Bad input gets a clear error and a non-zero status, never a panic.

mod common;
use common::*;
use std::time::Duration;

fn run(args: &[&str]) -> Output {
    wbvmm(args, None, Duration::from_secs(30))
}

fn assert_clean_failure(o: &Output, code: i32, needle: &str) {
    assert_eq!(o.code, Some(code), "{}", o.show());
    assert!(
        o.stderr.contains(needle),
        "expected '{needle}' in stderr\n{}",
        o.show()
    );
    assert!(!o.stderr.contains("panicked"), "{}", o.show());
}

#[test]
fn help_and_version() {
    let h = run(&["--help"]);
    assert_eq!(h.code, Some(0));
    for flag in [
        "--kernel",
        "--initramfs",
        "--cmdline",
        "--memory",
        "--cpus",
        "--serial",
        "--cpu-features",
        "probe",
    ] {
        assert!(h.stdout.contains(flag), "--help lacks {flag}\n{}", h.show());
    }
    let v = run(&["--version"]);
    assert_eq!(v.code, Some(0));
    assert!(v.stdout.starts_with("wbvmm "), "{}", v.show());
}

#[test]
fn usage_errors() {
    assert_clean_failure(
        &run(&["--kernel", "x", "--memory", "lots"]),
        2,
        "not a size",
    );
    assert_clean_failure(&run(&["--kernel", "x", "--memory", "1M"]), 2, "too small");
    assert_clean_failure(&run(&["--kernel", "x", "--cpus", "0"]), 2, "--cpus");
    assert_clean_failure(
        &run(&["--kernel", "x", "--serial", "tty"]),
        2,
        "not a serial mode",
    );
    assert_clean_failure(
        &run(&["--kernel", "x", "--cpu-features", "-warp"]),
        2,
        "not a CPU feature edit",
    );
    assert_clean_failure(&run(&["--bogus"]), 2, "--bogus");
    assert_clean_failure(&run(&[]), 2, "--kernel");
}

#[test]
fn vm_errors() {
    if !kvm_available("vm_errors") {
        return;
    }
    assert_clean_failure(
        &run(&["--kernel", "/nonexistent/kernel"]),
        1,
        "cannot open kernel /nonexistent/kernel",
    );
    let not_kernel = std::env::temp_dir().join(format!("wbvmm-notkernel-{}", std::process::id()));
    std::fs::write(&not_kernel, b"definitely not a kernel image").unwrap();
    let nk = not_kernel.to_str().unwrap();
    assert_clean_failure(&run(&["--kernel", nk]), 1, "is not a kernel");
    let tg = testguest();
    let tg = tg.to_str().unwrap();
    assert_clean_failure(
        &run(&["--kernel", tg, "--cpus", "100000"]),
        1,
        "--cpus 100000",
    );
    let long = "y".repeat(5000);
    assert_clean_failure(
        &run(&["--kernel", tg, "--cmdline", &long]),
        1,
        "command line is 5001 bytes",
    );
    assert_clean_failure(&run(&["--kernel", tg, "--memory", "64T"]), 1, "memory");
    let big = std::env::temp_dir().join(format!("wbvmm-bigrd-{}", std::process::id()));
    std::fs::write(&big, vec![0u8; 40 << 20]).unwrap();
    let o = run(&[
        "--kernel",
        tg,
        "--memory",
        "32M",
        "--initramfs",
        big.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, 1, "does not fit");
    assert_clean_failure(
        &run(&["--kernel", tg, "--initramfs", "/nonexistent/rd"]),
        1,
        "cannot open initramfs",
    );
    std::fs::remove_file(not_kernel).ok();
    std::fs::remove_file(big).ok();
}

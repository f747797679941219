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

/// `needle` appears exactly once in stderr (a cause printed by the chain, not also
/// inside the message above it).
fn assert_once(o: &Output, needle: &str) {
    assert_eq!(
        o.stderr.matches(needle).count(),
        1,
        "expected '{needle}' once in stderr\n{}",
        o.show()
    );
}

#[test]
fn os_errors_show_their_cause_once() {
    if !kvm_available("os_errors_show_their_cause_once") {
        return;
    }
    let tg = testguest();
    let tg = tg.to_str().unwrap();
    let o = run(&["--kernel", tg, "--serial", "file=/nonexistent/serial.txt"]);
    assert_clean_failure(
        &o,
        1,
        "cannot open serial output file /nonexistent/serial.txt",
    );
    assert!(
        o.stderr
            .contains("\n  caused by: No such file or directory (os error 2)"),
        "{}",
        o.show()
    );
    assert_once(&o, "(os error 2)");
    let o = run(&["--kernel", "/nonexistent/kernel"]);
    assert_once(&o, "(os error 2)");
}

#[test]
fn stats_command_errors() {
    let o = run(&["stats", "/nonexistent/stats.json"]);
    assert_clean_failure(&o, 1, "wbvmm stats: cannot read /nonexistent/stats.json");
    assert_once(&o, "caused by: No such file or directory (os error 2)");
    let bad = std::env::temp_dir().join(format!("wbvmm-badstats-{}", std::process::id()));
    std::fs::write(&bad, "not json").unwrap();
    let o = run(&["stats", bad.to_str().unwrap()]);
    assert_clean_failure(&o, 1, "is not a --stats JSON file");
    assert_once(&o, "caused by: ");
    std::fs::remove_file(bad).ok();
}

/// `wbvmm stats` reads a file through the typed schema: tables, or single values.
#[test]
fn stats_command_renders_and_gets_values() {
    let path = std::env::temp_dir().join(format!("wbvmm-getstats-{}", std::process::id()));
    std::fs::write(
        &path,
        r#"{"outcome": "Reset", "exit_code": 0, "threads": {"vcpu": [11, 12], "io": 10},
            "exits": {"io_in": 3, "io_out": 4, "internal_error": 1}}"#,
    )
    .unwrap();
    let file = path.to_str().unwrap();
    let o = run(&["stats", file]);
    assert_eq!(o.code, Some(0), "{}", o.show());
    assert!(o.stdout.contains("outcome       Reset"), "{}", o.show());
    assert!(o.stdout.contains("internal_error"), "{}", o.show());
    let o = run(&[
        "stats",
        "--get",
        "exits.io_out",
        "--get",
        "threads.vcpu",
        "--get",
        "outcome",
        file,
    ]);
    assert_eq!(o.code, Some(0), "{}", o.show());
    assert_eq!(o.stdout, "4\n11 12\nReset\n", "{}", o.show());
    let o = run(&["stats", "--get", "exits.warp", file]);
    assert_clean_failure(&o, 1, "has no \"exits.warp\"");
    std::fs::write(&path, r#"{"exits": {"io_in": "many"}}"#).unwrap();
    let o = run(&["stats", file]);
    assert_clean_failure(&o, 1, "is not a --stats JSON file");
    assert_once(&o, "invalid type: string \"many\"");
    std::fs::remove_file(path).ok();
}

/// A --stats=PATH that cannot be created stops wbvmm before the guest runs.
#[test]
fn stats_path_is_checked_before_the_guest_starts() {
    if !kvm_available("stats_path_is_checked_before_the_guest_starts") {
        return;
    }
    let tg = testguest();
    let tg = tg.to_str().unwrap();
    for (path, cause) in [
        (
            "/nonexistent-dir/x.json".to_string(),
            "No such file or directory (os error 2)",
        ),
        (
            std::env::temp_dir().to_str().unwrap().to_string(),
            "Is a directory (os error 21)",
        ),
    ] {
        let stats = format!("--stats={path}");
        let o = run(&["--kernel", tg, "--cmdline", "banner", &stats]);
        assert_clean_failure(&o, 1, &format!("cannot create the --stats file {path}"));
        assert_once(&o, cause);
        assert!(!o.stdout.contains("testguest ready"), "{}", o.show());
    }
    // A writable path: written when the VM ends, no temporary file left beside it.
    let dir = std::env::temp_dir().join(format!("wbvmm-stats-ok-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    let path = dir.join("s.json");
    let stats = format!("--stats={}", path.display());
    let o = run(&[
        "--kernel",
        tg,
        "--serial",
        "null",
        "--cmdline",
        "banner",
        &stats,
    ]);
    assert_eq!(o.code, Some(0), "{}", o.show());
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(v["exit_code"], 0);
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["s.json"]);
    std::fs::remove_dir_all(dir).ok();
}

/// The statistics cannot be written when the VM ends (their directory was removed
/// while the guest waited for a line on its console): the error and its cause are
/// printed and the status is 1, although the guest exited 0.
#[test]
fn stats_write_failure_at_the_end_is_an_error() {
    use std::io::{BufRead, Read, Write};
    use std::process::{Command, Stdio};
    if !kvm_available("stats_write_failure_at_the_end_is_an_error") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("wbvmm-stats-gone-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    let path = dir.join("s.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_wbvmm"))
        .args(["--kernel", testguest().to_str().unwrap()])
        .args(["--cmdline", "banner echo"])
        .arg(format!("--stats={}", path.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wbvmm");
    let mut stdin = child.stdin.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    // The guest is running (and waits in `echo`) once the banner is out.
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut all = String::new();
        let mut line = String::new();
        while out.read_line(&mut line).unwrap_or(0) > 0 {
            if line.contains("testguest ready") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            line.clear();
        }
        all
    });
    if rx.recv_timeout(Duration::from_secs(60)).is_err() {
        let _ = child.kill();
        panic!("no banner within 60 s; stderr: {}", err.join().unwrap());
    }
    std::fs::remove_dir(&dir).unwrap();
    stdin.write_all(b"go\n").unwrap();
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("wbvmm did not end; stderr: {}", err.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stderr = err.join().unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "wbvmm: cannot write the --stats file {}\n  caused by: No such file or directory (os error 2)",
            path.display()
        )),
        "{stderr}"
    );
    assert_eq!(stderr.matches("(os error 2)").count(), 1, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

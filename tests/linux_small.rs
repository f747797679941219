//! The small Linux guest (guest-images/linux-small: Debian's kernel source, the
//! project's configuration) under wbvmm, on every host: Linux's own 8139cp and 8139too
//! drive wbvmm's RTL8139, with interrupts through IOAPIC pin 16, and netperf TCP_RR runs
//! both ways through the tap. Where guest kernel mode is emulated (nested PVM hosts) this
//! takes minutes, not milliseconds; every wait is for a console line, and its deadline
//! only fails a run that hung.

mod common;
use common::*;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Failure path of a whole boot: an emulated guest kernel on a loaded machine takes a
/// few minutes; a run that has not ended by then is stuck.
const BOOT_DEADLINE: Duration = Duration::from_secs(1200);

fn small_image(name: &str) -> PathBuf {
    let p = repo_root().join("guest-images/out/linux-small").join(name);
    assert!(
        p.exists(),
        "{} is missing: run guest-images/build-linux-small.sh (scripts/setup.sh does)",
        p.display()
    );
    p
}

/// The README's words for a Linux guest, and the ones that only make it faster where
/// guest kernel mode is emulated: each kept in one file that the scripts read too.
fn words(file: &str) -> String {
    let p = repo_root().join("guest-images/linux").join(file);
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_string()
}

const STAGES: &[(&str, &str)] = &[
    ("banner", "Linux version"),
    ("/init", "Run /init"),
    ("driver bound", "driver=81"),
    ("eth0 up", "eth0 up:"),
    ("first ping reply", "bytes from"),
    ("guest netperf done", "step netperf"),
    ("netserver up", "netserver listening"),
];

fn boot(cmdline: &str, extra: &[&str], ns: Option<&NetNs>, stats: PathBuf) -> Running {
    let kernel = small_image("vmlinux");
    let initrd = small_image("initramfs.cpio");
    let stats_arg = format!("--stats={}", stats.display());
    let mut args = vec![
        "--kernel",
        kernel.to_str().unwrap(),
        "--initramfs",
        initrd.to_str().unwrap(),
        "--memory",
        "128M",
        "--cmdline",
        cmdline,
        &stats_arg,
    ];
    args.extend_from_slice(extra);
    let cmd = match ns {
        Some(ns) => ns.wbvmm_command(&args),
        None => {
            let mut c = Command::new(env!("CARGO_BIN_EXE_wbvmm"));
            c.args(&args);
            c
        }
    };
    Running::spawn(cmd, Some(stats))
}

fn final_stats(vm: &Running) -> serde_json::Value {
    let p = vm.stats_path().expect("a --stats file");
    let v = std::fs::read_to_string(&p)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let _ = std::fs::remove_file(&p);
    v
}

/// netperf's TCP_RR rate: the last line whose first six fields are numbers (socket
/// sizes, request and response sizes, elapsed time, transactions per second).
fn netperf_rate(out: &str) -> Option<f64> {
    out.lines().rev().find_map(|l| {
        let f: Vec<f64> = l
            .split_whitespace()
            .map_while(|w| w.parse::<f64>().ok())
            .collect();
        (f.len() >= 6).then(|| f[5])
    })
}

/// Correctness must not depend on extra kernel words: with the README's words alone the
/// small guest reaches /init, runs it, and ends through the i8042 reset.
#[test]
fn small_linux_runs_init_with_the_plain_command_line() {
    if !kvm_available("small_linux_runs_init_with_the_plain_command_line") {
        return;
    }
    let cmdline = format!("{} wbvmm.run=poweroff wbvmm.end=reboot", words("cmdline"));
    let mut vm = boot(&cmdline, &[], None, stats_file("small-plain"));
    vm.wait_for("wbvmm-linux-guest: init started", BOOT_DEADLINE);
    let o = vm.finish(BOOT_DEADLINE);
    eprintln!(
        "small guest, plain words: {}, ended {:.1} s",
        vm.stage_times(STAGES),
        o.elapsed.as_secs_f64()
    );
    assert!(o.stdout.contains("result rc=0"), "{}", o.show());
    assert_eq!(o.code, Some(0), "{}", o.show());
    let v = final_stats(&vm);
    if !kernel_mode_native() {
        // What KVM's emulator could not run went through wbvmm's fallback.
        let emulated = v["emulated"].as_object().map_or(0, |m| m.len());
        assert!(
            emulated > 0,
            "no fallbacks counted on an emulating host\n{v:#}"
        );
    }
}

/// Linux's drivers against wbvmm's model, one boot per revision: 8139cp binds 0x20 and
/// 8139too 0x10; each pings the host, runs netperf TCP_RR against the host's netserver,
/// then serves netserver to the host's netperf until the test says it is done.
#[test]
fn small_linux_drivers_ping_and_run_netperf_both_ways() {
    if !kvm_available("small_linux_drivers_ping_and_run_netperf_both_ways") {
        return;
    }
    let Some(mut ns) = NetNs::new("linuxsmall", 41) else {
        return;
    };
    // The host's netserver, bounded in time, killed by PID when the namespace goes.
    ns.spawn(&["timeout", "1800", "netserver", "-D", "-4", "-p", "12865"]);
    ns.wait_listen(12865);
    let (host, guest) = (ns.host_ip.clone(), ns.guest_ip.clone());
    for (rev, driver) in [("0x20", "8139cp"), ("0x10", "8139too")] {
        let cmdline = format!(
            "{} {} wbvmm.run=ping:{host},netperf:{host}:TCP_RR,netserver wbvmm.ip={guest}/24 \
             wbvmm.secs=5 wbvmm.end=reboot",
            words("cmdline"),
            words("cmdline-emulated")
        );
        let net = format!("tap={},rev={rev}", ns.tap);
        let mut vm = boot(
            &cmdline,
            &["--net", &net],
            Some(&ns),
            stats_file(&format!("small-{driver}")),
        );
        vm.wait_for("netserver listening", BOOT_DEADLINE);
        // The host's netperf against the guest's netserver.
        let host_netperf = Command::new("ip")
            .args(["netns", "exec", &ns.name, "timeout", "600"])
            .args(["netperf", "-H", &guest, "-t", "TCP_RR", "-l", "5"])
            .output()
            .expect("run netperf on the host side");
        let host_out = String::from_utf8_lossy(&host_netperf.stdout).into_owned();
        vm.send_line("done");
        let o = vm.finish(BOOT_DEADLINE);
        eprintln!(
            "small guest, rev {rev} ({driver}): {}, ended {:.1} s",
            vm.stage_times(STAGES),
            o.elapsed.as_secs_f64()
        );
        assert!(
            host_netperf.status.success(),
            "host netperf against the guest's netserver failed: {host_out}{}\n{}",
            String::from_utf8_lossy(&host_netperf.stderr),
            o.show()
        );
        let host_rate = netperf_rate(&host_out)
            .unwrap_or_else(|| panic!("no TCP_RR result from the host's netperf:\n{host_out}"));
        let guest_rate = netperf_rate(&o.stdout)
            .unwrap_or_else(|| panic!("no TCP_RR result from the guest's netperf\n{}", o.show()));
        eprintln!(
            "rev {rev}: netperf TCP_RR guest->host {guest_rate:.2} trans/s, host->guest {host_rate:.2} trans/s"
        );
        assert!(host_rate > 0.0 && guest_rate > 0.0, "{}", o.show());
        assert!(
            o.stdout
                .contains(&format!("10ec:8139 rev {rev} driver={driver}")),
            "rev {rev} must bind {driver}\n{}",
            o.show()
        );
        assert!(o.stdout.contains("3 packets received"), "{}", o.show());
        for step in [
            format!("ping:{host}"),
            format!("netperf:{host}:TCP_RR"),
            "netserver".to_string(),
        ] {
            assert!(
                o.stdout.contains(&format!("step {step} rc=0")),
                "step {step} did not succeed\n{}",
                o.show()
            );
        }
        assert!(o.stdout.contains("result rc=0"), "{}", o.show());
        assert_eq!(o.code, Some(0), "{}", o.show());
        // The NIC's interrupts went through IOAPIC pin 16 (irqfd with resample).
        let v = final_stats(&vm);
        let irqs = v["interrupts"]["nic"].as_u64().unwrap_or(0);
        assert!(irqs > 0, "no NIC interrupts counted\n{v:#}");
        eprintln!("rev {rev}: {irqs} NIC interrupts");
    }
}

/// `scripts/boot-demo.sh --linux`: `wbvmm.run=shell` with `wbvmm.ip` gives an interactive
/// shell on the serial console with eth0 already up. Commands typed on the console run
/// (line editing through the 8250's receive interrupts), reach the host through the tap,
/// and `reboot -f` ends the VM with status 0.
#[test]
fn small_linux_shell_on_the_console_with_eth0_up() {
    if !kvm_available("small_linux_shell_on_the_console_with_eth0_up") {
        return;
    }
    let Some(ns) = NetNs::new("linuxshell", 42) else {
        return;
    };
    let (host, guest) = (ns.host_ip.clone(), ns.guest_ip.clone());
    let cmdline = format!(
        "{} {} wbvmm.run=shell wbvmm.ip={guest}/24",
        words("cmdline"),
        words("cmdline-emulated")
    );
    let net = format!("tap={}", ns.tap);
    let mut vm = boot(
        &cmdline,
        &["--net", &net],
        Some(&ns),
        stats_file("small-shell"),
    );
    // The shell's banner; its prompt has no newline, and input typed now waits in the tty.
    vm.wait_for(
        "Enter 'help' for a list of built-in commands.",
        BOOT_DEADLINE,
    );
    // The shell computes 6*7 itself, so the echoed command line cannot match.
    vm.send_line(&format!(
        "ping -c 1 {host}; echo shell-says $((6*7)) ping-rc=$?"
    ));
    vm.wait_for("shell-says 42", BOOT_DEADLINE);
    vm.send_line("reboot -f");
    let o = vm.finish(BOOT_DEADLINE);
    eprintln!(
        "small guest shell: {}, prompt {:.1} s, ended {:.1} s",
        vm.stage_times(STAGES),
        vm.seen_at("Enter 'help'").map_or(0.0, |t| t.as_secs_f64()),
        o.elapsed.as_secs_f64()
    );
    assert!(
        o.stdout.contains(&format!("eth0 up: {guest}/24 carrier=1")),
        "{}",
        o.show()
    );
    assert!(o.stdout.contains("1 packets received"), "{}", o.show());
    assert!(o.stdout.contains("shell-says 42 ping-rc=0"), "{}", o.show());
    assert_eq!(o.code, Some(0), "{}", o.show());
}

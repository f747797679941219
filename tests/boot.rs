//! Boot the test guest under /dev/kvm and check what it prints and how it ends.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn testguest_prints_banner_and_exits_zero() {
    if !kvm_available("testguest_prints_banner_and_exits_zero") {
        return;
    }
    let o = boot_testguest("banner", &[], None);
    assert!(o.stdout.contains("testguest ready"), "{}", o.show());
    assert!(
        o.stdout.contains("cpl=3"),
        "the guest should do its work at CPL3\n{}",
        o.show()
    );
    assert_eq!(o.code, Some(0), "{}", o.show());
}

#[test]
fn debug_exit_codes_pass_through() {
    if !kvm_available("debug_exit_codes_pass_through") {
        return;
    }
    for code in [0, 7, 42, 200] {
        let o = boot_testguest(&format!("exit={code}"), &[], None);
        assert_eq!(o.code, Some(code), "{}", o.show());
    }
}

#[test]
fn serial_input_reaches_the_guest() {
    if !kvm_available("serial_input_reaches_the_guest") {
        return;
    }
    let o = boot_testguest("echo exit=3", &[], Some(b"hello from the host\n"));
    assert!(
        o.stdout.contains("echo: hello from the host"),
        "{}",
        o.show()
    );
    assert_eq!(o.code, Some(3), "{}", o.show());
}

#[test]
fn i8042_reset_ends_the_vm_with_status_zero() {
    if !kvm_available("i8042_reset_ends_the_vm_with_status_zero") {
        return;
    }
    // exit=9 would be taken if the reset were ignored.
    let o = boot_testguest("reset exit=9", &[], None);
    assert_eq!(o.code, Some(0), "{}", o.show());
    assert!(!o.stdout.contains("still running"), "{}", o.show());
}

#[test]
fn triple_fault_is_reported() {
    if !kvm_available("triple_fault_is_reported") {
        return;
    }
    let o = boot_testguest("triple-fault exit=9", &[], None);
    assert_eq!(o.code, Some(101), "{}", o.show());
    assert!(o.stderr.contains("triple fault"), "{}", o.show());
}

#[test]
fn smp_guests_see_their_cpus() {
    if !kvm_available("smp_guests_see_their_cpus") {
        return;
    }
    for n in [2, 4] {
        let ns = n.to_string();
        let o = boot_testguest("cpus", &["--cpus", &ns], None);
        assert!(o.stdout.contains(&format!("cpus: {n}")), "{}", o.show());
        assert_eq!(o.code, Some(0), "{}", o.show());
    }
}

#[test]
fn memory_check_passes_with_more_than_3g_of_ram() {
    if !kvm_available("memory_check_passes_with_more_than_3g_of_ram") {
        return;
    }
    // 3 GiB + 64 MiB: RAM is split around the MMIO hole (64 MiB go above 4 GiB), and
    // the guest checks every word of both parts. Writing 3 GiB takes a while on a
    // loaded machine, hence the long timeout.
    let o = boot_testguest_timeout(
        "memcheck",
        &["--memory", "3136M"],
        None,
        Duration::from_secs(240),
    );
    assert!(o.stdout.contains("in 2 ranges"), "{}", o.show());
    assert!(o.stdout.contains("memcheck: ok"), "{}", o.show());
    assert_eq!(o.code, Some(0), "{}", o.show());
}

#[test]
fn unmapped_mmio_reads_return_all_ones() {
    if !kvm_available("unmapped_mmio_reads_return_all_ones") {
        return;
    }
    let o = boot_testguest("mmio-loop=0xd0000000,100", &[], None);
    assert!(o.stdout.contains("last=0xffffffff"), "{}", o.show());
    assert_eq!(o.code, Some(0), "{}", o.show());
}

#[test]
fn probe_reports_a_verdict() {
    if !kvm_available("probe_reports_a_verdict") {
        return;
    }
    let o = wbvmm(&["probe", "--json"], None, Duration::from_secs(120));
    assert_eq!(o.code, Some(0), "{}", o.show());
    let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("probe JSON");
    let cpl0 = v["cpl0_loops_per_sec"].as_f64().unwrap();
    let cpl3 = v["cpl3_loops_per_sec"].as_f64().unwrap();
    assert!(cpl0 > 0.0 && cpl3 > 0.0);
    assert_eq!(
        v["kernel_mode_native"].as_bool().unwrap(),
        cpl3 / cpl0 < 4.0
    );
    assert!(v["mmio_exit_cpl3_us"].as_f64().unwrap() > 0.0);
    let human = wbvmm(&["probe"], None, Duration::from_secs(120));
    assert!(
        human.stdout.contains("verdict: guest kernel mode"),
        "{}",
        human.show()
    );
}

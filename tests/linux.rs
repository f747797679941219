//! The Debian Linux guest under wbvmm.

mod common;
use common::*;
use std::time::Duration;

const CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=1 acpi=off pci=conf1 i8042.noaux i8042.nomux i8042.dumbkbd";

/// Even where guest kernel mode is emulated (nested PVM hosts), the kernel gets far
/// enough to print its banner on the serial console.
#[test]
fn debian_vmlinux_prints_its_banner() {
    if !kvm_available("debian_vmlinux_prints_its_banner") {
        return;
    }
    let vmlinux = linux_image("vmlinux");
    let args = [
        "--kernel",
        vmlinux.to_str().unwrap(),
        "--memory",
        "512M",
        "--cmdline",
        CMDLINE,
    ];
    let (found, seen, t) = boot_until(&args, "Linux version 6.", Duration::from_secs(240));
    assert!(
        found,
        "no 'Linux version' banner after {t:?}; serial output:\n{seen}"
    );
    eprintln!("Debian vmlinux printed its banner after {t:?}");
}

/// Where guest kernel mode runs natively, the Debian bzImage boots to its /init.
#[test]
fn debian_bzimage_boots_to_init_where_kernel_mode_is_native() {
    if !kvm_available("debian_bzimage_boots_to_init_where_kernel_mode_is_native") {
        return;
    }
    let bz = linux_image("bzImage");
    let initrd = linux_image("initramfs.cpio.gz");
    if !kernel_mode_native() {
        eprintln!(
            "\n!!! SKIPPED debian_bzimage_boots_to_init: `wbvmm probe` says guest kernel mode is emulated on this host \
             (nested PVM KVM), so a full Linux boot would take hours. Run this test on a host with hardware virtualization. !!!\n"
        );
        return;
    }
    // Without ACPI a power-off cannot be seen by the VMM; the i8042 reset (reboot=k) can.
    let cmdline = format!("{CMDLINE} wbvmm.run=poweroff wbvmm.end=reboot");
    let args = [
        "--kernel",
        bz.to_str().unwrap(),
        "--initramfs",
        initrd.to_str().unwrap(),
        "--memory",
        "512M",
        "--cmdline",
        &cmdline,
    ];
    let (found, seen, t) = boot_until(
        &args,
        "wbvmm-linux-guest: init started",
        Duration::from_secs(120),
    );
    assert!(
        found,
        "/init did not start after {t:?}; serial output:\n{seen}"
    );
}

/// Where guest kernel mode runs natively, Linux's own drivers are the second oracle
/// for the RTL8139: 8139too binds revision 0x10, 8139cp revision 0x20, and each pings
/// the host through the tap.
#[test]
fn linux_drivers_ping_the_host_where_kernel_mode_is_native() {
    if !kvm_available("linux_drivers_ping_the_host_where_kernel_mode_is_native") {
        return;
    }
    let bz = linux_image("bzImage");
    let initrd = linux_image("initramfs.cpio.gz");
    if !kernel_mode_native() {
        eprintln!(
            "\n!!! SKIPPED linux_drivers_ping_the_host: `wbvmm probe` says guest kernel mode is emulated on this host \
             (nested PVM KVM); Linux's 8139too/8139cp cannot be run in useful time. The test guest's own driver and \
             QEMU's model (scripts/oracle-qemu.sh) check the NIC here instead. !!!\n"
        );
        return;
    }
    let Some(ns) = NetNs::new("linuxnet", 30) else {
        return;
    };
    for (rev, driver) in [("0x10", "8139too"), ("0x20", "8139cp")] {
        let cmdline = format!(
            "{CMDLINE} wbvmm.run=ping:{} wbvmm.ip={}/24 wbvmm.end=reboot",
            ns.host_ip, ns.guest_ip
        );
        let net = format!("tap={},rev={rev}", ns.tap);
        let o = ns.wbvmm(
            &[
                "--kernel",
                bz.to_str().unwrap(),
                "--initramfs",
                initrd.to_str().unwrap(),
                "--memory",
                "512M",
                "--net",
                &net,
                "--cmdline",
                &cmdline,
            ],
            Duration::from_secs(180),
        );
        assert!(
            o.stdout.contains(&format!("driver={driver}")),
            "rev {rev}\n{}",
            o.show()
        );
        assert!(
            o.stdout.contains("result rc=0"),
            "rev {rev}: ping failed\n{}",
            o.show()
        );
        assert_eq!(o.code, Some(0), "{}", o.show());
    }
}

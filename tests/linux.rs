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

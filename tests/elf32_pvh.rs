//! A 32-bit PVH kernel (guest-images/elf32-pvh, built here with `gcc -m32`) boots
//! under wbvmm and, as the reference, under QEMU; the same kernel without its PVH
//! note is refused with a message saying what is missing.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const HELLO: &str = "elf32-pvh: hello from a 32-bit PVH kernel";
/// What the guest writes to the debug-exit port when EBX points to the start info.
const GUEST_OK: i32 = 42;

/// A temporary directory for one test's build, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        let p = std::env::temp_dir().join(format!("wbvmm-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Build guest-images/elf32-pvh into `dir` as `name`, with the PVH note or without.
fn build_guest(dir: &Path, name: &str, pvh_note: bool) -> PathBuf {
    let src = repo_root().join("guest-images/elf32-pvh");
    let out = dir.join(name);
    let mut cmd = Command::new("gcc");
    cmd.args([
        "-m32",
        "-ffreestanding",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-fno-pic",
        "-Wl,--build-id=none",
    ])
    .arg(format!("-Wl,-T,{}", src.join("link.ld").display()));
    if !pvh_note {
        cmd.arg("-DNO_PVH_NOTE");
    }
    cmd.arg(src.join("guest.S")).arg("-o").arg(&out);
    let o = match cmd.output() {
        Ok(o) => o,
        Err(e) => panic!(
            "cannot run gcc ({e}): install Debian's build-essential (scripts/setup.sh does) to build the 32-bit test kernel"
        ),
    };
    assert!(
        o.status.success(),
        "gcc -m32 failed to build {} ({}):\n{}\ninstall Debian's build-essential (scripts/setup.sh does); gcc must accept -m32",
        out.display(),
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn elf32_pvh_kernel_boots_under_wbvmm() {
    if !kvm_available("elf32_pvh_kernel_boots_under_wbvmm") {
        return;
    }
    let dir = TempDir::new("elf32-pvh-wbvmm");
    let elf = build_guest(&dir.0, "guest.elf", true);
    let o = wbvmm(
        &[
            "--kernel",
            path_str(&elf),
            "--memory",
            "64M",
            "--serial",
            "stdio",
        ],
        None,
        Duration::from_secs(60),
    );
    assert!(o.stdout.contains(HELLO), "{}", o.show());
    assert!(
        !o.stdout.contains("bad magic"),
        "EBX did not point to the hvm_start_info\n{}",
        o.show()
    );
    assert_eq!(o.code, Some(GUEST_OK), "{}", o.show());
}

#[test]
fn elf32_without_pvh_note_is_refused() {
    if !kvm_available("elf32_without_pvh_note_is_refused") {
        return;
    }
    let dir = TempDir::new("elf32-nonote");
    let elf = build_guest(&dir.0, "guest-nonote.elf", false);
    let o = wbvmm(
        &[
            "--kernel",
            path_str(&elf),
            "--memory",
            "64M",
            "--serial",
            "stdio",
        ],
        None,
        Duration::from_secs(60),
    );
    assert_eq!(o.code, Some(1), "{}", o.show());
    for part in [
        "is a 32-bit ELF without a PVH entry note",
        "XEN_ELFNOTE_PHYS32_ENTRY, type 18, owner \"Xen\"",
        "boots 32-bit kernels only through PVH",
    ] {
        assert!(o.stderr.contains(part), "missing {part:?}\n{}", o.show());
    }
    assert!(!o.stderr.contains("--memory"), "{}", o.show());
    assert!(!o.stdout.contains(HELLO), "{}", o.show());
}

#[test]
fn elf32_pvh_kernel_boots_under_qemu() {
    if !kvm_available("elf32_pvh_kernel_boots_under_qemu") {
        return;
    }
    if let Err(e) = Command::new("qemu-system-x86_64").arg("--version").output() {
        panic!("cannot run qemu-system-x86_64 ({e}): install Debian's qemu-system-x86 (scripts/setup.sh does)");
    }
    let dir = TempDir::new("elf32-pvh-qemu");
    let elf = build_guest(&dir.0, "guest.elf", true);
    // The same devices wbvmm has where it matters: COM1 on stdout, the debug-exit port
    // at 0xf4 (QEMU exits with (value << 1) | 1).
    let o = run_with_timeout(
        Command::new("qemu-system-x86_64").args([
            "-enable-kvm",
            "-cpu",
            "qemu64,-cx16",
            "-machine",
            "pc",
            "-m",
            "64",
            "-no-reboot",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-kernel",
            path_str(&elf),
        ]),
        None,
        // Only the failure path: QEMU ends by itself through the debug-exit port.
        Duration::from_secs(120),
    );
    assert!(o.stdout.contains(HELLO), "{}", o.show());
    assert_eq!(o.code, Some((GUEST_OK << 1) | 1), "{}", o.show());
}

//! Guest DMA under concurrency: the test guest keeps the NIC transmitting from a
//! buffer (`dmatx`) in a memslot the host adds and then removes under it.
//!
//! How wbvmm keeps this safe (src/memory/registry.rs, src/memory/dma.rs): every DMA
//! (`GuestRamDma::read`/`write`) loads the current `MemSnapshot` through `arc_swap` and
//! holds it for the whole copy; a snapshot holds an `Arc<HostMapping>` of each
//! registry-owned slot it contains, and `HostMapping` unmaps on drop. Removing a slot
//! deletes it from KVM, publishes a snapshot without it and drops the registry's
//! reference; the memory is unmapped when the last snapshot that contains it goes (a DMA
//! in flight on the old snapshot finishes on still-mapped memory; the registry's spare
//! snapshot lets go at its next update). A DMA that starts after the removal finds no slot
//! and fails (`DmaError::OutOfRange`): the chip reports a TX underrun (TSD.TUN) and the
//! VM carries on.
//!
//! What the test checks, each of which fails if the mechanism breaks:
//! - before the slot exists, the guest's transmits fail (the device sees an error);
//! - with the slot, they succeed, and the frames that reach the tap carry the bytes the
//!   host wrote into the slot (the DMA really reads that memory);
//! - a snapshot taken before the removal keeps the slot's host memory mapped and
//!   readable after it (the in-flight-DMA guarantee; checked in /proc/self/maps);
//! - once that snapshot is dropped, the memory is really unmapped (gone from
//!   /proc/self/maps) while the guest keeps the NIC transmitting from it for thousands
//!   more attempts, on the vCPU thread (`tx=exit`) or the I/O thread (`tx=ioeventfd`):
//!   a DMA through a stale host pointer would fault and kill this test process;
//! - the guest's transmits fail after the removal, and the VM ends normally.

mod common;
use common::*;
use std::os::fd::AsRawFd;

use wbvmm::config::{CpuFeatureEdits, SerialMode};
use wbvmm::memory::SlotFlags;
use wbvmm::net::NetConfig;
use wbvmm::vcpu::VmOutcome;
use wbvmm::vmm::{VmConfig, Vmm};

/// The DMA buffer's slot: 1 GiB, outside the guest's 256 MiB of RAM.
const DMA_GPA: u64 = 0x4000_0000;
const SLOT_SIZE: u64 = 2 << 20;
/// Where in the slot the guest transmits from (not at its start, to catch offsets).
const BUF_OFFSET: u64 = 0x1_2340;
const FRAME_LEN: usize = 1000;
/// Guest RAM word the host sets to stop the guest; the guest counts attempts at +8.
const MAILBOX: u64 = 0x0800_0000;
/// Attempts the guest must make after the memory is unmapped.
const ATTEMPTS_AFTER_UNMAP: u64 = 2000;

fn pattern() -> Vec<u8> {
    // A unicast destination (bit 0 of byte 0 clear) and bytes that differ per offset.
    (0..FRAME_LEN)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(0x42) & if i == 0 { 0xfe } else { 0xff })
        .collect()
}

/// Is any byte of [start, start + len) mapped in this process?
fn mapped(start: u64, len: u64) -> bool {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    maps.lines().any(|l| {
        let Some((range, _)) = l.split_once(' ') else {
            return false;
        };
        let Some((a, b)) = range.split_once('-') else {
            return false;
        };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            return false;
        };
        a < start + len && start < b
    })
}

/// An AF_PACKET socket on the tap (inside the namespace this thread is in): sees every
/// frame wbvmm writes into the tap.
struct Capture(std::os::fd::OwnedFd);

impl Capture {
    fn new(ifname: &str) -> Self {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                proto as i32,
            )
        };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let name = std::ffi::CString::new(ifname).expect("interface name");
        // SAFETY: a NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(index != 0, "no interface {ifname} in this namespace");
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto;
        sa.sll_ifindex = index as i32;
        // SAFETY: `sa` is a valid sockaddr_ll of the size given.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            r,
            0,
            "bind to {ifname}: {}",
            std::io::Error::last_os_error()
        );
        Capture(fd)
    }

    /// Frames queued now that equal `want` (others are read and ignored).
    fn count_matching(&self, want: &[u8]) -> usize {
        let mut buf = vec![0u8; 2048];
        let mut n = 0;
        loop {
            // SAFETY: `buf` is writable for its length.
            let r = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if r < 0 {
                return n;
            }
            n += usize::from(&buf[..r as usize] == want);
        }
    }
}

/// Move this test's thread into the namespace, so the VMM it builds opens the tap
/// there (threads it starts inherit the namespace).
fn enter(ns: &NetNs) {
    let f = std::fs::File::open(format!("/var/run/netns/{}", ns.name)).expect("netns file");
    // SAFETY: setns on a namespace fd; affects only the calling thread.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
}

fn guest_word(reg: &wbvmm::memory::SlotRegistry, gpa: u64) -> *mut u64 {
    let snap = reg.load();
    let slot = snap.lookup(gpa).expect("mailbox is guest RAM");
    slot.host_addr_of(gpa) as *mut u64
}

fn wait_serial(path: &std::path::Path, needle: &str, count: usize) -> String {
    let mut s = String::new();
    let ok = wait_until(STARTUP_DEADLINE, || {
        s = std::fs::read_to_string(path).unwrap_or_default();
        s.matches(needle).count() >= count
    });
    assert!(ok, "waited for {count}x '{needle}'; serial so far:\n{s}");
    s
}

fn run(tx: &str, net_id: u8) {
    let Some(ns) = NetNs::new(&format!("dma-{tx}"), net_id) else {
        return;
    };
    enter(&ns);
    let capture = Capture::new(&ns.tap);
    let serial = std::env::temp_dir().join(format!("wbvmm-dma-{}-{tx}", std::process::id()));
    let _ = std::fs::remove_file(&serial);
    let net: NetConfig = format!("tap={},tx={tx}", ns.tap).parse().expect("net spec");
    let cfg = VmConfig {
        kernel: testguest(),
        initramfs: None,
        cmdline: format!(
            "nic=c dmatx={:#x},{FRAME_LEN},{MAILBOX:#x}",
            DMA_GPA + BUF_OFFSET
        ),
        mem_size: 256 << 20,
        cpus: 1,
        serial: SerialMode::File(serial.clone()),
        cpu_features: CpuFeatureEdits::default(),
        mem_slots: None,
        slot_index: Default::default(),
        mmio_cache: true,
        net: Some(net),
        cpu_affinity: Default::default(),
        io_affinity: None,
        gdb: None,
    };
    let running = Vmm::new(&cfg).expect("build VM").start().expect("start VM");
    let reg = running.vmm.memory.clone();

    // No slot yet: the device cannot read the buffer and says so.
    wait_serial(&serial, "dmatx: failing from attempt 0", 1);

    let id = reg
        .add_ram(DMA_GPA, SLOT_SIZE, SlotFlags::NONE)
        .expect("add the DMA slot under the running guest");
    let slot = reg.slot(id).expect("the slot just added");
    let want = pattern();
    // SAFETY: the registry owns this mapping and keeps it while the slot exists; the
    // copy stays inside it (BUF_OFFSET + FRAME_LEN < SLOT_SIZE).
    unsafe {
        std::ptr::copy_nonoverlapping(
            want.as_ptr(),
            (slot.host_addr + BUF_OFFSET) as *mut u8,
            FRAME_LEN,
        );
    }
    wait_serial(&serial, "dmatx: sent from attempt", 1);
    let mut seen = 0;
    assert!(
        wait_until(STARTUP_DEADLINE, || {
            seen += capture.count_matching(&want);
            seen >= 3
        }),
        "the slot's bytes never reached the tap ({seen} frames)"
    );
    assert!(
        mapped(slot.host_addr, SLOT_SIZE),
        "the slot's memory is mapped"
    );

    // A reader that still holds a snapshot (as a DMA in flight does) keeps the memory.
    let held = reg.snapshot();
    reg.remove(id)
        .expect("remove the DMA slot under the transmitting guest");
    // One more update, so the registry's spare snapshot lets go of the removed slot.
    let dummy = reg
        .add_ram(DMA_GPA + (1 << 30), 1 << 21, SlotFlags::NONE)
        .expect("a second slot");
    reg.remove(dummy).expect("remove the second slot");
    assert!(reg.load().lookup(DMA_GPA).is_none());
    let old = held
        .lookup(DMA_GPA)
        .expect("the held snapshot still has the slot");
    assert!(
        mapped(slot.host_addr, SLOT_SIZE),
        "a held snapshot keeps the memory"
    );
    // SAFETY: mapped while `held` lives (the property under test).
    let byte = unsafe { std::ptr::read_volatile((old.host_addr + BUF_OFFSET + 5) as *const u8) };
    assert_eq!(byte, want[5]);
    drop(held);
    assert!(
        wait_until(STARTUP_DEADLINE, || !mapped(slot.host_addr, SLOT_SIZE)),
        "the removed slot's memory stayed mapped after its last snapshot went"
    );

    // The guest keeps the NIC transmitting from the now unmapped buffer.
    let progress = guest_word(&reg, MAILBOX + 8);
    // SAFETY: guest RAM, 8-aligned, mapped for the VM's life; the guest writes it.
    let at_unmap = unsafe { std::ptr::read_volatile(progress) };
    assert!(
        wait_until(STARTUP_DEADLINE, || {
            // SAFETY: as above.
            let now = unsafe { std::ptr::read_volatile(progress) };
            now >= at_unmap + ATTEMPTS_AFTER_UNMAP
        }),
        "the guest stopped transmitting after the slot went"
    );
    let out = wait_serial(&serial, "dmatx: failing from attempt", 2);
    // Failing (no slot), sent (slot), failing (removed): never sent again.
    assert_eq!(out.matches("dmatx: sent from attempt").count(), 1, "{out}");
    // SAFETY: guest RAM word the guest polls.
    unsafe { std::ptr::write_volatile(guest_word(&reg, MAILBOX), 1) };
    let report = running.wait();
    let out = std::fs::read_to_string(&serial).unwrap_or(out);
    assert_eq!(
        report.outcome,
        Some(VmOutcome::DebugExit(0)),
        "serial:\n{out}"
    );
    let last = out
        .lines()
        .find(|l| l.starts_with("dmatx: stopped after"))
        .unwrap_or_else(|| panic!("no summary line:\n{out}"));
    let field = |k: &str| -> u64 {
        last.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in '{last}'"))
    };
    assert!(field("sent=") >= 3, "{last}");
    assert!(field("failed=") >= ATTEMPTS_AFTER_UNMAP, "{last}");
    let net = report.net.expect("net stats");
    assert!(net.tx_packets >= 3, "{net:?}");
    eprintln!("tx={tx}: {last}; tap frames with the slot's bytes: {seen}+");
    let _ = std::fs::remove_file(&serial);
}

#[test]
fn nic_dma_from_a_slot_removed_under_it() {
    if !kvm_available("nic_dma_from_a_slot_removed_under_it") {
        return;
    }
    // TX on the vCPU thread (the doorbell exits), then on the I/O thread (ioeventfd).
    run("exit", 63);
    run("ioeventfd", 64);
}

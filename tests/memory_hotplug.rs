//! Memslots change under a running guest: the test guest polls a guest-physical
//! address while the host adds a slot there (the guest sees its contents) and removes
//! it again (the guest's next read exits, is routed as unmapped, and reads all-ones).

mod common;
use common::*;
use std::time::{Duration, Instant};

use wbvmm::config::{CpuFeatureEdits, SerialMode};
use wbvmm::memory::{SlotFlags, SlotIndexKind};
use wbvmm::vcpu::VmOutcome;
use wbvmm::vmm::{VmConfig, Vmm};

const WATCH_GPA: u64 = 0x4000_0000; // 1 GiB: outside the guest's 256 MiB of RAM
const PATTERN: u64 = 0x5a5a_1234_c0de_f00d;
const SLOT_SIZE: usize = 2 << 20;

fn wait_for(path: &std::path::Path, needle: &str, count: usize, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let s = std::fs::read_to_string(path).unwrap_or_default();
        if s.matches(needle).count() >= count {
            return s;
        }
        assert!(
            start.elapsed() < timeout,
            "waited {timeout:?} for {count}x '{needle}'; serial so far:\n{s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run(index: SlotIndexKind, mmio_cache: bool) {
    let serial = std::env::temp_dir().join(format!(
        "wbvmm-hotplug-{}-{index:?}-{mmio_cache}",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&serial);
    let cfg = VmConfig {
        kernel: testguest(),
        initramfs: None,
        cmdline: format!("watch={WATCH_GPA:#x},3"),
        mem_size: 256 << 20,
        cpus: 1,
        serial: SerialMode::File(serial.clone()),
        cpu_features: CpuFeatureEdits::default(),
        mem_slots: Some(8),
        slot_index: index,
        mmio_cache,
        net: None,
        cpu_affinity: Default::default(),
        io_affinity: None,
        gdb: None,
    };
    // Under wbvmm's filters (as `wbvmm` runs): the slot changes below are made by this
    // thread, the VM's main thread, under the main thread's filter.
    wbvmm::seccomp::configure(wbvmm::seccomp::SeccompMode::Kill).expect("seccomp filters");
    let running = Vmm::new(&cfg).expect("build VM").start().expect("start VM");
    let ones = format!("watch: {WATCH_GPA:#x} = 0xffffffffffffffff");
    wait_for(&serial, &ones, 1, Duration::from_secs(30));

    // Host memory filled with the pattern, then made guest RAM at WATCH_GPA.
    // SAFETY: a fresh anonymous mapping; it is never unmapped (the registry may keep
    // referring to it until the process ends).
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SLOT_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_ANONYMOUS | libc::MAP_PRIVATE,
            -1,
            0,
        )
    };
    assert_ne!(host, libc::MAP_FAILED);
    // SAFETY: writes inside the mapping just made.
    unsafe {
        let words = std::slice::from_raw_parts_mut(host.cast::<u64>(), SLOT_SIZE / 8);
        words.fill(PATTERN);
    }
    let gen_before = running.vmm.memory.generation();
    // SAFETY: see above: the mapping outlives the registry.
    let id = unsafe {
        running
            .vmm
            .memory
            .add_mapped(WATCH_GPA, host as u64, SLOT_SIZE as u64, SlotFlags::NONE)
    }
    .expect("add a slot under the running guest");
    assert!(running.vmm.memory.generation() > gen_before);
    wait_for(
        &serial,
        &format!("watch: {WATCH_GPA:#x} = {PATTERN:#x}"),
        1,
        Duration::from_secs(30),
    );

    running.vmm.memory.remove(id).expect("remove the slot");
    let out = wait_for(&serial, &ones, 2, Duration::from_secs(30));
    let report = running.wait();
    assert_eq!(
        report.outcome,
        Some(VmOutcome::DebugExit(0)),
        "serial:\n{out}"
    );
    // After the removal the guest's reads exit to wbvmm and are routed as unmapped.
    assert!(report.memory.mmio.unmapped_reads > 0, "{:?}", report.memory);
    let _ = std::fs::remove_file(&serial);
}

#[test]
fn slot_added_and_removed_under_a_polling_guest() {
    if !kvm_available("slot_added_and_removed_under_a_polling_guest") {
        return;
    }
    for (index, mmio_cache) in [
        (SlotIndexKind::Wbtree, true),
        (SlotIndexKind::Linear, false),
    ] {
        // A thread per VM: the thread that ran one keeps its main-thread filter, which
        // (rightly) does not let it open /dev/kvm for the next.
        std::thread::spawn(move || run(index, mmio_cache))
            .join()
            .expect("the VM's thread panicked (message above)");
    }
}

#[test]
fn many_slots_boot_and_pass_the_memory_check() {
    if !kvm_available("many_slots_boot_and_pass_the_memory_check") {
        return;
    }
    for slots in ["509", "4096"] {
        let o = boot_testguest(
            "memcheck mmio-loop=0xd0000000,50",
            &["--mem-slots", slots, "--stats"],
            None,
        );
        assert!(o.stdout.contains("memcheck: ok"), "{}", o.show());
        assert_eq!(o.code, Some(0), "{}", o.show());
        // The stats JSON goes to stderr with a bare --stats.
        let json = &o.stderr[o.stderr.find('{').expect("stats JSON")..];
        let v: serde_json::Value = serde_json::from_str(json).expect("stats JSON");
        assert_eq!(
            v["memory"]["slots"].as_u64(),
            Some(slots.parse().unwrap()),
            "{}",
            o.show()
        );
        assert_eq!(v["memory"]["mmio"]["unmapped_reads"].as_u64(), Some(50));
        assert!(v["memory"]["miss_cache"]["hits"].as_u64().unwrap() >= 49);
    }
}

#[test]
fn mmio_cache_and_slot_index_flags_take_effect() {
    if !kvm_available("mmio_cache_and_slot_index_flags_take_effect") {
        return;
    }
    for (cache, index) in [("on", "linear"), ("off", "size-sorted")] {
        let o = boot_testguest(
            "mmio-loop=0xd0000000,40",
            &[
                "--mmio-cache",
                cache,
                "--slot-index",
                index,
                "--mem-slots",
                "16",
                "--stats",
            ],
            None,
        );
        assert_eq!(o.code, Some(0), "{}", o.show());
        let json = &o.stderr[o.stderr.find('{').expect("stats JSON")..];
        let v: serde_json::Value = serde_json::from_str(json).expect("stats JSON");
        let mc = &v["memory"]["miss_cache"];
        assert_eq!(mc["enabled"].as_bool(), Some(cache == "on"), "{}", o.show());
        assert_eq!(v["memory"]["slot_index"].as_str(), Some(index));
        let exit_lookups = v["memory"]["lookups"]["exit"]["lookups"].as_u64().unwrap();
        if cache == "on" {
            assert!(
                mc["hits"].as_u64().unwrap() >= 39 && exit_lookups <= 1,
                "{}",
                o.show()
            );
        } else {
            // Every exit walks the mirror: 16 slots, linear scan of a size-sorted list.
            assert_eq!(exit_lookups, 40, "{}", o.show());
            assert!(
                v["memory"]["lookups"]["exit"]["mean_nodes"]
                    .as_f64()
                    .unwrap()
                    >= 1.0
            );
        }
    }
}

#[test]
fn bad_memory_flags_are_clean_errors() {
    let o = wbvmm(
        &["--kernel", "x", "--mem-slots", "0"],
        None,
        Duration::from_secs(10),
    );
    assert_eq!(o.code, Some(2), "{}", o.show());
    let o = wbvmm(
        &["--kernel", "x", "--slot-index", "splay"],
        None,
        Duration::from_secs(10),
    );
    assert_eq!(o.code, Some(2), "{}", o.show());
    assert!(
        o.stderr.contains("wbtree"),
        "the error lists the indexes\n{}",
        o.show()
    );
    let o = wbvmm(
        &["--kernel", "x", "--mmio-cache", "maybe"],
        None,
        Duration::from_secs(10),
    );
    assert_eq!(o.code, Some(2), "{}", o.show());
    if !kvm_available("bad_memory_flags_are_clean_errors") {
        return;
    }
    let tg = testguest();
    let o = wbvmm(
        &["--kernel", tg.to_str().unwrap(), "--mem-slots", "100000"],
        None,
        Duration::from_secs(60),
    );
    assert_eq!(o.code, Some(1), "{}", o.show());
    assert!(
        o.stderr.contains("--mem-slots") || o.stderr.contains("slots"),
        "{}",
        o.show()
    );
}

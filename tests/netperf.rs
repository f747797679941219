//! The host's unmodified netperf (Debian's netperf 2.7) measuring the test guest's
//! `net=netserver` responder through a tap, on wbvmm's RTL8139 and, as the oracle,
//! on QEMU's rtl8139: the same ELF, the same netperf. Inside network namespaces
//! these tests create (169.254.x.y only); every run is bounded by netperf's own
//! length (a transaction count where the test checks an exact amount of work).

mod common;
use common::*;
use std::collections::HashMap;
use std::process::Command;

/// What netperf prints with `-P 0 -- -k KEYS`, and what every test reads.
const KEYS: &str =
    "THROUGHPUT,THROUGHPUT_UNITS,ELAPSED_TIME,LOCAL_BYTES_SENT,LOCAL_BYTES_RECVD,LOCAL_SEND_CALLS";

/// Debian's qemu-system-data: QEMU's minimal firmware.
const QBOOT: &str = "/usr/share/qemu/qboot.rom";

/// Transactions of the counted TCP_RR run (`-l -N`: netperf stops after N).
const COUNTED: u64 = 500;

/// The bulk stream's length: a few seconds at the guest's slowest observed rate.
const STREAM_BYTES: u64 = 512 * 1024;

fn need_netperf() {
    if let Err(e) = Command::new("netperf").arg("-V").output() {
        panic!("cannot run netperf ({e}): install Debian's netperf (scripts/setup.sh does)");
    }
}

/// Runs the host's netperf against the guest, inside the namespace. `test_args`
/// go before `--`, `opts` after it. Returns the status and its KEY=VALUE lines.
fn netperf(
    ns: &NetNs,
    test_args: &[&str],
    opts: &[&str],
) -> (Option<i32>, HashMap<String, String>, String) {
    let mut args = vec![
        "netns",
        "exec",
        &ns.name,
        "netperf",
        "-H",
        &ns.guest_ip,
        "-P",
        "0",
    ];
    args.extend_from_slice(test_args);
    args.push("--");
    args.extend_from_slice(opts);
    args.extend_from_slice(&["-k", KEYS]);
    // Only the failure path waits this long: netperf ends after its own length.
    let o = run_with_timeout(Command::new("ip").args(&args), None, STARTUP_DEADLINE);
    let kv = o
        .stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    (
        o.code,
        kv,
        format!("netperf {}\n{}", args[3..].join(" "), o.show()),
    )
}

fn num(kv: &HashMap<String, String>, key: &str, ctx: &str) -> f64 {
    kv.get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("netperf printed no {key}\n{ctx}"))
}

/// The guest's count from its `netserver: TCP_RR N transactions ...` or
/// `netserver: TCP_STREAM N bytes ...` line number `nth` (0-based).
fn guest_count(stdout: &str, test: &str, nth: usize) -> u64 {
    let prefix = format!("netserver: {test} ");
    let line = stdout
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(" in "))
        .nth(nth)
        .unwrap_or_else(|| panic!("no result line {nth} for {test}\n{stdout}"));
    line[prefix.len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bad result line {line:?}"))
}

/// Three netperf runs against a guest serving `tests=3`: a timed TCP_RR with
/// 1-byte messages (what the benchmarks run), a counted TCP_RR whose response
/// spans three frames, and a timed TCP_STREAM. Checks netperf's own figures
/// against the guest's counts; returns the guest's output once it has ended.
fn three_runs(ns: &NetNs, vm: &mut Running, who: &str) {
    vm.wait_for("netserver: listening on", STARTUP_DEADLINE);

    // Timed, 1 byte each way. netperf counts a transaction when its response has
    // arrived; the guest when it has queued it, so the guest may count the one
    // whose response was in flight when netperf's timer fired, never fewer.
    let (code, kv, ctx) = netperf(ns, &["-t", "TCP_RR", "-l", "1"], &["-r", "1,1"]);
    assert_eq!(code, Some(0), "{who}\n{ctx}");
    assert_eq!(
        kv.get("THROUGHPUT_UNITS").map(String::as_str),
        Some("Trans/s"),
        "{ctx}"
    );
    let rate = num(&kv, "THROUGHPUT", &ctx);
    assert!(rate > 0.0, "{who}: {rate} trans/s\n{ctx}");
    let theirs = num(&kv, "LOCAL_BYTES_RECVD", &ctx) as u64;
    // The last request may have gone out unanswered when the timer fired.
    let sends = num(&kv, "LOCAL_SEND_CALLS", &ctx) as u64;
    assert!(sends == theirs || sends == theirs + 1, "{ctx}");
    vm.wait_for("(test 1)", STARTUP_DEADLINE);
    let ours = guest_count(vm.stdout(), "TCP_RR", 0);
    assert!(
        theirs > 0 && ours >= theirs && ours <= theirs + 1,
        "{who}: netperf counted {theirs} transactions, the guest {ours}\n{ctx}\n{}",
        vm.stdout()
    );

    // Counted: exactly COUNTED transactions of 200-byte requests and 3000-byte
    // responses, whatever the machine's speed; both sides agree to the byte.
    let counted = format!("-{COUNTED}");
    let (code, kv, ctx) = netperf(ns, &["-t", "TCP_RR", "-l", &counted], &["-r", "200,3000"]);
    assert_eq!(code, Some(0), "{who}\n{ctx}");
    assert!(num(&kv, "THROUGHPUT", &ctx) > 0.0, "{ctx}");
    assert_eq!(
        num(&kv, "LOCAL_BYTES_SENT", &ctx) as u64,
        COUNTED * 200,
        "{ctx}"
    );
    assert_eq!(
        num(&kv, "LOCAL_BYTES_RECVD", &ctx) as u64,
        COUNTED * 3000,
        "{ctx}"
    );
    vm.wait_for("(test 2)", STARTUP_DEADLINE);
    assert_eq!(
        guest_count(vm.stdout(), "TCP_RR", 1),
        COUNTED,
        "{who}\n{}",
        vm.stdout()
    );

    // A bulk stream into the guest, counted in bytes (`-l -N`), not timed: a timed
    // stream ends at netserver's padded timer (length + 4 s) from the guest's side,
    // and on a slow or loaded host the data still in flight then costs netperf its
    // results ("shutdown_control: no response received"). netperf counts what it
    // sent, the guest every byte that arrived.
    let (code, kv, ctx) = netperf(
        ns,
        &["-t", "TCP_STREAM", "-l", &format!("-{STREAM_BYTES}")],
        &[],
    );
    assert_eq!(code, Some(0), "{who}\n{ctx}");
    assert!(num(&kv, "THROUGHPUT", &ctx) > 0.0, "{ctx}");
    let sent = num(&kv, "LOCAL_BYTES_SENT", &ctx) as u64;
    vm.wait_for("netserver: served 3 test(s), 0 failed", STARTUP_DEADLINE);
    let got = guest_count(vm.stdout(), "TCP_STREAM", 0);
    assert!(
        sent >= STREAM_BYTES && got == sent,
        "{who}: netperf sent {sent} bytes, the guest received {got}\n{ctx}\n{}",
        vm.stdout()
    );
}

/// The test guest on QEMU's rtl8139 in `ns`, console on stdout.
fn qemu_guest(ns: &NetNs, cmdline: &str) -> Running {
    let tg = testguest();
    let netdev = format!("tap,id=n0,ifname={},script=no,downscript=no", ns.tap);
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, "qemu-system-x86_64"]);
    // qboot, where Debian ships it: SeaBIOS runs at CPL0, which a nested PVM
    // host emulates (~20 s to the guest); qboot takes under a second. The
    // NIC is QEMU's rtl8139 either way, and the guest assigns what BARs the
    // firmware left.
    if std::path::Path::new(QBOOT).exists() {
        cmd.args(["-bios", QBOOT]);
    }
    cmd.args([
        "-enable-kvm",
        "-cpu",
        "qemu64,-cx16",
        "-machine",
        "pc",
        "-m",
        "256M",
        "-no-reboot",
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-netdev",
        &netdev,
        "-device",
        "rtl8139,netdev=n0",
        "-kernel",
        tg.to_str().unwrap(),
        "-append",
        cmdline,
    ]);
    Running::spawn(cmd, None)
}

#[test]
fn host_netperf_measures_the_guest_on_wbvmm_in_both_modes() {
    if !kvm_available("host_netperf_measures_the_guest_on_wbvmm_in_both_modes") {
        return;
    }
    need_netperf();
    let Some(ns) = NetNs::new("netperf", 41) else {
        return;
    };
    let tg = testguest();
    for (rev, mode) in [("0x20", "cplus"), ("0x10", "c")] {
        let cmdline = format!("ip={}/24 net=netserver tests=3", ns.guest_ip);
        let net = format!("tap={},rev={rev}", ns.tap);
        let stats = stats_file(&format!("netperf-{mode}"));
        let stats_arg = format!("--stats={}", stats.display());
        let cmd = ns.wbvmm_command(&[
            "--kernel",
            tg.to_str().unwrap(),
            "--net",
            &net,
            "--cmdline",
            &cmdline,
            &stats_arg,
        ]);
        let mut vm = Running::spawn(cmd, Some(stats.clone()));
        let who = format!("wbvmm rev {rev}");
        three_runs(&ns, &mut vm, &who);
        let o = vm.finish(STARTUP_DEADLINE);
        assert_eq!(o.code, Some(0), "{who}\n{}", o.show());
        assert!(
            o.stdout.contains(&format!("mode={mode} io=pio")),
            "{}",
            o.show()
        );
        // Every counted transaction crossed the tap: one request frame in, three
        // response frames out.
        let v = take_final_stats(&stats, &o);
        assert!(
            v["net"]["tx_packets"].as_u64().unwrap_or(0) >= 3 * COUNTED,
            "{v:#}"
        );
        assert!(
            v["net"]["rx_packets"].as_u64().unwrap_or(0) >= COUNTED,
            "{v:#}"
        );
        // C mode: the TSD writes' lengths vary (the counted run's replies are two full
        // segments and a short one, beside ACKs) yet repeat, so the learnt doorbells
        // take nearly all of them: fewer port writes exit than there are counted
        // transactions (with one length learnt per TSD, ~3.5 exited per transaction).
        if mode == "c" {
            let tx = v["net"]["tx_packets"].as_u64().unwrap_or(0);
            let out = v["exits"]["io_out"].as_u64().unwrap_or(u64::MAX);
            assert!(
                out < COUNTED,
                "{who}: {out} port writes exited for {tx} frames sent\n{v:#}"
            );
        }
    }
}

#[test]
fn host_netperf_measures_the_same_guest_on_qemu_rtl8139() {
    if !kvm_available("host_netperf_measures_the_same_guest_on_qemu_rtl8139") {
        return;
    }
    need_netperf();
    if let Err(e) = Command::new("qemu-system-x86_64").arg("--version").output() {
        panic!("cannot run qemu-system-x86_64 ({e}): install Debian's qemu-system-x86 (scripts/setup.sh does)");
    }
    let Some(ns) = NetNs::new("netperfq", 42) else {
        return;
    };
    // QEMU's rtl8139 presents revision 0x20; nic= picks the driver's mode.
    for mode in ["cplus", "c"] {
        let cmdline = format!("ip={}/24 net=netserver tests=3 nic={mode}", ns.guest_ip);
        let mut vm = qemu_guest(&ns, &cmdline);
        let who = format!("QEMU rtl8139 nic={mode}");
        three_runs(&ns, &mut vm, &who);
        let o = vm.finish(STARTUP_DEADLINE);
        // isa-debug-exit: status 0 comes out as (0 << 1) | 1.
        assert_eq!(o.code, Some(1), "{who}\n{}", o.show());
        assert!(
            o.stdout.contains(&format!("mode={mode} io=pio")),
            "{}",
            o.show()
        );
    }
}

#[test]
fn what_the_responder_does_not_serve_is_refused_in_netperfs_terms() {
    if !kvm_available("what_the_responder_does_not_serve_is_refused_in_netperfs_terms") {
        return;
    }
    need_netperf();
    let Some(ns) = NetNs::new("netperfx", 43) else {
        return;
    };
    let tg = testguest();
    let cmdline = format!("ip={}/24 net=netserver tests=1", ns.guest_ip);
    let cmd = ns.wbvmm_command(&[
        "--kernel",
        tg.to_str().unwrap(),
        "--net",
        &format!("tap={}", ns.tap),
        "--cmdline",
        &cmdline,
    ]);
    let mut vm = Running::spawn(cmd, None);
    vm.wait_for("netserver: listening on", STARTUP_DEADLINE);
    // A connect/request/response test: netperf is told EOPNOTSUPP and says so.
    let (code, _, ctx) = netperf(&ns, &["-t", "TCP_CRR", "-l", "1"], &[]);
    assert_ne!(code, Some(0), "{ctx}");
    assert!(ctx.contains("remote error 95"), "{ctx}");
    let o = vm.finish(STARTUP_DEADLINE);
    assert_eq!(o.code, Some(11), "{}", o.show());
    assert!(
        o.stdout
            .contains("netserver: unsupported omni request (no connect tests (TCP_CRR, TCP_CC)): answered errno 95"),
        "{}",
        o.show()
    );
    assert!(
        o.stdout.contains("netserver: served 1 test(s), 1 failed"),
        "{}",
        o.show()
    );
}

/// Counted runs (the same work on any machine) against the Linux-shaped driver
/// (`nicdrv=linux`: 8139cp's / 8139too's register sequence per packet, IntrStatus
/// polled instead of the interrupt): 1-byte transactions, and 3000-byte responses
/// that keep several TX descriptors in flight (C mode: completion from each TSD's
/// status). Checks what both sides count and that the sequence ran.
fn linux_shaped_runs(ns: &NetNs, vm: &mut Running, who: &str, driver: &str) {
    vm.wait_for("netserver: listening on", STARTUP_DEADLINE);
    let shape =
        format!("net: driver shape linux ({driver}'s register sequence, IntrStatus polled)");
    assert!(vm.stdout().contains(&shape), "{who}\n{}", vm.stdout());
    let counted = format!("-{LINUX_COUNTED}");
    for (test, sizes, rsp) in [(1, "1,1", 1u64), (2, "200,3000", 3000)] {
        let (code, kv, ctx) = netperf(ns, &["-t", "TCP_RR", "-l", &counted], &["-r", sizes]);
        assert_eq!(code, Some(0), "{who}\n{ctx}");
        assert!(num(&kv, "THROUGHPUT", &ctx) > 0.0, "{ctx}");
        assert_eq!(
            num(&kv, "LOCAL_BYTES_RECVD", &ctx) as u64,
            LINUX_COUNTED * rsp,
            "{ctx}"
        );
        vm.wait_for(&format!("(test {test})"), STARTUP_DEADLINE);
        assert_eq!(
            guest_count(vm.stdout(), "TCP_RR", test - 1),
            LINUX_COUNTED,
            "{who}\n{}",
            vm.stdout()
        );
    }
    vm.wait_for("netserver: served 2 test(s), 0 failed", STARTUP_DEADLINE);
    // Every request reached the driver through an IntrStatus read that found it.
    let line = vm
        .stdout()
        .lines()
        .rfind(|l| l.starts_with("netserver: nic irq_events="))
        .unwrap_or_else(|| panic!("{who}: no irq_events line\n{}", vm.stdout()))
        .to_string();
    let events: u64 = line["netserver: nic irq_events=".len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(events >= 2 * LINUX_COUNTED, "{who}: {line}");
}

/// Transactions of each counted run against the Linux-shaped driver: every poll
/// of IntrStatus is an exit, so these runs are slow on a nested host.
const LINUX_COUNTED: u64 = 100;

#[test]
fn host_netperf_against_the_linux_shaped_driver_on_wbvmm_and_qemu() {
    if !kvm_available("host_netperf_against_the_linux_shaped_driver_on_wbvmm_and_qemu") {
        return;
    }
    need_netperf();
    let Some(ns) = NetNs::new("netperfl", 44) else {
        return;
    };
    let tg = testguest();
    for (rev, mode, driver) in [("0x20", "cplus", "8139cp"), ("0x10", "c", "8139too")] {
        let cmdline = format!("ip={}/24 net=netserver tests=2 nicdrv=linux", ns.guest_ip);
        let net = format!("tap={},rev={rev}", ns.tap);
        let cmd = ns.wbvmm_command(&[
            "--kernel",
            tg.to_str().unwrap(),
            "--net",
            &net,
            "--cmdline",
            &cmdline,
        ]);
        let mut vm = Running::spawn(cmd, None);
        let who = format!("wbvmm rev {rev}, nicdrv=linux");
        linux_shaped_runs(&ns, &mut vm, &who, driver);
        let o = vm.finish(STARTUP_DEADLINE);
        assert_eq!(o.code, Some(0), "{who}\n{}", o.show());
        assert!(
            o.stdout.contains(&format!("mode={mode} io=pio")),
            "{}",
            o.show()
        );

        // The oracle: the same driver against QEMU's rtl8139.
        let cmdline = format!("{cmdline} nic={mode}");
        let mut vm = qemu_guest(&ns, &cmdline);
        let who = format!("QEMU rtl8139 nic={mode}, nicdrv=linux");
        linux_shaped_runs(&ns, &mut vm, &who, driver);
        let o = vm.finish(STARTUP_DEADLINE);
        assert_eq!(o.code, Some(1), "{who}\n{}", o.show());
    }
}

/// The guest's final interrupt count: its `net: intx quiesced: irqs=N` lines (one
/// per net word, printed once the NIC can raise no more; here two: the ping and
/// the netserver), summed. At least one per transaction: the guest waits for each
/// request's RX interrupt (its NAPI-like poll completes, unmasking RX, before the
/// response goes out).
fn guest_irqs(stdout: &str, who: &str) -> u64 {
    let counts: Vec<u64> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("net: intx quiesced: irqs="))
        .map(|rest| {
            rest.split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{who}: bad quiesced line {rest:?}"))
        })
        .collect();
    assert_eq!(
        counts.len(),
        2,
        "{who}: one quiesced line per net word\n{stdout}"
    );
    let irqs = counts.iter().sum();
    assert!(
        irqs >= LINUX_COUNTED,
        "{who}: {irqs} interrupts for {LINUX_COUNTED} transactions\n{stdout}"
    );
    irqs
}

/// A ping, then one counted netperf TCP_RR against the driver woken by the NIC's
/// real INTx (`nicdrv=linux-irq`).
fn linux_irq_run(ns: &NetNs, vm: &mut Running, who: &str, driver: &str) {
    vm.wait_for("netserver: listening on", STARTUP_DEADLINE);
    let out = vm.stdout().to_string();
    assert!(out.contains("ping: 3 sent, 3 received"), "{who}\n{out}");
    let shape =
        format!("net: driver shape linux-irq ({driver}'s register sequence, woken by INTx)");
    assert!(out.contains(&shape), "{who}\n{out}");
    let counted = format!("-{LINUX_COUNTED}");
    let (code, kv, ctx) = netperf(ns, &["-t", "TCP_RR", "-l", &counted], &["-r", "1,1"]);
    assert_eq!(code, Some(0), "{who}\n{ctx}\n{}", vm.stdout());
    assert_eq!(
        num(&kv, "LOCAL_BYTES_RECVD", &ctx) as u64,
        LINUX_COUNTED,
        "{ctx}"
    );
    vm.wait_for("netserver: served 1 test(s), 0 failed", STARTUP_DEADLINE);
    assert_eq!(
        guest_count(vm.stdout(), "TCP_RR", 0),
        LINUX_COUNTED,
        "{who}\n{}",
        vm.stdout()
    );
}

#[test]
fn host_netperf_against_the_interrupt_driven_driver_on_wbvmm_and_qemu() {
    if !kvm_available("host_netperf_against_the_interrupt_driven_driver_on_wbvmm_and_qemu") {
        return;
    }
    need_netperf();
    let Some(ns) = NetNs::new("netperfi", 45) else {
        return;
    };
    let tg = testguest();
    // Both buses: the handler reads IntrStatus through port I/O or MMIO.
    for (rev, mode, driver, io) in [
        ("0x20", "cplus", "8139cp", "pio"),
        ("0x10", "c", "8139too", "mmio"),
    ] {
        let cmdline = format!(
            "ip={}/24 peer={} nicdrv=linux-irq nicio={io} net=ping net=netserver tests=1",
            ns.guest_ip, ns.host_ip
        );
        let net = format!("tap={},rev={rev}", ns.tap);
        let stats = stats_file(&format!("netperf-irq-{mode}"));
        let stats_arg = format!("--stats={}", stats.display());
        let cmd = ns.wbvmm_command(&[
            "--kernel",
            tg.to_str().unwrap(),
            "--net",
            &net,
            "--cmdline",
            &cmdline,
            &stats_arg,
        ]);
        let mut vm = Running::spawn(cmd, Some(stats.clone()));
        let who = format!("wbvmm rev {rev}, nicdrv=linux-irq nicio={io}");
        linux_irq_run(&ns, &mut vm, &who, driver);
        let o = vm.finish(STARTUP_DEADLINE);
        assert_eq!(o.code, Some(0), "{who}\n{}", o.show());
        let irqs = guest_irqs(&o.stdout, &who);
        assert!(
            o.stdout.contains(&format!("mode={mode} io={io}")),
            "{}",
            o.show()
        );
        assert!(
            o.stdout.contains(
                "net: intx INTA -> ioapic 0xfec00000 pin 16 (level, active low, from the mp table)"
            ),
            "{who}: the route is wbvmm's MP table entry\n{}",
            o.show()
        );
        // wbvmm's side. The handler EOIs every interrupt it takes, once, and each
        // EOI of the level vector is one resample event; the guest's count is
        // final (quiesced: IntrMask 0, IOAPIC entry masked) before it exits. KVM
        // adds one more kind of resample: unmasking a level entry whose line went
        // up while it was masked (a re-raise racing the quiesce) signals the
        // resampler instead of injecting (ioapic_write_indirect, Linux 6.4+), so
        // each of the 2 arms (ping, netserver) may add one. Raises (the level's
        // rising edges) are no bound either way: KVM delivers again at an EOI
        // while the level stays up, and an edge while the vector is in service
        // is no delivery of its own.
        let v = take_final_stats(&stats, &o);
        let resamples = v["interrupts"]["nic_resamples"].as_u64().unwrap_or(0);
        let raised = v["interrupts"]["nic"].as_u64().unwrap_or(0);
        assert!(
            (irqs..=irqs + 2).contains(&resamples),
            "{who}: the guest took {irqs}: {:#}\n{}",
            v["interrupts"],
            o.show()
        );
        assert!(raised > 0, "{who}: {:#}", v["interrupts"]);

        // The oracle: the same driver on QEMU's rtl8139, whose INTx reaches the
        // IOAPIC through the PIIX's PIRQ routing (qboot's interrupt line).
        let cmdline = format!("{cmdline} nic={mode}");
        let mut vm = qemu_guest(&ns, &cmdline);
        let who = format!("QEMU rtl8139 nic={mode}, nicdrv=linux-irq nicio={io}");
        linux_irq_run(&ns, &mut vm, &who, driver);
        let o = vm.finish(STARTUP_DEADLINE);
        assert_eq!(o.code, Some(1), "{who}\n{}", o.show());
        guest_irqs(&o.stdout, &who);
    }
}

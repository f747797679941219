//! The RTL8139 on a tap, driven by the test guest's own driver (smoltcp on top),
//! inside network namespaces these tests create (169.254.x.y only, bounded loads).

mod common;
use common::*;
use std::time::Duration;

fn guest(ns: &NetNs, net_spec: &str, words: &str, extra: &[&str]) -> Output {
    let tg = testguest();
    let cmdline = format!("ip={}/24 peer={} {words}", ns.guest_ip, ns.host_ip);
    let mut args = vec![
        "--kernel",
        tg.to_str().unwrap(),
        "--net",
        net_spec,
        "--cmdline",
        &cmdline,
    ];
    args.extend_from_slice(extra);
    ns.wbvmm(&args, STARTUP_DEADLINE)
}

/// Transactions of each counted `net=rr` run.
const RR_TRANSACTIONS: u64 = 2000;

/// Extra time the host side waits, once the guest holds, before it starts its
/// traffic (WBVMM_TEST_HOLD_EXTRA_MS, default 0): stretches the guest's busy phase
/// to show the tests do not depend on how long it lasts.
fn hold_extra() -> Duration {
    let ms = std::env::var("WBVMM_TEST_HOLD_EXTRA_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Duration::from_millis(ms)
}

/// Boot the test guest in `ns` with its NIC up and then holding (the NIC left
/// unserviced) until the test releases it, statistics snapshots on SIGUSR1.
fn hold_guest(ns: &NetNs, tag: &str, words: &str) -> Running {
    let stats = stats_file(tag);
    let tg = testguest();
    let cmdline = format!(
        "ip={}/24 peer={} net=up {words} hold",
        ns.guest_ip, ns.host_ip
    );
    let stats_arg = format!("--stats={}", stats.display());
    let cmd = ns.wbvmm_command(&[
        "--kernel",
        tg.to_str().unwrap(),
        "--net",
        "tap=wbt0",
        "--cmdline",
        &cmdline,
        &stats_arg,
    ]);
    let mut vm = Running::spawn(cmd, Some(stats));
    vm.wait_for("hold: waiting", STARTUP_DEADLINE);
    std::thread::sleep(hold_extra());
    vm
}

/// Release a holding guest and return its end and final statistics.
fn release(mut vm: Running) -> (Output, serde_json::Value) {
    let stats = vm.stats_path().expect("a --stats file");
    vm.send_line("go");
    let o = vm.finish(STARTUP_DEADLINE);
    assert!(o.stdout.contains("hold: released by 'go'"), "{}", o.show());
    assert_eq!(o.code, Some(0), "{}", o.show());
    let text = std::fs::read_to_string(&stats).unwrap_or_default();
    let _ = std::fs::remove_file(&stats);
    let v = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("final statistics in {}: {e}\n{}", stats.display(), o.show()));
    (o, v)
}

fn dropped(v: &serde_json::Value) -> u64 {
    let net = &v["net"];
    net["rx_ring_full"].as_u64().unwrap_or(0) + net["rx_backpressure"].as_u64().unwrap_or(0)
}

/// Register writes that exited to wbvmm (the doorbells that KVM completed are not here).
fn register_write_exits(v: &serde_json::Value) -> u64 {
    let e = &v["exits"];
    e["io_out"].as_u64().unwrap() + e["mmio_write"].as_u64().unwrap()
}

fn stats(o: &Output) -> serde_json::Value {
    let json = &o.stderr[o.stderr.find('{').expect("stats JSON on stderr")..];
    serde_json::from_str(json).expect("stats JSON")
}

/// A counted `net=rr` run ended well and moved exactly `RR_TRANSACTIONS`: its stats.
fn counted_rr(o: &Output, what: &str) -> serde_json::Value {
    assert_eq!(o.code, Some(0), "rr {what}\n{}", o.show());
    let line = o
        .stdout
        .lines()
        .find(|l| l.starts_with("rr: ") && l.contains("trans/s"))
        .expect("rr line");
    let n: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(n, RR_TRANSACTIONS, "{what}: {line}");
    stats(o)
}

#[test]
fn ping_and_rr_in_both_modes_and_both_bars() {
    if !kvm_available("ping_and_rr_in_both_modes_and_both_bars") {
        return;
    }
    let Some(mut ns) = NetNs::new("netrr", 21) else {
        return;
    };
    ns.echo_server(7777, 120);
    let tap = format!("tap={}", ns.tap);
    for (mode, io) in [
        ("cplus", "pio"),
        ("cplus", "mmio"),
        ("c", "pio"),
        ("c", "mmio"),
    ] {
        let o = guest(&ns, &tap, &format!("net=ping nic={mode} nicio={io}"), &[]);
        assert_eq!(o.code, Some(0), "ping {mode}/{io}\n{}", o.show());
        assert!(
            o.stdout
                .contains(&format!("ping: reply from {}", ns.host_ip)),
            "{}",
            o.show()
        );
        assert!(
            o.stdout.contains(&format!("mode={mode} io={io}")),
            "{}",
            o.show()
        );

        // A counted run (secs only bounds it): the same work on any machine.
        let o = guest(
            &ns,
            &tap,
            &format!("net=rr port=7777 trans={RR_TRANSACTIONS} secs=600 nic={mode} nicio={io}"),
            &["--stats"],
        );
        let v = counted_rr(&o, &format!("{mode}/{io}"));
        let n = RR_TRANSACTIONS;
        // Every transaction is one frame each way through the tap.
        assert!(
            v["net"]["tx_packets"].as_u64().unwrap() >= n,
            "{}",
            o.show()
        );
        assert!(
            v["net"]["rx_packets"].as_u64().unwrap() >= n,
            "{}",
            o.show()
        );
        // The busy-poll's look at the C+ TX ring (tx-snoop, on by default) starts
        // ring walks only in C+ mode: C mode has no ring in memory to look at.
        if mode == "c" {
            // wbvmm writes a C-mode record's header last, after the frame and its CRC:
            // the polling driver, which takes a non-zero header with a good CRC as a
            // whole record, never has to confirm one through CBR (an exit). A wrong
            // CRC in the guest or a header written early would show here.
            let nic = o
                .stdout
                .lines()
                .find(|l| l.starts_with("rr: nic "))
                .expect("the guest's rr: nic line");
            assert!(nic.contains(" rx_cbr_reads=0 "), "{mode}/{io}: {nic}");
        }
        let snooped = v["net"]["tx_snooped"].as_u64().expect("net.tx_snooped");
        if mode == "c" {
            assert_eq!(snooped, 0, "{}", o.show());
        } else {
            // Each walk it starts takes at least one frame.
            let tx = v["net"]["tx_packets"].as_u64().unwrap();
            assert!(
                snooped <= tx,
                "{snooped} walks for {tx} frames\n{}",
                o.show()
            );
        }
        // The doorbells (TxPoll in C+ mode, learned TSD values in C mode) complete
        // inside KVM: most transactions reach wbvmm without a TX exit.
        let writes = register_write_exits(&v);
        assert!(
            writes < n / 2,
            "{writes} register-write exits for {n} transactions\n{}",
            o.show()
        );
    }
}

/// The read-only register shadow (`--net ...,shadow=on`, and `auto`, the default,
/// whenever the driver uses the MMIO BAR: 8139cp, and 8139too as Debian builds it):
/// the Linux-shaped driver (`nicdrv=linux`, IntrStatus polled, acked, IntrMask masked
/// around the poll) over the MMIO BAR reads its registers from the shadow page
/// without exits, in both modes, and still moves every frame: its acks and masks
/// (writes) exit and are seen by its next loads, or it would lose interrupts' causes
/// or spin on stale status. (Over the port BAR, `auto` learns and posts instead:
/// `posted_writes_keep_the_linux_shaped_drivers_working_without_their_exits`.)
#[test]
fn register_shadow_serves_linux_shaped_reads_without_exits() {
    if !kvm_available("register_shadow_serves_linux_shaped_reads_without_exits") {
        return;
    }
    let Some(mut ns) = NetNs::new("netshadow", 28) else {
        return;
    };
    ns.echo_server(7777, 120);
    for mode in ["cplus", "c"] {
        let words = format!(
            "net=rr port=7777 trans={RR_TRANSACTIONS} secs=600 nic={mode} nicio=mmio nicdrv=linux"
        );
        let mut reads = Vec::new();
        for shadow in ["off", "on", "auto"] {
            let spec = format!("tap={},shadow={shadow}", ns.tap);
            let o = guest(&ns, &spec, &words, &["--stats"]);
            let v = counted_rr(&o, &format!("{mode} shadow={shadow}"));
            reads.push(v["exits"]["mmio_read"].as_u64().unwrap());
        }
        // Without the shadow every IntrStatus poll is an exit; with it, none is.
        assert!(
            reads[0] >= RR_TRANSACTIONS && reads[1] < RR_TRANSACTIONS / 10,
            "{mode}: MMIO read exits without / with the shadow: {reads:?}"
        );
        // auto: in C+ mode at once; in C mode once a window of 256 reads that began
        // after the first frame has shown the driver reading through the MMIO BAR
        // (src/net/shadow.rs, READ_WINDOW): the setup's window, the one in which
        // sending began, then that one; none exit afterwards.
        assert!(
            reads[2] < 3 * 256 + 100,
            "{mode}: MMIO read exits off / on / auto: {reads:?}"
        );
    }
}

/// Posted register writes (`--net ...,posted=on`, the default): in C mode the
/// Linux-shaped driver's acks, IntrMask changes and CAPR updates are queued in KVM's
/// coalesced ring instead of exiting, and the guest still moves every frame, with
/// the interrupt (`nicdrv=linux-irq`: a lost ack or a late unmask would stall it or
/// show as interrupts that find nothing) and with IntrStatus polled. Through the MMIO
/// BAR only beside `shadow=off`: with the shadow, which `auto` maps for a driver
/// there, nothing is posted (its loads would not see the queued writes).
#[test]
fn posted_writes_keep_the_linux_shaped_drivers_working_without_their_exits() {
    if !kvm_available("posted_writes_keep_the_linux_shaped_drivers_working_without_their_exits") {
        return;
    }
    let Some(mut ns) = NetNs::new("netposted", 29) else {
        return;
    };
    ns.echo_server(7777, 120);
    for (drv, nicio, shadow) in [
        ("linux-irq", "pio", "auto"),
        ("linux", "pio", "auto"),
        ("linux-irq", "mmio", "off"),
    ] {
        let words = format!(
            "net=rr port=7777 trans={RR_TRANSACTIONS} secs=600 nic=c nicio={nicio} nicdrv={drv}"
        );
        let mut writes = Vec::new();
        for posted in ["off", "on"] {
            let spec = format!("tap={},posted={posted},shadow={shadow}", ns.tap);
            let o = guest(&ns, &spec, &words, &["--stats"]);
            let v = counted_rr(&o, &format!("{drv} {nicio} posted={posted}"));
            assert_eq!(
                v["net"]["posted"].as_bool(),
                Some(posted == "on"),
                "{drv} {nicio}"
            );
            writes.push(register_write_exits(&v));
        }
        // Per transaction the driver acks, masks, unmasks and moves CAPR: at least
        // two of those writes per transaction stop exiting.
        assert!(
            writes[1] + 2 * RR_TRANSACTIONS <= writes[0],
            "{drv} {nicio}: register write exits posted=off / on: {writes:?}"
        );
    }
}

/// The IntrMask unmask beside the register shadow (`--net ...,unmask=on`, the
/// default; src/net/unmask.rs): the Linux-shaped drivers' unmask after the poll
/// completes in KVM instead of exiting, and every transaction still completes, with
/// the interrupt too (`nicdrv=linux-irq`: an unmask applied late enough to lose an
/// interrupt would stall the run; one that let an interrupt through a mask would
/// show as handler runs that find nothing, which the guest counts).
#[test]
fn the_unmask_completes_in_kvm_beside_the_shadow_and_every_interrupt_arrives() {
    if !kvm_available("the_unmask_completes_in_kvm_beside_the_shadow_and_every_interrupt_arrives") {
        return;
    }
    let Some(mut ns) = NetNs::new("netunmask", 26) else {
        return;
    };
    ns.echo_server(7777, 120);
    for (mode, drv) in [
        ("cplus", "linux-irq"),
        ("c", "linux-irq"),
        ("cplus", "linux"),
    ] {
        let words = format!(
            "net=rr port=7777 trans={RR_TRANSACTIONS} secs=600 nic={mode} nicio=mmio nicdrv={drv}"
        );
        let mut writes = Vec::new();
        for unmask in ["off", "on"] {
            let spec = format!("tap={},unmask={unmask}", ns.tap);
            let o = guest(&ns, &spec, &words, &["--stats"]);
            let who = format!("{mode} {drv} unmask={unmask}");
            let v = counted_rr(&o, &who);
            let absorbed = v["net"]["unmasks_absorbed"]
                .as_u64()
                .expect("net.unmasks_absorbed");
            if unmask == "off" {
                assert_eq!(absorbed, 0, "{who}");
            } else {
                // One unmask per poll, once learnt; in C mode only after `auto` has
                // mapped the shadow (READ_WINDOW), a few hundred reads into the run.
                assert!(
                    absorbed >= RR_TRANSACTIONS - RR_TRANSACTIONS / 10,
                    "{who}: {absorbed}\n{}",
                    o.show()
                );
            }
            writes.push(register_write_exits(&v));
        }
        assert!(
            writes[1] + RR_TRANSACTIONS - RR_TRANSACTIONS / 10 <= writes[0],
            "{mode} {drv}: register write exits unmask=off / on: {writes:?}"
        );
    }
}

#[test]
fn txpoll_doorbell_follows_a_bar_move_at_once() {
    if !kvm_available("txpoll_doorbell_follows_a_bar_move_at_once") {
        return;
    }
    let Some(mut ns) = NetNs::new("netbars", 27) else {
        return;
    };
    ns.echo_server(7777, 120);
    let tap = format!("tap={}", ns.tap);
    // The guest moves both BARs away from where firmware put them before its first
    // TxPoll: the doorbell must complete in KVM at the new address from then on.
    for io in ["pio", "mmio"] {
        let o = guest(
            &ns,
            &tap,
            &format!(
                "net=rr port=7777 trans={RR_TRANSACTIONS} secs=600 nic=cplus nicio={io} nicbars=assign"
            ),
            &["--stats"],
        );
        assert_eq!(o.code, Some(0), "{io}\n{}", o.show());
        assert!(
            o.stdout.contains("io=0xc000 mmio=0xfebf0000"),
            "{}",
            o.show()
        );
        let writes = register_write_exits(&stats(&o));
        assert!(
            writes < RR_TRANSACTIONS / 2,
            "{writes} register-write exits for {RR_TRANSACTIONS} transactions after a BAR move\n{}",
            o.show()
        );
    }
}

#[test]
fn revision_0x10_presents_an_8139c() {
    if !kvm_available("revision_0x10_presents_an_8139c") {
        return;
    }
    let Some(ns) = NetNs::new("netrev", 22) else {
        return;
    };
    let o = guest(
        &ns,
        &format!("tap={},rev=0x10,mac=02:11:22:33:44:55", ns.tap),
        "net=ping",
        &[],
    );
    assert_eq!(o.code, Some(0), "{}", o.show());
    assert!(o.stdout.contains("10ec:8139 rev 0x10"), "{}", o.show());
    // nic=auto picks C mode for an 8139C, as Linux picks 8139too.
    assert!(o.stdout.contains("mode=c "), "{}", o.show());
    assert!(
        o.stdout.contains("eeprom mac=02:11:22:33:44:55"),
        "{}",
        o.show()
    );
}

#[test]
fn host_flood_while_the_guest_is_busy_is_backpressured() {
    if !kvm_available("host_flood_while_the_guest_is_busy_is_backpressured") {
        return;
    }
    let Some(mut ns) = NetNs::new("netflood", 23) else {
        return;
    };
    // The guest brings the NIC up and then holds without looking at its RX ring
    // until the host has seen the ring fill and push back, however long that takes
    // on this machine. The flood is bounded in count and time.
    assert!(ns.exec_ok(&[
        "ip",
        "neigh",
        "add",
        &ns.guest_ip.clone(),
        "lladdr",
        "52:54:00:12:34:56",
        "dev",
        "wbt0"
    ]));
    let mut vm = hold_guest(&ns, "flood", "");
    let flood = format!("ping -f -q -c 20000 -s 1000 -w 60 {}", ns.guest_ip);
    ns.spawn(&["sh", "-c", &flood]);
    let during = vm.wait_for_stats("the ring to fill and push back", STARTUP_DEADLINE, |v| {
        v["net"]["tap_rx_frames"].as_u64().unwrap_or(0) > 64 && dropped(v) > 0
    });
    assert_eq!(during["outcome"].as_str(), Some("running"));
    let (o, v) = release(vm);
    let net = &v["net"];
    assert!(
        net["tap_rx_frames"].as_u64().unwrap() > 64,
        "the flood reached the NIC\n{}",
        o.show()
    );
    assert!(
        dropped(&v) > 0,
        "a full guest ring must push back\n{}",
        o.show()
    );
    // Memory stays flat: nothing is queued without bound inside wbvmm.
    assert!(
        v["rss_overhead_bytes"].as_u64().unwrap() < 32 << 20,
        "{}",
        o.show()
    );
}

#[test]
fn deleting_the_tap_under_a_running_guest_does_not_crash_the_vmm() {
    if !kvm_available("deleting_the_tap_under_a_running_guest_does_not_crash_the_vmm") {
        return;
    }
    let Some(mut ns) = NetNs::new("netdel", 24) else {
        return;
    };
    ns.echo_server(7777, 600);
    let tg = testguest();
    let cmdline = format!(
        "ip={}/24 peer={} net=rr port=7777 secs=600",
        ns.guest_ip, ns.host_ip
    );
    let cmd = ns.wbvmm_command(&[
        "--kernel",
        tg.to_str().unwrap(),
        "--net",
        "tap=wbt0",
        "--cmdline",
        &cmdline,
    ]);
    let mut vm = Running::spawn(cmd, None);
    // Delete the tap once transactions flow, not after a guessed delay.
    vm.wait_for("rr: connected", STARTUP_DEADLINE);
    std::thread::sleep(hold_extra());
    assert!(ns.exec_ok(&["ip", "link", "del", "wbt0"]));
    let o = vm.finish(STARTUP_DEADLINE);
    // The guest sees its peer vanish (rr fails: exit 10) and ends itself; wbvmm
    // neither crashed nor hung.
    assert_eq!(o.code, Some(10), "{}", o.show());
    assert!(o.stdout.contains("rr: failed after"), "{}", o.show());
    assert!(!o.stderr.contains("panicked"), "{}", o.show());
}

#[test]
fn tap_errors_are_clear() {
    if !kvm_available("tap_errors_are_clear") {
        return;
    }
    let tg = testguest();
    let o = wbvmm(
        &[
            "--kernel",
            tg.to_str().unwrap(),
            "--net",
            "tap=wbvmm-nosuch0",
        ],
        None,
        STARTUP_DEADLINE,
    );
    assert_eq!(o.code, Some(1), "{}", o.show());
    assert!(
        o.stderr.contains("tap wbvmm-nosuch0 does not exist"),
        "{}",
        o.show()
    );
    let o = wbvmm(
        &["--kernel", tg.to_str().unwrap(), "--net", "tap=x,rev=7"],
        None,
        STARTUP_DEADLINE,
    );
    assert_eq!(o.code, Some(2), "{}", o.show());
    let Some(ns) = NetNs::new("netbusy", 25) else {
        return;
    };
    // Two VMs on one tap: the second finds it busy while the first holds it.
    let first = hold_guest(&ns, "busy", "");
    let second = ns.wbvmm(
        &["--kernel", tg.to_str().unwrap(), "--net", "tap=wbt0"],
        STARTUP_DEADLINE,
    );
    assert_eq!(second.code, Some(1), "{}", second.show());
    assert!(second.stderr.contains("busy"), "{}", second.show());
    release(first);
}

#[test]
fn receive_filter_drops_unwanted_multicast_and_takes_unicast() {
    if !kvm_available("receive_filter_drops_unwanted_multicast_and_takes_unicast") {
        return;
    }
    let Some(mut ns) = NetNs::new("netmcast", 26) else {
        return;
    };
    assert!(ns.exec_ok(&[
        "ip",
        "neigh",
        "add",
        &ns.guest_ip.clone(),
        "lladdr",
        "52:54:00:12:34:56",
        "dev",
        "wbt0"
    ]));
    // The guest's driver accepts broadcast and its own address only (RCR AM clear, MAR
    // zero), as 8139too does until a multicast group is joined. While it holds, 30
    // datagrams to a multicast group and 30 to the guest are sent from inside the
    // namespace; the guest is released once the NIC has taken or filtered them all.
    let mut vm = hold_guest(&ns, "mcast", "");
    let script = format!(
        "import socket,time\n\
         s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
         s.setsockopt(socket.IPPROTO_IP,socket.IP_MULTICAST_IF,socket.inet_aton('{host}'))\n\
         for i in range(30):\n\
         \x20   s.sendto(b'm',('239.1.2.3',9999)); s.sendto(b'u',('{guest}',9999)); time.sleep(0.005)\n",
        host = ns.host_ip,
        guest = ns.guest_ip
    );
    ns.spawn(&["timeout", "60", "python3", "-c", &script]);
    let enough = |v: &serde_json::Value| {
        v["net"]["rx_filtered"].as_u64().unwrap_or(0) >= 30
            && v["net"]["rx_packets"].as_u64().unwrap_or(0) >= 30
    };
    vm.wait_for_stats("30 frames filtered and 30 taken", STARTUP_DEADLINE, enough);
    let (o, v) = release(vm);
    let net = &v["net"];
    assert!(
        net["rx_filtered"].as_u64().unwrap() >= 30,
        "multicast frames must be filtered\n{}",
        o.show()
    );
    assert!(
        net["rx_packets"].as_u64().unwrap() >= 30,
        "unicast frames must be received\n{}",
        o.show()
    );
}

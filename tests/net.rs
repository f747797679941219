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
    ns.wbvmm(&args, Duration::from_secs(90))
}

fn stats(o: &Output) -> serde_json::Value {
    let json = &o.stderr[o.stderr.find('{').expect("stats JSON on stderr")..];
    serde_json::from_str(json).expect("stats JSON")
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

        let o = guest(
            &ns,
            &tap,
            &format!("net=rr port=7777 secs=1 nic={mode} nicio={io}"),
            &["--stats"],
        );
        assert_eq!(o.code, Some(0), "rr {mode}/{io}\n{}", o.show());
        let line = o
            .stdout
            .lines()
            .find(|l| l.starts_with("rr: ") && l.contains("trans/s"))
            .expect("rr line");
        let n: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(n > 100, "only {n} transactions: {line}");
        let v = stats(&o);
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
        // The doorbells (TxPoll in C+ mode, learned TSD values in C mode) complete
        // inside KVM: most transactions reach wbvmm without a TX exit.
        let e = &v["exits"];
        let writes = e["io_out"].as_u64().unwrap() + e["mmio_write"].as_u64().unwrap();
        assert!(
            writes < n / 2,
            "{writes} register-write exits for {n} transactions\n{}",
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
    // The guest brings the NIC up, then spends seconds on MMIO reads without looking
    // at its RX ring. A bounded flood (count and deadline) arrives meanwhile.
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
    let guest_ip = ns.guest_ip.clone();
    ns.spawn(&[
        "sh",
        "-c",
        &format!("sleep 1; ping -f -q -c 20000 -s 1000 -w 6 {guest_ip}"),
    ]);
    let o = guest(
        &ns,
        "tap=wbt0",
        "net=up mmio-loop=0xd0000000,40000",
        &["--stats"],
    );
    assert_eq!(o.code, Some(0), "{}", o.show());
    let v = stats(&o);
    let net = &v["net"];
    assert!(
        net["tap_rx_frames"].as_u64().unwrap() > 64,
        "the flood reached the NIC\n{}",
        o.show()
    );
    let dropped = net["rx_ring_full"].as_u64().unwrap() + net["rx_backpressure"].as_u64().unwrap();
    assert!(
        dropped > 0,
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
    ns.echo_server(7777, 60);
    ns.spawn(&["sh", "-c", "sleep 2; ip link del wbt0"]);
    let o = guest(&ns, "tap=wbt0", "net=rr port=7777 secs=5", &[]);
    // The guest sees its peer vanish (rr fails: exit 10) and ends itself; wbvmm
    // neither crashed nor hung.
    assert_eq!(o.code, Some(10), "{}", o.show());
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
        Duration::from_secs(30),
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
        Duration::from_secs(30),
    );
    assert_eq!(o.code, Some(2), "{}", o.show());
    let Some(ns) = NetNs::new("netbusy", 25) else {
        return;
    };
    // Two VMs on one tap: the second finds it busy.
    let tgs = tg.to_str().unwrap().to_string();
    let cmdline = "net=up mmio-loop=0xd0000000,30000".to_string();
    let first = std::thread::spawn({
        let name = ns.name.clone();
        move || {
            run_with_timeout(
                std::process::Command::new("ip").args([
                    "netns",
                    "exec",
                    &name,
                    env!("CARGO_BIN_EXE_wbvmm"),
                    "--kernel",
                    &tgs,
                    "--net",
                    "tap=wbt0",
                    "--cmdline",
                    &cmdline,
                ]),
                None,
                Duration::from_secs(60),
            )
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let second = ns.wbvmm(
        &["--kernel", tg.to_str().unwrap(), "--net", "tap=wbt0"],
        Duration::from_secs(30),
    );
    assert_eq!(second.code, Some(1), "{}", second.show());
    assert!(second.stderr.contains("busy"), "{}", second.show());
    let first = first.join().unwrap();
    assert_eq!(first.code, Some(0), "{}", first.show());
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
    // zero), as 8139too does until a multicast group is joined. 30 datagrams to a
    // multicast group and 30 to the guest, sent from inside the namespace.
    let script = format!(
        "import socket,time\n\
         time.sleep(1)\n\
         s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
         s.setsockopt(socket.IPPROTO_IP,socket.IP_MULTICAST_IF,socket.inet_aton('{host}'))\n\
         for i in range(30):\n\
         \x20   s.sendto(b'm',('239.1.2.3',9999)); s.sendto(b'u',('{guest}',9999)); time.sleep(0.005)\n",
        host = ns.host_ip,
        guest = ns.guest_ip
    );
    ns.spawn(&["timeout", "20", "python3", "-c", &script]);
    let o = guest(
        &ns,
        "tap=wbt0",
        "net=up mmio-loop=0xd0000000,30000",
        &["--stats"],
    );
    assert_eq!(o.code, Some(0), "{}", o.show());
    let v = stats(&o);
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

//! Tap tests. The ones that need a real tap create a private network namespace
//! (`wbvmm-t-<pid>-<n>`), make the tap inside it with `ip`, enter it with
//! `setns` on a dedicated thread, and delete the namespace afterwards. Traffic
//! stays inside that namespace, on 169.254.x.y addresses, with bounded waits.
//! Without root, /dev/net/tun or `ip` they print SKIPPED and pass.

use super::*;
use crate::net::TsoInfo;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static NS_SEQ: AtomicU32 = AtomicU32::new(0);

struct Netns {
    name: String,
}

impl Netns {
    /// Create a namespace with tap `tap` (up, 169.254.77.1/24), or None (skip).
    fn create(tap: &str) -> Option<Netns> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: tap test needs root (CAP_NET_ADMIN) to create a network namespace");
            return None;
        }
        if !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("SKIPPED: tap test: /dev/net/tun is missing");
            return None;
        }
        let name = format!(
            "wbvmm-t-{}-{}",
            std::process::id(),
            NS_SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("SKIPPED: tap test: `ip netns add` failed (no iproute2 or no permission)");
            return None;
        }
        let ns = Netns { name };
        let run = |args: &[&str]| {
            let mut full = vec!["netns", "exec", &ns.name, "ip"];
            full.extend_from_slice(args);
            Command::new("ip")
                .args(&full)
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        let ok = run(&["link", "set", "lo", "up"])
            && run(&["tuntap", "add", tap, "mode", "tap"])
            && run(&["addr", "add", "169.254.77.1/24", "dev", tap])
            && run(&["link", "set", tap, "up"]);
        if !ok {
            eprintln!(
                "SKIPPED: tap test: could not create tap {tap} in {}",
                ns.name
            );
            return None;
        }
        Some(ns)
    }

    /// Run `f` on a thread that has entered the namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&path).expect("open netns");
            // SAFETY: fd is a namespace file; setns affects only this thread.
            let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread panicked")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x77, 0x00, 0x02];
const GUEST_IP: [u8; 4] = [169, 254, 77, 2];
const HOST_IP: [u8; 4] = [169, 254, 77, 1];

fn arp_request() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&GUEST_IP);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&HOST_IP);
    f.resize(60, 0);
    f
}

fn is_arp_reply(f: &[u8]) -> bool {
    f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] && f[28..32] == HOST_IP
}

/// How long a test waits for the host stack's answer before calling it lost: only
/// the failure path waits this long, on any machine.
const ANSWER_DEADLINE_SECS: u64 = 60;

/// ARP for the host until it answers. Retried because the host side only starts
/// transmitting once linkwatch has activated the tap's qdisc after the attach
/// (asynchronous, up to ~1 s, longer on a loaded machine); until then replies are
/// dropped.
fn arp_until_reply(tap: &Tap) -> Option<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(ANSWER_DEADLINE_SECS);
    while Instant::now() < deadline {
        tap.write_frame(&arp_request()).ok()?;
        if let Some(r) = wait_frame_ms(tap, 200, is_arp_reply) {
            return Some(r);
        }
    }
    None
}

/// Read frames for up to `secs` until `pred` matches one.
fn wait_frame(tap: &Tap, secs: u64, pred: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
    wait_frame_ms(tap, secs * 1000, pred)
}

fn wait_frame_ms(tap: &Tap, ms: u64, pred: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; MAX_TAP_FRAME];
    let deadline = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < deadline {
        let mut pfd = libc::pollfd {
            fd: tap.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        while let Ok(Some(n)) = tap.read_frame(&mut buf) {
            if pred(&buf[..n]) {
                return Some(buf[..n].to_vec());
            }
        }
    }
    None
}

#[test]
fn bad_and_missing_names() {
    assert!(matches!(
        Tap::open("", TapOptions::default()),
        Err(TapError::BadName { .. })
    ));
    assert!(matches!(
        Tap::open("0123456789abcdefg", TapOptions::default()),
        Err(TapError::BadName { .. })
    ));
    let e = Tap::open("wbvmm-nonexist", TapOptions::default()).unwrap_err();
    assert!(matches!(e, TapError::Missing { .. }), "{e:?}");
    // The errno is the cause, not part of the message.
    let cause = std::error::Error::source(&e).expect("a cause").to_string();
    assert_eq!(cause, "No such device (os error 19)");
    let msg = e.to_string();
    assert!(!msg.contains("os error"), "{msg}");
    assert!(
        msg.contains("ip tuntap add wbvmm-nonexist mode tap"),
        "{msg}"
    );
}

#[test]
fn real_tap_busy_arp_and_nic_roundtrip() {
    let Some(ns) = Netns::create("wbt0") else {
        return;
    };
    ns.run(|| {
        let tap = Tap::open("wbt0", TapOptions::default()).expect("open tap");
        assert_eq!(tap.name(), "wbt0");
        // A second attach of a single-queue tap is refused with EBUSY.
        let e = Tap::open("wbt0", TapOptions::default()).unwrap_err();
        assert!(matches!(e, TapError::Busy { .. }), "{e:?}");
        assert!(e.to_string().contains("busy"));
        let cause = std::error::Error::source(&e).expect("a cause").to_string();
        assert_eq!(cause, "Device or resource busy (os error 16)");
        // Not a tap: loopback exists but is not a tun device.
        let e = Tap::open("lo", TapOptions::default()).unwrap_err();
        assert!(
            matches!(e, TapError::NotATap { .. } | TapError::SetIff { .. }),
            "{e:?}"
        );

        // Plain frame I/O: ARP for the host side, which answers.
        let reply = arp_until_reply(&tap).expect("ARP reply from the host");
        assert_eq!(reply[..6], GUEST_MAC);

        // The NIC end to end: guest C-mode TX of the ARP request through the tap,
        // the host's reply received into the guest's RX ring.
        use crate::bus::BusDevice;
        use crate::dma::{GuestDma, VecGuestMemory};
        use crate::irq::RecordingIrq;
        use crate::net::rtl8139::{Rtl8139, Rtl8139Config, REVISION_C};
        use crate::pci::{PciDevice, PCI_COMMAND_MASTER};
        use std::sync::Arc;
        let mem = Arc::new(VecGuestMemory::new(0, 1 << 20));
        let tap = Arc::new(tap);
        let nic = Rtl8139::new(
            Rtl8139Config {
                mac: GUEST_MAC,
                revision: REVISION_C,
            },
            mem.clone(),
            Arc::new(RecordingIrq::default()),
            tap.clone(),
        )
        .unwrap();
        nic.command_written(PCI_COMMAND_MASTER);
        nic.write(0, 0x37, &[0x0c]);
        nic.write(0, 0x44, &0x8au32.to_le_bytes()); // 8K, WRAP, AB, APM
        nic.write(0, 0x30, &0x8_0000u32.to_le_bytes());
        nic.write(0, 0x20, &0x1_0000u32.to_le_bytes());
        // Flush the neighbour entry so the host asks again / answers again.
        let _ = Command::new("ip")
            .args(["neigh", "flush", "dev", "wbt0"])
            .status();
        mem.write(0x1_0000, &arp_request()).unwrap();
        nic.write(0, 0x10, &60u32.to_le_bytes());
        assert_eq!(nic.stats().tx_packets, 1);
        let reply =
            wait_frame(&tap, ANSWER_DEADLINE_SECS, is_arp_reply).expect("ARP reply for the NIC");
        assert_eq!(nic.receive(&reply), crate::net::RxResult::Accepted);
        let mut rec = vec![0u8; 4 + reply.len()];
        mem.read(0x8_0000, &mut rec).unwrap();
        assert_eq!(rec[0] & 1, 1, "ROK");
        assert_eq!(&rec[4..], &reply[..]);
    });
}

#[test]
fn vnet_hdr_offload_reaches_the_host_stack() {
    let Some(ns) = Netns::create("wbt1") else {
        return;
    };
    ns.run(|| {
        let tap = Tap::open("wbt1", TapOptions { vnet_hdr: true }).expect("open tap");
        assert!(tap.vnet_hdr());
        assert!(FrameSink::supports_offload(&tap));
        // Learn the host MAC by ARP (frames come back with the header stripped).
        let reply = arp_until_reply(&tap).expect("ARP reply");
        let host_mac: [u8; 6] = reply[6..12].try_into().unwrap();

        // UDP with the checksum left to the host (NEEDS_CSUM): a socket bound
        // in the namespace gets the datagram, so the header was taken.
        let sock = std::net::UdpSocket::bind("169.254.77.1:7777").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(ANSWER_DEADLINE_SECS)))
            .unwrap();
        let payload = b"wbvmm offload";
        let mut f = Vec::new();
        f.extend_from_slice(&host_mac);
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&[0x08, 0x00]);
        let tot = (20 + 8 + payload.len()) as u16;
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&tot.to_be_bytes());
        f.extend_from_slice(&[0, 1, 0x40, 0, 64, 17, 0, 0]);
        f.extend_from_slice(&GUEST_IP);
        f.extend_from_slice(&HOST_IP);
        f.extend_from_slice(&7000u16.to_be_bytes());
        f.extend_from_slice(&7777u16.to_be_bytes());
        f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(payload);
        let ip = crate::net::csum::parse_ipv4(&f).unwrap();
        crate::net::csum::fix_ip_checksum(&mut f, &ip);
        let ps = crate::net::csum::fold(crate::net::csum::pseudo_sum(
            GUEST_IP,
            HOST_IP,
            17,
            8 + payload.len(),
        ));
        f[40..42].copy_from_slice(&ps.to_be_bytes());
        let off = TxOffload {
            csum: Some((34, 6)),
            tso4: None,
        };
        assert!(tap.write_frame_offload(&f, &off).unwrap());
        let mut buf = [0u8; 64];
        let (n, from) = sock.recv_from(&mut buf).expect("datagram via NEEDS_CSUM");
        assert_eq!(&buf[..n], payload);
        assert_eq!(from.port(), 7000);

        // A TCPv4 GSO super-frame to a closed port: the host answers with RSTs,
        // which proves it accepted and segmented the frame.
        let data = vec![0x5a; 3000];
        let mut t = Vec::new();
        t.extend_from_slice(&host_mac);
        t.extend_from_slice(&GUEST_MAC);
        t.extend_from_slice(&[0x08, 0x00]);
        let tot = (40 + data.len()) as u16;
        t.extend_from_slice(&[0x45, 0]);
        t.extend_from_slice(&tot.to_be_bytes());
        t.extend_from_slice(&[0, 2, 0x40, 0, 64, 6, 0, 0]);
        t.extend_from_slice(&GUEST_IP);
        t.extend_from_slice(&HOST_IP);
        t.extend_from_slice(&40000u16.to_be_bytes());
        t.extend_from_slice(&9u16.to_be_bytes());
        t.extend_from_slice(&1u32.to_be_bytes());
        t.extend_from_slice(&0u32.to_be_bytes());
        t.extend_from_slice(&[0x50, 0x10, 0x10, 0, 0, 0, 0, 0]);
        t.extend_from_slice(&data);
        let ip = crate::net::csum::parse_ipv4(&t).unwrap();
        crate::net::csum::fix_ip_checksum(&mut t, &ip);
        let ps = crate::net::csum::fold(crate::net::csum::pseudo_sum(
            GUEST_IP,
            HOST_IP,
            6,
            20 + data.len(),
        ));
        t[50..52].copy_from_slice(&ps.to_be_bytes());
        let off = TxOffload {
            csum: Some((34, 16)),
            tso4: Some(TsoInfo {
                mss: 1000,
                hdr_len: 54,
            }),
        };
        assert!(tap.write_frame_offload(&t, &off).unwrap());
        let rst = wait_frame(&tap, ANSWER_DEADLINE_SECS, |f| {
            f.len() >= 54 && f[12..14] == [0x08, 0x00] && f[23] == 6 && f[47] & 0x04 != 0
        });
        assert!(rst.is_some(), "no RST for the GSO frame");
    });
}

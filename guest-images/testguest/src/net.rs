//! Networking words: PCI discovery of the RTL8139, driver bring-up, smoltcp
//! over the driver, `net=up`, `net=ping` and `net=rr`.
//!
//! Everything polls; time is the TSC. Every wait is bounded.

use crate::commands::parse_num;
use crate::io::rdtsc;
use crate::pci::{self, Bdf};
use crate::rtl8139::{self, Bus, Mode, Nic};
use crate::{nicirq, paging, println, tsc, Global};
use smoltcp::iface::{Config, Interface, SocketSet, SocketStorage};
use smoltcp::phy::{self, Checksum, Device, DeviceCapabilities, Medium};
use smoltcp::socket::{icmp, tcp};
use smoltcp::time::Instant;
use smoltcp::wire::{
    EthernetAddress, HardwareAddress, Icmpv4Packet, Icmpv4Repr, IpAddress, IpCidr, Ipv4Address,
};

pub const EXIT_NET_SETUP: u32 = 8;
pub const EXIT_PING: u32 = 9;
pub const EXIT_RR: u32 = 10;

/// Where the driver puts BARs that firmware left unassigned.
const DEFAULT_IO_BASE: u64 = 0xc000;
const DEFAULT_MMIO_BASE: u64 = 0xfebf_0000;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum NicSel {
    Auto,
    C,
    CPlus,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum IoSel {
    Pio,
    Mmio,
}

/// Settings collected from the whole command line before any word runs.
#[derive(Clone, Copy)]
pub struct NetArgs {
    pub ip: Option<(Ipv4Address, u8)>,
    pub peer: Option<Ipv4Address>,
    pub count: u32,
    pub port: u16,
    pub secs: u32,
    /// `trans=N`: `rr` stops after N transactions (`secs` still bounds it), so a
    /// test checks a known amount of work whatever the machine's speed.
    pub trans: Option<u64>,
    /// `tests=N`: how many netperf runs `netserver` serves before it ends.
    pub tests: u32,
    pub nic: NicSel,
    pub io: IoSel,
    /// `nicbars=assign`: program our own BAR addresses even when firmware
    /// assigned some (exercises the sizing/assignment path).
    pub force_bars: bool,
    /// `nicrx=cbr|nowrap`: C-mode RX variants (`rtl8139::RxOpts`).
    pub rx: rtl8139::RxOpts,
    /// `nicdrv=lean|linux|linux-irq`: the data path's register sequence (`rtl8139::Shape`).
    pub shape: rtl8139::Shape,
    /// `csum=offload|soft`: in C+ mode, IPv4/TCP/UDP checksums of sent frames by the
    /// chip (default, as 8139cp) or by smoltcp. C mode has no offload.
    pub tx_csum_offload: bool,
    /// Set by `soak` per round: BAR0 (I/O) and BAR1 (memory) addresses to
    /// program whatever is there (moving the BARs of a running device).
    pub bars: Option<(u64, u64)>,
}

impl NetArgs {
    pub const fn new() -> Self {
        NetArgs {
            ip: None,
            peer: None,
            count: 3,
            port: 7777,
            secs: 3,
            trans: None,
            tests: 1,
            nic: NicSel::Auto,
            io: IoSel::Pio,
            force_bars: false,
            rx: rtl8139::RxOpts {
                cbr_only: false,
                no_wrap: false,
            },
            shape: rtl8139::Shape::Lean,
            tx_csum_offload: true,
            bars: None,
        }
    }

    /// Takes a `name=value` setting; Ok(false) if `name` is not one,
    /// Err(message) if the value is bad.
    pub fn set(&mut self, name: &str, v: &str) -> Result<bool, &'static str> {
        match name {
            "ip" => {
                let (a, p) = v.split_once('/').unwrap_or((v, "24"));
                let addr: Ipv4Address = a.parse().map_err(|_| "bad ip address")?;
                let prefix: u8 = p.parse().map_err(|_| "bad prefix")?;
                if prefix > 32 {
                    return Err("bad prefix");
                }
                self.ip = Some((addr, prefix));
            }
            "peer" => self.peer = Some(v.parse().map_err(|_| "bad peer address")?),
            "count" => {
                self.count = match parse_num(v) {
                    Some(n) if (1..=1000).contains(&n) => n as u32,
                    _ => return Err("bad count (1..1000)"),
                }
            }
            "port" => {
                self.port = match parse_num(v) {
                    Some(n) if (1..=65535).contains(&n) => n as u16,
                    _ => return Err("bad port"),
                }
            }
            "secs" => {
                self.secs = match parse_num(v) {
                    Some(n) if (1..=600).contains(&n) => n as u32,
                    _ => return Err("bad secs (1..600)"),
                }
            }
            "trans" => {
                self.trans = match parse_num(v) {
                    Some(n) if (1..=100_000_000).contains(&n) => Some(n),
                    _ => return Err("bad trans (1..100000000)"),
                }
            }
            "tests" => {
                self.tests = match parse_num(v) {
                    Some(n) if (1..=1000).contains(&n) => n as u32,
                    _ => return Err("bad tests (1..1000)"),
                }
            }
            "nic" => {
                self.nic = match v {
                    "auto" => NicSel::Auto,
                    "c" => NicSel::C,
                    "cplus" => NicSel::CPlus,
                    _ => return Err("bad nic (c, cplus, auto)"),
                }
            }
            "nicio" => {
                self.io = match v {
                    "pio" => IoSel::Pio,
                    "mmio" => IoSel::Mmio,
                    _ => return Err("bad nicio (pio, mmio)"),
                }
            }
            "nicbars" => {
                self.force_bars = match v {
                    "firmware" => false,
                    "assign" => true,
                    _ => return Err("bad nicbars (firmware, assign)"),
                }
            }
            "csum" => {
                self.tx_csum_offload = match v {
                    "offload" => true,
                    "soft" => false,
                    _ => return Err("bad csum (offload, soft)"),
                }
            }
            "nicdrv" => {
                self.shape = match v {
                    "lean" => rtl8139::Shape::Lean,
                    "linux" => rtl8139::Shape::Linux,
                    "linux-irq" => rtl8139::Shape::LinuxIrq,
                    _ => return Err("bad nicdrv (lean, linux, linux-irq)"),
                }
            }
            "nicrx" => {
                let mut o = rtl8139::RxOpts::default();
                for part in v.split(',') {
                    match part {
                        "crc" | "wrap" => {}
                        "cbr" => o.cbr_only = true,
                        "nowrap" => o.no_wrap = true,
                        _ => return Err("bad nicrx (crc or cbr, wrap or nowrap)"),
                    }
                }
                self.rx = o;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

pub(crate) fn now() -> Instant {
    Instant::from_micros((tsc::ticks_to_ns(rdtsc()) / 1000) as i64)
}

fn mac_str(m: &[u8; 6]) -> MacFmt<'_> {
    MacFmt(m)
}

struct MacFmt<'a>(&'a [u8; 6]);

impl core::fmt::Display for MacFmt<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Finds the RTL8139, assigns BARs if needed, enables decoding and bus
/// mastering, and brings the chip up. Prints the `pci:` and `net:` lines.
pub fn bring_up(args: &NetArgs) -> Result<Nic, ()> {
    let Some(f) = pci::find(0x10ec, 0x8139) else {
        println!("net: no RTL8139 (10ec:8139) on PCI bus 0");
        return Err(());
    };
    let bdf: Bdf = f.bdf;
    // Decoding off while sizing/assigning BARs.
    let cmd = (bdf.read32(0x04) & 0xffff) as u16;
    bdf.write32(0x04, (cmd & !(pci::CMD_IO | pci::CMD_MEMORY)) as u32);
    let mut bar0 = pci::read_bar(bdf, 0);
    let mut bar1 = pci::read_bar(bdf, 1);
    let (io_base, mmio_base) = args.bars.unwrap_or((DEFAULT_IO_BASE, DEFAULT_MMIO_BASE));
    let force = args.force_bars || args.bars.is_some();
    if bar0.io && (bar0.base == 0 || force) {
        pci::write_bar(bdf, 0, io_base);
        bar0.base = io_base;
    }
    if !bar1.io && (bar1.base == 0 || force) {
        pci::write_bar(bdf, 1, mmio_base);
        bar1.base = mmio_base;
    }
    // INTx off as well unless the driver takes the interrupt: it polls, and
    // on PVM hosts CPL3 runs with interrupts effectively enabled (IMR = 0 also
    // keeps the chip quiet).
    let takes_irq = args.shape == rtl8139::Shape::LinuxIrq;
    bdf.set_command_bits(
        pci::CMD_IO
            | pci::CMD_MEMORY
            | pci::CMD_BUS_MASTER
            | if takes_irq { 0 } else { pci::CMD_INTX_DISABLE },
    );
    if takes_irq {
        bdf.clear_command_bits(pci::CMD_INTX_DISABLE);
    }
    println!(
        "pci: {:02x}:{:02x}.{} {:04x}:{:04x} rev 0x{:02x} io=0x{:04x} mmio=0x{:08x}",
        bdf.bus, bdf.dev, bdf.func, f.vendor, f.device, f.revision, bar0.base, bar1.base
    );
    if !bar0.io || bar1.io {
        println!("net: unexpected BAR layout (BAR0 must be I/O, BAR1 memory)");
        return Err(());
    }
    let mode = match args.nic {
        NicSel::C => Mode::C,
        NicSel::CPlus => Mode::CPlus,
        // As Linux: 8139cp for revision >= 0x20, else 8139too.
        NicSel::Auto if f.revision >= 0x20 => Mode::CPlus,
        NicSel::Auto => Mode::C,
    };
    let bus = match args.io {
        IoSel::Pio => {
            if bar0.base > 0xffff - 0xff {
                println!("net: I/O BAR 0x{:x} out of port range", bar0.base);
                return Err(());
            }
            Bus::Pio(bar0.base as u16)
        }
        IoSel::Mmio => {
            if !paging::ensure_identity_mapped(bar1.base, bar1.base + 0x100, true) {
                println!("net: MMIO BAR 0x{:x} not mappable", bar1.base);
                return Err(());
            }
            Bus::Mmio(bar1.base)
        }
    };
    if takes_irq {
        let Some(route) = nicirq::route(bdf) else {
            println!("net: no INTx route for the NIC (no MP table entry, no PCI interrupt line)");
            return Err(());
        };
        let lapic = nicirq::arm(bus, rtl8139::irq_masks(mode), &route);
        let pin = (bdf.read32(0x3c) >> 8) & 0xff;
        println!(
            "net: intx INT{} -> ioapic 0x{:x} pin {} ({}, {}, from the {}) vector 0x{:x} lapic 0x{:x}",
            (b'A' + (pin as u8).saturating_sub(1)) as char,
            route.ioapic,
            route.pin,
            if route.level { "level" } else { "edge" },
            if route.active_low { "active low" } else { "active high" },
            route.source,
            nicirq::NIC_VECTOR,
            lapic
        );
    }
    let mut nic = match Nic::init(bus, mode, args.rx, args.shape) {
        Ok(n) => n,
        Err(e) => {
            println!("net: init failed: {:?}", e);
            return Err(());
        }
    };
    println!(
        "net: eeprom mac={} idr mac={}",
        mac_str(&nic.eeprom_mac),
        mac_str(&nic.idr_mac)
    );
    nic.set_tx_checksum_offload(args.tx_csum_offload);
    println!(
        "net: link {} mac={} mode={} io={}",
        if nic.link_up { "up" } else { "down" },
        mac_str(&nic.mac),
        mode.name(),
        bus.name()
    );
    if nic.tx_checksum_offload() {
        println!("net: tx checksums (ipv4, tcp, udp) by the chip");
    }
    if args.shape != rtl8139::Shape::Lean {
        println!(
            "net: driver shape {} ({}'s register sequence, {})",
            args.shape.name(),
            match mode {
                Mode::C => "8139too",
                Mode::CPlus => "8139cp",
            },
            if takes_irq {
                "woken by INTx"
            } else {
                "IntrStatus polled"
            }
        );
    }
    Ok(nic)
}

// ---- smoltcp device ----

pub struct RxTok(*mut Nic);
pub struct TxTok(*mut Nic);

impl phy::RxToken for RxTok {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        // SAFETY: the tokens come from `&mut Nic` and are used while that
        // borrow lasts. No reference to the Nic is held while `f` runs (it
        // may transmit through the paired TxTok): the frame is DMA memory.
        unsafe {
            let frame = (*self.0).rx_frame();
            let r = f(frame);
            (*self.0).rx_release();
            r
        }
    }
}

impl phy::TxToken for TxTok {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        unsafe { (*self.0).transmit(len, f) }
    }
}

impl Device for Nic {
    type RxToken<'a> = RxTok;
    type TxToken<'a> = TxTok;

    fn receive(&mut self, _t: Instant) -> Option<(RxTok, TxTok)> {
        if self.rx_peek() {
            let p = self as *mut Nic;
            Some((RxTok(p), TxTok(p)))
        } else {
            None
        }
    }

    fn transmit(&mut self, _t: Instant) -> Option<TxTok> {
        // Called only when smoltcp has a frame to send; `transmit` waits
        // (bounded) for a buffer, so always hand out a token.
        Some(TxTok(self as *mut Nic))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = rtl8139::MAX_FRAME;
        // smoltcp clamps the TCP window it advertises to this many segments.
        // One segment (smoltcp's default) let a bulk sender have a single
        // segment in flight per round trip (~1.5 MB/s on any VMM); 16 x 1460
        // bytes still fit the C-mode 32 KiB RX ring and the 64 C+ RX
        // descriptors, so the peer cannot push past what the NIC buffers.
        caps.max_burst_size = Some(16);
        if self.tx_checksum_offload() {
            // Verify what arrives, compute nothing that leaves: the chip fills the
            // IPv4, TCP and UDP sums (ICMP's stays smoltcp's).
            caps.checksum.ipv4 = Checksum::Rx;
            caps.checksum.tcp = Checksum::Rx;
            caps.checksum.udp = Checksum::Rx;
        }
        caps
    }
}

// Socket memory (no allocator).
static SOCKETS: Global<[SocketStorage<'static>; 2]> = Global::new([SocketStorage::EMPTY; 2]);
static ICMP_RX_META: Global<[icmp::PacketMetadata; 8]> =
    Global::new([icmp::PacketMetadata::EMPTY; 8]);
static ICMP_TX_META: Global<[icmp::PacketMetadata; 8]> =
    Global::new([icmp::PacketMetadata::EMPTY; 8]);
static ICMP_RX: Global<[u8; 2048]> = Global::new([0; 2048]);
static ICMP_TX: Global<[u8; 2048]> = Global::new([0; 2048]);
static TCP_RX: Global<[u8; 4096]> = Global::new([0; 4096]);
static TCP_TX: Global<[u8; 4096]> = Global::new([0; 4096]);

/// A static buffer as a slice. Each is taken by one socket of one net
/// word (one CPU, words run one after another).
#[allow(clippy::mut_from_ref)]
pub(crate) fn buf<T, const N: usize>(g: &'static Global<[T; N]>) -> &'static mut [T] {
    // SAFETY: see above; no other reference to the buffer is live.
    unsafe { &mut *g.get() }
}

pub(crate) fn make_iface(nic: &mut Nic, args: &NetArgs, cmd: &str) -> Result<Interface, ()> {
    let Some((ip, prefix)) = args.ip else {
        println!("{}: need ip=ADDR/PREFIX", cmd);
        return Err(());
    };
    let mut cfg = Config::new(HardwareAddress::Ethernet(EthernetAddress(nic.mac)));
    cfg.random_seed = rdtsc();
    let mut iface = Interface::new(cfg, nic, now());
    iface.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(IpAddress::Ipv4(ip), prefix));
    });
    Ok(iface)
}

pub(crate) fn take_sockets() -> SocketSet<'static> {
    let storage = buf(&SOCKETS);
    storage.fill_with(|| SocketStorage::EMPTY);
    SocketSet::new(storage)
}

/// `net=up`: bring the NIC up and print the lines; nothing else.
pub fn up(args: &NetArgs) -> u32 {
    match bring_up(args) {
        Ok(_) => 0,
        Err(()) => EXIT_NET_SETUP,
    }
}

/// The two BAR placements `soak` alternates between.
const SOAK_BARS: [(u64, u64); 2] = [(DEFAULT_IO_BASE, DEFAULT_MMIO_BASE), (0xc100, 0xfebe_0000)];

/// `soak=SECS`: rounds until SECS have passed, each a `ping` and an `rr` (with
/// the line's settings; `trans=` keeps a round short), and each of those brings
/// the NIC up afresh (chip reset, full init) with its BARs moved to the other
/// of two placements. A failed round is counted, not fatal: the host floods
/// the guest and deletes its tap under it. One line per round, then
/// `soak: R rounds in S s: ping ok P, rr ok T, failed F`.
pub fn soak(args: &NetArgs, secs: u64) -> u32 {
    let deadline = tsc::Deadline::after_ns(secs.saturating_mul(1_000_000_000));
    let mut a = *args;
    let (mut rounds, mut ping_ok, mut rr_ok, mut failed) = (0u64, 0u64, 0u64, 0u64);
    while !deadline.expired() {
        a.bars = Some(SOAK_BARS[(rounds % 2) as usize]);
        let p = ping(&a);
        let r = rr(&a);
        ping_ok += (p == 0) as u64;
        rr_ok += (r == 0) as u64;
        failed += (p != 0) as u64 + (r != 0) as u64;
        println!(
            "soak: round {} ping={} rr={}",
            rounds,
            if p == 0 { "ok" } else { "failed" },
            if r == 0 { "ok" } else { "failed" }
        );
        rounds += 1;
    }
    println!(
        "soak: {} rounds in {} s: ping ok {}, rr ok {}, failed {}",
        rounds, secs, ping_ok, rr_ok, failed
    );
    0
}

/// `dmatx=GPA,LEN,MAILBOX`: C-mode transmits of LEN bytes the chip reads at
/// GPA (memory the host adds and removes under the guest), one after another,
/// until the u64 at MAILBOX (guest RAM) is non-zero. Prints a line each time
/// the outcome changes (`dmatx: sent from attempt N`, `dmatx: failing from
/// attempt N`) and keeps the attempt count in the u64 at MAILBOX + 8 for the
/// host. Bounded by 10 minutes and 100 M attempts.
pub fn dma_tx(args: &NetArgs, gpa: u64, len: u64, mailbox: u64) -> u32 {
    if len == 0 || len > 1792 || gpa.checked_add(len).is_none_or(|e| e > 1 << 32) {
        println!("dmatx: bad GPA/LEN (1..1792 bytes below 4 GiB)");
        return EXIT_NET_SETUP;
    }
    if !mailbox.is_multiple_of(8) || mailbox >= 1 << 32 {
        println!("dmatx: bad MAILBOX (8-aligned, below 4 GiB)");
        return EXIT_NET_SETUP;
    }
    let Ok(mut nic) = bring_up(args) else {
        return EXIT_NET_SETUP;
    };
    if nic.mode != Mode::C {
        println!("dmatx: needs nic=c");
        return EXIT_NET_SETUP;
    }
    let stop = mailbox as *const u64;
    let progress = (mailbox + 8) as *mut u64;
    println!(
        "dmatx: sending {} bytes from 0x{:x} until 0x{:x} is set",
        len, gpa, mailbox
    );
    let deadline = tsc::Deadline::after_ns(600_000_000_000);
    let (mut sent, mut failed, mut silent, mut n) = (0u64, 0u64, 0u64, 0u64);
    let mut last = None;
    // SAFETY: MAILBOX is guest RAM below 4 GiB, identity-mapped; only the host
    // writes the first word, only we the second.
    while unsafe { core::ptr::read_volatile(stop) } == 0 && !deadline.expired() && n < 100_000_000 {
        let outcome = nic.tx_raw(gpa as u32, len as u32);
        match outcome {
            rtl8139::RawTx::Sent => sent += 1,
            rtl8139::RawTx::Failed => failed += 1,
            rtl8139::RawTx::NoAnswer => silent += 1,
        }
        if outcome != rtl8139::RawTx::NoAnswer && last != Some(outcome) {
            let what = if outcome == rtl8139::RawTx::Sent {
                "sent"
            } else {
                "failing"
            };
            println!("dmatx: {} from attempt {}", what, n);
            last = Some(outcome);
        }
        n += 1;
        unsafe { core::ptr::write_volatile(progress, n) };
    }
    println!(
        "dmatx: stopped after {} attempts: sent={} failed={} unanswered={}",
        n, sent, failed, silent
    );
    if deadline.expired() {
        println!("dmatx: timeout");
        return crate::commands::EXIT_TIMEOUT;
    }
    0
}

/// `net=ping`: ICMP echo to `peer`, `count` times, ~1 s apart at most.
pub fn ping(args: &NetArgs) -> u32 {
    let Some(peer) = args.peer else {
        println!("ping: need peer=IP");
        return EXIT_NET_SETUP;
    };
    let Ok(mut nic) = bring_up(args) else {
        return EXIT_NET_SETUP;
    };
    let Ok(mut iface) = make_iface(&mut nic, args, "ping") else {
        return EXIT_NET_SETUP;
    };
    let mut sockets = take_sockets();
    let sock = icmp::Socket::new(
        icmp::PacketBuffer::new(buf(&ICMP_RX_META), buf(&ICMP_RX)),
        icmp::PacketBuffer::new(buf(&ICMP_TX_META), buf(&ICMP_TX)),
    );
    let h = sockets.add(sock);
    let ident: u16 = 0x7762; // "wb"
    sockets
        .get_mut::<icmp::Socket>(h)
        .bind(icmp::Endpoint::Ident(ident))
        .ok();
    let caps = nic.capabilities();
    let payload = *b"wbvmm testguest ping payload....";
    let total = tsc::Deadline::after_ns(10_000_000_000);
    let (mut sent, mut received) = (0u32, 0u32);
    let (mut min_us, mut max_us, mut sum_us) = (u64::MAX, 0u64, 0u64);
    let mut seq: u16 = 0;
    'outer: while (seq as u32) < args.count {
        // Send one echo request.
        let t_send = rdtsc();
        {
            let s = sockets.get_mut::<icmp::Socket>(h);
            let repr = Icmpv4Repr::EchoRequest {
                ident,
                seq_no: seq,
                data: &payload,
            };
            match s.send(repr.buffer_len(), IpAddress::Ipv4(peer)) {
                Ok(buf) => {
                    let mut pkt = Icmpv4Packet::new_unchecked(buf);
                    repr.emit(&mut pkt, &caps.checksum);
                }
                Err(_) => {
                    println!("ping: socket send failed");
                    break;
                }
            }
        }
        sent += 1;
        // Wait up to 2 s for its reply (the first includes ARP).
        let wait = tsc::Deadline::after_ns(2_000_000_000);
        loop {
            iface.poll(now(), &mut nic, &mut sockets);
            let s = sockets.get_mut::<icmp::Socket>(h);
            let mut got = false;
            while let Ok((data, from)) = s.recv() {
                let Ok(pkt) = Icmpv4Packet::new_checked(data) else {
                    continue;
                };
                if let Ok(Icmpv4Repr::EchoReply {
                    ident: id, seq_no, ..
                }) = Icmpv4Repr::parse(&pkt, &caps.checksum)
                {
                    if id == ident && seq_no == seq && from == IpAddress::Ipv4(peer) {
                        let us = tsc::ticks_to_ns(rdtsc() - t_send) / 1000;
                        println!("ping: reply from {} seq={} time={} us", peer, seq, us);
                        received += 1;
                        min_us = min_us.min(us);
                        max_us = max_us.max(us);
                        sum_us += us;
                        got = true;
                    }
                }
            }
            if got {
                break;
            }
            if total.expired() {
                println!("ping: timeout (10 s)");
                break 'outer;
            }
            if wait.expired() {
                println!("ping: no reply from {} seq={}", peer, seq);
                break;
            }
        }
        seq += 1;
    }
    if received > 0 {
        println!(
            "ping: {} sent, {} received, time min/avg/max = {}/{}/{} us",
            sent,
            received,
            min_us,
            sum_us / received as u64,
            max_us
        );
    } else {
        println!("ping: {} sent, 0 received", sent);
    }
    print_nic_stats(&nic, "ping");
    if received > 0 {
        0
    } else {
        EXIT_PING
    }
}

pub(crate) fn print_nic_stats(nic: &Nic, who: &str) {
    let s = &nic.stats;
    if nic.shape == rtl8139::Shape::LinuxIrq {
        let h = nicirq::shared();
        println!(
            "{}: nic irqs={} spurious={} idle={} irq_events={} napi_polls={}",
            who,
            h.taken.load(core::sync::atomic::Ordering::Relaxed),
            h.spurious.load(core::sync::atomic::Ordering::Relaxed),
            h.idle.load(core::sync::atomic::Ordering::Relaxed),
            s.irq_events,
            s.napi_polls
        );
    } else if s.irq_events > 0 {
        println!(
            "{}: nic irq_events={} napi_polls={}",
            who, s.irq_events, s.napi_polls
        );
    }
    println!(
        "{}: nic tx={} rx={} reg_reads={} reg_writes={} rx_cbr_reads={} tx_dropped={} rx_resets={} rx_split={} tx_csum_offloaded={}",
        who,
        s.tx_frames,
        s.rx_frames,
        nic.reg_reads(),
        nic.reg_writes(),
        s.rx_cbr_reads,
        s.tx_dropped,
        s.rx_resets,
        s.rx_split,
        s.tx_csum_offloaded
    );
}

/// `net=rr`: TCP connect to `peer:port`, then 1-byte request/response
/// transactions for `secs` seconds.
pub fn rr(args: &NetArgs) -> u32 {
    let Some(peer) = args.peer else {
        println!("rr: need peer=IP");
        return EXIT_NET_SETUP;
    };
    let Ok(mut nic) = bring_up(args) else {
        return EXIT_NET_SETUP;
    };
    let Ok(mut iface) = make_iface(&mut nic, args, "rr") else {
        return EXIT_NET_SETUP;
    };
    let mut sockets = take_sockets();
    let mut sock = tcp::Socket::new(
        tcp::SocketBuffer::new(buf(&TCP_RX)),
        tcp::SocketBuffer::new(buf(&TCP_TX)),
    );
    sock.set_nagle_enabled(false);
    let h = sockets.add(sock);
    let local_port = 49152 + (rdtsc() % 16384) as u16;
    let remote = (IpAddress::Ipv4(peer), args.port);
    if let Err(e) = sockets
        .get_mut::<tcp::Socket>(h)
        .connect(iface.context(), remote, local_port)
    {
        println!("rr: connect to {}:{} failed: {:?}", peer, args.port, e);
        return EXIT_RR;
    }
    // Connect, bounded: 5 s (the first SYN waits for ARP).
    let t_connect = rdtsc();
    let deadline = tsc::Deadline::after_ns(5_000_000_000);
    loop {
        iface.poll(now(), &mut nic, &mut sockets);
        let s = sockets.get_mut::<tcp::Socket>(h);
        match s.state() {
            tcp::State::Established => break,
            tcp::State::Closed => {
                println!(
                    "rr: connect to {}:{} failed: refused or reset",
                    peer, args.port
                );
                return EXIT_RR;
            }
            _ => {}
        }
        if deadline.expired() {
            println!(
                "rr: connect to {}:{} failed: timeout (5 s)",
                peer, args.port
            );
            return EXIT_RR;
        }
    }
    println!(
        "rr: connected to {}:{} from port {} in {} us",
        peer,
        args.port,
        local_port,
        tsc::ticks_to_ns(rdtsc() - t_connect) / 1000
    );

    let (reads0, writes0) = (nic.reg_reads(), nic.reg_writes());
    let (tx0, rx0) = (nic.stats.tx_frames, nic.stats.rx_frames);
    let t0 = rdtsc();
    let end = t0 + tsc::ns_to_ticks(args.secs as u64 * 1_000_000_000);
    let stall = tsc::ns_to_ticks(2_000_000_000);
    let mut last_progress = t0;
    let mut count: u64 = 0;
    let mut outstanding = false;
    let mut failure: Option<&str> = None;
    let wanted = args.trans.unwrap_or(u64::MAX);
    loop {
        let t = rdtsc();
        if !outstanding && (t >= end || count >= wanted) {
            break;
        }
        iface.poll(now(), &mut nic, &mut sockets);
        let s = sockets.get_mut::<tcp::Socket>(h);
        if outstanding && s.can_recv() {
            let mut b = [0u8; 64];
            if let Ok(n) = s.recv_slice(&mut b) {
                if n > 0 {
                    count += n as u64;
                    outstanding = false;
                    last_progress = t;
                }
            }
        }
        if !outstanding && t < end && count < wanted && s.can_send() && s.send_slice(b"x") == Ok(1)
        {
            outstanding = true;
        }
        if s.state() != tcp::State::Established {
            failure = Some("connection closed by peer");
            break;
        }
        if t.wrapping_sub(last_progress) > stall {
            failure = Some("no reply for 2 s");
            break;
        }
    }
    let ns = tsc::ticks_to_ns(rdtsc() - t0).max(1);
    let (reads, writes) = (nic.reg_reads() - reads0, nic.reg_writes() - writes0);
    let (txf, rxf) = (nic.stats.tx_frames - tx0, nic.stats.rx_frames - rx0);

    // Close politely, bounded (500 ms).
    sockets.get_mut::<tcp::Socket>(h).close();
    let deadline = tsc::Deadline::after_ns(500_000_000);
    while !deadline.expired() {
        iface.poll(now(), &mut nic, &mut sockets);
        let st = sockets.get_mut::<tcp::Socket>(h).state();
        if matches!(st, tcp::State::Closed | tcp::State::TimeWait) {
            break;
        }
    }

    if let Some(why) = failure {
        println!("rr: failed after {} transactions: {}", count, why);
        print_nic_stats(&nic, "rr");
        return EXIT_RR;
    }
    let per_s_x10 = count as u128 * 10_000_000_000 / ns as u128;
    let c = count.max(1);
    println!(
        "rr: per transaction: {}.{:02} register reads, {}.{:02} register writes, {}.{:02} tx frames, {}.{:02} rx frames",
        reads / c,
        reads * 100 / c % 100,
        writes / c,
        writes * 100 / c % 100,
        txf / c,
        txf * 100 / c % 100,
        rxf / c,
        rxf * 100 / c % 100
    );
    print_nic_stats(&nic, "rr");
    if args.trans.is_some() {
        // A counted run: the time is what it took, not what was asked.
        let ms = ns / 1_000_000;
        println!(
            "rr: {} transactions in {}.{:03} s = {}.{} trans/s",
            count,
            ms / 1000,
            ms % 1000,
            per_s_x10 / 10,
            per_s_x10 % 10
        );
    } else {
        println!(
            "rr: {} transactions in {} s = {}.{} trans/s",
            count,
            args.secs,
            per_s_x10 / 10,
            per_s_x10 % 10
        );
    }
    0
}

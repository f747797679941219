//! `net=netserver`: a responder for netperf 2.7's control protocol, so that
//! the host's unmodified `netperf -H GUEST -t TCP_RR` (or `-t TCP_STREAM`)
//! measures the guest, the NIC and the VMM below it.
//!
//! What netperf 2.7.0 (built with omni and migration, as Debian's is) does,
//! read from its `netlib.c` / `nettest_omni.c` / `nettest_bsd.h` and checked
//! against the host's `netperf` and `netserver` on loopback:
//!
//! - One TCP control connection to port 12865. Every message either way is
//!   656 bytes (`union netperf_request_struct`: `int type, int dummy,
//!   int test_specific_data[162]`, padded to a double). No version or
//!   hello exchange precedes the request.
//! - Byte order: the sender `htonl`s the two header ints and the first N
//!   ints of the test data (N = 38 for the omni request, 18 for its
//!   response, 27 for its results); floats are passed as their 32-bit
//!   patterns through the same `htonl`; strings after the cutoff are raw.
//! - Request `DO_OMNI` (97): sizes, `test_length` (> 0: seconds, < 0:
//!   minus a transaction count), `data_port` (0: the server picks),
//!   family/type/protocol (4 / 1 = stream / 6), `direction` as seen by the
//!   server (2 = it sends, 4 = it receives; TCP_RR is 6, TCP_STREAM 4) and
//!   `flags` (1 = no delay, 4 = connect test, 8 = measure CPU).
//! - Response `OMNI_RESPONSE` (98): `serv_errno` 0, socket sizes, and the
//!   data port to connect to (host order before the `htonl`).
//! - The client then connects the data connection, runs the test, and at
//!   its end `shutdown(SHUT_WR)`s the data connection and waits for the
//!   server to close its side (a read of 0), then reads `OMNI_RESULTS` (99)
//!   (bytes and calls each way, transactions, elapsed time; netperf
//!   reports its *own* counts and time, the server's are informational),
//!   then `shutdown(SHUT_WR)`s the control connection and waits for the
//!   server's close. The client does not check the results' type word
//!   (netserver 2.7 itself sends it byte-swapped twice).
//!
//! Everything polls, like the other net words; every wait is bounded.

use crate::io::rdtsc;
use crate::net::{self, NetArgs};
use crate::rtl8139::Nic;
use crate::{println, tsc, Global};
use smoltcp::iface::{Interface, SocketHandle, SocketSet, SocketStorage};
use smoltcp::socket::tcp;

pub const EXIT_NETSERVER: u32 = 11;

/// netperf's control port (`netserver -p` default).
pub const CONTROL_PORT: u16 = 12865;
/// The data port when the request leaves it to the server; one more per test
/// so that a closing connection of the previous test is never in the way.
const DATA_PORT_BASE: u16 = 12866;

const MSG_LEN: usize = 656;
const HEADER_INTS: usize = 2;

const DO_OMNI: i32 = 97;
const OMNI_RESPONSE: i32 = 98;
const OMNI_RESULTS: i32 = 99;

// Request, test-specific int indexes (struct omni_request_struct).
const RQ_REQUEST_SIZE: usize = 5;
const RQ_RESPONSE_SIZE: usize = 11;
const RQ_FLAGS: usize = 12;
const RQ_TEST_LENGTH: usize = 14;
const RQ_DATA_PORT: usize = 20;
const RQ_IPFAMILY: usize = 21;
const RQ_SOCKET_TYPE: usize = 22;
const RQ_PROTOCOL: usize = 23;
const RQ_DIRECTION: usize = 24;

// Response (struct omni_response_struct); 18 ints are byte-swapped.
const RS_RECV_BUF_SIZE: usize = 0;
const RS_RECEIVE_SIZE: usize = 1;
const RS_RECV_WIDTH: usize = 2;
const RS_SEND_BUF_SIZE: usize = 3;
const RS_SEND_SIZE: usize = 4;
const RS_SEND_WIDTH: usize = 5;
const RS_FLAGS: usize = 6;
const RS_TEST_LENGTH: usize = 8;
const RS_DATA_PORT: usize = 11;
const RS_SOCKET_PRIO: usize = 16;
const RS_SOCKET_TOS: usize = 17;
const RESPONSE_CONV_INTS: usize = 18;

// Results (struct omni_results_struct); 27 ints are byte-swapped.
const RR_BYTES_RECEIVED_HI: usize = 0;
const RR_BYTES_RECEIVED_LO: usize = 1;
const RR_RECV_CALLS: usize = 2;
const RR_RECV_BUF_SIZE: usize = 3;
const RR_BYTES_SENT_HI: usize = 4;
const RR_BYTES_SENT_LO: usize = 5;
const RR_SEND_CALLS: usize = 6;
const RR_SEND_BUF_SIZE: usize = 7;
const RR_TRANS_RECEIVED: usize = 9;
const RR_ELAPSED_TIME: usize = 10;
const RR_CPU_UTIL: usize = 11;
const RR_SERV_DEM: usize = 17;
const RR_NUM_CPUS: usize = 19;
const RR_PEAK_CPU_ID: usize = 20;
const RR_PEAK_CPU_UTIL: usize = 21;
const RESULTS_CONV_INTS: usize = 27;

const NETPERF_XMIT: u32 = 2;
const NETPERF_RECV: u32 = 4;
const NF_INET: u32 = 4;
const NST_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const OMNI_NO_DELAY: u32 = 0x1;
const OMNI_CONNECT_TEST: u32 = 0x4;
const OMNI_MEASURE_CPU: u32 = 0x8;
/// Linux's EOPNOTSUPP, what netperf prints after "remote error".
const EOPNOTSUPP: i32 = 95;

/// How long the word waits for each control connection and, once one is
/// there, for each message on it. A bound for a broken run only.
const CONTROL_WAIT_NS: u64 = 60_000_000_000;
/// No data for this long in a running test ends it as a stall (netperf
/// itself gives up after 120 s without a response).
const STALL_NS: u64 = 10_000_000_000;
/// netserver runs a timed test's loop for `test_length` plus this pad.
const PAD_SECS: u64 = 4;
/// The largest request/response netperf allows (MAXMESSAGESIZE).
const MAX_MESSAGE: u32 = 65536;

static SOCKETS: Global<[SocketStorage<'static>; 3]> = Global::new([SocketStorage::EMPTY; 3]);
static CTRL_RX: [Global<[u8; 2048]>; 2] = [Global::new([0; 2048]), Global::new([0; 2048])];
static CTRL_TX: [Global<[u8; 2048]>; 2] = [Global::new([0; 2048]), Global::new([0; 2048])];
// 32 KiB of window: no more than the C-mode RX ring holds, so a bulk sender
// cannot overrun the ring before the driver has drained it.
const DATA_RX_LEN: usize = 32768;
const DATA_TX_LEN: usize = 16384;
static DATA_RX: Global<[u8; DATA_RX_LEN]> = Global::new([0; DATA_RX_LEN]);
static DATA_TX: Global<[u8; DATA_TX_LEN]> = Global::new([0; DATA_TX_LEN]);

fn get_be(msg: &[u8; MSG_LEN], test_int: usize) -> u32 {
    let o = (HEADER_INTS + test_int) * 4;
    u32::from_be_bytes([msg[o], msg[o + 1], msg[o + 2], msg[o + 3]])
}

fn put_be(msg: &mut [u8; MSG_LEN], test_int: usize, v: u32) {
    let o = (HEADER_INTS + test_int) * 4;
    msg[o..o + 4].copy_from_slice(&v.to_be_bytes());
}

fn header(kind: i32, errno: i32) -> [u8; MSG_LEN] {
    let mut m = [0u8; MSG_LEN];
    m[0..4].copy_from_slice(&kind.to_be_bytes());
    m[4..8].copy_from_slice(&errno.to_be_bytes());
    m
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// TCP_RR: the server receives requests and sends responses.
    Rr,
    /// TCP_STREAM: the server only receives.
    Stream,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Rr => "TCP_RR",
            Kind::Stream => "TCP_STREAM",
        }
    }
}

/// A DO_OMNI request, decoded.
struct Request {
    kind: Kind,
    request_size: u32,
    response_size: u32,
    /// > 0: seconds; < 0: minus a transaction count (the client ends it).
    test_length: i32,
    data_port: u16,
    no_delay: bool,
}

/// Decodes a DO_OMNI request; Err(reason) for what this responder does not
/// serve (the client is then told EOPNOTSUPP).
fn decode(msg: &[u8; MSG_LEN]) -> Result<Request, &'static str> {
    let flags = get_be(msg, RQ_FLAGS);
    if get_be(msg, RQ_IPFAMILY) != NF_INET
        || get_be(msg, RQ_SOCKET_TYPE) != NST_STREAM
        || get_be(msg, RQ_PROTOCOL) != IPPROTO_TCP
    {
        return Err("only TCP over IPv4");
    }
    if flags & OMNI_CONNECT_TEST != 0 {
        return Err("no connect tests (TCP_CRR, TCP_CC)");
    }
    if flags & OMNI_MEASURE_CPU != 0 {
        return Err("no remote CPU measurement (-c/-C)");
    }
    let kind = match get_be(msg, RQ_DIRECTION) {
        d if d == NETPERF_XMIT | NETPERF_RECV => Kind::Rr,
        NETPERF_RECV => Kind::Stream,
        _ => return Err("only TCP_RR and TCP_STREAM"),
    };
    let request_size = get_be(msg, RQ_REQUEST_SIZE);
    let response_size = get_be(msg, RQ_RESPONSE_SIZE);
    if kind == Kind::Rr
        && !((1..=MAX_MESSAGE).contains(&request_size)
            && (1..=MAX_MESSAGE).contains(&response_size))
    {
        return Err("request and response sizes must be 1..65536");
    }
    let data_port = match get_be(msg, RQ_DATA_PORT) {
        p @ 0..=65535 => p as u16,
        _ => return Err("bad data port"),
    };
    Ok(Request {
        kind,
        request_size,
        response_size,
        test_length: get_be(msg, RQ_TEST_LENGTH) as i32,
        data_port,
        no_delay: flags & OMNI_NO_DELAY != 0,
    })
}

/// What one test's data phase did.
#[derive(Default)]
struct Counts {
    transactions: u64,
    bytes_received: u64,
    bytes_sent: u64,
    recv_calls: u64,
    send_calls: u64,
    ns: u64,
}

/// The network state of the word: one interface, a control and a data socket.
struct Server<'n> {
    nic: &'n mut Nic,
    iface: Interface,
    sockets: SocketSet<'static>,
    /// Two control sockets, both listening between tests: smoltcp has no
    /// accept backlog, and the next netperf's SYN can arrive in the same
    /// batch of frames as the last ACK of the previous control connection.
    ctrls: [SocketHandle; 2],
    /// The one carrying the current test.
    cur: usize,
    data: SocketHandle,
}

impl Server<'_> {
    fn poll(&mut self) {
        self.iface.poll(net::now(), self.nic, &mut self.sockets);
    }

    fn ctrl(&mut self) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(self.ctrls[self.cur])
    }

    /// Keeps every closed control socket listening until one has a
    /// connection; that one becomes the current one.
    fn accept_control(&mut self) -> Result<(), &'static str> {
        let deadline = tsc::Deadline::after_ns(CONTROL_WAIT_NS);
        loop {
            for i in 0..self.ctrls.len() {
                let s = self.sockets.get_mut::<tcp::Socket>(self.ctrls[i]);
                let state = s.state();
                if state == tcp::State::Closed && s.listen(CONTROL_PORT).is_err() {
                    return Err("cannot listen on the control port");
                }
                if matches!(state, tcp::State::Established | tcp::State::CloseWait) {
                    self.cur = i;
                    return Ok(());
                }
            }
            self.poll();
            if deadline.expired() {
                return Err("no control connection within 60 s");
            }
        }
    }

    fn data(&mut self) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(self.data)
    }

    /// Reads one whole 656-byte message from the control connection.
    fn read_message(&mut self) -> Result<[u8; MSG_LEN], &'static str> {
        let mut msg = [0u8; MSG_LEN];
        let mut have = 0;
        let deadline = tsc::Deadline::after_ns(CONTROL_WAIT_NS);
        while have < MSG_LEN {
            self.poll();
            let s = self.ctrl();
            if s.can_recv() {
                if let Ok(n) = s.recv_slice(&mut msg[have..]) {
                    have += n;
                    continue;
                }
            }
            if !s.may_recv() {
                return Err(if have == 0 {
                    "control connection closed"
                } else {
                    "control connection closed inside a message"
                });
            }
            if deadline.expired() {
                return Err("no message on the control connection for 60 s");
            }
        }
        Ok(msg)
    }

    /// Queues one whole message on the control connection.
    fn write_message(&mut self, msg: &[u8; MSG_LEN]) -> Result<(), &'static str> {
        let mut sent = 0;
        let deadline = tsc::Deadline::after_ns(CONTROL_WAIT_NS);
        while sent < MSG_LEN {
            let s = self.ctrl();
            if !s.may_send() {
                return Err("control connection closed while answering");
            }
            if let Ok(n) = s.send_slice(&msg[sent..]) {
                sent += n;
            }
            self.poll();
            if deadline.expired() {
                return Err("control connection stuck for 60 s while answering");
            }
        }
        Ok(())
    }

    /// Waits (bounded) until `h` is closed, so its port can listen again;
    /// aborts it when the peer does not finish the close in time.
    fn settle(&mut self, h: SocketHandle, ns: u64) {
        let deadline = tsc::Deadline::after_ns(ns);
        loop {
            self.poll();
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            if s.state() == tcp::State::Closed {
                return;
            }
            if deadline.expired() {
                s.abort();
                self.poll();
                return;
            }
        }
    }

    /// The data phase: accept the connection, then echo-serve (RR) or sink
    /// (stream) until the client closes its side.
    fn run_data(&mut self, rq: &Request) -> Result<Counts, &'static str> {
        let mut c = Counts::default();
        // Accept, bounded: netperf connects right after our response.
        let deadline = tsc::Deadline::after_ns(CONTROL_WAIT_NS);
        loop {
            self.poll();
            let st = self.data().state();
            if st != tcp::State::Listen && st != tcp::State::SynReceived {
                break;
            }
            if deadline.expired() {
                return Err("no data connection within 60 s");
            }
        }
        let t0 = rdtsc();
        let bound_ns = if rq.test_length > 0 {
            (rq.test_length as u64 + PAD_SECS) * 1_000_000_000
        } else {
            // Counted by transactions: the client ends it; the stall bound
            // and this cap end a broken one.
            600_000_000_000
        };
        let end = t0 + tsc::ns_to_ticks(bound_ns);
        let stall = tsc::ns_to_ticks(STALL_NS);
        let mut last_progress = t0;
        // RR state: bytes of the current request seen, requests complete but
        // not yet answered, bytes of the current response still to queue.
        let mut req_have: u32 = 0;
        let mut pending: u64 = 0;
        let mut rsp_left: u32 = 0;
        let (req_size, rsp_size) = (rq.request_size, rq.response_size);
        let kind = rq.kind;
        loop {
            self.poll();
            let t = rdtsc();
            let s = self.data();
            if s.can_recv() {
                let got = s
                    .recv(|b| {
                        let n = b.len();
                        (n, n)
                    })
                    .unwrap_or(0);
                if got > 0 {
                    c.recv_calls += 1;
                    c.bytes_received += got as u64;
                    last_progress = t;
                    if kind == Kind::Rr {
                        let total = req_have as u64 + got as u64;
                        pending += total / req_size as u64;
                        req_have = (total % req_size as u64) as u32;
                    }
                }
            }
            while kind == Kind::Rr && (pending > 0 || rsp_left > 0) {
                if rsp_left == 0 {
                    pending -= 1;
                    rsp_left = rsp_size;
                }
                let left = rsp_left as usize;
                let n = s
                    .send(|b| {
                        let n = b.len().min(left);
                        b[..n].fill(b'n');
                        (n, n)
                    })
                    .unwrap_or(0);
                if n == 0 {
                    break;
                }
                c.send_calls += 1;
                c.bytes_sent += n as u64;
                rsp_left -= n as u32;
                if rsp_left == 0 {
                    c.transactions += 1;
                }
            }
            // The client's shutdown(SHUT_WR) ends the test once everything it
            // asked for is answered.
            if !s.may_recv() && !s.can_recv() && pending == 0 && rsp_left == 0 {
                if !matches!(s.state(), tcp::State::CloseWait | tcp::State::Closing) {
                    return Err("data connection reset");
                }
                break;
            }
            if t >= end {
                // netserver's padded timer: end the test from our side.
                break;
            }
            if t.wrapping_sub(last_progress) > stall {
                return Err("no data for 10 s");
            }
        }
        c.ns = tsc::ticks_to_ns(rdtsc() - t0).max(1);
        // Close our side: netperf waits for this before it reads the results.
        self.data().close();
        self.poll();
        Ok(c)
    }
}

fn response(rq: &Request, port: u16) -> [u8; MSG_LEN] {
    let mut m = header(OMNI_RESPONSE, 0);
    put_be(&mut m, RS_RECV_BUF_SIZE, DATA_RX_LEN as u32);
    put_be(
        &mut m,
        RS_RECEIVE_SIZE,
        if rq.kind == Kind::Rr {
            rq.request_size
        } else {
            DATA_RX_LEN as u32
        },
    );
    put_be(&mut m, RS_RECV_WIDTH, 1);
    put_be(&mut m, RS_SEND_BUF_SIZE, DATA_TX_LEN as u32);
    put_be(&mut m, RS_SEND_SIZE, rq.response_size);
    put_be(&mut m, RS_SEND_WIDTH, 1);
    // smoltcp's Nagle is off on the data socket whatever was asked.
    put_be(&mut m, RS_FLAGS, OMNI_NO_DELAY);
    put_be(&mut m, RS_TEST_LENGTH, rq.test_length as u32);
    put_be(&mut m, RS_DATA_PORT, port as u32);
    put_be(&mut m, RS_SOCKET_PRIO, u32::MAX);
    put_be(&mut m, RS_SOCKET_TOS, u32::MAX);
    const { assert!(RS_SOCKET_TOS < RESPONSE_CONV_INTS) };
    m
}

fn results(c: &Counts) -> [u8; MSG_LEN] {
    let mut m = header(OMNI_RESULTS, 0);
    put_be(
        &mut m,
        RR_BYTES_RECEIVED_HI,
        (c.bytes_received >> 32) as u32,
    );
    put_be(&mut m, RR_BYTES_RECEIVED_LO, c.bytes_received as u32);
    put_be(&mut m, RR_RECV_CALLS, c.recv_calls as u32);
    put_be(&mut m, RR_RECV_BUF_SIZE, DATA_RX_LEN as u32);
    put_be(&mut m, RR_BYTES_SENT_HI, (c.bytes_sent >> 32) as u32);
    put_be(&mut m, RR_BYTES_SENT_LO, c.bytes_sent as u32);
    put_be(&mut m, RR_SEND_CALLS, c.send_calls as u32);
    put_be(&mut m, RR_SEND_BUF_SIZE, DATA_TX_LEN as u32);
    put_be(&mut m, RR_TRANS_RECEIVED, c.transactions as u32);
    put_be(
        &mut m,
        RR_ELAPSED_TIME,
        (c.ns as f32 / 1_000_000_000.0).to_bits(),
    );
    // Not measured: netperf shows -1 for what it was not asked to measure.
    put_be(&mut m, RR_CPU_UTIL, (-1.0f32).to_bits());
    put_be(&mut m, RR_SERV_DEM, (-1.0f32).to_bits());
    put_be(&mut m, RR_NUM_CPUS, 1);
    put_be(&mut m, RR_PEAK_CPU_ID, u32::MAX);
    put_be(&mut m, RR_PEAK_CPU_UTIL, (-1.0f32).to_bits());
    const { assert!(RR_PEAK_CPU_UTIL < RESULTS_CONV_INTS) };
    m
}

/// Prints `N.NN` for a per-transaction average of `total` over `n`.
struct Per(u64, u64);

impl core::fmt::Display for Per {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        let (t, n) = (self.0, self.1.max(1));
        write!(f, "{}.{:02}", t / n, t * 100 / n % 100)
    }
}

/// `net=netserver`: serve `tests` netperf runs on port 12865.
pub fn netserver(args: &NetArgs) -> u32 {
    let Ok(mut nic) = net::bring_up(args) else {
        return net::EXIT_NET_SETUP;
    };
    let Ok(iface) = net::make_iface(&mut nic, args, "netserver") else {
        return net::EXIT_NET_SETUP;
    };
    let storage = net::buf(&SOCKETS);
    storage.fill_with(|| SocketStorage::EMPTY);
    let mut sockets = SocketSet::new(storage);
    let mut control = |rx, tx| {
        let mut s = tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
        s.set_nagle_enabled(false);
        sockets.add(s)
    };
    let ctrls = [
        control(net::buf(&CTRL_RX[0]), net::buf(&CTRL_TX[0])),
        control(net::buf(&CTRL_RX[1]), net::buf(&CTRL_TX[1])),
    ];
    let mut data = tcp::Socket::new(
        tcp::SocketBuffer::new(net::buf(&DATA_RX)),
        tcp::SocketBuffer::new(net::buf(&DATA_TX)),
    );
    data.set_nagle_enabled(false);
    let data = sockets.add(data);
    let mut srv = Server {
        nic: &mut nic,
        iface,
        sockets,
        ctrls,
        cur: 0,
        data,
    };
    let ip = args.ip.map(|(a, _)| a);
    let mut failed = 0u32;
    for test in 0..args.tests {
        // Both control sockets listen from the first test on (see
        // `Server::ctrls`); later ones go back to listening once closed.
        if test == 0 {
            for h in ctrls {
                if srv
                    .sockets
                    .get_mut::<tcp::Socket>(h)
                    .listen(CONTROL_PORT)
                    .is_err()
                {
                    println!("netserver: cannot listen on port {}", CONTROL_PORT);
                    return EXIT_NETSERVER;
                }
            }
            if let Some(ip) = ip {
                println!(
                    "netserver: listening on {}:{} for {} netperf test(s)",
                    ip, CONTROL_PORT, args.tests
                );
            }
        }
        if let Err(why) = srv.accept_control() {
            println!("netserver: {}", why);
            return EXIT_NETSERVER;
        }
        if let Some(ep) = srv.ctrl().remote_endpoint() {
            println!("netserver: control connection from {}", ep);
        }
        if let Err(why) = serve_one(&mut srv, test) {
            println!("netserver: test {} failed: {}", test + 1, why);
            failed += 1;
            srv.data().abort();
        }
        // The client closes first (shutdown after the results); close ours.
        // The other control socket is already listening for the next test.
        srv.ctrl().close();
        srv.poll();
        srv.settle(data, 2_000_000_000);
    }
    // Let the last close finish, so the client sees our FIN.
    srv.settle(srv.ctrls[srv.cur], 2_000_000_000);
    println!(
        "netserver: served {} test(s), {} failed",
        args.tests, failed
    );
    if failed > 0 {
        EXIT_NETSERVER
    } else {
        0
    }
}

/// One control connection: the request, the data phase, the results, and the
/// client's end of the control connection.
fn serve_one(srv: &mut Server, test: u32) -> Result<(), &'static str> {
    let msg = srv.read_message()?;
    let kind = i32::from_be_bytes([msg[0], msg[1], msg[2], msg[3]]);
    if kind != DO_OMNI {
        println!(
            "netserver: request type {} is not DO_OMNI ({}): answered errno {}",
            kind, DO_OMNI, EOPNOTSUPP
        );
        srv.write_message(&header(OMNI_RESPONSE, EOPNOTSUPP))?;
        return Err("unsupported request");
    }
    let rq = match decode(&msg) {
        Ok(rq) => rq,
        Err(why) => {
            println!(
                "netserver: unsupported omni request ({}): answered errno {}",
                why, EOPNOTSUPP
            );
            srv.write_message(&header(OMNI_RESPONSE, EOPNOTSUPP))?;
            return Err("unsupported request");
        }
    };
    let port = if rq.data_port != 0 {
        rq.data_port
    } else {
        DATA_PORT_BASE + (test % 1000) as u16
    };
    // Listen before answering: netperf connects as soon as it has the port.
    if srv.data().listen(port).is_err() {
        return Err("cannot listen on the data port");
    }
    srv.write_message(&response(&rq, port))?;
    match rq.kind {
        Kind::Rr => println!(
            "netserver: {} request={} response={} length={} data port {}{}",
            rq.kind.name(),
            rq.request_size,
            rq.response_size,
            rq.test_length,
            port,
            if rq.no_delay { " nodelay" } else { "" }
        ),
        Kind::Stream => println!(
            "netserver: {} length={} data port {}",
            rq.kind.name(),
            rq.test_length,
            port
        ),
    }
    let (reads0, writes0) = (srv.nic.reg_reads(), srv.nic.reg_writes());
    let (tx0, rx0) = (srv.nic.stats.tx_frames, srv.nic.stats.rx_frames);
    let c = srv.run_data(&rq)?;
    let (reads, writes) = (srv.nic.reg_reads() - reads0, srv.nic.reg_writes() - writes0);
    let (txf, rxf) = (srv.nic.stats.tx_frames - tx0, srv.nic.stats.rx_frames - rx0);
    srv.write_message(&results(&c))?;
    // netperf reads the results, then shuts its side of the control
    // connection down and waits for ours.
    let deadline = tsc::Deadline::after_ns(CONTROL_WAIT_NS);
    loop {
        srv.poll();
        let s = srv.ctrl();
        if s.can_recv() {
            let mut sink = [0u8; 64];
            let _ = s.recv_slice(&mut sink);
        } else if !s.may_recv() {
            break;
        }
        if deadline.expired() {
            return Err("the client did not end the control connection within 60 s");
        }
    }
    let ms = c.ns / 1_000_000;
    match rq.kind {
        Kind::Rr => {
            let n = c.transactions;
            let per_s_x10 = n as u128 * 10_000_000_000 / c.ns as u128;
            println!(
                "netserver: per transaction: {} register reads, {} register writes, {} tx frames, {} rx frames",
                Per(reads, n),
                Per(writes, n),
                Per(txf, n),
                Per(rxf, n)
            );
            net::print_nic_stats(srv.nic, "netserver");
            println!(
                "netserver: TCP_RR {} transactions in {}.{:03} s = {}.{} trans/s (test {})",
                n,
                ms / 1000,
                ms % 1000,
                per_s_x10 / 10,
                per_s_x10 % 10,
                test + 1
            );
        }
        Kind::Stream => {
            // MB/s as 10^6 bytes, netperf's 10^6 bits/s beside it.
            let kb_per_s = c.bytes_received as u128 * 1_000_000 / c.ns as u128;
            net::print_nic_stats(srv.nic, "netserver");
            println!(
                "netserver: TCP_STREAM {} bytes in {}.{:03} s = {}.{:03} MB/s = {}.{:02} 10^6bits/s (test {})",
                c.bytes_received,
                ms / 1000,
                ms % 1000,
                kb_per_s / 1000,
                kb_per_s % 1000,
                kb_per_s * 8 / 1000,
                kb_per_s * 8 / 10 % 100,
                test + 1
            );
        }
    }
    Ok(())
}

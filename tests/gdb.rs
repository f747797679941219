//! Seeing where a guest is: each vCPU's RIP, CPL and kernel symbol in the SIGUSR1
//! snapshot, and the GDB remote stub (`--gdb SOCKET`) driven by a small RSP client.

mod common;
use common::*;
use std::process::Command;

/// The test guest's function symbols, read with the VMM's own reader.
fn guest_symbols() -> wbvmm::symbols::SymbolTable {
    let bytes = std::fs::read(testguest()).expect("read the test guest ELF");
    wbvmm::symbols::SymbolTable::parse(&bytes)
}

/// `hold` waits at CPL3 for a console line, polling the UART and its deadline: a
/// snapshot then finds vCPU 0 inside `testguest::commands::hold` (its read loop is
/// inlined there) or the deadline's clock read it calls (`testguest::tsc::freq`).
#[test]
fn snapshot_shows_each_vcpus_rip_cpl_and_symbol() {
    if !kvm_available("snapshot_shows_each_vcpus_rip_cpl_and_symbol") {
        return;
    }
    let syms = guest_symbols();
    let hold = syms
        .address_of("testguest::commands::hold")
        .expect("hold in the test guest's symbol table");
    let tg = testguest();
    let stats = stats_file("gdb-position");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wbvmm"));
    cmd.args(["--kernel", tg.to_str().unwrap(), "--cpus", "2"])
        .args(["--cmdline", "hold"])
        .arg(format!("--stats={}", stats.display()));
    let mut vm = Running::spawn(cmd, Some(stats.clone()));
    vm.wait_for("hold: waiting", STARTUP_DEADLINE);
    let snap = vm.snapshot();
    let vcpus = snap["vcpus"].as_array().expect("a vcpus array").clone();
    assert_eq!(vcpus.len(), 2, "{snap:#}");
    let bsp = &vcpus[0];
    assert_eq!(bsp["id"], 0);
    assert_eq!(bsp["cpl"], 3, "hold runs in user mode: {bsp}");
    let rip = bsp["rip"].as_u64().expect("rip");
    assert_eq!(
        syms.describe(rip),
        bsp["symbol"].as_str().map(String::from),
        "the symbol is the one for its RIP"
    );
    let symbol = bsp["symbol"].as_str().unwrap_or_default();
    let in_hold = symbol.starts_with("testguest::commands::hold+0x") && rip > hold;
    assert!(
        in_hold || symbol.starts_with("testguest::tsc::freq+0x"),
        "vCPU 0 at {rip:#x} ({symbol}), hold at {hold:#x}"
    );
    assert_eq!(vcpus[1]["id"], 1);
    // `wbvmm stats` renders it, `--get` reaches it.
    let table = Command::new(env!("CARGO_BIN_EXE_wbvmm"))
        .args(["stats", stats.to_str().unwrap()])
        .output()
        .expect("wbvmm stats");
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("vCPUs") && text.contains(symbol),
        "wbvmm stats:\n{text}"
    );
    let get = Command::new(env!("CARGO_BIN_EXE_wbvmm"))
        .args(["stats", stats.to_str().unwrap(), "--get", "vcpus.0.symbol"])
        .output()
        .expect("wbvmm stats --get");
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), symbol);
    vm.send_line("done");
    let o = vm.finish(STARTUP_DEADLINE);
    assert_eq!(o.code, Some(0), "{}", o.show());
    let _ = std::fs::remove_file(&stats);
}

/// A minimal GDB remote serial protocol client: packets with checksums, acks.
struct Rsp {
    s: std::os::unix::net::UnixStream,
}

impl Rsp {
    /// Connect to the stub's socket once wbvmm has bound it.
    fn connect(path: &std::path::Path) -> Rsp {
        let mut s = None;
        let ok = wait_until(STARTUP_DEADLINE, || {
            s = std::os::unix::net::UnixStream::connect(path).ok();
            s.is_some()
        });
        assert!(ok, "no GDB stub listening on {}", path.display());
        let s = s.unwrap();
        // Only the failure path: a stub that never answers fails the test.
        s.set_read_timeout(Some(STARTUP_DEADLINE)).unwrap();
        Rsp { s }
    }

    fn byte(&mut self) -> u8 {
        use std::io::Read;
        let mut b = [0u8];
        self.s.read_exact(&mut b).expect("read from the GDB stub");
        b[0]
    }

    fn write(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.s.write_all(bytes).expect("write to the GDB stub");
    }

    /// Send one packet and wait for its ack.
    fn send(&mut self, body: &str) {
        let sum = body.bytes().fold(0u8, |a, b| a.wrapping_add(b));
        self.write(format!("${body}#{sum:02x}").as_bytes());
        let ack = self.byte();
        assert_eq!(ack, b'+', "the stub did not ack {body:?}");
    }

    /// The next packet from the stub, checksum checked, acked.
    fn recv(&mut self) -> String {
        while self.byte() != b'$' {}
        let mut body = Vec::new();
        loop {
            match self.byte() {
                b'#' => break,
                b => body.push(b),
            }
        }
        let sum = [self.byte(), self.byte()];
        let sum = u8::from_str_radix(std::str::from_utf8(&sum).unwrap(), 16).unwrap();
        assert_eq!(
            body.iter().fold(0u8, |a, b| a.wrapping_add(*b)),
            sum,
            "bad checksum"
        );
        // The stub may close right after its last packet (W, or OK to D): an ack
        // that finds it gone is fine.
        let _ = std::io::Write::write_all(&mut self.s, b"+");
        // Run-length encoding: `X*n` is X and then n - 29 more of it.
        let mut out = Vec::new();
        let mut i = 0;
        while i < body.len() {
            if body[i] == b'*' && i + 1 < body.len() {
                let last = *out.last().expect("a run after a character");
                out.extend(std::iter::repeat_n(last, usize::from(body[i + 1] - 29)));
                i += 2;
            } else {
                out.push(body[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }

    fn ask(&mut self, body: &str) -> String {
        self.send(body);
        self.recv()
    }

    /// The registers in `g` order: 16 GPRs, then RIP, EFLAGS (32 bits), CS, SS...
    fn registers(&mut self) -> Vec<u8> {
        let hex = self.ask("g");
        unhex(&hex)
    }
}

fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

fn rip_of(regs: &[u8]) -> u64 {
    u64::from_le_bytes(regs[128..136].try_into().unwrap())
}

fn cs_of(regs: &[u8]) -> u32 {
    u32::from_le_bytes(regs[140..144].try_into().unwrap())
}

/// The test guest's ELF bytes at `addr`, from the section that holds it.
fn elf_bytes(addr: u64, len: usize) -> Vec<u8> {
    use object::{Object, ObjectSection};
    let bytes = std::fs::read(testguest()).unwrap();
    let file = object::File::parse(&*bytes).unwrap();
    let sec = file
        .sections()
        .find(|s| s.address() <= addr && addr + len as u64 <= s.address() + s.size())
        .expect("a section holding the address");
    let data = sec.data().unwrap();
    let off = (addr - sec.address()) as usize;
    data[off..off + len].to_vec()
}

fn elf_entry() -> u64 {
    use object::Object;
    let bytes = std::fs::read(testguest()).unwrap();
    object::File::parse(&*bytes).unwrap().entry()
}

fn gdb_socket(tag: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("wbvmm-gdb-{tag}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

fn spawn_with_gdb(sock: &std::path::Path, cmdline: &str) -> Running {
    let tg = testguest();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wbvmm"));
    cmd.args(["--kernel", tg.to_str().unwrap(), "--cmdline", cmdline])
        .arg("--gdb")
        .arg(sock);
    Running::spawn(cmd, None)
}

/// The whole debugger round: the guest waits at its ELF entry, memory reads give the
/// ELF's bytes, a software breakpoint in a CPL0 function (which this host runs in
/// KVM's emulator) stops the guest there, and once removed the guest runs to its
/// normal end, which the stub reports.
#[test]
fn gdb_stub_stops_at_a_breakpoint_and_lets_the_guest_finish() {
    if !kvm_available("gdb_stub_stops_at_a_breakpoint_and_lets_the_guest_finish") {
        return;
    }
    let work = guest_symbols()
        .address_of("testguest::cpl0test::cpl0_insns_work")
        .expect("cpl0_insns_work in the symbol table");
    let sock = gdb_socket("bp");
    let mut vm = spawn_with_gdb(&sock, "cpl0-insns exit=7");
    let mut gdb = Rsp::connect(&sock);
    let why = gdb.ask("?");
    assert!(why.starts_with('T') || why.starts_with('S'), "{why}");
    let regs = gdb.registers();
    assert_eq!(
        rip_of(&regs),
        elf_entry(),
        "waits before the first instruction"
    );
    assert!(!vm.stdout().contains("testguest"), "the guest ran already");
    let mem = unhex(&gdb.ask(&format!("m{work:x},10")));
    assert_eq!(mem, elf_bytes(work, 16), "memory at cpl0_insns_work");
    assert_eq!(gdb.ask(&format!("Z0,{work:x},1")), "OK");
    // The int3 is the stub's, not the guest's: reads still show the guest's byte.
    assert_eq!(unhex(&gdb.ask(&format!("m{work:x},1"))), elf_bytes(work, 1));
    let stop = gdb.ask("c");
    assert!(stop.starts_with("T05"), "a breakpoint stop: {stop}");
    let regs = gdb.registers();
    assert_eq!(rip_of(&regs), work, "stopped at the breakpoint");
    assert_eq!(cs_of(&regs) & 3, 0, "in kernel mode");
    assert_eq!(gdb.ask(&format!("z0,{work:x},1")), "OK");
    let end = gdb.ask("c");
    assert_eq!(end, "W07", "the stub reports the guest's exit status");
    let o = vm.finish(STARTUP_DEADLINE);
    assert_eq!(o.code, Some(7), "{}", o.show());
    assert!(
        o.stdout.contains("cpl0-insns: back at cpl=3"),
        "{}",
        o.show()
    );
    assert!(
        o.stderr.contains("waiting for a debugger on"),
        "{}",
        o.show()
    );
    let _ = std::fs::remove_file(&sock);
}

/// Ctrl-C while the guest runs in user mode stops it with SIGINT where it is (inside
/// `hold`); a detach lets it run on and finish.
#[test]
fn gdb_ctrl_c_stops_a_running_guest_and_detach_lets_it_go() {
    if !kvm_available("gdb_ctrl_c_stops_a_running_guest_and_detach_lets_it_go") {
        return;
    }
    let syms = guest_symbols();
    let sock = gdb_socket("intr");
    let mut vm = spawn_with_gdb(&sock, "hold");
    let mut gdb = Rsp::connect(&sock);
    gdb.ask("?");
    // Continue: no reply until the guest stops.
    gdb.send("c");
    vm.wait_for("hold: waiting", STARTUP_DEADLINE);
    gdb.write(&[0x03]);
    let stop = gdb.recv();
    assert!(stop.starts_with("T02"), "SIGINT stop: {stop}");
    let regs = gdb.registers();
    assert_eq!(cs_of(&regs) & 3, 3, "stopped in user mode");
    let at = syms.describe(rip_of(&regs)).unwrap_or_default();
    assert!(
        at.starts_with("testguest::commands::hold+") || at.starts_with("testguest::tsc::freq+"),
        "stopped at {:#x} ({at})",
        rip_of(&regs)
    );
    eprintln!("gdb: Ctrl-C stopped vCPU 0 at {at}");
    // A single step in user mode: on a PVM host the #DB would go to the guest, so the
    // stub reports a step that did not move; elsewhere RIP moves on.
    let step = gdb.ask("vCont;s:1");
    assert!(step.starts_with('S') || step.starts_with('T'), "{step}");
    let after = rip_of(&gdb.registers());
    assert_eq!(
        after == rip_of(&regs),
        wbvmm::cpuid::pvm_host(),
        "step from {:#x} to {after:#x}",
        rip_of(&regs)
    );
    assert_eq!(gdb.ask("D"), "OK");
    vm.send_line("done");
    let o = vm.finish(STARTUP_DEADLINE);
    assert_eq!(o.code, Some(0), "{}", o.show());
    let _ = std::fs::remove_file(&sock);
}

/// While it waits for the debugger the vCPU still answers snapshots: at the ELF entry,
/// in kernel mode (CPL0). A debugger that connects and vanishes neither crashes nor
/// hangs the VM: the guest runs on to its end.
#[test]
fn a_debugger_that_goes_away_leaves_the_guest_running() {
    if !kvm_available("a_debugger_that_goes_away_leaves_the_guest_running") {
        return;
    }
    let sock = gdb_socket("gone");
    let stats = stats_file("gdb-gone");
    let tg = testguest();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wbvmm"));
    cmd.args([
        "--kernel",
        tg.to_str().unwrap(),
        "--cmdline",
        "banner exit=5",
    ])
    .arg("--gdb")
    .arg(&sock)
    .arg(format!("--stats={}", stats.display()));
    let mut vm = Running::spawn(cmd, Some(stats.clone()));
    // The socket is bound after wbvmm blocked SIGUSR1 (before that, the signal's
    // default action would end it).
    assert!(wait_until(STARTUP_DEADLINE, || sock.exists()));
    let waiting = vm.wait_for_stats("vCPU 0 parked for the debugger", STARTUP_DEADLINE, |s| {
        s["vcpus"][0]["rip"].as_u64().is_some()
    });
    let at = &waiting["vcpus"][0];
    assert_eq!(at["rip"].as_u64(), Some(elf_entry()), "{waiting:#}");
    assert_eq!(at["cpl"], 0, "{waiting:#}");
    let entry_symbol = guest_symbols().describe(elf_entry());
    assert!(entry_symbol.is_some());
    assert_eq!(at["symbol"].as_str().map(String::from), entry_symbol);
    let _ = std::fs::remove_file(&stats);
    let mut gdb = Rsp::connect(&sock);
    // Half a packet, then gone.
    gdb.write(b"$g");
    drop(gdb);
    let o = vm.finish(STARTUP_DEADLINE);
    assert_eq!(o.code, Some(5), "{}", o.show());
}

#[test]
fn gdb_on_an_unwritable_path_is_a_clear_error() {
    if !kvm_available("gdb_on_an_unwritable_path_is_a_clear_error") {
        return;
    }
    let tg = testguest();
    let o = wbvmm(
        &[
            "--kernel",
            tg.to_str().unwrap(),
            "--gdb",
            "/nonexistent-wbvmm-dir/gdb.sock",
        ],
        None,
        STARTUP_DEADLINE,
    );
    assert_eq!(o.code, Some(1), "{}", o.show());
    assert!(
        o.stderr
            .contains("cannot listen for a debugger on --gdb /nonexistent-wbvmm-dir/gdb.sock"),
        "{}",
        o.show()
    );
}

/// The same round with the real gdb, where it is installed (scripts/setup.sh
/// installs it): batch mode, a breakpoint in a CPL0 function, a step, the exit.
#[test]
fn gdb_batch_session_breaks_steps_and_sees_the_exit() {
    if !kvm_available("gdb_batch_session_breaks_steps_and_sees_the_exit") {
        return;
    }
    if Command::new("gdb").arg("--version").output().is_err() {
        eprintln!("\n!!! SKIPPED gdb_batch_session_breaks_steps_and_sees_the_exit: gdb is not installed (scripts/setup.sh installs it) !!!\n");
        return;
    }
    let work = guest_symbols()
        .address_of("testguest::cpl0test::cpl0_insns_work")
        .expect("cpl0_insns_work in the symbol table");
    let sock = gdb_socket("batch");
    let mut vm = spawn_with_gdb(&sock, "cpl0-insns exit=7");
    // Once the socket exists, gdb can connect (it is bound before the file appears).
    assert!(wait_until(STARTUP_DEADLINE, || sock.exists()));
    let tg = testguest();
    let mut cmd = Command::new("gdb");
    cmd.args(["-batch", "-nx", tg.to_str().unwrap()])
        .arg("-ex")
        .arg(format!("target remote {}", sock.display()));
    for ex in [
        "info registers rip".to_string(),
        format!("break *{work:#x}"),
        "continue".into(),
        "stepi".into(),
        "info registers rip cs".into(),
        "delete".into(),
        "continue".into(),
    ] {
        cmd.arg("-ex").arg(ex);
    }
    let g = run_with_timeout(&mut cmd, None, STARTUP_DEADLINE);
    let out = format!("{}{}", g.stdout, g.stderr);
    assert!(
        out.contains(&format!("rip            {:#x}", elf_entry())),
        "waits at the entry:\n{out}"
    );
    assert!(
        out.contains(&format!(
            "Breakpoint 1, {work:#018x} in testguest::cpl0test::cpl0_insns_work"
        )),
        "stops at the breakpoint:\n{out}"
    );
    assert!(out.contains("cs             0x8"), "kernel mode:\n{out}");
    assert!(
        out.contains("exited with code 07"),
        "gdb sees the exit:\n{out}"
    );
    let o = vm.finish(STARTUP_DEADLINE);
    assert_eq!(o.code, Some(7), "{}", o.show());
    let _ = std::fs::remove_file(&sock);
}

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

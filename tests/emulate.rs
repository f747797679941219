//! The emulation fallback under /dev/kvm: the test guest runs, at CPL0, the
//! instructions a Linux kernel needs and KVM's emulator lacks, and checks what
//! they did. On a nested PVM host (CPL0 emulated) they reach wbvmm's fallback,
//! which `--stats` counts; where CPL0 runs natively the printed results are the
//! same and no fallback is needed.

mod common;
use common::*;

fn line<'a>(out: &'a Output, prefix: &str) -> &'a str {
    out.stdout
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?}\n{}", out.show()))
}

fn expect(out: &Output, exact: &str) {
    assert!(
        out.stdout.lines().any(|l| l == exact),
        "missing line {exact:?}\n{}",
        out.show()
    );
}

fn emulated(stats: &serde_json::Value, mnemonic: &str) -> u64 {
    stats["emulated"][mnemonic]["count"].as_u64().unwrap_or(0)
}

#[test]
fn cpl0_instructions_give_hardware_results() {
    if !kvm_available("cpl0_instructions_give_hardware_results") {
        return;
    }
    let stats_path = stats_file("emulate-cpl0");
    let arg = format!("--stats={}", stats_path.display());
    let o = boot_testguest("cpl0-insns", &[&arg], None);
    assert_eq!(o.code, Some(0), "{}", o.show());
    for exact in [
        "cpl0: popcnt(0xf0f0)=8 zf=0",
        "cpl0: popcnt(0x0)=0 zf=1",
        "cpl0: popcnt([0xff00ff00ff])=24",
        "cpl0: fwait ok=1",
        "cpl0: lfence mfence sfence ok=1",
        "cpl0: ldmxcsr(0x5f80) stmxcsr=0x5f80",
        "cpl0: fxsave64 fcw=0x37f mxcsr=0x1f80 fxrstor64 xmm1=0xa5a5a5a55a5a5a5a rest_same=true",
        "cpl0: cmpxchg16b match zf=1 mem=0x4:0x3 mismatch zf=0 rdx:rax=0x4:0x3",
        "cpl0: swapgs gs_base=0x22220000 kernel_gs_base=0x11110000",
        "cpl0: verw(0x10) zf=1 verw(0x8) zf=0",
        "cpl0: ud2 -> #UD handled=1",
        // Faults exactly where hardware raises them (QEMU TCG misses the first).
        "cpl0: ldmxcsr(0xffff0000) -> vector=13 error=0x0",
        "cpl0: popcnt([0x10000000000]) -> vector=14 error=0x0 cr2=0x10000000000",
        "cpl0: int3 -> #BP returned=1",
        "cpl0: int 0x80 -> rax=0x42",
        "cpl0-insns: back at cpl=3",
    ] {
        expect(&o, exact);
    }
    // xsave family: XMM1 changed in the image comes back through xrstor,
    // AVX state survives; xsavec's XCOMP_BV is bit 63 | XCR0.
    let xs = line(&o, "cpl0: x");
    let has_xsave = xs.starts_with("cpl0: xgetbv");
    if has_xsave {
        assert!(
            xs.contains("xrstor64 xmm1=0x3c3c3c3cc3c3c3c3 avx_same=true"),
            "{xs}"
        );
        let v = xs.split("xcr0=0x").nth(1).and_then(|s| s.split(' ').next());
        let xcr0 = u64::from_str_radix(v.unwrap_or(""), 16).expect("xcr0");
        assert!(xcr0 & 3 == 3, "{xs}");
        let c = line(&o, "cpl0: xsavec");
        if c.starts_with("cpl0: xsavec64") {
            assert_eq!(c, format!("cpl0: xsavec64 xcomp_bv=0x{:x}", xcr0 | 1 << 63));
        }
    } else {
        assert_eq!(xs, "cpl0: xsave not in cpuid");
    }
    for (name, ok) in [("rdrand", "cf=1"), ("rdseed", "cf=1")] {
        let l = line(&o, &format!("cpl0: {name}"));
        assert!(l.ends_with(ok) || l.ends_with("not in cpuid"), "{l}");
    }
    let t = line(&o, "cpl0: rdtscp");
    if !t.ends_with("not in cpuid") {
        assert!(t.contains("monotonic=1"), "{t}");
        if t.contains("TSC_AUX=0x2a: ok") {
            assert!(t.starts_with("cpl0: rdtscp aux=0x2a "), "{t}");
            let p = line(&o, "cpl0: rdpid");
            assert!(
                p == "cpl0: rdpid=0x2a" || p.ends_with("not in cpuid"),
                "{p}"
            );
        }
    }
    let s = line(&o, "cpl0: s");
    assert!(
        s == "cpl0: stac ac=1 clac ac=0" || s == "cpl0: smap not in cpuid",
        "{s}"
    );

    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats_path).expect("stats file"))
            .expect("stats JSON");
    let _ = std::fs::remove_file(&stats_path);
    eprintln!("emulated: {}", stats["emulated"]);
    if kernel_mode_native() {
        eprintln!("guest CPL0 runs natively here: no fallback counts to check");
        return;
    }
    // What upstream KVM's emulator lacks reached the fallback.
    for (m, n) in [
        ("popcnt", 4),
        ("cmpxchg16b", 2),
        ("wait", 1),
        ("ldmxcsr", 3),
        ("int3", 1),
        ("int", 1),
        ("stmxcsr", 1),
        ("verw", 2),
    ] {
        assert!(emulated(&stats, m) >= n, "{m}: {}", stats["emulated"]);
    }
    if has_xsave {
        for (m, n) in [("xgetbv", 1), ("xsave64", 2), ("xrstor64", 1)] {
            assert!(emulated(&stats, m) >= n, "{m}: {}", stats["emulated"]);
        }
    }
    if s.starts_with("cpl0: stac") {
        assert!(emulated(&stats, "stac") >= 1 && emulated(&stats, "clac") >= 1);
    }
    assert!(
        stats["emulated"]["popcnt"]["total_ns"]
            .as_u64()
            .unwrap_or(0)
            > 0
    );
}

#[test]
fn an_instruction_without_fallback_ends_the_vm_with_its_name() {
    if !kvm_available("an_instruction_without_fallback_ends_the_vm_with_its_name") {
        return;
    }
    let o = boot_testguest("cpl0-unsupported exit=3", &[], None);
    if o.stdout.contains("cpl0-unsupported: crc32 ran") {
        // CPL0 runs natively (or KVM emulates crc32): nothing to fall back on.
        assert_eq!(o.code, Some(3), "{}", o.show());
        return;
    }
    assert_eq!(o.code, Some(102), "{}", o.show());
    assert!(
        o.stderr.contains("decoded `crc32 eax,ecx`") || o.stderr.contains("decoded `crc32"),
        "{}",
        o.show()
    );
}

#[test]
fn syscall_probe_reports_where_syscall_lands() {
    if !kvm_available("syscall_probe_reports_where_syscall_lands") {
        return;
    }
    let o = boot_testguest("syscall-probe", &[], None);
    assert_eq!(o.code, Some(0), "{}", o.show());
    // sysretq from CPL0 back to CPL3 (STAR[63:48] = 0x10: CS 0x23, SS 0x1b
    // architecturally; this host's PVM loads Linux's 0x33/0x2b itself).
    let sysret = line(&o, "syscall-probe: sysretq from cpl0 returned rax=0x5e7 ");
    eprintln!("{sysret}");
    let landed = o
        .stdout
        .lines()
        .find(|l| l.starts_with("syscall-probe: landed") || l.starts_with("syscall-probe: #PF"))
        .unwrap_or_else(|| panic!("{}", o.show()));
    eprintln!("{landed}");
    expect(
        &o,
        &format!(
            "syscall-probe: returned to cpl=3 rcx={} r11={}",
            field(landed, "rcx="),
            field(landed, "r11=")
        ),
    );
    if kernel_mode_native() {
        // Architectural behaviour: CPL0 at STAR's kernel CS, and back.
        assert!(
            landed.starts_with("syscall-probe: landed cs=0x8 cpl=0 "),
            "{landed}"
        );
        assert!(sysret.ends_with("cs=0x23 ss=0x1b"), "{sysret}");
    }
}

fn field<'a>(l: &'a str, key: &str) -> &'a str {
    l.split(key)
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .unwrap_or("")
}

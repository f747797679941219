//! What one emulation fallback costs in wbvmm itself: decoding with iced-x86, the page
//! walk and the instruction's work, against the fake vCPU and memory of the unit tests
//! (no /dev/kvm). A live fallback adds KVM's exit and the register transfers around it;
//! `--stats` reports that total per mnemonic (`emulated`).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use wbvmm::emulate::fake::{FakeCpu, FakeMem, PageTables, PTE_P, PTE_W};
use wbvmm::emulate::{emulate, Outcome, RAX, RBX, RCX, RDI, RDX};

const RAM: usize = 4 << 20;
const TABLES: u64 = 0x10_0000;
const CODE: u64 = 0x20_0000;
const DATA: u64 = 0x30_0000;

fn machine() -> (FakeCpu, FakeMem) {
    let mem = FakeMem::new(RAM);
    let mut pt = PageTables::new(&mem, TABLES, 4);
    pt.map(CODE, CODE, 0x1000, PTE_P);
    pt.map(DATA, DATA, 0x1000, PTE_P | PTE_W);
    pt.map(DATA + 0x1000, DATA + 0x1000, 0x1000, PTE_P | PTE_W);
    let mut cpu = FakeCpu::long64(TABLES);
    cpu.rip = CODE;
    cpu.gprs[RDI] = DATA;
    (cpu, mem)
}

/// The instructions the Linux guests met most (README, "emulation fallbacks per boot").
const CASES: &[(&str, &[u8])] = &[
    ("clac", &[0x0f, 0x01, 0xca]),
    ("stac", &[0x0f, 0x01, 0xcb]),
    ("popcnt rax, rbx", &[0xf3, 0x48, 0x0f, 0xb8, 0xc3]),
    ("fwait", &[0x9b]),
    ("rdtscp", &[0x0f, 0x01, 0xf9]),
    ("lock cmpxchg16b [rdi]", &[0xf0, 0x48, 0x0f, 0xc7, 0x0f]),
    ("xsavec64 [rdi]", &[0x48, 0x0f, 0xc7, 0x27]),
    ("xrstor64 [rdi]", &[0x48, 0x0f, 0xae, 0x2f]),
];

fn fallbacks(c: &mut Criterion) {
    let mut g = c.benchmark_group("emulation_fallback");
    for (name, bytes) in CASES {
        let (mut cpu, mem) = machine();
        cpu.gprs[RAX] = 3;
        cpu.gprs[RBX] = 0xf0f0;
        cpu.gprs[RCX] = 0;
        cpu.gprs[RDX] = 0;
        // A valid XSAVE area at DATA for xrstor64 (saved once by xsavec64's sibling).
        let first = emulate(&mut cpu, &mem, &[0x48, 0x0f, 0xae, 0x27]);
        assert!(matches!(first, Outcome::Emulated { .. }), "{first:?}");
        let start = cpu.clone();
        let once = emulate(&mut cpu.clone(), &mem, bytes);
        assert!(matches!(once, Outcome::Emulated { .. }), "{name}: {once:?}");
        g.bench_function(*name, |b| {
            b.iter_batched_ref(
                || start.clone(),
                |cpu| emulate(cpu, &mem, bytes),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, fallbacks);
criterion_main!(benches);

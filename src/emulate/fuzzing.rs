//! The fuzz harness (fuzz/fuzz_targets/emulate.rs, and the unit tests that replay
//! its corpus): input bytes choose a processor mode, register and control-register
//! values, page-table shapes (including garbage tables and mappings outside RAM)
//! after the first 15 bytes (the instruction) and the 16th (how many of them KVM
//! handed over). Checked on every input: no panic, every access
//! the emulator makes stays inside the fake RAM and keeps the memory contract (the
//! fake asserts both), and an instruction that faults changes no register.

use super::fake::*;
use super::state::*;
use super::{emulate, Outcome, BP};

/// Fake guest RAM: 2 MiB.
pub const RAM: usize = 2 << 20;
const TABLES: u64 = 0x1_0000;
const CODE: u64 = 0x10_0000;

struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn u64(&mut self) -> u64 {
        let mut v = 0u64;
        for i in 0..8 {
            v |= u64::from(self.byte()) << (8 * i);
        }
        v
    }
    /// A value that is often an interesting address.
    fn addr(&mut self) -> u64 {
        match self.byte() % 6 {
            0 => self.u64(),
            1 => 0x20_0000 + (self.u64() % 0x4000),
            2 => self.u64() % (RAM as u64 * 2),
            3 => 0xffff_8000_0000_0000 | (self.u64() & 0xffff),
            4 => 0x0000_8000_0000_0000 - (self.u64() & 0xff),
            _ => 0,
        }
    }
}

/// Pages the harness maps (linear = physical unless noted).
const PAGES: [(u64, u64); 6] = [
    (0x20_0000 - 0x1_0000, PTE_P | PTE_W),
    (0x20_1000 - 0x1_0000, PTE_P | PTE_W | PTE_U),
    (0x20_2000 - 0x1_0000, PTE_P),
    (0x20_3000 - 0x1_0000, PTE_P | PTE_U),
    (0x20_4000 - 0x1_0000, PTE_P | PTE_W | PTE_XD),
    (0x20_5000 - 0x1_0000, PTE_P | PTE_W | PTE_U | (3 << 59)),
];

/// Run one input.
pub fn run(data: &[u8]) {
    let mut inp = Input { data, pos: 0 };
    // Up to 15 instruction bytes first (what KVM fetched: a prefix of them),
    // then the state.
    let mut bytes = [0u8; 15];
    for b in bytes.iter_mut() {
        *b = inp.byte();
    }
    let n = (inp.byte() % 16) as usize;
    thread_local! {
        static MEM: FakeMem = FakeMem::new(RAM);
    }
    MEM.with(|mem| {
        mem.reset();
        run_with(&mut inp, mem, bytes, n)
    });
}

fn run_with(inp: &mut Input, mem: &FakeMem, bytes: [u8; 15], n: usize) {
    let levels = if inp.byte() & 1 == 0 { 4 } else { 5 };
    let mut pt = PageTables::new(mem, TABLES, levels);
    pt.map(CODE, CODE, 0x1000, PTE_P | PTE_U);
    pt.map(CODE + 0x1000, CODE + 0x1000, 0x1000, PTE_P | PTE_U);
    // The data pages, at 2 MiB linear, backed just below it.
    for (i, &(pa, flags)) in PAGES.iter().enumerate() {
        let f = if inp.byte() & 1 != 0 {
            flags ^ u64::from(inp.byte() & 0x7)
        } else {
            flags
        };
        pt.map(0x20_0000 + 0x1000 * i as u64, pa, 0x1000, f);
    }
    // A page outside RAM, a 2 MiB page, and a 1 GiB page.
    pt.map(0x20_6000, 0x4000_0000, 0x1000, PTE_P | PTE_W);
    pt.map(0x40_0000, 0, 0x20_0000, PTE_P | PTE_W | PTE_U);
    pt.map(0x80_0000_0000, 0, 0x4000_0000, PTE_P | PTE_W);
    // Random garbage in some table slots (reserved bits, pointers outside RAM).
    for _ in 0..(inp.byte() % 8) {
        let slot = TABLES + (inp.u64() % 0x8000) / 8 * 8;
        mem.poke_u64(slot, inp.u64());
    }

    let mut c = match inp.byte() % 4 {
        0 => FakeCpu::long64(TABLES),
        1 => FakeCpu::long64_user(TABLES),
        2 => {
            // 32-bit protected mode, maybe with paging over the same tables.
            let mut c = FakeCpu::long64(TABLES);
            c.efer = 0;
            c.cr4 &= !(CR4_PAE | CR4_LA57);
            for s in c.segs.iter_mut() {
                s.l = false;
                s.db = true;
            }
            c
        }
        _ => {
            // Real mode.
            let mut c = FakeCpu::long64(0);
            c.cr0 = 0;
            c.efer = 0;
            c.cr4 = 0;
            for s in c.segs.iter_mut() {
                s.l = false;
                s.db = false;
                s.limit = 0xffff;
                s.base = u64::from(s.selector) << 4;
            }
            c
        }
    };
    if levels == 5 {
        c.cr4 |= CR4_LA57;
    }
    c.rip = CODE + u64::from(inp.byte()) * 16;
    for g in c.gprs.iter_mut() {
        *g = inp.addr();
    }
    c.cr0 ^= u64::from(inp.byte() & 0x3f) | u64::from(inp.byte() & 1) << 16;
    c.cr4 ^= u64::from(inp.byte()) << 16 & 0x7f_0000;
    c.efer ^= u64::from(inp.byte() & 0x41);
    c.rflags ^= u64::from(inp.byte()) << 16 & 0x7_0000 | u64::from(inp.byte() & 0xd5);
    c.xcr0 = [7, 3, 1, 0x207, 0x2ff, 0][(inp.byte() % 6) as usize];
    let bv = u64::from(inp.byte()) & 0x7 | u64::from(inp.byte() & 1) << 9;
    c.xsave[512..520].copy_from_slice(&bv.to_le_bytes());
    for _ in 0..(inp.byte() % 4) {
        let o = (inp.u64() % 4096) as usize;
        c.xsave[o] = inp.byte();
    }
    if inp.byte() & 1 != 0 {
        let s = (inp.byte() % 6) as usize;
        let seg = &mut c.segs[s];
        seg.selector = inp.u64() as u16;
        seg.type_ = inp.byte() & 15;
        seg.unusable = inp.byte() & 1 != 0;
        seg.limit = inp.u64() as u32;
        seg.base = inp.addr();
    }
    c.idt = DescTable {
        base: inp.addr(),
        limit: inp.u64() as u16,
    };
    c.gdt = DescTable {
        base: inp.addr(),
        limit: inp.u64() as u16,
    };
    if inp.byte() & 1 != 0 {
        c.msrs.insert(MSR_IA32_XSS, inp.u64() & 0x1_ff00);
    }
    if inp.byte() & 1 != 0 {
        c.random = None;
    }
    // CPUID features off at random.
    for key in [(1, 0), (7, 0), (0xd, 1), (0x8000_0001, 0)] {
        if inp.byte() & 3 == 0 {
            if let Some(e) = c.cpuid.get_mut(&key) {
                let mask = inp.u64();
                e.ebx &= mask as u32;
                e.ecx &= (mask >> 32) as u32;
                e.edx &= mask as u32 | 0x2000_0000;
                e.eax &= (mask >> 16) as u32;
            }
        }
    }
    // The instruction is also in memory, for fetches past what KVM gave.
    mem.poke(c.rip, &bytes);

    let before = c.clone();
    let out = emulate(&mut c, mem, &bytes[..n]);
    if let Outcome::Exception { exception, .. } = &out {
        if exception.vector != BP {
            assert!(c == before, "a fault changed the state: {out:?}");
        }
    }
}

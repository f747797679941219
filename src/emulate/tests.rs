//! Per-instruction tests against the Intel SDM, on the fake vCPU and memory.

use super::fake::*;
use super::paging::{PF_I, PF_P, PF_PK, PF_RSVD, PF_U, PF_W};
use super::*;

const RAM: usize = 8 << 20;
const TABLES: u64 = 0x10_0000;
const CODE: u64 = 0x20_0000;
/// Supervisor read/write page.
const SUP: u64 = 0x40_0000;
/// User read/write page.
const USR: u64 = 0x40_1000;
/// Supervisor read-only page.
const SUP_RO: u64 = 0x40_2000;
/// User read-only page.
const USR_RO: u64 = 0x40_3000;
/// Two supervisor pages (accesses crossing the boundary at +0x1000).
const TWO: u64 = 0x40_4000;
/// Not present.
const ABSENT: u64 = 0x40_6000;
/// Mapped to guest-physical memory that is not RAM.
const HOLE: u64 = 0x40_7000;
/// Supervisor, XD.
const NX: u64 = 0x40_8000;
/// User page with protection key 1.
const KEYED: u64 = 0x40_9000;
/// The same physical memory at two 2 MiB and 1 GiB mappings.
const BIG2M: u64 = 0x8000_0000;
const BIG1G: u64 = 0x40_0000_0000;

fn setup_with(user: bool) -> (FakeCpu, FakeMem) {
    let mem = FakeMem::new(RAM);
    let mut pt = PageTables::new(&mem, TABLES, 4);
    let (p, w, u) = (PTE_P, PTE_W, PTE_U);
    let code = if user { p | u } else { p };
    pt.map(CODE, CODE, 0x1000, code);
    pt.map(CODE + 0x1000, CODE + 0x1000, 0x1000, code);
    pt.map(SUP, SUP, 0x1000, p | w);
    pt.map(USR, USR, 0x1000, p | w | u);
    pt.map(SUP_RO, SUP_RO, 0x1000, p);
    pt.map(USR_RO, USR_RO, 0x1000, p | u);
    pt.map(TWO, TWO, 0x1000, p | w);
    pt.map(TWO + 0x1000, TWO + 0x1000, 0x1000, p | w);
    pt.map(HOLE, 0x1_0000_0000, 0x1000, p | w);
    pt.map(NX, NX, 0x1000, p | w | PTE_XD);
    pt.map(KEYED, KEYED, 0x1000, p | w | u | (1 << 59));
    pt.map(BIG2M, 0x60_0000, 0x20_0000, p | w);
    pt.map(BIG1G, 0, 0x4000_0000, p | w);
    let mut cpu = if user {
        FakeCpu::long64_user(TABLES)
    } else {
        FakeCpu::long64(TABLES)
    };
    cpu.rip = CODE;
    (cpu, mem)
}

fn setup() -> (FakeCpu, FakeMem) {
    setup_with(false)
}

fn run(cpu: &mut FakeCpu, mem: &FakeMem, bytes: &[u8]) -> Outcome {
    emulate(cpu, mem, bytes)
}

fn emulated(o: &Outcome, m: Mnemonic) {
    assert_eq!(o, &Outcome::Emulated { mnemonic: m }, "{o:?}");
}

fn exc(o: &Outcome) -> Exception {
    match o {
        Outcome::Exception { exception, .. } => *exception,
        other => panic!("expected an exception, got {other:?}"),
    }
}

fn gp(code: u32) -> Exception {
    Exception::with_code(GP, code)
}

fn pf(code: u32, la: u64) -> Exception {
    Exception {
        vector: PF,
        error_code: Some(code),
        cr2: Some(la),
    }
}

/// A fault must leave the vCPU as it was.
fn faults(cpu: &mut FakeCpu, mem: &FakeMem, bytes: &[u8]) -> Exception {
    let before = cpu.clone();
    let o = run(cpu, mem, bytes);
    assert!(
        *cpu == before,
        "a faulting instruction changed the state: {o:?}, RIP {:#x} -> {:#x}",
        before.rip,
        cpu.rip
    );
    exc(&o)
}

// ---- popcnt ----

#[test]
fn popcnt_sizes_and_flags() {
    let (mut c, m) = setup();
    c.gprs[RBX] = 0xffff_0000_f0f0_f00f;
    c.gprs[RAX] = 0xdead_beef_dead_beef;
    c.rflags = 2 | FLAGS_ARITH;
    // popcnt rax, rbx
    emulated(
        &run(&mut c, &m, &[0xf3, 0x48, 0x0f, 0xb8, 0xc3]),
        Mnemonic::Popcnt,
    );
    assert_eq!(c.gprs[RAX], 16 + 16);
    assert_eq!(c.rflags, 2, "OF SF ZF AF CF PF all cleared");
    assert_eq!(c.rip, CODE + 5);
    // popcnt eax, ebx: 32-bit, zero-extends
    c.gprs[RAX] = u64::MAX;
    run(&mut c, &m, &[0xf3, 0x0f, 0xb8, 0xc3]);
    assert_eq!(c.gprs[RAX], 16);
    // popcnt ax, bx: 16-bit, merges
    c.gprs[RAX] = 0x1111_2222_3333_4444;
    run(&mut c, &m, &[0x66, 0xf3, 0x0f, 0xb8, 0xc3]);
    assert_eq!(c.gprs[RAX], 0x1111_2222_3333_0000 | 8);
    // Zero source: ZF = 1.
    c.gprs[RBX] = 0xffff_ffff_0000_0000;
    run(&mut c, &m, &[0xf3, 0x0f, 0xb8, 0xc3]);
    assert_eq!(c.gprs[RAX], 0);
    assert_eq!(c.rflags, 2 | FLAG_ZF);
}

#[test]
fn popcnt_memory_source() {
    let (mut c, m) = setup();
    m.poke_u64(SUP + 8, 0x8000_0000_0000_0001);
    c.gprs[RDI] = SUP + 8;
    emulated(
        &run(&mut c, &m, &[0xf3, 0x48, 0x0f, 0xb8, 0x07]),
        Mnemonic::Popcnt,
    );
    assert_eq!(c.gprs[RAX], 2);
    // The read set the accessed bit, not the dirty bit.
    let pt = PageTables::new(&m, TABLES, 4);
    let e = m.peek_u64(pt.leaf_entry(SUP));
    assert!(e & PTE_A != 0 && e & PTE_D == 0, "{e:#x}");
    // [rdi+disp8] across a page: both pages are read.
    m.poke(TWO + 0xffc, &[0xff; 8]);
    c.gprs[RDI] = TWO + 0xff0;
    run(&mut c, &m, &[0xf3, 0x48, 0x0f, 0xb8, 0x47, 0x0c]);
    assert_eq!(c.gprs[RAX], 64);
}

#[test]
fn popcnt_missing_in_cpuid_is_ud() {
    let (mut c, m) = setup();
    c.cpuid.get_mut(&(1, 0)).unwrap().ecx &= !(1 << 23);
    assert_eq!(
        faults(&mut c, &m, &[0xf3, 0x0f, 0xb8, 0xc3]),
        Exception::new(UD)
    );
}

// ---- paging and segmentation ----

#[test]
fn user_read_of_supervisor_page_faults_with_u() {
    let (mut c, m) = setup_with(true);
    c.gprs[RDI] = SUP;
    let e = faults(&mut c, &m, &[0xf3, 0x48, 0x0f, 0xb8, 0x07]);
    assert_eq!(e, pf(PF_P | PF_U, SUP));
    // The user's own page is fine.
    c.gprs[RDI] = USR;
    emulated(
        &run(&mut c, &m, &[0xf3, 0x48, 0x0f, 0xb8, 0x07]),
        Mnemonic::Popcnt,
    );
}

#[test]
fn write_to_read_only_page_honours_cr0_wp() {
    let (mut c, m) = setup();
    c.gprs[RDI] = SUP_RO;
    // stmxcsr [rdi]: a 4-byte write.
    assert_eq!(
        faults(&mut c, &m, &[0x0f, 0xae, 0x1f]),
        pf(PF_P | PF_W, SUP_RO)
    );
    c.cr0 &= !CR0_WP;
    emulated(&run(&mut c, &m, &[0x0f, 0xae, 0x1f]), Mnemonic::Stmxcsr);
    assert_eq!(m.peek(SUP_RO, 4), 0x1f80u32.to_le_bytes());
    // The write set accessed and dirty.
    let pt = PageTables::new(&m, TABLES, 4);
    let e = m.peek_u64(pt.leaf_entry(SUP_RO));
    assert!(e & PTE_A != 0 && e & PTE_D != 0, "{e:#x}");
    // User-mode writes to read-only pages fault whatever WP says.
    let (mut u, m) = setup_with(true);
    u.cr0 &= !CR0_WP;
    u.gprs[RDI] = USR_RO;
    assert_eq!(
        faults(&mut u, &m, &[0x0f, 0xae, 0x1f]),
        pf(PF_P | PF_W | PF_U, USR_RO)
    );
}

#[test]
fn not_present_and_reserved_bits() {
    let (mut c, m) = setup();
    c.gprs[RDI] = ABSENT;
    assert_eq!(faults(&mut c, &m, &[0x0f, 0xae, 0x1f]), pf(PF_W, ABSENT));
    assert_eq!(faults(&mut c, &m, &[0x0f, 0xae, 0x17]), pf(0, ABSENT));
    // A reserved bit (above MAXPHYADDR = 48) in the leaf.
    let pt = PageTables::new(&m, TABLES, 4);
    let leaf = pt.leaf_entry(SUP);
    let v = m.peek_u64(leaf);
    m.poke_u64(leaf, v | 1 << 50);
    c.gprs[RDI] = SUP;
    assert_eq!(
        faults(&mut c, &m, &[0x0f, 0xae, 0x17]),
        pf(PF_P | PF_RSVD, SUP)
    );
    // XD without EFER.NXE is reserved too.
    m.poke_u64(leaf, v | PTE_XD);
    c.efer &= !EFER_NXE;
    assert_eq!(
        faults(&mut c, &m, &[0x0f, 0xae, 0x17]),
        pf(PF_P | PF_RSVD, SUP)
    );
    c.efer |= EFER_NXE;
    emulated(&run(&mut c, &m, &[0x0f, 0xae, 0x17]), Mnemonic::Ldmxcsr);
}

#[test]
fn nx_pages_allow_data_access() {
    let (mut c, m) = setup();
    c.gprs[RDI] = NX;
    emulated(&run(&mut c, &m, &[0x0f, 0xae, 0x1f]), Mnemonic::Stmxcsr);
}

#[test]
fn smap_blocks_supervisor_access_to_user_pages_unless_ac() {
    let (mut c, m) = setup();
    c.gprs[RDI] = USR;
    assert_eq!(
        faults(&mut c, &m, &[0xf3, 0x48, 0x0f, 0xb8, 0x07]),
        pf(PF_P, USR)
    );
    assert_eq!(
        faults(&mut c, &m, &[0x0f, 0xae, 0x1f]),
        pf(PF_P | PF_W, USR)
    );
    c.rflags |= FLAG_AC;
    emulated(
        &run(&mut c, &m, &[0xf3, 0x48, 0x0f, 0xb8, 0x07]),
        Mnemonic::Popcnt,
    );
    c.cr4 &= !CR4_SMAP;
    c.rflags &= !FLAG_AC;
    emulated(
        &run(&mut c, &m, &[0xf3, 0x48, 0x0f, 0xb8, 0x07]),
        Mnemonic::Popcnt,
    );
}

#[test]
fn protection_keys_on_user_pages() {
    let (mut c, m) = setup_with(true);
    c.cr4 |= CR4_PKE;
    c.xcr0 |= 1 << 9;
    // PKRU: key 1 access-disabled.
    c.xsave[2432..2436].copy_from_slice(&4u32.to_le_bytes());
    let bv = u64::from_le_bytes(c.xsave[512..520].try_into().unwrap()) | 1 << 9;
    c.xsave[512..520].copy_from_slice(&bv.to_le_bytes());
    c.gprs[RDI] = KEYED;
    assert_eq!(
        faults(&mut c, &m, &[0x0f, 0xae, 0x17]),
        pf(PF_P | PF_U | PF_PK, KEYED)
    );
    // Write-disable only: reads pass, writes fault.
    c.xsave[2432..2436].copy_from_slice(&8u32.to_le_bytes());
    emulated(&run(&mut c, &m, &[0x0f, 0xae, 0x17]), Mnemonic::Ldmxcsr);
    assert_eq!(
        faults(&mut c, &m, &[0x0f, 0xae, 0x1f]),
        pf(PF_P | PF_W | PF_U | PF_PK, KEYED)
    );
}

#[test]
fn large_pages() {
    let (mut c, m) = setup();
    m.poke(0x60_0000 + 0x1_2340, &0x1f80u32.to_le_bytes());
    c.gprs[RDI] = BIG2M + 0x1_2340;
    emulated(&run(&mut c, &m, &[0x0f, 0xae, 0x17]), Mnemonic::Ldmxcsr);
    // 1 GiB page onto 0: SUP's bytes through it.
    m.poke_u64(SUP + 0x10, 0xff);
    c.gprs[RDI] = BIG1G + SUP + 0x10;
    run(&mut c, &m, &[0xf3, 0x48, 0x0f, 0xb8, 0x07]);
    assert_eq!(c.gprs[RAX], 8);
    // Without 1 GiB pages in CPUID the PS bit in a PDPTE is reserved.
    c.cpuid.get_mut(&(0x8000_0001, 0)).unwrap().edx &= !(1 << 26);
    assert_eq!(
        faults(&mut c, &m, &[0xf3, 0x48, 0x0f, 0xb8, 0x07]),
        pf(PF_P | PF_RSVD, BIG1G + SUP + 0x10)
    );
}

#[test]
fn five_level_paging() {
    let mem = FakeMem::new(RAM);
    let mut pt = PageTables::new(&mem, TABLES, 5);
    pt.map(CODE, CODE, 0x1000, PTE_P);
    let far = 0x00ff_0000_0040_0000u64; // needs LA57: bits above 47 set
    pt.map(far, SUP, 0x1000, PTE_P | PTE_W);
    let mut c = FakeCpu::long64(TABLES);
    c.rip = CODE;
    c.cr4 |= CR4_LA57;
    mem.poke_u64(SUP, 0x7);
    c.gprs[RDI] = far;
    emulated(
        &run(&mut c, &mem, &[0xf3, 0x48, 0x0f, 0xb8, 0x07]),
        Mnemonic::Popcnt,
    );
    assert_eq!(c.gprs[RAX], 3);
    // Without LA57 the same address is not canonical.
    c.cr4 &= !CR4_LA57;
    assert_eq!(faults(&mut c, &mem, &[0xf3, 0x48, 0x0f, 0xb8, 0x07]), gp(0));
}

#[test]
fn non_canonical_is_gp_or_ss() {
    let (mut c, m) = setup();
    c.gprs[RDI] = 0x0000_8000_0000_0000;
    assert_eq!(faults(&mut c, &m, &[0x0f, 0xae, 0x1f]), gp(0));
    // Stack-segment reference ([rbp]) → #SS(0).
    c.gprs[RBP] = 0x0000_8000_0000_0000;
    assert_eq!(
        faults(&mut c, &m, &[0x0f, 0xae, 0x5d, 0x00]),
        Exception::with_code(SS, 0)
    );
    // An access whose last byte crosses into non-canonical space.
    c.gprs[RDI] = 0x0000_7fff_ffff_fffe;
    assert_eq!(faults(&mut c, &m, &[0x0f, 0xae, 0x1f]), gp(0));
}

#[test]
fn non_ram_is_refused_not_touched() {
    let (mut c, m) = setup();
    c.gprs[RDI] = HOLE;
    let o = run(&mut c, &m, &[0x0f, 0xae, 0x1f]);
    match o {
        Outcome::Unsupported { text } => {
            assert!(
                text.contains("stmxcsr") && text.contains("0x100000000"),
                "{text}"
            )
        }
        o => panic!("{o:?}"),
    }
    assert!(m.refused.load(std::sync::atomic::Ordering::Relaxed) > 0);
}

#[test]
fn fs_gs_bases_apply_in_64_bit_mode() {
    let (mut c, m) = setup();
    c.segs[5].base = SUP;
    m.poke_u64(SUP + 0x20, 0xf);
    // popcnt rax, gs:[0x20] (absolute disp32 via SIB)
    let o = run(
        &mut c,
        &m,
        &[0x65, 0xf3, 0x48, 0x0f, 0xb8, 0x04, 0x25, 0x20, 0, 0, 0],
    );
    emulated(&o, Mnemonic::Popcnt);
    assert_eq!(c.gprs[RAX], 4);
    // RIP-relative.
    c.rip = CODE;
    m.poke_u64(CODE + 0x100, 0xff);
    let o = run(&mut c, &m, &[0xf3, 0x48, 0x0f, 0xb8, 0x05, 0xf7, 0, 0, 0]);
    emulated(&o, Mnemonic::Popcnt);
    assert_eq!(
        c.gprs[RAX],
        8,
        "next RIP {:#x} + 0xf7 = CODE+0x100",
        CODE + 9
    );
}

/// A 32-bit protected-mode vCPU with 32-bit paging (4 MiB pages via PSE) or none.
fn protected32(paging: bool) -> (FakeCpu, FakeMem) {
    let m = FakeMem::new(RAM);
    let mut c = FakeCpu::long64(0);
    c.efer = 0;
    c.cr4 = CR4_OSFXSR | CR4_PSE;
    c.cr0 = CR0_PE | CR0_NE | CR0_WP | if paging { CR0_PG } else { 0 };
    for s in c.segs.iter_mut() {
        s.l = false;
        s.db = true;
    }
    c.cr3 = TABLES;
    // PDE 0 and 1: 4 MiB pages, identity, supervisor; PDE 1 read-only.
    m.poke(TABLES, &(0x83u32).to_le_bytes());
    m.poke(TABLES + 4, &(0x40_0081u32).to_le_bytes());
    c.rip = CODE;
    (c, m)
}

#[test]
fn protected_mode_segment_limits_and_32_bit_paging() {
    let (mut c, m) = protected32(true);
    c.gprs[RDI] = 0x1000;
    m.poke(0x1000, &0x33u32.to_le_bytes());
    // popcnt eax, [edi]
    emulated(
        &run(&mut c, &m, &[0xf3, 0x0f, 0xb8, 0x07]),
        Mnemonic::Popcnt,
    );
    assert_eq!(c.gprs[RAX], 4);
    // Beyond DS's limit → #GP(0).
    c.segs[3].limit = 0xfff;
    assert_eq!(faults(&mut c, &m, &[0xf3, 0x0f, 0xb8, 0x07]), gp(0));
    c.segs[3].limit = 0xffff_ffff;
    // A write to the read-only 4 MiB page.
    c.gprs[RDI] = 0x40_0010;
    assert_eq!(
        faults(&mut c, &m, &[0x0f, 0xae, 0x1f]),
        pf(PF_P | PF_W, 0x40_0010)
    );
    // A read-only data segment refuses writes.
    c.gprs[RDI] = 0x1000;
    c.segs[3].type_ = 1;
    assert_eq!(faults(&mut c, &m, &[0x0f, 0xae, 0x1f]), gp(0));
    // Paging off: linear = physical.
    let (mut c, m) = protected32(false);
    c.gprs[RDI] = 0x2000;
    emulated(&run(&mut c, &m, &[0x0f, 0xae, 0x1f]), Mnemonic::Stmxcsr);
    assert_eq!(m.peek(0x2000, 4), 0x1f80u32.to_le_bytes());
}

#[test]
fn pae_paging() {
    let m = FakeMem::new(RAM);
    let (mut c, _) = protected32(true);
    c.cr4 |= CR4_PAE;
    c.efer = EFER_NXE;
    // PDPT at TABLES (4 entries), PD at TABLES+0x1000: 2 MiB page 0 → 0, user.
    m.poke_u64(TABLES, (TABLES + 0x1000) | 1);
    m.poke_u64(TABLES + 0x1000, 0x87);
    m.poke_u64(TABLES + 0x1008, 0x20_0000 | 0x85); // read-only, user
    c.gprs[RDI] = 0x3000;
    emulated(&run(&mut c, &m, &[0x0f, 0xae, 0x1f]), Mnemonic::Stmxcsr);
    c.gprs[RDI] = 0x20_0040;
    assert_eq!(
        faults(&mut c, &m, &[0x0f, 0xae, 0x1f]),
        pf(PF_P | PF_W, 0x20_0040)
    );
}

#[test]
fn instruction_across_a_page_is_fetched() {
    let (mut c, m) = setup();
    // popcnt rax, rbx ending on the next page; KVM gave only the first 2 bytes.
    c.rip = CODE + 0xffe;
    m.poke(CODE + 0xffe, &[0xf3, 0x48, 0x0f, 0xb8, 0xc3]);
    c.gprs[RBX] = 3;
    emulated(&run(&mut c, &m, &[0xf3, 0x48]), Mnemonic::Popcnt);
    assert_eq!((c.gprs[RAX], c.rip), (2, CODE + 0x1003));
    // No bytes at all from KVM: read them all.
    c.rip = CODE + 0x10;
    m.poke(CODE + 0x10, &[0x0f, 0xae, 0xe8]);
    emulated(&run(&mut c, &m, &[]), Mnemonic::Lfence);
    // The next page not present: #PF on the fetch (I/D set: NXE).
    let (mut c, m) = setup();
    c.rip = SUP_RO - 2; // SUP+0xffe; SUP_RO is mapped, use the page before ABSENT
    c.rip = ABSENT - 2;
    let pt = PageTables::new(&m, TABLES, 4);
    let _ = pt;
    m.poke(ABSENT - 2, &[0xf3, 0x48]);
    assert_eq!(
        faults(&mut c, &m, &[0xf3, 0x48]),
        pf(PF_I, ABSENT),
        "fetch of the second page"
    );
}

// ---- cmpxchg16b / cmpxchg8b ----

fn set128(c: &mut FakeCpu, hi: usize, lo: usize, v: u128) {
    c.gprs[hi] = (v >> 64) as u64;
    c.gprs[lo] = v as u64;
}

#[test]
fn cmpxchg16b_success_and_failure() {
    let (mut c, m) = setup();
    let cur: u128 = 0x1111_2222_3333_4444_5555_6666_7777_8888;
    m.poke(SUP + 0x30, &cur.to_le_bytes());
    c.gprs[RDI] = SUP + 0x30;
    set128(&mut c, RDX, RAX, cur);
    set128(&mut c, RCX, RBX, 42);
    let lock16 = [0xf0, 0x48, 0x0f, 0xc7, 0x0f];
    emulated(&run(&mut c, &m, &lock16), Mnemonic::Cmpxchg16b);
    assert_eq!(m.peek(SUP + 0x30, 16), 42u128.to_le_bytes());
    assert!(c.rflags & FLAG_ZF != 0);
    // Now RDX:RAX (old) differs: ZF = 0, RDX:RAX = memory, memory unchanged.
    c.rflags |= FLAG_CF;
    run(&mut c, &m, &lock16);
    assert!(
        c.rflags & FLAG_ZF == 0 && c.rflags & FLAG_CF != 0,
        "only ZF changes"
    );
    assert_eq!((c.gprs[RDX], c.gprs[RAX]), (0, 42));
    assert_eq!(m.peek(SUP + 0x30, 16), 42u128.to_le_bytes());
    // Without LOCK: the same (still atomic).
    set128(&mut c, RCX, RBX, 7);
    emulated(&run(&mut c, &m, &lock16[1..]), Mnemonic::Cmpxchg16b);
    assert_eq!(m.peek(SUP + 0x30, 16), 7u128.to_le_bytes());
}

#[test]
fn cmpxchg16b_unaligned_is_gp() {
    let (mut c, m) = setup();
    c.gprs[RDI] = SUP + 0x38;
    assert_eq!(faults(&mut c, &m, &[0xf0, 0x48, 0x0f, 0xc7, 0x0f]), gp(0));
    // Read-only page: a write fault even when the compare would fail.
    c.gprs[RDI] = SUP_RO;
    assert_eq!(
        faults(&mut c, &m, &[0xf0, 0x48, 0x0f, 0xc7, 0x0f]),
        pf(PF_P | PF_W, SUP_RO)
    );
}

#[test]
fn cmpxchg8b_aligned_and_inside_a_line() {
    let (mut c, m) = setup();
    m.poke_u64(SUP + 0x40, 0xaaaa_bbbb_cccc_dddd);
    c.gprs[RDI] = SUP + 0x40;
    c.gprs[RDX] = 0xffff_ffff_aaaa_bbbb; // upper halves ignored
    c.gprs[RAX] = 0xcccc_dddd;
    c.gprs[RCX] = 0x1;
    c.gprs[RBX] = 0x2;
    emulated(
        &run(&mut c, &m, &[0xf0, 0x0f, 0xc7, 0x0f]),
        Mnemonic::Cmpxchg8b,
    );
    assert_eq!(m.peek_u64(SUP + 0x40), 0x1_0000_0002);
    assert!(c.rflags & FLAG_ZF != 0);
    // Failure: EDX:EAX = memory, zero-extended.
    run(&mut c, &m, &[0xf0, 0x0f, 0xc7, 0x0f]);
    assert_eq!((c.gprs[RDX], c.gprs[RAX]), (1, 2));
    assert!(c.rflags & FLAG_ZF == 0);
    // Misaligned but inside one 16-byte line.
    m.poke_u64(SUP + 0x54, 5);
    c.gprs[RDI] = SUP + 0x54;
    c.gprs[RDX] = 0;
    c.gprs[RAX] = 5;
    c.gprs[RCX] = 0;
    c.gprs[RBX] = 9;
    emulated(
        &run(&mut c, &m, &[0xf0, 0x0f, 0xc7, 0x0f]),
        Mnemonic::Cmpxchg8b,
    );
    assert_eq!(m.peek_u64(SUP + 0x54), 9);
    // Splitting lines: refused.
    c.gprs[RDI] = SUP + 0x5c;
    assert!(matches!(
        run(&mut c, &m, &[0xf0, 0x0f, 0xc7, 0x0f]),
        Outcome::Unsupported { .. }
    ));
}

#[test]
fn cmpxchg16b_is_atomic_across_threads() {
    const THREADS: u64 = 4;
    const EACH: u64 = 5_000;
    let (proto, m) = setup();
    let counter = SUP + 0x80;
    m.poke(counter, &[0; 16]);
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            let m = &m;
            let mut c = proto.clone();
            s.spawn(move || {
                c.gprs[RDI] = counter;
                let (mut lo, mut hi) = (0u64, 0u64);
                let mut done = 0;
                while done < EACH {
                    // Both halves count, so a torn update would show.
                    c.gprs[RAX] = lo;
                    c.gprs[RDX] = hi;
                    c.gprs[RBX] = lo + 1;
                    c.gprs[RCX] = hi + 1;
                    c.rip = CODE;
                    let o = emulate(&mut c, m, &[0xf0, 0x48, 0x0f, 0xc7, 0x0f]);
                    assert!(matches!(o, Outcome::Emulated { .. }), "{o:?}");
                    if c.rflags & FLAG_ZF != 0 {
                        done += 1;
                        lo += 1;
                        hi += 1;
                    } else {
                        lo = c.gprs[RAX];
                        hi = c.gprs[RDX];
                        assert_eq!(lo, hi, "torn 16-byte value");
                    }
                }
            });
        }
    });
    let v = u128::from_le_bytes(m.peek(counter, 16).try_into().unwrap());
    assert_eq!(
        v,
        (u128::from(THREADS * EACH) << 64) | u128::from(THREADS * EACH)
    );
}

// ---- fwait, fences ----

#[test]
fn fwait_nm_mf_and_nop() {
    let (mut c, m) = setup();
    emulated(&run(&mut c, &m, &[0x9b]), Mnemonic::Wait);
    assert_eq!(c.rip, CODE + 1);
    c.cr0 |= CR0_TS;
    assert_eq!(faults(&mut c, &m, &[0x9b]), Exception::new(NM));
    c.cr0 &= !CR0_MP;
    emulated(&run(&mut c, &m, &[0x9b]), Mnemonic::Wait);
    // A pending unmasked x87 exception (FSW.ES) with CR0.NE: #MF.
    c.xsave[2..4].copy_from_slice(&0x0081u16.to_le_bytes());
    assert_eq!(faults(&mut c, &m, &[0x9b]), Exception::new(MF));
    c.cr0 &= !CR0_NE;
    emulated(&run(&mut c, &m, &[0x9b]), Mnemonic::Wait);
}

#[test]
fn fences() {
    let (mut c, m) = setup();
    for (b, mn) in [
        (0xe8, Mnemonic::Lfence),
        (0xf0, Mnemonic::Mfence),
        (0xf8, Mnemonic::Sfence),
    ] {
        c.rip = CODE;
        emulated(&run(&mut c, &m, &[0x0f, 0xae, b]), mn);
        assert_eq!(c.rip, CODE + 3);
    }
}

// ---- fxsave / fxrstor ----

fn fill_fpu(c: &mut FakeCpu) {
    c.xsave[0..2].copy_from_slice(&0x027fu16.to_le_bytes()); // FCW
    c.xsave[2..4].copy_from_slice(&0x3800u16.to_le_bytes()); // FSW (TOP = 7)
    c.xsave[4] = 0x80; // abridged tag: ST7 valid
    c.xsave[8..16].copy_from_slice(&0xffff_8000_1234_5678u64.to_le_bytes()); // FIP
    c.xsave[16..24].copy_from_slice(&0xffff_8000_8765_4321u64.to_le_bytes()); // FDP
    c.xsave[24..28].copy_from_slice(&0x1fa0u32.to_le_bytes());
    for i in 0..8 {
        c.xsave[32 + 16 * i] = 0x10 + i as u8;
    }
    for i in 0..16 {
        c.xsave[160 + 16 * i] = 0xa0 + i as u8;
        c.xsave[175 + 16 * i] = 0x5a;
    }
}

#[test]
fn fxsave64_fxrstor64_round_trip() {
    let (mut c, m) = setup();
    fill_fpu(&mut c);
    c.gprs[RDI] = SUP + 0x200;
    emulated(
        &run(&mut c, &m, &[0x48, 0x0f, 0xae, 0x07]),
        Mnemonic::Fxsave64,
    );
    let img = m.peek(SUP + 0x200, 512);
    assert_eq!(&img[0..2], &0x027fu16.to_le_bytes());
    assert_eq!(&img[8..16], &0xffff_8000_1234_5678u64.to_le_bytes());
    assert_eq!(&img[24..28], &0x1fa0u32.to_le_bytes());
    assert_eq!(&img[28..32], &0xffffu32.to_le_bytes(), "MXCSR_MASK");
    assert_eq!(img[160 + 16 * 15], 0xaf, "XMM15 saved in 64-bit mode");
    assert_eq!(&img[..416], &c.xsave[..416]);
    // Change memory, restore, and see it in the state.
    let mut changed = img.clone();
    changed[0] = 0x7f;
    changed[160] = 0x99;
    changed[24..28].copy_from_slice(&0x9fc0u32.to_le_bytes());
    m.poke(SUP + 0x200, &changed);
    emulated(
        &run(&mut c, &m, &[0x48, 0x0f, 0xae, 0x0f]),
        Mnemonic::Fxrstor64,
    );
    assert_eq!(c.xsave[0], 0x7f);
    assert_eq!(c.xsave[160], 0x99);
    assert_eq!(&c.xsave[24..28], &0x9fc0u32.to_le_bytes());
}

#[test]
fn fxsave_32_bit_form_stores_32_bit_pointers() {
    let (mut c, m) = setup();
    fill_fpu(&mut c);
    c.gprs[RDI] = SUP + 0x200;
    emulated(&run(&mut c, &m, &[0x0f, 0xae, 0x07]), Mnemonic::Fxsave);
    let img = m.peek(SUP + 0x200, 32);
    assert_eq!(&img[8..16], &[0x78, 0x56, 0x34, 0x12, 0, 0, 0, 0]);
    assert_eq!(&img[16..24], &[0x21, 0x43, 0x65, 0x87, 0, 0, 0, 0]);
    emulated(&run(&mut c, &m, &[0x0f, 0xae, 0x0f]), Mnemonic::Fxrstor);
    assert_eq!(&c.xsave[8..16], &0x1234_5678u64.to_le_bytes());
}

#[test]
fn fxsave_faults() {
    let (mut c, m) = setup();
    c.gprs[RDI] = SUP + 0x208;
    assert_eq!(faults(&mut c, &m, &[0x48, 0x0f, 0xae, 0x07]), gp(0));
    c.gprs[RDI] = SUP + 0x200;
    c.cr0 |= CR0_TS;
    assert_eq!(
        faults(&mut c, &m, &[0x48, 0x0f, 0xae, 0x07]),
        Exception::new(NM)
    );
    c.cr0 &= !CR0_TS;
    c.cr0 |= CR0_EM;
    assert_eq!(
        faults(&mut c, &m, &[0x48, 0x0f, 0xae, 0x0f]),
        Exception::new(NM)
    );
    c.cr0 &= !CR0_EM;
    // fxrstor with reserved MXCSR bits.
    let mut img = vec![0u8; 512];
    img[24..28].copy_from_slice(&0x1_0000u32.to_le_bytes());
    m.poke(SUP + 0x200, &img);
    assert_eq!(faults(&mut c, &m, &[0x48, 0x0f, 0xae, 0x0f]), gp(0));
    // Crossing into an absent page: the fault comes before any write.
    let (mut c, m) = setup();
    c.gprs[RDI] = ABSENT - 0x100;
    let before = m.peek(ABSENT - 0x100, 0x100);
    assert_eq!(
        faults(&mut c, &m, &[0x48, 0x0f, 0xae, 0x07]),
        pf(PF_W, ABSENT)
    );
    assert_eq!(m.peek(ABSENT - 0x100, 0x100), before, "nothing written");
}

// ---- xsave family ----

fn fill_avx(c: &mut FakeCpu) {
    for i in 0..256 {
        c.xsave[576 + i] = i as u8;
    }
    let bv = u64::from_le_bytes(c.xsave[512..520].try_into().unwrap()) | 4;
    c.xsave[512..520].copy_from_slice(&bv.to_le_bytes());
}

#[test]
fn xsave_standard_format() {
    let (mut c, m) = setup();
    fill_fpu(&mut c);
    fill_avx(&mut c);
    c.gprs[RDI] = SUP + 0x400;
    c.gprs[RAX] = 0xffff_ffff;
    c.gprs[RDX] = 0xffff_ffff;
    // Stale header bits outside RFBM survive: put bit 9 there first.
    m.poke_u64(SUP + 0x400 + 512, 1 << 9);
    emulated(
        &run(&mut c, &m, &[0x48, 0x0f, 0xae, 0x27]),
        Mnemonic::Xsave64,
    );
    let a = m.peek(SUP + 0x400, 832);
    assert_eq!(&a[0..416], &c.xsave[0..416]);
    assert_eq!(
        u64::from_le_bytes(a[512..520].try_into().unwrap()),
        7 | 1 << 9
    );
    assert_eq!(&a[576..832], &c.xsave[576..832]);
    // RFBM = x87 only: SSE and AVX untouched in memory.
    let (mut c2, m2) = setup();
    fill_avx(&mut c2);
    c2.gprs[RDI] = SUP + 0x400;
    c2.gprs[RAX] = 1;
    emulated(&run(&mut c2, &m2, &[0x0f, 0xae, 0x27]), Mnemonic::Xsave);
    assert_eq!(m2.peek(SUP + 0x400 + 576, 4), [0; 4]);
    assert_eq!(m2.peek_u64(SUP + 0x400 + 512), 1);
}

#[test]
fn xrstor_standard_format_loads_and_inits() {
    let (mut c, m) = setup();
    fill_fpu(&mut c);
    fill_avx(&mut c);
    let base = SUP + 0x400;
    let mut a = vec![0u8; 832];
    a[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
    a[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
    a[160] = 0x42;
    a[576] = 0x77;
    // XSTATE_BV = SSE | AVX: x87 goes to its initial state.
    a[512..520].copy_from_slice(&6u64.to_le_bytes());
    m.poke(base, &a);
    c.gprs[RDI] = base;
    c.gprs[RAX] = 7;
    emulated(
        &run(&mut c, &m, &[0x48, 0x0f, 0xae, 0x2f]),
        Mnemonic::Xrstor64,
    );
    let bv = u64::from_le_bytes(c.xsave[512..520].try_into().unwrap());
    assert_eq!(bv & 7, 6, "x87 marked initial");
    assert_eq!(c.xsave[160], 0x42);
    assert_eq!(c.xsave[576], 0x77);
    // Then AVX only requested with XSTATE_BV[2] = 0: AVX initialised, SSE kept.
    a[512..520].copy_from_slice(&2u64.to_le_bytes());
    m.poke(base, &a);
    c.gprs[RAX] = 4;
    emulated(
        &run(&mut c, &m, &[0x48, 0x0f, 0xae, 0x2f]),
        Mnemonic::Xrstor64,
    );
    let bv = u64::from_le_bytes(c.xsave[512..520].try_into().unwrap());
    assert_eq!(bv & 4, 0);
    assert_eq!(c.xsave[160], 0x42);
}

#[test]
fn xrstor_header_checks() {
    let (mut c, m) = setup();
    let base = SUP + 0x400;
    c.gprs[RDI] = base;
    c.gprs[RAX] = 7;
    let mut a = vec![0u8; 832];
    a[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
    // XSTATE_BV bit not in XCR0.
    a[512..520].copy_from_slice(&(1u64 << 9).to_le_bytes());
    m.poke(base, &a);
    assert_eq!(faults(&mut c, &m, &[0x0f, 0xae, 0x2f]), gp(0));
    // Reserved header bytes 8..24 in the standard format.
    a[512..520].copy_from_slice(&0u64.to_le_bytes());
    a[512 + 16] = 1;
    m.poke(base, &a);
    assert_eq!(faults(&mut c, &m, &[0x0f, 0xae, 0x2f]), gp(0));
    a[512 + 16] = 0;
    // MXCSR reserved bits.
    a[24..28].copy_from_slice(&0xffff_0000u32.to_le_bytes());
    m.poke(base, &a);
    assert_eq!(faults(&mut c, &m, &[0x0f, 0xae, 0x2f]), gp(0));
    // Compacted: XSTATE_BV not a subset of XCOMP_BV.
    a[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
    a[512..520].copy_from_slice(&4u64.to_le_bytes());
    a[520..528].copy_from_slice(&(COMPACTED_BIT | 2).to_le_bytes());
    m.poke(base, &a);
    assert_eq!(faults(&mut c, &m, &[0x0f, 0xae, 0x2f]), gp(0));
    // Misaligned.
    c.gprs[RDI] = base + 0x10;
    assert_eq!(faults(&mut c, &m, &[0x0f, 0xae, 0x2f]), gp(0));
    // CR4.OSXSAVE clear: #UD.
    c.gprs[RDI] = base;
    c.cr4 &= !CR4_OSXSAVE;
    assert_eq!(faults(&mut c, &m, &[0x0f, 0xae, 0x2f]), Exception::new(UD));
}

const COMPACTED_BIT: u64 = 1 << 63;

#[test]
fn xsavec_and_compacted_xrstor() {
    let (mut c, m) = setup();
    fill_fpu(&mut c);
    fill_avx(&mut c);
    let base = SUP + 0x400;
    c.gprs[RDI] = base;
    c.gprs[RAX] = 7;
    emulated(&run(&mut c, &m, &[0x0f, 0xc7, 0x27]), Mnemonic::Xsavec);
    let a = m.peek(base, 832);
    assert_eq!(u64::from_le_bytes(a[512..520].try_into().unwrap()), 7);
    assert_eq!(
        u64::from_le_bytes(a[520..528].try_into().unwrap()),
        COMPACTED_BIT | 7
    );
    assert_eq!(&a[576..832], &c.xsave[576..832], "AVX first at 576");
    // Round trip through a fresh vCPU.
    let (mut d, _) = setup();
    d.gprs[RDI] = base;
    d.gprs[RAX] = 7;
    emulated(&run(&mut d, &m, &[0x0f, 0xae, 0x2f]), Mnemonic::Xrstor);
    assert_eq!(&d.xsave[576..832], &c.xsave[576..832]);
    assert_eq!(&d.xsave[160..416], &c.xsave[160..416]);
    // xsaves at CPL3: #GP(0); xrstors of a standard-format area: #GP(0).
    let (mut u, m2) = setup_with(true);
    u.gprs[RDI] = USR;
    assert_eq!(faults(&mut u, &m2, &[0x0f, 0xc7, 0x2f]), gp(0));
    c.gprs[RDI] = SUP + 0xc00;
    m.poke(SUP + 0xc00, &[0u8; 576]);
    assert_eq!(faults(&mut c, &m, &[0x0f, 0xc7, 0x1f]), gp(0));
    // xsaves + xrstors round trip (no supervisor components: XSS = 0).
    c.gprs[RDI] = base;
    emulated(&run(&mut c, &m, &[0x0f, 0xc7, 0x2f]), Mnemonic::Xsaves);
    emulated(&run(&mut c, &m, &[0x0f, 0xc7, 0x1f]), Mnemonic::Xrstors);
    // A requested supervisor component: refused.
    c.msrs.insert(MSR_IA32_XSS, 1 << 8);
    c.gprs[RDX] = 0;
    c.gprs[RAX] = 0x107;
    assert!(matches!(
        run(&mut c, &m, &[0x0f, 0xc7, 0x2f]),
        Outcome::Unsupported { .. }
    ));
}

#[test]
fn xsaveopt_skips_initial_components() {
    let (mut c, m) = setup();
    let base = SUP + 0x400;
    m.poke(base + 576, &[0xee; 256]);
    c.gprs[RDI] = base;
    c.gprs[RAX] = 7;
    // AVX not in use (XSTATE_BV = 3): xsaveopt leaves its bytes alone.
    emulated(&run(&mut c, &m, &[0x0f, 0xae, 0x37]), Mnemonic::Xsaveopt);
    assert_eq!(m.peek(base + 576, 4), [0xee; 4]);
    assert_eq!(m.peek_u64(base + 512), 3);
    // xsave writes the initial values.
    emulated(&run(&mut c, &m, &[0x0f, 0xae, 0x27]), Mnemonic::Xsave);
    assert_eq!(m.peek(base + 576, 4), [0; 4]);
}

#[test]
fn xgetbv_and_pkru() {
    let (mut c, m) = setup();
    c.gprs[RCX] = 0;
    emulated(&run(&mut c, &m, &[0x0f, 0x01, 0xd0]), Mnemonic::Xgetbv);
    assert_eq!((c.gprs[RDX], c.gprs[RAX]), (0, 7));
    c.gprs[RCX] = 1;
    run(&mut c, &m, &[0x0f, 0x01, 0xd0]);
    assert_eq!(c.gprs[RAX], 3, "XINUSE & XCR0");
    c.gprs[RCX] = 2;
    assert_eq!(faults(&mut c, &m, &[0x0f, 0x01, 0xd0]), gp(0));
    // PKRU
    assert_eq!(faults(&mut c, &m, &[0x0f, 0x01, 0xee]), Exception::new(UD));
    c.cr4 |= CR4_PKE;
    c.gprs[RCX] = 0;
    c.gprs[RDX] = 0;
    c.gprs[RAX] = 0x55;
    emulated(&run(&mut c, &m, &[0x0f, 0x01, 0xef]), Mnemonic::Wrpkru);
    c.gprs[RAX] = 0;
    emulated(&run(&mut c, &m, &[0x0f, 0x01, 0xee]), Mnemonic::Rdpkru);
    assert_eq!(c.gprs[RAX], 0x55);
    c.gprs[RDX] = 1;
    assert_eq!(faults(&mut c, &m, &[0x0f, 0x01, 0xef]), gp(0));
}

// ---- ldmxcsr / stmxcsr ----

#[test]
fn ldmxcsr_stmxcsr() {
    let (mut c, m) = setup();
    m.poke(SUP + 0x10, &0x9fc0u32.to_le_bytes());
    c.gprs[RDI] = SUP + 0x10;
    emulated(&run(&mut c, &m, &[0x0f, 0xae, 0x17]), Mnemonic::Ldmxcsr);
    assert_eq!(&c.xsave[24..28], &0x9fc0u32.to_le_bytes());
    c.gprs[RDI] = SUP + 0x20;
    emulated(&run(&mut c, &m, &[0x0f, 0xae, 0x1f]), Mnemonic::Stmxcsr);
    assert_eq!(m.peek(SUP + 0x20, 4), 0x9fc0u32.to_le_bytes());
    // VEX forms.
    m.poke(SUP + 0x10, &0x1f80u32.to_le_bytes());
    c.gprs[RDI] = SUP + 0x10;
    emulated(
        &run(&mut c, &m, &[0xc5, 0xf8, 0xae, 0x17]),
        Mnemonic::Vldmxcsr,
    );
    assert_eq!(&c.xsave[24..28], &0x1f80u32.to_le_bytes());
    // Reserved bits (beyond MXCSR_MASK).
    c.xsave[28..32].copy_from_slice(&0xffbfu32.to_le_bytes());
    m.poke(SUP + 0x10, &0x40u32.to_le_bytes()); // DAZ, masked out
    assert_eq!(faults(&mut c, &m, &[0x0f, 0xae, 0x17]), gp(0));
    // #UD without CR4.OSFXSR; #NM with CR0.TS.
    c.cr4 &= !CR4_OSFXSR;
    assert_eq!(faults(&mut c, &m, &[0x0f, 0xae, 0x1f]), Exception::new(UD));
    c.cr4 |= CR4_OSFXSR;
    c.cr0 |= CR0_TS;
    assert_eq!(faults(&mut c, &m, &[0x0f, 0xae, 0x1f]), Exception::new(NM));
}

// ---- rdrand, rdseed, rdtscp, rdpid ----

#[test]
fn rdrand_rdseed() {
    let (mut c, m) = setup();
    c.rflags = 2 | FLAG_ZF | FLAG_OF;
    emulated(
        &run(&mut c, &m, &[0x48, 0x0f, 0xc7, 0xf0]),
        Mnemonic::Rdrand,
    );
    assert_eq!(c.gprs[RAX], 0x0123_4567_89ab_cdef);
    assert_eq!(c.rflags, 2 | FLAG_CF);
    c.gprs[RBX] = u64::MAX;
    emulated(
        &run(&mut c, &m, &[0x66, 0x0f, 0xc7, 0xfb]),
        Mnemonic::Rdseed,
    );
    assert_eq!(c.gprs[RBX], 0xffff_ffff_ffff_cdef, "16-bit form merges");
    c.random = None;
    emulated(&run(&mut c, &m, &[0x0f, 0xc7, 0xf0]), Mnemonic::Rdrand);
    assert_eq!((c.gprs[RAX], c.rflags & FLAG_CF), (0, 0));
}

#[test]
fn rdtscp_rdpid_rdtsc() {
    let (mut c, m) = setup();
    c.gprs[RCX] = u64::MAX;
    emulated(&run(&mut c, &m, &[0x0f, 0x01, 0xf9]), Mnemonic::Rdtscp);
    assert_eq!(c.gprs[RDX], 0x1234);
    assert_eq!(c.gprs[RAX], 0x5678_9abc);
    assert_eq!(c.gprs[RCX], 7);
    emulated(&run(&mut c, &m, &[0xf3, 0x0f, 0xc7, 0xfb]), Mnemonic::Rdpid);
    assert_eq!(c.gprs[RBX], 7);
    // CR4.TSD at CPL3: #GP(0).
    let (mut u, m) = setup_with(true);
    u.cr4 |= CR4_TSD;
    assert_eq!(faults(&mut u, &m, &[0x0f, 0x01, 0xf9]), gp(0));
    assert_eq!(faults(&mut u, &m, &[0x0f, 0x31]), gp(0));
    u.cr4 &= !CR4_TSD;
    emulated(&run(&mut u, &m, &[0x0f, 0x31]), Mnemonic::Rdtsc);
}

// ---- swapgs, sysret ----

#[test]
fn swapgs_swaps_and_checks() {
    let (mut c, m) = setup();
    c.segs[5].base = 0x1111;
    emulated(&run(&mut c, &m, &[0x0f, 0x01, 0xf8]), Mnemonic::Swapgs);
    assert_eq!(c.segs[5].base, 0xffff_8880_0000_1000);
    assert_eq!(c.msrs[&MSR_KERNEL_GS_BASE], 0x1111);
    let (mut u, m) = setup_with(true);
    assert_eq!(faults(&mut u, &m, &[0x0f, 0x01, 0xf8]), gp(0));
    let (mut p, m) = protected32(false);
    assert_eq!(faults(&mut p, &m, &[0x0f, 0x01, 0xf8]), Exception::new(UD));
}

#[test]
fn sysretq_to_user() {
    let (mut c, m) = setup();
    c.gprs[RCX] = 0x40_1234;
    c.gprs[R11] = 0xffff_ffff_ffff_ffff;
    emulated(&run(&mut c, &m, &[0x48, 0x0f, 0x07]), Mnemonic::Sysretq);
    assert_eq!(c.rip, 0x40_1234);
    assert_eq!(c.rflags, 0x3c_7fd7 | 2);
    let (cs, ss) = (c.segs[1], c.segs[2]);
    assert_eq!(
        (cs.selector, cs.dpl, cs.l, cs.db, cs.type_),
        (0x33, 3, true, false, 0xb)
    );
    assert_eq!((ss.selector, ss.dpl, ss.type_, ss.db), (0x2b, 3, 3, true));
    // Now at CPL3: another sysret is #GP(0).
    assert_eq!(faults(&mut c, &m, &[0x48, 0x0f, 0x07]), gp(0));
    // 32-bit form: CS = STAR[63:48], compatibility mode, RIP = ECX.
    let (mut c, m) = setup();
    c.gprs[RCX] = 0xdead_0000_0040_1000;
    emulated(&run(&mut c, &m, &[0x0f, 0x07]), Mnemonic::Sysret);
    assert_eq!(
        (c.segs[1].selector, c.segs[1].l, c.rip),
        (0x23, false, 0x40_1000)
    );
    // Non-canonical RCX, EFER.SCE clear.
    let (mut c, m) = setup();
    c.gprs[RCX] = 0x8000_0000_0000;
    assert_eq!(faults(&mut c, &m, &[0x48, 0x0f, 0x07]), gp(0));
    c.efer &= !EFER_SCE;
    assert_eq!(faults(&mut c, &m, &[0x48, 0x0f, 0x07]), Exception::new(UD));
}

// ---- verw / verr ----

fn with_gdt(c: &mut FakeCpu, m: &FakeMem) {
    let gdt = SUP + 0x800;
    let descs: [u64; 5] = [
        0,
        0x00af_9a00_0000_ffff, // 0x08 kernel code
        0x00cf_9200_0000_ffff, // 0x10 kernel data
        0x00cf_f200_0000_ffff, // 0x18 user data
        0x00af_fa00_0000_ffff, // 0x20 user code
    ];
    for (i, d) in descs.iter().enumerate() {
        m.poke_u64(gdt + 8 * i as u64, *d);
    }
    c.gdt = DescTable {
        base: gdt,
        limit: 5 * 8 - 1,
    };
}

#[test]
fn verw_verr() {
    let (mut c, m) = setup();
    with_gdt(&mut c, &m);
    let zf = |c: &mut FakeCpu, m: &FakeMem, sel: u64, bytes: &[u8]| {
        c.gprs[RAX] = sel;
        emulated(
            &run(c, m, bytes),
            if bytes[2] & 0x38 == 0x28 {
                Mnemonic::Verw
            } else {
                Mnemonic::Verr
            },
        );
        c.rflags & FLAG_ZF != 0
    };
    let verw = [0x0f, 0x00, 0xe8];
    let verr = [0x0f, 0x00, 0xe0];
    assert!(zf(&mut c, &m, 0x10, &verw), "kernel data is writable");
    assert!(!zf(&mut c, &m, 0x08, &verw), "code is never writable");
    assert!(zf(&mut c, &m, 0x08, &verr), "readable code");
    assert!(!zf(&mut c, &m, 0, &verw), "null");
    assert!(!zf(&mut c, &m, 0x30, &verw), "beyond the GDT limit");
    assert!(!zf(&mut c, &m, 0x13, &verw), "RPL 3 > DPL 0");
    assert!(zf(&mut c, &m, 0x1b, &verw));
    // The memory form (Linux's mds_clear_cpu_buffers: verw [rip+ds_sel]).
    m.poke(SUP + 0x10, &0x10u16.to_le_bytes());
    c.gprs[RDI] = SUP + 0x10;
    c.rflags = 2;
    emulated(&run(&mut c, &m, &[0x0f, 0x00, 0x2f]), Mnemonic::Verw);
    assert!(c.rflags & FLAG_ZF != 0);
    // From CPL3: the kernel's data segment is not accessible.
    let (mut u, m) = setup_with(true);
    with_gdt(&mut u, &m);
    u.gprs[RAX] = 0x10;
    emulated(&run(&mut u, &m, &verw), Mnemonic::Verw);
    assert!(u.rflags & FLAG_ZF == 0);
}

// ---- clac/stac, ud2, int3, vmcall, monitor/mwait, hlt, fsgsbase ----

#[test]
fn clac_stac() {
    let (mut c, m) = setup();
    emulated(&run(&mut c, &m, &[0x0f, 0x01, 0xcb]), Mnemonic::Stac);
    assert!(c.rflags & FLAG_AC != 0);
    emulated(&run(&mut c, &m, &[0x0f, 0x01, 0xca]), Mnemonic::Clac);
    assert!(c.rflags & FLAG_AC == 0);
    let (mut u, m) = setup_with(true);
    assert_eq!(faults(&mut u, &m, &[0x0f, 0x01, 0xcb]), Exception::new(UD));
    let (mut c, m) = setup();
    c.cpuid.get_mut(&(7, 0)).unwrap().ebx &= !(1 << 20);
    assert_eq!(faults(&mut c, &m, &[0x0f, 0x01, 0xca]), Exception::new(UD));
}

#[test]
fn ud2_and_invalid_encodings_are_ud() {
    let (mut c, m) = setup();
    let o = run(&mut c, &m, &[0x0f, 0x0b]);
    assert_eq!(
        o,
        Outcome::Exception {
            mnemonic: Mnemonic::Ud2,
            exception: Exception::new(UD)
        }
    );
    assert_eq!(c.rip, CODE, "a fault: RIP stays");
    // LOCK on a non-lockable instruction.
    assert_eq!(
        faults(&mut c, &m, &[0xf0, 0x0f, 0xae, 0xe8]),
        Exception::new(UD)
    );
    // cmpxchg16b with a register operand.
    assert_eq!(
        faults(&mut c, &m, &[0x48, 0x0f, 0xc7, 0xc8]),
        Exception::new(UD)
    );
}

#[test]
fn int3_is_a_trap_and_checks_the_gate() {
    let (mut c, m) = setup();
    let gate_lo = |dpl: u64| 0x0000_8e00_0008_0000u64 | dpl << 45;
    let idt = SUP + 0x900;
    m.poke_u64(idt + 3 * 16, gate_lo(0));
    c.idt = DescTable {
        base: idt,
        limit: 0xfff,
    };
    let o = run(&mut c, &m, &[0xcc]);
    assert_eq!(exc(&o), Exception::new(BP));
    assert_eq!(c.rip, CODE + 1, "RIP past int3");
    c.rip = CODE;
    run(&mut c, &m, &[0xcd, 0x03]);
    assert_eq!(c.rip, CODE + 2);
    // CPL3 with a DPL0 #BP gate: #GP(3*8+2).
    let (mut u, m) = setup_with(true);
    u.idt = c.idt;
    m.poke_u64(idt + 3 * 16, gate_lo(0));
    assert_eq!(faults(&mut u, &m, &[0xcc]), gp(26));
    m.poke_u64(idt + 3 * 16, gate_lo(3));
    assert_eq!(exc(&run(&mut u, &m, &[0xcc])), Exception::new(BP));
    // Beyond the IDT limit; a gate that is not present.
    u.idt.limit = 0x2f;
    assert_eq!(faults(&mut u, &m, &[0xcc]), gp(26));
    u.idt.limit = 0xfff;
    m.poke_u64(idt + 3 * 16, gate_lo(3) & !(1 << 47));
    assert_eq!(faults(&mut u, &m, &[0xcc]), Exception::with_code(NP, 26));
}

#[test]
fn int_n_checks_the_gate_then_delivers_an_interrupt() {
    let (mut u, m) = setup_with(true);
    let idt = SUP;
    u.idt = DescTable {
        base: idt,
        limit: 0xfff,
    };
    // int 0x80 with a DPL3 interrupt gate: delivered, RIP past it.
    m.poke_u64(idt + 0x80 * 16, 0x0000_ee00_0008_0000);
    let o = run(&mut u, &m, &[0xcd, 0x80]);
    assert_eq!(
        o,
        Outcome::Interrupt {
            mnemonic: Mnemonic::Int,
            vector: 0x80
        }
    );
    assert_eq!(u.rip, CODE + 2);
    // No gate (a zero descriptor): #GP(0x80*8+2); a DPL0 gate from CPL3 too.
    u.rip = CODE;
    assert_eq!(faults(&mut u, &m, &[0xcd, 0x81]), gp(0x81 * 8 + 2));
    m.poke_u64(idt + 0x80 * 16, 0x0000_8e00_0008_0000);
    assert_eq!(faults(&mut u, &m, &[0xcd, 0x80]), gp(0x80 * 8 + 2));
    // Real mode: no checks (the IVT has no DPL).
    let (mut c, m) = setup();
    c.cr0 = 0;
    c.efer = 0;
    for s in c.segs.iter_mut() {
        s.l = false;
        s.db = false;
        s.limit = 0xffff;
    }
    c.rip = 0x7c00;
    let o = run(&mut c, &m, &[0xcd, 0x10]);
    assert_eq!(
        o,
        Outcome::Interrupt {
            mnemonic: Mnemonic::Int,
            vector: 0x10
        }
    );
    assert_eq!(c.rip, 0x7c02);
}

/// Fuzz finding (regressions/emulate/crash-idt-gate-straddles-page): the gate
/// read of int3/int n assumed the 8 bytes sat in one page; an IDT base that is not
/// 8-aligned put them across a page boundary (the fake memory's contract check
/// caught it; on real memory it read past the page's host mapping).
#[test]
fn int3_gate_read_across_a_page() {
    let (mut c, m) = setup();
    // The #BP gate's first 8 bytes at TWO+0xffc..TWO+0x1004.
    let base = TWO + 0xffc - 3 * 16;
    c.idt = DescTable { base, limit: 0xfff };
    let gate = 0x0000_8e00_0008_0000u64;
    m.poke(TWO + 0xffc, &gate.to_le_bytes());
    assert_eq!(exc(&run(&mut c, &m, &[0xcc])), Exception::new(BP));
    // Not present: #NP, read from both pages.
    m.poke(TWO + 0xffc, &(gate & !(1 << 47)).to_le_bytes());
    c.rip = CODE;
    assert_eq!(faults(&mut c, &m, &[0xcc]), Exception::with_code(NP, 26));
}

#[test]
fn unserved_hypercall_answers_enosys() {
    let (mut c, m) = setup();
    c.gprs[RAX] = 9; // KVM_HC_CLOCK_PAIRING
    emulated(&run(&mut c, &m, &[0x0f, 0x01, 0xc1]), Mnemonic::Vmcall);
    assert_eq!(c.gprs[RAX] as i64, -1000);
    assert_eq!(c.rip, CODE + 3);
    emulated(&run(&mut c, &m, &[0x0f, 0x01, 0xd9]), Mnemonic::Vmmcall);
}

#[test]
fn monitor_mwait_hlt() {
    let (mut c, m) = setup();
    c.gprs[RAX] = SUP;
    emulated(&run(&mut c, &m, &[0x0f, 0x01, 0xc8]), Mnemonic::Monitor);
    c.gprs[RAX] = ABSENT;
    assert_eq!(faults(&mut c, &m, &[0x0f, 0x01, 0xc8]), pf(0, ABSENT));
    c.gprs[RCX] = 1;
    emulated(&run(&mut c, &m, &[0x0f, 0x01, 0xc9]), Mnemonic::Mwait);
    c.gprs[RCX] = 2;
    assert_eq!(faults(&mut c, &m, &[0x0f, 0x01, 0xc9]), gp(0));
    emulated(&run(&mut c, &m, &[0xf4]), Mnemonic::Hlt);
    assert!(c.halted);
    let (mut u, m) = setup_with(true);
    assert_eq!(faults(&mut u, &m, &[0xf4]), gp(0));
    assert_eq!(faults(&mut u, &m, &[0x0f, 0x01, 0xc9]), Exception::new(UD));
}

#[test]
fn fs_gs_base_instructions() {
    let (mut c, m) = setup();
    c.gprs[RAX] = 0xffff_8000_0000_0000;
    emulated(
        &run(&mut c, &m, &[0xf3, 0x48, 0x0f, 0xae, 0xd0]),
        Mnemonic::Wrfsbase,
    );
    assert_eq!(c.segs[4].base, 0xffff_8000_0000_0000);
    emulated(
        &run(&mut c, &m, &[0xf3, 0x48, 0x0f, 0xae, 0xc3]),
        Mnemonic::Rdfsbase,
    );
    assert_eq!(c.gprs[RBX], 0xffff_8000_0000_0000);
    c.gprs[RAX] = 0x8000_0000_0000;
    assert_eq!(faults(&mut c, &m, &[0xf3, 0x48, 0x0f, 0xae, 0xd8]), gp(0));
    c.cr4 &= !CR4_FSGSBASE;
    assert_eq!(
        faults(&mut c, &m, &[0xf3, 0x48, 0x0f, 0xae, 0xc0]),
        Exception::new(UD)
    );
}

#[test]
fn unsupported_names_the_instruction() {
    let (mut c, m) = setup();
    // crc32 eax, ebx
    match run(&mut c, &m, &[0xf2, 0x0f, 0x38, 0xf1, 0xc3]) {
        Outcome::Unsupported { text } => assert!(text.contains("crc32 eax,ebx"), "{text}"),
        o => panic!("{o:?}"),
    }
}

#[test]
fn stats_serialise_by_name() {
    let mut s = EmulationStats::default();
    s.record(Mnemonic::Popcnt, 100);
    s.record(Mnemonic::Popcnt, 50);
    s.record(Mnemonic::Cmpxchg16b, 7);
    let mut t = EmulationStats::default();
    t.merge(&s);
    let v = serde_json::to_value(&t).unwrap();
    assert_eq!(v["popcnt"]["count"], 2);
    assert_eq!(v["popcnt"]["total_ns"], 150);
    assert_eq!(v["cmpxchg16b"]["count"], 1);
}

// ---- fuzz-style: random bytes and states ----

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Instruction starts the fallback handles, so random tails exercise their paths.
const SEEDS: &[&[u8]] = &[
    &[0xf3, 0x0f, 0xb8],
    &[0xf3, 0x48, 0x0f, 0xb8],
    &[0xf0, 0x48, 0x0f, 0xc7],
    &[0x0f, 0xc7],
    &[0x48, 0x0f, 0xae],
    &[0x0f, 0xae],
    &[0x0f, 0x01],
    &[0x0f, 0x00],
    &[0x48, 0x0f, 0x07],
    &[0x9b],
    &[0xcc],
    &[0xf3, 0x48, 0x0f, 0xae],
    &[0xc5, 0xf8, 0xae],
    &[0x66, 0x0f, 0xc7],
    &[0x65],
];

/// Random CPU state around a valid one (the fuzz target does the same).
fn random_state(r: &mut Rng, c: &mut FakeCpu) {
    for g in c.gprs.iter_mut() {
        *g = match r.next() % 4 {
            0 => r.next(),
            1 => SUP + (r.next() % 0x2000),
            2 => r.next() % (RAM as u64 * 2),
            _ => 0,
        };
    }
    if r.next().is_multiple_of(4) {
        c.cr0 ^= 1 << (r.next() % 32);
    }
    if r.next().is_multiple_of(4) {
        c.cr4 ^= 1 << (r.next() % 23);
    }
    if r.next().is_multiple_of(4) {
        c.efer ^= 1 << (r.next() % 15);
    }
    if r.next().is_multiple_of(4) {
        c.rflags ^= 1 << (r.next() % 22);
    }
    if r.next().is_multiple_of(8) {
        c.cr3 = r.next() % (RAM as u64 * 2);
    }
    if r.next().is_multiple_of(4) {
        let s = (r.next() % 6) as usize;
        c.segs[s].selector = r.next() as u16;
        c.segs[s].l = r.next() & 1 != 0;
        c.segs[s].db = r.next() & 1 != 0;
        c.segs[s].unusable = r.next() & 1 != 0;
        c.segs[s].limit = r.next() as u32;
        c.segs[s].type_ = (r.next() & 15) as u8;
        c.segs[s].base = r.next() % (RAM as u64 * 2);
    }
    if r.next().is_multiple_of(4) {
        c.xcr0 = r.next() & 0x2ff;
    }
    if r.next().is_multiple_of(4) {
        let o = (r.next() % 4096) as usize;
        c.xsave[o] = r.next() as u8;
        let bv = r.next() & 0x207;
        c.xsave[512..520].copy_from_slice(&bv.to_le_bytes());
    }
    if r.next().is_multiple_of(8) {
        c.idt = DescTable {
            base: r.next() % (RAM as u64 * 2),
            limit: r.next() as u16,
        };
        c.gdt = DescTable {
            base: r.next() % (RAM as u64 * 2),
            limit: r.next() as u16,
        };
    }
}

#[test]
fn random_instructions_and_states_never_panic_or_escape_ram() {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    let iterations = if cfg!(debug_assertions) {
        20_000
    } else {
        200_000
    };
    let (proto, m) = setup();
    // Some random page-table garbage beyond the real tables.
    for k in 0..64u64 {
        m.poke_u64(TABLES + 0x8000 + 8 * k, r.next());
    }
    for n in 0..iterations {
        let mut c = proto.clone();
        random_state(&mut r, &mut c);
        let mut bytes = [0u8; 15];
        for b in bytes.iter_mut() {
            *b = r.next() as u8;
        }
        if n % 2 == 0 {
            let s = SEEDS[(r.next() % SEEDS.len() as u64) as usize];
            bytes[..s.len()].copy_from_slice(s);
        }
        let len = (r.next() % 16) as usize;
        let before = c.clone();
        let o = emulate(&mut c, &m, &bytes[..len]);
        if let Outcome::Exception { exception, .. } = &o {
            if exception.vector != BP {
                assert!(c == before, "fault changed state: {bytes:02x?} {o:?}");
            }
        }
    }
}

#[test]
fn fuzz_harness_on_random_inputs() {
    let mut r = Rng(0x2545_f491_4f6c_dd1d);
    let iterations = if cfg!(debug_assertions) {
        10_000
    } else {
        100_000
    };
    for _ in 0..iterations {
        let mut data = [0u8; 160];
        for b in data.iter_mut() {
            *b = r.next() as u8;
        }
        // Half the time, an instruction start the fallback handles.
        if r.next() & 1 == 0 {
            let s = SEEDS[(r.next() % SEEDS.len() as u64) as usize];
            data[..s.len()].copy_from_slice(s);
            data[15] |= 15;
        }
        super::fuzzing::run(&data);
    }
}

/// Every stored fuzz input (fuzz/corpus/emulate, fuzz/regressions/emulate) still
/// runs clean.
#[test]
fn fuzz_corpus_replay() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in ["corpus/emulate", "regressions/emulate"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for e in entries.flatten() {
            let data = std::fs::read(e.path()).expect("corpus file");
            super::fuzzing::run(&data);
            n += 1;
        }
    }
    eprintln!("replayed {n} stored fuzz inputs");
}

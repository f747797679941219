//! A fake vCPU and guest memory for the unit tests and the fuzz target: no
//! /dev/kvm. The fake memory asserts the contract the emulator must keep (no access
//! crossing a page, aligned compare-exchanges) and refuses (NotRam) everything
//! outside its RAM, so a test or fuzz run sees any access outside guest RAM.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use super::mem::{host, GuestPhysMem, NotRam, PAGE};
use super::state::*;

/// CPUID of a plausible x86-64 CPU with everything the emulator checks for.
pub fn default_cpuid() -> BTreeMap<(u32, u32), Cpuid> {
    let mut t = BTreeMap::new();
    let mut put = |l: u32, s: u32, eax: u32, ebx: u32, ecx: u32, edx: u32| {
        t.insert((l, s), Cpuid { eax, ebx, ecx, edx });
    };
    put(0, 0, 0xd, 0, 0, 0);
    // ECX: SSE3, MONITOR(3), CX16(13), POPCNT(23), XSAVE(26), AVX(28), RDRAND(30).
    // EDX: CX8(8), CLFLUSH(19), FXSR(24), SSE(25), SSE2(26).
    put(
        1,
        0,
        0,
        0,
        1 | 1 << 3 | 1 << 13 | 1 << 23 | 1 << 26 | 1 << 28 | 1 << 30,
        1 << 8 | 1 << 19 | 1 << 24 | 1 << 25 | 1 << 26,
    );
    put(5, 0, 64, 64, 3, 0);
    // EBX: FSGSBASE(0), SMEP(7), RDSEED(18), SMAP(20), CLFLUSHOPT(23), CLWB(24).
    // ECX: PKU(3), RDPID(22).
    put(
        7,
        0,
        0,
        1 | 1 << 7 | 1 << 18 | 1 << 20 | 1 << 23 | 1 << 24,
        1 << 3 | 1 << 22,
        0,
    );
    // XSAVE: x87, SSE, AVX, PKRU.
    put(0xd, 0, 0x207, 2440, 2440, 0);
    put(0xd, 1, 0xf, 2440, 0, 0);
    put(0xd, 2, 256, 576, 0, 0);
    put(0xd, 9, 8, 2432, 0, 0);
    put(0x8000_0000, 0, 0x8000_0008, 0, 0, 0);
    // RDTSCP(27), 1 GiB pages(26), NX(20), LM(29).
    put(
        0x8000_0001,
        0,
        0,
        0,
        0,
        1 << 20 | 1 << 26 | 1 << 27 | 1 << 29,
    );
    put(0x8000_0008, 0, 48 | 48 << 8, 0, 0, 0);
    t
}

/// Plain-data vCPU state.
#[derive(Clone, Debug, PartialEq)]
pub struct FakeCpu {
    pub gprs: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    /// ES, CS, SS, DS, FS, GS.
    pub segs: [Segment; 6],
    pub gdt: DescTable,
    pub idt: DescTable,
    pub ldt: Segment,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub xcr0: u64,
    pub msrs: BTreeMap<u32, u64>,
    pub xsave: Vec<u8>,
    pub cpuid: BTreeMap<(u32, u32), Cpuid>,
    /// What `random` returns.
    pub random: Option<u64>,
    pub halted: bool,
}

fn seg_index(s: Seg) -> usize {
    match s {
        Seg::Es => 0,
        Seg::Cs => 1,
        Seg::Ss => 2,
        Seg::Ds => 3,
        Seg::Fs => 4,
        Seg::Gs => 5,
    }
}

impl FakeCpu {
    /// 64-bit mode at CPL0 with 4-level paging (CR3 = `cr3`), WP, NXE, SMEP, SMAP,
    /// OSFXSR, OSXSAVE, XCR0 = x87|SSE|AVX, MSRs for swapgs/sysret/rdtscp.
    pub fn long64(cr3: u64) -> Self {
        let code = Segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x08,
            type_: 0xb,
            s: true,
            dpl: 0,
            present: true,
            db: false,
            l: true,
            g: true,
            avl: false,
            unusable: false,
        };
        let data = Segment {
            selector: 0x10,
            type_: 0x3,
            db: true,
            l: false,
            ..code
        };
        let mut xsave = vec![0u8; 4096];
        // MXCSR 1F80, MXCSR_MASK FFFF; x87 and SSE in use.
        xsave[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
        xsave[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        xsave[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
        xsave[512..520].copy_from_slice(&3u64.to_le_bytes());
        let mut msrs = BTreeMap::new();
        msrs.insert(MSR_IA32_TSC, 0x1234_5678_9abc);
        msrs.insert(MSR_TSC_AUX, 7);
        msrs.insert(MSR_KERNEL_GS_BASE, 0xffff_8880_0000_1000);
        msrs.insert(MSR_STAR, 0x0023_0010_0000_0000);
        msrs.insert(MSR_LSTAR, 0xffff_ffff_8100_0000);
        msrs.insert(MSR_SFMASK, 0x4_7700);
        msrs.insert(MSR_IA32_XSS, 0);
        FakeCpu {
            gprs: [0; 16],
            rip: 0x10_0000,
            rflags: 2,
            segs: [data, code, data, data, data, data],
            gdt: DescTable { base: 0, limit: 0 },
            idt: DescTable { base: 0, limit: 0 },
            ldt: Segment {
                unusable: true,
                ..Default::default()
            },
            cr0: CR0_PE | CR0_MP | CR0_NE | CR0_WP | CR0_PG,
            cr3,
            cr4: CR4_PAE | CR4_OSFXSR | CR4_OSXSAVE | CR4_SMEP | CR4_SMAP | CR4_FSGSBASE,
            efer: EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE,
            xcr0: 7,
            msrs,
            xsave,
            cpuid: default_cpuid(),
            random: Some(0x0123_4567_89ab_cdef),
            halted: false,
        }
    }

    /// The same at CPL3 (user code 0x23, user data 0x1b).
    pub fn long64_user(cr3: u64) -> Self {
        let mut c = Self::long64(cr3);
        c.segs[1].selector = 0x23;
        c.segs[1].dpl = 3;
        for i in [0, 2, 3, 4, 5] {
            c.segs[i].selector = 0x1b;
            c.segs[i].dpl = 3;
        }
        c
    }
}

impl CpuState for FakeCpu {
    fn gpr(&mut self, n: usize) -> u64 {
        self.gprs[n & 15]
    }
    fn set_gpr(&mut self, n: usize, v: u64) {
        self.gprs[n & 15] = v;
    }
    fn rip(&mut self) -> u64 {
        self.rip
    }
    fn set_rip(&mut self, v: u64) {
        self.rip = v;
    }
    fn rflags(&mut self) -> u64 {
        self.rflags
    }
    fn set_rflags(&mut self, v: u64) {
        self.rflags = v;
    }
    fn segment(&mut self, s: Seg) -> Segment {
        self.segs[seg_index(s)]
    }
    fn set_segment(&mut self, s: Seg, v: Segment) {
        self.segs[seg_index(s)] = v;
    }
    fn gdt(&mut self) -> DescTable {
        self.gdt
    }
    fn idt(&mut self) -> DescTable {
        self.idt
    }
    fn ldt(&mut self) -> Segment {
        self.ldt
    }
    fn cr0(&mut self) -> u64 {
        self.cr0
    }
    fn cr3(&mut self) -> u64 {
        self.cr3
    }
    fn cr4(&mut self) -> u64 {
        self.cr4
    }
    fn efer(&mut self) -> u64 {
        self.efer
    }
    fn xcr0(&mut self) -> u64 {
        self.xcr0
    }
    fn msr(&mut self, index: u32) -> Option<u64> {
        self.msrs.get(&index).copied()
    }
    fn set_msr(&mut self, index: u32, v: u64) -> bool {
        if let Some(m) = self.msrs.get_mut(&index) {
            *m = v;
            true
        } else {
            false
        }
    }
    fn xsave(&mut self) -> Option<&[u8]> {
        Some(&self.xsave)
    }
    fn xsave_mut(&mut self) -> Option<&mut [u8]> {
        Some(&mut self.xsave)
    }
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> Cpuid {
        self.cpuid
            .get(&(leaf, subleaf))
            .copied()
            .unwrap_or_default()
    }
    fn random(&mut self, _seed: bool) -> Option<u64> {
        self.random
    }
    fn halt(&mut self) {
        self.halted = true;
    }
}

/// Guest RAM at guest-physical 0..size, page-aligned host memory. Shareable across
/// threads (the compare-exchanges are the real host atomics).
pub struct FakeMem {
    base: *mut u8,
    size: usize,
    /// Accesses made (reads, writes, exchanges).
    pub accesses: AtomicU64,
    /// Accesses refused as outside RAM.
    pub refused: AtomicU64,
    /// Pages written since the last `reset`, one bit each.
    dirty: Vec<AtomicU64>,
}

// SAFETY: the allocation is owned and only touched through `host::*`, whose
// compare-exchanges are atomic; plain copies may race as guest memory does.
unsafe impl Send for FakeMem {}
unsafe impl Sync for FakeMem {}

impl FakeMem {
    pub fn new(size: usize) -> Self {
        assert!(size > 0 && size.is_multiple_of(PAGE as usize));
        let layout = std::alloc::Layout::from_size_align(size, PAGE as usize).expect("layout");
        // SAFETY: non-zero size.
        let base = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!base.is_null(), "out of memory");
        let pages = size / PAGE as usize;
        FakeMem {
            base,
            size,
            accesses: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            dirty: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn mark(&self, gpa: u64, len: usize) {
        let first = gpa / PAGE;
        let last = (gpa + len.max(1) as u64 - 1) / PAGE;
        for p in first..=last {
            self.dirty[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Relaxed);
        }
    }

    /// Zero every page written since the last reset (cheaper than a new RAM).
    pub fn reset(&self) {
        for (i, w) in self.dirty.iter().enumerate() {
            let mut bits = w.swap(0, Ordering::Relaxed);
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let gpa = (i as u64 * 64 + b) * PAGE;
                // SAFETY: a whole page inside the allocation.
                unsafe {
                    std::ptr::write_bytes((self.base as u64 + gpa) as *mut u8, 0, PAGE as usize)
                };
            }
        }
        self.accesses.store(0, Ordering::Relaxed);
        self.refused.store(0, Ordering::Relaxed);
    }

    pub fn size(&self) -> u64 {
        self.size as u64
    }

    /// Host address of `[gpa, gpa + len)`, asserting the emulator's contract.
    fn host(&self, gpa: u64, len: usize, align: u64, write: bool) -> Result<u64, NotRam> {
        assert!(len > 0, "empty access at {gpa:#x}");
        assert!(
            (gpa & (PAGE - 1)) + len as u64 <= PAGE,
            "access {gpa:#x}+{len} crosses a page"
        );
        assert!(
            gpa.is_multiple_of(align),
            "access {gpa:#x} not {align}-aligned"
        );
        self.accesses.fetch_add(1, Ordering::Relaxed);
        match gpa.checked_add(len as u64) {
            Some(end) if end <= self.size as u64 => Ok(self.base as u64 + gpa),
            _ => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                Err(NotRam { gpa, write })
            }
        }
    }

    /// Test helpers: direct access (may cross pages).
    pub fn poke(&self, gpa: u64, data: &[u8]) {
        assert!(gpa as usize + data.len() <= self.size);
        self.mark(gpa, data.len());
        // SAFETY: inside the allocation.
        unsafe { host::write(self.base as u64 + gpa, data) }
    }
    pub fn peek(&self, gpa: u64, len: usize) -> Vec<u8> {
        assert!(gpa as usize + len <= self.size);
        let mut v = vec![0u8; len];
        // SAFETY: inside the allocation.
        unsafe { host::read(self.base as u64 + gpa, &mut v) };
        v
    }
    pub fn poke_u64(&self, gpa: u64, v: u64) {
        self.poke(gpa, &v.to_le_bytes());
    }
    pub fn peek_u64(&self, gpa: u64) -> u64 {
        u64::from_le_bytes(self.peek(gpa, 8).try_into().unwrap_or([0; 8]))
    }
}

impl Drop for FakeMem {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.size, PAGE as usize).expect("layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.base, layout) };
    }
}

impl GuestPhysMem for FakeMem {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), NotRam> {
        let h = self.host(gpa, buf.len(), 1, false)?;
        // SAFETY: inside the allocation (checked).
        unsafe { host::read(h, buf) };
        Ok(())
    }
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), NotRam> {
        let h = self.host(gpa, data.len(), 1, true)?;
        self.mark(gpa, data.len());
        // SAFETY: inside the allocation (checked).
        unsafe { host::write(h, data) };
        Ok(())
    }
    fn cmpxchg64(&self, gpa: u64, old: u64, new: u64) -> Result<u64, NotRam> {
        let h = self.host(gpa, 8, 8, true)?;
        self.mark(gpa, 8);
        // SAFETY: inside the allocation, 8-aligned (the base is page-aligned).
        Ok(unsafe { host::cmpxchg64(h, old, new) })
    }
    fn cmpxchg128(&self, gpa: u64, old: u128, new: u128) -> Result<u128, NotRam> {
        let h = self.host(gpa, 16, 16, true)?;
        self.mark(gpa, 16);
        assert!(host::has_cmpxchg16b(), "the test host lacks CMPXCHG16B");
        // SAFETY: inside the allocation, 16-aligned, host has CMPXCHG16B.
        Ok(unsafe { host::cmpxchg128(h, old, new) })
    }
}

/// Builds 4-level (or 5-level) page tables in a [`FakeMem`]: tables are taken from
/// a bump allocator starting at `next`.
pub struct PageTables<'a> {
    pub mem: &'a FakeMem,
    pub root: u64,
    pub next: u64,
    pub levels: u32,
}

/// Page-table entry bits for [`PageTables::map`].
pub const PTE_P: u64 = 1;
pub const PTE_W: u64 = 2;
pub const PTE_U: u64 = 4;
pub const PTE_A: u64 = 1 << 5;
pub const PTE_D: u64 = 1 << 6;
pub const PTE_PS: u64 = 1 << 7;
pub const PTE_XD: u64 = 1 << 63;

impl<'a> PageTables<'a> {
    /// Tables from `start` (page-aligned) upward; the root is the first.
    pub fn new(mem: &'a FakeMem, start: u64, levels: u32) -> Self {
        PageTables {
            mem,
            root: start,
            next: start + PAGE,
            levels,
        }
    }

    /// Map the page of `size` (4 KiB, 2 MiB or 1 GiB) at `la` to `pa` with the leaf
    /// `flags`; intermediate entries get `upper` (P|W|U unless told otherwise).
    pub fn map_with(&mut self, la: u64, pa: u64, size: u64, flags: u64, upper: u64) {
        let leaf_level = match size {
            0x1000 => 1,
            0x20_0000 => 2,
            0x4000_0000 => 3,
            _ => panic!("page size {size:#x}"),
        };
        let mut table = self.root;
        for level in (leaf_level..=self.levels).rev() {
            let idx = (la >> (12 + 9 * (level - 1))) & 0x1ff;
            let e = table + idx * 8;
            if level == leaf_level {
                let ps = if leaf_level > 1 { PTE_PS } else { 0 };
                self.mem.poke_u64(e, pa | flags | ps);
                return;
            }
            let cur = self.mem.peek_u64(e);
            if cur & PTE_P == 0 {
                let t = self.next;
                self.next += PAGE;
                self.mem.poke_u64(e, t | upper);
                table = t;
            } else {
                self.mem.poke_u64(e, cur | upper);
                table = cur & 0x000f_ffff_ffff_f000;
            }
        }
    }

    pub fn map(&mut self, la: u64, pa: u64, size: u64, flags: u64) {
        self.map_with(la, pa, size, flags, PTE_P | PTE_W | PTE_U);
    }

    /// The leaf entry's address for a 4 KiB mapping made by `map` (for tests that
    /// look at accessed/dirty bits).
    pub fn leaf_entry(&self, la: u64) -> u64 {
        let mut table = self.root;
        for level in (1..=self.levels).rev() {
            let idx = (la >> (12 + 9 * (level - 1))) & 0x1ff;
            let e = table + idx * 8;
            let v = self.mem.peek_u64(e);
            if level == 1 || v & PTE_PS != 0 {
                return e;
            }
            table = v & 0x000f_ffff_ffff_f000;
        }
        unreachable!()
    }
}

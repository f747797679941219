//! [`KvmCpu`]: the emulator's [`CpuState`] over a vCPU's KVM state (registers,
//! segments, control registers, MSRs, the FPU/XSAVE image), each part fetched on first
//! use and written back only if changed, and exception injection.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, kvm_xsave, Msrs};
use kvm_ioctls::VcpuFd;

use super::super::state::*;
use super::super::{Exception, PF};
use super::{host_random, CpuidSource};

/// The vCPU's state for one emulated instruction.
pub struct KvmCpu<'a> {
    vcpu: &'a VcpuFd,
    cpuid: &'a mut CpuidSource,
    regs: Option<kvm_regs>,
    regs_dirty: bool,
    sregs: Option<kvm_sregs>,
    sregs_dirty: bool,
    /// The XSAVE image, and whether it came from KVM_GET_FPU (no XSAVE support).
    xsave: Option<(Vec<u8>, bool)>,
    xsave_dirty: bool,
    xcr0: Option<u64>,
    msrs: Vec<(u32, Option<u64>)>,
    msrs_dirty: Vec<(u32, u64)>,
    halt: bool,
    /// The first ioctl that failed: the instruction is then not completed.
    pub error: Option<String>,
}

impl<'a> KvmCpu<'a> {
    pub fn new(vcpu: &'a VcpuFd, cpuid: &'a mut CpuidSource) -> Self {
        KvmCpu {
            vcpu,
            cpuid,
            regs: None,
            regs_dirty: false,
            sregs: None,
            sregs_dirty: false,
            xsave: None,
            xsave_dirty: false,
            xcr0: None,
            msrs: Vec::new(),
            msrs_dirty: Vec::new(),
            halt: false,
            error: None,
        }
    }

    fn fail(&mut self, what: &str, e: impl std::fmt::Display) {
        if self.error.is_none() {
            self.error = Some(format!("{what} failed: {e}"));
        }
    }

    fn regs(&mut self) -> &mut kvm_regs {
        if self.regs.is_none() {
            let r = match self.vcpu.get_regs() {
                Ok(r) => r,
                Err(e) => {
                    self.fail("KVM_GET_REGS", e);
                    Default::default()
                }
            };
            self.regs = Some(r);
        }
        self.regs.get_or_insert_with(Default::default)
    }

    fn sregs(&mut self) -> &mut kvm_sregs {
        if self.sregs.is_none() {
            let r = match self.vcpu.get_sregs() {
                Ok(r) => r,
                Err(e) => {
                    self.fail("KVM_GET_SREGS", e);
                    Default::default()
                }
            };
            self.sregs = Some(r);
        }
        self.sregs.get_or_insert_with(Default::default)
    }

    fn load_xsave(&mut self) {
        if self.xsave.is_some() {
            return;
        }
        match self.vcpu.get_xsave() {
            Ok(x) => {
                let mut v = vec![0u8; 4096];
                for (i, w) in x.region.iter().enumerate() {
                    v[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
                }
                self.xsave = Some((v, false));
            }
            Err(_) => match self.vcpu.get_fpu() {
                Ok(f) => self.xsave = Some((fpu_to_image(&f), true)),
                Err(e) => self.fail("KVM_GET_FPU", e),
            },
        }
    }

    /// Write back what changed. Called for completed instructions and traps.
    pub fn commit(&mut self) -> Result<(), String> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let v = self.vcpu;
        if self.regs_dirty {
            if let Some(r) = &self.regs {
                v.set_regs(r)
                    .map_err(|e| format!("KVM_SET_REGS failed: {e}"))?;
            }
        }
        if self.sregs_dirty {
            if let Some(s) = &self.sregs {
                v.set_sregs(s)
                    .map_err(|e| format!("KVM_SET_SREGS failed: {e}"))?;
            }
        }
        if self.xsave_dirty {
            if let Some((img, from_fpu)) = &self.xsave {
                if *from_fpu {
                    v.set_fpu(&image_to_fpu(img))
                        .map_err(|e| format!("KVM_SET_FPU failed: {e}"))?;
                } else {
                    let mut x = kvm_xsave::default();
                    for (i, w) in x.region.iter_mut().enumerate() {
                        *w = u32::from_le_bytes(img[4 * i..4 * i + 4].try_into().unwrap_or([0; 4]));
                    }
                    // SAFETY: a plain 4096-byte kvm_xsave without extra entries, as
                    // KVM_GET_XSAVE returned it, is what KVM_SET_XSAVE reads.
                    unsafe { v.set_xsave(&x) }.map_err(|e| format!("KVM_SET_XSAVE failed: {e}"))?;
                }
            }
        }
        if !self.msrs_dirty.is_empty() {
            let entries: Vec<kvm_bindings::kvm_msr_entry> = self
                .msrs_dirty
                .iter()
                .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect();
            let msrs = Msrs::from_entries(&entries).map_err(|e| format!("MSR list: {e:?}"))?;
            let n = v
                .set_msrs(&msrs)
                .map_err(|e| format!("KVM_SET_MSRS failed: {e}"))?;
            if n != entries.len() {
                return Err(format!("KVM_SET_MSRS took {n} of {entries:x?}"));
            }
        }
        if self.halt {
            let mp = kvm_bindings::kvm_mp_state {
                mp_state: kvm_bindings::KVM_MP_STATE_HALTED,
            };
            v.set_mp_state(mp)
                .map_err(|e| format!("KVM_SET_MP_STATE failed: {e}"))?;
        }
        Ok(())
    }

    /// Deliver `e` on the next entry (CR2 first for a #PF).
    pub fn inject(&mut self, e: &Exception) -> Result<(), String> {
        let v = self.vcpu;
        if let (PF, Some(cr2)) = (e.vector, e.cr2) {
            let mut s = v
                .get_sregs()
                .map_err(|e| format!("KVM_GET_SREGS failed: {e}"))?;
            s.cr2 = cr2;
            v.set_sregs(&s)
                .map_err(|e| format!("KVM_SET_SREGS failed: {e}"))?;
        }
        let mut ev = v
            .get_vcpu_events()
            .map_err(|e| format!("KVM_GET_VCPU_EVENTS failed: {e}"))?;
        ev.exception.injected = 1;
        ev.exception.pending = 0;
        ev.exception.nr = e.vector;
        ev.exception.has_error_code = u8::from(e.error_code.is_some());
        ev.exception.error_code = e.error_code.unwrap_or(0);
        v.set_vcpu_events(&ev)
            .map_err(|e| format!("KVM_SET_VCPU_EVENTS failed: {e}"))
    }
}

impl KvmCpu<'_> {
    /// Deliver `vector` through the IDT on the next entry, as an interrupt whose
    /// delivery is under way (KVM re-injects it whatever RFLAGS.IF says).
    pub fn inject_interrupt(&mut self, vector: u8) -> Result<(), String> {
        let v = self.vcpu;
        let mut ev = v
            .get_vcpu_events()
            .map_err(|e| format!("KVM_GET_VCPU_EVENTS failed: {e}"))?;
        ev.interrupt.injected = 1;
        ev.interrupt.nr = vector;
        ev.interrupt.soft = 0;
        v.set_vcpu_events(&ev)
            .map_err(|e| format!("KVM_SET_VCPU_EVENTS failed: {e}"))
    }
}

fn fpu_to_image(f: &kvm_fpu) -> Vec<u8> {
    let mut v = vec![0u8; 4096];
    v[0..2].copy_from_slice(&f.fcw.to_le_bytes());
    v[2..4].copy_from_slice(&f.fsw.to_le_bytes());
    v[4] = f.ftwx;
    v[6..8].copy_from_slice(&f.last_opcode.to_le_bytes());
    v[8..16].copy_from_slice(&f.last_ip.to_le_bytes());
    v[16..24].copy_from_slice(&f.last_dp.to_le_bytes());
    v[24..28].copy_from_slice(&f.mxcsr.to_le_bytes());
    for (i, r) in f.fpr.iter().enumerate() {
        v[32 + 16 * i..48 + 16 * i].copy_from_slice(r);
    }
    for (i, r) in f.xmm.iter().enumerate() {
        v[160 + 16 * i..176 + 16 * i].copy_from_slice(r);
    }
    v[XSAVE_HEADER..XSAVE_HEADER + 8].copy_from_slice(&3u64.to_le_bytes());
    v
}

fn image_to_fpu(v: &[u8]) -> kvm_fpu {
    let bv = u64::from_le_bytes(v[512..520].try_into().unwrap_or([0; 8]));
    let mut f = kvm_fpu::default();
    let g16 = |o: usize| u16::from_le_bytes([v[o], v[o + 1]]);
    let g64 = |o: usize| u64::from_le_bytes(v[o..o + 8].try_into().unwrap_or([0; 8]));
    if bv & 1 != 0 {
        f.fcw = g16(0);
        f.fsw = g16(2);
        f.ftwx = v[4];
        f.last_opcode = g16(6);
        f.last_ip = g64(8);
        f.last_dp = g64(16);
        for (i, r) in f.fpr.iter_mut().enumerate() {
            r.copy_from_slice(&v[32 + 16 * i..48 + 16 * i]);
        }
    } else {
        f.fcw = 0x37f;
    }
    f.mxcsr = u32::from_le_bytes(v[24..28].try_into().unwrap_or([0; 4]));
    if bv & 2 != 0 {
        for (i, r) in f.xmm.iter_mut().enumerate() {
            r.copy_from_slice(&v[160 + 16 * i..176 + 16 * i]);
        }
    }
    f
}

fn to_seg(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        s: s.s != 0,
        dpl: s.dpl,
        present: s.present != 0,
        db: s.db != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

fn from_seg(v: &Segment) -> kvm_segment {
    kvm_segment {
        base: v.base,
        limit: v.limit,
        selector: v.selector,
        type_: v.type_,
        present: u8::from(v.present),
        dpl: v.dpl,
        db: u8::from(v.db),
        s: u8::from(v.s),
        l: u8::from(v.l),
        g: u8::from(v.g),
        avl: u8::from(v.avl),
        unusable: u8::from(v.unusable),
        padding: 0,
    }
}

fn seg_mut(s: &mut kvm_sregs, which: Seg) -> &mut kvm_segment {
    match which {
        Seg::Es => &mut s.es,
        Seg::Cs => &mut s.cs,
        Seg::Ss => &mut s.ss,
        Seg::Ds => &mut s.ds,
        Seg::Fs => &mut s.fs,
        Seg::Gs => &mut s.gs,
    }
}

fn gpr_mut(r: &mut kvm_regs, n: usize) -> &mut u64 {
    match n & 15 {
        0 => &mut r.rax,
        1 => &mut r.rcx,
        2 => &mut r.rdx,
        3 => &mut r.rbx,
        4 => &mut r.rsp,
        5 => &mut r.rbp,
        6 => &mut r.rsi,
        7 => &mut r.rdi,
        8 => &mut r.r8,
        9 => &mut r.r9,
        10 => &mut r.r10,
        11 => &mut r.r11,
        12 => &mut r.r12,
        13 => &mut r.r13,
        14 => &mut r.r14,
        _ => &mut r.r15,
    }
}

impl CpuState for KvmCpu<'_> {
    fn gpr(&mut self, n: usize) -> u64 {
        *gpr_mut(self.regs(), n)
    }
    fn set_gpr(&mut self, n: usize, v: u64) {
        *gpr_mut(self.regs(), n) = v;
        self.regs_dirty = true;
    }
    fn rip(&mut self) -> u64 {
        self.regs().rip
    }
    fn set_rip(&mut self, v: u64) {
        self.regs().rip = v;
        self.regs_dirty = true;
    }
    fn rflags(&mut self) -> u64 {
        self.regs().rflags
    }
    fn set_rflags(&mut self, v: u64) {
        self.regs().rflags = v;
        self.regs_dirty = true;
    }
    fn segment(&mut self, s: Seg) -> Segment {
        to_seg(seg_mut(self.sregs(), s))
    }
    fn set_segment(&mut self, s: Seg, v: Segment) {
        *seg_mut(self.sregs(), s) = from_seg(&v);
        self.sregs_dirty = true;
    }
    fn gdt(&mut self) -> DescTable {
        let d = self.sregs().gdt;
        DescTable {
            base: d.base,
            limit: d.limit,
        }
    }
    fn idt(&mut self) -> DescTable {
        let d = self.sregs().idt;
        DescTable {
            base: d.base,
            limit: d.limit,
        }
    }
    fn ldt(&mut self) -> Segment {
        to_seg(&self.sregs().ldt)
    }
    fn cr0(&mut self) -> u64 {
        self.sregs().cr0
    }
    fn cr3(&mut self) -> u64 {
        self.sregs().cr3
    }
    fn cr4(&mut self) -> u64 {
        self.sregs().cr4
    }
    fn efer(&mut self) -> u64 {
        self.sregs().efer
    }
    fn xcr0(&mut self) -> u64 {
        if let Some(x) = self.xcr0 {
            return x;
        }
        let v = match self.vcpu.get_xcrs() {
            Ok(x) => x.xcrs[..(x.nr_xcrs as usize).min(16)]
                .iter()
                .find(|e| e.xcr == 0)
                .map(|e| e.value)
                .unwrap_or(1),
            // No XCRs (no XSAVE in KVM): x87 only, which also makes XSAVE #UD-free
            // paths see SSE disabled.
            Err(_) => 1,
        };
        self.xcr0 = Some(v);
        v
    }
    fn msr(&mut self, index: u32) -> Option<u64> {
        if let Some(&(_, v)) = self.msrs_dirty.iter().rev().find(|(i, _)| *i == index) {
            return Some(v);
        }
        if let Some(&(_, v)) = self.msrs.iter().find(|(i, _)| *i == index) {
            return v;
        }
        let entry = kvm_bindings::kvm_msr_entry {
            index,
            ..Default::default()
        };
        let v =
            Msrs::from_entries(&[entry])
                .ok()
                .and_then(|mut m| match self.vcpu.get_msrs(&mut m) {
                    Ok(1) => Some(m.as_slice()[0].data),
                    _ => None,
                });
        self.msrs.push((index, v));
        v
    }
    fn set_msr(&mut self, index: u32, v: u64) -> bool {
        self.msrs_dirty.push((index, v));
        true
    }
    fn xsave(&mut self) -> Option<&[u8]> {
        self.load_xsave();
        self.xsave.as_ref().map(|(v, _)| v.as_slice())
    }
    fn xsave_mut(&mut self) -> Option<&mut [u8]> {
        self.load_xsave();
        self.xsave_dirty = true;
        self.xsave.as_mut().map(|(v, _)| v.as_mut_slice())
    }
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> Cpuid {
        self.cpuid.get(leaf, subleaf)
    }
    fn random(&mut self, seed: bool) -> Option<u64> {
        host_random(seed)
    }
    fn halt(&mut self) {
        self.halt = true;
    }
}

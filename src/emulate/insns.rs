//! Instruction semantics (Intel SDM vol. 2), other than the FPU/XSAVE state ones
//! (`xsave.rs`). Each handler checks everything that can fault before it changes
//! any state.

use iced_x86::{Code, Instruction, Mnemonic};

use super::paging::AccessKind;
use super::state::*;
use super::xsave::{self, SaveForm};
use super::{
    canonical, get_reg, gp0, set_reg, ud, unsupported, Ctx, Exception, GuestPhysMem, Stop, BP, GP,
    NP, R,
};

/// How an instruction ended.
pub(crate) enum Done {
    /// Completed: RIP goes past it.
    Next,
    /// Completed and set RIP itself.
    Jumped,
    /// A trap: RIP goes past it and the exception is delivered.
    Trap(Exception),
    /// A software interrupt that passed its gate checks: RIP goes past it and
    /// the vector is delivered through the IDT.
    Interrupt(u8),
}

const KVM_ENOSYS: i64 = 1000;
const KVM_EPERM: i64 = 1;

pub(crate) fn execute<C: CpuState, M: GuestPhysMem>(x: &mut Ctx<C, M>, i: &Instruction) -> R<Done> {
    use Code::*;
    let next = |r: R<()>| r.map(|()| Done::Next);
    match i.code() {
        Int3 => soft_int(x, 3),
        Int_imm8 => soft_int(x, i.immediate8()),
        Wait => next(xsave::fwait(x)),
        Popcnt_r16_rm16 | Popcnt_r32_rm32 | Popcnt_r64_rm64 => next(popcnt(x, i)),
        Cmpxchg8b_m64 => next(cmpxchg8b(x, i)),
        Cmpxchg16b_m128 => next(cmpxchg16b(x, i)),
        Fxsave_m512byte => next(xsave::fxsave(x, i, false)),
        Fxsave64_m512byte => next(xsave::fxsave(x, i, true)),
        Fxrstor_m512byte => next(xsave::fxrstor(x, i, false)),
        Fxrstor64_m512byte => next(xsave::fxrstor(x, i, true)),
        Xsave_mem => next(xsave::xsave(x, i, SaveForm::Standard, false)),
        Xsave64_mem => next(xsave::xsave(x, i, SaveForm::Standard, true)),
        Xsaveopt_mem => next(xsave::xsave(x, i, SaveForm::Opt, false)),
        Xsaveopt64_mem => next(xsave::xsave(x, i, SaveForm::Opt, true)),
        Xsavec_mem => next(xsave::xsave(x, i, SaveForm::Compact, false)),
        Xsavec64_mem => next(xsave::xsave(x, i, SaveForm::Compact, true)),
        Xsaves_mem => next(xsave::xsave(x, i, SaveForm::Supervisor, false)),
        Xsaves64_mem => next(xsave::xsave(x, i, SaveForm::Supervisor, true)),
        Xrstor_mem => next(xsave::xrstor(x, i, false, false)),
        Xrstor64_mem => next(xsave::xrstor(x, i, false, true)),
        Xrstors_mem => next(xsave::xrstor(x, i, true, false)),
        Xrstors64_mem => next(xsave::xrstor(x, i, true, true)),
        Ldmxcsr_m32 => next(xsave::ldmxcsr(x, i, false)),
        VEX_Vldmxcsr_m32 => next(xsave::ldmxcsr(x, i, true)),
        Stmxcsr_m32 => next(xsave::stmxcsr(x, i, false)),
        VEX_Vstmxcsr_m32 => next(xsave::stmxcsr(x, i, true)),
        Xgetbv => next(xsave::xgetbv(x)),
        Rdpkru => next(xsave::rdwrpkru(x, false)),
        Wrpkru => next(xsave::rdwrpkru(x, true)),
        Rdrand_r16 | Rdrand_r32 | Rdrand_r64 => next(rdrand(x, i, false)),
        Rdseed_r16 | Rdseed_r32 | Rdseed_r64 => next(rdrand(x, i, true)),
        Rdtsc => next(rdtsc(x, false)),
        Rdtscp => next(rdtsc(x, true)),
        Rdpid_r32 | Rdpid_r64 => next(rdpid(x, i)),
        Swapgs => next(swapgs(x)),
        Sysretd | Sysretq => sysret(x, i.code() == Sysretq).map(|()| Done::Jumped),
        Verr_rm16 | Verr_r32m16 | Verr_r64m16 => next(verrw(x, i, false)),
        Verw_rm16 | Verw_r32m16 | Verw_r64m16 => next(verrw(x, i, true)),
        Clac | Stac => next(clac_stac(x, i.code() == Stac)),
        Ud0 | Ud0_r16_rm16 | Ud0_r32_rm32 | Ud0_r64_rm64 | Ud1_r16_rm16 | Ud1_r32_rm32
        | Ud1_r64_rm64 | Ud2 => ud(),
        Vmcall | Vmmcall => next(hypercall(x)),
        Monitorw | Monitord | Monitorq => next(monitor(x, i)),
        Mwait => next(mwait(x)),
        Hlt => next(hlt(x)),
        Rdfsbase_r32 | Rdfsbase_r64 | Rdgsbase_r32 | Rdgsbase_r64 | Wrfsbase_r32 | Wrfsbase_r64
        | Wrgsbase_r32 | Wrgsbase_r64 => next(fsgsbase(x, i)),
        Clflush_m8 => next(cache_line(x, i, (1, 0, 3, 19))),
        Clflushopt_m8 => next(cache_line(x, i, (7, 0, 1, 23))),
        Clwb_m8 => next(cache_line(x, i, (7, 0, 1, 24))),
        _ => match i.mnemonic() {
            Mnemonic::Lfence | Mnemonic::Mfence | Mnemonic::Sfence => next(fence(x, i.mnemonic())),
            _ => unsupported("no fallback for this instruction"),
        },
    }
}

/// `int3`, `int n`: a software interrupt. In protected mode the gate is checked
/// first, as hardware does: beyond the IDT limit or not an interrupt/trap (or,
/// outside long mode, task) gate → #GP(n*8+2), gate DPL < CPL → #GP(n*8+2), not
/// present → #NP(n*8+2). Then #BP is delivered as a trap (RIP past the
/// instruction), any other vector as an interrupt with RIP past the instruction,
/// which pushes the same return address. If the gate cannot be read the vector is
/// delivered anyway and the delivery itself meets the problem.
fn soft_int<C: CpuState, M: GuestPhysMem>(x: &mut Ctx<C, M>, vector: u8) -> R<Done> {
    let done = if vector == BP {
        Done::Trap(Exception::new(BP))
    } else {
        Done::Interrupt(vector)
    };
    if !x.mode.protected {
        return Ok(done);
    }
    if x.mode.vm86 {
        return if vector == BP {
            Ok(done)
        } else {
            unsupported("int n in virtual-8086 mode")
        };
    }
    let code = u32::from(vector) * 8 + 2;
    let idt = x.cpu.idt();
    let long = x.cpu.efer() & EFER_LMA != 0;
    let esz: u64 = if long { 16 } else { 8 };
    let at = u64::from(vector) * esz;
    if at + esz - 1 > u64::from(idt.limit) {
        return Err(Stop::Exc(Exception::with_code(GP, code)));
    }
    let la = idt.base.wrapping_add(at);
    let la = if x.mode.long64 { la } else { la & 0xffff_ffff };
    // The gate may straddle a page (the IDT base need not be aligned).
    let Ok(area) = x.area(la, 8, AccessKind::Read, true) else {
        return Ok(done);
    };
    let mut b = [0u8; 8];
    if area.read(x.mem, 0, &mut b).is_err() {
        return Ok(done);
    }
    let d = u64::from_le_bytes(b);
    let ty = (d >> 40) & 0x1f;
    let dpl = ((d >> 45) & 3) as u8;
    let present = d >> 47 & 1 != 0;
    let type_ok = if long {
        matches!(ty, 0xe | 0xf)
    } else {
        matches!(ty, 0x5 | 0x6 | 0x7 | 0xe | 0xf)
    };
    if !type_ok || dpl < x.mode.cpl {
        return Err(Stop::Exc(Exception::with_code(GP, code)));
    }
    if !present {
        return Err(Stop::Exc(Exception::with_code(NP, code)));
    }
    Ok(done)
}

fn op_size(i: &Instruction) -> usize {
    i.op_register(0).size()
}

/// `popcnt r, r/m`: the count of set bits; ZF = (source == 0); OF, SF, AF, CF, PF
/// cleared.
fn popcnt<C: CpuState, M: GuestPhysMem>(x: &mut Ctx<C, M>, i: &Instruction) -> R<()> {
    x.need(1, 0, 2, 23)?;
    let size = op_size(i);
    let src = x.read_operand(i, 1, size)?;
    let mask = if size == 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    };
    let src = src & mask;
    set_reg(x.cpu, i.op_register(0), u64::from(src.count_ones()));
    x.set_flags(FLAGS_ARITH, if src == 0 { FLAG_ZF } else { 0 });
    Ok(())
}

/// `cmpxchg16b m128`: #GP(0) unless 16-byte aligned; compare RDX:RAX with m128;
/// equal: ZF = 1 and m128 = RCX:RBX; else ZF = 0 and RDX:RAX = m128. Always one
/// atomic 16-byte operation on guest RAM (with or without LOCK).
fn cmpxchg16b<C: CpuState, M: GuestPhysMem>(x: &mut Ctx<C, M>, i: &Instruction) -> R<()> {
    x.need(1, 0, 2, 13)?;
    let (seg, off) = x.mem_operand(i, 0)?;
    let la = x.linear(seg, off, 16, AccessKind::Write)?;
    if la & 15 != 0 {
        return gp0();
    }
    let pa = x.translate(la, AccessKind::Write, false)?;
    let c = &mut *x.cpu;
    let expected = (u128::from(c.gpr(RDX)) << 64) | u128::from(c.gpr(RAX));
    let new = (u128::from(c.gpr(RCX)) << 64) | u128::from(c.gpr(RBX));
    let old = x
        .mem
        .cmpxchg128(pa, expected, new)
        .map_err(super::not_ram)?;
    if old == expected {
        x.set_flags(FLAG_ZF, FLAG_ZF);
    } else {
        x.cpu.set_gpr(RAX, old as u64);
        x.cpu.set_gpr(RDX, (old >> 64) as u64);
        x.set_flags(FLAG_ZF, 0);
    }
    Ok(())
}

/// `cmpxchg8b m64`: compare EDX:EAX with m64; equal: ZF = 1 and m64 = ECX:EBX;
/// else ZF = 0 and EDX:EAX = m64 (zero-extended in 64-bit mode). Atomic: an
/// 8-aligned operand directly, a misaligned one inside a 16-byte line through a
/// 16-byte exchange; one that splits 16-byte lines is refused.
fn cmpxchg8b<C: CpuState, M: GuestPhysMem>(x: &mut Ctx<C, M>, i: &Instruction) -> R<()> {
    x.need(1, 0, 3, 8)?;
    let (seg, off) = x.mem_operand(i, 0)?;
    let la = x.linear(seg, off, 8, AccessKind::Write)?;
    if (la & 15) + 8 > 16 {
        return unsupported("a cmpxchg8b operand that splits a 16-byte line (split lock)");
    }
    let pa = x.translate(la, AccessKind::Write, false)?;
    let c = &mut *x.cpu;
    let lo = |v: u64| v & 0xffff_ffff;
    let expected = (lo(c.gpr(RDX)) << 32) | lo(c.gpr(RAX));
    let new = (lo(c.gpr(RCX)) << 32) | lo(c.gpr(RBX));
    let old = if pa & 7 == 0 {
        x.mem.cmpxchg64(pa, expected, new).map_err(super::not_ram)?
    } else {
        let line = pa & !15;
        let shift = (pa & 15) * 8;
        let part = |v: u128| (v >> shift) as u64;
        let mut snap = x.mem.cmpxchg128(line, 0, 0).map_err(super::not_ram)?;
        let mut result = None;
        for _ in 0..10_000 {
            if part(snap) != expected {
                result = Some(part(snap));
                break;
            }
            let want = (snap & !(u128::from(u64::MAX) << shift)) | (u128::from(new) << shift);
            let got = x.mem.cmpxchg128(line, snap, want).map_err(super::not_ram)?;
            if got == snap {
                result = Some(expected);
                break;
            }
            snap = got;
        }
        match result {
            Some(v) => v,
            None => return unsupported("cmpxchg8b kept losing its line to other writers"),
        }
    };
    if old == expected {
        x.set_flags(FLAG_ZF, FLAG_ZF);
    } else {
        x.cpu.set_gpr(RAX, old & 0xffff_ffff);
        x.cpu.set_gpr(RDX, old >> 32);
        x.set_flags(FLAG_ZF, 0);
    }
    Ok(())
}

/// lfence/mfence/sfence: #UD without SSE2 (lfence, mfence) or SSE (sfence); the
/// same fence on the host, which orders this vCPU's emulated accesses.
fn fence<C: CpuState, M: GuestPhysMem>(x: &mut Ctx<C, M>, m: Mnemonic) -> R<()> {
    match m {
        Mnemonic::Sfence => {
            x.need(1, 0, 3, 25)?;
            // SAFETY: SSE is part of x86_64.
            unsafe { core::arch::x86_64::_mm_sfence() }
        }
        Mnemonic::Lfence => {
            x.need(1, 0, 3, 26)?;
            // SAFETY: SSE2 is part of x86_64.
            unsafe { core::arch::x86_64::_mm_lfence() }
        }
        _ => {
            x.need(1, 0, 3, 26)?;
            // SAFETY: SSE2 is part of x86_64.
            unsafe { core::arch::x86_64::_mm_mfence() }
        }
    }
    Ok(())
}

/// rdrand/rdseed: a host random value and CF = 1, or 0 and CF = 0 when the host has
/// none now; OF, SF, ZF, AF, PF cleared.
fn rdrand<C: CpuState, M: GuestPhysMem>(x: &mut Ctx<C, M>, i: &Instruction, seed: bool) -> R<()> {
    if seed {
        x.need(7, 0, 1, 18)?;
    } else {
        x.need(1, 0, 2, 30)?;
    }
    let (v, cf) = match x.cpu.random(seed) {
        Some(v) => (v, FLAG_CF),
        None => (0, 0),
    };
    set_reg(x.cpu, i.op_register(0), v);
    x.set_flags(FLAGS_ARITH, cf);
    Ok(())
}

/// rdtsc/rdtscp: #GP(0) if CR4.TSD and CPL > 0; EDX:EAX = the guest's TSC
/// (IA32_TSC as KVM reports it); rdtscp also ECX = IA32_TSC_AUX[31:0].
fn rdtsc<C: CpuState, M: GuestPhysMem>(x: &mut Ctx<C, M>, aux: bool) -> R<()> {
    if aux {
        x.need(0x8000_0001, 0, 3, 27)?;
    }
    if x.cpu.cr4() & CR4_TSD != 0 && x.mode.cpl > 0 && x.mode.protected {
        return gp0();
    }
    let Some(tsc) = x.cpu.msr(MSR_IA32_TSC) else {
        return unsupported("the guest's TSC is not readable");
    };
    let tsc_aux = if aux {
        match x.cpu.msr(MSR_TSC_AUX) {
            Some(v) => Some(v),
            None => return unsupported("IA32_TSC_AUX is not readable"),
        }
    } else {
        None
    };
    x.cpu.set_gpr(RAX, tsc & 0xffff_ffff);
    x.cpu.set_gpr(RDX, tsc >> 32);
    if let Some(a) = tsc_aux {
        x.cpu.set_gpr(RCX, a & 0xffff_ffff);
    }
    Ok(())
}

/// rdpid: the register = IA32_TSC_AUX.
fn rdpid<C: CpuState, M: GuestPhysMem>(x: &mut Ctx<C, M>, i: &Instruction) -> R<()> {
    x.need(7, 0, 2, 22)?;
    let Some(a) = x.cpu.msr(MSR_TSC_AUX) else {
        return unsupported("IA32_TSC_AUX is not readable");
    };
    set_reg(x.cpu, i.op_register(0), a);
    Ok(())
}

/// swapgs: #UD outside 64-bit mode, #GP(0) above CPL0; exchanges GS.base and
/// IA32_KERNEL_GS_BASE.
fn swapgs<C: CpuState, M: GuestPhysMem>(x: &mut Ctx<C, M>) -> R<()> {
    if !x.mode.long64 {
        return ud();
    }
    if x.mode.cpl != 0 {
        return gp0();
    }
    let Some(k) = x.cpu.msr(MSR_KERNEL_GS_BASE) else {
        return unsupported("IA32_KERNEL_GS_BASE is not readable");
    };
    let mut gs = x.cpu.segment(Seg::Gs);
    if !x.cpu.set_msr(MSR_KERNEL_GS_BASE, gs.base) {
        return unsupported("IA32_KERNEL_GS_BASE could not be written");
    }
    gs.base = k;
    x.cpu.set_segment(Seg::Gs, gs);
    Ok(())
}

/// sysret (REX.W: to 64-bit code, else to compatibility mode): #UD unless 64-bit
/// mode with EFER.SCE; #GP(0) above CPL0 or (64-bit form) RCX not canonical.
/// RIP = RCX, RFLAGS = (R11 & 3C7FD7H) | 2, CS = STAR[63:48] + 16 (64-bit) or
/// STAR[63:48] (32-bit), SS = STAR[63:48] + 8, both RPL 3 with flat DPL 3
/// descriptors.
fn sysret<C: CpuState, M: GuestPhysMem>(x: &mut Ctx<C, M>, q: bool) -> R<()> {
    if !x.mode.long64 || x.cpu.efer() & EFER_SCE == 0 {
        return ud();
    }
    if x.mode.cpl != 0 {
        return gp0();
    }
    let rcx = x.cpu.gpr(RCX);
    if q && !canonical(rcx, x.mode.la57) {
        return gp0();
    }
    let Some(star) = x.cpu.msr(MSR_STAR) else {
        return unsupported("IA32_STAR is not readable");
    };
    let sel = (star >> 48) as u16;
    let r11 = x.cpu.gpr(R11);
    let flat = Segment {
        base: 0,
        limit: 0xffff_ffff,
        s: true,
        dpl: 3,
        present: true,
        g: true,
        ..Default::default()
    };
    let cs = Segment {
        selector: if q { sel.wrapping_add(16) } else { sel } | 3,
        type_: 0xb,
        l: q,
        db: !q,
        ..flat
    };
    let ss = Segment {
        selector: sel.wrapping_add(8) | 3,
        type_: 0x3,
        db: true,
        ..flat
    };
    x.cpu.set_segment(Seg::Cs, cs);
    x.cpu.set_segment(Seg::Ss, ss);
    x.cpu.set_rflags((r11 & 0x3c_7fd7) | 2);
    x.cpu.set_rip(if q { rcx } else { rcx & 0xffff_ffff });
    Ok(())
}

/// verr/verw: ZF = 1 if the selector names a data/code segment that is readable
/// (verr) / writable (verw) at the current CPL and the selector's RPL, else ZF = 0.
/// #UD in real and virtual-8086 mode. The descriptor read is an implicit supervisor
/// access (it may page-fault).
fn verrw<C: CpuState, M: GuestPhysMem>(x: &mut Ctx<C, M>, i: &Instruction, write: bool) -> R<()> {
    if !x.mode.protected || x.mode.vm86 {
        return ud();
    }
    let sel = x.read_operand(i, 0, 2)? as u16;
    let ok = segment_accessible(x, sel, write)?;
    x.set_flags(FLAG_ZF, if ok { FLAG_ZF } else { 0 });
    Ok(())
}

fn segment_accessible<C: CpuState, M: GuestPhysMem>(
    x: &mut Ctx<C, M>,
    sel: u16,
    write: bool,
) -> R<bool> {
    if sel & !3 == 0 {
        return Ok(false);
    }
    let (base, limit) = if sel & 4 != 0 {
        let l = x.cpu.ldt();
        if l.unusable || !l.present {
            return Ok(false);
        }
        (l.base, l.limit)
    } else {
        let g = x.cpu.gdt();
        (g.base, u32::from(g.limit))
    };
    let idx = u64::from(sel & !7);
    if idx + 7 > u64::from(limit) {
        return Ok(false);
    }
    let la = base.wrapping_add(idx);
    let la = if x.mode.long64 { la } else { la & 0xffff_ffff };
    let a = x.area(la, 8, AccessKind::Read, true)?;
    let mut b = [0u8; 8];
    a.read(x.mem, 0, &mut b)?;
    let d = u64::from_le_bytes(b);
    if d >> 44 & 1 == 0 {
        return Ok(false);
    }
    let ty = ((d >> 40) & 0xf) as u8;
    let dpl = ((d >> 45) & 3) as u8;
    let code = ty & 8 != 0;
    if write && (code || ty & 2 == 0) {
        return Ok(false);
    }
    if !write && code && ty & 2 == 0 {
        return Ok(false);
    }
    let conforming_code = code && ty & 4 != 0;
    if !conforming_code && (dpl < x.mode.cpl || dpl < (sel & 3) as u8) {
        return Ok(false);
    }
    Ok(true)
}

/// clac/stac: #UD without SMAP in CPUID (SDM: CPUID, not CR4.SMAP) or above CPL0.
fn clac_stac<C: CpuState, M: GuestPhysMem>(x: &mut Ctx<C, M>, set: bool) -> R<()> {
    x.need(7, 0, 1, 20)?;
    if x.mode.cpl > 0 {
        return ud();
    }
    x.set_flags(FLAG_AC, if set { FLAG_AC } else { 0 });
    Ok(())
}

/// A hypercall KVM did not serve: -KVM_ENOSYS in RAX (-KVM_EPERM above CPL0, as
/// KVM answers).
fn hypercall<C: CpuState, M: GuestPhysMem>(x: &mut Ctx<C, M>) -> R<()> {
    let v = if x.mode.cpl > 0 {
        -KVM_EPERM
    } else {
        -KVM_ENOSYS
    };
    x.cpu.set_gpr(RAX, v as u64);
    Ok(())
}

/// monitor: #UD without MONITOR in CPUID or above CPL0; the address (DS:RAX or the
/// override) is checked like a read; then nothing to do.
fn monitor<C: CpuState, M: GuestPhysMem>(x: &mut Ctx<C, M>, i: &Instruction) -> R<()> {
    x.need(1, 0, 2, 3)?;
    if x.mode.cpl > 0 {
        return ud();
    }
    let off = match i.code() {
        Code::Monitorw => x.cpu.gpr(RAX) & 0xffff,
        Code::Monitord => x.cpu.gpr(RAX) & 0xffff_ffff,
        _ => x.cpu.gpr(RAX),
    };
    let seg = match i.segment_prefix() {
        iced_x86::Register::ES => Seg::Es,
        iced_x86::Register::CS => Seg::Cs,
        iced_x86::Register::SS => Seg::Ss,
        iced_x86::Register::FS => Seg::Fs,
        iced_x86::Register::GS => Seg::Gs,
        _ => Seg::Ds,
    };
    let la = x.linear(seg, off, 1, AccessKind::Read)?;
    x.translate(la, AccessKind::Read, false)?;
    Ok(())
}

/// mwait: #UD without MONITOR or above CPL0; #GP(0) for ECX bits beyond the
/// supported extensions; then returns at once (mwait may always wake early).
fn mwait<C: CpuState, M: GuestPhysMem>(x: &mut Ctx<C, M>) -> R<()> {
    x.need(1, 0, 2, 3)?;
    if x.mode.cpl > 0 {
        return ud();
    }
    let allowed = if x.cpuid_bit(5, 0, 2, 0) { 1 } else { 0 };
    if x.cpu.gpr(RCX) as u32 & !allowed != 0 {
        return gp0();
    }
    Ok(())
}

/// hlt: #GP(0) above CPL0; the vCPU sleeps until an interrupt.
fn hlt<C: CpuState, M: GuestPhysMem>(x: &mut Ctx<C, M>) -> R<()> {
    if x.mode.cpl > 0 {
        return gp0();
    }
    x.cpu.halt();
    Ok(())
}

/// rd/wr fs/gs base: #UD outside 64-bit mode, without FSGSBASE or CR4.FSGSBASE;
/// wr* #GP(0) for a non-canonical base.
fn fsgsbase<C: CpuState, M: GuestPhysMem>(x: &mut Ctx<C, M>, i: &Instruction) -> R<()> {
    use Code::*;
    if !x.mode.long64 || x.cpu.cr4() & CR4_FSGSBASE == 0 {
        return ud();
    }
    x.need(7, 0, 1, 0)?;
    let code = i.code();
    let seg = match code {
        Rdfsbase_r32 | Rdfsbase_r64 | Wrfsbase_r32 | Wrfsbase_r64 => Seg::Fs,
        _ => Seg::Gs,
    };
    let r = i.op_register(0);
    let mut s = x.cpu.segment(seg);
    match code {
        Rdfsbase_r32 | Rdfsbase_r64 | Rdgsbase_r32 | Rdgsbase_r64 => set_reg(x.cpu, r, s.base),
        _ => {
            let v = get_reg(x.cpu, r);
            if !canonical(v, x.mode.la57) {
                return gp0();
            }
            s.base = v;
            x.cpu.set_segment(seg, s);
        }
    }
    Ok(())
}

/// clflush/clflushopt/clwb: the line's address is checked like a 1-byte read; the
/// host keeps guest RAM coherent, so a fence is all that is left.
fn cache_line<C: CpuState, M: GuestPhysMem>(
    x: &mut Ctx<C, M>,
    i: &Instruction,
    feature: (u32, u32, usize, u32),
) -> R<()> {
    x.need(feature.0, feature.1, feature.2, feature.3)?;
    let (seg, off) = x.mem_operand(i, 0)?;
    let la = x.linear(seg, off, 1, AccessKind::Read)?;
    x.translate(la, AccessKind::Read, false)?;
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    Ok(())
}

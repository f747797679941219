//! The legacy-region instructions: fwait, fxsave/fxrstor (and the 64-bit forms),
//! ldmxcsr/stmxcsr (and the VEX forms).

use iced_x86::Instruction;

use super::super::paging::AccessKind;
use super::super::state::*;
use super::super::{gp0, ud, Ctx, GuestPhysMem, Stop, NM, R};
use super::image::*;

/// `fwait`: #NM if CR0.MP and CR0.TS; #MF if an unmasked x87 exception is pending
/// (FSW.ES) and CR0.NE; otherwise nothing (with CR0.NE = 0 the legacy FERR# path
/// is not modelled: a no-op).
pub(crate) fn fwait<C: CpuState, M: GuestPhysMem>(x: &mut Ctx<C, M>) -> R<()> {
    let cr0 = x.cpu.cr0();
    if cr0 & (CR0_MP | CR0_TS) == (CR0_MP | CR0_TS) {
        return Err(Stop::Exc(super::super::Exception::new(NM)));
    }
    let img = image(x.cpu)?;
    let fsw = if u64_at(img, HDR) & 1 != 0 {
        u16_at(img, 2)
    } else {
        0
    };
    if fsw & 0x80 != 0 && cr0 & CR0_NE != 0 {
        return Err(Stop::Exc(super::super::Exception::new(super::super::MF)));
    }
    Ok(())
}

/// Common checks of fxsave/fxrstor: #UD without FXSR, #NM on CR0.TS or CR0.EM,
/// #GP(0) unless 16-byte aligned. Returns the translated 512-byte area.
fn fx_area<C: CpuState, M: GuestPhysMem>(
    x: &mut Ctx<C, M>,
    i: &Instruction,
    kind: AccessKind,
) -> R<super::super::Area> {
    x.need(1, 0, 3, 24)?;
    if x.cpu.cr0() & (CR0_TS | CR0_EM) != 0 {
        return Err(Stop::Exc(super::super::Exception::new(NM)));
    }
    let (seg, off) = x.mem_operand(i, 0)?;
    let la = x.linear(seg, off, 512, kind)?;
    if la & 15 != 0 {
        return gp0();
    }
    x.area(la, 512, kind, false)
}

/// Whether FXSAVE/FXRSTOR move the SSE part: CR4.OSFXSR, and not AMD's fast
/// FXSAVE/FXRSTOR (EFER.FFXSR in 64-bit mode at CPL0).
fn fx_sse<C: CpuState, M: GuestPhysMem>(x: &mut Ctx<C, M>) -> bool {
    let ffxsr = x.cpu.efer() & EFER_FFXSR != 0 && x.mode.long64 && x.mode.cpl == 0;
    x.cpu.cr4() & CR4_OSFXSR != 0 && !ffxsr
}

pub(crate) fn fxsave<C: CpuState, M: GuestPhysMem>(
    x: &mut Ctx<C, M>,
    i: &Instruction,
    wide: bool,
) -> R<()> {
    let area = fx_area(x, i, AccessKind::Write)?;
    let sse = fx_sse(x);
    let n = nxmm(x);
    let img = image(x.cpu)?;
    let mut b = x87_state(img);
    x87_to_form(&mut b, wide);
    b[MXCSR_OFF..MXCSR_OFF + 4].copy_from_slice(&img[MXCSR_OFF..MXCSR_OFF + 4]);
    b[MXCSR_MASK_OFF..MXCSR_MASK_OFF + 4].copy_from_slice(&mxcsr_mask(img).to_le_bytes());
    let mut xmm = [0u8; 256];
    if u64_at(img, HDR) & 2 != 0 {
        xmm.copy_from_slice(&img[XMM_OFF..XMM_OFF + 256]);
    }
    // Bytes 416..512 are reserved or for software: not written.
    area.write(x.mem, 0, &b)?;
    if sse {
        area.write(x.mem, XMM_OFF, &xmm[..16 * n])?;
    }
    Ok(())
}

pub(crate) fn fxrstor<C: CpuState, M: GuestPhysMem>(
    x: &mut Ctx<C, M>,
    i: &Instruction,
    wide: bool,
) -> R<()> {
    let area = fx_area(x, i, AccessKind::Read)?;
    let sse = fx_sse(x);
    let n = nxmm(x);
    let mut b = [0u8; 416];
    area.read(x.mem, 0, &mut b)?;
    let mask = mxcsr_mask(image(x.cpu)?);
    let mxcsr = u32_at(&b, MXCSR_OFF);
    if sse && mxcsr & !mask != 0 {
        return gp0();
    }
    let img = image_mut(x.cpu)?;
    load_x87(img, &b, wide);
    if sse {
        touch(img, 1, None);
        img[MXCSR_OFF..MXCSR_OFF + 4].copy_from_slice(&mxcsr.to_le_bytes());
        img[XMM_OFF..XMM_OFF + 16 * n].copy_from_slice(&b[XMM_OFF..XMM_OFF + 16 * n]);
    }
    Ok(())
}

/// Checks shared by ldmxcsr/stmxcsr: legacy: #UD if CR0.EM, !CR4.OSFXSR or no SSE;
/// VEX: #UD unless CR4.OSXSAVE and XCR0 enables SSE and AVX; #NM if CR0.TS.
fn mxcsr_checks<C: CpuState, M: GuestPhysMem>(x: &mut Ctx<C, M>, vex: bool) -> R<()> {
    let cr0 = x.cpu.cr0();
    if vex {
        x.need(1, 0, 2, 28)?;
        if x.cpu.cr4() & CR4_OSXSAVE == 0 || x.cpu.xcr0() & 6 != 6 {
            return ud();
        }
    } else {
        x.need(1, 0, 3, 25)?;
        if cr0 & CR0_EM != 0 || x.cpu.cr4() & CR4_OSFXSR == 0 {
            return ud();
        }
    }
    if cr0 & CR0_TS != 0 {
        return Err(Stop::Exc(super::super::Exception::new(NM)));
    }
    Ok(())
}

pub(crate) fn ldmxcsr<C: CpuState, M: GuestPhysMem>(
    x: &mut Ctx<C, M>,
    i: &Instruction,
    vex: bool,
) -> R<()> {
    mxcsr_checks(x, vex)?;
    let v = x.read_operand(i, 0, 4)? as u32;
    let mask = mxcsr_mask(image(x.cpu)?);
    if v & !mask != 0 {
        return gp0();
    }
    let img = image_mut(x.cpu)?;
    img[MXCSR_OFF..MXCSR_OFF + 4].copy_from_slice(&v.to_le_bytes());
    keep_mxcsr(img);
    Ok(())
}

pub(crate) fn stmxcsr<C: CpuState, M: GuestPhysMem>(
    x: &mut Ctx<C, M>,
    i: &Instruction,
    vex: bool,
) -> R<()> {
    mxcsr_checks(x, vex)?;
    let v = u32_at(image(x.cpu)?, MXCSR_OFF);
    let (seg, off) = x.mem_operand(i, 0)?;
    x.write_mem(seg, off, &v.to_le_bytes())
}

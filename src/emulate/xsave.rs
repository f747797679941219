//! FPU/SSE/AVX state instructions: fxsave/fxrstor (and the 64-bit forms), the
//! xsave family (xsave, xsaveopt, xsavec, xsaves, xrstor, xrstors), ldmxcsr /
//! stmxcsr (and the VEX forms), fwait, xgetbv, rdpkru/wrpkru (Intel SDM vol. 1
//! ch. 10 and 13, vol. 2).
//!
//! The vCPU's state is a standard-format XSAVE image ([`CpuState::xsave`]) whose
//! XSTATE_BV stands for XINUSE: a clear bit means the component is in its initial
//! configuration (its bytes in the image are ignored). Guest memory gets the
//! standard or the compacted format as the instruction asks; component sizes and
//! offsets come from CPUID leaf 0xD. XSAVEOPT saves like XSAVE except that it skips
//! components in their initial state (the init optimization; the modified
//! optimization is not needed for correctness). Supervisor components (IA32_XSS)
//! cannot be reached through KVM's XSAVE image: an XSAVES/XRSTORS that requests one
//! ends the VM.

use iced_x86::Instruction;

use super::paging::AccessKind;
use super::state::*;
use super::{gp0, ud, unsupported, Ctx, GuestPhysMem, Stop, NM, R};

mod image;
mod legacy;

use image::*;
pub(crate) use legacy::{fwait, fxrstor, fxsave, ldmxcsr, stmxcsr};

/// The four XSAVE variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SaveForm {
    Standard,
    Opt,
    Compact,
    Supervisor,
}

/// #UD unless XSAVE and CR4.OSXSAVE (and the variant's CPUID bit); #GP(0) for the
/// supervisor forms above CPL0; #NM if CR0.TS. Returns RFBM.
fn xsave_checks<C: CpuState, M: GuestPhysMem>(
    x: &mut Ctx<C, M>,
    variant_bit: Option<u32>,
    supervisor: bool,
) -> R<u64> {
    x.need(1, 0, 2, 26)?;
    if x.cpu.cr4() & CR4_OSXSAVE == 0 {
        return ud();
    }
    if let Some(b) = variant_bit {
        x.need(0xd, 1, 0, b)?;
    }
    if x.cpu.cr0() & CR0_TS != 0 {
        return Err(Stop::Exc(super::Exception::new(NM)));
    }
    if supervisor && x.mode.cpl > 0 {
        return gp0();
    }
    let xcr0 = x.cpu.xcr0();
    let xss = if supervisor {
        x.cpu.msr(MSR_IA32_XSS).unwrap_or(0)
    } else {
        0
    };
    let edx_eax = (x.cpu.gpr(RDX) << 32) | (x.cpu.gpr(RAX) & 0xffff_ffff);
    let rfbm = edx_eax & (xcr0 | xss);
    if rfbm & xss != 0 {
        return unsupported(format!(
            "supervisor state components {:#x} (IA32_XSS) are not reachable through KVM's XSAVE image",
            rfbm & xss
        ));
    }
    Ok(rfbm)
}

fn bits(v: u64) -> impl Iterator<Item = u32> {
    (2..63).filter(move |i| v >> i & 1 != 0)
}

/// Offsets of the extended components in `set` in the compacted format.
fn compacted<C: CpuState, M: GuestPhysMem>(x: &mut Ctx<C, M>, set: u64) -> Vec<(Comp, usize)> {
    let mut off = XSAVE_EXT_START;
    let mut v = Vec::new();
    for i in bits(set) {
        let c = comp(x, i);
        if c.align64 {
            off = (off + 63) & !63;
        }
        v.push((c, off));
        off += c.size;
    }
    v
}

fn standard<C: CpuState, M: GuestPhysMem>(x: &mut Ctx<C, M>, set: u64) -> Vec<(Comp, usize)> {
    bits(set)
        .map(|i| {
            let c = comp(x, i);
            (c, c.offset)
        })
        .collect()
}

fn area_end(layout: &[(Comp, usize)]) -> usize {
    layout
        .iter()
        .map(|(c, o)| o + c.size)
        .max()
        .unwrap_or(0)
        .max(XSAVE_EXT_START)
}

pub(crate) fn xsave<C: CpuState, M: GuestPhysMem>(
    x: &mut Ctx<C, M>,
    i: &Instruction,
    form: SaveForm,
    wide: bool,
) -> R<()> {
    let (variant, sup) = match form {
        SaveForm::Standard => (None, false),
        SaveForm::Opt => (Some(0), false),
        SaveForm::Compact => (Some(1), false),
        SaveForm::Supervisor => (Some(3), true),
    };
    let rfbm = xsave_checks(x, variant, sup)?;
    let compact = matches!(form, SaveForm::Compact | SaveForm::Supervisor);
    let layout = if compact {
        compacted(x, rfbm)
    } else {
        standard(x, rfbm)
    };
    let size = area_end(&layout);
    let (seg, off) = x.mem_operand(i, 0)?;
    let la = x.linear(seg, off, size as u64, AccessKind::Write)?;
    if la & 63 != 0 {
        return gp0();
    }
    let area = x.area(la, size, AccessKind::Write, false)?;
    let n = nxmm(x);
    let img = image(x.cpu)?;
    let inuse = xinuse(img);
    for (c, _) in &layout {
        if c.offset + c.size > img.len() || c.size == 0 {
            return unsupported(format!(
                "state component {} lies outside the vCPU's {}-byte XSAVE image",
                c.idx,
                img.len()
            ));
        }
    }
    // Everything is checked: now write.
    let skip_init = form != SaveForm::Standard;
    let save = |k: u32| rfbm >> k & 1 != 0 && (!skip_init || inuse >> k & 1 != 0);
    if save(0) {
        let mut b = x87_state(img);
        x87_to_form(&mut b, wide);
        area.write(x.mem, 0, &b[..MXCSR_OFF])?;
        area.write(x.mem, ST_OFF, &b[ST_OFF..XMM_OFF])?;
    }
    if rfbm & 6 != 0 {
        let mut m = [0u8; 8];
        m[..4].copy_from_slice(&img[MXCSR_OFF..MXCSR_OFF + 4]);
        m[4..].copy_from_slice(&mxcsr_mask(img).to_le_bytes());
        area.write(x.mem, MXCSR_OFF, &m)?;
    }
    if save(1) {
        let mut xmm = [0u8; 256];
        if u64_at(img, HDR) & 2 != 0 {
            xmm.copy_from_slice(&img[XMM_OFF..XMM_OFF + 256]);
        }
        area.write(x.mem, XMM_OFF, &xmm[..16 * n])?;
    }
    let img_bv = u64_at(img, HDR);
    for (c, o) in &layout {
        if !save(c.idx) {
            continue;
        }
        if img_bv >> c.idx & 1 != 0 {
            area.write(x.mem, *o, &img[c.offset..c.offset + c.size])?;
        } else {
            area.write(x.mem, *o, &vec![0u8; c.size])?;
        }
    }
    let mut hdr = [0u8; 64];
    if compact {
        hdr[0..8].copy_from_slice(&(inuse & rfbm).to_le_bytes());
        hdr[8..16].copy_from_slice(&(rfbm | COMPACTED).to_le_bytes());
        area.write(x.mem, HDR, &hdr)?;
    } else {
        // Only XSTATE_BV changes, and only in the requested bits.
        area.read(x.mem, HDR, &mut hdr[..8])?;
        let old = u64_at(&hdr, 0);
        let bv = (old & !rfbm) | (inuse & rfbm);
        area.write(x.mem, HDR, &bv.to_le_bytes())?;
    }
    Ok(())
}

pub(crate) fn xrstor<C: CpuState, M: GuestPhysMem>(
    x: &mut Ctx<C, M>,
    i: &Instruction,
    supervisor: bool,
    wide: bool,
) -> R<()> {
    let rfbm = xsave_checks(x, if supervisor { Some(3) } else { None }, supervisor)?;
    let xcr0 = x.cpu.xcr0();
    let xss = if supervisor {
        x.cpu.msr(MSR_IA32_XSS).unwrap_or(0)
    } else {
        0
    };
    let (seg, off) = x.mem_operand(i, 0)?;
    let la = x.linear(seg, off, XSAVE_EXT_START as u64, AccessKind::Read)?;
    if la & 63 != 0 {
        return gp0();
    }
    let head = x.area(la, XSAVE_EXT_START, AccessKind::Read, false)?;
    let mut legacy = [0u8; XSAVE_EXT_START];
    head.read(x.mem, 0, &mut legacy)?;
    let bv = u64_at(&legacy, HDR);
    let comp_bv = u64_at(&legacy, HDR + 8);
    let compact = comp_bv & COMPACTED != 0;
    if compact {
        if !x.cpuid_bit(0xd, 1, 0, 1)
            || comp_bv & !COMPACTED & !(xcr0 | xss) != 0
            || bv & !comp_bv != 0
            || legacy[HDR + 16..HDR + 64].iter().any(|&b| b != 0)
        {
            return gp0();
        }
    } else if supervisor || bv & !xcr0 != 0 || legacy[HDR + 8..HDR + 24].iter().any(|&b| b != 0) {
        return gp0();
    }
    let layout = if compact {
        compacted(x, comp_bv & !COMPACTED)
    } else {
        standard(x, rfbm)
    };
    // Read every component to be loaded before changing anything.
    let mut loads: Vec<(Comp, Vec<u8>)> = Vec::new();
    for (c, o) in &layout {
        if rfbm >> c.idx & 1 == 0 || bv >> c.idx & 1 == 0 {
            continue;
        }
        let a = x.linear(
            seg,
            off.wrapping_add(*o as u64),
            c.size as u64,
            AccessKind::Read,
        )?;
        let area = x.area(a, c.size, AccessKind::Read, false)?;
        let mut data = vec![0u8; c.size];
        area.read(x.mem, 0, &mut data)?;
        loads.push((*c, data));
    }
    let mask = mxcsr_mask(image(x.cpu)?);
    let new_mxcsr = if compact {
        match (rfbm & 2 != 0, bv & 2 != 0) {
            (true, true) => Some(u32_at(&legacy, MXCSR_OFF)),
            (true, false) => Some(MXCSR_INIT),
            _ => None,
        }
    } else if rfbm & 6 != 0 {
        Some(u32_at(&legacy, MXCSR_OFF))
    } else {
        None
    };
    if new_mxcsr.is_some_and(|m| m & !mask != 0) {
        return gp0();
    }
    let n = nxmm(x);
    let long64 = x.mode.long64;
    let img = image_mut(x.cpu)?;
    for (c, _) in &layout {
        if rfbm >> c.idx & 1 != 0 && c.offset + c.size > img.len() {
            return unsupported(format!(
                "state component {} lies outside the vCPU's {}-byte XSAVE image",
                c.idx,
                img.len()
            ));
        }
    }
    let mut img_bv = u64_at(img, HDR);
    if rfbm & 1 != 0 {
        if bv & 1 != 0 {
            load_x87(img, &legacy, wide);
            img_bv = u64_at(img, HDR);
        } else {
            img_bv &= !1;
        }
    }
    if rfbm & 2 != 0 {
        if bv & 2 != 0 || !long64 {
            set_bv(img, img_bv);
            touch(img, 1, None);
            img_bv = u64_at(img, HDR);
            if bv & 2 != 0 {
                img[XMM_OFF..XMM_OFF + 16 * n].copy_from_slice(&legacy[XMM_OFF..XMM_OFF + 16 * n]);
            } else {
                img[XMM_OFF..XMM_OFF + 16 * n].fill(0);
            }
        } else {
            img_bv &= !2;
        }
    }
    // Requested extended components the image does not hold: initial state.
    img_bv &= !(rfbm & !bv & !3);
    for (c, data) in &loads {
        img[c.offset..c.offset + c.size].copy_from_slice(data);
        img_bv |= 1 << c.idx;
    }
    set_bv(img, img_bv);
    if let Some(m) = new_mxcsr {
        img[MXCSR_OFF..MXCSR_OFF + 4].copy_from_slice(&m.to_le_bytes());
        keep_mxcsr(img);
    }
    Ok(())
}

/// `xgetbv`: #UD unless CR4.OSXSAVE; ECX 0 = XCR0, 1 = XINUSE & XCR0 (if CPUID
/// has XGETBV_ECX1); #GP(0) otherwise.
pub(crate) fn xgetbv<C: CpuState, M: GuestPhysMem>(x: &mut Ctx<C, M>) -> R<()> {
    if x.cpu.cr4() & CR4_OSXSAVE == 0 {
        return ud();
    }
    let v = match x.cpu.gpr(RCX) as u32 {
        0 => x.cpu.xcr0(),
        1 if x.cpuid_bit(0xd, 1, 0, 2) => {
            let xcr0 = x.cpu.xcr0();
            xinuse(image(x.cpu)?) & xcr0
        }
        _ => return gp0(),
    };
    x.cpu.set_gpr(RAX, v & 0xffff_ffff);
    x.cpu.set_gpr(RDX, v >> 32);
    Ok(())
}

/// PKRU from the XSAVE image (component 9), 0 when not in use.
pub(crate) fn pkru(cpu: &mut impl CpuState) -> u32 {
    let c = cpu.cpuid(0xd, 9);
    let (off, size) = (c.ebx as usize, c.eax as usize);
    match cpu.xsave() {
        Some(img) if img.len() >= off + 4 && size >= 4 && u64_at(img, HDR) & (1 << 9) != 0 => {
            u32_at(img, off)
        }
        _ => 0,
    }
}

/// rdpkru / wrpkru: #UD unless CR4.PKE; #GP(0) unless ECX = 0 (and EDX = 0 for
/// wrpkru).
pub(crate) fn rdwrpkru<C: CpuState, M: GuestPhysMem>(x: &mut Ctx<C, M>, write: bool) -> R<()> {
    if x.cpu.cr4() & CR4_PKE == 0 {
        return ud();
    }
    if x.cpu.gpr(RCX) as u32 != 0 || (write && x.cpu.gpr(RDX) as u32 != 0) {
        return gp0();
    }
    let c = comp(x, 9);
    if !write {
        let v = pkru(x.cpu);
        x.cpu.set_gpr(RAX, u64::from(v));
        x.cpu.set_gpr(RDX, 0);
        return Ok(());
    }
    let v = x.cpu.gpr(RAX) as u32;
    let img = image_mut(x.cpu)?;
    if c.size < 4 || c.offset + 4 > img.len() {
        return unsupported("PKRU is not in the vCPU's XSAVE image");
    }
    touch(img, 9, Some(c));
    img[c.offset..c.offset + 4].copy_from_slice(&v.to_le_bytes());
    Ok(())
}

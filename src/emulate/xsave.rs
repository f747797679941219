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

const MXCSR_OFF: usize = 24;
const MXCSR_MASK_OFF: usize = 28;
const MXCSR_INIT: u32 = 0x1f80;
const XMM_OFF: usize = 160;
const ST_OFF: usize = 32;
/// The XSAVE header is at 512..576.
const HDR: usize = XSAVE_HEADER;
const COMPACTED: u64 = 1 << 63;

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]))
}

/// One extended component (i >= 2) as CPUID 0xD reports it.
#[derive(Clone, Copy, Debug)]
struct Comp {
    idx: u32,
    size: usize,
    /// Offset in the standard format (0 for supervisor components).
    offset: usize,
    align64: bool,
}

fn comp<C: CpuState, M: GuestPhysMem>(x: &mut Ctx<C, M>, idx: u32) -> Comp {
    let c = x.cpu.cpuid(0xd, idx);
    Comp {
        idx,
        size: c.eax as usize,
        offset: c.ebx as usize,
        align64: c.ecx & 2 != 0,
    }
}

/// The XSAVE image, or an error that ends the VM.
fn image<C: CpuState>(cpu: &mut C) -> R<&[u8]> {
    match cpu.xsave() {
        Some(img) if img.len() >= XSAVE_EXT_START => Ok(img),
        _ => unsupported("the vCPU's FPU/XSAVE state is not available"),
    }
}

fn image_mut<C: CpuState>(cpu: &mut C) -> R<&mut [u8]> {
    match cpu.xsave_mut() {
        Some(img) if img.len() >= XSAVE_EXT_START => Ok(img),
        _ => unsupported("the vCPU's FPU/XSAVE state is not available"),
    }
}

/// XINUSE as the image shows it; SSE counts as in use when MXCSR is not 1F80H.
fn xinuse(img: &[u8]) -> u64 {
    let mut bv = u64_at(img, HDR);
    if u32_at(img, MXCSR_OFF) != MXCSR_INIT {
        bv |= 2;
    }
    bv
}

fn set_bv(img: &mut [u8], bv: u64) {
    img[HDR..HDR + 8].copy_from_slice(&bv.to_le_bytes());
}

/// The x87 part of the legacy region (bytes 0..160, MXCSR excluded) in the image's
/// 64-bit form, or the initial values if x87 is not in use.
fn x87_state(img: &[u8]) -> [u8; 160] {
    let mut b = [0u8; 160];
    if u64_at(img, HDR) & 1 != 0 {
        b.copy_from_slice(&img[..160]);
    } else {
        b[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
    }
    b[MXCSR_OFF..MXCSR_OFF + 8].fill(0);
    b
}

/// Convert the x87 bytes to the form the instruction stores: the 64-bit forms keep
/// 64-bit FIP/FDP; the others store FIP[31:0], FCS, FDP[31:0], FDS (the selectors
/// as 0, as processors that deprecate them do).
fn x87_to_form(b: &mut [u8; 160], wide: bool) {
    if !wide {
        b[12..16].fill(0);
        b[20..24].fill(0);
    }
}

/// Materialise component `i` in the image (write its initial values if it was not
/// in use) and mark it in use, before changing part of it.
fn touch(img: &mut [u8], i: u32, c: Option<Comp>) {
    let bv = u64_at(img, HDR);
    if bv >> i & 1 != 0 {
        return;
    }
    match i {
        0 => {
            img[0..MXCSR_OFF].fill(0);
            img[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
            img[ST_OFF..XMM_OFF].fill(0);
        }
        1 => img[XMM_OFF..XMM_OFF + 256].fill(0),
        _ => {
            if let Some(c) = c {
                if let Some(s) = img.get_mut(c.offset..c.offset + c.size) {
                    s.fill(0);
                }
            }
        }
    }
    set_bv(img, bv | 1 << i);
}

/// KVM (Linux's uabi XSAVE copy) takes MXCSR only while SSE or AVX state is marked
/// in use: keep SSE marked whenever MXCSR matters.
fn keep_mxcsr(img: &mut [u8]) {
    if u64_at(img, HDR) & 6 == 0 {
        touch(img, 1, None);
    }
}

fn mxcsr_mask(img: &[u8]) -> u32 {
    match u32_at(img, MXCSR_MASK_OFF) {
        0 => 0xffbf,
        m => m,
    }
}

/// `fwait`: #NM if CR0.MP and CR0.TS; #MF if an unmasked x87 exception is pending
/// (FSW.ES) and CR0.NE; otherwise nothing (with CR0.NE = 0 the legacy FERR# path
/// is not modelled: a no-op).
pub(crate) fn fwait<C: CpuState, M: GuestPhysMem>(x: &mut Ctx<C, M>) -> R<()> {
    let cr0 = x.cpu.cr0();
    if cr0 & (CR0_MP | CR0_TS) == (CR0_MP | CR0_TS) {
        return Err(Stop::Exc(super::Exception::new(NM)));
    }
    let img = image(x.cpu)?;
    let fsw = if u64_at(img, HDR) & 1 != 0 {
        u16_at(img, 2)
    } else {
        0
    };
    if fsw & 0x80 != 0 && cr0 & CR0_NE != 0 {
        return Err(Stop::Exc(super::Exception::new(super::MF)));
    }
    Ok(())
}

/// Common checks of fxsave/fxrstor: #UD without FXSR, #NM on CR0.TS or CR0.EM,
/// #GP(0) unless 16-byte aligned. Returns the translated 512-byte area.
fn fx_area<C: CpuState, M: GuestPhysMem>(
    x: &mut Ctx<C, M>,
    i: &Instruction,
    kind: AccessKind,
) -> R<super::Area> {
    x.need(1, 0, 3, 24)?;
    if x.cpu.cr0() & (CR0_TS | CR0_EM) != 0 {
        return Err(Stop::Exc(super::Exception::new(NM)));
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

fn nxmm<C: CpuState, M: GuestPhysMem>(x: &Ctx<C, M>) -> usize {
    if x.mode.long64 {
        16
    } else {
        8
    }
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

/// Load the x87 part from `b` (legacy-region bytes as stored by the instruction's
/// form) into the image.
fn load_x87(img: &mut [u8], b: &[u8], wide: bool) {
    touch(img, 0, None);
    img[0..8].copy_from_slice(&b[0..8]);
    if wide {
        img[8..24].copy_from_slice(&b[8..24]);
    } else {
        img[8..12].copy_from_slice(&b[8..12]);
        img[12..16].fill(0);
        img[16..20].copy_from_slice(&b[16..20]);
        img[20..24].fill(0);
    }
    img[ST_OFF..XMM_OFF].copy_from_slice(&b[ST_OFF..XMM_OFF]);
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
        return Err(Stop::Exc(super::Exception::new(NM)));
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

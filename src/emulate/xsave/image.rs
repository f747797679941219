//! The vCPU's XSAVE image (standard format, XSTATE_BV as XINUSE) as the instructions
//! read and change it: offsets, component layout from CPUID leaf 0xD, initial values.

use super::super::state::*;
use super::super::{unsupported, Ctx, GuestPhysMem, R};

pub(super) const MXCSR_OFF: usize = 24;
pub(super) const MXCSR_MASK_OFF: usize = 28;
pub(super) const MXCSR_INIT: u32 = 0x1f80;
pub(super) const XMM_OFF: usize = 160;
pub(super) const ST_OFF: usize = 32;
/// The XSAVE header is at 512..576.
pub(super) const HDR: usize = XSAVE_HEADER;
pub(super) const COMPACTED: u64 = 1 << 63;

pub(super) fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
pub(super) fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]))
}
pub(super) fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]))
}

/// One extended component (i >= 2) as CPUID 0xD reports it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Comp {
    pub(super) idx: u32,
    pub(super) size: usize,
    /// Offset in the standard format (0 for supervisor components).
    pub(super) offset: usize,
    pub(super) align64: bool,
}

pub(super) fn comp<C: CpuState, M: GuestPhysMem>(x: &mut Ctx<C, M>, idx: u32) -> Comp {
    let c = x.cpu.cpuid(0xd, idx);
    Comp {
        idx,
        size: c.eax as usize,
        offset: c.ebx as usize,
        align64: c.ecx & 2 != 0,
    }
}

/// The XSAVE image, or an error that ends the VM.
pub(super) fn image<C: CpuState>(cpu: &mut C) -> R<&[u8]> {
    match cpu.xsave() {
        Some(img) if img.len() >= XSAVE_EXT_START => Ok(img),
        _ => unsupported("the vCPU's FPU/XSAVE state is not available"),
    }
}

pub(super) fn image_mut<C: CpuState>(cpu: &mut C) -> R<&mut [u8]> {
    match cpu.xsave_mut() {
        Some(img) if img.len() >= XSAVE_EXT_START => Ok(img),
        _ => unsupported("the vCPU's FPU/XSAVE state is not available"),
    }
}

/// XINUSE as the image shows it; SSE counts as in use when MXCSR is not 1F80H.
pub(super) fn xinuse(img: &[u8]) -> u64 {
    let mut bv = u64_at(img, HDR);
    if u32_at(img, MXCSR_OFF) != MXCSR_INIT {
        bv |= 2;
    }
    bv
}

pub(super) fn set_bv(img: &mut [u8], bv: u64) {
    img[HDR..HDR + 8].copy_from_slice(&bv.to_le_bytes());
}

/// The x87 part of the legacy region (bytes 0..160, MXCSR excluded) in the image's
/// 64-bit form, or the initial values if x87 is not in use.
pub(super) fn x87_state(img: &[u8]) -> [u8; 160] {
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
pub(super) fn x87_to_form(b: &mut [u8; 160], wide: bool) {
    if !wide {
        b[12..16].fill(0);
        b[20..24].fill(0);
    }
}

/// Materialise component `i` in the image (write its initial values if it was not
/// in use) and mark it in use, before changing part of it.
pub(super) fn touch(img: &mut [u8], i: u32, c: Option<Comp>) {
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
pub(super) fn keep_mxcsr(img: &mut [u8]) {
    if u64_at(img, HDR) & 6 == 0 {
        touch(img, 1, None);
    }
}

pub(super) fn mxcsr_mask(img: &[u8]) -> u32 {
    match u32_at(img, MXCSR_MASK_OFF) {
        0 => 0xffbf,
        m => m,
    }
}

/// Load the x87 part from `b` (legacy-region bytes as stored by the instruction's
/// form) into the image.
pub(super) fn load_x87(img: &mut [u8], b: &[u8], wide: bool) {
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

/// XMM registers the mode has.
pub(super) fn nxmm<C: CpuState, M: GuestPhysMem>(x: &Ctx<C, M>) -> usize {
    if x.mode.long64 {
        16
    } else {
        8
    }
}

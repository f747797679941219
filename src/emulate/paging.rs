//! Linear → guest-physical translation by walking the guest's page tables, with the
//! checks and side effects hardware has (Intel SDM vol. 3, ch. 4): 32-bit, PAE,
//! 4-level and 5-level paging; 4 KiB, 2/4 MiB and 1 GiB pages; P, R/W with CR0.WP,
//! U/S, XD with EFER.NXE, SMEP, SMAP with RFLAGS.AC, protection keys (PKRU) on user
//! pages; reserved bits (MAXPHYADDR, XD without NXE, PS where it may not be set);
//! accessed and dirty bits set atomically, as the processor does, once the access
//! is allowed. Canonical-address checks belong to segmentation (`mod.rs`).

use super::mem::{GuestPhysMem, NotRam};
use super::state::*;

/// #PF error code bits.
pub const PF_P: u32 = 1 << 0;
pub const PF_W: u32 = 1 << 1;
pub const PF_U: u32 = 1 << 2;
pub const PF_RSVD: u32 = 1 << 3;
pub const PF_I: u32 = 1 << 4;
pub const PF_PK: u32 = 1 << 5;

const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const XD: u64 = 1 << 63;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessKind {
    Read,
    Write,
    Fetch,
}

/// One access: what it does and whether it is a user-mode access (CPL 3 and not an
/// implicit supervisor access such as a descriptor-table read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    pub kind: AccessKind,
    pub user: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagingMode {
    /// CR0.PG = 0: linear = physical.
    Off,
    Bits32,
    Pae,
    Level4,
    Level5,
}

/// Why a translation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// #PF with this error code (CR2 = the linear address).
    Fault { error_code: u32 },
    /// A paging-structure entry is not in guest RAM.
    NotRam(NotRam),
}

impl From<NotRam> for WalkError {
    fn from(e: NotRam) -> Self {
        WalkError::NotRam(e)
    }
}

/// The paging controls in force for one instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Paging {
    pub mode: PagingMode,
    pub cr3: u64,
    pub wp: bool,
    pub nxe: bool,
    pub pse: bool,
    pub smep: bool,
    pub smap: bool,
    pub pke: bool,
    /// RFLAGS.AC with CPL < 3: supervisor data accesses to user pages are allowed
    /// under SMAP.
    pub ac_override: bool,
    pub pkru: u32,
    pub maxphyaddr: u8,
    pub gbpages: bool,
}

impl Paging {
    /// Reads the controls from the vCPU (CPUID 0x80000008 for MAXPHYADDR,
    /// 0x80000001 for 1 GiB pages, PKRU from the XSAVE image if CR4.PKE).
    pub fn from_cpu(cpu: &mut impl CpuState, cpl: u8) -> Paging {
        let cr0 = cpu.cr0();
        let cr4 = cpu.cr4();
        let efer = cpu.efer();
        let mode = if cr0 & CR0_PG == 0 || cr0 & CR0_PE == 0 {
            PagingMode::Off
        } else if cr4 & CR4_PAE == 0 {
            PagingMode::Bits32
        } else if efer & EFER_LMA == 0 {
            PagingMode::Pae
        } else if cr4 & CR4_LA57 != 0 {
            PagingMode::Level5
        } else {
            PagingMode::Level4
        };
        let ext = cpu.cpuid(0x8000_0000, 0).eax;
        let maxphyaddr = if ext >= 0x8000_0008 {
            (cpu.cpuid(0x8000_0008, 0).eax & 0xff) as u8
        } else {
            36
        }
        .clamp(32, 52);
        let gbpages = ext >= 0x8000_0001 && cpu.cpuid(0x8000_0001, 0).edx & (1 << 26) != 0;
        let pke = cr4 & CR4_PKE != 0 && matches!(mode, PagingMode::Level4 | PagingMode::Level5);
        let pkru = if pke { super::xsave::pkru(cpu) } else { 0 };
        Paging {
            mode,
            cr3: cpu.cr3(),
            wp: cr0 & CR0_WP != 0,
            nxe: efer & EFER_NXE != 0 && mode != PagingMode::Bits32,
            pse: cr4 & CR4_PSE != 0,
            smep: cr4 & CR4_SMEP != 0,
            smap: cr4 & CR4_SMAP != 0,
            pke,
            ac_override: cpl < 3 && cpu.rflags() & FLAG_AC != 0,
            pkru,
            maxphyaddr,
            gbpages,
        }
    }

    fn addr_mask(&self) -> u64 {
        ((1u64 << self.maxphyaddr) - 1) & !0xfff
    }

    /// Translates `la` for `acc`. Sets accessed (and, for writes, dirty) bits when
    /// the access is allowed.
    pub fn translate(
        &self,
        mem: &impl GuestPhysMem,
        la: u64,
        acc: Access,
    ) -> Result<u64, WalkError> {
        if self.mode == PagingMode::Off {
            return Ok(la & 0xffff_ffff);
        }
        // An entry changing under us (another vCPU, or the guest's own page-table
        // code) between the read and the A/D update restarts the walk, as KVM's
        // walker does. Bounded: after that the translation stands without the update.
        for _ in 0..16 {
            if let Some(pa) = self.walk(mem, la, acc, true)? {
                return Ok(pa);
            }
        }
        Ok(self.walk(mem, la, acc, false)?.unwrap_or(0))
    }

    /// One walk. Ok(None): an A/D update lost a race; walk again.
    fn walk(
        &self,
        mem: &impl GuestPhysMem,
        la: u64,
        acc: Access,
        update: bool,
    ) -> Result<Option<u64>, WalkError> {
        let write = acc.kind == AccessKind::Write;
        let fetch = acc.kind == AccessKind::Fetch;
        let mut err = 0u32;
        if write {
            err |= PF_W;
        }
        if acc.user {
            err |= PF_U;
        }
        if fetch && (self.smep || self.nxe) {
            err |= PF_I;
        }
        let fault = |bits: u32| {
            Err(WalkError::Fault {
                error_code: err | bits,
            })
        };
        let amask = self.addr_mask();
        let hi_rsvd = ((1u64 << 52) - 1) & !((1u64 << self.maxphyaddr) - 1);
        let xd_rsvd = if self.nxe { 0 } else { XD };

        // Entries the walk used: (gpa, value, 4-byte entry, leaf, may take A).
        let mut used: [(u64, u64, bool, bool, bool); 5] = [(0, 0, false, false, false); 5];
        let mut n = 0;
        let (mut rw, mut us, mut xd) = (true, true, false);
        let (levels, wide) = match self.mode {
            PagingMode::Bits32 => (2u32, false),
            PagingMode::Pae => (3, true),
            PagingMode::Level4 => (4, true),
            PagingMode::Level5 => (5, true),
            PagingMode::Off => unreachable!(),
        };
        let mut table = match self.mode {
            PagingMode::Bits32 => self.cr3 & 0xffff_f000,
            PagingMode::Pae => self.cr3 & 0xffff_ffe0,
            _ => self.cr3 & amask,
        };
        let mut pa = 0u64;
        let mut leaf_entry = 0u64;
        for level in (1..=levels).rev() {
            let bits = if wide { 9 } else { 10 };
            let shift = 12 + bits * (level - 1);
            let (gpa, e) = if wide {
                let idx = if self.mode == PagingMode::Pae && level == 3 {
                    (la >> 30) & 3
                } else {
                    (la >> shift) & 0x1ff
                };
                let gpa = table + idx * 8;
                let mut b = [0u8; 8];
                mem.read(gpa, &mut b)?;
                (gpa, u64::from_le_bytes(b))
            } else {
                let gpa = table + ((la >> shift) & 0x3ff) * 4;
                let mut b = [0u8; 4];
                mem.read(gpa, &mut b)?;
                (gpa, u64::from(u32::from_le_bytes(b)))
            };
            if e & P == 0 {
                return fault(0);
            }
            if self.mode == PagingMode::Pae && level == 3 {
                // PDPTE: no R/W, U/S, XD or accessed bit; bits 2:1 and 8:5 reserved.
                if e & (hi_rsvd | XD | 0x1e6) != 0 {
                    return fault(PF_P | PF_RSVD);
                }
                table = e & amask;
                continue;
            }
            let ps = e & PS != 0;
            let leaf = level == 1
                || (ps
                    && match (self.mode, level) {
                        (PagingMode::Bits32, 2) => self.pse,
                        (_, 2) => true,
                        (PagingMode::Level4 | PagingMode::Level5, 3) => self.gbpages,
                        _ => false,
                    });
            let rsvd = if wide {
                let mut r = hi_rsvd | xd_rsvd;
                match level {
                    4 | 5 => r |= PS,
                    3 if ps && !self.gbpages => r |= PS,
                    3 if leaf => r |= 0x3fff_e000,
                    2 if leaf => r |= 0x1f_e000,
                    _ => {}
                }
                r
            } else if leaf && level == 2 {
                // 4 MiB page: bit 21 reserved; bits 20:13 are PA[39:32] (PSE-36),
                // reserved above MAXPHYADDR.
                let pse36_bits = self.maxphyaddr.saturating_sub(32).min(8);
                let r = (0xffu64 << 13) & !(((1u64 << pse36_bits) - 1) << 13);
                (1 << 21) | r
            } else {
                0
            };
            if e & rsvd != 0 {
                return fault(PF_P | PF_RSVD);
            }
            rw &= e & RW != 0;
            us &= e & US != 0;
            xd |= self.nxe && e & XD != 0;
            used[n] = (gpa, e, !wide, leaf, true);
            n += 1;
            if leaf {
                let size = 1u64 << shift;
                pa = if !wide && level == 2 {
                    (e & 0xffc0_0000) | (((e >> 13) & 0xff) << 32) | (la & (size - 1))
                } else if !wide {
                    (e & 0xffff_f000) | (la & 0xfff)
                } else {
                    (e & amask & !(size - 1)) | (la & (size - 1))
                };
                leaf_entry = e;
                break;
            }
            table = if wide { e & amask } else { e & 0xffff_f000 };
        }

        // Permissions (SDM 4.6).
        let denied = if acc.user {
            !us || (write && !rw) || (fetch && xd)
        } else {
            let smap_blocks = us && self.smap && !self.ac_override;
            match acc.kind {
                AccessKind::Fetch => xd || (self.smep && us),
                AccessKind::Read => smap_blocks,
                AccessKind::Write => smap_blocks || (self.wp && !rw),
            }
        };
        if denied {
            return fault(PF_P);
        }
        if self.pke && us && !fetch {
            let key = ((leaf_entry >> 59) & 0xf) as u32;
            let ad = self.pkru >> (2 * key) & 1 != 0;
            let wd = self.pkru >> (2 * key + 1) & 1 != 0;
            if ad || (write && wd && (acc.user || self.wp)) {
                return fault(PF_P | PF_PK);
            }
        }

        if update {
            for &(gpa, e, narrow, leaf, _) in &used[..n] {
                let want = e | A | if leaf && write { D } else { 0 };
                if want == e {
                    continue;
                }
                if !set_bits(mem, gpa, e, want, narrow)? {
                    return Ok(None);
                }
            }
        }
        Ok(Some(pa))
    }
}

/// Atomically replace entry `old` by `new` at `gpa`; false if it had changed.
fn set_bits(
    mem: &impl GuestPhysMem,
    gpa: u64,
    old: u64,
    new: u64,
    narrow: bool,
) -> Result<bool, NotRam> {
    if !narrow {
        return Ok(mem.cmpxchg64(gpa, old, new)? == old);
    }
    // A 4-byte entry: exchange the aligned 8 bytes holding it.
    let word = gpa & !7;
    let shift = (gpa & 4) * 8;
    let mut b = [0u8; 8];
    mem.read(word, &mut b)?;
    let cur = u64::from_le_bytes(b);
    if (cur >> shift) & 0xffff_ffff != old {
        return Ok(false);
    }
    let next = (cur & !(0xffff_ffffu64 << shift)) | (new << shift);
    Ok(mem.cmpxchg64(word, cur, next)? == cur)
}

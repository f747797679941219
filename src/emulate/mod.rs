//! A userspace fallback for instructions KVM's emulator cannot run.
//!
//! On a nested PVM host every guest instruction at CPL0 goes through KVM's x86
//! emulator, which lacks a few that a Linux kernel executes (popcnt, cmpxchg16b, the
//! xsave family, fwait, clac/stac, swapgs, sysret, ...; see
//! shared/research/emulation-fallback.md). With KVM_CAP_EXIT_ON_EMULATION_FAILURE
//! those exits reach wbvmm, and [`emulate`] decodes the instruction (iced-x86) and
//! carries it out against the vCPU's state ([`CpuState`]) and guest memory
//! ([`GuestPhysMem`]), translating linear addresses by walking the guest's page
//! tables with hardware's permission checks ([`paging`]). Faults are reported as
//! [`Outcome::Exception`] for the caller to inject, exactly where hardware would
//! raise them; what is not covered is [`Outcome::Unsupported`], with the decoded
//! instruction for the failure line.
//!
//! Any guest can reach this code on purpose, so it must not panic on any input and
//! never touches memory outside guest RAM (accesses to non-RAM guest-physical
//! addresses, e.g. MMIO, are refused: the VM ends with a line naming the address).
//!
//! Not modelled: RFLAGS.TF single-step traps after an emulated instruction, the
//! interrupt shadow (cleared by KVM on the next entry anyway), #AC alignment checks,
//! supervisor XSAVE components (XSS), protection keys for supervisor pages (PKS).

pub mod fake;
pub mod fuzzing;
mod insns;
pub mod kvm;
pub mod mem;
pub mod paging;
pub mod state;
mod xsave;

use std::collections::{BTreeMap, HashMap};

use iced_x86::{
    Code, Decoder, DecoderError, DecoderOptions, Formatter, Instruction, IntelFormatter, Mnemonic,
    OpKind, Register,
};
use serde::Serialize;

pub use mem::{GuestPhysMem, NotRam};
use paging::{Access, AccessKind, Paging, WalkError};
pub use state::*;

/// Exception vectors.
pub const DB: u8 = 1;
pub const BP: u8 = 3;
pub const UD: u8 = 6;
pub const NM: u8 = 7;
pub const NP: u8 = 11;
pub const SS: u8 = 12;
pub const GP: u8 = 13;
pub const PF: u8 = 14;
pub const MF: u8 = 16;

/// An exception to deliver to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exception {
    pub vector: u8,
    pub error_code: Option<u32>,
    /// For #PF: the faulting linear address (to be put in CR2).
    pub cr2: Option<u64>,
}

impl Exception {
    pub fn new(vector: u8) -> Self {
        Exception {
            vector,
            error_code: None,
            cr2: None,
        }
    }
    pub fn with_code(vector: u8, code: u32) -> Self {
        Exception {
            vector,
            error_code: Some(code),
            cr2: None,
        }
    }
}

/// What [`emulate`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The instruction completed; the state holds its results and RIP is past it.
    Emulated { mnemonic: Mnemonic },
    /// Deliver `exception`. For faults nothing changed and RIP still points at the
    /// instruction; for the #BP of `int3` (a trap) RIP is past it.
    Exception {
        mnemonic: Mnemonic,
        exception: Exception,
    },
    /// Deliver `vector` as an interrupt (a software `int n` whose gate checks
    /// passed); RIP is past the instruction.
    Interrupt { mnemonic: Mnemonic, vector: u8 },
    /// Not covered: `text` has the decoded instruction and why.
    Unsupported { text: String },
}

/// Why an instruction stopped early (internal).
#[derive(Debug)]
pub(crate) enum Stop {
    Exc(Exception),
    Unsupported(String),
}

impl From<Exception> for Stop {
    fn from(e: Exception) -> Self {
        Stop::Exc(e)
    }
}

pub(crate) type R<T> = Result<T, Stop>;

pub(crate) fn ud<T>() -> R<T> {
    Err(Stop::Exc(Exception::new(UD)))
}

pub(crate) fn gp0<T>() -> R<T> {
    Err(Stop::Exc(Exception::with_code(GP, 0)))
}

pub(crate) fn unsupported<T>(why: impl Into<String>) -> R<T> {
    Err(Stop::Unsupported(why.into()))
}

fn not_ram(e: NotRam) -> Stop {
    Stop::Unsupported(format!(
        "{} guest-physical {:#x}, which is not guest RAM (MMIO or a hole{}); not emulated",
        if e.write { "writes" } else { "reads" },
        e.gpa,
        if e.write { ", or read-only" } else { "" }
    ))
}

/// The processor mode of the instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Mode {
    /// 16, 32 or 64.
    pub bitness: u32,
    pub long64: bool,
    pub protected: bool,
    pub vm86: bool,
    pub cpl: u8,
    pub la57: bool,
}

impl Mode {
    fn of(cpu: &mut impl CpuState) -> Mode {
        let cr0 = cpu.cr0();
        let efer = cpu.efer();
        let rflags = cpu.rflags();
        let cs = cpu.segment(Seg::Cs);
        let protected = cr0 & CR0_PE != 0;
        let vm86 = protected && rflags & FLAG_VM != 0 && efer & EFER_LMA == 0;
        let long64 = protected && efer & EFER_LMA != 0 && cs.l;
        let bitness = if long64 {
            64
        } else if protected && !vm86 && cs.db {
            32
        } else {
            16
        };
        let cpl = if !protected {
            0
        } else if vm86 {
            3
        } else {
            (cs.selector & 3) as u8
        };
        Mode {
            bitness,
            long64,
            protected,
            vm86,
            cpl,
            la57: cpu.cr4() & CR4_LA57 != 0,
        }
    }
}

/// One instruction's view of the vCPU and memory.
pub(crate) struct Ctx<'a, C: CpuState, M: GuestPhysMem> {
    pub cpu: &'a mut C,
    pub mem: &'a M,
    pub mode: Mode,
    paging: Option<Paging>,
}

/// A range of guest memory already translated (and permission-checked): the pieces
/// in page order, as (guest-physical address, length).
pub(crate) struct Area {
    pieces: Vec<(u64, usize)>,
}

impl Area {
    /// Walk the pieces covering `[off, off + len)`: (gpa, start in the slice, length).
    fn each(&self, off: usize, len: usize, mut f: impl FnMut(u64, usize, usize) -> R<()>) -> R<()> {
        let mut base = 0usize;
        let end = off + len;
        for &(gpa, plen) in &self.pieces {
            let (s, e) = (off.max(base), end.min(base + plen));
            if s < e {
                f(gpa + (s - base) as u64, s - off, e - s)?;
            }
            base += plen;
        }
        debug_assert!(end <= base);
        Ok(())
    }

    pub fn read(&self, mem: &impl GuestPhysMem, off: usize, buf: &mut [u8]) -> R<()> {
        let len = buf.len();
        self.each(off, len, |gpa, s, n| {
            mem.read(gpa, &mut buf[s..s + n]).map_err(not_ram)
        })
    }

    pub fn write(&self, mem: &impl GuestPhysMem, off: usize, data: &[u8]) -> R<()> {
        self.each(off, data.len(), |gpa, s, n| {
            mem.write(gpa, &data[s..s + n]).map_err(not_ram)
        })
    }
}

pub(crate) fn canonical(la: u64, la57: bool) -> bool {
    let bits = if la57 { 57 } else { 48 };
    (((la << (64 - bits)) as i64) >> (64 - bits)) as u64 == la
}

impl<'a, C: CpuState, M: GuestPhysMem> Ctx<'a, C, M> {
    pub fn new(cpu: &'a mut C, mem: &'a M) -> Self {
        let mode = Mode::of(cpu);
        Ctx {
            cpu,
            mem,
            mode,
            paging: None,
        }
    }

    fn paging(&mut self) -> Paging {
        if let Some(p) = self.paging {
            return p;
        }
        let p = Paging::from_cpu(self.cpu, self.mode.cpl);
        self.paging = Some(p);
        p
    }

    pub fn cpuid_bit(&mut self, leaf: u32, sub: u32, reg: usize, bit: u32) -> bool {
        let max = if leaf >= 0x8000_0000 {
            self.cpu.cpuid(0x8000_0000, 0).eax
        } else {
            self.cpu.cpuid(0, 0).eax
        };
        if leaf > max {
            return false;
        }
        let c = self.cpu.cpuid(leaf, sub);
        let v = [c.eax, c.ebx, c.ecx, c.edx][reg & 3];
        v >> bit & 1 != 0
    }

    /// `#UD` unless CPUID has the feature.
    pub fn need(&mut self, leaf: u32, sub: u32, reg: usize, bit: u32) -> R<()> {
        if self.cpuid_bit(leaf, sub, reg, bit) {
            Ok(())
        } else {
            ud()
        }
    }

    /// Segmentation: the linear address of `[off, off + size)` in `seg`, with the
    /// limit, type and canonical checks (#GP(0), or #SS(0) for the stack segment;
    /// without an error code in real mode).
    pub fn linear(&mut self, seg: Seg, off: u64, size: u64, kind: AccessKind) -> R<u64> {
        let size = size.max(1);
        let fault = |m: &Mode| {
            let v = if seg == Seg::Ss { SS } else { GP };
            let code = if m.protected { Some(0) } else { None };
            Err(Stop::Exc(Exception {
                vector: v,
                error_code: code,
                cr2: None,
            }))
        };
        if self.mode.long64 {
            let base = match seg {
                Seg::Fs | Seg::Gs => self.cpu.segment(seg).base,
                _ => 0,
            };
            let la = base.wrapping_add(off);
            let last = la.wrapping_add(size - 1);
            if !canonical(la, self.mode.la57) || !canonical(last, self.mode.la57) {
                return fault(&self.mode);
            }
            return Ok(la);
        }
        let s = self.cpu.segment(seg);
        let last = off.wrapping_add(size - 1);
        if self.mode.protected && !self.mode.vm86 {
            if s.unusable || !s.present {
                return fault(&self.mode);
            }
            let code = s.type_ & 8 != 0;
            let ok_type = match kind {
                AccessKind::Write => !code && s.type_ & 2 != 0,
                AccessKind::Read => !code || s.type_ & 2 != 0,
                AccessKind::Fetch => true,
            };
            if !ok_type {
                return fault(&self.mode);
            }
            if !code && s.type_ & 4 != 0 {
                // Expand-down: valid offsets are (limit, upper].
                let upper = if s.db { 0xffff_ffff } else { 0xffff };
                if off <= u64::from(s.limit) || last > upper || last < off {
                    return fault(&self.mode);
                }
            } else if last > u64::from(s.limit) || last < off {
                return fault(&self.mode);
            }
        } else if last > u64::from(s.limit) || last < off {
            return fault(&self.mode);
        }
        Ok(s.base.wrapping_add(off) & 0xffff_ffff)
    }

    /// Paging for one linear address (any page of it), as an access of the current
    /// CPL unless `supervisor` (implicit supervisor accesses: descriptor tables).
    pub fn translate(&mut self, la: u64, kind: AccessKind, supervisor: bool) -> R<u64> {
        let p = self.paging();
        let acc = Access {
            kind,
            user: self.mode.cpl == 3 && !supervisor,
        };
        match p.translate(self.mem, la, acc) {
            Ok(pa) => Ok(pa),
            Err(WalkError::Fault { error_code }) => Err(Stop::Exc(Exception {
                vector: PF,
                error_code: Some(error_code),
                cr2: Some(la),
            })),
            Err(WalkError::NotRam(e)) => Err(not_ram(e)),
        }
    }

    /// Translate every page of `[la, la + len)` up front, so that an instruction
    /// faults before it changes anything.
    pub fn area(&mut self, la: u64, len: usize, kind: AccessKind, supervisor: bool) -> R<Area> {
        let mut pieces = Vec::with_capacity(2);
        let mut done = 0usize;
        while done < len {
            let a = la.wrapping_add(done as u64);
            let a = if self.mode.long64 { a } else { a & 0xffff_ffff };
            let room = (mem::PAGE - (a & (mem::PAGE - 1))) as usize;
            let n = room.min(len - done);
            let pa = self.translate(a, kind, supervisor)?;
            pieces.push((pa, n));
            done += n;
        }
        Ok(Area { pieces })
    }

    /// The segment and offset of instruction operand `op` (a memory operand).
    pub fn mem_operand(&mut self, i: &Instruction, op: u32) -> R<(Seg, u64)> {
        if i.op_kind(op) != OpKind::Memory {
            return unsupported("expected a memory operand");
        }
        let cpu = &mut *self.cpu;
        let off = i.try_virtual_address(op, 0, |r, _, _| {
            if r.is_segment_register() {
                Some(0)
            } else if r.is_gpr() {
                Some(get_reg(cpu, r))
            } else {
                None
            }
        });
        let Some(off) = off else {
            return unsupported("memory operand with an unexpected register");
        };
        let seg = match i.memory_segment() {
            Register::ES => Seg::Es,
            Register::CS => Seg::Cs,
            Register::SS => Seg::Ss,
            Register::DS => Seg::Ds,
            Register::FS => Seg::Fs,
            Register::GS => Seg::Gs,
            _ => return unsupported("memory operand without a segment"),
        };
        Ok((seg, off))
    }

    /// Read `size` (1..=8) bytes of operand `op`, register or memory.
    pub fn read_operand(&mut self, i: &Instruction, op: u32, size: usize) -> R<u64> {
        match i.op_kind(op) {
            OpKind::Register => Ok(get_reg(self.cpu, i.op_register(op))),
            OpKind::Memory => {
                let (seg, off) = self.mem_operand(i, op)?;
                let mut b = [0u8; 8];
                self.read_mem(seg, off, &mut b[..size])?;
                Ok(u64::from_le_bytes(b))
            }
            _ => unsupported("unexpected operand kind"),
        }
    }

    pub fn read_mem(&mut self, seg: Seg, off: u64, buf: &mut [u8]) -> R<()> {
        let la = self.linear(seg, off, buf.len() as u64, AccessKind::Read)?;
        let a = self.area(la, buf.len(), AccessKind::Read, false)?;
        a.read(self.mem, 0, buf)
    }

    pub fn write_mem(&mut self, seg: Seg, off: u64, data: &[u8]) -> R<()> {
        let la = self.linear(seg, off, data.len() as u64, AccessKind::Write)?;
        let a = self.area(la, data.len(), AccessKind::Write, false)?;
        a.write(self.mem, 0, data)
    }

    pub fn set_flags(&mut self, clear: u64, set: u64) {
        let f = self.cpu.rflags();
        self.cpu.set_rflags((f & !clear) | set);
    }
}

/// A GPR's value at its size (AH..BH are the high bytes).
pub(crate) fn get_reg(cpu: &mut impl CpuState, r: Register) -> u64 {
    let n = r.full_register().number();
    let v = cpu.gpr(n);
    match r.size() {
        8 => v,
        4 => v & 0xffff_ffff,
        2 => v & 0xffff,
        _ if matches!(r, Register::AH | Register::CH | Register::DH | Register::BH) => {
            (cpu.gpr(r.number() - 4) >> 8) & 0xff
        }
        _ => v & 0xff,
    }
}

/// Write a GPR at its size: 32-bit writes zero-extend, 16- and 8-bit writes merge.
pub(crate) fn set_reg(cpu: &mut impl CpuState, r: Register, v: u64) {
    let n = r.full_register().number();
    let old = cpu.gpr(n);
    let new = match r.size() {
        8 => v,
        4 => v & 0xffff_ffff,
        2 => (old & !0xffff) | (v & 0xffff),
        _ if matches!(r, Register::AH | Register::CH | Register::DH | Register::BH) => {
            let n = r.number() - 4;
            let old = cpu.gpr(n);
            cpu.set_gpr(n, (old & !0xff00) | ((v & 0xff) << 8));
            return;
        }
        _ => (old & !0xff) | (v & 0xff),
    };
    cpu.set_gpr(n, new);
}

fn format_insn(i: &Instruction) -> String {
    let mut f = IntelFormatter::new();
    let mut s = String::new();
    f.format(i, &mut s);
    s
}

/// Decode the instruction at CS:RIP: `bytes` as KVM fetched them (up to 15, or to
/// the end of the page), the rest read from guest memory through the page tables
/// (with instruction-fetch permissions) only if the instruction needs it.
fn decode<C: CpuState, M: GuestPhysMem>(x: &mut Ctx<C, M>, bytes: &[u8]) -> R<Instruction> {
    let rip = x.cpu.rip();
    let mut buf: Vec<u8> = bytes.iter().copied().take(15).collect();
    loop {
        let mut d = Decoder::with_ip(x.mode.bitness, &buf, rip, DecoderOptions::NONE);
        let mut i = Instruction::default();
        d.decode_out(&mut i);
        if !(d.last_error() == DecoderError::NoMoreBytes && buf.len() < 15) {
            return Ok(i);
        }
        // Fetch from the next byte to the end of its page (at most 15 in all).
        let mask = if x.mode.bitness == 16 && !x.mode.long64 {
            0xffff
        } else if x.mode.long64 {
            u64::MAX
        } else {
            0xffff_ffff
        };
        let off = rip.wrapping_add(buf.len() as u64) & mask;
        let la = x.linear(Seg::Cs, off, 1, AccessKind::Fetch)?;
        let room = (mem::PAGE - (la & (mem::PAGE - 1))) as usize;
        let n = room.min(15 - buf.len());
        let la = x.linear(Seg::Cs, off, n as u64, AccessKind::Fetch)?;
        let a = x.area(la, n, AccessKind::Fetch, false)?;
        let mut more = vec![0u8; n];
        a.read(x.mem, 0, &mut more)?;
        buf.extend_from_slice(&more);
    }
}

fn advance<C: CpuState, M: GuestPhysMem>(x: &mut Ctx<C, M>, i: &Instruction) {
    let ip = match x.mode.bitness {
        64 => i.next_ip(),
        32 => i.next_ip() & 0xffff_ffff,
        _ => i.next_ip() & 0xffff,
    };
    x.cpu.set_rip(ip);
}

/// Emulate the instruction at the vCPU's RIP. `insn_bytes` are what KVM fetched
/// (may be empty: then they are read from guest memory).
pub fn emulate(cpu: &mut impl CpuState, mem: &impl GuestPhysMem, insn_bytes: &[u8]) -> Outcome {
    let mut x = Ctx::new(cpu, mem);
    let i = match decode(&mut x, insn_bytes) {
        Ok(i) => i,
        Err(Stop::Exc(e)) => {
            return Outcome::Exception {
                mnemonic: Mnemonic::INVALID,
                exception: e,
            }
        }
        Err(Stop::Unsupported(why)) => {
            return Outcome::Unsupported {
                text: format!("fetching the instruction: {why}"),
            }
        }
    };
    let mnemonic = i.mnemonic();
    if i.code() == Code::INVALID {
        // Not an instruction (or a LOCK prefix where none is allowed): hardware
        // raises #UD.
        return Outcome::Exception {
            mnemonic,
            exception: Exception::new(UD),
        };
    }
    match insns::execute(&mut x, &i) {
        Ok(insns::Done::Next) => {
            advance(&mut x, &i);
            // RFLAGS.RF is cleared once an instruction completes.
            let f = x.cpu.rflags();
            if f & (1 << 16) != 0 {
                x.cpu.set_rflags(f & !(1 << 16));
            }
            Outcome::Emulated { mnemonic }
        }
        Ok(insns::Done::Jumped) => Outcome::Emulated { mnemonic },
        Ok(insns::Done::Interrupt(vector)) => {
            advance(&mut x, &i);
            Outcome::Interrupt { mnemonic, vector }
        }
        Ok(insns::Done::Trap(e)) => {
            advance(&mut x, &i);
            Outcome::Exception {
                mnemonic,
                exception: e,
            }
        }
        Err(Stop::Exc(e)) => Outcome::Exception {
            mnemonic,
            exception: e,
        },
        Err(Stop::Unsupported(why)) => Outcome::Unsupported {
            text: format!("`{}`: {why}", format_insn(&i)),
        },
    }
}

/// Fallbacks by mnemonic, with the time they took (exit to re-entry).
#[derive(Debug, Clone, Default)]
pub struct EmulationStats {
    by_mnemonic: HashMap<Mnemonic, EmulationCount>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct EmulationCount {
    pub count: u64,
    pub total_ns: u64,
}

/// The name `--stats` uses for a mnemonic: `popcnt`, `cmpxchg16b`, ...
pub fn mnemonic_name(m: Mnemonic) -> String {
    format!("{m:?}").to_ascii_lowercase()
}

impl EmulationStats {
    pub fn record(&mut self, m: Mnemonic, ns: u64) {
        let e = self.by_mnemonic.entry(m).or_default();
        e.count += 1;
        e.total_ns += ns;
    }

    pub fn merge(&mut self, o: &EmulationStats) {
        for (m, c) in &o.by_mnemonic {
            let e = self.by_mnemonic.entry(*m).or_default();
            e.count += c.count;
            e.total_ns += c.total_ns;
        }
    }

    pub fn get(&self, m: Mnemonic) -> EmulationCount {
        self.by_mnemonic.get(&m).copied().unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.by_mnemonic.is_empty()
    }

    /// Counts by [`mnemonic_name`], as `--stats` reports them.
    pub fn by_name(&self) -> BTreeMap<String, EmulationCount> {
        self.by_mnemonic
            .iter()
            .map(|(k, v)| (mnemonic_name(*k), *v))
            .collect()
    }
}

impl Serialize for EmulationStats {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.by_name().serialize(s)
    }
}

#[cfg(test)]
mod tests;

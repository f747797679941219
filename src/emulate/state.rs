//! The vCPU state the emulator works on, behind a trait: the KVM implementation
//! (`kvm.rs`) fetches each part lazily and writes back only what changed; the fake
//! (`fake.rs`) is plain data for tests and fuzzing.

/// General-purpose register numbers in encoding order (RAX = 0 ... R15 = 15).
pub const RAX: usize = 0;
pub const RCX: usize = 1;
pub const RDX: usize = 2;
pub const RBX: usize = 3;
pub const RSP: usize = 4;
pub const RBP: usize = 5;
pub const RSI: usize = 6;
pub const RDI: usize = 7;
pub const R11: usize = 11;

/// RFLAGS bits.
pub const FLAG_CF: u64 = 1 << 0;
pub const FLAG_PF: u64 = 1 << 2;
pub const FLAG_AF: u64 = 1 << 4;
pub const FLAG_ZF: u64 = 1 << 6;
pub const FLAG_SF: u64 = 1 << 7;
pub const FLAG_TF: u64 = 1 << 8;
pub const FLAG_OF: u64 = 1 << 11;
pub const FLAG_AC: u64 = 1 << 18;
pub const FLAG_VM: u64 = 1 << 17;
/// The six arithmetic flags.
pub const FLAGS_ARITH: u64 = FLAG_CF | FLAG_PF | FLAG_AF | FLAG_ZF | FLAG_SF | FLAG_OF;

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_MP: u64 = 1 << 1;
pub const CR0_EM: u64 = 1 << 2;
pub const CR0_TS: u64 = 1 << 3;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_PG: u64 = 1 << 31;

pub const CR4_TSD: u64 = 1 << 2;
pub const CR4_PSE: u64 = 1 << 4;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_OSFXSR: u64 = 1 << 9;
pub const CR4_LA57: u64 = 1 << 12;
pub const CR4_FSGSBASE: u64 = 1 << 16;
pub const CR4_OSXSAVE: u64 = 1 << 18;
pub const CR4_SMEP: u64 = 1 << 20;
pub const CR4_SMAP: u64 = 1 << 21;
pub const CR4_PKE: u64 = 1 << 22;

pub const EFER_SCE: u64 = 1 << 0;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;
pub const EFER_FFXSR: u64 = 1 << 14;

pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_XSS: u32 = 0xda0;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_SFMASK: u32 = 0xc000_0084;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
pub const MSR_TSC_AUX: u32 = 0xc000_0103;

/// The segment registers, in encoding order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Seg {
    Es,
    Cs,
    Ss,
    Ds,
    Fs,
    Gs,
}

/// A segment register with its hidden part, as KVM reports it (`kvm_segment`):
/// `limit` is the effective byte limit (granularity applied).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    /// Descriptor type (4 bits).
    pub type_: u8,
    /// Code or data (1) rather than system (0).
    pub s: bool,
    pub dpl: u8,
    pub present: bool,
    /// D/B: 32-bit default size (code) / big (stack, expand-down bound).
    pub db: bool,
    /// 64-bit code segment.
    pub l: bool,
    pub g: bool,
    pub avl: bool,
    pub unusable: bool,
}

/// GDTR / IDTR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescTable {
    pub base: u64,
    pub limit: u16,
}

/// One CPUID answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cpuid {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Everything the emulator may read or change. Getters take `&mut self` so an
/// implementation can fetch state on first use. The emulator calls no setter
/// before it knows the instruction completes: an instruction that faults leaves the
/// state untouched (except accessed/dirty bits in guest page tables, as hardware).
pub trait CpuState {
    /// GPR by encoding number (0 = RAX ... 15 = R15), all 64 bits.
    fn gpr(&mut self, n: usize) -> u64;
    fn set_gpr(&mut self, n: usize, v: u64);
    fn rip(&mut self) -> u64;
    fn set_rip(&mut self, v: u64);
    fn rflags(&mut self) -> u64;
    fn set_rflags(&mut self, v: u64);
    fn segment(&mut self, s: Seg) -> Segment;
    fn set_segment(&mut self, s: Seg, v: Segment);
    fn gdt(&mut self) -> DescTable;
    fn idt(&mut self) -> DescTable;
    /// LDTR (its base and limit, `unusable` if none).
    fn ldt(&mut self) -> Segment;
    fn cr0(&mut self) -> u64;
    fn cr3(&mut self) -> u64;
    fn cr4(&mut self) -> u64;
    fn efer(&mut self) -> u64;
    fn xcr0(&mut self) -> u64;
    /// An MSR's value, None if the vCPU has no such MSR.
    fn msr(&mut self, index: u32) -> Option<u64>;
    /// Write an MSR; false if refused.
    fn set_msr(&mut self, index: u32, v: u64) -> bool;
    /// The FPU/SSE/AVX state as a standard-format (uncompacted) XSAVE image: the
    /// 512-byte legacy region (FXSAVE layout, 64-bit FIP/FDP), the header (XSTATE_BV
    /// = which components are not in their initial state; XCOMP_BV = 0), the
    /// extended components at the offsets CPUID leaf 0xD gives. None if it cannot be
    /// had; then the instructions that need it end the VM.
    fn xsave(&mut self) -> Option<&[u8]>;
    /// The same, for changing (marks it to be written back).
    fn xsave_mut(&mut self) -> Option<&mut [u8]>;
    /// CPUID as the guest sees it.
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> Cpuid;
    /// A random number from the host (RDRAND; RDSEED when `seed`), None if the
    /// host's generator has nothing now (the guest sees CF = 0 and retries).
    fn random(&mut self, seed: bool) -> Option<u64>;
    /// Put the vCPU to sleep until an interrupt (HLT) once it resumes.
    fn halt(&mut self);
}

/// XSAVE header offsets in the image.
pub const XSAVE_HEADER: usize = 512;
pub const XSAVE_LEGACY_END: usize = 512;
pub const XSAVE_EXT_START: usize = 576;

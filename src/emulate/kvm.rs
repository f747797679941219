//! The emulator over a real vCPU: [`CpuState`] through KVM's ioctls (each part
//! fetched on first use and written back only if changed), guest memory through the
//! memslot mirror, exception injection through KVM_SET_VCPU_EVENTS.

use std::collections::HashMap;
use std::time::Instant;

use iced_x86::Mnemonic;
use kvm_ioctls::VcpuFd;

use super::mem::{host, GuestPhysMem, NotRam, PAGE};
use super::state::*;
use super::{emulate, EmulationStats, Outcome};
use crate::memory::{MemSnapshot, SlotRegistry};

mod cpu;
pub use cpu::KvmCpu;

/// Guest RAM as the memslot mirror has it: only RAM slots are accessed; writes to
/// read-only slots and anything outside every slot (MMIO, holes) are refused.
pub struct SlotMem<'a> {
    pub snap: &'a MemSnapshot,
}

impl SlotMem<'_> {
    fn host(&self, gpa: u64, len: u64, write: bool) -> Result<u64, NotRam> {
        let refuse = NotRam { gpa, write };
        let s = self.snap.lookup(gpa).ok_or(refuse)?;
        let end = gpa.checked_add(len).ok_or(refuse)?;
        if end > s.gpa + s.size || (write && s.flags.readonly()) {
            return Err(refuse);
        }
        Ok(s.host_addr_of(gpa))
    }
}

impl GuestPhysMem for SlotMem<'_> {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), NotRam> {
        debug_assert!((gpa & (PAGE - 1)) + buf.len() as u64 <= PAGE);
        let h = self.host(gpa, buf.len() as u64, false)?;
        // SAFETY: the slot maps [h, h + len) for as long as the snapshot lives.
        unsafe { host::read(h, buf) };
        Ok(())
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), NotRam> {
        debug_assert!((gpa & (PAGE - 1)) + data.len() as u64 <= PAGE);
        let h = self.host(gpa, data.len() as u64, true)?;
        // SAFETY: as above, and the slot is writable RAM.
        unsafe { host::write(h, data) };
        Ok(())
    }

    fn cmpxchg64(&self, gpa: u64, old: u64, new: u64) -> Result<u64, NotRam> {
        let h = self.host(gpa, 8, true)?;
        if h & 7 != 0 {
            return Err(NotRam { gpa, write: true });
        }
        // SAFETY: mapped, writable, 8-aligned (slots are page-aligned on the host).
        Ok(unsafe { host::cmpxchg64(h, old, new) })
    }

    fn cmpxchg128(&self, gpa: u64, old: u128, new: u128) -> Result<u128, NotRam> {
        let h = self.host(gpa, 16, true)?;
        if h & 15 != 0 || !host::has_cmpxchg16b() {
            return Err(NotRam { gpa, write: true });
        }
        // SAFETY: mapped, writable, 16-aligned, and the host has CMPXCHG16B.
        Ok(unsafe { host::cmpxchg128(h, old, new) })
    }
}

/// Where the guest's CPUID comes from. On a PVM host the guest's CPUID is answered
/// by the outer hypervisor, so it sees the host's bits: ask the host. Elsewhere the
/// guest sees what wbvmm set (KVM_GET_CPUID2). Answers are cached per vCPU.
pub struct CpuidSource {
    table: Option<Vec<kvm_bindings::kvm_cpuid_entry2>>,
    cache: HashMap<(u32, u32), Cpuid>,
}

impl CpuidSource {
    pub fn for_vcpu(vcpu: &VcpuFd, host_answers: bool) -> Self {
        let table = if host_answers {
            None
        } else {
            vcpu.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .ok()
                .map(|c| c.as_slice().to_vec())
        };
        CpuidSource {
            table,
            cache: HashMap::new(),
        }
    }

    pub fn get(&mut self, leaf: u32, sub: u32) -> Cpuid {
        if let Some(c) = self.cache.get(&(leaf, sub)) {
            return *c;
        }
        let c = match &self.table {
            Some(t) => t
                .iter()
                .find(|e| {
                    e.function == leaf
                        && (e.index == sub
                            || e.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0)
                })
                .map(|e| Cpuid {
                    eax: e.eax,
                    ebx: e.ebx,
                    ecx: e.ecx,
                    edx: e.edx,
                })
                .unwrap_or_default(),
            None => {
                let r = core::arch::x86_64::__cpuid_count(leaf, sub);
                Cpuid {
                    eax: r.eax,
                    ebx: r.ebx,
                    ecx: r.ecx,
                    edx: r.edx,
                }
            }
        };
        self.cache.insert((leaf, sub), c);
        c
    }
}

/// The host's RDSEED/RDRAND where it has them, else getrandom(2).
pub fn host_random(seed: bool) -> Option<u64> {
    #[target_feature(enable = "rdrand")]
    unsafe fn rdrand() -> Option<u64> {
        let mut v = 0u64;
        (core::arch::x86_64::_rdrand64_step(&mut v) == 1).then_some(v)
    }
    #[target_feature(enable = "rdseed")]
    unsafe fn rdseed() -> Option<u64> {
        let mut v = 0u64;
        (core::arch::x86_64::_rdseed64_step(&mut v) == 1).then_some(v)
    }
    if seed && std::arch::is_x86_feature_detected!("rdseed") {
        // SAFETY: the host has RDSEED.
        return unsafe { rdseed() };
    }
    if !seed && std::arch::is_x86_feature_detected!("rdrand") {
        // SAFETY: the host has RDRAND.
        return unsafe { rdrand() };
    }
    let mut v = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into `v`.
    let n = unsafe { libc::getrandom(v.as_mut_ptr().cast(), 8, 0) };
    (n == 8).then(|| u64::from_le_bytes(v))
}

/// The fallback for one vCPU thread: its CPUID source, kept across exits.
pub struct VcpuEmulator {
    cpuid: CpuidSource,
}

impl VcpuEmulator {
    pub fn new(vcpu: &VcpuFd) -> Self {
        VcpuEmulator {
            cpuid: CpuidSource::for_vcpu(vcpu, crate::cpuid::pvm_host()),
        }
    }

    /// Emulate the instruction KVM failed on (`insn`: the bytes KVM fetched) and
    /// leave the vCPU ready to resume, counting it in `stats`. Ok: the mnemonic and
    /// the vector delivered to the guest, if any. Err: the VM cannot go on; the
    /// text says which instruction and why.
    pub fn handle(
        &mut self,
        vcpu: &VcpuFd,
        memory: &SlotRegistry,
        insn: &[u8],
        stats: &mut EmulationStats,
    ) -> Result<(Mnemonic, Option<u8>), String> {
        let t0 = Instant::now();
        let snap = memory.load();
        let mem = SlotMem { snap: &snap };
        let mut cpu = KvmCpu::new(vcpu, &mut self.cpuid);
        let outcome = emulate(&mut cpu, &mem, insn);
        if let Some(e) = cpu.error.take() {
            return Err(e);
        }
        let done = match outcome {
            Outcome::Emulated { mnemonic } => {
                cpu.commit()?;
                (mnemonic, None)
            }
            Outcome::Exception {
                mnemonic,
                exception,
            } => {
                cpu.commit()?;
                cpu.inject(&exception)?;
                (mnemonic, Some(exception.vector))
            }
            Outcome::Interrupt { mnemonic, vector } => {
                cpu.commit()?;
                cpu.inject_interrupt(vector)?;
                (mnemonic, Some(vector))
            }
            Outcome::Unsupported { text } => return Err(text),
        };
        stats.record(done.0, t0.elapsed().as_nanos() as u64);
        Ok(done)
    }
}

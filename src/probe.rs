//! `wbvmm probe`: does guest kernel mode run natively on this host?
//!
//! Tiny guests, written here as machine code, run a counted loop at CPL0 and at
//! CPL3 and a loop of MMIO reads that each exit to wbvmm. On bare-metal KVM both
//! loops run at the same speed; on a nested paravirtual KVM (PVM) CPL0 goes through
//! KVM's instruction emulator and is about 1000x slower.

use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::boot::regs::{gdt_entry, segment_from_gdt};
use crate::kvm::{ioctl_err, open_kvm};
use crate::vmm::VmmError;

const MEM_SIZE: usize = 4 << 20;
const CODE: u64 = 0x10_0000;
const GDT: u64 = 0x1000;
const PML4: u64 = 0x2000;
const PDPT: u64 = 0x3000;
const PD: u64 = 0x4000;
const STACK_TOP: u64 = 0x20_0000;
/// An address outside every memslot: each access is an MMIO exit.
const MMIO_ADDR: u32 = 0x3000_0000; // inside the identity-mapped GiB, outside the 4 MiB of RAM
const DONE_PORT: u16 = 0xf4;

#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    /// Loop iterations per second at CPL0 (guest kernel mode).
    pub cpl0_loops_per_sec: f64,
    /// Loop iterations per second at CPL3 (guest user mode).
    pub cpl3_loops_per_sec: f64,
    /// One MMIO exit to wbvmm and back, from CPL0, in microseconds.
    pub mmio_exit_cpl0_us: f64,
    /// The same from CPL3.
    pub mmio_exit_cpl3_us: f64,
    /// cpl3 / cpl0 loop speed.
    pub slowdown: f64,
    /// Guest kernel mode runs at native speed (within 4x of user mode).
    pub kernel_mode_native: bool,
    /// The host's KVM is the nested paravirtual kind (kvm_pvm loaded).
    pub pvm_host: bool,
}

/// `mov ecx, n; 1: dec ecx; jnz 1b; out 0xf4, al; jmp $-2`
fn loop_code(n: u32) -> Vec<u8> {
    let mut c = vec![0xb9];
    c.extend_from_slice(&n.to_le_bytes());
    c.extend_from_slice(&[0xff, 0xc9, 0x75, 0xfc, 0xe6, DONE_PORT as u8, 0xeb, 0xfc]);
    c
}

/// `mov ecx, n; mov ebx, MMIO; 1: mov eax, [rbx]; dec ecx; jnz 1b; out 0xf4, al`
fn mmio_code(n: u32) -> Vec<u8> {
    let mut c = vec![0xb9];
    c.extend_from_slice(&n.to_le_bytes());
    c.push(0xbb);
    c.extend_from_slice(&MMIO_ADDR.to_le_bytes());
    c.extend_from_slice(&[
        0x8b,
        0x03,
        0xff,
        0xc9,
        0x75,
        0xfa,
        0xe6,
        DONE_PORT as u8,
        0xeb,
        0xfc,
    ]);
    c
}

struct ProbeVm {
    _vm: VmFd,
    vcpu: VcpuFd,
    mem: GuestMemoryMmap,
}

impl ProbeVm {
    fn new(kvm: &Kvm, cpl: u8) -> Result<Self, VmmError> {
        let kerr = ioctl_err;
        let vm = kvm.create_vm().map_err(kerr("create a probe VM"))?;
        vm.set_tss_address(crate::layout::KVM_TSS_START as usize)
            .map_err(kerr("set the TSS address"))?;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .map_err(VmmError::ProbeMemory)?;
        let host = mem
            .get_host_address(GuestAddress(0))
            .map_err(VmmError::ProbeHostAddress)?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: `mem` outlives the VM (both live in ProbeVm; the VM fd drops first).
        unsafe { vm.set_user_memory_region(region) }.map_err(kerr("register probe memory"))?;
        let vcpu = vm.create_vcpu(0).map_err(kerr("create a probe vCPU"))?;
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kerr("report its CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kerr("set CPUID"))?;

        // Long mode, identity map of the first 1 GiB, user-accessible, so the same
        // code runs at either privilege level.
        let w = |v: u64, a: u64| {
            mem.write_obj(v, GuestAddress(a))
                .map_err(crate::boot::BootError::from)
        };
        w(PDPT | 0x7, PML4)?;
        w(PD | 0x7, PDPT)?;
        for i in 0..512u64 {
            w((i << 21) | 0x87, PD + 8 * i)?;
        }
        let gdt = [
            0,
            gdt_entry(0xa09b, 0, 0xfffff), // kernel code
            gdt_entry(0xc093, 0, 0xfffff), // kernel data
            gdt_entry(0xa0fb, 0, 0xfffff), // user code (DPL 3)
            gdt_entry(0xc0f3, 0, 0xfffff), // user data (DPL 3)
        ];
        for (i, e) in gdt.iter().enumerate() {
            w(*e, GDT + 8 * i as u64)?;
        }
        let mut sregs = vcpu.get_sregs().map_err(kerr("read sregs"))?;
        let (ci, di) = if cpl == 3 { (3, 4) } else { (1, 2) };
        let mut cs = segment_from_gdt(gdt[ci], ci as u8);
        let mut ds = segment_from_gdt(gdt[di], di as u8);
        cs.selector |= u16::from(cpl);
        ds.selector |= u16::from(cpl);
        sregs.cs = cs;
        sregs.ds = ds;
        sregs.es = ds;
        sregs.fs = ds;
        sregs.gs = ds;
        sregs.ss = ds;
        sregs.gdt.base = GDT;
        sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
        sregs.cr3 = PML4;
        sregs.cr4 |= 0x20; // PAE
        sregs.cr0 |= 0x8000_0001; // PG | PE
        sregs.efer |= 0x500; // LME | LMA
        vcpu.set_sregs(&sregs).map_err(kerr("set sregs"))?;
        Ok(Self { _vm: vm, vcpu, mem })
    }

    /// Run `code` from the start; time until it reaches the done port.
    fn time(&mut self, code: &[u8], timeout: Duration) -> Result<Duration, VmmError> {
        self.mem
            .write_slice(code, GuestAddress(CODE))
            .map_err(crate::boot::BootError::from)?;
        let mut regs = self.vcpu.get_regs().map_err(ioctl_err("read regs"))?;
        regs.rip = CODE;
        regs.rsp = STACK_TOP;
        // IOPL 3 so the CPL3 variant may use `out`.
        regs.rflags = 0x3002;
        self.vcpu.set_regs(&regs).map_err(ioctl_err("set regs"))?;
        let start = Instant::now();
        loop {
            match self.vcpu.run() {
                Ok(VcpuExit::IoOut(DONE_PORT, _)) => return Ok(start.elapsed()),
                Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xff),
                Ok(VcpuExit::Intr) => {}
                Ok(other) => {
                    return Err(VmmError::Probe(format!(
                        "probe guest stopped unexpectedly: {other:?}"
                    )))
                }
                Err(e) if e.errno() == libc::EINTR => {}
                Err(source) => return Err(ioctl_err("run the probe guest")(source).into()),
            }
            if start.elapsed() > timeout {
                return Err(VmmError::Probe("probe guest did not finish in time".into()));
            }
        }
    }

    /// Iterations per second of `make(n)`, with n grown until a run takes >= 20 ms;
    /// the fixed cost of entering and leaving is removed by timing n and 2n.
    fn rate(&mut self, make: fn(u32) -> Vec<u8>, start_n: u32) -> Result<f64, VmmError> {
        let mut n = start_n;
        loop {
            let t = self.time(&make(n), Duration::from_secs(20))?;
            if t >= Duration::from_millis(20) || n >= 1 << 30 {
                let t2 = self.time(&make(n * 2), Duration::from_secs(40))?;
                let per = t2
                    .saturating_sub(t)
                    .as_secs_f64()
                    .max(t.as_secs_f64() / 2.0);
                return Ok(f64::from(n) / per);
            }
            n = n.saturating_mul(if t < Duration::from_micros(200) {
                16
            } else {
                4
            });
        }
    }
}

pub fn run() -> Result<ProbeReport, VmmError> {
    let kvm = open_kvm()?;
    let mut k = ProbeVm::new(&kvm, 0)?;
    let mut u = ProbeVm::new(&kvm, 3)?;
    let cpl0 = k.rate(loop_code, 1000)?;
    let cpl3 = u.rate(loop_code, 100_000)?;
    let mmio0 = 1e6 / k.rate(mmio_code, 100)?;
    let mmio3 = 1e6 / u.rate(mmio_code, 100)?;
    let slowdown = cpl3 / cpl0;
    Ok(ProbeReport {
        cpl0_loops_per_sec: cpl0,
        cpl3_loops_per_sec: cpl3,
        mmio_exit_cpl0_us: mmio0,
        mmio_exit_cpl3_us: mmio3,
        slowdown,
        kernel_mode_native: slowdown < 4.0,
        pvm_host: std::path::Path::new("/sys/module/kvm_pvm").exists(),
    })
}

impl ProbeReport {
    pub fn human(&self) -> String {
        let mut s = String::new();
        s += &format!(
            "guest CPL0 (kernel mode) loop: {:>10.1} M iterations/s\n",
            self.cpl0_loops_per_sec / 1e6
        );
        s += &format!(
            "guest CPL3 (user mode) loop:   {:>10.1} M iterations/s\n",
            self.cpl3_loops_per_sec / 1e6
        );
        s += &format!(
            "MMIO exit round trip from CPL0: {:>8.2} us\n",
            self.mmio_exit_cpl0_us
        );
        s += &format!(
            "MMIO exit round trip from CPL3: {:>8.2} us\n",
            self.mmio_exit_cpl3_us
        );
        s += &format!(
            "kernel mode is {:.0}x slower than user mode\n",
            self.slowdown
        );
        if self.pvm_host {
            s += "host KVM: kvm_pvm (nested, paravirtual)\n";
        }
        if self.kernel_mode_native {
            s += "verdict: guest kernel mode runs natively; Linux guests boot at full speed on this host\n";
        } else {
            s += "verdict: guest kernel mode is EMULATED on this host: Linux runs here only slowly (the small guest \
                   of guest-images/linux-small reaches /init in about half a minute, a stock kernel in about an hour, \
                   netperf at tens of transactions per second; QEMU TCG is faster for Linux on such a host). \
                   Guests that work in user mode (the wbvmm testguest) run at native speed.\n";
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_code_branches_back_to_the_decrement() {
        let c = loop_code(5);
        // jnz rel8 at offset 7 targets offset 5 (dec ecx).
        assert_eq!(&c[5..9], &[0xff, 0xc9, 0x75, 0xfc]);
        assert_eq!(9 + (c[8] as i8) as isize, 5);
        let m = mmio_code(5);
        // jnz at offset 14 (rel -6) targets offset 10 (mov eax, [rbx]).
        assert_eq!(&m[10..12], &[0x8b, 0x03]);
        assert_eq!(16 + (m[15] as i8) as isize, 10);
    }
}

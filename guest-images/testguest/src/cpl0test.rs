//! `cpl0-insns` and `syscall-probe`: instructions that only matter at CPL0,
//! where nested PVM hosts run everything through KVM's instruction emulator
//! (and wbvmm's fallback for what it lacks).
//!
//! The CPL0 parts run through `entry::cpl0_run` (on the kernel stack, not in
//! an exception handler, so a #UD there can be taken and resumed). They do as
//! little as possible (every CPL0 instruction is emulated there) and leave
//! their results in statics; the printing and the comparisons happen at CPL3.

use crate::cpu::Frame;
use crate::{entry, io, println, Global};
use core::arch::asm;
use core::ptr::{addr_of, addr_of_mut};

#[repr(C, align(64))]
struct Area<const N: usize>([u8; N]);

/// What the CPL0 half of `cpl0-insns` found.
#[repr(C)]
struct Results {
    popcnt_f0f0: u64,
    popcnt_f0f0_zf: u64,
    popcnt_0: u64,
    popcnt_0_zf: u64,
    popcnt_mem: u64,
    fwait: u64,
    fences: u64,
    mxcsr: u64,
    /// fxsave64 before and after an fxrstor64 of a changed image.
    fx1: Area<512>,
    fx2: Area<512>,
    xsave: u64,
    xcr0: u64,
    xs1: Area<4096>,
    xs2: Area<4096>,
    xsavec: u64,
    xs3: Area<4096>,
    cx16: Cx16,
    cx16_zf1: u64,
    cx16_after1: [u64; 2],
    cx16_zf2: u64,
    cx16_rdx_rax2: [u64; 2],
    rdrand: u64,
    rdrand_cf: u64,
    rdseed: u64,
    rdseed_cf: u64,
    tsc_aux_write_fault: u64,
    rdtscp: u64,
    rdtscp_aux: u64,
    rdtscp_monotonic: u64,
    rdpid: u64,
    rdpid_val: u64,
    rdpid_fault: u64,
    smap: u64,
    ac_after_stac: u64,
    ac_after_clac: u64,
    gs_after_swap: u64,
    kgs_after_swap: u64,
    verw_data: u64,
    verw_code: u64,
    ud2: u64,
    /// (vector, error code, CR2) of the faults injected on purpose.
    ldmxcsr_fault: [u64; 3],
    popcnt_fault: [u64; 3],
    int3: u64,
    int80: u64,
}

#[repr(C, align(16))]
struct Cx16([u64; 2]);

static R: Global<Results> = Global::new(Results {
    popcnt_f0f0: 0,
    popcnt_f0f0_zf: 0,
    popcnt_0: 0,
    popcnt_0_zf: 0,
    popcnt_mem: 0,
    fwait: 0,
    fences: 0,
    mxcsr: 0,
    fx1: Area([0; 512]),
    fx2: Area([0; 512]),
    xsave: 0,
    xcr0: 0,
    xs1: Area([0; 4096]),
    xs2: Area([0; 4096]),
    xsavec: 0,
    xs3: Area([0; 4096]),
    cx16: Cx16([0; 2]),
    cx16_zf1: 0,
    cx16_after1: [0; 2],
    cx16_zf2: 0,
    cx16_rdx_rax2: [0; 2],
    rdrand: 0,
    rdrand_cf: 0,
    rdseed: 0,
    rdseed_cf: 0,
    tsc_aux_write_fault: 0,
    rdtscp: 0,
    rdtscp_aux: 0,
    rdtscp_monotonic: 0,
    rdpid: 0,
    rdpid_val: 0,
    rdpid_fault: 0,
    smap: 0,
    ac_after_stac: 0,
    ac_after_clac: 0,
    gs_after_swap: 0,
    kgs_after_swap: 0,
    verw_data: 0,
    verw_code: 0,
    ud2: 0,
    ldmxcsr_fault: [0; 3],
    popcnt_fault: [0; 3],
    int3: 0,
    int80: 0,
});

static POPCNT_SRC: u64 = 0xff_00ff_00ff;
static KERNEL_DS_SEL: u16 = entry::KERNEL_DS;

/// The address of the `ud2` in `cpl0_insns_work` (the #UD handler resumes
/// past it); stored by that code just before it runs it.
static UD2_RIP: Global<u64> = Global::new(u64::MAX);
/// An instruction that may fault: its address and length, and the vector it
/// raised (0: none); the handler resumes past it.
static GUARD_RIP: Global<u64> = Global::new(u64::MAX);
static GUARD_FAULT: Global<u64> = Global::new(0);
static GUARD_LEN: Global<u64> = Global::new(0);
static GUARD_ERR: Global<u64> = Global::new(0);
static GUARD_CR2: Global<u64> = Global::new(0);
/// Not mapped by the guest (PML4 entry 2 is empty).
const UNMAPPED: u64 = 1 << 40;

fn bit(leaf: u32, sub: u32, reg: u8, b: u32) -> bool {
    let c = io::cpuid(leaf, sub);
    let max = io::cpuid(leaf & 0x8000_0000, 0).eax;
    if leaf > max {
        return false;
    }
    let v = match reg {
        0 => c.eax,
        1 => c.ebx,
        2 => c.ecx,
        _ => c.edx,
    };
    v >> b & 1 != 0
}

unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
    (u64::from(hi) << 32) | u64::from(lo)
}

unsafe fn wrmsr(msr: u32, v: u64) {
    asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nomem, nostack, preserves_flags));
}

fn rflags() -> u64 {
    let f: u64;
    unsafe { asm!("pushfq", "pop {}", out(reg) f, options(nomem, preserves_flags)) };
    f
}

/// The CPU features, read at CPL3 before going to CPL0 (cpuid is cheap at CPL3).
#[derive(Clone, Copy)]
struct Features {
    xsave: bool,
    xsavec: bool,
    xcr0: u64,
    rdrand: bool,
    rdseed: bool,
    rdtscp: bool,
    rdpid: bool,
    smap: bool,
}

static FEATURES: Global<Features> = Global::new(Features {
    xsave: false,
    xsavec: false,
    xcr0: 0,
    rdrand: false,
    rdseed: false,
    rdtscp: false,
    rdpid: false,
    smap: false,
});

macro_rules! xmm_clobbers {
    ($($body:tt)*) => {
        asm!($($body)*,
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
            out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
            out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
            out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
            options(nostack))
    };
}

/// Runs at CPL0 (cpl0_run). No loops over buffers: each instruction here is
/// emulated on PVM hosts.
extern "C" fn cpl0_insns_work(_arg: u64) -> u64 {
    unsafe {
        let r = &mut *R.get();
        let f = *FEATURES.get();

        // popcnt: register source, zero source, memory source.
        let (v, zf): (u64, u8);
        asm!("popcnt {v}, {s}", "setz {z}", v = out(reg) v, s = in(reg) 0xf0f0u64, z = out(reg_byte) zf, options(nomem, nostack));
        r.popcnt_f0f0 = v;
        r.popcnt_f0f0_zf = zf as u64;
        let (v, zf): (u64, u8);
        asm!("popcnt {v}, {s}", "setz {z}", v = out(reg) v, s = in(reg) 0u64, z = out(reg_byte) zf, options(nomem, nostack));
        r.popcnt_0 = v;
        r.popcnt_0_zf = zf as u64;
        let v: u64;
        asm!("popcnt {v}, qword ptr [{p}]", v = out(reg) v, p = in(reg) addr_of!(POPCNT_SRC), options(readonly, nostack));
        r.popcnt_mem = v;

        asm!("fwait", options(nomem, nostack));
        r.fwait = 1;
        asm!("lfence", "mfence", "sfence", options(nostack));
        r.fences = 1;

        // ldmxcsr / stmxcsr: round toward +inf (RC = 10b), then back.
        let m: u32 = 0x5f80;
        let mut back: u32 = 0;
        asm!("ldmxcsr [{i}]", "stmxcsr [{o}]", i = in(reg) &m, o = in(reg) &mut back, options(nostack));
        let init: u32 = 0x1f80;
        asm!("ldmxcsr [{}]", in(reg) &init, options(nostack));
        r.mxcsr = u64::from(back);

        // fxsave64, change XMM1 in the image, fxrstor64, fxsave64 again.
        let fx1 = r.fx1.0.as_mut_ptr();
        asm!("fxsave64 [{}]", in(reg) fx1, options(nostack));
        for i in 0..2 {
            core::ptr::write_volatile((fx1.add(176) as *mut u64).add(i), 0xa5a5_a5a5_5a5a_5a5a);
        }
        xmm_clobbers!("fxrstor64 [{a}]", "fxsave64 [{b}]", a = in(reg) fx1, b = in(reg) r.fx2.0.as_mut_ptr());

        if f.xsave {
            // CR4.OSXSAVE, XCR0 = what CPUID offers of x87|SSE|AVX.
            let cr4: u64;
            asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack));
            asm!("mov cr4, {}", in(reg) cr4 | 1 << 18, options(nomem, nostack));
            asm!("xsetbv", in("ecx") 0, in("eax") f.xcr0 as u32, in("edx") 0, options(nomem, nostack));
            let (lo, hi): (u32, u32);
            asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi, options(nomem, nostack));
            r.xcr0 = (u64::from(hi) << 32) | u64::from(lo);
            let xs1 = r.xs1.0.as_mut_ptr();
            asm!("xsave64 [{}]", in(reg) xs1, in("eax") u32::MAX, in("edx") u32::MAX, options(nostack));
            for i in 0..2 {
                core::ptr::write_volatile((xs1.add(176) as *mut u64).add(i), 0x3c3c_3c3c_c3c3_c3c3);
            }
            let bv = core::ptr::read_volatile(xs1.add(512) as *const u64);
            core::ptr::write_volatile(xs1.add(512) as *mut u64, bv | 2);
            xmm_clobbers!("xrstor64 [{a}]", "xsave64 [{b}]", a = in(reg) xs1, b = in(reg) r.xs2.0.as_mut_ptr(), in("eax") u32::MAX, in("edx") u32::MAX);
            if f.xsavec {
                asm!("xsavec64 [{}]", in(reg) r.xs3.0.as_mut_ptr(), in("eax") u32::MAX, in("edx") u32::MAX, options(nostack));
                r.xsavec = 1;
            }
            asm!("mov cr4, {}", in(reg) cr4, options(nomem, nostack));
            r.xsave = 1;
        }

        // lock cmpxchg16b: a match, then a mismatch.
        r.cx16.0 = [1, 2];
        let p = r.cx16.0.as_mut_ptr();
        let (mut lo, mut hi, zf): (u64, u64, u8);
        lo = 1;
        hi = 2;
        asm!("xchg {nb}, rbx", "lock cmpxchg16b xmmword ptr [{p}]", "setz {z}", "xchg {nb}, rbx",
            p = in(reg) p, nb = inout(reg) 3u64 => _, z = out(reg_byte) zf,
            inout("rax") lo, inout("rdx") hi, in("rcx") 4u64, options(nostack));
        r.cx16_zf1 = zf as u64;
        r.cx16_after1 = r.cx16.0;
        let _ = (lo, hi);
        let (mut lo, mut hi, zf): (u64, u64, u8);
        lo = 0;
        hi = 0;
        asm!("xchg {nb}, rbx", "lock cmpxchg16b xmmword ptr [{p}]", "setz {z}", "xchg {nb}, rbx",
            p = in(reg) p, nb = inout(reg) 5u64 => _, z = out(reg_byte) zf,
            inout("rax") lo, inout("rdx") hi, in("rcx") 6u64, options(nostack));
        r.cx16_zf2 = zf as u64;
        r.cx16_rdx_rax2 = [hi, lo];

        if f.rdrand {
            let cf: u8;
            asm!("rdrand {v}", "setc {c}", v = out(reg) _, c = out(reg_byte) cf, options(nomem, nostack));
            r.rdrand = 1;
            r.rdrand_cf = cf as u64;
        }
        if f.rdseed {
            let cf: u8;
            asm!("rdseed {v}", "setc {c}", v = out(reg) _, c = out(reg_byte) cf, options(nomem, nostack));
            r.rdseed = 1;
            r.rdseed_cf = cf as u64;
        }
        if f.rdtscp || f.rdpid {
            // IA32_TSC_AUX = 0x2a; KVM refuses it (#GP) when its CPUID for the
            // vCPU lacks RDTSCP/RDPID, so the write is guarded.
            *GUARD_LEN.get() = 2;
            asm!("lea {t}, [rip + 2f]", "mov [{slot}], {t}", "2:", "wrmsr",
                t = out(reg) _, slot = in(reg) GUARD_RIP.get(),
                in("ecx") 0xc000_0103u32, in("eax") 0x2au32, in("edx") 0u32, options(nostack));
            r.tsc_aux_write_fault = *GUARD_FAULT.get();
        }
        if f.rdtscp {
            let t0 = io::rdtsc();
            let (lo, hi, aux): (u32, u32, u32);
            asm!("rdtscp", out("eax") lo, out("edx") hi, out("ecx") aux, options(nomem, nostack));
            let t1 = (u64::from(hi) << 32) | u64::from(lo);
            r.rdtscp = 1;
            r.rdtscp_aux = u64::from(aux);
            r.rdtscp_monotonic = (t1 >= t0) as u64;
        }
        if f.rdpid {
            // KVM's emulator answers rdpid with #UD when its CPUID for the
            // vCPU lacks RDPID (on PVM the guest sees the host's CPUID).
            let v: u64;
            *GUARD_FAULT.get() = 0;
            *GUARD_LEN.get() = 4;
            asm!("lea {t}, [rip + 2f]", "mov [{slot}], {t}", "xor eax, eax", "2:", "rdpid rax",
                t = out(reg) _, slot = in(reg) GUARD_RIP.get(), out("rax") v, options(nostack));
            r.rdpid = 1;
            r.rdpid_val = v;
            r.rdpid_fault = *GUARD_FAULT.get();
        }
        if f.smap {
            asm!("stac", options(nomem, nostack));
            r.ac_after_stac = rflags() >> 18 & 1;
            asm!("clac", options(nomem, nostack));
            r.ac_after_clac = rflags() >> 18 & 1;
            r.smap = 1;
        }

        // swapgs: GS.base <-> IA32_KERNEL_GS_BASE, then back.
        wrmsr(0xc000_0101, 0x1111_0000);
        wrmsr(0xc000_0102, 0x2222_0000);
        asm!("swapgs", options(nomem, nostack));
        r.gs_after_swap = rdmsr(0xc000_0101);
        r.kgs_after_swap = rdmsr(0xc000_0102);
        asm!("swapgs", options(nomem, nostack));
        wrmsr(0xc000_0101, 0);
        wrmsr(0xc000_0102, 0);

        // verw: the kernel's data selector in memory (as Linux's MDS
        // mitigation), and the code selector in a register.
        let zf: u8;
        asm!("verw word ptr [{p}]", "setz {z}", p = in(reg) addr_of!(KERNEL_DS_SEL), z = out(reg_byte) zf, options(readonly, nostack));
        r.verw_data = zf as u64;
        let zf: u8;
        asm!("verw {s:x}", "setz {z}", s = in(reg) entry::KERNEL_CS as u32, z = out(reg_byte) zf, options(nomem, nostack));
        r.verw_code = zf as u64;

        // Faults where hardware raises them: ldmxcsr with reserved MXCSR bits
        // (#GP(0)), popcnt from an unmapped address (#PF, error 0, CR2).
        let bad: u32 = 0xffff_0000;
        *GUARD_FAULT.get() = 0;
        *GUARD_LEN.get() = 3;
        asm!("lea {t}, [rip + 2f]", "mov [{slot}], {t}", "2:", "ldmxcsr [rdx]",
            t = out(reg) _, slot = in(reg) GUARD_RIP.get(), in("rdx") &bad, options(nostack));
        r.ldmxcsr_fault = [*GUARD_FAULT.get(), *GUARD_ERR.get(), 0];
        *GUARD_FAULT.get() = 0;
        *GUARD_LEN.get() = 5;
        asm!("lea {t}, [rip + 2f]", "mov [{slot}], {t}", "2:", "popcnt rax, qword ptr [rdx]",
            t = out(reg) _, slot = in(reg) GUARD_RIP.get(), in("rdx") UNMAPPED, out("rax") _, options(nostack));
        r.popcnt_fault = [*GUARD_FAULT.get(), *GUARD_ERR.get(), *GUARD_CR2.get()];
        *GUARD_RIP.get() = u64::MAX;

        // int3 at CPL0: #BP (a trap) to the handler, which returns past it.
        asm!("int3", options(nostack));
        r.int3 = 1;
        // int 0x80 at CPL0 through its DPL 3 gate: the handler adds 1 to RAX.
        let mut v: u64 = 0x41;
        asm!("int 0x80", inout("rax") v, options(nostack));
        r.int80 = v;

        // ud2: the #UD handler sees this RIP, counts, resumes past it.
        asm!("lea {t}, [rip + 2f]", "mov [{slot}], {t}", "2:", "ud2",
            t = out(reg) _, slot = in(reg) UD2_RIP.get(), options(nostack));
    }
    0
}

/// Exception-handler hook (CPL0): the expected #UD of `cpl0-insns`, and the
/// #PF of a `syscall` that reached LSTAR at CPL3. True if handled.
pub fn exception(frame: &mut Frame) -> bool {
    if frame.vector == 6 && frame.rip == unsafe { *UD2_RIP.get() } {
        unsafe { (*R.get()).ud2 += 1 };
        frame.rip += 2;
        return true;
    }
    if frame.rip == unsafe { *GUARD_RIP.get() } {
        let cr2: u64;
        unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
        unsafe {
            *GUARD_FAULT.get() = frame.vector;
            *GUARD_ERR.get() = frame.error;
            *GUARD_CR2.get() = cr2;
            frame.rip += *GUARD_LEN.get();
        }
        return true;
    }
    if frame.vector == 14 && frame.rip == lstar() {
        let cr2: u64;
        unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
        println!(
            "syscall-probe: #PF at rip=0x{:x} cs=0x{:x} error=0x{:x} cr2=0x{:x} rcx=0x{:x} r11=0x{:x} rflags=0x{:x}",
            frame.rip, frame.cs, frame.error, cr2, frame.rcx, frame.r11, frame.rflags
        );
        // Finish the system call by hand: back to the instruction after it.
        frame.rip = frame.rcx;
        frame.rflags = frame.r11;
        unsafe { *PF_SEEN.get() = true };
        return true;
    }
    false
}

pub fn cpl0_insns() {
    unsafe {
        let xsave = bit(1, 0, 2, 26);
        *FEATURES.get() = Features {
            xsave,
            xsavec: xsave && bit(0xd, 1, 0, 1),
            xcr0: if xsave {
                u64::from(io::cpuid(0xd, 0).eax) & 7
            } else {
                0
            },
            rdrand: bit(1, 0, 2, 30),
            rdseed: bit(7, 0, 1, 18),
            rdtscp: bit(0x8000_0001, 0, 3, 27),
            rdpid: bit(7, 0, 2, 22),
            smap: bit(7, 0, 1, 20),
        };
        entry::cpl0_run(cpl0_insns_work, 0);
    }
    let r = unsafe { &*R.get() };
    println!(
        "cpl0: popcnt(0xf0f0)={} zf={}",
        r.popcnt_f0f0, r.popcnt_f0f0_zf
    );
    println!("cpl0: popcnt(0x0)={} zf={}", r.popcnt_0, r.popcnt_0_zf);
    println!("cpl0: popcnt([0xff00ff00ff])={}", r.popcnt_mem);
    println!("cpl0: fwait ok={}", r.fwait);
    println!("cpl0: lfence mfence sfence ok={}", r.fences);
    println!("cpl0: ldmxcsr(0x5f80) stmxcsr=0x{:x}", r.mxcsr);
    let (a, b) = (&r.fx1.0, &r.fx2.0);
    let fcw = u16::from_le_bytes([a[0], a[1]]);
    let mx = u32::from_le_bytes([a[24], a[25], a[26], a[27]]);
    let xmm1 = u64::from_le_bytes(b[176..184].try_into().unwrap_or([0; 8]));
    println!(
        "cpl0: fxsave64 fcw=0x{:x} mxcsr=0x{:x} fxrstor64 xmm1=0x{:x} rest_same={}",
        fcw,
        mx,
        xmm1,
        a[..176] == b[..176] && a[192..416] == b[192..416]
    );
    if r.xsave == 1 {
        let (a, b) = (&r.xs1.0, &r.xs2.0);
        let bv2 = u64::from_le_bytes(b[512..520].try_into().unwrap_or([0; 8]));
        let xmm1 = u64::from_le_bytes(b[176..184].try_into().unwrap_or([0; 8]));
        let avx_same = a[576..832] == b[576..832];
        println!(
            "cpl0: xgetbv xcr0=0x{:x} xsave64 xstate_bv&xcr0=0x{:x} xrstor64 xmm1=0x{:x} avx_same={}",
            r.xcr0,
            bv2 & r.xcr0 & 3,
            xmm1,
            avx_same
        );
        if r.xsavec == 1 {
            let c = &r.xs3.0;
            let comp = u64::from_le_bytes(c[520..528].try_into().unwrap_or([0; 8]));
            println!("cpl0: xsavec64 xcomp_bv=0x{:x}", comp);
        } else {
            println!("cpl0: xsavec not in cpuid");
        }
    } else {
        println!("cpl0: xsave not in cpuid");
    }
    println!(
        "cpl0: cmpxchg16b match zf={} mem=0x{:x}:0x{:x} mismatch zf={} rdx:rax=0x{:x}:0x{:x}",
        r.cx16_zf1,
        r.cx16_after1[1],
        r.cx16_after1[0],
        r.cx16_zf2,
        r.cx16_rdx_rax2[0],
        r.cx16_rdx_rax2[1]
    );
    if r.rdrand == 1 {
        println!("cpl0: rdrand cf={}", r.rdrand_cf);
    } else {
        println!("cpl0: rdrand not in cpuid");
    }
    if r.rdseed == 1 {
        println!("cpl0: rdseed cf={}", r.rdseed_cf);
    } else {
        println!("cpl0: rdseed not in cpuid");
    }
    if r.rdtscp == 1 {
        println!(
            "cpl0: rdtscp aux=0x{:x} monotonic={} (wrmsr TSC_AUX=0x2a: {})",
            r.rdtscp_aux,
            r.rdtscp_monotonic,
            if r.tsc_aux_write_fault == 0 {
                "ok"
            } else {
                "#GP"
            }
        );
    } else {
        println!("cpl0: rdtscp not in cpuid");
    }
    if r.rdpid == 1 {
        if r.rdpid_fault == 0 {
            println!("cpl0: rdpid=0x{:x}", r.rdpid_val);
        } else {
            println!("cpl0: rdpid raised vector {}", r.rdpid_fault);
        }
    } else {
        println!("cpl0: rdpid not in cpuid");
    }
    if r.smap == 1 {
        println!(
            "cpl0: stac ac={} clac ac={}",
            r.ac_after_stac, r.ac_after_clac
        );
    } else {
        println!("cpl0: smap not in cpuid");
    }
    println!(
        "cpl0: swapgs gs_base=0x{:x} kernel_gs_base=0x{:x}",
        r.gs_after_swap, r.kgs_after_swap
    );
    println!(
        "cpl0: verw(0x{:x}) zf={} verw(0x{:x}) zf={}",
        entry::KERNEL_DS,
        r.verw_data,
        entry::KERNEL_CS,
        r.verw_code
    );
    println!("cpl0: ud2 -> #UD handled={}", r.ud2);
    println!(
        "cpl0: ldmxcsr(0xffff0000) -> vector={} error=0x{:x}",
        r.ldmxcsr_fault[0], r.ldmxcsr_fault[1]
    );
    println!(
        "cpl0: popcnt([0x{:x}]) -> vector={} error=0x{:x} cr2=0x{:x}",
        UNMAPPED, r.popcnt_fault[0], r.popcnt_fault[1], r.popcnt_fault[2]
    );
    println!("cpl0: int3 -> #BP returned={}", r.int3);
    println!("cpl0: int 0x80 -> rax=0x{:x}", r.int80);
    println!("cpl0-insns: back at cpl={}", io::cpl());
}

// ---- syscall-probe ----

/// Where the alias of the first 2 MiB (the image) starts: PML4 entry 1,
/// supervisor-only.
const ALIAS: u64 = 512 << 30;

#[repr(C, align(4096))]
struct Table([u64; 512]);

static ALIAS_PDPT: Global<Table> = Global::new(Table([0; 512]));
static ALIAS_PD: Global<Table> = Global::new(Table([0; 512]));
static PF_SEEN: Global<bool> = Global::new(false);

fn lstar() -> u64 {
    ALIAS + addr_of!(entry::syscall_probe_entry) as u64
}

extern "C" fn syscall_setup(lstar: u64) -> u64 {
    unsafe {
        let efer = rdmsr(0xc000_0080);
        wrmsr(0xc000_0080, efer | 1); // SCE
                                      // STAR[47:32] = kernel CS (SS = +8); STAR[63:48] = 0x10: sysretq
                                      // loads CS = 0x20|3 (user code), SS = 0x18|3 (user data).
        wrmsr(
            0xc000_0081,
            (0x10u64 << 48) | (u64::from(entry::KERNEL_CS) << 32),
        );
        wrmsr(0xc000_0082, lstar);
        // SFMASK as Linux: TF, IF, DF, IOPL, NT, AC.
        wrmsr(0xc000_0084, 0x4_7700);
        // Back to CPL3 the way a kernel returns from a system call: sysretq
        // (cpl0_run_entry, after this returns) instead of iretq.
        *addr_of_mut!(entry::cpl0_run_sysret) = 1;
    }
    0x5e7
}

pub fn syscall_probe() {
    unsafe {
        // The alias: PML4[1] -> PDPT[0] -> PD[0] = 2 MiB page at 0, present,
        // writable, supervisor-only. Page tables are user-writable memory
        // here (see paging.rs), so CPL3 may add entries.
        let pd = &mut (*ALIAS_PD.get()).0;
        pd[0] = 0x83;
        let pdpt = &mut (*ALIAS_PDPT.get()).0;
        pdpt[0] = pd.as_ptr() as u64 | 0x3;
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
        let pml4 = addr_of_mut!(entry::pml4) as *mut u64;
        core::ptr::write_volatile(pml4.add(1), pdpt.as_ptr() as u64 | 0x3);
        let v = entry::cpl0_run(syscall_setup, lstar());
        let (cs, ss): (u16, u16);
        asm!("mov {0:x}, cs", "mov {1:x}, ss", out(reg) cs, out(reg) ss, options(nomem, nostack, preserves_flags));
        println!(
            "syscall-probe: sysretq from cpl0 returned rax=0x{:x} cs=0x{:x} ss=0x{:x}",
            v, cs, ss
        );
    }
    println!(
        "syscall-probe: LSTAR=0x{:x} (supervisor-only alias), syscall from cpl={}",
        lstar(),
        io::cpl()
    );
    let (rcx, r11): (u64, u64);
    unsafe {
        asm!("syscall", inout("rax") 0x5ca11u64 => _, out("rcx") rcx, out("r11") r11, options(nostack));
    }
    let seen = unsafe { *addr_of!(entry::syscall_probe_seen) };
    if seen[0] == 1 {
        println!(
            "syscall-probe: landed cs=0x{:x} cpl={} rcx=0x{:x} r11=0x{:x} rflags=0x{:x}",
            seen[1],
            seen[1] & 3,
            seen[2],
            seen[3],
            seen[4]
        );
    } else if unsafe { !*PF_SEEN.get() } {
        println!("syscall-probe: neither landed nor faulted");
    }
    println!(
        "syscall-probe: returned to cpl={} rcx=0x{:x} r11=0x{:x}",
        io::cpl(),
        rcx,
        r11
    );
}

// ---- cpl0-unsupported ----

extern "C" fn crc32_work(_arg: u64) -> u64 {
    let mut v: u32 = 0;
    unsafe {
        asm!("crc32 {v:e}, {s:e}", v = inout(reg) v, s = in(reg) 0x1234_5678u32, options(nomem, nostack))
    };
    u64::from(v)
}

/// `cpl0-unsupported`: `crc32` at CPL0, which neither KVM's emulator nor
/// wbvmm's fallback implements: on a PVM host the VM ends with the decoded
/// instruction in wbvmm's failure line; where CPL0 is native it just runs.
pub fn cpl0_unsupported() {
    println!("cpl0-unsupported: crc32 at cpl0");
    let v = unsafe { entry::cpl0_run(crc32_work, 0) };
    println!("cpl0-unsupported: crc32 ran: 0x{:x}", v);
}

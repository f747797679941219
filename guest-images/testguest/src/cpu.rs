//! CPL0 setup (IDT, TSS) and the exception handler.
//!
//! `cpl0_main` is the only Rust code that runs at CPL0 in normal operation,
//! and CPL0 is emulated (~1000x slower), so it fills just the 32 gates it
//! needs and drops to CPL3. Exception handlers also run at CPL0 (on the IST1
//! stack); they print and end the VM, except #BP, which returns, and the #UD
//! of `cpl0_call`, which serves the request and returns.

use crate::entry;
use crate::io;
use crate::Global;
use core::arch::asm;
use core::ptr::addr_of;

/// Services CPL3 code can ask of CPL0 through `cpl0_call`.
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cpl0Request {
    /// Does nothing; returns 0. Shows the round trip works.
    Nop = 0,
    /// Loads an empty IDT and faults: the VM triple-faults (shuts down).
    TripleFault = 1,
}

/// Returned by `cpl0_call` for an unknown request.
pub const CPL0_UNKNOWN: u64 = u64::MAX;

/// Runs `req` at CPL0 (through a #UD at a known RIP, see `entry`).
pub fn cpl0_call(req: Cpl0Request) -> u64 {
    unsafe { entry::cpl0_call(req as u64) }
}

/// Exit status for an unexpected exception.
pub const EXCEPTION_EXIT: u32 = 0x7f;

#[repr(C, align(16))]
struct Idt([u64; 512]);

// `.bss.cpu` is outside the range `user_main` zeroes (see link.ld).
#[link_section = ".bss.cpu"]
static IDT: Global<Idt> = Global::new(Idt([0; 512]));

/// 64-bit TSS. Packed layout as the CPU reads it; 104 bytes.
#[repr(C, packed(4))]
struct Tss {
    _reserved0: u32,
    rsp: [u64; 3],
    _reserved1: u64,
    ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    iomap_base: u16,
}

/// Size of an I/O permission bitmap covering all 65536 ports, plus the
/// all-ones byte the architecture wants after it.
const IO_BITMAP_BYTES: usize = 65536 / 8 + 1;

/// The TSS followed by an all-zero ("every port allowed") I/O bitmap.
///
/// Why a bitmap when RFLAGS.IOPL is 3: on PVM hosts the guest's CPL3 runs
/// in hardware ring 3 with the *hardware* IOPL 0, and the hypervisor copies
/// the hardware RFLAGS back into the guest's on every exit, so the guest's
/// IOPL 3 is lost at the first exit. Port I/O then traps (#GP) into KVM's
/// instruction emulator, which, seeing IOPL < CPL, consults this bitmap.
/// With the bitmap, CPL3 port I/O works under either behaviour.
#[repr(C, align(16))]
struct TssWithIoBitmap {
    tss: Tss,
    io_bitmap: [u8; IO_BITMAP_BYTES],
}

// All zero, so it lives in .bss; the bitmap's final 0xff is stored at run
// time.
#[link_section = ".bss.cpu"]
static TSS: Global<TssWithIoBitmap> = Global::new(TssWithIoBitmap {
    tss: Tss {
        _reserved0: 0,
        rsp: [0; 3],
        _reserved1: 0,
        ist: [0; 7],
        _reserved2: 0,
        _reserved3: 0,
        iomap_base: 0,
    },
    io_bitmap: [0; IO_BITMAP_BYTES],
});

/// 64-bit interrupt gate (type 0xE: IF cleared on entry).
fn gate(handler: u64, dpl: u8, ist: u8) -> [u64; 2] {
    let low = (handler & 0xffff)
        | ((entry::KERNEL_CS as u64) << 16)
        | ((ist as u64 & 7) << 32)
        | ((0x8e | ((dpl as u64 & 3) << 5)) << 40)
        | (((handler >> 16) & 0xffff) << 48);
    [low, handler >> 32]
}

/// Installs a DPL 0 interrupt gate for `vector` on the kernel stack (TSS.RSP0:
/// interrupts arrive at CPL3 only, so that stack is free). At CPL0 only.
///
/// # Safety
/// `handler` must be an interrupt entry that ends in `iretq`.
pub unsafe fn set_interrupt_gate(vector: u8, handler: u64) {
    let idt = &mut (*IDT.get()).0;
    let g = gate(handler, 0, 0);
    idt[2 * vector as usize] = g[0];
    idt[2 * vector as usize + 1] = g[1];
}

#[repr(C, packed)]
struct DescriptorPtr {
    limit: u16,
    base: u64,
}

/// Called from `_start64` on the kernel stack, with `start_info` the PVH
/// start-info address from EBX.
#[no_mangle]
extern "C" fn cpl0_main(start_info: u64) -> ! {
    unsafe {
        let idt = &mut (*IDT.get()).0;
        for v in 0..32 {
            // #BP's gate is DPL 3 so `int3` from CPL3 reaches it (and
            // returns); all others are DPL 0 so software `int n` cannot
            // fake them.
            let dpl = if v == 3 { 3 } else { 0 };
            let g = gate(entry::isr_table[v], dpl, 1);
            idt[2 * v] = g[0];
            idt[2 * v + 1] = g[1];
        }

        // Vector 0x80, DPL 3: `int 0x80` from CPL3 (the `int80` word).
        let g = gate(addr_of!(entry::isr_int80) as u64, 3, 1);
        idt[2 * 0x80] = g[0];
        idt[2 * 0x80 + 1] = g[1];

        let t = TSS.get();
        (*t).tss.rsp[0] = addr_of!(entry::kstack_top) as u64;
        (*t).tss.ist[0] = addr_of!(entry::ist_stack_top) as u64;
        (*t).tss.iomap_base = core::mem::size_of::<Tss>() as u16;
        (*t).io_bitmap[IO_BITMAP_BYTES - 1] = 0xff;

        // Available 64-bit TSS descriptor (type 0x9, present); the limit
        // covers the I/O bitmap.
        let base = t as u64;
        let limit = core::mem::size_of::<TssWithIoBitmap>() as u64 - 1;
        let gdt_tss = &mut *core::ptr::addr_of_mut!(entry::gdt_tss);
        gdt_tss[0] = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89 << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        gdt_tss[1] = base >> 32;

        let idtr = DescriptorPtr {
            limit: (512 * 8 - 1) as u16,
            base: idt.as_ptr() as u64,
        };
        asm!("lidt [{}]", in(reg) &idtr, options(readonly, nostack, preserves_flags));
        asm!("ltr {0:x}", in(reg) entry::TSS_SEL, options(nomem, nostack, preserves_flags));

        // Mask both 8259 PICs (two exits). IF=0 at CPL3 is not reliable:
        // PVM runs guest CPL3 with the hardware IF set, and firmware (e.g.
        // SeaBIOS on `-machine pc`) leaves the PIT ticking into IRQ0 at
        // vector 8, which would look like a #DF. The IOAPIC and LAPIC timer
        // are masked/off from reset.
        io::outb(0x21, 0xff);
        io::outb(0xa1, 0xff);

        // Entry convention: RSP = top - 8, as right after a `call`.
        let user_rsp = addr_of!(entry::ustack_top) as u64 - 8;
        entry::enter_user(crate::user_main as *const () as u64, user_rsp, start_info)
    }
}

/// Saved state as laid out by `isr_common` and the CPU.
#[repr(C)]
pub struct Frame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

fn vector_name(v: u64) -> &'static str {
    match v {
        0 => "#DE",
        1 => "#DB",
        2 => "NMI",
        3 => "#BP",
        4 => "#OF",
        5 => "#BR",
        6 => "#UD",
        7 => "#NM",
        8 => "#DF",
        10 => "#TS",
        11 => "#NP",
        12 => "#SS",
        13 => "#GP",
        14 => "#PF",
        16 => "#MF",
        17 => "#AC",
        18 => "#MC",
        19 => "#XM",
        20 => "#VE",
        21 => "#CP",
        _ => "reserved",
    }
}

/// Runs at CPL0 on the IST1 stack. Serves `cpl0_call`s; otherwise prints
/// the vector, error code and RIP, and returns only for #BP; anything else
/// ends the VM with status 0x7f.
#[no_mangle]
extern "C" fn exception_handler(frame: &mut Frame) {
    let v = frame.vector;
    if v == 6 && frame.rip == addr_of!(entry::cpl0_call_ud2) as u64 {
        frame.rax = match frame.rax {
            r if r == Cpl0Request::Nop as u64 => 0,
            r if r == Cpl0Request::TripleFault as u64 => unsafe { entry::triple_fault_now() },
            _ => CPL0_UNKNOWN,
        };
        frame.rip += 2; // past the ud2
        return;
    }
    if v == 6 && frame.rip == addr_of!(entry::cpl0_run_ud2) as u64 {
        // cpl0_run: remember where CPL3 continues (past the ud2) and iret to
        // cpl0_run_entry at CPL0 on the kernel stack, RDI/RSI (f, arg) kept.
        unsafe {
            let r = &mut *core::ptr::addr_of_mut!(entry::cpl0_run_return);
            *r = [frame.rip + 2, frame.cs, frame.rflags, frame.rsp, frame.ss];
        }
        frame.rip = addr_of!(entry::cpl0_run_entry) as u64;
        frame.cs = entry::KERNEL_CS as u64;
        frame.ss = entry::KERNEL_DS as u64;
        frame.rsp = addr_of!(entry::kstack_top) as u64;
        frame.rflags = 0x2;
        return;
    }
    if crate::cpl0test::exception(frame) {
        return;
    }
    if v == 0x80 {
        // `int80`: answer RAX + 1, prove where it ran.
        crate::println!(
            "int80: vector=0x80 at cpl={} from cs=0x{:x} rax=0x{:x}",
            io::cpl(),
            frame.cs,
            frame.rax
        );
        frame.rax += 1;
        return;
    }
    if v == 3 {
        // RIP already points past the int3.
        crate::println!(
            "exception: vector=3 ({}) error=0x{:x} rip=0x{:x} cs=0x{:x}: resuming",
            vector_name(v),
            frame.error,
            frame.rip,
            frame.cs
        );
        return;
    }
    let cr2: u64;
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
    crate::println!(
        "exception: vector={} ({}) error=0x{:x} rip=0x{:x} cs=0x{:x} rsp=0x{:x} rflags=0x{:x} cr2=0x{:x}",
        v,
        vector_name(v),
        frame.error,
        frame.rip,
        frame.cs,
        frame.rsp,
        frame.rflags,
        cr2
    );
    io::exit(EXCEPTION_EXIT);
}

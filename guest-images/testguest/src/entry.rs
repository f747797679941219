//! Boot path: PVH note, 32-bit entry, static page tables and GDT, the switch
//! to long mode, exception stubs and the CPL0 -> CPL3 drop.
//!
//! Everything here runs at CPL0, which on the development machines (nested
//! PVM KVM) goes through KVM's instruction emulator at ~1/1000 native speed.
//! So the page tables and GDT are *static data* (no loops to build them), and
//! the path from `_start32` to `iretq` is a few dozen instructions plus the
//! short IDT/TSS fill in `cpu::cpl0_main`.
//!
//! Selector layout (see `gdt` below):
//!   0x08 kernel code (64-bit)   0x10 kernel data
//!   0x1b user data (DPL 3)      0x23 user code (64-bit, DPL 3)
//!   0x28 TSS (16-byte descriptor, filled by `cpu::cpl0_main`)

use core::arch::global_asm;

pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
pub const TSS_SEL: u16 = 0x28;

extern "C" {
    /// 16-byte TSS descriptor slot in the GDT.
    pub static mut gdt_tss: [u64; 2];
    /// Addresses of the 32 exception stubs.
    pub static isr_table: [u64; 32];
    /// The stub of vector 0x80 (a DPL 3 gate: the `int80` word).
    pub static isr_int80: u8;
    /// CPL3 -> CPL0 service call (see `cpu::Cpl0Request`); returns RAX.
    pub fn cpl0_call(request: u64) -> u64;
    /// The `ud2` inside `cpl0_call`.
    pub static cpl0_call_ud2: u8;
    /// At CPL0: empty IDT, then a fault: triple fault.
    pub fn triple_fault_now() -> !;
    /// Top of the CPL0 stack (also TSS.RSP0).
    pub static kstack_top: u8;
    /// Top of the IST1 stack used by all exception handlers.
    pub static ist_stack_top: u8;
    /// Top of the CPL3 stack.
    pub static ustack_top: u8;
    /// TSC at the first instruction of `_start32`.
    pub static boot_tsc: u64;
    /// The part of .bss `user_main` zeroes (linker script).
    pub static mut __bss_zero_start: u8;
    pub static mut __bss_zero_end: u8;
    /// First byte after the loaded image including .bss (linker script).
    pub static __image_end: u8;
    pub static __image_start: u8;
    /// `iretq` to CPL3 at `rip` with stack `rsp`, IOPL 3, IF 0; `arg` in RDI.
    pub fn enter_user(rip: u64, rsp: u64, arg: u64) -> !;
    /// CPL3 -> `f(arg)` at CPL0 on the kernel stack, outside any exception
    /// handler (so `f` may fault and be resumed); returns its result.
    pub fn cpl0_run(f: extern "C" fn(u64) -> u64, arg: u64) -> u64;
    /// The `ud2` inside `cpl0_run`.
    pub static cpl0_run_ud2: u8;
    /// Where the #UD handler sends `cpl0_run` (at CPL0, kernel stack).
    pub static cpl0_run_entry: u8;
    /// The CPL3 context `cpl0_run_entry` returns to: rip, cs, rflags, rsp, ss.
    pub static mut cpl0_run_return: [u64; 5];
    /// Set by a `cpl0_run` function: return with sysretq instead of iretq.
    pub static mut cpl0_run_sysret: u64;
    /// The boot PML4 (`syscall-probe` adds a supervisor-only alias).
    pub static mut pml4: [u64; 512];
    /// `syscall-probe`'s LSTAR target (see `cpl0test`), and what it saw:
    /// landed (1), CS, RCX, R11, RFLAGS.
    pub static syscall_probe_entry: u8;
    pub static mut syscall_probe_seen: [u64; 5];
}

// PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY = 18, owner "Xen"). The
// descriptor is 8 bytes like Linux's (_ASM_PTR): QEMU reads a full u64,
// linux-loader reads the low u32.
global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .p2align 2
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .quad _start32
    "#,
    options(att_syntax)
);

// 32-bit PVH entry. State on entry (PVH ABI): protected mode, paging off,
// flat CS/DS/ES/SS, interrupts off, EBX = physical address of hvm_start_info.
// No stack is guaranteed, so nothing here touches ESP until 64-bit mode.
global_asm!(
    r#"
    .section .text.entry, "ax"
    .code32
    .global _start32
_start32:
    cli
    cld
    mov %ebx, %esi              # hvm_start_info, kept in ESI into long mode
    rdtsc                       # boot timestamp (tsc word reports CPL0 time)
    mov %eax, boot_tsc
    mov %edx, boot_tsc + 4

    # SSE before any Rust code: the precompiled core uses it.
    # CR0: set MP (bit 1) and NE (bit 5), clear EM (bit 2) and TS (bit 3);
    # PVH promises only PE.
    mov %cr0, %eax
    and $~0xc, %eax
    or $0x22, %eax
    mov %eax, %cr0
    # CR4: PAE (5), OSFXSR (9), OSXMMEXCPT (10).
    mov %cr4, %eax
    or $0x620, %eax
    mov %eax, %cr4

    mov $pml4, %eax
    mov %eax, %cr3

    # EFER.LME
    mov $0xc0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr

    lgdt gdt_ptr

    # Paging on (PG) with PE kept; also WP so CPL0 honours read-only pages.
    mov %cr0, %eax
    or $0x80010001, %eax
    mov %eax, %cr0

    ljmp $0x08, $_start64

    .code64
_start64:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    mov $kstack_top, %esp       # below 2 GiB: zero-extended, fine
    mov %esi, %edi              # zero-extends: start_info as u64 argument
    call cpl0_main
    ud2

    # enter_user(rip: rdi, rsp: rsi, arg: rdx) -> !
    .global enter_user
enter_user:
    mov $0x1b, %eax
    mov %eax, %ds
    mov %eax, %es
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    pushq $0x1b                 # SS
    push %rsi                   # RSP
    pushq $0x3002               # RFLAGS: IOPL=3, IF=0
    pushq $0x23                 # CS
    push %rdi                   # RIP
    mov %rdx, %rdi
    iretq
    "#,
    options(att_syntax)
);

// Exception stubs: each pushes a dummy error code where the CPU does not,
// then the vector, and joins `isr_common`, which saves the GPRs and calls
// `cpu::exception_handler(&mut Frame)`. If that returns (only #BP does),
// the registers are restored and the stub returns with iretq.
global_asm!(
    r#"
    .section .text.isr, "ax"
    .code64

    .macro ISR_NOERR vec
isr_\vec:
    pushq $0
    pushq $\vec
    jmp isr_common
    .endm

    .macro ISR_ERR vec
isr_\vec:
    pushq $\vec
    jmp isr_common
    .endm

    .irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31,128
    ISR_NOERR \v
    .endr
    .global isr_int80
    .set isr_int80, isr_128
    .irp v, 8,10,11,12,13,14,17,21,29,30
    ISR_ERR \v
    .endr

isr_common:
    push %rax
    push %rcx
    push %rdx
    push %rbx
    push %rbp
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    mov %rsp, %rbx              # callee-saved: restores RSP after the call
    and $-16, %rsp
    cld
    call exception_handler
    mov %rbx, %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rbp
    pop %rbx
    pop %rdx
    pop %rcx
    pop %rax
    add $16, %rsp               # vector and error code
    iretq

    # cpl0_call(request: rdi) -> rax: the guest's way from CPL3 back to
    # CPL0. Not a software interrupt: on PVM hosts `int n` from CPL3 (other
    # than int3) is emulated as #UD, since KVM's emulator cannot do
    # protected-mode `int n`. A real #UD at this known RIP works everywhere;
    # cpu::exception_handler recognises it, serves RAX and skips the ud2.
    .global cpl0_call, cpl0_call_ud2
cpl0_call:
    mov %rdi, %rax
cpl0_call_ud2:
    ud2
    ret

    # cpl0_run(f: rdi, arg: rsi) -> rax: like cpl0_call, but the #UD handler
    # (cpu::exception_handler) saves the CPL3 return context and irets to
    # cpl0_run_entry at CPL0 on the kernel stack, which calls f(arg) and
    # irets back to CPL3 after the ud2. Callee-saved registers survive (f is
    # a C function); caller-saved ones are clobbered, as for any call.
    .global cpl0_run, cpl0_run_ud2, cpl0_run_entry
cpl0_run:
cpl0_run_ud2:
    ud2
    ret
cpl0_run_entry:
    and $-16, %rsp
    mov %rdi, %rax
    mov %rsi, %rdi
    call *%rax
    mov $cpl0_run_return, %rcx
    cmpq $0, cpl0_run_sysret
    jne 1f
    pushq 32(%rcx)              # SS
    pushq 24(%rcx)              # RSP
    pushq 16(%rcx)              # RFLAGS
    pushq 8(%rcx)               # CS
    pushq 0(%rcx)               # RIP
    iretq
1:
    # f asked for a sysretq return (to CS/SS from STAR[63:48], which must name
    # the user selectors): RSP by hand, RIP from RCX, RFLAGS from R11.
    movq $0, cpl0_run_sysret
    mov 24(%rcx), %rsp
    mov 16(%rcx), %r11
    mov 0(%rcx), %rcx
    sysretq

    # syscall-probe's LSTAR target, reached through a supervisor-only alias
    # of the image (cpl0test). Records CS, RCX, R11, RFLAGS as it landed,
    # then returns: sysretq at CPL0, by hand if it landed at CPL3.
    .global syscall_probe_entry
syscall_probe_entry:
    mov %rcx, syscall_probe_seen + 16
    mov %r11, syscall_probe_seen + 24
    xor %eax, %eax
    mov %cs, %ax
    mov %rax, syscall_probe_seen + 8
    pushfq
    pop %rax
    mov %rax, syscall_probe_seen + 32
    movq $1, syscall_probe_seen
    testq $3, syscall_probe_seen + 8
    jnz 1f
    sysretq
1:
    lea -128(%rsp), %rsp        # past the interrupted code's red zone
    push %r11
    popfq
    lea 128(%rsp), %rsp
    jmp *%rcx

    # At CPL0: load an empty IDT and fault. #UD cannot be delivered, nor
    # the #GP, nor the #DF: a triple fault (shutdown). ud2 rather than int3:
    # the CPL0 emulator fails on int3 instead of raising the exception.
    .global triple_fault_now
triple_fault_now:
    lidt empty_idtr(%rip)
    ud2
    jmp triple_fault_now

    .section .rodata.isr, "a"
    .p2align 3
    .global isr_table
isr_table:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad isr_\v
    .endr
empty_idtr:
    .word 0
    .quad 0
    "#,
    options(att_syntax)
);

// Static page tables: identity map of 0-4 GiB with 2 MiB pages, all
// present, writable and user-accessible (the guest works at CPL3). The
// 3-4 GiB region (PCI MMIO hole, IOAPIC, LAPIC) is uncached: PWT|PCD.
// Entry bits: P=0x1 RW=0x2 US=0x4 PWT=0x8 PCD=0x10 PS=0x80.
global_asm!(
    r#"
    .section .data.pagetables, "aw"
    .p2align 12
    .global pml4
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
    .global pdpt                # extended above 4 GiB by `paging` at CPL3
pdpt:
    .quad pd + 0x0007
    .quad pd + 0x1007
    .quad pd + 0x2007
    .quad pd + 0x3007
    .fill 508, 8, 0
pd:
    .set pde_i, 0
    .rept 1536
    .quad (pde_i << 21) | 0x87
    .set pde_i, pde_i + 1
    .endr
    .rept 512
    .quad (pde_i << 21) | 0x9f
    .set pde_i, pde_i + 1
    .endr

    .section .data.boot, "aw"
    .p2align 3
    .global boot_tsc
boot_tsc:
    .quad 0
    .global cpl0_run_return, cpl0_run_sysret, syscall_probe_seen
cpl0_run_return:
    .quad 0, 0, 0, 0, 0
cpl0_run_sysret:
    .quad 0
syscall_probe_seen:
    .quad 0, 0, 0, 0, 0

    .section .data.gdt, "aw"
    .p2align 4
gdt:
    .quad 0
    .quad 0x00af9a000000ffff    # 0x08 kernel code, 64-bit
    .quad 0x00cf92000000ffff    # 0x10 kernel data
    .quad 0x00cff2000000ffff    # 0x18 user data, DPL 3
    .quad 0x00affa000000ffff    # 0x20 user code, 64-bit, DPL 3
    .global gdt_tss
gdt_tss:
    .quad 0, 0                  # 0x28 TSS, filled at run time
gdt_end:
    .p2align 3
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt                   # 32-bit lgdt reads the low 4 bytes

    .section .bss.stacks, "aw", @nobits
    .p2align 12
    .global kstack_top, ist_stack_top, ustack_top
    .skip 16384
kstack_top:
    .skip 16384
ist_stack_top:
    .skip 262144
ustack_top:
    "#,
    options(att_syntax)
);

/*
 * elf32-pvh: a tiny 32-bit PVH kernel for wbvmm's tests (tests/elf32_pvh.rs builds it
 * with gcc -m32; see link.ld). Entered as PVH specifies: 32-bit flat protected mode,
 * paging off, EBX = physical address of the hvm_start_info. It prints one line on
 * COM1 and ends the VM through the debug-exit port (0xf4) with 42 when EBX points to
 * a start info with the right magic, 1 when not.
 *
 * Built with -DNO_PVH_NOTE it has no PVH entry note: the image wbvmm must refuse.
 */

#define COM1            0x3f8
#define COM1_LSR        (COM1 + 5)
#define LSR_THRE        0x20
#define DEBUG_EXIT_PORT 0xf4
#define PVH_MAGIC       0x336ec578
#define XEN_ELFNOTE_PHYS32_ENTRY 18

#ifndef NO_PVH_NOTE
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                         /* n_namesz: "Xen\0" */
    .long 4                         /* n_descsz: a 32-bit address */
    .long XEN_ELFNOTE_PHYS32_ENTRY  /* n_type */
    .asciz "Xen"
    .long pvh_start                 /* the physical entry */
#endif

    .text
    .code32
    .globl pvh_start
pvh_start:
    cli
    cld
    movl $stack_top, %esp
    movl $1, %edi                   /* exit code when the start info is wrong */
    cmpl $PVH_MAGIC, (%ebx)
    jne 1f
    movl $42, %edi
1:  movl $hello, %esi
    call puts
    cmpl $42, %edi
    je 2f
    movl $bad_magic, %esi
    call puts
2:  movl %edi, %eax
    movw $DEBUG_EXIT_PORT, %dx
    outl %eax, %dx
3:  hlt                             /* not reached when the debug-exit port works */
    jmp 3b

/* Write the NUL-terminated string at %esi to COM1, waiting for THRE before each byte. */
puts:
    lodsb
    testb %al, %al
    jz 9f
    movb %al, %cl
    movw $COM1_LSR, %dx
8:  inb %dx, %al
    testb $LSR_THRE, %al
    jz 8b
    movb %cl, %al
    movw $COM1, %dx
    outb %al, %dx
    jmp puts
9:  ret

    .section .rodata
hello:
    .asciz "elf32-pvh: hello from a 32-bit PVH kernel\n"
bad_magic:
    .asciz "elf32-pvh: EBX does not point to an hvm_start_info (bad magic)\n"

    .section .bss
    .balign 16
stack:
    .skip 4096
stack_top:

/*
 * Test of syscall-fault.patch: a static, libc-free /init that makes its system calls the way this
 * host's hypervisor delivers a user-mode `syscall` (RCX = return address, R11 = RFLAGS, then a
 * user-mode jump to entry_SYSCALL_64 that page-faults), so that the patch's path can be checked on
 * any machine, e.g. under QEMU TCG where a real `syscall` works. Run by guest-images/test-linux-small.sh.
 *
 *   /init [child HEX]    entry_SYSCALL_64's address: from the environment (WB_ENTRY=0x...,
 *                        given on the kernel command line), or argv[2] when exec'ed as the child
 *
 * Checks, each printing "syscall-fault-test: ok NAME" or "syscall-fault-test: FAIL NAME ...":
 *   write/getpid results; registers across the call (all but RAX, RCX, R11 kept; RCX = return
 *   address; RFLAGS from R11 with CF kept, IF set, IOPL cleared); an unknown number gives -ENOSYS;
 *   a signal delivered on the way out (kill) and rt_sigreturn through the same path; a blocking read
 *   interrupted by SIGALRM and restarted (SA_RESTART: ip -= 2 onto the real `syscall` instruction
 *   that follows each jump); fork, execve of /init in the child, exit_group and wait4; a jump with a
 *   kernel return address in RCX is not a system call (SIGSEGV).
 * Ends with "syscall-fault-test: PASS" or "syscall-fault-test: FAILED N", then reboot(2).
 */
typedef unsigned long u64;

unsigned long entry;             /* entry_SYSCALL_64 */

/* A system call made as this host's hypervisor delivers one: RCX, R11 set, jump to LSTAR. The real
 * `syscall` after the jump is what the kernel's restart (ip = RCX - 2) executes. */
static long fsys(long nr, long a1, long a2, long a3, long a4, long a5, long a6)
{
    register long r10 __asm__("r10") = a4;
    register long r8 __asm__("r8") = a5;
    register long r9 __asm__("r9") = a6;
    long ret;
    __asm__ volatile("lea 1f(%%rip), %%rcx\n\t"
                     "pushfq\n\t"
                     "pop %%r11\n\t"
                     "jmp *entry(%%rip)\n\t"
                     "syscall\n"
                     "1:"
                     : "=a"(ret)
                     : "0"(nr), "D"(a1), "S"(a2), "d"(a3), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory", "cc");
    return ret;
}
#define F0(n) fsys(n, 0, 0, 0, 0, 0, 0)
#define F1(n, a) fsys(n, (long)(a), 0, 0, 0, 0, 0)
#define F2(n, a, b) fsys(n, (long)(a), (long)(b), 0, 0, 0, 0)
#define F3(n, a, b, c) fsys(n, (long)(a), (long)(b), (long)(c), 0, 0, 0)
#define F4(n, a, b, c, d) fsys(n, (long)(a), (long)(b), (long)(c), (long)(d), 0, 0)

/* A real `syscall`, for the end (reboot) only. */
static long rsys4(long nr, long a1, long a2, long a3, long a4)
{
    register long r10 __asm__("r10") = a4;
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "0"(nr), "D"(a1), "S"(a2), "d"(a3), "r"(r10)
                     : "rcx", "r11", "memory", "cc");
    return ret;
}

enum { SYS_read = 0, SYS_write = 1, SYS_rt_sigaction = 13, SYS_rt_sigreturn = 15, SYS_pipe = 22,
       SYS_alarm = 37, SYS_getpid = 39, SYS_fork = 57, SYS_execve = 59, SYS_wait4 = 61, SYS_kill = 62,
       SYS_reboot = 169, SYS_exit_group = 231 };
#define SIGUSR1 10
#define SIGSEGV 11
#define SIGALRM 14
#define SA_SIGINFO 0x4
#define SA_RESTORER 0x04000000
#define SA_RESTART 0x10000000
#define ENOSYS 38

/* ---- registers across a call: set known values, call getpid, store everything ---- */
u64 saved[16];   /* rax rbx rbp r12 r13 r14 r15 rdi rsi rdx r10 r8 r9 rcx r11 rflags */
extern char regs_test_ret[];
void regs_test(void);
u64 iopl_test(void);
void restorer(void);
__asm__(".text\n"
        ".globl regs_test\n"
        "regs_test:\n"
        "  push %rbx; push %rbp; push %r12; push %r13; push %r14; push %r15\n"
        "  movabs $0x1111111111111111, %rbx\n"
        "  movabs $0x2222222222222222, %rbp\n"
        "  movabs $0x3333333333333333, %r12\n"
        "  movabs $0x4444444444444444, %r13\n"
        "  movabs $0x5555555555555555, %r14\n"
        "  movabs $0x6666666666666666, %r15\n"
        "  movabs $0x7777777777777777, %rdi\n"
        "  movabs $0x8888888888888888, %rsi\n"
        "  movabs $0x9999999999999999, %rdx\n"
        "  movabs $0xaaaaaaaaaaaaaaaa, %r10\n"
        "  movabs $0xbbbbbbbbbbbbbbbb, %r8\n"
        "  movabs $0xcccccccccccccccc, %r9\n"
        "  mov $39, %eax\n"
        "  lea regs_test_ret(%rip), %rcx\n"
        "  stc\n"
        "  pushfq\n"
        "  pop %r11\n"
        "  jmp *entry(%rip)\n"
        "  syscall\n"
        ".globl regs_test_ret\n"
        "regs_test_ret:\n"
        "  pushfq\n"
        "  popq saved+120(%rip)\n"
        "  mov %rax, saved+0(%rip)\n"
        "  mov %rbx, saved+8(%rip)\n"
        "  mov %rbp, saved+16(%rip)\n"
        "  mov %r12, saved+24(%rip)\n"
        "  mov %r13, saved+32(%rip)\n"
        "  mov %r14, saved+40(%rip)\n"
        "  mov %r15, saved+48(%rip)\n"
        "  mov %rdi, saved+56(%rip)\n"
        "  mov %rsi, saved+64(%rip)\n"
        "  mov %rdx, saved+72(%rip)\n"
        "  mov %r10, saved+80(%rip)\n"
        "  mov %r8, saved+88(%rip)\n"
        "  mov %r9, saved+96(%rip)\n"
        "  mov %rcx, saved+104(%rip)\n"
        "  mov %r11, saved+112(%rip)\n"
        "  pop %r15; pop %r14; pop %r13; pop %r12; pop %rbp; pop %rbx\n"
        "  ret\n"
        /* R11 with IOPL 3 asked for: the flags after the call must have IOPL 0. */
        ".globl iopl_test\n"
        "iopl_test:\n"
        "  pushfq\n"
        "  pop %r11\n"
        "  or $0x3000, %r11\n"
        "  mov $39, %eax\n"
        "  lea 1f(%rip), %rcx\n"
        "  jmp *entry(%rip)\n"
        "  syscall\n"
        "1:\n"
        "  pushfq\n"
        "  pop %rax\n"
        "  ret\n"
        /* sa_restorer: rt_sigreturn through the same path. */
        ".globl restorer\n"
        "restorer:\n"
        "  mov $15, %eax\n"
        "  lea 1f(%rip), %rcx\n"
        "  pushfq\n"
        "  pop %r11\n"
        "  jmp *entry(%rip)\n"
        "  syscall\n"
        "1:\n"
        "  hlt\n");

/* ---- output ---- */
static unsigned long slen(const char *s) { unsigned long n = 0; while (s[n]) n++; return n; }
static void out(const char *s) { F3(SYS_write, 1, s, slen(s)); }
static void outhex(u64 v)
{
    char b[19];
    b[0] = '0'; b[1] = 'x';
    for (int i = 0; i < 16; i++) b[2 + i] = "0123456789abcdef"[(v >> (60 - 4 * i)) & 15];
    b[18] = 0;
    out(b);
}
static int failures;
static void check(int ok, const char *name, u64 got)
{
    out(ok ? "syscall-fault-test: ok " : "syscall-fault-test: FAIL ");
    out(name);
    if (!ok) { out(" got "); outhex(got); failures++; }
    out("\n");
}
static int streq(const char *a, const char *b) { while (*a && *a == *b) a++, b++; return *a == *b; }
static u64 parsehex(const char *s)
{
    u64 v = 0;
    if (s[0] == '0' && s[1] == 'x') s += 2;
    for (; *s; s++) {
        int d = *s >= '0' && *s <= '9' ? *s - '0' : *s >= 'a' && *s <= 'f' ? *s - 'a' + 10 : -1;
        if (d < 0) break;
        v = v * 16 + d;
    }
    return v;
}

/* ---- signals ---- */
struct ksigaction { void *handler; unsigned long flags; void *restorer; unsigned long mask; };
static volatile int got_usr1, got_alrm;
static int pipefd[2];
static void on_usr1(int sig) { got_usr1 = sig; }
static void on_alrm(int sig) { got_alrm = sig; F3(SYS_write, pipefd[1], "x", 1); }
static long sigaction_(int sig, void (*h)(int), unsigned long flags)
{
    struct ksigaction sa = { (void *)h, flags | SA_RESTORER, (void *)restorer, 0 };
    return F4(SYS_rt_sigaction, sig, &sa, 0, 8);
}

int main(int argc, char **argv, char **envp)
{
    if (argc >= 3 && streq(argv[1], "child")) {
        entry = parsehex(argv[2]);
        out("syscall-fault-test: child after execve\n");
        F1(SYS_exit_group, 42);
        return 1;
    }
    for (char **e = envp; *e; e++)
        if ((*e)[0] == 'W' && (*e)[1] == 'B' && (*e)[2] == '_' && (*e)[3] == 'E' && (*e)[8] == '=')
            entry = parsehex(*e + 9);
    if (!entry) {
        static const char m[] = "syscall-fault-test: FAIL no WB_ENTRY=0x... (entry_SYSCALL_64) in the environment\n";
        rsys4(SYS_write, 1, (long)m, sizeof m - 1, 0);
        rsys4(SYS_reboot, 0xfee1dead, 672274793, 0x01234567, 0);
        return 1;
    }

    static const char hello[] = "syscall-fault-test: start\n";
    check(F3(SYS_write, 1, hello, sizeof hello - 1) == sizeof hello - 1, "write returns its length", 0);
    long pid = F0(SYS_getpid);
    check(pid == 1, "getpid == 1", pid);
    check(F0(5000) == -ENOSYS, "unknown system call -> -ENOSYS", 0);

    regs_test();
    static const u64 want[] = { 0, 0x1111111111111111, 0x2222222222222222, 0x3333333333333333,
        0x4444444444444444, 0x5555555555555555, 0x6666666666666666, 0x7777777777777777,
        0x8888888888888888, 0x9999999999999999, 0xaaaaaaaaaaaaaaaa, 0xbbbbbbbbbbbbbbbb,
        0xcccccccccccccccc };
    check(saved[0] == 1, "regs: rax = getpid's result", saved[0]);
    int kept = 1;
    for (int i = 1; i < 13; i++) if (saved[i] != want[i]) { kept = 0; check(0, "regs: a register not kept, index", i); }
    check(kept, "regs: rbx rbp r12-r15 rdi rsi rdx r10 r8 r9 kept", 0);
    check(saved[13] == (u64)regs_test_ret, "regs: rcx = return address", saved[13]);
    check(saved[15] & 1, "regs: CF from R11 kept", saved[15]);
    check(saved[15] & 0x200, "regs: IF set after the call", saved[15]);
    u64 fl = iopl_test();
    check((fl & 0x3000) == 0, "flags: IOPL asked for in R11 is cleared", fl);

    check(sigaction_(SIGUSR1, on_usr1, 0) == 0, "rt_sigaction(SIGUSR1)", 0);
    long k = F2(SYS_kill, 1, SIGUSR1);
    check(k == 0 && got_usr1 == SIGUSR1, "kill: handler ran, rt_sigreturn came back with kill's result", (u64)k);

    check(F1(SYS_pipe, pipefd) == 0, "pipe", 0);
    check(sigaction_(SIGALRM, on_alrm, SA_RESTART) == 0, "rt_sigaction(SIGALRM, SA_RESTART)", 0);
    F1(SYS_alarm, 1);
    char c = 0;
    long r = F3(SYS_read, pipefd[0], &c, 1);
    check(r == 1 && c == 'x' && got_alrm == SIGALRM, "read interrupted by SIGALRM, restarted, got the handler's byte", (u64)r);

    static char hexbuf[19];
    {   u64 v = entry; hexbuf[0] = '0'; hexbuf[1] = 'x';
        for (int i = 0; i < 16; i++) hexbuf[2 + i] = "0123456789abcdef"[(v >> (60 - 4 * i)) & 15]; }
    long child = F0(SYS_fork);
    if (child == 0) {
        char *cargv[] = { "/init", "child", hexbuf, 0 };
        char *cenv[] = { 0 };
        F3(SYS_execve, "/init", cargv, cenv);
        out("syscall-fault-test: FAIL execve returned\n");
        F1(SYS_exit_group, 1);
    }
    check(child > 1, "fork: parent gets the child's pid", (u64)child);
    int status = 0;
    long w = F4(SYS_wait4, -1, &status, 0, 0);
    check(w == child && status == (42 << 8), "wait4: child exec'ed /init and exit_group(42)", (u64)status);

    /* A kernel address in RCX is not a system call: the jump faults as usual (SIGSEGV). */
    child = F0(SYS_fork);
    if (child == 0) {
        __asm__ volatile("mov $39, %%eax\n\t"
                         "movabs $0xffffffff81000000, %%rcx\n\t"
                         "jmp *entry(%%rip)" ::: "rax", "rcx", "memory");
        F1(SYS_exit_group, 1);
    }
    status = 0;
    w = F4(SYS_wait4, child, &status, 0, 0);
    check(w == child && (status & 0x7f) == SIGSEGV, "kernel address in RCX: SIGSEGV, not a system call", (u64)status);

    if (failures == 0) {
        out("syscall-fault-test: PASS\n");
    } else {
        out("syscall-fault-test: FAILED ");
        outhex(failures);
        out("\n");
    }
    rsys4(SYS_reboot, 0xfee1dead, 672274793, 0x01234567, 0);
    for (;;) ;
}

__asm__(".text\n"
        ".globl _start\n"
        "_start:\n"
        "  xor %rbp, %rbp\n"
        "  mov (%rsp), %rdi\n"
        "  lea 8(%rsp), %rsi\n"
        "  lea 16(%rsp,%rdi,8), %rdx\n"
        "  and $-16, %rsp\n"
        "  call main\n"
        "  hlt\n");

//! Seccomp filters per thread: once the guest runs, each wbvmm thread may make only
//! the system calls its work needs ([`rules`]), so that a guest that finds a bug in a
//! device model still cannot open files, create sockets, map executable memory,
//! start processes or signal other processes from that thread.
//!
//! Built with `seccompiler` (rust-vmm, from Firecracker, also used by Cloud
//! Hypervisor): it compiles rules to classic BPF in-process with no C library to
//! install, and applies a filter to the calling thread only, which per-thread filters
//! need.
//!
//! `--seccomp kill` (the default) makes a forbidden call raise SIGSYS in the thread
//! that made it (`SECCOMP_RET_TRAP`, not `KILL_PROCESS`, which would die without a
//! word): the handler prints `wbvmm: seccomp: the vCPU thread vcpu0 made a forbidden
//! system call socket (41) ...` with `write(2)` only, puts the terminal back, and
//! ends the process with status [`EXIT_SECCOMP`]. `--seccomp log` reports each
//! forbidden call with the same line (`... ; let through`) and lets it go on with its
//! effect, so wbvmm runs exactly as without a filter while the lines show what the
//! filter would have stopped. Not `SECCOMP_RET_LOG` (Cloud Hypervisor's choice): that
//! only reaches the kernel's audit log, which is silent where audit is off (as on the
//! development machines), so wbvmm could not report anything. Instead the filter
//! answers `SECCOMP_RET_USER_NOTIF`, and an unfiltered supervisor thread ([`log`])
//! prints the line and answers `SECCOMP_USER_NOTIF_FLAG_CONTINUE` (Linux 5.5+), which
//! runs the call as if no filter were there. `--seccomp off` installs nothing.

mod log;
mod names;
mod rules;

use std::cell::Cell;
use std::fmt;
use std::str::FromStr;
use std::sync::{Condvar, Mutex, OnceLock};

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use thiserror::Error;

pub use names::syscall_name;

/// The exit status after a forbidden system call in kill mode: 128 + SIGSYS, as a
/// shell reports a process killed by SIGSYS.
pub const EXIT_SECCOMP: i32 = 128 + libc::SIGSYS;

/// What a forbidden system call does (`--seccomp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// The offending thread reports the call and wbvmm stops.
    #[default]
    Kill,
    /// The offending thread reports the call, which then goes on with its effect.
    Log,
    /// No filter.
    Off,
}

impl FromStr for SeccompMode {
    type Err = SeccompError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kill" => Ok(SeccompMode::Kill),
            "log" => Ok(SeccompMode::Log),
            "off" => Ok(SeccompMode::Off),
            _ => Err(SeccompError::BadMode(s.to_string())),
        }
    }
}

/// The kinds of wbvmm thread, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The thread that built the VM: waits for its end, writes statistics, tears down.
    Main,
    /// A `vcpuN` thread: KVM_RUN and the exit path (devices, emulation fallback).
    Vcpu,
    /// The `wbvmm-io` thread: console input, tap RX, doorbells, timers.
    Io,
    /// The `wbvmm-gdb` thread (`--gdb`): the debugger's socket.
    Gdb,
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Io => "I/O",
            ThreadKind::Gdb => "GDB stub",
        })
    }
}

#[derive(Debug, Error)]
pub enum SeccompError {
    #[error("'{0}' is not a --seccomp mode: use kill, log or off")]
    BadMode(String),
    #[error("cannot build the seccomp filter of the {0} thread (a wbvmm bug: please report it)")]
    Build(ThreadKind, #[source] seccompiler::BackendError),
    #[error("the kernel refused the seccomp filter of the {kind} thread; on a kernel without seccomp filters (CONFIG_SECCOMP_FILTER) run with --seccomp off")]
    Apply {
        kind: ThreadKind,
        #[source]
        source: std::io::Error,
    },
    #[error("this kernel cannot {0} a forbidden system call (see /proc/sys/kernel/seccomp/actions_avail); use another --seccomp mode")]
    ActionUnavailable(&'static str, #[source] std::io::Error),
    #[error("seccomp filters were already set up for this process in mode {0:?}")]
    AlreadyConfigured(SeccompMode),
    #[error("cannot install the SIGSYS handler that reports forbidden system calls")]
    Handler(#[source] std::io::Error),
    #[error("cannot start the thread that reports forbidden system calls in --seccomp log mode")]
    Supervisor(#[source] std::io::Error),
}

/// The BPF program of `kind`'s filter in `mode` (None for [`SeccompMode::Off`]).
pub fn filter(kind: ThreadKind, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let on_forbidden = match mode {
        SeccompMode::Kill => SeccompAction::Trap,
        // Turned into SECCOMP_RET_USER_NOTIF below (seccompiler has no such action).
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Off => return Ok(None),
    };
    let mut program = build(kind, on_forbidden)?;
    if mode == SeccompMode::Log {
        log::notify_instead_of_log(&mut program);
    }
    Ok(Some(program))
}

fn build(kind: ThreadKind, on_forbidden: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let err = |e| SeccompError::Build(kind, e);
    let rules = rules::rules(kind, std::process::id()).map_err(err)?;
    let f = SeccompFilter::new(
        rules,
        on_forbidden,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(err)?;
    BpfProgram::try_from(f).map_err(err)
}

/// Install `kind`'s filter on the calling thread, for good (filters cannot be
/// removed; threads it creates afterwards inherit it). In kill mode the SIGSYS
/// handler must be in place ([`configure`] does both for a whole VM).
pub fn install(kind: ThreadKind, mode: SeccompMode) -> Result<(), SeccompError> {
    match filter(kind, mode)? {
        Some(program) => apply(kind, mode, &program),
        None => Ok(()),
    }
}

fn apply(kind: ThreadKind, mode: SeccompMode, program: &BpfProgram) -> Result<(), SeccompError> {
    remember_thread(kind);
    if mode == SeccompMode::Log {
        return log::apply_reported(IDENTITY.with(|c| c.get()), program)
            .map_err(|source| SeccompError::Apply { kind, source });
    }
    seccompiler::apply_filter(program).map_err(|e| SeccompError::Apply {
        kind,
        source: match e {
            seccompiler::Error::Seccomp(io) | seccompiler::Error::Prctl(io) => io,
            other => std::io::Error::other(other.to_string()),
        },
    })
}

/// The filters of a configured process, built once before the VM exists.
struct Armed {
    mode: SeccompMode,
    main: BpfProgram,
    vcpu: BpfProgram,
    io: BpfProgram,
    gdb: BpfProgram,
}

static ARMED: OnceLock<Armed> = OnceLock::new();

/// Set up the filters for this process's VM (once, before it is built): build the
/// three programs, check that the kernel has the action `mode` needs, and in kill
/// mode install the SIGSYS handler. [`enter`] then installs them as the threads
/// start. Without this call (library users, most tests) [`enter`] does nothing.
pub fn configure(mode: SeccompMode) -> Result<(), SeccompError> {
    // Once per process: a second call may come from a thread already filtered.
    if let Some(armed) = ARMED.get() {
        return match armed.mode == mode {
            true => Ok(()),
            false => Err(SeccompError::AlreadyConfigured(armed.mode)),
        };
    }
    let action = match mode {
        SeccompMode::Off => return Ok(()),
        SeccompMode::Kill => (libc::SECCOMP_RET_TRAP, "trap"),
        SeccompMode::Log => (libc::SECCOMP_RET_USER_NOTIF, "report (user notification)"),
    };
    // SAFETY: SECCOMP_GET_ACTION_AVAIL only reads the u32 we pass.
    if unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_GET_ACTION_AVAIL,
            0,
            &action.0 as *const u32,
        )
    } != 0
    {
        return Err(SeccompError::ActionUnavailable(
            action.1,
            std::io::Error::last_os_error(),
        ));
    }
    let armed = Armed {
        mode,
        main: filter(ThreadKind::Main, mode)?.unwrap_or_default(),
        vcpu: filter(ThreadKind::Vcpu, mode)?.unwrap_or_default(),
        io: filter(ThreadKind::Io, mode)?.unwrap_or_default(),
        gdb: filter(ThreadKind::Gdb, mode)?.unwrap_or_default(),
    };
    match mode {
        SeccompMode::Kill => install_sigsys_handler()?,
        SeccompMode::Log => log::start_supervisor().map_err(SeccompError::Supervisor)?,
        SeccompMode::Off => {}
    }
    // Answered now, while files may still be looked at: the vCPU threads ask when
    // they start, under their filter.
    let _ = crate::cpuid::pvm_host();
    let _ = ARMED.set(armed);
    Ok(())
}

/// Opened by the main thread once its filter is in: until then the vCPU threads wait,
/// so that no guest instruction runs before every thread kind is filtered.
static GATE: (Mutex<bool>, Condvar) = (Mutex::new(false), Condvar::new());

/// At the start of a `kind` thread (the main thread: once the others are started):
/// install its filter, if [`configure`] armed them. A filter that was built and
/// checked but cannot be installed stops wbvmm: running unfiltered when the user
/// asked for a filter is not an option.
pub fn enter(kind: ThreadKind) {
    let Some(armed) = ARMED.get() else { return };
    let program = match kind {
        ThreadKind::Main => &armed.main,
        ThreadKind::Vcpu => &armed.vcpu,
        ThreadKind::Io => &armed.io,
        ThreadKind::Gdb => &armed.gdb,
    };
    // A thread that starts a second VM (tests do) keeps the filter it has: installing
    // another would take calls (`seccomp`, `prctl`) that the first forbids.
    let filtered = IDENTITY.with(|c| c.get()).kind == Some(kind);
    if !filtered {
        if let Err(e) = apply(kind, armed.mode, program) {
            eprintln!("wbvmm: {}", crate::error_chain(&e));
            std::process::exit(crate::vcpu::EXIT_VMM_ERROR);
        }
    }
    let (open, cv) = &GATE;
    let mut is_open = open.lock().unwrap_or_else(|e| e.into_inner());
    match kind {
        ThreadKind::Main => {
            *is_open = true;
            cv.notify_all();
        }
        ThreadKind::Vcpu => {
            while !*is_open {
                is_open = cv.wait(is_open).unwrap_or_else(|e| e.into_inner());
            }
        }
        ThreadKind::Io | ThreadKind::Gdb => {}
    }
    drop(is_open);
    #[cfg(feature = "test-hooks")]
    test_hooks::fire(kind);
}

/// Who this thread is, for the SIGSYS report (read inside the handler: plain data
/// in a const-initialised thread-local, no allocation, no lock).
#[derive(Clone, Copy)]
struct Identity {
    kind: Option<ThreadKind>,
    name: [u8; 16],
    len: usize,
}

thread_local! {
    static IDENTITY: Cell<Identity> = const {
        Cell::new(Identity { kind: None, name: [0; 16], len: 0 })
    };
}

fn remember_thread(kind: ThreadKind) {
    let mut id = Identity {
        kind: Some(kind),
        name: [0; 16],
        len: 0,
    };
    if let Some(n) = std::thread::current().name() {
        let n = n.as_bytes();
        id.len = n.len().min(id.name.len());
        id.name[..id.len].copy_from_slice(&n[..id.len]);
    }
    IDENTITY.with(|c| c.set(id));
}

/// The terminal's settings before wbvmm changed them, put back by the SIGSYS report.
static SAVED_TERMIOS: OnceLock<libc::termios> = OnceLock::new();

/// The part of `siginfo_t` that SIGSYS fills (`_sigsys` in the kernel's union).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// `si_code` of a SIGSYS raised by a seccomp filter.
const SYS_SECCOMP: libc::c_int = 1;

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: isatty/tcgetattr only fill the struct we own.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::isatty(libc::STDIN_FILENO) == 1 && libc::tcgetattr(libc::STDIN_FILENO, &mut t) == 0
        {
            let _ = SAVED_TERMIOS.set(t);
        }
    }
    // SAFETY: the handler only calls async-signal-safe functions (write, tcsetattr,
    // _exit) and reads plain data.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// A line built on the stack: the handler may not allocate.
struct LineBuf {
    buf: [u8; 256],
    len: usize,
}

impl fmt::Write for LineBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// The report line for a forbidden call `nr` made by thread `who`; `ending` says
/// what happens next.
fn report_line(who: &Identity, nr: i64, ending: fmt::Arguments, out: &mut LineBuf) {
    use fmt::Write;
    let name = std::str::from_utf8(&who.name[..who.len]).unwrap_or("");
    let _ = match who.kind {
        Some(ThreadKind::Main) | None => write!(out, "wbvmm: seccomp: the main thread"),
        Some(kind) => write!(out, "wbvmm: seccomp: the {kind} thread {name}"),
    };
    let _ = match syscall_name(nr) {
        Some(call) => write!(out, " made a forbidden system call: {call} ({nr})"),
        None => write!(out, " made a forbidden system call: number {nr}"),
    };
    let _ = writeln!(out, "; {ending}");
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a siginfo for SIGSYS, whose _sigsys member SigsysInfo
    // mirrors.
    let info = unsafe { &*(info as *const SigsysInfo) };
    if info.code != SYS_SECCOMP {
        return; // A SIGSYS someone sent: not ours to report.
    }
    let who = IDENTITY.with(|c| c.get());
    let mut line = LineBuf {
        buf: [0; 256],
        len: 0,
    };
    report_line(
        &who,
        i64::from(info.syscall),
        format_args!(
            "wbvmm stops (status {EXIT_SECCOMP}; --seccomp log reports such calls and lets them through)"
        ),
        &mut line,
    );
    // SAFETY: write, tcsetattr and _exit are async-signal-safe, and every filter
    // allows them (write, ioctl(0, TCSETS), exit_group).
    unsafe {
        libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len);
        if let Some(t) = SAVED_TERMIOS.get() {
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, t);
        }
        libc::_exit(EXIT_SECCOMP);
    }
}

/// Test builds only (feature `test-hooks`, enabled by the crate's dev-dependency on
/// itself; `cargo build` of the product leaves it out): a forbidden system call made
/// by a chosen thread kind right after its filter is in. The guest cannot reach it:
/// it fires at thread start, chosen by the host program before the VM is built.
#[cfg(feature = "test-hooks")]
pub mod test_hooks {
    use super::ThreadKind;
    use std::sync::atomic::{AtomicU8, Ordering};

    static TARGET: AtomicU8 = AtomicU8::new(0);

    fn code(kind: ThreadKind) -> u8 {
        match kind {
            ThreadKind::Main => 1,
            ThreadKind::Vcpu => 2,
            ThreadKind::Io => 3,
            ThreadKind::Gdb => 4,
        }
    }

    /// Make the first thread of `kind` create an AF_INET socket once filtered.
    pub fn forbidden_call_at_start(kind: ThreadKind) {
        TARGET.store(code(kind), Ordering::SeqCst);
    }

    pub(super) fn fire(kind: ThreadKind) {
        if TARGET
            .compare_exchange(code(kind), 0, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            // SAFETY: socket has no memory arguments; the fd (in log mode) is closed.
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                if fd >= 0 {
                    libc::close(fd);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run `f` on a fresh thread under `kind`'s rules with forbidden calls failing with
    /// a distinctive errno instead of SIGSYS, and return what `f` saw.
    fn under_filter<T: Send + 'static>(kind: ThreadKind, f: fn() -> T) -> T {
        std::thread::spawn(move || {
            let program = build(kind, SeccompAction::Errno(DENIED as u32)).unwrap();
            seccompiler::apply_filter(&program).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    /// EHWPOISON: no call below fails with it for any reason of its own.
    const DENIED: i32 = libc::EHWPOISON;

    fn errno_of(r: i64) -> i32 {
        if r < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        } else {
            0
        }
    }

    #[test]
    fn sockets_of_any_family_are_denied_on_every_thread() {
        for kind in [
            ThreadKind::Main,
            ThreadKind::Vcpu,
            ThreadKind::Io,
            ThreadKind::Gdb,
        ] {
            let errs = under_filter(kind, || {
                [
                    libc::AF_INET,
                    libc::AF_INET6,
                    libc::AF_UNIX,
                    libc::AF_NETLINK,
                ]
                .map(|family| errno_of(unsafe { libc::socket(family, libc::SOCK_DGRAM, 0) } as i64))
            });
            assert_eq!(errs, [DENIED; 4], "{kind}");
        }
    }

    #[test]
    fn executable_mappings_are_denied_and_plain_ones_allowed() {
        for kind in [
            ThreadKind::Main,
            ThreadKind::Vcpu,
            ThreadKind::Io,
            ThreadKind::Gdb,
        ] {
            let (rw, rwx, mprotect_x) = under_filter(kind, || unsafe {
                let map = |prot| {
                    libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        prot,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                let rw = map(libc::PROT_READ | libc::PROT_WRITE);
                let rw_errno = if rw == libc::MAP_FAILED {
                    errno_of(-1)
                } else {
                    0
                };
                let rwx = map(libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC);
                let rwx_errno = errno_of(if rwx == libc::MAP_FAILED { -1 } else { 0 });
                let mp =
                    errno_of(libc::mprotect(rw, 4096, libc::PROT_READ | libc::PROT_EXEC) as i64);
                libc::munmap(rw, 4096);
                (rw_errno, rwx_errno, mp)
            });
            assert_eq!((rw, rwx, mprotect_x), (0, DENIED, DENIED), "{kind}");
        }
    }

    #[test]
    fn ioctls_are_checked_by_request_number_per_thread() {
        // On fd -1 an allowed request fails with EBADF, a forbidden one never gets there.
        fn try_ioctls() -> [i32; 3] {
            [
                rules::KVM_RUN(),
                rules::KVM_IOEVENTFD(),
                rules::KVM_SET_USER_MEMORY_REGION(),
            ]
            .map(|r| errno_of(unsafe { libc::ioctl(-1, r as _, 0) } as i64))
        }
        let ebadf = libc::EBADF;
        assert_eq!(
            under_filter(ThreadKind::Vcpu, try_ioctls),
            [ebadf, ebadf, DENIED]
        );
        assert_eq!(
            under_filter(ThreadKind::Io, try_ioctls),
            [DENIED, ebadf, DENIED]
        );
        assert_eq!(
            under_filter(ThreadKind::Main, try_ioctls),
            [DENIED, ebadf, ebadf]
        );
    }

    #[test]
    fn only_the_main_thread_opens_files_and_only_with_its_two_flag_sets() {
        fn try_opens() -> [i32; 3] {
            let path = c"/proc/self/status";
            [
                libc::O_RDONLY | libc::O_CLOEXEC,
                libc::O_RDWR | libc::O_CLOEXEC,
                libc::O_RDONLY,
            ]
            .map(|flags| {
                let fd = unsafe { libc::openat(libc::AT_FDCWD, path.as_ptr(), flags) };
                if fd >= 0 {
                    unsafe { libc::close(fd) };
                }
                errno_of(fd as i64)
            })
        }
        // /proc/self/status is read-only: O_RDWR that got through would fail with EACCES.
        assert_eq!(
            under_filter(ThreadKind::Main, try_opens),
            [0, DENIED, DENIED]
        );
        assert_eq!(under_filter(ThreadKind::Vcpu, try_opens), [DENIED; 3]);
        assert_eq!(under_filter(ThreadKind::Io, try_opens), [DENIED; 3]);
    }

    #[test]
    fn signals_stay_inside_the_process() {
        let errs = under_filter(ThreadKind::Vcpu, || {
            let own = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), 0) };
            // Signal 0 to process 1: only checks, but the filter sees the target.
            let other = unsafe { libc::syscall(libc::SYS_tgkill, 1, 1, 0) };
            let kill = unsafe { libc::kill(1, 0) };
            [errno_of(own), errno_of(other), errno_of(kill as i64)]
        });
        assert_eq!(errs, [0, DENIED, DENIED]);
    }

    #[test]
    fn report_line_names_the_thread_and_the_call() {
        let mut name = [0u8; 16];
        name[..5].copy_from_slice(b"vcpu1");
        let who = Identity {
            kind: Some(ThreadKind::Vcpu),
            name,
            len: 5,
        };
        let mut out = LineBuf {
            buf: [0; 256],
            len: 0,
        };
        report_line(&who, libc::SYS_socket, format_args!("x"), &mut out);
        let line = std::str::from_utf8(&out.buf[..out.len]).unwrap();
        assert!(
            line.starts_with(
                "wbvmm: seccomp: the vCPU thread vcpu1 made a forbidden system call: socket (41);"
            ) && line.ends_with('\n'),
            "{line}"
        );
        let main = Identity {
            kind: Some(ThreadKind::Main),
            ..who
        };
        let mut out = LineBuf {
            buf: [0; 256],
            len: 0,
        };
        report_line(&main, 9999, format_args!("x"), &mut out);
        let line = std::str::from_utf8(&out.buf[..out.len]).unwrap();
        assert!(
            line.starts_with(
                "wbvmm: seccomp: the main thread made a forbidden system call: number 9999;"
            ),
            "{line}"
        );
    }

    #[test]
    fn names_come_from_the_kernel_table() {
        assert_eq!(syscall_name(0), Some("read"));
        assert_eq!(syscall_name(libc::SYS_openat), Some("openat"));
        assert_eq!(syscall_name(libc::SYS_ioctl), Some("ioctl"));
        assert_eq!(syscall_name(-1), None);
        assert_eq!(syscall_name(100_000), None);
    }

    #[test]
    fn modes_parse() {
        assert_eq!("kill".parse::<SeccompMode>().unwrap(), SeccompMode::Kill);
        assert_eq!("log".parse::<SeccompMode>().unwrap(), SeccompMode::Log);
        assert_eq!("off".parse::<SeccompMode>().unwrap(), SeccompMode::Off);
        assert!("trap".parse::<SeccompMode>().is_err());
        assert_eq!(SeccompMode::default(), SeccompMode::Kill);
    }
}

//! `--seccomp log`: forbidden calls reported by wbvmm itself and let through.
//!
//! Each filtered thread installs its filter with `SECCOMP_FILTER_FLAG_NEW_LISTENER`
//! and hands the listener to the supervisor, a thread started (unfiltered) before any
//! filter exists. A forbidden call waits in the kernel until the supervisor has
//! printed its line and answered `SECCOMP_USER_NOTIF_FLAG_CONTINUE`; the kernel then
//! runs it as if no filter were there. One listener per thread, so the listener
//! alone says which thread made the call.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Mutex, OnceLock};

use seccompiler::BpfProgram;
use vmm_sys_util::eventfd::EventFd;

use super::{report_line, Identity, LineBuf};

/// `BPF_RET | BPF_K`: return a constant.
const BPF_RET_K: u16 = 0x06;

/// Make every "log" answer of `program` a user notification instead.
pub(super) fn notify_instead_of_log(program: &mut BpfProgram) {
    for insn in program.iter_mut() {
        if insn.code == BPF_RET_K && insn.k == libc::SECCOMP_RET_LOG {
            insn.k = libc::SECCOMP_RET_USER_NOTIF;
        }
    }
}

struct Supervisor {
    /// Written when a listener is added, so the supervisor polls it too.
    wake: EventFd,
    listeners: Mutex<Vec<(OwnedFd, Identity)>>,
}

static SUPERVISOR: OnceLock<Supervisor> = OnceLock::new();

/// Start the supervisor thread (before any filter: it must stay unfiltered).
pub(super) fn start_supervisor() -> std::io::Result<()> {
    if SUPERVISOR.get().is_some() {
        return Ok(());
    }
    let sup = Supervisor {
        wake: EventFd::new(libc::EFD_NONBLOCK)?,
        listeners: Mutex::new(Vec::new()),
    };
    let _ = SUPERVISOR.set(sup);
    std::thread::Builder::new()
        .name("wbvmm-seccomp".into())
        .spawn(supervise)?;
    Ok(())
}

/// Install `program` on the calling thread, its forbidden calls reported by the
/// supervisor.
pub(super) fn apply_reported(who: Identity, program: &BpfProgram) -> std::io::Result<()> {
    let Some(sup) = SUPERVISOR.get() else {
        return Err(std::io::Error::other(
            "the --seccomp log supervisor is not running (seccomp::configure was not called)",
        ));
    };
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: plain prctl; seccomp copies the program we pass (seccompiler's
    // sock_filter has the kernel's layout, as libc's).
    let fd = unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            &prog as *const libc::sock_fprog,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    sup.listeners
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((fd, who));
    let _ = sup.wake.write(1);
    Ok(())
}

fn supervise() {
    let Some(sup) = SUPERVISOR.get() else { return };
    loop {
        let mut fds = vec![libc::pollfd {
            fd: sup.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let whos: Vec<Identity> = {
            let l = sup.listeners.lock().unwrap_or_else(|e| e.into_inner());
            fds.extend(l.iter().map(|(fd, _)| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }));
            l.iter().map(|(_, who)| *who).collect()
        };
        // SAFETY: fds is a live array of fds.len() pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            let _ = sup.wake.read();
        }
        let mut gone = Vec::new();
        for (p, who) in fds[1..].iter().zip(&whos) {
            if p.revents & libc::POLLIN != 0 {
                answer(p.fd, who);
            } else if p.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
                // Every thread under this filter has exited.
                gone.push(p.fd);
            }
        }
        if !gone.is_empty() {
            sup.listeners
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|(fd, _)| !gone.contains(&fd.as_raw_fd()));
        }
    }
}

/// Report the waiting call on `fd` and let it run.
fn answer(fd: i32, who: &Identity) {
    // SAFETY: both ioctls read or fill the structs we pass, of the sizes their
    // request numbers encode.
    unsafe {
        let mut req: libc::seccomp_notif = std::mem::zeroed();
        if libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_RECV, &mut req) != 0 {
            return; // The caller was interrupted or died meanwhile.
        }
        let mut line = LineBuf {
            buf: [0; 256],
            len: 0,
        };
        report_line(
            who,
            i64::from(req.data.nr),
            format_args!("let through (--seccomp log)"),
            &mut line,
        );
        libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len);
        let mut resp = libc::seccomp_notif_resp {
            id: req.id,
            val: 0,
            error: 0,
            flags: libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
        };
        libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_SEND, &mut resp);
    }
}

//! SIGINT, SIGTERM and SIGUSR1 as an event source of the I/O thread: blocked in
//! every thread (so none is interrupted by them) and read from a signalfd.
//! SIGINT/SIGTERM end the VM as the user quitting (the terminal is restored on the
//! way out); SIGUSR1 asks the main thread for a statistics snapshot.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc::Sender;

use vmm_sys_util::signal::create_sigset;

use super::{Flow, Wake};
use crate::vcpu::{ExitState, VmOutcome};

/// The signals the VM handles itself.
pub const VM_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1];

fn vm_sigset() -> std::io::Result<libc::sigset_t> {
    create_sigset(&VM_SIGNALS).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Block [`VM_SIGNALS`] in the calling thread, and so in every thread it spawns
/// afterwards: they stay pending until the I/O thread reads them. Call it before
/// any thread exists (the first thing `wbvmm` does before building a VM); a signal
/// that arrives during setup is then seen as soon as the VM runs.
pub fn block_vm_signals() -> std::io::Result<()> {
    let set = vm_sigset()?;
    // SAFETY: `set` is an initialised sigset; the old mask is not wanted.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(std::io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// A non-blocking signalfd for [`VM_SIGNALS`].
pub struct SignalFd(OwnedFd);

impl SignalFd {
    pub fn new() -> std::io::Result<Self> {
        let set = vm_sigset()?;
        // SAFETY: a new fd for an initialised sigset; the result is checked.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// The next pending signal, if any.
    fn read(&self) -> Option<libc::c_int> {
        // SAFETY: signalfd_siginfo is plain old data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let len = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `len` bytes into `info`.
        let n = unsafe { libc::read(self.0.as_raw_fd(), (&raw mut info).cast(), len) };
        (n == len as isize).then_some(info.ssi_signo as libc::c_int)
    }
}

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// The signal handler of the I/O loop: everything pending, in order.
pub fn on_signals(fd: &SignalFd, exit: &ExitState, wake: &Sender<Wake>) -> Flow {
    while let Some(signo) = fd.read() {
        match signo {
            libc::SIGUSR1 => {
                let _ = wake.send(Wake::Snapshot);
            }
            _ => {
                exit.finish(VmOutcome::UserQuit);
                let _ = wake.send(Wake::Ended);
            }
        }
    }
    Flow::Continue
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Block `VM_SIGNALS` in this test thread only, and raise `signo` at it:
    /// pending here, so only this thread's signalfd reads it.
    fn raise_here(signo: libc::c_int) {
        // SAFETY: thread-directed signal to this thread, which blocks it.
        let r = unsafe { libc::pthread_kill(libc::pthread_self(), signo) };
        assert_eq!(r, 0);
    }

    #[test]
    fn usr1_asks_for_a_snapshot_and_term_ends_the_vm() {
        block_vm_signals().unwrap();
        let fd = SignalFd::new().unwrap();
        let exit = ExitState::default();
        let (tx, rx) = std::sync::mpsc::channel();

        assert_eq!(on_signals(&fd, &exit, &tx), Flow::Continue);
        assert!(rx.try_recv().is_err(), "nothing pending, nothing sent");

        raise_here(libc::SIGUSR1);
        assert_eq!(on_signals(&fd, &exit, &tx), Flow::Continue);
        assert_eq!(rx.try_recv().ok(), Some(Wake::Snapshot));
        assert!(!exit.stopping(), "a snapshot does not stop the VM");

        raise_here(libc::SIGTERM);
        on_signals(&fd, &exit, &tx);
        assert_eq!(rx.try_recv().ok(), Some(Wake::Ended));
        assert!(exit.stopping());
        assert_eq!(exit.wait(&|| false, &|| false), Some(VmOutcome::UserQuit));
    }
}

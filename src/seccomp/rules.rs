//! What each thread may call once the guest runs: the allow-lists behind
//! [`super::install`].
//!
//! Drawn from the code and checked with `strace -f` and `--seccomp kill` over the
//! test suite's workloads (the test guest's serial, `net=rr`, floods, SIGUSR1
//! snapshots, `--stats` files, stdin input, taps; the small Linux guest). Setup
//! (opening /dev/kvm and the tap, creating the VM, its vCPUs, eventfds, the epoll
//! set, mapping guest RAM) happens before any filter is installed, so none of it is
//! here. Argument checks where a call's argument decides what it can do: `ioctl` by
//! request number (per thread), `mmap`/`mprotect` never with `PROT_EXEC` (no thread
//! can make new code), `madvise` only to give pages back, `tgkill` only inside this
//! process, `openat` (main thread only) with two exact flag sets. No thread may
//! create a socket, of any family: wbvmm needs none once the tap is open.

use std::collections::BTreeMap;

use seccompiler::{BackendError, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

use super::ThreadKind;

const KVMIO: u32 = 0xAE;

// The KVM request numbers, computed as kvm-ioctls does (its own are private).
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_bindings::kvm_regs);
ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_bindings::kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_bindings::kvm_sregs);
ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_bindings::kvm_sregs);
ioctl_iowr_nr!(KVM_TRANSLATE, KVMIO, 0x85, kvm_bindings::kvm_translation);
ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_bindings::kvm_interrupt);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_bindings::kvm_msrs);
ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_bindings::kvm_msrs);
ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_bindings::kvm_fpu);
ioctl_iow_nr!(KVM_SET_FPU, KVMIO, 0x8d, kvm_bindings::kvm_fpu);
ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_bindings::kvm_cpuid2);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_bindings::kvm_mp_state);
ioctl_iow_nr!(KVM_SET_MP_STATE, KVMIO, 0x99, kvm_bindings::kvm_mp_state);
ioctl_io_nr!(KVM_NMI, KVMIO, 0x9a);
ioctl_ior_nr!(
    KVM_GET_VCPU_EVENTS,
    KVMIO,
    0x9f,
    kvm_bindings::kvm_vcpu_events
);
ioctl_iow_nr!(
    KVM_SET_VCPU_EVENTS,
    KVMIO,
    0xa0,
    kvm_bindings::kvm_vcpu_events
);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_bindings::kvm_xsave);
ioctl_iow_nr!(KVM_SET_XSAVE, KVMIO, 0xa5, kvm_bindings::kvm_xsave);
ioctl_ior_nr!(KVM_GET_XSAVE2, KVMIO, 0xcf, kvm_bindings::kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_bindings::kvm_xcrs);
ioctl_iow_nr!(KVM_SET_XCRS, KVMIO, 0xa7, kvm_bindings::kvm_xcrs);
ioctl_iow_nr!(
    KVM_SET_SIGNAL_MASK,
    KVMIO,
    0x8b,
    kvm_bindings::kvm_signal_mask
);
ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    KVMIO,
    0x46,
    kvm_bindings::kvm_userspace_memory_region
);
ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION2,
    KVMIO,
    0x49,
    kvm_bindings::kvm_userspace_memory_region2
);
ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_bindings::kvm_irqfd);
ioctl_iow_nr!(KVM_IRQ_LINE, KVMIO, 0x61, kvm_bindings::kvm_irq_level);
ioctl_iow_nr!(
    KVM_SET_GUEST_DEBUG,
    KVMIO,
    0x9b,
    kvm_bindings::kvm_guest_debug
);
ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_bindings::kvm_ioeventfd);
ioctl_iow_nr!(
    KVM_REGISTER_COALESCED_MMIO,
    KVMIO,
    0x67,
    kvm_bindings::kvm_coalesced_mmio_zone
);
ioctl_iow_nr!(
    KVM_UNREGISTER_COALESCED_MMIO,
    KVMIO,
    0x68,
    kvm_bindings::kvm_coalesced_mmio_zone
);

/// One thread kind's rules, by system call number (an empty rule list: any arguments).
pub type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn arg(index: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, BackendError> {
    // Dword: these arguments are C ints (or ioctl's unsigned int request), whose upper
    // 32 bits the kernel ignores and a caller may leave unset.
    SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value)
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, BackendError> {
    SeccompRule::new(conditions)
}

/// `ioctl` with one of `requests`; `fd` restricts the first argument too.
fn ioctls(requests: &[u64], fd: Option<u64>) -> Result<Vec<SeccompRule>, BackendError> {
    requests
        .iter()
        .map(|&r| {
            let mut c = vec![arg(1, SeccompCmpOp::Eq, r)?];
            if let Some(fd) = fd {
                c.push(arg(0, SeccompCmpOp::Eq, fd)?);
            }
            rule(c)
        })
        .collect()
}

/// Calls any wbvmm thread makes while the guest runs: memory allocation, locks,
/// clocks, signals (the vCPU kick and its return), thread exit, and what the SIGSYS
/// report itself needs (`write`, restoring the terminal, `exit_group`).
fn common(pid: u32) -> Result<Rules, BackendError> {
    let no_exec = || {
        rule(vec![arg(
            2,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )?])
    };
    let mut r = Rules::new();
    for nr in [
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_close,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_restart_syscall,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_brk,
        libc::SYS_getrandom,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ] {
        r.insert(nr, vec![]);
    }
    r.insert(libc::SYS_mmap, vec![no_exec()?]);
    r.insert(libc::SYS_mprotect, vec![no_exec()?]);
    // glibc's free and thread exit give memory back; nothing else is advised.
    r.insert(
        libc::SYS_madvise,
        vec![rule(vec![arg(
            2,
            SeccompCmpOp::Eq,
            libc::MADV_DONTNEED as u64,
        )?])?],
    );
    // Kicks between wbvmm's own threads; no other process can be signalled.
    r.insert(
        libc::SYS_tgkill,
        vec![rule(vec![arg(0, SeccompCmpOp::Eq, u64::from(pid))?])?],
    );
    // The terminal's settings put back (stdin only): by the main thread at the end, by
    // the SIGSYS report on any thread.
    r.insert(
        libc::SYS_ioctl,
        ioctls(&[libc::TCSETS, libc::TCGETS], Some(0))?,
    );
    Ok(r)
}

/// The rules for `kind` in process `pid`.
pub fn rules(kind: ThreadKind, pid: u32) -> Result<Rules, BackendError> {
    let mut r = common(pid)?;
    let add_ioctls = |r: &mut Rules, requests: &[u64]| -> Result<(), BackendError> {
        let extra = ioctls(requests, None)?;
        r.entry(libc::SYS_ioctl).or_default().extend(extra);
        Ok(())
    };
    match kind {
        ThreadKind::Vcpu => {
            // The tap's TX frames: in C mode a TSD write transmits on the exit path.
            r.insert(libc::SYS_writev, vec![]);
            // Which learnt TSD doorbells fired, before a register access (src/net/doorbell.rs).
            r.insert(libc::SYS_poll, vec![]);
            r.insert(libc::SYS_ppoll, vec![]);
            // KVM_RUN and what the exit path and the emulation fallback
            // (src/emulate/kvm.rs) read and write; KVM_IOEVENTFD because the C-mode
            // TSD doorbells are learnt (and the C+ doorbell follows BAR moves) on
            // exits.
            add_ioctls(
                &mut r,
                &[
                    KVM_RUN(),
                    KVM_GET_REGS(),
                    KVM_SET_REGS(),
                    KVM_GET_SREGS(),
                    KVM_SET_SREGS(),
                    KVM_GET_FPU(),
                    KVM_SET_FPU(),
                    KVM_GET_XSAVE(),
                    KVM_GET_XSAVE2(),
                    KVM_SET_XSAVE(),
                    KVM_GET_XCRS(),
                    KVM_SET_XCRS(),
                    KVM_GET_MSRS(),
                    KVM_SET_MSRS(),
                    KVM_GET_VCPU_EVENTS(),
                    KVM_SET_VCPU_EVENTS(),
                    KVM_GET_MP_STATE(),
                    KVM_SET_MP_STATE(),
                    KVM_INTERRUPT(),
                    KVM_NMI(),
                    KVM_TRANSLATE(),
                    KVM_GET_CPUID2(),
                    KVM_SET_SIGNAL_MASK(),
                    KVM_IOEVENTFD(),
                    // The NIC's posted-write zone follows BAR moves and mode switches
                    // (src/net/posted.rs), which vCPUs make.
                    KVM_REGISTER_COALESCED_MMIO(),
                    KVM_UNREGISTER_COALESCED_MMIO(),
                    // The NIC's level line follows its register writes (src/irq.rs).
                    KVM_IRQ_LINE(),
                    // --gdb: int3 and single-step exits, set by the vCPU itself.
                    KVM_SET_GUEST_DEBUG(),
                ],
            )?;
        }
        ThreadKind::Io => {
            for nr in [
                libc::SYS_epoll_wait,
                libc::SYS_epoll_pwait,
                libc::SYS_epoll_pwait2,
                libc::SYS_epoll_ctl,
                // The tap's frames.
                libc::SYS_readv,
                libc::SYS_writev,
                // Which learnt TSD doorbells fired (src/net/doorbell.rs).
                libc::SYS_poll,
                libc::SYS_ppoll,
                // Event sources of an event loop: timers (read through `read`, like
                // signalfd and eventfd).
                libc::SYS_timerfd_settime,
                libc::SYS_timerfd_gettime,
            ] {
                r.insert(nr, vec![]);
            }
            // The C+ doorbell follows BAR moves and C-mode doorbells are re-armed here.
            // KVM_IRQ_LINE: the NIC's level line follows the frames it receives, and is
            // set again at an EOI (resample) while the device asserts it.
            add_ioctls(&mut r, &[KVM_IOEVENTFD(), KVM_IRQ_LINE()])?;
        }
        ThreadKind::Gdb => {
            // The debugger's connection on the socket bound before the filters (one
            // at a time, accepted again after a detach); the vCPUs' stop events
            // through an eventfd (`read`); KVM is only touched by the vCPU threads.
            // std reads and writes sockets with recvfrom/sendto.
            for nr in [
                libc::SYS_accept4,
                libc::SYS_poll,
                libc::SYS_ppoll,
                libc::SYS_recvfrom,
                libc::SYS_sendto,
            ] {
                r.insert(nr, vec![]);
            }
        }
        ThreadKind::Main => {
            for nr in [
                // --stats=PATH: statx/readlink for the symlink check, the write to
                // PATH.tmp, the rename over PATH, the unlink of a failed PATH.tmp;
                // /proc/self/status for the resident-memory figure.
                libc::SYS_statx,
                libc::SYS_newfstatat,
                libc::SYS_fstat,
                libc::SYS_lseek,
                libc::SYS_readlink,
                libc::SYS_readlinkat,
                libc::SYS_getcwd,
                libc::SYS_rename,
                libc::SYS_renameat,
                libc::SYS_renameat2,
                libc::SYS_unlink,
                libc::SYS_unlinkat,
                libc::SYS_writev,
                // KVM's binary statistics (KVM_GET_STATS_FD files, opened at setup).
                libc::SYS_pread64,
                // Resident guest RAM, taken out of the RSS figure.
                libc::SYS_mincore,
            ] {
                r.insert(nr, vec![]);
            }
            let flags = |f: i32| rule(vec![arg(2, SeccompCmpOp::Eq, f as u64)?]);
            r.insert(
                libc::SYS_openat,
                vec![
                    flags(libc::O_RDONLY | libc::O_CLOEXEC)?,
                    flags(libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC)?,
                ],
            );
            // Memslots: deleted at teardown, added and removed by the host while the
            // guest runs (tests, soak); ioeventfds and irqfds let go at teardown.
            add_ioctls(
                &mut r,
                &[
                    KVM_SET_USER_MEMORY_REGION(),
                    KVM_SET_USER_MEMORY_REGION2(),
                    KVM_IOEVENTFD(),
                    KVM_IRQFD(),
                    // The posted-write zone comes back after the shadow's removal.
                    KVM_REGISTER_COALESCED_MMIO(),
                    KVM_UNREGISTER_COALESCED_MMIO(),
                ],
            )?;
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_match_the_kernel_headers() {
        // Values from linux/kvm.h as compiled (gcc -E) on Debian 12.
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(KVM_SET_SREGS(), 0x4138_ae84);
        assert_eq!(KVM_IOEVENTFD(), 0x4040_ae79);
        assert_eq!(KVM_REGISTER_COALESCED_MMIO(), 0x4010_ae67);
        assert_eq!(KVM_UNREGISTER_COALESCED_MMIO(), 0x4010_ae68);
        assert_eq!(KVM_IRQ_LINE(), 0x4008_ae61);
        assert_eq!(KVM_SET_USER_MEMORY_REGION(), 0x4020_ae46);
        assert_eq!(KVM_GET_XSAVE(), 0x9000_aea4);
    }

    #[test]
    fn no_thread_may_create_sockets_exec_or_fork() {
        for kind in [
            ThreadKind::Main,
            ThreadKind::Vcpu,
            ThreadKind::Io,
            ThreadKind::Gdb,
        ] {
            let r = rules(kind, 1).unwrap();
            for nr in [
                libc::SYS_socket,
                libc::SYS_socketpair,
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_ptrace,
                libc::SYS_process_vm_writev,
            ] {
                assert!(!r.contains_key(&nr), "{kind} may call {nr}");
            }
            // Only the main thread opens files, and never for both reading and writing.
            assert_eq!(r.contains_key(&libc::SYS_openat), kind == ThreadKind::Main);
            assert!(!r.contains_key(&libc::SYS_open));
        }
    }
}

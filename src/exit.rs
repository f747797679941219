//! How the `wbvmm` command reports its end: an error with its causes, and the exit
//! status.

use std::error::Error;
use std::fmt::Write;

use crate::vcpu::{VmOutcome, EXIT_VMM_ERROR};

/// An error and its causes (`Error::source()`, outermost first), each once:
///
/// ```text
/// tap wbt0 is busy: another process holds it open; stop that process or pick another tap
///   caused by: Device or resource busy (os error 16)
/// ```
///
/// Errors transparent to their cause (`#[error(transparent)]`) show up once, as that
/// cause. A cause whose text the lines above already contain (an error that both
/// prints and returns its source, as some outside this crate do) is not repeated, but
/// its own causes are still followed.
pub fn error_chain(e: &dyn Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !out.contains(&text) {
            let _ = write!(out, "\n  caused by: {text}");
        }
        cause = c.source();
    }
    out
}

/// The exit status once the VM has ended: the guest's (see [`VmOutcome::exit_code`]),
/// or [`EXIT_VMM_ERROR`] when there is no outcome, or when the statistics asked for
/// could not be written and the guest's own status was 0 (a guest's non-zero status
/// says more, and is kept).
pub fn exit_status(outcome: Option<&VmOutcome>, stats_written: bool) -> u8 {
    let code = match outcome {
        Some(o) => o.exit_code(),
        None => EXIT_VMM_ERROR,
    };
    if code == 0 && !stats_written {
        EXIT_VMM_ERROR as u8
    } else {
        code as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vcpu::EXIT_TRIPLE_FAULT;

    #[derive(Debug, thiserror::Error)]
    #[error("outer says {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn causes_are_listed_once_in_order() {
        let io = std::io::Error::from_raw_os_error(libc::EBUSY);
        let e = crate::vmm::VmmError::Io {
            what: "the thing",
            source: io,
        };
        assert_eq!(
            error_chain(&e),
            "cannot set up the thing\n  caused by: Device or resource busy (os error 16)"
        );
        // No source: the message alone.
        let e = crate::vmm::VmmError::from(crate::kvm::KvmError::MissingCap("KVM_CAP_X"));
        assert_eq!(error_chain(&e), e.to_string());
    }

    #[test]
    fn a_cause_already_printed_is_not_repeated() {
        let e = Repeats(std::io::Error::from_raw_os_error(libc::ENOENT));
        let chain = error_chain(&e);
        assert_eq!(chain.matches("os error 2").count(), 1, "{chain}");
        assert!(!chain.contains("caused by"), "{chain}");
    }

    /// A real tap-open failure, wrapped as `wbvmm --net` wraps it.
    #[test]
    fn missing_tap_shows_its_errno_once() {
        let e = wbvmm_devices::net::tap::Tap::open(
            "wbvmm-nosuch0",
            wbvmm_devices::net::tap::TapOptions::default(),
        )
        .unwrap_err();
        let e = crate::vmm::VmmError::from(crate::net::NetError::from(e));
        let chain = error_chain(&e);
        let mut lines = chain.lines();
        let first = lines.next().unwrap();
        assert!(
            first.starts_with("tap wbvmm-nosuch0 does not exist"),
            "{chain}"
        );
        assert!(
            first.contains("ip tuntap add wbvmm-nosuch0 mode tap"),
            "{chain}"
        );
        assert_eq!(
            lines.collect::<Vec<_>>(),
            ["  caused by: No such device (os error 19)"],
            "{chain}"
        );
    }

    /// Every source-carrying error of wbvmm and its devices: the errno once.
    #[test]
    fn wrapped_os_errors_appear_once() {
        use crate::io_thread::IoThreadError;
        use crate::kvm::KvmError;
        use crate::legacy::LegacyError;
        use crate::net::NetError;
        use crate::vmm::VmmError;
        use wbvmm_devices::net::rtl8139::Rtl8139Error;
        use wbvmm_devices::net::tap::TapError;
        let os = || std::io::Error::from_raw_os_error(libc::EMFILE);
        let name = || "wbt0".to_string();
        let errors: Vec<VmmError> = vec![
            NetError::Irq(os()).into(),
            NetError::Nic(Rtl8139Error::EventFd(os())).into(),
            NetError::Tap(TapError::OpenTun {
                name: name(),
                source: os(),
            })
            .into(),
            NetError::Tap(TapError::Busy {
                name: name(),
                source: os(),
            })
            .into(),
            NetError::Tap(TapError::Permission {
                name: name(),
                source: os(),
            })
            .into(),
            NetError::Tap(TapError::NotATap {
                name: name(),
                source: os(),
            })
            .into(),
            NetError::Tap(TapError::Io {
                name: name(),
                source: os(),
            })
            .into(),
            KvmError::Open(os().into()).into(),
            KvmError::Ioctl {
                what: "do it",
                source: os().into(),
            }
            .into(),
            LegacyError::SerialFile {
                path: "/x".into(),
                source: os(),
            }
            .into(),
            IoThreadError::Setup {
                what: "epoll",
                source: os(),
            }
            .into(),
            VmmError::Affinity(crate::affinity::AffinityError::Apply {
                thread: "vcpu0".into(),
                cpus: vec![1],
                source: os(),
            }),
            VmmError::Memory(crate::memory::MemoryError::Mmap {
                gpa: 0,
                size: 0x1000,
                source: os(),
            }),
        ];
        for e in errors {
            let chain = error_chain(&e);
            assert_eq!(
                chain.matches("Too many open files (os error 24)").count(),
                1,
                "{chain}"
            );
            assert!(chain.contains("\n  caused by: "), "{chain}");
        }
    }

    #[test]
    fn exit_status_keeps_the_guests_and_reports_lost_stats() {
        use VmOutcome::*;
        assert_eq!(exit_status(Some(&DebugExit(0)), true), 0);
        assert_eq!(exit_status(Some(&DebugExit(0)), false), 1);
        assert_eq!(exit_status(Some(&Reset), false), 1);
        assert_eq!(exit_status(Some(&DebugExit(7)), true), 7);
        assert_eq!(exit_status(Some(&DebugExit(7)), false), 7);
        let tf = TripleFault { vcpu: 0, rip: 0 };
        assert_eq!(exit_status(Some(&tf), false), EXIT_TRIPLE_FAULT as u8);
        assert_eq!(exit_status(None, true), 1);
    }
}

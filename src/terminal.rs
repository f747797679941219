//! The host terminal: raw mode while the guest owns the console, restored on every
//! exit path (the guard restores on drop, including unwinding).

use std::os::fd::RawFd;

pub struct RawModeGuard {
    fd: RawFd,
    saved: libc::termios,
}

impl RawModeGuard {
    /// Put `fd` in raw mode if it is a terminal; `None` when it is not.
    pub fn enter(fd: RawFd) -> Option<Self> {
        // SAFETY: isatty/tcgetattr/tcsetattr only read or write the termios struct we own.
        unsafe {
            if libc::isatty(fd) != 1 {
                return None;
            }
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(fd, &mut saved) != 0 {
                return None;
            }
            let mut raw = saved;
            // Keys go to the guest (Ctrl-C included); output post-processing stays on
            // so a guest's bare "\n" still returns the carriage.
            raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN);
            raw.c_iflag &= !(libc::IXON | libc::ICRNL | libc::INLCR | libc::BRKINT);
            raw.c_cc[libc::VMIN] = 1;
            raw.c_cc[libc::VTIME] = 0;
            if libc::tcsetattr(fd, libc::TCSANOW, &raw) != 0 {
                return None;
            }
            Some(Self { fd, saved })
        }
    }
}

impl Drop for RawModeGuard {
    fn drop(&mut self) {
        // SAFETY: restores the termios saved in `enter` on the same fd.
        unsafe {
            libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved);
        }
    }
}

/// The console escape: Ctrl-A x quits, Ctrl-A Ctrl-A sends one Ctrl-A.
#[derive(Default)]
pub struct EscapeParser {
    after_ctrl_a: bool,
}

pub const CTRL_A: u8 = 0x01;

pub enum Input {
    /// Bytes for the guest.
    Forward(Vec<u8>),
    /// The user asked to quit; bytes before the escape are still forwarded.
    Quit(Vec<u8>),
}

impl EscapeParser {
    pub fn feed(&mut self, bytes: &[u8]) -> Input {
        let mut out = Vec::with_capacity(bytes.len());
        for &b in bytes {
            if self.after_ctrl_a {
                self.after_ctrl_a = false;
                match b {
                    b'x' | b'X' => return Input::Quit(out),
                    CTRL_A => out.push(CTRL_A),
                    other => {
                        out.push(CTRL_A);
                        out.push(other);
                    }
                }
            } else if b == CTRL_A {
                self.after_ctrl_a = true;
            } else {
                out.push(b);
            }
        }
        Input::Forward(out)
    }
}

/// Console output straight to a file descriptor, unbuffered: the guest writes a
/// byte per exit anyway, and a prompt without a newline must show at once.
pub struct FdWriter(pub RawFd);

impl std::io::Write for FdWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // SAFETY: writes from a valid buffer to a descriptor we hold open.
        let n = unsafe { libc::write(self.0, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences() {
        let mut p = EscapeParser::default();
        assert!(matches!(p.feed(b"ab"), Input::Forward(v) if v == b"ab"));
        assert!(matches!(p.feed(&[b'c', CTRL_A]), Input::Forward(v) if v == b"c"));
        assert!(matches!(p.feed(b"x"), Input::Quit(v) if v.is_empty()));
        let mut p = EscapeParser::default();
        assert!(
            matches!(p.feed(&[CTRL_A, CTRL_A, b'z']), Input::Forward(v) if v == [CTRL_A, b'z'])
        );
        assert!(matches!(p.feed(&[CTRL_A, b'q']), Input::Forward(v) if v == [CTRL_A, b'q']));
        assert!(matches!(p.feed(&[b'1', CTRL_A, b'X', b'2']), Input::Quit(v) if v == b"1"));
    }
}

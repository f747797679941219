//! The console's two event sources: host input (stdin, with the Ctrl-A x escape)
//! into COM1, and COM1's "receive FIFO drained" event, which lets more queued input
//! in.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;
use wbvmm_devices::legacy::SerialDevice;

use super::{Flow, Token, Wake, Watcher};
use crate::terminal::{EscapeParser, Input};
use crate::vcpu::{ExitState, VmOutcome};

pub struct Console {
    serial: Arc<SerialDevice>,
    rx_space: Arc<EventFd>,
    /// Host input (stdin for `--serial stdio`), while it is open.
    input: Option<RawFd>,
    esc: EscapeParser,
    buf: [u8; 1024],
}

impl Console {
    pub fn new(serial: Arc<SerialDevice>, rx_space: Arc<EventFd>, input: Option<RawFd>) -> Self {
        Self {
            serial,
            rx_space,
            input,
            esc: EscapeParser::default(),
            buf: [0; 1024],
        }
    }

    pub fn watch(&mut self, w: &Watcher) -> std::io::Result<()> {
        w.add(self.rx_space.as_raw_fd(), Token::SerialSpace)?;
        let Some(fd) = self.input else {
            return Ok(());
        };
        match w.add(fd, Token::Stdin) {
            Ok(()) => Ok(()),
            // A regular file cannot be polled: hand its whole content over now.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                while let Some(n) = self.read_input(fd).filter(|&n| n > 0) {
                    self.serial.queue_input(&self.buf[..n]);
                }
                self.input = None;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// `Some(0)` at end of input, None on an error (EINTR included).
    fn read_input(&mut self, fd: RawFd) -> Option<usize> {
        // SAFETY: reads into our own buffer, at most its length.
        let r = unsafe { libc::read(fd, self.buf.as_mut_ptr().cast(), self.buf.len()) };
        usize::try_from(r).ok()
    }

    /// Host input: to the guest, or Ctrl-A x: end the VM and this loop.
    pub fn on_input(&mut self, w: &Watcher, exit: &ExitState, wake: &Sender<Wake>) -> Flow {
        let Some(fd) = self.input else {
            return Flow::Continue;
        };
        let n = match self.read_input(fd) {
            Some(0) => {
                // EOF: stop watching; the guest keeps running.
                w.remove(fd);
                self.input = None;
                return Flow::Continue;
            }
            Some(n) => n,
            None => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted
                    && e.kind() != std::io::ErrorKind::WouldBlock
                {
                    w.remove(fd);
                    self.input = None;
                }
                return Flow::Continue;
            }
        };
        match self.esc.feed(&self.buf[..n]) {
            Input::Forward(b) => {
                self.serial.queue_input(&b);
                Flow::Continue
            }
            Input::Quit(b) => {
                self.serial.queue_input(&b);
                exit.finish(VmOutcome::UserQuit);
                let _ = wake.send(Wake::Ended);
                Flow::Stop
            }
        }
    }

    /// The guest drained the receive FIFO: push in what is still queued.
    pub fn on_rx_space(&self) -> Flow {
        let _ = self.rx_space.read();
        self.serial.flush_input();
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{received, Fixture};
    use super::*;
    use crate::terminal::CTRL_A;

    #[test]
    fn input_reaches_the_uart_and_eof_stops_watching() {
        let mut f = Fixture::new();
        f.write_input(b"hi");
        assert!(f.turn().contains(&Token::Stdin));
        assert_eq!(received(&f.serial), b"hi");
        f.close_input();
        assert!(f.turn().contains(&Token::Stdin));
        // Unwatched now: a closed pipe would otherwise be reported on every wait.
        assert!(!f.turn_now().contains(&Token::Stdin));
        assert!(!f.exit.stopping(), "the guest keeps running without input");
    }

    #[test]
    fn ctrl_a_x_ends_the_vm_and_the_loop() {
        let mut f = Fixture::new();
        f.write_input(&[b'a', CTRL_A, b'x']);
        assert_eq!(f.turn_flow(), Flow::Stop);
        assert_eq!(received(&f.serial), b"a");
        assert_eq!(f.exit.wait(&|| false, &|| false), Some(VmOutcome::UserQuit));
        assert_eq!(f.wake_rx.try_recv().ok(), Some(Wake::Ended));
    }

    #[test]
    fn a_drained_fifo_lets_queued_input_in() {
        let mut f = Fixture::new();
        // More than the UART's 64-byte FIFO: the rest waits in the device's queue.
        let input: Vec<u8> = (0..100u8).map(|i| b'0' + i % 10).collect();
        f.serial.queue_input(&input);
        let first = received(&f.serial);
        assert_eq!(first.len(), 64);
        // The guest emptied the FIFO: the device signalled space.
        assert!(f.turn().contains(&Token::SerialSpace));
        let rest = received(&f.serial);
        assert_eq!([first, rest].concat(), input);
    }
}

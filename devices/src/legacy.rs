//! Legacy PC devices: the 8250 UART (through vm-superio), the i8042 reset line, and
//! the debug-exit port.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::serial::SerialEvents;
use vm_superio::{I8042Device, Serial, Trigger};

use crate::bus::BusDevice;
use crate::irq::IrqLine;

/// What a legacy device asks of the VMM when the guest ends itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestExitRequest {
    /// A value written to the debug-exit port.
    DebugExit(u32),
    /// The i8042 reset line was pulsed (0xFE written to port 0x64).
    Reset,
}

/// Where guest exit requests go. The VMM stops its vCPUs on the first one.
pub trait ExitSink: Send + Sync {
    fn request_exit(&self, request: GuestExitRequest);
}

/// Adapts an [`IrqLine`] to vm-superio's `Trigger`.
pub struct IrqTrigger(pub Arc<dyn IrqLine>);

impl Trigger for IrqTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.trigger();
        Ok(())
    }
}

/// Tells the input side that the guest drained the UART's receive FIFO, so queued
/// host input can be pushed in.
pub struct RxSpaceNotify(pub Arc<dyn Fn() + Send + Sync>);

impl SerialEvents for RxSpaceNotify {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        (self.0)();
    }
}

type Uart = Serial<IrqTrigger, RxSpaceNotify, Box<dyn Write + Send>>;

struct SerialInner {
    uart: Uart,
    /// Host input not yet accepted by the 64-byte FIFO. Bounded: beyond
    /// `MAX_PENDING_INPUT` bytes, input is dropped (and counted) rather than queued
    /// without limit while the guest is not reading.
    pending: VecDeque<u8>,
    dropped_input: u64,
}

/// COM1: an 8250 UART on eight consecutive I/O ports.
pub struct SerialDevice {
    inner: Mutex<SerialInner>,
}

const MAX_PENDING_INPUT: usize = 64 * 1024;

impl SerialDevice {
    /// `irq` is pulsed when the UART raises its interrupt; `on_rx_space` runs when the
    /// guest empties the receive FIFO.
    pub fn new(
        irq: Arc<dyn IrqLine>,
        out: Box<dyn Write + Send>,
        on_rx_space: Arc<dyn Fn() + Send + Sync>,
    ) -> Self {
        Self {
            inner: Mutex::new(SerialInner {
                uart: Serial::with_events(IrqTrigger(irq), RxSpaceNotify(on_rx_space), out),
                pending: VecDeque::new(),
                dropped_input: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SerialInner> {
        // A panic while holding the lock cannot leave the UART state torn in a way
        // that matters more than losing the console, so recover the guard.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue host input for the guest; moves as much as fits into the FIFO now.
    pub fn queue_input(&self, bytes: &[u8]) {
        let mut s = self.lock();
        for &b in bytes {
            if s.pending.len() >= MAX_PENDING_INPUT {
                s.dropped_input += 1;
            } else {
                s.pending.push_back(b);
            }
        }
        Self::flush_locked(&mut s);
    }

    /// Move queued input into the FIFO (call when the guest drained it).
    pub fn flush_input(&self) {
        let mut s = self.lock();
        Self::flush_locked(&mut s);
    }

    fn flush_locked(s: &mut SerialInner) {
        while !s.pending.is_empty() {
            let room = s.uart.fifo_capacity();
            if room == 0 {
                break;
            }
            let n = room.min(s.pending.len());
            let chunk: Vec<u8> = s.pending.drain(..n).collect();
            if s.uart.enqueue_raw_bytes(&chunk).is_err() {
                break;
            }
        }
    }

    pub fn dropped_input(&self) -> u64 {
        self.lock().dropped_input
    }

    /// Flush the console output stream.
    pub fn flush_output(&self) {
        let _ = self.lock().uart.writer_mut().flush();
    }
}

impl BusDevice for SerialDevice {
    fn name(&self) -> &'static str {
        "com1"
    }
    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
        let mut s = self.lock();
        for (i, b) in data.iter_mut().enumerate() {
            *b = s.uart.read((offset as u8).wrapping_add(i as u8));
        }
    }

    fn write(&self, _base: u64, offset: u64, data: &[u8]) {
        let mut s = self.lock();
        for (i, &b) in data.iter().enumerate() {
            // The trigger is infallible; a write error of the output stream (a closed
            // pipe) must not stop the guest.
            let _ = s.uart.write((offset as u8).wrapping_add(i as u8), b);
        }
    }
}

/// A Trigger that forwards the i8042 reset to the VMM.
pub struct ResetTrigger(pub Arc<dyn ExitSink>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request_exit(GuestExitRequest::Reset);
        Ok(())
    }
}

/// The i8042 controller, only as far as `reboot=k` needs it: mapped at ports 0x60-0x64.
pub struct I8042 {
    inner: Mutex<I8042Device<ResetTrigger>>,
}

impl I8042 {
    pub fn new(sink: Arc<dyn ExitSink>) -> Self {
        Self {
            inner: Mutex::new(I8042Device::new(ResetTrigger(sink))),
        }
    }
}

impl BusDevice for I8042 {
    fn name(&self) -> &'static str {
        "i8042"
    }
    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
        let mut d = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for b in data.iter_mut() {
            *b = d.read(offset as u8);
        }
    }
    fn write(&self, _base: u64, offset: u64, data: &[u8]) {
        let mut d = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for &b in data {
            let _ = d.write(offset as u8, b);
        }
    }
}

/// The debug-exit port (QEMU's isa-debug-exit is usually placed at 0xf4): the value
/// the guest writes becomes the VMM's exit status.
pub struct DebugExit {
    sink: Arc<dyn ExitSink>,
}

impl DebugExit {
    pub fn new(sink: Arc<dyn ExitSink>) -> Self {
        Self { sink }
    }
}

impl BusDevice for DebugExit {
    fn name(&self) -> &'static str {
        "debug-exit"
    }
    fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&self, _base: u64, offset: u64, data: &[u8]) {
        if offset != 0 {
            return;
        }
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        self.sink
            .request_exit(GuestExitRequest::DebugExit(u32::from_le_bytes(v)));
    }
}

/// Ports the guest pokes that need no behaviour (POST code 0x80, ...): writes are
/// dropped, reads return `read_value`.
pub struct IgnoredPort {
    pub read_value: u8,
}

impl BusDevice for IgnoredPort {
    fn name(&self) -> &'static str {
        "ignored-port"
    }
    fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(self.read_value);
    }
    fn write(&self, _base: u64, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::RecordingIrq;
    use std::sync::atomic::Ordering;

    #[derive(Default)]
    struct Sink(Mutex<Vec<GuestExitRequest>>);
    impl ExitSink for Sink {
        fn request_exit(&self, r: GuestExitRequest) {
            self.0.lock().unwrap().push(r);
        }
    }

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_output_and_input() {
        let irq = Arc::new(RecordingIrq::default());
        let out = SharedBuf::default();
        let s = SerialDevice::new(irq.clone(), Box::new(out.clone()), Arc::new(|| {}));
        for &b in b"hi" {
            s.write(0x3f8, 0, &[b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
        // Input larger than the FIFO: the rest waits in `pending` until drained.
        let input = vec![b'x'; 100];
        s.queue_input(&input);
        let mut got = 0;
        let mut lsr = [0u8];
        let mut byte = [0u8];
        for _ in 0..200 {
            s.read(0x3f8, 5, &mut lsr);
            if lsr[0] & 1 == 0 {
                s.flush_input();
                s.read(0x3f8, 5, &mut lsr);
                if lsr[0] & 1 == 0 {
                    break;
                }
            }
            s.read(0x3f8, 0, &mut byte);
            assert_eq!(byte[0], b'x');
            got += 1;
        }
        assert_eq!(got, 100);
        // Enabling the RX interrupt and queueing input raises the IRQ.
        s.write(0x3f8, 1, &[1]);
        let before = irq.pulses.load(Ordering::SeqCst);
        s.queue_input(b"z");
        assert!(irq.pulses.load(Ordering::SeqCst) > before);
    }

    #[test]
    fn i8042_reset_and_debug_exit() {
        let sink = Arc::new(Sink::default());
        let k = I8042::new(sink.clone());
        k.write(0x60, 4, &[0x00]);
        assert!(sink.0.lock().unwrap().is_empty());
        k.write(0x60, 4, &[0xfe]);
        let d = DebugExit::new(sink.clone());
        d.write(0xf4, 0, &[7, 0, 0, 0]);
        d.write(0xf4, 0, &[9]);
        assert_eq!(
            *sink.0.lock().unwrap(),
            vec![
                GuestExitRequest::Reset,
                GuestExitRequest::DebugExit(7),
                GuestExitRequest::DebugExit(9)
            ]
        );
    }
}

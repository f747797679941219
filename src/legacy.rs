//! The legacy PC devices on the port bus: COM1 (with its console output, IRQ 4 and
//! KVM's coalesced ring for its transmit register), the i8042 reset line, the
//! debug-exit port and the POST-code port. The device models are
//! `wbvmm_devices::legacy`; this file places and wires them.

use std::path::PathBuf;
use std::sync::Arc;

use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;
use wbvmm_devices::legacy::{DebugExit, ExitSink, IgnoredPort, SerialDevice, I8042};
use wbvmm_devices::{Bus, BusError, IrqLine};

use crate::coalesced::CoalescedRing;
use crate::config::SerialMode;
use crate::irq::{IrqError, IrqFdLine};
use crate::terminal::FdWriter;

pub const COM1_BASE: u64 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_BASE: u64 = 0x60;
pub const DEBUG_EXIT_PORT: u64 = 0xf4;
/// POST codes and Linux's io_delay.
pub const POST_PORT: u64 = 0x80;

#[derive(Debug, Error)]
pub enum LegacyError {
    #[error("cannot open serial output file {path}")]
    SerialFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the serial input eventfd; raise the open-file limit (ulimit -n)")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Irq(#[from] IrqError),
    #[error("cannot place a legacy device on the I/O port bus")]
    Bus(#[from] BusError),
}

/// COM1 as the rest of the VMM holds it.
pub struct Com1 {
    pub serial: Arc<SerialDevice>,
    /// Written when the guest drains the receive FIFO: the I/O thread pushes more
    /// queued input.
    pub rx_space: Arc<EventFd>,
    pub irq: Arc<IrqFdLine>,
}

/// Build COM1 and place every legacy device on `pio`; guest exit requests (debug
/// exit, i8042 reset) go to `exit`.
pub fn add_legacy_devices(
    vm: &VmFd,
    pio: &Bus,
    exit: Arc<dyn ExitSink>,
    serial: &SerialMode,
) -> Result<Com1, LegacyError> {
    let rx_space = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(LegacyError::EventFd)?);
    let irq = Arc::new(IrqFdLine::new(vm, COM1_IRQ)?);
    let com1 = Arc::new(com1(irq.clone(), serial_output(serial)?, rx_space.clone()));
    place(pio, com1.clone(), exit)?;
    Ok(Com1 {
        serial: com1,
        rx_space,
        irq,
    })
}

fn com1(
    irq: Arc<dyn IrqLine>,
    out: Box<dyn std::io::Write + Send>,
    rx_space: Arc<EventFd>,
) -> SerialDevice {
    SerialDevice::new(
        irq,
        out,
        Arc::new(move || {
            let _ = rx_space.write(1);
        }),
    )
}

fn serial_output(mode: &SerialMode) -> Result<Box<dyn std::io::Write + Send>, LegacyError> {
    Ok(match mode {
        SerialMode::Stdio => Box::new(FdWriter(libc::STDOUT_FILENO)),
        SerialMode::Null => Box::new(std::io::sink()),
        SerialMode::File(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| LegacyError::SerialFile {
                    path: p.clone(),
                    source,
                })?,
        ),
    })
}

fn place(pio: &Bus, com1: Arc<SerialDevice>, exit: Arc<dyn ExitSink>) -> Result<(), BusError> {
    pio.insert(com1, COM1_BASE, 8)?;
    pio.insert(Arc::new(I8042::new(exit.clone())), I8042_BASE, 5)?;
    pio.insert(Arc::new(DebugExit::new(exit)), DEBUG_EXIT_PORT, 4)?;
    // POST codes and io_delay: no behaviour, and not worth a log line each.
    pio.insert(Arc::new(IgnoredPort { read_value: 0xff }), POST_PORT, 1)
}

/// The UART's transmit register needs no answer: let KVM queue those writes instead
/// of exiting for each byte (replayed in order before the next exit, and by the I/O
/// thread every few ms). None where the host lacks coalesced PIO.
pub fn coalesce_com1_output(kvm: &Kvm, vm: &VmFd, vcpu0: &VcpuFd) -> Option<Arc<CoalescedRing>> {
    if !kvm.check_extension(Cap::CoalescedPio) {
        return None;
    }
    vm.register_coalesced_mmio(IoEventAddress::Pio(COM1_BASE), 1)
        .ok()
        .and_then(|()| CoalescedRing::map(vcpu0).ok())
        .map(Arc::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use wbvmm_devices::irq::RecordingIrq;
    use wbvmm_devices::legacy::GuestExitRequest;

    #[derive(Default)]
    struct Exits(Mutex<Vec<GuestExitRequest>>);
    impl ExitSink for Exits {
        fn request_exit(&self, r: GuestExitRequest) {
            self.0.lock().unwrap().push(r);
        }
    }

    #[test]
    fn the_legacy_ports_reach_their_devices() {
        let pio = Bus::new();
        let exits = Arc::new(Exits::default());
        let rx_space = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let irq = Arc::new(RecordingIrq::default());
        let serial = Arc::new(com1(irq, Box::new(std::io::sink()), rx_space.clone()));
        place(&pio, serial.clone(), exits.clone()).unwrap();

        // COM1: host input shows up in the receive buffer register; reading it
        // empties the FIFO, which asks the I/O thread for more.
        serial.queue_input(b"x");
        let mut b = [0u8];
        assert!(pio.read(COM1_BASE + 5, &mut b));
        assert_eq!(b[0] & 1, 1, "LSR data ready");
        assert!(pio.read(COM1_BASE, &mut b));
        assert_eq!(b[0], b'x');
        assert_eq!(rx_space.read().unwrap(), 1);

        assert!(pio.read(POST_PORT, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(pio.write(DEBUG_EXIT_PORT, &[7]));
        assert!(pio.write(I8042_BASE + 4, &[0xfe]));
        assert_eq!(
            *exits.0.lock().unwrap(),
            [GuestExitRequest::DebugExit(7), GuestExitRequest::Reset]
        );
    }
}

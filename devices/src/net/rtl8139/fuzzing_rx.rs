//! Fuzz harness for the tap RX path into both ring formats (the `rtl8139_rx` target
//! in `devices/fuzz`; the unit tests replay its corpus). Not part of the device API.
//!
//! The input programs the receiver as a guest driver would (RBSTART, RCR, CR, CAPR in
//! C mode; CPCMD, RDSAR and descriptors in C+ mode; any other register too) and then
//! delivers frames of any length a tap read can return (0 to [`MAX_TAP_FRAME`] bytes,
//! to our MAC, broadcast, multicast or anything), following the I/O thread's protocol
//! (`can_receive`, `receive`, the RX-space eventfd).
//!
//! Checked, independently of the model's ring arithmetic: every DMA write the device
//! makes while receiving lands inside what the guest handed it — in C mode the ring
//! (plus one record of overhang with WRAP), in C+ mode the 64 descriptor slots and
//! the buffers of descriptors the guest owned-out before the frame arrived — and the
//! IRQ line follows ISR & IMR after every operation.

use std::sync::{Arc, Mutex};

use super::regs::*;
use super::{Rtl8139, Rtl8139Config, MAX_FRAME};
use crate::bus::BusDevice;
use crate::dma::{DmaError, GuestDma, VecGuestMemory};
use crate::irq::RecordingIrq;
use crate::net::tap::MAX_TAP_FRAME;
use crate::net::{FrameSink, RxResult};
use crate::pci::{PciDevice, PCI_COMMAND_INTX_DISABLE, PCI_COMMAND_IO, PCI_COMMAND_MASTER};

/// Guest RAM of the harness: small, so fuzzed ring addresses often overlap its end.
pub const RX_FUZZ_MEM: usize = 1 << 18;
const MAC: [u8; 6] = [0x52, 0x54, 0, 1, 2, 3];
/// The C-mode overhang WRAP=1 may use past the ring end: one maximal record.
const C_OVERHANG: u64 = (4 + MAX_FRAME as u64 + 4 + 3) & !3;
const CPLUS_RING_SLOTS: u64 = 64;

/// Guest RAM that records the device's writes (the harness's own pokes go to
/// `inner` directly and are not recorded).
struct RecMem {
    inner: VecGuestMemory,
    writes: Mutex<Vec<(u64, usize)>>,
}

impl GuestDma for RecMem {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.inner.read(gpa, buf)
    }
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), DmaError> {
        // Recorded even when it fails: an attempt outside the ring is the bug, whether
        // or not the address happens to be RAM.
        if let Ok(mut w) = self.writes.lock() {
            w.push((gpa, data.len()));
        }
        self.inner.write(gpa, data)
    }
}

struct NullSink;

impl FrameSink for NullSink {
    fn send(&self, _frame: &[u8]) -> bool {
        true
    }
}

struct Input<'a> {
    data: &'a [u8],
}

impl Input<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.u8()?, self.u8()?]))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes([
            self.u8()?,
            self.u8()?,
            self.u8()?,
            self.u8()?,
        ]))
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.data.len());
        let (a, b) = self.data.split_at(n);
        self.data = b;
        a
    }
}

/// Guest-physical ranges `(start, length)` the device may write during one receive.
/// Compared in 128-bit arithmetic: a guest may hand over a buffer that runs past the
/// top of the 64-bit space, and a write there is the guest's doing, not a model bug
/// (guest memory refuses it).
struct Allowed(Vec<(u64, u64)>);

impl Allowed {
    fn contains(&self, gpa: u64, len: usize) -> bool {
        let (gpa, end) = (gpa as u128, gpa as u128 + len as u128);
        self.0
            .iter()
            .any(|&(s, l)| gpa >= s as u128 && end <= s as u128 + l as u128)
    }
}

struct Harness {
    dev: Rtl8139,
    mem: Arc<RecMem>,
    irq: Arc<RecordingIrq>,
    intx_disabled: bool,
}

impl Harness {
    fn r8(&self, off: u64) -> u8 {
        let mut b = [0u8];
        self.dev.read(0, off, &mut b);
        b[0]
    }
    fn r16(&self, off: u64) -> u16 {
        let mut b = [0u8; 2];
        self.dev.read(0, off, &mut b);
        u16::from_le_bytes(b)
    }
    fn r32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read(0, off, &mut b);
        u32::from_le_bytes(b)
    }
    fn w8(&self, off: u64, v: u8) {
        self.dev.write(0, off, &[v]);
    }
    fn w16(&self, off: u64, v: u16) {
        self.dev.write(0, off, &v.to_le_bytes());
    }
    fn w32(&self, off: u64, v: u32) {
        self.dev.write(0, off, &v.to_le_bytes());
    }

    fn rdsar(&self) -> u64 {
        (self.r32(0xE8) as u64) << 32 | self.r32(0xE4) as u64
    }

    /// What the guest handed the device, read from registers and guest memory only.
    fn allowed(&self) -> Allowed {
        let mut ranges = Vec::new();
        if self.dev.lock().cplus {
            let base = self.rdsar();
            ranges.push((base, 16 * CPLUS_RING_SLOTS));
            for i in 0..CPLUS_RING_SLOTS {
                let Some(d) = base.checked_add(16 * i) else {
                    break;
                };
                let mut desc = [0u8; 16];
                if self.mem.inner.read(d, &mut desc).is_err() {
                    continue;
                }
                let opts1 = u32::from_le_bytes([desc[0], desc[1], desc[2], desc[3]]);
                if opts1 & DESC_OWN == 0 {
                    continue;
                }
                let mut a = [0u8; 8];
                a.copy_from_slice(&desc[8..16]);
                let buf = u64::from_le_bytes(a);
                ranges.push((buf, (opts1 & RXD_BUF_MASK) as u64));
            }
        } else {
            let rcr = self.r32(RCR as u64);
            let size = 8192u64 << ((rcr >> 11) & 3);
            let overhang = if rcr & RCR_WRAP != 0 && size < 65536 {
                C_OVERHANG
            } else {
                0
            };
            let start = self.r32(RBSTART as u64) as u64;
            ranges.push((start, size + overhang));
        }
        Allowed(ranges)
    }

    /// One frame from the tap side, as the I/O thread delivers it: alone
    /// (`receive`), or as part of a burst (`receive_held`), whose held descriptors
    /// go back at the burst's end (`release`) or at the next register access.
    fn deliver(&self, frame: &[u8], ignore_can_receive: bool, burst: bool, release: bool) {
        // The I/O thread reads the tap only while a maximal frame fits; the fuzzer
        // sometimes delivers anyway (a frame already read when the ring filled).
        if !self.dev.can_receive() && !ignore_can_receive {
            let _ = self.dev.rx_space_event().read();
            return;
        }
        let allowed = self.allowed();
        if let Ok(mut w) = self.mem.writes.lock() {
            w.clear();
        }
        let r = if burst {
            self.dev.receive_held(frame)
        } else {
            self.dev.receive(frame)
        };
        if release {
            self.dev.release_rx();
        }
        if r == RxResult::RingFull {
            let _ = self.dev.rx_space_event().read();
        }
        let writes = self
            .mem
            .writes
            .lock()
            .map(|w| w.clone())
            .unwrap_or_default();
        for (gpa, len) in writes {
            assert!(
                allowed.contains(gpa, len),
                "RX DMA write {gpa:#x}+{len} outside what the guest handed over ({:x?}), \
                 frame of {} bytes, result {r:?}",
                allowed.0,
                frame.len()
            );
        }
    }

    fn check_irq(&self) {
        // IMR before ISR: the ISR read may raise TimeOut and updates the line in the
        // same locked section (see the rtl8139 harness).
        let imr = self.r16(IMR as u64);
        let isr = self.r16(ISR as u64);
        let want = isr & imr != 0 && !self.intx_disabled;
        assert_eq!(
            self.irq.level.load(std::sync::atomic::Ordering::SeqCst),
            want,
            "IRQ level out of step with ISR & IMR"
        );
    }
}

/// Build a frame of `len` bytes: destination chosen by `kind`, then the input's
/// bytes, then a filler, so that 64 KiB frames cost the fuzzer a few bytes.
fn build_frame(out: &mut Vec<u8>, kind: u8, len: usize, body: &[u8]) {
    out.clear();
    match kind & 3 {
        0 => out.extend_from_slice(&MAC),
        1 => out.extend_from_slice(&[0xff; 6]),
        2 => out.extend_from_slice(&[0x01, 0x00, 0x5e, 0, 0, kind]),
        _ => {}
    }
    out.extend_from_slice(body);
    out.resize(len, kind ^ 0x5a);
    out.truncate(len);
}

/// Run one input. Panics only on a model bug.
pub fn run(data: &[u8]) {
    let mut inp = Input { data };
    let Some(setup) = inp.u8() else { return };
    let mem = Arc::new(RecMem {
        inner: VecGuestMemory::new(0, RX_FUZZ_MEM),
        writes: Mutex::new(Vec::new()),
    });
    let irq = Arc::new(RecordingIrq::default());
    let revision = if setup & 1 == 1 {
        super::REVISION_C
    } else {
        super::REVISION_CPLUS
    };
    let Ok(dev) = Rtl8139::new(
        Rtl8139Config { mac: MAC, revision },
        mem.clone(),
        irq.clone(),
        Arc::new(NullSink),
    ) else {
        return;
    };
    dev.command_written(PCI_COMMAND_IO | PCI_COMMAND_MASTER);
    let mut h = Harness {
        dev,
        mem,
        irq,
        intx_disabled: false,
    };
    // A working receiver to start from, so that most inputs reach the rings.
    if setup & 2 == 0 {
        h.w32(RBSTART as u64, 0x1_0000);
        h.w32(
            RCR as u64,
            0x0f | (setup as u32 & 0x0c) << 9 | (setup as u32 & 0x10) << 3,
        );
        h.w8(CR as u64, CR_RE | CR_TE);
    } else {
        h.w32(0xE4, 0x1000);
        h.w32(0xE8, 0);
        for i in 0..4u64 {
            let eor = if i == 3 { DESC_EOR } else { 0 };
            let _ = h
                .mem
                .inner
                .write_u32(0x1000 + 16 * i, DESC_OWN | eor | 1536);
            let _ = h
                .mem
                .inner
                .write_u32(0x1000 + 16 * i + 8, 0x2_0000 + 0x800 * i as u32);
        }
        h.w16(CPCMD as u64, CPCMD_RXENB | (setup as u16 & 0x60));
        h.w32(RCR as u64, 0x0f);
        h.w8(CR as u64, CR_RE | CR_TE);
    }
    let mut frame = Vec::with_capacity(MAX_TAP_FRAME);
    // Bounded by the input: every op consumes at least one byte.
    while let Some(op) = inp.u8() {
        match op % 8 {
            0 => {
                let (Some(sz), Some(off), Some(v)) = (inp.u8(), inp.u8(), inp.u32()) else {
                    break;
                };
                let n = [1, 2, 4, 4][(sz & 3) as usize];
                h.dev.write(0, off as u64, &v.to_le_bytes()[..n]);
            }
            1 => {
                // The receiver's own registers, with addresses often inside RAM.
                let (Some(which), Some(v)) = (inp.u8(), inp.u32()) else {
                    break;
                };
                let near = |v: u32| v % (RX_FUZZ_MEM as u32 + 0x4000);
                match which % 6 {
                    0 => h.w32(RBSTART as u64, near(v)),
                    1 => h.w32(RCR as u64, v),
                    2 => h.w8(CR as u64, v as u8),
                    3 => h.w16(CPCMD as u64, v as u16),
                    4 => {
                        h.w32(0xE4, near(v));
                        h.w32(0xE8, if which & 0x80 != 0 { v >> 16 } else { 0 });
                    }
                    _ => h.w16(MULINT as u64, v as u16),
                }
            }
            2 => {
                // A C+ RX descriptor in the current ring: opts1 (OWN, EOR, size), buffer.
                let (Some(idx), Some(o1), Some(a)) = (inp.u8(), inp.u32(), inp.u32()) else {
                    break;
                };
                let base = h.rdsar();
                let a = if idx & 0x80 != 0 {
                    a
                } else {
                    a % RX_FUZZ_MEM as u32
                };
                if let Some(d) = base.checked_add(16 * (idx as u64 % CPLUS_RING_SLOTS)) {
                    let _ = h.mem.inner.write_u32(d, o1);
                    let _ = h.mem.inner.write_u32(d + 4, 0);
                    let _ = h.mem.inner.write(d + 8, &(a as u64).to_le_bytes());
                }
            }
            3 | 4 => {
                // A frame from the tap. Lengths: mostly Ethernet-sized, sometimes up
                // to the tap's maximum (GSO-sized reads with a vnet header).
                let (Some(kind), Some(l)) = (inp.u8(), inp.u16()) else {
                    break;
                };
                let len = if kind & 0x80 != 0 {
                    l as usize % (MAX_TAP_FRAME + 1)
                } else {
                    l as usize % 2048
                };
                let body_len = inp.u8().unwrap_or(0) as usize;
                let body = inp.bytes(body_len);
                build_frame(&mut frame, kind, len, body);
                h.deliver(&frame, kind & 0x40 != 0, kind & 0x20 != 0, kind & 0x10 == 0);
            }
            5 => {
                // The guest consumes: C mode moves CAPR (right or wrong), C+ mode
                // gives descriptors back.
                let Some(v) = inp.u16() else { break };
                if v & 1 == 0 {
                    let cbr = h.r16(CBR as u64);
                    let capr = if v & 2 == 0 { cbr.wrapping_sub(16) } else { v };
                    h.w16(CAPR as u64, capr);
                } else {
                    let base = h.rdsar();
                    for i in 0..(v >> 1) as u64 % CPLUS_RING_SLOTS {
                        let Some(d) = base.checked_add(16 * i) else {
                            break;
                        };
                        if let Ok(o1) = h.mem.inner.read_u32(d) {
                            let eor = o1 & DESC_EOR;
                            let _ = h.mem.inner.write_u32(d, DESC_OWN | eor | (o1 & 0x1fff));
                        }
                    }
                }
                let _ = h.r8(CR as u64);
            }
            6 => match inp.u8().map(|b| b % 5) {
                Some(0) => h.dev.poll_timer(),
                Some(1) => h.dev.set_link(op & 0x10 != 0),
                Some(2) => h.dev.reset(),
                Some(3) => h.w8(CR as u64, CR_RST),
                Some(_) => {
                    let master = if op & 0x10 != 0 {
                        PCI_COMMAND_MASTER
                    } else {
                        0
                    };
                    let intx = if op & 0x20 != 0 {
                        PCI_COMMAND_INTX_DISABLE
                    } else {
                        0
                    };
                    h.intx_disabled = intx != 0;
                    h.dev.command_written(PCI_COMMAND_IO | master | intx);
                }
                None => break,
            },
            _ => {
                // Guest memory poke (rings, descriptors, anything).
                let (Some(addr), Some(len)) = (inp.u32(), inp.u8()) else {
                    break;
                };
                let bytes = inp.bytes(len as usize);
                let _ = h.mem.inner.write(addr as u64 % RX_FUZZ_MEM as u64, bytes);
            }
        }
        h.check_irq();
    }
    let _ = h.dev.stats();
    let _ = h.dev.can_receive();
}

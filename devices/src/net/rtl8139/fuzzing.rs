//! The fuzz harness, shared by `devices/fuzz` (libFuzzer) and the regression unit
//! tests that replay its findings. Not part of the device API.
//!
//! The input is a sequence of operations a guest (or the host side) can perform:
//! register reads/writes of 1, 2 or 4 bytes, writes of RAM addresses into the
//! address registers, guest-memory pokes (descriptors, rings, frames), injected RX
//! frames, TX doorbells, PCI command changes and canned mode setups.

use std::sync::Arc;

use super::{Rtl8139, Rtl8139Config, MAX_CPLUS_ASSEMBLY};
use crate::bus::BusDevice;
use crate::dma::{GuestDma, VecGuestMemory};
use crate::irq::RecordingIrq;
use crate::net::{FrameSink, RxResult};
use crate::pci::{PciDevice, PCI_COMMAND_INTX_DISABLE, PCI_COMMAND_IO, PCI_COMMAND_MASTER};

/// Guest RAM size of the harness: small, so fuzzed addresses hit it often.
pub const FUZZ_MEM: usize = 1 << 17;

struct CheckSink;

impl FrameSink for CheckSink {
    fn send(&self, frame: &[u8]) -> bool {
        // A frame larger than any the chip can produce means a length bug.
        assert!(frame.len() <= MAX_CPLUS_ASSEMBLY + 4, "oversized TX frame");
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

const ADDR_REGS: [u64; 8] = [0x10, 0x20, 0x24, 0x28, 0x2c, 0x30, 0xe4, 0xe8];

/// Run one fuzz input. Panics only on a model bug.
pub fn run(data: &[u8]) {
    let mem = Arc::new(VecGuestMemory::new(0, FUZZ_MEM));
    let irq = Arc::new(RecordingIrq::default());
    let revision = if data.first().is_some_and(|b| b & 1 == 1) {
        0x10
    } else {
        0x20
    };
    let Ok(dev) = Rtl8139::new(
        Rtl8139Config {
            mac: [0x52, 0x54, 0, 1, 2, 3],
            revision,
        },
        mem.clone(),
        irq.clone(),
        Arc::new(CheckSink),
    ) else {
        return;
    };
    dev.command_written(PCI_COMMAND_IO | PCI_COMMAND_MASTER);
    let mut intx_disabled = false;
    let mut inp = Input { data };
    let mut frame = Vec::with_capacity(2048);
    // Bounded by the input length: every op consumes at least one byte.
    while let Some(op) = inp.u8() {
        match op % 10 {
            0 => {
                let (Some(sz), Some(off), Some(v)) = (inp.u8(), inp.u8(), inp.u32()) else {
                    break;
                };
                let n = [1, 2, 4, 3][(sz & 3) as usize];
                dev.write(0, off as u64, &v.to_le_bytes()[..n]);
            }
            1 => {
                let (Some(sz), Some(off)) = (inp.u8(), inp.u8()) else {
                    break;
                };
                let n = [1, 2, 4, 8][(sz & 3) as usize];
                let mut b = [0u8; 8];
                dev.read(0, off as u64, &mut b[..n]);
            }
            2 => {
                let (Some(sel), Some(v)) = (inp.u8(), inp.u32()) else {
                    break;
                };
                let reg = ADDR_REGS[(sel & 7) as usize];
                let v = if reg == 0x24 || reg == 0x2c || reg == 0xe8 {
                    0
                } else {
                    v % FUZZ_MEM as u32
                };
                dev.write(0, reg, &v.to_le_bytes());
            }
            3 => {
                let (Some(addr), Some(len)) = (inp.u32(), inp.u8()) else {
                    break;
                };
                let bytes = inp.bytes(len as usize);
                let _ = mem.write((addr as u64) % FUZZ_MEM as u64, bytes);
            }
            4 => {
                // A C+ descriptor: opts1, opts2, buffer address in RAM.
                let (Some(idx), Some(o1), Some(o2), Some(a), Some(which)) =
                    (inp.u8(), inp.u32(), inp.u32(), inp.u32(), inp.u8())
                else {
                    break;
                };
                let base = if which & 1 == 0 { 0x1000u64 } else { 0x2000 };
                let mut d = [0u8; 16];
                d[0..4].copy_from_slice(&o1.to_le_bytes());
                d[4..8].copy_from_slice(&o2.to_le_bytes());
                d[8..12].copy_from_slice(&(a % FUZZ_MEM as u32).to_le_bytes());
                let _ = mem.write(base + 16 * (idx as u64 % 64), &d);
            }
            5 => {
                let Some(len) = inp.u16() else { break };
                let len = len as usize % 1900;
                frame.clear();
                frame.extend_from_slice(inp.bytes(len));
                let r = dev.receive(&frame);
                if r == RxResult::RingFull {
                    let _ = dev.rx_space_event().read();
                }
                let _ = dev.can_receive();
            }
            6 => match inp.u8().map(|b| b % 4) {
                Some(0) => dev.process_tx(),
                Some(1) => dev.poll_timer(),
                Some(2) => dev.set_link(op & 0x10 != 0),
                Some(_) => {
                    let cmd = if op & 0x10 != 0 {
                        PCI_COMMAND_MASTER
                    } else {
                        0
                    } | if op & 0x20 != 0 {
                        PCI_COMMAND_INTX_DISABLE
                    } else {
                        0
                    };
                    intx_disabled = cmd & PCI_COMMAND_INTX_DISABLE != 0;
                    dev.command_written(PCI_COMMAND_IO | cmd);
                }
                None => break,
            },
            7 => {
                // Canned setups so the fuzzer reaches deep states quickly.
                let Some(which) = inp.u8() else { break };
                let w8 = |o: u64, v: u8| dev.write(0, o, &[v]);
                let w16 = |o: u64, v: u16| dev.write(0, o, &v.to_le_bytes());
                let w32 = |o: u64, v: u32| dev.write(0, o, &v.to_le_bytes());
                if which & 1 == 0 {
                    w8(0x37, 0x0c);
                    w32(0x40, 0x0300_0680 | (((which as u32 & 2) << 16) * 3));
                    w32(0x44, 0x8f | ((which as u32 >> 2) & 3) << 11);
                    w32(0x30, 0x4000);
                    w16(0x3c, 0xffff);
                } else {
                    w16(0xe0, 0x2b | ((which as u16) & 0x40));
                    w32(0x20, 0x1000);
                    w32(0x24, 0);
                    w32(0x28, 0x2000);
                    w32(0x2c, 0);
                    w32(0xe4, 0x2000);
                    w32(0xe8, 0);
                    w8(0x37, 0x0c);
                    w32(0x40, 0x0300_0600 | (((which as u32 & 2) << 16) * 3));
                    w32(0x44, 0xa40f);
                    w16(0x3c, 0xffff);
                }
            }
            8 => {
                // TxPoll / TSD doorbells directly.
                let Some(v) = inp.u8() else { break };
                if v & 0x80 != 0 {
                    dev.write(0, 0xd9, &[v << 1]);
                } else {
                    let n = (v & 3) as u64;
                    let size = (v as u32 >> 2) * 64;
                    dev.write(0, 0x10 + 4 * n, &size.to_le_bytes());
                }
            }
            9 => {
                // A C+ TX frame with fuzzer-chosen IPv4/TCP/UDP header fields and
                // offload bits: the CVE-2015-5165 / MSS-0 territory.
                let (Some(vihl), Some(ip_len), Some(proto), Some(doff), Some(plen), Some(cmd)) = (
                    inp.u8(),
                    inp.u16(),
                    inp.u8(),
                    inp.u8(),
                    inp.u16(),
                    inp.u32(),
                ) else {
                    break;
                };
                let plen = plen as usize % 4000;
                frame.clear();
                frame.extend_from_slice(&[0x52, 0x54, 0, 1, 2, 3, 2, 0, 0, 0, 0, 9, 0x08, 0x00]);
                let ihl = ((vihl & 0xf) as usize * 4).max(20);
                frame.push(vihl);
                frame.push(0);
                frame.extend_from_slice(&ip_len.to_be_bytes());
                frame.extend_from_slice(&[
                    0, 1, 0, 0, 64, proto, 0, 0, 169, 254, 0, 1, 169, 254, 0, 2,
                ]);
                frame.resize(14 + ihl, 0);
                let l4 = frame.len();
                frame.resize(l4 + 20, 0);
                frame[l4 + 12] = doff;
                frame[l4 + 13] = 0x19;
                frame.extend(std::iter::repeat_n(0xA5, plen));
                let len = frame.len() as u32;
                let _ = mem.write(0x4000, &frame);
                let opts1 = (1 << 31) | (3 << 28) | (cmd & 0x0FFF_0000) | len;
                let mut d = [0u8; 16];
                d[0..4].copy_from_slice(&opts1.to_le_bytes());
                d[4..8].copy_from_slice(&(cmd & 0x2_FFFF).to_le_bytes());
                d[8..12].copy_from_slice(&0x4000u32.to_le_bytes());
                let idx = (cmd >> 28) as u64 & 3;
                let _ = mem.write(0x1000 + 16 * idx, &d);
                dev.write(0, 0xd9, &[0x40]);
            }
            _ => unreachable!(),
        }
        // The line follows ISR & IMR (level semantics) after every operation.
        // IMR first: the ISR read may raise TimeOut (the timer is checked on every
        // access) and updates the line in the same locked section.
        let mut isr = [0u8; 2];
        let mut imr = [0u8; 2];
        dev.read(0, 0x3c, &mut imr);
        dev.read(0, 0x3e, &mut isr);
        let want = u16::from_le_bytes(isr) & u16::from_le_bytes(imr) != 0 && !intx_disabled;
        assert_eq!(
            irq.level.load(std::sync::atomic::Ordering::SeqCst),
            want,
            "IRQ level out of step with ISR & IMR"
        );
    }
    // The device must still answer and its ids must be intact.
    let _ = dev.ids();
    let _ = dev.stats();
    let _ = mem.read_u32(0);
}

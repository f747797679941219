//! Property tests for the C-mode RX ring arithmetic.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;

use super::*;
use crate::dma::{DmaError, VecGuestMemory};
use crate::irq::RecordingIrq;
use crate::net::RecordingSink;

const MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
const RING: u64 = 0x1_0000;
const MEM: usize = 0x4_0000;

/// Guest memory that records every DMA write range.
struct RecMem {
    inner: VecGuestMemory,
    writes: Mutex<Vec<(u64, usize)>>,
}

impl GuestDma for RecMem {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.inner.read(gpa, buf)
    }
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), DmaError> {
        self.writes.lock().unwrap().push((gpa, data.len()));
        self.inner.write(gpa, data)
    }
}

fn setup(rcr: u32) -> (Rtl8139, Arc<RecMem>) {
    let mem = Arc::new(RecMem {
        inner: VecGuestMemory::new(0, MEM),
        writes: Mutex::new(Vec::new()),
    });
    let dev = Rtl8139::new(
        Rtl8139Config {
            mac: MAC,
            revision: REVISION_C,
        },
        mem.clone(),
        Arc::new(RecordingIrq::default()),
        Arc::new(RecordingSink::default()),
    )
    .unwrap();
    dev.command_written(crate::pci::PCI_COMMAND_MASTER);
    dev.write(0, 0x30, &(RING as u32).to_le_bytes());
    dev.write(0, 0x37, &[0x0c]);
    dev.write(0, 0x44, &rcr.to_le_bytes());
    (dev, mem)
}

fn frame(len: usize, tag: u8) -> Vec<u8> {
    let mut f = vec![tag; len];
    f[..6].copy_from_slice(&MAC);
    f
}

#[derive(Debug, Clone)]
enum Op {
    Rx(usize, u8),
    Consume(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (14usize..=1792, any::<u8>()).prop_map(|(l, t)| Op::Rx(l, t)),
        1 => (1usize..8).prop_map(Op::Consume),
    ]
}

/// The overhang past the ring end that WRAP=1 may use: one maximal record.
const OVERHANG: u64 = (4 + MAX_FRAME as u64 + 4 + 3) & !3;

fn check_writes(mem: &RecMem, size: u64, wrap: bool) -> Result<(), TestCaseError> {
    let limit = RING + size + if wrap { OVERHANG } else { 0 };
    for &(gpa, len) in mem.writes.lock().unwrap().iter() {
        prop_assert!(gpa >= RING, "write below ring: {gpa:#x}");
        prop_assert!(gpa + len as u64 <= limit, "write past ring: {gpa:#x}+{len}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// A driver that reads records as 8139too does sees exactly the accepted
    /// frames, in order; no write leaves the ring (+ the WRAP overhang).
    #[test]
    fn ring_delivers_in_order_and_stays_in_bounds(
        rblen in 0u32..4,
        wrap in any::<bool>(),
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        let rcr = 0x02 | (rblen << 11) | if wrap { RCR_WRAP } else { 0 };
        let (dev, mem) = setup(rcr);
        let size = 8192usize << rblen;
        let linear = wrap && size < 65536;
        let mut expect: VecDeque<Vec<u8>> = VecDeque::new();
        let mut cur: usize = 0;
        for op in ops {
            match op {
                Op::Rx(len, tag) => {
                    let f = frame(len, tag);
                    match dev.receive(&f) {
                        RxResult::Accepted => expect.push_back(f),
                        RxResult::RingFull => {}
                        r => prop_assert!(false, "unexpected {r:?}"),
                    }
                }
                Op::Consume(n) => {
                    for _ in 0..n {
                        let mut cr = [0u8];
                        dev.read(0, 0x37, &mut cr);
                        if cr[0] & CR_BUFE != 0 {
                            prop_assert!(expect.is_empty());
                            break;
                        }
                        let off = cur % size;
                        let hdr = mem.inner.read_u32(RING + off as u64).unwrap();
                        let status = hdr as u16;
                        let rlen = (hdr >> 16) as usize;
                        prop_assert!(status & RXS_ROK != 0);
                        let want = expect.pop_front().expect("record without a frame");
                        let flen = want.len().max(60);
                        prop_assert_eq!(rlen, flen + 4);
                        let mut got = vec![0u8; flen];
                        let start = off + 4;
                        if linear || start + flen <= size {
                            mem.inner.read(RING + start as u64, &mut got).unwrap();
                        } else {
                            // Crosses the end (or the header sat at the very end).
                            for (i, g) in got.iter_mut().enumerate() {
                                let mut b = [0u8];
                                mem.inner.read(RING + ((start + i) % size) as u64, &mut b).unwrap();
                                *g = b[0];
                            }
                        }
                        prop_assert_eq!(&got[..want.len()], &want[..]);
                        cur = (cur + rlen + 4 + 3) & !3;
                        dev.write(0, 0x38, &(cur as u16).wrapping_sub(16).to_le_bytes());
                    }
                }
            }
        }
        check_writes(&mem, size as u64, linear)?;
    }

    /// Whatever a hostile guest writes to CAPR, RCR and CR, no write leaves the
    /// largest ring + overhang, nothing panics.
    #[test]
    fn hostile_capr_never_escapes(
        ops in proptest::collection::vec(
            prop_oneof![
                (14usize..=1792).prop_map(|l| (0u8, l as u32)),
                any::<u16>().prop_map(|v| (1u8, v as u32)),
                (0u32..4, any::<bool>()).prop_map(|(b, w)| (2u8, b << 11 | if w { 0x80 } else { 0 })),
                any::<u8>().prop_map(|v| (3u8, v as u32)),
            ],
            1..200,
        ),
    ) {
        let (dev, mem) = setup(0x02);
        for (kind, v) in ops {
            match kind {
                0 => { let _ = dev.receive(&frame(v as usize, 0xaa)); }
                1 => dev.write(0, 0x38, &(v as u16).to_le_bytes()),
                2 => dev.write(0, 0x44, &(0x02 | v).to_le_bytes()),
                _ => dev.write(0, 0x37, &[(v as u8) & 0x0c]),
            }
        }
        check_writes(&mem, 65536, true)?;
    }
}

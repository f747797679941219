//! Polled RTL8139C / RTL8139C+ driver, C mode (four TX registers, RX ring)
//! and C+ mode (64-entry descriptor rings), over port I/O (BAR0) or MMIO
//! (BAR1). Interrupts stay masked (IMR = 0): the guest polls.
//!
//! Register accesses are VM exits (tens of µs each on the development
//! hosts), so the data path is built to touch registers as little as
//! possible; the rest is memory the chip DMAs into:
//!
//! - C mode TX: one 32-bit TSDn write per frame (the "go"). Descriptors are
//!   reclaimed lazily: only when the next one is still marked in flight,
//!   one 16-bit read of the TX summary register (TSAD, 0x60) frees every
//!   finished descriptor at once (a TSDn read is the fallback).
//! - C mode RX: the ring is zeroed behind the reader, so a non-zero header
//!   at the read offset means the chip has started a record there. The
//!   record is complete when the CRC the chip appends after the frame
//!   matches the frame (QEMU writes header, frame, CRC in that order); only
//!   when it does not match yet is CBR read (one exit) to learn whether the
//!   write has finished. CAPR is written once per quarter ring consumed,
//!   not per frame.
//! - C+ mode: TX is one 8-bit TxPoll write per frame; RX and TX completion
//!   are the OWN bits of the descriptors in RAM: no register access at all.
//!
//! No ISR acknowledgements in the data path: with IMR = 0 the ISR bits
//! raise nothing, and neither mode's RX or TX depends on them.

use crate::io::{inb, inl, inw, outb, outl, outw};
use crate::{tsc, Global};
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{compiler_fence, Ordering};

// Register offsets.
const IDR0: u16 = 0x00;
const MAR0: u16 = 0x08;
const TSD0: u16 = 0x10;
const TSAD0: u16 = 0x20; // C+: TNPDS (TX ring address) lo/hi at 0x20/0x24
const RBSTART: u16 = 0x30;
const CR: u16 = 0x37;
const CAPR: u16 = 0x38;
const CBR: u16 = 0x3a;
const IMR: u16 = 0x3c;
const ISR: u16 = 0x3e;
const TCR: u16 = 0x40;
const RCR: u16 = 0x44;
const MPC: u16 = 0x4c;
const CFG9346: u16 = 0x50;
const MULINT: u16 = 0x5c;
const TX_SUMMARY: u16 = 0x60;
const BMSR: u16 = 0x64;
const TPPOLL: u16 = 0xd9;
const CPCMD: u16 = 0xe0;
const RDSAR: u16 = 0xe4;
const ETTHR: u16 = 0xec;

const CR_RST: u8 = 0x10;
/// CR bit 0: the RX ring holds nothing past CAPR (8139too's RxBufEmpty).
const CR_RX_BUF_EMPTY: u8 = 0x01;

// IntrStatus / IntrMask bits (C names; C+ reuses 0x10 as RxEmpty, 0x20 as
// LinkChg, 0x80 as TxEmpty).
const INT_ROK: u16 = 0x0001;
const INT_RER: u16 = 0x0002;
const INT_TOK: u16 = 0x0004;
const INT_TER: u16 = 0x0008;
const INT_RXOVW: u16 = 0x0010;
const INT_LINKCHG: u16 = 0x0020;
const INT_FOVW: u16 = 0x0040;
const INT_TXEMPTY: u16 = 0x0080;
const INT_TIMEOUT: u16 = 0x4000;
const INT_SERR: u16 = 0x8000;
/// 8139cp's cp_rx_intr_mask, cp_intr_mask, cp_norx_intr_mask.
const CP_RX_INTR: u16 = INT_ROK | INT_RER | INT_RXOVW | INT_FOVW;
const CP_INTR: u16 = CP_RX_INTR | INT_LINKCHG | INT_TOK | INT_TER | INT_TXEMPTY;
const CP_NORX_INTR: u16 = INT_LINKCHG | INT_TOK | INT_TER | INT_TXEMPTY;
/// 8139too's rtl8139_intr_mask, rtl8139_norx_intr_mask, RxAckBits.
const RTL_INTR: u16 = INT_SERR
    | INT_TIMEOUT
    | INT_LINKCHG
    | INT_RXOVW
    | INT_FOVW
    | INT_TER
    | INT_TOK
    | INT_RER
    | INT_ROK;
const RTL_NORX_INTR: u16 = INT_SERR | INT_TIMEOUT | INT_LINKCHG | INT_TER | INT_TOK | INT_RER;
const RX_ACK_BITS: u16 = INT_FOVW | INT_RXOVW | INT_ROK;
const CR_RE: u8 = 0x08;
const CR_TE: u8 = 0x04;

const CFG9346_UNLOCK: u8 = 0xc0;
const CFG9346_LOCK: u8 = 0x00;

// TSDn bits.
const TSD_OWN: u32 = 1 << 13;
const TSD_TUN: u32 = 1 << 14;
const TSD_TOK: u32 = 1 << 15;
const TSD_TABT: u32 = 1 << 30;
/// Early-TX threshold 256 bytes (8 x 32), as 8139too.
const TSD_ERTXTH: u32 = 0x0008_0000;

// RX record status.
const RX_ROK: u32 = 1;

/// 8139too's values: RXFTH none (7), 32K ring, MXDMA unlimited, WRAP,
/// accept broadcast and own MAC.
const RCR_C: u32 = 0x0000_f78a;
const RCR_WRAP: u32 = 1 << 7;
/// 8139cp's: RXFTH 5, MXDMA 4, accept broadcast and own MAC.
const RCR_CPLUS: u32 = 0x0000_a40a;
/// IFG 9.6 µs, MXDMA 6 (1024 B), TXRR 8 (8139too) / no TXRR (8139cp).
const TCR_C: u32 = 0x0300_0680;
const TCR_CPLUS: u32 = 0x0300_0600;

/// C+ command: C+ RX and TX on (no checksum offload, no VLAN, 32-bit DMA).
const CPCMD_RX_TX: u16 = 0x0003;
/// TxPoll: normal-priority queue.
const TPPOLL_NPQ: u8 = 0x40;

// C+ descriptor opts1 bits.
const DESC_OWN: u32 = 1 << 31;
const DESC_EOR: u32 = 1 << 30;
const DESC_FS: u32 = 1 << 29;
const DESC_LS: u32 = 1 << 28;
/// RX: error summary.
const DESC_RX_RES: u32 = 1 << 20;
/// C+ TX opts1: the chip computes the IPv4 header / UDP / TCP checksum.
const TXD_IPCS: u32 = 1 << 18;
const TXD_UDPCS: u32 = 1 << 17;
const TXD_TCPCS: u32 = 1 << 16;

/// C-mode RX ring: 32 KiB (RCR RBLEN = 10), with the 16 bytes the chip may
/// write past it and the slack WRAP needs (as 8139too: 32K + 16 + 2048).
const RX_RING: usize = 32 * 1024;
const RX_RING_ALLOC: usize = RX_RING + 16 + 2048 + 2048; // multiple of 4096
/// Write CAPR after this many bytes consumed (a quarter ring).
const CAPR_BATCH: usize = RX_RING / 4;

const C_TX_DESCS: usize = 4;
pub const RING: usize = 64;
/// Per-frame buffer: a full Ethernet frame plus CRC, rounded up.
pub const BUF: usize = 1536;
/// Largest frame handed down (no FCS).
pub const MAX_FRAME: usize = 1514;
const MIN_FRAME: usize = 60;

#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct Desc {
    opts1: u32,
    opts2: u32,
    addr_lo: u32,
    addr_hi: u32,
}

/// All DMA memory, in .bss (identity-mapped RAM: virtual = physical).
#[repr(C, align(4096))]
struct Dma {
    rx_ring: [u8; RX_RING_ALLOC],
    /// 256-byte aligned (8139cp aligns its rings to 256).
    tx_desc: [Desc; RING],
    rx_desc: [Desc; RING],
    tx_buf: [[u8; BUF]; RING],
    rx_buf: [[u8; BUF]; RING],
}

static DMA: Global<Dma> = Global::new(Dma {
    rx_ring: [0; RX_RING_ALLOC],
    tx_desc: [Desc {
        opts1: 0,
        opts2: 0,
        addr_lo: 0,
        addr_hi: 0,
    }; RING],
    rx_desc: [Desc {
        opts1: 0,
        opts2: 0,
        addr_lo: 0,
        addr_hi: 0,
    }; RING],
    tx_buf: [[0; BUF]; RING],
    rx_buf: [[0; BUF]; RING],
});

fn dma() -> *mut Dma {
    DMA.get()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    C,
    CPlus,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::C => "c",
            Mode::CPlus => "cplus",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bus {
    Pio(u16),
    Mmio(u64),
}

impl Bus {
    pub fn name(self) -> &'static str {
        match self {
            Bus::Pio(_) => "pio",
            Bus::Mmio(_) => "mmio",
        }
    }
}

/// How the data path touches the chip (`nicdrv=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Shape {
    /// The fewest register accesses: IMR = 0, completions and RX found in RAM
    /// (the table in the README).
    #[default]
    Lean,
    /// Per packet what Linux's 8139too (C) and 8139cp (C+) do, with the
    /// interrupt replaced by polling IntrStatus: the handler's IntrStatus
    /// read and write-1-to-clear ack, IntrMask masked for a NAPI-like poll
    /// and unmasked after it (with the drivers' flushing read-backs), TX
    /// completion from the descriptors (C+) or each TSD's status (C), and in
    /// C mode the RxBufEmpty check, CAPR and the RX ack per packet.
    Linux,
    /// The same sequence, woken by the NIC's real INTx interrupt instead of
    /// polling IntrStatus: the CPL0 handler (`nicirq`) reads IntrStatus, acks
    /// the non-RX bits, masks RX and schedules the poll; the CPL3 side waits
    /// for that in memory (no exits), then polls RX as `Linux` does, and
    /// takes C mode's TX completion from the status the handler recorded.
    LinuxIrq,
}

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Shape::Lean => "lean",
            Shape::Linux => "linux",
            Shape::LinuxIrq => "linux-irq",
        }
    }

    /// Whether the data path is 8139too's / 8139cp's register sequence.
    pub fn linux_like(self) -> bool {
        matches!(self, Shape::Linux | Shape::LinuxIrq)
    }
}

/// The handler's masks for `mode` (`nicirq::arm`): ack all but the RX bits,
/// which schedule the poll with IntrMask = the no-RX mask.
pub fn irq_masks(mode: Mode) -> crate::nicirq::Masks {
    match mode {
        // 8139too acks TxErr after its TX interrupt; here TX completion is the
        // poll's, so the handler acks it with the rest (else it would assert
        // the line until the poll ran).
        Mode::C => crate::nicirq::Masks {
            ack: !RX_ACK_BITS,
            rx: RX_ACK_BITS,
            norx: RTL_NORX_INTR,
        },
        Mode::CPlus => crate::nicirq::Masks {
            ack: !CP_RX_INTR,
            rx: CP_RX_INTR,
            norx: CP_NORX_INTR,
        },
    }
}

/// Register access with counters (each access is one exit to the VMM).
pub struct Regs {
    bus: Bus,
    pub reads: u64,
    pub writes: u64,
}

impl Regs {
    fn r8(&mut self, off: u16) -> u8 {
        self.reads += 1;
        match self.bus {
            Bus::Pio(b) => inb(b + off),
            Bus::Mmio(b) => unsafe { read_volatile((b + off as u64) as *const u8) },
        }
    }
    fn r16(&mut self, off: u16) -> u16 {
        self.reads += 1;
        match self.bus {
            Bus::Pio(b) => inw(b + off),
            Bus::Mmio(b) => unsafe { read_volatile((b + off as u64) as *const u16) },
        }
    }
    fn r32(&mut self, off: u16) -> u32 {
        self.reads += 1;
        match self.bus {
            Bus::Pio(b) => inl(b + off),
            Bus::Mmio(b) => unsafe { read_volatile((b + off as u64) as *const u32) },
        }
    }
    fn w8(&mut self, off: u16, v: u8) {
        self.writes += 1;
        match self.bus {
            Bus::Pio(b) => outb(b + off, v),
            Bus::Mmio(b) => unsafe { write_volatile((b + off as u64) as *mut u8, v) },
        }
    }
    fn w16(&mut self, off: u16, v: u16) {
        self.writes += 1;
        match self.bus {
            Bus::Pio(b) => outw(b + off, v),
            Bus::Mmio(b) => unsafe { write_volatile((b + off as u64) as *mut u16, v) },
        }
    }
    fn w32(&mut self, off: u16, v: u32) {
        self.writes += 1;
        match self.bus {
            Bus::Pio(b) => outl(b + off, v),
            Bus::Mmio(b) => unsafe { write_volatile((b + off as u64) as *mut u32, v) },
        }
    }
}

#[derive(Debug)]
pub enum InitError {
    ResetTimeout,
}

/// Counters for the report and the tests.
#[derive(Default, Clone, Copy)]
pub struct Stats {
    pub tx_frames: u64,
    pub rx_frames: u64,
    /// C mode: records confirmed by a CBR read (CRC did not match yet).
    pub rx_cbr_reads: u64,
    /// TX frames dropped: no free descriptor within the wait.
    pub tx_dropped: u64,
    /// C mode: bad RX headers that forced an RX reset.
    pub rx_resets: u64,
    /// C mode: records that crossed the ring end and continued at its start
    /// (WRAP = 0 or a device ignoring WRAP).
    pub rx_split: u64,
    /// Linux shape: IntrStatus reads that found work (the "interrupts"), and
    /// NAPI-like polls run.
    pub irq_events: u64,
    pub napi_polls: u64,
    /// C+ frames sent with the chip computing their checksums.
    pub tx_csum_offloaded: u64,
}

impl Nic {
    /// Register reads, the interrupt handler's included.
    pub fn reg_reads(&self) -> u64 {
        self.regs.reads + self.handler_count(|s| &s.reads)
    }

    /// Register writes, the interrupt handler's included.
    pub fn reg_writes(&self) -> u64 {
        self.regs.writes + self.handler_count(|s| &s.writes)
    }

    fn handler_count(
        &self,
        f: impl Fn(&crate::nicirq::IrqShared) -> &core::sync::atomic::AtomicU64,
    ) -> u64 {
        if self.shape == Shape::LinuxIrq {
            f(crate::nicirq::shared()).load(Ordering::Relaxed)
        } else {
            0
        }
    }
}

pub struct Nic {
    pub regs: Regs,
    pub mode: Mode,
    pub mac: [u8; 6],
    pub eeprom_mac: [u8; 6],
    pub idr_mac: [u8; 6],
    pub link_up: bool,
    pub stats: Stats,
    // C mode
    tx_next: usize,
    /// Bit n: TX descriptor n handed to the chip and not yet seen done.
    tx_busy: u8,
    rx_off: usize,
    rx_unreported: usize,
    // C+ mode
    cp_tx: usize,
    cp_rx: usize,
    /// The RX frame found by `rx_peek`: (offset into ring or descriptor
    /// index, length without CRC).
    pending: Option<(usize, usize)>,
    rx_cbr_only: bool,
    rcr_c: u32,
    pub shape: Shape,
    /// Linux shape: RX is masked and being polled (between napi_schedule and
    /// napi_complete).
    napi: bool,
    /// Linux shape, C+: the poll has not acked RX in IntrStatus yet.
    napi_ack: bool,
    /// Linux shape, C: the oldest TX descriptor not yet seen done.
    tx_dirty: usize,
    /// C+: IPv4/TCP/UDP checksums left to the chip (8139cp's NETIF_F_IP_CSUM).
    tx_csum: bool,
}

/// What [`Nic::tx_raw`] came to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum RawTx {
    /// TOK: the chip read the buffer and sent it.
    Sent,
    /// Given back without TOK: the buffer could not be read (TUN) or TABT.
    Failed,
    /// No free descriptor, or it did not come back in time.
    NoAnswer,
}

/// C-mode RX variants, for testing the driver's paths against a model.
#[derive(Clone, Copy, Default)]
pub struct RxOpts {
    /// Skip the in-memory CRC check: confirm every record with a CBR read
    /// (what a device that appends no valid CRC costs).
    pub cbr_only: bool,
    /// RCR.WRAP = 0: records crossing the ring end continue at its start.
    pub no_wrap: bool,
}

impl Nic {
    /// Reset and bring the chip up in `mode` (Linux 8139too / 8139cp order).
    /// `opts`: C-mode RX test knobs (see `RxOpts`).
    pub fn init(bus: Bus, mode: Mode, opts: RxOpts, shape: Shape) -> Result<Nic, InitError> {
        let mut nic = Nic {
            regs: Regs {
                bus,
                reads: 0,
                writes: 0,
            },
            mode,
            mac: [0; 6],
            eeprom_mac: [0; 6],
            idr_mac: [0; 6],
            link_up: false,
            stats: Stats::default(),
            tx_next: 0,
            tx_busy: 0,
            rx_off: 0,
            rx_unreported: 0,
            cp_tx: 0,
            cp_rx: 0,
            pending: None,
            rx_cbr_only: opts.cbr_only,
            rcr_c: if opts.no_wrap {
                RCR_C & !RCR_WRAP
            } else {
                RCR_C
            },
            shape,
            napi: false,
            napi_ack: false,
            tx_dirty: 0,
            tx_csum: false,
        };
        // Fresh DMA memory (also after a warm restart of the words).
        unsafe { core::ptr::write_bytes(dma() as *mut u8, 0, core::mem::size_of::<Dma>()) };

        let r = &mut nic.regs;
        // Mask and ack everything first (8139cp's cp_stop_hw).
        r.w16(IMR, 0);
        r.w16(ISR, 0xffff);
        // Reset: CR.RST self-clears (8139too: up to 1000 x 10 µs).
        r.w8(CR, CR_RST);
        let deadline = tsc::Deadline::after_ns(100_000_000);
        let mut tries = 0;
        while r.r8(CR) & CR_RST != 0 {
            tries += 1;
            if tries > 1000 || deadline.expired() {
                return Err(InitError::ResetTimeout);
            }
        }

        // MAC: from the 93C46 EEPROM (words 7-9), as both Linux drivers do;
        // IDR0-5 read for comparison.
        let lo = r.r32(IDR0);
        let hi = r.r16(IDR0 + 4);
        nic.idr_mac = [
            lo as u8,
            (lo >> 8) as u8,
            (lo >> 16) as u8,
            (lo >> 24) as u8,
            hi as u8,
            (hi >> 8) as u8,
        ];
        let addr_len = if eeprom_read(r, 0, 8) == 0x8129 { 8 } else { 6 };
        for i in 0..3 {
            let w = eeprom_read(r, 7 + i as u8, addr_len);
            nic.eeprom_mac[2 * i] = w as u8;
            nic.eeprom_mac[2 * i + 1] = (w >> 8) as u8;
        }
        let ee = nic.eeprom_mac;
        let valid = ee != [0; 6] && ee != [0xff; 6] && ee[0] & 1 == 0;
        nic.mac = if valid { ee } else { nic.idr_mac };
        let mac = nic.mac;

        let d = dma();
        let r = &mut nic.regs;
        r.w8(CFG9346, CFG9346_UNLOCK);
        r.w32(IDR0, u32::from_le_bytes([mac[0], mac[1], mac[2], mac[3]]));
        r.w32(IDR0 + 4, u32::from_le_bytes([mac[4], mac[5], 0, 0]));
        match mode {
            Mode::C => {
                let ring = unsafe { core::ptr::addr_of!((*d).rx_ring) } as u64;
                r.w32(RBSTART, ring as u32);
                // RE|TE before RCR/TCR (8139too: "Must enable Tx/Rx before
                // setting transfer thresholds!"; TCR writes are ignored
                // while TE = 0).
                r.w8(CR, CR_RE | CR_TE);
                r.w32(RCR, nic.rcr_c);
                r.w32(TCR, TCR_C);
                r.w8(CFG9346, CFG9346_LOCK);
                for i in 0..C_TX_DESCS {
                    let buf = unsafe { core::ptr::addr_of!((*d).tx_buf[i]) } as u64;
                    r.w32(TSAD0 + 4 * i as u16, buf as u32);
                }
                r.w32(MPC, 0);
                r.w32(MAR0, 0);
                r.w32(MAR0 + 4, 0);
                r.w16(MULINT, 0);
            }
            Mode::CPlus => {
                unsafe {
                    for i in 0..RING {
                        let eor = if i == RING - 1 { DESC_EOR } else { 0 };
                        let tx = &mut (*d).tx_desc[i];
                        tx.opts1 = eor;
                        tx.opts2 = 0;
                        let b = core::ptr::addr_of!((*d).tx_buf[i]) as u64;
                        tx.addr_lo = b as u32;
                        tx.addr_hi = (b >> 32) as u32;
                        let rx = &mut (*d).rx_desc[i];
                        let b = core::ptr::addr_of!((*d).rx_buf[i]) as u64;
                        rx.opts2 = 0;
                        rx.addr_lo = b as u32;
                        rx.addr_hi = (b >> 32) as u32;
                        rx.opts1 = DESC_OWN | eor | BUF as u32;
                    }
                }
                compiler_fence(Ordering::SeqCst);
                let txr = unsafe { core::ptr::addr_of!((*d).tx_desc) } as u64;
                let rxr = unsafe { core::ptr::addr_of!((*d).rx_desc) } as u64;
                // 8139cp's cp_start_hw order: CpCmd, ring addresses, then
                // CR last (QEMU resets the C+ ring indices on CR writes).
                r.w16(CPCMD, CPCMD_RX_TX);
                r.w32(TSAD0 + 8, 0); // high-priority ring: none
                r.w32(TSAD0 + 12, 0);
                r.w32(RDSAR, rxr as u32);
                r.w32(RDSAR + 4, (rxr >> 32) as u32);
                r.w32(TSAD0, txr as u32);
                r.w32(TSAD0 + 4, (txr >> 32) as u32);
                r.w8(CR, CR_RE | CR_TE);
                r.w8(ETTHR, 0x06);
                r.w32(RCR, RCR_CPLUS);
                r.w32(MAR0, 0);
                r.w32(MAR0 + 4, 0);
                r.w32(TCR, TCR_CPLUS);
                r.w16(MULINT, 0);
                r.w8(CFG9346, CFG9346_LOCK);
            }
        }
        // Lean: no interrupt sources. Linux shape: ack everything, then the
        // driver's mask with its flushing read-back (cp_enable_irq,
        // rtl8139_hw_start); the line stays off (PCI INTx disable) and the
        // IOAPIC pin masked, so IntrStatus is polled instead.
        r.w16(IMR, 0);
        r.w16(ISR, 0xffff);
        if shape.linux_like() {
            // The handler's poll flag and events belong to the chip just reset.
            crate::nicirq::reset_flags();
            r.w16(
                IMR,
                match mode {
                    Mode::C => RTL_INTR,
                    Mode::CPlus => CP_INTR,
                },
            );
            r.r16(IMR);
        }
        nic.link_up = r.r16(BMSR) & 0x0004 != 0;
        Ok(nic)
    }

    // ---- transmit ----

    /// Whether a TX buffer is free now (C mode may read a register).
    /// C+ only: leave IPv4, TCP and UDP checksums of sent frames to the chip (the
    /// stack must then not compute them: see `tx_checksum_offload`).
    pub fn set_tx_checksum_offload(&mut self, on: bool) {
        self.tx_csum = on && self.mode == Mode::CPlus;
    }

    pub fn tx_checksum_offload(&self) -> bool {
        self.tx_csum
    }

    /// The C+ offload bits for a frame: IPCS for any IPv4 packet, TCPCS / UDPCS by
    /// protocol (the stack sends no IP fragments, whose L4 sum the chip cannot do).
    fn offload_bits(frame: &[u8]) -> u32 {
        if frame.len() < 34 || frame[12..14] != [0x08, 0x00] || frame[14] >> 4 != 4 {
            return 0;
        }
        TXD_IPCS
            | match frame[23] {
                6 => TXD_TCPCS,
                17 => TXD_UDPCS,
                _ => 0,
            }
    }

    pub fn tx_ready(&mut self) -> bool {
        match self.mode {
            Mode::C if self.shape.linux_like() => {
                let i = self.tx_next;
                if self.tx_busy & (1 << i) != 0 {
                    // The queue is stopped until the TX interrupt frees one.
                    if self.shape == Shape::LinuxIrq {
                        self.take_irq_events();
                    } else {
                        self.linux_irq();
                    }
                }
                self.tx_busy & (1 << i) == 0
            }
            Mode::C => {
                let i = self.tx_next;
                if self.tx_busy & (1 << i) == 0 {
                    return true;
                }
                // The TX summary's low nibble: OWN3-0 (buffer given back).
                let own = (self.regs.r16(TX_SUMMARY) & 0xf) as u8;
                self.tx_busy &= !own;
                if self.tx_busy & (1 << i) != 0 {
                    // Fallback for a model without the summary register.
                    if self.regs.r32(TSD0 + 4 * i as u16) & TSD_OWN != 0 {
                        self.tx_busy &= !(1 << i);
                    }
                }
                self.tx_busy & (1 << i) == 0
            }
            Mode::CPlus => {
                let d = unsafe { core::ptr::addr_of!((*dma()).tx_desc[self.cp_tx].opts1) };
                (unsafe { read_volatile(d) } & DESC_OWN) == 0
            }
        }
    }

    /// Waits (bounded, ~100 ms) for a free TX buffer.
    fn tx_wait(&mut self) -> bool {
        if self.tx_ready() {
            return true;
        }
        let deadline = tsc::Deadline::after_ns(100_000_000);
        while !deadline.expired() {
            if self.tx_ready() {
                return true;
            }
        }
        false
    }

    /// Builds a frame of `len` bytes with `f` in the next TX buffer and
    /// hands it to the chip. The frame is dropped (and `f` runs on a
    /// scratch buffer) if no buffer frees up in time.
    pub fn transmit<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let len = len.min(MAX_FRAME);
        if !self.tx_wait() {
            self.stats.tx_dropped += 1;
            let mut scratch = [0u8; BUF];
            return f(&mut scratch[..len]);
        }
        let d = dma();
        let (idx, buf) = match self.mode {
            Mode::C => (self.tx_next, unsafe { &mut (*d).tx_buf[self.tx_next] }),
            Mode::CPlus => (self.cp_tx, unsafe { &mut (*d).tx_buf[self.cp_tx] }),
        };
        let ret = f(&mut buf[..len]);
        // The chip does not pad: 60 bytes minimum (no FCS).
        let wire = len.max(MIN_FRAME);
        if wire > len {
            buf[len..wire].fill(0);
        }
        compiler_fence(Ordering::SeqCst);
        match self.mode {
            Mode::C => {
                self.regs
                    .w32(TSD0 + 4 * idx as u16, TSD_ERTXTH | wire as u32);
                self.tx_busy |= 1 << idx;
                self.tx_next = (idx + 1) % C_TX_DESCS;
            }
            Mode::CPlus => {
                let eor = if idx == RING - 1 { DESC_EOR } else { 0 };
                let offload = if self.tx_csum {
                    Self::offload_bits(&buf[..wire])
                } else {
                    0
                };
                if offload != 0 {
                    self.stats.tx_csum_offloaded += 1;
                }
                unsafe {
                    let desc = core::ptr::addr_of_mut!((*d).tx_desc[idx]);
                    write_volatile(core::ptr::addr_of_mut!((*desc).opts2), 0);
                    compiler_fence(Ordering::SeqCst);
                    write_volatile(
                        core::ptr::addr_of_mut!((*desc).opts1),
                        DESC_OWN | eor | DESC_FS | DESC_LS | offload | wire as u32,
                    );
                }
                compiler_fence(Ordering::SeqCst);
                self.regs.w8(TPPOLL, TPPOLL_NPQ);
                self.cp_tx = (idx + 1) % RING;
            }
        }
        self.stats.tx_frames += 1;
        ret
    }

    /// C mode only: have the chip send `len` bytes it reads at guest-physical
    /// `gpa` (memory the driver does not own: a slot the host adds and removes)
    /// through the next descriptor, and wait (bounded, ~100 ms) for the
    /// descriptor to come back. Its own buffer address is restored after.
    pub fn tx_raw(&mut self, gpa: u32, len: u32) -> RawTx {
        if self.mode != Mode::C || !self.tx_wait() {
            return RawTx::NoAnswer;
        }
        let i = self.tx_next;
        let own = unsafe { core::ptr::addr_of!((*dma()).tx_buf[i]) } as u64 as u32;
        let tsd = TSD0 + 4 * i as u16;
        self.regs.w32(TSAD0 + 4 * i as u16, gpa);
        self.regs.w32(tsd, TSD_ERTXTH | (len & 0x1fff));
        self.tx_busy |= 1 << i;
        self.tx_next = (i + 1) % C_TX_DESCS;
        let deadline = tsc::Deadline::after_ns(100_000_000);
        let done = loop {
            let t = self.regs.r32(tsd);
            if t & TSD_OWN != 0 {
                break Some(t);
            }
            if deadline.expired() {
                break None;
            }
        };
        self.regs.w32(TSAD0 + 4 * i as u16, own);
        match done {
            None => RawTx::NoAnswer,
            Some(t) => {
                self.tx_busy &= !(1 << i);
                self.stats.tx_frames += 1;
                if t & TSD_TOK != 0 {
                    RawTx::Sent
                } else {
                    // TUN (the chip could not read the buffer) or TABT.
                    RawTx::Failed
                }
            }
        }
    }

    // ---- receive ----

    /// Whether a received frame is waiting (costs no register access
    /// unless a C-mode record is being written right now, or the device
    /// does not append a correct CRC).
    pub fn rx_peek(&mut self) -> bool {
        if self.pending.is_some() {
            return true;
        }
        if self.shape == Shape::Linux {
            return self.linux_rx_peek();
        }
        if self.shape == Shape::LinuxIrq {
            return self.irq_rx_peek();
        }
        match self.mode {
            Mode::C => self.c_rx_peek(),
            Mode::CPlus => self.cp_rx_peek(),
        }
    }

    /// Linux shape: what cp_interrupt / rtl8139_interrupt do, run where the
    /// interrupt would arrive (here: whenever the driver polls for work).
    fn linux_irq(&mut self) {
        let status = self.regs.r16(ISR);
        if status == 0 || status == 0xffff {
            return;
        }
        self.stats.irq_events += 1;
        match self.mode {
            Mode::CPlus => {
                // Everything but RX is acked here; RX at the top of the poll.
                if status & !CP_RX_INTR != 0 {
                    self.regs.w16(ISR, status & !CP_RX_INTR);
                }
                if status & CP_RX_INTR != 0 && !self.napi {
                    self.regs.w16(IMR, CP_NORX_INTR);
                    self.regs.r16(IMR);
                    self.napi = true;
                    self.napi_ack = true;
                }
                // cp_tx: completion is the descriptors' OWN bits in RAM,
                // which `tx_ready` reads.
            }
            Mode::C => {
                let ack = status & !(RX_ACK_BITS | INT_TER);
                if ack != 0 {
                    self.regs.w16(ISR, ack);
                }
                if status & RX_ACK_BITS != 0 && !self.napi {
                    self.regs.w16(IMR, RTL_NORX_INTR);
                    self.regs.r16(IMR);
                    self.napi = true;
                }
                if status & (INT_TOK | INT_TER) != 0 {
                    self.c_tx_interrupt();
                    if status & INT_TER != 0 {
                        self.regs.w16(ISR, INT_TER);
                    }
                }
            }
        }
    }

    /// rtl8139_tx_interrupt: the sent descriptors in order, each TSD's status
    /// read until one is not done yet.
    fn c_tx_interrupt(&mut self) {
        while self.tx_busy & (1 << self.tx_dirty) != 0 {
            let i = self.tx_dirty;
            let st = self.regs.r32(TSD0 + 4 * i as u16);
            if st & (TSD_TOK | TSD_TUN | TSD_TABT) == 0 {
                break;
            }
            self.tx_busy &= !(1 << i);
            self.tx_dirty = (i + 1) % C_TX_DESCS;
        }
    }

    /// Linux-irq shape: what the interrupt handler recorded since last time.
    /// C mode's TX completion (rtl8139_tx_interrupt) runs here, at CPL3.
    fn take_irq_events(&mut self) {
        let shared = crate::nicirq::shared();
        // Cheap test first: the swap is a locked instruction.
        if shared.pending.load(Ordering::Acquire) == 0 {
            return;
        }
        let status = shared.pending.swap(0, Ordering::AcqRel) as u16;
        self.stats.irq_events += 1;
        if self.mode == Mode::C && status & (INT_TOK | INT_TER) != 0 {
            self.c_tx_interrupt();
        }
    }

    /// Linux-irq shape: a poll starts when the handler has scheduled one (a
    /// flag in memory: waiting costs no exit), then runs as `Linux`'s.
    fn irq_rx_peek(&mut self) -> bool {
        self.take_irq_events();
        if !self.napi {
            if crate::nicirq::shared().napi.load(Ordering::Acquire) == 0 {
                return false;
            }
            self.napi = true;
            // cp_rx_poll acks RX at its start (C+; C acks per packet).
            self.napi_ack = true;
            self.stats.napi_polls += 1;
        }
        self.napi_poll()
    }

    /// Linux shape: the "interrupt" when not polling, then the NAPI-like
    /// poll: a frame if there is one, else napi_complete (unmask).
    fn linux_rx_peek(&mut self) -> bool {
        if !self.napi {
            self.linux_irq();
            if !self.napi {
                return false;
            }
            self.stats.napi_polls += 1;
        }
        self.napi_poll()
    }

    /// The NAPI-like poll's step: a frame if there is one, else
    /// napi_complete and the unmask.
    fn napi_poll(&mut self) -> bool {
        let found = match self.mode {
            Mode::CPlus => {
                if self.napi_ack {
                    // cp_rx_poll acks RX before it looks at the ring.
                    self.regs.w16(ISR, CP_RX_INTR);
                    self.napi_ack = false;
                }
                self.cp_rx_peek()
            }
            // rtl8139_rx's loop condition, then the record in the ring.
            Mode::C => {
                if self.regs.r8(CR) & CR_RX_BUF_EMPTY != 0 {
                    false
                } else if self.c_rx_peek() {
                    true
                } else {
                    // Not empty, but the record is still being written: poll
                    // again, RX still masked.
                    return false;
                }
            }
        };
        if !found {
            if self.shape == Shape::LinuxIrq {
                // napi_complete before the unmask, as the drivers: an RX
                // interrupt from the unmask on schedules the next poll.
                crate::nicirq::shared().napi.store(0, Ordering::Release);
            }
            self.regs.w16(
                IMR,
                match self.mode {
                    Mode::C => RTL_INTR,
                    Mode::CPlus => CP_INTR,
                },
            );
            self.regs.r16(IMR);
            self.napi = false;
        }
        found
    }

    fn c_rx_peek(&mut self) -> bool {
        let ring = unsafe { core::ptr::addr_of_mut!((*dma()).rx_ring) } as *mut u8;
        let off = self.rx_off;
        let hdr = unsafe { read_volatile(ring.add(off) as *const u32) };
        if hdr == 0 {
            return false;
        }
        let status = hdr & 0xffff;
        let len = (hdr >> 16) as usize; // frame + 4-byte CRC
        let plausible = status & RX_ROK != 0 && (8..=MAX_FRAME + 4 + 4).contains(&len);
        if plausible {
            Self::c_rx_linearize(ring, off, len);
        }
        if plausible && !self.rx_cbr_only {
            let frame = len - 4;
            let crc = crc32_volatile(unsafe { ring.add(off + 4) }, frame);
            let stored = unsafe { read_volatile(ring.add(off + 4 + frame) as *const [u8; 4]) };
            if crc == u32::from_le_bytes(stored) {
                self.pending = Some((off, frame));
                return true;
            }
        }
        // Not (yet) a complete, valid record: ask the chip whether its
        // write offset moved past this record.
        self.stats.rx_cbr_reads += 1;
        let cbr = self.regs.r16(CBR) as usize % RX_RING;
        if cbr == off {
            return false; // still being written
        }
        // Re-read: the record is complete now.
        let hdr = unsafe { read_volatile(ring.add(off) as *const u32) };
        let status = hdr & 0xffff;
        let len = (hdr >> 16) as usize;
        if status & RX_ROK == 0 || !(8..=MAX_FRAME + 4 + 4).contains(&len) {
            self.c_rx_reset();
            return false;
        }
        Self::c_rx_linearize(ring, off, len);
        self.pending = Some((off, len - 4));
        true
    }

    /// A record that runs past the ring end lands in the slack with WRAP = 1
    /// (as asked), or at the ring start on a device that ignores WRAP.
    /// Both places are zero unless written (the ring is zeroed behind the
    /// reader), so OR-ing the ring start into the slack yields the record
    /// in one piece either way. Idempotent while the write is in progress.
    fn c_rx_linearize(ring: *mut u8, off: usize, len: usize) {
        let end = off + 4 + len; // header + frame + CRC
        if end <= RX_RING {
            return;
        }
        for i in 0..end - RX_RING {
            unsafe {
                let b = read_volatile(ring.add(i));
                if b != 0 {
                    let p = ring.add(RX_RING + i);
                    write_volatile(p, read_volatile(p) | b);
                }
            }
        }
    }

    /// 8139too's RX reset after a bad header: RE off and on, RCR again
    /// (both ring pointers back to 0), ring cleared.
    fn c_rx_reset(&mut self) {
        self.stats.rx_resets += 1;
        let cr = self.regs.r8(CR);
        self.regs.w8(CR, cr & !CR_RE);
        unsafe {
            core::ptr::write_bytes(
                core::ptr::addr_of_mut!((*dma()).rx_ring) as *mut u8,
                0,
                RX_RING_ALLOC,
            )
        };
        compiler_fence(Ordering::SeqCst);
        self.regs.w8(CR, cr | CR_RE);
        self.regs.w32(RCR, self.rcr_c);
        self.rx_off = 0;
        self.rx_unreported = 0;
    }

    fn cp_rx_peek(&mut self) -> bool {
        let d = dma();
        loop {
            let i = self.cp_rx;
            let opts1 = unsafe { read_volatile(core::ptr::addr_of!((*d).rx_desc[i].opts1)) };
            if opts1 & DESC_OWN != 0 {
                return false;
            }
            let len = (opts1 & 0x1fff) as usize;
            let good = opts1 & (DESC_FS | DESC_LS) == DESC_FS | DESC_LS
                && opts1 & DESC_RX_RES == 0
                && (4 + 14..=BUF).contains(&len);
            if good {
                self.pending = Some((i, len - 4));
                return true;
            }
            // Bad or fragmented frame: give the descriptor back.
            self.cp_rx_release(i);
        }
    }

    fn cp_rx_release(&mut self, i: usize) {
        let eor = if i == RING - 1 { DESC_EOR } else { 0 };
        compiler_fence(Ordering::SeqCst);
        unsafe {
            write_volatile(
                core::ptr::addr_of_mut!((*dma()).rx_desc[i].opts1),
                DESC_OWN | eor | BUF as u32,
            )
        };
        self.cp_rx = (i + 1) % RING;
    }

    /// The frame found by `rx_peek`, in DMA memory. The slice stays valid
    /// until `rx_release`; the driver itself is not borrowed, so the frame
    /// can be processed while transmitting.
    ///
    /// # Safety
    /// Call only after `rx_peek` returned true; do not use the slice after
    /// `rx_release`.
    pub unsafe fn rx_frame(&self) -> &'static [u8] {
        let (pos, len) = self.pending.expect("rx_frame without a frame");
        let d = dma();
        match self.mode {
            Mode::C => {
                let ring = core::ptr::addr_of!((*d).rx_ring) as *const u8;
                core::slice::from_raw_parts(ring.add(pos + 4), len)
            }
            Mode::CPlus => {
                let b = core::ptr::addr_of!((*d).rx_buf[pos]) as *const u8;
                core::slice::from_raw_parts(b, len)
            }
        }
    }

    /// Gives the memory of the frame found by `rx_peek` back to the chip.
    pub fn rx_release(&mut self) {
        let Some((pos, len)) = self.pending.take() else {
            return;
        };
        compiler_fence(Ordering::SeqCst);
        match self.mode {
            Mode::C => {
                // Zero the record (header, frame, CRC, padding), which may
                // run into the slack past the ring end (WRAP = 1), so that
                // a non-zero header always means a new record.
                // A record past the ring end may also have its tail at the
                // ring start (device ignoring WRAP, see c_rx_linearize):
                // zero that too; with WRAP it is zero already.
                let rec = (4 + len + 4 + 3) & !3;
                unsafe {
                    let ring = core::ptr::addr_of_mut!((*dma()).rx_ring) as *mut u8;
                    core::ptr::write_bytes(ring.add(pos), 0, rec);
                    if pos + rec > RX_RING {
                        let tail = pos + rec - RX_RING;
                        if (0..tail).any(|i| read_volatile(ring.add(i)) != 0) {
                            self.stats.rx_split += 1;
                        }
                        core::ptr::write_bytes(ring, 0, tail);
                    }
                }
                compiler_fence(Ordering::SeqCst);
                self.rx_off = (pos + rec) % RX_RING;
                self.rx_unreported += rec;
                if self.shape.linux_like() {
                    // rtl8139_rx per packet: RxBufPtr, then rtl8139_isr_ack.
                    self.rx_unreported = 0;
                    self.regs.w16(CAPR, (self.rx_off as u16).wrapping_sub(16));
                    if self.regs.r16(ISR) & RX_ACK_BITS != 0 {
                        self.regs.w16(ISR, RX_ACK_BITS);
                        self.regs.r16(ISR);
                    }
                } else if self.rx_unreported >= CAPR_BATCH {
                    self.rx_unreported = 0;
                    self.regs.w16(CAPR, (self.rx_off as u16).wrapping_sub(16));
                }
            }
            Mode::CPlus => self.cp_rx_release(pos),
        }
        self.stats.rx_frames += 1;
    }
}

// ---- 93C46 EEPROM, bit-banged through Cfg9346 (8139too's read_eeprom) ----

const EE_CS: u8 = 0x08;
const EE_SHIFT_CLK: u8 = 0x04;
const EE_DATA_WRITE: u8 = 0x02;
const EE_DATA_READ: u8 = 0x01;
const EE_ENB: u8 = 0x80 | EE_CS;
const EE_READ_CMD: u32 = 6; // start bit + READ opcode

/// Reads one 16-bit word. Linux adds a dummy Cfg9346 read after each
/// write as a delay; a VM needs none, and each would be one more exit.
fn eeprom_read(r: &mut Regs, location: u8, addr_len: u32) -> u16 {
    let cmd = location as u32 | EE_READ_CMD << addr_len;
    r.w8(CFG9346, EE_ENB & !EE_CS);
    r.w8(CFG9346, EE_ENB);
    for i in (0..=4 + addr_len).rev() {
        let bit = if cmd & (1 << i) != 0 {
            EE_DATA_WRITE
        } else {
            0
        };
        r.w8(CFG9346, EE_ENB | bit);
        r.w8(CFG9346, EE_ENB | bit | EE_SHIFT_CLK);
    }
    r.w8(CFG9346, EE_ENB);
    let mut v: u16 = 0;
    for _ in 0..16 {
        r.w8(CFG9346, EE_ENB | EE_SHIFT_CLK);
        v = v << 1 | (r.r8(CFG9346) & EE_DATA_READ) as u16;
        r.w8(CFG9346, EE_ENB);
    }
    // Back to normal operation (EEM = 00; never 01: that is auto-load,
    // a full chip reset).
    r.w8(CFG9346, 0);
    v
}

// ---- CRC-32 (IEEE 802.3, as the chip appends it) ----

const fn crc_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

/// Slicing-by-8 tables: `[k][b]` is the CRC of byte `b` followed by `k` zero bytes.
const fn crc_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    t[0] = crc_table();
    let mut i = 0;
    while i < 256 {
        let mut k = 1;
        while k < 8 {
            let prev = t[k - 1][i];
            t[k][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            k += 1;
        }
        i += 1;
    }
    t
}

static CRC_TABLES: [[u32; 256]; 8] = crc_tables();

/// CRC-32 of memory the device may be writing concurrently: volatile loads, eight
/// bytes at a time (slicing-by-8; a byte at a time cost ~3 us per full frame, a
/// third of a bulk stream's time per frame in the guest).
fn crc32_volatile(p: *const u8, len: usize) -> u32 {
    let t = &CRC_TABLES;
    let mut c = !0u32;
    let mut i = 0;
    while i + 8 <= len {
        // [u8; 8] has alignment 1: one unaligned 8-byte load.
        let b = unsafe { read_volatile(p.add(i) as *const [u8; 8]) };
        let lo = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) ^ c;
        let hi = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        c = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][(hi & 0xff) as usize]
            ^ t[2][((hi >> 8) & 0xff) as usize]
            ^ t[1][((hi >> 16) & 0xff) as usize]
            ^ t[0][(hi >> 24) as usize];
        i += 8;
    }
    while i < len {
        let b = unsafe { read_volatile(p.add(i)) };
        c = t[0][((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
        i += 1;
    }
    !c
}

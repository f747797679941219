use super::*;
use crate::dma::VecGuestMemory;
use crate::irq::RecordingIrq;
use crate::net::RecordingSink;
use crate::pci::{PCI_COMMAND_IO, PCI_COMMAND_MEMORY};
use std::sync::atomic::Ordering;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
pub(crate) const MEM: usize = 1 << 20;

pub(crate) struct H {
    pub dev: Arc<Rtl8139>,
    pub mem: Arc<VecGuestMemory>,
    pub irq: Arc<RecordingIrq>,
    pub sink: Arc<RecordingSink>,
}

impl H {
    pub fn new(revision: u8) -> H {
        let mem = Arc::new(VecGuestMemory::new(0, MEM));
        let irq = Arc::new(RecordingIrq::default());
        let sink = Arc::new(RecordingSink::default());
        let dev = Arc::new(
            Rtl8139::new(
                Rtl8139Config { mac: MAC, revision },
                mem.clone(),
                irq.clone(),
                sink.clone(),
            )
            .unwrap(),
        );
        dev.command_written(PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
        H {
            dev,
            mem,
            irq,
            sink,
        }
    }
    pub fn w8(&self, off: u64, v: u8) {
        self.dev.write(0, off, &[v]);
    }
    pub fn w16(&self, off: u64, v: u16) {
        self.dev.write(0, off, &v.to_le_bytes());
    }
    pub fn w32(&self, off: u64, v: u32) {
        self.dev.write(0, off, &v.to_le_bytes());
    }
    pub fn r8(&self, off: u64) -> u8 {
        let mut b = [0u8; 1];
        self.dev.read(0, off, &mut b);
        b[0]
    }
    pub fn r16(&self, off: u64) -> u16 {
        let mut b = [0u8; 2];
        self.dev.read(0, off, &mut b);
        u16::from_le_bytes(b)
    }
    pub fn r32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read(0, off, &mut b);
        u32::from_le_bytes(b)
    }
    pub fn poke(&self, gpa: u64, data: &[u8]) {
        self.mem.write(gpa, data).unwrap();
    }
    pub fn peek(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem.read(gpa, &mut b).unwrap();
        b
    }
    pub fn level(&self) -> bool {
        self.irq.level.load(Ordering::SeqCst)
    }
}

// ---------- frame builders and a reference checksum ----------

fn ref_csum(parts: &[&[u8]]) -> u16 {
    let mut all = Vec::new();
    for p in parts {
        all.extend_from_slice(p);
    }
    if all.len() % 2 == 1 {
        all.push(0);
    }
    let mut s: u32 = 0;
    for c in all.chunks(2) {
        s += ((c[0] as u32) << 8) | c[1] as u32;
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn ref_l4_ok(frame: &[u8]) -> bool {
    let ihl = ((frame[14] & 0xf) * 4) as usize;
    let tot = u16::from_be_bytes([frame[16], frame[17]]) as usize;
    let l4 = &frame[14 + ihl..14 + tot];
    let mut ph = Vec::new();
    ph.extend_from_slice(&frame[26..34]);
    ph.push(0);
    ph.push(frame[23]);
    ph.extend_from_slice(&((tot - ihl) as u16).to_be_bytes());
    ref_csum(&[&ph, l4]) == 0
}

fn ref_ip_ok(frame: &[u8]) -> bool {
    let ihl = ((frame[14] & 0xf) * 4) as usize;
    ref_csum(&[&frame[14..14 + ihl]]) == 0
}

pub(crate) fn ipv4_frame(proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&[0x08, 0x00]);
    let tot = (20 + l4.len()) as u16;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&tot.to_be_bytes());
    f.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, proto, 0xde, 0xad]);
    f.extend_from_slice(&[169, 254, 1, 1, 169, 254, 1, 2]);
    f.extend_from_slice(l4);
    f
}

pub(crate) fn tcp_frame(payload: &[u8], flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&1234u16.to_be_bytes());
    t[2..4].copy_from_slice(&80u16.to_be_bytes());
    t[4..8].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[16] = 0xbe;
    t[17] = 0xef;
    t.extend_from_slice(payload);
    ipv4_frame(6, &t)
}

fn udp_frame(payload: &[u8]) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&5000u16.to_be_bytes());
    u[2..4].copy_from_slice(&5001u16.to_be_bytes());
    u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u[6] = 0x11;
    u.extend_from_slice(payload);
    ipv4_frame(17, &u)
}

pub(crate) fn frame_to(dst: [u8; 6], len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 9]);
    f[12] = 0x08;
    for (i, b) in f.iter_mut().enumerate().skip(14) {
        *b = i as u8;
    }
    f
}

// ---------- EEPROM ----------

/// Linux `read_eeprom` (8139too with `extra` = 4 + 1 leading bits, 8139cp 3).
fn linux_read_eeprom(h: &H, location: u32, addr_len: u32, cmd_bits: u32) -> u16 {
    let read_cmd = location | (6 << addr_len);
    h.w8(0x50, 0x80);
    h.w8(0x50, 0x88);
    for i in (0..=(cmd_bits + addr_len - 1) as i32).rev() {
        let dv = if read_cmd & (1 << i) != 0 { 2 } else { 0 };
        h.w8(0x50, 0x88 | dv);
        h.r8(0x50);
        h.w8(0x50, 0x88 | dv | 4);
        h.r8(0x50);
    }
    h.w8(0x50, 0x88);
    h.r8(0x50);
    let mut retval = 0u16;
    for _ in 0..16 {
        h.w8(0x50, 0x8C);
        h.r8(0x50);
        retval = (retval << 1) | (h.r8(0x50) & 1) as u16;
        h.w8(0x50, 0x88);
        h.r8(0x50);
    }
    h.w8(0x50, 0);
    retval
}

#[test]
fn eeprom_reads_mac_as_8139too_and_8139cp_do() {
    let h = H::new(REVISION_C);
    // 8139too: 4 + addr_len + 1 bits.
    let probe = linux_read_eeprom(&h, 0, 8, 5);
    assert_ne!(probe, 0x8129, "93C46 must not look like a 93C56");
    assert_eq!(linux_read_eeprom(&h, 0, 6, 5), 0x8129);
    assert_eq!(linux_read_eeprom(&h, 1, 6, 5), 0x10ec);
    assert_eq!(linux_read_eeprom(&h, 2, 6, 5), 0x8139);
    let mut mac = [0u8; 6];
    for i in 0..3 {
        let w = linux_read_eeprom(&h, 7 + i as u32, 6, 5);
        mac[2 * i..2 * i + 2].copy_from_slice(&w.to_le_bytes());
    }
    assert_eq!(mac, MAC);
    // 8139cp: 3 + addr_len bits.
    assert_eq!(
        linux_read_eeprom(&h, 8, 6, 3),
        u16::from_le_bytes([MAC[2], MAC[3]])
    );
    // Out of programming mode the register reads back plain, EEDO low.
    assert_eq!(h.r8(0x50), 0);
}

fn ee_shift(h: &H, bits: u32, n: u32) {
    for i in (0..n).rev() {
        let dv = if bits & (1 << i) != 0 { 2 } else { 0 };
        h.w8(0x50, 0x88 | dv);
        h.w8(0x50, 0x8C | dv);
    }
    h.w8(0x50, 0x88);
}

#[test]
fn eeprom_write_needs_ewen_and_reset_reloads_mac() {
    let h = H::new(REVISION_CPLUS);
    h.w8(0x50, 0x80);
    h.w8(0x50, 0x88);
    // WRITE without EWEN: ignored.
    ee_shift(&h, (0b101 << 6) | 7, 9);
    ee_shift(&h, 0x1122, 16);
    h.w8(0x50, 0x80);
    assert_eq!(
        linux_read_eeprom(&h, 7, 6, 3),
        u16::from_le_bytes([MAC[0], MAC[1]])
    );
    h.w8(0x50, 0x80);
    h.w8(0x50, 0x88);
    ee_shift(&h, (0b100 << 6) | 0x30, 9); // EWEN
    h.w8(0x50, 0x80);
    h.w8(0x50, 0x88);
    ee_shift(&h, (0b101 << 6) | 7, 9);
    ee_shift(&h, 0x1122, 16);
    h.w8(0x50, 0x80);
    assert_eq!(linux_read_eeprom(&h, 7, 6, 3), 0x1122);
    // Auto-load (EEM=01) resets and reloads IDR from the EEPROM.
    h.w8(0x50, 0x40);
    assert_eq!(h.r8(0x50), 0);
    assert_eq!(h.r8(0), 0x22);
    assert_eq!(h.r8(1), 0x11);
}

// ---------- basic registers ----------

#[test]
fn reset_values_and_revision_bits() {
    let h = H::new(REVISION_CPLUS);
    assert_eq!(h.r32(0x40) & 0x7cc0_0000, HWVER_8139CPLUS);
    assert_eq!(h.r8(0x43), (HWVER_8139CPLUS >> 24) as u8);
    assert_eq!(h.r8(0x5e), 0x20);
    assert_eq!(h.r16(0x38), 0xfff0);
    assert_eq!(h.r8(0x37), CR_BUFE);
    assert_eq!(h.r32(0x10), TSD_OWN);
    assert_eq!(h.r16(0x60), 0x000f);
    assert_eq!(h.r16(0x64), BMSR_LINK_UP);
    assert_eq!(h.r16(0x66), 0x05e1);
    assert_eq!(h.r8(0x58) & 4, 0);
    assert_eq!(h.r8(0x52), 0x0c);
    let mut idr = [0u8; 6];
    h.dev.read(0, 0, &mut idr);
    assert_eq!(idr, MAC);
    let c = H::new(REVISION_C);
    assert_eq!(c.r32(0x40) & 0x7cc0_0000, HWVER_8139C);
    // PCI identity follows the revision.
    assert_eq!(c.dev.ids().revision, 0x10);
    assert_eq!(c.dev.ids().class, 0x020000);
}

#[test]
fn cr_reset_is_synchronous() {
    let h = H::new(REVISION_C);
    h.w8(0x37, 0x0c);
    h.w16(0x3c, 0xffff);
    h.w8(0x37, CR_RST);
    assert_eq!(h.r8(0x37) & (CR_RST | CR_RE | CR_TE), 0);
    assert_eq!(h.r16(0x3c), 0);
}

#[test]
fn mode_is_c_plus_from_the_first_cpcmd_write_until_a_reset() {
    for revision in [REVISION_CPLUS, REVISION_C] {
        let h = H::new(revision);
        assert_eq!(h.dev.mode(), Rtl8139Mode::C, "power-on, rev {revision:#x}");
        let f = frame_to([0xff; 6], 60);
        h.poke(0x1_0000, &f);
        // Any CpCmd write selects the C+ registers, even one enabling neither TX nor RX:
        // TSD0's offset is DTCCR then, and a write there sends nothing.
        h.w16(CPCMD as u64, 0);
        assert_eq!(h.dev.mode(), Rtl8139Mode::CPlus);
        c_mode_up(&h);
        h.w32(TSD0 as u64, 60);
        assert!(h.sink.take().is_empty(), "rev {revision:#x}");
        h.w8(0x37, CR_RST);
        assert_eq!(h.dev.mode(), Rtl8139Mode::C, "CR.RST");
        c_mode_up(&h);
        h.w32(TSD0 as u64, 60);
        assert_eq!(h.sink.take(), vec![f.clone()], "C mode: TSD0 sends");
        h.w16(CPCMD as u64, CPCMD_TXENB | CPCMD_RXENB);
        assert_eq!(h.dev.mode(), Rtl8139Mode::CPlus);
        h.dev.reset();
        assert_eq!(h.dev.mode(), Rtl8139Mode::C, "device reset");
    }
}

#[test]
fn tcr_ignores_writes_while_tx_off() {
    let h = H::new(REVISION_C);
    h.w32(0x40, 0x0300_0680);
    assert_eq!(h.r32(0x40), HWVER_8139C);
    h.w8(0x37, CR_TE);
    h.w32(0x40, 0xffff_ffff);
    assert_eq!(h.r32(0x40), HWVER_8139C | TCR_WRITABLE);
}

#[test]
fn isr_write_one_to_clear_and_irq_level() {
    let h = H::new(REVISION_C);
    h.w8(0x37, 0x0c);
    h.w16(0x3c, 0xffff);
    assert_eq!(h.r16(0x3c), INT_MASK);
    h.dev.set_link(false);
    assert_eq!(h.r16(0x3e), INT_LINKCHG);
    assert!(h.level());
    assert_eq!(h.r8(0x58) & 4, 4);
    assert_eq!(h.r16(0x64) & 4, 0);
    // Writing 0 clears nothing; reads have no side effect.
    h.w16(0x3e, 0);
    assert_eq!(h.r16(0x3e), INT_LINKCHG);
    // Acking one bit while another is pending re-asserts (a fresh edge for
    // edge-only backends).
    h.w16(0x3c, 0xffff);
    h.w8(0xd9, TPPOLL_FSWINT);
    h.w16(0x3e, INT_SWINT);
    assert!(h.level());
    h.dev.set_link(true);
    h.w16(0x3e, INT_LINKCHG);
    assert_eq!(h.r16(0x3e), 0);
    assert!(!h.level());
    // Masking drops the line; unmasking raises it again.
    h.dev.set_link(false);
    assert!(h.level());
    h.w16(0x3c, 0);
    assert!(!h.level());
    h.w16(0x3c, INT_LINKCHG);
    assert!(h.level());
    assert!(h.dev.irq_asserted());
    // INTx disable in the PCI command register holds the line low.
    h.dev
        .command_written(PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE);
    assert!(!h.level());
}

#[test]
fn config_registers_need_unlock() {
    let h = H::new(REVISION_C);
    h.w8(0x52, 0xf3);
    assert_eq!(h.r8(0x52), 0x0c);
    h.w8(0x50, 0xc0);
    h.w8(0x52, 0xf3);
    assert_eq!(h.r8(0x52), 0xff);
    h.w8(0x59, 0xff);
    assert_eq!(h.r8(0x59), 0x71);
    h.w8(0x51, 0xff);
    assert_eq!(h.r8(0x51), 0x07);
    h.w8(0x50, 0x00);
    h.w8(0x59, 0x00);
    assert_eq!(h.r8(0x59), 0x71);
    // Config5 needs no unlock.
    h.w8(0xd8, 0xff);
    assert_eq!(h.r8(0xd8), 0x7f);
}

#[test]
fn mpc_and_timer() {
    let h = H::new(REVISION_C);
    h.w16(0x3c, INT_TIMEOUT);
    h.w32(0x54, 10); // 300 ns after the TCTR reset below
    h.w32(0x48, 0);
    std::thread::sleep(std::time::Duration::from_millis(2));
    assert!(h.r32(0x48) > 10);
    assert_eq!(h.r16(0x3e) & INT_TIMEOUT, INT_TIMEOUT);
    assert!(h.level());
    h.w16(0x3e, INT_TIMEOUT);
    // Fires once per pass of the counter, not again at once.
    assert_eq!(h.r16(0x3e) & INT_TIMEOUT, 0);
    assert!(h.dev.next_timer_deadline().is_some());
    h.w32(0x54, 0);
    assert!(h.dev.next_timer_deadline().is_none());
    // HltClk halts the timer.
    h.w8(0x5b, b'H');
    assert_eq!(h.r8(0x5b), 0);
    h.w8(0x5b, b'R');
    assert_eq!(h.r8(0x5b), 1);
}

#[test]
fn timer_changes_wake_the_io_thread_and_poll_timer_fires_without_register_access() {
    let h = H::new(REVISION_C);
    let _ = h.dev.timer_event().read();
    h.w16(0x3c, INT_TIMEOUT);
    h.w32(0x48, 0);
    assert_eq!(h.dev.timer_event().read().unwrap(), 1, "TCTR written");
    h.w32(0x54, 3_000); // 90 us after the TCTR reset
    assert_eq!(h.dev.timer_event().read().unwrap(), 1, "TimerInt written");
    let due = h.dev.next_timer_deadline().expect("armed");
    // Nothing touches a register: the I/O thread sleeps until `due`, then polls.
    while std::time::Instant::now() < due {
        std::thread::sleep(due - std::time::Instant::now());
    }
    assert!(!h.level(), "nothing checked the timer yet");
    h.dev.poll_timer();
    assert!(h.level());
    assert_eq!(h.r16(0x3e) & INT_TIMEOUT, INT_TIMEOUT);
    // Halting the clock moves the deadline too.
    h.w8(0x5b, b'H');
    assert_eq!(h.dev.timer_event().read().unwrap(), 1, "HltClk written");
    assert!(h.dev.next_timer_deadline().is_none());
}

// ---------- C-mode TX ----------

fn c_mode_up(h: &H) {
    h.w8(0x37, 0x0c);
    h.w32(0x40, 0x0300_0680);
    h.w32(0x44, 0x0000_f78a & !(3 << 11)); // 8K, WRAP, AB, APM
    h.w16(0x3c, 0xc07f);
    for i in 0..4 {
        h.w32(0x20 + 4 * i, 0x1_0000 + 0x800 * i as u32);
    }
    h.w32(0x30, 0x8_0000);
}

#[test]
fn c_tx_sends_exact_bytes_sets_tok_and_irq() {
    let h = H::new(REVISION_C);
    c_mode_up(&h);
    let f = frame_to([0xff; 6], 60);
    h.poke(0x1_0000, &f);
    // Stale bytes beyond SIZE must not leave.
    h.poke(0x1_0000 + 60, &[0xee; 100]);
    h.w32(0x10, 0x0008_0000 | 60);
    assert_eq!(h.sink.take(), vec![f]);
    let tsd = h.r32(0x10);
    assert_eq!(tsd & (TSD_OWN | TSD_TOK), TSD_OWN | TSD_TOK);
    assert_eq!(tsd & TSD_SIZE, 60);
    assert_eq!(h.r16(0x3e) & INT_TOK, INT_TOK);
    assert!(h.level());
    assert_eq!(h.r16(0x60) & 0x1001, 0x1001);
    h.w16(0x3e, INT_TOK);
    assert!(!h.level());
    let s = h.dev.stats();
    assert_eq!((s.tx_packets, s.tx_bytes), (1, 60));
}

#[test]
fn c_tx_round_robin_and_pending_until_te() {
    let h = H::new(REVISION_C);
    c_mode_up(&h);
    for i in 0..4u8 {
        h.poke(0x1_0000 + 0x800 * i as u64, &frame_to([i; 6], 64));
    }
    // Descriptor 1 first: it waits for 0 (strict round robin).
    h.w32(0x14, 64);
    assert!(h.sink.take().is_empty());
    h.w32(0x10, 64);
    let got = h.sink.take();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0][0], 0);
    assert_eq!(got[1][0], 1);
    // TX off: descriptors 2 and 3 wait, then go on TE.
    h.w8(0x37, CR_RE);
    h.w32(0x18, 64);
    h.w32(0x1c, 64);
    assert!(h.sink.take().is_empty());
    h.w8(0x37, CR_RE | CR_TE);
    let got = h.sink.take();
    assert_eq!(got.len(), 2);
    assert_eq!(got[1][0], 3);
    // Wraps back to descriptor 0.
    h.w32(0x10, 64);
    assert_eq!(h.sink.take().len(), 1);
}

#[test]
fn c_tx_errors_set_status_bits() {
    let h = H::new(REVISION_C);
    c_mode_up(&h);
    h.w32(0x10, 1793);
    assert_eq!(
        h.r32(0x10) & (TSD_OWN | TSD_TABT | TSD_TOK),
        TSD_OWN | TSD_TABT
    );
    assert_eq!(h.r16(0x3e) & INT_TER, INT_TER);
    // Buffer outside RAM: underrun, system error, nothing sent.
    h.w32(0x24, 0xffff_f000);
    h.w32(0x14, 100);
    assert_eq!(
        h.r32(0x14) & (TSD_OWN | TSD_TUN | TSD_TOK),
        TSD_OWN | TSD_TUN
    );
    assert_eq!(h.r16(0x3e) & INT_SERR, INT_SERR);
    assert!(h.sink.take().is_empty());
    assert_eq!(h.dev.stats().tx_errors, 2);
    // Sink refusal counts as a drop, the descriptor still completes.
    h.sink.refuse.store(true, Ordering::SeqCst);
    h.w32(0x18, 60);
    assert_eq!(h.r32(0x18) & TSD_TOK, TSD_TOK);
    assert_eq!(h.dev.stats().tx_dropped, 1);
}

#[test]
fn no_dma_without_bus_master() {
    let h = H::new(REVISION_C);
    c_mode_up(&h);
    h.dev.command_written(PCI_COMMAND_IO);
    h.poke(0x1_0000, &frame_to([0xff; 6], 60));
    h.w32(0x10, 60);
    assert!(h.sink.take().is_empty());
    assert_eq!(h.r32(0x10) & TSD_OWN, 0);
    assert_eq!(h.dev.receive(&frame_to([0xff; 6], 60)), RxResult::Disabled);
    h.dev.command_written(PCI_COMMAND_IO | PCI_COMMAND_MASTER);
    h.dev.process_tx();
    assert_eq!(h.sink.take().len(), 1);
}

// ---------- C-mode RX ----------

const RING: u64 = 0x8_0000;

fn rx_record(h: &H, off: usize) -> (u16, u16) {
    let b = h.peek(RING + off as u64, 4);
    (
        u16::from_le_bytes([b[0], b[1]]),
        u16::from_le_bytes([b[2], b[3]]),
    )
}

#[test]
fn c_rx_header_crc_alignment_capr_cbr() {
    let h = H::new(REVISION_C);
    c_mode_up(&h);
    let f = frame_to(MAC, 61);
    assert_eq!(h.dev.receive(&f), RxResult::Accepted);
    let (status, len) = rx_record(&h, 0);
    assert_eq!(status, RXS_ROK | RXS_PAM);
    assert_eq!(len, 65);
    assert_eq!(h.peek(RING + 4, 61), f);
    let crc = crate::net::crc32_ieee(&f);
    assert_eq!(h.peek(RING + 4 + 61, 4), crc.to_le_bytes());
    assert_eq!(h.r16(0x3a), 72); // align4(4 + 65)
    assert_eq!(h.r8(0x37) & CR_BUFE, 0);
    assert_eq!(h.r16(0x3e) & INT_ROK, INT_ROK);
    assert!(h.level());
    // Short frames are padded to 60 (+CRC).
    let short = frame_to([0xff; 6], 42);
    assert_eq!(h.dev.receive(&short), RxResult::Accepted);
    let (status, len) = rx_record(&h, 72);
    assert_eq!(status, RXS_ROK | RXS_BAR);
    assert_eq!(len, 64);
    assert_eq!(h.peek(RING + 76 + 42, 18), vec![0; 18]);
    // Driver consumes both: CAPR = cur_rx - 16, BUFE comes back.
    h.w16(0x38, (72 + 68 - 16) as u16);
    assert_eq!(h.r16(0x38), 124);
    assert_eq!(h.r8(0x37) & CR_BUFE, CR_BUFE);
}

#[test]
fn c_rx_wrap_modes() {
    for wrap in [false, true] {
        let h = H::new(REVISION_C);
        c_mode_up(&h);
        let rcr = if wrap { 0x8a } else { 0x0a };
        h.w32(0x44, rcr);
        // Advance the write offset to near the end of the 8K ring.
        let f = frame_to(MAC, 1000);
        let mut consumed = 0usize;
        for _ in 0..8 {
            assert_eq!(h.dev.receive(&f), RxResult::Accepted);
            consumed += 1008;
            h.w16(0x38, (consumed as u16).wrapping_sub(16));
        }
        assert_eq!(h.r16(0x3a) as usize, 8064);
        let g = frame_to(MAC, 300);
        assert_eq!(h.dev.receive(&g), RxResult::Accepted);
        let rec_end: usize = 8064 + 4 + 300 + 4;
        if wrap {
            // Linear past the end.
            assert_eq!(h.peek(RING + 8064 + 4, 300), g);
        } else {
            let first = 8192 - 8064 - 4;
            assert_eq!(h.peek(RING + 8068, first), g[..first].to_vec());
            assert_eq!(h.peek(RING, 300 - first), g[first..].to_vec());
            // Nothing written past the ring end.
            assert_eq!(h.peek(RING + 8192, 64), vec![0; 64]);
        }
        assert_eq!(h.r16(0x3a) as usize, rec_end.div_ceil(4) * 4 % 8192);
    }
}

#[test]
fn c_rx_overflow_when_full_and_space_event() {
    let h = H::new(REVISION_C);
    c_mode_up(&h);
    let f = frame_to(MAC, 1500);
    let mut n = 0;
    while h.dev.receive(&f) == RxResult::Accepted {
        n += 1;
        assert!(n < 10);
    }
    assert_eq!(n, 5); // 5 * 1508 = 7540; a 6th would reach the read pointer
    assert_eq!(h.r16(0x3e) & INT_RXOVW, INT_RXOVW);
    assert_eq!(h.r32(0x4c), 1);
    assert!(!h.dev.can_receive());
    let s = h.dev.stats();
    assert_eq!((s.rx_packets, s.rx_ring_full), (5, 1));
    // Nothing signalled yet; a CAPR write signals.
    assert!(h.dev.rx_space_event().read().is_err());
    h.w16(0x38, 1508 * 2 - 16);
    assert_eq!(h.dev.rx_space_event().read().unwrap(), 1);
    assert!(h.dev.can_receive());
    assert_eq!(h.dev.receive(&f), RxResult::Accepted);
    h.w32(0x4c, 0);
    assert_eq!(h.r32(0x4c), 0);
}

#[test]
fn re_restart_resets_ring_pointers() {
    let h = H::new(REVISION_C);
    c_mode_up(&h);
    h.dev.receive(&frame_to(MAC, 100));
    assert_ne!(h.r16(0x3a), 0);
    // 8139too's RX reset: RE off, RE on.
    h.w8(0x37, CR_TE);
    h.w8(0x37, CR_TE | CR_RE);
    assert_eq!(h.r16(0x3a), 0);
    assert_eq!(h.r16(0x38), 0xfff0);
}

#[test]
fn rcr_filtering_and_multicast_hash() {
    let h = H::new(REVISION_C);
    c_mode_up(&h);
    h.w32(0x44, 0x8a & !RCR_AB); // APM only
    let mc = [0x01, 0x00, 0x5e, 0x00, 0x00, 0x01];
    assert_eq!(h.dev.receive(&frame_to([0xff; 6], 60)), RxResult::Filtered);
    assert_eq!(
        h.dev.receive(&frame_to([2, 2, 2, 2, 2, 2], 60)),
        RxResult::Filtered
    );
    assert_eq!(h.dev.receive(&frame_to(mc, 60)), RxResult::Filtered);
    assert_eq!(h.dev.receive(&frame_to(MAC, 60)), RxResult::Accepted);
    // AM without the hash bit: filtered; with it (8139too's computation): accepted.
    h.w32(0x44, 0x8a | RCR_AM);
    assert_eq!(h.dev.receive(&frame_to(mc, 60)), RxResult::Filtered);
    let bit = crate::net::ether_crc_be(&mc) >> 26;
    let mut filt = [0u32; 2];
    filt[(bit >> 5) as usize] |= 1 << (bit & 31);
    h.w32(0x08, filt[0]);
    h.w32(0x0c, filt[1]);
    assert_eq!(h.dev.receive(&frame_to(mc, 60)), RxResult::Accepted);
    let (status, _) = rx_record(&h, 68);
    assert_eq!(status, RXS_ROK | RXS_MAR);
    // Another group with a different hash bit stays out.
    let other = [0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb];
    assert_ne!(crate::net::ether_crc_be(&other) >> 26, bit);
    assert_eq!(h.dev.receive(&frame_to(other, 60)), RxResult::Filtered);
    // AAP takes everything, without a match flag.
    h.w32(0x44, 0x8a | RCR_AAP);
    assert_eq!(
        h.dev.receive(&frame_to([2, 2, 2, 2, 2, 2], 60)),
        RxResult::Accepted
    );
    let (status, _) = rx_record(&h, 136);
    assert_eq!(status, RXS_ROK);
    // Invalid sizes.
    assert_eq!(h.dev.receive(&[0u8; 13]), RxResult::Invalid);
    assert_eq!(h.dev.receive(&vec![0u8; MAX_FRAME + 1]), RxResult::Invalid);
    // RX off.
    h.w8(0x37, CR_TE);
    assert_eq!(h.dev.receive(&frame_to(MAC, 60)), RxResult::Disabled);
    assert!(h.dev.can_receive());
}

#[test]
fn c_rx_ring_outside_ram_sets_serr() {
    let h = H::new(REVISION_C);
    c_mode_up(&h);
    h.w32(0x30, 0xfff0_0000);
    assert_eq!(h.dev.receive(&frame_to(MAC, 60)), RxResult::Disabled);
    assert_eq!(h.r16(0x3e) & INT_SERR, INT_SERR);
    assert_eq!(h.r16(0x3a), 0);
}

#[test]
fn loopback_is_queued_not_recursive() {
    let h = H::new(REVISION_C);
    c_mode_up(&h);
    h.w32(0x40, 0x0300_0680 | (3 << 17));
    let f = frame_to(MAC, 80);
    h.poke(0x1_0000, &f);
    h.w32(0x10, 80);
    assert!(h.sink.take().is_empty());
    assert_eq!(h.peek(RING + 4, 80), f);
    assert_eq!(h.r16(0x3e) & (INT_TOK | INT_ROK), INT_TOK | INT_ROK);
    assert_eq!(h.dev.stats().loopback_packets, 1);
    // A TX buffer that is the RX ring itself: still bounded, no recursion.
    h.w32(0x44, 0x8b);
    h.w32(0x24, RING as u32);
    h.w32(0x14, 80);
    h.w32(0x28, RING as u32);
    h.w32(0x18, 80);
    assert_eq!(h.dev.stats().rx_packets, 3);
}

// ---------- C+ mode ----------

const RXR: u64 = 0x2_0000;
pub(crate) const TXR: u64 = 0x3_0000;

pub(crate) fn cplus_up(h: &H, cpcmd: u16) {
    h.w16(0x3e, !h.r16(0x3e));
    h.w16(0x3c, 0);
    h.w8(0x37, 0);
    h.w16(0xe0, 0);
    h.w8(0x37, CR_RST);
    h.w8(0x50, 0xc0);
    h.w16(0xe0, cpcmd);
    h.w32(0x28, 0);
    h.w32(0x2c, 0);
    h.w32(0xe4, RXR as u32);
    h.w32(0xe8, 0);
    h.w32(0x20, TXR as u32);
    h.w32(0x24, 0);
    h.w8(0x37, 0x0c);
    h.w8(0xec, 6);
    h.w32(0x44, 0xa40a);
    h.w32(0x40, 0x0300_0600);
    h.w8(0x50, 0);
    h.w16(0x3c, 0x80ff);
}

fn rx_desc(h: &H, i: u64, buf: u64, eor: bool) {
    let opts1 = DESC_OWN | if eor { DESC_EOR } else { 0 } | 1536;
    let mut d = [0u8; 16];
    d[0..4].copy_from_slice(&opts1.to_le_bytes());
    d[8..16].copy_from_slice(&buf.to_le_bytes());
    h.poke(RXR + 16 * i, &d);
}

pub(crate) fn tx_desc(h: &H, i: u64, opts1: u32, opts2: u32, buf: u64) {
    let mut d = [0u8; 16];
    d[0..4].copy_from_slice(&opts1.to_le_bytes());
    d[4..8].copy_from_slice(&opts2.to_le_bytes());
    d[8..16].copy_from_slice(&buf.to_le_bytes());
    h.poke(TXR + 16 * i, &d);
}

pub(crate) fn desc_opts1(h: &H, base: u64, i: u64) -> u32 {
    let b = h.peek(base + 16 * i, 4);
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

pub(crate) fn send_one(h: &H, i: u64, frame: &[u8], cmd: u32, opts2: u32) {
    let buf = 0x4_0000 + 0x1_0000 * (i % 4);
    h.poke(buf, frame);
    tx_desc(
        h,
        i,
        DESC_OWN | DESC_FS | DESC_LS | cmd | frame.len() as u32,
        opts2,
        buf,
    );
}

#[test]
fn cplus_tx_ring_multi_fragment_eor_and_status() {
    let h = H::new(REVISION_CPLUS);
    cplus_up(&h, 0x2b);
    let f = frame_to([0xff; 6], 200);
    // Frame 0: three fragments.
    h.poke(0x4_0000, &f[..50]);
    h.poke(0x5_0000, &f[50..120]);
    h.poke(0x6_0000, &f[120..]);
    tx_desc(&h, 0, DESC_OWN | DESC_FS | 50, 0, 0x4_0000);
    tx_desc(&h, 1, DESC_OWN | 70, 0, 0x5_0000);
    tx_desc(&h, 2, DESC_OWN | DESC_LS | DESC_EOR | 80, 0, 0x6_0000);
    h.w8(0xd9, TPPOLL_NPQ);
    assert_eq!(h.sink.take(), vec![f.clone()]);
    assert_eq!(desc_opts1(&h, TXR, 0), DESC_FS | 50);
    assert_eq!(desc_opts1(&h, TXR, 2), DESC_LS | DESC_EOR | 80);
    assert_eq!(h.r16(0x3e) & INT_TOK, INT_TOK);
    assert!(h.level());
    // EOR wrapped the index to 0.
    send_one(&h, 0, &f, 0, 0);
    h.dev.process_tx();
    assert_eq!(h.sink.take().len(), 1);
    // Not owned: nothing happens.
    h.dev.process_tx();
    assert!(h.sink.take().is_empty());
    // FSWInt.
    h.w8(0xd9, TPPOLL_FSWINT);
    assert_eq!(h.r16(0x3e) & INT_SWINT, INT_SWINT);
}

#[test]
fn cplus_tx_vlan_insert_and_checksum_offload() {
    let h = H::new(REVISION_CPLUS);
    cplus_up(&h, 0x2b);
    let t = tcp_frame(&[7u8; 101], 0x18);
    assert!(!ref_l4_ok(&t));
    send_one(&h, 0, &t, TXD_IPCS | TXD_TCPCS, TXD_TAGC | 0x2301u32); // tag 0x0123
    let u = udp_frame(&[9u8; 33]);
    send_one(&h, 1, &u, TXD_IPCS | TXD_UDPCS, 0);
    h.w8(0xd9, TPPOLL_NPQ);
    let got = h.sink.take();
    assert_eq!(got.len(), 2);
    let g0 = &got[0];
    assert_eq!(&g0[12..16], &[0x81, 0x00, 0x01, 0x23]);
    let mut untagged = g0[..12].to_vec();
    untagged.extend_from_slice(&g0[16..]);
    assert!(ref_ip_ok(&untagged));
    assert!(ref_l4_ok(&untagged));
    assert_eq!(untagged.len(), t.len());
    assert!(ref_ip_ok(&got[1]));
    assert!(ref_l4_ok(&got[1]));
    // Clean write-back: no command bits left in the collision field.
    assert_eq!(desc_opts1(&h, TXR, 0) & 0x0fff_0000, 0);
}

#[test]
fn cplus_tx_offload_skipped_on_inconsistent_headers() {
    let h = H::new(REVISION_CPLUS);
    cplus_up(&h, 0x2b);
    let mut t = tcp_frame(&[1u8; 40], 0x10);
    // ip_len beyond the frame.
    t[16..18].copy_from_slice(&2000u16.to_be_bytes());
    send_one(&h, 0, &t, TXD_IPCS | TXD_TCPCS, 0);
    // TCP data offset beyond the segment.
    let mut t2 = tcp_frame(&[1u8; 4], 0x10);
    t2[14 + 20 + 12] = 0xf0;
    send_one(&h, 1, &t2, TXD_TCPCS, 0);
    h.w8(0xd9, TPPOLL_NPQ);
    let got = h.sink.take();
    // Sent untouched, exactly as built (the short one padded to 60, as the chip
    // pads in C+ mode).
    let mut t2_on_wire = t2.clone();
    t2_on_wire.resize(60, 0);
    assert_eq!(got, vec![t, t2_on_wire]);
}

#[test]
fn cplus_tso_splits_with_correct_headers() {
    let h = H::new(REVISION_CPLUS);
    cplus_up(&h, 0x2b);
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
    let t = tcp_frame(&payload, 0x18 | 0x01 | 0x80); // PSH|ACK|FIN|CWR
    let mss = 1400u32;
    send_one(&h, 0, &t, TXD_LGSEN | (mss << 16), 0);
    h.w8(0xd9, TPPOLL_NPQ);
    let segs = h.sink.take();
    assert_eq!(segs.len(), 3);
    let mut off = 0usize;
    for (i, s) in segs.iter().enumerate() {
        let n = (payload.len() - off).min(1400);
        assert_eq!(s.len(), 54 + n);
        assert_eq!(u16::from_be_bytes([s[16], s[17]]) as usize, 40 + n);
        assert_eq!(u16::from_be_bytes([s[18], s[19]]), 0x1234 + i as u16);
        let seq = u32::from_be_bytes([s[38], s[39], s[40], s[41]]);
        assert_eq!(seq, 0xffff_fff0u32.wrapping_add(off as u32));
        let flags = s[47];
        let last = i == segs.len() - 1;
        assert_eq!(flags & 0x01 != 0, last, "FIN only on last");
        assert_eq!(flags & 0x08 != 0, last, "PSH only on last");
        assert_eq!(flags & 0x80 != 0, i == 0, "CWR only on first");
        assert_eq!(flags & 0x10, 0x10);
        assert_eq!(&s[54..], &payload[off..off + n]);
        assert!(ref_ip_ok(s));
        assert!(ref_l4_ok(s));
        off += n;
    }
    assert_eq!(h.dev.stats().tso_segments, 3);
    assert_eq!(desc_opts1(&h, TXR, 0) & TXD_TES, 0);
}

#[test]
fn cplus_tso_bad_mss_rejected() {
    let h = H::new(REVISION_CPLUS);
    cplus_up(&h, 0x2b);
    let t = tcp_frame(&[0u8; 3000], 0x10);
    send_one(&h, 0, &t, TXD_LGSEN, 0); // MSS 0
    send_one(&h, 1, &t, TXD_LGSEN | (8 << 16), 0); // too small
    let mut fragment = t.clone();
    fragment[14 + 6] |= 0x20; // IP "more fragments": not segmentable
    send_one(&h, 2, &fragment, TXD_LGSEN | (1000 << 16), 0);
    let u = udp_frame(&[0u8; 3000]);
    send_one(&h, 3, &u, TXD_LGSEN | (1000 << 16), 0); // not TCP
    h.w8(0xd9, TPPOLL_NPQ);
    assert!(h.sink.take().is_empty());
    for i in 0..4 {
        let o = desc_opts1(&h, TXR, i);
        assert_eq!(o & (DESC_OWN | TXD_TES), TXD_TES, "desc {i}");
    }
    assert_eq!(h.r16(0x3e) & INT_TER, INT_TER);
    // A frame over the C+ maximum without LGSEN is an error too.
    send_one(&h, 4, &vec![0u8; MAX_CPLUS_FRAME + 1], 0, 0);
    h.dev.process_tx();
    assert_eq!(desc_opts1(&h, TXR, 4) & TXD_TES, TXD_TES);
    assert!(h.sink.take().is_empty());
}

#[test]
fn cplus_txpoll_walks_at_most_64() {
    let h = H::new(REVISION_CPLUS);
    cplus_up(&h, 0x2b);
    let f = frame_to([0xff; 6], 60);
    h.poke(0x4_0000, &f);
    // 64 owned descriptors and no EOR: the ring wraps at 64 to slot 0 again,
    // which the walk will have completed; 64 per poll.
    for i in 0..64 {
        tx_desc(&h, i, DESC_OWN | DESC_FS | DESC_LS | 60, 0, 0x4_0000);
    }
    h.w8(0xd9, TPPOLL_NPQ);
    assert_eq!(h.sink.take().len(), 64);
    h.w8(0xd9, TPPOLL_NPQ);
    assert!(h.sink.take().is_empty());
    // A guest that keeps every descriptor owned is still bounded per poll.
    for i in 0..64 {
        tx_desc(&h, i, DESC_OWN | DESC_FS | DESC_LS | 60, 0, 0x4_0000);
    }
    h.w8(0xd9, TPPOLL_NPQ);
    assert_eq!(h.sink.take().len(), 64);
}

#[test]
fn cplus_tx_ring_outside_ram() {
    let h = H::new(REVISION_CPLUS);
    cplus_up(&h, 0x2b);
    h.w32(0x24, 0x10);
    h.w8(0xd9, TPPOLL_NPQ);
    assert_eq!(h.r16(0x3e) & (INT_SERR | INT_TER), INT_SERR | INT_TER);
    h.w32(0x24, 0);
    // Descriptor in RAM, buffer outside: descriptor completes with an error.
    tx_desc(
        &h,
        0,
        DESC_OWN | DESC_FS | DESC_LS | 100,
        0,
        0xffff_ffff_ffff_ff00,
    );
    h.w8(0xd9, TPPOLL_NPQ);
    assert_eq!(
        desc_opts1(&h, TXR, 0) & (DESC_OWN | TXD_TES | TXD_UNF),
        TXD_TES | TXD_UNF
    );
    assert!(h.sink.take().is_empty());
    // Ring base near the top of the address space: checked arithmetic.
    h.w32(0x20, 0xffff_fff0);
    h.w32(0x24, 0xffff_ffff);
    h.w8(0xd9, TPPOLL_NPQ);
    h.w32(0xe4, 0xffff_fff0);
    h.w32(0xe8, 0xffff_ffff);
    assert_eq!(h.dev.receive(&frame_to(MAC, 60)), RxResult::Disabled);
}

#[test]
fn cplus_rx_ring_own_eor_and_rdu() {
    let h = H::new(REVISION_CPLUS);
    cplus_up(&h, 0x2b);
    rx_desc(&h, 0, 0x5_0000, false);
    rx_desc(&h, 1, 0x5_1000, true);
    let f = frame_to(MAC, 100);
    assert!(h.dev.can_receive());
    assert_eq!(h.dev.receive(&f), RxResult::Accepted);
    let o = desc_opts1(&h, RXR, 0);
    assert_eq!(o & DESC_OWN, 0);
    assert_eq!(o & (DESC_FS | DESC_LS), DESC_FS | DESC_LS);
    assert_eq!(o & RXD_PAM, RXD_PAM);
    assert_eq!(o & 0x1fff, 104);
    assert_eq!(h.peek(0x5_0000, 100), f);
    assert_eq!(
        h.peek(0x5_0000 + 100, 4),
        crate::net::crc32_ieee(&f).to_le_bytes()
    );
    assert_eq!(h.dev.receive(&frame_to([0xff; 6], 60)), RxResult::Accepted);
    assert_eq!(
        desc_opts1(&h, RXR, 1) & (DESC_OWN | DESC_EOR | RXD_BAR),
        DESC_EOR | RXD_BAR
    );
    // Wrapped to 0, which the guest has not given back: RDU.
    assert!(!h.dev.can_receive());
    assert_eq!(h.dev.receive(&f), RxResult::RingFull);
    assert_eq!(h.r16(0x3e) & INT_RXOVW, INT_RXOVW);
    // Guest refills and writes IMR (as 8139cp's poll does): space event.
    rx_desc(&h, 0, 0x5_0000, false);
    h.w16(0x3c, 0x80ff);
    assert_eq!(h.dev.rx_space_event().read().unwrap(), 1);
    assert_eq!(h.dev.receive(&f), RxResult::Accepted);
    // A buffer too small for frame + CRC.
    let mut d = [0u8; 16];
    d[0..4].copy_from_slice(&(DESC_OWN | 100).to_le_bytes());
    d[8..16].copy_from_slice(&0x5_2000u64.to_le_bytes());
    h.poke(RXR + 16, &d);
    assert_eq!(h.dev.receive(&frame_to(MAC, 100)), RxResult::RingFull);
    assert_eq!(h.peek(0x5_2000, 4), vec![0; 4]);
}

#[test]
fn cplus_rx_vlan_strip_and_checksum_status() {
    let h = H::new(REVISION_CPLUS);
    cplus_up(&h, 0x2b | CPCMD_RXVLAN);
    for i in 0..4 {
        rx_desc(&h, i, 0x5_0000 + 0x800 * i, i == 3);
    }
    // A tagged frame with a good TCP checksum.
    let mut t = tcp_frame(&[3u8; 50], 0x10);
    let ip = crate::net::csum::parse_ipv4(&t).unwrap();
    crate::net::csum::fix_ip_checksum(&mut t, &ip);
    crate::net::csum::fix_l4_checksum(&mut t, &ip);
    let mut tagged = t[..12].to_vec();
    tagged.extend_from_slice(&[0x81, 0x00, 0x0a, 0xbc]);
    tagged.extend_from_slice(&t[12..]);
    assert_eq!(h.dev.receive(&tagged), RxResult::Accepted);
    let d = h.peek(RXR, 8);
    let opts1 = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
    let opts2 = u32::from_le_bytes([d[4], d[5], d[6], d[7]]);
    assert_eq!(opts2, RXD_TAVA | 0xbc0a);
    assert_eq!(opts1 & 0x1fff, t.len() as u32 + 4);
    assert_eq!(opts1 & (3 << 16), RXD_PID_TCP);
    assert_eq!(opts1 & (RXD_IPF | RXD_TCPF | RXD_UDPF), 0);
    assert_eq!(h.peek(0x5_0000, t.len()), t);
    // CRC over the frame as delivered (untagged).
    assert_eq!(
        h.peek(0x5_0000 + t.len() as u64, 4),
        crate::net::crc32_ieee(&t).to_le_bytes()
    );
    // Bad UDP checksum, bad IP checksum.
    let mut u = udp_frame(&[1u8; 20]);
    let ip = crate::net::csum::parse_ipv4(&u).unwrap();
    crate::net::csum::fix_ip_checksum(&mut u, &ip);
    u[14 + 20 + 6] = 0x12;
    assert_eq!(h.dev.receive(&u), RxResult::Accepted);
    let o = desc_opts1(&h, RXR, 1);
    assert_eq!(o & (3 << 16), RXD_PID_UDP);
    assert_eq!(o & (RXD_UDPF | RXD_IPF), RXD_UDPF);
    let mut bad_ip = t.clone();
    bad_ip[24] ^= 0xff;
    assert_eq!(h.dev.receive(&bad_ip), RxResult::Accepted);
    assert_eq!(desc_opts1(&h, RXR, 2) & RXD_IPF, RXD_IPF);
    // Non-IP: no protocol id.
    assert_eq!(h.dev.receive(&frame_to(MAC, 60)), RxResult::Accepted);
    assert_eq!(desc_opts1(&h, RXR, 3) & (3 << 16), 0);
}

#[test]
fn cplus_tally_dump() {
    let h = H::new(REVISION_CPLUS);
    cplus_up(&h, 0x2b);
    rx_desc(&h, 0, 0x5_0000, true);
    h.dev.receive(&frame_to(MAC, 60));
    send_one(&h, 0, &frame_to([0xff; 6], 60), 0, 0);
    h.w8(0xd9, TPPOLL_NPQ);
    h.w32(0x14, 0);
    h.w32(0x10, 0x7_0000 | 8);
    assert_eq!(h.r32(0x10) & 8, 0);
    let t = h.peek(0x7_0000, 64);
    assert_eq!(u64::from_le_bytes(t[0..8].try_into().unwrap()), 1);
    assert_eq!(u64::from_le_bytes(t[8..16].try_into().unwrap()), 1);
    assert_eq!(u64::from_le_bytes(t[40..48].try_into().unwrap()), 1);
}

#[test]
fn cplus_loopback_tso() {
    let h = H::new(REVISION_CPLUS);
    cplus_up(&h, 0x2b);
    h.w32(0x40, 0x0300_0600 | (3 << 17));
    h.w32(0x44, 0xa40b); // + AAP
    for i in 0..4 {
        rx_desc(&h, i, 0x5_0000 + 0x800 * i, i == 3);
    }
    let t = tcp_frame(&[5u8; 2000], 0x10);
    send_one(&h, 0, &t, TXD_LGSEN | (1000 << 16), 0);
    h.w8(0xd9, TPPOLL_NPQ);
    assert!(h.sink.take().is_empty());
    assert_eq!(h.dev.stats().rx_packets, 2);
    assert_eq!(desc_opts1(&h, RXR, 0) & 0x1fff, 1054 + 4);
}

#[test]
fn pci_identity_and_registration() {
    use crate::bus::Bus;
    use crate::pci::{PciPlacement, PciRoot};
    let h = H::new(REVISION_CPLUS);
    let pio = Arc::new(Bus::new());
    let mmio = Arc::new(Bus::new());
    let root = PciRoot::new(pio.clone(), mmio.clone());
    let info = root
        .add_device(
            h.dev.clone(),
            PciPlacement {
                device: None,
                irq: 11,
                bar_addresses: vec![0xc000, 0xfebf_f000],
            },
        )
        .unwrap();
    assert_eq!((info.device, info.pin, info.irq), (1, 1, 11));
    assert_eq!(root.config_read(1, 0), 0x8139_10ec);
    assert_eq!(root.config_read(1, 8), 0x0200_0020);
    let mut b = [0u8; 4];
    pio.read(0xc000, &mut b);
    assert_eq!(b, MAC[..4]);
    mmio.read(0xfebf_f004, &mut b[..2]);
    assert_eq!(b[..2], MAC[4..]);
    // Accesses that run off the end of the 256-byte window read 0.
    let mut b = [0xffu8; 4];
    h.dev.read(0, 0xfe, &mut b);
    assert_eq!(b[2..], [0, 0]);
}

// ---------- fuzz findings ----------

#[test]
fn ring_shrink_keeps_offsets_in_range() {
    // Fuzz finding: the write offset from a 64K ring underflowed the free-space
    // computation after RCR switched to 8K.
    let h = H::new(REVISION_C);
    c_mode_up(&h);
    h.w32(0x44, 0x8f | (3 << 11));
    let f = frame_to(MAC, 1500);
    for _ in 0..20 {
        h.dev.receive(&f);
    }
    assert!(h.r16(0x3a) > 8192);
    h.w32(0x44, 0x8f);
    assert_eq!(h.r16(0x3a), 0);
    assert_eq!(h.dev.receive(&f), RxResult::Accepted);
    // RCR writes that keep the size keep the pointers.
    h.w32(0x44, 0x8e);
    assert_eq!(h.r16(0x3a), 1508);
}

/// Every input in devices/fuzz/regressions (crashes found by the fuzzer) and the
/// seed corpus must run clean.
#[test]
fn fuzz_regressions_and_corpus_replay() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in ["regressions", "corpus/rtl8139"] {
        let Ok(rd) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for e in rd.flatten() {
            let data = std::fs::read(e.path()).unwrap();
            super::fuzzing::run(&data);
            n += 1;
        }
    }
    assert!(n > 0, "no fuzz inputs found");
}

// ---------- host offload (vnet header backends) ----------

#[derive(Default)]
struct OffloadSink {
    frames: std::sync::Mutex<Vec<(Vec<u8>, Option<crate::net::TxOffload>)>>,
}

impl FrameSink for OffloadSink {
    fn send(&self, frame: &[u8]) -> bool {
        self.frames.lock().unwrap().push((frame.to_vec(), None));
        true
    }
    fn supports_offload(&self) -> bool {
        true
    }
    fn send_offload(&self, frame: &[u8], off: &crate::net::TxOffload) -> bool {
        self.frames
            .lock()
            .unwrap()
            .push((frame.to_vec(), Some(*off)));
        true
    }
}

/// Complete a NEEDS_CSUM frame as the host kernel would.
fn host_complete(frame: &mut [u8], start: usize, field: usize) {
    let c = ref_csum(&[&frame[start..]]);
    frame[start + field..start + field + 2].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn host_offload_for_checksum_and_tso() {
    let mem = Arc::new(VecGuestMemory::new(0, MEM));
    let sink = Arc::new(OffloadSink::default());
    let dev = Arc::new(
        Rtl8139::new(
            Rtl8139Config {
                mac: MAC,
                revision: REVISION_CPLUS,
            },
            mem.clone(),
            Arc::new(RecordingIrq::default()),
            sink.clone(),
        )
        .unwrap(),
    );
    dev.command_written(PCI_COMMAND_MASTER);
    let h = H {
        dev,
        mem,
        irq: Arc::new(RecordingIrq::default()),
        sink: Arc::new(RecordingSink::default()),
    };
    cplus_up(&h, 0x2b);
    let t = tcp_frame(&[7u8; 300], 0x18);
    send_one(&h, 0, &t, TXD_IPCS | TXD_TCPCS, TXD_TAGC | 0x0100);
    let big = tcp_frame(&vec![9u8; 4000], 0x18);
    send_one(&h, 1, &big, TXD_LGSEN | (1448 << 16), 0);
    h.w8(0xd9, TPPOLL_NPQ);
    let got = std::mem::take(&mut *sink.frames.lock().unwrap());
    assert_eq!(got.len(), 2);
    // Checksum: tagged frame, csum_start shifted by the tag.
    let (mut f0, off0) = got[0].clone();
    let off0 = off0.unwrap();
    assert_eq!(off0.csum, Some((38, 16)));
    assert!(off0.tso4.is_none());
    host_complete(&mut f0, 38, 16);
    let mut untagged = f0[..12].to_vec();
    untagged.extend_from_slice(&f0[16..]);
    assert!(ref_ip_ok(&untagged));
    assert!(ref_l4_ok(&untagged));
    // TSO: one super-frame, headers for the host to replicate.
    let (mut f1, off1) = got[1].clone();
    let off1 = off1.unwrap();
    assert_eq!(off1.csum, Some((34, 16)));
    let tso = off1.tso4.unwrap();
    assert_eq!((tso.mss, tso.hdr_len), (1448, 54));
    assert_eq!(f1.len(), big.len());
    assert!(ref_ip_ok(&f1));
    host_complete(&mut f1, 34, 16);
    assert!(ref_l4_ok(&f1));
    assert_eq!(h.dev.stats().tx_packets, 2);
}

#[test]
fn concurrent_rx_and_register_traffic() {
    // The I/O thread receives while a vCPU thread polls and acks, as 8139too
    // does; no deadlock, the level follows ISR & IMR at the end.
    let h = H::new(REVISION_C);
    c_mode_up(&h);
    let dev = h.dev.clone();
    let rx = std::thread::spawn(move || {
        let f = frame_to(MAC, 200);
        let mut accepted = 0;
        for _ in 0..3000 {
            if dev.can_receive() && dev.receive(&f) == RxResult::Accepted {
                accepted += 1;
            }
        }
        accepted
    });
    let mut consumed = 0u64;
    let mut cur: u16 = 0;
    for _ in 0..20000 {
        if h.r8(0x37) & CR_BUFE == 0 {
            let off = (cur as usize % 8192) as u64;
            let hdr = h.mem.read_u32(RING + off).unwrap();
            assert_eq!(hdr & 1, 1, "ROK at {off}");
            let len = (hdr >> 16) as u16;
            cur = (cur.wrapping_add(len + 4 + 3)) & !3;
            h.w16(0x38, cur.wrapping_sub(16));
            h.w16(0x3e, 0x51);
            consumed += 1;
        }
    }
    let accepted = rx.join().unwrap();
    while h.r8(0x37) & CR_BUFE == 0 {
        let off = (cur as usize % 8192) as u64;
        let hdr = h.mem.read_u32(RING + off).unwrap();
        cur = (cur.wrapping_add((hdr >> 16) as u16 + 4 + 3)) & !3;
        h.w16(0x38, cur.wrapping_sub(16));
        consumed += 1;
    }
    assert_eq!(consumed, accepted);
    h.w16(0x3e, 0xffff);
    assert!(!h.level());
}

#[test]
fn linux_8139too_probe_and_open_sequence() {
    // Register by register as 8139too's probe/open/xmit/rx do (reference §8).
    let h = H::new(REVISION_C);
    h.w8(0x5b, b'R');
    let tcr = h.r32(0x40);
    assert_ne!(tcr, 0xffff_ffff);
    assert_eq!(tcr & 0x7cc0_0000, HWVER_8139C);
    let c1 = h.r8(0x52);
    h.w8(0x50, 0xc0);
    h.w8(0x52, c1 | 1);
    h.w8(0x50, 0);
    h.w8(0x37, 0x10);
    let mut polls = 0;
    while h.r8(0x37) & 0x10 != 0 {
        polls += 1;
        assert!(polls < 1000);
    }
    assert_ne!(linux_read_eeprom(&h, 0, 8, 5), 0x8129);
    // open / hw_start
    h.w8(0x50, 0xc0);
    h.w32(0x00, u32::from_le_bytes([MAC[0], MAC[1], MAC[2], MAC[3]]));
    h.w32(0x04, u32::from_le_bytes([MAC[4], MAC[5], 0, 0]));
    h.w32(0x30, RING as u32);
    h.w8(0x37, 0x0c);
    h.w32(0x44, 0x0000_f78a);
    h.w32(0x40, 0x0300_0680);
    assert_eq!(h.r32(0x40), HWVER_8139C | 0x0300_0680);
    h.w8(0x59, h.r8(0x59) & !0x20);
    h.w8(0x50, 0);
    for i in 0..4 {
        h.w32(0x20 + 4 * i, 0x1_0000 + 1536 * i as u32);
    }
    h.w32(0x4c, 0);
    h.w32(0x44, 0x0000_f78a);
    h.w32(0x08, 0xffff_ffff);
    h.w32(0x0c, 0xffff_ffff);
    h.w16(0x5c, h.r16(0x5c) & 0xf000);
    assert_eq!(h.r8(0x37) & 0x0c, 0x0c);
    h.w16(0x3c, 0xc07f);
    // xmit
    let f = frame_to([0xff; 6], 42);
    let mut padded = f.clone();
    padded.resize(60, 0);
    h.poke(0x1_0000, &padded);
    h.w32(0x10, 0x0008_0000 | 60);
    assert_eq!(h.sink.take(), vec![padded]);
    // interrupt: ack all but RX, reclaim TX.
    let status = h.r16(0x3e);
    assert_eq!(status & 0xc07f & INT_TOK, INT_TOK);
    h.w16(0x3e, status & !0x59);
    let tsd = h.r32(0x10);
    assert!(tsd & (TSD_TOK | TSD_TUN | TSD_TABT) != 0);
    // rx poll
    h.dev.receive(&frame_to(MAC, 100));
    assert!(h.level());
    let status = h.r16(0x3e);
    h.w16(0x3e, status & !0x59);
    h.w16(0x3c, 0xc02e);
    let mut cur_rx: u32 = 0;
    let mut got = 0;
    while h.r8(0x37) & CR_BUFE == 0 {
        let off = cur_rx % 32768;
        let hdr = h.mem.read_u32(RING + off as u64).unwrap();
        let size = hdr >> 16;
        assert!((8..=1796).contains(&size) && hdr & 1 == 1);
        got += 1;
        cur_rx = (cur_rx + size + 4 + 3) & !3;
        h.w16(0x38, (cur_rx as u16).wrapping_sub(16));
        if h.r16(0x3e) & 0x51 != 0 {
            h.w16(0x3e, 0x51);
        }
    }
    assert_eq!(got, 1);
    h.w16(0x3c, 0xc07f);
    assert!(!h.level());
}

#[test]
fn isr_ack_with_bits_left_reasserts_for_edge_backends() {
    #[derive(Default)]
    struct Edges(std::sync::atomic::AtomicU32);
    impl IrqLine for Edges {
        fn trigger(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let edges = Arc::new(Edges::default());
    let dev = Rtl8139::new(
        Rtl8139Config::default(),
        Arc::new(VecGuestMemory::new(0, 4096)),
        edges.clone(),
        Arc::new(RecordingSink::default()),
    )
    .unwrap();
    dev.write(0, 0x3c, &0xffffu16.to_le_bytes());
    dev.write(0, 0xd9, &[TPPOLL_FSWINT]);
    dev.set_link(false);
    assert_eq!(edges.0.load(Ordering::SeqCst), 1);
    // Ack SWInt; LinkChg still pending: a new edge.
    dev.write(0, 0x3e, &INT_SWINT.to_le_bytes());
    assert_eq!(edges.0.load(Ordering::SeqCst), 2);
    // Ack the rest: no edge.
    dev.write(0, 0x3e, &INT_LINKCHG.to_le_bytes());
    assert_eq!(edges.0.load(Ordering::SeqCst), 2);
    // A plain register write does not pulse.
    dev.write(0, 0x3c, &0xffffu16.to_le_bytes());
    assert_eq!(edges.0.load(Ordering::SeqCst), 2);
}

fn rx_desc_sized(h: &H, i: u64, buf: u64, size: u32, eor: bool) {
    let opts1 = DESC_OWN | if eor { DESC_EOR } else { 0 } | size;
    let mut d = [0u8; 16];
    d[0..4].copy_from_slice(&opts1.to_le_bytes());
    d[8..16].copy_from_slice(&buf.to_le_bytes());
    h.poke(RXR + 16 * i, &d);
}

#[test]
fn cplus_takes_frames_up_to_8139cp_max_mtu_and_c_mode_does_not() {
    // 8139cp: MTU up to 4096, RX buffers of MTU + 22.
    let h = H::new(REVISION_CPLUS);
    cplus_up(&h, 0x2b);
    rx_desc_sized(&h, 0, 0x5_0000, 4096 + 22, true);
    let big = frame_to(MAC, MAX_CPLUS_FRAME);
    assert_eq!(h.dev.receive(&big), RxResult::Accepted);
    assert_eq!(desc_opts1(&h, RXR, 0) & 0x1fff, MAX_CPLUS_FRAME as u32 + 4);
    assert_eq!(h.peek(0x5_0000, big.len()), big);
    rx_desc_sized(&h, 0, 0x5_0000, 4096 + 22, true);
    assert_eq!(
        h.dev.receive(&frame_to(MAC, MAX_CPLUS_FRAME + 1)),
        RxResult::Invalid
    );
    // TX of the same size goes out whole.
    let f = frame_to([0xff; 6], MAX_CPLUS_FRAME);
    send_one(&h, 0, &f, 0, 0);
    h.w8(0xd9, TPPOLL_NPQ);
    assert_eq!(h.sink.take(), vec![f]);
    // C mode keeps the 8139C's limit (8139too caps its MTU at 1770).
    let c = H::new(REVISION_C);
    c_mode_up(&c);
    assert_eq!(
        c.dev.receive(&frame_to(MAC, MAX_FRAME + 1)),
        RxResult::Invalid
    );
}

#[test]
fn cplus_rx_frame_longer_than_a_buffer_spans_descriptors() {
    let h = H::new(REVISION_CPLUS);
    cplus_up(&h, 0x2b);
    rx_desc_sized(&h, 0, 0x5_0000, 1536, false);
    rx_desc_sized(&h, 1, 0x5_1000, 1536, false);
    rx_desc_sized(&h, 2, 0x5_2000, 1536, true);
    // 3000 bytes + CRC: two buffers, FirstFrag on the first, LastFrag on the second.
    let f = frame_to(MAC, 3000);
    assert_eq!(h.dev.receive(&f), RxResult::Accepted);
    let (o0, o1) = (desc_opts1(&h, RXR, 0), desc_opts1(&h, RXR, 1));
    assert_eq!(o0 & (DESC_OWN | DESC_FS | DESC_LS), DESC_FS, "{o0:#x}");
    assert_eq!(o0 & 0x1fff, 1536);
    assert_eq!(o1 & (DESC_OWN | DESC_FS | DESC_LS), DESC_LS, "{o1:#x}");
    assert_eq!(o1 & 0x1fff, 3004);
    let mut got = h.peek(0x5_0000, 1536);
    got.extend(h.peek(0x5_1000, 3004 - 1536));
    assert_eq!(&got[..3000], &f[..]);
    assert_eq!(got[3000..], crate::net::crc32_ieee(&f).to_le_bytes());
    // The next frame starts at descriptor 2.
    assert_eq!(h.dev.receive(&frame_to(MAC, 100)), RxResult::Accepted);
    assert_eq!(
        desc_opts1(&h, RXR, 2) & (DESC_OWN | DESC_FS | DESC_LS),
        DESC_FS | DESC_LS
    );
    // Only one descriptor of ours left for a two-buffer frame: RDU, nothing written.
    rx_desc_sized(&h, 0, 0x6_0000, 1536, false);
    assert_eq!(h.dev.receive(&f), RxResult::RingFull);
    assert_eq!(desc_opts1(&h, RXR, 0) & DESC_OWN, DESC_OWN);
    assert_eq!(h.peek(0x6_0000, 4), vec![0; 4]);
}

#[test]
fn cscr_reports_a_link_change_until_linkchg_is_acked() {
    // 8139too reads CSCR's link-change bit on a LinkChg interrupt to tell a link
    // change from an RX underrun.
    let h = H::new(REVISION_C);
    h.w8(0x37, 0x0c);
    assert_eq!(h.r16(0x74) & 0x0c00, 0x0400, "link OK, no change");
    h.dev.set_link(false);
    assert_eq!(h.r16(0x74) & 0x0c00, 0x0800);
    // Reading does not clear it; acking another ISR bit does not either.
    assert_eq!(h.r16(0x74) & 0x0800, 0x0800);
    h.w16(0x3e, INT_TOK);
    assert_eq!(h.r16(0x74) & 0x0800, 0x0800);
    h.w16(0x3e, INT_LINKCHG);
    assert_eq!(h.r16(0x74) & 0x0c00, 0);
    h.dev.set_link(true);
    assert_eq!(h.r16(0x74) & 0x0c00, 0x0c00);
}

#[test]
fn cplus_pads_short_frames_and_c_mode_sends_them_as_given() {
    let h = H::new(REVISION_CPLUS);
    cplus_up(&h, 0x2b);
    let f = frame_to([0xff; 6], 42);
    send_one(&h, 0, &f, 0, 0);
    h.w8(0xd9, TPPOLL_NPQ);
    let mut padded = f.clone();
    padded.resize(60, 0);
    assert_eq!(h.sink.take(), vec![padded]);
    // C mode: the driver pads (8139too does); the chip sends SIZE bytes.
    let c = H::new(REVISION_C);
    c_mode_up(&c);
    c.poke(0x1_0000, &f);
    c.w32(0x20, 0x1_0000);
    c.w32(0x10, f.len() as u32);
    assert_eq!(c.sink.take(), vec![f]);
}

/// Every stored input of a fuzz target (`devices/fuzz/corpus/<target>`, the minimized
/// corpus, and `devices/fuzz/regressions-<target>`) runs clean.
fn replay_fuzz_target(target: &str, run: fn(&[u8])) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in [format!("corpus/{target}"), format!("regressions-{target}")] {
        let Ok(rd) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for e in rd.flatten() {
            run(&std::fs::read(e.path()).unwrap());
            n += 1;
        }
    }
    assert!(n > 0, "no stored inputs for fuzz target {target}");
}

#[test]
fn fuzz_rx_corpus_replay() {
    replay_fuzz_target("rtl8139_rx", super::fuzzing_rx::run);
}

#[test]
fn fuzz_eeprom_corpus_replay() {
    replay_fuzz_target("eeprom", super::fuzzing_eeprom::run);
}

// ---------- the read-only register shadow ----------

/// Every byte of the shadow page equals what a register read (an exit) returns,
/// except TCTR, which a page cannot keep exact (see `shadow`).
fn assert_shadow_matches(h: &H, page: &ShadowPage, when: &str) {
    // The whole page first: a register read republishes the shadow itself.
    let mut seen = vec![0u8; SHADOW_PAGE_SIZE as usize];
    page.read(0, &mut seen);
    for off in (0..SHADOW_PAGE_SIZE).filter(|o| !(TCTR as u64..TCTR as u64 + 4).contains(o)) {
        assert_eq!(
            seen[off as usize],
            h.r8(off),
            "{when}: shadow byte {off:#x}"
        );
    }
}

#[test]
fn the_data_path_republishes_every_register_it_changes() {
    // C mode: frames in until the ring is full (MPC, RXOVW), TSD status, the timer.
    let (h, page) = shadowed(REVISION_C);
    c_mode_up(&h);
    h.w32(TIMERINT as u64, 1);
    assert_shadow_matches(&h, &page, "C: after setup");
    let mut rx = 0;
    while h.dev.receive(&frame_to(MAC, 1500)) == RxResult::Accepted {
        rx += 1;
        assert_shadow_matches(&h, &page, &format!("C: after frame {rx}"));
    }
    assert_eq!(h.dev.receive(&frame_to(MAC, 1500)), RxResult::RingFull);
    assert_shadow_matches(&h, &page, "C: after the ring filled");
    h.poke(0x1_0000, &frame_to([0xff; 6], 60));
    h.w32(0x10, 0x0008_0000 | 60);
    h.dev.process_tx();
    assert_shadow_matches(&h, &page, "C: after a TX walk");
    h.dev.poll_timer();
    assert_shadow_matches(&h, &page, "C: after the timer");
    // C+ mode: RX into descriptors, RDU, a doorbell TX, a snooped TX, the timer.
    let (h, page) = shadowed(REVISION_CPLUS);
    cplus_up(&h, 0x2b);
    h.w32(TIMERINT as u64, 1);
    rx_desc(&h, 0, 0x6_0000, false);
    rx_desc(&h, 1, 0x6_1000, true);
    for i in 0..3 {
        h.dev.receive(&frame_to(MAC, 100 + i));
        assert_shadow_matches(&h, &page, &format!("C+: after frame {i}"));
    }
    send_one(&h, 0, &frame_to([0xff; 6], 60), 0, 0);
    h.dev.process_tx();
    assert_shadow_matches(&h, &page, "C+: after a doorbell TX");
    send_one(&h, 1, &frame_to([0xff; 6], 60), 0, 0);
    assert!(h.dev.snoop_tx());
    assert_shadow_matches(&h, &page, "C+: after a snooped TX");
    h.dev.poll_timer();
    assert_shadow_matches(&h, &page, "C+: after the timer");
    assert_eq!(h.sink.take().len(), 2);
    // The per-packet writes that republish only the event words (EVENT_WRITES):
    // TPPoll, the ISR ack, IMR masked and unmasked; and one that republishes all.
    send_one(&h, 2, &frame_to([0xff; 6], 60), 0, 0);
    h.w8(TPPOLL as u64, TPPOLL_NPQ | TPPOLL_FSWINT);
    assert_eq!(h.sink.take().len(), 1);
    assert_shadow_matches(&h, &page, "C+: after TPPoll");
    for (reg, v) in [(ISR, 0xffff), (IMR, 0), (IMR, 0x80ff), (ISR, INT_TOK)] {
        h.w16(reg as u64, v);
        assert_shadow_matches(&h, &page, &format!("C+: after {v:#x} to {reg:#x}"));
    }
    h.w16(CPCMD as u64, 0x2b | CPCMD_RXVLAN);
    assert_shadow_matches(&h, &page, "C+: after a CpCmd write");
    // C mode: the CAPR write (its ring pointer and CR.BUFE).
    let (h, page) = shadowed(REVISION_C);
    c_mode_up(&h);
    assert_eq!(h.dev.receive(&frame_to(MAC, 100)), RxResult::Accepted);
    h.w16(CAPR as u64, 108 - 16);
    assert_shadow_matches(&h, &page, "C: after CAPR");
}

fn shadowed(revision: u8) -> (H, Arc<ShadowPage>) {
    let h = H::new(revision);
    let page: Arc<ShadowPage> = ShadowPage::new().into();
    h.dev.set_shadow(page.clone());
    (h, page)
}

#[test]
fn shadow_page_is_page_aligned_and_the_mmio_bar_is_a_page() {
    let page = ShadowPage::new();
    assert_eq!(page.host_addr() % SHADOW_PAGE_SIZE, 0);
    assert_eq!(std::mem::size_of::<ShadowPage>() as u64, SHADOW_PAGE_SIZE);
    let h = H::new(REVISION_CPLUS);
    let bars = h.dev.bars();
    assert_eq!(bars[1].kind, BarKind::Mem32);
    assert_eq!(bars[1].size, SHADOW_PAGE_SIZE);
    // Past the register block the MMIO BAR reads 0 and ignores writes.
    h.w32(0x800, 0xffff_ffff);
    assert_eq!(h.r32(0x800), 0);
}

#[test]
fn shadow_follows_c_mode_rx_tx_and_acks() {
    let (h, page) = shadowed(REVISION_C);
    assert_shadow_matches(&h, &page, "after power-on");
    c_mode_up(&h);
    assert_shadow_matches(&h, &page, "after C-mode setup");
    // RX from the I/O thread's side: ISR.ROK, CBR and CR.BUFE move without any
    // register access from the guest.
    assert_eq!(h.dev.receive(&frame_to(MAC, 61)), RxResult::Accepted);
    let mut isr = [0u8; 2];
    page.read(ISR as u64, &mut isr);
    assert_eq!(u16::from_le_bytes(isr) & INT_ROK, INT_ROK);
    assert_shadow_matches(&h, &page, "after RX");
    // The guest's write-1-to-clear exits; the shadow is current when it returns.
    h.w16(ISR as u64, INT_ROK);
    page.read(ISR as u64, &mut isr);
    assert_eq!(u16::from_le_bytes(isr) & INT_ROK, 0);
    h.w16(0x38, 72 - 16);
    assert_shadow_matches(&h, &page, "after ack and CAPR");
    // TX: TSD0's OWN|TOK and ISR.TOK.
    h.poke(0x1_0000, &frame_to([0xff; 6], 60));
    h.w32(0x10, 0x0008_0000 | 60);
    let mut tsd = [0u8; 4];
    page.read(0x10, &mut tsd);
    assert_eq!(
        u32::from_le_bytes(tsd) & (TSD_OWN | TSD_TOK),
        TSD_OWN | TSD_TOK
    );
    assert_shadow_matches(&h, &page, "after TX");
    // EEPROM reads through CFG9346 (EEDO changes with each clocked write).
    assert_eq!(
        linux_read_eeprom(&h, 7, 6, 6),
        u16::from_le_bytes([MAC[0], MAC[1]])
    );
    assert_shadow_matches(&h, &page, "after the EEPROM read");
    h.w8(CR as u64, CR_RST);
    assert_shadow_matches(&h, &page, "after reset");
}

#[test]
fn shadow_follows_cplus_mode() {
    let (h, page) = shadowed(REVISION_CPLUS);
    cplus_up(&h, 0x2b);
    assert_shadow_matches(&h, &page, "after C+ setup");
    rx_desc(&h, 0, 0x6_0000, true);
    assert_eq!(h.dev.receive(&frame_to(MAC, 100)), RxResult::Accepted);
    assert_shadow_matches(&h, &page, "after C+ RX");
    send_one(&h, 0, &frame_to([0xff; 6], 60), 0, 0);
    h.dev.process_tx();
    assert_eq!(h.sink.take().len(), 1);
    assert_shadow_matches(&h, &page, "after a doorbell TX");
    h.w16(ISR as u64, 0xffff);
    h.w16(IMR as u64, 0);
    assert_shadow_matches(&h, &page, "after ack and mask");
}

/// An interrupt line that, when raised, looks at what the guest would load from the
/// shadow: the cause must already be there.
struct ShadowCheckingIrq {
    page: std::sync::OnceLock<Arc<ShadowPage>>,
    isr_at_raise: std::sync::Mutex<Vec<u16>>,
}

impl IrqLine for ShadowCheckingIrq {
    fn trigger(&self) {}
    fn set_level(&self, asserted: bool) {
        if let (true, Some(page)) = (asserted, self.page.get()) {
            let mut isr = [0u8; 2];
            page.read(ISR as u64, &mut isr);
            self.isr_at_raise
                .lock()
                .unwrap()
                .push(u16::from_le_bytes(isr));
        }
    }
}

#[test]
fn shadow_shows_the_cause_before_the_interrupt_is_raised() {
    let mem = Arc::new(VecGuestMemory::new(0, MEM));
    let irq = Arc::new(ShadowCheckingIrq {
        page: Default::default(),
        isr_at_raise: Default::default(),
    });
    let dev = Arc::new(
        Rtl8139::new(
            Rtl8139Config {
                mac: MAC,
                revision: REVISION_C,
            },
            mem.clone(),
            irq.clone(),
            Arc::new(RecordingSink::default()),
        )
        .unwrap(),
    );
    dev.command_written(PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
    let page: Arc<ShadowPage> = ShadowPage::new().into();
    let _ = irq.page.set(page.clone());
    dev.set_shadow(page);
    let h = H {
        dev,
        mem,
        irq: Arc::new(RecordingIrq::default()),
        sink: Arc::new(RecordingSink::default()),
    };
    c_mode_up(&h);
    assert_eq!(h.dev.receive(&frame_to(MAC, 61)), RxResult::Accepted);
    let raised = irq.isr_at_raise.lock().unwrap().clone();
    assert!(!raised.is_empty(), "RX with IMR.ROK set raises the line");
    assert!(raised.iter().all(|isr| isr & INT_ROK != 0), "{raised:x?}");
}

// ---------- descriptor words: one 32-bit access, the hand-back last ----------

use crate::dma::Access;

/// The accesses of `j` that touch [gpa, gpa + len).
fn touching(j: &[Access], gpa: u64, len: usize) -> Vec<Access> {
    j.iter().copied().filter(|a| a.touches(gpa, len)).collect()
}

#[test]
fn cplus_rx_reads_and_hands_back_opts1_in_one_word_after_the_frame() {
    let h = H::new(REVISION_CPLUS);
    cplus_up(&h, 0x2b);
    rx_desc(&h, 0, 0x5_0000, false);
    // Descriptors 1-3 of 512 bytes: a full-size frame spreads over them.
    for i in 1..4u64 {
        let opts1 = DESC_OWN | if i == 3 { DESC_EOR } else { 0 } | 512;
        let mut d = [0u8; 16];
        d[0..4].copy_from_slice(&opts1.to_le_bytes());
        d[8..16].copy_from_slice(&(0x6_0000 + 0x1000 * i).to_le_bytes());
        h.poke(RXR + 16 * i, &d);
    }
    h.mem.record();
    assert_eq!(h.dev.receive(&frame_to(MAC, 1514)), RxResult::Accepted);
    assert_eq!(h.dev.receive(&frame_to(MAC, 1200)), RxResult::Accepted);
    let j = h.mem.take_journal();
    for (i, buf, len) in [
        (0, 0x5_0000, 1518),
        (1, 0x6_1000, 512),
        (2, 0x6_2000, 512),
        (3, 0x6_3000, 512),
    ] {
        let d = RXR + 16 * i;
        let on_opts1 = touching(&j, d, 4);
        assert!(
            on_opts1
                .iter()
                .all(|a| matches!(a, Access::ReadWord { .. } | Access::WriteWord { .. })),
            "descriptor {i}: opts1 only by whole words: {on_opts1:?}"
        );
        assert_eq!(
            on_opts1
                .iter()
                .filter(|a| matches!(a, Access::WriteWord { .. }))
                .count(),
            1,
            "descriptor {i}: opts1 written once (a second store could land after the guest re-armed it)"
        );
        // The hand-back (opts1 without OWN) is the last thing the device does to this
        // descriptor and its buffer.
        let last = j
            .iter()
            .rposition(|a| a.touches(d, 16) || a.touches(buf, len))
            .expect("descriptor used");
        assert_eq!(j[last], Access::WriteWord { gpa: d }, "descriptor {i}");
        assert!(
            j[..last]
                .iter()
                .any(|a| matches!(a, Access::Write { .. }) && a.touches(buf, len)),
            "descriptor {i}: its buffer is written before the hand-back"
        );
    }
    assert_eq!(desc_opts1(&h, RXR, 1) & (DESC_OWN | DESC_FS), DESC_FS);
    assert_eq!(desc_opts1(&h, RXR, 3) & (DESC_OWN | DESC_LS), DESC_LS);
}

#[test]
fn c_rx_writes_the_record_header_last_in_one_word() {
    let h = H::new(REVISION_C);
    c_mode_up(&h);
    let ring = 0x8_0000u64;
    let f = frame_to(MAC, 200);
    h.mem.record();
    assert_eq!(h.dev.receive(&f), RxResult::Accepted);
    assert_eq!(h.dev.receive(&f), RxResult::Accepted);
    let j = h.mem.take_journal();
    // The second record starts after the first: 4 + 200 + 4 bytes, 4-aligned.
    for at in [ring, ring + 208] {
        let on_header = touching(&j, at, 4);
        assert_eq!(
            on_header,
            vec![Access::WriteWord { gpa: at }],
            "the header at {at:#x} is one 32-bit store"
        );
        let header_store = j.iter().position(|a| *a == Access::WriteWord { gpa: at });
        let last_body = j.iter().rposition(|a| a.touches(at + 4, 204));
        assert!(
            last_body < header_store,
            "the frame and CRC at {at:#x} are written before the header: {j:?}"
        );
    }
    let hdr = u32::from_le_bytes(h.peek(ring, 4).try_into().unwrap());
    assert_eq!(hdr >> 16, 204);
    assert_eq!(hdr & 1, 1, "ROK");
    assert_eq!(h.peek(ring + 4, 200), f);
}

/// A burst from the tap (`receive_held`): each frame is in its buffer at once, the
/// descriptors go back together, in ring order, with one ROK, when the burst ends.
#[test]
fn cplus_rx_burst_hands_its_descriptors_back_together_in_ring_order() {
    let h = H::new(REVISION_CPLUS);
    cplus_up(&h, 0x2b);
    h.w16(0x3c, INT_ROK);
    let n = RX_HOLD_MAX as u64 + 2;
    for i in 0..n {
        rx_desc(&h, i, 0x5_0000 + 0x1000 * i, i == n - 1);
    }
    let frames: Vec<_> = (0..n as usize).map(|i| frame_to(MAC, 100 + i)).collect();
    h.mem.record();
    for f in &frames[..RX_HOLD_MAX] {
        assert_eq!(h.dev.receive_held(f), RxResult::Accepted);
    }
    // Held: written, still the NIC's, no ROK and no interrupt yet.
    for i in 0..RX_HOLD_MAX as u64 {
        assert_eq!(
            h.peek(0x5_0000 + 0x1000 * i, 100 + i as usize),
            frames[i as usize]
        );
        assert_ne!(desc_opts1(&h, RXR, i) & DESC_OWN, 0, "descriptor {i} held");
    }
    assert!(!h.level(), "no interrupt for held frames");
    // One more than the hold takes: the held ones go back first, this one is held.
    assert_eq!(h.dev.receive_held(&frames[RX_HOLD_MAX]), RxResult::Accepted);
    for i in 0..RX_HOLD_MAX as u64 {
        assert_eq!(
            desc_opts1(&h, RXR, i) & DESC_OWN,
            0,
            "descriptor {i} handed back"
        );
    }
    assert_ne!(desc_opts1(&h, RXR, RX_HOLD_MAX as u64) & DESC_OWN, 0);
    h.dev.release_rx();
    assert_eq!(
        desc_opts1(&h, RXR, RX_HOLD_MAX as u64) & 0x1fff,
        100 + RX_HOLD_MAX as u32 + 4
    );
    assert!(h.level(), "ROK raised when the burst ends");
    assert_eq!(h.r16(0x3e) & INT_ROK, INT_ROK);
    // The hand-backs are one word each, in ring order.
    let j = h.mem.take_journal();
    let handed: Vec<u64> = j
        .iter()
        .filter_map(|a| match a {
            Access::WriteWord { gpa } if (*gpa - RXR) % 16 == 0 && *gpa < RXR + 16 * n => {
                Some((*gpa - RXR) / 16)
            }
            _ => None,
        })
        .collect();
    assert_eq!(handed, (0..=RX_HOLD_MAX as u64).collect::<Vec<_>>());
}

/// Whatever the guest does next comes after the frames the NIC has written: a
/// register access releases held descriptors before it is served, so a reset or a
/// new ring address never meets a hand-back still to be written.
#[test]
fn cplus_rx_held_descriptors_go_back_before_any_register_access() {
    let h = H::new(REVISION_CPLUS);
    cplus_up(&h, 0x2b);
    rx_desc(&h, 0, 0x5_0000, false);
    rx_desc(&h, 1, 0x5_1000, true);
    assert_eq!(h.dev.receive_held(&frame_to(MAC, 100)), RxResult::Accepted);
    assert_ne!(desc_opts1(&h, RXR, 0) & DESC_OWN, 0);
    // A reading driver sees the frame with its ROK.
    assert_eq!(h.r16(0x3e) & INT_ROK, INT_ROK);
    assert_eq!(desc_opts1(&h, RXR, 0) & DESC_OWN, 0);
    h.w16(0x3e, INT_ROK);
    assert_eq!(h.dev.receive_held(&frame_to(MAC, 100)), RxResult::Accepted);
    // A reset: the held descriptor is handed back first, to the ring it came from.
    h.w8(0x37, CR_RST);
    assert_eq!(desc_opts1(&h, RXR, 1) & (DESC_OWN | 0x1fff), 104);
    // A frame too big for one buffer is spread at once, after the held ones.
    cplus_up(&h, 0x2b);
    rx_desc(&h, 0, 0x5_0000, false);
    rx_desc_sized(&h, 1, 0x5_1000, 512, false);
    rx_desc_sized(&h, 2, 0x5_2000, 1536, true);
    assert_eq!(h.dev.receive_held(&frame_to(MAC, 100)), RxResult::Accepted);
    assert_eq!(h.dev.receive_held(&frame_to(MAC, 1000)), RxResult::Accepted);
    for i in 0..3 {
        assert_eq!(desc_opts1(&h, RXR, i) & DESC_OWN, 0, "descriptor {i}");
    }
}

/// C mode hands a record over at once in a burst too (holding headers did not pay).
#[test]
fn c_rx_burst_hands_each_record_over_at_once() {
    let h = H::new(REVISION_C);
    c_mode_up(&h);
    let f = frame_to(MAC, 200);
    assert_eq!(h.dev.receive_held(&f), RxResult::Accepted);
    assert_eq!(rx_record(&h, 0).1, 204);
}

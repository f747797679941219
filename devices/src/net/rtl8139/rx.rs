//! Receive: address filter, the C-mode ring and the C+ descriptor ring.

use super::regs::*;
use super::{State, MAX_CPLUS_FRAME, MAX_FRAME, RX_HOLD_MAX};
use crate::dma::DmaError;
use crate::net::csum;
use crate::net::{crc32_ieee, ether_crc_be, RxResult};

/// Frames shorter than this are padded (as they would be on the wire).
const MIN_FRAME: usize = 60;
/// C-mode ring space `can_receive` wants free: header + 1518-byte frame + CRC.
const C_RX_HEADROOM: usize = (4 + 1518 + 4 + 3) & !3;

/// What the address filter decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Match {
    Broadcast,
    Multicast,
    Physical,
    /// Accepted only because of AAP (promiscuous); no match flag.
    Promiscuous,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

impl State {
    pub(crate) fn c_ring_size(&self) -> usize {
        8192 << ((self.rcr >> 11) & 3)
    }

    pub(crate) fn rx_ring_empty(&self) -> bool {
        let size = self.c_ring_size();
        (self.rx_read as usize % size) == self.rx_write % size
    }

    /// Free bytes in the C-mode ring; equal read/write offsets mean "empty".
    fn c_ring_free(&self) -> usize {
        let size = self.c_ring_size();
        let read = self.rx_read as usize % size;
        // `rx_write` is kept < size, but reduce anyway: the size comes from RCR,
        // which the guest may change at any time.
        let free = (size + read - self.rx_write % size) % size;
        if free == 0 {
            size
        } else {
            free
        }
    }

    fn rx_enabled(&self) -> bool {
        let on = if self.cplus {
            self.cr & CR_RE != 0 && self.cpcmd & CPCMD_RXENB != 0
        } else {
            self.cr & CR_RE != 0
        };
        on && self.clock_running && self.link_up && self.bus_master()
    }

    pub(crate) fn can_receive(&mut self) -> bool {
        if !self.rx_enabled() {
            // Not "full": frames are simply dropped, keep the backend drained.
            return true;
        }
        if self.cplus {
            match self.cplus_rx_desc_addr(self.cp_rx_idx) {
                Some(a) => match self.dma.read_u32(a) {
                    Ok(opts1) => opts1 & DESC_OWN != 0,
                    Err(_) => true,
                },
                None => true,
            }
        } else {
            // Strictly more than needed, as `receive` requires.
            self.c_ring_free() > C_RX_HEADROOM
        }
    }

    pub(crate) fn filter(&self, frame: &[u8]) -> Option<Match> {
        let dst = &frame[..6];
        if self.rcr & RCR_AAP != 0 {
            return Some(Match::Promiscuous);
        }
        if dst == [0xFF; 6] {
            return (self.rcr & RCR_AB != 0).then_some(Match::Broadcast);
        }
        if dst[0] & 1 != 0 {
            if self.rcr & RCR_AM == 0 {
                return None;
            }
            let bit = (ether_crc_be(dst) >> 26) as usize;
            return (self.mar[bit >> 3] & (1 << (bit & 7)) != 0).then_some(Match::Multicast);
        }
        (self.rcr & RCR_APM != 0 && dst == self.idr).then_some(Match::Physical)
    }

    pub(crate) fn receive(&mut self, frame: &[u8]) -> RxResult {
        let max = if self.cplus {
            MAX_CPLUS_FRAME
        } else {
            MAX_FRAME
        };
        if frame.len() < csum::ETH_HLEN || frame.len() > max {
            self.stats.rx_errors += 1;
            return RxResult::Invalid;
        }
        if !self.rx_enabled() {
            self.stats.rx_disabled += 1;
            return RxResult::Disabled;
        }
        let Some(m) = self.filter(frame) else {
            self.stats.rx_filtered += 1;
            return RxResult::Filtered;
        };
        let r = if self.cplus {
            self.cplus_receive(frame, m)
        } else {
            self.c_receive(frame, m)
        };
        match r {
            RxResult::Accepted => {
                self.stats.rx_packets += 1;
                self.stats.rx_bytes += frame.len() as u64;
                self.tally.rx_ok += 1;
                match m {
                    Match::Broadcast => self.tally.rx_ok_brd += 1,
                    Match::Multicast => self.tally.rx_ok_mul = self.tally.rx_ok_mul.wrapping_add(1),
                    Match::Physical => self.tally.rx_ok_phy += 1,
                    Match::Promiscuous => {}
                }
            }
            RxResult::RingFull => {
                self.stats.rx_ring_full += 1;
                self.mpc = (self.mpc + 1) & 0x00FF_FFFF;
                self.tally.missed = self.tally.missed.wrapping_add(1);
                self.isr |= INT_RXOVW;
            }
            _ => self.stats.rx_errors += 1,
        }
        r
    }

    /// Frame (padded to the wire minimum) + CRC into `self.rxbuf` after `prefix`
    /// bytes of room; returns the frame length without CRC.
    fn build_rx(&mut self, frame: &[u8], prefix: usize) -> usize {
        let len = frame.len().max(MIN_FRAME);
        self.rxbuf.clear();
        self.rxbuf.resize(prefix, 0);
        self.rxbuf.extend_from_slice(frame);
        self.rxbuf.resize(prefix + len, 0);
        let crc = crc32_ieee(&self.rxbuf[prefix..]);
        self.rxbuf.extend_from_slice(&crc.to_le_bytes());
        len
    }

    fn c_receive(&mut self, frame: &[u8], m: Match) -> RxResult {
        let size = self.c_ring_size();
        let len = self.build_rx(frame, 4);
        let rec = self.rxbuf.len(); // header + frame + CRC
        let need = align4(rec);
        // Never let the write offset catch up with the read offset: equal offsets
        // mean "empty".
        if need >= self.c_ring_free() {
            return RxResult::RingFull;
        }
        let status = RXS_ROK
            | match m {
                Match::Broadcast => RXS_BAR,
                Match::Multicast => RXS_MAR,
                Match::Physical => RXS_PAM,
                Match::Promiscuous => 0,
            };
        let rlen = (len + 4) as u16;
        self.rxbuf[0..2].copy_from_slice(&status.to_le_bytes());
        self.rxbuf[2..4].copy_from_slice(&rlen.to_le_bytes());

        let w = self.rx_write % size;
        let base = self.rbstart as u64;
        // WRAP=1 (8139too's "RxNoWrap"): write past the end into the driver's slack;
        // only the next offset wraps. No effect with the 64K ring.
        let linear = (self.rcr & RCR_WRAP != 0 && size < 65536) || w + rec <= size;
        // The frame and CRC first, the header last in one 32-bit store, as the chip
        // writes it once the frame is complete: a driver that polls the ring (ours)
        // may take a non-zero header as a whole record. `w` is 4-aligned, so the
        // header never wraps and `first` >= 4.
        let header =
            u32::from_le_bytes([self.rxbuf[0], self.rxbuf[1], self.rxbuf[2], self.rxbuf[3]]);
        // Not held in a burst (`receive_held`): measured, a C stream's guest already
        // finds ~8 records per poll, and holding headers cost it 8% of its rate.
        let res = if linear {
            self.dma.write(base + w as u64 + 4, &self.rxbuf[4..])
        } else {
            let first = size - w;
            self.dma
                .write(base + w as u64 + 4, &self.rxbuf[4..first])
                .and_then(|_| self.dma.write(base, &self.rxbuf[first..]))
        }
        .and_then(|_| self.dma.write_u32(base + w as u64, header));
        if res.is_err() {
            // A master abort: the frame is lost, the guest sees a system error.
            self.isr |= INT_SERR;
            return RxResult::Disabled;
        }
        self.rx_write = (w + need) % size;
        self.isr |= INT_ROK;
        RxResult::Accepted
    }

    /// Write a C+ frame's hand-over word (opts1 without OWN) now and raise ROK, or
    /// hold it for `release_held_rx` during `receive_held`.
    fn hand_over(&mut self, at: u64, word: u32) -> RxResult {
        if self.hold_rx {
            if self.held_rx_len == RX_HOLD_MAX {
                self.release_held_rx();
            }
            self.held_rx[self.held_rx_len] = (at, word);
            self.held_rx_len += 1;
            return RxResult::Accepted;
        }
        if self.dma.write_u32(at, word).is_err() {
            self.isr |= INT_SERR;
            return RxResult::Disabled;
        }
        self.isr |= INT_ROK;
        RxResult::Accepted
    }

    fn cplus_rx_desc_addr(&self, idx: usize) -> Option<u64> {
        let base = (self.rdsar[1] as u64) << 32 | self.rdsar[0] as u64;
        base.checked_add(16 * idx as u64)
    }

    /// An RX descriptor's opts1 and buffer address: opts1 in one 32-bit read, first,
    /// so OWN and the buffer size come from the same store of the guest's; the address
    /// after it (the guest wrote it before handing the descriptor over).
    fn cplus_rx_desc(&self, daddr: u64) -> Result<(u32, u64), DmaError> {
        let opts1 = self.dma.read_u32(daddr)?;
        let mut b = [0u8; 8];
        self.dma.read(daddr.wrapping_add(8), &mut b)?;
        Ok((opts1, u64::from_le_bytes(b)))
    }

    fn cplus_receive(&mut self, frame: &[u8], m: Match) -> RxResult {
        let Some(daddr) = self.cplus_rx_desc_addr(self.cp_rx_idx) else {
            self.isr |= INT_SERR;
            return RxResult::Disabled;
        };
        let Ok((opts1, buf)) = self.cplus_rx_desc(daddr) else {
            self.isr |= INT_SERR;
            return RxResult::Disabled;
        };
        if opts1 & DESC_OWN == 0 {
            // RDU: no descriptor for us.
            return RxResult::RingFull;
        }

        // VLAN de-tagging: the tag goes to opts2, the frame loses 4 bytes.
        let mut opts2 = 0u32;
        let strip = self.cpcmd & CPCMD_RXVLAN != 0
            && frame.len() >= 18
            && u16::from_be_bytes([frame[12], frame[13]]) == csum::ETHERTYPE_VLAN;
        let len = if strip {
            let tci = u16::from_be_bytes([frame[14], frame[15]]);
            opts2 = RXD_TAVA | tci.swap_bytes() as u32;
            // Assemble the untagged frame in a reused scratch buffer.
            let mut tmp = std::mem::take(&mut self.vlanbuf);
            tmp.clear();
            tmp.extend_from_slice(&frame[..12]);
            tmp.extend_from_slice(&frame[16..]);
            let l = self.build_rx(&tmp, 0);
            self.vlanbuf = tmp;
            l
        } else {
            self.build_rx(frame, 0)
        };

        let bufsize = (opts1 & RXD_BUF_MASK) as usize;
        if len + 4 > bufsize {
            // Frame + CRC overflow this buffer: spread over the next ones, as the
            // chip does (8139cp drops such frames, counting rx_frags).
            return self.cplus_receive_fragments(m, opts2);
        }
        if self.dma.write(buf, &self.rxbuf).is_err() {
            self.isr |= INT_SERR;
            return RxResult::Disabled;
        }

        let mut status =
            (opts1 & DESC_EOR) | DESC_FS | DESC_LS | rx_match_bits(m) | (len as u32 + 4);
        if self.cpcmd & CPCMD_RXCHKSUM != 0 {
            status |= rx_checksum_bits(&self.rxbuf[..len]);
        }
        // opts2 first, then opts1: clearing OWN hands the descriptor back.
        if self.dma.write_u32(daddr + 4, opts2).is_err() {
            self.isr |= INT_SERR;
            return RxResult::Disabled;
        }
        self.cp_rx_idx = next_rx_index(self.cp_rx_idx, opts1);
        self.hand_over(daddr, status)
    }

    /// Hand back the held C+ descriptors, oldest first (each opts1 in one word, OWN
    /// clear), and raise ROK for them.
    pub(crate) fn release_held_rx(&mut self) {
        if self.held_rx_len == 0 {
            return;
        }
        for i in 0..std::mem::take(&mut self.held_rx_len) {
            let (daddr, status) = self.held_rx[i];
            // The address was good when the frame was written: only memory taken
            // away since (an unplug) fails here, and the frame is then lost.
            if self.dma.write_u32(daddr, status).is_err() {
                self.isr |= INT_SERR;
            }
        }
        self.isr |= INT_ROK;
    }
}

/// The descriptor after `idx`: index 0 after EOR; a ring without EOR still wraps at
/// the 64-entry maximum.
fn next_rx_index(idx: usize, opts1: u32) -> usize {
    if opts1 & DESC_EOR != 0 {
        0
    } else {
        (idx + 1) % 64
    }
}

fn rx_match_bits(m: Match) -> u32 {
    match m {
        Match::Broadcast => RXD_BAR,
        Match::Multicast => RXD_MAR,
        Match::Physical => RXD_PAM,
        Match::Promiscuous => 0,
    }
}

impl State {
    /// `self.rxbuf` (frame + CRC) over as many descriptors as it needs, FirstFrag on
    /// the first and LastFrag (with the whole length) on the last. Nothing is written
    /// unless all of them are the guest's (OWN): otherwise RDU, as for one buffer.
    fn cplus_receive_fragments(&mut self, m: Match, opts2: u32) -> RxResult {
        // Spread frames are handed back at once, after the held ones (ring order).
        self.release_held_rx();
        let total = self.rxbuf.len();
        // (descriptor address, opts1, buffer, bytes of the frame it takes)
        // On the stack: no allocation per received frame.
        let mut slots = [(0u64, 0u32, 0u64, 0usize); 64];
        let mut used = 0;
        let (mut idx, mut left) = (self.cp_rx_idx, total);
        while left > 0 {
            if used == slots.len() {
                return RxResult::RingFull;
            }
            let Some(daddr) = self.cplus_rx_desc_addr(idx) else {
                self.isr |= INT_SERR;
                return RxResult::Disabled;
            };
            let Ok((opts1, buf)) = self.cplus_rx_desc(daddr) else {
                self.isr |= INT_SERR;
                return RxResult::Disabled;
            };
            let bufsize = (opts1 & RXD_BUF_MASK) as usize;
            if opts1 & DESC_OWN == 0 || bufsize == 0 {
                return RxResult::RingFull;
            }
            let take = bufsize.min(left);
            slots[used] = (daddr, opts1, buf, take);
            used += 1;
            left -= take;
            idx = next_rx_index(idx, opts1);
        }
        let plan = &slots[..used];
        let last = used - 1;
        let mut off = 0;
        for (i, &(daddr, opts1, buf, take)) in plan.iter().enumerate() {
            let mut status = (opts1 & DESC_EOR) | rx_match_bits(m);
            status |= if i == 0 { DESC_FS } else { 0 };
            status |= if i == last {
                DESC_LS | total as u32
            } else {
                take as u32
            };
            let ok = self
                .dma
                .write(buf, &self.rxbuf[off..off + take])
                .and_then(|_| self.dma.write_u32(daddr + 4, opts2))
                .and_then(|_| self.dma.write_u32(daddr, status));
            if ok.is_err() {
                self.isr |= INT_SERR;
                return RxResult::Disabled;
            }
            off += take;
            self.cp_rx_idx = next_rx_index(self.cp_rx_idx, opts1);
        }
        self.isr |= INT_ROK;
        RxResult::Accepted
    }
}

/// C+ RX checksum status: protocol id and failure bits for an IPv4 frame.
fn rx_checksum_bits(frame: &[u8]) -> u32 {
    let Some(ip) = csum::parse_ipv4(frame) else {
        return 0;
    };
    let mut bits = 0;
    if !csum::ip_checksum_ok(frame, &ip) {
        bits |= RXD_IPF;
    }
    match (ip.proto, csum::l4_checksum_ok(frame, &ip)) {
        (csum::IPPROTO_TCP, Some(ok)) => {
            bits |= RXD_PID_TCP;
            if !ok {
                bits |= RXD_TCPF;
            }
        }
        (csum::IPPROTO_UDP, Some(ok)) => {
            bits |= RXD_PID_UDP;
            if !ok {
                bits |= RXD_UDPF;
            }
        }
        _ => bits |= RXD_PID_IP,
    }
    bits
}

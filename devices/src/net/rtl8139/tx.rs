//! Transmit: C-mode descriptors, the C+ rings, VLAN insertion, checksum offload and
//! TSO, loopback.

use super::regs::*;
use super::{State, LOOPBACK_QUEUE, MAX_CPLUS_ASSEMBLY, MAX_CPLUS_FRAME, MAX_FRAME, MIN_TSO_MSS};
use crate::net::csum::{self, ETH_HLEN};
use crate::net::{TsoInfo, TxOffload};

/// The shortest frame on the wire, without FCS.
const MIN_WIRE_FRAME: usize = 60;

/// Why a C+ frame was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxFail {
    /// Bad offload request (MSS 0/too small/too large, not TCP/IPv4, ...) or an
    /// oversized frame.
    Invalid,
}

impl State {
    fn loopback_mode(&self) -> bool {
        (self.tcr >> TCR_LBK_SHIFT) & 3 == 3
    }

    /// C-mode transmit: take descriptors in strict round-robin order from
    /// `tx_next` while the guest has handed them over (OWN = 0). At most four per
    /// call, so it is bounded.
    pub(crate) fn c_tx(&mut self) {
        if self.cr & CR_TE == 0 || !self.bus_master() {
            // Stays pending; goes when TX or bus mastering is enabled and the
            // next doorbell / TE write comes.
            return;
        }
        for _ in 0..4 {
            let n = self.tx_next;
            let tsd = self.tsd[n];
            if tsd & TSD_OWN != 0 {
                break;
            }
            let size = (tsd & TSD_SIZE) as usize;
            self.tx_next = (n + 1) % 4;
            if size > MAX_FRAME {
                // Larger than the TX FIFO allows: abort, nothing leaves.
                self.tsd[n] |= TSD_OWN | TSD_TABT;
                self.isr |= INT_TER;
                self.stats.tx_errors += 1;
                self.tally.tx_err += 1;
                self.tally.tx_abt = self.tally.tx_abt.wrapping_add(1);
                continue;
            }
            let mut buf = std::mem::take(&mut self.txbuf);
            buf.clear();
            buf.resize(size, 0);
            let res = self.dma.read(self.tsad[n] as u64, &mut buf);
            match res {
                Ok(()) => {
                    self.emit(&buf, None);
                    self.tsd[n] |= TSD_OWN | TSD_TOK;
                    self.isr |= INT_TOK;
                    self.tally.tx_ok += 1;
                }
                Err(_) => {
                    // Master abort on the buffer: the FIFO underruns.
                    self.tsd[n] |= TSD_OWN | TSD_TUN;
                    self.isr |= INT_TER | INT_SERR;
                    self.stats.tx_errors += 1;
                    self.tally.tx_err += 1;
                    self.tally.tx_undrn = self.tally.tx_undrn.wrapping_add(1);
                }
            }
            self.txbuf = buf;
        }
    }

    pub(super) fn cplus_ring_base(&self, q: usize) -> u64 {
        let (lo, hi) = if q == 0 {
            (self.tsad[0], self.tsad[1])
        } else {
            (self.tsad[2], self.tsad[3])
        };
        (hi as u64) << 32 | lo as u64
    }

    /// C+ transmit on queue `q` (0 normal, 1 high): walk at most 64 descriptors.
    /// Returns how many it took from the guest (sent or failed).
    pub(crate) fn cplus_tx(&mut self, q: usize) -> usize {
        if self.cr & CR_TE == 0 || self.cpcmd & CPCMD_TXENB == 0 || !self.bus_master() {
            return 0;
        }
        let base = self.cplus_ring_base(q);
        let mut done = 0;
        for _ in 0..64 {
            let idx = self.cp_tx_idx[q];
            let Some(daddr) = base.checked_add(16 * idx as u64) else {
                self.isr |= INT_SERR | INT_TER;
                break;
            };
            // opts1 first, the rest after it: the guest may be filling this very
            // descriptor while we walk (the TX runs in the I/O thread, beside the
            // vCPU, and `snoop_tx` looks without any doorbell). 8139cp writes
            // opts2 and addr, wmb(), then opts1 with OWN; x86 keeps our loads in
            // program order and the guest's stores in theirs, so once this load
            // sees OWN the later loads see the addr and opts2 written before it.
            // One 16-byte copy has no order among its bytes and could pair a new
            // opts1 with a stale addr.
            let mut d = [0u8; 16];
            let opts1 = match self.dma.read_u32(daddr) {
                Ok(v) => v,
                Err(_) => {
                    // Ring outside RAM: nothing completes, the guest gets an error.
                    self.isr |= INT_SERR | INT_TER;
                    self.stats.tx_errors += 1;
                    break;
                }
            };
            if opts1 & DESC_OWN == 0 {
                break;
            }
            // Keeps the compiler from hoisting the loads below above the one of opts1
            // (x86 orders them in hardware: this emits no instruction).
            std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
            // (No overflow: [daddr, daddr + 4) was RAM a moment ago.)
            if self.dma.read(daddr.wrapping_add(4), &mut d[4..]).is_err() {
                self.isr |= INT_SERR | INT_TER;
                self.stats.tx_errors += 1;
                break;
            }
            let opts2 = u32::from_le_bytes([d[4], d[5], d[6], d[7]]);
            let buf = u64::from_le_bytes([d[8], d[9], d[10], d[11], d[12], d[13], d[14], d[15]]);
            let len = (opts1 & TXD_LEN_MASK) as usize;
            if opts1 & DESC_FS != 0 {
                self.cp_asm[q].clear();
                self.cp_asm_active[q] = true;
                self.cp_asm_bad[q] = false;
                self.cp_asm_opts2[q] = opts2;
            }
            let mut status_err = 0u32;
            if !self.cp_asm_active[q] {
                // A fragment without a first descriptor: consumed, not sent.
                status_err = TXD_TES;
            } else if !self.cp_asm_bad[q] {
                let cur = self.cp_asm[q].len();
                match cur.checked_add(len) {
                    Some(end) if end <= MAX_CPLUS_ASSEMBLY => {
                        self.cp_asm[q].resize(end, 0);
                        if self.dma.read(buf, &mut self.cp_asm[q][cur..end]).is_err() {
                            self.cp_asm_bad[q] = true;
                            self.cp_asm[q].truncate(cur);
                            status_err = TXD_UNF | TXD_TES;
                            self.isr |= INT_SERR;
                        }
                    }
                    _ => self.cp_asm_bad[q] = true,
                }
            }
            if opts1 & DESC_LS != 0 && self.cp_asm_active[q] {
                self.cp_asm_active[q] = false;
                let ok = !self.cp_asm_bad[q] && {
                    let frame = std::mem::take(&mut self.cp_asm[q]);
                    let r = self.cplus_send(&frame, opts1, self.cp_asm_opts2[q]);
                    self.cp_asm[q] = frame;
                    r.is_ok()
                };
                if ok {
                    self.tally.tx_ok += 1;
                } else {
                    status_err |= TXD_TES;
                    self.stats.tx_errors += 1;
                    self.tally.tx_err += 1;
                }
            }
            if status_err != 0 {
                self.isr |= INT_TER;
            }
            // Write back a clean status: OWN cleared, the command bits (which
            // overlap the collision count) cleared.
            let wb = (opts1 & (DESC_EOR | DESC_FS | DESC_LS | TXD_LEN_MASK)) | status_err;
            if self.dma.write_u32(daddr, wb).is_err() {
                self.isr |= INT_SERR | INT_TER;
                break;
            }
            done += 1;
            self.cp_tx_idx[q] = if opts1 & DESC_EOR != 0 {
                0
            } else {
                (idx + 1) % 64
            };
        }
        if done > 0 {
            self.isr |= INT_TOK;
        }
        done
    }

    /// Send an assembled C+ frame with the offloads its LS descriptor asks for.
    fn cplus_send(&mut self, frame: &[u8], opts1: u32, opts2: u32) -> Result<(), TxFail> {
        let vlan = (opts2 & TXD_TAGC != 0).then(|| (opts2 as u16).swap_bytes());
        if opts1 & TXD_LGSEN != 0 {
            let mss = ((opts1 >> TXD_MSS_SHIFT) & TXD_MSS_MASK) as usize;
            return self.tso(frame, mss, vlan);
        }
        if frame.len() > MAX_CPLUS_FRAME {
            return Err(TxFail::Invalid);
        }
        let want = opts1 & (TXD_IPCS | TXD_TCPCS | TXD_UDPCS);
        if want == 0 {
            self.emit(frame, vlan);
            return Ok(());
        }
        let mut f = std::mem::take(&mut self.segbuf);
        f.clear();
        f.extend_from_slice(frame);
        let mut host_csum = None;
        // On any inconsistency the frame goes out as the guest built it.
        if let Some(ip) = csum::parse_ipv4(&f) {
            if want & TXD_IPCS != 0 {
                csum::fix_ip_checksum(&mut f, &ip);
            }
            let l4_ok = !ip.fragment
                && match ip.proto {
                    csum::IPPROTO_TCP => {
                        want & TXD_TCPCS != 0 && csum::tcp_header_len(&f, &ip).is_some()
                    }
                    csum::IPPROTO_UDP => want & TXD_UDPCS != 0 && ip.l4_len() >= 8,
                    _ => false,
                };
            if l4_ok {
                match csum::l4_csum_field(ip.proto) {
                    Some(field) if self.sink.supports_offload() && !self.loopback_mode() => {
                        // Leave the sum over the payload to the host kernel: the
                        // field gets the pseudo-header sum (virtio semantics).
                        let ps = csum::fold(csum::pseudo_sum(
                            ip.src(&f),
                            ip.dst(&f),
                            ip.proto,
                            ip.l4_len(),
                        ));
                        let at = ip.l4_off() + field;
                        f[at..at + 2].copy_from_slice(&ps.to_be_bytes());
                        host_csum = Some((ip.l4_off(), field));
                    }
                    _ => {
                        csum::fix_l4_checksum(&mut f, &ip);
                    }
                }
            }
        }
        match host_csum {
            Some((start, field)) => {
                // Trailing padding beyond ip_len is left alone: the host sums
                // from csum_start to the end of the frame, so cut it off.
                if let Some(ip) = csum::parse_ipv4(&f) {
                    f.truncate(ETH_HLEN + ip.ip_len);
                }
                let shift = if vlan.is_some() { 4 } else { 0 };
                let off = TxOffload {
                    csum: Some(((start + shift) as u16, field as u16)),
                    tso4: None,
                };
                let out = self.with_vlan(&f, vlan);
                let sent = self.sink.send_offload(&out, &off);
                self.count_tx(sent, out.len());
                self.vlanbuf = out;
            }
            None => self.emit(&f, vlan),
        }
        self.segbuf = f;
        Ok(())
    }

    /// TCP segmentation (large send). Each segment reuses the headers with IP total
    /// length, IP ID (+1 per segment), TCP sequence and flags adjusted and both
    /// checksums recomputed.
    fn tso(&mut self, frame: &[u8], mss: usize, vlan: Option<u16>) -> Result<(), TxFail> {
        let ip = csum::parse_ipv4(frame).ok_or(TxFail::Invalid)?;
        if ip.fragment {
            return Err(TxFail::Invalid);
        }
        let thl = csum::tcp_header_len(frame, &ip).ok_or(TxFail::Invalid)?;
        let hdr_len = ETH_HLEN + ip.ihl + thl;
        if mss < MIN_TSO_MSS || hdr_len + mss > MAX_CPLUS_FRAME {
            return Err(TxFail::Invalid);
        }
        let end = ETH_HLEN + ip.ip_len;
        let payload_len = end - hdr_len;

        if self.sink.supports_offload() && !self.loopback_mode() && payload_len > mss {
            return self.tso_host(frame, &ip, hdr_len, mss, vlan);
        }

        let tcp = ETH_HLEN + ip.ihl;
        let seq0 = u32::from_be_bytes([
            frame[tcp + 4],
            frame[tcp + 5],
            frame[tcp + 6],
            frame[tcp + 7],
        ]);
        let id0 = u16::from_be_bytes([frame[ETH_HLEN + 4], frame[ETH_HLEN + 5]]);
        let flags0 = frame[tcp + 13];
        let nseg = payload_len.div_ceil(mss).max(1);
        let mut seg = std::mem::take(&mut self.segbuf);
        for i in 0..nseg {
            let off = i * mss;
            let chunk = &frame[hdr_len + off..hdr_len + (off + mss).min(payload_len)];
            seg.clear();
            seg.extend_from_slice(&frame[..hdr_len]);
            seg.extend_from_slice(chunk);
            let tot = (ip.ihl + thl + chunk.len()) as u16;
            seg[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&tot.to_be_bytes());
            let id = id0.wrapping_add(i as u16);
            seg[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&id.to_be_bytes());
            let seq = seq0.wrapping_add(off as u32);
            seg[tcp + 4..tcp + 8].copy_from_slice(&seq.to_be_bytes());
            let mut flags = flags0;
            if i + 1 < nseg {
                flags &= !(0x01 | 0x08); // FIN, PSH only on the last segment
            }
            if i > 0 {
                flags &= !0x80; // CWR only on the first
            }
            seg[tcp + 13] = flags;
            let sip = csum::Ipv4Frame {
                ip_len: tot as usize,
                ..ip
            };
            csum::fix_ip_checksum(&mut seg, &sip);
            csum::fix_l4_checksum(&mut seg, &sip);
            self.stats.tso_segments += 1;
            self.emit(&seg, vlan);
        }
        self.segbuf = seg;
        Ok(())
    }

    /// Hand a large send to a vnet-header backend: one super-frame, the host
    /// kernel segments and checksums.
    fn tso_host(
        &mut self,
        frame: &[u8],
        ip: &csum::Ipv4Frame,
        hdr_len: usize,
        mss: usize,
        vlan: Option<u16>,
    ) -> Result<(), TxFail> {
        let end = ETH_HLEN + ip.ip_len;
        let mut f = std::mem::take(&mut self.segbuf);
        f.clear();
        f.extend_from_slice(&frame[..end]);
        csum::fix_ip_checksum(&mut f, ip);
        // virtio semantics: the TCP checksum field holds the pseudo-header sum.
        let tcp = ETH_HLEN + ip.ihl;
        let ps = csum::fold(csum::pseudo_sum(
            ip.src(&f),
            ip.dst(&f),
            csum::IPPROTO_TCP,
            ip.l4_len(),
        ));
        f[tcp + 16..tcp + 18].copy_from_slice(&ps.to_be_bytes());
        let shift = if vlan.is_some() { 4 } else { 0 };
        let off = TxOffload {
            csum: Some(((tcp + shift) as u16, 16)),
            tso4: Some(TsoInfo {
                mss: mss as u16,
                hdr_len: (hdr_len + shift) as u16,
            }),
        };
        let out = self.with_vlan(&f, vlan);
        let sent = self.sink.send_offload(&out, &off);
        self.count_tx(sent, out.len());
        self.vlanbuf = out;
        self.segbuf = f;
        Ok(())
    }

    /// The frame with an 802.1Q tag inserted, in the reused VLAN buffer (taken out
    /// of `self`; the caller puts it back).
    fn with_vlan(&mut self, frame: &[u8], vlan: Option<u16>) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.vlanbuf);
        out.clear();
        match vlan {
            Some(tci) if frame.len() >= 12 => {
                out.extend_from_slice(&frame[..12]);
                out.extend_from_slice(&csum::ETHERTYPE_VLAN.to_be_bytes());
                out.extend_from_slice(&tci.to_be_bytes());
                out.extend_from_slice(&frame[12..]);
            }
            _ => out.extend_from_slice(frame),
        }
        out
    }

    fn count_tx(&mut self, sent: bool, len: usize) {
        if sent {
            self.stats.tx_packets += 1;
            self.stats.tx_bytes += len as u64;
        } else {
            self.stats.tx_dropped += 1;
        }
    }

    /// Put one finished frame on the wire, or on the loopback queue. In C+ mode the
    /// chip pads short frames to the 60-byte minimum (C mode leaves that to the
    /// driver, as 8139too's "the chip doesn't have auto-pad!" says).
    pub(crate) fn emit(&mut self, frame: &[u8], vlan: Option<u16>) {
        if self.cplus && frame.len() < MIN_WIRE_FRAME {
            let mut padded = [0u8; MIN_WIRE_FRAME];
            padded[..frame.len()].copy_from_slice(frame);
            return self.emit_unpadded(&padded, vlan);
        }
        self.emit_unpadded(frame, vlan)
    }

    fn emit_unpadded(&mut self, frame: &[u8], vlan: Option<u16>) {
        if vlan.is_none() && !self.loopback_mode() {
            // The common case: straight from the TX buffer to the sink, no copy.
            let sent = self.sink.send(frame);
            self.count_tx(sent, frame.len());
            return;
        }
        let out = self.with_vlan(frame, vlan);
        if self.loopback_mode() {
            // Delivered by `drain_loopback` after this TX walk returns: never
            // re-entering receive from inside transmit (CVE-2021-3416).
            if self.loopback.len() < LOOPBACK_QUEUE {
                self.loopback.push_back(out.clone());
                self.stats.loopback_packets += 1;
                self.count_tx(true, out.len());
            } else {
                self.count_tx(false, out.len());
            }
        } else {
            let sent = self.sink.send(&out);
            self.count_tx(sent, out.len());
        }
        self.vlanbuf = out;
    }
}

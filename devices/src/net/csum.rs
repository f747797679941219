//! Internet checksums and IPv4/TCP/UDP header parsing for TX offload and RX
//! checksum reporting.
//!
//! Every length here comes from a guest, so the parser validates each one against
//! the real frame length before any slice is taken (the CVE-2015-5165 lesson: QEMU
//! trusted `ip_len` and the TCP data offset and sent stale heap bytes). Any
//! inconsistency yields `None` and the caller skips the offload.

pub const ETH_HLEN: usize = 14;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_VLAN: u16 = 0x8100;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// One's-complement sum of `data` (as big-endian 16-bit words) added to `acc`,
/// unfolded.
pub fn sum16(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        acc += (*last as u64) << 8;
    }
    acc
}

/// Fold a sum to 16 bits.
pub fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xFFFF) + (acc >> 16);
    }
    acc as u16
}

/// The Internet checksum (complement of the folded sum).
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum16(data, 0))
}

/// IPv4 pseudo-header sum for an L4 segment of `l4_len` bytes.
pub fn pseudo_sum(src: [u8; 4], dst: [u8; 4], proto: u8, l4_len: usize) -> u64 {
    sum16(&src, 0) + sum16(&dst, 0) + proto as u64 + l4_len as u64
}

/// A validated view of an untagged Ethernet + IPv4 frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Frame {
    /// IP header length in bytes (20-60).
    pub ihl: usize,
    /// IP total length (header + payload) as the header says, checked <= frame.
    pub ip_len: usize,
    pub proto: u8,
    /// More-fragments set or fragment offset non-zero.
    pub fragment: bool,
}

impl Ipv4Frame {
    /// Offset of the L4 header in the frame.
    pub fn l4_off(&self) -> usize {
        ETH_HLEN + self.ihl
    }
    /// Bytes of L4 header + payload.
    pub fn l4_len(&self) -> usize {
        self.ip_len - self.ihl
    }
    pub fn src(&self, frame: &[u8]) -> [u8; 4] {
        let o = ETH_HLEN + 12;
        [frame[o], frame[o + 1], frame[o + 2], frame[o + 3]]
    }
    pub fn dst(&self, frame: &[u8]) -> [u8; 4] {
        let o = ETH_HLEN + 16;
        [frame[o], frame[o + 1], frame[o + 2], frame[o + 3]]
    }
}

/// Parse an untagged Ethernet/IPv4 frame; `None` on anything inconsistent.
pub fn parse_ipv4(frame: &[u8]) -> Option<Ipv4Frame> {
    if frame.len() < ETH_HLEN + 20 {
        return None;
    }
    if u16::from_be_bytes([frame[12], frame[13]]) != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = &frame[ETH_HLEN..];
    if ip[0] >> 4 != 4 {
        return None;
    }
    let ihl = ((ip[0] & 0x0F) as usize) * 4;
    let ip_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if ihl < 20 || ihl > ip.len() || ip_len < ihl || ip_len > ip.len() {
        return None;
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    Some(Ipv4Frame {
        ihl,
        ip_len,
        proto: ip[9],
        fragment: frag & 0x3FFF != 0,
    })
}

/// TCP header length of the segment at `l4` (validated against `l4_len`).
pub fn tcp_header_len(frame: &[u8], ip: &Ipv4Frame) -> Option<usize> {
    if ip.proto != IPPROTO_TCP || ip.l4_len() < 20 {
        return None;
    }
    let doff = ((frame[ip.l4_off() + 12] >> 4) as usize) * 4;
    (20..=ip.l4_len()).contains(&doff).then_some(doff)
}

/// Recompute the IPv4 header checksum in place.
pub fn fix_ip_checksum(frame: &mut [u8], ip: &Ipv4Frame) {
    let h = ETH_HLEN..ETH_HLEN + ip.ihl;
    frame[ETH_HLEN + 10] = 0;
    frame[ETH_HLEN + 11] = 0;
    let c = checksum(&frame[h]);
    frame[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&c.to_be_bytes());
}

/// Offset of the checksum field within the L4 header.
pub fn l4_csum_field(proto: u8) -> Option<usize> {
    match proto {
        IPPROTO_TCP => Some(16),
        IPPROTO_UDP => Some(6),
        _ => None,
    }
}

/// Compute and store the TCP/UDP checksum over the L4 segment (only `ip_len`
/// bytes; trailing Ethernet padding is excluded). Returns false if `ip` has no
/// supported L4 header or the segment is too short for it.
pub fn fix_l4_checksum(frame: &mut [u8], ip: &Ipv4Frame) -> bool {
    let Some(field) = l4_csum_field(ip.proto) else {
        return false;
    };
    let min = if ip.proto == IPPROTO_TCP { 20 } else { 8 };
    if ip.fragment || ip.l4_len() < min {
        return false;
    }
    let l4 = ip.l4_off()..ETH_HLEN + ip.ip_len;
    let at = ip.l4_off() + field;
    frame[at] = 0;
    frame[at + 1] = 0;
    let acc = pseudo_sum(ip.src(frame), ip.dst(frame), ip.proto, ip.l4_len());
    let mut c = !fold(sum16(&frame[l4], acc));
    if ip.proto == IPPROTO_UDP && c == 0 {
        // UDP sends a computed zero as all-ones (zero means "no checksum").
        c = 0xFFFF;
    }
    frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
    true
}

/// Whether the L4 checksum of a received segment verifies. UDP checksum 0 (not
/// computed by the sender) counts as valid.
pub fn l4_checksum_ok(frame: &[u8], ip: &Ipv4Frame) -> Option<bool> {
    let field = l4_csum_field(ip.proto)?;
    let min = if ip.proto == IPPROTO_TCP { 20 } else { 8 };
    if ip.fragment || ip.l4_len() < min {
        return None;
    }
    let l4 = &frame[ip.l4_off()..ETH_HLEN + ip.ip_len];
    if ip.proto == IPPROTO_UDP && l4[field] == 0 && l4[field + 1] == 0 {
        return Some(true);
    }
    let acc = pseudo_sum(ip.src(frame), ip.dst(frame), ip.proto, ip.l4_len());
    Some(fold(sum16(l4, acc)) == 0xFFFF)
}

/// Whether the IPv4 header checksum verifies.
pub fn ip_checksum_ok(frame: &[u8], ip: &Ipv4Frame) -> bool {
    fold(sum16(&frame[ETH_HLEN..ETH_HLEN + ip.ihl], 0)) == 0xFFFF
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3 example bytes.
        let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum16(&d, 0)), 0xddf2);
        assert_eq!(checksum(&d), !0xddf2);
        // Odd length pads with zero.
        assert_eq!(fold(sum16(&[0x12], 0)), 0x1200);
    }

    #[test]
    fn parse_rejects_inconsistent_headers() {
        let mut f = vec![0u8; 60];
        f[12] = 0x08;
        f[14] = 0x45;
        f[16..18].copy_from_slice(&46u16.to_be_bytes());
        assert!(parse_ipv4(&f).is_some());
        // ip_len < ihl
        f[16..18].copy_from_slice(&10u16.to_be_bytes());
        assert!(parse_ipv4(&f).is_none());
        // ip_len > frame
        f[16..18].copy_from_slice(&47u16.to_be_bytes());
        assert!(parse_ipv4(&f).is_none());
        f[16..18].copy_from_slice(&46u16.to_be_bytes());
        // IHL 4 (16 bytes)
        f[14] = 0x44;
        assert!(parse_ipv4(&f).is_none());
        // IHL 15 (60 bytes) > ip_len
        f[14] = 0x4f;
        assert!(parse_ipv4(&f).is_none());
        f[14] = 0x65;
        assert!(parse_ipv4(&f).is_none());
        assert!(parse_ipv4(&f[..33]).is_none());
    }

    use proptest::prelude::*;

    fn naive(data: &[u8]) -> u16 {
        let mut s: u32 = 0;
        for (i, b) in data.iter().enumerate() {
            s += if i % 2 == 0 {
                (*b as u32) << 8
            } else {
                *b as u32
            };
        }
        while s >> 16 != 0 {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    proptest! {
        /// Any bytes: parsing never panics, and whatever parses yields checksums
        /// that verify by an independent, naive sum.
        #[test]
        fn parse_and_fix_arbitrary(mut f in proptest::collection::vec(any::<u8>(), 0..200),
                                   ihl in 5u8..16, proto in prop_oneof![Just(6u8), Just(17u8), any::<u8>()],
                                   ip_len in 0u16..220) {
            if f.len() >= 34 {
                f[12] = 0x08;
                f[13] = 0x00;
                f[14] = 0x40 | ihl;
                f[16..18].copy_from_slice(&ip_len.to_be_bytes());
                f[20] = 0;
                f[21] = 0;
                f[23] = proto;
            }
            if let Some(ip) = parse_ipv4(&f) {
                prop_assert!(ETH_HLEN + ip.ip_len <= f.len());
                prop_assert!(ip.ihl >= 20 && ip.ihl <= ip.ip_len);
                let _ = tcp_header_len(&f, &ip);
                fix_ip_checksum(&mut f, &ip);
                prop_assert_eq!(naive(&f[ETH_HLEN..ETH_HLEN + ip.ihl]), 0xffff);
                prop_assert!(ip_checksum_ok(&f, &ip));
                if fix_l4_checksum(&mut f, &ip) {
                    let mut ph = Vec::new();
                    ph.extend_from_slice(&f[26..34]);
                    ph.push(0);
                    ph.push(ip.proto);
                    ph.extend_from_slice(&(ip.l4_len() as u16).to_be_bytes());
                    ph.extend_from_slice(&f[ip.l4_off()..ETH_HLEN + ip.ip_len]);
                    prop_assert_eq!(naive(&ph), 0xffff);
                    prop_assert_eq!(l4_checksum_ok(&f, &ip), Some(true));
                }
            }
        }
    }
}

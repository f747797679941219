//! Network devices and their host backend.
//!
//! A NIC model transmits through a [`FrameSink`] (the tap implements it) and is fed
//! received frames by the VMM's I/O thread (`receive`, see [`RxResult`]).

pub mod csum;
pub mod rtl8139;
pub mod tap;

use std::sync::Mutex;

/// Offload a sink may perform for a transmitted frame (virtio-net header semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TxOffload {
    /// Insert an L4 checksum: the 16-bit field at `csum_start + csum_offset` holds the
    /// pseudo-header sum and the sink folds in everything from `csum_start` on.
    pub csum: Option<(u16, u16)>,
    /// TCPv4 segmentation: payload bytes per segment and the length of all headers.
    pub tso4: Option<TsoInfo>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TsoInfo {
    pub mss: u16,
    pub hdr_len: u16,
}

/// Where a NIC's transmitted frames go.
pub trait FrameSink: Send + Sync {
    /// Send one complete Ethernet frame (no FCS). Returns false when the frame was
    /// dropped (backend full or failing); the NIC counts that as a TX drop.
    fn send(&self, frame: &[u8]) -> bool;
    /// Whether [`FrameSink::send_offload`] works (tap opened with a vnet header).
    fn supports_offload(&self) -> bool {
        false
    }
    /// Send a frame whose checksum/segmentation the backend completes. Only called
    /// when `supports_offload()`.
    fn send_offload(&self, frame: &[u8], _offload: &TxOffload) -> bool {
        self.send(frame)
    }
}

/// What happened to a frame handed to a NIC's `receive`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxResult {
    /// Written into guest memory, interrupt raised as configured.
    Accepted,
    /// Dropped by the address filter (RCR/MAR): not for this guest.
    Filtered,
    /// No room in the guest's ring/descriptors. The frame was dropped (and counted
    /// as missed, as the chip does); stop reading the backend until the NIC signals
    /// that the guest freed space.
    RingFull,
    /// Receiver off (CR.RE / C+ RxEnb clear, bus mastering off, clock halted or the
    /// link down): dropped.
    Disabled,
    /// Not a frame the chip could receive (shorter than an Ethernet header or longer
    /// than the chip's maximum): dropped.
    Invalid,
}

/// A [`FrameSink`] that keeps every frame; for tests.
#[derive(Default)]
pub struct RecordingSink {
    pub frames: Mutex<Vec<Vec<u8>>>,
    /// When set, `send` refuses frames (returns false).
    pub refuse: std::sync::atomic::AtomicBool,
}

impl RecordingSink {
    pub fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.frames.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl FrameSink for RecordingSink {
    fn send(&self, frame: &[u8]) -> bool {
        if self.refuse.load(std::sync::atomic::Ordering::SeqCst) {
            return false;
        }
        self.frames
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(frame.to_vec());
        true
    }
}

/// CRC-32 as used by Ethernet's FCS (reflected, poly 0xEDB88320, init and final
/// xor all-ones), i.e. zlib's `crc32`. `crc32fast` uses PCLMULQDQ where present: the
/// chip appends an FCS to every received frame, so this is on the RX hot path.
pub fn crc32_ieee(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

/// Linux's `ether_crc` (big-endian, non-reflected CRC-32, init all-ones, no final
/// xor): the hash the RTL8139 multicast filter and its drivers use.
pub fn ether_crc_be(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        let mut byte = b;
        for _ in 0..8 {
            let bit = ((crc >> 31) ^ (byte as u32)) & 1;
            crc <<= 1;
            byte >>= 1;
            if bit != 0 {
                crc ^= 0x04C1_1DB7;
            }
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_reference_values() {
        assert_eq!(crc32_ieee(b"123456789"), 0xCBF4_3926);
        // ether_crc of the all-hosts group 01:00:5e:00:00:01: Linux puts it in
        // hash bit 31 (>> 26).
        let c = ether_crc_be(&[0x01, 0x00, 0x5e, 0x00, 0x00, 0x01]);
        assert_eq!(c >> 26, 31);
    }
}

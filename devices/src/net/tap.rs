//! A pre-created Linux tap interface opened by name through /dev/net/tun.
//!
//! The VMM never creates taps (that needs privileges it should not hold); the user
//! makes one with `ip tuntap add NAME mode tap [user USER]` and passes its name.
//! Every error names the tap and says what to do.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use thiserror::Error;

use super::{FrameSink, TxOffload};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// TUNSETOFFLOAD flags: what the kernel may hand *us* (RX direction).
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;

/// `struct virtio_net_hdr` (the legacy 10-byte form, the tap default).
pub const VNET_HDR_LEN: usize = 10;
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;

/// Buffer size for [`Tap::read_frame`]: the largest frame a tap can hand over.
pub const MAX_TAP_FRAME: usize = 65536;

#[derive(Debug, Error)]
pub enum TapError {
    #[error("cannot open /dev/net/tun for tap {name}: is the tun module loaded (`modprobe tun`)?")]
    OpenTun {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("tap name {name:?} is empty or longer than 15 bytes")]
    BadName { name: String },
    #[error("tap {name} does not exist: create it first with `ip tuntap add {name} mode tap` (add `user $USER` to use it without root)")]
    Missing {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "tap {name} is busy: another process holds it open; stop that process or pick another tap"
    )]
    Busy {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("no permission to attach tap {name}: run as root, give wbvmm CAP_NET_ADMIN, or create the tap with `ip tuntap add {name} mode tap user $USER`")]
    Permission {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("{name} is not a tap device, or its flags do not match; recreate it with `ip tuntap add {name} mode tap`")]
    NotATap {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("TUNSETIFF on tap {name} failed")]
    SetIff {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("{op} on tap {name} failed")]
    Ioctl {
        name: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("I/O on tap {name} failed")]
    Io {
        name: String,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, Clone, Copy, Default)]
pub struct TapOptions {
    /// Open with IFF_VNET_HDR so frames can carry checksum/segmentation offload
    /// to the host kernel (TX). RX offloads stay off (the NIC cannot take them).
    pub vnet_hdr: bool,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open, non-blocking tap.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    vnet_hdr: bool,
}

impl Tap {
    pub fn open(name: &str, opts: TapOptions) -> Result<Self, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(TapError::BadName {
                name: name.to_string(),
            });
        }
        // TUNSETIFF would *create* a missing tap when we are privileged; we only
        // attach to existing ones, so check first (in our network namespace).
        let cname = std::ffi::CString::new(name).map_err(|_| TapError::BadName {
            name: name.to_string(),
        })?;
        // SAFETY: cname is a valid NUL-terminated string.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            let source = io::Error::last_os_error();
            let name = name.to_string();
            return Err(match source.raw_os_error() {
                Some(libc::ENODEV) => TapError::Missing { name, source },
                // Not an answer about the name (no socket, ...): say what failed.
                _ => TapError::Ioctl {
                    name,
                    op: "if_nametoindex",
                    source,
                },
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| TapError::OpenTun {
                name: name.to_string(),
                source,
            })?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | if opts.vnet_hdr { IFF_VNET_HDR } else { 0 },
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads/writes a struct ifreq, which IfReq lays out
        // (name, flags, padding to the union size); the fd is ours.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if r < 0 {
            let e = io::Error::last_os_error();
            let name = name.to_string();
            return Err(match e.raw_os_error() {
                Some(libc::EBUSY) => TapError::Busy { name, source: e },
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission { name, source: e },
                Some(libc::EINVAL) => TapError::NotATap { name, source: e },
                _ => TapError::SetIff { name, source: e },
            });
        }
        let tap = Self {
            file,
            name: name.to_string(),
            vnet_hdr: opts.vnet_hdr,
        };
        if opts.vnet_hdr {
            tap.set_vnet_hdr_size(VNET_HDR_LEN as i32)?;
            tap.set_offload(0)?;
        }
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    /// TUNSETOFFLOAD: which offloaded frames the kernel may give us.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes an unsigned long by value.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD as _,
                flags as libc::c_ulong,
            )
        };
        if r < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                op: "TUNSETOFFLOAD",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// TUNSETVNETHDRSZ.
    pub fn set_vnet_hdr_size(&self, size: i32) -> Result<(), TapError> {
        // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETVNETHDRSZ as _, &size) };
        if r < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                op: "TUNSETVNETHDRSZ",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Read one frame into `buf` (the vnet header, if any, is stripped). `Ok(None)`
    /// when nothing is queued. `buf` should hold [`MAX_TAP_FRAME`] bytes (a longer
    /// frame is truncated by the kernel).
    pub fn read_frame(&self, buf: &mut [u8]) -> Result<Option<usize>, TapError> {
        let mut hdr = [0u8; VNET_HDR_LEN];
        // The vnet header (if any) lands in its own buffer: no memmove of the frame.
        let iov = [
            libc::iovec {
                iov_base: hdr.as_mut_ptr().cast(),
                iov_len: hdr.len(),
            },
            libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            },
        ];
        let (ptr, cnt) = if self.vnet_hdr {
            (iov.as_ptr(), 2)
        } else {
            (iov[1..].as_ptr(), 1)
        };
        // SAFETY: the iovecs point at live, writable buffers for the call.
        let n = unsafe { libc::readv(self.file.as_raw_fd(), ptr, cnt) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(TapError::Io {
                name: self.name.clone(),
                source: e,
            });
        }
        let n = n as usize;
        if self.vnet_hdr {
            return Ok(Some(n.saturating_sub(VNET_HDR_LEN)));
        }
        Ok(Some(n))
    }

    fn writev(&self, hdr: &[u8], frame: &[u8]) -> Result<bool, TapError> {
        let iov = [
            libc::iovec {
                iov_base: hdr.as_ptr() as *mut _,
                iov_len: hdr.len(),
            },
            libc::iovec {
                iov_base: frame.as_ptr() as *mut _,
                iov_len: frame.len(),
            },
        ];
        let (ptr, cnt) = if hdr.is_empty() {
            (iov[1..].as_ptr(), 1)
        } else {
            (iov.as_ptr(), 2)
        };
        // SAFETY: the iovecs point at live slices for the duration of the call.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), ptr, cnt) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(false);
            }
            return Err(TapError::Io {
                name: self.name.clone(),
                source: e,
            });
        }
        Ok(true)
    }

    /// Write one frame. `Ok(false)` when the tap queue is full (frame dropped).
    pub fn write_frame(&self, frame: &[u8]) -> Result<bool, TapError> {
        if self.vnet_hdr {
            self.writev(&[0u8; VNET_HDR_LEN], frame)
        } else {
            self.writev(&[], frame)
        }
    }

    /// Write a frame with checksum / TSO left to the host (needs `vnet_hdr`).
    pub fn write_frame_offload(&self, frame: &[u8], off: &TxOffload) -> Result<bool, TapError> {
        if !self.vnet_hdr {
            return self.write_frame(frame);
        }
        let mut h = [0u8; VNET_HDR_LEN];
        if let Some((start, offset)) = off.csum {
            h[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
            h[6..8].copy_from_slice(&start.to_le_bytes());
            h[8..10].copy_from_slice(&offset.to_le_bytes());
        }
        match off.tso4 {
            Some(t) => {
                h[1] = VIRTIO_NET_HDR_GSO_TCPV4;
                h[2..4].copy_from_slice(&t.hdr_len.to_le_bytes());
                h[4..6].copy_from_slice(&t.mss.to_le_bytes());
            }
            None => h[1] = VIRTIO_NET_HDR_GSO_NONE,
        }
        self.writev(&h, frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl FrameSink for Tap {
    fn send(&self, frame: &[u8]) -> bool {
        match self.write_frame(frame) {
            Ok(sent) => sent,
            Err(e) => {
                log::debug!("{e}");
                false
            }
        }
    }
    fn supports_offload(&self) -> bool {
        self.vnet_hdr
    }
    fn send_offload(&self, frame: &[u8], offload: &TxOffload) -> bool {
        match self.write_frame_offload(frame, offload) {
            Ok(sent) => sent,
            Err(e) => {
                log::debug!("{e}");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests;

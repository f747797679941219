//! The RTL8139 and its tap, wired into the VM: PCI placement, INTx as a level
//! interrupt (irqfd with resample), and the RX path run by the `wbvmm-io` thread.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::irq::LevelIrq;
use kvm_ioctls::VmFd;
use serde::Serialize;
use thiserror::Error;
use wbvmm_devices::net::rtl8139::regs::{CPCMD, CR, CR_RST};
use wbvmm_devices::net::rtl8139::{
    Rtl8139, Rtl8139Config, Rtl8139Error, Rtl8139Mode, REVISION_C, REVISION_CPLUS,
};
use wbvmm_devices::net::tap::{Tap, TapError, TapOptions};
use wbvmm_devices::pci::{BarSpec, PciDevice, PciError, PciIds, PciPlacement, PciRoot};
use wbvmm_devices::{Bus, BusDevice, GuestDma};

mod doorbell;
mod posted;
mod shadow;
mod unmask;
pub use doorbell::{Datamatch, Doorbell, LearntIoEvents, TsdDoorbells, TSD_SLOTS};
pub use posted::{in_posted_zone, CoalescedZones, PostedWrites, ZoneStart};
pub use shadow::{RegisterAccess, RegisterShadow, ShadowPolicy};
pub use unmask::UnmaskDoorbell;

/// Where the NIC sits: 00:03.0 (as under QEMU), INTA routed to IOAPIC pin 16 (pins
/// 16-23 are the IOAPIC-only ones in KVM's default routing), BARs where a BIOS would
/// have put them (Linux keeps firmware assignments).
pub const NIC_PCI_DEVICE: u8 = 3;
pub const NIC_GSI: u32 = 16;
pub const NIC_IO_BAR: u64 = 0xc000;
pub const NIC_MMIO_BAR: u64 = 0xfebf_f000;

#[derive(Debug, Error)]
pub enum NetError {
    #[error("'{0}' is not a --net spec: use tap=NAME[,mac=52:54:00:12:34:56][,rev=0x20|0x10][,tx=ioeventfd|exit][,poll-us=0..1000][,tx-snoop=on|off][,shadow=auto|on|off][,posted=on|off][,unmask=on|off] (shadow=on needs tx=ioeventfd)")]
    BadSpec(String),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("cannot create the RTL8139")]
    Nic(#[from] Rtl8139Error),
    #[error("cannot place the RTL8139 on PCI")]
    Pci(#[from] PciError),
    #[error("cannot wire the NIC's interrupt")]
    Irq(#[source] std::io::Error),
    #[error("cannot wire the NIC's interrupt line")]
    Line(#[source] crate::irq::IrqError),
}

/// How the C+ TX doorbell (a TxPoll write) reaches the NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxDoorbell {
    /// A KVM ioeventfd: the write completes inside KVM (~3.7 us here instead of a
    /// ~30 us exit) and the I/O thread runs the TX ring.
    IoEventFd,
    /// An ordinary exit: the vCPU thread runs the TX ring inside the write.
    Exit,
}

/// The I/O thread's default busy-poll window after NIC activity, in microseconds
/// (see `io_thread::BusyPoll` and the README's "Levers" for the measurement).
pub const DEFAULT_POLL_US: u32 = 50;
/// The longest window `poll-us=` accepts.
pub const MAX_POLL_US: u32 = 1000;

/// Whether the busy-polling I/O thread sends C+ frames it finds in the TX ring
/// before their TxPoll doorbell arrives (see `Rtl8139::snoop_tx` and the README's
/// "Levers" for the measurement).
pub const DEFAULT_TX_SNOOP: bool = true;

/// Whether the NIC's acks, masks and CAPR updates (through either BAR) are posted
/// through KVM's coalesced ring (see `net/posted.rs` and the README's "Levers").
pub const DEFAULT_POSTED: bool = true;

/// Whether the IntrMask unmask beside the register shadow completes in KVM (see
/// `net/unmask.rs` and the README's "Levers").
pub const DEFAULT_UNMASK: bool = true;

/// `--net tap=NAME[,mac=MAC][,rev=0x10|0x20][,tx=ioeventfd|exit][,poll-us=N][,tx-snoop=on|off][,shadow=..][,posted=on|off][,unmask=on|off]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: String,
    pub mac: [u8; 6],
    pub revision: u8,
    pub tx: TxDoorbell,
    /// The I/O thread's longest busy-poll window after NIC activity (0: off).
    pub poll_us: u32,
    /// While busy-polling, also look at the C+ TX ring for frames (no cost when
    /// polling is off or the NIC is in C mode).
    pub tx_snoop: bool,
    /// When guest reads of the MMIO BAR come from a read-only shadow page (no exit).
    pub shadow: ShadowPolicy,
    /// Post writes to CAPR, IntrMask and IntrStatus (where KVM has a coalesced
    /// ring, and never beside a mapped shadow).
    pub posted: bool,
    /// Beside the mapped shadow, let KVM complete the driver's IntrMask unmask.
    pub unmask: bool,
}

impl FromStr for NetConfig {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Self, NetError> {
        let bad = || NetError::BadSpec(s.to_string());
        let mut cfg = NetConfig {
            tap: String::new(),
            mac: Rtl8139Config::default().mac,
            revision: REVISION_CPLUS,
            tx: TxDoorbell::IoEventFd,
            poll_us: DEFAULT_POLL_US,
            tx_snoop: DEFAULT_TX_SNOOP,
            shadow: ShadowPolicy::Auto,
            posted: DEFAULT_POSTED,
            unmask: DEFAULT_UNMASK,
        };
        for part in s.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(bad)?;
            match k {
                "tap" if !v.is_empty() => cfg.tap = v.to_string(),
                "mac" => {
                    let bytes: Vec<u8> = v
                        .split(':')
                        .map(|b| u8::from_str_radix(b, 16))
                        .collect::<Result<_, _>>()
                        .map_err(|_| bad())?;
                    cfg.mac = bytes.try_into().map_err(|_| bad())?;
                    // A multicast source address would be filtered by every peer.
                    if cfg.mac[0] & 1 != 0 {
                        return Err(bad());
                    }
                }
                "tx" => {
                    cfg.tx = match v {
                        "ioeventfd" => TxDoorbell::IoEventFd,
                        "exit" => TxDoorbell::Exit,
                        _ => return Err(bad()),
                    }
                }
                "poll-us" => {
                    cfg.poll_us = v.parse().map_err(|_| bad())?;
                    if cfg.poll_us > MAX_POLL_US {
                        return Err(bad());
                    }
                }
                "shadow" => {
                    cfg.shadow = match v {
                        "auto" => ShadowPolicy::Auto,
                        "on" => ShadowPolicy::Always,
                        "off" => ShadowPolicy::Off,
                        _ => return Err(bad()),
                    }
                }
                "tx-snoop" => cfg.tx_snoop = on_off(v).ok_or_else(bad)?,
                "posted" => cfg.posted = on_off(v).ok_or_else(bad)?,
                "unmask" => cfg.unmask = on_off(v).ok_or_else(bad)?,
                "rev" => {
                    cfg.revision = match v {
                        "0x20" | "32" => REVISION_CPLUS,
                        "0x10" | "16" => REVISION_C,
                        _ => return Err(bad()),
                    }
                }
                _ => return Err(bad()),
            }
        }
        // The shadow follows the BAR through the doorbell frontend's hook, which
        // `tx=exit` does without: `on` is refused there, `auto` means off.
        if cfg.tap.is_empty()
            || (cfg.shadow == ShadowPolicy::Always && cfg.tx != TxDoorbell::IoEventFd)
        {
            return Err(bad());
        }
        if cfg.tx != TxDoorbell::IoEventFd {
            cfg.shadow = ShadowPolicy::Off;
        }
        Ok(cfg)
    }
}

fn on_off(v: &str) -> Option<bool> {
    match v {
        "on" => Some(true),
        "off" => Some(false),
        _ => None,
    }
}

/// Counters of the I/O thread's RX path.
#[derive(Debug, Default)]
pub struct IoCounters {
    pub tap_rx_frames: AtomicU64,
    pub tap_rx_bytes: AtomicU64,
    /// Times the guest ring was full and the tap was left unread.
    pub rx_backpressure: AtomicU64,
    pub tap_errors: AtomicU64,
    /// Busy-poll windows that found work, and that ended empty.
    pub polls_found: AtomicU64,
    pub polls_empty: AtomicU64,
    /// C+ TX ring walks the busy-poll started (frames found before their TxPoll).
    pub tx_snooped: AtomicU64,
}

/// What the buses and the PCI root see: the NIC, with the C-mode doorbell learner
/// in front of its registers.
pub struct NicFrontend {
    pub nic: Arc<Rtl8139>,
    pub tsd: TsdDoorbells,
    /// The TxPoll ioeventfd, moved with the BARs the moment they move (weak: the
    /// doorbell holds the PCI root, which holds this frontend).
    pub doorbell: std::sync::OnceLock<std::sync::Weak<Doorbell>>,
    /// The register shadow's memslot, moved with the MMIO BAR.
    pub shadow: Option<Arc<RegisterShadow>>,
    /// The posted-write zones, moved with the BARs and kept off beside the shadow.
    pub posted: PostedWrites,
    /// The learnt IntrMask unmask, only beside the shadow (`unmask=on`).
    pub unmask: Option<UnmaskDoorbell>,
}

impl BusDevice for NicFrontend {
    fn read(&self, base: u64, offset: u64, data: &mut [u8]) {
        self.note_bar(base, RegisterAccess::Read);
        if let Some(u) = &self.unmask {
            u.observe(&self.nic, base, offset, None);
        }
        self.tsd.observe(&self.nic, base, offset, None);
        self.nic.read(base, offset, data);
    }
    fn write(&self, base: u64, offset: u64, data: &[u8]) {
        let posted = in_posted_zone(offset, data.len());
        self.note_bar(
            base,
            if posted {
                RegisterAccess::PostedWrite
            } else {
                RegisterAccess::OtherWrite
            },
        );
        if let Some(u) = &self.unmask {
            u.observe(&self.nic, base, offset, Some(data));
        }
        // Posted or not, these writes never wait for older doorbells (net/posted.rs
        // says why that is the order the guest asked for).
        if !posted {
            self.tsd.observe(&self.nic, base, offset, Some(data));
        }
        // Only CPlusCmd (the switch to C+) and ChipCmd (a reset, back to C) change
        // the mode: the rest pay no mode check.
        let end = offset + data.len() as u64;
        let may_switch = self.shadow.as_ref().is_some_and(|s| {
            s.policy() == ShadowPolicy::Auto
                && [CPCMD as u64, CR as u64]
                    .iter()
                    .any(|r| (offset..end).contains(r))
        });
        let before = may_switch.then(|| self.nic.mode());
        self.nic.write(base, offset, data);
        if let (Some(before), Some(shadow)) = (before, &self.shadow) {
            let now = self.nic.mode();
            let left_mmio = writes_chip_reset(offset, data) && shadow.reset_through(base);
            if now != before || left_mmio {
                if now == Rtl8139Mode::CPlus {
                    // Nothing absorbed may be pending once the page can be read.
                    self.tsd.disarm_all(&self.nic);
                }
                shadow.follow_bar();
                self.posted.follow();
            }
        }
    }
    fn name(&self) -> &'static str {
        self.nic.name()
    }
}

/// Whether a register write of `data` at `offset` sets ChipCmd's reset bit.
pub(crate) fn writes_chip_reset(offset: u64, data: &[u8]) -> bool {
    let end = offset + data.len() as u64;
    (offset..end).contains(&(CR as u64)) && data[(CR as u64 - offset) as usize] & CR_RST != 0
}

impl NicFrontend {
    /// `shadow=auto`: a C-mode driver that reads enough registers through the MMIO
    /// BAR takes the shadow, as the switch to C+ does (net/shadow.rs): before the
    /// access is served, nothing KVM absorbed is left pending and no write is posted
    /// any more.
    fn note_bar(&self, base: u64, access: RegisterAccess) {
        if let Some(shadow) = &self.shadow {
            if shadow.turns_to_mmio(base, access, &self.nic) {
                self.tsd.disarm_all(&self.nic);
                shadow.follow_bar();
                self.posted.follow();
            }
        }
    }
}

impl PciDevice for NicFrontend {
    fn ids(&self) -> PciIds {
        self.nic.ids()
    }
    fn bars(&self) -> Vec<BarSpec> {
        self.nic.bars()
    }
    fn interrupt_pin(&self) -> u8 {
        self.nic.interrupt_pin()
    }
    fn command_written(&self, command: u16) {
        self.nic.command_written(command)
    }
    fn config_read_ext(&self, offset: u8) -> u32 {
        self.nic.config_read_ext(offset)
    }
    fn config_write_ext(&self, offset: u8, data: &[u8]) {
        self.nic.config_write_ext(offset, data)
    }
    fn bars_moved(&self) {
        if let Some(d) = self.doorbell.get().and_then(std::sync::Weak::upgrade) {
            d.follow_bars();
        }
        if let Some(s) = &self.shadow {
            s.follow_bar();
        }
        self.posted.follow();
    }
}

/// The NIC as the VMM holds it.
pub struct NetDevice {
    pub nic: Arc<Rtl8139>,
    pub tap: Arc<Tap>,
    pub irq: Arc<LevelIrq>,
    pub io: Arc<IoCounters>,
    pub doorbell: Option<Arc<Doorbell>>,
    /// The NIC behind its C-mode TSD doorbell learner (what the buses hold).
    pub frontend: Option<Arc<NicFrontend>>,
    /// The NIC's DMA path through the memslot mirror (for its lookup statistics).
    pub dma: Arc<crate::memory::GuestRamDma>,
    /// The I/O thread's longest busy-poll window after NIC activity.
    pub poll_window: std::time::Duration,
    /// Look at the C+ TX ring while busy-polling (`tx-snoop=`).
    pub tx_snoop: bool,
    /// `posted=on`: [`NetDevice::enable_posted`] may register the zones.
    pub posted: bool,
}

impl NetDevice {
    /// Open the tap, build the NIC and place it on the PCI root.
    pub fn create(
        vm: &Arc<VmFd>,
        root: &Arc<PciRoot>,
        buses: (&Arc<Bus>, &Arc<Bus>),
        dma: Arc<crate::memory::GuestRamDma>,
        cfg: &NetConfig,
    ) -> Result<Self, NetError> {
        let tap = Arc::new(Tap::open(&cfg.tap, TapOptions { vnet_hdr: true })?);
        let irq = Arc::new(LevelIrq::new(vm, NIC_GSI).map_err(NetError::Line)?);
        let nic = Arc::new(Rtl8139::new(
            Rtl8139Config {
                mac: cfg.mac,
                revision: cfg.revision,
            },
            dma.clone() as Arc<dyn GuestDma>,
            irq.clone(),
            tap.clone(),
        )?);
        let placement = PciPlacement {
            device: Some(NIC_PCI_DEVICE),
            irq: NIC_GSI as u8,
            bar_addresses: vec![NIC_IO_BAR, NIC_MMIO_BAR],
        };
        // The doorbells learn each BAR's address space from the BAR types the model
        // declares; the learner holds the root weakly (the root holds the frontend).
        let bars = (NIC_PCI_DEVICE, nic.bars());
        let frontend = match cfg.tx {
            TxDoorbell::IoEventFd => {
                let tsd = TsdDoorbells::new(
                    vm.clone(),
                    Arc::downgrade(root),
                    bars.clone(),
                    buses.0.clone(),
                    buses.1.clone(),
                )?;
                let shadow = (cfg.shadow != ShadowPolicy::Off).then(|| {
                    Arc::new(RegisterShadow::new(
                        &nic,
                        dma.registry().clone(),
                        Arc::downgrade(root),
                        NIC_PCI_DEVICE,
                        cfg.shadow,
                    ))
                });
                let tsd = tsd.beside(shadow.as_deref());
                let posted = PostedWrites::new(
                    vm.clone(),
                    Arc::downgrade(root),
                    bars.clone(),
                    &nic,
                    shadow.as_deref(),
                );
                let unmask = match (&shadow, cfg.unmask) {
                    (Some(s), true) => Some(UnmaskDoorbell::new(
                        vm.clone(),
                        Arc::downgrade(root),
                        bars.clone(),
                        (buses.0.clone(), buses.1.clone()),
                        s.present(),
                    )?),
                    _ => None,
                };
                let f = Arc::new(NicFrontend {
                    nic: nic.clone(),
                    tsd,
                    doorbell: std::sync::OnceLock::new(),
                    shadow,
                    posted,
                    unmask,
                });
                root.add_device(f.clone(), placement)?;
                if let Some(s) = &f.shadow {
                    s.follow_bar();
                }
                Some(f)
            }
            TxDoorbell::Exit => {
                root.add_device(nic.clone(), placement)?;
                None
            }
        };
        let doorbell = match cfg.tx {
            TxDoorbell::IoEventFd => Some(Arc::new(Doorbell::new(
                vm.clone(),
                root.clone(),
                bars,
                buses.0.clone(),
                buses.1.clone(),
            )?)),
            TxDoorbell::Exit => None,
        };
        if let (Some(f), Some(d)) = (&frontend, &doorbell) {
            let _ = f.doorbell.set(Arc::downgrade(d));
        }
        Ok(Self {
            frontend,
            nic,
            tap,
            irq,
            io: Arc::new(IoCounters::default()),
            doorbell,
            dma,
            poll_window: std::time::Duration::from_micros(cfg.poll_us.into()),
            tx_snoop: cfg.tx_snoop,
            posted: cfg.posted,
        })
    }

    /// KVM's coalesced ring now has consumers (every exit, the I/O thread): post
    /// the NIC's acks, masks and CAPR updates through it, if `posted=on`.
    pub fn enable_posted(&self) {
        if let (true, Some(f)) = (self.posted, &self.frontend) {
            f.posted.enable();
        }
    }

    /// The posted-write zones, if there is a frontend to hold them.
    pub fn posted_writes(&self) -> Option<&PostedWrites> {
        self.frontend.as_ref().map(|f| &f.posted)
    }

    pub fn stats(&self) -> NetStats {
        let s = self.nic.stats();
        NetStats {
            tap: self.tap.name().to_string(),
            rx_packets: s.rx_packets,
            rx_bytes: s.rx_bytes,
            rx_filtered: s.rx_filtered,
            rx_ring_full: s.rx_ring_full,
            rx_disabled: s.rx_disabled,
            tx_packets: s.tx_packets,
            tx_bytes: s.tx_bytes,
            tx_dropped: s.tx_dropped,
            tap_rx_frames: self.io.tap_rx_frames.load(Ordering::Relaxed),
            rx_backpressure: self.io.rx_backpressure.load(Ordering::Relaxed),
            tap_errors: self.io.tap_errors.load(Ordering::Relaxed),
            polls_found: self.io.polls_found.load(Ordering::Relaxed),
            polls_empty: self.io.polls_empty.load(Ordering::Relaxed),
            tx_snooped: self.io.tx_snooped.load(Ordering::Relaxed),
            posted: self.posted_writes().is_some_and(PostedWrites::active),
            unmasks_absorbed: self
                .frontend
                .as_ref()
                .and_then(|f| f.unmask.as_ref())
                .map_or(0, |u| u.absorbed.load(Ordering::Relaxed)),
        }
    }
}

/// The NIC's and the tap's counters. Also the `--stats` schema's `net`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct NetStats {
    pub tap: String,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_filtered: u64,
    pub rx_ring_full: u64,
    pub rx_disabled: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
    pub tap_rx_frames: u64,
    pub rx_backpressure: u64,
    pub tap_errors: u64,
    /// The I/O thread's busy-poll windows that found work / ended empty.
    pub polls_found: u64,
    pub polls_empty: u64,
    /// C+ TX ring walks the busy-poll started before the guest's TxPoll arrived
    /// (`tx-snoop=on`).
    pub tx_snooped: u64,
    /// Whether a posted-write zone is registered now (`posted=on`).
    pub posted: bool,
    /// IntrMask unmasks KVM completed beside the register shadow (`unmask=on`).
    pub unmasks_absorbed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_specs() {
        let c: NetConfig = "tap=wb0".parse().unwrap();
        assert_eq!((c.tap.as_str(), c.revision), ("wb0", REVISION_CPLUS));
        let c: NetConfig = "tap=wb1,mac=02:00:00:aa:bb:cc,rev=0x10".parse().unwrap();
        assert_eq!(c.mac, [2, 0, 0, 0xaa, 0xbb, 0xcc]);
        assert_eq!(c.revision, REVISION_C);
        assert_eq!(c.tx, TxDoorbell::IoEventFd);
        assert_eq!(c.poll_us, DEFAULT_POLL_US);
        assert_eq!(c.shadow, ShadowPolicy::Auto);
        for (spec, policy) in [
            ("tap=a,shadow=on", ShadowPolicy::Always),
            ("tap=a,shadow=off", ShadowPolicy::Off),
            ("tap=a,shadow=auto", ShadowPolicy::Auto),
            // Without the frontend there is no shadow: auto means off.
            ("tap=a,tx=exit", ShadowPolicy::Off),
        ] {
            assert_eq!(spec.parse::<NetConfig>().unwrap().shadow, policy, "{spec}");
        }
        assert_eq!(c.tx_snoop, DEFAULT_TX_SNOOP);
        assert!(!"tap=a,tx-snoop=off".parse::<NetConfig>().unwrap().tx_snoop);
        assert!("tap=a,tx-snoop=on".parse::<NetConfig>().unwrap().tx_snoop);
        assert_eq!(c.posted, DEFAULT_POSTED);
        assert!(!"tap=a,posted=off".parse::<NetConfig>().unwrap().posted);
        assert_eq!("tap=a,poll-us=0".parse::<NetConfig>().unwrap().poll_us, 0);
        assert_eq!(
            "tap=a,tx=exit".parse::<NetConfig>().unwrap().tx,
            TxDoorbell::Exit
        );
        for bad in [
            "",
            "tap=",
            "wb0",
            "tap=a,mac=01:00:00:00:00:01",
            "tap=a,mac=zz",
            "tap=a,rev=0x30",
            "tap=a,x=1",
            "tap=a,poll-us=-1",
            "tap=a,poll-us=1001",
            "tap=a,shadow=yes",
            "tap=a,tx-snoop=1",
            "tap=a,tx-snoop=",
            "tap=a,posted=yes",
            "tap=a,shadow=on,tx=exit",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad}");
        }
    }
}

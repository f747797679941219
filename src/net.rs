//! The RTL8139 and its tap, wired into the VM: PCI placement, INTx as a level
//! interrupt (irqfd with resample), and the RX path run by the `wbvmm-io` thread.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, VmFd};
use serde::Serialize;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;
use wbvmm_devices::net::rtl8139::{
    Rtl8139, Rtl8139Config, Rtl8139Error, REVISION_C, REVISION_CPLUS,
};
use wbvmm_devices::net::tap::{Tap, TapError, TapOptions};
use wbvmm_devices::net::RxResult;
use wbvmm_devices::pci::{BarSpec, PciDevice, PciError, PciIds, PciPlacement, PciRoot};
use wbvmm_devices::{Bus, BusDevice, GuestDma, IrqLine};

/// Where the NIC sits: 00:03.0 (as under QEMU), INTA routed to IOAPIC pin 16 (pins
/// 16-23 are the IOAPIC-only ones in KVM's default routing), BARs where a BIOS would
/// have put them (Linux keeps firmware assignments).
pub const NIC_PCI_DEVICE: u8 = 3;
pub const NIC_GSI: u32 = 16;
pub const NIC_IO_BAR: u64 = 0xc000;
pub const NIC_MMIO_BAR: u64 = 0xfebf_f000;

#[derive(Debug, Error)]
pub enum NetError {
    #[error("'{0}' is not a --net spec: use tap=NAME[,mac=52:54:00:12:34:56][,rev=0x20|0x10][,tx=ioeventfd|exit]")]
    BadSpec(String),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("cannot create the RTL8139")]
    Nic(#[from] Rtl8139Error),
    #[error("cannot place the RTL8139 on PCI")]
    Pci(#[from] PciError),
    #[error("cannot wire the NIC's interrupt")]
    Irq(#[source] std::io::Error),
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

/// `--net tap=NAME[,mac=MAC][,rev=0x10|0x20][,tx=ioeventfd|exit]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: String,
    pub mac: [u8; 6],
    pub revision: u8,
    pub tx: TxDoorbell,
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
        if cfg.tap.is_empty() {
            return Err(bad());
        }
        Ok(cfg)
    }
}

/// A level-triggered interrupt line through a KVM irqfd with resample: KVM lowers
/// the line when the guest EOIs it and signals `resample`; if the device still
/// asserts, the I/O thread raises it again.
pub struct LevelIrq {
    trigger: EventFd,
    pub resample: EventFd,
    asserted: AtomicBool,
    /// Times the line was raised (including re-raises after an EOI).
    pub raised: AtomicU64,
}

impl LevelIrq {
    pub fn new(vm: &VmFd, gsi: u32) -> Result<Self, NetError> {
        let trigger = EventFd::new(libc::EFD_NONBLOCK).map_err(NetError::Irq)?;
        let resample = EventFd::new(libc::EFD_NONBLOCK).map_err(NetError::Irq)?;
        vm.register_irqfd_with_resample(&trigger, &resample, gsi)
            .map_err(|e| NetError::Irq(std::io::Error::from_raw_os_error(e.errno())))?;
        Ok(Self {
            trigger,
            resample,
            asserted: AtomicBool::new(false),
            raised: AtomicU64::new(0),
        })
    }

    /// The guest EOI'd the interrupt: raise it again while the device asserts it.
    pub fn on_resample(&self) {
        let _ = self.resample.read();
        if self.asserted.load(Ordering::Acquire) {
            self.trigger();
        }
    }
}

impl IrqLine for LevelIrq {
    fn trigger(&self) {
        self.raised.fetch_add(1, Ordering::Relaxed);
        let _ = self.trigger.write(1);
    }
    fn set_level(&self, asserted: bool) {
        let was = self.asserted.swap(asserted, Ordering::AcqRel);
        if asserted && !was {
            self.trigger();
        }
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
}

/// The TxPoll doorbell as an ioeventfd on both BARs, following BAR moves.
pub struct Doorbell {
    pub evt: EventFd,
    vm: Arc<VmFd>,
    pci: Arc<PciRoot>,
    /// (PIO port, MMIO address) currently registered.
    at: std::sync::Mutex<(Option<u64>, Option<u64>)>,
    /// The bus generations `at` was computed for.
    seen: AtomicU64,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
}

/// TxPoll's offset in both BARs.
const TXPOLL_OFFSET: u64 = 0xd9;
/// The value 8139cp and the test guest write to TxPoll: "normal-priority queue".
const TXPOLL_NPQ: u8 = 0x40;

impl Doorbell {
    fn new(
        vm: Arc<VmFd>,
        pci: Arc<PciRoot>,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
    ) -> Result<Self, NetError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(NetError::Irq)?;
        let d = Self {
            evt,
            vm,
            pci,
            at: std::sync::Mutex::new((None, None)),
            seen: AtomicU64::new(u64::MAX),
            pio,
            mmio,
        };
        d.follow_bars();
        Ok(d)
    }

    /// Re-register where the BARs are now, if any bus changed since last time.
    /// Called when a config write moves the NIC's BARs (so the first TxPoll at the
    /// new address already completes in KVM) and after each doorbell event.
    pub fn follow_bars(&self) {
        let gen = self
            .pio
            .generation()
            .wrapping_add(self.mmio.generation() << 32);
        if self.seen.swap(gen, Ordering::AcqRel) == gen {
            return;
        }
        let mapped = |bar: u8| {
            self.pci
                .bar_mapping(NIC_PCI_DEVICE, bar)
                .and_then(|(_, at)| at)
        };
        let want = (
            mapped(0).map(|b| b + TXPOLL_OFFSET),
            mapped(1).map(|b| b + TXPOLL_OFFSET),
        );
        let mut at = self.at.lock().unwrap_or_else(|e| e.into_inner());
        if *at == want {
            return;
        }
        let (old_pio, old_mmio) = *at;
        if let Some(p) = old_pio {
            let _ = self
                .vm
                .unregister_ioevent(&self.evt, &IoEventAddress::Pio(p), TXPOLL_NPQ);
        }
        if let Some(m) = old_mmio {
            let _ = self
                .vm
                .unregister_ioevent(&self.evt, &IoEventAddress::Mmio(m), TXPOLL_NPQ);
        }
        let reg = |a: &IoEventAddress| match self.vm.register_ioevent(&self.evt, a, TXPOLL_NPQ) {
            Ok(()) => true,
            Err(e) => {
                log::warn!(
                    "TX doorbell ioeventfd at {a:?} refused ({e}); TxPoll writes there will exit"
                );
                false
            }
        };
        let new_pio = want.0.filter(|&p| reg(&IoEventAddress::Pio(p)));
        let new_mmio = want.1.filter(|&m| reg(&IoEventAddress::Mmio(m)));
        *at = (new_pio, new_mmio);
    }
}

/// Frame-length doorbells for C mode. A TSD write carries the frame's length, so a
/// plain ioeventfd would lose it; but a guest sending same-sized frames (a
/// request/response test, a bulk transfer) writes the same value again and again.
/// After `LEARN_AFTER` identical writes to TSDn, an ioeventfd with that exact value as
/// its datamatch takes over: those writes complete inside KVM and are replayed here
/// with the value they must have had. Any other value still exits. Before the NIC
/// serves any register access, pending doorbells are replayed, so the guest never
/// sees TSD/TSR status older than its own writes.
pub struct TsdDoorbells {
    vm: Arc<VmFd>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    pub evts: [EventFd; 4],
    state: std::sync::Mutex<TsdLearnState>,
}

const LEARN_AFTER: u32 = 4;
const TSD0: u64 = 0x10;

#[derive(Default)]
struct TsdLearnState {
    /// Per TSDn: the last value written and how many times in a row.
    last: [(u32, u32); 4],
    /// Per TSDn: the registered (address, is_pio, value).
    armed: [Option<(u64, bool, u32)>; 4],
    /// Bus generations when arming: a BAR move disarms everything.
    gens: (u64, u64),
}

impl TsdDoorbells {
    fn new(vm: Arc<VmFd>, pio: Arc<Bus>, mmio: Arc<Bus>) -> Result<Self, NetError> {
        let e = || EventFd::new(libc::EFD_NONBLOCK).map_err(NetError::Irq);
        Ok(Self {
            vm,
            pio,
            mmio,
            evts: [e()?, e()?, e()?, e()?],
            state: Default::default(),
        })
    }

    /// Stop absorbing writes to TSDn; writes absorbed before are replayed first
    /// (unregister, then drain: nothing new can arrive in between).
    fn disarm(&self, st: &mut TsdLearnState, n: usize, nic: &Rtl8139) {
        if let Some((addr, pio, v)) = st.armed[n].take() {
            let a = if pio {
                IoEventAddress::Pio(addr)
            } else {
                IoEventAddress::Mmio(addr)
            };
            let _ = self.vm.unregister_ioevent(&self.evts[n], &a, v);
            if let Ok(count) = self.evts[n].read() {
                for _ in 0..count {
                    nic.write(
                        addr - (TSD0 + 4 * n as u64),
                        TSD0 + 4 * n as u64,
                        &v.to_le_bytes(),
                    );
                }
            }
        }
    }

    /// Replay writes KVM absorbed, then return. Serialised with `observe`, so a
    /// register access never overtakes a replay.
    pub fn replay(&self, nic: &Rtl8139) {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.replay_locked(&st, nic);
    }

    fn replay_locked(&self, st: &TsdLearnState, nic: &Rtl8139) {
        for n in 0..4 {
            let Some((addr, _, v)) = st.armed[n] else {
                continue;
            };
            if let Ok(count) = self.evts[n].read() {
                let base = addr - (TSD0 + 4 * n as u64);
                for _ in 0..count {
                    nic.write(base, TSD0 + 4 * n as u64, &v.to_le_bytes());
                }
            }
        }
    }

    /// Before every register access from a vCPU: replay pending doorbells; for a TSD
    /// write, learn its value.
    fn observe(&self, nic: &Rtl8139, base: u64, offset: u64, write: Option<&[u8]>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.replay_locked(&st, nic);
        let Some(data) = write else { return };
        if !(TSD0..TSD0 + 16).contains(&offset) || !offset.is_multiple_of(4) || data.len() != 4 {
            return;
        }
        let n = ((offset - TSD0) / 4) as usize;
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let gens = (self.pio.generation(), self.mmio.generation());
        if gens != st.gens {
            for i in 0..4 {
                self.disarm(&mut st, i, nic);
            }
            st.gens = gens;
        }
        let (last, count) = st.last[n];
        st.last[n] = if last == v {
            (v, count.saturating_add(1))
        } else {
            (v, 1)
        };
        // Only C-mode TSDs: in C+ mode these offsets are the tally-dump register.
        if st.last[n].1 >= LEARN_AFTER && st.armed[n].map(|a| a.2) != Some(v) && !nic_in_cplus(nic)
        {
            self.disarm(&mut st, n, nic);
            let is_pio = base < 0x1_0000;
            let addr = base + offset;
            let a = if is_pio {
                IoEventAddress::Pio(addr)
            } else {
                IoEventAddress::Mmio(addr)
            };
            if self.vm.register_ioevent(&self.evts[n], &a, v).is_ok() {
                st.armed[n] = Some((addr, is_pio, v));
            }
        }
    }
}

/// Is the chip in C+ mode? (CpCmd at 0xE0 has C+ TX or RX enabled.)
fn nic_in_cplus(nic: &Rtl8139) -> bool {
    let mut b = [0u8; 2];
    nic.read(0, 0xe0, &mut b);
    u16::from_le_bytes(b) & 0x3 != 0
}

/// What the buses and the PCI root see: the NIC, with the C-mode doorbell learner
/// in front of its registers.
pub struct NicFrontend {
    pub nic: Arc<Rtl8139>,
    pub tsd: TsdDoorbells,
    /// The TxPoll ioeventfd, moved with the BARs the moment they move (weak: the
    /// doorbell holds the PCI root, which holds this frontend).
    pub doorbell: std::sync::OnceLock<std::sync::Weak<Doorbell>>,
}

impl BusDevice for NicFrontend {
    fn read(&self, base: u64, offset: u64, data: &mut [u8]) {
        self.tsd.observe(&self.nic, base, offset, None);
        self.nic.read(base, offset, data);
    }
    fn write(&self, base: u64, offset: u64, data: &[u8]) {
        self.tsd.observe(&self.nic, base, offset, Some(data));
        self.nic.write(base, offset, data);
    }
    fn name(&self) -> &'static str {
        self.nic.name()
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
        let irq = Arc::new(LevelIrq::new(vm, NIC_GSI)?);
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
        let frontend = match cfg.tx {
            TxDoorbell::IoEventFd => {
                let f = Arc::new(NicFrontend {
                    nic: nic.clone(),
                    tsd: TsdDoorbells::new(vm.clone(), buses.0.clone(), buses.1.clone())?,
                    doorbell: std::sync::OnceLock::new(),
                });
                root.add_device(f.clone(), placement)?;
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
        })
    }

    /// Move frames from the tap into the guest while it has room; at most `budget`
    /// frames per call so console input is not starved. Returns false when the
    /// guest's ring is full (stop watching the tap until the NIC signals space).
    pub fn pump_rx(&self, buf: &mut [u8], budget: usize) -> bool {
        for _ in 0..budget {
            if !self.nic.can_receive() {
                self.io.rx_backpressure.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            match self.tap.read_frame(buf) {
                Ok(Some(n)) => {
                    self.io.tap_rx_frames.fetch_add(1, Ordering::Relaxed);
                    self.io.tap_rx_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    if self.nic.receive(&buf[..n]) == RxResult::RingFull {
                        self.io.rx_backpressure.fetch_add(1, Ordering::Relaxed);
                        return false;
                    }
                }
                Ok(None) => return true,
                Err(e) => {
                    // A tap deleted under the guest: keep the VM running, count it.
                    if self.io.tap_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                        log::warn!("{}", crate::error_chain(&e));
                    }
                    return true;
                }
            }
        }
        true
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
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
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
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad}");
        }
    }
}

//! The NIC's TX doorbells as KVM ioeventfds: TxPoll (C+ mode) on both BARs, following
//! BAR moves, and the C-mode TSD learner that lets KVM complete repeated frame-length
//! writes.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;
use wbvmm_devices::net::rtl8139::regs::{TPPOLL, TPPOLL_NPQ, TSD0};
use wbvmm_devices::net::rtl8139::{Rtl8139, Rtl8139Mode};
use wbvmm_devices::pci::{BarKind, BarSpec, PciRoot};
use wbvmm_devices::{Bus, BusDevice};

use super::NetError;

/// TxPoll's offset in both BARs.
const TXPOLL_OFFSET: u64 = TPPOLL as u64;
/// The C-mode TX descriptors TSD0-3 (4 bytes apart).
const TSD_COUNT: usize = 4;
const TSD_FIRST: u64 = TSD0 as u64;
const TSD_END: u64 = TSD_FIRST + 4 * TSD_COUNT as u64;

/// Where the NIC's BARs decode now, by address space: the kind comes from the BAR
/// types the device model declares, the address from the PCI root.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct BarBases {
    io: Option<u64>,
    mem: Option<u64>,
}

impl BarBases {
    pub(super) fn now(pci: &PciRoot, device: u8, bars: &[BarSpec]) -> Self {
        let mut b = Self::default();
        for spec in bars {
            let at = pci.bar_mapping(device, spec.index).and_then(|(_, at)| at);
            match spec.kind {
                BarKind::Io => b.io = b.io.or(at),
                BarKind::Mem32 => b.mem = b.mem.or(at),
            }
        }
        b
    }

    /// The ioeventfd address of register `offset` in the BAR mapped at `base`. `None`
    /// if no BAR is mapped there, or if the port BAR and the memory BAR have the same
    /// base (a bus access does not say which space it came from).
    pub(super) fn ioevent(&self, base: u64, offset: u64) -> Option<IoEventAddress> {
        match (self.io == Some(base), self.mem == Some(base)) {
            (true, false) => Some(IoEventAddress::Pio(base + offset)),
            (false, true) => Some(IoEventAddress::Mmio(base + offset)),
            _ => None,
        }
    }
}

/// The TxPoll doorbell as an ioeventfd on both BARs, following BAR moves.
pub struct Doorbell {
    pub evt: EventFd,
    vm: Arc<VmFd>,
    pci: Arc<PciRoot>,
    device: u8,
    bars: Vec<BarSpec>,
    /// (PIO port, MMIO address) currently registered.
    at: Mutex<(Option<u64>, Option<u64>)>,
    /// The bus generations `at` was computed for.
    seen: AtomicU64,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
}

impl Doorbell {
    pub(super) fn new(
        vm: Arc<VmFd>,
        pci: Arc<PciRoot>,
        (device, bars): (u8, Vec<BarSpec>),
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
    ) -> Result<Self, NetError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(NetError::Irq)?;
        let d = Self {
            evt,
            vm,
            pci,
            device,
            bars,
            at: Mutex::new((None, None)),
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
        let bases = BarBases::now(&self.pci, self.device, &self.bars);
        let want = (
            bases.io.map(|b| b + TXPOLL_OFFSET),
            bases.mem.map(|b| b + TXPOLL_OFFSET),
        );
        let mut at = self.at.lock().unwrap_or_else(|e| e.into_inner());
        if *at == want {
            return;
        }
        let (old_pio, old_mmio) = *at;
        if let Some(p) = old_pio {
            let _ = self
                .vm
                .unregister_ioevent(&self.evt, &IoEventAddress::Pio(p), TPPOLL_NPQ);
        }
        if let Some(m) = old_mmio {
            let _ = self
                .vm
                .unregister_ioevent(&self.evt, &IoEventAddress::Mmio(m), TPPOLL_NPQ);
        }
        let reg = |a: &IoEventAddress| match self.vm.register_ioevent(&self.evt, a, TPPOLL_NPQ) {
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

/// A learnt doorbell's datamatch: the register's width and the value KVM completes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Datamatch {
    /// IntrMask (`net/unmask.rs`).
    U16(u16),
    /// A TSD.
    U32(u32),
}

/// Where the learnt doorbells (TSD lengths, the IntrMask unmask) register their
/// ioeventfds: KVM (the `VmFd`), or a fake in the unit tests. Called only when a
/// doorbell is armed or disarmed, never per access.
pub trait LearntIoEvents: Send + Sync {
    /// An ioeventfd on the register at `addr` for writes of exactly `value`.
    fn register(&self, evt: &EventFd, addr: IoEventAddress, value: Datamatch) -> io::Result<()>;
    fn unregister(&self, evt: &EventFd, addr: IoEventAddress, value: Datamatch) -> io::Result<()>;
}

impl LearntIoEvents for VmFd {
    fn register(&self, evt: &EventFd, addr: IoEventAddress, value: Datamatch) -> io::Result<()> {
        match value {
            Datamatch::U16(v) => self.register_ioevent(evt, &addr, v),
            Datamatch::U32(v) => self.register_ioevent(evt, &addr, v),
        }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
    fn unregister(&self, evt: &EventFd, addr: IoEventAddress, value: Datamatch) -> io::Result<()> {
        match value {
            Datamatch::U16(v) => self.unregister_ioevent(evt, &addr, v),
            Datamatch::U32(v) => self.unregister_ioevent(evt, &addr, v),
        }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

/// Frame-length doorbells for C mode. A TSD write carries the frame's length, so a
/// plain ioeventfd would lose it; but a guest sends few distinct lengths (full-sized
/// segments, a request/response's reply, its ACKs), each again and again. After
/// `LEARN_AFTER` writes of one value to TSDn (not necessarily in a row), an ioeventfd
/// with that exact value as its datamatch takes over, in one of TSDn's
/// `VALUES_PER_TSD` slots (the oldest is replaced when all are taken): those writes
/// complete inside KVM and are replayed here with the value they must have had. Any
/// other value still exits. Before the NIC serves any register access, pending
/// doorbells are replayed, so the guest never sees TSD/TSR status older than its own
/// writes.
///
/// The per-access path takes no lock while nothing is armed (C+ mode, which never
/// arms, and C mode until a frame length repeats): one atomic load. While a doorbell
/// is armed, each access takes the learner's mutex to replay (one `poll` over the
/// armed eventfds, then a read of those that fired): the mutex pairs each eventfd
/// count with the value that eventfd was registered for (a re-arm with another value
/// in between would otherwise replay the wrong length). TSD writes that exit take it
/// too, to learn. Two values pending on one TSD at once (a write absorbed, then
/// another before the driver saw the first complete) are replayed in slot order, not
/// the guest's: no driver reuses a descriptor it has not seen complete, and the chip
/// sends its descriptors in ring order whatever the order of the writes.
pub struct TsdDoorbells {
    io: Arc<dyn LearntIoEvents>,
    pci: Weak<PciRoot>,
    device: u8,
    bars: Vec<BarSpec>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    /// One per slot: slot `k * TSD_COUNT + n` is TSDn's k-th value.
    pub evts: [EventFd; TSD_SLOTS],
    /// Bit per slot, set while it has an ioeventfd, from just before it is registered
    /// until its absorbed writes have been replayed after unregistering (see `observe`).
    armed_mask: AtomicU16,
    state: Mutex<TsdLearnState>,
    /// False with the register shadow always on: a write KVM absorbed would leave the
    /// shadow's TSD status older than the guest's own write, and the guest reads it
    /// without an exit that could replay it first.
    learning: bool,
    /// With `shadow=auto`: set while the shadow page may be mapped (C+ mode); nothing
    /// is armed then, for the same reason.
    shadow_present: Option<Arc<AtomicBool>>,
}

const LEARN_AFTER: u32 = 4;
/// Distinct lengths learnt per TSD: full segments, a reply's last segment, ACKs.
const VALUES_PER_TSD: usize = 3;
/// Learnt doorbells in all: one eventfd and one I/O-thread token each.
pub const TSD_SLOTS: usize = TSD_COUNT * VALUES_PER_TSD;
/// Unlearnt values counted per TSD.
const CANDIDATES: usize = 4;

fn slot(n: usize, k: usize) -> usize {
    k * TSD_COUNT + n
}

#[derive(Default)]
struct TsdLearnState {
    /// Per slot: the registered address and value.
    armed: [Option<(IoEventAddress, u32)>; TSD_SLOTS],
    /// Per TSDn: values written (that exited) and how often, not yet armed.
    seen: [[(u32, u32); CANDIDATES]; TSD_COUNT],
    /// Per TSDn: the value index to replace when all its slots are armed.
    oldest: [usize; TSD_COUNT],
    /// Bus generations when arming: a BAR move disarms everything.
    gens: (u64, u64),
}

impl TsdLearnState {
    /// Count a write of `v` to TSDn; how many such writes were counted.
    fn count(&mut self, n: usize, v: u32) -> u32 {
        let seen = &mut self.seen[n];
        if let Some(e) = seen.iter_mut().find(|e| e.1 > 0 && e.0 == v) {
            e.1 += 1;
            return e.1;
        }
        // A new value takes the place of the least written one.
        if let Some(e) = seen.iter_mut().min_by_key(|e| e.1) {
            *e = (v, 1);
        }
        1
    }

    fn forget(&mut self, n: usize, v: u32) {
        for e in self.seen[n].iter_mut().filter(|e| e.0 == v) {
            *e = (0, 0);
        }
    }

    /// TSDn's slot armed for `v`, if any.
    fn armed_for(&self, n: usize, v: u32) -> Option<usize> {
        (0..VALUES_PER_TSD)
            .map(|k| slot(n, k))
            .find(|&s| self.armed[s].is_some_and(|a| a.1 == v))
    }

    /// Where TSDn learns its next value: a free slot, else its oldest.
    fn slot_for_new_value(&mut self, n: usize) -> usize {
        if let Some(k) = (0..VALUES_PER_TSD).find(|&k| self.armed[slot(n, k)].is_none()) {
            return slot(n, k);
        }
        let k = self.oldest[n];
        self.oldest[n] = (k + 1) % VALUES_PER_TSD;
        slot(n, k)
    }
}

/// `(n, value)` if this access writes all of TSDn.
fn tsd_write(offset: u64, write: Option<&[u8]>) -> Option<(usize, u32)> {
    let data: [u8; 4] = write?.try_into().ok()?;
    if !(TSD_FIRST..TSD_END).contains(&offset) || !offset.is_multiple_of(4) {
        return None;
    }
    Some((
        ((offset - TSD_FIRST) / 4) as usize,
        u32::from_le_bytes(data),
    ))
}

fn tsd_offset(n: usize) -> u64 {
    TSD_FIRST + 4 * n as u64
}

impl TsdDoorbells {
    pub(super) fn new(
        io: Arc<dyn LearntIoEvents>,
        pci: Weak<PciRoot>,
        (device, bars): (u8, Vec<BarSpec>),
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
    ) -> Result<Self, NetError> {
        let mut evts = Vec::with_capacity(TSD_SLOTS);
        for _ in 0..TSD_SLOTS {
            evts.push(EventFd::new(libc::EFD_NONBLOCK).map_err(NetError::Irq)?);
        }
        let evts: [EventFd; TSD_SLOTS] = evts
            .try_into()
            .unwrap_or_else(|_| unreachable!("TSD_SLOTS eventfds were made"));
        Ok(Self {
            io,
            pci,
            device,
            bars,
            pio,
            mmio,
            evts,
            armed_mask: AtomicU16::new(0),
            state: Default::default(),
            learning: true,
            shadow_present: None,
        })
    }

    /// Learn as the register shadow allows: never beside `shadow=on`, only while
    /// the page is unmapped beside `shadow=auto`, always without one.
    pub(super) fn beside(mut self, shadow: Option<&super::RegisterShadow>) -> Self {
        match shadow {
            Some(s) if s.policy() == super::ShadowPolicy::Always => self.learning = false,
            Some(s) => self.shadow_present = Some(s.present()),
            None => {}
        }
        self
    }

    fn learns(&self) -> bool {
        self.learning
            && !self
                .shadow_present
                .as_ref()
                .is_some_and(|p| p.load(Ordering::SeqCst))
    }

    /// Disarm every TSD doorbell, replaying what KVM absorbed: before the register
    /// shadow may be mapped.
    /// Rare (a mode switch), so always under the lock: an `observe` on another vCPU
    /// either armed before it (and is disarmed here) or sees the new mode.
    pub(super) fn disarm_all(&self, nic: &Rtl8139) {
        let mut st = self.lock();
        for s in 0..TSD_SLOTS {
            self.disarm(&mut st, s, nic);
        }
    }

    fn lock(&self) -> MutexGuard<'_, TsdLearnState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stop absorbing writes in slot `s`; writes absorbed before are replayed first
    /// (unregister, then drain: nothing new can arrive in between).
    fn disarm(&self, st: &mut TsdLearnState, s: usize, nic: &Rtl8139) {
        if let Some((addr, v)) = st.armed[s].take() {
            let _ = self.io.unregister(&self.evts[s], addr, Datamatch::U32(v));
            Self::replay_one(&self.evts[s], s % TSD_COUNT, v, nic);
            self.armed_mask.fetch_and(!(1 << s), Ordering::SeqCst);
        }
    }

    /// Register slot `s`'s ioeventfd for `value` at `addr`. The mask bit goes up
    /// first, so that any write KVM absorbs is preceded by it (see `observe`).
    fn arm(&self, st: &mut TsdLearnState, s: usize, addr: IoEventAddress, value: u32) {
        self.armed_mask.fetch_or(1 << s, Ordering::SeqCst);
        match self.io.register(&self.evts[s], addr, Datamatch::U32(value)) {
            Ok(()) => st.armed[s] = Some((addr, value)),
            Err(e) => {
                self.armed_mask.fetch_and(!(1 << s), Ordering::SeqCst);
                log::debug!(
                    "TSD{} doorbell at {addr:?} refused ({e}); its writes keep exiting",
                    s % TSD_COUNT
                );
            }
        }
    }

    fn replay_one(evt: &EventFd, n: usize, v: u32, nic: &Rtl8139) {
        if let Ok(count) = evt.read() {
            for _ in 0..count {
                // The NIC ignores `base` (both BARs are one register block).
                nic.write(0, tsd_offset(n), &v.to_le_bytes());
            }
        }
    }

    /// Replay writes KVM absorbed, then return. Serialised with `observe`, so a
    /// register access never overtakes a replay.
    pub fn replay(&self, nic: &Rtl8139) {
        let st = self.lock();
        self.replay_locked(&st, nic);
    }

    /// One `poll` finds the armed eventfds that fired (a read of each costs as much
    /// as the poll of all); only those are read.
    fn replay_locked(&self, st: &TsdLearnState, nic: &Rtl8139) {
        let mut fds = [libc::pollfd {
            fd: -1,
            events: libc::POLLIN,
            revents: 0,
        }; TSD_SLOTS];
        let mut slots = [0usize; TSD_SLOTS];
        let mut m = 0;
        for (s, armed) in st.armed.iter().enumerate() {
            if armed.is_some() {
                fds[m].fd = self.evts[s].as_raw_fd();
                slots[m] = s;
                m += 1;
            }
        }
        let polled = match m {
            0 => return,
            // One read is one system call already.
            1 => false,
            _ => {
                // SAFETY: `fds[..m]` are initialised pollfds on eventfds this owns.
                let ready = unsafe { libc::poll(fds.as_mut_ptr(), m as libc::nfds_t, 0) };
                ready >= 0
            }
        };
        for (fd, &s) in fds[..m].iter().zip(&slots[..m]) {
            // A failed poll (EINTR) reads them all, as before it.
            if polled && fd.revents & libc::POLLIN == 0 {
                continue;
            }
            if let Some((_, v)) = st.armed[s] {
                Self::replay_one(&self.evts[s], s % TSD_COUNT, v, nic);
            }
        }
    }

    /// Before every register access from a vCPU: replay pending doorbells; for a TSD
    /// write, learn its value.
    ///
    /// Skipping the replay when `armed_mask` reads 0 loses nothing: a write KVM absorbed
    /// came after its registration, which came after the mask bit was set (`arm`); an
    /// access that follows that write in the guest's order (the same vCPU, or another
    /// one the guest synchronised with) therefore sees the bit, or sees it cleared,
    /// which `disarm` does only after replaying every absorbed write into the NIC. An
    /// access concurrent with the write may be served before or after it, as on real
    /// hardware (the NIC's own mutex orders the two).
    pub(super) fn observe(&self, nic: &Rtl8139, base: u64, offset: u64, write: Option<&[u8]>) {
        let armed = self.armed_mask.load(Ordering::SeqCst) != 0;
        let tsd = tsd_write(offset, write);
        if !armed && tsd.is_none() {
            return;
        }
        let mut st = self.lock();
        self.replay_locked(&st, nic);
        let Some((n, v)) = tsd else { return };
        let gens = (self.pio.generation(), self.mmio.generation());
        if gens != st.gens {
            for s in 0..TSD_SLOTS {
                self.disarm(&mut st, s, nic);
            }
            st.gens = gens;
        }
        // Only C-mode TSDs: in C+ mode these offsets are the tally-dump register.
        if st.armed_for(n, v).is_some() || nic.mode() != Rtl8139Mode::C || !self.learns() {
            return;
        }
        if st.count(n, v) < LEARN_AFTER {
            return;
        }
        let Some(pci) = self.pci.upgrade() else {
            return;
        };
        let Some(addr) = BarBases::now(&pci, self.device, &self.bars).ioevent(base, offset) else {
            return;
        };
        st.forget(n, v);
        let s = st.slot_for_new_value(n);
        self.disarm(&mut st, s, nic);
        self.arm(&mut st, s, addr, v);
    }
}

#[cfg(test)]
mod tests;

//! The TSD learner without KVM: a fake ioeventfd registry, the real NIC model on real
//! buses and a real PCI root; "KVM absorbed a write" is a write to the doorbell's eventfd.

use std::sync::{Arc, Mutex};

use kvm_ioctls::IoEventAddress;
use vmm_sys_util::eventfd::EventFd;
use wbvmm_devices::irq::RecordingIrq;
use wbvmm_devices::net::rtl8139::regs::{
    CPCMD, CPCMD_RXENB, CPCMD_TXENB, CR, CR_RE, CR_RST, CR_TE, IMR, INT_FOVW, INT_MASK, INT_RER,
    INT_ROK, INT_RXOVW, INT_TOK, ISR, TSAD0,
};
use wbvmm_devices::net::rtl8139::{Rtl8139, Rtl8139Config, REVISION_C};
use wbvmm_devices::net::RecordingSink;
use wbvmm_devices::pci::{PciDevice, PciPlacement, PciRoot, PCI_COMMAND_MASTER};
use wbvmm_devices::pci::{PCI_COMMAND_IO, PCI_COMMAND_MEMORY};
use wbvmm_devices::{Bus, BusDevice, GuestDma, VecGuestMemory};

use super::{BarBases, Datamatch, LearntIoEvents, TsdDoorbells, LEARN_AFTER, TSD_COUNT};
use crate::memory::{FakeBackend, SlotIndexKind, SlotRegistry};
use crate::net::shadow::READ_WINDOW;
use crate::net::{
    CoalescedZones, NicFrontend, PostedWrites, RegisterShadow, ShadowPolicy, UnmaskDoorbell,
    ZoneStart,
};

const DEVICE: u8 = 3;
const IO_BAR: u64 = 0xc000;
const MEM_BAR: u64 = 0xfebf_f000;
const FRAME_LEN: u32 = 60;
/// Where TSADn points: one 2 KiB buffer per descriptor.
fn buffer(n: usize) -> u64 {
    0x1_0000 + 0x800 * n as u64
}

/// (is_pio, address, value, registered) for every call, in order.
#[derive(Default)]
struct FakeIoEvents {
    calls: Mutex<Vec<(bool, u64, u32, bool)>>,
}

impl FakeIoEvents {
    fn record(&self, addr: IoEventAddress, value: Datamatch, registered: bool) {
        let value = match value {
            Datamatch::U16(v) => v.into(),
            Datamatch::U32(v) => v,
        };
        let (pio, a) = match addr {
            IoEventAddress::Pio(a) => (true, a),
            IoEventAddress::Mmio(a) => (false, a),
        };
        self.calls.lock().unwrap().push((pio, a, value, registered));
    }
    fn calls(&self) -> Vec<(bool, u64, u32, bool)> {
        self.calls.lock().unwrap().clone()
    }
}

impl LearntIoEvents for FakeIoEvents {
    fn register(&self, _: &EventFd, addr: IoEventAddress, value: Datamatch) -> std::io::Result<()> {
        self.record(addr, value, true);
        Ok(())
    }
    fn unregister(
        &self,
        _: &EventFd,
        addr: IoEventAddress,
        value: Datamatch,
    ) -> std::io::Result<()> {
        self.record(addr, value, false);
        Ok(())
    }
}

/// The posted-write zones KVM would hold: (start, length) for each registration
/// still in force.
#[derive(Default)]
struct FakeZones {
    zones: Mutex<Vec<(ZoneStart, u32)>>,
}

impl FakeZones {
    fn zones(&self) -> Vec<(ZoneStart, u32)> {
        self.zones.lock().unwrap().clone()
    }
}

impl CoalescedZones for FakeZones {
    fn register(&self, at: ZoneStart, len: u32) -> std::io::Result<()> {
        self.zones.lock().unwrap().push((at, len));
        Ok(())
    }
    fn unregister(&self, at: ZoneStart, len: u32) -> std::io::Result<()> {
        let mut z = self.zones.lock().unwrap();
        let before = z.len();
        z.retain(|&e| e != (at, len));
        assert_eq!(
            z.len() + 1,
            before,
            "unregistered a zone that was not there"
        );
        Ok(())
    }
}

struct Rig {
    nic: Arc<Rtl8139>,
    zones: Arc<FakeZones>,
    sink: Arc<RecordingSink>,
    io: Arc<FakeIoEvents>,
    root: Arc<PciRoot>,
    frontend: Arc<NicFrontend>,
    registry: Arc<SlotRegistry>,
}

impl Rig {
    fn new() -> Rig {
        Self::build(ShadowPolicy::Off)
    }

    /// With the register shadow as `--net ...,shadow=` builds it for `policy`.
    fn build(policy: ShadowPolicy) -> Rig {
        let mem = Arc::new(VecGuestMemory::new(0, 1 << 20));
        let sink = Arc::new(RecordingSink::default());
        let nic = Arc::new(
            Rtl8139::new(
                Rtl8139Config {
                    revision: REVISION_C,
                    ..Default::default()
                },
                mem.clone(),
                Arc::new(RecordingIrq::default()),
                sink.clone(),
            )
            .unwrap(),
        );
        let (pio, mmio) = (Arc::new(Bus::new()), Arc::new(Bus::new()));
        let root = Arc::new(PciRoot::new(pio.clone(), mmio.clone()));
        let io = Arc::new(FakeIoEvents::default());
        let registry = Arc::new(SlotRegistry::new(
            FakeBackend::new(16),
            SlotIndexKind::default(),
        ));
        let tsd = TsdDoorbells::new(
            io.clone(),
            Arc::downgrade(&root),
            (DEVICE, nic.bars()),
            pio.clone(),
            mmio.clone(),
        )
        .unwrap();
        let shadow = (policy != ShadowPolicy::Off).then(|| {
            Arc::new(RegisterShadow::new(
                &nic,
                registry.clone(),
                Arc::downgrade(&root),
                DEVICE,
                policy,
            ))
        });
        let tsd = tsd.beside(shadow.as_deref());
        let zones = Arc::new(FakeZones::default());
        let posted = PostedWrites::new(
            zones.clone(),
            Arc::downgrade(&root),
            (DEVICE, nic.bars()),
            &nic,
            shadow.as_deref(),
        );
        // As NetDevice::create with `unmask=on`: beside a shadow only.
        let unmask = shadow.as_ref().map(|s| {
            UnmaskDoorbell::new(
                io.clone(),
                Arc::downgrade(&root),
                (DEVICE, nic.bars()),
                (pio.clone(), mmio.clone()),
                s.present(),
            )
            .unwrap()
        });
        let frontend = Arc::new(NicFrontend {
            nic: nic.clone(),
            tsd,
            doorbell: std::sync::OnceLock::new(),
            shadow,
            posted,
            unmask,
        });
        root.add_device(
            frontend.clone(),
            PciPlacement {
                device: Some(DEVICE),
                irq: 16,
                bar_addresses: vec![IO_BAR, MEM_BAR],
            },
        )
        .unwrap();
        // As NetDevice::create: the BARs decode from add_device on.
        if let Some(s) = &frontend.shadow {
            s.follow_bar();
        }
        let command = PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        root.config_write(DEVICE, 0x04, &command.to_le_bytes());
        for n in 0..TSD_COUNT {
            mem.write(buffer(n), &[n as u8; FRAME_LEN as usize])
                .unwrap();
        }
        let rig = Rig {
            nic,
            zones,
            sink,
            io,
            root,
            frontend,
            registry,
        };
        // 8139too's TX setup: transmitter on, one buffer per descriptor.
        rig.write(IO_BAR, CR as u64, &[CR_RE | CR_TE]);
        for n in 0..TSD_COUNT {
            let tsad = (TSAD0 + 4 * n) as u64;
            rig.write(IO_BAR, tsad, &(buffer(n) as u32).to_le_bytes());
        }
        rig
    }

    fn write(&self, base: u64, offset: u64, data: &[u8]) {
        self.frontend.write(base, offset, data);
    }

    fn read16(&self, base: u64, offset: u64) -> u16 {
        let mut b = [0u8; 2];
        self.frontend.read(base, offset, &mut b);
        u16::from_le_bytes(b)
    }

    /// The guest sends `rounds` frames on each descriptor in turn, all of one length.
    fn send_rounds(&self, base: u64, rounds: usize) {
        for _ in 0..rounds {
            for n in 0..TSD_COUNT {
                self.write(base, super::tsd_offset(n), &FRAME_LEN.to_le_bytes());
            }
        }
    }

    fn frames(&self) -> usize {
        self.sink.take().len()
    }

    fn frame_lengths(&self) -> Vec<usize> {
        self.sink.take().iter().map(Vec::len).collect()
    }
}

fn armed_at(pio: bool, base: u64) -> Vec<(bool, u64, u32, bool)> {
    (0..TSD_COUNT)
        .map(|n| (pio, base + super::tsd_offset(n), FRAME_LEN, true))
        .collect()
}

#[test]
fn a_repeated_length_is_learned_in_the_bars_own_address_space() {
    for (pio, base) in [(true, IO_BAR), (false, MEM_BAR)] {
        let rig = Rig::new();
        rig.send_rounds(base, LEARN_AFTER as usize - 1);
        assert!(
            rig.io.calls().is_empty(),
            "not learned before {LEARN_AFTER}"
        );
        rig.send_rounds(base, 1);
        assert_eq!(
            rig.frames(),
            4 * LEARN_AFTER as usize,
            "every write still sent"
        );
        assert_eq!(rig.io.calls(), armed_at(pio, base));
        assert_eq!(
            rig.frontend.tsd.armed_mask.load(super::Ordering::SeqCst),
            0xf
        );
    }
}

#[test]
fn absorbed_writes_are_replayed_before_the_next_register_access() {
    let rig = Rig::new();
    rig.send_rounds(IO_BAR, LEARN_AFTER as usize);
    assert_eq!(rig.frames(), 4 * LEARN_AFTER as usize);
    rig.write(IO_BAR, ISR as u64, &INT_MASK.to_le_bytes());
    assert_eq!(rig.read16(IO_BAR, ISR as u64) & INT_TOK, 0);
    // KVM completes the guest's next TSD0 and TSD1 writes without an exit.
    rig.frontend.tsd.evts[0].write(1).unwrap();
    rig.frontend.tsd.evts[1].write(1).unwrap();
    assert_eq!(
        rig.frames(),
        0,
        "nothing reaches the NIC until someone looks"
    );
    // The driver's next look at the chip (its interrupt status) sees both sent.
    let isr = rig.read16(IO_BAR, ISR as u64);
    assert_eq!(rig.frames(), 2, "replayed before the ISR read was served");
    assert_ne!(isr & INT_TOK, 0, "ISR.TOK in the value read: {isr:#x}");
    // The I/O thread's replay (eventfd readable) does the same without an access.
    rig.frontend.tsd.evts[2].write(1).unwrap();
    rig.frontend.tsd.replay(&rig.nic);
    assert_eq!(rig.frames(), 1);
}

#[test]
fn more_lengths_are_learnt_beside_the_first_and_the_oldest_makes_way() {
    let rig = Rig::new();
    rig.send_rounds(IO_BAR, LEARN_AFTER as usize);
    rig.frames();
    let n = TSD_COUNT;
    let at = |i: usize| IO_BAR + super::tsd_offset(i);
    // One frame of `v` bytes on each descriptor, in ring order.
    let round = |v: u32| {
        for i in 0..n {
            rig.write(IO_BAR, super::tsd_offset(i), &v.to_le_bytes());
        }
    };
    // The frames also come in 100 and 200 bytes, interleaved (a reply's last
    // segment, ACKs): each length is learnt in a slot of its own, 60 stays.
    for _ in 0..LEARN_AFTER {
        round(100);
        round(200);
    }
    let learnt: Vec<_> = [100, 200]
        .iter()
        .flat_map(|&v| (0..n).map(move |i| (true, at(i), v, true)))
        .collect();
    let mut calls = rig.io.calls()[n..].to_vec();
    calls.sort_by_key(|c| (c.2, c.1));
    assert_eq!(calls, learnt);
    assert_eq!(rig.frames(), 2 * n * LEARN_AFTER as usize);
    // KVM absorbs one frame per descriptor, each in another slot: one poll finds
    // them all, and they leave in ring order with their own lengths.
    for (i, k) in [(0, 0), (1, 1), (2, 2), (3, 0)] {
        rig.frontend.tsd.evts[k * n + i].write(1).unwrap();
    }
    rig.read16(IO_BAR, ISR as u64);
    assert_eq!(rig.frame_lengths(), [60, 100, 200, 60]);
    // A fourth length takes each TSD's oldest slot (60 bytes), replaying what KVM
    // absorbed there first.
    rig.frontend.tsd.evts[0].write(1).unwrap();
    let before = rig.io.calls().len();
    for _ in 0..LEARN_AFTER {
        round(300);
    }
    let lengths = rig.frame_lengths();
    assert_eq!(
        lengths[..2],
        [60, 300],
        "the absorbed 60 first: {lengths:?}"
    );
    let calls = rig.io.calls();
    assert_eq!(
        calls[before..before + 2],
        [(true, at(0), FRAME_LEN, false), (true, at(0), 300, true)]
    );
}

#[test]
fn c_plus_mode_never_arms_its_tally_register() {
    let rig = Rig::new();
    rig.write(IO_BAR, CPCMD as u64, &0u16.to_le_bytes());
    rig.send_rounds(IO_BAR, 2 * LEARN_AFTER as usize);
    assert!(rig.io.calls().is_empty(), "{:x?}", rig.io.calls());
    assert_eq!(rig.frames(), 0, "C+ mode: TSD offsets send nothing");
}

#[test]
fn a_bar_move_disarms_everything_and_learns_the_new_address() {
    let rig = Rig::new();
    rig.send_rounds(IO_BAR, LEARN_AFTER as usize);
    rig.frames();
    rig.frontend.tsd.evts[0].write(1).unwrap();
    let moved = 0xd000u64;
    rig.root
        .config_write(DEVICE, 0x10, &(moved as u32 | 1).to_le_bytes());
    assert_eq!(rig.root.bar_mapping(DEVICE, 0), Some((moved, Some(moved))));
    rig.send_rounds(moved, LEARN_AFTER as usize);
    let calls = rig.io.calls();
    let disarmed: Vec<_> = (0..TSD_COUNT)
        .map(|n| (true, IO_BAR + super::tsd_offset(n), FRAME_LEN, false))
        .collect();
    assert_eq!(calls[TSD_COUNT..2 * TSD_COUNT], disarmed, "{calls:x?}");
    assert_eq!(calls[2 * TSD_COUNT..], armed_at(true, moved));
    assert_eq!(
        rig.frames(),
        1 + TSD_COUNT * LEARN_AFTER as usize,
        "the absorbed write was not lost"
    );
}

#[test]
fn bar_bases_tell_the_address_space_apart_unless_they_coincide() {
    let b = BarBases {
        io: Some(IO_BAR),
        mem: Some(MEM_BAR),
    };
    assert!(matches!(b.ioevent(IO_BAR, 0x10), Some(IoEventAddress::Pio(a)) if a == IO_BAR + 0x10));
    assert!(
        matches!(b.ioevent(MEM_BAR, 0x10), Some(IoEventAddress::Mmio(a)) if a == MEM_BAR + 0x10)
    );
    assert!(b.ioevent(0xe000, 0x10).is_none(), "no BAR there");
    let same = BarBases {
        io: Some(IO_BAR),
        mem: Some(IO_BAR),
    };
    assert!(
        same.ioevent(IO_BAR, 0x10).is_none(),
        "ambiguous: not learned"
    );
}

fn shadow_slots(rig: &Rig) -> Vec<(u64, u64, bool)> {
    rig.registry
        .slots()
        .iter()
        .map(|s| (s.gpa, s.size, s.flags.readonly()))
        .collect()
}

#[test]
fn the_register_shadow_is_a_read_only_slot_that_follows_the_mmio_bar() {
    let rig = Rig::build(ShadowPolicy::Always);
    let shadow = rig.frontend.shadow.clone().unwrap();
    assert_eq!(shadow.mapped_at(), Some(MEM_BAR));
    assert_eq!(shadow_slots(&rig), vec![(MEM_BAR, 0x1000, true)]);
    // Memory decode off: no slot (loads would read a BAR that is not there).
    rig.root.config_write(
        DEVICE,
        0x04,
        &(PCI_COMMAND_IO | PCI_COMMAND_MASTER).to_le_bytes(),
    );
    assert_eq!(shadow.mapped_at(), None);
    assert!(shadow_slots(&rig).is_empty());
    let command = PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
    rig.root.config_write(DEVICE, 0x04, &command.to_le_bytes());
    assert_eq!(shadow.mapped_at(), Some(MEM_BAR));
    // The BAR moves: the slot moves with it.
    let moved: u32 = 0xfebe_0000;
    rig.root.config_write(DEVICE, 0x14, &moved.to_le_bytes());
    assert_eq!(shadow.mapped_at(), Some(moved as u64));
    assert_eq!(shadow_slots(&rig), vec![(moved as u64, 0x1000, true)]);
}

#[test]
fn with_the_shadow_no_tsd_doorbell_is_ever_armed() {
    let rig = Rig::build(ShadowPolicy::Always);
    for base in [IO_BAR, MEM_BAR] {
        rig.send_rounds(base, 2 * LEARN_AFTER as usize);
    }
    assert!(rig.io.calls().is_empty(), "{:?}", rig.io.calls());
    assert_eq!(rig.frames(), 2 * 2 * 4 * LEARN_AFTER as usize);
}

#[test]
fn while_the_vm_runs_a_bar_move_wakes_the_main_thread_which_moves_the_shadow() {
    let rig = Rig::build(ShadowPolicy::Always);
    let shadow = rig.frontend.shadow.clone().unwrap();
    let woken = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let w = woken.clone();
    shadow.remap_on(move || {
        w.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    });
    let moved: u32 = 0xfebe_0000;
    rig.root.config_write(DEVICE, 0x14, &moved.to_le_bytes());
    // The vCPU thread that moved the BAR changes no memslot itself.
    assert_eq!(shadow.mapped_at(), Some(MEM_BAR));
    assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 1);
    shadow.remap();
    assert_eq!(shadow_slots(&rig), vec![(moved as u64, 0x1000, true)]);
}

#[test]
fn with_shadow_auto_c_mode_learns_and_the_switch_to_c_plus_disarms_then_maps() {
    let rig = Rig::build(ShadowPolicy::Auto);
    let shadow = rig.frontend.shadow.clone().unwrap();
    // C mode: no shadow, the doorbells are learnt.
    assert_eq!(shadow.mapped_at(), None);
    assert!(shadow_slots(&rig).is_empty());
    rig.send_rounds(IO_BAR, LEARN_AFTER as usize);
    assert_eq!(rig.io.calls(), armed_at(true, IO_BAR));
    assert_eq!(rig.frames(), 4 * LEARN_AFTER as usize);
    // KVM absorbs one more frame (TSD0's turn); then the driver switches to C+.
    rig.frontend.tsd.evts[0].write(1).unwrap();
    let cpcmd = CPCMD_TXENB | CPCMD_RXENB;
    rig.write(MEM_BAR, CPCMD as u64, &cpcmd.to_le_bytes());
    // Every doorbell is unregistered and the absorbed frame sent before the page
    // can be read; then the page is mapped over the MMIO BAR.
    let calls = rig.io.calls();
    let unregistered: Vec<_> = calls[4..].iter().filter(|c| !c.3).collect();
    assert_eq!(unregistered.len(), TSD_COUNT, "{calls:?}");
    assert_eq!(rig.frames(), 1, "the absorbed frame");
    assert_eq!(shadow.mapped_at(), Some(MEM_BAR));
    assert_eq!(shadow_slots(&rig), vec![(MEM_BAR, 0x1000, true)]);
    assert!(shadow.present().load(std::sync::atomic::Ordering::SeqCst));
    // A reset takes the chip back to C mode: the page goes, learning resumes.
    rig.write(IO_BAR, CR as u64, &[CR_RST]);
    assert_eq!(shadow.mapped_at(), None);
    assert!(shadow_slots(&rig).is_empty());
    rig.write(IO_BAR, CR as u64, &[CR_RE | CR_TE]);
    for n in 0..TSD_COUNT {
        let tsad = (TSAD0 + 4 * n) as u64;
        rig.write(IO_BAR, tsad, &(buffer(n) as u32).to_le_bytes());
    }
    let before = rig.io.calls().len();
    rig.send_rounds(IO_BAR, LEARN_AFTER as usize);
    assert_eq!(rig.io.calls()[before..], armed_at(true, IO_BAR)[..]);
}

/// 8139too as Debian builds it (no `CONFIG_8139TOO_PIO`) drives C mode through the
/// MMIO BAR and reads ~10 registers per frame: `auto` gives it the shadow once a
/// window of reads there says so, as a C+ switch would, and a driver that resets the
/// chip through the port BAR gets the doorbells and the posted zones back.
#[test]
fn with_shadow_auto_a_c_mode_driver_reading_through_the_mmio_bar_takes_the_shadow() {
    let rig = Rig::build(ShadowPolicy::Auto);
    let shadow = rig.frontend.shadow.clone().unwrap();
    let present = shadow.present();
    rig.frontend.posted.enable();
    assert_eq!(rig.zones.zones(), posted_zones(IO_BAR, MEM_BAR));
    // A driver's setup reads many registers before it sends anything: no decision.
    for _ in 0..2 * READ_WINDOW {
        rig.read16(MEM_BAR, ISR as u64);
    }
    // Frames go out (learnt on the port BAR here), one absorbed but not replayed.
    rig.send_rounds(IO_BAR, LEARN_AFTER as usize);
    assert_eq!(rig.io.calls(), armed_at(true, IO_BAR));
    assert_eq!(rig.frames(), 4 * LEARN_AFTER as usize);
    rig.frontend.tsd.evts[0].write(1).unwrap();
    // From now on the main thread maps the page.
    let woken = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let w = woken.clone();
    shadow.remap_on(move || {
        w.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    });
    // The window in which sending began decides nothing either (setup reads may
    // be in it).
    for _ in 0..READ_WINDOW {
        rig.read16(MEM_BAR, ISR as u64);
    }
    assert!(!present.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(rig.io.calls(), armed_at(true, IO_BAR));
    // The next window of reads through the MMIO BAR, a polling driver's with no
    // frame sent: its last read finds the doorbells gone (the absorbed frame sent)
    // before it is answered, the zones too, and `present` up though the page is
    // not mapped yet.
    for _ in 0..READ_WINDOW - 1 {
        rig.read16(MEM_BAR, ISR as u64);
    }
    assert!(!present.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(rig.zones.zones().len(), 2);
    assert_eq!(rig.read16(MEM_BAR, ISR as u64) & INT_TOK, INT_TOK);
    let unregistered = rig.io.calls().iter().filter(|c| !c.3).count();
    assert_eq!(unregistered, TSD_COUNT, "{:?}", rig.io.calls());
    assert_eq!(rig.frames(), 1, "the absorbed frame");
    assert!(rig.zones.zones().is_empty(), "no write is posted any more");
    assert!(present.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(shadow.mapped_at(), None, "the main thread maps it");
    shadow.remap();
    assert_eq!(shadow_slots(&rig), vec![(MEM_BAR, 0x1000, true)]);
    // TX exits every time from now on and is never learnt, through either BAR; a
    // reset through the MMIO BAR keeps the page.
    let calls = rig.io.calls().len();
    rig.send_rounds(MEM_BAR, 2 * LEARN_AFTER as usize);
    rig.send_rounds(IO_BAR, 2 * LEARN_AFTER as usize);
    assert_eq!(rig.io.calls().len(), calls);
    assert_eq!(rig.frames(), 2 * 2 * 4 * LEARN_AFTER as usize);
    rig.write(MEM_BAR, CR as u64, &[CR_RST]);
    shadow.remap();
    assert_eq!(shadow.mapped_at(), Some(MEM_BAR), "reset through MMIO");
    assert!(rig.zones.zones().is_empty());
    // A reset through the port BAR: a port-I/O driver from now on.
    rig.write(IO_BAR, CR as u64, &[CR_RST]);
    assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert!(rig.zones.zones().is_empty(), "page may still be read");
    shadow.remap();
    assert_eq!(shadow.mapped_at(), None);
    assert!(!present.load(std::sync::atomic::Ordering::SeqCst));
    rig.frontend.posted.follow();
    assert_eq!(rig.zones.zones(), posted_zones(IO_BAR, MEM_BAR));
    rig.write(IO_BAR, CR as u64, &[CR_RE | CR_TE]);
    for n in 0..TSD_COUNT {
        let tsad = (TSAD0 + 4 * n) as u64;
        rig.write(IO_BAR, tsad, &(buffer(n) as u32).to_le_bytes());
    }
    rig.send_rounds(IO_BAR, LEARN_AFTER as usize);
    assert_eq!(rig.io.calls()[calls..], armed_at(true, IO_BAR)[..]);
}

/// The lean driver reads one register every few frames through the MMIO BAR: its
/// learnt TSD doorbells save more exits than the shadow would, and `auto` keeps
/// them; so it does for a driver whose posted writes tip the balance, and not
/// without them.
#[test]
fn with_shadow_auto_a_c_mode_driver_that_reads_little_keeps_its_doorbells() {
    // (reads per round of 4 frames, posted writes per read, whether it turns)
    for (reads_per_round, posted_per_read, turns) in [(1, 0, false), (16, 1, false), (16, 0, true)]
    {
        let rig = Rig::build(ShadowPolicy::Auto);
        let shadow = rig.frontend.shadow.clone().unwrap();
        rig.frontend.posted.enable();
        rig.send_rounds(MEM_BAR, LEARN_AFTER as usize);
        assert_eq!(rig.io.calls(), armed_at(false, MEM_BAR));
        for r in 0..3 * READ_WINDOW {
            rig.read16(MEM_BAR, ISR as u64);
            if r % reads_per_round == 0 {
                rig.send_rounds(MEM_BAR, 1);
            }
            for _ in 0..posted_per_read {
                // IntrMask, as a NAPI poll masks it.
                rig.write(MEM_BAR, IMR as u64, &INT_MASK.to_le_bytes());
            }
        }
        let what =
            format!("{reads_per_round} reads per 4 frames, {posted_per_read} posted per read");
        let disarmed = rig.io.calls().len() > TSD_COUNT;
        assert_eq!(disarmed, turns, "{what}: {:?}", rig.io.calls());
        assert_eq!(rig.zones.zones().is_empty(), turns, "{what}");
        assert_eq!(
            shadow.present().load(std::sync::atomic::Ordering::SeqCst),
            turns
        );
        assert_eq!(shadow.mapped_at().is_some(), turns, "{what}");
    }
}

#[test]
fn with_shadow_auto_nothing_is_armed_while_the_page_may_still_be_mapped() {
    let rig = Rig::build(ShadowPolicy::Auto);
    let shadow = rig.frontend.shadow.clone().unwrap();
    let cpcmd = CPCMD_TXENB | CPCMD_RXENB;
    rig.write(MEM_BAR, CPCMD as u64, &cpcmd.to_le_bytes());
    assert_eq!(shadow.mapped_at(), Some(MEM_BAR));
    // From now on the main thread moves the slot: a reset asks for the unmap, and
    // until the main thread has done it the learner must not arm.
    let woken = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let w = woken.clone();
    shadow.remap_on(move || {
        w.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    });
    rig.write(IO_BAR, CR as u64, &[CR_RST]);
    assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(shadow.mapped_at(), Some(MEM_BAR), "not yet unmapped");
    rig.write(IO_BAR, CR as u64, &[CR_RE | CR_TE]);
    for n in 0..TSD_COUNT {
        let tsad = (TSAD0 + 4 * n) as u64;
        rig.write(IO_BAR, tsad, &(buffer(n) as u32).to_le_bytes());
    }
    rig.send_rounds(IO_BAR, 2 * LEARN_AFTER as usize);
    assert!(rig.io.calls().is_empty(), "{:?}", rig.io.calls());
    // The main thread unmaps; the next run of equal writes is learnt.
    shadow.remap();
    assert_eq!(shadow.mapped_at(), None);
    rig.send_rounds(IO_BAR, LEARN_AFTER as usize);
    assert_eq!(rig.io.calls(), armed_at(true, IO_BAR));
}

#[test]
fn the_nic_keeps_the_shadow_page_current_only_while_it_is_mapped() {
    let rig = Rig::build(ShadowPolicy::Auto);
    let shadow = rig.frontend.shadow.clone().unwrap();
    let page_imr = || {
        let mut b = [0u8; 2];
        shadow.page().read(IMR as u64, &mut b);
        u16::from_le_bytes(b)
    };
    // C mode, not mapped: a register change does not reach the page.
    rig.write(IO_BAR, IMR as u64, &0x0005u16.to_le_bytes());
    assert_eq!(page_imr(), 0, "not published while unmapped");
    // C+: mapped, and current from before the first load.
    let cpcmd = CPCMD_TXENB | CPCMD_RXENB;
    rig.write(MEM_BAR, CPCMD as u64, &cpcmd.to_le_bytes());
    assert_eq!(shadow.mapped_at(), Some(MEM_BAR));
    assert_eq!(page_imr(), 0x0005);
    rig.write(MEM_BAR, IMR as u64, &0x0001u16.to_le_bytes());
    assert_eq!(page_imr(), 0x0001);
    // A reset unmaps it: later changes stay off the page again.
    rig.write(IO_BAR, CR as u64, &[CR_RST]);
    assert_eq!(shadow.mapped_at(), None);
    rig.write(IO_BAR, IMR as u64, &0x0004u16.to_le_bytes());
    assert_ne!(page_imr(), 0x0004);
}

/// The zones over CAPR..IntrStatus of the port BAR at `io` and the memory BAR at
/// `mem`.
fn posted_zones(io: u64, mem: u64) -> Vec<(ZoneStart, u32)> {
    vec![
        (ZoneStart::Pio(io + 0x38), 8),
        (ZoneStart::Mmio(mem + 0x38), 8),
    ]
}

#[test]
fn the_posted_zone_waits_for_a_ring_consumer_and_follows_the_port_bar() {
    let rig = Rig::new();
    assert!(
        rig.zones.zones().is_empty(),
        "no zone before the ring is replayed"
    );
    rig.frontend.posted.enable();
    assert_eq!(rig.zones.zones(), posted_zones(IO_BAR, MEM_BAR));
    assert!(rig.frontend.posted.active());
    // The port BAR moves (the frontend's bars_moved hook): its zone moves with it.
    let moved: u32 = 0xd000 | 1;
    rig.root.config_write(DEVICE, 0x10, &moved.to_le_bytes());
    assert_eq!(rig.zones.zones(), posted_zones(0xd000, MEM_BAR));
    // Memory decode off: the memory BAR's zone goes.
    rig.root.config_write(
        DEVICE,
        0x04,
        &(PCI_COMMAND_IO | PCI_COMMAND_MASTER).to_le_bytes(),
    );
    assert_eq!(rig.zones.zones(), posted_zones(0xd000, MEM_BAR)[..1]);
    let command = PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
    rig.root.config_write(DEVICE, 0x04, &command.to_le_bytes());
    // Without a shadow, C+ mode posts too (nothing reads registers without an exit).
    let cpcmd = CPCMD_TXENB | CPCMD_RXENB;
    rig.write(MEM_BAR, CPCMD as u64, &cpcmd.to_le_bytes());
    assert_eq!(rig.zones.zones(), posted_zones(0xd000, MEM_BAR));
}

#[test]
fn the_posted_zone_never_exists_while_the_shadow_may_be_read() {
    let rig = Rig::build(ShadowPolicy::Always);
    rig.frontend.posted.enable();
    assert!(rig.zones.zones().is_empty(), "shadow=on: never");

    let rig = Rig::build(ShadowPolicy::Auto);
    let shadow = rig.frontend.shadow.clone().unwrap();
    rig.frontend.posted.enable();
    assert_eq!(
        rig.zones.zones(),
        posted_zones(IO_BAR, MEM_BAR),
        "auto, C mode: posted"
    );
    // From now on the main thread maps and unmaps the page.
    let woken = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let w = woken.clone();
    shadow.remap_on(move || {
        w.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    });
    // The switch to C+: the zone goes on the vCPU's own write, before the main
    // thread maps the page (so before any load can read it).
    let cpcmd = CPCMD_TXENB | CPCMD_RXENB;
    rig.write(MEM_BAR, CPCMD as u64, &cpcmd.to_le_bytes());
    assert!(rig.zones.zones().is_empty(), "C+ switch removes the zone");
    shadow.remap();
    assert_eq!(shadow.mapped_at(), Some(MEM_BAR));
    // A reset back to C: the page is still mapped until the main thread removes
    // it, and the zone stays away until then.
    rig.write(IO_BAR, CR as u64, &[CR_RST]);
    assert_eq!(shadow.mapped_at(), Some(MEM_BAR));
    assert!(rig.zones.zones().is_empty(), "page may still be read");
    shadow.remap();
    assert_eq!(shadow.mapped_at(), None);
    // The main thread's NicShadow handler follows the remap.
    rig.frontend.posted.follow();
    assert_eq!(rig.zones.zones(), posted_zones(IO_BAR, MEM_BAR));
}

#[test]
fn a_posted_ack_older_than_a_pending_doorbell_leaves_that_frames_tx_ok() {
    let rig = Rig::new();
    rig.send_rounds(IO_BAR, LEARN_AFTER as usize);
    assert_eq!(rig.frames(), 4 * LEARN_AFTER as usize);
    assert_ne!(rig.read16(IO_BAR, ISR as u64) & INT_TOK, 0);
    // The guest acks the TxOK it saw (posted: queued in KVM's ring), then sends
    // its next frame on TSD0 (absorbed by the doorbell). At the next exit the ring
    // is replayed first: the ack must land before that frame, not after it.
    rig.frontend.tsd.evts[0].write(1).unwrap();
    rig.write(IO_BAR, ISR as u64, &INT_TOK.to_le_bytes());
    let isr = rig.read16(IO_BAR, ISR as u64);
    assert_eq!(rig.frames(), 1, "the absorbed frame is sent");
    assert_ne!(
        isr & INT_TOK,
        0,
        "its TxOK survives the older ack: {isr:#x}"
    );
    // IntrMask and CAPR writes do not replay doorbells either; the next read does.
    rig.frontend.tsd.evts[1].write(1).unwrap();
    rig.write(IO_BAR, IMR as u64, &INT_TOK.to_le_bytes());
    assert_eq!(rig.frames(), 0);
    rig.read16(IO_BAR, IMR as u64);
    assert_eq!(rig.frames(), 1);
}

// The IntrMask unmask doorbell (net/unmask.rs), on the same rig.

/// What the Linux-shaped drivers write: every cause, and every cause but RX (NAPI).
const ALL_CAUSES: u16 = INT_MASK;
const NO_RX: u16 = INT_MASK & !(INT_ROK | INT_RER | INT_RXOVW | INT_FOVW);

impl Rig {
    fn write16(&self, offset: u64, v: u16) {
        self.write(MEM_BAR, offset, &v.to_le_bytes());
    }
    /// `rounds` of the NAPI pattern: mask RX, unmask all.
    fn napi_rounds(&self, rounds: u32) {
        for _ in 0..rounds {
            self.write16(IMR as u64, NO_RX);
            self.write16(IMR as u64, ALL_CAUSES);
        }
    }
    fn unmask(&self) -> &UnmaskDoorbell {
        self.frontend
            .unmask
            .as_ref()
            .expect("a shadow, so an unmask doorbell")
    }
    fn nic_imr(&self) -> u16 {
        let mut b = [0u8; 2];
        self.nic.read(0, IMR as u64, &mut b);
        u16::from_le_bytes(b)
    }
}

fn unmask_armed(value: u16, registered: bool) -> (bool, u64, u32, bool) {
    (false, MEM_BAR + IMR as u64, value.into(), registered)
}

#[test]
fn an_unmask_that_enables_every_cause_is_learnt_beside_the_shadow_and_masks_still_exit() {
    let rig = Rig::build(ShadowPolicy::Always);
    rig.napi_rounds(LEARN_AFTER - 1);
    assert!(
        rig.io.calls().is_empty(),
        "not before {LEARN_AFTER} unmasks"
    );
    assert_eq!(rig.nic_imr(), ALL_CAUSES, "every write reached the NIC");
    rig.napi_rounds(1);
    assert_eq!(rig.io.calls(), [unmask_armed(ALL_CAUSES, true)]);
    // The mask is another value: it exits and reaches the NIC at once.
    rig.write16(IMR as u64, NO_RX);
    assert_eq!(rig.nic_imr(), NO_RX);
    assert_eq!(rig.io.calls().len(), 1, "a mask leaves it armed");
}

#[test]
fn an_absorbed_unmask_is_applied_before_the_next_exit_or_by_the_io_thread() {
    let rig = Rig::build(ShadowPolicy::Always);
    rig.napi_rounds(LEARN_AFTER);
    // A frame sent while everything is masked: TOK pending, the line down.
    rig.write16(IMR as u64, 0);
    rig.write(MEM_BAR, super::tsd_offset(0), &FRAME_LEN.to_le_bytes());
    assert_eq!(rig.frames(), 1);
    assert!(!rig.nic.irq_asserted());
    // KVM completes the unmask: nothing has changed in the NIC yet.
    rig.unmask().evt.write(1).unwrap();
    assert_eq!(rig.nic_imr(), 0);
    assert!(!rig.nic.irq_asserted(), "no interrupt before it is applied");
    // The driver's next exit (its TOK ack) applies it first, and the ack then
    // lowers the line it raised.
    rig.write16(ISR as u64, INT_TOK);
    assert_eq!(rig.nic_imr(), ALL_CAUSES);
    assert!(!rig.nic.irq_asserted());
    // Without an access, the I/O thread applies it (its eventfd woke it).
    rig.write16(IMR as u64, 0);
    rig.write(MEM_BAR, super::tsd_offset(1), &FRAME_LEN.to_le_bytes());
    rig.unmask().evt.write(2).unwrap();
    rig.unmask().apply(&rig.nic);
    assert_eq!(rig.nic_imr(), ALL_CAUSES);
    assert!(rig.nic.irq_asserted(), "the unmask raised the pending TOK");
    assert_eq!(rig.unmask().absorbed.load(super::Ordering::Relaxed), 3);
}

#[test]
fn a_value_that_does_not_enable_every_cause_is_never_absorbed() {
    let rig = Rig::build(ShadowPolicy::Always);
    // A driver whose unmask leaves out a cause another of its writes enabled.
    rig.write16(IMR as u64, ALL_CAUSES);
    for _ in 0..2 * LEARN_AFTER {
        rig.write16(IMR as u64, 0);
        rig.write16(IMR as u64, NO_RX);
    }
    assert!(rig.io.calls().is_empty());
    // Armed for NO_RX on a fresh chip, a write enabling more disarms it.
    rig.write(MEM_BAR, CR as u64, &[CR_RST]);
    for _ in 0..LEARN_AFTER {
        rig.write16(IMR as u64, 0);
        rig.write16(IMR as u64, NO_RX);
    }
    assert_eq!(rig.io.calls(), [unmask_armed(NO_RX, true)]);
    rig.write16(IMR as u64, ALL_CAUSES);
    assert_eq!(
        rig.io.calls(),
        [unmask_armed(NO_RX, true), unmask_armed(NO_RX, false)]
    );
    assert_eq!(rig.nic_imr(), ALL_CAUSES);
}

#[test]
fn a_reset_applies_a_pending_unmask_disarms_and_learns_afresh() {
    let rig = Rig::build(ShadowPolicy::Always);
    rig.napi_rounds(LEARN_AFTER);
    rig.write16(IMR as u64, NO_RX);
    rig.unmask().evt.write(1).unwrap();
    rig.write(MEM_BAR, CR as u64, &[CR_RST]);
    assert_eq!(
        rig.io.calls(),
        [
            unmask_armed(ALL_CAUSES, true),
            unmask_armed(ALL_CAUSES, false)
        ]
    );
    assert_eq!(rig.unmask().absorbed.load(super::Ordering::Relaxed), 1);
    assert_eq!(rig.nic_imr(), 0, "the reset came after the unmask");
    rig.napi_rounds(LEARN_AFTER - 1);
    assert_eq!(rig.io.calls().len(), 2, "learnt afresh after the reset");
    rig.napi_rounds(1);
    assert_eq!(rig.io.calls().len(), 3);
}

#[test]
fn nothing_is_absorbed_while_the_shadow_is_not_mapped() {
    // shadow=auto in C mode through the port BAR: the page stays unmapped.
    let rig = Rig::build(ShadowPolicy::Auto);
    for _ in 0..2 * LEARN_AFTER {
        rig.write(IO_BAR, IMR as u64, &NO_RX.to_le_bytes());
        rig.write(IO_BAR, IMR as u64, &ALL_CAUSES.to_le_bytes());
    }
    assert!(
        rig.io.calls().iter().all(|c| c.1 != IO_BAR + IMR as u64),
        "{:?}",
        rig.io.calls()
    );
}

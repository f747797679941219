//! The exit dispatch with made-up exits: a scripted vCPU, buses with recording
//! devices, a memslot registry on the fake backend. No /dev/kvm.

use std::collections::VecDeque;
use std::os::fd::FromRawFd;
use std::sync::Mutex;

use super::*;
use crate::memory::{FakeBackend, SlotFlags, SlotIndexKind};
use crate::vcpu::{ExitState, StatsMailbox};
use wbvmm_devices::BusDevice;

/// One made-up exit (or KVM_RUN error) for [`ScriptedVcpu`].
enum Made {
    IoIn(u16, usize),
    IoOut(u16, Vec<u8>),
    MmioRead(u64, usize),
    MmioWrite(u64, Vec<u8>),
    Hlt,
    Intr,
    Shutdown,
    SystemEvent(u32),
    FailEntry(u64),
    InternalError(InternalError),
    Unknown,
    Errno(i32),
}

/// A vCPU that returns the exits it was given, in order.
struct ScriptedVcpu {
    script: VecDeque<Made>,
    /// The exit's data buffer (`data` of `kvm_run.io` / `kvm_run.mmio`).
    buf: [u8; 8],
    out: Vec<u8>,
    rip: u64,
    /// What the emulation fallback answers.
    emulation: Result<Option<u8>, String>,
    emulated: Vec<Vec<u8>>,
    immediate_exit_cleared: u32,
    /// The details of the last internal-error exit.
    internal: Option<InternalError>,
}

impl ScriptedVcpu {
    fn new(script: impl IntoIterator<Item = Made>) -> Self {
        Self {
            script: script.into_iter().collect(),
            buf: [0; 8],
            out: Vec::new(),
            rip: 0xfff0,
            emulation: Ok(None),
            emulated: Vec::new(),
            immediate_exit_cleared: 0,
            internal: None,
        }
    }
}

impl Vcpu for ScriptedVcpu {
    fn run(&mut self) -> Result<VcpuExit<'_>, kvm_ioctls::Error> {
        let next = self
            .script
            .pop_front()
            .expect("the script ran out of exits");
        self.buf = [0; 8];
        Ok(match next {
            Made::IoIn(port, len) => VcpuExit::IoIn(port, &mut self.buf[..len]),
            Made::IoOut(port, data) => {
                self.out = data;
                VcpuExit::IoOut(port, &self.out)
            }
            Made::MmioRead(addr, len) => VcpuExit::MmioRead(addr, &mut self.buf[..len]),
            Made::MmioWrite(addr, data) => {
                self.out = data;
                VcpuExit::MmioWrite(addr, &self.out)
            }
            Made::Hlt => VcpuExit::Hlt,
            Made::Intr => VcpuExit::Intr,
            Made::Shutdown => VcpuExit::Shutdown,
            Made::SystemEvent(e) => VcpuExit::SystemEvent(e, &[]),
            Made::FailEntry(r) => VcpuExit::FailEntry(r, 0),
            Made::InternalError(e) => {
                self.internal = Some(e);
                VcpuExit::InternalError
            }
            Made::Unknown => VcpuExit::Unknown,
            Made::Errno(e) => return Err(kvm_ioctls::Error::new(e)),
        })
    }

    fn clear_immediate_exit(&mut self) {
        self.immediate_exit_cleared += 1;
    }

    fn rip(&self) -> u64 {
        self.rip
    }

    fn cpl(&self) -> u8 {
        3
    }

    fn internal_error(&mut self) -> InternalError {
        self.internal
            .take()
            .expect("internal_error() without an internal-error exit")
    }

    fn emulate(
        &mut self,
        _memory: &SlotRegistry,
        insn: &[u8],
        _stats: &mut EmulationStats,
    ) -> Result<Option<u8>, String> {
        self.emulated.push(insn.to_vec());
        self.emulation.clone()
    }
}

/// One access a [`Recorder`] saw: `'r'` or `'w'`, base, offset, data.
type Access = (char, u64, u64, Vec<u8>);

/// Records every access; reads answer `0x40 + offset`.
struct Recorder {
    name: &'static str,
    log: Mutex<Vec<Access>>,
}

impl Recorder {
    fn new(name: &'static str) -> Arc<Self> {
        Arc::new(Self {
            name,
            log: Mutex::new(Vec::new()),
        })
    }

    fn log(&self) -> Vec<Access> {
        self.log.lock().unwrap().clone()
    }
}

impl BusDevice for Recorder {
    fn read(&self, base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0x40 + offset as u8);
        self.log
            .lock()
            .unwrap()
            .push(('r', base, offset, data.to_vec()));
    }
    fn write(&self, base: u64, offset: u64, data: &[u8]) {
        self.log
            .lock()
            .unwrap()
            .push(('w', base, offset, data.to_vec()));
    }
    fn name(&self) -> &'static str {
        self.name
    }
}

const UART: u64 = 0x3f8;
const NIC_MMIO: u64 = 0xfebf_0000;
const ROM: u64 = 0xffff_0000;

struct World {
    uart: Arc<Recorder>,
    nic: Arc<Recorder>,
    handler: ExitHandler,
}

fn world(coalesced: Option<Arc<CoalescedRing>>) -> World {
    let (uart, nic) = (Recorder::new("test-uart"), Recorder::new("test-nic"));
    let pio = Arc::new(Bus::new());
    pio.insert(uart.clone(), UART, 8).unwrap();
    let mmio = Arc::new(Bus::new());
    mmio.insert(nic.clone(), NIC_MMIO, 0x100).unwrap();
    let memory = Arc::new(SlotRegistry::new(
        FakeBackend::new(8),
        SlotIndexKind::default(),
    ));
    memory.add_ram(0, 0x10_0000, SlotFlags::NONE).unwrap();
    memory.add_ram(ROM, 0x1_0000, SlotFlags::READONLY).unwrap();
    let ctx = VcpuContext {
        mailbox: Arc::new(StatsMailbox::default()),
        coalesced,
        id: 2,
        pio,
        mmio,
        exit: Arc::new(ExitState::default()),
        memory,
        mmio_cache: true,
        debug: None,
    };
    World {
        uart,
        nic,
        handler: ExitHandler::new(&ctx, None),
    }
}

fn key(bus: BusKind, name: &'static str, offset: u64) -> DeviceKey {
    DeviceKey {
        bus,
        device: DeviceId::for_name(name),
        offset,
    }
}

fn run_all(w: &mut World, vcpu: &mut ScriptedVcpu) -> Vec<Action> {
    let mut actions = Vec::new();
    while !vcpu.script.is_empty() {
        actions.push(w.handler.step(vcpu));
    }
    actions
}

#[test]
fn port_io_reaches_the_device_and_is_counted_by_register() {
    let mut w = world(None);
    let mut vcpu = ScriptedVcpu::new([
        Made::IoOut(UART as u16, vec![b'A']),
        Made::IoIn(UART as u16 + 5, 1),
        Made::IoIn(UART as u16 + 5, 1),
    ]);
    assert_eq!(w.handler.step(&mut vcpu), Action::Resume);
    assert_eq!(w.handler.step(&mut vcpu), Action::Resume);
    assert_eq!(
        vcpu.buf[0], 0x45,
        "the device's answer is in the exit's data"
    );
    w.handler.step(&mut vcpu);
    assert_eq!(
        w.uart.log(),
        [
            ('w', UART, 0, vec![b'A']),
            ('r', UART, 5, vec![0x45]),
            ('r', UART, 5, vec![0x45]),
        ]
    );
    let s = w.handler.into_stats(&vcpu);
    assert_eq!(s.exits.get(ExitKind::IoOut), 1);
    assert_eq!(s.exits.get(ExitKind::IoIn), 2);
    assert_eq!(s.by_device.get(&key(BusKind::Pio, "test-uart", 5)), 2);
    assert_eq!(s.by_device.get(&key(BusKind::Pio, "test-uart", 0)), 1);
    assert_eq!(s.latency.get(ExitKind::IoIn).count(), 2);
    assert_eq!(s.latency.get(ExitKind::IoOut).count(), 1);
}

#[test]
fn unclaimed_ports_read_all_ones_and_count_by_port() {
    let mut w = world(None);
    let mut vcpu = ScriptedVcpu::new([Made::IoIn(0x61, 2), Made::IoOut(0x70, vec![1])]);
    w.handler.step(&mut vcpu);
    assert_eq!(vcpu.buf[..2], [0xff, 0xff]);
    w.handler.step(&mut vcpu);
    let s = w.handler.into_stats(&vcpu);
    // Only reads count as unclaimed_pio; both count under the "unclaimed" device by port.
    assert_eq!(s.exits.get(ExitKind::UnclaimedPio), 1);
    assert_eq!(s.by_device.get(&key(BusKind::Pio, "unclaimed", 0x61)), 1);
    assert_eq!(s.by_device.get(&key(BusKind::Pio, "unclaimed", 0x70)), 1);
    assert!(w.uart.log().is_empty());
}

#[test]
fn mmio_goes_through_the_router_to_the_device_or_open_bus() {
    let mut w = world(None);
    let mut vcpu = ScriptedVcpu::new([
        Made::MmioWrite(NIC_MMIO + 0x37, vec![0x0c]),
        Made::MmioRead(NIC_MMIO + 0x3e, 2),
        Made::MmioRead(NIC_MMIO + 0x3e, 2), // a miss-cache hit this time
        Made::MmioRead(0xd000_0000, 4),     // nothing there
        Made::MmioWrite(ROM + 0x10, vec![1, 2, 3, 4]),
        Made::MmioRead(ROM + 0x10, 4), // ROM without a device: open bus
    ]);
    let actions = run_all(&mut w, &mut vcpu);
    assert!(actions.iter().all(|a| *a == Action::Resume), "{actions:?}");
    assert_eq!(vcpu.buf[..4], [0xff; 4], "open bus reads all-ones");
    assert_eq!(
        w.nic.log(),
        [
            ('w', NIC_MMIO, 0x37, vec![0x0c]),
            ('r', NIC_MMIO, 0x3e, vec![0x7e, 0x7e]),
            ('r', NIC_MMIO, 0x3e, vec![0x7e, 0x7e]),
        ]
    );
    let s = w.handler.into_stats(&vcpu);
    assert_eq!(s.exits.get(ExitKind::MmioRead), 4);
    assert_eq!(s.exits.get(ExitKind::MmioWrite), 2);
    assert_eq!(s.by_device.get(&key(BusKind::Mmio, "test-nic", 0x3e)), 2);
    assert_eq!(s.by_device.get(&key(BusKind::Mmio, "test-nic", 0x37)), 1);
    assert_eq!(
        s.by_device.len(),
        2,
        "unmapped and ROM accesses have no device row"
    );
    let m = &s.memory.mmio;
    assert_eq!(
        (m.exits, m.device, m.unmapped_reads, m.readonly_writes),
        (6, 3, 2, 1)
    );
    assert!(s.memory.miss_cache.enabled && s.memory.miss_cache.hits >= 1);
    assert_eq!(s.latency.get(ExitKind::MmioRead).count(), 4);
}

#[test]
fn the_ends_of_the_vm_stop_with_their_outcome() {
    let mut w = world(None);
    let mut vcpu = ScriptedVcpu::new([
        Made::Shutdown,
        Made::SystemEvent(kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN),
        Made::SystemEvent(kvm_bindings::KVM_SYSTEM_EVENT_RESET),
        Made::SystemEvent(99),
        Made::FailEntry(0x21),
        Made::Unknown,
        Made::Errno(libc::EFAULT),
    ]);
    vcpu.rip = 0x1234;
    let actions = run_all(&mut w, &mut vcpu);
    let stop = |o| Action::Stop(o);
    assert_eq!(
        actions[0],
        stop(VmOutcome::TripleFault {
            vcpu: 2,
            rip: 0x1234
        })
    );
    assert_eq!(actions[1], stop(VmOutcome::PowerOff));
    assert_eq!(actions[2], stop(VmOutcome::Reset));
    assert!(
        matches!(&actions[3], Action::Stop(VmOutcome::Unexpected { vcpu: 2, what }) if what == "KVM system event 99"),
        "{:?}",
        actions[3]
    );
    assert_eq!(
        actions[4],
        stop(VmOutcome::FailEntry {
            vcpu: 2,
            reason: 0x21
        })
    );
    assert!(
        matches!(&actions[5], Action::Stop(VmOutcome::Unexpected { what, .. }) if what == "unhandled exit Unknown"),
        "{:?}",
        actions[5]
    );
    assert!(
        matches!(&actions[6], Action::Stop(VmOutcome::Unexpected { what, .. }) if what.starts_with("KVM_RUN failed")),
        "{:?}",
        actions[6]
    );
    let s = w.handler.into_stats(&vcpu);
    assert_eq!(
        s.exits.get(ExitKind::Other),
        1,
        "only the unhandled exit is counted"
    );
    assert_eq!(s.exits.total(), 1);
}

#[test]
fn kicks_and_halts_resume_and_are_counted() {
    let mut w = world(None);
    let mut vcpu = ScriptedVcpu::new([
        Made::Errno(libc::EINTR),
        Made::Errno(libc::EAGAIN),
        Made::Intr,
        Made::Hlt,
    ]);
    let actions = run_all(&mut w, &mut vcpu);
    assert!(actions.iter().all(|a| *a == Action::Resume), "{actions:?}");
    assert_eq!(vcpu.immediate_exit_cleared, 2);
    let s = w.handler.into_stats(&vcpu);
    assert_eq!(s.exits.get(ExitKind::Interrupted), 3);
    assert_eq!(s.exits.get(ExitKind::Hlt), 1);
    assert!(
        s.latency.summary().is_empty(),
        "kicks and halts are not timed"
    );
}

#[test]
fn internal_errors_go_to_the_fallback_and_are_counted() {
    let emulation = |insn: &[u8]| {
        Made::InternalError(InternalError {
            suberror: kvm_bindings::KVM_INTERNAL_ERROR_EMULATION,
            data: vec![7],
            insn: insn.to_vec(),
        })
    };
    let mut w = world(None);
    // Emulated.
    let mut vcpu = ScriptedVcpu::new([emulation(&[0xf3, 0x0f, 0xb8, 0xc0])]);
    assert_eq!(w.handler.step(&mut vcpu), Action::Resume);
    assert_eq!(vcpu.emulated, [vec![0xf3, 0x0f, 0xb8, 0xc0]]);
    // Answered with #BP.
    let mut vcpu = ScriptedVcpu::new([emulation(&[0xcc])]);
    vcpu.emulation = Ok(Some(3));
    assert_eq!(w.handler.step(&mut vcpu), Action::Resume);
    // Beyond the fallback: the VM ends with what KVM and the fallback said.
    let mut vcpu = ScriptedVcpu::new([emulation(&[0x0f, 0xc7, 0x0e])]);
    vcpu.emulation = Err("`cmpxchg16b [rsi]`: not emulated".into());
    vcpu.rip = 0x4000;
    assert_eq!(
        w.handler.step(&mut vcpu),
        Action::Stop(VmOutcome::InternalError {
            vcpu: 2,
            suberror: kvm_bindings::KVM_INTERNAL_ERROR_EMULATION,
            rip: 0x4000,
            cpl: 3,
            insn: vec![0x0f, 0xc7, 0x0e],
            data: vec![7],
            decoded: Some("`cmpxchg16b [rsi]`: not emulated".into()),
        })
    );
    // Other internal errors never reach the fallback.
    let mut vcpu = ScriptedVcpu::new([Made::InternalError(InternalError {
        suberror: 3,
        ..Default::default()
    })]);
    assert!(matches!(
        w.handler.step(&mut vcpu),
        Action::Stop(VmOutcome::InternalError {
            suberror: 3,
            decoded: None,
            ..
        })
    ));
    assert!(vcpu.emulated.is_empty());
    let s = w.handler.into_stats(&vcpu);
    assert_eq!(s.exits.get(ExitKind::InternalError), 4);
    assert_eq!(s.exits.get(ExitKind::Int3Injected), 1);
    assert_eq!(s.latency.get(ExitKind::InternalError).count(), 4);
    assert_eq!(s.latency.get(ExitKind::Other).count(), 0);
}

/// A stand-in for the vCPU fd's coalesced-MMIO page: a memfd whose second page is
/// the ring (`KVM_COALESCED_MMIO_PAGE_OFFSET` is 1 on x86).
fn fake_ring(writes: &[(u64, bool, &[u8])]) -> (std::fs::File, Arc<CoalescedRing>) {
    use std::os::unix::fs::FileExt;
    // SAFETY: memfd_create with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"coalesced-test".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor that we own.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    let page = 4096u64;
    let base = page * u64::from(kvm_bindings::KVM_COALESCED_MMIO_PAGE_OFFSET);
    f.set_len(base + page).unwrap();
    for (i, (addr, pio, data)) in writes.iter().enumerate() {
        let mut e = [0u8; 24]; // struct kvm_coalesced_mmio
        e[..8].copy_from_slice(&addr.to_ne_bytes());
        e[8..12].copy_from_slice(&(data.len() as u32).to_ne_bytes());
        e[12..16].copy_from_slice(&u32::from(*pio).to_ne_bytes());
        e[16..16 + data.len()].copy_from_slice(data);
        f.write_all_at(&e, base + 8 + 24 * i as u64).unwrap();
    }
    f.write_all_at(&(writes.len() as u32).to_ne_bytes(), base + 4)
        .unwrap(); // `last`
    let ring = CoalescedRing::map(&f).unwrap();
    (f, Arc::new(ring))
}

#[test]
fn coalesced_writes_are_replayed_before_the_exit_is_handled() {
    let (_f, ring) = fake_ring(&[(UART, true, b"h"), (NIC_MMIO + 4, false, &[1, 2])]);
    let mut w = world(Some(ring));
    let mut vcpu = ScriptedVcpu::new([Made::IoIn(UART as u16 + 5, 1), Made::IoIn(UART as u16, 1)]);
    w.handler.step(&mut vcpu);
    assert_eq!(
        w.uart.log(),
        [('w', UART, 0, b"h".to_vec()), ('r', UART, 5, vec![0x45])],
        "the queued write first, then the exit"
    );
    assert_eq!(w.nic.log(), [('w', NIC_MMIO, 4, vec![1, 2])]);
    w.handler.step(&mut vcpu);
    assert_eq!(w.uart.log().len(), 3, "replayed once only");
}

#[test]
fn snapshots_copy_the_counters_and_leave_them_running() {
    let mut w = world(None);
    let mut vcpu = ScriptedVcpu::new([Made::MmioRead(NIC_MMIO, 4), Made::MmioRead(NIC_MMIO, 4)]);
    w.handler.step(&mut vcpu);
    let mailbox = StatsMailbox::default();
    let mut answered = 0;
    mailbox.answer(2, &mut answered, || panic!("nothing was asked"));
    mailbox
        .request
        .store(1, std::sync::atomic::Ordering::SeqCst);
    vcpu.rip = 0x1234;
    mailbox.answer(2, &mut answered, || w.handler.snapshot(&vcpu));
    w.handler.step(&mut vcpu);
    let slots = mailbox.slots.lock().unwrap();
    let (req, snap) = &slots[&2];
    assert_eq!((*req, answered), (1, 1));
    assert_eq!(snap.exits.get(ExitKind::MmioRead), 1);
    assert_eq!(
        snap.positions,
        [VcpuPosition {
            id: 2,
            rip: 0x1234,
            cpl: 3
        }],
        "where the vCPU was when it answered"
    );
    assert_eq!(
        snap.memory.mmio.exits, 1,
        "the router's counters are in the copy"
    );
    assert_eq!(w.handler.into_stats(&vcpu).exits.get(ExitKind::MmioRead), 2);
}

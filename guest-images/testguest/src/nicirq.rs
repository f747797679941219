//! The NIC's real INTx interrupt, for `nicdrv=linux-irq`: the route from the
//! MP table (or the PCI interrupt line), the IOAPIC redirection entry, the
//! local APIC, the IDT gate, and the minimal CPL0 handler.
//!
//! The handler is assembly, not Rust: it interrupts CPL3 code anywhere, and
//! Rust code may use SSE registers the interrupted code owns (saving them
//! would cost an emulated `fxsave` per interrupt). It does what 8139too's and
//! 8139cp's handlers do before NAPI takes over: read IntrStatus, ack
//! (write-1-to-clear) everything but the RX bits, and on RX, if no poll is
//! scheduled yet, mask RX in IntrMask (with the drivers' flushing read-back)
//! and schedule the poll. It records the status for the CPL3 side, EOIs the
//! local APIC and returns. Everything else (RX, TX completion, the RX ack,
//! the unmask) is the CPL3 poll's, in `rtl8139`.
//!
//! On PVM hosts the handler runs in KVM's instruction emulator (tens of µs);
//! CPL3 waits for it without exits, spinning on `IrqShared::napi` and
//! `IrqShared::pending` in memory.

use crate::rtl8139::Bus;
use crate::{cpu, entry, mptable, pci};
use core::arch::{asm, global_asm};
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{AtomicU64, Ordering};

/// The NIC's vector (any above the 32 exceptions; the PICs stay masked).
pub const NIC_VECTOR: u8 = 0x30;
/// The local APIC's spurious vector (SVR): a gate that only returns.
pub const SPURIOUS_VECTOR: u8 = 0xff;

const IA32_APIC_BASE: u32 = 0x1b;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const LAPIC_ID: u64 = 0x20;
const LAPIC_TPR: u64 = 0x80;
const LAPIC_EOI: u64 = 0xb0;
const LAPIC_SVR: u64 = 0xf0;
const SVR_ENABLE: u32 = 1 << 8;
const IOAPIC_DEFAULT: u64 = 0xfec0_0000;

/// State shared by the CPL0 handler (which addresses the fields by the
/// offsets in its assembly: keep the order) and the CPL3 driver.
#[repr(C)]
pub struct IrqShared {
    /// +0: I/O port base of BAR0 (when `mmio_base` is 0).
    pio_base: AtomicU64,
    /// +8: MMIO base of BAR1, or 0 for port I/O.
    mmio_base: AtomicU64,
    /// +16: address of the local APIC's EOI register.
    lapic_eoi: AtomicU64,
    /// +24: IntrStatus bits the handler acks (all but the RX ones).
    ack_mask: AtomicU64,
    /// +32: the RX bits, which schedule the poll.
    rx_bits: AtomicU64,
    /// +40: IntrMask while the poll runs (the drivers' no-RX mask).
    norx_mask: AtomicU64,
    /// +48: IntrStatus bits seen by the handler, OR-ed; the CPL3 side takes
    /// them with an atomic swap (one instruction: no interrupt in between).
    pub pending: AtomicU64,
    /// +56: 1 from the handler's RX mask (napi_schedule) until the poll's
    /// unmask (napi_complete).
    pub napi: AtomicU64,
    /// +64: interrupts taken on `NIC_VECTOR`.
    pub taken: AtomicU64,
    /// +72, +80: the handler's register reads and writes.
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    /// +88: spurious-vector entries.
    pub spurious: AtomicU64,
    /// +96: interrupts that found IntrStatus 0 (nothing to do: delivered again
    /// after the work was acked, or shared).
    pub idle: AtomicU64,
}

#[no_mangle]
pub static NIC_IRQ_STATE: IrqShared = IrqShared {
    pio_base: AtomicU64::new(0),
    mmio_base: AtomicU64::new(0),
    lapic_eoi: AtomicU64::new(0),
    ack_mask: AtomicU64::new(0),
    rx_bits: AtomicU64::new(0),
    norx_mask: AtomicU64::new(0),
    pending: AtomicU64::new(0),
    napi: AtomicU64::new(0),
    taken: AtomicU64::new(0),
    reads: AtomicU64::new(0),
    writes: AtomicU64::new(0),
    spurious: AtomicU64::new(0),
    idle: AtomicU64::new(0),
};

pub fn shared() -> &'static IrqShared {
    &NIC_IRQ_STATE
}

extern "C" {
    static nic_irq_entry: u8;
    static spurious_irq_entry: u8;
}

// The handler. Interrupt gate: IF is clear, on the kernel stack (TSS.RSP0).
// RSI = MMIO base (0: port I/O), DX = port base, EDI = the status read.
global_asm!(
    r#"
    .section .text.isr, "ax"
    .code64
    .global nic_irq_entry, spurious_irq_entry
nic_irq_entry:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    incq NIC_IRQ_STATE+64
    mov NIC_IRQ_STATE+8, %rsi
    mov NIC_IRQ_STATE+0, %edx
    mov $0x3e, %ecx                 # IntrStatus
    call nic_irq_r16
    mov %eax, %edi
    test %edi, %edi
    jz 8f                           # nothing pending
    cmp $0xffff, %edi
    je 9f                           # chip gone
    or %rdi, NIC_IRQ_STATE+48
    mov %edi, %eax
    and NIC_IRQ_STATE+24, %eax
    jz 1f
    mov $0x3e, %ecx                 # ack all but RX
    call nic_irq_w16
1:
    test NIC_IRQ_STATE+32, %edi
    jz 9f
    cmpq $0, NIC_IRQ_STATE+56
    jne 9f                          # poll already scheduled
    movq $1, NIC_IRQ_STATE+56
    mov NIC_IRQ_STATE+40, %eax
    mov $0x3c, %ecx                 # IntrMask = no-RX mask
    call nic_irq_w16
    call nic_irq_r16                # flushing read-back
    jmp 9f
8:
    incq NIC_IRQ_STATE+96
9:
    mov NIC_IRQ_STATE+16, %rax
    movl $0, (%rax)                 # local APIC EOI
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    iretq

    # EAX = 16-bit register at offset ECX.
nic_irq_r16:
    incq NIC_IRQ_STATE+72
    test %rsi, %rsi
    jz 1f
    movzwl (%rsi,%rcx), %eax
    ret
1:
    push %rdx
    add %cx, %dx
    in %dx, %ax
    pop %rdx
    movzwl %ax, %eax
    ret

    # 16-bit register at offset ECX = AX.
nic_irq_w16:
    incq NIC_IRQ_STATE+80
    test %rsi, %rsi
    jz 1f
    mov %ax, (%rsi,%rcx)
    ret
1:
    push %rdx
    add %cx, %dx
    out %ax, %dx
    pop %rdx
    ret

spurious_irq_entry:
    incq NIC_IRQ_STATE+88
    iretq
    "#,
    options(att_syntax)
);

/// Where the NIC's INTx arrives, and how the redirection entry must say it.
#[derive(Clone, Copy)]
pub struct Route {
    pub ioapic: u64,
    pub pin: u8,
    pub level: bool,
    pub active_low: bool,
    /// Where the route came from (for the `net:` line).
    pub source: &'static str,
}

/// The NIC's INTx route: the MP table's I/O interrupt entry for its slot and
/// pin (wbvmm: IOAPIC pin 16, level, active low), else the PCI interrupt line
/// the firmware programmed (qboot on QEMU's i440fx: ISA IRQ 10 or 11 through
/// the PIIX's PIRQ routing, which reaches the same-numbered IOAPIC pin; level
/// as qboot's ELCR says, active high as the ISA side is).
pub fn route(bdf: pci::Bdf) -> Option<Route> {
    let int_pin = ((bdf.read32(0x3c) >> 8) & 0xff) as u8;
    if !(1..=4).contains(&int_pin) {
        return None;
    }
    if let Some(r) = mptable::pci_intx(bdf.bus, bdf.dev, int_pin) {
        // MPS 1.4 flags: polarity bits 1:0 and trigger bits 3:2, 0 = conforms
        // to the bus (PCI: level, active low).
        let (pol, trig) = (r.flags & 3, (r.flags >> 2) & 3);
        return Some(Route {
            ioapic: r.ioapic,
            pin: r.pin,
            level: trig != 1,
            active_low: pol != 1,
            source: "mp table",
        });
    }
    let line = (bdf.read32(0x3c) & 0xff) as u8;
    if line == 0 || line >= 16 {
        return None;
    }
    Some(Route {
        ioapic: mptable::first_ioapic().unwrap_or(IOAPIC_DEFAULT),
        pin: line,
        level: true,
        active_low: false,
        source: "pci interrupt line",
    })
}

/// The driver's masks for the handler.
pub struct Masks {
    pub ack: u16,
    pub rx: u16,
    pub norx: u16,
}

/// What `arm` hands to CPL0.
struct ArmArgs {
    ioapic: u64,
    pin: u32,
    redirection: u32,
    lapic: u64,
}

static mut ARM: ArmArgs = ArmArgs {
    ioapic: 0,
    pin: 0,
    redirection: 0,
    lapic: 0,
};

/// Readies the handler for the NIC on `bus`, then at CPL0: the IDT gates,
/// the local APIC (enabled, TPR 0), the IOAPIC redirection entry (unmasked,
/// to this CPU), and IF set for CPL3 from then on. The NIC's IntrMask is the
/// driver's business (still 0 here). Returns the local APIC's base.
pub fn arm(bus: Bus, masks: Masks, r: &Route) -> u64 {
    let s = shared();
    match bus {
        Bus::Pio(p) => {
            s.pio_base.store(p as u64, Ordering::SeqCst);
            s.mmio_base.store(0, Ordering::SeqCst);
        }
        Bus::Mmio(m) => s.mmio_base.store(m, Ordering::SeqCst),
    }
    s.ack_mask.store(masks.ack as u64, Ordering::SeqCst);
    s.rx_bits.store(masks.rx as u64, Ordering::SeqCst);
    s.norx_mask.store(masks.norx as u64, Ordering::SeqCst);
    reset_flags();
    for c in [&s.taken, &s.reads, &s.writes, &s.spurious, &s.idle] {
        c.store(0, Ordering::SeqCst);
    }
    let redirection = NIC_VECTOR as u32 | (r.active_low as u32) << 13 | (r.level as u32) << 15;
    unsafe {
        let a = &mut *addr_of_mut!(ARM);
        a.ioapic = r.ioapic;
        a.pin = r.pin as u32;
        a.redirection = redirection;
        entry::cpl0_run(arm_at_cpl0, 0);
        (*addr_of!(ARM)).lapic
    }
}

/// Forgets a poll and events of an earlier bring-up (the chip was reset).
pub fn reset_flags() {
    let s = shared();
    s.pending.store(0, Ordering::SeqCst);
    s.napi.store(0, Ordering::SeqCst);
}

fn mmio_w32(addr: u64, v: u32) {
    unsafe { write_volatile(addr as *mut u32, v) }
}

fn mmio_r32(addr: u64) -> u32 {
    unsafe { read_volatile(addr as *const u32) }
}

/// At CPL0 (`cpl0_run`): a few dozen emulated instructions, no loops.
extern "C" fn arm_at_cpl0(_: u64) -> u64 {
    unsafe {
        cpu::set_interrupt_gate(NIC_VECTOR, addr_of!(nic_irq_entry) as u64);
        cpu::set_interrupt_gate(SPURIOUS_VECTOR, addr_of!(spurious_irq_entry) as u64);
        let (lo, hi): (u32, u32);
        asm!("rdmsr", in("ecx") IA32_APIC_BASE, out("eax") lo, out("edx") hi, options(nomem, nostack));
        let msr = (hi as u64) << 32 | lo as u64;
        if msr & APIC_BASE_ENABLE == 0 {
            let v = msr | APIC_BASE_ENABLE;
            asm!("wrmsr", in("ecx") IA32_APIC_BASE, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nomem, nostack));
        }
        let lapic = msr & 0x000f_ffff_ffff_f000;
        mmio_w32(lapic + LAPIC_TPR, 0);
        mmio_w32(lapic + LAPIC_SVR, SVR_ENABLE | SPURIOUS_VECTOR as u32);
        let apic_id = mmio_r32(lapic + LAPIC_ID) >> 24;
        NIC_IRQ_STATE
            .lapic_eoi
            .store(lapic + LAPIC_EOI, Ordering::SeqCst);
        let a = &mut *addr_of_mut!(ARM);
        a.lapic = lapic;
        let (pin, low) = (a.pin, a.redirection);
        // IOREGSEL at +0, IOWIN at +0x10; entry `pin` is registers
        // 0x10 + 2 pin (low) and + 1 (high: destination APIC id). High first,
        // so the entry is never unmasked towards a stale destination.
        mmio_w32(a.ioapic, 0x10 + 2 * pin + 1);
        mmio_w32(a.ioapic + 0x10, apic_id << 24);
        mmio_w32(a.ioapic, 0x10 + 2 * pin);
        mmio_w32(a.ioapic + 0x10, low);
        // Interrupts on at CPL3 from now on (iretq restores this RFLAGS).
        let ret = &mut *addr_of_mut!(entry::cpl0_run_return);
        ret[2] |= 1 << 9;
    }
    0
}

/// After a net word: no more NIC interrupts, so the count printed is final
/// (a test compares it with the VMM's EOI count). IntrMask = 0 (the chip
/// stops asserting), the IOAPIC entry masked (a raise in flight stays
/// there), then, bounded, until the local APIC holds the vector neither
/// requested nor in service (one already accepted is taken, at CPL3, first).
/// Prints `net: intx quiesced: irqs=N spurious=S idle=I`.
pub fn quiesce() {
    let s = shared();
    let a = unsafe { &mut *addr_of_mut!(ARM) };
    if a.lapic == 0 {
        return; // not armed
    }
    let mmio = s.mmio_base.load(Ordering::SeqCst);
    if mmio != 0 {
        unsafe { write_volatile((mmio + 0x3c) as *mut u16, 0) };
    } else {
        crate::io::outw(s.pio_base.load(Ordering::SeqCst) as u16 + 0x3c, 0);
    }
    s.writes.fetch_add(1, Ordering::SeqCst);
    mmio_w32(a.ioapic, 0x10 + 2 * a.pin);
    mmio_w32(a.ioapic + 0x10, a.redirection | 1 << 16);
    // IRR at +0x200 and ISR at +0x100, 32 vectors per 16-byte register.
    let (reg, bit) = (0x10 * (NIC_VECTOR as u64 / 32), 1u32 << (NIC_VECTOR % 32));
    let deadline = crate::tsc::Deadline::after_ns(100_000_000);
    while (mmio_r32(a.lapic + 0x200 + reg) | mmio_r32(a.lapic + 0x100 + reg)) & bit != 0 {
        if deadline.expired() {
            crate::println!("net: intx quiesce: vector 0x{:x} still pending", NIC_VECTOR);
            break;
        }
    }
    a.lapic = 0;
    crate::println!(
        "net: intx quiesced: irqs={} spurious={} idle={}",
        s.taken.load(Ordering::SeqCst),
        s.spurious.load(Ordering::SeqCst),
        s.idle.load(Ordering::SeqCst)
    );
}

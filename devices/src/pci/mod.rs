//! PCI: configuration mechanism #1 (ports 0xCF8-0xCFF), a host bridge at 00:00.0,
//! and the type-0 configuration header of every device behind it.
//!
//! The [`PciRoot`] owns each function's standard header (IDs, command, BARs,
//! interrupt line/pin) so a device model only describes itself through
//! [`PciDevice`]. The root holds `Arc`s to the PIO and MMIO [`Bus`]es and keeps each
//! BAR's bus range in step with what the guest programs: moving a BAR relocates the
//! range (the bus bumps its generation, so the VMM's MMIO-miss cache follows),
//! clearing the command register's I/O or memory enable removes it, setting it again
//! re-inserts it.
//!
//! Only bus 0, function 0 of each device number exist; everything else reads as
//! all-ones (no device), the way a real host bridge answers an unclaimed config cycle.

use std::sync::{Arc, Mutex};

use thiserror::Error;

use crate::bus::{Bus, BusDevice, BusError};

/// Command register bits.
pub const PCI_COMMAND_IO: u16 = 1 << 0;
pub const PCI_COMMAND_MEMORY: u16 = 1 << 1;
pub const PCI_COMMAND_MASTER: u16 = 1 << 2;
pub const PCI_COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Command bits a guest may change: I/O, memory, bus master, MWI, parity response,
/// SERR, INTx disable. The rest are hardwired to 0 for our devices.
const COMMAND_WRITABLE: u16 = 0x0001 | 0x0002 | 0x0004 | 0x0010 | 0x0040 | 0x0100 | 0x0400;

/// Interrupt pin values for the config header (0x3D).
pub const PCI_INTERRUPT_PIN_NONE: u8 = 0;
pub const PCI_INTERRUPT_PIN_INTA: u8 = 1;

/// Number of device numbers on bus 0.
pub const PCI_SLOTS: usize = 32;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PciError {
    #[error("PCI device number {0} is out of range (0-31) or already in use")]
    SlotUnavailable(u8),
    #[error("no free PCI device number left on bus 0")]
    NoFreeSlot,
    #[error("PCI BAR {index}: size {size:#x} is not a power of two >= {min:#x}")]
    BadBarSize { index: u8, size: u64, min: u64 },
    #[error("PCI BAR {index}: initial address {addr:#x} is not aligned to its size {size:#x}")]
    MisalignedBar { index: u8, addr: u64, size: u64 },
    #[error("PCI BAR {index}: index must be 0-5 and unique")]
    BadBarIndex { index: u8 },
    #[error("PCI device needs {expected} initial BAR addresses, got {got}")]
    BarCount { expected: usize, got: usize },
    #[error("cannot map PCI BAR {index} at {addr:#x}")]
    Map {
        index: u8,
        addr: u64,
        #[source]
        source: BusError,
    },
}

/// What a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// Port I/O (BAR bit 0 = 1); lives on the PIO bus.
    Io,
    /// 32-bit non-prefetchable memory; lives on the MMIO bus.
    Mem32,
}

/// A BAR as the device describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarSpec {
    /// BAR register index, 0-5 (config offset 0x10 + 4 * index).
    pub index: u8,
    pub kind: BarKind,
    /// Power of two; at least 4 for I/O, 16 for memory.
    pub size: u64,
}

/// The read-only identity of a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Class code, sub-class, programming interface: 0xCCSSPP.
    pub class: u32,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

/// A device model behind the PCI root.
///
/// The root calls these from the vCPU thread that performed the config access; the
/// device synchronises itself (methods take `&self`).
pub trait PciDevice: Send + Sync {
    fn ids(&self) -> PciIds;
    fn bars(&self) -> Vec<BarSpec>;
    /// [`PCI_INTERRUPT_PIN_INTA`] or [`PCI_INTERRUPT_PIN_NONE`].
    fn interrupt_pin(&self) -> u8 {
        PCI_INTERRUPT_PIN_NONE
    }
    /// Called with the new command register whenever it is written (and once at
    /// insertion), so the device can honour bus-master enable and INTx disable.
    fn command_written(&self, _command: u16) {}
    /// Device-specific config space (offsets 0x40-0xFF), dword-aligned `offset`.
    fn config_read_ext(&self, _offset: u8) -> u32 {
        0
    }
    /// Device-specific config space write; `data` is 1, 2 or 4 bytes at `offset`.
    fn config_write_ext(&self, _offset: u8, _data: &[u8]) {}
    /// Called (outside the root's lock) after a config write moved, mapped or
    /// unmapped any of the device's BARs, so whatever lives at a BAR's address
    /// outside the bus (a KVM ioeventfd on a doorbell register) can follow at once.
    fn bars_moved(&self) {}
}

/// Where a device ended up, for the VMM's MP table / ACPI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciSlotInfo {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
    /// 1 = INTA#, 0 = none.
    pub pin: u8,
    /// The IRQ written into the interrupt line register (what the VMM routes the pin to).
    pub irq: u8,
}

impl PciSlotInfo {
    /// The MP table "source bus IRQ" field for a PCI interrupt: device << 2 | (pin - 1).
    pub fn mp_source_bus_irq(&self) -> Option<u8> {
        (self.pin != 0).then(|| (self.device << 2) | (self.pin - 1))
    }
}

/// Placement of a device added to the root.
#[derive(Debug, Clone, Default)]
pub struct PciPlacement {
    /// Device number on bus 0; `None` takes the lowest free one (from 1).
    pub device: Option<u8>,
    /// IRQ for the interrupt line register (what the VMM wires INTx to).
    pub irq: u8,
    /// Initial BAR addresses, one per entry of `PciDevice::bars()`, in that order —
    /// what a BIOS would have programmed, since Linux keeps firmware assignments.
    pub bar_addresses: Vec<u64>,
}

struct BarState {
    spec: BarSpec,
    /// The address the guest programmed (aligned).
    addr: u64,
    /// Where the range is currently inserted on its bus, if anywhere.
    mapped_at: Option<u64>,
}

struct Function {
    ids: PciIds,
    class_bridge: bool,
    command: u16,
    cache_line: u8,
    latency: u8,
    irq_line: u8,
    pin: u8,
    bars: Vec<BarState>,
    dev: Option<Arc<dyn PciDevice>>,
    bus_dev: Option<Arc<dyn BusDevice>>,
}

struct RootState {
    /// CONFIG_ADDRESS (0xCF8).
    address: u32,
    slots: Vec<Option<Function>>,
}

/// The PCI host: the config mechanism #1 ports and the functions on bus 0.
///
/// Insert it on the PIO bus at [`PciRoot::CONFIG_PORT`] with length
/// [`PciRoot::CONFIG_LEN`].
pub struct PciRoot {
    state: Mutex<RootState>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
}

impl PciRoot {
    pub const CONFIG_PORT: u64 = 0xCF8;
    pub const CONFIG_LEN: u64 = 8;

    /// A root with an Intel 440FX-style host bridge at 00:00.0.
    pub fn new(pio: Arc<Bus>, mmio: Arc<Bus>) -> Self {
        let mut slots: Vec<Option<Function>> = (0..PCI_SLOTS).map(|_| None).collect();
        slots[0] = Some(Function {
            ids: PciIds {
                vendor: 0x8086,
                device: 0x1237,
                revision: 0x02,
                class: 0x060000,
                subsystem_vendor: 0,
                subsystem: 0,
            },
            class_bridge: true,
            command: PCI_COMMAND_IO | PCI_COMMAND_MEMORY,
            cache_line: 0,
            latency: 0,
            irq_line: 0,
            pin: 0,
            bars: Vec::new(),
            dev: None,
            bus_dev: None,
        });
        Self {
            state: Mutex::new(RootState { address: 0, slots }),
            pio,
            mmio,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RootState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Add a device: validates its BARs, maps them at `placement.bar_addresses` on
    /// the PIO/MMIO buses, and starts with I/O + memory decoding enabled (as a BIOS
    /// leaves it; bus mastering stays off until the driver sets it).
    pub fn add_device<D>(
        &self,
        dev: Arc<D>,
        placement: PciPlacement,
    ) -> Result<PciSlotInfo, PciError>
    where
        D: PciDevice + BusDevice + 'static,
    {
        let specs = dev.bars();
        if specs.len() != placement.bar_addresses.len() {
            return Err(PciError::BarCount {
                expected: specs.len(),
                got: placement.bar_addresses.len(),
            });
        }
        let mut seen = [false; 6];
        let mut bars = Vec::with_capacity(specs.len());
        for (spec, &addr) in specs.iter().zip(&placement.bar_addresses) {
            let i = spec.index as usize;
            if i >= 6 || seen[i] {
                return Err(PciError::BadBarIndex { index: spec.index });
            }
            seen[i] = true;
            let min = match spec.kind {
                BarKind::Io => 4,
                BarKind::Mem32 => 16,
            };
            if !spec.size.is_power_of_two() || spec.size < min || spec.size > 1 << 31 {
                return Err(PciError::BadBarSize {
                    index: spec.index,
                    size: spec.size,
                    min,
                });
            }
            if addr & (spec.size - 1) != 0 || addr > u32::MAX as u64 {
                return Err(PciError::MisalignedBar {
                    index: spec.index,
                    addr,
                    size: spec.size,
                });
            }
            bars.push(BarState {
                spec: *spec,
                addr,
                mapped_at: None,
            });
        }

        let mut st = self.lock();
        let slot = match placement.device {
            Some(d) => {
                if (d as usize) >= PCI_SLOTS || st.slots[d as usize].is_some() {
                    return Err(PciError::SlotUnavailable(d));
                }
                d as usize
            }
            None => (1..PCI_SLOTS)
                .find(|&d| st.slots[d].is_none())
                .ok_or(PciError::NoFreeSlot)?,
        };
        let pin = dev.interrupt_pin();
        let command = PCI_COMMAND_IO | PCI_COMMAND_MEMORY;
        let bus_dev: Arc<dyn BusDevice> = dev.clone();
        let mut f = Function {
            ids: dev.ids(),
            class_bridge: false,
            command,
            cache_line: 0,
            latency: 0,
            irq_line: placement.irq,
            pin,
            bars,
            dev: Some(dev.clone()),
            bus_dev: Some(bus_dev.clone()),
        };
        // Map every BAR now; undo on failure so the buses are left as they were.
        for i in 0..f.bars.len() {
            let b = &f.bars[i];
            let bus = self.bus_for(b.spec.kind);
            if let Err(source) = bus.insert(bus_dev.clone(), b.addr, b.spec.size) {
                for b in &f.bars[..i] {
                    if let Some(at) = b.mapped_at {
                        let _ = self.bus_for(b.spec.kind).remove(at);
                    }
                }
                return Err(PciError::Map {
                    index: b.spec.index,
                    addr: b.addr,
                    source,
                });
            }
            f.bars[i].mapped_at = Some(f.bars[i].addr);
        }
        st.slots[slot] = Some(f);
        drop(st);
        dev.command_written(command);
        Ok(PciSlotInfo {
            bus: 0,
            device: slot as u8,
            function: 0,
            pin,
            irq: placement.irq,
        })
    }

    /// Every function on bus 0 (including the host bridge), for the MP table.
    pub fn devices(&self) -> Vec<PciSlotInfo> {
        let st = self.lock();
        st.slots
            .iter()
            .enumerate()
            .filter_map(|(d, f)| {
                f.as_ref().map(|f| PciSlotInfo {
                    bus: 0,
                    device: d as u8,
                    function: 0,
                    pin: f.pin,
                    irq: f.irq_line,
                })
            })
            .collect()
    }

    /// Current BAR address and whether it is mapped, for tests and diagnostics.
    pub fn bar_mapping(&self, device: u8, index: u8) -> Option<(u64, Option<u64>)> {
        let st = self.lock();
        let f = st.slots.get(device as usize)?.as_ref()?;
        f.bars
            .iter()
            .find(|b| b.spec.index == index)
            .map(|b| (b.addr, b.mapped_at))
    }

    fn bus_for(&self, kind: BarKind) -> &Bus {
        match kind {
            BarKind::Io => &self.pio,
            BarKind::Mem32 => &self.mmio,
        }
    }

    /// Read a config dword of device `dev` at dword-aligned `reg`.
    pub fn config_read(&self, dev: u8, reg: u8) -> u32 {
        let st = self.lock();
        Self::read_dword(&st, dev, reg)
    }

    fn read_dword(st: &RootState, dev: u8, reg: u8) -> u32 {
        let Some(Some(f)) = st.slots.get(dev as usize) else {
            return 0xFFFF_FFFF;
        };
        let reg = reg & 0xFC;
        match reg {
            0x00 => f.ids.vendor as u32 | (f.ids.device as u32) << 16,
            // Status 0: no capabilities list, no errors recorded.
            0x04 => f.command as u32,
            0x08 => f.ids.revision as u32 | f.ids.class << 8,
            // BIST 0, header type 0 (single function), latency, cache line.
            0x0C => f.cache_line as u32 | (f.latency as u32) << 8,
            0x10..=0x24 => {
                let idx = (reg - 0x10) / 4;
                match f.bars.iter().find(|b| b.spec.index == idx) {
                    Some(b) => match b.spec.kind {
                        BarKind::Io => (b.addr as u32) | 1,
                        BarKind::Mem32 => b.addr as u32,
                    },
                    None => 0,
                }
            }
            0x2C => {
                if f.class_bridge {
                    0
                } else {
                    f.ids.subsystem_vendor as u32 | (f.ids.subsystem as u32) << 16
                }
            }
            0x3C => f.irq_line as u32 | (f.pin as u32) << 8,
            0x40..=0xFC => f.dev.as_ref().map_or(0, |d| d.config_read_ext(reg)),
            _ => 0,
        }
    }

    /// Write 1, 2 or 4 bytes of config space of device `dev` at byte offset `off`.
    pub fn config_write(&self, dev: u8, off: u8, data: &[u8]) {
        let mut notify: Option<(Arc<dyn PciDevice>, u16)> = None;
        let mut moved: Option<Arc<dyn PciDevice>> = None;
        {
            let mut st = self.lock();
            let Some(Some(f)) = st.slots.get_mut(dev as usize) else {
                return;
            };
            if f.class_bridge {
                // The host bridge has nothing a guest may change here.
                return;
            }
            let reg = off & 0xFC;
            let shift = (off & 3) as u32 * 8;
            let mut val = 0u32;
            let mut mask = 0u32;
            for (i, b) in data.iter().enumerate().take(4 - (off & 3) as usize) {
                val |= (*b as u32) << (shift + 8 * i as u32);
                mask |= 0xFF << (shift + 8 * i as u32);
            }
            if reg >= 0x40 {
                if let Some(d) = &f.dev {
                    d.config_write_ext(off, data);
                }
                return;
            }
            let cur = Self::read_dword(&st, dev, reg);
            let merged = (cur & !mask) | (val & mask);
            let Some(Some(f)) = st.slots.get_mut(dev as usize) else {
                return;
            };
            match reg {
                // Low half: command. High half: status, whose error bits are
                // write-1-to-clear and which we never set, so it is ignored.
                0x04 if mask & 0xFFFF != 0 => {
                    let new = (merged as u16) & COMMAND_WRITABLE;
                    if new != f.command {
                        f.command = new;
                        if self.sync_bars(f) {
                            moved = f.dev.clone();
                        }
                    }
                    if let Some(d) = &f.dev {
                        notify = Some((d.clone(), new));
                    }
                }
                0x0C => {
                    f.cache_line = merged as u8;
                    f.latency = (merged >> 8) as u8;
                }
                0x10..=0x24 => {
                    let idx = (reg - 0x10) / 4;
                    if let Some(pos) = f.bars.iter().position(|b| b.spec.index == idx) {
                        let b = &mut f.bars[pos];
                        let low_mask: u32 = match b.spec.kind {
                            BarKind::Io => 0x3,
                            BarKind::Mem32 => 0xF,
                        };
                        // Sizing: the size bits read back as 0, so all-ones yields
                        // the size mask.
                        let addr = merged & !low_mask & !((b.spec.size as u32).wrapping_sub(1));
                        b.addr = addr as u64;
                        if self.sync_bars(f) {
                            moved = f.dev.clone();
                        }
                    }
                }
                0x3C => {
                    // Interrupt line is plain storage for the OS; the pin is RO.
                    f.irq_line = merged as u8;
                }
                _ => {}
            }
        }
        if let Some((d, cmd)) = notify {
            d.command_written(cmd);
        }
        if let Some(d) = moved {
            d.bars_moved();
        }
    }

    /// Bring every BAR's bus mapping in line with its address and the command
    /// register's decode enables. True if any mapping changed.
    fn sync_bars(&self, f: &mut Function) -> bool {
        let Some(bus_dev) = f.bus_dev.clone() else {
            return false;
        };
        let mut changed = false;
        for b in &mut f.bars {
            let enabled = match b.spec.kind {
                BarKind::Io => f.command & PCI_COMMAND_IO != 0,
                BarKind::Mem32 => f.command & PCI_COMMAND_MEMORY != 0,
            };
            // x86 port space is 64 KiB: an I/O BAR beyond it (e.g. all-ones while
            // being sized) decodes nothing a CPU can reach. Address 0 is "unassigned".
            let reachable = match b.spec.kind {
                BarKind::Io => b.addr != 0 && b.addr + b.spec.size <= 0x1_0000,
                BarKind::Mem32 => b.addr != 0,
            };
            let want = (enabled && reachable).then_some(b.addr);
            if want == b.mapped_at {
                continue;
            }
            changed = true;
            let bus = match b.spec.kind {
                BarKind::Io => &self.pio,
                BarKind::Mem32 => &self.mmio,
            };
            b.mapped_at = match (b.mapped_at, want) {
                (Some(old), Some(new)) => match bus.relocate(old, new) {
                    Ok(()) => Some(new),
                    Err(e) => {
                        // A conflicting placement (e.g. mid-sizing): stop decoding
                        // rather than shadow another device.
                        log::warn!("PCI BAR {} move {old:#x} -> {new:#x}: {e}", b.spec.index);
                        let _ = bus.remove(old);
                        None
                    }
                },
                (Some(old), None) => {
                    let _ = bus.remove(old);
                    None
                }
                (None, Some(new)) => match bus.insert(bus_dev.clone(), new, b.spec.size) {
                    Ok(()) => Some(new),
                    Err(e) => {
                        log::warn!("PCI BAR {} map at {new:#x}: {e}", b.spec.index);
                        None
                    }
                },
                (None, None) => None,
            };
        }
        changed
    }

    fn decode_address(address: u32) -> Option<(u8, u8)> {
        if address & 0x8000_0000 == 0 {
            return None;
        }
        let bus = (address >> 16) & 0xFF;
        let dev = ((address >> 11) & 0x1F) as u8;
        let func = (address >> 8) & 0x7;
        if bus != 0 || func != 0 {
            return None;
        }
        Some((dev, (address & 0xFC) as u8))
    }
}

impl BusDevice for PciRoot {
    fn name(&self) -> &'static str {
        "pci-config"
    }
    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
        let st = self.lock();
        match offset {
            0..=3 => {
                // CONFIG_ADDRESS is a dword register; narrower accesses hit other
                // chipset ports (e.g. 0xCF9 reset control) we do not model.
                if offset == 0 && data.len() == 4 {
                    data.copy_from_slice(&st.address.to_le_bytes());
                } else {
                    data.fill(0xFF);
                }
            }
            4..=7 => {
                let byte = (offset - 4) as usize;
                let val = match Self::decode_address(st.address) {
                    Some((dev, reg)) => Self::read_dword(&st, dev, reg),
                    None => 0xFFFF_FFFF,
                };
                let bytes = val.to_le_bytes();
                for (i, d) in data.iter_mut().enumerate() {
                    *d = bytes.get(byte + i).copied().unwrap_or(0xFF);
                }
            }
            _ => data.fill(0xFF),
        }
    }

    fn write(&self, _base: u64, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                // Bits 30:24 are reserved, 1:0 must read as 0.
                self.lock().address = v & 0x80FF_FFFC;
            }
            4..=7 => {
                let address = self.lock().address;
                if let Some((dev, reg)) = Self::decode_address(address) {
                    let byte = (offset - 4) as usize;
                    let n = data.len().min(4 - byte);
                    self.config_write(dev, reg + byte as u8, &data[..n]);
                }
            }
            _ => {}
        }
    }
}

#[doc(hidden)]
pub mod fuzzing;
#[doc(hidden)]
pub mod fuzzing_config;
#[cfg(test)]
mod tests;

//! PVH `hvm_start_info`: command line and memory map.
//!
//! Both are copied into the guest's own .bss before any command runs, so
//! `memcheck` may overwrite whatever RAM the loader put them in.

/// `hvm_start_info.magic` ("xEn3" with the high bit of the 'x' cleared).
pub const START_INFO_MAGIC: u32 = 0x336e_c578;

pub const MAX_CMDLINE: usize = 4096;
pub const MAX_MEMMAP: usize = 128;

/// E820-style type of usable RAM in the PVH memory map.
pub const MEMMAP_RAM: u32 = 1;

#[derive(Clone, Copy, Debug, Default)]
pub struct MemRange {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

pub struct BootInfo {
    pub start_info: u64,
    pub magic_ok: bool,
    pub version: u32,
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    pub cmdline_truncated: bool,
    memmap: [MemRange; MAX_MEMMAP],
    memmap_len: usize,
    /// The memory map had more entries than fit (the rest are ignored).
    pub memmap_truncated: bool,
    /// The start info carries a memory map (version >= 1 and entries > 0).
    pub has_memmap: bool,
}

/// `hvm_start_info` layout (version 1).
#[repr(C)]
struct StartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

#[repr(C)]
struct MemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    reserved: u32,
}

static BOOT_INFO: crate::Global<BootInfo> = crate::Global::new(BootInfo {
    start_info: 0,
    magic_ok: false,
    version: 0,
    cmdline: [0; MAX_CMDLINE],
    cmdline_len: 0,
    cmdline_truncated: false,
    memmap: [MemRange {
        addr: 0,
        size: 0,
        kind: 0,
    }; MAX_MEMMAP],
    memmap_len: 0,
    memmap_truncated: false,
    has_memmap: false,
});

impl BootInfo {
    /// Reads and copies the start info at physical (= identity-mapped
    /// virtual) address `start_info`. Call once.
    pub fn read(start_info: u64) -> &'static BootInfo {
        // SAFETY: called once, before anything else reads BOOT_INFO.
        let bi = unsafe { &mut *BOOT_INFO.get() };
        bi.start_info = start_info;
        if start_info == 0 || start_info >= 1 << 32 {
            return bi;
        }
        let si = unsafe { core::ptr::read_volatile(start_info as *const StartInfo) };
        if si.magic != START_INFO_MAGIC {
            crate::println!(
                "testguest: bad hvm_start_info magic 0x{:x} at 0x{:x}",
                si.magic,
                start_info
            );
            return bi;
        }
        bi.magic_ok = true;
        bi.version = si.version;

        if si.cmdline_paddr != 0 && si.cmdline_paddr < 1 << 32 {
            let mut n = 0;
            while n < MAX_CMDLINE {
                let b =
                    unsafe { core::ptr::read_volatile((si.cmdline_paddr + n as u64) as *const u8) };
                if b == 0 {
                    break;
                }
                bi.cmdline[n] = b;
                n += 1;
            }
            bi.cmdline_truncated = n == MAX_CMDLINE;
            bi.cmdline_len = n;
        }

        if si.version >= 1 && si.memmap_paddr != 0 && si.memmap_entries > 0 {
            bi.has_memmap = true;
            let n = (si.memmap_entries as usize).min(MAX_MEMMAP);
            bi.memmap_truncated = si.memmap_entries as usize > MAX_MEMMAP;
            for i in 0..n {
                let p = (si.memmap_paddr + (i * core::mem::size_of::<MemmapEntry>()) as u64)
                    as *const MemmapEntry;
                let e = unsafe { core::ptr::read_volatile(p) };
                bi.memmap[i] = MemRange {
                    addr: e.addr,
                    size: e.size,
                    kind: e.kind,
                };
            }
            bi.memmap_len = n;
        }
        bi
    }

    /// The command line as text (non-UTF-8 bytes make the whole line empty).
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }

    pub fn memmap(&self) -> &[MemRange] {
        &self.memmap[..self.memmap_len]
    }

    /// Total RAM in the memory map, in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.memmap()
            .iter()
            .filter(|r| r.kind == MEMMAP_RAM)
            .map(|r| r.size)
            .sum()
    }
}

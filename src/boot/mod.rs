//! Loading a kernel and writing what its entry protocol expects: bzImage through the
//! 64-bit Linux boot protocol, an ELF64 vmlinux through its 64-bit entry, or PVH when
//! the ELF carries a PVH entry note. A 32-bit ELF (EM_386) boots only through PVH:
//! wbvmm loads its segments itself ([`elf`]); linux-loader handles ELF64 only.

pub mod elf;
pub mod mptable;
pub mod regs;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader, PvhBootCapability};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::*;

#[derive(Debug, Error)]
pub enum BootError {
    #[error("cannot open kernel {path}; check the path given to --kernel")]
    KernelOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read kernel {path}")]
    KernelRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a kernel wbvmm can boot: expected an x86_64 bzImage, an ELF64 vmlinux/PVH image, or a 32-bit ELF with a PVH entry note")]
    NotAKernel { path: PathBuf },
    #[error("bzImage {path} has no 64-bit entry point (boot protocol {version:#x}, xloadflags {xloadflags:#x}); use a 64-bit kernel built with boot protocol >= 2.12")]
    NoLongModeEntry {
        path: PathBuf,
        version: u16,
        xloadflags: u16,
    },
    #[error("loading kernel {path} failed{hint}", hint = load_hint(.source))]
    Load {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("ELF kernel {path} cannot be loaded")]
    Elf {
        path: PathBuf,
        #[source]
        source: elf::ElfError,
    },
    #[error("{path} is a 32-bit ELF without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY, type 18, owner \"Xen\", in a PT_NOTE segment); wbvmm boots 32-bit kernels only through PVH: add the note holding the 32-bit physical entry address, or boot a 64-bit kernel")]
    Elf32WithoutPvhNote { path: PathBuf },
    #[error(
        "kernel command line is {len} bytes; the limit is {max} including the terminating NUL"
    )]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line is invalid")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("writing the kernel command line into guest memory at {addr:#x} failed{hint}", addr = CMDLINE_START, hint = load_hint(.0))]
    CmdlineWrite(#[source] linux_loader::loader::Error),
    #[error("cannot open initramfs {path}; check the path given to --initramfs")]
    InitramfsOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initramfs {path} ({size} bytes) does not fit between the kernel (ends at {kernel_end:#x}) and {limit:#x}; give the guest more --memory")]
    InitramfsTooLarge {
        path: PathBuf,
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("writing boot structures into guest memory failed")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
}

/// The memory hint for the linux-loader errors that mean the image (or the command
/// line) does not fit in guest memory; nothing for the others, which say what is
/// wrong with the file.
fn load_hint(e: &linux_loader::loader::Error) -> &'static str {
    use linux_loader::loader::bzimage::Error as BzError;
    use linux_loader::loader::Error as L;
    match e {
        // The bzImage's size comes from the file itself, so a failed copy means the
        // guest range it goes to is not all RAM.
        L::MemoryOverflow
        | L::CommandLineOverflow
        | L::Bzimage(BzError::ReadBzImageCompressedKernel) => {
            "; it does not fit in guest memory: give the guest more --memory"
        }
        _ => "",
    }
}

/// Which entry protocol the loaded kernel uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// 64-bit Linux boot protocol (bzImage, or ELF without a PVH note): long mode,
    /// RSI = zero page.
    Linux64,
    /// PVH: 32-bit protected mode, EBX = hvm_start_info.
    Pvh,
}

#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    pub entry: u64,
    pub protocol: BootProtocol,
    pub kernel_end: u64,
    pub initramfs: Option<(u64, u64)>,
}

/// What the user gave to boot.
pub struct KernelSpec<'a> {
    pub kernel: &'a Path,
    pub initramfs: Option<&'a Path>,
    pub cmdline: &'a str,
    pub mem_size: u64,
}

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const XLF_KERNEL_64: u16 = 1;
const PVH_MAGIC: u32 = 0x336e_c578;

enum Format {
    Elf,
    BzImage,
}

fn sniff(path: &Path, f: &mut File) -> Result<Format, BootError> {
    let read_err = |source| BootError::KernelRead {
        path: path.to_path_buf(),
        source,
    };
    let mut head = [0u8; 0x208];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]).map_err(read_err)? {
            0 => break,
            k => n += k,
        }
    }
    f.seek(SeekFrom::Start(0)).map_err(read_err)?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(Format::Elf);
    }
    if n >= 0x206
        && u32::from_le_bytes([head[0x202], head[0x203], head[0x204], head[0x205]])
            == KERNEL_HDR_MAGIC
    {
        return Ok(Format::BzImage);
    }
    Err(BootError::NotAKernel {
        path: path.to_path_buf(),
    })
}

/// End of RAM below the MMIO hole: initramfs and boot data stay below it.
fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_HOLE_START)
}

/// Load the kernel, command line and initramfs, and write the zero page or the PVH
/// start info. Registers are set by the caller from the returned [`BootInfo`].
pub fn load(mem: &GuestMemoryMmap, spec: &KernelSpec) -> Result<BootInfo, BootError> {
    let path = spec.kernel;
    let mut f = File::open(path).map_err(|source| BootError::KernelOpen {
        path: path.to_path_buf(),
        source,
    })?;
    // Check the command line before touching guest memory: the error is the user's.
    let cmdline = build_cmdline(spec.cmdline)?;
    let format = sniff(path, &mut f)?;
    let load_err = |source| BootError::Load {
        path: path.to_path_buf(),
        source,
    };

    let (entry, protocol, kernel_end, hdr) = match format {
        Format::BzImage => {
            let r = BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            let hdr = r.setup_header.ok_or(BootError::NotAKernel {
                path: path.to_path_buf(),
            })?;
            let (version, xloadflags) = (hdr.version, hdr.xloadflags);
            if version < 0x020c || xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::NoLongModeEntry {
                    path: path.to_path_buf(),
                    version,
                    xloadflags,
                });
            }
            // The decompressor needs init_size bytes from the load address, not just
            // the file size.
            let end =
                r.kernel_load.0 + u64::from(hdr.init_size).max(r.kernel_end - r.kernel_load.0);
            // startup_64 is 0x200 past the protected-mode code.
            (
                r.kernel_load.0 + 0x200,
                BootProtocol::Linux64,
                end,
                Some(hdr),
            )
        }
        Format::Elf => {
            let elf_err = |source| BootError::Elf {
                path: path.to_path_buf(),
                source,
            };
            let img = elf::parse(&f).map_err(elf_err)?;
            let ram_end = low_ram_end(spec.mem_size);
            match img.class {
                elf::Class::Elf64 => {
                    // Checked here so that an image which does not fit says so;
                    // linux-loader's copy error would not tell that from a short file.
                    elf::check_elf64_segments(mem, &img, ram_end).map_err(elf_err)?;
                    let r = Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START)))
                        .map_err(load_err)?;
                    match r.pvh_boot_cap {
                        PvhBootCapability::PvhEntryPresent(addr) => {
                            (addr.0, BootProtocol::Pvh, r.kernel_end, None)
                        }
                        _ => (r.kernel_load.0, BootProtocol::Linux64, r.kernel_end, None),
                    }
                }
                elf::Class::Elf32 => {
                    let entry = elf::pvh_entry(&f, &img).map_err(elf_err)?.ok_or_else(|| {
                        BootError::Elf32WithoutPvhNote {
                            path: path.to_path_buf(),
                        }
                    })?;
                    let end = elf::load_elf32(mem, &f, &img, entry, ram_end).map_err(elf_err)?;
                    (entry, BootProtocol::Pvh, end, None)
                }
            }
        }
    };

    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline).map_err(BootError::CmdlineWrite)?;

    let initrd_limit = match &hdr {
        Some(h) => low_ram_end(spec.mem_size).min(u64::from(h.initrd_addr_max) + 1),
        None => low_ram_end(spec.mem_size),
    };
    let initramfs = match spec.initramfs {
        Some(p) => Some(load_initramfs(mem, p, kernel_end, initrd_limit)?),
        None => None,
    };
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .unwrap_or(0);

    match protocol {
        BootProtocol::Linux64 => write_zero_page(mem, hdr, initramfs, cmdline_len, spec.mem_size)?,
        BootProtocol::Pvh => write_pvh_start_info(mem, initramfs, spec.mem_size)?,
    }
    Ok(BootInfo {
        entry,
        protocol,
        kernel_end,
        initramfs,
    })
}

fn build_cmdline(s: &str) -> Result<Cmdline, BootError> {
    if s.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong {
            len: s.len() + 1,
            max: CMDLINE_MAX_SIZE,
        });
    }
    let mut c = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    if !s.trim().is_empty() {
        c.insert_str(s.trim()).map_err(BootError::Cmdline)?;
    }
    Ok(c)
}

/// Place the initramfs page-aligned as high as allowed (below `limit`), above the
/// kernel's end.
fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let open_err = |source| BootError::InitramfsOpen {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(open_err)?;
    let size = f.metadata().map_err(open_err)?.len();
    let too_large = BootError::InitramfsTooLarge {
        path: path.to_path_buf(),
        size,
        kernel_end,
        limit,
    };
    let start = limit.checked_sub(size).ok_or(too_large)? & !0xfff;
    if start < kernel_end || size > usize::MAX as u64 {
        return Err(BootError::InitramfsTooLarge {
            path: path.to_path_buf(),
            size,
            kernel_end,
            limit,
        });
    }
    mem.read_exact_volatile_from(GuestAddress(start), &mut f, size as usize)?;
    Ok((start, size))
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    hdr: Option<linux_loader::loader::bootparam::setup_header>,
    initramfs: Option<(u64, u64)>,
    cmdline_len: usize,
    mem_size: u64,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(h) = hdr {
        params.hdr = h;
    } else {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = (cmdline_len + 1) as u32;
    if let Some((start, size)) = initramfs {
        params.hdr.ramdisk_image = start as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(mem_size);
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind as u32,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))?;
    Ok(())
}

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    initramfs: Option<(u64, u64)>,
    mem_size: u64,
) -> Result<(), BootError> {
    let map = e820_map(mem_size);
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        let e = hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *kind as u32,
            reserved: 0,
        };
        mem.write_obj(
            e,
            GuestAddress(
                PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64,
            ),
        )?;
    }
    let mut info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((start, size)) = initramfs {
        let m = hvm_modlist_entry {
            paddr: start,
            size,
            ..Default::default()
        };
        mem.write_obj(m, GuestAddress(PVH_MODLIST_START))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))?;
    Ok(())
}

/// Write the MP table at its standard place.
pub fn write_mptable(
    mem: &GuestMemoryMmap,
    cpus: u32,
    pci: &[mptable::PciIntx],
) -> Result<(), BootError> {
    let bytes = mptable::build(MPTABLE_START, cpus, pci)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem(size: u64) -> GuestMemoryMmap {
        let ranges: Vec<_> = ram_ranges(size)
            .into_iter()
            .map(|(a, s)| (GuestAddress(a), s as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    fn tmpfile(name: &str, bytes: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("wbvmm-test-{}-{name}", std::process::id()));
        File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    /// A minimal ELF64 with one PT_LOAD at 1 MiB and, optionally, a PVH note.
    fn tiny_elf(pvh: bool) -> Vec<u8> {
        let mut e = vec![0u8; 0x200];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2; // 64-bit
        e[5] = 1; // little endian
        e[6] = 1;
        e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86_64
        e[20..24].copy_from_slice(&1u32.to_le_bytes());
        e[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // entry
        e[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        e[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
        e[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
        let phnum: u16 = if pvh { 2 } else { 1 };
        e[56..58].copy_from_slice(&phnum.to_le_bytes());
        // PT_LOAD: offset 0x180, paddr 1 MiB, 16 bytes
        let ph = 64;
        e[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
        e[ph + 8..ph + 16].copy_from_slice(&0x180u64.to_le_bytes());
        e[ph + 16..ph + 24].copy_from_slice(&0x10_0000u64.to_le_bytes());
        e[ph + 24..ph + 32].copy_from_slice(&0x10_0000u64.to_le_bytes());
        e[ph + 32..ph + 40].copy_from_slice(&16u64.to_le_bytes());
        e[ph + 40..ph + 48].copy_from_slice(&16u64.to_le_bytes());
        if pvh {
            let ph = 64 + 56;
            e[ph..ph + 4].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
            e[ph + 8..ph + 16].copy_from_slice(&0x1c0u64.to_le_bytes());
            e[ph + 32..ph + 40].copy_from_slice(&20u64.to_le_bytes());
            e[ph + 40..ph + 48].copy_from_slice(&20u64.to_le_bytes());
            let n = 0x1c0;
            e[n..n + 4].copy_from_slice(&4u32.to_le_bytes()); // namesz
            e[n + 4..n + 8].copy_from_slice(&4u32.to_le_bytes()); // descsz
            e[n + 8..n + 12].copy_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
            e[n + 12..n + 16].copy_from_slice(b"Xen\0");
            e[n + 16..n + 20].copy_from_slice(&0x10_0004u32.to_le_bytes());
        }
        e[0x180..0x190].copy_from_slice(&[0x90; 16]);
        e
    }

    #[test]
    fn pvh_start_info_memmap_cmdline_and_module() {
        let m = mem(64 << 20);
        let k = tmpfile("pvh.elf", &tiny_elf(true));
        let i = tmpfile("initrd", &[0xab; 5000]);
        let info = load(
            &m,
            &KernelSpec {
                kernel: &k,
                initramfs: Some(&i),
                cmdline: "banner exit=3",
                mem_size: 64 << 20,
            },
        )
        .unwrap();
        assert_eq!(info.protocol, BootProtocol::Pvh);
        assert_eq!(info.entry, 0x10_0004);
        let si: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(si.magic, PVH_MAGIC);
        assert_eq!(si.version, 1);
        assert_eq!(si.memmap_entries, 3);
        assert_eq!(si.nr_modules, 1);
        let e: hvm_memmap_table_entry = m.read_obj(GuestAddress(PVH_MEMMAP_START + 48)).unwrap();
        assert_eq!(
            (e.addr, e.size, e.type_),
            (0x10_0000, (64 << 20) - 0x10_0000, 1)
        );
        let md: hvm_modlist_entry = m.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!(md.size, 5000);
        assert_eq!(md.paddr % 4096, 0);
        assert!(md.paddr + 5000 <= 64 << 20);
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(md.paddr + 4999)).unwrap(),
            0xab
        );
        let mut cl = [0u8; 14];
        m.read_slice(&mut cl, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&cl, b"banner exit=3\0");
        std::fs::remove_file(k).ok();
        std::fs::remove_file(i).ok();
    }

    #[test]
    fn elf_without_note_uses_zero_page() {
        let m = mem(32 << 20);
        let k = tmpfile("plain.elf", &tiny_elf(false));
        let info = load(
            &m,
            &KernelSpec {
                kernel: &k,
                initramfs: None,
                cmdline: "console=ttyS0",
                mem_size: 32 << 20,
            },
        )
        .unwrap();
        assert_eq!(info.protocol, BootProtocol::Linux64);
        let bp: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ bp.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ bp.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!(bp.e820_entries, 3);
        assert_eq!({ bp.e820_table[0].size }, EBDA_START);
        std::fs::remove_file(k).ok();
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let m = mem(16 << 20);
        let missing = Path::new("/nonexistent/wbvmm/kernel");
        let spec = |k: &'static Path| KernelSpec {
            kernel: k,
            initramfs: None,
            cmdline: "",
            mem_size: 16 << 20,
        };
        assert!(matches!(
            load(&m, &spec(missing)),
            Err(BootError::KernelOpen { .. })
        ));
        let junk = tmpfile("junk", b"this is not a kernel at all, just some text");
        let junk: &'static Path = Box::leak(junk.into_boxed_path());
        assert!(matches!(
            load(&m, &spec(junk)),
            Err(BootError::NotAKernel { .. })
        ));
        let k = tmpfile("pvh2.elf", &tiny_elf(true));
        let long = "x".repeat(3000);
        let r = load(
            &m,
            &KernelSpec {
                kernel: &k,
                initramfs: None,
                cmdline: &long,
                mem_size: 16 << 20,
            },
        );
        assert!(matches!(
            r,
            Err(BootError::CmdlineTooLong {
                len: 3001,
                max: 2048
            })
        ));
        let big = tmpfile("bigrd", &vec![0u8; 20 << 20]);
        let r = load(
            &m,
            &KernelSpec {
                kernel: &k,
                initramfs: Some(&big),
                cmdline: "",
                mem_size: 16 << 20,
            },
        );
        assert!(
            matches!(r, Err(BootError::InitramfsTooLarge { .. })),
            "{r:?}"
        );
        let r = load(
            &m,
            &KernelSpec {
                kernel: &k,
                initramfs: Some(Path::new("/nonexistent/rd")),
                cmdline: "",
                mem_size: 16 << 20,
            },
        );
        assert!(matches!(r, Err(BootError::InitramfsOpen { .. })));
        for p in [junk.to_path_buf(), k, big] {
            std::fs::remove_file(p).ok();
        }
    }

    fn put16(e: &mut [u8], off: usize, v: u16) {
        e[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn put32(e: &mut [u8], off: usize, v: u32) {
        e[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// File offset of ELF32 program header `i`.
    fn ph32(i: usize) -> usize {
        52 + 32 * i
    }

    /// File offsets in [`tiny_elf32`]: the "GNU" note (type 18 too, to be skipped for
    /// its owner) and the "Xen" PVH note.
    const GNU_NOTE: usize = 0x140;
    const XEN_NOTE: usize = 0x154;

    /// A minimal ELF32 (EM_386): PT_LOAD 0 with 16 file bytes at 1 MiB and 16 bytes
    /// of bss after them, PT_LOAD 1 of 8 KiB bss only at 0x101000, and, with `pvh`, a
    /// PT_NOTE holding a same-typed note of another owner, then the PVH entry note
    /// (entry 0x100004).
    fn tiny_elf32(pvh: bool) -> Vec<u8> {
        let mut e = vec![0u8; 0x180];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 1; // 32-bit
        e[5] = 1; // little endian
        e[6] = 1;
        put16(&mut e, 16, 2); // ET_EXEC
        put16(&mut e, 18, 3); // EM_386
        put32(&mut e, 20, 1);
        put32(&mut e, 24, 0x10_0000); // e_entry (not the PVH entry)
        put32(&mut e, 28, 52); // e_phoff
        put16(&mut e, 40, 52); // e_ehsize
        put16(&mut e, 42, 32); // e_phentsize
        put16(&mut e, 44, if pvh { 3 } else { 2 });
        let (p0, p1, p2) = (ph32(0), ph32(1), ph32(2));
        put32(&mut e, p0, 1); // PT_LOAD
        put32(&mut e, p0 + 4, 0x100);
        put32(&mut e, p0 + 8, 0x10_0000);
        put32(&mut e, p0 + 12, 0x10_0000);
        put32(&mut e, p0 + 16, 16);
        put32(&mut e, p0 + 20, 32);
        put32(&mut e, p1, 1); // PT_LOAD, no file contents
        put32(&mut e, p1 + 8, 0x10_1000);
        put32(&mut e, p1 + 12, 0x10_1000);
        put32(&mut e, p1 + 20, 0x2000);
        if pvh {
            put32(&mut e, p2, 4); // PT_NOTE
            put32(&mut e, p2 + 4, GNU_NOTE as u32);
            put32(&mut e, p2 + 16, 40);
            put32(&mut e, p2 + 20, 40);
            for (n, owner, desc) in [
                (GNU_NOTE, b"GNU\0", 0xdead_beef),
                (XEN_NOTE, b"Xen\0", 0x10_0004),
            ] {
                put32(&mut e, n, 4); // namesz
                put32(&mut e, n + 4, 4); // descsz
                put32(&mut e, n + 8, 18); // XEN_ELFNOTE_PHYS32_ENTRY
                e[n + 12..n + 16].copy_from_slice(owner);
                put32(&mut e, n + 16, desc);
            }
        }
        for (i, b) in e[0x100..0x110].iter_mut().enumerate() {
            *b = 0xa0 + i as u8;
        }
        e
    }

    /// Load `bytes` as the kernel of a guest with `mem_size` bytes of RAM.
    fn load_bytes(name: &str, bytes: &[u8], mem_size: u64) -> Result<BootInfo, BootError> {
        let m = mem(mem_size);
        let k = tmpfile(name, bytes);
        let r = load(
            &m,
            &KernelSpec {
                kernel: &k,
                initramfs: None,
                cmdline: "",
                mem_size,
            },
        );
        std::fs::remove_file(k).ok();
        r
    }

    #[test]
    fn elf32_with_pvh_note_loads_segments_and_boots_through_pvh() {
        let m = mem(64 << 20);
        // Stale bytes where the bss goes: the loader must zero them.
        m.write_slice(&[0xcc; 0x3000], GuestAddress(0x10_0000))
            .unwrap();
        let k = tmpfile("pvh32.elf", &tiny_elf32(true));
        let info = load(
            &m,
            &KernelSpec {
                kernel: &k,
                initramfs: None,
                cmdline: "hello",
                mem_size: 64 << 20,
            },
        )
        .unwrap();
        std::fs::remove_file(k).ok();
        assert_eq!(info.protocol, BootProtocol::Pvh);
        assert_eq!(info.entry, 0x10_0004, "the entry comes from the Xen note");
        assert_eq!(info.kernel_end, 0x10_3000);
        let mut img = [0u8; 0x3000];
        m.read_slice(&mut img, GuestAddress(0x10_0000)).unwrap();
        let text: Vec<u8> = (0..16).map(|i| 0xa0 + i).collect();
        assert_eq!(&img[..16], &text[..], "file contents of PT_LOAD 0");
        assert!(img[16..32].iter().all(|&b| b == 0), "bss of PT_LOAD 0");
        assert!(
            img[32..0x1000].iter().all(|&b| b == 0xcc),
            "outside every segment: untouched"
        );
        assert!(
            img[0x1000..].iter().all(|&b| b == 0),
            "PT_LOAD 1 (bss only)"
        );
        let si: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(si.magic, PVH_MAGIC);
        assert_eq!(si.cmdline_paddr, CMDLINE_START);
        assert_eq!(si.memmap_entries, 3);
    }

    #[test]
    fn elf32_without_pvh_note_is_refused_with_what_is_missing() {
        let mut no_phdrs = tiny_elf32(false);
        put16(&mut no_phdrs, 44, 0);
        let mut other_owner = tiny_elf32(true);
        other_owner[XEN_NOTE + 12..XEN_NOTE + 16].copy_from_slice(b"Xe\0\0");
        for (name, e) in [
            ("nonote32.elf", tiny_elf32(false)),
            ("nophdr32.elf", no_phdrs),
            ("notxen32.elf", other_owner),
        ] {
            let r = load_bytes(name, &e, 16 << 20);
            let Err(err @ BootError::Elf32WithoutPvhNote { .. }) = r else {
                panic!("{name}: {r:?}");
            };
            let msg = err.to_string();
            for part in [
                "is a 32-bit ELF without a PVH entry note",
                "XEN_ELFNOTE_PHYS32_ENTRY, type 18, owner \"Xen\"",
                "boots 32-bit kernels only through PVH",
            ] {
                assert!(msg.contains(part), "{name}: {msg}");
            }
            assert!(!msg.contains("--memory"), "{msg}");
        }
    }

    #[test]
    fn hostile_elf32_headers_are_typed_errors() {
        use elf::ElfError as E;
        type Check = fn(&E) -> bool;
        let base = tiny_elf32(true);
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut e = base.clone();
            f(&mut e);
            e
        };
        let small = 16u64 << 20;
        // RAM up to the MMIO hole, and a little above 4 GiB.
        let big = (3u64 << 30) + (1 << 20);
        let cases: Vec<(&str, Vec<u8>, u64, Check)> = vec![
            ("cut in the header", base[..40].to_vec(), small, |e| {
                matches!(e, E::Truncated { .. })
            }),
            ("cut in the phdrs", base[..100].to_vec(), small, |e| {
                matches!(e, E::Truncated { .. })
            }),
            (
                "phoff past the end",
                with(&|e| put32(e, 28, 0x170)),
                small,
                |e| matches!(e, E::Truncated { .. }),
            ),
            (
                "phoff near 4 GiB",
                with(&|e| put32(e, 28, 0xffff_fff0)),
                small,
                |e| matches!(e, E::Truncated { .. }),
            ),
            (
                "ELF64-sized phdrs",
                with(&|e| put16(e, 42, 56)),
                small,
                |e| {
                    matches!(
                        e,
                        E::PhentSize {
                            got: 56,
                            want: 32,
                            ..
                        }
                    )
                },
            ),
            ("x86_64 machine", with(&|e| put16(e, 18, 62)), small, |e| {
                matches!(e, E::Machine(62))
            }),
            ("big endian", with(&|e| e[5] = 2), small, |e| {
                matches!(e, E::ByteOrder(2))
            }),
            ("unknown class", with(&|e| e[4] = 3), small, |e| {
                matches!(e, E::UnknownClass(3))
            }),
            (
                "segment past the end of the file",
                with(&|e| {
                    put32(e, ph32(0) + 16, 0x1000);
                    put32(e, ph32(0) + 20, 0x1000);
                }),
                small,
                |e| matches!(e, E::Truncated { .. }),
            ),
            (
                "segment offset near 4 GiB",
                with(&|e| put32(e, ph32(0) + 4, 0xffff_ff00)),
                small,
                |e| matches!(e, E::Truncated { .. }),
            ),
            (
                "p_filesz > p_memsz",
                with(&|e| put32(e, ph32(0) + 20, 8)),
                small,
                |e| matches!(e, E::FileszOverMemsz { index: 0, .. }),
            ),
            (
                "segment below 1 MiB",
                with(&|e| put32(e, ph32(1) + 12, 0x8000)),
                small,
                |e| matches!(e, E::BelowHighMemory { index: 1, .. }),
            ),
            (
                "segment beyond RAM",
                with(&|e| put32(e, ph32(1) + 12, 0x0200_0000)),
                small,
                |e| matches!(e, E::OutsideRam { index: 1, .. }),
            ),
            (
                "segment into the MMIO hole",
                with(&|e| put32(e, ph32(1) + 12, 0xbfff_f000)),
                big,
                |e| {
                    matches!(
                        e,
                        E::OutsideRam {
                            index: 1,
                            end: 0xc000_1000,
                            ..
                        }
                    )
                },
            ),
            (
                "segment past 4 GiB",
                with(&|e| put32(e, ph32(1) + 12, 0xffff_f000)),
                big,
                |e| {
                    matches!(
                        e,
                        E::OutsideRam {
                            index: 1,
                            end: 0x1_0000_1000,
                            ..
                        }
                    )
                },
            ),
            (
                "entry outside the image",
                with(&|e| put32(e, XEN_NOTE + 16, 0x0200_0000)),
                small,
                |e| matches!(e, E::EntryOutsideImage(0x0200_0000)),
            ),
            (
                "entry in the bss",
                with(&|e| put32(e, XEN_NOTE + 16, 0x10_1000)),
                small,
                |e| matches!(e, E::EntryOutsideImage(0x10_1000)),
            ),
            (
                "PVH note with a 2-byte address",
                with(&|e| put32(e, XEN_NOTE + 4, 2)),
                small,
                |e| matches!(e, E::PvhNoteSize { descsz: 2, .. }),
            ),
            (
                "note descriptor past its segment",
                with(&|e| put32(e, GNU_NOTE + 4, 0x1000)),
                small,
                |e| matches!(e, E::BadNote { .. }),
            ),
            (
                "note name of 4 GiB",
                with(&|e| put32(e, GNU_NOTE, u32::MAX)),
                small,
                |e| matches!(e, E::BadNote { .. }),
            ),
            (
                "PT_NOTE past the end of the file",
                with(&|e| put32(e, ph32(2) + 16, 0x1000)),
                small,
                |e| matches!(e, E::Truncated { .. }),
            ),
            (
                "no PT_LOAD",
                with(&|e| {
                    put32(e, ph32(0), 6);
                    put32(e, ph32(1), 6);
                }),
                small,
                |e| matches!(e, E::NoLoadSegment),
            ),
        ];
        for (i, (name, bytes, mem_size, check)) in cases.into_iter().enumerate() {
            let r = load_bytes(&format!("hostile32-{i}.elf"), &bytes, mem_size);
            match &r {
                Err(BootError::Elf { source, .. }) if check(source) => {
                    let msg = source.to_string();
                    let fits = matches!(source, E::OutsideRam { .. });
                    assert_eq!(msg.contains("--memory"), fits, "{name}: {msg}");
                }
                _ => panic!("{name}: {r:?}"),
            }
        }
    }

    #[test]
    fn elf64_segments_are_checked_before_linux_loader_copies_them() {
        let mut e = tiny_elf(false);
        e[64 + 24..64 + 32].copy_from_slice(&0x0200_0000u64.to_le_bytes()); // p_paddr
        let r = load_bytes("far64.elf", &e, 16 << 20);
        let Err(BootError::Elf {
            source: elf::ElfError::OutsideRam { start, .. },
            ..
        }) = r
        else {
            panic!("{r:?}");
        };
        assert_eq!(start, 0x0200_0000);
        let mut e = tiny_elf(false);
        e[64 + 32..64 + 40].copy_from_slice(&0x1000u64.to_le_bytes()); // p_filesz
        e[64 + 40..64 + 48].copy_from_slice(&0x1000u64.to_le_bytes()); // p_memsz
        let r = load_bytes("short64.elf", &e, 16 << 20);
        assert!(
            matches!(
                r,
                Err(BootError::Elf {
                    source: elf::ElfError::Truncated { .. },
                    ..
                })
            ),
            "{r:?}"
        );
    }

    #[test]
    fn messages_leave_the_cause_to_the_source_chain() {
        use linux_loader::loader::elf::Error as ElfLoaderError;
        use linux_loader::loader::Error as L;
        use std::error::Error as _;
        let path = PathBuf::from("/k");
        let bad_header = BootError::Load {
            path: path.clone(),
            source: L::Elf(ElfLoaderError::InvalidProgramHeaderSize),
        };
        let msg = bad_header.to_string();
        assert_eq!(msg, "loading kernel /k failed");
        assert!(bad_header.source().is_some());
        let too_big = BootError::Load {
            path: path.clone(),
            source: L::MemoryOverflow,
        };
        assert!(too_big.to_string().contains("--memory"), "{too_big}");
        let cmdline = BootError::CmdlineWrite(L::CommandLineOverflow);
        assert!(cmdline.to_string().contains("--memory"), "{cmdline}");
        for e in [
            BootError::KernelOpen {
                path: path.clone(),
                source: std::io::Error::other("the cause"),
            },
            BootError::KernelRead {
                path: path.clone(),
                source: std::io::Error::other("the cause"),
            },
            BootError::InitramfsOpen {
                path: path.clone(),
                source: std::io::Error::other("the cause"),
            },
            BootError::Elf {
                path,
                source: elf::ElfError::Read(std::io::Error::other("the cause")),
            },
        ] {
            assert!(!e.to_string().contains("the cause"), "{e}");
            assert!(e.source().is_some(), "{e}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Whatever bytes an ELF32 holds, parsing and loading it gives a result or a
        /// typed error, never a panic; a load that succeeds ends inside guest RAM.
        #[test]
        fn mutated_elf32_never_panics(
            muts in proptest::collection::vec((0usize..0x180, proptest::prelude::any::<u8>()), 1..10),
            cut in proptest::option::of(0usize..0x180),
        ) {
            let mut e = tiny_elf32(true);
            for (i, b) in muts {
                e[i] = b;
            }
            if let Some(n) = cut {
                e.truncate(n);
            }
            let m = mem(16 << 20);
            if let Ok(img) = elf::parse(&e[..]) {
                let entry = elf::pvh_entry(&e[..], &img).ok().flatten().unwrap_or(img.entry);
                if let Ok(end) = elf::load_elf32(&m, &e[..], &img, entry, 16 << 20) {
                    proptest::prop_assert!(end <= 16 << 20);
                }
                let _ = elf::check_elf64_segments(&m, &img, 16 << 20);
            }
        }
    }
}

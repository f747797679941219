//! A small, careful ELF reader for kernel images: the file header, the program headers
//! and the PVH entry note, for 32-bit and 64-bit little-endian ELF. Every offset and
//! size taken from the file is checked against the file's length and against guest
//! RAM before anything is copied; a malformed file is an [`ElfError`], never a panic.
//!
//! ELF64 images are loaded by linux-loader; this module only checks their segments
//! first (so an image that does not fit gets an error saying so). ELF32 images, which
//! wbvmm boots only through PVH, are loaded here.

use std::io;

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::layout::{HIMEM_START, MMIO_HOLE_END, MMIO_HOLE_START};

const ELFCLASS32: u8 = 1;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
/// e_machine of a 32-bit x86 image.
pub const EM_386: u16 = 3;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// The PVH entry note: a 32-bit physical entry address, owner "Xen".
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const PVH_NOTE_OWNER: &[u8; 4] = b"Xen\0";
/// Size of a note header (n_namesz, n_descsz, n_type), the same for both classes.
const NHDR_SIZE: u64 = 12;
/// Copy granularity from the file into guest memory.
const CHUNK: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum ElfError {
    #[error("{what} at file offset {offset:#x} ({len} bytes) runs past the end of the file ({file_len} bytes); the image is truncated or corrupt")]
    Truncated {
        what: &'static str,
        offset: u64,
        len: u64,
        file_len: u64,
    },
    #[error("the file does not start with the ELF magic \\x7fELF")]
    BadMagic,
    #[error("EI_CLASS is {0}, neither 1 (32-bit) nor 2 (64-bit)")]
    UnknownClass(u8),
    #[error("EI_DATA is {0}; x86 kernels are little-endian (EI_DATA 1)")]
    ByteOrder(u8),
    #[error("e_machine is {0}; a 32-bit kernel must be built for EM_386 (3), e.g. with gcc -m32")]
    Machine(u16),
    #[error("e_phentsize is {got}; program headers of a {bits}-bit ELF are {want} bytes")]
    PhentSize { got: u16, want: u16, bits: u8 },
    #[error("program header {index}: p_filesz {filesz:#x} is larger than p_memsz {memsz:#x}")]
    FileszOverMemsz {
        index: usize,
        filesz: u64,
        memsz: u64,
    },
    #[error("program header {index}: p_paddr {paddr:#x} + {size:#x} overflows")]
    AddressOverflow { index: usize, paddr: u64, size: u64 },
    #[error("PT_LOAD segment {index} starts at {start:#x}, below 1 MiB, where wbvmm keeps its boot data, the MP table and the VGA/ROM hole; link the kernel at 0x100000 or above")]
    BelowHighMemory { index: usize, start: u64 },
    #[error("PT_LOAD segment {index} [{start:#x}, {end:#x}) is not inside guest RAM (RAM below the MMIO hole ends at {low_ram_end:#x}; [{hole_start:#x}, {hole_end:#x}) is the MMIO hole); give the guest more --memory, or link the kernel lower", hole_start = MMIO_HOLE_START, hole_end = MMIO_HOLE_END)]
    OutsideRam {
        index: usize,
        start: u64,
        end: u64,
        low_ram_end: u64,
    },
    #[error("the image has no PT_LOAD segment with contents to load")]
    NoLoadSegment,
    #[error("the ELF note at file offset {offset:#x} is malformed: its name and descriptor run past the end of its PT_NOTE segment (which ends at {segment_end:#x})")]
    BadNote { offset: u64, segment_end: u64 },
    #[error("the PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) at file offset {offset:#x} has a {descsz}-byte descriptor; it must hold a 4-byte (or 8-byte) address")]
    PvhNoteSize { offset: u64, descsz: u32 },
    #[error("the PVH entry note holds {0:#x}, which is not a 32-bit physical address")]
    PvhEntryTooWide(u64),
    #[error("the PVH entry {0:#x} is not inside any loaded segment; check the address in the XEN_ELFNOTE_PHYS32_ENTRY note")]
    EntryOutsideImage(u64),
    #[error("reading the image failed")]
    Read(#[source] io::Error),
    #[error("copying PT_LOAD segment {index} into guest memory at {addr:#x} failed")]
    Copy {
        index: usize,
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Where the ELF's bytes come from: a kernel file, or a byte slice in tests.
pub trait ReadAt {
    fn size(&self) -> io::Result<u64>;
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for std::fs::File {
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|o| self.get(o..o.checked_add(buf.len())?))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Elf32,
    Elf64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Phdr {
    pub p_type: u32,
    pub offset: u64,
    pub paddr: u64,
    pub filesz: u64,
    pub memsz: u64,
}

/// The parts of an ELF image a kernel loader needs.
#[derive(Debug, Clone)]
pub struct ElfImage {
    pub class: Class,
    pub machine: u16,
    pub entry: u64,
    pub phdrs: Vec<Phdr>,
    file_len: u64,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// `[offset, offset + len)` must lie inside the file.
fn check_in_file(what: &'static str, offset: u64, len: u64, file_len: u64) -> Result<(), ElfError> {
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(ElfError::Truncated {
            what,
            offset,
            len,
            file_len,
        }),
    }
}

fn read_checked<R: ReadAt + ?Sized>(
    src: &R,
    file_len: u64,
    what: &'static str,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), ElfError> {
    check_in_file(what, offset, buf.len() as u64, file_len)?;
    src.read_exact_at(buf, offset).map_err(ElfError::Read)
}

/// Read and check the ELF header and the program header table.
pub fn parse<R: ReadAt + ?Sized>(src: &R) -> Result<ElfImage, ElfError> {
    let file_len = src.size().map_err(ElfError::Read)?;
    let mut ident = [0u8; 16];
    read_checked(src, file_len, "the ELF identification", 0, &mut ident)?;
    if ident[..4] != *b"\x7fELF" {
        return Err(ElfError::BadMagic);
    }
    let class = match ident[4] {
        ELFCLASS32 => Class::Elf32,
        ELFCLASS64 => Class::Elf64,
        c => return Err(ElfError::UnknownClass(c)),
    };
    if ident[5] != ELFDATA2LSB {
        return Err(ElfError::ByteOrder(ident[5]));
    }
    let mut hdr = [0u8; 64];
    let (hdr, bits, phentsize_want) = match class {
        Class::Elf32 => (&mut hdr[..52], 32, 32u16),
        Class::Elf64 => (&mut hdr[..], 64, 56u16),
    };
    read_checked(src, file_len, "the ELF header", 0, hdr)?;
    let machine = u16_at(hdr, 18);
    let (entry, phoff, phentsize, phnum) = match class {
        Class::Elf32 => (
            u64::from(u32_at(hdr, 24)),
            u64::from(u32_at(hdr, 28)),
            u16_at(hdr, 42),
            u16_at(hdr, 44),
        ),
        Class::Elf64 => (
            u64_at(hdr, 24),
            u64_at(hdr, 32),
            u16_at(hdr, 54),
            u16_at(hdr, 56),
        ),
    };
    if class == Class::Elf32 && machine != EM_386 {
        return Err(ElfError::Machine(machine));
    }
    if phnum > 0 && phentsize != phentsize_want {
        return Err(ElfError::PhentSize {
            got: phentsize,
            want: phentsize_want,
            bits,
        });
    }
    let table_len = u64::from(phnum) * u64::from(phentsize_want);
    check_in_file("the program header table", phoff, table_len, file_len)?;
    let mut table = vec![0u8; table_len as usize];
    src.read_exact_at(&mut table, phoff)
        .map_err(ElfError::Read)?;
    let phdrs = table
        .chunks_exact(usize::from(phentsize_want))
        .map(|p| match class {
            Class::Elf32 => Phdr {
                p_type: u32_at(p, 0),
                offset: u64::from(u32_at(p, 4)),
                paddr: u64::from(u32_at(p, 12)),
                filesz: u64::from(u32_at(p, 16)),
                memsz: u64::from(u32_at(p, 20)),
            },
            Class::Elf64 => Phdr {
                p_type: u32_at(p, 0),
                offset: u64_at(p, 8),
                paddr: u64_at(p, 24),
                filesz: u64_at(p, 32),
                memsz: u64_at(p, 40),
            },
        })
        .collect();
    Ok(ElfImage {
        class,
        machine,
        entry,
        phdrs,
        file_len,
    })
}

fn align4(x: u64) -> u64 {
    // x is at most u32::MAX, so this cannot overflow a u64.
    (x + 3) & !3
}

/// The address in the first XEN_ELFNOTE_PHYS32_ENTRY note (owner "Xen") of the
/// image's PT_NOTE segments, or None when there is none.
pub fn pvh_entry<R: ReadAt + ?Sized>(src: &R, img: &ElfImage) -> Result<Option<u64>, ElfError> {
    for ph in img.phdrs.iter().filter(|p| p.p_type == PT_NOTE) {
        check_in_file("a PT_NOTE segment", ph.offset, ph.filesz, img.file_len)?;
        // In the file, so no overflow.
        let end = ph.offset + ph.filesz;
        let mut pos = ph.offset;
        // Fewer than a header's bytes left: padding at the end of the segment.
        while end.saturating_sub(pos) >= NHDR_SIZE {
            let mut nhdr = [0u8; NHDR_SIZE as usize];
            read_checked(src, img.file_len, "an ELF note header", pos, &mut nhdr)?;
            let (namesz, descsz, n_type) = (u32_at(&nhdr, 0), u32_at(&nhdr, 4), u32_at(&nhdr, 8));
            let name_off = pos + NHDR_SIZE;
            let desc_off = name_off + align4(u64::from(namesz));
            let desc_end = desc_off + u64::from(descsz);
            if desc_end > end {
                return Err(ElfError::BadNote {
                    offset: pos,
                    segment_end: end,
                });
            }
            if n_type == XEN_ELFNOTE_PHYS32_ENTRY && namesz as usize == PVH_NOTE_OWNER.len() {
                let mut name = [0u8; 4];
                read_checked(src, img.file_len, "an ELF note name", name_off, &mut name)?;
                if name == *PVH_NOTE_OWNER {
                    let entry = match descsz {
                        4 => {
                            let mut d = [0u8; 4];
                            read_checked(src, img.file_len, "the PVH note", desc_off, &mut d)?;
                            u64::from(u32::from_le_bytes(d))
                        }
                        8 => {
                            let mut d = [0u8; 8];
                            read_checked(src, img.file_len, "the PVH note", desc_off, &mut d)?;
                            u64::from_le_bytes(d)
                        }
                        _ => {
                            return Err(ElfError::PvhNoteSize {
                                offset: pos,
                                descsz,
                            })
                        }
                    };
                    if entry > u64::from(u32::MAX) {
                        return Err(ElfError::PvhEntryTooWide(entry));
                    }
                    return Ok(Some(entry));
                }
            }
            pos = desc_off + align4(u64::from(descsz));
        }
    }
    Ok(None)
}

/// Check an ELF64 image's loadable segments the way linux-loader will load them
/// (each PT_LOAD with file contents at p_paddr): inside the file and inside guest RAM.
pub fn check_elf64_segments(
    mem: &GuestMemoryMmap,
    img: &ElfImage,
    low_ram_end: u64,
) -> Result<(), ElfError> {
    for (index, ph) in img.phdrs.iter().enumerate() {
        if ph.p_type != PT_LOAD || ph.filesz == 0 {
            continue;
        }
        check_segment(mem, img, index, ph, ph.filesz, low_ram_end)?;
    }
    Ok(())
}

/// The checks both classes share: p_filesz <= p_memsz, the file part inside the
/// file, and `[p_paddr, p_paddr + span)` inside guest RAM. Returns the span's end.
fn check_segment(
    mem: &GuestMemoryMmap,
    img: &ElfImage,
    index: usize,
    ph: &Phdr,
    span: u64,
    low_ram_end: u64,
) -> Result<u64, ElfError> {
    if ph.filesz > ph.memsz {
        return Err(ElfError::FileszOverMemsz {
            index,
            filesz: ph.filesz,
            memsz: ph.memsz,
        });
    }
    check_in_file("a PT_LOAD segment", ph.offset, ph.filesz, img.file_len)?;
    let end = ph
        .paddr
        .checked_add(span)
        .ok_or(ElfError::AddressOverflow {
            index,
            paddr: ph.paddr,
            size: span,
        })?;
    let in_ram = usize::try_from(span)
        .map(|len| mem.check_range(GuestAddress(ph.paddr), len))
        .unwrap_or(false);
    if !in_ram {
        return Err(ElfError::OutsideRam {
            index,
            start: ph.paddr,
            end,
            low_ram_end,
        });
    }
    Ok(end)
}

/// Load an ELF32 image's PT_LOAD segments at their physical addresses, each at or
/// above 1 MiB and below `low_ram_end` (the end of RAM below the MMIO hole), zeroing
/// the part of each segment beyond its file contents. `entry` (the PVH entry) must
/// lie in a segment's file contents. Everything is checked before guest memory is
/// written. Returns the end of the highest segment.
pub fn load_elf32<R: ReadAt + ?Sized>(
    mem: &GuestMemoryMmap,
    src: &R,
    img: &ElfImage,
    entry: u64,
    low_ram_end: u64,
) -> Result<u64, ElfError> {
    let mut kernel_end = 0;
    let mut entry_found = false;
    let loads: Vec<(usize, &Phdr)> = img
        .phdrs
        .iter()
        .enumerate()
        .filter(|(_, p)| p.p_type == PT_LOAD && p.memsz > 0)
        .collect();
    for &(index, ph) in &loads {
        let end = check_segment(mem, img, index, ph, ph.memsz, low_ram_end)?;
        if ph.paddr < HIMEM_START {
            return Err(ElfError::BelowHighMemory {
                index,
                start: ph.paddr,
            });
        }
        if end > low_ram_end {
            return Err(ElfError::OutsideRam {
                index,
                start: ph.paddr,
                end,
                low_ram_end,
            });
        }
        // filesz <= memsz, so this is inside [paddr, end).
        entry_found |= entry >= ph.paddr && entry < ph.paddr + ph.filesz;
        kernel_end = kernel_end.max(end);
    }
    if loads.iter().all(|(_, p)| p.filesz == 0) {
        return Err(ElfError::NoLoadSegment);
    }
    if !entry_found {
        return Err(ElfError::EntryOutsideImage(entry));
    }
    let mut buf = vec![0u8; CHUNK];
    for &(index, ph) in &loads {
        let copy_err = |addr, source| ElfError::Copy {
            index,
            addr,
            source,
        };
        let mut done = 0u64;
        while done < ph.filesz {
            let n = (ph.filesz - done).min(CHUNK as u64) as usize;
            src.read_exact_at(&mut buf[..n], ph.offset + done)
                .map_err(ElfError::Read)?;
            let addr = ph.paddr + done;
            mem.write_slice(&buf[..n], GuestAddress(addr))
                .map_err(|e| copy_err(addr, e))?;
            done += n as u64;
        }
        if ph.memsz > ph.filesz {
            buf.fill(0);
            while done < ph.memsz {
                let n = (ph.memsz - done).min(CHUNK as u64) as usize;
                let addr = ph.paddr + done;
                mem.write_slice(&buf[..n], GuestAddress(addr))
                    .map_err(|e| copy_err(addr, e))?;
                done += n as u64;
            }
        }
    }
    Ok(kernel_end)
}

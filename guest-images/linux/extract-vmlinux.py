#!/usr/bin/env python3
"""Extract the uncompressed vmlinux ELF from an x86 bzImage (like the kernel's scripts/extract-vmlinux).

    extract-vmlinux.py BZIMAGE OUTPUT

First it reads the boot protocol header (setup_sects, payload_offset, payload_length: boot protocol
2.08+) to find the compressed payload exactly; if that fails it scans the file for the magic of each
compression the kernel supports. The payload is decompressed (gzip, xz, lzma, bzip2 with Python's
modules; zstd, lz4 and lzo through their command line tools) and kept only if the result is an ELF.
Prints the compression used on stdout.
"""
import bz2
import lzma
import shutil
import struct
import subprocess
import sys
import zlib

MAGICS = [
    ("gzip", b"\x1f\x8b\x08"),
    ("xz", b"\xfd7zXZ\x00"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("bzip2", b"BZh"),
    ("lzma", b"\x5d\x00\x00"),
    ("lz4", b"\x02\x21\x4c\x18"),
    ("lzo", b"\x89LZO"),
]
TOOLS = {"zstd": ["zstd", "-dcq"], "lz4": ["lz4", "-dcq"], "lzo": ["lzop", "-dcq"]}


def decompress(kind, data):
    """Decompress the first stream of `data`; trailing bytes are ignored. Returns bytes or None."""
    try:
        if kind == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
        if kind == "xz":
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
        if kind == "lzma":
            return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)
        if kind == "bzip2":
            return bz2.BZ2Decompressor().decompress(data)
        tool = TOOLS[kind]
        if shutil.which(tool[0]) is None:
            sys.stderr.write(f"extract-vmlinux: payload looks like {kind}, but '{tool[0]}' is not installed\n")
            return None
        # The tools may complain about the bytes after the stream (the kernel appends the
        # uncompressed size): judge by the output, not the exit status.
        return subprocess.run(tool, input=data, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout
    except (lzma.LZMAError, OSError, EOFError, zlib.error, ValueError):
        return None


def is_elf(b):
    return b is not None and len(b) > 64 and b[:4] == b"\x7fELF"


def from_header(img):
    """The payload per the boot protocol header, or None."""
    if len(img) < 0x250 or img[0x202:0x206] != b"HdrS":
        return None
    (version,) = struct.unpack_from("<H", img, 0x206)
    if version < 0x208:
        return None
    setup_sects = img[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", img, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    if payload_length == 0 or start + payload_length > len(img):
        return None
    return img[start : start + payload_length]


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, dst = sys.argv[1], sys.argv[2]
    img = open(src, "rb").read()
    if img[:4] == b"\x7fELF":
        sys.exit(f"extract-vmlinux: {src} is already an ELF, not a bzImage")
    payload = from_header(img)
    if payload is not None:
        for kind, magic in MAGICS:
            if payload.startswith(magic):
                out = decompress(kind, payload)
                if is_elf(out):
                    open(dst, "wb").write(out)
                    print(kind)
                    return
    # Fallback: scan for every magic, like scripts/extract-vmlinux.
    for kind, magic in MAGICS:
        pos = img.find(magic)
        while pos != -1:
            out = decompress(kind, img[pos:])
            if is_elf(out):
                open(dst, "wb").write(out)
                print(kind)
                return
            pos = img.find(magic, pos + 1)
    sys.exit(f"extract-vmlinux: no compressed ELF payload found in {src}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Write a newc ("070701") cpio archive of a directory tree, for a Linux initramfs.

    mkcpio.py ROOTDIR OUTPUT [--node PATH:c|b:MAJOR:MINOR:MODE]...

Deterministic (sorted names, mtime 0, inode numbers in order), every entry owned by root, and
device nodes added from the command line, so no root privileges or mknod are needed at build time.
Regular files, directories and symlinks are taken from ROOTDIR with their permission bits.
"""
import os
import stat
import sys


def header(ino, mode, nlink, size, rmajor, rminor, name):
    namesize = len(name) + 1
    fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, rmajor, rminor, namesize, 0]
    h = b"070701" + b"".join(b"%08X" % f for f in fields) + name + b"\0"
    return h + b"\0" * (-len(h) % 4)


def main():
    args = sys.argv[1:]
    if len(args) < 2:
        sys.exit(__doc__)
    root, out = args[0], args[1]
    nodes = []
    rest = args[2:]
    while rest:
        if rest[0] != "--node" or len(rest) < 2:
            sys.exit(__doc__)
        path, kind, major, minor, mode = rest[1].split(":")
        nodes.append((path.strip("/"), kind, int(major), int(minor), int(mode, 8)))
        rest = rest[2:]

    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for n in sorted(dirnames + filenames):
            full = os.path.join(dirpath, n)
            entries.append(os.path.relpath(full, root))
    node_paths = {n[0] for n in nodes}
    entries = sorted(e for e in entries if e not in node_paths)

    ino = 1
    with open(out, "wb") as f:
        for rel in entries:
            full = os.path.join(root, rel)
            st = os.lstat(full)
            name = rel.encode()
            perm = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                data = os.readlink(full).encode()
                f.write(header(ino, stat.S_IFLNK | 0o777, 1, len(data), 0, 0, name))
                f.write(data + b"\0" * (-len(data) % 4))
            elif stat.S_ISDIR(st.st_mode):
                f.write(header(ino, stat.S_IFDIR | perm, 2, 0, 0, 0, name))
            elif stat.S_ISREG(st.st_mode):
                data = open(full, "rb").read()
                f.write(header(ino, stat.S_IFREG | perm, 1, len(data), 0, 0, name))
                f.write(data + b"\0" * (-len(data) % 4))
            else:
                sys.exit(f"mkcpio: unsupported file type: {full}")
            ino += 1
        for path, kind, major, minor, mode in sorted(nodes):
            ftype = stat.S_IFCHR if kind == "c" else stat.S_IFBLK
            f.write(header(ino, ftype | mode, 1, 0, major, minor, path.encode()))
            ino += 1
        f.write(header(ino, 0, 1, 0, 0, 0, b"TRAILER!!!"))
        # Pad to a 512-byte multiple, as cpio does.
        pos = f.tell()
        f.write(b"\0" * (-pos % 512))


if __name__ == "__main__":
    main()

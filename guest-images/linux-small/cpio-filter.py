#!/usr/bin/env python3
"""Copy a newc ("070701") cpio archive, leaving out some paths and adding empty directories.

    cpio-filter.py INPUT OUTPUT [--drop PREFIX]... [--add-dir PATH]...

--drop PREFIX leaves out PREFIX itself and everything under it; --add-dir PATH adds a root-owned
0755 directory (parents too, unless present). Entries keep their order, fields and data; added
directories go before the trailer. Used by build-linux-small.sh to make the small guest's
initramfs from the Debian guest's (mkcpio.py wrote that one: no root, device nodes included).
"""
import sys

MAGIC = b"070701"


def parse(data):
    """Yield (fields, name, body) for each entry up to (not including) the trailer."""
    pos = 0
    while True:
        if data[pos:pos + 6] != MAGIC:
            sys.exit(f"cpio-filter: no newc header at offset {pos}")
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name_start = pos + 110
        name = data[name_start:name_start + namesize - 1]
        body_start = name_start + namesize
        body_start += -body_start % 4
        body = data[body_start:body_start + filesize]
        pos = body_start + filesize
        pos += -pos % 4
        if name == b"TRAILER!!!":
            return
        yield fields, name, body


def entry(fields, name, body):
    fields = list(fields)
    fields[11] = len(name) + 1
    fields[6] = len(body)
    h = MAGIC + b"".join(b"%08X" % f for f in fields) + name + b"\0"
    h += b"\0" * (-len(h) % 4)
    return h + body + b"\0" * (-len(body) % 4)


def main():
    args = sys.argv[1:]
    if len(args) < 2:
        sys.exit(__doc__)
    src, out = args[0], args[1]
    drops, adds = [], []
    rest = args[2:]
    while rest:
        if len(rest) < 2 or rest[0] not in ("--drop", "--add-dir"):
            sys.exit(__doc__)
        (drops if rest[0] == "--drop" else adds).append(rest[1].strip("/").encode())
        rest = rest[2:]

    data = open(src, "rb").read()
    kept, names, ino = [], set(), 0
    for fields, name, body in parse(data):
        ino = max(ino, fields[0])
        if any(name == d or name.startswith(d + b"/") for d in drops):
            continue
        kept.append((fields, name, body))
        names.add(name)
    for path in adds:
        parts = path.split(b"/")
        for i in range(1, len(parts) + 1):
            d = b"/".join(parts[:i])
            if d in names:
                continue
            ino += 1
            kept.append(([ino, 0o40755, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0], d, b""))
            names.add(d)
    with open(out, "wb") as f:
        for fields, name, body in kept:
            f.write(entry(fields, name, body))
        f.write(entry([ino + 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0], b"TRAILER!!!", b""))
        f.write(b"\0" * (-f.tell() % 512))


if __name__ == "__main__":
    main()

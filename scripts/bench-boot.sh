#!/usr/bin/env bash
# Boot benchmark: wall time from process start to the test guest's banner, wbvmm vs
# QEMU's fastest configuration (-machine microvm) on the same PVH ELF, in alternating
# runs; plus wbvmm's own setup time and resident memory beyond guest RAM.
#
#   scripts/bench-boot.sh [RUNS]      (default 11 runs of each)
#
# Prints each side's median and, as the last line, `ratio qemu/wbvmm: X.XX`.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUNS=${1:-11}
WBVMM="$REPO/target/release/wbvmm"
ELF="$REPO/guest-images/out/testguest.elf"
for f in "$WBVMM" "$ELF"; do [ -e "$f" ] || { echo "bench-boot: $f is missing; run scripts/setup.sh" >&2; exit 1; }; done
command -v qemu-system-x86_64 >/dev/null || { echo "bench-boot: qemu-system-x86_64 is missing; run scripts/setup.sh" >&2; exit 1; }

exec python3 - "$RUNS" "$WBVMM" "$ELF" <<'PY'
import os, re, statistics, subprocess, sys, time

runs, wbvmm, elf = int(sys.argv[1]), sys.argv[2], sys.argv[3]
BANNER = b"testguest ready"

def time_to_banner(argv, env=None):
    """Seconds from spawn to the banner on stdout; also returns stderr."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    buf = b""
    t = None
    while True:
        chunk = os.read(p.stdout.fileno(), 4096)
        if not chunk:
            break
        buf += chunk
        if t is None and BANNER in buf:
            t = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace")
    p.wait(timeout=60)
    if t is None:
        sys.exit(f"bench-boot: no banner from {argv[0]}:\n{buf.decode(errors='replace')}\n{err}")
    return t, err

w_argv = [wbvmm, "--kernel", elf, "--memory", "256M", "--cmdline", "banner"]
q_argv = ["qemu-system-x86_64", "-enable-kvm", "-cpu", "qemu64,-cx16", "-machine", "microvm",
          "-m", "256M", "-display", "none", "-serial", "stdio", "-no-reboot", "-nodefaults",
          "-kernel", elf, "-append", "banner", "-device", "isa-debug-exit,iobase=0xf4,iosize=4"]
env = dict(os.environ, RUST_LOG="wbvmm=info")
w, q, setup, rss = [], [], [], []
for i in range(runs):
    t, err = time_to_banner(w_argv, env)
    w.append(t)
    m = re.search(r"setup (\d+) us .* resident overhead (\d+) KiB", err)
    if m:
        setup.append(int(m.group(1)) / 1000.0)
        rss.append(int(m.group(2)) / 1024.0)
    t, _ = time_to_banner(q_argv)
    q.append(t)

med = statistics.median
print(f"runs: {runs} each, alternating (wbvmm, qemu microvm), 256 MiB guest, same ELF")
print(f"wbvmm  banner: median {med(w)*1000:8.1f} ms  (min {min(w)*1000:.1f}, max {max(w)*1000:.1f})")
print(f"qemu   banner: median {med(q)*1000:8.1f} ms  (min {min(q)*1000:.1f}, max {max(q)*1000:.1f})")
if setup:
    print(f"wbvmm setup (process start to first KVM_RUN): median {med(setup):.2f} ms  (target < 5 ms)")
    print(f"wbvmm resident memory beyond guest RAM: median {med(rss):.1f} MiB  (target < 10 MiB)")
print(f"ratio qemu/wbvmm: {med(q)/med(w):.2f}")
PY

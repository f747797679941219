#!/usr/bin/env bash
# The 2011 memslot debate on a live guest: for each slot index (wbtree, size-sorted,
# linear, binary, btree), slot count and MMIO-miss cache setting, boot the test guest
# and measure
#   - the exit path: MMIO reads of an unmapped address (the rtl8139 case of 2011: most
#     exits miss every memslot), timed by the guest, and nodes the mirror visits;
#   - the DMA path: the RTL8139's descriptor and buffer accesses during a 1-byte TCP
#     echo test (net=rr) through a tap, nodes visited per lookup, and trans/s.
#
#   scripts/memslot-experiment.sh [--slots 8,509,4096] [--reads N] [--secs S]
#
# Traffic stays in a private network namespace (169.254.40.0/24), bounded in time.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec python3 - "$REPO" "$@" <<'PY'
import argparse, json, os, re, signal, subprocess, sys, tempfile, time

repo = sys.argv[1]
ap = argparse.ArgumentParser(prog="memslot-experiment.sh")
ap.add_argument("--slots", default="8,509,4096")
ap.add_argument("--reads", type=int, default=3000)
ap.add_argument("--secs", type=int, default=2)
ap.add_argument("--indexes", default="wbtree,size-sorted,linear,binary,btree")
a = ap.parse_args(sys.argv[2:])
wbvmm = os.path.join(repo, "target/release/wbvmm")
elf = os.path.join(repo, "guest-images/out/testguest.elf")
for f in (wbvmm, elf):
    if not os.path.exists(f):
        sys.exit(f"memslot-experiment: {f} is missing; run scripts/setup.sh")

ns = f"wbvmm-memx-{os.getpid()}"
started = []
def sh(*cmd, check=True):
    return subprocess.run(cmd, check=check, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
def cleanup(*_):
    for p in started:
        try: p.kill()
        except Exception: pass
    sh("ip", "netns", "del", ns, check=False)
signal.signal(signal.SIGINT, lambda *_: (cleanup(), sys.exit(130)))
signal.signal(signal.SIGTERM, lambda *_: (cleanup(), sys.exit(143)))
try:
    sh("ip", "netns", "add", ns)
    nx = ("ip", "netns", "exec", ns)
    sh(*nx, "ip", "link", "set", "lo", "up")
    sh(*nx, "ip", "tuntap", "add", "wbx0", "mode", "tap")
    sh(*nx, "ip", "addr", "add", "169.254.40.1/24", "dev", "wbx0")
    sh(*nx, "ip", "link", "set", "wbx0", "up")
    total_secs = 60 + 8 * len(a.indexes.split(",")) * len(a.slots.split(",")) * (a.secs + 3)
    started.append(subprocess.Popen([*nx, "timeout", str(total_secs), "socat",
                                     "TCP-LISTEN:7777,reuseaddr,fork", "PIPE"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(0.3)

    def run(index, slots, cache, words, net):
        with tempfile.NamedTemporaryFile(suffix=".json") as st:
            cmd = [*nx, wbvmm, "--kernel", elf, "--mem-slots", str(slots), "--slot-index", index,
                   "--mmio-cache", cache, "--cpu-affinity", "0=1", "--io-affinity", "0",
                   f"--stats={st.name}", "--cmdline", words]
            if net:
                cmd[len(nx) + 1:len(nx) + 1] = ["--net", "tap=wbx0"]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if out.returncode != 0:
                sys.exit(f"memslot-experiment: {' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
            return out.stdout, json.load(open(st.name))

    print(f"{'index':<12}{'slots':>6} {'cache':<5}{'ns/exit':>10}{'exit nodes':>11}"
          f"{'dma lookups':>12}{'dma nodes':>10}{'dma max':>8}{'rr trans/s':>12}")
    for slots in [int(s) for s in a.slots.split(",")]:
        for index in a.indexes.split(","):
            for cache in ("on", "off"):
                o, s = run(index, slots, cache, f"mmio-loop=0xd0000000,{a.reads}", False)
                ns_read = float(re.search(r"= ([\d.]+) ns/read", o).group(1))
                ex = s["memory"]["lookups"]["exit"]
                dma_l = dma_n = dma_m = rr = "-"
                if cache == "on":
                    o, s = run(index, slots, cache,
                               f"net=rr ip=169.254.40.2/24 peer=169.254.40.1 port=7777 secs={a.secs}", True)
                    d = s["memory"]["lookups"]["dma"]
                    dma_l, dma_n, dma_m = d["lookups"], f"{d['mean_nodes']:.2f}", d["max_nodes"]
                    rr = re.search(r"= ([\d.]+) trans/s", o).group(1)
                print(f"{index:<12}{slots:>6} {cache:<5}{ns_read:>10.0f}{ex['mean_nodes']:>11.2f}"
                      f"{dma_l:>12}{dma_n:>10}{dma_m:>8}{rr:>12}", flush=True)
    print("ns/exit: the guest's time per MMIO read of an unmapped address (exit + routing);"
          " exit nodes: mean nodes the mirror visited per exit-path lookup (only cache misses"
          " reach it); dma: the NIC's guest-physical lookups during net=rr")
finally:
    cleanup()
PY

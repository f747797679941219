#!/bin/bash
# wbvmm side by side with QEMU, measured by the host's own netperf: the same test guest ELF serves
# netperf's TCP_RR (`net=netserver`, a responder for netperf 2.7's control protocol) on QEMU's rtl8139
# and on wbvmm's RTL8139 (rev 0x20 on both), in C mode (nic=c) and C+ mode (nic=cplus); the host's
# unmodified `netperf -t TCP_RR -- -r S,S` is the client, and its result is the headline figure.
#
#   scripts/compare-qemu.sh [options]
#
#   --runs N          runs per side and row, alternating wbvmm, QEMU, wbvmm, ... (default 5)
#   --secs N          netperf's test length (-l) of each TCP_RR run (default 3)
#   --modes LIST      comma-separated, from c,cplus (default c,cplus)
#   --sizes LIST      TCP_RR request=response sizes in bytes, comma-separated, 1..65536
#                     (default 1,64,1024,8192)
#   --drivers LIST    the guest driver's data path, from lean,linux,irq (default lean,linux,irq):
#                     lean (nicdrv=lean) touches the fewest registers (IMR = 0, descriptors in RAM);
#                     linux (nicdrv=linux) does per packet what 8139cp / 8139too do (IntrStatus read
#                     and ack, IntrMask masked around a NAPI-like poll, TX completion from descriptors
#                     / TSD status), with IntrStatus polled instead of the interrupt; irq
#                     (nicdrv=linux-irq) is that sequence woken by the NIC's real INTx interrupt. A
#                     guest that does not know a driver word (`bad nicdrv`) has that driver's rows
#                     skipped, loudly.
#   --stream-bytes N  the bulk stream: netperf TCP_STREAM into the guest, counted in bytes
#                     (`-l -N`, so its length never depends on the machine's speed), once per mode
#                     per run with the lean driver (default 67108864: long enough that /proc's
#                     10 ms CPU ticks and the connection's start are small beside it; 0 = no stream)
#   --out DIR         where results.json and the chart go (default out/compare-qemu)
#   --chart PATH      the chart (SVG or PNG by its name; default DIR/chart.svg), drawn with
#                     python3-matplotlib: netperf trans/s and exits per transaction, both VMMs,
#                     every driver, mode and size, the floor, and the stream's MB/s
#   --replot JSON     only redraw the chart from an earlier run's results.json (no VM, no root)
#   --nicio linux|pio|mmio  how the guest driver reaches the registers (default linux: as the
#                     drivers of Debian's kernel do, through the MMIO BAR in both modes (8139cp maps
#                     only BAR1; Debian builds 8139too without CONFIG_8139TOO_PIO, the Kconfig
#                     default, so it maps BAR1 too); wbvmm's default `shadow=auto` then serves their
#                     register reads from its read-only register page; the lean driver, which reads
#                     almost no registers, uses port I/O for its TX doorbell, the cheaper exit here.
#                     `--nicio pio` runs 8139too's sequence as a CONFIG_8139TOO_PIO=y kernel does)
#   --pin on|off      pinning (default on with >= 2 host CPUs): the vCPU thread on --vcpu-cpu
#                     (default 1), wbvmm's I/O thread / QEMU's other threads (`taskset -c` on the
#                     QEMU process, its vCPU thread moved after start) on --io-cpu (default 0),
#                     netperf on --peer-cpu (default 0)
#   --vcpu-cpu N, --io-cpu N, --peer-cpu N
#   --wbvmm-net OPTS  extra options for wbvmm's --net tap=...,rev=0x20 (e.g. tx=exit)
#   --qemu-bios qboot|seabios  QEMU's firmware (default qboot where Debian ships it: SeaBIOS runs at
#                     CPL0, which a nested PVM host emulates, ~20 s per boot; the NIC model and the
#                     timed part are the same either way)
#   --elf PATH        guest ELF (default guest-images/out/testguest.elf)
#   --wbvmm PATH      wbvmm binary (default target/release/wbvmm)
#   --no-floor        skip the no-VM floor measurement
#   --verbose         print each run's guest console
#
# What is measured, and how (each figure over the same window: from the guest's `netserver:
# listening` line, before netperf starts, to the guest's result line after netperf has ended):
# - trans/s: netperf's own THROUGHPUT (`-P 0 -- -k ...`); transactions: netperf's received bytes /
#   the response size. The medians per side, mode and size are compared. The guest's own count and
#   rate (`netserver: TCP_RR N transactions in T s`) are printed beside it as a cross-check.
# - host CPU per transaction: utime+stime of the whole VMM process from /proc/PID/stat (all its
#   threads, also those that ended), split into the vCPU thread (/proc/PID/task/TID/stat; the guest
#   polls, so this is ~100% of the window for both VMMs) and all the others (I/O, main, workers).
# - exits per transaction: wbvmm's exits to userspace (io_in+io_out+mmio_read+mmio_write) and KVM's
#   own exit count from two SIGUSR1 --stats snapshots; QEMU's from KVM's statistics through QMP
#   `query-stats` (`exits`, and `io_exits`+`mmio_exits`, which this host's kvm_pvm leaves at 0).
#   The window holds the control exchange and ~4 console lines (QEMU: one exit per console byte,
#   ~0.01 per transaction in a 3 s run; wbvmm: none, COM1 goes through KVM's coalesced ring).
# - the floor: netperf TCP_RR with the same sizes between two namespaces joined by a veth, with no
#   VM: netserver pinned where the vCPU runs and netperf where it runs in the VM runs, and both on
#   netperf's CPU.
#
# - the stream: netperf's own THROUGHPUT (10^6 bits/s) / 8 = MB/s (10^6 bytes); netperf's bytes sent
#   against the guest's bytes received (`netserver: TCP_STREAM N bytes ...`, equal in every run);
#   CPU and exits per MB (10^6 bytes) over the same window. The test guest's C+ driver leaves
#   the checksums of what it sends (here its ACKs) to the chip (`csum=offload`, as 8139cp) and
#   verifies received ones in software; the stream carries data into the guest, so TSO (a TX
#   feature, which smoltcp's MSS-sized segments would not use) does not apply; see the README.
#
# Goals (issue 11): lean and linux RR rows >= 2.0x QEMU in both revisions; irq rows >= 1.2x (the
# guest's CPL0 handler runs in KVM's instruction emulator on a nested host and costs both VMMs the
# same); C+ >= 0.9x the no-VM floor; the stream >= 2x QEMU. Each row prints its goal and whether it
# met it. The last line, `ratio wbvmm/qemu: X.XX`, is the smallest wbvmm/QEMU ratio of netperf
# medians over the rows that carry the 2x goal (TCP_RR, drivers lean and linux, every mode and size);
# the irq rows and the stream are printed with their goals but are not part of it (when only irq
# rows ran, it is their smallest). It reads n/a when any of those rows has no median.
#
# Duration: about runs x (rows x 2 x (secs + ~5 s boot and teardown) + floor runs + streams); the
# script prints its estimate before it starts.
#
# Network: namespaces this script creates (wbvmm-cmp-PID with a tap at 169.254.30.1/24, guest
# 169.254.30.2; wbvmm-cmpa-PID/wbvmm-cmpb-PID with a veth at 169.254.31.1/.2), nothing else. Every
# wait is bounded; on any exit (Ctrl-C too) it kills the processes it started, by PID, and deletes
# the namespaces. Needs root, /dev/kvm, qemu-system-x86, netperf, iproute2, python3.
# Debian's python3 first: python3-matplotlib (the chart) is installed for it, and a python3 earlier
# in PATH (pyenv, a venv) may not see it.
PYTHON3=/usr/bin/python3
[ -x "$PYTHON3" ] || PYTHON3=python3
exec "$PYTHON3" - "$0" "$@" <<'PYTHON'
import atexit
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

SCRIPT = sys.argv[1]
ARGS = sys.argv[2:]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(SCRIPT)))
QBOOT = "/usr/share/qemu/qboot.rom"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def usage():
    with open(SCRIPT) as f:
        lines = f.read().splitlines()[1:]
    for l in lines:
        if not l.startswith("#"):
            break
        print(l[2:] if l.startswith("# ") else l[1:])


def die(msg, hint=None, code=1):
    print(f"error: {msg}", file=sys.stderr)
    if hint:
        print(f"  what to do: {hint}", file=sys.stderr)
    sys.exit(code)


# ---------------------------------------------------------------------------------------------
# options
ncpu = os.cpu_count() or 1
opt = dict(runs=5, secs=3, modes="c,cplus", sizes="1,64,1024,8192", drivers="lean,linux,irq", nicio="linux",
           stream_bytes=64 * 1024 * 1024, out=None, chart=None, replot=None, pin="on" if ncpu >= 2 else "off",
           vcpu_cpu=1, io_cpu=0, peer_cpu=0, elf=None, wbvmm=None, wbvmm_net="",
           qemu_bios="qboot" if os.path.exists(QBOOT) else "seabios", floor=True, verbose=False)
i = 0
while i < len(ARGS):
    a = ARGS[i]
    def val():
        if i + 1 >= len(ARGS):
            die(f"{a} needs a value", f"see {SCRIPT} --help", 2)
        return ARGS[i + 1]
    if a in ("-h", "--help"):
        usage()
        sys.exit(0)
    elif a in ("--runs", "--secs", "--vcpu-cpu", "--io-cpu", "--peer-cpu", "--stream-bytes"):
        v = val()
        if not v.isdigit():
            die(f"{a} wants a whole number, got '{v}'", None, 2)
        opt[a[2:].replace("-", "_")] = int(v)
        i += 2
    elif a in ("--modes", "--sizes", "--drivers", "--nicio", "--pin", "--elf", "--wbvmm", "--wbvmm-net", "--qemu-bios",
               "--out", "--chart", "--replot"):
        opt[a[2:].replace("-", "_")] = val()
        i += 2
    elif a == "--no-floor":
        opt["floor"] = False
        i += 1
    elif a == "--verbose":
        opt["verbose"] = True
        i += 1
    else:
        die(f"unknown option {a}", f"see {SCRIPT} --help", 2)

# The guest's word for each driver, and the wbvmm/QEMU goal its TCP_RR rows carry (issue 11).
DRIVER_WORD = {"lean": "lean", "linux": "linux", "irq": "linux-irq"}
GOAL = {"lean": 2.0, "linux": 2.0, "irq": 1.2}
# The rows the last line is taken over.
LAST_LINE_DRIVERS = ("lean", "linux")
STREAM_GOAL = 2.0
FLOOR_GOAL = 0.9
out_dir = opt["out"] or os.path.join(ROOT, "out", "compare-qemu")
chart_path = opt["chart"] or os.path.join(out_dir, "chart.svg")
if opt["replot"]:
    # Defined further down; the replot needs neither root nor KVM.
    REPLOT_ONLY = True
else:
    REPLOT_ONLY = False

runs, secs = opt["runs"], opt["secs"]
modes = [m for m in opt["modes"].split(",") if m]
if not 1 <= runs <= 50:
    die("--runs must be 1..50", None, 2)
if not 1 <= secs <= 60:
    die("--secs must be 1..60", None, 2)
if not modes or any(m not in ("c", "cplus") for m in modes):
    die(f"--modes wants a list from c,cplus, got '{opt['modes']}'", None, 2)
drivers = [d for d in opt["drivers"].split(",") if d]
if not drivers or any(d not in DRIVER_WORD for d in drivers):
    die(f"--drivers wants a list from lean,linux,irq, got '{opt['drivers']}'", None, 2)
stream_bytes = opt["stream_bytes"]
if stream_bytes and not 65536 <= stream_bytes <= 1 << 30:
    die("--stream-bytes must be 0 (no stream) or 65536..1073741824", None, 2)
try:
    sizes = [int(s) for s in opt["sizes"].split(",") if s]
except ValueError:
    sizes = []
if not sizes or any(not 1 <= s <= 65536 for s in sizes):
    die(f"--sizes wants a list of byte counts 1..65536, got '{opt['sizes']}'", None, 2)
if opt["nicio"] not in ("linux", "pio", "mmio"):
    die("--nicio must be linux, pio or mmio", None, 2)


def nicio_for(driver, mode):
    """The register path of a row: --nicio, or with `linux` the one Debian's drivers use for
    the Linux-shaped rows (the MMIO BAR, both modes), and port I/O for the lean driver (its only
    register access is the TX doorbell, which costs least as an `out`: measured 37.5 vs 44 us per
    transaction)."""
    if opt["nicio"] != "linux":
        return opt["nicio"]
    return "pio" if driver == "lean" else "mmio"
if opt["pin"] not in ("on", "off"):
    die("--pin must be on or off", None, 2)
if opt["qemu_bios"] not in ("qboot", "seabios"):
    die("--qemu-bios must be qboot or seabios", None, 2)
if opt["qemu_bios"] == "qboot" and not os.path.exists(QBOOT):
    die(f"no {QBOOT}", "install Debian's qemu-system-data, or use --qemu-bios seabios")
pin = opt["pin"] == "on"
if pin:
    for k in ("vcpu_cpu", "io_cpu", "peer_cpu"):
        if opt[k] >= ncpu:
            die(f"CPU {opt[k]} does not exist (this host has {ncpu})", "pick other CPUs or --pin off", 2)


# ---------------------------------------------------------------------------------------------
# the chart (from the results as written to results.json, so that --replot draws the same)
def draw_chart(data, path):
    """trans/s and exits per transaction for every TCP_RR row, both VMMs, with the floor; the
    stream's MB/s. Returns None, or why no chart was drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no matplotlib ({e}): install Debian's python3-matplotlib (scripts/setup.sh does)"
    rr = [r for r in data["rows"] if r["kind"] == "rr"]
    st = [r for r in data["rows"] if r["kind"] == "stream"]
    if not rr and not st:
        return "no rows to draw"
    colours = {"wbvmm": "#1f77b4", "qemu": "#d62728"}
    panels = (2 if rr else 0) + (1 if st else 0)
    width = max(11.0, 0.55 * len(rr) + 4.5)
    fig, axes = plt.subplots(panels, 1, figsize=(width, 3.6 * panels), squeeze=False,
                             gridspec_kw={"height_ratios": ([3, 2] if rr else []) + ([1.6] if st else [])})
    axes = [a[0] for a in axes]
    m = data["meta"]
    pr0, pr1 = m.get("probe_start") or {}, m.get("probe_end") or {}

    def pf(d, k):
        v = d.get(k)
        return "?" if v is None else f"{v:.1f}"
    fig.suptitle(f"wbvmm vs QEMU {m.get('qemu_version', '')}: the host's netperf against the test guest's netserver, "
                 f"medians of {m.get('runs')} alternating runs, TCP_RR {m.get('secs')} s each ({m.get('date', '')})\n"
                 f"wbvmm probe: MMIO exit round trip CPL0 {pf(pr0, 'mmio_exit_cpl0_us')} / CPL3 "
                 f"{pf(pr0, 'mmio_exit_cpl3_us')} us at start, {pf(pr1, 'mmio_exit_cpl0_us')} / "
                 f"{pf(pr1, 'mmio_exit_cpl3_us')} us at end; load {m.get('load_start', '?')} -> {m.get('load_end', '?')}",
                 fontsize=9)
    mode_name = {"c": "C", "cplus": "C+"}
    ai = 0
    if rr:
        xs = list(range(len(rr)))
        labels = [f"{r['driver']}\n{mode_name.get(r['mode'], r['mode'])}\n{r['size']} B" for r in rr]
        ax = axes[ai]
        ai += 1
        w = 0.38
        for k, side in enumerate(("wbvmm", "qemu")):
            ys = [r[side]["tps"] or 0 for r in rr]
            ax.bar([x + (k - 0.5) * w for x in xs], ys, w, label=side, color=colours[side])
        floor = {int(k): v for k, v in (data.get("floor_rr") or {}).items() if v}
        fx = [x for x, r in zip(xs, rr) if r["size"] in floor]
        if fx:
            ax.scatter(fx, [floor[rr[x]["size"]] for x in fx], marker="_", s=300, color="black", zorder=3,
                       label="no-VM floor")
        for x, r in zip(xs, rr):
            if r.get("ratio"):
                top = max(r["wbvmm"]["tps"] or 0, r["qemu"]["tps"] or 0)
                ax.annotate(f"{r['ratio']:.2f}x", (x, top), textcoords="offset points", xytext=(0, 3),
                            ha="center", fontsize=7,
                            color="black" if r["ratio"] >= r["goal"] else "#b00000")
        ax.set_yscale("log")
        ax.set_ylabel("netperf trans/s (log)")
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title("TCP_RR trans/s; labels wbvmm/QEMU, red below the row's goal (2.0x; irq 1.2x); floor: no VM, veth",
                     fontsize=9)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))
        ax.grid(axis="y", which="both", alpha=0.3)

        ax = axes[ai]
        ai += 1
        w = 0.27
        series = (("wbvmm", "kvm", "wbvmm: KVM exits", colours["wbvmm"], None),
                  ("wbvmm", "user", "wbvmm: exits to userspace", "#9ecae1", None),
                  ("qemu", "kvm", "QEMU: KVM exits\n(its I/O exits go to QEMU)", colours["qemu"], None))
        floor_y = 1e-3
        for k, (side, key, label, colour, _) in enumerate(series):
            ys = [max(r[side].get(key) or 0, floor_y) if r[side].get(key) is not None else 0 for r in rr]
            ax.bar([x + (k - 1) * w for x in xs], ys, w, label=label, color=colour)
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor_y)
        ax.set_ylabel("exits per transaction (log)")
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(f"exits per transaction (values below {floor_y} drawn at {floor_y})", fontsize=9)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))
        ax.grid(axis="y", which="both", alpha=0.3)
    if st:
        ax = axes[ai]
        xs = list(range(len(st)))
        w = 0.38
        for k, side in enumerate(("wbvmm", "qemu")):
            ax.barh([x + (k - 0.5) * w for x in xs], [r[side]["tps"] or 0 for r in st], w, label=side, color=colours[side])
        for x, r in zip(xs, st):
            if r.get("ratio"):
                ax.annotate(f"{r['ratio']:.2f}x", (max(r["wbvmm"]["tps"] or 0, r["qemu"]["tps"] or 0), x),
                            textcoords="offset points", xytext=(4, -3), fontsize=7)
        ax.set_yticks(xs)
        ax.set_yticklabels([f"{mode_name.get(r['mode'], r['mode'])} {r['driver']}" for r in st], fontsize=8)
        fl = data.get("floor_stream")
        title = f"bulk TCP_STREAM into the guest, {st[0]['size']} bytes counted (-l -N), MB/s (10^6 bytes)"
        if fl:
            title += f"; no-VM floor {fl:.0f} MB/s"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("MB/s")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return None


if REPLOT_ONLY:
    try:
        with open(opt["replot"]) as f:
            replot_data = json.load(f)
    except (OSError, ValueError) as e:
        die(f"cannot read {opt['replot']}: {e}", "give the results.json an earlier run wrote", 2)
    why = draw_chart(replot_data, chart_path)
    if why:
        die(f"no chart: {why}")
    print(f"chart: {chart_path}")
    sys.exit(0)

if os.geteuid() != 0:
    die("needs root (network namespaces, tap)", "run as root")
if not os.path.exists("/dev/kvm"):
    die("/dev/kvm missing", "run on a host with KVM")
for cmd, pkg in (("qemu-system-x86_64", "qemu-system-x86"), ("netperf", "netperf"), ("netserver", "netperf"),
                 ("ip", "iproute2"), ("taskset", "util-linux")):
    if subprocess.run(["sh", "-c", f"command -v {cmd}"], stdout=subprocess.DEVNULL).returncode != 0:
        die(f"'{cmd}' not found", f"install the Debian package '{pkg}' (scripts/setup.sh does)")
elf = opt["elf"] or os.path.join(ROOT, "guest-images/out/testguest.elf")
if not os.path.isfile(elf):
    die(f"no guest ELF at {elf}", "run scripts/setup.sh (or guest-images/build-testguest.sh)")
wbvmm = opt["wbvmm"] or os.path.join(ROOT, "target/release/wbvmm")
if not os.access(wbvmm, os.X_OK):
    die(f"no wbvmm binary at {wbvmm}", "run scripts/setup.sh or cargo build --release")

# ---------------------------------------------------------------------------------------------
# process and namespace bookkeeping: kill only what we started, delete only our namespaces
procs = []
namespaces = []
work = tempfile.mkdtemp(prefix="wbvmm-compare.")


def children(pid):
    r = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(x) for x in r.stdout.split()]


def kill_proc(p, grace=3.0):
    """Stop a Popen we started, and its direct children (netserver forks), by PID."""
    if p is None or p.poll() is not None:
        return
    kids = children(p.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in [p.pid] + kids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            p.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            pass


def cleanup():
    for p in reversed(procs):
        kill_proc(p)
    for n in namespaces:
        subprocess.run(["ip", "netns", "del", n], stderr=subprocess.DEVNULL)
    subprocess.run(["rm", "-rf", work])


def on_signal(sig, frame):
    print("interrupted; cleaning up", file=sys.stderr)
    raise SystemExit(130)


atexit.register(cleanup)
signal.signal(signal.SIGINT, on_signal)
signal.signal(signal.SIGTERM, on_signal)

# Run a private copy of wbvmm (and of the guest ELF): a rebuild during the comparison must not
# mix two versions in one set of runs.
wbvmm_src, elf_src = wbvmm, elf
wbvmm = os.path.join(work, "wbvmm")
elf = os.path.join(work, "guest.elf")
subprocess.run(["cp", wbvmm_src, wbvmm], check=True)
subprocess.run(["cp", elf_src, elf], check=True)


def sh(*cmd, check=True):
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and r.returncode != 0:
        die(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return r


def in_ns(n, cpu, cmd):
    return ["ip", "netns", "exec", n] + (["taskset", "-c", str(cpu)] if (pin and cpu is not None) else []) + cmd


def spawn(cmd, **kw):
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, **kw)
    procs.append(p)
    return p


def reap(p):
    if p in procs:
        procs.remove(p)


def wait_listen(n, port, tries=50):
    for _ in range(tries):
        r = sh("ip", "netns", "exec", n, "ss", "-ltn", check=False)
        if f":{port} " in r.stdout:
            return True
        time.sleep(0.1)
    return False


def affinity(tid):
    r = sh("taskset", "-pc", str(tid), check=False)
    return r.stdout.strip().split(": ")[-1] if r.returncode == 0 else "?"


def threads_of(pid):
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    out.append((int(tid), f.read().strip()))
            except OSError:
                pass
    except OSError:
        pass
    return sorted(out)


def thread_report(label, pid):
    return [f"  {label:<6} {comm:<16} tid {tid:<7} CPUs {affinity(tid)}" for tid, comm in threads_of(pid)]


def is_vcpu(comm):
    # wbvmm: vcpu0; QEMU: "CPU 0/KVM".
    return comm.startswith("vcpu") or (comm.startswith("CPU ") and comm.endswith("/KVM"))


def stat_secs(path):
    """utime+stime in seconds from a /proc .../stat file (None if it is gone)."""
    try:
        with open(path) as f:
            s = f.read()
    except OSError:
        return None
    fields = s[s.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_times(pid, vcpu_tids=None):
    """(all threads of the process, its vCPU threads) in CPU seconds so far. The vCPU threads are
    `vcpu_tids`, or else those named like one (QEMU names them only with debug-threads=on)."""
    total = stat_secs(f"/proc/{pid}/stat")
    vcpu = 0.0
    for tid, comm in threads_of(pid):
        if (tid in vcpu_tids) if vcpu_tids else is_vcpu(comm):
            vcpu += stat_secs(f"/proc/{pid}/task/{tid}/stat") or 0.0
    return total, vcpu


def wait_serial(path, pattern, limit, proc):
    """Wait until the console file holds a line matching `pattern` (a compiled regex): the match,
    or None when `proc` ended or `limit` seconds passed first."""
    end = time.time() + limit
    while time.time() < end:
        if os.path.exists(path):
            with open(path, errors="replace") as f:
                for line in f.read().replace("\r", "").splitlines():
                    m = pattern.search(line)
                    if m:
                        return m
        if proc.poll() is not None:
            return None
        time.sleep(0.05)
    return None


def read_text(path):
    try:
        with open(path, errors="replace") as f:
            return f.read().replace("\r", "")
    except OSError:
        return ""


LISTEN_RE = re.compile(r"^netserver: listening on ")
GUEST_RR_RE = re.compile(r"^netserver: TCP_RR (\d+) transactions in ([0-9.]+) s = ([0-9.]+) trans/s")
GUEST_STREAM_RE = re.compile(r"^netserver: TCP_STREAM (\d+) bytes in ([0-9.]+) s = ([0-9.]+) MB/s")
# The guest warns about a word it does not know and runs on with its default driver: such a run
# would measure the wrong driver.
BAD_NICDRV_RE = re.compile(r"^net: nicdrv=\S+: bad nicdrv")
GUEST_FAIL_RE = re.compile(r"^(netserver: (test \d+ failed|no control|cannot)|exception:|net: )")
# After the result the guest runs `watch=0x100000,2` (polls RAM at CPL3, no exits) to stay up
# until the second snapshot; its first line means the result lines are all out.
WATCH_RE = re.compile(r"^watch: 0x100000 = ")
NETPERF_KEYS = "THROUGHPUT,THROUGHPUT_UNITS,ELAPSED_TIME,LOCAL_BYTES_SENT,LOCAL_BYTES_RECVD,LOCAL_SEND_CALLS"

# ---------------------------------------------------------------------------------------------
# setup: probe, namespace with tap
try:
    probe = json.loads(sh(wbvmm, "probe", "--json").stdout)
except (ValueError, SystemExit):
    die("wbvmm probe --json failed", f"run '{wbvmm} probe' to see why")
exit_us = probe.get("mmio_exit_cpl3_us")


def probe_fig(key, fmt_):
    v = probe.get(key)
    return "?" if v is None else format(v, fmt_)


help_text = sh(wbvmm, "--help", check=False).stdout
wb_pin_flags = []
wb_pin_mode = "off"
if pin:
    if "--cpu-affinity" in help_text:
        wb_pin_mode = "flags"
        wb_pin_flags = ["--cpu-affinity", f"0={opt['vcpu_cpu']}"]
        if "--io-affinity" in help_text:
            wb_pin_flags += ["--io-affinity", str(opt["io_cpu"])]
    else:
        wb_pin_mode = "taskset"

pid = os.getpid()
ns = f"wbvmm-cmp-{pid}"
tap = f"wbcq{pid}"[:15]
host_ip, guest_ip = "169.254.30.1", "169.254.30.2"
netperf_version = sh("netperf", "-V", check=False).stdout.strip()
qemu_version = (sh("qemu-system-x86_64", "--version", check=False).stdout.split("\n")[0].split("version ")[-1].split(" ")[0])
load_start = " ".join(open("/proc/loadavg").read().split()[:3])


def netperf(n, host, size, port=None, kind="rr"):
    """One netperf run (pinned to the peer CPU): TCP_RR of `size` bytes each way for --secs, or
    (kind "stream") TCP_STREAM of `size` bytes counted (-l -N). (dict of figures, its output)."""
    if kind == "rr":
        test = ["-t", "TCP_RR", "-l", str(secs), "-P", "0", "--", "-r", f"{size},{size}"]
        # Only the failure path waits this long: netperf ends after its own length.
        limit = secs + 60
    else:
        test = ["-t", "TCP_STREAM", "-l", f"-{size}", "-P", "0", "--"]
        # Counted in bytes: bounded by the slowest rate seen (~1 MB/s under heavy load) and a margin.
        limit = 60 + size / 1e5
    cmd = ["netperf", "-H", host] + (["-p", str(port)] if port else []) + test + ["-k", NETPERF_KEYS]
    p = spawn(in_ns(n, opt["peer_cpu"], cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = p.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        kill_proc(p)
        out = b""
    reap(p)
    text = (out or b"").decode("utf-8", "replace")
    kv = dict(l.split("=", 1) for l in text.splitlines() if "=" in l)
    units = "Trans/s" if kind == "rr" else "10^6bits/s"
    if p.returncode != 0 or kv.get("THROUGHPUT_UNITS") != units:
        return None, text
    try:
        if kind == "rr":
            return {"tps": float(kv["THROUGHPUT"]), "n": int(kv["LOCAL_BYTES_RECVD"]) // size,
                    "elapsed": float(kv["ELAPSED_TIME"])}, text
        # MB/s in 10^6 bytes; "n" is the bytes sent, what the guest must have received.
        return {"tps": float(kv["THROUGHPUT"]) / 8, "n": int(kv["LOCAL_BYTES_SENT"]),
                "elapsed": float(kv["ELAPSED_TIME"])}, text
    except (KeyError, ValueError):
        return None, text


def main():
    namespaces.append(ns)
    sh("ip", "netns", "add", ns)
    sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
    sh("ip", "netns", "exec", ns, "ip", "tuntap", "add", tap, "mode", "tap")
    sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{host_ip}/24", "dev", tap)
    sh("ip", "netns", "exec", ns, "ip", "link", "set", tap, "up")

    print("=== wbvmm vs QEMU, measured by the host's netperf: TCP_RR against the test guest's net=netserver ===")
    if not probe.get("kernel_mode_native"):
        print("*** This host cannot run a Linux guest kernel at native speed (guest kernel mode is emulated")
        print("*** here); both VMMs run the test guest, whose RTL8139 driver and netperf responder work at CPL3.")
    print(f"guest:   {elf_src}")
    print(f"wbvmm:   {wbvmm_src} (a copy, taken at start)")
    print(f"netperf: {netperf_version}, `netperf -H {guest_ip} -t TCP_RR -l {secs} -- -r S,S` in the namespace")
    print(f"network: tap {tap} in namespace {ns}, host {host_ip}, guest {guest_ip}")
    print(f"runs:    {runs} per side, mode and size, {secs} s each, alternating wbvmm/QEMU; modes {','.join(modes)};"
          f" sizes {','.join(map(str, sizes))}; drivers {','.join(drivers)}; nicio={opt['nicio']}{' (linux and irq: mmio, lean: pio)' if opt['nicio'] == 'linux' else ''}; QEMU firmware {opt['qemu_bios']}")
    if pin:
        how = {"flags": "wbvmm " + " ".join(wb_pin_flags),
               "taskset": "this wbvmm has no --cpu-affinity: taskset -c IO on the process, vcpu0 moved with taskset -p"}[wb_pin_mode]
        print(f"pinning: vCPU -> CPU {opt['vcpu_cpu']}, I/O -> CPU {opt['io_cpu']}, netperf -> CPU {opt['peer_cpu']}"
              f" ({how}; QEMU: taskset -c {opt['io_cpu']} qemu, vCPU thread from QMP query-cpus-fast -> taskset -pc {opt['vcpu_cpu']})")
    else:
        print("pinning: off")
    # The ratios below depend on these: name them beside every published figure.
    print(f"load:    {' '.join(open('/proc/loadavg').read().split()[:3])} (1/5/15 min load average at start; other work on"
          " the host moves every figure)")
    print(f"probe:   MMIO exit round trip from guest CPL0 {probe_fig('mmio_exit_cpl0_us', '.2f')} us,"
          f" from CPL3 {probe_fig('mmio_exit_cpl3_us', '.2f')} us;"
          f" CPL0 loop {probe_fig('cpl0_loops_per_sec', '.3g')}/s, CPL3 loop {probe_fig('cpl3_loops_per_sec', '.3g')}/s")
    sys.stdout.flush()

    pin_report = {}

    def guest_words(d, m):
        return (f"ip={guest_ip}/24 net=netserver tests=1 nic={m} nicdrv={DRIVER_WORD[d]} nicio={nicio_for(d, m)}"
                " watch=0x100000,2")

    def bad_nicdrv(serial):
        for line in read_text(serial).splitlines():
            if BAD_NICDRV_RE.match(line):
                return line.strip()
        return None

    def finish_entry(kind, np_res, text, cpu0, cpu1, user_exits, kvm_exits_):
        g = None
        for line in text.splitlines():
            g = (GUEST_RR_RE if kind == "rr" else GUEST_STREAM_RE).match(line) or g
        if np_res is None or g is None or np_res["n"] <= 0:
            return None
        # Costs per transaction (RR) or per MB, 10^6 bytes (stream).
        n = np_res["n"] if kind == "rr" else np_res["n"] / 1e6
        e = {"tps": np_res["tps"], "n": np_res["n"], "guest_n": int(g.group(1)), "guest_tps": float(g.group(3)),
             "cpu_us": None, "vcpu_us": None, "user": None, "kvm": None}
        if cpu0[0] is not None and cpu1[0] is not None:
            e["cpu_us"] = (cpu1[0] - cpu0[0]) * 1e6 / n
            e["vcpu_us"] = (cpu1[1] - cpu0[1]) * 1e6 / n
        if user_exits is not None:
            e["user"] = user_exits / n
        if kvm_exits_ is not None:
            e["kvm"] = kvm_exits_ / n
        return e

    # --- wbvmm ---------------------------------------------------------------------------------
    def wb_exits(st):
        ex = (st or {}).get("exits", {}) or {}
        return sum(int(ex.get(k, 0) or 0) for k in ("io_in", "io_out", "mmio_read", "mmio_write"))

    def kvm_exits(st):
        # KVM's own statistics in wbvmm's --stats, if present: an integer "exits" somewhere under a
        # key mentioning kvm (summed when per vCPU).
        def walk(node, under):
            tot = None
            if isinstance(node, dict):
                for k, x in node.items():
                    kv = under or "kvm" in str(k).lower()
                    if kv and k == "exits" and isinstance(x, int):
                        tot = (tot or 0) + x
                    elif isinstance(x, (dict, list)):
                        s = walk(x, kv)
                        if s is not None:
                            tot = (tot or 0) + s
            elif isinstance(node, list):
                for x in node:
                    s = walk(x, under)
                    if s is not None:
                        tot = (tot or 0) + s
            return tot
        return walk(st or {}, False)

    def wb_snapshot(p, stats):
        """SIGUSR1, then the --stats file once it holds a complete snapshot (None after 10 s)."""
        try:
            os.remove(stats)
        except OSError:
            pass
        try:
            os.kill(p.pid, signal.SIGUSR1)
        except ProcessLookupError:
            return None  # the VM ended early (its run is reported failed, with the guest's lines)
        end = time.time() + 10
        while time.time() < end:
            try:
                with open(stats) as f:
                    return json.load(f)
            except (OSError, ValueError):
                time.sleep(0.02)
        return None

    def wbvmm_run(kind, d, m, size, tag, snapshot=False):
        serial = os.path.join(work, f"{tag}.serial")
        stats = os.path.join(work, f"{tag}.json")
        err = open(os.path.join(work, f"{tag}.err"), "w")
        net = f"tap={tap},rev=0x20" + (f",{opt['wbvmm_net']}" if opt["wbvmm_net"] else "")
        cmd = [wbvmm, "--kernel", elf, "--memory", "256M", "--cpus", "1", "--serial", f"file={serial}",
               "--net", net, f"--stats={stats}", "--cmdline", guest_words(d, m)] + wb_pin_flags
        launch_cpu = opt["io_cpu"] if wb_pin_mode == "taskset" else None
        p = spawn(in_ns(ns, launch_cpu, cmd), stdout=subprocess.DEVNULL, stderr=err)
        entry, note, np_text = None, "", ""
        if wait_serial(serial, LISTEN_RE, 60, p) is None:
            note = "the guest never listened"
        elif bad_nicdrv(serial):
            note = f"SKIP {bad_nicdrv(serial)}"
        else:
            if wb_pin_mode == "taskset":
                for tid, comm in threads_of(p.pid):
                    if comm == "vcpu0":
                        sh("taskset", "-pc", str(opt["vcpu_cpu"]), str(tid), check=False)
            st0, cpu0 = wb_snapshot(p, stats), cpu_times(p.pid)
            np_res, np_text = netperf(ns, guest_ip, size, kind=kind)
            if snapshot:
                pin_report["wbvmm"] = thread_report("wbvmm", p.pid)
            if wait_serial(serial, WATCH_RE, 30, p) is None:
                note = "the guest did not finish"
            cpu1, st1 = cpu_times(p.pid), wb_snapshot(p, stats)
            ue = wb_exits(st1) - wb_exits(st0) if (st0 and st1) else None
            k0, k1 = kvm_exits(st0), kvm_exits(st1)
            ke = k1 - k0 if (k0 is not None and k1 is not None) else None
            entry = finish_entry(kind, np_res, read_text(serial), cpu0, cpu1, ue, ke)
        kill_proc(p)
        reap(p)
        err.close()
        return entry, note, read_text(serial), read_text(os.path.join(work, f"{tag}.err")), np_text

    # --- QEMU ----------------------------------------------------------------------------------
    class Qmp:
        def __init__(self, path, limit=10.0):
            end = time.time() + limit
            while True:
                try:
                    self.s = socket.socket(socket.AF_UNIX)
                    self.s.settimeout(10)
                    self.s.connect(path)
                    break
                except OSError:
                    self.s.close()
                    if time.time() > end:
                        raise
                    time.sleep(0.05)
            self.f = self.s.makefile("rw")
            self.f.readline()
            self.cmd("qmp_capabilities")

        def cmd(self, name, **args):
            msg = {"execute": name}
            if args:
                msg["arguments"] = args
            self.f.write(json.dumps(msg) + "\n")
            self.f.flush()
            while True:
                line = self.f.readline()
                if not line:
                    raise OSError("QMP connection closed")
                r = json.loads(line)
                if "return" in r:
                    return r["return"]
                if "error" in r:
                    raise OSError(f"QMP {name}: {r['error']}")

        def kvm_stats(self):
            ret = self.cmd("query-stats", target="vcpu",
                           providers=[{"provider": "kvm", "names": ["exits", "io_exits", "mmio_exits"]}])
            tot = {"exits": 0, "io_exits": 0, "mmio_exits": 0}
            for vcpu in ret:
                for s in vcpu.get("stats", []):
                    if s.get("name") in tot and isinstance(s.get("value"), int):
                        tot[s["name"]] += s["value"]
            return tot

        def close(self):
            try:
                self.s.close()
            except OSError:
                pass

    qemu_io_mmio = []

    def qemu_run(kind, d, m, size, tag, snapshot=False):
        sock = os.path.join(work, f"{tag}.qmp")
        serial = os.path.join(work, f"{tag}.serial")
        err = open(os.path.join(work, f"{tag}.err"), "w")
        cmd = ["qemu-system-x86_64", "-enable-kvm", "-cpu", "qemu64,-cx16", "-machine", "pc", "-m", "256M",
               "-display", "none", "-serial", f"file:{serial}", "-monitor", "none", "-no-reboot",
               "-kernel", elf, "-append", guest_words(d, m),
               "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
               "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no", "-device", "rtl8139,netdev=n0",
               "-qmp", f"unix:{sock},server,nowait", "-S"]
        if opt["qemu_bios"] == "qboot":
            cmd[1:1] = ["-bios", QBOOT]
        p = spawn(in_ns(ns, opt["io_cpu"], cmd), stdout=subprocess.DEVNULL, stderr=err)
        entry, note, np_text = None, "", ""
        qmp = None
        try:
            qmp = Qmp(sock)
            vcpu_tids = [c["thread-id"] for c in qmp.cmd("query-cpus-fast")]
            if pin:
                for tid in vcpu_tids:
                    sh("taskset", "-pc", str(opt["vcpu_cpu"]), str(tid), check=False)
            qmp.cmd("cont")
            if wait_serial(serial, LISTEN_RE, 90, p) is None:
                note = "the guest never listened"
            elif bad_nicdrv(serial):
                note = f"SKIP {bad_nicdrv(serial)}"
            else:
                k0, cpu0 = qmp.kvm_stats(), cpu_times(p.pid, vcpu_tids)
                np_res, np_text = netperf(ns, guest_ip, size, kind=kind)
                if snapshot:
                    pin_report["qemu"] = thread_report("qemu", p.pid)
                if wait_serial(serial, WATCH_RE, 30, p) is None:
                    note = "the guest did not finish"
                cpu1, k1 = cpu_times(p.pid, vcpu_tids), qmp.kvm_stats()
                entry = finish_entry(kind, np_res, read_text(serial), cpu0, cpu1,
                                     None, k1["exits"] - k0["exits"])
                if entry:
                    qemu_io_mmio.append(k1["io_exits"] + k1["mmio_exits"] - k0["io_exits"] - k0["mmio_exits"])
            try:
                qmp.cmd("quit")
            except OSError:
                pass
        except OSError as e:
            note = f"QMP: {e}"
        finally:
            if qmp:
                qmp.close()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        kill_proc(p)
        reap(p)
        err.close()
        return entry, note, read_text(serial), read_text(os.path.join(work, f"{tag}.err")), np_text

    # --- floor ---------------------------------------------------------------------------------
    floor_variants = []
    if opt["floor"]:
        a, b = f"wbvmm-cmpa-{pid}", f"wbvmm-cmpb-{pid}"
        namespaces.extend([a, b])
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", b)
        for n in (a, b):
            sh("ip", "netns", "exec", n, "ip", "link", "set", "lo", "up")
        sh("ip", "netns", "exec", a, "ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", b)
        sh("ip", "netns", "exec", a, "ip", "addr", "add", "169.254.31.1/24", "dev", "veth0")
        sh("ip", "netns", "exec", b, "ip", "addr", "add", "169.254.31.2/24", "dev", "veth1")
        sh("ip", "netns", "exec", a, "ip", "link", "set", "veth0", "up")
        sh("ip", "netns", "exec", b, "ip", "link", "set", "veth1", "up")
        # netserver where the guest's responder runs (the vCPU's CPU), and one on netperf's CPU.
        variants = [(12865, opt["vcpu_cpu"], f"netserver on CPU {opt['vcpu_cpu']}, netperf on CPU {opt['peer_cpu']}")]
        if pin and opt["vcpu_cpu"] != opt["peer_cpu"]:
            variants.append((12875, opt["peer_cpu"], f"both on CPU {opt['peer_cpu']}"))
        elif not pin:
            variants = [(12865, None, "unpinned")]
        flog = open(os.path.join(work, "floor-netserver.log"), "w")
        for port, cpu, what in variants:
            spawn(in_ns(a, cpu, ["netserver", "-D", "-p", str(port), "-L", "169.254.31.1"]),
                  stdout=flog, stderr=subprocess.STDOUT)
            if not wait_listen(a, port):
                die(f"the floor's netserver did not start listening on port {port} within 5 s")
            floor_variants.append({"port": port, "what": what, "runs": {s: [] for s in sizes}})

    def floor_run(port, size, kind="rr"):
        res, _ = netperf(f"wbvmm-cmpb-{pid}", "169.254.31.1", size, port, kind=kind)
        return res["tps"] if res else None

    # --- the runs ------------------------------------------------------------------------------
    # A row is (kind, driver, mode, size): TCP_RR of `size` bytes each way, or the stream of `size`
    # bytes (always the lean driver: the bulk path, not the register sequence, is what it measures).
    rows = [("rr", d, m, s) for d in drivers for s in sizes for m in modes]
    if stream_bytes:
        rows += [("stream", "lean", m, stream_bytes) for m in modes]
    res = {row: {"wbvmm": [], "qemu": []} for row in rows}
    floor_stream = []
    skipped = {}
    failures = []
    unit = {"rr": ("trans/s", "trans"), "stream": ("MB/s", "MB")}

    # Per VM run: boot to `listening`, the two snapshots, the guest's watch, teardown (~0.5 s
    # measured at load 9 on a nested host: the round takes ~1 s more than netperf's length).
    vm_overhead = 1
    # The stream's rate guessed low (8-40 MB/s measured at load 9) so the estimate errs long.
    stream_secs = stream_bytes / 5e6 if stream_bytes else 0
    per_round = sum(2 * ((secs if k == "rr" else stream_secs) + vm_overhead) for (k, _, _, _) in rows)
    per_round += len(floor_variants) * len(sizes) * (secs + 0.5) + (1 if (floor_variants and stream_bytes) else 0)
    est = runs * per_round
    print(f"rows:    {len([r for r in rows if r[0] == 'rr'])} TCP_RR (drivers x modes x sizes)"
          + (f" + {len(modes)} stream ({stream_bytes} bytes counted, lean driver)" if stream_bytes else "")
          + f", x 2 VMMs x {runs} runs")
    print(f"estimated duration: ~{est / 60:.0f} min (~{per_round:.0f} s per round of alternating runs; the driver"
          " rows a guest does not know are skipped at their first run)")
    sys.stdout.flush()
    t_start = time.time()
    last_rr = [r for r in rows if r[0] == "rr"][-1] if any(r[0] == "rr" for r in rows) else rows[-1]
    for r in range(runs):
        for row in rows:
            kind, d, m, size = row
            for side, fn in (("wbvmm", wbvmm_run), ("qemu", qemu_run)):
                if d in skipped:
                    break
                tag = f"{side}-{kind}-{d}-{m}-{size}-{r}"
                entry, note, text, errtext, np_text = fn(kind, d, m, size, tag, snapshot=(r == 0 and row == last_rr))
                label = f"  run {r + 1} {'RR' if kind == 'rr' else 'stream':<6} {d:<5} {m:<5} {size:>7} B {side:<5}"
                per = unit[kind][1]
                if entry:
                    res[row][side].append(entry)
                    ex = (f"exits/{per} to wbvmm {entry['user']:.3f}, KVM {entry['kvm']:.3f}" if side == "wbvmm"
                          and entry["user"] is not None and entry["kvm"] is not None else
                          f"KVM exits/{per} {entry['kvm']:.3f}" if entry["kvm"] is not None else "no exit counts")
                    cpu = f"CPU {entry['cpu_us']:.1f} us/{per}" if entry["cpu_us"] is not None else "no CPU figure"
                    if kind == "rr":
                        fig = f"netperf {entry['tps']:9.1f} trans/s ({entry['n']} trans), guest counted {entry['guest_n']}"
                    else:
                        fig = f"netperf {entry['tps']:8.2f} MB/s ({entry['n']} bytes sent), guest received {entry['guest_n']}"
                    print(f"{label} {fig}; {cpu}; {ex}")
                elif note.startswith("SKIP "):
                    skipped[d] = note[5:]
                    print(f"{label} SKIPPED: this guest does not know nicdrv={DRIVER_WORD[d]} (it said '{note[5:]}'"
                          f" and would run its default driver): every {d} row is skipped")
                else:
                    failures.append(f"{side} {kind} {d} {m} {size} B run {r + 1}")
                    print(f"{label} FAILED {note} {errtext.strip()[-200:]}")
                    for line in (text.splitlines()[-8:] + np_text.strip().splitlines()[-4:]):
                        print(f"      | {line}")
                if opt["verbose"]:
                    for line in text.splitlines():
                        print(f"      | {line}")
                sys.stdout.flush()
        for fv in floor_variants:
            for size in sizes:
                f = floor_run(fv["port"], size)
                if f is None:
                    failures.append(f"floor run {r + 1} ({fv['what']}, {size} B)")
                    print(f"  run {r + 1} floor  {size:>7} B FAILED ({fv['what']})")
                else:
                    fv["runs"][size].append(f)
                    print(f"  run {r + 1} floor  {size:>7} B netperf {f:9.1f} trans/s (no VM, veth; {fv['what']})")
        if floor_variants and stream_bytes:
            # The stream's floor with the first variant's pinning (netserver where the vCPU runs).
            f = floor_run(floor_variants[0]["port"], stream_bytes, kind="stream")
            if f is None:
                failures.append(f"floor stream run {r + 1}")
                print(f"  run {r + 1} floor  stream FAILED")
            else:
                floor_stream.append(f)
                print(f"  run {r + 1} floor  stream {f:8.2f} MB/s (no VM, veth; {floor_variants[0]['what']})")
        print(f"  ({time.time() - t_start:.0f} s so far)")
        sys.stdout.flush()

    # --- report --------------------------------------------------------------------------------
    def med(xs):
        xs = [x for x in xs if x is not None]
        return statistics.median(xs) if xs else None

    def fmt(x, spec=".1f"):
        return "n/a" if x is None else format(x, spec)

    measured = [row for row in rows if row[1] not in skipped]
    print()
    if pin_report:
        print("pinning used (threads, taskset -pc, during a run):")
        for side in ("wbvmm", "qemu"):
            for line in pin_report.get(side, []):
                print(line)
    print()
    print("medians; netperf's figure (TCP_RR trans/s, TCP_STREAM MB/s) is the headline, the guest's own count the")
    print("cross-check; CPU is the VMM process's utime+stime per transaction (stream: per MB, 10^6 bytes) over all its")
    print("threads, and over all but the vCPU thread (which polls); exits per transaction (per MB): wbvmm to userspace /")
    print("KVM's count, QEMU KVM's count (its I/O exits go to QEMU)")
    print(f"{'test':<6} {'driver':<6} {'mode':<6} {'size':>7} {'side':<6} {'netperf':>10}  {'runs':<34} {'guest':>10} "
          f"{'CPU us/unit':>11} {'non-vCPU':>8}  exits/unit")
    ratios = {}
    summary = {}
    for row in measured:
        kind, d, m, size = row
        summary[row] = {}
        for side in ("wbvmm", "qemu"):
            rs = res[row][side]
            spec = ".1f" if kind == "rr" else ".2f"
            s_ = {"tps": med([e["tps"] for e in rs]), "runs": [e["tps"] for e in rs],
                  "guest_tps": med([e["guest_tps"] for e in rs]), "cpu_us": med([e["cpu_us"] for e in rs]),
                  "other_us": med([e["cpu_us"] - e["vcpu_us"] for e in rs if e["cpu_us"] is not None]),
                  "user": med([e["user"] for e in rs]) if side == "wbvmm" else None,
                  "kvm": med([e["kvm"] for e in rs])}
            summary[row][side] = s_
            all_runs = " ".join(format(e["tps"], ".0f" if kind == "rr" else ".2f") for e in rs)
            if side == "wbvmm":
                ex = f"{fmt(s_['user'], '.3f')} to wbvmm, KVM {fmt(s_['kvm'], '.3f')}"
            else:
                ex = f"KVM {fmt(s_['kvm'], '.3f')}"
            print(f"{'RR' if kind == 'rr' else 'stream':<6} {d:<6} {m:<6} {size:>7} {side:<6} {fmt(s_['tps'], spec):>10}  "
                  f"{all_runs:<34} {fmt(s_['guest_tps'], spec):>10} {fmt(s_['cpu_us']):>11} {fmt(s_['other_us']):>8}  {ex}")
        w, q = summary[row]["wbvmm"]["tps"], summary[row]["qemu"]["tps"]
        ratios[row] = w / q if (w and q) else None
    print("(units: TCP_RR rows trans/s and costs per transaction; stream rows MB/s and costs per MB)")
    # The cross-check: netperf counts a transaction when its response has arrived, the guest when it
    # has queued it; the guest may be one ahead (the response in flight when netperf's timer fired).
    # The stream is counted in bytes: the guest must have received every byte netperf sent.
    bad = [(row, side, e) for row in measured for side in ("wbvmm", "qemu") for e in res[row][side]
           if not (e["n"] <= e["guest_n"] <= e["n"] + 1 if row[0] == "rr" else e["guest_n"] == e["n"])]
    print("cross-check: guest count vs netperf's, per run: "
          + ("all agree (RR: guest = netperf or netperf + 1; stream: bytes received = bytes sent)" if not bad else ""))
    for row, side, e in bad:
        print(f"  MISMATCH {side} {row[0]} {row[1]} {row[2]} {row[3]} B: netperf {e['n']}, guest {e['guest_n']}")
    if qemu_io_mmio and all(x == 0 for x in qemu_io_mmio):
        print("note: QEMU's io_exits+mmio_exits read 0 here: this host's KVM (kvm_pvm) does not count its PIO/MMIO")
        print("      exits in those counters; its `exits` counts every exit (I/O, interrupts, signals, ...).")
    for d, why in skipped.items():
        print(f"SKIPPED: driver {d} (nicdrv={DRIVER_WORD[d]}): the guest said '{why}'; build a test guest that knows it")
    print()
    floor_rr = {}
    for fv in floor_variants:
        for size in sizes:
            f = med(fv["runs"][size])
            if fv is floor_variants[0]:
                floor_rr[size] = f
            if f:
                print(f"floor {size:>5} B (no VM, netperf over a veth, {fv['what']}): {f:.1f} trans/s median of "
                      f"{len(fv['runs'][size])} ({' '.join(f'{x:.0f}' for x in fv['runs'][size])})")
    fs_med = med(floor_stream)
    if fs_med:
        print(f"floor stream {stream_bytes} B (no VM, veth, {floor_variants[0]['what']}): {fs_med:.2f} MB/s median of "
              f"{len(floor_stream)} ({' '.join(f'{x:.1f}' for x in floor_stream)})")
    if floor_variants:
        for row in measured:
            kind, d, m, size = row
            w = summary[row]["wbvmm"]["tps"]
            f0 = floor_rr.get(size) if kind == "rr" else fs_med
            if not (w and f0):
                continue
            goal = ""
            if m == "cplus" and kind == "rr":
                goal = f" (goal C+ >= {FLOOR_GOAL}x: {'met' if w / f0 >= FLOOR_GOAL else 'NOT met'})"
            extra = ""
            if kind == "rr" and len(floor_variants) > 1:
                f1 = med(floor_variants[1]["runs"][size])
                if f1:
                    extra = f" (to the one-CPU floor: {w / f1:.3f})"
            what = "TCP_RR" if kind == "rr" else "stream"
            print(f"ratio wbvmm/floor ({d}, {m}, {size} B, {what}): {w / f0:.3f}{extra}{goal}")
    print()
    print("where the time goes (exits to userspace per transaction x probe's exit round trip vs time per transaction):")
    if exit_us is None:
        print("  wbvmm probe gave no mmio_exit_cpl3_us")
    else:
        for row in measured:
            if row[0] != "rr":
                continue
            for side in ("wbvmm", "qemu"):
                tps = summary[row][side]["tps"]
                if not tps:
                    continue
                t = 1e6 / tps
                if side == "wbvmm":
                    u, what = summary[row][side]["user"], "exits to wbvmm"
                else:
                    # Every QEMU I/O exit goes to QEMU (no ioeventfd on its rtl8139); KVM's count also
                    # holds interrupt and signal exits, so this is an upper bound.
                    u, what = summary[row][side]["kvm"], "KVM exits (at most this many to QEMU)"
                if u is not None:
                    print(f"  {row[1]:<5} {row[2]:<5} {row[3]:>5} B {side:<5}: {u:.2f} {what} x {exit_us:.1f} us = {u * exit_us:6.1f} us"
                          f" of {t:6.1f} us per transaction ({100 * u * exit_us / t:.0f}%)")
    if failures:
        print()
        print(f"{len(failures)} run(s) failed: " + "; ".join(failures))

    # --- results.json and the chart ---------------------------------------------------------------
    try:
        probe_end = json.loads(sh(wbvmm, "probe", "--json").stdout)
    except (ValueError, SystemExit):
        probe_end = {}
    load_end = " ".join(open("/proc/loadavg").read().split()[:3])
    data = {
        "meta": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t_start)), "runs": runs, "secs": secs,
                 "probe_start": probe, "probe_end": probe_end, "load_start": load_start, "load_end": load_end,
                 "qemu_version": qemu_version, "netperf": netperf_version, "pinning": pin, "nicio": opt["nicio"],
                 "qemu_bios": opt["qemu_bios"], "seconds": round(time.time() - t_start)},
        "rows": [{"kind": row[0], "driver": row[1], "mode": row[2], "size": row[3],
                  "goal": GOAL[row[1]] if row[0] == "rr" else STREAM_GOAL, "ratio": ratios[row],
                  "wbvmm": summary[row]["wbvmm"], "qemu": summary[row]["qemu"]} for row in measured],
        "floor_rr": {str(k): v for k, v in floor_rr.items()},
        "floor_stream": fs_med,
        "skipped": skipped,
        "failures": failures,
    }
    os.makedirs(out_dir, exist_ok=True)
    results_path = os.path.join(out_dir, "results.json")
    with open(results_path, "w") as f:
        json.dump(data, f, indent=1)
    why = draw_chart(data, chart_path)
    print()
    print(f"results: {results_path}")
    print(f"chart:   {chart_path}" if not why else f"chart:   NOT drawn: {why}")
    print(f"probe:   at start CPL0 {probe_fig('mmio_exit_cpl0_us', '.2f')} us / CPL3 {probe_fig('mmio_exit_cpl3_us', '.2f')} us;"
          f" at end CPL0 {fmt(probe_end.get('mmio_exit_cpl0_us'), '.2f')} us / CPL3 {fmt(probe_end.get('mmio_exit_cpl3_us'), '.2f')} us"
          f"; load {load_start} at start, {load_end} at end; {time.time() - t_start:.0f} s")
    print()

    # --- the ratios, each with its goal ---------------------------------------------------------
    for row in measured:
        kind, d, m, size = row
        sw, sq = summary[row]["wbvmm"], summary[row]["qemu"]
        cw, cq, kw, kq = sw["cpu_us"], sq["cpu_us"], sw["kvm"], sq["kvm"]
        per = unit[kind][1]
        extra = ""
        if cw and cq:
            extra += f"; CPU per {per} wbvmm/qemu {cw / cq:.2f}{'' if cw < cq else ' (NOT less)'}"
        if kw is not None and kq:
            extra += f"; KVM exits per {per} wbvmm/qemu {kw / kq:.2f}{'' if kw < kq else ' (NOT fewer)'}"
        goal = GOAL[d] if kind == "rr" else STREAM_GOAL
        r_ = ratios[row]
        verdict = "n/a" if r_ is None else ("met" if r_ >= goal else "NOT met")
        what = "netperf TCP_RR" if kind == "rr" else "netperf TCP_STREAM MB/s"
        tail = "" if (kind == "rr" and d in LAST_LINE_DRIVERS) else ", not in the last line"
        print(f"ratio wbvmm/qemu ({d}, {m}, {size} B, {what}): {fmt(r_, '.2f')} (goal {goal}x: {verdict}{tail}){extra}")
    goal_rows = [row for row in measured if row[0] == "rr" and row[1] in LAST_LINE_DRIVERS]
    if not goal_rows:
        # Only irq rows (or none) ran: the last line is theirs, so that it still names a figure.
        goal_rows = [row for row in measured if row[0] == "rr"]
    got = [ratios[row] for row in goal_rows if ratios[row] is not None]
    last = min(got) if (got and len(got) == len(goal_rows)) else None
    print(f"(these ratios are this machine's: exit round trip from CPL3 {probe_fig('mmio_exit_cpl3_us', '.2f')} us at start,"
          f" {fmt(probe_end.get('mmio_exit_cpl3_us'), '.2f')} us at end; machines of this kind differ 2-3x in exit cost,"
          " and the ratios move with it)")
    print(f"ratio wbvmm/qemu: {fmt(last, '.2f')}")
    return 0 if not failures and last is not None and not bad else 1


code = 1
try:
    code = main()
finally:
    cleanup()
sys.exit(code)
PYTHON

#!/bin/bash
# wbvmm side by side with QEMU, measured by the host's own netperf: the same test guest ELF serves
# netperf's TCP_RR (`net=netserver`, a responder for netperf 2.7's control protocol) on QEMU's rtl8139
# and on wbvmm's RTL8139 (rev 0x20 on both), in C mode (nic=c) and C+ mode (nic=cplus); the host's
# unmodified `netperf -t TCP_RR -- -r S,S` is the client, and its result is the headline figure.
#
#   scripts/compare-qemu.sh [options]
#
#   --runs N          runs per side, mode and size, alternating wbvmm, QEMU, wbvmm, ... (default 5)
#   --secs N          netperf's test length (-l) of each run (default 3)
#   --modes LIST      comma-separated, from c,cplus (default c,cplus)
#   --sizes LIST      request=response sizes in bytes, comma-separated, 1..65536 (default 1)
#   --drivers LIST    the guest driver's data path (nicdrv=), from lean,linux (default lean): lean
#                     touches the fewest registers (IMR = 0, descriptors in RAM); linux does per
#                     packet what 8139cp / 8139too do (IntrStatus read and ack, IntrMask masked
#                     around a NAPI-like poll, TX completion from descriptors / TSD status), with
#                     IntrStatus polled instead of the interrupt
#   --nicio pio|mmio  how the guest driver reaches the registers (default pio)
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
# The last line, `ratio wbvmm/qemu: X.XX`, is the smallest wbvmm/QEMU ratio of netperf medians
# over the rows (driver x mode x size).
#
# Network: namespaces this script creates (wbvmm-cmp-PID with a tap at 169.254.30.1/24, guest
# 169.254.30.2; wbvmm-cmpa-PID/wbvmm-cmpb-PID with a veth at 169.254.31.1/.2), nothing else. Every
# wait is bounded; on any exit (Ctrl-C too) it kills the processes it started, by PID, and deletes
# the namespaces. Needs root, /dev/kvm, qemu-system-x86, netperf, iproute2, python3.
exec python3 - "$0" "$@" <<'PYTHON'
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
opt = dict(runs=5, secs=3, modes="c,cplus", sizes="1", drivers="lean", nicio="pio", pin="on" if ncpu >= 2 else "off",
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
    elif a in ("--runs", "--secs", "--vcpu-cpu", "--io-cpu", "--peer-cpu"):
        v = val()
        if not v.isdigit():
            die(f"{a} wants a whole number, got '{v}'", None, 2)
        opt[a[2:].replace("-", "_")] = int(v)
        i += 2
    elif a in ("--modes", "--sizes", "--drivers", "--nicio", "--pin", "--elf", "--wbvmm", "--wbvmm-net", "--qemu-bios"):
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

runs, secs = opt["runs"], opt["secs"]
modes = [m for m in opt["modes"].split(",") if m]
if not 1 <= runs <= 50:
    die("--runs must be 1..50", None, 2)
if not 1 <= secs <= 60:
    die("--secs must be 1..60", None, 2)
if not modes or any(m not in ("c", "cplus") for m in modes):
    die(f"--modes wants a list from c,cplus, got '{opt['modes']}'", None, 2)
drivers = [d for d in opt["drivers"].split(",") if d]
if not drivers or any(d not in ("lean", "linux") for d in drivers):
    die(f"--drivers wants a list from lean,linux, got '{opt['drivers']}'", None, 2)
try:
    sizes = [int(s) for s in opt["sizes"].split(",") if s]
except ValueError:
    sizes = []
if not sizes or any(not 1 <= s <= 65536 for s in sizes):
    die(f"--sizes wants a list of byte counts 1..65536, got '{opt['sizes']}'", None, 2)
if opt["nicio"] not in ("pio", "mmio"):
    die("--nicio must be pio or mmio", None, 2)
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
GUEST_FAIL_RE = re.compile(r"^(netserver: (test \d+ failed|no control|cannot)|exception:|net: )")
# After the result the guest runs `watch=0x100000,2` (polls RAM at CPL3, no exits) to stay up
# until the second snapshot; its first line means the result lines are all out.
WATCH_RE = re.compile(r"^watch: 0x100000 = ")
NETPERF_KEYS = "THROUGHPUT,THROUGHPUT_UNITS,ELAPSED_TIME,LOCAL_BYTES_RECVD,LOCAL_SEND_CALLS"

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


def netperf(n, host, size, port=None):
    """One netperf TCP_RR run (pinned to the peer CPU): (dict of its -k keys, its output)."""
    cmd = ["netperf", "-H", host] + (["-p", str(port)] if port else []) + [
        "-t", "TCP_RR", "-l", str(secs), "-P", "0", "--", "-r", f"{size},{size}", "-k", NETPERF_KEYS]
    p = spawn(in_ns(n, opt["peer_cpu"], cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = p.communicate(timeout=secs + 60)
    except subprocess.TimeoutExpired:
        kill_proc(p)
        out = b""
    reap(p)
    text = (out or b"").decode("utf-8", "replace")
    kv = dict(l.split("=", 1) for l in text.splitlines() if "=" in l)
    if p.returncode != 0 or kv.get("THROUGHPUT_UNITS") != "Trans/s":
        return None, text
    try:
        return {"tps": float(kv["THROUGHPUT"]), "n": int(kv["LOCAL_BYTES_RECVD"]) // size,
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
          f" sizes {','.join(map(str, sizes))}; drivers {','.join(drivers)}; nicio={opt['nicio']}; QEMU firmware {opt['qemu_bios']}")
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
        return f"ip={guest_ip}/24 net=netserver tests=1 nic={m} nicdrv={d} nicio={opt['nicio']} watch=0x100000,2"

    def finish_entry(side, np_res, text, cpu0, cpu1, user_exits, kvm_exits_):
        g = None
        for line in text.splitlines():
            g = GUEST_RR_RE.match(line) or g
        if np_res is None or g is None or np_res["n"] <= 0:
            return None
        n = np_res["n"]
        e = {"tps": np_res["tps"], "n": n, "guest_n": int(g.group(1)), "guest_tps": float(g.group(3)),
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
        os.kill(p.pid, signal.SIGUSR1)
        end = time.time() + 10
        while time.time() < end:
            try:
                with open(stats) as f:
                    return json.load(f)
            except (OSError, ValueError):
                time.sleep(0.02)
        return None

    def wbvmm_run(d, m, size, tag, snapshot=False):
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
        else:
            if wb_pin_mode == "taskset":
                for tid, comm in threads_of(p.pid):
                    if comm == "vcpu0":
                        sh("taskset", "-pc", str(opt["vcpu_cpu"]), str(tid), check=False)
            st0, cpu0 = wb_snapshot(p, stats), cpu_times(p.pid)
            np_res, np_text = netperf(ns, guest_ip, size)
            if snapshot:
                pin_report["wbvmm"] = thread_report("wbvmm", p.pid)
            if wait_serial(serial, WATCH_RE, 30, p) is None:
                note = "the guest did not finish"
            cpu1, st1 = cpu_times(p.pid), wb_snapshot(p, stats)
            ue = wb_exits(st1) - wb_exits(st0) if (st0 and st1) else None
            k0, k1 = kvm_exits(st0), kvm_exits(st1)
            ke = k1 - k0 if (k0 is not None and k1 is not None) else None
            entry = finish_entry("wbvmm", np_res, read_text(serial), cpu0, cpu1, ue, ke)
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

    def qemu_run(d, m, size, tag, snapshot=False):
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
            else:
                k0, cpu0 = qmp.kvm_stats(), cpu_times(p.pid, vcpu_tids)
                np_res, np_text = netperf(ns, guest_ip, size)
                if snapshot:
                    pin_report["qemu"] = thread_report("qemu", p.pid)
                if wait_serial(serial, WATCH_RE, 30, p) is None:
                    note = "the guest did not finish"
                cpu1, k1 = cpu_times(p.pid, vcpu_tids), qmp.kvm_stats()
                entry = finish_entry("qemu", np_res, read_text(serial), cpu0, cpu1,
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

    def floor_run(port, size):
        res, _ = netperf(f"wbvmm-cmpb-{pid}", "169.254.31.1", size, port)
        return res["tps"] if res else None

    # --- the runs ------------------------------------------------------------------------------
    rows = [(d, m, s) for d in drivers for s in sizes for m in modes]
    res = {row: {"wbvmm": [], "qemu": []} for row in rows}
    failures = []
    for r in range(runs):
        for (d, m, size) in rows:
            for side, fn in (("wbvmm", wbvmm_run), ("qemu", qemu_run)):
                tag = f"{side}-{d}-{m}-{size}-{r}"
                entry, note, text, errtext, np_text = fn(d, m, size, tag, snapshot=(r == 0 and (d, m, size) == rows[-1]))
                label = f"  run {r + 1} {d:<5} {m:<5} {size:>5} B {side:<5}"
                if entry:
                    res[(d, m, size)][side].append(entry)
                    ex = (f"exits/trans to wbvmm {entry['user']:.3f}, KVM {entry['kvm']:.3f}" if side == "wbvmm"
                          and entry["user"] is not None and entry["kvm"] is not None else
                          f"KVM exits/trans {entry['kvm']:.3f}" if entry["kvm"] is not None else "no exit counts")
                    cpu = f"CPU {entry['cpu_us']:.1f} us/trans" if entry["cpu_us"] is not None else "no CPU figure"
                    print(f"{label} netperf {entry['tps']:9.1f} trans/s ({entry['n']} trans), guest counted {entry['guest_n']};"
                          f" {cpu}; {ex}")
                else:
                    failures.append(f"{side} {d} {m} {size} B run {r + 1}")
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
                    print(f"  run {r + 1} floor {size:>5} B FAILED ({fv['what']})")
                else:
                    fv["runs"][size].append(f)
                    print(f"  run {r + 1} floor {size:>5} B netperf {f:9.1f} trans/s (no VM, veth; {fv['what']})")
            sys.stdout.flush()

    # --- report --------------------------------------------------------------------------------
    def med(xs):
        xs = [x for x in xs if x is not None]
        return statistics.median(xs) if xs else None

    def fmt(x, spec=".1f"):
        return "n/a" if x is None else format(x, spec)

    print()
    if pin_report:
        print("pinning used (threads, taskset -pc, during a run):")
        for side in ("wbvmm", "qemu"):
            for line in pin_report.get(side, []):
                print(line)
    print()
    print("medians; netperf's trans/s is the figure, the guest's own count the cross-check; CPU is the VMM")
    print("process's utime+stime per transaction (all threads, and all but the vCPU thread, which polls);")
    print("exits per transaction: wbvmm to userspace / KVM's count, QEMU KVM's count (its I/O exits go to QEMU)")
    print(f"{'driver':<6} {'mode':<6} {'size':>5} {'side':<6} {'netperf trans/s':>15}  {'runs':<34} {'guest trans/s':>13} "
          f"{'CPU us/trans':>12} {'non-vCPU':>8}  exits/trans")
    ratios = {}
    for row in rows:
        d, m, size = row
        for side in ("wbvmm", "qemu"):
            rs = res[row][side]
            tps = med([e["tps"] for e in rs])
            all_runs = " ".join(f"{e['tps']:.0f}" for e in rs)
            cpu = med([e["cpu_us"] for e in rs])
            other = med([e["cpu_us"] - e["vcpu_us"] for e in rs if e["cpu_us"] is not None])
            if side == "wbvmm":
                ex = f"{fmt(med([e['user'] for e in rs]), '.3f')} to wbvmm, KVM {fmt(med([e['kvm'] for e in rs]), '.3f')}"
            else:
                ex = f"KVM {fmt(med([e['kvm'] for e in rs]), '.3f')}"
            print(f"{d:<6} {m:<6} {size:>5} {side:<6} {fmt(tps):>15}  {all_runs:<34} {fmt(med([e['guest_tps'] for e in rs])):>13} "
                  f"{fmt(cpu):>12} {fmt(other):>8}  {ex}")
        w = med([e["tps"] for e in res[row]["wbvmm"]])
        q = med([e["tps"] for e in res[row]["qemu"]])
        ratios[row] = w / q if (w and q) else None
    # The cross-check: netperf counts a transaction when its response has arrived, the guest when it
    # has queued it; the guest may be one ahead (the response in flight when netperf's timer fired).
    bad = [(row, side, e) for row in rows for side in ("wbvmm", "qemu") for e in res[row][side]
           if not e["n"] <= e["guest_n"] <= e["n"] + 1]
    print(f"cross-check: guest count vs netperf's, per run: {'all agree (guest = netperf or netperf + 1)' if not bad else ''}")
    for row, side, e in bad:
        print(f"  MISMATCH {side} {row[0]} {row[1]} {row[2]} B: netperf {e['n']}, guest {e['guest_n']}")
    if qemu_io_mmio and all(x == 0 for x in qemu_io_mmio):
        print("note: QEMU's io_exits+mmio_exits read 0 here: this host's KVM (kvm_pvm) does not count its PIO/MMIO")
        print("      exits in those counters; its `exits` counts every exit (I/O, interrupts, signals, ...).")
    print()
    for fv in floor_variants:
        for size in sizes:
            f = med(fv["runs"][size])
            if f:
                print(f"floor {size:>5} B (no VM, netperf over a veth, {fv['what']}): {f:.1f} trans/s median of "
                      f"{len(fv['runs'][size])} ({' '.join(f'{x:.0f}' for x in fv['runs'][size])})")
    if floor_variants:
        for row in rows:
            w = med([e["tps"] for e in res[row]["wbvmm"]])
            fs = [med(fv["runs"][row[2]]) for fv in floor_variants]
            if w and fs[0]:
                print(f"ratio wbvmm/floor ({row[0]}, {row[1]}, {row[2]} B): {w / fs[0]:.3f}"
                      + (f" (to the one-CPU floor: {w / fs[1]:.3f})" if len(fs) > 1 and fs[1] else ""))
    print()
    print("where the time goes (exits to userspace per transaction x probe's exit round trip vs time per transaction):")
    if exit_us is None:
        print("  wbvmm probe gave no mmio_exit_cpl3_us")
    else:
        for row in rows:
            for side in ("wbvmm", "qemu"):
                rs = res[row][side]
                tps = med([e["tps"] for e in rs])
                if not tps:
                    continue
                t = 1e6 / tps
                if side == "wbvmm":
                    u, what = med([e["user"] for e in rs]), "exits to wbvmm"
                else:
                    # Every QEMU I/O exit goes to QEMU (no ioeventfd on its rtl8139); KVM's count also
                    # holds interrupt and signal exits, so this is an upper bound.
                    u, what = med([e["kvm"] for e in rs]), "KVM exits (at most this many to QEMU)"
                if u is not None:
                    print(f"  {row[0]:<5} {row[1]:<5} {row[2]:>5} B {side:<5}: {u:.2f} {what} x {exit_us:.1f} us = {u * exit_us:6.1f} us"
                          f" of {t:6.1f} us per transaction ({100 * u * exit_us / t:.0f}%)")
    if failures:
        print()
        print(f"{len(failures)} run(s) failed: " + "; ".join(failures))
    print()
    for row in rows:
        w = [e for e in res[row]["wbvmm"]]
        q = [e for e in res[row]["qemu"]]
        cw, cq = med([e["cpu_us"] for e in w]), med([e["cpu_us"] for e in q])
        kw, kq = med([e["kvm"] for e in w]), med([e["kvm"] for e in q])
        extra = ""
        if cw and cq:
            extra += f"; CPU per transaction wbvmm/qemu {cw / cq:.2f}"
        if kw is not None and kq:
            extra += f"; KVM exits per transaction wbvmm/qemu {kw / kq:.2f}"
        print(f"ratio wbvmm/qemu ({row[0]}, {row[1]}, {row[2]} B, netperf TCP_RR): {fmt(ratios[row], '.2f')}{extra}")
    got = [x for x in ratios.values() if x is not None]
    last = min(got) if len(got) == len(ratios) else None
    print(f"(these ratios are this machine's: exit round trip from CPL3 {probe_fig('mmio_exit_cpl3_us', '.2f')} us;"
          " machines of this kind differ 2-3x in exit cost, and the ratios move with it)")
    print(f"ratio wbvmm/qemu: {fmt(last, '.2f')}")
    return 0 if not failures and last is not None and not bad else 1


code = 1
try:
    code = main()
finally:
    cleanup()
sys.exit(code)
PYTHON

#!/usr/bin/env python3
"""What one netperf run in a Linux guest cost, from two wbvmm --stats snapshots around it.

    linux-run-report.py START.json END.json SECONDS TRANSACTIONS TRANS_PER_S \
        CPL0_LOOPS_PER_S CPL0_EXIT_US DELTA_OUT.json [ON_CPU_NS WAIT_NS]

Used by scripts/tcp-rr.sh. Writes DELTA_OUT.json, the difference END - START in --stats form
(counters subtracted, exit latency means recombined from count x mean; percentiles and maxima
left out, they cannot be subtracted), for `wbvmm stats` to render. Prints, for people:
per-transaction counts (exits to wbvmm, KVM exits, instructions KVM emulated, fallbacks, NIC
interrupts) and where the run's wall time went, with the `wbvmm probe` figures each estimate
rests on (and, with ON_CPU_NS and WAIT_NS from the vCPU thread's /proc schedstat over the same
interval, how long it ran and how long it waited for a host CPU); then
`exits_per_transaction: X` and `kvm_exits_per_transaction: Y` for the script.
"""
import json
import sys

WBVMM_EXITS = ("io_in", "io_out", "mmio_read", "mmio_write")


def num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def diff(a, b):
    """b - a over numeric leaves of nested dicts; maxima and histograms are left out."""
    if num(a) and num(b):
        return b - a
    if isinstance(a, dict) and isinstance(b, dict):
        out = {}
        for k, vb in b.items():
            if k.startswith("max_") or k.endswith("_hist"):
                continue
            d = diff(a.get(k, 0 if num(vb) else {}), vb)
            if d is not None:
                out[k] = d
        return out
    return None


def latency_diff(a, b):
    out = {}
    for kind, lb in (b or {}).items():
        la = (a or {}).get(kind, {})
        ca, cb = la.get("count", 0), lb.get("count", 0)
        if not (num(ca) and num(cb)) or cb <= ca:
            continue
        total = cb * lb.get("mean_ns", 0) - ca * la.get("mean_ns", 0)
        out[kind] = {"count": cb - ca, "mean_ns": round(max(total, 0) / (cb - ca))}
    return out


def devices_diff(a, b):
    before = {(d.get("bus"), d.get("device"), d.get("offset")): d.get("count", 0) for d in a or []}
    out = []
    for d in b or []:
        n = d.get("count", 0) - before.get((d.get("bus"), d.get("device"), d.get("offset")), 0)
        if n > 0:
            out.append(dict(d, count=n))
    return out


def vcpu_sum(kvm, name):
    """A KVM vCPU counter, summed when the stats list vCPUs one by one."""
    v = (kvm or {}).get("vcpu")
    items = v if isinstance(v, list) else [v]
    return sum(x.get(name, 0) for x in items if isinstance(x, dict) and num(x.get(name, 0)))


def main(argv):
    if len(argv) not in (9, 11):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        with open(argv[1]) as f:
            a = json.load(f)
        with open(argv[2]) as f:
            b = json.load(f)
    except (OSError, ValueError) as e:
        print(f"linux-run-report: cannot read a snapshot: {e}", file=sys.stderr)
        return 1
    secs, trans, tps = float(argv[3]), float(argv[4]), float(argv[5])
    cpl0_loops = float(argv[6]) if argv[6] else 0.0
    exit_us = float(argv[7]) if argv[7] else 0.0
    sched = (float(argv[9]), float(argv[10])) if len(argv) == 11 else None

    d = {
        "outcome": "netperf's run: the difference of two snapshots (its data connection opened .. closed)",
        "threads": b.get("threads"),
        "exits": diff(a.get("exits", {}), b.get("exits", {})),
        "exit_latency": latency_diff(a.get("exit_latency"), b.get("exit_latency")),
        "exits_by_device": devices_diff(a.get("exits_by_device"), b.get("exits_by_device")),
        "emulated": diff(a.get("emulated", {}), b.get("emulated", {})),
        "interrupts": diff(a.get("interrupts", {}), b.get("interrupts", {})),
    }
    if "net" in b:
        d["net"] = diff(a.get("net", {}), b["net"])
    if "kvm" in b:
        d["kvm"] = diff(a.get("kvm", {}), b["kvm"])
    with open(argv[8], "w") as f:
        json.dump(d, f, indent=1)

    ex = d["exits"]
    exits = sum(ex.get(k, 0) for k in WBVMM_EXITS)
    handled_ns = sum(v["count"] * v["mean_ns"] for k, v in d["exit_latency"].items() if k in WBVMM_EXITS)
    kvm_exits = vcpu_sum(d.get("kvm"), "exits")
    insns = vcpu_sum(d.get("kvm"), "insn_emulation")
    halt_ns = vcpu_sum(d.get("kvm"), "halt_wait_ns")
    fb = d["emulated"] if isinstance(d["emulated"], dict) else {}
    fb_count = sum(v.get("count", 0) for v in fb.values() if isinstance(v, dict))
    fb_ns = sum(v.get("total_ns", 0) for v in fb.values() if isinstance(v, dict))
    irqs = d["interrupts"].get("nic", 0) if isinstance(d["interrupts"], dict) else 0
    # probe's CPL0 loop is `dec ecx; jnz`: two emulated instructions per iteration.
    insn_rate = 2 * cpl0_loops

    t = trans or 1
    print(f"netperf's run: {trans:.0f} transactions ({tps:.2f}/s, {1e6 / tps:,.0f} us each); "
          f"--stats snapshots {secs:.1f} s apart, as its data connection opened and closed")
    print(f"  per transaction: {exits / t:.2f} exits to wbvmm, {kvm_exits / t:.1f} KVM exits, "
          f"{insns / t:,.0f} guest instructions KVM emulated, {fb_count / t:.3f} emulation "
          f"fallbacks, {irqs / t:.2f} NIC interrupts")
    emul_s = insns / insn_rate if insn_rate > 0 else None
    emul_note = (f"{insns:,} guest kernel instructions in KVM's emulator"
                 + (f" (~{emul_s:.2f} s at probe's CPL0 rate, ~{insn_rate / 1e6:.1f} M/s)" if emul_s else ""))
    exits_note = f"{exits:,} exits to wbvmm (~{exits * exit_us * 1e-6:.3f} s at probe's CPL0 round trip, {exit_us:.1f} us)"
    print("  where the run's wall time went (one vCPU):")
    if sched:
        # The scheduler's own accounting is exact; the estimates from probe's rates are shown
        # beside it, not summed (a loaded host slows probe's loops too).
        on_s, wait_s = sched[0] * 1e-9, sched[1] * 1e-9
        rows = [
            (on_s, "vCPU thread on a host CPU (/proc schedstat): guest user mode natively, the kernel in KVM"),
            (handled_ns * 1e-9, f"  of it, wbvmm handling exits ({handled_ns / max(exits, 1) / 1e3:.1f} us each, --stats)"),
            (fb_ns * 1e-9, f"  of it, wbvmm's emulation fallback ({fb_count:,} instructions)"),
            (wait_s, "vCPU thread runnable, waiting for a host CPU (other load on the host)"),
            (secs - on_s - wait_s, f"vCPU thread asleep (halted, or waiting in wbvmm; KVM halt_wait_ns {halt_ns * 1e-9:.2f} s)"),
        ]
        for s_, what in rows:
            print(f"    {s_:7.2f} s {100 * s_ / secs:5.1f}%  {what}")
        print(f"  counted: {emul_note}; {exits_note}")
    else:
        rows = []
        if emul_s is not None:
            rows.append((emul_s, emul_note))
        if exit_us > 0:
            rows.append((exits * exit_us * 1e-6, exits_note))
        rows.append((handled_ns * 1e-9,
                     f"wbvmm handling those exits (--stats exit_latency: {handled_ns / max(exits, 1) / 1e3:.1f} us each)"))
        rows.append((fb_ns * 1e-9, f"wbvmm's emulation fallback: {fb_count:,} instructions"))
        rows.append((halt_ns * 1e-9, "vCPU halted (waiting for the peer or an interrupt; KVM halt_wait_ns)"))
        for s_, what in rows:
            print(f"    {s_:7.2f} s {100 * s_ / secs:5.1f}%  {what}")
        rest = secs - sum(s_ for s_, _ in rows)
        print(f"    {rest:7.2f} s {100 * rest / secs:5.1f}%  the rest (guest user mode, KVM's entries and "
              f"page faults, other load on the host, estimates' error)")
    print(f"exits_per_transaction: {exits / t:.3f}")
    print(f"kvm_exits_per_transaction: {kvm_exits / t:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

#!/bin/bash
# Oracle run: the test guest's RTL8139 driver against QEMU's own rtl8139
# model (an independent implementation), in C+ and C mode, over port I/O
# and MMIO: `net=ping` and `net=rr` against a host peer, polled and (with
# nicdrv=linux-irq) woken by the NIC's INTx.
#
#   scripts/oracle-qemu.sh [--elf PATH] [--secs N] [--verbose]
#
#   --elf PATH   guest ELF (default: build guest-images/out/testguest.elf)
#   --secs N     length of each net=rr run (default 3)
#   --verbose    print the guest's serial output of every case
#
# Network: everything stays inside a network namespace this script creates
# (wbvmm-oracle-PID) with a tap at 169.254.10.1/24; the guest is
# 169.254.10.2. The echo peer is socat in that namespace. No other backend
# (never -netdev user). On exit (any exit) the script kills the processes
# it started, by PID, and deletes the namespace.
#
# Prints "ok"/"FAIL" per case, then "N passed, M failed"; exits non-zero on
# any failure. Needs root, /dev/kvm, qemu-system-x86, socat, iproute2.
set -u
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$here/lib/common.sh"
# shellcheck source-path=SCRIPTDIR source=lib/netns.sh
. "$here/lib/netns.sh"

elf=""
secs=3
verbose=0
while [ $# -gt 0 ]; do
    case $1 in
        --elf) elf=${2:?--elf needs a path}; shift 2 ;;
        --secs) secs=${2:?--secs needs a number}; shift 2 ;;
        --verbose) verbose=1; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) wb_die "unknown option $1" "see $0 --help" ;;
    esac
done
case $secs in ''|*[!0-9]*) wb_die "--secs wants a whole number of seconds, got '$secs'" ;; esac
if [ "$secs" -lt 1 ] || [ "$secs" -gt 60 ]; then wb_die "--secs must be 1..60"; fi

[ "$(id -u)" -eq 0 ] || wb_die "needs root (network namespace, tap)" "run as root"
wb_need_cmd qemu-system-x86_64 qemu-system-x86
wb_need_cmd socat socat
wb_need_cmd ip iproute2
[ -c /dev/kvm ] || wb_die "/dev/kvm missing" "run on a host with KVM"
if [ -z "$elf" ]; then
    elf=$("$root/guest-images/build-testguest.sh" | tail -1) || wb_die "building the test guest failed"
fi
[ -f "$elf" ] || wb_die "no guest ELF at $elf" "build it: guest-images/build-testguest.sh"

ns=wbvmm-oracle-$$
tap=wbor$$
host_ip=169.254.10.1
guest_ip=169.254.10.2
port=7777
closed_port=7778
work=$(mktemp -d)
peer_pid=""
qemu_pid=""

# wb_kill_tree: the PID we started and its direct children (socat forks one
# per connection), by PID only.
cleanup() {
    wb_kill_tree "$qemu_pid"
    wb_kill_tree "$peer_pid"
    wb_netns_del "$ns"
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wb_netns_tap "$ns" "$tap" "$host_ip/24"
# Echo peer: every connection echoes what it reads (PIPE). -T: a child
# idle for 20 s goes away by itself.
ip netns exec "$ns" socat -T 20 TCP-LISTEN:$port,bind=$host_ip,reuseaddr,fork PIPE \
    </dev/null >"$work/socat.log" 2>&1 &
peer_pid=$!
# Wait until it listens; the bound only fails a peer that never starts.
wb_wait_listen "$ns" "$port" 600 || wb_die "the socat echo peer did not start listening within 60 s"

pass=0
fail=0
out=$work/out

# run CMDLINE: boots the guest in the namespace on QEMU's rtl8139; sets rc
# (QEMU's exit status) and $out (serial output).
run() {
    # The timeout only ends a hung run: every case ends by itself.
    ip netns exec "$ns" timeout --kill-after=5 $((secs + 300)) qemu-system-x86_64 \
        -enable-kvm -cpu qemu64,-cx16 -machine pc -m 256M -display none \
        -serial "file:$out.raw" -no-reboot -kernel "$elf" -append "$1" \
        -device isa-debug-exit,iobase=0xf4,iosize=4 \
        -netdev tap,id=n0,ifname="$tap",script=no,downscript=no \
        -device rtl8139,netdev=n0 </dev/null >"$work/qemu.out" 2>&1 &
    qemu_pid=$!
    wait "$qemu_pid"
    rc=$?
    qemu_pid=""
    tr -d '\r' <"$out.raw" >"$out" 2>/dev/null
    rm -f "$out.raw"
}

# check NAME WANT_RC EXTRA PATTERN...: EXTRA is printed after "ok".
check() {
    local name=$1 want=$2 extra=$3 ok=1 p
    shift 3
    [ "$rc" = "$want" ] || ok=0
    for p in "$@"; do grep -Eq -- "$p" "$out" || ok=0; done
    if [ $ok = 1 ]; then
        printf 'ok   %-34s %s\n' "$name" "$extra"
        [ $verbose = 1 ] && sed 's/^/     | /' "$out"
        pass=$((pass + 1))
    else
        printf 'FAIL %-34s (status %s, want %s); output:\n' "$name" "$rc" "$want"
        sed 's/^/     | /' "$out"
        [ -s "$work/qemu.out" ] && sed 's/^/     qemu| /' "$work/qemu.out"
        fail=$((fail + 1))
    fi
}

base="ip=$guest_ip/24 peer=$host_ip"
mac='([0-9a-f]{2}:){5}[0-9a-f]{2}'
pci='^pci: 00:[0-9a-f]{2}\.[0-7] 10ec:8139 rev 0x20 io=0x[0-9a-f]{4} mmio=0x[0-9a-f]{8}$'
# QEMU isa-debug-exit: status N -> (N << 1) | 1.
for mode in cplus c; do
    for io in pio mmio; do
        run "net=ping $base count=3 nic=$mode nicio=$io"
        check "ping nic=$mode nicio=$io" 1 "" "$pci" \
            "^net: link up mac=$mac mode=$mode io=$io\$" \
            "^ping: reply from $host_ip seq=0 time=[0-9]+ us\$" \
            "^ping: reply from $host_ip seq=2 time=[0-9]+ us\$" \
            '^ping: 3 sent, 3 received'
        run "net=rr $base port=$port secs=$secs nic=$mode nicio=$io"
        line=$(grep -E '^rr: [0-9]+ transactions in [0-9]+ s = [0-9.]+ trans/s$' "$out" | tail -1)
        per=$(grep -E '^rr: per transaction:' "$out" | sed 's/^rr: per transaction: //')
        check "rr nic=$mode nicio=$io" 1 "${line#rr: } [$per]" \
            "^net: link up mac=$mac mode=$mode io=$io\$" \
            "^rr: [1-9][0-9]* transactions in $secs s = [0-9.]+ trans/s\$"
    done
done
# C+ TX checksum offload (csum=offload, the default, as 8139cp): the chip fills the
# IPv4 and TCP sums of every frame the guest's TCP sends, and the host's stack, which
# drops a frame with a bad sum, answers them; csum=soft leaves them to smoltcp.
for csum in offload soft; do
    run "net=rr $base port=$port trans=200 secs=600 nic=cplus csum=$csum"
    line=$(grep -E '^rr: [0-9]+ transactions in [0-9.]+ s = [0-9.]+ trans/s$' "$out" | tail -1)
    if [ $csum = offload ]; then
        want=('^net: tx checksums \(ipv4, tcp, udp\) by the chip$' '^rr: nic .* tx_csum_offloaded=[1-9][0-9]*$')
    else
        want=('^rr: nic .* tx_csum_offloaded=0$')
    fi
    check "rr nic=cplus csum=$csum" 1 "${line#rr: }" '^rr: 200 transactions in [0-9.]+ s = ' "${want[@]}"
done
# Default mode: QEMU presents revision 0x20, so auto picks C+ (as Linux).
run "net=ping $base count=1"
check "ping nic=auto (rev 0x20 -> cplus)" 1 "" "^net: link up mac=$mac mode=cplus io=pio\$" \
    '^ping: 1 sent, 1 received'
# BAR sizing/assignment (firmware assigned them; reassign at our defaults)
# and C mode's CBR-confirmed RX path (used where no valid CRC is appended).
# Counted runs (trans=N; secs only bounds them): the same amount of traffic on
# any machine, so records surely cross the ring end (an 8 KiB ring holds ~120
# of these frames).
run "net=rr $base port=$port trans=1000 secs=600 nic=c nicio=mmio nicbars=assign nicrx=cbr"
line=$(grep -E '^rr: [0-9]+ transactions in [0-9.]+ s = [0-9.]+ trans/s$' "$out" | tail -1)
check "rr nic=c nicbars=assign nicrx=cbr" 1 "${line#rr: }" \
    '^pci: 00:[0-9a-f]{2}\.[0-7] 10ec:8139 rev 0x20 io=0xc000 mmio=0xfebf0000$' \
    "^net: link up mac=$mac mode=c io=mmio\$" \
    '^rr: 1000 transactions in [0-9.]+ s = ' '^rr: nic .* rx_cbr_reads=[1-9]'
# RCR.WRAP = 0: records crossing the ring end continue at its start (the
# driver copes, for devices that ignore WRAP); with and without the CRC.
for rx in nowrap cbr,nowrap; do
    run "net=rr $base port=$port trans=1000 secs=600 nic=c nicrx=$rx"
    line=$(grep -E '^rr: [0-9]+ transactions in [0-9.]+ s = [0-9.]+ trans/s$' "$out" | tail -1)
    check "rr nic=c nicrx=$rx" 1 "${line#rr: }" \
        '^rr: 1000 transactions in [0-9.]+ s = ' '^rr: nic .* rx_resets=0 rx_split=[1-9]'
done
# The Linux-shaped driver woken by the NIC's real INTx (nicdrv=linux-irq): the
# route from the firmware's MP table (SeaBIOS: the PCI entry, to the PIIX-routed
# IRQ) or the PCI interrupt line, the IOAPIC entry, the CPL0 handler; its final
# interrupt count must be non-zero. Both revisions' drivers, both buses.
for mode_io in cplus,pio c,mmio; do
    mode=${mode_io%,*} io=${mode_io#*,}
    run "net=ping net=rr $base port=$port trans=200 secs=600 nicdrv=linux-irq nic=$mode nicio=$io"
    line=$(grep -E '^rr: [0-9]+ transactions in [0-9.]+ s = [0-9.]+ trans/s$' "$out" | tail -1)
    irqs=$(grep -E '^rr: nic irqs=' "$out" | sed 's/^rr: nic //;s/ irq_events.*//')
    check "ping, rr nicdrv=linux-irq nic=$mode nicio=$io" 1 "${line#rr: } [$irqs]" \
        '^net: intx INTA -> ioapic 0x[0-9a-f]+ pin [0-9]+ \(level, active (low|high), from the (mp table|pci interrupt line)\) vector 0x30' \
        "^net: driver shape linux-irq \(.*, woken by INTx\)\$" \
        '^ping: 3 sent, 3 received' \
        '^rr: 200 transactions in [0-9.]+ s = ' \
        '^net: intx quiesced: irqs=[1-9][0-9]* spurious=[0-9]+ idle=[0-9]+$'
done
# Failure paths end with a clear line and a non-zero status.
run "net=rr $base port=$closed_port secs=1 nic=c"
check "rr to a closed port fails (exit 10)" 21 "" "^rr: connect to $host_ip:$closed_port failed"
run "cpuid"
check "cpuid word" 1 "" '^cpuid: 1\.ecx=0x[0-9a-f]{8} 1\.edx=0x[0-9a-f]{8} 7\.ebx=0x[0-9a-f]{8} 7\.ecx=0x[0-9a-f]{8} 0xd\.eax=0x[0-9a-f]{8}$'

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]

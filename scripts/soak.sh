#!/usr/bin/env bash
# wbvmm soak test: mixed load for a bounded time, with memory, descriptors and threads
# required to stay flat.
#
#   scripts/soak.sh [--secs N]      (default 600; CI runs --secs 180)
#
# Inside a network namespace this script creates (tap 169.254.77.1/24, guest .2):
#  - the test guest (`soak=SECS`) runs rounds of ping + TCP request/response against a
#    socat echo server, re-initialising its NIC (chip reset, full init) and moving its
#    BARs between two placements every time;
#  - the host floods the guest (UDP, 1000 datagrams/s or SOAK_FLOOD_RATE, bounded in
#    count and time);
#  - the VM process (target/release/examples/soak: the library, because the command
#    line cannot add or remove memslots from outside) adds and removes 4 memslots
#    under the guest every ~20 ms;
#  - every second: SIGUSR1 (a statistics snapshot) and a sample of the VM process's
#    RSS, open descriptors and threads;
#  - at 85 % of the run the tap is deleted and re-created (wbvmm keeps its descriptor
#    of the deleted tap and carries on; the guest's traffic fails from then on, which
#    the guest counts and survives).
# At the end it prints the samples, the drop counters and the drift after warm-up
# (the first 20 % of the run) and fails if RSS grew by more than max(8 MiB, 5 %),
# descriptors by more than 2, or the thread count changed; or if the guest did not
# finish its rounds cleanly, or snapshots went unanswered.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$REPO/scripts/lib/common.sh"
. "$REPO/scripts/lib/netns.sh"

SECS=600
while [ $# -gt 0 ]; do
    case $1 in
        --secs) SECS=${2:?--secs needs a number}; shift 2 ;;
        -h | --help) sed -n '2,25p' "$0"; exit 0 ;;
        *) wb_die "unknown argument $1" "usage: scripts/soak.sh [--secs N]" ;;
    esac
done
case $SECS in '' | *[!0-9]*) wb_die "--secs wants a whole number of seconds" ;; esac
[ "$SECS" -ge 60 ] && [ "$SECS" -le 86400 ] || wb_die "--secs must be 60..86400"
[ "$(id -u)" -eq 0 ] || wb_die "the soak needs root (network namespace, tap)" "run it as root"
[ -r /dev/kvm ] && [ -w /dev/kvm ] || wb_die "/dev/kvm is missing or not accessible" "the soak boots a guest under KVM"
wb_need_cmd ip iproute2
wb_need_cmd socat socat
wb_need_cmd python3 python3

wb_log "building the VM harness and the test guest"
cargo build --release --example soak >&2
"$REPO/guest-images/build-testguest.sh" >/dev/null

NS="wbvmm-soak-$$"
TAP=wbs0
HOST=169.254.77.1
GUEST=169.254.77.2
PORT=7777
WORK=$(mktemp -d /tmp/wbvmm-soak.XXXXXX)
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do wb_kill_tree "$p" 2>/dev/null || true; done
    wb_netns_del "$NS"
}
trap cleanup EXIT

wb_netns_tap "$NS" "$TAP" "$HOST/24"
# Everything started here is bounded in time of its own, and killed by PID at the end.
LIMIT=$((SECS + 180))
ip netns exec "$NS" timeout "$LIMIT" socat "TCP-LISTEN:$PORT,reuseaddr,fork" PIPE &
PIDS+=($!)
wb_wait_listen "$NS" "$PORT"

# The guest soaks for SECS of its own time; trans= keeps a round to a second or so.
CMDLINE="ip=$GUEST/24 peer=$HOST port=$PORT trans=300 count=3 nic=cplus soak=$SECS"
ip netns exec "$NS" "$REPO/target/release/examples/soak" --kernel "$REPO/guest-images/out/testguest.elf" \
    --tap "$TAP" --cmdline "$CMDLINE" --serial "$WORK/serial" >"$WORK/vm.out" 2>"$WORK/vm.err" &
VM=$!
PIDS+=("$VM")
wb_log "VM pid $VM, namespace $NS, $SECS s (work files in $WORK)"

# Wait for the guest's first round before loading it (deadline = failure).
for _ in $(seq 1 1200); do
    grep -q '^soak: round 0 ' "$WORK/serial" 2>/dev/null && break
    kill -0 "$VM" 2>/dev/null || break
    sleep 0.1
done
grep -q '^soak: round 0 ' "$WORK/serial" 2>/dev/null ||
    wb_die "the guest never finished a round; serial: $(tail -5 "$WORK/serial" 2>/dev/null)" "see $WORK/vm.err"

# The flood: 1400-byte UDP datagrams at the guest, FLOOD_RATE a second (paced in 10 ms
# batches; ping would slow to ~50/s without replies), bounded in count and time. The
# guest has no socket on that port: the frames only load the RX path. (At 5000/s the
# polling test guest spends its time draining them and most RR rounds time out.)
FLOOD_RATE=${SOAK_FLOOD_RATE:-1000}
ip netns exec "$NS" timeout "$LIMIT" python3 -c '
import socket, sys, time
host, secs, rate = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
data, sent, refused, batches = bytes(1400), 0, 0, 0
t = time.monotonic()
end = t + secs
while time.monotonic() < end and sent + refused < rate * secs:
    for _ in range(rate // 100):
        try:
            s.sendto(data, (host, 9))
            sent += 1
        except OSError:
            refused += 1
    batches += 1
    if batches % 100 == 0:
        print(f"flood: {sent} datagrams sent, {refused} refused by the host stack", flush=True)
    t += 0.01
    if t > time.monotonic():
        time.sleep(t - time.monotonic())
' "$GUEST" "$SECS" "$FLOOD_RATE" >"$WORK/flood" 2>&1 &
PIDS+=($!)

sample() { # t rss_kib fds threads
    local st rss thr fds
    st=$(cat "/proc/$VM/status" 2>/dev/null) || return 1
    rss=$(awk '/^VmRSS:/ {print $2}' <<<"$st")
    thr=$(awk '/^Threads:/ {print $2}' <<<"$st")
    fds=$(find "/proc/$VM/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    echo "$1 $rss $fds $thr"
}

: >"$WORK/samples"
START=$(date +%s)
TAP_AT=$((SECS * 85 / 100))
TAP_DONE=0
t=0
# One sample and one SIGUSR1 per second until the guest's soak is over (then the VM
# tears down, which is not steady state); bounded by LIMIT.
while kill -0 "$VM" 2>/dev/null && [ "$t" -lt "$LIMIT" ] &&
    ! grep -qE '^soak: [0-9]+ rounds' "$WORK/serial" 2>/dev/null; do
    sample "$t" >>"$WORK/samples" || break
    kill -USR1 "$VM" 2>/dev/null || true
    if [ "$TAP_DONE" = 0 ] && [ "$t" -ge "$TAP_AT" ]; then
        wb_log "t=${t}s: deleting and re-creating the tap"
        ROUNDS_AT_TAP=$(grep -cE '^soak: round ' "$WORK/serial" || true)
        ip netns exec "$NS" ip link del "$TAP"
        ip netns exec "$NS" ip tuntap add "$TAP" mode tap
        ip netns exec "$NS" ip addr add "$HOST/24" dev "$TAP"
        ip netns exec "$NS" ip link set "$TAP" up
        TAP_DONE=1
    fi
    sleep 1
    t=$(($(date +%s) - START))
done
# Past the bound: stop the VM (SIGTERM, our own PID); the run then fails below.
kill -0 "$VM" 2>/dev/null && [ "$t" -ge "$LIMIT" ] && kill -TERM "$VM"
set +e
wait "$VM"
VM_RC=$?
set -e

echo "== guest =="
grep -E '^soak: [0-9]+ rounds' "$WORK/serial" || echo "(no summary line)"
echo "rounds with a failure: $(grep -cE '^soak: round .*failed' "$WORK/serial" || true)"
if [ -n "${ROUNDS_AT_TAP:-}" ]; then
    echo "after the tap was deleted and re-created: $(grep -E '^soak: round ' "$WORK/serial" |
        tail -n +"$((ROUNDS_AT_TAP + 1))" | awk '/failed/ {f++} !/failed/ {o++} END {printf "%d good, %d failed rounds", o, f}')"
fi
echo "== VM =="
tail -1 "$WORK/vm.out"
echo "snapshot lines: $(grep -c '^snapshot:' "$WORK/vm.out" || true)"
echo "== flood (so far; it runs on a little past the guest) =="
tail -1 "$WORK/flood"
# The last sample may fall into the VM's teardown (threads joined, descriptors
# closed), and one taken as the process went has no descriptors: neither is steady state.
head -n -1 "$WORK/samples" | awk '$3 > 0' >"$WORK/steady"
echo "== samples (t s, RSS KiB, fds, threads) =="
N=$(wc -l <"$WORK/steady")
awk -v n="$N" 'NR == 1 || NR == n || NR % int(n / 10 + 1) == 0' "$WORK/steady"

WARM=$((SECS / 5))
FAIL=0
read -r RSS0 FD0 THR0 < <(awk -v w="$WARM" '$1 >= w {print $2, $3, $4; exit}' "$WORK/steady")
read -r RSSMAX FDMAX FDMIN THRMAX THRMIN < <(awk -v w="$WARM" '$1 >= w {
    if (!s || $2 > r) r = $2; if (!s || $3 > fx) fx = $3; if (!s || $3 < fn) fn = $3;
    if (!s || $4 > tx) tx = $4; if (!s || $4 < tn) tn = $4; s = 1 }
    END {print r, fx, fn, tx, tn}' "$WORK/steady")
if [ -z "${RSS0:-}" ]; then
    echo "FAIL: no samples after the warm-up (${WARM}s)"
    FAIL=1
else
    RSS_BOUND=$((RSS0 / 20 > 8192 ? RSS0 / 20 : 8192))
    echo "== drift after warm-up (${WARM}s) =="
    echo "RSS: ${RSS0} KiB at warm-up, max ${RSSMAX} KiB: +$((RSSMAX - RSS0)) KiB (bound ${RSS_BOUND} KiB)"
    echo "fds: ${FD0} at warm-up, ${FDMIN}..${FDMAX} (bound +2)"
    echo "threads: ${THR0} at warm-up, ${THRMIN}..${THRMAX} (bound: unchanged)"
    [ $((RSSMAX - RSS0)) -le "$RSS_BOUND" ] || { echo "FAIL: RSS grew"; FAIL=1; }
    [ $((FDMAX - FD0)) -le 2 ] || { echo "FAIL: descriptors grew"; FAIL=1; }
    [ "$THRMAX" = "$THR0" ] && [ "$THRMIN" = "$THR0" ] || { echo "FAIL: thread count changed"; FAIL=1; }
fi
[ "$VM_RC" = 0 ] || { echo "FAIL: the VM harness exited $VM_RC (see $WORK/vm.err)"; FAIL=1; }
grep -qE '^soak: [0-9]+ rounds' "$WORK/serial" || { echo "FAIL: the guest did not finish its soak"; FAIL=1; }
OK_ROUNDS=$(grep -cE '^soak: round [0-9]+ ping=ok rr=ok' "$WORK/serial" || true)
[ "$OK_ROUNDS" -ge 3 ] || { echo "FAIL: only $OK_ROUNDS fully good rounds"; FAIL=1; }
SNAPS=$(grep -c '^snapshot:' "$WORK/vm.out" || true)
[ "$SNAPS" -ge $((N / 2)) ] || { echo "FAIL: $SNAPS snapshots for $N SIGUSR1s"; FAIL=1; }
if [ "$FAIL" = 0 ]; then
    echo "soak: PASS ($SECS s, $N samples, $OK_ROUNDS good rounds)"
    rm -rf "$WORK"
else
    echo "soak: FAIL (work files kept in $WORK)"
    exit 1
fi

#!/bin/bash
# TCP request/response benchmark of wbvmm's RTL8139 against a host peer, in one command:
#
#   scripts/setup.sh && scripts/tcp-rr.sh [options]
#
#   --secs N             length of the timed run (default 10)
#   --size REQ,RESP      request/response sizes in bytes (default 1,1). The test guest's net=rr
#                        does only 1,1; other sizes need the Linux guest (netperf TCP_RR -r)
#   --rev 0x10|0x20      the NIC's PCI revision: 0x20 = 8139C+ (default), 0x10 = 8139C
#   --pin on|off         pin the vCPU, the I/O thread and the peer (default: on when the host has
#                        at least 2 CPUs)
#   --vcpu-cpu N         host CPU for the vCPU thread (default 1)
#   --io-cpu N           host CPU for wbvmm's I/O thread (default 0)
#   --peer-cpu N         host CPU for the peer (socat / netserver) (default 0)
#   --guest testguest|linux|auto
#                        auto (default): the Debian Linux guest running netperf TCP_RR where
#                        `wbvmm probe --json` says guest kernel mode runs natively, else the test
#                        guest's `net=rr` (1-byte TCP echo transactions, driver at CPL3).
#                        linux: netperf TCP_RR in a Linux guest on every host. Where guest kernel
#                        mode is emulated (nested PVM hosts) that is the small guest
#                        (guest-images/out/linux-small, about a minute to netperf): the script
#                        says what that means for the figures. --rev 0x20 binds Linux's 8139cp,
#                        0x10 its 8139too
#   --linux small|debian|auto
#                        which Linux guest: auto (default) = the stock Debian guest where guest
#                        kernel mode is native, the small guest where it is emulated
#   --linux-args WORDS   Linux guests only: more kernel command line words, e.g.
#                        `8139too.use_io=0` (the small guest's 8139too is built with
#                        CONFIG_8139TOO_PIO, the Kconfig default, and uses port I/O; Debian's is
#                        not, and uses the MMIO BAR: this makes the small guest's do the same)
#   --nic c|cplus|auto   test guest only: the driver's mode (default auto: from the revision)
#   --nicio pio|mmio     test guest only: registers through port I/O (default) or MMIO
#   --net-opts OPTS      extra options appended to wbvmm's --net tap=...,rev=...
#                        (e.g. tx=exit where this wbvmm has it)
#   --wbvmm PATH         the wbvmm binary (default target/release/wbvmm, built if missing)
#   --keep-output        print the guest's whole console output
#
# Network: a private namespace (wbvmm-rr-PID) holding a tap at 169.254.20.1/24; the guest is
# 169.254.20.2; the peer listens in the namespace only. Every wait is bounded; on any exit
# (including Ctrl-C) the script kills the PIDs it started, by PID, and deletes the namespace.
#
# Output: a report, then two machine-readable final lines:
#   tcp_rr: X trans/s
#   exits_per_transaction: Y        (wbvmm's io_in+io_out+mmio_read+mmio_write / transactions:
#                                    boot included for the test guest; for a Linux guest counted
#                                    over netperf's run only, between two --stats snapshots)
# A Linux guest's report adds wall-clock stage times, `wbvmm stats` of netperf's run and of the
# whole VM, and where a transaction's time goes (emulated kernel instructions, exits, fallbacks).
# Needs root, /dev/kvm, socat (test guest) or netperf (Linux guest), iproute2, python3.
set -u
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$here/lib/common.sh"
# shellcheck source-path=SCRIPTDIR source=lib/netns.sh
. "$here/lib/netns.sh"

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }

secs=10
size=1,1
rev=0x20
ncpu=$(nproc)
if [ "$ncpu" -ge 2 ]; then pin=on; else pin=off; fi
vcpu_cpu=1
io_cpu=0
peer_cpu=0
guest=auto
linux_image=auto
nic=auto
nicio=pio
wbvmm=""
net_opts=""
linux_args=""
keep=0
while [ $# -gt 0 ]; do
    case $1 in
        --secs) secs=${2:?--secs needs a number}; shift 2 ;;
        --size) size=${2:?--size needs REQ,RESP}; shift 2 ;;
        --rev) rev=${2:?--rev needs 0x10 or 0x20}; shift 2 ;;
        --pin) pin=${2:?--pin needs on or off}; shift 2 ;;
        --vcpu-cpu) vcpu_cpu=${2:?--vcpu-cpu needs a CPU number}; shift 2 ;;
        --io-cpu) io_cpu=${2:?--io-cpu needs a CPU number}; shift 2 ;;
        --peer-cpu) peer_cpu=${2:?--peer-cpu needs a CPU number}; shift 2 ;;
        --guest) guest=${2:?--guest needs testguest, linux or auto}; shift 2 ;;
        --linux) linux_image=${2:?--linux needs small, debian or auto}; shift 2 ;;
        --nic) nic=${2:?--nic needs c, cplus or auto}; shift 2 ;;
        --nicio) nicio=${2:?--nicio needs pio or mmio}; shift 2 ;;
        --net-opts) net_opts=${2:?--net-opts needs options}; shift 2 ;;
        --linux-args) linux_args=${2:?--linux-args needs kernel command line words}; shift 2 ;;
        --wbvmm) wbvmm=${2:?--wbvmm needs a path}; shift 2 ;;
        --keep-output) keep=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) printf 'error: unknown option %s\n  what to do: see %s --help\n' "$1" "$0" >&2; exit 2 ;;
    esac
done

bad() { printf 'error: %s\n  what to do: see %s --help\n' "$1" "$0" >&2; exit 2; }
case $secs in ''|*[!0-9]*) bad "--secs wants a whole number of seconds, got '$secs'" ;; esac
{ [ "$secs" -ge 1 ] && [ "$secs" -le 600 ]; } || bad "--secs must be 1..600"
[[ $size =~ ^([0-9]+),([0-9]+)$ ]] || bad "--size wants REQ,RESP in bytes (like 1,1 or 64,64), got '$size'"
req=${BASH_REMATCH[1]}
resp=${BASH_REMATCH[2]}
{ [ "$req" -ge 1 ] && [ "$resp" -ge 1 ]; } || bad "--size: both sizes must be at least 1 byte"
case $rev in 0x10|0x20) ;; *) bad "--rev must be 0x10 or 0x20, got '$rev'" ;; esac
case $pin in on|off) ;; *) bad "--pin must be on or off, got '$pin'" ;; esac
case $guest in testguest|linux|auto) ;; *) bad "--guest must be testguest, linux or auto" ;; esac
case $linux_image in small|debian|auto) ;; *) bad "--linux must be small, debian or auto" ;; esac
case $nic in c|cplus|auto) ;; *) bad "--nic must be c, cplus or auto" ;; esac
case $nicio in pio|mmio) ;; *) bad "--nicio must be pio or mmio" ;; esac
for c in "$vcpu_cpu" "$io_cpu" "$peer_cpu"; do
    case $c in ''|*[!0-9]*) bad "CPU numbers are whole numbers, got '$c'" ;; esac
    if [ "$pin" = on ] && [ "$c" -ge "$ncpu" ]; then
        bad "CPU $c does not exist (this host has $ncpu: 0..$((ncpu - 1))); pick others or --pin off"
    fi
done

[ "$(id -u)" -eq 0 ] || wb_die "needs root (network namespace, tap)" "run as root"
[ -c /dev/kvm ] || wb_die "/dev/kvm missing" "run on a host with KVM"
wb_need_cmd ip iproute2
wb_need_cmd python3 python3
wb_need_cmd taskset util-linux

if [ -z "$wbvmm" ]; then
    wbvmm=$root/target/release/wbvmm
    if [ ! -x "$wbvmm" ]; then
        wb_log "building wbvmm (cargo build --release)"
        (cd "$root" && cargo build --release >&2) || wb_die "building wbvmm failed" "run scripts/setup.sh"
    fi
fi
[ -x "$wbvmm" ] || wb_die "no wbvmm binary at $wbvmm" "run scripts/setup.sh or cargo build --release"

# A private copy, so that a rebuild while the benchmark runs cannot swap the binary under it.
work=$(mktemp -d /tmp/wbvmm-tcp-rr.XXXXXX)
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM
cp "$wbvmm" "$work/wbvmm" || wb_die "cannot copy $wbvmm to $work"
wbvmm_src=$wbvmm
wbvmm=$work/wbvmm

# --- which guest -----------------------------------------------------------------------------
probe_json=$("$wbvmm" probe --json 2>/dev/null) || wb_die "wbvmm probe --json failed" "run '$wbvmm probe' to see why"
native=$(printf '%s' "$probe_json" | python3 -c 'import json,sys; print("yes" if json.load(sys.stdin).get("kernel_mode_native") else "no")')
probe_value() { # probe_value KEY FORMAT: one figure of `wbvmm probe --json`, or nothing
    printf '%s' "$probe_json" | python3 -c 'import json,sys; v=json.load(sys.stdin).get(sys.argv[1]); print("" if v is None else sys.argv[2] % v)' "$1" "$2"
}
exit_us=$(probe_value mmio_exit_cpl3_us %.1f)
exit_cpl0_us=$(probe_value mmio_exit_cpl0_us %.1f)
cpl0_loops=$(probe_value cpl0_loops_per_sec %.0f)
cpl3_loops=$(probe_value cpl3_loops_per_sec %.0f)
if [ "$guest" = auto ]; then
    if [ "$native" = yes ]; then guest=linux; else guest=testguest; fi
fi
if [ "$guest" = linux ] && [ "$linux_image" = auto ]; then
    if [ "$native" = yes ]; then linux_image=debian; else linux_image=small; fi
fi
if [ "$guest" = testguest ] && [ -n "$linux_args" ]; then
    bad "--linux-args is for a Linux guest, and this run uses the test guest: add --guest linux"
fi
echo "=== wbvmm TCP request/response ==="
if [ "$native" != yes ]; then
    echo "*** This host cannot run a Linux guest kernel at native speed: 'wbvmm probe' says guest"
    echo "*** kernel mode is emulated here (nested/paravirtual KVM)."
    if [ "$guest" = linux ]; then
        # probe's CPL0 loop is `dec ecx; jnz`: two instructions per iteration.
        python3 - "$cpl0_loops" "$cpl3_loops" "$exit_cpl0_us" <<'EOF'
import sys
c0, c3, x0 = (float(a) if a else 0.0 for a in sys.argv[1:4])
print(f"*** Every guest kernel instruction goes through KVM's instruction emulator, about "
      f"{2 * c0 / 1e6:.1f} M/s")
print(f"*** ('wbvmm probe': CPL0 loop {c0 / 1e6:.2f} M iterations/s, user mode {c3 / 1e6:,.0f} M/s), "
      f"and an exit to")
print(f"*** wbvmm from guest kernel mode costs {x0:.1f} us. So netperf's trans/s below is the "
      f"emulated guest")
print("*** kernel's (TCP/IP stack, interrupts, driver), not wbvmm's device: tens of transactions/s at best")
print("*** here, where QEMU TCG runs the same guest at thousands (README, 'Nested hosts'); hosts")
print("*** with hardware virtualization give the real figure. Exits and fallbacks per transaction")
print("*** below are what wbvmm's device and its emulation fallback add to each transaction.")
EOF
        if [ "$linux_image" = debian ]; then
            wb_warn "--linux debian asked for here: the stock Debian kernel needs about half an hour to"
            wb_warn "reach /init on such a host (README, 'Nested hosts'); trying, bounded to $((secs + 3600)) s"
        else
            echo "*** The small Linux guest (guest-images/out/linux-small) gets to netperf in about a minute."
        fi
    else
        echo "*** So this measures the test guest's net=rr (its RTL8139 driver runs at CPL3, natively)"
        echo "*** against a host TCP echo peer, instead of netperf TCP_RR in a Linux guest."
    fi
fi
if [ "$guest" = testguest ] && [ "$size" != 1,1 ]; then
    wb_die "the test guest's net=rr does only 1-byte requests and 1-byte responses (--size 1,1); --size $size needs the Linux guest (netperf TCP_RR -r $size)" \
        "use --size 1,1, or --guest linux on a host where 'wbvmm probe' says guest kernel mode is native"
fi

if [ "$guest" = testguest ]; then
    wb_need_cmd socat socat
    elf=$root/guest-images/out/testguest.elf
    if [ ! -f "$elf" ]; then
        wb_log "building the test guest"
        elf=$("$root/guest-images/build-testguest.sh" | tail -1) || wb_die "building the test guest failed"
    fi
    [ -f "$elf" ] || wb_die "no test guest at $elf" "run scripts/setup.sh"
elif [ "$linux_image" = small ]; then
    wb_need_cmd netserver netperf
    # vmlinux through PVH: on an emulating host the bzImage's decompression alone takes ~20 s.
    kernel=$root/guest-images/out/linux-small/vmlinux
    initrd=$root/guest-images/out/linux-small/initramfs.cpio
    { [ -f "$kernel" ] && [ -f "$initrd" ]; } ||
        wb_die "no small Linux guest in guest-images/out/linux-small" "run scripts/setup.sh (or guest-images/build-linux-small.sh)"
    for f in cmdline cmdline-emulated; do
        [ -f "$root/guest-images/linux/$f" ] || wb_die "guest-images/linux/$f is missing" "update your checkout"
    done
else
    wb_need_cmd netserver netperf
    kernel=$root/guest-images/out/linux/bzImage
    initrd=$root/guest-images/out/linux/initramfs.cpio.gz
    { [ -f "$kernel" ] && [ -f "$initrd" ]; } || wb_die "no Linux guest in guest-images/out/linux" "run scripts/setup.sh"
fi

pin_flags=()
pin_mode=off
if [ "$pin" = on ]; then
    if "$wbvmm" --help 2>/dev/null | grep -q -- --cpu-affinity; then
        pin_mode=flags
        pin_flags=(--cpu-affinity "0=$vcpu_cpu")
        if "$wbvmm" --help 2>/dev/null | grep -q -- --io-affinity; then
            pin_flags+=(--io-affinity "$io_cpu")
        fi
    else
        # Older wbvmm: start the process on the I/O CPU, then move the vCPU thread (found by
        # its name, vcpu0) with taskset -p as soon as it exists.
        pin_mode=taskset
    fi
fi

# --- namespace, peer --------------------------------------------------------------------------
ns=wbvmm-rr-$$
tap=wbrr$$
host_ip=169.254.20.1
guest_ip=169.254.20.2
peer_pid=""
vm_pid=""
cleanup() {
    wb_kill_tree "$vm_pid"
    wb_kill_tree "$peer_pid"
    wb_netns_del "$ns"
    rm -rf "$work"
}
trap cleanup EXIT
trap 'echo "interrupted; cleaning up" >&2; exit 130' INT TERM

pin_cmd() { # pin_cmd CPU: a prefix running a command on CPU when pinning is on
    if [ "$pin" = on ]; then echo "taskset -c $1"; fi
}

wb_netns_tap "$ns" "$tap" "$host_ip/24"
if [ "$guest" = testguest ]; then
    port=7777
    # shellcheck disable=SC2046
    ip netns exec "$ns" $(pin_cmd "$peer_cpu") socat -T $((secs + 30)) \
        TCP-LISTEN:$port,bind=$host_ip,reuseaddr,fork PIPE </dev/null >"$work/peer.log" 2>&1 &
    peer_pid=$!
    peer_desc="socat TCP echo on $host_ip:$port"
else
    port=12865
    # shellcheck disable=SC2046
    ip netns exec "$ns" $(pin_cmd "$peer_cpu") netserver -D -p $port -L "$host_ip" \
        </dev/null >"$work/peer.log" 2>&1 &
    peer_pid=$!
    peer_desc="netserver on $host_ip:$port"
fi
wb_wait_listen "$ns" "$port" 50 || { cat "$work/peer.log" >&2; wb_die "the peer ($peer_desc) did not start listening within 5 s"; }

# --- the guest ---------------------------------------------------------------------------------
serial=$work/serial.txt
stats=$work/stats.json
if [ "$guest" = testguest ]; then
    cmdline="net=rr ip=$guest_ip/24 peer=$host_ip port=$port secs=$secs nic=$nic nicio=$nicio"
    vm_args=(--kernel "$elf")
    limit=$((secs + 60))
    started_re='^rr: connected'
else
    run_words="wbvmm.end=reboot wbvmm.run=netperf:$host_ip:TCP_RR wbvmm.ip=$guest_ip/24 wbvmm.secs=$secs wbvmm.args=-r:$req,$resp${linux_args:+ $linux_args}"
    if [ "$linux_image" = small ]; then
        # The README's Linux words plus those that only make an emulated guest kernel faster
        # (one file each, read by the tests too).
        cmdline="$(tr '\n' ' ' <"$root/guest-images/linux/cmdline")$(tr '\n' ' ' <"$root/guest-images/linux/cmdline-emulated")$run_words"
        memory=128M
        # Only fails a hung run: the small guest gets to netperf in about a minute here (15 min
        # when the host is heavily loaded).
        limit=$((secs + 1800))
    else
        cmdline="console=ttyS0 reboot=k panic=1 acpi=off pci=conf1 $run_words"
        memory=256M
        if [ "$native" = yes ]; then limit=$((secs + 180)); else limit=$((secs + 3600)); fi
    fi
    vm_args=(--kernel "$kernel" --initramfs "$initrd")
    started_re='wbvmm-linux-guest: eth0 up:'
fi
vm_args+=(--memory "${memory:-256M}" --cpus 1 --serial "file=$serial" --net "tap=$tap,rev=$rev${net_opts:+,$net_opts}" "--stats=$stats" --cmdline "$cmdline")

if [ "$guest" = testguest ]; then
    echo "guest:   testguest (net=rr, $req-byte request / $resp-byte response)"
else
    echo "guest:   linux, $([ "$linux_image" = small ] && echo "the small guest" || echo "the Debian guest"): $kernel (netperf TCP_RR -r $req,$resp)"
    echo "cmdline: $cmdline"
fi
echo "nic:     RTL8139 rev $rev on tap $tap in namespace $ns; guest $guest_ip, peer $peer_desc"
echo "wbvmm:   $wbvmm_src (run from a private copy)"
echo "run:     $secs s"
case $pin_mode in
    flags) echo "pinning: on: vCPU -> CPU $vcpu_cpu, I/O thread -> CPU $io_cpu, peer -> CPU $peer_cpu (wbvmm ${pin_flags[*]})" ;;
    taskset) echo "pinning: on: vCPU -> CPU $vcpu_cpu, I/O + main thread -> CPU $io_cpu, peer -> CPU $peer_cpu (this wbvmm has no --cpu-affinity: taskset -p on the vcpu0 thread)" ;;
    off) echo "pinning: off$([ "$ncpu" -lt 2 ] && echo " (the host has $ncpu CPU)")" ;;
esac

# With the flags, wbvmm pins its own threads (it refuses CPUs outside its inherited mask, so the
# process itself is not confined); without them, start it on the I/O CPU and move vcpu0 below.
launch=()
[ "$pin_mode" = taskset ] && launch=(taskset -c "$io_cpu")
t_start=$EPOCHREALTIME
ip netns exec "$ns" "${launch[@]}" "$wbvmm" "${vm_args[@]}" "${pin_flags[@]}" \
    </dev/null >"$work/wbvmm.out" 2>"$work/wbvmm.err" &
vm_pid=$!

# snapshot NAME: a --stats snapshot of the running VM (SIGUSR1) saved as $work/NAME.json. wbvmm
# replaces the file atomically, so a file that parses is the whole snapshot; the bound only
# fails a VM that no longer answers.
snapshot() {
    local _i
    local t
    rm -f "$stats"
    # The vCPU thread's scheduler statistics (ns on a CPU, ns runnable but waiting for one),
    # and the time they were read at.
    for t in /proc/"$vm_pid"/task/*; do
        [ "$(cat "$t/comm" 2>/dev/null)" = vcpu0 ] && cat "$t/schedstat" >"$work/$1.sched" 2>/dev/null
    done
    echo "$EPOCHREALTIME" >"$work/$1.t"
    kill -USR1 "$vm_pid" 2>/dev/null || return 1
    for _i in $(seq 300); do
        if python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$stats" 2>/dev/null; then
            cp "$stats" "$work/$1.json"
            return 0
        fi
        sleep 0.1
    done
    wb_warn "no --stats snapshot ($1) within 30 s of SIGUSR1"
    return 1
}
# A Linux guest's stages, with the wall time (since wbvmm started) each first appeared.
stage_names=()
stage_res=()
if [ "$guest" = linux ]; then
    stage_names=(banner "driver bound" /init "eth0 up" "netperf done")
    stage_res=('Linux version' '(8139cp|8139too) [0-9a-f:.]+ eth0: .*IRQ [0-9]+' 'Run /init' "$started_re" 'wbvmm-linux-guest: step netperf')
fi
stage_at=()
elapsed() { python3 -c "import sys; print('%.1f' % (float(sys.argv[2]) - float(sys.argv[1])))" "$t_start" "$EPOCHREALTIME"; }

# netperf's timed run is its data connection (the control connection is port 12865): seen from
# the namespace, it brackets the transactions netperf counts, and the two snapshots taken when
# it opens and closes bracket what they cost (give or take one pass of the loop below).
data_connection() {
    ip netns exec "$ns" ss -Htn state established 2>/dev/null | awk -v c="$host_ip:$port" '$3 ~ /^169\.254\./ && $3 != c { f = 1 } END { exit !f }'
}
rr_state=0 # 0: before netperf's data connection, 1: during, 2: after

# Wait (bounded) for the timed loop to start; then record where the threads run.
deadline=$((SECONDS + limit))
started=0
repinned=0
while kill -0 "$vm_pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do
    for i in "${!stage_names[@]}"; do
        if [ -z "${stage_at[$i]:-}" ] && [ -f "$serial" ] && grep -Eq -- "${stage_res[$i]}" "$serial"; then
            stage_at[i]=$(elapsed)
        fi
    done
    if [ "$pin_mode" = taskset ] && [ $repinned = 0 ]; then
        tid=$(ps -L -o tid=,comm= -p "$vm_pid" 2>/dev/null | awk '$2 == "vcpu0" { print $1 }')
        if [ -n "$tid" ]; then taskset -p -c "$vcpu_cpu" "$tid" >/dev/null && repinned=1; fi
    fi
    if [ $started = 0 ] && [ -f "$serial" ] && grep -Eq "$started_re" "$serial"; then
        started=1
        sleep 0.3
        {
            echo "threads while the test runs (ps -L; taskset -pc):"
            ps -L -o tid=,comm= -p "$vm_pid" 2>/dev/null | while read -r t c; do
                printf '  wbvmm %-10s tid %-7s %s\n' "$c" "$t" "$(taskset -pc "$t" 2>/dev/null | sed 's/.*: //;s/^/CPUs /')"
            done
            for p in "$peer_pid" $(ps -o pid= --ppid "$peer_pid" 2>/dev/null); do
                printf '  peer  %-10s pid %-7s %s\n' "$(ps -o comm= -p "$p" 2>/dev/null)" "$p" "$(taskset -pc "$p" 2>/dev/null | sed 's/.*: //;s/^/CPUs /')"
            done
        } >"$work/threads.txt"
    fi
    if [ "$guest" = linux ] && [ $started = 1 ] && [ $rr_state -lt 2 ]; then
        if [ $rr_state = 0 ] && data_connection; then
            rr_state=1
            snapshot run-start
        elif [ $rr_state = 1 ] && ! data_connection; then
            rr_state=2
            snapshot run-end
        fi
        # While netperf runs, poll the connection without the loop's nap.
        if [ $rr_state = 1 ]; then sleep 0.05; continue; fi
    fi
    sleep 0.2
done
if kill -0 "$vm_pid" 2>/dev/null; then
    wb_warn "wbvmm still running after $limit s; stopping it"
    kill "$vm_pid" 2>/dev/null
    sleep 2
    kill -9 "$vm_pid" 2>/dev/null
fi
wait "$vm_pid"
rc=$?
vm_pid=""

show_console() { sed 's/^/  | /' "$serial" 2>/dev/null; sed 's/^/  wbvmm| /' "$work/wbvmm.err"; }
[ $keep = 1 ] && { echo "console:"; show_console; }
[ -f "$work/threads.txt" ] && cat "$work/threads.txt"
if [ ${#stage_names[@]} -gt 0 ]; then
    line="stages:  (wall s since start)"
    for i in "${!stage_names[@]}"; do line+=" ${stage_names[$i]} ${stage_at[$i]:--}"; [ "$i" -lt $((${#stage_names[@]} - 1)) ] && line+=","; done
    echo "$line; wbvmm ended $(elapsed)"
fi

# --- results -------------------------------------------------------------------------------------
tps=""
trans=""
if [ "$guest" = testguest ]; then
    line=$(grep -E '^rr: [0-9]+ transactions in [0-9]+ s = [0-9.]+ trans/s' "$serial" 2>/dev/null | tail -1)
    if [ -n "$line" ]; then
        trans=$(echo "$line" | awk '{ print $2 }')
        tps=$(echo "$line" | awk '{ print $(NF-1) }')
        echo "guest:   ${line}"
        grep -E '^rr: per transaction:' "$serial" | sed 's/^/guest:   /'
    fi
else
    # netperf's result line: socket sizes, request, response, elapsed, rate.
    line=$(tr -d '\r' <"$serial" | awk 'NF == 6 && $3 == '"$req"' && $4 == '"$resp"' && $5 ~ /^[0-9.]+$/ && $6 ~ /^[0-9.]+$/ { l = $0 } END { print l }')
    if [ -n "$line" ]; then
        tps=$(echo "$line" | awk '{ print $6 }')
        el=$(echo "$line" | awk '{ print $5 }')
        trans=$(python3 -c "print(round($tps * $el))")
        echo "netperf: $line"
    fi
fi
if [ -z "$tps" ]; then
    echo "FAILED: no result from the guest (wbvmm exit status $rc); console:"
    show_console
    exit 1
fi
# wbvmm's exit status: 0 from the test guest (its debug-exit value) and from the Linux guest's reboot.
[ "$rc" -eq 0 ] || wb_warn "wbvmm exit status $rc (expected 0)"

epx=""
kepx=""
if [ "$guest" = linux ]; then
    # stats_section TITLE FILE: one section of `wbvmm stats FILE` (sections end at a blank line).
    stats_section() {
        local table
        if ! table=$("$wbvmm" stats "$2" 2>&1); then
            wb_warn "wbvmm stats cannot read $2: $table"
            return 0
        fi
        printf '%s\n' "$table" | awk -v t="$1" 'index($0, t) == 1 { on = 1 } on && /^$/ { exit } on { print "  " $0 }'
    }
    if [ -f "$work/run-start.json" ] && [ -f "$work/run-end.json" ]; then
        run_secs=$(python3 -c 'import sys; print(float(open(sys.argv[2]).read()) - float(open(sys.argv[1]).read()))' "$work/run-start.t" "$work/run-end.t")
        sched=$(cat "$work/run-start.sched" "$work/run-end.sched" 2>/dev/null | awk 'NR == 1 { r = $1; w = $2 } NR == 2 { print $1 - r, $2 - w }')
        report=$(python3 "$here/lib/linux-run-report.py" "$work/run-start.json" "$work/run-end.json" \
            "$run_secs" "$trans" "$tps" "$cpl0_loops" "$exit_cpl0_us" "$work/run.json" ${sched:+$sched})
        printf '%s\n' "$report" | grep -v '_per_transaction: '
        epx=$(printf '%s\n' "$report" | awk -F': ' '$1 == "exits_per_transaction" { print $2 }')
        kepx=$(printf '%s\n' "$report" | awk -F': ' '$1 == "kvm_exits_per_transaction" { print $2 }')
        echo "wbvmm stats of netperf's run (the difference of the two snapshots):"
        for t in "Exits" "Exits by device" "Emulation fallbacks" "Interrupts"; do stats_section "$t" "$work/run.json"; done
    else
        wb_warn "no --stats snapshots around netperf's run: per-transaction figures unavailable"
    fi
    if [ -f "$stats" ]; then
        echo "wbvmm stats of the whole VM (boot included; all of it: wbvmm stats FILE):"
        stats_section "Emulation fallbacks" "$stats"
        python3 - "$stats" <<'EOF'
import json, sys
v = json.load(open(sys.argv[1]))
e = v.get("emulated") or {}
n = sum(x.get("count", 0) for x in e.values())
ns = sum(x.get("total_ns", 0) for x in e.values())
vc = (v.get("kvm") or {}).get("vcpu") or {}
vc = vc if isinstance(vc, list) else [vc]
insns = sum(x.get("insn_emulation", 0) for x in vc)
print(f"  whole VM: {n:,} fallbacks costing {ns / 1e6:.1f} ms; KVM emulated {insns:,} guest instructions")
EOF
    else
        wb_warn "wbvmm wrote no stats file"
    fi
elif [ -f "$stats" ]; then
    "$wbvmm" stats "$stats" | sed 's/^/stats:   /'
    # Exits that reach wbvmm: port and MMIO accesses (kicks and halts left out).
    io=$("$wbvmm" stats --get exits.io_in --get exits.io_out --get exits.mmio_read \
        --get exits.mmio_write "$stats" | awk '{ s += $1 } END { print s }')
    epx=$(awk -v e="$io" -v t="$trans" 'BEGIN { printf "%.3f", e / t }')
    echo "exits_to_wbvmm: $io ($epx per transaction)"
    # KVM's own exit count (every exit, also those KVM handles), where the host offers it.
    if kexits=$("$wbvmm" stats --get kvm.vcpu.exits "$stats" 2>/dev/null); then
        kepx=$(awk -v e="$kexits" -v t="$trans" 'BEGIN { printf "%.3f", e / t }')
    fi
    vtids=$("$wbvmm" stats --get threads.vcpu "$stats")
    [ -n "$vtids" ] && echo "pinning: vCPU thread(s) from --stats: $vtids (their CPUs: the ps/taskset lines above)"
else
    wb_warn "wbvmm wrote no stats file"
fi
if [ "$guest" = testguest ] && [ -n "$exit_us" ] && [ -n "$epx" ]; then
    python3 - "$tps" "$epx" "$exit_us" "${kepx:-}" <<'EOF'
import sys
tps, epx, us = map(float, sys.argv[1:4])
t = 1e6 / tps
print(f"time:    {t:.1f} us per transaction; {epx:.2f} exits to wbvmm x {us:.1f} us (probe's CPL3 exit "
      f"round trip) = {epx * us:.1f} us ({100 * epx * us / t:.0f}%)")
if sys.argv[4]:
    k = float(sys.argv[4])
    print(f"         KVM counted {k:.2f} exits per transaction: {max(k - epx, 0):.2f} more stay inside KVM "
          f"(ioeventfd doorbells, interrupts, ...)")
EOF
fi
[ -n "$kepx" ] && echo "kvm_exits_per_transaction: $kepx"
echo "tcp_rr: $tps trans/s"
echo "exits_per_transaction: ${epx:-unknown}"

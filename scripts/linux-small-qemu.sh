#!/bin/bash
# The small Linux guest under QEMU, for comparison with wbvmm (README, "Nested hosts"): the same
# kernel, initramfs and command line words as scripts/tcp-rr.sh --guest linux gives wbvmm.
#
#   scripts/linux-small-qemu.sh --accel kvm|tcg [--netperf] [--secs N] [--timeout S]
#
#   --accel kvm|tcg   QEMU with KVM (-accel kvm -cpu qemu64,-cx16, as the project's other QEMU
#                     runs) or QEMU's own translator TCG (-accel tcg)
#   --netperf         run netperf TCP_RR (N s) from the guest through QEMU's rtl8139 (8139cp) on
#                     a tap in a private namespace (wbvmm-qemu-PID, 169.254.21.1/24, guest .2)
#                     against a netserver there; without it the guest powers off after /init
#   --secs N          netperf's length (default 10)
#   --timeout S       ends a run that has not finished after S s (default 900; the failure path)
#
# Prints the wall time (since QEMU started) of each stage reached: banner, driver bound,
# `Run /init`, eth0 up, netperf done; netperf's result line; and where the guest stopped if it did not
# finish: the last console lines, and for a KVM internal error QEMU's report with the RIP's
# symbol (System.map) and the instruction there (objdump). Needs qemu-system-x86, python3,
# binutils; root, iproute2 and netperf for --netperf.
set -u
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$here/lib/common.sh"
# shellcheck source-path=SCRIPTDIR source=lib/netns.sh
. "$here/lib/netns.sh"

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }
accel=""
netperf=0
secs=10
timeout=900
while [ $# -gt 0 ]; do
    case $1 in
        --accel) accel=${2:?--accel needs kvm or tcg}; shift 2 ;;
        --netperf) netperf=1; shift ;;
        --secs) secs=${2:?--secs needs a number}; shift 2 ;;
        --timeout) timeout=${2:?--timeout needs a number}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) wb_die "unknown option $1" "see $0 --help" ;;
    esac
done
case $accel in kvm|tcg) ;; *) wb_die "--accel kvm or --accel tcg is required" "see $0 --help" ;; esac
for n in "$secs" "$timeout"; do
    case $n in ''|*[!0-9]*) wb_die "--secs and --timeout want whole numbers of seconds, got '$n'" ;; esac
done
wb_need_cmd qemu-system-x86_64 qemu-system-x86
wb_need_cmd python3 python3
out=$root/guest-images/out/linux-small
for f in vmlinux initramfs.cpio System.map; do
    [ -f "$out/$f" ] || wb_die "no $out/$f" "run scripts/setup.sh (or guest-images/build-linux-small.sh)"
done
words="$(tr '\n' ' ' <"$root/guest-images/linux/cmdline")$(tr '\n' ' ' <"$root/guest-images/linux/cmdline-emulated")"

work=$(mktemp -d /tmp/wbvmm-qemu-small.XXXXXX)
ns=""
peer_pid=""
qemu_pid=""
# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() {
    wb_kill_tree "$qemu_pid"
    wb_kill_tree "$peer_pid"
    wb_netns_del "$ns"
    rm -rf "$work"
}
trap cleanup EXIT
trap 'echo "interrupted; cleaning up" >&2; exit 130' INT TERM

if [ "$accel" = kvm ]; then
    [ -c /dev/kvm ] || wb_die "/dev/kvm missing" "use --accel tcg"
    accel_args=(-accel kvm -cpu "qemu64,-cx16")
else
    accel_args=(-accel tcg)
fi
prefix=()
if [ $netperf = 1 ]; then
    [ "$(id -u)" -eq 0 ] || wb_die "--netperf needs root (network namespace, tap)" "run as root"
    wb_need_cmd ip iproute2
    wb_need_cmd netserver netperf
    ns=wbvmm-qemu-$$
    tap=wbq$$
    wb_netns_tap "$ns" "$tap" 169.254.21.1/24
    ip netns exec "$ns" netserver -D -p 12865 -L 169.254.21.1 </dev/null >"$work/peer.log" 2>&1 &
    peer_pid=$!
    wb_wait_listen "$ns" 12865 50 || wb_die "netserver did not start listening within 5 s"
    net_args=(-netdev "tap,id=n0,ifname=$tap,script=no,downscript=no" -device "rtl8139,netdev=n0")
    run_words="wbvmm.run=netperf:169.254.21.1:TCP_RR wbvmm.ip=169.254.21.2/24 wbvmm.secs=$secs wbvmm.end=reboot"
    prefix=(ip netns exec "$ns")
else
    net_args=(-nic none -device rtl8139)
    run_words="wbvmm.run=poweroff wbvmm.end=reboot"
fi

echo "=== the small Linux guest under QEMU ($accel) ==="
echo "qemu:    $(qemu-system-x86_64 --version | head -1); ${accel_args[*]} -machine pc -m 128M"
echo "cmdline: $words$run_words"
serial=$work/serial.txt
t_start=$EPOCHREALTIME
"${prefix[@]}" qemu-system-x86_64 "${accel_args[@]}" -machine pc -m 128M -display none -no-reboot \
    -serial "file:$serial" -monitor none -kernel "$out/vmlinux" -initrd "$out/initramfs.cpio" \
    -append "$words$run_words" "${net_args[@]}" </dev/null >"$work/qemu.out" 2>"$work/qemu.err" &
qemu_pid=$!

elapsed() { python3 -c "import sys; print('%.1f' % (float(sys.argv[2]) - float(sys.argv[1])))" "$t_start" "$EPOCHREALTIME"; }
names=(banner "driver bound" /init "eth0 up" "netperf done")
res=('Linux version' '(8139cp|8139too) [0-9a-f:.]+ eth0: .*IRQ [0-9]+' 'Run /init' 'wbvmm-linux-guest: eth0 up:' 'wbvmm-linux-guest: step netperf')
at=()
stopped=""
deadline=$((SECONDS + timeout))
while kill -0 "$qemu_pid" 2>/dev/null; do
    for i in "${!names[@]}"; do
        if [ -z "${at[$i]:-}" ] && [ -f "$serial" ] && grep -Eq -- "${res[$i]}" "$serial"; then at[i]=$(elapsed); fi
    done
    # QEMU pauses the VM on a KVM internal error (it does not exit): that is where it stopped.
    if grep -q 'KVM internal error' "$work/qemu.err" 2>/dev/null; then
        sleep 0.5
        stopped="KVM internal error after $(elapsed) s"
        break
    fi
    if [ $SECONDS -ge $deadline ]; then stopped="still running after $timeout s (--timeout)"; break; fi
    sleep 0.2
done
for i in "${!names[@]}"; do
    if [ -z "${at[$i]:-}" ] && [ -f "$serial" ] && grep -Eq -- "${res[$i]}" "$serial"; then at[i]=$(elapsed); fi
done
wb_kill_tree "$qemu_pid"
qemu_pid=""
line="stages:  (wall s since start)"
for i in "${!names[@]}"; do line+=" ${names[$i]} ${at[$i]:--}"; [ "$i" -lt $((${#names[@]} - 1)) ] && line+=","; done
echo "$line; ended $(elapsed)"
tr -d '\r' <"$serial" | grep -E 'Run /init|driver=|eth0 up:|result rc=' | sed 's/^/guest:   /'
if [ $netperf = 1 ]; then
    nl=$(tr -d '\r' <"$serial" | awk 'NF == 6 && $3 == 1 && $4 == 1 && $5 ~ /^[0-9.]+$/ && $6 ~ /^[0-9.]+$/ { l = $0 } END { print l }')
    if [ -n "$nl" ]; then echo "netperf: $nl"; echo "tcp_rr: $(echo "$nl" | awk '{ print $6 }') trans/s"; fi
fi
if [ -n "$stopped" ]; then
    echo "stopped: $stopped; the console's last lines:"
    tr -d '\r' <"$serial" | tail -4 | sed 's/^/  | /'
    if grep -q 'KVM internal error' "$work/qemu.err"; then
        echo "QEMU:"
        grep -E 'KVM internal error|emulation failure|^RIP=|^Code=' "$work/qemu.err" | head -4 | sed 's/^/  | /'
        rip=$(grep -oE '^RIP=[0-9a-f]+' "$work/qemu.err" | head -1 | cut -d= -f2)
        if [ -n "$rip" ]; then
            # The nearest symbol at or below RIP.
            sym=$(python3 - "$out/System.map" "$rip" <<'EOF'
import sys
rip = int(sys.argv[2], 16)
best = None
for line in open(sys.argv[1]):
    p = line.split()
    if len(p) == 3 and p[1] in "tTwW":
        a = int(p[0], 16)
        if a <= rip and (best is None or a > best[0]):
            best = (a, p[2])
print(f"{best[1]}+{rip - best[0]:#x}" if best else "?")
EOF
)
            insn=""
            code=$(grep -oE '^Code=.*' "$work/qemu.err" | head -1 | sed 's/^Code=//')
            # QEMU marks the byte at RIP as <xx>; decode from there.
            if [ -n "$code" ] && command -v objdump >/dev/null; then
                echo "$code" | sed 's/.*<//; s/>//; s/ //g' | xxd -r -p >"$work/insn.bin" 2>/dev/null &&
                    insn=$(objdump -D -b binary -m i386:x86-64 "$work/insn.bin" 2>/dev/null | awk -F'\t' '/^ +0:/ { gsub(/ +$/, "", $2); print $3 " (" $2 ")"; exit }')
            fi
            echo "stopped at: RIP $rip = $sym${insn:+: $insn}"
        fi
    fi
    exit 1
fi
exit 0

#!/usr/bin/env bash
# wbvmm boot demo: probe the host, then boot a guest with its console on this terminal.
#
#   scripts/boot-demo.sh [--linux] [--testguest]
#
# Default: where `wbvmm probe` says guest kernel mode runs natively, the Debian Linux
# guest boots to a shell; otherwise (nested PVM hosts) the project's test guest boots,
# checks its memory, times MMIO exits, and exits.
# --linux: a Linux shell on every host. Where guest kernel mode is emulated that is the
# small guest (guest-images/out/linux-small): about a minute to the prompt, then slow but
# usable. As root, its RTL8139 is on a tap in a private network namespace (wbvmm-demo-PID,
# host side 169.254.30.1/24, eth0 169.254.30.2/24), deleted when the VM ends.
# Leave with Ctrl-A x (Ctrl-A Ctrl-A sends a Ctrl-A), or `reboot -f` in the guest.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WBVMM="$REPO/target/release/wbvmm"
OUT="$REPO/guest-images/out"
[ -x "$WBVMM" ] || { echo "boot-demo: $WBVMM is missing; run scripts/setup.sh first" >&2; exit 1; }

want=""
for a in "$@"; do
    case "$a" in
        --linux) want=linux ;;
        --testguest) want=testguest ;;
        -h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "boot-demo: unknown option $a" >&2; exit 2 ;;
    esac
done

echo "== wbvmm probe =="
probe_json=$("$WBVMM" probe --json)
"$WBVMM" probe | sed 's/^/  /'
native=$(printf '%s' "$probe_json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["kernel_mode_native"])')
if [ -z "$want" ]; then
    if [ "$native" = True ]; then want=linux; else want=testguest; fi
fi

if [ "$want" = testguest ]; then
    echo "== this host cannot run a Linux guest kernel at native speed; booting the wbvmm test guest instead =="
    echo "   (scripts/boot-demo.sh --linux boots the small Linux guest to a shell anyway, slowly)"
    set +e
    "$WBVMM" --kernel "$OUT/testguest.elf" --memory 512M --cpus 2 \
        --cmdline "banner cpus tsc memcheck mmio-loop=0xd0000000,2000"
    rc=$?
    echo "== test guest exited with status $rc =="
    exit $rc
fi

# ---- a Linux shell ----
if [ "$native" = True ]; then
    kernel=$OUT/linux/bzImage
    initrd=$OUT/linux/initramfs.cpio.gz
    memory=512M
    words="$(cat "$REPO/guest-images/linux/cmdline") earlyprintk=serial,ttyS0,115200"
    what="the Debian Linux guest"
else
    # vmlinux through PVH (the bzImage's decompression alone takes ~20 s here), and the words
    # that make an emulated guest kernel faster (guest-images/linux/cmdline-emulated).
    kernel=$OUT/linux-small/vmlinux
    initrd=$OUT/linux-small/initramfs.cpio
    memory=128M
    words="$(cat "$REPO/guest-images/linux/cmdline") $(cat "$REPO/guest-images/linux/cmdline-emulated")"
    what="the small Linux guest"
    echo "!!! guest kernel mode is EMULATED on this host (see 'verdict' above): every guest kernel"
    echo "!!! instruction goes through KVM's instruction emulator. The small guest reaches its shell"
    echo "!!! in about a minute; then each command takes a moment (fork and exec run in the kernel)."
fi
if [ ! -f "$kernel" ] || [ ! -f "$initrd" ]; then
    echo "boot-demo: no $what at $kernel / $initrd; run scripts/setup.sh first" >&2
    exit 1
fi
words=$(echo "$words" | tr '\n' ' ')

ns=""
net_args=()
net_words=""
if [ "$(id -u)" -eq 0 ] && command -v ip >/dev/null 2>&1; then
    # shellcheck source-path=SCRIPTDIR source=lib/common.sh
    . "$REPO/scripts/lib/common.sh"
    # shellcheck source-path=SCRIPTDIR source=lib/netns.sh
    . "$REPO/scripts/lib/netns.sh"
    ns=wbvmm-demo-$$
    tap=wbdemo$$
    trap 'wb_netns_del "$ns"' EXIT
    wb_netns_tap "$ns" "$tap" 169.254.30.1/24
    net_args=(--net "tap=$tap")
    net_words="wbvmm.ip=169.254.30.2/24"
    echo "== network: the guest's RTL8139 (rev 0x20, Linux's 8139cp) is on tap $tap in namespace $ns =="
    echo "   eth0 169.254.30.2/24 in the guest, 169.254.30.1 on the host side; try 'ping -c 3 169.254.30.1',"
    echo "   or from another terminal: ip netns exec $ns ping -c 3 169.254.30.2"
    echo "   (the namespace is deleted when the VM ends)"
else
    echo "== no network: the tap in a private namespace needs root and iproute2 =="
fi
echo "== booting $what to a shell: leave with Ctrl-A x (Ctrl-A Ctrl-A sends Ctrl-A), or 'reboot -f' =="
set +e
if [ -n "$ns" ]; then
    ip netns exec "$ns" "$WBVMM" --kernel "$kernel" --initramfs "$initrd" --memory "$memory" "${net_args[@]}" \
        --cmdline "$words wbvmm.run=shell $net_words"
else
    "$WBVMM" --kernel "$kernel" --initramfs "$initrd" --memory "$memory" --cmdline "$words wbvmm.run=shell"
fi
rc=$?
case $rc in
    0) why="the guest rebooted or powered off" ;;
    130) why="Ctrl-A x" ;;
    *) why="see wbvmm --help, EXIT STATUS" ;;
esac
echo "== wbvmm exited with status $rc ($why) =="
exit $rc

#!/usr/bin/env bash
# wbvmm boot demo: probe the host, then boot a guest with its console on this terminal.
#
#   scripts/boot-demo.sh [--linux] [--testguest]
#
# Default: where `wbvmm probe` says guest kernel mode runs natively, the Debian Linux
# guest boots to a shell (Ctrl-A x quits); otherwise (nested PVM hosts) the project's
# test guest boots, checks its memory, times MMIO exits, and exits.
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
        -h | --help) sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
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

if [ "$want" = linux ]; then
    [ "$native" = True ] || echo "!!! guest kernel mode is emulated on this host: Linux will boot very slowly (hours) !!!"
    echo "== booting the Debian Linux guest (Ctrl-A x quits) =="
    exec "$WBVMM" --kernel "$OUT/linux/bzImage" --initramfs "$OUT/linux/initramfs.cpio.gz" --memory 512M \
        --cmdline "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=1 acpi=off pci=conf1 wbvmm.run=shell"
else
    echo "== this host cannot run a Linux guest kernel at native speed; booting the wbvmm test guest instead =="
    set +e
    "$WBVMM" --kernel "$OUT/testguest.elf" --memory 512M --cpus 2 \
        --cmdline "banner cpus tsc memcheck mmio-loop=0xd0000000,2000"
    rc=$?
    echo "== test guest exited with status $rc =="
    exit $rc
fi

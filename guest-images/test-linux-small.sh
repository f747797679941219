#!/usr/bin/env bash
# Check the small Linux guest (guest-images/build-linux-small.sh's outputs) under QEMU TCG, where
# guest kernel code runs in seconds:
#
#   guest-images/test-linux-small.sh [--keep] [-h|--help]
#
#   1. syscall-fault.patch: guest-images/linux-small/syscall-fault-test.c, built static as /init,
#      makes its system calls the way this host's hypervisor delivers them (RCX, R11 set, then a
#      user-mode jump to entry_SYSCALL_64 that page-faults) and checks results, registers, flags,
#      signals with rt_sigreturn, a restarted read, fork, execve, wait4, and that a kernel address
#      in RCX is refused (SIGSEGV). Needs "syscall-fault-test: PASS" and the kernel's one-time
#      "wbvmm: syscall from user mode arrived at entry_SYSCALL_64" line.
#   2. the initramfs: /init with QEMU's rtl8139 (revision 0x20): "init started", "driver=8139cp",
#      "result rc=0" (wbvmm.run=poweroff; ends with wbvmm.end=reboot through the i8042 reset).
#
# --keep leaves the work directory (logs, test initramfs) and prints its path. Needs
# qemu-system-x86 and gcc (scripts/setup.sh installs both); no root.
set -euo pipefail
trap 'echo "error: test-linux-small.sh failed at line $LINENO (exit $?): $BASH_COMMAND" >&2' ERR

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
# shellcheck source=../scripts/lib/common.sh
. "$REPO/scripts/lib/common.sh"

OUT="$HERE/out/linux-small"
KEEP=0
for arg in "$@"; do
    case "$arg" in
        --keep) KEEP=1 ;;
        -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) wb_die "unknown option '$arg'" "see --help" ;;
    esac
done
wb_need_cmd qemu-system-x86_64 qemu-system-x86
wb_need_cmd gcc build-essential
wb_need_cmd python3 python3
for f in vmlinux initramfs.cpio System.map; do
    [ -s "$OUT/$f" ] || wb_die "$OUT/$f is missing" "build the small guest first: guest-images/build-linux-small.sh"
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/wbvmm-test-small.XXXXXX")"
if [ "$KEEP" -eq 1 ]; then
    trap 'wb_note "work directory kept: $WORK"' EXIT
else
    trap 'rm -rf "$WORK"' EXIT
fi
CMDLINE="console=ttyS0 reboot=k panic=-1 acpi=off pci=conf1 nokaslr"
FAILED=0

# qemu_run NAME INITRD APPEND [QEMU ARGS...]: boot, log to $WORK/NAME.log (60 s at most).
qemu_run() {
    local name=$1 initrd=$2 append=$3
    shift 3
    timeout 60 qemu-system-x86_64 -accel tcg -m 128M -kernel "$OUT/vmlinux" -initrd "$initrd" \
        -append "$append" -nographic -no-reboot "$@" </dev/null >"$WORK/$name.log" 2>&1 || true
}
# expect NAME PATTERN WHAT: PATTERN (grep -E) in NAME's log, or count a failure.
expect() {
    if grep -qE "$2" "$WORK/$1.log"; then
        wb_note "ok: $3"
    else
        wb_warn "$1: missing: $3 (/$2/)"
        FAILED=$((FAILED + 1))
    fi
}

# ---- 1. the system-call workaround ----
wb_log "syscall-fault.patch: syscall-fault-test under QEMU TCG"
gcc -static -nostdlib -fno-pie -no-pie -O2 -ffreestanding -fno-stack-protector -fno-builtin \
    -fcf-protection=none -Wall -o "$WORK/init" "$HERE/linux-small/syscall-fault-test.c" ||
    wb_die "compiling syscall-fault-test.c failed" "see the compiler's message above"
mkdir -p "$WORK/root"
install -m 0755 "$WORK/init" "$WORK/root/init"
python3 "$HERE/linux/mkcpio.py" "$WORK/root" "$WORK/test.cpio" --node dev/console:c:5:1:600 ||
    wb_die "writing the test initramfs failed" "see the Python error above"
ENTRY="$(awk '$3 == "entry_SYSCALL_64" { print "0x" $1; exit }' "$OUT/System.map")"
[ -n "$ENTRY" ] || wb_die "no entry_SYSCALL_64 in $OUT/System.map" "rebuild: guest-images/build-linux-small.sh --force"
qemu_run syscall "$WORK/test.cpio" "$CMDLINE WB_ENTRY=$ENTRY" -nic none
expect syscall 'wbvmm: syscall from user mode arrived at entry_SYSCALL_64' "the kernel took the workaround's path"
expect syscall '^syscall-fault-test: PASS' "syscall-fault-test: PASS"
grep -E '^syscall-fault-test: (ok|FAIL)' "$WORK/syscall.log" | sed 's/^/      /' >&2 || true

# ---- 2. the real initramfs ----
wb_log "initramfs: /init under QEMU TCG with an rtl8139 (revision 0x20)"
qemu_run init "$OUT/initramfs.cpio" "$CMDLINE wbvmm.run=poweroff wbvmm.end=reboot" -nic none -device rtl8139
expect init 'wbvmm-linux-guest: init started' "/init started"
expect init 'wbvmm-linux-guest: pci .* 10ec:8139 rev 0x20 driver=8139cp' "8139cp bound the rev 0x20 function"
expect init 'wbvmm-linux-guest: net eth0 driver=8139cp' "eth0 is 8139cp's"
expect init 'wbvmm-linux-guest: result rc=0' "result rc=0"
expect init 'wbvmm-linux-guest: ending: reboot' "ending: reboot"
if grep -q 'module .* FAILED\|WARNING' "$WORK/init.log"; then
    wb_warn "init: a module FAILED/WARNING line (none expected: the drivers are built in)"
    FAILED=$((FAILED + 1))
fi

if [ "$FAILED" -ne 0 ]; then
    KEEP=1
    trap 'wb_note "work directory kept: $WORK"' EXIT
    wb_die "$FAILED check(s) failed" "read the logs in $WORK (syscall.log, init.log)"
fi
wb_log "small guest: all checks passed"

#!/bin/bash
# Boots the test guest under QEMU (an independent PVH loader) and checks
# each command-line word. Usage: qemu-smoke.sh [microvm|pc ...]
# (default: microvm). Needs qemu-system-x86 and /dev/kvm; builds the guest
# first. Prints one line per check and exits non-zero if any failed.
#
# QEMU's isa-debug-exit turns the guest's exit status N into (N << 1) | 1.
set -u
here=$(cd "$(dirname "$0")" && pwd)
elf=$("$here/../build-testguest.sh" 2>/dev/null | tail -1) || { echo "build failed"; exit 1; }
machines=("$@")
[ ${#machines[@]} -eq 0 ] && machines=(microvm)
fails=0
out=$(mktemp)
trap 'rm -f "$out"' EXIT

# run MACHINE CMDLINE [stdin-text] -> $out (serial output), $rc (QEMU status)
run() {
    local m=$1 cmdline=$2 input=${3-}
    local args=(-enable-kvm -cpu qemu64,-cx16 -machine "$m" -m 256M -smp 2
        -display none -serial stdio -no-reboot -kernel "$elf" -append "$cmdline"
        -device isa-debug-exit,iobase=0xf4,iosize=4)
    if [ -n "$input" ]; then
        (sleep 0.3; printf '%b' "$input") | timeout 120 qemu-system-x86_64 "${args[@]}" 2>/dev/null | tr -d '\r' >"$out"
        rc=${PIPESTATUS[1]}
    else
        timeout 120 qemu-system-x86_64 "${args[@]}" </dev/null 2>/dev/null | tr -d '\r' >"$out"
        rc=${PIPESTATUS[0]}
    fi
}

# check NAME EXPECTED_RC GREP_PATTERN...
check() {
    local name=$1 want=$2; shift 2
    local ok=1 p
    [ "$rc" = "$want" ] || ok=0
    for p in "$@"; do grep -Eq -- "$p" "$out" || ok=0; done
    if [ $ok = 1 ]; then
        echo "ok   $name"
    else
        echo "FAIL $name (status $rc, want $want); output:"
        sed 's/^/     | /' "$out"
        fails=$((fails + 1))
    fi
}

for m in "${machines[@]}"; do
    run "$m" "banner cpus memcheck mmio-loop=0xfec00000,100 tsc bogus exit=7"
    check "$m: banner cpus memcheck mmio-loop tsc exit=7" 15 \
        '^testguest ready: cpl=3 ' '^cpus: ([0-9]+|no MP table)$' \
        '^memcheck: ok [0-9]+ MiB in [0-9]+ ranges' \
        '^mmio-loop: 100 reads of 0xfec00000 in [0-9]+ ns = [0-9.]+ ns/read, last=0x' \
        '^tsc: [0-9]+ kHz from ' '^testguest: unknown word bogus$'
    run "$m" ""
    check "$m: empty command line exits 0" 1
    run "$m" "echo echo" 'hello world\r\nsecond\n'
    check "$m: echo" 1 '^echo: hello world$' '^echo: second$'
    run "$m" "int3 ud2"
    check "$m: int3 returns, ud2 exits 0x7f" 255 \
        '^exception: vector=3 ' '^int3: returned$' '^exception: vector=6 \(#UD\) error=0x0 rip=0x'
    run "$m" "cpuid net=up ip=169.254.10.2/24"
    check "$m: cpuid; net=up without a NIC exits 8" 17 \
        '^cpuid: 1\.ecx=0x[0-9a-f]{8} 1\.edx=0x[0-9a-f]{8} 7\.ebx=0x[0-9a-f]{8} 7\.ecx=0x[0-9a-f]{8} 0xd\.eax=0x[0-9a-f]{8}$' \
        '^net: no RTL8139 \(10ec:8139\) on PCI bus 0$'
    run "$m" "triple-fault"
    check "$m: triple-fault ends the VM" 0 '^triple-fault: now$'
    run "$m" "reset"
    if grep -q 'still running' "$out"; then
        check "$m: reset (no i8042: exit 5)" 11 '^reset: still running$'
    else
        check "$m: reset ends the VM" 0 '^reset: now$'
    fi
    # watch: the host (here gdb through QEMU's gdbstub) changes the word.
    if command -v gdb >/dev/null; then
        port=$((20000 + RANDOM % 20000))
        timeout 120 qemu-system-x86_64 -enable-kvm -cpu qemu64,-cx16 -machine "$m" -m 256M \
            -display none -serial stdio -no-reboot -kernel "$elf" -append "watch=0x300000,3 exit=9" \
            -device isa-debug-exit,iobase=0xf4,iosize=4 -gdb tcp:127.0.0.1:$port </dev/null 2>/dev/null \
            >"$out.raw" &
        qpid=$!
        # The first value must be read before the first write: give firmware
        # (SeaBIOS on pc takes ~2 s here) and the guest time to get there.
        if [ "$m" = pc ]; then sleep 5; else sleep 2; fi
        for v in 0x1111 0xffffffffffffffff; do
            gdb -q -batch -ex 'set architecture i386:x86-64' -ex "target remote 127.0.0.1:$port" \
                -ex "set {unsigned long long}0x300000 = $v" -ex detach >/dev/null 2>&1
            sleep 0.5
        done
        wait $qpid
        rc=$?
        tr -d '\r' <"$out.raw" >"$out"
        rm -f "$out.raw"
        check "$m: watch sees host writes" 19 '^watch: 0x300000 = 0x0$' \
            '^watch: 0x300000 = 0x1111$' '^watch: 0x300000 = 0xffffffffffffffff$'
    fi
done
exit $((fails > 0))

#!/usr/bin/env bash
# wbvmm: run every test — unit, property and integration (guests booted under /dev/kvm).
#
#   scripts/test.sh [extra cargo test args...]
#
# Calls scripts/setup.sh first (apt packages, release build, guest images; fast when
# done already). Integration tests boot the project's test guest and the Debian
# kernel; they need /dev/kvm. Without it they are SKIPPED with a loud line each, and
# this script says so at the end: a skipped test proves nothing.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

"$REPO/scripts/setup.sh"

KVM_OK=1
if ! [ -r /dev/kvm ] || ! [ -w /dev/kvm ]; then
    KVM_OK=0
    export WBVMM_ALLOW_NO_KVM=1
    echo "!!! /dev/kvm is missing or not accessible: every test that boots a guest will be SKIPPED !!!" >&2
fi

echo "== wbvmm probe =="
if [ "$KVM_OK" = 1 ]; then ./target/release/wbvmm probe || true; fi

echo "== cargo test (release profile, whole workspace) =="
# Release: the binary the user runs, and no second (debug) build of every dependency.
cargo test --release --workspace --no-fail-fast "$@"

echo "== oracle: the test guest's RTL8139 driver against QEMU's own rtl8139 =="
if [ "$KVM_OK" = 1 ]; then
    "$REPO/scripts/oracle-qemu.sh" --secs 2
else
    echo "!!! SKIPPED the QEMU oracle: it needs /dev/kvm !!!" >&2
fi

echo "== soak: 3 minutes of mixed load, memory/descriptors/threads flat (scripts/soak.sh) =="
if [ "$KVM_OK" = 1 ]; then
    bash "$REPO/scripts/soak.sh" --secs 180
else
    echo "!!! SKIPPED the soak: it needs /dev/kvm !!!" >&2
fi

echo "== the small Linux guest's system-call workaround and /init under QEMU TCG (no KVM needed) =="
bash "$REPO/guest-images/test-linux-small.sh"

if [ "$KVM_OK" = 0 ]; then
    echo "!!! REMINDER: /dev/kvm was unavailable; the guest-booting integration tests were SKIPPED, not passed !!!" >&2
fi

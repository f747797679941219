#!/usr/bin/env bash
# Show that the tests do not depend on how fast this machine is.
#
#   scripts/test-robustness.sh [--hold-ms LIST] [--no-hog] [--hog-secs N]
#
#   --hold-ms LIST  busy phases to try: the host side of the network tests waits this many
#                   extra milliseconds, once the guest holds, before it starts its traffic
#                   (WBVMM_TEST_HOLD_EXTRA_MS); default "0,20000" (as short as the conditions
#                   allow, and 20 s longer)
#   --no-hog        skip the run of the whole suite under CPU load
#   --hog-secs N    bound of the CPU hog (default 3600; it is also stopped when the suite ends)
#
# Steps: the network and pinning tests once per busy phase; then scripts/test.sh while one
# busy loop per host CPU (an unrelated, bounded hog, same priority) competes with every
# guest, every wbvmm thread and every peer. Prints "N passed, M failed" over the steps.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/common.sh
. "$REPO/scripts/lib/common.sh"
cd "$REPO"

hold_list="0,20000"
hog=1
hog_secs=3600
while [ $# -gt 0 ]; do
    case $1 in
        --hold-ms) hold_list=${2:?--hold-ms needs a list}; shift 2 ;;
        --no-hog) hog=0; shift ;;
        --hog-secs) hog_secs=${2:?--hog-secs needs a number}; shift 2 ;;
        -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) wb_die "unknown option '$1'" "see $0 --help" ;;
    esac
done
case $hog_secs in '' | *[!0-9]*) wb_die "--hog-secs wants whole seconds, got '$hog_secs'" ;; esac

pass=0
fail=0
step() {
    local name=$1
    shift
    wb_log "$name"
    local t0=$SECONDS
    if "$@"; then
        echo "ok   $name ($((SECONDS - t0)) s)"
        pass=$((pass + 1))
    else
        echo "FAIL $name ($((SECONDS - t0)) s)"
        fail=$((fail + 1))
    fi
}

"$REPO/scripts/setup.sh" --no-linux >/dev/null || wb_die "scripts/setup.sh failed" "run it alone to see why"
[ -x ./target/release/wbvmm ] && ./target/release/wbvmm probe

IFS=, read -ra holds <<<"$hold_list"
for ms in "${holds[@]}"; do
    case $ms in '' | *[!0-9]*) wb_die "--hold-ms wants whole milliseconds, got '$ms'" ;; esac
    step "network and pinning tests, busy phase +$ms ms" \
        env WBVMM_TEST_HOLD_EXTRA_MS="$ms" cargo test --release --test net --test affinity
done

if [ "$hog" = 1 ]; then
    hog_pids=()
    stop_hogs() {
        local p
        for p in "${hog_pids[@]}"; do kill "$p" 2>/dev/null; done
        for p in "${hog_pids[@]}"; do wait "$p" 2>/dev/null; done
        hog_pids=()
    }
    trap stop_hogs EXIT
    for _ in $(seq "$(nproc)"); do
        timeout "$hog_secs" sh -c 'while :; do :; done' &
        hog_pids+=($!)
    done
    wb_note "CPU hog: ${#hog_pids[@]} busy loops (PIDs ${hog_pids[*]}), at most $hog_secs s"
    step "scripts/test.sh with every CPU busy" "$REPO/scripts/test.sh"
    stop_hogs
fi

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]

#!/usr/bin/env bash
# wbvmm: set up a fresh Debian 12 (bookworm) machine for building and testing.
#
#   scripts/setup.sh [--no-apt] [--no-linux] [--no-linux-small] [-h|--help]
#
# Steps (each idempotent; a second run is fast and works offline):
#   1. apt: enable Debian's non-free component (for netperf), apt-get update, install the packages
#      the project needs. Skipped at once when they are all installed already.  (--no-apt skips it)
#   2. Rust: check that cargo exists (never downloads a toolchain).
#   3. cargo build --release of the workspace.
#   4. guest-images/build-testguest.sh (the no_std test guest), when that script exists.
#   5. guest-images/build-linux-guest.sh (Debian kernel + busybox/netperf initramfs).  (--no-linux)
#   6. guest-images/build-linux-small.sh (a small kernel built from Debian's linux-source-6.1, for
#      hosts where guest kernel mode is slow, with step 5's initramfs uncompressed and without
#      modules). The kernel is cached in ${WBVMM_CACHE:-/var/cache/wbvmm}, outside the clone: about
#      5 minutes on 2 cores the first time on a machine, seconds after.  (--no-linux-small;
#      --no-linux skips it too)
#
# Run as root, or as a user who may use sudo (only the apt step needs root).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/common.sh
. "$REPO/scripts/lib/common.sh"

DO_APT=1
DO_LINUX=1
DO_LINUX_SMALL=1
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
for arg in "$@"; do
    case "$arg" in
        --no-apt) DO_APT=0 ;;
        --no-linux) DO_LINUX=0 ;;
        --no-linux-small) DO_LINUX_SMALL=0 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; wb_die "unknown option '$arg'" "see the usage above" ;;
    esac
done

# Debian packages the project needs (build, the QEMU peer/oracle, networking tools, guest images).
APT_PACKAGES=(
    build-essential pkg-config
    qemu-system-x86
    iproute2 iputils-ping socat netperf
    busybox-static cpio xz-utils zstd file python3 kmod
    linux-source-6.1 bc bison flex libelf-dev lz4
    procps util-linux python3-matplotlib
    gdb
)

START=$(date +%s)
declare -a SUMMARY=()
step_time() { echo "$(( $(date +%s) - $1 ))s"; }

# ---------------------------------------------------------------------------------------------
# 1. apt
# ---------------------------------------------------------------------------------------------
step_apt() {
    local t0 missing=() p changed=0
    t0=$(date +%s)
    command -v dpkg-query >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 ||
        wb_die "apt/dpkg not found: this script supports Debian 12 (bookworm)" \
            "install the packages by hand: ${APT_PACKAGES[*]}; then rerun with --no-apt"
    if [ -r /etc/os-release ] && ! grep -qE '^VERSION_CODENAME=bookworm$' /etc/os-release; then
        wb_warn "this is not Debian 12 (bookworm); continuing, but package names may differ"
    fi
    for p in "${APT_PACKAGES[@]}"; do
        wb_pkg_installed "$p" || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        wb_log "apt: all ${#APT_PACKAGES[@]} packages already installed (skipping apt-get)"
        SUMMARY+=("apt: nothing to do")
        return
    fi
    wb_log "apt: installing ${missing[*]}"
    if wb_enable_nonfree; then changed=1; fi
    wb_as_root apt-get update ||
        wb_die "apt-get update failed" "check the network and /etc/apt/sources.list.d/, then rerun"
    if [[ " ${missing[*]} " == *" netperf "* ]] && ! wb_apt_has_candidate netperf; then
        wb_die "apt knows no 'netperf' package even with non-free enabled ($WB_NONFREE_SOURCES)" \
            "check that Debian's non-free component is reachable (apt-cache policy netperf)"
    fi
    DEBIAN_FRONTEND=noninteractive wb_as_root apt-get install -y --no-install-recommends "${missing[@]}" ||
        wb_die "apt-get install failed for: ${missing[*]}" \
            "read apt's message above; fix it (e.g. 'dpkg --configure -a'), then rerun scripts/setup.sh"
    SUMMARY+=("apt: installed ${missing[*]} ($(step_time "$t0"))")
    [ "$changed" -eq 1 ] && SUMMARY+=("apt: non-free component enabled in $WB_NONFREE_SOURCES")
    return 0
}

# ---------------------------------------------------------------------------------------------
# 2. Rust
# ---------------------------------------------------------------------------------------------
CARGO=""
step_rust() {
    if command -v cargo >/dev/null 2>&1; then
        CARGO="$(command -v cargo)"
    elif [ -x "$HOME/.cargo/bin/cargo" ]; then
        CARGO="$HOME/.cargo/bin/cargo"
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        cat >&2 <<'EOF'
error: cargo (the Rust toolchain) was not found.
  what to do: install Rust with rustup (https://rustup.rs), e.g.
      curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh
  or Debian's packages (apt-get install cargo rustc; may be too old for this workspace),
  then open a new shell (so that ~/.cargo/bin is on PATH) and rerun scripts/setup.sh.
EOF
        exit 1
    fi
    wb_log "rust: $("$CARGO" --version)"
}

# ---------------------------------------------------------------------------------------------
# 3. cargo build --release
# ---------------------------------------------------------------------------------------------
WBVMM_BIN=""
step_build() {
    local t0
    t0=$(date +%s)
    if [ ! -f "$REPO/Cargo.toml" ]; then
        wb_warn "no Cargo.toml in $REPO: nothing to build (is this a partial checkout?)"
        SUMMARY+=("wbvmm: not built (no Cargo.toml)")
        return
    fi
    wb_log "cargo build --release (in $REPO)"
    (cd "$REPO" && "$CARGO" build --release) ||
        wb_die "cargo build --release failed" \
            "read the compiler errors above; fix them (or update your checkout), then rerun scripts/setup.sh"
    local tdir="${CARGO_TARGET_DIR:-$REPO/target}"
    case "$tdir" in /*) ;; *) tdir="$REPO/$tdir" ;; esac
    if [ -x "$tdir/release/wbvmm" ]; then
        WBVMM_BIN="$tdir/release/wbvmm"
        SUMMARY+=("wbvmm: $WBVMM_BIN ($(step_time "$t0"))")
    else
        SUMMARY+=("wbvmm: workspace built, but no target/release/wbvmm binary ($(step_time "$t0"))")
    fi
}

# ---------------------------------------------------------------------------------------------
# 4. test guest
# ---------------------------------------------------------------------------------------------
step_testguest() {
    local t0 s="$REPO/guest-images/build-testguest.sh"
    t0=$(date +%s)
    if [ ! -f "$s" ]; then
        wb_warn "guest-images/build-testguest.sh does not exist yet: test guest not built"
        SUMMARY+=("test guest: not built (no build-testguest.sh)")
        return
    fi
    wb_log "building the test guest (guest-images/build-testguest.sh)"
    (cd "$REPO" && bash "$s") ||
        wb_die "guest-images/build-testguest.sh failed" \
            "read its output above; rerun it alone (bash guest-images/build-testguest.sh) to debug"
    local outs
    outs="$(find "$REPO/guest-images/out" -maxdepth 2 -path '*/linux' -prune -o -type f \
        \( -name '*.elf' -o -name 'testguest*' \) -print 2>/dev/null | sort | head -5 | tr '\n' ' ')"
    SUMMARY+=("test guest: ${outs:-built (see guest-images/out/)} ($(step_time "$t0"))")
}

# ---------------------------------------------------------------------------------------------
# 5. Linux guest
# ---------------------------------------------------------------------------------------------
step_linux() {
    local t0 s="$REPO/guest-images/build-linux-guest.sh" o="$REPO/guest-images/out/linux"
    t0=$(date +%s)
    wb_log "building the Linux guest (guest-images/build-linux-guest.sh)"
    [ -f "$s" ] || wb_die "guest-images/build-linux-guest.sh is missing" "update your checkout"
    bash "$s" ||
        wb_die "guest-images/build-linux-guest.sh failed" \
            "read its output above; rerun it alone to debug (it keeps downloaded .debs in guest-images/out/debs)"
    SUMMARY+=("linux guest: $o/{bzImage,vmlinux,initramfs.cpio.gz,VERSIONS} ($(step_time "$t0"))")
}

# ---------------------------------------------------------------------------------------------
# 6. small Linux guest
# ---------------------------------------------------------------------------------------------
step_linux_small() {
    local t0 s="$REPO/guest-images/build-linux-small.sh" o="$REPO/guest-images/out/linux-small"
    t0=$(date +%s)
    wb_log "building the small Linux guest (guest-images/build-linux-small.sh)"
    [ -f "$s" ] || wb_die "guest-images/build-linux-small.sh is missing" "update your checkout"
    bash "$s" ||
        wb_die "guest-images/build-linux-small.sh failed" \
            "read its output above; rerun it alone to debug (the kernel build log is printed on failure)"
    SUMMARY+=("small linux guest: $o/{vmlinux,bzImage,initramfs.cpio,VERSIONS} ($(step_time "$t0"))")
}

if [ "$DO_APT" -eq 1 ]; then step_apt; else wb_log "apt: skipped (--no-apt)"; fi
step_rust
step_build
step_testguest
if [ "$DO_LINUX" -eq 1 ]; then step_linux; else wb_log "linux guest: skipped (--no-linux)"; SUMMARY+=("linux guest: skipped (--no-linux)"); fi
if [ "$DO_LINUX" -eq 1 ] && [ "$DO_LINUX_SMALL" -eq 1 ]; then
    step_linux_small
else
    wb_log "small linux guest: skipped (--no-linux or --no-linux-small)"
    SUMMARY+=("small linux guest: skipped")
fi

echo
echo "wbvmm setup done in $(step_time "$START"):"
for line in "${SUMMARY[@]}"; do echo "  - $line"; done

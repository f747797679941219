#!/usr/bin/env bash
# Build wbvmm's small Linux guest: a minimal kernel from Debian's own kernel source package, for
# hosts where guest kernel mode is slow (see guest-images/linux-small/README.md).
#
#   guest-images/build-linux-small.sh [--force] [-h|--help]
#
# Outputs, in guest-images/out/linux-small/:
#   vmlinux          the kernel (ELF with the PVH note: what wbvmm boots)
#   bzImage          the same kernel for bzImage loaders (LZ4-compressed)
#   initramfs.cpio   uncompressed: the Debian guest's initramfs (busybox-static, netperf, netserver,
#                    their libraries, guest-images/linux/init) without its kernel modules (the small
#                    kernel has its drivers built in)
#   System.map       symbols (entry_SYSCALL_64's address, RIPs in oopses)
#   config           the kernel's full .config
#   VERSIONS         the source package, patch, fragment and initramfs it was made from
#
# Kernel: linux-source-6.1 (/usr/src/linux-source-6.1.tar.xz), `make tinyconfig` options plus
# guest-images/linux-small/config-fragment (everything else off), guest-images/linux-small/
# syscall-fault.patch applied. Built once per machine: the results are cached in
# ${WBVMM_CACHE:-/var/cache/wbvmm}/linux-small/KEY/ (when that is not writable and WBVMM_CACHE is
# unset: ${XDG_CACHE_HOME:-~/.cache}/wbvmm), KEY a hash of the source package's version, the
# fragment, the patch, this script and the compiler's version; other clones reuse them. The build
# tree is made in the cache directory and deleted afterwards. One build at a time (flock).
# The initramfs needs guest-images/out/linux/ (this script runs build-linux-guest.sh, which is
# quick when that is up to date). --force rebuilds the kernel even when it is cached.
#
# Needs the Debian packages linux-source-6.1 build-essential bc bison flex libelf-dev lz4 python3
# (scripts/setup.sh installs them); no root, except to create /var/cache/wbvmm.
set -euo pipefail
trap 'echo "error: build-linux-small.sh failed at line $LINENO (exit $?): $BASH_COMMAND" >&2' ERR
# On Ctrl-C or kill, exit through the EXIT trap (which deletes the work directories).
trap 'exit 130' INT TERM

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
# shellcheck source=../scripts/lib/common.sh
. "$REPO/scripts/lib/common.sh"

SRC="$HERE/linux-small"
OUT="$HERE/out/linux-small"
DEBIAN_OUT="$HERE/out/linux"
SRCPKG=linux-source-6.1
TARBALL=/usr/src/linux-source-6.1.tar.xz
FORCE=0
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) wb_die "unknown option '$arg'" "see --help" ;;
    esac
done

# ---------------------------------------------------------------------------------------------
# tools and sources
# ---------------------------------------------------------------------------------------------
for c in make gcc ld bc bison flex lz4 python3 patch tar xz sha256sum perl; do
    case "$c" in
        make | gcc) wb_need_cmd "$c" build-essential ;;
        ld) wb_need_cmd "$c" binutils ;;
        xz) wb_need_cmd "$c" xz-utils ;;
        sha256sum) wb_need_cmd "$c" coreutils ;;
        *) wb_need_cmd "$c" "$c" ;;
    esac
done
# objtool (built for every x86-64 kernel) needs libelf's headers.
[ -f /usr/include/gelf.h ] || wb_die "libelf's headers (/usr/include/gelf.h) are missing" \
    "install the Debian package 'libelf-dev' (scripts/setup.sh does it: apt-get install libelf-dev)"
SRCVER="$(dpkg-query -W -f='${Version}' "$SRCPKG" 2>/dev/null || true)"
[ -n "$SRCVER" ] && [ -f "$TARBALL" ] ||
    wb_die "Debian's kernel source package $SRCPKG is not installed (no $TARBALL)" \
        "install it: apt-get install $SRCPKG (scripts/setup.sh does it)"
for f in config-fragment syscall-fault.patch cpio-filter.py; do
    [ -f "$SRC/$f" ] || wb_die "$SRC/$f is missing" "update your checkout"
done

# ---------------------------------------------------------------------------------------------
# cache directory and key
# ---------------------------------------------------------------------------------------------
if [ -n "${WBVMM_CACHE:-}" ]; then
    CACHE="$WBVMM_CACHE"
    mkdir -p "$CACHE/linux-small" 2>/dev/null && [ -w "$CACHE/linux-small" ] ||
        wb_die "cannot write the cache directory $CACHE/linux-small (WBVMM_CACHE)" \
            "set WBVMM_CACHE to a writable directory outside the clone"
else
    CACHE=/var/cache/wbvmm
    if ! { mkdir -p "$CACHE/linux-small" 2>/dev/null && [ -w "$CACHE/linux-small" ]; }; then
        CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/wbvmm"
        wb_note "/var/cache/wbvmm is not writable: caching in $CACHE (set WBVMM_CACHE to choose)"
        mkdir -p "$CACHE/linux-small" || wb_die "cannot create $CACHE/linux-small" "set WBVMM_CACHE to a writable directory"
    fi
fi
CC_VERSION="$(gcc --version | head -1)"
KEY="$( { echo "$SRCPKG $SRCVER"; echo "$CC_VERSION"; cat "$SRC/config-fragment" "$SRC/syscall-fault.patch" "${BASH_SOURCE[0]}"; } |
    sha256sum | cut -c1-16)"
KDIR="$CACHE/linux-small/$KEY"
KFILES=(vmlinux bzImage System.map config release)

kernel_cached() {
    local f
    for f in "${KFILES[@]}"; do [ -s "$KDIR/$f" ] || return 1; done
}

# ---------------------------------------------------------------------------------------------
# the kernel (cached)
# ---------------------------------------------------------------------------------------------
# check_config FRAGMENT CONFIG: every value the fragment asks for is in the final .config ("is not
# set" also holds when the option does not exist for this architecture/configuration).
check_config() {
    awk '
        NR == FNR {
            if (match($0, /^CONFIG_[A-Za-z0-9_]+=/)) { want[substr($0, 1, RLENGTH - 1)] = $0; order[++n] = substr($0, 1, RLENGTH - 1) }
            else if (match($0, /^# CONFIG_[A-Za-z0-9_]+ is not set/)) { s = $2; want[s] = "off"; order[++n] = s }
            next
        }
        match($0, /^CONFIG_[A-Za-z0-9_]+=/) { have[substr($0, 1, RLENGTH - 1)] = $0 }
        END {
            bad = 0
            for (i = 1; i <= n; i++) {
                s = order[i]
                if (want[s] == "off") { if ((s in have) && have[s] !~ /=n$/) { print "    " s ": wanted off, got " have[s]; bad = 1 } }
                else { got = (s in have) ? have[s] : "off"; if (got != want[s]) { print "    " s ": wanted " want[s] ", got " got; bad = 1 } }
            }
            exit bad
        }' "$1" "$2"
}

build_kernel() {
    local build t0 tree jobs krel
    t0=$(date +%s)
    build="$(mktemp -d "$CACHE/linux-small/build.XXXXXX")"
    # shellcheck disable=SC2064 # expand now: the directory to delete
    trap "rm -rf '$build'" EXIT
    wb_log "small guest kernel: unpacking $TARBALL ($SRCPKG $SRCVER) in $build"
    tar -xf "$TARBALL" -C "$build" || wb_die "unpacking $TARBALL failed" "reinstall $SRCPKG (apt-get install --reinstall $SRCPKG); check free space in $CACHE"
    tree="$(find "$build" -mindepth 1 -maxdepth 1 -type d | head -1)"
    [ -f "$tree/Makefile" ] || wb_die "$TARBALL holds no kernel tree" "reinstall $SRCPKG"

    wb_log "small guest kernel: applying syscall-fault.patch"
    (cd "$tree" && patch -p1 --forward --batch --quiet < "$SRC/syscall-fault.patch") ||
        wb_die "guest-images/linux-small/syscall-fault.patch does not apply to $SRCPKG $SRCVER" \
            "refresh the patch against this source version (see guest-images/linux-small/README.md)"

    wb_log "small guest kernel: configuring (tinyconfig + config-fragment)"
    # merge_config.sh -n: allnoconfig with the tinyconfig fragments and ours as its base.
    (cd "$tree" && scripts/kconfig/merge_config.sh -n kernel/configs/tiny-base.config kernel/configs/tiny.config \
        arch/x86/configs/tiny.config "$SRC/config-fragment" > "$build/config.log" 2>&1) || {
        tail -20 "$build/config.log" >&2
        wb_die "configuring the kernel failed" "see the output above"
    }
    local bad
    if ! bad="$(check_config "$SRC/config-fragment" "$tree/.config")"; then
        printf '%s\n' "$bad" >&2
        wb_die "the final .config differs from guest-images/linux-small/config-fragment (above)" \
            "an option depends on one that is off: add the dependency to the fragment, or drop the option"
    fi

    jobs="$(nproc 2>/dev/null || echo 2)"
    wb_log "small guest kernel: make -j$jobs vmlinux bzImage (about 5 minutes on 2 cores)"
    (cd "$tree" && make -j"$jobs" vmlinux bzImage > "$build/make.log" 2>&1) || {
        tail -30 "$build/make.log" >&2
        wb_die "the kernel build failed (log: the lines above)" \
            "check the build packages (build-essential bc bison flex libelf-dev lz4) and free space in $CACHE"
    }
    krel="$(cd "$tree" && make -s kernelrelease)"
    grep -q ' wbvmm_syscall_fault$' "$tree/System.map" ||
        wb_die "the built kernel has no wbvmm_syscall_fault: the patch did not take effect" "report it"
    grep -aq "Linux version $krel " "$tree/vmlinux" || wb_die "vmlinux has no 'Linux version $krel' banner" "report it"
    # PVH entry: Xen ELF note 18 (XEN_ELFNOTE_PHYS32_ENTRY).
    readelf -n "$tree/vmlinux" 2>/dev/null | grep -q 'Xen.*0x00000012\|Xen.*Unknown note type: (0x00000012)' ||
        wb_warn "no PVH note (Xen ELF note 18) found in vmlinux by readelf: check CONFIG_PVH"

    rm -rf "$KDIR.tmp"
    mkdir -p "$KDIR.tmp"
    cp "$tree/vmlinux" "$tree/arch/x86/boot/bzImage" "$tree/System.map" "$KDIR.tmp/"
    cp "$tree/.config" "$KDIR.tmp/config"
    echo "$krel" > "$KDIR.tmp/release"
    echo "$(( $(date +%s) - t0 ))" > "$KDIR.tmp/build-seconds"
    rm -rf "$KDIR"
    mv "$KDIR.tmp" "$KDIR"
    rm -rf "$build"
    trap - EXIT
    wb_log "small guest kernel $krel built in $(( $(date +%s) - t0 )) s, cached in $KDIR"
}

exec 8>"$CACHE/linux-small/.lock"
if command -v flock >/dev/null 2>&1; then flock 8; fi
# Build trees left by an interrupted run (we hold the lock: no build is running).
rm -rf "$CACHE/linux-small"/build.* "$CACHE/linux-small"/*.tmp
if [ "$FORCE" -eq 1 ] || ! kernel_cached; then
    build_kernel
else
    wb_log "small guest kernel: cached in $KDIR ($(cat "$KDIR/release"))"
fi
KREL="$(cat "$KDIR/release")"

# ---------------------------------------------------------------------------------------------
# the initramfs: the Debian guest's, without its modules (built in here), uncompressed
# ---------------------------------------------------------------------------------------------
bash "$HERE/build-linux-guest.sh" ||
    wb_die "guest-images/build-linux-guest.sh failed (the small guest's initramfs is made from its output)" \
        "read its output above; rerun it alone to debug"
[ -s "$DEBIAN_OUT/initramfs.cpio.gz" ] || wb_die "$DEBIAN_OUT/initramfs.cpio.gz is missing" "run guest-images/build-linux-guest.sh"
INITRD_SRC_SUM="$(sha256sum "$DEBIAN_OUT/initramfs.cpio.gz" | cut -d' ' -f1)"
STAMP="$KEY $INITRD_SRC_SUM $(sha256sum < "$SRC/cpio-filter.py" | cut -c1-16)"

mkdir -p "$OUT"
exec 9>"$HERE/out/.linux-small.lock"
if command -v flock >/dev/null 2>&1; then flock 9; fi
if [ "$(cat "$OUT/.stamp" 2>/dev/null)" = "$STAMP" ] && [ -s "$OUT/initramfs.cpio" ] && [ -s "$OUT/vmlinux" ]; then
    wb_log "small guest: up to date in $OUT ($KREL)"
    exit 0
fi

WORK="$(mktemp -d "$HERE/out/.linux-small-work.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
gzip -dc "$DEBIAN_OUT/initramfs.cpio.gz" > "$WORK/debian.cpio" ||
    wb_die "cannot decompress $DEBIAN_OUT/initramfs.cpio.gz" "rebuild it: guest-images/build-linux-guest.sh --force"
# An empty /lib/modules/KREL: /init then finds no module list to load and warns about nothing.
python3 "$SRC/cpio-filter.py" "$WORK/debian.cpio" "$WORK/initramfs.cpio" --drop lib/modules \
    --add-dir "lib/modules/$KREL" || wb_die "filtering the initramfs failed" "see the Python error above"

for f in vmlinux bzImage System.map config; do cp "$KDIR/$f" "$WORK/$f"; done
{
    echo "# wbvmm small Linux guest: ROLE PACKAGE VERSION [DETAILS]; written by guest-images/build-linux-small.sh"
    echo "kernel $SRCPKG $SRCVER release=$KREL cache=$KDIR"
    echo "patch - - syscall-fault.patch sha256=$(sha256sum "$SRC/syscall-fault.patch" | cut -d' ' -f1)"
    echo "config - - config-fragment sha256=$(sha256sum "$SRC/config-fragment" | cut -d' ' -f1)"
    echo "compiler - - $CC_VERSION"
    echo "initramfs - - from guest-images/out/linux/initramfs.cpio.gz sha256=$INITRD_SRC_SUM without lib/modules, uncompressed"
    grep -E '^(busybox|netperf|lib) ' "$DEBIAN_OUT/VERSIONS" || true
} > "$WORK/VERSIONS"

rm -f "$OUT/.stamp"
for f in vmlinux bzImage initramfs.cpio System.map config VERSIONS; do mv -f "$WORK/$f" "$OUT/$f"; done
echo "$STAMP" > "$OUT/.stamp"

wb_log "small guest built in $OUT:"
(cd "$OUT" && ls -l vmlinux bzImage initramfs.cpio System.map config VERSIONS | awk '{ printf "    %-16s %10d bytes\n", $NF, $5 }') >&2

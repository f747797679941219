#!/usr/bin/env bash
# Build wbvmm's Debian Linux guest from Debian 12 packages.
#
#   guest-images/build-linux-guest.sh [--force] [-h|--help]
#
# Outputs, in guest-images/out/linux/:
#   bzImage            Debian's kernel (the linux-image-6.1.0-*-amd64 that linux-image-amd64 depends on)
#   vmlinux            the uncompressed ELF kernel, extracted from bzImage (for PVH/ELF loaders)
#   initramfs.cpio.gz  busybox-static, the mii/8139too/8139cp modules of that exact kernel, netperf and
#                      netserver with the shared libraries they need, and /init (guest-images/linux/init)
#   VERSIONS           the exact Debian packages and versions used
#   config-KVER        the kernel's build configuration (for reference)
# .debs are cached in guest-images/out/debs/.
#
# Cached: when the outputs exist, were made by this version of the build files, and VERSIONS matches
# the versions apt resolves now (or apt cannot resolve them, e.g. offline without lists), nothing is
# done. When newer packages are known but cannot be downloaded, the old outputs are kept.
# --force rebuilds regardless. Needs no root, except to enable Debian's non-free component and run
# apt-get update when apt does not know netperf yet (then it uses sudo when not root).
set -euo pipefail
trap 'echo "error: build-linux-guest.sh failed at line $LINENO (exit $?): $BASH_COMMAND" >&2' ERR

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
# shellcheck source=../scripts/lib/common.sh
. "$REPO/scripts/lib/common.sh"

SRC="$HERE/linux"
OUT="$HERE/out/linux"
DEBS="$HERE/out/debs"
FORCE=0
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) wb_die "unknown option '$arg'" "see --help" ;;
    esac
done

# The modules to put in the initramfs (their dependencies are added, and ordered first).
MODULES=(mii 8139too 8139cp)
# The non-library packages; the libraries' packages are found with ldd.
ARCH=amd64

for c in apt-get apt-cache dpkg-deb dpkg-query python3 gzip ldd; do
    case "$c" in
        python3) wb_need_cmd "$c" python3 ;;
        gzip) wb_need_cmd "$c" gzip ;;
        ldd) wb_need_cmd "$c" libc-bin ;;
        *) wb_need_cmd "$c" apt ;;
    esac
done

mkdir -p "$OUT" "$DEBS"
# One build at a time (a developer and a test run may start it together).
exec 9>"$HERE/out/.linux-guest.lock"
if command -v flock >/dev/null 2>&1; then flock 9; fi

# A stamp of the build's own files: a change to them means rebuild.
stamp_now() {
    cat "${BASH_SOURCE[0]}" "$SRC/init" "$SRC/extract-vmlinux.py" "$SRC/mkcpio.py" "$REPO/scripts/lib/common.sh" |
        sha256sum | cut -d' ' -f1
}

# ---------------------------------------------------------------------------------------------
# apt resolution
# ---------------------------------------------------------------------------------------------
# Candidate version of a package, empty when apt does not know it.
candidate() {
    apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { if ($2 != "(none)") print $2; exit }'
}
# "NAME VERSION" of the kernel image package linux-image-amd64 depends on.
resolve_kernel() {
    local meta dep
    meta="$(candidate linux-image-amd64)"
    [ -n "$meta" ] || return 1
    dep="$(apt-cache show "linux-image-amd64=$meta" 2>/dev/null | awk -F': ' '/^Depends:/ { print $2; exit }' |
        tr ',' '\n' | sed -n 's/^ *\(linux-image-[0-9][^ ]*-amd64\) *(= *\([^)]*\)).*/\1 \2/p' | head -1)"
    [ -n "$dep" ] || return 1
    echo "$dep"
}

# Fill KPKG KVERS BBVERS NPVERS from apt; return 1 when apt cannot resolve them.
resolve_all() {
    local k
    k="$(resolve_kernel)" || return 1
    KPKG="${k% *}"
    KVERS="${k#* }"
    BBVERS="$(candidate busybox-static)"
    NPVERS="$(candidate netperf)"
    [ -n "$BBVERS" ] && [ -n "$NPVERS" ]
}

# ---------------------------------------------------------------------------------------------
# cache check
# ---------------------------------------------------------------------------------------------
outputs_exist() {
    [ -s "$OUT/bzImage" ] && [ -s "$OUT/vmlinux" ] && [ -s "$OUT/initramfs.cpio.gz" ] && [ -s "$OUT/VERSIONS" ]
}
# candidates PKG...: print "PKG CANDIDATE" for each package apt knows (one apt-cache call).
candidates() {
    apt-cache policy "$@" 2>/dev/null |
        awk '/^[^ ].*:$/ { p = $1; sub(/:$/, "", p) } /^  Candidate:/ { if ($2 != "(none)") print p, $2 }'
}
# Are the packages recorded in VERSIONS still apt's candidates? (true when apt can't tell)
versions_current() {
    local role pkg ver cur k
    if ! k="$(resolve_kernel 2>/dev/null)"; then
        wb_note "apt cannot resolve the packages now (no lists?): keeping the existing outputs"
        return 0
    fi
    declare -A cand=()
    # shellcheck disable=SC2046 # one word per package name
    while read -r pkg ver; do cand[$pkg]="$ver"; done < <(candidates $(awk '$1 == "busybox" || $1 == "netperf" || $1 == "lib" { print $2 }' "$OUT/VERSIONS"))
    while read -r role pkg ver _; do
        case "$role" in
            kernel)
                [ "$k" = "$pkg $ver" ] || { wb_note "kernel: apt now has $k, built with $pkg $ver"; return 1; } ;;
            busybox | netperf | lib)
                cur="${cand[$pkg]:-}"
                if [ -n "$cur" ] && [ "$cur" != "$ver" ]; then
                    wb_note "$pkg: apt now has $cur, built with $ver"
                    return 1
                fi ;;
        esac
    done < "$OUT/VERSIONS"
    return 0
}

if [ "$FORCE" -eq 0 ] && outputs_exist && [ "$(cat "$OUT/.stamp" 2>/dev/null)" = "$(stamp_now)" ]; then
    if versions_current; then
        wb_log "linux guest: up to date in $OUT ($(awk '$1 == "kernel" { print $2, $3 }' "$OUT/VERSIONS"))"
        exit 0
    fi
    HAVE_OLD=1
else
    HAVE_OLD=0
    outputs_exist && [ "$FORCE" -eq 0 ] && wb_note "build files changed since the last build: rebuilding"
fi

# When keeping old outputs is possible, a failure below only warns.
fail() {
    if [ "$HAVE_OLD" -eq 1 ]; then
        wb_warn "$1 — keeping the existing (older) Linux guest in $OUT"
        exit 0
    fi
    wb_die "$@"
}

# ---------------------------------------------------------------------------------------------
# resolve (enabling non-free and updating the lists when needed)
# ---------------------------------------------------------------------------------------------
if ! resolve_all; then
    wb_log "apt does not know all of linux-image-amd64, busybox-static, netperf: updating apt's lists"
    wb_enable_nonfree || true
    wb_as_root apt-get update >&2 || fail "apt-get update failed" "check the network and /etc/apt/sources.list.d/"
    resolve_all || fail "apt cannot resolve linux-image-amd64 -> linux-image-*-amd64, busybox-static and netperf (non-free)" \
        "check 'apt-cache policy linux-image-amd64 busybox-static netperf'; run scripts/setup.sh"
fi
wb_log "linux guest: $KPKG $KVERS, busybox-static $BBVERS, netperf $NPVERS"

# ---------------------------------------------------------------------------------------------
# download (cached)
# ---------------------------------------------------------------------------------------------
# fetch PKG VERSION: print the path of the cached .deb, downloading it when needed.
fetch() {
    local pkg="$1" ver="$2" f
    for f in "$DEBS/${pkg}_"*"_${ARCH}.deb" "$DEBS/${pkg}_"*"_all.deb"; do
        [ -f "$f" ] || continue
        if [ "$(dpkg-deb -f "$f" Package 2>/dev/null)" = "$pkg" ] &&
            [ "$(dpkg-deb -f "$f" Version 2>/dev/null)" = "$ver" ]; then
            echo "$f"
            return 0
        fi
    done
    wb_note "downloading $pkg=$ver" >&2
    local sandbox=()
    # As root, apt would drop to the _apt user, who may not write here (a harmless warning).
    [ "$(id -u)" -eq 0 ] && sandbox=(-o APT::Sandbox::User=root)
    (cd "$DEBS" && apt-get download -q "${sandbox[@]}" "$pkg=$ver" >&2) ||
        return 1
    for f in "$DEBS/${pkg}_"*.deb; do
        if [ "$(dpkg-deb -f "$f" Package 2>/dev/null)" = "$pkg" ] &&
            [ "$(dpkg-deb -f "$f" Version 2>/dev/null)" = "$ver" ]; then
            echo "$f"
            return 0
        fi
    done
    return 1
}

KDEB="$(fetch "$KPKG" "$KVERS")" || fail "downloading $KPKG=$KVERS failed" "check the network and 'apt-cache policy $KPKG'"
BBDEB="$(fetch busybox-static "$BBVERS")" || fail "downloading busybox-static=$BBVERS failed" "check the network"
NPDEB="$(fetch netperf "$NPVERS")" || fail "downloading netperf=$NPVERS failed" \
    "netperf is in Debian's non-free component: check $WB_NONFREE_SOURCES and the network"

# ---------------------------------------------------------------------------------------------
# unpack into a work dir; build the outputs in a staging dir, then move them in place
# ---------------------------------------------------------------------------------------------
WORK="$(mktemp -d "$HERE/out/.linux-work.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
STAGE="$WORK/stage"
ROOT="$WORK/root"
mkdir -p "$STAGE" "$ROOT" "$WORK/k" "$WORK/bb" "$WORK/np"

# The kernel package is big: extract only the kernel image, its config and the modules we need.
# One pass over the (xz-compressed, ~70 MB) package: the kernel image, its config, and every module
# under drivers/net (ours and, normally, all their dependencies). A second pass takes all modules
# only if a dependency lives elsewhere.
dpkg-deb --fsys-tarfile "$KDEB" | tar -x -C "$WORK/k" --wildcards './boot/vmlinuz-*' './boot/config-*' \
    './lib/modules/*/kernel/drivers/net/*' ||
    fail "unpacking $KDEB failed" "delete it ($KDEB) so that it is downloaded again"
VMLINUZ_PATH="$(cd "$WORK/k" && ls boot/vmlinuz-* 2>/dev/null | head -1)"
[ -n "$VMLINUZ_PATH" ] || fail "$KDEB holds no /boot/vmlinuz-*" "is $KPKG really a kernel image package?"
KVER="${VMLINUZ_PATH#boot/vmlinuz-}"
ALL_MODULES_UNPACKED=0
# module_path NAME: the unpacked file of module NAME ('-' and '_' are interchangeable), or nothing.
module_path() {
    local re="${1//[-_]/[-_]}"
    find "$WORK/k/lib/modules/$KVER" -regextype posix-extended -regex ".*/${re}\.ko(\.xz|\.zst|\.gz)?" 2>/dev/null | head -1
}

# decompress_module FILE: leave an uncompressed .ko next to FILE and print its path.
decompress_module() {
    local f="$1"
    case "$f" in
        *.ko) echo "$f" ;;
        *.ko.xz) xz -dkf "$f" && echo "${f%.xz}" ;;
        *.ko.zst) zstd -qdf "$f" -o "${f%.zst}" && echo "${f%.zst}" ;;
        *.ko.gz) gzip -dkf "$f" && echo "${f%.gz}" ;;
    esac
}
# modinfo_field FILE FIELD: a field of a module's .modinfo section (modinfo when present, else grep).
modinfo_field() {
    if command -v modinfo >/dev/null 2>&1; then
        modinfo -F "$2" "$1"
    else
        tr '\0' '\n' < "$1" | sed -n "s/^$2=//p" | head -1
    fi
}

# Resolve the modules and their dependencies; ORDER lists "relative/path.ko", dependencies first.
declare -A MODFILE=() STATE=()
ORDER=()
add_module() {
    local name="$1" p ko dep
    [ "${STATE[$name]:-}" = "done" ] && return 0
    [ "${STATE[$name]:-}" = busy ] && fail "module dependency cycle at $name" "report it"
    STATE[$name]=busy
    p="$(module_path "$name")"
    if [ -z "$p" ] && [ "$ALL_MODULES_UNPACKED" -eq 0 ]; then
        dpkg-deb --fsys-tarfile "$KDEB" | tar -x -C "$WORK/k" --wildcards './lib/modules/*'
        ALL_MODULES_UNPACKED=1
        p="$(module_path "$name")"
    fi
    [ -n "$p" ] || fail "module $name is not in $KPKG" "is it built in (grep CONFIG in config-$KVER)?"
    ko="$(decompress_module "$p")" || fail "could not decompress $p" "install xz-utils/zstd"
    for dep in $(modinfo_field "$ko" depends | tr ',' ' '); do
        add_module "$dep"
    done
    MODFILE[$name]="$ko"
    ORDER+=("${ko#"$WORK/k/lib/modules/$KVER/"}")
    STATE[$name]="done"
}
for m in "${MODULES[@]}"; do add_module "$m"; done

# vermagic of every module must name this kernel.
for rel in "${ORDER[@]}"; do
    vm="$(modinfo_field "$WORK/k/lib/modules/$KVER/$rel" vermagic)"
    [ "${vm%% *}" = "$KVER" ] || fail "module $rel has vermagic '$vm', not $KVER" "report it: the package is inconsistent"
done

dpkg-deb -x "$BBDEB" "$WORK/bb"
dpkg-deb -x "$NPDEB" "$WORK/np"
BUSYBOX="$WORK/bb/bin/busybox"
[ -x "$BUSYBOX" ] || fail "busybox-static has no /bin/busybox" "check the package"
for b in netperf netserver; do
    [ -x "$WORK/np/usr/bin/$b" ] || fail "netperf package has no /usr/bin/$b" "check the package"
done

# ---------------------------------------------------------------------------------------------
# libraries of netperf/netserver: ldd, map each to its Debian package, take it from that package
# ---------------------------------------------------------------------------------------------
# ldd prints "name => /path (addr)" and "/lib64/ld-linux-x86-64.so.2 (addr)".
LIBS="$( { ldd "$WORK/np/usr/bin/netperf"; ldd "$WORK/np/usr/bin/netserver"; } |
    awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u)"
[ -n "$LIBS" ] || fail "ldd found no libraries for netperf (static? ldd broken?)" "check 'ldd $WORK/np/usr/bin/netperf'"
if ldd "$WORK/np/usr/bin/netperf" "$WORK/np/usr/bin/netserver" | grep -q 'not found'; then
    fail "netperf needs libraries the host does not have: $(ldd "$WORK/np/usr/bin/netperf" | grep 'not found')" \
        "apt-get install netperf on the host (scripts/setup.sh does), so ldd can resolve them"
fi
# owner_of PATH: the package owning PATH on the host (tries the merged-/usr aliases too).
owner_of() {
    local p="$1" cand o
    for cand in "$p" "$(readlink -f "$p")" "${p#/usr}" "/usr$p"; do
        o="$(dpkg-query -S "$cand" 2>/dev/null | head -1 | cut -d: -f1)" && [ -n "$o" ] && { echo "$o"; return 0; }
        # multi-arch packages print "pkg:arch: path"
    done
    return 1
}
declare -A LIBPKG=()   # package -> version
declare -A LIBSRC=()   # library path -> file to copy
for lib in $LIBS; do
    pkg="$(owner_of "$lib")" || { wb_warn "no package owns $lib on the host: copying the host's file"; LIBSRC[$lib]="$(readlink -f "$lib")"; continue; }
    pkg="${pkg%%:*}"
    if [ -z "${LIBPKG[$pkg]:-}" ]; then
        ver="$(candidate "$pkg")"
        [ -n "$ver" ] || ver="$(dpkg-query -W -f='${Version}' "$pkg")"
        LIBPKG[$pkg]="$ver"
        deb="$(fetch "$pkg" "$ver")" || fail "downloading $pkg=$ver failed" "check the network"
        mkdir -p "$WORK/lib-$pkg"
        dpkg-deb -x "$deb" "$WORK/lib-$pkg"
    fi
    # Find the file in the package by its path (or its name, merged /usr or not), follow symlinks.
    found=""
    for cand in "$WORK/lib-$pkg$lib" "$WORK/lib-$pkg/usr$lib" "$WORK/lib-$pkg${lib#/usr}"; do
        if [ -e "$cand" ]; then found="$cand"; break; fi
    done
    if [ -z "$found" ]; then
        found="$(find "$WORK/lib-$pkg" -name "$(basename "$lib")" \( -type f -o -type l \) | head -1)"
    fi
    if [ -n "$found" ] && [ -L "$found" ]; then
        tgt="$(readlink "$found")"
        case "$tgt" in /*) found="$WORK/lib-$pkg$tgt" ;; *) found="$(dirname "$found")/$tgt" ;; esac
    fi
    if [ -z "$found" ] || [ ! -f "$found" ]; then
        wb_warn "$lib not found in $pkg=${LIBPKG[$pkg]}: copying the host's file"
        found="$(readlink -f "$lib")"
    fi
    LIBSRC[$lib]="$found"
done

# ---------------------------------------------------------------------------------------------
# the initramfs tree
# ---------------------------------------------------------------------------------------------
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root,lib/modules/"$KVER"}
chmod 1777 "$ROOT/tmp"
chmod 0700 "$ROOT/root"
install -m 0755 "$BUSYBOX" "$ROOT/bin/busybox"
"$BUSYBOX" --list-full | while read -r applet; do
    [ -n "$applet" ] || continue
    [ "$applet" = bin/busybox ] && continue
    mkdir -p "$ROOT/$(dirname "$applet")"
    [ -e "$ROOT/$applet" ] || ln -s /bin/busybox "$ROOT/$applet"
done
install -m 0755 "$WORK/np/usr/bin/netperf" "$WORK/np/usr/bin/netserver" "$ROOT/usr/bin/"
for lib in $LIBS; do
    mkdir -p "$ROOT$(dirname "$lib")"
    install -m 0755 "${LIBSRC[$lib]}" "$ROOT$lib"
done
# ldd names libc by its /lib/x86_64-linux-gnu path; make the loader's default paths all work.
mkdir -p "$ROOT/usr/lib/x86_64-linux-gnu"
for rel in "${ORDER[@]}"; do
    mkdir -p "$ROOT/lib/modules/$KVER/$(dirname "$rel")"
    install -m 0644 "$WORK/k/lib/modules/$KVER/$rel" "$ROOT/lib/modules/$KVER/$rel"
    echo "$rel"
done > "$ROOT/lib/modules/$KVER/wbvmm-load-order"
# modules.dep, so that busybox modprobe works too.
for name in "${!MODFILE[@]}"; do
    ko="${MODFILE[$name]}"
    rel="${ko#"$WORK/k/lib/modules/$KVER/"}"
    deps=""
    for dep in $(modinfo_field "$ko" depends | tr ',' ' '); do
        deps="$deps ${MODFILE[$dep]#"$WORK/k/lib/modules/$KVER/"}"
    done
    echo "$rel:$deps"
done | sort > "$ROOT/lib/modules/$KVER/modules.dep"
install -m 0755 "$SRC/init" "$ROOT/init"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$ROOT/etc/passwd"
printf 'root:x:0:\n' > "$ROOT/etc/group"
printf '127.0.0.1 localhost\n' > "$ROOT/etc/hosts"
printf 'wbvmm-guest\n' > "$ROOT/etc/hostname"
printf 'netperf 12865/tcp\n' > "$ROOT/etc/services"
printf 'export PS1="wbvmm-guest# "\n' > "$ROOT/etc/profile"

# Check that netperf runs with exactly the initramfs' libraries (not the host's).
if ! "$ROOT/lib64/ld-linux-x86-64.so.2" --library-path "$ROOT/lib/x86_64-linux-gnu" "$ROOT/usr/bin/netperf" -V >"$WORK/np.v" 2>&1; then
    cat "$WORK/np.v" >&2
    fail "netperf does not run with the initramfs' libraries" "check the library list: $LIBS"
fi

python3 "$SRC/mkcpio.py" "$ROOT" "$WORK/initramfs.cpio" \
    --node dev/console:c:5:1:600 --node dev/null:c:1:3:666 --node dev/ttyS0:c:4:64:600 ||
    fail "writing the initramfs cpio failed" "see the Python error above"
gzip -9 -n -c "$WORK/initramfs.cpio" > "$STAGE/initramfs.cpio.gz"

# ---------------------------------------------------------------------------------------------
# kernel, vmlinux, checks
# ---------------------------------------------------------------------------------------------
cp "$WORK/k/$VMLINUZ_PATH" "$STAGE/bzImage"
[ -f "$WORK/k/boot/config-$KVER" ] && cp "$WORK/k/boot/config-$KVER" "$STAGE/config-$KVER"
# The bzImage header's version string (at 0x200 + kernel_version) must name KVER.
HDRVER="$(python3 - "$STAGE/bzImage" <<'EOF'
import struct, sys
b = open(sys.argv[1], "rb").read()
assert b[0x202:0x206] == b"HdrS", "no bzImage header"
off = struct.unpack_from("<H", b, 0x20e)[0] + 0x200
print(b[off:b.index(b"\0", off)].decode(errors="replace"))
EOF
)" || fail "$STAGE/bzImage is not a bzImage" "check $KDEB"
[ "${HDRVER%% *}" = "$KVER" ] || fail "bzImage says '$HDRVER', expected $KVER" "report it"
COMP="$(python3 "$SRC/extract-vmlinux.py" "$STAGE/bzImage" "$STAGE/vmlinux")" ||
    fail "extracting vmlinux from bzImage failed" "see the message above (xz/zstd installed?)"
if command -v file >/dev/null 2>&1; then
    file -b "$STAGE/vmlinux" | grep -q '^ELF 64-bit' || fail "vmlinux is not a 64-bit ELF: $(file -b "$STAGE/vmlinux")" "report it"
fi
# The vmlinux's own banner must name the same kernel.
grep -aq "Linux version $KVER " "$STAGE/vmlinux" || fail "vmlinux has no 'Linux version $KVER' banner" "report it"

LIBLINES=""
for pkg in $(printf '%s\n' "${!LIBPKG[@]}" | sort); do
    files=""
    for lib in $LIBS; do
        [ "$(owner_of "$lib" | cut -d: -f1)" = "$pkg" ] && files="$files $(basename "$lib")"
    done
    LIBLINES="${LIBLINES}lib $pkg ${LIBPKG[$pkg]}$files"$'\n'
done
{
    echo "# wbvmm Linux guest: ROLE PACKAGE VERSION [DETAILS]; written by guest-images/build-linux-guest.sh"
    echo "kernel $KPKG $KVERS release=$KVER compression=$COMP"
    echo "metapackage linux-image-amd64 $(candidate linux-image-amd64)"
    echo "busybox busybox-static $BBVERS"
    echo "netperf netperf $NPVERS"
    printf '%s' "$LIBLINES"
    echo "modules - - $(printf '%s ' "${ORDER[@]}")"
} > "$STAGE/VERSIONS"
stamp_now > "$STAGE/.stamp"

# Move into place (the stamp last: it marks a complete build).
rm -f "$OUT/.stamp" "$OUT"/config-*
for f in bzImage vmlinux initramfs.cpio.gz VERSIONS config-"$KVER"; do
    [ -e "$STAGE/$f" ] && mv -f "$STAGE/$f" "$OUT/$f"
done
mv -f "$STAGE/.stamp" "$OUT/.stamp"

wb_log "linux guest built in $OUT:"
(cd "$OUT" && ls -l bzImage vmlinux initramfs.cpio.gz VERSIONS | awk '{ printf "    %-20s %10d bytes\n", $NF, $5 }') >&2
sed 's/^/    /' "$OUT/VERSIONS" >&2

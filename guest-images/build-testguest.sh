#!/bin/sh
# Builds the wbvmm test guest (guest-images/testguest, a no_std PVH ELF) and
# copies it to guest-images/out/testguest.elf. Idempotent; cargo makes a
# rebuild with no changes a no-op. Works from any directory.
#
# The target triple is given explicitly so the guest's rustflags
# (testguest/.cargo/config.toml) apply to the guest only, not to build.rs.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/testguest"
export CARGO_TARGET_DIR="$here/testguest/target"
cargo build --release --target x86_64-unknown-linux-gnu "$@"
mkdir -p "$here/out"
src="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/testguest"
dst="$here/out/testguest.elf"
# Copy only when changed, so the output's mtime means something.
if ! cmp -s "$src" "$dst" 2>/dev/null; then
    cp "$src" "$dst.tmp"
    mv "$dst.tmp" "$dst"
fi
echo "$dst"

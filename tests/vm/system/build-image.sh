#!/bin/sh
# Build the systemd guest's root disk: a clean Debian 12 root from Debian's
# packages (packages.txt) with mmdebstrap, laid onto an ext4 image with
# `mke2fs -d` (no loop device), plus the kernel and an initramfs that QEMU
# boots directly (-kernel/-initrd, root=/dev/vda, systemd as init).
#
# Usage: sh tests/vm/system/build-image.sh OUTDIR
# Writes OUTDIR/root.img (raw ext4), OUTDIR/vmlinuz, OUTDIR/initrd.img,
# OUTDIR/manifest.txt (kernel release, package versions). Needs root.
# tests/vm/system_image.py calls it and caches OUTDIR by a hash of this
# script and packages.txt.
set -eu

OUT=${1:?usage: build-image.sh OUTDIR}
HERE=$(cd "$(dirname "$0")" && pwd)
IMAGE_SIZE=${SWITCH_AGENT_IMAGE_SIZE:-4G}
say() { printf 'build-image: %s\n' "$*"; }

PKGS=$(sed -e 's/#.*//' "$HERE/packages.txt" | tr -s ' \n' ',' | sed -e 's/^,//' -e 's/,$//')
SOURCES=/etc/apt/sources.list.d/debian.sources
[ -f "$SOURCES" ] || SOURCES=""

mkdir -p "$OUT"
ROOT=$OUT/root.tmp
rm -rf "$ROOT"
mkdir -p "$ROOT"

say "mmdebstrap bookworm: $PKGS"
# The hooks run before the packages are configured (setup) and after (customize).
# An initramfs of only what finds the root disk: virtio and ext4 (the Debian
# default, MODULES=most, is ~10x larger and slower to unpack under TCG).
mmdebstrap --variant=apt --mode=root --quiet --include="$PKGS" \
    --setup-hook='mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d" &&
        echo MODULES=list > "$1/etc/initramfs-tools/conf.d/switch-agent-vm" &&
        printf "virtio_pci\nvirtio_blk\next4\n" > "$1/usr/share/initramfs-tools/modules.d/switch-agent-vm"' \
    --customize-hook="sh '$HERE/customize.sh' \"\$1\"" \
    bookworm "$ROOT" $SOURCES

KVER=$(ls "$ROOT/lib/modules")
say "kernel $KVER"
cp "$ROOT/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
cp "$ROOT/boot/initrd.img-$KVER" "$OUT/initrd.img"
{
    echo "kernel $KVER"
    chroot "$ROOT" dpkg-query -W -f='${Package} ${Version}\n'
} > "$OUT/manifest.txt"

say "ext4 image ($IMAGE_SIZE) from the root"
rm -f "$OUT/root.img"
mke2fs -q -t ext4 -L swguest-root -d "$ROOT" "$OUT/root.img" "$IMAGE_SIZE"
rm -rf "$ROOT"
say "done: $(du -sh --apparent-size "$OUT/root.img" | cut -f1) apparent, $(du -sh "$OUT/root.img" | cut -f1) used"

#!/usr/bin/env bash
# Installs what imgguard's tests and demo need on a Debian machine: qemu-img and the tools the
# tests build images with (system packages, only when missing), and a venv with imgguard in it.
set -euo pipefail
cd "$(dirname "$0")/.."

declare -A package_of=(
    [qemu-img]=qemu-utils [genisoimage]=genisoimage [xorriso]=xorriso [sfdisk]=fdisk
    [sgdisk]=gdisk [isohybrid]=syslinux-utils [bwrap]=bubblewrap [strace]=strace
)
missing=()
for tool in "${!package_of[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("${package_of[$tool]}")
done
[ -f /usr/lib/ISOLINUX/isohdpfx.bin ] || missing+=(isolinux)
if [ "${#missing[@]}" -gt 0 ] && [ "${1:-}" != "--no-system" ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "installing system packages: ${missing[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'

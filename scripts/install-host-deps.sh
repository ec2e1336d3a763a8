#!/bin/sh
# Installs the Debian packages the tests drive for real (sshd, QEMU, debootstrap, mkfs.ext4,
# systemd-analyze for the unit's hardening score). Idempotent: installs only what is
# missing, and runs `apt-get update` only when something is missing. Must run as root on Debian 12.
set -eu

PACKAGES="qemu-system-x86 qemu-utils debootstrap openssh-client openssh-server e2fsprogs \
util-linux ca-certificates debian-archive-keyring xxd systemd"

missing=""
for pkg in $PACKAGES; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    case "$status" in
        *" installed") ;;
        *) missing="$missing $pkg" ;;
    esac
done

if [ -z "$missing" ]; then
    echo "host-deps: all present ($PACKAGES)" | tr -s ' '
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "host-deps: missing:$missing -- run this script as root to install them" >&2
    exit 1
fi

echo "host-deps: installing:$missing"
export DEBIAN_FRONTEND=noninteractive
if ! apt-get update -qq; then
    echo "host-deps: apt-get update failed: is the Debian package registry reachable?" >&2
    exit 1
fi
# shellcheck disable=SC2086 # word splitting of the package list is intended
apt-get install -y -qq --no-install-recommends $missing
echo "host-deps: done"

#!/bin/sh
# Installs zbackupd on the machine the backup disks are plugged into:
#   a venv in $PREFIX (default /opt/zbackupd), `zbackupd` and `zbackupd-gate` on PATH via
#   /usr/local/bin, the systemd unit (pointed at that install) and /etc/zbackupd.
# Usage: packaging/install.sh [WHEELHOUSE]
#   WHEELHOUSE: a directory of wheels (zbackupd's and its dependencies') for an offline
#   install; without it, pip installs this checkout and fetches dependencies from its index
#   at the versions constraints.txt pins (a wheelhouse was built with them already).
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
prefix=${PREFIX:-/opt/zbackupd}
bindir=${BINDIR:-/usr/local/bin}
unitdir=${UNITDIR:-/etc/systemd/system}

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (it installs a systemd unit)" >&2
    exit 1
fi

python3 -m venv "$prefix"
if [ $# -ge 1 ]; then
    "$prefix/bin/pip" install --quiet --no-index --find-links "$1" zbackupd
else
    "$prefix/bin/pip" install --quiet -c "$here/constraints.txt" --upgrade pip
    "$prefix/bin/pip" install --quiet -c "$here/constraints.txt" \
        --build-constraint "$here/constraints.txt" "$here"
fi
ln -sf "$prefix/bin/zbackupd" "$prefix/bin/zbackupd-gate" "$bindir/"

# The unit names /usr/bin/zbackupd (a distribution package's path); point it at this install.
sed "s|/usr/bin/zbackupd|$bindir/zbackupd|g" "$here/systemd/zbackupd.service" \
    > "$unitdir/zbackupd.service.new"
chmod 0644 "$unitdir/zbackupd.service.new"
mv "$unitdir/zbackupd.service.new" "$unitdir/zbackupd.service"
install -d -m 0755 /etc/zbackupd
if command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload
fi
echo "zbackupd $("$prefix/bin/zbackupd" --version | cut -d' ' -f2) installed in $prefix."
echo "Next: write /etc/zbackupd/zbackupd.toml, then zbackupd keysetup, keygen, init-disk (README.md)."

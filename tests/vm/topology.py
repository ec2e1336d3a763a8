"""The guest's two roles: the backup server (in a network namespace) and the extbackup host.

The "backup server" is a second ``sshd`` inside the network namespace ``server`` (its own
veth address), serving the source pool ``tank`` on the VM's spare virtio disk. The guest's
root namespace is the "extbackup" machine the USB disks are plugged into, where zbackupd
is installed from this checkout (wheel + dependency wheelhouse built on the host, installed
with ``--no-index``: the guest reaches no registry).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.vm.build_image import cache_root
from tests.vm.controller import Vm
from zbackupd.errors import PermanentError

CHECKOUT = Path(__file__).resolve().parents[2]
SERVER_NAMESPACE = "server"
SERVER_ADDRESS = "10.77.0.2"
EXTBACKUP_ADDRESS = "10.77.0.1"
SERVER_HOST_ALIAS = "backup-server"
SERVER_DIR = "/etc/zbackupd-test/server"
GUEST_VENV = "/opt/zbackupd"
#: Datasets of the source pool: name → encrypted?
SOURCE_DATASETS = {
    "tank/secure": True,
    "tank/secure/docs": True,
    "tank/plain": False,
}
SOURCE_SNAPSHOTS = ("s1", "s2")


class WheelBuildError(PermanentError):
    """The host could not build zbackupd's wheel or its dependency wheelhouse."""

    def __init__(self, argv: list[str], output: str) -> None:
        self.argv = argv
        self.output = output
        super().__init__(f"{' '.join(argv)} failed:\n{output[-3000:]}")


@dataclass(frozen=True, slots=True)
class BackupServer:
    """How the extbackup side reaches the server: ``ssh backup-server <command>``."""

    namespace: str
    address: str
    host_alias: str
    datasets: dict[str, bool]
    snapshots: tuple[str, ...]
    veth_extbackup: str = "ext0"

    def ssh(self, command: str) -> str:
        """A guest shell fragment running ``command`` on the server over SSH."""
        return f"ssh {self.host_alias} {command}"


SERVER_SETUP = rf"""
modprobe zfs
# --- network: a veth pair into the namespace; nothing routes beyond it
ip netns add {SERVER_NAMESPACE}
ip link add ext0 type veth peer name srv0
ip link set srv0 netns {SERVER_NAMESPACE}
ip addr add {EXTBACKUP_ADDRESS}/24 dev ext0
ip link set ext0 up
ip -n {SERVER_NAMESPACE} link set lo up
ip -n {SERVER_NAMESPACE} addr add {SERVER_ADDRESS}/24 dev srv0
ip -n {SERVER_NAMESPACE} link set srv0 up
# --- the server's own sshd, reachable only inside the namespace
mkdir -p {SERVER_DIR} /root/.ssh
ssh-keygen -q -t ed25519 -N '' -f {SERVER_DIR}/ssh_host_ed25519_key
ssh-keygen -q -t ed25519 -N '' -C extbackup -f /root/.ssh/id_backup_server
cp /root/.ssh/id_backup_server.pub {SERVER_DIR}/authorized_keys
cat > {SERVER_DIR}/sshd_config <<EOF
ListenAddress {SERVER_ADDRESS}
HostKey {SERVER_DIR}/ssh_host_ed25519_key
PidFile /run/zbackupd-test-server-sshd.pid
AuthorizedKeysFile {SERVER_DIR}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM yes
UseDNS no
EOF
ip netns exec {SERVER_NAMESPACE} /usr/sbin/sshd -f {SERVER_DIR}/sshd_config
echo "{SERVER_HOST_ALIAS} $(cut -d' ' -f1,2 {SERVER_DIR}/ssh_host_ed25519_key.pub)" \
    > /root/.ssh/known_hosts
cat > /root/.ssh/config <<EOF
Host {SERVER_HOST_ALIAS}
    HostName {SERVER_ADDRESS}
    HostKeyAlias {SERVER_HOST_ALIAS}
    User root
    IdentityFile /root/.ssh/id_backup_server
    IdentitiesOnly yes
    StrictHostKeyChecking yes
    ConnectTimeout 20
EOF
# --- the source pool: unencrypted root, encrypted and unencrypted datasets
zpool create -f -o ashift=12 -O mountpoint=/tank tank /dev/vdb
head -c 32 /dev/urandom > {SERVER_DIR}/tank-secure.key
zfs create -o encryption=on -o keyformat=raw \
    -o keylocation=file://{SERVER_DIR}/tank-secure.key tank/secure
zfs create tank/secure/docs
zfs create tank/plain
for ds in tank/secure tank/secure/docs tank/plain; do
    dd if=/dev/urandom of=/$ds/first.bin bs=1M count=4 status=none
    echo "hello from $ds" > /$ds/hello.txt
done
zfs snapshot -r tank@s1
for ds in tank/secure tank/secure/docs tank/plain; do
    dd if=/dev/urandom of=/$ds/second.bin bs=1M count=2 status=none
done
zfs snapshot -r tank@s2
# --- prove the path works end to end
ssh {SERVER_HOST_ALIAS} true
"""


def setup_server(vm: Vm) -> BackupServer:
    """Create the netns backup server with its sshd and the source pool ``tank``."""
    vm.run(SERVER_SETUP, timeout=300)
    return BackupServer(
        namespace=SERVER_NAMESPACE,
        address=SERVER_ADDRESS,
        host_alias=SERVER_HOST_ALIAS,
        datasets=dict(SOURCE_DATASETS),
        snapshots=SOURCE_SNAPSHOTS,
    )


def _pip(argv: list[str]) -> None:
    command = [sys.executable, "-m", "pip", *argv]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise WheelBuildError(command, result.stdout + result.stderr)


def _copy_source(destination: Path) -> Path:
    """Copy what a wheel is built from, so the build leaves nothing in the checkout."""
    source = destination / "src"
    source.mkdir(parents=True)
    shutil.copy2(CHECKOUT / "pyproject.toml", source)
    if (CHECKOUT / "README.md").exists():
        shutil.copy2(CHECKOUT / "README.md", source)
    shutil.copytree(
        CHECKOUT / "zbackupd", source / "zbackupd", ignore=shutil.ignore_patterns("__pycache__")
    )
    return source


def build_wheelhouse(destination: Path) -> Path:
    """zbackupd's wheel (fresh from the checkout) plus its dependencies' wheels.

    The dependency wheels come from PyPI, at the versions ``constraints.txt`` pins, once per
    ``pyproject.toml`` and ``constraints.txt`` content and are cached beside the VM image.
    """
    constraints = CHECKOUT / "constraints.txt"
    pinned = ["-c", str(constraints), "--build-constraint", str(constraints)]
    inputs = (CHECKOUT / "pyproject.toml").read_bytes() + constraints.read_bytes()
    inputs_hash = hashlib.sha256(inputs).hexdigest()[:16]
    cached = cache_root() / "wheelhouse" / inputs_hash
    with tempfile.TemporaryDirectory(prefix="zbackupd-wheel-") as scratch:
        source = _copy_source(Path(scratch))
        if not cached.is_dir():
            # Per process: two test runs at once each build their own, the first rename wins.
            partial = cached.with_name(f"{cached.name}.partial-{os.getpid()}")
            shutil.rmtree(partial, ignore_errors=True)
            _pip(["wheel", "--quiet", *pinned, "--wheel-dir", str(partial), str(source)])
            for own in partial.glob("zbackupd-*.whl"):
                own.unlink()
            try:
                partial.rename(cached)
            except OSError:  # another run finished first: its wheels are the same
                shutil.rmtree(partial, ignore_errors=True)
        destination.mkdir(parents=True, exist_ok=True)
        for wheel in cached.glob("*.whl"):
            shutil.copy2(wheel, destination)
        _pip(
            ["wheel", "--quiet", "--no-deps", *pinned, "--wheel-dir", str(destination), str(source)]
        )
    return destination


def install_zbackupd(vm: Vm) -> str:
    """Install this checkout's zbackupd in the guest the way an admin does, once per VM:
    ``packaging/install.sh`` offline from the wheelhouse (the venv in ``GUEST_VENV``, the
    commands on PATH, the systemd unit pointed at them). Returns its ``--version``."""
    wheelhouse = build_wheelhouse(vm.workdir / "wheelhouse")
    vm.put_directory(wheelhouse, "/root/wheelhouse")
    for relative in ("packaging/install.sh", "systemd/zbackupd.service"):
        vm.put_file(CHECKOUT / relative, f"/root/zbackupd-src/{relative}", mode=0o755)
    vm.run(f"PREFIX={GUEST_VENV} /root/zbackupd-src/packaging/install.sh /root/wheelhouse",
           timeout=600)
    return vm.run("zbackupd --version").stdout.strip()

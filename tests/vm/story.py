"""The admin's steps, as the VM tests and the demo perform them in the guest.

First setup (design.md §2, story 1): config, keysetup, keygen (its authorized_keys line
goes to the server with the gate as forced command), init-disk, the systemd unit, then
``systemctl start zbackupd``. Everything runs the installed ``zbackupd`` commands; the
passphrase reaches them on stdin, never argv or the environment.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from typing import Any

from tests.vm.controller import UsbDisk, Vm
from tests.vm.topology import GUEST_VENV, SERVER_DIR, BackupServer
from zbackupd.service.pool import temporary_pool_name

PASSPHRASE = b"correct horse battery staple\n"
CONFIG_PATH = "/etc/zbackupd/zbackupd.toml"
GATE_CONFIG = f"{SERVER_DIR}/gate.toml"
STATE_FILE = "/var/lib/zbackupd/state.json"
SOURCE_NAME = "server"
#: The roots the test config backs up: an encrypted tree and an unencrypted dataset.
ROOTS = ("tank/secure", "tank/plain")


@dataclass(frozen=True, slots=True)
class BackupDisk:
    """A USB disk that ``zbackupd init-disk`` prepared and the config names."""

    usb: UsbDisk
    label: str
    pool_name: str
    pool_guid: int

    @property
    def partition(self) -> str:
        return f"{self.usb.by_id}-part1"

    @property
    def imported_as(self) -> str:
        """The pool's name while the daemon has it imported (``zpool import -t``: the
        disk keeps ``pool_name``, which an import by hand shows)."""
        return temporary_pool_name(self.label)


def _config(server: BackupServer, vm: Vm, *, daemon: str = "", source: str = "") -> str:
    host_key = vm.run(f"cut -d' ' -f1,2 {SERVER_DIR}/ssh_host_ed25519_key.pub").stdout.strip()
    datasets = "".join(f'\n[[sources.datasets]]\nroot = "{root}"\n' for root in ROOTS)
    return (
        (f"[daemon]\n{daemon}\n" if daemon else "")
        + f'[[sources]]\nname = "{SOURCE_NAME}"\nhost = "{server.address}"\nuser = "root"\n'
        f'host_key = "{host_key}"\n{source}\n{datasets}\n'
        "[retention]\nkeep_last = 2\ndaily = 0\nweekly = 0\nmonthly = 0\nyearly = 0\n"
    )


def _gate_config() -> str:
    roots = ", ".join(f'"{root}"' for root in ROOTS)
    return (
        f"roots = [{roots}]\nallow_snapshot = true\nallow_destroy = true\n"
        'prefix = "zbackupd"\nzfs = "/usr/sbin/zfs"\n'
    )


def first_setup(vm: Vm, server: BackupServer, *, daemon: str = "", source: str = "") -> str:
    """Config, key store, SSH identity authorised on the server through the gate, on a
    guest where zbackupd is installed (``topology.install_zbackupd``, once per VM).
    ``daemon``: lines of a ``[daemon]`` block; ``source``: further keys of the source
    (e.g. shorter retries and keepalives for the network faults).

    Returns the ``authorized_keys`` line keygen printed.
    """
    vm.run("systemctl stop zbackupd 2>/dev/null || true; rm -rf /var/lib/zbackupd /etc/zbackupd")
    config = _config(server, vm, daemon=daemon, source=source)
    vm.run(f"install -D -m 0644 /dev/stdin {CONFIG_PATH}", stdin=config.encode())
    vm.run(f"install -D -m 0644 /dev/stdin {GATE_CONFIG}", stdin=_gate_config().encode())
    vm.run("zbackupd keysetup --kdf-seconds 0.3 --passphrase-stdin", stdin=PASSPHRASE,
           timeout=300)
    gate = f"{GUEST_VENV}/bin/zbackupd-gate --config {GATE_CONFIG}"
    line = vm.run(
        f"zbackupd keygen --passphrase-stdin --gate-command {shlex.quote(gate)}",
        stdin=PASSPHRASE, timeout=300,
    ).stdout.strip()
    vm.run(
        f"grep -v 'zbackupd-gate' {SERVER_DIR}/authorized_keys > {SERVER_DIR}/ak.new || true; "
        f"cat {SERVER_DIR}/ak.new - > {SERVER_DIR}/authorized_keys",
        stdin=(line + "\n").encode(),
    )
    return line


def init_disk(
    vm: Vm,
    usb: UsbDisk,
    label: str,
    *,
    pool_name: str | None = None,
    label_in_config: str | None = None,
    pool_name_in_config: str | None = None,
) -> BackupDisk:
    """``zbackupd init-disk`` (``--pool-name`` when given), then its printed block appended
    to the config. ``label_in_config`` / ``pool_name_in_config`` falsify that block: the
    pool key is derived from the label, so another label means another key (a disk of
    another installation); another pool name, a disk whose pool is not the configured
    one. The result names the disk as the config does and the pool as the disk does."""
    option = f" --pool-name {pool_name}" if pool_name else ""
    snippet = vm.run(
        f"zbackupd init-disk --device {usb.by_id} --label {label}{option} --passphrase-stdin",
        stdin=PASSPHRASE, timeout=300,
    ).stdout
    fields = dict(
        line.split(" = ", 1) for line in snippet.splitlines() if " = " in line
    )
    on_disk = json.loads(fields["pool_name"])
    if label_in_config is not None:
        snippet = snippet.replace(f'label = "{label}"', f'label = "{label_in_config}"')
    if pool_name_in_config is not None:
        snippet = snippet.replace(f'pool_name = "{on_disk}"',
                                  f'pool_name = "{pool_name_in_config}"')
    vm.run(f"cat >> {CONFIG_PATH}", stdin=("\n" + snippet).encode())
    vm.run("udevadm settle")
    return BackupDisk(usb, label_in_config or label, on_disk, int(json.loads(fields["pool_guid"])))


def start_daemon(vm: Vm) -> None:
    vm.run("systemctl reset-failed zbackupd 2>/dev/null || true; systemctl restart zbackupd",
           timeout=120)


def unlock(vm: Vm) -> str:
    return vm.run("zbackupd unlock --passphrase-stdin", stdin=PASSPHRASE, timeout=300).stdout


def status(vm: Vm) -> dict[str, Any]:
    """``zbackupd status --json``; its exit code is a verdict (0 all good, 1 a last run
    failed, 2 stale or never backed up), not a failure of the command."""
    answer = vm.run("zbackupd status --json", check=False)
    assert answer.returncode in (0, 1, 2), (answer.returncode, answer.stderr)
    result: dict[str, Any] = json.loads(answer.stdout)
    return result


def systemd_status_line(vm: Vm) -> str:
    """What ``systemctl status`` shows as ``Status:`` (the daemon's STATUS=)."""
    return vm.run("systemctl show -P StatusText zbackupd").stdout.strip()


def disk_phase(vm: Vm, label: str) -> str | None:
    for disk in status(vm)["disks"]:
        if disk["label"] == label:
            return str(disk["phase"])
    return None


def wait_for(vm: Vm, what: str, predicate: Any, timeout: float = 600.0) -> None:
    """Poll ``predicate()`` until true; fail with the daemon's status and journal if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(2)
    raise AssertionError(
        f"timed out after {timeout:.0f}s waiting for {what}\n"
        f"status: {systemd_status_line(vm)}\n"
        + vm.run("journalctl -u zbackupd --no-pager -n 80", check=False).stdout
    )


def replug(vm: Vm, disk: BackupDisk) -> None:
    """Pull the disk from the host side (if still attached) and plug the same image in."""
    if disk.usb.serial in vm.usb_disks:
        vm.unplug_usb_disk(disk.usb, wait_guest=False)
    vm.plug_usb_disk(disk.usb.serial, disk.usb.size_bytes, image=disk.usb.image)


def wait_powered_off(vm: Vm, disk: BackupDisk, timeout: float = 600) -> None:
    """Until the daemon has finished with the disk and the disk is gone from the guest."""
    wait_for(vm, f"disk {disk.label} backed up and powered off",
             lambda: not disk_present(vm, disk.usb)
             and disk_phase(vm, disk.label) in ("done", "failed", "refused"),
             timeout)  # fmt: skip


def disk_present(vm: Vm, usb: UsbDisk) -> bool:
    return vm.run(f"test -e {usb.by_id}", check=False).returncode == 0


def last_run(vm: Vm, label: str) -> dict[str, Any]:
    state = json.loads(vm.run(f"cat {STATE_FILE}").stdout)
    run: dict[str, Any] = state["runs"][label][-1]
    return run


def server_newest_guids(vm: Vm, server: BackupServer) -> dict[str, int]:
    """Newest snapshot GUID of every dataset under the roots, on the server."""
    listing = vm.run(server.ssh(
        "zfs list -H -p -t snapshot -o name,guid -s createtxg -r " + " ".join(ROOTS)
    )).stdout
    newest: dict[str, int] = {}
    for line in listing.splitlines():
        name, guid = line.split("\t")
        newest[name.partition("@")[0]] = int(guid)
    return newest


def server_own_snapshots(vm: Vm, server: BackupServer) -> dict[str, list[int]]:
    """GUIDs of zbackupd's own run snapshots per dataset under the roots, oldest first."""
    listing = vm.run(server.ssh(
        "zfs list -H -p -t snapshot -o name,guid -s createtxg -r " + " ".join(ROOTS)
    )).stdout
    own: dict[str, list[int]] = {}
    for line in listing.splitlines():
        name, guid = line.split("\t")
        dataset, _, short = name.partition("@")
        if short.startswith("zbackupd_"):
            own.setdefault(dataset, []).append(int(guid))
    return own


def disk_newest_guids(vm: Vm, disk: BackupDisk) -> dict[str, int]:
    """Newest snapshot GUID per dataset on the disk, keyed by the server's dataset name."""
    prefix = f"{disk.pool_name}/backup/{SOURCE_NAME}/"
    listing = vm.run(
        f"zfs list -H -p -t snapshot -o name,guid -s createtxg -r {disk.pool_name}/backup"
    ).stdout
    newest: dict[str, int] = {}
    for line in listing.splitlines():
        name, guid = line.split("\t")
        newest[name.partition("@")[0].removeprefix(prefix)] = int(guid)
    return newest


def inspect_newest_guids(vm: Vm, disk: BackupDisk) -> dict[str, int]:
    """Stop the daemon, plug the (powered-off) disk back in and read ``disk_newest_guids``;
    the pool is exported again afterwards."""
    vm.run("systemctl stop zbackupd", timeout=240)
    replug(vm, disk)
    import_for_inspection(vm, disk)
    try:
        return disk_newest_guids(vm, disk)
    finally:
        export(vm, disk)


def import_for_inspection(vm: Vm, disk: BackupDisk) -> None:
    """With the daemon stopped: import the disk's pool read-only-ish to look at it."""
    vm.run(f"zpool import -d {disk.partition} -N -o cachefile=none {disk.pool_guid}",
           timeout=120)


def export(vm: Vm, disk: BackupDisk) -> None:
    vm.run(f"zfs unload-key -a 2>/dev/null || true; zpool export {disk.pool_name}", timeout=120)


def inspect_own_run(vm: Vm, server: BackupServer, disk: BackupDisk, run: dict[str, Any]) -> None:
    """With the daemon stopped: the disk holds, of every dataset, exactly the snapshot its
    own run reports (another disk's run may have snapshotted the server again meanwhile;
    a dataset with nothing written since its newest snapshot is sent that one instead of
    a new run snapshot), GUIDs the server's. The pool is imported by hand under the name
    on the disk, which proves the daemon's temporary import name was not written there."""
    sent = {result["dataset"]: result["newest_snapshot"] for result in run["datasets"]}
    assert all(sent.values()), run
    listing = vm.run(server.ssh(
        "zfs list -H -p -t snapshot -o name,guid -r " + " ".join(ROOTS)
    )).stdout
    guid_of = {name: int(guid) for name, guid in (line.split("\t")
                                                 for line in listing.splitlines())}
    server_guids = {dataset: guid_of[f"{dataset}@{short}"] for dataset, short in sent.items()}
    if not disk_present(vm, disk.usb):  # powered off by the daemon: plug it in again
        replug(vm, disk)
    import_for_inspection(vm, disk)
    try:
        assert disk_newest_guids(vm, disk) == server_guids
    finally:
        export(vm, disk)

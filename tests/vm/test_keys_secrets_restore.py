"""Keys and secrets in the real guest: nothing leaks, a wrong passphrase touches nothing,
and a disk restores on a "new machine" with only the recovery key (and the server's keys
for the datasets that were sent raw).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm import story
from tests.vm.conftest import UsbDiskFactory
from tests.vm.controller import Vm
from tests.vm.story import BackupDisk
from tests.vm.topology import GUEST_VENV, SERVER_DIR, BackupServer

pytestmark = pytest.mark.vm

HERE = Path(__file__).resolve().parent

#: Runs in the guest with the installed package: prints every secret as ``name=hex`` on
#: stdout, for scan_secrets.py on the other end of a pipe (never a file, never argv).
DERIVE_SECRETS = r"""
import sys
from zbackupd.config import load_config
from zbackupd.keys.derivation import KeyStore
from zbackupd.keys.secret import read_secret
from zbackupd.keys.sshkey import load_identity

config = load_config(__import__("pathlib").Path("/etc/zbackupd/zbackupd.toml"))
passphrase = read_secret(0)
master = KeyStore(config.daemon.keys_dir).unlock_blocking(passphrase)
with master.pool_key(sys.argv[1]) as key:
    print("pool_key_raw=" + bytes(key).hex())
    print("pool_key_hex=" + bytes(key).hex().encode().hex())
    print("pool_key_HEX=" + bytes(key).hex().upper().encode().hex())
with master.ssh_passphrase() as ssh_passphrase:
    print("ssh_passphrase=" + bytes(ssh_passphrase).hex())
    identity = load_identity(config.daemon.ssh_key_file, ssh_passphrase)
seed = identity._key.private_value  # ed25519: the 32-byte seed
print("ssh_seed_raw=" + bytes(seed).hex())
print("ssh_seed_hex=" + bytes(seed).hex().encode().hex())
"""


@pytest.fixture(scope="module")
def installed(installed: str, vm: Vm) -> str:
    """conftest's first setup, plus the secret scanner and the key derivation script."""
    vm.put_file(HERE / "scan_secrets.py", "/root/scan_secrets.py")
    vm.run("install -m 0600 /dev/stdin /root/derive_secrets.py", stdin=DERIVE_SECRETS.encode())
    return installed


def _back_up(vm: Vm, usb_disk: UsbDiskFactory, serial: str, label: str) -> BackupDisk:
    usb = usb_disk(serial=serial, size=1 << 30)
    disk = story.init_disk(vm, usb, label)
    story.start_daemon(vm)
    story.unlock(vm)
    story.wait_powered_off(vm, disk)
    assert story.last_run(vm, label)["ok"], story.last_run(vm, label)
    return disk


def test_no_secret_in_files_journal_argv_or_environment_after_a_backup(
    vm: Vm, installed: str, usb_disk: UsbDiskFactory
) -> None:
    disk = _back_up(vm, usb_disk, "ZBSECRET1", "secret-a")
    # The journal as text too (journald may store fields compressed in its files).
    vm.run("journalctl --no-pager -o export > /run/journal-export.txt")
    try:
        scan = vm.run(
            f"{GUEST_VENV}/bin/python /root/derive_secrets.py {disk.label} "
            f"| python3 /root/scan_secrets.py",
            stdin=story.PASSPHRASE, timeout=1800,
        ).stdout
    finally:
        vm.run("rm -f /run/journal-export.txt")
    assert scan.strip().splitlines()[-1] == "hits: 0", scan
    # The scanner finds what it is looking for, so 0 hits means something.
    probe = vm.run(
        "head -c 32 /dev/urandom > /run/probe.bin; "
        "echo probe=$(od -An -tx1 /run/probe.bin | tr -d ' \\n') "
        "| python3 /root/scan_secrets.py /run; rm -f /run/probe.bin",
        timeout=600,
    ).stdout
    assert "/run/probe.bin: probe" in probe, probe


def test_wrong_passphrase_key_is_refused_and_no_disk_touched(
    vm: Vm, installed: str, usb_disk: UsbDiskFactory
) -> None:
    usb = usb_disk(serial="ZBWRONG1", size=512 << 20)
    disk = story.init_disk(vm, usb, "wrong-a")
    story.start_daemon(vm)  # coldplug: the disk waits for unlock
    story.wait_for(vm, "the disk to wait for unlock",
                   lambda: story.disk_phase(vm, disk.label) == "waiting for unlock", 120)
    refused = vm.run("zbackupd unlock --passphrase-stdin", stdin=b"not the passphrase\n",
                     check=False, timeout=300)
    assert refused.returncode == 1
    assert "wrong passphrase" in refused.stderr
    assert story.status(vm)["locked"] is True
    assert "wrong passphrase" in story.systemd_status_line(vm)
    assert story.disk_phase(vm, disk.label) == "waiting for unlock"
    assert vm.run("zpool list -H -o name").stdout.split() == ["tank"]
    journal = vm.run("journalctl -u zbackupd --no-pager -o cat -n 50").stdout
    assert "zpool import" not in journal
    assert "importing" not in journal.split("unlock refused")[-1]


def test_restore_drill_with_only_the_recovery_key(
    vm: Vm, server: BackupServer, installed: str, usb_disk: UsbDiskFactory
) -> None:
    disk = _back_up(vm, usb_disk, "ZBRESTORE1", "restore-a")
    recovery = vm.run(
        f"zbackupd recovery-key {disk.label} --passphrase-stdin", stdin=story.PASSPHRASE,
        timeout=300,
    ).stdout.strip()
    assert len(recovery.replace(" ", "")) == 64
    vm.run("systemctl stop zbackupd", timeout=240)
    # A new machine: the disk, the printed recovery key, the server's keys for raw datasets.
    story.replug(vm, disk)
    base = f"{disk.pool_name}/backup/{story.SOURCE_NAME}"
    unhex = "python3 -c 'import sys; sys.stdout.buffer.write(bytes.fromhex(sys.stdin.read()))'"
    vm.run(f"zpool import -d {disk.partition} -N -o cachefile=none -R /restore "
           f"{disk.pool_guid}", timeout=120)
    try:
        vm.run(f"{unhex} | zfs load-key -L prompt {disk.pool_name}",
               stdin=recovery.encode(), timeout=120)
        # Each raw-received dataset is its own encryption root with the server's key.
        roots = vm.run(f"zfs get -H -o name,value -r encryptionroot {base}/tank/secure").stdout
        assert f"{base}/tank/secure/docs\t{base}/tank/secure/docs" in roots, roots
        for root in (f"{base}/tank/secure", f"{base}/tank/secure/docs"):
            vm.run(f"zfs load-key -L file://{SERVER_DIR}/tank-secure.key {root}")
        for dataset in ("tank/secure", "tank/secure/docs", "tank/plain"):
            vm.run(f"zfs set mountpoint=/{dataset} {base}/{dataset} && zfs mount {base}/{dataset}")
            snapshot = vm.run(
                f"zfs list -H -o name -t snapshot -s createtxg {base}/{dataset} | tail -1"
            ).stdout.strip().partition("@")[2]
            restored = vm.run(
                f"cd /restore/{dataset} && find . -maxdepth 1 -type f -print0 | sort -z "
                "| xargs -0 sha256sum"
            ).stdout
            original = vm.run(server.ssh(
                f"'cd /{dataset}/.zfs/snapshot/{snapshot} && find . -maxdepth 1 -type f "
                "-print0 | sort -z | xargs -0 sha256sum'"
            )).stdout
            assert restored == original, (dataset, restored, original)
            assert restored.count("\n") >= 2
    finally:
        vm.run(f"zfs unmount -a 2>/dev/null; zfs unload-key -a 2>/dev/null; "
               f"zpool export {disk.pool_name}", check=False, timeout=120)

"""The daemon's stop: the unlocked keys are wiped first, whatever the control socket does."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from zbackupd.config import Config, parse_config
from zbackupd.errors import ZbackupdError
from zbackupd.keys.derivation import MASTER_KEY_BYTES, MasterKey
from zbackupd.keys.secret import SecretBytes
from zbackupd.keys.sshkey import generate_identity
from zbackupd.service.daemon import Daemon
from zbackupd.service.notify import NullNotifier
from zbackupd.service.store import StateStore

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIUbOiy4xwbpskbVaVgiTnx+sBj4wAc8iSK2jPAcBHI4"
BOUND = 5.0


def config(tmp_path: Path) -> Config:
    return parse_config(config_text(tmp_path), source="test.toml")


def config_text(tmp_path: Path) -> str:
    return f"""
[daemon]
state_dir = "{tmp_path / 'state'}"
keys_dir = "{tmp_path / 'keys'}"
ssh_key_file = "{tmp_path / 'ssh' / 'id_ed25519'}"
control_socket = "{tmp_path / 'control.sock'}"

[[sources]]
name = "backup"
host = "backup.example.org"
user = "zbackupd"
host_key = "{HOST_KEY}"
[[sources.datasets]]
root = "tank/backups"

[[disks]]
label = "offsite-a"
serial = "S1"
pool_guid = "11856427362548921357"
pool_name = "zbackup"
"""


class KeyStore:
    """Hands out one master key, optionally only once ``release`` is set (a slow KDF)."""

    def __init__(self, master: MasterKey) -> None:
        self.master = master
        self.release = asyncio.Event()
        self.release.set()

    async def unlock(self, passphrase: bytearray) -> MasterKey:
        await self.release.wait()
        return self.master


class Watcher:
    def start(self) -> None: ...

    def stop(self) -> None: ...

    def begin_session(self, disk: Any) -> None: ...

    def end_session(self, disk: Any) -> None: ...


class StuckControl:
    """A control server whose close() never returns (Python >= 3.12 with an idle client)."""

    async def start(self) -> None: ...

    async def close(self) -> None:
        await asyncio.Event().wait()


class Control:
    async def start(self) -> None: ...

    async def close(self) -> None: ...


def make_daemon(tmp_path: Path, **extra: Any) -> tuple[Daemon, KeyStore, MasterKey]:
    cfg = config(tmp_path)
    master = MasterKey(SecretBytes(b"\x07" * MASTER_KEY_BYTES))
    with master.ssh_passphrase() as passphrase:
        generate_identity(cfg.daemon.ssh_key_file, passphrase)
    keystore = KeyStore(master)
    daemon = Daemon(
        cfg,
        zfs=None,  # type: ignore[arg-type]  # no session runs in these tests
        runner=None,  # type: ignore[arg-type]
        keystore=keystore,  # type: ignore[arg-type]  # a stand-in with the same unlock()
        store=StateStore(cfg.daemon.state_dir),
        notifier=NullNotifier(),
        **{"watcher_factory": lambda on_match: Watcher(), **extra},
    )
    return daemon, keystore, master


def wiped(master: MasterKey) -> bool:
    return "wiped" in repr(master)


async def test_keys_are_wiped_even_when_closing_the_control_socket_stalls(
    tmp_path: Path,
) -> None:
    daemon, _, master = make_daemon(tmp_path)
    run = asyncio.create_task(daemon.run(StuckControl()))
    await asyncio.sleep(0)
    await daemon.handle_unlock(SecretBytes(b"passphrase"))
    assert not wiped(master)
    daemon.stop()
    await asyncio.wait([run], timeout=0.5)
    try:
        assert wiped(master), "the master key outlived the stop while close() stalled"
    finally:
        run.cancel()


async def test_an_unlock_finishing_after_stop_does_not_keep_its_key(tmp_path: Path) -> None:
    daemon, keystore, master = make_daemon(tmp_path)
    keystore.release.clear()  # the KDF is still running when the stop comes
    run = asyncio.create_task(daemon.run(Control()))
    await asyncio.sleep(0)
    unlock = asyncio.create_task(daemon.handle_unlock(SecretBytes(b"passphrase")))
    await asyncio.sleep(0)
    daemon.stop()
    await asyncio.wait_for(run, BOUND)
    keystore.release.set()
    with pytest.raises(ZbackupdError, match="stopping"):
        await asyncio.wait_for(unlock, BOUND)
    assert wiped(master)

"""``systemctl reload zbackupd`` (SIGHUP): the new config takes effect without losing the
unlocked state; a bad new config is refused with the reason and the old one kept."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import structlog
from test_daemon_stop import Control, config_text, make_daemon

from zbackupd.config import load_config
from zbackupd.core.model import DiskIdentity
from zbackupd.keys.secret import SecretBytes
from zbackupd.service.daemon import restart_needed

SECOND_DISK = """
[[disks]]
label = "offsite-b"
serial = "S2"
pool_guid = "11856427362548921358"
pool_name = "zbackup"
"""


class RecordingWatcher:
    def __init__(self) -> None:
        self.known: list[tuple[DiskIdentity, ...]] = []

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def begin_session(self, disk: Any) -> None: ...

    def end_session(self, disk: Any) -> None: ...

    def set_known(self, known: tuple[DiskIdentity, ...]) -> None:
        self.known.append(known)


def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "zbackupd.toml"
    path.write_text(config_text(tmp_path))
    return path


async def test_sighup_reloads_the_config_and_keeps_the_daemon_unlocked(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    watcher = RecordingWatcher()
    daemon, _, master = make_daemon(tmp_path, watcher_factory=lambda on_match: watcher,
                                    config_loader=lambda: load_config(path))
    run = asyncio.create_task(daemon.run(Control()))
    await asyncio.sleep(0)
    await daemon.handle_unlock(SecretBytes(b"passphrase"))
    path.write_text(path.read_text() + SECOND_DISK)
    with structlog.testing.capture_logs() as logs:
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if len(daemon.config.disks) == 2:
                break
    assert [d.label for d in daemon.config.disks] == ["offsite-a", "offsite-b"]
    assert not daemon.status.locked
    assert [d.label for d in watcher.known[-1]] == ["offsite-a", "offsite-b"]
    assert any(e["event"].startswith("configuration reloaded") for e in logs)

    path.write_text(path.read_text().replace('label = "offsite-b"', 'label = "bad label"'))
    with structlog.testing.capture_logs() as logs:
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if logs:
                break
    [error] = [e for e in logs if e["log_level"] == "error"]
    assert error["event"].startswith("configuration reload refused, the running one stays:")
    assert "disks[1].label" in error["event"]
    assert [d.label for d in daemon.config.disks] == ["offsite-a", "offsite-b"]
    assert not daemon.status.locked
    daemon.stop()
    await asyncio.wait_for(run, 5)
    assert "wiped" in repr(master)


def test_keys_and_state_places_need_a_restart(tmp_path: Path) -> None:
    daemon, _, _ = make_daemon(tmp_path)
    old = daemon.config
    moved = old.model_copy(update={"daemon": old.daemon.model_copy(
        update={"keys_dir": Path("/elsewhere")})})
    assert restart_needed(old, moved) == ("daemon.keys_dir",)
    assert restart_needed(old, old) == ()

from __future__ import annotations

from pathlib import Path

import pytest

from zbackupd.config import load_config
from zbackupd.disk.udevrule import UnsafeSerial, udev_rule


def test_one_line_per_serial_sorted_and_deduplicated() -> None:
    text = udev_rule(["WD-2", "WD-1", "WD-2"])
    rules = [line for line in text.splitlines() if not line.startswith("#")]
    assert rules == [
        'ACTION=="add", SUBSYSTEM=="block", ENV{ID_SERIAL_SHORT}=="WD-1", '
        'ENV{ID_FS_TYPE}=="zfs_member", TAG+="systemd", ENV{SYSTEMD_WANTS}+="zbackupd.service"',
        'ACTION=="add", SUBSYSTEM=="block", ENV{ID_SERIAL_SHORT}=="WD-2", '
        'ENV{ID_FS_TYPE}=="zfs_member", TAG+="systemd", ENV{SYSTEMD_WANTS}+="zbackupd.service"',
    ]


@pytest.mark.parametrize("serial", ['a"b', "a*", "a?", "a b", "", "x\nRUN+=\"/bin/sh\""])
def test_serials_that_could_change_the_rule_are_refused(serial: str) -> None:
    with pytest.raises(UnsafeSerial):
        udev_rule([serial])


def test_shipped_example_is_what_the_example_config_generates() -> None:
    repo = Path(__file__).resolve().parents[2]
    config = load_config(repo / "docs/examples/full.toml")
    expected = udev_rule(disk.serial for disk in config.disks)
    assert (repo / "udev/90-zbackupd.rules.example").read_text() == expected

"""The device-mapper layer between a disk and its pool: names, tables and argv (pure), the
dmsetup sequences (scripted runner), and the session's use of it (map before import,
fall back without it, never unmap an imported pool). That re-pointing really revives a
SUSPENDED pool is the VM suite's business (test_faults)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from test_session_prune import session  # a Session that never reaches a disk

from zbackupd.disk.devmap import (
    DeviceMapper,
    DeviceMapperError,
    InvalidMappingName,
    linear_table,
    mapped_path,
    mapping_name,
    parse_sectors,
)
from zbackupd.server.prune import InUseRegistry
from zbackupd.service.pool import DiskPool, PowerSwitch
from zbackupd.zfs import argv as zargv
from zbackupd.zfs.facade import Zfs
from zbackupd.zfs.runner import CommandResult, CommandTimeout, Runner

DISK = "/dev/disk/by-id/usb-QEMU_QEMU_HARDDISK_ZBPULL01-0:0-part1"
TABLE = f"0 2093056 linear {DISK} 0"


class Scripted:
    """Answers argv by its first two words: (rc, stdout, stderr), None for a timeout,
    or an exception to raise. A list is consumed in order."""

    def __init__(self, answers: dict[str, object]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, ...]] = []

    async def run(
        self,
        argv: Sequence[str],
        *,
        stdin_secret: bytearray | None = None,
        stdin_fd: int | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> CommandResult:
        self.calls.append(tuple(argv))
        answer = self.answers[f"{argv[0]} {argv[1]}"]
        if isinstance(answer, list):
            answer = answer.pop(0)
        if answer is None:
            raise CommandTimeout(argv, timeout or 0.0)
        if isinstance(answer, BaseException):
            raise answer
        code, stdout, stderr = cast(tuple[int, str, str], answer)
        return CommandResult(tuple(argv), code, stdout.encode(), stderr)


OK = (0, "", "")
ABSENT = (1, "", "device-mapper: table ioctl on zbackupd-pulled failed: No such device or address")
SIZE = (0, "2093056\n", "")


# -- pure --------------------------------------------------------------------------------


def test_names_and_paths() -> None:
    assert mapping_name("offsite-a") == "zbackupd-offsite-a"
    assert mapped_path("zbackupd-offsite-a") == "/dev/mapper/zbackupd-offsite-a"
    with pytest.raises(InvalidMappingName):
        mapping_name("with space")
    with pytest.raises(InvalidMappingName):
        mapping_name("../x")


def test_the_table_covers_the_whole_device_and_refuses_nonsense() -> None:
    assert linear_table(2093056, DISK) == TABLE
    with pytest.raises(ValueError, match="positive"):
        linear_table(0, DISK)
    with pytest.raises(ValueError, match="absolute"):
        linear_table(8, "sda1")
    with pytest.raises(ValueError, match="absolute"):
        linear_table(8, "/dev/a b")


@pytest.mark.parametrize(("text", "sectors"), [("2093056\n", 2093056), (" 8 ", 8)])
def test_sizes_parse(text: str, sectors: int) -> None:
    assert parse_sectors(text) == sectors


@pytest.mark.parametrize("text", ["", "0", "-8", "12 sectors", "blockdev: cannot open"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_sectors(text)


# -- the dmsetup sequences ---------------------------------------------------------------


async def test_map_creates_a_linear_mapping_over_the_whole_device() -> None:
    runner = Scripted({"blockdev --getsz": SIZE, "dmsetup table": ABSENT, "dmsetup create": OK})
    path = await DeviceMapper(runner).map("zbackupd-pulled", DISK)
    assert path == "/dev/mapper/zbackupd-pulled"
    assert runner.calls == [
        ("blockdev", "--getsz", DISK),
        ("dmsetup", "table", "zbackupd-pulled"),
        ("dmsetup", "create", "zbackupd-pulled", "--table", TABLE),
    ]


async def test_a_mapping_left_by_a_killed_daemon_is_repointed_not_recreated() -> None:
    runner = Scripted({"blockdev --getsz": SIZE, "dmsetup table": (0, TABLE, ""),
                       "dmsetup suspend": OK, "dmsetup reload": OK, "dmsetup resume": OK})
    await DeviceMapper(runner).map("zbackupd-pulled", DISK)
    assert [call[:2] for call in runner.calls[1:]] == [
        ("dmsetup", "table"), ("dmsetup", "suspend"), ("dmsetup", "reload"),
        ("dmsetup", "resume"),
    ]


async def test_repoint_suspends_reloads_and_resumes() -> None:
    runner = Scripted({"blockdev --getsz": SIZE, "dmsetup table": (0, TABLE, ""),
                       "dmsetup suspend": OK, "dmsetup reload": OK, "dmsetup resume": OK})
    assert await DeviceMapper(runner).repoint_if_mapped("zbackupd-pulled", DISK)
    assert runner.calls[-3:] == [
        ("dmsetup", "suspend", "zbackupd-pulled"),
        ("dmsetup", "reload", "zbackupd-pulled", "--table", TABLE),
        ("dmsetup", "resume", "zbackupd-pulled"),
    ]


async def test_repoint_of_no_mapping_does_nothing() -> None:
    runner = Scripted({"dmsetup table": ABSENT})
    assert not await DeviceMapper(runner).repoint_if_mapped("zbackupd-pulled", DISK)
    assert runner.calls == [("dmsetup", "table", "zbackupd-pulled")]


async def test_a_failed_reload_still_resumes_and_says_what_failed() -> None:
    """I/O to a suspended mapping waits forever: the resume is never skipped."""
    runner = Scripted({"blockdev --getsz": SIZE, "dmsetup suspend": OK,
                       "dmsetup reload": (1, "", "device-mapper: reload ioctl failed: "
                                                 "Device or resource busy"),
                       "dmsetup resume": OK})
    with pytest.raises(DeviceMapperError) as caught:
        await DeviceMapper(runner).repoint("zbackupd-pulled", DISK)
    assert "loading the new table" in str(caught.value)
    assert "resource busy" in caught.value.detail
    assert runner.calls[-1] == ("dmsetup", "resume", "zbackupd-pulled")


async def test_unmap_removes_with_retry_and_tolerates_absence() -> None:
    present = Scripted({"dmsetup table": (0, TABLE, ""), "dmsetup remove": OK})
    await DeviceMapper(present).unmap("zbackupd-pulled")
    assert present.calls[-1] == ("dmsetup", "remove", "--retry", "zbackupd-pulled")
    absent = Scripted({"dmsetup table": ABSENT})
    await DeviceMapper(absent).unmap("zbackupd-pulled")
    assert absent.calls == [("dmsetup", "table", "zbackupd-pulled")]


@pytest.mark.parametrize(
    ("answer", "detail"),
    [
        (None, "did not finish"),
        (FileNotFoundError(2, "No such file or directory", "dmsetup"), "No such file"),
        ((1, "", "blockdev: cannot open /dev/x: No such file or directory"), "cannot open"),
    ],
    ids=["hung", "no dmsetup", "no device"],
)
async def test_failures_are_typed_transient_and_name_the_step(answer: object, detail: str
                                                              ) -> None:
    runner = Scripted({"blockdev --getsz": answer})
    with pytest.raises(DeviceMapperError) as caught:
        await DeviceMapper(runner, timeout=2.0).map("zbackupd-pulled", DISK)
    error = caught.value
    assert error.transient
    assert error.what == "reading the size"
    assert error.argv == ("blockdev", "--getsz", DISK)
    assert detail in str(error)


# -- the session's use of it -------------------------------------------------------------


class FakeMapper:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[tuple[str, ...]] = []

    async def map(self, name: str, device: str) -> str:
        self.calls.append(("map", name, device))
        if self.fail:
            raise DeviceMapperError("creating the mapping", ("dmsetup", "create"), "no dm_mod")
        return mapped_path(name)

    async def unmap(self, name: str) -> None:
        self.calls.append(("unmap", name))


def _pool(mapper: FakeMapper) -> DiskPool:
    run = session(InUseRegistry())
    return DiskPool(
        disk=run.disk,
        zfs=cast(Zfs, None),
        runner=cast(Runner, None),
        power=cast(PowerSwitch, None),
        import_device="/dev/disk/by-id/usb-x-part1",
        power_device="/dev/sdz",
        enter=lambda phase, message="": None,
        log=structlog.get_logger(),
        device_mapper=cast(DeviceMapper, mapper),
    )


async def test_the_pool_is_imported_from_the_mapping_and_unmapped_after_export() -> None:
    mapper = FakeMapper()
    pool = _pool(mapper)
    assert await pool.map_disk() == "/dev/mapper/zbackupd-offsite-a"
    pool.imported = True
    await pool.unmap()
    assert [c[0] for c in mapper.calls] == ["map"]
    pool.imported = False
    await pool.unmap()
    await pool.unmap()
    assert mapper.calls == [("map", "zbackupd-offsite-a", "/dev/disk/by-id/usb-x-part1"),
                            ("unmap", "zbackupd-offsite-a")]


async def test_without_device_mapper_the_disk_is_imported_directly_with_a_warning() -> None:
    mapper = FakeMapper(fail=True)
    pool = _pool(mapper)
    with structlog.testing.capture_logs() as logs:
        assert await pool.map_disk() == "/dev/disk/by-id/usb-x-part1"
    [warning] = [entry for entry in logs if entry["log_level"] == "warning"]
    assert "need a restart" in warning["event"]
    assert "no dm_mod" in warning["error"]
    await pool.unmap()
    assert [c[0] for c in mapper.calls] == ["map"]


@given(st.from_regex(r"[a-z0-9][a-z0-9_-]{0,31}", fullmatch=True))
def test_every_config_label_gives_a_mapping_zpool_import_accepts(label: str) -> None:
    """The config's label grammar → mapping name → path → ``zpool import -d``: no label
    the config accepts may fail at import time (it did once, in the VM)."""
    path = mapped_path(mapping_name(label))
    assert zargv.zpool_import(path, 7)[:4] == ("zpool", "import", "-d", path)

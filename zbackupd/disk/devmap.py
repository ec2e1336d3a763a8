"""A device-mapper layer between a backup disk and its pool, so that a disk pulled
mid-write and plugged in again can be put back under the pool without a restart.

Why: ZFS keeps the block device it opened. When a USB disk is pulled mid-write the pool
suspends on that dead device, and once it is SUSPENDED no ``zpool`` command makes the
vdev open the re-plugged disk: ``zpool reopen`` is refused while the pool is suspended,
and ``zpool clear`` reopens only a vdev already marked faulted or unwritable, which a
pulled disk's vdev is not. So the resumed writes fail again and the pool suspends again.

The pool is therefore imported from ``/dev/mapper/zbackupd-<label>``, a linear mapping
over the disk's by-id partition. That block device never goes away. When the disk comes
back (as a new ``sdX``), the mapping is re-pointed at it (suspend, reload, resume) and a
``zpool clear`` resumes the pool's I/O on the new device. Measured in the VM (session 3
of issue 4): pulled, SUSPENDED, re-plugged 94 s later, re-pointed, cleared: ONLINE, the
300 MiB write that was under way completed, no data errors.

Argv builders are pure; ``DeviceMapper`` runs them through the ``Runner`` seam.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol

from zbackupd.errors import CommandError, PermanentError, TransientError
from zbackupd.zfs.runner import CommandResult, CommandTimeout, Runner

#: Every mapping zbackupd makes is named ``zbackupd-<disk label>``.
NAME_PREFIX = "zbackupd-"
MAPPER_DIR = "/dev/mapper"
#: Each dmsetup call is bounded: a call stuck on a dead device is abandoned.
DMSETUP_TIMEOUT_SECONDS = 30.0

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,100}$")

Argv = tuple[str, ...]


class Logger(Protocol):
    """What ``repoint_disk`` needs of a structlog logger."""

    def info(self, event: str, **fields: Any) -> Any: ...
    def warning(self, event: str, **fields: Any) -> Any: ...


class DeviceMapperError(TransientError):
    """A dmsetup/blockdev call failed or hung; the facts are attached."""

    def __init__(self, what: str, argv: Sequence[str], detail: str) -> None:
        self.what = what
        self.argv = tuple(argv)
        self.detail = detail
        super().__init__(f"device-mapper: {what} failed ({' '.join(self.argv)}): {detail}")


class InvalidMappingName(PermanentError):
    def __init__(self, label: str) -> None:
        self.label = label
        super().__init__(f"disk label {label!r} cannot name a device-mapper device")


# -- names and argv (pure) -----------------------------------------------------------------


def mapping_name(label: str) -> str:
    """``zbackupd-<label>``; the config already restricts labels, this re-checks."""
    name = NAME_PREFIX + label
    if not _SAFE_NAME.match(name):
        raise InvalidMappingName(label)
    return name


def mapped_path(name: str) -> str:
    return f"{MAPPER_DIR}/{name}"


def linear_table(sectors: int, device: str) -> str:
    """One linear segment covering the whole ``device`` (sizes in 512-byte sectors)."""
    if sectors <= 0:
        raise ValueError(f"a mapping needs a positive size, got {sectors} sectors")
    if not device.startswith("/") or any(c.isspace() for c in device):
        raise ValueError(f"device must be an absolute path without spaces: {device!r}")
    return f"0 {sectors} linear {device} 0"


def size_argv(device: str) -> Argv:
    """``blockdev --getsz``: the device's size in 512-byte sectors."""
    return ("blockdev", "--getsz", device)


def create_argv(name: str, table: str) -> Argv:
    return ("dmsetup", "create", name, "--table", table)


def suspend_argv(name: str) -> Argv:
    return ("dmsetup", "suspend", name)


def reload_argv(name: str, table: str) -> Argv:
    return ("dmsetup", "reload", name, "--table", table)


def resume_argv(name: str) -> Argv:
    return ("dmsetup", "resume", name)


def remove_argv(name: str) -> Argv:
    """``--retry``: udev may still hold the node for a moment after an export."""
    return ("dmsetup", "remove", "--retry", name)


def table_argv(name: str) -> Argv:
    return ("dmsetup", "table", name)


def parse_sectors(text: str) -> int:
    """``blockdev --getsz`` prints one integer."""
    stripped = text.strip()
    if not stripped.isdigit() or int(stripped) <= 0:
        raise ValueError(f"not a size in sectors: {stripped!r}")
    return int(stripped)


# -- the shell ---------------------------------------------------------------------------


class DeviceMapper:
    """Creates, re-points and removes zbackupd's linear mappings."""

    def __init__(self, runner: Runner, *, timeout: float = DMSETUP_TIMEOUT_SECONDS) -> None:
        self._runner = runner
        self._timeout = timeout

    async def _run(self, what: str, argv: Argv, *, check: bool = True) -> CommandResult:
        """Run ``argv`` bounded; a hang, a missing program and (with ``check``) a non-zero
        exit all become a ``DeviceMapperError`` naming ``what`` was being done."""
        try:
            result = await self._runner.run(argv, timeout=self._timeout, check=False)
        except (CommandTimeout, CommandError, OSError) as error:  # OSError: not installed
            raise DeviceMapperError(what, argv, str(error)) from error
        if check and result.returncode != 0:
            raise DeviceMapperError(what, argv, result.stderr.strip() or
                                    f"exit code {result.returncode}")
        return result

    async def _table_for(self, device: str) -> str:
        result = await self._run("reading the size", size_argv(device))
        try:
            sectors = parse_sectors(result.text)
        except ValueError as error:
            raise DeviceMapperError("reading the size", size_argv(device), str(error)) from None
        return linear_table(sectors, device)

    async def exists(self, name: str) -> bool:
        result = await self._run("looking up the mapping", table_argv(name), check=False)
        return result.returncode == 0

    async def map(self, name: str, device: str) -> str:
        """Map ``device`` as ``/dev/mapper/<name>`` and return that path. A mapping left
        by an earlier run (the daemon was killed) is re-pointed instead."""
        table = await self._table_for(device)
        if await self.exists(name):
            await self._swap(name, table)
        else:
            await self._run("creating the mapping", create_argv(name, table))
        return mapped_path(name)

    async def repoint(self, name: str, device: str) -> None:
        """Point the existing mapping at ``device`` (the re-plugged disk). I/O waits while
        the mapping is suspended and goes to the new device after the resume."""
        await self._swap(name, await self._table_for(device))

    async def repoint_if_mapped(self, name: str, device: str) -> bool:
        """``repoint`` if the mapping exists (False: it does not, nothing done)."""
        if not await self.exists(name):
            return False
        await self.repoint(name, device)
        return True


    async def _swap(self, name: str, table: str) -> None:
        await self._run("suspending the mapping", suspend_argv(name))
        try:
            await self._run("loading the new table", reload_argv(name, table))
        finally:
            # Never leave it suspended: I/O to a suspended mapping waits forever.
            await self._run("resuming the mapping", resume_argv(name))

    async def unmap(self, name: str) -> None:
        """Remove the mapping (after the export); one that is not there is fine."""
        if not await self.exists(name):
            return
        await self._run("removing the mapping", remove_argv(name))


async def repoint_disk(mapper: DeviceMapper, label: str, device: str, log: Logger) -> bool:
    """The disk ``label`` is back as ``device``: point its mapping there, logging what
    happened; a failure is only a warning (the pool may then need a restart)."""
    try:
        mapped = await mapper.repoint_if_mapped(mapping_name(label), device)
    except DeviceMapperError as error:
        log.warning("re-pointing the mapping failed: the pool may need a restart",
                    disk_label=label, error=str(error))
        return False
    if mapped:
        log.info("mapping re-pointed at the re-plugged disk", disk_label=label, device=device)
    return mapped

"""The pool on one attached disk, from the device-mapper mapping to the power-off.

map → import (identity checked) → unlock → … → unload key → export → unmap → power off.
A pool still imported when its disk comes back (an earlier session lost the disk
mid-write) is revived in place: the mapping is pointed at the new device node, then
``zpool reopen`` and ``zpool clear``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from structlog.typing import FilteringBoundLogger

from zbackupd.config import Disk
from zbackupd.core.status import Phase
from zbackupd.disk.devmap import (
    DeviceMapper,
    DeviceMapperError,
    mapped_path,
    mapping_name,
    repoint_disk,
)
from zbackupd.disk.power import DiskGone, PoweredOff
from zbackupd.errors import PermanentError, ZbackupdError
from zbackupd.keys.secret import wipe
from zbackupd.zfs import argv as zargv
from zbackupd.zfs import names, parse
from zbackupd.zfs.facade import Zfs
from zbackupd.zfs.runner import CommandTimeout, Runner

#: How long ``zpool export`` is retried while the pool is busy (seconds, doubling).
EXPORT_BACKOFF = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
#: How long ``zpool reopen`` / ``zpool clear`` of a pool whose disk came back may take.
#: Both wait for the pool's stuck transaction group, so each can hang in the kernel.
REVIVE_TIMEOUT_SECONDS = 60.0
#: How long asking for the pool's health may take (``zpool list`` of a pool whose disk is
#: gone may hang in the kernel; a hang counts as suspended).
HEALTH_TIMEOUT_SECONDS = 30.0
#: The temporary name of every pool zbackupd imports starts with this.
TEMPORARY_NAME_PREFIX = "zbackupd-"


class PowerSwitch(Protocol):
    async def power_off(self, device: str) -> PoweredOff: ...


class EnterPhase(Protocol):
    """The session's reporting: a new phase with a message for the status line."""

    def __call__(self, phase: Phase, message: str = "") -> None: ...


class PoolIdentityMismatch(PermanentError):
    """The imported pool is not the configured one (name or GUID): refuse to touch it."""


class PoolImportedElsewhere(PermanentError):
    """The disk's pool is imported, but not by zbackupd (another name, or not through
    zbackupd's mapping): the admin's. Nothing is done to it."""

    def __init__(self, pool: str, vdevs: tuple[str, ...]) -> None:
        self.pool = pool
        self.vdevs = vdevs
        super().__init__(f"pool {pool} is imported by someone else: export it to let "
                         "zbackupd back up this disk")


class WrongDiskKey(PermanentError):
    """The pool refused our key: another installation's disk, or another passphrase."""


def temporary_pool_name(label: str) -> str:
    """``zbackupd-<label>``: the pool's name while zbackupd has it imported.

    Imported with ``zpool import -t`` (``argv.zpool_import``), the name lasts until the
    export and is never written to the disk, whose pool keeps its own name. One name per
    disk label, so two disks whose pools share a name (two ``backup`` pools) can be
    imported at once, and a pool under this name through zbackupd's mapping is zbackupd's.
    """
    return names.validate_pool_name(TEMPORARY_NAME_PREFIX + label)


def revive_steps(pool: str) -> tuple[zargv.Argv, ...]:
    """What brings back a pool whose disk was pulled mid-write and is plugged in again,
    once its device-mapper mapping points at the new device (``devmap``).

    Measured in the VM (OpenZFS 2.3.2, no ZED): after the pull the pool may stay ONLINE
    for a while, its sync thread retrying writes to the vanished device, then it turns
    SUSPENDED ("uncorrectable I/O failure"). While it is not suspended, ``zpool reopen``
    reopens the vdev and ``zpool clear`` resumes. Once SUSPENDED, ``reopen`` is refused
    (the ioctl checks for suspension) and ``clear`` reopens only a vdev already marked
    faulted or unwritable, which a pulled disk's is not: without the mapping the vdev
    stays on the dead block device and the pool suspends again at once. With it, the
    vdev's block device is the mapping, now over the new disk, and ``clear`` resumes the
    I/O there. So the steps do not depend on the pool's health (``clear`` alone would also
    leave ``zpool`` hanging while it logs its history on a still-suspended pool).
    """
    return (zargv.zpool_reopen(pool), zargv.zpool_clear(pool))


async def pool_health(runner: Runner, pool: str, *, timeout: float) -> parse.PoolHealth | None:
    """The pool's health, or None if asking fails or hangs (a pool whose disk was pulled
    may block ``zpool``): the facade's question, bounded and never raising."""
    try:
        return await Zfs(runner, timeout=timeout).pool_health(pool)
    except ZbackupdError:
        return None


@dataclass(frozen=True, slots=True)
class Revival:
    """What ``revive_pool`` found and what failed (empty: every step returned 0)."""

    health_before: parse.PoolHealth | None
    problems: tuple[str, ...]


async def revive_pool(runner: Runner, pool: str, *, timeout: float = REVIVE_TIMEOUT_SECONDS
                      ) -> Revival:
    """Bring a pool back whose disk was pulled and plugged in again; returns what failed.

    See ``revive_steps``. Each command is bounded (a command stuck in the kernel is
    abandoned, not waited for); failures are only reported, after the pool's health
    before the steps: the caller checks whether the session gets going again.
    """
    health = await pool_health(runner, pool, timeout=timeout)
    problems: list[str] = []
    for argv in revive_steps(pool):
        try:
            result = await runner.run(argv, timeout=timeout, check=False)
        except CommandTimeout as error:
            problems.append(str(error))
            continue
        if result.returncode != 0:
            problems.append(str(parse.classify_error(result.argv, result.returncode,
                                                     result.stderr)))
    return Revival(health, tuple(problems))


class DiskPool:
    """One disk's pool for the length of a session. ``imported`` is true exactly while
    zbackupd has the pool imported (and must export it)."""

    def __init__(
        self,
        *,
        disk: Disk,
        zfs: Zfs,
        runner: Runner,
        power: PowerSwitch,
        import_device: str,
        power_device: str,
        enter: EnterPhase,
        log: FilteringBoundLogger,
        device_mapper: DeviceMapper | None = None,
    ) -> None:
        self.disk = disk
        self.import_device = import_device
        self.power_device = power_device
        self._zfs = zfs
        self._runner = runner
        self._power = power
        self._enter = enter
        self._log = log
        #: The pool is imported from a device-mapper mapping over the disk (``devmap``):
        #: what lets a pool suspended by a pull go on after the re-plug. None: directly.
        self._device_mapper = device_mapper
        self._mapped = False
        self.imported = False
        #: Whether this session had the pool imported at some point (and exported it).
        self.was_imported = False
        #: The name the pool is imported under (``zpool import -t``, never written to the
        #: disk): what every command after the import uses.
        self.name = temporary_pool_name(disk.label)

    def replugged(self, *, import_device: str, power_device: str) -> None:
        """The disk came back under new device nodes: power off (and re-import) those."""
        self.import_device = import_device
        self.power_device = power_device

    async def _find_imported(self) -> parse.PoolRow | None:
        for row in await self._zfs.list_pools():
            if row.guid == self.disk.pool_guid:
                return row
        return None

    async def open(self) -> None:
        """Import the pool under its temporary name (or revive the one an earlier pull
        left imported), having checked that the disk's pool is the configured one."""
        self._enter(Phase.IMPORTING, f"pool {self.disk.pool_name} from {self.import_device}")
        row = await self._find_imported()
        if row is not None:
            await self._require_ours(row)
            row = await self._revive(row)
        if row is None:
            device = await self.map_disk()
            await self._check_name_on_disk(device)
            await self._zfs.import_pool(device, self.disk.pool_guid, temp_name=self.name)
            row = await self._find_imported()
        if row is None:
            raise PoolIdentityMismatch(
                f"pool GUID {self.disk.pool_guid} is not imported after `zpool import`"
            )
        self.imported = self.was_imported = True

    async def _require_ours(self, row: parse.PoolRow) -> None:
        """An imported pool is zbackupd's only if it has zbackupd's temporary name and
        sits on zbackupd's mapping over this disk (the disk itself without a
        device-mapper): left by a session whose disk was pulled, or by a killed daemon.
        Any other import is the admin's (or another tool's): refused, and left exactly
        as it is: no reopen, no clear, no key, no export, no mapping touched."""
        if self._device_mapper is not None:
            ours = mapped_path(mapping_name(self.disk.label))
        else:
            ours = self.import_device
        vdevs: tuple[str, ...] = ()
        if row.name == self.name:
            try:
                vdevs = await Zfs(self._runner, timeout=REVIVE_TIMEOUT_SECONDS
                                  ).pool_vdev_paths(row.name)
            except ZbackupdError as error:
                self._log.warning("cannot tell what the pool was imported from",
                                  pool=row.name, error=str(error))
            if ours in vdevs:
                return
        self._log.error("pool imported by someone else: not touched", pool=row.name,
                        vdevs=list(vdevs) or None, expected_name=self.name,
                        expected_vdev=ours)
        raise PoolImportedElsewhere(row.name, vdevs)

    async def _revive(self, row: parse.PoolRow) -> parse.PoolRow | None:
        """Still imported by zbackupd: an earlier session lost its disk mid-write (we
        import with cachefile=none and always export). Point its mapping at the
        re-plugged disk, reopen and clear, then go on from its state."""
        self._log.info("pool still imported from an earlier pull: reviving",
                       pool=row.name, health=row.health.value)
        await self.repoint_mapping()
        revival = await revive_pool(self._runner, row.name)
        problems = revival.problems
        found = await self._find_imported()
        self._log.info("pool revived" if found and found.health is parse.PoolHealth.ONLINE
                       else "pool not revived", problems=problems or None,
                       health=found.health.value if found else None)
        if found is not None and found.health is parse.PoolHealth.SUSPENDED:
            self.imported = self.was_imported = True  # ours, left for the next re-plug
            raise parse.PoolSuspended(zargv.zpool_reopen(row.name), 1, "; ".join(problems))
        return found

    async def _check_name_on_disk(self, device: str) -> None:
        """The pool on ``device`` must carry the configured GUID and name. Checked in the
        import listing, before importing: once imported under the temporary name, no
        ``zpool`` property shows the name written on the disk any more."""
        offered = await self._zfs.importable_pools(device)
        found = next((p for p in offered if p.guid == self.disk.pool_guid), None)
        if found is None:
            raise PoolIdentityMismatch(
                f"no pool with GUID {self.disk.pool_guid} offered for import on {device}"
                + (f" (found {', '.join(repr(p.name) for p in offered)})" if offered else "")
            )
        if found.name != self.disk.pool_name:
            raise PoolIdentityMismatch(
                f"pool with GUID {self.disk.pool_guid} is named {found.name!r}, "
                f"configured as {self.disk.pool_name!r}"
            )

    @property
    def as_imported(self) -> Disk:
        """The configured disk as its datasets are named while the pool is imported: the
        pool under its temporary name (target root included). Labels, sources and
        retention stay the configured ones."""
        root = self.name + self.disk.target_root[len(self.disk.pool_name):]
        return self.disk.model_copy(
            update={"pool_name": self.name, "explicit_target_root": root}
        )

    async def map_disk(self) -> str:
        """The device to import from: the disk's mapping, or the disk itself when there
        is no device-mapper (then a pull mid-write needs a restart to recover)."""
        if self._device_mapper is None:
            return self.import_device
        try:
            path = await self._device_mapper.map(mapping_name(self.disk.label),
                                                 self.import_device)
        except DeviceMapperError as error:
            self._log.warning("importing without a device-mapper layer: a disk pulled "
                              "mid-write will need a restart to finish", error=str(error))
            return self.import_device
        self._mapped = True
        return path

    async def repoint_mapping(self) -> None:
        """The disk is back under a new device node: point its mapping there."""
        if self._device_mapper is not None and await repoint_disk(
            self._device_mapper, self.disk.label, self.import_device, self._log
        ):
            self._mapped = True

    async def unmap(self) -> None:
        """Remove the mapping once the pool is exported (or was never imported)."""
        if self._device_mapper is None or not self._mapped or self.imported:
            return
        try:
            await self._device_mapper.unmap(mapping_name(self.disk.label))
        except DeviceMapperError as error:
            self._log.warning("device-mapper mapping not removed", error=str(error))
            return
        self._mapped = False

    async def unlock(self, pool_key: Callable[[], bytearray]) -> None:
        """Load the pool's key from memory (``pool_key`` makes a copy that is wiped)."""
        self._enter(Phase.UNLOCKING)
        pool = self.name
        status = await self._zfs.get_properties([pool], ["keystatus"])
        if status.get(pool, {}).get("keystatus") == "available":
            return
        key = pool_key()
        try:
            await self._zfs.load_key(pool, key)
        except parse.KeyIncorrect as error:
            raise WrongDiskKey(
                f"the key derived for disk {self.disk.label!r} does not open pool {pool}: "
                "this disk was set up by another installation or passphrase"
            ) from error
        finally:
            wipe(key)

    async def close(self) -> None:
        """Unload the key (if it is loaded) and export; a suspended pool (disk pulled) is
        left imported. Only the export can fail this: it also drops a loaded key."""
        pool = self.name
        await self.raise_if_suspended()
        self._enter(Phase.EXPORTING)
        await self._unload_key(pool)
        for delay in (*EXPORT_BACKOFF, None):
            try:
                await self._zfs.export_pool(pool)
            except parse.PoolBusy:
                if delay is None:
                    raise
                self._log.warning("pool busy, export retried", pool=pool, retry_in=delay)
                await asyncio.sleep(delay)
            else:
                self.imported = False
                return

    async def raise_if_suspended(self) -> None:
        """``PoolSuspended`` if the pool is suspended (its disk was pulled) or ``zpool
        list`` does not answer in time: every later command on it would hang, so the
        session ends here and waits for the re-plug. Bounded; a failed question (other
        than a hang) only warns: the next command tells."""
        argv = zargv.zpool_list([self.name])
        try:
            health = await Zfs(self._runner, timeout=HEALTH_TIMEOUT_SECONDS
                               ).pool_health(self.name)
        except CommandTimeout as error:
            raise parse.PoolSuspended(argv, 1, f"the pool does not answer: {error}") from error
        except ZbackupdError as error:
            self._log.warning("pool health unknown", pool=self.name, error=str(error))
            return
        if health is parse.PoolHealth.SUSPENDED:
            raise parse.PoolSuspended(argv, 1, "pool I/O is suspended")

    async def _unload_key(self, pool: str) -> None:
        """``zfs unload-key`` when ``keystatus`` says the key is loaded. Its error text is
        not relied on (a key that never loaded, as after a wrong key, answers "Key already
        unloaded", which is no typed error); a failure only warns: the export that follows
        takes the key out of the kernel with the pool."""
        try:
            status = await self._zfs.get_properties([pool], ["keystatus"])
        except ZbackupdError as error:
            self._log.warning("key status unknown before export", pool=pool, error=str(error))
            return
        if status.get(pool, {}).get("keystatus") != "available":
            return
        try:
            await self._zfs.unload_key(pool)
        except ZbackupdError as error:
            self._log.warning("key not unloaded before export (the export drops it)",
                              pool=pool, error=str(error))

    async def power_off(self) -> None:
        self._enter(Phase.POWERING_OFF)
        try:
            done = await self._power.power_off(self.power_device)
        except DiskGone:
            self._log.info("disk already gone: nothing to power off")
            return
        self._log.info("disk powered off", method=str(done.method), written=str(done.written))

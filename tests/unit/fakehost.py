"""A scripted machine for the pool's life: ``zpool``/``zfs`` answer from the state of a few
pools, with the messages and exit codes OpenZFS 2.3.2 prints (tests/data/zfs-output), and
a device-mapper and a power switch that remember what was done to them.

Only what ``DiskPool`` and ``Session`` issue is understood; anything else is an error, so
a test notices a command it did not expect.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from zbackupd.disk.devmap import mapped_path
from zbackupd.disk.power import PoweredOff, PowerOffMethod
from zbackupd.errors import CommandError, ZbackupdError
from zbackupd.zfs.runner import CommandResult, CommandTimeout

Answer = tuple[int, str, str]  # return code, stdout, stderr


@dataclass
class FakePool:
    guid: int
    name: str  # the name on disk
    key: bytes
    imported_as: str | None = None
    vdev: str = ""
    health: str = "ONLINE"
    key_loaded: bool = False


@dataclass
class FakeHost:
    """A ``Runner``. ``fail`` answers a command ("zpool export") with a fixed result, None
    for a hang; ``meet_at_load_key`` makes each ``zfs load-key`` wait (briefly) until that
    many pools are imported, so that concurrent sessions really overlap."""

    pools: list[FakePool]
    fail: dict[str, Answer | None] = field(default_factory=dict)
    meet_at_load_key: int = 0
    calls: list[tuple[str, ...]] = field(default_factory=list)

    def pool(self, guid: int) -> FakePool:
        return next(p for p in self.pools if p.guid == guid)

    def imported(self) -> dict[str, FakePool]:
        return {p.imported_as: p for p in self.pools if p.imported_as is not None}

    def commands(self) -> list[str]:
        """``"zpool import"``, ``"zfs load-key"``, … in the order they ran."""
        return [" ".join(argv[:2]) for argv in self.calls]

    async def run(
        self,
        argv: Sequence[str],
        *,
        stdin_secret: bytearray | None = None,
        stdin_fd: int | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> CommandResult:
        argv = tuple(argv)
        self.calls.append(argv)
        await asyncio.sleep(0)  # let concurrent sessions interleave
        command = " ".join(argv[:2])
        if command in self.fail:
            answer = self.fail[command]
            if answer is None:
                raise CommandTimeout(argv, timeout or 0.0)
        else:
            answer = await self._answer(argv, stdin_secret)
        code, stdout, stderr = answer
        if check and code != 0:
            raise CommandError(argv, code, stderr)
        return CommandResult(argv, code, stdout.encode(), stderr)

    async def _answer(self, argv: tuple[str, ...], secret: bytearray | None) -> Answer:
        handlers = {
            "zpool list": self._zpool_list,
            "zpool import": self._zpool_import,
            "zpool status": self._zpool_status,
            "zpool export": self._zpool_export,
            "zpool reopen": self._zpool_ok,
            "zpool clear": self._zpool_ok,
            "zfs get": self._zfs_get,
            "zfs unload-key": self._zfs_unload_key,
        }
        command = " ".join(argv[:2])
        if command == "zfs load-key":
            return await self._zfs_load_key(argv, secret)
        if command not in handlers:
            raise AssertionError(f"unexpected command {argv}")
        return handlers[command](argv)

    def _by_imported_name(self, name: str) -> FakePool | None:
        return self.imported().get(name)

    def _zpool_list(self, argv: tuple[str, ...]) -> Answer:
        wanted = argv[6:]
        rows = []
        for name, pool in sorted(self.imported().items()):
            if not wanted or name in wanted:
                rows.append(f"{name}\t{pool.guid}\t{pool.health}\n")
        for name in wanted:
            if name not in self.imported():
                return 1, "", f"cannot open '{name}': no such pool\n"
        return 0, "".join(rows), ""

    def _zpool_import(self, argv: tuple[str, ...]) -> Answer:
        device = argv[argv.index("-d") + 1]
        offered = [p for p in self.pools if p.imported_as is None]
        if len(argv) == 4:  # zpool import -d <device>: the listing
            if not offered:
                return 1, "", "no pools available to import\n"
            return 0, "".join(import_block(p) for p in offered), ""
        temporary = "-t" in argv
        guid, *rename = argv[argv.index("cachefile=none") + 1:]
        if guid == "-t":
            guid, *rename = rename
        pool = next((p for p in offered if str(p.guid) == guid), None)
        if pool is None:
            return 1, "", f"cannot import '{guid}': no such pool available\n"
        name = rename[0] if rename else pool.name
        if name in self.imported():
            return 1, "", (f"cannot import '{pool.name}': a pool with that name already "
                           "exists\nuse the form 'zpool import <pool | id> <newpool>' to give "
                           "it a new name\n")
        if rename and not temporary:
            pool.name = name  # a rename without -t is written to the disk
        pool.imported_as, pool.vdev, pool.key_loaded = name, device, False
        return 0, "", ""

    def _zpool_status(self, argv: tuple[str, ...]) -> Answer:
        pool = self._by_imported_name(argv[-1])
        if pool is None:
            return 1, "", f"cannot open '{argv[-1]}': no such pool\n"
        return 0, (f"  pool: {argv[-1]}\n state: {pool.health}\nconfig:\n\n"
                   "\tNAME  STATE     READ WRITE CKSUM\n"
                   f"\t{argv[-1]}  ONLINE       0     0     0\n"
                   f"\t  {pool.vdev}  ONLINE       0     0     0\n\n"
                   "errors: No known data errors\n"), ""

    def _zpool_export(self, argv: tuple[str, ...]) -> Answer:
        pool = self._by_imported_name(argv[-1])
        if pool is None:
            return 1, "", f"cannot open '{argv[-1]}': no such pool\n"
        if pool.health == "SUSPENDED":
            return 1, "", ""  # as seen: exit 1, nothing printed
        pool.imported_as, pool.vdev, pool.key_loaded = None, "", False
        return 0, "", ""

    def _zpool_ok(self, argv: tuple[str, ...]) -> Answer:
        if self._by_imported_name(argv[-1]) is None:
            return 1, "", f"cannot open '{argv[-1]}': no such pool\n"
        return 0, "", ""

    def _zfs_get(self, argv: tuple[str, ...]) -> Answer:
        name = argv[-1]
        pool = self._by_imported_name(name)
        if pool is None or argv[-2] != "keystatus":
            return 1, "", f"cannot open '{name}': dataset does not exist\n"
        status = "available" if pool.key_loaded else "unavailable"
        return 0, f"{name}\tkeystatus\t{status}\n", ""

    async def _zfs_load_key(self, argv: tuple[str, ...], secret: bytearray | None) -> Answer:
        name = argv[-1]
        pool = self._by_imported_name(name)
        if pool is None:
            return 1, "", f"cannot open '{name}': dataset does not exist\n"
        if self.meet_at_load_key:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    while len(self.imported()) < self.meet_at_load_key:
                        await asyncio.sleep(0.01)
        if secret is None or bytes(secret) != pool.key:
            return 255, "", f"Key load error: Incorrect key provided for '{name}'.\n"
        pool.key_loaded = True
        return 0, "", ""

    def _zfs_unload_key(self, argv: tuple[str, ...]) -> Answer:
        name = argv[-1]
        pool = self._by_imported_name(name)
        if pool is None:
            return 1, "", f"cannot open '{name}': dataset does not exist\n"
        if not pool.key_loaded:
            return 255, "", f"Key unload error: Key already unloaded for '{name}'.\n"
        pool.key_loaded = False
        return 0, "", ""


def import_block(pool: FakePool) -> str:
    """One pool in the ``zpool import -d`` listing (as in zpool-import-list.stdout)."""
    return (f"  pool: {pool.name}\n    id: {pool.guid}\n state: ONLINE\n"
            "action: The pool can be imported using its name or numeric identifier.\n"
            f"config:\n\n\t{pool.name}  ONLINE\n\t  some-disk  ONLINE\n")


@dataclass
class FakeMapper:
    """zbackupd's device-mapper, as a set of mapping names."""

    mappings: dict[str, str] = field(default_factory=dict)
    calls: list[tuple[str, ...]] = field(default_factory=list)

    async def map(self, name: str, device: str) -> str:
        self.calls.append(("map", name, device))
        self.mappings[name] = device
        return mapped_path(name)

    async def exists(self, name: str) -> bool:
        return name in self.mappings

    async def repoint_if_mapped(self, name: str, device: str) -> bool:
        self.calls.append(("repoint", name, device))
        if name not in self.mappings:
            return False
        self.mappings[name] = device
        return True

    async def unmap(self, name: str) -> None:
        self.calls.append(("unmap", name))
        self.mappings.pop(name, None)


@dataclass
class FakePower:
    """Powers off (records the device) or raises ``error``."""

    error: ZbackupdError | None = None
    devices: list[str] = field(default_factory=list)

    async def power_off(self, device: str) -> PoweredOff:
        if self.error is not None:
            raise self.error
        self.devices.append(device)
        return PoweredOff(device, (device,), PowerOffMethod.USB_REMOVE, Path("/sys/remove"))

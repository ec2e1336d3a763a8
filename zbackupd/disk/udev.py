"""Which plugged-in disk is ours: udev events → typed matches (design.md §5, §6).

Pure: :class:`DiskEvent` (one udev property set), :func:`match_disk` (is it a configured
disk, an impostor, or none of our business) and :class:`DiskTracker` (per-device state:
dedupes coldplug + hotplug, ignores the ``change`` events our own import/export causes).
The shell, ``udevwatch.py``'s :class:`UdevWatcher`, feeds it from a udev netlink monitor
on the asyncio loop.

Identity rule: the serial only *selects* a candidate; the pool GUID (the zfs_member
partition's ``ID_FS_UUID``, decimal) *is* the identity, because USB bridges lie about
serials. A disk is only a :class:`Candidate` when both match the same configured disk.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from zbackupd.core.model import DiskIdentity
from zbackupd.errors import PermanentError

BY_ID_DIR = "/dev/disk/by-id/"
# Stable links zbackupd imports with (`zpool import -d <link>`): they survive a re-plug
# that brings the disk back as a new /dev/sdX, which `zpool clear` of a suspended pool needs.
_PREFERRED_BY_ID_PREFIXES = ("usb-", "ata-")
ZFS_MEMBER = "zfs_member"
COLDPLUG_ACTION = "add"


class UdevEventMalformed(PermanentError):
    """A udev property set without the fields every block event has (``DEVPATH``)."""

    def __init__(self, missing: str, keys: Iterable[str]) -> None:
        self.missing = missing
        self.keys = tuple(sorted(keys))
        super().__init__(f"udev event without {missing} (keys: {', '.join(self.keys)})")


def _optional(props: Mapping[str, str], key: str) -> str | None:
    value = props.get(key, "").strip()
    return value or None


def choose_by_id_link(devlinks: str | None) -> str | None:
    """The ``/dev/disk/by-id/`` link to import with: ``usb-``/``ata-`` first, then any other.

    Among equals the shortest, then alphabetical, so the choice is stable across events.
    """
    if not devlinks:
        return None
    by_id = [link for link in devlinks.split() if link.startswith(BY_ID_DIR)]
    if not by_id:
        return None

    def rank(link: str) -> tuple[int, int, str]:
        name = link[len(BY_ID_DIR) :]
        preferred = any(name.startswith(prefix) for prefix in _PREFERRED_BY_ID_PREFIXES)
        return (0 if preferred else 1, len(link), link)

    return min(by_id, key=rank)


@dataclass(frozen=True, slots=True)
class DiskEvent:
    """The facts of one udev block event that zbackupd decides on."""

    action: str  # add / remove / change / …; a coldplugged device is an "add"
    device_path: str  # DEVPATH under /sys: the dedupe key (a re-plug gets a new one)
    device_node: str | None  # DEVNAME, e.g. /dev/sdc1 — changes when the disk comes back
    devtype: str | None  # "disk" or "partition"
    serial: str | None  # ID_SERIAL_SHORT (partitions carry their disk's)
    fs_type: str | None  # ID_FS_TYPE: "zfs_member" on a pool's partition
    fs_uuid: str | None  # ID_FS_UUID: the pool GUID in decimal on a zfs_member
    fs_label: str | None  # ID_FS_LABEL: the pool name on a zfs_member
    bus: str | None  # ID_BUS: "usb", "ata", "scsi", …
    by_id_link: str | None  # preferred /dev/disk/by-id/… link from DEVLINKS
    coldplug: bool = False
    dm_name: str | None = None  # DM_NAME: a device-mapper device (zbackupd's own mapping…)

    @classmethod
    def from_properties(cls, props: Mapping[str, str], *, coldplug: bool = False) -> DiskEvent:
        """Build from udev properties; enumerated (coldplug) devices have no ACTION."""
        device_path = _optional(props, "DEVPATH")
        if device_path is None:
            raise UdevEventMalformed("DEVPATH", props.keys())
        action = COLDPLUG_ACTION if coldplug else (_optional(props, "ACTION") or COLDPLUG_ACTION)
        return cls(
            action=action,
            device_path=device_path,
            device_node=_optional(props, "DEVNAME"),
            devtype=_optional(props, "DEVTYPE"),
            serial=_optional(props, "ID_SERIAL_SHORT"),
            fs_type=_optional(props, "ID_FS_TYPE"),
            fs_uuid=_optional(props, "ID_FS_UUID"),
            fs_label=_optional(props, "ID_FS_LABEL"),
            bus=_optional(props, "ID_BUS"),
            by_id_link=choose_by_id_link(_optional(props, "DEVLINKS")),
            coldplug=coldplug,
            dm_name=_optional(props, "DM_NAME"),
        )

    @property
    def is_zfs_member(self) -> bool:
        return self.fs_type == ZFS_MEMBER

    @property
    def pool_guid(self) -> int | None:
        """``ID_FS_UUID`` as the pool GUID, or None when absent or not a decimal number."""
        if self.fs_uuid is None or not self.fs_uuid.isdecimal():
            return None
        return int(self.fs_uuid)

    @property
    def import_path(self) -> str | None:
        """What to pass to ``zpool import -d``: the by-id link, else the device node."""
        return self.by_id_link or self.device_node


@dataclass(frozen=True, slots=True)
class NotOurs:
    """No configured serial or pool GUID, or not a zfs_member partition: ignore."""

    event: DiskEvent


@dataclass(frozen=True, slots=True)
class Candidate:
    """Serial and pool GUID both match one configured disk: go."""

    identity: DiskIdentity
    event: DiskEvent


@dataclass(frozen=True, slots=True)
class Impostor:
    """A configured serial carrying a pool that is not that disk's: refuse and report.

    ``seen_guid`` is None when the partition's ``ID_FS_UUID`` is not a readable GUID.
    """

    identity: DiskIdentity
    seen_guid: int | None
    event: DiskEvent

    def describe(self) -> str:
        seen = "an unreadable pool GUID" if self.seen_guid is None else f"pool {self.seen_guid}"
        return (
            f"refusing disk with serial {self.identity.serial} ({self.identity.label}): "
            f"it carries {seen}, expected pool {self.identity.pool_guid}"
        )


@dataclass(frozen=True, slots=True)
class SerialMismatch:
    """A configured pool GUID under a serial that is not that disk's configured one.

    The GUID says it is our disk, but §6 asks for serial AND GUID: refuse and tell the
    admin (a different USB bridge/enclosure reports another serial; update the config).
    This also wins over :class:`Impostor` when the serial belongs to another configured
    disk: the GUID is the identity, so the report names the disk the pool belongs to.
    """

    identity: DiskIdentity
    seen_serial: str | None
    event: DiskEvent

    def describe(self) -> str:
        return (
            f"refusing disk {self.identity.label}: pool {self.identity.pool_guid} found under "
            f"serial {self.seen_serial or '(none)'}, expected {self.identity.serial}"
        )


@dataclass(frozen=True, slots=True)
class Removed:
    """A device of a disk we had reported went away."""

    identity: DiskIdentity
    event: DiskEvent


Match = NotOurs | Candidate | Impostor | SerialMismatch | Removed


def _classify_present(event: DiskEvent, known: Sequence[DiskIdentity]) -> Match:
    # A device-mapper device is never a disk: it is zbackupd's own mapping over a disk it
    # imports (``devmap``), whose creation and removal must not read as a plug or a pull.
    if not event.is_zfs_member or event.dm_name is not None:
        return NotOurs(event)
    seen_guid = event.pool_guid
    by_guid = next((d for d in known if seen_guid is not None and d.pool_guid == seen_guid), None)
    by_serial = next((d for d in known if event.serial is not None and d.serial == event.serial),
                     None)
    if by_guid is not None:
        if by_guid.serial == event.serial:
            return Candidate(by_guid, event)
        return SerialMismatch(by_guid, event.serial, event)
    if by_serial is not None:
        return Impostor(by_serial, seen_guid, event)
    return NotOurs(event)


def match_disk(event: DiskEvent, known: Sequence[DiskIdentity]) -> Match:
    """Decide what a udev event means for zbackupd, by its properties alone.

    Only zfs_member devices count (the whole-disk node and other partitions carry the
    serial too, but not the pool). A ``remove`` of such a device is :class:`Removed` for the
    disk its GUID (else its serial) names; :class:`DiskTracker` also knows removals by path.
    """
    present = _classify_present(event, known)
    if event.action != "remove":
        return present
    if isinstance(present, NotOurs):
        return present
    return Removed(present.identity, event)


class DiskTracker:
    """Per-device state: what was already reported, and which disks are in a session.

    Rules: an ``add`` (coldplug or hotplug) of a device path already reported is a
    duplicate; a ``change`` is ignored while its disk has a session (our own import/export
    causes them) and otherwise only reported if it changes what the device is (first
    appearance of the pool label, or a different pool); a ``remove`` forgets the path, so a
    re-plug is a new ``add`` — also during a session, which needs it to clear a suspended pool.
    """

    def __init__(self, known: Sequence[DiskIdentity]) -> None:
        self._known = tuple(known)
        self._reported: dict[str, Match] = {}  # device path → what we reported for it
        self._in_session: set[DiskIdentity] = set()

    @property
    def known(self) -> tuple[DiskIdentity, ...]:
        return self._known

    def set_known(self, known: Sequence[DiskIdentity]) -> None:
        self._known = tuple(known)

    def begin_session(self, disk: DiskIdentity) -> None:
        self._in_session.add(disk)

    def end_session(self, disk: DiskIdentity) -> None:
        self._in_session.discard(disk)

    def in_session(self, disk: DiskIdentity) -> bool:
        return disk in self._in_session

    def reported_paths(self) -> frozenset[str]:
        return frozenset(self._reported)

    def observe(self, event: DiskEvent) -> Match | None:
        """Feed one event; return what to report, or None if it is nothing new."""
        if event.action == "add":
            return self._on_add(event)
        if event.action == "change":
            return self._on_change(event)
        if event.action == "remove":
            return self._on_remove(event)
        return None  # bind/unbind/move/online/offline: not about the pool on the disk

    def resync(self, present: Iterable[DiskEvent]) -> list[Match]:
        """After lost events (ENOBUFS): a full enumeration replaces what we believed.

        Reported paths missing from ``present`` are reported removed; new ones as adds.
        """
        present_events = list(present)
        present_paths = {event.device_path for event in present_events}
        results: list[Match] = []
        for path in sorted(set(self._reported) - present_paths):
            gone = self._reported.pop(path)
            if not isinstance(gone, NotOurs | Removed):
                results.append(Removed(gone.identity, gone.event))
        for event in present_events:
            result = self._on_add(event)
            if result is not None:
                results.append(result)
        return results

    def _on_add(self, event: DiskEvent) -> Match | None:
        if event.device_path in self._reported:
            return None
        result = match_disk(event, self._known)
        if isinstance(result, NotOurs | Removed):
            return None
        self._reported[event.device_path] = result
        return result

    def _on_change(self, event: DiskEvent) -> Match | None:
        result = match_disk(event, self._known)
        previous = self._reported.get(event.device_path)
        disks = {m.identity for m in (result, previous) if isinstance(m, _WITH_IDENTITY)}
        if any(disk in self._in_session for disk in disks):
            return None
        if isinstance(result, NotOurs | Removed):
            return None
        if previous is not None and _same_verdict(previous, result):
            return None
        self._reported[event.device_path] = result
        return result

    def _on_remove(self, event: DiskEvent) -> Match | None:
        previous = self._reported.pop(event.device_path, None)
        if previous is None or isinstance(previous, NotOurs | Removed):
            return None
        return Removed(previous.identity, event)


_WITH_IDENTITY = (Candidate, Impostor, SerialMismatch, Removed)


def _same_verdict(a: Match, b: Match) -> bool:
    """Same kind about the same disk and pool; other event details do not matter."""
    if type(a) is not type(b):
        return False
    if isinstance(a, NotOurs) or isinstance(b, NotOurs):
        return True
    return a.identity == b.identity and a.event.pool_guid == b.event.pool_guid

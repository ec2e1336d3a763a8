"""``Zfs``: one async method per ZFS operation on THIS machine (the disk side).

Each method is builder (``argv.py``) → ``Runner`` → parser (``parse.py``); failures
become typed errors through ``parse.classify_error``. The runner is a constructor
argument: tests pass a recording fake, the daemon a ``LocalRunner``. Remote zfs
(over SSH, ``remote.py``) reuses the same builders and parsers, not this class.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from zbackupd.core.model import Bookmark, DatasetState, Hold, Snapshot
from zbackupd.zfs import argv as zargv
from zbackupd.zfs import names, parse
from zbackupd.zfs.runner import CommandResult, Runner


class Zfs:
    """Local ``zfs``/``zpool`` operations with typed results and typed errors."""

    def __init__(self, runner: Runner, *, timeout: float | None = None) -> None:
        self._runner = runner
        self._timeout = timeout

    async def _run(
        self, argv: Sequence[str], *, stdin_secret: bytearray | None = None
    ) -> CommandResult:
        result = await self._runner.run(
            argv, stdin_secret=stdin_secret, timeout=self._timeout, check=False
        )
        if result.returncode != 0:
            raise parse.classify_error(result.argv, result.returncode, result.stderr)
        return result

    # -- reading -----------------------------------------------------------------------

    async def list_snapshots(
        self, datasets: Iterable[str], *, recursive: bool = False
    ) -> tuple[Snapshot, ...]:
        """Snapshots of ``datasets`` in createtxg order."""
        result = await self._run(zargv.list_snapshots(datasets, recursive=recursive))
        return parse.parse_snapshots(result.text)

    async def list_bookmarks(
        self, datasets: Iterable[str], *, recursive: bool = False
    ) -> tuple[Bookmark, ...]:
        """Bookmarks of ``datasets`` in createtxg order."""
        result = await self._run(zargv.list_bookmarks(datasets, recursive=recursive))
        return parse.parse_bookmarks(result.text)

    async def list_datasets(self, roots: Iterable[str]) -> tuple[parse.DatasetRow, ...]:
        """Every filesystem/volume under ``roots`` with its encryption."""
        result = await self._run(zargv.list_datasets(roots))
        return parse.parse_datasets(result.text)

    async def holds(self, snapshots: Iterable[str]) -> tuple[Hold, ...]:
        """User holds on ``snapshots``."""
        result = await self._run(zargv.holds(snapshots))
        return parse.parse_holds(result.text)

    async def get_properties(
        self, datasets: Iterable[str], properties: Iterable[str]
    ) -> dict[str, dict[str, str]]:
        """{dataset: {property: value}} for the asked properties."""
        result = await self._run(zargv.get_properties(datasets, properties))
        return parse.parse_properties(result.text)

    async def available_bytes(self, dataset: str) -> int:
        """``zfs get -H -p available``: the bytes ``dataset`` can still take (a pool's
        root dataset: the pool's free space)."""
        props = await self.get_properties([dataset], ["available"])
        value = props.get(dataset, {}).get("available", "")
        if not value.isdigit():
            raise parse.ParseError("property listing", f"{dataset}\tavailable\t{value}",
                                   "available is not a byte count")
        return int(value)

    async def dataset_state(self, dataset: str) -> DatasetState:
        """What the planner needs about one target dataset: snapshots, bookmarks, the
        resume token and bytes written since the last snapshot.

        Raises ``DatasetNotFound`` when it does not exist yet (a first, full transfer).
        """
        props = (await self.get_properties([dataset], ["receive_resume_token", "written"]))[dataset]
        listing = await self._run(zargv.list_snapshots_and_bookmarks([dataset]))
        snapshots, bookmarks = parse.parse_versions(listing.text)
        written = props.get("written", "0")
        return DatasetState(
            name=dataset,
            snapshots=snapshots,
            bookmarks=bookmarks,
            receive_resume_token=parse.resume_token(props.get("receive_resume_token")),
            written_since_last_snapshot=int(written) if written.isdigit() else 0,
        )

    # -- changing snapshots ------------------------------------------------------------

    async def snapshot(self, snapshots: Iterable[str], *, recursive: bool = False) -> None:
        """Create ``snapshots`` atomically."""
        await self._run(zargv.snapshot(snapshots, recursive=recursive))

    async def hold(self, tag: str, snapshots: Iterable[str]) -> None:
        """Place hold ``tag`` on ``snapshots``."""
        await self._run(zargv.hold(tag, snapshots))

    async def release(self, tag: str, snapshots: Iterable[str]) -> None:
        """Release hold ``tag`` from ``snapshots``."""
        await self._run(zargv.release(tag, snapshots))

    async def bookmark(self, snapshot: str, bookmark: str) -> None:
        """Bookmark ``snapshot`` as ``bookmark``."""
        await self._run(zargv.bookmark(snapshot, bookmark))

    async def destroy_snapshots(self, dataset: str, short_names: Iterable[str]) -> None:
        """Destroy the named snapshots of one dataset in one call (never recursive)."""
        await self._run(zargv.destroy_snapshots(dataset, short_names))

    async def destroy_bookmark(self, bookmark: str) -> None:
        """Destroy one bookmark."""
        await self._run(zargv.destroy_bookmark(bookmark))

    async def create_placeholder(self, dataset: str) -> None:
        """Make sure ``dataset`` and its ancestors below the pool exist, as unmountable
        placeholders (``receive`` needs the target's parent). Existing ones are kept."""
        parts = names.validate_dataset_name(dataset).split("/")
        for depth in range(2, len(parts) + 1):
            try:
                await self._run(zargv.create_placeholder("/".join(parts[:depth])))
            except parse.DatasetExists:
                continue

    async def receive_abort(self, target: str) -> None:
        """Discard a partial receive on ``target`` (``zfs receive -A``)."""
        await self._run(zargv.receive_abort(target))

    # -- pools ---------------------------------------------------------------------------

    async def import_pool(
        self, device: str, pool_guid: int, *, temp_name: str | None = None
    ) -> None:
        """Import the pool with ``pool_guid`` from a by-id partition, mounting nothing."""
        await self._run(zargv.zpool_import(device, pool_guid, temp_name=temp_name))

    async def importable_pools(self, device: str) -> tuple[parse.ImportablePool, ...]:
        """The pools ``zpool import -d <device>`` offers, with their on-disk names (none
        offered: an empty tuple, although zpool then exits 1)."""
        result = await self._runner.run(
            zargv.zpool_import_listing(device), timeout=self._timeout, check=False
        )
        if result.returncode != 0:
            if "no pools available to import" in result.stderr:
                return ()
            raise parse.classify_error(result.argv, result.returncode, result.stderr)
        return parse.parse_import_listing(result.text)

    async def pool_vdev_paths(self, pool: str) -> tuple[str, ...]:
        """The device paths of ``pool``'s vdevs (``zpool status -P``): what it was
        imported from."""
        result = await self._run(zargv.zpool_status_paths(pool))
        return parse.parse_vdev_paths(result.text)

    async def create_pool(
        self, pool: str, device: str, key: bytearray, *, force: bool = False
    ) -> None:
        """Create an encrypted backup pool on a whole disk; ``key`` goes on stdin only."""
        await self._run(zargv.zpool_create(pool, device, force=force), stdin_secret=key)

    async def export_pool(self, pool: str) -> None:
        """Export ``pool`` (``PoolSuspended`` when its disk was pulled mid-write)."""
        await self._run(zargv.zpool_export(pool))

    async def clear_pool(self, pool: str) -> None:
        """``zpool clear``: let a suspended pool resume once its disk is back."""
        await self._run(zargv.zpool_clear(pool))

    async def list_pools(self, pools: Iterable[str] = ()) -> tuple[parse.PoolRow, ...]:
        """Imported pools (all, or the named ones) with GUID and health."""
        result = await self._run(zargv.zpool_list(pools))
        return parse.parse_pool_list(result.text)

    async def pool_health(self, pool: str) -> parse.PoolHealth:
        """The health of one imported pool (``PoolNotFound`` if it is not imported)."""
        rows = await self.list_pools([pool])
        for row in rows:
            if row.name == pool:
                return row.health
        raise parse.ParseError("pool listing", "", f"pool {pool!r} missing from its own listing")

    async def pool_properties(self, pool: str, properties: Iterable[str]) -> dict[str, str]:
        """{property: value} of one pool."""
        result = await self._run(zargv.zpool_get(pool, properties))
        return parse.parse_properties(result.text).get(pool, {})

    # -- keys ----------------------------------------------------------------------------

    async def load_key(
        self, encryption_root: str, key: bytearray, *, check_only: bool = False
    ) -> None:
        """Load (or with ``check_only`` just verify) the key of ``encryption_root``.

        The key goes to ``zfs load-key -L prompt`` on stdin, never argv or the
        environment. For keyformat=raw it must be exactly 32 bytes, no newline. The
        caller owns ``key`` and zeroes it; this method keeps no copy.
        """
        await self._run(zargv.load_key(encryption_root, check_only=check_only), stdin_secret=key)

    async def unload_key(self, encryption_root: str) -> None:
        """Unload the key of ``encryption_root`` (before export)."""
        await self._run(zargv.unload_key(encryption_root))

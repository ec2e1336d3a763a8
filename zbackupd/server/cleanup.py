"""One dataset's clean-up on the SERVER after its cursor moved: this disk's stale holds
released and (``create`` mode) the prunable own snapshots destroyed, in as few round
trips as the decisions allow (issue 16).

Releasing this disk's stale holds and pruning both need a fresh listing and the holds of
the snapshots at or before the sent one (every prune candidate is older than it), so one
fresh ``-d 1`` listing and one ``zfs holds`` serve both: then one
``zfs release`` (only if this disk has stale holds) and one ``zfs destroy ds@a,b,c``
(only if something is prunable). The decisions are ``prune.py``'s, unchanged:
``select_own_for_destroy`` on a listing taken now, ``in_use`` sampled before the listing
and again right before the destroy, another tag's hold keeps its snapshot; a hold of this
disk's on a candidate is stale and released first. A failed release keeps the snapshots
it was to free (``zfs destroy`` of a held snapshot would fail the whole command), and
the two failures are reported apart: neither stops the run, the next run tries again.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from zbackupd.core.model import Bookmark, Snapshot
from zbackupd.errors import ZbackupdError
from zbackupd.server.prune import (
    InUseView,
    OwnSnapshotPolicy,
    RemoteRunner,
    ServerPruneDecision,
    ServerPruneFailed,
    current_cursors,
    select_own_for_destroy,
)
from zbackupd.zfs import argv as zargv
from zbackupd.zfs import names, parse


@dataclass(frozen=True, slots=True)
class ServerCleanup:
    """What ``clean_up_dataset`` did: the stale holds released (or why not), and the
    prune's decision (None without a policy or when nothing could be decided) or why it
    failed."""

    released: tuple[str, ...] = ()
    release_failed: ServerPruneFailed | None = None
    decision: ServerPruneDecision | None = None
    prune_failed: ServerPruneFailed | None = None


async def clean_up_dataset(
    remote: RemoteRunner,
    dataset: str,
    tag: str,
    *,
    sent: Snapshot,
    policy: OwnSnapshotPolicy | None,
    other_disks: Collection[str] = frozenset(),
    in_use: Callable[[], InUseView] = InUseView,
    cursor_prefix: str = names.DEFAULT_PREFIX,
) -> ServerCleanup:
    """Release hold ``tag`` (this disk's) from every snapshot of ``dataset`` at or before
    ``sent`` and, with a ``policy``, destroy the own snapshots ``prune.py`` selects; see
    the module doc. Never raises a ``ZbackupdError``: failures come back in the result."""
    early = in_use()
    snapshots: tuple[Snapshot, ...] = ()
    cursors: tuple[Bookmark, ...] = ()
    upto: list[str] = []

    async def look() -> None:
        nonlocal snapshots, cursors, upto
        answer = await remote.run(zargv.list_snapshots_and_bookmarks([dataset]))
        snapshots, bookmarks = parse.parse_versions(answer.text)
        cursors = current_cursors(bookmarks, other_disks, cursor_prefix)
        here = next((s for s in snapshots if s.guid == sent.guid), None)
        upto = [] if here is None else [s.name for s in snapshots
                                        if s.createtxg <= here.createtxg]  # fmt: skip

    def decide(held: Collection[str]) -> ServerPruneDecision | None:
        if policy is None:
            return None
        listed = [snap.name for snap in snapshots]
        return select_own_for_destroy(
            dataset, snapshots, policy, sent=sent, held=held,
            in_use=early.covered(listed) | in_use().covered(listed), other_cursors=cursors,
        )  # fmt: skip

    stale: list[str] = []
    try:
        await look()
        if not upto:
            return ServerCleanup(decision=decide(frozenset()))
        answer = await remote.run(zargv.holds(upto), check=False)
        if answer.returncode != 0:
            # A snapshot is gone (a concurrent run pruned it first): look again, once.
            await look()
            if not upto:
                return ServerCleanup(decision=decide(frozenset()))
            answer = await remote.run(zargv.holds(upto))
        holds = parse.parse_holds(answer.text)
    except ZbackupdError as error:
        failed = ServerPruneFailed(dataset, (), error)
        return ServerCleanup(release_failed=failed, prune_failed=failed)
    stale = sorted({h.snapshot for h in holds if h.tag == tag})
    others = {h.snapshot for h in holds if h.tag != tag}
    released: tuple[str, ...] = ()
    release_failed: ServerPruneFailed | None = None
    if stale:
        try:
            await remote.run(zargv.release(tag, stale))
        except ZbackupdError as error:
            release_failed = ServerPruneFailed(dataset, stale, error)
            others |= set(stale)  # still held: a destroy of them would fail them all
        else:
            released = tuple(stale)
    decision = decide(frozenset(others))
    if decision is None or not decision.destroy:
        return ServerCleanup(released, release_failed, decision)
    try:
        await remote.run(zargv.destroy_snapshots(dataset, decision.short_names))
    except ZbackupdError as error:
        doomed = [snap.name for snap in decision.destroy]
        return ServerCleanup(released, release_failed, decision,
                             ServerPruneFailed(dataset, doomed, error))  # fmt: skip
    return ServerCleanup(released, release_failed, decision)

"""Listings that one bad row does not sink: the strict parsers (``parse.py``) refuse a
whole listing for one row the name grammar refuses; here each dataset stands alone.

A dataset with any refused row is left out entirely (planning on part of its snapshots
could pick a wrong base) and named in ``refused`` with the row and the reason, for the
caller to record as that dataset's problem while the others run. The grammar itself
(``names.py``) is not widened.
"""

from __future__ import annotations

from dataclasses import dataclass

from zbackupd.core.model import Bookmark, Snapshot
from zbackupd.zfs import parse


@dataclass(frozen=True, slots=True)
class RefusedRow:
    """A listing row the parser refused, and the dataset it belongs to."""

    dataset: str
    what: str  # "snapshot listing", "dataset listing"
    line: str
    reason: str

    def explain(self) -> str:
        return (
            f"{self.dataset}: not replicated: the server's {self.what} has a row the name "
            f"grammar refuses ({self.reason}): {self.line[:200]!r}"
        )


@dataclass(frozen=True, slots=True)
class VersionListing:
    snapshots: tuple[Snapshot, ...]
    bookmarks: tuple[Bookmark, ...]
    refused: tuple[RefusedRow, ...] = ()


def _dataset_of(line: str) -> str:
    name = line.split("\t", 1)[0]
    return name.partition("@")[0].partition("#")[0]


def parse_versions_by_dataset(text: str) -> VersionListing:
    """``parse.parse_versions``, but a refused row leaves out only its dataset.

    The whole listing is parsed at once first (the common case, at full speed); only
    when that fails are the datasets parsed one by one."""
    try:
        snapshots, bookmarks = parse.parse_versions(text)
    except parse.ParseError:
        pass
    else:
        return VersionListing(snapshots, bookmarks)
    chunks: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip():
            chunks.setdefault(_dataset_of(line), []).append(line)
    kept_snapshots: list[Snapshot] = []
    kept_bookmarks: list[Bookmark] = []
    refused: list[RefusedRow] = []
    for dataset, lines in chunks.items():
        try:
            found, marks = parse.parse_versions("\n".join(lines))
        except parse.ParseError as error:
            refused.append(RefusedRow(dataset, error.what, error.line, error.reason))
            continue
        kept_snapshots += found
        kept_bookmarks += marks
    # The listing's order (createtxg within each dataset) is kept within each dataset.
    return VersionListing(tuple(kept_snapshots), tuple(kept_bookmarks), tuple(refused))


def parse_datasets_by_row(
    text: str,
) -> tuple[tuple[parse.DatasetRow, ...], tuple[RefusedRow, ...]]:
    """``parse.parse_datasets``, but a refused row leaves out only that dataset."""
    try:
        return parse.parse_datasets(text), ()
    except parse.ParseError:
        pass
    rows: list[parse.DatasetRow] = []
    refused: list[RefusedRow] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rows += parse.parse_datasets(line)
        except parse.ParseError as error:
            refused.append(RefusedRow(line.split("\t", 1)[0], error.what, error.line,
                                      error.reason))  # fmt: skip
    return tuple(rows), tuple(refused)

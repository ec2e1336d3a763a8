"""Issue 11 (4): one dataset's unparsable listing row must not sink the others. The
strict parsers refuse a whole listing; ``zfs/listing.py`` keeps every dataset whose rows
parse and names the ones that do not, with the row and the reason."""

from __future__ import annotations

import pytest

from zbackupd.zfs import parse
from zbackupd.zfs.listing import parse_datasets_by_row, parse_versions_by_dataset

GOOD = (
    "tank/a@s1\t1\t10\t1700000000\n"
    "tank/a#m1\t1\t10\t1700000000\n"
    "tank/b@s1\t2\t11\t1700000000\n"
)
BAD_SNAPSHOT = "tank/b@bad name\t3\t12\t1700000000\n"  # a space: refused by the grammar
BAD_DATASET = "tank/c d@s1\t4\t13\t1700000000\n"


def test_the_strict_parser_refuses_the_whole_listing() -> None:
    with pytest.raises(parse.ParseError):
        parse.parse_versions(GOOD + BAD_SNAPSHOT)


def test_a_refused_row_fails_only_its_dataset() -> None:
    listing = parse_versions_by_dataset(GOOD + BAD_SNAPSHOT + BAD_DATASET)
    assert [s.name for s in listing.snapshots] == ["tank/a@s1"]
    assert [b.name for b in listing.bookmarks] == ["tank/a#m1"]
    assert [(r.dataset, r.line) for r in listing.refused] == [
        ("tank/b", BAD_SNAPSHOT.rstrip("\n")), ("tank/c d", BAD_DATASET.rstrip("\n"))]
    problem = listing.refused[0].explain()
    assert problem.startswith("tank/b: not replicated: the server's snapshot listing has a "
                              "row the name grammar refuses")  # fmt: skip
    assert "bad name" in problem


def test_a_clean_listing_is_parsed_as_the_strict_parser_does() -> None:
    listing = parse_versions_by_dataset(GOOD)
    assert (listing.snapshots, listing.bookmarks) == parse.parse_versions(GOOD)
    assert listing.refused == ()


def test_a_refused_dataset_row_fails_only_that_dataset() -> None:
    text = ("tank/a\tfilesystem\t1\toff\t-\t0\n"
            "tank/a/bad name\tfilesystem\t2\toff\t-\t0\n"
            "tank/b\tvolume\t3\toff\t-\t4096\n")  # fmt: skip
    with pytest.raises(parse.ParseError):
        parse.parse_datasets(text)
    rows, refused = parse_datasets_by_row(text)
    assert [r.name for r in rows] == ["tank/a", "tank/b"]
    assert [r.dataset for r in refused] == ["tank/a/bad name"]
    assert "dataset listing" in refused[0].explain()

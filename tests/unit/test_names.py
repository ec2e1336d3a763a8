"""The name grammar: what ZFS names zbackupd accepts, and its own names."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zbackupd.errors import PermanentError
from zbackupd.zfs import names
from zbackupd.zfs.names import InvalidName

GOOD_DATASETS = ["tank", "tank/data", "tank/a/b.c:d-e_f", "Pool1/x", "t/..a"]
BAD_DATASETS = [
    "",
    "-tank",
    "tank/",
    "/tank",
    "tank//a",
    "tank/a b",
    "tank/a\tb",
    "tank/a;rm",
    "tank/$(x)",
    "tank/`x`",
    "tank/'a'",
    'tank/"a"',
    "tank/a|b",
    "tank/a&b",
    "tank/a%b",
    "tank@snap",
    "tank#mark",
    "tank/.",
    "tank/..",
    "mirror1/a",
    "raidz/a",
    "log/a",
    "c0t0d0/a",
    "1tank",
    "tank/a\nb",
    "tank/" + "a" * 300,
]


@pytest.mark.parametrize("name", GOOD_DATASETS)
def test_valid_dataset_names_are_returned_unchanged(name: str) -> None:
    assert names.validate_dataset_name(name) == name


@pytest.mark.parametrize("name", BAD_DATASETS)
def test_invalid_dataset_names_are_refused_with_facts(name: str) -> None:
    with pytest.raises(InvalidName) as caught:
        names.validate_dataset_name(name)
    assert caught.value.kind == "dataset"
    assert caught.value.name == name
    assert caught.value.reason
    assert isinstance(caught.value, PermanentError)
    assert caught.value.transient is False


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("tank/data@s1", True),
        ("tank@zbackupd_20250101T000000Z", True),
        ("tank/data@", False),
        ("tank/data@a@b", False),
        ("tank/data@a b", False),
        ("tank/data@a/b", False),
        ("tank/data#m", False),
        ("@s1", False),
        ("-x@s1", False),
    ],
)
def test_snapshot_names(name: str, ok: bool) -> None:
    assert names.is_valid(names.validate_snapshot_name, name) is ok


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("tank/data#m1", True),
        ("tank/data#", False),
        ("tank/data#a#b", False),
        ("tank/data@m", False),
        ("tank/data#a;b", False),
    ],
)
def test_bookmark_names(name: str, ok: bool) -> None:
    assert names.is_valid(names.validate_bookmark_name, name) is ok


def test_split_names() -> None:
    assert names.split_snapshot_name("tank/a@s") == ("tank/a", "s")
    assert names.split_bookmark_name("tank/a#m") == ("tank/a", "m")
    with pytest.raises(InvalidName):
        names.split_snapshot_name("tank/a#m")


@pytest.mark.parametrize("tag", ["-r", "", "a b", "x;y", "_x", "a" * 256])
def test_hold_tags_that_could_be_misread_are_refused(tag: str) -> None:
    with pytest.raises(InvalidName):
        names.validate_hold_tag(tag)


def test_run_snapshot_names_encode_utc_and_round_trip() -> None:
    local = datetime(2025, 3, 4, 12, 30, 5, tzinfo=timezone(timedelta(hours=2)))
    short = names.run_snapshot_short_name(local)
    assert short == "zbackupd_20250304T103005Z"
    assert names.run_snapshot_time(short) == local.astimezone(UTC)
    assert names.run_snapshot_name("tank/a", local) == f"tank/a@{short}"
    assert names.run_snapshot_short_name(local, prefix="nightly") == "nightly_20250304T103005Z"


def test_run_snapshot_requires_an_aware_time() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        names.run_snapshot_short_name(datetime(2025, 1, 1))


@pytest.mark.parametrize(
    ("name", "own"),
    [
        ("tank/a@zbackupd_20250101T000000Z", True),
        ("zbackupd_20250101T000000Z", True),
        ("tank/a@zbackupd_20251301T000000Z", False),  # month 13: shaped like ours, not ours
        ("tank/a@zbackupd_20250101T000000", False),
        ("tank/a@zbackupd_20250101T000000Zx", False),
        ("tank/a@other_20250101T000000Z", False),
        ("tank/a@autosnap_2025-01-01_00:00:00_daily", False),
        ("tank/a@xzbackupd_20250101T000000Z", False),
    ],
)
def test_is_own_snapshot(name: str, own: bool) -> None:
    assert names.is_own_snapshot(name) is own


def test_own_bookmarks_and_hold_tags_follow_the_disk_label() -> None:
    bookmark = names.cursor_bookmark_name("tank/a", "offsite-1")
    assert bookmark == "tank/a#zbackupd_offsite-1"
    assert names.is_own_bookmark(bookmark)
    assert not names.is_own_bookmark("tank/a#manual")
    assert not names.is_own_bookmark("tank/a#zbackupd_")
    tag = names.hold_tag("offsite-1")
    assert tag == "zbackupd_offsite-1"
    assert names.is_own_hold_tag(tag)
    assert not names.is_own_hold_tag("keep")
    assert not names.is_own_hold_tag("zbackupd_offsite-1", prefix="other")


def test_a_disks_cursors_are_its_legacy_name_and_its_guid_suffixed_names() -> None:
    assert names.cursor_bookmark_name("tank/a", "off-1", guid=42) == "tank/a#zbackupd_off-1:42"
    for name in ("tank/a#zbackupd_off-1", "tank/a#zbackupd_off-1:42", "zbackupd_off-1:0"):
        assert names.is_cursor_of(name, "off-1")
        assert names.is_own_bookmark(name)
    # The separator is outside the label grammar: disk "a"'s cursors are never disk "a_5"'s.
    assert names.cursor_label("zbackupd_a_5:7") == "a_5"
    assert not names.is_cursor_of("zbackupd_a_5", "a")
    assert not names.is_cursor_of("zbackupd_a:5", "a_5")
    for name in ("zbackupd_off-1:", "zbackupd_off-1:4a", "zbackupd_off-1:1:2",
                 "zbackupd_off-1:" + "1" * 21, "zbackupd_:1", "site_off-1:1"):
        assert not names.is_own_bookmark(name), name
    assert names.is_cursor_of("site_off-1:1", "off-1", prefix="site")
    with pytest.raises(InvalidName):
        names.cursor_bookmark_name("tank/a", "off-1", guid=2**64)


@pytest.mark.parametrize("label", ["", "-x", "a b", "a/b", "a@b", "a#b", "a:b", "x" * 65])
def test_disk_labels_that_would_break_names_are_refused(label: str) -> None:
    with pytest.raises(InvalidName):
        names.hold_tag(label)
    with pytest.raises(InvalidName):
        names.cursor_bookmark_name("tank/a", label)


@pytest.mark.parametrize("prefix", ["", "1abc", "a b", "a@b", "a" * 33])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(InvalidName):
        names.run_snapshot_short_name(datetime.now(UTC), prefix=prefix)


@pytest.mark.parametrize(
    ("dataset", "roots", "inside"),
    [
        ("tank/a", ["tank/a"], True),
        ("tank/a/b", ["tank/a"], True),
        ("tank/ab", ["tank/a"], False),
        ("tank", ["tank/a"], False),
        ("other/a", ["tank", "other/a"], True),
        ("tank/a", [], False),
    ],
)
def test_within_roots_compares_whole_components(
    dataset: str, roots: list[str], inside: bool
) -> None:
    assert names.within_roots(dataset, roots) is inside


COMPONENT = st.from_regex(r"[A-Za-z0-9_.:-]{1,20}", fullmatch=True).filter(
    lambda c: c not in (".", "..")
)
POOL = st.from_regex(r"[a-b][A-Za-z0-9_.:-]{0,10}", fullmatch=True)


@given(pool=POOL, parts=st.lists(COMPONENT, max_size=4), snap=COMPONENT)
def test_generated_names_in_the_grammar_are_accepted(
    pool: str, parts: list[str], snap: str
) -> None:
    dataset = "/".join([pool, *parts])
    assert names.validate_dataset_name(dataset) == dataset
    assert names.split_snapshot_name(f"{dataset}@{snap}") == (dataset, snap)
    assert names.split_bookmark_name(f"{dataset}#{snap}") == (dataset, snap)


@given(text=st.text(min_size=1, max_size=40))
def test_anything_outside_the_character_set_is_refused(text: str) -> None:
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-/")
    if set(text) <= allowed:
        return  # covered by the test above; here we want the rest
    assert not names.is_valid(names.validate_dataset_name, f"tank/{text}")

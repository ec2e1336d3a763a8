"""Parsers of zfs/zpool output and the stderr classifier.

Samples are written from the OpenZFS 2.3 sources (cmd/zfs/zfs_main.c print formats with
-H -p; lib/libzfs message texts) and from real output quoted in public bug reports;
the last tests read real OpenZFS 2.3.2 output captured in tests/data/zfs-output/.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zbackupd.core.model import Bookmark, Encryption, Hold, Snapshot, group_versions
from zbackupd.errors import CommandError
from zbackupd.zfs import names, parse
from zbackupd.zfs.parse import ParseError, parse_versions

LISTING = (
    "tank/data@zbackupd_20250101T000000Z\t18446744073709551615\t100\t1735689600\n"
    "tank/data#zbackupd_disk1\t17\t100\t1735689600\n"
    "tank/data@zbackupd_20250102T000000Z\t42\t205\t1735776000\n"
)


def test_versions_listing_splits_snapshots_and_bookmarks_in_order() -> None:
    snapshots, bookmarks = parse.parse_versions(LISTING)
    assert snapshots == (
        Snapshot("tank/data@zbackupd_20250101T000000Z", 2**64 - 1, 100, 1735689600),
        Snapshot("tank/data@zbackupd_20250102T000000Z", 42, 205, 1735776000),
    )
    assert bookmarks == (Bookmark("tank/data#zbackupd_disk1", 17, 100, 1735689600),)


def test_empty_listing_is_empty() -> None:
    assert parse.parse_snapshots("") == ()
    assert parse.parse_bookmarks("\n") == ()


def test_snapshot_listing_refuses_bookmarks_and_vice_versa() -> None:
    with pytest.raises(ParseError, match="bookmark in a snapshot listing"):
        parse.parse_snapshots(LISTING)
    with pytest.raises(ParseError, match="snapshot in a bookmark listing"):
        parse.parse_bookmarks(LISTING)


@pytest.mark.parametrize(
    "line",
    [
        "tank/data@s\t1\t2",  # a column short
        "tank/data@s\tx\t2\t3",  # guid not a number
        "tank/data@s\t-1\t2\t3",  # negative
        "tank/data\t1\t2\t3",  # neither snapshot nor bookmark
        "tank/a b@s\t1\t2\t3",  # outside the grammar
        "tank/data@s 1 2 3",  # spaces, i.e. -H missing
    ],
)
def test_malformed_listing_lines_raise_parse_error_with_the_line(line: str) -> None:
    with pytest.raises(ParseError) as caught:
        parse.parse_versions(line + "\n")
    assert caught.value.line.startswith(line.split("\t", maxsplit=1)[0])
    assert caught.value.transient is False


def test_dataset_listing_picks_the_send_mode() -> None:
    text = (
        "tank\tfilesystem\t11\taes-256-gcm\ttank\t0\ntank/plain\tfilesystem\t12\toff\t-\t8192\n"
        "tank/child\tvolume\t13\taes-256-gcm\ttank\t-\n"
    )
    rows = parse.parse_datasets(text)
    assert [(r.name, r.encryption, r.encryption_root) for r in rows] == [
        ("tank", Encryption.ENCRYPTED, "tank"),
        ("tank/plain", Encryption.PLAIN, None),
        ("tank/child", Encryption.ENCRYPTED, "tank"),
    ]
    assert rows[1].guid == 12
    assert [r.volume for r in rows] == [False, False, True]
    assert [r.written for r in rows] == [0, 8192, None]
    with pytest.raises(ParseError):
        parse.parse_datasets("tank/x\tsnapshot\t1\toff\t-\t0\n")
    with pytest.raises(ParseError):
        parse.parse_datasets("tank/x\tfilesystem\t1\toff\t-\tmany\n")
    with pytest.raises(ParseError):
        parse.parse_datasets("tank/x\tfilesystem\t1\toff\t-\n")


def test_holds() -> None:
    text = (
        "tank/data@zbackupd_20250101T000000Z\tzbackupd_disk1\t1735689700\n"
        "tank/data@zbackupd_20250101T000000Z\tkeep\t1735689800\n"
    )
    assert parse.parse_holds(text) == (
        Hold("tank/data@zbackupd_20250101T000000Z", "zbackupd_disk1", 1735689700),
        Hold("tank/data@zbackupd_20250101T000000Z", "keep", 1735689800),
    )


def test_properties_keep_values_with_spaces_and_dashes() -> None:
    text = (
        "xpool/b/data\treceive_resume_token\t-\n"
        "xpool/b/data\twritten\t0\n"
        "xpool/b/data\tmountpoint\t/mnt/with space\n"
        "xpool/b/other\treceive_resume_token\t1-abc-12-789c\n"
    )
    props = parse.parse_properties(text)
    assert props == {
        "xpool/b/data": {
            "receive_resume_token": "-",
            "written": "0",
            "mountpoint": "/mnt/with space",
        },
        "xpool/b/other": {"receive_resume_token": "1-abc-12-789c"},
    }
    assert parse.resume_token(props["xpool/b/data"]["receive_resume_token"]) is None
    assert parse.resume_token(props["xpool/b/other"]["receive_resume_token"]) == "1-abc-12-789c"


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("full\ttank/data@s\t63004160\nsize\t63004160\n", 63004160),
        ("incremental\ts1\ttank/data@s2\t5120\nsize\t5120\n", 5120),
        (
            "resume token contents:\nnvlist version: 0\n\tobject = 0x1\n\ttoname = tank/a@s\n"
            "full\ttank/a@s\t1024\nsize\t1024\n",
            1024,
        ),
    ],
)
def test_send_estimate_reads_the_size_line(text: str, size: int) -> None:
    assert parse.parse_send_estimate(text) == size


def test_send_estimate_without_size_line_is_an_error() -> None:
    with pytest.raises(ParseError, match="size"):
        parse.parse_send_estimate("full\ttank/a@s\t1024\n")


def test_pool_list() -> None:
    rows = parse.parse_pool_list("xpool\t1234567890123456789\tONLINE\nypool\t5\tSUSPENDED\n")
    assert rows == (
        parse.PoolRow("xpool", 1234567890123456789, parse.PoolHealth.ONLINE),
        parse.PoolRow("ypool", 5, parse.PoolHealth.SUSPENDED),
    )
    with pytest.raises(ParseError, match="health"):
        parse.parse_pool_list("xpool\t1\tHAPPY\n")


# -- classify_error ----------------------------------------------------------------------

RECEIVE = ("zfs", "receive", "-s", "-u", "xpool/b/data")
ZPOOL_EXPORT = ("zpool", "export", "xpool")
TOKEN_IN_STDERR = "1-118b9b800c-118-789c63"

CLASSIFIED = [
    (RECEIVE, "cannot receive incremental stream: most recent snapshot of xpool/b/data does "
     "not\nmatch incremental source\n", parse.NoCommonSnapshot, False),
    (RECEIVE, "cannot receive incremental stream: destination xpool/b/data has been modified\n"
     "since most recent snapshot\n", parse.DestinationModified, False),
    (RECEIVE, "cannot receive new filesystem stream: destination 'xpool/b/data' exists\n"
     "must specify -F to overwrite it\n", parse.DestinationExists, False),
    (RECEIVE, "cannot receive new filesystem stream: inherited key must be loaded\n",
     parse.KeyNotLoaded, False),
    (RECEIVE, "cannot receive new filesystem stream: incompatible embedded data stream feature "
     "with encrypted receive.\n", parse.IncompatibleStream, False),
    (RECEIVE, "cannot receive incremental stream: IV set guid mismatch. See the 'zfs receive' "
     "man page section\n discussing the limitations of raw encrypted send streams.\n",
     parse.IncompatibleStream, False),
    (RECEIVE, 'cannot receive incremental stream: destination xpool/b/data contains '
     'partially-complete state from "zfs receive -s".\n', parse.ReceiveStatePresent, False),
    (RECEIVE, "cannot receive incremental stream: checksum mismatch or incomplete stream.\n"
     "Partially received snapshot is saved.\nA resuming stream can be generated on the "
     f"sending system by running:\n    zfs send -t {TOKEN_IN_STDERR}\n",
     parse.StreamInterrupted, True),
    (RECEIVE, "cannot receive: failed to read from stream\n", parse.StreamInterrupted, True),
    (RECEIVE, "cannot receive incremental stream: out of space\n", parse.OutOfSpace, False),
    (("zfs", "send", "-t", "1-x-y-z"), "cannot resume send: 'tank/a@s' used in the initial "
     "send no longer exists\n", parse.ResumeTokenInvalid, False),
    (("zfs", "send", "-t", "1-x-y-z"), "cannot resume send: resume token is corrupt "
     "(incorrect checksum)\n", parse.ResumeTokenInvalid, False),
    (("zfs", "load-key", "-L", "prompt", "-n", "xpool"),
     "Key load error: Incorrect key provided for 'xpool'.\n", parse.KeyIncorrect, False),
    (("zfs", "load-key", "-L", "prompt", "xpool"),
     "Key load error: Key already loaded for 'xpool'.\n", parse.KeyAlreadyLoaded, False),
    (ZPOOL_EXPORT, "cannot export 'xpool': pool I/O is currently suspended\n",
     parse.PoolSuspended, True),
    (("zfs", "list", "-H", "xpool/a"), "cannot open 'xpool/a': pool I/O is currently "
     "suspended\n", parse.PoolSuspended, True),
    (ZPOOL_EXPORT, "cannot export 'xpool': pool is busy\n", parse.PoolBusy, True),
    (ZPOOL_EXPORT, "cannot open 'xpool': no such pool\n", parse.PoolNotFound, False),
    (("zpool", "import", "-d", "/dev/disk/by-id/x", "-N", "1"),
     "cannot import '1': no such pool available\n", parse.PoolNotFound, False),
    (("zpool", "import", "-d", "/dev/disk/by-id/x", "-N", "1"),
     "cannot import 'xpool': pool was previously in use from another system.\n"
     "Last accessed by other (hostid=1) at Mon Jan  1 00:00:00 2025\n"
     "The pool can be imported, use 'zpool import -f' to import the pool.\n",
     parse.PoolActiveElsewhere, False),
    (("zfs", "list", "-H", "tank/nope"), "cannot open 'tank/nope': dataset does not exist\n",
     parse.DatasetNotFound, False),
    (("zfs", "destroy", "tank/a@zbackupd_20250101T000000Z"),
     "cannot destroy snapshot tank/a@zbackupd_20250101T000000Z: dataset is busy\n",
     parse.PoolBusy, True),
    (("zfs", "snapshot", "tank/a@s"), "cannot create snapshots : permission denied\n",
     parse.PermissionDenied, False),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "stderr", "error_class", "transient"), CLASSIFIED)
def test_classify_error(
    argv: tuple[str, ...], stderr: str, error_class: type[CommandError], transient: bool
) -> None:
    error = parse.classify_error(argv, 1, stderr)
    assert type(error) is error_class
    assert error.transient is transient
    assert error.argv == argv
    assert error.returncode == 1
    assert error.stderr == stderr


def test_classified_errors_name_their_subject_and_survive_pickling() -> None:
    error = parse.classify_error(ZPOOL_EXPORT, 1, "cannot open 'xpool': no such pool\n")
    assert isinstance(error, parse.PoolNotFound)
    assert error.subject == "xpool"
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 -- our own object, round trip
    assert type(copy) is parse.PoolNotFound
    assert (copy.argv, copy.stderr, copy.transient) == (error.argv, error.stderr, False)


def test_interrupted_receive_carries_the_printed_resume_token() -> None:
    stderr = CLASSIFIED[7][1]
    error = parse.classify_error(RECEIVE, 1, stderr)
    assert isinstance(error, parse.StreamInterrupted)
    assert error.resume_token == TOKEN_IN_STDERR


def test_no_such_pool_or_dataset_from_zfs_is_a_dataset_problem() -> None:
    error = parse.classify_error(("zfs", "get", "x"), 1, "cannot open 'x': no such pool or dataset")
    assert type(error) is parse.DatasetNotFound


def test_unknown_failures_stay_plain_permanent_command_errors() -> None:
    error = parse.classify_error(("zfs", "frobnicate"), 2, "something new\n")
    assert type(error) is CommandError
    assert error.transient is False
    assert "something new" in str(error)


# -- real OpenZFS 2.3.2 output (tests/data/zfs-output/, see its README) --------------------

CAPTURED = Path(__file__).resolve().parents[1] / "data" / "zfs-output"


def captured(name: str) -> str:
    return (CAPTURED / name).read_text(encoding="utf-8")


def test_captured_snapshot_listing() -> None:
    snapshots = parse.parse_snapshots(captured("zfs-list-snapshots.stdout"))
    assert {s.name for s in snapshots} == {
        f"{dataset}@{snap}"
        for dataset in ("tank", "tank/plain", "tank/secure", "tank/secure/docs")
        for snap in ("s1", "s2")
    }
    assert [s.createtxg for s in snapshots] == sorted(s.createtxg for s in snapshots)
    assert len({s.guid for s in snapshots}) == len(snapshots)
    assert all(s.creation > 0 for s in snapshots)


def test_captured_disk_listing_shares_guids_with_the_server() -> None:
    server = {s.name: s.guid for s in parse.parse_snapshots(captured("zfs-list-snapshots.stdout"))}
    disk = parse.parse_snapshots(captured("zfs-list-snapshots-disk.stdout"))
    plain = next(s for s in disk if s.dataset == "xpool/backup/plain")
    assert plain.guid == server["tank/plain@s1"]


def test_captured_bookmarks_carry_their_snapshots_guid_and_txg() -> None:
    snapshots = {s.name: s for s in parse.parse_snapshots(captured("zfs-list-snapshots.stdout"))}
    bookmarks = parse.parse_bookmarks(captured("zfs-list-bookmarks.stdout"))
    assert [b.name for b in bookmarks] == [
        "tank/plain#zbackupd_CAPTURE0001",
        "tank/secure#zbackupd_CAPTURE0001",
    ]
    for mark in bookmarks:
        source = snapshots[f"{mark.dataset}@s1"]
        assert (mark.guid, mark.createtxg) == (source.guid, source.createtxg)


def test_captured_holds() -> None:
    holds = parse.parse_holds(captured("zfs-holds.stdout"))
    assert {(h.snapshot, h.tag) for h in holds} == {
        ("tank/secure@s1", "zbackupd-CAPTURE0001"),
        ("tank/secure@s2", "zbackupd-CAPTURE0001"),
        ("tank/secure@s2", "keep"),
    }
    assert all(h.timestamp > 0 for h in holds)


def test_captured_receive_state_with_and_without_token() -> None:
    idle = parse.parse_properties(captured("zfs-get-receive-state.stdout"))["xpool/backup/secure"]
    assert parse.resume_token(idle["receive_resume_token"]) is None
    assert idle["encryptionroot"] == "xpool/backup/secure"
    plain = parse.parse_properties(captured("zfs-get-receive-state-plain.stdout"))
    assert plain["xpool/backup/plain"]["encryptionroot"] == "xpool"
    cut = parse.parse_properties(captured("zfs-get-receive-state-token.stdout"))
    token = parse.resume_token(cut["xpool/backup/secure"]["receive_resume_token"])
    assert token is not None
    assert token.startswith("1-")


@pytest.mark.parametrize(
    "name",
    [
        "zfs-send-nvP-full.stdout",
        "zfs-send-nvP-incremental.stdout",
        "zfs-send-nvP-raw.stdout",
        "zfs-send-nvP-raw-incremental.stdout",
        "zfs-send-nvP-raw-bookmark.stdout",
        "zfs-send-nvP-resume.stdout",
    ],
)
def test_captured_send_estimates_match_the_stream_line(name: str) -> None:
    text = captured(name)
    stream_line = next(
        line for line in text.splitlines() if line.startswith(("full\t", "incremental\t"))
    )
    size = parse.parse_send_estimate(text)
    assert size == int(stream_line.rsplit("\t", 1)[1])
    assert size > 0


def test_captured_pool_list_matches_the_import_listing() -> None:
    rows = parse.parse_pool_list(captured("zpool-list.stdout"))
    assert [(r.name, r.health) for r in rows] == [
        ("tank", parse.PoolHealth.ONLINE),
        ("xpool", parse.PoolHealth.ONLINE),
    ]
    offered = re.search(r"id: ([0-9]+)", captured("zpool-import-list.stdout"))
    assert offered is not None
    assert rows[1].guid == int(offered.group(1))


@pytest.mark.parametrize(
    ("name", "argv", "error_class"),
    [
        ("zfs-list-snapshots-none.stderr", ("zfs", "list"), parse.DatasetNotFound),
        ("zfs-receive-full-exists.stderr", RECEIVE, parse.DestinationExists),
        ("zfs-receive-incremental-key-unloaded.stderr", RECEIVE, parse.KeyNotLoaded),
        ("zfs-receive-incremental-mismatch.stderr", RECEIVE, parse.NoCommonSnapshot),
        ("zfs-receive-partial-exists.stderr", RECEIVE, parse.ReceiveStatePresent),
        ("zfs-receive-raw-unencrypted-key-unloaded.stderr", RECEIVE, parse.KeyNotLoaded),
        ("zfs-receive-raw-unencrypted.stderr", RECEIVE, parse.IncompatibleStream),
        ("zpool-import-none.stderr", ("zpool", "import"), parse.PoolNotFound),
    ],
)
def test_captured_errors_are_classified(
    name: str, argv: tuple[str, ...], error_class: type[CommandError]
) -> None:
    assert type(parse.classify_error(argv, 1, captured(name))) is error_class


def test_gate_refusal_is_typed_and_permanent() -> None:
    error = parse.classify_error(
        ("zfs", "destroy", "-r", "tank"), 126,
        "zbackupd-gate: refused: zfs destroy -r is never allowed\n",
    )
    assert isinstance(error, parse.GateRefused)
    assert error.transient is False
    assert error.returncode == 126


# -- the fast listing parser agrees with the full name check ------------------------------

_NAME_ALPHABET = "ab09_.:-/@# %;"


def _reference_versions(text: str) -> tuple[tuple[Snapshot, ...], tuple[Bookmark, ...]]:
    """Every row through ``names``' full validators: what ``parse_versions`` must equal."""
    snapshots, bookmarks = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        name, guid, createtxg, creation = line.split("\t")
        numbers = (int(guid), int(createtxg), int(creation))
        if "@" in name:
            names.validate_snapshot_name(name)
            snapshots.append(Snapshot(name, *numbers))
        elif "#" in name:
            names.validate_bookmark_name(name)
            bookmarks.append(Bookmark(name, *numbers))
        else:
            raise names.InvalidName("version", name, "neither")
    return tuple(snapshots), tuple(bookmarks)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["tank", "tank/a", "tank/a b", "tank/.", "tank//x", "1tank", "t"]),
            st.sampled_from("@#"),
            st.text(_NAME_ALPHABET, min_size=0, max_size=8),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_parse_versions_accepts_exactly_what_the_name_grammar_accepts(
    rows: list[tuple[str, str, str]],
) -> None:
    text = "".join(f"{ds}{sep}{short}\t{i + 1}\t{i + 10}\t0\n" for i, (ds, sep, short)
                   in enumerate(rows))  # fmt: skip
    try:
        expected = _reference_versions(text)
    except names.InvalidName:
        with pytest.raises(ParseError):
            parse_versions(text)
    else:
        assert parse_versions(text) == expected


def test_a_long_listing_is_grouped_by_dataset_in_one_pass() -> None:
    snapshots, bookmarks = parse_versions(
        "tank/a@s1\t1\t10\t0\ntank/b@s1\t2\t11\t0\ntank/a@s2\t3\t12\t0\n"
        "tank/a#m\t1\t10\t0\ntank/c#only\t9\t9\t0\n"
    )
    states = group_versions(snapshots, bookmarks)
    assert sorted(states) == ["tank/a", "tank/b", "tank/c"]
    assert [s.short_name for s in states["tank/a"].snapshots] == ["s1", "s2"]
    assert [b.name for b in states["tank/a"].bookmarks] == ["tank/a#m"]
    assert states["tank/c"].snapshots == ()
    assert [b.guid for b in states["tank/c"].bookmarks] == [9]

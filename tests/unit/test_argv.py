"""argv builders, the send-mode rule, and the one grammar shared with the gate."""

from __future__ import annotations

import struct
import zlib
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zbackupd.core.model import Encryption
from zbackupd.zfs import argv as zargv
from zbackupd.zfs import names
from zbackupd.zfs.argv import InvalidArgument, Refusal, RemoteCommand, RemoteKind
from zbackupd.zfs.names import InvalidName

SNAP = "tank/data@zbackupd_20250101T000000Z"
SNAP2 = "tank/data@zbackupd_20250102T000000Z"
MARK = "tank/data#zbackupd_disk1"


def make_token(
    toname: str, toguid: int = 42, fromguid: int | None = None, raw: bool = False
) -> str:
    """Encode a resume token the way the kernel does (native nvlist, zlib, fletcher4)."""

    def pair(name: str, kind: int, value: bytes) -> bytes:
        name_bytes = name.encode() + b"\0"
        head_and_name = struct.pack("<ihhii", 0, len(name_bytes), 0, 1 if value else 0, kind)
        head_and_name += name_bytes
        head_and_name += b"\0" * (-len(head_and_name) % 8)
        body = value + b"\0" * (-len(value) % 8)
        size = len(head_and_name) + len(body)
        return struct.pack("<i", size) + head_and_name[4:] + body

    pairs = [pair("object", 8, struct.pack("<Q", 1)), pair("toguid", 8, struct.pack("<Q", toguid))]
    if fromguid is not None:
        pairs.append(pair("fromguid", 8, struct.pack("<Q", fromguid)))
    if raw:
        pairs.append(pair("rawok", 1, b""))
    pairs.append(pair("toname", 9, toname.encode() + b"\0"))
    packed = b"\0\1\0\0" + struct.pack("<iI", 0, 1) + b"".join(pairs) + b"\0" * 8
    payload = zlib.compress(packed)
    usable = len(payload) // 4 * 4
    checksum = sum(struct.unpack(f"<{usable // 4}I", payload[:usable])) % 2**64
    return f"1-{checksum:x}-{len(packed):x}-{payload.hex()}"


#: A real token (full send of pool1/test@a), quoted in zrepl's internal/zfs/resume_token.go.
REAL_TOKEN = (
    "1-bf31b879a-b8-789c636064000310a500c4ec50360710e72765a5269740f80cd8e4d3d28a534b18e0002"
    "4cf86249f5459925acc802a8facbf243fbd3433858161f5ddb9ab1ae7c7466a20c97382e5f312735319180a"
    "f2f3730cf58166953824c2cc0200cde81651"
)
#: A real incremental token, printed by a cut ``zfs receive -s`` in a syncoid log
#: (openzfs/zfs issue about send/recv I/O errors, 2025).
REAL_INCREMENTAL_TOKEN = (
    "1-12160b1454-118-789c636064000310a501c49c50360710a715e5e7a69766a6304081743457d44629f353"
    "0a40363b92bafca4acd4e412081f0430e4d3d28a534b18e00024cf86249f5459925acc802a8facbf241fe28a"
    "cba2afa6fe89f9c39a8024cf0996cf4bcc4d6560284ecd4bd1071a55a29f63106fa09f63186fa89f63146fe"
    "c505c99979c9f99129f5f94999f176f646064aa6b60a46b64626508446656c696baeebe21ba066656060630"
    "3700000d212c45"
)
TOKEN = make_token(SNAP, toguid=7, fromguid=5, raw=True)

BUILT = {
    "list snapshots": (
        zargv.list_snapshots(["tank/data"]),
        ("zfs", "list", "-H", "-p", "-t", "snapshot", "-o", "name,guid,createtxg,creation",
         "-s", "createtxg", "-d", "1", "tank/data"),
    ),
    "list both recursive": (
        zargv.list_snapshots_and_bookmarks(["tank/a", "tank/b"], recursive=True),
        ("zfs", "list", "-H", "-p", "-t", "snapshot,bookmark", "-o",
         "name,guid,createtxg,creation", "-s", "createtxg", "-r", "tank/a", "tank/b"),
    ),
    "list bookmarks": (
        zargv.list_bookmarks(["tank/a"]),
        ("zfs", "list", "-H", "-p", "-t", "bookmark", "-o", "name,guid,createtxg,creation",
         "-s", "createtxg", "-d", "1", "tank/a"),
    ),
    "get": (
        zargv.get_properties(["tank/a"], ["receive_resume_token", "written", "encryptionroot"]),
        ("zfs", "get", "-H", "-p", "-o", "name,property,value",
         "receive_resume_token,written,encryptionroot", "tank/a"),
    ),
    "holds": (zargv.holds([SNAP]), ("zfs", "holds", "-H", "-p", SNAP)),
    "snapshot atomic": (zargv.snapshot([SNAP, "tank/b@x"]), ("zfs", "snapshot", SNAP, "tank/b@x")),
    "snapshot recursive": (zargv.snapshot([SNAP], recursive=True), ("zfs", "snapshot", "-r", SNAP)),
    "hold": (zargv.hold("zbackupd_disk1", [SNAP]), ("zfs", "hold", "zbackupd_disk1", SNAP)),
    "release": (
        zargv.release("zbackupd_disk1", [SNAP]),
        ("zfs", "release", "zbackupd_disk1", SNAP),
    ),
    "bookmark": (zargv.bookmark(SNAP, MARK), ("zfs", "bookmark", SNAP, MARK)),
    "destroy snapshots": (
        zargv.destroy_snapshots("tank/data", ["a", "b", "c"]),
        ("zfs", "destroy", "tank/data@a,b,c"),
    ),
    "destroy bookmark": (zargv.destroy_bookmark(MARK), ("zfs", "destroy", MARK)),
    "send full raw": (zargv.send_full(SNAP, Encryption.ENCRYPTED), ("zfs", "send", "-w", SNAP)),
    "send full plain": (
        zargv.send_full(SNAP, Encryption.PLAIN),
        ("zfs", "send", "-L", "-c", SNAP),
    ),
    "send from bookmark": (
        zargv.send_incremental(MARK, SNAP, Encryption.ENCRYPTED),
        ("zfs", "send", "-w", "-i", MARK, SNAP),
    ),
    "send -I": (
        zargv.send_incremental(SNAP, SNAP2, Encryption.PLAIN, intermediates=True),
        ("zfs", "send", "-L", "-c", "-I", SNAP, SNAP2),
    ),
    "estimate": (
        zargv.send_incremental(SNAP, SNAP2, Encryption.ENCRYPTED, estimate=True),
        ("zfs", "send", "-nvP", "-w", "-i", SNAP, SNAP2),
    ),
    "resume": (zargv.send_resume(TOKEN), ("zfs", "send", "-t", TOKEN)),
    "resume estimate": (
        zargv.send_resume(TOKEN, estimate=True),
        ("zfs", "send", "-nvP", "-t", TOKEN),
    ),
    "receive": (
        zargv.receive("xpool/backup/data"),
        ("zfs", "receive", "-s", "-u", "-o", "readonly=on", "-o", "canmount=noauto",
         "-o", "mountpoint=none", "xpool/backup/data"),
    ),
    "receive -x": (
        zargv.receive("xpool/b", mountpoint=zargv.MountpointPolicy.EXCLUDE),
        ("zfs", "receive", "-s", "-u", "-o", "readonly=on", "-o", "canmount=noauto",
         "-x", "mountpoint", "xpool/b"),
    ),
    "receive -F by policy": (
        zargv.receive("xpool/b", force_rollback=True),
        ("zfs", "receive", "-s", "-u", "-F", "-o", "readonly=on", "-o", "canmount=noauto",
         "-o", "mountpoint=none", "xpool/b"),
    ),
    "receive a volume": (
        zargv.receive("xpool/b/vol", volume=True),
        ("zfs", "receive", "-s", "-u", "-o", "readonly=on", "-o", "volmode=none", "xpool/b/vol"),
    ),
    "receive abort": (zargv.receive_abort("xpool/b"), ("zfs", "receive", "-A", "xpool/b")),
    "import": (
        zargv.zpool_import("/dev/disk/by-id/usb-QEMU_HARDDISK_S1-0:0-part1", 1234567890123),
        ("zpool", "import", "-d", "/dev/disk/by-id/usb-QEMU_HARDDISK_S1-0:0-part1", "-N",
         "-o", "cachefile=none", "1234567890123"),
    ),
    "import renamed": (
        zargv.zpool_import("/dev/disk/by-id/ata-X-part1", 7, temp_name="zb_disk1"),
        ("zpool", "import", "-d", "/dev/disk/by-id/ata-X-part1", "-N", "-o", "cachefile=none",
         "-t", "7", "zb_disk1"),
    ),
    "import from the disk's mapping": (
        zargv.zpool_import("/dev/mapper/zbackupd-offsite-a", 7),
        ("zpool", "import", "-d", "/dev/mapper/zbackupd-offsite-a", "-N", "-o",
         "cachefile=none", "7"),
    ),
    "export": (zargv.zpool_export("xpool"), ("zpool", "export", "xpool")),
    "clear": (zargv.zpool_clear("xpool"), ("zpool", "clear", "xpool")),
    "reopen": (zargv.zpool_reopen("xpool"), ("zpool", "reopen", "xpool")),
    "zpool list": (
        zargv.zpool_list(["xpool"]),
        ("zpool", "list", "-H", "-p", "-o", "name,guid,health", "xpool"),
    ),
    "zpool get": (
        zargv.zpool_get("xpool", ["health", "feature@encryption"]),
        ("zpool", "get", "-H", "-p", "-o", "name,property,value", "health,feature@encryption",
         "xpool"),
    ),
    "load-key": (zargv.load_key("xpool"), ("zfs", "load-key", "-L", "prompt", "xpool")),
    "load-key check": (
        zargv.load_key("xpool", check_only=True),
        ("zfs", "load-key", "-L", "prompt", "-n", "xpool"),
    ),
    "unload-key": (zargv.unload_key("xpool"), ("zfs", "unload-key", "xpool")),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BUILT))
def test_builders_emit_exactly_the_documented_argv(case: str) -> None:
    built, expected = BUILT[case]
    assert built == expected


@pytest.mark.parametrize("case", sorted(BUILT))
def test_no_builder_ever_forces_recursive_destroys_or_forced_imports(case: str) -> None:
    built, _ = BUILT[case]
    if built[:2] == ("zfs", "destroy"):
        assert not {"-r", "-R", "-f"} & set(built)
    if built[:2] == ("zpool", "import") or built[:2] == ("zpool", "export"):
        assert "-f" not in built
    if built[:2] == ("zfs", "receive"):
        assert ("-F" in built) == (case == "receive -F by policy")


@pytest.mark.parametrize("estimate", [False, True])
@pytest.mark.parametrize("intermediates", [False, True])
def test_plain_datasets_never_go_raw_or_embedded(estimate: bool, intermediates: bool) -> None:
    for built in (
        zargv.send_full(SNAP, Encryption.PLAIN, estimate=estimate),
        zargv.send_incremental(
            SNAP, SNAP2, Encryption.PLAIN, intermediates=intermediates, estimate=estimate
        ),
    ):
        assert "-w" not in built
        assert "-e" not in built
        assert not any(arg.startswith("-") and "w" in arg and arg != "-nvP" for arg in built)
        assert "-L" in built
        assert "-c" in built


@pytest.mark.parametrize("estimate", [False, True])
@pytest.mark.parametrize("intermediates", [False, True])
def test_encrypted_datasets_always_go_raw(estimate: bool, intermediates: bool) -> None:
    for built in (
        zargv.send_full(SNAP, Encryption.ENCRYPTED, estimate=estimate),
        zargv.send_incremental(
            SNAP, SNAP2, Encryption.ENCRYPTED, intermediates=intermediates, estimate=estimate
        ),
    ):
        assert "-w" in built
        assert "-e" not in built


def test_estimates_are_dry_runs() -> None:
    assert "-nvP" in zargv.send_full(SNAP, Encryption.ENCRYPTED, estimate=True)
    assert "-nvP" not in zargv.send_full(SNAP, Encryption.ENCRYPTED)


BAD_CALLS = {
    "dataset with space": lambda: zargv.list_snapshots(["tank/a b"]),
    "option as dataset": lambda: zargv.list_snapshots(["-r"]),
    "no datasets": lambda: zargv.list_snapshots([]),
    "string as one dataset ok but bad": lambda: zargv.holds("tank@a;b"),
    "unknown property": lambda: zargv.get_properties(["tank"], ["keylocation;x"]),
    "secret-ish property": lambda: zargv.get_properties(["tank"], ["all"]),
    "a property zbackupd does not read": lambda: zargv.get_properties(["tank"], ["keylocation"]),
    "no properties": lambda: zargv.get_properties(["tank"], []),
    "snapshot without @": lambda: zargv.snapshot(["tank/a"]),
    "option-like hold tag": lambda: zargv.hold("-r", [SNAP]),
    "bookmark across datasets": lambda: zargv.bookmark(SNAP, "tank/other#zbackupd_d"),
    "destroy with separator": lambda: zargv.destroy_snapshots("tank/a", ["b@c"]),
    "destroy range": lambda: zargv.destroy_snapshots("tank/a", ["a%b"]),
    "destroy nothing": lambda: zargv.destroy_snapshots("tank/a", []),
    "destroy dataset": lambda: zargv.destroy_bookmark("tank/a"),
    "incremental across datasets": lambda: zargv.send_incremental(
        "tank/a@x", "tank/b@y", Encryption.ENCRYPTED
    ),
    "-I from bookmark": lambda: zargv.send_incremental(
        MARK, SNAP, Encryption.ENCRYPTED, intermediates=True
    ),
    "bad token": lambda: zargv.send_resume("1-abc; rm -rf /"),
    "receive into snapshot": lambda: zargv.receive("xpool/a@s"),
    "import by sdX": lambda: zargv.zpool_import("/dev/sda1", 1),
    "import another mapping": lambda: zargv.zpool_import("/dev/mapper/luks-x", 1),
    "import mapping escape": lambda: zargv.zpool_import("/dev/mapper/zbackupd-../../sda1", 1),
    "import path escape": lambda: zargv.zpool_import("/dev/disk/by-id/../../sda1", 1),
    "import zero guid": lambda: zargv.zpool_import("/dev/disk/by-id/x", 0),
    "import bool guid": lambda: zargv.zpool_import("/dev/disk/by-id/x", True),
    "import bad temp name": lambda: zargv.zpool_import("/dev/disk/by-id/x", 1, temp_name="mirror"),
    "export option": lambda: zargv.zpool_export("-f"),
    "zpool get unknown": lambda: zargv.zpool_get("xpool", ["comment"]),
    "load-key option": lambda: zargv.load_key("-a"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_is_refused_with_a_typed_permanent_error(case: str) -> None:
    with pytest.raises((InvalidName, InvalidArgument)) as caught:
        BAD_CALLS[case]()
    assert caught.value.transient is False


# -- the gate's matcher ------------------------------------------------------------------

ROOTS = ["tank/data", "tank/home"]


GATE_ACCEPTS = [
    "list snapshots", "holds", "snapshot recursive", "hold", "release", "bookmark",
    "destroy bookmark", "send full raw", "send full plain", "send from bookmark", "send -I",
    "estimate", "resume", "resume estimate",
]  # fmt: skip


@pytest.mark.parametrize("case", GATE_ACCEPTS)
def test_remote_builder_samples_are_accepted_by_the_gate(case: str) -> None:
    built, _ = BUILT[case]
    outcome = zargv.match_remote_argv(built, ROOTS)
    assert isinstance(outcome, RemoteCommand), outcome


def test_local_only_commands_are_refused_by_the_gate() -> None:
    for built in (
        zargv.receive("tank/data/x"),
        zargv.receive_abort("tank/data"),
        zargv.load_key("tank/data"),
        zargv.unload_key("tank/data"),
        zargv.zpool_export("tank"),
    ):
        assert isinstance(zargv.match_remote_argv(built, ROOTS), Refusal)


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["zfs", "destroy", "-r", SNAP], "not a command"),
        (["zfs", "destroy", "tank/data@manual"], "own"),
        (["zfs", "destroy", "tank/data"], ""),
        (["zfs", "destroy", "tank/data@zbackupd_20250101T000000Z,keepme"], "own"),
        (["zfs", "snapshot", "tank/data@manual"], "own"),
        (["zfs", "snapshot", "tank/other@zbackupd_20250101T000000Z"], "roots"),
        (["zfs", "list", "-H", "-p", "-t", "snapshot", "-o", "name,guid,createtxg,creation",
          "-s", "createtxg", "-r", "tank"], "roots"),
        (["zfs", "send", "-R", "-w", SNAP], "not a command"),
        (["zfs", "send", "-w", "tank/other@s"], "roots"),
        (["zfs", "send", "-w", "-i", "tank/home@s", SNAP], "one dataset"),
        (["zfs", "send", "-e", SNAP], "not a command"),
        (["zfs", "send", "-w", SNAP, "extra"], "not a command"),
        (["zfs", "hold", "keep", SNAP], "own"),
        (["zfs", "release", "zbackupd_disk1", "tank/x@s"], "roots"),
        (["zfs", "bookmark", SNAP, "tank/data#manual"], "own"),
        (["zfs", "get", "-H", "-p", "-o", "name,property,value", "all", "tank/data"],
         "not a command"),
        (["zfs", "get", "-H", "-p", "-o", "name,property,value", "written", "tank/data"],
         "not a command"),
        (["zfs", "receive", "-F", "tank/data"], "not a command"),
        (["zfs", "set", "readonly=off", "tank/data"], "not a command"),
        (["sh", "-c", "zfs list"], "not a command"),
        (["zfs", "snapshot", "tank/data@zbackupd_20250101T000000Z;reboot"], ""),
        (["zfs", "send", "-t", "$(reboot)"], "resume token"),
        (["zfs", "send", "-t", make_token("tank/secret@s")], "roots"),
        (["zfs", "send", "-t", REAL_TOKEN], "roots"),
        (["zfs", "send", "-t", TOKEN[:-2] + "00"], "resume token"),
        ([], "not a command"),
    ],
)  # fmt: skip
def test_the_gate_refuses_everything_else(argv: list[str], why: str) -> None:
    outcome = zargv.match_remote_argv(argv, ROOTS)
    assert isinstance(outcome, Refusal)
    assert why in outcome.reason
    assert outcome.argv == tuple(argv)


def test_the_gate_reports_kind_and_datasets() -> None:
    outcome = zargv.match_remote_argv(zargv.send_incremental(MARK, SNAP, Encryption.PLAIN), ROOTS)
    assert isinstance(outcome, RemoteCommand)
    assert outcome.kind is RemoteKind.SEND
    assert outcome.shape == "send_incremental_plain"
    assert outcome.datasets == ("tank/data",)


def test_real_resume_token_decodes_to_its_snapshot() -> None:
    contents = zargv.decode_resume_token(REAL_TOKEN)
    assert contents.toname == "pool1/test@a"
    assert contents.toguid == 0x595D9F81AA9DDDAB
    assert contents.fromguid is None
    assert contents.raw is False
    outcome = zargv.match_remote_argv(zargv.send_resume(REAL_TOKEN), ["pool1/test"])
    assert isinstance(outcome, RemoteCommand)
    assert outcome.datasets == ("pool1/test",)


def test_real_incremental_token_decodes_to_its_snapshot_and_source() -> None:
    contents = zargv.decode_resume_token(REAL_INCREMENTAL_TOKEN)
    assert contents.toname == "send/test/l0_0/l1_1/l2_3@syncoid_orion_2025-02-24:14:16:39-GMT-06:00"
    assert contents.fromguid == 14571144468402690843
    assert isinstance(
        zargv.match_remote_argv(["zfs", "send", "-t", REAL_INCREMENTAL_TOKEN], ["send/test"]),
        RemoteCommand,
    )


def test_encoded_tokens_round_trip() -> None:
    contents = zargv.decode_resume_token(TOKEN)
    assert (contents.toname, contents.toguid, contents.fromguid, contents.raw) == (SNAP, 7, 5, True)


@pytest.mark.parametrize(
    ("token", "why"),
    [
        (REAL_TOKEN.replace("1-bf31", "2-bf31", 1), "version"),
        (REAL_TOKEN.replace("-b8-", "-b9-", 1), "length"),
        (REAL_TOKEN[:-4] + "0000", "checksum"),
        (make_token("tank/a@s b"), "snapshot"),
    ],
)
def test_damaged_tokens_are_refused(token: str, why: str) -> None:
    with pytest.raises((InvalidArgument, InvalidName)) as caught:
        zargv.decode_resume_token(token)
    assert why in str(caught.value)


def test_the_gate_honours_a_configured_prefix() -> None:
    snap = names.run_snapshot_name("tank/data", datetime(2025, 1, 1, tzinfo=UTC), prefix="site")
    built = zargv.snapshot([snap])
    assert isinstance(zargv.match_remote_argv(built, ROOTS, prefix="site"), RemoteCommand)
    assert isinstance(zargv.match_remote_argv(built, ROOTS), Refusal)


# Property: whatever the remote builders produce from names in the grammar, the gate
# accepts when the roots cover them (and the names are zbackupd's own where required).

COMPONENT = st.from_regex(r"[A-Za-z0-9_.:-]{1,12}", fullmatch=True).filter(
    lambda c: c not in (".", "..")
)
DATASET = st.builds(
    lambda pool, parts: "/".join([pool, *parts]),
    st.from_regex(r"[a-b][a-z0-9_]{0,6}", fullmatch=True),
    st.lists(COMPONENT, max_size=3),
)
WHEN = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)
LABEL = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)
MODE = st.sampled_from(list(Encryption))


@st.composite
def remote_commands(draw: st.DrawFn) -> tuple[tuple[str, ...], list[str]]:
    dataset = draw(DATASET)
    other = draw(DATASET)
    own = names.run_snapshot_name(dataset, draw(WHEN))
    own2 = names.run_snapshot_name(dataset, draw(WHEN))
    any_snap = f"{dataset}@{draw(COMPONENT)}"
    label = draw(LABEL)
    mark = names.cursor_bookmark_name(dataset, label)
    mode = draw(MODE)
    estimate = draw(st.booleans())
    recursive = draw(st.booleans())
    token = make_token(
        own, toguid=draw(st.integers(0, 2**64 - 1)), fromguid=draw(st.integers(1, 2**64 - 1))
    )
    built = draw(
        st.sampled_from(
            [
                zargv.list_snapshots([dataset, other], recursive=recursive),
                zargv.list_bookmarks([dataset], recursive=recursive),
                zargv.list_snapshots_and_bookmarks([dataset], recursive=recursive),
                zargv.list_datasets([dataset]),
                zargv.holds([any_snap, own]),
                zargv.snapshot([own, names.run_snapshot_name(other, draw(WHEN))]),
                zargv.snapshot([own], recursive=True),
                zargv.hold(names.hold_tag(label), [any_snap, own]),
                zargv.release(names.hold_tag(label), [own]),
                zargv.bookmark(any_snap, mark),
                zargv.destroy_snapshots(dataset, [own.partition("@")[2], own2.partition("@")[2]]),
                zargv.destroy_bookmark(mark),
                zargv.send_full(any_snap, mode, estimate=estimate),
                zargv.send_incremental(mark, own, mode, estimate=estimate),
                zargv.send_incremental(any_snap, own, mode, intermediates=True, estimate=estimate),
                zargv.send_resume(token, estimate=estimate),
            ]
        )
    )
    return built, [dataset, other]


@given(command=remote_commands())
def test_the_gate_accepts_every_remote_argv_the_builders_emit(
    command: tuple[tuple[str, ...], list[str]],
) -> None:
    built, roots = command
    outcome = zargv.match_remote_argv(built, roots)
    assert isinstance(outcome, RemoteCommand), outcome
    assert outcome.argv == built


@given(command=remote_commands())
def test_the_gate_refuses_them_all_outside_the_roots(
    command: tuple[tuple[str, ...], list[str]],
) -> None:
    built, _ = command
    outcome = zargv.match_remote_argv(built, ["zz/elsewhere"])
    assert isinstance(outcome, Refusal)


def test_resume_token_captured_from_openzfs_2_3_2_decodes() -> None:
    """The token a cut receive left in tests/data/zfs-output decodes to what
    ``zfs send -nvP -t`` printed about the same token."""
    captured = Path(__file__).resolve().parents[1] / "data" / "zfs-output"
    text = (captured / "zfs-get-receive-state-token.stdout").read_text(encoding="utf-8")
    token = next(
        line.split("\t")[2] for line in text.splitlines() if "\treceive_resume_token\t" in line
    )
    printed = dict(
        line.strip().split(" = ", 1)
        for line in (captured / "zfs-send-nvP-resume.stdout").read_text().splitlines()
        if " = " in line
    )
    contents = zargv.decode_resume_token(token)
    assert contents.toname == printed["toname"] == "tank/secure@s3"
    assert contents.toguid == int(printed["toguid"], 16)
    assert contents.fromguid == int(printed["fromguid"], 16)
    assert contents.raw is ("rawok" in printed)
    accepted = zargv.match_remote_argv(zargv.send_resume(token), ["tank/secure"])
    assert isinstance(accepted, RemoteCommand)
    assert isinstance(zargv.match_remote_argv(zargv.send_resume(token), ["tank/plain"]), Refusal)

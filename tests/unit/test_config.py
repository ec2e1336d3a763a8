"""Configuration loading: every example validates, every broken file is refused with the
file name and the dotted key, and all problems come out in one error."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from pydantic import ValidationError

from zbackupd.config import (
    DEFAULT_CIPHERS,
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    ConfigProblem,
    SourceDataset,
    glob_matches,
    load_config,
    parse_config,
)
from zbackupd.core.model import DiskIdentity
from zbackupd.errors import PermanentError

REPO = Path(__file__).resolve().parents[2]
#: Daemon configurations; ``gate.toml`` is the server-side gate's (validated in test_gate).
EXAMPLES = sorted(
    path for path in (REPO / "docs" / "examples").glob("*.toml") if path.name != "gate.toml"
)
INVALID = sorted((REPO / "tests" / "data" / "invalid-configs").glob("*.toml"))

ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIUbOiy4xwbpskbVaVgiTnx+sBj4wAc8iSK2jPAcBHI4"
ECDSA = (
    "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBOkreiyDyLQc6dtDf"
    "VaGY3P+IryTPwPbGBSwKE3QUWVx1AlxzdznDyNRMz2GRXIyeYUhUV8RzyghlCftIgGdD94="
)


def source_block(
    *, name: str = "backup", extra: str = "", datasets: str = 'root = "tank/backups"'
) -> str:
    return f"""
[[sources]]
name = "{name}"
host = "backup.example.org"
user = "zbackupd"
host_key = "{ED25519}"
{extra}

[[sources.datasets]]
{datasets}
"""


def disk_block(
    *,
    label: str = "offsite-a",
    serial: str = "WD-WX12A3456789",
    pool_guid: str = '"11856427362548921357"',
    extra: str = "",
) -> str:
    return f"""
[[disks]]
label = "{label}"
serial = "{serial}"
pool_guid = {pool_guid}
pool_name = "zbackup"
{extra}
"""


def parse(text: str) -> Config:
    return parse_config(text, source="test.toml")


def refusal(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    return caught.value


def keys_of(error: ConfigError) -> set[str]:
    return {problem.key for problem in error.problems}


# ------------------------------------------------------------------ examples and corpus


def test_there_are_examples_to_check() -> None:
    names = {path.name for path in EXAMPLES}
    assert {"minimal.toml", "full.toml", "sanoid-reuse.toml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_every_example_validates(path: Path) -> None:
    config = load_config(path)
    assert config.sources
    assert config.disks
    for disk in config.disks:
        assert config.sources_for(disk)


def test_full_example_sets_every_option_it_documents() -> None:
    config = load_config(REPO / "docs" / "examples" / "full.toml")
    first = config.disks[0]
    assert first.sources == ("backup", "mail")
    assert first.explicit_target_root == "zbackup/backup"
    assert config.daemon.metrics_file == Path("/var/lib/prometheus/node-exporter/zbackupd.prom")
    assert config.sources[0].datasets[1].snapshots == "reuse"
    assert config.sources[1].port == 2222
    assert config.sources[0].keep_own_snapshots == 1
    assert config.sources[1].datasets[0].recursive is False
    # The per-disk retention overrides two keys and inherits the rest.
    assert config.retention_for(first).monthly == 24
    assert config.retention_for(first).daily == config.retention.daily


def test_the_corpus_covers_the_required_cases() -> None:
    expected_keys = {path.read_text().splitlines()[0] for path in INVALID}
    assert len(INVALID) >= 10
    for required in (
        "daemon.state_dirr",  # unknown key
        "sources[0].port",  # wrong type
        "disks[0].serial",
        "sources[0].datasets[0].root",
        "disks[1].label",
        "disks[1].pool_guid",
        "sources[0].datasets[0].reuse_pattern",
        "disks[0].target_root",
        "sources[0].host_key",
        "line 8, column 7",  # TOML syntax error
    ):
        assert f"# expect: {required}" in expected_keys


@pytest.mark.parametrize("path", INVALID, ids=lambda path: path.stem)
def test_every_invalid_config_is_refused_naming_file_and_key(path: Path) -> None:
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# expect: "), "each invalid config states what to expect"
    expected = first_line.removeprefix("# expect: ")

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    error = caught.value
    assert error.path == str(path)
    lines = str(error).splitlines()
    matching_lines = [line for line in lines if line.startswith(f"{path}: ") and expected in line]
    assert matching_lines, f"no line names {path} and {expected!r}:\n{error}"
    if expected.startswith("line "):  # a TOML syntax error has a position, not a key
        assert error.problems[0].key == ""
        assert "TOML syntax error" in error.problems[0].message
    else:
        assert expected in keys_of(error)


# ------------------------------------------------------------------ all problems at once


def test_several_problems_are_reported_together_in_one_error() -> None:
    text = (
        "[daemon]\nstale_disk_warning_dayz = 3\n"
        + source_block(extra='port = "22"', datasets='root = "tank/vm"\nsnapshots = "reuse"')
        + disk_block(serial="has space")
        + disk_block(serial="S2")
        + disk_block(label="offsite-a", serial="S3", pool_guid="5307193027441285118")
        + disk_block(label="offsite-d", serial="S4", pool_guid="5307193027441285118")
    )
    error = refusal(text)
    assert keys_of(error) >= {
        "daemon.stale_disk_warning_dayz",  # unknown key
        "sources[0].port",  # wrong type, in a source that is otherwise fine
        "sources[0].datasets[0].reuse_pattern",  # relation inside that broken source
        "disks[0].serial",  # bad shape
        "disks[2].label",  # duplicate of disks[1], found although disks[0] is broken
        "disks[3].pool_guid",  # duplicate GUID among the valid entries
    }
    lines = str(error).splitlines()
    assert len(lines) == len(error.problems)
    assert all(line.startswith("test.toml: ") for line in lines)


def test_relations_are_still_checked_while_another_entry_is_broken() -> None:
    text = (
        source_block()
        + disk_block(serial="bad serial", label="broken")
        + disk_block(label="same", serial="S1", pool_guid="1")
        + disk_block(label="same", serial="S2", pool_guid="2")
    )
    error = refusal(text)
    assert keys_of(error) == {"disks[0].serial", "disks[2].label"}


def test_a_broken_item_does_not_also_report_its_array_as_too_short() -> None:
    error = refusal(source_block(datasets='root = "tank/a@snap"') + disk_block())
    assert keys_of(error) == {"sources[0].datasets[0].root"}


# ------------------------------------------------------------------ defaults and helpers


def test_minimal_config_gets_the_documented_defaults() -> None:
    config = parse(source_block() + disk_block())
    source = config.sources[0]
    disk = config.disks[0]
    assert source.port == 22
    assert source.ciphers == DEFAULT_CIPHERS
    assert source.ciphers[0] == "aes128-gcm@openssh.com"
    assert source.window_bytes == 16 * 1024 * 1024
    assert source.keepalive_interval == 15.0
    dataset = source.datasets[0]
    assert (dataset.recursive, dataset.snapshots, dataset.snapshot_prefix) == (
        True,
        "create",
        "zbackupd",
    )
    assert disk.target_root == "zbackup/backup"
    assert disk.sources is None
    assert config.daemon.state_dir == Path("/var/lib/zbackupd")
    assert config.daemon.control_socket == Path("/run/zbackupd/control.sock")
    assert config.daemon.stale_disk_warning_days == 14
    assert config.daemon.metrics_file is None
    assert config.daemon.ssh_key_file == Path("/var/lib/zbackupd/ssh/id_ed25519")
    assert config.daemon.keys_dir == Path("/var/lib/zbackupd/keys")
    assert config.retention.keep_last >= 1
    assert str(DEFAULT_CONFIG_PATH) == "/etc/zbackupd/zbackupd.toml"


def test_disk_lookups_and_identity() -> None:
    config = parse(
        source_block() + disk_block() + disk_block(label="offsite-b", serial="S2", pool_guid="42")
    )
    second = config.disk_by_label("offsite-b")
    assert second is not None
    assert config.disk_by_serial("S2") is second
    assert config.disk_by_pool_guid(42) is second
    assert config.disk_by_serial("nope") is None
    assert config.disk_by_label("nope") is None
    assert second.identity == DiskIdentity(
        serial="S2", pool_guid=42, pool_name="zbackup", label="offsite-b"
    )


def test_sources_for_a_disk_respects_its_restriction() -> None:
    config = parse(
        source_block(name="backup")
        + source_block(name="mail", datasets='root = "data/mail"')
        + disk_block(extra='sources = ["mail"]')
        + disk_block(label="all", serial="S2", pool_guid="2")
    )
    restricted, unrestricted = config.disks
    assert [s.name for s in config.sources_for(restricted)] == ["mail"]
    assert [s.name for s in config.sources_for(unrestricted)] == ["backup", "mail"]
    assert config.source_by_name("mail") is config.sources[1]


def test_per_disk_retention_overrides_only_the_keys_it_sets() -> None:
    config = parse(
        "[retention]\nkeep_last = 2\ndaily = 10\n"
        + source_block()
        + disk_block()
        + "\n[disks.retention]\ndaily = 3\nyearly = 9\n"
        + disk_block(label="plain", serial="S2", pool_guid="2")
    )
    overridden = config.retention_for(config.disks[0])
    assert (overridden.keep_last, overridden.daily, overridden.yearly) == (2, 3, 9)
    assert config.retention_for(config.disks[1]) == config.retention


def test_models_are_frozen() -> None:
    config = parse(source_block() + disk_block())
    with pytest.raises(ValidationError):
        config.disks[0].label = "other"


def test_config_built_in_code_gets_the_relation_checks_too() -> None:
    disk = {"label": "a", "serial": "S", "pool_guid": 1, "pool_name": "zbackup"}
    document = {
        "sources": (
            {
                "name": "backup",
                "host": "h",
                "user": "u",
                "host_key": ED25519,
                "datasets": ({"root": "tank"},),
            },
        ),
        "disks": (disk, {**disk, "serial": "T", "pool_guid": 2}),
    }
    with pytest.raises(ValidationError, match="duplicate label"):
        Config.model_validate(document)


# ------------------------------------------------------------------ field rules


@pytest.mark.parametrize(
    ("pool_guid", "expected"),
    [
        ("1", 1),
        ("11856427362548921357", 11856427362548921357),  # > 2**63: needs the string form
        ("18446744073709551615", 2**64 - 1),
        ("5307193027441285118", 5307193027441285118),
        ("5307193027441285118".join('""'), 5307193027441285118),
    ],
)
def test_pool_guid_accepts_integers_and_digit_strings(pool_guid: str, expected: int) -> None:
    config = parse(source_block() + disk_block(pool_guid=pool_guid))
    assert config.disks[0].pool_guid == expected


@pytest.mark.parametrize(
    "pool_guid", ['"0"', "0", '"18446744073709551616"', "-5", '"12a"', "true", "1.5", '"+5"']
)
def test_pool_guid_refuses_what_is_not_a_uint64(pool_guid: str) -> None:
    assert keys_of(refusal(source_block() + disk_block(pool_guid=pool_guid))) == {
        "disks[0].pool_guid"
    }


@pytest.mark.parametrize(
    "root",
    [
        "tank",
        "tank/backups",
        "Tank2/a.b/c:d/e-f/g_h",
        "tank/" + "x" * 250,  # 255 characters
    ],
)
def test_valid_dataset_roots(root: str) -> None:
    config = parse(source_block(datasets=f'root = "{root}"') + disk_block())
    assert config.sources[0].datasets[0].root == root


@pytest.mark.parametrize(
    "root",
    [
        "",
        "/tank",
        "tank/",
        "tank//a",
        "tank/a@snap",
        "tank/a#mark",
        "tank/a b",
        "tank/-a",
        "tank/x%y",
        "1tank/a",
        "tank/" + "x" * 251,  # 256 characters
    ],
)
def test_invalid_dataset_roots(root: str) -> None:
    error = refusal(source_block(datasets=f'root = "{root}"') + disk_block())
    assert keys_of(error) == {"sources[0].datasets[0].root"}


@pytest.mark.parametrize(
    "pool_name", ["mirror", "raidz2", "draid1", "spare", "log", "c0t0d0", "9x", "_p"]
)
def test_reserved_or_malformed_pool_names_are_refused(pool_name: str) -> None:
    text = source_block() + disk_block().replace('"zbackup"', f'"{pool_name}"')
    assert keys_of(refusal(text)) == {"disks[0].pool_name"}


@pytest.mark.parametrize("pool_name", ["zbackup", "tank", "c", "cold.pool:2", "Z-1"])
def test_ordinary_pool_names_are_accepted(pool_name: str) -> None:
    config = parse(source_block() + disk_block().replace('"zbackup"', f'"{pool_name}"'))
    assert config.disks[0].target_root == f"{pool_name}/backup"


@pytest.mark.parametrize("target_root", ["zbackup", "zbackup/backup", "zbackup/a/b"])
def test_target_root_inside_the_pool_is_accepted(target_root: str) -> None:
    config = parse(source_block() + disk_block(extra=f'target_root = "{target_root}"'))
    assert config.disks[0].target_root == target_root


@pytest.mark.parametrize("target_root", ["zbackup2/backup", "rpool", "zbackupx"])
def test_target_root_outside_the_pool_is_refused(target_root: str) -> None:
    error = refusal(source_block() + disk_block(extra=f'target_root = "{target_root}"'))
    assert keys_of(error) == {"disks[0].target_root"}


@pytest.mark.parametrize("serial", ["", "WD WX1", "tab\there", "new\\nline", "bell\\u0007"])
def test_bad_serials_are_refused(serial: str) -> None:
    assert keys_of(refusal(source_block() + disk_block(serial=serial))) == {"disks[0].serial"}


@pytest.mark.parametrize("label", ["Offsite", "a b", "-a", "", "x" * 33, "a.b"])
def test_bad_labels_are_refused(label: str) -> None:
    assert keys_of(refusal(source_block() + disk_block(label=label))) == {"disks[0].label"}


def test_host_key_is_normalised_without_its_comment() -> None:
    text = source_block().replace(ED25519, ED25519 + " root@backup") + disk_block()
    assert parse(text).sources[0].host_key == ED25519


def test_ecdsa_host_keys_are_accepted() -> None:
    config = parse(source_block().replace(ED25519, ECDSA) + disk_block())
    assert config.sources[0].host_key == ECDSA


@pytest.mark.parametrize(
    ("host_key", "reason"),
    [
        ("AAAAC3NzaC1lZDI1NTE5AAAAIIUbOiy4xwbpskbVaVgiTnx", "public key line"),
        ("ssh-dss AAAAB3NzaC1kc3M=", "unknown key type"),
        ("ssh-ed25519 not*base64", "base64"),
        (ED25519[:-6], "base64"),  # truncated mid-quantum
        (ED25519[:-4], "wrong length"),  # truncated on a quantum boundary
        ("ssh-rsa " + ED25519.split()[1], "not a ssh-rsa key"),  # type and data disagree
        ("backup.example.org " + ED25519, "known_hosts"),
    ],
)
def test_malformed_host_keys_are_refused(host_key: str, reason: str) -> None:
    error = refusal(source_block().replace(ED25519, host_key) + disk_block())
    assert keys_of(error) == {"sources[0].host_key"}
    assert reason in str(error)


@pytest.mark.parametrize("host", ["192.0.2.1", "2001:db8::1", "backup", "a-b.example.org."])
def test_hosts_are_accepted(host: str) -> None:
    config = parse(source_block().replace("backup.example.org", host) + disk_block())
    assert config.sources[0].host == host


@pytest.mark.parametrize("host", ["[2001:db8::1]", "backup.example.org:22", "-oProxy", "a..b"])
def test_bad_hosts_are_refused(host: str) -> None:
    error = refusal(source_block().replace("backup.example.org", host) + disk_block())
    assert keys_of(error) == {"sources[0].host"}


def test_transport_options() -> None:
    extra = 'ciphers = ["aes256-gcm@openssh.com"]\nwindow_bytes = "4 MiB"\nkeepalive_interval = 5'
    source = parse(source_block(extra=extra) + disk_block()).sources[0]
    assert source.ciphers == ("aes256-gcm@openssh.com",)
    assert source.window_bytes == 4 * 1024 * 1024
    assert source.keepalive_interval == 5.0


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ('ciphers = ["3des-cbc"]', "sources[0].ciphers[0]"),
        ("ciphers = []", "sources[0].ciphers"),
        ('ciphers = ["aes128-ctr", "aes128-ctr"]', "sources[0].ciphers"),
        ("window_bytes = 1024", "sources[0].window_bytes"),
        ('window_bytes = "16 MB"', "sources[0].window_bytes"),
        ("window_bytes = 4294967296", "sources[0].window_bytes"),
        ("keepalive_interval = 0", "sources[0].keepalive_interval"),
        ("port = 0", "sources[0].port"),
        ("port = 65536", "sources[0].port"),
        ('user = "-oProxyCommand"', "sources[0].user"),
    ],
)
def test_bad_transport_options_are_refused(extra: str, key: str) -> None:
    text = source_block(extra=extra) + disk_block()
    if extra.startswith("user"):
        text = text.replace('user = "zbackupd"\n', "")
    assert keys_of(refusal(text)) == {key}


@pytest.mark.parametrize(
    ("datasets", "key"),
    [
        ('root = "tank"\nsnapshots = "reuse"', "reuse_pattern"),
        ('root = "tank"\nreuse_pattern = "autosnap_*"', "reuse_pattern"),
        ('root = "tank"\nrecursive = false\ninclude = ["a"]', "include"),
        ('root = "tank"\nrecursive = false\nexclude = ["a"]', "exclude"),
        ('root = "tank"\nsnapshots = "sometimes"', "snapshots"),
        ('root = "tank"\nsnapshot_prefix = "_x"', "snapshot_prefix"),
        ('root = "tank"\nexclude = ["/abs"]', "exclude[0]"),
        ('root = "tank"\nexclude = ["a[b"]', "exclude[0]"),
        ('root = "tank"\nsnapshots = "reuse"\nreuse_pattern = "tank@daily*"', "reuse_pattern"),
        ('root = "tank"\nrecursive = "yes"', "recursive"),
    ],
)
def test_snapshot_mode_and_filters_are_checked(datasets: str, key: str) -> None:
    error = refusal(source_block(datasets=datasets) + disk_block())
    assert keys_of(error) == {f"sources[0].datasets[0].{key}"}


@pytest.mark.parametrize(
    ("second_root", "second_recursive", "refused"),
    [
        ("tank/backups", True, True),  # the same root twice
        ("tank/backups/hosts", True, True),  # inside a recursive root
        ("tank", True, True),  # containing the first, recursively
        ("tank", False, False),  # the parent alone does not overlap
        ("tank/backupsX", True, False),  # a sibling sharing a prefix of characters
    ],
)
def test_overlapping_roots_within_one_source(
    second_root: str, second_recursive: bool, refused: bool
) -> None:
    datasets = (
        'root = "tank/backups"\n\n[[sources.datasets]]\n'
        f'root = "{second_root}"\nrecursive = {str(second_recursive).lower()}'
    )
    text = source_block(datasets=datasets) + disk_block()
    if refused:
        assert keys_of(refusal(text)) == {"sources[0].datasets[1].root"}
    else:
        assert len(parse(text).sources[0].datasets) == 2


def test_the_same_root_in_two_sources_is_fine() -> None:
    config = parse(source_block(name="a") + source_block(name="b") + disk_block())
    assert [s.name for s in config.sources] == ["a", "b"]


@pytest.mark.parametrize(
    ("daemon", "key"),
    [
        ('state_dir = "var/lib/zbackupd"', "daemon.state_dir"),
        ("state_dir = 5", "daemon.state_dir"),
        ("stale_disk_warning_days = -1", "daemon.stale_disk_warning_days"),
        ('metrics_file = "/tmp/zbackupd.txt"', "daemon.metrics_file"),
    ],
)
def test_daemon_settings_are_checked(daemon: str, key: str) -> None:
    assert keys_of(refusal(f"[daemon]\n{daemon}\n" + source_block() + disk_block())) == {key}


@pytest.mark.parametrize(
    ("retention", "key"),
    [
        ("keep_last = 0", "retention.keep_last"),
        ("daily = -1", "retention.daily"),
        ("weekly = true", "retention.weekly"),
        ("monthly = 1.0", "retention.monthly"),
        ("decade = 1", "retention.decade"),
    ],
)
def test_retention_is_checked(retention: str, key: str) -> None:
    text = f"[retention]\n{retention}\n" + source_block() + disk_block()
    assert keys_of(refusal(text)) == {key}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "must be greater than or equal to 1"),
        ("-2", "must be greater than or equal to 1"),
        ("true", "expected an integer, got a boolean True"),
        ('"2"', "expected an integer, got a string '2'"),
    ],
)
def test_keep_own_snapshots_is_a_whole_number_of_at_least_one(value: str, message: str) -> None:
    error = refusal(source_block(extra=f"keep_own_snapshots = {value}") + disk_block())
    assert str(error) == f"test.toml: sources[0].keep_own_snapshots: {message}"


def test_keep_own_snapshots_defaults_to_one_per_source() -> None:
    config = parse(
        source_block() + source_block(name="other", extra="keep_own_snapshots = 3") + disk_block()
    )
    assert [source.keep_own_snapshots for source in config.sources] == [1, 3]


def test_zero_disks_is_a_valid_first_setup() -> None:
    assert parse(source_block()).disks == ()


# ------------------------------------------------------------------ messages


def test_unknown_key_suggests_the_closest_real_one() -> None:
    error = refusal(source_block() + disk_block(extra='pool_giud = "1"'))
    assert "disks[0].pool_giud: unknown key; did you mean 'pool_guid'?" in str(error)


def test_unknown_key_far_from_any_lists_the_allowed_ones() -> None:
    error = refusal("[daemon]\nzzz = 1\n" + source_block() + disk_block())
    assert "allowed here: state_dir, control_socket" in str(error)


def test_a_type_error_says_what_was_expected_and_found() -> None:
    error = refusal(source_block(extra='port = "22"') + disk_block())
    assert str(error) == "test.toml: sources[0].port: expected an integer, got a string '22'"


def test_a_table_where_an_array_of_tables_belongs_is_reported() -> None:
    text = source_block() + '[disks]\nlabel = "a"\n'
    assert keys_of(refusal(text)) == {"disks"}


def test_syntax_errors_name_the_line_and_column() -> None:
    error = refusal('[daemon]\nstate_dir = "/x"\nstate_dir = "/y"\n')
    assert error.problems[0].key == ""
    assert str(error).startswith("test.toml: TOML syntax error at line 3, column ")


def test_unreadable_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(missing)
    assert str(caught.value) == f"{missing}: cannot read the file: No such file or directory"
    assert caught.value.path == str(missing)


def test_a_directory_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"^{tmp_path}: cannot read the file"):
        load_config(tmp_path)


def test_non_utf8_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[daemon]\nstate_dir = "/var/lib/z\xe9"\n')
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 32\)"):
        load_config(path)


def test_a_leading_byte_order_mark_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "bom.toml"
    path.write_text("\ufeff" + source_block() + disk_block(), encoding="utf-8")
    assert load_config(path).disks[0].label == "offsite-a"


def test_config_error_is_permanent_and_survives_pickling() -> None:
    error = refusal(source_block() + disk_block(serial="a b"))
    assert isinstance(error, PermanentError)
    assert error.transient is False
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 -- our own object, round trip
    assert copy.problems == error.problems
    assert str(copy) == str(error)
    assert isinstance(error.problems[0], ConfigProblem)


# ------------------------------------------------------------------ dataset selection


def dataset(**fields: object) -> SourceDataset:
    return SourceDataset.model_validate({"root": "tank/b", **fields})


@pytest.mark.parametrize(
    ("name", "selected"),
    [
        ("tank/b", True),  # the root always
        ("tank/b/hosts/web", True),
        ("tank/b/hosts/web/var", True),  # below an included dataset
        ("tank/b/hosts/web/tmp", False),  # excluded, one level under hosts/*
        ("tank/b/hosts/web/tmp/cache", False),  # below an excluded dataset
        ("tank/b/hosts/scratch-1", False),
        ("tank/b/mail", True),
        ("tank/b/other", False),  # matches no include
        ("tank/bx", False),  # not under the root, only sharing characters
        ("tank", False),
    ],
)
def test_include_and_exclude_select_descendants(name: str, selected: bool) -> None:
    entry = dataset(include=("hosts/*", "mail"), exclude=("hosts/*/tmp", "hosts/scratch-*"))
    assert entry.selects(name) is selected


def test_without_filters_a_recursive_root_selects_its_whole_tree() -> None:
    entry = dataset()
    assert entry.selects("tank/b/x/y/z")


def test_a_non_recursive_root_selects_only_itself() -> None:
    entry = dataset(recursive=False)
    assert entry.selects("tank/b")
    assert not entry.selects("tank/b/child")


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("*", "a", True),
        ("*", "a/b", False),  # one component only
        ("**", "a/b", True),
        ("**/tmp", "a/b/tmp", True),
        ("vm-?", "vm-1", True),
        ("vm-?", "vm-10", False),
        ("vm-[0-4]", "vm-3", True),
        ("vm-[!0-4]", "vm-3", False),
        ("vm-[!0-4]", "vm-7", True),
        ("a.b", "axb", False),  # '.' is literal
    ],
)
def test_glob_semantics(pattern: str, name: str, matches: bool) -> None:
    assert glob_matches(pattern, name) is matches


def test_reuse_pattern_matches_short_snapshot_names() -> None:
    entry = dataset(snapshots="reuse", reuse_pattern="autosnap_*_daily")
    assert entry.reuses_snapshot("autosnap_2024-05-01_00:00:01_daily")
    assert not entry.reuses_snapshot("autosnap_2024-05-01_00:00:01_hourly")
    assert not dataset().reuses_snapshot("autosnap_x_daily")


def test_retry_stall_and_keepalive_defaults_and_overrides() -> None:
    """Issue 12 #4/#8: retries of transient failures, stall detection, keepalives."""
    config = parse(source_block() + disk_block())
    daemon, source = config.daemon, config.sources[0]
    assert daemon.retry_window_seconds == 600
    assert daemon.retry_backoff_seconds == (10, 20, 40, 80, 120)
    assert daemon.stall_timeout_seconds == 300
    assert (source.keepalive_interval, source.keepalive_count_max) == (15.0, 4)
    tuned = parse(
        "[daemon]\nretry_window_seconds = 0\nretry_backoff_seconds = [5]\n"
        "stall_timeout_seconds = 20\n"
        + source_block(extra="keepalive_interval = 5\nkeepalive_count_max = 3")
    )
    assert tuned.daemon.retry_window_seconds == 0
    assert tuned.daemon.retry_backoff_seconds == (5,)
    assert tuned.daemon.stall_timeout_seconds == 20
    assert tuned.sources[0].keepalive_count_max == 3


def test_a_sources_datasets_share_one_prefix() -> None:
    """The prefix names run snapshots, holds and cursors; the gate accepts one prefix."""
    same = ('root = "tank/a"\nsnapshot_prefix = "site"\n\n[[sources.datasets]]\n'
            'root = "tank/b"\nsnapshots = "reuse"\nreuse_pattern = "a*"\n'
            'snapshot_prefix = "site"')
    config = parse_config(source_block(datasets=same) + disk_block(), source="t.toml")
    assert {d.snapshot_prefix for d in config.sources[0].datasets} == {"site"}
    mixed = same.replace('reuse_pattern = "a*"\nsnapshot_prefix = "site"', 'reuse_pattern = "a*"')
    error = refusal(source_block(datasets=mixed) + disk_block())
    assert keys_of(error) == {"sources[0].datasets[1].snapshot_prefix"}
    assert "share one prefix" in str(error)

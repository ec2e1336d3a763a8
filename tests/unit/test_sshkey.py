"""The SSH identity: stored only encrypted, loadable only with the derived passphrase."""

from __future__ import annotations

import base64
import stat
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest

from zbackupd.keys.derivation import derive_master_key
from zbackupd.keys.keyfiles import KdfParams
from zbackupd.keys.secret import SecretBytes
from zbackupd.keys.sshkey import (
    IdentityError,
    IdentityExists,
    IdentityMissing,
    IdentityUnreadable,
    InvalidAuthorizedKeysInput,
    authorized_keys_line,
    generate_identity,
    load_identity,
    load_identity_async,
    load_public_key,
    public_key_path,
)


@dataclass(frozen=True)
class Identity:
    path: Path
    passphrase: bytes  # a copy, for the tests only
    public: asyncssh.SSHKey


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> Identity:
    """One real identity per module: bcrypt-pbkdf makes each generate/load ~0.4 s."""
    path = tmp_path_factory.mktemp("ssh") / "private" / "id_ed25519"
    salt = bytes(range(32))
    with (
        derive_master_key(SecretBytes(b"unlock passphrase"), salt, KdfParams(256, 1, 1)) as master,
        master.ssh_passphrase() as passphrase,
    ):
        public = generate_identity(path, passphrase, comment="zbackupd@test")
        return Identity(path, bytes(passphrase), public)


@pytest.fixture(scope="module")
def loaded(identity: Identity) -> asyncssh.SSHKey:
    """The decrypted private key, loaded once for the tests that only inspect it."""
    return load_identity(identity.path, SecretBytes(identity.passphrase))


def _ed25519_seed(key: asyncssh.SSHKey) -> bytes:
    """The 32-byte private seed: the tail of the unencrypted PKCS#8 DER export."""
    return key.export_private_key("pkcs8-der")[-32:]


def test_files_and_modes(identity: Identity) -> None:
    assert stat.S_IMODE(identity.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(public_key_path(identity.path).stat().st_mode) == 0o644
    assert stat.S_IMODE(identity.path.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in identity.path.parent.iterdir()) == [
        "id_ed25519",
        "id_ed25519.pub",
    ]


def test_private_key_file_holds_no_unencrypted_key_material(
    identity: Identity, loaded: asyncssh.SSHKey
) -> None:
    stored = identity.path.read_bytes()
    key = loaded
    seed = _ed25519_seed(key)
    unencrypted = key.export_private_key("openssh")
    assert stored.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert stored != unencrypted
    body = base64.b64decode(b"".join(stored.splitlines()[1:-1]))
    assert b"aes256-ctr" in body
    assert b"bcrypt" in body
    for haystack in (stored, body):
        assert seed not in haystack
        assert base64.b64encode(seed)[:20] not in haystack
    unencrypted_body = base64.b64decode(b"".join(unencrypted.splitlines()[1:-1]))
    assert seed in unencrypted_body  # the check above would have seen it
    assert identity.passphrase not in stored


def test_public_key_file_holds_only_the_public_key(
    identity: Identity, loaded: asyncssh.SSHKey
) -> None:
    key = loaded
    public_text = public_key_path(identity.path).read_bytes()
    assert public_text == key.export_public_key("openssh")
    assert _ed25519_seed(key) not in base64.b64decode(public_text.split()[1])
    assert load_public_key(identity.path).public_data == identity.public.public_data


def test_loads_with_the_right_passphrase(identity: Identity) -> None:
    key = load_identity(identity.path, SecretBytes(identity.passphrase))
    assert key.public_data == identity.public.public_data
    assert key.get_comment() == "zbackupd@test"


async def test_loads_off_the_event_loop(identity: Identity) -> None:
    key = await load_identity_async(identity.path, SecretBytes(identity.passphrase))
    assert key.public_data == identity.public.public_data


def test_refuses_a_wrong_passphrase_without_echoing_it(identity: Identity) -> None:
    wrong = b"f" * 64
    with pytest.raises(IdentityUnreadable) as caught:
        load_identity(identity.path, SecretBytes(wrong))
    assert wrong.decode() not in str(caught.value)
    assert identity.passphrase.decode() not in str(caught.value)


def test_refuses_to_overwrite_an_identity(identity: Identity) -> None:
    before = identity.path.read_bytes()
    with pytest.raises(IdentityExists):
        generate_identity(identity.path, SecretBytes(b"x" * 64))
    assert identity.path.read_bytes() == before


def test_refuses_an_unencrypted_private_key(
    identity: Identity, loaded: asyncssh.SSHKey, tmp_path: Path
) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(loaded.export_private_key("openssh"))
    plain.chmod(0o600)
    with pytest.raises(IdentityError, match="unencrypted"):
        load_identity(plain, SecretBytes(identity.passphrase))


def test_refuses_a_private_key_readable_by_others(identity: Identity, tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.write_bytes(identity.path.read_bytes())
    loose.chmod(0o644)
    with pytest.raises(IdentityError, match="0644"):
        load_identity(loose, SecretBytes(identity.passphrase))


def test_missing_identity_is_reported(tmp_path: Path) -> None:
    with pytest.raises(IdentityMissing):
        load_identity(tmp_path / "nope", SecretBytes(b"x"))
    with pytest.raises(IdentityMissing):
        load_public_key(tmp_path / "nope")


def test_authorized_keys_line_forces_the_gate(identity: Identity) -> None:
    line = authorized_keys_line(identity.public)
    key_text = identity.public.export_public_key("openssh").decode().strip()
    gate = "/opt/zbackupd-gate/bin/zbackupd-gate --config /etc/zbackupd/gate.toml"
    assert line == f'restrict,command="{gate}" {key_text}'
    assert key_text.endswith(" zbackupd@test")
    assert "\n" not in line
    options = asyncssh.import_authorized_keys(line).validate(identity.public, "h", "192.0.2.9")
    assert options is not None
    assert options["restrict"] is True
    assert options["command"] == gate


@pytest.mark.parametrize(
    "gate_command", ["zbackupd-gate", "zbackupd-gate --config /etc/g.toml", "bin/zbackupd-gate"]
)
def test_authorized_keys_line_needs_the_gates_full_path(
    identity: Identity, gate_command: str
) -> None:
    """docs/server-setup.md: sshd runs the forced command through the account's shell and
    PATH; only a full path says which program that is."""
    with pytest.raises(InvalidAuthorizedKeysInput, match="absolute path"):
        authorized_keys_line(identity.public, gate_command=gate_command)


def test_authorized_keys_line_with_from_and_custom_command(identity: Identity) -> None:
    line = authorized_keys_line(
        identity.public,
        gate_command="/usr/bin/zbackupd-gate --config /etc/g.toml",
        from_="192.0.2.7,2001:db8::/32",
    )
    assert line.startswith(
        'restrict,from="192.0.2.7,2001:db8::/32",'
        'command="/usr/bin/zbackupd-gate --config /etc/g.toml" ssh-ed25519 AAAA'
    )
    authorized = asyncssh.import_authorized_keys(line)
    assert authorized.validate(identity.public, "h", "192.0.2.7") is not None
    assert authorized.validate(identity.public, "h", "192.0.2.8") is None  # from= pins


@pytest.mark.parametrize(
    ("gate_command", "from_"),
    [
        ('zbackupd-gate" ,no-restrict', None),
        ("zbackupd-gate\nssh-ed25519 AAAA evil", None),
        ("zbackupd-gate\\", None),
        ("", None),
        ("/usr/bin/zbackupd-gate", '*" ,command="sh'),
        ("/usr/bin/zbackupd-gate", "10.0.0.1\n"),
    ],
)
def test_authorized_keys_line_refuses_quote_breaking_input(
    identity: Identity, gate_command: str, from_: str | None
) -> None:
    with pytest.raises(InvalidAuthorizedKeysInput):
        authorized_keys_line(identity.public, gate_command=gate_command, from_=from_)


def test_generate_refuses_a_comment_with_a_newline(tmp_path: Path) -> None:
    with pytest.raises(InvalidAuthorizedKeysInput):
        generate_identity(tmp_path / "id", SecretBytes(b"x" * 64), comment="a\nb")
    assert not (tmp_path / "id").exists()

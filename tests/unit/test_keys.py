"""Key derivation, the key store files, secret buffers. Small Argon2 params keep it fast."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import pickle
import pty
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from zbackupd.keys.derivation import (
    InvalidDiskLabel,
    InvalidRecoveryKey,
    KeyStore,
    KeyWiped,
    MasterKey,
    WeakPassphrase,
    WrongPassphrase,
    calibrate,
    derive_master_key,
    parse_recovery_key,
)
from zbackupd.keys.keyfiles import (
    FORMAT_VERSION,
    KdfParams,
    KeyStoreCorrupt,
    KeyStoreExists,
    KeyStoreInsecure,
    KeyStoreMissing,
)
from zbackupd.keys.secret import (
    FileExistsRefused,
    SecretBytes,
    SecretInputError,
    prompt_secret,
    read_secret,
    write_file_atomically,
)

FAST = KdfParams(memory_cost_kib=256, iterations=1, lanes=1)
SALT = bytes(range(32))
PASSPHRASE = b"correct horse battery"


def passphrase(value: bytes = PASSPHRASE) -> SecretBytes:
    return SecretBytes(value)


@pytest.fixture
def master() -> Iterator[MasterKey]:
    with derive_master_key(passphrase(), SALT, FAST) as key:
        yield key


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path / "keys")


# --------------------------------------------------------------------- derivation


def test_derivation_is_deterministic_for_the_same_salt_params_and_passphrase() -> None:
    with (
        derive_master_key(passphrase(), SALT, FAST) as first,
        derive_master_key(passphrase(), SALT, FAST) as second,
    ):
        assert first.pool_key("disk-a") == second.pool_key("disk-a")
        assert first.ssh_passphrase() == second.ssh_passphrase()
        assert first.verifier() == second.verifier()


@pytest.mark.parametrize(
    ("other_passphrase", "other_salt", "other_params"),
    [
        (b"correct horse battery!", SALT, FAST),
        (PASSPHRASE, bytes(31) + b"\x01", FAST),
        (PASSPHRASE, SALT, KdfParams(memory_cost_kib=256, iterations=2, lanes=1)),
    ],
    ids=["passphrase", "salt", "params"],
)
def test_every_input_changes_every_key(
    master: MasterKey, other_passphrase: bytes, other_salt: bytes, other_params: KdfParams
) -> None:
    with derive_master_key(passphrase(other_passphrase), other_salt, other_params) as other:
        assert other.pool_key("disk-a") != master.pool_key("disk-a")
        assert other.ssh_passphrase() != master.ssh_passphrase()
        assert other.verifier() != master.verifier()


def test_scheme_matches_the_documented_construction(master: MasterKey) -> None:
    """Pins the derivation: if this changes, every existing disk becomes unreadable."""
    reference_master = Argon2id(
        salt=SALT,
        length=32,
        iterations=FAST.iterations,
        lanes=FAST.lanes,
        memory_cost=FAST.memory_cost_kib,
        ad=b"zbackupd/v1/master-key",
    ).derive(PASSPHRASE)

    def expand(info: bytes) -> bytes:
        return HKDFExpand(hashes.SHA256(), 32, info).derive(reference_master)

    assert bytes(master.pool_key("disk-a")) == expand(b"zbackupd/v1/pool-key/disk-a")
    assert (
        bytes(master.ssh_passphrase()) == expand(b"zbackupd/v1/ssh-key-passphrase").hex().encode()
    )
    assert master.verifier() == expand(b"zbackupd/v1/verifier")


def test_derived_keys_are_independent_and_sized(master: MasterKey) -> None:
    pool_a = bytes(master.pool_key("disk-a"))
    pool_b = bytes(master.pool_key("disk-b"))
    ssh = bytes(master.ssh_passphrase())
    verifier = master.verifier()
    assert len(pool_a) == len(pool_b) == len(verifier) == 32
    assert len(ssh) == 64
    assert all(c in b"0123456789abcdef" for c in ssh)
    values = [pool_a, pool_b, bytes.fromhex(ssh.decode()), verifier]
    assert len(set(values)) == len(values)
    # No key is a prefix/slice of another (independent expansions, not one long stream).
    assert pool_a[:16] not in pool_b + verifier


def test_each_disk_gets_its_own_key(master: MasterKey) -> None:
    labels = ["offsite-a", "offsite-b", "offsite-A", "offsite-a2"]
    disk_keys = {bytes(master.pool_key(label)) for label in labels}
    assert len(disk_keys) == len(labels)


@pytest.mark.parametrize("label", ["", " disk", "disk\n", "a\x00b", "x" * 129])
def test_unusable_disk_labels_are_refused(master: MasterKey, label: str) -> None:
    with pytest.raises(InvalidDiskLabel):
        master.pool_key(label)


def test_returned_keys_are_secret_buffers_that_redact_themselves(master: MasterKey) -> None:
    key = master.pool_key("disk-a")
    assert isinstance(key, SecretBytes)
    assert isinstance(key, bytearray)  # goes straight into Runner.run(stdin_secret=...)
    for text in (repr(key), str(key), f"{key}"):
        assert key.hex() not in text
        assert "bytearray(" not in text
        assert "32 bytes redacted" in text


def test_master_key_repr_leaks_nothing(master: MasterKey) -> None:
    secret_forms = [bytes(master._live()).hex(), repr(bytes(master._live()))]
    for text in (repr(master), str(master)):
        assert all(form not in text for form in secret_forms)
        assert "redacted" in text


def test_wipe_zeroes_the_master_key_and_blocks_further_use() -> None:
    buffer = SecretBytes(b"\x5a" * 32)
    master = MasterKey(buffer)
    master.wipe()
    assert buffer == bytearray(32)
    assert master.is_wiped
    assert "wiped" in repr(master)
    with pytest.raises(KeyWiped):
        master.pool_key("disk-a")
    master.wipe()  # idempotent


def test_master_key_context_manager_wipes_even_on_error() -> None:
    buffer = SecretBytes(b"\x5a" * 32)
    with pytest.raises(RuntimeError), MasterKey(buffer):
        raise RuntimeError("boom")
    assert buffer == bytearray(32)


def test_secret_bytes_wipe_and_context_manager() -> None:
    secret = SecretBytes(b"top secret value")
    with secret as inside:
        assert inside == b"top secret value"
    assert secret == bytearray(len(b"top secret value"))
    assert secret.is_wiped


def test_secrets_refuse_pickling_and_copying(master: MasterKey) -> None:
    key = master.pool_key("disk-a")
    for value in (key, master):
        with pytest.raises(TypeError):
            pickle.dumps(value)
        with pytest.raises(TypeError):
            copy.copy(value)
    with pytest.raises(TypeError):
        copy.deepcopy(key)


# --------------------------------------------------------------------- recovery key


def test_recovery_key_is_grouped_hex_of_the_pool_key(master: MasterKey) -> None:
    text = bytes(master.recovery_key("disk-a")).decode()
    groups = text.split(" ")
    assert len(groups) == 8
    assert all(len(group) == 8 for group in groups)
    assert bytes.fromhex("".join(groups)) == bytes(master.pool_key("disk-a"))


def test_recovery_key_round_trips_through_the_parser(master: MasterKey) -> None:
    typed = SecretBytes(bytes(master.recovery_key("disk-a")).upper().replace(b" ", b"-") + b"\n")
    assert parse_recovery_key(typed) == master.pool_key("disk-a")


@pytest.mark.parametrize("text", [b"", b"00" * 31, b"00" * 33, b"zz" + b"00" * 31])
def test_malformed_recovery_keys_are_refused_without_echo(text: bytes) -> None:
    with pytest.raises(InvalidRecoveryKey) as caught:
        parse_recovery_key(SecretBytes(text))
    if text:
        assert text.decode() not in str(caught.value)


def test_documented_xxd_pipeline_yields_exactly_the_raw_pool_key(master: MasterKey) -> None:
    """docs/keys.md: `echo '<recovery key>' | xxd -r -p | zfs load-key -L prompt <pool>`."""
    typed = bytes(master.recovery_key("disk-a")) + b"\n"
    raw = subprocess.run(
        ["xxd", "-r", "-p"],  # noqa: S607 -- the documented tool, found on PATH like a user would
        input=typed,
        capture_output=True,
        check=True,
    ).stdout
    assert raw == bytes(master.pool_key("disk-a"))
    assert len(raw) == 32  # keyformat=raw wants exactly 32 bytes, no newline


def _documented_recovery_script() -> str:
    text = (Path(__file__).parents[2] / "docs" / "keys.md").read_text()
    block = text.split("<!-- recovery-script -->")[1].split("<!-- /recovery-script -->")[0]
    lines = block.strip().splitlines()
    assert lines[0].strip() == "```python"
    assert lines[-1].strip() == "```"
    return textwrap.dedent("\n".join(lines[1:-1]))


@pytest.mark.parametrize(
    ("typed", "ok"), [(PASSPHRASE, True), (b"wrong horse battery", False)], ids=["right", "wrong"]
)
def test_documented_standalone_recovery_script_derives_the_pool_key(
    store: KeyStore, tmp_path: Path, typed: bytes, ok: bool
) -> None:
    """docs/keys.md promises a script that needs only Python and cryptography: run it."""
    store.create(passphrase(), FAST)
    script = tmp_path / "derive.py"
    script.write_text(_documented_recovery_script())
    result = subprocess.run(
        [sys.executable, str(script), str(store.keys_dir), "disk-a"],
        input=typed + b"\n",
        capture_output=True,
        check=False,
        start_new_session=True,  # no controlling tty: getpass falls back to stdin
    )
    if ok:
        assert result.returncode == 0, result.stderr
        with store.unlock_blocking(passphrase()) as master:
            assert result.stdout == bytes(master.pool_key("disk-a"))
    else:
        assert result.returncode != 0
        assert result.stdout == b""
        assert b"wrong passphrase" in result.stderr


# --------------------------------------------------------------------- key store


async def test_create_then_unlock_gives_the_same_keys_as_the_salt_on_disk(store: KeyStore) -> None:
    store.create(passphrase(), FAST)
    material = store.load()
    assert material.params == FAST
    async with _unlocked(store, passphrase()) as master:
        with derive_master_key(passphrase(), material.salt, FAST) as reference:
            assert master.pool_key("disk-a") == reference.pool_key("disk-a")
            assert master.verifier() == material.verifier


def test_unlock_blocking_matches_async_unlock(store: KeyStore) -> None:
    store.create(passphrase(), FAST)
    with store.unlock_blocking(passphrase()) as master:
        assert master.verifier() == store.load().verifier


async def test_wrong_passphrase_is_refused_and_not_echoed(store: KeyStore) -> None:
    store.create(passphrase(), FAST)
    with pytest.raises(WrongPassphrase) as caught:
        await store.unlock(passphrase(b"wrong horse battery"))
    assert caught.value.transient is False
    assert "wrong horse" not in str(caught.value)
    assert str(store.keys_dir) in str(caught.value)


def test_create_refuses_to_overwrite(store: KeyStore) -> None:
    store.create(passphrase(), FAST)
    salt_before = store.salt_path.read_bytes()
    with pytest.raises(KeyStoreExists):
        store.create(passphrase(b"another passphrase"), FAST)
    assert store.salt_path.read_bytes() == salt_before


def test_create_refuses_a_directory_with_foreign_content(store: KeyStore) -> None:
    store.keys_dir.mkdir(mode=0o700)
    (store.keys_dir / "unrelated").write_text("keep me")
    with pytest.raises(KeyStoreExists):
        store.create(passphrase(), FAST)
    assert (store.keys_dir / "unrelated").read_text() == "keep me"
    assert [p.name for p in store.keys_dir.parent.iterdir()] == ["keys"]  # temp dir removed


def test_create_into_an_existing_empty_directory_works(store: KeyStore) -> None:
    store.keys_dir.mkdir(mode=0o755)
    store.create(passphrase(), FAST)
    assert stat.S_IMODE(store.keys_dir.stat().st_mode) == 0o700
    assert store.load().params == FAST


def test_create_refuses_a_short_passphrase(store: KeyStore) -> None:
    with pytest.raises(WeakPassphrase):
        store.create(passphrase(b"short"), FAST)
    assert not store.keys_dir.exists()


def test_key_store_files_are_private_whatever_the_umask(store: KeyStore) -> None:
    old_umask = os.umask(0)
    try:
        store.create(passphrase(), FAST)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(store.keys_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(store.salt_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.params_path.stat().st_mode) == 0o600
    assert sorted(p.name for p in store.keys_dir.iterdir()) == ["params.json", "salt"]
    assert [p.name for p in store.keys_dir.parent.iterdir()] == ["keys"]  # no temp leftovers


def test_key_store_files_hold_no_passphrase_or_derived_key(store: KeyStore) -> None:
    store.create(passphrase(), FAST)
    on_disk = store.salt_path.read_bytes() + store.params_path.read_bytes()
    with store.unlock_blocking(passphrase()) as master:
        secrets = [
            PASSPHRASE,
            bytes(master._live()),
            bytes(master.pool_key("disk-a")),
            bytes(master.ssh_passphrase()),
        ]
    for secret in secrets:
        assert secret not in on_disk
        assert secret.hex().encode() not in on_disk
    assert len(store.salt_path.read_bytes()) == 32


def test_params_file_is_versioned_json(store: KeyStore) -> None:
    store.create(passphrase(), FAST)
    document = json.loads(store.params_path.read_text())
    assert document["format"] == FORMAT_VERSION
    assert document["kdf"] == "argon2id"
    assert (document["memory_cost_kib"], document["iterations"], document["lanes"]) == (256, 1, 1)
    assert len(bytes.fromhex(document["verifier"])) == 32


def test_load_refuses_a_salt_readable_by_others(store: KeyStore) -> None:
    store.create(passphrase(), FAST)
    store.salt_path.chmod(0o644)
    with pytest.raises(KeyStoreInsecure) as caught:
        store.load()
    assert caught.value.mode == 0o644


def test_load_reports_a_missing_store(store: KeyStore) -> None:
    with pytest.raises(KeyStoreMissing):
        store.load()


@pytest.mark.parametrize(
    "damage",
    [
        lambda doc: {**doc, "format": 99},
        lambda doc: {**doc, "kdf": "scrypt"},
        lambda doc: {**doc, "iterations": "3"},
        lambda doc: {**doc, "lanes": 0},
        lambda doc: {**doc, "verifier": "abcd"},
        lambda doc: [doc],
    ],
    ids=["format", "kdf", "type", "bounds", "verifier", "shape"],
)
def test_load_refuses_damaged_params(store: KeyStore, damage: object) -> None:
    store.create(passphrase(), FAST)
    document = json.loads(store.params_path.read_text())
    assert callable(damage)
    store.params_path.write_text(json.dumps(damage(document)))
    with pytest.raises(KeyStoreCorrupt):
        store.load()


def test_load_refuses_a_truncated_salt(store: KeyStore) -> None:
    store.create(passphrase(), FAST)
    store.salt_path.write_bytes(bytes(16))
    with pytest.raises(KeyStoreCorrupt):
        store.load()


def test_key_material_repr_hides_salt_and_verifier(store: KeyStore) -> None:
    store.create(passphrase(), FAST)
    material = store.load()
    assert material.salt.hex() not in repr(material)
    assert repr(material.salt) not in repr(material)
    assert material.verifier.hex() not in repr(material)


# --------------------------------------------------------------------- calibration


def test_calibrate_scales_iterations_to_the_target() -> None:
    seen: list[KdfParams] = []

    def measure(params: KdfParams) -> float:  # a model machine: 0.1 s per 256 MiB-pass
        seen.append(params)
        return 0.1 * params.iterations * params.memory_cost_kib / (256 * 1024)

    params = calibrate(1.0, memory_cost_kib=256 * 1024, lanes=4, samples=2, measure=measure)
    assert params == KdfParams(memory_cost_kib=256 * 1024, iterations=10, lanes=4)
    assert seen == [KdfParams(256 * 1024, 1, 4)] * 2


def test_calibrate_trusts_the_fastest_sample() -> None:
    """A cold first run or a busy neighbour must not halve the memory cost."""
    timings = iter([2.5, 0.2, 0.25])  # first run faults in 256 MiB; then the real cost
    params = calibrate(1.0, memory_cost_kib=256 * 1024, lanes=4, measure=lambda _: next(timings))
    assert params == KdfParams(memory_cost_kib=256 * 1024, iterations=5, lanes=4)


def test_calibrate_halves_memory_on_a_slow_machine_but_not_below_the_floor() -> None:
    def measure(params: KdfParams) -> float:  # 4 s per 256 MiB-pass
        return 4.0 * params.iterations * params.memory_cost_kib / (256 * 1024)

    params = calibrate(
        1.0, memory_cost_kib=256 * 1024, min_memory_cost_kib=64 * 1024, lanes=4, measure=measure
    )
    assert params == KdfParams(memory_cost_kib=64 * 1024, iterations=1, lanes=4)


def test_calibrate_caps_iterations() -> None:
    params = calibrate(
        1.0, memory_cost_kib=1024, lanes=1, max_iterations=8, measure=lambda _: 0.001
    )
    assert params.iterations == 8


def test_calibrate_with_real_measurements_stays_in_bounds() -> None:
    params = calibrate(
        0.02, memory_cost_kib=2048, min_memory_cost_kib=64, lanes=1, max_iterations=16
    )
    assert 64 <= params.memory_cost_kib <= 2048
    assert 1 <= params.iterations <= 16
    assert params.lanes == 1


def test_calibrate_refuses_a_non_positive_target() -> None:
    with pytest.raises(ValueError, match="positive"):
        calibrate(0, measure=lambda _: 1.0)


# --------------------------------------------------------------------- secret input/files


def _pipe_with(data: bytes) -> int:
    read_end, write_end = os.pipe()
    os.write(write_end, data)
    os.close(write_end)
    return read_end


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"hunter2 pass\nleftover", b"hunter2 pass"),
        (b"windows line\r\n", b"windows line"),
        (b"no newline at eof", b"no newline at eof"),
        (b"\n", b""),
    ],
)
def test_read_secret_reads_one_line(data: bytes, expected: bytes) -> None:
    fd = _pipe_with(data)
    try:
        secret = read_secret(fd)
    finally:
        os.close(fd)
    assert isinstance(secret, SecretBytes)
    assert secret == expected


def test_read_secret_refuses_overlong_input_instead_of_truncating() -> None:
    fd = _pipe_with(b"x" * 40 + b"\n")
    try:
        with pytest.raises(SecretInputError, match="longer than 16"):
            read_secret(fd, max_len=16)
    finally:
        os.close(fd)


def test_prompt_secret_reads_with_echo_off() -> None:
    master_fd, slave_fd = pty.openpty()
    slave_name = os.ttyname(slave_fd)
    result: list[SecretBytes] = []
    reader = threading.Thread(
        target=lambda: result.append(prompt_secret("Passphrase: ", tty_path=slave_name))
    )
    try:
        reader.start()
        shown = b""
        while b"Passphrase: " not in shown:
            shown += os.read(master_fd, 100)
        # The prompt is written before echo goes off; wait until it really is off.
        while termios_echo_on(slave_fd):
            threading.Event().wait(0.01)
        os.write(master_fd, b"s3cret phrase\n")
        reader.join(timeout=5)
        os.close(slave_fd)
        slave_fd = -1
        shown += _drain(master_fd)
    finally:
        if slave_fd >= 0:
            os.close(slave_fd)
        os.close(master_fd)
    assert result == [b"s3cret phrase"]
    assert b"s3cret" not in shown


def termios_echo_on(fd: int) -> bool:
    import termios  # noqa: PLC0415 -- only this pty test needs it

    return bool(termios.tcgetattr(fd)[3] & termios.ECHO)


def _drain(fd: int) -> bytes:
    data = b""
    while True:
        try:
            chunk = os.read(fd, 100)
        except OSError:  # EIO once the slave side is closed
            return data
        if not chunk:
            return data
        data += chunk


def test_write_file_atomically_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    target = tmp_path / "secret.bin"
    write_file_atomically(target, b"first")
    with pytest.raises(FileExistsRefused):
        write_file_atomically(target, b"second")
    assert target.read_bytes() == b"first"
    write_file_atomically(target, b"third", overwrite=True)
    assert target.read_bytes() == b"third"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret.bin"]


# --------------------------------------------------------------------- helpers


@contextlib.asynccontextmanager
async def _unlocked(store: KeyStore, secret: SecretBytes) -> AsyncIterator[MasterKey]:
    """Unlock for the ``async with`` block, then wipe."""
    with await store.unlock(secret) as master:
        yield master

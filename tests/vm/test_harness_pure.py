"""The harness's pure parts, tested without a VM (they run in ``make fast`` too)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.vm.build_image import (
    Image,
    ImageBuildError,
    Mirrors,
    guest_sources_list,
    input_hash,
    parse_apt_sources,
)
from tests.vm.controller import (
    STALE_WORKDIR_SECONDS,
    VmSettings,
    qemu_argv,
    remove_stale_workdirs,
)

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""


def test_deb822_sources_give_archive_and_security_mirrors() -> None:
    assert parse_apt_sources([DEB822]) == Mirrors(
        archive="http://mirror.example/debian", security="http://mirror.example/debian-security"
    )


def test_one_line_sources_are_read_and_deb_src_is_ignored() -> None:
    text = (
        "deb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://local.example/debian/ bookworm main # x\n"
        "deb http://local.example/security bookworm-security main\n"
    )
    assert parse_apt_sources([text]) == Mirrors(
        archive="http://local.example/debian", security="http://local.example/security"
    )


def test_disabled_and_foreign_sources_do_not_count() -> None:
    foreign = "Types: deb\nURIs: https://other.example/node\nSuites: nodistro\n"
    disabled = "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no\n"
    with pytest.raises(ImageBuildError, match="no 'deb' source serves 'bookworm'"):
        parse_apt_sources([foreign, disabled])


def test_guest_sources_add_contrib_and_backports_on_the_host_mirror() -> None:
    text = guest_sources_list(Mirrors("http://m.example/debian", "http://m.example/sec"))
    assert "deb http://m.example/debian bookworm-backports main contrib\n" in text
    assert "deb http://m.example/sec bookworm-security main contrib\n" in text


def test_input_hash_changes_with_any_input_and_not_with_file_order() -> None:
    files = [("etc/a", b"1"), ("etc/b", b"2")]
    base = input_hash(b"builder", files)
    assert input_hash(b"builder", list(reversed(files))) == base
    assert input_hash(b"builder2", files) != base
    assert input_hash(b"builder", [("etc/a", b"1"), ("etc/b", b"3")]) != base
    assert input_hash(b"builder", [("etc/a", b"1"), ("etc/c", b"2")]) != base


def _image(tmp_path: Path) -> Image:
    return Image(
        directory=tmp_path,
        rootfs=tmp_path / "rootfs.img",
        kernel=tmp_path / "vmlinuz",
        initrd=tmp_path / "initrd.img",
        ssh_key=tmp_path / "id_ed25519",
        host_public_key=tmp_path / "host.pub",
        input_hash="0" * 16,
        zfs_version="2.3.2",
        kernel_release="6.1.0",
    )


def _argv(tmp_path: Path, settings: VmSettings) -> list[str]:
    return qemu_argv(
        _image(tmp_path),
        overlay=tmp_path / "o.qcow2",
        source_disk=tmp_path / "s.img",
        settings=settings,
        ssh_port=40022,
        console_log=tmp_path / "console.log",
        qmp_socket=tmp_path / "qmp.sock",
        pidfile=tmp_path / "qemu.pid",
    )


def test_qemu_uses_tcg_by_default_and_kvm_only_on_request(tmp_path: Path) -> None:
    tcg = _argv(tmp_path, VmSettings())
    assert tcg[tcg.index("-accel") + 1] == "tcg,thread=multi"
    assert tcg[tcg.index("-cpu") + 1] == "max"
    kvm = _argv(tmp_path, VmSettings.from_environment({"ZBACKUPD_VM_KVM": "1"}))
    assert kvm[kvm.index("-accel") + 1] == "kvm"


def test_qemu_network_is_isolated_and_forwards_ssh_on_loopback_only(tmp_path: Path) -> None:
    argv = _argv(tmp_path, VmSettings())
    netdev = argv[argv.index("-netdev") + 1]
    assert "restrict=on" in netdev
    assert "hostfwd=tcp:127.0.0.1:40022-:22" in netdev
    assert "-pidfile" in argv
    assert f"file={tmp_path / 'o.qcow2'},if=virtio,format=qcow2,cache=unsafe" in argv


def test_stale_workdirs_go_and_live_or_fresh_ones_stay(tmp_path: Path) -> None:
    dead = tmp_path / "zbackupd-vm-dead"
    live = tmp_path / "zbackupd-vm-live"
    fresh = tmp_path / "zbackupd-vm-fresh"
    other = tmp_path / "unrelated"
    for directory in (dead, live, fresh, other):
        directory.mkdir()
    (dead / "qemu.pid").write_text("999999999\n")  # no such process
    (live / "qemu.pid").write_text(f"{os.getpid()}\n")  # alive, but not QEMU
    later = time.time() + STALE_WORKDIR_SECONDS + 10
    os.utime(fresh, (later - 5, later - 5))
    remove_stale_workdirs(parent=tmp_path, now=later)
    assert not dead.exists()
    assert fresh.exists()
    assert other.exists()
    # Our own PID is alive but not QEMU: the directory counts as dead too.
    assert not live.exists()

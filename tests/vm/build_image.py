"""Builds (or reuses) the Debian 12 + OpenZFS 2.3 guest image the VM suite boots.

The build is slow (debootstrap, a kernel, DKMS compiling zfs.ko under emulation-free
chroot), so its result is cached outside the repository, keyed by a hash of everything
that goes into it: this script, its package lists and the guest config files under
``tests/vm/guest/rootfs``. Concurrent builders serialise on a lock file; the second
one finds the finished image and reuses it.

Run as ``python -m tests.vm.build_image`` (root). The package mirror is read from the
host's own apt configuration at build time, never hard-coded here.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from zbackupd.errors import PermanentError, TransientError

SUITE = "bookworm"
GUEST_FILES = Path(__file__).resolve().parent / "guest" / "rootfs"
DEFAULT_CACHE = Path("/var/tmp/zbackupd-vm")

#: Installed from bookworm (main) into the minbase system.
BASE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "kmod",
    "procps",
    "iproute2",
    "openssh-server",
    "openssh-client",
    "python3",
    "python3-venv",
    "linux-image-amd64",
    "linux-headers-amd64",
)
#: Installed from bookworm-backports (contrib): OpenZFS 2.3.
ZFS_PACKAGES = ("zfs-dkms", "zfsutils-linux")
#: Units that only slow a TCG boot down or would act on pools behind the tests' back.
MASKED_UNITS = (
    "systemd-networkd-wait-online.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "zfs-import-cache.service",
    "zfs-import-scan.service",
    "zfs-mount.service",
    "zfs-share.service",
    "zfs-zed.service",
)
ENABLED_UNITS = ("systemd-networkd.service", "ssh.service")
#: Free room on the root file system beyond what the installed system uses.
ROOT_HEADROOM_BYTES = 2 * 1024**3
HEARTBEAT_SECONDS = 30.0
REGISTRY_TIMEOUT_SECONDS = 20.0


class ImageBuildError(PermanentError):
    """The image could not be built; the message says which step and why."""

    def __init__(self, step: str, detail: str, *, log_path: Path | None = None) -> None:
        self.step = step
        self.detail = detail
        self.log_path = log_path
        where = f" (full log: {log_path})" if log_path else ""
        super().__init__(f"VM image build failed at {step!r}: {detail}{where}")


class RegistryUnreachable(TransientError):
    """The Debian package registry did not answer: nothing can be installed."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"Debian package registry unreachable at {url}: {reason}")


@dataclass(frozen=True, slots=True)
class Mirrors:
    """Where the host's apt gets Debian from: the main archive and the security archive."""

    archive: str
    security: str


@dataclass(frozen=True, slots=True)
class Image:
    """A finished, cached guest image and the credentials the harness needs to use it."""

    directory: Path
    rootfs: Path
    kernel: Path
    initrd: Path
    ssh_key: Path
    host_public_key: Path
    input_hash: str
    zfs_version: str
    kernel_release: str


# --------------------------------------------------------------------------- pure parts


def input_hash(builder_source: bytes, guest_files: Sequence[tuple[str, bytes]]) -> str:
    """Hash of every build input: the builder (with its package lists) and the guest files."""
    digest = hashlib.sha256()
    digest.update(b"builder\0")
    digest.update(builder_source)
    for relative, content in sorted(guest_files):
        digest.update(b"\0file\0" + relative.encode() + b"\0")
        digest.update(hashlib.sha256(content).digest())
    return digest.hexdigest()[:16]


def parse_apt_sources(texts: Sequence[str]) -> Mirrors:
    """Find the Debian archive and security mirror URIs in one-line and deb822 sources.

    Only ``deb`` entries count; the archive is the one serving the release suite itself,
    security the one serving ``<suite>-security``.
    """
    entries: list[tuple[str, list[str]]] = []  # (uri, suites)
    for text in texts:
        entries.extend(_one_line_entries(text))
        entries.extend(_deb822_entries(text))
    archive = next((uri for uri, suites in entries if SUITE in suites), None)
    security = next((uri for uri, suites in entries if f"{SUITE}-security" in suites), None)
    if archive is None:
        raise ImageBuildError("read apt sources", f"no 'deb' source serves {SUITE!r}")
    if security is None:
        security = archive.rstrip("/") + "-security"
    return Mirrors(archive=archive.rstrip("/"), security=security.rstrip("/"))


def _one_line_entries(text: str) -> Iterator[tuple[str, list[str]]]:
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        words = re.sub(r"\[[^\]]*\]", " ", line).split()
        if len(words) >= 3:  # deb URI SUITE [COMPONENTS...]
            yield words[1], [words[2]]


def _deb822_entries(text: str) -> Iterator[tuple[str, list[str]]]:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for raw in stanza.splitlines():
            line = raw.split("#", 1)[0].rstrip()
            if ":" in line and not line.startswith((" ", "\t")):
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled") == "no":
            continue
        for uri in fields.get("uris", "").split():
            yield uri, fields.get("suites", "").split()


def guest_sources_list(mirrors: Mirrors) -> str:
    """The guest's apt sources: main+contrib, updates, security and backports."""
    return (
        f"deb {mirrors.archive} {SUITE} main contrib\n"
        f"deb {mirrors.archive} {SUITE}-updates main contrib\n"
        f"deb {mirrors.archive} {SUITE}-backports main contrib\n"
        f"deb {mirrors.security} {SUITE}-security main contrib\n"
    )


# ------------------------------------------------------------------------ the shell


def cache_root() -> Path:
    """The cache directory: ``$ZBACKUPD_VM_CACHE`` or ``/var/tmp/zbackupd-vm``."""
    return Path(os.environ.get("ZBACKUPD_VM_CACHE", str(DEFAULT_CACHE)))


def host_apt_source_texts() -> list[str]:
    """The text of every apt sources file on this host."""
    paths = [Path("/etc/apt/sources.list")]
    source_dir = Path("/etc/apt/sources.list.d")
    if source_dir.is_dir():
        paths += sorted(source_dir.glob("*.list")) + sorted(source_dir.glob("*.sources"))
    return [path.read_text() for path in paths if path.is_file()]


def current_input_hash() -> str:
    """The input hash of this checkout's builder and guest files."""
    files = [
        (str(path.relative_to(GUEST_FILES)), path.read_bytes())
        for path in sorted(GUEST_FILES.rglob("*"))
        if path.is_file()
    ]
    return input_hash(Path(__file__).read_bytes(), files)


def check_registry(mirrors: Mirrors) -> None:
    """Fail fast and clearly when the Debian registry cannot be reached."""
    for url in (
        f"{mirrors.archive}/dists/{SUITE}/Release",
        f"{mirrors.archive}/dists/{SUITE}-backports/Release",
    ):
        try:
            with urllib.request.urlopen(url, timeout=REGISTRY_TIMEOUT_SECONDS) as answer:  # noqa: S310 -- the URL comes from the host's own apt sources
                answer.read(1)
        except (urllib.error.URLError, OSError) as error:
            raise RegistryUnreachable(url, str(error)) from error


def _say(line: str) -> None:
    """Progress reaches a log file or CI pipe as it happens, not when the buffer fills."""
    print(line, flush=True)


class BuildLog:
    """Detailed output goes to a file; the console gets steps, timings and heartbeats."""

    def __init__(self, path: Path, say: Callable[[str], None]) -> None:
        self.path = path
        self.say = say
        self.started = time.monotonic()

    def elapsed(self) -> str:
        return f"{time.monotonic() - self.started:6.0f}s"

    def run(self, step: str, argv: Sequence[str], *, env: dict[str, str] | None = None) -> None:
        """Run one build command, logging its output, with a heartbeat while it runs."""
        self.say(f"[{self.elapsed()}] {step} ...")
        step_started = time.monotonic()
        with self.path.open("ab") as log:
            log.write(f"\n===== {step}: {' '.join(argv)}\n".encode())
            log.flush()
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
            finished = threading.Event()
            beat = threading.Thread(
                target=self._heartbeat, args=(step, step_started, finished), daemon=True
            )
            beat.start()
            try:
                returncode = process.wait()
            finally:
                finished.set()
                if process.poll() is None:
                    process.kill()
                    process.wait()
        if returncode != 0:
            raise ImageBuildError(
                step, f"exit {returncode}; last lines:\n{self.tail()}", log_path=self.path
            )
        self.say(f"[{self.elapsed()}] {step}: done in {time.monotonic() - step_started:.0f}s")

    def _heartbeat(self, step: str, started: float, finished: threading.Event) -> None:
        while not finished.wait(HEARTBEAT_SECONDS):
            last = self.tail(1).strip()[:100]
            self.say(f"[{self.elapsed()}]   {step}: {time.monotonic() - started:.0f}s ({last})")

    def tail(self, lines: int = 15) -> str:
        with self.path.open("rb") as log:
            log.seek(max(0, self.path.stat().st_size - 8192))
            text = log.read().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def exclusive_lock(path: Path, say: Callable[[str], None]) -> Iterator[None]:
    """Hold an flock on ``path``; say so when waiting behind another builder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"another build holds {path}; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def chroot_mounts(rootfs: Path) -> Iterator[None]:
    """Mount proc/sys/dev into the chroot for package scripts and DKMS; always unmount."""
    mounts = [
        (["-t", "proc", "proc"], rootfs / "proc"),
        (["-t", "sysfs", "sysfs"], rootfs / "sys"),
        (["--bind", "/dev"], rootfs / "dev"),
        (["--bind", "/dev/pts"], rootfs / "dev" / "pts"),
    ]
    mounted: list[Path] = []
    try:
        for options, target in mounts:
            target.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", *options, str(target)], check=True)  # noqa: S607 -- PATH checked
            mounted.append(target)
        yield
    finally:
        for target in reversed(mounted):
            subprocess.run(["umount", "-l", str(target)], check=False)  # noqa: S607 -- PATH checked


def load_image(directory: Path) -> Image | None:
    """The finished image in ``directory``, or None when it is absent or incomplete."""
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    image = Image(
        directory=directory,
        rootfs=directory / "rootfs.img",
        kernel=directory / "vmlinuz",
        initrd=directory / "initrd.img",
        ssh_key=directory / "id_ed25519",
        host_public_key=directory / "ssh_host_ed25519_key.pub",
        input_hash=str(manifest["input_hash"]),
        zfs_version=str(manifest["zfs_version"]),
        kernel_release=str(manifest["kernel_release"]),
    )
    files = (image.rootfs, image.kernel, image.initrd, image.ssh_key, image.host_public_key)
    return image if all(path.is_file() for path in files) else None


def ensure_image(*, say: Callable[[str], None] = _say, force: bool = False) -> Image:
    """Return the cached image for the current inputs, building it first if needed."""
    root = cache_root()
    wanted = current_input_hash()
    final = root / "images" / wanted
    if not force and (image := load_image(final)) is not None:
        return image
    if os.geteuid() != 0:
        raise ImageBuildError(
            "preflight", "building the VM image needs root (debootstrap, chroot, mount)"
        )
    for tool in ("debootstrap", "mkfs.ext4", "ssh-keygen", "chroot", "mount"):
        if shutil.which(tool) is None:
            raise ImageBuildError("preflight", f"{tool} not found: run `make host-deps`")
    with exclusive_lock(root / "build.lock", say):
        if not force and (image := load_image(final)) is not None:
            say(f"image {wanted} was built by another process meanwhile; reusing it")
            return image
        return _build(root, wanted, final, say)


def _build(root: Path, wanted: str, final: Path, say: Callable[[str], None]) -> Image:
    mirrors = parse_apt_sources(host_apt_source_texts())
    say(f"building VM image {wanted} in {root} (mirror {mirrors.archive}); this takes ~15 min")
    check_registry(mirrors)
    work = root / "images" / f"{wanted}.building"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = BuildLog(work / "build.log", say)
    say(f"detailed log: {log.path}")
    rootfs = work / "rootfs"
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "DEBIAN_FRONTEND": "noninteractive",
        "LC_ALL": "C.UTF-8",
        "HOME": "/root",
    }
    log.run(
        "debootstrap (minbase)",
        ["debootstrap", "--variant=minbase", "--components=main,contrib",
         SUITE, str(rootfs), mirrors.archive],
        env=env,
    )  # fmt: skip
    (rootfs / "etc/apt/sources.list").write_text(guest_sources_list(mirrors))
    no_daemons = rootfs / "usr/sbin/policy-rc.d"
    no_daemons.write_text("#!/bin/sh\n# no daemons in the chroot\nexit 101\n")
    no_daemons.chmod(0o755)
    apt = ["chroot", str(rootfs), "apt-get", "-y", "-q", "-o", "Dpkg::Use-Pty=0"]
    with chroot_mounts(rootfs):
        log.run("apt-get update", [*apt, "update"], env=env)
        log.run(
            "install kernel, systemd, sshd, python3",
            [*apt, "install", "--no-install-recommends", *BASE_PACKAGES],
            env=env,
        )
        log.run(
            "install OpenZFS from backports (DKMS compiles zfs.ko; ~10 min)",
            [*apt, "install", "--no-install-recommends", "-t", f"{SUITE}-backports",
             *ZFS_PACKAGES],
            env=env,
        )  # fmt: skip
        log.run("apt-get clean", [*apt, "clean"], env=env)
    no_daemons.unlink()
    kernel_release, zfs_version = _check_guest(rootfs)
    _configure_guest(rootfs, work, log, env)
    _make_filesystem(rootfs, work, log, env, kernel_release)
    (work / "manifest.json").write_text(
        json.dumps(
            {
                "input_hash": wanted,
                "zfs_version": zfs_version,
                "kernel_release": kernel_release,
                "mirror": mirrors.archive,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            indent=2,
        )
    )
    shutil.rmtree(rootfs)
    shutil.rmtree(final, ignore_errors=True)
    work.rename(final)
    _prune_old_images(root, keep=wanted, say=say)
    image = load_image(final)
    if image is None:
        raise ImageBuildError("finish", f"{final} is incomplete after the build")
    say(f"[{log.elapsed()}] image ready: {final} (kernel {kernel_release}, zfs {zfs_version})")
    return image


def _check_guest(rootfs: Path) -> tuple[str, str]:
    """The guest kernel release and ZFS version; fail when DKMS built no zfs.ko for it."""
    releases = sorted(path.name for path in (rootfs / "lib/modules").iterdir())
    if len(releases) != 1:
        raise ImageBuildError("check guest", f"expected one guest kernel, found {releases}")
    release = releases[0]
    modules = list((rootfs / "lib/modules" / release).rglob("zfs.ko*"))
    if not modules:
        raise ImageBuildError("check guest", f"DKMS built no zfs.ko for kernel {release}")
    status = (rootfs / "var/lib/dpkg/status").read_text()
    match = re.search(r"^Package: zfsutils-linux\n(?:.+\n)*?Version: (\S+)", status, re.M)
    if match is None:
        raise ImageBuildError("check guest", "zfsutils-linux is not installed")
    return release, match.group(1)


def _configure_guest(rootfs: Path, work: Path, log: BuildLog, env: dict[str, str]) -> None:
    """Copy the guest config files in, enable/mask units, install the harness's SSH key."""
    for source in sorted(GUEST_FILES.rglob("*")):
        target = rootfs / source.relative_to(GUEST_FILES)
        if source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    log.run("enable units", ["chroot", str(rootfs), "systemctl", "enable", *ENABLED_UNITS], env=env)
    log.run("mask units", ["chroot", str(rootfs), "systemctl", "mask", *MASKED_UNITS], env=env)
    # Root has no password: the serial console is for logs, SSH with the key is the way in.
    log.run("lock root password", ["chroot", str(rootfs), "passwd", "-l", "root"], env=env)
    key = work / "id_ed25519"
    log.run(
        "generate the harness SSH key",
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "zbackupd-vm-harness",
         "-f", str(key)],
        env=env,
    )  # fmt: skip
    ssh_dir = rootfs / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (ssh_dir / "authorized_keys").write_bytes(key.with_suffix(".pub").read_bytes())
    (ssh_dir / "authorized_keys").chmod(0o600)
    host_key = rootfs / "etc/ssh/ssh_host_ed25519_key.pub"
    if not host_key.is_file():
        raise ImageBuildError("configure guest", "openssh-server generated no ed25519 host key")
    shutil.copyfile(host_key, work / "ssh_host_ed25519_key.pub")
    for stale in ("etc/machine-id", "var/lib/dbus/machine-id"):
        with contextlib.suppress(FileNotFoundError):
            (rootfs / stale).unlink()
    (rootfs / "etc/machine-id").write_text("")  # systemd fills it in at first boot


def _make_filesystem(
    rootfs: Path, work: Path, log: BuildLog, env: dict[str, str], kernel_release: str
) -> None:
    """Copy kernel and initrd out, then pack the tree into an ext4 image (no loop mount)."""
    shutil.copyfile(rootfs / f"boot/vmlinuz-{kernel_release}", work / "vmlinuz")
    shutil.copyfile(rootfs / f"boot/initrd.img-{kernel_release}", work / "initrd.img")
    files = (path for path in rootfs.rglob("*") if path.is_file() and not path.is_symlink())
    used = sum(path.lstat().st_size for path in files)
    size_mib = (used + ROOT_HEADROOM_BYTES) // 1024**2 + 1
    log.run(
        f"mkfs.ext4 -d ({size_mib} MiB)",
        ["mkfs.ext4", "-q", "-F", "-L", "zbackupd-root", "-d", str(rootfs),
         str(work / "rootfs.img"), f"{size_mib}M"],
        env=env,
    )  # fmt: skip


def _prune_old_images(root: Path, *, keep: str, say: Callable[[str], None]) -> None:
    """Remove images built from older inputs: each is gigabytes."""
    for directory in (root / "images").iterdir():
        if directory.name != keep and not directory.name.endswith(".building"):
            say(f"removing outdated image {directory}")
            shutil.rmtree(directory, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--print-hash", action="store_true", help="print the input hash only")
    args = parser.parse_args(argv)
    if args.print_hash:
        print(current_input_hash())
        return 0
    started = time.monotonic()
    try:
        image = ensure_image(force=args.force, say=_say)
    except (ImageBuildError, RegistryUnreachable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"VM image: {image.directory} (zfs {image.zfs_version}, kernel {image.kernel_release}) "
        f"in {time.monotonic() - started:.0f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

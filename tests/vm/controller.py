"""Boots the guest image under QEMU and drives it: SSH commands, file copies, QMP, USB hotplug.

One ``Vm`` is one QEMU process in its own process group, with a qcow2 overlay so the
cached image stays pristine. Whatever happens (a failing test, Ctrl-C, the test runner
killed), the QEMU process must not outlive us: ``stop()`` is called by the fixture
finalizer and by ``atexit``, and the kernel kills QEMU if this process dies anyway
(``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.vm.build_image import Image
from zbackupd.errors import PermanentError, TransientError

QEMU = "qemu-system-x86_64"
KERNEL_CMDLINE = "root=/dev/vda rw console=ttyS0 net.ifnames=0 systemd.show_status=1 panic=-1"
#: The guest's NIC: QEMU's user-mode network, isolated (``restrict=on``) so the guest can
#: reach nothing outside; only the SSH port forward on the host's loopback gets in.
NETDEV_ID = "net0"
USB_BUS = "xhci.0"
_PR_SET_PDEATHSIG = 1
WORKDIR_PARENT = Path("/var/tmp")
WORKDIR_PREFIX = "zbackupd-vm-"
#: A scratch directory without a live QEMU this old belongs to a run that died.
STALE_WORKDIR_SECONDS = 120.0
#: How guest scripts run: strict bash that reads no rc files (Debian's bashrc trips on -u
#: when sshd starts it, and its output must never pollute captured stderr).
_GUEST_BASH = "bash --norc --noprofile -euo pipefail -c "
#: systemd colours its boot status lines; reports are plain text.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class VmError(PermanentError):
    """The VM did something the harness did not expect; the message carries the evidence."""


class VmBootError(VmError):
    """The VM did not come up (QEMU failed, or no SSH within the boot timeout)."""

    def __init__(self, reason: str, console_tail: str) -> None:
        self.reason = reason
        self.console_tail = console_tail
        super().__init__(f"VM did not boot: {reason}\n--- serial console ---\n{console_tail}")


class GuestCommandError(VmError):
    """A command in the guest exited non-zero."""

    def __init__(self, command: str, returncode: int, stdout: str, stderr: str) -> None:
        self.command = command
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"guest command exited {returncode}: {command}\n"
            f"--- stdout ---\n{stdout[-3000:]}\n--- stderr ---\n{stderr[-3000:]}"
        )


class GuestCommandTimeout(TransientError):
    """A command in the guest did not finish in time; its SSH client was killed."""

    def __init__(self, command: str, timeout: float) -> None:
        self.command = command
        self.timeout = timeout
        super().__init__(f"guest command did not finish within {timeout:g}s: {command}")


class QmpError(VmError):
    """QEMU refused a QMP command."""

    def __init__(self, command: str, error: Mapping[str, Any]) -> None:
        self.command = command
        self.error = dict(error)
        super().__init__(f"QMP {command} failed: {error.get('desc', error)}")


@dataclass(frozen=True, slots=True)
class VmSettings:
    """How to run QEMU. Defaults suit the 2-core machines: TCG, never nested KVM."""

    memory_mib: int = 3072
    cpus: int = 2
    use_kvm: bool = False
    boot_timeout: float = 420.0
    command_timeout: float = 180.0
    source_disk_bytes: int = 2 * 1024**3

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> VmSettings:
        """``ZBACKUPD_VM_KVM=1`` opts into KVM; ``ZBACKUPD_VM_BOOT_TIMEOUT`` in seconds."""
        defaults = cls()
        return cls(
            use_kvm=environ.get("ZBACKUPD_VM_KVM", "") == "1",
            boot_timeout=float(environ.get("ZBACKUPD_VM_BOOT_TIMEOUT", defaults.boot_timeout)),
            memory_mib=int(environ.get("ZBACKUPD_VM_MEMORY_MIB", defaults.memory_mib)),
        )


@dataclass(frozen=True, slots=True)
class CommandOutput:
    """What a guest command left behind."""

    command: str
    returncode: int
    stdout: str
    stderr: str


@dataclass(frozen=True, slots=True)
class UsbDisk:
    """A virtual USB disk: its backing file on the host and the serial the guest sees."""

    serial: str
    size_bytes: int
    image: Path
    device_id: str
    drive_id: str

    @property
    def by_id(self) -> str:
        """The guest's stable name of the whole disk (udev's ``ID_SERIAL`` link)."""
        return f"/dev/disk/by-id/usb-QEMU_QEMU_HARDDISK_{self.serial}-0:0"


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def qemu_argv(
    image: Image,
    *,
    overlay: Path,
    source_disk: Path,
    settings: VmSettings,
    ssh_port: int,
    console_log: Path,
    qmp_socket: Path,
    pidfile: Path,
) -> list[str]:
    """The full QEMU command line (pure: everything comes in as arguments)."""
    accel = ["-accel", "kvm", "-cpu", "host"] if settings.use_kvm else [
        "-accel", "tcg,thread=multi", "-cpu", "max",
    ]  # fmt: skip
    return [
        QEMU,
        "-name", "zbackupd-vm",
        "-machine", "q35",
        *accel,
        "-smp", str(settings.cpus),
        "-m", str(settings.memory_mib),
        "-nodefaults",
        "-display", "none",
        "-no-reboot",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", KERNEL_CMDLINE,
        "-drive", f"file={overlay},if=virtio,format=qcow2,cache=unsafe",
        "-drive", f"file={source_disk},if=virtio,format=raw,cache=unsafe",
        "-netdev", f"user,id={NETDEV_ID},restrict=on,hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
        "-device", f"virtio-net-pci,netdev={NETDEV_ID}",
        # 15 USB 2 and 15 USB 3 ports (the most qemu-xhci has): a long suite plugs many
        # disks, and with the default 4 + 4 later disks land on hubs that did not enumerate.
        "-device", "qemu-xhci,id=xhci,p2=15,p3=15",
        "-serial", f"file:{console_log}",
        "-qmp", f"unix:{qmp_socket},server=on,wait=off",
        "-pidfile", str(pidfile),
    ]  # fmt: skip


def _die_with_parent() -> None:
    """In the QEMU child before exec: the kernel sends SIGKILL when the test runner dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def remove_stale_workdirs(*, parent: Path = WORKDIR_PARENT, now: float | None = None) -> None:
    """Remove the scratch directories of VMs whose QEMU is gone (a SIGKILLed run leaves
    its multi-GiB overlay behind). Live VMs, even other users', are left alone."""
    moment = time.time() if now is None else now
    for workdir in parent.glob(f"{WORKDIR_PREFIX}*"):
        if not workdir.is_dir() or _qemu_alive(workdir / "qemu.pid"):
            continue
        with contextlib.suppress(FileNotFoundError):
            if moment - workdir.stat().st_mtime > STALE_WORKDIR_SECONDS:
                shutil.rmtree(workdir, ignore_errors=True)


def _qemu_alive(pidfile: Path) -> bool:
    try:
        pid = int(pidfile.read_text().strip())
        command = Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ValueError):
        return False
    return command.startswith("qemu")


class Qmp:
    """A minimal synchronous QMP client on QEMU's unix socket."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.settimeout(timeout)
        self._socket.connect(str(path))
        self._reader = self._socket.makefile("rb")
        self.events: list[dict[str, Any]] = []
        self._read_message()  # the greeting
        self.execute("qmp_capabilities")

    def _read_message(self) -> dict[str, Any]:
        line = self._reader.readline()
        if not line:
            raise VmError("QMP connection closed by QEMU")
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run one QMP command and return its ``return`` value; events are kept aside."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = dict(arguments)
        self._socket.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self._read_message()
            if "event" in message:
                self.events.append(message)
            elif "error" in message:
                raise QmpError(command, message["error"])
            elif "return" in message:
                return message["return"]

    def human(self, command_line: str) -> str:
        """Run a human-monitor command; its text output is its only error signal."""
        output = str(self.execute("human-monitor-command", {"command-line": command_line}))
        return output.strip()

    def wait_event(self, name: str, *, matching: Mapping[str, Any], timeout: float) -> None:
        """Wait until QEMU reports event ``name`` whose data contains ``matching``."""
        deadline = time.monotonic() + timeout
        while True:
            for index, event in enumerate(self.events):
                data = event.get("data", {})
                if event["event"] == name and all(data.get(k) == v for k, v in matching.items()):
                    del self.events[index]
                    return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise VmError(f"no QMP event {name} {dict(matching)} within {timeout:g}s")
            self._socket.settimeout(remaining)
            try:
                message = self._read_message()
            except TimeoutError:
                continue
            finally:
                self._socket.settimeout(30.0)
            if "event" in message:
                self.events.append(message)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._reader.close()
            self._socket.close()


@dataclass
class Vm:
    """One running guest. Create with ``Vm.boot(image)``; always ``stop()`` it."""

    image: Image
    settings: VmSettings
    workdir: Path
    ssh_port: int = 0
    process: subprocess.Popen[bytes] | None = None
    qmp: Qmp | None = None
    usb_disks: dict[str, UsbDisk] = field(default_factory=dict)
    boot_seconds: float = 0.0

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def boot(cls, image: Image, settings: VmSettings | None = None) -> Vm:
        """Start QEMU and wait until the guest answers over SSH (or raise VmBootError)."""
        remove_stale_workdirs()
        workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX, dir=WORKDIR_PARENT))
        vm = cls(image=image, settings=settings or VmSettings.from_environment(), workdir=workdir)
        atexit.register(vm.stop)
        try:
            vm._start_qemu()
            vm._wait_for_ssh()
        except BaseException:
            vm.stop()
            raise
        return vm

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    def _start_qemu(self) -> None:
        overlay = self.workdir / "root-overlay.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",  # noqa: S607 -- host tool from PATH
             "-b", str(self.image.rootfs), str(overlay)],
            check=True,
        )  # fmt: skip
        source_disk = self.workdir / "source-disk.img"
        with source_disk.open("wb") as sparse:
            sparse.truncate(self.settings.source_disk_bytes)
        self.ssh_port = free_loopback_port()
        (self.workdir / "known_hosts").write_text(
            f"[127.0.0.1]:{self.ssh_port} {self.image.host_public_key.read_text().strip()}\n"
        )
        argv = qemu_argv(
            self.image,
            overlay=overlay,
            source_disk=source_disk,
            settings=self.settings,
            ssh_port=self.ssh_port,
            console_log=self.console_log,
            qmp_socket=self.workdir / "qmp.sock",
            pidfile=self.workdir / "qemu.pid",
        )
        (self.workdir / "qemu-argv.txt").write_text(shlex.join(argv) + "\n")
        with (self.workdir / "qemu-output.log").open("wb") as output:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killpg reaches everything
                preexec_fn=_die_with_parent,  # noqa: PLW1509 -- only prctl, before exec
            )
        deadline = time.monotonic() + 30
        while not (self.workdir / "qmp.sock").exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise VmBootError("QEMU created no QMP socket within 30s", self.console_tail())
            time.sleep(0.1)
        self.qmp = Qmp(self.workdir / "qmp.sock")

    def _check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            output = (self.workdir / "qemu-output.log").read_text(errors="replace")
            code = None if self.process is None else self.process.returncode
            reason = f"QEMU exited ({code}): {output.strip()[-2000:]}"
            raise VmBootError(reason, self.console_tail())

    def _wait_for_ssh(self) -> None:
        started = time.monotonic()
        deadline = started + self.settings.boot_timeout
        while True:
            self._check_alive()
            try:
                result = self.run("true", timeout=20, check=False)
            except GuestCommandTimeout:
                result = None
            if result is not None and result.returncode == 0:
                self.boot_seconds = time.monotonic() - started
                return
            if time.monotonic() > deadline:
                raise VmBootError(
                    f"no SSH on 127.0.0.1:{self.ssh_port} within {self.settings.boot_timeout:g}s",
                    self.console_tail(),
                )
            time.sleep(2)

    def stop(self) -> None:
        """Stop QEMU for sure and remove the overlay and scratch files. Idempotent."""
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                [*self._ssh_base(), "-O", "exit", "root@127.0.0.1"],
                capture_output=True,
                timeout=5,
                check=False,
            )
        if self.qmp is not None:
            with contextlib.suppress(OSError, VmError, TimeoutError):
                self.qmp.execute("quit")
            self.qmp.close()
            self.qmp = None
        if self.process is not None:
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
            self.process = None
        keep = os.environ.get("ZBACKUPD_VM_KEEP_WORKDIR") == "1"
        if not keep and self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)
        with contextlib.suppress(ValueError):
            atexit.unregister(self.stop)

    # ------------------------------------------------------------------ commands

    def _ssh_base(self) -> list[str]:
        return [
            "ssh",
            "-F", "/dev/null",
            "-i", str(self.image.ssh_key),
            "-p", str(self.ssh_port),
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={self.workdir / 'known_hosts'}",
            "-o", "ConnectTimeout=15",
            "-o", "ServerAliveInterval=10",
            "-o", "LogLevel=ERROR",
            # One TCP/SSH connection reused by every command: a handshake costs seconds
            # under TCG.
            "-o", "ControlMaster=auto",
            "-o", f"ControlPath={self.workdir / 'ssh-control'}",
            "-o", "ControlPersist=600",
        ]  # fmt: skip

    def run(
        self,
        script: str,
        *,
        stdin: bytes | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> CommandOutput:
        """Run ``script`` with bash in the guest as root (``-e -u -o pipefail``, no rc files)."""
        limit = timeout if timeout is not None else self.settings.command_timeout
        argv = [*self._ssh_base(), "root@127.0.0.1", _GUEST_BASH + shlex.quote(script)]
        try:
            completed = subprocess.run(
                argv,
                input=stdin if stdin is not None else b"",
                capture_output=True,
                timeout=limit,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            raise GuestCommandTimeout(script, limit) from error
        output = CommandOutput(
            command=script,
            returncode=completed.returncode,
            stdout=completed.stdout.decode("utf-8", errors="replace"),
            stderr=completed.stderr.decode("utf-8", errors="replace"),
        )
        if check and output.returncode != 0:
            raise GuestCommandError(script, output.returncode, output.stdout, output.stderr)
        return output

    def put_file(self, local: Path, remote: str, *, mode: int = 0o644) -> None:
        """Copy one host file into the guest."""
        self.run(
            f"install -D -m {mode:o} /dev/stdin {shlex.quote(remote)}",
            stdin=local.read_bytes(),
        )

    def put_directory(self, local: Path, remote: str, *, timeout: float = 300) -> None:
        """Copy a host directory's contents into ``remote`` in the guest (tar over SSH)."""
        archive = subprocess.run(
            ["tar", "-C", str(local), "-cf", "-", "."],  # noqa: S607 -- host tool from PATH
            capture_output=True,
            check=True,
        )
        quoted = shlex.quote(remote)
        unpack = f"mkdir -p {quoted} && tar -C {quoted} -xf -"
        self.run(unpack, stdin=archive.stdout, timeout=timeout)

    # ------------------------------------------------------------------ USB hotplug

    def plug_usb_disk(self, serial: str, size_bytes: int, *, image: Path | None = None) -> UsbDisk:
        """Attach a USB disk with ``serial`` (a new sparse file unless ``image`` is given)
        and wait until the guest's udev has its by-id link."""
        qmp = self._qmp()
        if image is None:
            image = self.workdir / f"usb-{serial}.img"
            with image.open("wb") as sparse:
                sparse.truncate(size_bytes)
        drive_id = f"drive-{serial}"
        device_id = f"usb-{serial}"
        drive = f"if=none,id={drive_id},file={image},format=raw,cache=unsafe"
        answer = qmp.human(f"drive_add 0 {drive}")
        if answer and answer != "OK":
            raise VmError(f"drive_add for USB disk {serial} failed: {answer}")
        qmp.execute(
            "device_add",
            {"driver": "usb-storage", "bus": USB_BUS, "drive": drive_id,
             "serial": serial, "id": device_id},
        )  # fmt: skip
        disk = UsbDisk(serial, size_bytes, image, device_id, drive_id)
        self.usb_disks[serial] = disk
        self.run(
            f"for i in $(seq 600); do [ -e {disk.by_id} ] && break; sleep 0.1; done; "
            f"udevadm settle; test -e {disk.by_id}",
            timeout=90,
        )
        return disk

    def unplug_usb_disk(self, disk: UsbDisk, *, wait_guest: bool = True) -> None:
        """Pull the disk out from the host side (QMP ``device_del``), like yanking the cable."""
        qmp = self._qmp()
        qmp.execute("device_del", {"id": disk.device_id})
        qmp.wait_event("DEVICE_DELETED", matching={"device": disk.device_id}, timeout=60)
        # A drive_add'ed drive normally goes away with its device; make sure of it.
        answer = qmp.human(f"drive_del {disk.drive_id}")
        if answer and "not found" not in answer.lower():
            raise VmError(f"drive_del {disk.drive_id} failed: {answer}")
        self.usb_disks.pop(disk.serial, None)
        if wait_guest:
            self.run(
                f"for i in $(seq 300); do [ -e {disk.by_id} ] || break; sleep 0.1; done; "
                f"udevadm settle; ! test -e {disk.by_id}",
                timeout=60,
            )

    def set_uplink(self, *, up: bool) -> None:
        """Take the guest's own NIC (the harness's SSH path) down or up via QMP."""
        self._qmp().execute("set_link", {"name": NETDEV_ID, "up": up})

    def _qmp(self) -> Qmp:
        if self.qmp is None:
            raise VmError("the VM is not running")
        return self.qmp

    # ------------------------------------------------------------------ evidence

    def console_tail(self, max_chars: int = 6000) -> str:
        """The end of the guest's serial console log."""
        try:
            text = self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no console log)"
        return _ANSI_ESCAPE.sub("", text)[-max_chars:]

    def journal(self, max_lines: int = 300) -> str:
        """The guest's journal for this boot, or why it could not be read."""
        try:
            result = self.run(f"journalctl -b --no-pager -n {max_lines}", timeout=30, check=False)
        except GuestCommandTimeout as error:
            return f"(journal unavailable: {error})"
        return result.stdout or result.stderr


@contextlib.contextmanager
def running_vm(image: Image, settings: VmSettings | None = None) -> Iterator[Vm]:
    """A booted VM for the duration of the block; stopped however the block ends."""
    vm = Vm.boot(image, settings)
    try:
        yield vm
    finally:
        vm.stop()

"""Fixtures for the real-ZFS VM suite: one booted VM per session, reused by every test.

A test that needs the VM fails loudly when the image cannot be built or the VM cannot
boot; nothing here skips. Per-test cleanup (pools on USB disks exported, disks unplugged)
keeps the shared VM usable after a failing test. On failure, the guest's serial console
and journal are attached to the test's report.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Callable, Generator, Iterator
from types import FrameType

import pytest

from tests.vm.build_image import Image, ensure_image
from tests.vm.controller import GuestCommandTimeout, UsbDisk, Vm, VmError
from tests.vm.topology import BackupServer, install_zbackupd, setup_server

#: The VM of this session, if one was booted: failure reports read it.
_booted: list[Vm] = []

UsbDiskFactory = Callable[..., UsbDisk]


#: pyproject.toml's 300 s per test is for the fast suite. A VM test may build the image
#: (~15 min) and boot the VM in its setup, then run guest commands bounded at 600 s each.
VM_TEST_TIMEOUT = 3600


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``runs_last`` go after every other test of the shared VM: when one
    fails it can leave a pool stuck in the kernel that would poison what follows. VM tests
    without a timeout of their own get ``VM_TEST_TIMEOUT``."""
    items.sort(key=lambda item: item.get_closest_marker("runs_last") is not None)
    for item in items:
        if item.get_closest_marker("vm") is not None and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(VM_TEST_TIMEOUT))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the guest's console and journal to a failing VM test's report."""
    report = yield
    if report.failed and _booted and item.get_closest_marker("vm") is not None:
        vm = _booted[0]
        report.sections.append(("VM serial console (tail)", vm.console_tail()))
        if vm.process is not None and vm.process.poll() is None:
            report.sections.append(("VM journal (tail)", vm.journal()))
    return report


@pytest.fixture(scope="session")
def vm_image() -> Image:
    """The cached guest image, built now if the inputs changed (takes ~15 min)."""
    return ensure_image(say=lambda line: print(line, flush=True))


@pytest.fixture(scope="session")
def vm(vm_image: Image) -> Iterator[Vm]:
    """The booted guest, shared by the whole session; stopped however the session ends."""
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    try:
        machine = Vm.boot(vm_image)
        _booted.append(machine)
        try:
            yield machine
        finally:
            _booted.remove(machine)
            machine.stop()
    finally:
        if previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _interrupt_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """A CI timeout's SIGTERM ends the session like Ctrl-C: finalizers stop the VM."""
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def server(vm: Vm) -> BackupServer:
    """The backup server: sshd in the ``server`` netns, source pool ``tank`` with snapshots."""
    return setup_server(vm)


@pytest.fixture(scope="session")
def zbackupd_version(vm: Vm) -> str:
    """zbackupd installed in the guest from this checkout; the ``--version`` it prints."""
    return install_zbackupd(vm)


_serials = (f"ZBT{number:05d}" for number in itertools.count(1))


@pytest.fixture
def usb_disk(vm: Vm) -> Iterator[UsbDiskFactory]:
    """Factory: ``usb_disk(serial="ABC123", size=1 << 30)`` plugs a new USB disk in.

    After the test, pools other than ``tank`` are exported and every disk the test
    plugged is pulled, so the next test starts from a clean guest.
    """
    plugged: list[UsbDisk] = []

    def plug(serial: str | None = None, size: int = 1 << 30) -> UsbDisk:
        disk = vm.plug_usb_disk(serial or next(_serials), size)
        plugged.append(disk)
        return disk

    yield plug
    _release_usb_pools(vm)
    for disk in plugged:
        if disk.serial in vm.usb_disks:
            vm.unplug_usb_disk(disk, wait_guest=False)
        disk.image.unlink(missing_ok=True)


def _release_usb_pools(vm: Vm) -> None:
    """Export every pool but the server's ``tank`` (forcefully: the test may have failed)."""
    try:
        vm.run(
            "for pool in $(zpool list -H -o name); do\n"
            "  [ \"$pool\" = tank ] && continue\n"
            "  zfs unload-key -r \"$pool\" 2>/dev/null || true\n"
            "  zpool export -f \"$pool\" || echo \"could not export $pool\" >&2\n"
            "done",
            timeout=120,
        )
    except (VmError, GuestCommandTimeout) as error:
        pytest.fail(f"cleanup after the test could not export the USB pools: {error}")


@pytest.fixture(scope="module")
def installed(vm: Vm, server: BackupServer, zbackupd_version: str) -> Iterator[str]:
    """The admin's first setup (tests/vm/story.py), once per module; the daemon is stopped
    again afterwards. Yields the ``authorized_keys`` line ``zbackupd keygen`` printed."""
    from tests.vm import story  # noqa: PLC0415 -- story imports this module's neighbours

    line = story.first_setup(vm, server)
    yield line
    vm.run("systemctl stop zbackupd || true", check=False, timeout=240)

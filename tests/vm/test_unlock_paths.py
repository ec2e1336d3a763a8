"""The three ways to unlock the daemon (docs/keys.md), each driven for real in the guest.

1. Interactive: ``zbackupd unlock`` on a terminal (a real pty), echo off.
2. A password agent: ``systemd-ask-password | zbackupd unlock --passphrase-stdin``, the
   query answered through systemd's ask-password protocol as a boot-time agent would.
3. Unattended: a ``systemd-creds`` encrypted credential loaded by the unit with
   ``LoadCredentialEncrypted=`` (bound to the host key; the guest has no TPM2). A wrong
   credential leaves the daemon running, locked, and saying why.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.vm import story
from tests.vm.conftest import UsbDiskFactory
from tests.vm.controller import Vm

pytestmark = pytest.mark.vm

CREDENTIAL_FILE = "/etc/zbackupd/passphrase.cred"
DROP_IN = "/etc/systemd/system/zbackupd.service.d/credential.conf"

#: Guest-side terminal: runs ``zbackupd unlock`` on a new pty, waits for its prompt and
#: for echo to be off, types the passphrase (read from our stdin), prints what the
#: terminal showed and exits with the command's status.
TTY_DRIVER = r"""
import os, pty, select, sys, termios, time
passphrase = sys.stdin.buffer.readline()
pid, master = pty.fork()
if pid == 0:
    os.execvp("zbackupd", ["zbackupd", "unlock"])
shown = b""
def read_some(timeout):
    global shown
    ready, _, _ = select.select([master], [], [], timeout)
    if ready:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            return False
        if not chunk:
            return False
        shown += chunk
    return True
deadline = time.monotonic() + 120
while b"passphrase:" not in shown:
    if time.monotonic() > deadline or not read_some(1):
        sys.exit("no prompt: " + shown.decode(errors="replace"))
while termios.tcgetattr(master)[3] & termios.ECHO:
    time.sleep(0.05)
os.write(master, passphrase)
while read_some(300):
    pass
_, status = os.waitpid(pid, 0)
sys.stdout.write(shown.decode(errors="replace"))
sys.exit(os.waitstatus_to_exitcode(status))
"""

#: Guest-side password agent (the protocol of systemd's ask-password agents): waits for
#: the query in /run/systemd/ask-password, answers it on its socket with the passphrase
#: read from our stdin.
ASK_AGENT = r"""
import configparser, glob, socket, sys, time
answer = sys.stdin.buffer.readline().rstrip(b"\n")
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    for path in glob.glob("/run/systemd/ask-password/ask.*"):
        query = configparser.ConfigParser(interpolation=None)
        query.read(path)
        if "zbackupd" not in query.get("Ask", "Message", fallback=""):
            continue
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as reply:
            reply.sendto(b"+" + answer, query.get("Ask", "Socket"))
        print("answered:", query.get("Ask", "Message"))
        sys.exit(0)
    time.sleep(0.2)
sys.exit("no zbackupd password query appeared")
"""


@pytest.fixture
def locked_daemon(vm: Vm, installed: str) -> Iterator[None]:
    """The daemon freshly started, locked (no credential configured)."""
    vm.run(f"rm -f {DROP_IN} {CREDENTIAL_FILE}; systemctl daemon-reload")
    story.start_daemon(vm)
    story.wait_for(vm, "the daemon to be ready and locked",
                   lambda: story.status(vm)["locked"] is True, 120)
    yield
    vm.run("systemctl stop zbackupd", check=False, timeout=240)


@pytest.fixture
def credential_drop_in(vm: Vm, installed: str) -> Iterator[None]:
    """The unit loads ``zbackupd-passphrase`` from the encrypted credential file."""
    vm.run(
        f"install -D -m 0644 /dev/stdin {DROP_IN} && systemctl daemon-reload",
        stdin=("[Service]\nLoadCredentialEncrypted="
               f"zbackupd-passphrase:{CREDENTIAL_FILE}\n").encode(),
    )
    yield
    vm.run("systemctl stop zbackupd", check=False, timeout=240)
    vm.run(f"rm -f {DROP_IN} {CREDENTIAL_FILE}; systemctl daemon-reload")


def _seal_credential(vm: Vm, passphrase: bytes) -> None:
    vm.run(
        "systemd-creds encrypt --with-key=host --name=zbackupd-passphrase - "
        f"{CREDENTIAL_FILE}",
        stdin=passphrase,
    )
    sealed = vm.run(f"base64 -d {CREDENTIAL_FILE} 2>/dev/null || cat {CREDENTIAL_FILE}",
                    check=False).stdout
    assert passphrase.strip().decode() not in sealed
    assert passphrase.strip().decode() not in vm.run(f"cat {CREDENTIAL_FILE}").stdout


def test_interactive_unlock_on_a_terminal_with_echo_off(
    vm: Vm, locked_daemon: None
) -> None:
    vm.run("install -m 0600 /dev/stdin /root/tty_driver.py", stdin=TTY_DRIVER.encode())
    shown = vm.run("python3 /root/tty_driver.py", stdin=story.PASSPHRASE, timeout=300).stdout
    assert "zbackupd passphrase:" in shown
    assert story.PASSPHRASE.strip().decode() not in shown, "the passphrase was echoed"
    assert "unlocked" in shown.lower(), shown
    assert story.status(vm)["locked"] is False


def test_unlock_through_systemd_ask_password(vm: Vm, locked_daemon: None) -> None:
    vm.run("install -m 0600 /dev/stdin /root/ask_agent.py", stdin=ASK_AGENT.encode())
    # As a boot script would run it: no terminal, the query goes to the agents.
    vm.run(
        "rm -f /run/unlock.out; nohup bash -c 'systemd-ask-password --no-tty --timeout=120 "
        "\"zbackupd passphrase:\" | zbackupd unlock --passphrase-stdin; echo rc=$?' "
        "> /run/unlock.out 2>&1 < /dev/null &"
    )
    answered = vm.run("python3 /root/ask_agent.py", stdin=story.PASSPHRASE, timeout=180).stdout
    assert "answered: zbackupd passphrase:" in answered
    story.wait_for(vm, "the piped unlock to finish",
                   lambda: "rc=" in vm.run("cat /run/unlock.out").stdout, 300)
    output = vm.run("cat /run/unlock.out").stdout
    assert "rc=0" in output, output
    assert story.status(vm)["locked"] is False


def test_unattended_unlock_from_an_encrypted_credential(
    vm: Vm, credential_drop_in: None, usb_disk: UsbDiskFactory
) -> None:
    _seal_credential(vm, story.PASSPHRASE)
    usb = usb_disk(serial="ZBCRED1", size=1 << 30)
    disk = story.init_disk(vm, usb, "cred-a")
    started = vm.run("date +%s").stdout.strip()
    story.start_daemon(vm)  # coldplug; nobody runs `zbackupd unlock`
    story.wait_powered_off(vm, disk)
    assert story.last_run(vm, disk.label)["ok"], story.last_run(vm, disk.label)
    assert story.status(vm)["locked"] is False
    journal = vm.run(f"journalctl -u zbackupd --no-pager -o cat --since @{started}").stdout
    assert "unlocked from credential" in journal, journal
    # systemd decrypted it into the service's own credential directory, gone at stop.
    vm.run("systemctl stop zbackupd", timeout=240)
    assert vm.run("test -e /run/credentials/zbackupd.service", check=False).returncode != 0


def test_wrong_credential_leaves_the_daemon_running_and_locked(
    vm: Vm, credential_drop_in: None
) -> None:
    _seal_credential(vm, b"not the passphrase\n")
    started = vm.run("date +%s").stdout.strip()
    story.start_daemon(vm)
    story.wait_for(vm, "the credential to be refused",
                   lambda: "wrong passphrase" in story.systemd_status_line(vm), 180)
    assert story.status(vm)["locked"] is True
    assert vm.run("systemctl is-active zbackupd").stdout.strip() == "active"
    journal = vm.run(f"journalctl -u zbackupd --no-pager -o cat --since @{started}").stdout
    assert "unlock from credential failed" in journal, journal
    # The interactive path still works after a refused credential.
    assert "unlocked" in story.unlock(vm).lower()
    assert story.status(vm)["locked"] is False

"""zbackupd-gate against real OpenZFS (issue 13): what the server says, not the client.

The gate runs as root, as sshd would run it (the installed console script, its real
configuration from ``story.first_setup``, ``SSH_ORIGINAL_COMMAND`` set), on the source
pool ``tank``: ``tank/secure`` is encrypted with its key loaded, ``tank/plain`` is not,
and ``tank`` itself is outside the gate's roots.
"""

from __future__ import annotations

import shlex

import pytest

from tests.unit.test_gate import encode_token
from tests.vm import story
from tests.vm.controller import CommandOutput, Vm
from tests.vm.topology import GUEST_VENV, BackupServer
from zbackupd.server.gate import EXIT_REFUSED

pytestmark = pytest.mark.vm

GATE = f"{GUEST_VENV}/bin/zbackupd-gate --config {story.GATE_CONFIG}"


def gate(vm: Vm, command: str, *, stdout: str = "") -> CommandOutput:
    """The gate as sshd runs it, with ``command`` as the client's; exit status kept."""
    redirect = f" > {stdout}" if stdout else ""
    return vm.run(
        f"env -i SSH_ORIGINAL_COMMAND={shlex.quote(command)} "
        f"SSH_CONNECTION='10.77.0.1 50000 10.77.0.2 22' {GATE}{redirect}",
        check=False,
        timeout=300,
    )


def test_the_gate_checks_encryption_and_token_guids_on_real_zfs(
    vm: Vm, server: BackupServer, installed: str
) -> None:
    assert server.datasets["tank/secure"]
    assert not server.datasets["tank/plain"]
    assert vm.run("zfs get -H -o value keystatus tank/secure").stdout.strip() == "available"

    # (a) a plaintext send of the encrypted dataset: zfs would decrypt it. Refused.
    for command in ("zfs send -L -c tank/secure@s2", "zfs send -nvP -L -c -i tank/secure@s1 "
                    "tank/secure@s2"):
        refused = gate(vm, command, stdout="/dev/null")
        assert refused.returncode == EXIT_REFUSED, (command, refused)
        assert "encrypted" in refused.stderr, refused.stderr

    # (b) the raw send of it streams; a plaintext estimate of the unencrypted one passes.
    raw = gate(vm, "zfs send -w tank/secure@s2", stdout="/dev/null")
    assert raw.returncode == 0, raw
    plain = gate(vm, "zfs send -nvP -L -c tank/plain@s2")
    assert plain.returncode == 0, plain
    assert "size" in plain.stdout

    # (c) a forged resume token: in-root toname, toguid of a snapshot outside the roots.
    outside = int(vm.run("zfs get -H -p -o value guid tank@s2").stdout)
    forged = encode_token("tank/secure@s2", raw=True, toguid=outside)
    refused = gate(vm, f"zfs send -t {forged}", stdout="/dev/null")
    assert refused.returncode == EXIT_REFUSED, refused
    assert "toguid" in refused.stderr, refused.stderr
    logged = vm.run("journalctl -t zbackupd-gate --no-pager -o cat -n 20").stdout
    assert "toguid" in logged

"""Captures real OpenZFS output into ``tests/data/zfs-output/`` for the parsers' tests.

Boots the VM, builds the backup-server topology, plugs a USB disk and runs, in order,
every command whose output zbackupd parses, plus the failures whose stderr it must
classify. Each capture is written as ``<name>.stdout`` / ``<name>.stderr`` (only the
non-empty ones, byte for byte) and listed in the README's table with its command, exit
status and what it shows. Failures that must fail are checked to fail, so a fixture can
never silently show a success instead.

Run as ``python -m tests.vm.capture_outputs`` (root; builds the image if needed).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.vm.build_image import ensure_image
from tests.vm.controller import CommandOutput, UsbDisk, Vm, VmError, running_vm
from tests.vm.topology import setup_server

OUTPUT_DIR = Path(__file__).resolve().parents[1] / "data" / "zfs-output"
POOL = "xpool"
SERIAL = "CAPTURE0001"
SUSPEND_SERIAL = "SUSPEND0001"
BOOKMARK = "zbackupd_CAPTURE0001"
HOLD_TAG = "zbackupd-CAPTURE0001"


#: What a parser author should know, as seen on OpenZFS 2.3.2 (check after regenerating).
NOTES = """
## Seen on 2.3.2 (worth knowing when parsing)

- Some receive errors are wrapped onto two lines mid-sentence ("most recent snapshot of X
  does not\\nmatch incremental source", "has been modified\\nsince most recent snapshot"):
  match on the text with newlines folded to spaces.
- `zfs load-key` (with or without `-n`) exits **255** on a wrong key; `-n` also prints
  "0 / 1 key(s) successfully verified" on stdout.
- `zfs destroy` of a missing snapshot exits 1 with "could not find any snapshots to destroy",
  not "dataset does not exist".
- `zpool export` of a SUSPENDED pool exits 1 and printed nothing at all here.
- `zpool status` of a SUSPENDED pool shows `state: SUSPENDED` while the vdev lines still say
  ONLINE (with READ/WRITE error counts); `zpool list -o health` says SUSPENDED.
- Creation times and hold timestamps come from the guest clock (the host's time).
"""


class CaptureMismatch(VmError):
    """A command meant to fail succeeded (or the reverse): the fixture would lie."""


@dataclass(frozen=True, slots=True)
class Captured:
    """One README row."""

    name: str
    command: str
    returncode: int
    files: tuple[str, ...]
    shows: str


@dataclass
class Recorder:
    """Runs commands in the guest and writes what they printed into the fixture directory."""

    vm: Vm
    out_dir: Path
    zfs_version: str = ""
    rows: list[Captured] = field(default_factory=list)

    def capture(
        self,
        name: str,
        command: str,
        shows: str,
        *,
        script: str | None = None,
        stdin: bytes | None = None,
        fails: bool = False,
        timeout: float = 180,
    ) -> CommandOutput:
        """Run ``script`` (default: ``command``) and store its stdout/stderr as ``name``."""
        result = self.vm.run(script or command, stdin=stdin, check=False, timeout=timeout)
        if fails != (result.returncode != 0):
            raise CaptureMismatch(
                f"capture {name}: expected {'failure' if fails else 'success'}, got exit "
                f"{result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
            )
        files = []
        for suffix, text in (("stdout", result.stdout), ("stderr", result.stderr)):
            path = self.out_dir / f"{name}.{suffix}"
            if text:
                path.write_text(text)
                files.append(path.name)
            else:
                path.unlink(missing_ok=True)
        self.rows.append(Captured(name, command, result.returncode, tuple(files), shows))
        print(f"  captured {name} (exit {result.returncode})", flush=True)
        return result

    def write_readme(self, started: str) -> None:
        lines = [
            "# Real OpenZFS output",
            "",
            "Captured from real OpenZFS in the test VM by `python -m tests.vm.capture_outputs`",
            "(regenerate with that command; it rewrites every file listed here).",
            "",
            f"- OpenZFS: `{self.zfs_version}` (Debian 12 bookworm-backports, DKMS module)",
            f"- captured: {started}",
            "- topology: source pool `tank` (`tank/secure` and `tank/secure/docs` encrypted,",
            "  keyformat=raw; `tank/plain` unencrypted; snapshots `@s1`, `@s2`, later `@s3`),",
            f"  USB disk pool `{POOL}` (encrypted, keyformat=raw, keylocation=prompt) with",
            f"  `{POOL}/backup/secure` (raw-received) and `{POOL}/backup/plain` (`send -L -c`).",
            "- `<name>.stdout` / `<name>.stderr` hold the streams byte for byte; a stream that was",
            "  empty has no file. `exit` is the command's exit status.",
            "",
            "| name | OpenZFS | command | exit | files | what it shows |",
            "|---|---|---|---|---|---|",
        ]
        version = self.zfs_version.removeprefix("zfs-")
        for row in self.rows:
            command = row.command.replace("|", "\\|").replace("\n", " ")
            files = ", ".join(f"`{name}`" for name in row.files) or "(no output)"
            lines.append(
                f"| {row.name} | {version} | `{command}` | {row.returncode} | {files} | "
                f"{row.shows} |"
            )
        (self.out_dir / "README.md").write_text("\n".join(lines) + "\n" + NOTES)


def _receive_from_server(send: str, receive: str) -> str:
    """A guest pipeline: ``send`` on the server over SSH into a local ``receive``.

    Only the receive's stderr is kept: that is the side zbackupd classifies.
    """
    return f"ssh backup-server {shlex.quote(send)} 2>/dev/null | {receive}"


def capture_all(rec: Recorder) -> None:
    """Set the scene and capture every fixture into the recorder's directory."""
    vm = rec.vm
    rec.out_dir.mkdir(parents=True, exist_ok=True)
    setup_server(vm)
    version = rec.capture("zfs-version", "zfs version", "userland and kernel module versions")
    rec.zfs_version = version.stdout.splitlines()[0].strip()

    disk = vm.plug_usb_disk(SERIAL, 1 << 30)
    pool_key = os.urandom(32)
    vm.run(
        f"zpool create -f -o ashift=12 -O encryption=on -O keyformat=raw -O keylocation=prompt "
        f"-O mountpoint=none -O canmount=off {POOL} {disk.by_id}\n"
        f"zfs create -u {POOL}/backup",
        stdin=pool_key,
    )
    vm.run(
        f"zfs bookmark tank/secure@s1 tank/secure#{BOOKMARK}\n"
        f"zfs bookmark tank/plain@s1 tank/plain#{BOOKMARK}\n"
        f"zfs hold {HOLD_TAG} tank/secure@s1 tank/secure@s2\n"
        f"zfs hold keep tank/secure@s2\n"
        + _receive_from_server(
            "zfs send -w tank/secure@s1", f"zfs receive -s -u {POOL}/backup/secure"
        )
        + "\n"
        + _receive_from_server(
            "zfs send -L -c tank/plain@s1", f"zfs receive -s -u {POOL}/backup/plain"
        ),
        timeout=300,
    )  # fmt: skip

    _capture_listings(rec)
    _capture_send_estimates(rec)
    _capture_receive_state(rec)
    _capture_pool_state(rec, disk)
    _capture_failures(rec, pool_key)
    _capture_suspended(rec)


def _capture_listings(rec: Recorder) -> None:
    rec.capture(
        "zfs-list-snapshots",
        "zfs list -H -p -t snapshot -o name,guid,createtxg,creation -s createtxg -r tank",
        "server snapshots of every dataset, oldest first",
    )
    rec.capture(
        "zfs-list-bookmarks",
        "zfs list -H -p -t bookmark -o name,guid,createtxg,creation -s createtxg -r tank",
        "bookmarks (`#`) carry the guid and createtxg of their snapshot",
    )
    rec.capture(
        "zfs-list-snapshots-disk",
        f"zfs list -H -p -t snapshot -o name,guid,createtxg,creation -s createtxg -r {POOL}",
        "the disk's received snapshots: same guids as the server, other createtxg",
    )
    rec.capture(
        "zfs-list-snapshots-none",
        "zfs list -H -p -t snapshot -o name,guid,createtxg,creation -s createtxg -r tank/plain"
        "@nope",
        "listing a snapshot that does not exist",
        fails=True,
    )
    rec.capture(
        "zfs-holds",
        "zfs holds -H -p tank/secure@s1 tank/secure@s2",
        "holds: name, tag, creation (seconds); one snapshot with two tags",
    )
    rec.capture(
        "zfs-holds-none",
        "zfs holds -H -p tank/plain@s1",
        "a snapshot without holds prints nothing",
    )


def _capture_send_estimates(rec: Recorder) -> None:
    for name, command, shows in (
        ("zfs-send-nvP-full", "zfs send -nvP -L -c tank/plain@s1", "full non-raw estimate"),
        (
            "zfs-send-nvP-incremental",
            "zfs send -nvP -L -c -i @s1 tank/plain@s2",
            "incremental non-raw estimate",
        ),
        ("zfs-send-nvP-raw", "zfs send -nvP -w tank/secure@s1", "full raw estimate"),
        (
            "zfs-send-nvP-raw-incremental",
            "zfs send -nvP -w -i @s1 tank/secure@s2",
            "incremental raw estimate",
        ),
        (
            "zfs-send-nvP-raw-bookmark",
            f"zfs send -nvP -w -i tank/secure#{BOOKMARK} tank/secure@s2",
            "incremental raw estimate from a bookmark",
        ),
    ):
        rec.capture(name, command, shows + " (`size` line on stdout)")


def _capture_receive_state(rec: Recorder) -> None:
    props = "receive_resume_token,written,encryption,encryptionroot,keystatus"
    rec.capture(
        "zfs-get-receive-state",
        f"zfs get -H -p -o name,property,value {props} {POOL}/backup/secure",
        "raw-received dataset, no resume token (`-`), its own encryption root",
    )
    rec.capture(
        "zfs-get-receive-state-plain",
        f"zfs get -H -p -o name,property,value {props} {POOL}/backup/plain",
        "non-raw received dataset: encryption root is the disk pool",
    )
    rec.vm.run(
        "dd if=/dev/urandom of=/tank/secure/third.bin bs=1M count=24 status=none\n"
        "dd if=/dev/urandom of=/tank/plain/third.bin bs=1M count=1 status=none\n"
        "zfs snapshot -r tank@s3\n"
        + _receive_from_server(
            "zfs send -w -i @s1 tank/secure@s2", f"zfs receive -s -u {POOL}/backup/secure"
        )
        + "\n"
        + _receive_from_server(
            "zfs send -w -i @s2 tank/secure@s3",
            f"head -c 8000000 | zfs receive -s -u {POOL}/backup/secure || true",
        ),
        timeout=300,
    )  # fmt: skip
    rec.capture(
        "zfs-get-receive-state-token",
        f"zfs get -H -p -o name,property,value {props} {POOL}/backup/secure",
        "after a receive cut short: a receive_resume_token",
    )
    token = rec.vm.run(
        f"zfs get -H -p -o value receive_resume_token {POOL}/backup/secure"
    ).stdout.strip()
    rec.capture(
        "zfs-send-nvP-resume",
        "zfs send -nvP -t <token>",
        "estimate of the rest of a resumable send",
        script=f"zfs send -nvP -t {shlex.quote(token)}",
    )
    rec.capture(
        "zfs-receive-partial-exists",
        f"zfs send -w -i @s2 tank/secure@s3 | zfs receive -u {POOL}/backup/secure (no -s)",
        "receive without -s while a resumable partial state exists",
        script=_receive_from_server(
            "zfs send -w -i @s2 tank/secure@s3", f"zfs receive -u {POOL}/backup/secure"
        ),
        fails=True,
    )
    rec.capture(
        "zfs-receive-resume",
        f"zfs send -t <token> | zfs receive -s -u {POOL}/backup/secure",
        "resuming completes silently",
        script=_receive_from_server(
            f"zfs send -t {token}", f"zfs receive -s -u {POOL}/backup/secure"
        ),
    )


def _capture_pool_state(rec: Recorder, disk: UsbDisk) -> None:
    rec.capture(
        "zpool-list", "zpool list -H -p -o name,guid,health", "both pools, health ONLINE"
    )
    rec.capture("zpool-status-online", f"zpool status {POOL}", "a healthy pool")
    rec.capture("zpool-status-P-online", f"zpool status -P {POOL}", "full vdev paths")
    rec.vm.run(f"zfs unload-key -r {POOL} || true; zpool export {POOL}")
    rec.capture(
        "zpool-import-list",
        "zpool import -d /dev/disk/by-id",
        "the exported USB pool offered for import, with its id (pool GUID)",
    )
    rec.capture(
        "zpool-import-none",
        "zpool import -d /dev/disk/by-id 1234",
        "importing a pool GUID that is not there",
        fails=True,
    )
    guid = rec.vm.run(
        f"udevadm info -q property -n {disk.by_id}-part1 | sed -n 's/^ID_FS_UUID=//p'"
    ).stdout.strip()
    rec.vm.run(f"zpool import -d {disk.by_id}-part1 -N -o cachefile=none {guid}")


def _capture_failures(rec: Recorder, pool_key: bytes) -> None:
    vm = rec.vm
    rec.capture(
        "zfs-load-key-wrong",
        f"zfs load-key -L prompt {POOL}  (32 wrong raw bytes on stdin)",
        "load-key with a wrong key",
        script=f"zfs load-key -L prompt {POOL}",
        stdin=os.urandom(32),
        fails=True,
    )
    rec.capture(
        "zfs-load-key-n-wrong",
        f"zfs load-key -n -L prompt {POOL}  (32 wrong raw bytes on stdin)",
        "checking a wrong key without loading it",
        script=f"zfs load-key -n -L prompt {POOL}",
        stdin=os.urandom(32),
        fails=True,
    )
    rec.capture(
        "zfs-receive-incremental-key-unloaded",
        f"zfs send -L -c -i @s1 tank/plain@s2 | zfs receive -u {POOL}/backup/plain",
        "incremental non-raw receive with the disk key unloaded",
        script=_receive_from_server(
            "zfs send -L -c -i @s1 tank/plain@s2", f"zfs receive -u {POOL}/backup/plain"
        ),
        fails=True,
    )
    rec.capture(
        "zfs-receive-raw-unencrypted-key-unloaded",
        f"zfs send -w tank/plain@s1 | zfs receive -u {POOL}/backup/plainraw",
        "raw stream of an unencrypted dataset, disk key unloaded",
        script=_receive_from_server(
            "zfs send -w tank/plain@s1", f"zfs receive -u {POOL}/backup/plainraw"
        ),
        fails=True,
    )
    vm.run(f"zfs load-key -L prompt {POOL}", stdin=pool_key)
    rec.capture(
        "zfs-receive-raw-unencrypted",
        f"zfs send -w tank/plain@s1 | zfs receive -u {POOL}/backup/plainraw",
        "raw stream of an unencrypted dataset into the encrypted pool, key loaded",
        script=_receive_from_server(
            "zfs send -w tank/plain@s1", f"zfs receive -u {POOL}/backup/plainraw"
        ),
        fails=True,
    )
    rec.capture(
        "zfs-receive-full-exists",
        f"zfs send -L -c tank/plain@s2 | zfs receive -u {POOL}/backup/plain",
        "full stream into an existing dataset (no common snapshot handling, no -F)",
        script=_receive_from_server(
            "zfs send -L -c tank/plain@s2", f"zfs receive -u {POOL}/backup/plain"
        ),
        fails=True,
    )
    rec.capture(
        "zfs-receive-incremental-mismatch",
        f"zfs send -L -c -i @s2 tank/plain@s3 | zfs receive -u {POOL}/backup/plain",
        "incremental whose source the destination lacks (it has only @s1)",
        script=_receive_from_server(
            "zfs send -L -c -i @s2 tank/plain@s3", f"zfs receive -u {POOL}/backup/plain"
        ),
        fails=True,
    )
    vm.run(
        f"zfs set mountpoint=/mnt/plain {POOL}/backup/plain\n"
        "echo modified > /mnt/plain/local-change.txt\n"
        "sync\n"
        f"zfs unmount {POOL}/backup/plain"
    )
    rec.capture(
        "zfs-get-written-modified",
        f"zfs get -H -p -o name,property,value written {POOL}/backup/plain",
        "a destination modified since its last snapshot: written > 0",
    )
    rec.capture(
        "zfs-receive-modified",
        f"zfs send -L -c -i @s1 tank/plain@s2 | zfs receive -u {POOL}/backup/plain",
        "incremental into a destination modified since its last snapshot",
        script=_receive_from_server(
            "zfs send -L -c -i @s1 tank/plain@s2", f"zfs receive -u {POOL}/backup/plain"
        ),
        fails=True,
    )
    rec.capture(
        "zfs-destroy-missing-dataset",
        f"zfs destroy {POOL}/backup/nope",
        "destroying a dataset that does not exist",
        fails=True,
    )
    rec.capture(
        "zfs-destroy-missing-snapshot",
        f"zfs destroy {POOL}/backup/secure@nope",
        "destroying a snapshot that does not exist (exit 0 or not: see exit)",
        fails=_destroy_missing_snapshot_fails(vm),
    )
    rec.capture(
        "zfs-destroy-held-snapshot",
        "zfs destroy tank/secure@s1",
        "destroying a snapshot that has a hold",
        fails=True,
    )
    vm.run(
        f"zfs create -o mountpoint=/mnt/busy {POOL}/busy\n"
        "(cd /mnt/busy && exec setsid sleep 600) >/dev/null 2>&1 </dev/null &\n"
        "sleep 1"
    )
    rec.capture("zpool-export-busy", f"zpool export {POOL}", "export while a process uses a mount",
                fails=True)  # fmt: skip
    vm.run("pkill -f '^sleep 600$' || true; sleep 1")


def _destroy_missing_snapshot_fails(vm: Vm) -> bool:
    """Whether destroying a missing snapshot fails on this version (asked, not assumed)."""
    probe = vm.run(f"zfs destroy {POOL}/backup/secure@nope", check=False)
    return probe.returncode != 0


def _capture_suspended(rec: Recorder) -> None:
    """Pull a disk mid-write: the pool goes SUSPENDED. Re-plug and clear it afterwards."""
    vm = rec.vm
    key = os.urandom(32)
    disk = vm.plug_usb_disk(SUSPEND_SERIAL, 512 << 20)
    vm.run(
        f"zpool create -f -o ashift=12 -O encryption=on -O keyformat=raw -O keylocation=prompt "
        f"-O mountpoint=/mnt/spool spool {disk.by_id}",
        stdin=key,
    )
    partition = f"{disk.by_id}-part1"
    vm.run(
        "zpool export spool\n"
        f"guid=$(udevadm info -q property -n {partition} | sed -n 's/^ID_FS_UUID=//p')\n"
        f"zpool import -d {partition} -o cachefile=none \"$guid\"",
    )
    vm.run("zfs load-key -L prompt spool && zfs mount spool", stdin=key)
    vm.run("(dd if=/dev/urandom of=/mnt/spool/f bs=1M count=200 conv=fsync >/dev/null 2>&1 &)")
    time.sleep(3)
    vm.unplug_usb_disk(disk, wait_guest=False)
    deadline = time.monotonic() + 120
    while "SUSPENDED" not in vm.run("zpool list -H -o health spool", check=False).stdout:
        if time.monotonic() > deadline:
            raise CaptureMismatch("the pool did not go SUSPENDED within 120s of the unplug")
        time.sleep(2)
    rec.capture(
        "zpool-list-suspended",
        "zpool list -H -p -o name,guid,health",
        "a pool whose disk was pulled mid-write: SUSPENDED",
    )
    rec.capture("zpool-status-suspended", "zpool status spool", "status of a suspended pool")
    rec.capture(
        "zpool-export-suspended",
        "zpool export spool",
        "export of a suspended pool is refused",
        fails=True,
        script="timeout 60 zpool export spool",
    )
    vm.plug_usb_disk(SUSPEND_SERIAL, 512 << 20, image=disk.image)
    rec.capture("zpool-clear", "zpool clear spool", "clearing after the same disk is back")
    vm.run("pkill -x dd || true; sleep 1; zfs unmount -f spool || true")
    rec.capture(
        "zpool-status-after-clear", "zpool status spool", "ONLINE again after re-plug + clear"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Capture real OpenZFS output for parser tests.")
    parser.add_argument("--out", type=Path, default=OUTPUT_DIR)
    args = parser.parse_args(argv)
    started = time.strftime("%Y-%m-%d", time.gmtime())
    image = ensure_image(say=lambda line: print(line, flush=True))
    with running_vm(image) as vm:
        print(f"VM up in {vm.boot_seconds:.0f}s; capturing into {args.out}", flush=True)
        recorder = Recorder(vm, args.out)
        try:
            capture_all(recorder)
        finally:
            if recorder.rows:
                recorder.write_readme(started)
    names = sorted(path.name for path in args.out.iterdir())
    print(f"{len(names)} files in {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


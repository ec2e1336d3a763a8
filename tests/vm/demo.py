"""The demo: build/boot the real-ZFS VM and walk through the user story step by step.

Run as ``python -m tests.vm.demo`` (``make demo``). First the plumbing the daemon stands
on (real OpenZFS, USB hotplug with a chosen serial, raw send over SSH, sysfs power-off),
then the product itself: the daemon under systemd backs up a plugged-in disk by itself,
exports it and powers it off; ``systemctl status`` and the journal tell what happened.
"""

from __future__ import annotations

import os
import sys
import time

from tests.vm import story as admin
from tests.vm.build_image import ensure_image
from tests.vm.controller import Vm, running_vm
from tests.vm.topology import BackupServer, install_zbackupd, setup_server

SERIAL = "DEMO0001"
POOL = "offsite"


class Story:
    """Prints numbered steps with their timing and the guest's answers."""

    def __init__(self) -> None:
        self.number = 0
        self.started = time.monotonic()

    def step(self, title: str) -> None:
        self.number += 1
        print(f"\n[{time.monotonic() - self.started:5.0f}s] {self.number}. {title}", flush=True)

    @staticmethod
    def show(text: str) -> None:
        for line in text.rstrip().splitlines():
            print(f"      {line}", flush=True)


def tell(story: Story, vm: Vm) -> BackupServer:
    """The plumbing story on a booted VM; returns the backup server it set up."""
    story.step("the guest runs real OpenZFS")
    story.show(vm.run("uname -r; zfs version").stdout)

    story.step("the backup server: sshd in network namespace 'server', source pool 'tank'")
    server = setup_server(vm)
    story.show(vm.run(server.ssh("zfs list -o name,encryption,used -r tank")).stdout)
    story.show(vm.run(server.ssh("zfs list -t snapshot -o name,guid -r tank")).stdout)

    story.step("zbackupd, installed in the guest from this checkout's wheel")
    story.show(install_zbackupd(vm))

    story.step(f"plug in a USB disk with serial {SERIAL} (QMP hotplug from the host)")
    disk = vm.plug_usb_disk(SERIAL, 1 << 30)
    story.show(vm.run(f"udevadm info -q property -n {disk.by_id} | grep -E '^ID_(BUS|SERIAL)'")
               .stdout)  # fmt: skip

    story.step("create an encrypted pool on it; the raw key arrives on stdin, never a file")
    vm.run(
        f"zpool create -f -o ashift=12 -O encryption=on -O keyformat=raw -O keylocation=prompt "
        f"-O mountpoint=none {POOL} {disk.by_id} && zfs create -u {POOL}/backup",
        stdin=os.urandom(32),
    )
    story.show(vm.run(f"zfs get -o name,property,value encryption,keystatus {POOL}").stdout)

    story.step("pull a raw incremental chain from the server over SSH (disk key unloaded)")
    vm.run(f"zfs unload-key {POOL}")
    for send in ("zfs send -w tank/secure@s1", "zfs send -w -i @s1 tank/secure@s2"):
        story.show(f"$ {server.ssh(send)} | zfs receive -s -u {POOL}/backup/secure")
        vm.run(f"{server.ssh(send)} | zfs receive -s -u {POOL}/backup/secure", timeout=300)
    story.show(vm.run(f"zfs list -t snapshot -o name,guid -r {POOL}").stdout)
    story.show(
        vm.run(f"zfs get -o name,property,value encryptionroot,keystatus {POOL}/backup/secure")
        .stdout
    )  # fmt: skip

    story.step("export the pool and power the disk off through sysfs")
    vm.run(f"zpool export {POOL}")
    usb_device = vm.run(
        f"dev=/sys$(udevadm info -q path -n {disk.by_id})\n"
        'while [ "$dev" != /sys ] && ! grep -qx DEVTYPE=usb_device "$dev/uevent"; do '
        'dev=$(dirname "$dev"); done; echo "$dev"'
    ).stdout.strip()
    story.show(f"echo 1 > {usb_device}/remove")
    vm.run(f"echo 1 > {usb_device}/remove; sleep 2")
    story.show(vm.run("dmesg | grep -E 'Synchronizing SCSI cache|USB disconnect' | tail -2").stdout)
    story.show(vm.run("lsblk -o NAME,SIZE,MODEL").stdout)

    story.step("unplug the (powered-off) disk from the host and plug it back in")
    vm.unplug_usb_disk(disk, wait_guest=False)
    vm.plug_usb_disk(SERIAL, disk.size_bytes, image=disk.image)
    story.show(vm.run("zpool import -d /dev/disk/by-id").stdout)
    vm.unplug_usb_disk(disk)
    return server


def tell_daemon_story(story: Story, vm: Vm, server: BackupServer) -> None:
    """The product's story: plug the disk in, walk away, find it backed up and powered off."""
    story.step("first setup: config, `zbackupd keysetup`, `zbackupd keygen` (key authorised "
               "on the server with zbackupd-gate as forced command), the systemd unit")
    line = admin.first_setup(vm, server)
    story.show(line[:120] + " …")
    story.step(f"`zbackupd init-disk` on a new USB disk with serial {SERIAL}D")
    usb = vm.plug_usb_disk(SERIAL + "D", 1 << 30)
    disk = admin.init_disk(vm, usb, "offsite-demo")
    story.show(vm.run(f"tail -5 {admin.CONFIG_PATH}").stdout)
    vm.unplug_usb_disk(usb)
    story.step("systemctl start zbackupd: running, locked until `zbackupd unlock`")
    admin.start_daemon(vm)
    story.show(vm.run("systemctl status zbackupd --no-pager | head -6", check=False).stdout)
    story.step("plug the disk in: the daemon sees it, and waits for the passphrase")
    admin.replug(vm, disk)
    admin.wait_for(vm, "the disk to wait",
                   lambda: admin.disk_phase(vm, disk.label) == "waiting for unlock", 120)
    story.show("Status: " + admin.systemd_status_line(vm))
    story.step("`zbackupd unlock` (passphrase on stdin) — then walk away")
    admin.unlock(vm)
    admin.wait_powered_off(vm, disk)
    story.step("come back: systemctl status zbackupd")
    story.show(vm.run("systemctl status zbackupd --no-pager | head -8", check=False).stdout)
    story.step(f"journalctl -u zbackupd DISK={usb.serial}")
    story.show(vm.run(f"journalctl -u zbackupd --no-pager -o short DISK={usb.serial} "
                      "| tail -25").stdout)
    story.step("the disk is powered off: gone from the guest")
    story.show(vm.run("lsblk -o NAME,SIZE,MODEL,SERIAL").stdout)
    story.show(vm.run("dmesg | grep -E 'Synchronizing SCSI cache|USB disconnect' | tail -2")
               .stdout)  # fmt: skip
    run = admin.last_run(vm, disk.label)
    story.show(f"last run: ok={run['ok']}, {run['bytes_sent']} bytes, {run['summary']}")


def main() -> int:
    story = Story()
    story.step("build or reuse the cached VM image")
    image = ensure_image(say=lambda line: print(f"      {line}", flush=True))
    story.show(f"{image.directory} (kernel {image.kernel_release}, zfs {image.zfs_version})")
    story.step("boot it under QEMU (TCG) and wait for SSH")
    with running_vm(image) as vm:
        story.show(f"booted in {vm.boot_seconds:.0f}s, ssh on 127.0.0.1:{vm.ssh_port}")
        server = tell(story, vm)
        tell_daemon_story(story, vm, server)
        story.step("shut the VM down")
    print(f"\ndemo finished in {time.monotonic() - story.started:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

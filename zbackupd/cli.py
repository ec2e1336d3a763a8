"""The ``zbackupd`` command line.

Each subcommand is a small function taking parsed arguments and returning an exit code;
heavy modules are imported inside them so that ``--version`` and ``--help`` stay instant.
Errors zbackupd raises on purpose (``ZbackupdError``) become one line on stderr and exit
status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zbackupd import __version__

if TYPE_CHECKING:
    from zbackupd.config import Config
    from zbackupd.keys.secret import SecretBytes

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
DEFAULT_CONFIG_PATH = Path("/etc/zbackupd/zbackupd.toml")

Handler = Callable[[argparse.Namespace], int]


def _load(args: argparse.Namespace) -> Config:
    from zbackupd.config import load_config

    return load_config(args.config)


def _read_passphrase(
    args: argparse.Namespace, prompt: str, *, confirm: bool = False
) -> SecretBytes:
    """From the terminal (echo off), or one line on stdin with ``--passphrase-stdin``."""
    from zbackupd.errors import PermanentError
    from zbackupd.keys.secret import prompt_secret, read_secret

    if args.passphrase_stdin:
        return read_secret(sys.stdin.fileno(), source="stdin")
    first = prompt_secret(prompt)
    if confirm:
        with prompt_secret("Repeat the passphrase: ") as again:
            if again != first:
                first.wipe()
                raise PermanentError("the passphrases differ; nothing was changed")
    return first


# -- subcommands ---------------------------------------------------------------------------


def _check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    print(
        f"{args.config}: OK ({len(config.sources)} source(s), {len(config.disks)} disk(s)"
        + (": " + ", ".join(disk.label for disk in config.disks) if config.disks else "")
        + ")"
    )
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from zbackupd.disk.devmap import DeviceMapper
    from zbackupd.disk.udevwatch import UdevWatcher
    from zbackupd.keys.derivation import KeyStore
    from zbackupd.service.control import ControlServer
    from zbackupd.service.daemon import Daemon
    from zbackupd.service.logs import configure_logging
    from zbackupd.service.notify import notifier_from_environment, watchdog_interval
    from zbackupd.service.store import StateStore
    from zbackupd.zfs.facade import Zfs
    from zbackupd.zfs.runner import LocalRunner

    config = _load(args)
    configure_logging(mode=args.log_format)
    notifier = notifier_from_environment()
    interval = watchdog_interval()
    known = [disk.identity for disk in config.disks]
    runner = LocalRunner()
    daemon = Daemon(
        config,
        zfs=Zfs(runner, timeout=args.command_timeout),
        runner=runner,
        keystore=KeyStore(config.daemon.keys_dir),
        store=StateStore(config.daemon.state_dir),
        notifier=notifier,
        watcher_factory=lambda on_match: UdevWatcher(known, on_match),
        device_mapper=DeviceMapper(runner),
        watchdog_interval=interval,
        config_loader=lambda: _load(args),
    )
    control = ControlServer(
        config.daemon.control_socket,
        on_status=daemon.handle_status,
        on_unlock=daemon.handle_unlock,
        on_plan=daemon.handle_plan,
    )
    asyncio.run(daemon.run(control))
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    """Every configured disk's last success and age from the state store, with what the
    daemon does now when it runs; the exit code says whether all is well (core.report)."""
    import time

    from zbackupd.core.report import exit_code, render_table, reports_as_dict
    from zbackupd.service.control import DaemonNotRunning, request
    from zbackupd.service.monitor import reports_from_store
    from zbackupd.service.store import StateStore

    config = _load(args)
    try:
        live: dict[str, Any] | None = asyncio.run(
            request(config.daemon.control_socket, "status", timeout=10)
        )
    except DaemonNotRunning as error:
        live, why = None, str(error)
    store = StateStore(config.daemon.state_dir)
    reports = reports_from_store(config, store, time.time())
    live_disks = {disk["label"]: disk for disk in (live or {}).get("disks", [])}
    summary = live["summary"] if live else f"daemon not running ({why}); from {store.path}"
    if args.json:
        disks = [{**report, **live_disks.get(report["label"], {"phase": None})}
                 for report in reports_as_dict(reports)]
        document = {**(live or {}), "daemon_running": live is not None, "summary": summary,
                    "disks": disks}
        print(json.dumps(document, indent=2, sort_keys=True))
    else:
        print(summary)
        phases = {label: disk["phase"] for label, disk in live_disks.items()}
        for line in render_table(reports, phases):
            print(f"  {line}")
    return exit_code(reports)


def _plan(args: argparse.Namespace) -> int:
    """What the next plug-in of each disk (or one) would send: a dry run, nothing changed."""
    from zbackupd.service.control import request

    config = _load(args)
    result = asyncio.run(request(config.daemon.control_socket, "plan", label=args.label,
                                 timeout=600))
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return EXIT_OK
    for disk in result["disks"]:
        print(f"disk {disk['label']}:")
        for source in disk["sources"]:
            if source["error"]:
                print(f"  source {source['source']}: cannot ask the server: {source['error']}")
                continue
            for dataset in source["datasets"]:
                print(f"  {source['source']}: {dataset['summary']}")
    return EXIT_OK


def _unlock(args: argparse.Namespace) -> int:
    from zbackupd.service.control import request

    config = _load(args)
    with _read_passphrase(args, "zbackupd passphrase: ") as passphrase:
        result = asyncio.run(request(config.daemon.control_socket, "unlock", secret=passphrase))
    print(f"unlocked: {result['summary']}")
    return EXIT_OK


def _keysetup(args: argparse.Namespace) -> int:
    from zbackupd.keys.derivation import KeyStore, calibrate

    config = _load(args)
    store = KeyStore(config.daemon.keys_dir)
    print(f"Calibrating Argon2id to about {args.kdf_seconds:g}s on this machine …",
          file=sys.stderr)
    params = calibrate(args.kdf_seconds)
    with _read_passphrase(args, "New zbackupd passphrase: ", confirm=True) as passphrase:
        store.create(passphrase, params)
    print(f"key store created in {store.keys_dir} ({params})")
    return EXIT_OK


def _keygen(args: argparse.Namespace) -> int:
    from zbackupd.keys.derivation import KeyStore
    from zbackupd.keys.sshkey import (
        DEFAULT_GATE_COMMAND,
        authorized_keys_line,
        generate_identity,
    )

    config = _load(args)
    with _read_passphrase(args, "zbackupd passphrase: ") as passphrase:
        master = KeyStore(config.daemon.keys_dir).unlock_blocking(passphrase)
    with master, master.ssh_passphrase() as ssh_passphrase:
        public = generate_identity(config.daemon.ssh_key_file, ssh_passphrase)
    gate_command = args.gate_command or DEFAULT_GATE_COMMAND
    print(authorized_keys_line(public, gate_command=gate_command, from_=args.source_address))
    return EXIT_OK


def _recovery_key(args: argparse.Namespace) -> int:
    from zbackupd.errors import PermanentError
    from zbackupd.keys.derivation import KeyStore

    config = _load(args)
    disk = config.disk_by_label(args.label)
    if disk is None:
        raise PermanentError(f"no disk labelled {args.label!r} in {args.config}")
    with _read_passphrase(args, "zbackupd passphrase: ") as passphrase:
        master = KeyStore(config.daemon.keys_dir).unlock_blocking(passphrase)
    with master, master.recovery_key(disk.label) as key:
        sys.stdout.flush()
        os.write(sys.stdout.fileno(), bytes(key) + b"\n")
    print(f"# pool {disk.pool_name}: printf '%s' '<key>' | xxd -r -p | "
          f"zfs load-key -L prompt {disk.pool_name}", file=sys.stderr)
    return EXIT_OK


def _init_disk(args: argparse.Namespace) -> int:
    from zbackupd.disk.initdisk import (
        check_device,
        config_snippet,
        device_facts,
        init_disk,
        pyudev_properties,
    )
    from zbackupd.keys.derivation import KeyStore
    from zbackupd.zfs import names
    from zbackupd.zfs.facade import Zfs
    from zbackupd.zfs.runner import LocalRunner

    config = _load(args)
    label = names.validate_disk_label(args.label)
    if config.disk_by_label(label) is not None:
        from zbackupd.errors import PermanentError

        raise PermanentError(f"disk label {label!r} is already configured in {args.config}")
    pool_name = args.pool_name or f"zbk-{label}"
    facts = device_facts(args.device, pyudev_properties)
    check_device(facts, {disk.serial: disk.label for disk in config.disks})
    with _read_passphrase(args, "zbackupd passphrase: ") as passphrase:
        master = KeyStore(config.daemon.keys_dir).unlock_blocking(passphrase)
    with master:
        key = master.pool_key(label)
    guid = asyncio.run(
        init_disk(Zfs(LocalRunner()), facts, label=label, pool_name=pool_name, pool_key=key,
                  force=args.force)
    )
    assert facts.serial is not None  # noqa: S101 -- check_device refused a disk without one
    print(config_snippet(label, facts.serial, guid, pool_name), end="")
    print(f"# pool {pool_name} created and exported; add the block above to {args.config},\n"
          f"# then: zbackupd udev-rule > /etc/udev/rules.d/90-zbackupd.rules && "
          f"udevadm control --reload; keep `zbackupd recovery-key {label}` on paper.",
          file=sys.stderr)
    return EXIT_OK


def _udev_rule(args: argparse.Namespace) -> int:
    from zbackupd.disk.udevrule import udev_rule

    config = _load(args)
    print(udev_rule(disk.serial for disk in config.disks), end="")
    return EXIT_OK


# -- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zbackupd",
        description="Offline, offsite ZFS backups on rotated external disks.",
    )
    parser.add_argument("--version", action="version", version=f"zbackupd {__version__}")
    parser.add_argument(
        "-c", "--config", type=Path, default=DEFAULT_CONFIG_PATH,
        help=f"configuration file (default: {DEFAULT_CONFIG_PATH})",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    def takes_passphrase(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--passphrase-stdin", action="store_true",
                         help="read the passphrase as one line from stdin instead of the tty")

    check = command("check-config", _check_config,
                    "validate the configuration file and report every problem")
    check.add_argument("path", nargs="?", type=Path, default=None,
                       help="configuration file (default: --config)")

    run = command("run", _run, "run the daemon (systemd starts this)")
    run.add_argument("--log-format", choices=("auto", "journal", "console", "json"),
                     default="auto")
    run.add_argument("--command-timeout", type=float, default=600.0,
                     help="seconds any single zfs/zpool command may take (streams excepted)")

    status = command("status", _status, "what the daemon is doing, and each disk's last run")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    plan = command("plan", _plan, "dry run: what the next plug-in of each disk would send "
                   "(needs the daemon unlocked; asks the server, changes nothing)")
    plan.add_argument("label", nargs="?", help="one disk's label (default: every disk)")
    plan.add_argument("--json", action="store_true", help="machine-readable output")

    takes_passphrase(command("unlock", _unlock, "give the running daemon the passphrase"))

    keysetup = command("keysetup", _keysetup,
                       "create this installation's salt, KDF parameters and verifier")
    keysetup.add_argument("--kdf-seconds", type=float, default=1.0)
    takes_passphrase(keysetup)

    keygen = command("keygen", _keygen,
                     "make the SSH identity (stored encrypted) and print its authorized_keys line")
    keygen.add_argument("--gate-command", default=None,
                        help="the forced command, starting with the gate's absolute path "
                        "(default: /opt/zbackupd-gate/bin/zbackupd-gate --config "
                        "/etc/zbackupd/gate.toml, as docs/server-setup.md installs it)")
    keygen.add_argument("--source-address", default=None,
                        help="restrict the key to this client address (from=)")
    takes_passphrase(keygen)

    recovery = command("recovery-key", _recovery_key,
                       "print a disk's pool key for recovery on another machine")
    recovery.add_argument("label")
    takes_passphrase(recovery)

    init = command("init-disk", _init_disk,
                   "create the encrypted backup pool on a new disk and print its config block")
    init.add_argument("--device", required=True, help="the whole disk, as /dev/disk/by-id/…")
    init.add_argument("--label", required=True, help="the disk's name in the configuration")
    init.add_argument("--pool-name", default=None, help="pool name (default: zbk-<label>)")
    init.add_argument("--force", action="store_true",
                      help="destroy partitions or a pool already on the disk")
    takes_passphrase(init)

    command("udev-rule", _udev_rule, "print the udev rule for the configured disks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from zbackupd.errors import ZbackupdError

    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if getattr(args, "path", None) is not None:
        args.config = args.path
    try:
        return handler(args)
    except ZbackupdError as error:
        print(f"zbackupd {args.command}: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130

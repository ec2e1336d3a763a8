"""The ``zbackupd`` command line.

Each subcommand is a small function taking parsed arguments and returning an exit code;
heavy modules are imported inside them so that ``--version`` and ``--help`` stay instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from zbackupd import __version__

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]


def _check_config(args: argparse.Namespace) -> int:
    from zbackupd.config import ConfigError, load_config

    path: Path = args.path
    try:
        config = load_config(path)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return EXIT_FAILURE
    print(
        f"{path}: OK ({len(config.sources)} source(s), {len(config.disks)} disk(s): "
        + ", ".join(disk.label for disk in config.disks)
        + ")"
    )
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from zbackupd.config import DEFAULT_CONFIG_PATH

    parser = argparse.ArgumentParser(
        prog="zbackupd",
        description="Offline, offsite ZFS backups on rotated external disks.",
    )
    parser.add_argument("--version", action="version", version=f"zbackupd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    check = commands.add_parser(
        "check-config", help="validate the configuration file and report every problem"
    )
    check.add_argument(
        "path", nargs="?", type=Path, default=DEFAULT_CONFIG_PATH,
        help=f"configuration file (default: {DEFAULT_CONFIG_PATH})",
    )
    check.set_defaults(handler=_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return handler(args)

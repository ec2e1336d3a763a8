"""The daemon's stop: sessions aborted, and what cannot be stopped named in the journal.

A ``zfs receive`` writing to a disk that was pulled waits in the kernel for I/O that
never completes; SIGKILL stays pending until the disk is back (seen in the VM: state S
in ``cv_wait_common`` on a SUSPENDED pool, alive minutes after SIGKILL). No process can
end it, so the stop does not wait for it: the unit's ``KillMode=process`` leaves it be
(``mixed`` would SIGKILL it, then wait out TimeoutStopSec and fail the unit), and the
journal says which process it is, why, and what the admin does about it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from zbackupd.server.gate import printable

log = structlog.get_logger(__name__)

PROC = Path("/proc")
#: Characters of the argv shown in the journal line (one line, control characters
#: escaped, as the gate logs commands; the dataset is the last word of a receive).
SHOWN_ARGV_CHARS = 160


@dataclass(frozen=True, slots=True)
class ChildProcess:
    """A process the daemon started that has not ended."""

    pid: int
    state: str  # /proc/<pid>/stat's state letter: R, S, D, Z, T…
    wchan: str  # the kernel function it waits in ("" when not sleeping or hidden)
    argv: tuple[str, ...]


def parse_stat(text: str) -> tuple[str, int]:
    """(state, parent pid) from ``/proc/<pid>/stat``; the command name in parentheses
    may itself contain spaces and parentheses, so fields are counted after the last ``)``."""
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def own_children(proc: Path = PROC, parent: int | None = None) -> list[ChildProcess]:
    """The live children of ``parent`` (this process) in ``proc``; zombies excluded (the
    loop's child watcher reaps them)."""
    parent = os.getpid() if parent is None else parent
    children = []
    for entry in proc.iterdir():
        if not entry.name.isdecimal():
            continue
        try:
            state, ppid = parse_stat((entry / "stat").read_text())
            if ppid != parent or state == "Z":
                continue
            argv = tuple(
                word.decode("utf-8", "replace")
                for word in (entry / "cmdline").read_bytes().split(b"\0") if word
            )
            wchan = (entry / "wchan").read_text().strip()
        except (OSError, ValueError):
            continue  # it ended while we looked
        children.append(ChildProcess(int(entry.name), state, "" if wchan == "0" else wchan,
                                     argv))
    return sorted(children, key=lambda child: child.pid)


def stuck_message(child: ChildProcess, pulled: Sequence[str]) -> str:
    """One self-contained journal line: which process, why it cannot end, what to do."""
    command = printable(" ".join(child.argv), SHOWN_ARGV_CHARS)
    waits = f", waiting in {child.wchan}" if child.wchan else ""
    if pulled:
        disks = ", ".join(pulled)
        todo = (f"it ends once its disk is back: re-plug disk {disks} and start zbackupd "
                "to finish the backup, or reboot")
    else:
        todo = "it ends when its I/O completes; if it never does, reboot"
    return (f"{command} (pid {child.pid}) is stuck in the kernel (state {child.state}"
            f"{waits}) and cannot be killed: left running at stop; {todo}")


async def stop_sessions(
    tasks: Collection[asyncio.Task[None]],
    *,
    grace: float,
    pulled: Collection[str],
    children: Callable[[], list[ChildProcess]] = own_children,
) -> None:
    """Cancel the sessions (each aborts its transfer and exports its pool), wait up to
    ``grace`` for them, then name every child process still alive: those are stuck in the
    kernel on a pulled disk, since the runner kills every command it abandons."""
    for task in tasks:
        task.cancel()
    if tasks:
        _, stuck = await asyncio.wait(tasks, timeout=grace)
        if stuck:
            log.error("sessions still stuck at stop (a pulled disk?)",
                      disks=sorted(pulled), stuck=len(stuck))
    for child in children():
        log.error(stuck_message(child, sorted(pulled)), pid=child.pid, state=child.state,
                  wchan=child.wchan)

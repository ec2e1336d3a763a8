"""The systemd unit's hardening, scored by systemd itself (``systemd-analyze security``).

The score is systemd's offline estimate of the unit's exposure (0 = locked down, 10 = none
of the sandboxing). The goal is at most 2.5; what the settings do to the real daemon is
proven by the VM suite, which runs under this unit. systemd-analyze is a host dependency
(scripts/install-host-deps.sh): without it these tests fail, they never skip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "zbackupd.service"
MAX_EXPOSURE = 2.5
_OVERALL = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) ")


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze is missing: install systemd "
                    "(scripts/install-host-deps.sh, or apt-get install systemd)")
    return found


def exposure(output: str) -> float:
    """The figure of the ``→ Overall exposure level for x.service: 2.1 OK`` line."""
    match = _OVERALL.search(output)
    if match is None:
        raise AssertionError(f"no 'Overall exposure level' line in:\n{output}")
    return float(match.group(1))


def test_exposure_line_is_parsed() -> None:
    line = "→ Overall exposure level for zbackupd.service: 6.7 MEDIUM 😐\n"
    assert exposure("  NAME  DESCRIPTION\n" + line) == 6.7
    assert exposure("→ Overall exposure level for a.service: 10 UNSAFE\n") == 10.0
    with pytest.raises(AssertionError, match="no 'Overall exposure level'"):
        exposure("Failed to parse unit\n")


def test_unit_exposure_is_at_most_the_goal() -> None:
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True, text=True, check=False, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", f"systemd-analyze warned about the unit:\n{result.stderr}"
    score = exposure(result.stdout)
    failing = "\n".join(line for line in result.stdout.splitlines() if line.startswith("✗"))
    assert score <= MAX_EXPOSURE, (
        f"exposure {score} > {MAX_EXPOSURE}; the settings still counted against it:\n{failing}"
    )


def test_unit_verifies(tmp_path: Path) -> None:
    """``systemd-analyze verify``: unknown keys, bad values, missing programs.

    verify insists that ExecStart= programs exist, so the unit is checked the way
    packaging/install.sh installs it: pointed at this environment's ``zbackupd``.
    """
    zbackupd = Path(sys.executable).parent / "zbackupd"
    assert zbackupd.is_file(), f"{zbackupd} missing: install the package (make venv)"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text(encoding="utf-8").replace("/usr/bin/zbackupd", str(zbackupd)),
                    encoding="utf-8")
    result = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", str(unit)],
        capture_output=True, text=True, check=False, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    # verify exits 0 on an unknown key or an invalid value and only says so on stderr.
    assert result.stderr == "", f"systemd-analyze verify:\n{result.stderr}"

"""The node_exporter textfile: per-disk gauges, replaced atomically."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from zbackupd.core.model import DiskIdentity
from zbackupd.core.report import DAY_SECONDS, RunOutcome, disk_reports
from zbackupd.service import metrics

NOW = 1_800_000_000.0


def samples(text: str) -> dict[tuple[str, str], float]:
    return {
        (sample.name, sample.labels.get("disk", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_gauges_say_when_each_disk_was_last_backed_up_and_whether_it_is_stale(
    tmp_path: Path,
) -> None:
    old = RunOutcome(NOW - 20 * DAY_SECONDS - 90, NOW - 20 * DAY_SECONDS, True, "ok",
                     bytes_sent=4096)
    failed = RunOutcome(NOW - 100, NOW - 40, False, "failed: server down")
    reports = disk_reports(
        [DiskIdentity("S1", 1, "p", "offsite-a"), DiskIdentity("S2", 2, "p", "offsite-b")],
        {"offsite-a": failed}, {"offsite-a": old}, now=NOW, stale_after_days=14,
    )
    path = tmp_path / "zbackupd.prom"
    metrics.write(path, reports, locked=False)
    got = samples(path.read_text())
    assert got[("zbackupd_disk_last_success_timestamp_seconds", "offsite-a")] == old.finished
    assert got[("zbackupd_disk_last_run_success", "offsite-a")] == 0
    assert got[("zbackupd_disk_last_run_duration_seconds", "offsite-a")] == 60
    assert got[("zbackupd_disk_stale", "offsite-a")] == 1
    assert got[("zbackupd_disk_never_backed_up", "offsite-b")] == 1
    assert got[("zbackupd_disk_last_success_timestamp_seconds", "offsite-b")] == 0
    assert got[("zbackupd_locked", "")] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["zbackupd.prom"]  # no temp file left
